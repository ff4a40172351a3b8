"""The ``uartbridge`` command line: argument parsing and dispatch, nothing else.

Each subcommand lives in its module as ``*_command(args) -> int`` (an exit code, sysexits.h
values from ``errors``). A ``UartBridgeError`` that escapes becomes a one-line message on
stderr and its exit code: never a traceback for a user mistake. Output piped into a reader
that goes away early (``| head``, ``| grep -q``) ends the command quietly with exit 0.

The parser is also the source of the man page (``uartbridge.manpage``, ``docs/uartbridge.1``):
every subcommand has a one-line ``help``, a ``description``, help for each argument and an
``epilog`` of examples.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap
from collections.abc import Sequence

from . import __version__
from .errors import EX_OK, EX_USAGE, UartBridgeError

DESCRIPTION = "A checkpointable 16550A UART for emulators, wired to a real serial port."
EXIT_STATUS = """\
exit status (sysexits.h):
  0   ok                          1   replay: the run diverged from its recording
  64  usage error                 65  bad checkpoint or recording (corrupt, inconsistent)
  66  missing or unreadable input file (config, checkpoint, recording)
  69  port or daemon unavailable  70  internal error
  73  cannot create (read-only or forbidden state directory, --output)
  74  I/O error (state directory full or failing; see the emergency copy)
  75  another daemon holds the state directory
  78  config error"""

# (name, help, description, epilog). The order is the man page's.
COMMANDS: list[tuple[str, str, str, str]] = [
    (
        "run",
        "run the daemon (no config: one UART on a new pty)",
        "Serve the UARTs of a config until SIGTERM, SIGINT or `checkpoint --stop`; each UART "
        "resumes from its newest checkpoint in the state directory. Without --config: "
        "/etc/uartbridge/uartbridge.toml if it exists, else one UART uart0 on a pty the "
        "daemon creates. SIGHUP re-reads the config (logging and [checkpoint] apply at "
        "once; anything else is named as needing a restart).",
        "examples:\n"
        "  uartbridge run\n"
        "  uartbridge run --config /etc/uartbridge/ttyUSB0.toml -v\n"
        "  uartbridge run --config /tmp/walk/walk.toml --record /tmp/walk/run.ubrec",
    ),
    (
        "resume",
        "run the daemon, resuming a UART from a checkpoint file",
        "Like run, but the UART of FILE starts from FILE. The checkpoint's UART name must be "
        "one of the config's UARTs (or name it with --uart): its state is then saved where "
        "that config looks for it.",
        "examples:\n"
        "  uartbridge resume /tmp/walk/state/uart0.checkpoint.json --config /tmp/walk/walk.toml\n"
        "  uartbridge resume uart0.json --port rfc2217://otherhost:7000\n"
        "  uartbridge resume console.json --config ttyUSB0.toml --uart uart0",
    ),
    (
        "status",
        "show the running daemons and their UARTs",
        "Reader state, registers, FIFOs, backlogs, counters and the last checkpoint of each "
        "UART. With no option, every uartbridge running on this host (the single service "
        "and each uartbridge@NAME instance).",
        "examples:\n"
        "  uartbridge status\n"
        "  uartbridge status --instance ttyUSB0 --json\n"
        "  uartbridge status --config /tmp/walk/walk.toml",
    ),
    (
        "restart",
        "restart the daemon in place, keeping its ports and sockets open",
        "The daemon first starts an understudy: the same command line in a new process (the "
        "config re-read, newly installed code loaded). If that fails (a bad config, an import "
        "error) the restart is abandoned, the daemon serves on and this says why (non-zero "
        "exit). Otherwise the daemon writes its final checkpoint and hands the state (in "
        "memory) and its port descriptors and bus and control sockets to the understudy, "
        "which serves while the daemon re-executes itself (same PID); the new run then takes "
        "everything back. The port is never closed (DTR/RTS stay as the guest set them, the "
        "far end sees no hang-up) and a client connecting meanwhile waits instead of being "
        "refused; a connected guest is disconnected twice, each time for one quiesce and "
        "resume, not for the start-up. Waits until the new run answers and prints how long "
        "it took. Under systemd, `systemctl restart` keeps the ports through the fd store "
        "instead.",
        "examples:\n"
        "  uartbridge restart --config /tmp/walk/walk.toml\n"
        "  uartbridge restart --instance ttyUSB0",
    ),
    (
        "checkpoint",
        "checkpoint a running daemon's UARTs (and optionally stop it)",
        "Write a checkpoint of each UART (or one) between two bus operations; the daemon "
        "goes on. --stop quiesces the ports first, writes every UART's final checkpoint and "
        "stops the daemon. --output FILE is written by this command, with your rights. When "
        "several daemons run, name one.",
        "examples:\n"
        "  uartbridge checkpoint --config /tmp/walk/walk.toml\n"
        "  uartbridge checkpoint --stop --instance ttyUSB0\n"
        "  uartbridge checkpoint --uart uart0 --output saved.json",
    ),
    (
        "replay",
        "run a recording again on the model, with no port, and compare",
        "Re-run every UART of a recording (uartbridge run --record FILE) from its initial "
        "state through the same inputs at the same times, and check that each register "
        "read, IRQ edge and transmitted byte is what the recording saw. Exit 0 identical, "
        "1 at the first divergence (printed), 65 not a valid recording, 66 missing.",
        "examples:\n"
        "  uartbridge replay /tmp/walk/run.ubrec\n"
        "  uartbridge replay run.ubrec --print | less",
    ),
    (
        "inspect",
        "decode and validate a checkpoint file",
        "Print a checkpoint's registers, FIFOs, backlogs and counters, and check every "
        "consistency rule (exit 65 if one fails).",
        "examples:\n"
        "  uartbridge inspect /var/lib/uartbridge/uart0.checkpoint.json\n"
        "  uartbridge inspect saved.json --json",
    ),
    (
        "check-config",
        "validate a config file",
        "Read a config and print a summary of what the daemon would run; an error names "
        "the file, the key and what was expected (exit 78).",
        "examples:\n"
        "  uartbridge check-config /etc/uartbridge/ttyUSB0.toml\n"
        "  uartbridge check-config          # /etc/uartbridge/uartbridge.toml",
    ),
    (
        "console",
        "an interactive terminal on a UART, as its guest, over the bus",
        "Attach to a UART's bus socket as its guest driver: keys go to the UART's "
        "transmitter, what it receives goes to the terminal (Ctrl-] exits). Piped stdin is "
        "sent until EOF, then output is copied until --linger seconds of silence. Refused "
        "while an emulator is attached.",
        "examples:\n"
        "  uartbridge console\n"
        "  uartbridge console --instance ttyUSB0 --uart uart0\n"
        "  echo hello | uartbridge console --socket /tmp/walk/run/uart0.bus",
    ),
]


def version_text() -> str:
    """``uartbridge VERSION, <build>``, and the event loop ``event_loop = "auto"`` takes."""
    from .buildinfo import build_name
    from .eventloop import uvloop_version

    uvloop = uvloop_version()
    loop = f"uvloop {uvloop}" if uvloop else "asyncio (uvloop not installed)"
    return f"uartbridge {__version__}, {build_name()}, {loop}"


class _VersionAction(argparse.Action):
    """``--version``: what is running is looked up when asked (it imports the hot modules)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "show the version, the build and the event loop, and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="uartbridge",
        description=DESCRIPTION,
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    parsers: dict[str, argparse.ArgumentParser] = {}
    for name, help_text, description, epilog in COMMANDS:
        parsers[name] = sub.add_parser(
            name,
            help=help_text,
            description=textwrap.fill(description, width=79),
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = parsers["run"]
    p.add_argument("--config", metavar="FILE",
                   help="TOML config (default: /etc/uartbridge/uartbridge.toml if it exists, "
                        "else the embedded one)")
    _record_option(p)
    _log_options(p)

    p = parsers["resume"]
    p.add_argument("file", metavar="FILE", help="the checkpoint file to start from")
    p.add_argument("--config", metavar="FILE", help="TOML config (default: as for run)")
    p.add_argument("--uart", metavar="NAME",
                   help="resume into the config's UART NAME (when it is named differently)")
    p.add_argument("--port", metavar="URL", help="resume on this port instead of the config's")
    _record_option(p)
    _log_options(p)

    p = parsers["replay"]
    p.add_argument("file", metavar="FILE", help="the recording")
    p.add_argument("--print", action="store_true",
                   help="print every record as it is replayed (reads with their values, "
                        "writes, IRQ edges, bytes in and out)")

    p = parsers["status"]
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _control_options(p)

    _control_options(parsers["restart"])

    p = parsers["checkpoint"]
    p.add_argument("--uart", metavar="NAME", help="only this UART")
    p.add_argument("--output", metavar="FILE",
                   help="write the checkpoint to FILE instead of the state directory (this "
                        "command writes it, with your rights; relative to your directory)")
    p.add_argument("--stop", action="store_true", help="quiesce, checkpoint every UART, stop")
    _control_options(p)

    p = parsers["inspect"]
    p.add_argument("file", metavar="FILE", help="the checkpoint file")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = parsers["check-config"]
    p.add_argument("file", metavar="FILE", nargs="?", default=None,
                   help="the config (default: /etc/uartbridge/uartbridge.toml)")

    from .console import add_arguments

    add_arguments(parsers["console"])
    return parser


def _control_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="the daemon running this config")
    p.add_argument("--instance", metavar="NAME",
                   help="the daemon of uartbridge@NAME (uartbridge: the single service)")
    p.add_argument("--control", metavar="PATH", help="the daemon's control socket")


