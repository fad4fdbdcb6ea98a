#!/usr/bin/env python3
"""Run a crashreplay workload's live part many times (``threads_growing`` by default:
four threads allocating 8 KiB runs with 512-byte clusters, 64-bit refcounts, an
8-table L2 cache and a growing refcount table) and report every run that fails.

It found a race (fixed in session 6, tests/test_cache_discard_race.py): a flush that
freed a cluster told the L2 cache to forget that cluster's table after the allocator
lock was released, so a new L2 table made meanwhile at the same cluster was dropped
unwritten and read back from the file (the old data: 1-3 runs in 100 failed).

    python tools/repro_growth_race.py [RUNS]          # WORKLOAD=name for another one
"""

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("QCOW2RW_DEBUG_LOCKS", "1")

import crashreplay  # noqa: E402

WORKLOAD = os.environ.get("WORKLOAD", "threads_growing")


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    fails = 0
    began = time.time()
    for i in range(runs):
        try:
            crashreplay.record_workload(WORKLOAD, tempfile.mkdtemp())
        except Exception as exc:  # noqa: BLE001 - the point is to see it
            fails += 1
            print(f"run {i}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
    print(f"{runs} runs, {fails} failed, {time.time() - began:.1f} s")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
