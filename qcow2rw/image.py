"""The synchronous :class:`Image`: open, read, write, discard, zero, flush, map, info.

An ``Image`` is safe to call from many threads at once.  It is the public face of an
open image: the request entry points (with the hot path, :meth:`Image._fast_io`),
the exclusive operations (snapshots, resize, check, amend, close) and
:func:`open_image`.  The state it works on is an :class:`~qcow2rw.state.ImageState`
(``Image.state``), where each field says what guards it; the mechanisms take that
state: :mod:`.cluster` (lookup, the general read path, the write plan with
copy-on-write, discard and zeroing), :mod:`.writeback` (flush and its order),
:mod:`.resize`, :mod:`.snapshot`, :mod:`.check`, :mod:`.amend`.  The locks and their
order are described once, in :mod:`qcow2rw.locks`.

Requests never hold a metadata lock during data I/O.  A write that allocates
registers an in-flight record on the L2 entries it will change before it drops
the L2 lock; an overlapping write, discard or zeroing waits for the record and then
looks the mapping up again.  Every host cluster a request does I/O on carries an
in-use count, and the allocator never hands out a cluster with a count, so a
cluster freed under a read is not reused before that read ends.
"""

from __future__ import annotations

import errno
import os
import threading
from array import array
from collections.abc import Callable
from functools import partial
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from . import compress, snapshot
from .amend import amend as amend_image
from .backing import BackingSource, open_backing, resolve_name
from .bitmaps import MaintainedBitmaps, bitmap_info
from .cache import MetadataCache
from .cancel import CancelToken
from .check import CheckResult, check_image, rebuild_refcounts
from .cluster import (abandon_plans, block_status, for_each_table, read_locked, write_chunk,
                      write_zeroes_locked, zero_clusters)
from .compress import compress_cluster
from .compressed import check_request, write_packed
from .crypto import KEY_REQUIRED, open_encryption
from .datafile import choose_data_file, has_data_file
from .errors import (ClosedImage, CorruptImage, EncryptedImage, FormatError, OutOfRange,
                     UnsupportedFeature)
from .events import EventPoints
from .format import (AUTOCLEAR_BITMAPS, COMPRESSED, COMPRESSION_NAMES, INCOMPAT_DIRTY, L1E_OFFSET_MASK,
                     L2_BITMAP_ALL_ALLOC,
                     L2E_OFFSET_MASK, NORMAL, OFF_AUTOCLEAR, AUTOCLEAR_DATA_FILE_RAW, QCOW_OFLAG_COMPRESSED,
                     QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO, UNALLOCATED, ZERO_ALLOC, ZERO_PLAIN,
                     Header, Snapshot, parse_header)
from .imagelock import ExclusiveHold, SharedSection
from .locks import LOCK_MODES, looks_free
from .mapping import chain_map
from .overlap import OverlapMap, mode_of
from .refcount import RefcountManager
from .resize import check_resize, resize_held
from .state import ImageState
from .storage import HostFile
from .writeback import (attach as attach_writeback, flush_everything, flush_shared, refcounts_in_flux)

if TYPE_CHECKING:
    from .aio import AioImage

#: The host-file cache modes an image opens with (QEMU's names).
CACHE_MODES = ("writeback", "unsafe", "none")

__all__ = ["CACHE_MODES", "LOCK_MODES", "Image", "OutOfRange", "open_for_check", "open_image"]

# The cluster kinds of block_status() are format's (QCOW2ClusterType); still importable
# from here for the modules that took them from here (qcow2rw.nbd.export).
__all__ += ["COMPRESSED", "NORMAL", "UNALLOCATED", "ZERO_ALLOC", "ZERO_PLAIN"]


