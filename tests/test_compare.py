"""``qcow2rw.compare`` and ``qcow2rw compare``, side by side with ``qemu-img compare``.

The same pairs go to qemu-img 7.2 and to us, from the same directory with the same
file names: stdout and the exit status must be the same (errors: the same message
after the program's name).  Most pairs run in-process through :func:`qcow2rw.compare`
(its ``messages`` are the stdout lines); a smaller set runs ``python -m qcow2rw
compare`` as a subprocess.  The pairs: raw and qcow2 both ways, a three-image chain
(raw base shorter than the qcow2 above it, a 4 KiB-cluster top larger than both) vs
its flattened raw, plain qcow2 and compressed copies, one-byte changes in the common
part and in a tail, zero and non-zero tails, zero clusters (plain and allocated),
unallocated vs sparse raw, metadata preallocation, ``-s`` on all of them (size and
block status messages).
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

import qcow2rw
from qcow2rw.compare import CompareFailed, CompareResult, compare_sources, open_source
from qcow2rw.errors import FormatError, Qcow2Error, UnsupportedFeature
from tests.test_cli import run_cli

MiB = 1 << 20
interop = pytest.mark.interop


def qemu_compare(qemu: Any, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([qemu.QEMU_IMG, "compare", *args], check=False, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def tool(qemu: Any, cwd: Path, name: str, *args: str) -> None:
    binary = qemu.QEMU_IMG if name == "img" else qemu.QEMU_IO
    proc = subprocess.run([binary, *args], check=False, cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "failed" not in proc.stdout, proc


def io(qemu: Any, cwd: Path, path: str, *commands: str) -> None:
    args = ["-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    tool(qemu, cwd, "io", *args, path)


def flip(src: Path, dst: Path, offset: int, *, size: int | None = None) -> None:
    """A copy of *src* with the byte at *offset* changed (and cut/extended to *size*)."""
    data = bytearray(src.read_bytes())
    if size is not None:
        data = data[:size] + bytearray(max(0, size - len(data)))
    data[offset] ^= 0x5A
    dst.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory, qemu: Any) -> Path:
    """The images every comparison picks its pairs from."""
    d = tmp_path_factory.mktemp("compare")
    rng = random.Random(14)
    # The chain: base.raw (3 MiB, first MiB random) <- mid.qcow2 (4 MiB) <- top.qcow2 (6 MiB)
    base = bytearray(3 * MiB)
    base[:MiB] = rng.randbytes(MiB)
    (d / "base.raw").write_bytes(bytes(base))
    tool(qemu, d, "img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
         "mid.qcow2", "4M")
    io(qemu, d, "mid.qcow2", "write -P 0x11 512k 64k", "write -z 0 64k",
       "write -P 0x22 3584k 128k")
    tool(qemu, d, "img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
         "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "6M")
    io(qemu, d, "top.qcow2", "write -P 0x33 100k 8k", "write -z 2M 64k",
       "write -P 0x44 4100k 4k")
    tool(qemu, d, "img", "convert", "-O", "raw", "top.qcow2", "flat.raw")
    tool(qemu, d, "img", "convert", "-O", "qcow2", "top.qcow2", "flat.qcow2")
    tool(qemu, d, "img", "convert", "-c", "-O", "qcow2", "top.qcow2", "comp.qcow2")
    flat = d / "flat.raw"
    flip(flat, d / "diff-data.raw", 100 * 1024 + 4000)        # in top's own data
    flip(flat, d / "diff-base.raw", 700 * 1024 + 3)           # read through to base.raw
    flip(flat, d / "diff-hole.raw", 3 * MiB + 4096)           # where the chain reads zeros
    (d / "short.raw").write_bytes(flat.read_bytes()[:5 * MiB - 1000])  # odd size, cut zeros
    (d / "long-zero.raw").write_bytes(flat.read_bytes() + bytes(MiB + 1000))
    flip(flat, d / "long-data.raw", 6 * MiB + 70000, size=7 * MiB)
    # Zero clusters: unallocated, plain zero, allocated zero; a sparse raw file.
    for name in ("empty", "zplain", "zalloc"):
        tool(qemu, d, "img", "create", "-q", "-f", "qcow2", f"{name}.qcow2", "2M")
    io(qemu, d, "zplain.qcow2", "write -z 0 2M")
    io(qemu, d, "zalloc.qcow2", "write -P 7 0 2M", "write -z 0 2M")
    with open(d / "sparse.raw", "wb") as f:
        f.truncate(2 * MiB)
    (d / "tiny.raw").write_bytes(rng.randbytes(1000))
    # Metadata preallocation (QEMU asks the host file about data runs over holes)
    tool(qemu, d, "img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata",
         "prealloc.qcow2", "8M")
    io(qemu, d, "prealloc.qcow2", "write -P 1 0 1M")
    tool(qemu, d, "img", "create", "-q", "-f", "qcow2", "plain8.qcow2", "8M")
    io(qemu, d, "plain8.qcow2", "write -P 1 0 1M")
    return d


PAIRS = [
    ("flat.raw", "top.qcow2"), ("top.qcow2", "flat.raw"), ("top.qcow2", "flat.qcow2"),
    ("top.qcow2", "comp.qcow2"), ("comp.qcow2", "flat.raw"), ("top.qcow2", "top.qcow2"),
    ("top.qcow2", "diff-data.raw"), ("diff-base.raw", "top.qcow2"),
    ("top.qcow2", "diff-hole.raw"), ("comp.qcow2", "diff-base.raw"),
    ("top.qcow2", "short.raw"), ("short.raw", "top.qcow2"), ("top.qcow2", "long-zero.raw"),
    ("long-zero.raw", "flat.qcow2"), ("top.qcow2", "long-data.raw"),
    ("long-data.raw", "comp.qcow2"), ("mid.qcow2", "top.qcow2"), ("top.qcow2", "mid.qcow2"),
    ("mid.qcow2", "base.raw"), ("base.raw", "mid.qcow2"),
    ("empty.qcow2", "zplain.qcow2"), ("zplain.qcow2", "zalloc.qcow2"),
    ("empty.qcow2", "sparse.raw"), ("sparse.raw", "zalloc.qcow2"), ("sparse.raw", "empty.qcow2"),
    ("tiny.raw", "tiny.raw"), ("empty.qcow2", "tiny.raw"),
    ("prealloc.qcow2", "plain8.qcow2"), ("plain8.qcow2", "prealloc.qcow2"),
    ("prealloc.qcow2", "prealloc.qcow2"), ("prealloc.qcow2", "empty.qcow2"),
]


def same_as_qemu(qemu: Any, d: Path, args: list[str], ours: CompareResult) -> None:
    theirs = qemu_compare(qemu, d, *args)
    stdout = "".join(line + "\n" for line in ours.messages)
    assert (stdout, ours.exit_code) == (theirs.stdout, theirs.returncode), \
        f"qemu-img compare {' '.join(args)}: {theirs.stdout!r} {theirs.stderr!r}"


@interop
@pytest.mark.parametrize("strict", [False, True], ids=["plain", "strict"])
def test_pairs_api_like_qemu(qemu: Any, zoo: Path, strict: bool,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(zoo)  # the same relative names as qemu-img sees
    for a, b in PAIRS:
        ours = qcow2rw.compare(a, b, strict=strict)
        same_as_qemu(qemu, zoo, (["-s"] if strict else []) + [a, b], ours)


@interop
def test_forced_formats(qemu: Any, zoo: Path) -> None:
    """``-f raw`` on a qcow2 file compares the file's bytes."""
    for fa, fb, a, b in [("raw", "raw", "flat.qcow2", "flat.qcow2"),
                         ("raw", "qcow2", "flat.raw", "top.qcow2"),
                         ("raw", "raw", "flat.qcow2", "comp.qcow2")]:
        ours = qcow2rw.compare(zoo / a, zoo / b, fmt_a=fa, fmt_b=fb)
        same_as_qemu(qemu, zoo, ["-f", fa, "-F", fb, str(zoo / a), str(zoo / b)], ours)


