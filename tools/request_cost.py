#!/usr/bin/env python3
"""Where the time of one small read goes: the cost of each layer, in µs per request.

Measured one thread at a time on a fully allocated image (page cache warm), each
figure the median of ``--repeat`` timings of ``--count`` calls:

* ``os.preadv`` of 4 KiB from the raw file (the floor);
* the global lock's shared side, one acquire and release: in ``fine`` mode (the
  default, measured here) a per-thread flag in front of ``imagelock.FairRWLock``
  (imagelock.BiasedReader); ``--lock-mode rwlock`` shows the fair lock alone;
* ``Image._fast_io`` alone (lock-free L2 cache lookup, entry mutex, in-use pin, preadv);
* ``Image.readinto`` (range checks, global lock, fast path);
* a ``concurrent.futures.Future`` made and settled (what every pool pays);
* a round trip through a ``ThreadPoolExecutor`` of one thread running ``os.preadv``
  (the raw-Python pool of ``bench_compare.py`` at depth 1) and through an
  ``AioImage`` of one worker running ``readinto``.

The difference between the last two is what qcow2rw adds per request on top of a plain
pool; the lines above it say which layer it comes from.  A benchmark aid, not a test.

    python tools/request_cost.py [--size 64M] [--count 20000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree

import qcow2rw  # noqa: E402
from qcow2rw.units import parse_size  # noqa: E402

BLOCK = 4096


def per_call(func: Callable[[int], None], count: int, repeat: int) -> float:
    """Median µs per call of ``func(i)`` for i in range(count)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for i in range(count):
            func(i)
        times.append((time.perf_counter() - start) / count * 1e6)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="64M", help="image and raw file size (default 64M)")
    p.add_argument("--count", type=int, default=20000, help="calls per timing")
    p.add_argument("--repeat", type=int, default=5, help="timings per figure (median)")
    p.add_argument("--lock-mode", default="fine", choices=("mutex", "rwlock", "fine"),
                   help="the image's lock mode (default fine)")
    args = p.parse_args(argv)
    size = parse_size(args.size)
    if not shutil.which("qemu-img"):
        print("request_cost: qemu-img is needed to build the test image", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="qcow2rw-cost-")
    try:
        raw, image = os.path.join(work, "data.raw"), os.path.join(work, "data.qcow2")
        with open(raw, "wb") as f:
            f.write(os.urandom(size))
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, image], check=True)
        blocks = size // BLOCK
        buf = bytearray(BLOCK)
        fd = os.open(raw, os.O_RDONLY)
        rows: list[tuple[str, float]] = []
        try:
            rows.append(("os.preadv 4 KiB (raw file)",
                         per_call(lambda i: os.preadv(fd, [buf], (i % blocks) * BLOCK),
                                  args.count, args.repeat)))
            with qcow2rw.open(image, readonly=True, lock_mode=args.lock_mode) as img:
                img.read(0, size)  # every L2 table cached, page cache warm
                lock = img._glock

                def lock_pair(_: int) -> None:
                    held = lock.shared()
                    held.acquire()
                    held.release()

                rows.append(("global lock shared acquire+release", per_call(
                    lock_pair, args.count, args.repeat)))
                rows.append(("Image._fast_io 4 KiB (no lock)", per_call(
                    lambda i: img._fast_io((i % blocks) * BLOCK, buf, False),
                    args.count, args.repeat)))
                rows.append(("Image.readinto 4 KiB", per_call(
                    lambda i: img.readinto((i % blocks) * BLOCK, buf), args.count,
                    args.repeat)))

                def future(_: int) -> None:
                    f: concurrent.futures.Future[int] = concurrent.futures.Future()
                    f.set_running_or_notify_cancel()
                    f.set_result(0)
                    f.result()

                rows.append(("Future made, run, settled, read", per_call(
                    future, args.count, args.repeat)))
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    rows.append(("ThreadPoolExecutor(1) round trip, os.preadv", per_call(
                        lambda i: pool.submit(os.preadv, fd, [buf],
                                              (i % blocks) * BLOCK).result(),
                        args.count // 4, args.repeat)))
                with qcow2rw.AioImage(img, workers=1) as aio:
                    rows.append(("AioImage(1 worker) round trip, readinto", per_call(
                        lambda i: aio.submit_readinto((i % blocks) * BLOCK, buf).result(),
                        args.count // 4, args.repeat)))
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"# µs per request, one thread, median of {args.repeat} x {args.count} calls "
          f"(lock mode {args.lock_mode}, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs)")
    for name, value in rows:
        print(f"{value:8.2f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
