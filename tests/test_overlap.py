"""The overlap map under concurrent additions (a race the chaos stress found)."""

from __future__ import annotations

import struct
import threading
from pathlib import Path
from typing import Any

import pytest

import qcow2rw
from qcow2rw.overlap import ACTIVE_L2, OverlapMap


class _PausingList(list):  # type: ignore[type-arg]
    """A list whose insert() stops halfway until told to go on."""

    def __init__(self, items: Any) -> None:
        super().__init__(items)
        self.inside = threading.Event()
        self.go = threading.Event()

    def insert(self, index: Any, value: Any) -> None:
        self.inside.set()
        self.go.wait(10)
        super().insert(index, value)


def test_check_never_sees_an_addition_halfway(tmp_path: Path) -> None:
    """A check runs while ``added()`` is between its inserts into the map's lists.

    Before the fix, ``find`` bisected the lists with no lock: caught between the
    insert into ``starts`` and the one into ``ends`` it indexed past the end of
    ``ends`` and raised ``IndexError: list index out of range`` (this test, every time;
    the chaos stress in fine mode, as a failed flush).  Now a check takes the map's
    lock, so it waits for the addition and then sees the new table.
    """
    cs = 512
    with qcow2rw.create(tmp_path / "o.qcow2", 1 << 20, cluster_size=cs) as img:
        overlap = OverlapMap(img, "cached")
        assert overlap.find(0, 1) == "qcow2_header"  # builds the map
        union = overlap._union
        assert union is not None
        ends = union.ends = _PausingList(union.ends)
        table = 1 << 30  # far past everything else
        adder = threading.Thread(target=overlap.added, args=(table, cs, ACTIVE_L2))
        adder.start()
        assert ends.inside.wait(10)  # "starts" has the new table, "ends" not yet
        seen: list[Any] = []

        def check() -> None:
            try:
                seen.append(overlap.find(table, cs))
            except Exception as exc:  # noqa: BLE001 - the failure being tested for
                seen.append(exc)

        checker = threading.Thread(target=check)
        checker.start()
        checker.join(0.3)  # with the fix it waits for the lock the addition holds
        ends.go.set()
        adder.join(10)
        checker.join(10)
        assert seen == ["active L2 table"], seen


def _l1_refcount_zeroed(qemu: Any, path: Path) -> None:
    """A qemu-img image whose refcount block says the active L1 table's cluster is free."""
    qemu.qemu_img("create", "-q", "-f", "qcow2", str(path), "64M")
    qemu.qemu_io(str(path), "write -P 3 0 1M")
    data = bytearray(path.read_bytes())
    l1_offset, = struct.unpack_from(">Q", data, 40)
    reftable, = struct.unpack_from(">Q", data, 48)
    block, = struct.unpack_from(">Q", data, reftable)
    struct.pack_into(">H", data, block + 2 * (l1_offset // 65536), 0)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("operation", ["snapshot", "grow"])
def test_new_tables_never_land_on_metadata(qemu: Any, tmp_path: Path, operation: str) -> None:
    """The copy of the L1 table a snapshot makes, and the bigger L1 table a grow makes,
    go where the refcounts say a cluster is free: here, on the active L1 table.  The
    overlap check refuses the write and marks the image corrupt (without it, the copy
    silently overwrote the active table)."""
    path = tmp_path / "o.qcow2"
    _l1_refcount_zeroed(qemu, path)
    img = qcow2rw.open(path)
    with pytest.raises(qcow2rw.CorruptImage, match="overlaps with active L1 table"):
        if operation == "snapshot":
            img.create_snapshot("s")
        else:
            img.resize(64 << 30)
    img.close()
    with pytest.raises(qcow2rw.CorruptImage, match="corrupt"):
        qcow2rw.open(path)
    assert qemu.info(str(path))["format-specific"]["data"]["corrupt"] is True
    qemu.qemu_io(str(path), "read -P 3 0 1M", readonly=True)
