"""NBD protocol constants, wire layouts and small pure helpers (no sockets, no threads).

Names follow the NBD protocol document (``doc/proto.md`` of NetworkBlockDevice/nbd):
``NBD_OPT_GO`` is :data:`OPT_GO` here, ``NBD_CMD_READ`` is :data:`CMD_READ`, and so on.
Every integer on the wire is big-endian.  Only the fixed-newstyle handshake and the
compact (not extended) request and reply headers are spoken.
"""

from __future__ import annotations

import errno
import struct
from concurrent.futures import CancelledError

from ..errors import (
    ClosedImage,
    CorruptImage,
    ReadOnlyImage,
    SyncFailed,
    UnsupportedFeature,
)

# --- handshake ---------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
REPLY_MAGIC = 0x0003E889045565A9       # option reply magic

FLAG_FIXED_NEWSTYLE = 1 << 0           # handshake flags (server)
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAG_FIXED_NEWSTYLE = 1 << 0    # client flags
CLIENT_FLAG_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

#: Longest option payload we read; a longer one ends the connection (nbdkit does the same).
MAX_OPTION_LENGTH = 64 * 1024
#: Longest string (export name, context name) the protocol allows.
MAX_STRING = 4096

# --- transmission flags (export flags) ------------------------------------------------------
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# --- requests -------------------------------------------------------------------------------
REQUEST_MAGIC = 0x25609513
REQUEST = struct.Struct(">IHHQQI")     # magic, flags, type, cookie, offset, length
REQUEST_SIZE = REQUEST.size            # 28

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
             CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
             CMD_BLOCK_STATUS: "BLOCK_STATUS"}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

#: The command flags each command accepts (anything else gets EINVAL).  FUA is valid on
#: every command once ``SEND_FUA`` is advertised (we always do): the protocol says the
#: server MUST accept it, ignoring it where the command writes nothing.
ALLOWED_FLAGS = {
    CMD_READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_CACHE: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
}

# --- replies --------------------------------------------------------------------------------
SIMPLE_REPLY_MAGIC = 0x67446698
SIMPLE_REPLY = struct.Struct(">IIQ")   # magic, error, cookie
STRUCTURED_REPLY_MAGIC = 0x668E33EF
CHUNK = struct.Struct(">IHHQI")        # magic, flags, type, cookie, payload length
REPLY_FLAG_DONE = 1 << 0

REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# --- metadata contexts ----------------------------------------------------------------------
CONTEXT_BASE_ALLOCATION = "base:allocation"
CONTEXT_ALLOCATION_DEPTH = "qemu:allocation-depth"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# --- error values ---------------------------------------------------------------------------
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

#: Block size constraints we advertise: minimum 1, preferred the cluster size (at least
#: 4096, at most 2 MiB), maximum 32 MiB (also the largest READ or WRITE we accept).
MIN_BLOCK = 1
MAX_BLOCK = 32 * 1024 * 1024


def preferred_block(cluster_size: int) -> int:
    """The preferred block size advertised for an image with *cluster_size*."""
    return max(4096, min(cluster_size, 2 * 1024 * 1024))


def nbd_errno(exc: BaseException) -> int:
    """The NBD error value a failed request reports for *exc*.

    A read-only image gives EPERM, a request out of range EINVAL, a full disk (ENOSPC,
    EDQUOT, EFBIG) ENOSPC, a closed or shutting-down image ESHUTDOWN, an unsupported
    feature ENOTSUP, a failed fsync and every other error EIO.
    """
    if isinstance(exc, SyncFailed):
        return EIO
    if isinstance(exc, ReadOnlyImage) and not isinstance(exc, CorruptImage):
        return EPERM
    if isinstance(exc, (ClosedImage, CancelledError)):
        return ESHUTDOWN
    if isinstance(exc, UnsupportedFeature | NotImplementedError):
        return ENOTSUP
    if isinstance(exc, MemoryError):
        return ENOMEM
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return ENOSPC
        if exc.errno == errno.EROFS or exc.errno == errno.EPERM:
            return EPERM
        return EIO
    if isinstance(exc, (ValueError, OverflowError)):
        return EINVAL  # OutOfRange is a ValueError
    return EIO


def error_message(exc: BaseException) -> str:
    """A short, one-line message for a structured error reply (at most 4096 bytes UTF-8)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.encode()[:MAX_STRING].decode(errors="ignore")


# --- reply builders ------------------------------------------------------------------------
def simple_reply(cookie: int, error: int = 0) -> bytes:
    """A simple reply header (the payload, for a successful READ, follows it)."""
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(cookie: int, rtype: int, length: int, done: bool) -> bytes:
    """A structured reply chunk header for a payload of *length* bytes."""
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, rtype, cookie, length)


def error_chunk(cookie: int, error: int, message: str, done: bool = True) -> bytes:
    """A structured NBD_REPLY_TYPE_ERROR chunk (header and payload)."""
    msg = message.encode()[:MAX_STRING]
    return (chunk_header(cookie, REPLY_TYPE_ERROR, 6 + len(msg), done)
            + struct.pack(">IH", error, len(msg)) + msg)


def option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    """An option reply (handshake), header and payload."""
    return struct.pack(">QIII", REPLY_MAGIC, option, reply, len(payload)) + payload


def zero_runs(buf: bytes | bytearray, granule: int, zeros: bytes) -> list[tuple[int, int, bool]]:
    """Split *buf* into runs ``(start, length, is_zero)`` at *granule* boundaries.

    Only whole granules that are entirely zero count as zero runs; *zeros* is a
    zero-filled bytes object at least *granule* long (compared at ``memcmp`` speed by
    ``startswith``, no copy).  Adjacent runs alternate between data and zero.
    """
    n = len(buf)
    zero_g = zeros[:granule]
    if n <= granule:
        return [(0, n, n > 0 and buf.startswith(zeros[:n]))]
    runs: list[tuple[int, int, bool]] = []
    pos = 0
    while pos < n:
        size = min(granule, n - pos)
        is_zero = size == granule and buf.startswith(zero_g, pos)
        if runs and runs[-1][2] == is_zero:
            start, length, _ = runs[-1]
            runs[-1] = (start, length + size, is_zero)
        else:
            runs.append((pos, size, is_zero))
        pos += size
    return runs


#: Cache modes (``--cache``): "writeback" (the default) acknowledges writes once the
#: engine has them, FLUSH and FUA make them durable; "writethrough" and "directsync"
#: treat every write as FUA; "none" and "directsync" open the image O_DIRECT
#: (``cache="none"``), "none" otherwise as writeback; "unsafe" ignores
#: FLUSH and FUA, and a disconnect does not flush either (data reaches the disk when
#: the image is closed).
CACHE_MODES = ("writeback", "writethrough", "directsync", "none", "unsafe")
