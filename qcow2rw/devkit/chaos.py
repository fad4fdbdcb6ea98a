"""The stress tool's chaos thread (issue 5): exclusive operations under load.

While the stress workers (:mod:`qcow2rw.devkit.stress`) read and write, one more thread
takes internal snapshots, applies them, deletes them and grows the image.  Each of
these takes the image exclusively, so the workers' requests in flight drain first and
new ones wait; the test is that nothing acknowledged is lost or mixed up by it.

What the model knows, and how each action is checked:

* **create**: right after ``create_snapshot``, still holding the image exclusively,
  the thread reads the whole disk.  That content is the snapshot's: each shared
  sector must be a value a read over the same ticks could return (the stress
  oracle's read rule), each owned region must equal its owner's shadow exactly.  The
  snapshot's content is kept (value ids for the shared region, bytes for the owned
  regions, and the disk size).
* **apply**: ``apply_snapshot``, then, still exclusive, the whole disk must read back
  as exactly the kept content: the data acknowledged before the snapshot was taken,
  nothing written since.  The shared model records the revert as one request per
  sector storing the kept value (a worker request that overlapped it in ticks may
  land before or after it), and each owned shadow is reset to the kept bytes.
* **delete** and **grow** must leave the active content alone; the round's final
  check and ``qemu-img check`` / ``compare`` see to that.  After the run the newest
  kept snapshot is applied by ``qemu-img snapshot -a`` on a copy of the image and
  compared with its kept content (when qemu-img runs).

The owned regions are exact only if no owner request straddles a create or an
apply: each worker holds its own ``owned_locks[tid]`` for the length of an
owned-region request, and the chaos thread takes all of them, in thread order,
before it takes the image exclusively (lock order: owned locks, then the image).
"""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qcow2rw.devkit.oracle import (SECTOR, ZERO, BadSector, check_sector, decode,
                                   describe_mismatch, describe_value, read_candidates,
                                   value_bytes)

if TYPE_CHECKING:
    from qcow2rw.devkit.stress import _Run

#: Snapshots kept at once; a create beyond this deletes one first.
MAX_SNAPSHOTS = 4
#: The image never grows past this multiple of its starting size.
MAX_GROWTH = 4
#: Relative weights of the chaos actions.
ACTIONS = (("create", 4), ("apply", 2), ("delete", 2), ("grow", 1))


@dataclass
class KeptSnapshot:
    """What the disk held when a chaos snapshot was taken."""

    name: str
    size: int
    shared: dict[int, int]   # shared-region sector -> value id (zeros left out)
    owned: list[bytes]       # each owned region's bytes

    def content(self, layout: Any) -> bytes:
        """The first ``layout.size`` bytes of the disk at the snapshot."""
        out = bytearray(layout.size)
        for sector, vid in self.shared.items():
            out[sector * SECTOR:(sector + 1) * SECTOR] = value_bytes(vid, sector)
        for (lo, hi), data in zip(layout.owned, self.owned):
            out[lo:hi] = data
        return bytes(out)


