"""Laying out a new qcow2 image as ``qemu-img create`` does.

The new file gets a header (cluster 0), a one-cluster refcount table (cluster 1)
and one refcount block (cluster 2), with an empty L1 table; the image is then opened
and grown to its size, which places the L1 table at cluster 3, exactly where QEMU
puts it.  Preallocation then allocates L2 tables and data clusters.
"""

from __future__ import annotations

import os
import struct

from .backing import open_backing, probe_format, resolve_name
from .errors import FormatError, Qcow2Error, UnsupportedFeature
from .format import (AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, COMPAT_VERSIONS, COMPRESSION_NAMES, COMPRESSION_ZLIB,
                     HEADER_V2_LENGTH, INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE, INCOMPAT_EXTL2,
                     HEADER_V3_WRITTEN_LENGTH, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS,
                     Header, compat_error, refcount_order_of,
                     refcount_width_error, serialize_header)
from .image import CACHE_MODES, Image, open_image
from .refcount import RefBlock
from .resize import PREALLOCATION_MODES, preallocate, resize_held


def create(path: str | os.PathLike[str], size: int | None, *, cluster_size: int = 65536,
           backing_file: str | None = None, backing_format: str | None = None,
           lazy_refcounts: bool = False, refcount_bits: int = 16, compat: str = "1.1",
           preallocation: str = "off", compression_type: str = "zlib",
           extended_l2: bool = False, cache: str = "writeback",
           cache_size: int | None = None, data_file: str | os.PathLike[str] | None = None,
           data_file_raw: bool = False) -> Image:
    """Create a qcow2 image at *path* and return it open for writing.

    *size* may be None when a backing file is given (the backing file's size is
    used); it is rounded up to a multiple of 512 like qemu-img does.  *cache* and
    *cache_size* are the returned image's (see :func:`qcow2rw.open`): with
    ``cache="none"`` the first clusters are laid out with buffered I/O, then the image
    is opened with ``O_DIRECT`` and everything after (the L1 table, preallocation)
    goes through it.

    *data_file*: keep the guest data in this external data file (created, or cleared,
    with the virtual size, as qemu-img does; its name is stored in the image as
    given).  *data_file_raw*: the data file stays a valid raw image of the disk
    (implies ``preallocation=metadata`` at least, as QEMU).
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, not {cache!r}")
    path = os.fspath(path)
    cluster_bits = cluster_size.bit_length() - 1
    if cluster_size != 1 << cluster_bits or not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise FormatError("Cluster size must be a power of two between 512 and 2048k")
    problem = refcount_width_error(refcount_bits)
    if problem:
        raise FormatError(problem)
    if compat not in COMPAT_VERSIONS:
        raise FormatError(f"Invalid compatibility level: '{compat}'")
    version = COMPAT_VERSIONS[compat]
    problem = compat_error(version, lazy_refcounts=lazy_refcounts, refcount_bits=refcount_bits)
    if problem:
        raise FormatError(problem)
    codes = {name: code for code, name in COMPRESSION_NAMES.items()}
    if compression_type not in codes:
        raise FormatError(f"Parameter 'compression-type' does not accept value "
                          f"'{compression_type}'")
    if codes[compression_type] != COMPRESSION_ZLIB and version < 3:
        raise FormatError("Non-zlib compression type is only supported with compatibility "
                          "level 1.1 and above (use version=v3 or greater)")
    if extended_l2 and version < 3:
        raise FormatError("Extended L2 entries are only supported with compatibility level 1.1 "
                          "and above (use version=v3 or greater)")
    if extended_l2 and cluster_bits < 14:
        raise FormatError("Extended L2 entries are only supported with cluster sizes of at "
                          "least 16384 bytes")
    if preallocation not in PREALLOCATION_MODES:
        raise FormatError(f"Invalid preallocation mode: '{preallocation}'")
    data_name = os.fspath(data_file) if data_file is not None else None
    if data_file_raw and data_name is None:
        raise FormatError("data-file-raw requires data-file")
    if data_name is not None:
        if version < 3:
            raise FormatError("External data files are only supported with compatibility "
                              "level 1.1 and above (use version=v3 or greater)")
        if data_file_raw and backing_file:
            raise FormatError("Backing file and data-file-raw cannot be used at the same time")
        if extended_l2:
            raise UnsupportedFeature("External data files with extended L2 entries are not "
                                     "supported yet")
        if data_file_raw and preallocation == "off":
            preallocation = "metadata"  # (QEMU: the data file must read as the disk)
    if backing_file and preallocation != "off" and not extended_l2:
        raise UnsupportedFeature("Backing file and preallocation can only be used at the same "
                                 "time if extended_l2 is on")
    if backing_file:
        backing_format, backing_size = _inspect_backing(path, backing_file, backing_format)
        if size is None:
            size = backing_size
    if size is None:
        raise Qcow2Error("Image creation needs a size parameter")
    if size < 0:
        raise FormatError("Image size must not be negative")
    size = (size + 511) & ~511

    hdr = Header(version=version, cluster_bits=cluster_bits, size=0, l1_size=0, l1_table_offset=0,
                 refcount_table_offset=cluster_size, refcount_table_clusters=1,
                 refcount_order=refcount_order_of(refcount_bits),
                 compatible_features=COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0,
                 compression_type=codes[compression_type],
                 incompatible_features=((INCOMPAT_COMPRESSION
                                         if codes[compression_type] != COMPRESSION_ZLIB else 0)
                                        | (INCOMPAT_EXTL2 if extended_l2 else 0)
                                        | (INCOMPAT_DATA_FILE if data_name is not None else 0)),
                 autoclear_features=AUTOCLEAR_DATA_FILE_RAW if data_file_raw else 0,
                 data_file=data_name,
                 header_length=HEADER_V3_WRITTEN_LENGTH if version == 3 else HEADER_V2_LENGTH,
                 backing_file=backing_file, backing_format=backing_format if backing_file else None)
    header_bytes = serialize_header(hdr)
    block = RefBlock.empty(hdr.refcount_bits, 1 << hdr.refcount_block_bits)
    for cluster in range(3):
        block.values[cluster] = 1
    if data_name is not None:  # (qemu-img creates the data file first, then the image)
        fd = os.open(data_name, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, size)
            if size:  # (QEMU's file driver allocates the first block: its alignment probe)
                os.pwrite(fd, bytes(min(4096, size)), 0)
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        # Whole clusters, as qemu-img writes them (the host file's allocation is what
        # QEMU's metadata-preallocation test looks at: qemu-img map and compare).
        os.pwrite(fd, header_bytes + bytes(cluster_size - len(header_bytes)), 0)
        os.pwrite(fd, struct.pack(">Q", 2 * cluster_size) + bytes(cluster_size - 8), cluster_size)
        os.pwrite(fd, block.to_bytes(), 2 * cluster_size)
        os.ftruncate(fd, 3 * cluster_size)
    finally:
        os.close(fd)
    img = open_image(path, backing=bool(backing_file), cache=cache, cache_size=cache_size,
                     data_file=data_name)
    try:
        with img.exclusive():  # (the backing file shows through: hide_backing False)
            resize_held(img.state, size, shrink=False, preallocation="off", hide_backing=False)
        if preallocation != "off":
            preallocate(img.state, preallocation)
    except BaseException:
        img.close()
        raise
    return img


def _inspect_backing(path: str, backing_file: str, backing_format: str | None) -> tuple[str, int]:
    """Open the backing file once to learn its format and size (like qemu-img create)."""
    if backing_format is None:
        target = resolve_name(path, backing_file)
        if not os.path.exists(target):
            raise FormatError(f"Could not open backing file '{target}': No such file or directory")
        backing_format = probe_format(target)
    if backing_format not in ("qcow2", "raw"):
        raise UnsupportedFeature(f"Unsupported backing file format '{backing_format}'")
    source = open_backing(path, backing_file, backing_format, (os.path.realpath(path),),
                          opener=open_image)
    try:
        return backing_format, source.size
    finally:
        source.close()
