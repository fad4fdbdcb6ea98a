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
        # a hole, a compressed cluster, a read across two clusters: the pool
        assert aio.submit_read(12 * CS, 100).result() == bytes(100)
        assert aio.submit_read(9 * CS, 100).result() == b"c" * 100
        assert aio.submit_read(CS - 10, 20).result() == b"\x01" * 10 + b"\x02" * 10
        assert _released(aio) == before + 3
    with image.aio(workers=2, inline="never") as aio:
        before = _released(aio)
        assert aio.submit_read(0, 10).result() == b"\x01" * 10
        assert _released(aio) == before + 1
    with pytest.raises(ValueError):
        image.aio(inline="sometimes")


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
