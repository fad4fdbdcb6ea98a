"""``qcow2rw.convert`` and ``qcow2rw convert``, checked with qemu-img 7.2 and qemu-io.

Every qcow2 target must pass ``qemu-img check`` with 0 errors and 0 leaks and read the
same as its source (``qemu-img compare``); where qemu-img can make the same target
(same source, same options), the two allocation maps must be the same too (extents,
not host offsets).  The sources: MIXED (holes, random and text-like data, written
zeros, 4 KiB zero runs inside data, an odd size), a raw <- qcow2 <- qcow2 chain, a
qcow2 image with an internal snapshot, and images qemu-img compressed.

``-c``: zlib and zstd, cluster sizes 512 B to 2 MiB, refcount_bits 1 to 64; the same
clusters compressed as qemu-img's (``check``'s compressed figure), output size within
1 % of qemu-img's, with zlib (when this Python's deflate is QEMU's) byte for byte
qemu-img's output, two runs byte-identical, incompressible clusters stored plain,
QEMU reads what we compress and we read what QEMU compresses; SIGKILL at random
points leaves leaks at most.  The CLI: qemu-img's one-line errors, ``-p`` a bar on a
terminal and silent when piped, ``-U``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import qcow2rw
from qcow2rw.compress import compress_cluster
from qcow2rw.errors import Qcow2Error
from qcow2rw.format import COMPRESSED, decode_compressed
from tests.test_cli import SOURCE_ROOT, run_cli

KiB = 1024
MiB = 1 << 20
pytestmark = pytest.mark.interop
TEXT = (b"qcow2 clusters refcount snapshot backing compressed descriptor sector table "
        b"guest host image format zlib zstd l1 l2 offset length").split()


# --------------------------------------------------------------------------- helpers
def img(qemu: Any, cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([qemu.QEMU_IMG, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    if check:
        assert proc.returncode == 0, f"qemu-img {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return proc


def io(qemu: Any, cwd: Path, path: str, *commands: str, fmt: str = "qcow2") -> str:
    args = [qemu.QEMU_IO, "-f", fmt]
    for command in commands:
        args += ["-c", command]
    proc = subprocess.run([*args, path], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "failed" not in proc.stdout + proc.stderr, proc
    return proc.stdout


def check_clean(qemu: Any, cwd: Path, path: str) -> dict[str, Any]:
    proc = img(qemu, cwd, "check", "--output=json", path, check=False)
    assert proc.returncode == 0, f"check {path}: {proc.stdout}{proc.stderr}"
    data = json.loads(proc.stdout)
    assert data.get("check-errors", 0) == 0 and data.get("leaks", 0) == 0, data
    return data


def identical(qemu: Any, cwd: Path, a: str, b: str, *fmts: str) -> None:
    proc = img(qemu, cwd, "compare", *fmts, a, b, check=False)
    assert proc.returncode == 0 and "Images are identical." in proc.stdout, \
        f"compare {a} {b}: {proc.stdout}{proc.stderr}"


def extents(qemu: Any, cwd: Path, path: str, fmt: str = "qcow2") -> list[tuple[Any, ...]]:
    """The map without host offsets (whether an extent has one is kept)."""
    out = json.loads(img(qemu, cwd, "map", "-f", fmt, "--output=json", path).stdout)
    return [(e["start"], e["length"], e["depth"], e["present"], e["zero"], e["data"],
             "offset" in e) for e in out]


def layout(qemu: Any, cwd: Path, path: str, fmt: str = "qcow2") -> list[tuple[Any, ...]]:
    """The map as guest runs of (start, length, depth, kind): D data cluster (QEMU's
    target may hold written zeros where ours has a host-file hole: both are data
    clusters), Z zero cluster, U unallocated; adjacent runs of one kind merged."""
    runs: list[list[Any]] = []
    for start, length, depth, present, zero, data, _ in extents(qemu, cwd, path, fmt):
        kind = "D" if data else ("Z" if present else "U")
        if runs and runs[-1][2] == depth and runs[-1][3] == kind:
            runs[-1][1] += length
        else:
            runs.append([start, length, depth, kind])
    return [tuple(r) for r in runs]


def ours(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = run_cli("convert", *args, cwd=cwd)
    assert proc.returncode == 0, f"convert {' '.join(args)}: {proc.stdout}{proc.stderr}"
    assert proc.stdout == "" and proc.stderr == "", proc
    return proc


def text_bytes(rng: random.Random, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choices(TEXT, k=32)) + b"\n"
    return bytes(out[:n])


def make_mixed(path: Path, size: int, seed: int) -> None:
    """Holes, random, text-like, written zeros, small zero runs in data, in 256 KiB blocks."""
    rng = random.Random(seed)
    block = 256 * KiB
    with open(path, "wb") as f:
        f.truncate(size)
        for pos in range(0, size, block):
            n = min(block, size - pos)
            kind = rng.choice(("hole", "random", "text", "zero", "speckled", "text"))
            if kind == "hole":
                continue
            if kind == "random":
                data = rng.randbytes(n)
            elif kind == "zero":
                data = bytes(n)
            else:
                data = bytearray(text_bytes(rng, n))
                if kind == "speckled":  # zero runs of 512 B .. 16 KiB, some aligned
                    for _ in range(8):
                        start = rng.randrange(0, n) & ~511 if rng.random() < 0.7 \
                            else rng.randrange(0, n)
                        length = rng.choice((512, 1000, 4096, 8192, 16384))
                        data[start:start + length] = bytes(len(data[start:start + length]))
                data = bytes(data)
            f.seek(pos)
            f.write(data)


# --------------------------------------------------------------------------- sources
@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory, qemu: Any) -> Path:
    d = tmp_path_factory.mktemp("convert")
    make_mixed(d / "mixed.raw", 8 * MiB, 14)
    make_mixed(d / "odd.raw", 5 * MiB + 1000, 15)  # not a multiple of a cluster or sector
    # base.raw (3 MiB) <- mid.qcow2 (4 MiB) <- top.qcow2 (6 MiB, 4 KiB clusters)
    rng = random.Random(16)
    base = bytearray(3 * MiB)
    base[:MiB] = rng.randbytes(MiB)
    base[2 * MiB:2 * MiB + 300 * KiB] = text_bytes(rng, 300 * KiB)
    (d / "base.raw").write_bytes(bytes(base))
    img(qemu, d, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "mid.qcow2", "4M")
    io(qemu, d, "mid.qcow2", "write -P 0x11 512k 64k", "write -z 0 64k",
       "write -P 0x22 3584k 128k")
    img(qemu, d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "mid.qcow2",
        "-F", "qcow2", "top.qcow2", "6M")
    io(qemu, d, "top.qcow2", "write -P 0x33 100k 8k", "write -z 2M 64k",
       "write -P 0x44 4100k 4k", "write -z 700k 8k", "write -P 0 5M 64k")
    # A qcow2 image with an internal snapshot, overwritten since.
    img(qemu, d, "convert", "-f", "raw", "-O", "qcow2", "mixed.raw", "snap.qcow2")
    img(qemu, d, "snapshot", "-c", "s1", "snap.qcow2")
    io(qemu, d, "snap.qcow2", "write -P 0x77 0 1M", "write -z 4M 2M", "discard 6M 1M")
    # What qemu-img compresses (zlib, and zstd with 4 KiB clusters).
    img(qemu, d, "convert", "-f", "raw", "-c", "-O", "qcow2", "mixed.raw", "qc.qcow2")
    img(qemu, d, "convert", "-f", "raw", "-c", "-O", "qcow2", "-o",
        "compression_type=zstd,cluster_size=4096", "mixed.raw", "qz.qcow2")
    return d


def both(qemu: Any, d: Path, name: str, *args: str, src: str, fmt: str = "qcow2") -> None:
    """The same conversion by qemu-img (q-NAME) and by us (o-NAME): same map, clean."""
    img(qemu, d, "convert", *args, src, f"q-{name}")
    ours(*args, src, f"o-{name}", cwd=d)
    if fmt == "qcow2":
        check_clean(qemu, d, f"o-{name}")
    assert layout(qemu, d, f"o-{name}", fmt) == layout(qemu, d, f"q-{name}", fmt), name


# --------------------------------------------------------------------------- plain
def test_raw_to_qcow2_same_map_as_qemu_img(qemu: Any, zoo: Path) -> None:
    both(qemu, zoo, "mixed.qcow2", "-f", "raw", "-O", "qcow2", src="mixed.raw")
    identical(qemu, zoo, "mixed.raw", "o-mixed.qcow2", "-f", "raw", "-F", "qcow2")


def test_qcow2_to_raw_is_sparse(qemu: Any, zoo: Path) -> None:
    both(qemu, zoo, "top.raw", "-O", "raw", src="top.qcow2", fmt="raw")
    assert (zoo / "o-top.raw").read_bytes() == (zoo / "q-top.raw").read_bytes()
    identical(qemu, zoo, "top.qcow2", "o-top.raw")
    st = os.stat(zoo / "o-top.raw")
    assert st.st_size == 6 * MiB and st.st_blocks * 512 < 4 * MiB  # holes for the zeros


def test_chain_is_flattened(qemu: Any, zoo: Path) -> None:
    both(qemu, zoo, "flat.qcow2", "-O", "qcow2", src="top.qcow2")
    identical(qemu, zoo, "top.qcow2", "o-flat.qcow2")
    info = json.loads(img(qemu, zoo, "info", "--output=json", "o-flat.qcow2").stdout)
    assert "backing-filename" not in info and info["virtual-size"] == 6 * MiB


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_backing_file_keeps_what_the_backing_file_holds(qemu: Any, zoo: Path,
                                                        compat: str) -> None:
    # Only top.qcow2's own clusters are copied; the rest shows mid.qcow2 through.
    name = f"ovl{compat}.qcow2"
    both(qemu, zoo, name, "-O", "qcow2", "-o", f"compat={compat}", "-B", "mid.qcow2",
         "-F", "qcow2", src="top.qcow2")
    identical(qemu, zoo, "top.qcow2", f"o-{name}")
    ext = extents(qemu, zoo, f"o-{name}")
    assert any(e[2] > 0 for e in ext)  # unallocated here: read from the backing chain
    own = [e for e in ext if e[2] == 0 and e[5]]
    assert sum(e[1] for e in own) <= 6 * 64 * KiB  # top's few writes, not the chain's data
    if compat == "1.1":
        assert any(e[2] == 0 and e[4] and not e[5] for e in ext)  # zeros: zero clusters


@pytest.mark.parametrize("sparse", ["0", "4k", "64k"])
def test_sparse_size(qemu: Any, zoo: Path, sparse: str) -> None:
    both(qemu, zoo, f"s{sparse}.qcow2", "-f", "raw", "-O", "qcow2", "-S", sparse,
         src="mixed.raw")
    identical(qemu, zoo, "mixed.raw", f"o-s{sparse}.qcow2", "-f", "raw", "-F", "qcow2")
    ext = extents(qemu, zoo, f"o-s{sparse}.qcow2")
    holes = [e for e in ext if not e[5]]
    if sparse == "0":
        assert not holes  # fully allocated
    else:
        assert holes


def test_sparse_raw_target_with_S(qemu: Any, zoo: Path) -> None:
    both(qemu, zoo, "s0.raw", "-f", "raw", "-O", "raw", "-S", "0", src="mixed.raw", fmt="raw")
    both(qemu, zoo, "s4.raw", "-f", "raw", "-O", "raw", src="mixed.raw", fmt="raw")
    assert os.stat(zoo / "o-s0.raw").st_blocks > os.stat(zoo / "o-s4.raw").st_blocks
    for name in ("o-s0.raw", "o-s4.raw"):
        assert (zoo / name).read_bytes() == (zoo / "mixed.raw").read_bytes()


def test_no_create_writes_zeros_unless_target_is_zero(qemu: Any, zoo: Path) -> None:
    for name in ("dirty1.qcow2", "dirty2.qcow2"):
        img(qemu, zoo, "create", "-q", "-f", "qcow2", name, "8M")
        io(qemu, zoo, name, "write -P 0xff 0 8M")
    ours("-n", "-f", "raw", "-O", "qcow2", "mixed.raw", "dirty1.qcow2", cwd=zoo)
    check_clean(qemu, zoo, "dirty1.qcow2")
    identical(qemu, zoo, "mixed.raw", "dirty1.qcow2", "-f", "raw", "-F", "qcow2")
    # --target-is-zero: the zeros are not written (here the claim is false: they show)
    ours("-n", "--target-is-zero", "-f", "raw", "-O", "qcow2", "mixed.raw", "dirty2.qcow2",
         cwd=zoo)
    check_clean(qemu, zoo, "dirty2.qcow2")
    proc = img(qemu, zoo, "compare", "-f", "raw", "-F", "qcow2", "mixed.raw", "dirty2.qcow2",
               check=False)
    assert proc.returncode == 1
    img(qemu, zoo, "create", "-q", "-f", "qcow2", "fresh.qcow2", "8M")
    ours("-n", "--target-is-zero", "-f", "raw", "-O", "qcow2", "mixed.raw", "fresh.qcow2",
         cwd=zoo)
    identical(qemu, zoo, "mixed.raw", "fresh.qcow2", "-f", "raw", "-F", "qcow2")
    # A v2 target without a backing file: zeros are discarded clusters
    img(qemu, zoo, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "dirty3.qcow2", "8M")
    io(qemu, zoo, "dirty3.qcow2", "write -P 0xff 0 8M")
    ours("-n", "-f", "raw", "-O", "qcow2", "mixed.raw", "dirty3.qcow2", cwd=zoo)
    check_clean(qemu, zoo, "dirty3.qcow2")
    identical(qemu, zoo, "mixed.raw", "dirty3.qcow2", "-f", "raw", "-F", "qcow2")
    # A raw target, dirty: zeros become holes or written zeros
    (zoo / "dirty.raw").write_bytes(b"\xff" * 8 * MiB)
    ours("-n", "-f", "raw", "mixed.raw", "dirty.raw", cwd=zoo)
    assert (zoo / "dirty.raw").read_bytes() == (zoo / "mixed.raw").read_bytes()


def test_snapshot(qemu: Any, zoo: Path) -> None:
    img(qemu, zoo, "convert", "-l", "s1", "-O", "raw", "snap.qcow2", "q-snap.raw")
    ours("-l", "snapshot.name=s1", "-O", "qcow2", "snap.qcow2", "o-snap.qcow2", cwd=zoo)
    check_clean(qemu, zoo, "o-snap.qcow2")
    identical(qemu, zoo, "q-snap.raw", "o-snap.qcow2", "-f", "raw", "-F", "qcow2")
    identical(qemu, zoo, "mixed.raw", "o-snap.qcow2", "-f", "raw", "-F", "qcow2")
    ours("-l", "1", "-O", "raw", "snap.qcow2", "o-snap.raw", cwd=zoo)
    assert (zoo / "o-snap.raw").read_bytes() == (zoo / "q-snap.raw").read_bytes()


def test_backing_file_with_extended_l2_like_qemu_img(qemu: Any, zoo: Path) -> None:
    both(qemu, zoo, "ovl-ext.qcow2", "-O", "qcow2", "-o", "extended_l2=on", "-B", "mid.qcow2",
         "-F", "qcow2", src="top.qcow2")
    identical(qemu, zoo, "top.qcow2", "o-ovl-ext.qcow2")


@pytest.mark.parametrize("opts", ["cluster_size=4096,refcount_bits=1",
                                  "cluster_size=512,refcount_bits=64,lazy_refcounts=on",
                                  "compat=0.10", "cluster_size=2M", "extended_l2=on",
                                  "extended_l2=on,cluster_size=16k"])
def test_creation_options(qemu: Any, zoo: Path, opts: str) -> None:
    name = "opt-" + opts.replace(",", "_").replace("=", "") + ".qcow2"
    both(qemu, zoo, name, "-O", "qcow2", "-o", opts, src="top.qcow2")
    identical(qemu, zoo, "top.qcow2", f"o-{name}")
    ours_info = json.loads(img(qemu, zoo, "info", "--output=json", f"o-{name}").stdout)
    theirs = json.loads(img(qemu, zoo, "info", "--output=json", f"q-{name}").stdout)
    for key in ("virtual-size", "cluster-size", "format-specific"):
        assert ours_info[key] == theirs[key], key


def test_size_not_a_multiple_of_the_cluster(qemu: Any, zoo: Path) -> None:
    both(qemu, zoo, "odd.qcow2", "-f", "raw", "-O", "qcow2", src="odd.raw")
    both(qemu, zoo, "odd.raw", "-f", "raw", "-O", "raw", src="odd.raw", fmt="raw")
    assert os.path.getsize(zoo / "o-odd.raw") == os.path.getsize(zoo / "q-odd.raw") \
        == 5 * MiB + 1024
    identical(qemu, zoo, "odd.raw", "o-odd.qcow2", "-f", "raw", "-F", "qcow2")


def test_api_progress_counts_the_data(qemu: Any, zoo: Path) -> None:
    calls: list[tuple[int, int]] = []
    result = qcow2rw.convert(zoo / "top.qcow2", zoo / "api.qcow2",
                             progress=lambda done, total: calls.append((done, total)))
    totals = {t for _, t in calls}
    assert len(totals) == 1 and calls[0][0] == 0 and calls[-1][0] == calls[-1][1]
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    total = totals.pop()
    assert total == result.total and 0 < total < 6 * MiB  # data extents, not the disk
    data = sum(e[1] for e in extents(qemu, zoo, "top.qcow2") if e[5] and not e[4])
    assert data <= total
    check_clean(qemu, zoo, "api.qcow2")
    identical(qemu, zoo, "top.qcow2", "api.qcow2")


def test_we_read_what_qemu_compressed(qemu: Any, zoo: Path) -> None:
    for src in ("qc.qcow2", "qz.qcow2"):
        ours("-O", "qcow2", src, f"plain-{src}", cwd=zoo)
        check_clean(qemu, zoo, f"plain-{src}")
        identical(qemu, zoo, "mixed.raw", f"plain-{src}", "-f", "raw", "-F", "qcow2")
        ours("-O", "raw", src, f"plain-{src}.raw", cwd=zoo)
        assert (zoo / f"plain-{src}.raw").read_bytes() == (zoo / "mixed.raw").read_bytes()


# --------------------------------------------------------------------------- compressed
CASES = [("zlib", 512, 16), ("zlib", 4096, 1), ("zstd", 4096, 16), ("zlib", 65536, 64),
         ("zstd", 65536, 1), ("zlib", 2 * MiB, 16)]


@pytest.mark.parametrize("ctype,cs,rb", CASES)
def test_compressed_like_qemu_img(qemu: Any, zoo: Path, ctype: str, cs: int, rb: int) -> None:
    opts = f"compression_type={ctype},cluster_size={cs},refcount_bits={rb}"
    name = f"c-{ctype}-{cs}-{rb}.qcow2"
    img(qemu, zoo, "convert", "-f", "raw", "-c", "-O", "qcow2", "-o", opts, "mixed.raw",
        f"q-{name}")
    ours("-f", "raw", "-c", "-O", "qcow2", "-o", opts, "mixed.raw", f"o-{name}", cwd=zoo)
    mine = check_clean(qemu, zoo, f"o-{name}")
    theirs = check_clean(qemu, zoo, f"q-{name}")
    identical(qemu, zoo, "mixed.raw", f"o-{name}", "-f", "raw", "-F", "qcow2")
    # The same clusters compressed (same codec, same level), a size within 1 %
    assert mine["compressed-clusters"] == theirs["compressed-clusters"] > 0
    assert mine["allocated-clusters"] == theirs["allocated-clusters"]
    ours_size = os.path.getsize(zoo / f"o-{name}")
    qemu_size = os.path.getsize(zoo / f"q-{name}")
    assert abs(ours_size - qemu_size) <= qemu_size // 100, (ours_size, qemu_size)
    assert layout(qemu, zoo, f"o-{name}") == layout(qemu, zoo, f"q-{name}")
    # Incompressible (random) clusters are stored plain: they have a host offset
    if 4096 <= cs <= 65536:  # (a 2 MiB cluster of MIXED always compresses)
        plain = [e for e in extents(qemu, zoo, f"o-{name}") if e[5] and e[6]]
        assert plain and mine["compressed-clusters"] < mine["allocated-clusters"]


def _same_deflate_as_qemu(qemu: Any, d: Path) -> bool:
    """Does our zlib deflate a cluster to the very bytes QEMU's zlib stores?"""
    data = text_bytes(random.Random(21), 64 * KiB)
    (d / "probe.raw").write_bytes(data)
    img(qemu, d, "convert", "-f", "raw", "-c", "-O", "qcow2", "probe.raw", "probe.qcow2")
    with qcow2rw.open(d / "probe.qcow2", readonly=True) as probe:
        [(kind, _, _, entry)] = probe.block_status(0, 64 * KiB)
        host, length = decode_compressed(entry, probe.header.cluster_bits)
        stored = probe.file.pread(host, length)
    payload = compress_cluster(data, 64 * KiB, 0)
    return kind == COMPRESSED and payload is not None and stored.startswith(payload) \
        and not stored[len(payload):].strip(b"\0")


