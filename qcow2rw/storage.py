"""The host file behind an image: positional I/O, flush, size and QEMU's image locks.

This is the one seam between qcow2rw and the operating system: every byte read from
or written to an image file goes through :class:`HostFile`, which is where fault
injection and the write log plug in.  Positional I/O (``os.pread``/``os.pwrite``)
needs no lock: the kernel keeps concurrent calls on one descriptor apart.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
from collections.abc import Sequence

from .errors import ImageLocked, Qcow2Error, SyncFailed

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
    ``unsynced`` is only a hint for skipping needless syncs: it is set after every
    write and cleared *before* each sync, so a write racing a sync leaves it set.
    """

    def __init__(self, path: str, *, readonly: bool, lock: bool = True,
                 force_share: bool = False, create: bool = False) -> None:
        flags = os.O_RDONLY if readonly else os.O_RDWR
        if create:
            flags |= os.O_CREAT | os.O_TRUNC
        flags |= getattr(os, "O_CLOEXEC", 0)
        self.path = path
        self.readonly = readonly
        self.fd = os.open(path, flags, 0o644)
        self.closed = False
        self.unsynced = False  # something was written since the last flush()
        # The write log: when a list, every write, size change and sync is appended
        # to it once it has returned, as ("write", offset, bytes), ("truncate",
        # length, b""), ("extend", length, b"") (posix_fallocate) and ("sync", 0,
        # b""); :meth:`note` adds markers of the caller's own (acknowledged guest
        # operations).  Appending to a list is atomic, so threads need no lock.
        self.log: list[tuple[str, int, bytes]] | None = None
        self.faults: FaultInjector | None = None  # fault injection (tests)
        # The error of a failed fsync: from then on every write and sync is refused.
        self.sync_error: OSError | None = None
        try:
            if not os.path.isfile(path) and not create:
                raise Qcow2Error(f"'{path}' is not a regular file")
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
        if self.log is not None:
            self.log.append((kind, value, b""))

    def _refuse_writes(self) -> None:
        if self.sync_error is not None:
            raise SyncFailed(f"'{self.path}': an earlier fsync failed ({self.sync_error}); "
                             "the image is read-only now and what was written since the last "
                             "successful flush may be lost") from self.sync_error

    def pread(self, offset: int, length: int) -> bytes:
        """Read up to *length* bytes at *offset*; short at end of file."""
        if self.faults is not None:
            self.faults.check("pread")
        return os.pread(self.fd, length, offset)

    def pread_exact(self, offset: int, length: int) -> bytes:
        """Read *length* bytes at *offset*, zero-filling what lies past end of file."""
        if self.faults is not None:
            self.faults.check("pread")
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def preadv(self, buffers: Sequence[memoryview], offset: int) -> int:
        """Fill *buffers* from *offset*; zero-fill whatever lies past end of file."""
        want = sum(len(b) for b in buffers)
        if self.faults is not None:
            self.faults.check("pread")
        got = os.preadv(self.fd, buffers, offset)
        if got < want:
            self._zero_tail(buffers, got, want, offset)
        return want

    def _zero_tail(self, buffers: Sequence[memoryview], got: int, want: int, offset: int) -> None:
        # Short read: retry once (a read may be short without being at EOF), then zero.
        pos = 0
        for buf in buffers:
            n = len(buf)
            if pos + n > got:
                start = max(0, got - pos)
                chunk = os.pread(self.fd, n - start, offset + pos + start)
                buf[start:start + len(chunk)] = chunk
                if start + len(chunk) < n:
                    buf[start + len(chunk):] = bytes(n - start - len(chunk))
                got = pos + n
            pos += n

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of *data* at *offset*."""
        view = memoryview(data)
        if self.sync_error is not None or self.faults is not None:
            self._refuse_writes()
            if self.faults is not None:
                self.faults.check("pwrite")
        start, whole = offset, view
        try:
            while view:
                written = os.pwrite(self.fd, view, offset)
                view = view[written:]
                offset += written
            if self.log is not None:
                self.log.append(("write", start, bytes(whole)))
        finally:
            self.unsynced = True

    def pwritev(self, buffers: Sequence[bytes | bytearray | memoryview], offset: int) -> None:
        """Write all *buffers* contiguously from *offset*."""
        total = sum(len(b) for b in buffers)
        if self.sync_error is not None or self.faults is not None:
            self._refuse_writes()
            if self.faults is not None:
                self.faults.check("pwrite")
        try:
            written = os.pwritev(self.fd, buffers, offset)
        finally:
            self.unsynced = True
        if self.log is not None:
            self.log.append(("write", offset, b"".join(bytes(b) for b in buffers)[:written]))
        if written < total:  # rare: finish with plain writes (which log themselves)
            self.pwrite(offset + written, b"".join(bytes(b) for b in buffers)[written:])

    def flush(self) -> None:
        """Make everything written so far durable (``fdatasync``).

        A failed sync poisons the file: the error is raised, and from then on every
        write and sync raises :class:`~qcow2rw.errors.SyncFailed` (nothing may pretend
        that what the failed sync covered is durable by syncing again).
        """
        self._refuse_writes()
        self.unsynced = False
        try:
            if self.faults is not None:
                self.faults.check("fsync")
            os.fdatasync(self.fd)
        except OSError as exc:
            self.sync_error = exc
            raise
        if self.log is not None:
            self.log.append(("sync", 0, b""))

    def size(self) -> int:
        """Current size of the file in bytes."""
        return os.fstat(self.fd).st_size

    def truncate(self, length: int) -> None:
        """Set the file's size."""
        if self.sync_error is not None or self.faults is not None:
            self._refuse_writes()
            if self.faults is not None:
                self.faults.check("truncate")
        os.ftruncate(self.fd, length)
        self.unsynced = True
        if self.log is not None:
            self.log.append(("truncate", length, b""))

    def allocate(self, offset: int, length: int) -> None:
        """Reserve disk space (``posix_fallocate``); extends the file."""
        if self.sync_error is not None or self.faults is not None:
            self._refuse_writes()
            if self.faults is not None:
                self.faults.check("truncate")
        os.posix_fallocate(self.fd, offset, length)
        self.unsynced = True
        if self.log is not None:
            self.log.append(("extend", offset + length, b""))

    def allocated_bytes(self) -> int:
        """Bytes the file occupies on the host (``st_blocks`` * 512)."""
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        """Close the descriptor (this also drops its OFD locks)."""
        if not self.closed:
            self.closed = True
            os.close(self.fd)
