"""The control socket: one JSON object per line, request and reply, and its CLI commands.

Requests (one line each, at most ``MAX_LINE_BYTES``):

    {"cmd": "status"}
    {"cmd": "checkpoint", "uart": "uart0" | null, "output": "/path" | null, "stop": false}

Replies: ``{"ok": true, ...}`` or ``{"ok": false, "error": "...", "exit_code": N}``. A line
that is not a JSON object, an unknown command or a bad field gets an error reply and the
connection is closed; the daemon and its UARTs carry on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import EX_OK, EX_USAGE, ControlError, UartBridgeError
from .paths import control_socket_path, default_runtime_dir
from .sockets import PeerCredentials, bind_unix, peer_credentials

if TYPE_CHECKING:
    from .daemon import Daemon

MAX_LINE_BYTES = 64 * 1024
REQUEST_TIMEOUT_S = 30.0


class ControlServer:
    """Serves status and checkpoint requests for one daemon."""

    def __init__(
        self,
        daemon: Daemon,
        path: Path,
        *,
        peer_allowed: Callable[[PeerCredentials], bool],
    ) -> None:
        self.daemon = daemon
        self.path = path
        self.peer_allowed = peer_allowed
        self._server: asyncio.AbstractServer | None = None
        self.log = daemon.log.bind(component="control")

    async def start(self) -> None:
        """Listen on the control socket (mode 0660)."""
        sock = bind_unix(self.path, mode=0o660)
        self._server = await asyncio.start_unix_server(
            self._serve, sock=sock, limit=MAX_LINE_BYTES
        )

    async def close(self) -> None:
        """Stop listening and remove the socket file."""
        if self._server is not None:
            self._server.close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            peer = peer_credentials(sock)
            if not self.peer_allowed(peer):
                self.log.warning("control peer refused", uid=peer.uid, pid=peer.pid)
                await _reply(writer, _error("permission denied", EX_USAGE))
                return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await _reply(writer, _error("request line too long", EX_USAGE))
                    return
                if not line:
                    return
                try:
                    request = _parse(line)
                    reply, then = await self._handle(request)
                except ControlError as exc:
                    await _reply(writer, _error(str(exc), EX_USAGE))
                    return
                except UartBridgeError as exc:
                    reply, then = _error(str(exc), exc.exit_code), None
                await _reply(writer, reply)
                if then is not None:
                    then()
                    return
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()

    async def _handle(self, request: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        cmd = request.get("cmd")
        if cmd == "status":
            return {"ok": True, **self.daemon.status()}, None
        if cmd == "checkpoint":
            uart = request.get("uart")
            output = request.get("output")
            stop = request.get("stop", False)
            if uart is not None and (type(uart) is not str or uart not in self.daemon.services):
                raise ControlError(f"no UART named {uart!r}")
            if output is not None and type(output) is not str:
                raise ControlError("'output' must be a path string")
            if type(stop) is not bool:
                raise ControlError("'stop' must be true or false")
            if output is not None and uart is None and len(self.daemon.services) > 1:
                raise ControlError("--output needs --uart when the daemon serves several UARTs")
            written = await self.daemon.checkpoint_all(
                stop=stop, only=uart, output=Path(output) if output else None
            )
            then = self.daemon.request_stop if stop else None
            return {"ok": True, "written": written, "stopped": stop}, then
        raise ControlError(f"unknown command {cmd!r}")


def _parse(line: bytes) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ControlError(f"malformed request: not JSON ({exc})") from exc
    if not isinstance(request, dict):
        raise ControlError("malformed request: expected a JSON object")
    return request


def _error(message: str, exit_code: int) -> dict[str, Any]:
    return {"ok": False, "error": message, "exit_code": exit_code}


async def _reply(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
    writer.write(json.dumps(reply).encode() + b"\n")
    await writer.drain()


# -- client side -------------------------------------------------------------------------


def request(path: Path, message: dict[str, Any], *, timeout_s: float = REQUEST_TIMEOUT_S) -> Any:
    """Send one request to a daemon's control socket and return its reply."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            with sock.makefile("rb") as stream:
                line = stream.readline(MAX_LINE_BYTES * 16)
    except FileNotFoundError as exc:
        raise ControlError(f"no daemon is listening on {path} (is uartbridge running?)") from exc
    except ConnectionRefusedError as exc:
        raise ControlError(f"no daemon is listening on {path} (connection refused)") from exc
    except TimeoutError as exc:
        raise ControlError(f"the daemon on {path} did not answer within {timeout_s:g} s") from exc
    except OSError as exc:
        raise ControlError(f"cannot talk to the daemon on {path}: {exc.strerror}") from exc
    if not line:
        raise ControlError(f"the daemon on {path} closed the connection without a reply")
    try:
        return json.loads(line)
    except ValueError as exc:
        raise ControlError(f"the daemon on {path} sent a malformed reply") from exc


