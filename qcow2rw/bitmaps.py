"""Persistent dirty bitmaps: read the bitmap directory for ``info``.

qcow2rw does not maintain bitmaps: a read-write open clears the autoclear
"bitmaps" bit, which tells QEMU that the bitmaps no longer match the data (the
protocol the spec defines for programs without bitmap support).
"""

from __future__ import annotations

import struct
from typing import Any

from .errors import FormatError
from .format import AUTOCLEAR_BITMAPS, EXT_BITMAPS, Header, align_up
from .storage import HostFile

MAX_DIRECTORY_SIZE = 64 * 1024 * 1024  # QEMU's QCOW2_MAX_BITMAP_DIRECTORY_SIZE
DIR_ENTRY = struct.Struct(">QIIBBHI")  # 24 bytes
FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1


def bitmap_info(file: HostFile, header: Header) -> list[dict[str, Any]]:
    """The bitmaps as ``qemu-img info`` lists them (empty when none or inconsistent)."""
    if not header.autoclear_features & AUTOCLEAR_BITMAPS:
        return []
    ext = next((e for e in header.extensions if e.magic == EXT_BITMAPS), None)
    if ext is None or len(ext.data) < 24:
        return []
    count, _, dir_size, dir_offset = struct.unpack_from(">IIQQ", ext.data, 0)
    if dir_size > MAX_DIRECTORY_SIZE:
        raise FormatError("Bitmap directory is too large")
    buf = file.pread(dir_offset, dir_size)
    out: list[dict[str, Any]] = []
    pos = 0
    for _ in range(count):
        if pos + DIR_ENTRY.size > len(buf):
            raise FormatError("Bitmap directory runs past its end")
        _, _, flags, _, granularity_bits, name_size, extra = DIR_ENTRY.unpack_from(buf, pos)
        start = pos + DIR_ENTRY.size + extra
        name = buf[start:start + name_size].decode("utf-8", "replace")
        pos = align_up(start + name_size, 8)
        names = [n for bit, n in ((FLAG_IN_USE, "in-use"), (FLAG_AUTO, "auto")) if flags & bit]
        out.append({"flags": names, "name": name, "granularity": 1 << granularity_bits})
    return out
