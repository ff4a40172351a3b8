"""The accept loop and the log limiter the bus uses against connect storms."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from test_bus_support import run_async

from uartbridge.listener import ACCEPT_BATCH, Listener, LogLimiter


class Recorder:
    """A structlog-like logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        def emit(event: str, **fields: Any) -> None:
            self.lines.append((level, event, fields))

        return emit


def test_log_limiter_logs_first_then_one_count_per_interval() -> None:
    """The first event logs at once; the rest of the interval is one line with the count."""
    log = Recorder()

    async def main() -> None:
        limiter = LogLimiter(log, "x.refused", interval_s=0.05)
        for i in range(500):
            limiter.hit(peer=i)
        assert [line[1] for line in log.lines] == ["x.refused"]
        await asyncio.sleep(0.12)
        assert len(log.lines) == 2
        assert log.lines[1][2]["repeated"] == 499 and log.lines[1][2]["peer"] == 499
        await asyncio.sleep(0.1)  # a quiet interval: nothing more, and limiting ends
        limiter.hit(peer="later")
        assert log.lines[-1][2] == {"peer": "later"}
        assert limiter.total == 501
        limiter.close()

    run_async(main)


def test_listener_accepts_a_bounded_batch_per_callback() -> None:
    """Each readiness callback accepts at most ACCEPT_BATCH connections; all get accepted."""
    log = Recorder()

    async def main() -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(f"\0uartbridge-test-listener-{id(log)}")
        server.listen(256)
        accepted: list[socket.socket] = []
        turns: list[int] = []

        def on_accept(conn: socket.socket) -> None:
            accepted.append(conn)

        listener = Listener(server, on_accept, log=log, name="test")
        clients = []
        for _ in range(ACCEPT_BATCH * 3 + 5):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(server.getsockname())
            clients.append(c)
        while len(accepted) < len(clients):
            before = len(accepted)
            await asyncio.sleep(0)
            turns.append(len(accepted) - before)
        assert max(turns) <= ACCEPT_BATCH
        assert all(not conn.getblocking() for conn in accepted)
        listener.close()
        for sock in accepted + clients:
            sock.close()

    run_async(main)


def test_listener_waits_while_admit_says_no_and_resumes_after() -> None:
    """While ``admit()`` is False nothing is accepted (the backlog holds the peers) and the
    socket is not polled in a busy loop; once it is True again the waiting peers get in."""
    log = Recorder()

    async def main() -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(f"\0uartbridge-test-admit-{id(log)}")
        server.listen(16)
        accepted: list[socket.socket] = []
        asked = 0
        room = False

        def admit() -> bool:
            nonlocal asked
            asked += 1
            return room

        listener = Listener(server, accepted.append, log=log, name="test", backoff_s=0.05,
                            admit=admit)
        clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
        for c in clients:
            c.connect(server.getsockname())
        await asyncio.sleep(0.3)
        assert accepted == []
        assert 1 <= asked <= 12  # once per backoff, not once per loop turn
        room = True
        for _ in range(100):
            if len(accepted) == 3:
                break
            await asyncio.sleep(0.02)
        assert len(accepted) == 3
        listener.close()
        for sock in accepted + clients:
            sock.close()

    run_async(main)


def test_listener_out_of_descriptors_asks_for_room_and_retries_at_once() -> None:
    """An accept that fails with EMFILE calls ``make_room()``; when it freed a descriptor,
    accepting resumes on the next turn rather than after the backoff, and it is logged once.
    (The failing accept is a fake; the real EMFILE is in test_control_socket's storm.)"""
    log = Recorder()

    class FailingOnce(socket.socket):
        failures = 1

        def accept(self) -> tuple[socket.socket, Any]:
            if FailingOnce.failures:
                FailingOnce.failures -= 1
                raise OSError(24, "Too many open files")  # EMFILE, as the kernel says it
            return super().accept()

    async def main() -> None:
        server = FailingOnce(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(f"\0uartbridge-test-room-{id(log)}")
        server.listen(16)
        accepted: list[socket.socket] = []
        rooms: list[bool] = []

        def make_room() -> bool:
            rooms.append(True)
            return True

        listener = Listener(server, accepted.append, log=log, name="test", backoff_s=30.0,
                            make_room=make_room)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(server.getsockname())
        for _ in range(100):
            if accepted:
                break
            await asyncio.sleep(0.01)
        assert rooms == [True] and len(accepted) == 1  # well before the 30 s backoff
        assert [line[1] for line in log.lines] == ["accept_failed"]
        listener.close()
        for sock in [*accepted, client]:
            sock.close()

    run_async(main)
