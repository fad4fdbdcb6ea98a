"""Unit tests of the pure on-disk format code: header round trips, entry layouts."""

from __future__ import annotations

import struct
from array import array
from pathlib import Path
from typing import Any

import pytest

from qcow2rw.errors import FormatError, UnsupportedFeature
from qcow2rw.format import (AUTOCLEAR_BITMAPS, COMPAT_VERSIONS, COMPRESSED, EXT_BITMAPS,
                            MAX_SNAPSHOTS, NORMAL, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO, UNALLOCATED,
                            ZERO_ALLOC, ZERO_PLAIN, BitmapsExtension, Header, HeaderExtension,
                            Snapshot, bitmaps_extension, cluster_kind, compat_error,
                            decode_compressed, encode_compressed, parse_bitmap_directory,
                            parse_header, parse_snapshot_table, read_snapshot_table,
                            refcount_order_of, refcount_width_error, serialize_header,
                            serialize_snapshot_table, snapshot_table_length, table_from_bytes,
                            table_to_bytes)
from qcow2rw.refcount import RefBlock


def _qemu_header(qemu: Any, tmp_path: Path, *args: str) -> bytes:
    path = tmp_path / "h.qcow2"
    qemu.qemu_img("create", "-f", "qcow2", *args, str(path), "64M")
    return path.read_bytes()[:65536]


def test_header_round_trip_keeps_unknown_extensions(tmp_path: Path, qemu: Any) -> None:
    (tmp_path / "b.raw").write_bytes(bytes(4096))
    buf = _qemu_header(qemu, tmp_path, "-b", "b.raw", "-F", "raw")
    hdr = parse_header(buf)
    assert (hdr.version, hdr.cluster_bits, hdr.size) == (3, 16, 64 << 20)
    assert (hdr.backing_file, hdr.backing_format) == ("b.raw", "raw")
    unknown = HeaderExtension(0x12345678, b"opaque bytes")
    hdr.extensions.append(unknown)
    hdr.extensions.append(HeaderExtension(EXT_BITMAPS, bytes(24)))
    again = parse_header(serialize_header(hdr))
    assert again.backing_file == "b.raw" and again.backing_format == "raw"
    assert [(e.magic, e.data) for e in again.extensions if e.magic in (0x12345678, EXT_BITMAPS)] == \
        [(0x12345678, b"opaque bytes"), (EXT_BITMAPS, bytes(24))]
    assert (again.l1_table_offset, again.refcount_table_offset) == (hdr.l1_table_offset,
                                                                     hdr.refcount_table_offset)


def test_our_header_is_qemus_header(tmp_path: Path, qemu: Any) -> None:
    """The fields and extensions we serialize for a fresh image equal qemu-img's bytes."""
    buf = _qemu_header(qemu, tmp_path)
    hdr = parse_header(buf)
    out = serialize_header(hdr)
    assert out == buf[:len(out)]


def test_v2_header(tmp_path: Path, qemu: Any) -> None:
    buf = _qemu_header(qemu, tmp_path, "-o", "compat=0.10")
    hdr = parse_header(buf)
    assert hdr.version == 2 and hdr.header_length == 72 and hdr.refcount_bits == 16


@pytest.mark.parametrize(("offset", "value", "error", "message"), [
    (0, 0x12345678, FormatError, "not in qcow2 format"),
    (4, 4, UnsupportedFeature, "version 4"),
    (20, 22, FormatError, "cluster size"),
    (20, 8, FormatError, "cluster size"),
    (96, 7, FormatError, "64 bits"),
    (32, 3, FormatError, "Unsupported encryption method 3"),
])
def test_refused_header_fields(tmp_path: Path, qemu: Any, offset: int, value: int,
                               error: type, message: str) -> None:
    buf = bytearray(_qemu_header(qemu, tmp_path))
    struct.pack_into(">I", buf, offset, value)
    with pytest.raises(error, match=message):
        parse_header(bytes(buf))


def test_unknown_incompatible_bit_is_named(tmp_path: Path, qemu: Any) -> None:
    buf = bytearray(_qemu_header(qemu, tmp_path))
    struct.pack_into(">Q", buf, 72, 1 << 5)
    with pytest.raises(UnsupportedFeature, match="Unknown incompatible feature: 20"):
        parse_header(bytes(buf))


