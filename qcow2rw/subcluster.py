"""Writes, zeroing and discards on images with extended L2 entries (subclusters).

An extended L2 entry is a descriptor and a bitmap: bit *i* says subcluster *i* is
allocated, bit 32+*i* that it reads as zeros (:mod:`qcow2rw.format`).  Host space is
still allocated a cluster at a time, and in-flight records stay per cluster, so three
writes to three subclusters of one unallocated cluster allocate one host cluster (the
second and third wait for the first, then write into its cluster).  What QEMU 7.2 does,
done the same way (``calculate_l2_meta``, ``qcow2_alloc_cluster_link_l2``,
``zero_in_l2_slice``, ``zero_l2_subclusters``, ``discard_in_l2_slice`` and the generic
block layer's splitting of write-zeroes requests):

- a write into a cluster of its own (COPIED) whose touched subclusters are all
  allocated is an in-place write; if some are not, the data goes into the same host
  cluster with the partial head and tail subclusters completed from the old contents
  (backing file or zeros), and the bitmap gains those subclusters ("keep" steps);
- any other write allocates new clusters: only the partial head and tail subclusters
  are copied (from a shared cluster: everything from its first to its last allocated
  subcluster; from a compressed one: the whole cluster), and the new bitmap is the old
  one with the written subclusters allocated and not zero;
- write-zeroes sets zero bits: whole clusters get ``ALL_ZEROES`` (a compressed one is
  unmapped), aligned subclusters their zero bits; a partial subcluster is zeroed the
  same way only when the rest of it already reads as zeros, else zeros are written; a
  compressed cluster cannot be zeroed in part, so zeros are written over the request;
- discard leaves whole clusters unallocated and reading as zeros (``ALL_ZEROES``) when
  the image has a backing file or the cluster was allocated.
"""

from __future__ import annotations

from typing import Any

from .cache import CacheEntry
from .cancel import CancelToken
from .format import (COMPRESSED, L2_BITMAP_ALL_ALLOC, L2_BITMAP_ALL_ZEROES, L2E_OFFSET_MASK,
                     NORMAL, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, SUBCLUSTERS, UNALLOCATED,
                     UNALLOCATED_ALLOC, ZERO_ALLOC, ZERO_PLAIN, subcluster_runs)
from .locks import Gate, held
from .state import ImageState

__all__ = ["old_cluster_data", "plan_write", "write_span", "write_zeroes", "zero_entries"]


def _mask(first: int, end: int) -> int:
    """Allocation bits of subclusters first..end-1 (shift left 32 for the zero bits)."""
    return ((1 << end) - 1) ^ ((1 << first) - 1)


def _runs(state: ImageState, entry: int, bitmap: int, l2_offset: int, index: int
          ) -> list[tuple[int, int, int]]:
    """The subcluster runs of an entry; an invalid bitmap marks the image corrupt."""
    if state.classify(entry) == COMPRESSED:
        return [(COMPRESSED, 0, SUBCLUSTERS)]
    runs = subcluster_runs(entry, bitmap)
    if runs is None:
        state.signal_corruption(f"Invalid cluster entry found  (L2 offset: {l2_offset:#x}, "
                                f"L2 index: {index:#x})".replace(": 0x0)", ": 0)"))
    return runs


def old_cluster_data(state: ImageState, entry: int, bitmap: int, cluster_guest: int) -> bytearray:
    """What the guest cluster at *cluster_guest* reads as now (for copy-on-write).

    Caller holds: no metadata lock, and the cluster's in-flight record (its entry
    cannot change meanwhile).
    """
    from .cluster import _decompress
    cs, sb = state.cluster_size, state.subcluster_bits
    if entry & QCOW_OFLAG_COMPRESSED:
        return bytearray(_decompress(state, entry))
    buf = bytearray(cs)
    view = memoryview(buf)
    host = entry & L2E_OFFSET_MASK
    for kind, first, end in _runs(state, entry, bitmap, 0, 0):
        lo, hi = first << sb, end << sb
        if kind == NORMAL:
            state.datafile.preadv([view[lo:hi]], host + lo)
        elif kind in (UNALLOCATED, UNALLOCATED_ALLOC) and state.backing is not None:
            state.backing.read_backing(cluster_guest + lo, view[lo:hi])
    return buf


