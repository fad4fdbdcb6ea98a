"""How big a new image must be: ``qemu-img measure``, with qemu-img 7.2's figures.

``measure(size=N)`` sizes an empty image of N bytes; ``measure(src=PATH)`` sizes an
image that receives PATH's content (``qemu-img convert``).  The result holds
``required`` (the file size the new image needs for that content), ``fully-allocated``
(its size once every cluster is written) and, for a qcow2 v3 target measured from a
qcow2 v3 source, ``bitmaps`` (the room the source's persistent bitmaps would take).

The arithmetic is QEMU's: a fully allocated qcow2 image is one header cluster, the L2
tables that map every cluster, an L1 table of whole clusters, the refcount blocks and
table that count all of those (found as a fixed point: they count themselves too),
and the data.  ``required`` is that minus the data clusters the source leaves empty:
a target cluster counts when any part of it holds data in the source (its block
status says data and not zero, through the backing chain).  With a backing file for
the target, or with ``preallocation=falloc|full``, every data cluster counts.  A raw
target needs its virtual size, rounded up to 512 bytes, whatever the content.

Options (``-o``) are checked as QEMU checks them: unknown keys, values of the wrong
type (size, number, on/off), then the qcow2 driver's own rules, with QEMU's words.
Pure arithmetic and reads: nothing is written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from .backing import RawBacking, probe_format
from .errors import FormatError, Qcow2Error, UnsupportedFeature
from .format import (
    COMPRESSED,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    MAX_BITMAP_DIRECTORY_SIZE,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    NORMAL,
    UNALLOCATED,
    ZERO_ALLOC,
    ZERO_PLAIN,
    bitmaps_extension,
    parse_bitmap_directory,
    table_from_bytes,
)
from .image import open_image
from .mapping import chain_map
from .snapshot import SnapshotSelector, find_to_load
from .storage import data_segments
from .units import INT64_MAX, UsageError, parse_size

QCOW_MAX_L1_SIZE = 0x2000000  # bytes of L1 table QEMU accepts (32 MiB)
L1E_SIZE = 8
L2E_SIZE_NORMAL = 8
L2E_SIZE_EXTENDED = 16
REFTABLE_ENTRY_SIZE = 8
BITMAP_DIR_ENTRY_SIZE = 24
BITMAP_TABLE_ENTRY_SIZE = 8
DEFAULT_CLUSTER_SIZE = 65536
PREALLOC_MODES = ("off", "metadata", "falloc", "full")
_NUMBER_RE = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9]+)\Z")

# The option lists qemu-img 7.2 accepts for each target format (the format driver's
# create options plus the file protocol's), with QemuOpts' value types.
_FILE_OPTS = {"size": "size", "nocow": "bool", "preallocation": "str",
              "extent_size_hint": "size"}
_QCOW2_OPTS = {
    **_FILE_OPTS,
    "compat": "str", "backing_file": "str", "backing_fmt": "str", "encryption": "bool",
    "encrypt.format": "str", "encrypt.key-secret": "str", "encrypt.cipher-alg": "str",
    "encrypt.cipher-mode": "str", "encrypt.ivgen-alg": "str", "encrypt.ivgen-hash-alg": "str",
    "encrypt.hash-alg": "str", "encrypt.iter-time": "number", "cluster_size": "size",
    "data_file": "str", "data_file_raw": "bool", "extended_l2": "bool",
    "lazy_refcounts": "bool", "refcount_bits": "number", "compression_type": "str",
}
_RAW_OPTS = dict(_FILE_OPTS)
_TARGETS = {"qcow2": _QCOW2_OPTS, "raw": _RAW_OPTS}
# Formats qemu-img knows but qcow2rw does not measure (qemu-img's own list of drivers
# with create options); anything else is an unknown format, as qemu-img says.
_OTHER_FORMATS = ("qcow", "qed", "vdi", "vhdx", "vmdk", "vpc", "luks", "parallels",
                  "cloop", "dmg", "bochs", "vvfat", "file", "host_device", "nbd", "ssh")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(value: int, alignment: int) -> int:
    return _ceil_div(value, alignment) * alignment


# --------------------------------------------------------------------------------------
# The arithmetic


def refcount_metadata_clusters(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Refcount blocks plus refcount table clusters that count *clusters* and themselves.

    The smallest fixed point: counting the refcount structures may need more of
    them, so iterate until the total stops changing.
    """
    per_block = cluster_size * 8 >> refcount_order
    per_table_cluster = cluster_size // REFTABLE_ENTRY_SIZE
    blocks = table = 0
    total = 0
    while True:
        previous = total
        blocks = _ceil_div(clusters + table + blocks, per_block)
        table = _ceil_div(blocks, per_table_cluster)
        total = clusters + blocks + table
        if total == previous:
            return blocks + table


