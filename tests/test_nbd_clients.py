"""``qcow2rw serve`` against real NBD clients: nbdinfo, nbdcopy, nbdsh, qemu-img, qemu-io.

Each test is one item of the issue's test list; the clients are the real tools, and
the reference for maps is ``qemu-nbd`` on the same file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest
from nbd_helpers import (  # noqa: F401
    REPO,
    lib_server,
    nbd_map,
    nbd_tools,
    nbdinfo_json,
    nbdsh,
    qemu_nbd,
    run,
    serve_argv,
    serve_process,
    unix_uri,
    wait_for_socket,
    with_limits,
)

import qcow2rw

MiB = 1024 * 1024
pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("nbd_tools")]


def qio(path, *cmds, fmt="qcow2", extra=()):
    args = ["qemu-io", "-f", fmt, *extra]
    for c in cmds:
        args += ["-c", c]
    proc = run(*args, str(path))
    assert "failed" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "Pattern verification failed" not in proc.stdout
    return proc


def make_mixed(tmp_path, name="mixed.qcow2", size=64 * MiB, backing=None, backing_fmt="qcow2"):
    """An image with data, zero clusters (plain and allocated), a discard, a compressed
    cluster, and unallocated space."""
    path = tmp_path / name
    args = ["qemu-img", "create", "-f", "qcow2", "-q"]
    if backing:
        args += ["-b", str(backing), "-F", backing_fmt]
    run(*args, str(path), str(size))
    qio(path, "write -P 0x11 0 1M", "write -P 0x22 3M 192k", "write -z 5M 1M",
        "write -P 0x33 8M 256k", "write -z 8M 64k", "discard 8320k 64k",
        "write -c -P 0x44 12M 64k", "write -P 0x55 20M 64k")
    return path


def check_clean(path):
    out = run("qemu-img", "check", "--output=json", str(path), check=False)
    assert out.returncode == 0, out.stdout + out.stderr


# 1. nbdinfo ----------------------------------------------------------------------------
def test_nbdinfo_shows_export(tmp_path):
    img = make_mixed(tmp_path)
    sock = tmp_path / "s"
    with serve_process(img, sock, "-x", "disk", "-D", "a test disk"):
        info = nbdinfo_json(unix_uri(sock, "disk"))
        export = info["exports"][0]
        assert export["export-size"] == 64 * MiB
        for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
                     "can_multi_conn", "can_df", "can_cache"):
            assert export[flag] is True, flag
        assert export["is_read_only"] is False
        assert export["block_size_minimum"] == 1
        assert export["block_size_preferred"] == 65536
        assert export["block_size_maximum"] == 32 * MiB
        assert "base:allocation" in export["contexts"]
        listed = nbdinfo_json(unix_uri(sock), "--list")
        assert [(e["export-name"], e.get("description")) for e in listed["exports"]] == \
            [("disk", "a test disk")]


def test_nbdinfo_socket_activation(tmp_path):
    img = make_mixed(tmp_path)
    out = run("nbdinfo", "--json", "--", "[", *serve_argv(), str(img), "]")
    import json
    assert json.loads(out.stdout)["exports"][0]["export-size"] == 64 * MiB
    check_clean(img)  # the server exited cleanly: dirty bit clear, no leak


def test_shared_1_no_multi_conn_and_readonly_flags(tmp_path):
    img = make_mixed(tmp_path)
    sock = tmp_path / "s"
    with serve_process(img, sock, "-e", "1", "-r"):
        export = nbdinfo_json(unix_uri(sock))["exports"][0]
        assert export["can_multi_conn"] is False
        assert export["is_read_only"] is True
        assert export["can_trim"] is False and export["can_zero"] is False


# 2. maps against qemu-nbd -----------------------------------------------------------------
def maps_of(uri, depth):
    maps = {"base": nbd_map(uri)}
    if depth:
        maps["depth"] = nbd_map(uri, "qemu:allocation-depth")
    return maps


@pytest.mark.parametrize("chain", ["single", "backing", "raw-backing"])
def test_map_equals_qemu_nbd(tmp_path, chain):
    base = None
    if chain == "backing":
        base = tmp_path / "base.qcow2"
        run("qemu-img", "create", "-f", "qcow2", "-q", str(base), "48M")
        qio(base, "write -P 0x66 0 4M", "write -P 0x77 30M 2M", "write -z 40M 1M")
    elif chain == "raw-backing":
        base = tmp_path / "base.raw"
        with open(base, "wb") as f:  # data, a hole, data, a hole to the end (40 MiB)
            f.write(b"\x66" * 4 * MiB)
            f.seek(30 * MiB)
            f.write(b"\x77" * 2 * MiB)
            f.truncate(40 * MiB)
    img = make_mixed(tmp_path, backing=base, backing_fmt="raw" if chain == "raw-backing" else "qcow2")
    assert_maps_like_qemu_nbd(tmp_path, img)


def assert_maps_like_qemu_nbd(tmp_path, img):
    """Both metadata contexts of *img* exported read-only by us and by qemu-nbd agree."""
    ours_sock, theirs_sock = tmp_path / "ours", tmp_path / "theirs"
    with serve_process(img, ours_sock, "-r", "-A"):
        ours = maps_of(unix_uri(ours_sock), True)
    with qemu_nbd(img, theirs_sock, "-r", "-A"):
        theirs = maps_of(unix_uri(theirs_sock), True)
    assert ours == theirs


# 3. qemu-img compare / convert ------------------------------------------------------------
def test_qemu_img_compare_and_convert(tmp_path):
    img = make_mixed(tmp_path)
    raw = tmp_path / "copy.raw"
    run("qemu-img", "convert", "-O", "raw", str(img), str(raw))
    sock = tmp_path / "s"
    with serve_process(img, sock, "-r"):
        uri = unix_uri(sock)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(raw), uri)
        run("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", str(img), uri)
        out = tmp_path / "out.qcow2"
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, str(out))
    run("qemu-img", "compare", str(out), str(img))
    # sparse: only the data extents were copied (~1.6 MiB of data in a 64 MiB disk)
    assert os.stat(out).st_blocks * 512 < 4 * MiB


# 4. nbdcopy ---------------------------------------------------------------------------------
def test_nbdcopy_read_exact_and_sparse(tmp_path):
    img = make_mixed(tmp_path)
    ref = tmp_path / "ref.raw"
    run("qemu-img", "convert", "-O", "raw", str(img), str(ref))
    sock = tmp_path / "s"
    with serve_process(img, sock, "-r"):
        for i, opts in enumerate(([], ["-C", "4", "-T", "4"])):
            out = tmp_path / f"out{i}.raw"
            run("nbdcopy", *opts, unix_uri(sock), str(out))
            assert out.read_bytes() == ref.read_bytes()
            assert os.stat(out).st_blocks * 512 < 4 * MiB


@pytest.mark.parametrize("mode", ["flush", "sigterm"])
def test_nbdcopy_write_then_stop(tmp_path, mode):
    src = tmp_path / "src.raw"
    data = bytearray(os.urandom(24 * MiB))
    data[4 * MiB:9 * MiB] = bytes(5 * MiB)  # a zero run: nbdcopy sends WRITE_ZEROES
    src.write_bytes(bytes(data))
    img = tmp_path / "dst.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-q", str(img), str(24 * MiB))
    sock = tmp_path / "s"
    with serve_process(img, sock):
        opts = ["--flush", "-C", "4", "-T", "4"] if mode == "flush" else []
        run("nbdcopy", *opts, str(src), unix_uri(sock))
    check_clean(img)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src), str(img))


# 5. qemu-io over the URI -----------------------------------------------------------------
@pytest.mark.parametrize("cache", [[], ["-t", "writeback"]], ids=["writethrough", "writeback"])
def test_qemu_io_over_uri(tmp_path, cache):
    img = make_mixed(tmp_path)
    sock = tmp_path / "s"
    with serve_process(img, sock):
        qio(unix_uri(sock), "write -P 0x5a 1M 64k", "write -z 2M 1M", "discard 4M 1M",
            "write -P 0x5b 30M 100k", "flush", fmt="raw", extra=cache)
    check_clean(img)
    qio(img, "read -P 0x5a 1M 64k", "read -P 0 2M 1M", "read -P 0 4M 1M",
        "read -P 0x5b 30M 100k", "read -P 0x11 0 1M")


def test_qemu_img_convert_into_uri(tmp_path):
    src = make_mixed(tmp_path, "src.qcow2")
    img = tmp_path / "dst.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-q", str(img), str(64 * MiB))
    sock = tmp_path / "s"
    with serve_process(img, sock):
        run("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(src), unix_uri(sock))
    check_clean(img)
    run("qemu-img", "compare", str(src), str(img))


# 6. durability -------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["flush", "fua", "writethrough"])
def test_durable_after_sigkill(tmp_path, how):
    """Replied writes survive a SIGKILL once a FLUSH was replied, or each write by itself
    when it was FUA, or under ``--cache writethrough`` (every write durable)."""
    img = tmp_path / "d.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-q", str(img), str(64 * MiB))
    sock = tmp_path / "s"
    fua = "nbd.CMD_FLAG_FUA" if how == "fua" else "0"
    script = f"""
