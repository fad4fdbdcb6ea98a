"""The transmission phase of one connection: a reader thread, futures, replies.

Shape (one :class:`Connection` per client socket):

- **Reader** (:meth:`Connection.run`, the connection's own thread): reads request
  headers and WRITE payloads through a receive buffer (``recv_into``), validates each
  request, and submits it to the export's shared :class:`~qcow2rw.AioImage` (or, for
  BLOCK_STATUS, its metadata pool).  It never waits for a request to finish, only for
  *credit*: at most :data:`MAX_IN_FLIGHT` requests and :data:`MAX_IN_FLIGHT_BYTES` of
  READ/WRITE payload per connection may be in flight, so a fast client is slowed down
  by TCP back-pressure instead of filling the server's memory.
- **Replies** are built in the requests' done-callbacks (on the pool's worker
  threads) and queued whole under the per-connection send lock; one thread at a time
  is the *sender* and sends everything queued with ``sendmsg`` (headers and payloads
  as one vector), so two replies never interleave, and workers finishing together do
  not wait for each other (they queue; the sender sends their replies in the same
  ``sendmsg``).  The sender sends with ``MSG_DONTWAIT``; when the client does not
  read fast enough, what is left goes, in order, to a writer thread (started on first
  need) that sends with blocking calls, so a slow client never blocks the shared
  pool's workers.  A request's credit comes back once its reply has left.
- **End** (DISC, end of stream, a broken framing, or :meth:`Connection.stop` from a
  server shutting down): stop reading, let every request in flight finish and reply,
  flush the image when a write completed since the last flush (nbdcopy sends no
  FLUSH unless asked), close the socket.  Once stopping, requests the reader still
  takes in (already in the socket, or sent later over TCP) get ``ESHUTDOWN``.

Errors of a request become NBD error values (:func:`~qcow2rw.nbd.proto.nbd_errno`);
with structured replies they carry a message.  Bad input never raises out of the
reader: a request that is merely invalid gets an error reply; input that breaks the
framing (bad magic, an oversize WRITE payload) ends the connection.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from . import proto as P
from .handshake import ClientGone, ProtocolError, Session

if TYPE_CHECKING:
    from .export import Export

log = logging.getLogger("qcow2rw.nbd")

#: Per connection: requests in flight, and bytes of READ/WRITE payload in flight.
MAX_IN_FLIGHT = 64
MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024
#: A WRITE longer than the maximum block size has its payload read and dropped (it
#: gets EINVAL) up to this length; beyond it the connection is ended.
MAX_SKIP = 64 * 1024 * 1024
#: Seconds a connection that ends waits for its replies to leave before it cuts the
#: socket (a client that sent DISC and stopped reading).
DRAIN_TIMEOUT = 30.0
RECV_BUFFER = 256 * 1024

_HOLE = struct.Struct(">QI")
_OFFSET = struct.Struct(">Q")
_CONTEXT = struct.Struct(">I")


class _Input:
    """Buffered input of the reader thread: request headers come out of one big
    ``recv_into`` buffer; payloads are copied from it, the rest received in place."""

    def __init__(self, sock: socket.socket, size: int = RECV_BUFFER) -> None:
        self.sock = sock
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0

    def _recv(self, view: memoryview) -> int:
        try:
            n = self.sock.recv_into(view)
        except (OSError, ValueError) as exc:
            raise ClientGone(str(exc)) from exc
        if n == 0:
            raise ClientGone("end of stream")
        return n

    def header(self) -> tuple[int, int, int, int, int, int]:
        """The next request header, unpacked."""
        if self.end - self.start < P.REQUEST_SIZE:
            if self.start:
                rest = self.end - self.start
                self.buf[:rest] = self.buf[self.start:self.end]
                self.start, self.end = 0, rest
            while self.end < P.REQUEST_SIZE:
                self.end += self._recv(self.view[self.end:])
        fields = P.REQUEST.unpack_from(self.buf, self.start)
        self.start += P.REQUEST_SIZE
        if self.start == self.end:
            self.start = self.end = 0
        return fields

    def payload(self, dest: memoryview) -> None:
        """Fill *dest* with the next ``len(dest)`` bytes of the stream."""
        n = len(dest)
        have = min(n, self.end - self.start)
        if have:
            dest[:have] = self.view[self.start:self.start + have]
            self.start += have
            if self.start == self.end:
                self.start = self.end = 0
        while have < n:
            have += self._recv(dest[have:])

    def skip(self, n: int) -> None:
        """Read and drop *n* bytes (bounded memory)."""
        scratch = memoryview(bytearray(min(n, 1 << 20)))
        while n:
            k = min(n, len(scratch))
            self.payload(scratch[:k])
            n -= k


class Connection:
    """One client in the transmission phase (see the module docstring)."""

    def __init__(self, sock: socket.socket, session: Session, peer: str = "") -> None:
        self.sock = sock
        self.export: Export = session.export
        self.structured = session.structured
        self.contexts = session.contexts
        self.peer = peer
        #: The send lock: guards ``_queue`` (replies waiting to be sent, each whole),
        #: ``_sending`` (a thread owns the socket's output: only it sends, so replies
        #: never interleave), ``_handover`` (bytes the writer thread must send first),
        #: ``_writer``, ``_dead`` and ``_ending``.  Held only to move replies in and out
        #: of the queue, never while sending.
        self._send_lock = threading.Lock()
        self._writer_wake = threading.Condition(self._send_lock)
        self._queue: list[tuple[list[Any], int]] = []
        self._sending = False
        self._handover: tuple[list[Any], int, int] | None = None
        self._writer: threading.Thread | None = None
        self._dead = False
        self._ending = False
        #: The credit lock: guards ``_in_flight`` and ``_in_flight_bytes``.
        self._credit = threading.Condition(threading.Lock())
        self._in_flight = 0
        self._in_flight_bytes = 0
        #: Set once by :meth:`stop` (any thread), read by the reader: no lock needed.
        self._stopping = False

    # Reader ------------------------------------------------------------------------------
    def run(self) -> None:
        """The reader thread's body: serve requests until the connection ends."""
        try:
            self._read_loop()
        except (ClientGone, ProtocolError) as exc:
            if not self._stopping:
                log.debug("connection %s ended: %s", self.peer, exc)
        except Exception:  # a bug: log it, never take the server down
            log.exception("connection %s failed", self.peer)
        finally:
            self._finish()

    def stop(self) -> None:
        """Make the reader stop (server shutdown): requests still arriving get
        ESHUTDOWN (a TCP peer can still send after ``SHUT_RD``), then it sees end of
        stream and finishes."""
        self._stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def _read_loop(self) -> None:
        inp = _Input(self.sock)
        export = self.export
        size = export.size
        while True:
            magic, flags, cmd, cookie, offset, length = inp.header()
            if magic != P.REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic {magic:#x}")
            if cmd == P.CMD_DISC:
                return
            if self._stopping:  # the server is closing: fail what still arrives
                error, message = P.ESHUTDOWN, "the server is shutting down"
            else:
                error, message = self._validate(flags, cmd, offset, length, size)
            if error:
                if cmd == P.CMD_WRITE:
                    if length > MAX_SKIP:
                        raise ProtocolError(f"WRITE of {length} bytes")
                    inp.skip(length)
                self._take_credit(0)
                self._reply_error(cookie, error, message, 0)
                continue
            cost = length if cmd in (P.CMD_READ, P.CMD_WRITE) else 0
            self._take_credit(cost)
            try:
                if cmd == P.CMD_WRITE:
                    data = bytearray(length)
                    inp.payload(memoryview(data))
                    self._submit_write(cookie, flags, offset, data, cost)
                elif cmd == P.CMD_READ:
                    self._submit_read(cookie, flags, offset, length, cost)
                else:
                    self._submit_other(cookie, flags, cmd, offset, length)
            except BaseException:
                self._give_credit(cost)
                raise

    def _validate(self, flags: int, cmd: int, offset: int, length: int,
                  size: int) -> tuple[int, str]:
        """(0, "") for a valid request, else (NBD error value, message)."""
        export = self.export
        allowed = P.ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            return P.EINVAL, f"unknown command {cmd}"
        if flags & ~allowed:
            return P.EINVAL, f"flags {flags:#x} not valid for {P.CMD_NAMES[cmd]}"
        if cmd == P.CMD_READ and flags & P.CMD_FLAG_DF and not self.structured:
            return P.EINVAL, "DF needs structured replies"
        if cmd in (P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES) and export.readonly:
            return P.EPERM, "the export is read-only"
        if cmd in (P.CMD_READ, P.CMD_WRITE) and length > P.MAX_BLOCK:
            # A read that may not be fragmented (DF) gets EOVERFLOW, the one error the
            # protocol reserves for it; any other oversize request is invalid.
            error = P.EOVERFLOW if cmd == P.CMD_READ and flags & P.CMD_FLAG_DF else P.EINVAL
            return error, f"{P.CMD_NAMES[cmd]} of {length} bytes exceeds the maximum block size"
        if cmd == P.CMD_FLUSH:
            return (P.EINVAL, "FLUSH takes no offset or length") if offset or length else (0, "")
        if offset > size or length > size - offset:
            error = P.ENOSPC if cmd in (P.CMD_WRITE, P.CMD_WRITE_ZEROES) else P.EINVAL
            return error, f"request [{offset}, +{length}) is past the end of the export ({size})"
        if cmd == P.CMD_BLOCK_STATUS:
            if not self.contexts:
                return P.EINVAL, "no metadata context was negotiated"
            if not length:
                return P.EINVAL, "BLOCK_STATUS of length 0"
        if cmd == P.CMD_WRITE_ZEROES and flags & P.CMD_FLAG_FAST_ZERO and \
                not export.can_fast_zero(offset, length):
            return P.ENOTSUP, "fast zeroing is only possible on whole clusters of a v3 image"
        return 0, ""

    # Credit ---------------------------------------------------------------------------------
    def _take_credit(self, cost: int) -> None:
        with self._credit:
            while self._in_flight >= MAX_IN_FLIGHT or (
                    self._in_flight and self._in_flight_bytes + cost > MAX_IN_FLIGHT_BYTES):
                self._credit.wait()
            self._in_flight += 1
            self._in_flight_bytes += cost

    def _give_credit(self, cost: int, count: int = 1) -> None:
        """Give back the credit of *count* requests with *cost* payload bytes in all."""
        with self._credit:
            self._in_flight -= count
            self._in_flight_bytes -= cost
            self._credit.notify_all()

    # Submission -----------------------------------------------------------------------------
    def _submit_read(self, cookie: int, flags: int, offset: int, length: int, cost: int) -> None:
        if not length:
            self._reply_ok(cookie, cost)
            return
        buf = bytearray(length)
        future = self.export.aio.submit_readinto(offset, buf)
        future.add_done_callback(lambda f: self._guard(self._read_done, f, cookie, flags,
                                                       offset, buf, cost))

    def _submit_write(self, cookie: int, flags: int, offset: int, data: bytearray,
                      cost: int) -> None:
        if not data:
            self._reply_ok(cookie, cost)
            return
        future = self.export.aio.submit_write(offset, data)
        self._after_write(future, cookie, flags, cost)

    def _submit_other(self, cookie: int, flags: int, cmd: int, offset: int, length: int) -> None:
        export = self.export
        future: Future[Any]
        if cmd == P.CMD_FLUSH:
            if export.ignore_flush:
                self._reply_ok(cookie, 0)
                return
            future = export.flush()
            future.add_done_callback(lambda f: self._guard(self._plain_done, f, cookie, 0))
        elif cmd == P.CMD_CACHE or (cmd in (P.CMD_TRIM, P.CMD_WRITE_ZEROES) and not length):
            self._reply_ok(cookie, 0)
        elif cmd == P.CMD_TRIM:
            self._after_write(export.aio.submit_discard(offset, length), cookie, flags, 0)
        elif cmd == P.CMD_WRITE_ZEROES:
            may_trim = not flags & P.CMD_FLAG_NO_HOLE
            steps = export.zero_steps(offset, length, may_trim)
            self._after_write(_chain(steps), cookie, flags, 0)
        else:  # BLOCK_STATUS
            one = bool(flags & P.CMD_FLAG_REQ_ONE)
            future = export.submit_block_status(offset, length, one, self.contexts)
            future.add_done_callback(lambda f: self._guard(self._status_done, f, cookie))

    def _after_write(self, future: Future[Any], cookie: int, flags: int, cost: int) -> None:
        """Reply once the write is done, after a flush when it is FUA (or the cache mode
        says every write is)."""
        export = self.export
        fua = bool(flags & P.CMD_FLAG_FUA or export.force_fua) and not export.ignore_flush

        def written(f: Future[Any]) -> None:
            if f.cancelled() or f.exception() is not None or not fua:
                if not f.cancelled() and f.exception() is None:
                    export.note_write()
                self._plain_done(f, cookie, cost)
                return
            export.note_write()
            flush = export.flush()
            flush.add_done_callback(lambda g: self._guard(self._plain_done, g, cookie, cost))
        future.add_done_callback(lambda f: self._guard(written, f))

    def _guard(self, func: Callable[..., None], *args: Any) -> None:
        """Run a done-callback; a bug in it is logged and ends the connection, it never
        leaves the client waiting for ever."""
        try:
            func(*args)
        except Exception:  # logged: a reply must never be lost silently
            log.exception("reply on connection %s failed", self.peer)
            self.kill()

    # Completion -> replies ------------------------------------------------------------------
    def _failure(self, future: Future[Any]) -> BaseException | None:
        if future.cancelled():
            return ConnectionAbortedError("request cancelled")
        return future.exception()

    def _plain_done(self, future: Future[Any], cookie: int, cost: int) -> None:
        exc = self._failure(future)
        if exc is None:
            self._reply_ok(cookie, cost)
        else:
            self._reply_error(cookie, P.nbd_errno(exc), P.error_message(exc), cost)

    def _read_done(self, future: Future[Any], cookie: int, flags: int, offset: int,
                   buf: bytearray, cost: int) -> None:
        exc = self._failure(future)
        if exc is not None:
            self._reply_error(cookie, P.nbd_errno(exc), P.error_message(exc), cost)
            return
        if not self.structured:
            self._send([P.simple_reply(cookie), buf], cost)
            return
        if flags & P.CMD_FLAG_DF:
            runs = [(0, len(buf), False)]
        else:
            # (at most ~256 runs: a reply is one sendmsg, whose vector is bounded)
            granule = self.export.preferred_block
            while len(buf) > granule * 256:
                granule *= 2
            runs = P.zero_runs(buf, granule, self.export.zeros)
        parts: list[Any] = []
        view = memoryview(buf)
        last = len(runs) - 1
        for i, (start, length, is_zero) in enumerate(runs):
            if is_zero:
                parts.append(P.chunk_header(cookie, P.REPLY_TYPE_OFFSET_HOLE, 12, i == last)
                             + _HOLE.pack(offset + start, length))
            else:
                parts.append(P.chunk_header(cookie, P.REPLY_TYPE_OFFSET_DATA, 8 + length,
                                            i == last) + _OFFSET.pack(offset + start))
                parts.append(view[start:start + length] if len(runs) > 1 else buf)
        self._send(parts, cost)

    def _status_done(self, future: Future[Any], cookie: int) -> None:
        exc = self._failure(future)
        if exc is not None:
            self._reply_error(cookie, P.nbd_errno(exc), P.error_message(exc), 0)
            return
        result = future.result()
        parts: list[Any] = []
        last = len(result) - 1
        for i, (cid, extents) in enumerate(result):
            payload = bytearray(_CONTEXT.pack(cid))
            for length, value in extents:
                payload += struct.pack(">II", length, value)
            parts.append(P.chunk_header(cookie, P.REPLY_TYPE_BLOCK_STATUS, len(payload),
                                        i == last))
            parts.append(payload)
        self._send(parts, 0)

    def _reply_ok(self, cookie: int, cost: int) -> None:
        if self.structured:
            self._send([P.chunk_header(cookie, P.REPLY_TYPE_NONE, 0, True)], cost)
        else:
            self._send([P.simple_reply(cookie)], cost)

    def _reply_error(self, cookie: int, error: int, message: str, cost: int) -> None:
        if self.structured:
            self._send([P.error_chunk(cookie, error, message)], cost)
        else:
            self._send([P.simple_reply(cookie, error)], cost)

    # Sending ----------------------------------------------------------------------------------
    def _send(self, parts: list[Any], cost: int) -> None:
        """Queue one whole reply; if no thread is sending, become the sender.

        The sender takes the whole queue at a time and sends it with as few ``sendmsg``
        calls as the vector limit allows (``MSG_DONTWAIT``), so workers replying at the
        same time do not wait for each other: all but one just queue and go back to
        the pool.  When the socket would block, the rest goes to the writer thread,
        which then stays the sender (blocking sends) until the queue is empty.
        """
        with self._send_lock:
            self._queue.append((parts, cost))
            if self._sending:
                return
            self._sending = True
        self._drain(blocking=False)

    def _drain(self, blocking: bool) -> None:
        """The sender's loop (caller owns ``_sending``): send queued replies until none
        is left, or (not *blocking*) hand the rest to the writer thread."""
        while True:
            with self._send_lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._sending = False
                    return
                dead = self._dead
            cost = sum(c for _, c in batch)
            if not dead:
                parts = [p for reply, _ in batch for p in reply]
                try:
                    rest = _send_parts(self.sock, parts, blocking)
                except OSError:
                    with self._send_lock:
                        self._dead = True
                    rest = []
                if rest:  # would block: the writer thread takes over, in order
                    with self._send_lock:
                        self._handover = (rest, cost, len(batch))
                        if self._writer is None:
                            self._writer = threading.Thread(
                                target=self._write_loop, daemon=True,
                                name=f"qcow2rw-nbd-writer {self.peer}")
                            self._writer.start()
                        self._writer_wake.notify()
                    return
            self._give_credit(cost, len(batch))

    def _write_loop(self) -> None:
        """The writer thread: send what was handed over, then stay the sender (blocking)
        until the queue is empty; wait for the next hand-over or the end."""
        while True:
            with self._send_lock:
                while self._handover is None and not self._ending:
                    self._writer_wake.wait()
                if self._handover is None:
                    return
                rest, cost, count = self._handover
                self._handover = None
                dead = self._dead
            if not dead:
                try:
                    _send_parts(self.sock, rest, True)
                except OSError:
                    with self._send_lock:
                        self._dead = True
            self._give_credit(cost, count)
            self._drain(blocking=True)

    def kill(self) -> None:
        """Cut the connection both ways: the reader sees the end, replies not yet sent
        are dropped (a reply that cannot be sent, or a closing server that stopped
        waiting for a client that does not read)."""
        with self._send_lock:
            self._dead = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # End --------------------------------------------------------------------------------------
    def _finish(self) -> None:
        """Let in-flight requests reply, flush when needed, close (reader thread)."""
        with self._credit:
            if not self._credit.wait_for(lambda: self._in_flight == 0, DRAIN_TIMEOUT):
                self.kill()  # the client does not read its replies: stop sending them
                if not self._credit.wait_for(lambda: self._in_flight == 0, DRAIN_TIMEOUT):
                    log.error("connection %s: %d request(s) never completed", self.peer,
                              self._in_flight)
        export = self.export
        if export.needs_flush() and not export.ignore_flush:
            try:
                export.flush().result()
            except Exception as exc:  # noqa: BLE001 (reported; the connection is gone anyway)
                log.warning("flush at the end of connection %s failed: %s", self.peer, exc)
        with self._send_lock:
            self._ending = True
            self._writer_wake.notify()
            writer = self._writer
        if writer is not None:
            writer.join()
        try:
            self.sock.close()
        except OSError:
            pass


def _chain(steps: list[Callable[[], Future[Any]]]) -> Future[Any]:
    """Run request submitters one after the other; a future of the last one's result
    (or of the first failure)."""
    if len(steps) == 1:
        return steps[0]()
    out: Future[Any] = Future()
    out.set_running_or_notify_cancel()

    def step(i: int, prev: Future[Any] | None) -> None:
        try:
            if prev is not None and (prev.cancelled() or prev.exception() is not None):
                out.set_exception(prev.exception() if not prev.cancelled()
                                  else ConnectionAbortedError("request cancelled"))
            elif i == len(steps):
                out.set_result(prev.result() if prev is not None else None)
            else:
                steps[i]().add_done_callback(lambda f: step(i + 1, f))
        except Exception as exc:  # noqa: BLE001 (a submit that failed: a closed pool)
            if not out.done():
                out.set_exception(exc)
    step(0, None)
    return out


#: Buffers per ``sendmsg`` call (the kernel's IOV_MAX is 1024).
IOV_MAX = 1024
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)


def _size(part: Any) -> int:
    return part.nbytes if isinstance(part, memoryview) else len(part)


def _advance(parts: list[Any], n: int) -> list[Any]:
    """*parts* without its first *n* bytes."""
    i = 0
    while n:
        size = _size(parts[i])
        if n < size:
            return [memoryview(parts[i])[n:], *parts[i + 1:]]
        n -= size
        i += 1
    return parts[i:]


def _send_parts(sock: socket.socket, parts: list[Any], blocking: bool) -> list[Any]:
    """Send *parts* in order; the part not sent when the socket would block (only
    when not *blocking*), else []."""
    flags = _NOSIGNAL if blocking else _NOSIGNAL | socket.MSG_DONTWAIT
    while parts:
        window = parts[:IOV_MAX]
        try:
            n = sock.sendmsg(window, (), flags)
        except (BlockingIOError, InterruptedError) as exc:
            if isinstance(exc, BlockingIOError) and not blocking:
                return parts
            continue
        parts = _advance(parts, n)
    return []
