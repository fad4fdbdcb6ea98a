"""Internal snapshots: create / apply / delete (the table's layout is in :mod:`.format`).

A snapshot is a copy of the active L1 table plus a table entry naming it.  Every L2
table and data cluster the copy reaches gets one more reference, so a write to the
active image copies a shared cluster (COPIED clear) before changing it.

Operations run with the image held exclusively and keep DESIGN §6's order:
increments reach the file before the tables that need them; the snapshot table and
the active L1 table change copy-on-write (new table written and synced, then the
header switched with one write); decrements are deferred until the update that
dropped the references is durable, so a crash leaves leaks at worst.
"""

from __future__ import annotations

import struct
import time
from array import array
from collections import Counter
from collections.abc import Iterator

from .errors import CorruptImage, FormatError, Qcow2Error, SnapshotNotFound
from .format import (L1E_OFFSET_MASK, L2E_OFFSET_MASK, MAX_SNAPSHOTS, OFF_NB_SNAPSHOTS, OFF_SIZE,
                     QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, SNAPSHOTS_POINTER, Snapshot,
                     compressed_host_range, div_round_up, l1_entries_for, parse_snapshot_table,
                     read_snapshot_table, serialize_snapshot_table, table_from_bytes,
                     table_to_bytes, with_copied)
from .state import ImageState
from .writeback import flush_everything, flush_locked


# The table's layout is defined in :mod:`qcow2rw.format`; these names stay importable here.
parse_table = parse_snapshot_table
serialize_table = serialize_snapshot_table


def table_length(state: ImageState) -> int:
    """Bytes the image's snapshot table occupies on disk (as QEMU measures it: no tail
    padding), read from the file; the length of the table serialized again when it
    cannot be read.  Caller holds: the image exclusively."""
    hdr = state.header
    if not hdr.nb_snapshots:
        return 0
    offset = hdr.snapshots_offset
    try:
        return read_snapshot_table(lambda pos, length: state.file.pread_exact(offset + pos, length),
                                   hdr.nb_snapshots)[2]
    except FormatError:
        return len(serialize_snapshot_table(state.snapshot_table))


def l1_references(state: ImageState, l1: array) -> Iterator[tuple[int, int]]:
    """The host byte ranges (offset, length) one L1 table references: each L2 table it
    names, then that table's data clusters (a compressed cluster's stored range).

    One range per reference, so a shared cluster appears once per L1 -> L2 path.
    Caller holds: the image exclusively (L2 tables are read through the cache).
    """
    cs, cb = state.cluster_size, state.cluster_bits
    for l1_entry in l1:
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        if l2_offset % cs:
            raise CorruptImage(f"L2 table offset {l2_offset:#x} unaligned")
        yield l2_offset, cs
        entry_obj = state.l2_cache.get(l2_offset)
        try:
            entries = list(entry_obj.table)
        finally:
            state.l2_cache.put(entry_obj)
        for entry in entries:
            if entry & QCOW_OFLAG_COMPRESSED:
                yield compressed_host_range(entry, cb)
            elif entry & L2E_OFFSET_MASK:
                yield entry & L2E_OFFSET_MASK, cs


# Operations --------------------------------------------------------------------

def find(snapshots: list[Snapshot], name: str, *, by_id: bool = True) -> Snapshot:
    """The snapshot whose id, else whose name, is *name* (QEMU's lookup order for
    applying one, find_snapshot_by_id_or_name); with *by_id* False by name only
    (qemu-img snapshot -d: bdrv_snapshot_find)."""
    try:
        return find_to_load(snapshots, name if by_id else (None, name))
    except SnapshotNotFound:
        raise SnapshotNotFound(f"snapshot '{name}' not found") from None


#: What ``qemu-img -l`` names: an id or a name (``-l X``: the id first, then the name),
#: or an (id, name) pair from ``-l snapshot.id=ID,snapshot.name=NAME`` (either may be
#: None), which must match as given.
SnapshotSelector = str | tuple[str | None, str | None]


