"""qcow2rw: a pure-Python, multi-threaded driver for QEMU's qcow2 disk images.

Module map (one module per on-disk structure or mechanism):

- ``format``    header, extensions, entry layouts (pure parse/serialize, no I/O)
- ``storage``   the host file: positional I/O, flush, size, QEMU's image locks
- ``cache``     bounded write-back metadata caches (L2 tables, refcount blocks)
- ``refcount``  refcount table and blocks, the cluster allocator
- ``snapshot``  the internal snapshot table
- ``backing``   backing files and chains
- ``compress``  deflate and zstd clusters
- ``mapping``   the chain's allocation map (``qemu-img map``)
- ``check``     reference counting from the tables; refcount rebuild
- ``create``    laying out a new image
- ``image``     the synchronous :class:`Image`
- ``cli``       the ``qcow2rw`` command
"""

from __future__ import annotations

import os as _os

from .aio import AioImage
from .asyncface import AsyncImage
from .create import create
from .errors import (BackingChainError, ClosedImage, CorruptImage, DeadlockError, FormatError,
                     ImageLocked, Qcow2Error, ReadOnlyImage, SnapshotNotFound, SyncFailed,
                     UnsupportedFeature)
from .image import Image, OutOfRange, open_image

__version__ = "0.1.0"


def open(path: str | _os.PathLike[str], *, readonly: bool = False, backing: bool = True,  # noqa: A001
         lock_mode: str = "fine", cache_size: int | None = None,
         force_share: bool = False, overlap_check: bool | str = True) -> Image:
    """Open the qcow2 image at *path*.

    Args:
        readonly: open for reading only.
        backing: open the backing chain (reads of unallocated clusters need it).
        lock_mode: "mutex", "rwlock" or "fine" (DESIGN §4).
        cache_size: bytes of L2 tables to cache (refcount blocks get a quarter).
        force_share: read-only open that ignores other processes' locks (``-U``).
        overlap_check: QEMU's ``overlap-check`` before every metadata and data write:
            True (= "cached", the default), "constant", "all", or False (= "none").
    """
    return open_image(path, readonly=readonly, backing=backing, lock_mode=lock_mode,
                      cache_size=cache_size, force_share=force_share,
                      overlap_check=overlap_check)


__all__ = ["AioImage", "AsyncImage", "BackingChainError", "ClosedImage", "CorruptImage",
           "DeadlockError", "FormatError", "Image", "ImageLocked", "OutOfRange", "Qcow2Error",
           "ReadOnlyImage", "SnapshotNotFound", "SyncFailed", "UnsupportedFeature", "create",
           "open"]
