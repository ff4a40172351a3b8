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

    p = sub.add_parser("run", help="run the daemon (no config: one UART on a new pty)")
    p.add_argument("--config", metavar="FILE", help="TOML config (default: the embedded one)")

    p = sub.add_parser("resume", help="run the daemon, resuming a UART from a checkpoint")
    p.add_argument("file", help="checkpoint file")
    p.add_argument("--config", metavar="FILE", help="TOML config (default: the embedded one)")
    p.add_argument("--port", metavar="URL", help="resume on this port instead of the saved one")

    p = sub.add_parser("status", help="show the running daemon's UARTs")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _control_options(p)

    p = sub.add_parser("checkpoint", help="checkpoint the running daemon's UARTs")
    p.add_argument("--uart", metavar="NAME", help="only this UART")
    p.add_argument("--output", metavar="FILE", help="write here instead of the state directory")
    p.add_argument("--stop", action="store_true", help="quiesce, checkpoint every UART, stop")
    _control_options(p)

    p = sub.add_parser("inspect", help="decode and validate a checkpoint file")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("file")

    p = sub.add_parser("console", help="an interactive terminal on a UART, over its bus")
    from .console import add_arguments

    add_arguments(p)
    return parser


def _control_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="find the daemon through this config")
    p.add_argument("--control", metavar="PATH", help="the daemon's control socket")


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
    command: str = args.command
    if command in ("run", "resume"):
        from . import daemon

        return daemon.run_command(args) if command == "run" else daemon.resume_command(args)
    if command in ("status", "checkpoint"):
        from . import control

        if command == "status":
            return control.status_command(args)
        return control.checkpoint_command(args)
    if command == "inspect":
        from .inspect import inspect_command

        return inspect_command(args)
    if command == "check-config":
        from .config import check_config_command

        return check_config_command(args)
    if command == "console":
        from .console import console_command

        return console_command(args)
    raise AssertionError(f"unhandled command {args.command}")
