"""The write-back of the refcount structures: blocks, table sectors, a table growth.

Refcount changes are made in memory (:class:`~qcow2rw.refcount.RefcountManager`,
under the allocator lock) and reach the file through one protocol, kept here:

1. :meth:`RefcountWriteback.take_writeback` (allocator lock held): the dirty blocks
   as bytes, pinned; the dirty table sectors, or a prepared growth with its whole
   new table; recorded in ``taken`` before anything is taken.
2. :meth:`RefcountWriteback.run_writeback` (the refcount I/O lock alone, so that
   allocations go on): blocks, then a sync, then the table entries that point to
   them; for a growth the new table, sync, the header switch, sync.
3. :meth:`RefcountWriteback.finish_writeback` or, if the writes failed or were cut
   off, :meth:`RefcountWriteback.abort_writeback` (allocator lock held again).

:meth:`RefcountWriteback.flush` runs all three with the allocator lock held, for
exclusive operations.  :class:`RefcountWriteback` is the manager's base class: the
fields it uses are the manager's, declared below with what guards them there.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import Any

from .cache import CacheEntry, MetadataCache
from .format import OFF_REFCOUNT_TABLE_OFFSET, REFTABLE_POINTER, Header, table_to_bytes
from .overlap import REFCOUNT_BLOCK, REFCOUNT_TABLE
from .storage import HostFile


class Growth:
    """A refcount table growth prepared in memory, not yet on disk.

    ``table_offset``/``table_clusters`` are where the new table goes; ``frees`` lists
    the (offset, clusters) of the tables it replaces (the live one, and any grown in
    memory meanwhile), freed once the header points at the new one.
    """

    __slots__ = ("table_offset", "table_clusters", "frees")

    def __init__(self, table_offset: int, table_clusters: int,
                 frees: list[tuple[int, int]]) -> None:
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self.frees = frees


class Writeback:
    """What one write-back of the refcount structures writes, taken under the
    allocator lock: (entry, version, bytes) of each dirty block, the cache pins on
    them (``pinned``, a :meth:`MetadataCache.release` record, kept until the job
    ends), dirty table sectors (offset, bytes) or a growth with its whole table, and
    the increment count it makes durable."""

    __slots__ = ("blocks", "pinned", "sectors", "growth", "table_bytes", "increments", "mark")

    def __init__(self, increments: int) -> None:
        self.blocks: list[tuple[Any, int, bytes]] = []
        self.pinned: list[CacheEntry] = []
        self.sectors: list[tuple[int, bytes]] = []
        self.growth: Growth | None = None
        self.table_bytes = b""
        self.increments = increments
        self.mark = -1



class RefcountWriteback:
    """The refcount write-back protocol (see the module docstring); the base of
    :class:`~qcow2rw.refcount.RefcountManager`, whose fields these are (its
    docstring says what guards them: the allocator lock, and the refcount I/O lock
    for :meth:`run_writeback`)."""

    file: HostFile
    header: Header
    cache: MetadataCache
    cluster_bits: int
    cluster_size: int
    reftable: array
    reftable_dirty: set[int]
    table_offset: int
    increments: int
    flushed_increments: int
    written_mark: int
    pending_growth: Growth | None
    committing: Growth | None
    taken: Writeback | None
    deferred_frees: list[int]
    fire: Callable[[str], None] | None
    before_write: Callable[[int, int, int], None] | None
    on_table_dropped: Callable[[int, int], None] | None
    check_caller: Callable[[], None] | None

    def flush(self) -> bool:
        """Write dirty blocks, then (after a sync) dirty refcount-table entries, or
        commit a growth; all with the allocator lock held (exclusive operations).

        Returns True if anything was written.  The caller syncs afterwards before
        writing anything that depends on these refcounts.
        """
        try:
            job = self.take_writeback()
            if job is None:
                return False
            self.run_writeback(job)
            self.finish_writeback()
        except BaseException:
            self.abort_writeback()
            raise
        return True

    def take_writeback(self) -> Writeback | None:
        """Take what is to be written, as bytes; None if nothing.

        The job is recorded in :attr:`taken` before anything is taken, so whatever
        an interrupt cuts off, :meth:`abort_writeback` puts back.  The dirty blocks
        stay dirty (and pinned, so never evicted and reloaded stale) until
        :meth:`finish_writeback` finds them unchanged since.
        Caller holds: the allocator lock, and the refcount I/O lock (one write-back
        at a time: an older copy of a block never lands after a newer one).
        """
        if self.check_caller is not None:
            self.check_caller()
        if self.taken is not None:  # one that an interrupt cut off: undo it first
            self.abort_writeback()
        job = Writeback(self.increments)
        self.taken = job
        self.cache.pin_dirty(job.pinned)
        growth = self.pending_growth
        if not job.pinned and not self.reftable_dirty and growth is None:
            self.taken = None
            self.flushed_increments = self.increments
            return None
        job.blocks = [(entry, entry.table.version, entry.table.to_bytes()) for entry in job.pinned]
        if growth is not None:
            job.table_bytes = table_to_bytes(self.reftable)
            job.growth = growth
            self.pending_growth, self.committing = None, growth
        else:
            per_sector = 64
            for sector in sorted({i // per_sector for i in self.reftable_dirty}):
                lo = sector * per_sector
                job.sectors.append((self.table_offset + lo * 8,
                                    table_to_bytes(self.reftable[lo:lo + per_sector])))
        self.reftable_dirty.clear()
        return job

    def run_writeback(self, job: Writeback) -> None:
        """Write what :meth:`take_writeback` took: blocks, then (after a sync) the table
        entries; for a growth the new table, sync, the header switch, sync.

        Caller holds: the refcount I/O lock; the allocator lock is not needed.
        """
        check = self.before_write
        for entry, _version, data in job.blocks:
            if self.fire is not None:
                self.fire("refblock_update")
            if check is not None:
                check(entry.offset, self.cluster_size, REFCOUNT_BLOCK)
            self.file.pwrite(entry.offset, data)
        growth = job.growth
        if growth is not None:
            self.file.flush()  # every block the new table names, before it
            if check is not None:
                check(growth.table_offset, len(job.table_bytes), REFCOUNT_TABLE)
            self.file.pwrite(growth.table_offset, job.table_bytes)
            self.file.flush()
            self.file.pwrite(OFF_REFCOUNT_TABLE_OFFSET,
                             REFTABLE_POINTER.pack(growth.table_offset, growth.table_clusters))
            self.file.flush()
        elif job.sectors:
            self.file.flush()  # blocks before the table entries that point to them
            for offset, data in job.sectors:
                if check is not None:
                    check(offset, len(data), REFCOUNT_TABLE)
                self.file.pwrite(offset, data)
        job.mark = self.file.sync_mark()

    def finish_writeback(self) -> None:
        """End the write-back taken (:attr:`taken`), which was written: mark what was
        written clean (blocks unchanged since taken), switch to a committed growth's
        table and queue the old tables' frees.

        Every step before the job is let go can be done again, so an interrupt
        anywhere is undone by :meth:`abort_writeback` (a growth is then committed
        again, the same way); after it, an interrupt can only leak the old tables.
        Caller holds: the allocator lock (and the refcount I/O lock).
        """
        if self.check_caller is not None:
            self.check_caller()
        job = self.taken
        if job is None:
            return
        for entry, version, _data in job.blocks:
            if entry.table.version == version:
                entry.dirty = False
        self.cache.release(job.pinned)
        self.flushed_increments = job.increments
        self.written_mark = max(self.written_mark, job.mark)
        growth = job.growth
        if growth is not None:
            old = (self.header.refcount_table_offset,
                   self.header.refcount_table_clusters << self.cluster_bits)
            self.header.refcount_table_offset = growth.table_offset
            self.header.refcount_table_clusters = growth.table_clusters
            if self.on_table_dropped is not None and old[0] != growth.table_offset:
                self.on_table_dropped(*old)
        self.taken = self.committing = None  # (no call in between: one step)
        if growth is not None:
            for offset, clusters in growth.frees:
                self.deferred_frees.extend(range(offset >> self.cluster_bits,
                                                 (offset >> self.cluster_bits) + clusters))

    def abort_writeback(self) -> None:
        """The write-back taken (:attr:`taken`) failed or was cut off: what it took is
        dirty again (blocks never stopped being); nothing if none is taken.

        Caller holds: the allocator lock.
        """
        if self.check_caller is not None:
            self.check_caller()
        job = self.taken
        if job is None:
            return
        self.cache.release(job.pinned)
        if job.growth is not None:
            if self.pending_growth is None:
                self.pending_growth = job.growth
            elif self.pending_growth is not job.growth:  # grown again meanwhile: that one
                # replaces this one, and frees it
                self.pending_growth.frees = job.growth.frees + self.pending_growth.frees
        else:
            per_sector = 64
            base = self.table_offset
            for offset, _data in job.sectors:
                first = (offset - base) // 8
                self.reftable_dirty.update(range(first, min(len(self.reftable), first + per_sector)))
        self.taken = self.committing = None
