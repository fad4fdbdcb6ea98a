"""A refcount table growth does not hold allocations back (issue 11 §4).

A request whose allocation needs a bigger refcount table prepares the growth in
memory (new blocks in the cache, the new table in ``reftable``) under the allocator
lock; the next write-back commits it (blocks, sync, new table, sync, header, sync)
under the refcount I/O lock alone.  While the commit waits for the disk, other
requests allocate.  The figure (allocating-write latency under slow storage) is in
``tools/bench_alloc_latency.py``; these tests hold the commit at an event point.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

import qcow2rw
from qcow2rw.events import EventPoints

from helpers import qemu_check_clean

CS = 512
KiB = 1024
W_OFFSET = 32 << 20  # the other writer's L2 table, far from the growing area


def _image(path: Path, lock_mode: str = "fine") -> Any:
    qcow2rw.create(path, 64 << 20, cluster_size=CS, refcount_bits=64).close()
    img = qcow2rw.open(path, lock_mode=lock_mode)
    img.write(W_OFFSET, b"w" * CS)  # the other writer's table exists and is cached
    img.flush()
    img.events = EventPoints()
    return img


def _allocate_until_growth(img: Any) -> int:
    """Allocate 8 KiB runs from guest 0 until a growth is pending; the guest end."""
    guest = 0
    start = img.header.refcount_table_offset
    while img.refcounts.pending_growth is None:
        assert img.header.refcount_table_offset == start, "the growth was not deferred"
        img.write(guest, bytes([guest // 8192 % 251 + 1]) * (8 * KiB))
        guest += 8 * KiB
    return guest


def _allocating_write(img: Any, done: threading.Event) -> threading.Thread:
    def write() -> None:
        img.write(W_OFFSET + 4 * KiB, b"n" * (4 * KiB))  # new clusters, another table
        done.set()
    thread = threading.Thread(target=write)
    thread.start()
    return thread


@pytest.mark.parametrize("lock_mode", ["fine"])
def test_allocation_goes_on_while_a_growth_commits(qemu: Any, tmp_path: Path,
                                                   lock_mode: str) -> None:
    path = tmp_path / "g.qcow2"
    img = _image(path, lock_mode)
    end = _allocate_until_growth(img)
    old_table = img.header.refcount_table_offset
    img.events.set_break("flush_to_disk")
    flusher = threading.Thread(target=img.flush)
    flusher.start()
    assert img.events.wait_break("flush_to_disk")
    assert img.refcounts.committing is not None  # held inside the growth's commit
    done = threading.Event()
    writer = _allocating_write(img, done)
    try:
        assert done.wait(5), "an allocating write waited for the refcount table's growth"
    finally:
        img.events.resume("flush_to_disk")
        flusher.join()
        writer.join()
    assert img.header.refcount_table_offset != old_table
    img.events = None
    for guest in range(0, end, 8 * KiB):
        assert img.read(guest, 8 * KiB) == bytes([guest // 8192 % 251 + 1]) * (8 * KiB)
    assert img.read(W_OFFSET + 4 * KiB, 4 * KiB) == b"n" * (4 * KiB)
    img.close()
    qemu_check_clean(qemu, path, "after a growth committed beside an allocation")


def test_growth_under_the_allocator_lock_blocks_allocation(tmp_path: Path) -> None:
    """The old behaviour (growth written at once, inside the allocation, under the
    allocator lock), which an exclusive holder still gets: the same allocating write
    then waits for the commit.  The check above is not blind."""
    img = _image(tmp_path / "g.qcow2")
    img.refcounts.defer_growth = lambda: False
    img.events.set_break("reftable_grow")  # (a pause there holds the allocator lock)
    start = img.header.refcount_table_offset

    def grow() -> None:
        guest = 0
        while img.header.refcount_table_offset == start:
            img.write(guest, b"g" * (8 * KiB))
            guest += 8 * KiB

    grower = threading.Thread(target=grow)
    grower.start()
    assert img.events.wait_break("reftable_grow")
    done = threading.Event()
    writer = _allocating_write(img, done)
    try:
        assert not done.wait(0.5)
    finally:
        img.events.resume("reftable_grow")
        grower.join()
        writer.join()
    assert done.is_set()
    img.events = None
    img.close()


def test_exclusive_operations_commit_a_growth_at_once(tmp_path: Path) -> None:
    """A growth prepared by a request is on disk before an exclusive operation looks
    at the refcount structures (here: a check, which flushes first, finds it clean)."""
    img = _image(tmp_path / "g.qcow2")
    _allocate_until_growth(img)
    result = img.check()
    assert result.corruptions == 0 and result.leaks == 0, result
    assert img.refcounts.pending_growth is None
    img.close()


def test_a_growth_keeps_the_overlap_map(qemu: Any, tmp_path: Path) -> None:
    """A growth updates the overlap map in place (the new table added when it is
    prepared, the old one taken out at the commit) instead of throwing it away: no
    request after it pays for a rebuild (O(L1 + refcount table): 6 ms per rebuild on
    a 4 GiB image of 512-byte clusters, the worst allocating write of
    tools/bench_alloc_latency.py), not even when the old table's clusters are freed.
    The map still names the new table, and no longer the old one."""
    path = tmp_path / "grow.qcow2"
    img = _image(path)
    img.events = None
    overlap = img.overlap
    overlap.find(0, 1)  # built
    rebuilds = [0]
    original = overlap._rebuild

    def counting_rebuild() -> Any:
        rebuilds[0] += 1
        return original()

    overlap._rebuild = counting_rebuild
    old = (img.header.refcount_table_offset, img.header.refcount_table_clusters * CS)
    guest = _allocate_until_growth(img)
    img.flush()  # commits the growth, then frees the old table (deferred frees)
    img.write(guest, b"after" * 100)
    img.flush()
    new = (img.header.refcount_table_offset, img.header.refcount_table_clusters * CS)
    assert new != old
    assert rebuilds[0] == 0, f"{rebuilds[0]} rebuilds of the overlap map"
    assert overlap.find(new[0], new[1]) == "refcount table"
    assert overlap.find(old[0], old[1]) != "refcount table"
    overlap._rebuild = original
    overlap.invalidate()  # a map built from scratch says the same
    assert overlap.find(new[0], new[1]) == "refcount table"
    assert overlap.find(old[0], old[1]) != "refcount table"
    img.close()
    qemu_check_clean(qemu, path)
