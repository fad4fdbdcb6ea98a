"""The ``qcow2rw`` command line, run as a subprocess (``python -m qcow2rw``).

The interop tests run qemu-img and qcow2rw on the same files, from the same working
directory and with the same (relative) file names, so that even the file names in the
outputs must agree:

* ``info --output=json`` is compared with qemu-img's as parsed JSON, every key included.
  (``filename`` and ``actual-size`` could legitimately differ in general, since the
  first is the name as typed and the second the host file's allocation, but here both
  tools see the same name and the same file, so nothing is excluded.)  Only when an
  image made by ``qcow2rw create`` is compared with one made by ``qemu-img create`` are
  ``filename`` (two files) and ``actual-size`` (two writers lay files out differently)
  left out.
* ``info`` (human) and ``map`` (JSON and human) are compared as text, byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import qcow2rw
from qcow2rw.cli import CliError, parse_option_list, parse_size, path_combine, size_to_str

# The source tree the tests import qcow2rw from: the subprocesses must run the same code,
# not an older installed copy.
SOURCE_ROOT = str(Path(qcow2rw.__file__).resolve().parent.parent)

interop = pytest.mark.interop


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m qcow2rw ARGS`` in *cwd*."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SOURCE_ROOT, env.get("PYTHONPATH")]))
    env.pop("QCOW2RW_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "qcow2rw", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


def run_tool(tool: str, *args: str, cwd: Path, check: bool = True
             ) -> subprocess.CompletedProcess[str]:
    """Run a QEMU tool in *cwd*."""
    proc = subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} {' '.join(args)} failed ({proc.returncode}): "
                             f"{proc.stdout}{proc.stderr}")
    return proc


def qemu_io(qemu: Any, cwd: Path, path: str, *commands: str) -> None:
    """``qemu-io -f qcow2 -c CMD... PATH`` in *cwd*."""
    args: list[str] = ["-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    proc = run_tool(qemu.QEMU_IO, *args, path, cwd=cwd)
    assert "failed" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def qemu_info(qemu: Any, cwd: Path, path: str, *extra: str) -> Any:
    """``qemu-img info --output=json`` parsed."""
    return json.loads(run_tool(qemu.QEMU_IMG, "info", "--output=json", *extra, path,
                               cwd=cwd).stdout)


def assert_one_error_line(proc: subprocess.CompletedProcess[str]) -> None:
    """A failed command: non-zero exit, exactly one ``qcow2rw: ...`` line on stderr."""
    assert proc.returncode != 0, proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("qcow2rw: "), proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------
# Parsing and formatting helpers (no QEMU needed); expectations taken from qemu-img 7.2


@pytest.mark.parametrize(("text", "expected"), [
    ("0", 0), ("1000", 1000), ("010", 10), ("+5", 5), (" 5", 5), ("0x100", 256),
    ("0X10", 16), ("1k", 1024), ("1K", 1024), ("1m", 1 << 20), ("64M", 64 << 20),
    ("1G", 1 << 30), ("1t", 1 << 40), ("1p", 1 << 50), ("7E", 7 << 60), ("1.5k", 1536),
    ("1.0001k", 1024), ("1.k", 1024), ("0.5k", 512), ("1.", 1), ("1.0", 1), ("1.0b", 1),
    ("0x1k", 1024), ("1b", 1),
])
def test_parse_size_accepts_what_qemu_img_accepts(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", [
    "", "1.5", "1e3", "5M5", "8E", "0x1.5k", "1.5b", ".5k", "1kb", "5 ", "1. k", "00x10",
    "-1", "1x", "k",
])
def test_parse_size_rejects_what_qemu_img_rejects(text: str) -> None:
    with pytest.raises(CliError):
        parse_size(text)


@pytest.mark.parametrize(("value", "expected"), [
    (0, "0 B"), (512, "512 B"), (999, "999 B"), (1000, "0.977 KiB"), (1024, "1 KiB"),
    (200704, "196 KiB"), (466944, "456 KiB"), (2297856, "2.19 MiB"), (64 << 20, "64 MiB"),
    (1 << 30, "1 GiB"),
])
def test_size_to_str_matches_qemu(value: int, expected: str) -> None:
    assert size_to_str(value) == expected


def test_option_list_and_path_combine() -> None:
    assert parse_option_list("cluster_size=64k,,x,lazy_refcounts=on,help,") == [
        ("cluster_size", "64k,x"), ("lazy_refcounts", "on"), ("help", None)]
    assert path_combine("sub/top.qcow2", "../a.qcow2") == "sub/../a.qcow2"
    assert path_combine("top.qcow2", "a.qcow2") == "a.qcow2"
    assert path_combine("./top.qcow2", "a.qcow2") == "./a.qcow2"
    assert path_combine("sub/top.qcow2", "/abs/a.qcow2") == "/abs/a.qcow2"


# ------------------------------------------------------------------------------------
# create


def _without(info: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k not in keys}


@interop
@pytest.mark.parametrize(("options", "size"), [
    ([], "64M"),
    (["-o", "cluster_size=4k,lazy_refcounts=on,refcount_bits=8"], "10M"),
    (["-o", "compat=0.10"], "1G"),
    (["-o", "compat=v2", "-o", "cluster_size=64k"], "3G"),
    (["-o", "compat=v3,cluster_size=512", "-o", "refcount_bits=1"], "1000"),
    (["-o", "cluster_size=2M,refcount_bits=64,lazy_refcounts=yes"], "5M"),
    (["-o", "preallocation=metadata,cluster_size=4096"], "1M"),
    (["-o", "preallocation=falloc"], "3M"),
    (["-o", "preallocation=full,compat=1.1"], "1.5M"),
    (["-o", "preallocation=off"], "0"),
    (["-o", "compression_type=zstd,cluster_size=4k"], "9M"),
    (["-o", "compression_type=zlib"], "1M"),
])
def test_create_matches_qemu_img_create(qemu: Any, tmp_path: Path, options: list[str],
                                        size: str) -> None:
    ours = run_cli("create", "-f", "qcow2", *options, "ours.qcow2", size, cwd=tmp_path)
    assert ours.returncode == 0, ours.stderr
    assert ours.stderr == ""
    ref = run_tool(qemu.QEMU_IMG, "create", "-f", "qcow2", *options, "ref.qcow2", size,
                   cwd=tmp_path)
    assert ours.stdout == ref.stdout.replace("'ref.qcow2'", "'ours.qcow2'")

    code, report = qemu.check(str(tmp_path / "ours.qcow2"))
    assert code == 0, report
    assert "leaks" not in report and "corruptions" not in report
    got, want = qemu_info(qemu, tmp_path, "ours.qcow2"), qemu_info(qemu, tmp_path, "ref.qcow2")
    assert _without(got, "filename", "actual-size") == _without(want, "filename", "actual-size")
    # Preallocation shows in the map: compare it, host offsets aside.
    got_map = [_without(e, "offset") for e in qemu.map_json(str(tmp_path / "ours.qcow2"))]
    want_map = [_without(e, "offset") for e in qemu.map_json(str(tmp_path / "ref.qcow2"))]
    assert got_map == want_map


@interop
@pytest.mark.parametrize(("backing_args", "top", "base_fmt"), [
    (["-b", "base.qcow2", "-F", "qcow2"], "top.qcow2", "qcow2"),
    (["-o", "backing_file=base.qcow2,backing_fmt=qcow2"], "top.qcow2", "qcow2"),
    (["-b", "../base.qcow2", "-F", "qcow2"], "sub/top.qcow2", "qcow2"),
    (["-b", "base.raw", "-F", "raw"], "top.qcow2", "raw"),
])
def test_create_with_backing_file(qemu: Any, tmp_path: Path, backing_args: list[str],
                                  top: str, base_fmt: str) -> None:
    (tmp_path / "sub").mkdir()
    base = "base.qcow2" if base_fmt == "qcow2" else "base.raw"
    run_tool(qemu.QEMU_IMG, "create", "-q", "-f", base_fmt, base, "3M", cwd=tmp_path)
    if base_fmt == "qcow2":
        qemu_io(qemu, tmp_path, base, "write -P 0x5a 4096 70000")
    ours = run_cli("create", "-f", "qcow2", *backing_args, top, cwd=tmp_path)  # size omitted
    assert ours.returncode == 0, ours.stderr
    ref_top = top.replace("top", "ref")
    ref = run_tool(qemu.QEMU_IMG, "create", "-f", "qcow2", *backing_args, ref_top, cwd=tmp_path)
    assert ours.stdout == ref.stdout.replace(f"'{ref_top}'", f"'{top}'")

    got, want = qemu_info(qemu, tmp_path, top), qemu_info(qemu, tmp_path, ref_top)
    assert got["virtual-size"] == 3 << 20
    assert _without(got, "filename", "actual-size") == _without(want, "filename", "actual-size")
    assert qemu.check(str(tmp_path / top))[0] == 0
    raw = run_tool(qemu.QEMU_IMG, "compare", top, ref_top, cwd=tmp_path, check=False)
    assert raw.returncode == 0, raw.stdout + raw.stderr


def test_create_help_lists_options(tmp_path: Path) -> None:
    proc = run_cli("create", "-o", "help", "x.qcow2", cwd=tmp_path)
    assert proc.returncode == 0
    assert "cluster_size=<size>" in proc.stdout
    assert not (tmp_path / "x.qcow2").exists()


@pytest.mark.parametrize("args", [
    ["-o", "foo=bar", "f.qcow2", "1M"],                     # unknown option
    ["-o", "cluster_size", "f.qcow2", "1M"],                # option without value
    ["-o", "cluster_size=64q", "f.qcow2", "1M"],            # bad size in an option
    ["-o", "lazy_refcounts=maybe", "f.qcow2", "1M"],
    ["-o", "data_file_raw=on", "f.qcow2", "1M"],            # raw without a data file
    ["f.qcow2", "1x"],                                      # bad size
    ["f.qcow2", "8E"],                                      # size out of range
    ["f.qcow2"],                                            # no size, no backing file
    ["-o", "size=2M", "f.qcow2", "1M"],                     # size twice
    ["f.qcow2", "1M", "extra"],                             # stray argument
    ["-f", "vmdk", "f.vmdk", "1M"],                         # format we do not write
    ["-b", "nope.qcow2", "-F", "qcow2", "f.qcow2"],         # missing backing file
    ["-b", "nope.qcow2", "f.qcow2", "1M"],                  # backing file without -F
    ["-o", "cluster_size=1000", "f.qcow2", "1M"],           # rejected by the library
    ["-o", "cluster_size=4M", "f.qcow2", "1M"],
    ["-o", "refcount_bits=3", "f.qcow2", "1M"],
    ["-o", "compat=1.0", "f.qcow2", "1M"],
    ["-o", "preallocation=bogus", "f.qcow2", "1M"],
    ["-o", "lazy_refcounts=on,compat=0.10", "f.qcow2", "1M"],
    ["-o", "compression_type=zstd,compat=0.10", "f.qcow2", "1M"],
    ["-o", "compression_type=xz", "f.qcow2", "1M"],
    ["--frobnicate", "f.qcow2", "1M"],                      # unknown flag
])
def test_create_errors_are_one_line(tmp_path: Path, args: list[str]) -> None:
    proc = run_cli("create", *args, cwd=tmp_path)
    assert_one_error_line(proc)
    if "nope.qcow2" in args:
        assert not (tmp_path / "f.qcow2").exists()


# ------------------------------------------------------------------------------------
# info and map on images made by QEMU


def _make_images(qemu: Any, d: Path) -> None:
    """A small zoo of QEMU-made images in *d* (see the parametrizations below)."""
    img = qemu.QEMU_IMG

    def create(*args: str) -> None:
        run_tool(img, "create", "-q", *args, cwd=d)

    create("-f", "qcow2", "plain.qcow2", "64M")
    qemu_io(qemu, d, "plain.qcow2", "write -P 1 0 100k", "write -z 1M 64k",
            "write -P 2 3M 4k", "write -P 3 10M 200k", "discard 10M 64k",
            "write -P 4 63M 1M")
    create("-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "1G")
    qemu_io(qemu, d, "v2.qcow2", "write -P 7 512 5000", "write -z 100M 128k")
    create("-f", "qcow2", "-o", "cluster_size=4k,lazy_refcounts=on,refcount_bits=8",
           "small.qcow2", "10M")
    qemu_io(qemu, d, "small.qcow2", "write -P 9 4095 9000", "write -z 65536 4096")
    create("-f", "qcow2", "empty.qcow2", "0")
    # A three-deep chain, the middle one in a subdirectory, with data in every layer.
    (d / "sub").mkdir()
    create("-f", "qcow2", "base.qcow2", "8M")
    qemu_io(qemu, d, "base.qcow2", "write -P 1 0 256k", "write -P 1 4M 64k")
    create("-f", "qcow2", "-b", "../base.qcow2", "-F", "qcow2", "sub/mid.qcow2")
    qemu_io(qemu, d, "sub/mid.qcow2", "write -P 2 64k 64k", "write -z 4M 64k")
    create("-f", "qcow2", "-b", "sub/mid.qcow2", "-F", "qcow2", "top.qcow2", "16M")
    qemu_io(qemu, d, "top.qcow2", "write -P 3 128k 64k", "write -P 3 12M 64k")
    # A raw backing file.
    create("-f", "raw", "base.raw", "1M")
    run_tool(qemu.QEMU_IO, "-f", "raw", "-c", "write -P 5 0 4k", "base.raw", cwd=d)
    create("-f", "qcow2", "-b", "base.raw", "-F", "raw", "over-raw.qcow2")
    # Internal snapshot.
    create("-f", "qcow2", "snap.qcow2", "4M")
    qemu_io(qemu, d, "snap.qcow2", "write -P 1 0 64k")
    run_tool(img, "snapshot", "-c", "snap1", "snap.qcow2", cwd=d)
    qemu_io(qemu, d, "snap.qcow2", "write -P 2 0 4k")
    # Dirty: lazy refcounts, an allocating write, then abort (the dirty bit stays set).
    create("-f", "qcow2", "-o", "lazy_refcounts=on", "dirty.qcow2", "4M")
    run_tool(qemu.QEMU_IO, "-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "abort",
             "dirty.qcow2", cwd=d, check=False)
    # Compressed clusters.
    create("-f", "raw", "plain.raw", "2M")
    run_tool(qemu.QEMU_IO, "-f", "raw", "-c", "write -P 6 0 1M", "plain.raw", cwd=d)
    run_tool(img, "convert", "-c", "-f", "raw", "-O", "qcow2", "plain.raw",
             "compressed.qcow2", cwd=d)
    run_tool(img, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd",
             "plain.raw", "zstd.qcow2", cwd=d)
    # Persistent dirty bitmaps (header extension; info lists them).
    create("-f", "qcow2", "bitmap.qcow2", "4M")
    run_tool(img, "bitmap", "--add", "bitmap.qcow2", "bm0", cwd=d)
    run_tool(img, "bitmap", "--add", "-g", "128k", "--disable", "bitmap.qcow2", "bm1", cwd=d)
    # Data clusters over holes in the host file: qemu-img map reports those ranges as
    # "zero": true (it asks the host file with SEEK_DATA/SEEK_HOLE).
    create("-f", "qcow2", "-o", "preallocation=metadata,cluster_size=4k", "prealloc.qcow2",
           "10M")
    run_tool("cp", "--sparse=always", "plain.qcow2", "holes.qcow2", cwd=d)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory holding :func:`_make_images`' images (made once per module)."""
    from qcow2rw import qemutools

    if not qemutools.available():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("qemu-img/qemu-io not found, and CI=true: interop tests must run in CI")
        pytest.skip("qemu-img/qemu-io not installed")
    d = tmp_path_factory.mktemp("zoo")
    _make_images(qemutools, d)
    return d


