"""A bounded fuzzer for hostile images (issue 6).

Hypothesis draws patches (bit flips, random 1/2/4/8-byte values) aimed at the first
clusters and the metadata tables of small QEMU-made images (header and extensions,
refcount table and block, L1 and L2 tables, snapshot table and snapshot L1,
compressed data); each mutated image goes through the worker of tests/hostile.py
(info, read-only open and reads, read-write open and writes, check, repair,
re-check) in subprocesses with an address-space limit and a timeout.

What must hold for any input: no traceback from inside, no hang, no memory blow-up;
where ``qemu-img info`` refuses the image, we refuse it too; an image we mark
corrupt has the bit on disk.  The default run is small and derandomized; the soak
run (``-m soak``) draws many more.  Every failure found becomes a named regression
case in :data:`REGRESSIONS` (and, when it is a class of damage, a mutation in
tests/hostile.py).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import hostile
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_hostile import BATCHES, qemu_img, run_batch

pytestmark = pytest.mark.interop

# (region, length of the region to aim at) per base; offsets come from the layout.
REGIONS = {
    "header": lambda lay: (0, 112),
    "extensions": lambda lay: (lay.ext_start, 512),
    "reftable": lambda lay: (lay.reftable, 64),
    "refblock": lambda lay: (lay.refblock, 64),
    "l1": lambda lay: (lay.l1, 16),
    "l2": lambda lay: (lay.l2, 64),
    "l2b": lambda lay: (lay.l2b, 16),
    "snapshot_table": lambda lay: (lay.snapshots, 128),
    "snapshot_l1": lambda lay: (lay.snap_l1, 16),
    "data": lambda lay: (lay.data, 512),
}
BASES = ("plain", "v2", "snap", "comp", "overlay", "lazy")

# Failures the fuzzer found, kept as named cases: (name, base, [(offset, bytes)]).
REGRESSIONS: tuple[tuple[str, str, tuple[tuple[int, bytes], ...]], ...] = (
    # v2: the corrupt bit was written at offset 72, over the first header extension.
    ("v2_corrupt_bit_over_extensions", "v2",
     ((327694, b"\x00\x0f\x11("), (131078, b"\x00\x00\x00\x00\x00\x00\x00&"),
      (327926, b"\xab"), (131075, b"\x00\x00\x01\x00\x00\x00\x00\x00"))),
    # An end-of-extensions marker with a length past the cluster: QEMU refuses it.
    ("end_marker_with_huge_length", "v2", ((74, b"\x00\x00\x00\x1e"),)),
)

patch_strategy = st.tuples(
    st.sampled_from(sorted(REGIONS)),
    st.integers(min_value=0, max_value=1 << 16),          # position, reduced mod the region
    st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 7)),
        st.tuples(st.sampled_from([">B", ">H", ">I", ">Q"]),
                  st.one_of(st.integers(0, 255), st.integers(0, (1 << 64) - 1),
                            st.sampled_from([0, 1, 0x200, 0x10000, 1 << 40, 1 << 63,
                                             (1 << 64) - 1, 0x7FFFFFFF]))),
    ),
)
image_strategy = st.tuples(st.sampled_from(BASES), st.lists(patch_strategy, min_size=1,
                                                             max_size=4))


def apply_patches(raw: bytes, layout: hostile.Layout, patches: list[Any]) -> tuple[bytes, list]:
    """The mutated bytes, and the patches as (offset, new bytes) for a regression case."""
    buf = bytearray(raw)
    done = []
    for region, position, (kind, arg) in patches:
        start, length = REGIONS[region](layout)
        if region != "header" and start == 0:
            continue  # this base has no such structure
        offset = start + position % length
        if kind == "flip":
            if offset < len(buf):
                buf[offset] ^= 1 << arg
                done.append((offset, bytes([buf[offset]])))
            continue
        size = struct.calcsize(kind)
        value = arg & ((1 << (8 * size)) - 1)
        if offset + size > len(buf):
            continue
        struct.pack_into(kind, buf, offset, value)
        done.append((offset, bytes(buf[offset:offset + size])))
    return bytes(buf), done


def fuzz(qemu: Any, where: Path, cases: list[tuple[str, bytes, str]]) -> list[str]:
    """Run the worker on every (name, bytes, description) case; the failures found."""
    for name, data, _ in cases:
        (where / f"{name}.qcow2").write_bytes(data)
    bases = where / "bases"
    for image in ("backing.qcow2",):
        if (bases / image).exists():
            (where / image).write_bytes((bases / image).read_bytes())
    paths = [str(where / f"{name}.qcow2") for name, _, _ in cases]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(BATCHES) as pool:
        infos = list(pool.map(lambda p: qemu_img("info", "-U", p), paths))
        results: dict[str, Any] = {}
        for part in pool.map(run_batch, [paths[i::BATCHES] for i in range(BATCHES)]):
            results.update(part)
    failures = []
    for (name, _, desc), path, info in zip(cases, paths, infos):
        out = results[path]
        outcome = hostile.classify(out) if "crash" not in out else "crash"
        problem = None
        if "crash" in out:
            problem = out["crash"]
        elif (info is None or info.returncode != 0) and not outcome.startswith("refused:"):
            problem = f"qemu-img info refuses ({info.stderr.strip() if info else 'hang'}), we: {outcome}"
        elif "qcow2: Marking image as corrupt" in str(out.get("write")) and not out["corrupt_bit"]:
            problem = "marked corrupt without the bit on disk"
        if problem:
            failures.append(f"{name} {desc}: {problem}")
    return failures


def draw_cases(bases: dict[str, hostile.Layout], draws: list[Any]) -> list[tuple[str, bytes, str]]:
    cases = []
    for i, (base, patches) in enumerate(draws):
        data, done = apply_patches(bases[base].raw, bases[base], patches)
        cases.append((f"fuzz{i:05d}", data, f"{base} {done!r}"))
    return cases


def _run(qemu: Any, tmp_path: Path, count: int, data: st.DataObject) -> None:
    bases = hostile.build_bases(qemu, tmp_path / "bases")
    draws = [data.draw(image_strategy) for _ in range(count)]
    failures = fuzz(qemu, tmp_path, draw_cases(bases, draws))
    assert not failures, "\n".join(failures)


@settings(max_examples=1, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_small(qemu: Any, tmp_path: Path, data: st.DataObject) -> None:
    """60 derandomized hostile images (a few seconds)."""
    _run(qemu, tmp_path, 60, data)


@pytest.mark.soak
@pytest.mark.timeout(3600)
@settings(max_examples=10, database=None, deadline=None, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_soak(qemu: Any, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    """10 x 300 random hostile images (no shrinking: a failure names its patches)."""
    _run(qemu, tmp_path_factory.mktemp("fuzz"), 300, data)


@pytest.mark.parametrize("case", REGRESSIONS, ids=lambda c: c[0])
def test_fuzz_regressions(qemu: Any, tmp_path: Path, case: Any) -> None:
    name, base, patches = case
    bases = hostile.build_bases(qemu, tmp_path / "bases")
    buf = bytearray(bases[base].raw)
    for offset, new in patches:
        buf[offset:offset + len(new)] = new
    failures = fuzz(qemu, tmp_path, [(name, bytes(buf), f"{base} {patches!r}")])
    assert not failures, "\n".join(failures)
