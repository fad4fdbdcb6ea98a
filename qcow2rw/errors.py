"""The qcow2rw exception hierarchy.

Every error that comes from the image's content or from a misuse of the API is a
:class:`Qcow2Error`.  Errors of the host file itself (``EIO``, ``ENOSPC``, a missing
file) propagate as the :class:`OSError` subclasses the operating system raised.
"""

from __future__ import annotations


class Qcow2Error(Exception):
    """Root of every error qcow2rw raises on its own account."""


class FormatError(Qcow2Error):
    """The file is not a valid qcow2 image (bad magic, impossible header field, ...)."""


class UnsupportedFeature(Qcow2Error):
    """The image uses a feature qcow2rw does not (yet) support."""


class CorruptImage(Qcow2Error):
    """Metadata reached at run time is inconsistent (and the image may be marked corrupt)."""


class EncryptedImage(UnsupportedFeature):
    """The image is encrypted (AES or LUKS): qcow2rw takes no key, so its guest data can be
    neither read nor written.  Its metadata can: ``qcow2rw.open(path, metadata_only=True)``
    gives ``info``, ``map`` and ``check``."""


class DataFileRefused(Qcow2Error):
    """The image names its own external data file, and the caller did not say to use it.

    A data file named inside an image is an arbitrary-file read/write primitive for
    untrusted images (CVE-2024-32498): ``qcow2rw.open`` uses it only when the caller
    passes the file (``data_file=PATH``, CLI ``--data-file PATH``) or trusts the image
    (``trust_data_file=True``, CLI ``--trust-data-file``); protocol names (``json:``,
    ``nbd:``, ...) are refused even then.
    """


class DirectIOUnsupported(UnsupportedFeature):
    """``cache="none"`` asked for a file on a file system that refuses ``O_DIRECT``
    (tmpfs before Linux 6.6, some FUSE and network file systems): the file opens
    without it, not with it.  The message is qemu-img's ("Could not open '...':
    filesystem does not support O_DIRECT")."""


class ReadOnlyImage(Qcow2Error):
    """A write was attempted on an image opened read-only (or turned read-only)."""


class SyncFailed(ReadOnlyImage):
    """An fsync of the host file failed: the image turned read-only for good.

    What was written since the last successful flush may or may not be on disk, and
    the kernel may already have dropped the dirty pages, so no later flush can make
    it durable: every write and flush is refused from then on (the "fsyncgate"
    lesson).  Close the image and check it (``qemu-img check``) before using it again.
    """


class SnapshotNotFound(Qcow2Error):
    """No internal snapshot has the given id or name."""


class ImageLocked(Qcow2Error):
    """Another process (qemu-img, qemu-io, QEMU or qcow2rw) holds a conflicting lock."""


class BackingChainError(FormatError):
    """The backing chain cannot be opened: missing file, a loop, or too deep."""


class ClosedImage(Qcow2Error, ValueError):
    """The image has been closed."""


class DeadlockError(Qcow2Error, RuntimeError):
    """A wait that could never end was refused.

    E.g. the thread inside ``with img.exclusive():`` waiting for a request of an
    :class:`~qcow2rw.aio.AioImage` (``f.result()``, ``aio.close()``): the request needs
    the image, which that thread does not release before it leaves the block.
    """


class BadSetting(Qcow2Error, ValueError):
    """A setting taken from the environment has a value qcow2rw cannot use
    (``QCOW2RW_DIRECT_ALIGN``): the user's mistake, told in one line by the CLI."""


class OutOfRange(Qcow2Error, ValueError):
    """A request reaches past the end of the virtual disk (or has a negative offset)."""


class ClusterAllocated(Qcow2Error):
    """A compressed write aimed at a guest cluster that is already allocated.

    A compressed cluster is written whole and only where nothing is (QEMU: "compression
    can't overwrite anything"); the image is left unchanged.
    """
