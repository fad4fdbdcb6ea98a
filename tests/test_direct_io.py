"""cache="none": the image file (and a data file) opened with O_DIRECT (qcow2rw.directio).

Real files on a file system that takes O_DIRECT (tmp_path normally), no mocks:
round trips with unaligned requests against a shadow, checked by qemu-img and qemu-io
(also with ``-t none``); images QEMU wrote read back by us; the serialisation of
writes that pad (many threads writing distinct bytes of one aligned block); the write
tracker on its own; metadata I/O at a 4096 alignment with 512-byte clusters; the
write log (crash replay) and the other HostFile hooks unchanged.

``QCOW2RW_DIRECT_ALIGN`` raises the probed alignment (``/tmp`` here sits on a disk with
512-byte sectors, so the probe alone gives 512).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import qcow2rw
from qcow2rw import directio
from qcow2rw.directio import POOL, Claim, DirectIO, WriteTracker
from qcow2rw.storage import FaultInjector, HostFile

import crashreplay
from nbd_helpers import nbd_tools  # noqa: F401 (a fixture)
from helpers import (MiB, Shadow, apply_ops, assert_same_bytes, qemu_check_clean, qemu_io_run,
                     qemu_raw, random_ops, read_all)

pytestmark = pytest.mark.timeout(240)

CLUSTER_SIZES = [512, 4096, 65536, 2 * MiB]


def _supports_direct(directory: Path) -> bool:
    probe = directory / ".o_direct_probe"
    try:
        probe.write_bytes(bytes(4096))
        fd = os.open(probe, os.O_RDWR | os.O_DIRECT)
    except OSError:
        return False
    else:
        os.close(fd)
        return True
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


@pytest.fixture
def ddir(tmp_path: Path) -> Iterator[Path]:
    """A directory whose file system takes O_DIRECT: tmp_path, else another one."""
    if _supports_direct(tmp_path):
        yield tmp_path
        return
    for base in ("/var/tmp", "/tmp", "/dev/shm"):
        if os.path.isdir(base) and os.access(base, os.W_OK):
            path = Path(tempfile.mkdtemp(prefix="qcow2rw-direct-", dir=base))
            if _supports_direct(path):
                try:
                    yield path
                finally:
                    shutil.rmtree(path, ignore_errors=True)
                return
            shutil.rmtree(path, ignore_errors=True)
    pytest.skip("no file system here takes O_DIRECT (tried tmp_path, /var/tmp, /tmp, /dev/shm)")


@pytest.fixture(params=["probed", "4096"])
def align(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The alignment: as probed, or raised to 4096 by QCOW2RW_DIRECT_ALIGN."""
    if request.param == "4096":
        monkeypatch.setenv("QCOW2RW_DIRECT_ALIGN", "4096")
    else:
        monkeypatch.delenv("QCOW2RW_DIRECT_ALIGN", raising=False)
    return str(request.param)


def _qemu_io(qemu: Any, path: Path, *commands: str, cache: str = "none",
             fmt: str = "qcow2") -> Any:
    """``qemu-io -t CACHE -d unmap -f FMT -c ... PATH``, failing on any failed command."""
    return qemu_io_run(qemu, path, *commands, fmt=fmt, cache=cache)


