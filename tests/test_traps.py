"""The four concurrency traps of DESIGN §4, each closed and pinned by a deterministic test.

Every test here was seen to fail with its fix taken out; the ``*_without_fix``
variants keep that proof in the suite: they take the fix out with monkeypatch and
assert that the same scenario then goes wrong, so a test that cannot fail would show.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

import qcow2rw
from qcow2rw import cluster
from qcow2rw.events import EventPoints
from qcow2rw.image import Image
from qcow2rw.locks import NULL_LOCK

from refcount_oracle import refcount_mismatches

MODES = ["rwlock", "fine"]
CS = 65536


def _new(path: Path, mode: str, *, size: int = 64 << 20, **opts: Any) -> Image:
    qcow2rw.create(path, size, **opts).close()
    return qcow2rw.open(path, lock_mode=mode)


def _start(target: Any, *args: Any) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target(*args)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


# (a) two writers allocating at once never receive the same host cluster -------------

def _two_allocating_writers(img: Image) -> tuple[bytes, bytes]:
    """Two full-cluster writes into different L2 tables, both inside the free-run search."""
    barrier = threading.Barrier(2)
    original = img.refcounts._find_free_run

    def find_then_meet(start: int, count: int) -> int:
        found = original(start, count)
        try:
            barrier.wait(timeout=0.5)  # with the allocator lock the other writer cannot come
        except threading.BrokenBarrierError:
            pass
        return found

    img.refcounts._find_free_run = find_then_meet  # type: ignore[method-assign]
    second_table = 1 << img.l1_shift
    a, b = b"A" * CS, b"B" * CS
    t1, e1 = _start(img.write, 0, a)
    t2, e2 = _start(img.write, second_table, b)
    t1.join(10)
    t2.join(10)
    assert not e1 and not e2, (e1, e2)
    img.refcounts._find_free_run = original  # type: ignore[method-assign]
    return img.read(0, CS), img.read(second_table, CS)


@pytest.mark.parametrize("mode", MODES)
def test_a_allocating_writers_get_distinct_clusters(tmp_path: Path, mode: str) -> None:
    """Without the allocator lock both writers found the same free cluster (seen: the
    second table's data overwrote the first's, and the cluster had refcount 2)."""
    img = _new(tmp_path / "a.qcow2", mode, size=2 << 30)
    # Make the first table exist so both requests only allocate data clusters.
    img.write(CS * 5, b"x")
    img.write((1 << img.l1_shift) + CS * 5, b"y")
    first, second = _two_allocating_writers(img)
    assert first == b"A" * CS and second == b"B" * CS
    img.close()
    img = qcow2rw.open(tmp_path / "a.qcow2", readonly=True)
    assert refcount_mismatches(img) == ([], [])
    offsets = [e["offset"] for e in img.map() if "offset" in e]
    assert len(offsets) == len(set(offsets))
    img.close()


def test_a_without_fix_hands_out_one_cluster_twice(tmp_path: Path) -> None:
    """(In rwlock mode the allocator shares the one metadata mutex, so only the fine
    mode's allocator lock can be taken out alone.)"""
    img = _new(tmp_path / "a.qcow2", "fine", size=2 << 30)
    img.write(CS * 5, b"x")
    img.write((1 << img.l1_shift) + CS * 5, b"y")
    img.state.alloc_lock = NULL_LOCK  # the fix taken out
    first, second = _two_allocating_writers(img)
    assert first != b"A" * CS or second != b"B" * CS
    img.close()


# (b) a write racing an allocation in flight on the same guest cluster ----------------

def _racing_partial_writes(img: Image, guest: int) -> None:
    """Write sectors 0-3 of a cluster (paused after it wrote its new cluster, before it
    links it), then sectors 4-7 from another thread; resume the first."""
    events = img.events = EventPoints()
    events.set_break("l2_update")
    t1, e1 = _start(img.write, guest, b"1" * 2048)
    assert events.wait_break("l2_update")
    t2, e2 = _start(img.write, guest + 2048, b"2" * 2048)
    t2.join(0.3)  # with the fix it waits for the first request's allocation
    events.resume("l2_update")
    t1.join(10)
    t2.join(10)
    assert not t1.is_alive() and not t2.is_alive()
    assert not e1 and not e2, (e1, e2)
    img.events = None


def _check_race_result(img: Image, guest: int, old: bytes) -> None:
    data = img.read(guest, CS)
    assert data[:2048] == b"1" * 2048
    assert data[2048:4096] == b"2" * 2048
    assert data[4096:] == old[4096:]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["unallocated", "backing", "snapshot"])
