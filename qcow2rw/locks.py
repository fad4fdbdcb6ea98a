"""The lock model of DESIGN §4: lock modes, the global image lock, and the lock order.

LOCK ORDER (the one place it is written down; never acquire in the reverse order):

    1. global image lock  (ImageState.glock, an ImageLock: shared for requests,
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
- ``"rwlock"``: the global lock is a fair shared/exclusive lock (:class:`FairRWLock`);
  the inner roles are all one re-entrant metadata mutex, released around data I/O.
- ``"fine"``: the global lock as in ``rwlock``, with a per-thread reader flag in front
  of it (:class:`BiasedReader`: a request's shared side costs a few attribute loads
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
- Every release is state-based and idempotent (:meth:`ThreadHold.settle`), and the
  code that gives a hold back calls it again if an interrupt cut the first call short
  (an interrupt at the very first instruction of a Python ``release``/``__exit__``
  would otherwise skip it whole).  The guarantee is for one interruption at a time:
  a second signal delivered inside that clean-up can still cut it short.
- Waits are made of bounded slices: a waiter whose wake-up was lost (its waker
  interrupted between the state change and the wake-up) looks again on its own.

A ``with`` statement on a Python-level context manager cannot keep the second rule:
it calls ``__exit__`` once, and a signal may arrive at its first instruction.  So
:class:`SharedSection` and :class:`ExclusiveHold` also offer ``run(func, *args)``,
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
import sys
import threading
import time
import weakref
from typing import Any, Callable

from .errors import ClosedImage, Qcow2Error

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


class _Waiter:
    """One request queued on a :class:`FairRWLock` (guards nothing).

    ``wake`` is taken at creation and released once, by whoever grants the lock.
    """

    __slots__ = ("exclusive", "ticket", "wake")

    def __init__(self, ticket: Any, exclusive: bool) -> None:
        wake = threading.Lock()
        wake.acquire()
        self.ticket = ticket
        self.exclusive = exclusive
        self.wake = wake


class FairRWLock:
    """A fair shared/exclusive lock whose every step survives an asynchronous exception.

    Guards nothing of the image by itself: it is the queue of the global lock.
    ``_mutex`` (a C lock, taken only with ``with``) guards ``_readers``, ``_writer``,
    ``_queue`` and the ``rw_depth`` of every ticket.  A ticket is the object a thread
    holds the lock through (a :class:`ThreadHold` or an :class:`ExclusiveHold`): its
    ``rw_depth`` is 1 while it holds, set in the same step as the counts by whoever
    grants it, so that after any interruption the ticket says what it holds.

    Fairness is the policy of ``readerwriterlock``'s ``RWLockFair``, which this
    replaces (its acquire and release are Python code around three plain locks and a
    counter: an exception delivered in between leaves them inconsistent, with no way
    to tell afterwards what the interrupted thread held): one FIFO queue; a request
    enters at once only if nobody is queued and the lock allows it; a release grants
    the head of the queue, a writer alone or every reader up to the next writer.  A
    reader never overtakes a queued writer, nor a writer queued readers.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._readers = 0  # shared holds granted (one per holding thread)
        self._writer: Any = None  # the ticket holding the lock exclusively
        self._queue: list[_Waiter] = []

    def acquire(self, ticket: Any, exclusive: bool, deadline: float | None = None,
                blocking: bool = True) -> bool:
        """Hold the lock through *ticket* (whose ``rw_depth`` is 0).

        Returns False if *deadline* (a ``time.monotonic()`` value) passed first, or if
        the lock is busy and not *blocking*.  An exception (an interrupt) ends the call
        with nothing held and nothing queued.
        """
        waiter: _Waiter | None = None
        try:
            with self._mutex:
                if (not self._queue and self._writer is None
                        and not (exclusive and self._readers)):
                    if exclusive:
                        self._writer = ticket
                    else:
                        self._readers += 1
                    ticket.rw_depth = 1
                    return True
                if not blocking:
                    return False
                writer = self._writer
                if writer is not None and writer.thread_id == ticket.thread_id:
                    raise RuntimeError("the global lock requested by the thread that holds "
                                       "it exclusively: it would wait for itself")
                waiter = _Waiter(ticket, exclusive)
                self._queue += [waiter]  # (no call in between: queued in one step)
            while not ticket.rw_depth:
                wait = _SLICE
                if deadline is not None:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        return self._withdraw(waiter)
                    wait = min(wait, _SLICE)
                if not waiter.wake.acquire(True, wait):
                    with self._mutex:  # a release cut short by an interrupt granted nobody
                        self._grant_locked()
            return True
        except BaseException:
            self._give_up(waiter, ticket)
            raise

    def release(self, ticket: Any) -> None:
        """Give back *ticket*'s hold (shared or exclusive)."""
        with self._mutex:
            if not ticket.rw_depth:
                raise RuntimeError("the global lock released, not held")
            ticket.rw_depth = 0  # (no call until both counts agree: one step)
            if self._writer is ticket:
                self._writer = None
            else:
                self._readers -= 1
            self._grant_locked()

    def _withdraw(self, waiter: _Waiter) -> bool:
        """A waiter's deadline passed: leave the queue; True if granted meanwhile."""
        with self._mutex:
            if waiter not in self._queue:
                return True  # granted between its last look and now: it holds
            self._queue.remove(waiter)
            self._grant_locked()  # a writer that left may have held readers back
            return False

    def _give_up(self, waiter: _Waiter | None, ticket: Any) -> None:
        """An exception ended :meth:`acquire`: leave the queue, give back a grant."""
        with self._mutex:
            if waiter is not None and waiter in self._queue:
                self._queue.remove(waiter)
            if ticket.rw_depth:
                ticket.rw_depth = 0
                if self._writer is ticket:
                    self._writer = None
                else:
                    self._readers -= 1
            self._grant_locked()

    def _grant_locked(self) -> None:
        """Hand the lock to the waiters at the head of the queue that may have it now.

        Caller holds: ``_mutex``.  Each grant is one step (dequeued, counted, the ticket
        marked), then its waiter is woken.
        """
        queue = self._queue
        while queue and self._writer is None:
            waiter = queue[0]
            if waiter.exclusive:
                if self._readers:
                    return
                del queue[0]
                self._writer = waiter.ticket
                waiter.ticket.rw_depth = 1
                waiter.wake.release()
                return
            del queue[0]
            self._readers += 1
            waiter.ticket.rw_depth = 1
            waiter.wake.release()

    def describe(self) -> list[str]:
        """What holds and waits for the lock now (for error messages)."""
        parts = []
        with self._mutex:
            readers, writer = self._readers, self._writer
            queued = [w.exclusive for w in self._queue]
        if writer is not None:
            parts.append(f"held exclusively by thread {writer.thread_name!r} "
                         f"({writer.thread_id})")
        if readers:
            parts.append(f"{readers} shared hold(s) on the fair lock")
        if queued:
            parts.append(f"{len(queued)} waiter(s) queued ({sum(queued)} exclusive)")
        return parts


