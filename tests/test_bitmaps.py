"""Issue 15 §3: persistent dirty bitmaps are kept valid, and never lost silently.

A read-write open that writes nothing leaves them as they are.  Enabled bitmaps are
kept up to date as QEMU keeps them: the same writes, discards and zeroings through
qemu-io and through our API give the same dirty map (``qemu-nbd -B`` and ``nbdinfo
--map=qemu:dirty-bitmap:NAME``); they are flagged in use before the first write
(synced before anything else reaches the file) and stored at close; a crash leaves
them "in-use", never wrong.  What we cannot follow (a resize, bitmaps we do not
understand) makes them inconsistent the way a program without bitmap support does:
the autoclear bit cleared first; then both checks report the same leaks and ``check -r
all`` reclaims exactly what ``qemu-img check -r all`` would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import qcow2rw
from qcow2rw.format import AUTOCLEAR_BITMAPS, OFF_AUTOCLEAR

from helpers import qemu_check_clean, read_header


@pytest.fixture
def bitmap_image(qemu, tmp_path: Path) -> Path:
    path = tmp_path / "bm.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", str(path), "16M")
    qemu.qemu_io(str(path), "write -P 1 0 1M")
    qemu.qemu_img("bitmap", "--add", str(path), "b0")
    qemu.qemu_img("bitmap", "--add", "-g", "128k", "--disable", str(path), "b1")
    return path


def _bitmap_names(qemu, path: Path) -> list[str]:
    info = qemu.info(str(path))
    return [b["name"] for b in info["format-specific"]["data"].get("bitmaps", [])]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qcow2rw", *args], capture_output=True,
                          text=True, timeout=120)


def test_open_read_write_without_writing_keeps_the_bitmaps(qemu, bitmap_image: Path) -> None:
    with qcow2rw.open(bitmap_image) as img:
        assert img.read(0, 4096) == b"\x01" * 4096
        img.flush()
    assert read_header(bitmap_image)["autoclear_features"] & AUTOCLEAR_BITMAPS
    assert _bitmap_names(qemu, bitmap_image) == ["b0", "b1"]
    qemu_check_clean(qemu, bitmap_image)
    proc = _cli("info", str(bitmap_image))
    assert proc.returncode == 0 and "warning" not in proc.stderr and "name: b1" in proc.stdout


def _dirty_map(path: Path, name: str) -> str:
    """``nbdinfo --map`` of bitmap *name*, exported by qemu-nbd -B."""
    sock = path.parent / f"{path.stem}.sock"
    proc = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-B", name, "-k", str(sock),
                             str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.02)
        out = subprocess.run(["nbdinfo", f"--map=qemu:dirty-bitmap:{name}",
                              f"nbd+unix:///?socket={sock}"], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout
    finally:
        proc.terminate()
        proc.wait(10)


OPERATIONS = ("write 0 4096", "write 655360 71680", "zero 10485760 65536",
              "discard 14680064 131072", "write 1048577 10")


def _ours(img: qcow2rw.Image, op: str) -> None:
    kind, offset, length = op.split()
    if kind == "write":
        img.write(int(offset), b"\x02" * int(length))
    elif kind == "zero":
        img.write_zeroes(int(offset), int(length))
    else:
        img.discard(int(offset), int(length))


def _qemu_commands(op: str) -> str:
    kind, offset, length = op.split()
    return {"write": f"write -P 2 {offset} {length}", "zero": f"write -z {offset} {length}",
            "discard": f"discard {offset} {length}"}[kind]


def test_enabled_bitmaps_are_kept_like_qemu_keeps_them(qemu, bitmap_image: Path,
                                                       tmp_path: Path) -> None:
    twin = tmp_path / "twin.qcow2"
    shutil.copyfile(bitmap_image, twin)
    from helpers import qemu_io_run
    qemu_io_run(qemu, twin, *(_qemu_commands(op) for op in OPERATIONS))
    with qcow2rw.open(bitmap_image) as img:
        for op in OPERATIONS:
            _ours(img, op)
    assert read_header(bitmap_image)["autoclear_features"] & AUTOCLEAR_BITMAPS
    info = qemu.info(str(bitmap_image))["format-specific"]["data"]["bitmaps"]
    assert [(b["name"], b["flags"]) for b in info] == [("b0", ["auto"]), ("b1", [])]
    qemu_check_clean(qemu, bitmap_image)
    for name in ("b0", "b1"):  # b1 is disabled: untouched by both
        assert _dirty_map(bitmap_image, name) == _dirty_map(twin, name)
    assert "dirty" in _dirty_map(bitmap_image, "b0")
    proc = _cli("info", str(bitmap_image))
    assert proc.returncode == 0 and "warning" not in proc.stderr


def test_snapshots_keep_them_and_apply_dirties_everything(qemu, bitmap_image: Path) -> None:
    with qcow2rw.open(bitmap_image) as img:
        img.create_snapshot("s1")
        img.write(0, b"x")
        img.apply_snapshot("s1")
        img.delete_snapshot("s1")
    qemu_check_clean(qemu, bitmap_image)
    dirty = _dirty_map(bitmap_image, "b0").split("\n")[0].split()
    assert dirty[:2] == ["0", str(16 << 20)] and dirty[-1] == "dirty"


def test_a_crash_leaves_them_in_use_never_wrong(qemu, bitmap_image: Path) -> None:
    code = ("import os, signal, sys, qcow2rw; img = qcow2rw.open(sys.argv[1]); "
            "img.write(0, b'x' * 4096); img.flush(); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code, str(bitmap_image)], timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(Path(qcow2rw.__file__).parents[1])))
    assert proc.returncode == -signal.SIGKILL
    info = qemu.info(str(bitmap_image))["format-specific"]["data"]["bitmaps"]
    assert info[0]["flags"] == ["in-use", "auto"] and info[1]["flags"] == []
    qemu_check_clean(qemu, bitmap_image)
    with qcow2rw.open(bitmap_image) as img:  # an in-use bitmap is left as it is
        img.write(0, b"y")
    info = qemu.info(str(bitmap_image))["format-specific"]["data"]["bitmaps"]
    assert info[0]["flags"] == ["in-use", "auto"]


def _unsupported(path: Path) -> None:
    """Give bitmap b0 a flag we do not know (bit 3): we cannot keep it."""
    data = bytearray(path.read_bytes())
    hdr_len = int.from_bytes(data[100:104], "big")
    pos = hdr_len
    while True:
        magic, length = int.from_bytes(data[pos:pos + 4], "big"), int.from_bytes(data[pos + 4:pos + 8], "big")
        if magic == 0x23852875:
            directory = int.from_bytes(data[pos + 24:pos + 32], "big")
            break
        pos += 8 + (length + 7) // 8 * 8
    flags = int.from_bytes(data[directory + 12:directory + 16], "big")
    data[directory + 12:directory + 16] = (flags | 1 << 3).to_bytes(4, "big")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["resize", "unsupported-flag", "downgrade"])
def test_what_we_cannot_follow_marks_them_inconsistent_and_check_reclaims_alike(
        qemu, bitmap_image: Path, tmp_path: Path, how: str) -> None:
    if how == "unsupported-flag":
        _unsupported(bitmap_image)
    with qcow2rw.open(bitmap_image) as img:
        if how == "resize":
            img.resize(32 << 20)
        elif how == "downgrade":
            img.amend(compat="0.10")
        else:
            img.write(0, b"x")
    assert not read_header(bitmap_image).get("autoclear_features", 0) & AUTOCLEAR_BITMAPS
    assert _bitmap_names(qemu, bitmap_image) == []
    twin = tmp_path / "twin.qcow2"
    shutil.copyfile(bitmap_image, twin)
    ours = _cli("check", "--output=json", str(bitmap_image))
    rc, theirs = qemu.check(str(bitmap_image))
    assert ours.returncode == rc == 3
    assert json.loads(ours.stdout) == {k: v for k, v in theirs.items() if not k.startswith("_")}
    proc = _cli("check", "-r", "all", str(bitmap_image))
    assert proc.returncode == 0, proc.stderr
    qemu.qemu_img("check", "-r", "all", str(twin), check=False)
    qemu_check_clean(qemu, bitmap_image)
    assert qemu.check(str(bitmap_image))[1].get("allocated-clusters") == \
        qemu.check(str(twin))[1].get("allocated-clusters")


def test_the_first_write_hook_reaches_the_disk_before_any_other_write(bitmap_image: Path) -> None:
    """Eight threads write at once into a fresh open: the file's write log starts with
    the hook's writes (the in-use flags in the bitmap directory; the autoclear field
    too when an unknown bit is set), then a completed sync, then the rest (a crash in
    between must never leave bitmaps QEMU would trust over changed data)."""
    data = bytearray(bitmap_image.read_bytes())
    data[OFF_AUTOCLEAR:OFF_AUTOCLEAR + 8] = (AUTOCLEAR_BITMAPS | 1 << 5).to_bytes(8, "big")
    bitmap_image.write_bytes(bytes(data))
    img = qcow2rw.open(bitmap_image)
    directory = img.state.bitmaps.directory_offset
    log: list[tuple[str, int, bytes]] = []
    img.state.file.log = log
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            barrier.wait(10)
            img.write(n * 65536 + 512, bytes([n + 1]) * 512)  # allocated: the fast path
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        sys.setswitchinterval(old)
    img.state.file.log = None
    img.close()
    assert not errors, errors
    writes = [(kind, value) for kind, value, _ in log if kind in ("write", "sync")]
    first_sync = writes.index(next(w for w in writes if w[0] == "sync"))
    hook = writes[:first_sync]
    assert ("write", OFF_AUTOCLEAR) in hook, writes[:5]
    assert any(directory <= value < directory + 65536 for _, value in hook), writes[:5]
    assert all(value == OFF_AUTOCLEAR or directory <= value < directory + 65536
               for _, value in hook), writes[:5]
    assert read_header(bitmap_image)["autoclear_features"] == AUTOCLEAR_BITMAPS


@pytest.mark.parametrize("bits", [AUTOCLEAR_BITMAPS, 1 << 5])
def test_a_header_only_amend_does_not_write_the_bits_back(qemu, tmp_path: Path, bits: int) -> None:
    """amend serializes the in-memory header; when that write is the open's first, the
    hook must run before the copy is made, not during the write (an unknown bit came
    back)."""
    path = tmp_path / "a.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", str(path), "1M")
    if bits == AUTOCLEAR_BITMAPS:
        qemu.qemu_img("bitmap", "--add", str(path), "b0")
    else:  # an unknown autoclear bit: qemu-img amend clears it too
        with open(path, "r+b") as f:
            f.seek(OFF_AUTOCLEAR)
            f.write(bits.to_bytes(8, "big"))
    with qcow2rw.open(path) as img:
        img.amend(lazy_refcounts=True)
    # the bitmaps bit stays (the bitmap is kept valid, as qemu-img amend keeps it);
    # an unknown bit goes
    assert read_header(path)["autoclear_features"] == (bits & AUTOCLEAR_BITMAPS)
    qemu_check_clean(qemu, path)
