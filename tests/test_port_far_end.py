"""Real far ends: picocom and tio under tmux on a socat pty, ser2net over RFC 2217, TCP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import termios
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from _port_support import (
    Guest,
    need,
    open_raw,
    raw_peer,
    read_available,
    send_and_collect,
    socat_pair,
    wait_for,
)
from procs import stop_process, stop_tmux

from uartbridge.port.rfc2217 import QUEUE_BYTES, Rfc2217Io
from uartbridge.port.state import PortSettings, ReaderState


@pytest.mark.parametrize("terminal", ["picocom", "tio"])
def test_terminal_under_tmux_sees_guest_and_types_to_it(tmp_path: Path, terminal: str) -> None:
    """picocom / tio on the far end shows what the guest sent; keys typed there reach RBR."""
    tmux = need("tmux")
    program = need(terminal)
    env = {**os.environ, "TMUX_TMPDIR": str(tmp_path)}

    def tm(*args: str) -> str:
        return subprocess.run([tmux, *args], env=env, capture_output=True, text=True,
                              timeout=5).stdout

    async def run() -> None:
        with socat_pair(tmp_path, "pc") as s:
            try:
                subprocess.run([tmux, "new-session", "-d", "-s", "t", "-x", "120", "-y", "20",
                                f"{program} -b 115200 {s.b}"], env=env, check=True, timeout=5)
                g = Guest(PortSettings(url=str(s.a)))
                await g.link.open()
                g.setup()
                ready = {"picocom": "Terminal ready", "tio": "Connected"}[terminal]
                assert await wait_for(lambda: ready in tm("capture-pane", "-p", "-t", "t"), 5)
                assert await g.send(b"hello-from-guest\r\n") == 18
                assert await wait_for(lambda: "hello-from-guest" in tm("capture-pane", "-p",
                                                                       "-t", "t"), 5)
                tm("send-keys", "-t", "t", "-l", "typed-in-terminal")
                assert await g.receive(17) == b"typed-in-terminal"
                await g.link.close()
            finally:
                stop_tmux(tmux, env)

    asyncio.run(run())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _ser2net_serving(tmp_path: Path, device: Path) -> Iterator[int]:
    """ser2net serving ``device`` as RFC 2217 on a free loopback port; stopped by PID."""
    port = _free_port()
    conf = tmp_path / "ser2net.yaml"
    conf.write_text(
        "connection: &c1\n"
        f"  accepter: telnet(rfc2217),tcp,127.0.0.1,{port}\n"
        f"  connector: serialdev,{device},115200n81,local\n"
    )
    proc = subprocess.Popen([need("ser2net"), "-n", "-d", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port
    finally:
        stop_process(proc, timeout_s=3)


async def _open_when_listening(url: str, **kwargs: Any) -> Guest:
    """A guest on ``url`` once its server listens (ser2net and socat need a moment to bind)."""
    deadline = time.monotonic() + 5
    while True:
        g = Guest(PortSettings(url=url), **kwargs)
        try:
            await g.link.open()
            return g
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def _rfc2217_url(port: int) -> str:
    return f"rfc2217://127.0.0.1:{port}?ign_set_control"


def test_rfc2217_through_real_ser2net(tmp_path: Path) -> None:
    """rfc2217:// via ser2net: bytes both ways, traced, and the guest's baud reaches the pty."""

    async def run() -> None:
        with (
            socat_pair(tmp_path, "rfc") as s,
            _ser2net_serving(tmp_path, s.a) as port,
            raw_peer(s.b) as peer,
        ):
            traced: list[tuple[str, bytes]] = []
            g = await _open_when_listening(
                _rfc2217_url(port), trace=lambda d, b: traced.append((d, b))
            )
            g.setup()
            out = b"to-the-far-end"
            assert await send_and_collect(g, out, peer, len(out)) == out
            os.write(peer, b"\xffback\xff")
            assert await g.receive(6) == b"\xffback\xff"
            for direction, expected in (("tx", b"to-the-far-end"), ("rx", b"\xffback\xff")):
                assert b"".join(d for k, d in traced if k == direction) == expected
            # guest sets 9600 baud: divisor 12
            g.uart.write(3, 0x83)
            g.uart.write(0, 12)
            g.uart.write(1, 0)
            g.uart.write(3, 0x03)
            g.pump()
            fd = os.open(s.a, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            try:
                assert await wait_for(lambda: termios.tcgetattr(fd)[5] == termios.B9600, 5)
            finally:
                os.close(fd)
            await g.link.close()

    asyncio.run(run())


def test_rfc2217_input_is_bounded_while_the_guest_does_not_read(tmp_path: Path) -> None:
    """rfc2217:// input the guest does not read stops at the bounds; then all of it arrives."""

    async def run() -> None:
        with (
            socat_pair(tmp_path, "rfcb") as s,
            _ser2net_serving(tmp_path, s.a) as port,
            raw_peer(s.b) as peer,
        ):
            g = await _open_when_listening(_rfc2217_url(port))
            g.setup()
            data = bytes(range(256)) * 160  # 40 KiB, 0xff included (telnet IAC)
            written = 0
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:  # the guest reads nothing meanwhile
                with contextlib.suppress(BlockingIOError):
                    written += os.write(peer, data[written : written + 4096])
                if written == len(data):
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)  # let everything that can move, move
            assert isinstance(g.link._io, Rfc2217Io)
            queued = g.link._io._queued()
            backlog = g.link.status()["rx_backlog_bytes"]
            assert queued <= QUEUE_BYTES and backlog <= 4096, (queued, backlog)
            assert queued + backlog > 0  # input did wait there
            while written < len(data):
                with contextlib.suppress(BlockingIOError):
                    written += os.write(peer, data[written : written + 4096])
                g.read_all()
                await asyncio.sleep(0.002)
            assert await g.receive(len(data), timeout_s=20) == data
            await g.link.close()

    asyncio.run(run())

