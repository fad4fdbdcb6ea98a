"""Encrypted images (issue 15 §4) and tables past the end of the file (§5), against QEMU 7.2.

Every image is made by qemu-img/qemu-io (LUKS with a short ``iter-time``, so that
QEMU's own opens with the key stay fast).  qcow2rw takes no key: ``info``, ``map``
and ``check`` read the metadata only, and must print exactly what qemu-img prints
(``info`` without a key, ``map`` and ``check`` with it, since qemu-img needs the key
for those); every open for data is refused with QEMU's message for a missing key.
Hostile crypto headers are judged by qemu-img's own accept/refuse and message.
The commands run in the images' directory with relative names, so that even the
file names in the outputs agree.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import qcow2rw
from qcow2rw.cli.output import format_info_human, info_json_order
from qcow2rw.crypto import KEY_REQUIRED
from qcow2rw.image import open_image
from test_cli import run_cli

pytestmark = pytest.mark.interop

SECRETS = ("--object", "secret,id=sec0,data=abc", "--object", "secret,id=sec1,data=def")
KEY_OPTS = "driver=qcow2,file.filename={},encrypt.key-secret=sec0"
LUKS_AREA = 0x40000  # where qemu-img puts the LUKS header of a new image (read back below)


def tool(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=120)
    if check and proc.returncode:
        raise AssertionError(f"{args} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc


def keyed(verb: str, name: str, *options: str, cwd: Path, check: bool = False
          ) -> subprocess.CompletedProcess[str]:
    """``qemu-img VERB`` with the key, on image *name* (``--image-opts``)."""
    return tool("qemu-img", verb, *SECRETS, *options, "--image-opts", KEY_OPTS.format(name),
                cwd=cwd, check=check)


def qemu_io_keyed(name: str, *commands: str, cwd: Path) -> str:
    args = ["qemu-io", *SECRETS, "--image-opts"]
    for command in commands:
        args += ["-c", command]
    out = tool(*args, KEY_OPTS.format(name), cwd=cwd).stdout
    assert "failed" not in out, out
    return out


def _create_luks(cwd: Path, name: str, size: str, *options: str) -> None:
    """A LUKS image; qemu-img's PBKDF benchmark fails at random ("Unable to get
    accurate CPU usage") with a short iter-time, so it is tried again."""
    opts = ",".join(("encrypt.format=luks", "encrypt.key-secret=sec0", "encrypt.iter-time=50",
                     *options))
    for _ in range(4):
        proc = tool("qemu-img", "create", "-q", "-f", "qcow2", *SECRETS, "-o", opts, name, size,
                    cwd=cwd, check=False)
        if proc.returncode == 0:
            return
    raise AssertionError(proc.stderr)


def _make_luks(cwd: Path) -> None:
    _create_luks(cwd, "luks.qcow2", "16M")
    qemu_io_keyed("luks.qcow2", "write -P 7 0 100k", "write -P 9 1M 64k", "write -z 2M 64k",
                  cwd=cwd)
    for _ in range(4):  # a second key slot (the same benchmark runs again)
        proc = keyed("amend", "luks.qcow2", "-o", "encrypt.keyslot=3,encrypt.state=active,"
                     "encrypt.new-secret=sec1,encrypt.iter-time=50", cwd=cwd)
        if proc.returncode == 0:
            return
    raise AssertionError(proc.stderr)


def _make_essiv(cwd: Path) -> None:
    _create_luks(cwd, "essiv.qcow2", "4M", "encrypt.cipher-alg=twofish-128",
                 "encrypt.cipher-mode=cbc", "encrypt.ivgen-alg=essiv",
                 "encrypt.ivgen-hash-alg=sha256", "encrypt.hash-alg=sha512")


