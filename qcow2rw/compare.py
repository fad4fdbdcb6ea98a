"""``qemu-img compare``: are two images the same to a guest?

:func:`compare` walks both images the way qemu-img 7.2's ``img_compare`` walks them,
step by step over the block status of each whole chain (``bdrv_block_status_above``),
so that its verdict, the offset it reports and its strict-mode messages are qemu-img's:

- where both sides say "zero" nothing is read; where one side is unallocated in its
  whole chain only the other is read, and must read as zeros;
- where both are allocated both are read (at most :data:`IO_BUF_SIZE` per step) and
  compared; a mismatch is reported at the start of the first differing 512-byte
  sector of the step (``compare_buffers``, ``find_nonzero``);
- images of different sizes compare equal when the common part does and the longer
  image's tail reads as zeros (``Warning: Image size mismatch!`` first);
- *strict*: different sizes are a mismatch, and so is any step where the two block
  statuses differ (QEMU's flags: data, zero, offset-valid, allocated, EOF).

Sizes are QEMU's: a raw file's size is rounded up to whole 512-byte sectors (the tail
reads as zeros).  Images are ``qcow2`` (any chain our engine opens) or ``raw`` (a plain
file), probed from the magic unless a format is given.  The host-file lookups QEMU
makes for the data runs of images with metadata preallocation are made in strict
mode only (they change the block status, never the verdict on the data).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .backing import RawBacking, probe_format
from .errors import FormatError, Qcow2Error, UnsupportedFeature
from .format import COMPRESSED, NORMAL, UNALLOCATED, UNALLOCATED_ALLOC, ZERO_ALLOC, ZERO_PLAIN
from .image import Image, open_image

__all__ = ["IO_BUF_SIZE", "CompareFailed", "CompareResult", "CompareSource", "compare",
           "compare_sources", "open_source"]

#: qemu-img's IO_BUF_SIZE: the most one step reads from each side.
IO_BUF_SIZE = 2 * 1024 * 1024
SECTOR = 512
_INT_MAX = 2**31 - 1

# QEMU's block status flags (include/block/block-io.h)
BDRV_BLOCK_DATA = 0x01
BDRV_BLOCK_ZERO = 0x02
BDRV_BLOCK_OFFSET_VALID = 0x04
BDRV_BLOCK_ALLOCATED = 0x10
BDRV_BLOCK_EOF = 0x20

_QCOW2_FLAGS = {
    NORMAL: BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID | BDRV_BLOCK_ALLOCATED,
    COMPRESSED: BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED,
    ZERO_PLAIN: BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED,
    ZERO_ALLOC: BDRV_BLOCK_ZERO | BDRV_BLOCK_OFFSET_VALID | BDRV_BLOCK_ALLOCATED,
}

#: Formats qemu-img knows and qcow2rw does not open (anything else is an unknown driver).
_QEMU_FORMATS = frozenset(("bochs", "cloop", "dmg", "luks", "parallels", "qcow", "qed",
                           "vdi", "vhdx", "vmdk", "vpc", "vvfat", "file", "host_device"))

Progress = Callable[[int, int], None]


class CompareFailed(Qcow2Error):
    """The comparison could not be finished; ``exit_code`` is qemu-img's for it
    (3: a block status query failed, 4: a read failed)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class CompareResult:
    """The verdict of :func:`compare`.

    ``messages`` are the lines qemu-img prints on stdout, in order; ``offset`` is the
    reported offset of a content or block-status mismatch (None otherwise).
    """

    identical: bool
    reason: str  # "identical", "content", "size" (strict), "status" (strict)
    offset: int | None
    size_a: int
    size_b: int
    messages: list[str] = field(default_factory=list)

    @property
    def size_mismatch(self) -> bool:
        """The two images have different (QEMU) sizes."""
        return self.size_a != self.size_b

    @property
    def exit_code(self) -> int:
        """qemu-img's exit status: 0 identical, 1 different."""
        return 0 if self.identical else 1

    def __bool__(self) -> bool:
        return self.identical


