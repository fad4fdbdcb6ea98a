"""Issue 11 §6: the overlap map's invalidation race, nested shared holds, and the
interrupt-safe pieces of qcow2rw.locks (FairRWLock, Gate, OwnedLock).

Each test names how it was seen failing on the code before the fix.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

import qcow2rw
from qcow2rw import imagelock, locks
from qcow2rw.imagelock import FairRWLock, ImageLock, SharedHold
from qcow2rw.locks import LOCK_MODES, Gate, LockTimeout, OwnedLock
from qcow2rw.overlap import ACTIVE_L2, _Intervals

from helpers import thread_holding_shared


# --------------------------------------------------------------------------- overlap map
def test_invalidate_is_not_undone_by_a_concurrent_added(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """An added() that copied the map before an invalidate() must not publish its copy
    after it: the copy still lacks whatever moved, and the next check would trust it.

    The invalidation runs in another thread while added() is building its copy.  Seen
    failing before the fix (invalidate() took no lock): the invalidation went through at
    once, then added() published the stale copy and ``_union`` was not None.
    """
    path = tmp_path / "overlap.qcow2"
    qcow2rw.create(path, 8 << 20, cluster_size=4096).close()
    img = qcow2rw.open(path, overlap_check="cached")
    overlap = img.overlap
    assert overlap is not None
    assert overlap.find(1 << 20, 512) is None  # builds the map
    assert overlap._union is not None
    original = _Intervals.with_added
    invalidation = threading.Thread(target=overlap.invalidate)

    def with_added_meanwhile(self: _Intervals, start: int, end: int, kind: int) -> _Intervals:
        if not invalidation.is_alive() and invalidation.ident is None:
            invalidation.start()
            invalidation.join(0.3)  # done at once without the lock; waits for it with
        return original(self, start, end, kind)

    monkeypatch.setattr(_Intervals, "with_added", with_added_meanwhile)
    overlap.added(6 << 20, 4096, ACTIVE_L2)
    invalidation.join(5)
    assert not invalidation.is_alive()
    assert overlap._union is None, "a copy made before invalidate() was published after it"
    monkeypatch.undo()
    assert overlap.find(1 << 20, 512) is None  # rebuilt
    img.close()


def test_an_interrupted_addition_leaves_the_map_whole(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception (an interrupt) inside added() leaves no half-inserted list behind:
    the map is rebuilt at the next check.

    Seen failing before the fix (the per-kind list was changed in place, one insert at
    a time): the interrupt sweep of tests/test_interrupts.py got ``IndexError: list
    index out of range`` from ``_Intervals.add`` at the next addition.
    """
    path = tmp_path / "overlap.qcow2"
    qcow2rw.create(path, 8 << 20, cluster_size=4096).close()
    img = qcow2rw.open(path, overlap_check="cached")
    overlap = img.overlap
    assert overlap is not None
    overlap.find(1 << 20, 512)
    overlap.added(5 << 20, 4096, ACTIVE_L2)  # the per-kind list of active L2 tables exists

    class Interrupt(BaseException):
        pass

    def interrupted(self: _Intervals, start: int, end: int, kind: int) -> _Intervals:
        raise Interrupt

    monkeypatch.setattr(_Intervals, "with_added", interrupted)
    with pytest.raises(Interrupt):
        overlap.added(6 << 20, 4096, ACTIVE_L2)
    monkeypatch.undo()
    assert overlap._union is None  # stale: rebuilt at the next check
    for per in list(overlap._by_kind.values()):
        assert len(per.starts) == len(per.ends) == len(per.kinds)
    overlap.added(7 << 20, 4096, ACTIVE_L2)
    assert overlap.find(1 << 20, 512) is None
    img.close()


# --------------------------------------------------------------------------- nesting
@pytest.mark.parametrize("mode,path", [("mutex", "-"), ("rwlock", "-"), ("fine", "fast"),
                                       ("fine", "slow")])
