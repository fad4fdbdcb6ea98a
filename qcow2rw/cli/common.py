"""What every verb of the command line shares: the parser, the error, option lists.

QEMU's ``key=value,...`` option lists, its boolean and number option values, the
common options (``-f``, ``--output``, ``-U``, ``-q``, ``-o``) and the one-line error.
Sizes are :mod:`qcow2rw.units`; backing names are resolved by :mod:`qcow2rw.backing`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeAlias

from qcow2rw.backing import resolve_name
from qcow2rw.units import UsageError

PROG = "qcow2rw"

#: A problem with the command's arguments found after parsing (one line, exit 1).
#: The same class as :class:`qcow2rw.units.UsageError`, which a bad size raises.
CliError = UsageError

#: QEMU's ``path_combine``: a backing name taken relative to the image that names it.
path_combine = resolve_name

Handler = Callable[[argparse.Namespace], int]
Subparsers: TypeAlias = "argparse._SubParsersAction[ArgumentParser]"


def one_line(message: str) -> str:
    """Fold a possibly multi-line message into one line."""
    parts = [part.strip() for part in message.splitlines() if part.strip()]
    return "; ".join(parts) if parts else message.strip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse with qemu-img-like errors: one line on stderr and exit status 1."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --out must not mean --output
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print ``qcow2rw: [VERB: ]message`` and exit 1 (argparse would print usage, exit 2)."""
        verb = self.prog[len(PROG):].strip() if self.prog.startswith(PROG) else self.prog
        prefix = f"{PROG}: {verb}: " if verb else f"{PROG}: "
        sys.stderr.write(prefix + one_line(message) + "\n")
        sys.exit(1)


# --------------------------------------------------------------------------------------
# Option lists, as QEMU parses them


def parse_option_list(text: str) -> list[tuple[str, str | None]]:
    """Split QEMU's ``key=value,key=value`` list; ``,,`` is a literal comma.

    Returns ``(key, value)`` pairs in order; ``value`` is None for a bare word
    (``help``).  Empty items (a trailing comma) are skipped.
    """
    items: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == ",":
            if text.startswith(",,", i):
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    items.append("".join(current))
    pairs: list[tuple[str, str | None]] = []
    for item in items:
        if not item:
            continue
        key, sep, value = item.partition("=")
        pairs.append((key, value if sep else None))
    return pairs


def parse_bool(key: str, value: str) -> bool:
    """Parse a QEMU boolean option value (``on``/``off``, ``yes``/``no``, ``true``/``false``)."""
    lowered = value.lower()
    if lowered in ("on", "yes", "true", "y"):
        return True
    if lowered in ("off", "no", "false", "n"):
        return False
    raise CliError(f"Parameter '{key}' expects 'on' or 'off'")


def parse_number(key: str, value: str) -> int:
    """Parse a QEMU number option value (decimal, or hex with ``0x``)."""
    try:
        return int(value, 16) if value.lower().startswith("0x") else int(value, 10)
    except ValueError:
        raise CliError(f"Parameter '{key}' expects a number") from None


# --------------------------------------------------------------------------------------
# Options several verbs take


def add_fmt(p: argparse.ArgumentParser) -> None:
    """``-f FMT`` (only qcow2; see :func:`require_qcow2`)."""
    p.add_argument("-f", dest="fmt", default="qcow2", metavar="FMT",
                   help="image format (only qcow2)")


def add_output(p: argparse.ArgumentParser) -> None:
    """``--output=human|json``."""
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="output format (default human)")


def add_force_share(p: argparse.ArgumentParser, note: str = "") -> None:
    """``-U``/``--force-share``; *note* ends the help text (e.g. ``" (-l only)"``)."""
    p.add_argument("-U", "--force-share", action="store_true",
                   help=f"open even if another process holds the image for writing{note}")


def add_data_file(p: argparse.ArgumentParser) -> None:
    """``--data-file PATH`` and ``--trust-data-file``: how an image with an external data
    file may be opened for data (safe by default: see :mod:`qcow2rw.datafile`)."""
    p.add_argument("--data-file", metavar="PATH",
                   help="the external data file of an image that has one (qemu's "
                        "-o data-file.filename=PATH)")
    p.add_argument("--trust-data-file", action="store_true",
                   help="open the data file the image names (by default refused: an "
                        "untrusted image could name any file on the host)")


def data_file_options(args: argparse.Namespace) -> dict[str, Any]:
    """``qcow2rw.open`` keywords from :func:`add_data_file`'s options."""
    return {"data_file": getattr(args, "data_file", None),
            "trust_data_file": getattr(args, "trust_data_file", False)}


def add_quiet(p: argparse.ArgumentParser,
              text: str = "quiet (accepted for qemu-img compatibility)") -> None:
    """``-q``."""
    p.add_argument("-q", dest="quiet", action="store_true", help=text)


def add_options(p: argparse.ArgumentParser,
                text: str = "comma-separated key=value options (repeatable)") -> None:
    """``-o key=value,...`` (repeatable: the lists are merged in order)."""
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help=text)


def require_qcow2(fmt: str) -> None:
    """Refuse an ``-f`` other than qcow2."""
    if fmt != "qcow2":
        raise CliError(f"Unknown file format '{fmt}' (qcow2rw reads qcow2 images only)")


def refuse_shared_write(args: argparse.Namespace) -> None:
    """``-U`` on a verb that writes the image (qemu-img's message)."""
    raise CliError(f"Could not open '{args.filename}': force-share=on can only be used "
                   "with read-only images")


@contextmanager
def progress_bar(enabled: bool, desc: str) -> Iterator[Callable[[int, int], None] | None]:
    """``-p``: a tqdm bar on stderr when *enabled* and stderr is a terminal, as a
    ``progress(done, total)`` callback (bytes; the bar is made at the first call, when
    the total is known); None otherwise (silent when piped)."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm
    bars: list[Any] = []

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=desc, leave=False, file=sys.stderr))
        bars[0].update(done - bars[0].n)

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()


def parse_snapshot_param(text: str | None) -> Any:
    """``-l`` of convert and measure: ``ID_OR_NAME`` as it is, or
    ``snapshot.id=ID,snapshot.name=NAME`` (either or both) as an (id, name) pair
    (:data:`qcow2rw.snapshot.SnapshotSelector`)."""
    if text is None or not text.startswith("snapshot."):
        return text
    fields = dict(parse_option_list(text))
    for key in fields:
        if key not in ("snapshot.id", "snapshot.name"):
            raise CliError(f"Invalid parameter '{key}' (failed in parsing snapshot "
                           f"param '{text}')")
    return fields.get("snapshot.id"), fields.get("snapshot.name")
