"""Checking and repairing an image, as ``qemu-img check`` does.

The reference count of a host cluster is the number of places that point to it:
the header (cluster 0), the refcount table and blocks, the active and snapshot L1
tables, every L2 table they name (once per L1 entry naming it), every data cluster
those L2 tables name (once per L2 entry; a compressed cluster counts once on each
host cluster its data touches), the snapshot table, the LUKS header area of an
encrypted image and the persistent bitmaps.  Comparing that count with the stored
refcounts is what ``qemu-img check`` does.

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
refuse (its metadata overlap check, :mod:`qcow2rw.overlap`) are refused the same way,
marking the image corrupt.  :func:`qcow2rw.image.open_for_check` opens an image as ``qemu-img
check`` does, and :func:`rebuild_refcounts` is the repair a read-write open runs on a
dirty image.

Step 2 and the rebuild of step 3 (the IMRT) are :mod:`qcow2rw.rebuild`; this module
reads the snapshot table, compares, repairs and reports.  Memory: the IMRT holds one
32-bit counter per host cluster of the file.
"""

from __future__ import annotations

import errno
import os
from array import array
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import CorruptImage, FormatError, Qcow2Error
from .format import (INCOMPAT_CORRUPT, INCOMPAT_DIRTY, L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_ZERO,
                     MAX_SNAPSHOTS, OFF_NB_SNAPSHOTS, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED,
                     REFT_OFFSET_MASK, SNAPSHOT_HEADER, SNAPSHOTS_POINTER, div_round_up,
                     read_snapshot_table, serialize_snapshot_table, l2_table_to_bytes,
                     with_copied)
from .overlap import ACTIVE_L1, ACTIVE_L2
from .rebuild import (FIX_ALL, FIX_ERRORS, FIX_LEAKS, MAX_IO_END, CheckCounts, CheckFailed,
                      RefcountRebuild, Walk)
from .state import ImageState, StateOwner, state_of
from .writeback import flush_everything


__all__ = ["FIX_ALL", "FIX_ERRORS", "FIX_LEAKS", "REPAIR_MODES", "CheckResult", "check_image",
           "rebuild_refcounts"]

REPAIR_MODES = {None: 0, "leaks": FIX_LEAKS, "all": FIX_ALL}


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
class CheckResult(CheckCounts):
    """What ``qemu-img check`` reports, field for field: the figures
    (:class:`~qcow2rw.rebuild.CheckCounts`), and the following.

    ``messages`` are the lines qemu-img prints to stderr while checking (in order,
    both passes of a repair).  ``error`` is set when the check could not complete
    (qemu-img prints ``Check failed: <error>`` and no figures; exit code 1).
    ``repaired`` is True when something was fixed and the figures come from the
    second, read-only check.
    """

    filename: str = ""
    format: str = "qcow2"
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


def _c_hex(value: int) -> str:
    """C's ``%#x``: ``0`` for zero."""
    return f"{value:#x}" if value else "0"


class _RefcountUnreadable(Exception):
    """A refcount block cannot be read: its table entry is unaligned, or it lies where
    QEMU cannot address (qcow2_get_refcount's -EIO)."""


# ------------------------------------------------------------------------------------
# The checker