import nbd
for i in range(40):
    h.pwrite(bytes([i + 1]) * 65536, i * 1024 * 1024 + 4096 * i, flags={fua})
h.zero(10 * 1024 * 1024, 42 * 1024 * 1024, flags={fua})
h.pwrite(b'\\xab' * 300000, 60 * 1024 * 1024 + 123, flags={fua})
if {how == "flush"}:
    h.flush()
print("done")
"""
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x77 {40 * MiB} {16 * MiB}", str(img))
    opts = ["--cache", "writethrough"] if how == "writethrough" else []
    with serve_process(img, sock, *opts, stop="none") as proc:
        assert "done" in nbdsh(unix_uri(sock), script).stdout
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    out = run("qemu-img", "check", "--output=json", str(img), check=False)
    assert out.returncode in (0, 3), out.stdout + out.stderr  # leaks allowed
    cmds = [f"read -P {i + 1} {i * MiB + 4096 * i} 64k" for i in range(40)]
    cmds += [f"read -P 0 {42 * MiB} {10 * MiB}", f"read -P 0xab {60 * MiB + 123} 300000",
             f"read -P 0x77 {52 * MiB} {4 * MiB}"]
    qio(img, *cmds, extra=["-r"])


# 7. multi-conn --------------------------------------------------------------------------------
def test_multi_conn_write_flush_read(tmp_path):
    img = make_mixed(tmp_path)
    sock = tmp_path / "s"
    script = """
