"""External data files (issue 15 §2), against qemu-img / qemu-io 7.2: the flow of
qemu-iotests 244 (efficient and data_file_raw variants), create byte-compared, check
figures, flush order, and untrusted images that name their own data file."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import qcow2rw
from qcow2rw.errors import DataFileRefused, UnsupportedFeature

MiB = 1 << 20


def run(*args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=60)
    if ok:
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


def ours(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(qcow2rw.__file__).parent.parent))
    return subprocess.run([sys.executable, "-m", "qcow2rw", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def qemu_io(cwd: Path, path: str, *cmds: str, fmt: str = "qcow2") -> str:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    out = run(*args, path, cwd=cwd).stdout
    assert "failed" not in out, out
    return out


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # (QEMU opens a data file name relative to the cwd)
    return tmp_path


def _json(proc: subprocess.CompletedProcess[str]) -> object:
    return json.loads(proc.stdout)


def test_244_efficient_qemu_writes_we_read_check_map(here: Path) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=t.data", "t.qcow2", "64M",
        cwd=here)
    qemu_io(here, "t.qcow2", "write -P 0x11 1M 4M", "discard 2M 2M", "write -z 3M 3M",
            "write -P 0x22 0 64k")
    with qcow2rw.open("t.qcow2", readonly=True, trust_data_file=True) as img:
        data = img.read(0, 8 * MiB)
        assert img.map() == _json(run("qemu-img", "map", "--output=json", "t.qcow2", cwd=here))
    expect = bytearray(8 * MiB)
    expect[1 * MiB:2 * MiB] = b"\x11" * MiB
    expect[:65536] = b"\x22" * 65536
    assert data == bytes(expect)
    # check: the same figures (data clusters are not refcounted), without the data file
    theirs = _json(run("qemu-img", "check", "--output=json", "t.qcow2", cwd=here))
    mine = ours("check", "--output=json", "t.qcow2", cwd=here)
    assert mine.returncode == 0, mine.stderr
    assert _json(mine) == theirs
    # zero clusters keep their stale data in a non-raw data file (244)
    qemu_io(here, "t.data", "read -P 0x11 4M 1M", "read -P 0 5M 1M", fmt="raw")


def test_244_raw_we_write_qemu_reads(here: Path) -> None:
    img = qcow2rw.create("r.qcow2", 64 * MiB, data_file="r.data", data_file_raw=True)
    try:
        img.write(1 * MiB, b"\x11" * (4 * MiB))
        img.discard(2 * MiB, 2 * MiB)
        img.write_zeroes(3 * MiB, 3 * MiB)
        img.write(0, b"\x33" * 100)  # guest offset 0: host offset 0 of the data file
        img.flush()
    finally:
        img.close()
    run("qemu-img", "check", "r.qcow2", cwd=here)
    info = _json(run("qemu-img", "info", "--output=json", "r.qcow2", cwd=here))
    assert info["format-specific"]["data"]["data-file-raw"] is True
    for fmt, path in (("qcow2", "r.qcow2"), ("raw", "r.data")):
        qemu_io(here, path, "read -P 0x33 0 100", "read -P 0 100 1048476",
                "read -P 0x11 1M 1M", "read -P 0 2M 4M", fmt=fmt)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", "r.data", "r.qcow2", cwd=here)
    assert _json(ours("map", "--output=json", "--trust-data-file", "r.qcow2", cwd=here)) == \
        _json(run("qemu-img", "map", "--output=json", "r.qcow2", cwd=here))


@pytest.mark.parametrize("opts", ["", ",data_file_raw=on", ",preallocation=full",
                                  ",preallocation=metadata,lazy_refcounts=on"])
def test_create_like_qemu(here: Path, opts: str) -> None:
    (here / "q").mkdir()
    (here / "o").mkdir()
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=d.data" + opts, "i.qcow2",
        "3M", cwd=here / "q")
    proc = ours("create", "-q", "-f", "qcow2", "-o", "data_file=d.data" + opts, "i.qcow2",
                "3M", cwd=here / "o")
    assert proc.returncode == 0, proc.stderr
    for name in ("i.qcow2", "d.data"):
        assert (here / "q" / name).read_bytes() == (here / "o" / name).read_bytes(), name
    os.chdir(here / "o")
    qemu_io(here / "o", "i.qcow2", "write -P 0x44 1M 128k")
    with qcow2rw.open("i.qcow2", data_file="d.data") as img:
        assert img.read(1 * MiB, 131072) == b"\x44" * 131072


@pytest.mark.parametrize("opts,message", [
    ("data_file_raw=on", "data-file-raw requires data-file"),
    ("data_file=x.data,compat=0.10", "External data files are only supported with "
                                     "compatibility level 1.1"),
    ("data_file=x.data,data_file_raw=on,backing_file=b.qcow2,backing_fmt=qcow2",
     "Backing file and data-file-raw cannot be used at the same time"),
])
def test_create_refusals_as_qemu(here: Path, opts: str, message: str) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", "b.qcow2", "1M", cwd=here)
    theirs = run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "t.qcow2", "1M",
                 cwd=here, ok=False)
    mine = ours("create", "-q", "-f", "qcow2", "-o", opts, "m.qcow2", "1M", cwd=here)
    assert theirs.returncode != 0 and message in theirs.stderr
    assert mine.returncode != 0 and message in mine.stderr, mine.stderr


def test_compression_and_snapshots_refused(here: Path) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=t.data", "t.qcow2", "4M",
        cwd=here)
    assert "Operation not supported" in run("qemu-io", "-c", "write -c 0 64k", "t.qcow2",
                                            cwd=here, ok=False).stdout
    theirs = run("qemu-img", "snapshot", "-c", "s", "t.qcow2", cwd=here, ok=False).stderr
    with qcow2rw.open("t.qcow2", trust_data_file=True) as img:
        with pytest.raises(UnsupportedFeature, match="Operation not supported"):
            img.write_compressed(0, bytes(65536))
        with pytest.raises(UnsupportedFeature, match="-95 \\(Operation not supported\\)"):
            img.create_snapshot("s")
    mine = ours("snapshot", "-c", "s", "--trust-data-file", "t.qcow2", cwd=here)
    assert mine.returncode != 0
    assert "Could not create snapshot 's': -95 (Operation not supported)" in theirs
    assert "Could not create snapshot 's': -95 (Operation not supported)" in mine.stderr
    run("qemu-img", "check", "t.qcow2", cwd=here)


def test_flush_syncs_data_file_before_metadata(here: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    img = qcow2rw.create("f.qcow2", 4 * MiB, data_file="f.data")
    try:
        meta_fd, data_fd = img.state.file.fd, img.state.datafile.fd
        img.flush()
        synced: list[int] = []
        real = os.fdatasync
        monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
        img.write(65536, b"x" * 4096)  # allocating: an L2 entry to write back
        img.flush()
        assert data_fd in synced and meta_fd in synced, synced
        assert synced.index(data_fd) < synced.index(meta_fd), synced
        synced.clear()
        img.write(65536 + 4096, b"y" * 4096)  # in place: data only, no metadata changes
        img.flush()
        assert data_fd in synced, synced  # the flush rule covers the data file
        synced.clear()
        img.flush()
        assert data_fd not in synced  # nothing new to sync
    finally:
        img.close()
    qemu_io(here, "f.qcow2", "read -P 0x78 64k 4k", "read -P 0x79 68k 4k")


def _hostile(here: Path, name: str, data_name: str) -> str:
    """An image (made by qemu-img) whose header names *data_name* as its data file."""
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=orig.data", name, "1M",
        cwd=here)
    buf = bytearray((here / name).read_bytes()[:65536])
    exts, pos = [], 112
    while True:
        magic, length = struct.unpack_from(">II", buf, pos)
        if magic == 0:
            break
        data = bytes(buf[pos + 8:pos + 8 + length])
        exts.append((magic, data_name.encode() if magic == 0x44415441 else data))
        pos += 8 + (length + 7 & ~7)
    out = bytearray(buf[:112])
    for magic, data in exts:
        out += struct.pack(">II", magic, len(data)) + data + bytes(-len(data) % 8)
    out += bytes(8)
    buf[:len(out)] = out
    with open(here / name, "r+b") as f:
        f.write(buf)
    return name


NAMES = ["/etc/passwd", "../x", 'json:{"driver":"file","filename":"/etc/passwd"}',
         "nbd:localhost:10809"]


@pytest.mark.parametrize("data_name", NAMES)
def test_untrusted_images_refused(here: Path, data_name: str) -> None:
    img_name = _hostile(here, "h.qcow2", data_name)
    with pytest.raises(DataFileRefused, match="CVE-2024-32498"):
        qcow2rw.open(img_name)
    with pytest.raises(DataFileRefused, match="CVE-2024-32498"):
        qcow2rw.open(img_name, readonly=True)
    if ":" in data_name:  # protocol names: never, even trusted
        with pytest.raises(DataFileRefused, match="protocol"):
            qcow2rw.open(img_name, readonly=True, trust_data_file=True)
    # info shows the header's name without opening it (as qemu-img info)
    info = ours("info", "--output=json", img_name, cwd=here)
    assert info.returncode == 0, info.stderr
    spec = _json(info)["format-specific"]["data"]  # type: ignore[index]
    theirs = _json(run("qemu-img", "info", "--output=json", img_name, cwd=here))
    assert spec == theirs["format-specific"]["data"]  # type: ignore[index]
    assert spec["data-file"] == data_name
    # check and map work on the metadata alone
    assert ours("check", img_name, cwd=here).returncode == 0
    assert ours("map", "--output=json", img_name, cwd=here).returncode == 0
    # every verb that opens the image for data refuses, naming the way out
    for verb in (["convert", "-O", "qcow2", img_name, "out.qcow2"],
                 ["compare", img_name, img_name], ["snapshot", "-c", "s", img_name],
                 ["resize", img_name, "2M"], ["amend", "-o", "lazy_refcounts=on", img_name],
                 ["serve", "-k", str(here / "sock"), img_name]):
        proc = ours(*verb, cwd=here)
        assert proc.returncode != 0, verb
        assert "--data-file" in proc.stderr and data_name in proc.stderr, (verb, proc.stderr)
    assert not (here / "out.qcow2").exists()
    # the caller's own file is used instead of the header's (an unallocated cluster
    # reads as zeros whatever the data file holds there: the write copies zeros)
    (here / "mine.data").write_bytes(b"\x5a" * MiB)
    with qcow2rw.open(img_name, data_file="mine.data") as img:
        img.write(0, b"ok")
        assert img.read(0, 4) == b"ok\0\0"
    assert (here / "mine.data").read_bytes()[:65538] == b"ok" + bytes(65534) + b"\x5a\x5a"
    assert ours("convert", "--data-file", "mine.data", "-O", "raw", img_name, "o.raw",
                cwd=here).returncode == 0


def test_missing_name_and_misuse(here: Path) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=t.data", "t.qcow2", "1M",
        cwd=here)
    run("qemu-img", "amend", "-o", "data_file=", "t.qcow2", cwd=here)
    with pytest.raises(DataFileRefused, match="does not name it"):
        qcow2rw.open("t.qcow2")
    with pytest.raises(DataFileRefused, match="'data-file' is required for this image"):
        qcow2rw.open("t.qcow2", trust_data_file=True)
    with qcow2rw.open("t.qcow2", data_file="t.data") as img:
        assert img.info()["format-specific"]["data"]["data-file-raw"] is False
    run("qemu-img", "create", "-q", "-f", "qcow2", "p.qcow2", "1M", cwd=here)
    with pytest.raises(qcow2rw.FormatError, match="'data-file' can only be set"):
        qcow2rw.open("p.qcow2", data_file="t.data")


@pytest.mark.parametrize("raw", [False, True])
def test_threads_against_a_shadow(here: Path, raw: bool) -> None:
    """Eight threads write, zero and discard (non-overlapping per round) through an
    AioImage; qemu reads the same disk, and with data_file_raw the data file itself."""
    import random
    size, cs = 8 * MiB, 65536
    shadow = bytearray(size)
    rng = random.Random(244 + raw)
    img = qcow2rw.create("c.qcow2", size, data_file="c.data", data_file_raw=raw)
    try:
        with img.aio(workers=8) as aio:
            for _ in range(6):
                slots = rng.sample(range(size // (256 * 1024)), 8)
                futures = []
                for slot in slots:
                    base = slot * 256 * 1024
                    off = base + rng.randrange(0, 128 * 1024)
                    n = rng.randrange(1, 128 * 1024)
                    what = rng.random()
                    if what < 0.6:
                        data = bytes([rng.randrange(1, 256)]) * n
                        shadow[off:off + n] = data
                        futures.append(aio.submit_write(off, data))
                    elif what < 0.8:
                        shadow[off:off + n] = bytes(n)
                        futures.append(aio.submit_write_zeroes(off, n))
                    else:
                        lo, hi = -(-off // cs) * cs, (off + n) // cs * cs
                        if lo < hi:
                            shadow[lo:hi] = bytes(hi - lo)
                        futures.append(aio.submit_discard(off, n))
                for f in futures:
                    f.result()
            aio.submit_flush().result()
        assert img.read(0, size) == bytes(shadow)
    finally:
        img.close()
    (here / "shadow.raw").write_bytes(bytes(shadow))
    run("qemu-img", "check", "c.qcow2", cwd=here)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", "shadow.raw", "c.qcow2", cwd=here)
    if raw:
        assert (here / "c.data").read_bytes() == bytes(shadow)
