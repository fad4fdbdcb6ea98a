"""The lock model of DESIGN §4: lock modes, the lock order, and the lock primitives.

The global image lock itself (place 1 below) is :mod:`qcow2rw.imagelock`.

LOCK ORDER (the one place it is written down; never acquire in the reverse order):

    1. global image lock  (ImageState.glock, an imagelock.ImageLock: shared for requests,
                           exclusive for snapshot/resize/check/amend/close).  Guards the image's
                           shape: header fields, L1 table location and size, snapshot
                           table, the caches' existence.
    2. flush lock         (ImageState.flush_lock).  One flush at a time: guards the flush
                           sequence (the deferred frees and dirty L1 sectors it took,
                           until they are written or put back).  Taken right after the
                           global lock, by flush() and by exclusive operations that flush.
    3. L1 lock            (ImageState.l1.lock).  Guards the L1 entries and dirty set
                           (new or copied-on-write L2 tables, L1 growth).
    4. L2 entry lock      (CacheEntry.lock of one L2 table; a request holds at most one).
                           Guards that table's entries, its dirty flag and data mark, and
                           its in-flight allocation records.
    5. refcount I/O lock  (ImageState.refcount_io_lock).  One write-back of the refcount
                           structures at a time, held across its writes (an older copy
                           of a block must not land after a newer one).
    6. allocator lock     (ImageState.alloc_lock).  Guards the refcount manager: allocation
                           and the refcount increment that claims a cluster are one step;
                           refcount blocks, the refcount table, the lazy-refcount dirty bit.
    7. leaves, each innermost, never held while another lock is taken:
       - the overlap map's lock (OverlapMap._lock).  Guards the map's publication
         (``_union``, ``_version``) and its per-kind lists; held across I/O only in
         overlap mode "all", to read the snapshots' L1 tables.
       - the caches' LRU lock (MetadataCache._lru_lock).  Guards a cache's entry map,
         LRU order and pin counts; never held across I/O.
       - direct I/O's (cache="none", qcow2rw.directio): the write tracker's lock
         (WriteTracker._lock; a write whose block it pads waits there, with any of
         the locks above held, for overlapping writes in flight, which hold no lock)
         and the bounce-buffer pool's lock (BufferPool._lock).

The global lock's own parts (FairRWLock._mutex, ImageLock._holds_lock and the
reader-flag wake-up lock) are taken only inside this module's methods, never around
any other lock.

AN EXCLUSIVE HOLDER NEEDS NO INNER LOCK.  While a thread holds the global lock
exclusively no request runs, so what locks 2-7 guard is its alone: snapshot, resize,
check, amend and close call "Caller holds: the allocator lock" functions (the
refcount manager above all) holding only the exclusive lock.  A function's "Caller
holds" line therefore means "that lock, or the image exclusively"; in debug mode the
refcount manager checks it at every entry point (RefcountManager.check_caller), and
the ``assert held(...)`` lines check the L2 entry locks.

Rules that keep the order honest: a thread never calls into a metadata cache (which
may evict and so lock another L2 table) while it holds an L2 entry lock; data I/O
(guest data, copy-on-write head and tail) runs with no metadata lock held.

The three modes map those roles onto real locks:

- ``"mutex"``: the global lock is one mutex held for the whole request; the inner
  locks are no-ops (everything is serialised already).
- ``"rwlock"``: the global lock is a fair shared/exclusive lock (:class:`~qcow2rw.imagelock.FairRWLock`);
  the inner roles are all one re-entrant metadata mutex, released around data I/O.
- ``"fine"``: the global lock as in ``rwlock``, with a per-thread reader flag in front
  of it (:class:`~qcow2rw.imagelock.BiasedReader`: a request's shared side costs a few attribute loads
  and stores instead of the fair lock's mutex); every inner role is its own lock, and
  every cached L2 table has its own mutex.

INTERRUPT SAFETY (issue 11 §2).  A signal handler's exception (``KeyboardInterrupt``)
is raised in the main thread between two bytecodes.  CPython looks for it only at a
function's first instruction, at a backward jump, right after a call returns, and
inside a blocking C call (a lock acquire, I/O, sleep), which then fails having done
nothing.  So the code here keeps to three rules:

- A lock is taken either by ``with`` on a C lock (taking it and entering the block is
  one step, and so are leaving and releasing), or by a call whose effect is recorded
  in the same step as it happens (a hold's ``depth``, a ticket's ``rw_depth``, a C
  re-entrant lock's owner), never in a variable the caller assigns from the return
  value: an interrupt right after the call returns would lose that value.
- Every release is state-based and idempotent (:meth:`~qcow2rw.imagelock.ThreadHold.settle`), and the
  code that gives a hold back calls it again if an interrupt cut the first call short
  (an interrupt at the very first instruction of a Python ``release``/``__exit__``
  would otherwise skip it whole).  The guarantee is for one interruption at a time:
  a second signal delivered inside that clean-up can still cut it short.
- Waits are made of bounded slices: a waiter whose wake-up was lost (its waker
  interrupted between the state change and the wake-up) looks again on its own.

A ``with`` statement on a Python-level context manager cannot keep the second rule:
it calls ``__exit__`` once, and a signal may arrive at its first instruction.  So
:class:`~qcow2rw.imagelock.SharedSection` and :class:`~qcow2rw.imagelock.ExclusiveHold` also offer ``run(func, *args)``,
which releases in a ``finally`` (again if cut short) and has no such gap;
``Image._request`` does the same inline, and ``Image.close`` uses ``run``.  A
``try`` body ends with ``result = call()``, never ``return call()``: the instruction
after such a return's call lies outside the ``try``.

``threading.Event`` and ``threading.Condition`` break the first rule (their
``__enter__`` is Python code around a C lock), so an in-flight allocation record is
a :class:`Gate`, and the reader-flag drain uses a plain lock.
tests/test_interrupts.py checks all this by raising an exception at every such point
of each request path in turn.
"""