def test_nested_shared_hold_keeps_a_writer_out_until_the_outer_release(mode: str,
                                                                       path: str) -> None:
    """A shared hold taken twice on one thread is counted, in every mode: the inner
    release does not let a writer in beside the outer hold.

    Seen failing before the fix: fine mode, production classes (QCOW2RW_DEBUG_LOCKS=0):
    the flag was a bool, the inner release lowered it and the writer went in at once
    (on the slow path, the nested acquire raised the flag and the inner release gave
    back the library lock); debug classes: the nested acquire failed its assertion;
    mutex mode: the nested acquire of the plain mutex never returned (here: within 2 s).
    """
    lock = ImageLock(mode)
    mine = lock.shared()
    if path == "slow":
        lock._revoked = True  # as if a writer were about: the outer hold takes the fair lock
    assert mine.acquire(timeout=2)
    lock._revoked = False
    if path == "slow":
        assert mine._on_slow_path
    assert mine.acquire(timeout=2), "a nested shared hold was refused"
    mine.release()
    inside = threading.Event()

    def writer() -> None:
        with lock.exclusive(timeout=10):
            inside.set()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert not inside.wait(0.3), "a writer got in beside the outer shared hold"
    finally:
        mine.release()
        thread.join(10)
    assert inside.is_set()
    with pytest.raises(RuntimeError, match="not held"):
        mine.release()


@pytest.mark.parametrize("mode", LOCK_MODES)
def test_exclusive_inside_a_shared_hold_is_refused(mode: str) -> None:
    """exclusive() by a thread inside a request would wait for itself: refused at once."""
    lock = ImageLock(mode)
    with lock.shared():
        with pytest.raises(RuntimeError, match="wait for itself"):
            with lock.exclusive(timeout=5):
                pass  # pragma: no cover
    with lock.exclusive(timeout=5):
        pass


@pytest.mark.parametrize("mode", LOCK_MODES)
def test_shared_inside_an_exclusive_hold_is_refused_and_leaves_it_held(mode: str) -> None:
    """The thread holding the lock exclusively asking for it shared is refused at once,
    and the refusal gives back nothing of the exclusive hold."""
    lock = ImageLock(mode)
    hold = lock.exclusive(timeout=5)
    with hold:
        with pytest.raises(RuntimeError, match="exclusively"):
            with lock.shared():
                pass  # pragma: no cover
        assert hold.held()
        assert lock.shared().depth == 0
    assert not hold.held()
    with lock.exclusive(timeout=1):
        pass


# --------------------------------------------------------------------------- fair lock
class _Ticket:
    """A bare ticket for FairRWLock."""

    def __init__(self, name: str) -> None:
        self.rw_depth = 0
        self.thread_id = object()  # not a thread: never "the same thread"
        self.thread_name = name


def test_fair_lock_grants_in_order_and_withdraws_on_timeout() -> None:
    """Queued requests are granted in order (a writer alone, readers together); a waiter
    whose deadline passes leaves the queue and no longer holds readers back."""
    rw = FairRWLock()
    first, writer, reader, late = (_Ticket(n) for n in ("first", "writer", "reader", "late"))
    assert rw.acquire(first, False)
    assert not rw.acquire(writer, True, time.monotonic() + 0.05)  # timed out, withdrew
    assert rw._queue == [] and writer.rw_depth == 0
    got: list[str] = []

    def take(ticket: _Ticket, exclusive: bool) -> None:
        if rw.acquire(ticket, exclusive, time.monotonic() + 5):
            got.append(ticket.thread_name)

    threads = [threading.Thread(target=take, args=(writer, True))]
    threads[0].start()
    while not rw._queue:
        time.sleep(0.001)
    threads.append(threading.Thread(target=take, args=(reader, False)))
    threads[1].start()
    while len(rw._queue) < 2:
        time.sleep(0.001)
    assert got == []  # the reader queued behind the writer, though readers hold it
    rw.release(first)
    threads[0].join(5)
    assert got == ["writer"] and reader.rw_depth == 0
    rw.release(writer)
    threads[1].join(5)
    assert got == ["writer", "reader"]
    assert rw.acquire(late, False)  # readers share
    rw.release(reader)
    rw.release(late)
    assert (rw._readers, rw._writer, rw._queue) == (0, None, [])


