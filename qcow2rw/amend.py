"""``qemu-img amend`` for qcow2: compat level, lazy refcounts, refcount width.

Each change runs with the image held exclusively, flushes everything first, and
ends with the header rewritten in one write of its first sector(s).
- ``compat=0.10`` (downgrade) expands zero clusters, in the active and the snapshot
  tables, because version 2 has no zero flag; it refuses what version 2 cannot
  express (refcount widths other than 16, zstd, extended L2, external data), like
  qemu-img.
- ``compat=1.1`` (upgrade) rewrites the header as version 3.
- ``lazy_refcounts`` sets or clears the compatible bit (refcounts are written back
  and the dirty bit cleared first when turning it off).
- ``refcount_bits`` changes are refused for now (UnsupportedFeature).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import Qcow2Error, UnsupportedFeature
from .format import (COMPAT_LAZY_REFCOUNTS, COMPRESSION_ZLIB, INCOMPAT_CORRUPT, INCOMPAT_DIRTY,
                     L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED,
                     QCOW_OFLAG_ZERO, serialize_header, table_from_bytes)

if TYPE_CHECKING:
    from .image import Image

COMPAT_VERSIONS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}


def amend(img: Image, *, compat: str | None = None, lazy_refcounts: bool | None = None,
          refcount_bits: int | None = None) -> None:
    """Change the image's format options.  Caller holds: the image exclusively."""
    hdr = img.header
    version = COMPAT_VERSIONS.get(compat, None) if compat is not None else hdr.version
    if version is None:
        raise Qcow2Error(f"Invalid compatibility level: '{compat}'")
    width = refcount_bits if refcount_bits is not None else hdr.refcount_bits
    if width <= 0 or width > 64 or width & (width - 1):
        raise Qcow2Error("Refcount width must be a power of two and may not exceed 64 bits")
    lazy = hdr.lazy_refcounts if lazy_refcounts is None else lazy_refcounts
    if version == 2:
        if lazy:
            raise Qcow2Error("Lazy refcounts only supported with compatibility level 1.1 and above "
                             "(use version=v3 or greater)")
        if width != 16:
            raise Qcow2Error("Different refcount widths than 16 bits require compatibility "
                             "level 1.1 or above (use version=v3 or greater)")
        if hdr.compression_type != COMPRESSION_ZLIB or hdr.extended_l2 or hdr.data_file:
            raise UnsupportedFeature("Cannot downgrade an image with zstd compression, extended "
                                     "L2 entries or an external data file")
    if width != hdr.refcount_bits:
        raise UnsupportedFeature("changing refcount_bits is not supported yet")
    img._flush_everything()
    if version == 2 and hdr.version == 3:
        _expand_zero_clusters(img)
    hdr.version = version
    if version == 2:
        hdr.incompatible_features &= INCOMPAT_DIRTY | INCOMPAT_CORRUPT
        hdr.compatible_features = hdr.autoclear_features = 0
        hdr.incompatible_features &= ~INCOMPAT_DIRTY
    if lazy:
        hdr.compatible_features |= COMPAT_LAZY_REFCOUNTS
    else:
        hdr.compatible_features &= ~COMPAT_LAZY_REFCOUNTS
        hdr.incompatible_features &= ~INCOMPAT_DIRTY
    img.has_zero_flag = version >= 3
    data = serialize_header(hdr)
    img.file.pwrite(0, data)
    img.file.flush()


def _expand_zero_clusters(img: Image) -> None:
    """Replace zero-flagged entries for version 2, in every L2 table any L1 table reaches.

    A plain zero cluster becomes unallocated when nothing shows through (no backing
    file), else a newly allocated cluster of zeros; a zero-allocated cluster gets its
    host cluster filled with zeros and keeps it.  Data is written and synced before
    the entries change.
    """
    cs = img.cluster_size
    zeros = bytes(cs)
    l1_tables = [img.l1]
    for snap in img.snapshot_table:
        l1_tables.append(table_from_bytes(img.file.pread_exact(snap.l1_table_offset, snap.l1_size * 8)))
    seen: set[int] = set()
    for l1 in l1_tables:
        for l1_entry in l1:
            l2_offset = l1_entry & L1E_OFFSET_MASK
            if not l2_offset or l2_offset in seen:
                continue
            seen.add(l2_offset)
            entry_obj = img.l2_cache.get(l2_offset)
            try:
                table = entry_obj.table
                for i, entry in enumerate(table):
                    if entry & QCOW_OFLAG_COMPRESSED or not entry & QCOW_OFLAG_ZERO:
                        continue
                    host = entry & L2E_OFFSET_MASK
                    if host:
                        img.file.pwrite(host, zeros)
                        table[i] = entry & ~QCOW_OFLAG_ZERO
                    elif img.backing is None:
                        table[i] = 0
                    else:  # one reference per L1 table that reaches this L2 table
                        host = img.refcounts.alloc(1)
                        img.file.pwrite(host, zeros)
                        visits = img.refcounts.get(l2_offset >> img.cluster_bits)
                        if visits > 1:
                            img.refcounts.increment(host >> img.cluster_bits, visits - 1)
                        table[i] = host | (QCOW_OFLAG_COPIED if visits == 1 else 0)
                    entry_obj.dirty = True
            finally:
                img.l2_cache.put(entry_obj)
    img._flush_everything()
