"""Crash states rebuilt from write logs (issue 7, DESIGN §6); see ``tests/crashreplay.py``.

The default run checks a fast subset: for a few workloads, every prefix ending at a
barrier and each single write of an epoch dropped, with qcow2rw's checks on every
state and ``qemu-img check`` on a sample plus every state ours finds wrong.  The full
replay (every workload; prefixes inside epochs, reorderings, torn writes; ``-r
leaks``, qemu-io writes) is behind the ``soak`` marker and in ``tools/crashtest.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qcow2rw import image

import crashreplay

FAST = ["alloc", "l2_tables", "snapshot", "discard_zero", "concurrent", "threads_evicting",
        "threads_growing",
        "writeback_race"]


@pytest.mark.parametrize("name", FAST)
def test_barrier_prefixes_and_single_drops(qemu: Any, tmp_path: Path, name: str) -> None:
    rec = crashreplay.record_workload(name, tmp_path)
    specs = crashreplay.crash_states(rec, full=False)
    summary = crashreplay.check_recording(rec, specs, qemu="check", qemu_sample=6,
                                          workdir=tmp_path)
    assert not summary.failures, "\n".join(summary.failures[:10])
    assert summary.states >= 10, summary.line()
    assert any(op.ack >= 0 for op in rec.ops) and rec.flushes


def test_lazy_refcounts_leave_the_dirty_bit(qemu: Any, tmp_path: Path) -> None:
    """With lazy refcounts a crash leaves refcounts behind the tables: the dirty bit is
    set (checked per state by the oracle), and some states do need the repair (every
    fourth state is checked by qemu-img too)."""
    rec = crashreplay.record_workload("lazy", tmp_path)
    dirty = 0
    for n, (spec, state) in enumerate(
            crashreplay.unique_states(rec, crashreplay.crash_states(rec, full=False))):
        result = crashreplay.check_state(rec, spec, state, tmp_path,
                                         qemu="check" if n % 4 == 0 else "none")
        assert result.ok, str(result)
        dirty += result.dirty
    assert dirty > 0


def test_snapshot_window_without_dirty_bit_is_caught(tmp_path: Path, monkeypatch: Any) -> None:
    """Without the dirty-bit window around snapshot operations, some crash states have
    refcounts and OFLAG_COPIED flags that disagree (what qemu-img check calls
    corruption): the oracle sees it."""
    monkeypatch.setattr(image, "refcounts_in_flux", lambda state, func, *args: func(*args))
    rec = crashreplay.record_workload("snapshot", tmp_path)
    summary = crashreplay.check_recording(rec, crashreplay.crash_states(rec, full=False),
                                          qemu="none", workdir=tmp_path)
    assert summary.corruptions > 0


def test_lost_write_is_caught(tmp_path: Path) -> None:
    """The oracle is not blind: a log with one data write taken out loses a flushed write."""
    rec = crashreplay.record_workload("alloc", tmp_path)
    first_data = next(i for i, op in enumerate(rec.io) if op[0] == "write" and len(op[2]) >= 512
                      and op[2][:9] == b"00000000:")
    rec.io[first_data] = ("write", rec.io[first_data][1], bytes(len(rec.io[first_data][2])))
    summary = crashreplay.check_recording(rec, crashreplay.crash_states(rec, full=False),
                                          qemu="none", workdir=tmp_path)
    assert summary.lost > 0


def test_state_enumeration(tmp_path: Path) -> None:
    rec = crashreplay.record_workload("alloc", tmp_path)
    fast = crashreplay.crash_states(rec, full=False)
    full = crashreplay.crash_states(rec, full=True)
    syncs = sum(1 for e in rec.io if e[0] == "sync")
    assert sum(s.label.startswith("barrier") for s in fast) == syncs + 1
    assert {s.label.split()[0] for s in full} >= {"barrier", "prefix", "epoch", "write"}
    assert any("torn at 512" in s.label for s in full)
    assert any(s.label.endswith("head lost") for s in full)
    assert len(set(full)) == len(full)


@pytest.mark.soak
@pytest.mark.parametrize("name", sorted(crashreplay.WORKLOADS))
def test_full_replay(qemu: Any, tmp_path: Path, name: str) -> None:
    rec = crashreplay.record_workload(name, tmp_path)
    summary = crashreplay.check_parallel([rec], full=True, qemu="full", jobs=4)
    assert not summary.failures, "\n".join(summary.failures[:10])