def _make_aes(cwd: Path) -> None:
    tool("qemu-img", "create", "-q", "-f", "qcow2", *SECRETS, "-o",
         "encrypt.format=aes,encrypt.key-secret=sec0", "aes.qcow2", "16M", cwd=cwd)
    qemu_io_keyed("aes.qcow2", "write -P 5 64k 200k", cwd=cwd)
    tool("qemu-img", "create", "-q", "-f", "qcow2", *SECRETS, "-o",
         "compat=0.10,encrypt.format=aes,encrypt.key-secret=sec0", "aes_v2.qcow2", "4M", cwd=cwd)


ENCRYPTED = ("luks.qcow2", "essiv.qcow2", "aes.qcow2", "aes_v2.qcow2")


@pytest.fixture(scope="module")
def where(qemu: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the encrypted images (made side by side: LUKS creation spends
    a second or two in QEMU's PBKDF benchmark)."""
    path = tmp_path_factory.mktemp("encrypted")
    with ThreadPoolExecutor(3) as pool:
        for future in [pool.submit(make, path) for make in (_make_luks, _make_essiv, _make_aes)]:
            future.result()
    return path


def _ours_and_qemu(where: Path, ours: tuple[str, ...], theirs: tuple[str, ...], *,
                   keyed_verb: bool) -> tuple[Any, Any]:
    mine = run_cli(*ours, cwd=where)
    if keyed_verb:
        verb, *rest = theirs
        name = rest.pop()
        qemu = keyed(verb, name, *rest, cwd=where)
    else:
        qemu = tool("qemu-img", *theirs, cwd=where, check=False)
    return mine, qemu


def _message(stderr: str) -> str:
    """The error message of a one-line failure, without the tool's prefix (qemu-img
    says "Could not open 'X': ", qemu-io "can't open device X: ", we "X: ")."""
    lines = stderr.strip().splitlines()
    if not lines:
        return ""
    line = lines[-1]
    line = re.sub(r"^(qemu-img|qemu-io|qcow2rw): ", "", line)
    return re.sub(r"^(Could not open '[^']*': |can't open device \S+: |\S+\.qcow2: )", "", line)


# --------------------------------------------------------------------------- info, check, map
@pytest.mark.parametrize("name", ENCRYPTED)
@pytest.mark.parametrize("output", ["human", "json"])
def test_info_equals_qemu(where: Path, name: str, output: str) -> None:
    mine, qemu = _ours_and_qemu(where, ("info", f"--output={output}", name),
                                ("info", f"--output={output}", name), keyed_verb=False)
    assert qemu.returncode == 0, qemu.stderr
    assert (mine.returncode, mine.stderr) == (0, "")
    assert mine.stdout == qemu.stdout
    if output == "json":
        info = json.loads(mine.stdout)
        assert info["encrypted"] is True
        assert info["format-specific"]["data"]["encrypt"]["format"] == \
            ("luks" if "aes" not in name else "aes")


def test_info_shows_both_key_slots(where: Path) -> None:
    with qcow2rw.open(where / "luks.qcow2", metadata_only=True) as img:
        slots = img.info()["format-specific"]["data"]["encrypt"]["slots"]
    assert [s["active"] for s in slots] == [True, False, False, True] + [False] * 4
    assert all(s["stripes"] == 4000 and s["iters"] >= 1000 for s in slots if s["active"])


@pytest.mark.parametrize("name", ENCRYPTED)
@pytest.mark.parametrize("output", ["human", "json"])
def test_check_equals_qemu_with_key(where: Path, name: str, output: str) -> None:
    """Our check needs no key and gives qemu-img's figures with the key: the LUKS
    header clusters are referenced (else they would be 32 leaks)."""
    mine, qemu = _ours_and_qemu(where, ("check", f"--output={output}", name),
                                ("check", f"--output={output}", name), keyed_verb=True)
    assert (mine.returncode, mine.stderr) == (qemu.returncode, qemu.stderr) == (0, "")
    if output == "human":
        assert mine.stdout == qemu.stdout
    else:  # (qemu-img names the image by its --image-opts string)
        ours, theirs = json.loads(mine.stdout), json.loads(qemu.stdout)
        assert ours.pop("filename") == name
        theirs.pop("filename")
        assert list(ours.items()) == list(theirs.items())


@pytest.mark.parametrize("name", ENCRYPTED)
def test_map_equals_qemu_with_key(where: Path, name: str) -> None:
    """No host offsets (QEMU has none to give with encryption), so the human layout
    fails on the first data extent as qemu-img's does."""
    mine, qemu = _ours_and_qemu(where, ("map", "--output=json", name),
                                ("map", "--output=json", name), keyed_verb=True)
    assert qemu.returncode == 0, qemu.stderr
    assert (mine.returncode, mine.stdout) == (0, qemu.stdout)
    assert '"offset"' not in mine.stdout
    mine, qemu = _ours_and_qemu(where, ("map", name), ("map", name), keyed_verb=True)
    assert (mine.returncode, mine.stdout) == (qemu.returncode, qemu.stdout)
    assert _message(mine.stderr) == _message(qemu.stderr) == \
        ("" if name in ("essiv.qcow2", "aes_v2.qcow2")  # (no data: nothing to refuse)
         else "File contains external, encrypted or compressed clusters.")


def _poke(path: Path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def _refcount_entry(path: Path, cluster: int) -> int:
    """File offset of *cluster*'s 16-bit refcount (first refcount block)."""
    raw = path.read_bytes()
    reftable = struct.unpack_from(">Q", raw, 48)[0]
    return (struct.unpack_from(">Q", raw, reftable)[0] & ~0x1FF) + 2 * cluster


@pytest.mark.parametrize("damage", ["leak", "header_refcount_zero"])
def test_repair_keeps_the_luks_header(where: Path, tmp_path: Path, damage: str) -> None:
    """``check -r all`` on a damaged LUKS image: our output is qemu-img's (with the
    key), and afterwards QEMU still unlocks the image and reads the data: neither the
    leak repair nor a refcount rebuild touched the LUKS header clusters."""
    for side in ("ours", "theirs"):
        (tmp_path / side).mkdir()
        path = tmp_path / side / "img.qcow2"
        shutil.copy(where / "luks.qcow2", path)
        if damage == "leak":  # one cluster past the end, with refcount 1
            end = path.stat().st_size // 65536
            with open(path, "r+b") as f:
                f.truncate((end + 1) * 65536)
            _poke(path, _refcount_entry(path, end), ">H", 1)
        else:  # QEMU rebuilds the refcount structures
            _poke(path, _refcount_entry(path, 0), ">H", 0)
    mine = run_cli("check", "-r", "all", "img.qcow2", cwd=tmp_path / "ours")
    qemu = keyed("check", "img.qcow2", "-r", "all", cwd=tmp_path / "theirs")
    assert (mine.returncode, mine.stdout, mine.stderr) == \
        (qemu.returncode, qemu.stdout, qemu.stderr)
    assert keyed("check", "img.qcow2", cwd=tmp_path / "ours").returncode == 0
    out = qemu_io_keyed("img.qcow2", "read -P 7 0 100k", "read -P 9 1M 64k",
                        "read -P 0 2M 64k", cwd=tmp_path / "ours")
    assert out.count("read ") == 3


# --------------------------------------------------------------------------- no data access
@pytest.mark.parametrize("name", ENCRYPTED)
def test_open_for_data_is_refused(where: Path, name: str) -> None:
    reference = tool("qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", name, cwd=where,
                     check=False)
    assert _message(reference.stderr) == KEY_REQUIRED
    for readonly in (True, False):
        with pytest.raises(qcow2rw.EncryptedImage, match=re.escape(KEY_REQUIRED)) as caught:
            qcow2rw.open(where / name, readonly=readonly)
        assert isinstance(caught.value, qcow2rw.UnsupportedFeature)
    with pytest.raises(qcow2rw.EncryptedImage):
        open_image(where / name, readonly=True, backing=False)


def test_metadata_only_image_refuses_data(where: Path, tmp_path: Path) -> None:
    path = tmp_path / "luks.qcow2"
    shutil.copy(where / "luks.qcow2", path)
    before = path.read_bytes()
    with qcow2rw.open(path, metadata_only=True) as img:
        assert img.encrypted and img.metadata_only
        assert img.check().corruptions == 0
        assert img.map()[0] == {"start": 0, "length": 131072, "depth": 0, "present": True,
                                "zero": False, "data": True}
        refused: list[Callable[[], Any]] = [
            lambda: img.read(0, 512), lambda: img.readinto(0, bytearray(512)),
            lambda: img.write(0, b"x"), lambda: img.discard(0, 65536),
            lambda: img.write_zeroes(0, 65536), lambda: img.write_compressed(0, bytes(65536)),
            lambda: img.resize(32 << 20), lambda: img.create_snapshot("s"),
            lambda: img.amend(lazy_refcounts=True)]
        for call in refused:
            with pytest.raises(qcow2rw.EncryptedImage, match=re.escape(KEY_REQUIRED)):
                call()
        with img.aio(workers=2) as aio:
            with pytest.raises(qcow2rw.EncryptedImage):
                aio.submit_read(0, 512).result()
    assert path.read_bytes() == before


def test_metadata_only_plain_image(tmp_path: Path) -> None:
    """The same mode on an image that is not encrypted: metadata yes, data no."""
    qcow2rw.create(tmp_path / "a.qcow2", 1 << 20).close()
    with qcow2rw.open(tmp_path / "a.qcow2", readonly=True, metadata_only=True) as img:
        assert not img.encrypted and "encrypted" not in img.info()
        with pytest.raises(qcow2rw.UnsupportedFeature, match="metadata only"):
            img.read(0, 1)


@pytest.mark.parametrize("verb", [("compare", "{0}", "{0}"), ("snapshot", "-l", "{0}"),
                                  ("snapshot", "-c", "s1", "{0}"), ("resize", "{0}", "+1M"),
                                  ("amend", "-o", "lazy_refcounts=on", "{0}"),
                                  ("serve", "-k", "x.sock", "{0}"),
                                  ("bench", "-c", "1", "{0}")],
                         ids=lambda v: "-".join(v[:2]))
def test_data_verbs_refuse(where: Path, tmp_path: Path, verb: tuple[str, ...]) -> None:
    shutil.copy(where / "luks.qcow2", tmp_path / "luks.qcow2")
    before = (tmp_path / "luks.qcow2").read_bytes()
    proc = run_cli(*(arg.format("luks.qcow2") for arg in verb), cwd=tmp_path)
    assert proc.returncode == (2 if verb[0] == "compare" else 1), proc
    assert proc.stderr.strip().endswith(KEY_REQUIRED), proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "luks.qcow2").read_bytes() == before


def test_overlay_over_an_encrypted_backing_file(where: Path, tmp_path: Path) -> None:
    """An overlay (made by qemu-img) over an encrypted image: info --backing-chain and
    map go down the chain without a key and equal qemu-img's (map with the backing
    file's key); reading through the overlay needs the key.  Deliberately not QEMU's:
    our create -b refuses an encrypted backing file (the Image it returns must be
    readable), before it writes anything."""
    shutil.copy(where / "aes.qcow2", tmp_path / "aes.qcow2")
    tool("qemu-img", "create", "-q", "-f", "qcow2", "-b", "aes.qcow2", "-F", "qcow2",
         "top.qcow2", cwd=tmp_path)
    for output in ("human", "json"):
        mine = run_cli("info", "--backing-chain", f"--output={output}", "top.qcow2",
                       cwd=tmp_path)
        qemu = tool("qemu-img", "info", "--backing-chain", f"--output={output}", "top.qcow2",
                    cwd=tmp_path)
        assert (mine.returncode, mine.stdout) == (0, qemu.stdout)
    mine = run_cli("map", "--output=json", "top.qcow2", cwd=tmp_path)
    qemu = tool("qemu-img", "map", "--output=json", *SECRETS, "--image-opts",
                "driver=qcow2,file.filename=top.qcow2,backing.encrypt.key-secret=sec0",
                cwd=tmp_path)
    assert (mine.returncode, mine.stdout) == (0, qemu.stdout)
    with pytest.raises(qcow2rw.EncryptedImage):
        qcow2rw.open(tmp_path / "top.qcow2", readonly=True)
    proc = run_cli("create", "-f", "qcow2", "-b", "aes.qcow2", "-F", "qcow2", "new.qcow2",
                   cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip().endswith(KEY_REQUIRED)
    assert not (tmp_path / "new.qcow2").exists()


# --------------------------------------------------------------------------- hostile crypto
def _ext_field(raw: bytearray) -> int:
    """File offset of the crypto header extension's payload."""
    off = struct.unpack_from(">I", raw, 100)[0]
    while True:
        magic, length = struct.unpack_from(">II", raw, off)
        if magic == 0x0537BE77:
            return off + 8
        assert magic, "no crypto header extension"
        off += 8 + length + (-length % 8)


def _slot(index: int, field: int) -> int:
    return 208 + 48 * index + field  # active 0, iters 4, key offset 40, stripes 44


def _text(value: bytes) -> bytes:
    return value.ljust(32, b"\0")


Patch = Callable[[bytearray, int, int], None]  # (file bytes, extension payload, LUKS area)
HOSTILE: dict[str, Patch] = {
    "ext_length_8": lambda b, e, a: struct.pack_into(">I", b, e - 4, 8),
    "ext_length_24": lambda b, e, a: struct.pack_into(">I", b, e - 4, 24),
    "ext_offset_unaligned": lambda b, e, a: struct.pack_into(">Q", b, e, a + 512),
    "ext_offset_past_eof": lambda b, e, a: struct.pack_into(">Q", b, e, 1 << 40),
    "ext_offset_beyond_io": lambda b, e, a: struct.pack_into(">Q", b, e, (1 << 63) - 65536),
    "ext_offset_on_reftable": lambda b, e, a: struct.pack_into(">Q", b, e, 0x10000),
    "ext_length_small": lambda b, e, a: struct.pack_into(">Q", b, e + 8, 100),
    "ext_length_zero": lambda b, e, a: struct.pack_into(">Q", b, e + 8, 0),
    "ext_length_huge": lambda b, e, a: struct.pack_into(">Q", b, e + 8, 1 << 40),
    "aes_with_ext": lambda b, e, a: struct.pack_into(">I", b, 32, 1),
    "method_3": lambda b, e, a: struct.pack_into(">I", b, 32, 3),
    "luks_magic": lambda b, e, a: b.__setitem__(a, 0),
    "luks_version_2": lambda b, e, a: struct.pack_into(">H", b, a + 6, 2),
    "luks_cipher_unnamed": lambda b, e, a: b.__setitem__(slice(a + 8, a + 40), b"x" * 32),
    "luks_cipher_foo": lambda b, e, a: b.__setitem__(slice(a + 8, a + 40), _text(b"foo")),
    "luks_mode_no_ivgen": lambda b, e, a: b.__setitem__(slice(a + 40, a + 72), _text(b"xts")),
    "luks_mode_unknown": lambda b, e, a: b.__setitem__(slice(a + 40, a + 72),
                                                       _text(b"gcm-plain64")),
    "luks_ivgen_unknown": lambda b, e, a: b.__setitem__(slice(a + 40, a + 72),
                                                        _text(b"xts-random")),
    "luks_ivhash_unknown": lambda b, e, a: b.__setitem__(slice(a + 40, a + 72),
                                                         _text(b"xts-plain64:whirl")),
    "luks_essiv_no_hash": lambda b, e, a: b.__setitem__(slice(a + 40, a + 72),
                                                        _text(b"xts-essiv")),
    "luks_essiv_md5": lambda b, e, a: b.__setitem__(slice(a + 40, a + 72),
                                                    _text(b"xts-essiv:md5")),
    "luks_essiv_sha512": lambda b, e, a: b.__setitem__(slice(a + 40, a + 72),
                                                       _text(b"xts-essiv:sha512")),
    "luks_hash_unknown": lambda b, e, a: b.__setitem__(slice(a + 72, a + 104), _text(b"sha3")),
    "luks_payload_on_header": lambda b, e, a: struct.pack_into(">I", b, a + 104, 4),
    "luks_payload_on_slot": lambda b, e, a: struct.pack_into(">I", b, a + 104, 200),
    "luks_key_bytes_20": lambda b, e, a: struct.pack_into(">I", b, a + 108, 20),
    "luks_mk_iters_zero": lambda b, e, a: struct.pack_into(">I", b, a + 164, 0),
    "luks_uuid_full": lambda b, e, a: b.__setitem__(slice(a + 168, a + 208), b"u" * 40),
    "slot_stripes": lambda b, e, a: struct.pack_into(">I", b, a + _slot(2, 44), 3999),
    "slot_stripes_negative": lambda b, e, a: struct.pack_into(">I", b, a + _slot(2, 44),
                                                              0xFFFFFFF0),
    "slot_state": lambda b, e, a: struct.pack_into(">I", b, a + _slot(5, 0), 7),
    "slot_iters_zero": lambda b, e, a: struct.pack_into(">I", b, a + _slot(0, 4), 0),
    "slot_on_header": lambda b, e, a: struct.pack_into(">I", b, a + _slot(1, 40), 4),
    "slots_overlap": lambda b, e, a: struct.pack_into(">I", b, a + _slot(6, 40),
                                                      struct.unpack_from(">I", b, a + _slot(5, 40))[0] + 8),
    "slot_inactive_iters_zero": lambda b, e, a: struct.pack_into(">I", b, a + _slot(4, 4), 0),
}


def _our_info(path: Path) -> tuple[int, str, str, str]:
    """What ``qcow2rw info`` prints (exit status, human, JSON, error message), in
    process: the layouts are the CLI's own functions (tested as a subprocess above)."""
    try:
        with qcow2rw.open(path, readonly=True, metadata_only=True) as img:
            info = img.info()
    except qcow2rw.Qcow2Error as exc:
        return 1, "", "", str(exc)
    info["filename"] = path.name  # (as typed in the image's directory)
    return 0, format_info_human(info), json.dumps(info_json_order(info), indent=4) + "\n", ""


@pytest.mark.parametrize("mutation", sorted(HOSTILE))
def test_hostile_crypto_header(where: Path, tmp_path: Path, mutation: str) -> None:
    """Each damaged LUKS image: our info accepts it exactly when qemu-img info does,
    with the same output or the same message; an open for data fails with the
    message qemu-io gives without a key."""
    raw = bytearray((where / "luks.qcow2").read_bytes())
    ext = _ext_field(raw)
    area = struct.unpack_from(">Q", raw, ext)[0]
    assert area == LUKS_AREA
    HOSTILE[mutation](raw, ext, area)
    path = tmp_path / "bad.qcow2"
    path.write_bytes(bytes(raw))
    commands = [("qemu-img", "info", "bad.qcow2"),
                ("qemu-img", "info", "--output=json", "bad.qcow2"),
                ("qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", "bad.qcow2")]
    with ThreadPoolExecutor(3) as pool:
        human, as_json, data_open = pool.map(
            lambda args: tool(*args, cwd=tmp_path, check=False), commands)
    status, my_human, my_json, my_error = _our_info(path)
    assert status == human.returncode == as_json.returncode, (my_error, human.stderr)
    if status:
        assert my_error == _message(human.stderr) == _message(as_json.stderr)
    else:
        assert (my_human, my_json) == (human.stdout, as_json.stdout)
    with pytest.raises(qcow2rw.Qcow2Error) as caught:
        qcow2rw.open(path, readonly=True)
    assert data_open.returncode == 1
    assert str(caught.value) == _message(data_open.stderr)


def test_luks_without_crypto_extension(where: Path, tmp_path: Path) -> None:
    """Deliberately not QEMU's: qemu-img 7.2's info crashes on a LUKS image without its
    crypto header extension; we refuse it with the message QEMU's open for data gives."""
    raw = bytearray((where / "luks.qcow2").read_bytes())
    struct.pack_into(">I", raw, _ext_field(raw) - 8, 0x12345678)  # an unknown extension now
    (tmp_path / "bad.qcow2").write_bytes(bytes(raw))
    data_open = tool("qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", "bad.qcow2",
                     cwd=tmp_path, check=False)
    assert _message(data_open.stderr) == "Missing CRYPTO header for crypt method 2"
    for verb in ("info", "map", "check"):
        mine = run_cli(verb, "bad.qcow2", cwd=tmp_path)
        assert mine.returncode == 1
        assert _message(mine.stderr) == "Missing CRYPTO header for crypt method 2"


# --------------------------------------------------------------------------- §5: past the end
def _truncated(where: Path, variant: str) -> None:
    name = f"{variant}.qcow2"
    tool("qemu-img", "create", "-q", "-f", "qcow2", name, "16M", cwd=where)
    if variant != "header_only":
        tool("qemu-io", "-f", "qcow2", "-c", "write -P 7 0 64k", "-c", "write -P 8 5M 4k", name,
             cwd=where)
    path = where / name
    if variant in ("header_only", "data_truncated"):
        with open(path, "r+b") as f:
            f.truncate(65536)
    elif variant == "l1_past_eof":
        _poke(path, 40, ">Q", 1 << 40)
    elif variant == "reftable_past_eof":
        _poke(path, 48, ">Q", 1 << 40)
    elif variant == "l1_at_eof":  # the table starts right at the end of the file
        _poke(path, 40, ">Q", path.stat().st_size)


PAST_END = ("header_only", "data_truncated", "l1_past_eof", "reftable_past_eof", "l1_at_eof")


@pytest.mark.parametrize("variant", PAST_END)
def test_tables_past_the_end(qemu: Any, tmp_path: Path, variant: str) -> None:
    """info, map and check equal qemu-img's; a read-only open reads what QEMU reads
    (zeros where a table lies past the end); a read-write open is refused."""
    _truncated(tmp_path, variant)
    name = f"{variant}.qcow2"
    for verb in ("info", "map", "check"):
        for output in ("human", "json"):
            mine = run_cli(verb, f"--output={output}", name, cwd=tmp_path)
            theirs = tool("qemu-img", verb, f"--output={output}", name, cwd=tmp_path,
                          check=False)
            assert (mine.returncode, mine.stdout, mine.stderr) == \
                (theirs.returncode, theirs.stdout, theirs.stderr), (verb, output)
    tool("qemu-img", "convert", "-O", "raw", name, "raw.img", cwd=tmp_path)
    expected = (tmp_path / "raw.img").read_bytes()
    with qcow2rw.open(tmp_path / name, readonly=True) as img:
        assert img.read(0, len(expected)) == expected
    with pytest.raises(qcow2rw.FormatError, match="lies beyond the end of the file"):
        qcow2rw.open(tmp_path / name)


@pytest.mark.parametrize("variant", ["l1_past_eof", "reftable_past_eof"])
def test_repair_of_tables_past_the_end(qemu: Any, tmp_path: Path, variant: str) -> None:
    """check -r all on such an image prints what qemu-img's prints (the refcount table
    past the end is rebuilt; the L1 table past the end stays an error for both)."""
    _truncated(tmp_path, variant)
    for side in ("ours", "theirs"):
        (tmp_path / side).mkdir()
        shutil.copy(tmp_path / f"{variant}.qcow2", tmp_path / side / "x.qcow2")
    mine = run_cli("check", "-r", "all", "x.qcow2", cwd=tmp_path / "ours")
    theirs = tool("qemu-img", "check", "-r", "all", "x.qcow2", cwd=tmp_path / "theirs",
                  check=False)
    assert (mine.returncode, mine.stdout, mine.stderr) == \
        (theirs.returncode, theirs.stdout, theirs.stderr)
