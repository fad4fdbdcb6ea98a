"""The stress test's oracle: sector stamps, the shared-region model, the read checks.

Every 512-byte sector a write stores is a *stamp*: ``b"QSTR"``, the thread id, the
thread's sequence number of the write, the sector index, a filler made of those, and a
CRC-32 of the rest.  A sector that is neither zeros nor a stamp with a good CRC is
**torn** (or garbage); a stamp naming another sector is **foreign** data; a good stamp
of a write that may not be there is **stale** (or lost).

The shared-region oracle.  A global clock (an integer under the model lock) is ticked
when a request starts (before the Image call) and when it ends (after it returns).
Per sector the model keeps the requests that covered it: each write (its stamp) and
each write_zeroes/discard (zeros: a discard only for the clusters wholly inside its
range), plus the value the sector had when the round began.  Request *f*
**supersedes** request *e* when *f* started after *e* ended: every linearization puts
*f* after *e*.  Then:

* after the round, a sector must hold the value of a request that nothing supersedes;
* a read that ran over [rs, re] must return, per sector, the value of a request that
  started before re and was not superseded by a request that ended before rs (the
  value the sector could hold at some instant of the read).  Partial sectors at the
  ends of a byte-granular read are compared byte for byte with those candidates.

These conditions are necessary for linearizability per sector, so the oracle never
fails a correct image; it catches lost writes, stale copy-on-write data, torn sectors,
data of another guest cluster, and anything returned from nowhere.

Used by :mod:`qcow2rw.devkit.stress` (the workers and the after-round check) and
:mod:`qcow2rw.devkit.chaos` (a snapshot revert is one more request of the model).
"""

from __future__ import annotations

import struct
import threading
import zlib

SECTOR = 512
MAGIC = b"QSTR"
_HEAD = struct.Struct("<4sIQQ")  # magic, thread id, sequence number, sector index: 24 bytes
_CRC = struct.Struct("<I")
_BODY = SECTOR - _CRC.size
ZERO_SECTOR = bytes(SECTOR)
TID_SHIFT = 40  # value id of a stamp: (thread id << TID_SHIFT) | sequence number
SEQ_MASK = (1 << TID_SHIFT) - 1
ZERO = 0  # value id of an all-zero sector
NEVER = -(1 << 62)  # a tick before every tick


# --------------------------------------------------------------------------------------
# Stamps


