"""Debug event points on the I/O path, like QEMU's blkdebug (DESIGN §4.8).

The image calls :meth:`EventPoints.fire` at named points; a test can make a request
stop there until it is resumed (``set_break`` / ``wait_break`` / ``resume``) or fail
there with an ``OSError`` (``inject_error``).  An image without an ``EventPoints``
object pays one attribute test per point.

Pausable points are fired with no metadata lock held (the request would otherwise
block every other request): ``cluster_alloc`` (clusters reserved and registered as
in flight, data not yet written), ``write_aio``, ``read_aio``, ``cow_read``,
``cow_write``, ``l2_update`` (about to link new clusters), ``flush_to_os``,
``flush_to_disk`` (a sync about to call fdatasync) and ``flush_to_disk_done`` (it
returned).  ``l2_writeback_start`` (a dirty cached L2 table about to be stored) and
``l2_writeback_done`` (its store returned, its dirty flag not yet cleared) pause with
that table's lock held, so a test can hold a write-back in the middle while other
threads flush.  The others (``l2_load``, ``l2_alloc``, ``cluster_free``,
``refblock_update``, ``refblock_alloc``, ``reftable_grow``, ``l1_update``, ``l1_grow``)
only take errors.
"""

from __future__ import annotations

import errno
import os
import threading

EVENTS = ("l2_load", "l2_update", "l2_alloc", "cluster_alloc", "cluster_free", "cow_read",
          "cow_write", "write_aio", "read_aio", "refblock_update", "refblock_alloc",
          "l1_update", "l1_grow", "flush_to_os", "flush_to_disk", "reftable_grow",
          "flush_to_disk_done", "l2_writeback_start", "l2_writeback_done")


class EventPoints:
    """Breakpoints and error injection at named event points.

    ``_cond`` guards every field: the armed breakpoints, the requests waiting at
    them, and the injected errors.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._breaks: set[str] = set()
        self._waiting: dict[str, int] = {}
        self._released: dict[str, int] = {}
        self._errors: dict[str, tuple[int, bool]] = {}
        self.seen: dict[str, int] = {}

    def set_break(self, name: str) -> None:
        """The next request that reaches *name* stops there (once) until :meth:`resume`."""
        self._check(name)
        with self._cond:
            self._breaks.add(name)

    def wait_break(self, name: str, timeout: float = 10.0) -> bool:
        """Wait until a request is stopped at *name*; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._waiting.get(name, 0) > 0, timeout)

    def resume(self, name: str) -> None:
        """Let the request stopped at *name* go on."""
        with self._cond:
            if self._waiting.get(name, 0) <= 0:
                raise RuntimeError(f"no request is stopped at {name!r}")
            self._released[name] = self._released.get(name, 0) + 1
            self._cond.notify_all()

    def inject_error(self, name: str, err: int = errno.EIO, *, once: bool = True) -> None:
        """Make requests fail at *name* with ``OSError(err)`` (the next one, or all)."""
        self._check(name)
        with self._cond:
            self._errors[name] = (err, once)

    def clear(self) -> None:
        """Remove every breakpoint and injected error (stopped requests stay stopped)."""
        with self._cond:
            self._breaks.clear()
            self._errors.clear()

    def fire(self, name: str) -> None:
        """Called by the image at point *name*: count it, fail or stop as armed."""
        with self._cond:
            self.seen[name] = self.seen.get(name, 0) + 1
            error = self._errors.get(name)
            if error is not None:
                if error[1]:
                    del self._errors[name]
                raise OSError(error[0], f"{os.strerror(error[0])} (injected at {name})")
            if name not in self._breaks:
                return
            self._breaks.discard(name)
            self._waiting[name] = self._waiting.get(name, 0) + 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._released.get(name, 0) > 0)
            self._released[name] -= 1
            self._waiting[name] -= 1

    @staticmethod
    def _check(name: str) -> None:
        if name not in EVENTS:
            raise ValueError(f"unknown event point {name!r}; known: {', '.join(EVENTS)}")
