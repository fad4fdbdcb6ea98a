"""The verbs that examine an image: ``info``, ``map`` and ``check``.

Backing chains are the library's (:func:`qcow2rw.backing.backing_chain` over the chain
``qcow2rw.open`` opened, with its loop check and depth cap); the layouts printed are
in :mod:`qcow2rw.cli.output`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import qcow2rw
from qcow2rw.backing import RawBacking, backing_chain
from qcow2rw.bitmaps import INCONSISTENT_WARNING, bitmaps_inconsistent
from qcow2rw.image import open_for_check
from qcow2rw.cli.common import (PROG, ArgumentParser, CliError, Subparsers, add_fmt,
                                add_data_file, add_force_share, add_output,
                                data_file_options, refuse_shared_write,
                                require_qcow2)
from qcow2rw.cli.output import (format_info_human, format_map_header, format_map_json,
                                format_map_row, info_json_order)


def raw_info(path: str) -> dict[str, Any]:
    """What ``qemu-img info --output=json`` prints for a raw file."""
    st = os.stat(path)
    return {"virtual-size": st.st_size, "filename": path, "format": "raw",
            "actual-size": st.st_blocks * 512, "dirty-flag": False}


def chain_infos(img: Any) -> list[dict[str, Any]]:
    """The info dicts of the open backing chain below *img* (img itself excluded).

    A layer's name is the ``full-backing-filename`` its parent reports, as in
    qemu-img's ``--backing-chain``.
    """
    return [raw_info(layer.filename) if isinstance(layer, RawBacking) else layer.info()
            for layer in backing_chain(img)]


def warn_if_bitmaps_inconsistent(img: qcow2rw.Image) -> None:
    """qemu-img's warning (stderr) when a program without bitmap support wrote the image."""
    if bitmaps_inconsistent(img.header):
        sys.stderr.write(f"{PROG}: {INCONSISTENT_WARNING}\n")


# --------------------------------------------------------------------------------------
# info


def _cmd_info(args: argparse.Namespace) -> int:
    require_qcow2(args.fmt)
    with qcow2rw.open(args.filename, readonly=True, backing=args.backing_chain,
                      force_share=args.force_share, metadata_only=True) as img:
        warn_if_bitmaps_inconsistent(img)
        infos = [img.info()] + chain_infos(img)
    if args.output == "json":
        data: Any = [info_json_order(i) for i in infos] if args.backing_chain \
            else info_json_order(infos[0])
        sys.stdout.write(json.dumps(data, indent=4) + "\n")
    else:
        sys.stdout.write("\n".join(format_info_human(i) for i in infos))
    return 0


def _add_reader(subparsers: Subparsers, verb: str, text: str,
                description: str) -> ArgumentParser:
    """A parser for a read-only verb: ``-f FMT``, ``--output=human|json`` and ``-U``."""
    p = subparsers.add_parser(verb, help=text, description=description)
    add_fmt(p)
    add_output(p)
    add_force_share(p)
    return p


def add_info(subparsers: Subparsers) -> None:
    """``info [-f FMT] [--output=human|json] [-U] [--backing-chain] FILENAME``."""
    p = _add_reader(subparsers, "info", "show an image's header, backing file and format details",
                    "Like 'qemu-img info': the image's size, cluster size, backing file and "
                    "format-specific details.")
    p.add_argument("--backing-chain", action="store_true",
                   help="show every image of the backing chain")
    p.add_argument("filename")
    p.set_defaults(func=_cmd_info)


# --------------------------------------------------------------------------------------
# map


def _cmd_map(args: argparse.Namespace) -> int:
    require_qcow2(args.fmt)
    with qcow2rw.open(args.filename, readonly=True, force_share=args.force_share,
                      metadata_only=True, **data_file_options(args)) as img:
        extents = img.map()
        deep = args.output == "human" and any(e["depth"] > 0 for e in extents)
        # File names of the layers, as qemu-img's map prints them (the data file's
        # where the data lives in one).
        top = args.filename
        if img.state.external:
            top = args.data_file or img.header.data_file or top
        names = [top] + ([i["filename"] for i in chain_infos(img)] if deep else [])
    out = sys.stdout
    if args.output == "json":
        out.write(format_map_json(extents))
        return 0
    out.write(format_map_header())
    for e in extents:
        if e["data"] and e.get("offset") is None:
            out.flush()
            raise CliError("File contains external, encrypted or compressed clusters.")
        if e["data"] and not e["zero"]:
            out.write(format_map_row(e, names[e["depth"]] if e["depth"] < len(names) else ""))
    return 0


def add_map(subparsers: Subparsers) -> None:
    """``map [-f FMT] [--output=human|json] [-U] FILENAME``."""
    p = _add_reader(subparsers, "map", "show where each range of the image's data lives",
                    "Like 'qemu-img map': the allocation state of every range of the guest "
                    "disk, and where its data lives in the chain.")
    add_data_file(p)
    p.add_argument("filename")
    p.set_defaults(func=_cmd_map)


# --------------------------------------------------------------------------------------
# check


def _cmd_check(args: argparse.Namespace) -> int:
    """``qemu-img check``: figures on stdout, per-cluster messages on stderr, its exit codes
    (0 clean or repaired, 1 check not completed, 2 corruptions, 3 leaks only, 63 no checks
    for this format)."""
    if args.fmt == "raw":
        sys.stderr.write(f"{PROG}: This image format does not support checks\n")
        return 63
    require_qcow2(args.fmt)
    if args.repair is not None and args.force_share:
        refuse_shared_write(args)
    img = open_for_check(args.filename, repair=args.repair is not None,
                         force_share=args.force_share)
    try:
        warn_if_bitmaps_inconsistent(img)
        result = img.check(args.repair)
    finally:
        img.close()
    result.filename = args.filename
    for line in result.messages:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()
    if args.output == "json":
        if result.error is None:
            sys.stdout.write(json.dumps(result.to_json(), indent=4) + "\n")
    else:
        sys.stdout.write(result.human())
    sys.stdout.flush()
    failure = result.failure_message()
    if failure is not None:
        sys.stderr.write(f"{PROG}: {failure}\n")
    return result.exit_code


def add_check(subparsers: Subparsers) -> None:
    """``check [-f FMT] [--output=human|json] [-r leaks|all] [-U] FILENAME``."""
    p = subparsers.add_parser(
        "check", help="check an image for consistency and optionally repair it",
        description="Like 'qemu-img check': compare the refcounts with the references from "
                    "every table, check OFLAG_COPIED and the snapshot table, and report "
                    "corruptions, leaks and the allocation figures. Exit status: 0 clean "
                    "(or repaired), 1 check not completed, 2 corruptions, 3 leaks only.")
    add_fmt(p)
    add_output(p)
    p.add_argument("-r", dest="repair", choices=("leaks", "all"), metavar="leaks|all",
                   help="repair leaks, or leaks and corruptions (rebuilding the refcount "
                        "structures if needed); the image is checked again afterwards")
    add_force_share(p, " (not with -r)")
    p.add_argument("filename")
    p.set_defaults(func=_cmd_check)
