"""The fixed-newstyle handshake: greeting, client flags, then options until GO or EXPORT_NAME.

:func:`negotiate` runs the whole handshake on one connected socket and returns a
:class:`Session` (the export chosen, structured replies on or off, the metadata
contexts selected), or None when the client aborted or went away.  Malformed input
(bad magic, unknown client flags, an option longer than :data:`MAX_OPTION_LENGTH`)
ends the connection; a well-framed option with a bad payload gets
``NBD_REP_ERR_INVALID`` and the handshake goes on; an option we do not speak
(STARTTLS, EXTENDED_HEADERS, PEEK_EXPORT, anything unknown) gets
``NBD_REP_ERR_UNSUP`` and the handshake goes on, as clients that try the newer
options first expect.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import proto as P

if TYPE_CHECKING:
    from .export import Export

#: Seconds a client may take over the whole handshake before it is dropped (a deadline
#: for the handshake as a whole, not a per-call timeout a trickling client could renew).
HANDSHAKE_TIMEOUT = 60.0


class ProtocolError(Exception):
    """The peer broke the framing of the protocol: the connection is dropped."""


class ClientGone(Exception):
    """The peer closed the connection (or it failed) before a message was complete."""


@dataclass
class Session:
    """What a handshake settled for the transmission phase of one connection."""

    export: Export
    structured: bool = False
    contexts: list[tuple[int, str]] = field(default_factory=list)  # (id, name), id order


def _arm(sock: socket.socket, deadline: float | None) -> None:
    """Make the socket's next call time out at *deadline* (``time.monotonic()``);
    :class:`ClientGone` once it has passed."""
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ClientGone("the handshake took too long")
        sock.settimeout(left)


def recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """Read exactly *n* bytes by *deadline* (if any); :class:`ClientGone` on end of
    stream, a socket error or the deadline passing (a trickle cannot stretch it)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        _arm(sock, deadline)
        try:
            k = sock.recv_into(view[got:], n - got)
        except (OSError, ValueError) as exc:  # (timeout is an OSError)
            raise ClientGone(str(exc)) from exc
        if k == 0:
            raise ClientGone("end of stream")
        got += k
    return bytes(buf)


def _send(sock: socket.socket, data: bytes, deadline: float | None = None) -> None:
    _arm(sock, deadline)
    try:
        sock.sendall(data)
    except OSError as exc:
        raise ClientGone(str(exc)) from exc