def _record_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--record", metavar="FILE",
                   help="record every UART's inputs (bus operations, far-end bytes and line "
                        "events, modem changes, with their times) to FILE, for `uartbridge "
                        "replay` (mode 0600; replaced if it exists)")


def _log_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="minimum log level (overrides the config's daemon.log_level)")
    p.add_argument("--log-format", choices=("auto", "json", "console"),
                   help="log format (overrides the config's daemon.log_format)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    try:
        code = _run(argv)
        # A piped stdout is block-buffered: a reader that left (`| head`) shows only at this
        # flush, which would otherwise be the interpreter's own at exit (a traceback, 120).
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _reader_went_away()


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors; sysexits says 64
        return EX_USAGE if exc.code not in (0, None) else 0
    try:
        return dispatch(args)
    except UartBridgeError as exc:
        with contextlib.suppress(OSError, ValueError):
            print(f"uartbridge: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _reader_went_away() -> int:
    """stdout's reader left (``| head``): stop quietly, and keep the interpreter's final
    flush of stdout from failing again."""
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    return EX_OK


def dispatch(args: argparse.Namespace) -> int:
    """Call the subcommand's implementation (imported lazily, so ``--help`` stays fast)."""
    command: str = args.command
    if command in ("run", "resume"):
        from . import daemon

        return daemon.run_command(args) if command == "run" else daemon.resume_command(args)
    if command in ("status", "checkpoint", "restart"):
        from . import control

        if command == "status":
            return control.status_command(args)
        if command == "restart":
            return control.restart_command(args)
        return control.checkpoint_command(args)
    if command == "replay":
        from .record import replay_command

        return replay_command(args)
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