def test_fair_lock_interrupted_waiter_leaves_nothing_behind() -> None:
    """A waiter interrupted while it waits leaves the queue; one interrupted just after
    its grant gives the grant back.  Either way the next request gets in at once."""
    rw = FairRWLock()
    holder, waiter = _Ticket("holder"), _Ticket("waiter")
    assert rw.acquire(holder, True)

    class Interrupt(BaseException):
        pass

    original = imagelock._Waiter.__init__

    def interrupt_later(self: Any, ticket: Any, exclusive: bool) -> None:
        original(self, ticket, exclusive)
        real = self.wake

        class Wake:
            def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
                real.acquire(blocking, timeout)
                raise Interrupt  # as if the signal came while (or right after) waiting

            def release(self) -> None:
                real.release()

        self.wake = Wake()

    imagelock._Waiter.__init__ = interrupt_later  # type: ignore[method-assign]
    try:
        with pytest.raises(Interrupt):  # interrupted while queued
            rw.acquire(waiter, False)
        assert rw._queue == [] and waiter.rw_depth == 0
        rw.release(holder)
        assert rw.acquire(holder, True)
        done = threading.Event()

        def release_soon() -> None:
            time.sleep(0.05)
            rw.release(holder)  # grants the waiter: its wake-up is then interrupted
            done.set()

        threading.Thread(target=release_soon).start()
        with pytest.raises(Interrupt):
            rw.acquire(waiter, False)
        done.wait(5)
    finally:
        imagelock._Waiter.__init__ = original  # type: ignore[method-assign]
    assert (rw._readers, rw._writer, rw._queue, waiter.rw_depth) == (0, None, [], 0)
    assert rw.acquire(holder, True, time.monotonic() + 1)


def test_shared_hold_interrupted_right_after_its_grant_settles() -> None:
    """take() interrupted after the fair lock granted it, before ``depth`` was set: the
    hold's settle() still gives the grant back (rw_depth knows)."""
    lock = ImageLock("rwlock")
    hold = lock.shared()
    assert isinstance(hold, SharedHold)
    assert lock._rw is not None
    assert lock._rw.acquire(hold, False)  # what take() did before the interrupt
    assert hold.depth == 0 and hold.rw_depth == 1
    hold.settle(0)
    assert hold.rw_depth == 0 and lock._rw._readers == 0
    with lock.exclusive(timeout=1):
        pass


# --------------------------------------------------------------------------- gate, owned lock
def test_gate_wakes_every_waiter_once_set() -> None:
    gate = Gate()
    assert not gate.wait(0.01)
    woke: list[int] = []
    threads = [threading.Thread(target=lambda i=i: (gate.wait(), woke.append(i)))
               for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.02)
    assert woke == []
    gate.set()
    gate.set()  # a second set does nothing
    for t in threads:
        t.join(5)
    assert sorted(woke) == [0, 1, 2, 3]
    assert gate.is_set() and gate.wait() and gate.wait(0)


def test_owned_lock_is_a_c_lock_that_refuses_a_second_take() -> None:
    lock = OwnedLock()
    with lock:
        assert lock.held_by_me()
        with pytest.raises(RuntimeError, match="taken twice"):
            with lock:
                pass  # pragma: no cover
        assert lock.held_by_me()
    assert not lock.held_by_me()
    reentrant = OwnedLock(reentrant=True)
    with reentrant, reentrant:
        assert reentrant._recursion_count() == 2
    assert not reentrant.held_by_me()
    # with: the C lock's own __exit__, released in one step
    assert type(lock).__exit__ is locks._thread.RLock.__exit__


def test_lock_timeout_names_the_holder() -> None:
    """A LockTimeout says what holds the image."""
    lock = ImageLock("fine")
    with thread_holding_shared(lock, "holding-reader"):
        with pytest.raises(LockTimeout, match="holding-reader.*reader flag raised"):
            with lock.exclusive(timeout=0.1):
                pass  # pragma: no cover
