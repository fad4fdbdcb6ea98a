"""``check``/``check -r`` agree with ``qemu-img check`` figure for figure.

Every image is checked twice from identical copies, once by us and once by qemu-img
(both with the same repair mode), and the JSON figures, the exit codes and the
per-cluster messages on stderr must be equal.  After a repair, ``qemu-img check``
of our repaired copy must give what it gives for qemu-img's own repaired copy (clean
where qemu-img's repair makes it clean), and the guest data must read back unchanged
(``qemu-img convert -O raw`` before and after).

Damaged images are made like qemu-iotests do: by patching bytes at the offsets the
header and tables name (refcount block entries, bit 63 of L1/L2 entries, the refcount
table), and by killing a writer that uses lazy refcounts (iotest 039).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import qcow2rw
from qcow2rw.check import CheckResult
from qcow2rw.image import open_for_check

KiB, MiB = 1024, 1024 * 1024
ROOT = Path(__file__).parents[1]
OFLAG_COPIED = 1 << 63
OFFSET_MASK = 0x00FFFFFFFFFFFE00


# ----------------------------------------------------------------------------- helpers

def qimg(qemu: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return qemu.qemu_img(*args)


def qio(qemu: Any, path: Path, *commands: str) -> None:
    qemu.qemu_io(str(path), *commands)


def qemu_check(qemu: Any, path: Path,
               repair: str | None = None) -> tuple[int, dict[str, Any], list[str]]:
    """qemu-img's (exit code, JSON without filename, stderr lines of the checker)."""
    rc, data = qemu.check(str(path), repair=repair)
    stderr = data.pop("_stderr")
    data.pop("filename", None)
    prefix = "qemu-img: "  # error_report() lines; ours are kept without a program name
    lines = [line[len(prefix):] if line.startswith(prefix) else line
             for line in stderr.splitlines() if not line.startswith(prefix + "Check failed")]
    return rc, data, lines


def our_check(path: Path, repair: str | None = None) -> CheckResult:
    """Our check, opened the way ``qcow2rw check`` opens (read-only without a repair)."""
    img = open_for_check(path, repair=repair is not None)
    try:
        return img.check(repair)
    finally:
        img.close()


def figures(result: CheckResult) -> dict[str, Any]:
    data = result.to_json()
    data.pop("filename")
    return data


def raw_image(qemu: Any, path: Path, out: Path) -> bytes:
    qemu.convert_to_raw(str(path), str(out))
    return out.read_bytes()


def assert_agree(qemu: Any, path: Path, repair: str | None, tmp: Path) -> tuple[CheckResult, int]:
    """Check copies of *path* with ours and qemu-img; everything must match.

    Returns our result and qemu-img's exit code.  With a repair, also compares the
    repaired images (qemu-img's view of both) and the guest data with the original.
    """
    tag = repair or "none"
    ours_path, qemu_path = tmp / f"{path.stem}.{tag}.ours", tmp / f"{path.stem}.{tag}.qemu"
    shutil.copyfile(path, ours_path)
    shutil.copyfile(path, qemu_path)
    result = our_check(ours_path, repair)
    rc, data, lines = qemu_check(qemu, qemu_path, repair)
    where = f"{path.name} -r {repair}"
    assert result.exit_code == rc, (where, result.exit_code, rc, result.messages, lines)
    if result.error is None:
        assert figures(result) == data, (where, figures(result), data)
    else:
        assert data == {}, (where, data)  # qemu-img printed no figures either
    assert result.messages == lines, (where, result.messages, lines)
    if repair is not None:
        after_ours, after_qemu = qemu_check(qemu, ours_path), qemu_check(qemu, qemu_path)
        assert after_ours[:2] == after_qemu[:2], (where, after_ours, after_qemu)
        assert ours_path.read_bytes()[72:80] == qemu_path.read_bytes()[72:80], \
            f"{where}: incompatible feature bits differ after the repair"
        if after_qemu[0] == 0:
            after = raw_image(qemu, ours_path, tmp / "after.raw")
            assert after == raw_image(qemu, qemu_path, tmp / "qemu-after.raw"), \
                f"{where}: our repair and qemu-img's give different guest data"
            try:
                before = raw_image(qemu, path, tmp / "before.raw")
            except subprocess.CalledProcessError:
                before = None  # unreadable before the repair (a corrupt entry)
            assert before is None or after == before, f"{where}: the repair changed guest data"
    return result, rc


def u64(data: bytes | bytearray, offset: int) -> int:
    return int(struct.unpack_from(">Q", data, offset)[0])


