"""The control socket under bad input and connect storms; files the daemon creates; start-up
in parallel."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import daemon, wait_for

from uartbridge.checkpoint import checkpoint_path, read_checkpoint

pytestmark = pytest.mark.e2e


def _ask(control: Path, line: bytes) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(str(control))
        s.sendall(line)
        reply = s.makefile("rb").readline()
    assert reply, f"no reply to {line[:40]!r}"
    answer: dict[str, object] = json.loads(reply)
    return answer


def test_every_malformed_request_gets_an_error_reply(tmp_path: Path) -> None:
    """Deep nesting, NUL bytes, a path to write, unknown keys, wrong types, bad UTF-8: each
    gets ok=false with a message, nothing is logged as unhandled, the daemon serves on."""
    with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}]) as d:
        d.start()
        lines = [
            b"[" * 100_000 + b"\n",
            b'{"cmd": "status", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}\n",
            b'{"cmd": "checkpoint", "output": "/tmp/a\\u0000b"}\n',
            b'{"cmd": "checkpoint", "uart": "uart\\u00000"}\n',
            b'{"cmd": "checkpoint", "output": "/etc/passwd"}\n',
            b'{"cmd": "checkpoint", "stop": "yes"}\n',
            b'{"cmd": "checkpoint", "document": 1}\n',
            b'{"cmd": "status", "config": 5}\n',
            b'{"cmd": "status", "config": "/etc/uartbridge/x\\u0000.toml"}\n',
            b'{"cmd": "status", "instance": ["x"]}\n',
            b'{"cmd": 1}\n',
            b"\xff\xfe\n",
            b"null\n",
            b"x" * (1 << 20) + b"\n",  # more than the socket buffers: the client is still
        ]                               # sending when the daemon gives up on the line
        for line in lines:
            reply = _ask(d.control, line)
            assert reply["ok"] is False and reply["error"], (line[:40], reply)
        assert d.status()["uarts"][0]["name"] == "uart0"
        log = d.log()
        assert "Traceback" not in log and "Unhandled" not in log and "internal error" not in log
        assert not Path("/tmp/a").exists()


def test_requests_meant_for_another_daemon_are_refused(tmp_path: Path) -> None:
    """A request naming another config or instance is refused before it does anything."""
    with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}]) as d:
        d.start()
        other = tmp_path / "other.toml"
        reply = _ask(d.control, json.dumps(
            {"cmd": "checkpoint", "stop": True, "config": str(other)}).encode() + b"\n")
        assert reply["ok"] is False and f"not {other}" in str(reply["error"])
        reply = _ask(d.control, b'{"cmd": "checkpoint", "stop": true, "instance": "ttyS9"}\n')
        assert reply["ok"] is False and "not ttyS9" in str(reply["error"])
        assert d.status()["pid"] == (d.proc.pid if d.proc else None)  # still running
        same = _ask(d.control, json.dumps(
            {"cmd": "status", "config": str(d.config_path)}).encode() + b"\n")
        assert same["ok"] is True


def test_files_the_daemon_creates_are_private(tmp_path: Path) -> None:
    """daemon.running and daemon.lock are 0600, whatever the umask."""
    old = os.umask(0)
    try:
        with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}]) as d:
            d.start()
            for name in ("daemon.running", "daemon.lock"):
                mode = stat.S_IMODE((d.state_dir / name).stat().st_mode)
                assert mode == 0o600, (name, oct(mode))
            assert d.stop() == 0
    finally:
        os.umask(old)


@contextlib.contextmanager
def silent_tcp_server() -> Iterator[int]:
    """A TCP listener on loopback that accepts and never says a word (an RFC 2217 server
    that does not answer the negotiation)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


def test_a_silent_rfc2217_port_does_not_delay_the_other_uarts(tmp_path: Path) -> None:
    """UARTs start together: the pty UART after an unanswering rfc2217:// one is up (its pty
    created) before the rfc2217 open gives up."""
    with silent_tcp_server() as port, daemon(tmp_path / "d", [
        {"name": "slow", "port": f"rfc2217://127.0.0.1:{port}"},
        {"name": "fast", "port": "pty:"},
    ]) as d:
        d.start()
        events = [json.loads(line) for line in d.log().splitlines() if line.startswith("{")]
        order = [(e.get("uart"), e["event"]) for e in events]
        fast_up = order.index(("fast", "port.pty_created"))
        slow_given_up = order.index(("slow", "port.open_failed"))
        assert fast_up < slow_given_up, order
        assert d.stop() == 0


