"""The asyncio face: :class:`qcow2rw.AsyncImage` (issue 11 §5).

What is checked, and how each test can fail:

* results: many concurrent tasks (``asyncio.gather`` of 64 writes, then of reads,
  readintos, discards and write_zeroes) against a shadow ``bytearray``; the exclusive
  requests (resize, snapshot) through ``await``;
* cancellation of a running request: ``asyncio.wait_for(img.write(...), timeout)``
  raises ``TimeoutError`` only once the write has stopped: nothing of it is pending
  or in flight right after, no byte changes afterwards, every cluster holds all old
  or all new data and the image checks clean.  One test pauses the write inside the
  image (an event point) past the deadline, so it is deterministic; another times out
  a real 256 MiB write.  With the naive ``await asyncio.wrap_future(f)`` both fail: the
  ``TimeoutError`` arrives while the write still runs;
* cancellation that loses the race (the request finishes anyway) and a task cancelled
  again while its request stops: the task ends cancelled, only after the request;
* cancellation of a queued request (the pool held busy by a gated request): it ends at
  once and never touches the image (a proxy logs every call);
* closing: ``async with`` drains and shuts down the pool it made, leaves a borrowed
  pool and the image open, closes an image it opened; the event loop keeps running
  while a close waits; a cancelled ``AsyncImage.open`` closes what it opened;
* errors arrive as the library's exceptions (``ReadOnlyImage``, ``OutOfRange``,
  ``ClosedImage``).

Every wait has a timeout, so a broken implementation fails a test instead of hanging.
No pytest-asyncio: each test runs its coroutine with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

import qcow2rw
import qcow2rw.asyncface
from qcow2rw import AioImage, AsyncImage, Image, OutOfRange, ReadOnlyImage
from qcow2rw.cancel import MAX_RUN_BYTES
from qcow2rw.errors import ClosedImage
from qcow2rw.events import EventPoints

from helpers import Recorder

pytestmark = pytest.mark.timeout(120)

KiB = 1024
MiB = 1024 * KiB
TIMEOUT = 30.0  # every wait in this file; nothing should take more than a second


# ------------------------------------------------------------------------------------
# helpers


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run *coro* in a fresh event loop, bounded by TIMEOUT."""
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, TIMEOUT)
    return asyncio.run(bounded())


@pytest.fixture
def new_image(tmp_path: Path) -> Iterator[Callable[..., Image]]:
    """``new_image(size, **create_options)``: a fresh writable image; at the end it
    must check clean (no corruption, no leak) and is closed."""
    made: list[Image] = []

    def make(size: int = 16 * MiB, *, name: str = "async.qcow2", **options: Any) -> Image:
        img = qcow2rw.create(str(tmp_path / name), size, **options)
        made.append(img)
        return img

    yield make
    for img in made:
        if not img.closed:
            assert_clean(img)
            img.close()


def assert_clean(img: Image) -> None:
    """``img.check()`` finds nothing wrong (which also proves no request holds it)."""
    result = img.check()
    assert result.corruptions == 0 and result.check_errors == 0, result.messages
    assert result.leaks == 0, result.messages