def test_compressed_descriptor_example() -> None:
    """The worked example of the fact sheet: 64 KiB clusters, entry 0x4880000000058755."""
    host, length = decode_compressed(0x4880000000058755, 16)
    assert (host, length) == (0x58755, 17579)
    assert encode_compressed(0x58755, 17579, 16) & ~(1 << 62) == 0x0880000000058755


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_block_round_trip(bits: int) -> None:
    entries = 512 * 8 // bits
    block = RefBlock.empty(bits, entries)
    top = (1 << bits) - 1
    for i in range(entries):
        block.values[i] = (i * 2654435761) % (top + 1)
    data = block.to_bytes()
    assert len(data) == 512
    again = RefBlock.from_bytes(bits, data)
    assert list(again.values) == list(block.values)
    if bits == 1:  # entry 0 lives in the least significant bit
        one = RefBlock.empty(1, entries)
        one.values[0] = 1
        assert one.to_bytes()[0] == 1
    if bits == 16:
        assert data[:4] == struct.pack(">HH", block.values[0], block.values[1])


def test_table_byte_order() -> None:
    table = table_from_bytes(struct.pack(">2Q", 0x8000000000050000, 1))
    assert list(table) == [0x8000000000050000, 1]
    assert table_to_bytes(array("Q", [5])) == struct.pack(">Q", 5)


# The layouts that several modules read (snapshot table, bitmaps, cluster kinds, compat
# rules) have their one definition in format.py: pinned here.

def _snapshot_entry(l1_offset: int, extra: bytes, id_raw: bytes, name_raw: bytes) -> bytes:
    head = struct.pack(">QIHHIIQII", l1_offset, 16, len(id_raw), len(name_raw), 7, 8, 9, 10,
                       len(extra))
    entry = head + extra + id_raw + name_raw
    return entry + bytes(-len(entry) % 8)


def test_snapshot_table_round_trip_and_length() -> None:
    snaps = [Snapshot(0x50000, 16, "1", "first", date_sec=5, disk_size=1 << 30, icount=0),
             Snapshot(0x60000, 16, "2", "zweite \u00e4", vm_state_size=1 << 33)]
    data = serialize_snapshot_table(snaps)
    again = parse_snapshot_table(data, 2)
    assert [(s.l1_table_offset, s.id_str, s.name, s.disk_size, s.vm_state_size, s.icount)
            for s in again] == [(0x50000, "1", "first", 1 << 30, 0, 0),
                                (0x60000, "2", "zweite \u00e4", 0, 1 << 33, -1)]
    # Each entry stores 24 bytes of extra data; the table's length has no tail padding.
    first, second = 40 + 24 + 1 + 5, 40 + 24 + 1 + len("zweite \u00e4".encode())
    assert len(data) == 72 + 80 and snapshot_table_length(again) == 72 + second
    _, extra_sizes, length = read_snapshot_table(lambda pos, n: data[pos:pos + n], 2)
    assert extra_sizes == [24, 24] and length == 72 + second and first <= 72


def test_snapshot_table_extra_data_limit() -> None:
    big = _snapshot_entry(0x50000, bytes(1025), b"1", b"a")
    table = big + _snapshot_entry(0x60000, bytes(16), b"2", b"b")
    with pytest.raises(FormatError, match="Too much extra metadata in snapshot table entry 0"):
        parse_snapshot_table(table, 2)
    dropped: list[str] = []
    snaps, extra_sizes, length = read_snapshot_table(lambda pos, n: table[pos:pos + n], 2,
                                                     cut_extra=True, dropped=dropped)
    assert dropped == ["Discarding too much extra metadata in snapshot table entry 0 "
                       "(1025 > 1024)"]
    assert extra_sizes == [1025, 16] and len(snaps[0].extra_data) == 1024
    assert snaps[1].disk_size is not None and snaps[1].icount == -1
    assert length == len(big) + 40 + 16 + 2
    with pytest.raises(FormatError, match="runs past its end"):
        parse_snapshot_table(table[len(big):-16], 1)
    with pytest.raises(FormatError, match="too large"):
        parse_snapshot_table(table, MAX_SNAPSHOTS + 1)