from __future__ import annotations

import _thread
import os
import threading
import time
from typing import Any

from .errors import Qcow2Error

LOCK_MODES = ("mutex", "rwlock", "fine")

# Debug mode (QCOW2RW_DEBUG_LOCKS=1): inner locks remember their owner, and every
# "Caller holds: ..." docstring is checked by an assertion through held().
DEBUG_LOCKS = os.environ.get("QCOW2RW_DEBUG_LOCKS", "") not in ("", "0")

#: How long exclusive() (and so close()) given no timeout waits for the image before
#: it raises :class:`DrainTimeout` naming what is still held (None: for ever).
DEFAULT_WATCHDOG: float | None = float(os.environ.get("QCOW2RW_LOCK_WATCHDOG", "30")) or None

#: The longest a waiter sleeps before it looks at the lock again.
_SLICE = 0.05
#: How often a request that waits (for the global lock, for an allocation in flight)
#: looks at its cancel token, in seconds.
CANCEL_POLL_SECONDS = 0.01


class LockTimeout(Qcow2Error, TimeoutError):
    """An exclusive operation could not get the image within its timeout."""


class DrainTimeout(LockTimeout):
    """An exclusive operation given no timeout (``exclusive()``, ``close()``, snapshots,
    resize, check) waited the lock's watchdog time for the image to drain.

    The message names what is still held: the threads holding the image shared (and
    whether on a reader flag), the queued waiters, and the image's in-use pins, pinned
    L2 tables and in-flight allocations.  Nothing was changed: the call may be retried.
    """


class NullLock:
    """A lock that does nothing: the inner locks of the ``mutex`` mode (guards nothing)."""

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


def _rlock_count(lock: Any) -> int:
    """How many times the calling thread holds the C re-entrant lock *lock*."""
    count = getattr(lock, "_recursion_count", None)
    if count is not None:
        return count()  # type: ignore[no-any-return]
    return 1 if lock._is_owned() else 0  # Python 3.10: exact for a lock taken once


