"""The in-memory refcount table (IMRT) of a check: counting every reference, and
rebuilding the refcount structures from it.

The reference count of a host cluster is the number of places that point to it:
the header (cluster 0), the refcount table and blocks, the active and snapshot L1
tables, every L2 table they name (once per L1 entry naming it), every data cluster
those L2 tables name (once per L2 entry; a compressed cluster counts once on each
host cluster its data touches), the snapshot table, the LUKS header area of an
encrypted image and the persistent bitmaps.

:class:`References` is the part of QEMU's checker that finds them
(``calculate_refcounts`` and its helpers in ``block/qcow2-refcount.c``: one counter
per host cluster, checking entries on the way and repairing what a repair may
repair there); :class:`RefcountRebuild` adds the rebuild that writes new refcount
blocks and a new table from the counters when the stored structures are broken
(``rebuild_refcount_structure``: new clusters only where nothing is referenced, the
header switched last).  The
checker (:mod:`qcow2rw.check`) compares the counters with the stored refcounts.

Writes a repair makes pass the engine's overlap check (:mod:`qcow2rw.overlap`) on
the structures as the check sees them, as QEMU's ``qcow2_pre_write_overlap_check``.
Memory: one 32-bit counter per host cluster of the file.
"""

from __future__ import annotations

import errno
import os
import struct
from array import array
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass

from .crypto import crypto_extension
from .errors import CorruptImage, FormatError
from .format import (BME_FLAG_ALL_ONES, BME_OFFSET_MASK, BME_RESERVED_MASK, L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK,
                     L2E_STD_RESERVED_MASK, MAX_BITMAP_DIRECTORY_SIZE, MAX_L1_SIZE,
                     OFF_REFCOUNT_TABLE_OFFSET, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED,
                     QCOW_OFLAG_ZERO, REFT_OFFSET_MASK, REFT_RESERVED_MASK, REFTABLE_POINTER,
                     Snapshot, align_up,
                     L2_BITMAP_ALL_ALLOC, L2_BITMAP_ALL_ZEROES, SUBCLUSTERS, bitmaps_extension, decode_compressed,
                     div_round_up, l2_table_from_bytes, parse_bitmap_directory,
                     table_from_bytes, table_to_bytes)
from .overlap import ACTIVE_L2, NAMES, first_overlap, metadata_ranges
from .refcount import RefBlock, RefcountManager
from .state import MARKING, NON_FATAL, ImageState, corruption_message
from .writeback import flush_everything


# BdrvCheckMode
FIX_LEAKS = 1
FIX_ERRORS = 2
FIX_ALL = FIX_LEAKS | FIX_ERRORS

_COUNTER = "I" if array("I").itemsize == 4 else "L"
# QEMU refuses I/O requests ending past this offset with EIO (BDRV_MAX_LENGTH).
MAX_IO_END = (1 << 63) - (1 << 30)
# A repair grows the file to reach a refcount block past its end only this far beyond
# twice its size (see References.check_refblocks).
_MAX_RESIZE_SLACK = 64 * 1024 * 1024


class CheckFailed(Exception):
    """The check cannot go on (QEMU returns -errno): qemu-img prints "Check failed: ..."."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.err = err


@dataclass
class CheckCounts:
    """BdrvCheckResult: the figures of one check (or of one of its parts)."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0

    def copy(self) -> CheckCounts:
        return type(self)(**self.__dict__)

    def add(self, other: CheckCounts, allocation_info: bool) -> None:
        """qcow2_add_check_result()."""
        self.corruptions += other.corruptions
        self.leaks += other.leaks
        self.check_errors += other.check_errors
        self.corruptions_fixed += other.corruptions_fixed
        self.leaks_fixed += other.leaks_fixed
        if allocation_info:
            for name in ("image_end_offset", "total_clusters", "allocated_clusters",
                         "fragmented_clusters", "compressed_clusters"):
                setattr(self, name, getattr(other, name))


