"""``python -m qcow2rw``: the same command-line interface as the ``qcow2rw`` script."""

from __future__ import annotations

import sys

from qcow2rw.cli import main

if __name__ == "__main__":
    sys.exit(main())
