"""The verbs that set an image's shape: ``create``, ``resize`` and ``amend``.

``create`` takes qemu-img's ``-o`` options (and ``-b``/``-F``), opening the backing
file for its size unless ``-u``; ``resize`` and ``amend`` take the image exclusively.
A relative size (``resize IMG -1G``) is taken out of argparse's way by
:func:`fix_resize_argv`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import qcow2rw
from qcow2rw.cli.common import (CliError, Subparsers, add_data_file, add_fmt, add_options,
                                add_quiet, data_file_options,
                                one_line, parse_bool, parse_number, parse_option_list,
                                path_combine, require_qcow2)
from qcow2rw.errors import Qcow2Error
from qcow2rw.units import parse_size

_CREATE_KEYS = ("size", "compat", "backing_file", "backing_fmt", "cluster_size", "extended_l2",
                "preallocation", "lazy_refcounts", "refcount_bits", "compression_type",
                "data_file", "data_file_raw")
_UNSUPPORTED_CREATE_KEYS = ("encryption", "nocow", "extent_size_hint")
_CREATE_HELP = """\
Supported options:
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image (qcow2 or raw)
  cluster_size=<size>    - qcow2 cluster size (512 to 2M, a power of two)
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  compression_type=<str> - Compression method (zlib, zstd)
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw data file
  extended_l2=<bool (on/off)> - Extended L2 tables (off)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  preallocation=<str>    - Preallocation mode (allowed values: off, metadata, falloc, full)
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
"""
_COMPAT = {"0.10": "0.10", "v2": "0.10", "1.1": "1.1", "v3": "1.1"}


def _collect_create_options(args: argparse.Namespace) -> dict[str, str] | None:
    """Merge every ``-o`` list, then ``-b``/``-F``; later values win.  None means ``help``."""
    where = f"{args.filename}: " if args.filename else ""
    opts: dict[str, str] = {}
    for text in args.options:
        for key, value in parse_option_list(text):
            if key in ("help", "?") and value is None:
                return None
            if key in _UNSUPPORTED_CREATE_KEYS or key.startswith("encrypt."):
                raise CliError(f"{where}option '{key}' is not supported by qcow2rw")
            if key not in _CREATE_KEYS:
                raise CliError(f"{where}Invalid parameter '{key}'")
            if value is None:
                raise CliError(f"{where}Parameter '{key}' needs a value ({key}=...)")
            opts[key] = value
    if args.backing_file is not None:
        opts["backing_file"] = args.backing_file
    if args.backing_fmt is not None:
        opts["backing_fmt"] = args.backing_fmt
    return opts


def _backing_size(filename: str, backing: str, backing_fmt: str) -> int:
    """Open the new image's backing file (its whole chain) and return its virtual size."""
    path = path_combine(filename, backing)
    if os.path.exists(filename) and os.path.exists(path) and os.path.samefile(filename, path):
        raise CliError(f"{filename}: Trying to create an image with the same filename as "
                       "the backing file")
    try:
        if backing_fmt == "raw":
            with open(path, "rb") as f:
                return os.fstat(f.fileno()).st_size
        with qcow2rw.open(path, readonly=True, force_share=True, metadata_only=True) as img:
            return int(img.size)
    except OSError as exc:
        raise CliError(f"{filename}: Could not open backing image '{path}': "
                       f"{exc.strerror or exc}") from None
    except Qcow2Error as exc:
        raise CliError(f"{filename}: Could not open backing image '{path}': "
                       f"{one_line(str(exc))}") from None