def control_path(args: argparse.Namespace) -> Path:
    """The control socket a CLI command talks to: --control, --config's, or the default."""
    if getattr(args, "control", None):
        return Path(args.control)
    if getattr(args, "config", None):
        from .config import load_config

        return load_config(args.config).daemon.control_socket
    return control_socket_path(default_runtime_dir())


def _checked(reply: Any) -> dict[str, Any]:
    if not isinstance(reply, dict):
        raise ControlError("the daemon sent a malformed reply")
    if not reply.get("ok"):
        code = reply.get("exit_code")
        err = ControlError(str(reply.get("error", "request failed")))
        if type(code) is int:
            err.exit_code = code
        raise err
    return reply


def status_command(args: argparse.Namespace) -> int:
    """``uartbridge status [--json]``."""
    reply = _checked(request(control_path(args), {"cmd": "status"}))
    reply.pop("ok", None)
    if args.json:
        print(json.dumps(reply, indent=2))
        return EX_OK
    print(f"daemon pid {reply['pid']}, up {reply['uptime_s']:.0f} s, config {reply['config']}")
    if reply.get("resumed_after_crash"):
        print("  (resumed after a crash: see each UART's resumed_from age)")
    for u in reply["uarts"]:
        held = (u.get("link") or {}).get("held_by_peer")
        state = f"{u['reader_state']} (held by {held})" if held else u["reader_state"]
        print(f"{u['name']}: {state}  port {u['port']}  line {u['line']}")
        if u.get("pty"):
            print(f"  pty         {u['pty']}")
        guest = "attached" if u["guest_connected"] else "none"
        print(f"  bus         {u['bus_socket']}  guest {guest}")
        regs = u["registers"]
        print(
            "  registers   "
            + "  ".join(f"{k.upper()}={v['value']}" for k, v in regs.items())
        )
        print(f"  LSR bits    {' '.join(regs['lsr'].get('bits', [])) or '-'}")
        tsr = "busy" if u["tsr_busy"] else "empty"
        print(
            f"  FIFOs       rx {u['rx_fifo']}/16  tx {u['tx_fifo']}/16  "
            f"tsr {tsr}  tsr_retry {u['tsr_retry']}  irq {int(u['irq'])}"
        )
        link = u.get("link") or {}
        backlog = {k: v for k, v in link.items() if "backlog" in k}
        if backlog:
            print("  backlogs    " + "  ".join(f"{k} {v}" for k, v in backlog.items()))
        counters = dict(u["counters"])
        counters.update(link.get("counters", {}) if isinstance(link.get("counters"), dict) else {})
        print("  counters    " + "  ".join(f"{k}={v}" for k, v in counters.items() if v))
        ckpt = u.get("last_checkpoint")
        if ckpt:
            age_s, gen = ckpt["age_s"], ckpt["generation"]
            print(f"  checkpoint  {ckpt['path']}  {age_s:.1f} s ago  generation {gen}")
        else:
            print("  checkpoint  none yet")
        resumed = u.get("resumed_from")
        if resumed:
            age_s = resumed["age_s"]
            print(f"  resumed     {resumed['path']}  (state {age_s:.1f} s old at resume)")
    return EX_OK


def checkpoint_command(args: argparse.Namespace) -> int:
    """``uartbridge checkpoint [--uart NAME] [--output FILE] [--stop]``."""
    message: dict[str, Any] = {
        "cmd": "checkpoint",
        "uart": args.uart,
        "output": str(Path(args.output).resolve()) if args.output else None,
        "stop": bool(args.stop),
    }
    reply = _checked(request(control_path(args), message))
    for name, path in reply["written"].items():
        print(f"{name}: {path}")
    if reply.get("stopped"):
        print("daemon stopped", file=sys.stderr)
    return EX_OK

