"""Flush and write-back ordering (DESIGN §6): what reaches the file before what.

- :func:`before_l2_writeback`: the L2 cache's hook; an L2 table reaches the file only
  after the refcounts and the guest data it points to;
- :func:`write_refcounts`: one write-back of the refcount structures (under the
  refcount I/O lock, the allocator lock held only to take and mark the changes);
- :func:`flush_locked`: the whole order, and THE FLUSH RULE (its docstring);
- :func:`flush_everything`: a flush that also writes lazy refcounts (before close,
  or an operation that switches tables);
- :func:`refcounts_in_flux`: the dirty-bit window around a snapshot operation.

Every function takes the image's :class:`~qcow2rw.state.ImageState`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

from .cache import CacheEntry
from .errors import Qcow2Error
from .format import (COMPRESSED, INCOMPAT_DIRTY, L1E_OFFSET_MASK, L2E_OFFSET_MASK, MAX_L1_SIZE,
                     QCOW_OFLAG_COMPRESSED, l2_table_from_bytes, table_from_bytes,
                     table_to_bytes)
from .locks import held
from .overlap import ACTIVE_L1
from .state import ImageState

__all__ = ["MAX_DEFERRED_FREES", "attach", "before_l2_writeback", "flush_everything",
           "flush_locked", "flush_shared", "refcounts_in_flux", "write_refcounts"]

MAX_DEFERRED_FREES = 4096  # flush once this many decrements wait


def attach(state: ImageState) -> None:
    """Make the L2 cache of *state* keep the write-back order (its hook, no lambda)."""
    state.l2_cache.set_before_writeback(partial(before_l2_writeback, state))


def before_l2_writeback(state: ImageState, entry: CacheEntry) -> None:
    """An L2 table reaches the file only after the refcounts and data it points to.

    The refcount blocks are written (under the allocator lock) if an increment is
    not yet; then a sync that started after both they and the table's new data
    were written (``RefcountManager.written_mark``, ``CacheEntry.data_mark``) is
    waited for, or run, with the allocator lock released.
    Caller holds: the entry's lock (so every link in the table happened before).
    """
    assert held(entry.lock), "Caller holds: the entry's lock"
    mark = entry.data_mark
    refcounts = state.refcounts
    if not state.header.lazy_refcounts or refcounts.pending_growth is not None:
        with state.alloc_lock:  # (the two fields change together there)
            written = (refcounts.flushed_increments >= entry.refcount_need
                       and refcounts.pending_growth is None)
            written_mark = refcounts.written_mark
        # Only a write-back the table's own links need: other requests' newer
        # increments would cost a write and a sync per table of a flush.
        meta_mark = written_mark if written else write_refcounts(state)
        if state.external:  # the data mark is the data file's: two files, two syncs
            if meta_mark >= 0:
                state.file.sync_past(meta_mark)
        else:
            mark = max(mark, meta_mark)
    if mark >= 0 and state.datafile is not None:
        state.datafile.sync_past(mark)


def write_refcounts(state: ImageState) -> int:
    """Write the refcount changes made so far (committing a table growth); return
    the sync mark that a sync must pass before anything depending on them is written.

    The allocator lock is held only to take the changes as bytes and to mark them
    written; the writes (and a growth's syncs) run under the refcount I/O lock
    alone, so allocations go on meanwhile.
    Caller holds: at most an L2 entry lock (or the flush lock).
    """
    refcounts = state.refcounts
    with state.refcount_io_lock:
        try:  # (whatever an interrupt cuts off, refcounts.taken still names it)
            with state.alloc_lock:
                job = refcounts.take_writeback()
                if job is None:
                    return refcounts.written_mark
            refcounts.run_writeback(job)
            with state.alloc_lock:
                refcounts.finish_writeback()
                return refcounts.written_mark
        except BaseException:
            with state.alloc_lock:
                refcounts.abort_writeback()
            raise


def flush_shared(state: ImageState) -> None:
    """``Image.flush()``: refuses after a failed sync, does nothing read-only.

    Caller holds: the global lock (shared or exclusive).
    """
    failed = state.file.sync_error is not None or (state.datafile is not None
                                                    and state.datafile.sync_error is not None)
    if failed and not state.opened_readonly:
        raise state.readonly_error()  # a failed sync is never retried as if durable
    if not state.readonly:
        flush_locked(state)


def flush_locked(state: ImageState) -> None:
    """DESIGN §6 order: refcounts (+data) -> sync -> L2 -> sync -> L1 -> sync -> frees.

    Only the frees queued before the L2 tables are written are applied, and only
    the L1 sectors as they were before them, so nothing reaches the file ahead
    of what it depends on, whatever other requests do meanwhile.

    THE FLUSH RULE: when ``flush()`` returns, every write (data or metadata) that
    completed before ``flush()`` was called, on any thread, is durable, in the image
    file and in an external data file alike.  How each path keeps it:
    - an external data file: synced first (``HostFile.flush``), before any metadata;
    - guest data and COW: written before the request returns; ``HostFile.flush``
      (its docstring has the generations) runs or waits for a sync that started
      after every write that had returned;
    - refcount blocks and table: written here under the allocator lock, which
      every other writer of them holds for its whole store;
    - L2 tables: dirty until their store has returned (``MetadataCache``), so
      ``l2_cache.flush`` writes each one or waits on its lock for a write-back
      in flight on another thread (an eviction); the sync after it covers both;
    - L1 sectors: taken under the L1 lock at the start, so they include every
      link made before the call, and written only here (or exclusively);
    - frees: the decrements queued before the call, applied after the syncs that
      made the dropping updates durable, then synced themselves.
    Caller holds: the global lock (shared or exclusive).
    """
    lazy = state.header.lazy_refcounts
    file = state.file
    with state.flush_lock:
        state.fire("flush_to_os")
        if not lazy or state.refcounts.pending_growth is not None:
            write_refcounts(state)  # (a growth committed here queues its frees)
        with state.alloc_lock:
            pending = state.refcounts.take_deferred_frees()
        with state.l1.lock:  # after the frees: every L1 change they depend on is in
            l1_sectors = _dirty_l1_sectors(state)
        try:
            if state.external and state.datafile is not None:  # the data file first:
                state.datafile.flush()  # every completed data write is durable before
                #                         any metadata naming it
            if not lazy:
                write_refcounts(state)  # (increments made since the first write-back)
            file.flush()
            state.l2_cache.flush()
            if l1_sectors:
                file.flush()
                state.fire("l1_update")
                for offset, data in l1_sectors:
                    if state.overlap is not None:
                        state.check_metadata_write(offset, len(data), ACTIVE_L1)
                    file.pwrite(offset, data)
            file.flush()
            if pending:
                state.fire("cluster_free")
        except BaseException:
            # Nothing taken above may be forgotten: the L1 sectors go out, and the
            # decrements are applied, at the next flush (else a later successful
            # flush would leave an acknowledged write unlinked).
            _requeue(state, l1_sectors, pending)
            raise
        if pending:
            if state.snapshot_table:
                pending = _spare_snapshot_clusters(state, pending)
            with state.alloc_lock:
                freed = state.refcounts.apply_frees(pending)
                if freed and state.overlap is not None:
                    state.overlap.freed(freed)  # before any of them can be reallocated
                # The tables cached for freed clusters, taken before any of those can
                # be allocated again (as a new L2 table, cached under the same offset,
                # which must not be forgotten: it would be read back from the file)
                stale = state.l2_cache.cached([cluster << state.cluster_bits
                                               for cluster in freed]) if freed else []
            if not lazy:
                write_refcounts(state)
            for entry in stale:
                state.l2_cache.discard(entry)
            file.flush()


def _spare_snapshot_clusters(state: ImageState, pending: list[int]) -> list[int]:
    """Stricter than QEMU: never free a cluster a snapshot still references.

    A refcount that says 1 on a cluster a snapshot shares (damage) would free it
    when the active image drops it, and the next allocation would overwrite the
    snapshot's data.  So the decrements that would bring a refcount to 0 are
    checked against the snapshots' tables (read from the file: the cost is bounded
    by their size, and paid only then) and held back for clusters still
    referenced: a refcount too low is left as it is, never made 0.
    Caller holds: the flush lock.
    """
    counts = Counter(pending)
    try:
        with state.alloc_lock:
            zeroing = {c: state.refcounts.get(c) for c, n in counts.items()}
        zeroing = {c: r for c, r in zeroing.items() if 0 < r <= counts[c]}
        if not zeroing:
            return pending
        shared = _snapshot_references(state, set(zeroing))
    except Qcow2Error:
        return pending  # apply_frees reports what is wrong, as before
    except OSError:
        _requeue(state, [], pending)  # the decrements wait for the next flush
        raise
    if not shared:
        return pending
    allowed = {c: zeroing[c] - 1 for c in shared}
    out = []
    for cluster in pending:
        if cluster in allowed:
            if allowed[cluster] <= 0:
                continue
            allowed[cluster] -= 1
        out.append(cluster)
    return out


def _snapshot_references(state: ImageState, clusters: set[int]) -> set[int]:
    """Which of *clusters* the snapshots' L1 and L2 tables reference (from the file)."""
    cb, cs = state.cluster_bits, state.cluster_size
    end = state.refcounts.high_water
    file = state.file
    found: set[int] = set()
    seen: set[int] = set()
    for snap in list(state.snapshot_table):
        if snap.l1_table_offset % cs or snap.l1_size * 8 > MAX_L1_SIZE:
            continue
        raw = file.pread(snap.l1_table_offset, snap.l1_size * 8)
        for l1_entry in table_from_bytes(raw[:len(raw) & ~7]):
            l2_offset = l1_entry & L1E_OFFSET_MASK
            if not l2_offset or l2_offset % cs or l2_offset >> cb >= end:
                continue
            if l2_offset >> cb in clusters:
                found.add(l2_offset >> cb)
            if l2_offset in seen:
                continue
            seen.add(l2_offset)
            for entry in l2_table_from_bytes(file.pread_exact(l2_offset, cs), state.extended):
                if entry & QCOW_OFLAG_COMPRESSED:
                    first, count = state.host_clusters(COMPRESSED, entry, 0)
                    found.update(c for c in range(first, first + min(count, 3))
                                 if c in clusters)
                elif (entry & L2E_OFFSET_MASK) >> cb in clusters:
                    found.add((entry & L2E_OFFSET_MASK) >> cb)
    return found


