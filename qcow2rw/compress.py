"""Compressed clusters: deflate (compression type 0) and zstd (type 1).

QEMU compresses a cluster into raw deflate with a 4 KiB window (``wbits=-12``) or a
zstd frame, and pads the stored data up to a 512-byte sector, so the data is read
with a streaming decompressor that stops at the end of the stream and ignores the
slack after it.
"""

from __future__ import annotations

import zlib

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


def compress(data: bytes, compression_type: int) -> bytes:
    """Compress one cluster as QEMU does."""
    if compression_type == COMPRESSION_ZLIB:
        obj = zlib.compressobj(9, zlib.DEFLATED, -12, 9)
        return obj.compress(data) + obj.flush()
    require(compression_type)
    return _zstd.compress(data)
