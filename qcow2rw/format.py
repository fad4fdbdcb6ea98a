"""The qcow2 on-disk format: header, header extensions and table-entry layouts.

Each layout is defined here once, and the modules that do the I/O use it: the
header and its extensions, L1/L2/refcount table entries and cluster kinds,
compressed-cluster descriptors, the snapshot table, the bitmaps extension and
bitmap directory, and the rules on creation options (compat level, refcount width).
Pure parse/serialize/validate, no I/O and no locks.  Names follow QEMU's
``block/qcow2.h`` so a reader can cross-check them; the specification is
``docs/interop/qcow2.txt`` in qemu/qemu.  All integers on disk are big-endian.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import FormatError, UnsupportedFeature

QCOW_MAGIC = 0x514649FB
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_REFCOUNT_ORDER = 6
MAX_L1_SIZE = 32 * 1024 * 1024  # bytes (QEMU's QCOW_MAX_L1_SIZE)
MAX_REFTABLE_SIZE = 8 * 1024 * 1024  # bytes (QEMU's QCOW_MAX_REFTABLE_SIZE)
MAX_SNAPSHOTS = 65536
MAX_BACKING_NAME = 1023
MAX_VIRTUAL_SIZE = 1 << 62  # bytes; QEMU caps it lower through the L1 size

# Header layout: fields up to and including header_length (v3: 104 bytes, v2: 72).
HEADER_V2 = struct.Struct(">IIQIIQIIQQIIQ")  # 72 bytes
HEADER_V3_EXTRA = struct.Struct(">QQQII")  # 32 bytes, offsets 72..103
HEADER_V2_LENGTH = 72
HEADER_V3_LENGTH = 104
HEADER_V3_WRITTEN_LENGTH = 112  # QEMU writes 104 + compression_type + padding

# Byte offsets of header fields that are updated in place.
OFF_L1_SIZE = 36
OFF_L1_TABLE_OFFSET = 40
OFF_REFCOUNT_TABLE_OFFSET = 48
OFF_REFCOUNT_TABLE_CLUSTERS = 56
OFF_NB_SNAPSHOTS = 60
OFF_INCOMPATIBLE = 72
OFF_AUTOCLEAR = 88
OFF_SIZE = 24
# Header fields written together in place, at the offsets above.
L1_POINTER = struct.Struct(">IQ")  # at OFF_L1_SIZE: l1_size, l1_table_offset
REFTABLE_POINTER = struct.Struct(">QI")  # at OFF_REFCOUNT_TABLE_OFFSET: offset, clusters
SNAPSHOTS_POINTER = struct.Struct(">IQ")  # at OFF_NB_SNAPSHOTS: nb_snapshots, snapshots_offset

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
# Compatible feature bits.
COMPAT_LAZY_REFCOUNTS = 1 << 0
# Autoclear feature bits.
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# Header extension magics.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

#: The crypto header extension's payload (Qcow2CryptoHeaderExtension): offset, length.
CRYPTO_EXT = struct.Struct(">QQ")
CRYPT_LUKS = 2  # crypt_method of LUKS images (see qcow2rw.crypto)

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# Table-entry layouts.
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1

# Cluster kinds, from an L2 entry (QEMU's QCow2ClusterType and, with extended L2
# entries, QCow2SubclusterType; no external data file).  See :func:`cluster_kind` and
# :func:`subcluster_runs`.  UNALLOCATED_ALLOC: a subcluster not allocated in a cluster
# that has a host offset (it reads from the backing file, or as zeros).
UNALLOCATED, NORMAL, ZERO_PLAIN, ZERO_ALLOC, COMPRESSED, UNALLOCATED_ALLOC = range(6)

# Extended L2 entries: a descriptor and a 64-bit subcluster bitmap (bits 0-31
# allocated, 32-63 reads as zeros), 32 subclusters per cluster.
SUBCLUSTERS = 32
L2_BITMAP_ALL_ALLOC = (1 << SUBCLUSTERS) - 1
L2_BITMAP_ALL_ZEROES = L2_BITMAP_ALL_ALLOC << SUBCLUSTERS

# Creation options: qemu-img's compat levels and the header version each means.
COMPAT_VERSIONS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}

# The feature-name table QEMU writes (type, bit, name).
FEATURE_NAMES: tuple[tuple[int, int, str], ...] = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)

_NEEDS_SWAP = sys.byteorder == "little"


def div_round_up(a: int, b: int) -> int:
    """Ceiling division for non-negative integers."""
    return -(-a // b)


def align_up(value: int, alignment: int) -> int:
    """Round *value* up to a multiple of *alignment* (a power of two)."""
    return (value + alignment - 1) & ~(alignment - 1)


def table_from_bytes(data: bytes | bytearray | memoryview) -> array:
    """Parse a big-endian table of u64 entries (L1, L2, refcount table) into ``array('Q')``."""
    table = array("Q")
    table.frombytes(data)
    if _NEEDS_SWAP:
        table.byteswap()
    return table


class ExtendedL2Table(array):
    """An extended L2 table: the descriptors (this ``array('Q')``, indexed as a standard
    table is) and their subcluster bitmaps (``bitmaps``, the same length).

    Slices and copies of an ``array`` subclass are plain arrays: copy one with
    :func:`copy_l2_table`.
    """

    bitmaps: array

    def __new__(cls, descriptors: Any, bitmaps: Any) -> ExtendedL2Table:
        table = super().__new__(cls, "Q", descriptors)
        table.bitmaps = array("Q", bitmaps)
        return table


def l2_table_from_bytes(data: bytes | bytearray | memoryview, extended: bool) -> array:
    """An L2 table from its cluster: ``array('Q')``, or :class:`ExtendedL2Table`."""
    table = table_from_bytes(data)
    if not extended:
        return table
    return ExtendedL2Table(table[0::2], table[1::2])


def l2_table_to_bytes(table: array) -> bytes:
    """An L2 table's cluster (descriptors and bitmaps interleaved when extended)."""
    if not isinstance(table, ExtendedL2Table):
        return table_to_bytes(table)
    both = array("Q", bytes(16 * len(table)))
    both[0::2] = table
    both[1::2] = table.bitmaps
    return table_to_bytes(both)


