"""Shared fixtures: the QEMU tools; lock-ownership checking for the whole suite.

Interop tests ask for the ``qemu`` fixture.  When qemu-img/qemu-io are missing they
are skipped on a developer's machine but fail under ``CI=true``: CI installs
qemu-utils, so a missing binary there is a broken setup, not a reason to skip.
"""

from __future__ import annotations

import os

# The suite runs with lock-ownership checking on: every "Caller holds: ..." docstring
# is asserted (see qcow2rw.locks).  It must be set before qcow2rw is imported.
os.environ.setdefault("QCOW2RW_DEBUG_LOCKS", "1")

import pytest  # noqa: E402

from qcow2rw import qemutools  # noqa: E402


@pytest.fixture(scope="session")
def qemu():
    """The :mod:`qcow2rw.qemutools` module, when QEMU's tools are installed."""
    if not qemutools.available():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("qemu-img/qemu-io not found, and CI=true: interop tests must run in CI")
        pytest.skip("qemu-img/qemu-io not installed")
    return qemutools
