"""Internal snapshots both ways with qemu-img: create, list, apply, delete; overflow."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pytest

import qcow2rw

SIZE = 4 << 20


def _scribble(img: qcow2rw.Image, shadow: bytearray, rnd: random.Random, count: int) -> None:
    for _ in range(count):
        off = rnd.randrange(SIZE - 70000)
        data = bytes([rnd.randrange(1, 255)]) * rnd.randrange(1, 70000)
        img.write(off, data)
        shadow[off:off + len(data)] = data


def _qemu_reverts_to(qemu: Any, path: Path, name: str, want: bytes) -> None:
    copy = path.with_name("copy.qcow2")
    shutil.copy(path, copy)
    qemu.qemu_img("snapshot", "-a", name, str(copy))
    qemu.convert_to_raw(str(copy), str(path.with_name("copy.raw")))
    assert path.with_name("copy.raw").read_bytes() == want, name
    assert qemu.check(str(copy))[0] == 0


@pytest.mark.parametrize(("cluster_size", "refcount_bits"), [(65536, 16), (512, 16), (4096, 8)])
def test_ours_to_qemu_and_back(tmp_path: Path, qemu: Any, cluster_size: int, refcount_bits: int) -> None:
    path = tmp_path / "s.qcow2"
    rnd = random.Random(cluster_size)
    img = qcow2rw.create(path, SIZE, cluster_size=cluster_size, refcount_bits=refcount_bits)
    shadow = bytearray(SIZE)
    states = {}
    _scribble(img, shadow, rnd, 30)
    for k in range(3):
        img.create_snapshot(f"s{k}")
        states[f"s{k}"] = bytes(shadow)
        _scribble(img, shadow, rnd, 20)
    assert [s.name for s in img.snapshots()] == ["s0", "s1", "s2"]
    assert [s.id_str for s in img.snapshots()] == ["1", "2", "3"]
    img.close()
    assert qemu.check(str(path))[0] == 0
    listed = qemu.qemu_img("snapshot", "-l", str(path)).stdout
    assert all(f"s{k}" in listed for k in range(3))
    for name, state in states.items():
        _qemu_reverts_to(qemu, path, name, state)
    img = qcow2rw.open(path)
    img.apply_snapshot("s1")
    assert img.read(0, SIZE) == states["s1"]
    shadow = bytearray(states["s1"])
    _scribble(img, shadow, rnd, 10)
    img.delete_snapshot("s0")
    img.close()
    assert qemu.check(str(path))[0] == 0
    _qemu_reverts_to(qemu, path, "s2", states["s2"])
    img = qcow2rw.open(path)
    assert img.read(0, SIZE) == bytes(shadow)
    with pytest.raises(qcow2rw.SnapshotNotFound):  # by name only, as qemu-img snapshot -d
        img.delete_snapshot("2")
    img.delete_snapshot("s1")  # (id 2)
    img.delete_snapshot("s2")
    _scribble(img, shadow, rnd, 10)
    assert img.snapshots() == []
    img.close()
    rc, out = qemu.check(str(path))
    assert rc == 0 and "leaks" not in out, out
    qemu.convert_to_raw(str(path), str(tmp_path / "final.raw"))
    assert (tmp_path / "final.raw").read_bytes() == bytes(shadow)


def test_qemu_snapshots_applied_and_deleted_by_us(tmp_path: Path, qemu: Any) -> None:
    path = tmp_path / "q.qcow2"
    qemu.qemu_img("create", "-f", "qcow2", str(path), str(SIZE))
    qemu.qemu_io(str(path), "write -P 0x11 0 1M", "write -P 0x22 2M 512k")
    qemu.qemu_img("snapshot", "-c", "first", str(path))
    qemu.qemu_io(str(path), "write -P 0x33 512k 1M", "write -z 2M 64k")
    qemu.qemu_img("snapshot", "-c", "second", str(path))
    qemu.qemu_io(str(path), "discard 0 4M")
    qemu.convert_to_raw(str(path), str(tmp_path / "now.raw"))
    with qcow2rw.open(path) as img:
        assert [s.name for s in img.snapshots()] == ["first", "second"]
        img.apply_snapshot("first")
        first = img.read(0, SIZE)
        assert first[:1 << 20] == b"\x11" * (1 << 20) and first[2 << 20:(2 << 20) + 1] == b"\x22"
        img.write(100, b"after")
        img.delete_snapshot("second")
    assert qemu.check(str(path))[0] == 0
    qemu.qemu_io(str(path), "read -P 0x11 4096 1020k", "read -P 0x22 2M 512k")
    with pytest.raises(qcow2rw.SnapshotNotFound):
        with qcow2rw.open(path) as img:
            img.apply_snapshot("second")


@pytest.mark.parametrize("refcount_bits", [1, 2])
def test_refcount_overflow_fails_cleanly(tmp_path: Path, qemu: Any, refcount_bits: int) -> None:
    """Like qemu-iotests 112: a snapshot that needs refcounts the width cannot hold is
    refused before anything changes."""
    path = tmp_path / "o.qcow2"
    img = qcow2rw.create(path, SIZE, refcount_bits=refcount_bits)
    img.write(0, b"x" * 200000)
    taken = 0
    with pytest.raises(qcow2rw.Qcow2Error, match="refcount"):
        for k in range(4):
            img.create_snapshot(f"s{k}")
            taken += 1
    assert taken == (1 << refcount_bits) - 2
    assert img.read(0, 200000) == b"x" * 200000
    img.write(1000, b"still writable")
    img.close()
    rc, out = qemu.check(str(path))
    assert rc == 0, out
