"""Growth of the refcount table and of the L1 table, on an image with 512 B clusters.

``qemu-img create -o cluster_size=512 IMG 16M`` makes a one-cluster refcount table:
64 entries x 256 refcounts (16-bit) per 512 B block = 16384 clusters = 8 MiB of host
file.  Writing more than 8 MiB of data forces the table to grow (refcount_table_clusters
at header offset 56 goes above 1).  Its L1 table has 16 MiB / (512 * 64) = 512 entries
(header offset 36) in 8 clusters, all used, so ``resize`` to 40 MiB must move it to a
bigger table (L1 offset at header offset 40 changes).  Then ``qemu-img check`` must be
clean and ``qemu-img convert -O raw`` must equal the shadow.
"""

from __future__ import annotations

import random

import pytest

import qcow2rw

from helpers import (KiB, MiB, assert_same_bytes, qemu_check_clean, qemu_create, qemu_raw,
                     read_all, read_header)

# interop: needs qemu-img/qemu-io (the `qemu` fixture); a hang fails this test alone,
# well before the suite-wide timeout (each test normally takes a second or two)
pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

SEED = 401
CS = 512


def refcount_coverage(h: dict) -> int:
    """Host bytes the refcount table can describe (without growing)."""
    entries_per_block = CS * 8 // (1 << h["refcount_order"])
    return h["refcount_table_clusters"] * (CS // 8) * entries_per_block * CS


@pytest.mark.parametrize("creator,refcount_bits", [("qemu-img", 16), ("ours", 16), ("ours", 64)])
def test_refcount_table_and_l1_growth(qemu, tmp_path, creator, refcount_bits):
    rng = random.Random(SEED)
    ctx = f"[seed={SEED} creator={creator} refcount_bits={refcount_bits}]"
    path = tmp_path / "grow.qcow2"
    size = 16 * MiB
    if creator == "qemu-img":
        qemu_create(qemu, path, size, cluster_size=CS, refcount_bits=refcount_bits)
    else:
        qcow2rw.create(str(path), size, cluster_size=CS, refcount_bits=refcount_bits).close()
        qemu_check_clean(qemu, path, f"{ctx} fresh")
    h0 = read_header(path)
    if creator == "qemu-img":
        assert h0["refcount_table_clusters"] == 1, h0
    assert h0["l1_size"] == 512, h0

    shadow = bytearray(size)
    # 9.5 MiB of data in 256 KiB chunks, in random order, some of them unaligned, so that
    # L2 tables, refcount blocks and data interleave in the host file
    chunk = 256 * KiB
    starts = list(range(0, 9 * MiB + chunk, chunk))
    rng.shuffle(starts)
    with qcow2rw.open(str(path)) as img:
        for i, start in enumerate(starts):
            off = start + (rng.randrange(512) if i % 5 == 0 else 0)
            n = min(chunk, size - off)
            data = rng.randbytes(n)
            img.write(off, data)
            shadow[off:off + n] = data
            if i == len(starts) // 2:
                img.flush()
        assert_same_bytes(read_all(img), shadow, f"{ctx} after 9.5 MiB of writes", cluster_size=CS)
    h1 = read_header(path)
    file_size = path.stat().st_size
    assert refcount_coverage(h0) < file_size, \
        f"{ctx}: test too small: the initial refcount table already covers {file_size} bytes"
    assert h1["refcount_table_clusters"] > h0["refcount_table_clusters"], \
        f"{ctx}: refcount table did not grow: {h0} -> {h1}"
    assert refcount_coverage(h1) >= file_size, (ctx, h1, file_size)
    qemu_check_clean(qemu, path, f"{ctx} after refcount table growth")
    assert_same_bytes(qemu_raw(qemu, path, tmp_path), shadow,
                      f"{ctx} convert after refcount table growth", cluster_size=CS)

    # ---- L1 growth via resize, then writes into the new area
    new_size = 40 * MiB
    with qcow2rw.open(str(path)) as img:
        img.resize(new_size)
        assert img.size == new_size, ctx
        shadow += bytes(new_size - size)
        for off, n in [(size, 512), (size + 3 * MiB + 77, 70 * KiB), (30 * MiB, 1 * MiB),
                       (new_size - 1000, 1000), (5 * MiB + 3, 10 * KiB)]:
            data = rng.randbytes(n)
            img.write(off, data)
            shadow[off:off + n] = data
        assert_same_bytes(read_all(img), shadow, f"{ctx} after resize and writes", cluster_size=CS)
    h2 = read_header(path)
    assert h2["size"] == new_size, h2
    assert h2["l1_size"] > h1["l1_size"], f"{ctx}: L1 did not grow: {h1} -> {h2}"
    assert h2["l1_size"] >= new_size // (512 * 64), h2
    if creator == "qemu-img":
        # qemu-img's L1 fills its 8 clusters exactly and data follows it: it must move
        assert h2["l1_table_offset"] != h1["l1_table_offset"], \
            f"{ctx}: L1 table did not move although its clusters were full: {h1} -> {h2}"

    qemu_check_clean(qemu, path, f"{ctx} after L1 growth")
    assert qemu.info(str(path))["virtual-size"] == new_size
    assert_same_bytes(qemu_raw(qemu, path, tmp_path), shadow,
                      f"{ctx} convert after L1 growth", cluster_size=CS)
    with qcow2rw.open(str(path), readonly=True) as ro:
        assert_same_bytes(read_all(ro), shadow, f"{ctx} reopened read-only", cluster_size=CS)
