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


def map_shape(extents: list[dict[str, Any]]) -> list[tuple[int, int, Any, Any, Any, Any]]:
    """A map without host offsets, adjacent extents of one kind merged: what the guest
    sees and what is allocated, whatever clusters each driver happened to pick."""
    out: list[tuple[int, int, Any, Any, Any, Any]] = []
    for e in extents:
        kind = (e["depth"], e["present"], e["zero"], e["data"])
        if out and out[-1][2:] == kind and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], *kind)
        else:
            out.append((e["start"], e["length"], *kind))
    return out


def _twin_images(qemu: Any, tmp_path: Path, size: str, *create_args: str) -> tuple[str, str]:
    """Two identical qemu-img-made images: one for qemu-img resize, one for ours."""
    theirs, ours = str(tmp_path / "theirs.qcow2"), str(tmp_path / "ours.qcow2")
    qemu.qemu_img("create", "-q", "-f", "qcow2", *create_args, theirs, size)
    shutil.copy(theirs, ours)
    return theirs, ours


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
def test_grow_with_preallocation_matches_qemu(tmp_path: Path, qemu: Any, mode: str) -> None:
    """``resize --preallocation``: the new area is allocated as qemu-img allocates it."""
    theirs, ours = _twin_images(qemu, tmp_path, "1000K", "-o", "cluster_size=4k")
    qemu.qemu_io(theirs, "write -P 3 0 1000K")
    shutil.copy(theirs, ours)
    qemu.qemu_img("resize", f"--preallocation={mode}", theirs, "3M")
    with qcow2rw.open(ours) as img:
        img.resize(3 << 20, preallocation=mode)
        assert img.read(0, 1000 << 10) == b"\3" * (1000 << 10)
        assert img.read(1000 << 10, (3 << 20) - (1000 << 10)) == bytes((3 << 20) - (1000 << 10))
    rc, report = qemu.check(ours)
    assert rc == 0 and report.get("leaks", 0) == 0, report
    assert report["allocated-clusters"] == qemu.check(theirs)[1]["allocated-clusters"]
    assert map_shape(qemu.map_json(ours)) == map_shape(qemu.map_json(theirs))
    with qcow2rw.open(ours) as img, pytest.raises(qcow2rw.Qcow2Error, match="growing"):
        img.resize(1 << 20, shrink=True, preallocation=mode)


def test_grow_hides_the_backing_file_like_qemu(tmp_path: Path, qemu: Any) -> None:
    """The area a resize adds reads as zeros, not as the longer backing file's data
    (qemu-img zeroes it; before the fix qcow2rw showed the backing data there)."""
    base = str(tmp_path / "base.raw")
    qemu.qemu_img("create", "-q", "-f", "raw", base, "2M")
    qemu.qemu_io(base, "write -P 7 0 2M", fmt="raw")
    theirs, ours = _twin_images(qemu, tmp_path, "1000K", "-b", base, "-F", "raw")
    qemu.qemu_img("resize", theirs, "2M")
    with qcow2rw.open(ours) as img:
        img.resize(2 << 20)
        assert img.read(0, 1000 << 10) == b"\7" * (1000 << 10)
        assert img.read(1000 << 10, 48 << 10) == bytes(48 << 10)
    assert qemu.check(ours)[0] == 0
    assert qemu.map_json(ours) == qemu.map_json(theirs)
    qemu.qemu_io(ours, "read -P 7 0 1000K", "read -P 0 1000K 1048K")


def test_grow_v2_over_a_backing_file_is_refused_untouched(tmp_path: Path, qemu: Any) -> None:
    """Version 2 cannot zero the new area; qemu-img fails half-way, we refuse up front."""
    base = str(tmp_path / "base.raw")
    qemu.qemu_img("create", "-q", "-f", "raw", base, "2M")
    _, ours = _twin_images(qemu, tmp_path, "1000K", "-b", base, "-F", "raw", "-o", "compat=0.10")
    before = Path(ours).read_bytes()
    with qcow2rw.open(ours) as img, pytest.raises(qcow2rw.UnsupportedFeature,
                                                  match="zero out new clusters"):
        img.resize(2 << 20)
    assert Path(ours).read_bytes() == before


