"""A cluster freed by a flush and allocated again as an L2 table before the flush has
told the L2 cache: the cache must forget only the table it held when the cluster was
freed, never the new one (found with tools/repro_growth_race.py: the new table was
dropped unwritten and read back from the file, holding the old data).

The flush stops at ``refblock_update`` (after the free, before the cache is told); a
write then needs a new L2 table, which gets the freed cluster; the flush goes on.
"""

from __future__ import annotations

import threading
from pathlib import Path

import qcow2rw
from qcow2rw.events import EventPoints
from qcow2rw.format import L1E_OFFSET_MASK

CS = 65536


def test_a_freed_cluster_reused_as_an_l2_table_is_not_forgotten(tmp_path: Path) -> None:
    img = qcow2rw.create(tmp_path / "a.qcow2", 2 << 30)
    img.write(0, b"D" * CS)
    img.flush()
    data_host = img.block_status(0, CS)[0][3]
    img.discard(0, CS)  # the data cluster's free waits for the next flush
    events = img.events = EventPoints()
    events.set_break("refblock_update")
    errors: list[BaseException] = []

    def flush() -> None:
        try:
            img.flush()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    flusher = threading.Thread(target=flush)
    flusher.start()
    assert events.wait_break("refblock_update")
    img.write(512 << 20, b"N" * 4096)  # a new L2 table: the lowest free cluster
    assert img.state.l1.entries[1] & L1E_OFFSET_MASK == data_host
    events.resume("refblock_update")
    flusher.join(10)
    img.events = None
    assert not errors, errors
    assert img.read(512 << 20, 4096) == b"N" * 4096
    img.close()