import nbd
a, b, c = h, nbd.NBD(), nbd.NBD()
b.connect_uri(URI); c.connect_uri(URI)
assert a.can_multi_conn()
a.pwrite(b"\\x99" * 65536, 7 * 1024 * 1024)
b.flush()
assert c.pread(65536, 7 * 1024 * 1024) == b"\\x99" * 65536
print("ok")
"""
    with serve_process(img, sock):
        assert "ok" in nbdsh(unix_uri(sock), script).stdout
    qio(img, "read -P 0x99 7M 64k")


# 8. read-only and locks -------------------------------------------------------------------------
def test_readonly_refuses_writes(tmp_path):
    img = make_mixed(tmp_path)
    sock = tmp_path / "s"
    script = """
import errno, nbd
assert h.is_read_only()
h.set_strict_mode(0)
for call in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.trim(65536, 0),
             lambda: h.zero(65536, 0)):
    try:
        call()
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, e
    else:
        raise AssertionError("a write succeeded")
assert h.pread(4, 0) == b"\\x11" * 4
print("ok")
"""
    before = img.read_bytes()
    with serve_process(img, sock, "-r"):
        assert "ok" in nbdsh(unix_uri(sock), script).stdout
    assert img.read_bytes() == before


def test_image_locked_while_served(tmp_path):
    img = make_mixed(tmp_path)
    sock = tmp_path / "s"
    with serve_process(img, sock):
        refused = run("qemu-img", "info", str(img), check=False)
        assert refused.returncode != 0 and "lock" in refused.stderr
        run("qemu-img", "info", "-U", str(img))


# errors over a real client ---------------------------------------------------------------------
def test_out_of_range_errors(tmp_path):
    img = make_mixed(tmp_path)
    sock = tmp_path / "s"
    script = """
import errno, nbd
h.set_strict_mode(0)
size = h.get_size()
for call, want in ((lambda: h.pread(4096, size - 100), errno.EINVAL),
                   (lambda: h.pwrite(b"x" * 4096, size - 100), errno.ENOSPC),
                   (lambda: h.trim(4096, size), errno.EINVAL)):
    try:
        call()
    except nbd.Error as e:
        assert e.errnum == want, (e, want)
    else:
        raise AssertionError("out of range accepted")
assert h.pread(0, 0) == b""
print("ok")
"""
    with serve_process(img, sock):
        assert "ok" in nbdsh(unix_uri(sock), script).stdout
    check_clean(img)


def test_flags_every_command_must_accept(tmp_path):
    """FUA is valid on every command once SEND_FUA is advertised (the server MUST accept
    it, e.g. on a read or a flush), and an oversize DF read gets EOVERFLOW, the error the
    protocol reserves for it (without DF: EINVAL)."""
    path = tmp_path / "f.qcow2"
    with qcow2rw.create(path, 64 * MiB) as img:
        img.write(0, b"\x11" * 65536)
    script = """
