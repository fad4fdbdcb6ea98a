"""Bounded write-back caches of metadata clusters (L2 tables, refcount blocks).

Each cached cluster is a :class:`CacheEntry` that carries its own mutex and a pin
count, so that later lock modes can lock one table at a time and never evict a
table that a request is using.  Memory is bounded by ``capacity`` entries whatever
the image's size.

Write-back ordering (DESIGN §6) is not decided here: the owner passes a
``before_writeback`` callback that makes whatever a dirty entry depends on durable
first (for L2 tables: the refcount blocks and the guest data of new clusters).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .errors import Qcow2Error


class CacheEntry:
    """One cached metadata cluster.

    ``lock`` guards ``table`` and ``dirty`` in the fine-grained lock mode; the pin
    count (``pins``, changed under the cache's LRU lock) keeps the entry from being
    evicted while a request uses it.
    """

    __slots__ = ("offset", "table", "dirty", "pins", "lock")

    def __init__(self, offset: int, table: Any) -> None:
        self.offset = offset
        self.table = table
        self.dirty = False
        self.pins = 0
        self.lock = threading.Lock()


class CacheFullError(Qcow2Error):
    """Every cache entry is pinned: the cache is too small for the requests in flight."""


class MetadataCache:
    """An LRU cache of metadata clusters keyed by host offset.

    ``_lru_lock`` guards the ``_entries`` map, LRU order and pin counts: it is the
    innermost lock of the lock order and is never held during I/O.
    """

    def __init__(self, name: str, capacity: int, load: Callable[[int], Any],
                 store: Callable[[int, Any], None],
                 before_writeback: Callable[[CacheEntry], None] | None = None) -> None:
        self.name = name
        self.capacity = max(2, capacity)
        self._load = load
        self._store = store
        self._before_writeback = before_writeback
        self._entries: OrderedDict[int, CacheEntry] = OrderedDict()
        self._lru_lock = threading.Lock()

    def get(self, offset: int) -> CacheEntry:
        """Return the entry for the cluster at *offset*, loading it if needed; pinned.

        Caller holds: the metadata lock (and releases the pin with :meth:`put`).
        """
        with self._lru_lock:
            entry = self._entries.get(offset)
            if entry is not None:
                self._entries.move_to_end(offset)
                entry.pins += 1
                return entry
        self._make_room()
        entry = CacheEntry(offset, self._load(offset))
        entry.pins = 1
        with self._lru_lock:
            self._entries[offset] = entry
        return entry

    def install(self, offset: int, table: Any) -> CacheEntry:
        """Insert a freshly made table for *offset* (a new L2 table or refcount block); pinned, dirty."""
        self._make_room()
        entry = CacheEntry(offset, table)
        entry.dirty = True
        entry.pins = 1
        with self._lru_lock:
            self._entries[offset] = entry
        return entry

    def put(self, entry: CacheEntry) -> None:
        """Drop one pin taken by :meth:`get` or :meth:`install`."""
        with self._lru_lock:
            entry.pins -= 1

    def _make_room(self) -> None:
        while len(self._entries) >= self.capacity:
            with self._lru_lock:
                victim = next((e for e in self._entries.values() if e.pins == 0), None)
            if victim is None:
                raise CacheFullError(f"{self.name} cache: all {self.capacity} entries are in use")
            if victim.dirty:
                self.write_back(victim)
            with self._lru_lock:
                if victim.pins == 0 and not victim.dirty:
                    self._entries.pop(victim.offset, None)

    def write_back(self, entry: CacheEntry) -> None:
        """Write one dirty entry to the file, after what it depends on."""
        if not entry.dirty:
            return
        if self._before_writeback is not None:
            self._before_writeback(entry)
        entry.dirty = False
        try:
            self._store(entry.offset, entry.table)
        except BaseException:
            entry.dirty = True
            raise

    def flush(self) -> None:
        """Write every dirty entry back (dependencies first, via the callback)."""
        with self._lru_lock:
            dirty = [e for e in self._entries.values() if e.dirty]
        dirty.sort(key=lambda e: e.offset)
        for entry in dirty:
            self.write_back(entry)

    def has_dirty(self) -> bool:
        """True if any entry waits to be written back."""
        with self._lru_lock:
            return any(e.dirty for e in self._entries.values())

    def discard(self, offset: int) -> None:
        """Forget the entry for *offset* without writing it (its cluster was freed)."""
        with self._lru_lock:
            self._entries.pop(offset, None)

    def peek(self, offset: int) -> CacheEntry | None:
        """The cached entry for *offset*, if cached; not pinned."""
        with self._lru_lock:
            return self._entries.get(offset)

    def clear(self) -> None:
        """Forget every entry (after a flush, or when tables moved)."""
        with self._lru_lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
