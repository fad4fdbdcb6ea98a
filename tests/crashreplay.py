"""Crash states from a write log, and the oracle that checks them (issue 7, DESIGN §6).

Test tooling, not installed with the package: the tests import it as ``crashreplay``
(as they import ``helpers``), and ``tools/crashtest.py`` puts ``tests/`` on ``sys.path``.

Recording: a :class:`Recorder` runs a workload on an image whose :class:`HostFile`
keeps a write log (every pwrite, truncate, fallocate and fsync, once it returned)
and adds markers for the guest operations: ``start``/``ack`` around each request and
``fstart``/``fdone`` around each flush.  :func:`record` turns that into a
:class:`Recording`: the file's bytes before the workload, the I/O entries, and the
guest operations with their positions in the log.

Crash states (the model of dm-log-writes, CrashMonkey and ALICE): what a power cut
can leave on the disk.  Everything before the last fsync that returned is there;
of the writes since, any subset may be there, in any order, and a write may be torn
at a sector boundary.  :func:`crash_states` enumerates, as :class:`StateSpec`:
every prefix ending at a barrier, every prefix inside an epoch, each single write
of an epoch dropped, a bounded random sample of subsets in random order, and torn
writes cut at 512-byte and 4 KiB boundaries.

The oracle (:func:`check_state`): ``qemu-img check``-equivalent figures with no
corruption (leaks allowed; with lazy refcounts a dirty bit and a repair that
reaches clean instead), every guest write acknowledged before the last completed
flush reads back, every other sector holds its old data or the data of a write
that covered it (never a third value), the image opens read-write in qcow2rw and
(at the ``full`` level) in QEMU, and ``check -r leaks`` reaches clean.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcow2rw import qemutools
from qcow2rw.aio import AioImage
from qcow2rw.check import check_image
from qcow2rw.create import create
from qcow2rw.events import EventPoints
from qcow2rw.format import INCOMPAT_DIRTY
from qcow2rw.image import open_for_check, open_image
from qcow2rw.storage import FaultInjector

SECTOR = 512
LogEntry = tuple[str, int, bytes]
IO_KINDS = ("write", "truncate", "extend", "sync")


# Recording ------------------------------------------------------------------------

@dataclass
class GuestOp:
    """One acknowledged-or-not guest request: its effect on the disk and its log positions.

    ``kind`` is ``write`` (``data``), ``zero`` (discard and write_zeroes: the range
    reads as zeros), ``resize`` (``length`` is the new size) or ``meta`` (snapshots:
    no effect on the data).  ``ack`` is the marker's index in the whole log (-1: never
    acknowledged).
    """

    op_id: int
    kind: str
    offset: int
    length: int
    data: bytes | None = None
    start: int = -1
    ack: int = -1


@dataclass
class Flush:
    """A guest flush: indices of its start marker and done marker (whole log), the
    number of I/O entries before its done marker, and ``sync_io``: the number of I/O
    entries up to and including the last sync logged before its done marker.

    A sync is logged when it starts, so the sync that made the flush's writes durable
    is that one or an earlier one: every crash state whose durable part reaches
    ``sync_io`` must hold what the flush covered, whatever other threads logged
    between that sync and the done marker.
    """

    start: int
    done: int = -1
    done_io: int = -1
    sync_io: int = 0


@dataclass
class Recording:
    """A workload's write log, ready for replay."""

    name: str
    start_image: bytes
    io: list[LogEntry]
    ops: list[GuestOp]
    flushes: list[Flush]
    initial_disk: bytes  # what the guest disk read as before the workload
    initial_size: int
    backing: str | None = None
    lazy: bool = False
    expectations: dict[int, Expectation] = field(default_factory=dict, repr=False, compare=False)

    def expectation(self, barrier: int) -> Expectation:
        """The :class:`Expectation` at *barrier* (cached: states share barriers)."""
        found = self.expectations.get(barrier)
        if found is None:
            found = self.expectations[barrier] = Expectation(self, barrier)
        return found

    @property
    def model_size(self) -> int:
        """The largest virtual size the disk ever had."""
        return max([self.initial_size] + [op.length for op in self.ops if op.kind == "resize"])


class Recorder:
    """Runs guest requests on an image and marks them in its write log (thread-safe).

    ``_ids`` is an ``itertools.count`` (atomic under the GIL); ``ops`` and ``flushes``
    are dicts written once per key, so threads need no lock.
    """

    def __init__(self, img: Any) -> None:
        self.img = img
        self._ids = itertools.count()
        self.ops: dict[int, GuestOp] = {}
        self.flushes: dict[int, Flush] = {}
        self._log = img.file.log
        assert self._log is not None, "turn the write log on first (img.file.log = [])"

    def _run(self, kind: str, offset: int, length: int, data: bytes | None,
             func: Callable[[], Any]) -> Any:
        op_id = next(self._ids)
        self.img.file.note("start", op_id)
        self.ops[op_id] = GuestOp(op_id, kind, offset, length, data)
        result = func()
        self.img.file.note("ack", op_id)
        return result

    def write(self, offset: int, data: bytes) -> None:
        """img.write, recorded."""
        self._run("write", offset, len(data), bytes(data), lambda: self.img.write(offset, data))

    def write_zeroes(self, offset: int, length: int) -> None:
        """img.write_zeroes, recorded."""
        self._run("zero", offset, length, None, lambda: self.img.write_zeroes(offset, length))

    def discard(self, offset: int, length: int) -> None:
        """img.discard of whole clusters, recorded (they read as zeros afterwards)."""
        cs = self.img.cluster_size
        lo, hi = (offset + cs - 1) // cs * cs, (offset + length) // cs * cs
        self._run("zero", lo, max(0, hi - lo), None, lambda: self.img.discard(offset, length))

    def resize(self, size: int) -> None:
        """img.resize (shrinking allowed), recorded."""
        shrink = size < self.img.size
        self._run("resize", 0, size, None, lambda: self.img.resize(size, shrink=shrink))

    def create_snapshot(self, name: str) -> None:
        """img.create_snapshot, recorded."""
        self._run("meta", 0, 0, None, lambda: self.img.create_snapshot(name))

    def delete_snapshot(self, name: str) -> None:
        """img.delete_snapshot, recorded."""
        self._run("meta", 0, 0, None, lambda: self.img.delete_snapshot(name))

    def flush(self) -> None:
        """img.flush, recorded."""
        flush_id = next(self._ids)
        self.img.file.note("fstart", flush_id)
        self.flushes[flush_id] = Flush(-1)
        self.img.flush()
        self.img.file.note("fdone", flush_id)