def stamp(tid: int, seq: int, sector: int) -> bytes:
    """The 512 bytes write (*tid*, *seq*) stores in guest sector *sector*."""
    head = _HEAD.pack(MAGIC, tid, seq, sector)
    body = (head * (_BODY // len(head) + 1))[:_BODY]
    return body + _CRC.pack(zlib.crc32(body))


def stamps(tid: int, seq: int, first: int, count: int) -> bytes:
    """The stamps of sectors ``first .. first + count - 1`` for write (*tid*, *seq*)."""
    return b"".join([stamp(tid, seq, s) for s in range(first, first + count)])


def value_id(tid: int, seq: int) -> int:
    """The value id of write (*tid*, *seq*)."""
    return (tid << TID_SHIFT) | seq


def describe_value(vid: int) -> str:
    """``zeros`` or ``t<thread>#<seq>``."""
    return "zeros" if vid == ZERO else f"t{vid >> TID_SHIFT}#{vid & SEQ_MASK}"


def value_bytes(vid: int, sector: int) -> bytes:
    """The 512 bytes sector *sector* holds when its value id is *vid*."""
    return ZERO_SECTOR if vid == ZERO else stamp(vid >> TID_SHIFT, vid & SEQ_MASK, sector)


class BadSector(Exception):
    """A sector that is neither zeros nor a valid stamp of itself (torn/garbage/foreign)."""


def decode(chunk: bytes | memoryview, sector: int) -> int:
    """The value id of a full 512-byte *chunk* read from *sector*; BadSector if none."""
    if chunk == ZERO_SECTOR:
        return ZERO
    magic, tid, seq, where = _HEAD.unpack_from(chunk)
    if magic != MAGIC or _CRC.unpack_from(chunk, _BODY)[0] != zlib.crc32(chunk[:_BODY]):
        nonzero = sum(1 for b in bytes(chunk) if b)
        raise BadSector(f"torn or garbage sector (magic {bytes(magic)!r}, {nonzero} non-zero "
                        f"bytes, header says t{tid}#{seq} sector {where})")
    if where != sector:
        raise BadSector(f"foreign data: the stamp of sector {where} "
                        f"(guest offset {where * SECTOR:#x}) by t{tid}#{seq}")
    return value_id(tid, seq)


# --------------------------------------------------------------------------------------
# The shared-region model


class _Op:
    """One request as the model sees it: start/end ticks and the value it stores."""

    __slots__ = ("start", "end", "vid")

    def __init__(self, start: int, vid: int, end: int | None = None) -> None:
        self.start = start
        self.end = end  # None while in flight
        self.vid = vid


Candidates = list[_Op] | int  # a sector's requests this round, or its round-start value


class SharedModel:
    """Per-sector request histories of the shared region, under one lock.

    Guards (``lock``): ``clock``, ``events``, ``base`` and ``reads``.  The Image is
    never called with the lock held.
    """

    def __init__(self, sectors: int) -> None:
        self.lock = threading.Lock()
        self.clock = 0
        self.sectors = sectors
        self.base: dict[int, int] = {}           # sector -> value id at round start (absent: zeros)
        self.events: dict[int, list[_Op]] = {}   # sector -> requests since the round began
        self.reads: dict[int, int] = {}          # in-flight read token -> start tick
        self.round_start = 0
        self._next_token = 0

    def new_round(self, values: dict[int, int]) -> None:
        """Start a round from known sector values (absent: zeros)."""
        with self.lock:
            self.base = values
            self.events = {}
            self.clock += 1
            self.round_start = self.clock

    def _history(self, sector: int) -> list[_Op]:
        """Caller holds: ``lock``."""
        hist = self.events.get(sector)
        if hist is None:
            # The round-start value as a request that ended at the round's first tick
            # (start < end, like every request: nothing supersedes itself).
            start = self.round_start
            hist = self.events[sector] = [_Op(start - 1, self.base.get(sector, ZERO), start)]
        return hist

    def begin(self, first: int, end: int, vid: int) -> _Op:
        """Register a request storing *vid* in sectors [first, end) that starts now."""
        with self.lock:
            self.clock += 1
            op = _Op(self.clock, vid)
            horizon = min(self.reads.values()) if self.reads else self.clock
            for sector in range(first, end):
                hist = self._history(sector)
                self._prune(hist, horizon)
                hist.append(op)
            return op

    @staticmethod
    def _prune(hist: list[_Op], horizon: int) -> None:
        """Drop requests no present or future read can see and the final check cannot.

        *e* is dead once a request *f* that ended before *horizon* (the start of the
        oldest read in flight) started after *e* ended.  Caller holds: ``lock``.
        """
        if len(hist) < 4:
            return
        latest = NEVER
        for f in hist:
            if f.end is not None and f.end < horizon and f.start > latest:
                latest = f.start
        if latest >= 0:
            hist[:] = [e for e in hist if e.end is None or e.end > latest]

    def begin_restore(self, values: dict[int, int]) -> list[_Op]:
        """A snapshot revert starts now: every sector gets a request storing its value in
        *values* (absent: zeros).  Returns the requests for :meth:`end_restore`."""
        with self.lock:
            self.clock += 1
            horizon = min(self.reads.values()) if self.reads else self.clock
            ops = []
            for sector in range(self.sectors):
                op = _Op(self.clock, values.get(sector, ZERO))
                hist = self._history(sector)
                self._prune(hist, horizon)
                hist.append(op)
                ops.append(op)
            return ops

    def end_restore(self, ops: list[_Op]) -> None:
        """The revert begun with :meth:`begin_restore` returned."""
        with self.lock:
            self.clock += 1
            for op in ops:
                op.end = self.clock

    def end(self, op: _Op) -> None:
        """The request *op* returned."""
        with self.lock:
            self.clock += 1
            op.end = self.clock

    def begin_read(self) -> int:
        """A read starts now; returns its token."""
        with self.lock:
            self.clock += 1
            self._next_token += 1
            self.reads[self._next_token] = self.clock
            return self._next_token

    def end_read(self, token: int, first: int, end: int) -> tuple[int, list[Candidates]]:
        """The read returned: (its start tick, each sector's history or value)."""
        with self.lock:
            self.clock += 1
            start = self.reads.pop(token)
            events = self.events
            base = self.base
            snap: list[Candidates] = []
            for sector in range(first, end):
                hist = events.get(sector)
                snap.append(list(hist) if hist is not None else base.get(sector, ZERO))
            return start, snap

    def final_candidates(self, sector: int) -> set[int]:
        """Value ids *sector* may hold now (a read starting now could return any of them).

        Once no request is in flight: the values of the requests nothing supersedes.
        """
        with self.lock:
            hist = self.events.get(sector)
            if hist is None:
                return {self.base.get(sector, ZERO)}
            latest = max(op.start for op in hist if op.end is not None)
            return {op.vid for op in hist if op.end is None or op.end > latest}


def read_candidates(hist: Candidates, read_start: int) -> set[int]:
    """Value ids a sector could hold at some instant of a read that started at *read_start*."""
    if isinstance(hist, int):
        return {hist}
    latest = NEVER
    for f in hist:
        if f.end is not None and f.end < read_start and f.start > latest:
            latest = f.start
    return {e.vid for e in hist if e.end is None or e.end > latest}


# --------------------------------------------------------------------------------------
# Checking what a read returned


def check_sector(part: memoryview | bytes, sector: int, skip: int, allowed: set[int],
                 hist: Candidates | None = None) -> str:
    """Why bytes *part* (at byte *skip* of *sector*) are not an allowed value ("" if they are)."""
    if len(part) == SECTOR:
        try:
            vid = decode(part, sector)
        except BadSector as exc:
            mixed = " (a byte mix of allowed values)" if mixture(part, sector, 0, allowed) else ""
            return f"{exc}{mixed}; allowed: {_describe_allowed(allowed)}"
        if vid in allowed:
            return ""
        seen = not isinstance(hist, int) and hist is not None and any(
            op.vid == vid for op in hist)
        what = "stale (superseded) value" if seen or vid == ZERO else \
            "value of a write that cannot be there (lost update or misdirected data)"
        return f"holds {describe_value(vid)}, a {what}; allowed: {_describe_allowed(allowed)}"
    for vid in allowed:
        if value_bytes(vid, sector)[skip:skip + len(part)] == part:
            return ""
    mixed = " (a byte mix of allowed values)" if mixture(part, sector, skip, allowed) else ""
    return (f"bytes {skip}..{skip + len(part)} of the sector match no allowed value{mixed}; "
            f"allowed: {_describe_allowed(allowed)}")


def mixture(part: memoryview | bytes, sector: int, skip: int, allowed: set[int]) -> bool:
    """True when every byte of *part* equals that byte of some allowed value.

    That is what a read racing a write of the same sector can return when the host's
    page cache copies the two at once: neither Linux nor POSIX-in-practice makes a
    buffered 512-byte read atomic against a concurrent write of the same bytes.
    """
    if len(allowed) < 2:
        return False
    columns = [value_bytes(vid, sector)[skip:skip + len(part)] for vid in allowed]
    return all(byte in options for byte, options in zip(bytes(part), zip(*columns)))


def racing_mix(part: memoryview | bytes, sector: int, skip: int, allowed: set[int],
               hist: Candidates, read_start: int) -> bool:
    """True when a read's *part* is one allowed value overwritten in places by writes in flight.

    A buffered ``pread`` is not atomic against a ``pwrite`` of the same bytes running at
    the same moment (Linux copies page-cache pages without the page lock on the read
    side, whatever POSIX says), and no qcow2 driver, QEMU's included, serialises a read
    against an overlapping write.  So a read that overlapped writes of its sector may see
    bytes of the sector's previous value mixed with bytes of those writes.  Everything
    else stays a failure: a mix of two values that were both at rest before the read
    began (that would be a torn sector on disk, which the after-round check also
    catches), or bytes that belong to no allowed value.
    """
    if isinstance(hist, int):
        return False
    racing = {op.vid for op in hist if op.end is None or op.end >= read_start} & allowed
    if not racing:
        return False
    data = bytes(part)
    racing_columns = [value_bytes(vid, sector)[skip:skip + len(data)] for vid in racing]
    for base in allowed:
        columns = [value_bytes(base, sector)[skip:skip + len(data)], *racing_columns]
        if all(byte in options for byte, options in zip(data, zip(*columns))):
            return True
    return False


def describe_history(hist: Candidates | None) -> str:
    """The requests a sector's model holds, as ``value [start, end]`` (for failure reports)."""
    if hist is None or isinstance(hist, int):
        return f"value at round start: {describe_value(hist or ZERO)}"
    return "history: " + ", ".join(
        f"{describe_value(op.vid)} [{op.start}, {'running' if op.end is None else op.end}]"
        for op in hist)


def _describe_allowed(allowed: set[int]) -> str:
    return ", ".join(sorted(describe_value(v) for v in allowed)) or "nothing"


def describe_mismatch(got: bytes | bytearray, want: bytes | bytearray, base: int) -> str:
    """Where *got* (read at guest *base*) first differs from *want*, decoded."""
    for i in range(0, len(want), SECTOR):
        g, w = got[i:i + SECTOR], want[i:i + SECTOR]
        if g != w:
            offset = base + i
            sector = offset // SECTOR
            return (f"first difference in the {len(g)} bytes at guest offset {offset:#x}: "
                    f"expected {_describe_bytes(bytes(w), sector)}, got "
                    f"{_describe_bytes(bytes(g), sector)}")
    return "lengths differ"


def _describe_bytes(chunk: bytes, sector: int) -> str:
    if not any(chunk):
        return "zeros"
    if len(chunk) == SECTOR:
        try:
            return describe_value(decode(chunk, sector))
        except BadSector as exc:
            return str(exc)
    idx = chunk.find(MAGIC)
    if idx >= 0 and idx + _HEAD.size <= len(chunk):
        _, tid, seq, where = _HEAD.unpack_from(chunk, idx)
        return f"part of a stamp (t{tid}#{seq}, sector {where})"
    return f"{len(chunk)} unrecognised bytes"
