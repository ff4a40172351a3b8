"""Restarts that close nothing: `uartbridge restart` (exec in place) and the fd store path.

Real daemons, real ptys (socat and the daemon's own `pty:`), real bus clients. The fd store
tests play systemd's part themselves (see ``FakeManager``): systemd cannot run here as a
service manager, and the VM test (tests/system/vm) is the proof under the real one.
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from procs import REPO, Daemon, daemon, fill_filesystem, small_tmpfs, socat_pair, wait_for
from streams import FarEnd, GuestRunner, assert_exact, sequence_stream, wait_streams

from uartbridge.checkpoint import checkpoint_path, read_checkpoint
from uartbridge.client import BusClient
from uartbridge.control import request
from uartbridge.guest import Guest8250
from uartbridge.port.handle import fd_identity

pytestmark = pytest.mark.e2e

SCR = 7


def _restart(d: Daemon) -> subprocess.Popen[str]:
    """`uartbridge restart` against ``d``, started (not waited for)."""
    return subprocess.Popen(
        [sys.executable, "-m", "uartbridge", "restart", "--config", str(d.config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )


def _finish(proc: subprocess.Popen[str], d: Daemon) -> str:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err + d.log()
    assert "restarted in place" in out
    return out


def _held(d: Daemon) -> int:
    """Received bytes the device holds (its RX FIFO and the link's backlog behind it)."""
    uart = d.status()["uarts"][0]
    return int(uart["rx_fifo"]) + int(uart["link"]["rx_backlog_bytes"])


def _event_times(d: Daemon, event: str) -> list[float]:
    return [datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
            for e in d.events() if e.get("event") == event]


class HangupWatch:
    """Polls a far end's fd for POLLHUP/POLLERR on a thread (a closed pty shows it at once)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.events: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, 0)  # only HUP/ERR/NVAL are reported
        while not self._stop.is_set():
            for _fd, mask in poller.poll(10):
                self.events.append(mask)
                time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_restart_in_place_keeps_the_socat_link_and_loses_no_byte(tmp_path: Path) -> None:
    """Under traffic both ways, 3 × `uartbridge restart`: the same PID, the socat far end never
    loses its link (socat, which exits when our side closes, keeps running), every byte once
    and in order both ways, the guest reconnecting while the restart is under way."""
    guest_tx = sequence_stream(6000, b"g")
    far_tx = sequence_stream(6000, b"f")
    with (
        socat_pair(tmp_path) as pair,
        daemon(tmp_path / "d", [{"name": "uart0", "port": str(pair.a)}], interval_s=0) as d,
    ):
        d.start()
        assert d.proc is not None
        pid = d.proc.pid
        guest = GuestRunner(d.bus(), guest_tx)
        far = FarEnd(pair.b, far_tx, rate_bytes_per_s=40_000)
        guest.start()
        far.start()
        try:
            for cycle in range(3):
                time.sleep(0.3)
                guest.pause()
                reply = request(d.control, {"cmd": "restart"})
                assert reply["ok"] and reply["restarts"] == cycle, reply
                guest.resume()  # connects during the restart: waits in the backlog
                assert wait_for(lambda n=cycle + 1: request(d.control, {"cmd": "status"})
                                .get("restarts") == n, 30)
                assert pair.proc is not None and pair.proc.poll() is None, "socat exited"
            wait_streams(guest, far)
            assert_exact(bytes(far.received), guest_tx, "guest → far end")
            assert_exact(bytes(guest.received), far_tx, "far end → guest")
        finally:
            guest.stop()
            far.stop()
        assert d.proc.poll() is None and d.proc.pid == pid
        assert d.status()["restarts"] == 3
        text = d.cli("status", "--config", str(d.config_path)).stdout
        assert "restarted in place 3 times" in text, text
        taken = [e for e in d.events() if e.get("event") == "port.taken_over"]
        assert len(taken) == 3, d.log()
        assert not [e for e in d.events() if e.get("event") == "port.handover_mismatch"]


def test_restart_in_place_pty_port_far_end_sees_no_hangup(tmp_path: Path) -> None:
    """A `pty:` port across 3 restarts: the link names the same slave, the client that has it
    open never sees POLLHUP, and what it wrote meanwhile reaches the guest whole."""
    with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}], interval_s=0) as d:
        d.start()
        link = d.runtime_dir / "uart0.pty"
        slave = os.path.realpath(link)
        far = os.open(link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        watch = HangupWatch(far)
        sent = b""
        try:
            with BusClient(d.bus()) as client:
                Guest8250(client).startup(115200)
            for cycle in range(3):
                proc = _restart(d)
                chunk = f"during restart {cycle};".encode() * 20
                os.write(far, chunk)  # while the daemon is between two runs
                sent += chunk
                _finish(proc, d)
                assert os.path.realpath(link) == slave
            watch.stop()
            assert watch.events == [], f"far end saw poll events {watch.events}"
            received = b""
            with BusClient(d.bus()) as client:
                guest = Guest8250(client)
                deadline = time.monotonic() + 20
                while len(received) < len(sent) and time.monotonic() < deadline:
                    guest.service(0.05)
                    received += guest.read()
            assert received == sent
        finally:
            watch.stop()
            os.close(far)


def test_bus_client_connecting_during_restart_waits_and_finds_the_device(tmp_path: Path) -> None:
    """Bus clients that connect while the daemon restarts in place all get in (none is
    refused: they wait in the inherited socket's backlog), and the device is as it was:
    scratch register, divisor, and the bytes waiting in its receive FIFO."""
    with socat_pair(tmp_path) as pair, daemon(
        tmp_path / "d", [{"name": "uart0", "port": str(pair.a)}], interval_s=0
    ) as d:
        d.start()
        far = os.open(pair.b, os.O_RDWR | os.O_NOCTTY)
        try:
            with BusClient(d.bus()) as client:
                guest = Guest8250(client)
                guest.startup(9600)
                client.write(SCR, 0x5A)
                os.write(far, b"in the FIFO")
                assert wait_for(lambda: _held(d) == 11, 10)
            reply = request(d.control, {"cmd": "restart"})
            assert reply["ok"], reply
            # From the reply on, the old run accepts nothing: every connection below is
            # taken by the new run, however early it was made.
            attempts: list[tuple[float, float]] = []
            while True:
                began = time.time()
                with BusClient(d.bus(), timeout_s=30) as client:  # refused: BusError, fails
                    scratch = client.read(SCR)
                attempts.append((began, time.time()))
                assert scratch == 0x5A
                if request(d.control, {"cmd": "status"}).get("restarts") == 1:
                    break
            exec_at = _event_times(d, "exec")[-1]
            # Logged by the new run before it takes the bus socket back.
            new_at = _event_times(d, "resumed from checkpoint")[-1]
            # The first was pending while no process accepted (the old one exec'd, the new
            # one not up yet), and was not refused.
            assert exec_at <= new_at and attempts[0][0] <= new_at <= attempts[0][1], (
                exec_at, new_at, attempts)
            with BusClient(d.bus()) as client:
                guest = Guest8250(client)
                assert client.read(SCR) == 0x5A
                client.write(3, 0x83)  # LCR.DLAB: read the divisor back
                divisor = client.read(0) | client.read(1) << 8
                client.write(3, 0x03)
                assert divisor == 115200 // 9600
                received = b""
                deadline = time.monotonic() + 10
                while len(received) < 11 and time.monotonic() < deadline:
                    guest.service(0.05)
                    received += guest.read()
                assert received == b"in the FIFO"
        finally:
            os.close(far)


# -- the take-back path fed as systemd does -------------------------------------------------


class FakeManager:
    """A fake service manager: a NOTIFY_SOCKET that keeps the fds sent with ``FDSTORE=1``
    (SCM_RIGHTS) by ``FDNAME=``, and starts the daemon with them as ``LISTEN_FDS``.

    A fake because systemd does not run as a service manager on this machine; it does what
    systemd's fd store does for the daemon (keep the fds, hand them back in order with
    ``LISTEN_FDNAMES`` and ``LISTEN_PID``). The real one is exercised in the VM test.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / "manager-notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.store: dict[str, int] = {}
        self.messages: list[str] = []

    def pump(self, until: str | None = None, timeout_s: float = 20.0) -> None:
        """Receive notifications (until one contains ``until``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, min(0.2, deadline - time.monotonic())))
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(64))
            except TimeoutError:
                if until is None:
                    return
                continue
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            text = data.decode()
            self.messages.append(text)
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            if fields.get("FDSTOREREMOVE") == "1":
                old = self.store.pop(fields.get("FDNAME", ""), None)
                if old is not None:
                    os.close(old)
            if fields.get("FDSTORE") == "1":
                for fd in fds:
                    old = self.store.pop(fields["FDNAME"], None)
                    if old is not None:
                        os.close(old)
                    self.store[fields["FDNAME"]] = fd
            else:
                for fd in fds:
                    os.close(fd)
            if until is not None and until in text.splitlines():
                return
        if until is not None:
            raise AssertionError(f"no {until} from the daemon: {self.messages}")

    def start(self, d: Daemon, fds: dict[str, int]) -> None:
        """Start ``uartbridge run`` for ``d`` with ``fds`` as LISTEN_FDS (from fd 3 on)."""
        d.write_config()
        d.runs += 1
        names = list(fds)
        order = [fds[name] for name in names]

        def place() -> None:  # in the child: the fds at 3…, as sd_listen_fds(3) expects
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 512) for fd in order]  # above the targets
            for index, fd in enumerate(high):
                os.dup2(fd, 3 + index)

        env = dict(os.environ, NOTIFY_SOCKET=str(self.path), LISTEN_FDS=str(len(names)),
                   LISTEN_FDNAMES=":".join(names))
        env.pop("LISTEN_PID", None)
        with open(d.log_path, "wb") as log:
            # LISTEN_PID is the child's own PID: known only after the fork, so the wrapper
            # shell sets it and execs the daemon (the PID stays).
            d.proc = subprocess.Popen(
                ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", sys.executable, "-m",
                 "uartbridge", "run", "--config", str(d.config_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                preexec_fn=place, pass_fds=tuple(range(3, 3 + len(names))),
            )
        self.pump("READY=1")

    def close(self) -> None:
        for fd in self.store.values():
            os.close(fd)
        self.store.clear()
        self.sock.close()


def _events(d: Daemon, name: str) -> list[dict[str, Any]]:
    return [e for e in d.events() if e.get("event") == name]


def test_fd_store_keeps_the_port_open_across_a_stop_and_start(tmp_path: Path) -> None:
    """As under systemd: the daemon stores its port's fd (FDSTORE=1, FDNAME=port.uart0), is
    stopped (final checkpoint naming that port) and started with the fd as LISTEN_FDS: it
    takes the fd back; socat never loses its link, and what the far end wrote while no
    daemon ran reaches the guest once, in order."""
    manager = FakeManager(tmp_path)
    try:
        with socat_pair(tmp_path) as pair, daemon(
            tmp_path / "d", [{"name": "uart0", "port": str(pair.a)}], interval_s=0
        ) as d:
            manager.start(d, {})
            manager.pump()
            assert "port.uart0" in manager.store, manager.messages
            assert fd_identity(manager.store["port.uart0"]) is not None
            far = os.open(pair.b, os.O_RDWR | os.O_NOCTTY)
            try:
                with BusClient(d.bus()) as client:
                    guest = Guest8250(client)
                    guest.startup(115200)
                    os.write(far, b"before;")
                assert wait_for(lambda: _held(d) == 7, 10)
                assert d.stop(signal.SIGTERM) == 0, d.log()
                ckpt = read_checkpoint(checkpoint_path(d.state_dir, "uart0"))
                assert ckpt.meta.port_handle == fd_identity(manager.store["port.uart0"])
                os.write(far, b"while stopped;")
                time.sleep(0.8)  # socat gives up 0.5 s after its pty's other side closes
                assert pair.proc is not None and pair.proc.poll() is None, "socat exited"
                manager.start(d, dict(manager.store))
                assert len(_events(d, "port.taken_over")) == 1, d.log()
                os.write(far, b"after")
                received = b""
                with BusClient(d.bus()) as client:
                    guest = Guest8250(client)
                    deadline = time.monotonic() + 10
                    while len(received) < 26 and time.monotonic() < deadline:
                        guest.service(0.05)
                        received += guest.read()
                assert received == b"before;while stopped;after"
            finally:
                os.close(far)
    finally:
        manager.close()


def test_handed_fd_of_another_port_falls_back_to_opening_the_path(tmp_path: Path) -> None:
    """A handed-over port fd that is not the port the checkpoint was taken with (another
    tty) is closed, logged as port.handover_mismatch with both identities, and the
    configured path is opened instead: the UART works on the right wire."""
    manager = FakeManager(tmp_path)
    try:
        with (
            socat_pair(tmp_path, "right") as right,
            socat_pair(tmp_path, "wrong") as wrong,
            daemon(tmp_path / "d", [{"name": "uart0", "port": str(right.a)}],
                   interval_s=0) as d,
        ):
            d.start()
            assert d.stop(signal.SIGTERM) == 0, d.log()
            other = os.open(wrong.a, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            try:
                manager.start(d, {"port.uart0": other})
            finally:
                os.close(other)
            mismatch = _events(d, "port.handover_mismatch")
            assert len(mismatch) == 1, d.log()
            assert mismatch[0]["handed_handle"] != mismatch[0]["checkpoint_handle"]
            assert not _events(d, "port.taken_over")
            far = os.open(right.b, os.O_RDWR | os.O_NOCTTY)
            try:
                with BusClient(d.bus()) as client:
                    guest = Guest8250(client)
                    guest.startup(115200)
                    guest.write(b"right wire")
                    assert guest.drain(10)
                got = b""
                deadline = time.monotonic() + 10
                while len(got) < 10 and time.monotonic() < deadline:
                    r, _w, _x = select.select([far], [], [], 0.1)
                    if r:
                        got += os.read(far, 100)
                assert got == b"right wire"
            finally:
                os.close(far)
            status = d.status()
            assert status["uarts"][0]["port_open"] is True
            assert json.dumps(status)  # the daemon answers after the fallback
    finally:
        manager.close()


def test_restart_resumes_the_state_it_handed_over_not_the_first_start_s(tmp_path: Path) -> None:
    """After `resume FILE` (and with `resume = "never"`), an in-place restart resumes from the
    checkpoint it just wrote: the scratch register keeps its latest value, not FILE's."""
    with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}], interval_s=0,
                resume="never") as d:
        d.start()
        with BusClient(d.bus()) as client:
            client.write(SCR, 0x11)
        saved = tmp_path / "first.json"
        out = d.cli("checkpoint", "--output", str(saved), "--config", str(d.config_path))
        assert out.returncode == 0, out.stderr
        assert d.stop(signal.SIGTERM) == 0
        d.start("resume", str(saved))
        with BusClient(d.bus()) as client:
            assert client.read(SCR) == 0x11
            client.write(SCR, 0x22)
        _finish(_restart(d), d)
        with BusClient(d.bus()) as client:
            assert client.read(SCR) == 0x22


