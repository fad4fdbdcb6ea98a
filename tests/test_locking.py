"""Image locking, both directions, with QEMU's OFD locks on bytes 100-103/200-203.

* while qcow2rw holds an image read-write, ``qemu-io`` (rw and -r) and ``qemu-img info``
  refuse it, and ``qemu-img info -U`` works;
* while ``qemu-io`` holds an image read-write (a live process fed commands through a
  pipe), ``qcow2rw.open`` raises ImageLocked (a Qcow2Error), read-only too, while
  ``open(readonly=True, force_share=True)`` works;
* read-only opens coexist (ours with ours, ours with qemu-io -r and qemu-img info);
* after close, each side can open the image again.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import textwrap
import threading

import pytest

import qcow2rw
from qcow2rw import qemutools

from helpers import qemu_create, qemu_io_run

# interop: needs qemu-img/qemu-io (the `qemu` fixture); a hang fails this test alone,
# well before the suite-wide timeout (each test normally takes a second or two)
pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]


class QemuIoHolder:
    """A live ``qemu-io`` process holding *path* open, driven through its stdin.

    qemu-io reads one command per line; it must be sent one command at a time and
    answered before the next (it does not process several buffered lines)."""

    def __init__(self, path, *extra: str):
        self.proc = subprocess.Popen([qemutools.QEMU_IO, *extra, "-f", "qcow2", str(path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def command(self, cmd: str, timeout: float = 20) -> str:
        """Send *cmd*; return its output up to the statistics line ('... ops; ...')."""
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        out = []
        while True:
            line = self.lines.get(timeout=timeout)
            if line is None:
                raise AssertionError(f"qemu-io exited (rc={self.proc.wait()}): {''.join(out)}")
            out.append(line)
            if "ops;" in line or "failed" in line.lower():
                return "".join(out)

    def __enter__(self):
        # once this read is answered, the image is open and the locks are held
        out = self.command("read 0 512")
        assert "read 512/512" in out, out
        return self

    def __exit__(self, *exc):
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def _qemu_io_fails(qemu, path, *extra: str) -> tuple[bool, str]:
    proc = qemu.run(qemu.QEMU_IO, *extra, "-f", "qcow2", "-c", "read 0 512", str(path),
                    check=False)
    text = proc.stdout + proc.stderr
    failed = proc.returncode != 0 or "Failed to get" in text or "read 512/512" not in text
    return failed, text


@pytest.fixture
def image(qemu, tmp_path):
    path = tmp_path / "locked.qcow2"
    qemu_create(qemu, path, 4 * 1024 * 1024)
    qemu_io_run(qemu, path, "write -P 0x5a 0 65536")
    return path


def test_ours_readwrite_blocks_qemu(qemu, image):
    with qcow2rw.open(str(image)) as img:
        img.write(0, b"\x11" * 512)
        failed, text = _qemu_io_fails(qemu, image)
        assert failed, f"qemu-io (rw) opened an image qcow2rw holds read-write:\n{text}"
        assert "Failed to get" in text, text
        failed, text = _qemu_io_fails(qemu, image, "-r")
        assert failed, f"qemu-io -r opened an image qcow2rw holds read-write:\n{text}"
        proc = qemu.qemu_img("info", "--output=json", str(image), check=False)
        assert proc.returncode != 0, f"qemu-img info got past our lock: {proc.stdout}"
        assert "Failed to get" in proc.stderr, proc.stderr
        # -U (force share) takes no lock and works
        assert qemu.info(str(image), force_share=True)["virtual-size"] == 4 * 1024 * 1024
        proc = qemu.qemu_img("check", str(image), check=False)
        assert proc.returncode == 1 and "Failed to get" in proc.stderr, (proc.returncode,
                                                                         proc.stderr)
    # released on close
    failed, text = _qemu_io_fails(qemu, image)
    assert not failed, f"qemu-io cannot open the image after qcow2rw closed it:\n{text}"
    qemu_io_run(qemu, image, "read -P 0x11 0 512", "read -P 0x5a 512 65024")


def test_qemu_blocks_ours(qemu, image):
    with QemuIoHolder(image):
        with pytest.raises(qcow2rw.ImageLocked) as excinfo:
            qcow2rw.open(str(image))
        assert isinstance(excinfo.value, qcow2rw.Qcow2Error)
        assert str(excinfo.value), "ImageLocked should say what is wrong"
        # force_share: no lock taken, reads work
        with qcow2rw.open(str(image), readonly=True, force_share=True) as ro:
            assert ro.read(0, 65536) == b"\x5a" * 65536
    # qemu-io has quit: read-write open works again
    with qcow2rw.open(str(image)) as img:
        img.write(100, b"ok")
    qemu_io_run(qemu, image, "read -P 0x5a 0 100", "read -P 0x6f 100 1", "read -P 0x6b 101 1")


def test_qemu_writer_blocks_our_readonly_open(qemu, image):
    """Like ``qemu-io -r`` against a writer: a read-only open without force_share needs
    the writer to share 'write', which a QEMU writer does not."""
    with QemuIoHolder(image):
        with pytest.raises(qcow2rw.ImageLocked):
            qcow2rw.open(str(image), readonly=True)


def test_qemu_reader_allows_our_readonly_but_not_readwrite(qemu, image):
    with QemuIoHolder(image, "-r"):
        with qcow2rw.open(str(image), readonly=True) as ro:
            assert ro.read(0, 512) == b"\x5a" * 512
        # qemu-io -r does not share 'write': we cannot open for writing
        with pytest.raises(qcow2rw.ImageLocked):
            qcow2rw.open(str(image))


def test_readonly_opens_coexist(qemu, image):
    with qcow2rw.open(str(image), readonly=True) as a, \
            qcow2rw.open(str(image), readonly=True) as b:
        assert a.read(0, 4096) == b.read(0, 4096) == b"\x5a" * 4096
        # QEMU readers get in too, and qemu-img info
        failed, text = _qemu_io_fails(qemu, image, "-r")
        assert not failed, text
        assert qemu.info(str(image))["format"] == "qcow2"
        # but a QEMU writer does not
        failed, text = _qemu_io_fails(qemu, image)
        assert failed, f"qemu-io (rw) opened an image qcow2rw holds read-only:\n{text}"
    failed, text = _qemu_io_fails(qemu, image)
    assert not failed, text


def test_ours_readwrite_in_another_process_blocks_ours(qemu, image, tmp_path):
    """Two qcow2rw processes: the second read-write open raises ImageLocked."""
    script = textwrap.dedent(f"""
        import sys, qcow2rw
        img = qcow2rw.open({str(image)!r})
        print("held", flush=True)
        sys.stdin.readline()
        img.close()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(tmp_path),
                            env={**os.environ,
                                 "PYTHONPATH": ":".join(p for p in sys.path if p)})
    try:
        line = proc.stdout.readline()
        assert line.strip() == "held", proc.stderr.read() if proc.poll() is not None else line
        with pytest.raises(qcow2rw.ImageLocked):
            qcow2rw.open(str(image))
    finally:
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=30)
    with qcow2rw.open(str(image)) as img:
        assert img.read(0, 2) == b"\x5a\x5a"
