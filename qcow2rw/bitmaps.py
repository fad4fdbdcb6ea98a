"""Persistent dirty bitmaps: read the bitmap directory for ``info``.

qcow2rw does not maintain bitmaps: a read-write open clears the autoclear
"bitmaps" bit, which tells QEMU that the bitmaps no longer match the data (the
protocol the spec defines for programs without bitmap support).  The layouts (the
extension, the directory) are in :mod:`qcow2rw.format`.
"""

from __future__ import annotations

from typing import Any

from .errors import FormatError
from .format import (BITMAP_FLAG_AUTO, BITMAP_FLAG_IN_USE, MAX_BITMAP_DIRECTORY_SIZE, Header,
                     bitmaps_extension, parse_bitmap_directory)
from .storage import HostFile


def bitmap_info(file: HostFile, header: Header) -> list[dict[str, Any]]:
    """The bitmaps as ``qemu-img info`` lists them (empty when none or inconsistent)."""
    ext = bitmaps_extension(header)
    if ext is None:
        return []
    if ext.directory_size > MAX_BITMAP_DIRECTORY_SIZE:
        raise FormatError("Bitmap directory is too large")
    buf = file.pread(ext.directory_offset, ext.directory_size)
    out: list[dict[str, Any]] = []
    for entry in parse_bitmap_directory(buf, ext.count):
        names = [n for bit, n in ((BITMAP_FLAG_IN_USE, "in-use"), (BITMAP_FLAG_AUTO, "auto"))
                 if entry.flags & bit]
        out.append({"flags": names, "name": entry.name, "granularity": 1 << entry.granularity_bits})
    return out
