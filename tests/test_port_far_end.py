"""Real far ends: picocom under tmux on a socat pty, and ser2net over RFC 2217."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import termios
import time
from pathlib import Path

from _port_support import Guest, need, open_raw, read_available, socat_pair, wait_for

from uartbridge.portstate import PortSettings


def test_picocom_under_tmux_sees_guest_and_types_to_it(tmp_path: Path) -> None:
    """picocom on the far end shows what the guest sent; keys typed there reach RBR."""
    tmux = need("tmux")
    picocom = need("picocom")
    env = {**os.environ, "TMUX_TMPDIR": str(tmp_path)}

    def tm(*args: str) -> str:
        return subprocess.run([tmux, *args], env=env, capture_output=True, text=True,
                              timeout=5).stdout

    async def run() -> None:
        with socat_pair(tmp_path, "pc") as s:
            try:
                subprocess.run([tmux, "new-session", "-d", "-s", "t", "-x", "120", "-y", "20",
                                f"{picocom} -q -b 115200 {s.b}"], env=env, check=True, timeout=5)
                g = Guest(PortSettings(url=str(s.a)))
                await g.link.open()
                g.setup()
                await asyncio.sleep(0.5)  # picocom opens its port
                assert await g.send(b"hello-from-guest\r\n") == 18
                assert await wait_for(lambda: "hello-from-guest" in tm("capture-pane", "-p",
                                                                       "-t", "t"), 5)
                tm("send-keys", "-t", "t", "-l", "typed-in-picocom")
                assert await g.receive(16) == b"typed-in-picocom"
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