@pytest.mark.parametrize("cs", [4096, 65536])
def test_compressed_zlib_is_qemu_img_byte_for_byte(qemu: Any, zoo: Path, cs: int) -> None:
    """In guest order, packed as QEMU packs, with the same deflate: qemu-img's bytes."""
    if not _same_deflate_as_qemu(qemu, zoo):
        pytest.skip("this Python's zlib deflates differently from QEMU's")
    for src, fmt in (("mixed.raw", "raw"), ("top.qcow2", "qcow2"), ("odd.raw", "raw")):
        args = ["-f", fmt, "-c", "-O", "qcow2", "-o", f"cluster_size={cs}", src]
        img(qemu, zoo, "convert", *args, f"qb-{cs}-{src}")
        ours(*args, f"ob-{cs}-{src}", cwd=zoo)
        assert (zoo / f"ob-{cs}-{src}").read_bytes() == (zoo / f"qb-{cs}-{src}").read_bytes()


def test_compressed_output_is_deterministic(qemu: Any, zoo: Path) -> None:
    for run in (1, 2):
        ours("-f", "raw", "-c", "-m", str(4 * run), "-O", "qcow2", "-o", "cluster_size=4096",
             "mixed.raw", f"det{run}.qcow2", cwd=zoo)
    assert (zoo / "det1.qcow2").read_bytes() == (zoo / "det2.qcow2").read_bytes()
    # -W: completion order, still a correct image
    ours("-f", "raw", "-c", "-W", "-O", "qcow2", "-o", "cluster_size=4096", "mixed.raw",
         "detw.qcow2", cwd=zoo)
    check_clean(qemu, zoo, "detw.qcow2")
    identical(qemu, zoo, "mixed.raw", "detw.qcow2", "-f", "raw", "-F", "qcow2")


