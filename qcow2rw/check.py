"""Checking and repairing an image, as ``qemu-img check`` does.

The reference count of a host cluster is the number of places that point to it:
the header (cluster 0), the refcount table and blocks, the active and snapshot L1
tables, every L2 table they name (once per L1 entry naming it), every data cluster
those L2 tables name (once per L2 entry; a compressed cluster counts once on each
host cluster its data touches), the snapshot table and the persistent bitmaps.
Comparing that count with the stored refcounts is what ``qemu-img check`` does.

:func:`check_image` follows QEMU 7.2's checker (``qcow2_co_check_locked`` in
``block/qcow2.c``, ``qcow2_check_refcounts`` and friends in
``block/qcow2-refcount.c``, ``qcow2_check_read_snapshot_table`` in
``block/qcow2-snapshot.c``) step for step, so the figures, the per-cluster messages
and the exit codes are the same:

1. the snapshot table is read again from the header's pointer; in a v3 image an
   entry with less than 16 bytes of extra data is "incomplete" (a corruption), and
   more than 1024 bytes fail the check (``-r all`` cuts them);
2. an in-memory refcount table (one counter per host cluster, "IMRT") is filled from
   the header, the active L1/L2 tables (which also give the allocated, fragmented
   and compressed figures), the snapshots' tables, the snapshot table, the refcount
   table and blocks and the bitmaps, checking entries on the way (reserved bits,
   alignment, references past the end of the file);
3. the IMRT is compared with the stored refcounts: too low is a corruption, too high
   a leak; a referenced cluster with refcount 0 means the refcount structures
   themselves are broken, and ``-r all`` then rebuilds them from the IMRT (new blocks
   and table in clusters nothing references, the header switched last) and frees the
   old ones as leaks;
4. OFLAG_COPIED is compared with the refcounts in the active L1 and L2 tables;
5. with a repair, a damaged snapshot table is rewritten, and when no corruption is
   left the dirty and corrupt bits are cleared.

When anything was repaired, the image is checked again without repair ("Double
checking the fixed image now...") and that second check gives the figures.
Repairs go through the image's caches and are flushed at once; writes QEMU would
refuse (its metadata overlap check) are refused the same way, marking the image
corrupt.  :func:`open_for_check` opens an image as ``qemu-img check`` does, and
:func:`rebuild_refcounts` is the repair a read-write open runs on a dirty image.

Memory: the IMRT holds one 32-bit counter per host cluster of the file.
"""

from __future__ import annotations

import errno
import os
import struct
from array import array
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import CorruptImage, Qcow2Error
from .format import (AUTOCLEAR_BITMAPS, EXT_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY,
                     L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK,
                     L2E_STD_RESERVED_MASK, MAX_L1_SIZE, OFF_NB_SNAPSHOTS,
                     OFF_REFCOUNT_TABLE_OFFSET, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED,
                     QCOW_OFLAG_ZERO, REFT_OFFSET_MASK, REFT_RESERVED_MASK, align_up,
                     compressed_geometry, compressed_host_range, div_round_up,
                     table_from_bytes, table_to_bytes)
from .refcount import RefBlock, RefcountManager

if TYPE_CHECKING:
    from .image import Image

# BdrvCheckMode
FIX_LEAKS = 1
FIX_ERRORS = 2
FIX_ALL = FIX_LEAKS | FIX_ERRORS
REPAIR_MODES = {None: 0, "leaks": FIX_LEAKS, "all": FIX_ALL}

# QEMU's cluster types (no subclusters, no external data file).
_UNALLOCATED, _NORMAL, _ZERO_PLAIN, _ZERO_ALLOC, _COMPRESSED = range(5)

_SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")  # 40 bytes
_MAX_SNAPSHOT_EXTRA = 1024
_MAX_SNAPSHOTS_SIZE = 1024 * 65536
_BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_BME_RESERVED_MASK = 0xFF000000000001FE
_BME_ALL_ONES = 1
_BITMAP_DIR_ENTRY = struct.Struct(">QIIBBHI")  # 24 bytes
_MAX_BITMAP_DIRECTORY = 64 * 1024 * 1024
_COUNTER = "I" if array("I").itemsize == 4 else "L"
# QEMU refuses I/O requests ending past this offset with EIO (BDRV_MAX_LENGTH).
_MAX_IO_END = (1 << 63) - (1 << 30)


# ------------------------------------------------------------------------------------
# Reference counting for the write path's own checks (crash-state tests, traps)


# A repair grows the file to reach a refcount block past its end only this far beyond
# twice its size (see _Checker.check_refblocks).
_MAX_RESIZE_SLACK = 64 * 1024 * 1024


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

    A quick, strict count for the library's own tests (it raises on an unaligned L2
    table); :func:`check_image` is the full checker.  Caller holds: the image
    exclusively (or the big lock), with metadata flushed or cached (L2 tables are
    read through the cache, so dirty ones count as they are).
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
    """Bytes the snapshot table occupies on disk (as QEMU measures it: no tail padding)."""
    hdr = img.header
    if not hdr.nb_snapshots:
        return 0
    try:
        return _read_snapshot_table(img, hdr.snapshots_offset, hdr.nb_snapshots)[1]
    except _SnapshotTableError:
        from .snapshot import serialize_table
        return len(serialize_table(img.snapshot_table))


def l1_references(img: Image, l1: array) -> Iterator[tuple[int, int]]:
    """The host byte ranges (offset, length) one L1 table references: each L2 table it
    names, then that table's data clusters (a compressed cluster's stored range).

    One range per reference, so a shared cluster appears once per L1 -> L2 path.
    Caller holds: the image exclusively (L2 tables are read through the cache).
    """
    cs, cb = img.cluster_size, img.cluster_bits
    for l1_entry in l1:
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        if l2_offset % cs:
            raise CorruptImage(f"L2 table offset {l2_offset:#x} unaligned")
        yield l2_offset, cs
        entry_obj = img.l2_cache.get(l2_offset)
        try:
            entries = list(entry_obj.table)
        finally:
            img.l2_cache.put(entry_obj)
        for entry in entries:
            if entry & QCOW_OFLAG_COMPRESSED:
                yield compressed_host_range(entry, cb)
            elif entry & L2E_OFFSET_MASK:
                yield entry & L2E_OFFSET_MASK, cs


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


