"""One exported image: its flags, its metadata contexts, and the glue to the engine.

An :class:`Export` is shared by every connection to it: one :class:`~qcow2rw.Image`,
one :class:`~qcow2rw.AioImage` pool running the data requests of all connections
(which is what makes ``NBD_FLAG_CAN_MULTI_CONN`` honest: a FLUSH on any connection
makes durable every write already replied to on any connection, since it is one
``Image.flush()`` of one image), and one small pool for block-status queries, which
read metadata only.

Block status is computed from the L2 tables through ``Image.block_status`` (this
layer only), going down the backing chain for unallocated ranges, as ``qemu-nbd``
reports it: data and compressed clusters are 0; zero clusters (plain or allocated),
unallocated clusters without a backing file and ranges past the end of a shorter
backing file are ``HOLE|ZERO``; ``qemu:allocation-depth`` is 1 for clusters
allocated (data or zero) in the top image, 2 for the first backing file, ..., and 0
where no layer allocates the range (a range past the end of a shorter backing file
counts as that backing file's, as qemu-nbd reports it).  A raw backing file is allocated everywhere; its
holes (``SEEK_HOLE``) report ``HOLE|ZERO`` in ``base:allocation``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..aio import AioImage
from ..format import COMPRESSED, NORMAL, UNALLOCATED, UNALLOCATED_ALLOC, ZERO_ALLOC, ZERO_PLAIN
from ..image import Image
from ..storage import data_segments
from . import proto as P
from .proto import CACHE_MODES

#: Context ids we hand out (any 32-bit value would do; they are per connection in the
#: protocol, constant here).
BASE_ALLOCATION_ID = 1
ALLOCATION_DEPTH_ID = 2

#: At most this many extents in one BLOCK_STATUS reply chunk, and at most this many
#: bytes of the disk looked at for one reply (a reply may cover less than asked).
MAX_EXTENTS = 1 << 15
MAX_STATUS_SPAN = 1 << 31



class Export:
    """An image exported over NBD (see the module docstring).

    Args:
        image: the open image; the export never closes it.
        name, description: what ``NBD_OPT_LIST`` and ``NBD_OPT_INFO`` show.
        readonly: export read-only (forced when the image is open read-only).
        multi_conn: advertise ``NBD_FLAG_CAN_MULTI_CONN``.
        allocation_depth: offer the ``qemu:allocation-depth`` context.
        workers: threads of the shared :class:`~qcow2rw.AioImage`.
        cache: one of :data:`CACHE_MODES`.
    """

    def __init__(self, image: Image, *, name: str = "", description: str = "",
                 readonly: bool = False, multi_conn: bool = True,
                 allocation_depth: bool = False, workers: int = 8,
                 cache: str = "writeback") -> None:
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, not {cache!r}")
        if len(name.encode()) > P.MAX_STRING or len(description.encode()) > P.MAX_STRING:
            raise ValueError("export name and description are at most 4096 bytes")
        self.image = image
        self.name = name
        self.description = description
        self.readonly = readonly or image.readonly
        self.multi_conn = multi_conn
        self.size = image.size
        self.cluster_size = image.cluster_size
        self.preferred_block = P.preferred_block(image.cluster_size)
        self.cache = cache
        self.force_fua = cache in ("writethrough", "directsync")
        self.ignore_flush = cache == "unsafe"
        self.zeros = bytes(max(self.preferred_block, P.MAX_BLOCK // 128))  # largest granule
        self.contexts: list[tuple[int, str]] = [(BASE_ALLOCATION_ID, P.CONTEXT_BASE_ALLOCATION)]
        if allocation_depth:
            self.contexts.append((ALLOCATION_DEPTH_ID, P.CONTEXT_ALLOCATION_DEPTH))
        self.aio = AioImage(image, workers=workers)
        self._meta = ThreadPoolExecutor(2, thread_name_prefix="qcow2rw-nbd-status")
        #: Guards ``_writes`` and ``_flushed``: completed writes, and how many of them
        #: the last completed flush covers (a disconnect flushes when they differ).
        self._count_lock = threading.Lock()
        self._writes = 0
        self._flushed = 0
        self.closed = False

    # Handshake -----------------------------------------------------------------------
    def transmission_flags(self, structured: bool) -> int:
        """The export flags a client sees (``SEND_DF`` only with structured replies)."""
        flags = (P.TF_HAS_FLAGS | P.TF_SEND_FLUSH | P.TF_SEND_FUA | P.TF_SEND_CACHE)
        if self.readonly:
            flags |= P.TF_READ_ONLY
        else:
            flags |= P.TF_SEND_TRIM | P.TF_SEND_WRITE_ZEROES | P.TF_SEND_FAST_ZERO
        if structured:
            flags |= P.TF_SEND_DF
        if self.multi_conn:
            flags |= P.TF_CAN_MULTI_CONN
        return flags

    def match_contexts(self, queries: list[str], listing: bool) -> list[tuple[int, str]]:
        """The contexts that *queries* select (LIST: none asked lists all; ``ns:`` a
        namespace; SET: exact names only), in id order."""
        chosen = set()
        if listing and not queries:
            chosen = set(self.contexts)
        for query in queries:
            for cid, cname in self.contexts:
                if query == cname or (listing and query.endswith(":")
                                      and cname.startswith(query)):
                    chosen.add((cid, cname))
        return sorted(chosen)

    # Requests ------------------------------------------------------------------------
    def can_fast_zero(self, offset: int, length: int) -> bool:
        """True when zeroing the range needs no data write (whole clusters, v3 image)."""
        cs = self.cluster_size
        return bool(getattr(self.image, "has_zero_flag", False)) and offset % cs == 0 \
            and length % cs == 0

    def zero_steps(self, offset: int, length: int,
                   may_trim: bool) -> list[Callable[[], Future[None]]]:
        """The requests that zero a range, as submitters run one after the other.

        Without *may_trim* (``NO_HOLE``), or on a v2 image (no zero flag: a discard
        there could expose a backing file), one ``write_zeroes``, which keeps
        allocated clusters allocated (zero-allocated).  With it, on a v3 image, the
        whole clusters are discarded first (zero flag, host clusters freed, as qemu-nbd
        does with may-trim), then the partial clusters at the edges are zeroed.
        """
        aio = self.aio
        cs = self.cluster_size
        start = -(-offset // cs) * cs
        end = (offset + length) // cs * cs
        if not may_trim or not getattr(self.image, "has_zero_flag", False) or start >= end:
            return [lambda: aio.submit_write_zeroes(offset, length)]
        steps: list[Callable[[], Future[None]]] = [lambda: aio.submit_discard(start, end - start)]
        if offset < start:
            steps.append(lambda: aio.submit_write_zeroes(offset, start - offset))
        if end < offset + length:
            steps.append(lambda: aio.submit_write_zeroes(end, offset + length - end))
        return steps

    def flush(self) -> Future[None]:
        """An image flush (a future), counted for :meth:`needs_flush`."""
        with self._count_lock:
            covered = self._writes
        future = self.aio.submit_flush()

        def done(f: Future[None]) -> None:
            if not f.cancelled() and f.exception() is None:
                with self._count_lock:
                    self._flushed = max(self._flushed, covered)
        future.add_done_callback(done)
        return future

    def note_write(self) -> None:
        """A write (or trim, or zeroing) completed: a later disconnect must flush."""
        with self._count_lock:
            self._writes += 1

    def needs_flush(self) -> bool:
        """True when a write completed after the start of the last completed flush."""
        with self._count_lock:
            return self._writes != self._flushed and not self.readonly

    def submit_block_status(self, offset: int, length: int, one: bool,
                            contexts: list[tuple[int, str]]) -> Future[list[tuple[int, list[tuple[int, int]]]]]:
        """A future of ``[(context id, [(length, flags), ...]), ...]`` for the range."""
        return self._meta.submit(self.block_status, offset, length, one, contexts)

    def block_status(self, offset: int, length: int, one: bool,
                     contexts: list[tuple[int, str]]) -> list[tuple[int, list[tuple[int, int]]]]:
        """Extents of each context in *contexts* from *offset* (at most *length* bytes;
        with *one*, a single extent per context).  All contexts cover the same span."""
        length = min(length, MAX_STATUS_SPAN, self.size - offset)
        wanted = [cid for cid, _ in contexts]
        lists: dict[int, list[tuple[int, int]]] = {cid: [] for cid in wanted}
        limit = 1 if one else MAX_EXTENTS
        for size, flags, depth in _chain_status(self.image, offset, length, 1):
            full = False
            for cid in wanted:
                value = flags if cid == BASE_ALLOCATION_ID else depth
                out = lists[cid]
                if out and out[-1][1] == value:
                    out[-1] = (out[-1][0] + size, value)
                else:
                    out.append((size, value))
                    if len(out) > limit:
                        full = True
            if full:
                break
        if any(len(v) > limit for v in lists.values()):
            # Cut every context at the same point: the end of the shortest complete list.
            end = min(sum(n for n, _ in v[:limit]) for v in lists.values())
            for cid, v in lists.items():
                lists[cid] = _truncate(v, end)
        return [(cid, lists[cid]) for cid in wanted]

    def close(self) -> None:
        """Finish every queued request and stop the pools (the image stays open)."""
        if self.closed:
            return
        self.closed = True
        self.aio.close()
        self._meta.shutdown(wait=True)


def _truncate(extents: list[tuple[int, int]], end: int) -> list[tuple[int, int]]:
    out = []
    pos = 0
    for size, value in extents:
        if pos >= end:
            break
        out.append((min(size, end - pos), value))
        pos += size
    return out


def _chain_status(layer: Any, offset: int, length: int, depth: int) -> Iterator[tuple[int, int, int]]:
    """``(length, base:allocation flags, allocation depth)`` runs over the range, in order."""
    if not hasattr(layer, "block_status"):  # a raw backing file
        for _, size, is_data in _data_segments(layer.file.fd, offset, length):
            yield size, 0 if is_data else P.STATE_HOLE | P.STATE_ZERO, depth
        return
    pos = offset
    end = offset + length
    while pos < end:
        # One L2 table's span at a time keeps each call short and the result lazy.
        span = layer.cluster_size * (layer.cluster_size // 8)
        chunk = min(end - pos, span - pos % span)
        for kind, guest, size, _where in layer.block_status(pos, chunk):
            if kind in (NORMAL, COMPRESSED):
                yield size, 0, depth
            elif kind in (ZERO_PLAIN, ZERO_ALLOC):
                yield size, P.STATE_HOLE | P.STATE_ZERO, depth
            elif kind == UNALLOCATED or kind == UNALLOCATED_ALLOC:
                yield from _below(layer, guest, size, depth)
            else:  # an unknown kind: report data, the safe answer
                yield size, 0, depth
        pos += chunk


def _below(layer: Any, offset: int, length: int, depth: int) -> Iterator[tuple[int, int, int]]:
    """What an unallocated range of *layer* reports: its backing file's status."""
    backing = getattr(layer, "backing", None)
    if backing is None:
        yield length, P.STATE_HOLE | P.STATE_ZERO, 0
        return
    inside = max(0, min(length, backing.size - offset))
    if inside:
        yield from _chain_status(backing, offset, inside, depth + 1)
    if inside < length:  # reads as zeros; qemu counts it as the backing file's
        yield length - inside, P.STATE_HOLE | P.STATE_ZERO, depth + 1


def _data_segments(fd: int, offset: int, length: int) -> list[tuple[int, int, bool]]:
    """:func:`~qcow2rw.storage.data_segments`, reporting data where the file cannot
    tell (an lseek error): a status must be answered, and data is always safe."""
    try:
        return data_segments(fd, offset, length)
    except OSError:
        return [(offset, length, True)]
