"""The synchronous :class:`Image`: open, read, write, discard, zero, flush, map, info.

An ``Image`` is safe to call from many threads at once.  The locks and their order
are described once, in :mod:`qcow2rw.locks`; here each lock's role is:

- ``_glock`` (global image lock): requests hold it shared, exclusive operations
  (snapshots, resize, check, amend, close) hold it exclusively;
- ``_flush_lock``: one flush at a time (taken right after the global lock);
- ``_l1_lock``: guards ``l1`` entries and ``l1_dirty`` (new or copied L2 tables);
- L2 entry lock (``CacheEntry.lock``): guards that table's entries, its dirty flag,
  data mark and refcount need, and its in-flight allocation records;
- ``_refcount_io_lock``: one write-back of the refcount structures at a time;
- ``_alloc_lock``: guards the refcount manager (allocation and the refcount
  increment that claims a cluster are one step), the lazy-refcount dirty bit;
- ``_in_use`` needs no lock: it is a list of (first cluster, count) ranges with data
  I/O in flight, changed only by single ``extend``/``append``/``remove`` calls, which
  are atomic; each request also keeps the ranges it added in a list of its own, in
  the same step, so an interrupted request gives back exactly what it took.

Requests never hold a metadata lock during data I/O.  A write that allocates
registers an in-flight record on the L2 entries it will change before it drops
the L2 lock; an overlapping write, discard or zeroing waits for the record and then
looks the mapping up again.  Every host cluster a request does I/O on carries an
in-use count, and the allocator never hands out a cluster with a count, so a
cluster freed under a read is not reused before that read ends.
"""

from __future__ import annotations

import os
import struct
import time
import threading
from array import array
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, NoReturn

from . import compress
from .backing import BackingSource, open_backing, resolve_name
from .bitmaps import bitmap_info
from .cache import CacheEntry, MetadataCache
from .cancel import MAX_RUN_BYTES, CancelToken
from .errors import (ClosedImage, CorruptImage, FormatError, Qcow2Error, ReadOnlyImage,
                     SyncFailed, UnsupportedFeature)
from .events import EventPoints
from .format import (COMPRESSION_NAMES, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, L1E_OFFSET_MASK,
                     MAX_L1_SIZE, L2E_OFFSET_MASK,
                     OFF_AUTOCLEAR, OFF_INCOMPATIBLE, OFF_L1_SIZE, OFF_SIZE, QCOW_OFLAG_COMPRESSED,
                     QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO, Header, compressed_host_range,
                     decode_compressed, div_round_up, l1_entries_for, parse_header,
                     table_from_bytes, table_to_bytes)
from .locks import (CANCEL_POLL_SECONDS, DEBUG_LOCKS, LOCK_MODES, ExclusiveHold, Gate, ImageLock,
                    OwnedLock, SharedSection, held, inner_locks)
from .overlap import ACTIVE_L1, ACTIVE_L2, REFCOUNT_BLOCK, REFCOUNT_TABLE, OverlapMap, mode_of
from .refcount import RefcountManager
from .snapshot import Snapshot, parse_table
from .storage import HostFile

# Cluster kinds, from an L2 entry (QEMU's QCow2ClusterType).
UNALLOCATED, NORMAL, ZERO_PLAIN, ZERO_ALLOC, COMPRESSED = range(5)

DEFAULT_CACHE_SIZE = 32 * 1024 * 1024  # bytes of L2 tables; refcount blocks get a quarter
MIN_CACHE_ENTRIES = 8
MAX_DEFERRED_FREES = 4096  # flush once this many decrements wait
_COPIED_NORMAL_MASK = QCOW_OFLAG_COPIED | QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO | L2E_OFFSET_MASK

__all__ = ["LOCK_MODES", "Image", "OutOfRange", "open_image"]


class OutOfRange(Qcow2Error, ValueError):
    """A request reaches past the end of the virtual disk (or has a negative offset)."""


class _WriteOp:
    """One step of a write plan: an in-place run or a run of newly allocated clusters.

    ``pins`` are the host clusters this step holds in-use counts on; ``record`` is
    the in-flight allocation event waiters block on (allocating steps only).
    """

    __slots__ = ("first", "end", "host", "allocating", "pins", "record", "done", "fresh")

    def __init__(self, first: int, end: int, host: int, allocating: bool,
                 pins: list[tuple[int, int]],
                 record: Gate | None, fresh: bool = False) -> None:
        self.first = first
        self.end = end
        self.host = host
        self.allocating = allocating
        self.pins = pins
        self.record = record
        self.done = False
        self.fresh = fresh  # the new clusters were never written: they read as zeros


