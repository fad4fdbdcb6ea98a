"""``qcow2rw snapshot``, ``resize`` and ``amend`` run as subprocesses next to qemu-img on
the same files: the same listings byte for byte, the same sizes and options in
``qemu-img info``, the same exit statuses, one-line errors, and ``qemu-img check`` clean
after every step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.test_cli import run_cli, run_tool

pytestmark = pytest.mark.interop


def _clean(qemu: Any, cwd: Path, name: str) -> None:
    rc, report = qemu.check(str(cwd / name))
    assert rc == 0 and not report.get("leaks"), report


def _fails(proc: Any, message: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_snapshot_verbs_both_ways(qemu: Any, tmp_path: Path) -> None:
    run_tool("qemu-img", "create", "-q", "-f", "qcow2", "s.qcow2", "4M", cwd=tmp_path)
    run_tool("qemu-io", "-c", "write -P 1 0 1M", "s.qcow2", cwd=tmp_path)
    assert run_cli("snapshot", "-l", "s.qcow2", cwd=tmp_path).stdout == ""
    assert run_cli("snapshot", "-c", "ours", "s.qcow2", cwd=tmp_path).returncode == 0
    run_tool("qemu-io", "-c", "write -P 2 0 1M", "s.qcow2", cwd=tmp_path)
    run_tool("qemu-img", "snapshot", "-c", "theirs", "s.qcow2", cwd=tmp_path)
    run_tool("qemu-io", "-c", "write -P 3 0 1M", "s.qcow2", cwd=tmp_path)
    _clean(qemu, tmp_path, "s.qcow2")
    ours = run_cli("snapshot", "-l", "s.qcow2", cwd=tmp_path)
    theirs = run_tool("qemu-img", "snapshot", "-l", "s.qcow2", cwd=tmp_path)
    assert ours.returncode == 0 and ours.stdout == theirs.stdout
    assert "ours" in ours.stdout and "theirs" in ours.stdout
    # Ours reverts to qemu-img's snapshot and qemu-img to ours, by tag and by id.
    assert run_cli("snapshot", "-a", "theirs", "s.qcow2", cwd=tmp_path).returncode == 0
    run_tool("qemu-io", "-c", "read -P 2 0 1M", "s.qcow2", cwd=tmp_path)
    run_tool("qemu-img", "snapshot", "-a", "1", "s.qcow2", cwd=tmp_path)
    run_tool("qemu-io", "-c", "read -P 1 0 1M", "s.qcow2", cwd=tmp_path)
    _clean(qemu, tmp_path, "s.qcow2")
    # Errors: one line, exit 1, the image untouched.
    before = (tmp_path / "s.qcow2").read_bytes()
    _fails(run_cli("snapshot", "-c", "ours", "s.qcow2", cwd=tmp_path),
           "Could not create snapshot 'ours': Snapshot 'ours' already exists")
    _fails(run_cli("snapshot", "-a", "nosuch", "s.qcow2", cwd=tmp_path),
           "Could not apply snapshot 'nosuch': Failed to load snapshot: No such file or "
           "directory")
    _fails(run_cli("snapshot", "-d", "nosuch", "s.qcow2", cwd=tmp_path),
           "Could not delete snapshot 'nosuch': snapshot not found")
    _fails(run_cli("snapshot", "-l", "-c", "x", "s.qcow2", cwd=tmp_path),
           "Cannot mix '-l', '-a', '-c', '-d'")
    _fails(run_cli("snapshot", "-U", "-c", "x", "s.qcow2", cwd=tmp_path), "force-share")
    assert (tmp_path / "s.qcow2").read_bytes() == before
    # Delete both; qemu-img lists nothing afterwards and the image checks clean.
    assert run_cli("snapshot", "-d", "ours", "s.qcow2", cwd=tmp_path).returncode == 0
    # -d takes a name only, never an id (qemu-img's bdrv_snapshot_find); -a tries the id first
    for tool in (run_cli, lambda *a, **k: run_tool(*(("qemu-img",) + a), check=False, **k)):
        failed = tool("snapshot", "-d", "1", "s.qcow2", cwd=tmp_path)
        assert failed.returncode == 1
        assert "Could not delete snapshot '1': snapshot not found" in failed.stderr
    assert run_cli("snapshot", "-d", "theirs", "s.qcow2", cwd=tmp_path).returncode == 0
    assert run_tool("qemu-img", "snapshot", "-l", "s.qcow2", cwd=tmp_path).stdout == ""
    _clean(qemu, tmp_path, "s.qcow2")
    run_tool("qemu-io", "-c", "read -P 1 0 1M", "s.qcow2", cwd=tmp_path)


def test_snapshot_duplicate_tags_made_by_qemu(qemu: Any, tmp_path: Path) -> None:
    """qemu-img 7.2 lets two snapshots share a tag; we list them all, and a tag names
    the first one (after ids), as in qemu-img: deleting by tag removes id 1 first."""
    run_tool("qemu-img", "create", "-q", "-f", "qcow2", "d.qcow2", "1M", cwd=tmp_path)
    for _ in range(2):
        run_tool("qemu-img", "snapshot", "-c", "same", "d.qcow2", cwd=tmp_path)
    listing = run_tool("qemu-img", "snapshot", "-l", "d.qcow2", cwd=tmp_path).stdout
    assert run_cli("snapshot", "-l", "d.qcow2", cwd=tmp_path).stdout == listing
    assert run_cli("snapshot", "-d", "same", "d.qcow2", cwd=tmp_path).returncode == 0
    rows = run_tool("qemu-img", "snapshot", "-l", "d.qcow2", cwd=tmp_path).stdout.splitlines()
    assert len(rows) == 3 and rows[2].startswith("2 "), rows
    _clean(qemu, tmp_path, "d.qcow2")


def test_resize_verb_like_qemu_img(qemu: Any, tmp_path: Path) -> None:
    run_tool("qemu-img", "create", "-q", "-f", "qcow2", "r.qcow2", "4M", cwd=tmp_path)
    run_tool("qemu-io", "-c", "write -P 4 0 4M", "r.qcow2", cwd=tmp_path)

    def size() -> int:
        return int(qemu.info(str(tmp_path / "r.qcow2"))["virtual-size"])

    proc = run_cli("resize", "r.qcow2", "+2M", cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (0, "Image resized.\n") and size() == 6 << 20
    _fails(run_cli("resize", "r.qcow2", "-1M", cwd=tmp_path), "Use the --shrink option")
    assert size() == 6 << 20
    assert run_cli("resize", "--shrink", "r.qcow2", "-3M", cwd=tmp_path).returncode == 0
    assert size() == 3 << 20
    assert run_cli("resize", "-q", "r.qcow2", "8M", cwd=tmp_path).stdout == ""
    assert run_cli("resize", "--preallocation=metadata", "r.qcow2", "9M",
                   cwd=tmp_path).returncode == 0
    _fails(run_cli("resize", "r.qcow2", "-10G", cwd=tmp_path), "New image size must be positive")
    _fails(run_cli("resize", "r.qcow2", "1000", cwd=tmp_path), "multiple of 512")
    _fails(run_cli("resize", "--shrink", "--preallocation=full", "r.qcow2", "1M", cwd=tmp_path),
           "Preallocation can only be used for growing images")
    assert size() == 9 << 20
    _clean(qemu, tmp_path, "r.qcow2")
    run_tool("qemu-io", "-c", "read -P 4 0 3M", "-c", "read -P 0 3M 6M", "r.qcow2", cwd=tmp_path)


def test_amend_verb_like_qemu_img(qemu: Any, tmp_path: Path) -> None:
    run_tool("qemu-img", "create", "-q", "-f", "qcow2", "a.qcow2", "2M", cwd=tmp_path)
    run_tool("qemu-io", "-c", "write -P 5 0 1M", "-c", "write -z 1M 64k", "a.qcow2", cwd=tmp_path)

    def data() -> dict[str, Any]:
        return qemu.info(str(tmp_path / "a.qcow2"))["format-specific"]["data"]

    assert run_cli("amend", "-o", "refcount_bits=64,lazy_refcounts=on", "a.qcow2",
                   cwd=tmp_path).returncode == 0
    assert (data()["refcount-bits"], data()["lazy-refcounts"]) == (64, True)
    _clean(qemu, tmp_path, "a.qcow2")
    _fails(run_cli("amend", "-o", "compat=0.10", "a.qcow2", cwd=tmp_path),
           "compat=0.10 requires refcount_bits=16")  # (qemu-img's words)
    assert run_cli("amend", "-o", "lazy_refcounts=off", "-o", "compat=0.10,refcount_bits=16",
                   "a.qcow2", cwd=tmp_path).returncode == 0
    assert (data()["compat"], data()["refcount-bits"]) == ("0.10", 16)
    assert run_cli("amend", "-o", "compat=1.1,size=1M", "a.qcow2", cwd=tmp_path).returncode == 0
    assert data()["compat"] == "1.1"
    assert qemu.info(str(tmp_path / "a.qcow2"))["virtual-size"] == 1 << 20
    _clean(qemu, tmp_path, "a.qcow2")
    run_tool("qemu-io", "-c", "read -P 5 0 1M", "a.qcow2", cwd=tmp_path)
    before = (tmp_path / "a.qcow2").read_bytes()
    _fails(run_cli("amend", "a.qcow2", cwd=tmp_path), "Must specify options (-o)")
    _fails(run_cli("amend", "-o", "cluster_size=4k", "a.qcow2", cwd=tmp_path),
           "Invalid parameter 'cluster_size'")
    _fails(run_cli("amend", "-o", "compat=0.9", "a.qcow2", cwd=tmp_path),
           "Unknown compatibility level 0.9")
    _fails(run_cli("amend", "-o", "refcount_bits=3", "a.qcow2", cwd=tmp_path),
           "Refcount width must be a power of two")
    _fails(run_cli("amend", "-o", "lazy_refcounts=maybe", "a.qcow2", cwd=tmp_path),
           "expects 'on' or 'off'")
    assert (tmp_path / "a.qcow2").read_bytes() == before
    assert "refcount_bits" in run_cli("amend", "-o", "help", cwd=tmp_path).stdout
