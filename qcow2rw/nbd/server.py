"""The NBD server: listening sockets, an accept thread, a thread per client.

:class:`Server` exports one image (one :class:`~qcow2rw.nbd.export.Export`, so one
``Image`` and one ``AioImage`` shared by every connection).  Each accepted client gets a
thread that runs the handshake (:func:`~qcow2rw.nbd.handshake.negotiate`) and then
the connection's reader (:class:`~qcow2rw.nbd.connection.Connection`).

Shutting down (:meth:`Server.close`, also what SIGTERM does in ``qcow2rw serve``):
stop accepting, make every connection stop reading, let the requests in flight finish
and reply, flush, stop the pools, and, when the server owns the image, close it
(which flushes and clears the dirty bit).  Snapshots may be taken meanwhile through
``server.image.create_snapshot(name)``: the image drains the requests in flight and
holds new ones back until the snapshot is done; clients just wait.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import stat
import threading
import time
from typing import Any
from urllib.parse import quote

from ..image import Image
from .connection import Connection
from .export import Export
from .handshake import ClientGone, ProtocolError, negotiate

log = logging.getLogger("qcow2rw.nbd")

DEFAULT_PORT = 10809
#: Seconds a closing server waits for connections to finish before cutting them.
SHUTDOWN_GRACE = 10.0
#: Seconds the accept loop waits before it retries after an accept failed for want of
#: resources (EMFILE: out of file descriptors; ENOBUFS, ENOMEM).
ACCEPT_BACKOFF = 0.2


class Server:
    """An NBD server exporting *image* (see the module docstring).

    Keyword arguments are those of :class:`~qcow2rw.nbd.export.Export` (``name``,
    ``description``, ``readonly``, ``multi_conn``, ``allocation_depth``, ``workers``,
    ``cache``), and:

    Args:
        max_connections: clients served at once (``-e``); 0: no limit.  While at the
            limit, new clients wait in the listen backlog.
        persistent: keep serving after the last client left (``-t``); when False the
            server stops once a client has come and every client has gone.
        owns_image: close the image when the server closes.
    """

    def __init__(self, image: Image, *, max_connections: int = 0, persistent: bool = True,
                 owns_image: bool = False, **export_options: Any) -> None:
        self.image = image
        self.export = Export(image, **export_options)
        self.max_connections = max_connections
        self.persistent = persistent
        self.owns_image = owns_image
        #: The server lock: guards ``_listeners``, ``_clients``, ``_threads``, ``_closing``
        #: and ``_unlink``; ``_slots`` waits on it for a free connection slot.
        self._lock = threading.Lock()
        self._slots = threading.Condition(self._lock)
        self._listeners: list[socket.socket] = []
        self._unlink: list[str] = []
        self._clients: dict[socket.socket, Connection | None] = {}
        self._threads: set[threading.Thread] = set()
        self._closing = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._accept_thread: threading.Thread | None = None
        self._stop_requested = threading.Event()
        self._closed = threading.Event()
        #: Seconds :meth:`close` lets connections finish before it cuts them.
        self.shutdown_grace = SHUTDOWN_GRACE

    # Listening --------------------------------------------------------------------------
    def listen_unix(self, path: str) -> str:
        """Listen on a Unix socket at *path* (removed again on close); returns the path."""
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a stale socket of an earlier run
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        with self._lock:
            self._unlink.append(path)
        self.add_listener(sock)
        return path

    def listen_tcp(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> tuple[str, int]:
        """Listen on TCP *host*:*port* (port 0: any free port); returns the bound address."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        self.add_listener(sock)
        name = sock.getsockname()
        return str(name[0]), int(name[1])

    def add_listener(self, sock: socket.socket) -> None:
        """Serve clients of an already listening socket (e.g. from socket activation)."""
        sock.setblocking(False)  # accept() after select() must never block
        with self._lock:
            if self._closing:
                raise RuntimeError("the server is closed")
            self._listeners.append(sock)
        self._wake()

    @property
    def addresses(self) -> list[Any]:
        """The bound address of every listener (a path, or a (host, port) pair)."""
        with self._lock:
            return [s.getsockname() for s in self._listeners]

    def uri(self) -> str:
        """An NBD URI for the first listener (``nbd+unix:///?socket=...`` or ``nbd://``)."""
        address = self.addresses[0]
        name = quote(self.export.name)
        if isinstance(address, str):
            return f"nbd+unix:///{name}?socket={quote(address)}"
        host = address[0]
        if ":" in host:
            host = f"[{host}]"
        return f"nbd://{host}:{address[1]}/{name}"

    # Running -------------------------------------------------------------------------------
    def start(self) -> Server:
        """Start accepting clients in a background thread; returns self."""
        with self._lock:
            if self._accept_thread is None:
                self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True,
                                                       name="qcow2rw-nbd-accept")
                self._accept_thread.start()
        return self

    def request_stop(self) -> None:
        """Ask :meth:`serve_forever` to close the server (safe in a signal handler)."""
        self._stop_requested.set()

    def serve_forever(self) -> None:
        """Serve until :meth:`request_stop` (or, not persistent, until the last client
        left), then close the server."""
        self.start()
        while not self._stop_requested.wait(0.25):
            pass
        self.close()

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until the server has closed; True if it has."""
        return self._closed.wait(timeout)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _accept_loop(self) -> None:
        starved = False  # the last accept failed for want of resources (fds, memory)
        while True:
            with self._lock:
                while (not self._closing and self.max_connections
                       and len(self._clients) >= self.max_connections):
                    self._slots.wait()
                if self._closing:
                    return
                listeners = list(self._listeners)
            try:
                if starved:  # back off: the listener stays readable, retrying at once spins
                    _readable([self._wake_r], ACCEPT_BACKOFF)
                ready = _readable([self._wake_r, *listeners], None)
            except (OSError, ValueError) as exc:  # (a listener closed under us)
                log.error("the server stops accepting clients: %s", exc)
                return
            if self._wake_r in ready:
                try:
                    self._wake_r.recv(4096)
                except OSError:
                    pass
            for listener in ready:
                if listener is self._wake_r:
                    continue
                try:
                    sock, peer = listener.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue
                except OSError as exc:
                    if not starved:  # once per episode, not once per retry
                        log.warning("accept failed (retrying every %g s): %s",
                                    ACCEPT_BACKOFF, exc)
                    starved = True
                    break
                starved = False
                self._start_client(sock, peer)

    def _start_client(self, sock: socket.socket, peer: Any) -> None:
        with self._lock:
            if self._closing:
                sock.close()
                return
            self._clients[sock] = None
            thread = threading.Thread(target=self._client, args=(sock, str(peer or "unix")),
                                      daemon=True, name=f"qcow2rw-nbd {peer or 'unix'}")
            self._threads.add(thread)
        try:
            thread.start()
        except RuntimeError as exc:  # no thread to be had: drop this client, keep accepting
            log.warning("cannot serve a client: %s", exc)
            with self._lock:
                self._clients.pop(sock, None)
                self._threads.discard(thread)
                self._slots.notify_all()
            sock.close()

    def _client(self, sock: socket.socket, peer: str) -> None:
        """A client's thread: handshake, then the connection's reader."""
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                session = negotiate(sock, {self.export.name: self.export})
            except (ClientGone, ProtocolError) as exc:
                log.debug("handshake with %s ended: %s", peer, exc)
                session = None
            if session is not None:
                sock.settimeout(None)
                conn = Connection(sock, session, peer)
                with self._lock:
                    stopping = self._closing
                    self._clients[sock] = conn
                if stopping:
                    conn.stop()
                conn.run()  # closes the socket at its end
        except Exception:
            log.exception("client %s failed", peer)
        finally:
            try:
                sock.close()
            except OSError:
                pass
            with self._lock:
                self._clients.pop(sock, None)
                self._threads.discard(threading.current_thread())
                idle = not self._clients and not self._closing
                self._slots.notify_all()
            if idle and not self.persistent:
                self.request_stop()

    # Closing --------------------------------------------------------------------------------
    def close(self, timeout: float | None = None) -> None:
        """Stop accepting, finish every connection, stop the pools; close the image if
        the server owns it.  Idempotent."""
        with self._lock:
            if self._closing:
                already = True
            else:
                already = False
                self._closing = True
                self._slots.notify_all()
        if already:
            self._closed.wait(timeout)
            return
        try:
            self._wake()
            if self._accept_thread is not None and self._accept_thread is not threading.current_thread():
                self._accept_thread.join()
            with self._lock:
                listeners, self._listeners = self._listeners, []
                unlink, self._unlink = self._unlink, []
                clients = list(self._clients.items())
            for listener in listeners:
                listener.close()
            for path in unlink:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            for sock, conn in clients:
                if conn is not None:
                    conn.stop()
                else:  # still in the handshake
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            # Connections finish their requests and replies; one whose client does not
            # read its replies is cut after the grace period (its replies cannot leave).
            start = time.monotonic()
            cut = False
            while True:
                with self._lock:
                    threads = [t for t in self._threads if t is not threading.current_thread()]
                    conns = [c for c in self._clients.values() if c is not None]
                if not threads:
                    break
                elapsed = time.monotonic() - start
                if timeout is not None and elapsed >= timeout:
                    break
                if not cut and elapsed >= self.shutdown_grace:
                    for conn in conns:
                        conn.kill()
                    cut = True
                threads[0].join(0.1)
            self.export.close()
            if self.owns_image:
                self.image.close()
        finally:
            self._wake_r.close()
            self._wake_w.close()
            self._closed.set()

    def __enter__(self) -> Server:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        with self._lock:
            n = len(self._clients)
        return f"<qcow2rw.nbd.Server {self.export.name!r} of {self.image!r}: {n} client(s)>"


def _readable(socks: list[socket.socket], timeout: float | None) -> list[socket.socket]:
    """The sockets of *socks* ready to read (or accept) within *timeout* seconds (None:
    no limit).  ``poll``, not ``select``: a process with more than 1024 descriptors
    (a library user's) gets listeners that ``select`` refuses (FD_SETSIZE)."""
    poller = select.poll()
    by_fd: dict[int, socket.socket] = {}
    for sock in socks:
        poller.register(sock, select.POLLIN)
        by_fd[sock.fileno()] = sock
    events = poller.poll(None if timeout is None else int(timeout * 1000))
    return [by_fd[fd] for fd, _ in events]


def serve(image: Image, *, socket_path: str | None = None, host: str | None = None,
          port: int | None = None, sock: socket.socket | None = None,
          **options: Any) -> Server:
    """Export *image* over NBD in background threads; returns the started :class:`Server`.

    Listens on the Unix socket *socket_path*, on TCP *host*:*port*, and/or on the
    listening socket *sock*; with none of them, on TCP 127.0.0.1:10809.  Other keyword
    arguments go to :class:`Server` (and on to the export).  Stop it with
    ``server.close()`` (or use it as a context manager); the image stays open unless
    ``owns_image=True``.
    """
    server = Server(image, **options)
    try:
        if socket_path is not None:
            server.listen_unix(socket_path)
        if host is not None or port is not None:
            server.listen_tcp(host or "127.0.0.1", DEFAULT_PORT if port is None else port)
        if sock is not None:
            server.add_listener(sock)
        if not server.addresses:
            server.listen_tcp("127.0.0.1", DEFAULT_PORT)
    except BaseException:
        server.close()
        raise
    return server.start()
