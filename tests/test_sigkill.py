"""Real process death (issue 7): a writer process is killed with SIGKILL at random moments.

The writer (``kill_writer`` of ``tests/crashreplay.py``) runs 4 clients over an AioImage
with 4 workers, flushing at random and journaling (synced) which writes each flush
covered.  After the kill the file must check with leaks only (``qemu-img check`` and
ours; with lazy refcounts a dirty bit instead, which the next read-write open
repairs to clean), every write a completed flush covered reads back, every other
sector holds its old data or the data of one of its writes, and the image opens
read-write in qcow2rw (and, for some seeds, in QEMU).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import qcow2rw
from qcow2rw.check import check_image
from qcow2rw.image import open_for_check
from qcow2rw.format import INCOMPAT_DIRTY

import crashreplay

ROOT = Path(__file__).resolve().parent.parent
SEEDS = range(6)


def _run_and_kill(path: Path, journal: Path, seed: int) -> None:
    code = ("import sys; from crashreplay import kill_writer; "
            "kill_writer(sys.argv[1], int(sys.argv[2]), sys.argv[3])")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), str(seed), str(journal)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready", proc.stderr.read() if proc.stderr else ""
        deadline = time.monotonic() + 30  # a slow machine: wait for the first flush
        while not (journal.exists() and journal.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(random.Random(seed).uniform(0.0, 0.7))
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _our(path: Path) -> tuple[int, int, bool]:
    img = open_for_check(path, repair=False, force_share=True)
    try:
        res = check_image(img, None)
        return res.corruptions + res.check_errors, res.leaks, bool(
            img.header.incompatible_features & INCOMPAT_DIRTY)
    finally:
        img.close()


@pytest.mark.parametrize("lazy", [False, True], ids=["plain", "lazy"])
@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_at_random_moment(qemu: Any, tmp_path: Path, seed: int, lazy: bool) -> None:
    seed += 100 * lazy
    path = tmp_path / "k.qcow2"
    journal = tmp_path / "journal"
    qcow2rw.create(path, 1 << 20, cluster_size=512, lazy_refcounts=lazy).close()
    _run_and_kill(path, journal, seed)
    assert journal.exists() and journal.read_text(), "no flush completed before the kill"
    corruptions, _, dirty = _our(path)
    rc, data = qemu.check(str(path))
    if dirty:
        assert lazy, "dirty bit without lazy refcounts"
        assert rc in (0, 2, 3), data
    else:
        assert corruptions == 0 and rc in (0, 3), (corruptions, rc, data)
    problems = crashreplay.kill_verify(str(path), seed, str(journal))
    assert not problems, "\n".join(problems)
    if seed % 3 == 0:  # QEMU opens it read-write (and repairs a dirty image) and writes
        copy = tmp_path / "qemu.qcow2"
        copy.write_bytes(path.read_bytes())
        qemu.qemu_io(str(copy), "write -P 0x6b 0 512")
        rc, data = qemu.check(str(copy))
        assert rc in (0, 3), data
    # The next read-write open in qcow2rw repairs a dirty image; it checks clean then.
    img = qcow2rw.open(path)
    try:
        result = img.check()
        if dirty:
            assert (result.corruptions, result.leaks) == (0, 0), result.messages[:5]
        assert result.corruptions == 0
        img.write(0, b"\x5a" * 512)
    finally:
        img.close()
    assert _our(path)[0] == 0
