"""The metadata overlap check (QEMU's ``overlap-check``): the last line of defence.

Before a write reaches the file, its host range is compared with every piece of
metadata the image's structures name: the header, the active L1 table, the active L2
tables, the refcount table and blocks, the snapshot table, the snapshots' L1 tables
(and, in mode ``"all"``, their L2 tables), the bitmap directory and the LUKS header
area of an encrypted image (stricter than QEMU, which does not watch it: we never
write there either).  A hit means the
allocation state lies (a refcount of 0 on a table, an L2 entry pointing at metadata):
the write is refused and the image marked corrupt, as QEMU does.

Modes, as QEMU's ``overlap-check`` option: ``"none"``, ``"constant"`` (header, tables
named by the header, snapshot L1 tables, bitmap directory), ``"cached"`` (the default:
also active L2 tables and refcount blocks) and ``"all"`` (also the snapshots' L2
tables, read from the file when the map is built).

What counts as metadata is :func:`metadata_ranges` (in the order QEMU tests it);
:class:`OverlapMap` indexes it for the write path, and :func:`first_overlap` walks it
unindexed for the checker, whose repairs change the structures between two writes.

The map is kept as sorted, disjoint cluster intervals (lists searched with
:mod:`bisect`): a check is one binary search, whatever the image's size.  New L2
tables and refcount blocks are added as they are allocated; anything else that moves
or frees metadata makes the map stale, and it is rebuilt from the image's structures
(cost O(L1 size + refcount table + snapshots)) at the next check.  A stale or lost
entry can only miss an overlap, never invent one: the map is always rebuilt from what
the structures name now.

Thread safety: the union of intervals that every check searches is never changed
once published: an addition builds a new one and swaps the reference, so a check
reads ``_union`` once and searches it with no lock (a check that read lists while an
addition was between its inserts saw ``starts`` one item longer than ``ends``: the
chaos stress hit that as an ``IndexError``); the per-kind lists (read only to name a
hit) are replaced the same way, so an interrupt cannot leave one half-inserted either.
``_lock`` guards the publication of ``_union``, ``_version`` and ``_by_kind``
(additions, rebuilds and invalidations all write them under it, so an addition never
publishes a copy of a map invalidated meanwhile).  It is an innermost
lock (see the lock order in :mod:`qcow2rw.locks`), held for no I/O except the reads
of snapshot L1 tables in mode ``"all"``.
"""

from __future__ import annotations

import struct
import threading
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from typing import Protocol

from .format import (
    L1E_OFFSET_MASK,
    MAX_BITMAP_DIRECTORY_SIZE,
    MAX_L1_SIZE,
    REFT_OFFSET_MASK,
    Header,
    Snapshot,
    bitmaps_extension,
    snapshot_table_length,
)
from .crypto import crypto_extension
from .storage import HostFile


class _Entries(Protocol):
    @property
    def entries(self) -> array: ...


class _Reftable(Protocol):
    @property
    def reftable(self) -> array: ...


class MetadataSource(Protocol):
    """What the map reads of an open image: its :class:`~qcow2rw.state.ImageState`
    (a protocol, so that this module needs no import of the state, which owns a map)."""

    @property
    def header(self) -> Header: ...

    @property
    def cluster_size(self) -> int: ...

    @property
    def cluster_bits(self) -> int: ...

    @property
    def file(self) -> HostFile: ...

    @property
    def snapshot_table(self) -> list[Snapshot]: ...

    @property
    def l1(self) -> _Entries: ...

    @property
    def refcounts(self) -> _Reftable: ...

MODES = ("none", "constant", "cached", "all")

# Kinds, with QEMU's names (metadata_ol_names in block/qcow2-refcount.c).
HEADER, ACTIVE_L1, ACTIVE_L2, REFCOUNT_TABLE, REFCOUNT_BLOCK, SNAPSHOT_TABLE, \
    INACTIVE_L1, INACTIVE_L2, BITMAP_DIRECTORY, CRYPTO_HEADER = range(10)
NAMES = ("qcow2_header", "active L1 table", "active L2 table", "refcount table",
         "refcount block", "snapshot table", "inactive L1 table", "inactive L2 table",
         "bitmap directory", "crypto header")


