"""Bounded write-back caches of metadata clusters (L2 tables, refcount blocks).

Each cached cluster is a :class:`CacheEntry` that carries its own mutex and a pin
count: a request locks one table at a time, and a pinned table is never evicted.
Memory is bounded by ``capacity`` entries, plus at most the entries pinned at once
(two per request in flight) when every entry is in use.

Write-back ordering (DESIGN §6) is not decided here: the owner passes a
``before_writeback`` callback that makes whatever a dirty entry depends on durable
first (for L2 tables: the refcount blocks and the guest data of new clusters).

A write-back in flight is still dirty: ``dirty`` is cleared only once the store has
returned, under the entry's lock, so a :meth:`MetadataCache.flush` on another
thread either writes the entry itself or waits on its lock for the write-back in
flight, and the sync after it covers the store (see ``HostFile``'s flush rule).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .format import copy_l2_table
from .locks import Gate


class CacheEntry:
    """One cached metadata cluster.

    ``lock`` guards ``table``, ``dirty`` (True from the first change until a store of
    the table has *returned*), ``data_mark``, ``refcount_need`` and ``inflight`` (the in-flight
    allocations of this L2 table, keyed by entry index).  ``data_mark`` is a
    :meth:`HostFile.sync_mark` taken when the table was made to point at newly
    written data: the table may reach the file only after a sync numbered above it
    (-1: it depends on no such write).  ``refcount_need`` is the refcount manager's
    increment count at the table's last link: the refcount write-back that reaches
    it must be durable first.  ``pins`` is changed only under the cache's
    LRU lock, each pin recorded by its holder in the same step (see
    :meth:`MetadataCache.get`); a pinned entry stays in the cache.  ``ready`` is the
    :class:`~qcow2rw.locks.Gate` of the load in progress (None once ``table`` is
    loaded; waiters pass it when the load ends).  ``referenced`` is set by
    lock-free lookups and gives the entry a second chance at eviction.
    """

    __slots__ = ("offset", "table", "dirty", "data_mark", "refcount_need", "pins", "lock",
                 "inflight", "ready", "referenced")

    def __init__(self, offset: int, table: Any, lock: Any) -> None:
        self.offset = offset
        self.table = table
        self.dirty = False
        self.data_mark = -1
        self.refcount_need = 0
        self.pins = 0
        self.lock = lock
        self.inflight: dict[int, Any] = {}
        self.ready: Gate | None = None
        self.referenced = False


def _offset_of(entry: CacheEntry) -> int:
    return entry.offset


class MetadataCache:
    """An LRU cache of metadata clusters keyed by host offset.

    ``_lru_lock`` guards the ``_entries`` map, LRU order and pin counts: it is the
    innermost lock of the lock order and is never held during I/O.
    """

    def __init__(self, name: str, capacity: int, load: Callable[[int], Any],
                 store: Callable[[int, Any], None], lock_factory: Callable[[], Any],
                 before_writeback: Callable[[CacheEntry], None] | None = None) -> None:
        self.name = name
        self.capacity = max(2, capacity)
        self._load = load
        self._store = store
        self._lock_factory = lock_factory
        self._before_writeback = before_writeback
        #: The owner's event points, fired with the entry's lock held:
        #: ``l2_writeback_start`` before a store, ``l2_writeback_done`` after it returned
        #: and before ``dirty`` is cleared (set for the L2 cache only: refcount block
        #: stores fire ``refblock_update``).
        self.fire: Callable[[str], None] | None = None
        self._entries: OrderedDict[int, CacheEntry] = OrderedDict()
        self.entries = self._entries  # read-only view for the lock-free fast path
        self._lru_lock = threading.Lock()

    def set_before_writeback(self, hook: Callable[[CacheEntry], None] | None) -> None:
        """Set the owner's write-back ordering hook (see the module docstring); done
        once, before the cache is shared."""
        self._before_writeback = hook

    def get(self, offset: int, held: list[CacheEntry] | None = None) -> CacheEntry:
        """Return the entry for the cluster at *offset*, loading it if needed; pinned.

        *held* is the caller's record of its pins (a list it made before the call, and
        gives to :meth:`release` in a ``finally``): the pin goes into the entry and
        into *held* in one step no interrupt can split, so an exception anywhere,
        even one that loses this call's return value, loses no pin.  Without *held*
        the caller drops the pin with :meth:`put` (exclusive operations only).
        Caller holds: no L2 entry lock (loading may evict, which locks another entry).
        """
        record = held if held is not None else []
        loading = None
        try:
            with self._lru_lock:
                entry = self._entries.get(offset)
                if entry is None:
                    entry = CacheEntry(offset, None, self._lock_factory())
                    entry.ready = Gate()
                    loading = entry  # (no call until it is in the cache: one step)
                    self._entries[offset] = entry
                else:
                    self._entries.move_to_end(offset)
                entry.pins += 1  # (no call until it is recorded: one step)
                record.append(entry)
            if loading is None:
                ready = entry.ready
                if ready is not None:  # another thread is loading it
                    ready.wait()
                    if entry.table is None:  # its load failed (its error is its own):
                        self.put(entry, record)  # the entry is gone; load it here
                        return self.get(offset, held)
                return entry
            entry.table = self._load(offset)
            self._loaded(loading)
            loading = None
            self._make_room()
        except BaseException:
            if loading is not None:  # the load failed or was interrupted
                self._loaded(loading)
            if held is None:
                self.release(record)
            raise
        return entry

    def _loaded(self, entry: CacheEntry) -> None:
        """End *entry*'s load: open its gate for the waiters, once (calling again does
        nothing more).  An entry left without a table (the load failed) leaves the
        cache first, so nobody finds it again."""
        if entry.table is None:
            with self._lru_lock:
                if self._entries.get(entry.offset) is entry:
                    del self._entries[entry.offset]
        ready = entry.ready
        if ready is not None:
            ready.set()  # (before the field is cleared: a waiter may hold the gate)
            entry.ready = None

    def copy_of(self, offset: int) -> Any:
        """A copy of the table at *offset* (loaded if needed), taken under its lock.

        Caller holds: no L2 entry lock (as :meth:`get`).
        """
        held: list[CacheEntry] = []
        try:
            entry = self.get(offset, held)
            with entry.lock:
                return copy_l2_table(entry.table)
        finally:
            try:
                self.release(held)
            except BaseException:  # an interrupt cut it short: it resumes
                self.release(held)
                raise

    def lookup(self, offset: int) -> CacheEntry | None:
        """The loaded entry for *offset* if cached, without pinning it (the fast path).

        The caller must lock the entry and then check :meth:`is_current`: an entry is
        only taken out of the cache under its own lock, so while the caller holds the
        lock and the entry is current, its table is the live one.
        """
        entry = self._entries.get(offset)  # one atomic dict read
        if entry is None or entry.ready is not None:
            return None
        entry.referenced = True
        return entry

    def is_current(self, entry: CacheEntry) -> bool:
        """True if *entry* is still the cache's entry for its offset.  Caller holds: its lock."""
        return self._entries.get(entry.offset) is entry

    def install(self, offset: int, table: Any, *, make_room: bool = True,
                held: list[CacheEntry] | None = None) -> CacheEntry:
        """Insert a freshly made table for *offset* (a new L2 table or refcount block), dirty.

        Room is made first: if writing a victim back fails, nothing was inserted (a
        dirty table the caller never linked must not be written back later).  With
        *make_room* False the caller made room just before (:meth:`make_room`) and
        holds a lock that no write-back may be done under: the cache may then go
        over its capacity by one entry per such caller until the next eviction.
        With *held* the entry comes pinned, the pin recorded in *held* as by
        :meth:`get`; without it, unpinned (the caller keeps no reference).
        """
        if make_room:
            self._make_room(reserve=1)
        entry = CacheEntry(offset, table, self._lock_factory())
        entry.dirty = True
        with self._lru_lock:
            if held is not None:
                entry.pins = 1  # (no call until it is recorded: one step)
                held.append(entry)
            self._entries[offset] = entry
        return entry

    def put(self, entry: CacheEntry, held: list[CacheEntry] | None = None) -> None:
        """Drop one pin taken by :meth:`get` or :meth:`install` (and its record in *held*)."""
        with self._lru_lock:
            if held is None:
                entry.pins -= 1
            else:
                index = held.index(entry)
                del held[index]  # (no call until the pin is dropped: one step)
                entry.pins -= 1

    def release(self, held: list[CacheEntry]) -> None:
        """Drop every pin recorded in *held*, emptying it.

        One pin at a time leaves the entry and the list at once, so after an
        interrupt *held* still lists exactly the pins left: calling again finishes.
        """
        while held:
            with self._lru_lock:
                if held:
                    entry = held[-1]
                    del held[-1]  # (no call until the pin is dropped: one step)
                    entry.pins -= 1

    def make_room(self, reserve: int = 0) -> None:
        """Evict (writing back) down to the capacity less *reserve*.  Caller holds: no
        L2 entry lock (a write-back locks its victim)."""
        self._make_room(reserve)

    def _make_room(self, reserve: int = 0) -> None:
        """Evict unpinned entries (writing dirty ones back) down to the capacity
        (less *reserve*, the room for entries about to be inserted).

        The oldest entry goes first, unless a lock-free lookup referenced it since its
        last chance (then it moves to the young end, once).  A victim is written back
        and taken out of the cache under its own lock.
        """
        while True:
            victim = None
            try:
                with self._lru_lock:
                    if len(self._entries) + reserve <= self.capacity:
                        return
                    chosen, spared = None, []
                    for entry in self._entries.values():
                        if entry.pins or entry.ready is not None:
                            continue
                        if entry.referenced:
                            spared.append(entry)
                            continue
                        chosen = entry
                        break
                    for entry in spared:
                        entry.referenced = False
                        self._entries.move_to_end(entry.offset)
                    if chosen is None:
                        if not spared:
                            return  # everything is in use: stay over capacity for now
                        chosen = spared[0]
                    chosen.pins += 1  # nobody else evicts it while it is written back
                    victim = chosen  # (no call in between: the pin is recorded)
                with victim.lock:
                    if victim.dirty:
                        self.write_back(victim)
                    with self._lru_lock:
                        victim.pins -= 1
                        victim = None  # (no call in between: the pin is dropped)
                        if (chosen.pins == 0 and not chosen.dirty
                                and self._entries.get(chosen.offset) is chosen):
                            del self._entries[chosen.offset]
            finally:
                if victim is not None:
                    with self._lru_lock:
                        victim.pins -= 1

    def write_back(self, entry: CacheEntry) -> None:
        """Write one dirty entry to the file, after what it depends on.

        Caller holds: the entry's lock.
        """
        if not entry.dirty:
            return
        if self._before_writeback is not None:
            self._before_writeback(entry)
        fire = self.fire
        if fire is not None:
            fire("l2_writeback_start")
        self._store(entry.offset, entry.table)
        if fire is not None:
            fire("l2_writeback_done")
        entry.dirty = False  # only now: until here a flush must wait for this store

    def flush(self) -> bool:
        """Write every dirty entry back, each under its own lock; True if any was written.

        An entry another thread is writing back is dirty until that store returns:
        taking its lock here waits for it.  So when this returns, every change made
        to a table before the call has been stored (a sync still has to follow).
        """
        held: list[CacheEntry] = []
        try:
            self.pin_dirty(held)
            wrote = bool(held)
            for entry in sorted(held, key=_offset_of):
                with entry.lock:
                    self.write_back(entry)
            # (no "return <call>" in this try: a finally's copy on the return path is
            # outside the try, so an interrupt right after that call would skip it)
        finally:
            try:
                self.release(held)
            except BaseException:  # an interrupt cut it short: it resumes
                self.release(held)
                raise
        return wrote

    def pin_dirty(self, held: list[CacheEntry]) -> None:
        """Pin every dirty entry (never evicted until :meth:`release`), recording each
        pin in *held* as :meth:`get` does."""
        with self._lru_lock:
            for entry in self._entries.values():
                if entry.dirty:
                    entry.pins += 1  # (no call until it is recorded: one step)
                    held.append(entry)

    def cached(self, offsets: list[int]) -> list[CacheEntry]:
        """The entries cached now for *offsets* (those that have one).

        Caller may hold the allocator lock (the LRU lock comes after it).
        """
        with self._lru_lock:
            found = [self._entries.get(offset) for offset in offsets]
        return [entry for entry in found if entry is not None]

    def discard(self, entry: CacheEntry) -> None:
        """Forget *entry* without writing it (its cluster was freed), if it is still
        the one cached for its offset: a table made since at the same offset (the
        cluster allocated again) stays.  Take *entry* with :meth:`cached` while the
        free cannot be undone, i.e. before the cluster can be allocated again."""
        with entry.lock, self._lru_lock:
            if entry.pins == 0 and self._entries.get(entry.offset) is entry:
                del self._entries[entry.offset]

    def clear(self) -> None:
        """Forget every entry (after a flush, or when the tables moved)."""
        with self._lru_lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