def test_qemu_reads_what_we_compress(qemu: Any, zoo: Path) -> None:
    # A chain source with patterns, compressed; qemu-io verifies them.
    ours("-c", "-O", "qcow2", "top.qcow2", "c-top.qcow2", cwd=zoo)
    check_clean(qemu, zoo, "c-top.qcow2")
    identical(qemu, zoo, "top.qcow2", "c-top.qcow2")
    io(qemu, zoo, "c-top.qcow2", "read -P 0x33 100k 8k", "read -P 0x11 512k 64k",
       "read -P 0x44 4100k 4k", "read -P 0 2M 64k", "read -P 0x22 3584k 128k")
    # -c with a backing file: the backing file's clusters stay unallocated
    ours("-c", "-O", "qcow2", "-B", "mid.qcow2", "-F", "qcow2", "top.qcow2", "c-ovl.qcow2",
         cwd=zoo)
    check_clean(qemu, zoo, "c-ovl.qcow2")
    identical(qemu, zoo, "top.qcow2", "c-ovl.qcow2")
    assert any(e[2] > 0 for e in extents(qemu, zoo, "c-ovl.qcow2"))
    # the odd size: the last cluster is short
    ours("-f", "raw", "-c", "-O", "qcow2", "odd.raw", "c-odd.qcow2", cwd=zoo)
    check_clean(qemu, zoo, "c-odd.qcow2")
    identical(qemu, zoo, "odd.raw", "c-odd.qcow2", "-f", "raw", "-F", "qcow2")
    # the compressed image converts back (through our reader) to the same bytes
    ours("-O", "raw", "c-odd.qcow2", "c-odd.raw", cwd=zoo)
    assert (zoo / "c-odd.raw").read_bytes() == (zoo / "odd.raw").read_bytes() + bytes(24)