def find_to_load(snapshots: list[Snapshot], selector: SnapshotSelector) -> Snapshot:
    """The snapshot *selector* names, as QEMU's ``bdrv_snapshot_load_tmp`` finds it: a
    string by id, else by name (``bdrv_snapshot_load_tmp_by_id_or_name``); a pair by
    the fields it gives, both matching when both are given
    (``find_snapshot_by_id_and_name``).  SnapshotNotFound with qemu-img's message."""
    if isinstance(selector, str):
        for snap in snapshots:
            if snap.id_str == selector:
                return snap
        snap_id, name = None, selector
    else:
        snap_id, name = selector
    for snap in snapshots:
        if ((snap_id is not None or name is not None)
                and (snap_id is None or snap.id_str == snap_id)
                and (name is None or snap.name == name)):
            return snap
    raise SnapshotNotFound("Failed to load snapshot: Can't find snapshot")


def _references(state: ImageState, l1: array) -> Counter[int]:
    """Clusters one L1 table reaches: its L2 tables and, per L2 table, their data.

    Caller holds: the image exclusively.
    """
    cb = state.cluster_bits
    refs: Counter[int] = Counter()
    for offset, length in l1_references(state, l1):
        for cluster in range(offset >> cb, ((offset + length - 1) >> cb) + 1):
            refs[cluster] += 1
    return refs


def _check_room(state: ImageState, increments: Counter[int]) -> None:
    """Refuse, before changing anything, increments a refcount could not hold."""
    limit = state.refcounts.max_refcount
    for cluster, count in increments.items():
        if state.refcounts.get(cluster) + count > limit:
            raise Qcow2Error(f"Could not create snapshot: refcount of cluster {cluster} would "
                             f"exceed {limit} (refcount_bits={state.header.refcount_bits})")


def _fix_copied(state: ImageState, l1: array, refcount: dict[int, int] | None = None) -> None:
    """Set OFLAG_COPIED exactly where the (final) refcount is 1, in *l1* and its L2 tables.

    *refcount* overrides the stored refcounts for clusters whose count is about to
    change.  Caller holds: the image exclusively.
    """
    cb = state.cluster_bits
    refs = state.refcounts

    def final(cluster: int) -> int:
        return refcount[cluster] if refcount is not None and cluster in refcount else refs.get(cluster)

    for index, l1_entry in enumerate(l1):
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        entry_obj = state.l2_cache.get(l2_offset)
        try:
            table = entry_obj.table
            for i, entry in enumerate(table):
                host = entry & L2E_OFFSET_MASK
                if entry & QCOW_OFLAG_COMPRESSED or not host:
                    continue
                want = with_copied(entry, final(host >> cb))
                if want != entry:
                    table[i] = want
                    entry_obj.dirty = True
        finally:
            state.l2_cache.put(entry_obj)
        want = with_copied(l1_entry, final(l2_offset >> cb))
        if want != l1_entry:
            l1[index] = want
            if l1 is state.l1.entries:
                state.l1.dirty.add(index)


def _write_table(state: ImageState, snapshots: list[Snapshot]) -> None:
    """Write the snapshot table copy-on-write and switch the header to it."""
    hdr = state.header
    data = serialize_snapshot_table(snapshots)
    offset = state.refcounts.alloc_contiguous(div_round_up(len(data), state.cluster_size)) if data else 0
    flush_locked(state)  # the new table's refcounts first
    if data:
        state.check_metadata_write(offset, len(data), -1)
        state.file.pwrite(offset, data)
    state.file.flush()
    old_offset, old_length = hdr.snapshots_offset, table_length(state)
    state.file.pwrite(OFF_NB_SNAPSHOTS, SNAPSHOTS_POINTER.pack(len(snapshots), offset))
    state.file.flush()
    hdr.nb_snapshots, hdr.snapshots_offset = len(snapshots), offset
    state.snapshot_table = list(snapshots)
    if old_offset and old_length:
        state.refcounts.free_later(old_offset >> state.cluster_bits,
                                 div_round_up(old_length, state.cluster_size))


def _read_l1(state: ImageState, snap: Snapshot) -> array:
    return table_from_bytes(state.file.pread_exact(snap.l1_table_offset, snap.l1_size * 8))


