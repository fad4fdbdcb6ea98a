#!/usr/bin/env python3
"""Reproducer of an open race (found in session 6, present since session 5 at least):
the ``threads_growing`` workload of tests/crashreplay.py (four threads allocating
8 KiB runs, 512-byte clusters, 64-bit refcounts, an 8-table L2 cache, the refcount
table growing) now and then ends with data bytes inside a cached L2 table ("Cluster
allocation offset 0x3030303332... beyond the end of the image file") or a data write
the overlap check stops ("overlaps with refcount block"): about 1 to 3 runs in 100.

Not a double allocation by RefcountManager.alloc or _make_blocks_for (checked by
wrapping them); deferring the table growth or not makes no difference.

    python tools/repro_growth_race.py [RUNS]
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
