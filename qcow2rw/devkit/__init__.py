"""The developer kit: the user commands that exercise the library, not the library itself.

Shipped because ``qcow2rw demo``, ``qcow2rw bench`` and ``qcow2rw stress`` are user
commands; never imported by the engine (every module of ``qcow2rw`` outside
``devkit/`` and ``cli/``).  These modules import the public API, ``qcow2rw.units`` and
``qcow2rw.errors``, and never the command line.

- ``demo``    ``qcow2rw demo``: a thread pool drives a new image through futures, verified
- ``bench``   ``qcow2rw bench``: ``qemu-img bench`` over an ``AioImage``
- ``stress``  ``qcow2rw stress``: many threads on one image, checked by the oracle
- ``oracle``  stress's sector stamps, shared-region model and read checks
- ``chaos``   stress's chaos thread: snapshots and growth while the workers run
"""
