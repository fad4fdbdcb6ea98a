"""Sizes as QEMU parses and prints them: ``64k``, ``1.5M``, ``0x10000`` in; ``64 MiB`` out.

Shared by the command line, the devkit (demo, bench, stress) and the tools, so that
none of them imports the CLI for a size.  Imports nothing of qcow2rw.
"""

from __future__ import annotations

import math
import re

INT64_MAX = (1 << 63) - 1

_SIZE_RE = re.compile(r"\s*\+?(0[xX][0-9a-fA-F]+|[0-9]+)(\.[0-9]*)?([bBkKmMgGtTpPeE]?)\Z")
_SUFFIX_SHIFT = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


class UsageError(Exception):
    """What the user typed cannot be used: a size, a number, an option, an argument.

    One line; the command line prints it as ``qcow2rw: <message>`` and exits 1
    (``qcow2rw.cli.CliError`` is this class).
    """


def parse_size(text: str, what: str = "image size") -> int:
    """Parse a size as qemu-img 7.2 does (``qemu_strtosz``).

    A plain number is bytes (decimal, or hex with ``0x``); the suffixes ``b``, ``k``,
    ``M``, ``G``, ``T``, ``P``, ``E`` (any case) are powers of 1024; a decimal fraction is
    allowed with a suffix other than ``b`` (``1.5M``) and the result is truncated.
    Raises :class:`UsageError` for anything else or for a result above ``INT64_MAX``.
    """
    m = _SIZE_RE.match(text)
    if m is None:
        raise UsageError(f"Invalid {what} specified '{text}'. You may use k, M, G, T, P or E "
                         "suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes "
                         "and exabytes.")
    digits, fraction_text, suffix = m.groups()
    hexadecimal = digits[:2].lower() == "0x"
    value = int(digits, 16) if hexadecimal else int(digits, 10)
    fraction = float("0" + fraction_text) if fraction_text else 0.0
    multiplier = 1 << _SUFFIX_SHIFT[suffix.lower()]
    if (fraction_text and hexadecimal) or (fraction and multiplier == 1):
        raise UsageError(f"Invalid {what} specified '{text}': a fraction needs a k, M, G, T, "
                         "P or E suffix")
    result = value * multiplier + int(fraction * multiplier)
    if result > INT64_MAX:
        raise UsageError(f"Invalid {what} specified. Must be between 0 and {INT64_MAX}.")
    return result


def size_to_str(value: int) -> str:
    """Format a byte count as QEMU's ``size_to_str`` does: ``64 MiB``, ``456 KiB``, ``2.19 MiB``."""
    suffixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    _, exponent = math.frexp(value / (1000.0 / 1024.0))
    index = min(max(0, (exponent - 1) // 10), len(suffixes) - 1)
    return "%0.3g %sB" % (value / (1 << (index * 10)), suffixes[index])