import errno, nbd
h.set_strict_mode(0)
fua = nbd.CMD_FLAG_FUA
assert h.pread(4096, 0, fua) == b"\\x11" * 4096
h.flush(fua)
h.cache(4096, 0, fua)
seen = []
h2 = nbd.NBD()
h2.set_strict_mode(0)
h2.add_meta_context("base:allocation")
h2.connect_uri(URI)
h2.block_status(65536, 0, lambda ctx, off, ents, err: seen.append(ents) or 0, fua)
assert seen == [[65536, 0]], seen
h2.shutdown()
for flags, want in ((nbd.CMD_FLAG_DF, errno.EOVERFLOW), (0, errno.EINVAL)):
    try:
        h.pread(33 * 1024 * 1024, 0, flags)
    except nbd.Error as e:
        assert e.errnum == want, (e, want)
    else:
        raise AssertionError("oversize read accepted")
assert h.pread(65536, 0, nbd.CMD_FLAG_DF) == b"\\x11" * 65536
print("ok")
"""
    with lib_server(path, tmp_path / "s") as srv:
        assert "ok" in nbdsh(srv.uri(), script).stdout


def test_host_file_full_gives_enospc(tmp_path):
    """A write the host file system cannot take (here EFBIG past RLIMIT_FSIZE, which the
    protocol says to map like ENOSPC and EDQUOT) fails with ENOSPC, not EIO; the server
    goes on serving and the image stays clean."""
    path = tmp_path / "full.qcow2"
    qcow2rw.create(path, 64 * MiB).close()
    sock = tmp_path / "s"
    proc = subprocess.Popen(with_limits([*serve_argv(), "-k", str(sock), "-t", str(path)],
                                        fsize=4 * MiB), cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        wait_for_socket(sock, proc)
        script = """
import errno, nbd
got = []
for i in range(8):
    try:
        h.pwrite(b"\\x42" * (1 << 20), i << 20)
        got.append(0)
    except nbd.Error as e:
        got.append(e.errnum)
assert got[0] == 0 and got[-1] == errno.ENOSPC, got
assert set(got) == {0, errno.ENOSPC}, got
h.flush()
assert h.pread(4, 0) == b"BBBB"
print("ok")
"""
        assert "ok" in nbdsh(unix_uri(sock), script).stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    check_clean(path)


# snapshots while nbdcopy writes (library API) -------------------------------------------------
def test_snapshots_while_nbdcopy_writes(tmp_path):
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(32 * MiB))
    img = tmp_path / "dst.qcow2"
    qcow2rw.create(img, 32 * MiB).close()
    sock = tmp_path / "s"
    taken: list[str] = []
    with lib_server(img, sock) as server:
        copy = subprocess.Popen(["nbdcopy", "--flush", "-C", "4", "-T", "4", str(src),
                                 unix_uri(sock)], stderr=subprocess.PIPE)
        stop = threading.Event()

        def snapshots():
            while not stop.is_set() and len(taken) < 10:
                name = f"s{len(taken)}"
                server.image.create_snapshot(name)
                taken.append(name)
                time.sleep(0.02)
        thread = threading.Thread(target=snapshots)
        thread.start()
        try:
            assert copy.wait(120) == 0, copy.stderr.read()
        finally:
            stop.set()
            thread.join()
            copy.stderr.close()
    assert taken
    check_clean(img)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src), str(img))
    with qcow2rw.open(img, readonly=True) as opened:
        names = [s["name"] for s in opened.info().get("snapshots", [])]
    assert names == taken


def test_library_serve_tcp(tmp_path):
    img = make_mixed(tmp_path)
    image = qcow2rw.open(img, readonly=True)
    try:
        with qcow2rw.nbd.serve(image, host="127.0.0.1", port=0, readonly=True) as server:
            uri = server.uri()
            assert uri.startswith("nbd://127.0.0.1:")
            assert nbdinfo_json(uri)["exports"][0]["export-size"] == 64 * MiB
    finally:
        image.close()


def test_pid_file_and_fork(tmp_path):
    img = make_mixed(tmp_path)
    sock, pidfile = tmp_path / "s", tmp_path / "pid"
    run(*serve_argv(), "--fork", "--pid-file", str(pidfile), "-k", str(sock), str(img))
    pid = int(pidfile.read_text())
    try:  # (no probe connection first: without -t it would be the only client)
        assert nbdinfo_json(unix_uri(sock))["exports"][0]["export-size"] == 64 * MiB
    finally:
        # without -t the server exits after its last client (nbdinfo) left
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError("the server did not exit after its last client")
    assert not pidfile.exists()
    check_clean(img)


def test_sigterm_with_client_connected(tmp_path):
    """SIGTERM while a client holds a connection with unflushed writes: the server
    finishes, flushes, clears the dirty bit and exits 0."""
    from nbd_helpers import nbdsh_argv
    img = make_mixed(tmp_path)
    sock = tmp_path / "s"
    script = """
