"""amend: compat downgrade/upgrade and lazy refcounts, checked with qemu-img."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import qcow2rw


def test_downgrade_expands_zero_clusters(tmp_path: Path, qemu: Any) -> None:
    path = tmp_path / "a.qcow2"
    (tmp_path / "base.raw").write_bytes(b"\x55" * (4 << 20))
    qemu.qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", str(path), "4M")
    qemu.qemu_io(str(path), "write -P 1 0 1M", "write -z 64k 128k", "write -z 2M 64k",
                 "write -z -u 3M 64k")
    qemu.qemu_img("snapshot", "-c", "s", str(path))
    qemu.qemu_io(str(path), "write -z 0 64k")
    qemu.convert_to_raw(str(path), str(tmp_path / "before.raw"))
    with qcow2rw.open(path) as img:
        img.amend(compat="0.10")
        assert img.info()["format-specific"]["data"]["compat"] == "0.10"
    info = qemu.info(str(path))
    assert info["format-specific"]["data"]["compat"] == "0.10"
    assert qemu.check(str(path))[0] == 0
    qemu.convert_to_raw(str(path), str(tmp_path / "after.raw"))
    assert (tmp_path / "after.raw").read_bytes() == (tmp_path / "before.raw").read_bytes()
    qemu.qemu_img("snapshot", "-a", "s", str(path))
    qemu.qemu_io(str(path), "read -P 0 64k 128k", "read -P 0 2M 64k", "read -P 0 3M 64k")
    with qcow2rw.open(path) as img:
        img.amend(compat="1.1", lazy_refcounts=True)
        img.write(5000, b"lazy")
    info = qemu.info(str(path))
    assert info["format-specific"]["data"]["compat"] == "1.1"
    assert info["format-specific"]["data"]["lazy-refcounts"] is True
    assert qemu.check(str(path))[0] == 0


def test_amend_refuses_what_qemu_refuses(tmp_path: Path) -> None:
    path = tmp_path / "b.qcow2"
    qcow2rw.create(path, 1 << 20, refcount_bits=8).close()
    with qcow2rw.open(path) as img:
        with pytest.raises(qcow2rw.Qcow2Error, match="16 bits"):
            img.amend(compat="0.10")
        with pytest.raises(qcow2rw.Qcow2Error, match="Invalid compatibility"):
            img.amend(compat="2.0")
        img.amend(lazy_refcounts=True)
        with pytest.raises(qcow2rw.Qcow2Error, match="Lazy refcounts"):
            img.amend(compat="0.10", refcount_bits=16)
        img.amend(lazy_refcounts=False)
        assert not img.header.lazy_refcounts
