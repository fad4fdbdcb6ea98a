"""Helpers shared by the interop, stateful and growth tests.

The central piece is :class:`Shadow`: a bytearray model of the guest disk that applies
the same writes, discards and write_zeroes as the image, with the semantics of the
public contract:

* ``write(off, data)``: any offset/length;
* ``write_zeroes(off, n)``: the whole range reads as zeros afterwards;
* ``discard(off, n)``: only the clusters wholly inside ``[off, off + n)`` are discarded
  (partial clusters at the edges are untouched, but for the partial last cluster of
  a disk whose size is not a multiple of the cluster size, taken whole by a range
  that reaches the end of the disk, as QEMU does).  In a v3 image a discarded cluster
  reads as zeros; in a v2 image it becomes unallocated and reads from the backing
  file (or as zeros without one).

Everything QEMU-side goes through :mod:`qcow2rw.qemutools` (the ``qemu`` fixture).
"""

from __future__ import annotations

import random
import shutil
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from qcow2rw import AioImage, Image
from qcow2rw.aio import AioFuture
from qcow2rw.cancel import CancelToken

KiB = 1024
MiB = 1024 * 1024

#: keys of ``qemu-img info --output=json`` that ours must reproduce exactly.
#: ``filename``/``full-backing-filename`` depend on how the path was spelled;
#: ``actual-size`` counts host blocks and depends on how each writer lays the file out.
INFO_KEYS = ("virtual-size", "cluster-size", "format", "dirty-flag", "format-specific",
             "backing-filename", "backing-filename-format")


