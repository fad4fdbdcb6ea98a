"""``qcow2rw bench``: ``qemu-img bench`` over a :class:`~qcow2rw.aio.AioImage`.

The options and the two lines printed are qemu-img 7.2's::

    Sending 75000 read requests, 4096 bytes each, 64 in parallel (starting at offset 0, step size 4096)
    Run completed in 0.578 seconds.

One submitting thread keeps ``depth`` requests in flight on an ``AioImage`` of
``workers`` threads: when ``depth`` are in flight it waits for the oldest, then
submits the next.  Offsets are sequential as qemu-img bench issues them: the first
request at ``-o OFFSET``, then ``offset += step`` modulo the image size (qemu-img 7.2's
rule; a request reaching past the end fails the run, as in qemu-img 7.2).  Reads go
into one of ``depth`` preallocated buffers (``submit_readinto``), writes all send the
same buffer filled with the ``--pattern`` byte.  The time printed runs from the first
submission to the last completion: opening, and the flush that closing the image
does, are outside it (as in qemu-img bench).  A read benchmark opens the image
read-only, a write benchmark read-write (as qemu-img bench does).

Cache modes, as qemu-img bench's ``-t``: ``writeback`` (the default: the host page
cache, flushes only when asked) and ``none`` (the image opened with
``cache="none"``: O_DIRECT, :mod:`qcow2rw.directio`).  The other modes
(``writethrough``, ``directsync``, ``unsafe``) are refused.  ``--inline auto|never``
is the AioImage's inline completion (issue 16; it never applies under ``-t none``,
which has no page cache to hit).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import qcow2rw
from qcow2rw.units import UsageError, parse_size

CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")
SUPPORTED_CACHE_MODES = ("writeback", "none")


class BenchError(Exception):
    """A bad option or a failed request (one line, exit status 1)."""


@dataclass
class BenchOptions:
    """What ``qcow2rw bench`` was asked to do (qemu-img bench's options)."""

    filename: str
    count: int = 75000            #: -c: requests in all
    depth: int = 64               #: -d: requests in flight
    size: int = 4096              #: -s: bytes per request
    step: int = 0                 #: -S: offset increment (0: the request size)
    offset: int = 0               #: -o: offset of the first request
    write: bool = False           #: -w: write instead of read
    pattern: int = 0              #: --pattern: the byte written
    cache: str = "writeback"      #: -t: writeback (page cache) or none (O_DIRECT)
    flush_interval: int = 0       #: --flush-interval: flush after every N requests
    drain_on_flush: bool = True   #: --no-drain clears it: flush without draining first
    force_share: bool = False     #: -U
    lock_mode: str = "fine"       #: the image's lock mode
    workers: int | None = None    #: AioImage threads (default: min(depth, CPUs))
    inline: str = "auto"          #: AioImage inline completion of reads ("auto", "never")


def sequential_offsets(count: int, size: int, step: int, offset: int, image_size: int) -> list[int]:
    """The offsets qemu-img 7.2's bench issues: *offset*, then += *step* modulo the size.

    Raises :class:`BenchError` (qemu-img: ``Failed request: Input/output error``) if a
    request would reach past the end of the image.
    """
    out = []
    for _ in range(count):
        if offset + size > image_size:
            raise BenchError(f"Failed request: {size} bytes at offset {offset} reach past the "
                             f"end of the image ({image_size} bytes)")
        out.append(offset)
        offset = (offset + step) % image_size if image_size else 0
    return out


def random_offsets(count: int, size: int, image_size: int, seed: int) -> list[int]:
    """*count* random offsets, multiples of *size*, of requests inside the image."""
    slots = image_size // size
    if slots < 1:
        raise BenchError(f"the image ({image_size} bytes) is smaller than one request")
    rng = random.Random(seed)
    return [rng.randrange(slots) * size for _ in range(count)]


def drive(aio: Any, offsets: Sequence[int], size: int, depth: int, *, write: bool,
          pattern: int = 0, flush_interval: int = 0, drain_on_flush: bool = True) -> float:
    """Issue one request per offset with *depth* in flight; return the seconds taken.

    *aio* is an :class:`~qcow2rw.aio.AioImage` (or anything with ``submit_readinto``,
    ``submit_write`` and ``submit_flush`` returning futures).  A request that fails
    raises its error here.
    """
    if depth < 1:
        raise BenchError("Invalid queue depth specified")
    inflight: deque[Any] = deque()
    wait = inflight.popleft
    push = inflight.append
    if write:
        data = bytes([pattern]) * size
        submit = aio.submit_write
        args = [(off, data) for off in offsets]
    else:
        bufs = [bytearray(size) for _ in range(min(depth, max(1, len(offsets))))]
        submit = aio.submit_readinto
        nbuf = len(bufs)
        args = [(off, bufs[i % nbuf]) for i, off in enumerate(offsets)]
    start = time.perf_counter()
    if not flush_interval:
        for a in args:
            if len(inflight) >= depth:
                wait().result()
            push(submit(*a))
    else:
        for i, a in enumerate(args, 1):
            if len(inflight) >= depth:
                wait().result()
            push(submit(*a))
            if i % flush_interval == 0:
                if drain_on_flush:
                    while inflight:
                        wait().result()
                    aio.submit_flush().result()
                else:
                    push(aio.submit_flush())
    while inflight:
        wait().result()
    return time.perf_counter() - start


#: AioImage threads for ``-t none`` when not given: an O_DIRECT request waits for the
#: device, not the CPU, so more threads than CPUs keep it busy (8 measured best here
#: for 4 KiB and 64 KiB at depth 32 on 2 CPUs: 2 threads gave 25-40 % less, 16-32 no
#: more).
DIRECT_WORKERS = 8


def default_workers(depth: int, direct: bool = False) -> int:
    """AioImage threads when not given: one per CPU (:data:`DIRECT_WORKERS` for
    O_DIRECT), never more than *depth*."""
    return max(1, min(depth, DIRECT_WORKERS if direct else os.cpu_count() or 2))


def run(opts: BenchOptions, out: TextIO | None = None, err: TextIO | None = None) -> float:
    """Run the benchmark *opts* describes, printing qemu-img bench's two lines.

    Returns the seconds the run took; raises :class:`BenchError` for bad options or a
    failed request.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    if opts.cache not in CACHE_MODES:
        raise BenchError("Invalid cache mode")
    if opts.cache not in SUPPORTED_CACHE_MODES:
        raise BenchError(f"cache mode '{opts.cache}' is not supported by qcow2rw bench "
                         "(writeback or none)")
    if opts.count < 0:
        raise BenchError("Invalid request count specified")
    if opts.depth < 1:
        raise BenchError("Invalid queue depth specified")
    if opts.size < 1:
        raise BenchError("Invalid buffer size specified")
    if opts.offset < 0:
        raise BenchError("Invalid offset specified")
    if not 0 <= opts.pattern <= 255:
        raise BenchError("Invalid pattern byte specified")
    if opts.flush_interval < 0:
        raise BenchError("Invalid flush interval specified")
    if opts.flush_interval and not opts.write:
        raise BenchError("--flush-interval is only available in write tests")
    if not opts.drain_on_flush and not opts.flush_interval:
        raise BenchError("--no-drain requires --flush-interval")
    if opts.flush_interval and opts.flush_interval < opts.depth:
        raise BenchError("Flush interval can't be smaller than depth")
    step = opts.step or opts.size
    workers = opts.workers or default_workers(opts.depth, opts.cache == "none")
    try:
        img = qcow2rw.open(opts.filename, readonly=not opts.write, lock_mode=opts.lock_mode,
                           force_share=opts.force_share, cache=opts.cache)
    except qcow2rw.DirectIOUnsupported as exc:
        raise BenchError(str(exc)) from exc
    try:
        out.write(f"Sending {opts.count} {'write' if opts.write else 'read'} requests, "
                  f"{opts.size} bytes each, {opts.depth} in parallel (starting at offset "
                  f"{opts.offset}, step size {step})\n")
        out.flush()
        offsets = sequential_offsets(opts.count, opts.size, step, opts.offset, img.size)
        with qcow2rw.AioImage(img, workers=workers, inline=opts.inline) as aio:
            try:
                seconds = drive(aio, offsets, opts.size, opts.depth, write=opts.write,
                                pattern=opts.pattern, flush_interval=opts.flush_interval,
                                drain_on_flush=opts.drain_on_flush)
            except (OSError, qcow2rw.Qcow2Error) as exc:
                raise BenchError(f"Failed request: {exc}") from exc
        out.write(f"Run completed in {seconds:.3f} seconds.\n")
        out.flush()
    finally:
        img.close()
    return seconds


# --------------------------------------------------------------------------------------
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """qemu-img bench's options, plus ``--lock-mode`` and ``--workers``."""
    p.add_argument("-c", dest="count", default="75000", metavar="COUNT",
                   help="number of requests (default 75000)")
    p.add_argument("-d", dest="depth", default="64", metavar="DEPTH",
                   help="requests in flight at once (default 64)")
    p.add_argument("-f", dest="fmt", default="qcow2", metavar="FMT", help="image format (qcow2)")
    p.add_argument("--flush-interval", default="0", metavar="N",
                   help="flush after every N requests (write tests only)")
    p.add_argument("--no-drain", action="store_true",
                   help="with --flush-interval: flush without waiting for requests in flight")
    p.add_argument("-i", dest="aio", default="threads", metavar="AIO",
                   help="AIO backend: only 'threads' (the AioImage thread pool)")
    p.add_argument("--inline", choices=("auto", "never"), default="auto",
                   help="complete reads the page cache serves in the submitting thread "
                        "(auto, the default) or always in the pool (never)")
    p.add_argument("-o", dest="offset", default="0", metavar="OFFSET",
                   help="offset of the first request (default 0)")
    p.add_argument("--pattern", default="0", help="byte written by write tests (default 0)")
    p.add_argument("-q", dest="quiet", action="store_true", help="accepted (qemu-img prints "
                   "its two lines anyway)")
    p.add_argument("-s", dest="size", default="4096", metavar="BUFFER_SIZE",
                   help="bytes per request (default 4k)")
    p.add_argument("-S", dest="step", default="0", metavar="STEP_SIZE",
                   help="offset increment between requests (default: the request size)")
    p.add_argument("-t", dest="cache", default="writeback", metavar="CACHE",
                   help="cache mode: writeback (default: the host page cache) or none "
                        "(O_DIRECT)")
    p.add_argument("-w", dest="write", action="store_true", help="write test (default: read)")
    p.add_argument("-U", dest="force_share", action="store_true",
                   help="open even if another process holds the image (read tests)")
    p.add_argument("--lock-mode", choices=("mutex", "rwlock", "fine"), default="fine",
                   help="the image's lock mode (default fine)")
    p.add_argument("--workers", type=int, default=None,
                   help="AioImage worker threads (default: min(depth, number of CPUs), "
                        f"with -t none min(depth, {DIRECT_WORKERS}))")
    p.add_argument("filename")


def _int(text: str, what: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise BenchError(f"Invalid {what} specified") from None


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """Turn parsed arguments into :class:`BenchOptions` (sizes with k/M/G suffixes)."""
    if args.fmt != "qcow2":
        raise BenchError(f"Unknown file format '{args.fmt}' (qcow2rw reads qcow2 images only)")
    if args.aio != "threads":
        raise BenchError(f"AIO mode '{args.aio}' is not supported (qcow2rw uses a thread pool)")
    if args.force_share and args.write:
        raise BenchError("--force-share/-U can only be used with read tests")

    def size(text: str, what: str) -> int:
        try:
            return parse_size(text, what)
        except UsageError:
            raise BenchError(f"Invalid {what} specified") from None

    return BenchOptions(
        filename=args.filename, count=_int(args.count, "request count"),
        depth=_int(args.depth, "queue depth"), size=size(args.size, "buffer size"),
        step=size(args.step, "step size"), offset=size(args.offset, "offset"),
        write=args.write, pattern=_int(args.pattern, "pattern byte"), cache=args.cache,
        flush_interval=_int(args.flush_interval, "flush interval"),
        drain_on_flush=not args.no_drain, force_share=args.force_share,
        lock_mode=args.lock_mode, workers=args.workers, inline=args.inline)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qcow2rw.devkit.bench`` (same options as ``qcow2rw bench``)."""
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        run(options_from_args(args))
    except BenchError as exc:
        sys.stderr.write(f"qcow2rw bench: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
