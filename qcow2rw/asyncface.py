"""An asyncio face over an :class:`~qcow2rw.image.Image`: :class:`AsyncImage` (issue 11 §5).

``await img.read(...)``, ``await img.write(...)``, ``async with``.  Every call is one
request of an :class:`~qcow2rw.aio.AioImage` (a thread pool over the image); the
coroutine waits for its future without ever blocking the event loop.

Cancellation is what sets this apart from ``await asyncio.wrap_future(f)``.  Cancelling
the wrapper of a ``concurrent.futures`` future calls ``f.cancel()``, which cannot stop a
request that is already running: ``asyncio.wait_for(aio_write, 0.05)`` raises
``TimeoutError`` while a 256 MiB write goes on to its end behind the caller's back.
Here, when the task awaiting a request is cancelled (``task.cancel()``, a
``wait_for`` or ``asyncio.timeout`` deadline, ``asyncio.run`` ending):

1. the request is cancelled with :meth:`AioImage.cancel`: a queued one is withdrawn
   and never touches the image, a running one stops at its next cluster-run boundary
   (at most ``cancel.MAX_RUN_BYTES`` of I/O later);
2. the coroutine then waits, shielded, until the request has really ended, and only
   then raises ``CancelledError`` (which ``wait_for``/``timeout`` turn into
   ``TimeoutError``).  So once the await has ended, in any way, nothing of the request
   runs any more: no byte lands after a timeout, and the buffer given to ``write`` or
   ``readinto`` is free to reuse.  A task cancelled again while it waits for the stop
   keeps waiting (the wait is bounded by one cluster run), then ends cancelled.
3. Each cluster of a cancelled write holds its old or its new data (DESIGN §5).  A
   request that finished before it noticed the cancellation (the cancel lost the race;
   a flush, resize or snapshot that was already running: those are never stopped
   halfway) has done all its work; the task ends cancelled all the same, as asyncio
   wants.

Inline completion (issue 16): a read the page cache serves at once, or an overwrite
the file system takes at once, completes in the calling thread (``inline="auto"``,
:class:`~qcow2rw.aio.AioImage`); its await returns without a trip through the pool or
the event loop, so there is nothing to cancel.  Such an await is no suspension point:
a task that loops over cached reads does not let other tasks run until one of them
goes to the pool (or it awaits something else, e.g. ``asyncio.sleep(0)``); a
cancellation of the task is seen at its next real await.

A request that ends cancelled without its task being cancelled (someone called
``aio.cancel(f)`` on a borrowed pool, or shut it down with ``cancel_futures=True``)
raises ``CancelledError`` too, as ``f.result()`` would.  Errors of a request (e.g.
:class:`~qcow2rw.errors.ReadOnlyImage`, ``OSError``) are raised by the await unchanged.

Ownership.  ``AsyncImage(img)`` makes its own pool and shuts it down on
:meth:`AsyncImage.aclose` (also on leaving ``async with``); ``AsyncImage(aio)`` borrows
an existing pool and leaves it running.  Either way the image stays open (DESIGN §2: a
pool does not own its image), unless ``close_image=True`` was given or the AsyncImage
opened the image itself (:meth:`AsyncImage.open`, :meth:`AsyncImage.create`).  Closing
drains: it waits for every request submitted through this AsyncImage, in a thread of
its own, so the event loop runs on meanwhile.

Locks: ``AsyncImage._lock`` (a plain lock) guards ``_pending`` and ``_closed``; it is
held only around a submission (the pool's own lock nests inside it, briefly) and
around set updates, never while waiting, never while a future's callbacks run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, TypeVar

from .aio import DEFAULT_WORKERS, AioFuture, AioImage
from .create import create as create_image
from .errors import ClosedImage
from .image import open_image

if TYPE_CHECKING:
    from .image import Image

__all__ = ["AsyncImage"]

_T = TypeVar("_T")


async def _outlast(fut: asyncio.Future[Any]) -> None:
    """Wait until *fut* is done, even if the calling task is cancelled meanwhile.

    ``asyncio.wait`` never cancels what it waits for, so a cancellation of the caller
    only interrupts one round of waiting; the loop swallows it and waits again.  The
    outcome of *fut* is marked retrieved (no "exception was never retrieved" log).
    """
    while not fut.done():
        try:
            await asyncio.wait((fut,))
        except asyncio.CancelledError:
            continue  # cancelled again: the work is still stopping; wait it out
    if not fut.cancelled():
        fut.exception()


class AsyncImage:
    """``await``-able requests on a qcow2 image; see the module docstring.

    Args:
        target: an :class:`~qcow2rw.image.Image` (a new :class:`AioImage` of
            *workers* threads is made for it and shut down by :meth:`aclose`), or an
            :class:`AioImage` to borrow (left running by :meth:`aclose`).
        workers: threads of the new pool (only with an Image; default 8).
        close_image: :meth:`aclose` closes the image too, after the pool.

    Requests keep a reference to the buffers they were given until their await ends;
    do not change a ``write``'s data or read a ``readinto``'s buffer before that.
    """

    def __init__(self, target: Image | AioImage, *, workers: int | None = None,
                 close_image: bool = False, inline: str | None = None) -> None:
        if isinstance(target, AioImage):
            if workers is not None or inline is not None:
                raise ValueError("workers and inline are for a new pool; this AioImage has "
                                 "its own")
            self._aio = target
            self._owns_pool = False
        else:
            self._aio = AioImage(target, workers=DEFAULT_WORKERS if workers is None else workers,
                                 inline="auto" if inline is None else inline)
            self._owns_pool = True
        self._close_image = close_image
        #: Guards ``_pending`` and ``_closed`` (see the module docstring).
        self._lock = threading.Lock()
        self._pending: set[AioFuture[Any]] = set()  # submitted here, not finished
        self._closed = False
        self._closing: concurrent.futures.Future[None] | None = None

    # Opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, workers: int | None = None,
             inline: str | None = None, **options: Any) -> _Opening:
        """Open the image at *path* (``qcow2rw.open`` options) in a worker thread.

        Returns something to ``await`` (an AsyncImage that owns the image: its
        :meth:`aclose` closes the image) or to use as ``async with``::

            async with AsyncImage.open("disk.qcow2", readonly=True) as img:
                data = await img.read(0, 4096)

        Cancelled while the image is being opened: the open runs to its end and the
        image is closed again before ``CancelledError`` is raised.
        """
        return _Opening(lambda: open_image(path, **options), workers, inline)

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int, *, workers: int | None = None,
               inline: str | None = None, **options: Any) -> _Opening:
        """Create an image (``qcow2rw.create`` options) in a worker thread; as :meth:`open`."""
        return _Opening(lambda: create_image(path, size, **options), workers, inline)

    # What it wraps ------------------------------------------------------------------
    @property
    def image(self) -> Image:
        """The image the requests run on."""
        img: Image = self._aio.image
        return img

    @property
    def aio(self) -> AioImage:
        """The thread pool the requests run in."""
        return self._aio

    @property
    def size(self) -> int:
        """The image's virtual size in bytes."""
        return self.image.size

    @property
    def cluster_size(self) -> int:
        """The image's cluster size in bytes."""
        return self.image.cluster_size

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has begun: no new request is accepted."""
        return self._closed

    @property
    def pending(self) -> int:
        """Requests submitted through this AsyncImage that have not ended yet.

        A request counts as ended once its call on the image has returned: this is
        zero as soon as every await on this AsyncImage has ended.
        """
        with self._lock:
            return len(self._pending)

    # Requests (shared) --------------------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes:
        """``image.read(offset, length)``."""
        return await self._settle(self._submit(self._aio.submit_read, offset, length))

    async def readinto(self, offset: int, buffer: Any) -> int:
        """``image.readinto(offset, buffer)``; returns the number of bytes read.

        When cancelled, *buffer* may hold part of the data (it is no longer written
        once ``CancelledError`` is raised).
        """
        return await self._settle(self._submit(self._aio.submit_readinto, offset, buffer))

    async def write(self, offset: int, data: Any) -> None:
        """``image.write(offset, data)``: any offset and length.

        When cancelled, each cluster holds its old or its new data.
        """
        await self._settle(self._submit(self._aio.submit_write, offset, data))

    async def discard(self, offset: int, length: int) -> None:
        """``image.discard(offset, length)``."""
        await self._settle(self._submit(self._aio.submit_discard, offset, length))

    async def write_zeroes(self, offset: int, length: int) -> None:
        """``image.write_zeroes(offset, length)``."""
        await self._settle(self._submit(self._aio.submit_write_zeroes, offset, length))

    async def flush(self) -> None:
        """``image.flush()``: durable are the writes whose await ended before it.

        Not interrupted once started: a cancelled task waits for it to end.
        """
        await self._settle(self._submit(self._aio.submit_flush))

    # Requests (exclusive: they wait for the requests before them) -------------------
    async def resize(self, size: int, *, shrink: bool = False) -> None:
        """``image.resize(size, shrink=shrink)`` (not interrupted once started)."""
        await self._settle(self._submit(self._aio.submit_resize, size, shrink))

    async def create_snapshot(self, name: str) -> Any:
        """``image.create_snapshot(name)`` (not interrupted once started)."""
        return await self._settle(self._submit(self._aio.submit_snapshot, name))

    async def apply_snapshot(self, name: str) -> Any:
        """``image.apply_snapshot(name)`` (not interrupted once started)."""
        return await self._settle(self._submit(self._aio.submit_apply_snapshot, name))

    async def delete_snapshot(self, name: str) -> Any:
        """``image.delete_snapshot(name)`` (not interrupted once started)."""
        return await self._settle(self._submit(self._aio.submit_delete_snapshot, name))

    # The machinery --------------------------------------------------------------------
    def _submit(self, submit: Callable[..., AioFuture[_T]], *args: Any) -> AioFuture[_T]:
        """Submit a request to the pool and count it as pending until it ends.

        Raises:
            ClosedImage: :meth:`aclose` has begun.
        """
        with self._lock:
            if self._closed:
                raise ClosedImage("I/O operation on a closed AsyncImage")
            future = submit(*args)
            if future.completed_inline:
                return future  # (born finished: nothing to wait for, nothing to stop)
            self._pending.add(future)
        # Registered before the asyncio wrapper's callback: the count drops before the
        # awaiting task is woken.  (Runs at once if the request has already ended.)
        future.add_done_callback(self._ended)
        return future

    def _ended(self, future: AioFuture[Any]) -> None:
        """Done-callback of every request (a worker's thread, or a canceller's)."""
        with self._lock:
            self._pending.discard(future)

    async def _settle(self, future: AioFuture[_T]) -> _T:
        """Await *future*; if the awaiting task is cancelled, cancel the request, wait
        until it has really ended, then raise the CancelledError (module docstring)."""
        if future.completed_inline:  # (no round trip through the loop's self-pipe)
            return future.result()
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # Either the request ended cancelled by itself (done already: nothing
            # runs), or our task was cancelled: the wrapper's cancel() withdrew the
            # request if it was queued, but a running one goes on until told.
            if not future.done():
                self._aio.cancel(future)
                await _outlast(asyncio.wrap_future(future))
            raise

    # Closing ----------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Refuse new requests, wait for those submitted here, shut down the pool if
        it is ours, and close the image if it is ours; never blocks the event loop.

        The work runs in a thread of its own.  Cancelling this await cancels the
        requests it was waiting for (their awaits end cancelled) and still waits until
        the close has finished.  Calling it again waits for the same close (and raises
        the same error, if closing the image failed).
        """
        with self._lock:
            self._closed = True
            closing = self._closing
            start = closing is None
            if closing is None:
                closing = self._closing = concurrent.futures.Future()
        if start:
            threading.Thread(target=self._close_in_thread, args=(closing,),
                             name="qcow2rw-asyncimage-close").start()
        done = asyncio.wrap_future(closing)
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            if not closing.done():
                with self._lock:
                    draining = list(self._pending)
                for future in draining:
                    self._aio.cancel(future)
                await _outlast(done)
            raise

    def _close_in_thread(self, closing: concurrent.futures.Future[None]) -> None:
        """The blocking part of :meth:`aclose` (its own thread)."""
        try:
            with self._lock:
                draining = list(self._pending)
            concurrent.futures.wait(draining)
            if self._owns_pool:
                self._aio.close()
            if self._close_image:
                self.image.close()
        except BaseException as exc:  # noqa: BLE001 - handed to every aclose() caller
            closing.set_exception(exc)
        else:
            closing.set_result(None)

    async def __aenter__(self) -> AsyncImage:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.pending} pending"
        return f"<AsyncImage over {self._aio!r}: {state}>"