def pattern(seed: int, length: int) -> bytes:
    """*length* bytes, no byte of them zero, different for each *seed* (0-254)."""
    unit = bytes([seed + 1]) + bytes(range(1, 256))
    whole = unit * -(-length // len(unit))
    return whole if len(whole) == length else whole[:length]


def per_cluster_old_or_new(got: Any, old: bytes, new: bytes, cluster: int) -> tuple[int, int]:
    """Each cluster of *got* (the image from offset 0) equals *old* (zeros past its
    end) or *new* as a whole; returns (clusters new, clusters old)."""
    n_new = n_old = 0
    view, zeros = memoryview(got), bytes(cluster)
    for c in range(0, len(got), cluster):
        piece = view[c:c + cluster]
        was = old[c:c + cluster]
        if piece == new[c:c + cluster]:
            n_new += 1
        elif piece[:len(was)] == was and piece[len(was):] == zeros[:len(piece) - len(was)]:
            n_old += 1
        else:
            raise AssertionError(f"cluster at {c:#x} holds neither its old nor its new data")
    return n_new, n_old


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Yield to the loop until *predicate* holds (at most TIMEOUT)."""
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


class Pause:
    """Pause the first request that reaches event point *name* of *img*.

    A thread waits for the request to stop there (``reached`` is set), then resumes
    it when :meth:`resume` is called, *hold* seconds after it stopped, or at the
    latest when the ``with`` block ends: a failing test never leaves a request paused
    (which would hang the close that drains it).
    """

    def __init__(self, img: Image, name: str, hold: float = 5.0) -> None:
        self.img, self.name, self.hold = img, name, hold
        self.events = EventPoints()
        self.reached = threading.Event()
        self._go = threading.Event()
        self._thread = threading.Thread(target=self._resumer, daemon=True)

    def _resumer(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not self.events.wait_break(self.name, 0.01):
            # The block ended (breakpoint cleared first) and no request stopped: done.
            if self._go.is_set() or time.monotonic() > deadline:
                if not self.events.wait_break(self.name, 0):
                    return
                break
        self.reached.set()
        self._go.wait(self.hold)
        self.events.resume(self.name)

    def resume(self) -> None:
        self._go.set()

    def __enter__(self) -> Pause:
        self.img.events = self.events
        self.events.set_break(self.name)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.events.clear()  # before _go: no request stops after the resumer's last look
        self._go.set()
        self._thread.join(TIMEOUT)
        self.img.events = None


# ------------------------------------------------------------------------------------
# results


def test_many_concurrent_tasks_match_the_shadow(new_image: Callable[..., Image]) -> None:
    """64 concurrent writes (unaligned, disjoint), then reads, readintos, discards and
    write_zeroes, all in flight together, against a shadow bytearray."""
    size, slot = 16 * MiB, 256 * KiB
    img = new_image(size)
    rng = random.Random(11)
    shadow = bytearray(size)

    async def main() -> None:
        async with AsyncImage(img, workers=8) as aimg:
            writes = []
            for i in range(64):
                off = i * slot + rng.randrange(0, 64 * KiB)
                data = rng.randbytes(rng.randrange(1, slot - 64 * KiB))
                shadow[off:off + len(data)] = data
                writes.append(aimg.write(off, data))
            assert await asyncio.gather(*writes) == [None] * 64

            spans = [(i * slot + rng.randrange(0, slot // 2), rng.randrange(1, slot // 2))
                     for i in range(64)]
            buffers = [bytearray(n) for _, n in spans[32:]]
            got = await asyncio.gather(
                *(aimg.read(off, n) for off, n in spans[:32]),
                *(aimg.readinto(off, buf) for (off, _), buf in zip(spans[32:], buffers)))
            for (off, n), data in zip(spans[:32], got[:32]):
                assert data == shadow[off:off + n]
            for (off, n), buf, count in zip(spans[32:], buffers, got[32:]):
                assert count == n and buf == shadow[off:off + n]

            changes = []
            for i in range(0, 64, 4):  # discard some slots, zero the middle of others
                changes.append(aimg.discard(i * slot, slot))
                shadow[i * slot:(i + 1) * slot] = bytes(slot)
                off, n = (i + 1) * slot + 12345, 100 * KiB
                changes.append(aimg.write_zeroes(off, n))
                shadow[off:off + n] = bytes(n)
            await asyncio.gather(*changes, aimg.read(2 * slot, slot))
            await aimg.flush()
            assert await aimg.read(0, size) == shadow
            assert aimg.pending == 0
    run(main())
    assert img.read(0, size) == shadow


def test_exclusive_requests(new_image: Callable[..., Image]) -> None:
    """resize and create_snapshot through await; writes submitted before a snapshot
    are in it, writes after it are not."""
    img = new_image(4 * MiB)

    async def main() -> None:
        async with AsyncImage(img) as aimg:
            assert (aimg.size, aimg.cluster_size) == (4 * MiB, 65536)
            before = [asyncio.ensure_future(aimg.write(i * 64 * KiB, b"A" * 1000))
                      for i in range(8)]
            await asyncio.sleep(0)  # let them submit first
            await aimg.create_snapshot("snap")
            assert all(t.done() for t in before)
            await aimg.write(0, b"B" * 1000)
            await aimg.resize(8 * MiB)
            assert aimg.size == 8 * MiB
            await aimg.write(7 * MiB, b"C")
            assert [s.name for s in aimg.image.snapshots()] == ["snap"]
            await aimg.apply_snapshot("snap")
            assert await aimg.read(0, 1000) == b"A" * 1000
            await aimg.delete_snapshot("snap")
            assert aimg.image.snapshots() == []
    run(main())


# ------------------------------------------------------------------------------------
# cancelling a running request


def test_wait_for_timeout_ends_only_when_the_write_stopped(
        new_image: Callable[..., Image]) -> None:
    """The key test.  A 16 MiB allocating write is paused inside the image (event
    point ``cluster_alloc``, before its first cluster run) until 0.3 s after the
    ``wait_for`` deadline.  The TimeoutError must come only after the write stopped:
    at that moment nothing is pending or in flight, and later nothing changes.

    With ``await asyncio.wrap_future(f)`` instead, TimeoutError comes at the deadline
    while the write is paused: it is still pending and in flight, and once resumed
    it writes all 16 MiB after the TimeoutError.
    """
    length, hold = 16 * MiB, 0.3
    img = new_image(32 * MiB)
    new = pattern(1, length)

    async def main() -> None:
        async with AsyncImage(img, workers=2) as aimg:
            start = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(aimg.write(0, new), timeout=0.05)
            assert aimg.pending == 0, "TimeoutError while the write still runs"
            assert aimg.aio.in_flight == 0, "TimeoutError while the write still runs"
            assert time.monotonic() - start >= hold  # it waited for the stop
            got = img.read(0, length)
            await asyncio.sleep(0.1)
            assert img.read(0, length) == got, "bytes landed after the TimeoutError"
            n_new, n_old = per_cluster_old_or_new(got, b"", new, img.cluster_size)
            assert n_new <= MAX_RUN_BYTES // img.cluster_size and n_old > 0

    with Pause(img, "cluster_alloc", hold=hold) as pause:
        run(main())
        assert pause.reached.is_set()
    assert_clean(img)


def test_wait_for_timeout_on_a_big_write(new_image: Callable[..., Image]) -> None:
    """A real 256 MiB write (allocating: about 0.2-0.6 s here) under
    ``wait_for(..., timeout=0.03)``: TimeoutError, nothing running afterwards (and,
    0.2 s later, still clusters with their old data), each cluster all old or all
    new, the image checks clean."""
    length = 256 * MiB
    img = new_image(length)
    old = pattern(2, 4 * MiB)
    img.write(0, old)  # the first clusters are overwritten, the others allocated
    new = pattern(3, length)
    got = bytearray(length)

    async def main() -> None:
        async with AsyncImage(img, workers=4) as aimg:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(aimg.write(0, new), timeout=0.03)
            assert aimg.pending == 0, "TimeoutError while the write still runs"
            assert aimg.aio.in_flight == 0, "TimeoutError while the write still runs"
            await asyncio.sleep(0.2)  # what the write would need to go on to its end
            assert await aimg.readinto(0, got) == length

    run(main())
    n_new, n_old = per_cluster_old_or_new(got, old, new, img.cluster_size)
    assert n_old > 0, "the write ran to its end"
    assert_clean(img)


def test_cancel_that_loses_the_race(new_image: Callable[..., Image]) -> None:
    """A one-cluster write paused inside the image past its last cancellation point
    (``l2_update``: its data written, about to be linked), its task cancelled: the task
    waits for it, ends cancelled, and the data is written."""
    img = new_image(4 * MiB)

    async def main(pause: Pause) -> None:
        async with AsyncImage(img, workers=2) as aimg:
            task = asyncio.ensure_future(aimg.write(65536, b"x" * 65536))
            await until(pause.reached.is_set, "the write to pause")
            task.cancel()
            await asyncio.sleep(0.05)
            assert not task.done(), "the task ended while its write still runs"
            pause.resume()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert task.cancelled() and aimg.pending == 0
            assert await aimg.read(65536, 65536) == b"x" * 65536

    with Pause(img, "l2_update") as pause:
        run(main(pause))


def test_cancelled_again_while_stopping(new_image: Callable[..., Image]) -> None:
    """A second and third task.cancel() while the request stops do not end the task
    before the request; the task ends cancelled, and the write stopped part way."""
    img = new_image(16 * MiB)
    new = pattern(4, 8 * MiB)

    async def main(pause: Pause) -> None:
        async with AsyncImage(img, workers=2) as aimg:
            task = asyncio.ensure_future(aimg.write(0, new))
            await until(pause.reached.is_set, "the write to pause")
            for _ in range(3):
                task.cancel()
                await asyncio.sleep(0.02)
                assert not task.done(), "the task ended while its write still runs"
                assert aimg.pending == 1
            pause.resume()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert task.cancelled() and aimg.pending == 0
            got = await aimg.read(0, len(new))
            n_new, n_old = per_cluster_old_or_new(got, b"", new, 65536)
            assert n_old > 0

    with Pause(img, "cluster_alloc") as pause:
        run(main(pause))


# ------------------------------------------------------------------------------------
# cancelling a queued request


def test_cancel_queued_request_never_touches_the_image(new_image: Callable[..., Image]) -> None:
    """The only worker held by a gated write: the writes queued behind it, their tasks
    cancelled, end at once (the gate still shut) and never reach the image."""
    img = new_image(4 * MiB)
    gated = Recorder(img)
    gated.gated.add(3 * MiB)

    async def main() -> None:
        async with AsyncImage(gated, workers=1) as aimg:  # type: ignore[arg-type]
            holder = asyncio.ensure_future(aimg.write(3 * MiB, b"h" * 100))
            await until(lambda: gated.entered.acquire(False), "the gated write to start")
            queued = [asyncio.ensure_future(aimg.write(i * 64 * KiB, b"q" * 70000))
                      for i in range(10)]
            queued.append(asyncio.ensure_future(aimg.discard(0, MiB)))
            await asyncio.sleep(0)  # let every task submit its request
            assert aimg.aio.queued == 11 and aimg.pending == 12
            for task in queued:
                task.cancel()
            results = await asyncio.wait_for(
                asyncio.gather(*queued, return_exceptions=True), TIMEOUT)
            assert all(isinstance(r, asyncio.CancelledError) for r in results)
            assert aimg.aio.queued == 0 and aimg.pending == 1 and not holder.done()
            gated.gate.set()
            await holder
    run(main())
    assert [(name, offset) for kind, name, offset in gated.log if kind == "start"] == \
        [("write", 3 * MiB)]
    assert img.read(0, 2 * MiB) == bytes(2 * MiB)
    assert img.read(3 * MiB, 100) == b"h" * 100


# ------------------------------------------------------------------------------------
# closing


def test_async_with_drains_and_closes_its_pool(new_image: Callable[..., Image]) -> None:
    """Leaving ``async with`` waits for requests still running, shuts down the pool it
    made, refuses new requests, and leaves the image open."""
    img = new_image(4 * MiB)

    async def main() -> list[asyncio.Future[None]]:
        async with AsyncImage(img, workers=2) as aimg:
            tasks = [asyncio.ensure_future(aimg.write(i * MiB, pattern(i, MiB)))
                     for i in range(4)]
            await asyncio.sleep(0)  # submitted, not awaited by us
        assert aimg.closed and aimg.pending == 0
        assert all(not t.is_alive() for t in aimg.aio._dispatcher._threads)
        with pytest.raises(ClosedImage):
            await aimg.read(0, 1)
        with pytest.raises(RuntimeError):
            aimg.aio.submit_read(0, 1)  # the pool it made is shut down
        await aimg.aclose()  # again: nothing to do
        return tasks

    tasks = run(main())
    assert all(t.done() and t.result() is None for t in tasks)
    assert not img.closed
    for i in range(4):
        assert img.read(i * MiB, MiB) == pattern(i, MiB)


def test_borrowed_pool_stays_open(new_image: Callable[..., Image]) -> None:
    img = new_image(4 * MiB)
    with AioImage(img, workers=2) as aio:
        async def main() -> None:
            async with AsyncImage(aio) as aimg:
                await aimg.write(0, b"borrowed")
            assert aimg.closed
        run(main())
        assert aio.submit_read(0, 8).result(TIMEOUT) == b"borrowed"
    with pytest.raises(ValueError):
        AsyncImage(aio, workers=2)


def test_close_does_not_block_the_loop(new_image: Callable[..., Image]) -> None:
    """aclose() while a request is held: the loop keeps running; aclose ends only once
    the request has (it drains, it does not cancel)."""
    img = new_image(4 * MiB)
    gated = Recorder(img)
    gated.gated.add(0)

    async def main() -> None:
        aimg = AsyncImage(gated, workers=1)  # type: ignore[arg-type]
        writer = asyncio.ensure_future(aimg.write(0, b"w" * 4096))
        await until(lambda: gated.entered.acquire(False), "the gated write to start")
        closer = asyncio.ensure_future(aimg.aclose())
        # A close that blocked the loop would hang here for good: only the loop opens
        # the gate that lets the request (and so the close) end.
        for _ in range(20):
            await asyncio.sleep(0.005)
        assert not closer.done() and not writer.done()
        gated.gate.set()
        await closer
        assert writer.done() and writer.result() is None
    run(main())
    assert img.read(0, 4096) == b"w" * 4096


def test_open_and_create_own_the_image(tmp_path: Path) -> None:
    path = str(tmp_path / "owned.qcow2")

    async def main() -> tuple[Image, Image, Image]:
        async with AsyncImage.create(path, 4 * MiB, cluster_size=4096) as aimg:
            await aimg.write(100, b"made")
            created = aimg.image
        assert created.closed
        aimg = await AsyncImage.open(path, readonly=True, workers=1)
        assert await aimg.read(100, 4) == b"made"
        with pytest.raises(ReadOnlyImage):
            await aimg.write(0, b"no")
        await aimg.aclose()
        async with AsyncImage.open(path) as again:
            await again.write(0, b"yes")
        return created, aimg.image, again.image

    images = run(main())
    assert all(i.closed for i in images)
    with qcow2rw.open(path, readonly=True) as img:
        assert img.read(0, 3) == b"yes"
        assert_clean(img)


def test_cancelled_open_closes_what_it_opened(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The task awaiting AsyncImage.open is cancelled while the image is opening: the
    task waits for the open, closes the image, then ends cancelled."""
    path = str(tmp_path / "slow.qcow2")
    qcow2rw.create(path, MiB).close()
    proceed, opened = threading.Event(), []

    def slow_open(*args: Any, **kwargs: Any) -> Image:
        assert proceed.wait(TIMEOUT)
        img = qcow2rw.open(*args, **kwargs)
        opened.append(img)
        return img

    monkeypatch.setattr(qcow2rw.asyncface, "open_image", slow_open)

    async def main() -> None:
        task = asyncio.ensure_future(AsyncImage.open(path))
        await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.sleep(0.02)
        assert not task.done()
        proceed.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(opened) == 1 and opened[0].closed
    run(main())


# ------------------------------------------------------------------------------------
# errors


def test_errors_arrive_as_library_exceptions(new_image: Callable[..., Image]) -> None:
    img = new_image(MiB)
    img.write(0, b"data")
    img.close()
    ro = qcow2rw.open(img.path, readonly=True)

    async def main() -> None:
        async with AsyncImage(ro) as aimg:
            with pytest.raises(ReadOnlyImage):
                await aimg.write(0, b"x")
            with pytest.raises(ReadOnlyImage):
                await aimg.discard(0, 65536)
            with pytest.raises(OutOfRange):
                await aimg.read(MiB - 1, 2)
            assert await aimg.read(0, 4) == b"data"  # still works after errors
        with pytest.raises(ClosedImage):
            await aimg.flush()
    run(main())
    ro.close()
