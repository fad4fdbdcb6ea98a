"""The concurrency stress (issue 4, item 5) and proof that its oracle can fail.

* every lock mode, 4 threads, 8 MiB images with 4 KiB and 64 KiB clusters, a couple
  of seconds each with ``sys.setswitchinterval(1e-6)`` and jitter at the image's event
  points: no failure, and each round closes with a clean ``qemu-img check`` and an
  identical ``qemu-img compare``;
* the oracle's rules on hand-made histories (superseded, in flight, read windows);
* the oracle fails when it should: an Image wrapper that returns a flipped byte, one
  that loses writes, one that misdirects them, and corruption of the file behind the
  image's back (data: ``qemu-img compare`` and the re-read after reopening catch it;
  a refcount: ``qemu-img check`` does);
* ``qcow2rw stress`` runs from the command line;
* a long soak (``-m soak``), not in the default run.

Reproduce a failure with the seed it names: ``qcow2rw stress --seed N --lock-mode M``
(or set ``QCOW2RW_STRESS_SEED`` for this file).
"""

from __future__ import annotations

import json
import os
import struct
import sys
import threading
from typing import Any

import pytest

from qcow2rw import cli, qemutools
from qcow2rw.devkit.oracle import (SECTOR, ZERO, SharedModel, racing_mix, read_candidates, stamp,
                                   value_id)
from qcow2rw.devkit.stress import run_stress

MODES = ("mutex", "rwlock", "fine")
SEED = int(os.environ.get("QCOW2RW_STRESS_SEED", "4004"))
MiB = 1 << 20


def _quiet(_: str) -> None:
    pass


def _explain(result: Any) -> str:
    return result.summary() + "\n" + "\n".join(result.failures)


# --------------------------------------------------------------------------- brief runs
@pytest.mark.interop
@pytest.mark.timeout(120)
@pytest.mark.parametrize("cluster_size", [4096, 65536], ids=["4k", "64k"])
@pytest.mark.parametrize("lock_mode", MODES)
def test_stress_every_lock_mode(qemu: Any, tmp_path: Any, lock_mode: str,
                                cluster_size: int) -> None:
    """4 threads for ~2.4 s in two rounds (the second with jitter), GIL switching every µs."""
    old = sys.getswitchinterval()
    result = run_stress(tmp_path, workers=4, seed=SEED, duration=2.4, lock_mode=lock_mode,
                        cluster_size=cluster_size, size=8 * MiB, rounds=2,
                        switchinterval=1e-6, jitter=0.05, qemu=True, log=_quiet)
    assert sys.getswitchinterval() == old  # restored
    assert result.ok, _explain(result)
    assert result.rounds == 2 and result.qemu_checked
    for kind in ("read", "write", "discard", "write_zeroes", "flush"):
        assert result.ops[kind] > 0, _explain(result)
    assert result.ops["write"] >= 50 and result.ops["read"] >= 50, _explain(result)


# --------------------------------------------------------------------------- the rules
def test_model_rules() -> None:
    """Superseded, in-flight and read-window rules on a hand-made history of sector 0."""
    model = SharedModel(4)
    a = model.begin(0, 1, value_id(1, 1))        # write A
    model.end(a)
    b = model.begin(0, 1, value_id(2, 1))        # write B starts after A ended
    assert model.final_candidates(0) == {value_id(1, 1), value_id(2, 1)}  # B in flight
    token = model.begin_read()                   # a read overlapping B
    model.end(b)
    start, snap = model.end_read(token, 0, 1)
    assert read_candidates(snap[0], start) == {value_id(1, 1), value_id(2, 1)}
    assert model.final_candidates(0) == {value_id(2, 1)}  # B superseded A
    token = model.begin_read()                   # a read after B ended: B only
    start, snap = model.end_read(token, 0, 1)
    assert read_candidates(snap[0], start) == {value_id(2, 1)}
    # Two overlapping writes: either may win; a zeroing that starts later wins alone.
    c = model.begin(0, 1, value_id(3, 1))
    d = model.begin(0, 1, value_id(4, 1))
    model.end(c)
    model.end(d)
    assert model.final_candidates(0) == {value_id(3, 1), value_id(4, 1)}
    z = model.begin(0, 1, ZERO)
    model.end(z)
    assert model.final_candidates(0) == {ZERO}
    # An untouched sector keeps its round-start value, also while others change.
    model.new_round({1: value_id(5, 9)})
    token = model.begin_read()
    start, snap = model.end_read(token, 0, 2)
    assert read_candidates(snap[0], start) == {ZERO}
    assert read_candidates(snap[1], start) == {value_id(5, 9)}
    e = model.begin(1, 2, value_id(6, 1))          # in flight over the round-start value
    token = model.begin_read()
    start, snap = model.end_read(token, 1, 2)
    assert read_candidates(snap[0], start) == {value_id(5, 9), value_id(6, 1)}
    model.end(e)


