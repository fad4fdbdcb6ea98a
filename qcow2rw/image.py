"""The synchronous :class:`Image`: open, read, write, discard, zero, flush, map, info.

Locks (this issue: the big-lock starting point of DESIGN §4).  The lock order of the
whole package is written once here, outermost first:

    image request lock  ->  L1 lock  ->  L2 cache entry lock  ->  allocator lock
    ->  cache LRU lock

``Image._lock`` is the one big mutex: it guards every field of the image (header,
L1 table, caches, refcounts, in-flight state) and is held for a whole request.
The metadata caches' own ``_lru_lock`` (innermost) guards only their maps.
"""

from __future__ import annotations

import os
import struct
import threading
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import compress
from .bitmaps import bitmap_info
from .backing import BackingSource, open_backing, resolve_name
from .cache import CacheEntry, MetadataCache
from .errors import ClosedImage, CorruptImage, FormatError, Qcow2Error, ReadOnlyImage, UnsupportedFeature
from .format import (COMPRESSION_NAMES, INCOMPAT_DIRTY, L1E_OFFSET_MASK, L2E_OFFSET_MASK,
                     OFF_AUTOCLEAR, OFF_INCOMPATIBLE, OFF_L1_SIZE, OFF_SIZE, QCOW_OFLAG_COMPRESSED,
                     QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO, Header, compressed_host_range,
                     decode_compressed, div_round_up, l1_entries_for, parse_header,
                     table_from_bytes, table_to_bytes)
from .refcount import RefcountManager
from .snapshot import Snapshot, parse_table
from .storage import HostFile

# Cluster kinds, from an L2 entry (QEMU's QCow2ClusterType).
UNALLOCATED, NORMAL, ZERO_PLAIN, ZERO_ALLOC, COMPRESSED = range(5)

DEFAULT_CACHE_SIZE = 32 * 1024 * 1024  # bytes of L2 tables; refcount blocks get a quarter
MIN_CACHE_ENTRIES = 8
MAX_DEFERRED_FREES = 4096  # flush once this many decrements wait

LOCK_MODES = ("mutex", "rwlock", "fine")


class OutOfRange(Qcow2Error, ValueError):
    """A request reaches past the end of the virtual disk (or has a negative offset)."""


