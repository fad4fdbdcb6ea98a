"""``qcow2rw demo``: drive a new image from a pool of threads through futures, verify it.

Everything goes through the public API: ``qcow2rw.create``, ``qcow2rw.AioImage`` (8
worker threads by default) and ``qcow2rw.open``.  The demo runs rounds of requests:
unaligned writes (some of them several MiB long), write_zeroes, discards, reads and
flushes, all in flight at once.  Within a round the ranges that requests change are
disjoint, so that each request's outcome can be checked on its own; across rounds
they overlap freely.  Some requests are cancelled: the last ones of a round with
``f.cancel()`` while still queued (they must never touch the image), and some long
writes with ``aio.cancel(f)`` once running (they stop at a cluster boundary, so each
cluster they cover must hold its old or its new data; the demo reads the range back,
checks that, and adopts what is there).  Halfway, a snapshot is taken through
``submit_snapshot`` when the image supports snapshots, in the middle of a round: it is
an exclusive request, so the requests submitted before it are in the snapshot and
those after it are not.  At the very end the snapshot is applied (through the pool)
and its content verified too, then deleted.

A ``bytearray`` of the whole virtual disk is the model every byte is checked against:
reads during the rounds, the whole disk through the pool at the end, then again after
reopening read-only.  When qemu-img is installed, ``qemu-img check`` must find the
image clean and ``qemu-img compare`` must read exactly the model's bytes.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import wait
from dataclasses import dataclass, field
from typing import Any, TextIO

import qcow2rw
from qcow2rw import qemutools
from qcow2rw.aio import AioFuture, AioImage
from qcow2rw.errors import ReadOnlyImage, UnsupportedFeature
from qcow2rw.units import UsageError, size_to_str

MAX_DEMO_SIZE = 1 << 30  # the model is a bytearray of the whole disk
VERIFY_CHUNK = 1 << 20
ROUND_OPS = 40           # requests changing the image per round
WAIT_TIMEOUT = 600.0     # a request that takes longer than this is a hang: fail loudly
MAX_WORKERS = 256
SNAPSHOT = "demo"        # the name of the snapshot taken halfway


@dataclass
class DemoOptions:
    """What ``qcow2rw demo`` was asked to do."""

    directory: str | None = None  #: where to put the image (default: a new temporary directory)
    size: int = 64 << 20          #: virtual size in bytes
    keep: bool = False            #: keep the image (and print its path) afterwards
    seed: int = 2024              #: seed of the request generator
    requests: int = 200           #: number of requests that change the image
    workers: int = 8              #: threads of the AioImage pool
    out: TextIO | None = field(default=None, repr=False)  #: where to print (default stdout)


@dataclass
class _Counts:
    """What the rounds did (for the summary)."""

    writes: int = 0
    written: int = 0
    zeroes: int = 0
    discards: int = 0
    reads: int = 0
    read_bytes: int = 0
    flushes: int = 0
    cancelled_queued: int = 0    #: f.cancel() on a queued request: never ran
    cancelled_running: int = 0   #: aio.cancel(f) on a running one: ended cancelled
    cancel_too_late: int = 0     #: aio.cancel(f) came after its last cluster boundary
    clusters_new: int = 0        #: clusters of requests cancelled running: new data
    clusters_old: int = 0        #: ... and old data
    verified: int = 0            #: bytes compared with the model at the end
    mismatches: list[str] = field(default_factory=list)


@dataclass
class _Op:
    """One request of a round: kind write, zeroes, discard or read, and its range."""

    kind: str
    offset: int
    length: int
    data: bytes = b""
    future: AioFuture[Any] | None = None
    cancel: str = ""  #: "" / "queued" (try f.cancel()) / "running" (aio.cancel once running)
    cancelled_queued: bool = False


Buffer = bytes | bytearray | memoryview


def _first_mismatch(got: Buffer, want: Buffer) -> int:
    """Index of the first differing byte of two equally long buffers (-1 when equal)."""
    if got == want:
        return -1
    lo, hi = 0, len(want)
    while hi - lo > 1:  # bisect on slice equality (C speed) rather than a Python byte loop
        mid = (lo + hi) // 2
        if got[lo:mid] != want[lo:mid]:
            hi = mid
        else:
            lo = mid
    return lo


def verify(img: Any, model: bytearray) -> int:
    """Read the whole image with ``readinto`` and compare it with *model*.

    Returns the offset of the first differing byte, or -1 when every byte matches.
    """
    buf = bytearray(VERIFY_CHUNK)
    view = memoryview(buf)
    want = memoryview(model)
    for offset in range(0, len(model), VERIFY_CHUNK):
        n = min(VERIFY_CHUNK, len(model) - offset)
        got = view[:n]
        done: int = img.readinto(offset, got)
        if done != n:
            return offset + max(done, 0)
        at = _first_mismatch(got, want[offset:offset + n])
        if at >= 0:
            return offset + at
    return -1


def verify_through(aio: AioImage, model: bytearray,
                   snapshot: _SnapshotModel | None = None) -> int:
    """Like :func:`verify`, with the chunks read in parallel by the pool's workers.

    With *snapshot*, compare with the snapshot's content instead of the model's.
    At most ``2 * workers`` chunks are in flight (and in memory) at once.
    """

    def want(offset: int, length: int) -> Buffer:
        if snapshot is None:
            return memoryview(model)[offset:offset + length]
        return snapshot.expected(model, offset, length)

    window = 2 * aio.workers
    offsets = list(range(0, len(model), VERIFY_CHUNK))
    for first in range(0, len(offsets), window):
        batch = []
        for offset in offsets[first:first + window]:
            buf = bytearray(min(VERIFY_CHUNK, len(model) - offset))
            batch.append((offset, buf, aio.submit_readinto(offset, buf)))
        for offset, buf, future in batch:
            if future.result(WAIT_TIMEOUT) != len(buf):
                return offset
            at = _first_mismatch(buf, want(offset, len(buf)))
            if at >= 0:
                return offset + at
    return -1


def old_or_new_per_cluster(got: Buffer, old: Buffer, new: Buffer, offset: int,
                           cluster: int) -> tuple[int, int, int]:
    """Judge a cancelled request's range [offset, offset+len(got)).

    *old* is what the range held before, *new* what the request would have left.
    Each cluster (aligned on the image's clusters) must hold all old or all new data.
    Returns (clusters new, clusters old, offset of the first bad cluster or -1).
    """
    n_new = n_old = 0
    end = offset + len(got)
    pos = offset
    while pos < end:
        stop = min(end, (pos // cluster + 1) * cluster)
        part = slice(pos - offset, stop - offset)
        if got[part] == old[part]:
            n_old += 1
        elif got[part] == new[part]:
            n_new += 1
        else:
            return n_new, n_old, pos
        pos = stop
    return n_new, n_old, -1


class _Ranges:
    """Byte ranges already taken in a round (to keep a round's changes disjoint)."""

    def __init__(self) -> None:
        self._taken: list[tuple[int, int]] = []

    def free(self, offset: int, length: int) -> bool:
        end = offset + length
        return all(end <= lo or hi <= offset for lo, hi in self._taken)

    def take(self, offset: int, length: int) -> None:
        self._taken.append((offset, offset + length))


class _SnapshotModel:
    """The content of the snapshot the demo takes, as differences from the model.

    Once the snapshot is taken (``tracking``), the first change to each cluster of the
    model saves that cluster as it was; the snapshot reads as the model with the
    saved clusters put back.  (Memory: the clusters changed after the snapshot, not a
    second copy of the disk.)
    """

    def __init__(self, cluster: int) -> None:
        self.cluster = cluster
        self.taken = False     #: the snapshot exists
        self.tracking = False  #: changes to the model now happen after the snapshot
        self.saved: dict[int, bytes] = {}

    def before_change(self, model: bytearray, start: int, end: int) -> None:
        """The model's [start, end) is about to change."""
        if not self.tracking or end <= start:
            return
        cs = self.cluster
        for c in range(start // cs, (end - 1) // cs + 1):
            if c not in self.saved:
                self.saved[c] = bytes(model[c * cs:(c + 1) * cs])

    def expected(self, model: bytearray, offset: int, length: int) -> bytearray:
        """What the snapshot holds at [offset, offset+length)."""
        cs = self.cluster
        out = bytearray(model[offset:offset + length])
        for c in range(offset // cs, (offset + length - 1) // cs + 1):
            saved = self.saved.get(c)
            if saved is not None:
                lo, hi = max(offset, c * cs), min(offset + length, c * cs + len(saved))
                out[lo - offset:hi - offset] = saved[lo - c * cs:hi - c * cs]
        return out


def _plan_round(rng: random.Random, size: int, cluster: int, count: int,
                first: bool) -> list[_Op]:
    """The requests of one round, changing disjoint ranges; reads of untouched ranges.

    Long writes (up to 4 MiB, at most an eighth of the disk) come first so that they
    are running when the demo cancels some of them; the last requests are the ones
    most likely still queued, and some of them are cancelled with ``f.cancel()``.
    Discards are cluster-aligned (a partial-cluster discard may legitimately keep its
    data); writes and write_zeroes start and end anywhere.  The first round also has
    edge cases (where the long writes left room): the first and last byte, a cluster
    boundary, a multi-cluster unaligned write.
    """
    taken = _Ranges()
    ops: list[_Op] = []

    def add(kind: str, offset: int, length: int, cancel: str = "") -> bool:
        offset = min(max(0, offset), size - 1)
        length = max(1, min(length, size - offset))
        if not taken.free(offset, length):
            return False
        taken.take(offset, length)
        data = b""
        if kind == "write":
            data = rng.randbytes(length) if rng.random() < 0.6 else \
                bytes([rng.randrange(1, 256)]) * length
        ops.append(_Op(kind, offset, length, data, cancel=cancel))
        return True

    long_write = max(cluster, min(4 << 20, size // 8))
    for i in range(2):  # long writes, one of which will be cancelled while running
        for _ in range(20):
            if add("write", rng.randrange(size), rng.randint(long_write // 2, long_write),
                   "running" if i == 0 else ""):
                break
    if first:
        add("write", 0, 1)
        add("write", size - 1, 1)
        add("write", cluster - 100, 200)
        add("write", 5 * cluster - 7, 3 * cluster + 123)
    attempts = 0
    while len(ops) < count and attempts < 20 * count:
        attempts += 1
        choice = rng.random()
        if choice < 0.7:
            add("write", rng.randrange(size), rng.randint(1, 3 * cluster))
        elif choice < 0.85:
            add("zeroes", rng.randrange(size), rng.randint(1, 3 * cluster))
        elif size >= 2 * cluster:
            add("discard", rng.randrange(size // cluster - 1) * cluster,
                cluster * rng.randint(1, 2))
    for op in ops[-max(1, count // 8):]:  # the tail: probably still queued
        if not op.cancel:
            op.cancel = "queued"
    reads = []
    for _ in range(count // 4):  # reads of ranges this round does not change
        offset, length = rng.randrange(size), rng.randint(1, 2 * cluster)
        length = min(length, size - offset)
        if taken.free(offset, length):
            reads.append(_Op("read", offset, length))
    return ops + reads


def _run_round(aio: AioImage, ops: list[_Op], model: bytearray, cluster: int,
               rng: random.Random, counts: _Counts, snap: _SnapshotModel,
               snapshot: Callable[[], AioFuture[Any]] | None = None) -> AioFuture[Any] | None:
    """Submit a round, cancel some requests, wait, and bring the model up to date.

    With *snapshot*, it is called (to submit an exclusive request) halfway through the
    submissions, so that it is a barrier between requests in flight; its future is
    returned.  The requests before it are in the snapshot, those after it are not:
    *snap* starts tracking changes from the first request after it.
    """
    flushes: list[AioFuture[Any]] = []
    barrier = None
    for i, op in enumerate(ops):
        if snapshot is not None and i == len(ops) // 2:
            barrier = snapshot()
        if op.kind == "write":
            op.future = aio.submit_write(op.offset, op.data)
        elif op.kind == "zeroes":
            op.future = aio.submit_write_zeroes(op.offset, op.length)
        elif op.kind == "discard":
            op.future = aio.submit_discard(op.offset, op.length)
        else:
            op.future = aio.submit_read(op.offset, op.length)
        if rng.random() < 0.03:
            flushes.append(aio.submit_flush())
    for op in ops:
        if op.cancel == "queued" and op.future is not None and op.future.cancel():
            op.cancelled_queued = True
    for op in ops:
        if op.cancel == "running" and op.future is not None:
            deadline = time.monotonic() + 5.0
            while not op.future.running() and not op.future.done() \
                    and time.monotonic() < deadline:
                time.sleep(0.0002)
            aio.cancel(op.future)
    futures = [op.future for op in ops if op.future is not None] + flushes
    if barrier is not None:
        futures.append(barrier)
    done, not_done = wait(futures, timeout=WAIT_TIMEOUT)
    if not_done:
        raise RuntimeError(f"{len(not_done)} requests did not finish in {WAIT_TIMEOUT} s")
    for i, op in enumerate(ops):
        if barrier is not None and i == len(ops) // 2 and barrier.exception() is None:
            snap.taken = snap.tracking = True
        _account(aio, op, model, cluster, counts, snap)
    for flush in flushes:
        counts.flushes += 1
        if flush.exception() is not None:
            counts.mismatches.append(f"flush failed: {flush.exception()!r}")
    return barrier


def _account(aio: AioImage, op: _Op, model: bytearray, cluster: int, counts: _Counts,
             snap: _SnapshotModel) -> None:
    """Check one finished request and apply what it did to the model (and to *snap*)."""
    future = op.future
    assert future is not None
    start, end = op.offset, op.offset + op.length
    if op.kind == "discard":  # only whole clusters are discarded (read as zeros after)
        start, end = -(-start // cluster) * cluster, end // cluster * cluster
    if future.cancelled():
        if op.cancelled_queued:  # never ran: the final verification checks the range
            counts.cancelled_queued += 1
            return
        counts.cancelled_running += 1
        if op.kind == "read" or end <= start:
            return
        got = aio.submit_read(start, end - start).result(WAIT_TIMEOUT)
        new = op.data if op.kind == "write" else bytes(end - start)
        n_new, n_old, bad = old_or_new_per_cluster(got, model[start:end], new, start, cluster)
        counts.clusters_new += n_new
        counts.clusters_old += n_old
        if bad >= 0:
            counts.mismatches.append(f"cancelled {op.kind} at {op.offset:#x}+{op.length}: "
                                     f"cluster at {bad:#x} holds neither old nor new data")
        snap.before_change(model, start, end)
        model[start:end] = got  # adopt what the cancelled request left
        return
    exc = future.exception()
    if exc is not None:
        counts.mismatches.append(f"{op.kind} at {op.offset:#x}+{op.length} failed: {exc!r}")
        return
    if op.cancel == "running":
        counts.cancel_too_late += 1
    if op.kind != "read":
        snap.before_change(model, start, end)
    if op.kind == "read":
        counts.reads += 1
        counts.read_bytes += op.length
        at = _first_mismatch(future.result(), model[start:end])
        if at >= 0:
            counts.mismatches.append(f"read at {op.offset:#x}+{op.length}: MISMATCH at "
                                     f"byte {start + at}")
    elif op.kind == "write":
        counts.writes += 1
        counts.written += op.length
        model[start:end] = op.data
    elif op.kind == "zeroes":
        counts.zeroes += 1
        model[start:end] = bytes(end - start)
    else:
        counts.discards += 1
        if end > start:
            model[start:end] = bytes(end - start)


def run(options: DemoOptions) -> int:
    """Run the demo; 0 when every check passed, 1 on any mismatch or qemu-img complaint."""
    out = options.out if options.out is not None else sys.stdout

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    if not 0 < options.size <= MAX_DEMO_SIZE:
        raise UsageError(f"demo size must be between 1 byte and {size_to_str(MAX_DEMO_SIZE)} "
                         "(the demo keeps a copy of the whole disk in memory)")
    if not 1 <= options.workers <= MAX_WORKERS:
        raise UsageError(f"demo workers must be between 1 and {MAX_WORKERS}")
    started = time.monotonic()
    if options.directory is not None:
        os.makedirs(options.directory, exist_ok=True)
        workdir, own_dir = options.directory, False
    else:
        workdir, own_dir = tempfile.mkdtemp(prefix="qcow2rw-demo-"), True
    path = os.path.join(workdir, "demo.qcow2")
    failures = 0
    try:
        failures = _run_in(path, options, say)
    finally:
        if options.keep:
            say(f"kept: {path}")
        elif own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            for leftover in (path, path + ".expected.raw"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
    elapsed = time.monotonic() - started
    say(f"{'OK' if failures == 0 else 'FAILED'} ({elapsed:.1f} s)")
    return 0 if failures == 0 else 1


def _run_in(path: str, options: DemoOptions, say: Callable[[str], None]) -> int:
    """The demo proper, on the image at *path*; returns the number of failed checks."""
    failures = 0
    rng = random.Random(options.seed)
    model = bytearray(options.size)
    counts = _Counts()

    with qcow2rw.create(path, options.size) as img:
        size, cluster = img.size, img.cluster_size
        snap = _SnapshotModel(cluster)
        if size != options.size:  # qcow2 rounds the size up to 512 bytes
            model.extend(bytes(size - len(model)))
        say(f"qcow2rw demo: {path} ({size_to_str(size)} virtual, {cluster}-byte clusters, "
            f"{options.workers} worker threads, seed {options.seed})")
        rounds = max(1, -(-options.requests // ROUND_OPS))
        t0 = time.monotonic()
        with AioImage(img, workers=options.workers) as aio:
            for r in range(rounds):
                count = min(ROUND_OPS, options.requests - r * ROUND_OPS) or 1
                ops = _plan_round(rng, size, cluster, count, r == 0)
                take_snapshot = r == rounds // 2
                barrier = _run_round(aio, ops, model, cluster, rng, counts, snap,
                                     (lambda: aio.submit_snapshot(SNAPSHOT)) if take_snapshot
                                     else None)
                if barrier is not None:
                    failures += _snapshot_verdict(barrier, r, say)
            aio.submit_flush().result(WAIT_TIMEOUT)
            counts.flushes += 1
            elapsed = time.monotonic() - t0
            say(f"  {rounds} rounds in {elapsed:.2f} s: {counts.writes} writes "
                f"({size_to_str(counts.written)}) at unaligned offsets, {counts.zeroes} "
                f"write_zeroes, {counts.discards} discards, {counts.reads} reads checked, "
                f"{counts.flushes} flushes")
            say(f"  cancelled: {counts.cancelled_queued} while queued (never ran), "
                f"{counts.cancelled_running} while running ({counts.clusters_new} of their "
                f"clusters hold new data, {counts.clusters_old} old"
                f"{', none a mix' if not counts.mismatches else ''}), "
                f"{counts.cancel_too_late} finished before noticing")
            for line in counts.mismatches[:10]:
                say(f"  MISMATCH: {line}")
            failures += len(counts.mismatches)
            bad = verify_through(aio, model)
            say(f"  read back all {size_to_str(size)} through the pool and compared with "
                "the in-memory copy: " + ("OK" if bad < 0 else f"MISMATCH at byte {bad}"))
            failures += bad >= 0

    with qcow2rw.open(path, readonly=True) as img:
        bad = verify(img, model)
        say("  reopened read-only and compared again: "
            + ("OK" if bad < 0 else f"MISMATCH at byte {bad}"))
        failures += bad >= 0
        try:
            img.write(0, b"x")
        except ReadOnlyImage:
            say("  a write to the read-only image is refused: OK")
        else:
            say("  a write to the read-only image was accepted: FAILED")
            failures += 1
        extents = img.map()
    allocated = sum(e["length"] for e in extents if e["data"])
    say(f"  map: {len(extents)} extents, {size_to_str(allocated)} of data")
    failures += _qemu_verdict(path, model, say)
    if snap.taken:
        failures += _check_snapshot(path, model, snap, options.workers, say)
    return failures


def _check_snapshot(path: str, model: bytearray, snap: _SnapshotModel, workers: int,
                    say: Callable[[str], None]) -> int:
    """Apply the snapshot through the pool, verify its content, delete it; failed checks.

    Runs last: applying the snapshot changes the disk the other checks compared.
    """
    failures = 0
    with qcow2rw.open(path) as img, AioImage(img, workers=workers) as aio:
        aio.submit_apply_snapshot(SNAPSHOT).result(WAIT_TIMEOUT)
        bad = verify_through(aio, model, snap)
        say(f"  applied snapshot '{SNAPSHOT}' ({len(snap.saved)} clusters changed since) "
            "and compared with its content: " + ("OK" if bad < 0 else f"MISMATCH at byte {bad}"))
        failures += bad >= 0
        aio.submit_delete_snapshot(SNAPSHOT).result(WAIT_TIMEOUT)
    if shutil.which(qemutools.QEMU_IMG) is not None:
        code, report = qemutools.check(path)
        say("  qemu-img check after apply and delete: "
            + ("clean" if code == 0 else f"FAILED (exit {code}: {report})"))
        failures += code != 0
    return failures


def _snapshot_verdict(future: AioFuture[Any], round_: int, say: Callable[[str], None]) -> int:
    """Report the snapshot taken mid-round; 1 if it failed for another reason."""
    try:
        future.result(WAIT_TIMEOUT)
    except UnsupportedFeature:
        say("  snapshot: this Image does not support snapshots yet, skipped")
        return 0
    except Exception as exc:  # noqa: BLE001 - reported as a failed check
        say(f"  snapshot '{SNAPSHOT}' through submit_snapshot: FAILED ({exc})")
        return 1
    say(f"  snapshot '{SNAPSHOT}' taken through submit_snapshot in the middle of round "
        f"{round_ + 1} (an exclusive request: those before it finished first, those "
        "after it waited)")
    return 0


def _qemu_verdict(path: str, model: bytearray, say: Callable[[str], None]) -> int:
    """``qemu-img check`` and ``qemu-img compare`` against the model; failed checks."""
    if shutil.which(qemutools.QEMU_IMG) is None:
        say("  qemu-img not found: check skipped (install qemu-utils)")
        return 0
    failures = 0
    code, report = qemutools.check(path)
    verdicts = {0: "No errors were found on the image.",
                2: f"{report.get('corruptions', '?')} errors were found on the image.",
                3: f"{report.get('leaks', '?')} leaked clusters were found on the image."}
    verdict = verdicts.get(code, f"check failed (exit {code}): "
                           f"{report.get('_stderr', '').strip()}")
    say(f"  qemu-img check: {verdict}")
    failures += code != 0

    expected = path + ".expected.raw"
    with open(expected, "wb") as f:
        f.write(model)
    try:
        proc = qemutools.qemu_img("compare", "-f", "qcow2", "-F", "raw", path, expected,
                                  check=False)
    finally:
        os.unlink(expected)
    result = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
    say(f"  qemu-img compare with the expected content: {result[0] if result else proc.returncode}")
    failures += proc.returncode != 0
    return failures
