"""Ours -> QEMU: images created and written by qcow2rw, judged by qemu-img.

Each case creates an image with ``qcow2rw.create``, applies a seeded random sequence of
unaligned writes, discards and write_zeroes to the image and to a shadow bytearray,
reads everything back through ours, closes, and then requires:

* ``qemu-img check``: exit 0, no corruptions, no leaks;
* ``qemu-img convert -O raw`` equals the shadow byte for byte;
* ``qemu-img info --output=json`` and ours agree on the keys of ``helpers.INFO_KEYS``
  (``actual-size`` is left out: it counts host blocks, which depends on each writer's
  layout and on the host filesystem, not on the image's meaning);
* ``qemu-img map --output=json`` equals ours exactly.

The matrix covers every cluster size (512 B, 4 KiB, 64 KiB, 2 MiB), every refcount width
asked for (1, 8, 16, 64), both compat levels, lazy refcounts and backing files (a qcow2
made by qemu-img and filled by qemu-io, and a raw file), each value at least once, plus
a few combinations.  compat=0.10 allows only refcount_bits=16 and no lazy refcounts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

import qcow2rw

from helpers import (MiB, Shadow, apply_ops, assert_same_bytes, compare_info, compare_map,
                     describe, make_raw_file, qcow2_backing_with_pattern, qemu_check_clean,
                     qemu_io_run, qemu_raw, random_ops, read_all, read_header, readinto_all)

# interop: needs qemu-img/qemu-io (the `qemu` fixture); a hang fails this test alone,
# well before the suite-wide timeout (each test normally takes a second or two)
pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]


@dataclass(frozen=True)
class Case:
    cluster_size: int = 65536
    refcount_bits: int = 16
    compat: str = "1.1"
    lazy: bool = False
    backing: str | None = None        # None | "qcow2" | "raw"
    backing_size: int | None = None   # default: same as the image
    relative_backing: bool = True     # backing name stored relative to the image's directory
    size: int = 8 * MiB
    ops: int = 100
    seed: int = 0


CASES = [
    pytest.param(Case(cluster_size=512, seed=101, size=4 * MiB, ops=80), id="cs512"),
    pytest.param(Case(cluster_size=4096, refcount_bits=1, seed=102), id="cs4k-rb1"),
    pytest.param(Case(cluster_size=65536, refcount_bits=8, seed=103), id="cs64k-rb8"),
    pytest.param(Case(cluster_size=2 * MiB, refcount_bits=64, seed=104, size=16 * MiB, ops=25),
                 id="cs2M-rb64"),
    pytest.param(Case(compat="0.10", seed=105), id="v2-cs64k"),
    pytest.param(Case(compat="0.10", cluster_size=512, seed=106, size=4 * MiB), id="v2-cs512"),
    pytest.param(Case(lazy=True, seed=107), id="lazy-cs64k"),
    pytest.param(Case(lazy=True, cluster_size=4096, refcount_bits=64, seed=108), id="lazy-cs4k-rb64"),
    pytest.param(Case(cluster_size=512, refcount_bits=1, seed=109, size=4 * MiB), id="cs512-rb1"),
    pytest.param(Case(backing="qcow2", seed=110), id="backing-qcow2"),
    pytest.param(Case(backing="raw", cluster_size=4096, seed=111, backing_size=5 * MiB),
                 id="backing-raw-shorter"),
    pytest.param(Case(backing="qcow2", compat="0.10", seed=112, relative_backing=False),
                 id="v2-backing-qcow2-abs"),
    pytest.param(Case(backing="raw", cluster_size=512, refcount_bits=8, seed=113, size=4 * MiB),
                 id="backing-raw-cs512-rb8"),
    pytest.param(Case(backing="qcow2", cluster_size=2 * MiB, seed=114, size=16 * MiB, ops=25,
                      backing_size=12 * MiB), id="backing-qcow2-cs2M"),
    pytest.param(Case(backing="qcow2", lazy=True, refcount_bits=64, seed=115,
                      backing_size=10 * MiB), id="lazy-backing-qcow2-longer"),
    pytest.param(Case(backing="raw", compat="0.10", cluster_size=4096, seed=116),
                 id="v2-backing-raw"),
    # the remaining refcount widths, and 64-bit refcounts on 512 B clusters, where one
    # refcount block covers only 64 clusters (the table grows early and often)
    pytest.param(Case(cluster_size=4096, refcount_bits=2, seed=117), id="cs4k-rb2"),
    pytest.param(Case(cluster_size=65536, refcount_bits=4, seed=118), id="cs64k-rb4"),
    pytest.param(Case(cluster_size=512, refcount_bits=32, seed=119, size=4 * MiB), id="cs512-rb32"),
    pytest.param(Case(cluster_size=512, refcount_bits=64, seed=120, size=4 * MiB), id="cs512-rb64"),
]


def _make_backing(qemu, case: Case, tmp_path, rng: random.Random):
    """(name to store in the header, format, content the chain reads) for the case."""
    bsize = case.backing_size or case.size
    if case.backing == "qcow2":
        path = tmp_path / "base.qcow2"
        # a different cluster size from the overlay on purpose
        bcs = 65536 if case.cluster_size != 65536 else 4096
        qcow2_backing_with_pattern(qemu, path, bsize, bcs, rng)
        content = qemu_raw(qemu, path, tmp_path)
        fmt = "qcow2"
    else:
        path = tmp_path / "base.raw"
        content = make_raw_file(path, bsize, rng)
        fmt = "raw"
    name = path.name if case.relative_backing else str(path)
    return name, fmt, content


@pytest.mark.parametrize("case", CASES)
def test_ours_to_qemu(qemu, tmp_path, case: Case):
    rng = random.Random(case.seed)
    ctx = describe(case.seed, case=case)
    path = tmp_path / "img.qcow2"
    backing_name = backing_fmt = None
    base = None
    if case.backing:
        backing_name, backing_fmt, base = _make_backing(qemu, case, tmp_path, rng)

    img = qcow2rw.create(str(path), case.size, cluster_size=case.cluster_size,
                         backing_file=backing_name, backing_format=backing_fmt,
                         lazy_refcounts=case.lazy, refcount_bits=case.refcount_bits,
                         compat=case.compat)
    shadow = Shadow(case.size, case.cluster_size, v3=case.compat != "0.10", base=base)
    try:
        assert img.size == case.size, ctx
        assert img.cluster_size == case.cluster_size, ctx
        assert img.backing_file == backing_name, ctx
        # before any write, the image reads as its backing chain (or zeros)
        assert_same_bytes(read_all(img), shadow.data, f"{ctx} fresh image",
                          cluster_size=case.cluster_size)
        ops = random_ops(rng, case.size, case.cluster_size, case.ops)
        apply_ops(img, shadow, ops, ctx)
        assert_same_bytes(read_all(img), shadow.data, f"{ctx} read() after ops",
                          cluster_size=case.cluster_size)
        img.flush()
        assert_same_bytes(readinto_all(img), shadow.data, f"{ctx} readinto() after flush",
                          cluster_size=case.cluster_size)
    finally:
        img.close()

    hdr = read_header(path)
    assert hdr["version"] == (2 if case.compat == "0.10" else 3), ctx
    assert hdr["cluster_bits"] == case.cluster_size.bit_length() - 1, ctx
    if case.compat != "0.10":
        assert 1 << hdr["refcount_order"] == case.refcount_bits, ctx
        assert hdr["incompatible_features"] & 1 == 0, f"{ctx}: dirty bit left set after close"
        assert bool(hdr["compatible_features"] & 1) == case.lazy, ctx

    qemu_check_clean(qemu, path, ctx)
    assert_same_bytes(qemu_raw(qemu, path, tmp_path), shadow.data,
                      f"{ctx} qemu-img convert vs shadow", cluster_size=case.cluster_size)
    theirs_info = qemu.info(str(path))

    with qcow2rw.open(str(path), readonly=True) as ro:
        compare_info(ro.info(), theirs_info, ctx)
        ours_map = ro.map()
        compare_map(ours_map, qemu.map_json(str(path)), ctx)
        assert_same_bytes(read_all(ro), shadow.data, f"{ctx} reopened read-only",
                          cluster_size=case.cluster_size)

    # a second session on the same image: reopen read-write, write more, close, judge again
    ops2 = random_ops(rng, case.size, case.cluster_size, max(10, case.ops // 3))
    with qcow2rw.open(str(path)) as rw:
        apply_ops(rw, shadow, ops2, ctx + " (second session)")
    qemu_check_clean(qemu, path, ctx + " (second session)")
    assert_same_bytes(qemu_raw(qemu, path, tmp_path), shadow.data,
                      f"{ctx} second session: qemu-img convert vs shadow",
                      cluster_size=case.cluster_size)
    with qcow2rw.open(str(path), readonly=True) as ro:
        ours_map = ro.map()
        compare_map(ours_map, qemu.map_json(str(path)), ctx + " (second session)")


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_fresh_image_matches_qemu(qemu, tmp_path, compat):
    """An untouched image: qemu-img sees it clean, empty and with our metadata."""
    path = tmp_path / "fresh.qcow2"
    qcow2rw.create(str(path), 64 * MiB, compat=compat).close()
    qemu_check_clean(qemu, path, f"fresh compat={compat}")
    theirs = qemu.info(str(path))
    assert theirs["virtual-size"] == 64 * MiB
    assert theirs["format-specific"]["data"]["compat"] == compat
    with qcow2rw.open(str(path), readonly=True) as ro:
        compare_info(ro.info(), theirs, f"fresh compat={compat}")
        ours_map = ro.map()
        compare_map(ours_map, qemu.map_json(str(path)), f"fresh compat={compat}")
    assert qemu_raw(qemu, path, tmp_path) == bytes(64 * MiB)


def test_qemu_io_reads_our_writes(qemu, tmp_path):
    """qemu-io's pattern verification agrees with what we wrote (not just convert)."""
    path = tmp_path / "pat.qcow2"
    with qcow2rw.create(str(path), 4 * MiB, cluster_size=4096) as img:
        img.write(1000, b"\x5a" * 70000)
        img.write(2 * MiB - 3, b"\xc3" * 6)
    qemu_io_run(qemu, path, "read -P 0x5a 1000 70000", "read -P 0 0 1000",
                "read -P 0 71000 4000", f"read -P 0xc3 {2 * MiB - 3} 6",
                f"read -P 0 {2 * MiB + 3} 4096")


