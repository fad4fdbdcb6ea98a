"""The overlap map under concurrent additions (a race the chaos stress found)."""

from __future__ import annotations

import struct
import threading
from bisect import bisect_right
from pathlib import Path
from typing import Any

import pytest

import qcow2rw
from qcow2rw.overlap import ACTIVE_L2, OverlapMap, _Intervals


def test_check_never_sees_an_addition_halfway(tmp_path: Path, monkeypatch: Any) -> None:
    """A check runs while ``added()`` is between its inserts into the map's lists.

    Before the first fix, ``find`` bisected lists that ``added()`` changed in place:
    caught between the insert into ``starts`` and the one into ``ends`` it indexed past
    the end of ``ends`` and raised ``IndexError: list index out of range`` (this test,
    every time; the chaos stress in fine mode, as a failed flush).  Then a check took
    the map's lock; now an addition builds a new union and publishes it whole, so a
    check takes no lock: during the addition it searches the old union (which nobody
    changes), after it the new one.  Seen failing with ``added()`` inserting into the
    published union again: the check raised IndexError.
    """
    cs = 512
    inside, go = threading.Event(), threading.Event()
    real_add = _Intervals.add

    def pausing_add(self: _Intervals, start: int, end: int, kind: int) -> None:
        i = bisect_right(self.starts, end - 1)
        self.starts.insert(i, start)
        inside.set()
        go.wait(10)
        self.ends.insert(i, end)
        self.kinds.insert(i, kind)

    with qcow2rw.create(tmp_path / "o.qcow2", 1 << 20, cluster_size=cs) as img:
        overlap = OverlapMap(img.state, "cached")
        assert overlap.find(0, 1) == "qcow2_header"  # builds the map
        before = overlap._union
        assert before is not None
        old_starts = list(before.starts)
        table = 1 << 30  # far past everything else
        monkeypatch.setattr(_Intervals, "add", pausing_add)
        adder = threading.Thread(target=overlap.added, args=(table, cs, ACTIVE_L2))
        adder.start()
        assert inside.wait(10)  # a "starts" has the new table, its "ends" not yet
        try:
            during = overlap.find(table, cs)
        finally:
            go.set()
            adder.join(10)
        monkeypatch.setattr(_Intervals, "add", real_add)
        assert during is None  # the old map: the table is not there yet
        assert before.starts == old_starts  # the published union was not touched
        assert overlap.find(table, cs) == "active L2 table"


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
