"""Concurrency stress with a linearizability oracle (issue 4, item 5; reliability §4.2).

``run_stress`` drives one image from N worker threads that call the synchronous
:class:`~qcow2rw.image.Image` directly, and checks everything they see against a shadow
model.  ``qcow2rw stress`` and ``tools/stress.py`` are thin wrappers around
:func:`main`.

Layout of the virtual disk (cluster-aligned, so a discard never reaches past a region):

* the **shared region** (the first half of the disk): every thread reads, writes,
  discards and zeroes it, half of the time inside a small "hot" window of four
  clusters chosen per round so that requests collide.  Writes and write_zeroes are
  sector-aligned but not cluster-aligned (copy-on-write of partial clusters, requests
  spanning clusters and L2 tables); reads and discards have any byte offset and length.
* one **owned region** per thread (the second half, split evenly): only its owner
  touches it, with byte-granular writes, reads, discards and write_zeroes, so its
  expected content is known exactly (a ``bytearray`` per thread).

Every sector a write stores is a stamp, and a shared-region model checks what each
read returns and what the disk holds after a round (:mod:`qcow2rw.devkit.oracle`).

After every round the image is read whole and checked by that model, then closed;
``qemu-img check`` must be clean (exit 0, no leaks, no corruption); the bytes
qcow2rw read are written to a raw file and ``qemu-img compare`` must find the qcow2
image identical to it (so QEMU reads the same bytes); the image is reopened and read
again and must still be identical.  The next round starts from that content.

Seeds make runs reproducible: each thread's requests come from its own
``random.Random`` seeded with (seed, round, thread); only the interleaving (and, with a
``duration``, the number of requests) depends on the scheduler.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import qcow2rw
from qcow2rw import qemutools
from qcow2rw.devkit.chaos import Chaos
from qcow2rw.devkit.oracle import (SECTOR, ZERO, SharedModel, check_sector, decode,
                                   describe_history, describe_mismatch, racing_mix,
                                   read_candidates, stamps, value_id)
from qcow2rw.units import parse_size

LOCK_MODES = ("mutex", "rwlock", "fine")
READ_CHUNK = 1 << 20
HOT_CLUSTERS = 4
MAX_REQUEST = 256 << 10
DEFAULT_DURATION = 10.0
JITTER_MAX_SLEEP = 10e-3  # long enough to span another thread's flush (fsync)

#: Op kinds, with their weights (shared region, owned region).
OP_WEIGHTS = (("write", 36), ("read", 36), ("discard", 9), ("write_zeroes", 9), ("flush", 4))


#: Counters kept next to the per-kind request counts that are not requests themselves.
NOT_REQUESTS = ("owned", "racing mix")


# --------------------------------------------------------------------------------------
# Jitter at the image's event points


#: Event points the image fires with no metadata lock held (``qcow2rw.events``): a sleep
#: there widens a race window without blocking unrelated requests.
PAUSABLE_EVENTS = frozenset(("cluster_alloc", "write_aio", "read_aio", "cow_read", "cow_write",
                             "l2_update", "flush_to_os", "flush_to_disk"))


class Jitter:
    """Random short sleeps at the image's pausable event points (reliability §4.2).

    Installed as ``Image.events`` (the hook object the image calls ``fire(name)`` on)
    for the length of a round, when the image has that attribute and nothing else
    is installed there.  Only timing changes, never data.
    """

    def __init__(self, probability: float, max_sleep: float) -> None:
        self.probability = probability
        self.max_sleep = max_sleep
        self.seen: dict[str, int] = {}

    def fire(self, name: str) -> None:
        """Called by the image at event point *name*: maybe sleep."""
        self.seen[name] = self.seen.get(name, 0) + 1  # a lost count under a race is harmless
        if name in PAUSABLE_EVENTS and random.random() < self.probability:
            time.sleep(random.random() * self.max_sleep)


# --------------------------------------------------------------------------------------
# Results


@dataclass
class StressResult:
    """What one :func:`run_stress` call did and found."""

    seed: int
    lock_mode: str
    workers: int
    cluster_size: int
    size: int
    image: str
    rounds: int = 0                    #: rounds completed (checked)
    ops: dict[str, int] = field(default_factory=dict)  #: requests issued, by kind
    failures: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    qemu_checked: bool = False          #: qemu-img check/compare ran after each round
    chaos: str = ""                     #: what the chaos thread did (empty: no chaos)

    @property
    def ok(self) -> bool:
        """True when nothing failed."""
        return not self.failures

    @property
    def total_ops(self) -> int:
        """Requests issued in all rounds."""
        return sum(v for k, v in self.ops.items() if k not in NOT_REQUESTS)

    def summary(self) -> str:
        """One line: mode, verdict, requests, rounds, time and seed."""
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.ops.items())
                          if k not in NOT_REQUESTS)
        kinds += f"; {self.ops.get('owned', 0)} in per-thread regions"
        if self.ops.get("racing mix"):
            kinds += f"; {self.ops['racing mix']} sectors read mid-write (racing_mix)"
        verdict = "OK" if self.ok else f"FAILED ({len(self.failures)} failures)"
        qemu = "qemu-img check/compare after each round" if self.qemu_checked \
            else "qemu-img not run"
        chaos = f"; chaos: {self.chaos}" if self.chaos else ""
        return (f"[{self.lock_mode}] {verdict}: {self.total_ops} requests ({kinds}) from "
                f"{self.workers} threads, {self.rounds} rounds, {self.elapsed:.1f} s, {qemu}"
                f"{chaos}; seed={self.seed}")


# --------------------------------------------------------------------------------------
# The run


@dataclass
class _Layout:
    """Where the shared and owned regions are (bytes; all cluster-aligned)."""

    size: int
    cluster_size: int
    shared_end: int
    owned: list[tuple[int, int]]

    @classmethod
    def make(cls, size: int, cluster_size: int, workers: int) -> _Layout:
        clusters = size // cluster_size
        shared = max(1, clusters // 2)
        per = (clusters - shared) // workers
        if per < 1:
            raise ValueError(f"a {size}-byte image with {cluster_size}-byte clusters is too "
                             f"small for {workers} workers (need at least {2 * workers} "
                             "clusters)")
        owned = [((shared + i * per) * cluster_size, (shared + (i + 1) * per) * cluster_size)
                 for i in range(workers)]
        return cls(size, cluster_size, shared * cluster_size, owned)


class _Run:
    """State shared by the workers of one run."""

    def __init__(self, *, seed: int, lock_mode: str, layout: _Layout, workers: int,
                 max_failures: int, result: StressResult) -> None:
        self.seed = seed
        self.lock_mode = lock_mode
        self.layout = layout
        self.workers = workers
        self.model = SharedModel(layout.shared_end // SECTOR)
        self.shadows = [bytearray(hi - lo) for lo, hi in layout.owned]
        # owned_locks[tid] guards shadows[tid] and thread tid's region of the image
        # while an owned-region request or a chaos snapshot/revert runs (lock order:
        # owned locks in thread order, then the image).
        self.owned_locks = [threading.Lock() for _ in range(workers)]
        self.chaos: Chaos | None = None  # a Chaos when the run has a chaos thread
        self.seqs = [0] * workers
        self.stop = threading.Event()
        self.max_failures = max_failures
        self.result = result
        self.round = 0
        self.hot = 0  # first byte of this round's hot window
        self._lock = threading.Lock()
        self.counts: list[dict[str, int]] = [
            dict.fromkeys([k for k, _ in OP_WEIGHTS] + list(NOT_REQUESTS), 0)
            for _ in range(workers)]

    def fail(self, where: str, message: str) -> None:
        """Record a failure (with the seed) and stop the workers."""
        text = f"seed={self.seed} lock_mode={self.lock_mode} round={self.round}: {where}: {message}"
        with self._lock:
            if len(self.result.failures) < self.max_failures:
                self.result.failures.append(text)
        self.stop.set()


class _Worker:
    """One stress thread: a request generator and the checks of what it reads."""

    def __init__(self, run: _Run, tid: int, img: Any, rng: random.Random) -> None:
        self.run = run
        self.tid = tid
        self.img = img
        self.rng = rng
        self.model = run.model
        self.layout = run.layout
        self.owned = run.layout.owned[tid]
        self.shadow = run.shadows[tid]
        self.counts = run.counts[tid]
        self.kinds = [k for k, _ in OP_WEIGHTS]
        self.weights = [w for _, w in OP_WEIGHTS]

    # Request shapes ------------------------------------------------------
    def _length(self) -> int:
        """A request length in bytes (>= 1): mostly small, some spanning clusters."""
        rng, cs = self.rng, self.layout.cluster_size
        r = rng.random()
        if r < 0.45:
            return rng.randint(1, 8 * SECTOR)
        if r < 0.85:
            return rng.randint(1, 2 * cs)
        return rng.randint(1, min(4 * cs, MAX_REQUEST))

    def _start(self, lo: int, hi: int, hot: bool) -> int:
        """A start offset in [lo, hi): in the hot window, near a cluster edge, or anywhere."""
        rng, cs = self.rng, self.layout.cluster_size
        if hot:
            lo = self.run.hot
            hi = min(hi, lo + HOT_CLUSTERS * cs)
        if rng.random() < 0.25:  # at a cluster boundary, or a sector either side of it
            edge = lo + rng.randrange((hi - lo) // cs) * cs
            return min(max(lo, edge + rng.choice((-SECTOR, 0, 0, SECTOR))), hi - 1)
        return rng.randrange(lo, hi)

    def _range(self, lo: int, hi: int, hot: bool, sectors: bool) -> tuple[int, int]:
        """(offset, length) inside [lo, hi); sector-aligned when *sectors*."""
        start = self._start(lo, hi, hot)
        length = self._length()
        if sectors:
            start -= start % SECTOR
            length = -(-length // SECTOR) * SECTOR
        return start, min(length, hi - start)

    # The loop ----------------------------------------------------------------
    def run_ops(self, count: int | None, deadline: float | None) -> None:
        """Issue requests until *count* are done, *deadline* passes or the run stops."""
        done = 0
        stop = self.run.stop
        while not stop.is_set():
            if count is not None and done >= count:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            kind = self.rng.choices(self.kinds, self.weights)[0]
            owned = self.rng.random() < 0.35
            try:
                self._one(kind, owned)
            except Exception:  # an Image error is a failure too
                self.run.fail(f"thread {self.tid} {kind}", "raised\n" + traceback.format_exc())
                break
            done += 1

    def _one(self, kind: str, owned: bool) -> None:
        self.counts[kind] += 1
        if kind == "flush":
            self.img.flush()
            return
        if owned:
            self.counts["owned"] += 1
            with self.run.owned_locks[self.tid]:
                self._owned(kind)
        else:
            self._shared(kind)

    def _next_seq(self) -> int:
        self.run.seqs[self.tid] += 1
        return self.run.seqs[self.tid]

    # Shared region -------------------------------------------------------------
    def _shared(self, kind: str) -> None:
        hot = self.rng.random() < 0.5
        end = self.layout.shared_end
        model = self.model
        if kind == "write":
            off, n = self._range(0, end, hot, True)
            seq = self._next_seq()
            first = off // SECTOR
            data: bytes | bytearray = stamps(self.tid, seq, first, n // SECTOR)
            if self.rng.random() < 0.3:
                data = bytearray(data)
            op = model.begin(first, first + n // SECTOR, value_id(self.tid, seq))
            try:
                self.img.write(off, data)
            finally:
                model.end(op)
        elif kind == "write_zeroes":
            off, n = self._range(0, end, hot, True)
            op = model.begin(off // SECTOR, (off + n) // SECTOR, ZERO)
            try:
                self.img.write_zeroes(off, n)
            finally:
                model.end(op)
        elif kind == "discard":
            off, n = self._range(0, end, hot, False)
            cs = self.layout.cluster_size
            lo, hi = -(-off // cs) * cs, (off + n) // cs * cs
            op = model.begin(lo // SECTOR, hi // SECTOR, ZERO) if lo < hi else None
            try:
                self.img.discard(off, n)
            finally:
                if op is not None:
                    model.end(op)
            if self.rng.random() < 0.5:
                # Freed clusters go back to the allocator at a flush: flushing right
                # away lets a racing allocation reuse them while a read that looked
                # them up may still be in flight (trap c of issue 4).
                self.counts["flush"] += 1
                self.img.flush()
        else:
            off, n = self._range(0, end, hot, False)
            self._shared_read(off, n)

    def _read(self, off: int, n: int) -> bytes | bytearray:
        """``read`` or ``readinto`` (into a buffer pre-filled with 0xa5), at random."""
        if self.rng.random() < 0.5:
            data = self.img.read(off, n)
        else:
            data = bytearray(b"\xa5") * n
            got = self.img.readinto(off, data)
            if got != n:
                self.run.fail(f"thread {self.tid} readinto({off:#x}, {n})",
                              f"returned {got}, expected {n}")
        if len(data) != n:
            self.run.fail(f"thread {self.tid} read({off:#x}, {n})",
                          f"returned {len(data)} bytes")
        return data

    def _shared_read(self, off: int, n: int) -> None:
        model = self.model
        first, end = off // SECTOR, -(-(off + n) // SECTOR)
        token = model.begin_read()
        try:
            data = self._read(off, n)
        finally:
            read_start, snap = model.end_read(token, first, end)
        if len(data) != n:
            return
        bad = 0
        message = ""
        view = memoryview(data)
        for i, hist in enumerate(snap):
            sector = first + i
            s_lo = sector * SECTOR
            a, b = max(off, s_lo), min(off + n, s_lo + SECTOR)
            allowed = read_candidates(hist, read_start)
            part = view[a - off:b - off]
            problem = check_sector(part, sector, a - s_lo, allowed, hist)
            if problem and racing_mix(part, sector, a - s_lo, allowed, hist, read_start):
                self.counts["racing mix"] += 1
                continue
            if problem:
                bad += 1
                if not message:
                    message = (f"sector {sector} (guest offset {s_lo:#x}): {problem}; read ran "
                               f"over ticks [{read_start}, end]; {describe_history(hist)}")
        if bad:
            self.run.fail(f"thread {self.tid} read({off:#x}, {n})",
                          f"{bad} bad sectors; first: {message}")

    # Owned region -------------------------------------------------------------
    def _owned(self, kind: str) -> None:
        lo, hi = self.owned
        shadow = self.shadow
        off, n = self._range(lo, hi, False, False)
        rel = off - lo
        if kind == "write":
            seq = self._next_seq()
            first = off // SECTOR
            count = -(-(off + n) // SECTOR) - first
            skip = off - first * SECTOR
            data = stamps(self.tid, seq, first, count)[skip:skip + n]
            self.img.write(off, data)
            shadow[rel:rel + n] = data
        elif kind == "write_zeroes":
            self.img.write_zeroes(off, n)
            shadow[rel:rel + n] = bytes(n)
        elif kind == "discard":
            self.img.discard(off, n)
            cs = self.layout.cluster_size
            c_lo, c_hi = -(-off // cs) * cs, (off + n) // cs * cs
            if c_lo < c_hi:
                shadow[c_lo - lo:c_hi - lo] = bytes(c_hi - c_lo)
        else:
            data = self._read(off, n)
            want = shadow[rel:rel + n]
            if len(data) == n and data != want:
                self.run.fail(f"thread {self.tid} read({off:#x}, {n}) in its own region",
                              describe_mismatch(data, want, off))


def _default_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_stress(path_dir: str | os.PathLike[str], *, workers: int = 4, seed: int = 0,
               duration: float | None = None, ops: int | None = None, lock_mode: str = "fine",
               cluster_size: int = 65536, size: int = 8 << 20, rounds: int = 2,
               switchinterval: float | None = None,
               wrap: Callable[[Any], Any] | None = None,
               on_closed: Callable[[str, int], None] | None = None,
               qemu: bool | None = None, jitter: float = 0.0,
               jitter_max: float = JITTER_MAX_SLEEP, max_failures: int = 20,
               hang_timeout: float = 120.0, chaos: float | None = None,
               log: Callable[[str], None] | None = None) -> StressResult:
    """Stress one new image in *path_dir* and check it (see the module docstring).

    Args:
        workers: threads calling the Image at once.
        seed: makes every thread's request sequence reproducible.
        duration: seconds of requests in all (split evenly over the rounds); or
        ops: requests in all (split over rounds and threads).  Neither: 10 s.
        lock_mode: ``"mutex"``, ``"rwlock"`` or ``"fine"``.
        cluster_size, size: of the image created (size: a multiple of the cluster size).
        rounds: rounds of requests; each ends with close, qemu-img check and compare,
            reopen and re-verify.
        switchinterval: ``sys.setswitchinterval`` while the workers run (restored after).
        wrap: called with each opened Image; the workers and the checks use what it
            returns (tests use it to plant faults the oracle must catch).
        on_closed: called with (image path, round) after each round's close, before
            the qemu-img checks (tests use it to corrupt the file behind our back).
        qemu: run qemu-img check/compare: True (required), False, or None (when found).
        jitter: probability of a random sleep (up to *jitter_max* seconds) at each of
            the image's pausable event points while the workers run (see :class:`Jitter`),
            in every second round (every round if there is only one): long sleeps widen
            some race windows and close others, so rounds alternate.
        max_failures: failures recorded before the rest are dropped.
        hang_timeout: seconds a round may overrun before its workers count as hung.
        chaos: when given, a chaos thread (:mod:`qcow2rw.devkit.chaos`) creates, applies and
            deletes snapshots and grows the image about every *chaos* seconds while
            the workers run.
        log: receives one progress line per round (default: stderr; pass
            ``lambda s: None`` for silence).
    """
    if lock_mode not in LOCK_MODES:
        raise ValueError(f"lock_mode must be one of {', '.join(LOCK_MODES)}")
    if workers < 1 or rounds < 1:
        raise ValueError("workers and rounds must be at least 1")
    if size % cluster_size:
        raise ValueError("size must be a multiple of the cluster size")
    if duration is None and ops is None:
        duration = DEFAULT_DURATION
    if qemu is None:
        qemu = qemutools.available()
    elif qemu and not qemutools.available():
        raise RuntimeError("qemu-img/qemu-io not found (pass qemu=False to skip those checks)")
    say = log or _default_log
    layout = _Layout.make(size, cluster_size, workers)
    path = os.path.join(os.fspath(path_dir), f"stress-{lock_mode}-{seed}.qcow2")
    raw_path = path[:-len(".qcow2")] + ".raw"
    result = StressResult(seed=seed, lock_mode=lock_mode, workers=workers,
                          cluster_size=cluster_size, size=size, image=path,
                          qemu_checked=bool(qemu))
    run = _Run(seed=seed, lock_mode=lock_mode, layout=layout, workers=workers,
               max_failures=max_failures, result=result)
    if chaos is not None:
        run.chaos = Chaos(run, chaos)
    started = time.monotonic()
    qcow2rw.create(path, size, cluster_size=cluster_size).close()
    img: Any = qcow2rw.open(path, lock_mode=lock_mode)
    try:
        for rnd in range(1, rounds + 1):
            run.round = rnd
            round_rng = random.Random(f"{seed}:{rnd}:hot")
            shared_clusters = layout.shared_end // cluster_size
            run.hot = round_rng.randrange(max(1, shared_clusters - HOT_CLUSTERS + 1)) * cluster_size
            view = wrap(img) if wrap is not None else img
            jittering = (bool(jitter) and (rounds == 1 or rnd % 2 == 0)
                         and getattr(img, "events", False) is None)
            if jittering:
                img.events = Jitter(jitter, jitter_max)
            t0 = time.monotonic()
            hung = _run_round(run, view, rnd, duration / rounds if duration is not None else None,
                              -(-ops // (rounds * workers)) if ops is not None else None,
                              switchinterval, hang_timeout)
            elapsed = time.monotonic() - t0
            if hung:
                img = None  # its threads may still hold locks: leave it alone
                break
            if jittering:
                img.events = None
            content, values = _resolve(run, view)
            closed_ok = _close(run, img, "close after the round")
            img = None
            if not closed_ok:
                break
            if on_closed is not None:
                on_closed(path, rnd)
            notes = []
            if qemu:
                notes += _qemu_checks(run, qemutools, path, raw_path, content)
            img = qcow2rw.open(path, lock_mode=lock_mode)
            _reverify(run, wrap(img) if wrap is not None else img, content)
            notes.append("reopened and verified")
            run.model.new_round(values)
            result.rounds = rnd
            if run.chaos is not None:
                notes.append(run.chaos.summary())
            done = sum(sum(v for k, v in c.items() if k not in NOT_REQUESTS)
                       for c in run.counts)
            say(f"stress [{lock_mode}] round {rnd}/{rounds}: {done} requests so far, "
                f"{elapsed:.1f} s; " + "; ".join(notes)
                + ("" if result.ok else f"; FAILED ({len(result.failures)})"))
            if not result.ok:
                break
        if qemu and run.chaos is not None and result.ok and img is not None:
            img.close()
            img = None
            problem = run.chaos.qemu_apply_newest(qemutools, path, os.path.dirname(path))
            if problem:
                run.fail("chaos snapshot applied by qemu-img", problem)
    finally:
        if img is not None:
            _close(run, img, "final close")
        if run.chaos is not None:
            result.chaos = run.chaos.summary()
        for counts in run.counts:
            for kind, value in counts.items():
                result.ops[kind] = result.ops.get(kind, 0) + value
        result.elapsed = time.monotonic() - started
    return result


def _run_round(run: _Run, img: Any, rnd: int, seconds: float | None, per_thread: int | None,
               switchinterval: float | None, hang_timeout: float) -> bool:
    """Run one round's workers; True if some of them hung (recorded as a failure)."""
    deadline = time.monotonic() + seconds if seconds is not None else None
    threads = []
    for tid in range(run.workers):
        worker = _Worker(run, tid, img, random.Random(f"{run.seed}:{rnd}:{tid}"))
        threads.append(threading.Thread(target=worker.run_ops, args=(per_thread, deadline),
                                        name=f"stress-{tid}", daemon=True))
    if run.chaos is not None:
        workers = list(threads)
        threads.append(threading.Thread(
            target=run.chaos.run_round, name="stress-chaos", daemon=True,
            args=(img, random.Random(f"{run.seed}:{rnd}:chaos"), deadline, workers)))
    old = sys.getswitchinterval()
    if switchinterval is not None:
        sys.setswitchinterval(switchinterval)
    try:
        for thread in threads:
            thread.start()
        limit = time.monotonic() + (seconds or 0) + hang_timeout
        for thread in threads:
            thread.join(max(0.0, limit - time.monotonic()))
    finally:
        sys.setswitchinterval(old)
    alive = [t for t in threads if t.is_alive()]
    if alive:
        frames = sys._current_frames()
        stacks = "\n".join(f"--- {t.name}\n" + "".join(traceback.format_stack(frames[t.ident]))
                           for t in alive if t.ident in frames)
        run.fail("workers", f"{len(alive)} threads still running {hang_timeout:.0f} s after "
                            f"the round should have ended (deadlock?)\n{stacks}")
        run.stop.set()
        return True
    return False