# Round trips ---------------------------------------------------------------------------
@pytest.mark.interop
@pytest.mark.parametrize("cluster_size", CLUSTER_SIZES)
def test_round_trip_against_a_shadow_then_qemu(qemu: Any, ddir: Path, align: str,
                                               cluster_size: int) -> None:
    size = max(8 * MiB, 6 * cluster_size) + 3 * 512
    path = ddir / "rt.qcow2"
    rng = random.Random(cluster_size * 7 + len(align))
    shadow = Shadow(size, cluster_size)
    with qcow2rw.create(path, size, cluster_size=cluster_size, cache="none") as img:
        assert img.file.direct is not None
        want_align = 4096 if align == "4096" else img.file.direct.align
        assert img.file.direct.align == want_align and want_align in (512, 1024, 2048, 4096)
        # unaligned pieces, across cluster and block boundaries, and a few big ones
        for n in range(60):
            off = rng.randrange(size - 1)
            length = min(size - off, rng.choice([1, 7, 511, 513, 4095, 4097, 70000,
                                                 cluster_size + 3, 3 * MiB + 5]))
            data = rng.randbytes(length)
            img.write(off, data)
            shadow.write(off, data)
            if n % 17 == 0:
                img.flush()
        apply_ops(img, shadow, random_ops(rng, size, cluster_size, 60, max_len=3 * cluster_size),
                  "direct")
        # reads at unaligned places, into memoryviews and through read()
        for _ in range(40):
            off = rng.randrange(size)
            length = rng.randint(1, min(size - off, 3 * cluster_size + 1000))
            buf = bytearray(length + 3)
            img.readinto(off, memoryview(buf)[3:])
            assert_same_bytes(buf[3:], shadow.data[off:off + length], "readinto", base=off)
        assert_same_bytes(read_all(img), shadow.data, "whole disk", cluster_size=cluster_size)
        assert img.check().corruptions == 0
    qemu_check_clean(qemu, path, "after our direct writes")
    assert_same_bytes(qemu_raw(qemu, path, ddir), shadow.data, "qemu-img convert")
    raw = ddir / "shadow.raw"
    raw.write_bytes(shadow.data)
    proc = qemu.qemu_img("compare", "-T", "none", "-f", "qcow2", "-F", "raw", str(path),
                         str(raw), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # qemu-io -t none sees a pattern we wrote at an unaligned place
    with qcow2rw.open(path, cache="none") as img:
        img.write(size // 3 + 5, b"\x5a" * 3001)
    _qemu_io(qemu, path, f"read -P 0x5a {size // 3 + 5} 3001")


@pytest.mark.interop
@pytest.mark.parametrize("qemu_cache", ["none", "writeback"])
@pytest.mark.parametrize("cluster_size", [512, 65536])
def test_qemu_written_images_read_by_us(qemu: Any, ddir: Path, align: str, qemu_cache: str,
                                        cluster_size: int) -> None:
    size = 4 * MiB
    path = ddir / "q.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}",
                  str(path), str(size))
    shadow = Shadow(size, cluster_size)
    commands = []
    rng = random.Random(cluster_size)
    for n in range(24):
        off = rng.randrange(size - 80000)
        length = rng.choice([1, 100, 512, 4097, 65536 + 700, 70000])
        pattern = (n * 37 + 1) % 256
        commands.append(f"write -P {pattern} {off} {length}")
        shadow.write(off, bytes([pattern]) * length)
    commands.append(f"write -z {cluster_size * 3} {cluster_size * 2}")
    shadow.write_zeroes(cluster_size * 3, cluster_size * 2)
    _qemu_io(qemu, path, *commands, cache=qemu_cache)
    with qcow2rw.open(path, cache="none", readonly=True) as img:
        assert img.file.direct is not None
        assert_same_bytes(read_all(img), shadow.data, f"qemu-io -t {qemu_cache}")
    # and back: we write, qemu-io (-t none) reads
    with qcow2rw.open(path, cache="none") as img:
        img.write(1234567, b"\xc3" * 5555)
        img.write(7, b"\xc4" * 9)
    _qemu_io(qemu, path, "read -P 0xc3 1234567 5555", "read -P 0xc4 7 9")
    qemu_check_clean(qemu, path, "after our writes on QEMU's image")


@pytest.mark.interop
def test_external_data_file_is_direct_too(qemu: Any, ddir: Path, align: str) -> None:
    size = 2 * MiB + 512
    path, data = ddir / "d.qcow2", ddir / "d.raw"
    shadow = Shadow(size, 65536)
    with qcow2rw.create(path, size, data_file=str(data), cache="none") as img:
        assert img.file.direct is not None and img.state.datafile is not img.file
        assert img.state.datafile.direct is not None
        for off, length in [(0, 1), (100, 5000), (size - 700, 700), (65536 - 3, 7)]:
            payload = os.urandom(length)
            img.write(off, payload)
            shadow.write(off, payload)
        assert_same_bytes(read_all(img), shadow.data, "data file")
    qemu_check_clean(qemu, path, "data file")
    assert_same_bytes(qemu_raw(qemu, path, ddir), shadow.data, "qemu-img convert of the data file")


@pytest.mark.interop
def test_backing_chain_is_direct_too(qemu: Any, ddir: Path, align: str) -> None:
    """cache="none" holds for the whole chain, as QEMU's -t none: a raw backing file
    (its size not a multiple of the alignment) and a qcow2 one are opened O_DIRECT
    too, and every byte reads as qemu-img reads it."""
    raw, mid, top = ddir / "base.raw", ddir / "mid.qcow2", ddir / "top.qcow2"
    base_bytes = os.urandom(3 * MiB + 1000)
    raw.write_bytes(base_bytes)
    for image, below, fmt in ((mid, raw, "raw"), (top, mid, "qcow2")):
        qemu.run(qemu.QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", str(below), "-F", fmt,
                 str(image), str(4 * MiB), check=True)
    _qemu_io(qemu, mid, "write -P 0x4d 1M 100k", cache="writeback")
    _qemu_io(qemu, top, "write -P 0x70 2M 3000", cache="writeback")
    with qcow2rw.open(top, readonly=True, cache="none") as img:
        chain = [img.file]
        source = img.state.backing
        while source is not None:
            chain.append(source.file)
            source = getattr(getattr(source, "state", None), "backing", None)
        assert len(chain) == 3 and all(f.direct is not None for f in chain)
        for pid_file in (raw, mid, top):
            assert _opened_direct(os.getpid(), pid_file)
        expected = bytearray(base_bytes + bytes(4 * MiB - len(base_bytes)))
        expected[MiB:MiB + 100 * 1024] = b"\x4d" * (100 * 1024)
        expected[2 * MiB:2 * MiB + 3000] = b"\x70" * 3000
        assert_same_bytes(read_all(img), bytes(expected), "chain under cache=none")
    assert_same_bytes(qemu_raw(qemu, top, ddir), bytes(expected), "qemu-img's view")


# Serialisation -------------------------------------------------------------------------
def _race_round(write: Any, read: Any, block: int, pieces: list[tuple[int, int]],
                round_no: int) -> list[str]:
    """Every thread writes its own piece of one aligned block at once; what was lost."""
    barrier = threading.Barrier(len(pieces))
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        off, length = pieces[t]
        try:
            barrier.wait()
            write(block + off, bytes([(t * 7 + round_no) % 251 + 1]) * length)
        except BaseException as exc:  # pragma: no cover (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(len(pieces))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    got = read(block)
    lost = []
    for t, (off, length) in enumerate(pieces):
        if got[off:off + length] != bytes([(t * 7 + round_no) % 251 + 1]) * length:
            lost.append(f"round {round_no} thread {t} bytes [{off}, {off + length})")
    return lost


def _pieces(rng: random.Random, block: int, count: int) -> list[tuple[int, int]]:
    """*count* disjoint unaligned pieces inside one block of *block* bytes."""
    cuts = sorted(rng.sample(range(1, block), 2 * count - 1))
    bounds = [0] + cuts + [block]
    return [(bounds[2 * i], bounds[2 * i + 1] - bounds[2 * i]) for i in range(count)]


def test_unaligned_writes_into_one_block_from_many_threads(
        ddir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight threads, each writing its own bytes (pieces of < 512 bytes, unaligned) of
    one 4 KiB block at once, 150 rounds: every thread's bytes are there.  Without the
    write tracker's serialisation the read-modify-writes lose each other's bytes."""
    monkeypatch.setenv("QCOW2RW_DIRECT_ALIGN", "4096")  # (a 4 KiB block even where 512 would do)
    path = ddir / "race.raw"
    path.write_bytes(bytes(64 * 4096))
    file = HostFile(str(path), readonly=False, lock=False, direct=True)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        assert file.direct is not None and file.direct.align == 4096
        rng = random.Random(5)
        lost: list[str] = []
        for round_no in range(150):
            block = (round_no % 64) * 4096
            lost += _race_round(file.pwrite, lambda b: file.pread(b, 4096), block,
                                _pieces(rng, 4096, 8), round_no)
        assert not lost, f"{len(lost)} pieces lost, e.g. {lost[:5]}"
        assert file.direct.tracker.in_flight() == []
    finally:
        sys.setswitchinterval(old)
        file.close()


def test_unaligned_guest_writes_into_one_cluster_from_many_threads(
        ddir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same through the image: guest writes of distinct unaligned bytes of one
    allocated cluster (the fast path's write) from eight threads."""
    monkeypatch.setenv("QCOW2RW_DIRECT_ALIGN", "4096")
    path = ddir / "race.qcow2"
    old = sys.getswitchinterval()
    with qcow2rw.create(path, 4 * MiB, cluster_size=4096, cache="none") as img:
        img.write(0, bytes(64 * 4096))  # allocated: later writes take the fast path
        sys.setswitchinterval(1e-6)
        try:
            rng = random.Random(9)
            lost: list[str] = []
            for round_no in range(100):
                block = (round_no % 64) * 4096
                lost += _race_round(img.write, lambda b: img.read(b, 4096), block,
                                    _pieces(rng, 4096, 8), round_no)
            assert not lost, f"{len(lost)} pieces lost, e.g. {lost[:5]}"
        finally:
            sys.setswitchinterval(old)


def _start(target: Any) -> tuple[threading.Thread, threading.Event]:
    entered = threading.Event()

    def run() -> None:
        target()
        entered.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, entered


def test_tracker_orders_overlapping_writes_when_one_pads() -> None:
    tracker = WriteTracker()
    rmw = Claim(0, 4096, True)
    tracker.begin(rmw)
    # an aligned write overlapping the read-modify-write waits for it
    aligned = Claim(0, 8192, False)
    thread, entered = _start(lambda: tracker.begin(aligned))
    assert not entered.wait(0.3)
    # writes elsewhere do not wait, padding or not
    elsewhere = Claim(4096, 8192, True)
    tracker.begin(elsewhere)
    plain = Claim(1 << 20, (1 << 20) + 4096, False)
    tracker.begin(plain)
    assert not entered.is_set()
    tracker.end(rmw)
    assert not entered.wait(0.3)  # [4096, 8192) is still padded by `elsewhere`
    tracker.end(elsewhere)
    assert entered.wait(5)
    thread.join()
    # two aligned (plain) writes over the same blocks never wait for each other
    other = Claim(0, 4096, False)
    tracker.begin(other)
    # a padding write waits for an overlapping plain one
    padding = Claim(0, 4096, True)
    thread, entered = _start(lambda: tracker.begin(padding))
    assert not entered.wait(0.3)
    tracker.end(other)
    assert not entered.wait(0.3)  # `aligned` [0, 8192) is still in flight
    tracker.end(aligned)
    assert entered.wait(5)
    thread.join()
    for claim in (padding, plain):
        tracker.end(claim)
        tracker.end(claim)  # idempotent
    assert tracker.in_flight() == []


def test_tracker_queues_plain_writes_behind_a_waiting_padded_one() -> None:
    """A read-modify-write waiting for an aligned write is not starved by more aligned
    writes into its blocks: they queue behind it (QEMU's serialising requests)."""
    tracker = WriteTracker()
    first = Claim(0, 8192, False)
    tracker.begin(first)
    padded = Claim(0, 4096, True)
    rmw_thread, rmw_entered = _start(lambda: tracker.begin(padded))
    assert not rmw_entered.wait(0.2)  # (waits for `first`: queued meanwhile)
    later = Claim(0, 4096, False)  # aligned, overlapping the queued padded write
    later_thread, later_entered = _start(lambda: tracker.begin(later))
    assert not later_entered.wait(0.3)  # before the fix it went straight in
    elsewhere = Claim(8192, 12288, False)  # overlapping nothing queued: no wait
    tracker.begin(elsewhere)
    tracker.end(first)
    assert rmw_entered.wait(5)
    rmw_thread.join()
    assert not later_entered.wait(0.2)  # the padded write is in flight now
    tracker.end(padded)
    assert later_entered.wait(5)
    later_thread.join()
    for claim in (later, elsewhere):
        tracker.end(claim)
    assert tracker.in_flight() == [] and not getattr(tracker, "_queued", [])


def test_tracker_serialising_writes_wait_in_arrival_order() -> None:
    """A read-modify-write over two blocks, queued behind one over the first, is not
    passed for ever by later one-block read-modify-writes that overlap in time (they
    queue behind it: arrival order)."""
    tracker = WriteTracker()
    current = Claim(0, 4096, True)
    tracker.begin(current)
    wide = Claim(0, 8192, True)
    thread, entered = _start(lambda: tracker.begin(wide))
    assert not entered.wait(0.1)
    later: list[threading.Thread] = []
    for n in range(20):
        nxt = Claim(4096, 8192, True) if current.start == 0 else Claim(0, 4096, True)
        t, _ = _start(lambda c=nxt: tracker.begin(c))  # (arrives after `wide`)
        later.append(t)
        tracker.end(current)  # `wide` may go now, before `nxt`
        if entered.wait(1):
            break
        current = nxt  # (before the fix: `nxt` went in first, again and again)
    assert entered.is_set(), f"the earlier wide write was passed {n + 1} times"
    tracker.end(wide)
    for t in later:
        t.join(5)
    for claim in tracker.in_flight():
        tracker.end(claim)


def test_tracker_interrupt_while_leaving_the_queue_leaves_no_trace() -> None:
    """An interrupt at the step that takes a read-modify-write out of the queue (after
    its wait): the caller's end() clears it, and later writes of the block go on."""
    import inspect
    source, first_line = inspect.getsourcelines(WriteTracker.begin)
    target = first_line + next(i for i, line in enumerate(source)
                               if "self._unqueue(claim)" in line)
    tracker = WriteTracker()
    plain = Claim(0, 4096, False)
    tracker.begin(plain)
    padded = Claim(0, 4096, True)
    caught: list[BaseException] = []

    def rmw() -> None:
        fired: list[int] = []

        def tracer(frame: Any, event: str, arg: Any) -> Any:
            if frame.f_code is not WriteTracker.begin.__code__:
                return None

            def local(frame: Any, event: str, arg: Any) -> Any:
                if event == "line" and frame.f_lineno == target and not fired:
                    fired.append(1)
                    raise KeyboardInterrupt  # (as a signal delivered right there)
                return local
            return local

        sys.settrace(tracer)
        try:
            try:
                tracker.begin(padded)
            finally:
                sys.settrace(None)
                tracker.end(padded)
        except KeyboardInterrupt as exc:
            caught.append(exc)

    thread = threading.Thread(target=rmw)
    thread.start()
    time.sleep(0.2)  # `padded` is queued behind `plain`
    tracker.end(plain)  # its wait ends; the interrupt lands as it leaves the queue
    thread.join(5)
    assert caught and tracker.in_flight() == [] and tracker._queued == []
    later = Claim(0, 4096, False)
    thread, entered = _start(lambda: tracker.begin(later))
    assert entered.wait(3)
    thread.join()
    tracker.end(later)


def test_tracker_claim_given_back_when_the_wait_is_interrupted() -> None:
    """An exception raised in a waiting begin() (an interrupt) leaves nothing in flight."""
    tracker = WriteTracker()
    first = Claim(0, 4096, True)
    tracker.begin(first)
    second = Claim(0, 4096, True)
    caught: list[BaseException] = []

    class Stop(Exception):
        pass

    def waiter() -> None:
        try:
            try:
                tracker.begin(second)
            finally:
                tracker.end(second)
        except Stop as exc:
            caught.append(exc)

    # The waiter's wait is cut short by an exception raised in its thread.
    import ctypes
    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.2)
    assert thread.ident is not None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(Stop))
    thread.join(5)
    assert not thread.is_alive() and caught
    assert tracker.in_flight() == [first]
    tracker.end(first)
    assert tracker.in_flight() == []


