"""Guest clusters to host clusters (QEMU's qcow2-cluster.c): lookup, reads, writes.

- lookup: :func:`lookup` and :func:`extents_in` turn a guest range inside one L2
  table into extents (kind, guest, length, host offset or L2 entry), pinning the
  host clusters whose data I/O follows;
- the general read path: :func:`read_locked` (one L2 table per loop iteration);
- the write plan: :func:`write_chunk` splits a range of one L2 table into in-place
  and allocating steps (:class:`WriteOp`), allocates with copy-on-write of the head
  and tail, registers in-flight records, and links the new clusters afterwards;
- discard and zeroing: :func:`zero_clusters`, one L2 table per loop iteration.

In-flight records live in ``CacheEntry.inflight`` (guarded by the table's lock): a
write that allocates registers one per entry before it drops the L2 lock, and an
overlapping write, discard or zeroing waits for it and looks the mapping up again
(:func:`on_table`, the one retry loop).  Data I/O runs with no metadata lock held,
and every host cluster a request does I/O on carries an in-use pin
(:meth:`ImageState.pin`).  Every function takes the image's
:class:`~qcow2rw.state.ImageState`; the locks are described in :mod:`qcow2rw.locks`.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

from . import compress, subcluster
from .cache import CacheEntry
from .cancel import MAX_RUN_BYTES, CancelToken
from .format import (AUTOCLEAR_DATA_FILE_RAW, COMPRESSED, L2E_OFFSET_MASK, ExtendedL2Table, NORMAL, QCOW_OFLAG_COMPRESSED,
                     QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO, SUBCLUSTERS, UNALLOCATED,
                     UNALLOCATED_ALLOC, ZERO_ALLOC, ZERO_PLAIN, subcluster_runs,
                     compressed_host_range, decode_compressed)
from .locks import CANCEL_POLL_SECONDS, Gate, held
from .overlap import ACTIVE_L2
from .state import ImageState
from .writeback import MAX_DEFERRED_FREES, flush_locked

__all__ = ["WriteOp", "abandon_plans", "block_status", "extents_in", "for_each_table", "free_entry_later", "get_l2_for_write",
           "lookup", "read_extent", "read_locked", "write_chunk", "write_zeroes_locked",
           "zero_clusters"]

_COPIED_NORMAL_MASK = QCOW_OFLAG_COPIED | QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO | L2E_OFFSET_MASK

Extent = tuple[int, int, int, int]  # (kind, guest offset, length, host offset or L2 entry)


class WriteOp:
    """One step of a write plan: an in-place run or a run of newly allocated clusters
    (or one compressed fragment: :mod:`.compressed`).

    ``pins`` are the host clusters this step holds in-use counts on; ``record`` is
    the in-flight allocation event waiters block on (allocating steps only);
    ``compressed`` is the L2 entry that links the step's fragment (0: none);
    ``keep``, ``bitmaps`` and ``span`` are for extended L2 entries (:mod:`.subcluster`).
    """

    __slots__ = ("first", "end", "host", "allocating", "pins", "record", "done", "fresh",
                 "compressed", "keep", "bitmaps", "span", "written")

    def __init__(self, first: int, end: int, host: int, allocating: bool,
                 pins: list[tuple[int, int]],
                 record: Gate | None, fresh: bool = False, compressed: int = 0, *,
                 keep: bool = False, bitmaps: list[int] | None = None,
                 span: tuple[int, int] | None = None) -> None:
        self.first = first
        self.end = end
        self.host = host
        self.allocating = allocating
        self.pins = pins
        self.record = record
        self.done = False
        self.fresh = fresh  # the new clusters were never written: they read as zeros
        self.compressed = compressed
        # Extended L2 entries (.subcluster): the step keeps the entries' host cluster
        # and only sets bits (keep); the entries' new bitmaps; the guest bytes the step
        # writes, copied head and tail included (span).
        self.keep = keep
        self.bitmaps = bitmaps
        self.span = span
        self.written = False  # the step's data write returned


def _wait_for_allocation(record: Gate, cancel: CancelToken | None) -> None:
    """Wait until the allocation in flight behind *record* is linked or given up; a
    cancelled request stops waiting (it has changed nothing yet).

    Caller holds: no lock at all (the allocating request needs the table's lock).
    """
    if cancel is None:
        record.wait()
        return
    while not record.wait(CANCEL_POLL_SECONDS):
        cancel.check()
    cancel.check()


# Lookup ----------------------------------------------------------------------------
def lookup(state: ImageState, offset: int, length: int,
           pins: list[tuple[int, int]] | None = None
           ) -> tuple[list[Extent], list[tuple[int, int]]]:
    """Extents of [offset, offset+length) (within one L2 table) and the pins taken.

    The in-use counts on the host clusters are taken under the L2 lock, so none of
    them can be freed and reused before the caller unpins them after its I/O.  They
    are noted in *pins* (the caller's list, made before the call) as they are taken,
    so an interrupt that loses this call's return value loses no pin.
    Caller holds: the global lock shared, no metadata lock.
    """
    if pins is None:
        pins = []
    l2_offset = state.l2_offset(offset >> state.l1_shift)
    if not l2_offset:
        return [(UNALLOCATED, offset, length, 0)], pins
    tables: list[CacheEntry] = []
    try:
        entry_obj = state.l2_cache.get(l2_offset, tables)
        with entry_obj.lock:
            extents = extents_in(state, entry_obj.table, offset, length, l2_offset)
            if state.track_use:
                state.pin(pins, [state.host_clusters(kind, where, ext_len)
                                 for kind, _, ext_len, where in extents
                                 if kind == NORMAL or kind == COMPRESSED])
    finally:
        try:
            state.l2_cache.release(tables)
        except BaseException:  # an interrupt cut it short: it resumes
            state.l2_cache.release(tables)
            raise
    return extents, pins


def block_status(state: ImageState, offset: int, length: int) -> list[Extent]:
    """The extents of [offset, offset+length) in this layer, one L2 table per
    iteration; runs of UNALLOCATED or ZERO_PLAIN merged across tables.

    Caller holds: the global lock (shared or exclusive).
    """
    out: list[Extent] = []
    l1_shift = state.l1_shift
    pos = offset
    while pos < offset + length:
        chunk = min(offset + length - pos, ((pos >> l1_shift) + 1 << l1_shift) - pos)
        extents, pins = lookup(state, pos, chunk)
        state.unpin(pins)
        for ext in extents:
            if out and out[-1][0] == ext[0] and ext[0] in (UNALLOCATED, ZERO_PLAIN):
                out[-1] = (ext[0], out[-1][1], out[-1][2] + ext[2], 0)
            else:
                out.append(ext)
        pos += chunk
    return out


def extents_in(state: ImageState, table: array, offset: int, length: int,
               l2_offset: int = 0) -> list[Extent]:
    """Runs (kind, guest, length, host-or-entry) of a range inside one L2 table (at
    host offset *l2_offset*, for messages).

    NORMAL, ZERO_ALLOC and UNALLOCATED_ALLOC runs carry the host offset of their first
    byte and are merged while the host clusters are contiguous; COMPRESSED runs are
    one cluster and carry the L2 entry.  Caller holds: the table's lock.
    """
    if state.extended:
        return _extents_by_subcluster(state, table, offset, length, l2_offset)
    cs, cb = state.cluster_size, state.cluster_bits
    cs_mask, l2_mask = cs - 1, state.l2_entries - 1
    first = (offset >> cb) & l2_mask
    count = ((offset + length - 1) >> cb & l2_mask) - first + 1 if length > 0 else 0
    if count > 1:  # the common shapes of a big request, compared in C
        entries = table[first:first + count]
        head = entries[0]
        if not head:
            if entries.count(0) == count:  # all unallocated
                return [(UNALLOCATED, offset, length, 0)]
        elif (not head & (QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO | cs_mask)
              and (state.external
                   or ((head & L2E_OFFSET_MASK) >> cb) + count <= state.refcounts.high_water)
              and entries == array("Q", range(head, head + count * cs, cs))):
            # normal clusters, one after another in the file, same flags: one run
            # (what extents_by_entry finds, one entry at a time)
            return [(NORMAL, offset, length, (head & L2E_OFFSET_MASK) + (offset & cs_mask))]
    return extents_by_entry(state, table, offset, length)


def extents_by_entry(state: ImageState, table: array, offset: int,
                     length: int) -> list[Extent]:
    """:func:`extents_in`, entry by entry (every shape; damage reported as found).

    Caller holds: the table's lock.
    """
    out: list[Extent] = []
    cs, cb = state.cluster_size, state.cluster_bits
    cs_mask, l2_mask = cs - 1, state.l2_entries - 1
    classify = state.classify
    end = offset + length
    guest = offset
    while guest < end:
        entry = table[(guest >> cb) & l2_mask]
        kind = classify(entry)
        in_cluster = guest & cs_mask
        take = min(cs - in_cluster, end - guest)
        where = 0
        if kind == NORMAL or kind == ZERO_ALLOC:
            where = (entry & L2E_OFFSET_MASK) + in_cluster
        elif kind == COMPRESSED:
            where = entry
        if out and kind != COMPRESSED:
            pkind, pguest, plen, pwhere = out[-1]
            if pkind == kind and (kind not in (NORMAL, ZERO_ALLOC) or pwhere + plen == where):
                out[-1] = (pkind, pguest, plen + take, pwhere)
                guest += take
                continue
        out.append((kind, guest, take, where))
        guest += take
    return out


def _extents_by_subcluster(state: ImageState, table: array, offset: int, length: int,
                           l2_offset: int) -> list[Extent]:
    """:func:`extents_in` for extended L2 entries: runs of subclusters of one kind.

    An invalid bitmap (QEMU's ``QCOW2_SUBCLUSTER_INVALID``) marks the image corrupt.
    Caller holds: the table's lock.
    """
    out: list[Extent] = []
    cs, cb, sb = state.cluster_size, state.cluster_bits, state.subcluster_bits
    l2_mask = state.l2_entries - 1
    bitmaps = table.bitmaps  # type: ignore[attr-defined]
    end = offset + length
    guest = offset
    while guest < end:
        index = (guest >> cb) & l2_mask
        entry = table[index]
        kind = state.classify(entry)
        cluster_start = guest & ~(cs - 1)
        if kind == COMPRESSED:
            runs = [(COMPRESSED, 0, SUBCLUSTERS)]
        else:
            found = subcluster_runs(entry, bitmaps[index])
            if found is None:
                # (C's %#x: "0", not "0x0")
                state.signal_corruption(f"Invalid cluster entry found  (L2 offset: {l2_offset:#x}, "
                                        f"L2 index: {index:#x})".replace(": 0x0)", ": 0)"))
            runs = found
        host = entry & L2E_OFFSET_MASK
        for run_kind, first, stop in runs:
            lo = max(guest, cluster_start + (first << sb))
            hi = min(end, cluster_start + (stop << sb))
            if lo >= hi:
                continue
            where = entry if run_kind == COMPRESSED else 0
            if run_kind in (NORMAL, ZERO_ALLOC, UNALLOCATED_ALLOC):
                where = host + (lo - cluster_start)
            if out and run_kind != COMPRESSED:
                pkind, pguest, plen, pwhere = out[-1]
                if pkind == run_kind and (run_kind not in (NORMAL, ZERO_ALLOC, UNALLOCATED_ALLOC)
                                          or pwhere + plen == where):
                    out[-1] = (pkind, pguest, plen + hi - lo, pwhere)
                    continue
            out.append((run_kind, lo, hi - lo, where))
        guest = min(end, cluster_start + cs)
    return out


# Reading -----------------------------------------------------------------------------
def read_locked(state: ImageState, offset: int, view: memoryview,
                cancel: CancelToken | None) -> None:
    """The general read path, one L2 table per iteration.

    Caller holds: the global lock (shared or exclusive).
    """
    step = MAX_RUN_BYTES if cancel is not None else 1 << state.l1_shift
    pos, length = 0, len(view)
    while pos < length:
        if cancel is not None:
            cancel.check()
        guest = offset + pos
        chunk = min(length - pos, ((guest >> state.l1_shift) + 1 << state.l1_shift) - guest, step)
        pins: list[tuple[int, int]] = []  # filled by lookup as it pins
        try:
            extents = lookup(state, guest, chunk, pins)[0]
            state.fire("read_aio")
            part_pos = pos
            for kind, ext_guest, ext_len, where in extents:
                read_extent(state, kind, ext_guest, view[part_pos:part_pos + ext_len], where)
                part_pos += ext_len
        finally:
            try:
                state.unpin(pins)
            except BaseException:  # an interrupt cut it short: it resumes
                state.unpin(pins)
                raise
        pos += chunk


def read_extent(state: ImageState, kind: int, guest: int, part: memoryview, where: int) -> None:
    """Fill *part* with one extent's data.  Caller holds: no metadata lock, and pins."""
    if kind == NORMAL:
        file = state.datafile
        if (file.faults is not None or file.direct is not None
                or os.preadv(file.fd, [part], where) < len(part)):
            file.preadv([part], where)  # short read (retry, zeros past end), faults, direct
    elif kind == UNALLOCATED or kind == UNALLOCATED_ALLOC:
        if state.backing is None:
            part[:] = bytes(len(part))
        else:
            state.backing.read_backing(guest, part)
    elif kind == COMPRESSED:
        data = _decompress(state, where)
        start = guest & (state.cluster_size - 1)
        part[:] = data[start:start + len(part)]
    else:
        part[:] = bytes(len(part))


def _decompress(state: ImageState, entry: int) -> bytes:
    host, length = decode_compressed(entry, state.cluster_bits)
    data = state.file.pread(host, length)
    return compress.decompress(data, state.cluster_size, state.header.compression_type)


def _old_cluster_data(state: ImageState, entry: int, cluster_guest: int) -> bytes | bytearray:
    """What the guest cluster at *cluster_guest* reads as now (for copy-on-write)."""
    kind = state.classify(entry)
    if kind == NORMAL:
        return state.datafile.pread_exact(entry & L2E_OFFSET_MASK, state.cluster_size)
    if kind == COMPRESSED:
        return _decompress(state, entry)
    buf = bytearray(state.cluster_size)
    if kind == UNALLOCATED and state.backing is not None:
        state.backing.read_backing(cluster_guest, memoryview(buf))
    return buf


# One L2 table at a time ------------------------------------------------------------
def for_each_table(state: ImageState, offset: int, length: int, view: memoryview | None,
                   cancel: CancelToken | None, func: Callable[..., None], *args: Any) -> None:
    """Call ``func(state, l1_index, guest, length, view-part, *args)`` per L2 table the
    range touches (per MAX_RUN_BYTES at most, checking *cancel* in between, when
    there is a token); then flush if too many decrements wait.

    Chunks end on cluster boundaries (the step is a power of two no smaller than a
    cluster), so a cancelled request leaves each cluster all old or all new.
    """
    pos = 0
    step = max(MAX_RUN_BYTES, state.cluster_size)
    while pos < length:
        guest = offset + pos
        l1_index = guest >> state.l1_shift
        chunk = min(length - pos, ((l1_index + 1) << state.l1_shift) - guest)
        if cancel is not None:
            cancel.check()
            chunk = min(chunk, ((guest + step) & ~(state.cluster_size - 1)) - guest)
        func(state, l1_index, guest, chunk, view[pos:pos + chunk] if view is not None else None,
             *args)
        pos += chunk
    if len(state.refcounts.deferred_frees) > MAX_DEFERRED_FREES:
        flush_locked(state)


def get_l2_for_write(state: ImageState, l1_index: int,
                     tables: list[CacheEntry] | None = None) -> CacheEntry:
    """The L2 table of *l1_index*, allocated or copied-on-write if needed; pinned,
    the pin recorded in *tables* (see :meth:`MetadataCache.get`).

    A new or copied table is linked into the L1 table in memory (written back at
    the next flush, after the table itself).  The I/O this needs (loading the
    table to copy, evicting to make room, the allocation's refcount block) is
    done before the L1 lock is taken; under it the L1 entry is looked at again,
    and a cluster allocated for a table somebody else made meanwhile goes back.
    Caller holds: no metadata lock.
    """
    l1 = state.l1
    while True:
        l1_entry = l1.entries[l1_index]
        offset = state.l2_offset(l1_index)
        if offset and l1_entry & QCOW_OFLAG_COPIED:  # ours alone: only exclusive
            return state.l2_cache.get(offset, tables)  # operations change that
        table = _l2_copy_source(state, offset)
        state.l2_cache.make_room(reserve=1)
        state.fire("l2_alloc")
        with state.alloc_lock:
            new_offset = state.refcounts.alloc(1)
        with l1.lock:
            if l1.entries[l1_index] == l1_entry:
                if offset:  # drop our reference to the table we copied
                    with state.alloc_lock:
                        state.refcounts.free_later(offset >> state.cluster_bits)
                entry = state.l2_cache.install(new_offset, table, make_room=False,
                                               held=tables)
                l1.entries[l1_index] = new_offset | QCOW_OFLAG_COPIED
                l1.dirty.add(l1_index)
                if state.overlap is not None:
                    state.overlap.added(new_offset, state.cluster_size, ACTIVE_L2)
                return entry
        with state.alloc_lock:  # another request linked a table first: use that one
            state.refcounts.free_now(new_offset >> state.cluster_bits)


def _l2_copy_source(state: ImageState, offset: int) -> array:
    """The contents for a new L2 table: a copy of the one at *offset* (shared with
    a snapshot), or all zeros (no table yet).  Caller holds: no metadata lock."""
    if not offset:
        if state.extended:
            return ExtendedL2Table(bytes(8 * state.l2_entries), bytes(8 * state.l2_entries))
        return array("Q", bytes(state.cluster_size))
    return state.l2_cache.copy_of(offset)


def on_table(state: ImageState, l1_index: int, first: int, last: int,
              cancel: CancelToken | None, locked: Callable[..., Any],
              unlocked: Callable[..., None] | None, *args: Any) -> None:
    """THE retry loop for "wait for the allocation in flight and start over".

    Gets the L2 table of *l1_index* for writing; under its lock, if no allocation is
    in flight on entries first..last, runs ``result = locked(state, table entry,
    first, last, *args)``, then with the lock dropped (the table still pinned)
    ``unlocked(state, table entry, result, *args)``; else waits for the allocation
    and looks the mapping up again.
    Caller holds: the global lock shared, no metadata lock.
    """
    while True:
        tables: list[CacheEntry] = []
        try:
            entry_obj = get_l2_for_write(state, l1_index, tables)
            with entry_obj.lock:
                blocker = _blocker(entry_obj, first, last)
                if blocker is None:
                    result = locked(state, entry_obj, first, last, *args)
            if blocker is None:
                if unlocked is not None:
                    unlocked(state, entry_obj, result, *args)
                return
        finally:
            try:
                state.l2_cache.release(tables)
            except BaseException:  # an interrupt cut it short: it resumes
                state.l2_cache.release(tables)
                raise
        _wait_for_allocation(blocker, cancel)  # then look the mapping up again


def _blocker(entry_obj: CacheEntry, first: int, last: int) -> Gate | None:
    """An in-flight allocation on entries first..last of this table, if any.

    Caller holds: the table's lock.
    """
    assert held(entry_obj.lock), "Caller holds: the table's lock"
    inflight = entry_obj.inflight
    if not inflight:
        return None
    for index in range(first, last + 1):
        record = inflight.get(index)
        if record is not None:
            return record
    return None


# Writing -----------------------------------------------------------------------------
def write_chunk(state: ImageState, l1_index: int, guest: int, length: int, data: memoryview,
                cancel: CancelToken | None) -> None:
    """Write [guest, guest+length), which lies in one L2 table.

    Caller holds: the global lock shared, no metadata lock.
    """
    cb, l2_mask = state.cluster_bits, state.l2_entries - 1
    first = (guest >> cb) & l2_mask
    last = ((guest + length - 1) >> cb) & l2_mask
    on_table(state, l1_index, first, last, cancel,
             subcluster.plan_write if state.extended else _plan_write, run_write_plan,
             guest, data, cancel)


def _plan_write(state: ImageState, entry_obj: CacheEntry, first: int, last: int,
                guest: int = 0, *_: Any) -> list[WriteOp]:
    """Split entries first..last into in-place and allocating steps; claim what they need.

    In-place steps pin their host clusters; allocating steps get new clusters, an
    in-flight record on their entries, and pins on the old clusters they copy from.
    Caller holds: the table's lock.
    """
    assert held(entry_obj.lock), "Caller holds: the table's lock"
    table = entry_obj.table
    cb = state.cluster_bits
    for k in range(first, last + 1):  # damage is found before anything is claimed
        check_droppable(state, table[k])
    ops: list[WriteOp] = []
    # Listed before anything is claimed: if an interrupt loses this plan on its way
    # to run_write_plan, the request (Image._request) gives back what its steps claim.
    pending = state.glock.shared().pending
    pending.append((entry_obj, ops))
    try:
        i = first
        while i <= last:
            entry = table[i]
            kind = state.classify(entry)
            limit = min(last + 1, i + state.run_clusters)
            if kind == NORMAL and entry & QCOW_OFLAG_COPIED:
                host = entry & L2E_OFFSET_MASK
                j = i + 1
                while j < limit and table[j] & _COPIED_NORMAL_MASK == QCOW_OFLAG_COPIED | (host + ((j - i) << cb)):
                    j += 1
                op = WriteOp(i, j, host, False, [], None)
                ops.append(op)  # listed before it claims anything...
                state.pin(op.pins, [(host >> cb, j - i)])  # ...then pinned, noted in op.pins
                i = j
                continue
            j = i + 1
            limit = min(limit, i + state.refcounts.max_run)
            while j < limit and not (table[j] & _COPIED_NORMAL_MASK & ~L2E_OFFSET_MASK == QCOW_OFLAG_COPIED
                                     and table[j] & L2E_OFFSET_MASK):
                j += 1
            if state.external:  # the guest offset in the data file: nothing to claim
                host = ((guest >> state.l1_shift) << state.l1_shift) + (i << cb)
                fresh = False  # (a data file may hold stale data there: COW writes zeros)
            else:
                with state.alloc_lock:  # (e.g. ENOSPC growing the refcount table: undone below)
                    host = state.refcounts.alloc(j - i)
                    fresh = state.refcounts.last_alloc_fresh
            # (a Gate: an Event's wait could leave its lock taken if interrupted)
            list_allocating_step(state, entry_obj, ops,
                                 WriteOp(i, j, host, True, [], Gate(), fresh), table)
            i = j
    except BaseException:
        undo_plan(state, entry_obj, ops)
        unlist_plan(state, ops)
        raise
    return ops


def list_allocating_step(state: ImageState, entry_obj: CacheEntry, ops: list[WriteOp],
                         op: WriteOp, table: array) -> None:
    """Add allocating step *op* to the plan *ops* and put its in-flight record on its
    entries ``[op.first, op.end)``, then pin its copy sources.  Between the append and
    the update there is no call, so an interrupt finds the step listed exactly when
    its records are (what undo_plan relies on).  Caller holds: the L2 lock."""
    claims = dict.fromkeys(range(op.first, op.end), op.record)
    ops += [op]
    entry_obj.inflight.update(claims)
    pin_copy_sources(state, op, table)


def pin_copy_sources(state: ImageState, op: WriteOp, table: array) -> None:
    """Pin the old host clusters an allocating step may copy its head and tail from
    (its first and last entries'; a compressed one's every cluster).

    Caller holds: the table's lock.
    """
    olds = []
    for k in {op.first, op.end - 1}:
        entry = table[k]
        if entry & QCOW_OFLAG_COMPRESSED:
            olds.append(state.host_clusters(COMPRESSED, entry, state.cluster_size))
        elif entry & L2E_OFFSET_MASK:
            olds.append(((entry & L2E_OFFSET_MASK) >> state.cluster_bits, 1))
    state.pin(op.pins, olds)


def undo_plan(state: ImageState, entry_obj: CacheEntry, ops: list[WriteOp]) -> None:
    """Release what the steps planned so far claimed: clusters, records, pins.

    Caller holds: the table's lock.
    """
    assert held(entry_obj.lock), "Caller holds: the table's lock"
    for op in ops:
        abandon(state, entry_obj, op, table_locked=True)


def run_write_plan(state: ImageState, entry_obj: CacheEntry, ops: list[WriteOp], guest: int,
                    data: memoryview, cancel: CancelToken | None) -> None:
    """Do the data I/O of each step, then link allocated clusters; undo what is left on error.

    Caller holds: the global lock shared, no metadata lock.
    """
    cb = state.cluster_bits
    table_guest = (guest >> state.l1_shift) << state.l1_shift
    end = guest + len(data)
    try:
        for op in ops:
            if cancel is not None:
                cancel.check()
            run_lo = table_guest + (op.first << cb)
            run_hi = table_guest + (op.end << cb)
            lo, hi = max(guest, run_lo), min(end, run_hi)
            if not op.allocating:
                state.fire("write_aio")
                if state.overlap is not None:
                    state.check_data_write(op.host + (lo - run_lo), hi - lo)
                if cancel is None:
                    state.datafile.pwrite(op.host + (lo - run_lo), data[lo - guest:hi - guest])
                else:  # a cluster at a time, looking at the token in between
                    _write_in_place(state, op.host - run_lo, lo, hi,
                                    data[lo - guest:hi - guest], cancel)
            else:
                state.fire("cluster_alloc")
                _write_new_clusters(state, entry_obj, op, run_lo, run_hi, lo, hi,
                                    data[lo - guest:hi - guest])
                op.written = True  # (abandon completes a step whose data is written)
                if cancel is not None and not op.keep:  # not linked yet: every cluster
                    cancel.check()  # still reads old (a keep step's may not: it links)
                _link(state, entry_obj, op)
            state.unpin(op.pins)  # (an interrupt here: abandon finishes it)
            op.done = True
    finally:
        for op in ops:
            if not op.done:
                abandon(state, entry_obj, op)
        # Settled: no longer the request's to give back.  (An interrupt before this
        # point leaves it listed, and abandon_plans gives back what is still not done.)
        unlist_plan(state, ops)


def unlist_plan(state: ImageState, ops: list[WriteOp]) -> None:
    """Take a settled write plan off the thread's list of plans to give back."""
    pending = state.glock.shared().pending
    for index in range(len(pending) - 1, -1, -1):
        if pending[index][1] is ops:
            del pending[index]
            break


def abandon_plans(state: ImageState, mark: int) -> None:
    """Give back what the thread's write plans listed after *mark* still claim
    (clusters, records, pins): an interrupt or error cut them off."""
    pending = state.glock.shared().pending
    while len(pending) > mark:
        entry_obj, ops = pending[-1]
        for op in ops:
            if not op.done:
                abandon(state, entry_obj, op)
        del pending[-1]


def _write_in_place(state: ImageState, delta: int, lo: int, hi: int, data: memoryview,
                    cancel: CancelToken) -> None:
    """Write guest [lo, hi) at host offset guest + *delta*, one cluster per write,
    checking *cancel* before each (DESIGN §5: a cancelled write stops at the next
    cluster boundary; every cluster holds its old or its new data).

    Caller holds: no metadata lock, and pins on the clusters.
    """
    cs = state.cluster_size
    pos = lo
    while pos < hi:
        if pos != lo:
            cancel.check()
        nxt = min(hi, (pos | (cs - 1)) + 1)
        state.datafile.pwrite(pos + delta, data[pos - lo:nxt - lo])
        pos = nxt


def _write_new_clusters(state: ImageState, entry_obj: CacheEntry, op: WriteOp, run_lo: int,
                        run_hi: int, lo: int, hi: int, data: memoryview) -> None:
    """Write an allocating step's data, with the head and tail copied from the old clusters.

    A head or tail that would be copied as zeros into clusters that were never
    written (past the old end of the file) is left as a hole instead, and the
    file is extended with one byte at the run's end, so it still reads as zeros.
    Caller holds: no metadata lock (the step's in-flight record keeps its entries ours).
    """
    if op.span is not None:  # extended L2 entries: only partial subclusters are copied
        subcluster.write_span(state, entry_obj, op, run_lo, lo, hi, data)
        return
    if op.compressed:  # a compressed fragment (.compressed): *data* is all of it
        if state.overlap is not None:
            state.check_data_write(op.host, len(data))
        state.file.pwrite(op.host, data)
        return
    cs = state.cluster_size
    table = entry_obj.table
    buffers: list[Any] = []
    head = tail = None
    skip_head = op.fresh and lo > run_lo and _reads_as_zeros(state, table[op.first])
    skip_tail = op.fresh and hi < run_hi and _reads_as_zeros(state, table[op.end - 1])
    if lo > run_lo and not skip_head:
        state.fire("cow_read")
        head = _old_cluster_data(state, table[op.first], run_lo)
        buffers.append(memoryview(head)[:lo - run_lo])
    buffers.append(data)
    if hi < run_hi and not skip_tail:
        last_lo = run_hi - cs
        if op.end - 1 == op.first and head is not None:
            tail = head
        else:
            state.fire("cow_read")
            tail = _old_cluster_data(state, table[op.end - 1], last_lo)
        buffers.append(memoryview(tail)[hi - last_lo:])
    state.fire("cow_write" if len(buffers) > 1 else "write_aio")
    if state.overlap is not None:
        state.check_data_write(op.host, run_hi - run_lo)
    state.datafile.pwritev(buffers, op.host + (lo - run_lo if skip_head else 0))
    if skip_tail:
        state.datafile.pwrite(op.host + (run_hi - run_lo) - 1, b"\0")


def _reads_as_zeros(state: ImageState, entry: int) -> bool:
    """True if a cluster with this L2 entry reads as zeros (nothing to copy from)."""
    kind = state.classify(entry)
    return kind in (ZERO_PLAIN, ZERO_ALLOC) or (kind == UNALLOCATED and state.backing is None)


def _link(state: ImageState, entry_obj: CacheEntry, op: WriteOp) -> None:
    """Point the step's L2 entries at its new clusters; free the old ones later.

    Caller holds: no metadata lock (this takes the table's, then the allocator's).
    """
    cb = state.cluster_bits
    state.fire("l2_update")
    if state.header.lazy_refcounts:
        state.mark_dirty()
    with entry_obj.lock:
        table = entry_obj.table
        old_entries = [] if op.keep else [table[k] for k in range(op.first, op.end)]
        for k in range(op.first, op.end):
            if not op.keep:
                table[k] = op.compressed or (op.host + ((k - op.first) << cb)) | QCOW_OFLAG_COPIED
            if op.bitmaps is not None:
                table.bitmaps[k] = op.bitmaps[k - op.first]  # type: ignore[attr-defined]
            if entry_obj.inflight.get(k) is op.record:
                del entry_obj.inflight[k]
        entry_obj.dirty = True
        # The data written above returned before this mark was taken: the table
        # goes to the file only after a sync (of the data file) that started later.
        entry_obj.data_mark = state.datafile.sync_mark()
        entry_obj.refcount_need = state.refcounts.increments  # (ours were counted before)
        with state.alloc_lock:
            for old in old_entries:
                free_entry_later(state, old)
    op.record.set()  # type: ignore[union-attr]


def abandon(state: ImageState, entry_obj: CacheEntry, op: WriteOp, *,
            table_locked: bool = False) -> None:
    """Undo a step that did not finish: release its clusters, records and pins.

    Safe on a step that an interrupt cut short anywhere, here or in :func:`_link`,
    and to call again: a new cluster is freed only while its entry still carries
    the step's record and does not point at it, and the record is dropped first, so
    no cluster is freed twice (one may leak instead).  Entries that _link already
    pointed at the new clusters stay linked, and the table is marked dirty.
    Caller holds: no metadata lock, or (*table_locked*) the table's lock only.
    """
    if op.allocating:
        cb = state.cluster_bits
        record = op.record
        with nullcontext() if table_locked else entry_obj.lock:
            table, inflight = entry_obj.table, entry_obj.inflight
            linked = False
            for k in range(op.first, op.end):
                cluster = op.host + ((k - op.first) << cb)
                if inflight.get(k) is not record:
                    linked = True  # _link took it over (or an earlier call gave it up)
                    continue
                del inflight[k]  # (first: never freed twice)
                if (table[k] == op.compressed if op.compressed
                        else table[k] & L2E_OFFSET_MASK == cluster):
                    linked = True  # _link pointed the entry at it, then was cut short
                    # (or, a keep step, it is the entry's own cluster): the entry's
                    # bitmap goes with its descriptor, and a keep step whose data is
                    # written completes, so that the cluster is all new
                    if op.bitmaps is not None and (op.written or not op.keep):
                        table.bitmaps[k] = op.bitmaps[k - op.first]  # type: ignore[attr-defined]
                    continue
                if state.external:
                    continue  # (data clusters of a data file hold no refcount)
                with state.alloc_lock:
                    if op.compressed:  # one reference on each cluster the fragment touches
                        state.refcounts.free_now(*state.host_clusters(COMPRESSED, op.compressed, 0))
                    else:
                        state.refcounts.free_now(cluster >> cb)
            if linked:  # what _link does after its loop (harmless if it did)
                entry_obj.dirty = True
                entry_obj.data_mark = state.datafile.sync_mark()
                entry_obj.refcount_need = state.refcounts.increments
        record.set()  # type: ignore[union-attr]
    state.unpin(op.pins)
    op.done = True


def free_entry_later(state: ImageState, entry: int) -> None:
    """Drop the reference an L2 entry held (deferred until the change is durable).

    Caller holds: the allocator lock.
    """
    assert held(state.alloc_lock), "Caller holds: the allocator lock"
    if state.external:
        return  # data clusters of an external data file are not refcounted
    cb = state.cluster_bits
    end = state.refcounts.high_water
    if entry & QCOW_OFLAG_COMPRESSED:
        first, count = state.host_clusters(COMPRESSED, entry, 0)
        if count <= _max_compressed_clusters(state, entry) and first + count <= end:
            state.refcounts.free_later(first, count)
        return  # (a damaged descriptor frees nothing: a leak at worst, never damage)
    offset = entry & L2E_OFFSET_MASK
    if (not offset or offset % state.cluster_size or offset >> cb >= end
            or (entry & QCOW_OFLAG_ZERO and not state.has_zero_flag)):
        return
    state.refcounts.free_later(offset >> cb)


def _max_compressed_clusters(state: ImageState, entry: int) -> int:
    """Host clusters a valid compressed descriptor can touch (its data is shorter
    than a cluster, so it spans at most cluster + 512 bytes from a sector start)."""
    length = compressed_host_range(entry, state.cluster_bits)[1]
    if length > state.cluster_size + 512:
        return 0
    return 2


def check_droppable(state: ImageState, entry: int) -> int:
    """classify() for an entry a request is about to drop (overwrite, zero, discard).

    Stricter than QEMU: a compressed descriptor whose size field is longer than any
    compressed cluster can be would free clusters that may belong to others, so it
    marks the image corrupt instead.
    """
    kind = state.classify(entry)
    if kind == COMPRESSED and not _max_compressed_clusters(state, entry):
        state.signal_corruption(f"Compressed cluster descriptor {entry:#x} has an invalid "
                                "size field (longer than a cluster)")
    return kind


# Discard and zeroes ------------------------------------------------------------------
def write_zeroes_locked(state: ImageState, offset: int, length: int,
                        cancel: CancelToken | None) -> None:
    """Make the range read as zeros (v3: zero clusters; a part of a cluster is written
    with zeros unless the rest of that cluster reads as zeros: see subcluster.zero_partial).

    With ``data_file_raw`` the zeros are first made real in the data file (QEMU's
    qcow2_subcluster_zeroize), which must read as the image does.
    Caller holds: the global lock (shared or exclusive).
    """
    if state.external and state.header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW:
        state.datafile.zero_range(offset, length)

    def write_bytes(at: int, n: int) -> None:
        _write_zero_bytes(state, at, n, cancel)

    if state.extended:
        subcluster.write_zeroes(state, offset, length, cancel, write_bytes)
        return
    if not state.has_zero_flag:
        write_bytes(offset, length)
        return
    cs = state.cluster_size
    stop = offset + length
    start = min((offset + cs - 1) & ~(cs - 1), stop)
    # (QEMU: no tail at the end of the disk: its partial last cluster is whole)
    end = stop if stop == state.header.size else max(start, stop & ~(cs - 1))
    if offset < start:  # (a part of a cluster: QEMU's rule, see subcluster.zero_partial)
        subcluster.zero_partial(state, offset, start, cs, write_bytes, _zero_if_unallocated)
    if start < end:
        zero_clusters(state, start, end - start, False, cancel)
    if end < stop:
        subcluster.zero_partial(state, end, stop, cs, write_bytes, _zero_if_unallocated)


def _zero_if_unallocated(state: ImageState, entry_obj: CacheEntry, first: int,
                         last: int) -> bool:
    """Make entry *first* a zero cluster if it is unallocated or zero; False (nothing
    done) if it holds data.  Caller holds: the table's lock, no allocation in flight."""
    if state.classify(entry_obj.table[first]) not in (UNALLOCATED, ZERO_PLAIN, ZERO_ALLOC):
        return False
    _zero_entries(state, entry_obj, first, last, False)
    return True


def _write_zero_bytes(state: ImageState, offset: int, length: int,
                      cancel: CancelToken | None) -> None:
    chunk = 1 << 20
    zeros = memoryview(bytes(min(chunk, length)))
    pos = 0
    while pos < length:
        n = min(chunk, length - pos)
        for_each_table(state, offset + pos, n, zeros[:n], cancel, write_chunk, cancel)
        pos += n


def zero_clusters(state: ImageState, offset: int, length: int, discard: bool,
                  cancel: CancelToken | None) -> None:
    """Discard (*discard*) or zero the whole clusters inside the range.

    A range that reaches the end of an image whose size is not a multiple of the
    cluster size takes the last, partial cluster whole (QEMU's qcow2_co_pdiscard: "the
    complete partial cluster at the end of an unaligned file"; qcow2_co_pwrite_zeroes:
    no tail there).

    Caller holds: the global lock (shared or exclusive).
    """
    cs = state.cluster_size
    start = (offset + cs - 1) & ~(cs - 1)
    stop = offset + length
    end = (stop + cs - 1 if stop == state.header.size else stop) & ~(cs - 1)
    if start < end:
        for_each_table(state, start, end - start, None, cancel, _zero_chunk, discard, cancel)


def _zero_chunk(state: ImageState, l1_index: int, guest: int, length: int, _: None,
                discard: bool, cancel: CancelToken | None = None) -> None:
    """Discard or zero whole clusters [guest, guest+length) of one L2 table.

    Caller holds: the global lock shared, no metadata lock.
    """
    if discard and not state.l2_offset(l1_index) and (state.backing is None
                                                       or not state.has_zero_flag):
        return  # reads as zeros (or as the backing file) already
    first = (guest >> state.cluster_bits) & (state.l2_entries - 1)
    last = first + (length >> state.cluster_bits) - 1
    on_table(state, l1_index, first, last, cancel,
             subcluster.zero_entries if state.extended else _zero_entries, None, discard)


def _zero_entries(state: ImageState, entry_obj: CacheEntry, first: int, last: int,
                  discard: bool) -> None:
    """Caller holds: the table's lock, with no allocation in flight on first..last."""
    assert held(entry_obj.lock), "Caller holds: the table's lock"
    table = entry_obj.table
    frees = []
    has_zero_flag = state.has_zero_flag
    for i in range(first, last + 1):
        entry = table[i]
        kind = check_droppable(state, entry)
        if discard:
            if kind == UNALLOCATED and (state.backing is None or not has_zero_flag):
                continue
            if kind == ZERO_PLAIN:
                continue
            new = QCOW_OFLAG_ZERO if has_zero_flag else 0
        else:
            if kind in (NORMAL, ZERO_ALLOC) and entry & QCOW_OFLAG_COPIED:
                new = (entry & (L2E_OFFSET_MASK | QCOW_OFLAG_COPIED)) | QCOW_OFLAG_ZERO
                if new != entry:
                    table[i] = new
                    entry_obj.dirty = True
                continue
            if kind == ZERO_PLAIN:
                continue
            new = QCOW_OFLAG_ZERO
        table[i] = new
        entry_obj.dirty = True
        frees.append(entry)
    if state.external:
        if discard:
            _discard_data(state, frees)
        return
    if frees:
        with state.alloc_lock:
            for entry in frees:
                free_entry_later(state, entry)


def _discard_data(state: ImageState, entries: list[int]) -> None:
    """Pass a discard down to the external data file (QEMU's discard passthrough):
    the clusters the dropped entries mapped are punched out (or zeroed), so that a
    ``data_file_raw`` file reads as the image does.

    Done under the table's lock, on purpose: a data cluster's place is its guest
    offset, so a write allocating the same guest cluster again right after the lock
    is dropped would land there, and a punch after it would destroy its data.
    Caller holds: the table's lock.
    """
    cs = state.cluster_size
    runs: list[list[int]] = []
    for entry in entries:
        if state.classify(entry) not in (NORMAL, ZERO_ALLOC):
            continue
        host = entry & L2E_OFFSET_MASK
        if runs and runs[-1][0] + runs[-1][1] == host:
            runs[-1][1] += cs
        else:
            runs.append([host, cs])
    for host, length in runs:
        state.datafile.zero_range(host, length)
