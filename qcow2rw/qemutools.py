"""Thin wrappers around QEMU's command-line tools (``qemu-img``, ``qemu-io``).

Used by the test suite, the ``tools/`` scripts and the CLI's ``demo`` and ``bench``.
The binaries can be overridden with the environment variables ``QEMU_IMG`` and
``QEMU_IO``.  JSON output is parsed, never compared as text.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
QEMU_IO = os.environ.get("QEMU_IO", "qemu-io")


def available() -> bool:
    """True when both qemu-img and qemu-io can be found."""
    return shutil.which(QEMU_IMG) is not None and shutil.which(QEMU_IO) is not None


def run(tool: str, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``tool args...``; raise ``CalledProcessError`` on a non-zero exit if *check*."""
    proc = subprocess.run([tool, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


def qemu_img(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``qemu-img args...``."""
    return run(QEMU_IMG, *args, check=check, timeout=timeout)


def qemu_io(path: str, *commands: str, fmt: str = "qcow2", readonly: bool = False,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``qemu-io -f FMT [-r] -c CMD ... PATH``.

    qemu-io exits 0 even when a command fails, so its output is scanned for the
    failure markers it prints and ``CalledProcessError`` is raised on them when *check*.
    """
    args = ["-f", fmt]
    if readonly:
        args.append("-r")
    for command in commands:
        args += ["-c", command]
    proc = run(QEMU_IO, *args, path, check=check)
    if check and ("Pattern verification failed" in proc.stdout or "failed:" in proc.stdout
                  or "failed:" in proc.stderr):
        raise subprocess.CalledProcessError(1, proc.args, proc.stdout, proc.stderr)
    return proc


def info(path: str, *, backing_chain: bool = False, force_share: bool = False) -> dict[str, Any]:
    """``qemu-img info --output=json`` parsed."""
    args = ["info", "--output=json"]
    if backing_chain:
        args.append("--backing-chain")
    if force_share:
        args.append("-U")
    return json.loads(qemu_img(*args, path).stdout)


def check(path: str, *, repair: str | None = None) -> tuple[int, dict[str, Any]]:
    """``qemu-img check --output=json``: (exit code, parsed JSON or {} when none was printed)."""
    args = ["check", "--output=json"]
    if repair:
        args += ["-r", repair]
    proc = qemu_img(*args, path, check=False)
    try:
        data = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        data = {}
    data.setdefault("_stderr", proc.stderr)
    return proc.returncode, data


def map_json(path: str, fmt: str = "qcow2") -> list[dict[str, Any]]:
    """``qemu-img map --output=json`` parsed."""
    return json.loads(qemu_img("map", "-f", fmt, "--output=json", path).stdout)


def convert_to_raw(src: str, dst: str, fmt: str = "qcow2") -> None:
    """``qemu-img convert -f FMT -O raw SRC DST``."""
    qemu_img("convert", "-f", fmt, "-O", "raw", src, dst)
