#!/usr/bin/env python3
"""Benchmark qcow2rw against qemu-img bench and plain Python positional I/O, side by side.

One run measures, for 4 KiB, 64 KiB and 1 MiB reads and writes at queue depth 1, 8
and 32 (issue 4, "Performance"; method of ``anchors/performance-baseline.md``):

* ``qemu-img bench -f qcow2 -t writeback -c N -d D -s S [-w --pattern=171] IMG``, as a
  subprocess, timed by its own "Run completed in X seconds" (process start and the
  flush at close are outside it);
* **raw-py**: plain Python on RAW, a raw file holding the same data: one submitter keeps
  D requests in flight on a ``ThreadPoolExecutor`` of ``--workers`` threads, each
  request one ``os.preadv`` into a preallocated buffer or one ``os.pwrite`` (waiting on
  the oldest future when D are in flight: ``py_pio.py --mode pool``);
* **qcow2rw** in each lock mode (mutex, rwlock, fine) on IMG, driven exactly the same
  way through ``qcow2rw.AioImage(img, workers=--workers)`` (``qcow2rw.devkit.bench.drive``:
  ``submit_readinto`` into D preallocated buffers, ``submit_write`` of one buffer).

Offsets are sequential as qemu-img bench issues them (from 0, ``offset += size``,
wrapping at the end), so every row compares like with like.  Random-offset rows
(multiples of the request size, same seed for every runner) compare qcow2rw with
raw-py only: qemu-img bench has no random mode.

IMG is fully allocated: RAW is ``--size`` bytes of random data and IMG is
``qemu-img convert -O qcow2 -o cluster_size=65536 RAW IMG`` (every cluster allocated, in
order).  The page cache is warm, the same way for both files: each is synced, evicted
(``posix_fadvise(DONTNEED)``) and read once sequentially before the first run;
qemu-img bench runs with ``-t writeback`` (page-cache hits, like the others).  Reads run
before writes; writes store the byte 0xab (171) everywhere, so no one can skip zeros.

Each runner is calibrated to last about ``--target`` seconds, then runs ``--repeat``
times, runners interleaved rep by rep; the table shows medians, and each ratio is the
median of the per-rep ratios (paired, so slow moments of this noisy VM cancel out).

Inline completion (issue 16): the qcow2rw columns use ``AioImage(inline="auto")``, the
default; a ``fine never`` column runs lock mode fine with ``inline="never"`` (every
request through the pool), so each table says what inline completion buys.

More rows:

* **cache misses**: random 4 KiB reads of IMG copied with 4 KiB clusters (an L2 table
  maps 2 MiB) with an L2 cache of 8 tables (``cache_size`` 32 KiB): nearly every read
  misses; inline auto against never: the miss path must cost no more than before;
* **O_DIRECT**: 4 KiB and 64 KiB reads and overwrites at QD32 on IMG with
  ``qemu-img bench -t none -i threads`` and ``-i native`` against qcow2rw
  ``cache="none"`` and **raw-py direct**, a Python pool doing aligned ``preadv``/
  ``pwritev`` on RAW opened O_DIRECT (no page cache anywhere);

* **allocating writes**: a fresh empty 64 GiB image (``qemu-img create``, 64 KiB
  clusters) for every run, 4 KiB writes with step 64 KiB (each allocates a new
  cluster), ``qemu-img bench -w -S 64k`` against qcow2rw in each mode;
* **memory**: a child process opens a 1 TiB sparse image whose 2048 L2 tables all exist
  (one 64 KiB cluster written per 512 MiB with qemu-io; 128 MiB of L2 tables in all),
  reads ``--mem-requests`` random 4 KiB requests (default 262144 = 1 GiB) and reports
  its maximum RSS (``resource.getrusage``).

    python tools/bench_compare.py                       # 1 GiB, --repeat 3 (~10 min)
    python tools/bench_compare.py --size 256M --repeat 1  # quick (~4 min)

This is a benchmark, never a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import datetime
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree

import qcow2rw  # noqa: E402
from qcow2rw.devkit.bench import drive, random_offsets, sequential_offsets  # noqa: E402
from qcow2rw.units import UsageError, parse_size  # noqa: E402

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
SIZES = (4 * KiB, 64 * KiB, MiB)
DEPTHS = (1, 8, 32)
MODES = ("mutex", "rwlock", "fine")
PATTERN = 0xAB
CLUSTER = 64 * KiB
FRESH_SIZE = 64 * GiB
MEM_IMAGE_SIZE = TiB
RUN_RE = re.compile(r"Run completed in ([0-9.]+) seconds")
DIRECT_SIZES = (4 * KiB, 64 * KiB)
DIRECT_DEPTH = 32
DIRECT_WORKERS = 8  # AioImage and raw-py threads of the O_DIRECT rows (qcow2rw bench's default)
MISS_CLUSTER = 4 * KiB  # the cache-miss rows: IMG copied with 4 KiB clusters (an L2
MISS_CACHE = 32 * KiB  # table maps 2 MiB) and an L2 cache of 8 tables (the least)
NEVER = "fine never"  # the runner: lock mode fine, AioImage(inline="never")
QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
QEMU_IO = os.environ.get("QEMU_IO", "qemu-io")

Runner = Callable[[int], float]  # count -> seconds for that many requests


# --------------------------------------------------------------------------------------
# Helpers


def log(message: str) -> None:
    """Progress, on stderr (the table goes to stdout)."""
    print(message, file=sys.stderr, flush=True)


def sh(*cmd: str) -> str:
    """Run a command; return its stdout; raise with its stderr on failure."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def human_size(n: int) -> str:
    """``4k``, ``64k``, ``1M``."""
    for unit, div in (("G", GiB), ("M", MiB), ("k", KiB)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def fmt_iops(iops: float) -> str:
    """``123k`` / ``12.3k`` / ``950``."""
    if iops >= 100_000:
        return f"{iops / 1000:.0f}k"
    if iops >= 1000:
        return f"{iops / 1000:.1f}k"
    return f"{iops:.0f}"


def fmt_mbps(mbps: float) -> str:
    return f"{mbps:.0f}" if mbps >= 100 else f"{mbps:.1f}"


def warm(path: str) -> None:
    """Sync, evict and read *path* once sequentially (the same page-cache state for all)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while os.read(fd, 4 * MiB):
            pass
    finally:
        os.close(fd)


def calibrate(run: Runner, target: float, start: int = 256, cap: int | None = None) -> int:
    """A request count for which one run of *run* lasts about *target* seconds."""
    count = start
    while True:
        if cap:
            count = min(count, cap)
        seconds = run(count)
        if seconds >= 0.1 or (cap and count >= cap):
            break
        count *= 8
    count = max(16, int(count * target / max(seconds, 1e-4)))
    return min(count, cap) if cap else count


# --------------------------------------------------------------------------------------
# Runners


def qemu_runner(img: str, write: bool, size: int, depth: int, step: int | None = None,
                fresh: bool = False, cache: str = "writeback", aio: str | None = None) -> Runner:
    """``qemu-img bench`` on *img* (re-created empty before each run when *fresh*), with
    ``-t cache`` and ``-i aio``."""

    def run(count: int) -> float:
        if fresh:
            make_fresh(img)
        cmd = [QEMU_IMG, "bench", "-f", "qcow2", "-t", cache, "-c", str(count),
               "-d", str(depth), "-s", str(size)]
        if aio:
            cmd += ["-i", aio]
        if step:
            cmd += ["-S", str(step)]
        if write:
            cmd += ["-w", f"--pattern={PATTERN}"]
        out = sh(*cmd, img)
        match = RUN_RE.search(out)
        if not match:
            raise RuntimeError(f"no timing in the output of {' '.join(cmd)}: {out!r}")
        return float(match.group(1))

    return run


def raw_runner(fd: int, fsize: int, pool: concurrent.futures.ThreadPoolExecutor, write: bool,
               size: int, depth: int, rand: bool, seed: int) -> Runner:
    """Plain Python: ``os.preadv``/``os.pwrite`` through *pool*, *depth* in flight."""

    def run(count: int) -> float:
        offsets = (random_offsets(count, size, fsize, seed) if rand
                   else sequential_offsets(count, size, size, 0, fsize))
        if write:
            data = bytes([PATTERN]) * size
            fn: Callable[..., Any] = os.pwrite
            args = [(fd, data, off) for off in offsets]
        else:
            bufs = [[bytearray(size)] for _ in range(depth)]
            fn = os.preadv
            args = [(fd, bufs[i % depth], off) for i, off in enumerate(offsets)]
        inflight: collections.deque[Any] = collections.deque()
        submit = pool.submit
        start = time.perf_counter()
        for a in args:
            if len(inflight) >= depth:
                inflight.popleft().result()
            inflight.append(submit(fn, *a))
        while inflight:
            inflight.popleft().result()
        return time.perf_counter() - start

    return run


def raw_direct_runner(path: str, workers: int, write: bool, size: int, depth: int) -> Runner:
    """Plain Python with O_DIRECT: the raw file opened ``O_DIRECT``, a
    ``ThreadPoolExecutor`` of *workers* threads, one ``os.preadv``/``os.pwritev`` per
    request from a page-aligned ``mmap`` buffer of its thread (no copy, no bounce):
    the most a Python thread pool gets from this device."""
    import mmap
    import threading

    def run(count: int) -> float:
        fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT)
        mine = threading.local()
        fill = bytes([PATTERN]) * size

        def one(offset: int) -> int:
            buf = getattr(mine, "buf", None)
            if buf is None:
                buf = mine.buf = mmap.mmap(-1, size)
                buf[:] = fill
            return (os.pwritev if write else os.preadv)(fd, [buf], offset)

        try:
            offsets = sequential_offsets(count, size, size, 0, os.fstat(fd).st_size)
            inflight: collections.deque[Any] = collections.deque()
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                submit = pool.submit
                start = time.perf_counter()
                for off in offsets:
                    if len(inflight) >= depth:
                        inflight.popleft().result()
                    inflight.append(submit(one, off))
                while inflight:
                    inflight.popleft().result()
                return time.perf_counter() - start
        finally:
            os.close(fd)

    return run


def qcow2rw_runner(img: str, mode: str, workers: int, write: bool, size: int, depth: int,
                   rand: bool = False, seed: int = 0, step: int | None = None,
                   fresh: bool = False, inline: str = "auto", cache: str = "writeback",
                   cache_size: int | None = None) -> Runner:
    """qcow2rw in lock *mode* through an AioImage, driven like the other two
    (*inline*, *cache* and *cache_size* as ``AioImage`` and ``qcow2rw.open`` take them)."""

    def run(count: int) -> float:
        if fresh:
            make_fresh(img)
        handle = qcow2rw.open(img, readonly=not write, lock_mode=mode, cache=cache,
                              cache_size=cache_size)
        try:
            isize = handle.size
            offsets = (random_offsets(count, size, isize, seed) if rand
                       else sequential_offsets(count, size, step or size, 0, isize))
            with qcow2rw.AioImage(handle, workers=workers, inline=inline) as aio:
                seconds = drive(aio, offsets, size, depth, write=write, pattern=PATTERN)
        finally:
            handle.close()
        return seconds

    return run


def make_fresh(path: str) -> None:
    """An empty 64 GiB qcow2 image with 64 KiB clusters at *path* (replacing any)."""
    if os.path.exists(path):
        os.unlink(path)
    sh(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", path,
       str(FRESH_SIZE))


# --------------------------------------------------------------------------------------
# Measuring


@dataclass
class Row:
    """One configuration and each runner's timed runs."""

    kind: str                 # "seq", "rand" or "alloc"
    op: str                   # "read" or "write"
    size: int
    depth: int
    runs: dict[str, list[float]] = field(default_factory=dict)  # runner -> IOPS per rep
    counts: dict[str, int] = field(default_factory=dict)

    def median(self, name: str) -> float | None:
        """Median IOPS of runner *name* (None if it did not run)."""
        values = self.runs.get(name)
        return statistics.median(values) if values else None

    def ratio(self, a: str, b: str) -> float | None:
        """Median of the per-rep ratios IOPS(a) / IOPS(b)."""
        xs, ys = self.runs.get(a), self.runs.get(b)
        if not xs or not ys:
            return None
        return statistics.median(x / y for x, y in zip(xs, ys))

    def record(self) -> dict[str, Any]:
        """A JSON-able summary."""
        return {"kind": self.kind, "op": self.op, "size": self.size, "depth": self.depth,
                "counts": self.counts, "iops": self.runs,
                "median_iops": {k: self.median(k) for k in self.runs}}


def measure(row: Row, runners: dict[str, Runner], repeat: int, target: float,
            cap: int | None = None) -> Row:
    """Calibrate each runner, then run them all *repeat* times, interleaved."""
    for name, run in runners.items():
        row.counts[name] = calibrate(run, target, cap=cap)
    for _ in range(repeat):
        for name, run in runners.items():
            seconds = run(row.counts[name])
            row.runs.setdefault(name, []).append(row.counts[name] / seconds)
    summary = ", ".join(f"{k} {fmt_iops(row.median(k) or 0)}" for k in runners)
    log(f"  {row.kind} {row.op} {human_size(row.size)} QD{row.depth}: {summary}")
    return row


# --------------------------------------------------------------------------------------
# Memory


def memory_child(path: str, requests: int, seed: int) -> dict[str, Any]:
    """In a fresh process: open *path*, read *requests* random 4 KiB; report RSS (MiB)."""
    import resource

    def maxrss_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def hwm_mib() -> float:
        """Peak RSS of this process image since exec (``VmHWM``), in MiB."""
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    img = qcow2rw.open(path, readonly=True)
    try:
        size = img.size
        rng = random.Random(seed)
        buf = bytearray(4 * KiB)
        before = hwm_mib()
        tables: set[int] = set()
        start = time.perf_counter()
        for _ in range(requests):
            off = rng.randrange(size // (4 * KiB)) * 4 * KiB
            img.readinto(off, buf)
            tables.add(off >> 29)
        seconds = time.perf_counter() - start
    finally:
        img.close()
    return {"requests": requests, "seconds": seconds, "maxrss_mib": maxrss_mib(),
            "hwm_mib": hwm_mib(), "hwm_after_open_mib": before,
            "l2_tables_touched": len(tables)}


def measure_memory(workdir: str, requests: int) -> dict[str, Any]:
    """Build the 1 TiB sparse image, run :func:`memory_child` in a new interpreter."""
    path = os.path.join(workdir, "sparse-1T.qcow2")
    sh(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", path,
       str(MEM_IMAGE_SIZE))
    per_table = CLUSTER // 8 * CLUSTER  # guest bytes one L2 table maps: 512 MiB
    cmds: list[str] = []
    for i in range(MEM_IMAGE_SIZE // per_table):
        cmds += ["-c", f"write -q -P {i % 255 + 1} {i * per_table} {CLUSTER}"]
    sh(QEMU_IO, "-f", "qcow2", *cmds, path)
    out = sh(sys.executable, os.path.abspath(__file__), "--memory-child", path, str(requests))
    result = json.loads(out.strip().splitlines()[-1])
    result["image_file_mib"] = os.path.getsize(path) / MiB
    os.unlink(path)
    return result


# --------------------------------------------------------------------------------------
# The report


def environment(args: argparse.Namespace) -> list[str]:
    """Header lines: when, where, with what."""
    now = datetime.datetime.now().astimezone()
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    qemu_version = sh(QEMU_IMG, "--version").splitlines()[0]
    utc = now.astimezone(datetime.timezone.utc)
    when = now.isoformat(timespec="seconds")
    if now.utcoffset() != utc.utcoffset():
        when += f" ({utc.isoformat(timespec='seconds')})"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"date: {when}; load average at start: {load}",
        f"machine: {os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, {qemu_version}",
        f"command: {' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}",
        f"image: {human_size(args.size)} fully allocated (64 KiB clusters); workers "
        f"(raw-py pool and AioImage threads): {args.workers}; qemu-img bench: its own "
        "thread pool (-t writeback, default aio)",
        f"each figure: median of {args.repeat} runs of ~{args.target:g} s; page cache warm "
        "(files synced, evicted, read once sequentially); IOPS (MB/s, 10^6 bytes/s)",
    ]


def cell(row: Row, name: str) -> str:
    iops = row.median(name)
    if iops is None:
        return "-"
    return f"{fmt_iops(iops)} ({fmt_mbps(iops * row.size / 1e6)})"


def ratio(row: Row, a: str, b: str) -> str:
    value = row.ratio(a, b)
    return "-" if value is None else f"{value:.2f}"


def print_inline(rows: list[Row], with_qemu: bool) -> None:
    """What inline completion buys: the fine column against ``inline="never"``."""
    print("\n### Inline completion (lock mode fine: AioImage inline auto vs never)\n")
    qemu_cols = " fine/qemu-img | never/qemu-img |" if with_qemu else ""
    print(f"| op | size | QD | fine (auto) | {NEVER} | auto/never | auto/raw-py |{qemu_cols}")
    print("|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if with_qemu else ""))
    for r in rows:
        extra = (f" {ratio(r, 'fine', 'qemu-img')} | {ratio(r, NEVER, 'qemu-img')} |"
                 if with_qemu else "")
        print(f"| {r.op} | {human_size(r.size)} | {r.depth} | {cell(r, 'fine')} | "
              f"{cell(r, NEVER)} | {ratio(r, 'fine', NEVER)} | {ratio(r, 'fine', 'raw-py')} |"
              + extra)
    if with_qemu:
        print("\nTargets (issue 16): 4k reads fine/qemu-img >= 1.5 and auto/raw-py >= 2 at "
              "every depth; 64k reads fine/qemu-img >= 1.0 at QD32; 1M reads no worse than "
              "never.")


def print_report(header: list[str], rows: list[Row], memory: dict[str, Any] | None,
                 modes: Sequence[str]) -> None:
    """The tables, in Markdown."""
    print("# qcow2rw vs qemu-img bench vs plain Python\n")
    for line in header:
        print(f"- {line}")
    mode_cols = " | ".join(f"qcow2rw {m}" for m in modes)
    seq = [r for r in rows if r.kind == "seq"]
    if seq:
        print("\n## Sequential offsets (as qemu-img bench issues them)\n")
        print(f"| op | size | QD | qemu-img | raw-py | {mode_cols} | fine/raw-py | "
              "fine/qemu-img | fine/mutex |")
        print("|---|---|---:|---:|---:|" + "---:|" * len(modes) + "---:|---:|---:|")
        for r in seq:
            print(f"| {r.op} | {human_size(r.size)} | {r.depth} | {cell(r, 'qemu-img')} | "
                  f"{cell(r, 'raw-py')} | " + " | ".join(cell(r, m) for m in modes) + " | "
                  f"{ratio(r, 'fine', 'raw-py')} | {ratio(r, 'fine', 'qemu-img')} | "
                  f"{ratio(r, 'fine', 'mutex')} |")
        print("\nTargets (issue 4): fine/raw-py >= 0.80 (4k), 0.85 (64k), 0.90 (1M) for reads "
              "and overwrites; fine/qemu-img at QD32 >= 0.45 (4k), 0.45 read / 0.65 write "
              "(64k), 0.55 (1M); fine/mutex >= 1.5 (1M read), 1.2 (64k read) at QD8.")
        print_inline(seq, with_qemu=True)
    rand = [r for r in rows if r.kind == "rand"]
    if rand:
        print("\n## Random offsets (qcow2rw vs raw Python only)\n")
        print(f"| op | size | QD | raw-py | {mode_cols} | fine/raw-py | fine/mutex |")
        print("|---|---|---:|---:|" + "---:|" * len(modes) + "---:|---:|")
        for r in rand:
            print(f"| {r.op} | {human_size(r.size)} | {r.depth} | {cell(r, 'raw-py')} | "
                  + " | ".join(cell(r, m) for m in modes) + " | "
                  f"{ratio(r, 'fine', 'raw-py')} | {ratio(r, 'fine', 'mutex')} |")
        print_inline(rand, with_qemu=False)
    miss = [r for r in rows if r.kind == "miss"]
    if miss:
        print(f"\n## Cache misses (random 4 KiB reads of IMG copied with {MISS_CLUSTER // KiB} "
              f"KiB clusters, an L2 cache of {MISS_CACHE // MISS_CLUSTER} tables: nearly every "
              "read misses)\n")
        print(f"| QD | fine (inline auto) | {NEVER} | auto/never |")
        print("|---:|---:|---:|---:|")
        for r in miss:
            print(f"| {r.depth} | {cell(r, 'fine')} | {cell(r, NEVER)} | "
                  f"{ratio(r, 'fine', NEVER)} |")
        print("\nTarget (issue 16): the miss path costs no more than before inline completion "
              "(auto/never >= 1.0, within noise).")
    direct = [r for r in rows if r.kind == "direct"]
    if direct:
        print(f"\n## O_DIRECT (-t none / cache=\"none\"), QD{DIRECT_DEPTH}, sequential\n")
        print("| op | size | qemu-img -i threads | qemu-img -i native | raw-py direct | "
              "qcow2rw fine | fine/best qemu-img | raw-py direct/best qemu-img | "
              "fine/raw-py direct |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in direct:
            best = max(("qemu-img threads", "qemu-img native"), key=lambda n: r.median(n) or 0)
            print(f"| {r.op} | {human_size(r.size)} | {cell(r, 'qemu-img threads')} | "
                  f"{cell(r, 'qemu-img native')} | {cell(r, 'raw-py direct')} | "
                  f"{cell(r, 'fine')} | {ratio(r, 'fine', best)} | "
                  f"{ratio(r, 'raw-py direct', best)} | {ratio(r, 'fine', 'raw-py direct')} |")
        print(f"\nTarget (issue 16): fine/best qemu-img >= 0.5.  raw-py direct: {DIRECT_WORKERS} "
              "Python threads, each request one preadv/pwritev of an aligned buffer on the raw "
              f"file opened O_DIRECT: what a Python pool gets at all; qcow2rw uses "
              f"{DIRECT_WORKERS} AioImage threads.")
    alloc = [r for r in rows if r.kind == "alloc"]
    if alloc:
        print("\n## Allocating writes (fresh 64 GiB image per run; 4 KiB writes, step 64 KiB: "
              "a new cluster each)\n")
        print(f"| QD | qemu-img -w | {mode_cols} | fine/qemu-img |")
        print("|---:|---:|" + "---:|" * len(modes) + "---:|")
        for r in alloc:
            print(f"| {r.depth} | {cell(r, 'qemu-img')} | "
                  + " | ".join(cell(r, m) for m in modes) + f" | {ratio(r, 'fine', 'qemu-img')} |")
        print("\nTarget (issue 4): fine/qemu-img >= 0.5 at QD32.")
    if memory:
        print("\n## Memory (1 TiB sparse image, all 2048 L2 tables present; random 4 KiB "
              "reads in one process, default cache size)\n")
        print("| requests | MiB read | L2 tables touched | max RSS (getrusage) | peak RSS "
              "(VmHWM) | VmHWM after open | seconds |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        print(f"| {memory['requests']} | {memory['requests'] * 4 * KiB / MiB:.0f} | "
              f"{memory['l2_tables_touched']} | {memory['maxrss_mib']:.1f} MiB | "
              f"{memory['hwm_mib']:.1f} MiB | {memory['hwm_after_open_mib']:.1f} MiB | "
              f"{memory['seconds']:.1f} |")
        print("\nTarget (issue 4): under 100 MiB RSS.  Linux carries the parent's peak RSS "
              "over fork+exec into the child's getrusage figure, so the child runs first, "
              "while this process is small; VmHWM counts the child's own pages only.")


# --------------------------------------------------------------------------------------
# Main


def prepare(workdir: str, size: int) -> tuple[str, str]:
    """RAW (random data) and IMG (its fully allocated qcow2 copy), both warm."""
    raw = os.path.join(workdir, "raw.img")
    img = os.path.join(workdir, "full.qcow2")
    log(f"preparing {human_size(size)} of random data and its qcow2 copy in {workdir}")
    with open(raw, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n
    sh(QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={CLUSTER}", raw, img)
    warm(raw)
    warm(img)
    return raw, img


def parse_list(text: str, conv: Callable[[str], int]) -> list[int]:
    return [conv(x) for x in text.split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print the tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--size", default="1G", help="image / raw file size (default 1G)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per figure (default 3)")
    p.add_argument("--target", type=float, default=0.5, help="seconds per run (default 0.5)")
    p.add_argument("--workers", type=int, default=2,
                   help="raw-py pool threads and AioImage workers (default 2, the CPUs here)")
    p.add_argument("--sizes", default="4k,64k,1M", help="request sizes (default 4k,64k,1M)")
    p.add_argument("--depths", default="1,8,32", help="queue depths (default 1,8,32)")
    p.add_argument("--modes", default=",".join(MODES), help="qcow2rw lock modes")
    p.add_argument("--no-random", action="store_true", help="skip the random-offset rows")
    p.add_argument("--no-alloc", action="store_true", help="skip the allocating-writes rows")
    p.add_argument("--no-memory", action="store_true", help="skip the memory row")
    p.add_argument("--no-miss", action="store_true", help="skip the cache-miss rows")
    p.add_argument("--no-direct", action="store_true", help="skip the O_DIRECT rows")
    p.add_argument("--mem-requests", type=int, default=262144,
                   help="random 4 KiB reads of the memory row (default 262144 = 1 GiB)")
    p.add_argument("--seed", type=int, default=1, help="seed of the random offsets")
    p.add_argument("--dir", help="work directory (default: a new temporary one, removed)")
    p.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    p.add_argument("--memory-child", nargs=2, metavar=("IMAGE", "REQUESTS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child[0], int(args.memory_child[1]),
                                      args.seed)))
        return 0
    try:
        args.size = parse_size(args.size)
        sizes = parse_list(args.sizes, parse_size)
        depths = parse_list(args.depths, int)
    except (UsageError, ValueError) as exc:
        p.error(str(exc))
    modes = [m for m in args.modes.split(",") if m]
    if "fine" not in modes or any(m not in MODES for m in modes):
        p.error(f"--modes: a subset of {','.join(MODES)} that includes fine")
    if shutil.which(QEMU_IMG) is None or shutil.which(QEMU_IO) is None:
        p.error("qemu-img and qemu-io are needed")
    header = environment(args)
    workdir = args.dir or tempfile.mkdtemp(prefix="qcow2rw-bench-")
    os.makedirs(workdir, exist_ok=True)
    started = time.monotonic()
    rows: list[Row] = []
    memory = None
    try:
        if not args.no_memory:  # first, while this process is small (see print_report)
            log(f"memory: {args.mem_requests} random 4 KiB reads of a 1 TiB sparse image")
            memory = measure_memory(workdir, args.mem_requests)
        raw, img = prepare(workdir, args.size)
        fd = os.open(raw, os.O_RDWR)
        try:
            for op in ("read", "write"):
                write = op == "write"
                for kind in ("seq",) + (() if args.no_random else ("rand",)):
                    rand = kind == "rand"
                    log(f"{kind} {op}s")
                    for size in sizes:
                        for depth in depths:
                            seed = args.seed * 1000 + size // KiB + depth
                            with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
                                runners: dict[str, Runner] = {}
                                if not rand:
                                    runners["qemu-img"] = qemu_runner(img, write, size, depth)
                                runners["raw-py"] = raw_runner(fd, args.size, pool, write, size,
                                                               depth, rand, seed)
                                for mode in modes:
                                    runners[mode] = qcow2rw_runner(img, mode, args.workers,
                                                                   write, size, depth, rand,
                                                                   seed)
                                runners[NEVER] = qcow2rw_runner(img, "fine", args.workers, write,
                                                                size, depth, rand, seed,
                                                                inline="never")
                                rows.append(measure(Row(kind, op, size, depth), runners,
                                                    args.repeat, args.target))
        finally:
            os.close(fd)
        if not args.no_miss:
            log("cache-miss reads (random 4 KiB, 4 KiB clusters, an L2 cache of 4 tables)")
            small = os.path.join(workdir, "small-clusters.qcow2")
            sh(QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", "-o",
               f"cluster_size={MISS_CLUSTER}", raw, small)
            warm(small)
            for depth in depths:
                seed = args.seed * 1000 + 999 + depth
                runners = {
                    "fine": qcow2rw_runner(small, "fine", args.workers, False, 4 * KiB, depth,
                                           True, seed, cache_size=MISS_CACHE),
                    NEVER: qcow2rw_runner(small, "fine", args.workers, False, 4 * KiB, depth,
                                          True, seed, cache_size=MISS_CACHE, inline="never")}
                rows.append(measure(Row("miss", "read", 4 * KiB, depth), runners,
                                    args.repeat, args.target))
        if not args.no_direct:
            log("O_DIRECT (-t none)")
            for op in ("read", "write"):
                for size in DIRECT_SIZES:
                    write = op == "write"
                    runners = {
                        "qemu-img threads": qemu_runner(img, write, size, DIRECT_DEPTH,
                                                        cache="none", aio="threads"),
                        "qemu-img native": qemu_runner(img, write, size, DIRECT_DEPTH,
                                                       cache="none", aio="native"),
                        "raw-py direct": raw_direct_runner(raw, DIRECT_WORKERS, write, size,
                                                           DIRECT_DEPTH),
                        "fine": qcow2rw_runner(img, "fine", DIRECT_WORKERS, write, size,
                                               DIRECT_DEPTH, cache="none")}
                    rows.append(measure(Row("direct", op, size, DIRECT_DEPTH), runners,
                                        args.repeat, args.target))
        if not args.no_alloc:
            log("allocating writes")
            fresh = os.path.join(workdir, "fresh.qcow2")
            for depth in depths:
                runners = {"qemu-img": qemu_runner(fresh, True, 4 * KiB, depth, step=CLUSTER,
                                                   fresh=True)}
                for mode in modes:
                    runners[mode] = qcow2rw_runner(fresh, mode, args.workers, True, 4 * KiB,
                                                   depth, step=CLUSTER, fresh=True)
                rows.append(measure(Row("alloc", "write", 4 * KiB, depth), runners,
                                    args.repeat, args.target, cap=FRESH_SIZE // CLUSTER))
            if os.path.exists(fresh):
                os.unlink(fresh)
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    header.append(f"total time: {time.monotonic() - started:.0f} s")
    print_report(header, rows, memory, modes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": [r.record() for r in rows], "memory": memory},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
