"""The ``compare`` verb: ``qemu-img compare``'s messages and exit codes.

Exit status as qemu-img's: 0 identical, 1 different, 2 an image cannot be opened,
3 a block status query failed, 4 a read failed (argparse's usage errors: 1, as
qemu-img's).  The verdict lines go to stdout; an error is one line on stderr.
"""

from __future__ import annotations

import argparse
import errno
import sys

from qcow2rw.cli.common import (PROG, Subparsers, add_force_share, add_quiet, one_line,
                                progress_bar)
from qcow2rw.compare import CompareFailed, CompareSource, compare_sources, open_source
from qcow2rw.errors import Qcow2Error


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"{PROG}: {one_line(message)}\n")
    return code


def _open_error(path: str, exc: BaseException) -> str:
    """qemu-img's message for an image it cannot open."""
    if isinstance(exc, OSError):
        if exc.errno == errno.EISDIR:
            return f"Could not open '{path}': 'file' driver requires '{path}' to be a regular file"
        reason = exc.strerror or str(exc)
        return f"Could not open '{path}': Could not open '{path}': {reason}"
    return f"Could not open '{path}': {one_line(str(exc)) or type(exc).__name__}"


def _cmd_compare(args: argparse.Namespace) -> int:
    sources: list[CompareSource] = []
    try:
        for path, fmt in ((args.image1, args.fmt1), (args.image2, args.fmt2)):
            try:
                sources.append(open_source(path, fmt, force_share=args.force_share,
                                           trust_data_file=args.trust_data_file))
            except (OSError, Qcow2Error) as exc:
                return _fail(_open_error(path, exc), 2)
        with progress_bar(args.progress and not args.quiet, "compare") as progress:
            try:
                result = compare_sources(sources[0], sources[1], strict=args.strict,
                                         progress=progress)
            except CompareFailed as exc:
                return _fail(str(exc), exc.exit_code)
            except (OSError, Qcow2Error) as exc:
                return _fail(str(exc) or type(exc).__name__, 4)
        if not args.quiet:
            sys.stdout.write("".join(line + "\n" for line in result.messages))
        return result.exit_code
    finally:
        for source in sources:
            source.close()


def add_compare(subparsers: Subparsers) -> None:
    """``compare [-f FMT] [-F FMT] [-s] [-p] [-q] [-U] FILENAME1 FILENAME2``."""
    p = subparsers.add_parser(
        "compare", help="check whether two images have the same content",
        description="Like 'qemu-img compare': compare the guest contents of two images "
                    "(qcow2 with its backing chain, or raw). Images of different sizes "
                    "are identical when the larger one's extra tail reads as zeros. Exit "
                    "status: 0 identical, 1 different, 2 cannot open an image, 3 block "
                    "status failed, 4 read error.")
    p.add_argument("-f", dest="fmt1", metavar="FMT",
                   help="format of the first image: qcow2 or raw (default: probed)")
    p.add_argument("-F", dest="fmt2", metavar="FMT",
                   help="format of the second image: qcow2 or raw (default: probed)")
    p.add_argument("-s", dest="strict", action="store_true",
                   help="strict mode: fail on a different image size or block status")
    p.add_argument("-p", dest="progress", action="store_true",
                   help="show a progress bar (on a terminal only)")
    add_quiet(p, "quiet: print nothing, only the exit status tells")
    add_force_share(p)
    p.add_argument("--trust-data-file", action="store_true",
                   help="open the external data files the images name (by default refused: "
                        "an untrusted image could name any file on the host)")
    p.add_argument("image1", metavar="FILENAME1")
    p.add_argument("image2", metavar="FILENAME2")
    p.set_defaults(func=_cmd_compare)
