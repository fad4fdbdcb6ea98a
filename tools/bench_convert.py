#!/usr/bin/env python3
"""Benchmark ``qcow2rw convert`` / ``compare`` against ``qemu-img`` on the same source.

The source is MIXED (next-wave.md §2.4): a raw file of --size bytes made of 1 MiB
blocks that are holes (never written), random bytes (incompressible), text-like bytes
(compressible words) or written zeros, in fixed proportions from a seeded generator.
Every run converts it into a fresh target in the same directory; the table gives wall
times, our time as a ratio of qemu-img's for the same job, and output sizes::

    python tools/bench_convert.py                  # 1 GiB
    python tools/bench_convert.py --size 256M --runs 3 --dir /var/tmp

The targets (2 cores): ``convert -c`` <= 0.7x ``qemu-img convert -c`` and <= 1.1x
``qemu-img convert -W -c``; plain ``convert -O qcow2`` <= 2x; ``compare`` <= 1.5x.
``--profile`` runs our ``convert -c`` once under cProfile and prints the top entries.
Every run starts from a clean state (the output removed, dirty pages written back by
``sync``).  qemu-img converts with ``-t unsafe`` by default (it never syncs); ours
flushes and syncs the target before it exits, and that time is in its figure.  Never a
timed test: a tool for a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qcow2rw.units import parse_size

MiB = 1 << 20
CPU: dict[tuple[str, ...], float] = {}  # argv -> the least CPU seconds (user + sys) of its runs
WORDS = (b"the qcow2 image format stores guest clusters in host clusters mapped by two "
         b"levels of tables refcount blocks count every host cluster snapshot backing "
         b"file compressed cluster descriptor sector offset length zlib zstd").split()


def make_mixed(path: Path, size: int, seed: int = 1) -> int:
    """Write MIXED to *path*; returns the bytes of data blocks written."""
    rng = random.Random(seed)
    written = 0
    with open(path, "wb") as f:
        f.truncate(size)
        for block in range(size // MiB):
            kind = rng.choices(("hole", "random", "text", "zero"), (30, 25, 35, 10))[0]
            if kind == "hole":
                continue
            if kind == "random":
                data = rng.randbytes(MiB)
            elif kind == "text":
                out = bytearray()
                while len(out) < MiB:
                    out += b" ".join(rng.choices(WORDS, k=64)) + b"\n%d\n" % rng.getrandbits(40)
                data = bytes(out[:MiB])
            else:
                data = bytes(MiB)
            f.seek(block * MiB)
            f.write(data)
            written += MiB
    return written


def timed(argv: list[str], cwd: Path, output: str | None = None) -> float:
    """Wall time of one run, from a clean state: the output file removed and every
    dirty page written back first (a tool that leaves gigabytes of dirty pages, as
    qemu-img convert does with its default cache=unsafe, would otherwise slow down
    whatever runs after it)."""
    if output is not None and (cwd / output).exists():
        (cwd / output).unlink()
    os.sync()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU[tuple(argv)] = min(CPU.get(tuple(argv), float("inf")),
                        after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    if proc.returncode not in (0, 1) or (proc.returncode and "compare" not in argv):
        sys.exit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="virtual size of MIXED (default 1G)")
    parser.add_argument("--runs", type=int, default=1, help="runs of each job (best is kept)")
    parser.add_argument("--dir", help="work directory (default: a new one under the system tmp)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile our convert -c once and print the top 25 entries")
    parser.add_argument("--qemu-img", default=os.environ.get("QEMU_IMG", "qemu-img"))
    args = parser.parse_args()
    size = parse_size(args.size)
    qemu_img = args.qemu_img
    if shutil.which(qemu_img) is None:
        sys.exit("qemu-img not found")
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    ours = [sys.executable, "-m", "qcow2rw"]
    src = work / "mixed.raw"
    data = make_mixed(src, size)
    print(f"MIXED: {size} bytes virtual, {data} bytes of data blocks, in {work}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")

    jobs = [  # (name, qemu-img argv, our argv, output file)
        ("convert -c", [qemu_img, "convert", "-f", "raw", "-c", "-O", "qcow2", "mixed.raw", "q-c.qcow2"],
         [*ours, "convert", "-f", "raw", "-c", "-O", "qcow2", "mixed.raw", "o-c.qcow2"],
         ("q-c.qcow2", "o-c.qcow2")),
        ("convert -W -c", [qemu_img, "convert", "-f", "raw", "-W", "-c", "-O", "qcow2", "mixed.raw",
                           "q-wc.qcow2"],
         [*ours, "convert", "-f", "raw", "-c", "-O", "qcow2", "mixed.raw", "o-c.qcow2"],
         ("q-wc.qcow2", "o-c.qcow2")),
        ("convert -O qcow2", [qemu_img, "convert", "-f", "raw", "-O", "qcow2", "mixed.raw", "q.qcow2"],
         [*ours, "convert", "-f", "raw", "-O", "qcow2", "mixed.raw", "o.qcow2"],
         ("q.qcow2", "o.qcow2")),
        ("compare raw/qcow2 -c", [qemu_img, "compare", "-f", "raw", "-F", "qcow2", "mixed.raw",
                                  "q-c.qcow2"],
         [*ours, "compare", "-f", "raw", "-F", "qcow2", "mixed.raw", "q-c.qcow2"], None),
    ]
    rows = []
    best: dict[tuple[str, ...], float] = {}  # our convert -c is timed once for both rows
    for name, theirs, mine, outputs in jobs:
        t_q = t_o = float("inf")
        for _ in range(args.runs):  # interleaved, so that drift hits both alike
            t_q = min(t_q, timed(theirs, work, outputs and outputs[0]))
            if tuple(mine) not in best:
                t_o = min(t_o, timed(mine, work, outputs and outputs[1]))
        t_o = best.setdefault(tuple(mine), t_o)
        sizes = ("", "")
        if outputs:
            sizes = tuple(f"{(work / o).stat().st_size:,}" for o in outputs)
        rows.append((name, t_q, t_o, t_o / t_q, CPU[tuple(theirs)], CPU[tuple(mine)], *sizes))
    print("\n| job | qemu-img s | qcow2rw s | ratio | CPU s qemu-img / qcow2rw "
          "| qemu-img output B | qcow2rw output B |")
    print("|---|---|---|---|---|---|---|")
    for name, t_q, t_o, ratio, c_q, c_o, s_q, s_o in rows:
        print(f"| {name} | {t_q:.2f} | {t_o:.2f} | {ratio:.2f}x | {c_q:.2f} / {c_o:.2f} "
              f"| {s_q} | {s_o} |")
    same = subprocess.run([qemu_img, "compare", "-f", "raw", "mixed.raw", "o-c.qcow2"], cwd=work,
                          capture_output=True, text=True)
    print(f"\nqemu-img compare mixed.raw o-c.qcow2: {same.stdout.strip()}")
    if args.profile:
        import cProfile
        import pstats

        import qcow2rw
        prof = cProfile.Profile()
        prof.enable()
        qcow2rw.convert(src, work / "prof.qcow2", src_format="raw", compressed=True)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