class ThreadHold:
    """One thread's shared side of an :class:`ImageLock` (the base of each mode's kind).

    Guards nothing itself, and only its own thread changes it.  ``depth`` counts the
    thread's nested shared holds (0: none); it changes in the same step as the lock
    state, so after any interruption the hold says exactly what the thread holds and
    :meth:`settle` gives back what an interrupted request took.  Nesting is counted in
    every mode: an inner release never lets a writer in beside the outer hold.
    ``pending`` is kept by the image: the write plans of the thread's current request
    not yet settled, given back if an exception ends the request.
    """

    __slots__ = ("__weakref__", "_image_lock", "depth", "pending", "thread_id", "thread_name")

    def __init__(self, image_lock: ImageLock) -> None:
        thread = threading.current_thread()
        self._image_lock = image_lock
        self.depth = 0
        self.pending: list[Any] = []
        self.thread_id = thread.ident
        self.thread_name = thread.name

    def take(self, deadline: float | None = None, blocking: bool = True) -> bool:
        """Hold the lock shared once more; False if *deadline* passed first (or busy
        and not *blocking*).  An interrupt inside leaves ``depth`` telling the truth."""
        raise NotImplementedError

    def settle(self, depth: int) -> None:
        """Give back every hold above *depth* (the value ``depth`` had before the
        request's :meth:`take`).  Idempotent: call it again if an interrupt cut it short."""
        raise NotImplementedError

    def take_watching(self, cancel: Any) -> None:
        """:meth:`take`, waiting as long as it must (behind an exclusive operation),
        but looking at *cancel* (a :class:`~qcow2rw.cancel.CancelToken`, or None)
        every :data:`CANCEL_POLL_SECONDS` meanwhile: a cancelled token raises there."""
        if cancel is None:
            self.take()
            return
        while not self.take(time.monotonic() + CANCEL_POLL_SECONDS):
            cancel.check()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """``threading.Lock``-style :meth:`take` (prefer ``with``, or take/settle)."""
        deadline = None if not blocking or timeout is None or timeout < 0 \
            else time.monotonic() + timeout
        before = self.depth
        try:
            got = self.take(deadline, blocking)  # (not "return self.take()": the
        except BaseException:                    # instruction after would lie outside)
            self.settle(before)
            raise
        return got

    def release(self) -> None:
        """Give back one hold."""
        depth = self.depth - 1
        if depth < 0:
            raise RuntimeError("the global lock released, not held")
        try:
            self.settle(depth)
        except BaseException:
            self.settle(depth)
            raise

    def __enter__(self) -> ThreadHold:
        before = self.depth
        try:
            self.take()
        except BaseException:
            self.settle(before)
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # (release()'s body, not a call to it: a call would add one more instruction
        # at which an interrupt could skip the release whole.)
        depth = self.depth - 1
        if depth < 0:
            raise RuntimeError("the global lock released, not held")
        try:
            self.settle(depth)
        except BaseException:
            self.settle(depth)
            raise

    def state(self) -> str:
        """How this thread holds the lock, for error messages."""
        return f"depth {self.depth}"