def test_shrink_of_an_extended_l2_image_clears_the_subcluster_bitmaps(tmp_path: Path,
                                                                      qemu: Any) -> None:
    """A shrink inside an L2 table makes the clusters past the end unallocated: on an
    extended-L2 image their subcluster bitmaps too (QEMU's full discard).  Before: the
    entries were zeroed with their allocation bits left set, which qemu-img check
    counts as errors ("Unallocated cluster has non-zero subcluster allocation map") and
    a later grow and read called corrupt.  The same shrink and grow by qemu-img give
    the same disk (the partial last cluster keeps its bytes past the old end, in both)."""
    cs = 16384
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    with qcow2rw.create(ours, 2 << 20, cluster_size=cs, extended_l2=True) as img:
        img.write(1 << 20, b"\x55" * (1 << 20))
    shutil.copy(ours, theirs)
    with qcow2rw.open(ours) as img:
        img.resize((1 << 20) + 512, shrink=True)
    qemu.qemu_img("resize", "-q", "--shrink", str(theirs), str((1 << 20) + 512))
    rc, out = qemu.check(str(ours))[:2]
    assert rc == 0, out
    with qcow2rw.open(ours) as img:
        img.resize(2 << 20)
        assert img.read((1 << 20) + cs, cs) == bytes(cs)
    qemu.qemu_img("resize", "-q", str(theirs), str(2 << 20))
    assert qemu.check(str(ours))[0] == 0
    cmp = qemu.qemu_img("compare", str(ours), str(theirs), check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def _twins(qemu: Any, tmp_path: Path, size: int, *create: str) -> tuple[Path, Path]:
    """Two images made alike by qemu-img create (with *create*'s options)."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for path in (ours, theirs):
        qemu.qemu_img("create", "-q", "-f", "qcow2", *create, str(path), str(size))
    return ours, theirs


def _same(qemu: Any, ours: Path, theirs: Path) -> None:
    cmp = qemu.qemu_img("compare", str(ours), str(theirs), check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert qemu.check(str(ours))[0] == 0
    ours_map = [(e["start"], e["length"], e["data"], e["zero"]) for e in qemu.map_json(str(ours))]
    theirs_map = [(e["start"], e["length"], e["data"], e["zero"])
                  for e in qemu.map_json(str(theirs))]
    assert ours_map == theirs_map


def test_shrink_drops_the_partial_last_cluster_whole(tmp_path: Path, qemu: Any) -> None:
    """A disk of 1.5 clusters, its last cluster written, shrunk to one cluster: the
    partial cluster goes whole (QEMU's qcow2_co_truncate discards from the new end
    rounded up to the old one), so a grow afterwards reads zeros there.  Before: it
    stayed mapped and its old bytes came back after the grow."""
    cs = 65536
    ours, theirs = _twins(qemu, tmp_path, cs + cs // 2)
    qemu.qemu_io(str(theirs), f"write -P 0xaa 0 {cs + cs // 2}")
    with qcow2rw.open(ours) as img:
        img.write(0, b"\xaa" * (cs + cs // 2))
        img.resize(cs, shrink=True)
        img.resize(2 * cs)
        assert img.read(cs, cs) == bytes(cs)
    qemu.qemu_img("resize", "-q", "--shrink", str(theirs), str(cs))
    qemu.qemu_img("resize", "-q", str(theirs), str(2 * cs))
    _same(qemu, ours, theirs)


def test_a_v2_image_with_snapshots_cannot_be_resized(tmp_path: Path, qemu: Any) -> None:
    """qemu-img refuses it ("Can't resize a v2 image which has snapshots": a v2
    snapshot has no size of its own, so QEMU could not load it afterwards); so do we,
    changing nothing.  Before: resized, and qemu-img snapshot -a failed afterwards."""
    path = tmp_path / "v2.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(path), "1M")
    qemu.qemu_img("snapshot", "-c", "s1", str(path))
    theirs = qemu.qemu_img("resize", str(path), "2M", check=False)
    assert theirs.returncode == 1 and "Can't resize a v2 image which has snapshots" in \
        theirs.stderr
    before = path.read_bytes()
    with qcow2rw.open(path) as img:
        for size, shrink in ((2 << 20, False), (512 << 10, True)):
            with pytest.raises(qcow2rw.UnsupportedFeature,
                               match="Can't resize a v2 image which has snapshots"):
                img.resize(size, shrink=shrink)
    assert path.read_bytes() == before


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_grow_over_a_short_backing_file_leaves_the_new_area_unallocated(
        tmp_path: Path, qemu: Any, compat: str) -> None:
    """The new area needs zeroing only where the backing file reaches past the old end
    (QEMU's bdrv_co_truncate: BDRV_REQ_ZERO_WRITE only if backing_len > old_size);
    with a shorter backing file nothing shows through, and the area stays unallocated.
    Before: always zeroed (v3: zero clusters in the map; v2: the grow refused,
    'Failed to zero out new clusters')."""
    base = tmp_path / "base.raw"
    qemu.qemu_img("create", "-q", "-f", "raw", str(base), "64K")
    qemu.qemu_io(str(base), "write -P 0x11 0 64K", fmt="raw")
    ours, theirs = _twins(qemu, tmp_path, 1 << 20, "-o", f"compat={compat}",
                          "-b", str(base), "-F", "raw")
    with qcow2rw.open(ours) as img:
        img.resize(2 << 20)
        assert img.read(0, 4) == b"\x11" * 4 and img.read(1 << 20, 4096) == bytes(4096)
    qemu.qemu_img("resize", "-q", str(theirs), "2M")
    _same(qemu, ours, theirs)
