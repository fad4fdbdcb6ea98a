#!/usr/bin/env python3
"""Crash replay (issue 7): record workloads' write logs, rebuild every crash state, check each.

    python tools/crashtest.py                     # every workload, full replay, all checks
    python tools/crashtest.py -w alloc -w lazy    # some workloads
    python tools/crashtest.py --fast              # barrier prefixes and single drops only
    python tools/crashtest.py --qemu check -j 16  # qemu-img check only (no -r, no qemu-io)

For each workload the starting image is created, the workload runs with the write log
on, and the log is replayed onto a copy of the starting image: every prefix ending at
a barrier (fsync), every prefix inside an epoch, each single write of an epoch dropped,
a random sample of reorderings per epoch, torn writes cut at 512 B and 4 KiB.  Each
distinct state is checked by qemu-img check (no corruption; -r leaks / -r all then
clean), by a read-write open in QEMU (qemu-io write) and in qcow2rw, and by reading
back every flushed write.  The last line is the summary:

    N crash states checked, 0 corruptions, 0 lost flushed writes

Exit status 0 when every state passed, 1 otherwise.  The logic is in
``tests/crashreplay.py`` (test tooling, not installed).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # crashreplay lives with the tests

import crashreplay


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-w", "--workload", action="append", choices=sorted(crashreplay.WORKLOADS),
                        help="workload to replay (repeatable; default: all)")
    parser.add_argument("--fast", action="store_true",
                        help="only barrier prefixes and single drops (the CI subset)")
    parser.add_argument("--qemu", choices=("none", "check", "full"), default="full",
                        help="how much QEMU checks each state (default: full)")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 4,
                        help="states checked at once")
    parser.add_argument("--reorders", type=int, default=6, help="random reorderings per epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true", help="print every failure")
    args = parser.parse_args(argv)
    if args.qemu != "none" and not crashreplay.qemu_available():
        print("qemu-img/qemu-io not found (use --qemu none)", file=sys.stderr)
        return 2
    names = args.workload or list(crashreplay.WORKLOADS)
    start = time.monotonic()
    total = crashreplay.Summary()
    with tempfile.TemporaryDirectory() as workdir:
        for name in names:
            rec = crashreplay.record_workload(name, workdir)
            summary = crashreplay.check_parallel(
                [rec], full=not args.fast, qemu=args.qemu, jobs=args.jobs,
                reorders=args.reorders, seed=args.seed)
            print(f"{name:13s} {len(rec.io):5d} log entries  {summary.line()}", flush=True)
            for failure in summary.failures[:None if args.verbose else 3]:
                print(f"    {failure}", flush=True)
            total.merge(summary)
    print(f"({time.monotonic() - start:.0f} s)")
    print(total.line())
    return 0 if not total.failures else 1


if __name__ == "__main__":
    sys.exit(main())