def test_b_write_waits_for_allocation_in_flight(tmp_path: Path, qemu: Any, mode: str, kind: str) -> None:
    """Without the in-flight records the second write allocated its own cluster and the
    first one's link then replaced it (seen: sectors 4-7 read back as the old data)."""
    path = tmp_path / "b.qcow2"
    old = bytes(CS)
    if kind == "backing":
        base = tmp_path / "base.raw"
        base.write_bytes(os.urandom(4 * CS))
        qcow2rw.create(path, 4 * CS, backing_file="base.raw", backing_format="raw").close()
        old = base.read_bytes()[CS:2 * CS]
    else:
        qcow2rw.create(path, 4 * CS).close()
    if kind == "snapshot":
        qemu.qemu_io(str(path), f"write -P 0x77 0 {4 * CS}")
        qemu.qemu_img("snapshot", "-c", "s1", str(path))
        old = b"\x77" * CS
    img = qcow2rw.open(path, lock_mode=mode)
    _racing_partial_writes(img, CS)
    _check_race_result(img, CS, old)
    img.close()
    rc, out = qemu.check(str(path))
    assert rc == 0, out
    if kind == "snapshot":
        shutil.copy(path, tmp_path / "copy.qcow2")
        qemu.qemu_img("snapshot", "-a", "s1", str(tmp_path / "copy.qcow2"))
        qemu.qemu_io(str(tmp_path / "copy.qcow2"), f"read -P 0x77 0 {4 * CS}")


