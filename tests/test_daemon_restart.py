"""Restarts that close nothing: `uartbridge restart` (exec in place) and the fd store path.

Real daemons, real ptys (socat and the daemon's own `pty:`), real bus clients. The fd store
tests play systemd's part themselves (see ``FakeManager``): systemd cannot run here as a
service manager, and the VM test (tests/system/vm) is the proof under the real one.
"""

from __future__ import annotations

import json
import os
import select
import shutil
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
from fake_manager import FakeManager
from procs import (
    REPO,
    Daemon,
    daemon,
    fill_filesystem,
    pid_gone,
    small_tmpfs,
    socat_pair,
    wait_for,
)
from streams import (
    FarEnd,
    GuestRunner,
    assert_exact,
    guest_receive,
    sequence_stream,
    wait_streams,
)

from uartbridge.checkpoint import checkpoint_path, read_checkpoint
from uartbridge.client import BusClient
from uartbridge.control import request
from uartbridge.errors import BusError
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
    """Under traffic both ways, 3 × `uartbridge restart` (each through an understudy): the
    same PID, the socat far end never loses its link (socat, which exits when our side
    closes, keeps running), every byte once and in order both ways. The guest is away for
    the restart (it is dropped at each of the two handovers: see the next test for clients
    connecting meanwhile); the far end writes all along."""
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
                assert wait_for(lambda n=cycle + 1: request(d.control, {"cmd": "status"})
                                .get("restarts") == n, 30)
                status = request(d.control, {"cmd": "status"})
                assert status["pid"] == pid and status["understudy_pid"] is None, status
                guest.resume()
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
        assert len(taken) == 6, d.log()  # two handovers per restart
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
            with BusClient(d.bus()) as client:
                received = guest_receive(Guest8250(client), len(sent), 20)
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
                    try:
                        scratch = client.read(SCR)
                    except BusError:
                        # Admitted by the understudy just as it handed back: dropped, like
                        # any guest at a handover (docs/bus-protocol.md §1); connect again.
                        continue
                attempts.append((began, time.time()))
                assert scratch == 0x5A
                if request(d.control, {"cmd": "status"}).get("restarts") == 1:
                    break
            # Logged by the understudy before it takes the bus socket over, then by the
            # main process's new run before it takes it back.
            resumed = _event_times(d, "resumed from checkpoint")
            assert len(resumed) == 2, d.log()
            # The first was pending while no process accepted (the old run quiescing, the
            # understudy not serving yet), and was not refused.
            assert attempts[0][0] <= resumed[0] <= attempts[0][1], (resumed, attempts)
            with BusClient(d.bus()) as client:
                guest = Guest8250(client)
                assert client.read(SCR) == 0x5A
                client.write(3, 0x83)  # LCR.DLAB: read the divisor back
                divisor = client.read(0) | client.read(1) << 8
                client.write(3, 0x03)
                assert divisor == 115200 // 9600
                received = guest_receive(guest, 11)
                assert received == b"in the FIFO"
        finally:
            os.close(far)


# -- the take-back path fed as systemd does -------------------------------------------------


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
                with BusClient(d.bus()) as client:
                    received = guest_receive(Guest8250(client), 26)
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


PTY = {"name": "uart0", "port": "pty:"}
# Port 1 on loopback refuses: the UART starts with its port closed and keeps trying.
REMOTE = {"name": "uart1", "port": "rfc2217://127.0.0.1:1"}


