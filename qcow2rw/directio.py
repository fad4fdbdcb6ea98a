"""Direct I/O (``cache="none"``, QEMU's ``-t none``): O_DIRECT with bounce buffers.

A file opened with ``O_DIRECT`` takes only reads and writes whose offset, length and
memory address are multiples of the file system's alignment; qcow2rw's requests have
any offset and length, and Python's buffers any address.  :class:`DirectIO` sits
under :class:`~qcow2rw.storage.HostFile` (``HostFile.direct``) and makes every
request aligned, as QEMU's block layer does for ``cache.direct=on``:

- the alignment is probed once per open (:func:`probe_alignment`, QEMU's
  ``raw_probe_alignment``);
- every byte goes through a page-aligned bounce buffer (always: a Python buffer's
  address is never known to be aligned), taken from a shared :class:`BufferPool`;
- a read is widened to the aligned range and copied out; bytes past the end of the
  file read as zeros, as in the buffered path;
- a write whose head or tail is not aligned reads the aligned blocks around it,
  patches them and writes them whole (read-modify-write), and such a write is
  *serialising* (:class:`WriteTracker`, QEMU's serialising requests): no other write
  whose aligned range overlaps it runs at the same time, so two unaligned writes into
  one block never lose each other's bytes.  A write past the end of the file extends
  the file to the end of its last aligned block (QEMU does the same); ``ftruncate``
  is not bound by O_DIRECT, so the engine's truncations to any size still work.

Everything else (the write log, fault injection, the first-write hook, the flush
rule) stays in :class:`~qcow2rw.storage.HostFile`, which sees the caller's logical
requests: the padding is invisible above this module.

``QCOW2RW_DIRECT_ALIGN`` (a power of two from 512 to 1 MiB) raises the alignment above
the probed one: for a device whose probe cannot tell (the probe reads the start of
the file, and a hole there reads at any alignment), and for the tests.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from .errors import BadSetting, DirectIOUnsupported

_T = TypeVar("_T")

__all__ = ["BufferPool", "Claim", "DirectIO", "DirectIOUnsupported", "WriteTracker", "POOL",
           "open_direct", "probe_alignment"]

#: The read sizes the probe tries, smallest first (QEMU's ``raw_probe_alignment``).  A
#: 1-byte read that works tells nothing (a file system without alignment rules, a
#: hole, an empty file): the alignment is then :data:`DEFAULT_ALIGN`, as QEMU's.
PROBE_SIZES = (1, 512, 1024, 2048, 4096)
#: The alignment when the probe cannot decide.
DEFAULT_ALIGN = 4096
#: The most bytes one system call moves; bigger requests go in chunks of this size.
CHUNK = 1 << 20
#: The bounce buffers' size classes, and how many free buffers each keeps for reuse
#: (about 5.3 MiB kept at most, for every direct file of the process together).
SIZE_CLASSES = ((4096, 64), (65536, 16), (CHUNK, 4))
#: Buffers up to this size are also kept per thread (:class:`BufferPool`).
THREAD_CACHED = 65536
#: The longest a writer waiting for an overlapping write sleeps before it looks again.
_SLICE = 0.05


def open_direct(path: str, flags: int, mode: int = 0o644) -> int:
    """``os.open(path, flags | O_DIRECT)``; :class:`DirectIOUnsupported` when the file
    opens without O_DIRECT but not with it (EINVAL), as QEMU's ``qemu_open`` tells."""
    try:
        return os.open(path, flags | os.O_DIRECT, mode)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        try:
            fd = os.open(path, flags, mode)
        except OSError:
            raise exc from None
        os.close(fd)
        raise DirectIOUnsupported(f"Could not open '{path}': filesystem does not support "
                                  "O_DIRECT") from exc


def probe_alignment(fd: int) -> int:
    """The request alignment of the O_DIRECT descriptor *fd*: reads of increasing
    sizes at offset 0 into a page-aligned buffer; EINVAL means too small.  A 1-byte
    read that works, or an error other than EINVAL: 4096.  0 when every size up to
    4096 is refused (QEMU then refuses the open: :class:`DirectIO` does)."""
    buf = mmap.mmap(-1, max(PROBE_SIZES))
    view = memoryview(buf)
    try:
        for size in PROBE_SIZES:
            try:
                os.preadv(fd, [view[:size]], 0)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    continue  # too small
                return DEFAULT_ALIGN  # (QEMU counts it as aligned: nothing to learn)
            return size if size > 1 else DEFAULT_ALIGN
        return 0
    finally:
        view.release()
        buf.close()


