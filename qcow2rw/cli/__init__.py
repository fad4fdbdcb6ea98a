"""The ``qcow2rw`` command line, in qemu-img's language.

``qcow2rw VERB [options]`` with qemu-img's option names where the meaning is the same
(``-f``, ``-b``/``-F``, ``-o key=value,...``, ``--output=human|json``, ``-U``), and output
laid out as qemu-img 7.2 lays it out, so that scripts written for qemu-img read ours.

One module per group of verbs, each may import :mod:`qcow2rw` (the public API),
``qcow2rw.units``, ``qcow2rw.errors``, ``qcow2rw.backing`` and ``qcow2rw.check``;
only ``dev`` imports the devkit.  Nothing outside ``cli/`` imports the command line.

- ``common``    the parser class, ``CliError``, QEMU option lists, shared options
- ``output``    qemu-img's layouts: info (human, JSON order), snapshot table, map
- ``examine``   ``info``, ``map``, ``check``
- ``snapshot``  ``snapshot -l/-c/-a/-d``
- ``create``    ``create``, ``resize``, ``amend``
- ``compare``   ``compare``: two images' contents, with qemu-img's verdicts and exit codes
- ``convert``   ``convert``: copy an image into a new qcow2 or raw one (``-c`` compressed)
- ``measure``   ``measure``: the size a conversion or creation needs, as qemu-img figures it
- ``dev``       ``demo``, ``stress``, ``bench`` (engines in :mod:`qcow2rw.devkit`)

Adding a verb: write ``add_VERB(subparsers)`` in the module of its group; it registers
the verb's parser and sets ``func`` to a ``(argparse.Namespace) -> int`` handler; append
it to ``COMMANDS``.  Verbs that take negative sizes (``resize img -1M``) must pop the
size from argv before argparse sees it, as qemu-img does (argparse reads ``-1M`` as an
option).

Errors are one line on stderr, ``qcow2rw: <message>``, and exit status 1 (argparse's
usage errors included); a traceback is printed only when ``QCOW2RW_DEBUG`` is set.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from qcow2rw.cli.compare import add_compare
from qcow2rw.cli.convert import add_convert
from qcow2rw.cli.common import (PROG, ArgumentParser, CliError, Handler, Subparsers, one_line,
                                parse_bool, parse_number, parse_option_list, path_combine)
from qcow2rw.cli.create import add_amend, add_create, add_resize, fix_resize_argv
from qcow2rw.cli.dev import add_bench, add_demo, add_stress
from qcow2rw.cli.examine import add_check, add_info, add_map
from qcow2rw.cli.measure import add_measure
from qcow2rw.cli.output import (format_info_human, format_map_json, format_snapshot_table,
                                info_json_order)
from qcow2rw.cli.snapshot import add_snapshot
from qcow2rw.errors import Qcow2Error
from qcow2rw.nbd.cli import add_parser as add_serve
from qcow2rw.units import parse_size, size_to_str

COMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    add_create, add_info, add_map, add_check, add_snapshot, add_resize, add_amend,
    add_compare, add_convert, add_measure, add_demo, add_stress, add_bench, add_serve,
)


#: Verbs whose options come from the devkit: their parsers are complete only when the
#: command line names them (the devkit is not imported for other commands).
_DEVKIT_VERBS: dict[Callable[..., None], str] = {add_demo: "demo", add_stress: "stress",
                                                 add_bench: "bench"}


def build_parser(verb: str | None = None) -> ArgumentParser:
    """The top-level parser with one subparser per entry of ``COMMANDS`` (the devkit
    verbs' options only for *verb*, the command about to run; all when None)."""
    parser = ArgumentParser(prog=PROG,
                            description="A pure-Python driver for QEMU's qcow2 images, "
                                        "with qemu-img's verbs and options.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        name = _DEVKIT_VERBS.get(add)
        if name is not None:
            add(subparsers, full=verb is None or verb == name)
        else:
            add(subparsers)
    return parser


def _fail(message: str, code: int = 1) -> int:
    sys.stderr.write(f"{PROG}: {one_line(message)}\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (the console script passes it to ``sys.exit``)."""
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(next((w for w in words if not w.startswith("-")), ""))
    try:
        args = parser.parse_args(fix_resize_argv(words))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    handler: Handler = args.func
    filename = getattr(args, "filename", None)
    try:
        return handler(args)
    except CliError as exc:
        return _fail(str(exc))
    except Qcow2Error as exc:
        message = one_line(str(exc)) or type(exc).__name__
        if filename and filename not in message:
            message = f"{filename}: {message}"
        return _fail(message)
    except BrokenPipeError:
        # The reader went away (``qcow2rw map img | head``): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as exc:
        if exc.filename is not None and exc.strerror:
            return _fail(f"'{exc.filename}': {exc.strerror}")
        return _fail(str(exc) or type(exc).__name__)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # a bug: still one line, unless asked for the traceback
        if os.environ.get("QCOW2RW_DEBUG"):
            raise
        return _fail(f"internal error: {type(exc).__name__}: {exc} "
                     "(set QCOW2RW_DEBUG=1 for a traceback)")


__all__ = ["COMMANDS", "PROG", "ArgumentParser", "CliError", "build_parser", "fix_resize_argv",
           "format_info_human", "format_map_json", "format_snapshot_table", "info_json_order",
           "main", "parse_bool", "parse_number", "parse_option_list", "parse_size",
           "path_combine", "size_to_str"]