# The storage seam ----------------------------------------------------------------------
def test_reads_and_writes_match_the_buffered_file(ddir: Path) -> None:
    """pread, pread_exact, preadv and writes of a direct HostFile against a buffered one
    on the same file: short at end of file the same way, zeros past it, big requests
    in chunks, writes past the end extend the file to the aligned end, truncation to
    any size works."""
    path = ddir / "seam.raw"
    rng = random.Random(3)
    content = bytearray(rng.randbytes(3 * MiB + 777))
    path.write_bytes(content)
    direct = HostFile(str(path), readonly=False, lock=False, direct=True)
    buffered = HostFile(str(path), readonly=True, lock=False)
    try:
        assert direct.direct is not None
        align = direct.direct.align
        size = len(content)
        for off, length in [(0, 1), (1, 4096), (size - 10, 100), (size, 10), (size + 5000, 3),
                            (12345, 2 * MiB + 3), (0, size + 100), (align - 1, 2)]:
            assert direct.pread(off, length) == buffered.pread(off, length), (off, length)
            assert direct.pread_exact(off, length) == buffered.pread_exact(off, length)
            a, b = bytearray(length), bytearray(length)
            va = memoryview(a)
            direct.preadv([va[:length // 3], va[length // 3:]], off)
            buffered.preadv([memoryview(b)], off)
            assert a == b, (off, length)
        for off, length in [(5, 3), (4096 * 3 - 1, 2), (777, 2 * MiB + 1234), (0, 4096)]:
            data = rng.randbytes(length)
            direct.pwritev([data[:length // 2], memoryview(data)[length // 2:]], off)
            content[off:off + length] = data
        assert buffered.pread(0, size) == bytes(content)
        # past the end: the file grows to the end of the aligned block
        direct.pwrite(size + 100, b"tail")
        end = size + 104
        assert direct.size() == (end + align - 1) // align * align
        assert direct.pread(size, 200) == bytes(100) + b"tail" + bytes(96)
        direct.truncate(end)  # (ftruncate: any size)
        assert direct.size() == end
        assert direct.pread(end - 4, 100) == b"tail"
        direct.truncate(1000)
        assert direct.pread(0, 5000) == buffered.pread(0, 5000) == bytes(content[:1000])
        direct.zero_range(100, 300)
        assert direct.pread(0, 1000) == bytes(content[:100]) + bytes(300) + bytes(content[400:1000])
        assert POOL.kept() <= sum(size * keep for size, keep in directio.SIZE_CLASSES)
    finally:
        direct.close()
        buffered.close()


def test_log_faults_and_hooks_see_the_callers_requests(ddir: Path) -> None:
    path = ddir / "hooks.raw"
    path.write_bytes(bytes(8192))
    file = HostFile(str(path), readonly=False, lock=False, direct=True)
    try:
        file.log = []
        ran: list[int] = []
        file.first_write = lambda: ran.append(1)
        file.pwrite(10, b"abc")
        file.pwritev([b"de", b"f"], 5000)
        file.flush()
        assert ran == [1]
        assert [e for e in file.log if e[0] == "write"] == [("write", 10, b"abc"),
                                                             ("write", 5000, b"def")]
        ends = [file.direct.span(10, 3)[1], file.direct.span(5000, 3)[1]]
        assert [e for e in file.log if e[0] == "extend"] == [("extend", end, b"") for end in ends]
        assert [e[0] for e in file.log if e[0] not in ("write", "extend")] == ["sync-start",
                                                                                 "sync"]
        assert not file.unsynced and file.synced == 1
        file.faults = FaultInjector("pwrite", 2)
        file.pwrite(0, b"x")
        with pytest.raises(OSError) as info:
            file.pwrite(1, b"y")
        assert info.value.errno == errno.EIO
        file.faults = FaultInjector("pread", 1)
        with pytest.raises(OSError):
            file.pread(0, 1)
        assert file.faults.calls["pread"] == 1 and file.faults.calls["pwrite"] == 0
        file.faults = None
        assert file.pread(0, 3) == b"x\x00\x00"
    finally:
        file.close()


def test_nowait_reads_refuse_direct_files(ddir: Path) -> None:
    with qcow2rw.create(ddir / "nw.qcow2", 1 * MiB, cluster_size=4096, cache="none") as img:
        img.write(0, b"\x11" * 8192)
        assert img.read(0, 4) == b"\x11" * 4  # (the L2 table is cached)
        buf = bytearray(512)
        assert not img.read_nowait(0, buf)
        with img.aio(workers=2) as aio:
            assert aio.submit_read(100, 1000).result() == b"\x11" * 1000
            aio.submit_write(4096 + 3, b"\x22" * 10).result()
        assert img.read(4096, 20) == b"\x11" * 3 + b"\x22" * 10 + b"\x11" * 7


def test_file_system_without_o_direct_is_refused_with_qemus_words(tmp_path: Path) -> None:
    """procfs files are regular files that refuse O_DIRECT (the open says EINVAL)."""
    name = "/proc/self/status"
    if not os.path.isfile(name):
        pytest.skip("no /proc here")
    with pytest.raises(qcow2rw.DirectIOUnsupported) as info:
        qcow2rw.open(name, readonly=True, cache="none")
    assert str(info.value) == f"Could not open '{name}': filesystem does not support O_DIRECT"
    assert isinstance(info.value, qcow2rw.Qcow2Error)
    with pytest.raises(ValueError):
        qcow2rw.open(tmp_path / "x.qcow2", cache="directsync")


def test_bad_forced_alignment_is_refused(ddir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = ddir / "bad.qcow2"
    qcow2rw.create(path, MiB).close()
    monkeypatch.setenv("QCOW2RW_DIRECT_ALIGN", "3000")
    with pytest.raises(ValueError, match="QCOW2RW_DIRECT_ALIGN"):
        qcow2rw.open(path, cache="none")
    monkeypatch.setenv("QCOW2RW_DIRECT_ALIGN", "8192")
    with qcow2rw.open(path, cache="none") as img:
        assert img.file.direct is not None and img.file.direct.align == 8192
        img.write(3, b"abc")
        assert img.read(0, 6) == b"\0\0\0abc"


def test_probe_alignment() -> None:
    """A 1-byte O_DIRECT read that works (an empty file: nothing to read) decides
    nothing: 4096, as QEMU."""
    with tempfile.NamedTemporaryFile(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        try:
            fd = os.open(tmp.name, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            pytest.skip("no O_DIRECT here")
        try:
            assert directio.probe_alignment(fd) == directio.DEFAULT_ALIGN
            assert DirectIO(fd, align=512).align == 512
        finally:
            os.close(fd)


# Metadata ------------------------------------------------------------------------------
@pytest.mark.interop
def test_metadata_io_at_4096_with_512_byte_clusters(qemu: Any, ddir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Header, L1 tables of odd sizes, L2 tables, refcount blocks and table growth,
    snapshots, resize both ways, discard and zeroes: all of it unaligned to 4096 with
    512-byte clusters, then qemu-img check is clean and the data is right."""
    monkeypatch.setenv("QCOW2RW_DIRECT_ALIGN", "4096")
    path = ddir / "meta.qcow2"
    size = 3 * MiB + 3 * 512  # an L1 table of an odd size
    rng = random.Random(11)
    shadow = Shadow(size, 512)
    with qcow2rw.create(path, size, cluster_size=512, refcount_bits=64, cache="none") as img:
        assert img.file.direct is not None and img.file.direct.align == 4096
        for i in range(300):  # many L2 tables and refcount blocks, the table grows
            off = rng.randrange(size - 3000)
            data = rng.randbytes(rng.randint(1, 3000))
            img.write(off, data)
            shadow.write(off, data)
        img.create_snapshot("one")
        apply_ops(img, shadow, random_ops(rng, size, 512, 80, max_len=20000), "meta")
        img.create_snapshot("two")
        snap_two = bytes(shadow.data)
        img.delete_snapshot("one")
        img.resize(size + 5 * MiB + 512)
        shadow = _grown(shadow, size + 5 * MiB + 512)
        img.write(size + 4 * MiB + 7, b"\x77" * 1000)
        shadow.write(size + 4 * MiB + 7, b"\x77" * 1000)
        img.discard(0, 64 * 1024)
        shadow.discard(0, 64 * 1024)
        img.write_zeroes(100000 + 3, 20000)
        shadow.write_zeroes(100000 + 3, 20000)
        assert img.check().corruptions == 0
        assert_same_bytes(read_all(img), shadow.data, "after metadata changes")
    qemu_check_clean(qemu, path, "metadata at 4096")
    assert_same_bytes(qemu_raw(qemu, path, ddir), shadow.data, "qemu-img convert")
    with qcow2rw.open(path, cache="none") as img:
        img.resize(2 * MiB + 512, shrink=True)
        shadow = _grown(shadow, 2 * MiB + 512)
        img.create_snapshot("three")
        img.apply_snapshot("two")
        assert_same_bytes(read_all(img), snap_two, "snapshot two")
        img.apply_snapshot("three")
        assert_same_bytes(read_all(img), shadow.data, "snapshot three")
        assert img.check().corruptions == 0
    qemu_check_clean(qemu, path, "after shrink and snapshots")
    assert_same_bytes(qemu_raw(qemu, path, ddir), shadow.data, "qemu-img convert after shrink")


def _grown(shadow: Shadow, new_size: int) -> Shadow:
    out = Shadow(new_size, shadow.cluster_size)
    keep = min(new_size, shadow.size)
    out.data[:keep] = shadow.data[:keep]
    return out


# Crash replay --------------------------------------------------------------------------
@pytest.mark.interop
@pytest.mark.parametrize("name", ["alloc", "partial", "snapshot"])
def test_write_log_is_the_same_as_buffered_and_replays(qemu: Any, ddir: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       name: str) -> None:
    """The write log of a one-thread workload under cache="none" (at 4096) is the very
    log of the buffered run (logical writes, not padded ones) plus the growth of the
    file to the end of each write's last aligned block ("extend"); replaying it all
    gives the file as it is; its crash states pass the oracle."""
    monkeypatch.setenv("QCOW2RW_DIRECT_ALIGN", "4096")
    (ddir / "b").mkdir()
    (ddir / "d").mkdir()
    buffered = crashreplay.record_workload(name, ddir / "b")
    direct = crashreplay.record_workload(name, ddir / "d", open_extra={"cache": "none"})
    logical = [entry for entry in direct.io if entry[0] != "extend"]
    assert len(logical) < len(direct.io)
    assert [(k, v, len(d)) for k, v, d in logical] == [(k, v, len(d)) for k, v, d in buffered.io]
    if name != "snapshot":  # (a snapshot's table entry holds the time it was taken)
        assert logical == buffered.io
    replayed = bytearray(direct.start_image)
    for entry in direct.io:
        crashreplay.apply_entry(replayed, entry)
    assert bytes(replayed) == (ddir / "d" / f"{name}.qcow2").read_bytes()
    summary = crashreplay.check_recording(direct, crashreplay.crash_states(direct, full=False),
                                          qemu="check", qemu_sample=4, workdir=ddir)
    assert not summary.failures, "\n".join(summary.failures[:10])
    assert summary.states >= 5, summary.line()


@pytest.mark.interop
def test_threaded_workload_replays_under_direct_io(qemu: Any, ddir: Path) -> None:
    rec = crashreplay.record_workload("concurrent", ddir, open_extra={"cache": "none"})
    summary = crashreplay.check_recording(rec, crashreplay.crash_states(rec, full=False),
                                          qemu="check", qemu_sample=4, workdir=ddir)
    assert not summary.failures, "\n".join(summary.failures[:10])


# The other front ends: serve --cache none|directsync, convert -t none|directsync ----------
def _opened_direct(pid: int, path: Path) -> bool:
    """Process *pid* has *path* open with O_DIRECT (/proc/PID/fdinfo's flags)."""
    target = os.path.realpath(path)
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != target:
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                flags = next(line for line in info if line.startswith("flags:"))
        except (OSError, StopIteration):
            continue
        if int(flags.split()[1], 8) & os.O_DIRECT:
            return True
    return False


@pytest.mark.interop
@pytest.mark.usefixtures("nbd_tools")
@pytest.mark.parametrize("cache, direct", [("none", True), ("directsync", True),
                                           ("writeback", False)])
def test_serve_cache_none_opens_the_image_o_direct(ddir: Path, cache: str,
                                                   direct: bool) -> None:
    """``qcow2rw serve --cache none`` (and directsync) serve the image O_DIRECT, as
    qemu-nbd does: nbdcopy writes through it, qemu-img reads back what it wrote."""
    from nbd_helpers import run, serve_process, unix_uri
    src = ddir / "src.raw"
    data = bytearray(os.urandom(6 * MiB))
    data[MiB:2 * MiB] = bytes(MiB)
    src.write_bytes(bytes(data))
    img = ddir / "dst.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-q", str(img), str(6 * MiB))
    sock = ddir / "s"
    with serve_process(img, sock, "--cache", cache) as proc:
        assert _opened_direct(proc.pid, img) is direct
        run("nbdcopy", "--flush", str(src), unix_uri(sock))
    run("qemu-img", "check", str(img))
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src), str(img))


@pytest.mark.interop
@pytest.mark.parametrize("cache", ["none", "directsync", "unsafe"])
def test_convert_t_none_writes_a_qcow2_target_o_direct(qemu: Any, ddir: Path, cache: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    convert_module = sys.modules["qcow2rw.convert"]
    made: list[Any] = []
    real_create = convert_module.create

    def spy(*args: Any, **kwargs: Any) -> Any:  # the real create, remembered
        made.append(real_create(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(convert_module, "create", spy)
    src = ddir / "src.qcow2"
    qemu.run(qemu.QEMU_IMG, "create", "-q", "-f", "qcow2", str(src), "8M", check=True)
    _qemu_io(qemu, src, "write -P 0x3c 100k 3M", "write -P 0x3d 6M 1000", cache="writeback")
    qcow2rw.convert(src, ddir / "dst.qcow2", cache=cache)
    assert made and (made[0].state.file.direct is not None) is (cache != "unsafe")
    qemu.run(qemu.QEMU_IMG, "check", str(ddir / "dst.qcow2"), check=True)
    qemu.run(qemu.QEMU_IMG, "compare", str(src), str(ddir / "dst.qcow2"), check=True)


@pytest.mark.interop
@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_convert_t_none_writes_a_raw_target_o_direct(qemu: Any, ddir: Path, cache: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A raw target under -t none: written O_DIRECT, its size exactly the source's even
    though its last block is partial (at a 4096 alignment), every byte as qemu-img's."""
    monkeypatch.setenv("QCOW2RW_DIRECT_ALIGN", "4096")
    convert_module = sys.modules["qcow2rw.convert"]
    opened: list[str] = []
    real_open_direct = convert_module.open_direct

    def spy(path: str, *args: Any) -> int:  # the real open_direct, remembered
        opened.append(path)
        return real_open_direct(path, *args)

    monkeypatch.setattr(convert_module, "open_direct", spy)
    size = 3 * MiB + 512
    src, dst = ddir / "src.qcow2", ddir / "dst.raw"
    qemu.run(qemu.QEMU_IMG, "create", "-q", "-f", "qcow2", str(src), str(size), check=True)
    _qemu_io(qemu, src, "write -P 0x21 100k 1M", f"write -P 0x22 {size - 1024} 1024",
             "write -P 0x23 7 1000", cache="writeback")
    qcow2rw.convert(src, dst, out_format="raw", cache=cache)
    assert opened == ([str(dst)] if cache == "none" else [])
    assert dst.stat().st_size == size
    assert_same_bytes(dst.read_bytes(), qemu_raw(qemu, src, ddir), "raw target")


@pytest.mark.interop
def test_convert_t_none_into_an_existing_raw_file_sizes_it_as_qemu_img(
        qemu: Any, ddir: Path) -> None:
    """-n -t none into a raw file of 4000 bytes from a 4000-byte source: the whole
    sectors written leave it 4096 bytes long, as qemu-img -t none (and any buffered
    convert) leave it."""
    src = ddir / "src.raw"
    src.write_bytes(os.urandom(4000))
    sizes = {}
    for tool in ("qemu-img", "qcow2rw"):
        dst = ddir / f"{tool}.raw"
        dst.write_bytes(bytes(4000))
        if tool == "qemu-img":
            qemu.run(qemu.QEMU_IMG, "convert", "-n", "-t", "none", "-f", "raw", "-O", "raw",
                     str(src), str(dst), check=True)
        else:
            qcow2rw.convert(src, dst, src_format="raw", out_format="raw", no_create=True,
                            cache="none")
        sizes[tool] = dst.stat().st_size
        assert dst.read_bytes()[:4000] == src.read_bytes()
    assert sizes["qcow2rw"] == sizes["qemu-img"] == 4096


def test_convert_t_none_leaks_no_descriptor_on_a_bad_alignment(
        ddir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = ddir / "src.raw"
    src.write_bytes(os.urandom(8192))
    monkeypatch.setenv("QCOW2RW_DIRECT_ALIGN", "3")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(ValueError, match="QCOW2RW_DIRECT_ALIGN"):
            qcow2rw.convert(src, ddir / "dst.raw", src_format="raw", out_format="raw",
                            cache="none")
    assert len(os.listdir("/proc/self/fd")) == before


def test_no_working_alignment_refuses_the_open(ddir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that opens O_DIRECT but takes no O_DIRECT read up to 4096 bytes: the open
    is refused with QEMU's words (DirectIOUnsupported), as QEMU's raw_probe_alignment
    refuses it.  Before: 4096 was assumed, and the first read failed with a bare
    EINVAL naming neither the file nor O_DIRECT."""
    import fcntl
    path = ddir / "noalign.qcow2"
    qcow2rw.create(path, MiB).close()
    real = os.preadv

    def refusing(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        # (a device of 8 KiB blocks, say: smaller or unaligned direct reads fail)
        if (fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
                and (offset % 8192 or sum(len(b) for b in buffers) % 8192)):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "preadv", refusing)
    with pytest.raises(qcow2rw.DirectIOUnsupported,
                       match="Could not find working O_DIRECT alignment") as caught:
        qcow2rw.open(path, cache="none")
    assert str(path) in str(caught.value)
    monkeypatch.setenv("QCOW2RW_DIRECT_ALIGN", "8192")  # (the alignment forced: it opens)
    with qcow2rw.open(path, cache="none", readonly=True) as img:
        assert img.read(0, 100) == bytes(100)


def test_a_bad_forced_alignment_is_one_cli_line(ddir: Path) -> None:
    """QCOW2RW_DIRECT_ALIGN=3000 is the user's mistake: one line, exit 1, no 'internal
    error' (BadSetting, a Qcow2Error and a ValueError)."""
    import subprocess
    path = ddir / "env.qcow2"
    qcow2rw.create(path, MiB).close()
    out = subprocess.run([sys.executable, "-m", "qcow2rw", "bench", "-t", "none", "-c", "1",
                          str(path)], capture_output=True, text=True,
                         env={**os.environ, "QCOW2RW_DIRECT_ALIGN": "3000"})
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "internal error" not in lines[0], lines
    assert lines[0].endswith(": QCOW2RW_DIRECT_ALIGN must be a power of two from 512 to "
                             "1048576, not '3000'"), lines
    assert issubclass(qcow2rw.BadSetting, (qcow2rw.Qcow2Error)) and \
        issubclass(qcow2rw.BadSetting, ValueError)
