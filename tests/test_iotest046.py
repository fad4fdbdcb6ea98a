"""A port of qemu-iotests 046: concurrent allocating writes into the same and adjacent
clusters, in both orders, with superset and subset ranges, next to compressed and
preallocated clusters.

The first request is paused at ``cluster_alloc`` (it has reserved its new clusters and
registered them as in flight, and has not written data yet); the second is issued;
then the first is resumed.  A second request that overlaps the first's clusters must
wait for it (so its data wins where they overlap), one that does not must not wait.
Afterwards every byte reads back as the two writes applied in that order, and
``qemu-img check`` is clean.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

import qcow2rw
from qcow2rw.events import EventPoints

CS = 65536
CLUSTERS = 32
SIZE = CLUSTERS * CS

# (name, first request (offset, length), second request, do they share a cluster?)
SCENARIOS = [
    ("same cluster, disjoint sectors", (2 * CS, 4096), (2 * CS + 8192, 4096), True),
    ("same cluster, overlapping", (3 * CS + 1000, 9000), (3 * CS + 5000, 20000), True),
    ("adjacent clusters", (4 * CS + CS // 2, CS // 2), (5 * CS, 4096), False),
    ("superset", (6 * CS + 4096, 8192), (6 * CS, 2 * CS), True),
    ("subset", (8 * CS, 2 * CS), (8 * CS + 512, 1024), True),
    ("spanning two, second inside", (10 * CS + 60000, 10000), (11 * CS + 100, 100), True),
    ("next to a compressed cluster", (13 * CS + 100, 1000), (15 * CS + 2048, 512), False),
    ("into a compressed cluster", (14 * CS + 4096, 4096), (14 * CS + 100, 100), True),
    ("next to a zero-allocated cluster", (16 * CS, 512), (18 * CS + 512, 512), False),
    ("into a zero-allocated cluster", (17 * CS + 1024, 512), (17 * CS, 4096), True),
]


def _pattern(offset: int, length: int, tag: int) -> bytes:
    return bytes((tag + (offset + i) // 512) % 251 + 1 for i in range(0, length, 512) for _ in range(512))[:length]


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory, qemu: Any) -> tuple[Path, bytes]:
    """An overlay over a backing file with a pattern per cluster, plus a compressed
    cluster (14) and a zero-allocated one (17), all written by QEMU."""
    d = tmp_path_factory.mktemp("046")
    backing = d / "backing.qcow2"
    qemu.qemu_img("create", "-f", "qcow2", str(backing), str(SIZE))
    cmds = [f"write -P {i + 1} {i * CS} {CS}" for i in range(CLUSTERS)]
    qemu.qemu_io(str(backing), *cmds)
    top = d / "top.qcow2"
    qemu.qemu_img("create", "-f", "qcow2", "-b", "backing.qcow2", "-F", "qcow2", str(top))
    qemu.qemu_io(str(top), f"write -c -P 0xcc {14 * CS} {CS}", f"write -P 0xdd {17 * CS} {CS}",
                 f"write -z {17 * CS} {CS}")
    content = bytearray(b"".join(bytes([i + 1]) * CS for i in range(CLUSTERS)))
    content[14 * CS:15 * CS] = b"\xcc" * CS
    content[17 * CS:18 * CS] = bytes(CS)
    return top, bytes(content)


def _run_pair(img: qcow2rw.Image, first: tuple[int, int], second: tuple[int, int],
              shares: bool) -> None:
    events = img.events = EventPoints()
    errors: list[BaseException] = []

    def write(offset: int, length: int, tag: int) -> None:
        try:
            img.write(offset, _pattern(offset, length, tag))
        except BaseException as exc:
            errors.append(exc)

    events.set_break("cluster_alloc")
    t1 = threading.Thread(target=write, args=(*first, 10), daemon=True)
    t1.start()
    assert events.wait_break("cluster_alloc"), (first, errors, events.seen)
    t2 = threading.Thread(target=write, args=(*second, 20), daemon=True)
    t2.start()
    t2.join(0.3)
    assert t2.is_alive() == shares, "overlapping requests wait; disjoint ones must not"
    events.resume("cluster_alloc")
    t1.join(10)
    t2.join(10)
    assert not t1.is_alive() and not t2.is_alive() and not errors, errors
    img.events = None


@pytest.mark.parametrize("mode", ["rwlock", "fine"])
@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_046_concurrent_allocations(tmp_path: Path, qemu: Any, base_image: tuple[Path, bytes],
                                    mode: str, order: str) -> None:
    top, content = base_image
    path = tmp_path / "top.qcow2"
    path.write_bytes(top.read_bytes())
    (tmp_path / "backing.qcow2").write_bytes((top.parent / "backing.qcow2").read_bytes())
    expected = bytearray(content)
    img = qcow2rw.open(path, lock_mode=mode)
    for name, a, b, shares in SCENARIOS:
        first, second = (a, b) if order == "forward" else (b, a)
        _run_pair(img, first, second, shares)
        for (offset, length), tag in ((first, 10), (second, 20)):
            expected[offset:offset + length] = _pattern(offset, length, tag)
        assert img.read(0, SIZE) == bytes(expected), name
    img.close()
    rc, out = qemu.check(str(path))
    assert rc == 0, out
    qemu.convert_to_raw(str(path), str(tmp_path / "out.raw"))
    assert (tmp_path / "out.raw").read_bytes() == bytes(expected)