class Image:
    """An open qcow2 image.  Safe to call from many threads (one big lock for now)."""

    def __init__(self, file: HostFile, header: Header, *, path: str, readonly: bool,
                 cache_size: int | None, lock_mode: str, backing: bool, force_share: bool,
                 chain: tuple[str, ...]) -> None:
        if lock_mode not in LOCK_MODES:
            raise ValueError(f"lock_mode must be one of {LOCK_MODES}")
        self.path = path
        self.file = file
        self.header = header
        self.readonly = readonly
        self.lock_mode = lock_mode
        self.closed = False
        self._lock = threading.Lock()
        hdr = header
        self.cluster_bits = hdr.cluster_bits
        self.cluster_size = hdr.cluster_size
        self.l2_bits = hdr.l2_bits
        self.l2_entries = 1 << hdr.l2_bits
        self.l1_shift = hdr.cluster_bits + hdr.l2_bits
        self.has_zero_flag = hdr.version >= 3
        if hdr.extended_l2:
            raise UnsupportedFeature("Extended L2 entries (subclusters) are not supported yet")
        if hdr.data_file is not None or hdr.incompatible_features & 0x4:
            raise UnsupportedFeature("External data files are not supported")
        cache_bytes = DEFAULT_CACHE_SIZE if cache_size is None else cache_size
        l2_entries = max(MIN_CACHE_ENTRIES, cache_bytes // self.cluster_size)
        self.l1 = self._read_l1()
        self.l1_dirty: set[int] = set()
        self.l2_cache = MetadataCache("L2", l2_entries, self._load_l2, self._store_l2,
                                      self._before_l2_writeback)
        self.refcounts = RefcountManager(file, hdr, max(MIN_CACHE_ENTRIES, l2_entries // 4))
        self.snapshots: list[Snapshot] = self._read_snapshots()
        self.backing: BackingSource | None = None
        self._chain = chain
        if backing and hdr.backing_file:
            self.backing = open_backing(path, hdr.backing_file, hdr.backing_format, chain,
                                        force_share=force_share)

    # Opening ---------------------------------------------------------------
    def _read_l1(self) -> array:
        hdr = self.header
        return table_from_bytes(self.file.pread_exact(hdr.l1_table_offset, hdr.l1_size * 8))

    def _read_snapshots(self) -> list[Snapshot]:
        hdr = self.header
        if not hdr.nb_snapshots:
            return []
        # Entries are at most 40 + 1024 + 2 * 65535 bytes; read growing chunks until parsed.
        length = min(hdr.nb_snapshots * 1024, 64 * 1024 * 1024)
        while True:
            buf = self.file.pread(hdr.snapshots_offset, length)
            try:
                return parse_table(buf, hdr.nb_snapshots)
            except FormatError:
                if len(buf) < length or length >= 64 * 1024 * 1024:
                    raise
                length = min(length * 4, 64 * 1024 * 1024)

    def _prepare_for_writing(self) -> None:
        """Read-write open: clear autoclear bits we do not maintain; repair a dirty image.

        Unknown autoclear bits (and the bitmaps bit: we do not update bitmaps) are
        cleared so that their owners know the data changed behind them.  A dirty image
        (lazy refcounts, not closed cleanly) has its refcounts rebuilt first.
        """
        hdr = self.header
        if hdr.version >= 3 and hdr.autoclear_features:
            hdr.autoclear_features = 0
            self.file.pwrite(OFF_AUTOCLEAR, struct.pack(">Q", 0))
            self.file.flush()
        if hdr.incompatible_features & INCOMPAT_DIRTY:
            from .check import rebuild_refcounts
            with self._lock:
                rebuild_refcounts(self)
                hdr.incompatible_features &= ~INCOMPAT_DIRTY
                self.file.pwrite(OFF_INCOMPATIBLE, struct.pack(">Q", hdr.incompatible_features))
                self.file.flush()

    # Properties ------------------------------------------------------------
    @property
    def size(self) -> int:
        """Virtual disk size in bytes."""
        return self.header.size

    @property
    def backing_file(self) -> str | None:
        """The backing file name as stored in the image (None without one)."""
        return self.header.backing_file

    @property
    def backing_format(self) -> str | None:
        """The backing format recorded in the image, if any."""
        return self.header.backing_format

    # Lock helpers ----------------------------------------------------------
    @contextmanager
    def _request(self, write: bool = False) -> Iterator[None]:
        if self.closed:
            raise ClosedImage("I/O operation on a closed image")
        if write and self.readonly:
            raise ReadOnlyImage(f"'{self.path}' is open read-only")
        with self._lock:
            if self.closed:
                raise ClosedImage("I/O operation on a closed image")
            yield

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.header.size:
            raise OutOfRange(f"request [{offset}, {offset + length}) is outside the "
                             f"{self.header.size}-byte disk")

    # Metadata loading ------------------------------------------------------
    def _load_l2(self, offset: int) -> array:
        return table_from_bytes(self.file.pread_exact(offset, self.cluster_size))

    def _store_l2(self, offset: int, table: array) -> None:
        self.file.pwrite(offset, table_to_bytes(table))

    def _before_l2_writeback(self, entry: CacheEntry) -> None:
        """An L2 table reaches the file only after the refcounts and data it points to."""
        if not self.header.lazy_refcounts:
            self.refcounts.flush()
        if self.file.unsynced:
            self.file.flush()

    def _l2_offset(self, l1_index: int) -> int:
        entry = self.l1[l1_index]
        offset = entry & L1E_OFFSET_MASK
        if offset % self.cluster_size:
            raise CorruptImage(f"L2 table offset {offset:#x} unaligned (L1 index: {l1_index:#x})")
        return offset

    def classify(self, entry: int) -> int:
        """The kind of cluster an L2 entry describes."""
        if entry & QCOW_OFLAG_COMPRESSED:
            return COMPRESSED
        offset = entry & L2E_OFFSET_MASK
        if entry & QCOW_OFLAG_ZERO:
            if not self.has_zero_flag:
                raise CorruptImage(f"Zero cluster entry found in pre-v3 image (entry {entry:#x})")
            return ZERO_ALLOC if offset else ZERO_PLAIN
        if offset % self.cluster_size:
            raise CorruptImage(f"Cluster allocation offset {offset:#x} unaligned")
        return NORMAL if offset else UNALLOCATED

    # Reading ---------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Read *length* bytes of guest data at *offset*."""
        self._check_range(offset, length)
        with self._request():
            host = self._single_cluster_host(offset, length, 0)
            if host >= 0:
                data = os.pread(self.file.fd, length, host)
                return data if len(data) == length else data + bytes(length - len(data))
            buf = bytearray(length)
            self._read_locked(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, buffer: Any) -> int:
        """Read into *buffer* (any writable bytes-like object) from *offset*; return its length."""
        view = memoryview(buffer)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        length = len(view)
        if offset < 0 or offset + length > self.header.size:
            self._check_range(offset, length)
        with self._lock:
            if self.closed:
                raise ClosedImage("I/O operation on a closed image")
            host = self._single_cluster_host(offset, length, 0)
            if host >= 0:
                if os.preadv(self.file.fd, [view], host) < length:
                    self.file.preadv([view], host)  # short read: retry and zero-fill
            else:
                self._read_locked(offset, view)
        return length

    def _single_cluster_host(self, offset: int, length: int, need_flags: int) -> int:
        """The host offset of [offset, offset+length) if the fast path can serve it, else -1.

        The fast path: the range lies in one normal cluster (with *need_flags*, e.g.
        COPIED for an in-place write) whose L2 table is cached.  Everything else, and
        every error, is left to the general path.  Caller holds: the request lock.
        """
        cs_mask = self.cluster_size - 1
        if (offset & cs_mask) + length > self.cluster_size or not length:
            return -1
        l2_offset = self.l1[offset >> self.l1_shift] & L1E_OFFSET_MASK
        if not l2_offset or l2_offset & cs_mask:
            return -1
        entry_obj = self.l2_cache.peek(l2_offset)
        if entry_obj is None:
            return -1
        entry = entry_obj.table[(offset >> self.cluster_bits) & (self.l2_entries - 1)]
        host = entry & L2E_OFFSET_MASK
        if (not host or host & cs_mask or entry & (QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO)
                or entry & need_flags != need_flags):
            return -1
        return host + (offset & cs_mask)

    def read_backing(self, offset: int, view: memoryview) -> None:
        """Read for an overlay: like readinto, but bytes past the end read as zeros."""
        inside = max(0, min(len(view), self.header.size - offset))
        if inside:
            with self._request():
                self._read_locked(offset, view[:inside])
        if inside < len(view):
            view[inside:] = bytes(len(view) - inside)

    def _read_locked(self, offset: int, view: memoryview) -> None:
        pos = 0
        for kind, guest, length, where in self._extents(offset, len(view)):
            part = view[pos:pos + length]
            if kind == NORMAL:
                self.file.preadv([part], where)
            elif kind == UNALLOCATED:
                self._read_unallocated(guest, part)
            elif kind == COMPRESSED:
                data = self._decompress(where)
                start = guest & (self.cluster_size - 1)
                part[:] = data[start:start + length]
            else:
                part[:] = bytes(length)
            pos += length

    def _read_unallocated(self, guest: int, part: memoryview) -> None:
        if self.backing is None:
            part[:] = bytes(len(part))
        else:
            self.backing.read_backing(guest, part)

    def _decompress(self, entry: int) -> bytes:
        host, length = decode_compressed(entry, self.cluster_bits)
        data = self.file.pread(host, length)
        return compress.decompress(data, self.cluster_size, self.header.compression_type)

    def _extents(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """Split [offset, offset+length) into runs (kind, guest, length, host-or-entry).

        NORMAL and ZERO_ALLOC runs carry the host offset of their first byte and are
        merged while the host clusters are contiguous; COMPRESSED runs are one cluster and carry the L2
        entry.  Caller holds: the request lock.
        """
        out: list[tuple[int, int, int, int]] = []
        cs_mask = self.cluster_size - 1
        end = offset + length
        guest = offset
        while guest < end:
            l1_index = guest >> self.l1_shift
            table_end = min(end, (l1_index + 1) << self.l1_shift)
            l2_offset = self._l2_offset(l1_index) if l1_index < len(self.l1) else 0
            if not l2_offset:
                self._add_extent(out, UNALLOCATED, guest, table_end - guest, 0)
                guest = table_end
                continue
            entry_obj = self.l2_cache.get(l2_offset)
            try:
                table = entry_obj.table
                while guest < table_end:
                    entry = table[(guest >> self.cluster_bits) & (self.l2_entries - 1)]
                    kind = self.classify(entry)
                    in_cluster = guest & cs_mask
                    take = min(self.cluster_size - in_cluster, table_end - guest)
                    where = 0
                    if kind == NORMAL or kind == ZERO_ALLOC:
                        where = (entry & L2E_OFFSET_MASK) + in_cluster
                    elif kind == COMPRESSED:
                        where = entry
                    self._add_extent(out, kind, guest, take, where)
                    guest += take
            finally:
                self.l2_cache.put(entry_obj)
        return out

    @staticmethod
    def _add_extent(out: list[tuple[int, int, int, int]], kind: int, guest: int, length: int,
                    where: int) -> None:
        if out and kind != COMPRESSED:
            pkind, pguest, plen, pwhere = out[-1]
            if pkind == kind and (kind not in (NORMAL, ZERO_ALLOC) or pwhere + plen == where):
                out[-1] = (pkind, pguest, plen + length, pwhere)
                return
        out.append((kind, guest, length, where))

    # Writing ---------------------------------------------------------------
    def write(self, offset: int, data: Any) -> None:
        """Write *data* (any bytes-like object) at guest *offset*; any alignment."""
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        self._check_range(offset, len(view))
        with self._request(write=True):
            host = self._single_cluster_host(offset, len(view), QCOW_OFLAG_COPIED)
            if host >= 0:
                self.file.pwrite(host, view)
            else:
                self._for_each_table(offset, len(view), self._write_in_table, view)

    def _for_each_table(self, offset: int, length: int, func: Any, view: memoryview | None) -> None:
        """Call func(l1_index, guest, length, view-part) once per L2 table the range touches."""
        pos = 0
        while pos < length:
            guest = offset + pos
            l1_index = guest >> self.l1_shift
            chunk = min(length - pos, ((l1_index + 1) << self.l1_shift) - guest)
            func(l1_index, guest, chunk, view[pos:pos + chunk] if view is not None else None)
            pos += chunk
        self._maybe_flush_frees()

    def _get_l2_for_write(self, l1_index: int) -> CacheEntry:
        """The L2 table of *l1_index*, allocated or copied-on-write if needed; pinned.

        A new or copied table is linked into the L1 table in memory (written back at
        the next flush, after the table itself).  Caller holds: the request lock.
        """
        l1_entry = self.l1[l1_index]
        offset = self._l2_offset(l1_index)
        if offset and l1_entry & QCOW_OFLAG_COPIED:
            return self.l2_cache.get(offset)
        new_offset = self.refcounts.alloc(1)
        if offset:  # shared with a snapshot: copy it, drop our reference to the old one
            old = self.l2_cache.get(offset)
            try:
                table = array("Q", old.table)
            finally:
                self.l2_cache.put(old)
            self.refcounts.free_later(offset >> self.cluster_bits)
        else:
            table = array("Q", bytes(self.cluster_size))
        entry = self.l2_cache.install(new_offset, table)
        self.l1[l1_index] = new_offset | QCOW_OFLAG_COPIED
        self.l1_dirty.add(l1_index)
        return entry

    def _write_in_table(self, l1_index: int, guest: int, length: int, data: memoryview) -> None:
        entry_obj = self._get_l2_for_write(l1_index)
        try:
            table = entry_obj.table
            cs, cb = self.cluster_size, self.cluster_bits
            mask = self.l2_entries - 1
            first = (guest >> cb) & mask
            last = ((guest + length - 1) >> cb) & mask
            base_guest = (guest >> self.l1_shift) << self.l1_shift
            i = first
            while i <= last:
                entry = table[i]
                kind = self.classify(entry)
                # The guest bytes of clusters i..j-1 covered by this request.
                if kind == NORMAL and entry & QCOW_OFLAG_COPIED:
                    host = entry & L2E_OFFSET_MASK
                    j = i + 1
                    while (j <= last and table[j] & (QCOW_OFLAG_COPIED | QCOW_OFLAG_COMPRESSED
                                                     | QCOW_OFLAG_ZERO | L2E_OFFSET_MASK)
                           == QCOW_OFLAG_COPIED | (host + (j - i) * cs)):
                        j += 1
                    lo = max(guest, base_guest + (i << cb))
                    hi = min(guest + length, base_guest + (j << cb))
                    self.file.pwrite(host + (lo - base_guest - (i << cb)), data[lo - guest:hi - guest])
                    i = j
                    continue
                if kind == ZERO_ALLOC and entry & QCOW_OFLAG_COPIED:
                    # Our own cluster that reads as zeros: fill it in place, then clear the flag.
                    host = entry & L2E_OFFSET_MASK
                    lo = max(guest, base_guest + (i << cb))
                    hi = min(guest + length, base_guest + ((i + 1) << cb))
                    start = lo - base_guest - (i << cb)
                    buf = bytearray(cs)
                    buf[start:start + hi - lo] = data[lo - guest:hi - guest]
                    self.file.pwrite(host, buf)
                    self._link(table, entry_obj, i, host | QCOW_OFLAG_COPIED)
                    i += 1
                    continue
                # Clusters that need a new host cluster: gather the run.
                j = i + 1
                limit = min(last + 1, i + self.refcounts.max_run)
                while j < limit and self._needs_new_cluster(table[j]):
                    j += 1
                self._allocate_and_write(table, entry_obj, i, j, base_guest, guest, data)
                i = j
        finally:
            self.l2_cache.put(entry_obj)

    def _needs_new_cluster(self, entry: int) -> bool:
        kind = self.classify(entry)
        return not (kind in (NORMAL, ZERO_ALLOC) and entry & QCOW_OFLAG_COPIED)

    def _allocate_and_write(self, table: array, entry_obj: CacheEntry, i: int, j: int,
                            base_guest: int, guest: int, data: memoryview) -> None:
        """Write clusters i..j-1 of *table* into newly allocated, contiguous host clusters.

        A partial first or last cluster gets its head or tail copied from what the
        cluster held before (its host cluster, compressed data, the backing file or
        zeros).  The data is written before the L2 entries are changed.
        """
        cs, cb = self.cluster_size, self.cluster_bits
        count = j - i
        host = self.refcounts.alloc(count)
        run_lo = base_guest + (i << cb)
        run_hi = run_lo + (count << cb)
        lo, hi = max(guest, run_lo), min(guest + len(data), run_hi)
        buffers: list[Any] = []
        if lo > run_lo:
            buffers.append(self._old_cluster_data(table[i], run_lo)[:lo - run_lo])
        buffers.append(data[lo - guest:hi - guest])
        if hi < run_hi:
            last_lo = run_hi - cs
            old = self._old_cluster_data(table[j - 1], last_lo)
            buffers.append(old[hi - last_lo:])
        self.file.pwritev(buffers, host)
        if self.header.lazy_refcounts:
            self._mark_dirty()
        for k in range(count):
            old_entry = table[i + k]
            self._link(table, entry_obj, i + k, (host + (k << cb)) | QCOW_OFLAG_COPIED)
            self._free_entry_later(old_entry)

    def _old_cluster_data(self, entry: int, cluster_guest: int) -> bytes | bytearray | memoryview:
        """What the guest cluster at *cluster_guest* reads as now (for copy-on-write)."""
        kind = self.classify(entry)
        if kind == NORMAL:
            return self.file.pread_exact(entry & L2E_OFFSET_MASK, self.cluster_size)
        if kind == COMPRESSED:
            return self._decompress(entry)
        buf = bytearray(self.cluster_size)
        if kind == UNALLOCATED and self.backing is not None:
            self.backing.read_backing(cluster_guest, memoryview(buf))
        return buf

    def _link(self, table: array, entry_obj: CacheEntry, index: int, value: int) -> None:
        table[index] = value
        entry_obj.dirty = True

    def _free_entry_later(self, entry: int) -> None:
        """Drop the reference an L2 entry held (deferred until the change is durable)."""
        kind = self.classify(entry)
        if kind in (NORMAL, ZERO_ALLOC):
            self.refcounts.free_later((entry & L2E_OFFSET_MASK) >> self.cluster_bits)
        elif kind == COMPRESSED:
            start, length = compressed_host_range(entry, self.cluster_bits)
            first = start >> self.cluster_bits
            last = (start + length - 1) >> self.cluster_bits
            self.refcounts.free_later(first, last - first + 1)

    def _mark_dirty(self) -> None:
        """Set the dirty bit (lazy refcounts) before the first unaccounted L2 link."""
        if self.header.incompatible_features & INCOMPAT_DIRTY:
            return
        self.header.incompatible_features |= INCOMPAT_DIRTY
        self.file.pwrite(OFF_INCOMPATIBLE, struct.pack(">Q", self.header.incompatible_features))
        self.file.flush()

    # Discard and zeroes ----------------------------------------------------
    def discard(self, offset: int, length: int) -> None:
        """Discard whole clusters inside the range (partial clusters are left as they are).

        A discarded cluster reads as zeros in a v3 image; in a v2 image it becomes
        unallocated and reads from the backing file (or as zeros without one).
        """
        self._check_range(offset, length)
        with self._request(write=True):
            self._zero_clusters(offset, length, discard=True)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zeros (v3: zero clusters; partial clusters are written)."""
        self._check_range(offset, length)
        with self._request(write=True):
            if not self.has_zero_flag:
                self._write_zero_bytes(offset, length)
                return
            cs = self.cluster_size
            start = (offset + cs - 1) & ~(cs - 1)
            end = (offset + length) & ~(cs - 1)
            if start >= end:
                self._write_zero_bytes(offset, length)
                return
            if offset < start:
                self._write_zero_bytes(offset, start - offset)
            self._zero_clusters(start, end - start, discard=False)
            if end < offset + length:
                self._write_zero_bytes(end, offset + length - end)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        chunk = 1 << 20
        zeros = memoryview(bytes(min(chunk, length)))
        pos = 0
        while pos < length:
            n = min(chunk, length - pos)
            self._for_each_table(offset + pos, n, self._write_in_table, zeros[:n])
            pos += n

    def _zero_clusters(self, offset: int, length: int, *, discard: bool) -> None:
        cs = self.cluster_size
        start = (offset + cs - 1) & ~(cs - 1)
        end = (offset + length) & ~(cs - 1)
        if start < end:
            func = self._discard_in_table if discard else self._zeroize_in_table
            self._for_each_table(start, end - start, func, None)

    def _discard_in_table(self, l1_index: int, guest: int, length: int, _: Any) -> None:
        if not self._l2_offset(l1_index):
            if self.backing is None or not self.has_zero_flag:
                return  # reads as zeros / as the backing already
        entry_obj = self._get_l2_for_write(l1_index)
        try:
            table = entry_obj.table
            first = (guest >> self.cluster_bits) & (self.l2_entries - 1)
            for i in range(first, first + (length >> self.cluster_bits)):
                entry = table[i]
                kind = self.classify(entry)
                if self.has_zero_flag:
                    if kind == UNALLOCATED and self.backing is None:
                        continue
                    if kind == ZERO_PLAIN:
                        continue
                    new = QCOW_OFLAG_ZERO
                else:
                    if kind == UNALLOCATED:
                        continue
                    new = 0
                self._link(table, entry_obj, i, new)
                self._free_entry_later(entry)
        finally:
            self.l2_cache.put(entry_obj)

    def _zeroize_in_table(self, l1_index: int, guest: int, length: int, _: Any) -> None:
        entry_obj = self._get_l2_for_write(l1_index)
        try:
            table = entry_obj.table
            first = (guest >> self.cluster_bits) & (self.l2_entries - 1)
            for i in range(first, first + (length >> self.cluster_bits)):
                entry = table[i]
                kind = self.classify(entry)
                if kind in (NORMAL, ZERO_ALLOC) and entry & QCOW_OFLAG_COPIED:
                    new = (entry & (L2E_OFFSET_MASK | QCOW_OFLAG_COPIED)) | QCOW_OFLAG_ZERO
                    if new != entry:
                        self._link(table, entry_obj, i, new)
                    continue
                if kind == ZERO_PLAIN:
                    continue
                self._link(table, entry_obj, i, QCOW_OFLAG_ZERO)
                self._free_entry_later(entry)
        finally:
            self.l2_cache.put(entry_obj)

    # Flush -----------------------------------------------------------------
    def flush(self) -> None:
        """Write all cached metadata back in the safe order and sync the file."""
        with self._request():
            if not self.readonly:
                self._flush_locked()

    def _maybe_flush_frees(self) -> None:
        if len(self.refcounts.deferred_frees) > MAX_DEFERRED_FREES:
            self._flush_locked()

    def _flush_locked(self) -> None:
        """DESIGN §6 order: refcounts (+data) -> sync -> L2 -> sync -> L1 -> sync -> frees -> sync.

        Caller holds: the request lock.
        """
        lazy = self.header.lazy_refcounts
        if not lazy:
            self.refcounts.flush()
        if self.file.unsynced:
            self.file.flush()
        self.l2_cache.flush()
        if self.l1_dirty:
            if self.file.unsynced:
                self.file.flush()
            self._write_l1_entries()
        if self.file.unsynced:
            self.file.flush()
        if self.refcounts.deferred_frees:
            for cluster in self.refcounts.apply_deferred_frees():
                self.l2_cache.discard(cluster << self.cluster_bits)
            if not lazy:
                self.refcounts.flush()
                self.file.flush()

    def _write_l1_entries(self) -> None:
        per_sector = 64
        for sector in sorted({i // per_sector for i in self.l1_dirty}):
            lo = sector * per_sector
            chunk = self.l1[lo:lo + per_sector]
            self.file.pwrite(self.header.l1_table_offset + lo * 8, table_to_bytes(chunk))
        self.l1_dirty.clear()

    def _flush_everything(self) -> None:
        """Flush, including refcounts in lazy mode (before close or a table switch)."""
        self._flush_locked()
        if self.header.lazy_refcounts:
            self.refcounts.flush()
            self.file.flush()

    # Resize (grow) ---------------------------------------------------------
    def resize(self, new_size: int, *, shrink: bool = False) -> None:
        """Change the virtual size.  Growing grows the L1 table copy-on-write."""
        if new_size < 0 or new_size % 512:
            raise OutOfRange("the new size must be a non-negative multiple of 512")
        with self._request(write=True):
            if new_size < self.header.size:
                if not shrink:
                    raise Qcow2Error("Use the --shrink option to perform a shrink operation.")
                raise UnsupportedFeature("shrinking an image is not supported yet")
            self._grow_l1(l1_entries_for(new_size, self.cluster_bits, self.l2_bits))
            self.header.size = new_size
            self.file.pwrite(OFF_SIZE, struct.pack(">Q", new_size))
            self.file.flush()

    def _grow_l1(self, entries: int) -> None:
        """Give the L1 table at least *entries* entries: new table, sync, switch, free old."""
        hdr = self.header
        if entries <= hdr.l1_size:
            return
        if entries * 8 > 32 * 1024 * 1024:
            raise Qcow2Error("Active L1 table too large")
        self._flush_everything()
        new_table = array("Q", self.l1)
        new_table.extend([0] * (entries - len(new_table)))
        clusters = div_round_up(entries * 8, self.cluster_size)
        new_offset = self.refcounts.alloc_contiguous(clusters)
        if not hdr.lazy_refcounts:
            self.refcounts.flush()
        self.file.pwrite(new_offset, table_to_bytes(new_table))
        self.file.flush()
        old_offset, old_size = hdr.l1_table_offset, hdr.l1_size
        self.file.pwrite(OFF_L1_SIZE, struct.pack(">IQ", entries, new_offset))
        self.file.flush()
        hdr.l1_size, hdr.l1_table_offset = entries, new_offset
        self.l1 = new_table
        if old_size:
            old_clusters = div_round_up(old_size * 8, self.cluster_size)
            self.refcounts.free_later(old_offset >> self.cluster_bits, old_clusters)
        self._flush_locked()

    # Map and info ----------------------------------------------------------
    def block_status(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """Extents of this layer only: (kind, guest, length, host offset or entry)."""
        with self._request():
            return self._extents(offset, length)

    def count_used_clusters(self, end_cluster: int, limit: int) -> int:
        """How many of the first *end_cluster* host clusters are in use, counting up to *limit*."""
        with self._request():
            count = 0
            for cluster in range(end_cluster):
                if count >= limit:
                    break
                if self.refcounts.get(cluster):
                    count += 1
            return count

    def map(self) -> list[dict[str, Any]]:
        """The allocation map of the whole chain, as ``qemu-img map --output=json``."""
        from .mapping import chain_map
        return chain_map(self)

    def info(self) -> dict[str, Any]:
        """Image information with the keys of ``qemu-img info --output=json``."""
        hdr = self.header
        data: dict[str, Any]
        if hdr.version >= 3:
            data = {"compat": "1.1", "compression-type": COMPRESSION_NAMES[hdr.compression_type],
                    "lazy-refcounts": hdr.lazy_refcounts}
            bitmaps = bitmap_info(self.file, hdr)
            if bitmaps:
                data["bitmaps"] = bitmaps
            data.update({"refcount-bits": hdr.refcount_bits, "corrupt": hdr.corrupt,
                         "extended-l2": hdr.extended_l2})
        else:
            data = {"compat": "0.10", "compression-type": "zlib", "refcount-bits": hdr.refcount_bits}
        out: dict[str, Any] = {
            "virtual-size": hdr.size, "filename": self.path, "cluster-size": self.cluster_size,
            "format": "qcow2", "actual-size": self.file.allocated_bytes(),
            "format-specific": {"type": "qcow2", "data": data},
            "dirty-flag": bool(hdr.incompatible_features & INCOMPAT_DIRTY),
        }
        if hdr.backing_file:
            out["backing-filename"] = hdr.backing_file
            out["full-backing-filename"] = resolve_name(self.path, hdr.backing_file)
            if hdr.backing_format:
                out["backing-filename-format"] = hdr.backing_format
        if self.snapshots:
            out["snapshots"] = [s.info() for s in self.snapshots]
        return out

    # Close -----------------------------------------------------------------
    def close(self) -> None:
        """Flush everything, clear the dirty bit, and close the file and backing chain."""
        if self.closed:
            return
        with self._lock:
            if self.closed:
                return
            try:
                if not self.readonly:
                    self._flush_everything()
                    if self.header.incompatible_features & INCOMPAT_DIRTY:
                        self.header.incompatible_features &= ~INCOMPAT_DIRTY
                        self.file.pwrite(OFF_INCOMPATIBLE,
                                         struct.pack(">Q", self.header.incompatible_features))
                        self.file.flush()
            finally:
                self.closed = True
                self.file.close()
                if self.backing is not None:
                    self.backing.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("ro" if self.readonly else "rw")
        return f"<qcow2rw.Image {self.path!r} {self.header.size} bytes {state}>"


def _read_first_cluster(file: HostFile) -> bytes:
    buf = file.pread(0, 65536)
    if len(buf) >= 24:
        cluster_bits = int.from_bytes(buf[20:24], "big")
        if 16 < cluster_bits <= 21 and len(buf) == 65536:
            buf = file.pread(0, 1 << cluster_bits)
    return buf


def open_image(path: str | os.PathLike[str], *, readonly: bool = False, backing: bool = True,
               lock_mode: str = "fine", cache_size: int | None = None, force_share: bool = False,
               chain: tuple[str, ...] = (), lock: bool = True) -> Image:
    """Open a qcow2 image (see :func:`qcow2rw.open`)."""
    path = os.fspath(path)
    file = HostFile(path, readonly=readonly, force_share=force_share, lock=lock)
    try:
        header = parse_header(_read_first_cluster(file))
        if not readonly and header.corrupt:
            raise CorruptImage("qcow2: Image is corrupt; cannot be opened read/write")
        compress.require(header.compression_type)
        real = os.path.realpath(path)
        img = Image(file, header, path=path, readonly=readonly, cache_size=cache_size,
                    lock_mode=lock_mode, backing=backing, force_share=force_share,
                    chain=chain or (real,))
    except BaseException:
        file.close()
        raise
    if not readonly:
        try:
            img._prepare_for_writing()
        except BaseException:
            img.close()
            raise
    return img
