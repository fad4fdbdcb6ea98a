"""A second, independent reference counter: the oracle the crash-state tests hold the
write path to (moved here from ``qcow2rw.check``: the library does not use it).

It walks the image's tables the simple way (strict: an unaligned L2 table raises)
and counts the references to each host cluster, to compare them with the stored
refcounts.  :func:`qcow2rw.check.check_image` is the full checker; this one shares
none of its counting code, so a test that uses both has two witnesses.
"""

from __future__ import annotations

from array import array

from qcow2rw.format import div_round_up, table_from_bytes
from qcow2rw.image import Image
from qcow2rw.snapshot import l1_references, table_length

_COUNTER = "I" if array("I").itemsize == 4 else "L"


class ReferenceCounter:
    """Per-cluster reference counts of one image (within the file; beyond it, counted apart)."""

    def __init__(self, clusters: int) -> None:
        self.counts = array(_COUNTER, bytes(4 * clusters))
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
        counter.add(hdr.snapshots_offset, table_length(img), cb)
        for snap in img.snapshot_table:
            l1 = table_from_bytes(img.file.pread_exact(snap.l1_table_offset, snap.l1_size * 8))
            _count_l1(img, counter, l1, snap.l1_table_offset, snap.l1_size)
    if include_refcount_structures:
        counter.add(hdr.refcount_table_offset, hdr.refcount_table_clusters * cs, cb)
        for entry in img.refcounts.reftable:
            if entry & ~0x1FF:
                counter.add(entry & ~0x1FF, cs, cb)
    return counter


def _count_l1(img: Image, counter: ReferenceCounter, l1: array, l1_offset: int, l1_size: int) -> None:
    cb = img.cluster_bits
    if l1_size:
        counter.add(l1_offset, l1_size * 8, cb)
    for offset, length in l1_references(img, l1):
        counter.add(offset, length, cb)


def refcount_mismatches(img: Image) -> tuple[list[int], list[int]]:
    """(clusters whose refcount is below their references, clusters with refcount above).

    The first list is corruption (a reference without a refcount protecting it);
    the second is leaks.  A reference beyond the end of the file counts as
    corruption.  Takes the image exclusively (the caller may hold it already).
    """
    with img.exclusive():
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
