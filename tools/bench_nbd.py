#!/usr/bin/env python3
"""Benchmark ``qcow2rw serve`` against ``qemu-nbd -e 8`` with real NBD clients.

Same run, same fully allocated image (1 GiB by default), Unix sockets, warm page cache.
Rows (seconds, lower is better, unless IOPS):

- ``nbdcopy URI null:``                     streaming read, 2 connections (multi-conn)
- ``nbdcopy URI out.raw``                   streaming read into a file
- ``nbdcopy --flush SRC URI``               streaming write, then FLUSH
- ``qemu-img convert -n -O raw SRC URI``    streaming write, one connection, 2 MiB
- ``qemu-img bench -d 32 -s 4k`` read/write 4 KiB IOPS at depth 32

Each row is run ``--repeat`` times per server (best kept), alternating the servers.
This is a benchmark, never a test: ``python tools/bench_nbd.py [--size 1G] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def sh(*argv: str, timeout: float = 600) -> str:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                         check=False)
    if out.returncode:
        raise SystemExit(f"{' '.join(argv)} failed: {out.stderr.strip()}")
    return out.stdout


def wait_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        if path.exists():
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(path))
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.05)
    raise SystemExit(f"no server on {path}")


@contextmanager
def server(kind: str, image: Path, sock: Path, workers: int):
    if kind == "qemu-nbd":
        argv = ["qemu-nbd", "-f", "qcow2", "-e", "8", "-t", "-k", str(sock), str(image)]
    else:
        argv = [sys.executable, "-m", "qcow2rw.nbd", "-t", "--workers", str(workers),
                "-k", str(sock), str(image)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("QCOW2RW_DEBUG_LOCKS", None)
    proc = subprocess.Popen(argv, env=env)
    try:
        wait_socket(sock, proc)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def timed(*argv: str) -> float:
    t0 = time.perf_counter()
    sh(*argv)
    return time.perf_counter() - t0


def iops(uri: str, write: bool, count: int) -> float:
    argv = ["qemu-img", "bench", "-f", "raw", "-d", "32", "-s", "4k", "-c", str(count)]
    if write:
        argv.append("-w")
    out = sh(*argv, uri)
    seconds = float(re.search(r"Run completed in ([\d.]+) seconds", out).group(1))
    return count / seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="image size (default 1G)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--count", type=int, default=200000, help="qemu-img bench requests")
    ap.add_argument("--workers", type=int, default=8, help="qcow2rw serve --workers")
    ap.add_argument("--dir", help="scratch directory (default: a temporary one)")
    args = ap.parse_args()
    for tool in ("qemu-img", "qemu-nbd", "nbdcopy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (apt-get install qemu-utils libnbd-bin)")
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="bench-nbd-"))
    tmp.mkdir(parents=True, exist_ok=True)
    src, image = tmp / "src.raw", tmp / "img.qcow2"
    size = args.size
    print(f"preparing {size} of random data and a fully allocated qcow2 in {tmp} ...", flush=True)
    sh("dd", "if=/dev/urandom", f"of={src}", "bs=1M",
       f"count={_mib(size)}", "status=none")
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(src), str(image))
    rows = [
        ("nbdcopy URI null:", lambda u: timed("nbdcopy", u, "null:")),
        ("nbdcopy URI out.raw", lambda u: timed("nbdcopy", u, str(tmp / "out.raw"))),
        ("nbdcopy --flush SRC URI", lambda u: timed("nbdcopy", "--flush", str(src), u)),
        ("qemu-img convert -n -O raw SRC URI",
         lambda u: timed("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), u)),
        ("qemu-img bench -d 32 -s 4k read (IOPS)", lambda u: iops(u, False, args.count)),
        ("qemu-img bench -d 32 -s 4k write (IOPS)", lambda u: iops(u, True, args.count)),
    ]
    best: dict[tuple[str, str], float] = {}
    kinds = ("qcow2rw serve", "qemu-nbd")
    for r in range(args.repeat):
        for kind in kinds:
            sock = tmp / f"{kind.split()[0]}.sock"
            with server(kind, image, sock, args.workers) as uri:
                for name, func in rows:
                    value = func(uri)
                    key = (name, kind)
                    higher_better = "IOPS" in name
                    if key not in best or (value > best[key] if higher_better else value < best[key]):
                        best[key] = value
            (tmp / "out.raw").unlink(missing_ok=True)
        print(f"round {r + 1}/{args.repeat} done", flush=True)
    print(f"\n| row ({size}, best of {args.repeat}) | qcow2rw serve | qemu-nbd -e 8 | ratio |")
    print("|---|---|---|---|")
    for name, _ in rows:
        ours, theirs = best[(name, kinds[0])], best[(name, kinds[1])]
        if "IOPS" in name:
            ratio = ours / theirs
            print(f"| {name} | {ours / 1000:.1f} k | {theirs / 1000:.1f} k | {ratio:.2f}× |")
        else:
            ratio = theirs / ours  # speed ratio: >= 1 means as fast as qemu-nbd
            print(f"| {name} | {ours:.2f} s | {theirs:.2f} s | {ratio:.2f}× |")
    print("\nratio: qcow2rw's speed as a fraction of qemu-nbd's (1.00× = as fast)")
    if not args.dir:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _mib(size: str) -> int:
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
    size = size.upper().rstrip("B").rstrip("I")
    if size[-1] in units:
        return int(float(size[:-1]) * units[size[-1]])
    return int(size) // MiB


if __name__ == "__main__":
    sys.exit(main())