class MutexHold(ThreadHold):
    """A thread's side of a ``mutex``-mode :class:`ImageLock`: the one image mutex (a C
    re-entrant lock, taken once per thread; nesting is counted in ``depth``).

    ``_taking`` is True from just before the mutex is asked for until ``depth`` says
    whether it was got: meanwhile the mutex's owner tells (take() refuses a thread
    that owns it already, so it is not this thread's exclusive hold).
    """

    __slots__ = ("_mutex", "_taking")

    def __init__(self, image_lock: ImageLock) -> None:
        super().__init__(image_lock)
        self._mutex: Any = image_lock._mutex
        self._taking = False

    def take(self, deadline: float | None = None, blocking: bool = True) -> bool:
        depth = self.depth
        if depth:
            self.depth = depth + 1
            return True
        mutex = self._mutex
        if mutex._is_owned():
            raise RuntimeError("the global lock taken shared by the thread that holds it "
                               "exclusively")
        wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        self._taking = True
        got = mutex.acquire(blocking, wait if blocking else -1)
        if got:
            self.depth = 1
        self._taking = False
        return bool(got)

    def settle(self, depth: int) -> None:
        if depth:
            if self.depth > depth:
                self.depth = depth
            return
        mutex = self._mutex
        if self.depth:
            self.depth = 0
            mutex.release()  # (no call since the line above: one step)
        elif self._taking:  # a take() interrupted before it set depth
            if mutex._is_owned():
                mutex.release()
            self._taking = False


class SharedHold(ThreadHold):
    """A thread's side of an ``rwlock``-mode :class:`ImageLock`: a ticket on the fair
    lock (``rw_depth`` 1 while it holds; nesting is counted in ``depth``)."""

    __slots__ = ("rw_depth",)

    def __init__(self, image_lock: ImageLock) -> None:
        super().__init__(image_lock)
        self.rw_depth = 0

    def take(self, deadline: float | None = None, blocking: bool = True) -> bool:
        depth = self.depth
        if depth:
            self.depth = depth + 1
            return True
        rw: Any = self._image_lock._rw
        if not rw.acquire(self, False, deadline, blocking):
            return False
        self.depth = 1  # (an interrupt before this line: rw_depth knows)
        return True

    def settle(self, depth: int) -> None:
        if depth:
            if self.depth > depth:
                self.depth = depth
            return
        if self.rw_depth:
            self._image_lock._rw.release(self)  # type: ignore[union-attr]
        self.depth = 0

    def state(self) -> str:
        return f"depth {self.depth}, on the fair lock" if self.rw_depth else f"depth {self.depth}"