class Chaos:
    """The chaos thread of one stress run (see the module docstring).

    ``kept`` (snapshots and their content) and ``counts`` live across rounds; only
    this thread changes them while a round runs.
    """

    def __init__(self, run: _Run, interval: float) -> None:
        self.run = run
        self.interval = interval
        self.kept: dict[str, KeptSnapshot] = {}
        self.counts = {"created": 0, "applied": 0, "deleted": 0, "grown": 0}
        self._serial = 0

    # The loop ---------------------------------------------------------------------
    def run_round(self, img: Any, rng: random.Random, deadline: float | None,
                  workers: list[threading.Thread]) -> None:
        """Act every ~``interval`` s until *deadline* or until the workers are done."""
        run = self.run
        kinds = [k for k, _ in ACTIONS]
        weights = [w for _, w in ACTIONS]
        while not run.stop.is_set():
            run.stop.wait(rng.uniform(0, 2 * self.interval))
            if run.stop.is_set() or not any(t.is_alive() for t in workers):
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
            kind = rng.choices(kinds, weights)[0]
            try:
                getattr(self, "_" + kind)(img, rng)
            except Exception:
                run.fail(f"chaos {kind}", "raised\n" + traceback.format_exc())
                return

    def _owned_locks(self) -> ExitStack:
        stack = ExitStack()
        for lock in self.run.owned_locks:
            stack.enter_context(lock)
        return stack

    # Actions -------------------------------------------------------------------------
    def _create(self, img: Any, rng: random.Random) -> None:
        if len(self.kept) >= MAX_SNAPSHOTS:
            self._delete(img, rng)
        self._serial += 1
        name = f"chaos-r{self.run.round}-{self._serial}"
        run, model, layout = self.run, self.run.model, self.run.layout
        with self._owned_locks():
            token = model.begin_read()
            try:
                with img.exclusive():
                    img.create_snapshot(name)
                    size = img.size
                    shared = _read(img, 0, layout.shared_end)
                    owned = [_read(img, lo, hi - lo) for lo, hi in layout.owned]
            finally:
                read_start, hists = model.end_read(token, 0, layout.shared_end // SECTOR)
            for tid, data in enumerate(owned):
                if data != run.shadows[tid]:
                    run.fail(f"chaos create {name}: thread {tid}'s region",
                             describe_mismatch(data, run.shadows[tid], layout.owned[tid][0]))
                    return
        values: dict[int, int] = {}
        view = memoryview(shared)
        for sector, hist in enumerate(hists):
            part = view[sector * SECTOR:(sector + 1) * SECTOR]
            problem = check_sector(part, sector, 0, read_candidates(hist, read_start), hist)
            if problem:
                run.fail(f"chaos create {name}", f"sector {sector} read as the snapshot was "
                                                 f"taken: {problem}")
                return
            vid = decode(part, sector)
            if vid != ZERO:
                values[sector] = vid
        self.kept[name] = KeptSnapshot(name, size, values, owned)
        self.counts["created"] += 1

    def _apply(self, img: Any, rng: random.Random) -> None:
        if not self.kept:
            return
        snap = self.kept[rng.choice(sorted(self.kept))]
        run, model, layout = self.run, self.run.model, self.run.layout
        with self._owned_locks():
            ops = model.begin_restore(snap.shared)
            try:
                with img.exclusive():
                    img.apply_snapshot(snap.name)
                    size = img.size
                    shared = _read(img, 0, layout.shared_end)
                    owned = [_read(img, lo, hi - lo) for lo, hi in layout.owned]
            finally:
                model.end_restore(ops)
            for tid, data in enumerate(owned):
                run.shadows[tid][:] = snap.owned[tid]
                if data != snap.owned[tid]:
                    run.fail(f"chaos apply {snap.name}: thread {tid}'s region",
                             describe_mismatch(data, snap.owned[tid], layout.owned[tid][0]))
        if size != snap.size:
            run.fail(f"chaos apply {snap.name}", f"disk size {size}, snapshot had {snap.size}")
        for sector in range(layout.shared_end // SECTOR):
            chunk = shared[sector * SECTOR:(sector + 1) * SECTOR]
            want = snap.shared.get(sector, ZERO)
            try:
                got = decode(chunk, sector)
            except BadSector as exc:
                got, why = None, str(exc)
            else:
                why = f"holds {describe_value(got)}"
            if got != want:
                run.fail(f"chaos apply {snap.name}", f"sector {sector} (guest offset "
                         f"{sector * SECTOR:#x}) {why}, the snapshot had {describe_value(want)}")
                return
        self.counts["applied"] += 1

    def _delete(self, img: Any, rng: random.Random) -> None:
        if not self.kept:
            return
        name = rng.choice(sorted(self.kept))
        img.delete_snapshot(name)
        del self.kept[name]
        self.counts["deleted"] += 1

    def _grow(self, img: Any, rng: random.Random) -> None:
        layout = self.run.layout
        step = rng.choice((SECTOR, layout.cluster_size, 1 << 20, 3 << 20))
        new_size = -(-(img.size + step) // SECTOR) * SECTOR
        if new_size <= MAX_GROWTH * layout.size:
            img.resize(new_size)
            self.counts["grown"] += 1

    # After the run -------------------------------------------------------------------
    def qemu_apply_newest(self, qemutools: Any, path: str, directory: str) -> str | None:
        """``qemu-img snapshot -a`` the newest kept snapshot on a copy; a problem or None."""
        if not self.kept:
            return None
        snap = list(self.kept.values())[-1]
        copy = os.path.join(directory, "chaos-copy.qcow2")
        raw = os.path.join(directory, "chaos-copy.raw")
        shutil.copyfile(path, copy)
        try:
            qemutools.qemu_img("snapshot", "-a", snap.name, copy)
            qemutools.convert_to_raw(copy, raw)
            with open(raw, "rb") as f:
                got = f.read(self.run.layout.size)
            want = snap.content(self.run.layout)
            if got != want:
                return (f"qemu-img snapshot -a {snap.name}: "
                        + describe_mismatch(got, want, 0))
            return None
        finally:
            for name in (copy, raw):
                if os.path.exists(name):
                    os.unlink(name)

    def summary(self) -> str:
        """``snapshots 5 created, 2 applied and verified, 3 deleted; grown 1 time``."""
        c = self.counts
        return (f"snapshots {c['created']} created and verified, {c['applied']} applied and "
                f"verified, {c['deleted']} deleted; grown {c['grown']} times")


def _read(img: Any, offset: int, length: int) -> bytes:
    """*length* bytes at *offset*, read in 1 MiB requests."""
    out = bytearray()
    for pos in range(offset, offset + length, 1 << 20):
        out += img.read(pos, min(1 << 20, offset + length - pos))
    return bytes(out)
