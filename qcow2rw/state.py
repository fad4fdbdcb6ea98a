"""The shared state of an open image (what QEMU keeps in ``BDRVQcow2State``).

:class:`ImageState` is what every engine module works on: the header, the host file,
the geometry, the lock set, the L1 table, the L2 cache, the refcount manager, the
overlap map, the in-use pins, the snapshot table, the backing file, the flags and
the event points; plus the small helpers every mechanism needs (event points, L1
and L2 entry checks, pins, the corruption report, the overlap checks, the header's
incompatible-features field).  The mechanisms live beside it and take the state:
:mod:`.cluster` (lookup, reads, the write plan, zeroing), :mod:`.writeback` (flush
and write-back order), :mod:`.resize`, :mod:`.snapshot`, :mod:`.check`,
:mod:`.rebuild`, :mod:`.amend`.  The public :class:`~qcow2rw.image.Image` owns one.

Every field's comment says what guards it; the locks, their order and the rule "an
exclusive holder needs no inner lock" are written once, in :mod:`qcow2rw.locks`.
"""

from __future__ import annotations

import threading
from array import array
from typing import Any, NoReturn, Protocol

from .backing import BackingSource
from .cache import MetadataCache
from .cancel import MAX_RUN_BYTES
from .errors import (CorruptImage, FormatError, OutOfRange, ReadOnlyImage, SyncFailed,
                     UnsupportedFeature)
from .events import EventPoints
from .format import (COMPRESSED, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, L1E_OFFSET_MASK, L2E_OFFSET_MASK,
                     MAX_SNAPSHOTS_SIZE, NORMAL, OFF_INCOMPATIBLE, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED,
                     QCOW_OFLAG_ZERO, UNALLOCATED, ZERO_ALLOC, ZERO_PLAIN, Header, Snapshot,
                     compressed_host_range, l2_table_from_bytes, l2_table_to_bytes,
                     parse_snapshot_table, table_from_bytes)
from .imagelock import ExclusiveHold, ImageLock
from .locks import DEBUG_LOCKS, OwnedLock, held, inner_locks
from .overlap import ACTIVE_L2, REFCOUNT_BLOCK, REFCOUNT_TABLE, OverlapMap, mode_of
from .refcount import RefcountManager
from .storage import HostFile

__all__ = ["DEFAULT_CACHE_SIZE", "FOUND", "MARKING", "NON_FATAL", "TURNED_READONLY", "ImageState",
           "L1Table", "MIN_CACHE_ENTRIES", "StateOwner", "corruption_message", "state_of"]

DEFAULT_CACHE_SIZE = 32 * 1024 * 1024  # bytes of L2 tables; refcount blocks get a quarter
MIN_CACHE_ENTRIES = 8

_INCOMPATIBLE = OFF_INCOMPATIBLE  # (the field is one big-endian u64)


class L1Table:
    """The active L1 table: its entries, its dirty set and its lock, in one object.

    ``lock`` (the L1 lock, place 3 of the lock order) guards ``entries`` (new or
    copied-on-write L2 tables are linked under it) and ``dirty`` (indexes changed
    since the last write-back of their sector).  ``entries`` itself is replaced (a
    grown table, a snapshot's table) only with the image held exclusively; the fast
    path reads it with no lock (an L1 entry is one word; see ``Image._fast_io``).
    """

    __slots__ = ("dirty", "entries", "lock")

    def __init__(self, entries: array, lock: Any) -> None:
        self.entries = entries
        self.dirty: set[int] = set()
        self.lock = lock