def metadata_ranges(img: MetadataSource, *, snapshot_table: tuple[int, int],
                    snapshot_l1s: Iterable[tuple[int, int]],
                    bitmap_directory: tuple[int, int] | None,
                    cached: bool) -> Iterator[tuple[int, int, int]]:
    """(kind, byte offset, byte length) of the metadata the image's structures name.

    In the order QEMU's ``qcow2_check_metadata_overlap()`` tests them: the header,
    the active L1 table, the refcount table, the snapshot table (*snapshot_table*:
    offset, length), the snapshots' L1 tables (*snapshot_l1s*: offset, entries), with
    *cached* the active L2 tables and the refcount blocks (a cluster from the offset
    each entry names), then the bitmap directory (offset, length) when given, and
    last the LUKS header area (ours alone).  The snapshots' L2 tables (mode "all")
    are not among them.  Caller holds: what keeps
    the image's L1 table and refcount table from changing meanwhile.
    """
    hdr = img.header
    cs = img.cluster_size
    yield HEADER, 0, cs
    yield ACTIVE_L1, hdr.l1_table_offset, hdr.l1_size * 8
    yield REFCOUNT_TABLE, hdr.refcount_table_offset, hdr.refcount_table_clusters * cs
    yield SNAPSHOT_TABLE, snapshot_table[0], snapshot_table[1]
    for offset, entries in snapshot_l1s:
        yield INACTIVE_L1, offset, entries * 8
    if cached:  # (filter(None, ...) skips the zero entries in C: most of a big table)
        for entry in filter(None, img.l1.entries):
            if entry & L1E_OFFSET_MASK:
                yield ACTIVE_L2, entry & L1E_OFFSET_MASK, cs
        for entry in filter(None, img.refcounts.reftable):
            if entry & REFT_OFFSET_MASK:
                yield REFCOUNT_BLOCK, entry & REFT_OFFSET_MASK, cs
    if bitmap_directory is not None:
        yield BITMAP_DIRECTORY, bitmap_directory[0], bitmap_directory[1]
    luks = crypto_extension(hdr)
    if luks is not None:
        yield CRYPTO_HEADER, luks[0], luks[1]


def first_overlap(ranges: Iterable[tuple[int, int, int]], offset: int, length: int,
                  cluster_bits: int, ignore: int = -1) -> int:
    """The kind of the first of *ranges* (as :func:`metadata_ranges` gives them) that
    [offset, offset+length) meets, both rounded out to whole clusters, or -1.

    QEMU's ``qcow2_check_metadata_overlap()`` walking the structures: no map to keep
    up to date, for structures that change between two checks (the checker's
    repairs).  *ignore* is the kind being written on purpose.
    """
    first = offset >> cluster_bits
    last = (offset + length - 1) >> cluster_bits
    round_up = (1 << cluster_bits) - 1
    for kind, start, size in ranges:
        if (kind != ignore and size > 0 and start >> cluster_bits <= last
                and first < (start + size + round_up) >> cluster_bits):
            return kind
    return -1


def mode_of(value: bool | str) -> str:
    """The mode for an ``overlap_check`` argument (True: "cached", False: "none")."""
    if value is True:
        return "cached"
    if value is False:
        return "none"
    if value not in MODES:
        raise ValueError(f"overlap_check must be a bool or one of {', '.join(MODES)}, "
                         f"not {value!r}")
    return value


