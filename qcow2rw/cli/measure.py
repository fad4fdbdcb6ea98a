"""The ``measure`` verb: how big a new image must be, as ``qemu-img measure`` says.

``measure [-O FMT] [-o OPTIONS] [--output human|json] (--size SIZE | [-f FMT] [-U] SRC)``;
the figures come from :func:`qcow2rw.measure.measure`.  As in qemu-img, ``-O``
defaults to ``raw``, ``-o`` lists accumulate, and the argument checks come first
(with qemu-img's messages), then the source is opened, then the options are read.
"""

from __future__ import annotations

import argparse
import json
import sys

from qcow2rw.cli.common import (
    CliError,
    Subparsers,
    add_force_share,
    add_options,
    parse_option_list,
    parse_snapshot_param,
)
from qcow2rw.measure import measure
from qcow2rw.units import UsageError, parse_size


def _parse_image_size(text: str) -> int:
    """``--size``, with qemu-img's ``cvtnum`` message (it names no value)."""
    try:
        return parse_size(text, "image size")
    except UsageError as exc:
        if "Must be between" in str(exc):
            raise
        raise CliError("Invalid image size specified. You may use k, M, G, T, P or E "
                       "suffixes for kilobytes, megabytes, gigabytes, terabytes, "
                       "petabytes and exabytes.") from None


def _cmd_measure(args: argparse.Namespace) -> int:
    if args.output not in ("human", "json"):
        raise CliError("--output must be used with human or json as argument.")
    size = _parse_image_size(args.size) if args.size is not None else None
    if len(args.sources) > 1:
        raise CliError("At most one filename argument is allowed.")
    args.source = args.sources[0] if args.sources else None
    if args.source is None and (args.src_fmt is not None or args.snapshot is not None):
        raise CliError("--image-opts, -f, and -l require a filename argument.")
    if args.source is not None and size is not None:
        raise CliError("--size N cannot be used together with a filename.")
    if args.source is None and size is None:
        raise CliError("Either --size N or one filename must be specified.")
    snapshot = parse_snapshot_param(args.snapshot)
    pairs = [pair for text in args.options for pair in parse_option_list(text)]
    try:
        info = measure(size, args.source, out_format=args.out_fmt, options=pairs,
                       src_format=args.src_fmt, force_share=args.force_share,
                       snapshot=snapshot)
    except OSError as exc:
        if exc.filename is not None and exc.strerror:
            raise CliError(f"Could not open '{exc.filename}': {exc.strerror}") from None
        raise
    if args.output == "json":
        sys.stdout.write(json.dumps(info, indent=4) + "\n")
    else:
        sys.stdout.write(f"required size: {info['required']}\n"
                         f"fully allocated size: {info['fully-allocated']}\n")
        if "bitmaps" in info:
            sys.stdout.write(f"bitmaps size: {info['bitmaps']}\n")
    return 0


def add_measure(subparsers: Subparsers) -> None:
    """``measure [-O FMT] [-o OPTIONS] [--output FMT] [--size SIZE | [-f FMT] [-U] [-l SNAP] SRC]``."""
    p = subparsers.add_parser(
        "measure", help="how big a new image must be",
        description="Like 'qemu-img measure': the file size a new image of SIZE bytes, or "
                    "one made from SRC (qemu-img convert), needs ('required size') and "
                    "its size with every cluster allocated ('fully allocated size').  "
                    "-O is qcow2 or raw (default raw, as qemu-img).")
    p.add_argument("-O", dest="out_fmt", default="raw", metavar="OUTPUT_FMT",
                   help="format of the new image: qcow2 or raw (default raw)")
    add_options(p, "comma-separated key=value options of the new image (repeatable): "
                   "cluster_size, compat, refcount_bits, preallocation, extended_l2, "
                   "backing_file, ...")
    p.add_argument("--size", metavar="SIZE",
                   help="virtual size of an empty new image (k, M, G, T suffixes)")
    p.add_argument("-f", dest="src_fmt", metavar="FMT",
                   help="format of SRC: qcow2 or raw (probed by default)")
    p.add_argument("-l", dest="snapshot", metavar="SNAPSHOT",
                   help="measure internal snapshot SNAPSHOT of SRC (an id or a name, or "
                        "snapshot.id=ID / snapshot.name=NAME)")
    p.add_argument("--output", default="human", metavar="FMT",
                   help="output format: human (default) or json")
    add_force_share(p)
    p.add_argument("sources", nargs="*", metavar="SRC")
    p.set_defaults(func=_cmd_measure)