@pytest.mark.parametrize("mode", MODES)
def test_b_without_fix_loses_a_write(tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    img = _new(tmp_path / "b.qcow2", mode, size=4 * CS)
    monkeypatch.setattr(cluster, "_blocker", lambda *a: None)  # the fix taken out
    _racing_partial_writes(img, CS)
    data = img.read(CS, CS)
    assert data[:2048] != b"1" * 2048 or data[2048:4096] != b"2" * 2048
    img.close()


# (c) a read whose host cluster is freed and reused while the read is in flight -------

def _read_during_free_and_reuse(img: Image) -> bytes:
    img.write(0, b"R" * CS)  # guest cluster 0
    img.write(CS, b"x")      # make cluster 1's neighbour exist; cluster 2 stays unallocated
    img.flush()
    events = img.events = EventPoints()
    events.set_break("read_aio")
    out = bytearray(CS)
    reader, errors = _start(img.readinto, 0, out)
    assert events.wait_break("read_aio")  # looked up, data not read yet
    img.discard(0, CS)                    # frees guest cluster 0's host cluster...
    img.flush()                           # ...for real: the decrement is applied
    img.write(2 * CS, b"W" * CS)          # a new allocation: must not take that cluster
    events.resume("read_aio")
    reader.join(10)
    assert not errors, errors
    img.events = None
    return bytes(out)


@pytest.mark.parametrize("mode", MODES)
def test_c_read_never_sees_reused_cluster(tmp_path: Path, mode: str) -> None:
    """Without in-use counts the freed cluster went to the new write at once and the
    paused read returned b"W" * 65536 (seen)."""
    img = _new(tmp_path / "c.qcow2", mode, size=8 * CS)
    assert _read_during_free_and_reuse(img) == b"R" * CS
    assert img.read(2 * CS, CS) == b"W" * CS
    img.close()


@pytest.mark.parametrize("mode", MODES)
def test_c_without_fix_returns_foreign_data(tmp_path: Path, mode: str) -> None:
    img = _new(tmp_path / "c.qcow2", mode, size=8 * CS)
    img.state.track_use, img.state.pins = False, None  # the fix taken out (slow and fast path)
    assert _read_during_free_and_reuse(img) == b"W" * CS
    img.close()


# (d) nothing reaches the file before the refcount that protects it -------------------

def _replay_states(start: bytes, log: list[tuple[str, int, bytes]]) -> Any:
    """Crash states of a write log: every in-order prefix, and at each write the last
    synced state plus that write alone (the worst reordering inside an epoch)."""
    disk = bytearray(start)
    synced = bytes(disk)

    def apply(buf: bytearray, op: tuple[str, int, bytes]) -> None:
        kind, offset, data = op
        if kind == "write":
            if len(buf) < offset + len(data):
                buf.extend(bytes(offset + len(data) - len(buf)))
            buf[offset:offset + len(data)] = data
        elif kind == "truncate":
            del buf[offset:]
            buf.extend(bytes(max(0, offset - len(buf))))

    for index, op in enumerate(log):
        if op[0] == "sync":
            synced = bytes(disk)
            continue
        apply(disk, op)
        yield f"prefix {index}", bytes(disk)
        alone = bytearray(synced)
        apply(alone, op)
        yield f"synced + write {index} alone", bytes(alone)


def _corruptions(path: Path, state: bytes) -> list[int]:
    path.write_bytes(state)
    img = qcow2rw.open(path, readonly=True, force_share=True)
    try:
        return refcount_mismatches(img)[0]
    finally:
        img.close()


def _logged_workload(img: Image) -> None:
    cs = img.cluster_size
    for i in range(40):  # allocations in many tables, partial writes, discards, flushes
        img.write(i * 41 * cs + 100, bytes([i + 1]) * (cs + 300))
        if i % 7 == 3:
            img.discard((i - 2) * 41 * cs, 8 * cs)
        if i % 13 == 12:  # epochs long enough for the 8-table cache to evict
            img.flush()
    img.flush()


@pytest.mark.parametrize("mode", ["mutex", "rwlock", "fine"])
@pytest.mark.parametrize("cache_size", [None, 2048])
def test_d_write_order_keeps_refcounts_first(tmp_path: Path, mode: str, cache_size: int | None) -> None:
    """Every crash state of the recorded write order has leaks at worst.  With the L2
    write-back dependency removed, L2 tables reached the file before their clusters'
    refcounts (seen: states with 'refcount=0 reference=1' clusters)."""
    path = tmp_path / "d.qcow2"
    qcow2rw.create(path, 8 << 20, cluster_size=512).close()
    start = path.read_bytes()
    img = qcow2rw.open(path, lock_mode=mode, cache_size=cache_size)
    img.file.log = []
    _logged_workload(img)
    log = img.file.log
    img.close()
    scratch = tmp_path / "state.qcow2"
    checked = 0
    for name, state in _replay_states(start, log):
        assert _corruptions(scratch, state) == [], name
        checked += 1
    assert checked > 50


def test_d_without_fix_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "d.qcow2"
    qcow2rw.create(path, 8 << 20, cluster_size=512).close()
    start = path.read_bytes()
    img = qcow2rw.open(path, lock_mode="fine", cache_size=2048)
    img.l2_cache._before_writeback = None  # the fix taken out: L2 tables go first
    img.file.log = []
    _logged_workload(img)
    log = img.file.log
    img.close()
    scratch = tmp_path / "state.qcow2"
    bad = [name for name, state in _replay_states(start, log) if _corruptions(scratch, state)]
    assert bad