ZOO = ["plain.qcow2", "v2.qcow2", "small.qcow2", "empty.qcow2", "base.qcow2",
       "sub/mid.qcow2", "top.qcow2", "over-raw.qcow2", "snap.qcow2", "dirty.qcow2",
       "compressed.qcow2", "zstd.qcow2", "bitmap.qcow2", "prealloc.qcow2", "holes.qcow2"]


@interop
@pytest.mark.parametrize("name", ZOO)
def test_info_json_equals_qemu_img(qemu: Any, zoo: Path, name: str) -> None:
    ours = run_cli("info", "--output=json", name, cwd=zoo)
    assert ours.returncode == 0, ours.stderr
    assert json.loads(ours.stdout) == qemu_info(qemu, zoo, name)


@interop
@pytest.mark.parametrize("name", ["top.qcow2", "over-raw.qcow2", "plain.qcow2"])
def test_info_backing_chain_json_equals_qemu_img(qemu: Any, zoo: Path, name: str) -> None:
    ours = run_cli("info", "--output=json", "--backing-chain", name, cwd=zoo)
    assert ours.returncode == 0, ours.stderr
    assert json.loads(ours.stdout) == qemu_info(qemu, zoo, name, "--backing-chain")


@interop
@pytest.mark.parametrize("name", ZOO)
def test_info_human_equals_qemu_img(qemu: Any, zoo: Path, name: str) -> None:
    ours = run_cli("info", name, cwd=zoo)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == run_tool(qemu.QEMU_IMG, "info", name, cwd=zoo).stdout


