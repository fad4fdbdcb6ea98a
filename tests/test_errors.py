"""Bad input gets an error from our own hierarchy; dirty images are repaired on open."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import qcow2rw
from qcow2rw.format import OFF_INCOMPATIBLE


def test_not_qcow2(tmp_path: Path) -> None:
    path = tmp_path / "x.img"
    path.write_bytes(b"hello world" * 100)
    with pytest.raises(qcow2rw.FormatError, match="not in qcow2 format"):
        qcow2rw.open(path)


@pytest.mark.parametrize("length", [0, 4, 71, 100])
def test_truncated_header(tmp_path: Path, length: int) -> None:
    good = tmp_path / "good.qcow2"
    qcow2rw.create(good, 1 << 20).close()
    path = tmp_path / "short.qcow2"
    path.write_bytes(good.read_bytes()[:length])
    with pytest.raises(qcow2rw.Qcow2Error):
        qcow2rw.open(path, readonly=True)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        qcow2rw.open(tmp_path / "nope.qcow2")


def test_bad_arguments(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    with pytest.raises(qcow2rw.FormatError):
        qcow2rw.create(path, 1 << 20, cluster_size=1000)
    with pytest.raises(qcow2rw.FormatError):
        qcow2rw.create(path, 1 << 20, refcount_bits=3)
    with pytest.raises(qcow2rw.FormatError):
        qcow2rw.create(path, 1 << 20, compat="0.10", lazy_refcounts=True)
    qcow2rw.create(path, 1 << 20).close()
    with pytest.raises(ValueError):
        qcow2rw.open(path, lock_mode="spinlock")
    with qcow2rw.open(path) as img:
        with pytest.raises(qcow2rw.OutOfRange):
            img.read((1 << 20) - 10, 11)
        with pytest.raises(qcow2rw.OutOfRange):
            img.write(-1, b"x")
    img.close()
    with pytest.raises(qcow2rw.ClosedImage):
        img.read(0, 1)
    with qcow2rw.open(path, readonly=True) as img:
        with pytest.raises(qcow2rw.ReadOnlyImage):
            img.write(0, b"x")


def test_backing_loops_refused(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.qcow2", tmp_path / "b.qcow2", tmp_path / "c.qcow2"
    qcow2rw.create(c, 1 << 20).close()
    qcow2rw.create(b, 1 << 20, backing_file="c.qcow2", backing_format="qcow2").close()
    qcow2rw.create(a, 1 << 20, backing_file="b.qcow2", backing_format="qcow2").close()
    _set_backing(b, "a.qcow2")  # a -> b -> a
    with pytest.raises(qcow2rw.BackingChainError, match="loop"):
        qcow2rw.open(a, readonly=True)
    _set_backing(b, "b.qcow2")  # b names itself
    with pytest.raises(qcow2rw.BackingChainError, match="loop"):
        qcow2rw.open(b, readonly=True)


def test_missing_backing_file(tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qcow2rw.create(b, 1 << 20).close()
    qcow2rw.create(a, 1 << 20, backing_file="b.qcow2", backing_format="qcow2").close()
    b.unlink()
    with pytest.raises(qcow2rw.BackingChainError):
        qcow2rw.open(a, readonly=True)
    with qcow2rw.open(a, readonly=True, backing=False) as img:
        assert img.backing_file == "b.qcow2"


def _set_backing(path: Path, name: str) -> None:
    """Rewrite the backing file name (same length) in place."""
    data = bytearray(path.read_bytes())
    offset, size = struct.unpack_from(">QI", data, 8)
    if not offset:
        raise AssertionError("image has no backing file")
    assert len(name) == size
    data[offset:offset + size] = name.encode()
    path.write_bytes(bytes(data))


def test_dirty_image_is_repaired_on_read_write_open(tmp_path: Path, qemu: Any) -> None:
    """A writer with lazy refcounts killed by SIGKILL leaves a dirty image with stale
    refcounts; a read-only open leaves it alone, a read-write open rebuilds them."""
    path = tmp_path / "lazy.qcow2"
    qcow2rw.create(path, 64 << 20, lazy_refcounts=True, cluster_size=4096).close()
    code = (
        "import os, sys, qcow2rw\n"
        f"img = qcow2rw.open({str(path)!r})\n"
        "for i in range(200):\n"
        "    img.write(i * 70000, bytes([i % 250 + 1]) * 5000)\n"
        "img.flush()\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.returncode == -9
    flags = struct.unpack_from(">Q", path.read_bytes(), OFF_INCOMPATIBLE)[0]
    assert flags & 1, "the dirty bit is set"
    rc, out = qemu.check(str(path))
    assert rc == 2 and out.get("corruptions"), out  # stale refcounts before the repair
    with qcow2rw.open(path, readonly=True) as img:
        assert img.info()["dirty-flag"] is True
        assert img.read(70000, 5000) == bytes([2]) * 5000
    with qcow2rw.open(path) as img:
        for i in range(200):
            assert img.read(i * 70000, 5000) == bytes([i % 250 + 1]) * 5000
    rc, out = qemu.check(str(path))
    assert rc == 0, out
    assert json.loads(qemu.qemu_img("info", "--output=json", str(path)).stdout)["dirty-flag"] is False


def test_backing_chain_depth_is_capped(tmp_path: Path) -> None:
    """A chain of MAX_CHAIN_DEPTH images opens; one more layer is refused."""
    from qcow2rw.backing import MAX_CHAIN_DEPTH

    qcow2rw.create(tmp_path / "0.qcow2", 1 << 20).close()
    for i in range(1, MAX_CHAIN_DEPTH):
        qcow2rw.create(tmp_path / f"{i}.qcow2", 1 << 20, backing_file=f"{i - 1}.qcow2",
                       backing_format="qcow2").close()
    _link_by_hand(tmp_path, MAX_CHAIN_DEPTH)
    with qcow2rw.open(tmp_path / f"{MAX_CHAIN_DEPTH - 1}.qcow2", readonly=True) as img:
        assert img.read(0, 512) == bytes(512)
    with pytest.raises(qcow2rw.BackingChainError, match="deeper"):
        qcow2rw.open(tmp_path / f"{MAX_CHAIN_DEPTH}.qcow2", readonly=True)


def _link_by_hand(tmp_path: Path, i: int) -> None:
    """Image *i* on top of image i-1, made without opening the (too deep) chain."""
    qcow2rw.create(tmp_path / "spare.qcow2", 1 << 20).close()
    qcow2rw.create(tmp_path / f"{i}.qcow2", 1 << 20, backing_file="spare.qcow2",
                   backing_format="qcow2").close()
    path = tmp_path / f"{i}.qcow2"
    data = bytearray(path.read_bytes())
    offset = struct.unpack_from(">Q", data, 8)[0]
    name = f"{i - 1}.qcow2".encode()
    data[offset:offset + len(name)] = name
    struct.pack_into(">I", data, 16, len(name))
    path.write_bytes(bytes(data))


def test_info_after_close_raises(tmp_path: Path) -> None:
    """info() after close() used to fstat whatever file had taken the old descriptor
    number; now it raises ClosedImage."""
    img = qcow2rw.create(tmp_path / "a.qcow2", 1 << 20)
    img.close()
    other = os.open(tmp_path / "other", os.O_CREAT | os.O_RDWR)  # likely the same number
    try:
        with pytest.raises(qcow2rw.ClosedImage):
            img.info()
    finally:
        os.close(other)
