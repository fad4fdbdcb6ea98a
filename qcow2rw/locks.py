"""The lock model of DESIGN §4: lock modes, the global image lock, and the lock order.

LOCK ORDER (the one place it is written down; never acquire in the reverse order):

    1. global image lock (ImageLock: shared for requests, exclusive for
       snapshot/resize/check/amend/close)
    2. L1 lock           (Image._l1_lock)
    3. L2 entry lock     (CacheEntry.lock of one L2 table; a request holds at most one)
    4. allocator lock    (Image._alloc_lock)
    5. innermost, never held across I/O or another lock: the caches' LRU lock
       (MetadataCache._lru_lock)

The global lock's own parts (the ``readerwriterlock`` internals and
``ImageLock._drained``) are taken only inside ImageLock's methods, never around any
other lock: a reader touches ``_drained`` only with its flag down and nothing held.

Rules that keep the order honest: a thread never calls into a metadata cache (which
may evict and so lock another L2 table) while it holds an L2 entry lock; data I/O
(guest data, copy-on-write head and tail) runs with no metadata lock held.

The three modes map those roles onto real locks:

- ``"mutex"``: the global lock is one ``threading.Lock`` held for the whole request;
  the inner locks are no-ops (everything is serialised already).
- ``"rwlock"``: the global lock is a fair shared/exclusive lock; the inner roles are
  all one re-entrant metadata mutex, released around data I/O.
- ``"fine"``: the global lock as in ``rwlock``, with a per-thread reader flag in front
  of it (:class:`BiasedReader`: a request's shared side costs two attribute stores
  instead of the library's four lock operations; writers still queue on the library
  lock); every inner role is its own lock, and every cached L2 table has its own mutex.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
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

    In ``fine`` mode the reader objects are :class:`BiasedReader` objects: while no writer
    is about, a reader only raises its own flag (the idea of Linux's per-CPU rwsems and
    of BRAVO).  A writer takes the library lock exclusively, *revokes* the bias (new
    readers then queue on the library lock behind it, so fairness is the library's),
    and waits until every raised flag is down.  ``_revoked`` is written only by the
    holder of the library's write side.  Correctness rests on the order of two plain
    stores and loads, which CPython's global interpreter lock keeps sequentially
    consistent: a reader raises its flag *then* looks at ``_revoked``; a writer sets
    ``_revoked`` *then* looks at the flags; so at least one of them sees the other.  A
    free-threaded interpreter gives no such promise, so there the bias is off.
    """

    def __init__(self, mode: str) -> None:
        if mode not in LOCK_MODES:
            raise ValueError(f"lock_mode must be one of {', '.join(LOCK_MODES)}, not {mode!r}")
        self.mode = mode
        self._mutex = threading.Lock() if mode == "mutex" else None
        self._rw = rwlock.RWLockFair() if mode != "mutex" else None
        self._readers = threading.local()
        self._biased = mode == "fine" and getattr(sys, "_is_gil_enabled", lambda: True)()
        #: True while a writer holds (or is taking) the lock: readers take the slow path.
        self._revoked = False
        #: Guards ``_flags`` against concurrent registration; its condition wakes a
        #: writer waiting for raised flags to go down.
        self._drained = threading.Condition(threading.Lock())
        #: Every thread's BiasedReader (weak: a thread's reader goes with its thread).
        self._flags: weakref.WeakSet[BiasedReader] = weakref.WeakSet()

    def shared(self) -> Any:
        """The lock object to hold shared for one request (``acquire``/``release``, or
        ``with``); it belongs to the calling thread and must not be handed to another."""
        if self._mutex is not None:
            return self._mutex
        try:
            return self._readers.reader
        except AttributeError:
            reader: Any = self._rw.gen_rlock()  # type: ignore[union-attr]
            if self._biased:
                reader = (CheckedBiasedReader if DEBUG_LOCKS else BiasedReader)(self, reader)
                with self._drained:
                    self._flags.add(reader)
            self._readers.reader = reader
            return reader

    def exclusive(self, timeout: float | None = None) -> Any:
        """A context manager holding the lock exclusively, waiting at most *timeout* s."""
        if self._mutex is not None:
            return _Acquired(self._mutex, timeout)
        writer = self._rw.gen_wlock()  # type: ignore[union-attr]
        return _Acquired(_BiasRevokingWriter(self, writer) if self._biased else writer, timeout)

    def _wait_for_fast_readers(self, deadline: float | None) -> bool:
        """Wait until no reader's flag is raised; False if *deadline* passed first.

        Caller holds: the library lock's write side, with ``_revoked`` set.
        """
        with self._drained:
            while any(reader.raised for reader in list(self._flags)):
                if deadline is None:
                    self._drained.wait()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._drained.wait(left):
                        if any(reader.raised for reader in list(self._flags)):
                            return False
        return True

    def _reader_left(self) -> None:
        """A reader lowered its flag while a writer was waiting: wake the writer."""
        with self._drained:
            self._drained.notify_all()


class BiasedReader:
    """One thread's shared side of a ``fine``-mode :class:`ImageLock`.

    Guards nothing itself: ``raised`` says this thread is inside a request on the fast
    path; ``_slow`` (the thread's own ``readerwriterlock`` reader) is held instead while
    a writer has revoked the bias.  Only its thread calls :meth:`acquire`/:meth:`release`.
    """

    __slots__ = ("__weakref__", "_lock", "_on_slow_path", "_slow", "raised")

    def __init__(self, lock: ImageLock, slow: Any) -> None:
        self._lock = lock
        self._slow = slow
        self._on_slow_path = False
        self.raised = False

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        self.raised = True              # first publish...
        if not self._lock._revoked:     # ...then look: see ImageLock's docstring
            return True
        self.raised = False
        self._lock._reader_left()
        if not self._slow.acquire(blocking, timeout):
            return False
        self._on_slow_path = True
        return True

    def release(self) -> None:
        if self._on_slow_path:
            self._on_slow_path = False
            self._slow.release()
            return
        self.raised = False
        if self._lock._revoked:
            self._lock._reader_left()

    def __enter__(self) -> BiasedReader:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class CheckedBiasedReader(BiasedReader):
    """A :class:`BiasedReader` that refuses to be taken twice (debug mode).

    The library lock would deadlock on a nested acquisition once a writer waits; a
    flag would silently let the writer in while the outer hold is still running.
    """

    __slots__ = ()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        assert not (self.raised or self._on_slow_path), "the global lock taken twice"
        return super().acquire(blocking, timeout)

    def release(self) -> None:
        assert self.raised or self._on_slow_path, "the global lock released, not held"
        super().release()


class _BiasRevokingWriter:
    """The exclusive side of a ``fine``-mode :class:`ImageLock`: the library's write
    lock, then the bias revoked and the fast readers drained (see ImageLock)."""

    __slots__ = ("_lock", "_writer")

    def __init__(self, lock: ImageLock, writer: Any) -> None:
        self._lock = lock
        self._writer = writer

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        if not self._writer.acquire(blocking, timeout):
            return False
        self._lock._revoked = True
        if self._lock._wait_for_fast_readers(deadline):
            return True
        self._lock._revoked = False
        self._writer.release()
        return False

    def release(self) -> None:
        self._lock._revoked = False
        self._writer.release()


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
