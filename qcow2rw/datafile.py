"""External data files (incompatible bit 2): which file to open, safe by default.

An image with an external data file keeps only its metadata in the qcow2 file; guest
cluster *n* lives in the data file at host offset = guest offset, and data clusters
are not refcounted.  The header may name the data file (extension 0x44415441), but a
name read from an image is an arbitrary-file read/write primitive for untrusted
images (OpenStack's CVE-2024-32498): :func:`choose_data_file` uses it only when the
caller trusts the image, and never a protocol name (``json:{...}``, ``nbd:...``).

QEMU 7.2 opens the name as given, relative to the current directory (not to the
image's directory, unlike a backing file name: ``qemu-img create -o data_file=d.raw
sub/img.qcow2`` puts ``d.raw`` in the current directory and stores ``d.raw``); so does
a trusted open here.
"""

from __future__ import annotations

import os

from .errors import DataFileRefused, FormatError
from .format import AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_DATA_FILE, Header

__all__ = ["choose_data_file", "has_data_file", "has_protocol", "is_raw", "refused_message"]


def has_data_file(header: Header) -> bool:
    """The image keeps its guest data in an external data file (incompatible bit 2)."""
    return bool(header.incompatible_features & INCOMPAT_DATA_FILE)


def is_raw(header: Header) -> bool:
    """Autoclear bit 1, ``data_file_raw``: the data file is a valid raw image."""
    return bool(header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)


def has_protocol(name: str) -> bool:
    """QEMU's ``path_has_protocol``: a ``prefix:`` before any ``/`` (``json:``,
    ``nbd:``, ``file:``, ``http:`` ...)."""
    head = name.split("/", 1)[0]
    return ":" in head


def refused_message(path: str, name: str | None) -> str:
    """The error for an image whose data file the caller did not name."""
    if name is None:
        return (f"'{path}' keeps its data in an external data file and does not name it: "
                "pass the file (data_file=PATH; CLI --data-file PATH)")
    return (f"'{path}' names '{name}' as its external data file; qcow2rw does not open a "
            "file named inside an image unless told to (an untrusted image could make it "
            "read or write any file, CVE-2024-32498): pass the file (data_file=PATH; CLI "
            "--data-file PATH), or trust the image (trust_data_file=True; CLI "
            "--trust-data-file)")


def choose_data_file(path: str, header: Header, data_file: str | os.PathLike[str] | None,
                     trust: bool) -> str | None:
    """The data file to open for the image at *path*, or None (no external data file).

    *data_file* (the caller's file) wins; else with *trust* the header's name, as QEMU
    opens it; else :class:`DataFileRefused`.  QEMU's errors for a data file given to
    an image without one, and for ``data_file_raw`` without a data file.
    """
    if not has_data_file(header):
        if data_file is not None:
            raise FormatError("'data-file' can only be set for images with an external "
                              "data file")
        if is_raw(header) and header.version >= 3:
            raise FormatError("data-file-raw requires a data file")
        return None
    if data_file is not None:
        return os.fspath(data_file)
    name = header.data_file
    if not trust or name is None:
        if trust:  # (QEMU's words)
            raise DataFileRefused(f"'data-file' is required for this image ({path} names "
                                  "no data file: pass data_file=PATH; CLI --data-file PATH)")
        raise DataFileRefused(refused_message(path, name))
    if not name or has_protocol(name):
        raise DataFileRefused(f"'{path}' names '{name}' as its external data file: a "
                              "protocol name or an empty one is never opened, even with "
                              "trust_data_file; pass the file (data_file=PATH; CLI "
                              "--data-file PATH)")
    return name
