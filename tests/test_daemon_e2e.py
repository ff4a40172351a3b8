"""The real daemon process end to end: run, bus, guest, far end, checkpoint, resume, CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from procs import (
    REPO,
    Daemon,
    Socat,
    daemon,
    ready_events,
    require_program,
    socat_pair,
    stop_tmux,
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

from uartbridge.bus import (
    FrameDecoder,
    Hello,
    HelloReply,
    Sync,
    SyncReply,
    Write,
    WriteN,
    encode,
)
from uartbridge.checkpoint import checkpoint_path, read_checkpoint
from uartbridge.client import BusClient
from uartbridge.errors import BusError
from uartbridge.guest import Guest8250
from uartbridge.registers import FCR, LCR, SCR, THR

pytestmark = pytest.mark.e2e


def _socat_uart(link: Path, **extra: object) -> dict[str, object]:
    return {"name": "uart0", "port": str(link), **extra}


def test_run_without_config_serves_a_pty_and_a_bus(tmp_path: Path) -> None:
    """`uartbridge run` with no config serves one UART on a new pty and prints both paths."""
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(20)
    env = dict(
        os.environ,
        RUNTIME_DIRECTORY=str(tmp_path / "run"),
        STATE_DIRECTORY=str(tmp_path / "state"),
        NOTIFY_SOCKET=str(notify_path),
    )
    out_path = tmp_path / "out.log"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uartbridge", "run"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
    try:
        messages = ""
        while "READY=1" not in messages.split("\n"):
            messages += notify.recv(4096).decode() + "\n"
        pty = tmp_path / "run" / "uart0.pty"
        bus = tmp_path / "run" / "uart0.bus"
        # Not a terminal: JSON lines only; the announcement is the "ready" event.
        ready = ready_events(out_path.read_text())["uart0"]
        assert ready["pty"] == str(pty) and ready["bus_socket"] == str(bus)
        far = os.open(pty, os.O_RDWR | os.O_NOCTTY)
        try:
            with BusClient(bus) as client:
                guest = Guest8250(client)
                assert guest.probe() == ("16550A", 16)
                guest.startup(115200)
                guest.write(b"hello from the guest")
                assert guest.drain(10)
                got = b""
                while len(got) < 20:
                    got += os.read(far, 100)
                assert got == b"hello from the guest"
                os.write(far, b"hello from the far end")
                received = guest_receive(guest, 22)
                assert received == b"hello from the far end"
        finally:
            os.close(far)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert checkpoint_path(tmp_path / "state", "uart0").exists()
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _transfer_across(
    tmp_path: Path, restart: Callable[[Daemon, int], None], **daemon_keys: object
) -> None:
    """Streams both ways while ``restart(daemon, cycle)`` runs 3 times, the guest paused."""
    guest_tx = sequence_stream(6000, b"g")
    far_tx = sequence_stream(6000, b"f")
    with (
        socat_pair(tmp_path) as pair,
        daemon(tmp_path / "d", [_socat_uart(pair.a)], interval_s=0) as d,
    ):
        d.daemon.update(daemon_keys)
        d.start()
        guest = GuestRunner(d.bus(), guest_tx)
        far = FarEnd(pair.b, far_tx, rate_bytes_per_s=40_000)
        guest.start()
        far.start()
        try:
            for cycle in range(3):
                time.sleep(0.3)
                guest.pause()
                restart(d, cycle)
                guest.resume()
            wait_streams(guest, far)
            assert_exact(bytes(far.received), guest_tx, "guest → far end")
            assert_exact(bytes(guest.received), far_tx, "far end → guest")
        finally:
            guest.stop()
            far.stop()


def test_checkpoint_stop_and_resume_mid_transfer_lose_nothing(tmp_path: Path) -> None:
    """`checkpoint --stop` then `resume` mid-transfer: both streams arrive whole and in order."""

    def restart(d: Daemon, cycle: int) -> None:
        output = tmp_path / f"cycle{cycle}.json"
        result = d.cli(
            "checkpoint", "--stop", "--output", str(output), "--config", str(d.config_path)
        )
        assert result.returncode == 0, result.stderr + d.log()
        assert d.wait_exit() == 0
        d.proc = None
        # The state directory holds the same state, so a plain `run` would resume it too.
        assert read_checkpoint(checkpoint_path(d.state_dir, "uart0")) == read_checkpoint(output)
        d.start("resume", str(output))

    _transfer_across(tmp_path, restart)


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_each_event_loop_serves_and_resumes_without_loss(tmp_path: Path, event_loop: str) -> None:
    """With event_loop forced to asyncio or to uvloop the daemon runs on that loop (status
    says so, and which build), and a checkpoint --stop / resume mid-transfer loses nothing."""
    from uartbridge.buildinfo import build_name

    def restart(d: Daemon, cycle: int) -> None:
        status = d.status()
        assert (status["event_loop"], status["build"]) == (event_loop, build_name())
        if cycle == 0:
            human = d.cli("status", "--config", str(d.config_path)).stdout
            assert f"{build_name()}, event loop {event_loop}" in human
        output = tmp_path / f"cycle{cycle}.json"
        result = d.cli(
            "checkpoint", "--stop", "--output", str(output), "--config", str(d.config_path)
        )
        assert result.returncode == 0, result.stderr + d.log()
        assert d.wait_exit() == 0
        d.proc = None
        d.start("resume", str(output))

    _transfer_across(tmp_path, restart, event_loop=event_loop)


def test_sigterm_then_run_again_loses_nothing(tmp_path: Path) -> None:
    """SIGTERM and `run` again (the systemctl restart path): both streams whole and in order."""

    def restart(d: Daemon, cycle: int) -> None:
        assert d.stop(signal.SIGTERM) == 0, d.log()
        d.start()
        assert "resumed from checkpoint" in d.log()

    _transfer_across(tmp_path, restart)


def test_second_guest_is_refused_and_first_keeps_working(tmp_path: Path) -> None:
    """A second guest on the same UART is refused; the first one keeps its device."""
    with socat_pair(tmp_path) as pair, daemon(tmp_path / "d", [_socat_uart(pair.a)]) as d:
        d.start()
        with BusClient(d.bus()) as first:
            first.write(7, 0x5A)
            with pytest.raises(BusError, match=r"(?i)busy|already"):
                second = BusClient(d.bus())
                second.read(7)
            assert first.read(7) == 0x5A


def test_guest_reconnect_finds_the_device_as_it_was(tmp_path: Path) -> None:
    """A guest that disconnects leaves the device as it was, and may reconnect."""
    with socat_pair(tmp_path) as pair, daemon(tmp_path / "d", [_socat_uart(pair.a)]) as d:
        d.start()
        with BusClient(d.bus()) as client:
            client.write(7, 0xA5)
            client.write(1, 0x05)
            client.sync()
        with BusClient(d.bus()) as client:
            assert client.read(7) == 0xA5
            assert client.read(1) == 0x05


def test_malformed_bus_frames_and_control_lines_leave_the_daemon_serving(tmp_path: Path) -> None:
    """Garbage on the bus and on the control socket is refused; the daemon keeps serving."""
    with socat_pair(tmp_path) as pair, daemon(tmp_path / "d", [_socat_uart(pair.a)]) as d:
        d.start()
        half_frame = b"\x00\x05\x02\x09"  # then EOF in the middle of the frame
        for garbage in (b"\xff\xff\xff\xff" * 4, struct.pack(">H", 0) + b"x", half_frame):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(str(d.bus()))
                s.sendall(garbage)
                s.shutdown(socket.SHUT_WR)
                reply = b""
                while chunk := s.recv(4096):
                    reply += chunk
                assert reply[2:3] == b"\xff", reply  # an ERROR frame, then the server closed
        for line in (b"not json\n", b"[1,2]\n", b'{"cmd": "explode"}\n', b"x" * 100_000 + b"\n"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(str(d.control))
                s.sendall(line)
                reply = json.loads(s.makefile("rb").readline())
                assert reply["ok"] is False and reply["error"]
        with BusClient(d.bus()) as client:
            client.write(7, 0x42)
            assert client.read(7) == 0x42
        assert d.status()["uarts"][0]["name"] == "uart0"


def test_cli_exit_codes(tmp_path: Path) -> None:
    """Every documented exit code: 0, 64, 65, 66, 69, 78."""

    def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "uartbridge", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env=env,
        )

    assert cli("--version").returncode == 0
    assert cli("no-such-command").returncode == 64
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    result = cli("inspect", str(bad))
    assert result.returncode == 65 and "Traceback" not in result.stderr
    assert cli("inspect", str(tmp_path / "missing.json")).returncode == 66
    assert cli("resume", str(tmp_path / "missing.json")).returncode == 66
    assert cli("resume", str(bad)).returncode == 65
    config = tmp_path / "bad.toml"
    config.write_text("[daemon]\nno_such_key = 1\n")
    result = cli("check-config", str(config))
    assert result.returncode == 78 and "no_such_key" in result.stderr
    assert cli("run", "--config", str(config)).returncode == 78
    assert cli("run", "--config", str(tmp_path / "missing.toml")).returncode == 66
    assert cli("status", "--control", str(tmp_path / "nobody.sock")).returncode == 69
    result = cli("checkpoint", "--control", str(tmp_path / "nobody.sock"))
    assert result.returncode == 69 and "Traceback" not in result.stderr
    missing_port = tmp_path / "fail-fast.toml"
    missing_port.write_text(
        f'[daemon]\nruntime_dir = "{tmp_path}/run"\nstate_dir = "{tmp_path}/state"\n'
        f'fail_fast = true\n[[uart]]\nport = "{tmp_path}/no-such-tty"\n'
    )
    result = cli("run", "--config", str(missing_port))
    assert result.returncode == 69 and "Traceback" not in result.stderr


def test_status_shows_reader_state_registers_and_checkpoint(tmp_path: Path) -> None:
    """`status --json` shows the reader state, registers, FIFOs, counters and last checkpoint."""
    with socat_pair(tmp_path) as pair, daemon(tmp_path / "d", [_socat_uart(pair.a)]) as d:
        d.start()
        result = d.cli("checkpoint", "--config", str(d.config_path))
        assert result.returncode == 0, result.stderr
        status = d.status()["uarts"][0]
        assert status["reader_state"] == "connected"
        assert status["registers"]["lsr"]["value"] == "0x60"
        assert status["tsr_retry"] == 0 and status["rx_fifo"] == 0
        assert status["last_checkpoint"]["age_s"] >= 0
        human = d.cli("status", "--config", str(d.config_path))
        assert human.returncode == 0 and "connected" in human.stdout
        ckpt = read_checkpoint(checkpoint_path(d.state_dir, "uart0"))
        assert ckpt.meta.uart_name == "uart0" and ckpt.meta.generation >= 1


def test_trace_file_records_both_directions_in_hex(tmp_path: Path) -> None:
    """A per-UART trace file logs each chunk with a monotonic timestamp, direction and hex."""
    trace = tmp_path / "uart0.trace"
    with (
        socat_pair(tmp_path) as pair,
        daemon(tmp_path / "d", [_socat_uart(pair.a, trace_file=str(trace))]) as d,
    ):
        d.start()
        far = os.open(pair.b, os.O_RDWR | os.O_NOCTTY)
        try:
            with BusClient(d.bus()) as client:
                guest = Guest8250(client)
                guest.startup(115200)
                guest.write(b"abc")
                assert guest.drain(10)
                os.write(far, b"xyz")
                received = guest_receive(guest, 3)
                assert received == b"xyz"
        finally:
            os.close(far)
        assert d.stop() == 0
    lines = [line.split(" ", 2) for line in trace.read_text().splitlines()]
    assert ["tx", "61 62 63"] in [line[1:] for line in lines]
    assert ["rx", "78 79 7a"] in [line[1:] for line in lines]
    assert all(line[0].isdigit() for line in lines)
    assert trace.stat().st_mode & 0o777 == 0o600


def test_invalid_checkpoint_in_the_state_directory_refuses_to_start(tmp_path: Path) -> None:
    """A state directory whose checkpoints are all invalid stops `run` (exit 65), losing nothing."""
    with socat_pair(tmp_path) as pair, daemon(tmp_path / "d", [_socat_uart(pair.a)]) as d:
        d.start()
        assert d.stop() == 0
        path = checkpoint_path(d.state_dir, "uart0")
        saved = path.read_bytes()
        for kept in (path, path.with_name("uart0.checkpoint.prev.json")):
            if kept.exists():
                kept.write_bytes(kept.read_bytes()[:-20])
        d.start(wait=False)
        assert d.wait_exit() == 65
        assert "no valid checkpoint" in d.log() and "Traceback" not in d.log()
        assert path.read_bytes() == saved[:-20]  # the evidence is left as it was


def test_port_that_appears_later_gets_what_the_guest_sent_meanwhile(tmp_path: Path) -> None:
    """A port missing at start is reopened with backoff; `buffer` keeps what the guest sent."""
    pair = Socat(a=tmp_path / "late-a", b=tmp_path / "late-b")
    with daemon(tmp_path / "d", [_socat_uart(pair.a, reconnect_max_s=0.2)]) as d:
        d.start()
        try:
            assert d.status()["uarts"][0]["reader_state"] == "disconnected"
            with BusClient(d.bus()) as client:
                guest = Guest8250(client)
                guest.startup(115200)
                assert client.read(6) & 0xA0 == 0  # no peer: DSR and DCD low
                guest.write(b"sent before the port existed")
                assert guest.drain(10)  # taken by the buffer policy, not back-pressured
                pair.start()
                far = os.open(pair.b, os.O_RDWR | os.O_NOCTTY)
                try:
                    got = b""
                    while len(got) < 28:
                        got += os.read(far, 100)
                    assert got == b"sent before the port existed"
                finally:
                    os.close(far)
            assert d.status()["uarts"][0]["reader_state"] == "connected"
        finally:
            pair.stop()


def test_console_under_tmux_passes_keys_and_output(tmp_path: Path) -> None:
    """`uartbridge console` in a real terminal (tmux): keys reach the far end and back."""
    tmux = require_program("tmux")
    env = dict(os.environ, TMUX_TMPDIR=str(tmp_path / "tmux"))
    (tmp_path / "tmux").mkdir()

    def run_tmux(*args: str) -> str:
        return subprocess.run(
            [tmux, *args], env=env, capture_output=True, text=True, check=True, timeout=10
        ).stdout

    with socat_pair(tmp_path) as pair, daemon(tmp_path / "d", [_socat_uart(pair.a)]) as d:
        d.start()
        far = os.open(pair.b, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        console = f"{sys.executable} -m uartbridge console --socket {d.bus()}"
        try:
            run_tmux("new-session", "-d", "-s", "console", "-x", "100", "-y", "20", console)
            wait_for(lambda: "exit with Ctrl-]" in run_tmux("capture-pane", "-p", "-t", "console"))
            run_tmux("send-keys", "-t", "console", "typed at the console")
            got = bytearray()

            def far_got_it() -> bool:
                with contextlib.suppress(BlockingIOError):
                    got.extend(os.read(far, 100))
                return bytes(got) == b"typed at the console"

            wait_for(far_got_it)
            os.write(far, b"written at the far end")
            wait_for(
                lambda: "written at the far end" in run_tmux("capture-pane", "-p", "-t", "console")
            )
            run_tmux("send-keys", "-t", "console", "C-]")
            # Ctrl-] ends the console, and with it the tmux session.
            wait_for(
                lambda: subprocess.run(
                    [tmux, "has-session", "-t", "console"], env=env, capture_output=True
                ).returncode
                != 0
            )
        finally:
            os.close(far)
            stop_tmux(tmux, env)


def test_what_check_config_accepts_run_runs(tmp_path: Path) -> None:
    """Edge values check-config accepts (odd names, extreme baudbase, the shortest timers,
    empty backlogs, a gid with no name, a trace file) start and stop cleanly; names it
    refuses (_x .x .. -x) are refused by run too (78), with no socket left behind."""
    edge = [
        {"name": "a..b", "port": "pty:", "baudbase": 1, "backlog_bytes": 0,
         "rx_backlog_bytes": 0, "reconnect_min_s": 0.01, "reconnect_max_s": 0.01},
        {"name": "x-", "port": "pty:", "baudbase": 100_000_000, "tx_retry_limit": 0,
         "reconnect_min_s": 3600, "reconnect_max_s": 3600},
        {"name": "9", "port": str(tmp_path / "not-there-yet"), "on_disconnect": "discard",
         "trace_file": str(tmp_path / "9.trace")},
    ]
    with daemon(tmp_path / "d", edge, interval_s=0.1, stop_retry_s=0) as d:
        d.write_config()
        text = d.config_path.read_text().replace("[daemon]\n", '[daemon]\nsocket_group = 54321\n')
        d.write_config = lambda: None  # type: ignore[method-assign]
        d.config_path.write_text(text)
        checked = d.cli("check-config", str(d.config_path))
        assert checked.returncode == 0, checked.stderr
        d.start()
        time.sleep(0.5)  # a few periodic checkpoints
        assert d.stop() == 0, d.log()
        assert "Traceback" not in d.log()
        for name in ("a..b", "x-", "9"):
            assert checkpoint_path(d.state_dir, name).exists()
    for bad in ("_x", ".x", "..", "-x"):
        config = tmp_path / "bad.toml"
        run = tmp_path / f"run-{bad}"
        config.write_text(f'[daemon]\nruntime_dir = "{run}"\nstate_dir = "{tmp_path}/s"\n'
                          f'[[uart]]\nname = "{bad}"\n')
        for command in ("check-config", "run"):
            args = [command, str(config)] if command == "check-config" else [
                command, "--config", str(config)]
            result = subprocess.run([sys.executable, "-m", "uartbridge", *args],
                                    capture_output=True, text=True, timeout=60, cwd=REPO)
            assert result.returncode == 78, (bad, command, result.stderr)
            assert "Traceback" not in result.stderr and "uart[0].name" in result.stderr
        assert not run.exists()


def _hello(sock: socket.socket) -> FrameDecoder:
    """HELLO v1 on a blocking socket; the decoder past the HELLO_REPLY."""
    sock.sendall(encode(Hello(1)))
    decoder = FrameDecoder()
    while (reply := decoder.next_frame()) is None:
        data = sock.recv(4096)
        assert data, "the daemon closed the bus connection"
        decoder.feed(data)
    assert isinstance(reply, HelloReply), reply
    return decoder


def _sync(sock: socket.socket, decoder: FrameDecoder, token: int) -> None:
    """SYNC and wait for its reply (IRQ frames before it are skipped)."""
    sock.sendall(encode(Sync(token)))
    while True:
        frame = decoder.next_frame()
        if frame == SyncReply(token):
            return
        if frame is None:
            data = sock.recv(4096)
            assert data, "the daemon closed the bus connection"
            decoder.feed(data)


@pytest.mark.parametrize("how", ["sigterm", "checkpoint-stop", "restart"])
def test_posted_writes_in_the_socket_at_a_stop_are_not_lost(tmp_path: Path, how: str) -> None:
    """THR writes a guest posted just before SIGTERM, `checkpoint --stop` or `restart`, still
    unread in the daemon's socket, end on the far end or in the final checkpoint: every byte
    exactly once, in order."""
    with (
        socat_pair(tmp_path) as pair,
        daemon(tmp_path / "d", [_socat_uart(pair.a)], interval_s=0) as d,
    ):
        d.start()
        assert d.proc is not None
        far = FarEnd(pair.b, b"")
        far.start()
        try:
            expected, held = _post_then_stop(d, how)
            deadline = time.monotonic() + 20.0  # generous: the far end is a thread
            while len(far.received) + len(held) < len(expected) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)  # nothing more arrives (a duplicate would)
        finally:
            far.stop()
        got = bytes(far.received) + held
        assert len(got) == len(expected), (
            f"far end {len(far.received)} + checkpoint {len(held)} of {len(expected)} bytes")
        assert got == expected


def test_posted_writes_at_sigterm_with_no_port_are_in_the_checkpoint(tmp_path: Path) -> None:
    """With the port missing (`buffer`), THR writes posted just before SIGTERM and still
    unread in the daemon's socket are all in the final checkpoint's TX backlog, in order."""
    with daemon(tmp_path / "d", [_socat_uart(tmp_path / "missing-a")], interval_s=0) as d:
        d.start()
        assert d.status()["uarts"][0]["reader_state"] == "disconnected"
        expected, held = _post_then_stop(d)
        assert held == expected, f"checkpoint holds {len(held)} of {len(expected)} bytes"


def _post_then_stop(d: Daemon, how: str = "sigterm") -> tuple[bytes, bytes]:
    """A guest posts THR writes into the socket of the stopped (SIGSTOP) daemon, which is
    then asked to stop (``how``: SIGTERM, a `checkpoint --stop` or `restart` request) and
    continued; (the THR bytes posted, the final checkpoint's unsent bytes: none for a
    restart, whose next run sends them)."""
    assert d.proc is not None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    try:
        sock.settimeout(20)
        sock.connect(str(d.bus()))
        decoder = _hello(sock)
        # 8N1 at 115200, FIFOs on; applied before the stop.
        sock.sendall(b"".join(encode(Write(reg, value)) for reg, value in (
            (LCR, 0x83), (0, 1), (1, 0), (LCR, 0x03), (FCR, 0x07))))
        _sync(sock, decoder, 1)
        singles = bytes((i * 13) % 256 for i in range(200))
        burst = bytes((i * 7 + 3) % 256 for i in range(2000))
        # Work ahead of the THR frames: SCR bursts of 4094 writes, one fair-share turn
        # each, so the stop surely begins while the THR frames are still unread (the
        # daemon takes a few loop steps from the signal to closing the bus).
        ahead = encode(WriteN(SCR, b"\x5a" * 4094)) * 40
        payload = (ahead + b"".join(encode(Write(THR, b)) for b in singles)
                   + encode(WriteN(THR, burst)))
        control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        control.settimeout(20)
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            sock.sendall(payload)  # into the socket of a stopped daemon: nothing read yet
            if how == "sigterm":
                os.kill(d.proc.pid, signal.SIGTERM)
            else:  # what `checkpoint --stop` or `restart` sends, queued before it runs again
                message = ({"cmd": "restart"} if how == "restart" else
                           {"cmd": "checkpoint", "uart": None, "stop": True, "document": False})
                control.connect(str(d.control))
                control.sendall(json.dumps(message).encode() + b"\n")
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        with control:
            if how != "sigterm":
                reply = json.loads(control.makefile("rb").readline())
                assert reply.get("ok"), reply
        if how == "restart":  # in place: the same process goes on and sends what it holds
            wait_for(lambda: d.status().get("restarts") == 1, 30.0)
            return singles + burst, b""
        assert d.wait_exit() == 0, d.log()
        d.proc = None
    finally:
        sock.close()
    ckpt = read_checkpoint(checkpoint_path(d.state_dir, "uart0"))
    return singles + burst, ckpt.port.tx_backlog + ckpt.uart.tx_waiting()
