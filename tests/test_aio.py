"""The futures API: :class:`qcow2rw.AioImage` (DESIGN §2 and §5, issue 4 item 4).

What is checked, and how each test can fail:

* results: futures return what the synchronous calls return; errors arrive through
  the future and the worker survives them;
* concurrency: many writes from 8 workers, to disjoint regions (exact shadow) and to
  overlapping ones (each byte holds the data of one write that covered it), in every
  lock mode;
* ordering: an exclusive submission (resize, snapshot) is a FIFO barrier: every request
  submitted before it has ended when it starts, every one after it starts after it
  ended (checked on the start/end log of a recording proxy);
* cancellation: ``f.cancel()`` on queued requests (workers held on a gate so the queue
  fills) leaves the image untouched (the proxy records no call, the content is
  unchanged); ``aio.cancel(f)`` on a running multi-cluster write, paused
  deterministically on its cancel token mid-request, ends the future cancelled and
  leaves every cluster with its old or its new data; ``wait``, ``as_completed``,
  callbacks and ``asyncio.wrap_future`` (already waiting when it happens) all see it;
  a running exclusive request is not cancelled (``aio.cancel`` says False);
* shutdown: ``close()`` drains, ``shutdown(cancel_futures=True)`` cancels the queue,
  submitting afterwards raises, no worker, queued request, waiter or image lock is
  left behind, and ``qemu-img check`` finds the image clean.

Every wait has a timeout, so a broken pool fails a test instead of hanging the run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future
from pathlib import Path
from typing import Any

import pytest

import qcow2rw
import qcow2rw.aio
from qcow2rw import AioImage, Image, qemutools
from qcow2rw.aio import AioFuture, aio_image
from qcow2rw.cancel import CancelToken
from qcow2rw.errors import ReadOnlyImage, UnsupportedFeature

from helpers import Recorder

pytestmark = pytest.mark.timeout(120)

KiB = 1024
MiB = 1024 * KiB
TIMEOUT = 30.0   # every wait in this file; nothing here should take more than a second or two
QUIET = 0.2      # how long a request that must stay held back is watched


# ------------------------------------------------------------------------------------
# fixtures and helpers


def assert_no_leftovers(img: Image) -> None:
    """No request holds the image: it can be taken exclusively at once."""
    with img.exclusive(timeout=5):
        pass


def qemu_check_if_available(path: str) -> None:
    """``qemu-img check`` must be clean (silently skipped without qemu-img)."""
    if qemutools.available():
        code, report = qemutools.check(path)
        assert code == 0, report


@pytest.fixture
def new_image(tmp_path: Path) -> Iterator[Callable[..., Image]]:
    """``new_image(size, **create_options)``: a fresh writable image, checked at the end.

    Teardown: no image lock left behind, close, then ``qemu-img check`` when installed.
    """
    made: list[Image] = []

    def make(size: int = 64 * MiB, *, name: str = "aio.qcow2", lock_mode: str = "fine",
             **options: Any) -> Image:
        path = str(tmp_path / name)
        img = qcow2rw.create(path, size, **options)
        if lock_mode != "fine":
            img.close()
            img = qcow2rw.open(path, lock_mode=lock_mode)
        made.append(img)
        return img

    yield make
    for img in made:
        if not img.closed:
            assert_no_leftovers(img)
            img.close()
        qemu_check_if_available(img.path)


def pausing_token_class(pause_at: int) -> tuple[type[CancelToken], threading.Event,
                                                 threading.Event]:
    """A CancelToken whose request pauses the *pause_at*-th time it looks at the flag.

    Returns (class, reached, resume): ``reached`` is set when the request is paused
    (it is then running, between two cluster runs), ``resume`` lets it go on.  The
    class counts every look at ``cancelled`` (``check()`` and direct reads alike), so
    ``looks`` of an unpaused token (pause_at=0) tells how often a request looks.
    """
    reached, resume = threading.Event(), threading.Event()

    class PausingToken(CancelToken):
        __slots__ = ("_flag", "looks")

        def __init__(self) -> None:
            self.looks = 0
            super().__init__()

        @property  # type: ignore[override]
        def cancelled(self) -> bool:
            self.looks += 1
            if self.looks == pause_at:
                reached.set()
                assert resume.wait(TIMEOUT), "never resumed"
            return self._flag

        @cancelled.setter
        def cancelled(self, value: bool) -> None:
            self._flag = value

    return PausingToken, reached, resume


def fill(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def wait_all(futures: list[Any]) -> None:
    done, not_done = cf.wait(futures, timeout=TIMEOUT)
    assert not not_done, f"{len(not_done)} requests never finished: {list(not_done)[:3]}"


def worker_threads(aio: AioImage) -> list[threading.Thread]:
    return list(aio._dispatcher._threads)


# ------------------------------------------------------------------------------------
# the private names of concurrent.futures that AioFuture relies on


def test_private_future_names_are_still_there() -> None:
    """Pin what ``AioFuture._set_cancelled_while_running`` uses (module docstring).

    If CPython renames any of these, this test says so before the behaviour tests
    below fail in more puzzling ways.
    """
    from concurrent.futures import _base

    f: Future[None] = Future()
    assert isinstance(f._condition, threading.Condition)  # type: ignore[attr-defined]
    assert f._state == _base.PENDING == "PENDING"  # type: ignore[attr-defined]
    assert f._waiters == []  # type: ignore[attr-defined]
    assert callable(f._invoke_callbacks)  # type: ignore[attr-defined]
    assert _base.RUNNING == "RUNNING"
    assert _base.CANCELLED == "CANCELLED" and _base.FINISHED == "FINISHED"
    assert _base.CANCELLED_AND_NOTIFIED == "CANCELLED_AND_NOTIFIED"
    # set_result, set_exception and cancel run the callbacks through _invoke_callbacks,
    # which AioFuture overrides to hold them back until the worker's bookkeeping
    calls: list[str] = []

    class Hooked(Future):  # type: ignore[type-arg]
        def _invoke_callbacks(self) -> None:
            calls.append(self._state)  # type: ignore[attr-defined]

    for settle in (lambda g: g.set_result(1), lambda g: g.set_exception(OSError()),
                   lambda g: g.cancel()):
        g = Hooked()
        g.add_done_callback(lambda _: calls.append("called directly"))
        settle(g)
    assert calls == ["FINISHED", "FINISHED", "CANCELLED"]
    for waiter in (_base._AsCompletedWaiter, _base._FirstCompletedWaiter,
                   _base._AllCompletedWaiter):
        assert callable(waiter.add_cancelled)
    # wait() and as_completed() treat CANCELLED_AND_NOTIFIED as done
    f.set_running_or_notify_cancel()
    f._state = _base.CANCELLED_AND_NOTIFIED  # type: ignore[attr-defined]
    assert f.cancelled() and f.done()
    assert cf.wait([f], timeout=0).done == {f}
    assert list(cf.as_completed([f], timeout=0)) == [f]


# ------------------------------------------------------------------------------------
# results


def test_reads_equal_synchronous_reads(new_image: Callable[..., Image]) -> None:
    img = new_image(16 * MiB)
    rng = random.Random(1)
    for i in range(60):  # allocated, unallocated, zeroed and discarded areas, unaligned
        off = rng.randrange(img.size - 300 * KiB)
        img.write(off, fill(i, rng.randint(1, 300 * KiB)))
    img.write_zeroes(3 * MiB + 7, 200 * KiB)
    img.discard(8 * MiB, 256 * KiB)
    ranges = [(rng.randrange(img.size - 1), rng.randint(1, 400 * KiB)) for _ in range(300)]
    ranges = [(off, min(n, img.size - off)) for off, n in ranges]
    with AioImage(img, workers=8) as aio:
        reads = [aio.submit_read(off, n) for off, n in ranges]
        bufs = [bytearray(n) for _, n in ranges[:50]]
        intos = [aio.submit_readinto(off, buf) for (off, _), buf in zip(ranges, bufs)]
        wait_all(reads + intos)
        for (off, n), f in zip(ranges, reads):
            assert f.result() == img.read(off, n), f
        for (off, n), g, buf in zip(ranges, intos, bufs):
            assert g.result() == n
            assert buf == img.read(off, n), g
    assert all(not t.is_alive() for t in worker_threads(aio))


def test_every_kind_of_request_and_errors(new_image: Callable[..., Image]) -> None:
    img = new_image(4 * MiB)
    with AioImage(img, workers=3) as aio:
        assert aio.submit_write(100, b"abc").result(TIMEOUT) is None
        assert aio.submit_read(99, 5).result(TIMEOUT) == b"\0abc\0"
        assert aio.submit_write_zeroes(101, 1).result(TIMEOUT) is None
        assert aio.submit_read(100, 3).result(TIMEOUT) == b"a\0c"
        assert aio.submit_discard(0, 64 * KiB).result(TIMEOUT) is None
        assert aio.submit_read(100, 3).result(TIMEOUT) == b"\0\0\0"
        assert aio.submit_flush().result(TIMEOUT) is None
        bad = aio.submit_read(img.size - 1, 2)  # past the end: the error comes through
        with pytest.raises(qcow2rw.OutOfRange):
            bad.result(TIMEOUT)
        assert isinstance(bad.exception(TIMEOUT), qcow2rw.OutOfRange)
        assert aio.submit_read(0, 1).result(TIMEOUT) == b"\0"  # workers survive errors
        with pytest.raises(TypeError):
            aio.submit_write(0, "not bytes")  # refused at submit time
        assert "read" in repr(bad) and "AioImage" in repr(aio)
    with pytest.raises(ValueError):
        AioImage(img, workers=0)


def test_readonly_image_refuses_writes_through_the_future(new_image: Callable[..., Image],
                                                          tmp_path: Path) -> None:
    new_image(1 * MiB, name="ro.qcow2").close()
    with qcow2rw.open(str(tmp_path / "ro.qcow2"), readonly=True) as img, \
            AioImage(img, workers=2) as aio:
        with pytest.raises(ReadOnlyImage):
            aio.submit_write(0, b"x").result(TIMEOUT)
        assert aio.submit_read(0, 4).result(TIMEOUT) == bytes(4)


def test_aio_image_helper_and_image_method(new_image: Callable[..., Image]) -> None:
    img = new_image(1 * MiB)
    with aio_image(img, workers=2) as aio:
        assert aio.workers == 2 and aio.image is img
        aio.submit_write(0, b"x").result(TIMEOUT)
    if not hasattr(img, "aio"):
        pytest.skip("Image.aio() not added yet")
    with img.aio(workers=3) as aio2:  # type: ignore[attr-defined]
        assert isinstance(aio2, AioImage) and aio2.workers == 3
        assert aio2.submit_read(0, 1).result(TIMEOUT) == b"x"


# ------------------------------------------------------------------------------------
# concurrency


@pytest.mark.parametrize("lock_mode", ["mutex", "rwlock", "fine"])
def test_concurrent_disjoint_writes_match_the_shadow(new_image: Callable[..., Image],
                                                     lock_mode: str) -> None:
    """400 unaligned writes into disjoint ranges, many sharing clusters, any order."""
    img = new_image(32 * MiB, lock_mode=lock_mode)
    rng = random.Random(2)
    shadow = bytearray(img.size)
    cuts = sorted(rng.sample(range(1, img.size), 400))
    pieces = list(zip([0, *cuts], [*cuts, img.size]))[:-1]  # leave the tail unwritten
    pieces = [(a, min(b - a, rng.choice([b - a, 1, 511, 4097]))) for a, b in pieces]
    rng.shuffle(pieces)
    with AioImage(img, workers=8) as aio:
        futures = []
        for i, (off, n) in enumerate(pieces):
            data = fill(i, n)
            shadow[off:off + n] = data
            futures.append(aio.submit_write(off, data))
        wait_all(futures)
        assert [f.exception() for f in futures if f.exception()] == []
        reads = [aio.submit_read(off, 1 * MiB) for off in range(0, img.size, MiB)]
        wait_all(reads)
        assert b"".join(f.result() for f in reads) == shadow
    assert img.read(0, img.size) == shadow


@pytest.mark.parametrize("lock_mode", ["mutex", "rwlock", "fine"])
def test_concurrent_overlapping_writes_each_byte_from_a_covering_write(
        new_image: Callable[..., Image], lock_mode: str) -> None:
    """200 overlapping writes in flight at once, each filling its range with its own byte.

    Concurrent writes may land in any order, but every byte must hold the fill of one
    of the writes that covered it (0 where none did): no torn, stale or foreign data.
    """
    img = new_image(8 * MiB, lock_mode=lock_mode)
    rng = random.Random(3)
    region = 2 * MiB
    writes = []
    for i in range(200):
        off = rng.randrange(region)
        writes.append((off, min(rng.randint(1, 200 * KiB), region - off), i + 1))
    with AioImage(img, workers=8) as aio:
        wait_all([aio.submit_write(off, bytes([value]) * n) for off, n, value in writes])
    got = img.read(0, region)
    bounds = sorted({0, region, *(o for o, _, _ in writes), *(o + n for o, n, _ in writes)})
    for lo, hi in zip(bounds, bounds[1:]):  # the covering writes are the same in [lo, hi)
        allowed = {v for o, n, v in writes if o <= lo and hi <= o + n} or {0}
        assert set(got[lo:hi]) <= allowed, (lo, hi, set(got[lo:hi]) - allowed)


# ------------------------------------------------------------------------------------
# ordering: exclusive submissions are FIFO barriers


def test_resize_waits_for_in_flight_and_later_requests_see_the_new_size(
        new_image: Callable[..., Image]) -> None:
    img = new_image(4 * MiB)
    rec = Recorder(img)
    old, new = img.size, 8 * MiB
    with AioImage(rec, workers=4) as aio:  # type: ignore[arg-type]
        rec.gated.add(0)
        held = aio.submit_read(0, 1)              # in flight, held on the gate
        assert rec.entered.acquire(timeout=TIMEOUT)
        resize = aio.submit_resize(new)
        after_read = aio.submit_read(old, 4 * KiB)     # beyond the old end
        after_write = aio.submit_write(old + 64 * KiB + 5, b"new")  # not where it reads
        time.sleep(QUIET)  # free workers exist: only the barrier holds these back
        assert not resize.running() and not resize.done()
        assert not after_read.running() and not after_read.done()
        assert not after_write.running() and not after_write.done()
        assert rec.names() == ["read"]
        assert aio.queued == 3 and aio.in_flight == 1
        rec.gate.set()
        assert held.result(TIMEOUT) == b"\0"
        assert resize.result(TIMEOUT) is None
        assert after_read.result(TIMEOUT) == bytes(4 * KiB)
        assert after_write.result(TIMEOUT) is None
    assert img.size == new
    names = rec.names()  # the last two are shared: they start in either order
    assert names[:2] == ["read", "resize"] and sorted(names[2:]) == ["read", "write"]
    assert img.read(old + 64 * KiB + 5, 3) == b"new"


def test_barrier_released_when_the_last_request_ends_as_it_is_held(
        new_image: Callable[..., Image]) -> None:
    """An exclusive request counts the requests in flight, and the last of them ends
    (its worker finds nothing held) before the exclusive one is appended to the held
    queue: the submitter must count again after the append, or nobody releases it.

    Seen failing (the resize's future never finished) with the second count taken out
    of ``_Dispatcher.submit``.
    """
    img = new_image(2 * MiB)
    rec = Recorder(img)
    with AioImage(rec, workers=2) as aio:  # type: ignore[arg-type]
        rec.gated.add(0)
        running = aio.submit_read(0, 1)
        assert rec.entered.acquire(timeout=TIMEOUT)
        dispatcher = aio._dispatcher
        finished = threading.Event()
        real_done, real_count = dispatcher._done, dispatcher._in_flight

        def done(item: Any, index: int) -> None:
            real_done(item, index)
            finished.set()

        def count_then_let_it_end() -> int:
            n = real_count()
            dispatcher._in_flight = real_count  # only the first count is stale
            rec.gate.set()  # the read ends, its worker looks at the (empty) held queue
            assert finished.wait(TIMEOUT)
            return n

        dispatcher._done = done  # type: ignore[method-assign]
        dispatcher._in_flight = count_then_let_it_end  # type: ignore[method-assign]
        barrier = aio.submit_resize(4 * MiB)
        assert barrier.result(TIMEOUT) is None
        assert running.result(TIMEOUT) == img.read(0, 1)
    assert img.size == 4 * MiB


def test_exclusive_requests_are_fifo_barriers(new_image: Callable[..., Image]) -> None:
    """A random mix with resizes and snapshots: barriers order everything around them."""
    img = new_image(2 * MiB)
    rec = Recorder(img)
    rng = random.Random(4)
    size = img.size
    order: list[tuple[str, int]] = []  # (name, offset) in submission order
    with AioImage(rec, workers=8) as aio:  # type: ignore[arg-type]
        futures: list[AioFuture[Any]] = []
        for i in range(300):
            if i % 60 == 59:
                size += 1 * MiB
                futures.append(aio.submit_resize(size))
                order.append(("resize", size))
            elif i % 60 == 29:
                futures.append(aio.submit_snapshot(f"s{i}"))
                order.append(("create_snapshot", -1))
            else:
                off = rng.randrange(size - 4 * KiB)  # only valid after earlier resizes
                if rng.random() < 0.5:
                    futures.append(aio.submit_write(off, fill(i, rng.randint(1, 4 * KiB))))
                    order.append(("write", off))
                else:
                    futures.append(aio.submit_read(off, rng.randint(1, 4 * KiB)))
                    order.append(("read", off))
        wait_all(futures)
        assert [f.exception() for f in futures if f.exception()] == []
    log = rec.log
    position = {}  # (kind, submission index) -> log index; calls are matched in order
    seen: dict[tuple[str, str, int], int] = {}
    for index, entry in enumerate(log):
        nth = seen.get(entry, 0)
        seen[entry] = nth + 1
        position[entry, nth] = index
    occurrences: dict[tuple[str, int], int] = {}
    spans = []
    for name, off in order:
        nth = occurrences.get((name, off), 0)
        occurrences[name, off] = nth + 1
        spans.append((position[("start", name, off), nth], position[("end", name, off), nth]))
    for k, (name, _) in enumerate(order):
        if name not in ("resize", "create_snapshot"):
            continue
        start, end = spans[k]
        assert all(e < start for _, e in spans[:k]), f"request before barrier {k} ran past it"
        assert all(s > end for s, _ in spans[k + 1:]), f"request after barrier {k} ran early"
    assert img.size == size


def test_snapshot_without_image_support_fails_through_the_future(
        new_image: Callable[..., Image]) -> None:
    img = new_image(1 * MiB)

    class NoSnapshots:
        """An image without snapshot methods (as before the snapshot issue)."""

        def __init__(self, img: Image) -> None:
            self.img = img

        def read(self, offset: int, length: int, *, cancel: Any = None) -> bytes:
            return self.img.read(offset, length, cancel=cancel)

    with AioImage(NoSnapshots(img), workers=2) as aio:  # type: ignore[arg-type]
        for f in (aio.submit_snapshot("a"), aio.submit_apply_snapshot("a"),
                  aio.submit_delete_snapshot("a")):
            assert f.exclusive
            with pytest.raises(UnsupportedFeature):
                f.result(TIMEOUT)
        assert aio.submit_read(0, 1).result(TIMEOUT) == b"\0"


def test_snapshot_through_the_image_when_supported(new_image: Callable[..., Image]) -> None:
    img = new_image(1 * MiB)
    if not hasattr(img, "create_snapshot"):
        pytest.skip("Image has no snapshots yet")
    with AioImage(img, workers=4) as aio:
        aio.submit_write(0, b"old").result(TIMEOUT)
        aio.submit_snapshot("s1").result(TIMEOUT)
        aio.submit_write(0, b"new").result(TIMEOUT)
        aio.submit_apply_snapshot("s1").result(TIMEOUT)
        assert aio.submit_read(0, 3).result(TIMEOUT) == b"old"
        aio.submit_delete_snapshot("s1").result(TIMEOUT)


# ------------------------------------------------------------------------------------
# cancellation of queued requests


def test_cancel_queued_requests_never_touch_the_image(new_image: Callable[..., Image]) -> None:
    img = new_image(8 * MiB)
    img.write(0, fill(5, 8 * MiB))
    before = img.read(0, img.size)
    rec = Recorder(img)
    with AioImage(rec, workers=8) as aio:  # type: ignore[arg-type]
        held = rec.hold_workers(aio, base=1 * MiB)
        queued: list[AioFuture[Any]] = []
        for i in range(20):
            queued.append(aio.submit_write(i * 300 * KiB + 7, fill(100 + i, 300 * KiB)))
            queued.append(aio.submit_discard(i * 64 * KiB, 64 * KiB))
            queued.append(aio.submit_write_zeroes(i * 100 * KiB + 3, 50 * KiB))
        queued += [aio.submit_flush(), aio.submit_resize(16 * MiB), aio.submit_read(0, 10)]
        assert aio.queued == len(queued)
        assert all(f.cancel() for f in queued)
        assert aio.queued == 0
        # Seen as done at once, while every worker is still held (no worker needed):
        done, not_done = cf.wait(queued, timeout=TIMEOUT)
        assert not not_done
        assert list(cf.as_completed(queued, timeout=TIMEOUT))
        for f in queued:
            assert f.cancelled() and f.done() and not f.running()
            with pytest.raises(CancelledError):
                f.result(0)
            assert f._waiters == []  # type: ignore[attr-defined]
        assert not any(f.done() for f in held)
        rec.gate.set()
        wait_all(held)
    assert rec.names() == ["read"] * 8  # the gated reads, and nothing else
    assert img.size == 8 * MiB
    assert img.read(0, img.size) == before


def test_cancel_while_workers_take_requests(new_image: Callable[..., Image]) -> None:
    """Cancel while free workers race to take the same requests: cancelled xor run."""
    img = new_image(4 * MiB)
    rec = Recorder(img)
    ran = 0
    expected = [0] * 64  # the fill byte each 4 KiB slot must hold
    with AioImage(rec, workers=8) as aio:  # type: ignore[arg-type]
        for round_ in range(20):
            futures = [aio.submit_write(i * 4 * KiB, bytes([round_ + 1]) * 4 * KiB)
                       for i in range(64)]
            cancelled = {i for i, f in enumerate(futures) if i % 2 and f.cancel()}
            wait_all(futures)
            for i, f in enumerate(futures):
                assert f.cancelled() == (i in cancelled)
                if i not in cancelled:
                    assert f.result() is None
            ran += 64 - len(cancelled)
            for i in range(64):
                if i not in cancelled:
                    expected[i] = round_ + 1
                assert img.read(i * 4 * KiB, 4 * KiB) == bytes([expected[i]]) * 4 * KiB
    assert len(rec.names()) == len(rec.names("end")) == ran


# ------------------------------------------------------------------------------------
# cancellation of running requests


def count_looks(aio: AioImage, submit: Callable[[], AioFuture[Any]],
                monkeypatch: pytest.MonkeyPatch) -> int:
    """How many times a request made by *submit* looks at its cancel token."""
    token_class, _, _ = pausing_token_class(0)
    monkeypatch.setattr(qcow2rw.aio, "CancelToken", token_class)
    f = submit()
    f.result(TIMEOUT)
    looks: int = f._token.looks  # type: ignore[attr-defined]
    monkeypatch.undo()
    return looks


def per_cluster_old_or_new(got: bytes, old: bytes, new: bytes, start: int, off: int,
                           cluster: int) -> tuple[int, int]:
    """Check the image bytes *got* = [start, start+len(got)); *old* is what they held.

    The request covered [off, off+len(new)) with *new*.  In each (real, aligned)
    cluster, the bytes the request covered hold all old or all new data, and the bytes
    it did not cover hold old data.  Returns (clusters new, clusters old).
    """
    assert len(got) == len(old)
    n_new = n_old = 0
    end = off + len(new)
    stop = start + len(got)
    for c in range(start - start % cluster, stop, cluster):
        c_lo, c_hi = max(c, start), min(c + cluster, stop)  # this cluster within got
        lo, hi = max(c_lo, off), min(c_hi, end)                # ... and within the request
        if hi <= lo:
            assert got[c_lo - start:c_hi - start] == old[c_lo - start:c_hi - start], \
                f"cluster {c:#x}, outside the request, changed"
            continue
        g, was = got[lo - start:hi - start], old[lo - start:hi - start]
        if g == was:
            n_old += 1
        elif g == new[lo - off:hi - off]:
            n_new += 1
        else:
            raise AssertionError(f"cluster {c:#x} holds neither old nor new data")
        assert got[c_lo - start:lo - start] == old[c_lo - start:lo - start]
        assert got[hi - start:c_hi - start] == old[hi - start:c_hi - start]
    return n_new, n_old


@pytest.mark.parametrize("cluster_size", [65536, 4096])
@pytest.mark.parametrize("allocated", [True, False], ids=["overwrite", "allocating"])
@pytest.mark.parametrize("unaligned", [False, True], ids=["aligned", "unaligned"])
def test_cancel_running_write_stops_at_a_cluster_boundary(
        new_image: Callable[..., Image], monkeypatch: pytest.MonkeyPatch,
        cluster_size: int, allocated: bool, unaligned: bool) -> None:
    """A 64 MiB write paused halfway on its token, cancelled, resumed: ends cancelled.

    Deterministic: the request is paused inside the image (between two cluster runs)
    the n-th time it looks at its token, n being half the looks an identical request
    makes; only then is ``aio.cancel`` called.  Every cluster holds old or new data,
    some of each.
    """
    length = 64 * MiB
    img = new_image(2 * length + 2 * MiB, cluster_size=cluster_size)
    target = length + 1 * MiB   # the cancelled write; [0, length) is for the measurement
    off, n = (target + 1000, length - 3000) if unaligned else (target, length)
    if allocated:
        img.write(0, fill(6, length))
        img.write(length, fill(7, length + 2 * MiB))
    old = img.read(target, length)
    new = fill(8, n)
    with AioImage(img, workers=8) as aio:
        looks = count_looks(aio, lambda: aio.submit_write(off - target, new), monkeypatch)
        assert looks >= 8, "a 64 MiB write should look at its token at every run"
        token_class, reached, resume = pausing_token_class(looks // 2)
        monkeypatch.setattr(qcow2rw.aio, "CancelToken", token_class)
        f = aio.submit_write(off, new)
        assert reached.wait(TIMEOUT), "the request never reached its pause point"
        assert f.running()
        assert aio.cancel(f) is True
        assert not f.done()
        resume.set()
        assert cf.wait([f], timeout=TIMEOUT).done == {f}
        assert f.cancelled() and f.done() and not f.running()
        with pytest.raises(CancelledError):
            f.result(0)
        with pytest.raises(CancelledError):
            f.exception(0)
        assert aio.cancel(f) is True and f.cancel() is True  # already cancelled
        # The pool is fine afterwards, and the rest of the image is untouched:
        got = aio.submit_read(target, length).result(TIMEOUT)
    n_new, n_old = per_cluster_old_or_new(got, old, new, target, off, cluster_size)
    assert n_new > 0 and n_old > 0, (n_new, n_old)
    assert_no_leftovers(img)


def test_cancel_running_sees_cancellation_everywhere(new_image: Callable[..., Image],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """wait(), as_completed(), a callback and asyncio.wrap_future, all waiting already."""
    img = new_image(16 * MiB)
    token_class, reached, resume = pausing_token_class(3)
    monkeypatch.setattr(qcow2rw.aio, "CancelToken", token_class)
    with AioImage(img, workers=2) as aio:
        f = aio.submit_write(0, fill(9, 8 * MiB))
        assert reached.wait(TIMEOUT)
        results: dict[str, Any] = {}
        callbacks: list[Future[Any]] = []
        f.add_done_callback(callbacks.append)

        def waiter() -> None:
            results["wait"] = cf.wait([f], timeout=TIMEOUT)

        def completer() -> None:
            results["as_completed"] = list(cf.as_completed([f], timeout=TIMEOUT))

        def in_asyncio() -> None:
            async def main() -> str:
                try:
                    await asyncio.wait_for(asyncio.wrap_future(f), TIMEOUT)
                except asyncio.CancelledError:
                    return "cancelled"
                return "finished"
            results["asyncio"] = asyncio.run(main())

        threads = [threading.Thread(target=t, daemon=True)
                   for t in (waiter, completer, in_asyncio)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + TIMEOUT  # until all of them wait on f
        while (len(f._waiters) < 2  # type: ignore[attr-defined]
               or len(f._done_callbacks) < 2):  # type: ignore[attr-defined]
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert aio.cancel(f)
        resume.set()
        for t in threads:
            t.join(TIMEOUT)
            assert not t.is_alive()
        assert results["wait"].done == {f} and not results["wait"].not_done
        assert results["as_completed"] == [f]
        assert results["asyncio"] == "cancelled"
        assert callbacks == [f]
        assert f._waiters == []  # type: ignore[attr-defined]
        late: list[Future[Any]] = []
        f.add_done_callback(late.append)  # added after the end: called at once
        assert late == [f]


def test_request_that_finishes_before_noticing_keeps_its_result(
        new_image: Callable[..., Image]) -> None:
    img = new_image(1 * MiB)
    finished, go = threading.Event(), threading.Event()

    class LateImage(Recorder):
        def write(self, offset: int, data: Any, *, cancel: CancelToken | None = None) -> None:
            self.img.write(offset, data, cancel=cancel)  # done: no boundary left to check
            finished.set()
            assert go.wait(TIMEOUT)

    with AioImage(LateImage(img), workers=2) as aio:  # type: ignore[arg-type]
        f = aio.submit_write(10, b"kept")
        assert finished.wait(TIMEOUT)
        assert aio.cancel(f) is True   # asked: it is running
        go.set()
        assert f.result(TIMEOUT) is None
        assert not f.cancelled()
        assert aio.cancel(f) is False  # finished
        assert f.cancel() is False
    assert img.read(10, 4) == b"kept"


def test_cancel_running_at_first_look_writes_nothing(new_image: Callable[..., Image],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled between 'running' and the call into the image: nothing is written."""
    img = new_image(8 * MiB)
    token_class, reached, resume = pausing_token_class(1)
    monkeypatch.setattr(qcow2rw.aio, "CancelToken", token_class)
    with AioImage(img, workers=2) as aio:
        f = aio.submit_write(0, fill(10, 4 * MiB))
        assert reached.wait(TIMEOUT)
        assert aio.cancel(f)
        resume.set()
        assert cf.wait([f], timeout=TIMEOUT).done == {f} and f.cancelled()
    assert img.read(0, 4 * MiB) == bytes(4 * MiB)
    assert img.map()[0]["data"] is False


def test_running_exclusive_request_is_not_cancelled_even_at_its_start(
        new_image: Callable[..., Image], monkeypatch: pytest.MonkeyPatch) -> None:
    """aio.cancel() on a resize that is running but has not called the image yet.

    Running exclusive requests cannot be stopped halfway, so none is stopped at all
    once running: False, and the resize happens (issue 11 §5; until then this said
    True and the resize was skipped).  tests/test_aio_callbacks.py holds the ones
    paused inside the image (flush, snapshot).
    """
    img = new_image(4 * MiB)
    token_class, reached, resume = pausing_token_class(1)
    monkeypatch.setattr(qcow2rw.aio, "CancelToken", token_class)
    with AioImage(img, workers=2) as aio:
        f = aio.submit_resize(8 * MiB)
        assert reached.wait(TIMEOUT)
        assert f.running()
        assert aio.cancel(f) is False
        assert f.cancel() is False and not f.stoppable
        resume.set()
        assert f.result(TIMEOUT) is None and not f.cancelled()
        assert aio.submit_read(0, 1).result(TIMEOUT) == b"\0"  # the barrier is lifted
    assert img.size == 8 * MiB


def test_cancel_after_a_worker_took_the_request_but_before_it_started(
        new_image: Callable[..., Image], monkeypatch: pytest.MonkeyPatch) -> None:
    """The narrow window between a worker taking a request and marking it running.

    ``f.cancel()`` still succeeds there (the future is PENDING), the queue no longer
    has the request, so the worker must notice and skip it.
    """
    img = new_image(1 * MiB)
    rec = Recorder(img)
    taken, go = threading.Event(), threading.Event()
    original = qcow2rw.aio._Dispatcher._take

    def slow_take(self: Any, *args: Any) -> Any:
        item = original(self, *args)
        if item is not None and item.future.op.startswith("write"):
            taken.set()
            assert go.wait(TIMEOUT)
        return item

    monkeypatch.setattr(qcow2rw.aio._Dispatcher, "_take", slow_take)
    with AioImage(rec, workers=1) as aio:  # type: ignore[arg-type]
        f = aio.submit_write(0, b"never")
        assert taken.wait(TIMEOUT)
        assert aio.queued == 0 and aio.in_flight == 1
        assert f.cancel() is True
        go.set()
        assert cf.wait([f], timeout=TIMEOUT).done == {f} and f.cancelled()
        assert aio.submit_read(0, 5).result(TIMEOUT) == bytes(5)
    assert rec.names() == ["read"]


@pytest.mark.parametrize("kind", ["read", "readinto", "write_zeroes", "discard"])
def test_cancel_running_reads_zeroes_and_discards(new_image: Callable[..., Image],
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  kind: str) -> None:
    """As for writes: paused halfway (4 KiB clusters: 2 MiB per L2 table), cancelled."""
    img = new_image(64 * MiB, cluster_size=4096)
    length = 16 * MiB
    old = fill(11, length)
    img.write(0, old)
    img.write(32 * MiB, old)  # the same state, for the measurement

    def submit(aio: AioImage, off: int) -> AioFuture[Any]:
        if kind == "readinto":
            return aio.submit_readinto(off, bytearray(length))
        return getattr(aio, f"submit_{kind}")(off, length)  # type: ignore[no-any-return]

    with AioImage(img, workers=2) as aio:
        looks = count_looks(aio, lambda: submit(aio, 32 * MiB), monkeypatch)
        assert looks >= 4, looks
        token_class, reached, resume = pausing_token_class(looks // 2)
        monkeypatch.setattr(qcow2rw.aio, "CancelToken", token_class)
        f = submit(aio, 0)
        assert reached.wait(TIMEOUT)
        assert aio.cancel(f)
        resume.set()
        assert cf.wait([f], timeout=TIMEOUT).done == {f}
        assert f.cancelled(), f
    got = img.read(0, length)
    if kind.startswith("read"):
        assert got == old
    else:
        n_new, n_old = per_cluster_old_or_new(got, old, bytes(length), 0, 0, img.cluster_size)
        assert n_new > 0 and n_old > 0, (n_new, n_old)


def test_cancel_running_at_random_moments(new_image: Callable[..., Image]) -> None:
    """Not paused: cancel once running; either outcome, every cluster old or new."""
    img = new_image(64 * MiB)
    old = fill(12, 32 * MiB)
    img.write(0, old)
    outcomes = set()
    with AioImage(img, workers=4) as aio:
        for i in range(12):
            new = fill(100 + i, 32 * MiB)
            f = aio.submit_write(0, new)
            deadline = time.monotonic() + TIMEOUT
            while not f.running() and not f.done():
                assert time.monotonic() < deadline
                time.sleep(0.0001)
            time.sleep(random.Random(i).random() * 0.01)
            aio.cancel(f)
            assert cf.wait([f], timeout=TIMEOUT).done == {f}
            outcomes.add("cancelled" if f.cancelled() else "finished")
            got = img.read(0, 32 * MiB)
            if not f.cancelled():
                assert got == new
            else:
                per_cluster_old_or_new(got, old, new, 0, 0, img.cluster_size)
            old = got
    assert outcomes  # which ones happened depends on timing; both are fine


def test_cancel_argument_checks(new_image: Callable[..., Image]) -> None:
    img = new_image(1 * MiB)
    with AioImage(img, workers=1) as aio, AioImage(img, workers=1) as other:
        f = aio.submit_read(0, 1)
        f.result(TIMEOUT)
        assert aio.cancel(f) is False
        with pytest.raises(ValueError):
            other.cancel(f)
        with pytest.raises(ValueError):
            aio.cancel(Future())


# ------------------------------------------------------------------------------------
# close and shutdown


def test_close_drains(new_image: Callable[..., Image]) -> None:
    img = new_image(16 * MiB)
    shadow = bytearray(img.size)
    rng = random.Random(13)
    aio = AioImage(img, workers=8)
    futures = []
    slots = rng.sample(range(img.size // (64 * KiB)), 200)
    for i, slot in enumerate(slots):  # disjoint 64 KiB slots, unaligned inside them
        data = fill(200 + i, rng.randint(1, 64 * KiB - 10))
        off = slot * 64 * KiB + 5
        shadow[off:off + len(data)] = data
        futures.append(aio.submit_write(off, data))
    aio.close()  # no wait() on any of them: close() alone must drain
    assert all(f.done() and not f.cancelled() and f.exception() is None for f in futures)
    assert all(not t.is_alive() for t in worker_threads(aio))
    assert aio.queued == 0 and aio.in_flight == 0
    with pytest.raises(RuntimeError):
        aio.submit_read(0, 1)
    aio.close()  # twice is fine
    assert not img.closed
    assert img.read(0, img.size) == shadow


def test_shutdown_cancel_futures_cancels_the_queue(new_image: Callable[..., Image]) -> None:
    img = new_image(4 * MiB)
    rec = Recorder(img)
    aio = AioImage(rec, workers=4)  # type: ignore[arg-type]
    held = rec.hold_workers(aio, base=2 * MiB)
    queued = [aio.submit_write(i * 1000, b"x" * 999) for i in range(30)]
    queued.append(aio.submit_resize(8 * MiB))
    aio.shutdown(wait=False, cancel_futures=True)
    with pytest.raises(RuntimeError):
        aio.submit_read(0, 1)
    assert cf.wait(queued, timeout=TIMEOUT).not_done == set()  # workers still held
    assert all(f.cancelled() for f in queued)
    assert not any(f.done() for f in held)
    rec.gate.set()
    aio.shutdown(wait=True)
    assert [f.result(0) for f in held] == [b"\0"] * 4
    assert rec.names() == ["read"] * 4
    assert img.size == 4 * MiB and img.read(0, 30000) == bytes(30000)
    assert all(not t.is_alive() for t in worker_threads(aio))


def test_shutdown_without_wait_still_runs_the_queue(new_image: Callable[..., Image]) -> None:
    img = new_image(4 * MiB)
    rec = Recorder(img)
    aio = AioImage(rec, workers=2)  # type: ignore[arg-type]
    rec.hold_workers(aio, base=3 * MiB)
    queued = [aio.submit_write(i, b"y") for i in range(10)]
    aio.shutdown(wait=False)
    rec.gate.set()
    wait_all(queued)
    assert img.read(0, 10) == b"y" * 10
    for t in worker_threads(aio):
        t.join(TIMEOUT)
        assert not t.is_alive()


def test_shutdown_from_a_done_callback(new_image: Callable[..., Image]) -> None:
    img = new_image(1 * MiB)
    aio = AioImage(img, workers=2)
    errors: list[BaseException] = []

    def stop(_: Future[Any]) -> None:  # runs on a worker: must not join itself
        try:
            aio.shutdown(wait=True)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    f = aio.submit_write(0, b"z")
    f.add_done_callback(stop)
    f.result(TIMEOUT)
    for t in worker_threads(aio):
        t.join(TIMEOUT)
        assert not t.is_alive()
    assert errors == []


def test_unclosed_aio_image_stops_its_workers_when_collected(
        new_image: Callable[..., Image]) -> None:
    img = new_image(1 * MiB)
    aio = AioImage(img, workers=3)
    aio.submit_write(0, b"w").result(TIMEOUT)
    threads = worker_threads(aio)
    del aio
    gc.collect()
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive()
    assert img.read(0, 1) == b"w"


# ------------------------------------------------------------------------------------
# all of it at once, judged by qemu-img


@pytest.mark.interop
def test_mixed_workload_with_cancellations_is_clean_for_qemu(qemu: Any, tmp_path: Path) -> None:
    """Writes, zeroes, discards, flushes, a resize; cancels queued and running; check."""
    path = str(tmp_path / "mixed.qcow2")
    rng = random.Random(14)
    img = qcow2rw.create(path, 32 * MiB)
    shadow = bytearray(img.size)
    with AioImage(img, workers=8) as aio:
        for round_ in range(6):
            # disjoint ranges within a round, so that each request's outcome is checkable
            slots = rng.sample(range(img.size // (256 * KiB)), 24)
            ops = []
            for i, slot in enumerate(slots):
                off = slot * 256 * KiB + rng.randrange(1000)
                n = rng.randint(1, 256 * KiB - 1000)
                kind = rng.choice(["write", "write", "write_zeroes", "discard"])
                data = fill(1000 * round_ + i, n)
                f = (aio.submit_write(off, data) if kind == "write" else
                     getattr(aio, f"submit_{kind}")(off, n))
                ops.append((kind, off, n, data, f))
            flush = aio.submit_flush()
            for kind, off, n, data, f in ops[::5]:
                aio.cancel(f)
            wait_all([f for *_, f in ops] + [flush])
            for kind, off, n, data, f in ops:
                got = img.read(off, n)
                new = data if kind == "write" else bytes(n)
                if not f.cancelled():
                    if kind == "discard":  # only whole clusters are discarded
                        cs = img.cluster_size
                        lo, hi = -(-off // cs) * cs, (off + n) // cs * cs
                        if hi > lo:
                            shadow[lo:hi] = bytes(hi - lo)
                    else:
                        shadow[off:off + n] = new
                assert img.read(off, n) == shadow[off:off + n] or f.cancelled()
                if f.cancelled():
                    per_cluster_old_or_new(got, bytes(shadow[off:off + n]), new, off, off,
                                           img.cluster_size)
                    shadow[off:off + n] = got
        resize = aio.submit_resize(48 * MiB)
        tail = aio.submit_write(40 * MiB, b"tail")
        wait_all([resize, tail])
        shadow.extend(bytes(16 * MiB))
        shadow[40 * MiB:40 * MiB + 4] = b"tail"
    assert img.read(0, img.size) == shadow
    assert_no_leftovers(img)
    img.close()
    code, report = qemu.check(path)
    assert code == 0, report


def test_unclosed_pool_runs_its_queue_at_interpreter_exit(tmp_path: Path) -> None:
    """A script that never closes its AioImage: the queue still runs, the process exits."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import qcow2rw
        img = qcow2rw.create({str(tmp_path / "exit.qcow2")!r}, 1 << 20)
        aio = qcow2rw.AioImage(img, workers=2)
        for i in range(50):
            aio.submit_write(i * 100, b"x" * 100).add_done_callback(
                lambda f: print("done", flush=True))
        print("exiting", flush=True)
    """)
    root = str(Path(qcow2rw.__file__).resolve().parent.parent)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=TIMEOUT, env={"PYTHONPATH": root, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("done") == 50, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