def _cmd_create(args: argparse.Namespace) -> int:
    if args.fmt != "qcow2":
        raise CliError(f"Unknown file format '{args.fmt}' (qcow2rw creates qcow2 images only)")
    opts = _collect_create_options(args)
    if opts is None:
        sys.stdout.write(_CREATE_HELP)
        return 0
    if args.filename is None:
        raise CliError("Expecting image file name")
    filename: str = args.filename

    cluster_size = parse_size(opts.get("cluster_size", "65536"), "cluster_size")
    refcount_bits = parse_number("refcount_bits", opts.get("refcount_bits", "16"))
    lazy_refcounts = parse_bool("lazy_refcounts", opts.get("lazy_refcounts", "off"))
    extended_l2 = parse_bool("extended_l2", opts.get("extended_l2", "off"))
    data_file_raw = parse_bool("data_file_raw", opts.get("data_file_raw", "off"))
    if args.size is not None and "size" in opts:
        raise CliError(f"{filename}: The image size must be specified only once")
    size_text = args.size if args.size is not None else opts.get("size")
    size = parse_size(size_text) if size_text is not None else None

    backing = opts.get("backing_file") or None
    backing_fmt = opts.get("backing_fmt")
    if backing is not None:
        if backing_fmt is None:
            raise CliError(f"{filename}: Backing file specified without backing format "
                           "(use -F qcow2 or -F raw)")
        if backing_fmt not in ("qcow2", "raw"):
            raise CliError(f"{filename}: Unknown backing file format '{backing_fmt}' "
                           "(qcow2 or raw)")
        if not args.unsafe:
            backing_size = _backing_size(filename, backing, backing_fmt)
            if size is None:
                size = backing_size
    if size is None:
        raise CliError(f"{filename}: Image creation needs a size parameter")

    if not args.quiet:
        parts = [f"cluster_size={cluster_size}", f"extended_l2={opts.get('extended_l2', 'off')}"]
        if "preallocation" in opts:
            parts.append(f"preallocation={opts['preallocation']}")
        parts += [f"compression_type={opts.get('compression_type', 'zlib')}", f"size={size}"]
        if backing is not None:
            parts.append(f"backing_file={backing}")
        if backing_fmt is not None:
            parts.append(f"backing_fmt={backing_fmt}")
        if "compat" in opts:
            parts.append(f"compat={opts['compat']}")
        if "data_file" in opts:
            parts.append(f"data_file={opts['data_file']}")
        if "data_file_raw" in opts:
            parts.append(f"data_file_raw={opts['data_file_raw']}")
        parts += [f"lazy_refcounts={opts.get('lazy_refcounts', 'off')}",
                  f"refcount_bits={opts.get('refcount_bits', '16')}"]
        sys.stdout.write(f"Formatting '{filename}', fmt=qcow2 {' '.join(parts)}\n")
        sys.stdout.flush()

    compat = opts.get("compat", "1.1")
    img = qcow2rw.create(filename, size, cluster_size=cluster_size, backing_file=backing,
                         backing_format=backing_fmt if backing is not None else None,
                         lazy_refcounts=lazy_refcounts, refcount_bits=refcount_bits,
                         compat=_COMPAT.get(compat, compat),
                         preallocation=opts.get("preallocation", "off"),
                         compression_type=opts.get("compression_type", "zlib"),
                         extended_l2=extended_l2, data_file=opts.get("data_file"),
                         data_file_raw=data_file_raw)
    img.close()
    return 0


def add_create(subparsers: Subparsers) -> None:
    """``create [-f qcow2] [-b BACKING -F FMT] [-o OPTIONS] [-u] [-q] FILENAME [SIZE]``."""
    p = subparsers.add_parser(
        "create", help="create a new qcow2 image",
        description="Like 'qemu-img create': create FILENAME of SIZE bytes (k, M, G, T "
                    "suffixes are powers of 1024; with a backing file SIZE defaults to the "
                    "backing file's size). '-o help' lists the options.")
    add_fmt(p)
    p.add_argument("-b", dest="backing_file", metavar="BACKING_FILE",
                   help="backing file (relative names are relative to FILENAME's directory)")
    p.add_argument("-F", dest="backing_fmt", metavar="BACKING_FMT",
                   help="format of the backing file: qcow2 or raw")
    add_options(p, "comma-separated key=value options (repeatable): cluster_size, "
                   "backing_file, backing_fmt, lazy_refcounts, refcount_bits, compat, "
                   "preallocation, size")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="do not open the backing file (SIZE is then required)")
    add_quiet(p, "quiet: no 'Formatting' line")
    p.add_argument("filename", nargs="?")  # optional only for '-o help'
    p.add_argument("size", nargs="?")
    p.set_defaults(func=_cmd_create)


# --------------------------------------------------------------------------------------
# resize and amend (they take the image exclusively)


_SIZE_ARGUMENT = re.compile(r"[+-][0-9.]")


def fix_resize_argv(argv: list[str]) -> list[str]:
    """Let ``resize IMG -1G`` through argparse: a relative size is not an option."""
    if argv[:1] == ["resize"] and "--" not in argv and _SIZE_ARGUMENT.match(argv[-1]):
        return argv[:-1] + ["--", argv[-1]]
    return argv


