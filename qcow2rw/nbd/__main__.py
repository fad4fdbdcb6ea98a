"""``python -m qcow2rw.nbd [options] IMG``: the same as ``qcow2rw serve``."""

from __future__ import annotations

import sys

from qcow2rw.nbd.cli import main

if __name__ == "__main__":
    sys.exit(main())