def test_bitmaps_extension_and_directory() -> None:
    hdr = Header(version=3, cluster_bits=16, size=1 << 30, l1_size=16, l1_table_offset=0x30000,
                 refcount_table_offset=0x10000, refcount_table_clusters=1)
    data = struct.pack(">IIQQ", 2, 0, 4096, 0x70000)
    hdr.extensions.append(HeaderExtension(EXT_BITMAPS, data))
    assert bitmaps_extension(hdr) is None  # autoclear bit clear: QEMU ignores the bitmaps
    assert bitmaps_extension(hdr, consistent=False) == BitmapsExtension(2, 0, 4096, 0x70000)
    hdr.autoclear_features = AUTOCLEAR_BITMAPS
    assert bitmaps_extension(hdr) == BitmapsExtension(2, 0, 4096, 0x70000)
    directory = b""
    for name, flags in ((b"b0", 1), (b"second", 2)):
        entry = struct.pack(">QIIBBHI", 0x80000, 32, flags, 1, 16, len(name), 4) + bytes(4) + name
        directory += entry + bytes(-len(entry) % 8)
    entries = parse_bitmap_directory(directory, 2)
    assert [(e.name, e.flags, e.granularity_bits, e.table_size) for e in entries] == \
        [("b0", 1, 16, 32), ("second", 2, 16, 32)]
    with pytest.raises(FormatError, match="runs past its end"):
        parse_bitmap_directory(directory, 3)


def test_cluster_kinds() -> None:
    assert cluster_kind(0) == UNALLOCATED
    assert cluster_kind(0x50000 | QCOW_OFLAG_COPIED) == NORMAL
    assert cluster_kind(QCOW_OFLAG_ZERO) == ZERO_PLAIN
    assert cluster_kind(0x50000 | QCOW_OFLAG_ZERO) == ZERO_ALLOC
    assert cluster_kind(encode_compressed(0x58755, 17579, 16)) == COMPRESSED


def test_compat_rules() -> None:
    assert COMPAT_VERSIONS["0.10"] == 2 and COMPAT_VERSIONS["v3"] == 3
    assert [w for w in range(-1, 130) if refcount_width_error(w) is None] == \
        [1, 2, 4, 8, 16, 32, 64]
    assert refcount_order_of(64) == 6
    assert compat_error(3, lazy_refcounts=True, refcount_bits=64) is None
    assert compat_error(2, lazy_refcounts=False, refcount_bits=16) is None
    assert compat_error(2, lazy_refcounts=True, refcount_bits=8) == \
        "Lazy refcounts only supported with compatibility level 1.1 and above"
    assert compat_error(2, lazy_refcounts=False, refcount_bits=8, amend=True) == \
        ("Different refcount widths than 16 bits require compatibility level 1.1 or above "
         "(use version=v3 or greater)")


def test_a_size_not_a_multiple_of_512_is_cut_down_as_qemu_does(tmp_path: Path, qemu: Any) -> None:
    """No tool writes such a header, but a hand-edited one says 1000001 bytes: QEMU
    counts whole sectors (999936 bytes), for info, for reads and as a backing file (an
    overlay reads zeros past 999936).  Before: 1000001 bytes, 65 of them backing data
    that qemu-img and qemu-nbd show as zeros."""
    import qcow2rw
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", str(base), "1000448")
    qemu.qemu_io(str(base), "write -P 0x99 0 1000448")
    with open(base, "r+b") as f:
        f.seek(24)
        f.write(struct.pack(">Q", 1000001))
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top), "2M")
    with qcow2rw.open(base, readonly=True) as img:
        assert img.size == qemu.info(str(base))["virtual-size"] == 999936
    with qcow2rw.open(top, readonly=True) as img:
        assert img.read(999930, 80) == b"\x99" * 6 + bytes(74)
    qemu.qemu_io(str(top), "read -P 0x99 999930 6", "read -P 0 999936 65", readonly=True)
