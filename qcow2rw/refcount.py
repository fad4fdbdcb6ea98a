"""Refcount table, refcount blocks and the cluster allocator.

Every host cluster in use (header, tables, data) has a refcount; a cluster with
refcount 0 is free.  Refcount blocks are cached write-back in a
:class:`~qcow2rw.cache.MetadataCache`; the refcount table is held whole in memory
(it is at most 8 MiB, QEMU's limit).

Ordering (DESIGN §6), kept here:
- an increment is applied at once in the cache and reaches the file before any L2
  or L1 entry that points to the cluster (the image calls :meth:`flush` and syncs
  before writing those back);
- a decrement is *deferred* (:meth:`free_later`) and applied by
  :meth:`apply_frees` only after the update that dropped the reference is
  durable, so a freed cluster is never reused, nor written as free, too early;
- the table grows copy-on-write: new blocks and table written and synced, the
  header switched with one write, then the old table freed (deferred).

No I/O under the allocator lock where the order does not need it: a request's
write-back of refcount changes is taken under the allocator lock as bytes
(:meth:`RefcountManager.take_writeback`) and written without it
(:meth:`RefcountManager.run_writeback`), under the image's refcount I/O lock, which
keeps write-backs in order.  A table growth made by a request is prepared in memory
(new blocks in the cache, the new table in ``reftable``) and committed by the next
write-back: allocations go on meanwhile, into the new blocks, and nothing that
depends on them reaches the file before the commit (every L2 write-back and flush
goes through a write-back first).  Exclusive operations commit at once.  The
write-back protocol itself is :mod:`.refwriteback` (the manager's base class).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Callable

from .cache import CacheEntry, MetadataCache
from .errors import CorruptImage, Qcow2Error
from .format import (
    MAX_REFTABLE_SIZE,
    REFT_OFFSET_MASK,
    REFT_RESERVED_MASK,
    Header,
    div_round_up,
    table_from_bytes,
)
from .locks import NULL_LOCK
from .overlap import REFCOUNT_BLOCK
from .refwriteback import Growth, RefcountWriteback, Writeback
from .storage import HostFile

_ARRAY_CODES = {8: "B", 16: "H", 32: "I" if array("I").itemsize == 4 else "L", 64: "Q"}
_NEEDS_SWAP = sys.byteorder == "little"


class RefcountOverflow(Qcow2Error):
    """A refcount would exceed the maximum its width allows."""


class RefBlock:
    """The refcounts of one refcount block, one array item per entry.

    Widths below 8 bits are unpacked to one byte per entry in memory and packed again
    (least significant bits first, as the spec says) when written.
    """

    __slots__ = ("bits", "values", "version")

    def __init__(self, bits: int, values: array) -> None:
        self.bits = bits
        self.values = values
        self.version = 0  # bumped at each change: a write-back of an older copy leaves it dirty

    @classmethod
    def empty(cls, bits: int, entries: int) -> RefBlock:
        """A block of *entries* zero refcounts."""
        code = _ARRAY_CODES.get(bits, "B")
        return cls(bits, array(code, bytes(entries * array(code).itemsize)))

    @classmethod
    def from_bytes(cls, bits: int, data: bytes) -> RefBlock:
        """Parse a refcount block cluster."""
        if bits >= 8:
            values = array(_ARRAY_CODES[bits])
            values.frombytes(data)
            if _NEEDS_SWAP and bits > 8:
                values.byteswap()
            return cls(bits, values)
        unpack = _UNPACK[bits]
        return cls(bits, array("B", b"".join([unpack[b] for b in data])))

    def to_bytes(self) -> bytes:
        """Serialize for the file."""
        if self.bits >= 8:
            if _NEEDS_SWAP and self.bits > 8:
                copy = array(self.values.typecode, self.values)
                copy.byteswap()
                return copy.tobytes()
            return self.values.tobytes()
        per = 8 // self.bits
        pack = _PACK[self.bits]
        raw = self.values.tobytes()
        return bytes([pack[raw[i:i + per]] for i in range(0, len(raw), per)])


def _make_bit_tables() -> tuple[dict[int, list[bytes]], dict[int, dict[bytes, int]]]:
    unpack: dict[int, list[bytes]] = {}
    pack: dict[int, dict[bytes, int]] = {}
    for bits in (1, 2, 4):
        per, mask = 8 // bits, (1 << bits) - 1
        table = [bytes((b >> (k * bits)) & mask for k in range(per)) for b in range(256)]
        unpack[bits] = table
        pack[bits] = {v: b for b, v in enumerate(table)}
    return unpack, pack


_UNPACK, _PACK = _make_bit_tables()


def _busy(in_use: tuple[tuple[int, int], ...], cluster: int) -> bool:
    """True if *cluster* lies in one of the in-use ranges."""
    return any(first <= cluster < first + count for first, count in in_use)


class RefcountManager(RefcountWriteback):
    """The refcount structures of one image and the cluster allocator.

    Caller holds: the image's allocator lock, or the image exclusively (an exclusive
    holder needs no inner lock), for every method but :meth:`run_writeback` (the
    refcount I/O lock); that guards every field here and the refcount block cache
    (whose entries therefore need no lock of their own).  In debug mode the image
    sets :attr:`check_caller`, which every entry point calls to prove it.  ``free_hint`` is the lowest cluster index that may be free;
    ``no_run`` (hint, below, count) says that, while ``free_hint`` is still *hint*,
    no free run of *count* clusters or more starts below *below* (the holes there
    are smaller): longer searches start at *below*; ``full_blocks`` lists the blocks
    with no free cluster, which a search skips without loading them;
    ``reftable_dirty`` lists table indices changed in memory only; ``in_use`` (owned
    by the image) lists the (first, count) host cluster ranges that requests are
    doing I/O on: such a cluster is never handed out, even when its refcount has
    dropped to 0.  ``increments`` counts refcount increments and
    ``flushed_increments`` is its value when the blocks were last written back.
    ``written_mark`` is the :meth:`HostFile.sync_mark` after the last refcount block
    or table write returned: what depends on them waits for a sync numbered above it.
    ``table_offset``/``table_clusters`` locate the in-memory ``reftable`` (the
    header's until a growth is committed); ``pending_growth`` is a growth prepared
    but not yet taken by a write-back, ``committing`` one being written.
    """

    def __init__(self, file: HostFile, header: Header, cache_entries: int,
                 in_use: list[tuple[int, int]] | None = None) -> None:
        self.file = file
        self.header = header
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.bits = header.refcount_bits
        self.max_refcount = (1 << self.bits) - 1
        self.block_bits = header.refcount_block_bits
        self.block_entries = 1 << self.block_bits
        # A free run can always be found up to this length: every block range holds
        # its own block somewhere, which leaves at most block_entries - 1 in a row.
        self.max_run = self.block_entries // 2
        self.reftable = self._read_reftable()
        self.reftable_dirty: set[int] = set()
        self.cache = MetadataCache("refcount block", cache_entries, self._load_block,
                                   self._store_block, lambda: NULL_LOCK)
        self.free_hint = 0
        self.no_run: tuple[int, int, int] | None = None
        #: Indices of refcount blocks known to hold no refcount of 0 (seen whole by a
        #: search; left by the first refcount that drops to 0): searches skip them.
        self.full_blocks: set[int] = set()
        # Clusters at or above high_water were never written since the file was
        # opened and lie past its size then: they read as zeros.  last_alloc_fresh
        # tells whether the run alloc() returned last lies entirely there.
        self.high_water = div_round_up(file.size(), self.cluster_size)
        self.last_alloc_fresh = False
        #: Host byte offset where the next compressed fragment may go (QEMU's
        #: free_byte_offset), inside a cluster that holds fragments; 0: none.
        self.compressed_next = 0
        self.deferred_frees: list[int] = []  # cluster indices whose refcount drops by one later
        self.in_use: list[tuple[int, int]] = in_use if in_use is not None else []
        self.increments = 0
        self.flushed_increments = 0
        self.written_mark = -1
        self.table_offset = header.refcount_table_offset
        self.table_clusters = header.refcount_table_clusters
        self.pending_growth: Growth | None = None
        self.committing: Growth | None = None
        #: The write-back taken and not yet ended (finished or aborted), if any: an
        #: interrupt that loses it leaves it here for :meth:`abort_writeback`.
        #: Guarded by the allocator lock; one at a time (the refcount I/O lock).
        self.taken: Writeback | None = None
        #: Set by the image: True when a growth may wait for the next write-back (a
        #: shared request), False to commit it at once (the image held exclusively).
        self.defer_growth: Callable[[], bool] | None = None
        # Set by the image: the overlap check before a write of (offset, length, kind),
        # and the report of a new block (its offset) or of moved structures (None).
        self.before_write: Callable[[int, int, int], None] | None = None
        self.on_change: Callable[[int | None], None] | None = None
        #: Set by the image: the refcount table is now also at (offset, length), and
        #: the one at (offset, length) is no longer live (a growth's prepare and commit).
        self.on_table_added: Callable[[int, int], None] | None = None
        self.on_table_dropped: Callable[[int, int], None] | None = None
        self.on_corruption: Callable[[str], None] | None = None  # raises CorruptImage
        #: Set by the image in debug mode: raises unless the calling thread holds the
        #: allocator lock or the image exclusively (the contract above).
        self.check_caller: Callable[[], None] | None = None
        # Set by the image: its debug event points (refblock_alloc, refblock_update,
        # reftable_grow), where a test can make the request fail.
        self.fire: Callable[[str], None] | None = None

    # Table and blocks ------------------------------------------------------
    def _read_reftable(self) -> array:
        hdr = self.header
        data = self.file.pread_exact(hdr.refcount_table_offset, hdr.refcount_table_clusters * hdr.cluster_size)
        return table_from_bytes(data)

    def _load_block(self, offset: int) -> RefBlock:
        return RefBlock.from_bytes(self.bits, self.file.pread_exact(offset, self.cluster_size))

    def _store_block(self, offset: int, block: RefBlock) -> None:
        if self.fire is not None:
            self.fire("refblock_update")
        if self.before_write is not None:
            self.before_write(offset, self.cluster_size, REFCOUNT_BLOCK)
        self.file.pwrite(offset, block.to_bytes())
        self.written_mark = self.file.sync_mark()

    def _block_offset(self, index: int) -> int:
        """Host offset of refcount block *index*, 0 when it has none."""
        if index >= len(self.reftable):
            return 0
        entry = self.reftable[index]
        offset = entry & REFT_OFFSET_MASK
        if entry & REFT_RESERVED_MASK or offset % self.cluster_size:
            self._corrupt(f"Refblock offset {offset:#x} unaligned (reftable index: {index:#x})")
        if offset >> self.cluster_bits >= self.high_water:  # stricter than QEMU (zeros)
            self._corrupt(f"Refblock offset {offset:#x} beyond the end of the image file "
                          f"(reftable index: {index:#x})")
        return offset

    def _corrupt(self, message: str) -> None:
        """Report damaged refcount structures (the image marks itself corrupt)."""
        if self.on_corruption is not None:
            self.on_corruption(message)
        raise CorruptImage(message)

    def get(self, cluster: int) -> int:
        """The refcount of host cluster index *cluster*."""
        if self.check_caller is not None:
            self.check_caller()
        offset = self._block_offset(cluster >> self.block_bits)
        if not offset:
            return 0
        held: list[CacheEntry] = []
        try:
            entry = self.cache.get(offset, held)
            return entry.table.values[cluster & (self.block_entries - 1)]
        finally:
            try:
                self.cache.release(held)
            except BaseException:  # an interrupt cut it short: it resumes
                self.cache.release(held)
                raise

    def _change(self, cluster: int, delta: int) -> int:
        """Add *delta* to the refcount of *cluster*, whose block must exist."""
        if self.check_caller is not None:
            self.check_caller()
        offset = self._block_offset(cluster >> self.block_bits)
        if not offset:
            raise CorruptImage(f"cluster {cluster} has no refcount block")
        held: list[CacheEntry] = []
        try:
            entry = self.cache.get(offset, held)
            values = entry.table.values
            index = cluster & (self.block_entries - 1)
            new = values[index] + delta
            if new < 0:
                raise CorruptImage(f"refcount of cluster {cluster} would drop below zero")
            if new > self.max_refcount:
                raise RefcountOverflow(f"refcount of cluster {cluster} would exceed {self.max_refcount}")
            values[index] = new
            if new == 0:
                self.full_blocks.discard(cluster >> self.block_bits)
                if self.compressed_next and cluster == self.compressed_next >> self.cluster_bits:
                    self.compressed_next = 0  # free now: no longer ours to pack into
            entry.table.version += 1
            entry.dirty = True
        finally:
            try:
                self.cache.release(held)
            except BaseException:  # an interrupt cut it short: it resumes
                self.cache.release(held)
                raise
        if delta > 0:
            self.increments += 1
        return new

    def increment(self, cluster: int, delta: int = 1) -> int:
        """Raise the refcount of a cluster in use (a new reference to it)."""
        return self._change(cluster, delta)

    # Allocation ------------------------------------------------------------
    def alloc(self, count: int) -> int:
        """Allocate *count* contiguous free clusters; return the host offset of the first.

        Allocation and the refcount increment that claims the clusters are one step.
        *count* must not exceed :attr:`max_run`.
        """
        if self.check_caller is not None:
            self.check_caller()
        if not 0 < count <= self.max_run:
            raise ValueError(f"can allocate 1 to {self.max_run} clusters at once, not {count}")
        while True:
            hint = self.free_hint
            no_run = self.no_run
            if no_run is not None and no_run[0] != hint:
                no_run = None  # the hint moved down (a repair freed clusters)
            skip = no_run is not None and count >= no_run[2]
            start, first_zero = self._find_free_run(no_run[1] if skip else hint, count)
            if self._make_blocks_for(start, count):
                continue  # a new block took a cluster, or the table grew: search again
            for cluster in range(start, start + count):
                self._change(cluster, 1)
            if not skip:
                hint = self.free_hint = start + count if first_zero == start else first_zero
            # The holes below the run are too small for this count: a search as long
            # starts past it next time (QEMU's free_cluster_index, without losing the
            # holes for shorter runs).  Allocating frees nothing, so a record made for
            # longer runs still holds after a shorter one; a free below it ends it.
            if skip or no_run is None:
                self.no_run = (hint, start + count, count) if hint < start else None
            else:
                self.no_run = (hint, no_run[1], no_run[2]) if hint < no_run[1] else None
            self.last_alloc_fresh = start >= self.high_water
            self._claimed(start + count)
            return start << self.cluster_bits

    def alloc_bytes(self, size: int) -> int:
        """Room for *size* bytes of compressed data; return its host byte offset.

        QEMU's ``qcow2_alloc_bytes``: fragments are packed one after the other from
        :attr:`compressed_next`; a fragment runs on into the next host cluster only
        when that is the cluster allocated next, else it starts a fresh one, and so
        does a fragment whose cluster's refcount is at its maximum (refcount_bits=1:
        one fragment per cluster).  Every host cluster the bytes touch gets one
        reference (freeing drops one from each, the same rule).
        """
        if self.check_caller is not None:
            self.check_caller()
        cs, cb = self.cluster_size, self.cluster_bits
        if not 0 < size < cs:
            raise ValueError(f"a compressed fragment is 1 to {cs - 1} bytes, not {size}")
        offset = self.compressed_next
        if offset and not 0 < self.get(offset >> cb) < self.max_refcount:
            offset = 0
        if offset and (offset & (cs - 1)) + size <= cs:
            self._change(offset >> cb, 1)
        else:
            new = self.alloc(1)
            if offset and new == (offset | (cs - 1)) + 1:
                self._change(offset >> cb, 1)  # straddles into the cluster just taken
            else:
                offset = new
        end = offset + size
        self.compressed_next = end if end & (cs - 1) else 0
        return offset

    def _claimed(self, end: int) -> None:
        """Clusters below *end* may now hold data: move the high-water mark."""
        if end > self.high_water:
            self.high_water = end

    def alloc_contiguous(self, count: int) -> int:
        """Allocate *count* contiguous clusters for a table of any size; return the offset.

        Runs longer than :attr:`max_run` go after every existing refcount block, in
        block ranges of their own, followed by the new blocks that describe them.
        """
        if self.check_caller is not None:
            self.check_caller()
        if count <= self.max_run:
            return self.alloc(count)
        while True:
            used = [i for i in range(len(self.reftable)) if self.reftable[i]]
            first_range = (used[-1] + 1) if used else 0
            start = first_range << self.block_bits
            blocks = 1
            while (first_range + blocks) << self.block_bits < start + count + blocks:
                blocks += 1
            if first_range + blocks > len(self.reftable):
                self._grow_table(first_range + blocks - 1)
                continue
            break
        end = start + count + blocks
        for k in range(blocks):
            index = first_range + k
            block = RefBlock.empty(self.bits, self.block_entries)
            lo = index << self.block_bits
            for cluster in range(max(lo, start), min(lo + self.block_entries, end)):
                block.values[cluster - lo] = 1
            offset = (start + count + k) << self.cluster_bits
            self.cache.install(offset, block)  # dirty, not pinned
            self.reftable[index] = offset
            self.reftable_dirty.add(index)
            if self.on_change is not None:
                self.on_change(offset)
        self._claimed(end)
        return start << self.cluster_bits

    def _find_free_run(self, start: int, count: int) -> tuple[int, int]:
        """(first cluster >= *start* beginning *count* free clusters, first cluster >=
        *start* with refcount 0), the second being where the next search may begin."""
        run_start, run_len = start, 0
        first_zero = -1
        cluster = start
        while run_len < count:
            index = cluster >> self.block_bits
            offset = self._block_offset(index)
            block_end = (index + 1) << self.block_bits
            if not offset:  # no block: the whole range is free
                take = min(block_end - cluster, count - run_len)
                if run_len == 0:
                    run_start = cluster
                if first_zero < 0:
                    first_zero = cluster
                run_len += take
                cluster += take
                continue
            if index in self.full_blocks:  # not one refcount of 0 in it: skip it
                run_len = 0
                cluster = block_end
                continue
            held: list[CacheEntry] = []
            try:
                entry = self.cache.get(offset, held)
                values = entry.table.values
                base = index << self.block_bits
                whole_block, zero_seen = cluster == base, False
                in_use = tuple(self.in_use)  # one atomic copy: pins only come and go
                while cluster < block_end and run_len < count:
                    i = cluster - base
                    if values[i] == 0:
                        zero_seen = True
                        if first_zero < 0:
                            first_zero = cluster
                        if not (in_use and _busy(in_use, cluster)):
                            if run_len == 0:
                                run_start = cluster
                            run_len += 1
                            cluster += 1
                            continue
                    run_len = 0
                    try:
                        cluster = base + values.index(0, i + 1)
                    except ValueError:
                        cluster = block_end
                if whole_block and not zero_seen and cluster >= block_end:
                    self.full_blocks.add(index)
            finally:
                try:
                    self.cache.release(held)
                except BaseException:  # an interrupt cut it short: it resumes
                    self.cache.release(held)
                    raise
        return run_start, first_zero

    def _make_blocks_for(self, start: int, count: int) -> bool:
        """Create the refcount blocks the clusters [start, start+count) lack.

        Returns True when it created one (the free run must then be searched again).
        A new block is placed inside the run, in the range it describes, so it
        describes itself (QEMU's "self-describing" blocks).
        """
        first = start >> self.block_bits
        last = (start + count - 1) >> self.block_bits
        for index in range(first, last + 1):
            if index >= len(self.reftable):
                self._grow_table(index)
                return True
            if not self._block_offset(index):
                if self.fire is not None:
                    self.fire("refblock_alloc")
                place = max(start, index << self.block_bits)
                if place == 0:  # only if cluster 0 (the header) reads as free
                    self._corrupt("Preventing invalid allocation of refcount block at offset 0")
                block = RefBlock.empty(self.bits, self.block_entries)
                block.values[place & (self.block_entries - 1)] = 1
                offset = place << self.cluster_bits
                self._claimed(place + 1)
                self.cache.install(offset, block)  # dirty, not pinned
                self.reftable[index] = offset
                self.reftable_dirty.add(index)
                self.increments += 1
                if self.on_change is not None:
                    self.on_change(offset)
                return True
        return False

    def _grow_table(self, needed_index: int) -> None:
        """Grow the refcount table copy-on-write so that it has entry *needed_index*.

        New blocks and the new table go at the start of the first block range no
        existing block covers, so they describe themselves and the table.
        """
        if self.fire is not None:
            self.fire("reftable_grow")
        used = [i for i in range(len(self.reftable)) if self.reftable[i]]
        first_free_range = (used[-1] + 1) if used else 0
        base = first_free_range << self.block_bits
        entries = max(needed_index + 1, len(self.reftable) + len(self.reftable) // 2 + 1)
        per_cluster = self.cluster_size // 8
        while True:
            table_clusters = div_round_up(entries, per_cluster)
            blocks = 1
            while blocks * self.block_entries < blocks + table_clusters:
                blocks += 1
            if first_free_range + blocks <= table_clusters * per_cluster:
                break
            entries = first_free_range + blocks
        if table_clusters * self.cluster_size > MAX_REFTABLE_SIZE:
            raise Qcow2Error("refcount table would exceed 8 MiB (image too large)")
        new_table = array("Q", self.reftable)
        new_table.extend([0] * (table_clusters * per_cluster - len(new_table)))
        for j in range(blocks):
            block = RefBlock.empty(self.bits, self.block_entries)
            in_use = min(self.block_entries, blocks + table_clusters - j * self.block_entries)
            for k in range(max(0, in_use)):
                block.values[k] = 1  # the new blocks and the new table
            offset = (base + j) << self.cluster_bits
            self.cache.install(offset, block)  # dirty, not pinned
            new_table[first_free_range + j] = offset
            if self.on_change is not None:
                self.on_change(offset)
        table_offset = (base + blocks) << self.cluster_bits
        self._claimed(base + blocks + table_clusters)
        frees = [(self.table_offset, self.table_clusters)]
        if self.pending_growth is not None:  # never went live: its table goes too
            frees = self.pending_growth.frees + frees
        self.pending_growth = Growth(table_offset, table_clusters, frees)
        self.table_offset, self.table_clusters = table_offset, table_clusters
        self.reftable = new_table
        self.reftable_dirty.clear()  # (the whole table is written at the commit)
        self.increments += 1
        if self.on_table_added is not None:
            self.on_table_added(table_offset, table_clusters << self.cluster_bits)
        if self.defer_growth is None or not self.defer_growth():
            self.flush()

    # Freeing ---------------------------------------------------------------
    def free_later(self, cluster: int, count: int = 1) -> None:
        """Drop one reference to *count* clusters once the dropping update is durable."""
        if self.check_caller is not None:
            self.check_caller()
        self.deferred_frees.extend(range(cluster, cluster + count))

    def take_deferred_frees(self) -> list[int]:
        """Hand over the deferred decrements queued so far (a flush applies them later)."""
        frees, self.deferred_frees = self.deferred_frees, []
        return frees

    def free_now(self, cluster: int, count: int = 1) -> None:
        """Release clusters that were allocated but never referenced (a request gave up)."""
        if self.check_caller is not None:
            self.check_caller()
        self.apply_frees(list(range(cluster, cluster + count)))

    def apply_frees(self, frees: list[int]) -> list[int]:
        """Apply decrements; return the clusters whose refcount reached 0.

        Caller holds: the allocator lock, and has made the updates that dropped
        these references durable.
        """
        if self.check_caller is not None:
            self.check_caller()
        freed = []
        for cluster in frees:
            if self._change(cluster, -1) == 0:
                freed.append(cluster)
                if cluster < self.free_hint:
                    self.free_hint = cluster
                no_run = self.no_run
                if no_run is not None and cluster < no_run[1]:
                    self.no_run = None
        return freed
