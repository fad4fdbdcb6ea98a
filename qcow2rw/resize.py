"""Changing the virtual size: grow (the L1 table copy-on-write), shrink, preallocate.

Everything here runs with the image held exclusively (``Image.resize`` takes it;
``create`` holds it too) and keeps DESIGN §6's order: a grown L1 table is written
and synced before the header is switched to it, and the old one is freed after.
Every function takes the image's :class:`~qcow2rw.state.ImageState`.
"""

from __future__ import annotations

from array import array

from .cluster import for_each_table, free_entry_later, get_l2_for_write, write_zeroes_locked
from .errors import OutOfRange, Qcow2Error, UnsupportedFeature
from .format import (AUTOCLEAR_DATA_FILE_RAW, L1_POINTER, OFF_L1_SIZE, OFF_SIZE, QCOW_OFLAG_COPIED, div_round_up,
                     l1_entries_for, table_to_bytes)
from .state import ImageState
from .writeback import flush_everything, flush_locked

__all__ = ["PREALLOCATION_MODES", "check_resize", "preallocate", "resize_held"]

PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")

MAX_ACTIVE_L1_BYTES = 32 * 1024 * 1024


def check_resize(new_size: int, preallocation: str) -> None:
    """Refuse a bad size or preallocation mode before anything is taken."""
    if new_size < 0 or new_size % 512:
        raise OutOfRange("The new size must be a multiple of 512")
    if preallocation not in PREALLOCATION_MODES:
        raise OutOfRange(f"Invalid preallocation mode '{preallocation}'")


def resize_held(state: ImageState, new_size: int, *, shrink: bool, preallocation: str,
                hide_backing: bool) -> None:
    """``Image.resize``; *hide_backing* False (for ``create`` only) lets the backing
    file show through the new area instead of zeroing it.

    Caller holds: the image exclusively (and checked it is open and writable).
    """
    old_size = state.header.size
    shrinking = new_size < old_size
    if new_size != old_size and state.header.nb_snapshots and state.header.version < 3:
        raise UnsupportedFeature("Can't resize a v2 image which has snapshots")
    # The new area must read as zeros, not as the backing file, where the backing file
    # reaches past the old end (QEMU's bdrv_co_truncate: BDRV_REQ_ZERO_WRITE only if
    # backing_len > old_size); else nothing is below it and it stays unallocated.
    backed = hide_backing and bool(state.header.backing_file) and (
        state.backing is None or state.backing.size > old_size)
    if new_size > old_size and backed:
        # The new area must read as zeros, not as the backing file (QEMU zeroes it).
        if not state.has_zero_flag:
            raise UnsupportedFeature("Failed to zero out new clusters: Operation not "
                                     "supported")
        if state.backing is None:
            raise UnsupportedFeature("cannot grow an image opened without its backing "
                                     "file")
    if shrinking:
        if not shrink:
            raise Qcow2Error("Use the --shrink option to perform a shrink operation.")
        if preallocation != "off":
            raise Qcow2Error("Preallocation can only be used for growing images")
        _shrink(state, new_size)
    else:
        _grow_l1(state, l1_entries_for(new_size, state.cluster_bits, state.l2_bits))
    state.file.pwrite(OFF_SIZE, new_size.to_bytes(8, "big"))
    state.file.flush()
    state.header.size = new_size
    if shrinking:
        _truncate_after_last_cluster(state)
        if state.external:  # (QEMU truncates the data file too)
            _resize_data_file(state, new_size)
    elif new_size > old_size:
        if state.external:
            if state.header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW and preallocation == "off":
                preallocation = "metadata"  # (QEMU: the data file stays a raw image)
            _resize_data_file(state, new_size)
        if preallocation != "off":
            preallocate(state, preallocation, old_size)
        if backed:
            write_zeroes_locked(state, old_size, new_size - old_size, None)
            flush_locked(state)


def _resize_data_file(state: ImageState, new_size: int) -> None:
    """An external data file follows the virtual size (grown, or cut), as QEMU's.
    Caller holds: exclusive."""
    datafile = state.datafile
    if datafile is not None and datafile.size() != new_size:
        datafile.truncate(new_size)
        datafile.flush()


def _shrink(state: ImageState, new_size: int) -> None:
    """Drop every reference of the active image past *new_size*.

    Caller holds: the image exclusively.
    """
    cs = state.cluster_size
    start = (new_size + cs - 1) & ~(cs - 1)
    keep_tables = l1_entries_for(start, state.cluster_bits, state.l2_bits)
    # (to the end of the old last cluster: a partial one goes whole, as in QEMU)
    table_end = min((state.header.size + cs - 1) & ~(cs - 1), keep_tables << state.l1_shift)
    if start < table_end:  # the tail of the last table kept: unallocate its clusters
        for_each_table(state, start, table_end - start, None, None, _drop_clusters)
    l1 = state.l1
    for index in range(keep_tables, len(l1.entries)):
        l2_offset = state.l2_offset(index)
        if not l2_offset:
            continue
        entry_obj = state.l2_cache.get(l2_offset)
        try:
            entries = list(entry_obj.table)
        finally:
            state.l2_cache.put(entry_obj)
        with state.alloc_lock:
            for entry in entries:
                free_entry_later(state, entry)
            state.refcounts.free_later(l2_offset >> state.cluster_bits)
        l1.entries[index] = 0
        l1.dirty.add(index)
    flush_everything(state)