@interop
def test_info_human_backing_chain_equals_qemu_img(qemu: Any, zoo: Path) -> None:
    ours = run_cli("info", "--backing-chain", "top.qcow2", cwd=zoo)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == run_tool(qemu.QEMU_IMG, "info", "--backing-chain", "top.qcow2",
                                   cwd=zoo).stdout


@interop
@pytest.mark.parametrize("name", ZOO)
def test_map_json_equals_qemu_img(qemu: Any, zoo: Path, name: str) -> None:
    ours = run_cli("map", "--output=json", name, cwd=zoo)
    assert ours.returncode == 0, ours.stderr
    want = run_tool(qemu.QEMU_IMG, "map", "--output=json", name, cwd=zoo).stdout
    assert json.loads(ours.stdout) == json.loads(want)
    assert ours.stdout == want  # qemu-img's exact layout, one extent per line


@interop
@pytest.mark.parametrize("name", ZOO)
def test_map_human_equals_qemu_img(qemu: Any, zoo: Path, name: str) -> None:
    """Same rows and file names; compressed clusters: same error, exit 1."""
    ours = run_cli("map", name, cwd=zoo)
    ref = run_tool(qemu.QEMU_IMG, "map", name, cwd=zoo, check=False)
    assert ours.stdout == ref.stdout
    assert ours.returncode == ref.returncode
    if name in ("compressed.qcow2", "zstd.qcow2"):
        assert ref.returncode == 1
        assert ours.stderr == "qcow2rw: File contains external, encrypted or compressed clusters.\n"
    else:
        assert ours.stderr == ""


