"""The real daemon against a real unprivileged user and against connect storms.

The attacker runs as a user created for the test (``useradd``), with the system Python (the
test's interpreter lives under /root, which that user cannot read).
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import Daemon, daemon, new_user, socat_pair, wait_for

from uartbridge.bus import Hello, Sync, SyncReply, Write, WriteN, encode
from uartbridge.client import BusClient
from uartbridge.registers import FCR, SCR, THR

pytestmark = pytest.mark.e2e

SYSTEM_PYTHON = "/usr/bin/python3"

# Run as the unprivileged user: ATTEMPTS times HELLO + a posted THR burst + close at once,
# while FLOODERS threads keep opening connections that the daemon refuses (keeping its loop
# busy, which is what let the old /proc/net/tcp lookup see the closed socket as root's).
ATTACKER = r"""
import socket, sys, threading
host, port, attempts, flooders = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
burst = bytes.fromhex(sys.argv[5])
stop = threading.Event()
def flood():
    while not stop.is_set():
        try:
            s = socket.create_connection((host, port))
            s.close()
        except OSError:
            pass
threads = [threading.Thread(target=flood) for _ in range(flooders)]
for t in threads:
    t.start()
sent = 0
for _ in range(attempts):
    try:
        s = socket.create_connection((host, port))
        s.sendall(burst)
        s.close()
        sent += 1
    except OSError:
        pass
stop.set()
for t in threads:
    t.join()
print(sent)
"""


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _drain(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


@contextlib.contextmanager
def _far_end(path: Path) -> Iterator[int]:
    fd = os.open(str(path), os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        tty.setraw(fd)
        yield fd
    finally:
        os.close(fd)


def _log_lines(d: Daemon, event: str) -> list[str]:
    return [line for line in d.log().splitlines() if event in line]


def test_unprivileged_tcp_peer_that_closes_at_once_never_reaches_the_wire(tmp_path: Path) -> None:
    """An unprivileged user racing HELLO + THR burst + close, hundreds of times under a flood
    of refused connections, gets zero bytes onto the wire; a root peer on the same listener
    is served; refusals are logged a few lines at a time, not once each."""
    port = _free_tcp_port()
    uart = {"name": "uart0", "bus_tcp": f"127.0.0.1:{port}"}
    payload = b"PWNED!" * 40
    burst = encode(Hello(1)) + encode(Write(FCR, 0x07)) + encode(WriteN(THR, payload))
    with (
        new_user() as user,
        socat_pair(tmp_path) as pair,
        daemon(tmp_path / "d", [{**uart, "port": str(pair.a)}]) as d,
        _far_end(pair.b) as far,
    ):
        d.start()
        attacker = subprocess.run(
            [SYSTEM_PYTHON, "-c", ATTACKER, "127.0.0.1", str(port), "300", "4", burst.hex()],
            user=user.pw_uid, group=user.pw_gid, extra_groups=[], cwd="/",
            capture_output=True, text=True, timeout=240,
        )
        assert attacker.returncode == 0, attacker.stderr
        assert int(attacker.stdout) >= 250  # the attempts did go through
        time.sleep(0.5)
        leaked = _drain(far)
        assert b"PWN" not in leaked and leaked == b"", leaked[:64]
        # Root on the same listener, keeping its socket open until SYNC: served.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as root:
            root.sendall(encode(Hello(1)) + encode(Write(FCR, 0x07))
                         + encode(WriteN(THR, b"root-was-here")) + encode(Sync(9)))
            replies = b""
            while encode(SyncReply(9)) not in replies:
                chunk = root.recv(4096)
                assert chunk, replies
                replies += chunk
        got = b""
        deadline = time.monotonic() + 10
        while len(got) < 13 and time.monotonic() < deadline:
            got += _drain(far)
            time.sleep(0.01)
        assert got == b"root-was-here"
        refused = _log_lines(d, "bus.peer_refused")
        assert 1 <= len(refused) <= 10, len(refused)


# Run as the unprivileged user: HELLO (with the token given in hex, or none) + a posted THR
# burst + SYNC, then print whether the SYNC was answered (admitted) or the server closed.
TOKEN_GUEST = r"""
import socket, struct, sys
host, port, token, payload = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), sys.argv[4]
def frame(kind, body):
    return struct.pack(">HB", len(body) + 1, kind) + body
hello = b"\x00\x01" + (b"\x01" + bytes([len(token)]) + token if token else b"")
s = socket.create_connection((host, port), timeout=10)
s.sendall(frame(0x01, hello) + frame(0x03, b"\x02\x07") + frame(0x04, b"\x00" + payload.encode())
          + frame(0x06, struct.pack(">I", 7)))
got = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    got += chunk
    if frame(0x86, struct.pack(">I", 7)) in got:
        print("admitted")
        sys.exit(0)
