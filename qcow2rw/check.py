"""Counting references from the tables, and rebuilding refcount structures.

The reference count of a host cluster is the number of places that point to it:
the header (cluster 0), the refcount table and blocks, the active and snapshot L1
tables, every L2 table they name (once per L1 entry naming it), every data cluster
those L2 tables name (once per L2 entry; a compressed cluster counts once on each
host cluster its data touches) and the snapshot table.  Comparing that count with
the stored refcounts is what ``qemu-img check`` does; writing fresh refcount
structures from it is how a dirty image (lazy refcounts) is repaired.
"""

from __future__ import annotations

import struct
from array import array
from typing import TYPE_CHECKING

from .errors import CorruptImage, Qcow2Error
from .format import (L1E_OFFSET_MASK, OFF_REFCOUNT_TABLE_OFFSET, QCOW_OFLAG_COMPRESSED,
                     L2E_OFFSET_MASK, QCOW_OFLAG_ZERO, compressed_host_range, div_round_up,
                     table_from_bytes, table_to_bytes)
from .refcount import RefBlock, RefcountManager

if TYPE_CHECKING:
    from .image import Image


class ReferenceCounter:
    """Per-cluster reference counts of one image (within the file; beyond it, counted apart)."""

    def __init__(self, clusters: int) -> None:
        self.counts = array("I", bytes(4 * clusters))
        self.beyond_end: dict[int, int] = {}

    def add(self, offset: int, length: int, cluster_bits: int) -> None:
        """Count one reference to every cluster that [offset, offset+length) touches."""
        if length <= 0:
            return
        first = offset >> cluster_bits
        last = (offset + length - 1) >> cluster_bits
        counts = self.counts
        for cluster in range(first, last + 1):
            if cluster < len(counts):
                counts[cluster] += 1
            else:
                self.beyond_end[cluster] = self.beyond_end.get(cluster, 0) + 1


def count_references(img: Image, *, include_refcount_structures: bool = True) -> ReferenceCounter:
    """Walk every table of *img* and count the references to each host cluster.

    Caller holds: the image exclusively (or the big lock), with metadata flushed or
    cached (L2 tables are read through the cache, so dirty ones count as they are).
    """
    hdr = img.header
    cs, cb = img.cluster_size, img.cluster_bits
    counter = ReferenceCounter(div_round_up(img.file.size(), cs))
    counter.add(0, cs, cb)
    _count_l1(img, counter, img.l1, hdr.l1_table_offset, hdr.l1_size)
    if hdr.nb_snapshots:
        table_len = _snapshot_table_length(img)
        counter.add(hdr.snapshots_offset, table_len, cb)
        for snap in img.snapshot_table:
            l1 = table_from_bytes(img.file.pread_exact(snap.l1_table_offset, snap.l1_size * 8))
            _count_l1(img, counter, l1, snap.l1_table_offset, snap.l1_size)
    if include_refcount_structures:
        counter.add(hdr.refcount_table_offset, hdr.refcount_table_clusters * cs, cb)
        for entry in img.refcounts.reftable:
            if entry & ~0x1FF:
                counter.add(entry & ~0x1FF, cs, cb)
    return counter


def _snapshot_table_length(img: Image) -> int:
    from .snapshot import serialize_table
    return len(serialize_table(img.snapshot_table)) if img.snapshot_table else 0


def _count_l1(img: Image, counter: ReferenceCounter, l1: array, l1_offset: int, l1_size: int) -> None:
    cs, cb = img.cluster_size, img.cluster_bits
    if l1_size:
        counter.add(l1_offset, l1_size * 8, cb)
    for l1_entry in l1:
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        if l2_offset % cs:
            raise CorruptImage(f"L2 table offset {l2_offset:#x} unaligned")
        counter.add(l2_offset, cs, cb)
        entry_obj = img.l2_cache.get(l2_offset)
        try:
            for entry in entry_obj.table:
                if entry & QCOW_OFLAG_COMPRESSED:
                    start, length = compressed_host_range(entry, cb)
                    counter.add(start, length, cb)
                elif entry & L2E_OFFSET_MASK:
                    counter.add(entry & L2E_OFFSET_MASK, cs, cb)
                elif entry & ~QCOW_OFLAG_ZERO & ~(1 << 63):
                    pass  # reserved bits only: nothing referenced
        finally:
            img.l2_cache.put(entry_obj)


def rebuild_refcounts(img: Image) -> None:
    """Write new refcount structures computed from the references, then switch to them.

    The new table and blocks go after everything in use, describing themselves; the
    header is switched with one write after they are synced, so a crash leaves either
    the old or the new structures.  Old refcount clusters become free.
    Caller holds: the image exclusively; metadata caches flushed.
    """
    hdr = img.header
    cs, cb = img.cluster_size, img.cluster_bits
    counter = count_references(img, include_refcount_structures=False)
    if counter.beyond_end:
        first = min(counter.beyond_end)
        raise CorruptImage(f"cluster {first} is referenced but lies beyond the end of the file")
    counts = counter.counts
    max_refcount = (1 << hdr.refcount_bits) - 1
    if counts and max(counts) > max_refcount:
        raise Qcow2Error("a cluster has more references than its refcount width can count")
    entries = 1 << hdr.refcount_block_bits
    start = len(counts)
    blocks = tables = 1
    while True:
        end = start + blocks + tables
        need_blocks = div_round_up(end, entries)
        need_tables = div_round_up(need_blocks * 8, cs)
        if (need_blocks, need_tables) == (blocks, tables):
            break
        blocks, tables = max(blocks, need_blocks), max(tables, need_tables)
    reftable = array("Q", bytes(tables * cs))
    for index in range(blocks):
        block = RefBlock.empty(hdr.refcount_bits, entries)
        base = index * entries
        for i in range(min(entries, len(counts) - base) if base < len(counts) else 0):
            block.values[i] = counts[base + i]
        for cluster in range(max(base, start), min(base + entries, start + blocks + tables)):
            block.values[cluster - base] = 1
        offset = (start + index) << cb
        img.file.pwrite(offset, block.to_bytes())
        reftable[index] = offset
    table_offset = (start + blocks) << cb
    img.file.pwrite(table_offset, table_to_bytes(reftable))
    img.file.flush()
    img.file.pwrite(OFF_REFCOUNT_TABLE_OFFSET, struct.pack(">QI", table_offset, tables))
    img.file.flush()
    hdr.refcount_table_offset, hdr.refcount_table_clusters = table_offset, tables
    img.refcounts = RefcountManager(img.file, hdr, img.refcounts.cache.capacity, img.refcounts.in_use)


def refcount_mismatches(img: Image) -> tuple[list[int], list[int]]:
    """(clusters whose refcount is below their references, clusters with refcount above).

    The first list is corruption (a reference without a refcount protecting it);
    the second is leaks.  A reference beyond the end of the file counts as
    corruption.  Caller holds: the image exclusively (or nothing else runs).
    """
    counter = count_references(img)
    corrupt = sorted(counter.beyond_end)
    leaked = []
    refcounts = img.refcounts
    for cluster, references in enumerate(counter.counts):
        stored = refcounts.get(cluster)
        if stored < references:
            corrupt.append(cluster)
        elif stored > references:
            leaked.append(cluster)
    return corrupt, leaked
