"""AioImage hardening (issue 11 §3 and §5): done-callbacks, waiting inside
``img.exclusive()``, and cancelling requests that cannot be stopped halfway.

What is checked, and how each test can fail:

* a done-callback runs after the worker has counted its request finished and released
  what a barrier held back: a callback that waits for a request queued behind a resize
  or a snapshot gets its result (it used to wait forever: here it gives up after
  ``CALLBACK_WAIT`` seconds and the test fails), and a callback that closes the pool,
  or two of them at once, returns (it used to hang: the test fails on a timed-out
  event instead);
* ``f.cancel()`` runs the callbacks after taking the request out of the queue, so they
  may wait for a request the cancelled barrier held back;
* the thread inside ``img.exclusive()`` that waits for a request of a pool gets
  ``DeadlockError`` within the grace period, ``TimeoutError`` for a shorter deadline,
  and the result when the request had already left the image; ``close()`` there raises
  too; submitting there is fine;
* ``aio.cancel(f)`` on a running flush or snapshot (held at an event point, so
  certainly running) returns False and the operation completes (the snapshot exists);
  cancelling them while queued still returns True and they never run.

Every wait has a timeout, so a broken pool fails a test instead of hanging the run.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import qcow2rw
from qcow2rw import AioImage, DeadlockError, Image
from qcow2rw.aio import DEADLOCK_GRACE, AioFuture
from qcow2rw.cancel import CancelToken
from qcow2rw.events import EventPoints

pytestmark = pytest.mark.timeout(120)

KiB = 1024
MiB = 1024 * KiB
TIMEOUT = 30.0       # waits that only a broken pool would exhaust
CALLBACK_WAIT = 5.0  # how long a callback waits for a later request before giving up


@pytest.fixture
def image(tmp_path: Path) -> Iterator[Image]:
    """A fresh 4 MiB image with event points; checked to be free and closed at the end."""
    img = qcow2rw.create(str(tmp_path / "cb.qcow2"), 4 * MiB)
    img.events = EventPoints()
    yield img
    img.events = None
    with img.exclusive(timeout=5):  # nothing of any pool holds it
        pass
    img.close()


class Pause:
    """The next request of *img* that reaches ``flush_to_os`` stops there until
    :meth:`release` (once; also on leaving the ``with`` block, so that a failing
    assertion does not leave a request stopped and the pool's close() hanging)."""

    def __init__(self, img: Image) -> None:
        assert img.events is not None
        self.events = img.events
        self.events.set_break("flush_to_os")
        self.released = False

    def wait(self) -> None:
        assert self.events.wait_break("flush_to_os", TIMEOUT), "no request got there"

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.events.resume("flush_to_os")

    def __enter__(self) -> Pause:
        return self

    def __exit__(self, *exc: object) -> None:
        self.events.clear()
        if not self.released and self.events.wait_break("flush_to_os", 0):
            self.release()


def hold_flush(pause: Pause, aio: AioImage) -> AioFuture[None]:
    """A flush stopped by *pause*: a running request until ``pause.release()``."""
    f = aio.submit_flush()
    pause.wait()
    assert f.running()
    return f


def submit_barrier(aio: AioImage, kind: str) -> AioFuture[Any]:
    if kind == "resize":
        return aio.submit_resize(8 * MiB)
    return aio.submit_snapshot("s1")


# ------------------------------------------------------------------------------------
# done-callbacks run after the worker's bookkeeping


@pytest.mark.parametrize("barrier_kind", ["resize", "snapshot"])
@pytest.mark.parametrize("callback_on", ["barrier", "request_before_it"])
def test_callback_waits_for_a_request_queued_behind_a_barrier(
        image: Image, barrier_kind: str, callback_on: str) -> None:
    """The callback of the barrier (or of a request it waits for) waits for a request
    submitted after the barrier: that request can start only once the worker has
    counted the callback's own request finished."""
    image.write(3 * MiB, b"later")
    outcome: dict[str, Any] = {}
    called = threading.Event()

    def wait_for_later(_: cf.Future[Any]) -> None:
        try:
            outcome["result"] = later.result(CALLBACK_WAIT)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outcome["error"] = exc
        finally:
            called.set()

    with AioImage(image, workers=2) as aio, Pause(image) as pause:
        before = hold_flush(pause, aio)
        barrier = submit_barrier(aio, barrier_kind)
        later = aio.submit_read(3 * MiB, 5)
        time.sleep(0.05)
        assert not barrier.running() and not later.running()
        (barrier if callback_on == "barrier" else before).add_done_callback(wait_for_later)
        pause.release()
        assert called.wait(TIMEOUT)
        assert outcome == {"result": b"later"}
        assert barrier.exception(TIMEOUT) is None
    if barrier_kind == "resize":
        assert image.size == 8 * MiB
    else:
        assert [s.name for s in image.snapshots()] == ["s1"]


def test_callback_closes_the_pool_while_a_barrier_is_held(image: Image) -> None:
    """close() from a callback on a worker: it drains through the other worker."""
    outcome: dict[str, Any] = {}
    closed = threading.Event()

    def close(_: cf.Future[Any]) -> None:
        try:
            aio.close()
            outcome["done after close"] = [f.done() for f in (barrier, after)]
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outcome["error"] = exc
        finally:
            closed.set()

    aio = AioImage(image, workers=2)
    with Pause(image) as pause:
        before = hold_flush(pause, aio)
        barrier = aio.submit_resize(8 * MiB)
        after = aio.submit_write(7 * MiB, b"after")
        before.add_done_callback(close)
        pause.release()
    assert closed.wait(CALLBACK_WAIT), "close() from the callback hangs"
    assert outcome == {"done after close": [True, True]}
    for thread in aio._dispatcher._threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    with pytest.raises(RuntimeError):
        aio.submit_read(0, 1)
    assert image.size == 8 * MiB and image.read(7 * MiB, 5) == b"after"


def test_two_callbacks_close_the_pool_at_once(image: Image) -> None:
    """Two workers, each in a callback calling close(): neither joins the other forever."""
    together = threading.Barrier(2, timeout=TIMEOUT)
    errors: list[BaseException] = []
    closed = threading.Semaphore(0)

    def close(_: cf.Future[Any]) -> None:
        try:
            together.wait()  # both callbacks are running, one on each worker
            aio.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            closed.release()

    aio = AioImage(image, workers=2)
    with image.exclusive():  # the writes wait for it: their callbacks go in first
        futures = [aio.submit_write(i * 64 * KiB, b"w") for i in range(2)]
        for f in futures:
            f.add_done_callback(close)
    for _ in futures:
        assert closed.acquire(timeout=CALLBACK_WAIT), "close() from the callbacks hangs"
    assert errors == []
    for thread in aio._dispatcher._threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive()


def test_cancel_runs_the_callbacks_after_withdrawing_the_barrier(image: Image) -> None:
    """f.cancel() on a held barrier: its callback may wait for the request behind it."""
    outcome: dict[str, Any] = {}

    def wait_for_later(_: cf.Future[Any]) -> None:
        try:
            outcome["result"] = later.result(CALLBACK_WAIT)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            outcome["error"] = exc

    with AioImage(image, workers=2) as aio, Pause(image) as pause:
        before = hold_flush(pause, aio)
        barrier = aio.submit_snapshot("never")
        later = aio.submit_read(0, 3)
        barrier.add_done_callback(wait_for_later)
        assert barrier.cancel() is True  # the callback runs here, in this thread
        assert outcome == {"result": bytes(3)}
        pause.release()
        assert before.result(TIMEOUT) is None
    assert barrier.cancelled() and image.snapshots() == []


def test_callbacks_run_once_after_the_request_is_counted_finished(image: Image) -> None:
    """One worker, 20 writes queued behind a held flush: the callback of the i-th write
    runs once, when the worker has counted the flush and writes 0..i finished."""
    seen: dict[int, list[int]] = {}

    def recorder(i: int) -> Callable[[cf.Future[Any]], None]:
        def record(_: cf.Future[Any]) -> None:
            seen.setdefault(i, []).append(sum(aio._dispatcher._finished))
        return record

    with AioImage(image, workers=1) as aio, Pause(image) as pause:
        running = hold_flush(pause, aio)
        futures = [aio.submit_write(i, b"x") for i in range(20)]
        for i, f in enumerate(futures):
            f.add_done_callback(recorder(i))
        pause.release()
        assert running.result(TIMEOUT) is None
    assert seen == {i: [i + 2] for i in range(20)}


# ------------------------------------------------------------------------------------
# waiting inside img.exclusive()


def test_result_inside_exclusive_raises_deadlock_error(image: Image) -> None:
    with AioImage(image, workers=2) as aio:
        done = aio.submit_write(0, b"before")
        done.result(TIMEOUT)
        with image.exclusive():
            assert done.result() is None  # already done: no wait, no error
            f = aio.submit_write(100, b"inside")  # submitting is fine: it just queues
            start = time.monotonic()
            with pytest.raises(DeadlockError, match="exclusive"):
                f.result(CALLBACK_WAIT)  # (bounded: the old pool timed out here)
            assert time.monotonic() - start < CALLBACK_WAIT
            with pytest.raises(DeadlockError):
                f.result()
            with pytest.raises(DeadlockError):
                f.exception()
            with pytest.raises(cf.TimeoutError):  # a shorter deadline of the caller's own
                f.result(DEADLOCK_GRACE / 10)
            assert not f.done()
        assert f.result(TIMEOUT) is None
        assert isinstance(DeadlockError("x"), (qcow2rw.Qcow2Error, RuntimeError))
    assert image.read(100, 6) == b"inside"


def test_close_inside_exclusive_raises_and_the_queue_runs_after(image: Image) -> None:
    aio = AioImage(image, workers=2)
    with image.exclusive():
        f = aio.submit_write(0, b"queued")
        with pytest.raises(DeadlockError):  # (bounded: the old pool timed out here)
            f.result(CALLBACK_WAIT)
        with pytest.raises(DeadlockError, match="close it again"):
            aio.close()
        with pytest.raises(RuntimeError):  # shut down all the same
            aio.submit_read(0, 1)
    aio.close()  # after the block: waits for the queue
    assert f.result(0) is None and image.read(0, 6) == b"queued"
    idle = AioImage(image, workers=2)
    with image.exclusive():
        idle.close()  # nothing to wait for: no error


def test_result_inside_exclusive_of_a_request_that_already_left_the_image(
        image: Image) -> None:
    """A request that released the image's lock but has not settled its future yet
    settles within the grace period: its result, no DeadlockError."""
    left, go = threading.Event(), threading.Event()

    class SlowToSettle:
        def __getattr__(self, name: str) -> Any:
            return getattr(image, name)

        def write(self, offset: int, data: Any, *, cancel: CancelToken | None = None) -> None:
            image.write(offset, data, cancel=cancel)
            left.set()
            assert go.wait(TIMEOUT)

    with AioImage(SlowToSettle(), workers=1) as aio:  # type: ignore[arg-type]
        f = aio.submit_write(0, b"left")
        assert left.wait(TIMEOUT)
        with image.exclusive(timeout=TIMEOUT):
            threading.Timer(DEADLOCK_GRACE / 5, go.set).start()
            assert f.result() is None


# ------------------------------------------------------------------------------------
# aio.cancel() on requests that cannot be stopped halfway


def test_cancel_running_flush_returns_false(image: Image) -> None:
    image.write(0, b"data")
    with AioImage(image, workers=2) as aio, Pause(image) as pause:
        f = hold_flush(pause, aio)
        assert aio.cancel(f) is False
        assert f.cancel() is False and not f.stoppable
        pause.release()
        assert f.result(TIMEOUT) is None and not f.cancelled()
        assert not f._token.cancelled
        assert aio.cancel(f) is False  # finished


def test_cancel_running_snapshot_returns_false_and_the_snapshot_exists(image: Image) -> None:
    image.write(0, b"old")
    with AioImage(image, workers=2) as aio, Pause(image) as pause:
        f = aio.submit_snapshot("s1")
        pause.wait()  # the snapshot flushes before it changes anything
        assert f.running()
        assert aio.cancel(f) is False
        assert not f.stoppable
        pause.release()
        f.result(TIMEOUT)
        assert not f.cancelled()
        aio.submit_write(0, b"new").result(TIMEOUT)
    assert [s.name for s in image.snapshots()] == ["s1"]
    image.apply_snapshot("s1")
    assert image.read(0, 3) == b"old"


@pytest.mark.parametrize("how", ["future", "aio"])
def test_cancel_queued_flush_and_snapshot_still_works(image: Image, how: str) -> None:
    # the only worker is busy: the rest queues
    with AioImage(image, workers=1) as aio, Pause(image) as pause:
        running = hold_flush(pause, aio)
        queued = [aio.submit_flush(), aio.submit_snapshot("never"), aio.submit_resize(8 * MiB)]
        for f in queued:
            assert (f.cancel() if how == "future" else aio.cancel(f)) is True
        assert cf.wait(queued, timeout=0).not_done == set()
        assert all(f.cancelled() for f in queued)
        pause.release()
        assert running.result(TIMEOUT) is None
    assert image.snapshots() == [] and image.size == 4 * MiB


def test_which_requests_are_stoppable(image: Image) -> None:
    """Reads, writes, discards, write_zeroes stay stoppable by aio.cancel once running
    (tests/test_aio.py cancels them halfway); flushes and exclusive requests do not."""
    with AioImage(image, workers=1) as aio:
        kinds: list[Callable[[], AioFuture[Any]]] = [
            lambda: aio.submit_read(0, 1), lambda: aio.submit_readinto(0, bytearray(1)),
            lambda: aio.submit_write(0, b"x"), lambda: aio.submit_discard(0, 1),
            lambda: aio.submit_write_zeroes(0, 1)]
        futures = [submit() for submit in kinds]
        exclusive = [aio.submit_flush(), aio.submit_resize(8 * MiB), aio.submit_snapshot("s"),
                     aio.submit_apply_snapshot("s"), aio.submit_delete_snapshot("s")]
        assert [f.stoppable for f in futures] == [True] * 5
        assert [f.stoppable for f in exclusive] == [False] * 5
        cf.wait(futures + exclusive, timeout=TIMEOUT)
