"""The internal snapshot table: parse and serialize its entries.

Create, apply and delete (which take the image exclusively) build on this module;
an open image needs the table to report snapshots and to know every L1 table that
references clusters (for refcount checks and rebuilds).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import FormatError
from .format import MAX_SNAPSHOTS, align_up

SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")  # 40 bytes
MAX_EXTRA_DATA = 1024
MAX_TABLE_SIZE = 1024 * 65536  # QEMU's QCOW_MAX_SNAPSHOTS_SIZE


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


def parse_table(buf: bytes, count: int) -> list[Snapshot]:
    """Parse *count* snapshot entries from *buf* (the table's bytes)."""
    if count > MAX_SNAPSHOTS:
        raise FormatError("Snapshot table too large")
    out = []
    pos = 0
    for index in range(count):
        if pos + SNAPSHOT_HEADER.size > len(buf):
            raise FormatError("Snapshot table runs past its end")
        (l1_offset, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state,
         extra_len) = SNAPSHOT_HEADER.unpack_from(buf, pos)
        pos += SNAPSHOT_HEADER.size
        if extra_len > MAX_EXTRA_DATA:
            raise FormatError(f"Too much extra metadata in snapshot table entry {index}")
        extra = bytes(buf[pos:pos + extra_len])
        pos += extra_len
        id_raw = bytes(buf[pos:pos + id_len])
        pos += id_len
        name_raw = bytes(buf[pos:pos + name_len])
        pos += name_len
        if pos > len(buf):
            raise FormatError("Snapshot table runs past its end")
        pos = align_up(pos, 8)
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
        out.append(snap)
    return out


def serialize_table(snapshots: list[Snapshot]) -> bytes:
    """Serialize the table as QEMU writes it (24 bytes of extra data per entry)."""
    out = bytearray()
    for snap in snapshots:
        extra = bytearray(snap.extra_data)
        if len(extra) < 24:
            extra += bytes(24 - len(extra))
        disk = snap.disk_size if snap.disk_size is not None else 0
        struct.pack_into(">QQq", extra, 0, snap.vm_state_size, disk, snap.icount)
        id_raw, name_raw = snap.id_str.encode(), snap.name.encode()
        out += SNAPSHOT_HEADER.pack(snap.l1_table_offset, snap.l1_size, len(id_raw), len(name_raw),
                                    snap.date_sec, snap.date_nsec, snap.vm_clock_nsec,
                                    min(snap.vm_state_size, 0xFFFFFFFF), len(extra))
        out += extra + id_raw + name_raw
        out += bytes(align_up(len(out), 8) - len(out))
    return bytes(out)