_KILLER = """
import os, signal, sys
import qcow2rw
from qcow2rw import state
limit, fired = int(sys.argv[1]), [0]
fire = state.ImageState.fire
def counting_fire(self, name):
    fired[0] += 1
    if fired[0] == limit:
        os.kill(os.getpid(), signal.SIGKILL)
    fire(self, name)
state.ImageState.fire = counting_fire
qcow2rw.convert("big.raw", sys.argv[2], src_format="raw", compressed=True,
                cluster_size=4096, cache_size=16 * 1024)
print(fired[0])
"""


def _kill_rounds(qemu: Any, d: Path, rounds: int, seed: int) -> None:
    """Count the engine's event points in one whole ``convert -c`` (data writes,
    allocations, L2 and refcount write-backs, syncs), then SIGKILL runs at random ones
    of them, the last always among them (the final write-back): every target checks
    clean or with leaks only, never corrupt."""
    rng = random.Random(seed)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SOURCE_ROOT, env.get("PYTHONPATH")]))
    env.pop("QCOW2RW_DEBUG_LOCKS", None)

    def run(limit: int, target: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", _KILLER, str(limit), target], cwd=d,
                              env=env, capture_output=True, text=True, timeout=300)

    whole = run(0, "whole.qcow2")
    assert whole.returncode == 0, whole.stderr
    total = int(whole.stdout)
    limits = sorted(rng.sample(range(1, total), min(rounds - 1, total - 1))) + [total]
    with_metadata = 0
    for n, limit in enumerate(limits):
        target = d / f"kill{n}.qcow2"
        assert run(limit, target.name).returncode == -signal.SIGKILL
        out = img(qemu, d, "check", "--output=json", target.name, check=False)
        assert out.returncode in (0, 3), f"kill at event {limit}: {out.stdout}{out.stderr}"
        report = json.loads(out.stdout)
        assert not report.get("corruptions") and not report.get("check-errors"), report
        with_metadata += report.get("allocated-clusters", 0) > 0
    assert with_metadata, "no kill landed after the target's metadata was written"


