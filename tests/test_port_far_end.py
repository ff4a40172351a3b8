"""Real far ends: picocom and tio under tmux on a socat pty, ser2net over RFC 2217, TCP."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import termios
import time
from pathlib import Path

import pytest
from _port_support import Guest, need, open_raw, read_available, socat_pair, wait_for

from uartbridge.portstate import PortSettings, ReaderState


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
                subprocess.run([tmux, "kill-server"], env=env, capture_output=True, timeout=5)

    asyncio.run(run())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_rfc2217_through_real_ser2net(tmp_path: Path) -> None:
    """rfc2217:// via ser2net: bytes both ways, and the guest's baud reaches the pty's termios."""
    ser2net = need("ser2net")

    async def run() -> None:
        with socat_pair(tmp_path, "rfc") as s:
            port = _free_port()
            conf = tmp_path / "ser2net.yaml"
            conf.write_text(
                "connection: &c1\n"
                f"  accepter: telnet(rfc2217),tcp,127.0.0.1,{port}\n"
                f"  connector: serialdev,{s.a},115200n81,local\n"
            )
            proc = subprocess.Popen([ser2net, "-n", "-d", "-c", str(conf)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            peer = open_raw(str(s.b))
            try:
                url = f"rfc2217://127.0.0.1:{port}?ign_set_control"
                g = Guest(PortSettings(url=url))
                deadline = time.monotonic() + 5
                while True:
                    try:
                        await g.link.open()
                        break
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                        g = Guest(PortSettings(url=url))
                        await asyncio.sleep(0.1)
                g.setup()
                assert await g.send(b"to-the-far-end") == 14
                got = bytearray()
                assert await wait_for(lambda: got.extend(read_available(peer)) or
                                      got == b"to-the-far-end", 5)
                os.write(peer, b"\xffback\xff")
                assert await g.receive(6) == b"\xffback\xff"
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
            finally:
                os.close(peer)
                proc.terminate()
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

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
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _open_when_listening(g: Guest, url: str) -> Guest:
    """Open ``url`` once the listener is up (socat needs a moment to bind)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            await g.link.open()
            return g
        except Exception:
            if time.monotonic() > deadline:
                raise
            g = Guest(PortSettings(url=url))
            await asyncio.sleep(0.05)


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
            g = await _open_when_listening(Guest(PortSettings(url=url)), url)
            g.setup()
            assert await wait_for(far.exists, 5)  # socat opens its pty once it accepted us
            peer = open_raw(str(far))
            assert await g.send(b"guest-to-tcp") == 12
            got = bytearray()
            assert await wait_for(lambda: got.extend(read_available(peer)) or
                                  got == b"guest-to-tcp", 5)
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
