"""Resize: grow and shrink against qemu-img, with snapshots kept intact."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

import qcow2rw


@pytest.mark.parametrize("cluster_size", [512, 65536])
def test_shrink_keeps_snapshots_and_checks_clean(tmp_path: Path, qemu: Any, cluster_size: int) -> None:
    path = tmp_path / "r.qcow2"
    data = os.urandom(1 << 20)
    img = qcow2rw.create(path, 64 << 20, cluster_size=cluster_size)
    for offset in range(0, 64 << 20, 4 << 20):
        img.write(offset + 777, data)
    img.create_snapshot("snap")
    img.write(50 << 20, b"after" * 1000)
    with pytest.raises(qcow2rw.Qcow2Error, match="--shrink"):
        img.resize(2 << 20)
    img.resize((3 << 20) + 4096, shrink=True)
    assert img.size == (3 << 20) + 4096
    assert img.read(777, 1 << 20) == data
    img.close()
    assert qemu.check(str(path))[0] == 0
    assert qemu.info(str(path))["virtual-size"] == (3 << 20) + 4096
    copy = tmp_path / "copy.qcow2"
    shutil.copy(path, copy)
    qemu.qemu_img("snapshot", "-a", "snap", str(copy))
    qemu.convert_to_raw(str(copy), str(tmp_path / "snap.raw"))
    raw = (tmp_path / "snap.raw").read_bytes()
    assert len(raw) == 64 << 20
    assert all(raw[o + 777:o + 777 + (1 << 20)] == data for o in range(0, 60 << 20, 4 << 20))
    with qcow2rw.open(path) as img:
        img.delete_snapshot("snap")
        img.resize(1 << 20, shrink=True)
        img.resize(8 << 20)
        assert img.read(0, 1 << 20)[777:] == data[:(1 << 20) - 777]
        assert img.read(1 << 20, 7 << 20) == bytes(7 << 20)  # nothing comes back from before
        img.write(5 << 20, b"x" * 100)
    rc, out = qemu.check(str(path))
    assert rc == 0 and "leaks" not in out, out
    assert qemu.info(str(path))["virtual-size"] == 8 << 20


def test_grow_then_write_matches_qemu(tmp_path: Path, qemu: Any) -> None:
    path = tmp_path / "g.qcow2"
    qemu.qemu_img("create", "-f", "qcow2", str(path), "1M")
    qemu.qemu_io(str(path), "write -P 7 0 1M")
    with qcow2rw.open(path) as img:
        img.resize(3 << 30)
        img.write((3 << 30) - 4096, b"end" * 100)
    assert qemu.check(str(path))[0] == 0
    assert qemu.info(str(path))["virtual-size"] == 3 << 30
    qemu.qemu_io(str(path), "read -P 7 0 1M")
