"""``qemu-img amend`` for qcow2: compat level, lazy refcounts, refcount width.

Each change runs with the image held exclusively, flushes everything first, and
ends with the header rewritten in one write of its first sector(s).
- ``compat=0.10`` (downgrade) expands zero clusters, in the active and the snapshot
  tables, because version 2 has no zero flag; it refuses what version 2 cannot
  express (refcount widths other than 16, zstd, extended L2, external data), like
  qemu-img.
- ``compat=1.1`` (upgrade) rewrites the header as version 3.
- ``lazy_refcounts`` sets or clears the compatible bit (refcounts are written back
  and the dirty bit cleared first when turning it off).
- ``refcount_bits`` builds complete new refcount structures of the new width past the
  end of the file (blocks, then the table, synced), switches the header to them in one
  write, and leaves the old structures as free clusters; a crash before the switch
  leaves the old structures in charge and the new ones as unreferenced file tail.
"""

from __future__ import annotations

from array import array

from .errors import Qcow2Error, UnsupportedFeature
from .format import (COMPAT_LAZY_REFCOUNTS, COMPAT_VERSIONS, COMPRESSION_ZLIB, INCOMPAT_CORRUPT,
                     INCOMPAT_DIRTY, L1E_OFFSET_MASK, L2E_OFFSET_MASK, MAX_REFTABLE_SIZE,
                     QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO, ZERO_ALLOC, ZERO_PLAIN, cluster_kind,
                     compat_error, div_round_up, refcount_order_of, refcount_width_error,
                     serialize_header, table_from_bytes, table_to_bytes)
from .refcount import RefBlock, RefcountManager
from .state import ImageState
from .writeback import flush_everything



def amend(state: ImageState, *, compat: str | None = None, lazy_refcounts: bool | None = None,
          refcount_bits: int | None = None) -> None:
    """Change the image's format options.  Caller holds: the image exclusively."""
    hdr = state.header
    version = COMPAT_VERSIONS.get(compat, None) if compat is not None else hdr.version
    if version is None:
        raise Qcow2Error(f"Invalid compatibility level: '{compat}'")
    width = refcount_bits if refcount_bits is not None else hdr.refcount_bits
    problem = refcount_width_error(width)
    if problem:
        raise Qcow2Error(problem)
    if version < 3 and width != 16:  # (qemu-img's two words for it)
        if refcount_bits is not None and refcount_bits != hdr.refcount_bits:
            raise Qcow2Error("Refcount widths other than 16 bits require compatibility "
                             "level 1.1 or above (use compat=1.1 or greater)")
        raise Qcow2Error("compat=0.10 requires refcount_bits=16")
    lazy = hdr.lazy_refcounts if lazy_refcounts is None else lazy_refcounts
    # (QEMU holds lazy refcounts against the version only when they are turned on; a
    # downgrade drops them with the other compatible features)
    problem = compat_error(version, lazy_refcounts=lazy and not hdr.lazy_refcounts,
                           refcount_bits=width, amend=True)
    if problem:
        raise Qcow2Error(problem)
    if version == 2 and (hdr.compression_type != COMPRESSION_ZLIB or hdr.extended_l2
                         or hdr.data_file):
        raise UnsupportedFeature("Cannot downgrade an image with zstd compression, extended "
                                 "L2 entries or an external data file")
    flush_everything(state)
    if width != hdr.refcount_bits:
        change_refcount_width(state, width)
    if version == 2 and hdr.version == 3:
        _expand_zero_clusters(state)
    hdr.version = version
    if version == 2:
        hdr.incompatible_features &= INCOMPAT_DIRTY | INCOMPAT_CORRUPT
        hdr.compatible_features = hdr.autoclear_features = 0
        hdr.incompatible_features &= ~INCOMPAT_DIRTY
        lazy = False
    if lazy:
        hdr.compatible_features |= COMPAT_LAZY_REFCOUNTS
    else:
        hdr.compatible_features &= ~COMPAT_LAZY_REFCOUNTS
        hdr.incompatible_features &= ~INCOMPAT_DIRTY
    state.has_zero_flag = version >= 3
    state.file.before_first_write()  # (it clears the autoclear bits in hdr: first)
    data = serialize_header(hdr)
    state.file.pwrite(0, data)
    state.file.flush()


