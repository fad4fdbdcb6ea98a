"""Futures over an :class:`~qcow2rw.image.Image`: :class:`AioImage` (DESIGN §2, §5).

An :class:`AioImage` is a pool of worker threads in front of one image.  Each
``submit_*`` call queues a request and returns an :class:`AioFuture` (a
:class:`concurrent.futures.Future`); a worker runs the request as a plain synchronous
call on the image.  The image does its own locking, so the pool adds only ordering
and cancellation:

Ordering (FIFO with exclusive barriers).  The queue is one FIFO shared by all workers,
and a worker only ever takes its head.  A *shared* request (read, readinto, write,
discard, write_zeroes, flush) at the head starts at once unless an exclusive request
is running.  An *exclusive* request (resize, snapshot create/apply/delete) at the
head starts only when no request of this pool is in flight, and while it runs no
worker takes anything.  So every request submitted before an exclusive one has
finished before it starts, and every request submitted after it starts after it has
ended.  (A worker of a plain thread pool could take the exclusive request and another
worker the request behind it, and the second could reach the image's lock first.)
The image's own global lock, which the exclusive operations take inside the image,
keeps requests of *other* threads out as well.  Shared requests start in submission
order but run concurrently and finish in any order: two overlapping writes in flight
at once may land in either order (per cluster, even), as on any block device queue;
wait for the first one's future to order them.  A request completed inline (issue
16: a read, or an overwrite where the file system allows, that needs no waiting at all
is done in the submitting thread, see :class:`AioImage`) may likewise finish before
shared requests submitted earlier that are still queued; never before an exclusive
request submitted earlier.  Likewise ``submit_flush`` makes
durable the writes that completed before it started.

Cancellation.  ``f.cancel()`` on a queued request returns True and the request never
touches the image (it is also taken out of the queue at once, so ``wait`` and
``as_completed`` see it done without waiting for a worker).  A running request is
stopped with :meth:`AioImage.cancel`: it sets the request's
:class:`~qcow2rw.cancel.CancelToken`, the image notices it at the next cluster-run
boundary and raises :class:`~qcow2rw.cancel.RequestCancelled`, and the future then ends
*cancelled* (``cancelled()`` is True, ``result()`` raises ``CancelledError``; ``wait``,
``as_completed``, done-callbacks and ``asyncio.wrap_future`` all see it so).  Each
cluster a cancelled write touched holds either its old or its new data.  A request
that finishes before it notices the token ends with its result instead.  A flush and
the exclusive requests cannot be stopped halfway, so once running (``f.running()``)
they are not cancelled at all: ``aio.cancel(f)`` returns False and they run to their
end.  Cancelling the ``asyncio`` wrapper of a future calls ``f.cancel()``, which (as for
any ``concurrent.futures`` future) cannot stop a running request: use ``aio.cancel(f)``.

Done-callbacks run after the pool's bookkeeping for their request, as
``ThreadPoolExecutor``'s do: a worker settles the future (its result is visible,
``result()`` and ``wait()`` callers wake up) with the future's callbacks *held*
(:attr:`AioFuture._hold`), then counts the request finished and releases what a barrier
held back (:meth:`_Dispatcher._done`), and only then runs the callbacks.  So a callback
may wait on any later request (one queued behind a resize or a snapshot included, as
long as another worker is free to run it) or close the pool.  ``f.cancel()`` likewise
runs the callbacks of the request it cancels after taking it out of the queue.

Waiting inside ``img.exclusive()``.  A request of the pool needs the image's global
lock, which the thread inside ``with img.exclusive():`` holds until it leaves the
block; that thread waiting for a request (``result()``, ``exception()``, ``close()``)
would wait forever.  It gets :class:`~qcow2rw.errors.DeadlockError` instead (after
:data:`DEADLOCK_GRACE` seconds, which a request that had already left the image needs
to settle its future).  Submitting from inside the block is fine: the requests run
once the block has ended.  ``concurrent.futures.wait`` and ``as_completed`` cannot be
checked so: do not call them there.

Locks (the two are never held together, and neither while a request runs on the
image, so the pool adds nothing to the image's lock order):

1. ``_Dispatcher._lock`` (a plain lock): guards the requests held behind a barrier,
   the count of released requests, the exclusive and shutdown flags, the workers
   closing the pool.  Never held while calling into a future or the image, so no user
   callback and no image lock is ever taken under it.  (The released requests wait
   in a ``SimpleQueue``, which has its own internal lock; a queued request is started
   or dropped by whoever wins its one-shot claim, :meth:`AioFuture.claim`.)  A
   finished shared request does not take it: its worker counts it in a slot of its
   own and takes the lock only when a request is held back or the finished one needs
   bookkeeping (exclusive, withdrawn); see :meth:`_Dispatcher._done` for why no
   release can be missed.
2. ``Future._condition`` (CPython's): guards a future's state, result and waiters;
   :meth:`AioFuture._set_cancelled_while_running`, :meth:`AioFuture.cancel` and
   :meth:`AioFuture._settle_cancelled` take it like ``set_result`` does.  No callback
   runs under it.

The state transitions use private names of ``concurrent.futures._base``
(``_condition``, ``_state``, ``_waiters``, ``_invoke_callbacks``, which ``set_result``,
``set_exception`` and ``cancel`` call and :class:`AioFuture` overrides to hold its
callbacks, ``PENDING``, ``RUNNING``, ``CANCELLED``, ``CANCELLED_AND_NOTIFIED``,
``FINISHED``), long-standing and still the same on CPython main; ``tests/test_aio.py``
pins them.  The public alternative, ``set_exception(CancelledError())``, would leave
``cancelled()`` False.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import _base as _futures_base
from itertools import count
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING, Any, TypeVar

from .cancel import CancelToken, RequestCancelled
from .errors import DeadlockError, UnsupportedFeature

if TYPE_CHECKING:
    from .image import Image

__all__ = ["AioFuture", "AioImage", "aio_image"]

_T = TypeVar("_T")

DEFAULT_WORKERS = 8

#: Seconds the thread that holds the image exclusively may wait for a request of a
#: pool before it gets :class:`~qcow2rw.errors.DeadlockError`.  A request that has
#: already released the image's lock settles its future within microseconds; every
#: other one is waiting for that lock, which is not released while the thread waits.
DEADLOCK_GRACE = 0.5

_PENDING = _futures_base.PENDING
_RUNNING = _futures_base.RUNNING
_CANCELLED = _futures_base.CANCELLED
_NOTIFIED = _futures_base.CANCELLED_AND_NOTIFIED
_FINISHED = _futures_base.FINISHED
_SETTLED = (_FINISHED, _CANCELLED, _NOTIFIED)


def _owns_exclusively(image: Any) -> bool:
    """True if the calling thread is inside ``image.exclusive()`` (it holds the
    image's global lock exclusively, so no request of a pool can get into it)."""
    return getattr(image, "_exclusive_owner", None) == threading.get_ident()


class AioFuture(Future[_T]):
    """The future of one request of an :class:`AioImage`.

    Beyond :class:`concurrent.futures.Future` it knows its request (``op``, e.g.
    ``"write(0x10000, 4096)"``), whether the request is ``exclusive`` and whether it can
    be stopped once running (``stoppable``: not a flush, not an exclusive request), and
    it can end *cancelled* while running (see :meth:`AioImage.cancel`).  Its
    done-callbacks run after the pool's bookkeeping for the request (module
    docstring), and :meth:`result` and :meth:`exception` refuse to wait forever in the
    thread that holds the image exclusively (:class:`~qcow2rw.errors.DeadlockError`).
    """

    #: Completed inline, in the submitting thread (issue 16): born finished.
    completed_inline = False

    #: Callbacks held back: set by the worker running the request once it has marked
    #: it running, so that settling the future does not run them; the worker runs them
    #: after its bookkeeping (:meth:`_release_callbacks`).  Only that worker writes it.
    _hold = False

    def __init__(self, dispatcher: _Dispatcher, op: str | tuple[str, int, int],
                 exclusive: bool, stoppable: bool = True) -> None:
        super().__init__()
        self._op = op  # formatted on demand: the hot path does not build strings
        self.exclusive = exclusive
        self.stoppable = stoppable and not exclusive
        self._dispatcher = dispatcher
        self._token = CancelToken()
        self._claim = [True]  # popped by whoever settles a queued request: once
        self._dropped = False  # withdrawn after its release (dispatcher's lock)

    @property
    def op(self) -> str:
        """The request, e.g. ``"write(0x10000, 4096)"``."""
        op = self._op
        if isinstance(op, str):
            return op
        name, offset, length = op
        return f"{name}({offset:#x}, {length})"

    def claim(self) -> bool:
        """Take the right to start or drop this queued request (atomic: one winner)."""
        try:
            self._claim.pop()
        except IndexError:
            return False
        return True

    # Waiting ---------------------------------------------------------------------------
    def result(self, timeout: float | None = None) -> _T:
        """As :meth:`concurrent.futures.Future.result`.

        Raises:
            DeadlockError: called, on a request not done yet, by the thread that holds
                the image exclusively (inside ``img.exclusive()``): the request needs
                the image, which that thread does not release while it waits.
        """
        if self._state not in _SETTLED:
            timeout = self._wait_as_owner(timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """As :meth:`concurrent.futures.Future.exception`; raises
        :class:`~qcow2rw.errors.DeadlockError` as :meth:`result` does."""
        if self._state not in _SETTLED:
            timeout = self._wait_as_owner(timeout)
        return super().exception(timeout)

    def _wait_as_owner(self, timeout: float | None) -> float | None:
        """What is left of *timeout* for ``Future.result``/``exception`` to wait.

        Unless the calling thread holds the image exclusively, all of it.  Otherwise no
        request can be inside the image, and a request that is not done either waits
        for the image's lock (it never gets it while this thread waits) or has just
        left the image and is settling its future: that one is given
        :data:`DEADLOCK_GRACE` seconds (or *timeout*, when shorter: then 0 is left
        and the caller's wait ends at once, with the result or ``TimeoutError``).
        Caller holds: nothing.

        Raises:
            DeadlockError: the request did not settle within the grace period.
        """
        if not _owns_exclusively(self._dispatcher.image):
            return timeout
        grace = DEADLOCK_GRACE if timeout is None else min(timeout, DEADLOCK_GRACE)
        with self._condition:
            if self._condition.wait_for(lambda: self._state in _SETTLED, grace):
                return timeout
        if timeout is not None and timeout <= DEADLOCK_GRACE:
            return 0
        raise DeadlockError(
            f"waiting for {self.op} from the thread that holds the image exclusively "
            "(inside img.exclusive()) would deadlock: the request needs the image, "
            "which is not released until that block ends; wait after the block, or "
            "call the image directly inside it")

    # Settling --------------------------------------------------------------------------
    def cancel(self) -> bool:
        """Cancel the request if it has not started; True if it is (now) cancelled.

        A queued request is taken out of the queue at once and never touches the
        image; the done-callbacks run afterwards (so they see the queue without it: a
        request it held back may already run).  A running or finished request is not
        affected (False): stop a running one with :meth:`AioImage.cancel`.
        """
        if self._state != _PENDING:  # racy peek: no request ever goes back to PENDING
            return super().cancel()
        if self._dispatcher.withdraw(self):
            if self._settle_cancelled():
                self._run_callbacks()
            return True
        # A worker (or shutdown) claimed it first: it calls set_running_or_notify_cancel,
        # which drops the request if this cancel() moved it to CANCELLED first.
        with self._condition:
            if self._state != _PENDING:
                return self._state in (_CANCELLED, _NOTIFIED)
            self._state = _CANCELLED
            self._condition.notify_all()
        self._run_callbacks()
        return True

    def _settle_cancelled(self) -> bool:
        """End a request this thread claimed (no worker will start it) cancelled.

        PENDING -> CANCELLED_AND_NOTIFIED in one step: ``wait``/``as_completed`` told,
        ``result()`` callers woken.  True if this call made the future cancelled (its
        caller then runs the callbacks); False if a racing :meth:`cancel` that lost the
        claim did (and ran them): then only the waiters are told, as
        ``set_running_or_notify_cancel`` does.  Caller holds: nothing.
        """
        with self._condition:
            ours = self._state == _PENDING
            self._state = _NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            if ours:
                self._condition.notify_all()
        return ours

    def _set_cancelled_while_running(self) -> None:
        """End a RUNNING future as cancelled (its request stopped on its token).

        What ``cancel()`` followed by ``set_running_or_notify_cancel()`` does for a
        queued future, in one step: state CANCELLED_AND_NOTIFIED, the waiters of
        ``wait``/``as_completed`` told, ``result()`` callers woken; the callbacks run as
        for ``set_result`` (held, if the worker holds them).
        Caller holds: nothing.  Only the worker running the request calls this.
        """
        with self._condition:
            if self._state != _RUNNING:
                raise InvalidStateError(f"{self._state}: {self!r}")
            self._state = _NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()

    def _invoke_callbacks(self) -> None:
        """Run the done-callbacks (called by ``set_result``, ``set_exception``,
        ``cancel``), unless the worker holds them back for after its bookkeeping."""
        if not self._hold:
            Future._invoke_callbacks(self)  # type: ignore[attr-defined]

    def _run_callbacks(self) -> None:
        """Run the done-callbacks now (the future is settled, by the caller, with no
        worker holding them).  Caller holds: nothing."""
        Future._invoke_callbacks(self)  # type: ignore[attr-defined]

    def _release_callbacks(self) -> None:
        """Run the callbacks the worker held back (the future is settled and the request
        counted finished).  Caller holds: nothing.  Only that worker calls this."""
        self._hold = False
        Future._invoke_callbacks(self)  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        state: str = self._state
        return f"<{type(self).__name__} {self.op} state={state.lower()}>"


class _CompletedFuture(AioFuture[_T]):
    """The future of a request completed inline (issue 16): FINISHED from birth.

    Building an ordinary Future costs a Condition and an RLock, and settling it a
    round of locking and notifying: more than a page-cache read itself.  This one is
    born settled and answers ``result``/``exception``/``done`` without any lock.  Its
    condition is made on first use only (``concurrent.futures.wait``/``as_completed``
    and ``add_done_callback`` take it).  Each future needs its own: ``wait`` takes the
    conditions of its futures in order of ``id()``, which orders them consistently
    only if no two futures share one (a shared one let two ``wait`` calls over mixed
    futures deadlock).  Nothing can cancel it (``cancel()`` is False, as for any
    finished future); its callbacks run at once, in the thread adding them.
    """

    completed_inline = True

    def __init__(self, dispatcher: _Dispatcher, op: str | tuple[str, int, int],
                 result: _T, exception: BaseException | None = None) -> None:
        # (Future.__init__ is not called: nothing to set up)
        self._state = _FINISHED
        self._result = result
        self._exception = exception
        self._waiters = []
        self._done_callbacks = []
        self._op = op
        self.exclusive = False
        self.stoppable = False
        self._dispatcher = dispatcher
        self._claim = []  # (no worker, withdraw or shutdown may claim it)
        self._dropped = False

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        """This future's own condition, made on first use (see the class docstring)."""
        made = self.__dict__.get("_made_condition")
        if made is None:  # (setdefault: one winner if two threads race here)
            made = self.__dict__.setdefault("_made_condition", threading.Condition())
        return made

    def result(self, timeout: float | None = None) -> _T:
        if self._exception is not None:
            raise self._exception
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._exception

    def done(self) -> bool:
        return True

    def cancel(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False


def _inline_view(buffer: Any, writable: bool) -> Any:
    """*buffer* as inline completion takes it: a bytearray or bytes (*writable*: not
    bytes) as it is, else a one-dimensional byte view; None for what the ordinary
    path must take (and report on, in the future): a read-only buffer to read into,
    a non-contiguous view, something that is no buffer."""
    kind = type(buffer)
    if kind is bytearray or (kind is bytes and not writable):
        return buffer
    try:
        view = memoryview(buffer).cast("B")
    except (TypeError, ValueError, BufferError):
        return None
    return None if writable and view.readonly else view


def _nbytes(buffer: Any) -> int:
    """The size of a bytes-like object in bytes (``len`` where that is the same)."""
    if type(buffer) in (bytes, bytearray):
        return len(buffer)
    return memoryview(buffer).nbytes


class _WorkItem:
    """One queued request: its future and the call that runs it on the image,
    ``fn(arg1, arg2, cancel=token)`` (an image method and its two arguments: no
    closure to build or call on the hot path)."""

    __slots__ = ("arg1", "arg2", "fn", "future")

    def __init__(self, future: AioFuture[Any], fn: Callable[..., Any], arg1: Any = None,
                 arg2: Any = None) -> None:
        self.future = future
        self.fn = fn
        self.arg1 = arg1
        self.arg2 = arg2

    def run(self) -> None:
        """Run the request and settle its future, its done-callbacks held back (the
        caller runs them after its bookkeeping).  Caller holds: nothing."""
        future = self.future
        if not future.claim():
            return  # withdrawn by cancel(), which has settled the future
        if not future.set_running_or_notify_cancel():
            return  # cancelled after a worker took it: never touches the image
        future._hold = True  # settled below; _Dispatcher._work runs the callbacks later
        token = future._token
        try:
            token.check()  # aio.cancel() between "running" and the call
            result = self.fn(self.arg1, self.arg2, cancel=token)
        except RequestCancelled as exc:
            if token.cancelled:
                future._set_cancelled_while_running()
            else:  # not ours (cannot happen today): pass it on as an error
                future.set_exception(exc)
        except BaseException as exc:  # noqa: BLE001 - as ThreadPoolExecutor: into the future
            future.set_exception(exc)
        else:
            future.set_result(result)
        finally:
            self.arg2 = None  # drop the request's data (a big write's buffer) now


class _Dispatcher:
    """The queue and the workers of one :class:`AioImage` (see the module docstring).

    Requests a worker may start are *released* into ``_ready``, a FIFO the workers
    block on (a C ``SimpleQueue``: a release costs one lock and one put, no Python
    condition variable).  A request behind an exclusive barrier waits in ``_held``
    until the requests released before it have finished.  Kept apart from
    :class:`AioImage` so that the worker threads do not keep the AioImage alive: when
    it is collected unclosed, its finalizer shuts this down.  It references the image
    (:attr:`image`) only to tell whether a waiting thread holds it exclusively.
    """

    def __init__(self, workers: int, name: str, image: Any = None) -> None:
        self.image = image
        #: Guards ``_held``, ``_released``, ``_dropped``, ``_exclusive``,
        #: ``_shutdown``, ``_stopped`` and ``_closers``.  Never held while a request
        #: runs or a future is settled (no user callback and no image lock under it).
        self._lock = threading.Lock()
        self._ready: SimpleQueue[_WorkItem | None] = SimpleQueue()  # None: a worker exits
        self._held: deque[_WorkItem] = deque()  # submitted behind an exclusive barrier
        self._released = 0                  # put into _ready (and not taken back)
        #: Requests each worker has finished: slot i is written by worker i only (no
        #: lock, no lost update), so in flight = _released - sum(_finished).
        self._finished = [0] * workers
        self._dropped = 0                   # released, then withdrawn; not yet dropped
        self._exclusive = False             # the request released last is exclusive
        self._shutdown = False              # no more submissions
        self._stopped = False               # the workers' exit markers are queued
        self._closers: set[threading.Thread] = set()  # workers that called shutdown(wait)
        self._threads: list[threading.Thread] = []
        #: The request each worker is running (None: idle); read without a lock, for
        #: the ``queued``/``in_flight`` figures only.
        self._current: list[_WorkItem | None] = [None] * workers
        for i in range(workers):
            thread = threading.Thread(target=self._work, args=(i,), name=f"{name}_{i}",
                                      daemon=True)
            self._threads.append(thread)
        for thread in self._threads:
            thread.start()
        _live_dispatchers.add(self)

    # Submitting and withdrawing (any thread) ---------------------------------------
    def submit(self, item: _WorkItem) -> None:
        """Queue *item* (FIFO).  Raises RuntimeError after shutdown."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit a request to a closed AioImage")
            if self._held or self._exclusive or (item.future.exclusive and self._in_flight()):
                self._held.append(item)  # behind a barrier, or a barrier that must drain
                # Count again now that it is held: a worker that finished after the count
                # above may have looked at _held before the append (see _done).
                self._release_locked()
                return
            self._released += 1
            self._exclusive = item.future.exclusive
            self._ready.put(item)

    def _in_flight(self) -> int:
        """Released requests not finished yet.  Caller holds: ``_lock`` (for
        ``_released``; a worker's slot may move on while this reads it)."""
        return self._released - sum(self._finished)

    def _release_locked(self) -> None:
        """Release held requests in order, as far as the barriers allow; once shut down
        and nothing is held any more, queue one exit marker per worker.

        Caller holds: ``_lock``.
        """
        held = self._held
        while held and not self._exclusive:
            head = held[0]
            if head.future.exclusive:
                if self._in_flight():
                    break
                self._exclusive = True
            held.popleft()
            self._released += 1
            self._ready.put(head)
        if self._shutdown and not held and not self._stopped:
            self._stopped = True
            for _ in self._threads:
                self._ready.put(None)

    def withdraw(self, future: AioFuture[Any]) -> bool:
        """Take *future*'s request away from the workers; False if one started it.

        Whoever claims a request (a worker, this, or :meth:`shutdown`) is the one that
        moves its future out of PENDING/CANCELLED for good, exactly once: a worker with
        ``set_running_or_notify_cancel``, the others with
        :meth:`AioFuture._settle_cancelled`.
        """
        with self._lock:
            for i, item in enumerate(self._held):
                if item.future is future:
                    del self._held[i]
                    future._claim.clear()
                    self._release_locked()  # it may have been the barrier
                    return True
            # Released: it stays in the queue until a worker drops it, but it is ours
            # now.  The flag goes up before the claim, so the worker that loses the
            # claim sees it and settles the count under this lock (see _done).
            future._dropped = True
            if not future.claim():
                future._dropped = False
                return False
            self._dropped += 1
            return True

    def counts(self) -> tuple[int, int]:
        """(queued, in flight) right now (a racy snapshot, for display)."""
        running = sum(1 for item in self._current if item is not None)
        with self._lock:
            queued = self._in_flight() - self._dropped - running
            return len(self._held) + max(0, queued), running

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        """Refuse new requests; optionally cancel the queued ones; optionally join.

        Without *cancel_futures* the workers run what is queued before they exit.
        Called by a worker (from a done-callback), it cannot wait for itself, nor for a
        worker that called it earlier and waits for this one: it joins the other
        workers, and the caller runs what is left once its callback returns.

        Raises:
            DeadlockError: *wait*, and the calling thread holds the image exclusively
                while requests that need it are still to run (the pool is shut down
                all the same: they run once that thread releases the image).
        """
        withdrawn: list[AioFuture[Any]] = []
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                held = list(self._held)
                self._held.clear()
                markers = 0
                while True:  # released but not taken by a worker yet
                    try:
                        item = self._ready.get_nowait()
                    except Empty:
                        break
                    if item is None:
                        markers += 1
                        continue
                    self._released -= 1
                    if item.future._dropped:
                        self._dropped -= 1
                    if item.future.exclusive:
                        self._exclusive = False
                    held.append(item)
                for _ in range(markers):
                    self._ready.put(None)
                # Claimed under the lock: a withdraw() that won a claim counted it in
                # _dropped (undone above); one that comes later loses and counts nothing.
                withdrawn = [item.future for item in held if item.future.claim()]
            self._release_locked()
            me = threading.current_thread()
            skip: set[threading.Thread] = set()
            if wait and me in self._threads:
                self._closers.add(me)
                skip = set(self._closers)  # each joins only later closers: no cycle
        for future in withdrawn:
            if future._settle_cancelled():
                future._run_callbacks()
        if wait:
            self._refuse_to_deadlock()
            for thread in self._threads:
                if thread not in skip:
                    thread.join()

    def _unfinished(self) -> int:
        """Requests held or released and not finished nor withdrawn (the ones still to
        get into the image).  Caller holds: nothing."""
        with self._lock:
            return len(self._held) + self._in_flight() - self._dropped

    def _refuse_to_deadlock(self) -> None:
        """Raise DeadlockError if the calling thread holds the image exclusively and
        requests still need it (given :data:`DEADLOCK_GRACE` for those settling).
        Caller holds: nothing."""
        if not _owns_exclusively(self.image):
            return
        deadline = time.monotonic() + DEADLOCK_GRACE
        while (left := self._unfinished()) > 0:
            if time.monotonic() >= deadline:
                raise DeadlockError(
                    f"closing the AioImage from the thread that holds the image "
                    f"exclusively (inside img.exclusive()) would deadlock: {left} "
                    "request(s) still need the image, which is not released until that "
                    "block ends; they run then (the pool accepts no new ones): close "
                    "it again after the block to wait for them")
            time.sleep(0.002)

    # Workers ------------------------------------------------------------------------
    def _done(self, item: _WorkItem, index: int) -> None:
        """Worker *index* accounts for *item* having finished, and releases what a
        barrier held back.

        The count goes into the worker's own slot first, *then* ``_held`` is looked
        at.  A submitter holds a request back by appending it to ``_held`` and *then*
        counting what is in flight (:meth:`submit`).  So either this worker sees the
        held request (and releases it under the lock), or the submitter's count sees
        this request finished (and releases it itself): a release is never missed.
        (Both orders rest on CPython's global interpreter lock making plain stores and
        loads sequentially consistent, as ``ImageLock`` does.)
        """
        self._finished[index] += 1
        future = item.future
        if future.exclusive or future._dropped or self._held:
            with self._lock:
                if future._dropped:  # read again under the lock: withdraw() may have
                    self._dropped -= 1  # raised it for a claim it then lost
                if future.exclusive:
                    self._exclusive = False
                if self._held and not self._exclusive:
                    self._release_locked()

    def _take(self, index: int) -> _WorkItem | None:
        """Worker *index* waits for the next released request; None: time to exit."""
        item = self._ready.get()
        self._current[index] = item
        return item

    def _work(self, index: int) -> None:
        """Worker *index*'s loop: run a request, count it finished (releasing what it
        held back), then run its future's done-callbacks (module docstring)."""
        current = self._current
        while (item := self._take(index)) is not None:
            future = item.future
            try:
                item.run()
            finally:
                current[index] = None
                self._done(item, index)
                if future._hold:
                    future._release_callbacks()
            del item, future  # do not keep the last request (and its data) alive


#: Every dispatcher still referenced (its workers reference it while they run); at exit
#: each is shut down and its queue run to the end (joining finished workers is free).
_live_dispatchers: weakref.WeakSet[_Dispatcher] = weakref.WeakSet()


@atexit.register
def _drain_at_exit() -> None:
    """At interpreter exit, let every pool finish its queue (workers are daemons)."""
    for dispatcher in list(_live_dispatchers):
        dispatcher.shutdown(wait=True, cancel_futures=False)


_pool_numbers = count()


class AioImage:
    """A thread pool of *workers* threads running requests on *img*, returning futures.

    See the module docstring for ordering (FIFO, exclusive requests are barriers) and
    cancellation.  The AioImage does not own the image: :meth:`close` (also on leaving
    a ``with`` block) runs what is queued, stops the workers and leaves the image
    open.  Requests keep a reference to the buffers they were given (``data`` of a
    write, ``buffer`` of a readinto) until they finish; do not change or reuse them
    before the future is done.
    """

    def __init__(self, img: Image, workers: int = DEFAULT_WORKERS, inline: str = "auto") -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if inline not in ("auto", "never"):
            raise ValueError(f"inline must be 'auto' or 'never', not {inline!r}")
        self.image = img
        self.workers = workers
        #: Inline completion (issue 16): "auto" where the OS has RWF_NOWAIT.
        self.inline = (inline == "auto" and hasattr(os, "RWF_NOWAIT")
                       and hasattr(img, "read_nowait"))
        #: The longest read that may complete inline: one cluster.
        self._inline_most = getattr(img, "cluster_size", 0)
        #: Writes are tried inline until the file system refuses one (EOPNOTSUPP).
        self._inline_writes = self.inline and hasattr(img, "write_nowait")
        self._dispatcher = _Dispatcher(workers, f"qcow2rw-aio-{next(_pool_numbers)}", img)
        # Collected without close(): stop the workers once the queue is done.
        self._finalizer = weakref.finalize(self, self._dispatcher.shutdown, False, False)
        self._finalizer.atexit = False  # at exit, _drain_at_exit joins the workers instead

    # Shared requests ------------------------------------------------------------------
    def submit_read(self, offset: int, length: int) -> AioFuture[bytes]:
        """``image.read(offset, length)``; the future's result is the bytes.

        With ``inline``, a read the page cache can serve at once completes in this
        thread: the future is returned done (see :meth:`_inline_read`).
        """
        if self.inline and type(length) is int and 0 < length <= self._inline_most:
            # (no buffer made in vain; a bad length is reported in the future)
            buf = bytearray(length)
            if self._inline_read(offset, buf):
                return self._completed(("read", offset, length), bytes(buf))
        return self._submit(("read", offset, length), False, self.image.read, offset, length)

    def submit_readinto(self, offset: int, buffer: Any) -> AioFuture[int]:
        """``image.readinto(offset, buffer)``; the result is the number of bytes read.

        A cancelled readinto may have filled part of *buffer*; so may a read tried
        inline that went to the pool after all (it fills all of it then).
        """
        if self.inline:
            view = _inline_view(buffer, writable=True)
            if view is not None and len(view) and self._inline_read(offset, view):
                return self._completed(("readinto", offset, len(view)), len(view))
        return self._submit(("readinto", offset, _nbytes(buffer)), False, self.image.readinto,
                            offset, buffer)

    def _inline_read(self, offset: int, view: Any) -> bool:
        """Issue 16's inline completion: read in the submitting thread when nothing
        would wait (:meth:`Image.read_nowait`) and :meth:`_no_barrier`."""
        return self._no_barrier() and self.image.read_nowait(offset, view)

    def _no_barrier(self) -> bool:
        """No barrier of this pool is queued or running (nor is it shut down), so a
        request completed inline now cannot overtake an exclusive request submitted
        before it.  (The flags are read without the pool's lock: a barrier this
        thread submitted earlier has set them already.)"""
        dispatcher = self._dispatcher
        return not (dispatcher._held or dispatcher._exclusive or dispatcher._shutdown)

    def _completed(self, op: tuple[str, int, int], result: Any,
                   exception: BaseException | None = None) -> AioFuture[Any]:
        """A future that is done already (an inline request): nothing can cancel it."""
        return _CompletedFuture(self._dispatcher, op, result, exception)

    def submit_write(self, offset: int, data: Any) -> AioFuture[None]:
        """``image.write(offset, data)``; *data* must stay unchanged until it is done.

        With ``inline``, an overwrite of an allocated cluster completes in this thread
        where the file system takes ``RWF_NOWAIT`` writes (:meth:`Image.write_nowait`).
        """
        if self.inline and self._inline_writes:
            view = _inline_view(data, writable=False)
            if view is not None and len(view) and self._no_barrier():
                op = ("write", offset, len(view))
                try:
                    done = self.image.write_nowait(offset, view)
                except Exception as exc:  # (a write begun inline failed as it ended)
                    return self._completed(op, None, exc)
                if done:
                    return self._completed(op, None)
            datafile = self.image.state.datafile
            if datafile is not None and datafile.nowait_writes is False:
                self._inline_writes = False  # (refused once: never tried again)
        return self._submit(("write", offset, _nbytes(data)), False, self.image.write,
                            offset, data)

    def submit_discard(self, offset: int, length: int) -> AioFuture[None]:
        """``image.discard(offset, length)``."""
        return self._submit(("discard", offset, length), False, self.image.discard,
                            offset, length)

    def submit_write_zeroes(self, offset: int, length: int) -> AioFuture[None]:
        """``image.write_zeroes(offset, length)``."""
        return self._submit(("write_zeroes", offset, length), False, self.image.write_zeroes,
                            offset, length)

    def submit_flush(self) -> AioFuture[None]:
        """``image.flush()``: durable are the writes completed before it started."""
        img = self.image
        return self._submit("flush()", False, lambda _a, _b, cancel: img.flush(),
                            stoppable=False)

    # Exclusive requests (barriers) ----------------------------------------------------
    def submit_resize(self, size: int, shrink: bool = False) -> AioFuture[None]:
        """``image.resize(size, shrink=shrink)``, as a barrier (module docstring)."""
        img = self.image
        return self._submit(f"resize({size})", True,
                            lambda _a, _b, cancel: img.resize(size, shrink=shrink))

    def submit_snapshot(self, name: str) -> AioFuture[Any]:
        """``image.create_snapshot(name)``, as a barrier.

        The future fails with :class:`~qcow2rw.errors.UnsupportedFeature` when the
        image has no snapshot support.
        """
        return self._submit_snapshot_op("create_snapshot", name)

    def submit_apply_snapshot(self, name: str) -> AioFuture[Any]:
        """``image.apply_snapshot(name)``, as a barrier."""
        return self._submit_snapshot_op("apply_snapshot", name)

    def submit_delete_snapshot(self, name: str) -> AioFuture[Any]:
        """``image.delete_snapshot(name)``, as a barrier."""
        return self._submit_snapshot_op("delete_snapshot", name)

    def _submit_snapshot_op(self, method: str, name: str) -> AioFuture[Any]:
        img = self.image

        def call(_a: None, _b: None, cancel: CancelToken) -> Any:
            func = getattr(img, method, None)
            if func is None:
                raise UnsupportedFeature(f"this image has no {method}() (snapshots are "
                                         "not supported yet)")
            return func(name)

        return self._submit(f"{method}({name!r})", True, call)

    def _submit(self, op: str | tuple[str, int, int], exclusive: bool,
                fn: Callable[..., _T], arg1: Any = None, arg2: Any = None, *,
                stoppable: bool = True) -> AioFuture[_T]:
        """Queue ``fn(arg1, arg2, cancel=token)``; return its future.  *stoppable*:
        ``aio.cancel`` may stop the request once running (never for exclusive ones)."""
        future: AioFuture[_T] = AioFuture(self._dispatcher, op, exclusive, stoppable)
        self._dispatcher.submit(_WorkItem(future, fn, arg1, arg2))
        return future

    # Cancellation ---------------------------------------------------------------------
    def cancel(self, future: Future[Any]) -> bool:
        """Cancel a request of this pool, queued or running.

        Queued: the same as ``future.cancel()`` (True; it never touches the image).
        Running: sets its cancel token and returns True; the request stops at its
        next cluster-run boundary and the future ends cancelled, unless the request
        finishes before it notices, in which case the future ends with its result
        (so look at ``future.cancelled()`` once it is done).  A running flush or
        exclusive request (resize, snapshot create/apply/delete) cannot be stopped
        halfway: False, and it runs to its end.  Already finished: False (True if it
        had been cancelled).

        Raises:
            ValueError: *future* was not returned by this AioImage.
        """
        if not isinstance(future, AioFuture) or future._dispatcher is not self._dispatcher:
            raise ValueError("not a future of this AioImage")
        if future.cancel():
            return True
        if not future.stoppable or future.done():
            return False
        future._token.cancel()
        return True

    # Shutting down --------------------------------------------------------------------
    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting requests, as ``Executor.shutdown``; the image stays open.

        Args:
            wait: return only once every request has finished and the workers exited.
            cancel_futures: cancel the requests still queued (running ones finish).

        Raises:
            DeadlockError: *wait*, called by the thread that holds the image
                exclusively while requests still need the image: they cannot run
                before that thread leaves ``img.exclusive()``.  The pool is shut down
                all the same; they run after the block (``close()`` then waits).
        """
        self._finalizer.detach()
        self._dispatcher.shutdown(wait, cancel_futures)

    def close(self) -> None:
        """Run every queued request to its end, then stop the workers (image stays open).

        From a done-callback (on a worker) it waits for the other workers only; the
        calling worker runs what is left after the callback.  From the thread inside
        ``img.exclusive()``, with requests still to run, it raises
        :class:`~qcow2rw.errors.DeadlockError` (see :meth:`shutdown`).
        """
        self.shutdown(wait=True)

    @property
    def queued(self) -> int:
        """Requests submitted and not yet started."""
        return self._dispatcher.counts()[0]

    @property
    def in_flight(self) -> int:
        """Requests running on the image right now."""
        return self._dispatcher.counts()[1]

    def __enter__(self) -> AioImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        queued, running = self._dispatcher.counts()
        return (f"<AioImage of {self.image!r}: {self.workers} workers, "
                f"{queued} queued, {running} in flight>")


def aio_image(img: Image, workers: int = DEFAULT_WORKERS) -> AioImage:
    """``Image.aio(workers)``: a new :class:`AioImage` over *img*."""
    return AioImage(img, workers=workers)