def plan_write(state: ImageState, entry_obj: CacheEntry, first: int, last: int,
               guest: int, data: memoryview, _cancel: Any) -> list[Any]:
    """:func:`qcow2rw.cluster._plan_write` for extended L2 entries (see the module
    docstring).  Caller holds: the table's lock."""
    from .cluster import WriteOp, list_allocating_step, undo_plan, unlist_plan
    assert held(entry_obj.lock), "Caller holds: the table's lock"
    table = entry_obj.table
    bitmaps = table.bitmaps  # type: ignore[attr-defined]
    cs, cb, sb = state.cluster_size, state.cluster_bits, state.subcluster_bits
    sc = 1 << sb
    end = guest + len(data)
    table_guest = (guest >> state.l1_shift) << state.l1_shift
    for k in range(first, last + 1):  # damage is found before anything is claimed
        _runs(state, table[k], bitmaps[k], entry_obj.offset, k)

    def touched(k: int) -> tuple[int, int, int, int]:
        """(lo, hi) bytes of cluster k written, and its subclusters s0..s1-1."""
        start = table_guest + (k << cb)
        lo, hi = max(guest, start) - start, min(end, start + cs) - start
        return lo, hi, lo >> sb, (hi + sc - 1) >> sb

    def own(k: int) -> bool:
        entry = table[k]
        return bool(entry & QCOW_OFLAG_COPIED and entry & L2E_OFFSET_MASK
                    and not entry & QCOW_OFLAG_COMPRESSED)

    ops: list[Any] = []
    pending = state.glock.shared().pending
    pending.append((entry_obj, ops))  # (see _plan_write)
    try:
        i = first
        while i <= last:
            entry, bitmap = table[i], bitmaps[i]
            lo, hi, s0, s1 = touched(i)
            start = table_guest + (i << cb)
            if own(i):
                host = entry & L2E_OFFSET_MASK
                want = _mask(s0, s1)
                if bitmap & want == want:  # every touched subcluster is allocated
                    op = WriteOp(i, i + 1, host, False, [], None)
                    ops.append(op)
                    state.pin(op.pins, [(host >> cb, 1)])
                    i += 1
                    continue
                span_lo = lo if bitmap >> s0 & 1 else s0 << sb
                span_hi = hi if bitmap >> (s1 - 1) & 1 else s1 << sb
                record = Gate()
                op = WriteOp(i, i + 1, host, True, [], record, keep=True,
                             bitmaps=[(bitmap | want) & ~(want << SUBCLUSTERS)],
                             span=(start + span_lo, start + span_hi))
                ops += [op]
                entry_obj.inflight[i] = record
                state.pin(op.pins, [(host >> cb, 1)])
                i += 1
                continue
            j = i + 1
            limit = min(last + 1, i + state.run_clusters, i + state.refcounts.max_run)
            while j < limit and not own(j):
                j += 1
            # copy-on-write bounds: QEMU's calculate_l2_meta (keep_old false)
            if entry & QCOW_OFLAG_COMPRESSED:
                cow_from = 0
            elif entry & L2E_OFFSET_MASK:
                alloc = bitmap & L2_BITMAP_ALL_ALLOC
                cow_from = min(s0, (alloc & -alloc).bit_length() - 1 if alloc else SUBCLUSTERS) << sb
            else:
                cow_from = s0 << sb
            last_entry, last_bitmap = table[j - 1], bitmaps[j - 1]
            s1_last = touched(j - 1)[3]
            if last_entry & QCOW_OFLAG_COMPRESSED:
                cow_to = cs
            elif last_entry & L2E_OFFSET_MASK:
                cow_to = max(s1_last, (last_bitmap & L2_BITMAP_ALL_ALLOC).bit_length()) << sb
            else:
                cow_to = s1_last << sb
            new_bitmaps = []
            for k in range(i, j):
                written = _mask((cow_from if k == i else 0) >> sb,
                                ((cow_to if k == j - 1 else cs) + sc - 1) >> sb)
                old = 0 if table[k] & QCOW_OFLAG_COMPRESSED else bitmaps[k]
                new_bitmaps.append((old | written) & ~(written << SUBCLUSTERS))
            with state.alloc_lock:
                host = state.refcounts.alloc(j - i)
            op = WriteOp(i, j, host, True, [], Gate(), bitmaps=new_bitmaps,
                         span=(start + cow_from, table_guest + ((j - 1) << cb) + cow_to))
            list_allocating_step(state, entry_obj, ops, op, table)
            i = j
    except BaseException:
        undo_plan(state, entry_obj, ops)
        unlist_plan(state, ops)
        raise
    return ops


