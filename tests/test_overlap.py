"""The overlap map under concurrent additions (a race the chaos stress found)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

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