class ImageState:
    """The state of one open image, shared by the engine modules.

    Constructed by :class:`~qcow2rw.image.Image` (which sets :attr:`backing` once the
    chain is open, and the L2 cache's write-back hook from :mod:`.writeback`).
    """

    def __init__(self, file: HostFile, header: Header, *, path: str, readonly: bool,
                 cache_size: int | None, lock_mode: str, check_mode: bool = False,
                 overlap_check: bool | str = True, data_file: HostFile | None = None) -> None:
        # Fixed at open (no lock needed) ----------------------------------------------
        self.path = path
        #: Opened for qemu-img check (QEMU's BDRV_O_CHECK).
        self.check_mode = check_mode
        self.lock_mode = lock_mode
        self.file = file  # positional I/O: HostFile's own locks guard its sync state
        self.fd = file.fd
        hdr = header
        self.cluster_bits = hdr.cluster_bits
        self.cluster_size = hdr.cluster_size
        self.l2_bits = hdr.l2_bits
        self.l2_entries = 1 << hdr.l2_bits
        self.l1_shift = hdr.cluster_bits + hdr.l2_bits
        self.cs_mask = hdr.cluster_size - 1
        self.l2_mask = self.l2_entries - 1
        self.has_zero_flag = hdr.version >= 3
        self.run_clusters = max(1, MAX_RUN_BYTES >> hdr.cluster_bits)
        self.coffset_mask = (1 << (62 - (hdr.cluster_bits - 8))) - 1  # compressed host offset
        #: Extended L2 entries: tables are :class:`~qcow2rw.format.ExtendedL2Table`
        #: (descriptors and subcluster bitmaps); 32 subclusters of this many bits.
        self.extended = hdr.extended_l2
        self.subcluster_bits = hdr.cluster_bits - 5
        #: An external data file (incompatible bit 2, :mod:`qcow2rw.datafile`): guest
        #: data at host offset = guest offset in ``datafile``, not refcounted, offset 0
        #: valid (with OFLAG_COPIED).  ``datafile`` is the host file of every guest data
        #: I/O: the image file itself without an external data file, None when the
        #: image was opened for metadata only without it.
        self.external = bool(hdr.incompatible_features & INCOMPAT_DATA_FILE)
        self.datafile: HostFile | None = data_file if self.external else file
        if self.external and data_file is not None and hdr.extended_l2:
            raise UnsupportedFeature("External data files with extended L2 entries are not "
                                     "supported yet (open with metadata_only=True for info, "
                                     "map and check)")

        # The lock set (what each guards: qcow2rw.locks, written once) ---------------
        #: The global image lock: shared by requests, exclusive by snapshot, resize,
        #: check, amend and close.  Guards the image's shape: header fields, the L1
        #: table's location and size, the snapshot table, the caches' existence.
        self.glock = ImageLock(lock_mode)
        #: One flush at a time: guards the flush sequence (taken right after glock).
        self.flush_lock = threading.Lock()
        l1_lock, alloc_lock, entry_lock = inner_locks(lock_mode)
        #: The allocator lock: guards the refcount manager (allocation and the refcount
        #: increment that claims a cluster are one step) and the lazy-refcount dirty bit.
        self.alloc_lock: Any = alloc_lock
        #: The refcount I/O lock: one write-back of the refcount structures at a time,
        #: held across its writes (the order needs it: an older copy of a block must not
        #: land after a newer one), never around the allocator lock's I/O-free work.
        #: Taken after an L2 entry lock, before the allocator lock; in rwlock mode the
        #: metadata mutex itself, in mutex mode nothing.
        self.refcount_io_lock: Any = (alloc_lock if lock_mode != "fine"
                                      else OwnedLock() if DEBUG_LOCKS else threading.Lock())

        # Header, guarded by glock (shape); the incompatible-features field also by the
        # allocator lock (the lazy-refcount dirty bit), see mark_dirty.
        self.header = header
        #: Set when this session found corruption (the first message); any thread.
        self.corrupt_event: str | None = None
        #: Flags: written by the exclusive holder (close) or once (corruption, a
        #: failed open); read by requests with no lock.
        self._readonly = readonly
        self.closed = False
        #: The thread holding glock exclusively (ExclusiveHold sets and clears it in
        #: the same step as the take and the release), else None.
        self.exclusive_owner: int | None = None
        #: False while the image is being opened (nobody else has it yet): the debug
        #: checks of "Caller holds" contracts start once open_image returns it.
        self.open = False
        #: Set when an operation that needed the dirty bit failed half-way: the dirty
        #: bit then stays set on close, so the next read-write open rebuilds the
        #: refcounts.  Written by the exclusive holder.
        self.needs_repair = False
        #: Event points (set by tests; None: free), read with no lock.
        self.events: EventPoints | None = None

        # In-use pins: no lock.  A list of (first cluster, count) ranges with data I/O
        # in flight, changed only by single extend/append/remove calls, which are
        # atomic; each request also keeps the ranges it added in a list of its own, in
        # the same step, so an interrupted request gives back exactly what it took.
        self.track_use = lock_mode != "mutex"
        self.in_use: list[tuple[int, int]] = []
        #: ``in_use`` where in-use counts are kept (not in mutex mode), else None.
        self.pins: list[tuple[int, int]] | None = self.in_use if self.track_use else None

        # Metadata -------------------------------------------------------------------
        cache_bytes = DEFAULT_CACHE_SIZE if cache_size is None else cache_size
        l2_capacity = max(MIN_CACHE_ENTRIES, cache_bytes // self.cluster_size)
        #: The active L1 table: entries and dirty set guarded by ``l1.lock``.
        self.l1 = L1Table(self._read_l1(), l1_lock)
        #: The L2 cache: each table guarded by its CacheEntry.lock (entries, dirty flag,
        #: data mark, refcount need, in-flight allocation records); the cache's map,
        #: LRU order and pin counts by its own LRU lock.  Its write-back hook
        #: (writeback.before_l2_writeback) is set by the Image.
        self.l2_cache = MetadataCache("L2", l2_capacity, self.load_l2, self.store_l2, entry_lock)
        #: The refcount table and blocks, the allocator: guarded by ``alloc_lock``
        #: (their write-back by ``refcount_io_lock``).  Replaced (check, amend) only
        #: by the exclusive holder.
        self.refcounts = RefcountManager(file, hdr, max(MIN_CACHE_ENTRIES, l2_capacity // 4),
                                         self.in_use)
        self.l2_cache.fire = file.fire = self.fire  # (refcount stores fire refblock_update)
        #: The snapshot table (glock: replaced by the exclusive holder only).
        self.snapshot_table: list[Snapshot] = self._read_snapshots()
        mode = mode_of(overlap_check)
        #: QEMU's overlap check (its own lock, a leaf); None when off.  Swapped out by
        #: the exclusive holder while the checker runs (it has its own check).
        self.overlap: OverlapMap | None = OverlapMap(self, mode) if mode != "none" else None
        self.attach_overlap()
        #: The backing file (opened after the state, by the Image); read-only to us.
        self.backing: BackingSource | None = None
        #: The persistent bitmaps a read-write open keeps valid
        #: (:class:`~qcow2rw.bitmaps.MaintainedBitmaps`, its own lock), or None.
        self.bitmaps: Any = None

    # Opening -----------------------------------------------------------------------
    def _read_l1(self) -> array:
        hdr = self.header
        return table_from_bytes(self.file.pread_exact(hdr.l1_table_offset, hdr.l1_size * 8))

    def _read_snapshots(self) -> list[Snapshot]:
        hdr = self.header
        if not hdr.nb_snapshots:
            return []
        # An entry is at most 40 + 1024 + 2 * 65535 bytes: read growing chunks until parsed.
        limit = MAX_SNAPSHOTS_SIZE
        length = min(hdr.nb_snapshots * 1024, limit)
        while True:
            buf = self.file.pread(hdr.snapshots_offset, length)
            try:
                return parse_snapshot_table(buf, hdr.nb_snapshots)
            except FormatError:
                if len(buf) < length or length >= limit:
                    if self.check_mode:
                        return []  # the check reports (and -r all repairs) the table
                    raise
                length = min(length * 4, limit)

    # Flags ---------------------------------------------------------------------------
    @property
    def readonly(self) -> bool:
        """True if opened read-only, or turned read-only by a failed fsync."""
        return (self._readonly or self.file.sync_error is not None
                or (self.datafile is not None and self.datafile.sync_error is not None))

    @readonly.setter
    def readonly(self, value: bool) -> None:
        self._readonly = value

    @property
    def opened_readonly(self) -> bool:
        """Read-only by the open (or by corruption), not by a failed fsync."""
        return self._readonly

    def readonly_error(self) -> ReadOnlyImage:
        """The error for a write to a read-only image (saying why it is read-only)."""
        if self.corrupt_event is not None:
            return CorruptImage(f"'{self.path}' was marked corrupt ({self.corrupt_event}): "
                                "it can be written again after 'check -r all'")
        failed = self.file.sync_error
        if failed is None and self.datafile is not None:
            failed = self.datafile.sync_error
        if failed is not None and not self._readonly:
            return SyncFailed(f"'{self.path}' turned read-only: an fsync of the host file "
                              f"failed ({failed}); writes since the last "
                              "successful flush may be lost")
        return ReadOnlyImage(f"'{self.path}' is open read-only")

    def check_range(self, offset: int, length: int) -> None:
        """Refuse a request outside the virtual disk (:class:`OutOfRange`)."""
        if offset < 0 or length < 0 or offset + length > self.header.size:
            raise OutOfRange(f"request [{offset}, {offset + length}) is outside the "
                             f"{self.header.size}-byte disk")

    # Locking -------------------------------------------------------------------------
    def exclusive(self, timeout: float | None = None, gives: Any = None) -> ExclusiveHold:
        """Hold the image exclusively (see :meth:`qcow2rw.image.Image.exclusive`);
        ``with`` gives *gives* (the Image), or this state."""
        if self.exclusive_owner == threading.get_ident():
            return self.glock.exclusive(timeout, owner=self, gives=gives, nested=True)
        return self.glock.exclusive(timeout, owner=self, gives=gives, describe=self.describe)

    def describe(self) -> str:
        """What may be holding up an exclusive take: pins, pinned tables, records."""
        parts = []
        pins = list(self.in_use)
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

    def fire(self, name: str) -> None:
        """Fire event point *name* (free when no events are set)."""
        events = self.events
        if events is not None:
            events.fire(name)

    def pin(self, held: list[tuple[int, int]], ranges: list[tuple[int, int]]) -> None:
        """Mark host cluster ranges (first, count) in use: data I/O is about to run on them.

        *held* is the caller's record of its pins (a list it made before calling): the
        ranges go into it and into ``in_use`` in one step no interrupt can split, so
        ``held`` always lists exactly the caller's pins for :meth:`unpin`.
        Caller holds: the L2 lock under which the clusters were looked up, so none of
        them can have been freed yet; the allocator skips them until :meth:`unpin`.
        """
        if self.track_use:
            held += ranges  # (no call until the extend has run: one step)
            self.in_use.extend(ranges)

    def unpin(self, held: list[tuple[int, int]]) -> None:
        """Drop the in-use marks noted in *held* (by :meth:`pin`), emptying it.

        One mark at a time leaves both lists at once, so after an interrupt *held*
        still lists exactly the marks left: calling again finishes the job.
        """
        in_use = self.in_use
        while held:
            pin = held[-1]
            del held[-1]  # (no call until the remove has run: one step)
            in_use.remove(pin)

    # The overlap map and the refcount manager's hooks ---------------------------------
    def attach_overlap(self) -> None:
        """Give the refcount manager its hooks (again after check or amend replaced it):
        the overlap checks and reports, the corruption report, the growth policy, the
        debug contract check and the event points."""
        overlap = self.overlap
        refcounts = self.refcounts
        refcounts.fire = self.fire
        refcounts.before_write = None if overlap is None else self.check_metadata_write
        refcounts.on_change = None if overlap is None else self.metadata_moved
        refcounts.on_table_added = None if overlap is None else self._reftable_added
        refcounts.on_table_dropped = None if overlap is None else self._reftable_dropped
        refcounts.on_corruption = self.signal_corruption
        refcounts.defer_growth = self._defer_growth
        refcounts.check_caller = self._check_allocator_caller if DEBUG_LOCKS else None

    def _check_allocator_caller(self) -> None:
        """Debug mode: the refcount manager's contract (its caller holds the allocator
        lock, or the image exclusively; the image being opened or closed is nobody
        else's yet, or any more)."""
        if not (held(self.alloc_lock) or self.exclusive_owner == threading.get_ident()
                or not self.open):
            raise AssertionError("the refcount manager used without the allocator lock "
                                 "or the image held exclusively")

    def _defer_growth(self) -> bool:
        """A refcount table growth waits for the next write-back, except when the
        image is held exclusively (exclusive operations expect it on disk at once)."""
        return self.exclusive_owner is None

    def metadata_moved(self, offset: int | None) -> None:
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

    def check_data_write(self, offset: int, length: int) -> None:
        """QEMU's overlap check before guest data (or COW) reaches [offset, offset+length)
        (none for an external data file: no metadata lives there)."""
        overlap = self.overlap
        if overlap is not None and not self.external:
            name = overlap.find(offset, length)
            if name is not None:
                self.signal_corruption(f"Preventing invalid write on metadata (overlaps with "
                                       f"{name})")

    def check_metadata_write(self, offset: int, length: int, kind: int) -> None:
        """The overlap check before metadata of *kind* is written back at *offset*."""
        overlap = self.overlap
        if overlap is not None:
            name = overlap.find(offset, length, kind)
            if name is not None:
                self.signal_corruption(f"Preventing invalid write on metadata (overlaps with "
                                       f"{name})")

    # Corruption ----------------------------------------------------------------------
    def signal_corruption(self, message: str) -> NoReturn:
        """qcow2_signal_corruption(): mark the image corrupt (incompatible bit 1) and fail.

        A read-write image gets the corrupt bit on disk, is flushed no more (its
        metadata is not trusted) and refuses every later write with
        :class:`CorruptImage`; it then opens read-only only, until ``check -r all``
        repairs it.  A read-only image just fails the request.  Caller holds: any
        locks (this takes none: it sets the bit in memory first, then writes the
        header field, so a concurrent dirty-bit update carries it too).
        (The checker's report, QEMU's check-mode behaviour, is
        ``rebuild.RefcountRebuild.signal_corruption``; both use :meth:`mark_corrupt`
        and :func:`corruption_message`.)
        """
        writable = not self.readonly and not self.check_mode
        if self.corrupt_event is None:
            self.corrupt_event = message
        if writable and self.header.version < 3:  # no room for the bit: in memory only
            self.readonly = True
            raise CorruptImage(corruption_message(message, TURNED_READONLY))
        if writable:
            self.readonly = True
            try:
                self.mark_corrupt()
            except OSError:
                pass  # the request fails anyway; the image stays read-only in memory
            raise CorruptImage(corruption_message(message, MARKING))
        raise CorruptImage(corruption_message(message, FOUND))

    def mark_corrupt(self) -> None:
        """Set the corrupt bit: in memory first (so a concurrent dirty-bit update
        carries it too), then the header field, synced.  A v2 header has no such field
        (its bytes 72.. are the header extensions): in memory only, as QEMU's
        qcow2_update_header writes none for v2.  Caller holds: any locks."""
        value = self.header.incompatible_features | INCOMPAT_CORRUPT
        self.header.incompatible_features = value
        if self.header.version >= 3:
            self.file.pwrite(_INCOMPATIBLE, value.to_bytes(8, "big"))
            self.file.flush()

    def mark_dirty(self) -> None:
        """Set the dirty bit (lazy refcounts) before the first unaccounted L2 link.

        Caller holds: no metadata lock (this takes the allocator lock).
        """
        if self.header.incompatible_features & INCOMPAT_DIRTY:
            return
        with self.alloc_lock:
            if not self.header.incompatible_features & INCOMPAT_DIRTY:
                self.write_incompatible(self.header.incompatible_features | INCOMPAT_DIRTY)

    def write_incompatible(self, value: int) -> None:
        """Write the incompatible-features field (one small write) and sync it (a v2
        header has none: in memory only, see :meth:`mark_corrupt`)."""
        if self.header.version >= 3:
            self.file.pwrite(_INCOMPATIBLE, value.to_bytes(8, "big"))
            self.file.flush()
        self.header.incompatible_features = value

    # L1 and L2 entries ---------------------------------------------------------------
    def load_l2(self, offset: int) -> array:
        """The L2 cache's loader.  Caller holds: the entry's lock (see MetadataCache)."""
        self.fire("l2_load")
        return l2_table_from_bytes(self.file.pread_exact(offset, self.cluster_size),
                                   self.extended)

    def store_l2(self, offset: int, table: array) -> None:
        """The L2 cache's store.  Caller holds: the entry's lock (see MetadataCache)."""
        if self.overlap is not None:
            self.check_metadata_write(offset, self.cluster_size, ACTIVE_L2)
        self.file.pwrite(offset, l2_table_to_bytes(table))

    def l2_offset(self, l1_index: int) -> int:
        """The L2 table offset of L1 entry *l1_index* (0: none); damage marks corrupt."""
        offset = self.l1.entries[l1_index] & L1E_OFFSET_MASK
        if offset % self.cluster_size:
            self.signal_corruption(f"L2 table offset {offset:#x} unaligned (L1 index: "
                                   f"{l1_index:#x})")
        if offset >> self.cluster_bits >= self.refcounts.high_water and offset:
            # Stricter than QEMU, which reads such a table as zeros.
            self.signal_corruption(f"L2 table offset {offset:#x} beyond the end of the image "
                                   f"file (L1 index: {l1_index:#x})")
        return offset

    def classify(self, entry: int) -> int:
        """The kind of cluster an L2 entry describes (``format.NORMAL`` ...).

        Damage found here marks the image corrupt, as QEMU does: an unaligned host
        offset, a zero flag in a v2 image; and, stricter than QEMU (which reads zeros
        there and may later allocate the same cluster twice), a host offset at or
        past the end of the file.
        """
        if entry & QCOW_OFLAG_COMPRESSED:
            if (entry & self.coffset_mask) >> self.cluster_bits >= self.refcounts.high_water:
                self.signal_corruption(f"Compressed cluster descriptor {entry:#x} points beyond "
                                       "the end of the image file")
            return COMPRESSED
        offset = entry & L2E_OFFSET_MASK
        if entry & QCOW_OFLAG_ZERO and not self.extended:  # (bit 0 unused when extended)
            if not self.has_zero_flag:
                self.signal_corruption(f"Zero cluster entry found in pre-v3 image (L2 entry: "
                                       f"{entry:#x})")
            kind = ZERO_ALLOC if offset else ZERO_PLAIN
        else:
            # Offset 0 is valid in an external data file, told apart by OFLAG_COPIED
            # (every data cluster there has "refcount 1"): qcow2_get_cluster_type.
            kind = (NORMAL if offset or (self.external and entry & QCOW_OFLAG_COPIED)
                    else UNALLOCATED)
        if offset:
            if offset % self.cluster_size:
                self.signal_corruption(f"Cluster allocation offset {offset:#x} unaligned")
            if offset >> self.cluster_bits >= self.refcounts.high_water and not self.external:
                self.signal_corruption(f"Cluster allocation offset {offset:#x} beyond the end "
                                       "of the image file")
        return kind

    def host_clusters(self, kind: int, where: int, length: int) -> tuple[int, int]:
        """(first host cluster, count) that an extent's data I/O touches."""
        cb = self.cluster_bits
        if kind == COMPRESSED:
            where, length = compressed_host_range(where, cb)
        return where >> cb, ((where + length - 1) >> cb) - (where >> cb) + 1


#: How a corruption event is reported (QEMU's texts): see :func:`corruption_message`.
MARKING, NON_FATAL, FOUND, TURNED_READONLY = "marking", "non-fatal", "found", "turned-read-only"


def corruption_message(message: str, how: str) -> str:
    """QEMU's text for a corruption event: the image being marked corrupt (MARKING);
    found corrupt in check mode, the event not fatal (NON_FATAL); found corrupt by a
    request on an image we do not mark (FOUND); or a v2 image, which has no corrupt
    bit, turned read-only in memory (TURNED_READONLY)."""
    if how == MARKING:
        return (f"qcow2: Marking image as corrupt: {message}; further corruption events "
                "will be suppressed")
    if how == NON_FATAL:
        return (f"qcow2: Image is corrupt: {message}; further non-fatal corruption events "
                "will be suppressed")
    if how == TURNED_READONLY:
        return f"qcow2: Image is corrupt: {message}; the image turned read-only"
    return f"qcow2: Image is corrupt: {message}"


class StateOwner(Protocol):
    """What owns an image's state: the public :class:`~qcow2rw.image.Image`."""

    state: ImageState


def state_of(image: ImageState | StateOwner) -> ImageState:
    """The state of *image* (an Image, or a state already)."""
    return image if isinstance(image, ImageState) else image.state
