"""Cancellation that means what it says (issue 11 §5): a request can be cancelled
while it waits for another request's allocation in flight or for the global lock
behind an exclusive operation, and a running write stops at the next cluster."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path
from typing import Any

import pytest

import qcow2rw
from qcow2rw.cancel import CancelToken, RequestCancelled
from qcow2rw.events import EventPoints

CS = 4096


@pytest.mark.parametrize("op", ["write", "write_zeroes", "discard"])
def test_cancel_while_waiting_for_an_allocation(tmp_path: Path, op: str) -> None:
    img = qcow2rw.create(tmp_path / "a.qcow2", 1 << 20, cluster_size=CS)
    events = img.events = EventPoints()
    events.set_break("cluster_alloc")  # A's clusters are reserved and in flight
    a = threading.Thread(target=img.write, args=(0, b"a" * (2 * CS)))
    a.start()
    assert events.wait_break("cluster_alloc")
    with img.aio(workers=2) as aio:
        if op == "write":
            f = aio.submit_write(CS + 512, b"b" * 512)
        elif op == "write_zeroes":
            f = aio.submit_write_zeroes(0, 2 * CS)
        else:
            f = aio.submit_discard(0, 2 * CS)
        for _ in range(200):  # until it is running (and so waiting for A)
            if f.running():
                break
            threading.Event().wait(0.005)
        assert f.running()
        try:
            assert aio.cancel(f)
            with pytest.raises(concurrent.futures.CancelledError):
                f.result(timeout=2)  # A is still held: B stopped waiting for it
        finally:
            events.resume("cluster_alloc")
            a.join()
    assert img.read(0, 2 * CS) == b"a" * (2 * CS)  # B changed nothing
    img.events = None
    assert img.check().corruptions == 0
    img.close()


@pytest.mark.parametrize("lock_mode", ["mutex", "rwlock", "fine"])
@pytest.mark.parametrize("op", ["read", "write", "discard", "write_zeroes"])
def test_cancel_while_waiting_behind_an_exclusive_operation(tmp_path: Path, lock_mode: str,
                                                            op: str) -> None:
    """A read, write, discard or write_zeroes whose worker waits for the global lock
    while another thread holds the image exclusively stops waiting when it is
    cancelled.  (Discard and write_zeroes waited for the lock with no look at their
    token, SharedSection.run, until it took one: their cancel timed out here.)"""
    qcow2rw.create(tmp_path / "a.qcow2", 1 << 20, cluster_size=CS).close()
    img = qcow2rw.open(tmp_path / "a.qcow2", lock_mode=lock_mode)
    img.write(0, b"a" * CS)
    held, leave = threading.Event(), threading.Event()

    def hold_exclusively() -> None:
        with img.exclusive():
            held.set()
            leave.wait(10)

    holder = threading.Thread(target=hold_exclusively)
    holder.start()
    assert held.wait(5)
    try:
        with img.aio(workers=2) as aio:
            if op == "read":
                f = aio.submit_read(0, CS)
            elif op == "write":
                f = aio.submit_write(0, b"b" * CS)
            elif op == "discard":
                f = aio.submit_discard(0, CS)
            else:
                f = aio.submit_write_zeroes(0, CS)
            for _ in range(200):
                if f.running():
                    break
                threading.Event().wait(0.005)
            assert f.running()
            assert aio.cancel(f)
            with pytest.raises(concurrent.futures.CancelledError):
                f.result(timeout=2)  # the exclusive hold is still there
            assert holder.is_alive()
    finally:
        leave.set()
        holder.join()
    assert img.read(0, CS) == b"a" * CS
    img.close()


class _CancelAtWrite:
    """A storage-seam hook (``HostFile.faults``) that cancels *token* at the first
    data write (after it has been let through) and fails nothing."""

    def __init__(self, token: Any) -> None:
        self.token = token
        self.writes = 0

    def check(self, op: str) -> None:
        if op == "pwrite":
            self.writes += 1
            if self.writes == 1:
                self.token.cancel()  # this write still goes through


def test_a_cancelled_overwrite_stops_at_the_next_cluster(tmp_path: Path) -> None:
    """An in-place write of 16 clusters, cancelled during its first cluster's write:
    that cluster holds the new data, the 15 others the old (it used to check only
    between runs of up to 1 MiB, so all 16 were written)."""
    img = qcow2rw.create(tmp_path / "a.qcow2", 1 << 20, cluster_size=CS)
    img.write(0, b"o" * (16 * CS))
    token = CancelToken()
    img.file.faults = _CancelAtWrite(token)
    with pytest.raises(RequestCancelled):
        img.write(0, b"n" * (16 * CS), cancel=token)
    img.file.faults = None
    assert img.read(0, CS) == b"n" * CS
    assert img.read(CS, 15 * CS) == b"o" * (15 * CS)
    img.close()


def test_a_cancelled_allocating_write_links_nothing(tmp_path: Path) -> None:
    """Cancelled after its data went to new clusters but before they were linked:
    every cluster still reads as before, and the new clusters are given back."""
    img = qcow2rw.create(tmp_path / "a.qcow2", 1 << 20, cluster_size=CS)
    token = CancelToken()
    img.file.faults = _CancelAtWrite(token)
    with pytest.raises(RequestCancelled):
        img.write(0, b"n" * (16 * CS), cancel=token)
    img.file.faults = None
    assert img.read(0, 16 * CS) == bytes(16 * CS)
    result = img.check()
    assert result.corruptions == 0 and result.leaks == 0, result
    img.close()