def _expand_zero_clusters(state: ImageState) -> None:
    """Replace zero-flagged entries for version 2, in every L2 table any L1 table reaches.

    A plain zero cluster becomes unallocated when nothing shows through (no backing
    file), else a newly allocated cluster of zeros; a zero-allocated cluster gets its
    host cluster filled with zeros and keeps it.  Data is written and synced before
    the entries change.
    """
    cs = state.cluster_size
    zeros = bytes(cs)
    l1_tables = [state.l1.entries]
    for snap in state.snapshot_table:
        l1_tables.append(table_from_bytes(state.file.pread_exact(snap.l1_table_offset, snap.l1_size * 8)))
    seen: set[int] = set()
    for l1 in l1_tables:
        for l1_entry in l1:
            l2_offset = l1_entry & L1E_OFFSET_MASK
            if not l2_offset or l2_offset in seen:
                continue
            seen.add(l2_offset)
            entry_obj = state.l2_cache.get(l2_offset)
            try:
                table = entry_obj.table
                for i, entry in enumerate(table):
                    kind = cluster_kind(entry)
                    if kind != ZERO_PLAIN and kind != ZERO_ALLOC:
                        continue
                    host = entry & L2E_OFFSET_MASK
                    if kind == ZERO_ALLOC:
                        state.check_metadata_write(host, cs, -1)
                        state.file.pwrite(host, zeros)
                        table[i] = entry & ~QCOW_OFLAG_ZERO
                    elif state.backing is None:
                        table[i] = 0
                    else:  # one reference per L1 table that reaches this L2 table
                        host = state.refcounts.alloc(1)
                        state.check_metadata_write(host, cs, -1)
                        state.file.pwrite(host, zeros)
                        visits = state.refcounts.get(l2_offset >> state.cluster_bits)
                        if visits > 1:
                            state.refcounts.increment(host >> state.cluster_bits, visits - 1)
                        table[i] = host | (QCOW_OFLAG_COPIED if visits == 1 else 0)
                    entry_obj.dirty = True
            finally:
                state.l2_cache.put(entry_obj)
    flush_everything(state)


class _OldCounts:
    """The refcounts of the image's current structures, read block by block (one cached)."""

    def __init__(self, state: ImageState) -> None:
        self.refcounts = state.refcounts
        self.block_bits = state.refcounts.block_bits
        self.index = -1
        self.values: array | None = None

    def range(self, first: int, count: int) -> list[int]:
        """Refcounts of clusters ``first .. first + count - 1`` (0 where no block)."""
        out: list[int] = []
        rc, bits = self.refcounts, self.block_bits
        pos, end = first, first + count
        while pos < end:
            index = pos >> bits
            stop = min(end, (index + 1) << bits)
            if index != self.index:
                offset = rc._block_offset(index)
                self.values = rc._load_block(offset).values if offset else None
                self.index = index
            if self.values is None:
                out.extend([0] * (stop - pos))
            else:
                base = index << bits
                out.extend(self.values[pos - base:stop - base])
            pos = stop
        return out


def change_refcount_width(state: ImageState, width: int) -> None:
    """Rewrite the refcount structures with *width*-bit entries (``amend -o refcount_bits``).

    Memory stays at a few blocks whatever the image size.  Caller holds: the image
    exclusively; caches flushed.
    """
    hdr, rc = state.header, state.refcounts
    cs, cb = state.cluster_size, state.cluster_bits
    order = refcount_order_of(width)
    entries = 1 << (cb + 3 - order)  # refcounts per new block
    old_blocks = [rc._block_offset(i) >> cb for i in range(len(rc.reftable))]
    old_structure = {c for c in old_blocks if c}
    table_first = hdr.refcount_table_offset >> cb
    old_structure.update(range(table_first, table_first + hdr.refcount_table_clusters))
    end = div_round_up(state.file.size(), cs)  # no cluster at or past this has a refcount
    old = _OldCounts(state)

    def counts(block: int) -> list[int]:
        first = block * entries
        values = old.range(first, max(0, min(entries, end - first)))
        for i, value in enumerate(values):
            if value and first + i in old_structure:
                values[i] = 0  # freed by the switch
            elif value >> width:
                raise Qcow2Error(f"Cannot decrease refcount entry width to {width} bits: Cluster "
                                 f"at offset {(first + i) << cb:#x} has a refcount of {value}")
        return values

    used = [b for b in range(div_round_up(end, entries)) if any(counts(b))]
    # The new structures go at the end of the file, clusters end .. end + size - 1:
    # iterate up to the least size that holds the table and every block, including
    # the blocks that describe the new structures themselves.
    size = 0
    while True:
        own = range(end // entries, (end + size - 1) // entries + 1) if size else range(0)
        blocks = sorted(set(used).union(own))
        table_clusters = div_round_up((blocks[-1] + 1) * 8, cs) if blocks else 1
        needed = table_clusters + len(blocks)
        if needed == size:
            break
        size = needed
    if table_clusters * cs > MAX_REFTABLE_SIZE:
        raise Qcow2Error("This operation would make the refcount table grow beyond the maximum "
                         "size supported by QEMU, aborting")
    reftable = array("Q", bytes(table_clusters * cs))
    state.check_metadata_write(end << cb, size << cb, -1)  # past the end: a sanity check
    place = end
    for block in blocks:
        first = block * entries
        values = counts(block)
        values.extend([0] * (entries - len(values)))
        for cluster in range(max(first, end), min(first + entries, end + size)):
            values[cluster - first] = 1  # the new structures themselves
        new_block = RefBlock.empty(width, entries)
        new_block.values[:] = array(new_block.values.typecode, values)
        state.file.pwrite(place << cb, new_block.to_bytes())
        reftable[block] = place << cb
        place += 1
    state.file.pwrite(place << cb, table_to_bytes(reftable))
    state.file.flush()
    hdr.refcount_order = order
    hdr.refcount_table_offset, hdr.refcount_table_clusters = place << cb, table_clusters
    state.file.pwrite(0, serialize_header(hdr))
    state.file.flush()
    state.refcounts = RefcountManager(state.file, hdr, rc.cache.capacity, rc.in_use)
