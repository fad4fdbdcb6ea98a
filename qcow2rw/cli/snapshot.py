"""The ``snapshot`` verb: list, create, apply or delete internal snapshots (``-l/-c/-a/-d``).

Creating, applying and deleting take the image exclusively; the list is qemu-img's
table (:func:`qcow2rw.cli.output.format_snapshot_table`).
"""

from __future__ import annotations

import argparse
import sys

import qcow2rw
from qcow2rw.cli.common import (CliError, Subparsers, add_data_file, add_force_share,
                                add_quiet, data_file_options, one_line,
                                refuse_shared_write)
from qcow2rw.cli.output import format_snapshot_table
from qcow2rw.errors import Qcow2Error, SnapshotNotFound


def _cmd_snapshot(args: argparse.Namespace) -> int:
    """``qemu-img snapshot``: one of -l, -c, -a, -d (none: nothing to do, as qemu-img)."""
    actions = [(flag, value) for flag, value in (("l", args.list), ("c", args.create),
                                                  ("a", args.apply), ("d", args.delete))
               if value not in (None, False)]
    if len(actions) > 1:
        raise CliError("Cannot mix '-l', '-a', '-c', '-d'")
    if not actions:
        return 0
    action, name = actions[0]
    if action != "l" and args.force_share:
        refuse_shared_write(args)
    img = qcow2rw.open(args.filename, readonly=action == "l", force_share=args.force_share,
                       **data_file_options(args))
    try:
        if action == "l":
            snapshots = [snap.info() for snap in img.snapshots()]
            if snapshots:
                sys.stdout.write("\n".join(format_snapshot_table(snapshots)) + "\n")
            return 0
        verb = {"c": "create", "a": "apply", "d": "delete"}[action]
        try:
            if action == "c":
                img.create_snapshot(name)
            elif action == "a":
                img.apply_snapshot(name)
            else:
                img.delete_snapshot(name)
        except SnapshotNotFound:  # (qemu-img's words)
            reason = ("snapshot not found" if action == "d"
                      else "Failed to load snapshot: No such file or directory")
            raise CliError(f"Could not {verb} snapshot '{name}': {reason}") from None
        except Qcow2Error as exc:
            raise CliError(f"Could not {verb} snapshot '{name}': {one_line(str(exc))}") from None
    finally:
        img.close()
    return 0


def add_snapshot(subparsers: Subparsers) -> None:
    """``snapshot [-l | -c SNAPSHOT | -a SNAPSHOT | -d SNAPSHOT] [-U] [-q] FILENAME``."""
    p = subparsers.add_parser(
        "snapshot", help="list, create, apply or delete internal snapshots",
        description="Like 'qemu-img snapshot': -l lists the internal snapshots in "
                    "qemu-img's table layout (see 'info --output=json' for JSON), -c "
                    "creates one, -a reverts the image to one, -d deletes one.  A snapshot "
                    "is named by its ID or its tag (the ID is tried first).  The image is "
                    "taken exclusively; creating a second snapshot with a tag already in "
                    "use is refused.")
    p.add_argument("-l", dest="list", action="store_true", help="list the snapshots")
    p.add_argument("-c", dest="create", metavar="SNAPSHOT", help="create a snapshot")
    p.add_argument("-a", dest="apply", metavar="SNAPSHOT", help="apply (revert to) a snapshot")
    p.add_argument("-d", dest="delete", metavar="SNAPSHOT", help="delete a snapshot")
    add_force_share(p, " (-l only)")
    add_quiet(p)
    add_data_file(p)
    p.add_argument("filename")
    p.set_defaults(func=_cmd_snapshot)
