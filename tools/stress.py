#!/usr/bin/env python3
"""Concurrency stress of qcow2rw with a linearizability oracle (issue 4, item 5).

A thin script over :mod:`qcow2rw.devkit.stress` (it ships in the package so that the
``qcow2rw stress`` command reaches it too); the options are the same::

    python tools/stress.py -j 4 --seed 1 --duration 30 --lock-mode all --switch-interval 1e-6

Importable from a source tree: ``run_stress(path_dir, *, workers, seed, duration, ops,
lock_mode, cluster_size, size, rounds, switchinterval) -> StressResult`` and
``main(argv)``.  Exit status 0 when every lock mode passed, 1 otherwise (the failures
name the seed that reproduces them).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree

from qcow2rw.devkit.stress import StressResult, main, run_stress  # noqa: E402

__all__ = ["StressResult", "main", "run_stress"]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