@interop
def test_result_fields_and_progress(zoo: Path) -> None:
    seen: list[tuple[int, int]] = []
    res = qcow2rw.compare(zoo / "top.qcow2", zoo / "long-data.raw",
                          progress=lambda done, total: seen.append((done, total)))
    assert not res and res.reason == "content" and res.exit_code == 1
    assert res.offset == 6 * MiB + 70000 // 512 * 512
    assert res.size_mismatch and (res.size_a, res.size_b) == (6 * MiB, 7 * MiB)
    assert res.messages[0] == "Warning: Image size mismatch!"
    assert seen[0] == (0, 7 * MiB) and all(t == 7 * MiB for _, t in seen)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    seen.clear()
    res = qcow2rw.compare(zoo / "top.qcow2", zoo / "flat.raw",
                          progress=lambda done, total: seen.append((done, total)))
    assert res and res.reason == "identical" and res.offset is None
    assert seen[-1] == (6 * MiB, 6 * MiB)
    strict = qcow2rw.compare(zoo / "top.qcow2", zoo / "long-zero.raw", strict=True)
    assert strict.reason == "size" and strict.messages == ["Strict mode: Image size mismatch!"]


@interop
def test_open_images_and_sources(zoo: Path) -> None:
    """Open Images (and open sources) are compared and left open."""
    with qcow2rw.open(zoo / "top.qcow2", readonly=True) as top, \
            qcow2rw.open(zoo / "comp.qcow2", readonly=True) as comp:
        assert qcow2rw.compare(top, comp)
        assert qcow2rw.compare(top, zoo / "diff-base.raw").offset == 700 * 1024
        assert not top.closed and not comp.closed
    with open_source(zoo / "flat.raw") as a, open_source(zoo / "flat.qcow2", "qcow2") as b:
        assert compare_sources(a, b).identical
        assert (a.format, b.format) == ("raw", "qcow2")