def write_span(state: ImageState, entry_obj: CacheEntry, op: Any, run_lo: int, lo: int,
               hi: int, data: memoryview) -> None:
    """Write a step's data [lo, hi) with the copied head [span_lo, lo) and tail
    [hi, span_hi) around it, at the step's host clusters.

    Caller holds: no metadata lock (the step's in-flight record keeps its entries).
    """
    cb = state.cluster_bits
    span_lo, span_hi = op.span
    table = entry_obj.table
    bitmaps = table.bitmaps
    buffers: list[Any] = []
    head = None
    if span_lo < lo:
        state.fire("cow_read")
        head = old_cluster_data(state, table[op.first], bitmaps[op.first], run_lo)
        buffers.append(memoryview(head)[span_lo - run_lo:lo - run_lo])
    buffers.append(data)
    if hi < span_hi:
        last_lo = run_lo + ((op.end - 1 - op.first) << cb)
        if op.end - 1 == op.first and head is not None:
            tail = head
        else:
            state.fire("cow_read")
            tail = old_cluster_data(state, table[op.end - 1], bitmaps[op.end - 1], last_lo)
        buffers.append(memoryview(tail)[hi - last_lo:span_hi - last_lo])
    state.fire("cow_write" if len(buffers) > 1 else "write_aio")
    where = op.host + (span_lo - run_lo)
    if state.overlap is not None:
        state.check_data_write(where, span_hi - span_lo)
    state.file.pwritev(buffers, where)


# Zeroing and discard ------------------------------------------------------------------
def zero_entries(state: ImageState, entry_obj: CacheEntry, first: int, last: int,
                 discard: bool) -> None:
    """Whole clusters first..last: ``discard_in_l2_slice`` (*discard*) or
    ``zero_in_l2_slice`` without unmapping.  Caller holds: the table's lock."""
    from .cluster import free_entry_later
    assert held(entry_obj.lock), "Caller holds: the table's lock"
    table = entry_obj.table
    bitmaps = table.bitmaps  # type: ignore[attr-defined]
    frees = []
    for i in range(first, last + 1):
        entry, bitmap = table[i], bitmaps[i]
        _runs(state, entry, bitmap, entry_obj.offset, i)
        allocated = bool(entry & (L2E_OFFSET_MASK | QCOW_OFLAG_COMPRESSED))
        if discard:
            if state.backing is None and not allocated:
                continue
            new_entry, new_bitmap = 0, L2_BITMAP_ALL_ZEROES
        else:
            unmap = bool(entry & QCOW_OFLAG_COMPRESSED)
            new_entry, new_bitmap = (0 if unmap else entry), L2_BITMAP_ALL_ZEROES
        if (new_entry, new_bitmap) == (entry, bitmap):
            continue
        table[i] = new_entry
        bitmaps[i] = new_bitmap
        entry_obj.dirty = True
        if new_entry != entry:
            frees.append(entry)
    if frees:
        with state.alloc_lock:
            for entry in frees:
                free_entry_later(state, entry)


def _zero_subclusters(state: ImageState, entry_obj: CacheEntry, first: int, last: int,
                      sub_first: int, sub_end: int, unallocated_only: bool = False) -> bool:
    """``zero_l2_subclusters`` on entry *first*: False (nothing done) when the cluster
    is compressed, or (*unallocated_only*) when one of the subclusters is allocated
    now: what a caller checked before it took the lock may have changed since
    (QEMU looks at the subcluster type again under its lock, too).
    Caller holds: the table's lock."""
    assert held(entry_obj.lock), "Caller holds: the table's lock"
    table = entry_obj.table
    bitmaps = table.bitmaps  # type: ignore[attr-defined]
    entry, bitmap = table[first], bitmaps[first]
    _runs(state, entry, bitmap, entry_obj.offset, first)
    mask = _mask(sub_first, sub_end)
    if entry & QCOW_OFLAG_COMPRESSED or (unallocated_only and bitmap & mask):
        return False
    new = (bitmap | mask << SUBCLUSTERS) & ~mask
    if new != bitmap:
        bitmaps[first] = new
        entry_obj.dirty = True
    return True


def on_cluster(state: ImageState, guest: int, func: Any, *args: Any) -> Any:
    """``func(state, table entry, index, index, *args)`` under the table lock of the
    cluster at *guest*, after any allocation in flight on it."""
    from .cluster import on_table
    index = (guest >> state.cluster_bits) & (state.l2_entries - 1)
    result: list[Any] = []

    def locked(state: ImageState, entry_obj: CacheEntry, first: int, last: int) -> None:
        result.append(func(state, entry_obj, first, last, *args))

    on_table(state, guest >> state.l1_shift, index, index, None, locked, None)
    return result[0]


def chain_reads_zero(state: ImageState, offset: int, length: int) -> bool:
    """QEMU's ``is_zero``: the block status of the whole chain says zero over all of
    [offset, offset+length).  Caller holds: the global lock."""
    if length <= 0:
        return True
    from .cluster import block_status
    return _extents_read_zero(state.backing, block_status(state, offset, length))