def _cmd_resize(args: argparse.Namespace) -> int:
    """``qemu-img resize [--shrink] [--preallocation=MODE] IMG [+|-]SIZE``."""
    require_qcow2(args.fmt)
    text = args.size
    relative = text[0] if text[:1] in ("+", "-") else ""
    amount = parse_size(text[1:] if relative else text, "size")
    img = qcow2rw.open(args.filename, **data_file_options(args))
    try:
        new_size = {"+": img.size + amount, "-": img.size - amount}.get(relative, amount)
        if new_size < 0:
            raise CliError("New image size must be positive")
        if new_size % 512:
            raise CliError("The new size must be a multiple of 512")
        img.resize(new_size, shrink=args.shrink, preallocation=args.preallocation)
    finally:
        img.close()
    if not args.quiet:
        sys.stdout.write("Image resized.\n")
    return 0


def add_resize(subparsers: Subparsers) -> None:
    """``resize [-f qcow2] [--shrink] [--preallocation=MODE] [-q] FILENAME [+|-]SIZE``."""
    p = subparsers.add_parser(
        "resize", help="grow or shrink an image's virtual size",
        description="Like 'qemu-img resize': set the virtual size to SIZE, or change it by "
                    "+SIZE / -SIZE.  Shrinking needs --shrink and drops the data past the "
                    "new end (internal snapshots keep theirs).  The area a grow adds reads "
                    "as zeros, also over a longer backing file.")
    add_fmt(p)
    p.add_argument("--shrink", action="store_true", help="allow the size to decrease")
    p.add_argument("--preallocation", default="off", metavar="MODE",
                   choices=("off", "metadata", "falloc", "full"),
                   help="preallocate the area a grow adds: off, metadata, falloc or full")
    add_quiet(p, "quiet: no 'Image resized.'")
    add_data_file(p)
    p.add_argument("filename")
    p.add_argument("size", metavar="[+|-]SIZE")
    p.set_defaults(func=_cmd_resize)


_AMEND_KEYS = ("compat", "lazy_refcounts", "refcount_bits", "size")
_AMEND_HELP = """\
Amend options for 'qcow2':
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
"""


def _cmd_amend(args: argparse.Namespace) -> int:
    """``qemu-img amend -o compat=...,lazy_refcounts=...,refcount_bits=...,size=... IMG``."""
    require_qcow2(args.fmt)
    if not args.options:
        raise CliError("Must specify options (-o)")
    opts: dict[str, str] = {}
    for text in args.options:
        for key, value in parse_option_list(text):
            if key in ("help", "?") and value is None:
                sys.stdout.write(_AMEND_HELP)
                return 0
            if key in _CREATE_KEYS and key not in _AMEND_KEYS:
                raise CliError(f"Invalid parameter '{key}': this option is only supported "
                               "for image creation")
            if key not in _AMEND_KEYS:
                raise CliError(f"Invalid parameter '{key}'")
            if value is None:
                raise CliError(f"Parameter '{key}' needs a value ({key}=...)")
            opts[key] = value
    if args.filename is None:
        raise CliError("Expecting one image file name")
    compat = opts.get("compat")
    if compat is not None and compat not in _COMPAT:
        raise CliError(f"Unknown compatibility level {compat}")
    lazy = parse_bool("lazy_refcounts", opts["lazy_refcounts"]) \
        if "lazy_refcounts" in opts else None
    bits = parse_number("refcount_bits", opts["refcount_bits"]) \
        if "refcount_bits" in opts else None
    size = parse_size(opts["size"], "size") if "size" in opts else None
    img = qcow2rw.open(args.filename, **data_file_options(args))
    try:
        img.amend(compat=_COMPAT[compat] if compat is not None else None,
                  lazy_refcounts=lazy, refcount_bits=bits)
        if size is not None and size != img.size:
            img.resize(size, shrink=True)  # amend shrinks without --shrink, as qemu-img
    finally:
        img.close()
    return 0


def add_amend(subparsers: Subparsers) -> None:
    """``amend [-f qcow2] -o OPTIONS [-q] FILENAME``."""
    p = subparsers.add_parser(
        "amend", help="change an image's format options in place",
        description="Like 'qemu-img amend': change compat (0.10 expands zero clusters), "
                    "lazy_refcounts, refcount_bits (the refcount structures are rebuilt "
                    "with the new width) and size.  '-o help' lists the options.")
    add_fmt(p)
    add_options(p)
    add_quiet(p)
    add_data_file(p)
    p.add_argument("filename", nargs="?")  # optional only for '-o help'
    p.set_defaults(func=_cmd_amend)
