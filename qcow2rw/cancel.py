"""Cancellation of running requests at cluster boundaries.

A request given a :class:`CancelToken` checks it between the runs of clusters it
works on (a run is at most one L2 table and at most ``MAX_RUN_BYTES``); once the
token is cancelled the request stops there and raises :class:`RequestCancelled`.
Every cluster it already wrote holds its new data, every other its old data, and
the request leaves no lock, pin, in-flight record or in-use count behind.
"""

from __future__ import annotations

from .errors import Qcow2Error

MAX_RUN_BYTES = 1 << 20  # a cancellable request checks its token at least this often


class RequestCancelled(Qcow2Error):
    """Raised inside a request whose token was cancelled (the future ends cancelled)."""


class CancelToken:
    """A flag a running request polls at cluster boundaries.

    Setting it is a single attribute store, safe from any thread.
    """

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        """Ask the request to stop at its next cluster boundary."""
        self.cancelled = True

    def check(self) -> None:
        """Raise :class:`RequestCancelled` if cancellation was asked for."""
        if self.cancelled:
            raise RequestCancelled("request cancelled")