class _Opening:
    """What :meth:`AsyncImage.open` and :meth:`AsyncImage.create` return: ``await`` it
    for an AsyncImage that owns its image, or use it as ``async with`` (closed on exit)."""

    def __init__(self, make: Callable[[], Image], workers: int | None,
                 inline: str | None = None) -> None:
        self._make = make
        self._workers = workers
        self._inline = inline
        self._entered: AsyncImage | None = None

    def _build(self) -> AsyncImage:
        """Open the image and start its pool (a worker thread of the loop's executor)."""
        img = self._make()
        try:
            return AsyncImage(img, workers=self._workers, close_image=True, inline=self._inline)
        except BaseException:
            img.close()
            raise

    async def _open(self) -> AsyncImage:
        loop = asyncio.get_running_loop()
        building = loop.run_in_executor(None, self._build)
        try:
            return await asyncio.shield(building)
        except asyncio.CancelledError:
            # The open cannot be interrupted: let it end, then close what it opened.
            await _outlast(building)
            if not building.cancelled() and building.exception() is None:
                await _outlast(asyncio.ensure_future(building.result().aclose()))
            raise

    def __await__(self) -> Generator[Any, None, AsyncImage]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncImage:
        self._entered = await self._open()
        return self._entered

    async def __aexit__(self, *exc: object) -> None:
        entered, self._entered = self._entered, None
        if entered is not None:
            await entered.aclose()