class Image:
    """An open qcow2 image (see :func:`qcow2rw.open`).

    ``state`` is the engine's :class:`~qcow2rw.state.ImageState`.  The fixed parts of
    it are also plain attributes here (``file``, ``header``, the geometry,
    ``l2_cache``, ``_glock``); the parts that change are properties over it.
    """

    def __init__(self, file: HostFile, header: Header, *, path: str, readonly: bool,
                 cache_size: int | None, lock_mode: str, backing: bool, force_share: bool,
                 chain: tuple[str, ...], check_mode: bool = False,
                 overlap_check: bool | str = True, metadata_only: bool = False,
                 encryption: dict[str, Any] | None = None,
                 data_file: HostFile | None = None) -> None:
        state = ImageState(file, header, path=path, readonly=readonly, cache_size=cache_size,
                           lock_mode=lock_mode, check_mode=check_mode,
                           overlap_check=overlap_check, data_file=data_file)
        attach_writeback(state)
        self.state = state
        self.path = path
        self.lock_mode = lock_mode
        self.file = file
        self._fd = file.fd
        self.header = header
        self.cluster_bits = state.cluster_bits
        self.cluster_size = state.cluster_size
        self.l2_bits = state.l2_bits
        self.l2_entries = state.l2_entries
        self.l1_shift = state.l1_shift
        self.has_zero_flag = state.has_zero_flag
        self.l2_cache: MetadataCache = state.l2_cache
        self._glock = state.glock
        self._in_use = state.in_use
        #: The ``encrypt`` block of ``info`` (None: not encrypted); see qcow2rw.crypto.
        self.encryption = encryption
        #: Opened for metadata only (QEMU's BDRV_O_NO_IO): no guest data is read or written.
        self.metadata_only = metadata_only
        if metadata_only:
            # Instance attributes shadow the methods: the request path of other images
            # pays nothing for this.
            for name in _DATA_METHODS:
                setattr(self, name, self._refuse_data)
        opener = partial(open_image, metadata_only=True) if metadata_only else open_image
        direct = file.direct is not None  # (cache="none" holds for the whole chain)
        if direct:
            opener = partial(opener, cache="none")
        if backing and header.backing_file:
            state.backing = open_backing(path, header.backing_file, header.backing_format, chain,
                                         force_share=force_share, direct=direct, opener=opener)

    def _refuse_data(self, *args: Any, **kwargs: Any) -> Any:
        """What every data method of an image opened for metadata only does."""
        if self.header.crypt_method:
            raise EncryptedImage(KEY_REQUIRED)
        raise UnsupportedFeature(f"'{self.path}' was opened for metadata only: its guest "
                                 "data cannot be read or written")

    def _prepare_for_writing(self) -> None:
        """Read-write open: arm the clearing of the autoclear bits; repair a dirty image.

        Autoclear bits (the bitmaps bit included: we do not update bitmaps) are
        cleared, and the clearing synced, right before the first write to the file
        (``HostFile.first_write``), so that their owners know the data changed behind
        them; an open that writes nothing leaves them, and the bitmaps, alone.  A
        dirty image (lazy refcounts, not closed cleanly) has its refcounts rebuilt.
        """
        state = self.state
        hdr = state.header
        if hdr.version >= 3 and hdr.autoclear_features:
            if hdr.autoclear_features & AUTOCLEAR_BITMAPS:
                state.bitmaps = MaintainedBitmaps.load(state)
        if hdr.version >= 3 and (state.bitmaps is not None
                                 or hdr.autoclear_features & ~self._kept_autoclear()):
            state.file.first_write = self._clear_autoclear_bits
            if state.datafile is not state.file and state.datafile is not None:
                # (a data write runs the image file's hook, once)
                state.datafile.first_write = state.file.before_first_write
        with self.exclusive():
            if hdr.incompatible_features & INCOMPAT_DIRTY:
                self._without_overlap_check(rebuild_refcounts, state)
                state.write_incompatible(hdr.incompatible_features & ~INCOMPAT_DIRTY)

    def _kept_autoclear(self) -> int:
        """The autoclear bits we maintain: ``data_file_raw`` (every data write goes to
        the guest offset of the data file, zero writes write zeros there)."""
        return AUTOCLEAR_DATA_FILE_RAW if self.state.external else 0

    def _clear_autoclear_bits(self) -> None:
        """The first-write hook: autoclear bits to 0 in the header, but the ones we
        maintain: the bitmaps bit when the bitmaps are kept valid (their in-use flags
        set instead), ``data_file_raw``; synced before the write that set it off
        reaches the file (the image file's or the data file's)."""
        state = self.state
        keep = (AUTOCLEAR_BITMAPS if state.bitmaps is not None else 0) | self._kept_autoclear()
        value = state.header.autoclear_features & keep
        if value != state.header.autoclear_features:
            state.file.pwrite(OFF_AUTOCLEAR, value.to_bytes(8, "big"))
        if state.bitmaps is not None:
            state.bitmaps.begin()
        state.file.flush()
        state.header.autoclear_features = value

    def _drop_bitmaps(self) -> None:
        """Stop keeping the bitmaps valid (an operation they cannot follow): clear the
        autoclear bit as a program without bitmap support does.  Caller holds:
        exclusive."""
        state = self.state
        if state.bitmaps is None:
            return
        state.file.before_first_write()
        state.bitmaps = None
        value = state.header.autoclear_features & ~AUTOCLEAR_BITMAPS
        state.file.pwrite(OFF_AUTOCLEAR, value.to_bytes(8, "big"))
        state.file.flush()
        state.header.autoclear_features = value

    def _without_overlap_check(self, func: Callable[..., Any], *args: Any) -> Any:
        """``func(*args)`` with the overlap map set aside (the checker has its own
        check), then the map re-attached and rebuilt.  Caller holds: exclusive."""
        state = self.state
        overlap, state.overlap = state.overlap, None
        try:
            result = func(*args)
        finally:
            state.overlap = overlap
            state.attach_overlap()
            state.metadata_moved(None)
        return result

    # Properties (what changes lives in the state; read-only ones straight from it) --
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

    @property
    def encrypted(self) -> bool:
        """True for an encrypted image (AES or LUKS), which only a metadata-only open
        accepts."""
        return bool(self.header.crypt_method)

    backing: BackingSource | None = property(  # type: ignore[assignment]
        attrgetter("state.backing"),
        doc="The open backing file (an Image or a raw file), None without one.")
    closed: bool = property(attrgetter("state.closed"),  # type: ignore[assignment]
                            doc="True once close() has run.")
    check_mode: bool = property(  # type: ignore[assignment]
        attrgetter("state.check_mode"),
        doc="Opened the way ``qemu-img check`` opens (QEMU's BDRV_O_CHECK).")
    refcounts: RefcountManager = property(  # type: ignore[assignment]
        attrgetter("state.refcounts"),
        doc="The refcount manager (check and amend may replace it).")
    overlap: OverlapMap | None = property(  # type: ignore[assignment]
        attrgetter("state.overlap"), doc="QEMU's overlap check (None when off).")
    l1: array = property(  # type: ignore[assignment]
        attrgetter("state.l1.entries"),
        doc="The active L1 table's entries (``state.l1`` has them with their dirty set and lock).")
    snapshot_table: list[Snapshot] = property(  # type: ignore[assignment]
        attrgetter("state.snapshot_table"), doc="The live list of internal snapshots.")
    _exclusive_owner: int | None = property(  # type: ignore[assignment]
        attrgetter("state.exclusive_owner"))
    _alloc_lock: Any = property(attrgetter("state.alloc_lock"))

    @property
    def readonly(self) -> bool:
        """True if opened read-only, or turned read-only by a failed fsync."""
        return self.state.readonly

    @readonly.setter
    def readonly(self, value: bool) -> None:
        self.state.readonly = value

    @property
    def events(self) -> EventPoints | None:
        """The event points (DESIGN §4.8): set to an EventPoints to pause or fail requests."""
        return self.state.events

    @events.setter
    def events(self, value: EventPoints | None) -> None:
        self.state.events = value

    @property
    def corrupt_event(self) -> str | None:
        """The first corruption this session found (None: none)."""
        return self.state.corrupt_event

    @corrupt_event.setter
    def corrupt_event(self, value: str | None) -> None:
        self.state.corrupt_event = value

    # Locking ---------------------------------------------------------------
    def _shared(self, write: bool = False, cancel: CancelToken | None = None) -> SharedSection:
        """The global lock shared for one request (not re-taken inside exclusive()),
        looking at *cancel* while it waits (see :meth:`ThreadHold.take_watching`).

        A :class:`~qcow2rw.imagelock.SharedSection`: ``with self._shared(): ...``, or better
        ``self._shared().run(func, *args)``, which no interrupt can leave holding the
        lock (``with`` has a one-instruction gap at the start of ``__exit__``: see there).
        """
        state = self.state
        if write and state.readonly:
            raise state.readonly_error()
        if state.exclusive_owner == threading.get_ident():
            if state.closed:
                raise ClosedImage("I/O operation on a closed image")
            return SharedSection(state, locked=False)
        return SharedSection(state, cancel=cancel)

    def exclusive(self, timeout: float | None = None) -> ExclusiveHold:
        """Hold the image exclusively: in-flight requests drain first, new ones wait.

        An :class:`~qcow2rw.imagelock.ExclusiveHold`: ``with img.exclusive() as img:``, or
        ``img.exclusive().run(func, *args)``, which no interrupt can leave holding the
        image (``with`` has a one-instruction gap at the start of ``__exit__``).
        Requests made from the same thread inside run without waiting, so several
        operations can be made atomic.  Raises :class:`~qcow2rw.locks.LockTimeout` if the image cannot be
        taken within *timeout* seconds.  With no *timeout* it waits at most the image
        lock's watchdog (``self._glock.watchdog``, 30 s by default), then raises
        :class:`~qcow2rw.locks.DrainTimeout` naming what is still held (the threads
        inside requests, in-use pins, pinned L2 tables, in-flight allocations): it
        never waits for ever in silence.  An exception while waiting leaves nothing held.
        """
        return self.state.exclusive(timeout, gives=self)

    def _check_range(self, offset: int, length: int) -> None:
        self.state.check_range(offset, length)

    # Reading ---------------------------------------------------------------
    def read(self, offset: int, length: int, *, cancel: CancelToken | None = None) -> bytes:
        """Read *length* bytes of guest data at *offset*."""
        buf = bytearray(length)
        self.readinto(offset, buf, cancel=cancel)
        return bytes(buf)

    def readinto(self, offset: int, buffer: Any, *, cancel: CancelToken | None = None) -> int:
        """Read into *buffer* (any writable bytes-like object) from *offset*; return its length."""
        return self._request(offset, buffer, False, cancel)

    def write(self, offset: int, data: Any, *, cancel: CancelToken | None = None) -> None:
        """Write *data* (any bytes-like object) at guest *offset*; any alignment."""
        self._request(offset, data, True, cancel)

    def write_compressed(self, offset: int, data: Any, *, cancel: CancelToken | None = None) -> None:
        """Write one whole guest cluster at *offset* compressed, as QEMU does (zlib or
        zstd, as the header says); data that does not compress into less than a cluster
        is written the ordinary way (as QEMU's qcow2_co_pwritev_compressed_task does,
        over whatever the cluster holds).

        A compressed cluster must go where nothing is allocated (or a plain zero
        cluster): else :class:`~qcow2rw.errors.ClusterAllocated`, and nothing changes.  *offset* is
        cluster-aligned and *data* one cluster long (the image's last cluster may be
        short; it is zero-padded).  Fragments are packed into host clusters as QEMU
        packs them (:mod:`qcow2rw.compressed`), and each is in the file before its L2
        entry links it.  Compressing runs before any lock is taken.
        """
        check_request(self.state, offset, len(memoryview(data).cast("B")))
        payload = compress_cluster(data, self.header.cluster_size, self.header.compression_type)
        if payload is None:  # (does not compress: an ordinary write)
            self.write(offset, data, cancel=cancel)
        else:
            write_packed(self, offset, data, payload, cancel=cancel)

    def _request(self, offset: int, data: Any, write: bool, cancel: CancelToken | None) -> int:
        """One read or write request: checks, the global lock shared, then the fast path
        or the general one.  Returns the request's length."""
        view: Any
        if type(data) is bytearray or (write and type(data) is bytes):  # no view needed
            view = data
        else:
            view = memoryview(data)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
        length = len(view)
        state = self.state
        if offset < 0 or offset + length > self.header.size:
            state.check_range(offset, length)
        if write and state.readonly:
            raise state.readonly_error()
        if write and state.bitmaps is not None:
            state.bitmaps.mark(offset, length)
        # Interrupt safety (see qcow2rw.locks): the hold records what it took in the same
        # step as it takes it, so the finally gives back exactly that, and calls settle()
        # again if an interrupt cut the first call short.
        if state.exclusive_owner == threading.get_ident():
            hold = None
            depth = 0
        else:
            hold = self._glock.shared()
            depth = hold.depth
        try:
            if hold is not None:
                hold.take_watching(cancel)
            if state.closed:
                raise ClosedImage("I/O operation on a closed image")
            if self._fast_io(offset, view, write, state):  # one cluster: no cancel point
                pass
            elif write:
                mark = len((hold or self._glock.shared()).pending)
                try:
                    for_each_table(state, offset, length, memoryview(view), cancel,
                                   write_chunk, cancel)
                except BaseException:
                    # A plan whose return value or whose run an interrupt cut off: give
                    # back what its steps still claim (clusters, records, pins).
                    abandon_plans(state, mark)
                    raise
            else:
                read_locked(state, offset, memoryview(view), cancel)
        finally:
            if hold is not None:
                try:
                    hold.settle(depth)
                except BaseException:
                    hold.settle(depth)
                    raise
        return length

    def read_nowait(self, offset: int, view: Any) -> bool:
        """Read into *view* (a bytearray or a byte-format memoryview) now, in this
        thread, if that needs no waiting at all: the global lock shared without
        waiting, the L2 table cached, one normal cluster, the data in the page cache
        (``preadv`` with ``RWF_NOWAIT``).  False, with the hold given back and nothing
        else changed (*view* may be partly filled), when anything would wait: the
        caller then reads the ordinary way.  (AioImage's inline completion, issue 16.)
        """
        state = self.state
        if (type(offset) is not int  # (the ordinary path reports a bad one, in the future)
                or offset < 0 or offset + len(view) > self.header.size or state.closed
                or (offset & state.cs_mask) + len(view) > state.cluster_size
                or state.events is not None or state.exclusive_owner is not None
                or self.metadata_only  # (the ordinary path refuses it)
                or state.file.direct is not None  # (O_DIRECT: no page cache to hit)
                or state.datafile.nowait_reads is False
                or not self._maybe_cached(offset, state)):
            return False
        return self._nowait_io(offset, view, False, state)

    def _nowait_io(self, offset: int, view: Any, write: bool, state: ImageState) -> bool:
        """:meth:`_fast_io` with *nowait*, under the global lock shared if it can be
        taken without waiting (else False); the hold is given back either way."""
        hold = self._glock.shared()
        depth = hold.depth
        try:
            if not hold.take(blocking=False) or state.closed:
                return False
            done = self._fast_io(offset, view, write, state, nowait=True)
            # (not "return call()" in a try: see the interrupt rules in qcow2rw.locks)
        finally:
            try:
                hold.settle(depth)
            except BaseException:
                hold.settle(depth)
                raise
        return done

    def _maybe_cached(self, offset: int, state: ImageState) -> bool:
        """A hint, read without any lock: the L2 table of *offset* may be cached (or
        there is none: a hole).  False means a miss for sure, and read_nowait gives up
        before it takes the global lock (the cache-miss path pays one dictionary
        lookup for trying inline); True is checked again under the lock."""
        try:
            l2_offset = state.l1.entries[offset >> state.l1_shift] & L1E_OFFSET_MASK
        except IndexError:  # (an L1 table being replaced: let the locked path decide)
            return True
        return not l2_offset or l2_offset in self.l2_cache.entries

    def write_nowait(self, offset: int, data: Any) -> bool:
        """Write *data* (bytes, a bytearray or a byte-format memoryview) now, in this
        thread, if that needs no waiting at all: as :meth:`read_nowait`, into one
        cluster that is allocated and not shared (COPIED), no allocation in flight on
        it, with ``pwritev(RWF_NOWAIT)``.  False when anything would wait (the caller
        then writes the ordinary way), or when the file system refuses such writes:
        the first refusal (``EOPNOTSUPP``, ext4 and tmpfs do) is remembered for this
        open (``HostFile.nowait_writes``), so the probe is one real attempt, never a
        guess.  Once part of *data* is written, the write is under way and ends here:
        see :func:`_pwrite_nowait`.  (AioImage's inline completion, issue 16 §2.)
        """
        state = self.state
        file = state.datafile
        if (type(offset) is not int or self.metadata_only  # (no data file then)
                or file.nowait_writes is False or offset < 0
                or offset + len(data) > self.header.size
                or state.closed or state.readonly or state.events is not None
                or state.exclusive_owner is not None
                or state.bitmaps is not None or file.faults is not None
                or file.log is not None or file.sync_error is not None
                or file.first_write is not None or file.direct is not None):
            return False  # (the ordinary path does what these need)
        return self._nowait_io(offset, data, True, state)

    def _fast_io(self, offset: int, view: Any, write: bool, state: ImageState | None = None,
                 nowait: bool = False) -> bool:
        """Serve a request inside one normal cluster (COPIED for writes) with a cached
        L2 table; False (having done nothing) when the general path must take it.

        *view* is a bytearray, or for writes bytes, or a byte-format memoryview.  This
        is the hot path of every small request: names are looked up once, and an L1
        entry that is zero or unaligned needs no test of its own (no L2 table is ever
        cached under such an offset, so the lookup misses).  *state* is ``self.state``
        (passed by :meth:`_request`, which has it at hand).  *nowait* (inline
        completion: :meth:`read_nowait`, :meth:`write_nowait`) does the I/O with
        ``RWF_NOWAIT`` or not at all, and serves reads of holes and zero clusters that
        have nothing below them as zeros.
        Caller holds: the global lock shared.
        """
        if state is None:
            state = self.state
        length = len(view)
        cs_mask = state.cs_mask
        if not length or (offset & cs_mask) + length > state.cluster_size:
            return False
        entries = self.l2_cache.entries  # lock-free lookup: see MetadataCache.lookup
        l2_offset = state.l1.entries[offset >> state.l1_shift] & L1E_OFFSET_MASK
        entry_obj = entries.get(l2_offset)
        if entry_obj is None or entry_obj.ready is not None:
            if (nowait and not write and state.backing is None
                    and not state.l1.entries[offset >> state.l1_shift]):
                view[:] = bytes(length)  # no L2 table, nothing below: zeros
                return True
            return False
        entry_obj.referenced = True
        pin = None  # set right before its append (no call between): removed iff appended
        zeros = False
        done = True
        try:
            if nowait and not looks_free(entry_obj.lock):
                return False  # (its holder may be writing the table back: a sync, even)
            with entry_obj.lock:
                if entries.get(l2_offset) is not entry_obj:  # evicted meanwhile
                    return False
                index = (offset >> state.cluster_bits) & state.l2_mask
                entry = entry_obj.table[index]
                host = entry & L2E_OFFSET_MASK
                if (not host or host & cs_mask or entry & (QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO)
                        or (write and (not entry & QCOW_OFLAG_COPIED or index in entry_obj.inflight))
                        or (host >> state.cluster_bits >= state.refcounts.high_water
                            and not state.external)
                        or (state.extended  # only clusters whose subclusters are all allocated
                            and entry_obj.table.bitmaps[index] != L2_BITMAP_ALL_ALLOC)):
                    if (nowait and not write and not state.extended
                            and not entry & QCOW_OFLAG_COMPRESSED and not host & cs_mask
                            and ((entry & QCOW_OFLAG_ZERO and state.has_zero_flag
                                  and (not host or (not state.external and host >> state.cluster_bits
                                                    < state.refcounts.high_water)))
                                 or (not entry and state.backing is None))):
                        # A zero cluster (whose host offset, if any, the ordinary path
                        # would not call corrupt), or unallocated with nothing below.
                        zeros = True
                    else:
                        return False  # (the general path reports a host offset past EOF)
                pins = state.pins
                if pins is not None and not zeros:
                    pin = (host >> state.cluster_bits, 1)
                    pins.append(pin)  # (no call since the line above: one step)
            if zeros:
                view[:] = bytes(length)
                return True
            host += offset & cs_mask
            if state.events is not None:
                state.events.fire("write_aio" if write else "read_aio")
            file = state.datafile
            if write:
                overlap = state.overlap
                if (overlap is not None and not state.external
                        and overlap.find(host, length) is not None):
                    if nowait:
                        return False  # (the ordinary path reports it)
                    state.check_data_write(host, length)
                if nowait:
                    done = _pwrite_nowait(file, view, host)  # (not "return call()" in a try)
                elif (file.faults is not None or file.log is not None
                        or file.sync_error is not None or file.first_write is not None
                        or file.direct is not None):
                    file.pwrite(host, view)  # the storage seam's full treatment
                else:
                    try:
                        written = os.pwrite(file.fd, view, host)
                    finally:
                        file.unsynced = True  # after the write: see HostFile.unsynced
                    if written < length:
                        file.pwrite(host + written, memoryview(view)[written:])
            elif nowait:  # (read_nowait) the page cache or nothing: no half-done read
                if file.faults is not None or file.direct is not None:
                    return False
                try:
                    if os.preadv(file.fd, [view], host, os.RWF_NOWAIT) < length:
                        return False
                except BlockingIOError:
                    return False
                except OSError as exc:  # (the ordinary read reports an error, in the future)
                    if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                        file.nowait_reads = False  # (tmpfs, FUSE: refused; never again)
                    return False
            elif (file.faults is not None or file.direct is not None
                  or os.preadv(file.fd, [view], host) < length):
                file.preadv([view], host)  # short read, faults injected, or direct I/O
        finally:
            if pin is not None:
                pins.remove(pin)
        return done

    def read_backing(self, offset: int, view: memoryview) -> None:
        """Read for an overlay: like readinto, but bytes past the end read as zeros."""
        inside = max(0, min(len(view), self.header.size - offset))
        if inside:
            with self._shared():
                read_locked(self.state, offset, view[:inside], None)
        if inside < len(view):
            view[inside:] = bytes(len(view) - inside)

    # Discard, zeroes, flush --------------------------------------------------
    def discard(self, offset: int, length: int, *, cancel: CancelToken | None = None) -> None:
        """Discard whole clusters inside the range (partial clusters are left as they are).

        A discarded cluster reads as zeros afterwards.  A v2 image cannot mark clusters
        as zero, so there a discard unallocates the clusters when it has no backing
        file, and does nothing when it has one (which would show through), as QEMU.
        """
        state = self.state
        state.check_range(offset, length)
        if state.bitmaps is not None and not state.readonly:
            state.bitmaps.mark(offset, length)
        if state.has_zero_flag or state.backing is None:
            self._shared(True, cancel).run(zero_clusters, state, offset, length, True, cancel)
        else:
            self._shared(write=True).run(_nothing)  # (the checks only)

    def write_zeroes(self, offset: int, length: int, *, cancel: CancelToken | None = None) -> None:
        """Make the range read as zeros (v3: zero clusters; partial clusters are written)."""
        state = self.state
        state.check_range(offset, length)
        if state.bitmaps is not None and not state.readonly:
            state.bitmaps.mark(offset, length)
        self._shared(True, cancel).run(write_zeroes_locked, state, offset, length, cancel)

    def flush(self) -> None:
        """Write all cached metadata back in the safe order and sync the file."""
        self._shared().run(flush_shared, self.state)

    # Exclusive operations ----------------------------------------------------
    def _exclusive_change(self, func: Callable[..., Any], *args: Any) -> Any:
        """``func(*args)`` with the image held exclusively, open and writable; the
        overlap map re-attached and rebuilt after (the structures may have moved)."""
        state = self.state
        if state.readonly:
            raise state.readonly_error()
        with self.exclusive():
            if state.closed:
                raise ClosedImage("I/O operation on a closed image")
            try:
                return func(*args)
            finally:
                state.attach_overlap()  # the structures may have moved or been replaced
                state.metadata_moved(None)

    def resize(self, new_size: int, *, shrink: bool = False,
               preallocation: str = "off") -> None:
        """Change the virtual size (exclusive).

        Growing grows the L1 table copy-on-write, then preallocates the new area
        when *preallocation* is ``metadata``, ``falloc`` or ``full`` (as ``qemu-img
        resize --preallocation``).  Shrinking (``shrink=True``, as ``qemu-img resize
        --shrink``) drops the active image's references to every cluster past the new
        end (snapshots keep theirs), then truncates the file after its last cluster
        in use.
        """
        check_resize(new_size, preallocation)
        state = self.state
        if state.readonly:
            raise state.readonly_error()
        with self.exclusive():
            if state.closed:
                raise ClosedImage("I/O operation on a closed image")
            if new_size != self.size:
                self._drop_bitmaps()  # (they are not resized: QEMU ignores them then)
            resize_held(state, new_size, shrink=shrink, preallocation=preallocation,
                        hide_backing=True)

    def snapshots(self) -> list[Snapshot]:
        """The internal snapshots, oldest first (``snapshot_table`` is the live list)."""
        return list(self.state.snapshot_table)

    def create_snapshot(self, name: str) -> Snapshot:
        """Take an internal snapshot named *name* (exclusive: in-flight requests drain)."""
        state = self.state
        if state.external:  # (qemu-img's words; data files have no refcounts to share)
            raise UnsupportedFeature("-95 (Operation not supported): an image with an "
                                     "external data file has no internal snapshots")
        return self._exclusive_change(refcounts_in_flux, state, snapshot.create, state, name)

    def apply_snapshot(self, name: str) -> None:
        """Revert the image to the snapshot with id or name *name* (exclusive)."""
        state = self.state
        if state.bitmaps is not None and not state.readonly:
            state.bitmaps.mark(0, self.size)  # (every granule may change)
        self._exclusive_change(refcounts_in_flux, state, snapshot.apply, state, name)

    def delete_snapshot(self, name: str) -> None:
        """Delete the snapshot with id or name *name* (exclusive)."""
        state = self.state
        self._exclusive_change(refcounts_in_flux, state, snapshot.delete, state, name)

    def amend(self, *, compat: str | None = None, lazy_refcounts: bool | None = None,
              refcount_bits: int | None = None) -> None:
        """Change format options like ``qemu-img amend`` (exclusive); see :mod:`qcow2rw.amend`."""
        if compat in ("0.10", "v2"):  # a v2 header has no autoclear bits
            self._exclusive_change(self._drop_bitmaps)
        self._exclusive_change(partial(amend_image, self.state, compat=compat,
                                       lazy_refcounts=lazy_refcounts,
                                       refcount_bits=refcount_bits))

    def check(self, repair: str | None = None) -> CheckResult:
        """Check the image like ``qemu-img check`` (``repair``: None, "leaks" or "all").

        Returns a :class:`qcow2rw.check.CheckResult` with qemu-img's figures.  Takes
        the image exclusively: in-flight requests drain first.
        """
        if repair not in (None, "leaks", "all"):
            raise ValueError("repair must be None, 'leaks' or 'all'")
        state = self.state
        if repair and state.readonly:
            raise state.readonly_error()
        with self.exclusive():
            if state.closed:
                raise ClosedImage("I/O operation on a closed image")
            result: CheckResult = self._without_overlap_check(check_image, state, repair)
            return result

    # Map and info ----------------------------------------------------------
    def block_status(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """Extents of this layer only: (kind, guest, length, host offset or L2 entry)."""
        state = self.state
        state.check_range(offset, length)
        return self._shared().run(block_status, state, offset, length)

    def classify(self, entry: int) -> int:
        """The kind of cluster an L2 entry describes (see :meth:`ImageState.classify`)."""
        return self.state.classify(entry)

    def count_used_clusters(self, end_cluster: int, limit: int) -> int:
        """How many of the first *end_cluster* host clusters are in use, counting up to *limit*."""
        state = self.state
        with self._shared(), state.alloc_lock:
            count = 0
            for cluster in range(end_cluster):
                if count >= limit:
                    break
                if state.refcounts.get(cluster):
                    count += 1
            return count

    def map(self) -> list[dict[str, Any]]:
        """The allocation map of the whole chain, as ``qemu-img map --output=json``."""
        return chain_map(self)

    def info(self) -> dict[str, Any]:
        """Image information with the keys of ``qemu-img info --output=json``."""
        if self.closed:  # (the descriptor number may belong to another file by now)
            raise ClosedImage("I/O operation on a closed image")
        return _info(self.state, self.encryption)

    # Close -----------------------------------------------------------------
    def close(self, timeout: float | None = None) -> None:
        """Drain requests (exclusive), flush everything, clear the dirty bit, close the files.

        The drain waits at most *timeout* seconds (:class:`~qcow2rw.locks.LockTimeout`),
        or with no timeout the image lock's watchdog (30 s by default), then raises
        :class:`~qcow2rw.locks.DrainTimeout` naming what is still held.  Either way the
        image stays open, untouched, and close() may be called again.  A close that an
        exception (an interrupt) cut short leaves the image not held; calling close()
        again finishes it.
        """
        state = self.state
        if state.closed:
            # (All idempotent: they finish a close that an interrupt cut short.)
            state.file.close()
            if state.datafile is not None:
                state.datafile.close()
            if state.backing is not None:
                state.backing.close()
            return
        # run(), not "with": no interrupt (a Ctrl-C during shutdown) can leave the image
        # held exclusively (see ExclusiveHold).
        self.exclusive(timeout).run(_close_held, state)

    def aio(self, workers: int = 8, inline: str = "auto") -> AioImage:
        """A :class:`qcow2rw.aio.AioImage` thread pool over this image (it stays ours);
        *inline* as :class:`~qcow2rw.aio.AioImage` takes it."""
        from .aio import AioImage  # (the pool imports the Image: DESIGN §2 asks for this)
        return AioImage(self, workers=workers, inline=inline)

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("ro" if self.readonly else "rw")
        return f"<qcow2rw.Image {self.path!r} {self.header.size} bytes {state} {self.lock_mode}>"


#: The methods that read or write guest data (or change the image beyond its metadata
#: checks): an image opened for metadata only refuses them.
_DATA_METHODS = ("_request", "read", "readinto", "write", "write_compressed", "read_backing",
                 "discard", "write_zeroes", "resize", "create_snapshot", "apply_snapshot",
                 "delete_snapshot", "amend")


def _nothing() -> None:
    """What a discard that cannot change anything runs (after the lock's checks)."""


def _info(state: ImageState, encryption: dict[str, Any] | None = None) -> dict[str, Any]:
    """:meth:`Image.info` of an open image (*encryption*: its ``encrypt`` block)."""
    hdr = state.header
    data: dict[str, Any]
    if hdr.version >= 3:
        data = {"compat": "1.1", "compression-type": COMPRESSION_NAMES[hdr.compression_type],
                "lazy-refcounts": hdr.lazy_refcounts}
        bitmaps = bitmap_info(state.file, hdr)
        if bitmaps:
            data["bitmaps"] = bitmaps
        data["refcount-bits"] = hdr.refcount_bits
        if hdr.data_file is not None:  # (the header's name: the file is never opened)
            data["data-file"] = hdr.data_file
        if state.external:
            data["data-file-raw"] = bool(hdr.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)
        data.update({"corrupt": hdr.corrupt, "extended-l2": hdr.extended_l2})
    else:
        data = {"compat": "0.10", "compression-type": "zlib", "refcount-bits": hdr.refcount_bits}
    if encryption is not None:
        data["encrypt"] = encryption
    out: dict[str, Any] = {
        "virtual-size": hdr.size, "filename": state.path, "cluster-size": state.cluster_size,
        "format": "qcow2", "actual-size": state.file.allocated_bytes(),
        "format-specific": {"type": "qcow2", "data": data},
        "dirty-flag": bool(hdr.incompatible_features & INCOMPAT_DIRTY),
    }
    if hdr.backing_file:
        out["backing-filename"] = hdr.backing_file
        out["full-backing-filename"] = resolve_name(state.path, hdr.backing_file)
        if hdr.backing_format:
            out["backing-filename-format"] = hdr.backing_format
    if state.snapshot_table:
        out["snapshots"] = [s.info() for s in state.snapshot_table]
    if hdr.crypt_method:
        out["encrypted"] = True
    return out


def _close_held(state: ImageState) -> None:
    """Flush everything, clear the dirty bit, close the files.  Caller holds: exclusive."""
    if state.closed:
        return
    try:
        if not state.readonly:
            if state.bitmaps is not None and not state.needs_repair:
                state.bitmaps.store()
            flush_everything(state)
            if state.header.incompatible_features & INCOMPAT_DIRTY and not state.needs_repair:
                state.write_incompatible(state.header.incompatible_features & ~INCOMPAT_DIRTY)
    finally:
        state.closed = True
        state.file.close()
        if state.datafile is not None:
            state.datafile.close()
        if state.backing is not None:
            state.backing.close()


def _read_first_cluster(file: HostFile) -> bytes:
    buf = file.pread(0, 65536)
    if len(buf) >= 24:
        cluster_bits = int.from_bytes(buf[20:24], "big")
        if 16 < cluster_bits <= 21 and len(buf) == 65536:
            buf = file.pread(0, 1 << cluster_bits)
    return buf


def _refuse_tables_past_end(header: Header, file_size: int) -> None:
    """For a read-write open, stricter than QEMU (which reads zeros there): an active
    L1 table or a refcount table that starts at or past the end of the file makes the
    image unusable for writing (every refcount would read 0, so allocations would land
    on metadata).  A read-only open reads zeros there, as QEMU does."""
    if header.l1_size and header.l1_table_offset >= file_size:
        raise FormatError("Active L1 table lies beyond the end of the file")
    if header.refcount_table_offset >= file_size:
        raise FormatError("Reference count table lies beyond the end of the file")


def _pwrite_nowait(file: HostFile, view: Any, host: int) -> bool:
    """``pwritev(RWF_NOWAIT)`` of all of *view* at *host*: True if it was written.

    False, with nothing written, if the page cache could not take it at once
    (``EAGAIN``), if the file system refuses such writes (``EOPNOTSUPP``, or ``EINVAL``
    from a kernel that does not know the flag for writes: remembered in
    ``file.nowait_writes``, so it is tried once per open), or on any other error (the
    ordinary write then meets it and reports it in the request's future).

    A short write (a page of the rest was not in the page cache, or locked: XFS stops
    there) has changed the cluster already: the request is under way and cannot go back
    to the queue, where it could be cancelled or a snapshot taken before the rest
    lands, leaving the cluster torn.  So the rest is written here with an ordinary
    write, still under the caller's locks: the one case where an inline write waits,
    for at most one cluster's pages.  Its error, if any, is raised.
    """
    try:
        written = os.pwritev(file.fd, [view], host, os.RWF_NOWAIT)
    except BlockingIOError:
        file.nowait_writes = True
        return False
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            file.nowait_writes = False
        return False
    finally:
        file.unsynced = True  # (after the write: see HostFile.unsynced)
    file.nowait_writes = True
    if not written:
        return False
    if written < len(view):
        file.pwrite(host + written, memoryview(view)[written:])
    return True


def open_image(path: str | os.PathLike[str], *, readonly: bool = False, backing: bool = True,
               lock_mode: str = "fine", cache_size: int | None = None, force_share: bool = False,
               chain: tuple[str, ...] = (), lock: bool = True,
               overlap_check: bool | str = True, check_mode: bool = False,
               metadata_only: bool = False, cache: str = "writeback",
               data_file: str | os.PathLike[str] | None = None,
               trust_data_file: bool = False) -> Image:
    """Open a qcow2 image (see :func:`qcow2rw.open`).

    *overlap_check*: QEMU's ``overlap-check`` (True or "cached", "constant", "all",
    False or "none"); see :mod:`qcow2rw.overlap`.  *check_mode* opens the image the
    way ``qemu-img check`` does (QEMU's ``BDRV_O_CHECK``): the header is parsed
    leniently (an empty refcount table and a bad snapshot-table pointer are left for
    the check to report), a snapshot table that cannot be read does not refuse the
    open, and a read-write open accepts the corrupt bit, keeps the autoclear bits and
    does not repair a dirty image (the check reports and repairs all that).

    *metadata_only* is QEMU's ``BDRV_O_NO_IO``: the image's metadata is read (info,
    map, check, snapshots list) but no guest data: read, write, discard, zeroing,
    resize, snapshot changes and amend raise.  Encrypted images open only this way
    (:mod:`qcow2rw.crypto`); the backing chain is opened the same way.

    *cache*: ``"writeback"`` (flushes sync the file), QEMU's ``"unsafe"`` (flushes
    write the metadata back in the same order but never sync the file) or QEMU's
    ``"none"`` (the image file and the data file opened with ``O_DIRECT``, bypassing
    the page cache; flushes sync as with ``"writeback"``; see :mod:`qcow2rw.directio`:
    :class:`~qcow2rw.directio.DirectIOUnsupported` where the file system refuses it).

    *data_file*, *trust_data_file*: an image with an external data file opens for data
    only with the file given (*data_file*) or the header's name trusted; else
    :class:`~qcow2rw.errors.DataFileRefused` (:mod:`qcow2rw.datafile`).  A metadata-only
    open never opens the data file unless it is given.
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, not {cache!r}")
    if lock_mode not in LOCK_MODES:
        raise ValueError(f"lock_mode must be one of {', '.join(LOCK_MODES)}, not {lock_mode!r}")
    mode_of(overlap_check)  # refuse a bad value before touching the file
    path = os.fspath(path)
    direct = cache == "none"
    file = HostFile(path, readonly=readonly, force_share=force_share, lock=lock, direct=direct)
    file.unsafe = cache == "unsafe"
    datafile: HostFile | None = None
    try:
        header = parse_header(_read_first_cluster(file), check_mode=check_mode)
        if not readonly and header.corrupt and not check_mode:
            raise CorruptImage("qcow2: Image is corrupt; cannot be opened read/write")
        if metadata_only and data_file is None and not trust_data_file:  # (not needed)
            if not has_data_file(header):
                choose_data_file(path, header, None, False)  # (QEMU's checks only)
        else:
            name = choose_data_file(path, header, data_file, trust_data_file)
            if name is not None:
                datafile = HostFile(name, readonly=readonly, force_share=force_share, lock=lock,
                                    direct=direct)
                datafile.unsafe = file.unsafe
        encryption = open_encryption(header, file.pread_exact, metadata_only=metadata_only)
        if not readonly and not check_mode:
            _refuse_tables_past_end(header, file.size())
        compress.require(header.compression_type)
        img = Image(file, header, path=path, readonly=readonly, cache_size=cache_size,
                    lock_mode=lock_mode, backing=backing, force_share=force_share,
                    chain=chain or (os.path.realpath(path),), check_mode=check_mode,
                    overlap_check=overlap_check, metadata_only=metadata_only,
                    encryption=encryption, data_file=datafile)
    except BaseException:
        file.close()
        if datafile is not None:
            datafile.close()
        raise
    if not readonly and not check_mode:
        try:
            img._prepare_for_writing()
        except BaseException:
            # Close without flushing and without clearing the dirty bit: a repair that
            # failed leaves the image as dirty as it was (QEMU keeps the bit too).
            img.readonly = True
            img.close()
            raise
    img.state.open = True
    return img


def open_for_check(path: str | os.PathLike[str], *, repair: bool,
                   force_share: bool = False) -> Image:
    """Open an image the way ``qemu-img check`` does (QEMU's BDRV_O_CHECK).

    Read-only without *repair* (``force_share`` as ``-U``).  With it, read-write but
    without what a normal read-write open does first: a dirty image is not repaired
    on open (the check reports and repairs it), the corrupt bit does not refuse the
    open, and autoclear bits are kept.  Either way a snapshot table that cannot be
    read does not refuse the open: the check reports it (and ``-r all`` repairs what
    QEMU repairs).
    """
    return open_image(path, readonly=not repair, force_share=force_share and not repair,
                      check_mode=True, metadata_only=True)
