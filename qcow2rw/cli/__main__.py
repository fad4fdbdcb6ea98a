"""``python -m qcow2rw.cli``: the same as ``python -m qcow2rw``."""

from __future__ import annotations

import sys

from qcow2rw.cli import main

sys.exit(main())