@interop
def test_map_path_forms(qemu: Any, zoo: Path) -> None:
    """File names in the human map follow the name the image was opened under."""
    for name in ("./top.qcow2", str(zoo / "top.qcow2")):
        ours = run_cli("map", name, cwd=zoo)
        assert ours.returncode == 0, ours.stderr
        assert ours.stdout == run_tool(qemu.QEMU_IMG, "map", name, cwd=zoo).stdout


# ------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("verb", [["info"], ["info", "--output=json"], ["map"],
                                  ["map", "--output=json"]])
def test_errors_on_bad_files_are_one_line(tmp_path: Path, verb: list[str]) -> None:
    (tmp_path / "zeros.raw").write_bytes(bytes(1 << 20))
    (tmp_path / "text.img").write_text("this is not a disk image\n" * 10)
    (tmp_path / "short.qcow2").write_bytes(b"QFI\xfb\x00\x00\x00\x03" + bytes(20))
    os.mkdir(tmp_path / "adir")
    for name in ("nope.qcow2", "zeros.raw", "text.img", "short.qcow2", "adir", ""):
        proc = run_cli(*verb, name, cwd=tmp_path)
        assert_one_error_line(proc)
        assert proc.stdout == "", (name, proc.stdout)


@pytest.mark.parametrize("args", [
    [], ["frob"], ["info"], ["info", "--output=xml", "x"], ["info", "--out=json", "x"],
    ["map", "a", "b"], ["info", "-f", "raw", "x"], ["demo", "--size", "2G"],
    ["demo", "--size", "x"],
])
def test_usage_errors_are_one_line(tmp_path: Path, args: list[str]) -> None:
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 1
    assert_one_error_line(proc)


def test_help_exits_zero(tmp_path: Path) -> None:
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for verb in ("create", "info", "map", "demo"):
        assert verb in proc.stdout


# ------------------------------------------------------------------------------------
# demo


def test_demo_succeeds(tmp_path: Path) -> None:
    proc = run_cli("demo", "--dir", str(tmp_path), "--size", "16M", "--keep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("OK")
    assert "MISMATCH" not in proc.stdout and "FAILED" not in proc.stdout
    assert (tmp_path / "demo.qcow2").exists()


def test_demo_default_cleans_up(tmp_path: Path) -> None:
    proc = run_cli("demo", "--dir", str(tmp_path / "d"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list((tmp_path / "d").iterdir()) == []


@interop
def test_demo_image_passes_qemu_img_check(qemu: Any, tmp_path: Path) -> None:
    proc = run_cli("demo", "--dir", str(tmp_path), "--size", "8M", "--keep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "qemu-img check: No errors were found on the image." in proc.stdout
    assert "Images are identical." in proc.stdout
    assert qemu.check(str(tmp_path / "demo.qcow2"))[0] == 0
