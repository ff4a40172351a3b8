"""``uartbridge console``: a terminal on a UART, as its guest, over the register bus.

The console *is* the guest driver (``Guest8250``): keys go to the UART's transmitter, what
the UART receives goes to stdout. Interactive (stdin is a TTY): raw mode, exit with Ctrl-].
Otherwise stdin is piped to the UART until EOF, then the transmitter is drained and output is
copied for as long as the UART keeps receiving (until ``--linger`` seconds of silence).

Only one guest may hold a UART: while an emulator is attached, the console is refused (BUSY).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import sys
import termios
import time
import tty
from pathlib import Path

from . import paths
from .client import BusClient, parse_target
from .errors import EX_UNAVAILABLE, EX_USAGE, BusError, ConfigError, ControlError
from .guest import Guest8250

EXIT_KEY = 0x1D  # Ctrl-]
DEFAULT_UART = "uart0"
DEFAULT_LINGER_S = 0.5
_READ_SIZE = 4096


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The console's options, for ``cli.build_parser``."""
    parser.add_argument(
        "--uart", default=None, metavar="NAME",
        help=f"the UART to attach to (default: the daemon's only one, else {DEFAULT_UART})",
    )
    parser.add_argument(
        "--socket",
        default=None,
        metavar="PATH",
        help="the UART's bus socket, or tcp:HOST:PORT (default: found through the daemon)",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="the daemon's config: its UART's bus socket"
    )
    parser.add_argument(
        "--instance", metavar="NAME",
        help="the running daemon of uartbridge@NAME (uartbridge: the single service)",
    )
    parser.add_argument(
        "--control", metavar="PATH", help="the daemon's control socket (asked for the bus)"
    )
    parser.add_argument("--baud", type=int, default=115200,
                        help="line speed the console programs (default 115200, 8N1)")
    parser.add_argument(
        "--linger",
        type=float,
        default=DEFAULT_LINGER_S,
        metavar="SECONDS",
        help="piped input: after EOF, keep printing until this much silence",
    )


def _target(args: argparse.Namespace) -> tuple[str, str]:
    """(the bus socket or tcp: target, the UART's name) the user asked for."""
    socket_arg = getattr(args, "socket", None)
    wanted = getattr(args, "uart", None)
    if socket_arg:
        return str(socket_arg), wanted or DEFAULT_UART
    if getattr(args, "config", None):
        from .config import load_config

        config = load_config(args.config)
        names = [u.name for u in config.uarts]
        name = wanted or (names[0] if len(names) == 1 else DEFAULT_UART)
        try:
            return str(config.uart(name).bus_socket), name
        except KeyError:
            raise ConfigError(f"{config.source}: no [[uart]] named {name!r} "
                              f"(it has {', '.join(names)})") from None
    from .control import only_daemon, resolve_target

    target = resolve_target(args)
    if target is None and "RUNTIME_DIRECTORY" in os.environ:
        name = wanted or DEFAULT_UART
        return str(paths.bus_socket_path(paths.default_runtime_dir(), name)), name
    if target is None:
        try:
            target = only_daemon("attach to")
        except ControlError as exc:
            if exc.exit_code == EX_USAGE:
                raise
            name = wanted or DEFAULT_UART
            return str(paths.bus_socket_path(paths.default_runtime_dir(), name)), name
    status = target.status or target.ask({"cmd": "status"})
    uarts = {u["name"]: u["bus_socket"] for u in status.get("uarts", [])}
    name = wanted or (next(iter(uarts)) if len(uarts) == 1 else DEFAULT_UART)
    if name not in uarts:
        raise ControlError(f"the daemon has no UART named {name!r} (it has {', '.join(uarts)})")
    return str(uarts[name]), name


def console_command(args: argparse.Namespace) -> int:
    """Run the console; returns the exit code (69 when the UART's bus is not there)."""
    target, name = _target(args)
    parsed = parse_target(target)
    if isinstance(parsed, str) and not Path(parsed).exists():
        print(
            f"uartbridge console: no bus socket for {name} at {parsed} "
            "(is the daemon running? see --socket)",
            file=sys.stderr,
        )
        return EX_UNAVAILABLE
    interactive = os.isatty(sys.stdin.fileno())
    try:
        return run_console(
            target,
            stdin_fd=sys.stdin.fileno(),
            stdout_fd=sys.stdout.fileno(),
            interactive=interactive,
            baud=getattr(args, "baud", 115200),
            linger_s=getattr(args, "linger", DEFAULT_LINGER_S),
        )
    except BusError as exc:
        print(f"\r\nuartbridge console: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def run_console(
    target: str,
    *,
    stdin_fd: int,
    stdout_fd: int,
    interactive: bool,
    baud: int = 115200,
    linger_s: float = DEFAULT_LINGER_S,
) -> int:
    """Attach to ``target`` as the guest and shuttle bytes between the fds and the UART."""
    with BusClient(target) as client:
        guest = Guest8250(client)
        guest.startup(baud)
        if interactive:
            print(
                f"--- uartbridge console on {client.name} ({target}), {baud} 8N1; "
                "exit with Ctrl-] ---",
                file=sys.stderr,
            )
            saved = termios.tcgetattr(stdin_fd)
            try:
                tty.setraw(stdin_fd)
                _pump(guest, stdin_fd, stdout_fd, interactive=True, linger_s=linger_s)
            finally:
                termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
            print("\r\n--- exit ---", file=sys.stderr)
        else:
            _pump(guest, stdin_fd, stdout_fd, interactive=False, linger_s=linger_s)
        with contextlib.suppress(BusError):
            guest.shutdown()
    return 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _pump(
    guest: Guest8250, stdin_fd: int, stdout_fd: int, *, interactive: bool, linger_s: float
) -> None:
    client = guest.client
    stdin_open = True
    quiet_since: float | None = None
    while True:
        if client.poll_events():
            timeout: float | None = 0.0
        elif not stdin_open:
            timeout = 0.05
        else:
            timeout = 1.0
        watch = [client.fileno()] + ([stdin_fd] if stdin_open else [])
        readable, _, _ = select.select(watch, [], [], timeout)
        if stdin_open and stdin_fd in readable:
            data = os.read(stdin_fd, _READ_SIZE)
            if interactive and EXIT_KEY in data:
                guest.write(data[: data.index(EXIT_KEY)])
                guest.drain(timeout=1.0)
                _write_all(stdout_fd, guest.read())
                return
            if data:
                guest.write(data)
            else:
                stdin_open = False
                guest.drain(timeout=5.0)
                quiet_since = time.monotonic()
        guest.service(0)
        received = guest.read()
        if received:
            _write_all(stdout_fd, received)
            if quiet_since is not None:
                quiet_since = time.monotonic()
        if not stdin_open and not guest.tx_queued:
            assert quiet_since is not None
            if time.monotonic() - quiet_since >= linger_s:
                return


__all__ = ["add_arguments", "console_command", "run_console"]
