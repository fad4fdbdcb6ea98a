"""The extent scan of a range inside one L2 table: the fast shapes (all unallocated,
one contiguous normal run, compared in C) must give exactly what the entry-by-entry
scan gives, for any table, hostile ones included."""

from __future__ import annotations

from array import array
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qcow2rw
from qcow2rw.cluster import extents_by_entry, extents_in
from qcow2rw.errors import Qcow2Error
from qcow2rw.format import QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO

CS = 1024  # not 512: a host offset can then be unaligned (bit 9)
ENTRIES = CS // 8


@pytest.fixture(scope="module")
def image(tmp_path_factory: Any) -> Any:
    path: Path = tmp_path_factory.mktemp("extents") / "e.qcow2"
    img = qcow2rw.create(path, 4 << 20, cluster_size=CS)
    img.write(0, b"\1" * (64 * CS))
    assert img.refcounts.high_water == 69  # the end of the file: EDGES and one_run() use it
    yield img
    img.close()


def outcome(func: Any, *args: Any) -> Any:
    try:
        return func(*args)
    except Qcow2Error as exc:
        return type(exc).__name__


# Entries that make the fast shapes' conditions interesting: runs that are contiguous
# or nearly so, flags on some, reserved bits, offsets near the end of the file.
flag = st.sampled_from([0, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO, QCOW_OFLAG_COMPRESSED,
                        QCOW_OFLAG_COPIED | QCOW_OFLAG_ZERO, 1 << 5, 1 << 57])


@st.composite
def tables(draw: Any) -> tuple[array, int, int]:
    table = array("Q", [0] * ENTRIES)
    pos = 0
    while pos < ENTRIES:
        run = draw(st.integers(1, 40))
        kind = draw(st.sampled_from(["zero", "run", "random"]))
        start = draw(st.integers(0, 100)) * CS
        f = draw(flag)
        for i in range(min(run, ENTRIES - pos)):
            if kind == "zero":
                table[pos + i] = 0
            elif kind == "run":
                table[pos + i] = (start + i * CS) | f
            else:
                table[pos + i] = draw(st.integers(0, 300)) * CS | draw(flag)
        pos += run
    offset = draw(st.integers(0, ENTRIES * CS - 1))
    most = ENTRIES * CS - offset
    length = draw(st.one_of(st.integers(0, min(most, 6 * CS)), st.integers(0, most)))
    return table, offset, length


@st.composite
def one_run(draw: Any) -> tuple[array, int, int]:
    """A range inside one run of entries that the fast branch may take: contiguous or
    off by one cluster somewhere, placed across the end of the file or not."""
    first = draw(st.integers(0, ENTRIES - 2))
    count = draw(st.one_of(st.integers(2, min(8, ENTRIES - first)),
                           st.integers(2, ENTRIES - first)))
    start = draw(st.integers(60, 75)) * CS  # the file ends at cluster 69
    start += draw(st.sampled_from([0, 0, 0, 512]))  # sometimes unaligned
    f = draw(flag)
    table = array("Q", [0] * ENTRIES)
    for i in range(count):
        table[first + i] = (start + i * CS) | f
    if draw(st.booleans()):
        table[first + draw(st.integers(0, count - 1))] += draw(st.sampled_from([CS, 512, 1, 1 << 62]))
    offset = first * CS + draw(st.integers(0, CS - 1))
    end = (first + count - 1) * CS + draw(st.integers(1, CS))
    return table, offset, end - offset


def _table(first: int, entries: list[int]) -> array:
    table = array("Q", [0] * ENTRIES)
    table[first:first + len(entries)] = array("Q", entries)
    return table


# Shapes the fast branch must refuse, each seen to slip through a mutated condition:
# unallocated but for the last entry; contiguous but unaligned (by 512 bytes);
# contiguous across the end of the file; contiguous but one entry zero-flagged.
EDGES = [
    (_table(3, [0, 0, 0, 9 * CS]), 3 * CS, 4 * CS),
    (_table(3, [QCOW_OFLAG_COPIED | (9 * CS + 512 + i * CS) for i in range(4)]), 3 * CS, 4 * CS),
    (_table(3, [QCOW_OFLAG_COPIED | ((66 + i) * CS) for i in range(4)]), 3 * CS, 4 * CS),
    (_table(3, [(9 + i) * CS | (QCOW_OFLAG_ZERO if i == 2 else 0) for i in range(4)]), 3 * CS,
     4 * CS),
]


@pytest.mark.parametrize("drawn", EDGES, ids=["zeros-then-one", "unaligned", "past-eof",
                                              "zero-flag"])
def test_fast_branch_edges(image: Any, drawn: tuple[array, int, int]) -> None:
    test_fast_shapes_match_the_entry_by_entry_scan.hypothesis.inner_test(image, drawn)


@settings(max_examples=400, deadline=None)
@given(st.one_of(tables(), one_run()))
def test_fast_shapes_match_the_entry_by_entry_scan(image: Any, drawn: tuple[array, int, int]) -> None:
    table, offset, length = drawn
    image.corrupt_event = None
    fast = outcome(extents_in, image.state, table, offset, length)
    slow = outcome(extents_by_entry, image.state, table, offset, length)
    assert fast == slow


def test_fast_shapes_are_taken(image: Any) -> None:
    """The two shapes do come out of the fast branch (one run each)."""
    contiguous = array("Q", [QCOW_OFLAG_COPIED | (5 + i) * CS for i in range(ENTRIES)])
    assert extents_in(image.state, contiguous, 100, 10 * CS) == [(1, 100, 10 * CS, 5 * CS + 100)]
    assert extents_in(image.state, array("Q", [0] * ENTRIES), 0, 8 * CS) == [(0, 0, 8 * CS, 0)]