# ------------------------------------------------------------------------------------
# The result


def _tdb_hash(name: str) -> int:
    """QEMU's QDict hash (qobject/qdict.c): it decides the order qemu-img prints keys in."""
    value = (0x238F13AF * len(name)) & 0xFFFFFFFF
    for i, char in enumerate(name.encode()):
        value = (value + (char << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


# The keys in the order QAPI inserts them into the QDict (ImageCheck).
_JSON_KEYS = ("filename", "format", "check-errors", "image-end-offset", "corruptions", "leaks",
              "corruptions-fixed", "leaks-fixed", "total-clusters", "allocated-clusters",
              "fragmented-clusters", "compressed-clusters")
# qemu-img walks the QDict's 512 buckets in order, newest entry first within a bucket.
_JSON_ORDER = sorted(_JSON_KEYS, key=lambda k: (_tdb_hash(k) % 512, -_JSON_KEYS.index(k)))
_ALWAYS = ("filename", "format", "check-errors")


@dataclass
class CheckResult:
    """What ``qemu-img check`` reports, field for field.

    ``messages`` are the lines qemu-img prints to stderr while checking (in order,
    both passes of a repair).  ``error`` is set when the check could not complete
    (qemu-img prints ``Check failed: <error>`` and no figures; exit code 1).
    ``repaired`` is True when something was fixed and the figures come from the
    second, read-only check.
    """

    filename: str = ""
    format: str = "qcow2"
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
    messages: list[str] = field(default_factory=list)
    error: str | None = None
    repaired: bool = False

    @property
    def exit_code(self) -> int:
        """qemu-img's: 0 clean or all fixed, 1 not completed, 2 corruptions, 3 leaks only."""
        if self.error is not None or self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json(self) -> dict[str, Any]:
        """``qemu-img check --output=json`` as a dict: zero figures are left out, and the
        keys come in qemu-img's order."""
        values = {
            "filename": self.filename, "format": self.format, "check-errors": self.check_errors,
            "image-end-offset": self.image_end_offset, "corruptions": self.corruptions,
            "leaks": self.leaks, "corruptions-fixed": self.corruptions_fixed,
            "leaks-fixed": self.leaks_fixed, "total-clusters": self.total_clusters,
            "allocated-clusters": self.allocated_clusters,
            "fragmented-clusters": self.fragmented_clusters,
            "compressed-clusters": self.compressed_clusters,
        }
        return {k: values[k] for k in _JSON_ORDER if k in _ALWAYS or values[k]}

    def human(self) -> str:
        """qemu-img's human-readable stdout (``-r``'s repair summary included)."""
        lines: list[str] = []
        if self.repaired:
            lines += ["The following inconsistencies were found and repaired:", "",
                      f"    {self.leaks_fixed} leaked clusters",
                      f"    {self.corruptions_fixed} corruptions", "",
                      "Double checking the fixed image now..."]
        if self.error is not None:
            return "\n".join(lines) + "\n" if lines else ""
        if not (self.corruptions or self.leaks or self.check_errors):
            lines.append("No errors were found on the image.")
        else:
            if self.corruptions:
                lines += ["", f"{self.corruptions} errors were found on the image.",
                          "Data may be corrupted, or further writes to the image may "
                          "corrupt it."]
            if self.leaks:
                lines += ["", f"{self.leaks} leaked clusters were found on the image.",
                          "This means waste of disk space, but no harm to data."]
            if self.check_errors:
                lines += ["", f"{self.check_errors} internal errors have occurred during "
                              "the check."]
        if self.total_clusters and self.allocated_clusters:
            lines.append("%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed "
                         "clusters" % (self.allocated_clusters, self.total_clusters,
                                       self.allocated_clusters * 100.0 / self.total_clusters,
                                       self.fragmented_clusters * 100.0 / self.allocated_clusters,
                                       self.compressed_clusters * 100.0 / self.allocated_clusters))
        if self.image_end_offset:
            lines.append(f"Image end offset: {self.image_end_offset}")
        return "\n".join(lines) + "\n"

    def failure_message(self) -> str | None:
        """The line qemu-img ends with on stderr when the exit code is 1 (without prefix)."""
        if self.error is not None:
            return f"Check failed: {self.error}"
        if self.check_errors:
            return "Check failed"
        return None


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


class _Walk:
    """What one walk of an L2 table found, for the L1 entries that name it again.

    A walk that fixed nothing and hit no refcount overflow depends only on the table
    and the file size, so walking it again would find the same: its counters and
    messages are replayed, and its references are added all at once afterwards
    (:meth:`_Checker.add_references`).
    """

    def __init__(self, before: _Res, after: _Res, lines: list[str]) -> None:
        self.repeats = 0
        self.deltas = {name: getattr(after, name) - getattr(before, name)
                       for name in ("corruptions", "allocated_clusters",
                                    "fragmented_clusters", "compressed_clusters")}
        self.lines = lines

    def replay(self, checker: _Checker, res: _Res) -> None:
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


@dataclass
class _Res:
    """BdrvCheckResult."""

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

    def copy(self) -> _Res:
        return _Res(**self.__dict__)

    def add(self, other: _Res, allocation_info: bool) -> None:
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


def _c_string(raw: bytes) -> str:
    """A name as QEMU prints it: a C string, so it ends at the first NUL."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _c_hex(value: int) -> str:
    """C's ``%#x``: ``0`` for zero."""
    return f"{value:#x}" if value else "0"


class _CheckFailed(Exception):
    """The check cannot go on (QEMU returns -errno): qemu-img prints "Check failed: ..."."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.err = err


class _RefcountUnreadable(Exception):
    """A refcount block cannot be read: its table entry is unaligned, or it lies where
    QEMU cannot address (qcow2_get_refcount's -EIO)."""


class _SnapshotTableError(Exception):
    """The snapshot table cannot be read (message as QEMU words it)."""


@dataclass
class _SnapEntry:
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    extra_size: int  # as stored (before any truncation)
    raw: bytes  # the entry as a table holds it, extra data cut to 1024 bytes


def _read_snapshot_table(img: Image, offset: int, count: int, *, repair: bool = False,
                         dropped: list[str] | None = None) -> tuple[list[_SnapEntry], int]:
    """The raw snapshot table: its entries and its size in bytes (no tail padding).

    An entry with more than 1024 bytes of extra data fails the read, or with *repair*
    keeps the first 1024 (QEMU's message for each goes to *dropped*).
    """
    if count > 65536:
        raise _SnapshotTableError("Too many snapshots")
    entries: list[_SnapEntry] = []
    pos = 0  # where the next entry starts, relative to the table
    length = 0  # the table's length with extra data cut to 1024 bytes (QEMU's limit)
    for index in range(count):
        pos = align_up(pos, 8)
        length = align_up(length, 8)
        head = img.file.pread_exact(offset + pos, _SNAPSHOT_HEADER.size)
        fields = list(_SNAPSHOT_HEADER.unpack(head))
        l1_offset, l1_size, id_len, name_len = fields[:4]
        extra_len = fields[8]
        if extra_len > _MAX_SNAPSHOT_EXTRA:
            if not repair:
                raise _SnapshotTableError(f"Too much extra metadata in snapshot table entry {index}")
            if dropped is not None:
                dropped.append(f"Discarding too much extra metadata in snapshot table entry "
                               f"{index} ({extra_len} > {_MAX_SNAPSHOT_EXTRA})")
        kept = min(extra_len, _MAX_SNAPSHOT_EXTRA)
        pos += _SNAPSHOT_HEADER.size
        extra = img.file.pread_exact(offset + pos, kept)
        pos += extra_len
        names = img.file.pread_exact(offset + pos, id_len + name_len)
        id_raw, name_raw = names[:id_len], names[id_len:]
        pos += id_len + name_len
        length += _SNAPSHOT_HEADER.size + kept + id_len + name_len
        if length > _MAX_SNAPSHOTS_SIZE or pos > (1 << 31) - 1:
            raise _SnapshotTableError("Snapshot table is too big")
        fields[8] = kept
        raw = _SNAPSHOT_HEADER.pack(*fields) + extra + id_raw + name_raw
        entries.append(_SnapEntry(l1_offset, l1_size, _c_string(id_raw), _c_string(name_raw),
                                  extra_len, raw))
    return entries, pos


# ------------------------------------------------------------------------------------
# The checker


class _Checker:
    """One run of QEMU's check (``qcow2_co_check_locked``) with a given fix mode.

    Caller holds: the image exclusively; metadata caches flushed.  Refcount blocks
    are read through the image's refcount cache and L2 tables through its L2 cache
    (cluster-aligned tables inside the file; others straight from the file, as QEMU
    reads them), each under the locks the lock order allows.
    """

    def __init__(self, img: Image, fix: int, messages: list[str], *,
                 refuse_beyond_end: bool = False) -> None:
        self.img = img
        self.fix = fix
        self.out = messages
        self.refuse_beyond_end = refuse_beyond_end
        hdr = img.header
        self.cs = img.cluster_size
        self.cb = img.cluster_bits
        self.max_refcount = (1 << hdr.refcount_bits) - 1
        self.file_len = img.file.size()
        self.snapshots: list[_SnapEntry] = []
        self.snapshots_offset = 0
        self.snapshots_size = 0
        self.imrt = array(_COUNTER)
        self.overflows = 0  # references that found their refcount at its maximum
        self.omitted = 0    # repeated messages counted instead of printed
        self.rebuild = False
        self.signaled_corruption = False
        self.l2_cache_stale = False
        self.writable = not img.readonly
        shift, self.coffset_mask, self.csize_mask = compressed_geometry(self.cb)
        self.csize_shift = shift

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
            self.img._flush_everything()
        self.img.l2_cache.clear()
        self.l2_cache_stale = False

    # Whole check ------------------------------------------------------------------
    def run(self) -> _Res:
        """qcow2_co_check_locked(); raises _CheckFailed when QEMU returns -errno."""
        self.drop_l2_cache()
        result = _Res()
        snapshot_res = _Res()
        try:
            self.check_read_snapshot_table(snapshot_res)
        except _CheckFailed:
            result.add(snapshot_res, False)
            raise
        refcount_res = _Res()
        try:
            self.check_refcounts(refcount_res)
        finally:
            result.add(refcount_res, True)
        self.check_fix_snapshot_table(snapshot_res)
        result.add(snapshot_res, False)
        if self.fix and result.check_errors == 0 and result.corruptions == 0:
            self.mark_clean_and_consistent()
        return result

    # Snapshot table -----------------------------------------------------------------
    def check_read_snapshot_table(self, res: _Res) -> None:
        img = self.img
        raw = img.file.pread_exact(OFF_NB_SNAPSHOTS, 12)
        count, offset = struct.unpack(">IQ", raw)
        self.snapshots_offset, self.snapshots = offset, []
        if count and (offset % self.cs or offset > (1 << 63) - 1 - count * 40
                      or count > 65536):
            res.check_errors += 1
            self.msg("ERROR snapshot table offset invalid" if count <= 65536
                     else "ERROR snapshot table too large")
            self.snapshots_offset = 0
            raise _CheckFailed(errno.EFBIG if count > 65536 else errno.EINVAL)
        dropped: list[str] = []
        try:
            entries, size = _read_snapshot_table(img, offset, count, dropped=dropped,
                                                 repair=bool(self.fix & FIX_ERRORS))
        except _SnapshotTableError as exc:
            res.check_errors += 1
            self.msg(f"ERROR failed to read the snapshot table: {exc}")
            if str(exc).startswith("Too much extra metadata"):
                self.msg("You can force-remove this extra metadata with qemu-img check -r all")
            self.snapshots_offset = 0
            raise _CheckFailed(errno.EFBIG) from None
        self.snapshots, self.snapshots_size = entries, size
        for line in dropped:
            self.msg(line)
        res.corruptions += len(dropped)
        if img.header.version >= 3:
            for i, snap in enumerate(entries):
                if snap.extra_size < 16:
                    res.corruptions += 1
                    self.msg(f"{'Repairing' if self.fix & FIX_ERRORS else 'ERROR'} snapshot "
                             f"table entry {i} is incomplete")

    def check_fix_snapshot_table(self, res: _Res) -> None:
        """Rewrite the snapshot table (24 bytes of extra data each) when it was damaged."""
        if not (res.corruptions and self.fix & FIX_ERRORS):
            return
        from .snapshot import parse_table, serialize_table
        img = self.img
        table = bytearray()
        for entry in self.snapshots:
            table += bytes(-len(table) % 8) + entry.raw
        snapshots = parse_table(bytes(table), len(self.snapshots))
        for snap in snapshots:
            if snap.disk_size is None:  # QEMU takes the current size for a short entry
                snap.disk_size = img.header.size
        img.snapshot_table = snapshots
        data = serialize_table(snapshots)
        offset = 0
        if data:
            with img._alloc_lock:
                offset = img.refcounts.alloc_contiguous(div_round_up(len(data), self.cs))
            self.sync_refcounts()
            if not self.pre_write_overlap_check(offset, len(data)):
                res.check_errors += 1
                self.msg(f"ERROR failed to update snapshot table: {os.strerror(errno.EIO)}")
                raise _CheckFailed(errno.EIO)
            img.file.pwrite(offset, data)
            img.file.flush()
        img.file.pwrite(OFF_NB_SNAPSHOTS, struct.pack(">IQ", len(img.snapshot_table), offset))
        img.file.flush()
        old_offset, old_size = self.snapshots_offset, self.snapshots_size
        img.header.nb_snapshots, img.header.snapshots_offset = len(img.snapshot_table), offset
        if old_size:
            first, last = old_offset >> self.cb, (old_offset + old_size - 1) >> self.cb
            cache: dict[int, array | None] = {}
            try:
                in_use = all(self.stored_refcount(c, cache) for c in range(first, last + 1))
            except _RefcountUnreadable:
                in_use = False
            if in_use:
                with img._alloc_lock:
                    img.refcounts.free_later(first, last - first + 1)
            else:  # QEMU's update_refcount() refuses, and undoes what it did
                self.msg(f"qcow2_free_clusters failed: {os.strerror(errno.EINVAL)}")
        self.drop_l2_cache()
        res.corruptions_fixed += res.corruptions
        res.corruptions = 0

    def mark_clean_and_consistent(self) -> None:
        """qcow2_mark_clean() and qcow2_mark_consistent(): clear the dirty and corrupt bits."""
        img = self.img
        features = img.header.incompatible_features
        if features & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT):
            img._flush_everything()
            img._write_incompatible(features & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT))
            self.drop_l2_cache()

    # Refcounts ------------------------------------------------------------------------
    def check_refcounts(self, res: _Res) -> None:
        """qcow2_check_refcounts()."""
        img = self.img
        self.file_len = img.file.size()
        nb_clusters = div_round_up(self.file_len, self.cs)
        res.total_clusters = div_round_up(img.header.size // 512 * 512, self.cs)
        self.imrt = array(_COUNTER, bytes(4 * nb_clusters))
        self.rebuild = False
        self.calculate_refcounts(res, self.fix)
        pre_compare = res.copy()
        highest = self.compare_refcounts(res, 0)
        if self.rebuild and self.fix & FIX_ERRORS:
            old = res.copy()
            fresh_leaks = 0
            self.msg("Rebuilding refcount structure")
            self.rebuild_refcount_structure(res)
            res.corruptions = 0
            res.leaks = 0
            self.rebuild = False
            self.imrt = array(_COUNTER, bytes(4 * len(self.imrt)))
            self.calculate_refcounts(res, 0)
            if self.fix & FIX_LEAKS:
                saved = res.copy()
                scratch = _Res()
                highest = self.compare_refcounts(scratch, FIX_LEAKS)
                if self.rebuild:
                    self.msg("ERROR rebuilt refcount structure is still broken")
                fresh_leaks = scratch.leaks
                res.__dict__.update(saved.__dict__)
            if res.corruptions < old.corruptions:
                res.corruptions_fixed += old.corruptions - res.corruptions
            if res.leaks < old.leaks:
                res.leaks_fixed += old.leaks - res.leaks
            res.leaks += fresh_leaks
        elif self.fix:
            if self.rebuild:
                self.msg("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise _CheckFailed(errno.EIO)
            if res.leaks or res.corruptions:
                res.__dict__.update(pre_compare.__dict__)
                highest = self.compare_refcounts(res, self.fix)
        self.check_oflag_copied(res)
        res.image_end_offset = (highest + 1) * self.cs

    # The in-memory refcount table -------------------------------------------------------
    def inc(self, res: _Res, offset: int, size: int) -> None:
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

    def grow_imrt(self, res: _Res | None, size: int) -> None:
        """realloc_refcount_array(): at least *size* counters (ENOMEM fails the check)."""
        if size <= len(self.imrt):
            return
        try:
            self.imrt.extend(array(_COUNTER, bytes(4 * (size - len(self.imrt)))))
        except (MemoryError, OverflowError):
            if res is not None:
                res.check_errors += 1
            raise _CheckFailed(errno.ENOMEM) from None

    def pread(self, offset: int, length: int) -> bytes:
        """Read like bdrv_pread(): zeros past the end of the file, EIO past QEMU's limit."""
        if offset < 0 or offset + length > _MAX_IO_END:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return self.img.file.pread_exact(offset, length)

    def calculate_refcounts(self, res: _Res, fix: int) -> None:
        """calculate_refcounts(): fill the IMRT from every structure of the image."""
        img, cs = self.img, self.cs
        hdr = img.header
        self.inc(res, 0, cs)
        self.inactive_walks: dict[int, _Walk] = {}
        self.check_refcounts_l1(res, hdr.l1_table_offset, hdr.l1_size, True, fix)
        walks: dict[tuple[int, int], _Walk] = {}  # snapshot L1 tables, as for L2 tables
        walked = _ByteRanges()  # the file bytes of the snapshot L1 tables walked
        for snap in self.snapshots:
            if snap.l1_table_offset % cs:
                self.msg(f"ERROR snapshot {snap.id_str} ({snap.name}) "
                         f"l1_offset={snap.l1_table_offset:#x}: L1 table is not cluster "
                         "aligned; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            if snap.l1_size > MAX_L1_SIZE // 8:
                self.msg(f"ERROR snapshot {snap.id_str} ({snap.name}) l1_size={snap.l1_size:#x}: "
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
                self.msg(f"ERROR snapshot {snap.id_str} ({snap.name}) "
                         f"l1_offset={snap.l1_table_offset:#x}: L1 table overlaps another "
                         "snapshot's; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            walked.add(snap.l1_table_offset, snap.l1_size * 8)
            before, lines, overflows = res.copy(), len(self.out), self.overflows
            self.check_refcounts_l1(res, snap.l1_table_offset, snap.l1_size, False, fix)
            if (res.corruptions_fixed == before.corruptions_fixed and self.overflows == overflows
                    and res.check_errors == before.check_errors):
                walks[key] = _Walk(before, res, self.out[lines:])
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
        self.check_bitmaps_refcounts(res)
        self.check_refblocks(res, fix)

    def cacheable(self, offset: int) -> bool:
        """True for L2 tables read through the L2 cache (aligned, inside the file)."""
        return offset % self.cs == 0 and offset + self.cs <= self.file_len

    def read_table(self, offset: int) -> array:
        """A copy of the L2 table at *offset* (through the cache when it can be cached)."""
        img = self.img
        if self.cacheable(offset):
            return img.l2_cache.copy_of(offset)
        return table_from_bytes(img.file.pread_exact(offset, self.cs))

    def overlaps_metadata(self, offset: int, size: int, ignore: str = "") -> str | None:
        """qcow2_check_metadata_overlap() with QEMU's default checks ("cached": all but
        inactive L2 tables): the metadata [offset, offset+size) would overwrite, as the
        header and tables name it (not as the refcounts say), except *ignore*."""
        img, cs = self.img, self.cs
        hdr = img.header
        if offset < cs:
            return "qcow2_header"
        lo = offset & ~(cs - 1)
        hi = align_up(offset + size, cs)

        def hit(start: int, length: int) -> bool:
            return length > 0 and start < hi and lo < start + length

        checks = (
            ("active L1 table", lambda: hit(hdr.l1_table_offset, hdr.l1_size * 8)),
            ("refcount table", lambda: hit(hdr.refcount_table_offset,
                                           hdr.refcount_table_clusters * cs)),
            ("snapshot table", lambda: hit(self.snapshots_offset, self.snapshots_size)),
            ("inactive L1 table", lambda: any(hit(s.l1_table_offset, s.l1_size * 8)
                                              for s in self.snapshots)),
            ("active L2 table", lambda: any(hit(e & L1E_OFFSET_MASK, cs) for e in img.l1
                                            if e & L1E_OFFSET_MASK)),
            ("refcount block", lambda: any(hit(e & REFT_OFFSET_MASK, cs)
                                           for e in img.refcounts.reftable
                                           if e & REFT_OFFSET_MASK)),
        )
        for name, overlaps in checks:
            if name != ignore and overlaps():
                return name
        return None

    def pre_write_overlap_check(self, offset: int, size: int, ignore: str = "") -> bool:
        """qcow2_pre_write_overlap_check(): False (image marked corrupt) on an overlap."""
        name = self.overlaps_metadata(offset, size, ignore)
        if name is None:
            return True
        self.signal_corruption(f"Preventing invalid write on metadata (overlaps with {name})")
        return False

    def check_refcounts_l1(self, res: _Res, l1_offset: int, l1_size: int, active: bool,
                           fix: int) -> None:
        """check_refcounts_l1(): the L1 table, its L2 tables and what they reference."""
        if not l1_size:
            return
        self.inc(res, l1_offset, l1_size * 8)
        try:
            if l1_offset < 0 or l1_offset + l1_size * 8 > _MAX_IO_END:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            # Past the end of the file the table reads as zeros, entries that name
            # nothing: only the part inside the file is read and walked.
            in_file = min(l1_size * 8, max(0, self.file_len - l1_offset)) // 8 * 8
            l1 = table_from_bytes(self.pread(l1_offset, in_file))
        except OSError as exc:
            self.msg("ERROR: I/O error in check_refcounts_l1")
            res.check_errors += 1
            raise _CheckFailed(exc.errno or errno.EIO) from None
        # Snapshot tables share one record of L2 walks (they name the same L2 tables,
        # as every snapshot QEMU takes does); flushed by calculate_refcounts.
        walks: dict[int, _Walk] = {} if active else self.inactive_walks
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
                walks[l2_offset] = _Walk(before, res, self.out[lines:])
        if active:
            self.flush_walks(res, walks)

    def flush_walks(self, res: _Res, walks: dict[int, _Walk]) -> None:
        """Add the references of the L2 tables named again since their walk."""
        for l2_offset, walk in walks.items():
            if walk.repeats:
                self.add_references(res, l2_offset, walk.repeats)
                walk.repeats = 0
        if self.omitted:
            self.msg(f"(and {self.omitted} more messages repeating the above for L2 tables "
                     "that several L1 entries name)")
            self.omitted = 0

    def add_l1_references(self, res: _Res, l1_offset: int, l1_size: int, times: int) -> None:
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

    def add_references(self, res: _Res, l2_offset: int, times: int) -> None:
        """Count what L2 table *l2_offset* references *times* more times at once.

        What *times* more walks of an unchanged table add to the in-memory refcounts
        (their other findings are replayed by :class:`_Walk`): the total is what QEMU
        reaches walking the table once per L1 entry, overflows included, in time
        bounded by the table instead of by L1 entries x L2 entries.
        """
        for entry in self.read_table(l2_offset):
            if not entry:
                continue
            if entry & QCOW_OFLAG_COMPRESSED:
                coffset = entry & self.coffset_mask
                sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
                offset, size = coffset, sectors * 512 - (coffset & 511)
            else:
                offset, size = entry & L2E_OFFSET_MASK, self.cs
                if not offset:
                    continue
            self.add_times(res, offset, size, times)

    def add_times(self, res: _Res, offset: int, size: int, times: int) -> None:
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

    def check_refcounts_l2(self, res: _Res, l2_offset: int, active: bool, fix: int) -> None:
        """check_refcounts_l2(): count what one L2 table references, checking its entries."""
        cs, cb = self.cs, self.cb
        cs_mask = cs - 1
        table = self.read_table(l2_offset)
        imrt = self.imrt
        max_refcount = self.max_refcount
        file_len = self.file_len
        next_contiguous = 0
        for i, entry in enumerate(table):
            if not entry:
                continue
            if entry & QCOW_OFLAG_COMPRESSED:
                if entry & QCOW_OFLAG_COPIED:
                    self.msg(f"ERROR: coffset={entry & self.coffset_mask:#x}: copied flag must "
                             "never be set for compressed clusters")
                    entry &= ~QCOW_OFLAG_COPIED
                    res.corruptions += 1
                coffset = entry & self.coffset_mask
                sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
                self.inc(res, coffset, sectors * 512 - (coffset & 511))
                if active:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1
                continue
            if entry & L2E_STD_RESERVED_MASK:
                self.msg(f"ERROR found l2 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            offset = entry & L2E_OFFSET_MASK
            if not offset:
                continue  # unallocated, or a plain zero cluster
            if offset & cs_mask:
                res.corruptions += 1
                if entry & QCOW_OFLAG_ZERO:
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
            cluster = offset >> cb
            if (not offset & cs_mask and offset + cs - file_len < cs and cluster < len(imrt)
                    and imrt[cluster] < max_refcount):
                imrt[cluster] += 1  # the common case of inc(), inline
            else:
                self.inc(res, offset, cs)

    def fix_l2_entry_by_zero(self, res: _Res, l2_offset: int, index: int) -> bool:
        """fix_l2_entry_by_zero(): make the entry a plain zero cluster; True when done."""
        img = self.img
        if not self.pre_write_overlap_check(l2_offset + index * 8, 8, "active L2 table"):
            self.msg("ERROR: Overlap check failed")
            res.check_errors += 1
            raise _CheckFailed(errno.EIO)
        try:
            if self.cacheable(l2_offset):
                entry_obj = img.l2_cache.get(l2_offset)
                try:
                    with entry_obj.lock:
                        entry_obj.table[index] = QCOW_OFLAG_ZERO
                        entry_obj.dirty = True
                finally:
                    img.l2_cache.put(entry_obj)
                img._flush_everything()
            else:
                img.file.pwrite(l2_offset + index * 8, struct.pack(">Q", QCOW_OFLAG_ZERO))
                img.file.flush()
        except OSError as exc:
            self.msg(f"ERROR: Failed to overwrite L2 table entry: {exc.strerror}")
            res.check_errors += 1
            return False
        res.corruptions -= 1
        res.corruptions_fixed += 1
        return True

    def check_bitmaps_refcounts(self, res: _Res) -> None:
        """qcow2_check_bitmaps_refcounts(): the bitmap directory, tables and data."""
        img, cs = self.img, self.cs
        hdr = img.header
        if not hdr.autoclear_features & AUTOCLEAR_BITMAPS:
            return  # QEMU ignores (and will not count) bitmaps another program invalidated
        ext = next((e for e in hdr.extensions if e.magic == EXT_BITMAPS), None)
        if ext is None or len(ext.data) < 24:
            return
        count, _, dir_size, dir_offset = struct.unpack_from(">IIQQ", ext.data, 0)
        if not count:
            return
        self.inc(res, dir_offset, dir_size)
        if dir_size > _MAX_BITMAP_DIRECTORY:
            res.corruptions += 1
            raise _CheckFailed(errno.EINVAL)
        try:
            buf = self.pread(dir_offset, dir_size)
        except OSError:
            res.corruptions += 1
            raise _CheckFailed(errno.EINVAL) from None
        pos = 0
        tables = []
        for _ in range(count):
            if pos + _BITMAP_DIR_ENTRY.size > len(buf):
                res.corruptions += 1
                raise _CheckFailed(errno.EINVAL)
            (table_offset, table_size, _, _, _, name_size,
             extra) = _BITMAP_DIR_ENTRY.unpack_from(buf, pos)
            tables.append((table_offset, table_size))
            pos = align_up(pos + _BITMAP_DIR_ENTRY.size + extra + name_size, 8)
        for table_offset, table_size in tables:
            self.inc(res, table_offset, table_size * 8)
            try:
                bitmap_table = table_from_bytes(self.pread(table_offset, table_size * 8))
            except OSError:
                res.corruptions += 1
                break
            for entry in bitmap_table:
                offset = entry & _BME_OFFSET_MASK
                bad_offset = offset and (entry & _BME_ALL_ONES or offset % cs)
                if entry & _BME_RESERVED_MASK or bad_offset:
                    res.corruptions += 1
                    continue
                if offset:
                    self.inc(res, offset, cs)

    def check_refblocks(self, res: _Res, fix: int) -> None:
        """check_refblocks(): every refcount block is used once, inside the file, aligned."""
        img, cs, cb = self.img, self.cs, self.cb
        reftable = img.refcounts.reftable
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
                        img.file.truncate(offset + cs)
                        img.file.flush()
                    except OSError as exc:
                        self.rebuild = True
                        self.msg(f"Could not resize file: {exc.strerror}")
                        self.msg(f"ERROR could not resize image: {exc.strerror}")
                        continue
                    self.file_len = img.file.size()
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

    # Stored refcounts ------------------------------------------------------------------
    def stored_block(self, index: int) -> array | None:
        """A copy of the stored refcounts of block *index* (None: no block, all 0).

        Raises _RefcountUnreadable where qcow2_get_refcount() fails.
        """
        refs = self.img.refcounts
        table = refs.reftable
        if index >= len(table):
            return None
        offset = table[index] & REFT_OFFSET_MASK
        if not offset:
            return None
        if offset % self.cs:
            self.signal_corruption(f"Refblock offset {offset:#x} unaligned (reftable index: "
                                   f"{_c_hex(index)})")
            raise _RefcountUnreadable()
        if offset + self.cs > _MAX_IO_END:
            raise _RefcountUnreadable()
        with self.img._alloc_lock:
            entry = refs.cache.get(offset)
            try:
                return array(entry.table.values.typecode, entry.table.values)
            finally:
                refs.cache.put(entry)

    def signal_corruption(self, message: str) -> None:
        """qcow2_signal_corruption() of a fatal event: a writable image is marked corrupt
        (incompatible bit 1); one message per run."""
        img = self.img
        if self.signaled_corruption and (not self.writable or img.header.corrupt):
            return
        self.signaled_corruption = True
        if self.writable:
            self.msg(f"qcow2: Marking image as corrupt: {message}; further corruption events "
                     "will be suppressed")
            img._write_incompatible(img.header.incompatible_features | INCOMPAT_CORRUPT)
            self.drop_l2_cache()
        else:
            self.msg(f"qcow2: Image is corrupt: {message}; further non-fatal corruption events "
                     "will be suppressed")

    def stored_refcount(self, cluster: int, cache: dict[int, array | None]) -> int:
        """The stored refcount of *cluster* (blocks kept in *cache*); may raise."""
        bits = self.img.refcounts.block_bits
        index = cluster >> bits
        if index not in cache:
            if len(cache) > 64:
                cache.clear()
            cache[index] = self.stored_block(index)
        values = cache[index]
        return 0 if values is None else values[cluster & ((1 << bits) - 1)]

    def compare_refcounts(self, res: _Res, fix: int) -> int:
        """compare_refcounts(): stored refcounts against the IMRT; returns the highest
        cluster in use (either side)."""
        img = self.img
        imrt = self.imrt
        nb_clusters = len(imrt)
        bits = img.refcounts.block_bits
        per_block = 1 << bits
        highest = 0
        for index in range(div_round_up(nb_clusters, per_block)):
            base = index << bits
            end = min(base + per_block, nb_clusters)
            try:
                values = self.stored_block(index)
            except _RefcountUnreadable:
                for i in range(base, end):
                    self.msg(f"Can't get refcount for cluster {i}: {os.strerror(errno.EIO)}")
                    res.check_errors += 1
                continue
            for i in range(base, end):
                refcount1 = values[i - base] if values is not None else 0
                refcount2 = imrt[i]
                if refcount1 or refcount2:
                    highest = i
                if refcount1 == refcount2:
                    continue
                fixed = None
                if refcount1 == 0:
                    self.rebuild = True
                elif refcount1 > refcount2 and fix & FIX_LEAKS:
                    fixed = "leaks_fixed"
                elif refcount1 < refcount2 and fix & FIX_ERRORS:
                    fixed = "corruptions_fixed"
                word = "Repairing" if fixed else "ERROR" if refcount1 < refcount2 else "Leaked"
                self.msg(f"{word} cluster {i} refcount={refcount1} reference={refcount2}")
                if fixed and self.update_refcount(i, refcount2 - refcount1):
                    setattr(res, fixed, getattr(res, fixed) + 1)
                    continue
                if refcount1 < refcount2:
                    res.corruptions += 1
                else:
                    res.leaks += 1
        if self.l2_cache_stale:
            self.drop_l2_cache()
        return highest

    def update_refcount(self, cluster: int, delta: int) -> bool:
        """Change a stored refcount by *delta* and write it back; False on failure."""
        img = self.img
        try:
            with img._alloc_lock:
                refs = img.refcounts
                if refs.increment(cluster, delta) == 0 and cluster < refs.free_hint:
                    refs.free_hint = cluster  # free again: the allocator may hand it out
                refs.flush()
            img.file.flush()
        except (Qcow2Error, OSError):
            return False
        self.l2_cache_stale = True
        return True

    def sync_refcounts(self) -> None:
        """Write the refcount blocks and table back and sync (also with lazy refcounts)."""
        with self.img._alloc_lock:
            self.img.refcounts.flush()
        self.img.file.flush()

    # OFLAG_COPIED ---------------------------------------------------------------------
    def check_oflag_copied(self, res: _Res) -> None:
        """check_oflag_copied(): COPIED set exactly where the refcount is 1 (active tables)."""
        img, fix = self.img, self.fix
        if fix & FIX_ERRORS:
            repair = True
        elif fix & FIX_LEAKS:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        cache: dict[int, array | None] = {}
        cb = self.cb
        seen: dict[int, _Walk] = {}  # L2 tables checked unchanged: replayed, not re-read
        for i in range(len(img.l1)):
            l1_entry = img.l1[i]
            l2_offset = l1_entry & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            try:
                refcount = self.stored_refcount(l2_offset >> cb, cache)
            except _RefcountUnreadable:
                continue
            if (refcount == 1) != bool(l1_entry & QCOW_OFLAG_COPIED):
                res.corruptions += 1
                self.msg(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED L2 cluster: "
                         f"l1_index={i} l1_entry={l1_entry:x} refcount={refcount}")
                if repair:
                    new = (l1_entry | QCOW_OFLAG_COPIED if refcount == 1
                           else l1_entry & ~QCOW_OFLAG_COPIED)
                    where = img.header.l1_table_offset + 8 * i
                    if not self.pre_write_overlap_check(where, 8, "active L1 table"):
                        res.check_errors += 1
                        raise _CheckFailed(errno.EIO)
                    with img._l1_lock:
                        img.l1[i] = new
                        img.l1_dirty.add(i)
                    img._flush_everything()
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            walk = seen.get(l2_offset)
            if walk is not None:
                walk.repeats += 1
                walk.replay(self, res)
                continue
            before, lines = res.copy(), len(self.out)
            table = self.read_table(l2_offset)
            changes: dict[int, int] = {}
            for j, entry in enumerate(table):
                if not entry & L2E_OFFSET_MASK or entry & QCOW_OFLAG_COMPRESSED:
                    continue  # only normal and allocated zero clusters
                try:
                    refcount = self.stored_refcount((entry & L2E_OFFSET_MASK) >> cb, cache)
                except _RefcountUnreadable:
                    continue
                if (refcount == 1) != bool(entry & QCOW_OFLAG_COPIED):
                    res.corruptions += 1
                    self.msg(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED data "
                             f"cluster: l2_entry={entry:x} refcount={refcount}")
                    if repair:
                        changes[j] = (entry | QCOW_OFLAG_COPIED if refcount == 1
                                      else entry & ~QCOW_OFLAG_COPIED)
            if changes:
                if not self.pre_write_overlap_check(l2_offset, self.cs, "active L2 table"):
                    self.msg("ERROR: Could not write L2 table; metadata overlap check failed: "
                             f"{os.strerror(errno.EIO)}")
                    res.check_errors += 1
                    raise _CheckFailed(errno.EIO)
                self.write_l2_entries(l2_offset, table, changes)
                res.corruptions -= len(changes)
                res.corruptions_fixed += len(changes)
            else:
                seen[l2_offset] = _Walk(before, res, self.out[lines:])
        if self.omitted:
            self.msg(f"(and {self.omitted} more messages repeating the above for L2 tables "
                     "that several L1 entries name)")
            self.omitted = 0

    def write_l2_entries(self, l2_offset: int, table: array, changes: dict[int, int]) -> None:
        """Write changed entries of an L2 table (through the cache when it can be cached)."""
        img = self.img
        if self.cacheable(l2_offset):
            entry_obj = img.l2_cache.get(l2_offset)
            try:
                with entry_obj.lock:
                    for j, value in changes.items():
                        entry_obj.table[j] = value
                    entry_obj.dirty = True
            finally:
                img.l2_cache.put(entry_obj)
            img._flush_everything()
            return
        for j, value in changes.items():
            table[j] = value
        img.file.pwrite(l2_offset, table_to_bytes(table))
        img.file.flush()

    # Rebuilding the refcount structures -----------------------------------------------
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
        img, cs, cb = self.img, self.cs, self.cb
        bits = img.refcounts.block_bits
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
                raise _CheckFailed(errno.EIO)
            block = RefBlock.empty(img.header.refcount_bits, per_block)
            segment = self.imrt[start:start + per_block]
            block.values[:len(segment)] = array(block.values.typecode, segment)
            img.file.pwrite(block_offset, block.to_bytes())
            cluster = start + per_block
        return grown

    def rebuild_refcount_structure(self, res: _Res) -> None:
        """rebuild_refcount_structure(): new blocks and table from the IMRT, then the header.

        Nothing referenced is overwritten: every new cluster is free in the IMRT.  The
        old structures are left for the leak repair that follows.
        """
        img, cs = self.img, self.cs
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
                raise _CheckFailed(errno.EIO)
            img.file.pwrite(table_offset, table_to_bytes(array("Q", reftable)))
            img.file.flush()
            img.file.pwrite(OFF_REFCOUNT_TABLE_OFFSET, struct.pack(">QI", table_offset, clusters))
            img.file.flush()
        except _CheckFailed:
            res.check_errors += 1
            raise
        except OSError as exc:
            self.msg(f"ERROR writing refblock: {exc.strerror}")
            res.check_errors += 1
            raise _CheckFailed(exc.errno or errno.EIO) from None
        hdr = img.header
        hdr.refcount_table_offset, hdr.refcount_table_clusters = table_offset, clusters
        old = img.refcounts
        img.refcounts = RefcountManager(img.file, hdr, old.cache.capacity, old.in_use)
        self.file_len = img.file.size()
        self.drop_l2_cache()


# ------------------------------------------------------------------------------------
# Entry points


def _flush_for_check(img: Image) -> None:
    if not img.readonly:
        img._flush_everything()


def check_image(img: Image, repair: str | None) -> CheckResult:
    """Check *img* as ``qemu-img check [-r leaks|all]`` does and return the result.

    With a repair, the image is checked again afterwards when anything was fixed, and
    the result holds that second check's figures with the first one's fixed counts.
    Caller holds: the image exclusively (``Image.check`` takes it).
    """
    fix = REPAIR_MODES[repair]
    if fix and img.readonly:
        raise Qcow2Error(f"'{img.path}' is open read-only: cannot repair")
    result = CheckResult(filename=img.path)
    _flush_for_check(img)
    try:
        first = _Checker(img, fix, result.messages).run()
    except _CheckFailed as exc:
        result.error = str(exc)
        _flush_for_check(img)
        return result
    _flush_for_check(img)
    final = first
    if first.corruptions_fixed or first.leaks_fixed:
        result.repaired = True
        try:
            final = _Checker(img, 0, result.messages).run()
        except _CheckFailed as exc:
            result.error = str(exc)
        final.corruptions_fixed, final.leaks_fixed = first.corruptions_fixed, first.leaks_fixed
    for name in ("corruptions", "leaks", "check_errors", "corruptions_fixed", "leaks_fixed",
                 "image_end_offset", "total_clusters", "allocated_clusters",
                 "fragmented_clusters", "compressed_clusters"):
        setattr(result, name, getattr(final, name))
    return result


def rebuild_refcounts(img: Image) -> None:
    """Repair the refcounts of a dirty image from the references, as QEMU does on open.

    One check pass with every fix (QEMU's ``qcow2_co_check_locked(..., FIX_ERRORS |
    FIX_LEAKS)``): refcounts that are too high or too low are corrected in place, and
    when a referenced cluster has refcount 0 the refcount structures are rebuilt from
    the references (new blocks and table in unreferenced clusters, header switched
    last) and the old ones freed.  Nothing that is referenced is overwritten.  Raises
    :class:`CorruptImage` when the repair cannot complete, and (unlike QEMU, which
    would later allocate over them) when a table references clusters past the end of
    the file; that is found while counting, before any refcount is changed.
    Caller holds: the image exclusively; metadata caches flushed.
    """
    messages: list[str] = []
    try:
        res = _Checker(img, FIX_ALL, messages, refuse_beyond_end=True).run()
    except _CheckFailed as exc:
        raise CorruptImage(f"Could not repair dirty image: {exc}") from None
    if res.check_errors:
        raise CorruptImage("Could not repair dirty image: " + "; ".join(messages[-3:]))
    img._flush_everything()


def open_for_check(path: str | os.PathLike[str], *, repair: bool,
                   force_share: bool = False) -> Image:
    """Open an image the way ``qemu-img check`` does (QEMU's BDRV_O_CHECK).

    Read-only without *repair* (``force_share`` as ``-U``).  With it, read-write but
    without what a normal read-write open does first: a dirty image is not repaired
    on open (the check reports and repairs it), the corrupt bit does not refuse the
    open, and autoclear bits are kept.  Either way a snapshot table that cannot be
    read does not refuse the open: the check reports it (and ``-r all`` repairs what
    QEMU repairs).
    """
    from .image import open_image

    return open_image(path, readonly=not repair, force_share=force_share and not repair,
                      check_mode=True)