class _TcpSocat:
    """socat listening on a loopback TCP port, relaying to a pty at ``pty_link``; by PID."""

    def __init__(self, port: int, pty_link: Path) -> None:
        self.port, self.pty_link = port, pty_link
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [need("socat"), f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr",
             f"pty,raw,echo=0,link={self.pty_link}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, timeout_s=3)

def test_socket_url_both_ways_and_reconnect_with_buffer(tmp_path: Path) -> None:
    """socket:// to TCP socat: both ways; socat gone → disconnected; back → backlog replayed."""

    async def run() -> None:
        port = _free_port()
        far = tmp_path / "tcp-far"
        socat = _TcpSocat(port, far)
        socat.start()
        peer = -1
        try:
            url = f"socket://127.0.0.1:{port}"
            g = await _open_when_listening(url)
            g.setup()
            assert await wait_for(far.exists, 5)  # socat opens its pty once it accepted us
            peer = open_raw(str(far))
            assert await send_and_collect(g, b"guest-to-tcp", peer, 12) == b"guest-to-tcp"
            os.write(peer, b"tcp-to-guest")
            assert await g.receive(12) == b"tcp-to-guest"

            socat.stop()
            os.close(peer)
            peer = -1
            assert await wait_for(lambda: g.link.reader_state is ReaderState.DISCONNECTED, 2)
            payload = bytes(range(256)) * 4
            assert await g.send(payload, timeout_s=2) == len(payload)  # into the backlog
            socat.start()
            assert await wait_for(lambda: g.link.reader_state is ReaderState.CONNECTED, 10)
            assert await wait_for(far.exists, 5)
            # Not open_raw: its tcsetattr(TCSAFLUSH) would drop the replay already queued
            # (socat's `raw,echo=0` made the pty raw).
            peer = os.open(far, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            got = bytearray()
            assert await wait_for(lambda: got.extend(read_available(peer)) or
                                  len(got) >= len(payload), 5)
            assert bytes(got) == payload
            counters = g.link.status()["counters"]
            assert counters["disconnects"] == 1 and counters["reconnects"] == 1  # type: ignore[index]
            await g.link.close()
        finally:
            if peer >= 0:
                os.close(peer)
            socat.stop()

    asyncio.run(run())
