"""``qcow2rw bench``: qemu-img bench's options, offsets and output (never its speed).

Nothing here times anything: the figures belong to ``tools/bench_compare.py``.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from qcow2rw import cli
from qcow2rw.devkit.bench import BenchError, random_offsets, sequential_offsets

MiB = 1 << 20
RUN_LINE = re.compile(r"^Run completed in [0-9]+\.[0-9]{3} seconds\.$")


def test_sequential_offsets_follow_qemu_img_7_2() -> None:
    """First at -o, then += step modulo the image size; past the end is a failed request."""
    assert sequential_offsets(5, 4096, 4096, 0, 16384) == [0, 4096, 8192, 12288, 0]
    assert sequential_offsets(3, 4096, 8192, 4096, 16384) == [4096, 12288, 4096]
    assert sequential_offsets(6, 512, 512, 1024, 2048) == [1024, 1536, 0, 512, 1024, 1536]
    with pytest.raises(BenchError, match="Failed request"):
        sequential_offsets(3, 4096, 4096, 10000, 16384)


def test_random_offsets_are_aligned_and_reproducible() -> None:
    offsets = random_offsets(100, 65536, 8 * MiB, seed=3)
    assert offsets == random_offsets(100, 65536, 8 * MiB, seed=3)
    assert all(o % 65536 == 0 and o + 65536 <= 8 * MiB for o in offsets)


@pytest.fixture
def full_image(qemu: Any, tmp_path: Any) -> str:
    """An 8 MiB qcow2 image, every cluster written with 0xab by qemu-io."""
    path = str(tmp_path / "full.qcow2")
    qemu.qemu_img("create", "-q", "-f", "qcow2", path, str(8 * MiB))
    qemu.qemu_io(path, f"write -P 0xab 0 {8 * MiB}")
    return path


@pytest.mark.interop
@pytest.mark.parametrize("lock_mode", ["mutex", "rwlock", "fine"])
def test_bench_prints_qemu_img_lines(full_image: str, qemu: Any, capsys: Any,
                                     lock_mode: str) -> None:
    """The first line is qemu-img bench's, word for word; the second its timing line."""
    args = ["-c", "300", "-d", "8", "-s", "4k", "-S", "8k", "-o", "512"]
    status = cli.main(["bench", *args, "--lock-mode", lock_mode, "--workers", "2", full_image])
    out = capsys.readouterr().out.splitlines()
    assert status == 0
    theirs = qemu.qemu_img("bench", *args, full_image).stdout.splitlines()
    assert out[0] == theirs[0]
    assert RUN_LINE.match(out[1]) and RUN_LINE.match(theirs[1])


@pytest.mark.interop
def test_bench_write_stores_the_pattern(full_image: str, qemu: Any, capsys: Any) -> None:
    """-w writes the --pattern byte at the offsets qemu-img bench would, wrapping."""
    status = cli.main(["bench", "-w", "-c", "200", "-d", "16", "-s", "64k", "--pattern",
                       "0x5a", "-o", "1M", full_image])
    out = capsys.readouterr().out
    assert status == 0
    assert out.startswith("Sending 200 write requests, 65536 bytes each, 16 in parallel "
                          "(starting at offset 1048576, step size 65536)\n")
    # 200 x 64 KiB from 1 MiB wraps once around the 8 MiB disk: every byte is 0x5a now.
    qemu.qemu_io(full_image, f"read -P 0x5a 0 {8 * MiB}")
    rc, data = qemu.check(full_image)
    assert rc == 0 and not data.get("leaks"), data


@pytest.mark.interop
def test_bench_flush_interval(full_image: str, qemu: Any, capsys: Any) -> None:
    status = cli.main(["bench", "-w", "-c", "64", "-d", "4", "--flush-interval", "16",
                       "--pattern", "7", full_image])
    assert status == 0, capsys.readouterr().err
    qemu.qemu_io(full_image, "read -P 7 0 256k")


@pytest.mark.interop
def test_bench_cache_none_runs_with_o_direct(full_image: str, capsys: Any, qemu: Any,
                                             monkeypatch: Any) -> None:
    import qcow2rw
    real_open = qcow2rw.open
    opened: list[Any] = []

    def spy(*args: Any, **kwargs: Any) -> Any:  # the real open, remembered
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(qcow2rw, "open", spy)
    status = cli.main(["bench", "-t", "none", "-w", "--pattern", "9", "-c", "64", "-s", "3000",
                       full_image])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "Run completed" in captured.out and not captured.err
    assert opened and opened[0].state.file.direct is not None  # O_DIRECT, really
    qemu.qemu_io(full_image, "read -P 9 0 192000")
    assert cli.main(["bench", "-t", "none", "-c", "64", "-s", "3000", full_image]) == 0


@pytest.mark.interop
@pytest.mark.parametrize("args, message", [
    (["-t", "bogus"], "Invalid cache mode"),
    (["-t", "unsafe"], "not supported"),
    (["-d", "0"], "Invalid queue depth"),
    (["-c", "x"], "Invalid request count"),
    (["-s", "4q"], "Invalid buffer size"),
    (["--pattern", "300", "-w"], "Invalid pattern byte"),
    (["-f", "raw"], "Unknown file format"),
    (["-i", "io_uring"], "not supported"),
    (["-o", str(8 * MiB)], "Failed request"),
    (["--flush-interval", "4", "-d", "8", "-w"], "smaller than depth"),
    (["--flush-interval", "64"], "only available in write tests"),
    (["--no-drain"], "requires --flush-interval"),
])
def test_bench_errors(full_image: str, capsys: Any, args: list[str], message: str) -> None:
    """Bad options and failed requests: one line on stderr, exit status 1."""
    status = cli.main(["bench", "-c", "10", *args, full_image])
    err = capsys.readouterr().err
    assert status == 1
    assert message in err, err