@pytest.mark.parametrize("extended", [False, True])
@pytest.mark.parametrize("backing", [False, True])
def test_discard_reaching_the_end_of_an_unaligned_image_takes_its_last_cluster(
        qemu, tmp_path, extended: bool, backing: bool) -> None:
    """QEMU's qcow2_co_pdiscard takes "the complete partial cluster at the end of an
    unaligned file" whole: a discard from its start to the end of the image.  The same
    requests through qemu-io and through qcow2rw give the same content and map.
    Before: qcow2rw left that cluster's data in place (qemu-img compare differed)."""
    size = (1 << 20) + 512  # the last 64 KiB cluster holds 512 bytes of the disk
    base = tmp_path / "base.qcow2"
    if backing:
        qemu.qemu_img("create", "-q", "-f", "qcow2", str(base), str(size))
        qemu.qemu_io(str(base), f"write -P 0x42 0 {size}")
    opts = f"extended_l2={'on' if extended else 'off'}"
    if backing:
        opts += f",backing_file={base},backing_fmt=qcow2"
    for name in ("theirs.qcow2", "ours.qcow2"):
        qemu.qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(tmp_path / name),
                      str(size))
    qemu.qemu_io(str(tmp_path / "theirs.qcow2"), "write -P 0x55 960k 66048",
                 "discard 1M 512", "discard 960k 1000")
    with qcow2rw.open(tmp_path / "ours.qcow2") as img:
        img.write(960 << 10, b"\x55" * 66048)  # (to the end of the disk)
        img.discard(1 << 20, 512)
        img.discard(960 << 10, 1000)  # (not to the end: a partial cluster stays)
        ours = img.read(960 << 10, size - (960 << 10))
    with qcow2rw.open(tmp_path / "theirs.qcow2", readonly=True) as img:
        assert img.read(960 << 10, size - (960 << 10)) == ours
    cmp = qemu.qemu_img("compare", str(tmp_path / "theirs.qcow2"), str(tmp_path / "ours.qcow2"),
                        check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert qemu.map_json(str(tmp_path / "ours.qcow2"))[-1]["data"] == \
        qemu.map_json(str(tmp_path / "theirs.qcow2"))[-1]["data"]
    assert qemu.check(str(tmp_path / "ours.qcow2"))[0] == 0


@pytest.mark.parametrize("backing", [False, True])
def test_zeroing_part_of_a_cluster_that_reads_as_zeros_allocates_nothing(
        qemu, tmp_path, backing: bool) -> None:
    """QEMU's qcow2_co_pwrite_zeroes: a piece of a cluster whose rest reads as zeros
    already, in an unallocated or zero cluster, makes the whole cluster a zero cluster;
    a range reaching the end of an unaligned disk has no tail.  Zeros are written only
    where the rest holds data.  The same requests through qemu-io and qcow2rw give the
    same content and map.  Before: every partial piece allocated a cluster of zeros."""
    size = 15 * 65536 + 17408  # (the last cluster is partial)
    base = tmp_path / "base.qcow2"
    if backing:  # data in the backing file's cluster 5 only
        qemu.qemu_img("create", "-q", "-f", "qcow2", str(base), str(size))
        qemu.qemu_io(str(base), "write -P 0x42 327680 65536")
    opts = ["-o", f"backing_file={base},backing_fmt=qcow2"] if backing else []
    for name in ("theirs.qcow2", "ours.qcow2"):
        qemu.qemu_img("create", "-q", "-f", "qcow2", *opts, str(tmp_path / name), str(size))
    requests = [(4096, 4096),            # inside an unallocated cluster
                (65536 + 512, 1024),     # another
                (131072 - 2048, 4096),   # across two clusters: two pieces
                (327680 + 4096, 4096),   # over backing data (when there is a backing file)
                (917504 + 2048, 2048),   # a cluster with data: zeros written
                (983040 + 1024, 17408 - 1024)]  # to the end of the disk: no tail
    qemu.qemu_io(str(tmp_path / "theirs.qcow2"), "write -P 0x61 917504 65536",
                 *[f"write -z {off} {n}" for off, n in requests])
    with qcow2rw.open(tmp_path / "ours.qcow2") as img:
        img.write(917504, b"a" * 65536)
        for off, n in requests:
            img.write_zeroes(off, n)
    cmp = qemu.qemu_img("compare", str(tmp_path / "theirs.qcow2"), str(tmp_path / "ours.qcow2"),
                        check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    def layout(name: str) -> list:  # (host offsets may differ)
        return [(e["start"], e["length"], e["zero"], e["data"], e["depth"])
                for e in qemu.map_json(str(tmp_path / name))]

    assert layout("ours.qcow2") == layout("theirs.qcow2")
    rc, ours = qemu.check(str(tmp_path / "ours.qcow2"))
    theirs = qemu.check(str(tmp_path / "theirs.qcow2"))[1]
    assert rc == 0 and ours.get("allocated-clusters") == theirs.get("allocated-clusters")
