"""Issue 15 §1: images with extended L2 entries (subclusters) read, map and check
exactly as QEMU's do (writes: tests/test_extended_l2_write.py).

The images are made by QEMU with the operations of qemu-iotests 271 (writes at the
start, middle and end of a subcluster, across clusters, zeroing aligned and unaligned
ranges over unallocated, allocated and compressed clusters, discard, zero+unmap,
compressed writes and their partial overwrite), over no backing file, a raw one and a
qcow2 one.  On each: our reads equal ``qemu-img convert``'s, ``qcow2rw map`` (JSON and
human) equals ``qemu-img map``, ``qcow2rw check`` (text, JSON, exit code) equals
``qemu-img check``, and ``compare -s`` says what qemu-img says.  Damaged bitmaps
(both bits set, allocation bits without a host offset, a bitmap on a compressed
cluster, unaligned offsets with and without data) give qemu-img's check findings and
fail reads with QEMU's corruption message.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import qcow2rw
from qcow2rw.errors import CorruptImage

from helpers import qemu_io_run, qemu_raw


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qcow2rw", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def _tool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, timeout=120)


def _commands(cs: int) -> list[str]:
    sc = cs // 32
    return [
        f"write -P 0x11 0 {sc}",                                  # a whole first subcluster
        f"write -P 0x12 {cs + sc // 2} {sc // 4}",                # inside one subcluster
        f"write -P 0x13 {3 * cs - sc} {sc}",                      # the last subcluster
        f"write -P 0x14 {3 * cs + 3 * sc} {cs}",                  # across two clusters
        f"write -z {5 * cs + 2 * sc} {4 * sc}",                   # zero, aligned, unallocated
        f"write -z {6 * cs + sc // 2} {sc}",                      # zero, unaligned
        f"write -P 0x15 {7 * cs} {cs}", f"write -z {7 * cs + sc} {2 * sc}",  # zero in allocated
        f"write -P 0x16 {8 * cs} {cs}", f"discard {8 * cs} {cs}",  # discard
        f"write -z -u {9 * cs} {cs}",                              # zero + unmap
        f"write -c -P 0x17 {10 * cs} {cs}",                        # compressed
        f"write -c -P 0x18 {11 * cs} {cs}", f"write -P 0x19 {11 * cs + sc} {sc}",  # COW of it
        f"write -c -P 0x1a {12 * cs} {cs}", f"write -z {12 * cs + sc} {sc}",
        f"write -P 0x1b {13 * cs + sc} {sc}", f"write -P 0x1c {13 * cs + 5 * sc} {sc}",
    ]


def _make(qemu, d: Path, cs: int, backing: str | None) -> Path:
    size = 16 * cs
    args = ["create", "-q", "-f", "qcow2", "-o", f"extended_l2=on,cluster_size={cs}"]
    if backing is not None:
        base = d / f"base.{backing}"
        qemu.qemu_img("create", "-q", "-f", backing, str(base), str(size))
        qemu_io_run(qemu, base, f"write -P 0xbb 0 {size}", f"write -z {14 * cs} {cs}",
                    fmt=backing)
        args += ["-b", base.name, "-F", backing]
    top = d / "top.qcow2"
    qemu.qemu_img(*args, str(top), str(size))
    qemu_io_run(qemu, top, *_commands(cs))
    return top


def _same_output(qemu, d: Path, *args: str) -> None:
    ours = _cli(*args, cwd=d)
    theirs = _tool(qemu.QEMU_IMG, *args, cwd=d)
    assert ours.returncode == theirs.returncode, (args, ours.stderr, theirs.stderr)
    assert ours.stdout == theirs.stdout, args
    assert ours.stderr.replace("qcow2rw: ", "qemu-img: ") == theirs.stderr, args


@pytest.mark.parametrize("backing", [None, "raw", "qcow2"])
@pytest.mark.parametrize("cs", [16384, 65536])
def test_qemu_made_subclusters_read_map_check_like_qemu(qemu, tmp_path: Path, cs: int,
                                                        backing: str | None) -> None:
    top = _make(qemu, tmp_path, cs, backing)
    expected = qemu_raw(qemu, top, tmp_path)
    with qcow2rw.open(top, readonly=True) as img:
        assert img.read(0, img.size) == expected
        sc = cs // 32
        for offset in (sc // 2, cs + sc // 3, 7 * cs + sc - 5, 11 * cs + 2 * sc - 1):
            assert img.read(offset, 3 * sc) == expected[offset:offset + 3 * sc]
        assert img.info()["format-specific"]["data"]["extended-l2"] is True
    for args in (("map", "--output=json", "top.qcow2"), ("map", "top.qcow2"),
                 ("check", "top.qcow2"), ("check", "--output=json", "top.qcow2"),
                 ("info", "top.qcow2")):
        _same_output(qemu, tmp_path, *args)
    (tmp_path / "flat.raw").write_bytes(expected)
    for strict in ((), ("-s",)):
        _same_output(qemu, tmp_path, "compare", *strict, "top.qcow2", "flat.raw")


def test_two_megabyte_clusters_and_64k_subclusters(qemu, tmp_path: Path) -> None:
    top = _make(qemu, tmp_path, 2 << 20, "raw")
    with qcow2rw.open(top, readonly=True) as img:
        assert img.read(0, img.size) == qemu_raw(qemu, top, tmp_path)
    _same_output(qemu, tmp_path, "map", "--output=json", "top.qcow2")
    _same_output(qemu, tmp_path, "check", "top.qcow2")


def _patched(src: Path, dst: Path, index: int, descriptor: int | None = None,
             bitmap: int | None = None) -> Path:
    data = bytearray(src.read_bytes())
    l1 = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1)[0] & 0x00FFFFFFFFFFFE00
    old_d, old_b = struct.unpack_from(">QQ", data, l2 + 16 * index)
    struct.pack_into(">QQ", data, l2 + 16 * index, old_d if descriptor is None else descriptor,
                     old_b if bitmap is None else bitmap)
    dst.write_bytes(data)
    return dst


@pytest.mark.parametrize("name,index,descriptor,bitmap,corrupt_read", [
    ("both-bits", 0, None, 0x0000000200000002, "Invalid cluster entry found  (L2 offset: "),
    ("alloc-without-offset", 1, 0, 0x1, "Invalid cluster entry found  (L2 offset: "),
    ("compressed-with-bitmap", 0, (1 << 62) | 0x50000 | (1 << 54), 0x5, None),
    ("unaligned-with-data", 0, 0x8000000000050200, 0x2, "unaligned"),
    ("unaligned-without-data", 0, 0x8000000000050200, 0x0, "unaligned"),
])
def test_damaged_bitmaps_found_like_qemu(qemu, tmp_path: Path, name: str, index: int,
                                         descriptor: int | None, bitmap: int,
                                         corrupt_read: str | None) -> None:
    good = tmp_path / "good.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", str(good), "1M")
    qemu_io_run(qemu, good, "write -P 0x22 2k 2k")  # cluster 0 at 0x50000, subcluster 1
    _patched(good, tmp_path / "bad.qcow2", index, descriptor, bitmap)
    for args in (("check", "bad.qcow2"), ("check", "--output=json", "bad.qcow2")):
        _same_output(qemu, tmp_path, *args)
    if corrupt_read is not None:
        with qcow2rw.open(tmp_path / "bad.qcow2", readonly=True) as img:
            with pytest.raises(CorruptImage, match=corrupt_read.replace("(", r"\(")):
                img.read(index * 65536, 65536)
        theirs = _tool(qemu.QEMU_IO, "-r", "-c", f"read {index * 65536} 64k", "bad.qcow2",
                       cwd=tmp_path)
        assert "Input/output error" in theirs.stdout + theirs.stderr


def test_read_write_open_and_repair_keep_the_image(qemu, tmp_path: Path) -> None:
    path = tmp_path / "x.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", str(path), "1M")
    qemu_io_run(qemu, path, "write -P 0x22 2k 2k")
    with qcow2rw.open(path) as img:
        assert img.read(2048, 2048) == b"\x22" * 2048
    proc = _cli("check", "-r", "all", "x.qcow2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(_cli("info", "--output=json", "x.qcow2", cwd=tmp_path).stdout)
    assert info["format-specific"]["data"]["extended-l2"] is True
    assert qemu_raw(qemu, path, tmp_path)[2048:4096] == b"\x22" * 2048


@pytest.mark.parametrize("backing", ["short", "none"])
def test_map_gives_the_offset_of_unallocated_subclusters_below_nothing(
        qemu, tmp_path: Path, backing: str) -> None:
    """An allocated cluster whose other subclusters are unallocated, past the end of a
    shorter backing file (or with none): QEMU's block status gives those subclusters
    their host offset, as zeros of depth 0, and qemu-img map lists them apart.  Before:
    past a short backing file our map dropped the offset and merged them into the hole
    next to them."""
    from helpers import compare_map
    path = tmp_path / "e.qcow2"
    opts = "extended_l2=on,cluster_size=64k"
    if backing == "short":
        qemu.qemu_img("create", "-q", "-f", "raw", str(tmp_path / "b.raw"), "64K")
        opts += f",backing_file={tmp_path / 'b.raw'},backing_fmt=raw"
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(path), "1M")
    qemu.qemu_io(str(path), "write -P 1 135168 2048")
    with qcow2rw.open(path, readonly=True) as img:
        ours = img.map()
    compare_map(ours, qemu.map_json(str(path)), backing)
    assert any(e.get("offset") is not None and not e["present"] for e in ours)
