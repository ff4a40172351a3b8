"""sd_notify against real AF_UNIX datagram sockets (a path and an abstract name)."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from uartbridge.daemon import sdnotify as _sdnotify


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start each test without systemd's variables."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket bound to a path, named by $NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    short_dir = None
    if len(str(path)) > 100:  # sun_path is 108 bytes
        short_dir = tempfile.mkdtemp(prefix="ub-notify-")
        path = Path(short_dir) / "n.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        yield sock
    finally:
        sock.close()
        path.unlink(missing_ok=True)
        if short_dir:
            os.rmdir(short_dir)


def test_notify_sends_datagram(listener: socket.socket) -> None:
    """notify() sends the message as one datagram to the $NOTIFY_SOCKET path."""
    assert _sdnotify.notify("READY=1\nSTATUS=hi") is True
    assert listener.recv(4096) == b"READY=1\nSTATUS=hi"


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """An '@name' $NOTIFY_SOCKET is an abstract socket."""
    name = f"uartbridge-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert _sdnotify.watchdog() is True
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_helpers_send_their_messages(listener: socket.socket) -> None:
    """ready, status, stopping and watchdog send the sd_notify(3) messages."""
    assert _sdnotify.ready()
    assert _sdnotify.ready("serving 2 UARTs")
    assert _sdnotify.status("line one\nline two")
    assert _sdnotify.stopping()
    assert _sdnotify.watchdog()
    got = [listener.recv(4096) for _ in range(5)]
    assert got == [b"READY=1", b"READY=1\nSTATUS=serving 2 UARTs", b"STATUS=line one line two",
                   b"STOPPING=1", b"WATCHDOG=1"]


def test_no_variable_is_noop() -> None:
    """Without $NOTIFY_SOCKET, notify() does nothing and returns False."""
    assert _sdnotify.notify("READY=1") is False
    assert _sdnotify.ready("x") is False


@pytest.mark.parametrize("value", ["", "relative/path", "vsock:2:1234"])
def test_unusable_variable_returns_false(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """An empty, relative or unsupported $NOTIFY_SOCKET returns False without raising."""
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert _sdnotify.notify("READY=1") is False


def test_missing_socket_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A $NOTIFY_SOCKET path with nobody bound returns False, never raises."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert _sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", f"@uartbridge-absent-{uuid.uuid4().hex}")
    assert _sdnotify.notify("READY=1") is False


def test_wrong_socket_type_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream socket (not datagram) at $NOTIFY_SOCKET returns False, never raises."""
    path = tmp_path / "s.sock"
    if len(str(path)) > 100:
        pytest.skip("tmp_path too long for sun_path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen()
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert _sdnotify.notify("READY=1") is False


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """watchdog_interval_s() is $WATCHDOG_USEC in seconds, None when unset or not positive."""
    assert _sdnotify.watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert _sdnotify.watchdog_interval_s() == 30.0
    for bad in ("0", "-5", "abc", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert _sdnotify.watchdog_interval_s() is None


def test_watchdog_interval_honours_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    """The interval is ours only when $WATCHDOG_PID is unset or our own PID."""
    monkeypatch.setenv("WATCHDOG_USEC", "2500000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert _sdnotify.watchdog_interval_s() == 2.5
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert _sdnotify.watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_PID", "nonsense")
    assert _sdnotify.watchdog_interval_s() is None
