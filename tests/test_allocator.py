"""The cluster allocator's search hints (RefcountManager.alloc): fast past small holes,
holes still reused.

Issue 11 §4 measured an allocating write's worst time while another thread grew the
refcount table (tools/bench_alloc_latency.py).  Its tail was the allocator: a free
left single-cluster holes, ``free_hint`` stayed at the first of them, and every run
longer than the holes searched again from there, loading every refcount block up to
the end of the file (117 blocks per 4 KiB write in that run).  ``no_run`` records
that no run that long starts below the last one found, until a cluster below is freed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import qcow2rw
from qcow2rw.image import Image

CS = 512
RUN = 8  # a 4 KiB write of new data: 8 clusters in a row


def _image_with_holes(tmp_path: Path) -> Image:
    """An image whose file has single free clusters between data, every 16 clusters.

    Writes 16-cluster extents at increasing guest offsets (one run each, in order),
    then discards the second cluster of each: after the flush that applies the frees,
    the file has a one-cluster hole every 16 clusters."""
    path = tmp_path / "holes.qcow2"
    qcow2rw.create(path, 64 << 20, cluster_size=CS, refcount_bits=64).close()
    img = qcow2rw.open(path)
    for k in range(64):
        img.write(k * 16 * CS, b"d" * (16 * CS))
    img.flush()
    for k in range(64):
        img.discard(k * 16 * CS + CS, CS)
    img.flush()  # applies the deferred frees: the holes are free now
    return img


def _count_block_loads(img: Image) -> list[int]:
    """Count MetadataCache.get calls on the refcount block cache from now on."""
    cache = img.refcounts.cache
    calls = [0]
    original = cache.get

    def counting_get(offset: int, held: object = None) -> object:
        calls[0] += 1
        return original(offset, held)  # type: ignore[arg-type]

    cache.get = counting_get  # type: ignore[method-assign]
    return calls


def test_long_runs_do_not_search_the_small_holes_again(tmp_path: Path) -> None:
    """After one search for 8 clusters has passed the one-cluster holes, the next
    searches start past them: a block lookup or two each, not one per block of the
    file.  (Before no_run: each 8-cluster allocation looked at every block from the
    first hole on: 12 per allocation here (250 for 20), more as the file grows.)"""
    img = _image_with_holes(tmp_path)
    refs = img.refcounts
    with img._alloc_lock:
        refs.alloc(RUN)  # passes the holes once
    calls = _count_block_loads(img)
    with img._alloc_lock:
        for _ in range(20):
            refs.alloc(RUN)
    # RUN lookups each are the increments (one per cluster); the search adds one or two
    searched = calls[0] - RUN * 20
    assert searched <= 2 * 20, f"{searched} refcount block lookups to search 20 runs"
    img.close()


def test_holes_are_still_reused(tmp_path: Path) -> None:
    """Single-cluster allocations (a new L2 table, a one-cluster write) still fill
    the holes below the record, and a run freed below it is found by the next long
    search."""
    img = _image_with_holes(tmp_path)
    refs = img.refcounts
    with img._alloc_lock:
        refs.alloc(RUN)
        first_hole = refs.free_hint
        assert refs.no_run is not None and refs.no_run[1] > first_hole
        single = refs.alloc(1) >> img.cluster_bits
        assert single == first_hole, "a one-cluster allocation skipped the first hole"
        assert refs.no_run is not None, "a shorter allocation dropped the record"
    # Free a run of 16 clusters low in the file: the next long search must find it.
    img.discard(2 * 16 * CS, 16 * CS)
    img.flush()
    assert refs.no_run is None, "a free below the record left it standing"
    with img._alloc_lock:
        start = refs.alloc(RUN) >> img.cluster_bits
    assert start < first_hole + 4 * 16, f"the freed run was not reused (got cluster {start})"
    img.check()
    img.close()


def test_allocations_stay_consistent_under_the_record(tmp_path: Path) -> None:
    """Writes of mixed sizes over a file full of holes, then check: no cluster is
    handed out twice (qcow2rw's own check; test_traps and the stress run this against
    qemu-img check)."""
    img = _image_with_holes(tmp_path)
    base = 32 << 20
    for k in range(200):
        size = CS * (1 + (k * 7) % 12)
        img.write(base + k * 16 * CS, bytes([k % 251]) * size)
    for k in range(200):
        size = CS * (1 + (k * 7) % 12)
        assert img.read(base + k * 16 * CS, size) == bytes([k % 251]) * size
    report = img.check()
    assert report.corruptions == 0 and report.leaks == 0, report
    img.close()


def test_the_allocator_contract_is_checked_in_debug_mode(tmp_path: Path) -> None:
    """RefcountManager's "caller holds the allocator lock, or the image exclusively"
    is checked in debug mode (the suite's mode: conftest sets QCOW2RW_DEBUG_LOCKS):
    a call with neither raises; with either it works."""
    from qcow2rw.locks import DEBUG_LOCKS

    path = tmp_path / "contract.qcow2"
    qcow2rw.create(path, 1 << 20, cluster_size=CS).close()
    img = qcow2rw.open(path, lock_mode="fine")
    assert DEBUG_LOCKS
    with pytest.raises(AssertionError, match="allocator lock"):
        img.refcounts.alloc(1)
    with img._alloc_lock:
        img.refcounts.free_now(img.refcounts.alloc(1) >> img.cluster_bits)
    with img.exclusive():
        img.refcounts.free_now(img.refcounts.alloc(1) >> img.cluster_bits)
    img.close()


def test_a_search_after_a_free_skips_the_full_blocks(tmp_path: Path) -> None:
    """A free below the hint sends the next long search back to it (as QEMU's
    free_cluster_index); blocks that an earlier search saw without a free cluster are
    skipped without being loaded (RefcountManager.full_blocks).  (Before: every block
    from the freed cluster to the end of the file was loaded and scanned again: 67
    loads here, against 5.)"""
    path = tmp_path / "dense.qcow2"
    qcow2rw.create(path, 64 << 20, cluster_size=CS, refcount_bits=64).close()
    img = qcow2rw.open(path)
    for k in range(2000):  # one cluster each: a file with no hole, ~35 blocks long
        img.write(k * CS, b"x" * CS)
    img.flush()
    refs = img.refcounts
    blocks = len([e for e in refs.reftable if e])
    assert blocks > 30
    img.discard(5 * CS, CS)  # a hole near the start
    img.flush()
    with img._alloc_lock:
        refs.alloc(RUN)  # searches from the hole to the end once: marks the full blocks
    img.discard(7 * CS, CS)  # another: the next long search starts there again
    img.flush()
    calls = _count_block_loads(img)
    with img._alloc_lock:
        refs.alloc(RUN)
    searched = calls[0] - RUN
    assert searched <= 8, f"{searched} refcount blocks loaded to search ({blocks} in the file)"
    img.check()
    img.close()