def _drop_clusters(state: ImageState, l1_index: int, guest: int, length: int,
                   _: None) -> None:
    """Make whole clusters of one table unallocated (full discard).  Caller holds: exclusive."""
    if not state.l2_offset(l1_index):
        return
    entry_obj = get_l2_for_write(state, l1_index)
    try:
        table = entry_obj.table
        bitmaps = table.bitmaps if state.extended else None  # (extended L2: its bitmaps)
        first = (guest >> state.cluster_bits) & (state.l2_entries - 1)
        with state.alloc_lock:
            for i in range(first, first + (length >> state.cluster_bits)):
                if table[i]:
                    free_entry_later(state, table[i])
                    table[i] = 0
                    entry_obj.dirty = True
                if bitmaps is not None and bitmaps[i]:  # (unallocated: no bit may stay set)
                    bitmaps[i] = 0
                    entry_obj.dirty = True
    finally:
        state.l2_cache.put(entry_obj)


def _truncate_after_last_cluster(state: ImageState) -> None:
    """Cut the file after its last cluster with a refcount.  Caller holds: exclusive."""
    last = div_round_up(state.file.size(), state.cluster_size) - 1
    while last > 0 and not state.refcounts.get(last):
        last -= 1
    end = (last + 1) * state.cluster_size
    if end < state.file.size():
        state.file.truncate(end)
        state.file.flush()


def _grow_l1(state: ImageState, entries: int) -> None:
    """Give the L1 table at least *entries* entries: new table, sync, switch, free old.

    Caller holds: the image exclusively.
    """
    hdr = state.header
    if entries <= hdr.l1_size:
        return
    if entries * 8 > MAX_ACTIVE_L1_BYTES:
        raise Qcow2Error("Active L1 table too large")
    state.fire("l1_grow")
    flush_everything(state)
    l1 = state.l1
    new_table = array("Q", l1.entries)
    new_table.extend([0] * (entries - len(new_table)))
    clusters = div_round_up(entries * 8, state.cluster_size)
    new_offset = state.refcounts.alloc_contiguous(clusters)
    if not hdr.lazy_refcounts:
        state.refcounts.flush()
    state.check_metadata_write(new_offset, entries * 8, -1)
    state.file.pwrite(new_offset, table_to_bytes(new_table))
    state.file.flush()
    old_offset, old_size = hdr.l1_table_offset, hdr.l1_size
    state.file.pwrite(OFF_L1_SIZE, L1_POINTER.pack(entries, new_offset))
    state.file.flush()
    hdr.l1_size, hdr.l1_table_offset = entries, new_offset
    l1.entries = new_table
    state.metadata_moved(None)
    if old_size:
        old_clusters = div_round_up(old_size * 8, state.cluster_size)
        state.refcounts.free_later(old_offset >> state.cluster_bits, old_clusters)
    flush_locked(state)


def preallocate(state: ImageState, mode: str, start: int = 0) -> None:
    """Allocate the L2 tables and data clusters of guest bytes *start* .. the image's end.

    QEMU's layout: each L2 table, then its data clusters; clusters already allocated
    are kept.  ``falloc`` and ``full`` also reserve or zero-fill the data on the host.
    Takes the image exclusively (``create`` and ``resize`` already hold it).
    """
    cs, cb = state.cluster_size, state.cluster_bits
    l2_entries = state.l2_entries
    total = (state.header.size + cs - 1) >> cb
    first_cluster = start >> cb
    data_ranges: list[tuple[int, int]] = []
    with state.exclusive():
        for l1_index in range(first_cluster // l2_entries,
                              (total + l2_entries - 1) // l2_entries):
            base = l1_index * l2_entries
            lo = max(first_cluster - base, 0)
            hi = min(l2_entries, total - base)
            entry_obj = get_l2_for_write(state, l1_index)
            try:
                table = entry_obj.table
                index = lo
                while index < hi:
                    if table[index]:
                        index += 1
                        continue
                    run = 1
                    while (index + run < hi and run < state.refcounts.max_run
                           and not table[index + run]):
                        run += 1
                    if state.external:  # the guest offset in the data file, unclaimed
                        host = (base + index) << cb
                    else:
                        host = state.refcounts.alloc(run)
                    for k in range(run):
                        table[index + k] = (host + (k << cb)) | QCOW_OFLAG_COPIED
                    if data_ranges and sum(data_ranges[-1]) == host:
                        data_ranges[-1] = (data_ranges[-1][0], data_ranges[-1][1] + (run << cb))
                    else:
                        data_ranges.append((host, run << cb))
                    entry_obj.dirty = True
                    index += run
            finally:
                state.l2_cache.put(entry_obj)
        flush_locked(state)
        datafile = state.datafile
        end = max((first + length for first, length in data_ranges), default=0)
        for data_start, length in data_ranges:
            if mode == "falloc":
                datafile.allocate(data_start, length)
            elif mode == "full":
                _write_zeros(state, data_start, length)
        if datafile.size() < end and not state.external:
            datafile.truncate(end)
        datafile.flush()


def _write_zeros(state: ImageState, start: int, length: int) -> None:
    chunk = bytes(min(length, 1 << 20))
    pos = 0
    while pos < length:
        n = min(len(chunk), length - pos)
        state.datafile.pwrite(start + pos, chunk[:n])
        pos += n