class _Reader:
    """Bounds-checked parsing of one option payload: :class:`ValueError` on a short one."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("option payload too short")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def string(self) -> str:
        n = self.u32()
        if n > P.MAX_STRING:
            raise ValueError("string longer than 4096 bytes")
        raw = self.take(n)
        try:
            text = raw.decode()
        except UnicodeDecodeError as exc:
            raise ValueError("string is not UTF-8") from exc
        if "\0" in text:
            raise ValueError("string contains NUL")
        return text

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ValueError("option payload longer than its content")


def negotiate(sock: socket.socket, exports: dict[str, Export],
              timeout: float | None = None) -> Session | None:
    """Run the handshake on *sock*; the chosen :class:`Session`, or None (abort, EOF, error).

    *exports* maps export names to exports; the empty name also selects the first
    export when no export is named "" (so ``nbd://host`` works with ``-x NAME``).
    Raises :class:`ProtocolError` for input that breaks the framing (the caller drops
    the connection), never for a merely invalid option; :class:`ClientGone` when the
    client goes away or takes more than *timeout* seconds (default
    :data:`HANDSHAKE_TIMEOUT`) over the whole handshake.
    """
    deadline = time.monotonic() + (HANDSHAKE_TIMEOUT if timeout is None else timeout)
    _send(sock, struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT,
                            P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES), deadline)
    (client_flags,) = struct.unpack(">I", recv_exact(sock, 4, deadline))
    if client_flags & ~P.KNOWN_CLIENT_FLAGS:
        raise ProtocolError(f"unknown client flags {client_flags:#x}")
    no_zeroes = bool(client_flags & P.CLIENT_FLAG_NO_ZEROES)
    structured = False
    contexts: list[tuple[int, str]] = []
    contexts_for: str | None = None  # the export name the contexts were set for

    def find(name: str) -> Export | None:
        if name in exports:
            return exports[name]
        if name == "" and exports:
            return next(iter(exports.values()))
        return None

    while True:
        magic, option, length = struct.unpack(">QII", recv_exact(sock, 16, deadline))
        if magic != P.IHAVEOPT:
            raise ProtocolError(f"bad option magic {magic:#x}")
        if length > P.MAX_OPTION_LENGTH:
            raise ProtocolError(f"option {option} claims {length} bytes")
        data = recv_exact(sock, length, deadline)

        def reply(rtype: int, payload: bytes = b"", option: int = option) -> None:
            _send(sock, P.option_reply(option, rtype, payload), deadline)

        def error(rtype: int, message: str) -> None:
            reply(rtype, message.encode()[:P.MAX_STRING])

        if option == P.OPT_EXPORT_NAME:
            try:
                name = data.decode()
            except UnicodeDecodeError as exc:
                raise ProtocolError("export name is not UTF-8") from exc
            export = find(name)
            if export is None:
                raise ProtocolError(f"unknown export {name!r} (EXPORT_NAME cannot be refused)")
            if contexts_for is not None and contexts_for != name:
                contexts = []
            _send(sock, struct.pack(">QH", export.size, export.transmission_flags(structured))
                  + (b"" if no_zeroes else bytes(124)), deadline)
            return Session(export, structured, contexts)
        if option == P.OPT_ABORT:
            try:
                reply(P.REP_ACK)
            except ClientGone:
                pass
            return None
        if option == P.OPT_LIST:
            if length:
                error(P.REP_ERR_INVALID, "LIST takes no payload")
                continue
            for export in exports.values():
                name_b = export.name.encode()
                reply(P.REP_SERVER, struct.pack(">I", len(name_b)) + name_b
                      + export.description.encode()[:P.MAX_STRING])
            reply(P.REP_ACK)
            continue
        if option == P.OPT_STRUCTURED_REPLY:
            if length:
                error(P.REP_ERR_INVALID, "STRUCTURED_REPLY takes no payload")
            elif structured:
                error(P.REP_ERR_INVALID, "structured replies already negotiated")
            else:
                structured = True
                reply(P.REP_ACK)
            continue
        if option in (P.OPT_INFO, P.OPT_GO):
            try:
                rd = _Reader(data)
                name = rd.string()
                requests = [rd.u16() for _ in range(rd.u16())]
                rd.end()
            except ValueError as exc:
                error(P.REP_ERR_INVALID, f"bad INFO/GO request: {exc}")
                continue
            export = find(name)
            if export is None:
                error(P.REP_ERR_UNKNOWN, f"no export named {name!r}")
                continue
            flags = export.transmission_flags(structured)
            reply(P.REP_INFO, struct.pack(">HQH", P.INFO_EXPORT, export.size, flags))
            if P.INFO_NAME in requests:
                reply(P.REP_INFO, struct.pack(">H", P.INFO_NAME) + export.name.encode())
            if P.INFO_DESCRIPTION in requests and export.description:
                reply(P.REP_INFO, struct.pack(">H", P.INFO_DESCRIPTION)
                      + export.description.encode()[:P.MAX_STRING])
            reply(P.REP_INFO, struct.pack(">HIII", P.INFO_BLOCK_SIZE, P.MIN_BLOCK,
                                          export.preferred_block, P.MAX_BLOCK))
            reply(P.REP_ACK)
            if option == P.OPT_GO:
                if contexts_for is not None and contexts_for != name:
                    contexts = []
                return Session(export, structured, contexts)
            continue
        if option in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
            setting = option == P.OPT_SET_META_CONTEXT
            if setting:  # replaces the earlier selection, even when it fails
                contexts, contexts_for = [], None
            if setting and not structured:
                error(P.REP_ERR_INVALID, "SET_META_CONTEXT needs structured replies first")
                continue
            try:
                rd = _Reader(data)
                name = rd.string()
                queries = [rd.string() for _ in range(rd.u32())]
                rd.end()
            except ValueError as exc:
                error(P.REP_ERR_INVALID, f"bad meta context request: {exc}")
                continue
            export = find(name)
            if export is None:
                error(P.REP_ERR_UNKNOWN, f"no export named {name!r}")
                continue
            chosen = export.match_contexts(queries, listing=not setting)
            for cid, cname in chosen:  # (a listed context's id is reserved: zero)
                reply(P.REP_META_CONTEXT, struct.pack(">I", cid if setting else 0)
                      + cname.encode())
            reply(P.REP_ACK)
            if setting:
                contexts, contexts_for = chosen, name
            continue
        error(P.REP_ERR_UNSUP, f"option {option} is not supported")
