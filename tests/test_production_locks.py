"""Issue 11 §6: the suite runs the debug lock classes; run the lock tests with the
production classes too.

``QCOW2RW_DEBUG_LOCKS`` is read once, when :mod:`qcow2rw.locks` is imported (the lock
classes of every image follow from it), so the production classes need a fresh
interpreter: this test runs the trap tests, the lock tests and the interrupt tests in
a subprocess with ``QCOW2RW_DEBUG_LOCKS=0``, then a short ``qcow2rw stress`` of every
lock mode (with the chaos thread) the same way.  About 30 s in all.

(Choosing the classes per image instead would let one process parametrize over both,
but it would put the debug switch into ``Image.__init__`` and ``inner_locks`` for the
sake of the tests; a subprocess tests exactly what production imports.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qcow2rw import locks

ROOT = Path(__file__).resolve().parent.parent
FILES = ["tests/test_traps.py", "tests/test_image_lock.py", "tests/test_lock_hardening.py",
         "tests/test_interrupts.py", "tests/test_write_compressed.py",
         "tests/test_extended_l2_write.py", "tests/test_inline.py",
         "tests/test_cache_discard_race.py",
         "tests/test_direct_io.py::test_unaligned_writes_into_one_block_from_many_threads",
         "tests/test_direct_io.py::test_unaligned_guest_writes_into_one_cluster_from_many_threads",
         "tests/test_direct_io.py::test_tracker_claim_given_back_when_the_wait_is_interrupted"]

pytestmark = pytest.mark.skipif(not locks.DEBUG_LOCKS,
                                reason="this run already uses the production classes")


def _production_env() -> dict[str, str]:
    env = dict(os.environ)
    env["QCOW2RW_DEBUG_LOCKS"] = "0"
    env.pop("PYTEST_ADDOPTS", None)
    return env


@pytest.mark.timeout(300)
def test_lock_tests_pass_with_the_production_classes(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "--basetemp", str(tmp_path / "basetemp"), *FILES],
        cwd=ROOT, env=_production_env(), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


@pytest.mark.timeout(200)
def test_stress_passes_with_the_production_classes(qemu: Any, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qcow2rw", "stress", "-j", "4", "--seed", "1106",
         "--duration", "2", "--rounds", "2", "--lock-mode", "all", "--cluster-size", "4k",
         "--size", "8M", "--switch-interval", "1e-6", "--chaos", "0.2",
         "--dir", str(tmp_path)],
        cwd=ROOT, env=_production_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "stress: OK" in proc.stdout