def forced_alignment() -> int:
    """``QCOW2RW_DIRECT_ALIGN`` (0 when unset); a bad value raises :class:`BadSetting`
    (a ValueError)."""
    value = os.environ.get("QCOW2RW_DIRECT_ALIGN", "")
    if not value:
        return 0
    try:
        align = int(value, 0)
    except ValueError:
        align = -1
    if align < 512 or align > CHUNK or align & (align - 1):
        raise BadSetting(f"QCOW2RW_DIRECT_ALIGN must be a power of two from 512 to {CHUNK}, "
                         f"not {value!r}")
    return align


class BufferPool:
    """Page-aligned bounce buffers (anonymous ``mmap``), reused through a free list per
    size class.  :meth:`get` hands out a buffer of the smallest class that holds the
    request (at most :data:`CHUNK` bytes); :meth:`put` gives it back, kept for reuse
    while its class has fewer than its limit of free buffers, else dropped (unmapped
    once unreferenced).  So the memory kept is bounded, and the memory in use is one
    buffer per request in flight.

    In front of the shared free lists, each thread keeps one buffer of each class up to
    :data:`THREAD_CACHED` bytes for itself (``_mine``, a ``threading.local``: no lock):
    a buffer that stays with one thread stays warm in that CPU's caches and TLB, and
    measured 25 % more O_DIRECT 4 KiB reads per second from 8 threads than buffers
    passed around through the shared lists.  A thread's buffers go when it ends.

    ``_lock`` (a leaf) guards ``_free``.  A buffer's contents are whatever its last
    user left: callers fill every byte they write out.
    """

    def __init__(self, classes: Sequence[tuple[int, int]] = SIZE_CLASSES) -> None:
        self.classes = tuple(size for size, _ in classes)
        self._limits = {size: limit for size, limit in classes}
        self._free: dict[int, list[mmap.mmap]] = {size: [] for size in self.classes}
        self._lock = threading.Lock()
        self._mine = threading.local()  # .bufs: {size: buffer} of the calling thread

    def get(self, length: int) -> mmap.mmap:
        """A buffer of at least *length* bytes (``length <= CHUNK``)."""
        for size in self.classes:
            if size >= length:
                break
        else:
            raise ValueError(f"a bounce buffer holds at most {self.classes[-1]} bytes")
        mine = getattr(self._mine, "bufs", None)
        if mine:
            buf: mmap.mmap | None = mine.pop(size, None)
            if buf is not None:
                return buf
        free = self._free[size]
        with self._lock:
            if free:
                buf = free.pop()
                return buf
        return mmap.mmap(-1, size)

    def put(self, buf: mmap.mmap) -> None:
        """Give *buf* back (kept for reuse, or dropped when its class is full)."""
        size = len(buf)
        free = self._free.get(size)
        if free is None:
            return
        if size <= THREAD_CACHED:
            mine = getattr(self._mine, "bufs", None)
            if mine is None:
                mine = self._mine.bufs = {}
            if size not in mine:
                mine[size] = buf
                return
        with self._lock:
            if len(free) < self._limits[size]:
                free.append(buf)

    def kept(self) -> int:
        """Bytes of free buffers kept for reuse."""
        with self._lock:
            return sum(size * len(free) for size, free in self._free.items())


#: The pool every direct file of the process shares.
POOL = BufferPool()


class Claim:
    """One write in flight on a direct file: the aligned range ``[start, end)`` it
    touches, and whether it is *serialising* (it reads and rewrites blocks around its
    bytes, or otherwise needs those blocks to itself)."""

    __slots__ = ("start", "end", "serialising")

    def __init__(self, start: int, end: int, serialising: bool) -> None:
        self.start = start
        self.end = end
        self.serialising = serialising

    def overlaps(self, other: Claim) -> bool:
        return self.start < other.end and other.start < self.end

    def __repr__(self) -> str:
        kind = "serialising" if self.serialising else "plain"
        return f"<Claim [{self.start:#x}, {self.end:#x}) {kind}>"