def copy_l2_table(table: array) -> array:
    """A copy of an L2 table, bitmaps included."""
    if isinstance(table, ExtendedL2Table):
        return ExtendedL2Table(table, table.bitmaps)
    return table[:]


def subcluster_runs(entry: int, bitmap: int) -> list[tuple[int, int, int]] | None:
    """QEMU's ``qcow2_get_subcluster_type`` over a whole cluster: the runs
    (kind, first subcluster, end) of an extended L2 entry that is not compressed, or
    None when the bitmap is invalid (a subcluster both allocated and zero, or
    allocated subclusters in a cluster without a host offset)."""
    if bitmap & (bitmap >> SUBCLUSTERS) & L2_BITMAP_ALL_ALLOC:
        return None
    alloc = bitmap & L2_BITMAP_ALL_ALLOC
    zero = bitmap >> SUBCLUSTERS
    if entry & L2E_OFFSET_MASK:
        if alloc == L2_BITMAP_ALL_ALLOC:
            return [(NORMAL, 0, SUBCLUSTERS)]
        kinds = [ZERO_ALLOC if zero >> i & 1 else NORMAL if alloc >> i & 1 else UNALLOCATED_ALLOC
                 for i in range(SUBCLUSTERS)]
    else:
        if alloc:
            return None
        if not zero:
            return [(UNALLOCATED, 0, SUBCLUSTERS)]
        kinds = [ZERO_PLAIN if zero >> i & 1 else UNALLOCATED for i in range(SUBCLUSTERS)]
    runs: list[tuple[int, int, int]] = []
    first = 0
    for i in range(1, SUBCLUSTERS + 1):
        if i == SUBCLUSTERS or kinds[i] != kinds[first]:
            runs.append((kinds[first], first, i))
            first = i
    return runs


def table_to_bytes(table: array) -> bytes:
    """Serialize an ``array('Q')`` as big-endian bytes."""
    if not _NEEDS_SWAP:
        return table.tobytes()
    copy = array("Q", table)
    copy.byteswap()
    return copy.tobytes()


@dataclass
class HeaderExtension:
    """One header extension, kept byte for byte (unknown ones are rewritten unchanged)."""

    magic: int
    data: bytes


@dataclass
class Header:
    """A parsed qcow2 header (version 2 or 3) with its extensions and backing file name."""

    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    crypt_method: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = HEADER_V3_WRITTEN_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    extra_header_bytes: bytes = b""  # fields beyond 112 bytes QEMU may not know, kept as is
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    extensions: list[HeaderExtension] = field(default_factory=list)  # unknown/kept ones
    backing_file_offset: int = 0
    backing_file_size: int = 0

    # Derived geometry -------------------------------------------------------
    @property
    def cluster_size(self) -> int:
        """Bytes per cluster."""
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        """True when L2 entries are 128-bit (subclusters)."""
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_bits(self) -> int:
        """log2 of the number of entries in one L2 table."""
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    @property
    def refcount_bits(self) -> int:
        """Width of one refcount entry in bits."""
        return 1 << self.refcount_order

    @property
    def refcount_block_bits(self) -> int:
        """log2 of the number of entries in one refcount block."""
        return self.cluster_bits + 3 - self.refcount_order

    @property
    def lazy_refcounts(self) -> bool:
        """Compatible bit 0."""
        return bool(self.compatible_features & COMPAT_LAZY_REFCOUNTS)

    @property
    def dirty(self) -> bool:
        """Incompatible bit 0: refcounts may be stale."""
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        """Incompatible bit 1: the image was found inconsistent."""
        return bool(self.incompatible_features & INCOMPAT_CORRUPT)

    def copy(self) -> Header:
        """A shallow copy (extensions list copied) for building a new header."""
        return replace(self, extensions=list(self.extensions))