class OwnedLock(_thread.RLock):
    """A mutex that knows which thread holds it (debug mode), re-entrant if asked.

    Guards whatever the lock it stands in for guards.  It is CPython's C re-entrant
    lock, which records its owner in the same step as it is taken, and whose
    ``__exit__`` (inherited, C) releases in one step; ``__enter__`` adds the check that
    a non-re-entrant lock is not taken twice by one thread (which would deadlock a
    plain mutex), and gives the lock back if an interrupt came right after taking it.
    """

    __slots__ = ("_reentrant",)

    def __new__(cls, reentrant: bool = False) -> OwnedLock:
        self = super().__new__(cls)
        self._reentrant = reentrant
        return self

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the lock (again, if re-entrant and already ours)."""
        if not self._reentrant and self._is_owned():
            raise RuntimeError("lock taken twice by one thread: lock order broken")
        return _thread.RLock.acquire(self, blocking, timeout)

    def held_by_me(self) -> bool:
        """True if the calling thread holds the lock."""
        return self._is_owned()

    def __enter__(self) -> OwnedLock:
        if not self._reentrant and self._is_owned():
            raise RuntimeError("lock taken twice by one thread: lock order broken")
        count = _rlock_count(self)
        try:
            _thread.RLock.acquire(self)
        except BaseException:
            if _rlock_count(self) > count:  # taken, then interrupted before the block
                _thread.RLock.release(self)
            raise
        return self


def held(lock: Any) -> bool:
    """For ``assert held(lock)`` in "Caller holds" functions: checked in debug mode only."""
    if not DEBUG_LOCKS or lock is NULL_LOCK:
        return True
    return lock.held_by_me()  # type: ignore[no-any-return]


def looks_free(lock: Any) -> bool:
    """Whether *lock* (any lock of :func:`inner_locks`) is free right now, found without
    taking it or waiting for it: for the inline paths (issue 16), which must never wait
    for a lock whose holder may be doing I/O (an L2 table's write-back, a sync even).  A
    hint: another thread may take the lock the next moment, and the caller then waits
    for it after all (a window of a few bytecodes).  A lock the calling thread holds
    is not free.  Nothing is taken, so no interrupt can leave anything taken.  (A C
    re-entrant lock, of the rwlock and debug modes, has no ``locked()`` before Python
    3.14; its ``repr``, one C call, starts with ``<locked`` or ``<unlocked``.)"""
    locked = getattr(lock, "locked", None)
    if locked is not None:  # (a plain lock)
        return not locked()
    if lock is NULL_LOCK:
        return True
    return repr(lock).startswith("<unlocked")


class Gate:
    """A one-shot event that asynchronous exceptions cannot break: an in-flight record.

    ``threading.Event`` waits through a Condition whose ``__enter__`` is Python code:
    an interrupt just after it took its lock leaves that lock taken, and the next
    ``set()`` then blocks for ever.  A Gate is a C lock, taken when the gate is made and
    released by :meth:`set`; :meth:`wait` passes through it with ``with``.  Guards
    nothing; only the thread that made the record (the allocating request) sets it.
    """

    __slots__ = ("_lock", "_open")

    def __init__(self) -> None:
        lock = threading.Lock()
        lock.acquire()
        self._lock = lock
        self._open = False

    def set(self) -> None:
        """Open the gate: every waiter goes on (a second call does nothing)."""
        if not self._open:
            self._open = True  # (no call in between: one step)
            self._lock.release()

    def is_set(self) -> bool:
        """True once :meth:`set` was called."""
        return self._open

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the gate is open (at most *timeout* s); True if it is."""
        if self._open:
            return True
        if timeout is None:
            with self._lock:
                pass
            return True
        # (A timed acquire could not be paired with its release safely: an interrupt
        # between them would keep the gate shut for every other waiter.  So: polling,
        # from 50 us up to 2 ms between looks.)
        deadline = time.monotonic() + timeout
        delay = 0.00005
        while not self._open:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, delay))
            delay = min(delay * 2, 0.002)
        return True


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
