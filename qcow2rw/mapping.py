"""The allocation map of a backing chain, as ``qemu-img map --output=json`` reports it."""

from __future__ import annotations

from typing import Any, Protocol

from .backing import RawBacking
from .format import COMPRESSED, NORMAL, UNALLOCATED, UNALLOCATED_ALLOC, ZERO_ALLOC
from .storage import HostFile, data_segments

Extent = dict[str, Any]


class Layer(Protocol):
    """What the map needs of a qcow2 layer (an :class:`~qcow2rw.image.Image`)."""

    path: str
    cluster_size: int
    file: HostFile

    @property
    def size(self) -> int:
        """Virtual size in bytes."""

    @property
    def backing(self) -> Any:
        """The layer below (a Layer, a RawBacking), or None."""

    def block_status(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """This layer's extents: (kind, guest, length, host offset or L2 entry)."""

    def count_used_clusters(self, end_cluster: int, limit: int) -> int:
        """How many of the first *end_cluster* host clusters are in use, up to *limit*."""


def chain_map(image: Layer) -> list[Extent]:
    """Merged extents over the whole virtual disk of *image* and its backing chain."""
    out: list[Extent] = []
    for ext in _layer(image, 0, image.size, 0):
        _append(out, ext)
    for ext in out:
        ext.pop("_file", None)
    return out


def _layer(layer: Any, offset: int, length: int, depth: int) -> list[Extent]:
    if isinstance(layer, RawBacking):
        return _raw_layer(layer, offset, length, depth)
    out: list[Extent] = []
    # An encrypted layer's host offsets are not shown (QEMU gives no valid offset
    # there), and its data is not looked into for holes.
    encrypted = getattr(layer, "encrypted", False)
    # Holes are looked for in the file the data lives in: an external data file
    # opened for metadata only without it is not looked into.
    data_host = getattr(getattr(layer, "state", None), "datafile", layer.file)
    look_for_holes = not encrypted and data_host is not None and _looks_preallocated(layer)
    for kind, guest, size, where in layer.block_status(offset, length):
        if kind == UNALLOCATED:
            out += _below(layer, guest, size, depth)
        elif kind == UNALLOCATED_ALLOC:  # (a subcluster: QEMU reports the host offset too)
            out += _below(layer, guest, size, depth, None if encrypted else where)
        elif encrypted and kind in (NORMAL, ZERO_ALLOC):
            data = kind == NORMAL
            out.append(_extent(guest, size, depth, True, not data, data, None, layer.path))
        elif kind == NORMAL and look_for_holes:  # data over a host hole reads as zeros
            for pos, length, is_data in data_segments(data_host.fd, where, size):
                out.append(_extent(guest + pos - where, length, depth, True, not is_data, True,
                                   pos, layer.path))
        elif kind == NORMAL:
            out.append(_extent(guest, size, depth, True, False, True, where, layer.path))
        elif kind == ZERO_ALLOC:
            out.append(_extent(guest, size, depth, True, True, False, where, layer.path))
        elif kind == COMPRESSED:
            out.append(_extent(guest, size, depth, True, False, True, None, layer.path))
        else:
            out.append(_extent(guest, size, depth, True, True, False, None, layer.path))
    return out


def _looks_preallocated(layer: Layer) -> bool:
    """QEMU's test for metadata preallocation: far more clusters in use than on disk.

    Only then does ``qemu-img map`` look into the host file and report data clusters
    over holes as zero, so the same test keeps our map identical to QEMU's.
    """
    cs = layer.cluster_size
    real_clusters = layer.file.allocated_bytes() // cs
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    end_cluster = -(-layer.file.size() // cs)
    return layer.count_used_clusters(end_cluster, threshold) >= threshold


def _below(layer: Any, offset: int, length: int, depth: int,
           host: int | None = None) -> list[Extent]:
    """What an unallocated range of *layer* maps to further down the chain (*host*:
    the range's place in *layer*'s file, for unallocated subclusters that have one)."""
    backing = layer.backing
    if backing is None:
        return [_extent(offset, length, depth, False, True, False, host,
                        None if host is None else layer.path)]
    inside = max(0, min(length, backing.size - offset))
    out: list[Extent] = []
    if inside:
        out += _layer(backing, offset, inside, depth + 1)
    if inside < length:  # past the end of a shorter backing file (zeros, from this layer:
        # an unallocated subcluster keeps its host offset, as in QEMU's block status)
        out.append(_extent(offset + inside, length - inside, depth, False, True, False,
                           None if host is None else host + inside,
                           None if host is None else layer.path))
    return out


def _raw_layer(raw: RawBacking, offset: int, length: int, depth: int) -> list[Extent]:
    return [_extent(pos, size, depth, True, not is_data, is_data, pos, raw.filename)
            for pos, size, is_data in data_segments(raw.file.fd, offset, length)]


def _extent(start: int, length: int, depth: int, present: bool, zero: bool, data: bool,
            offset: int | None, filename: str | None) -> Extent:
    ext: Extent = {"start": start, "length": length, "depth": depth, "present": present,
                   "zero": zero, "data": data}
    if offset is not None:
        ext["offset"] = offset
    ext["_file"] = filename
    return ext


def _append(out: list[Extent], ext: Extent) -> None:
    if out:
        prev = out[-1]
        same = all(prev[k] == ext[k] for k in ("depth", "present", "zero", "data", "_file"))
        if same and ("offset" in prev) == ("offset" in ext):
            if "offset" not in ext or prev["offset"] + prev["length"] == ext["offset"]:
                prev["length"] += ext["length"]
                return
    out.append(ext)