def split_log(log: list[LogEntry], rec: Recorder) -> tuple[list[LogEntry], list[GuestOp], list[Flush]]:
    """Separate I/O entries from markers; give each guest op and flush its positions.

    A sync is placed where it returned, and the writes that returned while it ran
    after it: it covers only what returned before it started (see ``HostFile.log``).
    """
    io: list[LogEntry] = []
    last_sync = 0
    during_sync: list[LogEntry] | None = None  # what returned while a sync ran
    for index, (kind, value, data) in enumerate(log):
        if kind == "sync-start":
            io.extend(during_sync or ())  # (a sync that never ended covers nothing)
            during_sync = []
        elif kind in ("sync", "sync-failed"):
            # A sync covers what returned before it started; what returned while it
            # ran goes after it (the order is still one that really happened).
            if kind == "sync":
                io.append((kind, value, data))
                last_sync = len(io)
            io.extend(during_sync or ())
            during_sync = None
        elif kind in IO_KINDS:
            (io if during_sync is None else during_sync).append((kind, value, data))
        elif kind == "start":
            rec.ops[value].start = index
        elif kind == "ack":
            rec.ops[value].ack = index
        elif kind == "fstart":
            rec.flushes[value].start = index
        elif kind == "fdone":
            flush = rec.flushes[value]
            flush.done, flush.done_io, flush.sync_io = index, len(io), last_sync
    ops = sorted(rec.ops.values(), key=lambda op: op.op_id)
    flushes = sorted((f for f in rec.flushes.values() if f.done >= 0), key=lambda f: f.done)
    return io, ops, flushes


def record(name: str, path: str | os.PathLike[str], workload: Callable[[Recorder], None], *,
           open_opts: dict[str, Any] | None = None) -> Recording:
    """Run *workload* on the image at *path* with the write log on; return its recording.

    The image is opened here, and closed after the workload (a close is a flush).
    """
    path = os.fspath(path)
    start_image = Path(path).read_bytes()
    img = open_image(path, **(open_opts or {}))
    try:
        initial_size = img.size
        initial_disk = img.read(0, initial_size)
        backing = img.backing_file
        lazy = bool(img.header.lazy_refcounts)
        img.file.log = []
        rec = Recorder(img)
        workload(rec)
        rec.flush()  # the close's flush, marked as a guest flush
    finally:
        img.close()
    log = img.file.log
    assert log is not None
    io, ops, flushes = split_log(log, rec)
    return Recording(name, start_image, io, ops, flushes, initial_disk, initial_size,
                     backing=backing, lazy=lazy)


# Crash states ---------------------------------------------------------------------

@dataclass(frozen=True)
class StateSpec:
    """A crash state: the first ``base`` I/O entries, then ``extra`` as (index, cut).

    ``cut`` None applies the entry whole; an int > 0 keeps only its first ``cut`` bytes,
    an int < 0 only what follows its first ``-cut`` bytes (torn writes).  Everything up
    to the last sync inside ``base`` is durable.
    """

    label: str
    base: int
    extra: tuple[tuple[int, int | None], ...] = ()


def apply_entry(disk: bytearray, entry: LogEntry, cut: int | None = None) -> None:
    """Apply one I/O entry (or part of a write, see :class:`StateSpec`) to a file image."""
    kind, value, data = entry
    if kind == "write":
        if cut is not None and cut > 0:
            data = data[:cut]
        elif cut is not None:
            value, data = value - cut, data[-cut:]
        end = value + len(data)
        if len(disk) < end:
            disk.extend(bytes(end - len(disk)))
        disk[value:end] = data
    elif kind == "truncate":
        del disk[value:]
        disk.extend(bytes(max(0, value - len(disk))))
    elif kind == "extend" and len(disk) < value:
        disk.extend(bytes(value - len(disk)))


class StateBuilder:
    """Materialises states of one recording, walking forward through the log (specs in
    ``base`` order make that one pass)."""

    def __init__(self, rec: Recording) -> None:
        self.rec = rec
        self.disk = bytearray(rec.start_image)
        self.pos = 0

    def build(self, spec: StateSpec) -> bytes:
        """The file's bytes in crash state *spec*."""
        if spec.base < self.pos:
            self.disk, self.pos = bytearray(self.rec.start_image), 0
        while self.pos < spec.base:
            apply_entry(self.disk, self.rec.io[self.pos])
            self.pos += 1
        if not spec.extra:
            return bytes(self.disk)
        disk = bytearray(self.disk)
        for index, cut in spec.extra:
            apply_entry(disk, self.rec.io[index], cut)
        return bytes(disk)