def test_raw_files_without_qemu(tmp_path: Path) -> None:
    """Sector granularity of the reported offset, zero tails, odd sizes (no QEMU needed)."""
    data = os.urandom(10000)
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "b").write_bytes(data + bytes(3000))
    (tmp_path / "c").write_bytes(data + bytes(3000) + b"x")
    changed = bytearray(data)
    changed[5000] ^= 1
    (tmp_path / "d").write_bytes(bytes(changed))
    assert qcow2rw.compare(tmp_path / "a", tmp_path / "b").messages == [
        "Warning: Image size mismatch!", "Images are identical."]
    assert qcow2rw.compare(tmp_path / "c", tmp_path / "a").offset == 13000 // 512 * 512
    assert qcow2rw.compare(tmp_path / "a", tmp_path / "d").messages == [
        "Content mismatch at offset 4608!"]
    # 10000 and 10001 bytes are both 20 sectors to QEMU: the same size even in strict
    # mode, where the block status differs at 10000 (data on one side, EOF hole on the
    # other), as qemu-img 7.2 reports it
    (tmp_path / "e").write_bytes(data + b"\0")
    assert qcow2rw.compare(tmp_path / "a", tmp_path / "e").messages == ["Images are identical."]
    res = qcow2rw.compare(tmp_path / "a", tmp_path / "e", strict=True)
    assert (res.size_a, res.size_b) == (10240, 10240)
    assert res.messages == ["Strict mode: Offset 10000 block status mismatch!"]


