"""The daemon's side of the control socket (the protocol and its CLI are ``uartbridge.control``).

``ControlServer`` answers one JSON request per line for a ``ControlTarget`` (the daemon): it
knows the requests, not the daemon, so that the daemon imports it and not the other way.

Every request gets a reply, a malformed one an error reply (``ok: false``): not JSON, nested
beyond what the parser takes, not an object, an unknown command or key, a wrong type. No
request names a path the daemon writes: a checkpoint the client wants somewhere is sent
back to it as text (``"document": true``), and the client writes it with its own rights.

Limits, so that idle or hostile clients cannot pin the daemon: at most
``MAX_CONNECTIONS`` connections at a time (a new one pushes out the oldest that is only
waiting; while every one is busy answering, accepting waits), and ``IDLE_TIMEOUT_S`` to
send each request line. Connections are accepted by ``uartbridge.listener.Listener`` (not
``asyncio.start_unix_server``), so that running out of file descriptors (EMFILE) pushes out
the oldest waiting connection and accepts again, instead of stalling every client: the one
that just connected to ask for a checkpoint gets in, and the error is logged at most once
per ``ACCEPT_LOG_INTERVAL_S`` with a count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..control import MAX_LINE_BYTES
from ..errors import (
    EX_IOERR,
    EX_SOFTWARE,
    EX_USAGE,
    ControlError,
    UartBridgeError,
)
from ..listener import Listener
from ..sockets import PeerCredentials, bind_unix, peer_credentials

MAX_CONNECTIONS = 16
IDLE_TIMEOUT_S = 10.0
# At a handover, how long connections already accepted have to send their request (a client
# sends it right after connecting) before they are dropped (``ControlServer.finish``).
HANDOVER_GRACE_S = 0.5
ACCEPT_BATCH = 16
ACCEPT_BACKOFF_S = 0.1
ACCEPT_LOG_INTERVAL_S = 10.0
# How much of an overlong request line is read and dropped so that its error reply arrives.
LINGER_BYTES = 16 * 1024 * 1024
LINGER_S = 2.0
# The keys each command takes (besides "cmd").
_KEYS = {
    "status": frozenset({"config", "instance"}),
    "checkpoint": frozenset({"uart", "stop", "document", "config", "instance"}),
    "restart": frozenset({"config", "instance"}),
}


class ControlTarget(Protocol):
    """What the control socket asks of a daemon."""

    services: dict[str, Any]
    log: Any

    def status(self) -> dict[str, Any]: ...

    async def checkpoint_all(
        self, *, stop: bool, only: str | None = None, documents: bool = False
    ) -> dict[str, Any]: ...

    def request_stop(self) -> None: ...

    async def begin_restart(self) -> None: ...

    def prepare_restart(self) -> None: ...

    def request_restart(self) -> None: ...


class _Conn:
    """One control connection, from accept on: busy while a request is being answered.

    ``writer`` is None until its task has wrapped the socket in a stream; until then the
    connection is pushed out by closing the socket itself (the descriptor is free at once).
    """

    __slots__ = ("busy", "since", "sock", "task", "wrapping", "writer")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        self.since = time.monotonic()
        self.busy = False
        self.wrapping = False  # its task is inside open_unix_connection: a transport holds it

    def close(self) -> None:
        """Drop the connection (no reply: it is only waiting)."""
        if self.writer is not None:
            self.writer.transport.abort()
            return
        if self.task is not None:
            self.task.cancel()
        if self.wrapping:
            # A transport already holds the descriptor (uvloop's holds the number, not the
            # socket object): closing it here would let the next accept reuse the number,
            # and that transport's own close (the cancel) would then close the new client.
            return
        self.sock.close()


class ControlServer:
    """Serves status and checkpoint requests for one daemon."""

    def __init__(
        self,
        daemon: ControlTarget,
        path: Path,
        *,
        peer_allowed: Callable[[PeerCredentials], bool],
        group: int | None = None,
    ) -> None:
        self.daemon = daemon
        self.path = path
        self.peer_allowed = peer_allowed
        self.group = group
        self._listener: Listener | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conns: list[_Conn] = []
        self._finishing = False  # ``finish``: each connection ends after its next reply
        self.log = daemon.log.bind(component="control")
        self.evicted = 0
        self.kept: socket.socket | None = None  # by close(keep_listening=True)
        # The socket file is ours to remove at close (False: a socket unit's, never unlinked).
        self.owned = True

    async def start(self, sock: socket.socket | None = None, *, owned: bool = True) -> None:
        """Listen on the control socket (mode 0660, ``group`` if given); ``sock``: the one
        listening there already (handed over); ``owned``: its file is ours to remove."""
        self.owned = owned or sock is None
        if sock is None:
            sock = bind_unix(self.path, mode=0o660, group=self.group)
        sock.listen(64)
        self._loop = asyncio.get_running_loop()
        self._listener = Listener(
            sock,
            self._accepted,
            log=self.log,
            name="control",
            event="control accept failed",
            level="error",
            backoff_s=ACCEPT_BACKOFF_S,
            log_interval_s=ACCEPT_LOG_INTERVAL_S,
            batch=ACCEPT_BATCH,
            # Every connection busy answering: wait; out of fds: push out a waiting one.
            admit=lambda: len(self._conns) < MAX_CONNECTIONS or self._evict_oldest(),
            make_room=self._evict_oldest,
        )

    @property
    def accept_errors(self) -> int:
        """How many accept calls failed so far."""
        return self._listener.errors if self._listener is not None else 0

    def detach_listener(self) -> None:
        """Stop accepting; the listening socket and its file stay, in ``kept``, for the next
        run (connections wait in its backlog). ``close`` then leaves both."""
        if self._listener is not None:
            self.kept = self._listener.detach()
            self._listener = None

    async def finish(self, grace_s: float = HANDOVER_GRACE_S) -> None:
        """At a handover, after ``detach_listener``: answer the request each connection
        already accepted has sent (or sends within ``grace_s``) and end it; ``close`` drops
        what is left. A client that got in just before the handover gets its reply from
        this run instead of a closed connection (the next run has the backlog)."""
        self._finishing = True
        current = asyncio.current_task()
        tasks = [c.task for c in self._conns if c.task is not None and c.task is not current]
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)

    async def close(self) -> None:
        """Stop listening and remove the socket file (unless ``detach_listener`` kept it)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self.owned:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        for conn in list(self._conns):
            conn.close()
        self._conns.clear()

    # -- accepting --------------------------------------------------------------------------

    def _accepted(self, sock: socket.socket) -> None:
        assert self._loop is not None
        conn = _Conn(sock)
        self._conns.append(conn)
        conn.task = self._loop.create_task(self._serve_conn(conn))

    def _evict_oldest(self) -> bool:
        """Close the oldest connection that is only waiting for its request; False if none."""
        waiting = [c for c in self._conns if not c.busy]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c.since)
        self._conns.remove(oldest)
        oldest.close()
        self.evicted += 1
        return True

    async def _serve_conn(self, conn: _Conn) -> None:
        conn.wrapping = True
        try:
            reader, writer = await asyncio.open_unix_connection(
                sock=conn.sock, limit=MAX_LINE_BYTES
            )
        except OSError:
            conn.sock.close()
            with contextlib.suppress(ValueError):
                self._conns.remove(conn)
            return
        conn.writer = writer
        if conn not in self._conns:  # pushed out meanwhile
            writer.transport.abort()
            return
        await self._serve(conn, reader, writer)

    async def _serve(
        self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            peer = peer_credentials(writer.get_extra_info("socket"))
            if not self.peer_allowed(peer):
                self.log.warning("control peer refused", uid=peer.uid, pid=peer.pid)
                await _reply(writer, _error("permission denied", EX_USAGE))
                return
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT_S)
                except TimeoutError:
                    await _reply(writer, _error(f"no request within {IDLE_TIMEOUT_S:g} s",
                                                EX_USAGE))
                    return
                except (ValueError, asyncio.LimitOverrunError):
                    await _reply(writer, _error("request line too long", EX_USAGE))
                    await _discard_line(reader)
                    return
                if not line:
                    return
                conn.busy = True
                try:
                    request = _parse(line)
                    reply, then = await self._handle(request)
                except ControlError as exc:
                    await _reply(writer, _error(str(exc), EX_USAGE))
                    return
                except UartBridgeError as exc:
                    reply, then = _error(str(exc), exc.exit_code), None
                except Exception as exc:
                    self.log.exception("control request failed", error=repr(exc))
                    await _reply(writer, _error(f"internal error: {exc!r}", EX_SOFTWARE))
                    return
                await _reply(writer, reply)
                conn.busy = False
                conn.since = time.monotonic()
                if then is not None:
                    then()
                    return
                if self._finishing:  # a handover: one request each, then the next run's
                    return
        except (ConnectionError, OSError, UartBridgeError):
            return
        finally:
            with contextlib.suppress(ValueError):
                self._conns.remove(conn)
            writer.close()

    async def _handle(self, request: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        cmd = request.get("cmd")
        if not isinstance(cmd, str) or cmd not in _KEYS:
            raise ControlError(f"unknown command {cmd!r}")
        unknown = set(request) - _KEYS[cmd] - {"cmd"}
        if unknown:
            raise ControlError(f"unknown key(s) for {cmd!r}: {', '.join(sorted(unknown))}")
        self._check_identity(request)
        if cmd == "status":
            return {"ok": True, **self.daemon.status()}, None
        if cmd == "restart":
            # The new code and config first, in an understudy (``understudy``): if it does
            # not come up, HandoverError says why and this run serves on.
            await self.daemon.begin_restart()
            # Before the reply: the client's next connection (to the bus or here) must wait
            # for the next run, not reach this one as it stops.
            self.daemon.prepare_restart()
            status = self.daemon.status()
            return {"ok": True, "pid": status["pid"], "restarts": status["restarts"]}, \
                self.daemon.request_restart
        uart = request.get("uart")
        stop = request.get("stop", False)
        document = request.get("document", False)
        if uart is not None and (type(uart) is not str or uart not in self.daemon.services):
            raise ControlError(f"no UART named {uart!r}")
        if type(stop) is not bool:
            raise ControlError("'stop' must be true or false")
        if type(document) is not bool:
            raise ControlError("'document' must be true or false")
        result = await self.daemon.checkpoint_all(stop=stop, only=uart, documents=document)
        then = self.daemon.request_stop if stop else None
        if result["failed"]:
            failure = "; ".join(f"{name}: {why}" for name, why in result["failed"].items())
            return {
                "ok": False,
                "error": f"{failure} (the daemon retries, then stops)",
                **result,
                "exit_code": result.get("exit_code", EX_IOERR),
                "stopped": stop,
            }, then
        return {"ok": True, **result, "stopped": stop}, then

    def _check_identity(self, request: dict[str, Any]) -> None:
        """A client that names the daemon it means (config path, instance) reaches that one
        only: a request meant for another daemon is refused before it does anything."""
        status = self.daemon.status()
        config = request.get("config")
        if config is not None:
            if not isinstance(config, str):
                raise ControlError("'config' must be a path string")
            if not _same_file(config, str(status.get("config"))):
                raise ControlError(
                    f"this daemon (pid {os.getpid()}) serves {status.get('config')}, "
                    f"not {config}"
                )
        if "instance" in request:
            instance = request["instance"]
            if instance is not None and not isinstance(instance, str):
                raise ControlError("'instance' must be a string or null")
            if instance != status.get("instance"):
                raise ControlError(
                    f"this daemon (pid {os.getpid()}) is instance "
                    f"{status.get('instance') or '(the single service)'}, not {instance}"
                )


async def _discard_line(reader: asyncio.StreamReader) -> None:
    """Read and drop the rest of an overlong line (bounded by ``LINGER_BYTES`` and
    ``LINGER_S``) before closing: a client still sending it would otherwise get EPIPE
    instead of reading the error reply, and closing on unread data resets the connection."""

    async def drain() -> None:
        left = LINGER_BYTES
        while left > 0:
            chunk = await reader.read(min(left, 65536))
            if not chunk or b"\n" in chunk:
                return
            left -= len(chunk)

    with contextlib.suppress(TimeoutError, ConnectionError, OSError):
        await asyncio.wait_for(drain(), LINGER_S)


def _same_file(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return os.path.abspath(a) == os.path.abspath(b)


def _parse(line: bytes) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except RecursionError as exc:
        raise ControlError("malformed request: nested too deeply") from exc
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
