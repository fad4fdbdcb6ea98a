"""The host file behind an image: positional I/O, flush, size and QEMU's image locks.

This is the one seam between qcow2rw and the operating system: every byte read from
or written to an image file goes through :class:`HostFile`, which is where fault
injection and the write log plug in.  Positional I/O (``os.pread``/``os.pwrite``)
needs no lock: the kernel keeps concurrent calls on one descriptor apart.  A file
opened for direct I/O (``cache="none"``) does its I/O through
:class:`~qcow2rw.directio.DirectIO` (``HostFile.direct``), below the log and the
fault injection, which see the caller's requests unchanged.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
from collections.abc import Callable, Sequence

from .directio import DirectIO, open_direct
from .errors import ImageLocked, Qcow2Error, SyncFailed
from .locks import Gate

# QEMU's permission bits (block/file-posix.c): byte 100+b = "I hold permission b",
# byte 200+b = "I do not share permission b".  All locks are shared (F_RDLCK) OFD
# locks; a conflict is found by asking F_OFD_GETLK for an exclusive lock.
PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
PERM_NAMES = {0: "consistent read", 1: "write", 2: "write unchanged", 3: "resize"}
LOCK_BASE_PERM = 100
LOCK_BASE_SHARED = 200
_FLOCK = "hhqqi4x"


FAULT_OPS = ("pread", "pwrite", "fsync", "truncate")


class FaultInjector:
    """Make the *nth* call (1-based) of one kind of host I/O fail, like a dying disk.

    *op* is ``pread`` (pread, preadv), ``pwrite`` (pwrite, pwritev), ``fsync`` or
    ``truncate`` (truncate, allocate).  The failing call raises ``OSError(err)``
    before it touches the file; with ``persistent`` every later call of that kind
    fails too (a disk that is gone), else only the nth (a transient error).
    Install it as ``HostFile.faults``; a file without one pays one attribute test.
    ``_lock`` guards ``calls`` and ``fired`` (requests of many threads count here).
    """

    def __init__(self, op: str, nth: int, err: int = errno.EIO, *,
                 persistent: bool = False) -> None:
        if op not in FAULT_OPS:
            raise ValueError(f"unknown I/O kind {op!r}; known: {', '.join(FAULT_OPS)}")
        if nth < 1:
            raise ValueError("nth counts from 1")
        self.op = op
        self.nth = nth
        self.err = err
        self.persistent = persistent
        self.calls = {name: 0 for name in FAULT_OPS}
        self.fired = 0  # how many calls this injector failed
        self._lock = threading.Lock()

    def check(self, op: str) -> None:
        """Count one call of kind *op*; raise its error if it is the one to fail."""
        with self._lock:
            self.calls[op] += 1
            if op != self.op:
                return
            count = self.calls[op]
            if count < self.nth or (count > self.nth and not self.persistent):
                return
            self.fired += 1
        raise OSError(self.err, f"{os.strerror(self.err)} (injected: {op} #{count})")


class HostFile:
    """An open image file with positional I/O and QEMU-compatible locking.

    Thread-safe: ``os.pread``/``os.pwrite`` on one descriptor need no lock.

    THE FLUSH RULE (kept here for the file; :meth:`Image.flush` keeps it for the
    metadata on top): when :meth:`flush` returns, every write that completed before
    :meth:`flush` was called, on any thread, is durable.  Syncs are counted by
    generation: sync number *n* is the *n*-th ``fdatasync`` started; syncs run one at
    a time, so they end in order.  A write completed before sync *n* started is
    durable once ``synced >= n``.  ``unsynced`` is set after every write returns and
    cleared when a sync starts (under ``_sync_lock``), so while it is False every
    completed write is covered by the last sync started, which a flush then waits
    for; while it is True a flush needs a sync that starts after it was called.
    :meth:`sync_mark` / :meth:`sync_past` let a caller ask the same for one write of
    its own ("a sync that started after this write returned") without syncing for
    everybody else's writes.
    """

    def __init__(self, path: str, *, readonly: bool, lock: bool = True,
                 force_share: bool = False, create: bool = False, direct: bool = False) -> None:
        flags = os.O_RDONLY if readonly else os.O_RDWR
        if create:
            flags |= os.O_CREAT | os.O_TRUNC
        flags |= getattr(os, "O_CLOEXEC", 0)
        self.path = path
        self.readonly = readonly
        # (direct: DirectIOUnsupported when the file system refuses O_DIRECT)
        self.fd = open_direct(path, flags, 0o644) if direct else os.open(path, flags, 0o644)
        self.closed = False
        #: Direct I/O (O_DIRECT, QEMU's cache=none): every read and write goes through
        #: it, aligned and bounced (None: the page cache's buffered I/O).  Set here,
        #: once; the hot paths that bypass this class test it next to ``faults``.
        self.direct: DirectIO | None = None
        #: A write returned since the last sync started (set by writers after their
        #: write, cleared under ``_sync_lock`` when a sync starts).
        self.unsynced = False
        #: Guards ``syncs_started``, ``synced``, ``_sync_owner``, ``_sync_gate``,
        #: ``_sync_ok`` and the clearing of ``unsynced``.  A plain C lock, taken only by
        #: ``with`` (interrupt-safe: see qcow2rw.locks); never held across the
        #: ``fdatasync`` itself, nor around any other lock but the log's.
        self._sync_lock = threading.Lock()
        self.syncs_started = 0  # how many syncs have started (the last one's number)
        self.synced = 0  # the number of the last sync that finished and succeeded
        self._sync_owner: int | None = None  # the thread running a sync (one at a time)
        self._sync_gate: Gate | None = None  # opened when that sync ends
        self._sync_ok = False  # that sync's fdatasync returned
        #: Called at the event points ``flush_to_disk`` (a sync is about to start its
        #: fdatasync) and ``flush_to_disk_done`` (it returned); set by the image.
        self.fire: Callable[[str], None] | None = None
        #: Guards the order of the write log (``log``): an entry is appended under it.
        self._log_lock = threading.Lock()
        # The write log: when a list, every write and size change is appended to it
        # once it has returned, as ("write", offset, bytes), ("truncate", length,
        # b""), ("extend", length, b"") (posix_fallocate).  A sync appends
        # ("sync-start", number, b"") when it starts (after it cleared ``unsynced``)
        # and ("sync", number, b"") when it returned, before anybody can see it done
        # (or ("sync-failed", number, b"")).  So a write logged before a sync-start
        # returned before that fdatasync was called, and is durable once its "sync"
        # is logged; a write logged between the two may or may not be.  :meth:`note`
        # adds markers of the caller's own (acknowledged guest operations).
        self.log: list[tuple[str, int, bytes]] | None = None
        self.faults: FaultInjector | None = None  # fault injection (tests)
        # The error of a failed fsync: from then on every write and sync is refused.
        self.sync_error: OSError | None = None
        #: QEMU's cache=unsafe: syncs are counted and ordered as ever, but the
        #: fdatasync itself is skipped (nothing is durable before the kernel writes it
        #: back on its own): what ``qemu-img convert`` does by default.
        self.unsafe = False
        #: Does the file system take buffered ``pwritev(RWF_NOWAIT)``?  None until the
        #: first inline write tried it (:meth:`Image.write_nowait`), then what it found
        #: (ext4 and tmpfs refuse with EOPNOTSUPP, XFS takes them).
        self.nowait_writes: bool | None = None
        #: False once a ``preadv(RWF_NOWAIT)`` was refused (EOPNOTSUPP: tmpfs, FUSE and
        #: network file systems): inline reads of this open go to the pool from then on.
        self.nowait_reads: bool | None = None
        #: Run once, before the first write, truncate or allocate of this open (set by
        #: the image: clear the autoclear bits it does not maintain, and sync that).
        #: Cleared when it returned; an error leaves it armed and fails that write.
        self.first_write: Callable[[], None] | None = None
        #: Guards running ``first_write``: a writer that finds it armed waits here until
        #: it has run.  Re-entrant for the hook's own writes (``_first_write_owner``);
        #: a leaf lock (the hook's sync takes only ``_sync_lock`` inside it).
        self._first_write_lock = threading.RLock()
        self._first_write_owner: int | None = None
        try:
            if not os.path.isfile(path) and not create:
                raise Qcow2Error(f"'{path}' is not a regular file")
            if direct:
                self.direct = DirectIO(self.fd, name=path)  # (probes the alignment)
            if lock:
                self._take_image_locks(readonly=readonly, force_share=force_share)
        except BaseException:
            os.close(self.fd)
            raise

    # QEMU image locks -------------------------------------------------------
    def _lock_byte(self, cmd: int, kind: int, byte: int) -> bytes:
        arg = struct.pack(_FLOCK, kind, os.SEEK_SET, byte, 1, 0)
        return fcntl.fcntl(self.fd, cmd, arg)

    def _take_image_locks(self, *, readonly: bool, force_share: bool) -> None:
        """Lock QEMU's bytes like qemu-io does, then test for conflicting holders.

        Read-write: hold consistent-read, write and resize, share neither write nor
        resize (like ``qemu-io IMG``).  Read-only: hold consistent-read, share neither
        write nor resize (like ``qemu-io -r``).  ``force_share``: hold consistent-read
        only and share everything (like ``qemu-io -r -U``).
        """
        if force_share:
            if not readonly:
                raise Qcow2Error("force_share can only be used with read-only images")
            held, unshared = [PERM_CONSISTENT_READ], []
        elif readonly:
            held, unshared = [PERM_CONSISTENT_READ], [PERM_WRITE, PERM_RESIZE]
        else:
            held = [PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE]
            unshared = [PERM_WRITE, PERM_RESIZE]
        if not hasattr(fcntl, "F_OFD_SETLK"):
            return  # no OFD locks on this platform: QEMU would not lock either
        try:
            for perm in held:
                self._lock_byte(fcntl.F_OFD_SETLK, fcntl.F_RDLCK, LOCK_BASE_PERM + perm)
            for perm in unshared:
                self._lock_byte(fcntl.F_OFD_SETLK, fcntl.F_RDLCK, LOCK_BASE_SHARED + perm)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise ImageLocked(f"Failed to get shared lock on '{self.path}': "
                                  "is another process using the image?") from None
            raise
        for perm in held:  # does anybody refuse to share what we hold?
            self._test_conflict(LOCK_BASE_SHARED + perm, f'Failed to get "{PERM_NAMES[perm]}" lock')
        for perm in unshared:  # does anybody hold what we refuse to share?
            self._test_conflict(LOCK_BASE_PERM + perm,
                                f'Failed to get shared "{PERM_NAMES[perm]}" lock')

    def _test_conflict(self, byte: int, message: str) -> None:
        res = self._lock_byte(fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte)
        kind = struct.unpack(_FLOCK, res)[0]
        if kind != fcntl.F_UNLCK:
            raise ImageLocked(f"{message}: is another process using the image [{self.path}]?")

    # Positional I/O ---------------------------------------------------------
    def note(self, kind: str, value: int) -> None:
        """Append a marker of the caller's (e.g. "ack", guest op number) to the write log."""
        self._log_append(kind, value, b"")

    def _log_append(self, kind: str, value: int, data: bytes) -> None:
        """Append one entry to the write log, if it is on."""
        log = self.log
        if log is not None:
            with self._log_lock:
                log.append((kind, value, data))

    def _before_write(self, op: str) -> None:
        """What every modification checks first: the first-write hook, a failed sync,
        injected faults (*op*)."""
        if self.first_write is not None:
            self._run_first_write()
        self._refuse_writes()
        if self.faults is not None:
            self.faults.check(op)

    def before_first_write(self) -> None:
        """Run the first-write hook now if it is armed: for a caller about to write
        a copy of in-memory header fields the hook changes (the autoclear bits)."""
        if self.first_write is not None:
            self._run_first_write()

    def _run_first_write(self) -> None:
        with self._first_write_lock:
            hook = self.first_write
            if hook is None or self._first_write_owner is not None:
                return  # it has run, or this is the hook's own write
            self._first_write_owner = threading.get_ident()
            try:
                hook()
            finally:
                self._first_write_owner = None
            self.first_write = None

    def _refuse_writes(self) -> None:
        if self.sync_error is not None:
            raise SyncFailed(f"'{self.path}': an earlier fsync failed ({self.sync_error}); "
                             "the image is read-only now and what was written since the last "
                             "successful flush may be lost") from self.sync_error

    def pread(self, offset: int, length: int) -> bytes:
        """Read up to *length* bytes at *offset*; short at end of file."""
        if self.faults is not None:
            self.faults.check("pread")
        return self._pread(offset, length)

    def _pread(self, offset: int, length: int) -> bytes:
        """The read itself: through the direct I/O layer, or ``os.pread``."""
        if self.direct is not None:
            return self.direct.pread(offset, length)
        return os.pread(self.fd, length, offset)

    def pread_exact(self, offset: int, length: int) -> bytes:
        """Read *length* bytes at *offset*, zero-filling what lies past end of file."""
        if self.faults is not None:
            self.faults.check("pread")
        data = self._pread(offset, length)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def preadv(self, buffers: Sequence[memoryview], offset: int) -> int:
        """Fill *buffers* from *offset*; zero-fill whatever lies past end of file."""
        want = sum(len(b) for b in buffers)
        if self.faults is not None:
            self.faults.check("pread")
        if self.direct is not None:
            got = self.direct.readinto(buffers, offset)
        else:
            got = os.preadv(self.fd, buffers, offset)
        if got < want:
            self._zero_tail(buffers, got, want, offset)
        return want

    def _zero_tail(self, buffers: Sequence[memoryview], got: int, want: int, offset: int) -> None:
        # Short read: retry once (a read may be short without being at EOF), then zero.
        # (A direct read is short only at the end of the file; the retry reads the same.)
        pos = 0
        for buf in buffers:
            n = len(buf)
            if pos + n > got:
                start = max(0, got - pos)
                chunk = self._pread(offset + pos + start, n - start)
                buf[start:start + len(chunk)] = chunk
                if start + len(chunk) < n:
                    buf[start + len(chunk):] = bytes(n - start - len(chunk))
                got = pos + n
            pos += n

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of *data* at *offset*."""
        view = memoryview(data)
        if self.sync_error is not None or self.faults is not None or self.first_write is not None:
            self._before_write("pwrite")
        start, whole = offset, view
        try:
            if self.direct is not None:
                self.direct.pwrite(offset, view)
            else:
                while view:
                    written = os.pwrite(self.fd, view, offset)
                    view = view[written:]
                    offset += written
            if self.log is not None:
                self._log_write(start, bytes(whole))
        finally:
            self.unsynced = True

    def _log_write(self, offset: int, data: bytes) -> None:
        """Log a write that returned: ``("write", offset, data)``, and for a direct
        file what it did beyond its bytes, in the same step (no other entry between):
        the file reaches at least the end of the write's last aligned block
        (``("extend", end)``, which replay applies only where the file is shorter)."""
        log = self.log
        if log is None:
            return
        with self._log_lock:
            log.append(("write", offset, data))
            if self.direct is not None and data:
                log.append(("extend", self.direct.span(offset, len(data))[1], b""))

    def pwritev(self, buffers: Sequence[bytes | bytearray | memoryview], offset: int) -> None:
        """Write all *buffers* contiguously from *offset*."""
        total = sum(len(b) for b in buffers)
        if self.sync_error is not None or self.faults is not None or self.first_write is not None:
            self._before_write("pwrite")
        try:
            if self.direct is not None:
                self.direct.pwritev(buffers, offset)
                written = total
            else:
                written = os.pwritev(self.fd, buffers, offset)
            if self.log is not None:  # (logged before the flag: see ``log``)
                self._log_write(offset, b"".join(bytes(b) for b in buffers)[:written])
        finally:
            self.unsynced = True
        if written < total:  # rare: finish with plain writes (which log themselves)
            self.pwrite(offset + written, b"".join(bytes(b) for b in buffers)[written:])

    def flush(self) -> None:
        """Make every write that returned before this call durable (see the flush rule).

        Waits for a sync already running when it covers those writes, else runs (or
        joins) one that starts after this call.  A failed sync poisons the file: the
        error is raised, and from then on every write and sync raises
        :class:`~qcow2rw.errors.SyncFailed` (nothing may pretend that what the failed
        sync covered is durable by syncing again).
        """
        self._refuse_writes()
        with self._sync_lock:
            mark = self.syncs_started if self.unsynced else self.syncs_started - 1
        self.sync_past(mark)

    @property
    def _syncing(self) -> bool:
        """A sync is running."""
        return self._sync_owner is not None

    def sync_mark(self) -> int:
        """A mark for writes that have returned by now: :meth:`sync_past` with it makes
        them durable (a sync numbered above the mark started after they returned)."""
        return self.syncs_started

    def sync_past(self, mark: int) -> None:
        """Return once a sync numbered above *mark* has succeeded, running one if needed.

        Interrupt-safe (qcow2rw.locks' rules): the claim of a sync is one store made
        inside the ``try`` whose ``finally`` ends it, and ending it is state-based and
        idempotent; waiters look again every 50 ms even if the wake-up was lost.
        """
        me = threading.get_ident()
        while True:
            gate = None
            try:
                with self._sync_lock:
                    if self.synced > mark:
                        return
                    if self.sync_error is not None:
                        self._refuse_writes()
                    if self._sync_owner is None:
                        self._sync_owner = me  # the claim (the finally gives it back)
                        self._sync_gate = Gate()
                        self._sync_ok = False
                        self.syncs_started += 1
                        self.unsynced = False
                        if self.log is not None:
                            self._log_append("sync-start", self.syncs_started, b"")
                    else:
                        gate = self._sync_gate
                if gate is not None:
                    gate.wait(0.05)
                    continue
                self._fdatasync()
            finally:
                if self._sync_owner == me:
                    try:
                        self._end_sync(me)
                    except BaseException:
                        self._end_sync(me)  # (cut short: once more; it is idempotent)
                        raise

    def _end_sync(self, me: int) -> None:
        """End the sync thread *me* runs (nothing if it runs none): record it as done
        or failed, let the waiters go on.  Raises the error of a failed fdatasync."""
        with self._sync_lock:
            if self._sync_owner != me:
                return
            number, ok, gate = self.syncs_started, self._sync_ok, self._sync_gate
            if self.log is not None:  # (logged before anybody sees it done)
                self._log_append("sync" if ok else "sync-failed", number, b"")
            if ok:
                self.synced = number
            else:
                self.unsynced = True  # (a sync that did not happen covers nothing)
            self._sync_owner = None
        if gate is not None:
            gate.set()

    def _fdatasync(self) -> None:
        """One fdatasync between the ``flush_to_disk`` event points; sets ``_sync_ok``
        when it returned.  A failed fdatasync poisons the file (``sync_error``); an
        error injected at the event point fails only this call.  Caller holds: no lock
        (it runs the sync it claimed in :meth:`sync_past`)."""
        fire = self.fire
        if fire is not None:
            fire("flush_to_disk")
        try:
            if self.faults is not None:
                self.faults.check("fsync")
            if not self.unsafe:
                os.fdatasync(self.fd)
        except OSError as exc:
            self.sync_error = exc
            raise
        self._sync_ok = True
        if fire is not None:
            fire("flush_to_disk_done")

    def size(self) -> int:
        """Current size of the file in bytes."""
        return os.fstat(self.fd).st_size

    def truncate(self, length: int) -> None:
        """Set the file's size."""
        if self.sync_error is not None or self.faults is not None or self.first_write is not None:
            self._before_write("truncate")
        os.ftruncate(self.fd, length)
        if self.log is not None:
            self._log_append("truncate", length, b"")
        self.unsynced = True

    def allocate(self, offset: int, length: int) -> None:
        """Reserve disk space (``posix_fallocate``); extends the file."""
        if self.sync_error is not None or self.faults is not None or self.first_write is not None:
            self._before_write("truncate")
        os.posix_fallocate(self.fd, offset, length)
        if self.log is not None:
            self._log_append("extend", offset + length, b"")
        self.unsynced = True

    def zero_range(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros: a hole punched (keeping the
        size), or zeros written where the system cannot punch.  Counted as a write
        (the flush rule covers it)."""
        if length <= 0:
            return
        if self.sync_error is not None or self.faults is not None or self.first_write is not None:
            self._before_write("pwrite")
        from .convert import _punch_hole  # (ctypes: loaded on first use only)
        # Direct I/O: the kernel zeroes the partial blocks at the edges itself, so the
        # punch has its aligned range to itself, like a write that pads.
        direct = self.direct
        claim = direct.punch_claim(offset, length) if direct is not None else None
        try:
            try:
                if direct is not None and claim is not None:
                    direct.tracker.begin(claim)
                punched = _punch_hole(self.fd, offset, length)
            finally:
                if direct is not None and claim is not None:
                    try:
                        direct.tracker.end(claim)
                    except BaseException:  # (cut short: once more; it is idempotent)
                        direct.tracker.end(claim)
                        raise
            if punched and self.log is not None:
                self._log_append("write", offset, bytes(length))
        finally:
            self.unsynced = True
        if not punched:
            chunk = bytes(min(length, 1 << 20))
            pos = 0
            while pos < length:
                n = min(len(chunk), length - pos)
                self.pwrite(offset + pos, chunk[:n])
                pos += n

    def allocated_bytes(self) -> int:
        """Bytes the file occupies on the host (``st_blocks`` * 512)."""
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        """Close the descriptor (this also drops its OFD locks)."""
        if not self.closed:
            self.closed = True
            os.close(self.fd)


def data_segments(fd: int, offset: int, length: int) -> list[tuple[int, int, bool]]:
    """Split a byte range of the file *fd* into (offset, length, is_data) runs of data
    and holes (SEEK_DATA/SEEK_HOLE); an error other than "no more data" is raised."""
    out: list[tuple[int, int, bool]] = []
    end = offset + length
    pos = offset
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            data = end  # only a hole (or end of file) from here
        if data > pos:
            hole_end = min(data, end)
            out.append((pos, hole_end - pos, False))
            pos = hole_end
            continue
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError:
            hole = end
        data_end = min(max(hole, pos + 1), end)
        out.append((pos, data_end - pos, True))
        pos = data_end
    return out