def _connect_retrying(path: Path) -> socket.socket:
    """Connect, retrying while the listen backlog is full (EAGAIN on a Unix socket)."""
    deadline = time.monotonic() + 20
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return s
        except BlockingIOError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_storm_of_idle_control_connections_at_the_fd_limit(tmp_path: Path) -> None:
    """1,100 idle control connections to a daemon with only 4 spare file descriptors:
    periodic checkpoints go on, `uartbridge checkpoint` gets in and succeeds, the log stays
    small, and SIGTERM stops the daemon with its final checkpoint."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1300:
        pytest.skip("the test itself needs 1,300 file descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1300), hard))
    storm: list[socket.socket] = []
    try:
        with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}], interval_s=0.2) as d:
            d.start()
            assert d.proc is not None
            pid = d.proc.pid
            wait_for(lambda: checkpoint_path(d.state_dir, "uart0").exists(), 20)
            spare = _fd_count(pid) + 4
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (spare, spare))
            for _ in range(1100):
                storm.append(_connect_retrying(d.control))
            before = read_checkpoint(checkpoint_path(d.state_dir, "uart0")).meta.generation
            result = d.cli("checkpoint", "--control", str(d.control))
            assert result.returncode == 0, result.stderr
            wait_for(lambda: read_checkpoint(
                checkpoint_path(d.state_dir, "uart0")).meta.generation > before + 3, 20)
            assert _fd_count(pid) <= spare
            assert d.stop() == 0
            log = d.log()
            assert len(log) < 200_000, len(log)
            assert "periodic checkpoint failed" not in log
            assert log.count("control accept failed") <= 2
    finally:
        for s in storm:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_request_after_a_burst_of_connect_and_close_clients_is_answered(
        tmp_path: Path, each_event_loop: str) -> None:
    """5 clients that hang on half a line and 50 that connect and close at once, then a real
    status request: it is answered, every time, on both loops. (On uvloop a client pushed out
    while its stream was being set up had its descriptor closed under the transport, which
    then closed whichever client got that number next: the status request, reset.)"""
    with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}], interval_s=0) as d:
        d.daemon["event_loop"] = each_event_loop
        d.start()
        for _ in range(5):
            idle = []
            try:
                for _ in range(5):
                    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    idle.append(c)
                    c.connect(str(d.control))
                    c.sendall(b'{"cmd": "sta')
                for _ in range(50):
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                        c.connect(str(d.control))
                reply = _ask(d.control, b'{"cmd": "status"}\n')
                assert reply["ok"] is True, reply
            finally:
                for c in idle:
                    c.close()
        assert d.stop() == 0


def test_checkpoint_writes_work_with_every_descriptor_taken(tmp_path: Path) -> None:
    """With the process at its descriptor limit (real EMFILE), a write inside the daemon's
    reserve succeeds; the same write outside it fails."""
    from uartbridge.checkpoint import FORMAT_VERSION, write_checkpoint
    from uartbridge.daemon.process import FdReserve
    from uartbridge.errors import CheckpointError

    old = read_checkpoint(Path(__file__).parent / "data" / "checkpoint-v2-line-events.json")
    ckpt = dataclasses.replace(old, meta=dataclasses.replace(
        old.meta, format_version=FORMAT_VERSION))  # what this version writes
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    reserve = FdReserve()
    hogs: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        with contextlib.suppress(OSError):
            while True:
                hogs.append(os.open(os.devnull, os.O_RDONLY))
        with pytest.raises(CheckpointError, match="Too many open files"):
            write_checkpoint(tmp_path / "outside.json", ckpt)
        with reserve.released():
            write_checkpoint(tmp_path / "inside.json", ckpt)
    finally:
        for fd in hogs:
            os.close(fd)
        reserve.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert read_checkpoint(tmp_path / "inside.json") == ckpt

