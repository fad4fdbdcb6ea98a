"""Helpers of the NBD tests: the clients (libnbd's tools, qemu-nbd), servers to test.

The clients are real: ``nbdinfo``, ``nbdcopy``, ``nbdsh`` (libnbd-bin), ``qemu-img``,
``qemu-io``, ``qemu-nbd``.  The ``nbd_tools`` fixture skips a test when libnbd's tools
are missing on a developer's machine and fails it under ``CI=true`` (``.ci/run``
installs them), as the ``qemu`` fixture does for QEMU's tools.

Servers: :func:`serve_process` runs ``qcow2rw serve`` (or ``python -m qcow2rw.nbd``
until the verb is wired into the command line) as a child process; :func:`lib_server`
runs the library's :func:`qcow2rw.nbd.serve` in this process.  :class:`RawClient` is a
minimal hand-written client used only to send malformed traffic (robustness tests).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

import qcow2rw
import qcow2rw.nbd
from qcow2rw.nbd import proto as P

NBD_TOOLS = ("nbdinfo", "nbdcopy", "nbdsh")
REPO = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=1)
def nbdsh_argv() -> tuple[str, ...] | None:
    """How to run ``nbdsh``: it is ``python3 -m nbd``, and the ``python3`` on PATH may be
    a Python (a venv, pyenv) without libnbd's bindings; run it with one that has them."""
    nbdsh = shutil.which("nbdsh")
    if nbdsh is None:
        return None
    for python in ("/usr/bin/python3", shutil.which("python3"), sys.executable):
        if python and subprocess.run([python, "-c", "import nbd"], capture_output=True,
                                     check=False).returncode == 0:
            return (python, "-m", "nbd")
    return None


@pytest.fixture(scope="session")
def nbd_tools() -> None:
    """libnbd's tools and QEMU's (qemu-img, qemu-io, qemu-nbd): skip, or fail under CI."""
    missing = [t for t in (*NBD_TOOLS, "qemu-img", "qemu-io", "qemu-nbd") if shutil.which(t) is None]
    if "nbdsh" not in missing and nbdsh_argv() is None:
        missing.append("libnbd's Python bindings (python3-libnbd, for nbdsh)")
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{', '.join(missing)} not found, and CI=true: the NBD tests must run "
                        "in CI (.ci/run installs libnbd-bin and qemu-utils)")
        pytest.skip(f"{', '.join(missing)} not installed")


@lru_cache(maxsize=1)
def serve_argv() -> tuple[str, ...]:
    """``python -m qcow2rw serve`` once the verb exists, else ``python -m qcow2rw.nbd``."""
    probe = subprocess.run([sys.executable, "-m", "qcow2rw", "serve", "--help"], cwd=REPO,
                           capture_output=True, text=True, timeout=60, check=False)
    if probe.returncode == 0 and "--socket" in probe.stdout:
        return (sys.executable, "-m", "qcow2rw", "serve")
    return (sys.executable, "-m", "qcow2rw.nbd")


def with_limits(argv: list[str] | tuple[str, ...], *, nofile: int | None = None,
                fsize: int | None = None) -> list[str]:
    """*argv* run under resource limits (set by a small Python that then execs it, since
    ``preexec_fn`` is unsafe in a threaded test process): *nofile* file descriptors,
    files of at most *fsize* bytes (SIGXFSZ ignored, so a write past it fails EFBIG)."""
    code = ("import os, resource, signal, sys\n"
            f"nofile, fsize = {nofile!r}, {fsize!r}\n"
            "if nofile is not None:\n"
            "    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))\n"
            "if fsize is not None:\n"
            "    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))\n"
            "os.execv(sys.argv[1], sys.argv[1:])\n")
    return [sys.executable, "-c", code, *argv]


def unix_uri(path: str | os.PathLike[str], name: str = "") -> str:
    return f"nbd+unix:///{name}?socket={os.fspath(path)}"


def wait_for_socket(path: str | os.PathLike[str], proc: subprocess.Popen[Any] | None = None,
                    timeout: float = 30) -> None:
    """Wait until a server listens on the Unix socket *path*."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(os.fspath(path))
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.02)
    raise AssertionError(f"no server on {path} after {timeout} s")


@contextmanager
def serve_process(image: str | os.PathLike[str], sock: str | os.PathLike[str], *args: str,
                  stop: str = "term") -> Iterator[subprocess.Popen[str]]:
    """Run ``qcow2rw serve -k SOCK -t ARGS IMAGE``; on exit stop it (*stop*: "term" sends
    SIGTERM and checks a clean exit, "none" leaves it to the test)."""
    argv = [*serve_argv(), "-k", os.fspath(sock), "-t", *args, os.fspath(image)]
    proc = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(sock, proc)
        yield proc
        if stop == "term" and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


@contextmanager
def qemu_nbd(image: str | os.PathLike[str], sock: str | os.PathLike[str], *args: str,
             fmt: str = "qcow2") -> Iterator[subprocess.Popen[bytes]]:
    """``qemu-nbd -k SOCK -f FMT -t ARGS IMAGE`` for the duration of the block."""
    proc = subprocess.Popen(["qemu-nbd", "-k", os.fspath(sock), "-f", fmt, "-t", *args,
                             os.fspath(image)], stderr=subprocess.PIPE)
    try:
        wait_for_socket(sock, None)
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stderr:
            proc.stderr.close()


@contextmanager
def lib_server(path: str | os.PathLike[str], sock: str | os.PathLike[str],
               readonly: bool = False, **options: Any) -> Iterator[qcow2rw.nbd.Server]:
    """The library's server, in this process, over the image at *path*."""
    img = qcow2rw.open(path, readonly=readonly)
    try:
        server = qcow2rw.nbd.serve(img, socket_path=os.fspath(sock), readonly=readonly,
                                   **options)
        try:
            yield server
        finally:
            server.close()
    finally:
        img.close()