def test_qcow2_written_by_us_without_qemu(tmp_path: Path) -> None:
    data = bytearray(os.urandom(3 * MiB))
    data[MiB:2 * MiB] = bytes(MiB)
    (tmp_path / "a.raw").write_bytes(bytes(data))
    with qcow2rw.create(tmp_path / "a.qcow2", 3 * MiB) as img:
        img.write(0, bytes(data[:MiB]))
        img.write(2 * MiB, bytes(data[2 * MiB:]))
        img.write_zeroes(MiB, 64 * 1024)
    assert qcow2rw.compare(tmp_path / "a.raw", tmp_path / "a.qcow2").identical
    data[2 * MiB + 12345] ^= 1
    (tmp_path / "b.raw").write_bytes(bytes(data))
    res = qcow2rw.compare(tmp_path / "a.qcow2", tmp_path / "b.raw")
    assert res.messages == [f"Content mismatch at offset {(2 * MiB + 12345) // 512 * 512}!"]


def test_bad_input(tmp_path: Path) -> None:
    (tmp_path / "a.raw").write_bytes(bytes(4096))
    with pytest.raises(FileNotFoundError):
        qcow2rw.compare(tmp_path / "a.raw", tmp_path / "missing")
    with pytest.raises(FormatError, match="not in qcow2 format"):
        qcow2rw.compare(tmp_path / "a.raw", tmp_path / "a.raw", fmt_b="qcow2")
    with pytest.raises(UnsupportedFeature, match="Unknown driver 'foo'"):
        qcow2rw.compare(tmp_path / "a.raw", tmp_path / "a.raw", fmt_a="foo")
    with pytest.raises(UnsupportedFeature, match="vmdk"):
        qcow2rw.compare(tmp_path / "a.raw", tmp_path / "a.raw", fmt_a="vmdk")
    with pytest.raises(IsADirectoryError):
        qcow2rw.compare(tmp_path, tmp_path / "a.raw")
    assert issubclass(CompareFailed, Qcow2Error)


# ------------------------------------------------------------------------------------
# The command line, as a subprocess (``python -m qcow2rw compare``)

CLI_CASES = [
    ["flat.raw", "top.qcow2"],
    ["-f", "qcow2", "-F", "raw", "top.qcow2", "diff-base.raw"],
    ["top.qcow2", "long-zero.raw"],
    ["long-data.raw", "top.qcow2"],
    ["-s", "top.qcow2", "long-zero.raw"],
    ["-s", "flat.raw", "top.qcow2"],
    ["-s", "-U", "top.qcow2", "top.qcow2"],
    ["-q", "top.qcow2", "diff-hole.raw"],
    ["-p", "comp.qcow2", "flat.raw"],  # not a TTY: no progress output
]


@interop
@pytest.mark.parametrize("args", CLI_CASES, ids=[" ".join(c) for c in CLI_CASES])
def test_cli_like_qemu(qemu: Any, zoo: Path, args: list[str]) -> None:
    ours = run_cli("compare", *args, cwd=zoo)
    theirs = qemu_compare(qemu, zoo, *[a for a in args if a != "-p"])
    assert (ours.stdout, ours.returncode) == (theirs.stdout, theirs.returncode), ours.stderr
    assert ours.stderr == ""


@interop
@pytest.mark.parametrize("args", [
    ["top.qcow2", "missing.qcow2"], ["missing.raw", "top.qcow2"],
    ["-f", "qcow2", "flat.raw", "top.qcow2"], ["-F", "foo", "top.qcow2", "flat.raw"],
    [".", "flat.raw"],
], ids=["missing-b", "missing-a", "not-qcow2", "unknown-driver", "directory"])
def test_cli_errors_like_qemu(qemu: Any, zoo: Path, args: list[str]) -> None:
    ours = run_cli("compare", *args, cwd=zoo)
    theirs = qemu_compare(qemu, zoo, *args)
    assert theirs.returncode == 2
    assert (ours.stdout, ours.returncode) == (theirs.stdout, theirs.returncode)
    assert ours.stderr.splitlines() == ["qcow2rw: " + theirs.stderr.split(": ", 1)[1].rstrip("\n")]


@interop
def test_cli_usage_error(zoo: Path) -> None:
    ours = run_cli("compare", "top.qcow2", cwd=zoo)
    assert ours.returncode == 1 and ours.stdout == ""
    assert len(ours.stderr.splitlines()) == 1 and ours.stderr.startswith("qcow2rw: ")
