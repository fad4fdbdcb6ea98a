"""Issue 16 §1 (first part): reads the page cache can serve complete inline, in the
submitting thread (``AioImage(inline="auto")``, the default where ``RWF_NOWAIT`` exists).

A miss anywhere (an L2 table not cached, data not in the page cache, a hole, a
compressed cluster, an exclusive operation queued in the pool or holding the image)
goes to the pool with nothing half-done; a read submitted after an exclusive request
never completes before it; inline and pooled reads mixed with writes from many threads,
in every lock mode, see old or new data, never a mix.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

import qcow2rw

CS = 65536
pytestmark = pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="no RWF_NOWAIT here")


@pytest.fixture
def image(tmp_path: Path) -> qcow2rw.Image:
    img = qcow2rw.create(tmp_path / "a.qcow2", 16 * CS)
    for i in range(8):
        img.write(i * CS, bytes([i + 1]) * CS)
    img.write_compressed(9 * CS, b"c" * CS)
    img.read(0, 16 * CS)  # tables cached, data in the page cache
    yield img
    img.close()


def _released(aio: qcow2rw.AioImage) -> int:
    return aio._dispatcher._released  # requests handed to the workers


def test_cached_reads_complete_inline_and_others_in_the_pool(image: qcow2rw.Image) -> None:
    with image.aio(workers=2) as aio:
        before = _released(aio)
        future = aio.submit_read(3 * CS + 100, 4096)
        assert future.done() and future.result() == b"\x04" * 4096
        buf = bytearray(512)
        future = aio.submit_readinto(5 * CS, memoryview(buf))
        assert future.done() and future.result() == 512 and buf == b"\x06" * 512
        assert not aio.cancel(future) and not future.cancelled()
        assert _released(aio) == before
        # a hole, a zero cluster (no backing file): zeros, inline
        image.write_zeroes(13 * CS, CS)
        assert aio.submit_read(12 * CS, 100).result() == bytes(100)
        assert aio.submit_read(13 * CS + 5, 100).result() == bytes(100)
        assert _released(aio) == before
        # a compressed cluster, a read across two clusters: the pool
        assert aio.submit_read(9 * CS, 100).result() == b"c" * 100
        assert aio.submit_read(CS - 10, 20).result() == b"\x01" * 10 + b"\x02" * 10
        assert _released(aio) == before + 2
    with image.aio(workers=2, inline="never") as aio:
        before = _released(aio)
        assert aio.submit_read(0, 10).result() == b"\x01" * 10
        assert _released(aio) == before + 1
    with pytest.raises(ValueError):
        image.aio(inline="sometimes")


def test_completed_futures_behave_as_finished_futures(image: qcow2rw.Image) -> None:
    """Inline futures are born finished: wait/as_completed/callbacks/asyncio see that."""
    import asyncio
    import concurrent.futures as cf

    with image.aio(workers=2) as aio:
        inline = [aio.submit_read(i * CS, 512) for i in range(4)]
        pooled = aio.submit_read(9 * CS, 512)  # compressed: the pool
        assert all(f.done() and not f.running() and not f.cancelled() for f in inline)
        assert all(f.exception() is None and not f.cancel() for f in inline)
        done, not_done = cf.wait(inline + [pooled], timeout=10)
        assert len(done) == 5 and not not_done
        assert sorted(f.result() for f in cf.as_completed(inline + [pooled], timeout=10)) == \
            sorted([bytes([i + 1]) * 512 for i in range(4)] + [b"c" * 512])
        seen: list[object] = []
        inline[0].add_done_callback(seen.append)  # runs at once, in this thread
        assert seen == [inline[0]]
        assert "read(0x0, 512)" in repr(inline[0]) and "finished" in repr(inline[0])

        async def main() -> bytes:
            return await asyncio.wrap_future(aio.submit_read(2 * CS, 16))

        assert asyncio.run(main()) == b"\x03" * 16


def test_holes_over_a_backing_file_go_to_the_pool(tmp_path: Path) -> None:
    base = qcow2rw.create(tmp_path / "base.qcow2", 4 * CS)
    base.write(0, b"b" * 4 * CS)
    base.close()
    with qcow2rw.create(tmp_path / "top.qcow2", 4 * CS, backing_file=str(tmp_path / "base.qcow2"),
                        backing_format="qcow2") as top:
        top.write(CS, b"t" * CS)
        top.write_zeroes(2 * CS, CS)
        top.read(0, 4 * CS)
        with top.aio(workers=2) as aio:
            before = _released(aio)
            assert aio.submit_read(CS, 8).result() == b"t" * 8  # inline
            assert aio.submit_read(2 * CS, 8).result() == bytes(8)  # zero flag: inline
            assert _released(aio) == before
            assert aio.submit_read(0, 8).result() == b"b" * 8  # from the backing file
            assert aio.submit_read(3 * CS, 8).result() == b"b" * 8
            assert _released(aio) == before + 2


def test_a_page_cache_miss_goes_to_the_pool(image: qcow2rw.Image) -> None:
    image.flush()
    os.posix_fadvise(image.state.file.fd, 0, 0, os.POSIX_FADV_DONTNEED)
    buf = bytearray(4096)
    assert not image.read_nowait(2 * CS, buf)  # EAGAIN: nothing waited for
    with image.aio(workers=2) as aio:
        assert aio.submit_read(2 * CS, 4096).result() == b"\x03" * 4096


def test_a_read_after_an_exclusive_request_never_completes_before_it(image: qcow2rw.Image) -> None:
    done: list[str] = []
    with image.aio(workers=4) as aio:
        snap = aio.submit_snapshot("s1")
        snap.add_done_callback(lambda _f: done.append("snapshot"))
        read = aio.submit_read(0, 4096)
        read.add_done_callback(lambda _f: done.append("read"))
        assert read.result() == b"\x01" * 4096
        snap.result()
    assert done == ["snapshot", "read"]


def test_an_exclusive_holder_elsewhere_sends_reads_to_the_pool(image: qcow2rw.Image) -> None:
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with image.exclusive():
            taken.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert taken.wait(10)
    with image.aio(workers=2) as aio:
        future = aio.submit_read(0, 4096)
        assert not future.done()  # not inline: it waits in the pool for the image
        release.set()
        assert future.result(10) == b"\x01" * 4096
    holder.join(10)


@pytest.mark.parametrize("lock_mode", ["mutex", "rwlock", "fine"])
def test_inline_reads_while_clusters_move(tmp_path: Path, lock_mode: str) -> None:
    """Readers read the odd 4 KiB blocks (written once, before) through the pool and
    inline, while writers rewrite the even blocks of the same clusters and snapshots
    taken meanwhile make every next write copy its cluster elsewhere (the old one
    freed): every read returns the odd block's data, whatever path it took."""
    path = tmp_path / "b.qcow2"
    blocks = 32 * CS // 4096
    with qcow2rw.create(path, 32 * CS) as img:
        for b in range(1, blocks, 2):
            img.write(b * 4096, bytes([b % 250 + 1]) * 4096)
    img = qcow2rw.open(path, lock_mode=lock_mode)
    img.read(0, 32 * CS)
    errors: list[BaseException] = []
    stop = threading.Event()
    aio = img.aio(workers=4)

    def writer(seed: int) -> None:
        import random
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                block = rng.randrange(0, blocks, 2)
                data = bytes([rng.randrange(256)]) * 4096
                if rng.random() < 0.5:
                    aio.submit_write(block * 4096, data).result()
                else:
                    img.write(block * 4096, data)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def snapshots() -> None:
        try:
            n = 0
            while not stop.is_set():
                aio.submit_snapshot(f"s{n}").result()
                if n:
                    aio.submit_delete_snapshot(f"s{n - 1}").result()
                n += 1
                stop.wait(0.01)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def reader(seed: int) -> None:
        import random
        rng = random.Random(seed)
        try:
            for _ in range(3000):
                block = rng.randrange(1, blocks, 2)
                data = aio.submit_read(block * 4096 + 100, 3000).result()
                assert data == bytes([block % 250 + 1]) * 3000, f"block {block}"
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        others = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
        others.append(threading.Thread(target=snapshots))
        readers = [threading.Thread(target=reader, args=(10 + i,)) for i in range(3)]
        for t in others + readers:
            t.start()
        for t in readers:
            t.join(120)
        stop.set()
        for t in others:
            t.join(30)
    finally:
        sys.setswitchinterval(old)
        aio.close()
        img.close()
    assert not errors, errors[:3]


def test_the_asyncio_face_completes_cached_reads_inline(image: qcow2rw.Image) -> None:
    import asyncio

    from qcow2rw.asyncface import AsyncImage

    async def main(inline: str) -> tuple[int, int]:
        async with AsyncImage(image, workers=2, inline=inline) as aimg:
            before = _released(aimg.aio)
            for i in range(8):
                assert await aimg.read(i * CS + 7, 100) == bytes([i + 1]) * 100
            buf = bytearray(64)
            assert await aimg.readinto(CS, buf) == 64 and buf == b"\x02" * 64
            assert await aimg.read(9 * CS, 4) == b"cccc"  # compressed: the pool
            assert aimg.pending == 0
            return _released(aimg.aio) - before, 0

    assert asyncio.run(main("auto"))[0] == 1
    assert asyncio.run(main("never"))[0] == 10
    with image.aio(workers=1) as aio, pytest.raises(ValueError):
        AsyncImage(aio, inline="never")