class WriteTracker:
    """The writes in flight on one direct file, and QEMU's rule for serialising
    requests: a write waits while an in-flight write whose aligned range overlaps its
    own exists, when either of the two is serialising.  Plain (aligned) writes never
    wait for each other, as in the buffered path.  A plain write also queues behind an
    overlapping serialising write that is waiting (``_queued``), as new requests wait
    behind serialising ones in QEMU: else a stream of aligned writes into one block
    could keep a read-modify-write waiting for ever.  A queued write waits only for
    writes in flight, never for other queued ones, so no wait here is circular.

    ``_lock`` (a C lock; ``_cond`` waits on it) guards ``_plain`` and ``_serialising``
    (the in-flight claims of each kind), ``_queued`` (the serialising claims waiting
    in :meth:`begin`) and ``_waiting`` (how many writers wait in :meth:`begin`).  A claim is in flight from the step that appends it to its list to
    the step that removes it.  While a thread's claim is in flight it takes no lock but
    the buffer pool's (a leaf) and does only its own I/O, and a thread has at most one
    claim: so the waits here end, and no lock of the engine's lock order is ever
    waited for from here (a thread may hold any of them while it waits here).

    Interrupt safety (qcow2rw.locks' rules): the caller makes the :class:`Claim`, then
    ``try: begin(claim) ... finally: end(claim)``; :meth:`begin` records the claim in one
    step (a list append) under ``with`` on the C lock; :meth:`end` is state-based and
    idempotent (it removes the claim if it is there) and is called again if an
    interrupt cut it short; waits are slices of 50 ms, so a wake-up lost to an
    interrupted :meth:`end` costs at most that.  ``Condition.wait`` takes the lock
    back in a ``finally``, so an interrupt during the wait itself (where a waiter
    spends its time) leaves the lock held as ``with`` expects; like the rest of
    qcow2rw.locks, the guarantee is for one interruption at a time.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._plain: list[Claim] = []
        self._serialising: list[Claim] = []
        self._queued: list[Claim] = []
        self._waiting = 0

    def _conflict(self, claim: Claim) -> Claim | None:
        """A claim *claim* must wait for, if it overlaps it: a serialising one in flight;
        when *claim* is plain, a queued one; when *claim* is serialising, a plain one in
        flight or a serialising one queued before it (``_queued`` is in arrival order:
        a claim not queued yet comes after all of them).  So waits follow arrival
        order and none is circular.  Caller holds: ``_lock``."""
        for other in self._serialising:
            if other.overlaps(claim):
                return other
        if claim.serialising:
            for other in self._plain:
                if other.overlaps(claim):
                    return other
            for other in self._queued:
                if other is claim:
                    break
                if other.overlaps(claim):
                    return other
        else:
            for other in self._queued:
                if other.overlaps(claim):
                    return other
        return None

    def _unqueue(self, claim: Claim) -> None:
        """Take *claim* out of the queue if it is there (identity: a Claim has no
        ``__eq__``) and wake the writers that may have waited behind it.  Caller
        holds: ``_lock``."""
        if claim in self._queued:
            self._queued.remove(claim)
            self._cond.notify_all()

    def begin(self, claim: Claim) -> None:
        """Wait until *claim* conflicts with no write in flight (nor, for a plain write,
        with a queued serialising one), then put it in flight."""
        with self._lock:
            if ((self._serialising or self._queued or claim.serialising)
                    and self._conflict(claim) is not None):
                self._waiting += 1
                try:
                    if claim.serialising:
                        self._queued.append(claim)  # (end() takes it out if this is cut)
                    while self._conflict(claim) is not None:
                        self._cond.wait(_SLICE)
                finally:
                    self._unqueue(claim)
                    self._waiting -= 1
            (self._serialising if claim.serialising else self._plain).append(claim)

    def end(self, claim: Claim) -> None:
        """Take *claim* out of flight (nothing if it is not in flight; out of the queue
        too, where an interrupt in :meth:`begin` left it); wake the waiters."""
        with self._lock:
            self._unqueue(claim)
            claims = self._serialising if claim.serialising else self._plain
            for index, other in enumerate(claims):
                if other is claim:
                    del claims[index]
                    if self._waiting:
                        self._cond.notify_all()
                    break

    def in_flight(self) -> list[Claim]:
        """The claims in flight now (a copy: for tests and diagnostics)."""
        with self._lock:
            return self._serialising + self._plain


def _views(buffers: Sequence[bytes | bytearray | memoryview]) -> list[memoryview]:
    """Byte-format one-dimensional views of *buffers*."""
    out = []
    for buf in buffers:
        view = memoryview(buf)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        out.append(view)
    return out


def _copy(views: list[memoryview], pos: int, flat: memoryview, into_views: bool) -> None:
    """Copy between *flat* and the bytes ``[pos, pos + len(flat))`` of the
    concatenation of *views*: into the views (*into_views*) or out of them."""
    want, done, base = len(flat), 0, 0
    for view in views:
        n = len(view)
        if base + n > pos + done and done < want:
            lo = pos + done - base
            take = min(n - lo, want - done)
            if into_views:
                view[lo:lo + take] = flat[done:done + take]
            else:
                flat[done:done + take] = view[lo:lo + take]
            done += take
        base += n


def _gather(views: list[memoryview], pos: int, dest: memoryview) -> None:
    """Copy the bytes ``[pos, pos + len(dest))`` of the concatenation of *views* into *dest*."""
    if len(views) == 1:
        dest[:] = views[0][pos:pos + len(dest)]
    else:
        _copy(views, pos, dest, False)


def _scatter(views: list[memoryview], pos: int, src: memoryview) -> None:
    """Copy *src* into the bytes ``[pos, pos + len(src))`` of the concatenation of *views*."""
    if len(views) == 1:
        views[0][pos:pos + len(src)] = src
    else:
        _copy(views, pos, src, True)


class DirectIO:
    """Aligned positional I/O on an O_DIRECT descriptor (see the module docstring).

    Thread-safe: reads need no lock; writes are ordered by ``tracker`` only where their
    aligned ranges overlap and one of them pads.  ``align`` is fixed at open.
    """

    def __init__(self, fd: int, align: int | None = None, pool: BufferPool = POOL,
                 name: str = "") -> None:
        """*name*: the file's path, for the message when no alignment works."""
        self.fd = fd
        if align is None:
            align = max(probe_alignment(fd), forced_alignment())
            if not align:  # (QEMU's words; the hint is its "Try cache.direct=off")
                raise DirectIOUnsupported(f"Could not open '{name}': Could not find working "
                                          "O_DIRECT alignment (try a cache mode other than "
                                          "none)")
        if align < 1 or align & (align - 1) or align > CHUNK:
            raise ValueError(f"bad alignment {align}")
        self.align = align
        self._mask = align - 1
        self.pool = pool
        self.tracker = WriteTracker()

    def span(self, offset: int, length: int) -> tuple[int, int]:
        """The aligned range ``[start, end)`` around ``[offset, offset + length)``."""
        mask = self._mask
        return offset & ~mask, (offset + length + mask) & ~mask

    # Reading --------------------------------------------------------------------------
    def _read_full(self, dest: memoryview, pos: int) -> int:
        """Fill the aligned *dest* from the aligned *pos*; the bytes read (fewer only at
        the end of the file)."""
        got, want = 0, len(dest)
        while got < want:
            n = os.preadv(self.fd, [dest[got:]], pos + got)
            if n <= 0:
                break
            got += n
            if got & self._mask:  # (ended inside a block: the end of the file)
                break
        return got

    def _bounce_read(self, offset: int, length: int, take: Callable[[memoryview], _T]) -> _T:
        """Read the aligned range around ``[offset, offset + length)`` (at most
        :data:`CHUNK` bytes) into one bounce buffer and return ``take(part)``, *part*
        being the requested bytes the file has (short only at its end)."""
        start, end = self.span(offset, length)
        n = end - start
        buf = self.pool.get(n)
        try:
            mem = memoryview(buf)
            got = self._read_full(mem[:n], start)
            head = offset - start
            return take(mem[head:head + max(0, min(got - head, length))])
        finally:
            self.pool.put(buf)

    def readinto(self, buffers: Sequence[bytes | bytearray | memoryview], offset: int) -> int:
        """Fill *buffers* (contiguous from *offset*) as far as the file goes; the bytes
        filled (fewer than asked only at the end of the file; the rest is untouched)."""
        if len(buffers) == 1:  # the common case, short: one buffer, one bounce
            dest = buffers[0]
            if type(dest) is not bytearray:
                dest = memoryview(dest).cast("B")
            want = len(dest)
            start, end = self.span(offset, want)
            if 0 < end - start <= THREAD_CACHED:

                def fill(part: memoryview) -> int:
                    if part:  # (nothing past the end of the file: a read-only buffer too)
                        dest[:len(part)] = part
                    return len(part)

                return self._bounce_read(offset, want, fill)
        views = _views(buffers)
        want = sum(len(v) for v in views)
        if not want:
            return 0
        start, end = self.span(offset, want)
        stop = offset + want
        done = 0
        pos = start
        while pos < end:
            n = min(end - pos, CHUNK)
            buf = self.pool.get(n)
            try:
                mem = memoryview(buf)
                got = self._read_full(mem[:n], pos)
                lo = max(pos, offset)
                hi = min(pos + got, stop)
                if hi > lo:
                    _scatter(views, lo - offset, mem[lo - pos:hi - pos])
                    done = hi - offset
            finally:
                self.pool.put(buf)
            if got < n:
                break
            pos += n
        return done

    def pread(self, offset: int, length: int) -> bytes:
        """Up to *length* bytes at *offset* (short at the end of the file)."""
        if length <= 0:
            return b""
        start, end = self.span(offset, length)
        if end - start <= CHUNK:  # one read: copy straight out of the bounce buffer
            return self._bounce_read(offset, length, bytes)
        out = bytearray(length)
        done = self.readinto([out], offset)
        del out[done:]
        return bytes(out)

    # Writing --------------------------------------------------------------------------
    def _fill(self, dest: memoryview, pos: int) -> None:
        """Read the aligned block(s) at *pos* into *dest*, zeros past the end of the file."""
        got = self._read_full(dest, pos)
        if got < len(dest):
            dest[got:] = bytes(len(dest) - got)

    def _write_full(self, src: memoryview, pos: int) -> None:
        """Write all of the aligned *src* at the aligned *pos*."""
        done, want = 0, len(src)
        while done < want:
            n = os.pwrite(self.fd, src[done:], pos + done)
            if n <= 0:
                raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} (a direct write at "
                                         f"{pos + done} made no progress)")
            done += n
            if done < want and done & self._mask:
                raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} (a direct write at "
                                         f"{pos} stopped inside a block)")

    def pwritev(self, buffers: Sequence[bytes | bytearray | memoryview], offset: int) -> None:
        """Write all of *buffers* contiguously from *offset*: aligned blocks through a
        bounce buffer, an unaligned head or tail by read-modify-write of its block,
        serialised against every overlapping write (see :class:`WriteTracker`)."""
        views = _views(buffers)
        length = sum(len(v) for v in views)
        if not length:
            return
        start, end = self.span(offset, length)
        claim = Claim(start, end, start != offset or end != offset + length)
        tracker = self.tracker
        try:
            tracker.begin(claim)
            self._write_claimed(views, offset, length, start, end)
        finally:
            try:
                tracker.end(claim)
            except BaseException:  # an interrupt cut it short: once more (idempotent)
                tracker.end(claim)
                raise

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of *data* at *offset* (see :meth:`pwritev`)."""
        self.pwritev([data], offset)

    def _write_claimed(self, views: list[memoryview], offset: int, length: int,
                       start: int, end: int) -> None:
        """The write itself, chunk by chunk.  Caller holds: a claim on [start, end)."""
        align = self.align
        stop = offset + length
        pos = start
        while pos < end:
            n = min(end - pos, CHUNK)
            buf = self.pool.get(n)
            try:
                mem = memoryview(buf)
                chunk = mem[:n]
                lo = max(pos, offset)
                hi = min(pos + n, stop)
                head = lo > pos
                if head:  # the first block keeps the file's bytes before ours
                    self._fill(chunk[:align], pos)
                if hi < pos + n and not (head and n == align):  # the last block, after ours
                    self._fill(chunk[n - align:], pos + n - align)
                _gather(views, lo - offset, chunk[lo - pos:hi - pos])
                self._write_full(chunk, pos)
            finally:
                self.pool.put(buf)
            pos += n

    def punch_claim(self, offset: int, length: int) -> Claim:
        """A serialising claim over the aligned range of ``[offset, offset + length)``, for
        a hole punched there (the kernel rewrites partial blocks itself): the caller
        runs ``try: tracker.begin(c) ... finally: tracker.end(c)``."""
        start, end = self.span(offset, length)
        return Claim(start, end, True)
