"""qemu-img's output layouts: ``info`` (human and JSON key order), the snapshot table, ``map``.

Pure formatting of the dicts that ``Image.info()``, ``Snapshot.info()`` and
``Image.map()`` return; no I/O.  Layouts are qemu-img 7.2's (``block/qapi.c``,
``qemu-img.c``), so that scripts written for qemu-img read ours.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

from qcow2rw.units import size_to_str

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


_MAP_KEYS = ("start", "length", "depth", "present", "zero", "data")
_MAP_ROW = "%-16s%-16s%-16s%s\n"  # qemu-img map's human layout
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


def format_map_header() -> str:
    """The first line of ``qemu-img map``'s human output."""
    return _MAP_ROW % ("Offset", "Length", "Mapped to", "File")


def format_map_row(extent: dict[str, Any], name: str) -> str:
    """One data extent of ``qemu-img map``'s human output; *name* is the file it lives in."""
    return _MAP_ROW % (_c_hex(extent["start"]), _c_hex(extent["length"]),
                       _c_hex(extent["offset"]), name)
