"""The ``serve`` verb: ``qcow2rw serve [options] IMG``, qemu-nbd's spelling.

``add_parser(subparsers)`` registers the verb on the ``qcow2rw`` command line and
``run(args)`` is its handler; ``python -m qcow2rw.nbd [options] IMG`` runs the same
code through :func:`main`.  Options::

    -k SOCKET | -p PORT [-b ADDR]   where to listen (default TCP 127.0.0.1:10809);
                                    with LISTEN_FDS set (systemd socket activation,
                                    ``nbdinfo -- [ qcow2rw serve IMG ]``) the given fds
    -r  read-only       -e N  clients at once (default no limit; 1: no multi-conn)
    -x NAME  -D DESC    -A  offer qemu:allocation-depth
    -t  keep serving after the last client left (default: exit then, as qemu-nbd)
    --fork  return once the server is ready   --pid-file F
    --cache writeback|writethrough|directsync|none|unsafe   -U  force share (with -r)

The image is opened with QEMU-compatible locks, which it holds while serving.
SIGTERM, SIGINT and SIGHUP stop the server cleanly: requests in flight finish, the
image is flushed and closed (the dirty bit cleared).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

PROG = "qcow2rw serve"
LISTEN_FDS_START = 3


class _Parser(argparse.ArgumentParser):
    """One-line errors and exit status 1, as the rest of the ``qcow2rw`` command line."""

    def error(self, message: str) -> Any:
        sys.stderr.write(f"{PROG}: {message}\n")
        sys.exit(1)


def _configure(p: argparse.ArgumentParser) -> None:
    from qcow2rw.cli.common import add_data_file

    from .proto import CACHE_MODES
    p.add_argument("-k", "--socket", metavar="SOCKET", help="listen on this Unix socket")
    p.add_argument("-p", "--port", type=int, help="listen on this TCP port (default 10809)")
    p.add_argument("-b", "--bind", metavar="ADDR",
                   help="address to listen on with TCP (default 127.0.0.1)")
    p.add_argument("-r", "--read-only", action="store_true", help="export read-only")
    p.add_argument("-e", "--shared", type=int, default=0, metavar="N",
                   help="serve at most N clients at once (default: no limit); with 1, "
                        "multi-conn is not advertised")
    p.add_argument("-x", "--export-name", default="", metavar="NAME", help="the export's name")
    p.add_argument("-D", "--description", default="", metavar="DESC",
                   help="the export's description")
    p.add_argument("-A", "--allocation-depth", action="store_true",
                   help="offer the qemu:allocation-depth metadata context")
    p.add_argument("-t", "--persistent", action="store_true",
                   help="do not exit when the last client disconnects")
    p.add_argument("--fork", action="store_true",
                   help="fork, and return once the server is ready")
    p.add_argument("--pid-file", metavar="FILE", help="write the server's pid there")
    p.add_argument("--cache", choices=CACHE_MODES, default="writeback",
                   help="cache mode (default writeback: FLUSH and FUA make data durable)")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="open the image even if another process has it (needs -r)")
    p.add_argument("-f", "--format", dest="fmt", default="qcow2", help="image format (qcow2)")
    p.add_argument("--workers", type=int, default=8, help="I/O threads (default 8)")
    add_data_file(p)
    p.add_argument("filename", help="the qcow2 image")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``serve`` on the ``qcow2rw`` command line (``func`` is :func:`run`)."""
    p = subparsers.add_parser("serve", help="export an image over NBD",
                              description="Export a qcow2 image over NBD, like qemu-nbd.")
    _configure(p)
    p.set_defaults(func=run)
    return p


def _fail(message: str) -> int:
    sys.stderr.write(f"{PROG}: {' '.join(message.split())}\n")
    return 1


