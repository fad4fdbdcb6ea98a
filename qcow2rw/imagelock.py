"""The global image lock (place 1 of the lock order in :mod:`qcow2rw.locks`).

:class:`ImageLock` is one image's global lock in its mode: requests hold it shared
through a per-thread :class:`ThreadHold` (:class:`MutexHold` in ``mutex`` mode,
:class:`SharedHold` on the :class:`FairRWLock` in ``rwlock`` mode, a
:class:`BiasedReader` flag in front of it in ``fine`` mode); snapshot, resize, check,
amend and close hold it exclusively through an :class:`ExclusiveHold`, with a watchdog
that names what is still held instead of waiting for ever.  :class:`SharedSection`
is one request's shared hold, refusing a closed image.  The interrupt-safety rules
all of these keep are written in :mod:`qcow2rw.locks`.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from typing import Any, Callable

from .errors import ClosedImage
from .locks import _SLICE, CANCEL_POLL_SECONDS, DEFAULT_WATCHDOG, LOCK_MODES, DrainTimeout, LockTimeout


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