@pytest.mark.parametrize(
    ("uarts", "limit", "needed"),
    [([PTY, {**PTY, "name": "uart1"}], 1, 2), ([PTY, {**PTY, "name": "uart1"}], 2, None),
     ([PTY, {**PTY, "name": "uart1"}], 512, None), ([PTY, REMOTE], 1, None)],
    ids=["two-ptys-1", "two-ptys-2", "two-ptys-512", "pty-and-rfc2217-1"],
)
def test_an_fd_store_too_small_for_the_ports_is_named_at_start(
    tmp_path: Path, uarts: list[dict[str, Any]], limit: int, needed: int | None
) -> None:
    """A manager whose fd store holds fewer descriptors than the daemon keeps there ($FDSTORE,
    systemd >= 254's FileDescriptorStoreMax=) gets a warning at start naming the limit and
    what it needs, since its next restart closes the rest; one with room gets none, and an
    rfc2217:// port, which no restart keeps, needs no room."""
    manager = FakeManager(tmp_path)
    try:
        with daemon(tmp_path / "d", uarts, interval_s=0) as d:
            manager.start(d, {}, env={"FDSTORE": str(limit)})
            small = _events(d, "fd store too small")
            if needed is not None:
                assert len(small) == 1, d.log()
                assert (small[0]["limit"], small[0]["needed"]) == (limit, needed)
                assert "FileDescriptorStoreMax=" in small[0]["hint"]
            else:
                assert small == [], d.log()
            assert d.stop(signal.SIGTERM) == 0, d.log()
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


# -- the understudy's edges ------------------------------------------------------------------


def _understudy_pid(d: Daemon) -> int:
    """The PID of the understudy the latest restart spawned (once it is serving)."""
    assert wait_for(lambda: _events(d, "understudy serving"), 30, interval_s=0.002), d.log()
    return int(_events(d, "understudy ready")[-1]["pid"])


def test_restart_with_a_bad_config_is_refused_and_the_daemon_serves_on(tmp_path: Path) -> None:
    """A config that no longer loads: the restart is abandoned before anything is touched,
    the reply says why (non-zero exit code), and the same process serves on with its
    state; once the config is fixed, a restart goes through."""
    with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}], interval_s=0) as d:
        d.start()
        assert d.proc is not None
        link = d.runtime_dir / "uart0.pty"
        slave = os.path.realpath(link)
        with BusClient(d.bus()) as client:
            client.write(SCR, 0x33)
        good = d.config_path.read_text()
        d.config_path.write_text(good.replace('log_level = "debug"', 'log_level = "loud"'))
        reply = request(d.control, {"cmd": "restart"})
        assert reply["ok"] is False and reply["exit_code"] != 0, reply
        assert "restart abandoned" in reply["error"] and "log_level" in reply["error"], reply
        status = request(d.control, {"cmd": "status"})
        assert status["pid"] == d.proc.pid and status["restarts"] == 0, status
        with BusClient(d.bus()) as client:
            assert client.read(SCR) == 0x33
        assert os.path.realpath(link) == slave
        assert _events(d, "restart abandoned; this run serves on"), d.log()
        assert not _events(d, "exec")
        d.config_path.write_text(good)
        _finish(_restart(d), d)
        with BusClient(d.bus()) as client:
            assert client.read(SCR) == 0x33
        assert d.status()["pid"] == d.proc.pid


def test_restart_onto_code_that_no_longer_imports_is_refused_and_the_daemon_serves_on(
        tmp_path: Path) -> None:
    """An upgrade left a module that does not import (a syntax error): the understudy dies
    before it is ready, the restart is abandoned and this run serves on with its state;
    once the code is mended, a restart goes through."""
    code_dir = tmp_path / "code"
    shutil.copytree(REPO / "uartbridge", code_dir / "uartbridge",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    broken = code_dir / "uartbridge" / "config.py"
    good = broken.read_text()
    with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}], interval_s=0) as d:
        # ``python -m`` puts the working directory first on sys.path: this copy is the code.
        d.start(prefix=("env", f"--chdir={code_dir}"))
        assert d.proc is not None
        assert d.status()["pid"] == d.proc.pid
        with BusClient(d.bus()) as client:
            client.write(SCR, 0x66)
        broken.write_text(good + "\ndef half_written(:\n")
        reply = request(d.control, {"cmd": "restart"})
        assert reply["ok"] is False and "restart abandoned" in reply["error"], reply
        assert "exited" in reply["error"], reply
        status = request(d.control, {"cmd": "status"})
        assert status["pid"] == d.proc.pid and status["restarts"] == 0, status
        with BusClient(d.bus()) as client:
            assert client.read(SCR) == 0x66
        broken.write_text(good)
        assert request(d.control, {"cmd": "restart"})["ok"]
        assert wait_for(lambda: request(d.control, {"cmd": "status"}).get("restarts") == 1, 30)
        with BusClient(d.bus()) as client:
            assert client.read(SCR) == 0x66