def test_sigkill_during_compressed_convert_leaks_at_most(qemu: Any, tmp_path: Path) -> None:
    make_mixed(tmp_path / "big.raw", 32 * MiB, 17)
    _kill_rounds(qemu, tmp_path, 8, 18)


@pytest.mark.soak
def test_sigkill_during_compressed_convert_soak(qemu: Any, tmp_path: Path) -> None:
    make_mixed(tmp_path / "big.raw", 64 * MiB, 19)
    _kill_rounds(qemu, tmp_path, 30, 20)


# --------------------------------------------------------------------------- CLI
ERRORS = [
    (["-c", "-O", "raw", "top.qcow2", "x.raw"], "Compression not supported for this file format"),
    (["-c", "-O", "qcow2", "-o", "preallocation=metadata", "top.qcow2", "x.qcow2"],
     "Compression and preallocation not supported at the same time"),
    (["--target-is-zero", "-O", "qcow2", "top.qcow2", "x.qcow2"],
     "--target-is-zero requires use of -n flag"),
    (["-B", "mid.qcow2", "-F", "qcow2", "-O", "raw", "top.qcow2", "x.raw"],
     "Backing file not supported for file format 'raw'"),
    (["-B", "mid.qcow2", "-O", "qcow2", "top.qcow2", "x.qcow2"],
     "Use of backing file requires explicit backing format"),
    (["-S", "100", "top.qcow2", "x.raw"], "Invalid buffer size for sparse output specified"),
    (["-m", "17", "top.qcow2", "x.raw"], "Invalid number of coroutines"),
    (["-n", "-o", "cluster_size=4k", "top.qcow2", "x.raw"],
     "-o has no effect when skipping image creation"),
    (["-O", "qcow2", "-o", "bogus=1", "top.qcow2", "x.qcow2"], "Invalid parameter 'bogus'"),
    (["-O", "qcow2", "-o", "cluster_size=3k", "top.qcow2", "x.qcow2"],
     "x.qcow2: error while converting qcow2: Cluster size must be a power of two"),
    (["-O", "qcow2", "-o", "compression_type=xz", "top.qcow2", "x.qcow2"],
     "x.qcow2: error while converting qcow2: Parameter 'compression-type' does not accept "
     "value 'xz'"),
    (["-O", "qcow2", "-o", "compression_type=zstd,compat=0.10", "top.qcow2", "x.qcow2"],
     "x.qcow2: error while converting qcow2: Non-zlib compression type is only supported"),
    (["-t", "bogus", "-O", "qcow2", "top.qcow2", "x.qcow2"], "Invalid cache option: bogus"),
    (["-l", "nosnap", "snap.qcow2", "x.raw"], "Failed to load snapshot: Can't find snapshot"),
    (["-f", "raw", "-l", "s1", "snap.qcow2", "x.raw"], "does not support temporarily loading"),
    (["nonexist", "x.raw"],
     "Could not open 'nonexist': Could not open 'nonexist': No such file or directory"),
    (["top.qcow2"], "Must specify image file name"),
    (["-O", "qcow2", "-n", "top.qcow2", "small.qcow2"], "output file is smaller than input file"),
    (["-O", "qcow2", "top.qcow2", "top.qcow2"], "write"),
    (["-O", "vmdk", "top.qcow2", "x.vmdk"], "vmdk"),
]