def test_racing_mix_only_excuses_writes_in_flight() -> None:
    """A read may see its sector's old value half overwritten by a write racing it (the
    page cache does not make a 512-byte pread atomic against a concurrent pwrite; CI saw
    it in rwlock mode), but a mix of two values at rest before the read is a torn sector."""
    model = SharedModel(4)
    old, new, other = value_id(1, 1), value_id(2, 1), value_id(3, 1)
    a = model.begin(0, 1, old)
    model.end(a)
    token = model.begin_read()
    b = model.begin(0, 1, new)                    # starts while the read runs
    model.end(b)
    start, snap = model.end_read(token, 0, 1)
    allowed = read_candidates(snap[0], start)
    torn = stamp(1, 1, 0)[:200] + stamp(2, 1, 0)[200:]
    assert racing_mix(torn, 0, 0, allowed, snap[0], start)
    assert racing_mix(torn[100:300], 0, 100, allowed, snap[0], start)  # a partial sector
    garbage = torn[:300] + b"\xff" * (SECTOR - 300)
    assert not racing_mix(garbage, 0, 0, allowed, snap[0], start)
    # Two writes that overlapped each other but both ended before the read began: either
    # may be read, a mix of them may not.
    model.new_round({})
    c = model.begin(0, 1, old)
    d = model.begin(0, 1, other)
    model.end(c)
    model.end(d)
    token = model.begin_read()
    start, snap = model.end_read(token, 0, 1)
    allowed = read_candidates(snap[0], start)
    assert allowed == {old, other}
    mixed = stamp(1, 1, 0)[:200] + stamp(3, 1, 0)[200:]
    assert not racing_mix(mixed, 0, 0, allowed, snap[0], start)


def test_stamp_layout() -> None:
    """A stamp names its thread, sequence number and sector and carries a CRC."""
    s = stamp(3, 77, 12345)
    assert len(s) == SECTOR
    magic, tid, seq, sector = struct.unpack_from("<4sIQQ", s)
    assert (magic, tid, seq, sector) == (b"QSTR", 3, 77, 12345)
    assert s != stamp(3, 77, 12346) and s != stamp(3, 78, 12345)


# --------------------------------------------------------------------------- the oracle fails
class _Proxy:
    """Forwards everything to the real Image; subclasses plant one kind of fault."""

    def __init__(self, img: Any, every: int) -> None:
        self.img = img
        self.every = every
        self.calls = 0
        self.faults = 0
        self.lock = threading.Lock()

    def _due(self) -> bool:
        with self.lock:
            self.calls += 1
            due = self.calls % self.every == 0
            self.faults += due
            return due

    def __getattr__(self, name: str) -> Any:
        return getattr(self.img, name)


