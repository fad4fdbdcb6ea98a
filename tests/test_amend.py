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
        with pytest.raises(qcow2rw.Qcow2Error, match="compat=0.10 requires refcount_bits=16"):
            img.amend(compat="0.10")
        with pytest.raises(qcow2rw.Qcow2Error, match="Refcount widths other than 16 bits"):
            img.amend(compat="0.10", refcount_bits=32)
        with pytest.raises(qcow2rw.Qcow2Error, match="Invalid compatibility"):
            img.amend(compat="2.0")
        with pytest.raises(qcow2rw.Qcow2Error, match="Lazy refcounts"):  # (turned on)
            img.amend(compat="0.10", refcount_bits=16, lazy_refcounts=True)
        img.amend(lazy_refcounts=True)
        img.amend(lazy_refcounts=False)
        assert not img.header.lazy_refcounts


def test_refcount_width_change_matches_qemu(tmp_path: Path, qemu: Any) -> None:
    """``amend -o refcount_bits=N`` up and down, side by side with qemu-img amend on a
    twin: both check clean with the same figures and the same content, the snapshot
    survives, a decrease that cannot hold a refcount is refused with QEMU's message and
    leaves the file untouched, and allocation goes on in the new structures."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(theirs), "4M")
    qemu.qemu_io(str(theirs), "write -P 5 0 3M")
    qemu.qemu_img("snapshot", "-c", "s1", str(theirs))
    qemu.qemu_io(str(theirs), "write -P 6 1M 1M")
    ours.write_bytes(theirs.read_bytes())
    for width in (64, 8, 2, 16, 4):
        with qcow2rw.open(ours) as img:
            img.amend(refcount_bits=width)
            assert img.info()["format-specific"]["data"]["refcount-bits"] == width
        qemu.qemu_img("amend", "-o", f"refcount_bits={width}", str(theirs))
        rc, report = qemu.check(str(ours))
        assert rc == 0 and not report.get("leaks"), (width, report)
        assert report["allocated-clusters"] == qemu.check(str(theirs))[1]["allocated-clusters"]
        assert qemu.info(str(ours))["format-specific"]["data"]["refcount-bits"] == width
        qemu.qemu_img("compare", str(ours), str(theirs))
    before = ours.read_bytes()
    with qcow2rw.open(ours) as img, pytest.raises(
            qcow2rw.Qcow2Error, match=r"Cannot decrease refcount entry width to 1 bits: "
                                      r"Cluster at offset 0x[0-9a-f]+ has a refcount of 2"):
        img.amend(refcount_bits=1)
    assert ours.read_bytes() == before
    with qcow2rw.open(ours) as img:
        img.write(3 << 20, b"\7" * (1 << 20))  # allocates in the 4-bit structures
        img.create_snapshot("s2")
    assert qemu.check(str(ours))[0] == 0
    qemu.qemu_img("snapshot", "-a", "s1", str(ours))
    qemu.qemu_io(str(ours), "read -P 5 0 3M", "read -P 0 3M 1M")


def test_refcount_width_and_downgrade_in_one_amend(tmp_path: Path, qemu: Any) -> None:
    """compat=0.10 needs 16-bit refcounts: both changes in one call, as qemu-img allows."""
    path = tmp_path / "c.qcow2"
    qcow2rw.create(path, 2 << 20, refcount_bits=64, cluster_size=4096).close()
    qemu.qemu_io(str(path), "write -P 9 0 1M", "write -z 1M 64k")
    with qcow2rw.open(path) as img:
        img.amend(compat="0.10", refcount_bits=16)
    info = qemu.info(str(path))["format-specific"]["data"]
    assert (info["compat"], info["refcount-bits"]) == ("0.10", 16)
    assert qemu.check(str(path))[0] == 0
    qemu.qemu_io(str(path), "read -P 9 0 1M", "read -P 0 1M 1M")


def test_event_points_reach_the_new_refcount_manager_after_amend(tmp_path: Path) -> None:
    """amend(refcount_bits=) replaces the refcount manager; its hooks (the event points
    among them) come along: an error injected at ``refblock_update`` still fails the
    next refcount write-back.  (Before: the new manager had no event points, so the
    injected error never fired.)"""
    from qcow2rw.events import EventPoints

    path = tmp_path / "hooks.qcow2"
    qcow2rw.create(path, 1 << 20, cluster_size=4096).close()
    img = qcow2rw.open(path)
    img.write(0, b"a" * 4096)
    img.amend(refcount_bits=64)
    events = EventPoints()
    img.events = events
    events.inject_error("refblock_update")
    img.write(64 * 4096, b"b" * 4096)  # a new cluster: its refcount block is dirty
    with pytest.raises(OSError):
        img.flush()
    img.events = None
    img.flush()
    img.close()


def test_downgrading_an_image_with_lazy_refcounts_drops_them(tmp_path: Path, qemu: Any) -> None:
    """qemu-img amend -o compat=0.10 on an image with lazy refcounts succeeds and
    drops them (a v2 header has no compatible features); only turning them on while
    downgrading is refused.  Before: refused ("Lazy refcounts only supported with
    compatibility level 1.1 ..."), the image left at 1.1."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for path in (ours, theirs):
        qemu.qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(path), "4M")
        qemu.qemu_io(str(path), "write -P 0x5a 0 1M")
    qemu.qemu_img("amend", "-o", "compat=0.10", str(theirs))
    with qcow2rw.open(ours) as img:
        img.amend(compat="0.10")
    for path in (ours, theirs):
        info = qemu.info(str(path))
        assert info["format-specific"]["data"]["compat"] == "0.10"
        assert qemu.check(str(path))[0] == 0
    cmp = qemu.qemu_img("compare", str(ours), str(theirs), check=False)
    assert cmp.returncode == 0, cmp.stdout
    path = tmp_path / "off.qcow2"
    qcow2rw.create(path, 4 << 20).close()
    with qcow2rw.open(path) as img:
        with pytest.raises(qcow2rw.Qcow2Error, match="Lazy refcounts only supported"):
            img.amend(compat="0.10", lazy_refcounts=True)
