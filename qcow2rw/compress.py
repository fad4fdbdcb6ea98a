"""Compressed clusters: deflate (compression type 0) and zstd (type 1).

QEMU compresses a cluster into raw deflate with a 4 KiB window (``wbits=-12``) or a
zstd frame, and pads the stored data up to a 512-byte sector, so the data is read
with a streaming decompressor that stops at the end of the stream and ignores the
slack after it.
"""

from __future__ import annotations

import zlib
from typing import Any

Buffer = Any  # any bytes-like object (collections.abc.Buffer from 3.12)

from .errors import CorruptImage, UnsupportedFeature
from .format import COMPRESSION_ZLIB, COMPRESSION_ZSTD

try:  # Python 3.14+
    from compression import zstd as _zstd  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the interpreter
    try:
        from backports import zstd as _zstd  # type: ignore[no-redef]
    except ImportError:
        _zstd = None


def zstd_available() -> bool:
    """True when zstd clusters can be read and written."""
    return _zstd is not None


def require(compression_type: int) -> None:
    """Raise :class:`UnsupportedFeature` if clusters of this type cannot be handled here."""
    if compression_type == COMPRESSION_ZSTD and _zstd is None:
        raise UnsupportedFeature("zstd-compressed image: install qcow2rw[zstd] (backports.zstd)")


def decompress(data: bytes, cluster_size: int, compression_type: int) -> bytes:
    """Decompress one cluster; raise :class:`CorruptImage` unless it yields exactly one cluster."""
    try:
        if compression_type == COMPRESSION_ZLIB:
            out = zlib.decompressobj(-12).decompress(data, cluster_size)
        else:
            require(compression_type)
            out = _zstd.ZstdDecompressor().decompress(data, max_length=cluster_size)
    except (zlib.error, ValueError, Exception) as exc:  # zstd raises its own ZstdError
        if isinstance(exc, UnsupportedFeature):
            raise
        raise CorruptImage(f"cannot decompress cluster: {exc}") from None
    if len(out) != cluster_size:
        raise CorruptImage(f"compressed cluster decompresses to {len(out)} bytes, not {cluster_size}")
    return out


def compress(data: Buffer, compression_type: int) -> bytes:
    """Compress one cluster as QEMU's ``qcow2_co_compress`` does: raw deflate at zlib's
    default level with a 4 KiB window and memLevel 9, or a zstd frame at zstd's default
    level.  Thread-safe; both codecs release the GIL while they work."""
    if compression_type == COMPRESSION_ZLIB:
        obj = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        return obj.compress(data) + obj.flush()
    require(compression_type)
    return _zstd.compress(data)


def compress_cluster(data: Buffer, cluster_size: int, compression_type: int) -> bytes | None:
    """The stored form of one whole cluster (*data*, zero-padded to *cluster_size* if
    short), or None when it does not compress into ``cluster_size - 1`` bytes and
    must be stored as a normal cluster (QEMU's rule)."""
    if len(data) != cluster_size:
        if len(data) > cluster_size:
            raise ValueError(f"a compressed write is one cluster ({cluster_size} bytes), "
                             f"not {len(data)}")
        data = bytes(data) + bytes(cluster_size - len(data))
    payload = compress(data, compression_type)
    return payload if len(payload) < cluster_size else None
