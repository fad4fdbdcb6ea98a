"""QEMU -> ours: images made by qemu-img/qemu-io, read and then written by qcow2rw.

Each scenario builds an image with QEMU's tools only: qemu-io writes (``write -P``
patterns at aligned and unaligned offsets, ``write -z``, ``write -z -u``, ``discard``),
compression by ``qemu-img convert -c`` (zlib, zstd), internal snapshots by
``qemu-img snapshot -c`` followed by more writes (so data clusters and L2 tables are
shared with the snapshot), backing chains three deep with relative names,
v2 (compat=0.10) images, preallocation=metadata/falloc/full, 512 B clusters.

Then, in order:
1. ours (read-only) reads exactly what ``qemu-img convert -O raw`` reads, with ``read``
   and ``readinto``; ours' ``map()`` equals ``qemu-img map --output=json``; every
   snapshot's content is recorded (``snapshot -a`` on a copy, then convert);
2. ours (read-write) applies targeted writes (partial clusters over compressed,
   snapshot-shared, zero, and backing-covered clusters) and seeded random writes,
   discards and write_zeroes, mirrored in a shadow bytearray;
3. ``qemu-img check`` is clean (exit 0), ``convert -O raw`` equals the shadow, ours' map
   equals qemu-img's again, the backing files did not change, and every snapshot still
   reverts to the content recorded in step 1.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import qcow2rw

from helpers import (MiB, Op, Shadow, apply_ops, assert_same_bytes, compare_map, describe,
                     make_raw_file, qemu_check_clean, qemu_create, qemu_io_run, qemu_raw,
                     random_ops, read_all, readinto_all, snapshot_content, snapshot_names)

# interop: needs qemu-img/qemu-io (the `qemu` fixture); a hang fails this test alone,
# well before the suite-wide timeout (each test normally takes a second or two)
pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]


def _zstd_available() -> bool:
    for mod in ("compression.zstd", "backports.zstd"):
        try:
            if importlib.util.find_spec(mod) is not None:
                return True
        except ModuleNotFoundError:
            pass
    return False


@dataclass
class Built:
    path: Path                              # the top image
    cluster_size: int
    v3: bool = True
    backing: Path | None = None             # the top image's backing file (whole chain below)
    backing_fmt: str = "qcow2"
    chain_files: list[tuple[Path, str]] = field(default_factory=list)   # every lower layer


def _patterns(rng: random.Random, size: int, cs: int, n: int) -> list[str]:
    """qemu-io ``write -P`` commands at aligned and unaligned offsets."""
    cmds = []
    for i in range(n):
        if i % 3 == 0:
            off = rng.randrange(size // cs) * cs
            length = cs * rng.randint(1, 3)
        else:
            off = rng.randrange(size - 1)
            length = rng.randint(1, 3 * cs)
        length = min(length, size - off)
        cmds.append(f"write -P {rng.randrange(1, 256):#x} {off} {length}")
    return cmds


def _zero_cmds(rng: random.Random, size: int, cs: int) -> list[str]:
    """write -z (aligned and not), write -z -u, and discard."""
    c1 = rng.randrange(2, size // cs - 8) * cs
    c2 = rng.randrange(2, size // cs - 8) * cs
    c3 = rng.randrange(2, size // cs - 8) * cs
    return [
        f"write -z {c1} {2 * cs}",                        # aligned zero write
        f"write -z {c2 + cs // 2 + 3} {cs + 100}",        # unaligned: partial clusters get zeros
        f"write -z -u {c3} {3 * cs}",                     # zero + unmap
        f"discard {rng.randrange(size // cs - 4) * cs} {2 * cs}",
        f"discard {rng.randrange(size // cs - 4) * cs + 512} {3 * cs}",
    ]


# ----------------------------------------------------------------------------- builders
def build_qemu_io(qemu, tmp: Path, rng: random.Random, *, cs: int = 65536, size: int = 8 * MiB,
                  compat: str = "1.1") -> Built:
    path = tmp / "img.qcow2"
    qemu_create(qemu, path, size, cluster_size=cs, compat=compat)
    cmds = _patterns(rng, size, cs, 14) + _zero_cmds(rng, size, cs) + _patterns(rng, size, cs, 4)
    qemu_io_run(qemu, path, *cmds)
    return Built(path, cs, v3=compat != "0.10")


def build_compressed(qemu, tmp: Path, rng: random.Random, *, ctype: str = "zlib",
                     cs: int = 65536, size: int = 8 * MiB, snapshot: bool = False) -> Built:
    src = tmp / "src.raw"
    make_raw_file(src, size, rng, compressible=True)
    path = tmp / "img.qcow2"
    qemu.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                  f"cluster_size={cs},compression_type={ctype}", str(src), str(path))
    src.unlink()
    info = qemu.info(str(path))
    assert info["format-specific"]["data"]["compression-type"] == ctype
    if snapshot:
        # compressed clusters shared with a snapshot, then partly overwritten by QEMU
        qemu.qemu_img("snapshot", "-c", "c1", str(path))
    # some normal clusters and a zero cluster next to the compressed ones
    qemu_io_run(qemu, path, *_patterns(rng, size, cs, 4), f"write -z {3 * cs} {cs}")
    return Built(path, cs)


def build_snapshots(qemu, tmp: Path, rng: random.Random, *, cs: int = 65536,
                    size: int = 8 * MiB, compat: str = "1.1") -> Built:
    path = tmp / "img.qcow2"
    qemu_create(qemu, path, size, cluster_size=cs, compat=compat)
    qemu_io_run(qemu, path, f"write -P 0x11 0 {size // 2}", *_patterns(rng, size, cs, 6))
    qemu.qemu_img("snapshot", "-c", "snap1", str(path))
    qemu_io_run(qemu, path, *_patterns(rng, size, cs, 6), f"write -z {cs * 5} {cs * 2}")
    qemu.qemu_img("snapshot", "-c", "snap2", str(path))
    # after snap2: a few more writes, so some clusters are shared by both snapshots and the
    # active layer, some by one snapshot only
    qemu_io_run(qemu, path, *_patterns(rng, size, cs, 4),
                *(_zero_cmds(rng, size, cs) if compat != "0.10" else []))
    return Built(path, cs, v3=compat != "0.10")


def build_chain_raw(qemu, tmp: Path, rng: random.Random) -> Built:
    """base.raw <- mid.qcow2 <- top.qcow2, relative names in different directories."""
    (tmp / "base").mkdir()
    (tmp / "top").mkdir()
    base = tmp / "base" / "base.raw"
    make_raw_file(base, 6 * MiB, rng)                     # shorter than the overlays
    mid = tmp / "mid.qcow2"
    qemu_create(qemu, mid, 7 * MiB, backing="base/base.raw", backing_fmt="raw",
                cluster_size=4096)
    qemu_io_run(qemu, mid, *_patterns(rng, 7 * MiB, 4096, 8), "write -z 8192 8192")
    top = tmp / "top" / "top.qcow2"
    qemu_create(qemu, top, 8 * MiB, backing="../mid.qcow2", backing_fmt="qcow2",
                cluster_size=65536)
    qemu_io_run(qemu, top, *_patterns(rng, 8 * MiB, 65536, 6), "write -z 1048576 65536")
    return Built(top, 65536, backing=mid, backing_fmt="qcow2",
                 chain_files=[(mid, "qcow2"), (base, "raw")])


def build_chain_with_snapshot(qemu, tmp: Path, rng: random.Random) -> Built:
    """The raw-based chain, with an internal snapshot in the top image and writes after it."""
    built = build_chain_raw(qemu, tmp, rng)
    qemu.qemu_img("snapshot", "-c", "top-snap", str(built.path))
    qemu_io_run(qemu, built.path, *_patterns(rng, 8 * MiB, 65536, 4), *_zero_cmds(rng, 8 * MiB, 65536))
    return built


def build_chain_qcow2(qemu, tmp: Path, rng: random.Random, *, compat: str = "1.1") -> Built:
    """base.qcow2 <- mid.qcow2 <- top.qcow2, all relative, different cluster sizes."""
    (tmp / "a" / "b").mkdir(parents=True)
    base = tmp / "a" / "b" / "base.qcow2"
    qemu_create(qemu, base, 8 * MiB, cluster_size=512, compat=compat)
    qemu_io_run(qemu, base, f"write -P 0x77 0 {4 * MiB}", *_patterns(rng, 8 * MiB, 512, 8))
    mid = tmp / "a" / "mid.qcow2"
    qemu_create(qemu, mid, 8 * MiB, backing="b/base.qcow2", backing_fmt="qcow2",
                cluster_size=65536, compat=compat)
    qemu_io_run(qemu, mid, *_patterns(rng, 8 * MiB, 65536, 6),
                *(["write -z 131072 65536"] if compat != "0.10" else []))
    top = tmp / "top.qcow2"
    qemu_create(qemu, top, 8 * MiB, backing="a/mid.qcow2", backing_fmt="qcow2",
                cluster_size=4096, compat=compat)
    qemu_io_run(qemu, top, *_patterns(rng, 8 * MiB, 4096, 8),
                *(["write -z -u 0 8192"] if compat != "0.10" else []))
    return Built(top, 4096, v3=compat != "0.10", backing=mid, backing_fmt="qcow2",
                 chain_files=[(mid, "qcow2"), (base, "qcow2")])


def build_v2_backing(qemu, tmp: Path, rng: random.Random) -> Built:
    base = tmp / "base.qcow2"
    qemu_create(qemu, base, 8 * MiB, compat="0.10")
    qemu_io_run(qemu, base, f"write -P 0x42 0 {8 * MiB}")
    path = tmp / "img.qcow2"
    qemu_create(qemu, path, 8 * MiB, backing="base.qcow2", backing_fmt="qcow2", compat="0.10",
                cluster_size=4096)
    qemu_io_run(qemu, path, *_patterns(rng, 8 * MiB, 4096, 10), "write -z 65536 12288")
    return Built(path, 4096, v3=False, backing=base, chain_files=[(base, "qcow2")])


def build_prealloc(qemu, tmp: Path, rng: random.Random, *, mode: str, cs: int = 65536,
                   size: int = 4 * MiB) -> Built:
    path = tmp / "img.qcow2"
    qemu_create(qemu, path, size, cluster_size=cs, preallocation=mode)
    qemu_io_run(qemu, path, *_patterns(rng, size, cs, 5), f"write -z {cs * 3} {cs}")
    return Built(path, cs)


SCENARIOS = {
    "qemu-io-64k": (lambda q, t, r: build_qemu_io(q, t, r), 201),
    "qemu-io-512": (lambda q, t, r: build_qemu_io(q, t, r, cs=512, size=2 * MiB), 202),
    "qemu-io-2M": (lambda q, t, r: build_qemu_io(q, t, r, cs=2 * MiB, size=32 * MiB), 203),
    "v2-qemu-io": (lambda q, t, r: build_qemu_io(q, t, r, compat="0.10"), 204),
    "v2-snapshots": (lambda q, t, r: build_snapshots(q, t, r, compat="0.10"), 205),
    "v2-backing": (build_v2_backing, 206),
    "compressed-zlib": (lambda q, t, r: build_compressed(q, t, r), 207),
    "compressed-zlib-4k-snapshot": (
        lambda q, t, r: build_compressed(q, t, r, cs=4096, size=2 * MiB, snapshot=True), 208),
    "compressed-zstd": (lambda q, t, r: build_compressed(q, t, r, ctype="zstd"), 209),
    "compressed-zstd-snapshot": (
        lambda q, t, r: build_compressed(q, t, r, ctype="zstd", snapshot=True), 210),
    "snapshots-64k": (lambda q, t, r: build_snapshots(q, t, r), 211),
    "snapshots-512": (lambda q, t, r: build_snapshots(q, t, r, cs=512, size=1 * MiB), 212),
    "chain-qcow2-qcow2-raw": (build_chain_raw, 213),
    "chain-qcow2-qcow2-qcow2": (build_chain_qcow2, 214),
    "chain-with-snapshot": (build_chain_with_snapshot, 220),
    "compressed-zlib-512": (
        lambda q, t, r: build_compressed(q, t, r, cs=512, size=1 * MiB, snapshot=True), 221),
    "v2-chain-qcow2-qcow2-qcow2": (lambda q, t, r: build_chain_qcow2(q, t, r, compat="0.10"), 215),
    "prealloc-metadata": (lambda q, t, r: build_prealloc(q, t, r, mode="metadata"), 216),
    "prealloc-metadata-512": (
        lambda q, t, r: build_prealloc(q, t, r, mode="metadata", cs=512, size=2 * MiB), 217),
    "prealloc-falloc": (lambda q, t, r: build_prealloc(q, t, r, mode="falloc"), 218),
    "prealloc-full": (lambda q, t, r: build_prealloc(q, t, r, mode="full"), 219),
}


def _targeted_ops(qmap: list[dict], cs: int, rng: random.Random) -> list[Op]:
    """Partial-cluster writes aimed at each kind of extent qemu-img map reports:
    compressed (data, no offset), zero, backing-covered (depth > 0) and allocated
    (shared with a snapshot when the image has snapshots); plus one zero write and one
    discard over such extents."""
    kinds: dict[str, list[dict]] = {"compressed": [], "zero": [], "backing": [], "allocated": []}
    for e in qmap:
        if e["depth"] > 0 and e["present"]:
            kinds["backing"].append(e)
        elif e["depth"] == 0 and e["data"] and "offset" not in e:
            kinds["compressed"].append(e)
        elif e["depth"] == 0 and e["zero"] and e["present"]:
            kinds["zero"].append(e)
        elif e["depth"] == 0 and e["data"]:
            kinds["allocated"].append(e)
    ops = []
    for kind, extents in kinds.items():
        for e in rng.sample(extents, min(3, len(extents))):
            # a cluster of the extent (extents split at host holes need not be aligned)
            first, last = e["start"] // cs, (e["start"] + e["length"] - 1) // cs
            c = rng.randint(first, last) * cs
            # head and tail preserved: a write strictly inside one cluster
            ops.append(Op("write", c + cs // 4, max(1, cs // 3), rng.randrange(1 << 30)))
            # crossing into the next cluster (if that is in the image, clipped later)
            ops.append(Op("write", c + cs - 7, 14, rng.randrange(1 << 30)))
            ops.append(Op("read", e["start"], min(e["length"], 4 * cs)))
        if extents and kind in ("compressed", "allocated", "backing"):
            e = extents[-1]
            ops.append(Op("zero", e["start"] + 1, min(e["length"], 2 * cs)))
            ops.append(Op("discard", e["start"], min(e["length"], 2 * cs)))
    return ops


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_qemu_to_ours(qemu, tmp_path, scenario):
    if "zstd" in scenario and not _zstd_available():
        pytest.skip("zstd support not installed (backports.zstd / compression.zstd)")
    builder, seed = SCENARIOS[scenario]
    rng = random.Random(seed)
    ctx = describe(seed, scenario=scenario)
    built = builder(qemu, tmp_path, rng)
    path, cs = built.path, built.cluster_size

    # ---- 1. ours reads what QEMU reads
    expected = qemu_raw(qemu, path, tmp_path)
    # ours' map and qemu-img's are taken back to back (see compare_map's docstring)
    with qcow2rw.open(str(path), readonly=True) as ro:
        ours_map = ro.map()
        qmap = qemu.map_json(str(path))
    compare_map(ours_map, qmap, f"{ctx} map of QEMU's image")
    snaps = snapshot_names(qemu, path)
    snap_content = {name: snapshot_content(qemu, path, name, tmp_path) for name in snaps}
    chain_before = {p: qemu_raw(qemu, p, tmp_path, fmt=f) for p, f in built.chain_files}
    chain_bytes_before = {p: p.read_bytes() for p, _ in built.chain_files}

    with qcow2rw.open(str(path), readonly=True) as ro:
        assert ro.size == len(expected), ctx
        assert ro.cluster_size == cs, ctx
        assert_same_bytes(read_all(ro), expected, f"{ctx} ours read() vs qemu-img convert",
                          cluster_size=cs)
        assert_same_bytes(readinto_all(ro), expected, f"{ctx} ours readinto() vs qemu-img convert",
                          cluster_size=cs)
        # unaligned reads straddling clusters
        for _ in range(20):
            off = rng.randrange(len(expected))
            n = min(rng.randint(1, 3 * cs), len(expected) - off)
            assert_same_bytes(ro.read(off, n), expected[off:off + n],
                              f"{ctx} ours read({off:#x}, {n:#x})", base=off, cluster_size=cs)

    # ---- 2. ours writes into it
    base = None
    if built.backing is not None:
        base = qemu_raw(qemu, built.backing, tmp_path, fmt=built.backing_fmt)
    shadow = Shadow(len(expected), cs, v3=built.v3, base=base)
    shadow.data[:] = expected
    ops = [op for op in _targeted_ops(qmap, cs, rng)
           if op.off < len(expected)]
    ops = [Op(op.kind, op.off, min(op.length, len(expected) - op.off), op.seed) for op in ops
           if op.length > 0]
    ops += random_ops(rng, len(expected), cs, 40 if cs < 2 * MiB else 15)
    with qcow2rw.open(str(path)) as rw:
        apply_ops(rw, shadow, ops, ctx)
        assert_same_bytes(read_all(rw), shadow.data, f"{ctx} ours after our writes",
                          cluster_size=cs)

    # ---- 3. QEMU judges
    qemu_check_clean(qemu, path, f"{ctx} after our writes")
    assert_same_bytes(qemu_raw(qemu, path, tmp_path), shadow.data,
                      f"{ctx} qemu-img convert after our writes vs shadow", cluster_size=cs)
    with qcow2rw.open(str(path), readonly=True) as ro:
        ours_map = ro.map()
        compare_map(ours_map, qemu.map_json(str(path)), f"{ctx} map after our writes")
    for p, fmt in built.chain_files:
        assert p.read_bytes() == chain_bytes_before[p], f"{ctx}: backing file {p.name} modified"
        assert qemu_raw(qemu, p, tmp_path, fmt=fmt) == chain_before[p], ctx
    assert snapshot_names(qemu, path) == snaps, f"{ctx}: snapshot list changed"
    for name, content in snap_content.items():
        assert_same_bytes(snapshot_content(qemu, path, name, tmp_path), content,
                          f"{ctx} snapshot {name!r} reverted after our writes", cluster_size=cs)


def test_zstd_without_support_is_refused_or_read(qemu, tmp_path):
    """A zstd image opens; reading a compressed cluster either works (zstd installed) or
    raises UnsupportedFeature, never a bare exception from inside."""
    rng = random.Random(299)
    built = build_compressed(qemu, tmp_path, rng, ctype="zstd", size=1 * MiB)
    expected = qemu_raw(qemu, built.path, tmp_path)
    try:
        with qcow2rw.open(str(built.path), readonly=True) as ro:
            got = read_all(ro)
    except qcow2rw.UnsupportedFeature:
        assert not _zstd_available(), "zstd is installed but the image was refused"
        return
    assert_same_bytes(got, expected, "[seed=299] zstd image", cluster_size=built.cluster_size)


def test_write_over_compressed_cluster_decompresses(qemu, tmp_path):
    """A 1-byte write into a compressed cluster keeps the other bytes of the cluster and
    turns the cluster into a normal one (map shows a host offset there)."""
    rng = random.Random(298)
    path = tmp_path / "c.qcow2"
    src = tmp_path / "src.raw"
    src.write_bytes((b"qcow2rw compressible text " * 50000)[:1 * MiB])
    qemu.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(src), str(path))
    expected = bytearray(src.read_bytes())
    qmap = qemu.map_json(str(path))
    assert qmap[0]["data"] and "offset" not in qmap[0], f"not compressed? {qmap}"
    with qcow2rw.open(str(path)) as rw:
        off = 65536 + rng.randrange(65536)
        rw.write(off, b"!")
        expected[off] = ord("!")
    qemu_check_clean(qemu, path, "[seed=298] write over compressed")
    assert_same_bytes(qemu_raw(qemu, path, tmp_path), expected, "[seed=298] write over compressed",
                      cluster_size=65536)
    covering = [e for e in qemu.map_json(str(path)) if e["start"] <= off < e["start"] + e["length"]]
    assert covering and "offset" in covering[0], f"cluster still compressed: {covering}"