class Layout:
    """Offsets the header and tables of an image name (read from its bytes)."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.cluster_bits = struct.unpack_from(">I", data, 20)[0]
        self.l1 = u64(data, 40)
        self.reftable = u64(data, 48)
        self.reftable_clusters = struct.unpack_from(">I", data, 56)[0]
        self.refcount_order = struct.unpack_from(">I", data, 96)[0] if data[7] >= 3 else 4
        self.refblock0 = u64(data, self.reftable) & ~0x1FF
        self.l2_0 = u64(data, self.l1) & OFFSET_MASK

    def set_refcount16(self, data: bytearray, cluster: int, value: int) -> None:
        assert self.refcount_order == 4
        struct.pack_into(">H", data, self.refblock0 + 2 * cluster, value)

    def refcount16(self, data: bytes | bytearray, cluster: int) -> int:
        return int(struct.unpack_from(">H", data, self.refblock0 + 2 * cluster)[0])


def patched(src: Path, dst: Path, change: Callable[[bytearray, Layout], None]) -> Path:
    data = bytearray(src.read_bytes())
    change(data, Layout(data))
    dst.write_bytes(bytes(data))
    return dst


def run_cli(*args: str) -> tuple[int, str, str]:
    """``python -m qcow2rw ARGS`` in a subprocess: (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "qcow2rw", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc.returncode, proc.stdout, proc.stderr


# ----------------------------------------------------------------------------- images

@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, qemu: Any) -> Path:
    """Source images (made once): by qemu-img/qemu-io and by qcow2rw."""
    d = tmp_path_factory.mktemp("check-base")
    # qemu-img's default layout: reftable 0x10000, refblock 0x20000, L1 0x30000,
    # L2 0x40000, data clusters 5 (guest 0), 6 (guest 1M) and 7 (guest 128k: fragmented).
    qimg(qemu, "create", "-q", "-f", "qcow2", str(d / "q64k.qcow2"), "8M")
    qio(qemu, d / "q64k.qcow2", "write -P 1 0 64k", "write -P 3 1M 64k", "write -P 2 128k 4k")
    for cs, opts in (("512", "cluster_size=512"), ("4k", "cluster_size=4k,refcount_bits=1"),
                     ("2m", "cluster_size=2M"), ("v2", "compat=0.10"),
                     ("r64", "refcount_bits=64")):
        path = d / f"q{cs}.qcow2"
        qimg(qemu, "create", "-q", "-f", "qcow2", "-o", opts, str(path), "12M")
        qio(qemu, path, "write -P 1 0 300k", "write -P 2 5M 7k", "write -P 3 1000 3000",
            "write -z 9M 256k")
    path = d / "qsnap.qcow2"
    qimg(qemu, "create", "-q", "-f", "qcow2", str(path), "16M")
    qio(qemu, path, "write -P 1 0 200k")
    qimg(qemu, "snapshot", "-c", "s1", str(path))
    qio(qemu, path, "write -P 2 64k 64k", "write -P 3 10M 64k")
    qimg(qemu, "snapshot", "-c", "s2", str(path))
    qio(qemu, path, "write -P 4 0 4k")
    raw = d / "mixed.raw"
    raw.write_bytes(os.urandom(MiB) + bytes(MiB) + b"compressible" * 150000)
    qimg(qemu, "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(d / "qcomp.qcow2"))
    qimg(qemu, "create", "-q", "-f", "qcow2", str(d / "qbase.qcow2"), "16M")
    qio(qemu, d / "qbase.qcow2", "write -P 1 0 1M")
    qimg(qemu, "create", "-q", "-f", "qcow2", "-b", "qbase.qcow2", "-F", "qcow2",
         str(d / "qover.qcow2"))
    qio(qemu, d / "qover.qcow2", "write -P 2 64k 4k", "write -z 512k 128k")
    path = d / "q512multi.qcow2"  # several refcount blocks
    qimg(qemu, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(path), "24M")
    qio(qemu, path, "write -P 1 0 3M", "write -P 2 20M 1M", "discard 100k 200k")
    # Made by qcow2rw.
    for cs in (512, 4096, 65536, 2 * MiB):
        with qcow2rw.create(d / f"o{cs}.qcow2", 16 * MiB, cluster_size=cs) as img:
            for i in range(12):
                img.write(i * 1_300_001 % (15 * MiB), bytes([i + 1]) * (cs + 777))
            img.write_zeroes(3 * MiB, 2 * cs)
            img.discard(0, 2 * cs)
    with qcow2rw.create(d / "osnap.qcow2", 16 * MiB, cluster_size=4096) as img:
        img.write(0, b"a" * 100_000)
        img.create_snapshot("one")
        img.write(50_000, b"b" * 100_000)
        img.create_snapshot("two")
        img.write(4 * MiB, b"c" * 5000)
    with qcow2rw.create(d / "obacked.qcow2", 16 * MiB, backing_file="qbase.qcow2",
                        backing_format="qcow2") as img:
        img.write(100_000, b"d" * 200_000)
    return d


CLEAN = ["q64k", "q512", "q4k", "q2m", "qv2", "qr64", "qsnap", "qcomp", "qover", "q512multi",
         "o512", "o4096", "o65536", "o2097152", "osnap", "obacked"]


@pytest.mark.parametrize("name", CLEAN)
def test_clean_images_agree(qemu: Any, base: Path, tmp_path: Path, name: str) -> None:
    """Allocated, fragmented, compressed and total clusters and the image end offset."""
    shutil.copyfile(base / "qbase.qcow2", tmp_path / "qbase.qcow2")  # for the overlays
    result, rc = assert_agree(qemu, base / f"{name}.qcow2", None, tmp_path)
    assert rc == 0 and result.exit_code == 0
    assert result.allocated_clusters > 0 and result.image_end_offset > 0
    assert_agree(qemu, base / f"{name}.qcow2", "all", tmp_path)  # nothing to repair


def test_figures_are_not_trivial(qemu: Any, base: Path) -> None:
    """The images exercise fragmentation and compression (so agreement means something)."""
    comp = our_check(base / "qcomp.qcow2")
    assert comp.compressed_clusters > 0 and comp.fragmented_clusters >= comp.compressed_clusters
    assert our_check(base / "q64k.qcow2").fragmented_clusters > 0
    snap = our_check(base / "qsnap.qcow2")
    assert snap.allocated_clusters == qemu.check(str(base / "qsnap.qcow2"))[1]["allocated-clusters"]


# ----------------------------------------------------------------------------- damage

def _too_low(data: bytearray, lay: Layout) -> None:  # cluster 5 holds guest data
    lay.set_refcount16(data, 5, 0)


def _too_low_shared(data: bytearray, lay: Layout) -> None:  # a snapshot-shared cluster: 2 -> 1
    cluster = next(c for c in range(4, 200) if lay.refcount16(data, c) >= 2)
    lay.set_refcount16(data, cluster, lay.refcount16(data, cluster) - 1)


def _too_high(data: bytearray, lay: Layout) -> None:
    lay.set_refcount16(data, 6, 2)


def _too_high_shared(data: bytearray, lay: Layout) -> None:
    cluster = next(c for c in range(4, 200) if lay.refcount16(data, c) >= 2)
    lay.set_refcount16(data, cluster, lay.refcount16(data, cluster) + 1)


def _unused_cluster(data: bytearray, lay: Layout) -> None:
    """Two unused clusters appended to the file, one with refcount 1; a refcount past
    the end of the file too (QEMU does not count that one as a leak)."""
    cs = 1 << lay.cluster_bits
    clusters = len(data) // cs
    data += bytes(2 * cs)
    lay.set_refcount16(data, clusters + 1, 1)
    lay.set_refcount16(data, clusters + 20, 3)


def _l2_copied(data: bytearray, lay: Layout) -> None:
    struct.pack_into(">Q", data, lay.l2_0, u64(data, lay.l2_0) ^ OFLAG_COPIED)


def _l1_copied(data: bytearray, lay: Layout) -> None:
    struct.pack_into(">Q", data, lay.l1, u64(data, lay.l1) ^ OFLAG_COPIED)


def _reftable_zeroed(data: bytearray, lay: Layout) -> None:
    length = lay.reftable_clusters << lay.cluster_bits
    data[lay.reftable:lay.reftable + length] = bytes(length)


def _l1_reserved(data: bytearray, lay: Layout) -> None:
    struct.pack_into(">Q", data, lay.l1, u64(data, lay.l1) | 0x2)


def _l2_reserved(data: bytearray, lay: Layout) -> None:
    struct.pack_into(">Q", data, lay.l2_0, u64(data, lay.l2_0) | 0x4)


def _l2_unaligned(data: bytearray, lay: Layout) -> None:
    struct.pack_into(">Q", data, lay.l2_0, u64(data, lay.l2_0) | 0x200)


def _zero_unaligned(data: bytearray, lay: Layout) -> None:  # repaired into a plain zero cluster
    struct.pack_into(">Q", data, lay.l2_0, u64(data, lay.l2_0) | 0x201)


def _beyond_eof(data: bytearray, lay: Layout) -> None:
    struct.pack_into(">Q", data, lay.l2_0 + 8, OFLAG_COPIED | 0x900000)


def _refblock_outside(data: bytearray, lay: Layout) -> None:
    struct.pack_into(">Q", data, lay.reftable + 8, 0x800000)


def _refblock_reserved(data: bytearray, lay: Layout) -> None:
    struct.pack_into(">Q", data, lay.reftable, u64(data, lay.reftable) | 1)


def _data_on_l1(data: bytearray, lay: Layout) -> None:  # iotest 060: an L2 entry names the L1
    struct.pack_into(">Q", data, lay.l2_0 + 5 * 8, OFLAG_COPIED | lay.l1)


def _compressed_copied(data: bytearray, lay: Layout) -> None:
    for pos in range(lay.l2_0, lay.l2_0 + (1 << lay.cluster_bits), 8):
        if u64(data, pos) & (1 << 62):
            struct.pack_into(">Q", data, pos, u64(data, pos) | OFLAG_COPIED)
            return
    raise AssertionError("no compressed cluster")


def _resize_first_snapshot_extra(data: bytearray, size: int) -> None:
    """Rewrite the snapshot table in place with *size* bytes of extra data in entry 0."""
    count, offset = struct.unpack_from(">IQ", data, 60)
    pos, entries = offset, []
    for _ in range(count):
        pos = (pos + 7) & ~7
        head = list(struct.unpack_from(">QIHHIIQII", data, pos))
        extra = head[8]
        end = pos + 40 + extra + head[2] + head[3]
        entries.append((head, bytes(data[pos + 40:pos + 40 + extra]),
                        bytes(data[pos + 40 + extra:end])))
        pos = end
    table = bytearray()
    for i, (head, extra, names) in enumerate(entries):
        table += bytes(-len(table) % 8)
        if i == 0:
            extra = (extra + b"\xee" * size)[:size]
            head[8] = size
        table += struct.pack(">QIHHIIQII", *head) + extra + names
    data[offset:offset + len(table)] = table


def _snapshot_incomplete(data: bytearray, lay: Layout) -> None:
    """The first snapshot table entry keeps 8 bytes of extra data (v3 needs 16)."""
    _resize_first_snapshot_extra(data, 8)


def _snapshot_extra_too_long(data: bytearray, lay: Layout) -> None:
    """1032 bytes of extra data: QEMU refuses more than 1024 (-r all cuts it)."""
    _resize_first_snapshot_extra(data, 1032)


def _truncated_in_last_cluster(data: bytearray, lay: Layout) -> None:  # QEMU: still clean
    del data[len(data) - 30000:]


def _truncated_by_a_cluster(data: bytearray, lay: Layout) -> None:
    del data[len(data) - 70000:]


DAMAGE: list[tuple[str, str, Callable[[bytearray, Layout], None]]] = [
    ("too_low", "q64k", _too_low),
    ("too_low_shared", "qsnap", _too_low_shared),
    ("too_high", "q64k", _too_high),
    ("too_high_shared", "qsnap", _too_high_shared),
    ("unused_cluster", "q64k", _unused_cluster),
    ("l2_copied", "q64k", _l2_copied),
    ("l1_copied", "q64k", _l1_copied),
    ("reftable_zeroed", "q64k", _reftable_zeroed),
    ("reftable_zeroed_512", "q512multi", _reftable_zeroed),
    ("reftable_zeroed_snap", "qsnap", _reftable_zeroed),
    ("reftable_zeroed_comp", "qcomp", _reftable_zeroed),
    ("reftable_zeroed_r64", "qr64", _reftable_zeroed),
    ("reftable_zeroed_ours", "osnap", _reftable_zeroed),
    ("l1_reserved", "q64k", _l1_reserved),
    ("l2_reserved", "q64k", _l2_reserved),
    ("l2_unaligned", "q64k", _l2_unaligned),
    ("zero_unaligned", "q64k", _zero_unaligned),
    ("beyond_eof", "q64k", _beyond_eof),
    ("truncated_in_last_cluster", "q64k", _truncated_in_last_cluster),
    ("truncated_by_a_cluster", "q64k", _truncated_by_a_cluster),
    ("refblock_outside", "q64k", _refblock_outside),
    ("refblock_reserved", "q64k", _refblock_reserved),
    ("data_on_l1", "q64k", _data_on_l1),
    ("compressed_copied", "qcomp", _compressed_copied),
    ("snapshot_incomplete", "qsnap", _snapshot_incomplete),
    ("snapshot_extra_too_long", "qsnap", _snapshot_extra_too_long),
]


@pytest.mark.parametrize("repair", [None, "leaks", "all"])
@pytest.mark.parametrize("case", [c[0] for c in DAMAGE])
def test_damaged_images_agree(qemu: Any, base: Path, tmp_path: Path, case: str,
                              repair: str | None) -> None:
    _, source, change = next(c for c in DAMAGE if c[0] == case)
    path = patched(base / f"{source}.qcow2", tmp_path / f"{case}.qcow2", change)
    result, rc = assert_agree(qemu, path, repair, tmp_path)
    if repair is None and case != "truncated_in_last_cluster":
        assert rc in (1, 2, 3), f"{case}: the damage was not detected"


# What the brief requires of our repairs: clean afterwards, data unchanged (checked
# inside assert_agree whenever qemu-img's own repair comes out clean).
MUST_REPAIR = [("too_low", "all"), ("too_low_shared", "all"), ("too_high", "leaks"),
               ("too_high_shared", "leaks"), ("unused_cluster", "leaks"), ("l2_copied", "all"),
               ("l1_copied", "all"), ("l2_copied", "leaks"), ("reftable_zeroed", "all"),
               ("reftable_zeroed_512", "all"), ("reftable_zeroed_snap", "all"),
               ("reftable_zeroed_comp", "all"), ("snapshot_incomplete", "all"),
               ("snapshot_extra_too_long", "all")]


@pytest.mark.parametrize("case,repair", MUST_REPAIR)
def test_our_repair_leaves_a_clean_image(qemu: Any, base: Path, tmp_path: Path, case: str,
                                         repair: str) -> None:
    _, source, change = next(c for c in DAMAGE if c[0] == case)
    path = patched(base / f"{source}.qcow2", tmp_path / f"{case}.qcow2", change)
    before = raw_image(qemu, base / f"{source}.qcow2", tmp_path / "before.raw")  # undamaged
    result = our_check(path, repair)
    assert result.exit_code == 0 and result.repaired, (result, result.messages)
    assert result.corruptions_fixed + result.leaks_fixed > 0
    rc, data, lines = qemu_check(qemu, path)
    assert rc == 0 and lines == [], (data, lines)
    assert raw_image(qemu, path, tmp_path / "after.raw") == before
    if "reftable_zeroed" in case:
        assert "Rebuilding refcount structure" in result.messages


# ----------------------------------------------------------------------------- killed writers

def _killed_writer(path: Path, body: str, *, lazy: bool, cluster_size: int) -> None:
    qcow2rw.create(path, 64 * MiB, lazy_refcounts=lazy, cluster_size=cluster_size).close()
    code = f"import os, signal, qcow2rw\nimg = qcow2rw.open({str(path)!r})\n{body}"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL


def test_lazy_refcount_writer_killed(qemu: Any, tmp_path: Path) -> None:
    """iotest 039 with our writer: the dirty image's stale refcounts, as qemu-img sees them.

    The check without -r neither repairs nor clears the dirty bit; -r leaks cannot
    repair it (a rebuild is needed: exit 1, like qemu-img); -r all rebuilds it.
    """
    path = tmp_path / "lazy.qcow2"
    _killed_writer(path, "for i in range(150):\n"
                         "    img.write(i * 70000, bytes([i % 250 + 1]) * 5000)\n"
                         "img.flush()\nos.kill(os.getpid(), signal.SIGKILL)\n",
                   lazy=True, cluster_size=4096)
    assert u64(path.read_bytes(), 72) & 1, "the dirty bit is set"
    untouched = path.read_bytes()
    with qcow2rw.open(path, readonly=True) as img:  # a read-only open does not repair
        result = img.check()
    rc, data, lines = qemu_check(qemu, path)
    assert (result.exit_code, figures(result), result.messages) == (rc, data, lines)
    assert rc == 2 and result.corruptions > 0
    code, out, err = run_cli("check", "--output=json", str(path))  # no -r: no repair either
    assert code == 2 and json.loads(out)["corruptions"] == result.corruptions
    assert path.read_bytes() == untouched
    for repair in ("leaks", "all"):
        assert_agree(qemu, path, repair, tmp_path)
    assert qemu_check(qemu, tmp_path / "lazy.all.ours")[0] == 0


def test_writer_killed_before_frees_leaves_leaks(qemu: Any, tmp_path: Path) -> None:
    """A writer killed after its discards reached the L2 tables but before the deferred
    refcount decrements: leaks only (exit 3); -r leaks frees them."""
    path = tmp_path / "leaky.qcow2"
    body = ("img.write(0, b'x' * (16 * 65536))\nimg.flush()\n"
            "img.discard(4 * 65536, 8 * 65536)\n"
            "class Kill:\n"
            "    def fire(self, name):\n"
            "        if name == 'cluster_free':\n"
            "            os.kill(os.getpid(), signal.SIGKILL)\n"
            "img.events = Kill()\nimg.flush()\n")
    _killed_writer(path, body, lazy=False, cluster_size=65536)
    result, rc = assert_agree(qemu, path, None, tmp_path)
    assert rc == 3 and result.leaks == 8 and result.corruptions == 0
    result, rc = assert_agree(qemu, path, "leaks", tmp_path)
    assert rc == 0 and result.leaks_fixed == 8
    assert qemu_check(qemu, tmp_path / "leaky.leaks.ours")[0] == 0


def test_qemu_io_abort_with_lazy_refcounts(qemu: Any, tmp_path: Path) -> None:
    path = tmp_path / "abort.qcow2"
    qimg(qemu, "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(path), "64M")
    subprocess.run([qemu.QEMU_IO, "-f", "qcow2", "-c", "write -P 7 0 64k", "-c",
                    "write -P 8 1M 200k", "-c", "abort", str(path)], capture_output=True)
    assert u64(path.read_bytes(), 72) & 1
    for repair in (None, "leaks", "all"):
        assert_agree(qemu, path, repair, tmp_path)


# ----------------------------------------------------------------------------- CLI and API

def test_cli_output_is_qemu_img_s(qemu: Any, base: Path, tmp_path: Path) -> None:
    """Human stdout byte for byte, stderr messages, JSON keys in qemu-img's order."""
    cases = [("clean", base / "q64k.qcow2", None),
             ("bad", patched(base / "q64k.qcow2", tmp_path / "bad.qcow2",
                             lambda d, lay: (_too_low(d, lay), _unused_cluster(d, lay))), None),
             ("fix", patched(base / "q64k.qcow2", tmp_path / "fix.qcow2", _too_low), "all"),
             ("fail", patched(base / "q64k.qcow2", tmp_path / "fail.qcow2", _too_low), "leaks")]
    for name, path, repair in cases:
        for output in ("human", "json"):
            ours_path, qemu_path = tmp_path / f"{name}.ours.qcow2", tmp_path / f"{name}.qemu.qcow2"
            shutil.copyfile(path, ours_path)
            shutil.copyfile(path, qemu_path)
            extra = ["-r", repair] if repair else []
            code, out, err = run_cli("check", f"--output={output}", *extra, str(ours_path))
            proc = subprocess.run([qemu.QEMU_IMG, "check", f"--output={output}", *extra,
                                   str(qemu_path)], capture_output=True, text=True)
            assert code == proc.returncode, (name, output, err, proc.stderr)
            assert err.replace("qcow2rw:", "qemu-img:") == proc.stderr, (name, output)
            if output == "human":
                assert out == proc.stdout, (name, out, proc.stdout)
            else:
                assert out.replace(str(ours_path), str(qemu_path)) == proc.stdout, (name, out)


def test_cli_exit_codes(qemu: Any, base: Path, tmp_path: Path) -> None:
    leaky = patched(base / "q64k.qcow2", tmp_path / "leaky.qcow2", _too_high_unused)
    assert run_cli("check", str(leaky))[0] == 3 == qemu.check(str(leaky))[0]
    code, _, err = run_cli("check", "-f", "raw", str(leaky))
    assert code == 63 and "does not support checks" in err
    assert run_cli("check", str(tmp_path / "missing.qcow2"))[0] == 1
    assert run_cli("check", "-U", "-r", "all", str(leaky))[0] == 1
    assert run_cli("check", "-r", "leaks", str(leaky))[0] == 0
    assert qemu.check(str(leaky))[0] == 0


def _too_high_unused(data: bytearray, lay: Layout) -> None:
    _unused_cluster(data, lay)


def test_check_of_an_open_image(qemu: Any, tmp_path: Path) -> None:
    """Image.check on an image open read-write (lazy refcounts, unflushed writes): the
    caches are flushed first, and the figures are what qemu-img sees after close."""
    path = tmp_path / "open.qcow2"
    img = qcow2rw.create(path, 32 * MiB, lazy_refcounts=True, cluster_size=4096)
    for i in range(40):
        img.write(i * 250_000, bytes([i + 1]) * 9000)
    img.discard(0, 64 * KiB)
    result = img.check()
    assert result.exit_code == 0, result.messages
    again = img.check("leaks")
    assert again.exit_code == 0 and not again.repaired
    img.write(31 * MiB, b"z" * 4096)  # still usable afterwards
    img.close()
    rc, data, lines = qemu_check(qemu, path)
    assert rc == 0 and lines == []
    assert data["allocated-clusters"] == result.allocated_clusters + 1
    assert data["total-clusters"] == result.total_clusters


def test_repair_needs_a_writable_image(base: Path) -> None:
    with qcow2rw.open(base / "q64k.qcow2", readonly=True) as img:
        with pytest.raises(qcow2rw.ReadOnlyImage):
            img.check("all")
        assert img.check().exit_code == 0


def test_corrupt_bit_is_cleared_by_repair(qemu: Any, base: Path, tmp_path: Path) -> None:
    """An image marked corrupt (incompatible bit 1) is refused read-write, is checked and
    repaired by -r all like qemu-img, and opens read-write afterwards."""
    def mark(data: bytearray, lay: Layout) -> None:
        _l2_copied(data, lay)
        struct.pack_into(">Q", data, 72, u64(data, 72) | 2)
    path = patched(base / "q64k.qcow2", tmp_path / "corrupt.qcow2", mark)
    with pytest.raises(qcow2rw.CorruptImage):
        qcow2rw.open(path)
    result, rc = assert_agree(qemu, path, "all", tmp_path)
    assert rc == 0
    assert u64((tmp_path / "corrupt.all.ours").read_bytes(), 72) & 2 == 0
    qcow2rw.open(tmp_path / "corrupt.all.ours").close()


def test_dirty_open_repairs_like_qemu(qemu: Any, tmp_path: Path) -> None:
    """A read-write open of a dirty image repairs it as QEMU's open does (one check pass
    with every fix): afterwards qemu-img sees the same image as after qemu-io's open."""
    path = tmp_path / "dirty.qcow2"
    qimg(qemu, "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4k",
         str(path), "16M")
    subprocess.run([qemu.QEMU_IO, "-f", "qcow2", "-c", "write -P 7 0 64k", "-c",
                    "write -P 8 1M 200k", "-c", "write -P 9 8k 4k", "-c", "abort", str(path)],
                   capture_output=True)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    shutil.copyfile(path, ours)
    shutil.copyfile(path, theirs)
    qcow2rw.open(ours).close()
    subprocess.run([qemu.QEMU_IO, "-f", "qcow2", "-c", "read -P 7 0 8k", str(theirs)],
                   capture_output=True, check=True)
    assert qemu_check(qemu, ours)[:2] == qemu_check(qemu, theirs)[:2]
    assert qemu_check(qemu, ours)[0] == 0
    assert raw_image(qemu, ours, tmp_path / "a.raw") == raw_image(qemu, theirs, tmp_path / "b.raw")


def test_dirty_open_refuses_references_past_the_end(qemu: Any, tmp_path: Path) -> None:
    """Our one departure from QEMU: a dirty image whose tables reference clusters past
    the end of the file is not opened read-write (new clusters would land on them)."""
    path = tmp_path / "dirty.qcow2"
    qimg(qemu, "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(path), "16M")
    subprocess.run([qemu.QEMU_IO, "-f", "qcow2", "-c", "write -P 7 0 64k", "-c", "abort",
                    str(path)], capture_output=True)
    patched(path, path, _beyond_eof)
    before = path.read_bytes()
    with pytest.raises(qcow2rw.CorruptImage, match="beyond the end of the file"):
        qcow2rw.open(path)
    # Nothing past the header changed.  (The failed open still clears the dirty bit:
    # open_image closes the image it could not prepare; QEMU would leave the bit set.)
    assert path.read_bytes()[104:] == before[104:]


# ------------------------------------------------------------------- one L2 table named often
def _l1_naming_one_table(qemu: Any, path: Path, refcount_bits: int, reserved_bit: bool) -> None:
    """A 1 GiB image (4 KiB clusters, 512 L1 entries) whose every L1 entry names the
    L2 table of the first one (1 MiB of data), optionally with a reserved bit set in
    one of that table's entries."""
    qimg(qemu, "create", "-q", "-f", "qcow2", "-o",
         f"cluster_size=4k,refcount_bits={refcount_bits}", str(path), "1G")
    qio(qemu, path, "write -P 1 0 1M")
    data = bytearray(path.read_bytes())
    l1_size, l1_offset = struct.unpack_from(">IQ", data, 36)
    first = u64(data, l1_offset)
    for i in range(1, l1_size):
        struct.pack_into(">Q", data, l1_offset + 8 * i, first)
    if reserved_bit:
        l2 = first & 0x00FFFFFFFFFFFE00
        struct.pack_into(">Q", data, l2 + 8, u64(data, l2 + 8) | 2)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("repair", [None, "leaks", "all"])
@pytest.mark.parametrize("refcount_bits, reserved_bit", [(16, False), (8, False), (16, True)],
                         ids=["plain", "refcount-overflow", "reserved-bit"])
def test_l2_table_named_by_every_l1_entry(qemu: Any, tmp_path: Path, monkeypatch: Any,
                                         refcount_bits: int, reserved_bit: bool,
                                         repair: str | None) -> None:
    """The same figures and exit code as qemu-img check, reading the shared table a
    bounded number of times instead of once per L1 entry (issue 6: time bounded by the
    file, not by L1 entries x L2 entries; a fuzzed 512 KiB image took 24 s before).
    Messages repeated per L1 entry are printed up to a budget and then counted."""
    src = tmp_path / "src.qcow2"
    _l1_naming_one_table(qemu, src, refcount_bits, reserved_bit)
    reads = _agree_counting(qemu, tmp_path, src, monkeypatch, repair, "read_table")
    assert len(reads) < 100, len(reads)  # 512 L1 entries, one table: not one read each


def _agree_counting(qemu: Any, tmp_path: Path, src: Path, monkeypatch: Any,
                    repair: str | None, method: str) -> list[int]:
    """Check copies of *src* with qemu-img and with us (the same exit code, figures and
    state afterwards); return the offsets our checker passed to ``_Checker.<method>``."""
    theirs, ours = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    rc, want, _ = qemu_check(qemu, theirs, repair)
    from qcow2rw import check as check_module
    calls: list[int] = []
    original = getattr(check_module._Checker, method)

    def counting(self: Any, *args: Any) -> Any:
        calls.append(next(a for a in args if isinstance(a, int)))
        return original(self, *args)

    monkeypatch.setattr(check_module._Checker, method, counting)
    result = our_check(ours, repair)
    assert (result.exit_code, figures(result)) == (rc, want)
    assert qemu_check(qemu, ours)[:2] == qemu_check(qemu, theirs)[:2]
    return calls


def _snapshots_sharing_one_l1(qemu: Any, path: Path, refcount_bits: int, count: int) -> None:
    """*count* qemu-img snapshots, then every snapshot table entry patched to name the
    first snapshot's L1 table (the other copies become leaks)."""
    qimg(qemu, "create", "-q", "-f", "qcow2", "-o",
         f"cluster_size=4k,refcount_bits={refcount_bits}", str(path), "64M")
    qio(qemu, path, "write -P 1 0 512k")
    for i in range(count):
        qimg(qemu, "snapshot", "-c", f"s{i}", str(path))
    data = path.read_bytes()
    first = struct.unpack_from(">Q", data, struct.unpack_from(">Q", data, 64)[0])[0]
    for index in range(1, count):
        _patch_snapshot(path, index, first)


@pytest.mark.parametrize("repair", [None, "leaks", "all"])
@pytest.mark.parametrize("refcount_bits", [16, 2])
def test_snapshots_sharing_an_l1_table(qemu: Any, tmp_path: Path, monkeypatch: Any,
                                       refcount_bits: int, repair: str | None) -> None:
    """Snapshots whose entries all name one L1 table: qemu-img's figures and exit code
    (refcount overflows included with 2-bit refcounts), walking that table once."""
    src = tmp_path / "src.qcow2"
    _snapshots_sharing_one_l1(qemu, src, refcount_bits, 2 if refcount_bits == 2 else 12)
    walked = _agree_counting(qemu, tmp_path, src, monkeypatch, repair, "check_refcounts_l1")
    passes = 1 + (repair is not None)  # a repair checks again
    assert len(walked) <= 3 * passes, walked  # active + the shared one, not one per snapshot


def _patch_snapshot(path: Path, index: int, l1_offset: int, l1_size: int | None = None) -> None:
    """Point snapshot table entry *index* at another L1 table."""
    data = bytearray(path.read_bytes())
    _, table = struct.unpack_from(">IQ", data, 60)
    pos = table
    for i in range(index + 1):
        old_offset, old_size, id_len, name_len = struct.unpack_from(">QIHH", data, pos)
        extra_len, = struct.unpack_from(">I", data, pos + 36)
        if i == index:
            struct.pack_into(">QI", data, pos, l1_offset,
                             old_size if l1_size is None else l1_size)
        pos += 40 + extra_len + id_len + name_len
        pos += -pos % 8
    path.write_bytes(bytes(data))


def test_snapshot_l1_tables_past_eof_or_overlapping(qemu: Any, tmp_path: Path) -> None:
    """A snapshot L1 table far past the end of the file (QEMU reads zeros there; we
    read nothing, same figures) and one sharing bytes with another snapshot's (stricter
    than QEMU: reported as damage and not walked, so a snapshot table of such entries
    cannot make the check's time grow beyond the file's size)."""
    path = tmp_path / "s.qcow2"
    qimg(qemu, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(path), "8G")
    qio(qemu, path, "write -P 1 0 1M")
    for name in ("a", "b", "c"):
        qimg(qemu, "snapshot", "-c", name, str(path))
    first_l1 = struct.unpack_from(">Q", path.read_bytes(), struct.unpack_from(
        ">Q", path.read_bytes(), 64)[0])[0]
    past_eof = tmp_path / "past.qcow2"
    shutil.copy(path, past_eof)
    _patch_snapshot(past_eof, 1, 1 << 40, 4 << 20)  # 32 MiB of table, 1 TiB into nothing
    rc, want, _ = qemu_check(qemu, past_eof)
    result = our_check(past_eof)
    assert (result.exit_code, figures(result)) == (rc, want)
    overlapping = tmp_path / "overlap.qcow2"
    shutil.copy(path, overlapping)
    _patch_snapshot(overlapping, 2, first_l1 + 4096)  # 8 clusters of table, shifted by one
    result = our_check(overlapping)
    assert result.exit_code == 2
    assert any("L1 table overlaps another snapshot's" in m for m in result.messages)


def test_repairing_a_v2_image_never_writes_a_v3_header_field(tmp_path: Path, qemu: Any) -> None:
    """A v2 header has no incompatible-features field: its bytes 72.. hold the header
    extensions (here the backing format).  A repair that finds corruption marks the
    image corrupt in memory only, as QEMU does for v2.  Before: the corrupt bit was
    written at offset 72, over the first extension, and the backing format was lost."""
    back, path = tmp_path / "back.qcow2", tmp_path / "img.qcow2"
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(back), "64M")
    qemu.qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", str(back),
                  "-F", "qcow2", str(path), "64M")
    qemu.qemu_io(str(path), "write -P 0x11 0 128k")
    with open(path, "r+b") as f:  # the first refcount table entry made unaligned
        f.seek(48)
        table = struct.unpack(">Q", f.read(8))[0]
        f.seek(table)
        entry = struct.unpack(">Q", f.read(8))[0]
        f.seek(table)
        f.write(struct.pack(">Q", entry + 0x200))
    before = path.read_bytes()[:4096]
    for repair in ("leaks", "all"):
        subprocess.run([sys.executable, "-m", "qcow2rw", "check", "-r", repair, str(path)],
                       capture_output=True, text=True, timeout=120)
        assert path.read_bytes()[72:4096] == before[72:4096], repair
        assert qemu.info(str(path))["backing-filename-format"] == "qcow2"