class _Intervals:
    """Disjoint, sorted cluster intervals [start, end) with the kind of each."""

    __slots__ = ("ends", "kinds", "starts")

    def __init__(self, items: list[tuple[int, int, int]]) -> None:
        self.starts: list[int] = []  # lists: bisect is fastest on them
        self.ends: list[int] = []
        self.kinds = array("B")
        for start, end, kind in sorted(items):
            if self.ends and start < self.ends[-1]:
                self.ends[-1] = max(self.ends[-1], end)  # merged: the first kind names it
                continue
            self.starts.append(start)
            self.ends.append(end)
            self.kinds.append(kind)

    def find(self, first: int, last: int) -> int:
        """The kind of an interval meeting clusters first..last, or -1."""
        i = bisect_right(self.starts, last) - 1
        if i >= 0 and self.ends[i] > first:
            return self.kinds[i]
        return -1

    def with_added(self, start: int, end: int, kind: int) -> _Intervals:
        """A copy with :meth:`add` applied (self is never changed)."""
        copy = _Intervals([])
        copy.starts = self.starts[:]
        copy.ends = self.ends[:]
        copy.kinds = array("B", self.kinds)
        copy.add(start, end, kind)
        return copy

    def without(self, start: int, end: int) -> _Intervals | None:
        """A copy lacking the interval [start, end) (self is never changed); None if
        the map has no interval with exactly these bounds (it was merged: rebuild)."""
        i = bisect_right(self.starts, start) - 1
        if i < 0 or self.starts[i] != start or self.ends[i] != end:
            return None
        copy = _Intervals([])
        copy.starts = self.starts[:i] + self.starts[i + 1:]
        copy.ends = self.ends[:i] + self.ends[i + 1:]
        copy.kinds = self.kinds[:i] + self.kinds[i + 1:]
        return copy

    def add(self, start: int, end: int, kind: int) -> None:
        """Insert [start, end) if no interval meets it (else leave the map as is)."""
        i = bisect_right(self.starts, end - 1)
        if i > 0 and self.ends[i - 1] > start:
            return
        self.starts.insert(i, start)
        self.ends.insert(i, end)
        self.kinds.insert(i, kind)


