"""Hostile images (issue 6): every mutation of tests/hostile.py, in limited subprocesses.

All images are built once per session and run in a few batches of worker processes
(``tests/hostile.py`` as a script), each under an address-space limit and a
wall-clock timeout.  Each mutation is then one test that checks, from its results:

- no traceback from inside (only qcow2rw errors and OSError escape), no hang, no
  memory blow-up (the worker would die or time out: every image of the batch fails);
- the promised outcome class (refused at open with which error and message; marked
  corrupt by which request, after which only read-only opens work; served);
- where ``qemu-img info`` refuses the image, we refuse it too, at the open for data
  and at the metadata-only open ``info`` uses (QEMU's BDRV_O_NO_IO);
- after our ``check -r all``, ``qemu-img check`` calls the image clean, unless the
  mutation is marked as beyond QEMU's own repair (proved on a fresh copy).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import hostile
import pytest

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parent.parent
MEMORY_LIMIT_MB = 1024
QEMU_MEMORY_LIMIT_MB = 16384
BATCHES = 6
BATCH_TIMEOUT = 120.0
QEMU_TIMEOUT = 20.0


def _limit_qemu_memory() -> None:
    # QEMU reserves address space generously (thread stacks, its coroutine pool): a
    # limit near ours makes it fail at random, so it only stops runaway allocations.
    limit = QEMU_MEMORY_LIMIT_MB << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def qemu_img(*args: str) -> subprocess.CompletedProcess[str] | None:
    """qemu-img under limits (it spins on some hostile images); None on timeout."""
    try:
        return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False,
                              errors="replace", timeout=QEMU_TIMEOUT,
                              preexec_fn=_limit_qemu_memory)
    except subprocess.TimeoutExpired:
        return None


def run_batch(paths: list[str]) -> dict[str, dict[str, Any]]:
    """Run the worker on *paths*; an image whose result never came is marked so."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hostile.py"),
                             str(MEMORY_LIMIT_MB), *paths],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=BATCH_TIMEOUT)
        failure = f"worker exited with {proc.returncode}: {stderr[-2000:]}"
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        failure = f"worker timed out after {BATCH_TIMEOUT} s"
    results: dict[str, dict[str, Any]] = {}
    current = None
    for line in stdout.splitlines():
        record = json.loads(line)
        if "start" in record:
            current = record["start"]
        else:
            results[record["path"]] = record
            current = None
    for path in paths:
        if path not in results:
            blame = " (this image was running)" if path == current else ""
            results[path] = {"path": path, "crash": failure + blame}
    return results