# --------------------------------------------------------------------------------------
# One side: an open qcow2 chain or a raw file, with QEMU's view of its block status


def _file_status(fd: int, total: int, offset: int, nbytes: int) -> tuple[int, int]:
    """``bdrv_co_block_status`` of a raw file (file-posix under the raw format)."""
    if offset >= total:
        return BDRV_BLOCK_EOF, 0
    nbytes = min(nbytes, total - offset)
    try:
        data = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        data = -1 if exc.errno == errno.ENXIO else -2
    if data == -1:  # a trailing hole
        ret, pnum = BDRV_BLOCK_ZERO, nbytes
    elif data < 0:  # no information: all data
        ret, pnum = BDRV_BLOCK_DATA, nbytes
    elif data > offset:
        ret, pnum = BDRV_BLOCK_ZERO, data - offset
    else:
        try:
            hole = os.lseek(fd, offset, os.SEEK_HOLE)
        except OSError:
            hole = offset
        ret, pnum = BDRV_BLOCK_DATA, (hole - offset if hole > offset else nbytes)
    pnum = min(pnum, nbytes)
    ret |= BDRV_BLOCK_OFFSET_VALID | BDRV_BLOCK_ALLOCATED
    if offset + pnum == total:
        ret |= BDRV_BLOCK_EOF
    return ret, pnum