class _Checker(RefcountRebuild):
    """One run of QEMU's check (``qcow2_co_check_locked``) with a given fix mode.

    Caller holds: the image exclusively; metadata caches flushed.  Refcount blocks
    are read through the image's refcount cache and L2 tables through its L2 cache
    (cluster-aligned tables inside the file; others straight from the file, as QEMU
    reads them), each under the locks the lock order allows.
    """

    def __init__(self, state: ImageState, fix: int, messages: list[str], *,
                 refuse_beyond_end: bool = False) -> None:
        super().__init__(state, fix, messages, refuse_beyond_end=refuse_beyond_end)
        self.snapshot_extra_sizes: list[int] = []  # as each snapshot table entry stores it

    # Whole check ------------------------------------------------------------------
    def run(self) -> CheckCounts:
        """qcow2_co_check_locked(); raises CheckFailed when QEMU returns -errno."""
        self.drop_l2_cache()
        result = CheckCounts()
        snapshot_res = CheckCounts()
        try:
            self.check_read_snapshot_table(snapshot_res)
        except CheckFailed:
            result.add(snapshot_res, False)
            raise
        refcount_res = CheckCounts()
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
    def check_read_snapshot_table(self, res: CheckCounts) -> None:
        state = self.state
        raw = state.file.pread_exact(OFF_NB_SNAPSHOTS, SNAPSHOTS_POINTER.size)
        count, offset = SNAPSHOTS_POINTER.unpack(raw)
        self.snapshots_offset, self.snapshots, self.snapshot_extra_sizes = offset, [], []
        if count and (offset % self.cs or offset > (1 << 63) - 1 - count * SNAPSHOT_HEADER.size
                      or count > MAX_SNAPSHOTS):
            res.check_errors += 1
            self.msg("ERROR snapshot table offset invalid" if count <= MAX_SNAPSHOTS
                     else "ERROR snapshot table too large")
            self.snapshots_offset = 0
            raise CheckFailed(errno.EFBIG if count > MAX_SNAPSHOTS else errno.EINVAL)
        dropped: list[str] = []
        try:
            snapshots, extra_sizes, size = read_snapshot_table(
                lambda pos, length: state.file.pread_exact(offset + pos, length), count,
                cut_extra=bool(self.fix & FIX_ERRORS), dropped=dropped)
        except FormatError as exc:
            res.check_errors += 1
            self.msg(f"ERROR failed to read the snapshot table: {exc}")
            if str(exc).startswith("Too much extra metadata"):
                self.msg("You can force-remove this extra metadata with qemu-img check -r all")
            self.snapshots_offset = 0
            raise CheckFailed(errno.EFBIG) from None
        self.snapshots, self.snapshots_size = snapshots, size
        self.snapshot_extra_sizes = extra_sizes
        for line in dropped:
            self.msg(line)
        res.corruptions += len(dropped)
        if state.header.version >= 3:
            for i, extra_size in enumerate(extra_sizes):
                if extra_size < 16:
                    res.corruptions += 1
                    self.msg(f"{'Repairing' if self.fix & FIX_ERRORS else 'ERROR'} snapshot "
                             f"table entry {i} is incomplete")

    def check_fix_snapshot_table(self, res: CheckCounts) -> None:
        """Rewrite the snapshot table (24 bytes of extra data each) when it was damaged."""
        if not (res.corruptions and self.fix & FIX_ERRORS):
            return
        state = self.state
        snapshots = list(self.snapshots)  # extra data over 1024 bytes already cut
        for snap in snapshots:
            if snap.disk_size is None:  # QEMU takes the current size for a short entry
                snap.disk_size = state.header.size
        state.snapshot_table = snapshots
        data = serialize_snapshot_table(snapshots)
        offset = 0
        if data:
            with state.alloc_lock:
                offset = state.refcounts.alloc_contiguous(div_round_up(len(data), self.cs))
            self.sync_refcounts()
            if not self.pre_write_overlap_check(offset, len(data)):
                res.check_errors += 1
                self.msg(f"ERROR failed to update snapshot table: {os.strerror(errno.EIO)}")
                raise CheckFailed(errno.EIO)
            state.file.pwrite(offset, data)
            state.file.flush()
        state.file.pwrite(OFF_NB_SNAPSHOTS, SNAPSHOTS_POINTER.pack(len(state.snapshot_table), offset))
        state.file.flush()
        old_offset, old_size = self.snapshots_offset, self.snapshots_size
        state.header.nb_snapshots, state.header.snapshots_offset = len(state.snapshot_table), offset
        if old_size:
            first, last = old_offset >> self.cb, (old_offset + old_size - 1) >> self.cb
            cache: dict[int, array | None] = {}
            try:
                in_use = all(self.stored_refcount(c, cache) for c in range(first, last + 1))
            except _RefcountUnreadable:
                in_use = False
            if in_use:
                with state.alloc_lock:
                    state.refcounts.free_later(first, last - first + 1)
            else:  # QEMU's update_refcount() refuses, and undoes what it did
                self.msg(f"qcow2_free_clusters failed: {os.strerror(errno.EINVAL)}")
        self.drop_l2_cache()
        res.corruptions_fixed += res.corruptions
        res.corruptions = 0

    def mark_clean_and_consistent(self) -> None:
        """qcow2_mark_clean() and qcow2_mark_consistent(): clear the dirty and corrupt bits."""
        state = self.state
        features = state.header.incompatible_features
        if features & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT):
            flush_everything(state)
            state.write_incompatible(features & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT))
            self.drop_l2_cache()

    # Refcounts ------------------------------------------------------------------------
    def check_refcounts(self, res: CheckCounts) -> None:
        """qcow2_check_refcounts()."""
        state = self.state
        self.file_len = state.file.size()
        nb_clusters = div_round_up(self.file_len, self.cs)
        res.total_clusters = div_round_up(state.header.size // 512 * 512, self.cs)
        self.clear_imrt(nb_clusters)
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
            self.clear_imrt(len(self.imrt))
            self.calculate_refcounts(res, 0)
            if self.fix & FIX_LEAKS:
                saved = res.copy()
                scratch = CheckCounts()
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
                raise CheckFailed(errno.EIO)
            if res.leaks or res.corruptions:
                res.__dict__.update(pre_compare.__dict__)
                highest = self.compare_refcounts(res, self.fix)
        self.check_oflag_copied(res)
        res.image_end_offset = (highest + 1) * self.cs

    # Stored refcounts ------------------------------------------------------------------
    def stored_block(self, index: int) -> array | None:
        """A copy of the stored refcounts of block *index* (None: no block, all 0).

        Raises _RefcountUnreadable where qcow2_get_refcount() fails.
        """
        refs = self.state.refcounts
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
        if offset + self.cs > MAX_IO_END:
            raise _RefcountUnreadable()
        with self.state.alloc_lock:
            entry = refs.cache.get(offset)
            try:
                return array(entry.table.values.typecode, entry.table.values)
            finally:
                refs.cache.put(entry)

    def stored_refcount(self, cluster: int, cache: dict[int, array | None]) -> int:
        """The stored refcount of *cluster* (blocks kept in *cache*); may raise."""
        bits = self.state.refcounts.block_bits
        index = cluster >> bits
        if index not in cache:
            if len(cache) > 64:
                cache.clear()
            cache[index] = self.stored_block(index)
        values = cache[index]
        return 0 if values is None else values[cluster & ((1 << bits) - 1)]

    def compare_refcounts(self, res: CheckCounts, fix: int) -> int:
        """compare_refcounts(): stored refcounts against the IMRT; returns the highest
        cluster in use (either side)."""
        state = self.state
        imrt = self.imrt
        nb_clusters = len(imrt)
        bits = state.refcounts.block_bits
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
        state = self.state
        try:
            with state.alloc_lock:
                refs = state.refcounts
                if refs.increment(cluster, delta) == 0 and cluster < refs.free_hint:
                    refs.free_hint = cluster  # free again: the allocator may hand it out
                refs.flush()
            state.file.flush()
        except (Qcow2Error, OSError):
            return False
        self.l2_cache_stale = True
        return True

    def sync_refcounts(self) -> None:
        """Write the refcount blocks and table back and sync (also with lazy refcounts)."""
        with self.state.alloc_lock:
            self.state.refcounts.flush()
        self.state.file.flush()

    # OFLAG_COPIED ---------------------------------------------------------------------
    def check_oflag_copied(self, res: CheckCounts) -> None:
        """check_oflag_copied(): COPIED set exactly where the refcount is 1 (active tables)."""
        state, fix = self.state, self.fix
        if fix & FIX_ERRORS:
            repair = True
        elif fix & FIX_LEAKS:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        cache: dict[int, array | None] = {}
        cb = self.cb
        seen: dict[int, Walk] = {}  # L2 tables checked unchanged: replayed, not re-read
        for i in range(len(state.l1.entries)):
            l1_entry = state.l1.entries[i]
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
                    new = with_copied(l1_entry, refcount)
                    where = state.header.l1_table_offset + 8 * i
                    if not self.pre_write_overlap_check(where, 8, ACTIVE_L1):
                        res.check_errors += 1
                        raise CheckFailed(errno.EIO)
                    with state.l1.lock:
                        state.l1.entries[i] = new
                        state.l1.dirty.add(i)
                    flush_everything(state)
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
            external = self.state.external
            for j, entry in enumerate(table):
                if entry & QCOW_OFLAG_COMPRESSED or not (
                        entry & L2E_OFFSET_MASK
                        or (external and entry & QCOW_OFLAG_COPIED and not entry & QCOW_OFLAG_ZERO)):
                    continue  # only normal and allocated zero clusters
                if external:  # data file clusters: "refcount 1", as QEMU counts them
                    refcount = 1
                else:
                    try:
                        refcount = self.stored_refcount((entry & L2E_OFFSET_MASK) >> cb, cache)
                    except _RefcountUnreadable:
                        continue
                if (refcount == 1) != bool(entry & QCOW_OFLAG_COPIED):
                    res.corruptions += 1
                    self.msg(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED data "
                             f"cluster: l2_entry={entry:x} refcount={refcount}")
                    if repair:
                        changes[j] = with_copied(entry, refcount)
            if changes:
                if not self.pre_write_overlap_check(l2_offset, self.cs, ACTIVE_L2):
                    self.msg("ERROR: Could not write L2 table; metadata overlap check failed: "
                             f"{os.strerror(errno.EIO)}")
                    res.check_errors += 1
                    raise CheckFailed(errno.EIO)
                self.write_l2_entries(l2_offset, table, changes)
                res.corruptions -= len(changes)
                res.corruptions_fixed += len(changes)
            else:
                seen[l2_offset] = Walk(before, res, self.out[lines:])
        if self.omitted:
            self.msg(f"(and {self.omitted} more messages repeating the above for L2 tables "
                     "that several L1 entries name)")
            self.omitted = 0

    def write_l2_entries(self, l2_offset: int, table: array, changes: dict[int, int]) -> None:
        """Write changed entries of an L2 table (through the cache when it can be cached)."""
        state = self.state
        if self.cacheable(l2_offset):
            entry_obj = state.l2_cache.get(l2_offset)
            try:
                with entry_obj.lock:
                    for j, value in changes.items():
                        entry_obj.table[j] = value
                    entry_obj.dirty = True
            finally:
                state.l2_cache.put(entry_obj)
            flush_everything(state)
            return
        for j, value in changes.items():
            table[j] = value
        state.file.pwrite(l2_offset, l2_table_to_bytes(table))
        state.file.flush()


# ------------------------------------------------------------------------------------
# Entry points


def _flush_for_check(state: ImageState) -> None:
    if not state.readonly:
        flush_everything(state)


def check_image(image: ImageState | StateOwner, repair: str | None) -> CheckResult:
    """Check *image* (an Image, or its state) as ``qemu-img check [-r leaks|all]`` does
    and return the result.

    With a repair, the image is checked again afterwards when anything was fixed, and
    the result holds that second check's figures with the first one's fixed counts.
    Caller holds: the image exclusively (``Image.check`` takes it).
    """
    state = state_of(image)
    fix = REPAIR_MODES[repair]
    if fix and state.readonly:
        raise Qcow2Error(f"'{state.path}' is open read-only: cannot repair")
    result = CheckResult(filename=state.path)
    _flush_for_check(state)
    try:
        first = _Checker(state, fix, result.messages).run()
    except CheckFailed as exc:
        result.error = str(exc)
        _flush_for_check(state)
        return result
    _flush_for_check(state)
    final = first
    if first.corruptions_fixed or first.leaks_fixed:
        result.repaired = True
        try:
            final = _Checker(state, 0, result.messages).run()
        except CheckFailed as exc:
            result.error = str(exc)
        final.corruptions_fixed, final.leaks_fixed = first.corruptions_fixed, first.leaks_fixed
    for figure in fields(CheckCounts):
        setattr(result, figure.name, getattr(final, figure.name))
    return result


def rebuild_refcounts(state: ImageState) -> None:
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
        res = _Checker(state, FIX_ALL, messages, refuse_beyond_end=True).run()
    except CheckFailed as exc:
        raise CorruptImage(f"Could not repair dirty image: {exc}") from None
    if res.check_errors:
        raise CorruptImage("Could not repair dirty image: " + "; ".join(messages[-3:]))
    flush_everything(state)