def _requeue(state: ImageState, l1_sectors: list[tuple[int, bytes]], pending: list[int]) -> None:
    """Put back what a failed flush took: dirty L1 sectors and deferred decrements."""
    l1 = state.l1
    with l1.lock:
        base, size = state.header.l1_table_offset, len(l1.entries)
        for offset, data in l1_sectors:
            first = (offset - base) // 8
            l1.dirty.update(range(first, min(size, first + len(data) // 8)))
    with state.alloc_lock:
        state.refcounts.deferred_frees.extend(pending)


def _dirty_l1_sectors(state: ImageState) -> list[tuple[int, bytes]]:
    """The dirty 512-byte sectors of the L1 table, as they are now.  Caller holds: L1 lock."""
    l1 = state.l1
    assert held(l1.lock), "Caller holds: the L1 lock"
    per_sector = 64
    out = []
    entries = l1.entries
    for sector in sorted({i // per_sector for i in l1.dirty}):
        lo = sector * per_sector
        out.append((state.header.l1_table_offset + lo * 8,
                    table_to_bytes(entries[lo:lo + per_sector])))
    l1.dirty.clear()
    return out


def flush_everything(state: ImageState) -> None:
    """Flush, including refcounts in lazy mode (before close or a table switch)."""
    flush_locked(state)
    if state.header.lazy_refcounts:
        with state.alloc_lock:
            state.refcounts.flush()
        state.file.flush()


def refcounts_in_flux(state: ImageState, func: Callable[..., Any], *args: Any) -> Any:
    """Run ``func(*args)``, a snapshot operation, inside a dirty-bit window (v3 images).

    A snapshot changes the refcounts of shared clusters and their OFLAG_COPIED
    flags, which live in other clusters: no write order keeps ``qemu-img check``
    clean at every instant in between (refcount 2 with COPIED set, or refcount 1
    without it).  So the dirty bit ("refcounts may be inconsistent", the lazy
    refcounts mechanism) is set and synced first, and cleared once everything is
    durable; a crash in between leaves an image that a read-write open or
    ``check -r all`` repairs.  Caller holds: the image exclusively.
    """
    hdr = state.header
    window = hdr.version >= 3 and not hdr.incompatible_features & INCOMPAT_DIRTY
    if window:
        flush_everything(state)
        state.write_incompatible(hdr.incompatible_features | INCOMPAT_DIRTY)
    try:
        result = func(*args)
        if window:
            flush_everything(state)
    except OSError:  # (errors of validation come before any change)
        state.needs_repair = True  # flags may be half-updated: repair on next open
        raise
    if window:
        state.write_incompatible(hdr.incompatible_features & ~INCOMPAT_DIRTY)
    return result
