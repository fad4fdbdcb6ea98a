"""``measure``: qcow2rw's figures next to ``qemu-img measure``'s (qemu-img 7.2).

* The arithmetic (``--size N``) on a matrix of sizes, cluster sizes, refcount widths,
  compat levels, extended L2 and preallocation modes: the API's dict equals qemu-img's
  JSON, or both refuse (same message).
* Sources: a raw file with holes and data; qcow2 images with data, zero, unallocated
  and compressed clusters, a backing chain (qcow2 and raw backing, a shorter backing
  file), metadata preallocation (data clusters over host holes), persistent bitmaps;
  measured into qcow2 of 512 B, 64 KiB and 2 MiB clusters, into raw, and with a
  backing file for the target.
* The command line (``python -m qcow2rw measure``): the same stdout as qemu-img for
  human and JSON output, and one error line with qemu-img's words for bad arguments.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import qcow2rw
from qcow2rw.errors import FormatError, Qcow2Error, UnsupportedFeature
from qcow2rw.measure import (
    bitmaps_size,
    data_clusters_bytes,
    fully_allocated_size,
    measure,
    refcount_metadata_clusters,
)

SOURCE_ROOT = str(Path(qcow2rw.__file__).resolve().parent.parent)
KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

interop = pytest.mark.interop


# --------------------------------------------------------------------------------------
# helpers


def qemu_measure(qemu: Any, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([qemu.QEMU_IMG, "measure", *args], check=False, cwd=cwd,
                          capture_output=True,
                          text=True, timeout=60)


def qemu_json(qemu: Any, *args: str, cwd: Path | None = None) -> dict[str, int]:
    proc = qemu_measure(qemu, "--output=json", *args, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def qemu_error(proc: subprocess.CompletedProcess[str]) -> str:
    """qemu-img's first error line, without the ``qemu-img: `` prefix."""
    assert proc.returncode != 0, proc.stdout
    return proc.stderr.splitlines()[0].removeprefix("qemu-img: ")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SOURCE_ROOT, env.get("PYTHONPATH")]))
    env.pop("QCOW2RW_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "qcow2rw", "measure", *args], check=False,
                          cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def opt_text(opts: dict[str, Any]) -> list[str]:
    return ["-o", ",".join(f"{k}={v}" for k, v in opts.items())] if opts else []


def qemu_io(qemu: Any, path: Path, *commands: str, fmt: str = "qcow2") -> None:
    args = ["-f", fmt]
    for command in commands:
        args += ["-c", command]
    proc = qemu.run(qemu.QEMU_IO, *args, str(path), check=True)
    assert "failed" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr


def create(qemu: Any, path: Path, size: int, *opts: str) -> None:
    qemu.qemu_img("create", "-q", "-f", "qcow2", *opts, str(path), str(size))


# --------------------------------------------------------------------------------------
# the arithmetic alone (no qemu-img)


def test_refcount_fixed_point_counts_itself():
    # 3 clusters (header, table, block) fit one block and one table cluster.
    assert refcount_metadata_clusters(1, 65536, 4) == 2
    # refcount_bits=1 at 512 B: 4096 entries per block, 64 blocks per table cluster.
    # The result is a fixed point: the blocks and table that count everything,
    # themselves included, need no more.
    for clusters in (1, 4093, 4094, 100_000, 262_143, 10**7):
        n = refcount_metadata_clusters(clusters, 512, 0)
        blocks = -(-(clusters + n) // 4096)
        assert blocks + -(-blocks // 64) == n, clusters


def test_empty_image_is_header_table_block():
    assert fully_allocated_size(0, 65536, 4) == 3 * 65536
    assert fully_allocated_size(0, 512, 6) == 3 * 512


def test_data_clusters_counts_each_touched_cluster_once():
    cs = 4096
    assert data_clusters_bytes([], cs) == 0
    assert data_clusters_bytes([(0, 1)], cs) == cs
    assert data_clusters_bytes([(100, 10), (200, 10), (cs - 1, 2)], cs) == 2 * cs
    assert data_clusters_bytes([(cs, 3 * cs)], cs) == 3 * cs
    assert data_clusters_bytes([(cs - 1, 1), (cs, 0), (5 * cs + 7, 1)], cs) == 2 * cs


def test_bitmaps_size():
    # 10 MiB, granularity 64 KiB: 160 bits -> one cluster + one table cluster; the
    # directory (32 bytes) one more cluster.
    assert bitmaps_size([("bm0", 65536)], 10 * MiB, 65536) == 3 * 65536
    assert bitmaps_size([], 10 * MiB, 65536) == 0


def test_api_argument_errors(tmp_path):
    with pytest.raises(Qcow2Error, match="Either --size N or one filename"):
        measure()
    raw = tmp_path / "a.raw"
    raw.write_bytes(b"x" * 512)
    with pytest.raises(Qcow2Error, match="cannot be used together with a filename"):
        measure(512, raw)
    with pytest.raises(Qcow2Error, match="require a filename"):
        measure(512, src_format="raw")
    with pytest.raises(Qcow2Error, match="Invalid image size"):
        measure(-1)
    with pytest.raises(FileNotFoundError):
        measure(src=tmp_path / "missing")
    with pytest.raises(UnsupportedFeature, match="Unknown file format 'foo'"):
        measure(GiB, out_format="foo")
    with pytest.raises(UnsupportedFeature):
        measure(GiB, out_format="vmdk")
    with pytest.raises(UnsupportedFeature, match="does not support temporarily loading"):
        measure(src=raw, snapshot="s1")
    with pytest.raises(UnsupportedFeature, match="LUKS"):
        measure(GiB, options={"encrypt.format": "luks"})


@pytest.mark.parametrize("options, message", [
    ({"foo": "1"}, "Invalid parameter 'foo'"),
    ({"cluster_size": "abc"}, "Parameter 'cluster_size' expects a non-negative number"),
    ({"cluster_size": 3000}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"cluster_size": "4M"}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"compat": "v3"}, "Invalid compatibility level: 'v3'"),
    ({"refcount_bits": "abc"}, "Parameter 'refcount_bits' expects a number"),
    ({"refcount_bits": 3}, "Refcount width must be a power of two"),
    ({"refcount_bits": 128}, "Refcount width must be a power of two"),
    ({"refcount_bits": 0}, "Refcount width must be a power of two"),
    ({"compat": "0.10", "refcount_bits": 8}, "Different refcount widths than 16 bits"),
    ({"lazy_refcounts": "maybe"}, "Parameter 'lazy_refcounts' expects 'on' or 'off'"),
    ({"preallocation": "bad"}, "invalid parameter value: bad"),
    ({"extended_l2": "on", "cluster_size": "4k"}, "Extended L2 entries are only supported"),
])
def test_api_bad_options(options, message):
    with pytest.raises(FormatError, match=message.replace("(", r"\(")):
        measure(GiB, options=options)


def test_api_option_forms_agree():
    want = measure(GiB, options={"cluster_size": 512, "refcount_bits": 64})
    assert measure(GiB, options="cluster_size=512,refcount_bits=64") == want
    assert measure(GiB, options=[("cluster_size", "4k"), ("cluster_size", "512"),
                                 ("refcount_bits", "0x40")]) == want
    assert measure(GiB, options={"cluster_size": "0.5k", "refcount_bits": "0100"}) == want


# --------------------------------------------------------------------------------------
# --size: the matrix, side by side with qemu-img

SIZES = (0, 1, 512, MiB, GiB + 1, 64 * GiB, TiB)
CLUSTERS = (512, 64 * KiB, 2 * MiB)
REFCOUNT_BITS = (1, 16, 64)


def _side_by_side(qemu: Any, size: int, opts: dict[str, Any], out_format: str = "qcow2") -> None:
    proc = qemu_measure(qemu, "--output=json", "-O", out_format, *opt_text(opts),
                        "--size", str(size))
    ctx = f"size={size} -O {out_format} {opts}"
    if proc.returncode != 0:
        with pytest.raises(Qcow2Error) as info:
            measure(size, out_format=out_format, options=opts)
        assert qemu_error(proc) in str(info.value), ctx
        return
    assert measure(size, out_format=out_format, options=opts) == json.loads(proc.stdout), ctx


@interop
@pytest.mark.parametrize("cluster_size", CLUSTERS)
def test_size_matrix(qemu, cluster_size):
    for size in SIZES:
        for bits in REFCOUNT_BITS:
            _side_by_side(qemu, size, {"cluster_size": cluster_size, "refcount_bits": bits})


@interop
@pytest.mark.parametrize("opts", [
    {"preallocation": "off"}, {"preallocation": "metadata"}, {"preallocation": "falloc"},
    {"preallocation": "full"}, {"compat": "0.10"}, {"compat": "1.1", "lazy_refcounts": "on"},
    {"extended_l2": "on"}, {"extended_l2": "on", "cluster_size": "16k"},
    {"extended_l2": "on", "cluster_size": "2M", "preallocation": "full"},
    {"backing_file": "base.qcow2"}, {"cluster_size": "2M", "refcount_bits": 1,
                                     "preallocation": "metadata"},
    {"cluster_size": 512, "preallocation": "full", "refcount_bits": 64},
    {"nocow": "on", "extent_size_hint": "1M", "compression_type": "zlib",
     "data_file": "x.data", "encryption": "off"},
])
def test_size_options(qemu, opts):
    for size in (0, 512, 7 * MiB + 512, GiB + 1, 64 * GiB, TiB, 3 * TiB):
        _side_by_side(qemu, size, opts)


@interop
def test_size_raw_target(qemu):
    for size in (0, 1, 512, 1000, MiB, GiB + 1, TiB):
        _side_by_side(qemu, size, {}, "raw")
        _side_by_side(qemu, size, {"preallocation": "full"}, "raw")


@interop
def test_size_limits(qemu):
    # The largest sizes each cluster size allows (QEMU's 32 MiB L1 limit), and past them.
    for cs in (512, 4096, 64 * KiB, 2 * MiB):
        limit = (32 * MiB // 8) * (cs // 8) * cs
        if limit < 1 << 63:
            for size in (limit - cs, limit, limit + 1):
                _side_by_side(qemu, size, {"cluster_size": cs})
    _side_by_side(qemu, (1 << 63) - 1, {"cluster_size": "2M"})


# --------------------------------------------------------------------------------------
# sources


@pytest.fixture(scope="module")
def sources(tmp_path_factory, qemu) -> dict[str, Path]:
    """Source images, each made by qemu-img/qemu-io."""
    d = tmp_path_factory.mktemp("measure-src")
    rng = random.Random(14)
    out: dict[str, Path] = {}

    raw = d / "holes.raw"  # data, holes, a zero-filled (allocated) run, an odd tail
    with open(raw, "wb") as f:
        f.truncate(9 * MiB + 333)
        for offset, length in ((0, 4096), (100 * KiB, 3 * KiB), (MiB + 7, 70 * KiB),
                               (5 * MiB, 2 * MiB + 5), (9 * MiB + 300, 33)):
            f.seek(offset)
            f.write(rng.randbytes(length))
        f.seek(3 * MiB)
        f.write(bytes(256 * KiB))
    out["raw"] = raw
    empty_raw = d / "empty.raw"
    empty_raw.write_bytes(b"")
    out["empty_raw"] = empty_raw
    tiny = d / "tiny.raw"
    tiny.write_bytes(b"abc")
    out["tiny_raw"] = tiny

    mixed = d / "mixed.qcow2"  # data, zero, unallocated, compressed, discarded
    create(qemu, mixed, 20 * MiB, "-o", "cluster_size=64k")
    qemu_io(qemu, mixed, "write -P 1 0 100k", "write -z 1M 1M", "write -P 2 3M 4k",
            "write -c -P 3 4M 64k", "write -P 4 6M 2M", "discard 7M 512k",
            "write -z -u 10M 64k", "write -P 5 19M 1M")
    out["mixed"] = mixed

    small = d / "small512.qcow2"  # 512-byte clusters, not a multiple of 64 KiB
    create(qemu, small, 3 * MiB + 1536, "-o", "cluster_size=512,refcount_bits=1")
    qemu_io(qemu, small, "write -P 7 512 512", "write -P 8 1M 3k", "write -z 2M 512")
    out["small512"] = small

    base = d / "base.qcow2"
    create(qemu, base, 16 * MiB)
    qemu_io(qemu, base, "write -P 1 0 2M", "write -P 2 8M 64k", "write -P 3 12M 4k")
    top = d / "top.qcow2"
    create(qemu, top, 24 * MiB, "-b", "base.qcow2", "-F", "qcow2")
    qemu_io(qemu, top, "write -P 9 1M 128k", "write -z 8M 64k", "write -P 9 20M 64k")
    out["chain"] = top

    rawbase = d / "rawbase.raw"
    with open(rawbase, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(rng.randbytes(200 * KiB))
    over_raw = d / "over_raw.qcow2"
    create(qemu, over_raw, 6 * MiB, "-b", "rawbase.raw", "-F", "raw")
    qemu_io(qemu, over_raw, "write -P 4 3M 64k")
    out["raw_backing"] = over_raw

    meta = d / "meta.qcow2"  # data clusters over host holes read as zero
    create(qemu, meta, 32 * MiB, "-o", "preallocation=metadata")
    qemu_io(qemu, meta, "write -P 6 4M 256k")
    out["prealloc_metadata"] = meta

    for mode in ("falloc", "full"):
        path = d / f"{mode}.qcow2"
        create(qemu, path, 8 * MiB, "-o", f"preallocation={mode}")
        qemu_io(qemu, path, "write -P 6 1M 64k", "write -z 2M 64k")
        out[f"prealloc_{mode}"] = path

    bm = d / "bitmaps.qcow2"
    create(qemu, bm, 50 * MiB)
    qemu_io(qemu, bm, "write -P 1 0 1M")
    qemu.qemu_img("bitmap", "--add", str(bm), "b0")
    qemu.qemu_img("bitmap", "--add", "-g", "512", str(bm), "a-much-longer-bitmap-name")
    out["bitmaps"] = bm

    v2 = d / "v2.qcow2"
    create(qemu, v2, 5 * MiB, "-o", "compat=0.10")
    qemu_io(qemu, v2, "write -P 1 64k 64k")
    out["v2"] = v2

    snap = d / "snap.qcow2"  # snapshot s1 (id 1), then changes and a grow, over a backing
    create(qemu, snap, 10 * MiB, "-b", "base.qcow2", "-F", "qcow2")
    qemu_io(qemu, snap, "write -P 1 0 3M", "write -z 9M 1M", "write -c -P 5 4M 64k")
    qemu.qemu_img("snapshot", "-c", "s1", str(snap))
    qemu_io(qemu, snap, "write -P 2 6M 2M", "discard 0 1M")
    qemu.qemu_img("snapshot", "-c", "1x", str(snap))
    qemu_io(qemu, snap, "write -P 3 5M 64k")
    qemu.qemu_img("resize", "-q", str(snap), "30M")
    qemu.qemu_img("bitmap", "--add", str(snap), "bm")
    out["snap"] = snap
    return out


TARGETS = [
    ("qcow2", {}), ("qcow2", {"cluster_size": 512}), ("qcow2", {"cluster_size": "2M"}),
    ("qcow2", {"cluster_size": "4k", "refcount_bits": 1}), ("qcow2", {"refcount_bits": 64}),
    ("qcow2", {"compat": "0.10"}), ("qcow2", {"backing_file": "whatever.qcow2"}),
    ("qcow2", {"preallocation": "falloc"}), ("qcow2", {"preallocation": "metadata"}),
    ("qcow2", {"extended_l2": "on", "cluster_size": "32k"}), ("raw", {}),
]


@interop
@pytest.mark.parametrize("name", ["raw", "empty_raw", "tiny_raw", "mixed", "small512", "chain",
                                  "raw_backing", "prealloc_metadata", "prealloc_falloc",
                                  "prealloc_full", "bitmaps", "v2"])
def test_sources(qemu, sources, name):
    src = sources[name]
    fmt = "raw" if name.endswith("raw") and name != "raw_backing" else "qcow2"
    for out_format, opts in TARGETS:
        want = qemu_json(qemu, "-f", fmt, "-O", out_format, *opt_text(opts), str(src))
        got = measure(src=src, src_format=fmt, out_format=out_format, options=opts)
        assert got == want, f"{name} -O {out_format} {opts}"
        assert list(got) == list(want), "JSON key order"
    # probed format, -U
    assert measure(src=src, out_format="qcow2", force_share=True) == \
        qemu_json(qemu, "-U", "-O", "qcow2", str(src))


@interop
@pytest.mark.parametrize("snapshot", ["s1", "1", "1x", "2"])
def test_snapshot_source(qemu, sources, snapshot):
    src = sources["snap"]
    for out_format, opts in TARGETS:
        want = qemu_json(qemu, "-O", out_format, *opt_text(opts), "-l", snapshot, str(src))
        assert measure(src=src, out_format=out_format, options=opts, snapshot=snapshot) == want
    with pytest.raises(Qcow2Error, match="Can't find snapshot"):
        measure(src=src, snapshot="nope")


@interop
def test_source_size_option_checked(qemu, sources):
    # -o size= with a source is not the size measured, but QEMU still checks it.
    src = sources["mixed"]
    for opts in ({"size": "1G"}, {"size": "1T", "cluster_size": 512}):
        proc = qemu_measure(qemu, "--output=json", "-O", "qcow2", *opt_text(opts), str(src))
        if proc.returncode:
            with pytest.raises(FormatError) as info:
                measure(src=src, options=opts)
            assert qemu_error(proc) in str(info.value)
        else:
            assert measure(src=src, options=opts) == json.loads(proc.stdout)


# --------------------------------------------------------------------------------------
# the command line, side by side (stdout byte for byte; errors: one line)


CLI_CASES = [
    ["--size", "1G"],
    ["-O", "qcow2", "--size", "1G"],
    ["-O", "qcow2", "--size", "1G", "--output=json"],
    ["-O", "qcow2", "--output", "json", "--size", "1.5G", "-o", "cluster_size=512",
     "-o", "refcount_bits=1,preallocation=full"],
    ["-O", "qcow2", "-o", "cluster_size=4k,cluster_size=2M", "--size", "64G"],
    ["-O", "raw", "--size", "1000"],
    ["-O", "qcow2", "SRC:mixed"],
    ["-O", "qcow2", "--output=json", "SRC:mixed"],
    ["-O", "qcow2", "-f", "qcow2", "SRC:bitmaps"],
    ["-O", "qcow2", "--output=json", "SRC:bitmaps"],
    ["-O", "qcow2", "-o", "compat=0.10", "SRC:bitmaps"],
    ["-O", "qcow2", "-U", "SRC:chain"],
    ["-O", "raw", "SRC:chain"],
    ["-O", "qcow2", "-o", "cluster_size=2M", "-f", "raw", "SRC:raw"],
    ["SRC:raw"],
    ["-O", "qcow2", "-l", "s1", "SRC:snap"],
    ["-O", "qcow2", "-l", "snapshot.name=s1", "--output=json", "SRC:snap"],
    ["-O", "qcow2", "-l", "snapshot.id=1", "-o", "cluster_size=2M", "SRC:snap"],
]

CLI_ERRORS = [
    ["-O", "qcow2", "-o", "foo=1", "--size", "1G"],
    ["-O", "raw", "-o", "cluster_size=4k", "--size", "1G"],
    ["-O", "qcow2", "-o", "cluster_size=abc", "--size", "1G"],
    ["-O", "qcow2", "-o", "cluster_size", "--size", "1G"],
    ["-O", "qcow2", "-o", "compat=v3", "--size", "1G"],
    ["-O", "qcow2", "-o", "refcount_bits=3", "--size", "1G"],
    ["-O", "qcow2", "-o", "preallocation=bad", "--size", "1G"],
    ["-O", "qcow2", "-o", "cluster_size=512", "--size", "1T"],
    ["-O", "qcow2", "--size", "-1"],
    ["-O", "qcow2", "--size", "1Q"],
    ["-O", "qcow2"],
    ["-O", "foo", "--size", "1G"],
    ["--output=xml", "--size", "1G"],
    ["--size", "1G", "SRC:raw"],
    ["SRC:raw", "SRC:mixed"],
    ["-f", "raw"],
    ["nonexistent.img"],
    ["-O", "qcow2", "-l", "nope", "SRC:snap"],
    ["-O", "qcow2", "-l", "snapshot.foo=x", "SRC:snap"],
    ["-O", "qcow2", "-l", "s1", "-f", "raw", "SRC:raw"],
    ["-l", "s1"],
]


def _cli_args(args: list[str], sources: dict[str, Path]) -> list[str]:
    return [str(sources[a[4:]]) if a.startswith("SRC:") else a for a in args]


@interop
@pytest.mark.parametrize("args", CLI_CASES, ids=" ".join)
def test_cli_same_stdout(qemu, sources, tmp_path, args):
    args = _cli_args(args, sources)
    theirs = qemu_measure(qemu, *args, cwd=tmp_path)
    assert theirs.returncode == 0, theirs.stderr
    ours = run_cli(*args, cwd=tmp_path)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == theirs.stdout


@interop
@pytest.mark.parametrize("args", CLI_ERRORS, ids=" ".join)
def test_cli_errors(qemu, sources, tmp_path, args):
    args = _cli_args(args, sources)
    theirs = qemu_measure(qemu, *args, cwd=tmp_path)
    ours = run_cli(*args, cwd=tmp_path)
    assert ours.returncode != 0 and ours.stdout == "", ours
    lines = ours.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcow2rw: "), ours.stderr
    want = qemu_error(theirs)
    if "Could not open" in want:  # qemu-img repeats "Could not open 'X': " twice
        want = want.split(": ", 1)[1]
    got = lines[0].removeprefix("qcow2rw: ")
    assert want in got, (want, got)