class _ByteRanges:
    """Disjoint byte ranges [start, end), sorted, for overlap tests."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def overlaps(self, start: int, length: int) -> bool:
        """True when [start, start + length) shares a byte with a range added."""
        i = bisect_right(self.starts, start + length - 1) - 1
        return length > 0 and i >= 0 and self.ends[i] > start

    def add(self, start: int, length: int) -> None:
        """Add [start, start + length), which overlaps no range added before."""
        if length > 0:
            i = bisect_right(self.starts, start)
            self.starts.insert(i, start)
            self.ends.insert(i, start + length)


#: Messages replayed or repeated for one finding before the rest are only counted.
_MAX_REPEATED_MESSAGES = 1000


class Walk:
    """What one walk of an L2 table found, for the L1 entries that name it again.

    A walk that fixed nothing and hit no refcount overflow depends only on the table
    and the file size, so walking it again would find the same: its counters and
    messages are replayed, and its references are added all at once afterwards
    (:meth:`References.add_references`).
    """

    def __init__(self, before: CheckCounts, after: CheckCounts, lines: list[str]) -> None:
        self.repeats = 0
        self.deltas = {name: getattr(after, name) - getattr(before, name)
                       for name in ("corruptions", "allocated_clusters",
                                    "fragmented_clusters", "compressed_clusters")}
        self.lines = lines

    def replay(self, checker: References, res: CheckCounts) -> None:
        """Count one more walk's findings (messages up to the checker's budget)."""
        for name, delta in self.deltas.items():
            if delta:
                setattr(res, name, getattr(res, name) + delta)
        if not self.lines:
            return
        if self.repeats * len(self.lines) <= _MAX_REPEATED_MESSAGES:
            for line in self.lines:
                checker.msg(line)
        else:
            checker.omitted += len(self.lines)


def _c_string(text: str) -> str:
    """A name as QEMU prints it: a C string, so it ends at the first NUL."""
    return text.split("\0", 1)[0]


def _label(snap: Snapshot) -> str:
    """A snapshot as the check's messages name it: ``<id> (<name>)``."""
    return f"{_c_string(snap.id_str)} ({_c_string(snap.name)})"