def fully_allocated_size(virtual_size: int, cluster_size: int, refcount_order: int,
                         extended_l2: bool = False) -> int:
    """Bytes of a qcow2 image of *virtual_size* with every cluster allocated."""
    data = _round_up(virtual_size, cluster_size)
    l2e_size = L2E_SIZE_EXTENDED if extended_l2 else L2E_SIZE_NORMAL
    meta = cluster_size  # the header
    l2_entries = _round_up(data // cluster_size, cluster_size // l2e_size)
    meta += l2_entries * l2e_size  # whole L2 tables
    l1_entries = _round_up(l2_entries * l2e_size // cluster_size, cluster_size // L1E_SIZE)
    meta += l1_entries * L1E_SIZE  # an L1 table of whole clusters
    meta += cluster_size * refcount_metadata_clusters((meta + data) // cluster_size,
                                                      cluster_size, refcount_order)
    return meta + data


def data_clusters_bytes(extents: Iterable[tuple[int, int]], cluster_size: int) -> int:
    """Bytes of the *cluster_size* clusters that any (start, length) data extent touches.

    The extents come in ascending order (a cluster two extents share counts once).
    """
    total = 0
    next_free = 0  # the first cluster not counted yet
    for start, length in extents:
        if length <= 0:
            continue
        first = max(start // cluster_size, next_free)
        end = _ceil_div(start + length, cluster_size)
        if end > first:
            total += (end - first) * cluster_size
            next_free = end
    return total


def bitmaps_size(bitmaps: Iterable[tuple[str, int]], virtual_size: int, cluster_size: int) -> int:
    """Room for persistent bitmaps ((name, granularity) pairs) in a qcow2 image.

    Each bitmap counted fully allocated, plus its bitmap table, plus the directory.
    """
    total = 0
    directory = 0
    for name, granularity in bitmaps:
        nbytes = _ceil_div(_ceil_div(virtual_size, granularity), 8)
        clusters = _ceil_div(nbytes, cluster_size)
        total += clusters * cluster_size
        total += _round_up(clusters * BITMAP_TABLE_ENTRY_SIZE, cluster_size)
        directory += _round_up(BITMAP_DIR_ENTRY_SIZE + len(name.encode("utf-8")), 8)
    return total + _round_up(directory, cluster_size)


# --------------------------------------------------------------------------------------
# Options, as QemuOpts and the qcow2 driver read them


def _parse_number(key: str, value: str) -> int:
    """QemuOpts' number: strtoull with base 0 (decimal, 0x hex, 0 octal; '-' wraps)."""
    text = value.lstrip()
    negative = text.startswith("-")
    body = text[1:] if negative or text.startswith("+") else text
    if not _NUMBER_RE.match(body):
        raise FormatError(f"Parameter '{key}' expects a number")
    try:
        number = int(body, 16) if body[:2].lower() == "0x" else \
            int(body, 8) if body.startswith("0") else int(body, 10)
    except ValueError:  # an 8 or 9 after a leading 0
        raise FormatError(f"Parameter '{key}' expects a number") from None
    if number >= 1 << 64:
        raise FormatError(f"Parameter '{key}' expects a number")
    return (-number) % (1 << 64) if negative else number


def _parse_bool(key: str, value: str) -> bool:
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise FormatError(f"Parameter '{key}' expects 'on' or 'off'")


def _parse_opt_size(key: str, value: str) -> int:
    try:
        return parse_size(value, key)
    except UsageError:
        raise FormatError(f"Parameter '{key}' expects a non-negative number below 2^64 "
                          "(optional suffix k, M, G, T, P or E)") from None


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _check_options(options: Mapping[str, Any] | Iterable[tuple[str, Any]] | str | None,
                   out_format: str) -> dict[str, Any]:
    """The options as typed values (later keys win), checked against *out_format*'s list."""
    if options is None:
        pairs: list[tuple[str, Any]] = []
    elif isinstance(options, str):
        pairs = list(_split_option_list(options))
    elif isinstance(options, Mapping):
        pairs = list(options.items())
    else:
        pairs = list(options)
    known = _TARGETS[out_format]
    out: dict[str, Any] = {}
    for key, value in pairs:
        if value is None:  # QemuOpts: a bare "key" is key=on, "nokey" is key=off
            key, value = (key[2:], "off") if key.startswith("no") else (key, "on")
        kind = known.get(key)
        if kind is None:
            raise FormatError(f"Invalid parameter '{key}'")
        if kind == "size":
            out[key] = value if isinstance(value, int) and not isinstance(value, bool) \
                and 0 <= value <= INT64_MAX else _parse_opt_size(key, _as_text(value))
        elif kind == "number":
            out[key] = value if isinstance(value, int) and not isinstance(value, bool) \
                and value >= 0 else _parse_number(key, _as_text(value))
        elif kind == "bool":
            out[key] = value if isinstance(value, bool) else _parse_bool(key, _as_text(value))
        else:
            out[key] = _as_text(value)
    return out


def _split_option_list(text: str) -> Iterable[tuple[str, str | None]]:
    """QEMU's ``key=value,...`` (``,,`` is a literal comma); a bare word has value None."""
    items, current, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text.startswith(",,", i):
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    items.append("".join(current))
    for item in items:
        if item:
            key, sep, value = item.partition("=")
            yield key, (value if sep else None)


def _qcow2_params(opts: dict[str, Any]) -> dict[str, Any]:
    """The qcow2 driver's reading of the options, in its order, with its messages."""
    extended_l2 = bool(opts.get("extended_l2", False))
    cluster_size = opts.get("cluster_size", DEFAULT_CLUSTER_SIZE)
    bits = (cluster_size & -cluster_size).bit_length() - 1 if cluster_size else 32
    if not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS or cluster_size != 1 << bits:
        raise FormatError(f"Cluster size must be a power of two between {1 << MIN_CLUSTER_BITS} "
                          f"and {1 << (MAX_CLUSTER_BITS - 10)}k")
    if extended_l2 and cluster_size < (1 << MIN_CLUSTER_BITS) * 32:
        raise FormatError("Extended L2 entries are only supported with cluster sizes of at "
                          f"least {(1 << MIN_CLUSTER_BITS) * 32} bytes")
    compat = opts.get("compat")
    if compat is None or compat == "1.1":
        version = 3
    elif compat == "0.10":
        version = 2
    else:
        raise FormatError(f"Invalid compatibility level: '{compat}'")
    refcount_bits = opts.get("refcount_bits", 16)
    if refcount_bits > 64 or refcount_bits <= 0 or refcount_bits & (refcount_bits - 1):
        raise FormatError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise FormatError("Different refcount widths than 16 bits require compatibility "
                          "level 1.1 or above (use compat=1.1 or greater)")
    prealloc = opts.get("preallocation", "off")
    if prealloc not in PREALLOC_MODES:
        raise FormatError(f"invalid parameter value: {prealloc}")
    if opts.get("encrypt.format") == "luks":
        raise UnsupportedFeature("measure: LUKS encryption (encrypt.format=luks) is not "
                                 "supported by qcow2rw")
    return {"cluster_size": cluster_size, "extended_l2": extended_l2, "version": version,
            "refcount_order": refcount_bits.bit_length() - 1, "preallocation": prealloc,
            "has_backing_file": "backing_file" in opts}


# --------------------------------------------------------------------------------------
# The source


class _Source:
    """An open source image: its size, data extents and persistent bitmaps."""

    def __init__(self, path: str, fmt: str | None, force_share: bool,
                 snapshot: SnapshotSelector | None) -> None:
        self.path = path
        if not os.path.exists(path):
            raise FileNotFoundError(2, "No such file or directory", path)
        self.format = fmt if fmt is not None else probe_format(path)
        if self.format not in ("qcow2", "raw"):
            raise UnsupportedFeature(f"Unknown driver '{self.format}' (qcow2rw reads qcow2 and "
                                     "raw sources)")
        if snapshot is not None and self.format != "qcow2":
            raise UnsupportedFeature(f"Failed to load snapshot: Block format '{self.format}' "
                                     "used by device '' does not support temporarily loading "
                                     "internal snapshots")
        self.image: Any = None
        self.raw: RawBacking | None = None
        if self.format == "raw":
            self.raw = RawBacking(path, force_share=force_share)
            self.size = _round_up(self.raw.size, 512)  # bdrv_getlength: whole sectors
        else:
            self.image = open_image(path, readonly=True, force_share=force_share)
            self.size = int(self.image.size)
            self.view: Any = self.image
            if snapshot is not None:
                try:
                    self.view = _SnapshotView(self.image, snapshot)
                except BaseException:
                    self.image.close()
                    raise

    def data_extents(self) -> list[tuple[int, int]]:
        """(start, length) of what reads as data (not zero), in order, whole chain."""
        if self.raw is not None:
            return [(pos, length) for pos, length, is_data
                    in data_segments(self.raw.file.fd, 0, self.raw.size) if is_data]
        return [(e["start"], e["length"]) for e in chain_map(self.view)
                if e["data"] and not e["zero"]]

    def bitmaps(self) -> list[tuple[str, int]] | None:
        """(name, granularity) of the persistent bitmaps; None when the source cannot
        have any (raw, qcow2 v2)."""
        if self.image is None or self.image.header.version < 3:
            return None
        header = self.image.header
        ext = bitmaps_extension(header)
        if ext is None:
            return []
        if ext.directory_size > MAX_BITMAP_DIRECTORY_SIZE:
            raise FormatError("Bitmap directory is too large")
        buf = self.image.file.pread(ext.directory_offset, ext.directory_size)
        return [(e.name, 1 << e.granularity_bits) for e in parse_bitmap_directory(buf, ext.count)]

    def close(self) -> None:
        if self.image is not None:
            self.image.close()
        if self.raw is not None:
            self.raw.close()


class _SnapshotView:
    """An image seen through an internal snapshot's L1 table (``qemu-img -l``), for
    :func:`~qcow2rw.mapping.chain_map`: QEMU's ``bdrv_snapshot_load_tmp`` keeps the
    image's size and backing chain and swaps in the snapshot's L1 table, read-only."""

    def __init__(self, image: Any, selector: SnapshotSelector) -> None:
        snap = find_to_load(image.snapshots(), selector)
        if image.header.extended_l2:
            raise UnsupportedFeature("measure: -l on an image with extended L2 entries is not "
                                     "supported by qcow2rw")
        self.image = image
        self.path = image.path
        self.cluster_size = image.cluster_size
        self.file = image.file
        self.size = image.size
        self.backing = image.backing
        self._tables: dict[int, Any] = {}
        self.l1 = table_from_bytes(image.file.pread_exact(snap.l1_table_offset,
                                                          snap.l1_size * L1E_SIZE))

    def count_used_clusters(self, end_cluster: int, limit: int) -> int:
        return int(self.image.count_used_clusters(end_cluster, limit))

    def block_status(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """(kind, guest, length, host offset or entry) runs, like ``Image.block_status``."""
        cs, cb = self.cluster_size, self.image.cluster_bits
        l2_entries = self.image.l2_entries
        out: list[tuple[int, int, int, int]] = []

        def add(kind: int, guest: int, size: int, where: int) -> None:
            if out:
                k, g, n, w = out[-1]
                if k == kind and g + n == guest and (
                        kind in (UNALLOCATED, ZERO_PLAIN)
                        or kind in (NORMAL, ZERO_ALLOC) and w + n == where):
                    out[-1] = (k, g, n + size, w)
                    return
            out.append((kind, guest, size, where))

        pos, end = offset, offset + length
        while pos < end:
            index = pos >> cb
            chunk = min(end, (index + 1) << cb) - pos
            l1_index = index // l2_entries
            l2_offset = self.l1[l1_index] & L1E_OFFSET_MASK if l1_index < len(self.l1) else 0
            if not l2_offset:
                table_end = min(end, (l1_index + 1) * l2_entries << cb)
                add(UNALLOCATED, pos, table_end - pos, 0)
                pos = table_end
                continue
            table = self._tables.get(l2_offset)
            if table is None:
                table = self._tables[l2_offset] = table_from_bytes(
                    self.file.pread_exact(l2_offset, l2_entries * 8))
            entry = table[index % l2_entries]
            kind = self.image.classify(entry)
            where = entry if kind == COMPRESSED else (entry & L2E_OFFSET_MASK) + (pos & (cs - 1))
            add(kind, pos, chunk, where if kind in (NORMAL, ZERO_ALLOC, COMPRESSED) else 0)
            pos += chunk
        return out


# --------------------------------------------------------------------------------------
# The API


def measure(size: int | None = None, src: str | os.PathLike[str] | None = None, *,
            out_format: str = "qcow2",
            options: Mapping[str, Any] | Iterable[tuple[str, Any]] | str | None = None,
            src_format: str | None = None, force_share: bool = False,
            snapshot: SnapshotSelector | None = None) -> dict[str, int]:
    """What ``qemu-img measure`` prints, as a dict in its JSON order.

    Exactly one of *size* (bytes of an empty image) and *src* (a qcow2 or raw image,
    format probed unless *src_format*) is given.  *out_format* is ``"qcow2"`` or
    ``"raw"``; *options* are its ``-o`` options (a mapping, pairs, or QEMU's
    ``key=value,...`` text): for qcow2 ``cluster_size``, ``compat`` (0.10, 1.1),
    ``refcount_bits``, ``preallocation``, ``extended_l2``, ``backing_file`` (the
    others of qemu-img's list are accepted and do not change the figures).
    *force_share* is ``-U``; *snapshot* (``-l``) measures the content of a qcow2
    source's internal snapshot (an id, else a name; or an (id, name) pair,
    :data:`~qcow2rw.snapshot.SnapshotSelector`), with the image's current size.

    Returns ``{"required": N, "fully-allocated": N}``, with ``"bitmaps"`` first when
    both the source and the target are qcow2 v3.  Raises :class:`Qcow2Error` (or a
    subclass) with qemu-img's message for bad arguments and options,
    :class:`UnsupportedFeature` for what qcow2rw cannot measure, ``OSError`` for a
    source that cannot be opened.
    """
    if src is None and size is None:
        raise Qcow2Error("Either --size N or one filename must be specified.")
    if src is not None and size is not None:
        raise Qcow2Error("--size N cannot be used together with a filename.")
    if src is None and (src_format is not None or snapshot is not None):
        raise Qcow2Error("--image-opts, -f, and -l require a filename argument.")
    if size is not None and not 0 <= size <= INT64_MAX:
        raise Qcow2Error(f"Invalid image size specified. Must be between 0 and {INT64_MAX}.")
    source = _Source(os.fspath(src), src_format, force_share, snapshot) \
        if src is not None else None
    try:
        if out_format not in _TARGETS:
            if out_format in _OTHER_FORMATS:
                raise UnsupportedFeature(f"Unsupported output format '{out_format}' (qcow2rw "
                                         "measures qcow2 and raw targets)")
            raise UnsupportedFeature(f"Unknown file format '{out_format}'")
        opts = _check_options(options, out_format)
        if size is not None:
            opts["size"] = size
        if out_format == "raw":
            required = source.size if source is not None else _round_up(opts.get("size", 0), 512)
            return {"required": required, "fully-allocated": required}
        return _measure_qcow2(opts, source)
    finally:
        if source is not None:
            source.close()


def _measure_qcow2(opts: dict[str, Any], source: _Source | None) -> dict[str, int]:
    params = _qcow2_params(opts)
    cs = params["cluster_size"]
    l2e_size = L2E_SIZE_EXTENDED if params["extended_l2"] else L2E_SIZE_NORMAL
    virtual_size = _round_up(opts.get("size", 0), cs)
    l2_tables = _ceil_div(virtual_size // cs, cs // l2e_size)
    if l2_tables * L1E_SIZE > QCOW_MAX_L1_SIZE:
        raise FormatError("The image size is too large (try using a larger cluster size)")
    required = 0
    if source is not None:
        virtual_size = _round_up(source.size, cs)
        if params["has_backing_file"]:
            required = virtual_size  # nothing is known of the target's backing file
        else:
            required = data_clusters_bytes(source.data_extents(), cs)
    if params["preallocation"] in ("falloc", "full"):
        required = virtual_size
    fully = fully_allocated_size(virtual_size, cs, params["refcount_order"],
                                 params["extended_l2"])
    result: dict[str, int] = {}
    if params["version"] >= 3 and source is not None:
        bitmaps = source.bitmaps()
        if bitmaps is not None:
            result["bitmaps"] = bitmaps_size(bitmaps, source.size, cs)
    result["required"] = fully - virtual_size + required
    result["fully-allocated"] = fully
    return result


__all__ = ["bitmaps_size", "data_clusters_bytes", "fully_allocated_size", "measure",
           "refcount_metadata_clusters"]
