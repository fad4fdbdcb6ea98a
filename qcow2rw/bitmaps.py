"""Persistent dirty bitmaps: read the bitmap directory for ``info``.

qcow2rw does not maintain bitmaps: right before the first write of a read-write open
it clears the autoclear "bitmaps" bit, which tells QEMU that the bitmaps no longer
match the data (the protocol the spec defines for programs without bitmap support);
an open that writes nothing leaves them valid.  The layouts (the extension, the
directory) are in :mod:`qcow2rw.format`.
"""

from __future__ import annotations

from typing import Any

from .errors import FormatError
from .format import (AUTOCLEAR_BITMAPS, BITMAP_FLAG_AUTO, BITMAP_FLAG_IN_USE, MAX_BITMAP_DIRECTORY_SIZE, Header,
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


#: What qemu-img says about an image whose bitmaps a program without bitmap support made
#: stale (it ignores them, and their clusters show as leaks until ``check -r``).
INCONSISTENT_WARNING = ("warning: a program lacking bitmap support modified this file, so all "
                        "bitmaps are now considered inconsistent\nSome clusters may be leaked, "
                        "run 'qemu-img check -r' on the image file to fix.")


def bitmaps_inconsistent(header: Header) -> bool:
    """The image has a bitmaps extension but its autoclear bit is clear."""
    return (header.version >= 3 and bitmaps_extension(header, consistent=False) is not None
            and not header.autoclear_features & AUTOCLEAR_BITMAPS)
