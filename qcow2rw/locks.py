"""The lock model of DESIGN §4: lock modes, the global image lock, and the lock order.

LOCK ORDER (the one place it is written down; never acquire in the reverse order):

    1. global image lock (ImageLock: shared for requests, exclusive for
       snapshot/resize/check/amend/close)
    2. L1 lock           (Image._l1_lock)
    3. L2 entry lock     (CacheEntry.lock of one L2 table; a request holds at most one)
    4. allocator lock    (Image._alloc_lock)
    5. innermost, never held across I/O or another lock: the caches' LRU lock
       (MetadataCache._lru_lock)

Rules that keep the order honest: a thread never calls into a metadata cache (which
may evict and so lock another L2 table) while it holds an L2 entry lock; data I/O
(guest data, copy-on-write head and tail) runs with no metadata lock held.

The three modes map those roles onto real locks:

- ``"mutex"``: the global lock is one ``threading.Lock`` held for the whole request;
  the inner locks are no-ops (everything is serialised already).
- ``"rwlock"``: the global lock is a fair shared/exclusive lock; the inner roles are
  all one re-entrant metadata mutex, released around data I/O.
- ``"fine"``: the global lock as in ``rwlock``; every inner role is its own lock, and
  every cached L2 table has its own mutex.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from readerwriterlock import rwlock

from .errors import Qcow2Error

LOCK_MODES = ("mutex", "rwlock", "fine")

# Debug mode (QCOW2RW_DEBUG_LOCKS=1): inner locks remember their owner, and every
# "Caller holds: ..." docstring is checked by an assertion through held().
DEBUG_LOCKS = os.environ.get("QCOW2RW_DEBUG_LOCKS", "") not in ("", "0")


class LockTimeout(Qcow2Error, TimeoutError):
    """An exclusive operation could not get the image within its timeout."""


class NullLock:
    """A lock that does nothing: the inner locks of the ``mutex`` mode."""

    __slots__ = ()

    def __enter__(self) -> NullLock:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Always succeeds at once."""
        return True

    def release(self) -> None:
        """Nothing to release."""


NULL_LOCK = NullLock()


class OwnedLock:
    """A mutex that knows which thread holds it (debug mode), re-entrant if asked.

    Guards whatever the lock it stands in for guards; ``_owner`` and ``_depth`` are
    changed only by the thread holding ``_lock``.
    """

    __slots__ = ("_lock", "_owner", "_depth", "_reentrant")

    def __init__(self, reentrant: bool = False) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._depth = 0
        self._reentrant = reentrant

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the lock (again, if re-entrant and already ours)."""
        me = threading.get_ident()
        if self._owner == me:
            if not self._reentrant:
                raise RuntimeError("lock taken twice by one thread: lock order broken")
            self._depth += 1
            return True
        if not self._lock.acquire(blocking, timeout):
            return False
        self._owner, self._depth = me, 1
        return True

    def release(self) -> None:
        """Give the lock back."""
        self._depth -= 1
        if not self._depth:
            self._owner = None
            self._lock.release()

    def held_by_me(self) -> bool:
        """True if the calling thread holds the lock."""
        return self._owner == threading.get_ident()

    def __enter__(self) -> OwnedLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def held(lock: Any) -> bool:
    """For ``assert held(lock)`` in "Caller holds" functions: checked in debug mode only."""
    if not DEBUG_LOCKS or lock is NULL_LOCK:
        return True
    return lock.held_by_me()


class ImageLock:
    """The global per-image lock: shared for requests, exclusive for whole-image changes.

    Guards: the image's shape (header fields, L1 table location and size, snapshot
    table, caches' existence) against change while requests run.  In ``mutex`` mode
    it is one plain mutex and "shared" holders exclude each other too.

    ``readerwriterlock`` objects from ``gen_rlock()``/``gen_wlock()`` must never be
    shared between threads, so each thread gets its own reader object (kept in a
    ``threading.local`` and reused, as one thread's acquisitions never overlap), and a
    writer object is made per acquisition.  The library is not re-entrant, so an
    image method never takes this lock twice on one thread.
    """

    def __init__(self, mode: str) -> None:
        if mode not in LOCK_MODES:
            raise ValueError(f"lock_mode must be one of {', '.join(LOCK_MODES)}, not {mode!r}")
        self.mode = mode
        self._mutex = threading.Lock() if mode == "mutex" else None
        self._rw = rwlock.RWLockFair() if mode != "mutex" else None
        self._readers = threading.local()

    def shared(self) -> Any:
        """The lock object to hold shared for one request (``acquire``/``release``, or
        ``with``); it belongs to the calling thread and must not be handed to another."""
        if self._mutex is not None:
            return self._mutex
        try:
            return self._readers.reader
        except AttributeError:
            reader = self._readers.reader = self._rw.gen_rlock()  # type: ignore[union-attr]
            return reader

    def exclusive(self, timeout: float | None = None) -> Any:
        """A context manager holding the lock exclusively, waiting at most *timeout* s."""
        lock = self._mutex if self._mutex is not None else self._rw.gen_wlock()  # type: ignore[union-attr]
        return _Acquired(lock, timeout)


class _Acquired:
    """Acquire *lock* with a timeout on entry (raising LockTimeout), release on exit."""

    __slots__ = ("_lock", "_timeout")

    def __init__(self, lock: Any, timeout: float | None) -> None:
        self._lock = lock
        self._timeout = timeout

    def __enter__(self) -> None:
        if self._timeout is None:
            self._lock.acquire()
        elif not self._lock.acquire(blocking=True, timeout=self._timeout):
            raise LockTimeout(f"could not take the image exclusively within {self._timeout} s")

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def inner_locks(mode: str) -> tuple[Any, Any, Any]:
    """(L1 lock, allocator lock, L2 entry lock factory) for *mode*."""
    if mode == "mutex":
        return NULL_LOCK, NULL_LOCK, lambda: NULL_LOCK
    if mode == "rwlock":
        meta = OwnedLock(reentrant=True) if DEBUG_LOCKS else threading.RLock()
        return meta, meta, lambda: meta
    if DEBUG_LOCKS:
        return OwnedLock(), OwnedLock(), OwnedLock
    return threading.Lock(), threading.Lock(), threading.Lock
