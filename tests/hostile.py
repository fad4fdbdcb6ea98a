"""Hostile qcow2 images: bases made by qemu-img/qemu-io, damaged byte by byte.

``build_bases(qemu, dir)`` makes a few small images with QEMU's own tools (their
layout is read back from their headers, never assumed); every :class:`Mutation`
patches one copy of a base (``make(dir)``) and names the class of outcome we promise
for it (``expect``), as iotests 036/060/080/108/112/138/214/220/261 do with
``poke_file``.

Run as a script, this module is the *worker* the tests start in a subprocess with
an address-space limit: ``python tests/hostile.py LIMIT_MB IMG...`` runs, for each
image, the fixed sequence of operations of :func:`run_ops` and prints one JSON line
per image.  Outcome classes (``observe``):

- ``refused:<Error>``   the open (read-only and read-write) fails with that error;
                        (``open_meta`` records the metadata-only open, as ``info``'s);
- ``corrupt-read``      opens, a read fails with CorruptImage;
- ``corrupt-write``     reads are served, a write fails with CorruptImage and the
                        corrupt bit is set on disk (reads may still work afterwards);
- ``error-read:<E>`` / ``error-write:<E>``  another qcow2rw error on that request;
- ``rw-refused:<E>``    opens read-only and is served, a read-write open fails;
- ``served``            every request is served.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

KiB = 1024
MiB = 1024 * KiB
CS = 64 * KiB
L2_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62

# Guest ranges the worker reads and writes (all inside every base's virtual disk).
READS = ((0, 3 * CS), (1 * MiB, CS), (512 * MiB, CS), (768 * MiB, CS))
WRITES = ((0, 4096), (300 * MiB, 4096), (CS + 512, 3000), (1 * MiB, CS),
          (512 * MiB + 7, 5000), (700 * MiB, 2 * CS))


# --------------------------------------------------------------------------- bases
@dataclass
class Layout:
    """Offsets read back from one base image."""

    path: Path
    cluster_size: int
    l1: int              # active L1 table offset
    l1_size: int
    reftable: int
    refblock: int        # first refcount block
    l2: int              # L2 table of L1 index 0
    l2b: int             # L2 table of L1 index 1 (guest 512 MiB..1 GiB), 0 if none
    data: int            # host offset of guest cluster 0
    snapshots: int       # snapshot table offset (0 if none)
    snap_l1: int         # first snapshot's L1 table offset (0 if none)
    header_length: int
    ext_start: int       # first header extension
    raw: bytes


def u64(buf: bytes, off: int) -> int:
    return struct.unpack_from(">Q", buf, off)[0]


def read_layout(path: Path) -> Layout:
    raw = path.read_bytes()
    cs = 1 << struct.unpack_from(">I", raw, 20)[0]
    l1_size = struct.unpack_from(">I", raw, 36)[0]
    l1, reftable = u64(raw, 40), u64(raw, 48)
    nb_snap, snapshots = struct.unpack_from(">IQ", raw, 60)
    version = struct.unpack_from(">I", raw, 4)[0]
    header_length = struct.unpack_from(">I", raw, 100)[0] if version >= 3 else 72
    l2 = u64(raw, l1) & L2_MASK
    l2b = u64(raw, l1 + 8) & L2_MASK if l1_size > 1 else 0
    data = u64(raw, l2) & L2_MASK if l2 else 0
    snap_l1 = u64(raw, snapshots) if nb_snap else 0
    return Layout(path, cs, l1, l1_size, reftable, u64(raw, reftable) & ~0x1FF, l2, l2b, data,
                  snapshots if nb_snap else 0, snap_l1, header_length, header_length, raw)


def _io(qemu: Any, path: Path, *cmds: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for cmd in cmds:
        args += ["-c", cmd]
    subprocess.run(args + [str(path)], check=True, capture_output=True)


def _create(path: Path, *opts: str, size: str = "1G") -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(path), size],
                   check=True, capture_output=True)


def build_bases(qemu: Any, where: Path) -> dict[str, Layout]:
    """The base images (1 GiB virtual, 64 KiB clusters, two L2 tables), made by QEMU."""
    where.mkdir(parents=True, exist_ok=True)
    writes = ("write -P 0x11 0 128k", "write -P 0x22 1M 64k", "write -P 0x33 512M 64k")
    out = {}
    plain = where / "plain.qcow2"
    _create(plain)
    _io(qemu, plain, *writes)
    out["plain"] = plain
    v2 = where / "v2.qcow2"
    _create(v2, "-o", "compat=0.10")
    _io(qemu, v2, *writes)
    out["v2"] = v2
    snap = where / "snap.qcow2"
    shutil.copy(plain, snap)
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(snap)], check=True,
                   capture_output=True)
    _io(qemu, snap, "write -P 0x44 0 64k")
    out["snap"] = snap
    comp = where / "comp.qcow2"
    _create(comp)
    _io(qemu, comp, "write -c -P 0x55 0 64k", "write -c -P 0x66 64k 64k",
        "write -P 0x33 512M 64k")
    out["comp"] = comp
    backing = where / "backing.qcow2"
    _create(backing)
    _io(qemu, backing, *writes)
    overlay = where / "overlay.qcow2"
    _create(overlay, "-b", "backing.qcow2", "-F", "qcow2")
    _io(qemu, overlay, "write -P 0x77 0 4k", "write -P 0x33 512M 64k")
    out["overlay"] = overlay
    lazy = where / "lazy.qcow2"
    _create(lazy, "-o", "lazy_refcounts=on")
    _io(qemu, lazy, *writes)
    out["lazy"] = lazy
    extl2 = where / "extl2.qcow2"  # extended L2 entries: 2 KiB subclusters
    _create(extl2, "-o", "extended_l2=on")
    _io(qemu, extl2, "write -P 0x11 0 64k", "write -P 0x22 72k 2k", "write -c -P 0x44 128k 64k",
        "write -P 0x33 512M 64k")
    out["extl2"] = extl2
    return {name: read_layout(path) for name, path in out.items()}


# --------------------------------------------------------------------------- mutations
Patch = Callable[[bytearray, Layout], None]


@dataclass(frozen=True)
class Mutation:
    """One hostile image: a base, the bytes to patch, and the outcome we promise."""

    name: str
    base: str
    patch: Patch
    expect: str                      # outcome class (see module docstring)
    message: str = ""                # for refusals: part of the error message
    repair: str = "clean"            # after our check -r all, qemu-img check says: "clean"
    #                                  (exit 0); "qemu-too": not clean, and QEMU's own
    #                                  check -r all cannot repair a fresh copy either
    extra: Callable[[Path], None] | None = None  # makes companion files (backing loops)

    def make(self, bases: dict[str, Layout], where: Path) -> Path:
        layout = bases[self.base]
        buf = bytearray(layout.raw)
        self.patch(buf, layout)
        path = where / f"{self.name}.qcow2"
        path.write_bytes(bytes(buf))
        if self.extra is not None:
            self.extra(where)
        if self.base == "overlay":
            backing = layout.path.parent / "backing.qcow2"
            if not (where / "backing.qcow2").exists():
                shutil.copy(backing, where / "backing.qcow2")
        return path


def put(offset: int | Callable[[Layout], int], fmt: str, value: int | Callable[[Layout], int]) -> Patch:
    """A patch writing *value* (struct *fmt*) at *offset* (either may depend on the layout)."""
    def patch(buf: bytearray, lay: Layout) -> None:
        off = offset(lay) if callable(offset) else offset
        val = value(lay) if callable(value) else value
        if off + struct.calcsize(fmt) > len(buf):
            buf.extend(bytes(off + struct.calcsize(fmt) - len(buf)))
        struct.pack_into(fmt, buf, off, val)
    return patch


def both(*patches: Patch) -> Patch:
    def patch(buf: bytearray, lay: Layout) -> None:
        for p in patches:
            p(buf, lay)
    return patch


def set_ext(magic: int, data: bytes | Callable[[Layout], bytes]) -> Patch:
    """Insert a header extension first in the extension area (QEMU's bases have room)."""
    def patch(buf: bytearray, lay: Layout) -> None:
        start = lay.ext_start
        body_data = data(lay) if callable(data) else data
        body = struct.pack(">II", magic, len(body_data)) + body_data + bytes(-len(body_data) % 8)
        old_end = _ext_area_used(buf, lay)
        rest = bytes(buf[start:old_end])
        buf[start:start + len(body) + len(rest)] = body + rest
        backing_off = struct.unpack_from(">Q", buf, 8)[0]
        if backing_off:
            struct.pack_into(">Q", buf, 8, backing_off + len(body))
    return patch


def _ext_area_used(buf: bytearray, lay: Layout) -> int:
    """End of the extensions and backing name (what set_ext moves along)."""
    off = lay.ext_start
    while True:
        magic, length = struct.unpack_from(">II", buf, off)
        off += 8 + length + (-length % 8)
        if magic == 0:
            break
    backing_off, backing_size = struct.unpack_from(">QI", buf, 8)
    return max(off, backing_off + backing_size) if backing_off else off


def lambda_ext(fields: Callable[[Layout], tuple[int, int]]) -> Callable[[Layout], bytes]:
    """Crypto extension data (offset, length) that depends on the layout."""
    return lambda lay: struct.pack(">QQ", *fields(lay))


def feature_bit_named(bit: int, name: bytes) -> Patch:
    """Set incompatible bit *bit* and name it in a feature-name table of its own."""
    entry = struct.pack(">BB46s", 0, bit, name)
    return both(set_ext(0x6803F857, entry), put(72, ">Q", 1 << bit))


def backing_name(name: bytes) -> Patch:
    """Replace the overlay's backing name (same offset, new length)."""
    def patch(buf: bytearray, lay: Layout) -> None:
        off = struct.unpack_from(">Q", buf, 8)[0]
        buf[off:off + len(name)] = name
        struct.pack_into(">I", buf, 16, len(name))
    return patch


def ext_length(magic: int, length: int) -> Patch:
    """Change the length field of an existing header extension."""
    def patch(buf: bytearray, lay: Layout) -> None:
        off = lay.ext_start
        while True:
            found, old = struct.unpack_from(">II", buf, off)
            if found == magic:
                struct.pack_into(">I", buf, off + 4, length)
                return
            off += 8 + old + (-old % 8)
    return patch


def backing_format(fmt: bytes) -> Patch:
    """Replace the data of the overlay's backing-format extension (same length or less)."""
    def patch(buf: bytearray, lay: Layout) -> None:
        off = lay.ext_start
        while True:
            magic, length = struct.unpack_from(">II", buf, off)
            if magic == 0xE2792ACA:
                buf[off + 8:off + 8 + length] = fmt.ljust(length, b"\0")
                struct.pack_into(">I", buf, off + 4, len(fmt))
                return
            off += 8 + length + (-length % 8)
    return patch


def fill(offset: Callable[[Layout], int], length: int, byte: int) -> Patch:
    def patch(buf: bytearray, lay: Layout) -> None:
        off = offset(lay)
        buf[off:off + length] = bytes([byte]) * length
    return patch


def refcount_of(cluster_offset: Callable[[Layout], int], value: int) -> Patch:
    """Set the (16-bit) refcount of the cluster at a layout offset."""
    return put(lambda lay: lay.refblock + 2 * (cluster_offset(lay) // lay.cluster_size), ">H",
               value)


def l2e(index: int) -> Callable[[Layout], int]:
    return lambda lay: lay.l2 + 8 * index


def l2x(index: int, bitmap: bool = False) -> Callable[[Layout], int]:
    """An extended L2 entry's descriptor (or its subcluster bitmap)."""
    return lambda lay: lay.l2 + 16 * index + (8 if bitmap else 0)


def snapshot_entry(field_offset: int) -> Callable[[Layout], int]:
    return lambda lay: lay.snapshots + field_offset


def _loop_companion(where: Path) -> None:
    """b.qcow2: a copy of the overlay whose backing file is loop-a.qcow2 (A -> B -> A)."""
    src = where / "backing_loop_two.qcow2"
    buf = bytearray(src.read_bytes())
    off = struct.unpack_from(">Q", buf, 8)[0]
    name = b"backing_loop_two.qcow2"
    buf[off:off + len(name)] = name
    struct.pack_into(">I", buf, 16, len(name))
    (where / "bbbbbbbbbbbbbb.qcow2").write_bytes(bytes(buf))


def _compressed_oversize(buf: bytearray, lay: Layout) -> None:
    entry = u64(buf, lay.l2)
    shift = 62 - (16 - 8)
    struct.pack_into(">Q", buf, lay.l2, entry | (0xFF << shift))


def _compressed_far(buf: bytearray, lay: Layout) -> None:
    entry = u64(buf, lay.l2)
    shift = 62 - (16 - 8)
    size_bits = entry & ~((1 << shift) - 1)
    struct.pack_into(">Q", buf, lay.l2, size_bits | (1 << 40))


def _compressed_on_header(buf: bytearray, lay: Layout) -> None:
    entry = u64(buf, lay.l2)
    shift = 62 - (16 - 8)
    struct.pack_into(">Q", buf, lay.l2, entry & ~((1 << shift) - 1) | 0x10)


M = Mutation
MUTATIONS: tuple[Mutation, ...] = (
    # ---- header: fixed fields (080, 036, 112) ---------------------------------------
    M("magic", "plain", put(0, ">I", 0x514649FC), "refused:FormatError", "not in qcow2 format"),
    M("version_1", "plain", put(4, ">I", 1), "refused:UnsupportedFeature", "version 1"),
    M("version_4", "plain", put(4, ">I", 4), "refused:UnsupportedFeature", "version 4"),
    M("cluster_bits_8", "plain", put(20, ">I", 8), "refused:FormatError", "cluster size"),
    M("cluster_bits_22", "plain", put(20, ">I", 22), "refused:FormatError", "cluster size"),
    M("cluster_bits_huge", "plain", put(20, ">I", 0xFFFFFFFF), "refused:FormatError",
      "cluster size"),
    M("header_length_short", "plain", put(100, ">I", 100), "refused:FormatError", "too short"),
    M("header_length_past_cluster", "plain", put(100, ">I", 0x20000), "refused:FormatError",
      "exceeds cluster size"),
    M("header_length_unaligned", "plain", put(100, ">I", 105), "refused:FormatError",
      "multiple of 8"),
    M("size_huge", "plain", put(24, ">Q", 1 << 62), "refused:FormatError", "Image is too big"),
    M("size_max", "plain", put(24, ">Q", (1 << 64) - 1), "refused:FormatError", "too big"),
    M("l1_size_huge", "plain", put(36, ">I", 0x10000000), "refused:FormatError",
      "Active L1 table too large"),
    M("l1_size_zero", "plain", put(36, ">I", 0), "refused:FormatError", "L1 table is too small"),
    M("l1_offset_unaligned", "plain", put(40, ">Q", lambda lay: lay.l1 + 512),
      "refused:FormatError", "Active L1 table offset invalid"),
    M("l1_offset_huge", "plain", put(40, ">Q", 1 << 63), "refused:FormatError",
      "Active L1 table offset invalid"),
    # A table past the end of the file reads as zeros (QEMU's way) when read-only;
    # a read-write open is refused (allocations would land on metadata).
    M("l1_offset_past_eof", "plain", put(40, ">Q", 1 << 40), "rw-refused:FormatError"),
    M("reftable_offset_unaligned", "plain", put(48, ">Q", lambda lay: lay.reftable + 8),
      "refused:FormatError", "Reference count table offset invalid"),
    M("reftable_offset_huge", "plain", put(48, ">Q", (1 << 63) - 512 * 128),
      "refused:FormatError", "Reference count table offset invalid"),
    M("reftable_clusters_zero", "plain", put(56, ">I", 0), "refused:FormatError",
      "does not contain a reference count table"),
    M("reftable_clusters_huge", "plain", put(56, ">I", 0x1000000), "refused:FormatError",
      "Reference count table too large"),
    M("reftable_offset_past_eof", "plain", put(48, ">Q", 1 << 40), "rw-refused:FormatError"),
    M("nb_snapshots_huge", "plain", put(60, ">I", 0x7FFFFFFF), "refused:FormatError",
      "Snapshot table too large"),
    M("snapshots_offset_unaligned", "plain", put(64, ">Q", 12345), "refused:FormatError",
      "Snapshot table offset invalid"),
    M("snapshots_offset_huge", "snap", put(64, ">Q", (1 << 63) - CS), "refused:FormatError",
      "Snapshot table"),
    # Encryption (issue 15 §4): no key, so no open for data; tests/test_encrypted.py
    # compares the metadata-only opens with qemu-img's, message for message.
    M("crypt_aes", "plain", put(32, ">I", 1), "refused:EncryptedImage",
      "Parameter 'encrypt.key-secret' is required for cipher"),
    M("crypt_luks", "plain", put(32, ">I", 2), "refused:FormatError",
      "Missing CRYPTO header for crypt method 2"),
    M("crypt_aes_with_crypto_ext", "plain", both(put(32, ">I", 1), set_ext(0x0537BE77, bytes(16))),
      "refused:FormatError", "CRYPTO header extension only expected with LUKS"),
    M("crypt_luks_ext_short", "plain", both(put(32, ">I", 2), set_ext(0x0537BE77, bytes(8))),
      "refused:FormatError", "CRYPTO header extension size 8, but expected size 16"),
    M("crypt_luks_ext_unaligned", "plain",
      both(put(32, ">I", 2), set_ext(0x0537BE77, struct.pack(">QQ", 512, 4096))),
      "refused:FormatError", "Encryption header offset '512' is not a multiple"),
    M("crypt_luks_ext_past_eof", "plain",
      both(put(32, ">I", 2), set_ext(0x0537BE77, struct.pack(">QQ", 1 << 40, 1 << 21))),
      "refused:EncryptedImage", "Parameter 'encrypt.key-secret' is required for cipher"),
    M("crypt_luks_ext_on_l1", "plain",
      both(put(32, ">I", 2), set_ext(0x0537BE77, lambda_ext(lambda lay: (lay.l1, 4096)))),
      "refused:EncryptedImage", "Parameter 'encrypt.key-secret' is required for cipher"),
    M("crypt_unknown", "plain", put(32, ">I", 3), "refused:FormatError",
      "Unsupported encryption method 3"),
    M("refcount_order_7", "plain", put(96, ">I", 7), "refused:FormatError",
      "Reference count entry width too large"),
    M("refcount_order_3", "plain", put(96, ">I", 3), "corrupt-write"),
    # ---- feature bits (036, 061) ----------------------------------------------------
    M("incompat_unknown_named", "plain", feature_bit_named(9, b"teleportation"),
      "refused:UnsupportedFeature", "Unsupported qcow2 feature(s): teleportation"),
    M("incompat_unknown_unnamed", "plain", put(72, ">Q", 1 << 40), "refused:UnsupportedFeature",
      "Unknown incompatible feature: 10000000000"),
    M("incompat_dirty", "plain", put(72, ">Q", 1), "served"),
    M("incompat_corrupt", "plain", put(72, ">Q", 2), "rw-refused:CorruptImage"),
    M("incompat_data_file_bit", "plain", put(72, ">Q", 4), "refused:DataFileRefused",
      "does not name it"),
    M("data_file_names_passwd", "plain", both(put(72, ">Q", 4), set_ext(0x44415441, b"/etc/passwd")),
      "refused:DataFileRefused", "CVE-2024-32498"),
    M("incompat_extended_l2", "plain", put(72, ">Q", 16), "refused:FormatError",
      "L1 table is too small"),
    M("incompat_compression_bit_zlib", "plain", put(72, ">Q", 8), "refused:FormatError",
      "must not be set"),
    M("compression_zstd_without_bit", "plain", put(104, ">B", 1), "refused:FormatError",
      "must be set"),
    M("compression_type_unknown", "plain", put(104, ">B", 7), "refused:UnsupportedFeature",
      "unknown compression type: 7"),
    M("compat_unknown", "plain", put(80, ">Q", 0xF0), "served"),
    M("autoclear_unknown", "plain", put(88, ">Q", 1 << 30), "served"),
    # ---- header extensions (031, 080) -----------------------------------------------
    M("ext_length_overrun", "plain", both(set_ext(0x12345678, b"x" * 8), put(
        lambda lay: lay.ext_start + 4, ">I", 0x10000)), "refused:FormatError",
      "Header extension too large"),
    M("ext_backing_format_too_long", "overlay", set_ext(0xE2792ACA, b"q" * 16),
      "refused:FormatError", "ext_backing_format"),
    M("ext_unknown_kept", "plain", set_ext(0x12345678, b"hello"), "served"),
    M("ext_feature_table_odd", "plain", ext_length(0x6803F857, 50), "refused:FormatError",
      "Header extension too large"),
    M("ext_data_file_named", "plain", set_ext(0x44415441, b"/etc/passwd"), "served"),
    M("ext_duplicate", "plain", both(set_ext(0x12345678, b"a"), set_ext(0x12345678, b"b")),
      "refused:FormatError", "Duplicate header extension"),
    M("ext_crypto_without_luks", "plain", set_ext(0x0537BE77, bytes(16)), "refused:FormatError",
      "CRYPTO header extension"),
    M("ext_bitmaps_bad_length", "plain", set_ext(0x23852875, bytes(8)), "refused:FormatError",
      "bitmaps_ext: Invalid extension length"),
    M("ext_bitmaps_zero", "plain", both(set_ext(0x23852875, bytes(24)), put(88, ">Q", 1)),
      "refused:FormatError", "zero bitmaps"),
    M("ext_no_end_marker", "plain", fill(lambda lay: lay.ext_start, 0x10000 - 0x70, 0x01),
      "refused:FormatError", "Header extension too large"),
    # ---- backing file names (080, 114) ----------------------------------------------
    M("backing_offset_past_cluster", "overlay", put(8, ">Q", 0x10008), "refused:FormatError",
      "Invalid backing file offset"),
    M("backing_size_huge", "overlay", put(16, ">I", 2000), "refused:FormatError",
      "Backing file name too long"),
    M("backing_name_past_cluster", "overlay", both(put(8, ">Q", 0xFFF8), put(16, ">I", 100)),
      "refused:FormatError", "Backing file name too long"),
    M("backing_self", "overlay", backing_name(b"backing_self.qcow2"),
      "refused:BackingChainError", "loop"),
    M("backing_loop_two", "overlay", backing_name(b"bbbbbbbbbbbbbb.qcow2"),
      "refused:BackingChainError", "loop", extra=_loop_companion),
    M("backing_missing", "overlay", backing_name(b"nowhere.qcow2"),
      "refused:BackingChainError", "No such file"),
    M("backing_name_nul", "overlay", backing_name(b"\0acking.qcow2"), "served"),
    M("backing_format_bogus", "overlay", backing_format(b"vmdk"),
      "refused:BackingChainError", "Unsupported backing file format"),
    # ---- active L1 (060, 080) -------------------------------------------------------
    M("l1_entry_unaligned", "plain", put(lambda lay: lay.l1, ">Q", lambda lay: COPIED | (lay.l2 + 512)),
      "corrupt-read"),
    M("l1_entry_past_eof", "plain", put(lambda lay: lay.l1, ">Q", COPIED | (1 << 40)),
      "corrupt-read"),
    M("l1_entry_copied_no_offset", "plain", put(lambda lay: lay.l1, ">Q", COPIED), "served"),
    M("l1_entry_to_refblock", "plain", put(lambda lay: lay.l1, ">Q", lambda lay: COPIED | lay.refblock),
      "corrupt-read"),
    M("l1_entry_to_l1", "plain", put(lambda lay: lay.l1, ">Q", lambda lay: COPIED | lay.l1),
      "corrupt-write"),
    M("l1_entry_reserved_bits", "plain", put(lambda lay: lay.l1, ">Q",
                                             lambda lay: COPIED | 0x7F00000000000000 | lay.l2),
      "served"),
    M("l1_entry_copied_cleared", "plain", put(lambda lay: lay.l1, ">Q", lambda lay: lay.l2),
      "served"),
    M("l1_entries_shared", "plain", put(lambda lay: lay.l1 + 8, ">Q", lambda lay: COPIED | lay.l2),
      "served"),
    # ---- L2 (060, 138, 220) ---------------------------------------------------------
    M("l2_entry_unaligned", "plain", put(l2e(0), ">Q", lambda lay: COPIED | (lay.data + 512)),
      "corrupt-read"),
    M("l2_entry_past_eof", "plain", put(l2e(0), ">Q", COPIED | (1 << 40)), "corrupt-read"),
    M("l2_entry_copied_no_offset", "plain", put(l2e(0), ">Q", COPIED), "served"),
    M("l2_entry_to_l1", "plain", put(l2e(0), ">Q", lambda lay: COPIED | lay.l1), "corrupt-write"),
    M("l2_entry_to_refblock", "plain", put(l2e(0), ">Q", lambda lay: COPIED | lay.refblock),
      "corrupt-write"),
    M("l2_entry_to_reftable", "plain", put(l2e(0), ">Q", lambda lay: COPIED | lay.reftable),
      "corrupt-write"),
    M("l2_entry_to_own_l2", "plain", put(l2e(0), ">Q", lambda lay: COPIED | lay.l2),
      "corrupt-write"),
    M("l2_entry_to_other_l2", "plain", put(l2e(0), ">Q", lambda lay: COPIED | lay.l2b),
      "corrupt-write"),
    M("l2_zero_flag_v2", "v2", put(l2e(0), ">Q", lambda lay: COPIED | lay.data | 1),
      "corrupt-read"),
    M("l2_entry_reserved_bits", "plain", put(l2e(0), ">Q", lambda lay: COPIED | lay.data | 0x100),
      "served"),
    M("l2_entries_same_cluster", "plain", put(l2e(2), ">Q", lambda lay: COPIED | lay.data),
      "served"),
    M("l2_copied_cleared", "plain", put(l2e(0), ">Q", lambda lay: lay.data), "served"),
    # ---- compressed descriptors (214, 220) ------------------------------------------
    M("compressed_oversize", "comp", _compressed_oversize, "corrupt-write"),
    M("compressed_past_eof", "comp", _compressed_far, "corrupt-read"),
    M("compressed_on_header", "comp", _compressed_on_header, "error-read:CorruptImage"),
    M("compressed_garbage", "comp", fill(lambda lay: lay.data & 0xFFFFFFFFFF, 64, 0xFF),
      "error-read:CorruptImage"),
    # ---- extended L2 entries (271) ----------------------------------------------------
    M("extl2_both_bits", "extl2", put(l2x(1, True), ">Q", (1 << 36) | (1 << 4)), "corrupt-read"),
    M("extl2_alloc_without_offset", "extl2",
      both(put(l2x(1), ">Q", 0), put(l2x(1, True), ">Q", 1 << 4)), "corrupt-read"),
    M("extl2_bitmap_on_compressed", "extl2", put(l2x(2, True), ">Q", 0x5), "served"),
    M("extl2_unaligned_without_data", "extl2",
      both(put(l2x(1), ">Q", lambda lay: COPIED | (lay.data + 0x10200)),
           put(l2x(1, True), ">Q", 0)), "corrupt-read"),
    M("extl2_unaligned_with_data", "extl2",
      put(l2x(1), ">Q", lambda lay: COPIED | (lay.data + 0x10200)), "corrupt-read"),
    M("extl2_descriptor_bit0", "extl2", put(l2x(0), ">Q", lambda lay: COPIED | lay.data | 1),
      "served"),
    M("extl2_cluster_bits_13", "extl2", put(20, ">I", 13), "refused:FormatError",
      "subcluster size"),
    # ---- refcount table and blocks (060, 108, 112) ----------------------------------
    M("reftable_entry_unaligned", "plain", put(lambda lay: lay.reftable, ">Q",
                                               lambda lay: lay.refblock + 512), "corrupt-write"),
    M("reftable_entry_past_eof", "plain", put(lambda lay: lay.reftable, ">Q", 1 << 40),
      "corrupt-write"),
    M("reftable_entry_far_past_eof", "snap", put(lambda lay: lay.reftable + 40, ">Q", 1 << 42),
      "served"),  # a repair rebuilds; QEMU grows the file to 4 TiB and counts up to it
    M("reftable_entry_zero", "plain", put(lambda lay: lay.reftable, ">Q", 0), "corrupt-write"),
    M("reftable_entry_to_l1", "plain", put(lambda lay: lay.reftable, ">Q", lambda lay: lay.l1),
      "corrupt-write"),
    M("refblock_all_zero", "plain", fill(lambda lay: lay.refblock, CS, 0), "corrupt-write"),
    M("refblock_all_max", "plain", fill(lambda lay: lay.refblock, CS, 0xFF), "served"),
    M("refcount_l1_zero", "plain", refcount_of(lambda lay: lay.l1, 0), "corrupt-write"),
    M("refcount_l2_zero", "plain", refcount_of(lambda lay: lay.l2, 0), "corrupt-write"),
    M("refcount_header_zero", "plain", refcount_of(lambda lay: 0, 0), "corrupt-write"),
    M("refcount_leak", "plain", refcount_of(lambda lay: 40 * CS, 1), "served"),
    M("refcount_data_high", "plain", refcount_of(lambda lay: lay.data, 5), "served"),
    # ---- snapshot table and snapshot L1 tables (029, 080, 261) ----------------------
    M("snap_l1_offset_unaligned", "snap", put(snapshot_entry(0), ">Q",
                                              lambda lay: lay.snap_l1 + 512), "served"),
    M("snap_l1_size_huge", "snap", put(snapshot_entry(8), ">I", 0x10000000), "served"),
    M("snap_extra_huge", "snap", put(snapshot_entry(36), ">I", 0x10000), "refused:FormatError",
      "Too much extra metadata"),
    M("snap_name_past_eof", "snap", put(snapshot_entry(14), ">H", 0xFFFF), "corrupt-write"),
    M("snap_count_past_table", "snap", put(60, ">I", 1000), "served"),
    M("snap_table_past_eof", "snap", put(64, ">Q", 1 << 40), "refused:FormatError",
      "Snapshot table"),
    M("snap_l1_entry_unaligned", "snap", put(lambda lay: lay.snap_l1, ">Q",
                                             lambda lay: lay.l2 + 512), "served"),
    M("snap_l1_entry_past_eof", "snap", put(lambda lay: lay.snap_l1, ">Q", 1 << 40), "served"),
    M("snap_table_on_header", "snap", put(64, ">Q", 0), "served"),
)


# Damage that QEMU's check -r all cannot repair either (the test proves it on a copy).
QEMU_UNREPAIRABLE = {
    "l1_entry_unaligned", "l1_entry_past_eof", "l1_entry_to_refblock", "l1_entry_to_l1",
    "l1_entry_reserved_bits", "l2_entry_unaligned", "l2_entry_past_eof",
    "l2_entry_reserved_bits", "compressed_past_eof", "reftable_entry_unaligned",
    "snap_l1_offset_unaligned", "snap_l1_size_huge", "snap_l1_entry_unaligned",
    "snap_l1_entry_past_eof", "snap_table_on_header", "l1_offset_past_eof",
    "extl2_both_bits", "extl2_alloc_without_offset", "extl2_bitmap_on_compressed",
    "extl2_unaligned_with_data",
}
MUTATIONS = tuple(replace(m, repair="qemu-too") if m.name in QEMU_UNREPAIRABLE else m
                  for m in MUTATIONS)
assert len({m.name for m in MUTATIONS}) == len(MUTATIONS)


# --------------------------------------------------------------------------- worker
def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def run_ops(path: str) -> dict[str, Any]:
    """info, read-only open + reads, read-write open + writes, check, repair, re-check.

    Each step records "ok" or "<Error>: message"; an exception that is not a qcow2rw
    error or an OSError is recorded under "crash" with its traceback.
    """
    import qcow2rw
    from qcow2rw.image import open_for_check
    from qcow2rw.errors import Qcow2Error

    out: dict[str, Any] = {"path": path}
    expected = (Qcow2Error, OSError)

    def step(name: str, func: Callable[[], Any]) -> Any:
        try:
            value = func()
        except expected as exc:
            out[name] = _err(exc)
            return None
        except BaseException as exc:  # noqa: BLE001 - the point of this worker
            out[name] = _err(exc)
            out["crash"] = f"{name}: " + "".join(traceback.format_exception(exc))
            return None
        out[name] = "ok"
        return value if value is not None else True

    def metadata_info() -> None:
        with qcow2rw.open(path, readonly=True, metadata_only=True) as img:
            img.info()
    step("open_meta", metadata_info)  # as qemu-img info opens (BDRV_O_NO_IO)
    img = step("open_ro", lambda: qcow2rw.open(path, readonly=True))
    if img:
        step("info", img.info)
        def reads() -> None:
            for off, length in READS:
                if off + length <= img.size:
                    img.read(off, length)
        step("read", reads)
        step("close_ro", img.close)
    img = step("open_rw", lambda: qcow2rw.open(path))
    if img:
        step("read_rw", lambda: [img.read(off, n) for off, n in READS if off + n <= img.size])

        def writes() -> None:
            for off, length in WRITES:
                if off + length <= img.size:
                    img.write(off, bytes([0xA5]) * length)
            img.discard(2 * CS, CS)
            img.write_zeroes(3 * CS, CS)
            img.flush()
        step("write", writes)
        step("close_rw", img.close)
    with open(path, "rb") as f:
        head = f.read(80)
    out["corrupt_bit"] = bool(len(head) >= 80 and struct.unpack_from(">Q", head, 72)[0] & 2
                              and struct.unpack_from(">I", head, 4)[0] >= 3)

    if out["corrupt_bit"]:  # marked corrupt: read-only opens only, until repaired
        step("reopen_rw", lambda: qcow2rw.open(path).close())

        def reopen_ro() -> None:
            with qcow2rw.open(path, readonly=True) as img:
                img.read(0, 512)
        step("reopen_ro", reopen_ro)

    def check(repair: str | None) -> dict[str, Any]:
        img = open_for_check(path, repair=bool(repair))
        try:
            res = img.check(repair)
        finally:
            img.close()
        return {"corruptions": res.corruptions, "leaks": res.leaks,
                "check_errors": res.check_errors, "error": res.error}
    for name, repair in (("check", None), ("repair", "all"), ("recheck", None)):
        result = step(name, lambda repair=repair: check(repair))
        if isinstance(result, dict):
            out[name + "_result"] = result
    return out


def classify(out: dict[str, Any]) -> str:
    """The outcome class of one worker result (see the module docstring)."""
    def cls(step: str) -> str:
        return out.get(step, "").split(":", 1)[0]
    if out.get("open_ro") != "ok":
        return f"refused:{cls('open_ro')}"
    if out.get("read") != "ok":
        return "corrupt-read" if cls("read") == "CorruptImage" and "Image is corrupt" in \
            out["read"] else f"error-read:{cls('read')}"
    if out.get("open_rw") != "ok":
        return f"rw-refused:{cls('open_rw')}"
    if out.get("read_rw") not in ("ok", None) and cls("read_rw") != "CorruptImage":
        return f"error-read:{cls('read_rw')}"
    if out.get("write") != "ok":
        if cls("write") == "CorruptImage" and out.get("corrupt_bit"):
            return "corrupt-write"
        return f"error-write:{cls('write')}"
    return "served"


def main(argv: list[str]) -> None:
    import resource
    limit = int(argv[0]) * MiB
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import time
    for path in argv[1:]:
        print(json.dumps({"start": path}), flush=True)
        started = time.monotonic()
        out = run_ops(path)
        out["seconds"] = round(time.monotonic() - started, 3)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1:])
