"""A hypothesis state machine against a shadow bytearray.

An ``initialize`` rule draws the image's shape (cluster size 512/4096/65536, compat,
lazy refcounts, an optional raw or qcow2 backing file made by qemu-img); then rules
write (unaligned), read (compare), discard, write_zeroes, flush and reopen (close and
open again read-write) on a 1 MiB image, each mirrored in :class:`helpers.Shadow`.
The teardown closes the image, requires ``qemu-img check`` exit 0 and compares
``qemu-img convert -O raw`` with the shadow.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, \
    run_state_machine_as_test

import qcow2rw
from qcow2rw import qemutools

from helpers import (KiB, MiB, Shadow, assert_same_bytes, make_raw_file, qcow2_backing_with_pattern,
                     qemu_check_clean, qemu_raw, read_all)

# interop: needs qemu-img/qemu-io (the `qemu` fixture); a hang fails this test alone,
# well before the suite-wide timeout (each test normally takes a second or two)
pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

SIZE = 1 * MiB


class ImageMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="qcow2rw-stateful-"))
        self.img = None
        self.shadow: Shadow | None = None
        self.path = self.dir / "img.qcow2"
        self.desc = ""
        self.history: list[str] = []
        # set while a rule runs: when a rule fails, the teardown only cleans up, so the
        # rule's failure is the one hypothesis reports and shrinks
        self.busy = False

    # ------------------------------------------------------------------ setup
    @initialize(cs=st.sampled_from([512, 4096, 65536]),
                compat=st.sampled_from(["1.1", "0.10"]),
                lazy=st.booleans(),
                backing=st.sampled_from([None, "raw", "qcow2"]),
                seed=st.integers(0, 2**31 - 1))
    def create(self, cs, compat, lazy, backing, seed):
        lazy = lazy and compat == "1.1"
        rng = random.Random(seed)
        base = None
        backing_name = backing_fmt = None
        if backing == "raw":
            base = make_raw_file(self.dir / "base.raw", SIZE - 64 * KiB, rng)   # shorter
            backing_name, backing_fmt = "base.raw", "raw"
        elif backing == "qcow2":
            qcow2_backing_with_pattern(qemutools, self.dir / "base.qcow2", SIZE, 4096, rng)
            base = qemu_raw(qemutools, self.dir / "base.qcow2", self.dir)
            backing_name, backing_fmt = "base.qcow2", "qcow2"
        self.desc = f"cs={cs} compat={compat} lazy={lazy} backing={backing} seed={seed}"
        self.img = qcow2rw.create(str(self.path), SIZE, cluster_size=cs, compat=compat,
                                  lazy_refcounts=lazy, backing_file=backing_name,
                                  backing_format=backing_fmt)
        self.shadow = Shadow(SIZE, cs, v3=compat != "0.10", base=base)

    # ------------------------------------------------------------------ helpers
    def _range(self, data, max_clusters: int = 3) -> tuple[int, int]:
        cs = self.shadow.cluster_size
        mode = data.draw(st.sampled_from(["aligned", "boundary", "any"]), label="mode")
        if mode == "aligned":
            off = data.draw(st.integers(0, SIZE // cs - 1), label="cluster") * cs
        elif mode == "boundary":
            off = data.draw(st.integers(1, SIZE // cs), label="cluster") * cs \
                + data.draw(st.integers(-600, 600), label="delta")
            off = min(max(off, 0), SIZE - 1)
        else:
            off = data.draw(st.integers(0, SIZE - 1), label="offset")
        length = data.draw(st.one_of(st.integers(1, min(cs, 4096)),
                                     st.just(cs),
                                     st.integers(1, max_clusters * cs)), label="length")
        return off, max(1, min(length, SIZE - off))

    def _ctx(self, what: str) -> str:
        return f"[{self.desc}] {what} after {self.history[-12:]}"

    # ------------------------------------------------------------------ rules
    @rule(data=st.data(), fill=st.integers(0, 2**31 - 1))
    def write(self, data, fill):
        off, n = self._range(data)
        buf = random.Random(fill).randbytes(n) if fill % 4 else bytes([fill % 251]) * n
        self.history.append(f"write({off:#x},{n:#x})")
        self.busy = True
        self.img.write(off, buf)
        self.shadow.write(off, buf)
        self.busy = False

    @rule(data=st.data())
    def read(self, data):
        off, n = self._range(data, max_clusters=4)
        self.history.append(f"read({off:#x},{n:#x})")
        self.busy = True
        assert_same_bytes(self.img.read(off, n), self.shadow.data[off:off + n],
                          self._ctx("read"), base=off, cluster_size=self.shadow.cluster_size)
        self.busy = False

    @rule(data=st.data())
    def discard(self, data):
        off, n = self._range(data)
        self.history.append(f"discard({off:#x},{n:#x})")
        self.busy = True
        self.img.discard(off, n)
        self.shadow.discard(off, n)
        self.busy = False

    @rule(data=st.data())
    def write_zeroes(self, data):
        off, n = self._range(data)
        self.history.append(f"write_zeroes({off:#x},{n:#x})")
        self.busy = True
        self.img.write_zeroes(off, n)
        self.shadow.write_zeroes(off, n)
        self.busy = False

    @rule()
    def flush(self):
        self.history.append("flush")
        self.busy = True
        self.img.flush()
        self.busy = False

    @rule()
    def reopen(self):
        self.history.append("reopen")
        self.busy = True
        self.img.close()
        self.img = None
        self.img = qcow2rw.open(str(self.path))
        assert self.img.size == SIZE, self._ctx("reopen")
        assert self.img.cluster_size == self.shadow.cluster_size, self._ctx("reopen")
        self.busy = False

    @invariant()
    def size_unchanged(self):
        if self.img is not None:
            assert self.img.size == SIZE

    # ------------------------------------------------------------------ teardown
    def teardown(self):
        try:
            if self.img is not None and self.shadow is not None and not self.busy:
                assert_same_bytes(read_all(self.img), self.shadow.data,
                                  self._ctx("final read"), cluster_size=self.shadow.cluster_size)
                self.img.close()
                self.img = None
                qemu_check_clean(qemutools, self.path, self._ctx("teardown"))
                assert_same_bytes(qemu_raw(qemutools, self.path, self.dir), self.shadow.data,
                                  self._ctx("qemu-img convert at teardown"),
                                  cluster_size=self.shadow.cluster_size)
        finally:
            if self.img is not None:
                try:
                    self.img.close()
                except Exception:
                    pass
            shutil.rmtree(self.dir, ignore_errors=True)


def test_stateful(qemu):
    """Random rule sequences against the shadow; qemu-img judges each final image."""
    run_state_machine_as_test(
        ImageMachine,
        settings=settings(max_examples=100, stateful_step_count=30, deadline=None,
                          database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large]),
    )