def cluster_kind(entry: int) -> int:
    """The kind of cluster a standard L2 entry describes, from its flags and offset alone
    (the checks of an entry against the image are the caller's)."""
    if entry & QCOW_OFLAG_COMPRESSED:
        return COMPRESSED
    if entry & QCOW_OFLAG_ZERO:
        return ZERO_ALLOC if entry & L2E_OFFSET_MASK else ZERO_PLAIN
    return NORMAL if entry & L2E_OFFSET_MASK else UNALLOCATED


def with_copied(entry: int, refcount: int) -> int:
    """An L1 or L2 entry with OFLAG_COPIED as its cluster's *refcount* wants it: set
    exactly when the refcount is 1 (the cluster may be written in place)."""
    return entry | QCOW_OFLAG_COPIED if refcount == 1 else entry & ~QCOW_OFLAG_COPIED


def refcount_width_error(width: int) -> str | None:
    """Why *width* cannot be a refcount entry width (``refcount_bits``), or None."""
    if width <= 0 or width > 64 or width & (width - 1):
        return "Refcount width must be a power of two and may not exceed 64 bits"
    return None


def refcount_order_of(width: int) -> int:
    """The header's ``refcount_order`` for a valid refcount entry width in bits."""
    return width.bit_length() - 1


def compat_error(version: int, *, lazy_refcounts: bool, refcount_bits: int,
                 amend: bool = False) -> str | None:
    """What a header of *version* cannot hold of these options, or None.

    Version 2 (``compat=0.10``) has no compatible-feature bits and a fixed refcount
    order of 4.  The words are qemu-img's: ``amend`` adds a hint that ``create`` does not.
    """
    if version >= 3:
        return None
    if lazy_refcounts:
        return ("Lazy refcounts only supported with compatibility level 1.1 and above"
                + (" (use compat=1.1 or greater)" if amend else ""))
    if refcount_bits != 16:
        return ("Different refcount widths than 16 bits require compatibility level 1.1 or "
                "above" + (" (use version=v3 or greater)" if amend else ""))
    return None


def l1_entries_for(size: int, cluster_bits: int, l2_bits: int) -> int:
    """The minimum number of L1 entries that map *size* bytes."""
    return div_round_up(size, 1 << (cluster_bits + l2_bits))


def _ext_area_end(header_length: int, backing_offset: int, cluster_size: int) -> int:
    return backing_offset if backing_offset else cluster_size