def _qemu_length(layer: Any) -> int:
    """``bdrv_getlength``: whole sectors (a raw file's size rounded up, a qcow2 image's
    virtual size rounded down, as QEMU's ``total_sectors``)."""
    if isinstance(layer, RawBacking):
        return -(-layer.size // SECTOR) * SECTOR
    return int(layer.size) // SECTOR * SECTOR


class _Qcow2Status:
    """The extents of one qcow2 layer, one L2 table's range at a time (as QEMU's
    ``qcow2_co_block_status``: runs never cross an L2 table)."""

    def __init__(self, img: Image) -> None:
        self.img = img
        self.l1_shift = img.l1_shift
        self.table = -1
        self.extents: list[tuple[int, int, int, int]] = []
        self.index = 0
        self._preallocated: bool | None = None

    @property
    def preallocated(self) -> bool:
        """``qcow2_detect_metadata_preallocation``: far more clusters in use than the
        host file has blocks for (then QEMU asks the host file about data runs)."""
        if self._preallocated is None:
            img = self.img
            cs = img.cluster_size
            real_clusters = img.file.allocated_bytes() // cs
            threshold = max(real_clusters * 10 // 9, real_clusters + 2)
            end_cluster = -(-img.file.size() // cs)
            self._preallocated = img.count_used_clusters(end_cluster, threshold) >= threshold
        return self._preallocated

    def run(self, offset: int) -> tuple[int, int, int]:
        """(kind, end, host offset or 0) of the run of this layer at *offset*."""
        table = offset >> self.l1_shift
        if table != self.table:
            start = table << self.l1_shift
            end = min(start + (1 << self.l1_shift), self.img.size)
            self.extents = self.img.block_status(start, end - start)
            self.table, self.index = table, 0
        extents = self.extents
        i = self.index
        if extents[i][1] > offset:
            i = 0
        while extents[i][1] + extents[i][2] <= offset:
            i += 1
        self.index = i
        kind, guest, length, where = extents[i]
        if kind == COMPRESSED:  # one cluster at a time
            cs = self.img.cluster_size
            return kind, min(guest + length, (offset // cs + 1) * cs), 0
        return kind, guest + length, (where + offset - guest if kind == NORMAL else 0)


class CompareSource:
    """One image of a comparison: a qcow2 image (with its chain) or a raw file."""

    def __init__(self, name: str, layer: Image | RawBacking, *, owned: bool = True) -> None:
        self.name = name
        self.layer = layer
        self.owned = owned
        self.format = "raw" if isinstance(layer, RawBacking) else "qcow2"
        self.size = _qemu_length(layer)
        #: Ask the host file about the data runs of images with metadata preallocation,
        #: as QEMU does (it only changes strict mode's block status: set for -s).
        self.recurse = False
        self._status: dict[int, _Qcow2Status] = {}

    def _layer_status(self, layer: Any, offset: int, nbytes: int) -> tuple[int, int]:
        """``bdrv_co_block_status`` of one layer of the chain."""
        total = _qemu_length(layer)
        if isinstance(layer, RawBacking):
            return _file_status(layer.file.fd, total, offset, nbytes)
        if offset >= total:
            return BDRV_BLOCK_EOF, 0
        nbytes = min(nbytes, total - offset, _INT_MAX)
        walker = self._status.get(id(layer))
        if walker is None:
            walker = self._status[id(layer)] = _Qcow2Status(layer)
        kind, end, host = walker.run(offset)
        pnum = min(end - offset, nbytes)
        if kind == UNALLOCATED or kind == UNALLOCATED_ALLOC:
            below = layer.backing
            ret = BDRV_BLOCK_ZERO if below is None or offset >= _qemu_length(below) else 0
            if kind == UNALLOCATED_ALLOC:  # (an unallocated subcluster: QEMU gives its offset)
                ret |= BDRV_BLOCK_OFFSET_VALID
        else:
            ret = _QCOW2_FLAGS[kind]
            if kind == NORMAL and self.recurse and walker.preallocated:  # BDRV_BLOCK_RECURSE
                file = layer.state.datafile  # (the file the data lives in)
                ret2, file_pnum = _file_status(file.fd, -(-file.size() // SECTOR) * SECTOR,
                                               host, pnum)
                if ret2 & BDRV_BLOCK_EOF and (not file_pnum or ret2 & BDRV_BLOCK_ZERO):
                    ret |= BDRV_BLOCK_ZERO  # past the end of the host file
                else:
                    pnum = file_pnum
                    ret |= ret2 & BDRV_BLOCK_ZERO
        if offset + pnum == total:
            ret |= BDRV_BLOCK_EOF
        return ret, pnum

    def status(self, offset: int) -> tuple[int, int]:
        """``bdrv_block_status_above(bs, NULL, offset, size - offset)``: (flags, pnum)."""
        layer: Any = self.layer
        nbytes = self.size - offset
        ret, pnum = self._layer_status(layer, offset, nbytes)
        if pnum == 0 or ret & BDRV_BLOCK_ALLOCATED or isinstance(layer, RawBacking):
            return ret, pnum
        eof = offset + pnum if ret & BDRV_BLOCK_EOF else None
        nbytes = pnum
        layer = layer.backing
        while layer is not None:
            ret, pnum = self._layer_status(layer, offset, nbytes)
            if pnum == 0:  # past the end of a shorter backing file: zeros, allocated here
                pnum, ret = nbytes, BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED
                break
            if ret & BDRV_BLOCK_ALLOCATED:
                ret &= ~BDRV_BLOCK_EOF
                break
            nbytes = pnum
            layer = getattr(layer, "backing", None)
        if offset + pnum == eof:
            ret |= BDRV_BLOCK_EOF
        return ret, pnum

    def readinto(self, offset: int, view: memoryview) -> None:
        """Guest data at *offset* (zeros in a raw file's last partial sector)."""
        if isinstance(self.layer, RawBacking):
            self.layer.read_backing(offset, view)
        else:
            self.layer.readinto(offset, view)

    def close(self) -> None:
        """Close the image, when this source opened it."""
        if self.owned:
            self.layer.close()

    def __enter__(self) -> CompareSource:  # noqa: PYI034 (Python 3.10: no Self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(path: str | os.PathLike[str], fmt: str | None = None, *,
                force_share: bool = False, data_file: str | os.PathLike[str] | None = None,
                trust_data_file: bool = False) -> CompareSource:
    """Open *path* read-only for a comparison: ``qcow2`` or ``raw`` (None: probe).

    Raises :class:`~qcow2rw.errors.FormatError` for a file that is not in the format
    asked for, :class:`~qcow2rw.errors.UnsupportedFeature` for another format, and
    the ``OSError`` of a file that cannot be opened.
    """
    name = os.fspath(path)
    if fmt is not None and fmt not in ("qcow2", "raw"):
        if fmt in _QEMU_FORMATS:
            raise UnsupportedFeature(f"Format '{fmt}' is not supported by qcow2rw "
                                     "(qcow2 and raw only)")
        raise UnsupportedFeature(f"Unknown driver '{fmt}'")
    if os.path.isdir(name):
        raise IsADirectoryError(21, f"'file' driver requires '{name}' to be a regular file",
                                name)
    probed = probe_format(name)
    if fmt is None:
        fmt = probed
    if fmt == "raw":
        return CompareSource(name, RawBacking(name, force_share=force_share))
    if probed != "qcow2":
        raise FormatError("Image is not in qcow2 format")
    return CompareSource(name, open_image(name, readonly=True, force_share=force_share,
                                          data_file=data_file,
                                          trust_data_file=trust_data_file))


# --------------------------------------------------------------------------------------
# The walk (qemu-img.c img_compare)


def _first_difference(buf1: bytearray, buf2: memoryview, length: int) -> int:
    """``compare_buffers``: offset of the first 512-byte sector that differs, or -1."""
    if buf1.startswith(buf2[:length]):
        return -1
    step = 65536
    pos = 0
    while pos < length:
        end = min(pos + step, length)
        if not buf1.startswith(buf2[pos:end], pos):
            while True:
                sec_end = min(pos + SECTOR, length)
                if not buf1.startswith(buf2[pos:sec_end], pos):
                    return pos
                pos = sec_end
        pos = end
    return -1  # (not reached)


def _first_nonzero(buf: bytearray, zeros: memoryview, length: int) -> int:
    """``find_nonzero``: offset of the first 512-byte sector with a non-zero byte, or -1."""
    if buf.startswith(zeros[:length]):
        return -1
    return _first_difference(buf, zeros, length)


class _Walk:
    def __init__(self, a: CompareSource, b: CompareSource, progress: Progress | None) -> None:
        self.a, self.b = a, b
        self.buf1 = bytearray(IO_BUF_SIZE)
        self.buf2 = bytearray(IO_BUF_SIZE)
        self.view1 = memoryview(self.buf1)
        self.view2 = memoryview(self.buf2)
        self.zeros = memoryview(bytes(IO_BUF_SIZE))
        self.progress = progress
        self.done = 0
        self.total = max(a.size, b.size)

    def status(self, side: CompareSource, offset: int) -> tuple[int, int]:
        try:
            return side.status(offset)
        except (OSError, Qcow2Error) as exc:
            raise CompareFailed(f"Sector allocation test failed for {side.name}", 3) from exc

    def read(self, side: CompareSource, offset: int, view: memoryview) -> None:
        try:
            side.readinto(offset, view)
        except (OSError, Qcow2Error) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise CompareFailed(f"Error while reading offset {offset} of {side.name}: "
                                f"{reason}", 4) from exc

    def empty(self, side: CompareSource, offset: int, length: int) -> int:
        """``check_empty_sectors``: the mismatch offset, or -1 when it reads as zeros."""
        self.read(side, offset, self.view1[:length])
        idx = _first_nonzero(self.buf1, self.zeros, length)
        return -1 if idx < 0 else offset + idx

    def advance(self, chunk: int) -> None:
        self.done += chunk
        if self.progress is not None:
            self.progress(self.done, self.total)

    def run(self, strict: bool) -> CompareResult:
        a, b = self.a, self.b
        size1, size2 = a.size, b.size

        def result(identical: bool, reason: str, offset: int | None, *lines: str
                   ) -> CompareResult:
            return CompareResult(identical, reason, offset, size1, size2, list(lines))

        a.recurse = b.recurse = strict
        if self.progress is not None:
            self.progress(0, self.total)
        if strict and size1 != size2:
            return result(False, "size", None, "Strict mode: Image size mismatch!")
        total_size = min(size1, size2)
        offset = 0
        while offset < total_size:
            status1, pnum1 = self.status(a, offset)
            status2, pnum2 = self.status(b, offset)
            allocated1 = status1 & BDRV_BLOCK_ALLOCATED
            allocated2 = status2 & BDRV_BLOCK_ALLOCATED
            chunk = min(pnum1, pnum2)
            if strict and status1 != status2:
                return result(False, "status", offset,
                              f"Strict mode: Offset {offset} block status mismatch!")
            if status1 & status2 & BDRV_BLOCK_ZERO:
                pass
            elif allocated1 == allocated2:
                if allocated1:
                    chunk = min(chunk, IO_BUF_SIZE)
                    self.read(a, offset, self.view1[:chunk])
                    self.read(b, offset, self.view2[:chunk])
                    idx = _first_difference(self.buf1, self.view2, chunk)
                    if idx >= 0:
                        return result(False, "content", offset + idx,
                                      f"Content mismatch at offset {offset + idx}!")
            else:
                chunk = min(chunk, IO_BUF_SIZE)
                at = self.empty(a if allocated1 else b, offset, chunk)
                if at >= 0:
                    return result(False, "content", at, f"Content mismatch at offset {at}!")
            offset += chunk
            self.advance(chunk)

        lines: list[str] = []
        if size1 != size2:
            lines.append("Warning: Image size mismatch!")
            over = a if size1 > size2 else b
            while offset < self.total:
                ret, chunk = self.status(over, offset)
                if ret & BDRV_BLOCK_ALLOCATED and not ret & BDRV_BLOCK_ZERO:
                    chunk = min(chunk, IO_BUF_SIZE)
                    at = self.empty(over, offset, chunk)
                    if at >= 0:
                        return result(False, "content", at, *lines,
                                      f"Content mismatch at offset {at}!")
                offset += chunk
                self.advance(chunk)
        return result(True, "identical", None, *lines, "Images are identical.")


def compare_sources(a: CompareSource, b: CompareSource, *, strict: bool = False,
                    progress: Progress | None = None) -> CompareResult:
    """Compare two open sources (see :func:`compare`); they stay open."""
    return _Walk(a, b, progress).run(strict)


def _source(obj: Any, fmt: str | None, force_share: bool) -> CompareSource:
    if isinstance(obj, CompareSource):
        return CompareSource(obj.name, obj.layer, owned=False)
    if isinstance(obj, Image):
        if fmt not in (None, "qcow2"):
            raise FormatError(f"An open qcow2 Image cannot be compared as '{fmt}'")
        return CompareSource(obj.path, obj, owned=False)
    return open_source(obj, fmt, force_share=force_share)


def compare(a: str | os.PathLike[str] | Image, b: str | os.PathLike[str] | Image, *,
            fmt_a: str | None = None, fmt_b: str | None = None, strict: bool = False,
            progress: Progress | None = None, force_share: bool = False) -> CompareResult:
    """Compare the guest contents of two images, as ``qemu-img compare`` does.

    *a* and *b* are paths (opened read-only, closed again) or open
    :class:`~qcow2rw.Image` objects (left open).  *fmt_a* / *fmt_b*: ``"qcow2"``,
    ``"raw"`` or None (probe), like ``-f`` / ``-F``.  *strict* is ``-s``: a size
    difference or a block status difference is a mismatch.  *progress* is called as
    ``progress(done, total)`` with bytes of virtual disk (total: the larger size).
    *force_share* is ``-U``.

    Returns a :class:`CompareResult` (true when identical; ``messages`` are
    qemu-img's stdout lines).  Raises :class:`CompareFailed` when a read or a block
    status query fails, and the errors of :func:`open_source`.
    """
    first = _source(a, fmt_a, force_share)
    try:
        second = _source(b, fmt_b, force_share)
        try:
            return compare_sources(first, second, strict=strict, progress=progress)
        finally:
            second.close()
    finally:
        first.close()