class BiasedReader(ThreadHold):
    """A thread's side of a ``fine``-mode :class:`ImageLock`.

    ``raised`` is the thread's reader flag: up while it holds on the fast path (a
    writer scans the flags).  While a writer has revoked the bias, the thread takes
    the fair lock shared instead (``rw_depth`` 1 while it holds it).  Nesting is counted
    in ``depth`` whichever path the outer hold took.
    """

    __slots__ = ("raised", "rw_depth")

    def __init__(self, image_lock: ImageLock) -> None:
        super().__init__(image_lock)
        self.raised = False
        self.rw_depth = 0

    @property
    def _on_slow_path(self) -> bool:
        """True while the thread holds the fair lock instead of its flag."""
        return bool(self.rw_depth)

    def take(self, deadline: float | None = None, blocking: bool = True) -> bool:
        depth = self.depth
        if depth:
            self.depth = depth + 1
            return True
        lock = self._image_lock
        self.raised = True          # first publish...
        if not lock._revoked:       # ...then look: see ImageLock's docstring
            self.depth = 1          # (no call since the flag went up: one step)
            return True
        self.raised = False
        lock._reader_left()
        if not lock._rw.acquire(self, False, deadline, blocking):  # type: ignore[union-attr]
            return False
        self.depth = 1  # (an interrupt before this line: rw_depth knows)
        return True

    def settle(self, depth: int) -> None:
        if depth:
            if self.depth > depth:
                self.depth = depth
            return
        lock = self._image_lock
        if self.raised:
            self.raised = False
            self.depth = 0
            if lock._revoked:
                lock._reader_left()
            return
        if self.rw_depth:
            lock._rw.release(self)  # type: ignore[union-attr]
        self.depth = 0

    def state(self) -> str:
        if self.raised:
            return f"depth {self.depth}, reader flag raised"
        if self.rw_depth:
            return f"depth {self.depth}, on the fair lock"
        return f"depth {self.depth}"