@pytest.fixture(scope="session")
def hostile_results(qemu: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    where = tmp_path_factory.mktemp("hostile")
    bases = hostile.build_bases(qemu, where / "bases")
    images = {m.name: m.make(bases, where) for m in hostile.MUTATIONS}
    fresh = where / "fresh"
    fresh.mkdir()
    for m in hostile.MUTATIONS:
        if m.repair == "qemu-too":
            m.make(bases, fresh)
    with ThreadPoolExecutor(BATCHES) as pool:
        infos = dict(zip(images, pool.map(lambda p: qemu_img("info", "-U", str(p)),
                                          images.values())))
        paths = [str(p) for p in images.values()]
        batches = [paths[i::BATCHES] for i in range(BATCHES)]
        results: dict[str, dict[str, Any]] = {}
        for part in pool.map(run_batch, batches):
            results.update(part)
        opened = [name for name, p in images.items()
                  if results[str(p)].get("open_ro") == "ok"]  # (qemu-img spins on loops)
        finals = dict(zip(opened, pool.map(lambda n: qemu_img("check", str(images[n])),
                                           opened)))
    return {"images": images, "results": results, "qemu_info": infos, "qemu_check": finals,
            "fresh": fresh}


@pytest.mark.parametrize("mutation", hostile.MUTATIONS, ids=lambda m: m.name)
def test_hostile_image(hostile_results: dict[str, Any], mutation: hostile.Mutation) -> None:
    path = hostile_results["images"][mutation.name]
    out = hostile_results["results"][str(path)]
    assert "crash" not in out, out["crash"]
    outcome = hostile.classify(out)
    assert outcome == mutation.expect, out
    if outcome.startswith("refused:"):
        assert mutation.message in out["open_ro"], out["open_ro"]
        assert out["open_rw"] == out["open_ro"]
    info = hostile_results["qemu_info"][mutation.name]
    if info is None or info.returncode != 0:  # QEMU refuses at open (or hangs): so do we
        assert outcome.startswith("refused:"), (info.stderr if info else "qemu-img hung", out)
        assert out["open_meta"] != "ok", (info.stderr if info else "qemu-img hung", out)
    if outcome == "corrupt-write":
        assert out["reopen_rw"].startswith("CorruptImage"), out
        assert out["reopen_ro"] == "ok", out
    if outcome.startswith("refused:"):
        return
    assert out["repair"] == "ok" and out["recheck"] == "ok", out
    final = hostile_results["qemu_check"][mutation.name]
    assert final is not None, "qemu-img check hung on the repaired image"
    if mutation.repair == "clean":
        assert final.returncode == 0, (final.stdout, final.stderr, out)
        assert out["recheck_result"]["corruptions"] == 0, out
    else:  # damage QEMU cannot repair either: prove it on a fresh copy
        copy = hostile_results["fresh"] / path.name
        qemu_img("check", "-r", "all", str(copy))
        theirs = qemu_img("check", str(copy))
        assert theirs is not None and theirs.returncode != 0, theirs


def test_enough_mutations() -> None:
    """Issue 6 asks for at least 60 distinct mutations over every structure."""
    assert len(hostile.MUTATIONS) >= 60
    assert {m.base for m in hostile.MUTATIONS} >= {"plain", "v2", "snap", "comp", "overlay"}


# --------------------------------------------------------------------------- details
def _image(qemu: Any, tmp_path: Path, name: str) -> Path:
    bases = hostile.build_bases(qemu, tmp_path / "bases")
    mutation = next(m for m in hostile.MUTATIONS if m.name == name)
    return mutation.make(bases, tmp_path)


def _incompatible(path: Path) -> int:
    with open(path, "rb") as f:
        f.seek(72)
        return int.from_bytes(f.read(8), "big")


@pytest.mark.parametrize("mode, caught", [(True, True), ("cached", True), ("all", True),
                                          ("constant", False), (False, False)])
def test_overlap_check_modes(qemu: Any, tmp_path: Path, mode: Any, caught: bool) -> None:
    """An L2 entry naming its own L2 table: "cached" (the default) and "all" refuse the
    write; "constant" does not watch L2 tables, and "none" watches nothing."""
    import qcow2rw
    path = _image(qemu, tmp_path, "l2_entry_to_own_l2")
    with qcow2rw.open(path, overlap_check=mode) as img:
        if caught:
            with pytest.raises(qcow2rw.CorruptImage, match="overlaps with active L2 table"):
                img.write(0, b"x" * 512)
            with pytest.raises(qcow2rw.CorruptImage):  # and every write after it
                img.write(1 << 20, b"x" * 512)
        else:
            img.write(0, b"x" * 512)  # lands on the L2 table, as QEMU would let it
    assert bool(_incompatible(path) & 2) == caught


def test_overlap_check_bad_value(tmp_path: Path) -> None:
    import qcow2rw
    qcow2rw.create(tmp_path / "a.qcow2", 1 << 20).close()
    with pytest.raises(ValueError):
        qcow2rw.open(tmp_path / "a.qcow2", overlap_check="sometimes")


def test_failed_dirty_repair_keeps_the_dirty_bit(qemu: Any, tmp_path: Path) -> None:
    """A dirty image whose repair fails on open is closed as it was: still dirty."""
    import qcow2rw
    bases = hostile.build_bases(qemu, tmp_path / "bases")
    damage = hostile.Mutation("dirty_past_eof", "lazy", hostile.both(
        hostile.put(72, ">Q", 1), hostile.put(hostile.l2e(0), ">Q", hostile.COPIED | (1 << 40))),
        "corrupt-read")
    path = damage.make(bases, tmp_path)
    with pytest.raises(qcow2rw.CorruptImage):
        qcow2rw.open(path)
    assert _incompatible(path) & 1
    with qcow2rw.open(path, readonly=True) as img:  # read-only opens leave it alone
        assert img.info()["dirty-flag"]


def test_check_mode_open(qemu: Any, tmp_path: Path) -> None:
    """open_image(check_mode=True): the corrupt bit is accepted read-write, autoclear bits
    are kept, a dirty image is not repaired (the check does all that)."""
    import struct

    import qcow2rw
    from qcow2rw.image import open_image
    path = _image(qemu, tmp_path, "incompat_corrupt")
    with open(path, "r+b") as f:
        f.seek(88)
        f.write(struct.pack(">Q", 1 << 30))
    with pytest.raises(qcow2rw.CorruptImage, match="cannot be opened read/write"):
        qcow2rw.open(path)
    img = open_image(path, check_mode=True)
    assert not img.readonly
    img.close()
    assert _incompatible(path) == 2
    with open(path, "rb") as f:
        f.seek(88)
        assert struct.unpack(">Q", f.read(8))[0] == 1 << 30
    with open_image(path, check_mode=True) as img:
        assert img.check("all").corruptions == 0
    assert _incompatible(path) == 0
    with qcow2rw.open(path) as img:  # repaired: read-write again; unknown autoclear cleared
        img.write(0, b"ok")
    with open(path, "rb") as f:
        f.seek(88)
        assert struct.unpack(">Q", f.read(8))[0] == 0


def test_snapshot_shared_cluster_with_refcount_one_is_not_freed(qemu: Any, tmp_path: Path) -> None:
    """Stricter than QEMU: a cluster the snapshot shares, whose refcount says 1, is not
    freed when the active image drops it, so no later allocation overwrites it."""
    import qcow2rw
    bases = hostile.build_bases(qemu, tmp_path / "bases")
    snap = bases["snap"]
    shared = hostile.u64(snap.raw, snap.l2 + 8 * 16) & hostile.L2_MASK  # guest 1 MiB
    damage = hostile.Mutation("snap_shared_refcount_one", "snap",
                              hostile.refcount_of(lambda lay: shared, 1), "served")
    path = damage.make(bases, tmp_path)
    with qcow2rw.open(path) as img:
        img.discard(1 << 20, 64 << 10)
        img.flush()
        for i in range(8):  # allocations that would take the freed cluster
            img.write((300 << 20) + i * (64 << 10), bytes([0xEE]) * (64 << 10))
        img.apply_snapshot("s1")
        assert img.read(1 << 20, 64 << 10) == bytes([0x22]) * (64 << 10)
