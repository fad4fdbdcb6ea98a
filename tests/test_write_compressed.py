"""Issue 14: ``Image.write_compressed``: QEMU's compressed clusters, packed as QEMU packs them.

- the same compressed writes made by ``qemu-io write -c`` and by us give byte-identical
  image files (zlib and zstd, cluster sizes 512 B to 2 MiB, refcount_bits 1 to 64): the
  packing, the straddling fragments, the refcounts and the descriptors are QEMU's;
- fragments straddle two host clusters (and with refcount_bits=1 never share one);
- incompressible data is stored as a normal cluster; the last cluster may be short;
- an allocated target cluster (or a bad request) raises and changes nothing;
- a reader racing a compressed write sees the old contents or the new, never a
  half-linked cluster (the event points between the fragment write and the link);
  a write racing it on the same cluster waits for it;
- a failed fragment write gives its bytes back (``qemu-img check``: no leak);
- compressed clusters made by either tool are then overwritten, discarded and
  snapshotted by both, ``qemu-img check`` clean at every step;
- the descriptor round trip for every cluster_bits 9..21 (hypothesis).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qcow2rw
from qcow2rw import compress
from qcow2rw.errors import ClusterAllocated, FormatError, OutOfRange, ReadOnlyImage
from qcow2rw.events import EventPoints
from qcow2rw.format import (COMPRESSED, NORMAL, QCOW_OFLAG_COMPRESSED, UNALLOCATED,
                            compressed_geometry, compressed_host_range, decode_compressed,
                            encode_compressed)

from helpers import qemu_check_clean, qemu_io_run, qemu_raw

needs_zstd = pytest.mark.skipif(not compress.zstd_available(), reason="backports.zstd missing")


def _cluster_data(rng: random.Random, cs: int, kind: str) -> bytes:
    if kind == "text":
        words = " ".join(str(rng.randrange(10 ** rng.randrange(1, 6))) for _ in range(cs // 2))
        return words.encode()[:cs].ljust(cs, b".")
    if kind == "random":
        return rng.randbytes(cs)
    if kind == "half":
        return (rng.randbytes(rng.randrange(cs)) + bytes(cs))[:cs]
    return bytes(cs)


def _mixed(rng: random.Random, cs: int, count: int) -> list[bytes]:
    return [_cluster_data(rng, cs, rng.choice(("text", "random", "half", "zero")))
            for _ in range(count)]


def _l2_entries(img: qcow2rw.Image) -> list[int]:
    """Every L2 entry of the active table, in guest order (one flush first)."""
    img.flush()
    state = img.state
    out = []
    for l1_index in range(len(state.l1.entries)):
        offset = state.l2_offset(l1_index)
        if offset:
            table = state.l2_cache.copy_of(offset)
            out += list(table)
        else:
            out += [0] * state.l2_entries
    return out[:(img.size + state.cluster_size - 1) // state.cluster_size]


# --------------------------------------------------------------------------- QEMU's layout
@pytest.mark.parametrize("cluster_size,refcount_bits,ctype,count", [
    (512, 1, "zlib", 160), (4096, 2, "zlib", 96), (65536, 16, "zlib", 40),
    (65536, 1, "zlib", 24), (2 * 1024 * 1024, 64, "zlib", 5),
    pytest.param(1024, 8, "zstd", 96, marks=needs_zstd),
    pytest.param(65536, 16, "zstd", 32, marks=needs_zstd),
])
def test_same_file_as_qemu_io_write_c(qemu, tmp_path: Path, cluster_size: int, refcount_bits: int,
                                      ctype: str, count: int) -> None:
    """The same compressed writes, in the same shuffled order, through ``qemu-io write -c``
    and through write_compressed: the two image files are byte for byte the same."""
    rng = random.Random(cluster_size * 7 + refcount_bits)
    datas = _mixed(rng, cluster_size, count)
    order = list(range(count))
    rng.shuffle(order)
    opts = f"cluster_size={cluster_size},refcount_bits={refcount_bits},compression_type={ctype}"
    theirs, ours = tmp_path / "qemu.qcow2", tmp_path / "ours.qcow2"
    commands = []
    for i in order:
        (tmp_path / f"c{i}").write_bytes(datas[i])
        commands.append(f"write -q -c -s {tmp_path / f'c{i}'} {i * cluster_size} {cluster_size}")
    for path in (theirs, ours):
        qemu.qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(path), str(count * cluster_size))
    qemu_io_run(qemu, theirs, *commands)
    with qcow2rw.open(ours) as img:
        for i in order:
            img.write_compressed(i * cluster_size, datas[i])
        kinds = [img.classify(e) for e in _l2_entries(img)]
        assert COMPRESSED in kinds
        assert all(k in (COMPRESSED, NORMAL) for k in kinds)
    qemu_check_clean(qemu, ours, "ours")
    assert theirs.read_bytes() == ours.read_bytes(), "not QEMU's layout"
    with qcow2rw.open(ours, readonly=True) as img:  # check's figures are qemu-img's
        figures = img.check().to_json()
    data = qemu.check(str(ours))[1]
    assert {k: v for k, v in data.items() if not k.startswith("_")} == figures
    expected = b"".join(datas)
    assert qemu_raw(qemu, ours, tmp_path) == expected
    with qcow2rw.open(theirs, readonly=True) as img:  # and we read what QEMU wrote
        assert img.read(0, img.size) == expected


def _fragments(img: qcow2rw.Image) -> list[tuple[int, int]]:
    """(host byte offset, stored length) of every compressed cluster."""
    cb = img.state.cluster_bits
    return [decode_compressed(e, cb) for e in _l2_entries(img) if e & QCOW_OFLAG_COMPRESSED]


def test_fragments_straddle_host_clusters_and_check_counts_each(qemu, tmp_path: Path) -> None:
    cs = 65536
    path = tmp_path / "a.qcow2"
    rng = random.Random(3)
    datas = [_cluster_data(rng, cs, "text") for _ in range(48)]
    with qcow2rw.create(path, len(datas) * cs) as img:
        for i, data in enumerate(datas):
            img.write_compressed(i * cs, data)
        frags = _fragments(img)
        # stored lengths as written (the descriptor rounds up to a sector end)
        straddling = [(h, n) for h, n in frags if h // cs != (h + n - 1) // cs]
        assert len(frags) == 48 and straddling
        # every host cluster's refcount is the number of fragments touching it
        touching: dict[int, int] = {}
        for h, n in frags:
            for c in range(h // cs, (h + n - 1) // cs + 1):
                touching[c] = touching.get(c, 0) + 1
        with img.exclusive():
            for c, n in touching.items():
                assert img.state.refcounts.get(c) == n, c
        assert img.check().corruptions == 0
    data = qemu_check_clean(qemu, path)
    assert data.get("compressed-clusters") == 48


def test_refcount_bits_1_one_fragment_per_host_cluster(qemu, tmp_path: Path) -> None:
    cs = 4096
    path = tmp_path / "a.qcow2"
    rng = random.Random(4)
    with qcow2rw.create(path, 64 * cs, cluster_size=cs, refcount_bits=1) as img:
        for i in range(64):
            img.write_compressed(i * cs, _cluster_data(rng, cs, "text"))
        frags = _fragments(img)
        assert len(frags) == 64
        clusters = [h // cs for h, n in frags]
        assert len(set(clusters)) == 64
        assert all(h // cs == (h + n - 1) // cs for h, n in frags)
    qemu_check_clean(qemu, path)


def test_incompressible_data_is_stored_as_a_normal_cluster(qemu, tmp_path: Path) -> None:
    cs = 65536
    path = tmp_path / "a.qcow2"
    random_data = os.urandom(cs)
    with qcow2rw.create(path, 4 * cs) as img:
        img.write_compressed(cs, random_data)
        img.write_compressed(2 * cs, b"z" * cs)
        status = {guest: kind for kind, guest, _, _ in img.block_status(0, 4 * cs)}
        assert status[cs] == NORMAL and status[2 * cs] == COMPRESSED
        assert img.read(cs, cs) == random_data
    qemu_check_clean(qemu, path)
    qemu_io_run(qemu, path, f"read -P 0x7a {2 * cs} {cs}")
    assert qemu_raw(qemu, path, tmp_path)[cs:2 * cs] == random_data


def test_short_last_cluster_is_zero_padded(qemu, tmp_path: Path) -> None:
    cs = 65536
    size = 5 * cs + 3 * 512
    path = tmp_path / "a.qcow2"
    with qcow2rw.create(path, size) as img:
        img.write_compressed(5 * cs, b"\x5a" * (3 * 512))
        assert img.read(5 * cs, 3 * 512) == b"\x5a" * 1536
        with pytest.raises(ValueError):  # only the last cluster may be short
            img.write_compressed(4 * cs, b"x" * 512)
    qemu_check_clean(qemu, path)
    qemu_io_run(qemu, path, f"read -P 0x5a {5 * cs} 1536")
    # and QEMU's own short last cluster reads the same here
    theirs = tmp_path / "q.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", str(theirs), str(size))
    qemu_io_run(qemu, theirs, f"write -c -P 0x5a {5 * cs} 1536")
    assert theirs.read_bytes() == path.read_bytes()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_allocated_targets_and_bad_requests_change_nothing(qemu, tmp_path: Path) -> None:
    cs = 65536
    path = tmp_path / "a.qcow2"
    with qcow2rw.create(path, 8 * cs) as img:
        img.write(0, b"n" * cs)                     # normal
        img.write_compressed(cs, b"c" * cs)         # compressed
        img.write(2 * cs, b"n" * cs)
        img.write_zeroes(2 * cs, cs)                # zero, allocated (keeps its offset)
        img.write_zeroes(3 * cs, cs)                # zero, plain: allowed below
        img.flush()
        before = _digest(path)
        for guest in (0, cs, 2 * cs):
            with pytest.raises(ClusterAllocated):
                img.write_compressed(guest, b"x" * cs)
        for offset, length in ((4 * cs + 512, cs), (4 * cs, cs - 512), (4 * cs, cs + 512), (4 * cs, 0)):
            with pytest.raises(ValueError):
                img.write_compressed(offset, b"x" * length)
        with pytest.raises(OutOfRange):
            img.write_compressed(8 * cs, b"x" * cs)
        img.flush()
        assert _digest(path) == before
        img.write_compressed(3 * cs, b"p" * cs)
        assert img.read(3 * cs, cs) == b"p" * cs
    with qcow2rw.open(path, readonly=True) as img:
        with pytest.raises(ReadOnlyImage):
            img.write_compressed(5 * cs, b"x" * cs)
    qemu_check_clean(qemu, path)


def test_packing_never_resumes_in_a_cluster_freed_and_reused(qemu, tmp_path: Path) -> None:
    """The fragment's cluster is freed (discard, flush) and handed to a normal write;
    the next compressed write must start a fresh cluster, not pack into that one."""
    cs = 65536
    path = tmp_path / "a.qcow2"
    with qcow2rw.create(path, 8 * cs) as img:
        img.write_compressed(0, b"a" * cs)  # a small fragment: the cluster has room left
        (host, _), = _fragments(img)
        img.discard(0, cs)
        img.flush()  # the deferred free is applied: the cluster is free again
        img.write(cs, b"n" * cs)  # takes the lowest free cluster: the fragment's
        assert img.block_status(cs, cs)[0][3] == host & ~(cs - 1)
        img.write_compressed(2 * cs, b"b" * cs)
        assert img.read(cs, 2 * cs) == b"n" * cs + b"b" * cs
        assert img.check().corruptions == 0
    qemu_check_clean(qemu, path)


# --------------------------------------------------------------------------- races
def _start(func, *args):
    errors: list[BaseException] = []

    def run() -> None:
        try:
            func(*args)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


@pytest.mark.parametrize("point", ["cluster_alloc", "l2_update"])
@pytest.mark.parametrize("with_backing", [False, True])
def test_reader_racing_a_compressed_write_sees_old_or_new(qemu, tmp_path: Path, point: str,
                                                          with_backing: bool) -> None:
    """Stopped before its fragment is written (cluster_alloc) or before its L2 entry
    is set (l2_update), the compressed write is invisible: the reader gets the old
    contents (zeros, or the backing file's data).  QEMU's order (link, then write the
    data) would hand the reader an entry naming bytes not written yet."""
    cs = 65536
    path = tmp_path / "a.qcow2"
    old = bytes(cs)
    backing = None
    if with_backing:
        backing = tmp_path / "base.qcow2"
        old = b"b" * cs
        with qcow2rw.create(backing, 4 * cs) as base:
            base.write(cs, old)
    new = (b"new data " * cs)[:cs]
    img = qcow2rw.create(path, 4 * cs, backing_file=str(backing) if backing else None,
                         backing_format="qcow2" if backing else None)
    events = img.events = EventPoints()
    events.set_break(point)
    writer, errors = _start(img.write_compressed, cs, new)
    assert events.wait_break(point)
    assert img.read(cs, cs) == old
    assert [k for k, *_ in img.block_status(cs, cs)] == [UNALLOCATED]
    events.resume(point)
    writer.join(10)
    assert not writer.is_alive() and not errors, errors
    img.events = None
    assert img.read(cs, cs) == new
    img.close()
    qemu_check_clean(qemu, path)


def test_a_write_racing_a_compressed_write_waits_for_it(qemu, tmp_path: Path) -> None:
    """A normal write into the same cluster while the compressed write is in flight
    waits for its record, then copies the decompressed cluster around its sectors."""
    cs = 65536
    path = tmp_path / "a.qcow2"
    img = qcow2rw.create(path, 4 * cs)
    events = img.events = EventPoints()
    events.set_break("l2_update")
    new = (b"compressed " * cs)[:cs]
    t1, e1 = _start(img.write_compressed, cs, new)
    assert events.wait_break("l2_update")
    t2, e2 = _start(img.write, cs + 4096, b"w" * 4096)
    t2.join(0.3)
    assert t2.is_alive(), "the write did not wait for the allocation in flight"
    events.resume("l2_update")
    for t in (t1, t2):
        t.join(10)
        assert not t.is_alive()
    assert not e1 and not e2, (e1, e2)
    img.events = None
    assert img.read(cs, cs) == new[:4096] + b"w" * 4096 + new[8192:]
    img.close()
    qemu_check_clean(qemu, path)


def test_a_failed_fragment_write_gives_its_bytes_back(qemu, tmp_path: Path) -> None:
    cs = 65536
    path = tmp_path / "a.qcow2"
    with qcow2rw.create(path, 8 * cs) as img:
        img.write_compressed(0, b"a" * cs)
        events = img.events = EventPoints()
        events.inject_error("cluster_alloc", errno.EIO)
        with pytest.raises(OSError):
            img.write_compressed(cs, b"b" * cs)
        img.events = None
        assert [k for k, *_ in img.block_status(cs, cs)] == [UNALLOCATED]
        img.write_compressed(cs, b"c" * cs)
        assert img.read(0, 2 * cs) == b"a" * cs + b"c" * cs
    qemu_check_clean(qemu, path)


def test_many_threads_compressing_writing_reading(qemu, tmp_path: Path) -> None:
    """Compressed writes from 4 threads, normal writes and discards on other clusters,
    readers everywhere, with a tiny switch interval; every read sees old or new data,
    the result matches the shadow and qemu-img's view, and the image checks clean."""
    cs = 4096
    count = 256
    path = tmp_path / "a.qcow2"
    rng = random.Random(9)
    datas = _mixed(rng, cs, count)
    shadow = bytearray(count * cs)
    img = qcow2rw.create(path, count * cs, cluster_size=cs, refcount_bits=4)
    errors: list[BaseException] = []
    stop = threading.Event()

    def compressor(part: int) -> None:
        try:
            for i in range(part, count, 8):  # clusters i % 8 < 4
                img.write_compressed(i * cs, datas[i])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def writer() -> None:
        try:
            r = random.Random(1)
            for _ in range(300):
                i = r.randrange(count // 8) * 8 + 4 + r.randrange(4)
                if r.random() < 0.2:
                    img.discard(i * cs, cs)
                else:
                    img.write(i * cs + 512, bytes([i % 251]) * 1024)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def reader() -> None:
        try:
            r = random.Random(2)
            while not stop.is_set():
                i = r.randrange(count // 8) * 8 + r.randrange(4)
                got = img.read(i * cs, cs)
                assert got in (bytes(cs), datas[i]), f"cluster {i}: neither old nor new"
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=compressor, args=(p,)) for p in range(4)]
        threads += [threading.Thread(target=writer)]
        readers = [threading.Thread(target=reader) for _ in range(2)]
        for t in threads + readers:
            t.start()
        for t in threads:
            t.join(120)
        stop.set()
        for t in readers:
            t.join(30)
    finally:
        sys.setswitchinterval(old_interval)
    assert not errors, errors[:3]
    for i in range(count):
        if i % 8 < 4:
            shadow[i * cs:(i + 1) * cs] = datas[i]
    got = img.read(0, count * cs)
    for i in range(count):
        if i % 8 < 4:
            assert got[i * cs:(i + 1) * cs] == datas[i], i
    img.close()
    qemu_check_clean(qemu, path)
    theirs = qemu_raw(qemu, path, tmp_path)
    assert theirs == got


# --------------------------------------------------------------------------- both tools
def test_compressed_clusters_overwritten_discarded_snapshotted_by_both(qemu, tmp_path: Path) -> None:
    cs = 65536
    n = 16
    rng = random.Random(11)
    datas = [_cluster_data(rng, cs, "text") for _ in range(n)]
    for maker in ("ours", "qemu"):
        path = tmp_path / f"{maker}.qcow2"
        shadow = bytearray(b"".join(datas))
        if maker == "ours":
            with qcow2rw.create(path, n * cs) as img:
                for i, d in enumerate(datas):
                    img.write_compressed(i * cs, d)
        else:
            qemu.qemu_img("create", "-q", "-f", "qcow2", str(path), str(n * cs))
            cmds = []
            for i, d in enumerate(datas):
                (tmp_path / f"d{i}").write_bytes(d)
                cmds.append(f"write -q -c -s {tmp_path / f'd{i}'} {i * cs} {cs}")
            qemu_io_run(qemu, path, *cmds)
        qemu_check_clean(qemu, path, maker)
        # QEMU: a snapshot, an overwrite inside a compressed cluster, a discard
        qemu.qemu_img("snapshot", "-c", "s1", str(path))
        qemu_io_run(qemu, path, f"write -P 0x11 {2 * cs + 512} 4096", f"discard {3 * cs} {cs}")
        shadow[2 * cs + 512:2 * cs + 4608] = b"\x11" * 4096
        shadow[3 * cs:4 * cs] = bytes(cs)
        qemu_check_clean(qemu, path, maker)
        # ours: the same on other clusters, a snapshot, a compressed write into the hole
        with qcow2rw.open(path) as img:
            assert img.read(0, n * cs) == shadow
            img.write(5 * cs + 100, b"\x22" * 300)
            img.discard(6 * cs, cs)
            shadow[5 * cs + 100:5 * cs + 400] = b"\x22" * 300
            shadow[6 * cs:7 * cs] = bytes(cs)
            img.create_snapshot("s2")
            img.write_compressed(3 * cs, datas[0])  # into the cluster QEMU discarded
            shadow[3 * cs:4 * cs] = datas[0]
            with pytest.raises(ClusterAllocated):  # still shared with the snapshots
                img.write_compressed(4 * cs, datas[0])
            img.write(8 * cs, datas[9])  # overwrite a compressed cluster shared with s1, s2
            shadow[8 * cs:9 * cs] = datas[9]
            assert img.check().corruptions == 0
        qemu_check_clean(qemu, path, maker)
        assert qemu_raw(qemu, path, tmp_path) == shadow
        # both tools see the first snapshot as it was
        qemu.qemu_img("snapshot", "-a", "s1", str(path))
        assert qemu_raw(qemu, path, tmp_path) == b"".join(datas)
        with qcow2rw.open(path) as img:
            img.apply_snapshot("s2")
            img.delete_snapshot("s1")
        qemu_check_clean(qemu, path, maker)
        expected_s2 = bytearray(shadow)
        expected_s2[8 * cs:9 * cs] = datas[8]
        expected_s2[3 * cs:4 * cs] = bytes(cs)  # written compressed after s2 was taken
        assert qemu_raw(qemu, path, tmp_path) == expected_s2


# --------------------------------------------------------------------------- descriptors
@settings(max_examples=300, deadline=None)
@given(cluster_bits=st.integers(9, 21), data=st.data())
def test_descriptor_round_trip(cluster_bits: int, data) -> None:
    cs = 1 << cluster_bits
    shift, offset_mask, csize_mask = compressed_geometry(cluster_bits)
    assert shift == 62 - (cluster_bits - 8)
    host = data.draw(st.integers(0, offset_mask), label="host")
    length = data.draw(st.integers(1, cs - 1), label="length")
    entry = encode_compressed(host, length, cluster_bits)
    assert entry & QCOW_OFLAG_COMPRESSED and not entry >> 63
    got_host, to_read = decode_compressed(entry, cluster_bits)
    assert got_host == host
    # what is read covers the data and ends at the end of its last sector
    assert to_read >= length and (host + to_read) % 512 == 0 and to_read - length < 512
    start, span = compressed_host_range(entry, cluster_bits)
    assert start == host & ~511 and start + span == host + to_read
    with pytest.raises(FormatError):
        encode_compressed(offset_mask + 1 + host, length, cluster_bits)


@needs_zstd
def test_create_zstd_image_write_compressed_qemu_reads(qemu, tmp_path: Path) -> None:
    cs = 65536
    path = tmp_path / "z.qcow2"
    data = (b"zstandard " * cs)[:cs]
    with qcow2rw.create(path, 4 * cs, compression_type="zstd") as img:
        img.write_compressed(cs, data)
    info = qemu.info(str(path))
    assert info["format-specific"]["data"]["compression-type"] == "zstd"
    qemu_check_clean(qemu, path)
    assert qemu_raw(qemu, path, tmp_path)[cs:2 * cs] == data
    with pytest.raises(FormatError):
        qcow2rw.create(tmp_path / "v2.qcow2", cs, compression_type="zstd", compat="0.10")


def test_compressed_overlay_over_a_backing_file_round_trips(qemu, tmp_path: Path) -> None:
    """Compressed writes into an overlay (QEMU made the chain): the backing file shows
    through where nothing was written; QEMU reads the chain, commits it, and we read the
    result; qemu-img check clean throughout."""
    cs = 65536
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", str(base), str(8 * cs))
    qemu_io_run(qemu, base, f"write -P 0x61 0 {8 * cs}")
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    expected = bytearray(b"a" * 8 * cs)
    with qcow2rw.open(top) as img:
        for i in (1, 2, 5):
            data = (b"overlay %d " % i * cs)[:cs]
            img.write_compressed(i * cs, data)
            expected[i * cs:(i + 1) * cs] = data
        assert img.read(0, 8 * cs) == expected
    qemu_check_clean(qemu, top)
    assert qemu_raw(qemu, top, tmp_path) == expected
    qemu.qemu_img("commit", "-q", str(top))
    with qcow2rw.open(base, readonly=True) as img:
        assert img.read(0, 8 * cs) == expected


def test_incompressible_data_is_an_ordinary_write_wherever_it_goes(qemu, tmp_path: Path) -> None:
    """Data that does not compress is written the ordinary way, as QEMU's
    qcow2_co_pwritev_compressed_task does, over a normal, compressed or zero cluster
    too: the same requests through qemu-io (write -c) give the same disk.  Before:
    ClusterAllocated, the old data kept."""
    cs = 65536
    noise = os.urandom(cs)
    (tmp_path / "noise").write_bytes(noise)
    paths = [tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"]
    for path in paths:
        with qcow2rw.create(path, 4 * cs) as img:
            img.write(0, b"n" * cs)
            img.write_compressed(cs, b"c" * cs)
            img.write(2 * cs, b"z" * cs)
            img.write_zeroes(2 * cs, cs)
    with qcow2rw.open(paths[0]) as img:
        for guest in (0, cs, 2 * cs, 3 * cs):
            img.write_compressed(guest, noise)
    for guest in (0, cs, 2 * cs, 3 * cs):
        qemu.qemu_io(str(paths[1]), f"write -c -s {tmp_path / 'noise'} {guest} {cs}")
    cmp = qemu.qemu_img("compare", str(paths[0]), str(paths[1]), check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert qemu.check(str(paths[0]))[0] == 0
    with qcow2rw.open(paths[0], readonly=True) as img:
        assert img.read(0, 4 * cs) == noise * 4
