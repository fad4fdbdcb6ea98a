"""Encrypted images: the crypt_method field, the crypto header extension, the LUKS1 header.

qcow2rw has no key and decrypts nothing.  An encrypted image can still be opened for
its metadata only (QEMU's ``BDRV_O_NO_IO``: ``info``, ``map`` and ``check``), and
``info`` then shows what ``qemu-img info`` shows: ``encrypted: yes`` and the
``encrypt`` block, which for LUKS comes from the LUKS1 header.  An open for data is
refused with QEMU's message for a missing key (:data:`KEY_REQUIRED`).

Two methods exist (header field ``crypt_method``): 1, the legacy AES-CBC with the key
derived from a passphrase and no on-disk header; 2, LUKS, whose LUKS1 header and key
material live in clusters of the image that the crypto header extension (magic
``0x0537BE77``: u64 offset, u64 length, cluster-aligned) points at.  Those clusters
are refcounted like metadata, and ``check`` counts them.

The LUKS header is validated and parsed as QEMU 7.2 does on an open without I/O
(``qcrypto_block_luks_check_header`` and ``qcrypto_block_luks_parse_header`` in
``crypto/block-luks.c``), in its order and with its messages; the read goes through
the extension's bounds like ``qcow2_crypto_hdr_read_func`` (zeros past the end of
the file).  Pure parsing here; the caller does the I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from .errors import EncryptedImage, FormatError
from .format import CRYPTO_EXT, EXT_CRYPTO, Header

CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2

#: QEMU's message when an encrypted image is opened for data without a key.
KEY_REQUIRED = "Parameter 'encrypt.key-secret' is required for cipher"

LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS_VERSION = 1
#: magic, version, cipher name, cipher mode, hash spec, payload offset (sectors),
#: master key length, master key digest, salt, master key iterations, uuid.
LUKS_HEADER = struct.Struct(">6sH32s32s32sII20s32sI40s")  # 208 bytes
#: active, iterations, salt, key material offset (sectors), stripes.
LUKS_SLOT = struct.Struct(">II32sII")  # 48 bytes
LUKS_NUM_SLOTS = 8
LUKS_HEADER_SIZE = LUKS_HEADER.size + LUKS_NUM_SLOTS * LUKS_SLOT.size  # 592
LUKS_SECTOR = 512
LUKS_KEY_SLOT_OFFSET = 4096
LUKS_HEADER_SECTORS = LUKS_KEY_SLOT_OFFSET // LUKS_SECTOR
LUKS_STRIPES = 4000
LUKS_SLOT_DISABLED = 0x0000DEAD
LUKS_SLOT_ENABLED = 0x00AC71F3

# QEMU's names (its QAPI enums) and the LUKS cipher-name map.
_CIPHER_SIZES = {
    "aes": {16: "aes-128", 24: "aes-192", 32: "aes-256"},
    "cast5": {16: "cast5-128"},
    "serpent": {16: "serpent-128", 24: "serpent-192", 32: "serpent-256"},
    "twofish": {16: "twofish-128", 24: "twofish-192", 32: "twofish-256"},
}
_KEY_LEN = {alg: size for sizes in _CIPHER_SIZES.values() for size, alg in sizes.items()}
_CIPHER_MODES = ("ecb", "cbc", "xts", "ctr")
_HASH_DIGEST = {"md5": 16, "sha1": 20, "sha224": 28, "sha256": 32, "sha384": 48,
                "sha512": 64, "ripemd160": 20}
_IVGENS = ("plain", "plain64", "essiv")
_ESSIV_FAMILY = {"aes": "AES", "serpent": "Serpent", "twofish": "Twofish"}

#: QEMU refuses I/O requests ending past this offset with EIO (BDRV_MAX_LENGTH).
MAX_IO_END = (1 << 63) - (1 << 30)
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1


def crypto_extension(hdr: Header) -> tuple[int, int] | None:
    """(offset, length) of the LUKS header area the crypto header extension names, or
    None without one.  The extension was validated when the header was parsed."""
    for ext in hdr.extensions:
        if ext.magic == EXT_CRYPTO and len(ext.data) == CRYPTO_EXT.size:
            offset, length = CRYPTO_EXT.unpack(ext.data)
            return offset, length
    return None


def _c_string(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _c_int(value: int) -> int:
    """A u32 printed with C's ``%d``."""
    return value - (1 << 32) if value & 0x80000000 else value


