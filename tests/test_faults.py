"""I/O errors at every point of the write path, like qemu-iotests 026 (issue 7).

Each scenario starts from a prepared image and runs one request (a write that
allocates, a new L2 table, a new refcount block, refcount-table growth, L1 growth,
copy-on-write from a backing file, snapshot create and delete, resize, discard)
followed by a flush.  The storage seam's :class:`FaultInjector` then makes the Nth
pread, pwrite, fsync or truncate of that request fail, for every N the request
makes, with EIO or ENOSPC, once or from then on; and each event point the request
passes is failed once the blkdebug way (``EventPoints.inject_error``).  Each time:

- the request fails with that ``OSError`` (a fault it did not reach changes nothing);
- after a transient error the image carries on: a later write and flush succeed and
  read back; after a failed fsync it is read-only (``SyncFailed``), for good;
- the file afterwards has leaks at most, for qcow2rw's check and ``qemu-img check``
  (with lazy refcounts: a dirty bit, and a read-write open repairs it to clean), and
  every sector reads as before or after the request, never anything else.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import qcow2rw
from qcow2rw.check import check_image
from qcow2rw.errors import ReadOnlyImage, SyncFailed
from qcow2rw.events import EventPoints
from qcow2rw.format import INCOMPAT_DIRTY
from qcow2rw.image import Image, open_for_check
from qcow2rw.storage import FAULT_OPS, FaultInjector

CS = 512
SIZE = 2 << 20
FOLLOW = 24 * 1024  # the follow-up write after a transient error: in L2 table 0, untouched
FOLLOW_DATA = b"\xf0" * 2048
NEVER = 1 << 60


def _pattern(seed: int, length: int) -> bytes:
    return bytes((seed * 37 + i // 512) % 251 + 1 for i in range(length))


@dataclass
class Scenario:
    """A request under test: how to build its starting image, and the request itself."""

    name: str
    op: Callable[[Image], None]
    events: tuple[str, ...]
    prepare: Callable[[Path], None]
    lazy: bool = False
    opts: dict[str, Any] = field(default_factory=dict)


def _base(path: Path, *, lazy: bool = False, refcount_bits: int = 16, size: int = SIZE,
          backing: Path | None = None) -> Image:
    kwargs: dict[str, Any] = {}
    if backing is not None:
        kwargs = {"backing_file": str(backing), "backing_format": "qcow2"}
    img = qcow2rw.create(path, size, cluster_size=CS, lazy_refcounts=lazy,
                         refcount_bits=refcount_bits, **kwargs)
    img.write(0, _pattern(1, 8 * CS))
    return img


def _prep_plain(path: Path) -> None:
    _base(path).close()


def _prep_lazy(path: Path) -> None:
    _base(path, lazy=True).close()


def _prep_near_new_refblock(path: Path) -> None:
    """The next allocation needs a new refcount block (16-bit: 256 clusters per block)."""
    img = _base(path)
    guest = 64 * 1024
    block = img.refcounts.block_entries
    while img.refcounts.free_hint % block < block - 3:
        img.write(guest, _pattern(2, CS))
        guest += CS
    img.close()


def _prep_near_reftable_growth(path: Path) -> None:
    """The next allocations need a refcount block the one-cluster table has no entry for."""
    img = _base(path, refcount_bits=64, size=8 << 20)
    entries = len(img.refcounts.reftable)
    guest = 3 << 20
    while img.refcounts.high_water < (entries << img.refcounts.block_bits) - 24:
        img.write(guest, _pattern(3, 16 * CS))
        guest += 16 * CS
    img.close()


def _prep_with_backing(path: Path) -> None:
    backing = path.with_name(path.stem + "-backing.qcow2")
    img = qcow2rw.create(backing, SIZE, cluster_size=CS)
    img.write(0, _pattern(9, 256 * 1024))
    img.close()
    _base(path, backing=backing).close()


def _prep_tail(path: Path) -> None:
    img = _base(path)
    img.write(SIZE - 128 * 1024, _pattern(13, 8 * CS))
    img.close()


def _prep_snapshot(path: Path) -> None:
    img = _base(path)
    img.write(64 * 1024, _pattern(4, 16 * CS))
    img.create_snapshot("s1")
    img.write(0, _pattern(5, 4 * CS))  # the active image drifts from the snapshot
    img.close()


def _many_tables(img: Image) -> None:
    """Allocating writes into 12 L2 tables: with an 8-table cache, tables are evicted
    (and refcount blocks with them) in the middle of requests."""
    for t in range(12):
        img.write(t * 32 * 1024 + 16 * 1024 + 4096 * 10, _pattern(14 + t, CS))


def _flushed(func: Callable[[Image], None]) -> Callable[[Image], None]:
    """A request followed by a flush (the flush's failure leaves the request acknowledged)."""
    def op(img: Image) -> None:
        func(img)
        op.acked = True  # type: ignore[attr-defined]
        img.flush()
    op.retry = True  # type: ignore[attr-defined]
    return op


SCENARIOS = [
    Scenario("alloc", _flushed(lambda img: img.write(10 * CS, _pattern(6, 3 * CS))),
             ("cluster_alloc", "write_aio", "l2_update", "refblock_update", "flush_to_disk"),
             _prep_plain),
    Scenario("overwrite", _flushed(lambda img: img.write(CS + 100, _pattern(6, CS))),
             ("write_aio", "flush_to_disk"), _prep_plain),
    Scenario("l2_alloc", _flushed(lambda img: img.write(300 * 1024, _pattern(7, 2 * CS))),
             ("l2_alloc", "cluster_alloc", "l1_update", "refblock_update"), _prep_plain),
    Scenario("refblock_alloc", _flushed(lambda img: img.write(1024 * 1024, _pattern(8, 8 * CS))),
             ("refblock_alloc", "refblock_update", "l2_alloc"), _prep_near_new_refblock),
    Scenario("reftable_grow", _flushed(lambda img: img.write(1200 * 1024, _pattern(8, 48 * CS))),
             ("reftable_grow", "refblock_update"), _prep_near_reftable_growth),
    Scenario("l1_grow", lambda img: img.resize(64 << 20), ("l1_grow",), _prep_plain),
    Scenario("cow_backing", _flushed(lambda img: img.write(20 * CS + 256, _pattern(10, 600))),
             ("cow_read", "cow_write", "cluster_alloc", "l2_update"), _prep_with_backing),
    Scenario("discard", _flushed(lambda img: (img.discard(2 * CS, 4 * CS),
                                              img.write_zeroes(6 * CS, 2 * CS))),
             ("cluster_free",), _prep_plain),
    Scenario("snapshot_create", lambda img: img.create_snapshot("s2"),
             ("refblock_update", "l1_update"), _prep_snapshot),
    Scenario("snapshot_cow", _flushed(lambda img: img.write(64 * 1024, _pattern(11, CS))),
             ("l2_alloc", "cluster_alloc", "cluster_free"), _prep_snapshot),
    Scenario("snapshot_delete", lambda img: img.delete_snapshot("s1"),
             ("cluster_free",), _prep_snapshot),
    Scenario("shrink", lambda img: img.resize(SIZE - 256 * 1024, shrink=True), ("cluster_free",),
             _prep_tail),
    Scenario("evicting", _flushed(_many_tables), ("l2_alloc", "refblock_alloc", "refblock_update"),
             _prep_near_new_refblock, opts={"cache_size": 4 * CS}),
    Scenario("lazy_alloc", _flushed(lambda img: img.write(300 * 1024, _pattern(12, 3 * CS))),
             ("l2_alloc", "cluster_alloc"), _prep_lazy, lazy=True),
]


@dataclass
class Case:
    """One fault and what came of it."""

    label: str
    path: Path
    error: BaseException | None = None
    fired: bool = False
    followed_up: bool = False
    dirty: bool = False
    acked: bool = False  # the request returned (its flush may have failed)


def _run_case(scn: Scenario, start: bytes, path: Path, label: str,
              faults: FaultInjector | None = None, event: str | None = None,
              err: int = errno.EIO) -> Case:
    path.write_bytes(start)
    case = Case(label, path)
    img = qcow2rw.open(path, **scn.opts)
    events = None
    if faults is not None:
        img.file.faults = faults
    if event is not None:
        events = img.events = EventPoints()
        events.inject_error(event, err)
    scn.op.acked = False  # type: ignore[attr-defined]
    try:
        scn.op(img)
        case.acked = True
    except OSError as exc:
        case.error = exc
        case.acked = getattr(scn.op, "acked", False)
    case.fired = bool(faults.fired) if faults is not None else event not in events._errors
    if case.fired:
        assert isinstance(case.error, OSError) and case.error.errno == err, \
            f"{label}: the request should fail with errno {err}, got {case.error!r}"
    else:
        assert case.error is None, f"{label}: {case.error!r} without a fault"
    persistent = faults is not None and faults.persistent
    if img.file.sync_error is not None:  # a failed fsync: read-only for good
        with pytest.raises(SyncFailed):
            img.write(FOLLOW, FOLLOW_DATA)
        with pytest.raises(SyncFailed):
            img.flush()
        assert img.readonly
    elif not persistent:  # a transient error: the image carries on
        img.write(FOLLOW, FOLLOW_DATA)
        img.flush()
        assert img.read(FOLLOW, len(FOLLOW_DATA)) == FOLLOW_DATA, label
        case.followed_up = True
        if case.error is not None and hasattr(scn.op, "retry"):  # the same request again
            _retry(scn, img, label)
            case.acked = True
    _assert_idle(img, label)
    try:
        img.close()
    except OSError:
        assert persistent, f"{label}: close failed after a transient error"
    return case


def _assert_idle(img: Image, label: str) -> None:
    """No request runs: nothing may be left pinned, in use or in flight."""
    assert not img._in_use, f"{label}: in-use marks left behind: {img._in_use}"
    for cache in (img.l2_cache, img.refcounts.cache):
        for entry in list(cache._entries.values()):
            assert entry.pins == 0, f"{label}: {cache.name} {entry.offset:#x} left pinned"
            assert not entry.inflight, f"{label}: in-flight records left on {entry.offset:#x}"


def _retry(scn: Scenario, img: Image, label: str) -> None:
    """Run the failed request again: nothing it left behind (an in-flight record, a
    pin) may make it wait forever or fail."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            scn.op(img)
        except BaseException as exc:  # noqa: BLE001 (reported by the assertion below)
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), f"{label}: the request hangs when retried after the error"
    assert not errors, f"{label}: the retried request failed: {errors[0]!r}"


def _our_verdict(path: Path, lazy: bool) -> tuple[int, int, bool]:
    """(corruptions, leaks, dirty) by our own check."""
    img = open_for_check(path, repair=False, force_share=True)
    try:
        res = check_image(img, None)
        dirty = bool(img.header.incompatible_features & INCOMPAT_DIRTY)
    finally:
        img.close()
    assert res.error is None and not res.check_errors, (path, res.error, res.messages[-3:])
    return res.corruptions, res.leaks, dirty


def _verify(scn: Scenario, case: Case, before: bytes, after: bytes) -> None:
    corruptions, _, dirty = _our_verdict(case.path, scn.lazy)
    case.dirty = dirty
    if dirty:  # lazy refcounts, or a snapshot operation cut short
        assert scn.lazy or scn.name.startswith("snapshot"), f"{case.label}: dirty bit"
    else:
        assert corruptions == 0, f"{case.label}: {corruptions} corruptions"
    img = qcow2rw.open(case.path, readonly=True, force_share=True)
    try:
        n = min(img.size, len(before), len(after))
        data = img.read(0, n)
    finally:
        img.close()
    if case.followed_up:
        assert data[FOLLOW:FOLLOW + len(FOLLOW_DATA)] == FOLLOW_DATA, f"{case.label}: lost flush"
        if case.acked:  # acknowledged, then a flush succeeded: it must all be there
            rest = FOLLOW + len(FOLLOW_DATA)
            if data[:FOLLOW] != after[:FOLLOW] or data[rest:n] != after[rest:n]:
                lo = next(i for i in range(0, n, 512) if data[i:i + 512] != after[i:i + 512])
                raise AssertionError(f"{case.label}: sector {lo // 512} lost an acknowledged, "
                                     "flushed write")
    if case.followed_up:  # the follow-up write is checked: compare the rest as before/after
        data = data[:FOLLOW] + after[FOLLOW:FOLLOW + len(FOLLOW_DATA)] + data[FOLLOW + len(FOLLOW_DATA):]
    if data in (before[:n], after[:n]):
        return _repair_if_dirty(scn, case, dirty)
    for lo in range(0, n, 512):
        got = data[lo:lo + 512]
        assert got in (before[lo:lo + 512], after[lo:lo + 512]), \
            f"{case.label}: sector {lo // 512} reads as neither before nor after the request"
    _repair_if_dirty(scn, case, dirty)


def _repair_if_dirty(scn: Scenario, case: Case, dirty: bool) -> None:
    if dirty:  # a read-write open repairs a dirty image to clean
        img = qcow2rw.open(case.path)
        img.close()
        corruptions, leaks, dirty = _our_verdict(case.path, scn.lazy)
        assert (corruptions, leaks, dirty) == (0, 0, False), case.label


def _qemu_checks(qemu: Any, cases: list[Case]) -> None:
    """qemu-img check on every final file, a few processes at a time."""
    def one(case: Case) -> tuple[Case, int, dict[str, Any]]:
        rc, data = qemu.check(str(case.path))
        return case, rc, data

    with ThreadPoolExecutor(8) as pool:
        for case, rc, data in pool.map(one, cases):
            assert rc in (0, 3) or (case.dirty and rc == 2), \
                f"{case.label}: qemu-img check exit {rc}: {data}"


def _reference(scn: Scenario, start: bytes, path: Path) -> tuple[bytes, bytes, dict[str, int], dict[str, int]]:
    """Guest data before and after a fault-free run; its I/O counts and events seen."""
    path.write_bytes(start)
    with qcow2rw.open(path, readonly=True) as img:
        before = img.read(0, img.size)
    img = qcow2rw.open(path, **scn.opts)  # a fresh cache, as in every case
    counter = img.file.faults = FaultInjector("pread", NEVER)
    events = img.events = EventPoints()
    scn.op(img)
    img.events = None
    img.file.faults = None
    after = img.read(0, img.size)
    img.close()
    return before, after, dict(counter.calls), dict(events.seen)


def _spread(count: int, limit: int) -> list[int]:
    """1..count, or *limit* of them spread evenly (first and last included)."""
    if count <= limit:
        return list(range(1, count + 1))
    return sorted({1 + round(i * (count - 1) / (limit - 1)) for i in range(limit)})


@pytest.mark.parametrize("scn", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_fault_matrix(qemu: Any, tmp_path: Path, scn: Scenario) -> None:
    start_path = tmp_path / "start.qcow2"
    scn.prepare(start_path)
    start = start_path.read_bytes()
    before, after, calls, seen = _reference(scn, start, tmp_path / "ref.qcow2")
    for event in scn.events:
        assert seen.get(event), f"{scn.name} never reaches event point {event}: {seen}"
    if len(after) > len(before):
        before += bytes(len(after) - len(before))
    cases: list[Case] = []
    n = 0
    for op in FAULT_OPS:
        for nth in _spread(calls[op], 24):
            for persistent in (False, True):
                err = errno.EIO if (nth + persistent) % 2 else errno.ENOSPC
                label = f"{scn.name}: {op} #{nth} {errno.errorcode[err]} " \
                        f"{'from then on' if persistent else 'once'}"
                n += 1
                path = tmp_path / f"case{n}.qcow2"
                case = _run_case(scn, start, path, label,
                                 faults=FaultInjector(op, nth, err, persistent=persistent), err=err)
                assert case.fired, f"{label}: the fault was not reached"
                _verify(scn, case, before, after)
                cases.append(case)
    for event in sorted(seen):
        if event in ("read_aio", "flush_to_os", "l2_load") and event not in scn.events:
            continue
        n += 1
        err = errno.EIO if n % 2 else errno.ENOSPC
        case = _run_case(scn, start, tmp_path / f"case{n}.qcow2", f"{scn.name}: event {event}",
                         event=event, err=err)
        _verify(scn, case, before, after)
        cases.append(case)
    _qemu_checks(qemu, cases)
    assert len(cases) >= 4
    print(f"{scn.name}: {len(cases)} faults injected")  # shown with pytest -s


def test_failed_fsync_turns_image_read_only(tmp_path: Path) -> None:
    path = tmp_path / "f.qcow2"
    img = qcow2rw.create(path, SIZE, cluster_size=CS)
    img.write(0, b"a" * CS)
    img.file.faults = FaultInjector("fsync", 1, errno.EIO)
    with pytest.raises(OSError) as info:
        img.flush()
    assert info.value.errno == errno.EIO and not isinstance(info.value, ReadOnlyImage)
    img.file.faults = None  # the disk is back: still nothing may retry the sync
    assert img.readonly
    with pytest.raises(SyncFailed, match="fsync"):
        img.write(CS, b"b")
    with pytest.raises(SyncFailed):
        img.flush()
    with pytest.raises(SyncFailed):
        img.resize(2 * SIZE)
    with pytest.raises(SyncFailed):
        img.create_snapshot("x")
    assert img.read(0, CS) == b"a" * CS  # reads still work
    img.close()  # no flush is attempted; nothing raises
    with open_for_check(path, repair=False) as chk:
        assert check_image(chk, None).corruptions == 0


def test_injector_counts_and_persists(tmp_path: Path) -> None:
    path = tmp_path / "c.qcow2"
    img = qcow2rw.create(path, SIZE, cluster_size=CS)
    faults = img.file.faults = FaultInjector("pwrite", 2, errno.ENOSPC, persistent=True)
    img.file.pwrite(0, img.file.pread(0, 8))  # the first: fine
    for _ in range(3):
        with pytest.raises(OSError) as info:
            img.file.pwrite(0, b"x")
        assert info.value.errno == errno.ENOSPC
    assert faults.calls["pwrite"] == 4 and faults.calls["pread"] == 1 and faults.fired == 3
    img.file.faults = None
    img.close()
    with pytest.raises(ValueError):
        FaultInjector("fdatasync", 1)


@pytest.mark.parametrize("persistent", [False, True])
def test_other_requests_carry_on_or_fail_cleanly(qemu: Any, tmp_path: Path, persistent: bool) -> None:
    """Four writers; a pwrite fails in the middle.  Nobody hangs; the others carry on
    (transient) or fail with the error (persistent); the file has leaks at most."""
    path = tmp_path / "t.qcow2"
    qcow2rw.create(path, SIZE, cluster_size=CS).close()
    img = qcow2rw.open(path)
    img.file.faults = FaultInjector("pwrite", 25, errno.EIO, persistent=persistent)
    errors: list[list[BaseException]] = [[] for _ in range(4)]
    done: list[list[int]] = [[] for _ in range(4)]

    def writer(t: int) -> None:
        for k in range(30):
            offset = (k * 4 + t) * 2 * CS
            try:
                img.write(offset, _pattern(t * 100 + k, 2 * CS))
                done[t].append(k)
            except OSError as exc:
                errors[t].append(exc)
            if k % 10 == 9:
                try:
                    img.flush()
                except (OSError, ReadOnlyImage) as exc:
                    errors[t].append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads), "a request hangs after an I/O error"
    flat = [e for errs in errors for e in errs]
    assert flat and all(isinstance(e, (OSError, ReadOnlyImage)) for e in flat)
    if not persistent:
        assert sum(len(d) for d in done) >= 100  # the others carried on
        for t in range(4):
            for k in done[t]:
                offset = (k * 4 + t) * 2 * CS
                assert img.read(offset, 2 * CS) == _pattern(t * 100 + k, 2 * CS)
    try:
        img.close()
    except OSError:
        assert persistent
    corruptions, _, _ = _our_verdict(path, False)
    assert corruptions == 0
    rc, data = qemu.check(str(path))
    assert rc in (0, 3), data


def test_allocation_failing_mid_plan_leaves_no_inflight_record(tmp_path: Path) -> None:
    """A write over [new, allocated, new] clusters plans two allocations; the second
    fails (ENOSPC from a new refcount block).  The first one's in-flight record and
    clusters must be released: the same write again would otherwise wait forever."""
    path = tmp_path / "p.qcow2"
    img = qcow2rw.create(path, SIZE, cluster_size=CS)
    img.write(CS, b"m" * CS)  # cluster 1 allocated, 0 and 2 not
    original = img.refcounts.alloc
    calls = []

    def failing_alloc(count: int) -> int:
        calls.append(count)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "injected")
        return original(count)

    img.refcounts.alloc = failing_alloc  # type: ignore[method-assign]
    with pytest.raises(OSError):
        img.write(0, b"n" * 3 * CS)
    img.refcounts.alloc = original  # type: ignore[method-assign]
    _retry(Scenario("mid-plan", lambda i: i.write(0, b"n" * 3 * CS), (), _prep_plain), img,
           "mid-plan")
    assert img.read(0, 3 * CS) == b"n" * 3 * CS
    img.close()
    corruptions, leaks, _ = _our_verdict(path, False)
    assert (corruptions, leaks) == (0, 0)


def test_failed_refcount_write_keeps_l2_tables_behind(tmp_path: Path) -> None:
    """A refcount block write fails once during a flush; later, reads evict the dirty
    L2 tables.  Their write-back must still wait for the refcounts (seen before the
    fix: the increments counted as flushed although their write had failed, so an
    evicted L2 table reached the file first, and a crash state had referenced
    clusters with refcount 0)."""
    import crashreplay
    path = tmp_path / "e.qcow2"
    img = qcow2rw.create(path, SIZE, cluster_size=CS)
    span = CS << img.l2_bits
    for t in range(24):  # 24 L2 tables on disk
        img.write(t * span, b"p" * CS)
    img.close()
    start = path.read_bytes()
    img = qcow2rw.open(path, cache_size=8 * CS)  # 8 L2 tables in the cache
    img.file.log = []
    for t in range(6):  # new clusters in 6 tables: dirty tables and refcounts
        img.write(t * span + 4 * CS, _pattern(t, CS))
    img.file.faults = FaultInjector("pwrite", 1, errno.EIO)  # the refcount block
    with pytest.raises(OSError):
        img.flush()
    img.file.faults = None
    for t in range(8, 24):  # reads load other tables: the dirty ones are evicted
        img.read(t * span, CS)
    log = img.file.log
    img.close()
    rec = crashreplay.Recording("evict", start, [e for e in log if e[0] in crashreplay.IO_KINDS],
                                [], [], b"", SIZE)
    scratch = tmp_path / "state.qcow2"
    checked = 0
    for spec, state in crashreplay.unique_states(rec, crashreplay.crash_states(rec, full=True)):
        scratch.write_bytes(state)
        result = crashreplay.our_check(str(scratch))
        assert result.corruptions == 0, f"{spec.label}: {result.messages[:3]}"
        checked += 1
    assert checked > 10
