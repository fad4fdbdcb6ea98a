"""Export a qcow2 image over NBD: ``qcow2rw serve`` and :func:`serve`.

Pure Python, threads, no dependency beyond the standard library.  Modules:

- ``proto``       protocol constants, wire layouts, error values, reply builders
- ``handshake``   the fixed-newstyle handshake (options until GO or EXPORT_NAME)
- ``export``      one exported image: flags, metadata contexts, block status
- ``connection``  the transmission phase of one client (reader thread, replies)
- ``server``      listening sockets, accept thread, shutdown; :func:`serve`
- ``cli``         the ``serve`` verb (argparse setup and its handler)

Library use::

    import qcow2rw, qcow2rw.nbd
    img = qcow2rw.open("disk.qcow2")
    server = qcow2rw.nbd.serve(img, socket_path="/tmp/disk.sock")
    print(server.uri())          # nbd+unix:///?socket=/tmp/disk.sock
    server.image.create_snapshot("s1")   # exclusive: in-flight NBD requests drain first
    server.close()               # finish requests, flush; the image stays open
    img.close()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .export import CACHE_MODES, Export
    from .server import DEFAULT_PORT, Server, serve

__all__ = ["CACHE_MODES", "DEFAULT_PORT", "Export", "Server", "serve"]

_HOMES = {"CACHE_MODES": "proto", "Export": "export", "DEFAULT_PORT": "server",
          "Server": "server", "serve": "server"}


def __getattr__(name: str) -> Any:
    """The package's names on first use (PEP 562): every ``qcow2rw`` command builds the
    ``serve`` parser, which needs ``qcow2rw.nbd.cli`` only, not the server."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'qcow2rw.nbd' has no attribute {name!r}")
    from importlib import import_module
    return getattr(import_module(f".{home}", __name__), name)
