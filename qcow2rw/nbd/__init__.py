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

from .export import CACHE_MODES, Export
from .server import DEFAULT_PORT, Server, serve

__all__ = ["CACHE_MODES", "DEFAULT_PORT", "Export", "Server", "serve"]
