"""qcow2rw: a pure-Python, multi-threaded driver for QEMU's qcow2 disk images.

Module map (one module per on-disk structure or mechanism; the engine imports downwards
only, from ``image`` to ``format``):

- ``format``     header, extensions, entry and table layouts (pure parse/serialize, no I/O)
- ``units``      sizes as QEMU parses and prints them (``64k``, ``1.5M``)
- ``errors``     the exception hierarchy, rooted at ``Qcow2Error``
- ``storage``    the host file: positional I/O, flush, size, QEMU's image locks
- ``directio``   direct I/O (``cache="none"``): alignment, bounce buffers, padded writes
- ``locks``      the lock modes, THE lock order (written once), the lock primitives
- ``imagelock``  the global image lock: shared holds per thread, exclusive with a watchdog
- ``events``     debug event points on the I/O path (blkdebug's)
- ``cancel``     cancellation tokens, stopping at cluster boundaries
- ``compress``   deflate and zstd clusters
- ``cache``      bounded write-back metadata caches (L2 tables, refcount blocks)
- ``refcount``   refcount table and blocks, the cluster allocator
- ``refwriteback``  the refcount structures' write-back: blocks, table sectors, growth
- ``overlap``    QEMU's metadata overlap check before every write
- ``bitmaps``    persistent dirty bitmaps (read for ``info``)
- ``backing``    backing files and chains
- ``datafile``   external data files: which file to open (safe by default)
- ``state``      ImageState: an open image's shared state, what guards each field
- ``writeback``  flush and write-back ordering (THE FLUSH RULE)
- ``cluster``    guest -> host lookup, reads, the write plan with COW, discard/zero
- ``resize``     grow, shrink, preallocation
- ``snapshot``   internal snapshots: create, apply, delete
- ``rebuild``    the check's reference count (IMRT) and the refcount rebuild
- ``check``      ``qemu-img check`` and its repairs
- ``amend``      ``qemu-img amend``: compat level, lazy refcounts, refcount width
- ``mapping``    the chain's allocation map (``qemu-img map``)
- ``compare``    two images' guest contents compared (``qemu-img compare``)
- ``convert``    an image copied into a new qcow2 or raw one (``qemu-img convert``, ``-c``)
- ``image``      the synchronous :class:`Image` and ``open_image``
- ``create``     laying out a new image
- ``measure``    how big a new image must be (``qemu-img measure``)
- ``aio``        futures over an Image: :class:`AioImage`
- ``asyncface``  an asyncio face: :class:`AsyncImage`
- ``qemutools``  thin wrappers around qemu-img and qemu-io
- ``nbd``        the NBD export (``qcow2rw serve``)
- ``devkit``     demo, bench, stress, chaos: user commands, never imported by the engine
- ``cli``        the ``qcow2rw`` command
"""

from __future__ import annotations

import os as _os
from typing import TYPE_CHECKING, Any

from .aio import AioImage
from .compare import compare
from .convert import convert
from .create import create
from .errors import (BackingChainError, BadSetting, ClosedImage, CorruptImage, DataFileRefused,
                     DeadlockError, DirectIOUnsupported, EncryptedImage,
                     FormatError, ImageLocked, Qcow2Error, ReadOnlyImage, SnapshotNotFound, SyncFailed,
                     UnsupportedFeature)
from .image import Image, OutOfRange, open_image
from .measure import measure

if TYPE_CHECKING:
    from .asyncface import AsyncImage

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``qcow2rw.AsyncImage`` on first use: asyncio costs every ``qcow2rw`` command
    about 40 ms to import, and only asyncio programs need it (PEP 562)."""
    if name == "AsyncImage":
        from .asyncface import AsyncImage
        return AsyncImage
    raise AttributeError(f"module 'qcow2rw' has no attribute {name!r}")


def open(path: str | _os.PathLike[str], *, readonly: bool = False, backing: bool = True,  # noqa: A001
         lock_mode: str = "fine", cache_size: int | None = None,
         force_share: bool = False, overlap_check: bool | str = True,
         metadata_only: bool = False, cache: str = "writeback",
         data_file: str | _os.PathLike[str] | None = None,
         trust_data_file: bool = False) -> Image:
    """Open the qcow2 image at *path*.

    Args:
        readonly: open for reading only.
        backing: open the backing chain (reads of unallocated clusters need it).
        lock_mode: "mutex", "rwlock" or "fine" (DESIGN §4).
        cache_size: bytes of L2 tables to cache (refcount blocks get a quarter).
        force_share: read-only open that ignores other processes' locks (``-U``).
        overlap_check: QEMU's ``overlap-check`` before every metadata and data write:
            True (= "cached", the default), "constant", "all", or False (= "none").
        metadata_only: read the metadata only (QEMU's BDRV_O_NO_IO): ``info``, ``map``,
            ``check``, ``snapshots``; every method that reads or writes guest data
            raises.  The only way to open an encrypted image, whose data needs a key
            qcow2rw does not take (:class:`EncryptedImage` otherwise).
        cache: "writeback" (the default: ``flush()`` makes writes durable), QEMU's
            "unsafe" (``flush()`` writes the metadata back but does not sync the file),
            or QEMU's "none" (``qemu-img -t none``: the image file and the data file are
            opened with ``O_DIRECT``, bypassing the host's page cache, every request
            aligned through bounce buffers; ``flush()`` syncs as with "writeback").  A
            file system without ``O_DIRECT`` raises :class:`DirectIOUnsupported`.
        data_file: the external data file of an image that has one (incompatible bit
            2): guest data is read and written there.  Safe by default: an image that
            names its own data file is refused (:class:`DataFileRefused`) unless the
            caller passes the file here or sets *trust_data_file*.
        trust_data_file: use the data file the image names (opened as QEMU opens it,
            relative to the current directory); protocol names (``json:``, ``nbd:``
            ...) are refused even then.  ``metadata_only`` opens need neither.
    """
    return open_image(path, readonly=readonly, backing=backing, lock_mode=lock_mode,
                      cache_size=cache_size, force_share=force_share,
                      overlap_check=overlap_check, metadata_only=metadata_only, cache=cache,
                      data_file=data_file, trust_data_file=trust_data_file)


__all__ = ["AioImage", "AsyncImage", "BackingChainError", "BadSetting", "ClosedImage", "CorruptImage",
           "DataFileRefused",
           "DeadlockError", "DirectIOUnsupported", "EncryptedImage", "FormatError", "Image", "ImageLocked", "OutOfRange", "Qcow2Error",
           "ReadOnlyImage", "SnapshotNotFound", "SyncFailed", "UnsupportedFeature", "compare",
           "convert", "create", "measure", "open"]