def run(*argv: str, timeout: float = 120, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def nbdinfo_json(uri: str, *extra: str) -> Any:
    return json.loads(run("nbdinfo", "--json", *extra, uri).stdout)


def nbd_map(uri: str, context: str = "base:allocation") -> list[tuple[int, int, int]]:
    """``nbdinfo --map=CONTEXT --json`` as merged ``(offset, length, type)`` runs."""
    extents = json.loads(run("nbdinfo", f"--map={context}", "--json", uri).stdout)
    out: list[tuple[int, int, int]] = []
    for e in extents:
        if out and out[-1][2] == e["type"] and out[-1][0] + out[-1][1] == e["offset"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], e["type"])
        else:
            out.append((e["offset"], e["length"], e["type"]))
    return out


def nbdsh(uri: str, script: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a Python *script* in ``nbdsh`` (libnbd's Python bindings), connected to
    *uri* as ``h``; the ``URI`` variable holds *uri* (for more connections)."""
    prelude = f"URI = {uri!r}\n"
    argv = nbdsh_argv()
    assert argv is not None
    return run(*argv, "-u", uri, "-c", prelude + script, check=check)


# --------------------------------------------------------------------------- raw client
class RawClient:
    """A minimal NBD client over a Unix socket (a path) or TCP (a (host, port) pair),
    for malformed or oddly timed traffic only."""

    def __init__(self, address: str | os.PathLike[str] | tuple[str, int],
                 timeout: float = 10) -> None:
        if isinstance(address, tuple):
            self.sock = socket.create_connection(address, timeout=timeout)
        else:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(timeout)
            self.sock.connect(os.fspath(address))

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            if not part:
                raise EOFError(f"closed after {len(buf)} of {n} bytes")
            buf += part
        return buf

    def greeting(self, flags: int = P.CLIENT_FLAG_FIXED_NEWSTYLE | P.CLIENT_FLAG_NO_ZEROES) -> int:
        magic, opt, hflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (P.NBDMAGIC, P.IHAVEOPT)
        self.sock.sendall(struct.pack(">I", flags))
        return hflags

    def option(self, option: int, data: bytes = b"", length: int | None = None) -> None:
        self.sock.sendall(struct.pack(">QII", P.IHAVEOPT, option,
                                      len(data) if length is None else length) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, rtype, length = struct.unpack(">QIII", self.recv(20))
        assert magic == P.REPLY_MAGIC
        return option, rtype, self.recv(length)

    def replies_until_final(self) -> list[tuple[int, bytes]]:
        out = []
        while True:
            _, rtype, data = self.option_reply()
            out.append((rtype, data))
            if rtype == P.REP_ACK or rtype & P.REP_FLAG_ERROR:
                return out

    def go(self, name: str = "", structured: bool = True) -> tuple[int, int]:
        """STRUCTURED_REPLY (optional) then GO: (size, transmission flags)."""
        if structured:
            self.option(P.OPT_STRUCTURED_REPLY)
            assert self.option_reply()[1] == P.REP_ACK
        nb = name.encode()
        self.option(P.OPT_GO, struct.pack(">I", len(nb)) + nb + struct.pack(">H", 0))
        size = flags = 0
        for rtype, data in self.replies_until_final():
            assert rtype in (P.REP_INFO, P.REP_ACK), hex(rtype)
            if rtype == P.REP_INFO and struct.unpack(">H", data[:2])[0] == P.INFO_EXPORT:
                _, size, flags = struct.unpack(">HQH", data)
        return size, flags

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                cookie: int = 1, payload: bytes = b"") -> None:
        self.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, flags, cmd, cookie, offset, length)
                          + payload)

    def simple_reply(self, length: int = 0) -> tuple[int, int, bytes]:
        magic, error, cookie = P.SIMPLE_REPLY.unpack(self.recv(16))
        assert magic == P.SIMPLE_REPLY_MAGIC
        return error, cookie, self.recv(length) if not error else b""

    def structured_reply(self) -> list[tuple[int, int, bytes]]:
        """Chunks ``(type, cookie, payload)`` up to and including the DONE one."""
        chunks = []
        while True:
            magic, flags, rtype, cookie, length = P.CHUNK.unpack(self.recv(20))
            assert magic == P.STRUCTURED_REPLY_MAGIC
            chunks.append((rtype, cookie, self.recv(length)))
            if flags & P.REPLY_FLAG_DONE:
                return chunks

    def error_of(self, chunks: list[tuple[int, int, bytes]]) -> int:
        for rtype, _, data in chunks:
            if rtype == P.REPLY_TYPE_ERROR:
                return int(struct.unpack(">I", data[:4])[0])
        return 0

    def close(self) -> None:
        self.sock.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def connection_threads() -> list[str]:
    """Names of the server's per-connection threads (reader, writer) alive now; the
    shared pools' threads (started lazily, kept for the server's life) are not counted."""
    import threading
    return [t.name for t in threading.enumerate()
            if t.name.startswith(("qcow2rw-nbd ", "qcow2rw-nbd-writer"))]
