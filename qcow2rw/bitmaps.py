"""Persistent dirty bitmaps: the bitmap directory for ``info``, and keeping them valid.

A read-write open keeps the enabled bitmaps up to date (:class:`MaintainedBitmaps`),
as QEMU does: the granules of every write are set, and stored at close.  Bitmaps it
cannot keep (an unknown type or flag, extra data) make it fall back to the protocol
the spec defines for programs without bitmap support: right before the first write
the autoclear "bitmaps" bit is cleared, which tells QEMU that the bitmaps no longer
match the data; an open that writes nothing leaves them valid either way.  The
layouts (the extension, the directory) are in :mod:`qcow2rw.format`.
"""

from __future__ import annotations

import struct
import threading
from typing import Any

from .errors import FormatError
from .format import (AUTOCLEAR_BITMAPS, BITMAP_FLAG_AUTO, BITMAP_FLAG_IN_USE, BME_FLAG_ALL_ONES,
                     BME_OFFSET_MASK, MAX_BITMAP_DIRECTORY_SIZE, BitmapDirEntry, Header,
                     bitmaps_extension, parse_bitmap_directory, table_from_bytes, table_to_bytes)
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


#: Offset of the flags field in a bitmap directory entry.
_FLAGS_AT = 12
#: Bitmap type 1: a dirty tracking bitmap (the only type the spec defines).
_DIRTY_TRACKING = 1
#: Flags qcow2rw understands (in use, auto; "extra data compatible" only without extra data).
_KNOWN_FLAGS = BITMAP_FLAG_IN_USE | BITMAP_FLAG_AUTO


class _Tracked:
    """One enabled bitmap being kept up to date: its directory entry and the bits
    set since the open (one per granule, bit *i* of byte *i*//8, low bit first)."""

    def __init__(self, entry: BitmapDirEntry, size: int) -> None:
        self.entry = entry
        self.granularity = 1 << entry.granularity_bits
        self.bits = -(-size // self.granularity)
        self.dirty = bytearray(-(-self.bits // 8))

    def mark(self, offset: int, length: int) -> None:
        first = offset // self.granularity
        last = min(self.bits, -(-(offset + length) // self.granularity))
        dirty = self.dirty
        while first < last and first % 8:
            dirty[first // 8] |= 1 << (first % 8)
            first += 1
        whole = (last - first) // 8
        if whole:
            dirty[first // 8:first // 8 + whole] = b"\xff" * whole
            first += 8 * whole
        while first < last:
            dirty[first // 8] |= 1 << (first % 8)
            first += 1


class MaintainedBitmaps:
    """The persistent bitmaps of a read-write open, kept valid as QEMU keeps them.

    Enabled ("auto") dirty-tracking bitmaps get the granules of every write,
    discard and zeroing set in memory; right before the open's first write their
    directory entries are flagged in use (synced), and :meth:`store` ORs the new
    bits into their data clusters at close, syncs, and clears the flags, so a crash
    in between leaves them "in-use" (inconsistent), never wrong.  Disabled bitmaps
    and bitmaps already in use are left as they are.  Images whose bitmaps this
    does not understand are not maintained (:meth:`load` returns None): their
    autoclear bit is cleared instead (see :mod:`qcow2rw.image`).

    ``lock`` guards the dirty bits (:meth:`mark` runs in every writing thread); the
    rest runs with the image held exclusively, or in the first-write hook.
    """

    def __init__(self, state: Any, directory_offset: int, tracked: list[_Tracked]) -> None:
        self.state = state
        self.directory_offset = directory_offset
        self.tracked = tracked
        self.lock = threading.Lock()
        self.in_use = False  # the flags are set on disk (the first write happened)

    @classmethod
    def load(cls, state: Any) -> MaintainedBitmaps | None:
        """The image's bitmaps, if qcow2rw can keep them all valid; else None."""
        hdr = state.header
        ext = bitmaps_extension(hdr)
        if ext is None or hdr.version < 3 or ext.directory_size > MAX_BITMAP_DIRECTORY_SIZE:
            return None
        try:
            directory = parse_bitmap_directory(
                state.file.pread(ext.directory_offset, ext.directory_size), ext.count)
        except FormatError:
            return None
        tracked = []
        cs = state.cluster_size
        for entry in directory:
            if entry.flags & ~_KNOWN_FLAGS or entry.bitmap_type != _DIRTY_TRACKING \
                    or entry.extra_data_size or not 9 <= entry.granularity_bits <= 31 \
                    or entry.table_offset % cs or not entry.table_offset:
                return None
            if entry.flags & BITMAP_FLAG_AUTO and not entry.flags & BITMAP_FLAG_IN_USE:
                bitmap = _Tracked(entry, hdr.size)
                if entry.table_size != -(-bitmap.bits // (cs * 8)):
                    return None
                tracked.append(bitmap)
        return cls(state, ext.directory_offset, tracked)

    def mark(self, offset: int, length: int) -> None:
        """Guest bytes [offset, offset+length) change: set their granules' bits."""
        if self.tracked and length > 0:
            with self.lock:
                for bitmap in self.tracked:
                    bitmap.mark(offset, length)

    def _write_flags(self, in_use: bool) -> None:
        file = self.state.file
        for bitmap in self.tracked:
            flags = bitmap.entry.flags | BITMAP_FLAG_IN_USE if in_use else bitmap.entry.flags
            file.pwrite(self.directory_offset + bitmap.entry.position + _FLAGS_AT,
                        struct.pack(">I", flags))

    def begin(self) -> None:
        """Flag the tracked bitmaps in use on disk (the caller syncs): called by the
        first-write hook, before anything else is written."""
        if self.tracked:
            self._write_flags(True)
            self.in_use = True

    def store(self) -> None:
        """OR the new bits into the bitmaps' data, then clear their in-use flags.

        Order: data clusters written and their new refcounts flushed, then the
        bitmap tables, a sync, then the flags, a sync.  Caller holds: the image
        exclusively.
        """
        if not self.in_use:
            return
        state = self.state
        file, cs = state.file, state.cluster_size
        tables = []
        for bitmap in self.tracked:
            entry = bitmap.entry
            table = table_from_bytes(file.pread_exact(entry.table_offset, entry.table_size * 8))
            changed = False
            per_cluster = cs  # bytes of bits in one data cluster
            for index in range(entry.table_size):
                chunk = bitmap.dirty[index * per_cluster:(index + 1) * per_cluster]
                if not any(chunk) or table[index] & BME_FLAG_ALL_ONES:
                    continue
                offset = table[index] & BME_OFFSET_MASK
                if offset:
                    data = bytearray(file.pread_exact(offset, cs))
                else:
                    data = bytearray(cs)
                    offset = state.refcounts.alloc(1)
                    table[index] = offset
                    changed = True
                merged = int.from_bytes(data[:len(chunk)], "little") | int.from_bytes(chunk, "little")
                data[:len(chunk)] = merged.to_bytes(len(chunk), "little")
                file.pwrite(offset, data)
            tables.append((entry.table_offset, table, changed))
        with state.alloc_lock:
            state.refcounts.flush()  # the new data clusters' refcounts first
        for table_offset, table, changed in tables:
            if changed:
                file.pwrite(table_offset, table_to_bytes(table))
        file.flush()
        self._write_flags(False)
        file.flush()
        self.in_use = False
        for bitmap in self.tracked:
            bitmap.dirty[:] = bytes(len(bitmap.dirty))