class ExclusiveHold:
    """The exclusive side of an :class:`ImageLock`, for one ``exclusive()`` call.

    Guards nothing itself; ``rw_depth`` is its ticket on the fair lock (in ``mutex``
    mode, the C mutex records its owner instead).  Entering waits at most *timeout*
    seconds (then :class:`LockTimeout`), or with no timeout at most the lock's
    ``watchdog`` (then :class:`DrainTimeout`, naming what is still held); an exception
    while waiting leaves nothing held.  If *owner* is given (the image's state), its
    ``exclusive_owner`` names the holding thread while held, and ``with`` returns
    *gives* (the Image), or the owner;
    *nested* (the calling thread holds it already) makes every step a no-op.

    ``with`` is interrupt-safe but for one instruction, the first of ``__exit__``
    (see :class:`SharedSection`); :meth:`run` has no such gap.
    """

    __slots__ = ("_describe", "_gives", "_image_lock", "_nested", "_owner", "_timeout",
                 "rw_depth", "thread_id", "thread_name")

    def __init__(self, image_lock: ImageLock, timeout: float | None, owner: Any = None,
                 describe: Callable[[], str] | None = None, nested: bool = False,
                 gives: Any = None) -> None:
        thread = threading.current_thread()
        self._image_lock = image_lock
        self._timeout = timeout
        self._owner = owner
        self._gives = gives if gives is not None else owner
        self._describe = describe
        self._nested = nested
        self.rw_depth = 0
        self.thread_id = thread.ident
        self.thread_name = thread.name

    def take(self, deadline: float | None, blocking: bool = True) -> bool:
        """Hold the image exclusively; False if *deadline* passed first.  An exception
        (an interrupt) ends the call with nothing held."""
        lock = self._image_lock
        try:
            mutex = lock._mutex
            if mutex is not None:
                if mutex._is_owned():
                    raise RuntimeError("exclusive() by the thread that holds the image mutex")
                wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
                self.rw_depth = -1  # taking: from here the mutex's owner says if we hold it
                got = mutex.acquire(blocking, wait if blocking else -1)
                if got:
                    self.rw_depth = 1
            else:
                got = lock._rw.acquire(self, True, deadline, blocking)  # type: ignore[union-attr]
                if got and lock._biased:
                    lock._revoked = True
                    if not lock._wait_for_fast_readers(deadline):
                        self.settle()
                        got = False
        except BaseException:  # (the "got =" stores keep every call inside this try)
            self.settle()
            raise
        return bool(got)

    def held(self) -> bool:
        """True while this hold has the image."""
        mutex = self._image_lock._mutex
        if mutex is not None:
            return bool(self.rw_depth) and mutex._is_owned()
        return bool(self.rw_depth)

    def settle(self) -> None:
        """Give the image back if held (idempotent: call again if an interrupt cut it short)."""
        lock = self._image_lock
        mutex = lock._mutex
        if mutex is not None:  # rw_depth: 0 never took, -1 was taking, 1 took
            if self.rw_depth:
                if mutex._is_owned():  # (not before: take() refuses a thread that owns it)
                    mutex.release()
                self.rw_depth = 0
            return
        if self.rw_depth:
            if lock._biased:
                lock._revoked = False
            lock._rw.release(self)  # type: ignore[union-attr]

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """``threading.Lock``-style :meth:`take` (prefer ``with``)."""
        deadline = None if not blocking or timeout is None or timeout < 0 \
            else time.monotonic() + timeout
        self._image_lock._refuse_inside_shared()
        try:
            got = self.take(deadline, blocking)  # (see ThreadHold.acquire)
        except BaseException:
            self.settle()
            raise
        return got

    def release(self) -> None:
        """Give the image back."""
        if not self.held():
            raise RuntimeError("the global lock released, not held")
        try:
            self.settle()
        except BaseException:
            self.settle()
            raise

    def _enter(self) -> Any:
        """Take the image (LockTimeout, DrainTimeout), name the owner; what ``with`` gives."""
        lock = self._image_lock
        lock._refuse_inside_shared()
        timeout = self._timeout
        watchdog = lock.watchdog if timeout is None else None
        limit = timeout if timeout is not None else watchdog
        deadline = None if limit is None else time.monotonic() + limit
        me = threading.get_ident()
        try:
            got = self.take(deadline)
        except BaseException:
            self.settle()
            raise
        if not got:
            if timeout is not None:
                raise LockTimeout(f"could not take the image exclusively within {timeout} s: "
                                  f"{self._report()}")
            raise DrainTimeout(f"could not take the image exclusively: still waiting after "
                               f"{watchdog} s (the lock watchdog; give a timeout, or set "
                               f"the image lock's watchdog) for {self._report()}")
        owner = self._owner
        if owner is None:
            return self
        owner.exclusive_owner = me  # (no call since the take: one step)
        return self._gives

    def _leave(self) -> None:
        """Give the image back if held, and the owner's mark if ours (idempotent)."""
        owner = self._owner
        if owner is not None and owner.exclusive_owner == self.thread_id:
            owner.exclusive_owner = None
        self.settle()

    def run(self, func: Callable[..., Any], *args: Any) -> Any:
        """``func(*args)`` with the image held exclusively; returns what it returns."""
        if self._nested:
            return func(*args)
        try:
            self._enter()
            result = func(*args)  # (not "return func()": see SharedSection.run)
        finally:
            try:
                self._leave()
            except BaseException:
                self._leave()
                raise
        return result

    def __enter__(self) -> Any:
        if self._nested:
            return self._gives if self._gives is not None else self
        try:
            entered = self._enter()  # (not "return self._enter()": see ThreadHold.acquire)
        except BaseException:  # (also an interrupt right after _enter returned)
            self._leave()
            raise
        return entered

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._nested:
            return
        try:
            self._leave()
        except BaseException:
            self._leave()
            raise

    def _report(self) -> str:
        text = self._image_lock.report()
        if self._describe is not None:
            try:
                extra = self._describe()
            except Exception as exc:  # a report must not hide the timeout
                extra = f"(could not describe the image: {exc!r})"
            if extra:
                text += "; image: " + extra
        return text


