"""The flush rule (issue 11 §1): when ``flush()`` returns, every write that completed
before it was called, on any thread, is durable.

Two races broke it: a flush that ran while another thread's cache eviction was inside
its store saw the table clean (the dirty flag was cleared before the store) and
returned before the store; and a flush that started while another thread's fsync ran
saw ``unsynced`` cleared and returned before that fsync did.  These tests hold one
thread at an event point in the middle of the race and check that the other waits;
the crash replay of concurrent workloads (tests/test_crash.py: ``writeback_race``,
``threads_evicting``) checks the crash states of such interleavings.
"""

from __future__ import annotations

import errno
import threading
from pathlib import Path
from typing import Any

import pytest

import qcow2rw
from qcow2rw.cache import CacheEntry, MetadataCache
from qcow2rw.events import EventPoints
from qcow2rw.storage import FaultInjector, HostFile

import crashreplay

CS = 512


def _old_write_back(self: MetadataCache, entry: CacheEntry) -> None:
    """The write-back as it was: the dirty flag cleared before the store."""
    if not entry.dirty:
        return
    if self._before_writeback is not None:
        self._before_writeback(entry)
    entry.dirty = False
    if self.fire is not None:
        self.fire("l2_writeback_start")
    try:
        self._store(entry.offset, entry.table)
    except BaseException:
        entry.dirty = True
        raise


def _image_with_dirty_cache(path: Path) -> Any:
    """An image with an 8-table cache holding 8 dirty tables (new clusters in each)
    and a ninth table on disk that is not cached."""
    qcow2rw.create(path, 1 << 20, cluster_size=CS).close()
    img = qcow2rw.open(path, lock_mode="fine", cache_size=8 * CS)
    span = CS << img.l2_bits
    for t in range(16):
        img.write(t * span, b"a" * CS)
    img.flush()
    for t in range(8, 16):
        img.write(t * span + 3 * CS, b"b" * CS)
    return img


def _flush_beside_a_held_writeback(path: Path, wait: float) -> bool:
    """A reader's load evicts a dirty table and is held just before its store while
    another thread flushes; True if the flush returned within *wait* seconds, while
    the store was still held."""
    img = _image_with_dirty_cache(path)
    events = img.events = EventPoints()
    events.set_break("l2_writeback_start")
    reader = threading.Thread(target=img.read, args=(0, CS))
    reader.start()
    assert events.wait_break("l2_writeback_start")
    flushed = threading.Event()
    flusher = threading.Thread(target=lambda: (img.flush(), flushed.set()))
    flusher.start()
    try:
        early = flushed.wait(wait)
    finally:
        events.resume("l2_writeback_start")
        reader.join()
        flusher.join()
    assert flushed.is_set()
    img.close()
    return early


def test_flush_waits_for_a_writeback_in_its_store(tmp_path: Path) -> None:
    """A flush must not return until a write-back held before its store is made (fine
    mode: the only mode where the two do not exclude each other through a shared lock)."""
    assert not _flush_beside_a_held_writeback(tmp_path / "a.qcow2", 0.5), \
        "flush() returned while a write-back was still to be stored"


def test_old_write_back_order_is_caught(tmp_path: Path, monkeypatch: Any) -> None:
    """The same test with the old order returns early, and the crash replay of the
    ``writeback_race`` workload loses a flushed write: neither check is blind."""
    monkeypatch.setattr(MetadataCache, "write_back", _old_write_back)
    assert _flush_beside_a_held_writeback(tmp_path / "a.qcow2", 5)
    rec = crashreplay.record_workload("writeback_race", tmp_path)
    summary = crashreplay.check_recording(rec, crashreplay.crash_states(rec, full=False),
                                          qemu="none", workdir=tmp_path)
    assert summary.lost > 0, summary.line()


def _host_file(path: Path) -> HostFile:
    path.write_bytes(bytes(4096))
    return HostFile(str(path), readonly=False, lock=False)


