"""Issue 15 §3: persistent dirty bitmaps are never lost silently.

qcow2rw does not maintain bitmaps.  A read-write open that writes nothing must leave
them valid (``qemu-img info`` lists them, ``check`` is clean); the first write clears
the autoclear bit first (synced before anything else reaches the file), so QEMU knows
the bitmaps are stale; then both checks report the same leaked clusters and
``qcow2rw check -r all`` reclaims exactly what ``qemu-img check -r all`` would.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
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


@pytest.mark.parametrize("how", ["write", "discard", "write_zeroes", "snapshot", "resize"])
def test_the_first_write_marks_them_inconsistent_and_check_reclaims_alike(
        qemu, bitmap_image: Path, tmp_path: Path, how: str) -> None:
    with qcow2rw.open(bitmap_image) as img:
        if how == "write":
            img.write(0, b"x")
        elif how == "discard":
            img.discard(0, 65536)
        elif how == "write_zeroes":
            img.write_zeroes(0, 65536)
        elif how == "snapshot":
            img.create_snapshot("s")
        else:
            img.resize(32 << 20)
    assert not read_header(bitmap_image)["autoclear_features"] & AUTOCLEAR_BITMAPS
    assert _bitmap_names(qemu, bitmap_image) == []
    # both tools see the same leaks (the bitmaps' clusters) and say the same warning
    twin = tmp_path / "twin.qcow2"
    shutil.copyfile(bitmap_image, twin)
    ours = _cli("check", "--output=json", str(bitmap_image))
    rc, theirs = qemu.check(str(bitmap_image))
    assert ours.returncode == rc == 3
    import json
    assert json.loads(ours.stdout) == {k: v for k, v in theirs.items() if not k.startswith("_")}
    assert "a program lacking bitmap support modified this file" in ours.stderr
    proc = _cli("check", "-r", "all", str(bitmap_image))
    assert proc.returncode == 0, proc.stderr
    qemu.qemu_img("check", "-r", "all", str(twin), check=False)
    qemu_check_clean(qemu, bitmap_image)
    assert qemu.info(str(bitmap_image))["actual-size"] >= 0
    assert qemu.check(str(bitmap_image))[1].get("allocated-clusters") == \
        qemu.check(str(twin))[1].get("allocated-clusters")


def test_the_autoclear_bit_reaches_the_disk_before_any_other_write(bitmap_image: Path) -> None:
    """Eight threads write at once into a fresh open: the log of the file's writes
    starts with the header's autoclear field, then a completed sync, then the rest
    (a crash in between leaves bitmaps that QEMU would trust over changed data)."""
    img = qcow2rw.open(bitmap_image)
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
    assert writes[0] == ("write", OFF_AUTOCLEAR), writes[:3]
    assert writes[1][0] == "sync", writes[:3]
    assert sum(1 for kind, value in writes if kind == "write" and value == OFF_AUTOCLEAR) == 1


@pytest.mark.parametrize("bits", [AUTOCLEAR_BITMAPS, 1 << 5])
def test_a_header_only_amend_does_not_write_the_bits_back(qemu, tmp_path: Path, bits: int) -> None:
    """amend serializes the in-memory header; when that write is the open's first, the
    hook must run before the copy is made, not during the write (the bits came back)."""
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
    assert read_header(path)["autoclear_features"] == 0
