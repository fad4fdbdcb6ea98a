#!/usr/bin/env python3
"""Benchmark: an allocating write's latency while another thread grows the refcount table.

Issue 11 §4: the allocator lock used to stay held across the refcount table's growth
(three fsyncs), so an allocating write to an unrelated L2 table waited for all of
them.  This tool makes the storage slow (every fdatasync sleeps ``--fsync-ms``, at the
storage seam: ``HostFile.faults``), then:

1. times 4 KiB in-place writes (allocated clusters, no sync): the baseline;
2. thread G allocates 8 KiB runs until the refcount table has grown (before issue 11:
   inside G's allocation, under the allocator lock; now prepared in memory there and
   committed by G's flush right after: blocks, sync, new table, sync, header, sync);
3. meanwhile thread W alternates allocating 4 KiB writes to other L2 tables with
   in-place 4 KiB writes, and records each one's latency, from G's start to its end.

It prints the in-place latencies (alone, and beside G), the allocating ones (alone,
and beside G) and the ratio of the worst allocating write beside G to the median
in-place write beside G (the issue's target: within 10x).  It runs against
whatever qcow2rw its source tree holds, so an older commit can be measured the same
way (``git worktree add /tmp/old COMMIT && python /tmp/old/tools/...``).

    python tools/bench_alloc_latency.py [--fsync-ms 50] [--lock-mode fine] [--dir DIR]

A benchmark, never a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree

import qcow2rw

CS = 512  # small clusters and 64-bit refcounts: a refcount table of one cluster
REFCOUNT_BITS = 64  # covers 64 * 64 clusters = 2 MiB of file, so it grows soon
KiB = 1024


class SlowDisk:
    """A storage-seam hook (``HostFile.faults``) that delays fdatasync, fails nothing."""

    def __init__(self, fsync_seconds: float) -> None:
        self.fsync_seconds = fsync_seconds

    def check(self, op: str) -> None:
        """Called by HostFile before each host I/O of kind *op*."""
        if op == "fsync":
            time.sleep(self.fsync_seconds)


def run(directory: str, fsync_ms: float, lock_mode: str) -> dict[str, float]:
    path = os.path.join(directory, "grow.qcow2")
    qcow2rw.create(path, 4 << 30, cluster_size=CS, refcount_bits=REFCOUNT_BITS).close()
    img = qcow2rw.open(path, lock_mode=lock_mode)
    span = CS << img.l2_bits  # guest bytes per L2 table
    w_base = 200 << 20  # W's own L2 table, far from G's area
    img.write(w_base, b"w" * (64 * KiB))  # allocated: the in-place baseline writes here
    img.flush()
    img.file.faults = SlowDisk(fsync_ms / 1000)

    inplace = []
    for k in range(200):
        t0 = time.perf_counter()
        img.write(w_base + (k % 16) * 4 * KiB, b"i" * (4 * KiB))
        inplace.append(time.perf_counter() - t0)
    alone = []
    a_base = 1 << 30  # allocating as W does below, with nothing beside it
    for k in range(400):
        t0 = time.perf_counter()
        img.write(a_base + k * 4 * KiB, b"a" * (4 * KiB))
        alone.append(time.perf_counter() - t0)
        time.sleep(0.001)
    inplace_beside: list[float] = []
    in_flush: list[float] = []

    during: list[float] = []
    flush_seconds = [0.0]
    growing = threading.Event()
    committing = threading.Event()  # G is in its flush (the old code grew before it)
    done = threading.Event()
    errors: list[BaseException] = []
    header_offset = img.header.refcount_table_offset

    def grower() -> None:
        try:
            guest = 0
            refcounts = img.refcounts
            growing.set()
            while (getattr(refcounts, "pending_growth", None) is None
                   and img.header.refcount_table_offset == header_offset):
                img.write(guest, b"g" * (8 * KiB))
                guest += 8 * KiB
            committing.set()
            t0 = time.perf_counter()
            img.flush()
            flush_seconds[0] = time.perf_counter() - t0
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)
            growing.set()
        finally:
            done.set()

    g = threading.Thread(target=grower)
    g.start()
    growing.wait()
    k = 0
    inplace_base = w_base
    while not done.is_set():
        t0 = time.perf_counter()
        img.write(w_base + 64 * KiB + k * 4 * KiB, b"n" * (4 * KiB))  # new clusters
        elapsed = time.perf_counter() - t0
        if not done.is_set():
            during.append(elapsed)
            if committing.is_set():
                in_flush.append(elapsed)
        t0 = time.perf_counter()
        img.write(inplace_base + (k % 16) * 4 * KiB, b"j" * (4 * KiB))
        elapsed = time.perf_counter() - t0
        if not done.is_set():
            inplace_beside.append(elapsed)
        k += 1
        if w_base + 64 * KiB + (k + 1) * 4 * KiB > w_base + span:
            k = 0
            w_base += span  # (next table; it stays cached: the cache holds many)
        time.sleep(0.001)
    g.join()
    img.file.faults = None
    grew = img.header.refcount_table_offset != header_offset
    img.close()
    if errors:
        raise errors[0]
    base = statistics.median(inplace_beside)
    return {
        "fsync_ms": fsync_ms,
        "grew": float(grew),
        "flush_s": flush_seconds[0],
        "inplace_alone_us": statistics.median(inplace) * 1e6,
        "alloc_alone_us": statistics.median(alone) * 1e6,
        "alloc_alone_max_us": max(alone) * 1e6,
        "inplace_median_us": base * 1e6,
        "inplace_max_us": max(inplace_beside) * 1e6,
        "alloc_p99_us": _p99(during) * 1e6 if during else float("nan"),
        "alloc_writes": float(len(during)),
        "alloc_median_us": statistics.median(during) * 1e6 if during else float("nan"),
        "alloc_max_us": max(during) * 1e6 if during else float("nan"),
        "ratio_max": (max(during) / base) if during else float("nan"),
        "flush_writes": float(len(in_flush)),
        "flush_median_us": statistics.median(in_flush) * 1e6 if in_flush else float("nan"),
        "flush_max_us": max(in_flush) * 1e6 if in_flush else float("nan"),
        "ratio_median": (statistics.median(during) / base) if during else float("nan"),
    }


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fsync-ms", type=float, default=50.0, help="delay of each fdatasync")
    parser.add_argument("--lock-mode", default="fine", choices=["mutex", "rwlock", "fine"])
    parser.add_argument("--dir", help="where the image goes (default: a temporary directory)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        result = run(directory, args.fsync_ms, args.lock_mode)
    print(f"lock mode {args.lock_mode}, fdatasync delayed {args.fsync_ms:.0f} ms, "
          f"refcount table grew: {bool(result['grew'])}")
    print(f"grower's flush (the growth's commit): {result['flush_s'] * 1000:.0f} ms")
    print(f"alone: in-place 4 KiB write {result['inplace_alone_us']:.0f} us (median); "
          f"allocating {result['alloc_alone_us']:.0f} us median, "
          f"{result['alloc_alone_max_us']:.0f} us max")
    print(f"beside G: in-place 4 KiB write, median: {result['inplace_median_us']:.0f} us, "
          f"max {result['inplace_max_us']:.0f} us")
    print(f"allocating 4 KiB writes to other L2 tables while G ran: "
          f"{int(result['alloc_writes'])}, median "
          f"{result['alloc_median_us']:.0f} us, p99 {result['alloc_p99_us']:.0f} us, "
          f"max {result['alloc_max_us']:.0f} us")
    print(f"  of them during G's flush: {int(result['flush_writes'])}, median "
          f"{result['flush_median_us']:.0f} us, max {result['flush_max_us']:.0f} us")
    print(f"ratio to the in-place median beside G: max {result['ratio_max']:.1f}x, "
          f"median {result['ratio_median']:.1f}x (target: max within 10x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