def test_flush_waits_for_a_sync_in_flight(tmp_path: Path) -> None:
    """Thread B's write returned before thread A's sync started (A cleared
    ``unsynced``, then stopped before its fdatasync): B's flush must wait for A's sync
    instead of returning at once because nothing looks unsynced."""
    f = _host_file(tmp_path / "f")
    events = EventPoints()
    f.fire = events.fire
    f.pwrite(0, b"b" * 512)  # B's write
    events.set_break("flush_to_disk")
    a = threading.Thread(target=f.flush)
    a.start()
    assert events.wait_break("flush_to_disk")
    assert not f.unsynced
    done = threading.Event()
    b = threading.Thread(target=lambda: (f.flush(), done.set()))
    b.start()
    try:
        assert not done.wait(0.5), "flush() returned before the sync covering its write ended"
    finally:
        events.resume("flush_to_disk")
        a.join()
        b.join()
    assert done.is_set() and f.synced == 1 == f.syncs_started  # B joined A's sync
    f.close()


def test_a_write_during_a_sync_needs_the_next_one(tmp_path: Path) -> None:
    """A write that returns while a sync runs is not covered by it: the next flush
    runs a sync of its own, which starts after that sync ended."""
    f = _host_file(tmp_path / "f")
    events = EventPoints()
    f.fire = events.fire
    f.log = []
    f.pwrite(0, b"a" * 512)
    events.set_break("flush_to_disk")
    a = threading.Thread(target=f.flush)
    a.start()
    assert events.wait_break("flush_to_disk")
    f.pwrite(512, b"b" * 512)  # returns while A's sync is between its start and end
    b = threading.Thread(target=f.flush)
    b.start()
    events.resume("flush_to_disk")
    a.join()
    b.join()
    assert f.synced == f.syncs_started == 2
    kinds = [(k, v) for k, v, _ in f.log]
    assert kinds == [("write", 0), ("sync-start", 1), ("write", 512), ("sync", 1),
                     ("sync-start", 2), ("sync", 2)]
    f.close()


def test_sync_past_a_mark(tmp_path: Path) -> None:
    """sync_past(mark) runs a sync only when none numbered above the mark succeeded;
    flush() with nothing written since the last sync runs none."""
    f = _host_file(tmp_path / "f")
    f.pwrite(0, b"x")
    mark = f.sync_mark()
    f.sync_past(mark)
    assert f.synced == 1
    f.sync_past(mark)
    f.flush()
    assert f.syncs_started == 1
    f.pwrite(0, b"y")
    f.sync_past(mark)  # the mark is older than the write: nothing to do for it
    assert f.syncs_started == 1
    f.flush()
    assert f.syncs_started == 2
    f.close()


def test_failed_sync_covers_nothing(tmp_path: Path) -> None:
    """A failed fdatasync is logged as failed, counts as no sync, and poisons the file
    for every thread: a flush waiting on it raises too."""
    f = _host_file(tmp_path / "f")
    f.log = []
    f.pwrite(0, b"x" * 512)
    f.faults = FaultInjector("fsync", 1, errno.EIO)
    with pytest.raises(OSError):
        f.flush()
    assert f.synced == 0 and f.unsynced
    assert [k for k, _, _ in f.log] == ["write", "sync-start", "sync-failed"]
    with pytest.raises(qcow2rw.Qcow2Error):
        f.flush()
    f.close()


def test_many_threads_flushing_each_find_their_write_synced(tmp_path: Path) -> None:
    """Eight threads write and flush in a loop; after each flush the write log must
    hold a successful sync that started after that thread's write returned."""
    f = _host_file(tmp_path / "f")
    f.log = []
    errors: list[str] = []
    barrier = threading.Barrier(8)

    def worker(t: int) -> None:
        try:
            work(t)
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            errors.append(f"thread {t}: {exc!r}")

    def work(t: int) -> None:
        barrier.wait()
        for k in range(40):
            data = bytes([k + 1]) * 512
            f.pwrite(t * 512, data)
            with f._log_lock:
                wrote = max(i for i, e in enumerate(f.log) if e == ("write", t * 512, data))
            f.flush()
            with f._log_lock:
                after = f.log[wrote:]
            started = {v for kind, v, _ in after if kind == "sync-start"}
            if not any(kind == "sync" and v in started for kind, v, _ in after):
                errors.append(f"thread {t} flush {k}: no sync started after its write")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    assert f.syncs_started < 8 * 40  # flushes share syncs
    f.close()