def test_cli_errors_are_one_line(qemu: Any, zoo: Path) -> None:
    img(qemu, zoo, "create", "-q", "-f", "qcow2", "small.qcow2", "1M")
    for argv, message in ERRORS:
        proc = run_cli("convert", *argv, cwd=zoo)
        assert proc.returncode == 1, (argv, proc)
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and message in lines[0], (argv, proc.stderr)
        assert proc.stdout == ""
    assert not (zoo / "x.qcow2").exists() and not (zoo / "x.raw").exists()
    check_clean(qemu, zoo, "top.qcow2")


def test_progress_is_silent_when_piped(qemu: Any, zoo: Path) -> None:
    proc = run_cli("convert", "-p", "-c", "-O", "qcow2", "top.qcow2", "p.qcow2", cwd=zoo)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc
    identical(qemu, zoo, "top.qcow2", "p.qcow2")


def test_progress_bar_on_a_tty(zoo: Path) -> None:
    import fcntl
    import pty
    import struct
    import termios
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SOURCE_ROOT, env.get("PYTHONPATH")]))
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal of 100 columns on stdin/stdout/stderr
        try:
            fcntl.ioctl(2, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
            os.chdir(zoo)
            os.execve(sys.executable, [sys.executable, "-m", "qcow2rw", "convert", "-p", "-c",
                                       "-f", "raw", "-O", "qcow2", "mixed.raw", "tty.qcow2"],
                      env)
        finally:
            os._exit(127)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, out
    assert b"convert:" in out and b"%|" in out, out[-500:]
    assert b"/8.00M" not in out  # the total is the data to copy, not the disk


def test_force_share_reads_a_source_open_for_writing(qemu: Any, zoo: Path) -> None:
    img(qemu, zoo, "convert", "-O", "qcow2", "top.qcow2", "busy.qcow2")
    with qcow2rw.open(zoo / "busy.qcow2"):  # held for writing by this process
        proc = run_cli("convert", "-O", "qcow2", "busy.qcow2", "u1.qcow2", cwd=zoo)
        assert proc.returncode == 1 and "lock" in proc.stderr, proc
        ours("-U", "-O", "qcow2", "busy.qcow2", "u2.qcow2", cwd=zoo)
    identical(qemu, zoo, "top.qcow2", "u2.qcow2")


def test_api_errors(zoo: Path) -> None:
    with pytest.raises(Qcow2Error, match="Compression not supported"):
        qcow2rw.convert(zoo / "top.qcow2", zoo / "y.raw", out_format="raw", compressed=True)
    with pytest.raises(Qcow2Error, match="coroutines"):
        qcow2rw.convert(zoo / "top.qcow2", zoo / "y.qcow2", workers=0)
    with pytest.raises(FileNotFoundError):
        qcow2rw.convert(zoo / "missing.qcow2", zoo / "y.qcow2")
    assert not (zoo / "y.qcow2").exists() and not (zoo / "y.raw").exists()


def test_target_cache_modes_sync_or_not(zoo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """-t unsafe (qemu-img convert's default) never syncs the target; every other mode
    syncs it before convert returns; the engine's cache="unsafe" skips fdatasync only."""
    calls: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    qcow2rw.convert(zoo / "top.qcow2", zoo / "u.qcow2")
    qcow2rw.convert(zoo / "top.qcow2", zoo / "u.raw", out_format="raw")
    assert calls == []
    qcow2rw.convert(zoo / "top.qcow2", zoo / "w.qcow2", cache="writeback")
    assert calls
    calls.clear()
    qcow2rw.convert(zoo / "top.qcow2", zoo / "w.raw", out_format="raw", cache="none")
    assert calls
    calls.clear()
    with qcow2rw.open(zoo / "u.qcow2", cache="unsafe") as image:
        image.write(0, b"x" * 4096)
        image.flush()
    assert calls == []
    with pytest.raises(ValueError):
        qcow2rw.open(zoo / "u.qcow2", cache="directsync")
    with pytest.raises(Qcow2Error, match="Invalid cache option"):
        qcow2rw.convert(zoo / "top.qcow2", zoo / "v.qcow2", cache="bogus")


def test_snapshot_params_select_as_qemu_img_does(qemu: Any, tmp_path: Path) -> None:
    """``-l ID_OR_NAME`` tries the id, then the name; ``-l snapshot.id=..,snapshot.name=..``
    matches the fields given (both when both are).  A snapshot whose name is another's id
    shows the difference.  Before: the fields were folded into one id-or-name string,
    so snapshot.name=2 converted and measured snapshot id 2, and a pair that matches no
    snapshot used one anyway."""
    img(qemu, tmp_path, "create", "-q", "-f", "qcow2", "s.qcow2", "1M")
    io(qemu, tmp_path, "s.qcow2", "write -P 1 0 64k")
    img(qemu, tmp_path, "snapshot", "-c", "2", "s.qcow2")  # id 1, named "2"
    io(qemu, tmp_path, "s.qcow2", "write -P 2 0 128k")
    img(qemu, tmp_path, "snapshot", "-c", "x", "s.qcow2")  # id 2, named "x"
    for n, param in enumerate(("snapshot.name=2", "snapshot.id=2", "2", "x",
                               "snapshot.id=2,snapshot.name=x")):
        img(qemu, tmp_path, "convert", "-l", param, "-O", "raw", "s.qcow2", f"t{n}.raw")
        ours("-l", param, "-O", "raw", "s.qcow2", f"o{n}.raw", cwd=tmp_path)
        assert (tmp_path / f"o{n}.raw").read_bytes() == (tmp_path / f"t{n}.raw").read_bytes()
        measured = [json.loads(proc.stdout) for proc in (
            img(qemu, tmp_path, "measure", "-O", "qcow2", "-l", param, "--output=json",
                "s.qcow2"),
            run_cli("measure", "-O", "qcow2", "-l", param, "--output=json", "s.qcow2",
                    cwd=tmp_path))]
        assert measured[0] == measured[1], param
    assert (tmp_path / "o0.raw").read_bytes()[:1] == b"\x01"  # (snapshot.name=2: id 1)
    for param in ("snapshot.id=1,snapshot.name=x", "snapshot.id=x", "snapshot.name=1"):
        for cmd in (("convert", "-l", param, "-O", "raw", "s.qcow2", "bad.raw"),
                    ("measure", "-O", "qcow2", "-l", param, "s.qcow2")):
            theirs = img(qemu, tmp_path, *cmd, check=False)
            mine = run_cli(*cmd, cwd=tmp_path)
            assert theirs.returncode == mine.returncode == 1, (param, cmd, mine.stderr)
            assert "Failed to load snapshot: Can't find snapshot" in theirs.stderr
            assert "Failed to load snapshot: Can't find snapshot" in mine.stderr


def test_n_with_a_backing_file_needs_no_backing_format(qemu: Any, tmp_path: Path) -> None:
    """``convert -n -B BASE`` into an existing overlay creates nothing, so it needs no
    ``-F`` (qemu-img accepts it and copies the top layer only).  Before: refused with
    "Use of backing file requires explicit backing format"."""
    img(qemu, tmp_path, "create", "-q", "-f", "qcow2", "base.qcow2", "8M")
    io(qemu, tmp_path, "base.qcow2", "write -P 0xaa 0 2M")
    img(qemu, tmp_path, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
        "top.qcow2")
    io(qemu, tmp_path, "top.qcow2", "write -P 0xdd 1M 4k")
    for name in ("q.qcow2", "r.qcow2"):
        img(qemu, tmp_path, "create", "-q", "-f", "qcow2", "-b", str(tmp_path / "base.qcow2"),
            "-F", "qcow2", name)
    img(qemu, tmp_path, "convert", "-n", "-O", "qcow2", "-B", str(tmp_path / "base.qcow2"),
        "top.qcow2", "q.qcow2")
    ours("-n", "-O", "qcow2", "-B", str(tmp_path / "base.qcow2"), "top.qcow2", "r.qcow2",
         cwd=tmp_path)
    identical(qemu, tmp_path, "r.qcow2", "top.qcow2")
    assert layout(qemu, tmp_path, "r.qcow2") == layout(qemu, tmp_path, "q.qcow2")
    check_clean(qemu, tmp_path, "r.qcow2")
