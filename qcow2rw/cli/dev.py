"""The verbs that exercise the library: ``demo``, ``stress`` and ``bench``.

Thin wrappers: the engines are in :mod:`qcow2rw.devkit` (which never imports the
command line); their options are registered here or by the devkit module itself.  The
devkit is imported only when one of these verbs runs (``full``: its options are needed),
so that every other command starts without it.
"""

from __future__ import annotations

import argparse

from qcow2rw.cli.common import CliError, Subparsers
from qcow2rw.units import parse_size


def _cmd_demo(args: argparse.Namespace) -> int:
    from qcow2rw.devkit import demo
    return demo.run(demo.DemoOptions(directory=args.dir, size=parse_size(args.size),
                                     keep=args.keep, workers=args.workers, seed=args.seed))


def add_demo(subparsers: Subparsers, full: bool = True) -> None:
    """``demo [--dir DIR] [--size SIZE] [--keep] [--workers N] [--seed N]``."""
    p = subparsers.add_parser(
        "demo", help="drive an image from a thread pool through futures and verify it",
        description="Create an image and drive it from a pool of threads through futures "
                    "(qcow2rw.AioImage): unaligned writes, reads, discards, write_zeroes and "
                    "flushes in flight at once, some requests cancelled while queued and "
                    "some while running, a snapshot when supported; then verify every byte "
                    "against an in-memory copy, reopen read-only and verify again, and run "
                    "'qemu-img check' and 'qemu-img compare' when qemu-img is installed.")
    p.add_argument("--dir", help="directory for the image (default: a new temporary one)")
    p.add_argument("--size", default="64M", help="virtual size (default 64M; at most 1G)")
    p.add_argument("--keep", action="store_true", help="keep the image afterwards")
    p.add_argument("--workers", type=int, default=8,
                   help="worker threads of the pool (default 8)")
    p.add_argument("--seed", type=int, default=2024,
                   help="seed of the request generator (default 2024)")
    p.set_defaults(func=_cmd_demo)


def _cmd_stress(args: argparse.Namespace) -> int:
    if args.workers < 1 or args.rounds < 1:
        raise CliError("--workers and --rounds must be at least 1")
    from qcow2rw.devkit import stress
    try:
        return stress.run_cli(args)
    except ValueError as exc:  # an impossible layout (image too small for the workers)
        raise CliError(str(exc)) from None


def add_stress(subparsers: Subparsers, full: bool = True) -> None:
    """``stress`` with the options of :func:`qcow2rw.devkit.stress.add_arguments`."""
    p = subparsers.add_parser(
        "stress", help="hammer an image from many threads and check every byte",
        description="N threads read, write, discard, zero and flush one image at once "
                    "(shared and per-thread regions, unaligned requests); every sector "
                    "written is stamped, and a linearizability oracle checks every read "
                    "and the final content.  After each round: close, 'qemu-img check' "
                    "(clean, no leaks), 'qemu-img compare' with a raw copy of what was read, "
                    "reopen and verify.  Exit status 1 on any failure, with the seed.")
    if full:
        from qcow2rw.devkit import stress
        stress.add_arguments(p)
    p.set_defaults(func=_cmd_stress)


def _cmd_bench(args: argparse.Namespace) -> int:
    from qcow2rw.devkit import bench
    try:
        bench.run(bench.options_from_args(args))
    except bench.BenchError as exc:
        raise CliError(str(exc)) from None
    return 0


def add_bench(subparsers: Subparsers, full: bool = True) -> None:
    """``bench`` with qemu-img bench's options (:func:`qcow2rw.devkit.bench.add_arguments`)."""
    p = subparsers.add_parser(
        "bench", help="like 'qemu-img bench': sequential requests with a queue depth",
        description="Like 'qemu-img bench': COUNT sequential read (or -w write) requests "
                    "of BUFFER_SIZE bytes, DEPTH in flight on a qcow2rw.AioImage, and the "
                    "time they took; -t none opens the image O_DIRECT (cache='none').")
    if full:
        from qcow2rw.devkit import bench
        bench.add_arguments(p)
    p.set_defaults(func=_cmd_bench)