class References:
    """The in-memory refcount table of one check run, and the refcount rebuild.

    Caller holds: the image exclusively; metadata caches flushed.  L2 tables are
    read through the image's L2 cache (cluster-aligned tables inside the file; others
    straight from the file, as QEMU reads them).
    """

    def __init__(self, state: ImageState, fix: int, messages: list[str], *,
                 refuse_beyond_end: bool = False) -> None:
        self.state = state
        self.fix = fix
        self.out = messages
        self.refuse_beyond_end = refuse_beyond_end
        hdr = state.header
        self.cs = state.cluster_size
        self.cb = state.cluster_bits
        self.max_refcount = (1 << hdr.refcount_bits) - 1
        self.file_len = state.file.size()
        self.snapshots: list[Snapshot] = []  # the table as the check read it
        self.snapshots_offset = 0
        self.snapshots_size = 0
        self.imrt = array(_COUNTER)
        self.overflows = 0  # references that found their refcount at its maximum
        self.omitted = 0    # repeated messages counted instead of printed
        self.rebuild = False
        self.signaled_corruption = False
        self.l2_cache_stale = False
        self.writable = not state.readonly

    def msg(self, line: str) -> None:
        self.out.append(line)

    def drop_l2_cache(self) -> None:
        """Forget the cached L2 tables after writing metadata around the cache.

        A damaged L1 table may name any cluster (the header, a refcount block) as an
        L2 table, and QEMU's checker reads tables from the file: a cached copy of such
        a cluster must not outlive a direct write to it.  The cache holds nothing
        dirty here (every change is flushed at once), so this loses nothing.
        """
        if self.writable:
            flush_everything(self.state)
        self.state.l2_cache.clear()
        self.l2_cache_stale = False

    # The in-memory refcount table ------------------------------------------------------
    def inc(self, res: CheckCounts, offset: int, size: int) -> None:
        """qcow2_inc_refcounts_imrt(): one more reference to each cluster of the range."""
        if size <= 0:
            return
        if offset + size - self.file_len >= self.cs:
            if self.refuse_beyond_end:
                raise CorruptImage(f"cluster {(offset + size - 1) >> self.cb} is referenced but "
                                   "lies beyond the end of the file")
            self.msg("ERROR: counting reference for region exceeding the end of the file by "
                     f"one cluster or more: offset {offset:#x} size {size:#x}")
            res.corruptions += 1
            return
        cb = self.cb
        imrt = self.imrt
        first, last = offset >> cb, (offset + size - 1) >> cb
        if last >= len(imrt):
            self.grow_imrt(res, last + 1)
        for k in range(first, last + 1):
            count = imrt[k]
            if count == self.max_refcount:
                self.overflow_message(k)
                res.corruptions += 1
                continue
            imrt[k] = count + 1

    def clear_imrt(self, clusters: int) -> None:
        """Start the in-memory refcount table again: *clusters* counters at 0."""
        self.imrt = array(_COUNTER, bytes(4 * clusters))

    def grow_imrt(self, res: CheckCounts | None, size: int) -> None:
        """realloc_refcount_array(): at least *size* counters (ENOMEM fails the check)."""
        if size <= len(self.imrt):
            return
        try:
            self.imrt.extend(array(_COUNTER, bytes(4 * (size - len(self.imrt)))))
        except (MemoryError, OverflowError):
            if res is not None:
                res.check_errors += 1
            raise CheckFailed(errno.ENOMEM) from None

    def pread(self, offset: int, length: int) -> bytes:
        """Read like bdrv_pread(): zeros past the end of the file, EIO past QEMU's limit."""
        if offset < 0 or offset + length > MAX_IO_END:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return self.state.file.pread_exact(offset, length)

    def calculate_refcounts(self, res: CheckCounts, fix: int) -> None:
        """calculate_refcounts(): fill the IMRT from every structure of the image."""
        state, cs = self.state, self.cs
        hdr = state.header
        self.inc(res, 0, cs)
        self.inactive_walks: dict[int, Walk] = {}
        self.check_refcounts_l1(res, hdr.l1_table_offset, hdr.l1_size, True, fix)
        walks: dict[tuple[int, int], Walk] = {}  # snapshot L1 tables, as for L2 tables
        walked = _ByteRanges()  # the file bytes of the snapshot L1 tables walked
        for snap in self.snapshots:
            if snap.l1_table_offset % cs:
                self.msg(f"ERROR snapshot {_label(snap)} "
                         f"l1_offset={snap.l1_table_offset:#x}: L1 table is not cluster "
                         "aligned; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            if snap.l1_size > MAX_L1_SIZE // 8:
                self.msg(f"ERROR snapshot {_label(snap)} l1_size={snap.l1_size:#x}: "
                         "L1 table is too large; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            key = (snap.l1_table_offset, snap.l1_size)
            walk = walks.get(key)
            if walk is not None:  # another snapshot with the same L1 table
                walk.repeats += 1
                walk.replay(self, res)
                continue
            if walked.overlaps(snap.l1_table_offset, snap.l1_size * 8):
                # Stricter than QEMU, which walks it again: a table sharing bytes with
                # another snapshot's (not the same table) is damage, and skipping it
                # keeps the check's time bounded by the file's size.
                self.msg(f"ERROR snapshot {_label(snap)} "
                         f"l1_offset={snap.l1_table_offset:#x}: L1 table overlaps another "
                         "snapshot's; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            walked.add(snap.l1_table_offset, snap.l1_size * 8)
            before, lines, overflows = res.copy(), len(self.out), self.overflows
            self.check_refcounts_l1(res, snap.l1_table_offset, snap.l1_size, False, fix)
            if (res.corruptions_fixed == before.corruptions_fixed and self.overflows == overflows
                    and res.check_errors == before.check_errors):
                walks[key] = Walk(before, res, self.out[lines:])
        self.flush_walks(res, self.inactive_walks)
        for (l1_offset, l1_size), walk in walks.items():
            if walk.repeats:
                self.add_l1_references(res, l1_offset, l1_size, walk.repeats)
        if self.omitted:
            self.msg(f"(and {self.omitted} more messages repeating the above for snapshots "
                     "that share an L1 table)")
            self.omitted = 0
        self.inc(res, self.snapshots_offset, self.snapshots_size)
        self.inc(res, hdr.refcount_table_offset, hdr.refcount_table_clusters * cs)
        luks = crypto_extension(hdr)  # the LUKS header and key material
        if luks is not None and 0 < luks[1] < 1 << 63:  # (QEMU's size is an int64_t)
            self.inc(res, *luks)
        self.check_bitmaps_refcounts(res)
        self.check_refblocks(res, fix)

    def cacheable(self, offset: int) -> bool:
        """True for L2 tables read through the L2 cache (aligned, inside the file)."""
        return offset % self.cs == 0 and offset + self.cs <= self.file_len

    def read_table(self, offset: int) -> array:
        """A copy of the L2 table at *offset* (through the cache when it can be cached)."""
        state = self.state
        if self.cacheable(offset):
            return state.l2_cache.copy_of(offset)
        return l2_table_from_bytes(state.file.pread_exact(offset, self.cs), state.extended)

    def metadata(self) -> Iterator[tuple[int, int, int]]:
        """The metadata as QEMU's check sees it, for the overlap check: the snapshot
        table as this check read it (each entry's L1 table, damaged or not), and
        QEMU's default checks ("cached": all but the snapshots' L2 tables) without
        the bitmap directory."""
        return metadata_ranges(
            self.state, snapshot_table=(self.snapshots_offset, self.snapshots_size),
            snapshot_l1s=((snap.l1_table_offset, snap.l1_size) for snap in self.snapshots),
            bitmap_directory=None, cached=True)

    def pre_write_overlap_check(self, offset: int, size: int, ignore: int = -1) -> bool:
        """qcow2_pre_write_overlap_check(): False (image marked corrupt) when
        [offset, offset+size) would overwrite metadata other than kind *ignore*."""
        kind = first_overlap(self.metadata(), offset, size, self.cb, ignore)
        if kind < 0:
            return True
        self.signal_corruption(f"Preventing invalid write on metadata (overlaps with "
                               f"{NAMES[kind]})")
        return False

    def signal_corruption(self, message: str) -> None:
        """qcow2_signal_corruption() of a fatal event: a writable image is marked corrupt
        (incompatible bit 1); one message per run."""
        state = self.state
        if self.signaled_corruption and (not self.writable or state.header.corrupt):
            return
        self.signaled_corruption = True
        if self.writable:  # (QEMU's check mode marks too when repairing, and goes on)
            self.msg(corruption_message(message, MARKING))
            state.mark_corrupt()
            self.drop_l2_cache()
        else:
            self.msg(corruption_message(message, NON_FATAL))

    def check_refcounts_l1(self, res: CheckCounts, l1_offset: int, l1_size: int, active: bool,
                           fix: int) -> None:
        """check_refcounts_l1(): the L1 table, its L2 tables and what they reference."""
        if not l1_size:
            return
        self.inc(res, l1_offset, l1_size * 8)
        try:
            if l1_offset < 0 or l1_offset + l1_size * 8 > MAX_IO_END:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            # Past the end of the file the table reads as zeros, entries that name
            # nothing: only the part inside the file is read and walked.
            in_file = min(l1_size * 8, max(0, self.file_len - l1_offset)) // 8 * 8
            l1 = table_from_bytes(self.pread(l1_offset, in_file))
        except OSError as exc:
            self.msg("ERROR: I/O error in check_refcounts_l1")
            res.check_errors += 1
            raise CheckFailed(exc.errno or errno.EIO) from None
        # Snapshot tables share one record of L2 walks (they name the same L2 tables,
        # as every snapshot QEMU takes does); flushed by calculate_refcounts.
        walks: dict[int, Walk] = {} if active else self.inactive_walks
        for entry in l1:
            if not entry:
                continue
            if entry & L1E_RESERVED_MASK:
                self.msg(f"ERROR found L1 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            l2_offset = entry & L1E_OFFSET_MASK
            self.inc(res, l2_offset, self.cs)
            if l2_offset % self.cs:
                self.msg(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; "
                         "L1 entry corrupted")
                res.corruptions += 1
            walk = walks.get(l2_offset)
            if walk is not None:  # named again: the same findings, references later
                walk.repeats += 1
                walk.replay(self, res)
                continue
            before, lines, overflows = res.copy(), len(self.out), self.overflows
            self.check_refcounts_l2(res, l2_offset, active, fix)
            if (res.corruptions_fixed == before.corruptions_fixed and self.overflows == overflows
                    and res.check_errors == before.check_errors):
                walks[l2_offset] = Walk(before, res, self.out[lines:])
        if active:
            self.flush_walks(res, walks)

    def flush_walks(self, res: CheckCounts, walks: dict[int, Walk]) -> None:
        """Add the references of the L2 tables named again since their walk."""
        for l2_offset, walk in walks.items():
            if walk.repeats:
                self.add_references(res, l2_offset, walk.repeats)
                walk.repeats = 0
        if self.omitted:
            self.msg(f"(and {self.omitted} more messages repeating the above for L2 tables "
                     "that several L1 entries name)")
            self.omitted = 0

    def add_l1_references(self, res: CheckCounts, l1_offset: int, l1_size: int, times: int) -> None:
        """What *times* more walks of an unchanged snapshot L1 table add to the in-memory
        refcounts: its own clusters, and each L2 table it names with what that names."""
        self.add_times(res, l1_offset, l1_size * 8, times)
        named: dict[int, int] = {}
        for entry in table_from_bytes(self.pread(l1_offset, l1_size * 8)):
            if entry:
                l2_offset = entry & L1E_OFFSET_MASK
                named[l2_offset] = named.get(l2_offset, 0) + 1
        for l2_offset, count in named.items():
            self.add_times(res, l2_offset, self.cs, count * times)
            self.add_references(res, l2_offset, count * times)

    def add_references(self, res: CheckCounts, l2_offset: int, times: int) -> None:
        """Count what L2 table *l2_offset* references *times* more times at once.

        What *times* more walks of an unchanged table add to the in-memory refcounts
        (their other findings are replayed by :class:`Walk`): the total is what QEMU
        reaches walking the table once per L1 entry, overflows included, in time
        bounded by the table instead of by L1 entries x L2 entries.
        """
        table = self.read_table(l2_offset)
        bitmaps = getattr(table, "bitmaps", None)
        for i, entry in enumerate(table):
            if not entry:
                continue
            if entry & QCOW_OFLAG_COMPRESSED:
                if bitmaps is not None and bitmaps[i]:
                    continue  # (reported by the walk, and not counted: QEMU's rule)
                offset, size = decode_compressed(entry, self.cb)
            else:
                offset, size = entry & L2E_OFFSET_MASK, self.cs
                if not offset or self.state.external:
                    continue
            self.add_times(res, offset, size, times)

    def add_times(self, res: CheckCounts, offset: int, size: int, times: int) -> None:
        """``inc(res, offset, size)`` *times* over, in one step (overflows counted as
        QEMU counts them; a range past the end of the file is left to the replay)."""
        if size <= 0 or offset + size - self.file_len >= self.cs:
            return
        cb = self.cb
        first, last = offset >> cb, (offset + size - 1) >> cb
        if last >= len(self.imrt):
            self.grow_imrt(res, last + 1)
        imrt = self.imrt
        for k in range(first, last + 1):
            excess = imrt[k] + times - self.max_refcount
            if excess > 0:
                for _ in range(min(excess, _MAX_REPEATED_MESSAGES)):
                    self.overflow_message(k)
                self.omitted += 2 * max(0, excess - _MAX_REPEATED_MESSAGES)
                res.corruptions += excess
                imrt[k] = self.max_refcount
            else:
                imrt[k] += times

    def overflow_message(self, cluster: int) -> None:
        """The two lines QEMU prints for a reference that would overflow a refcount."""
        self.overflows += 1
        self.msg(f"ERROR: overflow cluster offset={cluster << self.cb:#x}")
        self.msg("Use qemu-img amend to increase the refcount entry width or qemu-img "
                 "convert to create a clean copy if the image cannot be opened for writing")

    def check_refcounts_l2(self, res: CheckCounts, l2_offset: int, active: bool, fix: int) -> None:
        """check_refcounts_l2(): count what one L2 table references, checking its entries."""
        cs, cb = self.cs, self.cb
        cs_mask = cs - 1
        table = self.read_table(l2_offset)
        imrt = self.imrt
        max_refcount = self.max_refcount
        file_len = self.file_len
        next_contiguous = 0
        external = self.state.external
        bitmaps = getattr(table, "bitmaps", None)  # extended L2 entries
        bitmap = 0
        for i, entry in enumerate(table):
            if bitmaps is not None:
                bitmap = bitmaps[i]
            if not entry and not bitmap:
                continue
            if entry & QCOW_OFLAG_COMPRESSED:
                if bitmap:
                    self.msg(f"ERROR compressed cluster {i} with non-zero subcluster allocation "
                             f"bitmap, entry={entry:#x}")
                    res.corruptions += 1
                    continue
                coffset, csize = decode_compressed(entry, cb)
                if entry & QCOW_OFLAG_COPIED:
                    self.msg(f"ERROR: coffset={coffset:#x}: copied flag must never be set for "
                             "compressed clusters")
                    res.corruptions += 1
                self.inc(res, coffset, csize)
                if active:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1
                continue
            if entry & L2E_STD_RESERVED_MASK:
                self.msg(f"ERROR found l2 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            offset = entry & L2E_OFFSET_MASK
            if not offset and not (external and entry & QCOW_OFLAG_COPIED
                                   and not entry & QCOW_OFLAG_ZERO):
                # unallocated, or a plain zero cluster (offset 0 is a data cluster of
                # an external data file when COPIED is set)
                if bitmap & L2_BITMAP_ALL_ALLOC:
                    self.msg("ERROR: Unallocated cluster has non-zero subcluster allocation map")
                    res.corruptions += 1
                continue
            if bitmap & (bitmap >> SUBCLUSTERS):
                self.msg(f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster "
                         "allocation bitmap")
                res.corruptions += 1
            if offset & cs_mask:
                res.corruptions += 1
                if (not bitmap & L2_BITMAP_ALL_ALLOC if bitmaps is not None
                        else entry & QCOW_OFLAG_ZERO):
                    self.msg(f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} offset={offset:x}: "
                             "Preallocated cluster is not properly aligned; L2 entry corrupted.")
                    if fix & FIX_ERRORS and self.fix_l2_entry_by_zero(res, l2_offset, i):
                        continue  # a plain zero cluster now: nothing to count
                else:
                    self.msg(f"ERROR offset={offset:x}: Data cluster is not properly aligned; "
                             "L2 entry corrupted.")
            if active:
                res.allocated_clusters += 1
                if next_contiguous and offset != next_contiguous:
                    res.fragmented_clusters += 1
                next_contiguous = offset + cs
            if external:
                continue  # data clusters of an external data file are not refcounted
            cluster = offset >> cb
            if (not offset & cs_mask and offset + cs - file_len < cs and cluster < len(imrt)
                    and imrt[cluster] < max_refcount):
                imrt[cluster] += 1  # the common case of inc(), inline
            else:
                self.inc(res, offset, cs)

    def fix_l2_entry_by_zero(self, res: CheckCounts, l2_offset: int, index: int) -> bool:
        """fix_l2_entry_by_zero(): make the entry a plain zero cluster; True when done."""
        state = self.state
        esize = 16 if state.extended else 8
        if not self.pre_write_overlap_check(l2_offset + index * esize, esize, ACTIVE_L2):
            self.msg("ERROR: Overlap check failed")
            res.check_errors += 1
            raise CheckFailed(errno.EIO)
        try:
            if self.cacheable(l2_offset):
                entry_obj = state.l2_cache.get(l2_offset)
                try:
                    with entry_obj.lock:
                        if state.extended:  # allocated subclusters become zero
                            bitmaps = entry_obj.table.bitmaps
                            bitmap = bitmaps[index]
                            entry_obj.table[index] = 0
                            bitmaps[index] = (bitmap | bitmap << 32) & L2_BITMAP_ALL_ZEROES
                        else:
                            entry_obj.table[index] = QCOW_OFLAG_ZERO
                        entry_obj.dirty = True
                finally:
                    state.l2_cache.put(entry_obj)
                flush_everything(state)
            else:
                if state.extended:
                    entry_at = l2_offset + index * 16
                    bitmap = struct.unpack(">Q", state.file.pread_exact(entry_at + 8, 8))[0]
                    state.file.pwrite(entry_at, struct.pack(
                        ">QQ", 0, (bitmap | bitmap << 32) & L2_BITMAP_ALL_ZEROES))
                else:
                    state.file.pwrite(l2_offset + index * 8, struct.pack(">Q", QCOW_OFLAG_ZERO))
                state.file.flush()
        except OSError as exc:
            self.msg(f"ERROR: Failed to overwrite L2 table entry: {exc.strerror}")
            res.check_errors += 1
            return False
        res.corruptions -= 1
        res.corruptions_fixed += 1
        return True

    def check_bitmaps_refcounts(self, res: CheckCounts) -> None:
        """qcow2_check_bitmaps_refcounts(): the bitmap directory, tables and data."""
        state, cs = self.state, self.cs
        # QEMU ignores (and will not count) bitmaps another program invalidated.
        ext = bitmaps_extension(state.header)
        if ext is None or not ext.count:
            return
        dir_offset, dir_size = ext.directory_offset, ext.directory_size
        self.inc(res, dir_offset, dir_size)
        if dir_size > MAX_BITMAP_DIRECTORY_SIZE:
            res.corruptions += 1
            raise CheckFailed(errno.EINVAL)
        try:
            directory = parse_bitmap_directory(self.pread(dir_offset, dir_size), ext.count)
        except (OSError, FormatError):
            res.corruptions += 1
            raise CheckFailed(errno.EINVAL) from None
        for bitmap in directory:
            table_offset, table_size = bitmap.table_offset, bitmap.table_size
            self.inc(res, table_offset, table_size * 8)
            try:
                bitmap_table = table_from_bytes(self.pread(table_offset, table_size * 8))
            except OSError:
                res.corruptions += 1
                break
            for entry in bitmap_table:
                offset = entry & BME_OFFSET_MASK
                bad_offset = offset and (entry & BME_FLAG_ALL_ONES or offset % cs)
                if entry & BME_RESERVED_MASK or bad_offset:
                    res.corruptions += 1
                    continue
                if offset:
                    self.inc(res, offset, cs)

    def check_refblocks(self, res: CheckCounts, fix: int) -> None:
        """check_refblocks(): every refcount block is used once, inside the file, aligned."""
        state, cs, cb = self.state, self.cs, self.cb
        reftable = state.refcounts.reftable
        for i in range(len(reftable)):
            entry = reftable[i]
            offset = entry & REFT_OFFSET_MASK
            cluster = offset >> cb
            if entry & REFT_RESERVED_MASK:
                self.msg(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                self.rebuild = True
                continue
            if offset % cs:
                self.msg(f"ERROR refcount block {i} is not cluster aligned; refcount table "
                         "entry corrupted")
                res.corruptions += 1
                self.rebuild = True
                continue
            if cluster >= len(self.imrt):
                res.corruptions += 1
                self.msg(f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} refcount block {i} "
                         "is outside image")
                if fix & FIX_ERRORS:
                    if offset > (1 << 63) - 1 - cs:
                        self.rebuild = True
                        self.msg(f"ERROR could not resize image: {os.strerror(errno.EINVAL)}")
                        continue
                    if offset + cs > 2 * self.file_len + _MAX_RESIZE_SLACK:
                        # Stricter than QEMU, which grows the file to any offset a damaged
                        # table names (and then counts every cluster up to it): the cost
                        # of a repair stays bounded by the file's size; rebuild instead.
                        self.rebuild = True
                        self.msg(f"ERROR refcount block {i} lies far beyond the end of the "
                                 "file; not resizing the image to reach it")
                        continue
                    try:
                        state.file.truncate(offset + cs)
                        state.file.flush()
                    except OSError as exc:
                        self.rebuild = True
                        self.msg(f"Could not resize file: {exc.strerror}")
                        self.msg(f"ERROR could not resize image: {exc.strerror}")
                        continue
                    self.file_len = state.file.size()
                    self.grow_imrt(res, div_round_up(self.file_len, cs))
                    self.drop_l2_cache()
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
                    self.inc(res, offset, cs)
                continue
            if offset:
                self.inc(res, offset, cs)
                if self.imrt[cluster] != 1:
                    self.msg(f"ERROR refcount block {i} refcount={self.imrt[cluster]}")
                    res.corruptions += 1
                    self.rebuild = True


class RefcountRebuild(References):
    """The in-memory refcount table, and new refcount structures written from it.

    QEMU's ``rebuild_refcount_structure()`` and its helpers.  Caller holds: as for
    :class:`References`.
    """

    def alloc_imrt(self, count: int, first_free: list[int]) -> int:
        """alloc_clusters_imrt(): *count* free clusters in the IMRT from first_free[0] on."""
        imrt = self.imrt
        cluster = first_free[0]
        contiguous = 0
        first_gap = True
        n = len(imrt)
        while cluster < n and contiguous < count:
            if not imrt[cluster]:
                contiguous += 1
                if first_gap:
                    first_free[0] = cluster
                    first_gap = False
            elif contiguous:
                contiguous = 0
            cluster += 1
        if contiguous < count:
            self.grow_imrt(None, cluster + count - contiguous)
        cluster -= contiguous
        for k in range(cluster, cluster + count):
            imrt[k] = 1
        return cluster << self.cb

    def write_refblocks(self, first: int, end: int, reftable: list[int]) -> bool:
        """rebuild_refcounts_write_refblocks(): write the blocks that cover used clusters
        in [first, end), allocating them in the IMRT; True if the reftable grew."""
        state, cs, cb = self.state, self.cs, self.cb
        bits = state.refcounts.block_bits
        per_block = 1 << bits
        first_free = [0]
        grown = False
        cluster = first
        while cluster < end:
            if cluster >= len(self.imrt) or not self.imrt[cluster]:
                cluster += 1
                continue
            index = cluster >> bits
            start = index << bits
            if index < len(reftable) and reftable[index]:
                block_offset = reftable[index]
            else:
                if first_free[0] < start:
                    first_free[0] = start
                block_offset = self.alloc_imrt(1, first_free)
                if block_offset >> cb >= end:
                    end = (block_offset >> cb) + 1
                if len(reftable) <= index:
                    entries = align_up((index + 1) * 8, cs) // 8
                    reftable.extend([0] * (entries - len(reftable)))
                    grown = True
                reftable[index] = block_offset
            if not self.pre_write_overlap_check(block_offset, cs):
                self.msg(f"ERROR writing refblock: {os.strerror(errno.EIO)}")
                raise CheckFailed(errno.EIO)
            block = RefBlock.empty(state.header.refcount_bits, per_block)
            segment = self.imrt[start:start + per_block]
            block.values[:len(segment)] = array(block.values.typecode, segment)
            state.file.pwrite(block_offset, block.to_bytes())
            cluster = start + per_block
        return grown

    def rebuild_refcount_structure(self, res: CheckCounts) -> None:
        """rebuild_refcount_structure(): new blocks and table from the IMRT, then the header.

        Nothing referenced is overwritten: every new cluster is free in the IMRT.  The
        old structures are left for the leak repair that follows.
        """
        state, cs = self.state, self.cs
        reftable: list[int] = []
        try:
            changed = self.write_refblocks(0, len(self.imrt), reftable)
            assert changed
            while True:
                clusters = div_round_up(len(reftable) * 8, cs)
                table_offset = self.alloc_imrt(clusters, [0])
                start = table_offset >> self.cb
                if not self.write_refblocks(start, start + clusters, reftable):
                    break
            if not self.pre_write_overlap_check(table_offset, clusters * cs):
                self.msg(f"ERROR writing reftable: {os.strerror(errno.EIO)}")
                raise CheckFailed(errno.EIO)
            state.file.pwrite(table_offset, table_to_bytes(array("Q", reftable)))
            state.file.flush()
            state.file.pwrite(OFF_REFCOUNT_TABLE_OFFSET,
                            REFTABLE_POINTER.pack(table_offset, clusters))
            state.file.flush()
        except CheckFailed:
            res.check_errors += 1
            raise
        except OSError as exc:
            self.msg(f"ERROR writing refblock: {exc.strerror}")
            res.check_errors += 1
            raise CheckFailed(exc.errno or errno.EIO) from None
        hdr = state.header
        hdr.refcount_table_offset, hdr.refcount_table_clusters = table_offset, clusters
        old = state.refcounts
        state.refcounts = RefcountManager(state.file, hdr, old.cache.capacity, old.in_use)
        self.file_len = state.file.size()
        self.drop_l2_cache()