def parse_header(buf: bytes, *, check_mode: bool = False) -> Header:
    """Parse and validate a header from *buf*, the first cluster of the file.

    *buf* may be shorter than a cluster when the file is (the caller reads
    ``min(cluster, file size)``).  Raises :class:`FormatError` or
    :class:`UnsupportedFeature` for anything QEMU refuses at open, with QEMU's wording
    and in the order of QEMU's ``qcow2_do_open``.  *check_mode* is QEMU's
    ``BDRV_O_CHECK``: an empty refcount table and a bad snapshot table pointer are
    left for the check to report, and so is a header length that is not a multiple
    of 8 (which we otherwise refuse, as the specification requires).
    """
    if len(buf) < HEADER_V2_LENGTH:
        raise FormatError("Image is not in qcow2 format (file too short)")
    (magic, version, backing_file_offset, backing_file_size, cluster_bits, size, crypt_method,
     l1_size, l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots,
     snapshots_offset) = HEADER_V2.unpack_from(buf, 0)
    if magic != QCOW_MAGIC:
        raise FormatError("Image is not in qcow2 format")
    if version not in (2, 3):
        raise UnsupportedFeature(f"Unsupported qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise FormatError(f"Unsupported cluster size: 2^{cluster_bits}")
    cluster_size = 1 << cluster_bits
    # QEMU counts the disk in 512-byte sectors (bs->total_sectors = size / 512): a size
    # that is not a multiple of 512 (no tool writes one) is cut down to one, and so it
    # is written back by the next header update, as qcow2_update_header does.
    size -= size % 512
    hdr = Header(version=version, cluster_bits=cluster_bits, size=size, l1_size=l1_size,
                 l1_table_offset=l1_table_offset, refcount_table_offset=refcount_table_offset,
                 refcount_table_clusters=refcount_table_clusters, nb_snapshots=nb_snapshots,
                 snapshots_offset=snapshots_offset, crypt_method=crypt_method,
                 backing_file_offset=backing_file_offset, backing_file_size=backing_file_size)
    if version == 2:
        hdr.header_length = HEADER_V2_LENGTH
        hdr.refcount_order = 4
    else:
        if len(buf) < HEADER_V3_LENGTH:
            raise FormatError("qcow2 header too short")
        (hdr.incompatible_features, hdr.compatible_features, hdr.autoclear_features,
         hdr.refcount_order, hdr.header_length) = HEADER_V3_EXTRA.unpack_from(buf, 72)
        if hdr.header_length < HEADER_V3_LENGTH:
            raise FormatError("qcow2 header too short")
        if hdr.header_length > cluster_size or hdr.header_length > len(buf):
            raise FormatError("qcow2 header exceeds cluster size")
        if hdr.header_length % 8 and not check_mode:  # stricter than QEMU 7.2
            raise FormatError("qcow2 header length must be a multiple of 8")
        if hdr.header_length > 104:
            hdr.compression_type = buf[104]
        if hdr.header_length > HEADER_V3_WRITTEN_LENGTH:
            hdr.extra_header_bytes = bytes(buf[HEADER_V3_WRITTEN_LENGTH:hdr.header_length])
    if backing_file_offset > cluster_size:
        raise FormatError("Invalid backing file offset")
    _validate(hdr, buf, check_mode)
    _parse_extensions(hdr, buf, cluster_size)
    if backing_file_offset:
        if backing_file_size > MAX_BACKING_NAME or backing_file_size > cluster_size - backing_file_offset:
            raise FormatError("Backing file name too long")
        raw = bytes(buf[backing_file_offset:backing_file_offset + backing_file_size])
        # Read like QEMU: zeros past the end of the file, and a C string.
        raw = raw.split(b"\0", 1)[0]
        hdr.backing_file = raw.decode("utf-8", errors="surrogateescape")
    return hdr


def _parse_extensions(hdr: Header, buf: bytes, cluster_size: int, *, strict: bool = True) -> None:
    offset = hdr.header_length
    end = _ext_area_end(hdr.header_length, hdr.backing_file_offset, cluster_size)
    end = min(end, cluster_size, len(buf))
    seen: set[int] = set()
    while True:
        if offset + 8 > end:
            if offset == end:
                return  # the area is full and has no end marker: accepted like QEMU
            raise FormatError("Header extension too large")
        magic, length = struct.unpack_from(">II", buf, offset)
        offset += 8
        if length > end - offset:  # checked before the end marker, as QEMU does
            raise FormatError("Header extension too large")
        if magic == EXT_END:
            return
        data = bytes(buf[offset:offset + length])
        offset += align_up(length, 8)
        if magic in seen and strict:  # stricter than QEMU: which one would count?
            raise FormatError(f"Duplicate header extension {magic:#x}")
        seen.add(magic)
        if magic == EXT_BACKING_FORMAT:
            if length >= 16:
                raise FormatError(f"ERROR: ext_backing_format: len={length} too large (>=16)")
            hdr.backing_format = data.split(b"\0", 1)[0].decode("ascii", errors="replace")
        elif magic == EXT_DATA_FILE:
            hdr.data_file = data.split(b"\0", 1)[0].decode("utf-8", errors="surrogateescape")
        else:
            if strict:
                _check_extension(hdr, magic, data)
            hdr.extensions.append(HeaderExtension(magic, data))


def _check_extension(hdr: Header, magic: int, data: bytes) -> None:
    """What qcow2_read_extensions() refuses in the crypto and bitmaps extensions."""
    if magic == EXT_CRYPTO:
        _check_crypto_extension(hdr, data)
    if magic != EXT_BITMAPS:
        return
    if len(data) != BITMAPS_EXT.size:
        raise FormatError("bitmaps_ext: Invalid extension length")
    if not hdr.autoclear_features & AUTOCLEAR_BITMAPS:
        return  # QEMU warns that the bitmaps are inconsistent, and ignores them
    ext = BitmapsExtension.parse(data)
    if ext.reserved:
        raise FormatError("bitmaps_ext: Reserved field is not zero")
    if ext.count > MAX_BITMAPS:
        raise FormatError(f"bitmaps_ext: Image has {ext.count} bitmaps, exceeding the QEMU "
                          f"supported maximum of {MAX_BITMAPS}")
    if not ext.count:
        raise FormatError("found bitmaps extension with zero bitmaps")
    if ext.directory_offset % hdr.cluster_size:
        raise FormatError("bitmaps_ext: invalid bitmap directory offset")
    if ext.directory_size > MAX_BITMAP_DIRECTORY_SIZE:
        raise FormatError(f"bitmaps_ext: bitmap directory size ({ext.directory_size}) exceeds "
                          f"the maximum supported size ({MAX_BITMAP_DIRECTORY_SIZE})")


def _check_crypto_extension(hdr: Header, data: bytes) -> None:
    """What ``qcow2_read_extensions()`` refuses in a crypto header extension, in its
    order: not a LUKS image, a length other than 16, an offset that is not a multiple
    of the cluster size.  (QEMU does not check that the area lies inside the file: it
    reads zeros past the end, and then finds no LUKS header there.)"""
    if hdr.crypt_method != CRYPT_LUKS:
        raise FormatError("CRYPTO header extension only expected with LUKS encryption method")
    if len(data) != CRYPTO_EXT.size:
        raise FormatError(f"CRYPTO header extension size {len(data)}, but expected size "
                          f"{CRYPTO_EXT.size}")
    offset = CRYPTO_EXT.unpack(data)[0]
    if offset % hdr.cluster_size:
        raise FormatError(f"Encryption header offset '{offset}' is not a multiple of "
                          f"cluster size '{hdr.cluster_size}'")


def feature_name(hdr: Header, kind: int, bit: int) -> str | None:
    """The name of feature (*kind*, *bit*) from the image's feature-name table, if any."""
    for ext in hdr.extensions:
        if ext.magic != EXT_FEATURE_TABLE:
            continue
        for pos in range(0, len(ext.data) - 47, 48):
            if ext.data[pos] == kind and ext.data[pos + 1] == bit:
                return ext.data[pos + 2:pos + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
    return None


def _unknown_feature_names(hdr: Header, buf: bytes, unknown: int) -> list[str]:
    """report_unsupported_feature(): names from the image's feature-name table, if any,
    then one "Unknown incompatible feature" for the bits it does not name."""
    probe = hdr.copy()
    probe.extensions = []
    try:
        _parse_extensions(probe, buf, hdr.cluster_size, strict=False)
    except FormatError:
        pass  # QEMU reads the table on a best-effort basis here
    names = []
    for bit in range(64):
        if unknown & (1 << bit):
            name = feature_name(probe, 0, bit)
            if name:
                names.append(name)
                unknown &= ~(1 << bit)
    if unknown:
        names.append(f"Unknown incompatible feature: {unknown:x}")
    return names


def _validate_table(offset: int, entries: int, entry_len: int, max_bytes: int, name: str,
                    cluster_size: int) -> None:
    """qcow2_validate_table(): size limit, then an aligned offset that fits in an int64."""
    if entries > max_bytes // entry_len:
        raise FormatError(f"{name} too large")
    if (1 << 63) - 1 - entries * entry_len < offset or offset % cluster_size:
        raise FormatError(f"{name} offset invalid")


def _validate(hdr: Header, buf: bytes, check_mode: bool = False) -> None:
    """The checks of QEMU's qcow2_do_open, in its order (messages are QEMU's)."""
    cs = hdr.cluster_size
    if hdr.compression_type not in COMPRESSION_NAMES:
        raise UnsupportedFeature(f"qcow2: unknown compression type: {hdr.compression_type}")
    has_bit = bool(hdr.incompatible_features & INCOMPAT_COMPRESSION)
    if hdr.compression_type != COMPRESSION_ZLIB and not has_bit:
        raise FormatError("qcow2: Compression type incompatible feature bit must be set")
    if hdr.compression_type == COMPRESSION_ZLIB and has_bit:
        raise FormatError("qcow2: Compression type incompatible feature bit must not be set")
    unknown = hdr.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        names = _unknown_feature_names(hdr, buf, unknown)
        raise UnsupportedFeature("Unsupported qcow2 feature(s): " + ", ".join(names))
    if hdr.refcount_order > MAX_REFCOUNT_ORDER:
        raise FormatError("Reference count entry width too large; may not exceed 64 bits")
    if hdr.version == 2 and hdr.refcount_order != 4:
        raise FormatError("Different refcount widths than 16 bits require compatibility level 1.1")
    if hdr.crypt_method > CRYPT_LUKS:  # (1 and 2: qcow2rw.crypto, after the extensions)
        raise FormatError(f"Unsupported encryption method {hdr.crypt_method}")
    if hdr.extended_l2 and hdr.cluster_bits < 14:
        raise FormatError(f"Unsupported subcluster size: {cs // 32}")
    if hdr.refcount_table_clusters == 0 and not check_mode:
        raise FormatError("Image does not contain a reference count table")
    _validate_table(hdr.refcount_table_offset, hdr.refcount_table_clusters, cs,
                    MAX_REFTABLE_SIZE, "Reference count table", cs)
    if not check_mode:
        _validate_table(hdr.snapshots_offset, hdr.nb_snapshots, SNAPSHOT_HEADER.size,
                        SNAPSHOT_HEADER.size * MAX_SNAPSHOTS, "Snapshot table", cs)
    _validate_table(hdr.l1_table_offset, hdr.l1_size, 8, MAX_L1_SIZE, "Active L1 table", cs)
    if hdr.l1_table_offset > L1E_OFFSET_MASK:  # stricter: no L1 entry could point there
        raise FormatError("Active L1 table offset invalid")
    needed = l1_entries_for(hdr.size, hdr.cluster_bits, hdr.l2_bits)
    if needed > 0x7FFFFFFF or hdr.size > MAX_VIRTUAL_SIZE:
        raise FormatError("Image is too big")
    if hdr.l1_size < needed:
        raise FormatError("L1 table is too small")


def _feature_table_bytes() -> bytes:
    out = bytearray()
    for kind, bit, name in FEATURE_NAMES:
        out += struct.pack(">BB46s", kind, bit, name.encode())
    return bytes(out)


def _pack_extension(magic: int, data: bytes) -> bytes:
    return struct.pack(">II", magic, len(data)) + data + b"\0" * (align_up(len(data), 8) - len(data))


def serialize_header(hdr: Header) -> bytes:
    """Serialize *hdr* (fields, extensions, backing name) as QEMU lays it out.

    Sets ``hdr.backing_file_offset``/``backing_file_size`` and, for v3,
    ``header_length`` (112, or longer when unknown trailing fields are kept).
    Raises :class:`FormatError` when it does not fit in one cluster.
    """
    cs = hdr.cluster_size
    if hdr.version == 3:
        hdr.header_length = HEADER_V3_WRITTEN_LENGTH + len(hdr.extra_header_bytes)
    else:
        hdr.header_length = HEADER_V2_LENGTH
    exts = bytearray()
    if hdr.backing_format:
        exts += _pack_extension(EXT_BACKING_FORMAT, hdr.backing_format.encode())
    if hdr.data_file:
        exts += _pack_extension(EXT_DATA_FILE, hdr.data_file.encode("utf-8", "surrogateescape"))
    wrote_table = False
    for ext in hdr.extensions:
        if ext.magic == EXT_FEATURE_TABLE:
            if hdr.version == 3 and not wrote_table:
                exts += _pack_extension(EXT_FEATURE_TABLE, _feature_table_bytes())
                wrote_table = True
            continue
        exts += _pack_extension(ext.magic, ext.data)
    if hdr.version == 3 and not wrote_table and cs > 4096:
        # QEMU writes the table right after backing format/data file; order is not significant.
        exts += _pack_extension(EXT_FEATURE_TABLE, _feature_table_bytes())
    exts += struct.pack(">II", EXT_END, 0)
    name = b""
    if hdr.backing_file:
        name = hdr.backing_file.encode("utf-8", "surrogateescape")
        if len(name) > MAX_BACKING_NAME:
            raise FormatError("Backing file name too long")
    hdr.backing_file_offset = hdr.header_length + len(exts) if name else 0
    hdr.backing_file_size = len(name)
    fixed = HEADER_V2.pack(QCOW_MAGIC, hdr.version, hdr.backing_file_offset, hdr.backing_file_size,
                           hdr.cluster_bits, hdr.size, hdr.crypt_method, hdr.l1_size,
                           hdr.l1_table_offset, hdr.refcount_table_offset,
                           hdr.refcount_table_clusters, hdr.nb_snapshots, hdr.snapshots_offset)
    if hdr.version == 3:
        fixed += HEADER_V3_EXTRA.pack(hdr.incompatible_features, hdr.compatible_features,
                                      hdr.autoclear_features, hdr.refcount_order, hdr.header_length)
        fixed += struct.pack(">B7x", hdr.compression_type) + hdr.extra_header_bytes
    out = fixed + bytes(exts) + name
    if len(out) > cs:
        raise FormatError("Header and extensions do not fit in the first cluster")
    return out


# Persistent bitmaps: the bitmaps extension and the bitmap directory -------

BITMAPS_EXT = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, directory size, directory offset
BITMAP_DIR_ENTRY = struct.Struct(">QIIBBHI")  # 24 bytes, then extra data and the name
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_SIZE = 64 * 1024 * 1024  # QEMU's QCOW2_MAX_BITMAP_DIRECTORY_SIZE
BITMAP_FLAG_IN_USE = 1 << 0
BITMAP_FLAG_AUTO = 1 << 1
# Bitmap table entries.
BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_RESERVED_MASK = 0xFF000000000001FE
BME_FLAG_ALL_ONES = 1


@dataclass(frozen=True)
class BitmapsExtension:
    """The bitmaps header extension (QEMU's Qcow2BitmapHeaderExt)."""

    count: int
    reserved: int
    directory_size: int
    directory_offset: int

    @classmethod
    def parse(cls, data: bytes) -> BitmapsExtension:
        """The fields of an extension of at least 24 bytes."""
        return cls(*BITMAPS_EXT.unpack_from(data, 0))


def bitmaps_extension(hdr: Header, *, consistent: bool = True) -> BitmapsExtension | None:
    """The header's bitmaps extension, or None when it has none of at least 24 bytes.

    With *consistent*, also None when the autoclear bit is clear: another program
    changed the image without updating the bitmaps, and QEMU ignores them.
    """
    if consistent and not hdr.autoclear_features & AUTOCLEAR_BITMAPS:
        return None
    ext = next((e for e in hdr.extensions if e.magic == EXT_BITMAPS), None)
    if ext is None or len(ext.data) < BITMAPS_EXT.size:
        return None
    return BitmapsExtension.parse(ext.data)


@dataclass(frozen=True)
class BitmapDirEntry:
    """One entry of the bitmap directory."""

    table_offset: int
    table_size: int  # entries of the bitmap table
    flags: int
    bitmap_type: int
    granularity_bits: int
    name: str
    extra_data_size: int = 0
    position: int = 0  # byte offset of the entry in the directory


def parse_bitmap_directory(buf: bytes, count: int) -> list[BitmapDirEntry]:
    """The first *count* entries of the bitmap directory *buf* (entries 8-aligned).

    Raises :class:`FormatError` when an entry's fixed part runs past the buffer.
    """
    out = []
    pos = 0
    for _ in range(count):
        pos_entry = pos
        if pos + BITMAP_DIR_ENTRY.size > len(buf):
            raise FormatError("Bitmap directory runs past its end")
        (table_offset, table_size, flags, bitmap_type, granularity_bits, name_size,
         extra) = BITMAP_DIR_ENTRY.unpack_from(buf, pos)
        start = pos + BITMAP_DIR_ENTRY.size + extra
        name = bytes(buf[start:start + name_size]).decode("utf-8", "replace")
        pos = align_up(start + name_size, 8)
        out.append(BitmapDirEntry(table_offset, table_size, flags, bitmap_type,
                                  granularity_bits, name, extra, pos_entry))
    return out


# Internal snapshots: the snapshot table -----------------------------------

SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")  # 40 bytes (QEMU's QCowSnapshotHeader)
SNAPSHOT_EXTRA = struct.Struct(">QQq")  # vm_state_size_large, disk_size, icount
MAX_SNAPSHOT_EXTRA_DATA = 1024
MAX_SNAPSHOTS_SIZE = 1024 * 65536  # bytes (QEMU's QCOW_MAX_SNAPSHOTS_SIZE)


@dataclass
class Snapshot:
    """One entry of the snapshot table."""

    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    disk_size: int | None = None
    icount: int = -1
    extra_data: bytes = b""  # the raw extra data (kept beyond the fields we know)

    def info(self) -> dict[str, object]:
        """This snapshot as ``qemu-img info --output=json`` shows it."""
        out: dict[str, object] = {
            "id": self.id_str, "name": self.name, "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec, "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
        }
        if self.icount != -1:
            out["icount"] = self.icount
        return out


def _snapshot_from(fields: tuple[int, ...], extra: bytes, id_raw: bytes,
                   name_raw: bytes) -> Snapshot:
    l1_offset, l1_size, _, _, date_sec, date_nsec, vm_clock, vm_state, _ = fields
    snap = Snapshot(l1_table_offset=l1_offset, l1_size=l1_size,
                    id_str=id_raw.decode("utf-8", "replace"),
                    name=name_raw.decode("utf-8", "replace"), date_sec=date_sec,
                    date_nsec=date_nsec, vm_clock_nsec=vm_clock, vm_state_size=vm_state,
                    extra_data=extra)
    if len(extra) >= 8:
        snap.vm_state_size = struct.unpack_from(">Q", extra, 0)[0]
    if len(extra) >= 16:
        snap.disk_size = struct.unpack_from(">Q", extra, 8)[0]
    if len(extra) >= 24:
        snap.icount = struct.unpack_from(">q", extra, 16)[0]
    return snap


def read_snapshot_table(read: Callable[[int, int], bytes], count: int, *,
                        cut_extra: bool = False,
                        dropped: list[str] | None = None) -> tuple[list[Snapshot], list[int], int]:
    """Read *count* snapshot table entries through ``read(position in table, length)``.

    Returns the snapshots, the extra-data size each entry stores, and the table's
    length in bytes as it lies on disk (no tail padding).  An entry with more than
    1024 bytes of extra data raises :class:`FormatError`, or with *cut_extra* keeps
    the first 1024 (QEMU's message for each goes to *dropped*); so does a table over
    QEMU's size limit (counted with the extra data cut).  *read* may raise too.
    """
    if count > MAX_SNAPSHOTS:
        raise FormatError("Too many snapshots")
    snapshots: list[Snapshot] = []
    extra_sizes: list[int] = []
    pos = 0  # where the next entry starts, relative to the table
    length = 0  # the table's length with extra data cut to 1024 bytes (QEMU's limit)
    for index in range(count):
        pos = align_up(pos, 8)
        length = align_up(length, 8)
        fields = SNAPSHOT_HEADER.unpack(read(pos, SNAPSHOT_HEADER.size))
        id_len, name_len, extra_len = fields[2], fields[3], fields[8]
        if extra_len > MAX_SNAPSHOT_EXTRA_DATA:
            if not cut_extra:
                raise FormatError(f"Too much extra metadata in snapshot table entry {index}")
            if dropped is not None:
                dropped.append(f"Discarding too much extra metadata in snapshot table entry "
                               f"{index} ({extra_len} > {MAX_SNAPSHOT_EXTRA_DATA})")
        kept = min(extra_len, MAX_SNAPSHOT_EXTRA_DATA)
        pos += SNAPSHOT_HEADER.size
        extra = read(pos, kept)
        pos += extra_len
        names = read(pos, id_len + name_len)
        pos += id_len + name_len
        length += SNAPSHOT_HEADER.size + kept + id_len + name_len
        if length > MAX_SNAPSHOTS_SIZE or pos > (1 << 31) - 1:
            raise FormatError("Snapshot table is too big")
        snapshots.append(_snapshot_from(fields, bytes(extra), bytes(names[:id_len]),
                                        bytes(names[id_len:])))
        extra_sizes.append(extra_len)
    return snapshots, extra_sizes, pos


def parse_snapshot_table(buf: bytes, count: int) -> list[Snapshot]:
    """Parse *count* snapshot entries from *buf* (the table's bytes, or more)."""
    if count > MAX_SNAPSHOTS:
        raise FormatError("Snapshot table too large")

    def read(pos: int, length: int) -> bytes:
        if pos + length > len(buf):
            raise FormatError("Snapshot table runs past its end")
        return buf[pos:pos + length]

    return read_snapshot_table(read, count)[0]


def serialize_snapshot_table(snapshots: list[Snapshot]) -> bytes:
    """Serialize the table as QEMU writes it (24 bytes of extra data per entry)."""
    out = bytearray()
    for snap in snapshots:
        extra = bytearray(snap.extra_data)
        if len(extra) < SNAPSHOT_EXTRA.size:
            extra += bytes(SNAPSHOT_EXTRA.size - len(extra))
        disk = snap.disk_size if snap.disk_size is not None else 0
        SNAPSHOT_EXTRA.pack_into(extra, 0, snap.vm_state_size, disk, snap.icount)
        id_raw, name_raw = snap.id_str.encode(), snap.name.encode()
        out += SNAPSHOT_HEADER.pack(snap.l1_table_offset, snap.l1_size, len(id_raw), len(name_raw),
                                    snap.date_sec, snap.date_nsec, snap.vm_clock_nsec,
                                    min(snap.vm_state_size, 0xFFFFFFFF), len(extra))
        out += extra + id_raw + name_raw
        out += bytes(align_up(len(out), 8) - len(out))
    return bytes(out)


def snapshot_table_length(snapshots: list[Snapshot]) -> int:
    """The bytes *snapshots* occupy as a table, each with the extra data it holds (no
    tail padding): the on-disk length of a table as read, without reading it."""
    length = 0
    for snap in snapshots:
        length = align_up(length, 8)
        length += SNAPSHOT_HEADER.size + len(snap.extra_data) + len(snap.id_str.encode())
        length += len(snap.name.encode())
    return length


# Compressed-cluster descriptors --------------------------------------------

def compressed_geometry(cluster_bits: int) -> tuple[int, int, int]:
    """(csize_shift, offset_mask, csize_mask) for compressed L2 descriptors."""
    shift = 62 - (cluster_bits - 8)
    return shift, (1 << shift) - 1, (1 << (cluster_bits - 8)) - 1


def decode_compressed(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host byte offset, bytes to read) for a compressed L2 entry."""
    shift, offset_mask, csize_mask = compressed_geometry(cluster_bits)
    host = entry & offset_mask
    sectors = ((entry >> shift) & csize_mask) + 1
    return host, sectors * 512 - (host & 511)


def compressed_host_range(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(start, length) of the 512-byte-aligned host range a compressed cluster occupies."""
    shift, offset_mask, csize_mask = compressed_geometry(cluster_bits)
    start = (entry & offset_mask) & ~511
    return start, (((entry >> shift) & csize_mask) + 1) * 512


def encode_compressed(host: int, length: int, cluster_bits: int) -> int:
    """The L2 entry for *length* compressed bytes stored at byte offset *host*."""
    shift, offset_mask, csize_mask = compressed_geometry(cluster_bits)
    sectors = ((host + length - 1) >> 9) - (host >> 9)
    if host & ~offset_mask or sectors > csize_mask:
        raise FormatError("compressed cluster descriptor out of range")
    return QCOW_OFLAG_COMPRESSED | (sectors << shift) | host