print("refused")
"""


def test_a_tcp_peer_refused_by_uid_is_admitted_by_the_configured_token_only(
    tmp_path: Path,
) -> None:
    """With bus_tcp_token_file, an unprivileged local user reaches the wire only by sending
    the token in HELLO; a wrong token or none is refused and nothing it sent is written."""
    port = _free_tcp_port()
    token_file = tmp_path / "bus.token"
    token_file.write_bytes(b"operator-secret\n")
    token_file.chmod(0o600)
    uart = {"name": "uart0", "bus_tcp": f"127.0.0.1:{port}",
            "bus_tcp_token_file": str(token_file)}

    def guest(user: object, token: bytes, payload: str) -> str:
        run = subprocess.run(
            [SYSTEM_PYTHON, "-c", TOKEN_GUEST, "127.0.0.1", str(port), token.hex(), payload],
            user=user.pw_uid, group=user.pw_gid, extra_groups=[], cwd="/",  # type: ignore[attr-defined]
            capture_output=True, text=True, timeout=60,
        )
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    with (
        new_user() as user,
        socat_pair(tmp_path) as pair,
        daemon(tmp_path / "d", [{**uart, "port": str(pair.a)}]) as d,
        _far_end(pair.b) as far,
    ):
        d.start()
        assert guest(user, b"", "no-token") == "refused"
        assert guest(user, b"wrong-secret", "wrong-token") == "refused"
        assert guest(user, b"operator-secret", "with-token") == "admitted"
        got = b""
        deadline = time.monotonic() + 10
        while len(got) < len("with-token") and time.monotonic() < deadline:
            got += _drain(far)
            time.sleep(0.01)
        time.sleep(0.2)
        got += _drain(far)
        assert got == b"with-token"
        with BusClient(("127.0.0.1", port), token=b"operator-secret") as bus:
            bus.write(SCR, 0x5A)
            assert bus.read(SCR) == 0x5A


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# A root peer (permitted) opening CONNS Unix connections as fast as it can and holding them
# (with "nowait", a connect the full backlog refuses is given up instead of waited for).
STORM = r"""
import socket, sys, time, resource
path, conns, hold_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
nowait = sys.argv[4] == "nowait"
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
for _ in range(conns):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(not nowait)
    try:
        s.connect(path)
    except OSError:
        s.close()
        continue
    held.append(s)
print(len(held), flush=True)
time.sleep(hold_s)
"""


@contextlib.contextmanager
def _storm(
    path: Path, conns: int, hold_s: float, *, wait: bool = True
) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", STORM, str(path), str(conns), str(hold_s),
         "wait" if wait else "nowait"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()


def test_connect_storm_costs_no_fds_or_memory_and_the_guest_is_served(tmp_path: Path) -> None:
    """1,500 connections held open against the bus socket: the daemon's fds stay within the
    pending cap, its memory does not grow, the guest and checkpoints keep working, and the
    refusals are logged a few lines at a time."""
    with socat_pair(tmp_path) as pair, daemon(tmp_path / "d", [{"name": "uart0",
                                                               "port": str(pair.a)}]) as d:
        d.start()
        assert d.proc is not None
        pid = d.proc.pid
        with BusClient(d.bus()) as guest:
            guest.write(SCR, 1)
            assert guest.read(SCR) == 1
            base_fds = _fd_count(pid)
            base_rss = _rss_kib(pid)
            max_fds = base_fds
            with _storm(d.bus(), 1500, 6.0) as storm:
                value = 1
                checkpointed = False
                while storm.poll() is None:
                    max_fds = max(max_fds, _fd_count(pid))
                    value = (value + 1) & 0xFF
                    guest.write(SCR, value)
                    assert guest.read(SCR) == value
                    if not checkpointed:
                        result = d.cli("checkpoint", "--config", str(d.config_path))
                        assert result.returncode == 0, result.stderr
                        checkpointed = True
                    time.sleep(0.01)
                assert storm.stdout is not None
                held = int(storm.stdout.readline() or 0)
            assert held >= 1000  # the storm did connect
            # 8 pending + the control connection + a checkpoint file + slack.
            assert max_fds <= base_fds + 14, (base_fds, max_fds)
            assert _rss_kib(pid) - base_rss < 8 * 1024, (base_rss, _rss_kib(pid))
            assert guest.read(SCR) == value
        assert 1 <= len(_log_lines(d, "bus.too_many_pending")) <= 10
        assert len(_log_lines(d, "bus.busy")) <= 10


def test_accept_errors_at_the_fd_limit_are_rate_limited_and_the_guest_is_served(
    tmp_path: Path,
) -> None:
    """With the daemon's fd limit lowered under a storm, accept fails with EMFILE: logged a few
    lines with a count, no spinning, the guest keeps working, and accepting resumes after."""
    with socat_pair(tmp_path) as pair, daemon(tmp_path / "d", [{"name": "uart0",
                                                               "port": str(pair.a)}]) as d:
        d.start()
        assert d.proc is not None
        pid = d.proc.pid
        with BusClient(d.bus()) as guest:
            guest.write(SCR, 1)
            assert guest.read(SCR) == 1
            soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (_fd_count(pid) + 3, hard))
            try:
                with _storm(d.bus(), 400, 4.0, wait=False) as storm:
                    value = 1
                    while storm.poll() is None:
                        value = (value + 1) & 0xFF
                        guest.write(SCR, value)
                        assert guest.read(SCR) == value
                        time.sleep(0.01)
            finally:
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
            log = d.log()
            assert "Traceback" not in log and len(log) < 100_000, len(log)  # was 2,680 / 1.5 MB
            failed = _log_lines(d, "accept_failed")
            assert 1 <= len(failed) <= 6, len(failed)
            assert "EMFILE" in failed[0]
            assert guest.read(SCR) == value
        # Accepting works again: a new guest is served.
        wait_for(lambda: d.status()["uarts"][0]["guest_connected"] is False)
        with BusClient(d.bus()) as again:
            assert again.read(SCR) == value
