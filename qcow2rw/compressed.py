"""Compressed writes (QEMU's ``qcow2_co_pwritev_compressed``): one whole guest cluster,
compressed and packed into host clusters next to other fragments.

- :func:`~qcow2rw.compress.compress_cluster` makes the stored form (pure, thread-safe,
  the GIL released while it deflates): callers compress on a thread pool;
- :func:`write_packed` stores it: :func:`_plan_compressed`, under the L2 table's lock,
  checks that the entry is unallocated (or a plain zero cluster: "compression can't
  overwrite anything"), puts an in-flight record on it and allocates the fragment's
  bytes (:meth:`~qcow2rw.refcount.RefcountManager.alloc_bytes`, QEMU's packing, under
  the allocator lock) or, for data that did not compress, a whole cluster; then
  :func:`~qcow2rw.cluster.run_write_plan` writes the fragment with no metadata lock
  held and links the L2 entry.

Stricter than QEMU, which links the entry before the data write ends: the fragment
is in the file before its L2 entry names it, so a concurrent reader of the cluster
reads the old contents (zeros or the backing file) or the new, never a half-linked
cluster.  A write, discard or zeroing of the same cluster meanwhile waits for the
in-flight record, as it does for any allocating write.

Called in guest order from one thread, the layout is a function of the data alone:
``qcow2rw convert -c`` compresses in parallel and stores in order, so its output is
byte-identical from run to run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .cache import CacheEntry
from .cancel import CancelToken
from .cluster import WriteOp, abandon_plans, on_table, run_write_plan, undo_plan, unlist_plan
from .compress import compress_cluster
from .errors import ClusterAllocated, FormatError, UnsupportedFeature
from .format import L2_BITMAP_ALL_ALLOC, NORMAL, UNALLOCATED, ZERO_PLAIN, encode_compressed
from .locks import Gate, held
from .state import ImageState

if TYPE_CHECKING:
    from .image import Image

__all__ = ["check_request", "compress_cluster", "write_packed"]


def write_packed(image: Image, offset: int, data: Any, payload: bytes | None, *,
                 cancel: CancelToken | None = None) -> None:
    """Store the guest cluster at *offset* (cluster-aligned), unallocated until now.

    *data* is the whole cluster (the image's last cluster may be short: it is
    zero-padded); *payload* is what :func:`compress_cluster` made of it, None to
    store it as a normal cluster.  Raises :class:`~qcow2rw.errors.ClusterAllocated`
    (and changes nothing) when the cluster is allocated, ``ValueError`` when the
    request is not one whole cluster.
    """
    state = image.state
    cs = state.cluster_size
    length = len(memoryview(data).cast("B"))
    check_request(state, offset, length)
    if state.bitmaps is not None:
        state.bitmaps.mark(offset, length)
    if payload is not None and not 0 < len(payload) < cs:
        raise ValueError(f"a compressed cluster is 1 to {cs - 1} bytes, not {len(payload)}")
    if payload is None:
        stored = memoryview(bytes(data) + bytes(cs - length) if length < cs else data).cast("B")
    else:
        stored = memoryview(payload)
    image._shared(True, cancel).run(_write_locked, state, offset, stored, cancel)


def check_request(state: ImageState, offset: int, length: int) -> None:
    """Refuse a compressed write that is not one whole cluster (``ValueError``) or
    reaches past the disk (:class:`~qcow2rw.errors.OutOfRange`); the image read-only."""
    if state.external:  # (QEMU: -ENOTSUP; no compressed clusters in a data file)
        raise UnsupportedFeature("Operation not supported: an image with an external data "
                                 "file cannot hold compressed clusters")
    state.check_range(offset, length)
    cs = state.cluster_size
    if offset % cs or not length or (length != cs and offset + length != state.header.size):
        raise ValueError(f"a compressed write is one whole cluster at a cluster boundary "
                         f"(the image's last cluster may be short), not {length} bytes "
                         f"at offset {offset}")
    if state.readonly:
        raise state.readonly_error()


def _write_locked(state: ImageState, offset: int, stored: memoryview,
                  cancel: CancelToken | None) -> None:
    """Caller holds: the global lock shared (or exclusive), no metadata lock."""
    mark = len(state.glock.shared().pending)
    index = (offset >> state.cluster_bits) & (state.l2_entries - 1)
    try:
        on_table(state, offset >> state.l1_shift, index, index, cancel, _plan_compressed,
                  run_write_plan, offset, stored, cancel)
    except BaseException:
        abandon_plans(state, mark)  # a plan an interrupt cut off between its steps
        raise


def _plan_compressed(state: ImageState, entry_obj: CacheEntry, first: int, last: int,
                     guest: int, stored: memoryview, _cancel: Any) -> list[WriteOp]:
    """Claim entry *first* for a compressed fragment (*stored* shorter than a cluster)
    or a normal cluster (*stored* a whole one): the in-flight record and the space.

    Caller holds: the table's lock.
    """
    assert held(entry_obj.lock), "Caller holds: the table's lock"
    kind = state.classify(entry_obj.table[first])
    if kind not in (UNALLOCATED, ZERO_PLAIN):
        raise ClusterAllocated(f"compressed write at offset {guest}: the cluster is already "
                               "allocated (compression cannot overwrite anything)")
    ops: list[WriteOp] = []
    pending = state.glock.shared().pending
    pending.append((entry_obj, ops))  # listed before anything is claimed (see _plan_write)
    try:
        cb = state.cluster_bits
        descriptor, fresh = 0, False
        with state.alloc_lock:
            refcounts = state.refcounts
            if len(stored) < state.cluster_size:
                host = refcounts.alloc_bytes(len(stored))
                try:
                    descriptor = encode_compressed(host, len(stored), cb)
                except FormatError:  # past the highest offset a descriptor can name
                    refcounts.free_now(*state.host_clusters(NORMAL, host, len(stored)))
                    raise
            else:
                host = refcounts.alloc(1)
                fresh = refcounts.last_alloc_fresh
        record = Gate()
        bitmaps = None
        if state.extended:  # a compressed cluster has no subclusters; a plain one all
            bitmaps = [0 if descriptor else L2_BITMAP_ALL_ALLOC]
        op = WriteOp(first, first + 1, host, True, [], record, fresh, descriptor,
                     bitmaps=bitmaps)
        ops.append(op)  # (no call until the record is set: listed exactly when it is)
        entry_obj.inflight[first] = record
    except BaseException:
        undo_plan(state, entry_obj, ops)
        unlist_plan(state, ops)
        raise
    return ops