class Image:
    """An open qcow2 image (see :func:`qcow2rw.open`)."""

    def __init__(self, file: HostFile, header: Header, *, path: str, readonly: bool,
                 cache_size: int | None, lock_mode: str, backing: bool, force_share: bool,
                 chain: tuple[str, ...], check_mode: bool = False,
                 overlap_check: bool | str = True) -> None:
        self.path = path
        self.check_mode = check_mode  # opened for qemu-img check (QEMU's BDRV_O_CHECK)
        self.corrupt_event: str | None = None  # set when this session found corruption
        self.file = file
        self._fd = file.fd
        self.header = header
        self.readonly = readonly
        self.lock_mode = lock_mode
        self.closed = False
        self.events: EventPoints | None = None
        self._glock = ImageLock(lock_mode)
        self._exclusive_owner: int | None = None
        #: False while the image is being opened (nobody else has it yet): the debug
        #: checks of "Caller holds" contracts start once open_image returns it.
        self._open = False
        self._flush_lock = threading.Lock()
        self._l1_lock, self._alloc_lock, entry_lock = inner_locks(lock_mode)
        #: The refcount I/O lock: one write-back of the refcount structures at a time,
        #: held across its writes (the order needs it: an older copy of a block must not
        #: land after a newer one), never around the allocator lock's I/O-free work.
        #: Taken after an L2 entry lock, before the allocator lock; in rwlock mode the
        #: metadata mutex itself, in mutex mode nothing.
        self._refcount_io_lock: Any = (self._alloc_lock if lock_mode != "fine"
                                       else OwnedLock() if DEBUG_LOCKS else threading.Lock())
        self._track_use = lock_mode != "mutex"
        self._in_use: list[tuple[int, int]] = []
        #: ``_in_use`` where in-use counts are kept (not in mutex mode), else None.
        self._pins = self._in_use if self._track_use else None
        hdr = header
        self.cluster_bits = hdr.cluster_bits
        self.cluster_size = hdr.cluster_size
        self.l2_bits = hdr.l2_bits
        self.l2_entries = 1 << hdr.l2_bits
        self.l1_shift = hdr.cluster_bits + hdr.l2_bits
        self._cs_mask = hdr.cluster_size - 1
        self._l2_mask = self.l2_entries - 1
        self.has_zero_flag = hdr.version >= 3
        self._run_clusters = max(1, MAX_RUN_BYTES >> hdr.cluster_bits)
        self._coffset_mask = (1 << (62 - (hdr.cluster_bits - 8))) - 1  # compressed host offset
        if hdr.extended_l2:
            raise UnsupportedFeature("Extended L2 entries (subclusters) are not supported yet")
        if hdr.data_file is not None or hdr.incompatible_features & 0x4:
            raise UnsupportedFeature("External data files are not supported")
        cache_bytes = DEFAULT_CACHE_SIZE if cache_size is None else cache_size
        l2_capacity = max(MIN_CACHE_ENTRIES, cache_bytes // self.cluster_size)
        self.l1 = self._read_l1()
        self.l1_dirty: set[int] = set()
        self.l2_cache = MetadataCache("L2", l2_capacity, self._load_l2, self._store_l2,
                                      entry_lock, self._before_l2_writeback)
        self.refcounts = RefcountManager(file, hdr, max(MIN_CACHE_ENTRIES, l2_capacity // 4),
                                         self._in_use)
        self.refcounts.fire = self._fire
        self.l2_cache.fire = file.fire = self._fire  # (refcount stores fire refblock_update)
        self.snapshot_table: list[Snapshot] = self._read_snapshots()
        mode = mode_of(overlap_check)
        self.overlap: OverlapMap | None = OverlapMap(self, mode) if mode != "none" else None
        self._attach_overlap()
        self.backing: BackingSource | None = None
        if backing and hdr.backing_file:
            self.backing = open_backing(path, hdr.backing_file, hdr.backing_format, chain,
                                        force_share=force_share)

    # Opening ---------------------------------------------------------------
    def _read_l1(self) -> array:
        hdr = self.header
        return table_from_bytes(self.file.pread_exact(hdr.l1_table_offset, hdr.l1_size * 8))

    def _read_snapshots(self) -> list[Snapshot]:
        hdr = self.header
        if not hdr.nb_snapshots:
            return []
        # An entry is at most 40 + 1024 + 2 * 65535 bytes: read growing chunks until parsed.
        limit = 64 * 1024 * 1024
        length = min(hdr.nb_snapshots * 1024, limit)
        while True:
            buf = self.file.pread(hdr.snapshots_offset, length)
            try:
                return parse_table(buf, hdr.nb_snapshots)
            except FormatError:
                if len(buf) < length or length >= limit:
                    if self.check_mode:
                        return []  # the check reports (and -r all repairs) the table
                    raise
                length = min(length * 4, limit)

    def _prepare_for_writing(self) -> None:
        """Read-write open: clear autoclear bits we do not maintain; repair a dirty image.

        Autoclear bits (the bitmaps bit included: we do not update bitmaps) are
        cleared so that their owners know the data changed behind them.  A dirty image
        (lazy refcounts, not closed cleanly) has its refcounts rebuilt first.
        """
        hdr = self.header
        with self.exclusive():
            if hdr.version >= 3 and hdr.autoclear_features:
                hdr.autoclear_features = 0
                self.file.pwrite(OFF_AUTOCLEAR, struct.pack(">Q", 0))
                self.file.flush()
            if hdr.incompatible_features & INCOMPAT_DIRTY:
                from .check import rebuild_refcounts
                overlap, self.overlap = self.overlap, None  # the checker has its own check
                try:
                    rebuild_refcounts(self)
                finally:
                    self.overlap = overlap
                    self._attach_overlap()
                    self._metadata_moved(None)
                self._write_incompatible(hdr.incompatible_features & ~INCOMPAT_DIRTY)

    # Corruption ------------------------------------------------------------
    def _attach_overlap(self) -> None:
        """Let the refcount manager check its writes and report new blocks to the map."""
        overlap = self.overlap
        refcounts = self.refcounts
        refcounts.before_write = None if overlap is None else self._check_metadata_write
        refcounts.on_change = None if overlap is None else self._metadata_moved
        refcounts.on_table_added = None if overlap is None else self._reftable_added
        refcounts.on_table_dropped = None if overlap is None else self._reftable_dropped
        refcounts.on_corruption = self._signal_corruption
        refcounts.defer_growth = self._defer_growth
        refcounts.check_caller = self._check_allocator_caller if DEBUG_LOCKS else None

    def _check_allocator_caller(self) -> None:
        """Debug mode: the refcount manager's contract (its caller holds the allocator
        lock, or the image exclusively; the image being opened or closed is nobody
        else's yet, or any more)."""
        if not (held(self._alloc_lock) or self._exclusive_owner == threading.get_ident()
                or not self._open):
            raise AssertionError("the refcount manager used without the allocator lock "
                                 "or the image held exclusively")

    def _defer_growth(self) -> bool:
        """A refcount table growth waits for the next write-back, except when the
        image is held exclusively (exclusive operations expect it on disk at once)."""
        return self._exclusive_owner is None

    def _metadata_moved(self, offset: int | None) -> None:
        """A new refcount block at *offset*, or (None) refcount structures moved."""
        overlap = self.overlap
        if overlap is not None:
            if offset is None:
                overlap.invalidate()
            else:
                overlap.added(offset, self.cluster_size, REFCOUNT_BLOCK)

    def _reftable_added(self, offset: int, length: int) -> None:
        """A refcount table growth placed the new table at [offset, offset+length)."""
        if self.overlap is not None:
            self.overlap.added(offset, length, REFCOUNT_TABLE)

    def _reftable_dropped(self, offset: int, length: int) -> None:
        """A growth's commit made the table at [offset, offset+length) dead metadata."""
        if self.overlap is not None:
            self.overlap.removed(offset, length, REFCOUNT_TABLE)

    def _check_data_write(self, offset: int, length: int) -> None:
        """QEMU's overlap check before guest data (or COW) reaches [offset, offset+length)."""
        overlap = self.overlap
        if overlap is not None:
            name = overlap.find(offset, length)
            if name is not None:
                self._signal_corruption(f"Preventing invalid write on metadata (overlaps with "
                                        f"{name})")

    def _check_metadata_write(self, offset: int, length: int, kind: int) -> None:
        """The overlap check before metadata of *kind* is written back at *offset*."""
        overlap = self.overlap
        if overlap is not None:
            name = overlap.find(offset, length, kind)
            if name is not None:
                self._signal_corruption(f"Preventing invalid write on metadata (overlaps with "
                                        f"{name})")

    def _signal_corruption(self, message: str) -> NoReturn:
        """qcow2_signal_corruption(): mark the image corrupt (incompatible bit 1) and fail.

        A read-write image gets the corrupt bit on disk, is flushed no more (its
        metadata is not trusted) and refuses every later write with
        :class:`CorruptImage`; it then opens read-only only, until ``check -r all``
        repairs it.  A read-only image just fails the request.  Caller holds: any
        locks (this takes none: it sets the bit in memory first, then writes the
        header field, so a concurrent dirty-bit update carries it too).
        """
        writable = not self.readonly and not self.check_mode
        first = self.corrupt_event is None
        if first:
            self.corrupt_event = message
        if writable and self.header.version < 3:  # no room for the bit: in memory only
            self.readonly = True
            raise CorruptImage(f"qcow2: Image is corrupt: {message}; the image turned "
                               "read-only")
        if writable:
            self.readonly = True
            value = self.header.incompatible_features | INCOMPAT_CORRUPT
            self.header.incompatible_features = value
            try:
                self.file.pwrite(OFF_INCOMPATIBLE, struct.pack(">Q", value))
                self.file.flush()
            except OSError:
                pass  # the request fails anyway; the image stays read-only in memory
            raise CorruptImage(f"qcow2: Marking image as corrupt: {message}; further "
                               "corruption events will be suppressed")
        raise CorruptImage(f"qcow2: Image is corrupt: {message}")

    # Properties ------------------------------------------------------------
    @property
    def readonly(self) -> bool:
        """True if opened read-only, or turned read-only by a failed fsync."""
        return self._readonly or self.file.sync_error is not None

    @readonly.setter
    def readonly(self, value: bool) -> None:
        self._readonly = value

    def _readonly_error(self) -> ReadOnlyImage:
        """The error for a write to a read-only image (saying why it is read-only)."""
        if self.corrupt_event is not None:
            return CorruptImage(f"'{self.path}' was marked corrupt ({self.corrupt_event}): "
                                "it can be written again after 'check -r all'")
        if self.file.sync_error is not None and not self._readonly:
            return SyncFailed(f"'{self.path}' turned read-only: an fsync of the host file "
                              f"failed ({self.file.sync_error}); writes since the last "
                              "successful flush may be lost")
        return ReadOnlyImage(f"'{self.path}' is open read-only")

    @property
    def size(self) -> int:
        """Virtual disk size in bytes."""
        return self.header.size

    @property
    def backing_file(self) -> str | None:
        """The backing file name as stored in the image (None without one)."""
        return self.header.backing_file

    @property
    def backing_format(self) -> str | None:
        """The backing format recorded in the image, if any."""
        return self.header.backing_format

    # Locking ---------------------------------------------------------------
    def _shared(self, write: bool = False, cancel: CancelToken | None = None) -> SharedSection:
        """The global lock shared for one request (not re-taken inside exclusive()),
        looking at *cancel* while it waits (see :meth:`ThreadHold.take_watching`).

        A :class:`~qcow2rw.locks.SharedSection`: ``with self._shared(): ...``, or better
        ``self._shared().run(func, *args)``, which no interrupt can leave holding the
        lock (``with`` has a one-instruction gap at the start of ``__exit__``: see there).
        """
        if write and self.readonly:
            raise self._readonly_error()
        if self._exclusive_owner == threading.get_ident():
            if self.closed:
                raise ClosedImage("I/O operation on a closed image")
            return SharedSection(self, locked=False)
        return SharedSection(self, cancel=cancel)

    def exclusive(self, timeout: float | None = None) -> ExclusiveHold:
        """Hold the image exclusively: in-flight requests drain first, new ones wait.

        An :class:`~qcow2rw.locks.ExclusiveHold`: ``with img.exclusive() as img:``, or
        ``img.exclusive().run(func, *args)``, which no interrupt can leave holding the
        image (``with`` has a one-instruction gap at the start of ``__exit__``).
        Requests made from the same thread inside run without waiting, so several
        operations can be made atomic.  Raises :class:`~qcow2rw.locks.LockTimeout` if the image cannot be
        taken within *timeout* seconds.  With no *timeout* it waits at most the image
        lock's watchdog (``self._glock.watchdog``, 30 s by default), then raises
        :class:`~qcow2rw.locks.DrainTimeout` naming what is still held (the threads
        inside requests, in-use pins, pinned L2 tables, in-flight allocations): it
        never waits for ever in silence.  An exception while waiting leaves nothing held.
        """
        if self._exclusive_owner == threading.get_ident():
            return self._glock.exclusive(timeout, owner=self, nested=True)

        def describe() -> str:
            parts = []
            pins = list(self._in_use)
            if pins:
                parts.append(f"{len(pins)} in-use pin(s) on host clusters (data I/O in "
                             f"flight) {pins[:8]}")
            entries = list(self.l2_cache.entries.values())
            pinned = [hex(entry.offset) for entry in entries if entry.pins]
            if pinned:
                parts.append(f"{len(pinned)} pinned L2 table(s) {pinned[:8]}")
            records = sum(len(entry.inflight) for entry in entries)
            if records:
                parts.append(f"{records} L2 entries with an allocation in flight")
            return ", ".join(parts) or "no pins, no allocation in flight"

        return self._glock.exclusive(timeout, owner=self, describe=describe)

    def _fire(self, name: str) -> None:
        events = self.events
        if events is not None:
            events.fire(name)

    def _pin(self, held: list[tuple[int, int]], ranges: list[tuple[int, int]]) -> None:
        """Mark host cluster ranges (first, count) in use: data I/O is about to run on them.

        *held* is the caller's record of its pins (a list it made before calling): the
        ranges go into it and into ``_in_use`` in one step no interrupt can split, so
        ``held`` always lists exactly the caller's pins for :meth:`_unpin`.
        Caller holds: the L2 lock under which the clusters were looked up, so none of
        them can have been freed yet; the allocator skips them until :meth:`_unpin`.
        """
        if self._track_use:
            held += ranges  # (no call until the extend has run: one step)
            self._in_use.extend(ranges)

    def _unpin(self, held: list[tuple[int, int]]) -> None:
        """Drop the in-use marks noted in *held* (by :meth:`_pin`), emptying it.

        One mark at a time leaves both lists at once, so after an interrupt *held*
        still lists exactly the marks left: calling again finishes the job.
        """
        in_use = self._in_use
        while held:
            pin = held[-1]
            del held[-1]  # (no call until the remove has run: one step)
            in_use.remove(pin)

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.header.size:
            raise OutOfRange(f"request [{offset}, {offset + length}) is outside the "
                             f"{self.header.size}-byte disk")

    # Metadata --------------------------------------------------------------
    def _load_l2(self, offset: int) -> array:
        self._fire("l2_load")
        return table_from_bytes(self.file.pread_exact(offset, self.cluster_size))

    def _store_l2(self, offset: int, table: array) -> None:
        if self.overlap is not None:
            self._check_metadata_write(offset, self.cluster_size, ACTIVE_L2)
        self.file.pwrite(offset, table_to_bytes(table))

    def _before_l2_writeback(self, entry: CacheEntry) -> None:
        """An L2 table reaches the file only after the refcounts and data it points to.

        The refcount blocks are written (under the allocator lock) if an increment is
        not yet; then a sync that started after both they and the table's new data
        were written (``RefcountManager.written_mark``, ``CacheEntry.data_mark``) is
        waited for, or run, with the allocator lock released.
        Caller holds: the entry's lock (so every link in the table happened before).
        """
        assert held(entry.lock), "Caller holds: the entry's lock"
        mark = entry.data_mark
        refcounts = self.refcounts
        if not self.header.lazy_refcounts or refcounts.pending_growth is not None:
            with self._alloc_lock:  # (the two fields change together there)
                written = (refcounts.flushed_increments >= entry.refcount_need
                           and refcounts.pending_growth is None)
                written_mark = refcounts.written_mark
            # Only a write-back the table's own links need: other requests' newer
            # increments would cost a write and a sync per table of a flush.
            mark = max(mark, written_mark if written else self._write_refcounts())
        if mark >= 0:
            self.file.sync_past(mark)

    def _write_refcounts(self) -> int:
        """Write the refcount changes made so far (committing a table growth); return
        the sync mark that a sync must pass before anything depending on them is written.

        The allocator lock is held only to take the changes as bytes and to mark them
        written; the writes (and a growth's syncs) run under the refcount I/O lock
        alone, so allocations go on meanwhile.
        Caller holds: at most an L2 entry lock (or the flush lock).
        """
        refcounts = self.refcounts
        with self._refcount_io_lock:
            try:  # (whatever an interrupt cuts off, refcounts.taken still names it)
                with self._alloc_lock:
                    job = refcounts.take_writeback()
                    if job is None:
                        return refcounts.written_mark
                refcounts.run_writeback(job)
                with self._alloc_lock:
                    refcounts.finish_writeback()
                    return refcounts.written_mark
            except BaseException:
                with self._alloc_lock:
                    refcounts.abort_writeback()
                raise

    def _l2_offset(self, l1_index: int) -> int:
        offset = self.l1[l1_index] & L1E_OFFSET_MASK
        if offset % self.cluster_size:
            self._signal_corruption(f"L2 table offset {offset:#x} unaligned (L1 index: "
                                    f"{l1_index:#x})")
        if offset >> self.cluster_bits >= self.refcounts.high_water and offset:
            # Stricter than QEMU, which reads such a table as zeros.
            self._signal_corruption(f"L2 table offset {offset:#x} beyond the end of the image "
                                    f"file (L1 index: {l1_index:#x})")
        return offset

    def classify(self, entry: int) -> int:
        """The kind of cluster an L2 entry describes.

        Damage found here marks the image corrupt, as QEMU does: an unaligned host
        offset, a zero flag in a v2 image; and, stricter than QEMU (which reads zeros
        there and may later allocate the same cluster twice), a host offset at or
        past the end of the file.
        """
        if entry & QCOW_OFLAG_COMPRESSED:
            if (entry & self._coffset_mask) >> self.cluster_bits >= self.refcounts.high_water:
                self._signal_corruption(f"Compressed cluster descriptor {entry:#x} points beyond "
                                        "the end of the image file")
            return COMPRESSED
        offset = entry & L2E_OFFSET_MASK
        if entry & QCOW_OFLAG_ZERO:
            if not self.has_zero_flag:
                self._signal_corruption(f"Zero cluster entry found in pre-v3 image (L2 entry: "
                                        f"{entry:#x})")
            kind = ZERO_ALLOC if offset else ZERO_PLAIN
        else:
            kind = NORMAL if offset else UNALLOCATED
        if offset:
            if offset % self.cluster_size:
                self._signal_corruption(f"Cluster allocation offset {offset:#x} unaligned")
            if offset >> self.cluster_bits >= self.refcounts.high_water:
                self._signal_corruption(f"Cluster allocation offset {offset:#x} beyond the end "
                                        "of the image file")
        return kind

    def _host_clusters(self, kind: int, where: int, length: int) -> tuple[int, int]:
        """(first host cluster, count) that an extent's data I/O touches."""
        cb = self.cluster_bits
        if kind == COMPRESSED:
            where, length = compressed_host_range(where, cb)
        return where >> cb, ((where + length - 1) >> cb) - (where >> cb) + 1

    # Reading ---------------------------------------------------------------
    def read(self, offset: int, length: int, *, cancel: CancelToken | None = None) -> bytes:
        """Read *length* bytes of guest data at *offset*."""
        buf = bytearray(length)
        self.readinto(offset, buf, cancel=cancel)
        return bytes(buf)

    def readinto(self, offset: int, buffer: Any, *, cancel: CancelToken | None = None) -> int:
        """Read into *buffer* (any writable bytes-like object) from *offset*; return its length."""
        return self._request(offset, buffer, False, cancel)

    def _request(self, offset: int, data: Any, write: bool, cancel: CancelToken | None) -> int:
        """One read or write request: checks, the global lock shared, then the fast path
        or the general one.  Returns the request's length."""
        view: Any
        if type(data) is bytearray or (write and type(data) is bytes):  # no view needed
            view = data
        else:
            view = memoryview(data)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
        length = len(view)
        if offset < 0 or offset + length > self.header.size:
            self._check_range(offset, length)
        if write and self.readonly:
            raise self._readonly_error()
        # Interrupt safety (see qcow2rw.locks): the hold records what it took in the same
        # step as it takes it, so the finally gives back exactly that, and calls settle()
        # again if an interrupt cut the first call short.
        if self._exclusive_owner == threading.get_ident():
            hold = None
            depth = 0
        else:
            hold = self._glock.shared()
            depth = hold.depth
        try:
            if hold is not None:
                hold.take_watching(cancel)
            if self.closed:
                raise ClosedImage("I/O operation on a closed image")
            if self._fast_io(offset, view, write):  # one cluster: no cancel point
                pass
            elif write:
                pending = (hold or self._glock.shared()).pending
                mark = len(pending)
                try:
                    self._for_each_table(offset, length, memoryview(view), cancel,
                                         lambda idx, guest, n, part: self._write_chunk(idx, guest, n, part, cancel))
                except BaseException:
                    # A plan whose return value or whose run an interrupt cut off: give
                    # back what its steps still claim (clusters, records, pins).
                    while len(pending) > mark:
                        entry_obj, ops = pending[-1]
                        for op in ops:
                            if not op.done:
                                self._abandon(entry_obj, op)
                        del pending[-1]
                    raise
            else:
                self._read_locked(offset, memoryview(view), cancel)
        finally:
            if hold is not None:
                try:
                    hold.settle(depth)
                except BaseException:
                    hold.settle(depth)
                    raise
        return length

    def _fast_io(self, offset: int, view: Any, write: bool) -> bool:
        """Serve a request inside one normal cluster (COPIED for writes) with a cached
        L2 table; False (having done nothing) when the general path must take it.

        *view* is a bytearray, or for writes bytes, or a byte-format memoryview.  This
        is the hot path of every small request: names are looked up once, and an L1
        entry that is zero or unaligned needs no test of its own (no L2 table is ever
        cached under such an offset, so the lookup misses).
        Caller holds: the global lock shared.
        """
        length = len(view)
        cs_mask = self._cs_mask
        if not length or (offset & cs_mask) + length > self.cluster_size:
            return False
        entries = self.l2_cache.entries  # lock-free lookup: see MetadataCache.lookup
        l2_offset = self.l1[offset >> self.l1_shift] & L1E_OFFSET_MASK
        entry_obj = entries.get(l2_offset)
        if entry_obj is None or entry_obj.ready is not None:
            return False
        entry_obj.referenced = True
        pin = None  # set right before its append (no call between): removed iff appended
        try:
            with entry_obj.lock:
                if entries.get(l2_offset) is not entry_obj:  # evicted meanwhile
                    return False
                index = (offset >> self.cluster_bits) & self._l2_mask
                entry = entry_obj.table[index]
                host = entry & L2E_OFFSET_MASK
                if (not host or host & cs_mask or entry & (QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO)
                        or (write and (not entry & QCOW_OFLAG_COPIED or index in entry_obj.inflight))
                        or host >> self.cluster_bits >= self.refcounts.high_water):
                    return False  # (the general path reports a host offset past the end of file)
                pins = self._pins
                if pins is not None:
                    pin = (host >> self.cluster_bits, 1)
                    pins.append(pin)  # (no call since the line above: one step)
            host += offset & cs_mask
            if self.events is not None:
                self.events.fire("write_aio" if write else "read_aio")
            file = self.file
            if write:
                overlap = self.overlap
                if overlap is not None and overlap.find(host, length) is not None:
                    self._check_data_write(host, length)
                if file.faults is not None or file.log is not None or file.sync_error is not None:
                    file.pwrite(host, view)  # the storage seam's full treatment
                else:
                    try:
                        written = os.pwrite(self._fd, view, host)
                    finally:
                        file.unsynced = True  # after the write: see HostFile.unsynced
                    if written < length:
                        file.pwrite(host + written, memoryview(view)[written:])
            elif file.faults is not None or os.preadv(self._fd, [view], host) < length:
                file.preadv([view], host)  # short read, or faults are injected
        finally:
            if pin is not None:
                pins.remove(pin)
        return True

    def read_backing(self, offset: int, view: memoryview) -> None:
        """Read for an overlay: like readinto, but bytes past the end read as zeros."""
        inside = max(0, min(len(view), self.header.size - offset))
        if inside:
            with self._shared():
                self._read_locked(offset, view[:inside], None)
        if inside < len(view):
            view[inside:] = bytes(len(view) - inside)

    def _read_locked(self, offset: int, view: memoryview, cancel: CancelToken | None) -> None:
        """Caller holds: the global lock (shared or exclusive)."""
        step = MAX_RUN_BYTES if cancel is not None else 1 << self.l1_shift
        pos, length = 0, len(view)
        while pos < length:
            if cancel is not None:
                cancel.check()
            guest = offset + pos
            chunk = min(length - pos, ((guest >> self.l1_shift) + 1 << self.l1_shift) - guest, step)
            pins: list[tuple[int, int]] = []  # filled by _lookup as it pins
            try:
                extents = self._lookup(guest, chunk, pins)[0]
                self._fire("read_aio")
                part_pos = pos
                for kind, ext_guest, ext_len, where in extents:
                    self._read_extent(kind, ext_guest, view[part_pos:part_pos + ext_len], where)
                    part_pos += ext_len
            finally:
                try:
                    self._unpin(pins)
                except BaseException:  # an interrupt cut it short: it resumes
                    self._unpin(pins)
                    raise
            pos += chunk

    def _read_extent(self, kind: int, guest: int, part: memoryview, where: int) -> None:
        """Fill *part* with one extent's data.  Caller holds: no metadata lock, and pins."""
        if kind == NORMAL:
            if self.file.faults is not None or os.preadv(self.file.fd, [part], where) < len(part):
                self.file.preadv([part], where)  # short read: retry, zeros past end of file
        elif kind == UNALLOCATED:
            if self.backing is None:
                part[:] = bytes(len(part))
            else:
                self.backing.read_backing(guest, part)
        elif kind == COMPRESSED:
            data = self._decompress(where)
            start = guest & (self.cluster_size - 1)
            part[:] = data[start:start + len(part)]
        else:
            part[:] = bytes(len(part))

    def _decompress(self, entry: int) -> bytes:
        host, length = decode_compressed(entry, self.cluster_bits)
        data = self.file.pread(host, length)
        return compress.decompress(data, self.cluster_size, self.header.compression_type)

    def _lookup(self, offset: int, length: int, pins: list[tuple[int, int]] | None = None
                ) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int]]]:
        """Extents of [offset, offset+length) (within one L2 table) and the pins taken.

        The in-use counts on the host clusters are taken under the L2 lock, so none of
        them can be freed and reused before the caller unpins them after its I/O.  They
        are noted in *pins* (the caller's list, made before the call) as they are taken,
        so an interrupt that loses this call's return value loses no pin.
        Caller holds: the global lock shared, no metadata lock.
        """
        if pins is None:
            pins = []
        l2_offset = self._l2_offset(offset >> self.l1_shift)
        if not l2_offset:
            return [(UNALLOCATED, offset, length, 0)], pins
        tables: list[CacheEntry] = []
        try:
            entry_obj = self.l2_cache.get(l2_offset, tables)
            with entry_obj.lock:
                extents = self._extents_in(entry_obj.table, offset, length)
                if self._track_use:
                    self._pin(pins, [self._host_clusters(kind, where, ext_len)
                                     for kind, _, ext_len, where in extents
                                     if kind == NORMAL or kind == COMPRESSED])
        finally:
            try:
                self.l2_cache.release(tables)
            except BaseException:  # an interrupt cut it short: it resumes
                self.l2_cache.release(tables)
                raise
        return extents, pins

    def _extents_in(self, table: array, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """Runs (kind, guest, length, host-or-entry) of a range inside one L2 table.

        NORMAL and ZERO_ALLOC runs carry the host offset of their first byte and are
        merged while the host clusters are contiguous; COMPRESSED runs are one cluster
        and carry the L2 entry.  Caller holds: the table's lock.
        """
        cs, cb = self.cluster_size, self.cluster_bits
        cs_mask, l2_mask = cs - 1, self.l2_entries - 1
        first = (offset >> cb) & l2_mask
        count = ((offset + length - 1) >> cb & l2_mask) - first + 1 if length > 0 else 0
        if count > 1:  # the common shapes of a big request, compared in C
            entries = table[first:first + count]
            head = entries[0]
            if not head:
                if entries.count(0) == count:  # all unallocated
                    return [(UNALLOCATED, offset, length, 0)]
            elif (not head & (QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO | cs_mask)
                  and ((head & L2E_OFFSET_MASK) >> cb) + count <= self.refcounts.high_water
                  and entries == array("Q", range(head, head + count * cs, cs))):
                # normal clusters, one after another in the file, same flags: one run
                # (what _extents_by_entry finds, one entry at a time)
                return [(NORMAL, offset, length, (head & L2E_OFFSET_MASK) + (offset & cs_mask))]
        return self._extents_by_entry(table, offset, length)

    def _extents_by_entry(self, table: array, offset: int,
                          length: int) -> list[tuple[int, int, int, int]]:
        """:meth:`_extents_in`, entry by entry (every shape; damage reported as found).

        Caller holds: the table's lock.
        """
        out: list[tuple[int, int, int, int]] = []
        cs, cb = self.cluster_size, self.cluster_bits
        cs_mask, l2_mask = cs - 1, self.l2_entries - 1
        end = offset + length
        guest = offset
        while guest < end:
            entry = table[(guest >> cb) & l2_mask]
            kind = self.classify(entry)
            in_cluster = guest & cs_mask
            take = min(cs - in_cluster, end - guest)
            where = 0
            if kind == NORMAL or kind == ZERO_ALLOC:
                where = (entry & L2E_OFFSET_MASK) + in_cluster
            elif kind == COMPRESSED:
                where = entry
            if out and kind != COMPRESSED:
                pkind, pguest, plen, pwhere = out[-1]
                if pkind == kind and (kind not in (NORMAL, ZERO_ALLOC) or pwhere + plen == where):
                    out[-1] = (pkind, pguest, plen + take, pwhere)
                    guest += take
                    continue
            out.append((kind, guest, take, where))
            guest += take
        return out

    # Writing ---------------------------------------------------------------
    def write(self, offset: int, data: Any, *, cancel: CancelToken | None = None) -> None:
        """Write *data* (any bytes-like object) at guest *offset*; any alignment."""
        self._request(offset, data, True, cancel)

    def _for_each_table(self, offset: int, length: int, view: memoryview | None,
                        cancel: CancelToken | None, func: Callable[..., None]) -> None:
        """Call func(l1_index, guest, length, view-part) per L2 table the range touches
        (per MAX_RUN_BYTES at most, checking *cancel* in between, when there is a token).

        Chunks end on cluster boundaries (the step is a power of two no smaller than a
        cluster), so a cancelled request leaves each cluster all old or all new.
        """
        pos = 0
        step = max(MAX_RUN_BYTES, self.cluster_size)
        while pos < length:
            guest = offset + pos
            l1_index = guest >> self.l1_shift
            chunk = min(length - pos, ((l1_index + 1) << self.l1_shift) - guest)
            if cancel is not None:
                cancel.check()
                chunk = min(chunk, ((guest + step) & ~(self.cluster_size - 1)) - guest)
            func(l1_index, guest, chunk, view[pos:pos + chunk] if view is not None else None)
            pos += chunk
        if len(self.refcounts.deferred_frees) > MAX_DEFERRED_FREES:
            self._flush_locked()

    def _get_l2_for_write(self, l1_index: int, tables: list[CacheEntry] | None = None) -> CacheEntry:
        """The L2 table of *l1_index*, allocated or copied-on-write if needed; pinned,
        the pin recorded in *tables* (see :meth:`MetadataCache.get`).

        A new or copied table is linked into the L1 table in memory (written back at
        the next flush, after the table itself).  The I/O this needs (loading the
        table to copy, evicting to make room, the allocation's refcount block) is
        done before the L1 lock is taken; under it the L1 entry is looked at again,
        and a cluster allocated for a table somebody else made meanwhile goes back.
        Caller holds: no metadata lock.
        """
        while True:
            l1_entry = self.l1[l1_index]
            offset = self._l2_offset(l1_index)
            if offset and l1_entry & QCOW_OFLAG_COPIED:  # ours alone: only exclusive
                return self.l2_cache.get(offset, tables)  # operations change that
            table = self._l2_copy_source(offset)
            self.l2_cache.make_room(reserve=1)
            self._fire("l2_alloc")
            with self._alloc_lock:
                new_offset = self.refcounts.alloc(1)
            with self._l1_lock:
                if self.l1[l1_index] == l1_entry:
                    if offset:  # drop our reference to the table we copied
                        with self._alloc_lock:
                            self.refcounts.free_later(offset >> self.cluster_bits)
                    entry = self.l2_cache.install(new_offset, table, make_room=False,
                                                  held=tables)
                    self.l1[l1_index] = new_offset | QCOW_OFLAG_COPIED
                    self.l1_dirty.add(l1_index)
                    if self.overlap is not None:
                        self.overlap.added(new_offset, self.cluster_size, ACTIVE_L2)
                    return entry
            with self._alloc_lock:  # another request linked a table first: use that one
                self.refcounts.free_now(new_offset >> self.cluster_bits)

    def _l2_copy_source(self, offset: int) -> array:
        """The contents for a new L2 table: a copy of the one at *offset* (shared with
        a snapshot), or all zeros (no table yet).  Caller holds: no metadata lock."""
        if not offset:
            return array("Q", bytes(self.cluster_size))
        return self.l2_cache.copy_of(offset)

    def _write_chunk(self, l1_index: int, guest: int, length: int, data: memoryview,
                     cancel: CancelToken | None) -> None:
        """Write [guest, guest+length), which lies in one L2 table.

        Caller holds: the global lock shared, no metadata lock.
        """
        cb, l2_mask = self.cluster_bits, self.l2_entries - 1
        first = (guest >> cb) & l2_mask
        last = ((guest + length - 1) >> cb) & l2_mask
        while True:
            tables: list[CacheEntry] = []
            try:
                entry_obj = self._get_l2_for_write(l1_index, tables)
                with entry_obj.lock:
                    blocker = self._blocker(entry_obj, first, last)
                    if blocker is None:
                        plan = self._plan_write(entry_obj, first, last)
                if blocker is None:
                    self._run_write_plan(entry_obj, plan, guest, data, cancel)
                    return
            finally:
                try:
                    self.l2_cache.release(tables)
                except BaseException:  # an interrupt cut it short: it resumes
                    self.l2_cache.release(tables)
                    raise
            _wait_for_allocation(blocker, cancel)  # then look the mapping up again

    def _blocker(self, entry_obj: CacheEntry, first: int, last: int) -> Gate | None:
        """An in-flight allocation on entries first..last of this table, if any.

        Caller holds: the table's lock.
        """
        assert held(entry_obj.lock), "Caller holds: the table's lock"
        inflight = entry_obj.inflight
        if not inflight:
            return None
        for index in range(first, last + 1):
            record = inflight.get(index)
            if record is not None:
                return record
        return None

    def _plan_write(self, entry_obj: CacheEntry, first: int, last: int) -> list[_WriteOp]:
        """Split entries first..last into in-place and allocating steps; claim what they need.

        In-place steps pin their host clusters; allocating steps get new clusters, an
        in-flight record on their entries, and pins on the old clusters they copy from.
        Caller holds: the table's lock.
        """
        assert held(entry_obj.lock), "Caller holds: the table's lock"
        table = entry_obj.table
        cs, cb = self.cluster_size, self.cluster_bits
        for k in range(first, last + 1):  # damage is found before anything is claimed
            self._check_droppable(table[k])
        ops: list[_WriteOp] = []
        # Listed before anything is claimed: if an interrupt loses this plan on its way
        # to _run_write_plan, the request (_request) gives back what its steps claim.
        pending = self._glock.shared().pending
        pending.append((entry_obj, ops))
        try:
            i = first
            while i <= last:
                entry = table[i]
                kind = self.classify(entry)
                limit = min(last + 1, i + self._run_clusters)
                if kind == NORMAL and entry & QCOW_OFLAG_COPIED:
                    host = entry & L2E_OFFSET_MASK
                    j = i + 1
                    while j < limit and table[j] & _COPIED_NORMAL_MASK == QCOW_OFLAG_COPIED | (host + ((j - i) << cb)):
                        j += 1
                    op = _WriteOp(i, j, host, False, [], None)
                    ops.append(op)  # listed before it claims anything...
                    self._pin(op.pins, [(host >> cb, j - i)])  # ...then pinned, noted in op.pins
                    i = j
                    continue
                j = i + 1
                limit = min(limit, i + self.refcounts.max_run)
                while j < limit and not (table[j] & _COPIED_NORMAL_MASK & ~L2E_OFFSET_MASK == QCOW_OFLAG_COPIED
                                         and table[j] & L2E_OFFSET_MASK):
                    j += 1
                with self._alloc_lock:  # (e.g. ENOSPC growing the refcount table: undone below)
                    host = self.refcounts.alloc(j - i)
                    fresh = self.refcounts.last_alloc_fresh
                record = Gate()  # an Event's wait could leave its lock taken if interrupted
                op = _WriteOp(i, j, host, True, [], record, fresh)
                claims = dict.fromkeys(range(i, j), record)
                ops += [op]  # (no call until the update has run: the step is listed
                entry_obj.inflight.update(claims)  # exactly when its records are)
                olds = []
                for k in {i, j - 1}:  # the clusters whose head or tail may be copied
                    old_kind = self.classify(table[k])
                    if old_kind == NORMAL:
                        olds.append(((table[k] & L2E_OFFSET_MASK) >> cb, 1))
                    elif old_kind == COMPRESSED:
                        olds.append(self._host_clusters(COMPRESSED, table[k], cs))
                self._pin(op.pins, olds)
                i = j
        except BaseException:
            self._undo_plan(entry_obj, ops)
            for index in range(len(pending) - 1, -1, -1):
                if pending[index][1] is ops:
                    del pending[index]
                    break
            raise
        return ops

    def _undo_plan(self, entry_obj: CacheEntry, ops: list[_WriteOp]) -> None:
        """Release what the steps planned so far claimed: clusters, records, pins.

        Caller holds: the table's lock.
        """
        assert held(entry_obj.lock), "Caller holds: the table's lock"
        for op in ops:
            self._abandon(entry_obj, op, table_locked=True)

    def _run_write_plan(self, entry_obj: CacheEntry, ops: list[_WriteOp], guest: int,
                        data: memoryview, cancel: CancelToken | None) -> None:
        """Do the data I/O of each step, then link allocated clusters; undo what is left on error.

        Caller holds: the global lock shared, no metadata lock.
        """
        cb = self.cluster_bits
        table_guest = (guest >> self.l1_shift) << self.l1_shift
        end = guest + len(data)
        try:
            for op in ops:
                if cancel is not None:
                    cancel.check()
                run_lo = table_guest + (op.first << cb)
                run_hi = table_guest + (op.end << cb)
                lo, hi = max(guest, run_lo), min(end, run_hi)
                if not op.allocating:
                    self._fire("write_aio")
                    if self.overlap is not None:
                        self._check_data_write(op.host + (lo - run_lo), hi - lo)
                    if cancel is None:
                        self.file.pwrite(op.host + (lo - run_lo), data[lo - guest:hi - guest])
                    else:  # a cluster at a time, looking at the token in between
                        self._write_in_place(op.host - run_lo, lo, hi, data[lo - guest:hi - guest],
                                             cancel)
                else:
                    self._fire("cluster_alloc")
                    self._write_new_clusters(entry_obj, op, run_lo, run_hi, lo, hi,
                                             data[lo - guest:hi - guest])
                    if cancel is not None:  # not linked yet: every cluster still reads old
                        cancel.check()
                    self._link(entry_obj, op)
                self._unpin(op.pins)  # (an interrupt here: _abandon finishes it)
                op.done = True
        finally:
            for op in ops:
                if not op.done:
                    self._abandon(entry_obj, op)
            # Settled: no longer the request's to give back.  (An interrupt before this
            # point leaves it listed, and _request abandons what is still not done.)
            pending = self._glock.shared().pending
            for index in range(len(pending) - 1, -1, -1):
                if pending[index][1] is ops:
                    del pending[index]
                    break

    def _write_in_place(self, delta: int, lo: int, hi: int, data: memoryview,
                        cancel: CancelToken) -> None:
        """Write guest [lo, hi) at host offset guest + *delta*, one cluster per write,
        checking *cancel* before each (DESIGN §5: a cancelled write stops at the next
        cluster boundary; every cluster holds its old or its new data).

        Caller holds: no metadata lock, and pins on the clusters.
        """
        cs = self.cluster_size
        pos = lo
        while pos < hi:
            if pos != lo:
                cancel.check()
            nxt = min(hi, (pos | (cs - 1)) + 1)
            self.file.pwrite(pos + delta, data[pos - lo:nxt - lo])
            pos = nxt

    def _write_new_clusters(self, entry_obj: CacheEntry, op: _WriteOp, run_lo: int, run_hi: int,
                            lo: int, hi: int, data: memoryview) -> None:
        """Write an allocating step's data, with the head and tail copied from the old clusters.

        A head or tail that would be copied as zeros into clusters that were never
        written (past the old end of the file) is left as a hole instead, and the
        file is extended with one byte at the run's end, so it still reads as zeros.
        Caller holds: no metadata lock (the step's in-flight record keeps its entries ours).
        """
        cs = self.cluster_size
        table = entry_obj.table
        buffers: list[Any] = []
        head = tail = None
        skip_head = op.fresh and lo > run_lo and self._reads_as_zeros(table[op.first])
        skip_tail = op.fresh and hi < run_hi and self._reads_as_zeros(table[op.end - 1])
        if lo > run_lo and not skip_head:
            self._fire("cow_read")
            head = self._old_cluster_data(table[op.first], run_lo)
            buffers.append(memoryview(head)[:lo - run_lo])
        buffers.append(data)
        if hi < run_hi and not skip_tail:
            last_lo = run_hi - cs
            if op.end - 1 == op.first and head is not None:
                tail = head
            else:
                self._fire("cow_read")
                tail = self._old_cluster_data(table[op.end - 1], last_lo)
            buffers.append(memoryview(tail)[hi - last_lo:])
        self._fire("cow_write" if len(buffers) > 1 else "write_aio")
        if self.overlap is not None:
            self._check_data_write(op.host, run_hi - run_lo)
        self.file.pwritev(buffers, op.host + (lo - run_lo if skip_head else 0))
        if skip_tail:
            self.file.pwrite(op.host + (run_hi - run_lo) - 1, b"\0")

    def _reads_as_zeros(self, entry: int) -> bool:
        """True if a cluster with this L2 entry reads as zeros (nothing to copy from)."""
        kind = self.classify(entry)
        return kind in (ZERO_PLAIN, ZERO_ALLOC) or (kind == UNALLOCATED and self.backing is None)

    def _link(self, entry_obj: CacheEntry, op: _WriteOp) -> None:
        """Point the step's L2 entries at its new clusters; free the old ones later.

        Caller holds: no metadata lock (this takes the table's, then the allocator's).
        """
        cb = self.cluster_bits
        self._fire("l2_update")
        if self.header.lazy_refcounts:
            self._mark_dirty()
        with entry_obj.lock:
            table = entry_obj.table
            old_entries = [table[k] for k in range(op.first, op.end)]
            for k in range(op.first, op.end):
                table[k] = (op.host + ((k - op.first) << cb)) | QCOW_OFLAG_COPIED
                if entry_obj.inflight.get(k) is op.record:
                    del entry_obj.inflight[k]
            entry_obj.dirty = True
            # The data written above returned before this mark was taken: the table
            # goes to the file only after a sync that started later.
            entry_obj.data_mark = self.file.sync_mark()
            entry_obj.refcount_need = self.refcounts.increments  # (ours were counted before)
            with self._alloc_lock:
                for old in old_entries:
                    self._free_entry_later(old)
        op.record.set()  # type: ignore[union-attr]

    def _abandon(self, entry_obj: CacheEntry, op: _WriteOp, *,
                 table_locked: bool = False) -> None:
        """Undo a step that did not finish: release its clusters, records and pins.

        Safe on a step that an interrupt cut short anywhere, here or in :meth:`_link`,
        and to call again: a new cluster is freed only while its entry still carries
        the step's record and does not point at it, and the record is dropped first, so
        no cluster is freed twice (one may leak instead).  Entries that _link already
        pointed at the new clusters stay linked, and the table is marked dirty.
        Caller holds: no metadata lock, or (*table_locked*) the table's lock only.
        """
        if op.allocating:
            cb = self.cluster_bits
            record = op.record
            with nullcontext() if table_locked else entry_obj.lock:
                table, inflight = entry_obj.table, entry_obj.inflight
                linked = False
                for k in range(op.first, op.end):
                    cluster = op.host + ((k - op.first) << cb)
                    if inflight.get(k) is not record:
                        linked = True  # _link took it over (or an earlier call gave it up)
                        continue
                    del inflight[k]  # (first: never freed twice)
                    if table[k] & L2E_OFFSET_MASK == cluster:
                        linked = True  # _link pointed the entry at it, then was cut short
                        continue
                    with self._alloc_lock:
                        self.refcounts.free_now(cluster >> cb)
                if linked:  # what _link does after its loop (harmless if it did)
                    entry_obj.dirty = True
                    entry_obj.data_mark = self.file.sync_mark()
                    entry_obj.refcount_need = self.refcounts.increments
            record.set()  # type: ignore[union-attr]
        self._unpin(op.pins)
        op.done = True

    def _old_cluster_data(self, entry: int, cluster_guest: int) -> bytes | bytearray:
        """What the guest cluster at *cluster_guest* reads as now (for copy-on-write)."""
        kind = self.classify(entry)
        if kind == NORMAL:
            return self.file.pread_exact(entry & L2E_OFFSET_MASK, self.cluster_size)
        if kind == COMPRESSED:
            return self._decompress(entry)
        buf = bytearray(self.cluster_size)
        if kind == UNALLOCATED and self.backing is not None:
            self.backing.read_backing(cluster_guest, memoryview(buf))
        return buf

    def _free_entry_later(self, entry: int) -> None:
        """Drop the reference an L2 entry held (deferred until the change is durable).

        Caller holds: the allocator lock.
        """
        assert held(self._alloc_lock), "Caller holds: the allocator lock"
        cb = self.cluster_bits
        end = self.refcounts.high_water
        if entry & QCOW_OFLAG_COMPRESSED:
            first, count = self._host_clusters(COMPRESSED, entry, 0)
            if count <= self._max_compressed_clusters(entry) and first + count <= end:
                self.refcounts.free_later(first, count)
            return  # (a damaged descriptor frees nothing: a leak at worst, never damage)
        offset = entry & L2E_OFFSET_MASK
        if (not offset or offset % self.cluster_size or offset >> cb >= end
                or (entry & QCOW_OFLAG_ZERO and not self.has_zero_flag)):
            return
        self.refcounts.free_later(offset >> cb)

    def _max_compressed_clusters(self, entry: int) -> int:
        """Host clusters a valid compressed descriptor can touch (its data is shorter
        than a cluster, so it spans at most cluster + 512 bytes from a sector start)."""
        length = compressed_host_range(entry, self.cluster_bits)[1]
        if length > self.cluster_size + 512:
            return 0
        return 2

    def _check_droppable(self, entry: int) -> int:
        """classify() for an entry a request is about to drop (overwrite, zero, discard).

        Stricter than QEMU: a compressed descriptor whose size field is longer than any
        compressed cluster can be would free clusters that may belong to others, so it
        marks the image corrupt instead.
        """
        kind = self.classify(entry)
        if kind == COMPRESSED and not self._max_compressed_clusters(entry):
            self._signal_corruption(f"Compressed cluster descriptor {entry:#x} has an invalid "
                                    "size field (longer than a cluster)")
        return kind

    def _mark_dirty(self) -> None:
        """Set the dirty bit (lazy refcounts) before the first unaccounted L2 link.

        Caller holds: no metadata lock (this takes the allocator lock).
        """
        if self.header.incompatible_features & INCOMPAT_DIRTY:
            return
        with self._alloc_lock:
            if not self.header.incompatible_features & INCOMPAT_DIRTY:
                self._write_incompatible(self.header.incompatible_features | INCOMPAT_DIRTY)

    def _write_incompatible(self, value: int) -> None:
        """Write the incompatible-features field (one small write) and sync it."""
        self.file.pwrite(OFF_INCOMPATIBLE, struct.pack(">Q", value))
        self.file.flush()
        self.header.incompatible_features = value

    # Discard and zeroes ----------------------------------------------------
    def discard(self, offset: int, length: int, *, cancel: CancelToken | None = None) -> None:
        """Discard whole clusters inside the range (partial clusters are left as they are).

        A discarded cluster reads as zeros afterwards.  A v2 image cannot mark clusters
        as zero, so there a discard unallocates the clusters when it has no backing
        file, and does nothing when it has one (which would show through), as QEMU.
        """
        self._check_range(offset, length)
        if self.has_zero_flag or self.backing is None:
            self._shared(True, cancel).run(self._zero_clusters, offset, length, True, cancel)
        else:
            self._shared(write=True).run(lambda: None)  # (the checks only)

    def write_zeroes(self, offset: int, length: int, *, cancel: CancelToken | None = None) -> None:
        """Make the range read as zeros (v3: zero clusters; partial clusters are written)."""
        self._check_range(offset, length)
        self._shared(True, cancel).run(self._write_zeroes_locked, offset, length, cancel)

    def _write_zeroes_locked(self, offset: int, length: int, cancel: CancelToken | None) -> None:
        """Caller holds: the global lock (shared or exclusive)."""
        cs = self.cluster_size
        start = (offset + cs - 1) & ~(cs - 1)
        end = (offset + length) & ~(cs - 1)
        if not self.has_zero_flag or start >= end:
            self._write_zero_bytes(offset, length, cancel)
            return
        if offset < start:
            self._write_zero_bytes(offset, start - offset, cancel)
        self._zero_clusters(start, end - start, False, cancel)
        if end < offset + length:
            self._write_zero_bytes(end, offset + length - end, cancel)

    def _write_zero_bytes(self, offset: int, length: int, cancel: CancelToken | None) -> None:
        chunk = 1 << 20
        zeros = memoryview(bytes(min(chunk, length)))
        pos = 0
        while pos < length:
            n = min(chunk, length - pos)
            self._for_each_table(offset + pos, n, zeros[:n], cancel,
                                 lambda idx, guest, size, part: self._write_chunk(idx, guest, size, part, cancel))
            pos += n

    def _zero_clusters(self, offset: int, length: int, discard: bool,
                       cancel: CancelToken | None) -> None:
        cs = self.cluster_size
        start = (offset + cs - 1) & ~(cs - 1)
        end = (offset + length) & ~(cs - 1)
        if start < end:
            self._for_each_table(start, end - start, None, cancel,
                                 lambda idx, guest, size, _: self._zero_chunk(idx, guest, size, discard,
                                                                             cancel))

    def _zero_chunk(self, l1_index: int, guest: int, length: int, discard: bool,
                    cancel: CancelToken | None = None) -> None:
        """Discard or zero whole clusters [guest, guest+length) of one L2 table.

        Caller holds: the global lock shared, no metadata lock.
        """
        if discard and not self._l2_offset(l1_index) and (self.backing is None or not self.has_zero_flag):
            return  # reads as zeros (or as the backing file) already
        first = (guest >> self.cluster_bits) & (self.l2_entries - 1)
        last = first + (length >> self.cluster_bits) - 1
        while True:
            tables: list[CacheEntry] = []
            try:
                entry_obj = self._get_l2_for_write(l1_index, tables)
                with entry_obj.lock:
                    blocker = self._blocker(entry_obj, first, last)
                    if blocker is None:
                        self._zero_entries(entry_obj, first, last, discard)
                        return
            finally:
                try:
                    self.l2_cache.release(tables)
                except BaseException:  # an interrupt cut it short: it resumes
                    self.l2_cache.release(tables)
                    raise
            _wait_for_allocation(blocker, cancel)

    def _zero_entries(self, entry_obj: CacheEntry, first: int, last: int, discard: bool) -> None:
        """Caller holds: the table's lock, with no allocation in flight on first..last."""
        assert held(entry_obj.lock), "Caller holds: the table's lock"
        table = entry_obj.table
        frees = []
        for i in range(first, last + 1):
            entry = table[i]
            kind = self._check_droppable(entry)
            if discard:
                if kind == UNALLOCATED and (self.backing is None or not self.has_zero_flag):
                    continue
                if kind == ZERO_PLAIN:
                    continue
                new = QCOW_OFLAG_ZERO if self.has_zero_flag else 0
            else:
                if kind in (NORMAL, ZERO_ALLOC) and entry & QCOW_OFLAG_COPIED:
                    new = (entry & (L2E_OFFSET_MASK | QCOW_OFLAG_COPIED)) | QCOW_OFLAG_ZERO
                    if new != entry:
                        table[i] = new
                        entry_obj.dirty = True
                    continue
                if kind == ZERO_PLAIN:
                    continue
                new = QCOW_OFLAG_ZERO
            table[i] = new
            entry_obj.dirty = True
            frees.append(entry)
        if frees:
            with self._alloc_lock:
                for entry in frees:
                    self._free_entry_later(entry)

    # Flush -----------------------------------------------------------------
    def flush(self) -> None:
        """Write all cached metadata back in the safe order and sync the file."""
        self._shared().run(self._flush_shared)

    def _flush_shared(self) -> None:
        """Caller holds: the global lock (shared or exclusive)."""
        if self.file.sync_error is not None and not self._readonly:
            raise self._readonly_error()  # a failed sync is never retried as if durable
        if not self.readonly:
            self._flush_locked()

    def _flush_locked(self) -> None:
        """DESIGN §6 order: refcounts (+data) -> sync -> L2 -> sync -> L1 -> sync -> frees.

        Only the frees queued before the L2 tables are written are applied, and only
        the L1 sectors as they were before them, so nothing reaches the file ahead
        of what it depends on, whatever other requests do meanwhile.

        THE FLUSH RULE: when ``flush()`` returns, every write (data or metadata) that
        completed before ``flush()`` was called, on any thread, is durable.  How each
        path keeps it:
        - guest data and COW: written before the request returns; ``HostFile.flush``
          (its docstring has the generations) runs or waits for a sync that started
          after every write that had returned;
        - refcount blocks and table: written here under the allocator lock, which
          every other writer of them holds for its whole store;
        - L2 tables: dirty until their store has returned (``MetadataCache``), so
          ``l2_cache.flush`` writes each one or waits on its lock for a write-back
          in flight on another thread (an eviction); the sync after it covers both;
        - L1 sectors: taken under the L1 lock at the start, so they include every
          link made before the call, and written only here (or exclusively);
        - frees: the decrements queued before the call, applied after the syncs that
          made the dropping updates durable, then synced themselves.
        Caller holds: the global lock (shared or exclusive).
        """
        lazy = self.header.lazy_refcounts
        with self._flush_lock:
            self._fire("flush_to_os")
            if not lazy or self.refcounts.pending_growth is not None:
                self._write_refcounts()  # (a growth committed here queues its frees)
            with self._alloc_lock:
                pending = self.refcounts.take_deferred_frees()
            with self._l1_lock:  # after the frees: every L1 change they depend on is in
                l1_sectors = self._dirty_l1_sectors()
            try:
                if not lazy:
                    self._write_refcounts()  # (increments made since the first write-back)
                self.file.flush()
                self.l2_cache.flush()
                if l1_sectors:
                    self.file.flush()
                    self._fire("l1_update")
                    for offset, data in l1_sectors:
                        if self.overlap is not None:
                            self._check_metadata_write(offset, len(data), ACTIVE_L1)
                        self.file.pwrite(offset, data)
                self.file.flush()
                if pending:
                    self._fire("cluster_free")
            except BaseException:
                # Nothing taken above may be forgotten: the L1 sectors go out, and the
                # decrements are applied, at the next flush (else a later successful
                # flush would leave an acknowledged write unlinked).
                self._requeue(l1_sectors, pending)
                raise
            if pending:
                if self.snapshot_table:
                    pending = self._spare_snapshot_clusters(pending)
                with self._alloc_lock:
                    freed = self.refcounts.apply_frees(pending)
                    if freed and self.overlap is not None:
                        self.overlap.freed(freed)  # before any of them can be reallocated
                if not lazy:
                    self._write_refcounts()
                for cluster in freed:
                    self.l2_cache.discard(cluster << self.cluster_bits)
                self.file.flush()

    def _spare_snapshot_clusters(self, pending: list[int]) -> list[int]:
        """Stricter than QEMU: never free a cluster a snapshot still references.

        A refcount that says 1 on a cluster a snapshot shares (damage) would free it
        when the active image drops it, and the next allocation would overwrite the
        snapshot's data.  So the decrements that would bring a refcount to 0 are
        checked against the snapshots' tables (read from the file: the cost is bounded
        by their size, and paid only then) and held back for clusters still
        referenced: a refcount too low is left as it is, never made 0.
        Caller holds: the flush lock.
        """
        counts = Counter(pending)
        try:
            with self._alloc_lock:
                zeroing = {c: self.refcounts.get(c) for c, n in counts.items()}
            zeroing = {c: r for c, r in zeroing.items() if 0 < r <= counts[c]}
            if not zeroing:
                return pending
            shared = self._snapshot_references(set(zeroing))
        except Qcow2Error:
            return pending  # apply_frees reports what is wrong, as before
        except OSError:
            self._requeue([], pending)  # the decrements wait for the next flush
            raise
        if not shared:
            return pending
        allowed = {c: zeroing[c] - 1 for c in shared}
        out = []
        for cluster in pending:
            if cluster in allowed:
                if allowed[cluster] <= 0:
                    continue
                allowed[cluster] -= 1
            out.append(cluster)
        return out

    def _snapshot_references(self, clusters: set[int]) -> set[int]:
        """Which of *clusters* the snapshots' L1 and L2 tables reference (from the file)."""
        cb, cs = self.cluster_bits, self.cluster_size
        end = self.refcounts.high_water
        found: set[int] = set()
        seen: set[int] = set()
        for snap in list(self.snapshot_table):
            if snap.l1_table_offset % cs or snap.l1_size * 8 > MAX_L1_SIZE:
                continue
            raw = self.file.pread(snap.l1_table_offset, snap.l1_size * 8)
            for l1_entry in table_from_bytes(raw[:len(raw) & ~7]):
                l2_offset = l1_entry & L1E_OFFSET_MASK
                if not l2_offset or l2_offset % cs or l2_offset >> cb >= end:
                    continue
                if l2_offset >> cb in clusters:
                    found.add(l2_offset >> cb)
                if l2_offset in seen:
                    continue
                seen.add(l2_offset)
                for entry in table_from_bytes(self.file.pread_exact(l2_offset, cs)):
                    if entry & QCOW_OFLAG_COMPRESSED:
                        first, count = self._host_clusters(COMPRESSED, entry, 0)
                        found.update(c for c in range(first, first + min(count, 3))
                                     if c in clusters)
                    elif (entry & L2E_OFFSET_MASK) >> cb in clusters:
                        found.add((entry & L2E_OFFSET_MASK) >> cb)
        return found

    def _requeue(self, l1_sectors: list[tuple[int, bytes]], pending: list[int]) -> None:
        """Put back what a failed flush took: dirty L1 sectors and deferred decrements."""
        with self._l1_lock:
            base, size = self.header.l1_table_offset, len(self.l1)
            for offset, data in l1_sectors:
                first = (offset - base) // 8
                self.l1_dirty.update(range(first, min(size, first + len(data) // 8)))
        with self._alloc_lock:
            self.refcounts.deferred_frees.extend(pending)

    def _dirty_l1_sectors(self) -> list[tuple[int, bytes]]:
        """The dirty 512-byte sectors of the L1 table, as they are now.  Caller holds: L1 lock."""
        assert held(self._l1_lock), "Caller holds: the L1 lock"
        per_sector = 64
        out = []
        for sector in sorted({i // per_sector for i in self.l1_dirty}):
            lo = sector * per_sector
            out.append((self.header.l1_table_offset + lo * 8, table_to_bytes(self.l1[lo:lo + per_sector])))
        self.l1_dirty.clear()
        return out

    def _flush_everything(self) -> None:
        """Flush, including refcounts in lazy mode (before close or a table switch)."""
        self._flush_locked()
        if self.header.lazy_refcounts:
            with self._alloc_lock:
                self.refcounts.flush()
            self.file.flush()

    # Resize (grow) ---------------------------------------------------------
    def resize(self, new_size: int, *, shrink: bool = False,
               preallocation: str = "off") -> None:
        """Change the virtual size (exclusive).

        Growing grows the L1 table copy-on-write, then preallocates the new area
        when *preallocation* is ``metadata``, ``falloc`` or ``full`` (as ``qemu-img
        resize --preallocation``).  Shrinking (``shrink=True``, as ``qemu-img resize
        --shrink``) drops the active image's references to every cluster past the new
        end (snapshots keep theirs), then truncates the file after its last cluster
        in use.
        """
        self._resize(new_size, shrink=shrink, preallocation=preallocation, hide_backing=True)

    def _resize(self, new_size: int, *, shrink: bool, preallocation: str,
                hide_backing: bool) -> None:
        """:meth:`resize`; *hide_backing* False (for ``create`` only) lets the backing
        file show through the new area instead of zeroing it."""
        from .create import PREALLOCATION_MODES, preallocate
        if new_size < 0 or new_size % 512:
            raise OutOfRange("The new size must be a multiple of 512")
        if preallocation not in PREALLOCATION_MODES:
            raise OutOfRange(f"Invalid preallocation mode '{preallocation}'")
        if self.readonly:
            raise self._readonly_error()
        with self.exclusive():
            if self.closed:
                raise ClosedImage("I/O operation on a closed image")
            old_size = self.header.size
            shrinking = new_size < old_size
            backed = hide_backing and bool(self.header.backing_file)
            if new_size > old_size and backed:
                # The new area must read as zeros, not as the backing file (QEMU zeroes it).
                if not self.has_zero_flag:
                    raise UnsupportedFeature("Failed to zero out new clusters: Operation not "
                                             "supported")
                if self.backing is None:
                    raise UnsupportedFeature("cannot grow an image opened without its backing "
                                             "file")
            if shrinking:
                if not shrink:
                    raise Qcow2Error("Use the --shrink option to perform a shrink operation.")
                if preallocation != "off":
                    raise Qcow2Error("Preallocation can only be used for growing images")
                self._shrink(new_size)
            else:
                self._grow_l1(l1_entries_for(new_size, self.cluster_bits, self.l2_bits))
            self.file.pwrite(OFF_SIZE, struct.pack(">Q", new_size))
            self.file.flush()
            self.header.size = new_size
            if shrinking:
                self._truncate_after_last_cluster()
            elif new_size > old_size:
                if preallocation != "off":
                    preallocate(self, preallocation, old_size)
                if backed:
                    self.write_zeroes(old_size, new_size - old_size)
                    self._flush_locked()

    def _shrink(self, new_size: int) -> None:
        """Drop every reference of the active image past *new_size*.

        Caller holds: the image exclusively.
        """
        cs = self.cluster_size
        start = (new_size + cs - 1) & ~(cs - 1)
        keep_tables = l1_entries_for(start, self.cluster_bits, self.l2_bits)
        table_end = min(self.header.size, keep_tables << self.l1_shift)
        if start < table_end:  # the tail of the last table kept: unallocate its clusters
            self._for_each_table(start, table_end - start, None, None,
                                 lambda idx, guest, size, _: self._drop_clusters(idx, guest, size))
        for index in range(keep_tables, len(self.l1)):
            l2_offset = self._l2_offset(index)
            if not l2_offset:
                continue
            entry_obj = self.l2_cache.get(l2_offset)
            try:
                entries = list(entry_obj.table)
            finally:
                self.l2_cache.put(entry_obj)
            with self._alloc_lock:
                for entry in entries:
                    self._free_entry_later(entry)
                self.refcounts.free_later(l2_offset >> self.cluster_bits)
            self.l1[index] = 0
            self.l1_dirty.add(index)
        self._flush_everything()

    def _drop_clusters(self, l1_index: int, guest: int, length: int) -> None:
        """Make whole clusters of one table unallocated (full discard).  Caller holds: exclusive."""
        if not self._l2_offset(l1_index):
            return
        entry_obj = self._get_l2_for_write(l1_index)
        try:
            table = entry_obj.table
            first = (guest >> self.cluster_bits) & (self.l2_entries - 1)
            with self._alloc_lock:
                for i in range(first, first + (length >> self.cluster_bits)):
                    if table[i]:
                        self._free_entry_later(table[i])
                        table[i] = 0
                        entry_obj.dirty = True
        finally:
            self.l2_cache.put(entry_obj)

    def _truncate_after_last_cluster(self) -> None:
        """Cut the file after its last cluster with a refcount.  Caller holds: exclusive."""
        last = div_round_up(self.file.size(), self.cluster_size) - 1
        while last > 0 and not self.refcounts.get(last):
            last -= 1
        end = (last + 1) * self.cluster_size
        if end < self.file.size():
            self.file.truncate(end)
            self.file.flush()

    def _grow_l1(self, entries: int) -> None:
        """Give the L1 table at least *entries* entries: new table, sync, switch, free old.

        Caller holds: the image exclusively.
        """
        hdr = self.header
        if entries <= hdr.l1_size:
            return
        if entries * 8 > 32 * 1024 * 1024:
            raise Qcow2Error("Active L1 table too large")
        self._fire("l1_grow")
        self._flush_everything()
        new_table = array("Q", self.l1)
        new_table.extend([0] * (entries - len(new_table)))
        clusters = div_round_up(entries * 8, self.cluster_size)
        new_offset = self.refcounts.alloc_contiguous(clusters)
        if not hdr.lazy_refcounts:
            self.refcounts.flush()
        self._check_metadata_write(new_offset, entries * 8, -1)
        self.file.pwrite(new_offset, table_to_bytes(new_table))
        self.file.flush()
        old_offset, old_size = hdr.l1_table_offset, hdr.l1_size
        self.file.pwrite(OFF_L1_SIZE, struct.pack(">IQ", entries, new_offset))
        self.file.flush()
        hdr.l1_size, hdr.l1_table_offset = entries, new_offset
        self.l1 = new_table
        self._metadata_moved(None)
        if old_size:
            old_clusters = div_round_up(old_size * 8, self.cluster_size)
            self.refcounts.free_later(old_offset >> self.cluster_bits, old_clusters)
        self._flush_locked()

    # Snapshots (exclusive) ------------------------------------------------
    def snapshots(self) -> list[Snapshot]:
        """The internal snapshots, oldest first (``snapshot_table`` is the live list)."""
        return list(self.snapshot_table)

    def create_snapshot(self, name: str) -> Snapshot:
        """Take an internal snapshot named *name* (exclusive: in-flight requests drain)."""
        from . import snapshot
        return self._exclusive_change(lambda: self._refcounts_in_flux(
            lambda: snapshot.create(self, name)))

    def apply_snapshot(self, name: str) -> None:
        """Revert the image to the snapshot with id or name *name* (exclusive)."""
        from . import snapshot
        self._exclusive_change(lambda: self._refcounts_in_flux(lambda: snapshot.apply(self, name)))

    def delete_snapshot(self, name: str) -> None:
        """Delete the snapshot with id or name *name* (exclusive)."""
        from . import snapshot
        self._exclusive_change(lambda: self._refcounts_in_flux(lambda: snapshot.delete(self, name)))

    # Set when an operation that needed the dirty bit failed half-way: the dirty bit
    # then stays set on close, so the next read-write open rebuilds the refcounts.
    _needs_repair = False

    def _refcounts_in_flux(self, func: Callable[[], Any]) -> Any:
        """Run a snapshot operation inside a dirty-bit window (v3 images).

        A snapshot changes the refcounts of shared clusters and their OFLAG_COPIED
        flags, which live in other clusters: no write order keeps ``qemu-img check``
        clean at every instant in between (refcount 2 with COPIED set, or refcount 1
        without it).  So the dirty bit ("refcounts may be inconsistent", the lazy
        refcounts mechanism) is set and synced first, and cleared once everything is
        durable; a crash in between leaves an image that a read-write open or
        ``check -r all`` repairs.  Caller holds: the image exclusively.
        """
        hdr = self.header
        window = hdr.version >= 3 and not hdr.incompatible_features & INCOMPAT_DIRTY
        if window:
            self._flush_everything()
            self._write_incompatible(hdr.incompatible_features | INCOMPAT_DIRTY)
        try:
            result = func()
            if window:
                self._flush_everything()
        except OSError:  # (errors of validation come before any change)
            self._needs_repair = True  # flags may be half-updated: repair on next open
            raise
        if window:
            self._write_incompatible(hdr.incompatible_features & ~INCOMPAT_DIRTY)
        return result

    def _exclusive_change(self, func: Callable[[], Any]) -> Any:
        if self.readonly:
            raise self._readonly_error()
        with self.exclusive():
            if self.closed:
                raise ClosedImage("I/O operation on a closed image")
            try:
                return func()
            finally:
                self._attach_overlap()  # the structures may have moved or been replaced
                self._metadata_moved(None)

    def amend(self, *, compat: str | None = None, lazy_refcounts: bool | None = None,
              refcount_bits: int | None = None) -> None:
        """Change format options like ``qemu-img amend`` (exclusive); see :mod:`qcow2rw.amend`."""
        from .amend import amend
        self._exclusive_change(lambda: amend(self, compat=compat, lazy_refcounts=lazy_refcounts,
                                             refcount_bits=refcount_bits))

    # Check and repair (exclusive) --------------------------------------------
    def check(self, repair: str | None = None) -> Any:
        """Check the image like ``qemu-img check`` (``repair``: None, "leaks" or "all").

        Returns a :class:`qcow2rw.check.CheckResult` with qemu-img's figures.  Takes
        the image exclusively: in-flight requests drain first.
        """
        from .check import check_image
        if repair not in (None, "leaks", "all"):
            raise ValueError("repair must be None, 'leaks' or 'all'")
        if repair and self.readonly:
            raise self._readonly_error()
        with self.exclusive():
            if self.closed:
                raise ClosedImage("I/O operation on a closed image")
            overlap, self.overlap = self.overlap, None  # the checker has its own check
            try:
                result = check_image(self, repair)
            finally:
                self.overlap = overlap
                self._attach_overlap()
                self._metadata_moved(None)
            return result

    # Map and info ----------------------------------------------------------
    def block_status(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """Extents of this layer only: (kind, guest, length, host offset or L2 entry)."""
        self._check_range(offset, length)
        out: list[tuple[int, int, int, int]] = []
        with self._shared():
            pos = offset
            while pos < offset + length:
                chunk = min(offset + length - pos, ((pos >> self.l1_shift) + 1 << self.l1_shift) - pos)
                extents, pins = self._lookup(pos, chunk)
                self._unpin(pins)
                for ext in extents:
                    if out and out[-1][0] == ext[0] and ext[0] in (UNALLOCATED, ZERO_PLAIN):
                        out[-1] = (ext[0], out[-1][1], out[-1][2] + ext[2], 0)
                    else:
                        out.append(ext)
                pos += chunk
        return out

    def count_used_clusters(self, end_cluster: int, limit: int) -> int:
        """How many of the first *end_cluster* host clusters are in use, counting up to *limit*."""
        with self._shared(), self._alloc_lock:
            count = 0
            for cluster in range(end_cluster):
                if count >= limit:
                    break
                if self.refcounts.get(cluster):
                    count += 1
            return count

    def map(self) -> list[dict[str, Any]]:
        """The allocation map of the whole chain, as ``qemu-img map --output=json``."""
        from .mapping import chain_map
        return chain_map(self)

    def info(self) -> dict[str, Any]:
        """Image information with the keys of ``qemu-img info --output=json``."""
        if self.closed:  # (the descriptor number may belong to another file by now)
            raise ClosedImage("I/O operation on a closed image")
        hdr = self.header
        data: dict[str, Any]
        if hdr.version >= 3:
            data = {"compat": "1.1", "compression-type": COMPRESSION_NAMES[hdr.compression_type],
                    "lazy-refcounts": hdr.lazy_refcounts}
            bitmaps = bitmap_info(self.file, hdr)
            if bitmaps:
                data["bitmaps"] = bitmaps
            data.update({"refcount-bits": hdr.refcount_bits, "corrupt": hdr.corrupt,
                         "extended-l2": hdr.extended_l2})
        else:
            data = {"compat": "0.10", "compression-type": "zlib", "refcount-bits": hdr.refcount_bits}
        out: dict[str, Any] = {
            "virtual-size": hdr.size, "filename": self.path, "cluster-size": self.cluster_size,
            "format": "qcow2", "actual-size": self.file.allocated_bytes(),
            "format-specific": {"type": "qcow2", "data": data},
            "dirty-flag": bool(hdr.incompatible_features & INCOMPAT_DIRTY),
        }
        if hdr.backing_file:
            out["backing-filename"] = hdr.backing_file
            out["full-backing-filename"] = resolve_name(self.path, hdr.backing_file)
            if hdr.backing_format:
                out["backing-filename-format"] = hdr.backing_format
        if self.snapshot_table:
            out["snapshots"] = [s.info() for s in self.snapshot_table]
        return out

    # Close -----------------------------------------------------------------
    def close(self, timeout: float | None = None) -> None:
        """Drain requests (exclusive), flush everything, clear the dirty bit, close the files.

        The drain waits at most *timeout* seconds (:class:`~qcow2rw.locks.LockTimeout`),
        or with no timeout the image lock's watchdog (30 s by default), then raises
        :class:`~qcow2rw.locks.DrainTimeout` naming what is still held.  Either way the
        image stays open, untouched, and close() may be called again.  A close that an
        exception (an interrupt) cut short leaves the image not held; calling close()
        again finishes it.
        """
        if self.closed:
            # (Both idempotent: they finish a close that an interrupt cut short.)
            self.file.close()
            if self.backing is not None:
                self.backing.close()
            return

        def close_held() -> None:
            if self.closed:
                return
            try:
                if not self.readonly:
                    self._flush_everything()
                    if self.header.incompatible_features & INCOMPAT_DIRTY and not self._needs_repair:
                        self._write_incompatible(self.header.incompatible_features & ~INCOMPAT_DIRTY)
            finally:
                self.closed = True
                self.file.close()
                if self.backing is not None:
                    self.backing.close()

        # run(), not "with": no interrupt (a Ctrl-C during shutdown) can leave the image
        # held exclusively (see ExclusiveHold).
        self.exclusive(timeout).run(close_held)

    def aio(self, workers: int = 8) -> Any:
        """A :class:`qcow2rw.aio.AioImage` thread pool over this image (it stays ours)."""
        from .aio import AioImage
        return AioImage(self, workers=workers)

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("ro" if self.readonly else "rw")
        return f"<qcow2rw.Image {self.path!r} {self.header.size} bytes {state} {self.lock_mode}>"


def _wait_for_allocation(record: Gate, cancel: CancelToken | None) -> None:
    """Wait until the allocation in flight behind *record* is linked or given up; a
    cancelled request stops waiting (it has changed nothing yet).

    Caller holds: no lock at all (the allocating request needs the table's lock).
    """
    if cancel is None:
        record.wait()
        return
    while not record.wait(CANCEL_POLL_SECONDS):
        cancel.check()
    cancel.check()


def _read_first_cluster(file: HostFile) -> bytes:
    buf = file.pread(0, 65536)
    if len(buf) >= 24:
        cluster_bits = int.from_bytes(buf[20:24], "big")
        if 16 < cluster_bits <= 21 and len(buf) == 65536:
            buf = file.pread(0, 1 << cluster_bits)
    return buf


def _refuse_tables_past_end(header: Header, file_size: int) -> None:
    """Stricter than QEMU (which reads zeros there): an active L1 table or a refcount
    table that starts at or past the end of the file makes the image unusable (every
    refcount would read 0, so allocations would land on metadata)."""
    if header.l1_size and header.l1_table_offset >= file_size:
        raise FormatError("Active L1 table lies beyond the end of the file")
    if header.refcount_table_offset >= file_size:
        raise FormatError("Reference count table lies beyond the end of the file")


def open_image(path: str | os.PathLike[str], *, readonly: bool = False, backing: bool = True,
               lock_mode: str = "fine", cache_size: int | None = None, force_share: bool = False,
               chain: tuple[str, ...] = (), lock: bool = True,
               overlap_check: bool | str = True, check_mode: bool = False) -> Image:
    """Open a qcow2 image (see :func:`qcow2rw.open`).

    *overlap_check*: QEMU's ``overlap-check`` (True or "cached", "constant", "all",
    False or "none"); see :mod:`qcow2rw.overlap`.  *check_mode* opens the image the
    way ``qemu-img check`` does (QEMU's ``BDRV_O_CHECK``): the header is parsed
    leniently (an empty refcount table and a bad snapshot-table pointer are left for
    the check to report), a snapshot table that cannot be read does not refuse the
    open, and a read-write open accepts the corrupt bit, keeps the autoclear bits and
    does not repair a dirty image (the check reports and repairs all that).
    """
    if lock_mode not in LOCK_MODES:
        raise ValueError(f"lock_mode must be one of {', '.join(LOCK_MODES)}, not {lock_mode!r}")
    mode_of(overlap_check)  # refuse a bad value before touching the file
    path = os.fspath(path)
    file = HostFile(path, readonly=readonly, force_share=force_share, lock=lock)
    try:
        header = parse_header(_read_first_cluster(file), check_mode=check_mode)
        if not readonly and header.corrupt and not check_mode:
            raise CorruptImage("qcow2: Image is corrupt; cannot be opened read/write")
        if not check_mode:
            _refuse_tables_past_end(header, file.size())
        compress.require(header.compression_type)
        img = Image(file, header, path=path, readonly=readonly, cache_size=cache_size,
                    lock_mode=lock_mode, backing=backing, force_share=force_share,
                    chain=chain or (os.path.realpath(path),), check_mode=check_mode,
                    overlap_check=overlap_check)
    except BaseException:
        file.close()
        raise
    if not readonly and not check_mode:
        try:
            img._prepare_for_writing()
        except BaseException:
            # Close without flushing and without clearing the dirty bit: a repair that
            # failed leaves the image as dirty as it was (QEMU keeps the bit too).
            img.readonly = True
            img.close()
            raise
    img._open = True
    return img
