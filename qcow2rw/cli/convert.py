"""The ``convert`` verb: ``qemu-img convert``'s options, checks and messages.

``convert [-f FMT] [-O qcow2|raw] [-c] [-o OPTIONS] [-n] [--target-is-zero] [-S SIZE]
[-B BACKING -F FMT] [-W] [-m N] [-p] [-U] [-q] [-l SNAPSHOT] SRC DST``; the copy is
:func:`qcow2rw.convert.convert`.  As in qemu-img, ``-O`` defaults to ``raw``, ``-o``
lists accumulate (read by the ``create`` verb's parser), and nothing is printed unless
``-p`` (a tqdm bar, on a terminal only).  Errors are one line and exit status 1.
"""

from __future__ import annotations

import argparse
import errno
import sys
from typing import Any

from qcow2rw.cli.common import (CliError, Subparsers, add_data_file, add_force_share,
                                add_options, add_quiet, parse_bool, parse_number,
                                parse_snapshot_param, progress_bar)
from qcow2rw.cli.compare import _open_error
from qcow2rw.cli.create import _CREATE_HELP, _collect_create_options
from qcow2rw.convert import DEFAULT_MIN_SPARSE, MAX_PARALLEL, convert
from qcow2rw.errors import Qcow2Error
from qcow2rw.units import UsageError, parse_size


#: The errors of a file that cannot be opened (qemu-img: "Could not open 'F': ...").
_OPEN_ERRORS = frozenset((errno.ENOENT, errno.EISDIR, errno.EACCES, errno.EPERM,
                          errno.ENOTDIR, errno.ELOOP))


