"""Issue 15 §1: writes, zeroing and discards on images with extended L2 entries,
differentially against QEMU (a port of qemu-iotests 271's matrix).

Each scenario runs its qemu-io commands on a QEMU twin and the same operations through
our API on an identical image; then the contents are identical (``qemu-img compare``
with the twin and with the expected bytes), both ``qemu-img check``s are clean, and the
L2 entries agree cluster by cluster: the same kind of descriptor (none, normal,
compressed) and the same subcluster bitmap (host offsets may differ).
"""

from __future__ import annotations

import random
import struct
import sys
import threading
from array import array
from pathlib import Path
from typing import Any

import pytest

import qcow2rw
from qcow2rw.cancel import CancelToken, RequestCancelled
from qcow2rw.events import EventPoints

from helpers import qemu_check_clean, qemu_io_run, qemu_raw

CS = 65536
SC = CS // 32


def _scenarios() -> dict[str, list[str]]:
    c, s = CS, SC
    return {
        "write-sub-start": [f"write -P 1 0 {s}"],
        "write-sub-middle": [f"write -P 1 {s // 4} {s // 2}"],
        "write-sub-end": [f"write -P 1 {c - s // 2} {s // 2}"],
        "write-two-subs-unaligned": [f"write -P 1 {s // 2} {s}"],
        "write-across-clusters": [f"write -P 1 {c - s - 100} {2 * s + 200}"],
        "write-whole-cluster": [f"write -P 1 {c} {c}"],
        "write-many-clusters": [f"write -P 1 {s} {3 * c}"],
        "write-into-allocated": [f"write -P 1 {2 * s} {s}", f"write -P 2 {10 * s + 7} {3 * s}"],
        "write-over-allocated": [f"write -P 1 0 {c}", f"write -P 2 {s + 3} {s}"],
        "zero-aligned-unallocated": [f"write -z {2 * s} {4 * s}"],
        "zero-unaligned-unallocated": [f"write -z {s // 2} {s}"],
        "zero-whole-cluster": [f"write -z {c} {c}"],
        "zero-in-allocated": [f"write -P 1 0 {c}", f"write -z {s} {3 * s}"],
        "zero-unaligned-in-allocated": [f"write -P 1 0 {c}", f"write -z {s + 10} {s}"],
        "zero-partly-allocated": [f"write -P 1 {3 * s} {s}", f"write -z {2 * s} {4 * s}"],
        "zero-then-write": [f"write -z 0 {c}", f"write -P 3 {s + 5} 100"],
        "zero-across-clusters": [f"write -P 1 0 {2 * c}", f"write -z {c - 2 * s} {4 * s}"],
        "discard-allocated": [f"write -P 1 0 {c}", f"discard 0 {c}"],
        "discard-partly-allocated": [f"write -P 1 {5 * s} {s}", f"discard 0 {2 * c}"],
        "discard-unallocated": [f"discard {c} {c}"],
        "compressed": [f"write -c -P 7 {c} {c}"],
        "compressed-overwritten": [f"write -c -P 7 0 {c}", f"write -P 8 {s} {s}"],
        "compressed-zeroed-in-part": [f"write -c -P 7 0 {c}", f"write -z {s} {s}"],
        "compressed-zeroed-whole": [f"write -c -P 7 0 {c}", f"write -z 0 {c}"],
        "compressed-discarded": [f"write -c -P 7 0 {c}", f"discard 0 {c}"],
        "subclusters-then-cluster": [f"write -P 1 {s} {s}", f"write -P 2 {5 * s} {s}",
                                     f"write -P 3 0 {c}"],
        # copy-on-write of a cluster shared with a snapshot keeps its zero bits
        "snapshot-cow-keeps-zero-bits": [f"write -P 1 0 {c}", f"write -z {4 * s} {2 * s}",
                                         "SNAPSHOT s1", f"write -P 2 {10 * s + 1} {s}"],
        "snapshot-cow-partial": [f"write -P 1 {3 * s} {2 * s}", "SNAPSHOT s1",
                                 f"write -P 2 {s // 2} {s}", f"discard {c} {c}"],
        "snapshot-zero-shared": [f"write -P 1 0 {2 * c}", "SNAPSHOT s1", f"write -z 0 {c}",
                                 f"write -P 2 {s} 512"],
    }