def _torn_cuts(length: int) -> list[int]:
    """Where a write of *length* bytes may tear: 512-byte and 4 KiB boundaries, bounded."""
    cuts = {SECTOR, length // 2 // SECTOR * SECTOR, length - SECTOR, 4096,
            (length - 1) // 4096 * 4096}
    return sorted(c for c in cuts if 0 < c < length)


def crash_states(rec: Recording, *, full: bool = True, reorders: int = 6,
                 seed: int = 0) -> list[StateSpec]:
    """The crash states of a recording.

    Always: every prefix ending at a barrier and each single write of an epoch dropped.
    With *full*: also every prefix inside an epoch, *reorders* random subsets in random
    order per epoch, and torn writes.
    """
    rng = random.Random(seed)
    io = rec.io
    specs: list[StateSpec] = []
    epoch_start = 0
    for index in range(len(io) + 1):
        at_end = index == len(io)
        if not at_end and io[index][0] != "sync":
            if full:
                specs.append(StateSpec(f"prefix {index + 1}", index + 1))
            continue
        # io[epoch_start:index] is an epoch (writes between two barriers)
        epoch = list(range(epoch_start, index))
        specs.append(StateSpec(f"barrier {index}", index))
        if len(epoch) >= 2:
            for drop in epoch:
                specs.append(StateSpec(f"epoch {epoch_start}-{index} without {drop}", epoch_start,
                                       tuple((i, None) for i in epoch if i != drop)))
        if full and len(epoch) >= 2:
            for n in range(reorders):
                subset = [i for i in epoch if rng.random() < 0.6]
                rng.shuffle(subset)
                specs.append(StateSpec(f"epoch {epoch_start}-{index} reorder #{n}", epoch_start,
                                       tuple((i, None) for i in subset)))
        if full:
            for pos, entry_index in enumerate(epoch):
                kind, _, data = io[entry_index]
                if kind != "write" or len(data) <= SECTOR:
                    continue
                before = tuple((i, None) for i in epoch[:pos])
                for cut in _torn_cuts(len(data)):
                    specs.append(StateSpec(f"write {entry_index} torn at {cut}", epoch_start,
                                           before + ((entry_index, cut),)))
                    specs.append(StateSpec(f"write {entry_index} torn at {cut}, head lost",
                                           epoch_start, before + ((entry_index, -cut),)))
        epoch_start = index + 1
    return specs


def unique_states(rec: Recording, specs: list[StateSpec]) -> Iterator[tuple[StateSpec, bytes]]:
    """Materialise *specs* in log order, skipping states already seen (same bytes)."""
    builder = StateBuilder(rec)
    seen: set[bytes] = set()
    for spec in sorted(specs, key=lambda s: s.base):
        state = builder.build(spec)
        digest = hashlib.blake2b(state, digest_size=16).digest()
        if digest in seen:
            continue
        seen.add(digest)
        yield spec, state


# The oracle -----------------------------------------------------------------------

class Expectation:
    """What the guest disk may read as once everything up to I/O entry ``barrier`` is
    durable: the durable image, and per sector the other values it may hold."""

    def __init__(self, rec: Recording, barrier: int) -> None:
        done = [f for f in rec.flushes if f.sync_io <= barrier]
        flushed_before = max((f.start for f in done), default=-1)
        durable = [op for op in rec.ops if 0 <= op.ack < flushed_before]
        later = [op for op in rec.ops if not 0 <= op.ack < flushed_before]
        size = rec.model_size
        disk = bytearray(rec.initial_disk) + bytearray(size - len(rec.initial_disk))
        disk_size = rec.initial_size
        self.flushed: set[int] = set()  # sectors a durable request wrote
        for op in sorted(durable, key=lambda o: o.ack):
            disk_size = _apply_op(disk, op, disk_size)
            if op.kind in ("write", "zero"):
                self.flushed.update(range(op.offset // SECTOR, (op.offset + op.length + SECTOR - 1)
                                          // SECTOR))
        self.durable = bytes(disk)
        self.sizes = {disk_size} | {op.length for op in later if op.kind == "resize"}
        self.durable_size = disk_size
        self.durable_ops = len(durable)
        self.later: dict[int, set[bytes]] = {}
        for op in later:
            if op.kind in ("write", "zero"):
                self._allow(op.offset, op.length, op.data)
        if len(self.sizes) > 1:  # a resize that may have happened: between the sizes, zeros
            lo, hi = min(self.sizes), max(self.sizes)
            self._allow(lo, hi - lo, None)

    def _allow(self, offset: int, length: int, data: bytes | None) -> None:
        for sector in range(offset // SECTOR, (offset + length + SECTOR - 1) // SECTOR):
            lo, hi = sector * SECTOR, (sector + 1) * SECTOR
            cur = bytearray(self.durable[lo:hi])
            a, b = max(lo, offset), min(hi, offset + length)
            cur[a - lo:b - lo] = data[a - offset:b - offset] if data is not None else bytes(b - a)
            self.later.setdefault(sector, set()).add(bytes(cur))

    def problems(self, disk: bytes, size: int) -> tuple[list[str], list[str]]:
        """(lost flushed data, third values) of a disk read back with virtual size *size*."""
        lost: list[str] = []
        third: list[str] = []
        if size not in self.sizes:
            lost.append(f"virtual size {size}, expected one of {sorted(self.sizes)}")
        n = min(size, len(self.durable), len(disk))
        if disk[:n] == self.durable[:n]:
            return lost, third
        for sector in range(n // SECTOR):
            lo, hi = sector * SECTOR, (sector + 1) * SECTOR
            got = disk[lo:hi]
            if got == self.durable[lo:hi]:
                continue
            allowed = self.later.get(sector)
            if allowed is not None and got in allowed:
                continue
            if sector in self.flushed:
                lost.append(f"sector {sector} (offset {lo:#x}) lost its flushed data")
            else:
                third.append(f"sector {sector} (offset {lo:#x}) holds neither old nor new data")
            if len(lost) + len(third) > 5:
                break
        return lost, third


def _apply_op(disk: bytearray, op: GuestOp, size: int) -> int:
    if op.kind == "write":
        assert op.data is not None
        disk[op.offset:op.offset + op.length] = op.data
    elif op.kind == "zero":
        disk[op.offset:op.offset + op.length] = bytes(op.length)
    elif op.kind == "resize":
        lo, hi = sorted((op.length, size))
        disk[lo:hi] = bytes(hi - lo)
        return op.length
    return size


@dataclass
class StateResult:
    """The verdict on one crash state."""

    label: str
    corruption: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    dirty: bool = False
    leaks: int = 0

    @property
    def ok(self) -> bool:
        """True when nothing is wrong with the state."""
        return not (self.corruption or self.lost or self.other)

    def __str__(self) -> str:
        parts = self.corruption + self.lost + self.other
        return f"{self.label}: " + ("ok" if not parts else "; ".join(parts[:6]))


def our_check(path: str, repair: str | None = None) -> Any:
    """qcow2rw's ``qemu-img check`` of the file at *path* (a CheckResult)."""
    img = open_for_check(path, repair=bool(repair), force_share=not repair)
    try:
        return check_image(img, repair)
    finally:
        img.close()


def check_state(rec: Recording, spec: StateSpec, state: bytes, workdir: str | os.PathLike[str],
                *, qemu: str = "check") -> StateResult:
    """Check one crash state (see the module docstring).

    *qemu*: ``none`` (qcow2rw only), ``check`` (also ``qemu-img check``), ``full``
    (also ``check -r leaks``/``-r all`` then clean, and a read-write open with a write
    in ``qemu-io``).
    """
    res = StateResult(spec.label)
    workdir = os.fspath(workdir)
    path = os.path.join(workdir, "state.qcow2")
    with open(path, "wb") as f:
        f.write(state)
    dirty = len(state) >= 80 and bool(int.from_bytes(state[72:80], "big") & INCOMPAT_DIRTY)
    res.dirty = dirty
    try:
        ours = our_check(path)
    except Exception as exc:  # noqa: BLE001 (an image we cannot even check is a failure)
        res.corruption.append(f"our check failed: {exc!r}")
        return res
    res.leaks = ours.leaks
    if ours.error or ours.check_errors:
        res.corruption.append(f"our check: error {ours.error} check-errors {ours.check_errors}")
    if ours.corruptions and not dirty:
        res.corruption.append(f"our check: {ours.corruptions} corruptions "
                              f"{[m for m in ours.messages if 'ERROR' in m][:3]}")
    if qemu != "none":
        rc, data = _qemu_check(path)
        if rc not in (0, 3) and not (dirty and rc == 2):
            res.corruption.append(f"qemu-img check exit {rc}: corruptions "
                                  f"{data.get('corruptions')} {data.get('_stderr', '')[:300]}")
    # The data, read back by qcow2rw (read-only: a dirty image is not repaired here).
    barrier = _barrier(rec, spec.base)
    try:
        img = open_image(path, readonly=True, force_share=True)
        try:
            size = img.size
            disk = img.read(0, size)
        finally:
            img.close()
        lost, third = rec.expectation(barrier).problems(disk, size)
        res.lost += lost
        res.other += third
    except Exception as exc:  # noqa: BLE001 (reported as the state's failure)
        res.other.append(f"read-only open/read failed: {exc!r}")
    # Read-write open in qcow2rw (repairs a dirty image), one write, close, check.
    rw = os.path.join(workdir, "rw.qcow2")
    shutil.copyfile(path, rw)
    try:
        img = open_image(rw)  # a dirty image is repaired here
        try:
            if dirty:
                repaired = img.check()
                if repaired.corruptions or repaired.leaks or repaired.check_errors:
                    res.other.append(f"the repair on open left {repaired.corruptions} "
                                     f"corruptions, {repaired.leaks} leaks")
            img.write(0, b"\x5a" * SECTOR)
        finally:
            img.close()
        # (Leaks may show now: a refcount past the old end of file is not checked.)
        after = our_check(rw)
        if after.corruptions or after.check_errors or after.error:
            res.corruption.append(f"after a read-write open in qcow2rw: {after.corruptions} "
                                  f"corruptions {after.error or ''}")
    except Exception as exc:  # noqa: BLE001 (reported as the state's failure)
        res.other.append(f"read-write open in qcow2rw failed: {exc!r}")
    if qemu == "full":
        _qemu_full(path, rw, dirty, res)
    return res


def _qemu_full(path: str, scratch: str, dirty: bool, res: StateResult) -> None:
    """``check -r leaks`` (``-r all`` when dirty) then clean; QEMU opens it read-write."""
    shutil.copyfile(path, scratch)
    rc, data = _qemu_check(scratch, repair="all" if dirty else "leaks")
    if rc not in (0, 3) and not (dirty and rc == 2):
        res.corruption.append(f"qemu-img check -r: exit {rc} {data.get('_stderr', '')[:200]}")
    rc, data = _qemu_check(scratch)
    if rc != 0:
        res.corruption.append(f"after qemu-img check -r: exit {rc} {data.get('_stderr', '')[:200]}")
    shutil.copyfile(path, scratch)
    for _ in range(_LOCK_RETRIES):
        proc = qemutools.run(qemutools.QEMU_IO, "-f", "qcow2", "-c", "write -P 0x6b 0 512",
                             scratch, check=False)
        if "lock" not in proc.stderr:
            break
        time.sleep(0.05)
    if proc.returncode != 0 or "failed" in proc.stdout + proc.stderr:
        res.other.append(f"qemu-io write failed: {(proc.stdout + proc.stderr)[:200]}")
    rc, data = _qemu_check(scratch)
    if rc not in (0, 3):
        res.corruption.append(f"after a qemu-io write: qemu-img check exit {rc}")


# A thread that forks a process (another state's qemu-img) briefly shares our open
# descriptors with the child, and with them their OFD image locks: a qemu-img run at
# that instant may find the image locked.  That is the harness, not the image: retry.
_LOCK_RETRIES = 20


def _qemu_check(path: str, repair: str | None = None) -> tuple[int, dict[str, Any]]:
    for _ in range(_LOCK_RETRIES):
        rc, data = qemutools.check(path, repair=repair)
        if "lock" not in data.get("_stderr", ""):
            break
        time.sleep(0.05)
    return rc, data


def _barrier(rec: Recording, base: int) -> int:
    """Number of I/O entries up to and including the last sync among the first *base*."""
    for index in range(min(base, len(rec.io)) - 1, -1, -1):
        if rec.io[index][0] == "sync":
            return index + 1
    return 0


# Running --------------------------------------------------------------------------

@dataclass
class Summary:
    """Totals over many crash states."""

    states: int = 0
    corruptions: int = 0
    lost: int = 0
    other: int = 0
    failures: list[str] = field(default_factory=list)

    def add(self, result: StateResult) -> None:
        """Count one state's verdict."""
        self.states += 1
        self.corruptions += bool(result.corruption)
        self.lost += bool(result.lost)
        self.other += bool(result.other)
        if not result.ok:
            self.failures.append(str(result))

    def merge(self, other: Summary) -> None:
        """Add another summary's totals."""
        self.states += other.states
        self.corruptions += other.corruptions
        self.lost += other.lost
        self.other += other.other
        self.failures += other.failures

    def line(self) -> str:
        """The summary line."""
        text = (f"{self.states} crash states checked, {self.corruptions} corruptions, "
                f"{self.lost} lost flushed writes")
        if self.other:
            text += f", {self.other} other failures"
        return text


def check_recording(rec: Recording, specs: list[StateSpec], *, qemu: str = "check",
                    qemu_sample: int = 0, seed: int = 0,
                    workdir: str | os.PathLike[str] | None = None) -> Summary:
    """Check every distinct state of *specs*, in this process.

    With *qemu_sample* > 0, QEMU runs (at level *qemu*) on that many states chosen at
    random plus every state our own checks fail; the others are checked by qcow2rw
    alone.
    """
    rng = random.Random(seed)
    summary = Summary()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        pending: list[tuple[StateSpec, bytes]] = list(unique_states(rec, specs))
        chosen = set(rng.sample(range(len(pending)), min(qemu_sample, len(pending)))) \
            if qemu_sample else set(range(len(pending)))
        for n, (spec, state) in enumerate(pending):
            level = qemu if n in chosen else "none"
            result = check_state(rec, spec, state, tmp, qemu=level)
            if not result.ok and level != qemu:
                result = check_state(rec, spec, state, tmp, qemu=qemu)
            summary.add(result)
    return summary


def check_parallel(recs: list[Recording], *, full: bool, qemu: str, jobs: int,
                   reorders: int = 6, seed: int = 0,
                   progress: Callable[[str], None] | None = None) -> Summary:
    """Check every crash state of every recording, *jobs* states at a time (threads:
    the time goes into qemu-img and the file system, which release the GIL)."""
    total = Summary()
    for rec in recs:
        specs = crash_states(rec, full=full, reorders=reorders, seed=seed)
        states = list(unique_states(rec, specs))
        summary = Summary()

        def one(item: tuple[StateSpec, bytes], rec: Recording = rec) -> StateResult:
            with tempfile.TemporaryDirectory() as tmp:
                return check_state(rec, item[0], item[1], tmp, qemu=qemu)

        with ThreadPoolExecutor(jobs) as pool:
            for result in pool.map(one, states):
                summary.add(result)
        if progress is not None:
            progress(f"{rec.name}: {len(rec.io)} log entries, {summary.line()}")
        total.merge(summary)
    return total


def qemu_available() -> bool:
    """True when qemu-img and qemu-io are installed."""
    return qemutools.available()


__all__ = ["Expectation", "Flush", "GuestOp", "Recorder", "Recording", "StateResult",
           "StateSpec", "Summary", "apply_entry", "check_parallel", "check_recording",
           "check_state", "crash_states", "qemu_available", "record", "unique_states"]


# Workloads ------------------------------------------------------------------------

def _pattern(tag: int, length: int) -> bytes:
    """Data unique to *tag*, different in every sector."""
    out = bytearray()
    for sector in range((length + SECTOR - 1) // SECTOR):
        head = f"{tag:08d}:{sector:06d}:".encode()
        out += (head * (SECTOR // len(head) + 1))[:SECTOR]
    return bytes(out[:length])


def _wl_alloc(r: Recorder) -> None:
    cs = r.img.cluster_size
    for i in range(24):
        r.write((i * 37 % 61) * 3 * cs, _pattern(i, (1 + i % 3) * cs))
        if i % 4 == 3:
            r.flush()


def _wl_l2_tables(r: Recorder) -> None:
    span = r.img.cluster_size << r.img.l2_bits
    for i in range(16):
        r.write(i * span + (i % 5) * r.img.cluster_size, _pattern(100 + i, 2 * r.img.cluster_size))
        if i % 3 == 2:
            r.flush()


def _wl_refblocks(r: Recorder) -> None:
    for i in range(48):
        r.write(i * 8192, _pattern(200 + i, 8192))
        if i % 6 == 5:
            r.flush()


def _wl_reftable(r: Recorder) -> None:
    for i in range(72):
        r.write(i * 32768, _pattern(300 + i, 32768))
        if i % 9 == 8:
            r.flush()


def _wl_l1_grow(r: Recorder) -> None:
    r.write(0, _pattern(400, 4096))
    r.flush()
    r.resize(4 << 20)
    r.write(3 << 20, _pattern(401, 4096))
    r.write(1024, _pattern(402, 1024))
    r.flush()
    r.resize(10 << 20)
    r.write(9 << 20, _pattern(403, 2048))
    r.flush()


def _wl_cow_backing(r: Recorder) -> None:
    cs = r.img.cluster_size
    for i in range(12):
        r.write(i * 3 * cs + (i % 7) * SECTOR, _pattern(500 + i, SECTOR * (1 + i % 4)))
        if i % 3 == 2:
            r.flush()
    r.write(40 * cs - 2 * SECTOR, _pattern(520, 4 * SECTOR))  # spans two clusters
    r.flush()


def _wl_partial(r: Recorder) -> None:
    cs = r.img.cluster_size
    for i in range(16):
        offset = (i % 6) * cs + (i * 3 % 8) * SECTOR
        r.write(offset, _pattern(600 + i, SECTOR * (1 + i % 3)))
        if i % 2 == 1:
            r.flush()
    r.write(10 * cs + 100, b"\x11" * 300)  # unaligned inside one sector
    r.write(12 * cs - 700, _pattern(620, 1500))
    r.flush()


def _wl_discard_zero(r: Recorder) -> None:
    cs = r.img.cluster_size
    r.write(0, _pattern(700, 32 * cs))
    r.flush()
    r.discard(4 * cs, 6 * cs)
    r.write_zeroes(12 * cs, 4 * cs)
    r.write_zeroes(20 * cs + SECTOR, 3 * SECTOR)
    r.flush()
    r.write(5 * cs, _pattern(701, cs))
    r.discard(0, 2 * cs)
    r.write_zeroes(24 * cs, 8 * cs)
    r.flush()


def _wl_snapshot(r: Recorder) -> None:
    cs = r.img.cluster_size
    r.write(0, _pattern(800, 16 * cs))
    r.flush()
    r.create_snapshot("s1")
    r.write(2 * cs, _pattern(801, 2 * cs))
    r.write(40 * cs, _pattern(802, cs))
    r.flush()
    r.create_snapshot("s2")
    r.write(3 * cs + SECTOR, _pattern(803, SECTOR))
    r.delete_snapshot("s1")
    r.write(8 * cs, _pattern(804, cs))
    r.flush()
    r.delete_snapshot("s2")
    r.write(9 * cs, _pattern(805, cs))
    r.flush()


def _wl_resize(r: Recorder) -> None:
    size = r.img.size
    r.write(0, _pattern(900, 8192))
    r.write(size - 8192, _pattern(901, 8192))
    r.flush()
    r.resize(2 * size)
    r.write(size + 4096, _pattern(902, 8192))
    r.flush()
    r.resize(size // 2, )
    r.write(4096, _pattern(903, 4096))
    r.flush()
    r.resize(size)
    r.write(size - 4096, _pattern(904, 2048))
    r.flush()


def _wl_lazy(r: Recorder) -> None:
    cs = r.img.cluster_size
    span = cs << r.img.l2_bits
    for i in range(20):
        r.write((i % 7) * span + i * cs, _pattern(1000 + i, cs * (1 + i % 2)))
        if i % 5 == 4:
            r.flush()


def _wl_concurrent(r: Recorder, seed: int = 7, ops: int = 20) -> None:
    """Four threads, each writing its own clusters (cluster index = t mod 4), flushing
    at random; a thread's writes are in order, the threads' interleave freely."""
    cs = r.img.cluster_size
    clusters = r.img.size // cs
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        rng = random.Random(seed * 10 + t)
        try:
            for k in range(ops):
                cluster = rng.randrange(clusters // 4) * 4 + t
                sectors = cs // SECTOR
                first = rng.randrange(sectors)
                count = rng.randrange(1, sectors - first + 1)
                r.write(cluster * cs + first * SECTOR, _pattern(2000 + t * 100 + k, count * SECTOR))
                if rng.random() < 0.15:
                    r.flush()
        except BaseException as exc:  # noqa: BLE001 (re-raised in the caller)
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]


def _wl_threads_evicting(r: Recorder, seed: int = 11, threads: int = 6, ops: int = 24,
                         run: int = 1, whole: float = 0.0) -> None:
    """Six threads on an 8-table L2 cache (32 tables' worth of disk): allocating and
    in-place writes, discards and zeroing of each thread's own clusters (cluster index
    = t mod 6, so the tables and the allocator are shared and the expected disk does
    not depend on the interleaving), flushes from every thread.  Evictions write L2
    tables back on one thread while another flushes; the switch interval is tiny so
    the threads interleave inside requests, and the log keeps the order as it
    happened (a sync where it started)."""
    cs = r.img.cluster_size
    owned = r.img.size // cs // run // threads  # runs of *run* clusters, t mod threads
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def worker(t: int) -> None:
        rng = random.Random(seed * 100 + t)
        try:
            start.wait()
            for k in range(ops):
                cluster = (rng.randrange(owned) * threads + t) * run
                roll = rng.random()
                if roll < 0.1:
                    r.discard(cluster * cs, run * cs)
                elif roll < 0.15:
                    r.write_zeroes(cluster * cs, run * cs)
                else:
                    first = rng.randrange(run * cs // SECTOR)
                    count = rng.randrange(1, run * cs // SECTOR - first + 1)
                    if rng.random() < whole:  # the whole run (allocates it all)
                        first, count = 0, run * cs // SECTOR
                    r.write(cluster * cs + first * SECTOR,
                            _pattern(3000 + t * 100 + k, count * SECTOR))
                if rng.random() < 0.2:
                    r.flush()
        except BaseException as exc:  # noqa: BLE001 (re-raised in the caller)
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()
    finally:
        sys.setswitchinterval(interval)
    if errors:
        raise errors[0]


def _wl_threads_growing(r: Recorder) -> None:
    """Four threads allocating 8 KiB runs of their own while the refcount table grows
    (64-bit refcounts, 512-byte clusters: a block covers 64 clusters, the table 4096),
    with an 8-table cache: growths are prepared by one thread's allocation and
    committed by whichever write-back or flush comes next, while the others allocate
    into the new blocks."""
    _wl_threads_evicting(r, seed=23, threads=4, ops=120, run=16, whole=0.8)


def _wl_writeback_race(r: Recorder) -> None:
    """A flush that runs while another thread's eviction is inside its store.

    With an 8-table cache, eight cached tables get new clusters (dirty); then one
    thread reads a ninth table, whose load evicts a dirty one, and is held at
    ``l2_writeback_start`` (the table's lock held, its store not yet made).  Another
    thread flushes meanwhile: the flush must not return before that store (it did,
    when the dirty flag was cleared before the store: the crash state at the flush's
    last sync then lacked the table, and a flushed write with it).  The held store is
    let go when the flush returns, or after half a second.
    """
    cs = r.img.cluster_size
    span = cs << r.img.l2_bits
    for t in range(16):
        r.write(t * span, _pattern(4000 + t, cs))
    r.flush()  # tables 8..15 are the cached ones now, clean
    for t in range(8, 16):
        r.write(t * span + 3 * cs, _pattern(4100 + t, cs))  # each of them dirty
    events = r.img.events = EventPoints()
    events.set_break("l2_writeback_start")
    reader = threading.Thread(target=r.img.read, args=(0, cs))  # loads table 0: evicts
    reader.start()
    try:
        if not events.wait_break("l2_writeback_start", 10):
            raise RuntimeError("no write-back reached writeback_start")
        flusher = threading.Thread(target=r.flush)
        flusher.start()
        flusher.join(0.5)
    finally:
        events.resume("l2_writeback_start")
        reader.join()
    flusher.join()
    r.img.events = None
    r.write(2 * span + 5 * cs, _pattern(4200, cs))
    r.flush()


def _wl_transient_fault(r: Recorder) -> None:
    """A refcount block write fails once in a flush (the flush fails, nothing else);
    then reads evict dirty L2 tables from an 8-table cache, and work goes on."""
    cs = r.img.cluster_size
    span = cs << r.img.l2_bits
    for t in range(24):
        r.write(t * span, _pattern(1100 + t, cs))
    r.flush()
    for t in range(6):
        r.write(t * span + 4 * cs, _pattern(1200 + t, cs))
    r.img.file.faults = FaultInjector("pwrite", 1)
    try:
        r.flush()
    except OSError:
        pass  # not a completed flush: its writes stay "may or may not be there"
    r.img.file.faults = None
    for t in range(8, 24):
        r.img.read(t * span, cs)
    r.write(7 * span + 2 * cs, _pattern(1300, cs))
    r.flush()


@dataclass
class Workload:
    """A named workload: image options and the requests."""

    name: str
    run: Callable[[Recorder], None]
    size: int = 2 << 20
    create: dict[str, Any] = field(default_factory=dict)
    backing: bool = False
    open: dict[str, Any] = field(default_factory=dict)


WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload("alloc", _wl_alloc, create={"cluster_size": 512}),
    Workload("l2_tables", _wl_l2_tables, create={"cluster_size": 512}),
    Workload("refblocks", _wl_refblocks, size=1 << 20, create={"cluster_size": 512}),
    Workload("reftable", _wl_reftable, size=4 << 20,
             create={"cluster_size": 512, "refcount_bits": 64}),
    Workload("l1_grow", _wl_l1_grow, size=1 << 20, create={"cluster_size": 512}),
    Workload("cow_backing", _wl_cow_backing, size=1 << 20, create={"cluster_size": 4096},
             backing=True),
    Workload("partial", _wl_partial, size=1 << 20, create={"cluster_size": 4096}),
    Workload("discard_zero", _wl_discard_zero, size=1 << 20, create={"cluster_size": 512}),
    Workload("snapshot", _wl_snapshot, size=1 << 20, create={"cluster_size": 512}),
    Workload("resize", _wl_resize, size=1 << 20, create={"cluster_size": 512}),
    Workload("lazy", _wl_lazy, size=1 << 20,
             create={"cluster_size": 512, "lazy_refcounts": True}),
    Workload("concurrent", _wl_concurrent, size=1 << 20, create={"cluster_size": 512}),
    Workload("threads_evicting", _wl_threads_evicting, size=1 << 20,
             create={"cluster_size": 512}, open={"cache_size": 8 * 512}),
    Workload("threads_growing", _wl_threads_growing, size=8 << 20,
             create={"cluster_size": 512, "refcount_bits": 64}, open={"cache_size": 8 * 512}),
    Workload("writeback_race", _wl_writeback_race, size=1 << 20, create={"cluster_size": 512},
             open={"cache_size": 8 * 512}),
    Workload("transient_fault", _wl_transient_fault, size=1 << 20, create={"cluster_size": 512},
             open={"cache_size": 8 * 512}),
]}


def record_workload(name: str, workdir: str | os.PathLike[str], *,
                    open_extra: dict[str, Any] | None = None) -> Recording:
    """Create the starting image of workload *name* in *workdir*, run it, return the log.

    *open_extra*: more options for the open of the recording (e.g. ``cache="none"``)."""
    wl = WORKLOADS[name]
    workdir = Path(workdir)
    path = workdir / f"{name}.qcow2"
    opts = dict(wl.create)
    if wl.backing:
        backing = workdir / f"{name}-backing.qcow2"
        base = create(backing, wl.size, cluster_size=65536)
        base.write(0, bytes(range(256)) * (wl.size // 256))
        base.close()
        opts.update(backing_file=str(backing.resolve()), backing_format="qcow2")
    create(path, wl.size, **opts).close()
    return record(name, path, wl.run, open_opts={**wl.open, **(open_extra or {})})


# Real process death ------------------------------------------------------------------

KILL_THREADS = 4


def kill_client_ops(seed: int, thread: int, clusters: int, cluster_size: int,
                    count: int) -> Iterator[tuple[int, int, bool]]:
    """Client *thread*'s requests of a SIGKILL run: (offset, length, flush after it).

    Deterministic in (seed, thread), so the checker regenerates what the killed
    writer did.  A client writes only clusters whose index is *thread* mod 4.
    """
    rng = random.Random(seed * 1000 + thread)
    sectors = cluster_size // SECTOR
    for _ in range(count):
        cluster = rng.randrange(clusters // KILL_THREADS) * KILL_THREADS + thread
        first = rng.randrange(sectors)
        length = rng.randrange(1, sectors - first + 1) * SECTOR
        yield cluster * cluster_size + first * SECTOR, length, rng.random() < 0.1


def kill_tag(thread: int, k: int) -> int:
    """The data tag of client *thread*'s request *k*."""
    return thread * 1_000_000 + k


def kill_writer(path: str, seed: int, journal: str, count: int = 100_000) -> None:
    """The process a SIGKILL test kills: 4 clients write through an AioImage (4 workers),
    each waiting for its own write before the next, and flush at random.

    Before a flush starts, the numbers of writes each client has completed are noted;
    once the flush returns they are appended to *journal* (and synced): those writes
    must survive the kill.  Prints ``ready`` when the image is open.
    """
    img = open_image(path)
    aio = AioImage(img, workers=KILL_THREADS)
    cs, clusters = img.cluster_size, img.size // img.cluster_size
    done = [0] * KILL_THREADS
    lock = threading.Lock()  # guards the journal file (one line at a time)
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def client(t: int) -> None:
        for k, (offset, length, flush) in enumerate(kill_client_ops(seed, t, clusters, cs, count)):
            aio.submit_write(offset, _pattern(kill_tag(t, k), length)).result()
            done[t] = k + 1
            if flush:
                before = list(done)
                aio.submit_flush().result()
                with lock:
                    os.write(fd, (" ".join(map(str, before)) + "\n").encode())
                    os.fsync(fd)

    threads = [threading.Thread(target=client, args=(t,), daemon=True)
               for t in range(KILL_THREADS)]
    print("ready", flush=True)
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def kill_verify(path: str, seed: int, journal: str, count: int = 100_000) -> list[str]:
    """Problems of the guest data a killed :func:`kill_writer` left (read-only open)."""
    durable = [0] * KILL_THREADS
    with open(journal) as f:
        for line in f:
            if line.endswith("\n"):
                durable = [max(a, int(b)) for a, b in zip(durable, line.split())]
    img = open_image(path, readonly=True, force_share=True)
    try:
        cs, size = img.cluster_size, img.size
        disk = img.read(0, size)
    finally:
        img.close()
    clusters = size // cs
    problems: list[str] = []
    for t in range(KILL_THREADS):
        ops = list(itertools.islice(kill_client_ops(seed, t, clusters, cs, count), durable[t] + 2000))
        last: dict[int, int] = {}  # sector -> last durable request covering it
        for k, (offset, length, _) in enumerate(ops[:durable[t]]):
            for sector in range(offset // SECTOR, (offset + length) // SECTOR):
                last[sector] = k
        owned = [s for c in range(t, clusters, KILL_THREADS)
                 for s in range(c * cs // SECTOR, (c + 1) * cs // SECTOR)]
        for sector in owned:
            got = disk[sector * SECTOR:(sector + 1) * SECTOR]
            k = last.get(sector)
            if k is not None and got == _sector_of(ops, t, k, sector):
                continue
            if k is None and got == bytes(SECTOR):
                continue
            later = _tag_of(got)
            if (later is not None and later[0] == t and durable[t] <= later[1] < len(ops)
                    and got == _sector_of(ops, t, later[1], sector)):
                continue
            problems.append(f"client {t}: sector {sector} holds {got[:24]!r}, durable request "
                            f"{k} (journal: {durable})")
            if len(problems) > 5:
                return problems
    return problems


def _sector_of(ops: list[tuple[int, int, bool]], t: int, k: int, sector: int) -> bytes | None:
    offset, length, _ = ops[k]
    rel = sector - offset // SECTOR
    if not 0 <= rel < length // SECTOR:
        return None
    return _pattern(kill_tag(t, k), length)[rel * SECTOR:(rel + 1) * SECTOR]


def _tag_of(sector: bytes) -> tuple[int, int] | None:
    """(client, request) of a sector written by kill_writer, from its data."""
    try:
        tag = int(sector[:8])
    except ValueError:
        return None
    return tag // 1_000_000, tag % 1_000_000