import sys, time
for i in range(16):
    h.pwrite(b"\\x3c" * 65536, 30 * 1024 * 1024 + i * 65536)
print("written", flush=True)
time.sleep(60)
"""
    with serve_process(img, sock, stop="none") as proc:
        client = subprocess.Popen([*nbdsh_argv(), "-u", unix_uri(sock), "-c", script],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert client.stdout.readline().strip() == "written"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            client.kill()
            client.wait()
            client.stdout.close()
    check_clean(img)
    with qcow2rw.open(img, readonly=True) as opened:
        assert not opened.info()["dirty-flag"]
    qio(img, "read -P 0x3c 30M 1M")


def test_cli_errors(tmp_path):
    img = make_mixed(tmp_path)
    for args, text in ((["-U", str(img)], "needs --read-only"),
                       (["-k", str(tmp_path / "s"), str(tmp_path / "missing.qcow2")], "missing"),
                       (["-f", "raw", str(img)], "qcow2 only")):
        out = run(*serve_argv(), *args, check=False, timeout=60)
        assert out.returncode == 1 and text in out.stderr, out.stderr
    with serve_process(img, tmp_path / "s"):
        out = run(*serve_argv(), "-k", str(tmp_path / "s2"), str(img), check=False)
        assert out.returncode == 1 and "lock" in out.stderr.lower(), out.stderr


def test_write_zeroes_may_trim_frees_no_hole_keeps(tmp_path):
    """WRITE_ZEROES may trim: whole clusters become unallocated zero clusters (as
    qemu-nbd); with NO_HOLE they stay allocated; partial clusters are zeroed."""
    import json
    img = tmp_path / "z.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-q", str(img), str(16 * MiB))
    qio(img, "write -P 0x44 0 8M")
    sock = tmp_path / "s"
    script = """
import nbd
M = 1024 * 1024
h.zero(2 * M - 1000, M + 1000)                        # (count, offset): may trim
h.zero(2 * M, 3 * M, flags=nbd.CMD_FLAG_NO_HOLE)
print("ok")
"""
    with serve_process(img, sock):
        assert "ok" in nbdsh(unix_uri(sock), script).stdout
    check_clean(img)
    qio(img, f"read -P 0x44 0 {MiB + 1000}", f"read -P 0 {MiB + 1000} {4 * MiB - 1000}",
        "read -P 0x44 5M 3M")
    extents = json.loads(run("qemu-img", "map", "--output=json", str(img)).stdout)

    def at(pos):
        return next(e for e in extents if e["start"] <= pos < e["start"] + e["length"])
    assert at(2 * MiB)["zero"] and "offset" not in at(2 * MiB)     # trimmed
    assert at(4 * MiB)["zero"] and "offset" in at(4 * MiB)         # NO_HOLE: still allocated


@pytest.mark.parametrize("backing", [False, True])
def test_subcluster_map_equals_qemu_nbd(tmp_path, backing):
    """Extended L2 entries: block status per subcluster (base:allocation and
    qemu:allocation-depth) as qemu-nbd reports it, over a raw backing file or none."""
    args = ["-o", "extended_l2=on,cluster_size=64k"]
    if backing:
        base = tmp_path / "base.raw"
        with open(base, "wb") as f:
            f.write(b"\x55" * MiB)
            f.truncate(4 * MiB)
        args += ["-b", str(base), "-F", "raw"]
    img = tmp_path / "sub.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-q", *args, str(img), "4M")
    qio(img, "write -P 1 2k 2k", "write -P 2 70k 1k", "write -z 128k 4k",
        "write -P 3 192k 64k", "write -z 200k 2k", "write -c -P 4 1M 64k")
    assert_maps_like_qemu_nbd(tmp_path, img)
