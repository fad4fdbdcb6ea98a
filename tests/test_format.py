"""Unit tests of the pure on-disk format code: header round trips, entry layouts."""

from __future__ import annotations

import struct
from array import array
from pathlib import Path
from typing import Any

import pytest

from qcow2rw.errors import FormatError, UnsupportedFeature
from qcow2rw.format import (EXT_BITMAPS, HeaderExtension, decode_compressed, encode_compressed,
                            parse_header, serialize_header, table_from_bytes, table_to_bytes)
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
    (32, 1, UnsupportedFeature, "Encrypted"),
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