def _activation_fds() -> list[int] | None:
    """The fds passed by systemd-style socket activation, or None without it."""
    if "LISTEN_FDS" not in os.environ:
        return None
    pid = os.environ.get("LISTEN_PID")
    if pid is not None and pid != str(os.getpid()):
        return None
    try:
        count = int(os.environ["LISTEN_FDS"])
    except ValueError:
        return None
    for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    return list(range(LISTEN_FDS_START, LISTEN_FDS_START + count))


def _check(args: argparse.Namespace) -> str | None:
    """An error message for a bad combination of options, or None."""
    if args.fmt != "qcow2":
        return f"format '{args.fmt}' is not supported (qcow2 only)"
    if args.socket and (args.port is not None or args.bind):
        return "-k cannot be combined with -p or -b"
    if args.force_share and not args.read_only:
        return "--force-share (-U) needs --read-only (-r)"
    if args.shared < 0 or args.workers < 1:
        return "-e must be 0 or more, --workers 1 or more"
    if args.port is not None and not 0 <= args.port <= 65535:
        return f"bad port {args.port}"
    return None


def run(args: argparse.Namespace) -> int:
    """The ``serve`` handler: open, listen, serve until signalled or the last client
    leaves (without ``-t``); returns the exit status."""
    error = _check(args)
    if error:
        return _fail(error)
    fds = _activation_fds()
    if fds is not None and (args.socket or args.port is not None or args.bind):
        return _fail("-k, -p and -b cannot be used with socket activation (LISTEN_FDS)")
    ready_w = None
    if args.fork:
        ready_r, ready_w = os.pipe()
        if os.fork():
            os.close(ready_w)
            with os.fdopen(ready_r, "rb") as pipe:
                message = pipe.read().decode(errors="replace")
            if message == "ok":
                return 0
            return _fail(message or "the server failed to start")
        os.close(ready_r)
        os.setsid()
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s")
    try:
        server = _start(args, fds)
    except Exception as exc:  # noqa: BLE001 (any failure to start is one line and exit 1)
        message = str(exc) or type(exc).__name__
        if ready_w is not None:
            os.write(ready_w, message.encode())
            os.close(ready_w)
            os._exit(1)
        return _fail(message)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: server.request_stop())
    try:
        if args.pid_file:
            with open(args.pid_file + ".tmp", "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(args.pid_file + ".tmp", args.pid_file)
        if ready_w is not None:
            os.write(ready_w, b"ok")
            os.close(ready_w)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)  # as qemu-nbd: the caller's pipes close once we are ready
            os.close(devnull)
        server.serve_forever()
    finally:
        server.close()
        if args.pid_file:
            try:
                os.unlink(args.pid_file)
            except OSError:
                pass
    if args.fork:
        os._exit(0)
    return 0


def _start(args: argparse.Namespace, fds: list[int] | None) -> Any:
    """Open the image and listen; the :class:`~qcow2rw.nbd.server.Server`, not started."""
    import qcow2rw
    from qcow2rw.cli.common import data_file_options

    from .server import DEFAULT_PORT, Server

    image = qcow2rw.open(args.filename, readonly=args.read_only,
                         force_share=args.force_share, **data_file_options(args),
                         cache="none" if args.cache in ("none", "directsync") else "writeback")
    try:
        server = Server(image, owns_image=True, persistent=args.persistent,
                        max_connections=args.shared, name=args.export_name,
                        description=args.description, readonly=args.read_only,
                        multi_conn=args.shared != 1, allocation_depth=args.allocation_depth,
                        workers=args.workers, cache=args.cache)
    except BaseException:
        image.close()
        raise
    try:
        if fds is not None:
            for fd in fds:
                server.add_listener(socket.socket(fileno=fd))
        elif args.socket:
            server.listen_unix(args.socket)
        else:
            server.listen_tcp(args.bind or "127.0.0.1",
                              DEFAULT_PORT if args.port is None else args.port)
    except BaseException:
        server.close()
        raise
    return server


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qcow2rw.nbd [options] IMG``."""
    parser = _Parser(prog=PROG, description="Export a qcow2 image over NBD, like qemu-nbd.")
    _configure(parser)
    return run(parser.parse_args(argv))