def _creation_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``-o`` lists as :func:`~qcow2rw.convert.convert` keywords (None: ``help``)."""
    if not args.options:
        return {}
    if args.no_create:
        raise CliError("-o has no effect when skipping image creation")
    opts = _collect_create_options(argparse.Namespace(
        filename=None, options=args.options, backing_file=None, backing_fmt=None))
    if opts is None:
        return None
    out: dict[str, Any] = {}
    if "cluster_size" in opts:
        out["cluster_size"] = parse_size(opts["cluster_size"], "cluster_size")
    if "refcount_bits" in opts:
        out["refcount_bits"] = parse_number("refcount_bits", opts["refcount_bits"])
    if "lazy_refcounts" in opts:
        out["lazy_refcounts"] = parse_bool("lazy_refcounts", opts["lazy_refcounts"])
    if "data_file" in opts or "data_file_raw" in opts:
        raise CliError("a target with an external data file (data_file=...) is not supported "
                       "by qcow2rw convert")
    if "extended_l2" in opts:
        out["extended_l2"] = parse_bool("extended_l2", opts["extended_l2"])
    for key in ("compat", "preallocation", "compression_type"):
        if key in opts:
            out[key] = opts[key]
    if "backing_file" in opts:  # -o backing_file=... is -B
        args.backing_file = opts["backing_file"]
    if "backing_fmt" in opts:
        args.backing_fmt = opts["backing_fmt"]
    return out


def _cmd_convert(args: argparse.Namespace) -> int:
    if args.out_fmt is None:
        args.out_fmt = "raw"  # qemu-img's default
    try:
        min_sparse = parse_size(args.sparse, "buffer size for sparse output") \
            if args.sparse is not None else DEFAULT_MIN_SPARSE
    except UsageError:
        raise CliError("Invalid buffer size for sparse output specified. Valid sizes are "
                       "multiples of 512 up to 16777216. Select 0 to disable sparse "
                       "detection (fully allocates output).") from None
    try:
        workers = int(args.parallel, 0) if args.parallel is not None else 8
    except ValueError:
        workers = 0
    if not 1 <= workers <= MAX_PARALLEL:
        raise CliError("Invalid number of coroutines. Allowed number of coroutines is "
                       f"between 1 and {MAX_PARALLEL}")
    if args.target_is_zero and not args.no_create:
        raise CliError("--target-is-zero requires use of -n flag")
    options = _creation_options(args)
    if options is None:
        if args.out_fmt == "qcow2":
            sys.stdout.write(_CREATE_HELP)
        else:
            sys.stdout.write("Supported options:\n  preallocation=<str>    - Preallocation "
                             "mode (allowed values: off, falloc, full)\n")
        return 0
    if len(args.files) < 2:
        raise CliError("Must specify image file name")
    if len(args.files) > 2:
        raise CliError("qcow2rw converts one source image (concatenating several is not "
                       "supported)")
    src, dst = args.files
    snapshot = parse_snapshot_param(args.snapshot)
    with progress_bar(args.progress and not args.quiet, "convert") as progress:
        try:
            convert(src, dst, src_format=args.src_fmt, out_format=args.out_fmt,
                    compressed=args.compress, backing_file=args.backing_file,
                    backing_format=args.backing_fmt, no_create=args.no_create,
                    target_is_zero=args.target_is_zero, min_sparse=min_sparse,
                    workers=workers, out_of_order=args.out_of_order,
                    force_share=args.force_share, snapshot=snapshot, progress=progress,
                    cache=args.cache, src_data_file=args.data_file,
                    trust_data_file=args.trust_data_file, **options)
        except OSError as exc:
            if exc.filename in (src, dst) and exc.errno in _OPEN_ERRORS:
                raise CliError(_open_error(exc.filename, exc)) from None
            raise
        except Qcow2Error as exc:
            if str(exc).startswith(("Image is not in qcow2 format", "Unknown driver")):
                raise CliError(_open_error(src, exc)) from None
            raise
    return 0


def add_convert(subparsers: Subparsers) -> None:
    """``convert [-f FMT] [-O FMT] [-c] [-o OPTIONS] [-n] [--target-is-zero] [-S SIZE]
    [-B BACKING -F FMT] [-W] [-m N] [-p] [-U] [-q] [-l SNAPSHOT] SRC DST``."""
    p = subparsers.add_parser(
        "convert", help="copy an image into a new qcow2 or raw image",
        description="Like 'qemu-img convert': copy the guest contents of SRC (qcow2 with "
                    "its backing chain, or raw) into DST, created as -O (qcow2 or raw; "
                    "default raw, as qemu-img).  The source's block status drives the "
                    "copy: holes and zeros are skipped.  -c compresses every cluster on "
                    "-m threads and stores them in guest order (byte-identical output "
                    "from run to run; -W: in completion order).  '-o help' lists the "
                    "options.")
    p.add_argument("-f", dest="src_fmt", metavar="FMT",
                   help="format of SRC: qcow2 or raw (default: probed)")
    p.add_argument("-O", dest="out_fmt", metavar="OUTPUT_FMT",
                   help="format of DST: qcow2 or raw (default raw)")
    p.add_argument("-c", dest="compress", action="store_true",
                   help="compress the target's clusters (qcow2 only)")
    add_options(p, "comma-separated key=value options of the new image (repeatable): "
                   "cluster_size, compat, refcount_bits, lazy_refcounts, preallocation, "
                   "compression_type (zlib, zstd), extended_l2, backing_file, backing_fmt")
    p.add_argument("-n", dest="no_create", action="store_true",
                   help="do not create DST: write into the existing image")
    p.add_argument("--target-is-zero", dest="target_is_zero", action="store_true",
                   help="with -n: DST reads as zeros already (zeros are not written)")
    p.add_argument("-S", dest="sparse", metavar="SIZE",
                   help="runs of zeros this long are not written (default 4k; 0 writes "
                        "everything)")
    p.add_argument("-B", dest="backing_file", metavar="BACKING_FILE",
                   help="backing file of DST: only what SRC's top image allocates is copied")
    p.add_argument("-F", dest="backing_fmt", metavar="BACKING_FMT",
                   help="format of the backing file: qcow2 or raw (required with -B)")
    p.add_argument("-W", dest="out_of_order", action="store_true",
                   help="allow out-of-order writes (the layout then varies from run to run)")
    p.add_argument("-m", dest="parallel", metavar="N",
                   help=f"worker threads, 1 to {MAX_PARALLEL} (default 8)")
    p.add_argument("-p", dest="progress", action="store_true",
                   help="show a progress bar (on a terminal only)")
    p.add_argument("-l", dest="snapshot", metavar="SNAPSHOT",
                   help="convert internal snapshot SNAPSHOT of SRC (an id or a name, or "
                        "snapshot.id=ID / snapshot.name=NAME)")
    p.add_argument("-t", dest="cache", metavar="CACHE", default="unsafe",
                   help="target cache mode: unsafe (the default, as qemu-img: not synced), "
                        "or writeback, writethrough, directsync, none (synced at the end; "
                        "none and directsync write the target with O_DIRECT)")
    p.add_argument("-T", dest="src_cache", metavar="SRC_CACHE",
                   help="source cache mode (accepted for qemu-img compatibility)")
    add_quiet(p, "quiet: no progress bar")
    add_force_share(p, " (SRC)")
    add_data_file(p)  # (the source's)
    p.add_argument("files", nargs="*", metavar="SRC DST")
    p.set_defaults(func=_cmd_convert)
