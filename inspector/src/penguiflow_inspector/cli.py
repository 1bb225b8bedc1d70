"""``pf``: inspect, follow, export and demo PenguiFlow traces.

``pf export`` works (see :mod:`penguiflow_inspector.export`); the other
commands say plainly that they are not available yet rather than pretending to
work.

Exit status: 0 success, 1 a runtime failure (store, collector, output file),
2 a usage error (bad flags, an unknown or ambiguous trace id).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import export

#: (command, one-line help) in the order ``pf --help`` lists them.
COMMANDS: tuple[tuple[str, str], ...] = (
    ("inspect", "open the trace viewer on one trace (a unique id prefix is enough)"),
    ("traces", "list recent traces, newest first, with filters"),
    ("tail", "follow live traces as their events arrive"),
    ("export", "rebuild a stored trace's spans and send them over OTLP or write OTLP-JSON"),
    ("demo", "run a built-in demo flow, record it, and print its trace id"),
)


def build_parser() -> argparse.ArgumentParser:
    """Return the ``pf`` argument parser with every planned sub-command."""
    parser = argparse.ArgumentParser(
        prog="pf",
        description="Inspect, follow and export PenguiFlow traces.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == "export":
            export.add_arguments(cmd)
        else:
            cmd.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pf``; returns the process exit status."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    if ns.command == "export":
        return export.run(ns)
    print(
        f"pf {ns.command}: not available in this build yet; "
        "it arrives with the StateStore and inspector releases.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
