"""A fuzzer over recorded client traffic (as nbdkit's ``server/fuzzer.c`` does).

Real clients (``nbdinfo --map``, ``nbdinfo --list``, ``qemu-io`` writing with FUA,
``nbdcopy``, ``qemu-img compare``) talk to the server through a recording proxy; what
each client sent becomes a seed.  Hypothesis then mutates the seeds (byte flips,
overwrites of 4-byte fields with boundary values, truncation, splices of two seeds)
and replays them on a fresh connection, closing its sending side at the end.  For
every input the server must answer or close the connection within a few seconds
(never hang), must not crash, and must keep serving a well-behaved client; at the
end no thread is left behind.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbd_helpers import (  # noqa: F401
    RawClient,
    connection_threads,
    lib_server,
    nbd_tools,
    run,
    unix_uri,
)

import qcow2rw
from qcow2rw.nbd import proto as P

MiB = 1024 * 1024
SIZE = 16 * MiB
pytestmark = pytest.mark.usefixtures("nbd_tools")


class RecordingProxy:
    """Listen on *path*; forward each client to *target*, recording what it sent."""

    def __init__(self, path: str, target: str) -> None:
        self.target = target
        self.records: list[bytearray] = []
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        self.listener.listen(16)
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX)
            server.connect(self.target)
            record = bytearray()
            self.records.append(record)
            for src, dst, rec in ((client, server, record), (server, client, None)):
                t = threading.Thread(target=self._pump, args=(src, dst, rec), daemon=True)
                t.start()
                self.threads.append(t)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        try:
            while data := src.recv(1 << 20):
                if record is not None:
                    record += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (dst, src):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> list[bytes]:
        self.listener.close()
        for t in self.threads:
            t.join(10)
        return [bytes(r[:256 * 1024]) for r in self.records if r]


@pytest.fixture(scope="module")
def fuzz_setup(tmp_path_factory):
    """A served image, and the traffic of real clients recorded against it."""
    tmp = tmp_path_factory.mktemp("fuzz")
    path = tmp / "f.qcow2"
    with qcow2rw.create(path, SIZE) as img:
        img.write(0, b"\x11" * 65536)
        img.write(5 * MiB, os.urandom(3 * 65536))
    src = tmp / "src.raw"
    src.write_bytes(os.urandom(2 * MiB) + bytes(MiB))
    with lib_server(path, tmp / "s", allocation_depth=True) as server:
        proxy = RecordingProxy(str(tmp / "p"), str(tmp / "s"))
        uri = unix_uri(tmp / "p")
        run("nbdinfo", "--map", uri)
        run("nbdinfo", "--map=qemu:allocation-depth", uri)
        run("nbdinfo", "--list", uri)
        run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "write -z 2M 1M",
            "-c", "discard 4M 1M", "-c", "read 0 100k", "-c", "flush", uri)
        run("nbdcopy", "-C", "1", str(src), uri)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri, check=False)
        seeds = proxy.close()
        assert len(seeds) >= 6
        yield server, seeds


def replay(path: str, data: bytes, timeout: float = 10) -> None:
    """Send *data*, half-close, read until the server closes: it must, within *timeout*."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(path)
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server already dropped us: fine
        deadline = time.monotonic() + timeout
        while True:
            try:
                if not s.recv(1 << 20):
                    return
            except ConnectionResetError:
                return
            except TimeoutError:
                raise AssertionError("the server neither answered nor closed") from None
            if time.monotonic() > deadline:
                raise AssertionError("the server kept the connection open")
    finally:
        s.close()


BOUNDARY = [0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, SIZE, SIZE - 1, 32 * MiB, 32 * MiB + 1,
            4096, 0x49484156, 0x25609513]


@st.composite
def mutated(draw, seeds):
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        kind = draw(st.integers(0, 3))
        pos = draw(st.integers(0, len(data) - 1))
        if kind == 0:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == 1:
            data[pos:pos + 4] = struct.pack(">I", draw(st.sampled_from(BOUNDARY)))
        elif kind == 2:
            del data[pos:]
        else:
            other = draw(st.sampled_from(seeds))
            start = draw(st.integers(0, max(0, len(other) - 1)))
            data[pos:pos] = other[start:start + draw(st.integers(1, 256))]
    return bytes(data)


def test_fuzz_recorded_traffic(fuzz_setup):
    fuzz(fuzz_setup, int(os.environ.get("NBD_FUZZ_EXAMPLES", "150")))


@pytest.mark.soak
def test_fuzz_recorded_traffic_soak(fuzz_setup):
    fuzz(fuzz_setup, 20000)


def fuzz(fuzz_setup, examples):
    server, seeds = fuzz_setup
    path = server.addresses[0]
    for seed in seeds:  # unmodified first: real traffic replays cleanly
        replay(path, seed)

    @settings(max_examples=examples, deadline=None,
              suppress_health_check=list(HealthCheck), database=None)
    @given(mutated(seeds))
    def one(data: bytes) -> None:
        replay(path, data)

    one()
    deadline = time.monotonic() + 10
    while connection_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not connection_threads()
    # The fuzzed writes changed the image: it must be consistent (flushed, then checked
    # while still open), and the server must still speak the protocol.
    server.image.flush()
    check = subprocess.run(["qemu-img", "check", "-U", server.image.path],
                           capture_output=True, text=True, check=False)
    assert check.returncode in (0, 3), check.stdout + check.stderr
    c = RawClient(path)
    c.greeting()
    assert c.go()[0] == SIZE
    c.request(P.CMD_READ, 0, 4096, cookie=5)
    assert c.structured_reply()[-1][1] == 5
    c.close()
