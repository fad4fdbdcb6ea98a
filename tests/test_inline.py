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


# --------------------------------------------------------------------------- inline writes
XFS_MIN = 320 << 20  # (mkfs.xfs refuses file systems under 300 MiB)


@pytest.fixture(scope="module")
def xfs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory on XFS (a loop mount): XFS takes buffered RWF_NOWAIT writes, which
    ext4 and tmpfs refuse.  Skipped where loop mounts cannot be made (not root, no
    mkfs.xfs: .ci/run installs xfsprogs, no permission to mount)."""
    import shutil
    import subprocess
    if os.geteuid() != 0 or not shutil.which("mkfs.xfs") or not shutil.which("mount"):
        pytest.skip("an XFS loop mount needs root, mkfs.xfs (xfsprogs) and mount")
    base = tmp_path_factory.mktemp("xfs")
    fs, mnt = base / "fs.img", base / "mnt"
    mnt.mkdir()
    with open(fs, "wb") as f:
        f.truncate(XFS_MIN)
    made = subprocess.run(["mkfs.xfs", "-q", "-f", str(fs)], capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"mkfs.xfs failed: {made.stderr.strip()}")
    mounted = subprocess.run(["mount", "-o", "loop", str(fs), str(mnt)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot loop-mount XFS here: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_file_system_refusing_nowait_writes_is_probed_once(tmp_path: Path) -> None:
    """ext4/tmpfs refuse buffered RWF_NOWAIT writes: the first inline attempt learns it
    (EOPNOTSUPP), every write then goes to the pool, and nothing was lost."""
    with qcow2rw.create(tmp_path / "w.qcow2", 4 * CS) as img:
        img.write(0, b"a" * 4 * CS)
        with img.aio(workers=2) as aio:
            if img.state.file.nowait_writes is None:
                first = aio.submit_write(100, b"b" * 100)
                first.result()
                if first.completed_inline:
                    pytest.skip("this file system takes RWF_NOWAIT writes")
            assert img.state.file.nowait_writes is False and not aio._inline_writes
            before = _released(aio)
            futures = [aio.submit_write(i * 512, b"c" * 10) for i in range(8)]
            assert not any(f.completed_inline for f in futures)
            for f in futures:
                f.result()
            assert _released(aio) == before + 8
        assert img.read(0, 10) == b"c" * 10 and img.read(100, 100) == b"b" * 100


def test_overwrites_complete_inline_on_xfs(xfs_dir: Path, qemu: object) -> None:
    """On XFS an overwrite of an allocated, unshared cluster completes inline; a hole,
    a shared cluster (after a snapshot), a write across clusters, a page evicted from
    the cache (EAGAIN) go to the pool; qemu-io reads every byte back."""
    import subprocess
    path = xfs_dir / "w.qcow2"
    with qcow2rw.create(path, 8 * CS) as img:
        img.write(0, b"a" * 4 * CS)
        with img.aio(workers=2) as aio:
            # (XFS may still say EAGAIN now and then, e.g. while it throttles dirty pages)
            for _attempt in range(50):
                before = _released(aio)
                f = aio.submit_write(CS + 512, b"b" * 4096)
                if f.completed_inline:
                    break
                f.result()
                img.flush()
            assert f.completed_inline and f.result() is None and not f.cancel()
            assert img.state.file.nowait_writes is True
            assert _released(aio) == before
            aio.submit_write(5 * CS, b"h" * 512).result()  # a hole: allocation, the pool
            aio.submit_write(CS - 512, b"x" * 1024).result()  # across two clusters
            assert _released(aio) == before + 2
            aio.submit_snapshot("s").result()
            before = _released(aio)
            aio.submit_write(2 * CS, b"s" * 512).result()  # shared: copy on write, the pool
            assert _released(aio) == before + 2 - 1  # (the snapshot was counted before)
            img.flush()
            os.posix_fadvise(img.state.file.fd, 0, 0, os.POSIX_FADV_DONTNEED)
            f = aio.submit_write(CS, b"e" * 512)  # not in the page cache: EAGAIN, the pool
            f.result()
            assert not f.completed_inline
    for cmd in (f"read -P 0x62 {CS + 512} 4096", f"read -P 0x68 {5 * CS} 512",
                f"read -P 0x78 {CS - 512} 512", f"read -P 0x73 {2 * CS} 512",
                f"read -P 0x65 {CS} 512", f"read -P 0x61 {3 * CS} {CS}"):
        out = subprocess.run(["qemu-io", "-c", cmd, str(path)], capture_output=True, text=True)
        assert "Pattern verification failed" not in out.stdout + out.stderr, (cmd, out)
    check = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


class _InlineMix:
    """An Image whose reads and writes go, at random, straight to the image or
    through an AioImage with inline completion (the stress's shadow model checks
    every result, whichever path it took)."""

    def __init__(self, img: qcow2rw.Image) -> None:
        import random
        self.img = img
        self.aio = img.aio(workers=2, inline="auto")
        self.rng = random.Random(7)
        self.inline = 0
        self.inline_writes = 0

    def _count(self, future: qcow2rw.AioFuture) -> None:
        if future.completed_inline:
            self.inline += 1  # (one counter per run; races only undercount)

    def read(self, offset: int, length: int) -> bytes:
        if self.rng.random() < 0.2:
            return self.img.read(offset, length)
        future = self.aio.submit_read(offset, length)
        self._count(future)
        return future.result()

    def readinto(self, offset: int, buffer: object) -> int:
        future = self.aio.submit_readinto(offset, buffer)
        self._count(future)
        return future.result()

    def write(self, offset: int, data: object) -> None:
        future = self.aio.submit_write(offset, data)
        self._count(future)
        self.inline_writes += future.completed_inline
        future.result()

    def close(self) -> None:
        self.aio.close()
        self.img.close()

    def __getattr__(self, name: str) -> object:
        return getattr(self.img, name)


def _stress_inline(where: Path, lock_mode: str) -> tuple[object, list[_InlineMix]]:
    from qcow2rw.devkit.stress import run_stress
    mixes: list[_InlineMix] = []

    def wrap(img: qcow2rw.Image) -> _InlineMix:
        mixes.append(_InlineMix(img))
        return mixes[-1]

    old = sys.getswitchinterval()
    try:
        result = run_stress(where, workers=4, seed=1616, duration=2.0, lock_mode=lock_mode,
                            cluster_size=4096, size=8 << 20, rounds=2, switchinterval=1e-5,
                            wrap=wrap, qemu=True, log=lambda _s: None)
    finally:
        sys.setswitchinterval(old)
    return result, mixes


@pytest.mark.interop
@pytest.mark.timeout(120)
@pytest.mark.parametrize("lock_mode", ["mutex", "rwlock", "fine"])
def test_inline_and_pooled_requests_against_the_shadow_model(
        tmp_path: Path, lock_mode: str, qemu: object) -> None:
    """The stress (4 threads, snapshots and discards freeing clusters, shadow model of
    every sector) with reads and writes through an inline AioImage, in every lock mode."""
    result, mixes = _stress_inline(tmp_path, lock_mode)
    assert result.ok, result.summary() + "\n" + "\n".join(result.failures)
    assert sum(m.inline for m in mixes) > 50, [m.inline for m in mixes]


@pytest.mark.interop
@pytest.mark.timeout(120)
def test_inline_writes_against_the_shadow_model_on_xfs(xfs_dir: Path, qemu: object) -> None:
    """The same on XFS, where overwrites complete inline too."""
    where = xfs_dir / "stress"
    where.mkdir(exist_ok=True)
    result, mixes = _stress_inline(where, "fine")
    assert result.ok, result.summary() + "\n" + "\n".join(result.failures)
    assert sum(m.inline_writes for m in mixes) > 20, [m.inline_writes for m in mixes]


# --------------------------------------------------------------------------- review findings
def test_wait_over_inline_and_pending_futures_never_deadlocks(image: qcow2rw.Image) -> None:
    """``concurrent.futures.wait`` takes its futures' conditions in order of ``id()``:
    two threads waiting on [inline, pending] and [pending, inline'] deadlocked while
    inline futures shared one condition."""
    from concurrent.futures import Future, wait
    pending: Future[None] = Future()
    low = high = None
    keep = []
    with image.aio(workers=2) as aio:
        while low is None or high is None:
            future = aio.submit_read(0, 512)
            assert future.completed_inline
            keep.append(future)
            if id(future) < id(pending) and low is None:
                low = future
            if id(future) > id(pending) and high is None:
                high = future
        stop = threading.Event()

        def loop(futures: list[Future[object]]) -> None:
            while not stop.is_set():
                wait(futures, timeout=0)

        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            threads = [threading.Thread(target=loop, args=(fs,), daemon=True)
                       for fs in ([low, pending], [pending, high])]
            for t in threads:
                t.start()
            stop.wait(1.5)
            stop.set()
            for t in threads:
                t.join(5)
        finally:
            sys.setswitchinterval(old)
        assert not any(t.is_alive() for t in threads), "wait() deadlocked"


def _set_l2_entry(path: Path, guest: int, change: object) -> None:
    import struct
    with qcow2rw.open(path, readonly=True) as img:
        state = img.state
        l2 = state.l1.entries[guest >> state.l1_shift] & 0x00FFFFFFFFFFFE00
        index = (guest >> state.cluster_bits) & state.l2_mask
    with open(path, "r+b") as f:
        f.seek(l2 + 8 * index)
        (entry,) = struct.unpack(">Q", f.read(8))
        f.seek(l2 + 8 * index)
        f.write(struct.pack(">Q", change(entry)))  # type: ignore[operator]


@pytest.mark.interop
@pytest.mark.parametrize("case", ["v2-zero-flag", "v3-zero-alloc-past-eof"])
def test_inline_zeros_report_corruption_as_the_ordinary_read(tmp_path: Path, case: str,
                                                             qemu: object) -> None:
    """A zero flag in a v2 image, a zero cluster whose host offset lies past the end
    of the file: the ordinary read raises CorruptImage (as QEMU fails the read); the
    inline path must not answer zeros (it goes to the pool, which reports it)."""
    import subprocess
    path = tmp_path / "c.qcow2"
    compat = "0.10" if case == "v2-zero-flag" else "1.1"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"compat={compat}",
                    str(path), "1M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0xab 0 128k", str(path)], check=True,
                   capture_output=True)
    if case == "v2-zero-flag":
        _set_l2_entry(path, 0, lambda e: e | 1)
    else:
        _set_l2_entry(path, 0, lambda e: (1 << 40) | (1 << 63) | 1)
    with qcow2rw.open(path, readonly=True) as img, img.aio(workers=1) as aio:
        assert aio.submit_read(65536, 16).result() == b"\xab" * 16  # caches the table
        future = aio.submit_read(0, 16)
        assert not future.completed_inline
        with pytest.raises(qcow2rw.CorruptImage):
            future.result()


def test_odd_buffers_fail_in_the_future_not_in_submit(image: qcow2rw.Image) -> None:
    """A read-only buffer to read into, a non-contiguous view to write: the error comes
    in the future, as without inline completion (the pool's path reports it)."""
    with image.aio(workers=1) as aio:
        for offset in (0, 12 * CS):  # data, and a hole
            future = aio.submit_readinto(offset, bytes(4096))
            assert not future.completed_inline
            with pytest.raises((TypeError, BufferError)):  # (what the ordinary read raises)
                future.result()
        strided = memoryview(bytearray(8192))[::2]
        future = aio.submit_write(0, strided)
        with pytest.raises((BufferError, TypeError, ValueError)):
            future.result()


def test_bad_offsets_and_lengths_fail_in_the_future_not_in_submit(image: qcow2rw.Image) -> None:
    """A float or None offset or length: the error comes in the future, as with
    inline='never' (before: the inline attempt raised from submit_* itself)."""
    with image.aio(workers=1) as aio:
        calls = (lambda: aio.submit_read(1.5, 16), lambda: aio.submit_read(0, 16.0),
                 lambda: aio.submit_read(None, 16), lambda: aio.submit_readinto(1.5, bytearray(8)),
                 lambda: aio.submit_write(1.5, b"x" * 8))
        for call in calls:
            future = call()
            assert not future.completed_inline
            with pytest.raises(TypeError):
                future.result()


def _refuse_nowait(monkeypatch: pytest.MonkeyPatch, name: str, err: int) -> list[int]:
    """Make os.<name> (preadv or pwritev) fail with *err* when given RWF_NOWAIT, as a
    file system without FMODE_NOWAIT does; the list counts the refusals."""
    real = getattr(os, name)
    refused: list[int] = []

    def patched(fd: int, buffers: object, offset: int, flags: int = 0) -> int:
        if flags & os.RWF_NOWAIT:
            refused.append(offset)
            raise OSError(err, os.strerror(err))
        return real(fd, buffers, offset, flags)

    monkeypatch.setattr(os, name, patched)
    return refused


@pytest.mark.parametrize("err", ["EOPNOTSUPP", "EIO"])
def test_a_refused_nowait_read_goes_to_the_pool(image: qcow2rw.Image,
                                                monkeypatch: pytest.MonkeyPatch, err: str) -> None:
    """tmpfs (and FUSE, NFS) refuse RWF_NOWAIT reads with EOPNOTSUPP: the read goes to
    the pool and reads right, and the refusal is remembered for the open (later reads
    do not try again).  Any other error of the inline attempt goes to the pool too
    (whose ordinary read reports it, if it persists).  Before: the OSError was raised
    by submit_read itself."""
    import errno
    refused = _refuse_nowait(monkeypatch, "preadv", getattr(errno, err))
    with image.aio(workers=2) as aio:
        before = _released(aio)
        for i in range(3):
            future = aio.submit_read(i * CS + 8, 100)
            assert not future.completed_inline
            assert future.result() == bytes([i + 1]) * 100
        assert _released(aio) == before + 3
    assert len(refused) == (1 if err == "EOPNOTSUPP" else 3)
    assert image.state.file.nowait_reads is (False if err == "EOPNOTSUPP" else None)


def test_the_real_tmpfs_reads_right_with_inline_auto() -> None:
    """/dev/shm (tmpfs) where it refuses RWF_NOWAIT reads on this kernel."""
    import tempfile
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as where:
        with qcow2rw.create(Path(where) / "t.qcow2", 4 * CS) as img:
            img.write(0, b"t" * CS)
            with img.aio(workers=2) as aio:
                assert aio.submit_read(10, 100).result() == b"t" * 100
                assert aio.submit_read(20, 100).result() == b"t" * 100


def _emulate_short_nowait_writes(monkeypatch: pytest.MonkeyPatch, keep: int) -> list[int]:
    """Make ``pwritev(RWF_NOWAIT)`` behave as XFS's when a page of the range is not in
    the page cache: write the first *keep* bytes and return that count (a short
    write).  The list records each such write's length."""
    real = os.pwritev
    short: list[int] = []

    def patched(fd: int, buffers: list, offset: int, flags: int = 0) -> int:
        if flags & os.RWF_NOWAIT:
            data = bytes(memoryview(buffers[0]).cast("B"))
            short.append(len(data))
            return os.pwrite(fd, data[:keep], offset)
        return real(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "pwritev", patched)
    return short


def test_a_short_inline_write_is_finished_never_torn(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A short RWF_NOWAIT write has changed the cluster: the request is under way, so
    it ends inline (the rest written the ordinary way) and nothing can cancel it or
    come between its two halves.  Before: it went to the pool after all, where
    f.cancel() returned True ("never touches the image") with 100 bytes of it in the
    cluster, and a snapshot taken before the pooled write ran kept the torn cluster."""
    short = _emulate_short_nowait_writes(monkeypatch, 100)
    with qcow2rw.create(tmp_path / "s.qcow2", 4 * CS) as img:
        img.write(0, b"o" * CS)
        img.read(0, 16)
        with img.aio(workers=1) as aio:
            go = threading.Event()
            blocker = aio._submit("block", False, lambda _a, _b, cancel: go.wait(10))
            future = aio.submit_write(4096, b"N" * 8192)
            cancelled = future.cancel()
            snapshot = aio.submit_snapshot("s")
            go.set()
            blocker.result()
            snapshot.result()
            assert short == [8192]
            assert future.completed_inline and not cancelled and future.result() is None
        assert img.read(0, CS) == b"o" * 4096 + b"N" * 8192 + b"o" * (CS - 12288)
        img.apply_snapshot("s")  # taken after the write had ended: all of it
        assert img.read(4096, 8192) == b"N" * 8192


def test_an_error_finishing_a_short_inline_write_comes_in_its_future(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the ordinary write of the rest fails, the inline future carries the error
    (as the pooled write's future would), not submit_write."""
    import errno
    from qcow2rw.storage import HostFile
    _emulate_short_nowait_writes(monkeypatch, 100)
    with qcow2rw.create(tmp_path / "e.qcow2", 4 * CS) as img:
        img.write(0, b"o" * CS)
        img.read(0, 16)

        real, failed = HostFile.pwrite, []

        def failing(self: HostFile, offset: int, data: object) -> None:
            if failed:  # (once: the metadata written at close goes through)
                return real(self, offset, data)
            failed.append(offset)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(HostFile, "pwrite", failing)
        with img.aio(workers=1) as aio:
            future = aio.submit_write(0, b"N" * 4096)
            assert future.completed_inline and future.done() and not future.cancel()
            with pytest.raises(OSError) as caught:
                future.result()
            assert caught.value.errno == errno.ENOSPC
            assert future.exception() is caught.value


@pytest.mark.parametrize("lock_mode", ["rwlock", "fine"])
def test_an_inline_read_never_waits_for_a_busy_l2_table(image: qcow2rw.Image, tmp_path: Path,
                                                        lock_mode: str) -> None:
    """The L2 table's lock held elsewhere (its write-back on eviction holds it across
    the write and a sync): the inline attempt gives up and the pool reads, so the
    submitting thread (an event loop, say) does not wait.  Before: submit_read waited
    for the holder (here 5 s)."""
    import time
    path = image.state.file.path
    image.close()
    with qcow2rw.open(path, lock_mode=lock_mode) as img:
        img.read(0, 16)
        entry = img.l2_cache.entries[img.state.l1.entries[0] & 0x00FFFFFFFFFFFE00]
        held, release = threading.Event(), threading.Event()

        def holder() -> None:
            with entry.lock:
                held.set()
                release.wait(5)

        thread = threading.Thread(target=holder)
        thread.start()
        try:
            assert held.wait(5)
            with img.aio(workers=1) as aio:
                start = time.monotonic()
                future = aio.submit_read(100, 100)
                took = time.monotonic() - start
                assert not future.completed_inline
                release.set()
                assert future.result(timeout=10) == b"\x01" * 100
            assert took < 2, f"submit_read waited {took:.1f} s for the table's lock"
        finally:
            release.set()
            thread.join()


def test_submit_write_on_a_metadata_only_open_with_a_data_file(tmp_path: Path) -> None:
    """An image with an external data file opened for metadata only has no data file
    object: the write's error (UnsupportedFeature) comes in the future.  Before: an
    AttributeError from submit_write itself."""
    path, data = tmp_path / "m.qcow2", tmp_path / "m.raw"
    qcow2rw.create(path, 4 * CS, data_file=str(data)).close()
    with qcow2rw.open(path, metadata_only=True) as img:
        with img.aio(workers=1) as aio:
            future = aio.submit_write(0, b"x" * 512)
            with pytest.raises(qcow2rw.UnsupportedFeature):
                future.result()
            with pytest.raises(qcow2rw.UnsupportedFeature):
                aio.submit_read(0, 512).result()