class ImageLock:
    """The global per-image lock: shared for requests, exclusive for whole-image changes.

    Guards: the image's shape (header fields, L1 table location and size, snapshot
    table, caches' existence) against change while requests run.  In ``mutex`` mode
    it is one C re-entrant mutex and "shared" holders exclude each other too; else it
    is a :class:`FairRWLock`.

    :meth:`shared` gives each thread its own :class:`ThreadHold` (kept in a
    ``threading.local`` and reused); every hold is also registered, weakly, in
    ``_flags`` (under ``_holds_lock``), for the writers' scan and for reports.
    Nested shared holds on one thread are counted, in every mode.  :meth:`exclusive`
    makes an :class:`ExclusiveHold` per call; with no timeout it waits at most
    ``watchdog`` seconds, then raises :class:`DrainTimeout` naming what is held.

    In ``fine`` mode the holds are :class:`BiasedReader` objects: while no writer is
    about, a reader only raises its own flag (the idea of Linux's per-CPU rwsems and of
    BRAVO).  A writer takes the fair lock exclusively, *revokes* the bias (new readers
    then queue on the fair lock behind it, so fairness is the fair lock's), and waits
    until every raised flag is down.  ``_revoked`` is written only by the holder of the
    fair lock's exclusive side.  Correctness rests on the order of two plain stores and
    loads, which CPython's global interpreter lock keeps sequentially consistent: a
    reader raises its flag *then* looks at ``_revoked``; a writer sets ``_revoked``
    *then* looks at the flags; so at least one of them sees the other.  A free-threaded
    interpreter gives no such promise, so there the bias is off.  A reader lowering its
    flag while the bias is revoked releases ``_flag_wake`` (a plain lock used as a
    binary semaphore) to wake the writer; the writer also looks again every slice.
    """

    def __init__(self, mode: str) -> None:
        if mode not in LOCK_MODES:
            raise ValueError(f"lock_mode must be one of {', '.join(LOCK_MODES)}, not {mode!r}")
        self.mode = mode
        self._mutex: Any = threading.RLock() if mode == "mutex" else None
        self._rw = FairRWLock() if mode != "mutex" else None
        self._local = threading.local()
        self._biased = mode == "fine" and getattr(sys, "_is_gil_enabled", lambda: True)()
        #: True while a writer holds (or is taking) the lock: readers take the slow path.
        self._revoked = False
        #: Released by a reader lowering its flag while the bias is revoked: wakes the
        #: writer waiting for the flags (unlocked: a wake-up is pending).
        self._flag_wake = threading.Lock()
        #: Guards ``_flags`` against concurrent registration while a writer scans it.
        self._holds_lock = threading.Lock()
        #: Every thread's hold (weak: a thread's hold goes with its thread).
        self._flags: weakref.WeakSet[ThreadHold] = weakref.WeakSet()
        #: exclusive() with no timeout raises DrainTimeout after this many seconds.
        self.watchdog: float | None = DEFAULT_WATCHDOG

    def shared(self) -> ThreadHold:
        """The calling thread's shared side (``take``/``settle``, ``acquire``/``release``,
        or ``with``); it belongs to the calling thread and must not be handed to another."""
        try:
            return self._local.hold  # type: ignore[no-any-return]
        except AttributeError:
            return self._new_hold()

    def _new_hold(self) -> ThreadHold:
        hold: ThreadHold
        if self.mode == "mutex":
            hold = MutexHold(self)
        elif self._biased:
            hold = BiasedReader(self)
        else:
            hold = SharedHold(self)
        with self._holds_lock:
            self._flags.add(hold)
        self._local.hold = hold
        return hold

    def exclusive(self, timeout: float | None = None, *, owner: Any = None,
                  describe: Callable[[], str] | None = None,
                  nested: bool = False, gives: Any = None) -> ExclusiveHold:
        """A context manager (or :meth:`ExclusiveHold.run`) holding the lock exclusively,
        waiting at most *timeout* s (LockTimeout), or with no timeout the watchdog's
        time (DrainTimeout).

        *owner* (the image's state) gets ``exclusive_owner`` set while held; ``with``
        returns *gives* (the Image), else the owner; *describe* adds the image's side
        to the timeout message; *nested*: the calling thread holds the image already
        (nothing is taken).
        """
        return ExclusiveHold(self, timeout, owner, describe, nested, gives)

    def held_shared_by_me(self) -> bool:
        """True if the calling thread holds the lock shared."""
        hold = getattr(self._local, "hold", None)
        return hold is not None and hold.depth > 0

    def _refuse_inside_shared(self) -> None:
        if self.held_shared_by_me():
            raise RuntimeError("exclusive() by a thread that holds the image shared (inside a "
                               "request) would wait for itself")

    def report(self) -> str:
        """What holds or waits for the lock now, for error messages."""
        with self._holds_lock:
            holds = list(self._flags)
        parts = [f"thread {hold.thread_name!r} ({hold.thread_id}) holds it shared, "
                 f"{hold.state()}" for hold in holds
                 if hold.depth or getattr(hold, "raised", False) or getattr(hold, "rw_depth", 0)]
        if self._rw is not None:
            parts += self._rw.describe()
        elif not parts:
            parts.append("the image mutex is held (by an exclusive operation)")
        return "; ".join(parts) or "nothing visible holds it (it was just released?)"

    def _wait_for_fast_readers(self, deadline: float | None) -> bool:
        """Wait until no reader's flag is raised; False if *deadline* passed first.

        Caller holds: the fair lock's exclusive side, with ``_revoked`` set.
        """
        wake = self._flag_wake
        while True:
            wake.acquire(False)  # forget a wake-up from before this look
            with self._holds_lock:
                holds = list(self._flags)
            if not any(getattr(hold, "raised", False) for hold in holds):
                return True
            wait = _SLICE
            if deadline is not None:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    return False
                wait = min(wait, _SLICE)
            wake.acquire(True, wait)

    def _reader_left(self) -> None:
        """A reader lowered its flag while a writer was about: wake the writer."""
        try:
            self._flag_wake.release()
        except RuntimeError:
            pass  # a wake-up is already pending