def _resolve(run: _Run, img: Any) -> tuple[bytearray, dict[int, int]]:
    """Read the whole disk, check each sector against its final candidates.

    Returns the bytes read (the next round's truth) and the shared region's sector
    values (value ids; zeros left out).
    """
    layout = run.layout
    content = bytearray(layout.size)
    for off in range(0, layout.size, READ_CHUNK):
        n = min(READ_CHUNK, layout.size - off)
        try:
            data = img.read(off, n)
        except Exception as exc:
            run.fail(f"final read({off:#x}, {n})", f"raised {exc!r}")
            continue
        content[off:off + len(data)] = data
    values: dict[int, int] = {}
    model = run.model
    bad = 0
    first = ""
    view = memoryview(content)
    for sector in range(layout.shared_end // SECTOR):
        chunk = view[sector * SECTOR:(sector + 1) * SECTOR]
        allowed = model.final_candidates(sector)
        problem = check_sector(chunk, sector, 0, allowed, model.events.get(sector))
        if problem:
            bad += 1
            first = first or f"sector {sector} (guest offset {sector * SECTOR:#x}): {problem}"
        else:
            vid = decode(chunk, sector)
            if vid != ZERO:
                values[sector] = vid
    if bad:
        run.fail("final content of the shared region", f"{bad} bad sectors; first: {first}")
    for tid, (lo, hi) in enumerate(layout.owned):
        if content[lo:hi] != run.shadows[tid]:
            run.fail(f"final content of thread {tid}'s region",
                     describe_mismatch(content[lo:hi], run.shadows[tid], lo))
    for off in range(layout.size, img.size, READ_CHUNK):  # what a chaos grow added
        n = min(READ_CHUNK, img.size - off)
        if any(img.read(off, n)):
            run.fail("final content past the starting size", f"not zeros at {off:#x}..")
            break
    return content, values


def _close(run: _Run, img: Any, what: str) -> bool:
    try:
        img.close()
    except Exception as exc:
        run.fail(what, f"raised {exc!r}")
        return False
    return True


def _qemu_checks(run: _Run, qemutools: Any, path: str, raw_path: str,
                 content: bytearray) -> list[str]:
    """qemu-img check (clean, no leaks) and compare with the content read; notes."""
    notes = []
    rc, data = qemutools.check(path)
    problems = {k: data.get(k) for k in ("leaks", "corruptions", "check-errors") if data.get(k)}
    if rc != 0 or problems:
        run.fail("qemu-img check", f"exit {rc}, {problems or data}")
    else:
        notes.append("qemu-img check clean")
    with open(raw_path, "wb") as f:
        f.write(content)
    proc = qemutools.qemu_img("compare", "-f", "qcow2", "-F", "raw", path, raw_path, check=False)
    if proc.returncode != 0:
        run.fail("qemu-img compare with what qcow2rw read",
                 f"exit {proc.returncode}: {(proc.stdout + proc.stderr).strip()}")
    else:
        notes.append("qemu-img compare identical")
    os.unlink(raw_path)
    return notes


def _reverify(run: _Run, img: Any, content: bytearray) -> None:
    """The reopened image must read exactly *content*."""
    size = len(content)
    for off in range(0, size, READ_CHUNK):
        n = min(READ_CHUNK, size - off)
        try:
            data = img.read(off, n)
        except Exception as exc:
            run.fail(f"reopen: read({off:#x}, {n})", f"raised {exc!r}")
            return
        if data != content[off:off + n]:
            run.fail("reopen and re-read", describe_mismatch(data, content[off:off + n], off))
            return


# --------------------------------------------------------------------------------------
# Command line (``qcow2rw stress`` and ``tools/stress.py``)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``qcow2rw stress``."""
    p.add_argument("-j", "--workers", type=int, default=4, help="threads (default 4)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the request generators (default: from the clock; printed)")
    p.add_argument("--duration", type=float, default=None,
                   help=f"seconds of requests per lock mode (default {DEFAULT_DURATION:g} "
                        "unless --ops is given)")
    p.add_argument("--ops", type=int, default=None, help="requests per lock mode")
    p.add_argument("--lock-mode", choices=LOCK_MODES + ("all",), default="all",
                   help="lock mode to stress, or all of them one after the other (default)")
    p.add_argument("--cluster-size", default="64k", help="cluster size (default 64k)")
    p.add_argument("--size", default="16M", help="virtual size (default 16M)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds, each ended by close/check/compare/reopen (default 3)")
    p.add_argument("--switch-interval", type=float, default=None, metavar="SECONDS",
                   help="sys.setswitchinterval while the threads run (e.g. 1e-6)")
    p.add_argument("--jitter", type=float, default=0.02, metavar="P",
                   help="probability of a random sleep at each of the image's pausable event "
                        "points, to widen race windows (default 0.02; 0: off)")
    p.add_argument("--jitter-max", type=float, default=JITTER_MAX_SLEEP, metavar="SECONDS",
                   help=f"longest such sleep (default {JITTER_MAX_SLEEP:g})")
    p.add_argument("--chaos", type=float, default=None, metavar="SECONDS",
                   help="add a chaos thread that creates, applies and deletes internal "
                        "snapshots and grows the image about every SECONDS while the "
                        "workers run (e.g. 0.05)")
    p.add_argument("--dir", help="directory for the images (default: a new temporary one, "
                                 "removed unless something failed)")


def run_cli(args: argparse.Namespace, out: Any = None) -> int:
    """Run ``qcow2rw stress`` from parsed arguments; exit status 0 when all modes pass."""
    out = out or sys.stdout
    seed = args.seed if args.seed is not None else int(time.time() * 1000) % (1 << 31)
    modes = LOCK_MODES if args.lock_mode == "all" else (args.lock_mode,)
    cluster_size = parse_size(args.cluster_size, "cluster size")
    size = parse_size(args.size)
    directory = args.dir or tempfile.mkdtemp(prefix="qcow2rw-stress-")
    os.makedirs(directory, exist_ok=True)
    print(f"stress: seed={seed} workers={args.workers} size={size} cluster_size={cluster_size} "
          f"rounds={args.rounds} modes={','.join(modes)} dir={directory}", file=out, flush=True)
    failed = False
    for mode in modes:
        res = run_stress(directory, workers=args.workers, seed=seed, duration=args.duration,
                         ops=args.ops, lock_mode=mode, cluster_size=cluster_size, size=size,
                         rounds=args.rounds, switchinterval=args.switch_interval,
                         jitter=args.jitter, jitter_max=args.jitter_max, chaos=args.chaos,
                         log=lambda s: print(s, file=out, flush=True))
        print(res.summary(), file=out, flush=True)
        for failure in res.failures:
            print("  FAIL " + failure.replace("\n", "\n       "), file=out, flush=True)
        failed = failed or not res.ok
    if failed:
        print(f"stress: FAILED; reproduce with --seed {seed}; images kept in {directory}",
              file=out, flush=True)
        return 1
    if not args.dir:
        shutil.rmtree(directory, ignore_errors=True)
    print("stress: OK", file=out, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``tools/stress.py`` entry point (same options as ``qcow2rw stress``)."""
    p = argparse.ArgumentParser(prog="stress", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
