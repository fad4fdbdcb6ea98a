"""``qcow2rw demo``: create an image, write it, read it back, verify, let qemu-img judge.

Everything goes through the public API (``qcow2rw.create``/``qcow2rw.open``); a
``bytearray`` of the whole virtual disk is the model every byte is checked against.
When qemu-img is installed, ``qemu-img check`` must find the image clean and
``qemu-img compare`` must read exactly the model's bytes.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import qcow2rw
from qcow2rw import qemutools
from qcow2rw.cli import CliError, size_to_str
from qcow2rw.errors import ReadOnlyImage

MAX_DEMO_SIZE = 1 << 30  # the model is a bytearray of the whole disk
VERIFY_CHUNK = 1 << 20


@dataclass
class DemoOptions:
    """What ``qcow2rw demo`` was asked to do."""

    directory: str | None = None  #: where to put the image (default: a new temporary directory)
    size: int = 64 << 20          #: virtual size in bytes
    keep: bool = False            #: keep the image (and print its path) afterwards
    seed: int = 2024              #: seed of the request generator
    requests: int = 200           #: number of random writes
    out: TextIO | None = field(default=None, repr=False)  #: where to print (default stdout)


@dataclass
class _Counts:
    writes: int = 0
    written: int = 0
    zeroes: int = 0
    discards: int = 0


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


def _workload(size: int, cluster: int, rng: random.Random, requests: int
              ) -> list[tuple[str, int, int]]:
    """The request list: ``(kind, offset, length)`` with kind write, zeroes or discard.

    Fixed edge cases first (first and last byte, cluster boundaries, a multi-cluster
    unaligned write), then random unaligned writes of 1 byte to 3 clusters, with a few
    unaligned write_zeroes and cluster-aligned discards among them.  Discards are
    cluster-aligned because a partial-cluster discard may legitimately keep its data.
    """
    ops: list[tuple[str, int, int]] = []

    def clamp(kind: str, offset: int, length: int) -> None:
        offset = min(max(0, offset), size - 1)
        ops.append((kind, offset, max(1, min(length, size - offset))))

    clamp("write", 0, 1)
    clamp("write", size - 1, 1)
    clamp("write", cluster - 100, 200)
    clamp("write", 5 * cluster - 7, 3 * cluster + 123)
    clamp("zeroes", 5 * cluster + 1000, cluster)
    clamp("write", size // 2 + 3, 1 << 20)
    for _ in range(requests):
        choice = rng.random()
        if choice < 0.85:
            clamp("write", rng.randrange(size), rng.randint(1, 3 * cluster))
        elif choice < 0.95:
            clamp("zeroes", rng.randrange(size), rng.randint(1, 3 * cluster))
        elif size >= 2 * cluster:
            start = rng.randrange(size // cluster - 1) * cluster
            clamp("discard", start, cluster * rng.randint(1, 2))
    if size >= 8 * cluster:
        clamp("discard", 5 * cluster, cluster)     # inside the early multi-cluster write
        clamp("write", 5 * cluster + 4000, 3)      # then a partial write into the hole
    return ops


def run(options: DemoOptions) -> int:
    """Run the demo; 0 when every check passed, 1 on any mismatch or qemu-img complaint."""
    out = options.out if options.out is not None else sys.stdout

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    if not 0 < options.size <= MAX_DEMO_SIZE:
        raise CliError(f"demo size must be between 1 byte and {size_to_str(MAX_DEMO_SIZE)} "
                         "(the demo keeps a copy of the whole disk in memory)")
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
        if size != options.size:  # qcow2 rounds the size up to 512 bytes
            model.extend(bytes(size - len(model)))
        say(f"qcow2rw demo: {path} ({size_to_str(size)} virtual, {cluster}-byte clusters)")
        for kind, offset, length in _workload(size, cluster, rng, options.requests):
            if kind == "write":
                data = rng.randbytes(length) if rng.random() < 0.5 else \
                    bytes([rng.randrange(1, 256)]) * length
                img.write(offset, data)
                model[offset:offset + length] = data
                counts.writes += 1
                counts.written += length
            elif kind == "zeroes":
                img.write_zeroes(offset, length)
                model[offset:offset + length] = bytes(length)
                counts.zeroes += 1
            else:
                img.discard(offset, length)
                model[offset:offset + length] = bytes(length)
                counts.discards += 1
        say(f"  wrote {counts.writes} requests ({size_to_str(counts.written)}) at unaligned "
            f"offsets, {counts.zeroes} write_zeroes, {counts.discards} discards")
        img.flush()
        bad = verify(img, model)
        say(f"  read back all {size_to_str(size)} and compared with the in-memory copy: "
            + ("OK" if bad < 0 else f"MISMATCH at byte {bad}"))
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
    return failures + _qemu_verdict(path, model, say)


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
