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
from collections.abc import Sequence

from .errors import ImageLocked, Qcow2Error

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
        # The write log: when a list, every write, truncate and sync is appended to it
        # as ("write", offset, bytes) / ("truncate", length, b"") / ("sync", 0, b"").
        self.log: list[tuple[str, int, bytes]] | None = None
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
    def pread(self, offset: int, length: int) -> bytes:
        """Read up to *length* bytes at *offset*; short at end of file."""
        return os.pread(self.fd, length, offset)

    def pread_exact(self, offset: int, length: int) -> bytes:
        """Read *length* bytes at *offset*, zero-filling what lies past end of file."""
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def preadv(self, buffers: Sequence[memoryview], offset: int) -> int:
        """Fill *buffers* from *offset*; zero-fill whatever lies past end of file."""
        want = sum(len(b) for b in buffers)
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
        if self.log is not None:
            self.log.append(("write", offset, bytes(view)))
        try:
            while view:
                written = os.pwrite(self.fd, view, offset)
                view = view[written:]
                offset += written
        finally:
            self.unsynced = True

    def pwritev(self, buffers: Sequence[bytes | bytearray | memoryview], offset: int) -> None:
        """Write all *buffers* contiguously from *offset*."""
        total = sum(len(b) for b in buffers)
        if self.log is not None:
            self.log.append(("write", offset, b"".join(bytes(b) for b in buffers)))
        try:
            written = os.pwritev(self.fd, buffers, offset)
        finally:
            self.unsynced = True
        if written < total:  # rare: finish with plain writes
            self.pwrite(offset + written, b"".join(bytes(b) for b in buffers)[written:])

    def flush(self) -> None:
        """Make everything written so far durable (``fdatasync``)."""
        self.unsynced = False
        os.fdatasync(self.fd)
        if self.log is not None:
            self.log.append(("sync", 0, b""))

    def size(self) -> int:
        """Current size of the file in bytes."""
        return os.fstat(self.fd).st_size

    def truncate(self, length: int) -> None:
        """Set the file's size."""
        if self.log is not None:
            self.log.append(("truncate", length, b""))
        os.ftruncate(self.fd, length)
        self.unsynced = True

    def allocate(self, offset: int, length: int) -> None:
        """Reserve disk space (``posix_fallocate``); extends the file."""
        os.posix_fallocate(self.fd, offset, length)
        self.unsynced = True

    def allocated_bytes(self) -> int:
        """Bytes the file occupies on the host (``st_blocks`` * 512)."""
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        """Close the descriptor (this also drops its OFD locks)."""
        if not self.closed:
            self.closed = True
            os.close(self.fd)