# --------------------------------------------------------------------------- shadow
class Shadow:
    """A bytearray model of the guest disk (see module docstring for the semantics)."""

    def __init__(self, size: int, cluster_size: int, *, v3: bool = True,
                 base: bytes | None = None):
        self.size = size
        self.cluster_size = cluster_size
        self.v3 = v3
        # what an unallocated cluster reads: the backing chain (padded/truncated) or zeros
        self.has_backing = base is not None
        base = bytes(base or b"")[:size]
        self.base = base + bytes(size - len(base))
        self.data = bytearray(self.base)

    def write(self, off: int, data: bytes) -> None:
        assert 0 <= off and off + len(data) <= self.size
        self.data[off:off + len(data)] = data

    def write_zeroes(self, off: int, n: int) -> None:
        assert 0 <= off and off + n <= self.size
        self.data[off:off + n] = bytes(n)

    def discard_range(self, off: int, n: int) -> tuple[int, int]:
        """The [start, end) that a discard of (off, n) really affects (whole clusters,
        and the partial last cluster of the disk when the range reaches its end)."""
        cs = self.cluster_size
        start = -(-off // cs) * cs
        end = self.size if off + n == self.size else ((off + n) // cs) * cs
        return start, max(start, end)

    def discard(self, off: int, n: int) -> None:
        start, end = self.discard_range(off, n)
        if end <= start:
            return
        if self.v3 or not self.has_backing:
            self.data[start:end] = bytes(end - start)
        # v2 with a backing file: QEMU refuses such a discard (it would expose the
        # backing file), and so do we: the data stays.

    def snapshot(self) -> bytes:
        return bytes(self.data)


# --------------------------------------------------------------------------- operations
@dataclass(frozen=True)
class Op:
    kind: str          # write | discard | zero | read | flush
    off: int = 0
    length: int = 0
    seed: int = 0      # data of a write: random.Random(seed).randbytes(length), or a fill byte

    def data(self) -> bytes:
        r = random.Random(self.seed)
        if self.seed % 5 == 0:                       # some compressible/repetitive writes
            return bytes([r.randrange(256)]) * self.length
        return r.randbytes(self.length)

    def __str__(self) -> str:
        return f"{self.kind}({self.off:#x}, {self.length:#x})"


def _pick_offset(rng: random.Random, size: int, cs: int) -> int:
    mode = rng.random()
    nclusters = size // cs
    if mode < 0.3:                                   # cluster aligned
        return rng.randrange(nclusters) * cs
    if mode < 0.6:                                   # just around a cluster boundary
        return min(size - 1, max(0, rng.randrange(1, nclusters + 1) * cs + rng.randint(-700, 700)))
    return rng.randrange(size)


def _pick_length(rng: random.Random, cs: int, max_len: int) -> int:
    mode = rng.random()
    if mode < 0.35:
        n = rng.randint(1, min(cs, 4096))            # small, within a cluster mostly
    elif mode < 0.55:
        n = cs                                       # one cluster
    elif mode < 0.8:
        n = rng.randint(1, 3 * cs)                   # crosses a boundary or two
    else:
        n = rng.randint(1, max_len)
    return max(1, min(n, max_len))


def random_ops(rng: random.Random, size: int, cs: int, count: int, *,
               max_len: int | None = None,
               weights: tuple[float, float, float, float, float] = (0.55, 0.14, 0.14, 0.14, 0.03)
               ) -> list[Op]:
    """Seeded random sequence of write/discard/zero/read/flush operations."""
    if max_len is None:
        max_len = max(3 * cs, 256 * KiB)
    kinds = ("write", "discard", "zero", "read", "flush")
    ops = []
    for _ in range(count):
        kind = rng.choices(kinds, weights)[0]
        if kind == "flush":
            ops.append(Op("flush"))
            continue
        off = _pick_offset(rng, size, cs)
        length = min(_pick_length(rng, cs, max_len), size - off)
        ops.append(Op(kind, off, length, rng.randrange(1 << 30)))
    return ops


def apply_op(img, shadow: Shadow, op: Op, ctx: str = "") -> None:
    """Apply *op* to the image and to the shadow; a read compares."""
    if op.kind == "write":
        data = op.data()
        img.write(op.off, data)
        shadow.write(op.off, data)
    elif op.kind == "discard":
        img.discard(op.off, op.length)
        shadow.discard(op.off, op.length)
    elif op.kind == "zero":
        img.write_zeroes(op.off, op.length)
        shadow.write_zeroes(op.off, op.length)
    elif op.kind == "read":
        got = img.read(op.off, op.length)
        assert_same_bytes(got, shadow.data[op.off:op.off + op.length],
                          f"{ctx} read after ops at {op}", base=op.off)
    elif op.kind == "flush":
        img.flush()
    else:  # pragma: no cover
        raise ValueError(op.kind)


def apply_ops(img, shadow: Shadow, ops: Iterable[Op], ctx: str = "") -> None:
    for i, op in enumerate(ops):
        try:
            apply_op(img, shadow, op, ctx)
        except AssertionError:
            raise
        except Exception as exc:
            raise AssertionError(f"{ctx}: op #{i} {op} raised {exc!r}") from exc


# --------------------------------------------------------------------------- comparisons
def first_difference(a, b) -> int | None:
    """Index of the first differing byte of two buffers (or the shorter length)."""
    ma, mb = memoryview(a).cast("B"), memoryview(b).cast("B")
    n = min(len(ma), len(mb))
    step = 1 << 16
    for i in range(0, n, step):
        if ma[i:i + step] != mb[i:i + step]:
            for j in range(i, min(i + step, n)):
                if ma[j] != mb[j]:
                    return j
    if len(ma) != len(mb):
        return n
    return None


def assert_same_bytes(actual, expected, ctx: str, *, base: int = 0, cluster_size: int | None = None
                      ) -> None:
    """Assert two buffers are equal, reporting the first differing guest offset."""
    __tracebackhide__ = True
    if len(actual) == len(expected) and bytes(actual) == bytes(expected):
        return
    i = first_difference(actual, expected)
    assert i is not None
    where = f"guest offset {base + i:#x}"
    if cluster_size:
        where += f" (cluster {(base + i) // cluster_size}, +{(base + i) % cluster_size:#x})"
    a = bytes(actual[i:i + 16]).hex()
    e = bytes(expected[i:i + 16]).hex()
    raise AssertionError(f"{ctx}: content differs at {where}; lengths {len(actual)} vs "
                         f"{len(expected)}; got {a} expected {e}")


def read_all(img, size: int | None = None, chunk: int = 4 * MiB) -> bytes:
    """The whole guest disk through ``read`` (in chunks)."""
    size = img.size if size is None else size
    out = bytearray()
    for off in range(0, size, chunk):
        out += img.read(off, min(chunk, size - off))
    return bytes(out)


def readinto_all(img, size: int | None = None, chunk: int = 3 * MiB + 512) -> bytes:
    """The whole guest disk through ``readinto``."""
    size = img.size if size is None else size
    buf = bytearray(size)
    mv = memoryview(buf)
    for off in range(0, size, chunk):
        n = min(chunk, size - off)
        got = img.readinto(off, mv[off:off + n])
        assert got == n, f"readinto({off:#x}, {n:#x}) returned {got}"
    return bytes(buf)


# --------------------------------------------------------------------------- qemu side
def qemu_check_clean(qemu, path, ctx: str = "") -> dict:
    """``qemu-img check``: exit 0, no corruptions, no leaks."""
    __tracebackhide__ = True
    rc, data = qemu.check(str(path))
    assert rc == 0 and not data.get("corruptions") and not data.get("leaks") \
        and not data.get("check-errors"), \
        f"{ctx}: qemu-img check exit {rc}: {({k: v for k, v in data.items() if k != '_stderr'})}" \
        f" stderr: {data.get('_stderr', '')[:2000]}"
    return data


def qemu_raw(qemu, path, tmp_dir, fmt: str = "qcow2", opts: tuple[str, ...] = ()) -> bytes:
    """What ``qemu-img convert -O raw`` reads from *path* (whole chain)."""
    tmp_dir = Path(tmp_dir)
    n = 0
    while (tmp_dir / f"_convert{n}.raw").exists():
        n += 1
    out = tmp_dir / f"_convert{n}.raw"
    qemu.qemu_img("convert", *opts, "-f", fmt, "-O", "raw", str(path), str(out))
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def qemu_io_run(qemu, path, *commands: str, fmt: str = "qcow2", unmap: bool = True,
                cache: str | None = None):
    """``qemu-io [-t CACHE] [-d unmap] -f FMT -c CMD ... PATH``; fails on any command failure.

    ``-d unmap`` is needed for ``discard`` to do anything (without it qemu-io's discards
    are silently dropped)."""
    args = ["-t", cache] if cache else []
    args += ["-d", "unmap"] if unmap else []
    args += ["-f", fmt]
    for c in commands:
        args += ["-c", c]
    proc = qemu.run(qemu.QEMU_IO, *args, str(path), check=True)
    bad = [l for l in (proc.stdout + proc.stderr).splitlines()
           if "failed" in l.lower() or "error" in l.lower()]
    assert not bad, f"qemu-io {commands} on {path}: {bad}"
    return proc


def compare_info(ours: dict, theirs: dict, ctx: str = "") -> None:
    __tracebackhide__ = True
    for key in INFO_KEYS:
        assert ours.get(key) == theirs.get(key), \
            f"{ctx}: info[{key!r}] ours={ours.get(key)!r} qemu-img={theirs.get(key)!r}"


def compare_map(ours: list, theirs: list, ctx: str = "") -> None:
    """Ours' ``map()`` equals ``qemu-img map --output=json`` exactly.

    Take the two maps back to back, with no read of the image's data in between: like
    qemu-img, ours reports a data cluster whose host range is a hole as ``zero: true``,
    and on ext4/xfs a range of unwritten (fallocated or zero-written) extents stops being
    a hole for SEEK_HOLE once its pages are in the page cache, i.e. after any read of it
    (``qemu-img convert``, ``shutil.copyfile``, our own reads)."""
    __tracebackhide__ = True
    ours = [dict(e) for e in ours]
    if ours == theirs:
        return
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            raise AssertionError(f"{ctx}: map extent #{i} differs: ours={a} qemu-img={b} "
                                 f"(ours has {len(ours)} extents, qemu-img {len(theirs)})")
    raise AssertionError(f"{ctx}: map lengths differ: ours {len(ours)} qemu-img {len(theirs)}; "
                         f"extra: {(ours[len(theirs):] or theirs[len(ours):])[:3]}")


def snapshot_names(qemu, path) -> list[str]:
    info = qemu.info(str(path))
    return [s["name"] for s in info.get("snapshots", [])]


def snapshot_content(qemu, path, name: str, tmp_dir) -> bytes:
    """Content of internal snapshot *name*: ``snapshot -a`` on a copy, then convert.

    The copy sits next to the original so that relative backing names still resolve."""
    path = Path(path)
    copy = path.with_name(f"_snapcopy_{name}_{path.name}")
    shutil.copyfile(path, copy)
    try:
        qemu.qemu_img("snapshot", "-a", name, str(copy))
        return qemu_raw(qemu, copy, tmp_dir)
    finally:
        copy.unlink()


# --------------------------------------------------------------------------- header bytes
HEADER_FIELDS = {
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
}


def read_header(path) -> dict[str, int]:
    with open(path, "rb") as f:
        raw = f.read(104)
    out = {}
    for name, (off, fmt) in HEADER_FIELDS.items():
        if off + struct.calcsize(fmt) <= len(raw):
            out[name] = struct.unpack_from(fmt, raw, off)[0]
    return out


# --------------------------------------------------------------------------- builders
def make_raw_file(path, size: int, rng: random.Random, *, compressible: bool = False) -> bytes:
    """A raw file of *size* bytes: random data, or half text-like compressible data."""
    if compressible:
        out = bytearray()
        words = [rng.randbytes(rng.randint(3, 9)) for _ in range(64)]
        while len(out) < size:
            block = rng.random()
            if block < 0.45:                         # compressible
                out += b"".join(rng.choice(words) for _ in range(700))[:16 * KiB]
            elif block < 0.8:                        # incompressible
                out += rng.randbytes(16 * KiB)
            else:                                    # zeros
                out += bytes(16 * KiB)
        data = bytes(out[:size])
    else:
        data = rng.randbytes(size)
    Path(path).write_bytes(data)
    return data


def qemu_create(qemu, path, size: int, *, fmt: str = "qcow2", backing: str | None = None,
                backing_fmt: str | None = None, **opts) -> None:
    args = ["create", "-q", "-f", fmt]
    if backing:
        args += ["-b", backing, "-F", backing_fmt or "qcow2"]
    o = ",".join(f"{k}={v}" for k, v in opts.items())
    if o:
        args += ["-o", o]
    qemu.qemu_img(*args, str(path), str(size))


def qcow2_backing_with_pattern(qemu, path, size: int, cluster_size: int, rng: random.Random,
                               compat: str = "1.1") -> None:
    """A qcow2 backing file made by qemu-img and filled by qemu-io with patterns."""
    qemu_create(qemu, path, size, cluster_size=cluster_size, compat=compat)
    cmds = [f"write -P 0xa5 0 {size // 2}"]
    for _ in range(6):
        off = rng.randrange(0, size - 70000)
        cmds.append(f"write -P {rng.randrange(1, 256):#x} {off} {rng.randint(1, 65536)}")
    cmds.append(f"write -z {size // 4} {cluster_size * 2}")
    cmds.append(f"write -P 0x3c {size - 3 * cluster_size - 100} {cluster_size + 100}")
    qemu_io_run(qemu, path, *cmds)


def describe(seed: int, **kw) -> str:
    parts = ", ".join(f"{k}={v}" for k, v in kw.items())
    return f"[seed={seed}{', ' + parts if parts else ''}]"


GATE_TIMEOUT = 30.0  # a gated request waits at most this long


class Recorder:
    """A proxy for an Image that logs calls and can hold requests on a gate.

    ``log`` gets ``("start", name, offset)`` and ``("end", name, offset)`` entries in
    the order calls start and end.  A read at an offset in ``gated`` announces itself
    on ``entered`` and then waits for ``gate`` before it reads: with one such read per
    worker, every worker is held and later submissions stay queued.
    """

    def __init__(self, img: Image) -> None:
        self.img = img
        self.log: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        self.gated: set[int] = set()
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)

    def __getattr__(self, name: str) -> Any:  # size, cluster_size, exclusive, ...
        return getattr(self.img, name)

    def read_nowait(self, offset: int, view: Any) -> bool:
        """Never inline: every read is logged (and may be gated) in a worker."""
        return False

    def _call(self, name: str, offset: int, func: Callable[[], Any]) -> Any:
        with self.lock:
            self.log.append(("start", name, offset))
        try:
            if offset in self.gated:
                self.entered.release()
                assert self.gate.wait(GATE_TIMEOUT), "gate never opened"
            return func()
        finally:
            with self.lock:
                self.log.append(("end", name, offset))

    def hold_workers(self, aio: AioImage, base: int) -> list[AioFuture[bytes]]:
        """Occupy every worker of *aio* with a gated read; returns their futures."""
        held = []
        for i in range(aio.workers):
            self.gated.add(base + i)
            held.append(aio.submit_read(base + i, 1))
        for _ in range(aio.workers):
            assert self.entered.acquire(timeout=GATE_TIMEOUT), "a worker never started"
        return held

    def names(self, kind: str = "start") -> list[str]:
        with self.lock:
            return [name for k, name, _ in self.log if k == kind]

    def read(self, offset: int, length: int, *, cancel: CancelToken | None = None) -> bytes:
        return self._call("read", offset, lambda: self.img.read(offset, length, cancel=cancel))

    def readinto(self, offset: int, buf: Any, *, cancel: CancelToken | None = None) -> int:
        return self._call("readinto", offset,
                          lambda: self.img.readinto(offset, buf, cancel=cancel))

    def write(self, offset: int, data: Any, *, cancel: CancelToken | None = None) -> None:
        self._call("write", offset, lambda: self.img.write(offset, data, cancel=cancel))

    def discard(self, offset: int, length: int, *, cancel: CancelToken | None = None) -> None:
        self._call("discard", offset, lambda: self.img.discard(offset, length, cancel=cancel))

    def write_zeroes(self, offset: int, length: int, *,
                     cancel: CancelToken | None = None) -> None:
        self._call("write_zeroes", offset,
                   lambda: self.img.write_zeroes(offset, length, cancel=cancel))

    def flush(self) -> None:
        self._call("flush", -1, self.img.flush)

    def resize(self, size: int, *, shrink: bool = False) -> None:
        self._call("resize", size, lambda: self.img.resize(size, shrink=shrink))

    def create_snapshot(self, name: str) -> None:
        """Logged only (snapshots arrive with a later issue)."""
        self._call("create_snapshot", -1, lambda: None)


@contextmanager
def thread_holding_shared(lock: Any, name: str) -> Iterator[threading.Thread]:
    """A thread named *name* holds *lock* (an ImageLock) shared for the block."""
    inside, leave = threading.Event(), threading.Event()

    def reader() -> None:
        with lock.shared():
            inside.set()
            leave.wait(GATE_TIMEOUT)

    thread = threading.Thread(target=reader, name=name)
    thread.start()
    try:
        assert inside.wait(5), f"{name} never took the lock"
        yield thread
    finally:
        leave.set()
        thread.join(10)
