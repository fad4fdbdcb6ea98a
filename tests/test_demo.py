"""``qcow2rw demo`` in-process: its accounting of cancelled requests, and that it fails.

(``tests/test_cli.py`` runs it as a command; here the demo's own checks are checked:
a wrong byte anywhere must turn into MISMATCH and exit status 1.)
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest

from qcow2rw import Image
from qcow2rw.aio import AioFuture, AioImage
from qcow2rw.devkit import demo

pytestmark = pytest.mark.timeout(120)


def run_demo(tmp_path: Path, **options: Any) -> tuple[int, str]:
    out = io.StringIO()
    code = demo.run(demo.DemoOptions(directory=str(tmp_path), out=out, **options))
    return code, out.getvalue()


def test_demo_reports_cancellations_and_verifies(tmp_path: Path) -> None:
    code, text = run_demo(tmp_path, size=8 << 20, workers=4, seed=3)
    assert code == 0, text
    assert text.splitlines()[-1].startswith("OK")
    assert "MISMATCH" not in text and "FAILED" not in text
    found = re.search(r"cancelled: (\d+) while queued \(never ran\), (\d+) while running "
                      r"\((\d+) of their clusters hold new data, (\d+) old, none a mix\), "
                      r"(\d+) finished before noticing", text)
    assert found, text
    queued, running, _, _, too_late = map(int, found.groups())
    assert queued > 0          # the tail of every round is cancelled while still queued
    assert running + too_late == 5  # one long write per round is cancelled once running
    assert "4 worker threads, seed 3" in text
    if hasattr(Image, "create_snapshot"):  # taken mid-round, applied and verified at the end
        assert "snapshot 'demo' taken through submit_snapshot" in text
        assert re.search(r"applied snapshot 'demo' \(\d+ clusters changed since\) and "
                         r"compared with its content: OK", text), text
    else:
        assert "does not support snapshots yet, skipped" in text
    assert list(tmp_path.iterdir()) == []


def test_demo_finds_a_wrong_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every 10th write lands with one byte changed: the demo must say so and exit 1.

    (Not just one write: a later round may overwrite it, legitimately hiding it.)
    """

    class Corrupting(AioImage):
        writes = 0

        def submit_write(self, offset: int, data: Any) -> AioFuture[None]:
            Corrupting.writes += 1
            if Corrupting.writes % 10 == 0:
                wrong = bytearray(data)
                wrong[len(wrong) // 2] ^= 0xFF
                data = bytes(wrong)
            return super().submit_write(offset, data)

    monkeypatch.setattr(demo, "AioImage", Corrupting)
    code, text = run_demo(tmp_path, size=4 << 20, seed=1)
    assert code == 1, text
    assert "MISMATCH" in text
    assert text.splitlines()[-1].startswith("FAILED")


def test_old_or_new_per_cluster() -> None:
    old, new = bytes(10), b"\1" * 10
    # clusters of 4 bytes; the range starts at 2: clusters [2,4) [4,8) [8,12)
    assert demo.old_or_new_per_cluster(new[:2] + old[2:], old, new, 2, 4) == (1, 2, -1)
    assert demo.old_or_new_per_cluster(old[:2] + new[2:6] + old[6:], old, new, 2, 4) \
        == (1, 2, -1)
    mixed = old[:2] + new[2:4] + old[4:]  # cluster [4,8) half new, half old
    assert demo.old_or_new_per_cluster(mixed, old, new, 2, 4)[2] == 4
