#!/usr/bin/env python3
"""Benchmark: the synchronous ``Image`` against plain positional I/O on a raw file.

One run prints, for request sizes 4 KiB, 64 KiB and 1 MiB, sequential and random read
and write throughput of ``qcow2rw.Image`` on a fully allocated image next to
``os.preadv``/``os.pwrite`` on a raw file holding the same data, with the ratio
qcow2rw/raw.  Both files live in the same directory and go through the page cache (no
O_DIRECT, no fsync in the timed loops); reads use a preallocated ``bytearray`` on both
sides (``Image.readinto`` / ``os.preadv``).  Single-threaded.  Each figure is the median
of ``--repeat`` runs, qcow2 and raw runs interleaved.

    python tools/bench_sync.py [--size 256M] [--seconds 1 | --count N] [--repeat 3] [--dir DIR]

This is a benchmark, never a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree

import qcow2rw
from qcow2rw.units import UsageError, parse_size

REQUEST_SIZES = (4 << 10, 64 << 10, 1 << 20)
PATTERNS = ("seq read", "rand read", "seq write", "rand write")
FILL_CHUNK = 1 << 20
RANDOM_OFFSETS = 1 << 16


@dataclass
class Result:
    """One timed run: requests done, bytes moved, seconds spent."""

    requests: int
    nbytes: int
    seconds: float

    @property
    def mbps(self) -> float:
        """Throughput in MB/s (10**6 bytes per second)."""
        return self.nbytes / self.seconds / 1e6

    @property
    def iops(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds


def offsets_for(pattern: str, size: int, bs: int, seed: int) -> list[int]:
    """Request offsets aligned to *bs*: every slot in order, or 65536 uniformly random ones."""
    slots = size // bs
    if pattern.startswith("seq"):
        return [i * bs for i in range(slots)]
    rng = random.Random(seed)
    return [rng.randrange(slots) * bs for _ in range(RANDOM_OFFSETS)]


def timed(op: Callable[[int], Any], offsets: Sequence[int], bs: int, seconds: float | None,
          count: int | None) -> Result:
    """Call ``op(offset)`` cycling over *offsets*: *count* times, or for *seconds*."""
    done = 0
    check_every = max(1, min(64, (1 << 22) // bs))
    start = time.perf_counter()
    deadline = start + seconds if seconds is not None else None
    for off in itertools.cycle(offsets):
        op(off)
        done += 1
        if count is not None:
            if done >= count:
                break
        elif done % check_every == 0 and time.perf_counter() >= deadline:  # type: ignore[operator]
            break
    return Result(done, done * bs, time.perf_counter() - start)


def prepare(directory: str, size: int, cluster_size: int) -> tuple[str, str]:
    """Create the qcow2 image and the raw file, both fully written with the same data."""
    qpath = os.path.join(directory, "bench.qcow2")
    rpath = os.path.join(directory, "bench.raw")
    chunk = random.Random(1).randbytes(FILL_CHUNK)
    try:
        from tqdm import tqdm
        progress: Any = tqdm(total=size, unit="B", unit_scale=True, desc="fill",
                             disable=None, leave=False)
    except ImportError:  # tqdm is a dependency, but the benchmark runs without it
        progress = None
    fd = os.open(rpath, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with qcow2rw.create(qpath, size, cluster_size=cluster_size) as img:
            for off in range(0, size, FILL_CHUNK):
                data = chunk[: min(FILL_CHUNK, size - off)]
                img.write(off, data)
                os.pwrite(fd, data, off)
                if progress is not None:
                    progress.update(len(data))
            img.flush()
        os.fsync(fd)
    finally:
        os.close(fd)
        if progress is not None:
            progress.close()
    return qpath, rpath


Ops = dict[str, Callable[[int], Any]]


def request_ops(img: Any, fd: int, rbuf: bytearray, wbuf: bytes) -> tuple[Ops, Ops]:
    """The timed calls, qcow2rw's and raw's, reading into *rbuf* and writing *wbuf*."""
    qcow2_ops: Ops = {"read": lambda off: img.readinto(off, rbuf),
                      "write": lambda off: img.write(off, wbuf)}
    raw_ops: Ops = {"read": lambda off: os.preadv(fd, [rbuf], off),
                    "write": lambda off: os.pwrite(fd, wbuf, off)}
    return qcow2_ops, raw_ops


def bench(args: argparse.Namespace, qpath: str, rpath: str
          ) -> list[tuple[str, int, Result, Result]]:
    """Run every (pattern, request size) row; returns medians for qcow2 and raw."""
    rows = []
    with qcow2rw.open(qpath, lock_mode=args.lock_mode) as img:
        fd = os.open(rpath, os.O_RDWR)
        try:
            for bs in REQUEST_SIZES:
                rbuf = bytearray(bs)
                wbuf = random.Random(bs).randbytes(bs)
                q_ops, r_ops = request_ops(img, fd, rbuf, wbuf)
                for pattern in PATTERNS:
                    kind = pattern.split()[1]
                    q_runs, r_runs = [], []
                    for rep in range(args.repeat):
                        offs = offsets_for(pattern, args.size, bs, seed=rep)
                        q_runs.append(timed(q_ops[kind], offs, bs, args.seconds, args.count))
                        r_runs.append(timed(r_ops[kind], offs, bs, args.seconds, args.count))
                    rows.append((pattern, bs, median(q_runs), median(r_runs)))
                    print_row(*rows[-1])
        finally:
            os.close(fd)
    return rows


def median(results: list[Result]) -> Result:
    """The run with the median throughput (the upper one of the middle two when even)."""
    return sorted(results, key=lambda r: r.mbps)[len(results) // 2]


def _bs_label(bs: int) -> str:
    return f"{bs >> 20} MiB" if bs >= 1 << 20 else f"{bs >> 10} KiB"


HEADER = ("%-11s %7s | %10s %10s | %10s %10s | %7s"
          % ("pattern", "size", "qcow2 MB/s", "qcow2 IOPS", "raw MB/s", "raw IOPS", "ratio"))


def print_row(pattern: str, bs: int, q: Result, r: Result) -> None:
    """One table row, printed as soon as it is measured."""
    print("%-11s %7s | %10.1f %10.0f | %10.1f %10.0f | %6.2fx"
          % (pattern, _bs_label(bs), q.mbps, q.iops, r.mbps, r.iops, q.mbps / r.mbps),
          flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, prepare the files, print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="256M", help="virtual size of the image (default 256M)")
    p.add_argument("--cluster-size", default="64k", help="cluster size (default 64k)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--seconds", type=float, default=1.0,
                     help="time per run (default 1.0)")
    how.add_argument("--count", type=int, help="requests per run instead of a time limit")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure; the median is shown")
    p.add_argument("--lock-mode", default="fine", choices=("mutex", "rwlock", "fine"),
                   help="the image's lock mode (default fine)")
    p.add_argument("--dir", help="directory for the files (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the files")
    args = p.parse_args(argv)
    try:
        args.size = parse_size(args.size)
        cluster_size = parse_size(args.cluster_size, "cluster size")
    except UsageError as exc:
        p.error(str(exc))
    if args.size < REQUEST_SIZES[-1]:
        p.error("--size must be at least 1M")
    if args.count:
        args.seconds = None
    args.size -= args.size % REQUEST_SIZES[-1]

    directory = args.dir or tempfile.mkdtemp(prefix="qcow2rw-bench-")
    os.makedirs(directory, exist_ok=True)
    try:
        print(f"qcow2rw {getattr(qcow2rw, '__version__', '?')} bench_sync: "
              f"Python {platform.python_version()} ({platform.python_implementation()}), "
              f"{platform.machine()}")
        print(f"image {args.size >> 20} MiB, cluster size {cluster_size}, fully allocated; "
              f"raw file of the same data; dir {directory}")
        print(f"each figure: median of {args.repeat} runs of "
              + (f"{args.count} requests" if args.count else f"{args.seconds:g} s")
              + "; page cache, no fsync; 1 thread")
        qpath, rpath = prepare(directory, args.size, cluster_size)
        print(HEADER)
        print("-" * len(HEADER))
        bench(args, qpath, rpath)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
        elif not args.keep:
            for name in ("bench.qcow2", "bench.raw"):
                path = os.path.join(directory, name)
                if os.path.exists(path):
                    os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
