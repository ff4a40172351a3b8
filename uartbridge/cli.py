"""The ``uartbridge`` command line: argument parsing and dispatch, nothing else.

Each subcommand lives in its module as ``*_command(args) -> int`` (an exit code, sysexits.h
values from ``errors``). A ``UartBridgeError`` that escapes becomes a one-line message on
stderr and its exit code: never a traceback for a user mistake.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .errors import EX_USAGE, UartBridgeError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="uartbridge",
        description="A checkpointable 16550A UART for emulators, wired to a real serial port.",
    )
    parser.add_argument("--version", action="version", version=f"uartbridge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("inspect", help="decode and validate a checkpoint file")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors; sysexits says 64
        return EX_USAGE if exc.code not in (0, None) else 0
    try:
        return dispatch(args)
    except UartBridgeError as exc:
        print(f"uartbridge: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def dispatch(args: argparse.Namespace) -> int:
    """Call the subcommand's implementation (imported lazily, so ``--help`` stays fast)."""
    if args.command == "inspect":
        from .inspect import inspect_command

        return inspect_command(args)
    raise AssertionError(f"unhandled command {args.command}")
