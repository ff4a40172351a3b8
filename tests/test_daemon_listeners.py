"""Listening sockets handed to the daemon: a socket unit's, the fd store's, an in-place
restart's. Each is taken by the address it listens at, never unlinked nor rebound, and the
connections queued in its backlog while no daemon ran are served by the next one.

Real daemons and real sockets; ``FakeManager`` plays systemd's part (it holds the sockets a
socket unit would and starts the daemon with them as ``LISTEN_FDS``), because systemd does
not run as a service manager here. The VM test (tests/system/vm) runs the shipped socket
unit under the real one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fake_manager import FakeManager
from procs import REPO, Daemon, daemon, wait_for

from uartbridge.bus.codec import FrameDecoder, Hello, HelloReply, encode
from uartbridge.client import BusClient
from uartbridge.control import request

pytestmark = pytest.mark.e2e

SCR = 7


def _unix_listener(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, as a socket unit makes it (mode 0660)."""
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o660)
    sock.listen(16)
    return sock


def _tcp_listener() -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock, int(sock.getsockname()[1])


def _events(d: Daemon, name: str) -> list[dict[str, Any]]:
    return [e for e in d.events() if e.get("event") == name]


class Waiting:
    """A bus client started now (its connection goes into the backlog at once), reading the
    scratch register on a thread; ``result()`` joins it."""

    def __init__(self, target: Path | tuple[str, int]) -> None:
        self.target = target
        self.value: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with BusClient(self.target, timeout_s=60) as client:
                self.value = client.read(SCR)
        except BaseException as exc:  # reported by result()
            self.error = exc

    def result(self) -> int:
        self._thread.join(90)
        assert not self._thread.is_alive(), "the queued client was never served"
        assert self.error is None, f"the queued client failed: {self.error!r}"
        assert self.value is not None
        return self.value


@contextmanager
def _manager(root: Path) -> Iterator[FakeManager]:
    manager = FakeManager(root)
    try:
        yield manager
    finally:
        manager.close()


def _hello_reply(sock: socket.socket) -> HelloReply:
    """Read until the first frame is in; it must be a HELLO_REPLY (fails on EOF)."""
    decoder = FrameDecoder()
    sock.settimeout(60)
    while True:
        chunk = sock.recv(4096)
        assert chunk, "connection closed before HELLO_REPLY"
        decoder.feed(chunk)
        for frame in decoder.frames():
            assert isinstance(frame, HelloReply), frame
            return frame


def test_socket_unit_listeners_are_used_not_rebound(tmp_path: Path) -> None:
    """Unix bus and control listeners handed as a socket unit hands them (both named
    'listener', outside the runtime directory) are taken by their path: the socket files
    keep their inode across two runs, a client queued before each start is served by it,
    the stop leaves the files (a client connecting then is queued, not refused), and the
    state carries over."""
    sockets = tmp_path / "sockets"
    bus_path, control_path = sockets / "uart0.bus", sockets / "control.sock"
    bus_l, control_l = _unix_listener(bus_path), _unix_listener(control_path)
    inodes = (bus_path.stat().st_ino, control_path.stat().st_ino)
    uart = {"name": "uart0", "port": "pty:", "bus_socket": str(bus_path)}
    with _manager(tmp_path) as manager, daemon(tmp_path / "d", [uart], interval_s=0) as d:
        d.daemon["control_socket"] = str(control_path)
        handed = [("listener", bus_l.fileno()), ("listener", control_l.fileno())]
        early = Waiting(bus_path)  # before any daemon: waits in the backlog
        time.sleep(0.2)
        manager.start(d, handed)
        assert early.result() == 0
        assert (bus_path.stat().st_ino, control_path.stat().st_ino) == inodes
        listening = _events(d, "bus.listening")
        assert listening and listening[-1].get("handed_over") is True, d.log()
        assert not _events(d, "handed-over descriptor not used; closed"), d.log()
        with BusClient(bus_path) as client:
            client.write(SCR, 0x5A)
        assert request(control_path, {"cmd": "status"})["ok"]
        assert d.stop(signal.SIGTERM) == 0, d.log()
        assert (bus_path.stat().st_ino, control_path.stat().st_ino) == inodes
        gap = Waiting(bus_path)  # no daemon now: queued, not ECONNREFUSED/ENOENT
        time.sleep(0.5)
        assert gap.error is None, gap.error
        manager.start(d, handed)
        assert gap.result() == 0x5A  # served by the next run, which resumed the state
        assert (bus_path.stat().st_ino, control_path.stat().st_ino) == inodes
        assert d.stop(signal.SIGTERM) == 0, d.log()
    bus_l.close()
    control_l.close()