def test_understudy_killed_midway_closes_nothing_and_loses_nothing_saved(
        tmp_path: Path) -> None:
    """The understudy dies while it serves (after the handover, before it hands back): the
    new run finds it gone and resumes from the state directory's checkpoint the handover
    wrote with the port and listeners it kept across the exec: the pty's far end sees no
    hang-up, a client connecting meanwhile waits in the backlog (not refused), the port is
    taken over (not opened anew); same PID; the scratch register and every byte the far end
    sent reach the guest; the death is reported as a crash."""
    with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}], interval_s=0) as d:
        d.start()
        assert d.proc is not None
        far = os.open(d.runtime_dir / "uart0.pty", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        watch = HangupWatch(far)
        try:
            with BusClient(d.bus()) as client:
                Guest8250(client).startup(115200)
                client.write(SCR, 0x44)
            os.write(far, b"before the restart;")
            assert wait_for(lambda: _held(d) == 19, 10)
            assert request(d.control, {"cmd": "restart"})["ok"]
            pid = _understudy_pid(d)
            try:
                os.kill(pid, signal.SIGSTOP)  # holds it until the new run asks for the state
                assert wait_for(
                    lambda: _events(d, "taking the state back from the understudy"), 30), d.log()
                # The new run held too, S dies: only what the new run kept is still open.
                os.kill(d.proc.pid, signal.SIGSTOP)
                os.kill(pid, signal.SIGKILL)
                assert wait_for(lambda: _zombie(pid), 10)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as waiting:
                    waiting.connect(str(d.bus()))  # ECONNREFUSED had the listener gone with S
                os.write(far, b"while it died")  # EIO had the pty's master gone with S
            finally:
                os.kill(pid, signal.SIGKILL)
                os.kill(d.proc.pid, signal.SIGCONT)
            assert wait_for(lambda: len(_events(d, "ready")) == 2, 30), d.log()
            assert _events(d, "understudy gone before handing back; resuming from the state "
                              "directory with the ports and listeners kept across the exec"
                           ), d.log()
            events = [e.get("event") for e in d.events()]
            since_gone = events[events.index("understudy gone before handing back; resuming "
                                             "from the state directory with the ports and "
                                             "listeners kept across the exec"):]
            assert "port.taken_over" in since_gone, d.log()
            assert not {"port.opened", "port.pty_created"} & set(since_gone), d.log()
            assert wait_for(lambda: pid_gone(pid), 10)  # reaped by the new run
            status = d.status()
            assert status["pid"] == d.proc.pid and status["resumed_after_crash"] is True
            with BusClient(d.bus()) as client:
                guest = Guest8250(client)
                assert client.read(SCR) == 0x44
                received = guest_receive(guest, 32)
            watch.stop()
            assert watch.events == [], f"the far end saw poll events {watch.events}"
        finally:
            watch.stop()
            os.close(far)
        assert received == b"before the restart;while it died"


def test_sigterm_during_the_handover_takes_the_state_back_then_stops(tmp_path: Path) -> None:
    """SIGTERM to the daemon's PID while the understudy serves: the new run first takes the
    state back, then stops as on any SIGTERM (exit 0, the final checkpoint holds the state,
    the marker is removed) and no understudy is left."""
    with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}], interval_s=0) as d:
        d.start()
        assert d.proc is not None
        with BusClient(d.bus()) as client:
            client.write(SCR, 0x55)
        assert request(d.control, {"cmd": "restart"})["ok"]
        pid = _understudy_pid(d)
        os.kill(d.proc.pid, signal.SIGTERM)
        assert d.wait_exit(30) == 0, d.log()
        d.proc = None
        assert _events(d, "understudy handed back; exiting"), d.log()
        assert pid_gone(pid)
        assert read_checkpoint(checkpoint_path(d.state_dir, "uart0")).uart.scr == 0x55
        assert not (d.state_dir / "daemon.running").exists()
        assert not d.bus().exists() and not d.control.exists()