def _split_key_sectors(key_len: int, stripes: int) -> int:
    """qcrypto_block_luks_splitkeylen_sectors(): sectors of one slot's key material,
    rounded up to the header's size (as an ``unsigned int``, like QEMU's)."""
    sectors = -(-(key_len * stripes) // LUKS_SECTOR)
    return (-(-sectors // LUKS_HEADER_SECTORS) * LUKS_HEADER_SECTORS) & _U32


def _ranges_overlap(first1: int, len1: int, first2: int, len2: int) -> bool:
    last1 = (first1 + len1 - 1) & _U64
    last2 = (first2 + len2 - 1) & _U64
    return not (last2 < first1 or last1 < first2)


def _check_luks_header(fields: tuple[Any, ...], slots: list[tuple[int, ...]]) -> None:
    """qcrypto_block_luks_check_header(), its checks in its order."""
    (magic, version, cipher_name, cipher_mode, hash_spec, payload_sector, key_len, _, _,
     mk_iters, _) = fields
    if magic != LUKS_MAGIC:
        raise FormatError("Volume is not in LUKS format")
    if version != LUKS_VERSION:
        raise FormatError(f"LUKS version {version} is not supported")
    for raw, what in ((cipher_name, "cipher name"), (cipher_mode, "cipher mode"),
                      (hash_spec, "hash spec")):
        if b"\0" not in raw:
            raise FormatError(f"LUKS header {what} is not NUL terminated")
    if payload_sector < LUKS_HEADER_SECTORS:
        raise FormatError("LUKS payload is overlapping with the header")
    if mk_iters == 0:
        raise FormatError("LUKS key iteration count is zero")
    for i, (active, iters, _, start1, stripes) in enumerate(slots):
        len1 = _split_key_sectors(key_len, stripes)
        if stripes != LUKS_STRIPES:
            raise FormatError(f"Keyslot {i} is corrupted (stripes {_c_int(stripes)} != "
                              f"{LUKS_STRIPES})")
        if active not in (LUKS_SLOT_DISABLED, LUKS_SLOT_ENABLED):
            raise FormatError(f"Keyslot {i} state (active/disable) is corrupted")
        if active == LUKS_SLOT_ENABLED and iters == 0:
            raise FormatError(f"Keyslot {i} iteration count is zero")
        if start1 < LUKS_HEADER_SECTORS:
            raise FormatError(f"Keyslot {i} is overlapping with the LUKS header")
        if (start1 + len1) & _U32 > payload_sector:
            raise FormatError(f"Keyslot {i} is overlapping with the encrypted payload")
        for j in range(i + 1, LUKS_NUM_SLOTS):
            start2, stripes2 = slots[j][3], slots[j][4]
            if _ranges_overlap(start1, len1, start2, _split_key_sectors(key_len, stripes2)):
                raise FormatError(f"Keyslots {i} and {j} are overlapping in the header")


def _lookup(name: str, names: Any, what: str) -> str:
    if name not in names:
        raise FormatError(f"{what} '{name}' not supported")
    return name


def _essiv_check(cipher_alg: str, family: str, ivhash: str) -> None:
    """qcrypto_block_luks_essiv_cipher(): the ESSIV cipher must take the hash's digest
    as its key."""
    digest = _HASH_DIGEST[ivhash]
    if digest == _KEY_LEN[cipher_alg]:
        return
    if family not in _ESSIV_FAMILY:
        raise FormatError(f"Cipher {cipher_alg} not supported with essiv")
    if digest not in _CIPHER_SIZES[family]:
        raise FormatError(f"No {_ESSIV_FAMILY[family]} cipher with key size {digest} available")


def _parse_luks_header(fields: tuple[Any, ...]) -> dict[str, str]:
    """qcrypto_block_luks_parse_header(): the algorithms, by QEMU's names."""
    cipher_name, mode_spec, hash_spec, key_len = fields[2], fields[3], fields[4], fields[6]
    spec = _c_string(mode_spec)
    if "-" not in spec:
        raise FormatError(f"Unexpected cipher mode string format '{spec}'")
    mode, ivgen = spec.split("-", 1)
    ivhash = None
    if ":" in ivgen:
        ivgen, ivhash = ivgen.split(":", 1)
        _lookup(ivhash, _HASH_DIGEST, "Hash algorithm")
    _lookup(mode, _CIPHER_MODES, "Cipher mode")
    key_bytes = key_len // 2 if mode == "xts" else key_len
    family = _c_string(cipher_name)
    cipher_alg = _CIPHER_SIZES.get(family, {}).get(key_bytes)
    if cipher_alg is None:
        raise FormatError(f"Algorithm '{family}' with key size {_c_int(key_bytes)} bytes "
                          "not supported")
    hash_alg = _lookup(_c_string(hash_spec), _HASH_DIGEST, "Hash algorithm")
    _lookup(ivgen, _IVGENS, "IV generator")
    out = {"cipher-alg": cipher_alg, "cipher-mode": mode, "ivgen-alg": ivgen,
           "hash-alg": hash_alg}
    if ivgen == "essiv":
        if ivhash is None:
            raise FormatError("Missing IV generator hash specification")
        _essiv_check(cipher_alg, family, ivhash)
        out["ivgen-hash-alg"] = ivhash
    return out


def luks_info(read: Callable[[int, int], bytes]) -> dict[str, Any]:
    """The ``encrypt`` block of ``qemu-img info`` for a LUKS image, from its LUKS1 header.

    *read(position, length)* reads the LUKS header area (it refuses what lies past the
    area's length, and reads zeros past the end of the file).  Raises
    :class:`FormatError` with QEMU's message for a header QEMU refuses.  The keys come
    in qemu-img's order (its QDict's).
    """
    buf = read(0, LUKS_HEADER_SIZE)
    fields = LUKS_HEADER.unpack_from(buf, 0)
    slots = [LUKS_SLOT.unpack_from(buf, LUKS_HEADER.size + i * LUKS_SLOT.size)
             for i in range(LUKS_NUM_SLOTS)]
    _check_luks_header(fields, slots)
    algs = _parse_luks_header(fields)
    payload_sector, mk_iters, uuid = fields[5], fields[9], fields[10]
    slot_info: list[dict[str, Any]] = []
    for active, iters, _, key_sector, stripes in slots:
        enabled = active == LUKS_SLOT_ENABLED
        slot: dict[str, Any] = {"active": enabled}
        if enabled:
            slot["iters"] = iters
        slot["key-offset"] = key_sector * LUKS_SECTOR
        if enabled:
            slot["stripes"] = stripes
        slot_info.append(slot)
    out: dict[str, Any] = {"ivgen-alg": algs["ivgen-alg"], "hash-alg": algs["hash-alg"],
                           "cipher-alg": algs["cipher-alg"], "uuid": _c_string(uuid)}
    if "ivgen-hash-alg" in algs:
        out["ivgen-hash-alg"] = algs["ivgen-hash-alg"]
    out.update({"format": "luks", "cipher-mode": algs["cipher-mode"], "slots": slot_info,
                "payload-offset": payload_sector * LUKS_SECTOR, "master-key-iters": mk_iters})
    return out


def open_encryption(hdr: Header, pread: Callable[[int, int], bytes], *,
                    metadata_only: bool) -> dict[str, Any] | None:
    """What an open does about encryption, after the header was parsed.

    Returns None for an image that is not encrypted, else the ``encrypt`` block of
    ``qemu-img info`` (LUKS: parsed from its header through *pread(offset, length)*,
    which reads zeros past the end of the file).  An open for data
    (*metadata_only* false) is refused with :class:`EncryptedImage`
    (:data:`KEY_REQUIRED`), as QEMU refuses one without a key.  A LUKS image without
    a crypto header extension is refused either way: QEMU refuses it for data
    ("Missing CRYPTO header") and qemu-img 7.2's ``info`` crashes on it.
    """
    method = hdr.crypt_method
    if method == CRYPT_NONE:
        return None
    area = crypto_extension(hdr) if method == CRYPT_LUKS else None
    if method == CRYPT_LUKS and area is None:
        raise FormatError(f"Missing CRYPTO header for crypt method {method}")
    if not metadata_only:
        raise EncryptedImage(KEY_REQUIRED)
    if area is None:
        return {"format": "aes"}
    offset, length = area

    def read(pos: int, size: int) -> bytes:
        if pos + size > length:
            raise FormatError("Request for data outside of extension header")
        if offset + pos + size > MAX_IO_END:  # QEMU's block layer: EIO
            raise FormatError("Could not read encryption header: Input/output error")
        return pread(offset + pos, size)

    return luks_info(read)