def test_handed_fds_nobody_takes_are_closed_and_named(tmp_path: Path) -> None:
    """A handed-over descriptor no UART takes (its name is unknown here) is closed and logged
    by name; the daemon starts normally."""
    manager = FakeManager(tmp_path)
    try:
        with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}], interval_s=0) as d:
            left, right = socket.socketpair()
            try:
                manager.start(d, {"port.gone": left.fileno()})
            finally:
                left.close()
            unused = [e for e in d.events()
                      if e.get("event") == "handed-over descriptor not used; closed"]
            assert [e["name"] for e in unused] == ["port.gone"], d.log()
            right.settimeout(10)
            assert right.recv(1) == b""  # every copy of the other end is closed
            right.close()
            assert d.status()["uarts"][0]["port_open"] is True
    finally:
        manager.close()


def test_restart_with_a_refused_checkpoint_is_abandoned_and_stops(tmp_path: Path) -> None:
    """If the state directory refuses the final checkpoint (full), the restart is abandoned:
    no exec (it would resume older state); the daemon stops as on SIGTERM, with its
    emergency copy, and exits 74."""
    with (
        daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}], interval_s=0,
               stop_retry_s=0) as d,
        small_tmpfs(tmp_path / "d" / "state"),
    ):
        d.start()
        fill_filesystem(d.state_dir)
        reply = request(d.control, {"cmd": "restart"})
        assert reply["ok"], reply
        assert d.wait_exit(30) == 74, d.log()
        d.proc = None
        assert _events(d, "restart abandoned: the final checkpoint was not written; stopping")
        assert not _events(d, "exec")
        assert list((d.runtime_dir / "emergency").glob("uart0.checkpoint*.json"))