def _zombie(pid: int) -> bool:
    """``pid`` has exited (its descriptors are closed) and waits to be reaped."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "Z"


def _blocked_signals(pid: int, tid: int) -> int:
    """The signal mask (``SigBlk``) of thread ``tid`` of process ``pid``."""
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("SigBlk:")), 16)


def test_the_daemons_helper_threads_never_take_a_stop_signal(tmp_path: Path) -> None:
    """Every thread but the main one blocks SIGTERM, SIGINT and SIGHUP: the kernel gives a
    stop signal to a thread that does not block it, and one taken by a helper thread while
    the main thread holds them across a restart's exec was lost (the daemon never stopped)."""
    stop_bits = sum(1 << (int(s) - 1) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
    with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}], interval_s=0.1) as d:
        d.start()
        assert d.proc is not None
        pid = d.proc.pid
        assert request(d.control, {"cmd": "restart"})["ok"]  # the default executor works
        assert wait_for(lambda: request(d.control, {"cmd": "status"}).get("restarts") == 1, 30)
        assert request(d.control, {"cmd": "restart"})["ok"]
        assert wait_for(lambda: request(d.control, {"cmd": "status"}).get("restarts") == 2, 30)
        time.sleep(0.2)  # periodic checkpoints: the writer thread of this run exists
        helpers = [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]
        assert helpers, "no helper thread to check"
        unblocking = {tid: hex(_blocked_signals(pid, tid)) for tid in helpers
                      if _blocked_signals(pid, tid) & stop_bits != stop_bits}
        assert not unblocking, unblocking
        assert _blocked_signals(pid, pid) & stop_bits == 0  # the main thread takes them


@pytest.mark.parametrize("delay_ms", [0, 2, 5, 10, 20, 50, 100, 200])
def test_a_stop_signal_at_any_moment_of_a_restart_stops_the_daemon(
        tmp_path: Path, delay_ms: int) -> None:
    """SIGTERM ``delay_ms`` after a restart was answered (quiescing, handing over, exec,
    taking back, serving): the daemon stops with exit 0 and the state on disk, always."""
    with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}], interval_s=0.1) as d:
        d.start()
        assert d.proc is not None
        with BusClient(d.bus()) as client:
            client.write(SCR, delay_ms)
        assert request(d.control, {"cmd": "restart"})["ok"]
        time.sleep(delay_ms / 1000)
        os.kill(d.proc.pid, signal.SIGTERM)
        assert d.wait_exit(30) == 0, d.log()
        d.proc = None
        assert read_checkpoint(checkpoint_path(d.state_dir, "uart0")).uart.scr == delay_ms
        assert not (d.state_dir / "daemon.running").exists()


def test_control_client_connected_before_a_restart_gets_its_reply(tmp_path: Path) -> None:
    """A control connection the daemon accepted before a restart and whose request comes
    just after it began is answered by this run (``ControlServer.finish``), not closed
    without a reply; the next request goes to the new run's backlog as before."""
    with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}], interval_s=0) as d:
        d.start()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as early:
            early.settimeout(30)
            early.connect(str(d.control))
            lines = early.makefile("rwb")
            lines.write(b'{"cmd": "status"}\n')
            lines.flush()
            assert json.loads(lines.readline())["ok"]  # accepted and served: it stays open
            assert request(d.control, {"cmd": "restart"})["ok"]
            time.sleep(0.05)  # the handover has begun
            lines.write(b'{"cmd": "status"}\n')
            lines.flush()
            reply = lines.readline()
            assert reply, "closed without a reply"
            assert json.loads(reply)["ok"]
        assert wait_for(lambda: request(d.control, {"cmd": "status"}).get("restarts") == 1, 30)
