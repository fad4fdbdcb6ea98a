"""``qemu-img convert``: copy an image's guest contents into a new (or existing) image.

:func:`convert` walks the source the way qemu-img 7.2's ``convert_do_copy`` walks it,
so the target it writes is the one qemu-img writes:

- the block status of the whole source chain drives the copy (``convert_iteration_sectors``):
  runs that read as zeros are never read, and on a new target (which reads as zeros)
  never written; data runs are read at most :data:`IO_BUF_SIZE` at a time;
- in a data run, runs of zeros of at least ``min_sparse`` bytes (``-S``, 4 KiB by
  default) are not written either (``is_allocated_sectors_min``, with its alignment
  rules); ``min_sparse=0`` writes everything, zeros included (a fully allocated target);
- with a backing file for the target (``-B``) only what the source's top image
  allocates is copied (the block status *above* the source's backing file): what the
  source leaves to its backing file stays unallocated in the target, and zeros become
  zero clusters (a new target does not read as zeros: its backing file shows);
- ``-n`` writes into an existing target: zeros are written as zeros there unless the
  caller says it reads as zeros already (``target_is_zero``);
- *compressed* (``-c``): every cluster that is not all zeros is compressed
  (:func:`~qcow2rw.compress.compress_cluster`, the GIL released) on a thread pool of
  *workers* threads, and stored (:func:`~qcow2rw.compressed.write_packed`) in guest
  order by this thread through a bounded reorder window: the output is byte-identical
  from run to run (like qemu-img's default) at the speed of parallel compression (like
  its ``-W``).  *out_of_order* (``-W``) stores in completion order instead.

Without compression the pool reads (and looks for zeros) ahead while this thread
writes in guest order, so the layout is deterministic too.  Sources are qcow2 images
(with their whole backing chain, or one of their internal snapshots) and raw files;
targets are qcow2 images (written through :func:`qcow2rw.open`) and raw files (sparse:
zeros are holes).  A failed conversion leaves the target as far as it got (as qemu-img
does): the error says it failed.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from .cluster import read_extent
from .compare import (BDRV_BLOCK_DATA, BDRV_BLOCK_ZERO, CompareSource, _qemu_length,
                      open_source)
from .compress import compress_cluster, zstd_available
from .compressed import write_packed
from .create import create
from .directio import DirectIO, open_direct
from .errors import FormatError, Qcow2Error, UnsupportedFeature
from .image import Image, open_image
from .measure import _SnapshotView
from .snapshot import SnapshotSelector

__all__ = ["DEFAULT_MIN_SPARSE", "IO_BUF_SIZE", "ConvertError", "ConvertResult", "convert"]

SECTOR = 512
#: qemu-img's IO_BUF_SIZE: the most one request reads or writes.
IO_BUF_SIZE = 2 * 1024 * 1024
#: ``-S`` default: runs of zeros of at least 4 KiB are not written.
DEFAULT_MIN_SPARSE = 4096
MAX_SPARSE = 32768 * SECTOR  # qemu-img's MAX_BUF_SECTORS
MAX_PARALLEL = 16  # qemu-img's MAX_COROUTINES
_REQUEST_MAX_SECTORS = (2**31 - 1) >> 9  # BDRV_REQUEST_MAX_SECTORS
#: The compressed reorder window: at most this many bytes of clusters in flight.
WINDOW_MAX = 128 * 1024 * 1024

BLK_DATA, BLK_ZERO, BLK_BACKING_FILE = 0, 1, 2

_ZEROS = bytes(IO_BUF_SIZE)
_ZV = memoryview(_ZEROS)
_ZSECTOR = bytes(SECTOR)

Progress = Callable[[int, int], None]


class ConvertError(Qcow2Error):
    """A conversion that cannot run as asked (qemu-img's message)."""


@dataclass
class ConvertResult:
    """What :func:`convert` did.

    ``total``: bytes of the walk that were data to copy (qemu-img's progress total);
    ``written``: bytes written as data; ``zeroed``: bytes written as zeros (zero
    clusters or holes); ``compressed`` / ``uncompressed``: clusters stored compressed
    / stored plain because they did not compress (``-c`` only).
    """

    size: int
    total: int = 0
    written: int = 0
    zeroed: int = 0
    compressed: int = 0
    uncompressed: int = 0


# --------------------------------------------------------------------------------------
# The source: a CompareSource (qcow2 chain or raw file), or an internal snapshot


class _SnapshotLayer(_SnapshotView):
    """A qcow2 image read through one of its internal snapshots (``-l``), as a layer
    :class:`~qcow2rw.compare.CompareSource` can walk and read: the snapshot's L1
    table, the image's size and backing chain (QEMU's ``bdrv_snapshot_load_tmp``)."""

    def __init__(self, image: Image, selector: SnapshotSelector) -> None:
        super().__init__(image, selector)
        self.l1_shift = image.l1_shift

    def readinto(self, offset: int, view: memoryview) -> int:
        """Guest data of the snapshot at *offset*; thread-safe (the image is read-only)."""
        state = self.image.state
        pos = 0
        for kind, guest, length, where in self.block_status(offset, len(view)):
            read_extent(state, kind, guest, view[pos:pos + length], where)
            pos += length
        return pos


def _open_source(path: str | os.PathLike[str], fmt: str | None, force_share: bool,
                 snapshot: SnapshotSelector | None,
                 **data_file: Any) -> tuple[CompareSource, Image | None]:
    """The source walker, and the image to close when it was opened for a snapshot
    (*data_file*: ``data_file`` and ``trust_data_file`` for an external data file)."""
    source = open_source(path, fmt, force_share=force_share, **data_file)
    if snapshot is None:
        return source, None
    if source.format != "qcow2":
        source.close()
        raise UnsupportedFeature(f"Failed to load snapshot: Block format '{source.format}' "
                                 "used by device '' does not support temporarily loading "
                                 "internal snapshots")
    image = source.layer
    assert isinstance(image, Image)
    try:
        layer = _SnapshotLayer(image, snapshot)
    except BaseException:
        image.close()
        raise
    return CompareSource(source.name, layer, owned=False), image


def _source_alignment(source: CompareSource) -> int:
    """qemu-img's ``src_alignment`` in sectors: the source's cluster (qcow2), else 1."""
    if source.format == "qcow2":
        return max(1, int(source.layer.cluster_size) // SECTOR)
    return 1


# --------------------------------------------------------------------------------------
# Zeros in a buffer (qemu-img's is_allocated_sectors, sector by sector, in C-speed steps)


def _zero_run_end(buf: bytearray, pos: int, end: int) -> int:
    """The end of the run of all-zero sectors starting at *pos* (sector-aligned)."""
    step = SECTOR
    while pos < end:
        k = min(step, end - pos, IO_BUF_SIZE)
        if buf.startswith(_ZV[:k], pos):
            pos += k
            step *= 2
            continue
        while k > SECTOR:  # a non-zero byte in [pos, pos + k): halve down to its sector
            half = (k // 2 + SECTOR - 1) // SECTOR * SECTOR
            if buf.startswith(_ZV[:half], pos):
                pos += half
                k -= half
            else:
                k = half
        return pos
    return end


def _data_run_end(buf: bytearray, pos: int, end: int) -> int:
    """The start of the first all-zero sector after *pos* (which is not one), or *end*."""
    search = pos + SECTOR
    while search < end:
        hit = buf.find(_ZSECTOR, search, end)
        if hit < 0:
            return end
        aligned = -(-hit // SECTOR) * SECTOR
        if aligned + SECTOR > end:
            return end
        if buf.startswith(_ZSECTOR, aligned):
            return aligned
        search = aligned + 1
    return end


def _is_allocated(buf: bytearray, pos: int, n: int, sector_num: int,
                  alignment: int) -> tuple[bool, int]:
    """``is_allocated_sectors``: (data?, sectors in that state) from *pos* (n sectors)."""
    end = pos + n * SECTOR
    is_zero = buf.startswith(_ZSECTOR, pos)
    run_end = _zero_run_end(buf, pos, end) if is_zero else _data_run_end(buf, pos, end)
    i = (run_end - pos) // SECTOR
    if i == n:
        return not is_zero, i
    tail = (sector_num + i) & (alignment - 1)
    if tail:
        if is_zero and i <= tail:
            is_zero = False  # the data after it rewrites this tail anyway
        if not is_zero:
            i = min(i + alignment - tail, n)
        else:
            i -= tail
    return not is_zero, i


def _is_allocated_min(buf: bytearray, pos: int, n: int, min_sectors: int, sector_num: int,
                      alignment: int) -> tuple[bool, int]:
    """``is_allocated_sectors_min``: a data run swallows zero runs shorter than *min*."""
    min_sectors = min(min_sectors, n)
    data, pnum = _is_allocated(buf, pos, n, sector_num, alignment)
    if not data:
        return False, pnum
    used = checked = pnum
    pos += pnum * SECTOR
    n -= pnum
    sector_num += pnum
    while n > 0:
        data, pnum = _is_allocated(buf, pos, n, sector_num, alignment)
        pos += pnum * SECTOR
        n -= pnum
        sector_num += pnum
        checked += pnum
        if data:
            used = checked
        elif pnum >= min_sectors:
            break
    return True, used


def _pow2floor(value: int) -> int:
    return 1 << (value.bit_length() - 1) if value > 0 else 0


# --------------------------------------------------------------------------------------
# Targets


_libc: Any = None
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_SYNC_FILE_RANGE_WRITE = 0x02
#: QEMU's cache modes, as ``-t`` takes them (all but "unsafe" sync the target at the end).
TARGET_CACHE_MODES = ("unsafe", "writeback", "writethrough", "directsync", "none")
#: Start the write-back of the target's dirty pages every this many bytes written, so
#: that the sync at the end (the flush) has little left to wait for.
WRITEBACK_EVERY = 64 * 1024 * 1024


def _libc_call(name: str, *args: int) -> bool:
    """``fallocate`` or ``sync_file_range`` (Linux) through ctypes; False when the
    system has no such call or it fails."""
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            for func, types in (("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                               ctypes.c_int64]),
                                ("sync_file_range", [ctypes.c_int, ctypes.c_int64,
                                                     ctypes.c_int64, ctypes.c_uint])):
                getattr(_libc, func).argtypes = types
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    return bool(getattr(_libc, name)(*args) == 0)


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """``fallocate(PUNCH_HOLE | KEEP_SIZE)``; False when the system cannot."""
    return _libc_call("fallocate", fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                      offset, length)


def _start_writeback(fd: int) -> None:
    """Start (not wait for) the write-back of the file's dirty pages."""
    _libc_call("sync_file_range", fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


class _RawTarget:
    """A raw file: data with pwrite, zeros as holes (or written zeros).  With *direct*
    (``-t none|directsync``) the data goes through a second descriptor opened O_DIRECT
    (:class:`~qcow2rw.directio.DirectIO`: aligned, read-modify-write at the edges),
    and the file is cut back at the end to its size or the end of the data written,
    whichever is larger, as a buffered write leaves it (a direct write of a partial
    last block extends it to the block's end)."""

    compressed_writes = False

    def __init__(self, path: str, size: int, *, create_it: bool, preallocation: str,
                 sync: bool, direct: bool = False) -> None:
        self.sync = sync
        self.direct: DirectIO | None = None
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if create_it else 0)
        self.fd = os.open(path, flags, 0o644)
        try:
            if create_it:
                os.ftruncate(self.fd, size)
                # QEMU's file driver allocates the first block of a new file (its
                # alignment probe reads it): the same map as qemu-img's target.
                os.pwrite(self.fd, _ZV[:min(4096, size)], 0)
                if preallocation == "falloc" and size:
                    os.posix_fallocate(self.fd, 0, size)
                elif preallocation == "full":
                    pos = 0
                    while pos < size:
                        pos += os.pwrite(self.fd, _ZV[:min(IO_BUF_SIZE, size - pos)], pos)
            self.size = os.fstat(self.fd).st_size
            #: The end of the data written, past which a direct write's padding is cut.
            self.end = self.size
            if direct:
                direct_fd = open_direct(path, os.O_RDWR | os.O_CLOEXEC)
                try:
                    self.direct = DirectIO(direct_fd, name=path)
                except BaseException:
                    os.close(direct_fd)
                    raise
        except BaseException:
            os.close(self.fd)
            raise

    def write(self, offset: int, data: memoryview) -> None:
        if self.direct is not None:
            self.direct.pwrite(offset, data)
            self.end = max(self.end, offset + len(data))  # (one writing thread)
            return
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

    def zero(self, offset: int, length: int) -> None:
        if not _punch_hole(self.fd, offset, length):
            pos = 0
            while pos < length:
                n = min(IO_BUF_SIZE, length - pos)
                self.write(offset + pos, _ZV[:n])
                pos += n

    def finish(self, compressed: bool) -> None:
        if self.direct is not None and os.fstat(self.fd).st_size > self.end:
            os.ftruncate(self.fd, self.end)  # (see the class docstring)
        if self.sync:
            os.fsync(self.fd)

    def close(self) -> None:
        if self.direct is not None:
            os.close(self.direct.fd)
        os.close(self.fd)


class _Qcow2Target:
    """A qcow2 image open for writing."""

    compressed_writes = True

    def __init__(self, image: Image) -> None:
        self.image = image
        self.fd = image.file.fd
        self.size = int(image.size)
        self.cluster_size = image.cluster_size
        self.compression_type = image.header.compression_type
        # A v2 image has no zero flag: without a backing file a discard makes clusters
        # read as zeros (QEMU's fallback); with one, zeros must be written.
        self.discard_zeros = image.header.version < 3 and image.backing is None

    def write(self, offset: int, data: memoryview) -> None:
        self.image.write(offset, data)

    def zero(self, offset: int, length: int) -> None:
        if not self.discard_zeros:
            self.image.write_zeroes(offset, length)
            return
        cs = self.cluster_size
        start = min(-(-offset // cs) * cs, offset + length)
        end = max((offset + length) // cs * cs, start)
        if offset < start:
            self.image.write(offset, _ZV[:start - offset])
        if start < end:
            self.image.discard(start, end - start)
        if end < offset + length:
            self.image.write(end, _ZV[:offset + length - end])

    def packed(self, offset: int, data: memoryview, payload: bytes | None) -> None:
        write_packed(self.image, offset, data, payload)

    def finish(self, compressed: bool) -> None:
        if compressed:  # QEMU's "EOF" compressed write: the file ends on a whole sector
            size = self.image.file.size()
            if size % SECTOR:
                self.image.file.truncate(size + SECTOR - size % SECTOR)
        self.image.flush()

    def close(self) -> None:
        self.image.close()


# --------------------------------------------------------------------------------------
# The walk (convert_iteration_sectors) and the copy (convert_co_do_copy)


class _Walk:
    """qemu-img's ``convert_iteration_sectors``: the next request and its status."""

    def __init__(self, source: CompareSource, total_sectors: int, *, top_only: bool,
                 target_backing_sectors: int, compressed: bool, cluster_sectors: int,
                 buf_sectors: int) -> None:
        self.source = source
        self.total = total_sectors
        self.top_only = top_only
        self.target_backing_sectors = target_backing_sectors
        self.target_has_backing = top_only
        self.compressed = compressed
        self.cluster_sectors = cluster_sectors
        self.buf_sectors = buf_sectors
        self.src_alignment = _source_alignment(source)
        self.next_status = 0
        self.status = BLK_DATA

    def _block_status(self, offset: int, nbytes: int) -> tuple[int, int]:
        source = self.source
        if self.top_only and source.format == "qcow2" and source.layer.backing is not None:
            ret, pnum = source._layer_status(source.layer, offset, nbytes)  # above its backing
        else:
            ret, pnum = source.status(offset)
        return ret, min(pnum, nbytes)

    def step(self, sector: int) -> int:
        """Sectors of the request at *sector*; its status is left in ``self.status``."""
        n = min(self.total - sector, _REQUEST_MAX_SECTORS)
        post_backing_zero = False
        if self.target_backing_sectors >= 0:
            if sector >= self.target_backing_sectors:
                post_backing_zero = True
            elif sector + n > self.target_backing_sectors:
                n = self.target_backing_sectors - sector
        if self.next_status <= sector:
            ret, count = self._block_status(sector * SECTOR, n * SECTOR)
            n = max(1, -(-count // SECTOR))
            tail = (sector + n) % self.src_alignment
            if n > tail:
                n -= tail
            if ret & BDRV_BLOCK_ZERO:
                self.status = BLK_BACKING_FILE if post_backing_zero else BLK_ZERO
            elif ret & BDRV_BLOCK_DATA:
                self.status = BLK_DATA
            else:
                self.status = BLK_BACKING_FILE if self.target_has_backing else BLK_DATA
            self.next_status = sector + n
        n = min(n, self.next_status - sector)
        if self.status == BLK_DATA:
            n = min(n, self.buf_sectors)
        if self.compressed:
            cs = self.cluster_sectors
            if n < cs:
                n = min(cs, self.total - sector)
                self.status = BLK_DATA
            else:
                n -= n % cs
        return n


# An action on the target, applied in guest order by the converting thread:
# ("w", offset, data) write; ("z", offset, length) zeros; ("c", offset, data, payload)
# a compressed (or, payload None, plain) cluster; ("f", buffer) the request's read
# buffer, done with (the last action of a request that read one).
Action = tuple[Any, ...]


class _Copier:
    """The copy (``convert_co_do_copy``): this thread walks the source and submits
    each data request to the pool (read it, find its zeros, compress its clusters),
    then applies the requests' actions to the target in guest order (or, ``-W``, as
    they complete), with at most ``window`` bytes of requests in flight."""

    def __init__(self, source: CompareSource, target: _RawTarget | _Qcow2Target, *,
                 total_sectors: int, compressed: bool, min_sparse: int, has_zero_init: bool,
                 workers: int, in_order: bool, walk: Callable[[], _Walk],
                 progress: Progress | None, result: ConvertResult) -> None:
        self.source = source
        self.target = target
        self.total_sectors = total_sectors
        self.compressed = compressed
        self.min_sectors = min_sparse // SECTOR
        self.alignment = max(_pow2floor(self.min_sectors), 1)
        self.has_zero_init = has_zero_init
        self.workers = workers
        self.in_order = in_order
        self.walk = walk
        self.progress = progress
        self.result = result
        self.done = 0
        self.total = 0
        self.lock = threading.Lock()  # the result's counters and the free buffers
        self.buffers: list[bytearray] = []  # read buffers to use again (no page faults)
        self.unkicked = 0  # bytes written since the last _start_writeback
        #: The target is synced at the end (not -t unsafe): start its write-back early.
        self.kick_writeback = bool(getattr(target, "sync", True)
                                   if isinstance(target, _RawTarget)
                                   else not target.image.file.unsafe)
        if compressed:
            cs = target.cluster_size
            self.batch = max(cs, 256 * 1024)
            self.window = min(WINDOW_MAX, max(64 * cs, 2 * workers * self.batch))
        else:
            self.batch = IO_BUF_SIZE
            self.window = max(2, workers) * IO_BUF_SIZE

    # The jobs (pool threads) -----------------------------------------------------------
    def _read(self, offset: int, length: int) -> bytearray:
        """The source's data at *offset* in a buffer of the pool (``batch`` bytes)."""
        with self.lock:
            buf = self.buffers.pop() if self.buffers else None
        if buf is None:
            buf = bytearray(self.batch)
        self.source.readinto(offset, memoryview(buf)[:length])
        return buf

    def _plain_job(self, offset: int, length: int, zeros: bool) -> list[Action]:
        """Read one request, split it where qemu-img splits it."""
        if zeros:  # -S 0: a zero run is written as data
            return [("w", offset, _ZV[:length])]
        buf = self._read(offset, length)
        view = memoryview(buf)
        if not self.min_sectors:
            return [("w", offset, view[:length]), ("f", buf)]
        actions: list[Action] = []
        pos, n, sector = 0, length // SECTOR, offset // SECTOR
        while n > 0:
            data, pnum = _is_allocated_min(buf, pos, n, self.min_sectors, sector,
                                           self.alignment)
            size = pnum * SECTOR
            if data:
                actions.append(("w", offset + pos, view[pos:pos + size]))
            elif not self.has_zero_init:
                actions.append(("z", offset + pos, size))
            pos += size
            n -= pnum
            sector += pnum
        actions.append(("f", buf))
        return actions

    def _compressed_job(self, offset: int, length: int) -> list[Action]:
        """Read whole clusters; compress each one that is not all zeros."""
        buf = self._read(offset, length)
        view = memoryview(buf)
        target = self.target
        cs = target.cluster_size
        ctype = target.compression_type
        actions: list[Action] = []
        packed = plain = 0
        for pos in range(0, length, cs):
            k = min(cs, length - pos)
            if self.min_sectors and buf.startswith(_ZV[:k], pos):
                if self.has_zero_init:
                    continue
                if actions and actions[-1][0] == "z" and actions[-1][1] + actions[-1][2] \
                        == offset + pos:
                    actions[-1] = ("z", actions[-1][1], actions[-1][2] + k)
                else:
                    actions.append(("z", offset + pos, k))
                continue
            part = view[pos:pos + k]
            payload = compress_cluster(part, cs, ctype)
            if payload is None:
                plain += 1
            else:
                packed += 1
            actions.append(("c", offset + pos, part, payload))
        with self.lock:
            self.result.compressed += packed
            self.result.uncompressed += plain
        actions.append(("f", buf))
        return actions

    # Applying (this thread) --------------------------------------------------------------
    def _apply(self, actions: list[Action]) -> None:
        target = self.target
        result = self.result
        before = result.written
        for action in actions:
            kind = action[0]
            if kind == "w":
                target.write(action[1], action[2])
                result.written += len(action[2])
            elif kind == "z":
                target.zero(action[1], action[2])
                result.zeroed += action[2]
            elif kind == "f":  # the buffer of the request: free for another one
                with self.lock:
                    self.buffers.append(action[1])
            else:
                assert isinstance(target, _Qcow2Target)
                target.packed(action[1], action[2], action[3])
                result.written += len(action[2])
        self.unkicked += result.written - before
        if self.unkicked >= WRITEBACK_EVERY and self.kick_writeback:
            self.unkicked = 0
            _start_writeback(target.fd)

    def _advance(self, nbytes: int) -> None:
        if nbytes:
            self.done += nbytes
            if self.progress is not None:
                self.progress(self.done, self.total)

    # The copy ---------------------------------------------------------------------------
    def count(self) -> int:
        """qemu-img's ``allocated_sectors`` pass: bytes of data to copy."""
        walk = self.walk()
        sector = total = 0
        while sector < self.total_sectors:
            n = walk.step(sector)
            if walk.status == BLK_DATA or (not self.min_sectors and walk.status == BLK_ZERO):
                total += n
            sector += n
        return total * SECTOR

    def run(self) -> None:
        """Copy everything; raises the first error of a request (the rest cancelled)."""
        if self.progress is not None:
            self.total = self.count()
            self.progress(0, self.total)
        walk = self.walk()
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="convert")
        queue: deque[tuple[Future[list[Action]] | None, list[Action], int]] = deque()
        running: set[Future[list[Action]]] = set()
        sizes: dict[Future[list[Action]], int] = {}
        inflight = 0
        batch_start = batch_len = 0

        def submit(job: Callable[..., list[Action]], *args: Any, nbytes: int) -> None:
            nonlocal inflight
            future = pool.submit(job, *args)
            if self.in_order:
                queue.append((future, [], nbytes))
            else:
                running.add(future)
                sizes[future] = nbytes
            inflight += nbytes
            while inflight > self.window:
                retire()

        def retire() -> None:
            """Apply the oldest request (in order) or those done first (-W)."""
            nonlocal inflight
            if self.in_order:
                future, actions, nbytes = queue.popleft()
                self._apply(future.result() if future is not None else actions)
                inflight -= nbytes
                self._advance(nbytes)
                return
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                running.discard(future)
                self._apply(future.result())
                nbytes = sizes.pop(future)
                inflight -= nbytes
                self._advance(nbytes)

        def at_once(actions: list[Action]) -> None:
            if self.in_order:
                queue.append((None, actions, 0))
            else:
                self._apply(actions)

        def flush_batch() -> None:
            nonlocal batch_len
            if batch_len:
                submit(self._compressed_job, batch_start, batch_len, nbytes=batch_len)
                batch_len = 0

        try:
            sector = 0
            while sector < self.total_sectors:
                n = walk.step(sector)
                status = walk.status
                if not self.min_sectors and status == BLK_ZERO:
                    n = min(n, walk.buf_sectors)
                offset, length = sector * SECTOR, n * SECTOR
                sector += n
                zero_as_data = not self.min_sectors and status == BLK_ZERO
                if self.compressed and (status == BLK_DATA or zero_as_data):
                    if batch_len and (batch_start + batch_len != offset
                                      or batch_len + length > self.batch):
                        flush_batch()
                    if not batch_len:
                        batch_start = offset
                    batch_len += length
                    continue
                flush_batch()
                if status == BLK_DATA or zero_as_data:
                    submit(self._plain_job, offset, length, zero_as_data, nbytes=length)
                elif status == BLK_ZERO and not self.has_zero_init:
                    at_once([("z", offset, length)])
            flush_batch()
            while queue or running:
                retire()
        except BaseException:
            for future in list(running) + [q[0] for q in queue if q[0] is not None]:
                future.cancel()
            pool.shutdown(wait=True)
            raise
        pool.shutdown(wait=True)


# --------------------------------------------------------------------------------------
# The API


_COMPAT = {"0.10": "0.10", "v2": "0.10", "1.1": "1.1", "v3": "1.1"}
_RAW_PREALLOCATION = ("off", "falloc", "full")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _chain_files(source: CompareSource) -> list[str]:
    files = [source.name]
    layer: Any = source.layer
    while layer is not None:
        name = getattr(layer, "path", None) or getattr(layer, "filename", None)
        if name:
            files.append(name)
        layer = getattr(layer, "backing", None)
    return files


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
            src_format: str | None = None, out_format: str = "qcow2",
            compressed: bool = False, cluster_size: int | None = None,
            refcount_bits: int | None = None, compat: str | None = None,
            lazy_refcounts: bool | None = None, preallocation: str | None = None,
            compression_type: str | None = None, extended_l2: bool | None = None,
            backing_file: str | None = None,
            backing_format: str | None = None, no_create: bool = False,
            target_is_zero: bool = False, min_sparse: int = DEFAULT_MIN_SPARSE,
            workers: int = 8, out_of_order: bool = False, force_share: bool = False,
            snapshot: SnapshotSelector | None = None, progress: Progress | None = None,
            cache: str = "unsafe", cache_size: int | None = None,
            src_data_file: str | os.PathLike[str] | None = None,
            trust_data_file: bool = False) -> ConvertResult:
    """Convert *src* into *dst*, as ``qemu-img convert`` does.

    *src*: a qcow2 image (read through its backing chain) or a raw file, probed
    unless *src_format* (``-f``) says; *snapshot* (``-l``) converts one of its
    internal snapshots (an id, else a name; or an (id, name) pair, see
    :data:`~qcow2rw.snapshot.SnapshotSelector`).  *dst* is created as *out_format*
    (``-O``: ``"qcow2"`` or ``"raw"``) with the creation options *cluster_size*,
    *refcount_bits*, *compat* (``"0.10"``/``"1.1"``), *lazy_refcounts*,
    *preallocation*, *compression_type* (``"zlib"``/``"zstd"``), *extended_l2* and a
    backing file
    (*backing_file* / *backing_format*, ``-B``/``-F``: only what the source's top
    image allocates is copied); or, *no_create* (``-n``), written into as it is
    (*target_is_zero*: it reads as zeros, zeros need not be written).

    *compressed* (``-c``) stores every non-zero cluster compressed; *workers*
    (``-m``, 1..16) threads compress (or read ahead) while this thread writes in guest
    order, unless *out_of_order* (``-W``).  *min_sparse* (``-S``, bytes, a multiple of
    512 up to 16 MiB): runs of zeros at least this long are not written; 0 writes
    everything.  *force_share* is ``-U``.  *progress* is called as
    ``progress(done, total)`` in bytes of data to copy.  *cache* (``-t``) is the
    target's cache mode, ``"unsafe"`` by default as in qemu-img convert: the target
    is complete but not synced when this returns; any other of QEMU's modes
    (``"writeback"``, ``"writethrough"``, ``"directsync"``, ``"none"``) syncs it
    before returning, and ``"none"`` and ``"directsync"`` write the target with
    O_DIRECT (a qcow2 one opened with ``cache="none"``).  *cache_size*: bytes of L2 tables the qcow2 target caches (see
    :func:`qcow2rw.open`).

    Returns a :class:`ConvertResult`.  Raises :class:`ConvertError` (qemu-img's
    message) for arguments that do not go together, :class:`~qcow2rw.errors.Qcow2Error`
    subclasses for images and options, ``OSError`` for files.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if cache not in TARGET_CACHE_MODES:
        raise ConvertError(f"Invalid cache option: {cache}")
    create_opts = {"cluster_size": cluster_size, "refcount_bits": refcount_bits,
                   "compat": compat, "lazy_refcounts": lazy_refcounts,
                   "preallocation": preallocation, "compression_type": compression_type,
                   "extended_l2": extended_l2}
    given = {k: v for k, v in create_opts.items() if v is not None}
    if not 1 <= workers <= MAX_PARALLEL:
        raise ConvertError("Invalid number of coroutines. Allowed number of coroutines is "
                           f"between 1 and {MAX_PARALLEL}")
    if min_sparse < 0 or min_sparse % SECTOR or min_sparse > MAX_SPARSE:
        raise ConvertError("Invalid buffer size for sparse output specified. Valid sizes are "
                           f"multiples of {SECTOR} up to {MAX_SPARSE}. Select 0 to disable "
                           "sparse detection (fully allocates output).")
    if no_create and given:
        raise ConvertError("-o has no effect when skipping image creation")
    if target_is_zero and not no_create:
        raise ConvertError("--target-is-zero requires use of -n flag")
    if out_format not in ("qcow2", "raw"):
        raise UnsupportedFeature(f"Unknown file format '{out_format}'" if out_format not in
                                 ("vmdk", "vdi", "vhdx", "vpc", "qed", "qcow", "luks")
                                 else f"Output format '{out_format}' is not supported by "
                                      "qcow2rw (qcow2 and raw only)")
    if out_format == "raw" and not no_create:
        if backing_file is not None:
            raise ConvertError("Backing file not supported for file format 'raw'")
        if backing_format is not None:
            raise ConvertError("Backing file format not supported for file format 'raw'")
        for key in given:
            if key != "preallocation":
                raise ConvertError(f"Invalid parameter '{key}'")
        if given.get("preallocation", "off") not in _RAW_PREALLOCATION:
            raise FormatError(f"Invalid preallocation mode: '{given['preallocation']}'")

    source, snap_image = _open_source(src, src_format, force_share, snapshot,
                                      data_file=src_data_file,
                                      trust_data_file=trust_data_file)
    try:
        total_sectors = -(-source.size // SECTOR)
        size = total_sectors * SECTOR
        result = ConvertResult(size=size)
        has_backing = backing_file is not None
        if target_is_zero and has_backing:
            raise ConvertError("Cannot use --target-is-zero when the destination image has "
                               "a backing file")
        if has_backing and backing_format is None and not no_create:  # (-n creates nothing)
            raise ConvertError("Use of backing file requires explicit backing format")
        if backing_format is not None and not has_backing and not no_create:
            raise FormatError(f"{dst}: error while converting {out_format}: Backing format "
                              "cannot be used without backing file")
        if compressed:
            if out_format != "qcow2":
                raise ConvertError("Compression not supported for this file format")
            if given.get("preallocation", "off") != "off":
                raise ConvertError("Compression and preallocation not supported at the "
                                   "same time")
        if os.path.exists(dst) and any(_same_file(dst, f) for f in _chain_files(source)):
            raise ConvertError(f"Failed to get \"write\" lock: '{dst}' is the source image "
                               "or in its backing chain")

        target = _make_target(dst, size, out_format, no_create, given, backing_file,
                              backing_format, cache, cache_size)
        try:
            if -(-target.size // SECTOR) * SECTOR < size:  # (QEMU's whole sectors)
                raise ConvertError("output file is smaller than input file")
            if compressed and not target.compressed_writes:
                raise ConvertError("Compression not supported for this file format")
            target_backing_sectors = -1
            if has_backing and not no_create:
                assert isinstance(target, _Qcow2Target)
                below = target.image.backing
                if below is not None:
                    target_backing_sectors = _qemu_length(below) // SECTOR
            has_zero_init = target_is_zero or (not no_create and min_sparse > 0
                                               and not has_backing)
            cluster_sectors = (target.cluster_size // SECTOR
                               if isinstance(target, _Qcow2Target) else 1)
            buf_sectors = cluster_sectors if compressed else IO_BUF_SIZE // SECTOR

            def new_walk() -> _Walk:
                return _Walk(source, total_sectors, top_only=has_backing,
                             target_backing_sectors=target_backing_sectors,
                             compressed=compressed, cluster_sectors=cluster_sectors,
                             buf_sectors=buf_sectors)

            copier = _Copier(source, target, total_sectors=total_sectors,
                             compressed=compressed, min_sparse=min_sparse,
                             has_zero_init=has_zero_init, workers=workers,
                             in_order=not out_of_order, walk=new_walk, progress=progress,
                             result=result)
            copier.run()
            result.total = copier.total if progress is not None else copier.done
            target.finish(compressed)
        finally:
            target.close()
        return result
    finally:
        source.close()
        if snap_image is not None:
            snap_image.close()


def _make_target(dst: str, size: int, out_format: str, no_create: bool,
                 opts: dict[str, Any], backing_file: str | None,
                 backing_format: str | None, target_cache: str,
                 cache_size: int | None) -> _RawTarget | _Qcow2Target:
    """The target, opened or created.  *target_cache* is ``-t``: "unsafe" does not sync
    it, the others do; "none" and "directsync" write it O_DIRECT."""
    sync = target_cache != "unsafe"
    if out_format == "raw":
        if no_create and not os.path.exists(dst):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", dst)
        return _RawTarget(dst, size, create_it=not no_create,
                          preallocation=opts.get("preallocation", "off"), sync=sync,
                          direct=target_cache in ("none", "directsync"))
    cache = ("none" if target_cache in ("none", "directsync")
             else "writeback" if sync else "unsafe")
    if no_create:
        return _Qcow2Target(open_image(dst, cache=cache, cache_size=cache_size))
    ctype_name = opts.get("compression_type", "zlib")
    compat = opts.get("compat", "1.1")
    compat = _COMPAT.get(compat, compat)
    if ctype_name == "zstd" and not zstd_available():
        raise UnsupportedFeature("compression_type=zstd: install qcow2rw[zstd] (backports.zstd)")
    try:
        image = create(dst, size, cluster_size=opts.get("cluster_size", 65536),
                       backing_file=backing_file, backing_format=backing_format,
                       lazy_refcounts=bool(opts.get("lazy_refcounts", False)),
                       refcount_bits=opts.get("refcount_bits", 16), compat=compat,
                       preallocation=opts.get("preallocation", "off"),
                       compression_type=ctype_name, extended_l2=bool(opts.get("extended_l2")),
                       cache=cache, cache_size=cache_size)
    except (FormatError, UnsupportedFeature) as exc:  # qemu-img names the target first
        raise type(exc)(f"{dst}: error while converting qcow2: {exc}") from None
    return _Qcow2Target(image)