def test_handed_listeners_of_the_wrong_kind_fall_back_with_a_log_line(tmp_path: Path) -> None:
    """A descriptor named bus.uart0 that is a UDP socket, one named control that listens at
    another path, and a socket unit's TCP listener at a port the config does not name: each
    is logged and closed, and the daemon binds its own sockets, which work."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    elsewhere = _unix_listener(tmp_path / "elsewhere.sock")
    stray, _stray_port = _tcp_listener()
    with _manager(tmp_path) as manager, daemon(
            tmp_path / "d", [{"name": "uart0", "port": "pty:"}], interval_s=0) as d:
        manager.start(d, [("bus.uart0", udp.fileno()), ("control", elsewhere.fileno()),
                          ("listener", stray.fileno())])
        refused = {e["name"]: e["reason"] for e in _events(d, "listener.handover_refused")}
        assert set(refused) == {"bus.uart0", "control"}, d.log()
        assert "not a Unix stream socket" in refused["bus.uart0"]
        assert "bound to" in refused["control"] and "elsewhere.sock" in refused["control"]
        unused = [e["name"] for e in _events(d, "handed-over descriptor not used; closed")]
        assert unused == ["listener"], d.log()
        with BusClient(d.bus()) as client:
            client.write(SCR, 0x33)
            assert client.read(SCR) == 0x33
        assert request(d.control, {"cmd": "status"})["ok"]
    for sock in (udp, elsewhere, stray):
        sock.close()


def test_socket_unit_tcp_listener_is_used_and_its_backlog_served(tmp_path: Path) -> None:
    """A TCP bus listener handed by a socket unit at the configured host:port is taken (the
    daemon does not bind the port again: that would fail, the port is taken), and a HELLO
    sent before the daemon started is answered; it does not go to the fd store."""
    listener, port = _tcp_listener()
    uart = {"name": "uart0", "port": "pty:", "bus_tcp": f"127.0.0.1:{port}"}
    early = socket.create_connection(("127.0.0.1", port), timeout=10)
    early.sendall(encode(Hello(1)))
    with _manager(tmp_path) as manager, daemon(tmp_path / "d", [uart], interval_s=0) as d:
        manager.start(d, [("listener", listener.fileno())])
        assert _hello_reply(early)
        early.close()
        with BusClient(("127.0.0.1", port)) as client:
            client.write(SCR, 0x44)
            assert client.read(SCR) == 0x44
        manager.pump()
        assert "bus-tcp.uart0" not in manager.store, manager.messages
        assert not _events(d, "handed-over descriptor not used; closed"), d.log()
    listener.close()


def test_fd_store_keeps_the_tcp_listener_across_a_stop_and_start(tmp_path: Path) -> None:
    """Under a service manager the daemon stores the TCP bus listener it bound
    (FDNAME=bus-tcp.uart0); while it is stopped a TCP client's HELLO waits in that socket's
    backlog, and the next run, handed the store, answers it."""
    probe, port = _tcp_listener()
    probe.close()  # a free port, bound by the daemon itself
    uart = {"name": "uart0", "port": "pty:", "bus_tcp": f"127.0.0.1:{port}"}
    with _manager(tmp_path) as manager, daemon(tmp_path / "d", [uart], interval_s=0) as d:
        manager.start(d, {})
        manager.pump()
        assert "bus-tcp.uart0" in manager.store, manager.messages
        with BusClient(("127.0.0.1", port)) as client:
            client.write(SCR, 0x66)
        assert d.stop(signal.SIGTERM) == 0, d.log()
        gap = socket.create_connection(("127.0.0.1", port), timeout=10)  # not refused
        gap.sendall(encode(Hello(1)))
        manager.start(d, dict(manager.store))
        assert _hello_reply(gap)
        gap.close()
        assert not _events(d, "handed-over descriptor not used; closed"), d.log()
        with BusClient(("127.0.0.1", port)) as client:
            assert client.read(SCR) == 0x66


def test_restart_in_place_hands_over_the_tcp_listener(tmp_path: Path) -> None:
    """`uartbridge restart` hands the TCP bus listener to the next run with the port and the
    bus socket (LISTEN_FDNAMES bus-tcp.uart0): a TCP client that connected between the two
    runs is answered, and the port is not bound again."""
    probe, port = _tcp_listener()
    probe.close()
    uart = {"name": "uart0", "port": "pty:", "bus_tcp": f"127.0.0.1:{port}"}
    with daemon(tmp_path / "d", [uart], interval_s=0) as d:
        d.start()
        with BusClient(("127.0.0.1", port)) as client:
            client.write(SCR, 0x77)
        proc = subprocess.Popen(
            [sys.executable, "-m", "uartbridge", "restart", "--config", str(d.config_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        assert wait_for(lambda: bool(_events(d, "restarting in place")), 30), d.log()
        gap = socket.create_connection(("127.0.0.1", port), timeout=10)
        gap.sendall(encode(Hello(1)))
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err + d.log()
        assert _hello_reply(gap)
        gap.close()
        execs = _events(d, "exec")
        assert execs and "bus-tcp.uart0" in execs[-1]["fds"], d.log()
        with BusClient(("127.0.0.1", port)) as client:
            assert client.read(SCR) == 0x77