class OverlapMap:
    """The metadata ranges of one image, for :meth:`find` before every write."""

    def __init__(self, img: MetadataSource, mode: str) -> None:
        self.img = img
        self.mode = mode
        self._cluster_bits = img.cluster_bits
        #: Guards ``_union``, ``_version`` and ``_by_kind`` (see the module docstring).
        self._lock = threading.Lock()
        self._union: _Intervals | None = None  # None: stale, rebuilt at the next check
        self._by_kind: dict[int, _Intervals] = {}
        self._version = 0  # bumped by invalidate(): a rebuild that raced it is not kept

    def invalidate(self) -> None:
        """Metadata moved or was freed: rebuild the map before the next check.

        Under ``_lock``: an :meth:`added` that read the map before this call must not
        publish its copy (stale: it still lacks whatever moved) after it, nor a
        :meth:`_rebuild` keep the map it built from the structures as they were.
        """
        with self._lock:
            self._version += 1
            self._union = None

    def added(self, offset: int, length: int, kind: int) -> None:
        """A new table or block of *kind* now lives at [offset, offset+length)."""
        if self.mode in ("none", "constant") and kind in (ACTIVE_L2, REFCOUNT_BLOCK):
            return
        self._change(offset, length, kind, adding=True)

    def removed(self, offset: int, length: int, kind: int) -> None:
        """The table of *kind* at [offset, offset+length) is metadata no more (the
        refcount table a growth replaced): take it out of the map, so that freeing
        its clusters later costs no rebuild.  If the map does not hold it as one
        interval of its own, the map is rebuilt at the next check instead."""
        self._change(offset, length, kind, adding=False)

    def _change(self, offset: int, length: int, kind: int, adding: bool) -> None:
        """Publish the map with [offset, offset+length) of *kind* added or taken out.

        Both copies (the union and the kind's list) are made first, then published
        with no call in between: an exception (an interrupt) cannot leave a list
        half-changed.  A change the copies cannot express makes the map stale.
        """
        cb = self.img.cluster_bits
        first, end = offset >> cb, (offset + length + (1 << cb) - 1) >> cb
        with self._lock:
            union = self._union
            if union is None:
                return
            try:
                per = self._by_kind.get(kind)
                if adding:
                    new_union: _Intervals | None = union.with_added(first, end, kind)
                    new_per = (_Intervals([(first, end, kind)]) if per is None
                               else per.with_added(first, end, kind))
                else:
                    new_union = union.without(first, end)
                    new_per = None if per is None else per.without(first, end)
                if new_union is None or new_per is None:
                    self._version += 1  # rebuilt at the next check
                    self._union = None
                    return
                self._union = new_union
                self._by_kind[kind] = new_per
            except BaseException:
                self._version += 1  # whatever got published, the next check rebuilds
                self._union = None
                raise

    def freed(self, clusters: list[int]) -> None:
        """Clusters whose refcount dropped to 0: if any was metadata, rebuild the map."""
        union = self._union
        if union is None:
            self.invalidate()  # a rebuild in progress may have seen them still in use
            return
        if any(union.find(cluster, cluster) >= 0 for cluster in clusters):
            self.invalidate()

    def find(self, offset: int, length: int, ignore: int = -1) -> str | None:
        """The name of the metadata [offset, offset+length) would overwrite, or None.

        *ignore* is the kind being written on purpose (QEMU's ``ign`` argument).
        """
        union = self._union
        if union is None:
            union = self._rebuild()
        cb = self._cluster_bits
        first = offset >> cb
        last = (offset + length - 1) >> cb if length > 0 else first
        i = bisect_right(union.starts, last) - 1  # (inlined _Intervals.find: hot path)
        if i < 0 or union.ends[i] <= first:
            return None
        with self._lock:  # a hit: name it (rare path; added() changes these in place)
            for kind, per in sorted(self._by_kind.items()):
                if kind != ignore and per.find(first, last) >= 0:
                    return NAMES[kind]
        return None

    # Building ------------------------------------------------------------------
    def _rebuild(self) -> _Intervals:
        with self._lock:
            if self._union is not None:
                return self._union
            version = self._version
            items = self._items()
            by_kind: dict[int, list[tuple[int, int, int]]] = {}
            for item in items:
                by_kind.setdefault(item[2], []).append(item)
            self._by_kind = {kind: _Intervals(group) for kind, group in by_kind.items()}
            union = _Intervals(items)
            if version == self._version:  # else the structures changed meanwhile
                self._union = union
            return union

    def _items(self) -> list[tuple[int, int, int]]:
        img = self.img
        hdr = img.header
        cb = img.cluster_bits
        cs = img.cluster_size
        items: list[tuple[int, int, int]] = []

        def add(offset: int, length: int, kind: int) -> None:
            if length > 0:
                items.append((offset >> cb, (offset + length + (1 << cb) - 1) >> cb, kind))

        # An entry the check calls corrupted (unaligned, too large) names no table.
        snapshot_l1s = [(snap.l1_table_offset, snap.l1_size) for snap in img.snapshot_table
                        if snap.l1_table_offset % cs == 0 and snap.l1_size * 8 <= MAX_L1_SIZE]
        ranges = metadata_ranges(
            img, snapshot_table=(hdr.snapshots_offset, snapshot_table_length(img.snapshot_table)),
            snapshot_l1s=snapshot_l1s, bitmap_directory=self._bitmap_directory(),
            cached=self.mode in ("cached", "all"))
        for kind, offset, length in ranges:
            if kind in (ACTIVE_L2, REFCOUNT_BLOCK):
                length = 1  # the cluster the entry names (an unaligned one is refused at use)
            add(offset, length, kind)
        if self.mode == "all":
            self._inactive_l2(add)
        return items

    def _bitmap_directory(self) -> tuple[int, int] | None:
        ext = bitmaps_extension(self.img.header, consistent=False)
        if ext is None:
            return None
        return ext.directory_offset, min(ext.directory_size, MAX_BITMAP_DIRECTORY_SIZE)

    def _inactive_l2(self, add: object) -> None:
        """Mode "all": the L2 tables of every snapshot (read bounded by the file)."""
        img = self.img
        file_size = img.file.size()
        for snap in img.snapshot_table:
            length = min(snap.l1_size * 8, MAX_L1_SIZE, max(0, file_size - snap.l1_table_offset))
            data = img.file.pread(snap.l1_table_offset, length)
            for (entry,) in struct.iter_unpack(">Q", data[:len(data) & ~7]):
                if entry & L1E_OFFSET_MASK:
                    add(entry & L1E_OFFSET_MASK, 1, INACTIVE_L2)  # type: ignore[operator]
