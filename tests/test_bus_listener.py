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
