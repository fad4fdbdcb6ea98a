"""Backing files: resolving their names, opening the chain, reading through it.

A backing file is opened read-only.  Names are resolved as QEMU resolves them: a
relative name is relative to the directory of the image that names it.  The format
comes from the backing-format extension, else from probing the magic.  Loops are
refused and the chain's depth is capped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

from .errors import BackingChainError
from .format import QCOW_MAGIC
from .storage import HostFile

MAX_CHAIN_DEPTH = 64


class BackingSource(Protocol):
    """What an overlay needs of its backing file."""

    size: int
    filename: str
    format: str

    def read_backing(self, offset: int, view: memoryview) -> None:
        """Fill *view* with guest data from *offset*; zeros past the end."""

    def close(self) -> None:
        """Close it (and its own backing chain)."""


class RawBacking:
    """A raw file used as a backing file."""

    format = "raw"

    def __init__(self, path: str, *, force_share: bool = False, direct: bool = False) -> None:
        self.filename = path
        self.file = HostFile(path, readonly=True, force_share=force_share, direct=direct)
        self.size = self.file.size()

    def read_backing(self, offset: int, view: memoryview) -> None:
        """Fill *view* from *offset*; bytes past the end of the file read as zeros."""
        self.file.preadv([view], offset)

    def close(self) -> None:
        """Close the file."""
        self.file.close()


def resolve_name(image_path: str, name: str) -> str:
    """The path QEMU opens for backing name *name* of the image at *image_path*."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(image_path), name)


def probe_format(path: str) -> str:
    """'qcow2' when the file starts with the qcow2 magic, else 'raw'."""
    with open(path, "rb") as f:
        magic = f.read(4)
    return "qcow2" if magic == QCOW_MAGIC.to_bytes(4, "big") else "raw"


def open_backing(image_path: str, name: str, fmt: str | None, chain: tuple[str, ...],
                 *, force_share: bool = False, direct: bool = False,
                 opener: Callable[..., BackingSource]) -> BackingSource:
    """Open backing file *name* of *image_path*; *chain* holds the real paths above it.

    A qcow2 backing file is opened with *opener* (``qcow2rw.image.open_image``, which
    opens its own backing file the same way: the chain recurses through it), called
    as ``opener(path, readonly=True, force_share=..., chain=...)``.  *direct*: a raw
    backing file is opened O_DIRECT (the overlay's ``cache="none"``, which QEMU
    applies to the whole chain; *opener* then carries it for a qcow2 one).
    """
    path = resolve_name(image_path, name)
    real = os.path.realpath(path)
    if real in chain:
        raise BackingChainError(f"Backing file loop: '{path}' is already in the chain")
    if len(chain) >= MAX_CHAIN_DEPTH:
        raise BackingChainError(f"Backing chain deeper than {MAX_CHAIN_DEPTH} images")
    if not os.path.exists(path):
        raise BackingChainError(f"Could not open backing file '{path}': No such file or directory")
    if fmt is None:
        fmt = probe_format(path)
    if fmt == "raw":
        return RawBacking(path, force_share=force_share, direct=direct)
    if fmt != "qcow2":
        raise BackingChainError(f"Unsupported backing file format '{fmt}'")
    return opener(path, readonly=True, force_share=force_share, chain=chain + (real,))


def backing_chain(image: object) -> list[BackingSource]:
    """The open layers below *image*, nearest first: each an ``Image`` or a :class:`RawBacking`.

    Empty when *image* was opened without its backing file (``backing=False``).  The
    chain was checked when it was opened (no loop, at most :data:`MAX_CHAIN_DEPTH`).
    """
    layers: list[BackingSource] = []
    layer: BackingSource | None = getattr(image, "backing", None)
    while layer is not None:
        layers.append(layer)
        layer = getattr(layer, "backing", None)
    return layers
