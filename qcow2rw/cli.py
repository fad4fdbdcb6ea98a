"""The ``qcow2rw`` command line, in qemu-img's language.

``qcow2rw VERB [options]`` with qemu-img's option names where the meaning is the same
(``-f``, ``-b``/``-F``, ``-o key=value,...``, ``--output=human|json``, ``-U``), and output
laid out as qemu-img 7.2 lays it out, so that scripts written for qemu-img read ours.

Adding a verb: write ``_add_VERB(subparsers)`` that registers its parser and sets
``func`` to a ``(argparse.Namespace) -> int`` handler, and append it to ``COMMANDS``.
Verbs that take negative sizes (``resize img -1M``) must pop the size from argv before
argparse sees it, as qemu-img does (argparse reads ``-1M`` as an option).

Errors are one line on stderr, ``qcow2rw: <message>``, and exit status 1 (argparse's
usage errors included); a traceback is printed only when ``QCOW2RW_DEBUG`` is set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

from qcow2rw.errors import Qcow2Error

PROG = "qcow2rw"
INT64_MAX = (1 << 63) - 1
MAX_CHAIN_DEPTH = 256  # our own walk of a backing chain stops here (the library caps it lower)
QCOW2_MAGIC = b"QFI\xfb"

Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """A problem with the command's arguments found after parsing (one line, exit 1)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with qemu-img-like errors: one line on stderr and exit status 1."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --out must not mean --output
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print ``qcow2rw: [VERB: ]message`` and exit 1 (argparse would print usage, exit 2)."""
        verb = self.prog[len(PROG):].strip() if self.prog.startswith(PROG) else self.prog
        prefix = f"{PROG}: {verb}: " if verb else f"{PROG}: "
        sys.stderr.write(prefix + _one_line(message) + "\n")
        sys.exit(1)


# --------------------------------------------------------------------------------------
# Sizes and option lists, as QEMU parses and prints them


_SIZE_RE = re.compile(r"\s*\+?(0[xX][0-9a-fA-F]+|[0-9]+)(\.[0-9]*)?([bBkKmMgGtTpPeE]?)\Z")
_SUFFIX_SHIFT = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def parse_size(text: str, what: str = "image size") -> int:
    """Parse a size as qemu-img 7.2 does (``qemu_strtosz``).

    A plain number is bytes (decimal, or hex with ``0x``); the suffixes ``b``, ``k``,
    ``M``, ``G``, ``T``, ``P``, ``E`` (any case) are powers of 1024; a decimal fraction is
    allowed with a suffix other than ``b`` (``1.5M``) and the result is truncated.
    Raises :class:`CliError` for anything else or for a result above ``INT64_MAX``.
    """
    m = _SIZE_RE.match(text)
    if m is None:
        raise CliError(f"Invalid {what} specified '{text}'. You may use k, M, G, T, P or E "
                       "suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes "
                       "and exabytes.")
    digits, fraction_text, suffix = m.groups()
    hexadecimal = digits[:2].lower() == "0x"
    value = int(digits, 16) if hexadecimal else int(digits, 10)
    fraction = float("0" + fraction_text) if fraction_text else 0.0
    multiplier = 1 << _SUFFIX_SHIFT[suffix.lower()]
    if (fraction_text and hexadecimal) or (fraction and multiplier == 1):
        raise CliError(f"Invalid {what} specified '{text}': a fraction needs a k, M, G, T, "
                       "P or E suffix")
    result = value * multiplier + int(fraction * multiplier)
    if result > INT64_MAX:
        raise CliError(f"Invalid {what} specified. Must be between 0 and {INT64_MAX}.")
    return result


def size_to_str(value: int) -> str:
    """Format a byte count as QEMU's ``size_to_str`` does: ``64 MiB``, ``456 KiB``, ``2.19 MiB``."""
    suffixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    _, exponent = math.frexp(value / (1000.0 / 1024.0))
    index = min(max(0, (exponent - 1) // 10), len(suffixes) - 1)
    return "%0.3g %sB" % (value / (1 << (index * 10)), suffixes[index])


def parse_option_list(text: str) -> list[tuple[str, str | None]]:
    """Split QEMU's ``key=value,key=value`` list; ``,,`` is a literal comma.

    Returns ``(key, value)`` pairs in order; ``value`` is None for a bare word
    (``help``).  Empty items (a trailing comma) are skipped.
    """
    items: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == ",":
            if text.startswith(",,", i):
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    items.append("".join(current))
    pairs: list[tuple[str, str | None]] = []
    for item in items:
        if not item:
            continue
        key, sep, value = item.partition("=")
        pairs.append((key, value if sep else None))
    return pairs


def parse_bool(key: str, value: str) -> bool:
    """Parse a QEMU boolean option value (``on``/``off``, ``yes``/``no``, ``true``/``false``)."""
    lowered = value.lower()
    if lowered in ("on", "yes", "true", "y"):
        return True
    if lowered in ("off", "no", "false", "n"):
        return False
    raise CliError(f"Parameter '{key}' expects 'on' or 'off'")


def parse_number(key: str, value: str) -> int:
    """Parse a QEMU number option value (decimal, or hex with ``0x``)."""
    try:
        return int(value, 16) if value.lower().startswith("0x") else int(value, 10)
    except ValueError:
        raise CliError(f"Parameter '{key}' expects a number") from None


def path_combine(base: str, name: str) -> str:
    """Resolve a backing file name against the image that names it, as QEMU does.

    An absolute name is kept; a relative one is taken relative to the directory part
    of *base* exactly as written (``sub/s.qcow2`` + ``../a.qcow2`` = ``sub/../a.qcow2``).
    """
    if os.path.isabs(name) or "/" not in base:
        return name
    return base[: base.rindex("/") + 1] + name


def _one_line(message: str) -> str:
    """Fold a possibly multi-line message into one line."""
    parts = [part.strip() for part in message.splitlines() if part.strip()]
    return "; ".join(parts) if parts else message.strip()


# --------------------------------------------------------------------------------------
# Opening images and walking backing chains


def _open(path: str, **kwargs: Any) -> Any:
    """``qcow2rw.open`` (imported late so that ``--help`` works without the core)."""
    import qcow2rw

    return qcow2rw.open(path, **kwargs)


def _probe_format(path: str) -> str:
    """``qcow2`` when *path* starts with the qcow2 magic, else ``raw`` (for chain walks only)."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"


def _raw_info(path: str) -> dict[str, Any]:
    """What ``qemu-img info --output=json`` prints for a raw file."""
    st = os.stat(path)
    return {"virtual-size": st.st_size, "filename": path, "format": "raw",
            "actual-size": st.st_blocks * 512, "dirty-flag": False}


def _backing_infos(top: dict[str, Any]) -> list[dict[str, Any]]:
    """The info dicts of the backing chain below *top* (top itself excluded).

    Each layer is opened on its own (no backing, read-only, shared); its name is the
    ``full-backing-filename`` its parent reported, as in qemu-img's ``--backing-chain``.
    """
    infos: list[dict[str, Any]] = []
    current = top
    seen: set[str] = {os.path.realpath(top["filename"])}
    while "backing-filename" in current:
        name = current.get("full-backing-filename") or path_combine(
            current["filename"], current["backing-filename"])
        real = os.path.realpath(name)
        if real in seen or len(infos) >= MAX_CHAIN_DEPTH:
            raise CliError(f"{name}: backing chain loops or is deeper than {MAX_CHAIN_DEPTH}")
        seen.add(real)
        fmt = current.get("backing-filename-format") or _probe_format(name)
        if fmt == "raw":
            infos.append(_raw_info(name))
            break
        with _open(name, readonly=True, backing=False, force_share=True) as layer:
            current = layer.info()
        infos.append(current)
    return infos


# --------------------------------------------------------------------------------------
# info


_INFO_KEY_ORDER = ("snapshots", "backing-filename-format", "virtual-size", "filename",
                   "cluster-size", "format", "actual-size", "format-specific",
                   "full-backing-filename", "backing-filename", "encrypted", "dirty-flag")
_SNAPSHOT_KEY_ORDER = ("icount", "vm-clock-nsec", "name", "date-sec", "date-nsec",
                       "vm-clock-sec", "id", "vm-state-size")
_QCOW2_DATA_KEY_ORDER = ("compat", "compression-type", "lazy-refcounts", "bitmaps",
                         "refcount-bits", "encrypt", "data-file", "data-file-raw", "corrupt",
                         "extended-l2")


def _ordered(d: dict[str, Any], order: Iterable[str]) -> dict[str, Any]:
    """*d* with the keys of *order* first, in that order, then any others as they came."""
    out = {key: d[key] for key in order if key in d}
    out.update((key, value) for key, value in d.items() if key not in out)
    return out


def info_json_order(info: dict[str, Any]) -> dict[str, Any]:
    """Reorder an info dict the way qemu-img 7.2 prints it (for readers comparing by eye)."""
    out = _ordered(info, _INFO_KEY_ORDER)
    if "snapshots" in out:
        out["snapshots"] = [_ordered(s, _SNAPSHOT_KEY_ORDER) for s in out["snapshots"]]
    spec = out.get("format-specific")
    if isinstance(spec, dict) and isinstance(spec.get("data"), dict):
        out["format-specific"] = {**spec, "data": _ordered(spec["data"], _QCOW2_DATA_KEY_ORDER)}
    return out


def _dump_value(lines: list[str], indent: int, key: str, value: Any) -> None:
    """One entry of QEMU's ``dump_qdict``/``dump_qlist`` (block/qapi.c)."""
    pad = " " * (indent * 4)
    if isinstance(value, dict):
        lines.append(f"{pad}{key}:")
        for k, v in value.items():
            _dump_value(lines, indent + 1, k.replace("-", " "), v)
    elif isinstance(value, list):
        lines.append(f"{pad}{key}:")
        for i, v in enumerate(value):
            _dump_value(lines, indent + 1, f"[{i}]", v)
    elif isinstance(value, bool):
        lines.append(f"{pad}{key}: {'true' if value else 'false'}")
    else:
        lines.append(f"{pad}{key}: {value}")


def format_snapshot_table(snapshots: Sequence[dict[str, Any]]) -> list[str]:
    """The ``Snapshot list:`` block as qemu-img prints it (header plus one row each)."""
    lines = ["Snapshot list:",
             "%-10s%-17s%8s%20s%13s%11s" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")]
    for snap in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.get("date-sec", 0)))
        clock_ns = snap.get("vm-clock-sec", 0) * 1_000_000_000 + snap.get("vm-clock-nsec", 0)
        secs = clock_ns // 1_000_000_000
        clock = "%02d:%02d:%02d.%03d" % (secs // 3600, (secs // 60) % 60, secs % 60,
                                         (clock_ns // 1_000_000) % 1000)
        icount = str(snap["icount"]) if snap.get("icount", -1) != -1 else ""
        lines.append("%-9s %-16s %8s%20s%13s%11s" % (
            snap.get("id", ""), snap.get("name", ""), size_to_str(snap.get("vm-state-size", 0)),
            date, clock, icount))
    return lines


def format_info_human(info: dict[str, Any]) -> str:
    """``qemu-img info`` human output for one image (``bdrv_image_info_dump``)."""
    actual = info.get("actual-size")
    disk_size = size_to_str(actual) if actual is not None and actual >= 0 else "unavailable"
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {disk_size}",
    ]
    if info.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines += format_snapshot_table(info["snapshots"])
    spec = info.get("format-specific")
    if isinstance(spec, dict) and "data" in spec:
        lines.append("Format specific information:")
        for key, value in _ordered(spec["data"], _QCOW2_DATA_KEY_ORDER).items():
            _dump_value(lines, 1, key.replace("-", " "), value)
    return "\n".join(lines) + "\n"


def _cmd_info(args: argparse.Namespace) -> int:
    _require_qcow2(args.fmt)
    with _open(args.filename, readonly=True, backing=args.backing_chain,
               force_share=args.force_share) as img:
        top = img.info()
    infos = [top] + (_backing_infos(top) if args.backing_chain else [])
    if args.output == "json":
        data: Any = [info_json_order(i) for i in infos] if args.backing_chain \
            else info_json_order(top)
        sys.stdout.write(json.dumps(data, indent=4) + "\n")
    else:
        sys.stdout.write("\n".join(format_info_human(i) for i in infos))
    return 0


def _add_info(subparsers: argparse._SubParsersAction[ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "info", help="show an image's header, backing file and format details",
        description="Like 'qemu-img info': the image's size, cluster size, backing file "
                    "and format-specific details.")
    _add_fmt(p)
    _add_output(p)
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open even if another process holds the image for writing")
    p.add_argument("--backing-chain", action="store_true",
                   help="show every image of the backing chain")
    p.add_argument("filename")
    p.set_defaults(func=_cmd_info)


# --------------------------------------------------------------------------------------
# map


_MAP_KEYS = ("start", "length", "depth", "present", "zero", "data")
_MAP_EMPTY = {"start": 0, "length": 0, "depth": 0, "present": False, "zero": False,
              "data": False}


def format_map_entry_json(extent: dict[str, Any]) -> str:
    """One extent in qemu-img's JSON map layout: ``{ "start": 0, ..., "offset": 327680}``."""
    fields = [(key, extent[key]) for key in _MAP_KEYS]
    if extent.get("offset") is not None:
        fields.append(("offset", extent["offset"]))
    fields += [(k, v) for k, v in extent.items() if k not in _MAP_KEYS and k != "offset"]
    return "{ " + ", ".join(f'"{k}": {json.dumps(v)}' for k, v in fields) + "}"


def format_map_json(extents: Sequence[dict[str, Any]]) -> str:
    """The whole JSON map, one object per line, as qemu-img prints it."""
    entries = list(extents) or [_MAP_EMPTY]  # qemu-img prints this for a 0-byte image
    return "[" + ",\n".join(format_map_entry_json(e) for e in entries) + "]\n"


def _c_hex(value: int) -> str:
    """C's ``%#x``: ``0`` for zero (Python's ``%#x`` gives ``0x0``)."""
    return "%#x" % value if value else "0"


def _chain_names(path: str, top: dict[str, Any], depth: int) -> list[str]:
    """File names of layers 0..depth of the chain, as qemu-img's map prints them."""
    names = [path]
    if depth > 0:
        names += [info["filename"] for info in _backing_infos(top)]
    return names


def _cmd_map(args: argparse.Namespace) -> int:
    _require_qcow2(args.fmt)
    with _open(args.filename, readonly=True, force_share=args.force_share) as img:
        extents = img.map()
        top = img.info() if args.output == "human" else {}
    out = sys.stdout
    if args.output == "json":
        out.write(format_map_json(extents))
        return 0
    names = _chain_names(args.filename, top, max((e["depth"] for e in extents), default=0))
    out.write("%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File"))
    for e in extents:
        if e["data"] and e.get("offset") is None:
            out.flush()
            raise CliError("File contains external, encrypted or compressed clusters.")
        if e["data"] and not e["zero"]:
            name = names[e["depth"]] if e["depth"] < len(names) else ""
            out.write("%-16s%-16s%-16s%s\n" % (_c_hex(e["start"]), _c_hex(e["length"]),
                                             _c_hex(e["offset"]), name))
    return 0


def _add_map(subparsers: argparse._SubParsersAction[ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "map", help="show where each range of the image's data lives",
        description="Like 'qemu-img map': the allocation state of every range of the "
                    "guest disk, and where its data lives in the chain.")
    _add_fmt(p)
    _add_output(p)
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open even if another process holds the image for writing")
    p.add_argument("filename")
    p.set_defaults(func=_cmd_map)


# --------------------------------------------------------------------------------------
# check


def _cmd_check(args: argparse.Namespace) -> int:
    """``qemu-img check``: figures on stdout, per-cluster messages on stderr, its exit codes
    (0 clean or repaired, 1 check not completed, 2 corruptions, 3 leaks only, 63 no checks
    for this format)."""
    from qcow2rw.check import open_for_check

    if args.fmt == "raw":
        sys.stderr.write(f"{PROG}: This image format does not support checks\n")
        return 63
    _require_qcow2(args.fmt)
    if args.repair is not None and args.force_share:
        raise CliError(f"Could not open '{args.filename}': force-share=on can only be used "
                       "with read-only images")
    img = open_for_check(args.filename, repair=args.repair is not None,
                         force_share=args.force_share)
    try:
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


def _add_check(subparsers: argparse._SubParsersAction[ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "check", help="check an image for consistency and optionally repair it",
        description="Like 'qemu-img check': compare the refcounts with the references from "
                    "every table, check OFLAG_COPIED and the snapshot table, and report "
                    "corruptions, leaks and the allocation figures. Exit status: 0 clean "
                    "(or repaired), 1 check not completed, 2 corruptions, 3 leaks only.")
    _add_fmt(p)
    _add_output(p)
    p.add_argument("-r", dest="repair", choices=("leaks", "all"), metavar="leaks|all",
                   help="repair leaks, or leaks and corruptions (rebuilding the refcount "
                        "structures if needed); the image is checked again afterwards")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open even if another process holds the image for writing "
                        "(not with -r)")
    p.add_argument("filename")
    p.set_defaults(func=_cmd_check)


# --------------------------------------------------------------------------------------
# create


_CREATE_KEYS = ("size", "compat", "backing_file", "backing_fmt", "cluster_size", "extended_l2",
                "preallocation", "lazy_refcounts", "refcount_bits", "compression_type")
_UNSUPPORTED_CREATE_KEYS = ("data_file", "data_file_raw", "encryption", "nocow",
                            "extent_size_hint")
_CREATE_HELP = """\
Supported options:
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image (qcow2 or raw)
  cluster_size=<size>    - qcow2 cluster size (512 to 2M, a power of two)
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  compression_type=<str> - Compression method (zlib)
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
        with _open(path, readonly=True, force_share=True) as img:
            return int(img.size)
    except OSError as exc:
        raise CliError(f"{filename}: Could not open backing image '{path}': "
                       f"{exc.strerror or exc}") from None
    except Qcow2Error as exc:
        raise CliError(f"{filename}: Could not open backing image '{path}': "
                       f"{_one_line(str(exc))}") from None


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
    if parse_bool("extended_l2", opts.get("extended_l2", "off")):
        raise CliError(f"{filename}: extended L2 entries (extended_l2=on) are not supported")
    if opts.get("compression_type", "zlib") != "zlib":
        raise CliError(f"{filename}: compression_type={opts['compression_type']} is not "
                       "supported for new images (zlib only)")
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
        parts += [f"lazy_refcounts={opts.get('lazy_refcounts', 'off')}",
                  f"refcount_bits={opts.get('refcount_bits', '16')}"]
        sys.stdout.write(f"Formatting '{filename}', fmt=qcow2 {' '.join(parts)}\n")
        sys.stdout.flush()

    import qcow2rw

    compat = opts.get("compat", "1.1")
    img = qcow2rw.create(filename, size, cluster_size=cluster_size, backing_file=backing,
                         backing_format=backing_fmt if backing is not None else None,
                         lazy_refcounts=lazy_refcounts, refcount_bits=refcount_bits,
                         compat=_COMPAT.get(compat, compat),
                         preallocation=opts.get("preallocation", "off"))
    img.close()
    return 0


def _add_create(subparsers: argparse._SubParsersAction[ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "create", help="create a new qcow2 image",
        description="Like 'qemu-img create': create FILENAME of SIZE bytes (k, M, G, T "
                    "suffixes are powers of 1024; with a backing file SIZE defaults to the "
                    "backing file's size). '-o help' lists the options.")
    _add_fmt(p)
    p.add_argument("-b", dest="backing_file", metavar="BACKING_FILE",
                   help="backing file (relative names are relative to FILENAME's directory)")
    p.add_argument("-F", dest="backing_fmt", metavar="BACKING_FMT",
                   help="format of the backing file: qcow2 or raw")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="comma-separated key=value options (repeatable): cluster_size, "
                        "backing_file, backing_fmt, lazy_refcounts, refcount_bits, compat, "
                        "preallocation, size")
    p.add_argument("-u", dest="unsafe", action="store_true",
                   help="do not open the backing file (SIZE is then required)")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet: no 'Formatting' line")
    p.add_argument("filename", nargs="?")  # optional only for '-o help'
    p.add_argument("size", nargs="?")
    p.set_defaults(func=_cmd_create)


# --------------------------------------------------------------------------------------
# snapshot, resize and amend (they take the image exclusively)


def _cmd_snapshot(args: argparse.Namespace) -> int:
    """``qemu-img snapshot``: one of -l, -c, -a, -d (none: nothing to do, as qemu-img)."""
    actions = [(flag, value) for flag, value in (("l", args.list), ("c", args.create),
                                                  ("a", args.apply), ("d", args.delete))
               if value not in (None, False)]
    if len(actions) > 1:
        raise CliError("Cannot mix '-l', '-a', '-c', '-d'")
    if not actions:
        return 0
    action, name = actions[0]
    if action != "l" and args.force_share:
        raise CliError(f"Could not open '{args.filename}': force-share=on can only be used "
                       "with read-only images")
    img = _open(args.filename, readonly=action == "l", force_share=args.force_share)
    try:
        if action == "l":
            snapshots = [snap.info() for snap in img.snapshots()]
            if snapshots:
                sys.stdout.write("\n".join(format_snapshot_table(snapshots)) + "\n")
            return 0
        verb = {"c": "create", "a": "apply", "d": "delete"}[action]
        try:
            if action == "c":
                img.create_snapshot(name)
            elif action == "a":
                img.apply_snapshot(name)
            else:
                img.delete_snapshot(name)
        except Qcow2Error as exc:
            raise CliError(f"Could not {verb} snapshot '{name}': {_one_line(str(exc))}") from None
    finally:
        img.close()
    return 0


def _add_snapshot(subparsers: argparse._SubParsersAction[ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "snapshot", help="list, create, apply or delete internal snapshots",
        description="Like 'qemu-img snapshot': -l lists the internal snapshots in "
                    "qemu-img's table layout (see 'info --output=json' for JSON), -c "
                    "creates one, -a reverts the image to one, -d deletes one.  A snapshot "
                    "is named by its ID or its tag (the ID is tried first).  The image is "
                    "taken exclusively; creating a second snapshot with a tag already in "
                    "use is refused.")
    p.add_argument("-l", dest="list", action="store_true", help="list the snapshots")
    p.add_argument("-c", dest="create", metavar="SNAPSHOT", help="create a snapshot")
    p.add_argument("-a", dest="apply", metavar="SNAPSHOT", help="apply (revert to) a snapshot")
    p.add_argument("-d", dest="delete", metavar="SNAPSHOT", help="delete a snapshot")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open even if another process holds the image for writing (-l only)")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet (accepted for "
                                                                  "qemu-img compatibility)")
    p.add_argument("filename")
    p.set_defaults(func=_cmd_snapshot)


_SIZE_ARGUMENT = re.compile(r"[+-][0-9.]")


def fix_resize_argv(argv: list[str]) -> list[str]:
    """Let ``resize IMG -1G`` through argparse: a relative size is not an option."""
    if argv[:1] == ["resize"] and "--" not in argv and _SIZE_ARGUMENT.match(argv[-1]):
        return argv[:-1] + ["--", argv[-1]]
    return argv


def _cmd_resize(args: argparse.Namespace) -> int:
    """``qemu-img resize [--shrink] [--preallocation=MODE] IMG [+|-]SIZE``."""
    _require_qcow2(args.fmt)
    text = args.size
    relative = text[0] if text[:1] in ("+", "-") else ""
    amount = parse_size(text[1:] if relative else text, "size")
    img = _open(args.filename)
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


def _add_resize(subparsers: argparse._SubParsersAction[ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "resize", help="grow or shrink an image's virtual size",
        description="Like 'qemu-img resize': set the virtual size to SIZE, or change it by "
                    "+SIZE / -SIZE.  Shrinking needs --shrink and drops the data past the "
                    "new end (internal snapshots keep theirs).  The area a grow adds reads "
                    "as zeros, also over a longer backing file.")
    _add_fmt(p)
    p.add_argument("--shrink", action="store_true", help="allow the size to decrease")
    p.add_argument("--preallocation", default="off", metavar="MODE",
                   choices=("off", "metadata", "falloc", "full"),
                   help="preallocate the area a grow adds: off, metadata, falloc or full")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet: no 'Image resized.'")
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
    _require_qcow2(args.fmt)
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
    img = _open(args.filename)
    try:
        img.amend(compat=_COMPAT[compat] if compat is not None else None,
                  lazy_refcounts=lazy, refcount_bits=bits)
        if size is not None and size != img.size:
            img.resize(size, shrink=True)  # amend shrinks without --shrink, as qemu-img
    finally:
        img.close()
    return 0


def _add_amend(subparsers: argparse._SubParsersAction[ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "amend", help="change an image's format options in place",
        description="Like 'qemu-img amend': change compat (0.10 expands zero clusters), "
                    "lazy_refcounts, refcount_bits (the refcount structures are rebuilt "
                    "with the new width) and size.  '-o help' lists the options.")
    _add_fmt(p)
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="comma-separated key=value options (repeatable)")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet (accepted for "
                                                                  "qemu-img compatibility)")
    p.add_argument("filename", nargs="?")  # optional only for '-o help'
    p.set_defaults(func=_cmd_amend)


# --------------------------------------------------------------------------------------
# demo


def _cmd_demo(args: argparse.Namespace) -> int:
    from qcow2rw import demo

    return demo.run(demo.DemoOptions(directory=args.dir, size=parse_size(args.size),
                                     keep=args.keep, workers=args.workers, seed=args.seed))


def _add_demo(subparsers: argparse._SubParsersAction[ArgumentParser]) -> None:
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


# --------------------------------------------------------------------------------------
# stress and bench (engines in qcow2rw.stress and qcow2rw.bench)


def _cmd_stress(args: argparse.Namespace) -> int:
    from qcow2rw import stress

    if args.workers < 1 or args.rounds < 1:
        raise CliError("--workers and --rounds must be at least 1")
    try:
        return stress.run_cli(args)
    except ValueError as exc:  # an impossible layout (image too small for the workers)
        raise CliError(str(exc)) from None


def _add_stress(subparsers: argparse._SubParsersAction[ArgumentParser]) -> None:
    from qcow2rw import stress

    p = subparsers.add_parser(
        "stress", help="hammer an image from many threads and check every byte",
        description="N threads read, write, discard, zero and flush one image at once "
                    "(shared and per-thread regions, unaligned requests); every sector "
                    "written is stamped, and a linearizability oracle checks every read "
                    "and the final content.  After each round: close, 'qemu-img check' "
                    "(clean, no leaks), 'qemu-img compare' with a raw copy of what was read, "
                    "reopen and verify.  Exit status 1 on any failure, with the seed.")
    stress.add_arguments(p)
    p.set_defaults(func=_cmd_stress)


def _cmd_bench(args: argparse.Namespace) -> int:
    from qcow2rw import bench

    try:
        bench.run(bench.options_from_args(args))
    except bench.BenchError as exc:
        raise CliError(str(exc)) from None
    return 0


def _add_bench(subparsers: argparse._SubParsersAction[ArgumentParser]) -> None:
    from qcow2rw import bench

    p = subparsers.add_parser(
        "bench", help="like 'qemu-img bench': sequential requests with a queue depth",
        description="Like 'qemu-img bench': COUNT sequential read (or -w write) requests "
                    "of BUFFER_SIZE bytes, DEPTH in flight on a qcow2rw.AioImage, and the "
                    "time they took.  -t none is accepted but still uses the page cache.")
    bench.add_arguments(p)
    p.set_defaults(func=_cmd_bench)


# --------------------------------------------------------------------------------------
# Parser and entry point


def _add_fmt(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", dest="fmt", default="qcow2", metavar="FMT",
                   help="image format (only qcow2)")


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="output format (default human)")


def _require_qcow2(fmt: str) -> None:
    if fmt != "qcow2":
        raise CliError(f"Unknown file format '{fmt}' (qcow2rw reads qcow2 images only)")


COMMANDS: tuple[Callable[[argparse._SubParsersAction[ArgumentParser]], None], ...] = (
    _add_create, _add_info, _add_map, _add_check, _add_snapshot, _add_resize, _add_amend,
    _add_demo, _add_stress, _add_bench,
)


def build_parser() -> ArgumentParser:
    """The top-level parser with one subparser per entry of ``COMMANDS``."""
    parser = ArgumentParser(prog=PROG,
                            description="A pure-Python driver for QEMU's qcow2 images, "
                                        "with qemu-img's verbs and options.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def _fail(message: str, code: int = 1) -> int:
    sys.stderr.write(f"{PROG}: {_one_line(message)}\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (the console script passes it to ``sys.exit``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(fix_resize_argv(list(sys.argv[1:] if argv is None else argv)))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    handler: Handler = args.func
    filename = getattr(args, "filename", None)
    try:
        return handler(args)
    except CliError as exc:
        return _fail(str(exc))
    except Qcow2Error as exc:
        message = _one_line(str(exc)) or type(exc).__name__
        if filename and filename not in message:
            message = f"{filename}: {message}"
        return _fail(message)
    except BrokenPipeError:
        # The reader went away (``qcow2rw map img | head``): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as exc:
        if exc.filename is not None and exc.strerror:
            return _fail(f"'{exc.filename}': {exc.strerror}")
        return _fail(str(exc) or type(exc).__name__)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # a bug: still one line, unless asked for the traceback
        if os.environ.get("QCOW2RW_DEBUG"):
            raise
        return _fail(f"internal error: {type(exc).__name__}: {exc} "
                     "(set QCOW2RW_DEBUG=1 for a traceback)")


if __name__ == "__main__":
    sys.exit(main())