class SharedSection:
    """An image's global lock held shared for one operation, refusing a closed image.

    Guards nothing itself (see :class:`ThreadHold`); the image's ``closed`` flag is
    looked at once the lock is held.  Made per operation; with *locked* False (the
    calling thread holds the image exclusively) it takes nothing.

    Two ways to use it.  ``with`` is interrupt-safe but for one instruction: CPython
    may deliver a signal at the first instruction of ``__exit__``, before it can do
    anything, and the ``with`` statement does not call it again.  :meth:`run` has no
    such gap (the release runs in a ``finally`` of a frame already running, and again
    if an interrupt cut it short); prefer it, as ``Image._request`` does inline.
    """

    __slots__ = ("_before", "_cancel", "_hold", "_image")

    def __init__(self, image: Any, locked: bool = True, cancel: Any = None) -> None:
        self._image = image  # the image's state: its glock and closed flag
        self._hold: ThreadHold | None = image.glock.shared() if locked else None
        self._before = 0
        self._cancel = cancel  # looked at while :meth:`run` waits for the lock

    def run(self, func: Callable[..., Any], *args: Any) -> Any:
        """``func(*args)`` with the lock held shared; returns what it returns."""
        hold = self._hold
        if hold is None:
            return func(*args)
        before = hold.depth
        try:
            hold.take_watching(self._cancel)
            if self._image.closed:
                raise ClosedImage("I/O operation on a closed image")
            result = func(*args)  # (not "return func()": the instruction after that
        finally:                  # call would lie outside this try)
            try:
                hold.settle(before)
            except BaseException:
                hold.settle(before)
                raise
        return result

    def __enter__(self) -> None:
        hold = self._hold
        if hold is None:
            return
        before = self._before = hold.depth
        try:
            hold.take()
            if self._image.closed:
                raise ClosedImage("I/O operation on a closed image")
        except BaseException:
            hold.settle(before)
            raise

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        hold, before = self._hold, self._before
        if hold is None:
            return
        try:
            hold.settle(before)
        except BaseException:
            hold.settle(before)
            raise


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