def create(state: ImageState, name: str) -> Snapshot:
    """Take an internal snapshot of the active image.  Caller holds: the image exclusively."""
    if len(state.snapshot_table) >= MAX_SNAPSHOTS:
        raise Qcow2Error("Too many snapshots")
    if any(snap.name == name for snap in state.snapshot_table):
        # qemu-img 7.2 would add a second one; QMP's snapshot-save refuses, and so do we:
        # a tag must name one snapshot for apply and delete to mean what the user thinks.
        raise Qcow2Error(f"Snapshot '{name}' already exists")
    flush_everything(state)
    hdr = state.header
    increments = _references(state, state.l1.entries)
    _check_room(state, increments)
    copy = array("Q", (e & ~QCOW_OFLAG_COPIED for e in state.l1.entries))
    l1_offset = 0
    if hdr.l1_size:
        l1_offset = state.refcounts.alloc_contiguous(div_round_up(hdr.l1_size * 8, state.cluster_size))
        state.check_metadata_write(l1_offset, hdr.l1_size * 8, -1)
        state.file.pwrite(l1_offset, table_to_bytes(copy))
    for cluster, count in increments.items():
        state.refcounts.increment(cluster, count)
    _fix_copied(state, state.l1.entries)
    flush_locked(state)  # increments, the L1 copy, then the cleared COPIED flags
    now = time.time()
    ids = [int(s.id_str) for s in state.snapshot_table if s.id_str.isdigit()]
    snap = Snapshot(l1_table_offset=l1_offset, l1_size=hdr.l1_size,
                    id_str=str(max(ids, default=0) + 1), name=name, date_sec=int(now),
                    date_nsec=int(now % 1 * 1_000_000) * 1000, disk_size=hdr.size, icount=0)
    _write_table(state, state.snapshot_table + [snap])
    flush_locked(state)
    return snap


def apply(state: ImageState, name: str) -> None:
    """Revert the active image to snapshot *name* (its L1 table and its disk size).

    Caller holds: the image exclusively.
    """
    snap = find(state.snapshot_table, name)
    flush_everything(state)
    hdr, cs, cb = state.header, state.cluster_size, state.cluster_bits
    new_size = snap.disk_size if snap.disk_size is not None else hdr.size
    entries = max(snap.l1_size, l1_entries_for(new_size, cb, state.l2_bits), 1)
    new_l1 = _read_l1(state, snap)
    new_l1.extend([0] * (entries - len(new_l1)))
    increments = _references(state, new_l1)
    decrements = _references(state, state.l1.entries)
    _check_room(state, increments)
    for cluster, count in increments.items():
        state.refcounts.increment(cluster, count)
    final = {c: state.refcounts.get(c) - decrements[c] for c in decrements}
    _fix_copied(state, new_l1, final)
    new_offset = state.refcounts.alloc_contiguous(div_round_up(entries * 8, cs))
    flush_locked(state)  # increments and the new tables' flags before the switch
    state.check_metadata_write(new_offset, entries * 8, -1)
    state.file.pwrite(new_offset, table_to_bytes(new_l1))
    state.file.flush()
    old_offset, old_size = hdr.l1_table_offset, hdr.l1_size
    state.file.pwrite(OFF_SIZE, struct.pack(">QIIQ", new_size, hdr.crypt_method, entries, new_offset))
    state.file.flush()
    hdr.size, hdr.l1_size, hdr.l1_table_offset = new_size, entries, new_offset
    state.l1.entries = new_l1
    state.l1.dirty.clear()
    for cluster, count in decrements.items():
        for _ in range(count):
            state.refcounts.free_later(cluster)
    if old_size:
        state.refcounts.free_later(old_offset >> cb, div_round_up(old_size * 8, cs))
    flush_locked(state)


def delete(state: ImageState, name: str) -> None:
    """Delete the snapshot named *name* (by name only, as qemu-img snapshot -d), freeing
    what only it held.  Caller holds: the image exclusively."""
    snap = find(state.snapshot_table, name, by_id=False)
    flush_everything(state)
    cs, cb = state.cluster_size, state.cluster_bits
    decrements = _references(state, _read_l1(state, snap))
    _write_table(state, [s for s in state.snapshot_table if s is not snap])
    for cluster, count in decrements.items():
        for _ in range(count):
            state.refcounts.free_later(cluster)
    if snap.l1_size:
        state.refcounts.free_later(snap.l1_table_offset >> cb, div_round_up(snap.l1_size * 8, cs))
    flush_locked(state)  # the table switch is durable: now the decrements
    _fix_copied(state, state.l1.entries)
    flush_locked(state)