class _FlipsReadBytes(_Proxy):
    """Every Nth read returns one byte flipped (in the middle of the result)."""

    def read(self, offset: int, length: int) -> bytes:
        data = self.img.read(offset, length)
        if self._due():
            buf = bytearray(data)
            buf[len(buf) // 2] ^= 0x40
            data = bytes(buf)
        return data

    def readinto(self, offset: int, buffer: Any) -> int:
        n = self.img.readinto(offset, buffer)
        if self._due():
            view = memoryview(buffer).cast("B")
            view[len(view) // 2] ^= 0x40
        return n


class _LosesWrites(_Proxy):
    """Every Nth write returns without writing anything."""

    def write(self, offset: int, data: Any) -> None:
        if not self._due():
            self.img.write(offset, data)


class _MisdirectsWrites(_Proxy):
    """Every Nth write lands one sector further on (when it still fits)."""

    def write(self, offset: int, data: Any) -> None:
        if self._due() and offset + SECTOR + len(data) <= self.img.size:
            offset += SECTOR
        self.img.write(offset, data)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("proxy, every, expect", [
    (_FlipsReadBytes, 50, ("torn or garbage", "match no allowed value", "first difference")),
    (_LosesWrites, 25, ("stale", "cannot be there", "first difference")),
    (_MisdirectsWrites, 25, ("foreign", "stale", "cannot be there", "first difference")),
], ids=["flipped-read-byte", "lost-write", "misdirected-write"])
def test_oracle_catches_faults(tmp_path: Any, proxy: type, every: int,
                               expect: tuple[str, ...]) -> None:
    """An Image that lies (now and then) makes the stress fail, naming the seed."""
    proxies: list[_Proxy] = []

    def wrap(img: Any) -> Any:
        proxies.append(proxy(img, every))
        return proxies[-1]

    result = run_stress(tmp_path, workers=4, seed=SEED, ops=2000, lock_mode="fine",
                        cluster_size=4096, size=8 * MiB, rounds=2, wrap=wrap, qemu=False,
                        log=_quiet)
    assert sum(p.faults for p in proxies) > 0
    assert not result.ok, "the oracle missed planted faults: " + result.summary()
    text = "\n".join(result.failures)
    assert f"seed={SEED}" in text
    assert any(word in text for word in expect), text


def _data_cluster(path: str) -> int:
    """Host offset of an allocated data cluster of the image at *path*."""
    for extent in qemutools.map_json(path):
        if extent.get("data") and "offset" in extent and not extent.get("zero"):
            return int(extent["offset"])
    raise AssertionError("no allocated data cluster")


@pytest.mark.interop
@pytest.mark.timeout(120)
def test_compare_and_reopen_catch_data_corrupted_on_disk(qemu: Any, tmp_path: Any) -> None:
    """512 bytes of guest data changed in the file after round 1's close: caught twice."""

    def corrupt(path: str, rnd: int) -> None:
        if rnd == 1:
            offset = _data_cluster(path)
            with open(path, "r+b") as f:
                f.seek(offset)
                old = f.read(SECTOR)
                f.seek(offset)
                f.write(bytes(b ^ 0x5A for b in old))

    result = run_stress(tmp_path, workers=4, seed=SEED, ops=800, lock_mode="fine",
                        cluster_size=65536, size=8 * MiB, rounds=2, on_closed=corrupt,
                        qemu=True, log=_quiet)
    text = "\n".join(result.failures)
    assert "qemu-img compare" in text, text
    assert "reopen and re-read" in text, text


@pytest.mark.interop
@pytest.mark.timeout(120)
def test_check_catches_refcount_corrupted_on_disk(qemu: Any, tmp_path: Any) -> None:
    """The header cluster's refcount raised from 1 to 2 after the close: a leak, caught."""

    def leak(path: str, rnd: int) -> None:
        with open(path, "r+b") as f:
            header = f.read(104)
            reftable = struct.unpack_from(">Q", header, 48)[0]
            assert struct.unpack_from(">I", header, 96)[0] == 4  # 16-bit refcounts
            f.seek(reftable)
            refblock = struct.unpack(">Q", f.read(8))[0]
            f.seek(refblock)  # the entry of cluster 0
            assert struct.unpack(">H", f.read(2))[0] == 1
            f.seek(refblock)
            f.write(struct.pack(">H", 2))

    result = run_stress(tmp_path, workers=2, seed=SEED, ops=200, lock_mode="fine",
                        cluster_size=65536, size=8 * MiB, rounds=1, on_closed=leak,
                        qemu=True, log=_quiet)
    text = "\n".join(result.failures)
    assert "qemu-img check" in text and "leaks" in text, text


# --------------------------------------------------------------------------- command line
@pytest.mark.interop
@pytest.mark.timeout(120)
def test_cli_stress(qemu: Any, tmp_path: Any, capsys: Any) -> None:
    """``qcow2rw stress`` runs every lock mode and reports OK."""
    status = cli.main(["stress", "-j", "3", "--seed", "7", "--ops", "300", "--size", "4M",
                       "--cluster-size", "4k", "--rounds", "2", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "stress: OK" in out
    for mode in MODES:
        assert f"[{mode}] OK" in out


def test_cli_stress_rejects_impossible_layout(tmp_path: Any, capsys: Any) -> None:
    """An image too small for the threads is one clear error line, exit 1."""
    status = cli.main(["stress", "-j", "8", "--ops", "10", "--size", "64k",
                       "--cluster-size", "64k", "--dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 1
    assert "too small" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- soak
@pytest.mark.soak
@pytest.mark.interop
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("cluster_size", [512, 4096, 65536], ids=["512", "4k", "64k"])
@pytest.mark.parametrize("lock_mode", MODES)
def test_soak(qemu: Any, tmp_path: Any, lock_mode: str, cluster_size: int) -> None:
    """Minutes per mode: 8 threads, 32 MiB, 5 rounds (``QCOW2RW_SOAK_SECONDS``, default 60)."""
    seconds = float(os.environ.get("QCOW2RW_SOAK_SECONDS", "60"))
    result = run_stress(tmp_path, workers=8, seed=SEED, duration=seconds, lock_mode=lock_mode,
                        cluster_size=cluster_size, size=32 * MiB, rounds=5,
                        switchinterval=1e-6, jitter=0.02, qemu=True, log=_quiet)
    print(json.dumps({"summary": result.summary()}))
    assert result.ok, _explain(result)


# --------------------------------------------------------------------------- chaos
@pytest.mark.interop
@pytest.mark.timeout(120)
@pytest.mark.parametrize("lock_mode", MODES)
def test_chaos_stress_every_lock_mode(qemu: Any, tmp_path: Any, lock_mode: str) -> None:
    """Snapshots created, applied and deleted and the image grown every ~30 ms while 4
    threads write; every snapshot's content is checked when taken and when applied,
    and qemu-img applies the last one to the same content."""
    result = run_stress(tmp_path, workers=4, seed=SEED, duration=2.0, lock_mode=lock_mode,
                        cluster_size=4096, size=4 * MiB, rounds=2, switchinterval=1e-5,
                        chaos=0.03, qemu=True, log=_quiet)
    assert result.ok, _explain(result)
    created, applied = (int(result.chaos.split()[i]) for i in (1, 5))
    assert created >= 4 and applied >= 1, result.chaos


class _AppliesTheWrongSnapshot(_Proxy):
    """apply_snapshot reverts to the oldest snapshot instead of the one named."""

    def apply_snapshot(self, name: str) -> None:
        self.img.apply_snapshot(self.img.snapshots()[0].name)


class _SnapshotsLoseAWrite(_Proxy):
    """create_snapshot first scribbles on a sector of thread 0's region (its bytes
    512 KiB .. 768 KiB in the 1 MiB layout below)."""

    def create_snapshot(self, name: str) -> Any:
        self.img.write((512 << 10) + 7 * SECTOR, b"\x99" * SECTOR)
        return self.img.create_snapshot(name)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("proxy, expect", [
    (_AppliesTheWrongSnapshot, "chaos apply"),
    (_SnapshotsLoseAWrite, "chaos create"),
], ids=["wrong-snapshot-applied", "snapshot-content-changed"])
def test_chaos_oracle_catches_faults(tmp_path: Any, proxy: type, expect: str) -> None:
    """The chaos checks fail on a snapshot that restores the wrong content or that does
    not hold what was acknowledged when it was taken."""
    result = run_stress(tmp_path, workers=2, seed=SEED, duration=3.0, lock_mode="fine",
                        cluster_size=4096, size=1 * MiB, rounds=1, chaos=0.02, qemu=False,
                        wrap=lambda img: proxy(img, 1), log=_quiet)
    assert not result.ok
    assert any(expect in failure for failure in result.failures), result.failures


@pytest.mark.soak
@pytest.mark.interop
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("lock_mode", MODES)
def test_chaos_soak(qemu: Any, tmp_path: Any, lock_mode: str) -> None:
    """The chaos stress for minutes per mode (``QCOW2RW_SOAK_SECONDS``, default 60)."""
    seconds = float(os.environ.get("QCOW2RW_SOAK_SECONDS", "60"))
    result = run_stress(tmp_path, workers=8, seed=SEED, duration=seconds, lock_mode=lock_mode,
                        cluster_size=4096, size=16 * MiB, rounds=5, switchinterval=1e-6,
                        jitter=0.02, chaos=0.05, qemu=True, log=_quiet)
    print(json.dumps({"summary": result.summary()}))
    assert result.ok, _explain(result)