def _extents_read_zero(below: Any, extents: list[tuple[int, int, int, int]]) -> bool:
    for kind, guest, size, _ in extents:
        if kind in (ZERO_PLAIN, ZERO_ALLOC):
            continue
        if kind not in (UNALLOCATED, UNALLOCATED_ALLOC) or not _layer_reads_zero(below, guest, size):
            return False
    return True


def _layer_reads_zero(layer: Any, offset: int, length: int) -> bool:
    """The block status of a backing layer (and what is below it) says zero."""
    if layer is None or offset >= layer.size:
        return True
    length = min(length, layer.size - offset)
    if not hasattr(layer, "block_status"):  # a raw file: holes only
        from .storage import data_segments
        return not any(is_data for _, _, is_data in data_segments(layer.file.fd, offset, length))
    return _extents_read_zero(layer.backing, layer.block_status(offset, length))


def write_zeroes(state: ImageState, offset: int, length: int, cancel: CancelToken | None,
                 write_bytes: Any) -> None:
    """Make [offset, offset+length) read as zeros the way QEMU does on an extended
    image; *write_bytes(offset, length)* writes zeros where bits cannot do it.

    Caller holds: the global lock (shared or exclusive), no metadata lock.
    """
    sc = 1 << state.subcluster_bits
    size = state.header.size
    end = offset + length
    head_end = min(end, (offset + sc - 1) & ~(sc - 1)) if offset % sc else offset
    tail_start = end if end % sc == 0 or end == size else max(head_end, end & ~(sc - 1))
    if offset < head_end:
        _zero_partial(state, offset, head_end, write_bytes)
    if head_end < tail_start and not _zeroize(state, head_end, tail_start, cancel):
        write_bytes(head_end, tail_start - head_end)
    if tail_start < end:
        _zero_partial(state, tail_start, end, write_bytes)


def _zero_partial(state: ImageState, lo: int, hi: int, write_bytes: Any) -> None:
    """A piece within one subcluster: zero bits if the rest of the subcluster reads as
    zeros and it is not allocated, else zeros written."""
    sc = 1 << state.subcluster_bits
    index = (lo & (state.cluster_size - 1)) >> state.subcluster_bits
    zero_partial(state, lo, hi, sc, write_bytes, _zero_subclusters, index, index + 1, True)


def zero_partial(state: ImageState, lo: int, hi: int, granule: int, write_bytes: Any,
                 zero_locked: Any, *args: Any) -> None:
    """Zero [lo, hi), a part of one *granule* (a subcluster, or a cluster of a plain
    image), as QEMU's qcow2_co_pwrite_zeroes: when the rest of the granule reads as
    zeros already (the chain's block status; at the end of the disk there is no rest)
    and it is unallocated or zero, ``zero_locked(state, entry, index, index, *args)``
    makes all of it zero under its table's lock (checked again there: a write may have
    allocated it since; False when it did); else ``write_bytes(lo, hi - lo)``.
    Caller holds: the global lock, no metadata lock."""
    start = lo & ~(granule - 1)
    stop = min(start + granule, state.header.size) if hi != state.header.size else hi
    if (chain_reads_zero(state, start, lo - start) and chain_reads_zero(state, hi, stop - hi)
            and _subcluster_unallocated(state, start)
            and on_cluster(state, start, zero_locked, *args)):
        return
    write_bytes(lo, hi - lo)


def _subcluster_unallocated(state: ImageState, guest: int) -> bool:
    from .cluster import block_status
    kind = block_status(state, guest, 1)[0][0]
    return kind in (UNALLOCATED, UNALLOCATED_ALLOC, ZERO_PLAIN, ZERO_ALLOC)


def _zeroize(state: ImageState, lo: int, hi: int, cancel: CancelToken | None) -> bool:
    """``qcow2_subcluster_zeroize`` over subcluster-aligned [lo, hi): False when a
    partial cluster at either end is compressed (the caller writes zeros instead)."""
    from .cluster import zero_clusters
    cs, sb = state.cluster_size, state.subcluster_bits
    size = state.header.size
    head_end = min(hi, (lo + cs - 1) & ~(cs - 1))
    if lo % cs:
        first = (lo & (cs - 1)) >> sb
        end_sub = ((head_end - 1) & (cs - 1)) >> sb
        if not on_cluster(state, lo, _zero_subclusters, first, end_sub + 1):
            return False
    tail_start = hi if hi >= size else max(head_end, hi & ~(cs - 1))
    if head_end < tail_start:
        cluster_end = min((tail_start + cs - 1) & ~(cs - 1), (size + cs - 1) & ~(cs - 1))
        zero_clusters(state, head_end, cluster_end - head_end, False, cancel)
    if tail_start < hi:
        end_sub = ((hi - 1) & (cs - 1)) >> sb
        if not on_cluster(state, tail_start, _zero_subclusters, 0, end_sub + 1):
            return False
    return True