def _l2(path: Path) -> list[tuple[int, int]]:
    """(descriptor kind: 0 none, 1 normal, 2 compressed; bitmap) per cluster."""
    data = path.read_bytes()
    l1_offset = struct.unpack_from(">Q", data, 40)[0]
    l1_size = struct.unpack_from(">I", data, 36)[0]
    out = []
    for i in range(l1_size):
        l2 = struct.unpack_from(">Q", data, l1_offset + 8 * i)[0] & 0x00FFFFFFFFFFFE00
        for k in range(CS // 16):
            if not l2:
                out.append((0, 0))
                continue
            d, b = struct.unpack_from(">QQ", data, l2 + 16 * k)
            kind = 2 if d & (1 << 62) else 1 if d & 0x00FFFFFFFFFFFE00 else 0
            out.append((kind, b))
    return out


def _ours(img: qcow2rw.Image, command: str) -> None:
    words = command.split()
    offset, length = int(words[-2]), int(words[-1])
    if words[0] == "discard":
        img.discard(offset, length)
    elif "-z" in words:
        img.write_zeroes(offset, length)
    elif "-c" in words:
        img.write_compressed(offset, bytes([int(words[words.index("-P") + 1])]) * length)
    else:
        img.write(offset, bytes([int(words[words.index("-P") + 1])]) * length)


def _pair(qemu, d: Path, backing: str | None, size: int = 4 * CS) -> tuple[Path, Path]:
    opts = ["-o", f"extended_l2=on,cluster_size={CS}"]
    if backing is not None:
        base = d / f"base.{backing}"
        qemu.qemu_img("create", "-q", "-f", backing, str(base), str(size))
        qemu_io_run(qemu, base, f"write -P 0xbb 0 {size}", f"write -z {2 * CS} {SC * 3}",
                    fmt=backing)
        opts += ["-b", base.name, "-F", backing]
    theirs, ours = d / "theirs.qcow2", d / "ours.qcow2"
    for path in (theirs, ours):
        qemu.run(qemu.QEMU_IMG, "create", "-q", "-f", "qcow2", *opts, str(path), str(size))
    return theirs, ours


@pytest.mark.parametrize("backing", [None, "raw", "qcow2"])
@pytest.mark.parametrize("name", sorted(_scenarios()))
def test_like_qemu(qemu, tmp_path: Path, monkeypatch, name: str, backing: str | None) -> None:
    monkeypatch.chdir(tmp_path)
    commands = _scenarios()[name]
    theirs, ours = _pair(qemu, tmp_path, backing)
    for command in commands:
        if command.startswith("SNAPSHOT "):
            qemu.qemu_img("snapshot", "-c", command.split()[1], str(theirs))
            with qcow2rw.open(ours) as img:
                img.create_snapshot(command.split()[1])
            continue
        qemu_io_run(qemu, theirs, command)
        with qcow2rw.open(ours) as img:
            _ours(img, command)
    qemu_check_clean(qemu, ours, name)
    assert qemu_raw(qemu, ours, tmp_path) == qemu_raw(qemu, theirs, tmp_path), name
    assert _l2(ours) == _l2(theirs), name


def test_random_sequences_like_qemu(qemu, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    rng = random.Random(271)
    for round_ in range(6):
        theirs, ours = _pair(qemu, tmp_path, ("raw", None, "qcow2")[round_ % 3], 6 * CS)
        commands = []
        for _ in range(12):
            op = rng.choice(("write", "write", "zero", "discard", "compressed"))
            offset = rng.randrange(0, 6 * CS - 1) // 512 * 512
            length = min(6 * CS - offset, rng.choice((512, SC, 3 * SC, CS, 2 * CS + SC)))
            if op == "write":
                commands.append(f"write -P {rng.randrange(1, 255)} {offset} {length}")
            elif op == "zero":
                commands.append(f"write -z {offset} {length}")
            elif op == "discard":
                commands.append(f"discard {offset // CS * CS} {CS}")
            else:
                cluster = rng.randrange(6)
                kinds = _l2(ours)
                if kinds[cluster][0] == 0:  # (only onto clusters without a host offset)
                    commands.append(f"write -c -P {rng.randrange(1, 255)} {cluster * CS} {CS}")
                    qemu_io_run(qemu, theirs, commands[-1])
                    with qcow2rw.open(ours) as img:
                        _ours(img, commands[-1])
                    continue
                continue
            qemu_io_run(qemu, theirs, commands[-1])
            with qcow2rw.open(ours) as img:
                _ours(img, commands[-1])
        qemu_check_clean(qemu, ours, str(commands))
        assert qemu_raw(qemu, ours, tmp_path) == qemu_raw(qemu, theirs, tmp_path), commands
        assert _l2(ours) == _l2(theirs), commands


def test_three_writers_three_subclusters_one_host_cluster(qemu, tmp_path: Path) -> None:
    """271's concurrent case: three writes into three subclusters of one unallocated
    cluster, the first stopped after its data write: one host cluster, refcount 1,
    all three present."""
    path = tmp_path / "a.qcow2"
    img = qcow2rw.create(path, 4 * CS, cluster_size=CS, extended_l2=True)
    events = img.events = EventPoints()
    events.set_break("l2_update")
    threads = []
    errors: list[BaseException] = []

    def write(offset: int, byte: int) -> None:
        try:
            img.write(offset, bytes([byte]) * SC)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads.append(threading.Thread(target=write, args=(CS + 2 * SC, 1)))
    threads[0].start()
    assert events.wait_break("l2_update")
    for n, sub in ((2, 7), (3, 20)):
        threads.append(threading.Thread(target=write, args=(CS + sub * SC, n)))
        threads[-1].start()
    threads[1].join(0.3)
    assert threads[1].is_alive()  # waits for the allocation in flight
    events.resume("l2_update")
    for t in threads:
        t.join(10)
    img.events = None
    assert not errors, errors
    entries = _l2_live(img)
    assert sum(1 for d, _ in entries if d) == 1
    assert entries[1][1] == (1 << 2) | (1 << 7) | (1 << 20)
    data = img.read(CS, CS)
    assert data[2 * SC:3 * SC] == b"\x01" * SC and data[7 * SC:8 * SC] == b"\x02" * SC
    assert data[20 * SC:21 * SC] == b"\x03" * SC
    img.close()
    qemu_check_clean(qemu, path)


def _l2_live(img: qcow2rw.Image) -> list[tuple[int, int]]:
    img.flush()
    state = img.state
    table = state.l2_cache.copy_of(state.l2_offset(0))
    return [(table[k], table.bitmaps[k]) for k in range(4)]


def test_create_extended_like_qemu_img(qemu, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    import subprocess
    for opts in ("extended_l2=on", "extended_l2=on,cluster_size=16k",
                 "extended_l2=on,cluster_size=8k", "extended_l2=on,compat=0.10"):
        ours = subprocess.run([sys.executable, "-m", "qcow2rw", "create", "-f", "qcow2", "-o", opts,
                               "o.qcow2", "1M"], capture_output=True, text=True)
        theirs = subprocess.run([qemu.QEMU_IMG, "create", "-f", "qcow2", "-o", opts, "t.qcow2",
                                 "1M"], capture_output=True, text=True)
        assert ours.returncode == theirs.returncode, (opts, ours.stderr)
        assert ours.stdout.replace("o.qcow2", "t.qcow2") == theirs.stdout
        assert ours.stderr.replace("qcow2rw:", "qemu-img:").replace("o.qcow2", "t.qcow2") == \
            theirs.stderr
        if not ours.returncode:
            assert Path("o.qcow2").read_bytes() == Path("t.qcow2").read_bytes()


@pytest.mark.parametrize("backing", [None, "raw"])
def test_metadata_preallocation_and_resize_like_qemu(qemu, tmp_path: Path, monkeypatch,
                                                     backing: str | None) -> None:
    """preallocation=metadata (allowed with a backing file when extended_l2 is on):
    preallocated clusters have no subcluster allocated, so the backing file shows
    through until written; then a grow and a shrink."""
    monkeypatch.chdir(tmp_path)
    size = 4 * CS
    opts = f"extended_l2=on,cluster_size={CS},preallocation=metadata"
    extra = []
    if backing:
        qemu.qemu_img("create", "-q", "-f", "raw", "base.raw", str(size))
        qemu_io_run(qemu, "base.raw", f"write -P 0xbb 0 {size}", fmt="raw")
        extra = ["-b", "base.raw", "-F", "raw"]
    import subprocess
    for name, tool in (("theirs.qcow2", [qemu.QEMU_IMG]),
                       ("ours.qcow2", [sys.executable, "-m", "qcow2rw"])):
        proc = subprocess.run([*tool, "create", "-q", "-f", "qcow2", "-o", opts, *extra, name,
                               str(size)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    assert _l2(Path("ours.qcow2")) == _l2(Path("theirs.qcow2"))
    commands = [f"write -P 1 {SC + 7} {SC}", f"write -z {2 * CS} {CS}"]
    qemu_io_run(qemu, "theirs.qcow2", *commands)
    with qcow2rw.open("ours.qcow2") as img:
        for command in commands:
            _ours(img, command)
    qemu.qemu_img("resize", "-q", "theirs.qcow2", str(6 * CS))
    qemu.qemu_img("resize", "-q", "--shrink", "theirs.qcow2", str(3 * CS))
    with qcow2rw.open("ours.qcow2") as img:
        img.resize(6 * CS)
        img.resize(3 * CS, shrink=True)
    qemu_check_clean(qemu, Path("ours.qcow2"))
    assert qemu_raw(qemu, "ours.qcow2", tmp_path) == qemu_raw(qemu, "theirs.qcow2", tmp_path)
    assert _l2(Path("ours.qcow2"))[:3] == _l2(Path("theirs.qcow2"))[:3]


def test_threads_sharing_clusters_by_subcluster(qemu, tmp_path: Path) -> None:
    """Four threads write and zero their own subclusters (index % 4) of the same
    clusters, over a backing file, with a tiny switch interval: every cluster's
    bitmap, its host cluster and its data must come out as a shadow model says."""
    size = 8 * CS
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(range(256)) * (size // 256))
    path = tmp_path / "a.qcow2"
    img = qcow2rw.create(path, size, cluster_size=CS, extended_l2=True,
                         backing_file=str(base), backing_format="raw")
    shadow = bytearray(base.read_bytes())
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        rng = random.Random(t)
        try:
            for _ in range(150):
                sub = rng.randrange(size // SC // 4) * 4 + t
                start = sub * SC + rng.randrange(SC // 512) * 512
                length = rng.randrange(1, (sub + 1) * SC - start + 1)
                if rng.random() < 0.25:
                    start, length = sub * SC, SC
                    img.write_zeroes(start, length)
                    data = bytes(length)
                else:
                    data = rng.randbytes(length)
                    img.write(start, data)
                with lock:
                    shadow[start:start + length] = data
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[:3]
    assert img.read(0, size) == shadow
    img.close()
    qemu_check_clean(qemu, path)
    assert qemu_raw(qemu, path, tmp_path) == shadow


# --------------------------------------------------------------------------- review findings
def _run_into(errors: list[BaseException], fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


def test_cancelled_write_leaves_a_keep_step_old_or_new(tmp_path: Path) -> None:
    """DESIGN §5 on a keep step (data written in place, bits set by the link): a token
    cancelled between its data write and its link must not leave the cluster half new
    (the check there was skipped for keep steps: the write completes instead)."""
    img = qcow2rw.create(tmp_path / "a.qcow2", 4 * CS, cluster_size=CS, extended_l2=True)
    img.write(0, b"A" * SC)  # subcluster 0 allocated, 1 not
    old = img.read(0, 2 * SC)
    events = img.events = EventPoints()
    events.set_break("write_aio")
    token = CancelToken()
    errors: list[BaseException] = []
    t = threading.Thread(target=_run_into, args=(errors, lambda: img.write(
        0, b"B" * (2 * SC), cancel=token)))
    t.start()
    assert events.wait_break("write_aio")
    token.cancel()
    events.resume("write_aio")
    t.join(10)
    img.events = None
    assert all(isinstance(e, RequestCancelled) for e in errors), errors
    assert img.read(0, 2 * SC) in (old, b"B" * (2 * SC))
    img.close()


def test_partial_zeroing_never_wipes_a_write_that_linked_meanwhile(tmp_path: Path) -> None:
    """B writes [200, 300) into an unallocated cluster and stops before its link; A
    zeroes [0, 100) of the same subcluster: it found the subcluster unallocated, waits
    for B, and must look again under the lock (QEMU does) instead of setting the zero
    bit over B's returned write."""
    img = qcow2rw.create(tmp_path / "c.qcow2", 4 * CS, cluster_size=CS, extended_l2=True)
    events = img.events = EventPoints()
    events.set_break("l2_update")
    errors: list[BaseException] = []
    b = threading.Thread(target=_run_into, args=(errors, img.write, 200, b"X" * 100))
    b.start()
    assert events.wait_break("l2_update")
    a = threading.Thread(target=_run_into, args=(errors, img.write_zeroes, 0, 100))
    a.start()
    a.join(0.5)
    assert a.is_alive()  # waits for B's allocation in flight
    events.resume("l2_update")
    for t in (a, b):
        t.join(10)
    img.events = None
    assert not errors, errors
    assert img.read(0, 300) == bytes(200) + b"X" * 100
    img.close()


class _Interrupt(BaseException):
    pass


class _FailingBitmaps(array):
    """Bitmaps whose first store raises, as a signal handler's exception would."""

    armed = True

    def __setitem__(self, index: Any, value: Any) -> None:
        if _FailingBitmaps.armed:
            _FailingBitmaps.armed = False
            raise _Interrupt("signal handler")
        super().__setitem__(index, value)


def test_link_interrupted_between_descriptor_and_bitmap(qemu, tmp_path: Path) -> None:
    """An interrupt after _link stored the descriptor and before the bitmap: abandon
    keeps the link and must store the bitmap too (a compressed descriptor over an
    ALL_ZEROES bitmap would otherwise be corrupt)."""
    path = tmp_path / "a.qcow2"
    img = qcow2rw.create(path, 4 * CS, cluster_size=CS, extended_l2=True)
    img.write(0, b"A" * CS)
    img.discard(0, CS)  # entry 0: no descriptor, ALL_ZEROES
    (entry_obj,) = list(img.l2_cache.entries.values())
    entry_obj.table.bitmaps = _FailingBitmaps("Q", entry_obj.table.bitmaps)
    with pytest.raises(_Interrupt):
        img.write_compressed(0, b"C" * CS)
    entry_obj.table.bitmaps = array("Q", entry_obj.table.bitmaps)
    img.close()
    qemu_check_clean(qemu, path)
