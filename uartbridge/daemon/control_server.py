"""The daemon's side of the control socket (the protocol and its CLI are ``uartbridge.control``).

``ControlServer`` answers one JSON request per line for a ``ControlTarget`` (the daemon): it
knows the requests, not the daemon, so that the daemon imports it and not the other way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..control import MAX_LINE_BYTES
from ..errors import EX_USAGE, ControlError, UartBridgeError
from ..sockets import PeerCredentials, bind_unix, peer_credentials


class ControlTarget(Protocol):
    """What the control socket asks of a daemon."""

    services: dict[str, Any]
    log: Any

    def status(self) -> dict[str, Any]: ...

    async def checkpoint_all(
        self, *, stop: bool, only: str | None = None, output: Path | None = None
    ) -> dict[str, str]: ...

    def request_stop(self) -> None: ...


class ControlServer:
    """Serves status and checkpoint requests for one daemon."""

    def __init__(
        self,
        daemon: ControlTarget,
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
