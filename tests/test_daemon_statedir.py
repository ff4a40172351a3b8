"""The state directory under stress: full, read-only, or claimed by another daemon.

Real filesystems: a small tmpfs mounted for the test (full when a filler file says ENOSPC),
remounted read-only for EROFS. The device holds bytes from the far end that no guest has
read, so that losing the state would lose data, not just registers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from procs import (
    Daemon,
    daemon,
    fill_filesystem,
    json_events,
    read_only_bind,
    small_tmpfs,
    socat_pair,
    wait_for,
)
from streams import sequence_stream

from uartbridge.checkpoint import Checkpoint, checkpoint_path, read_checkpoint
from uartbridge.client import BusClient

pytestmark = pytest.mark.e2e

PAYLOAD = sequence_stream(100, b"s")  # 800 bytes: fits the RBR + rx backlog


def _uart(link: Path) -> dict[str, object]:
    return {"name": "uart0", "port": str(link)}


def _hold_input(d: Daemon, far_link: Path) -> None:
    """The far end sends PAYLOAD; no guest reads it, so the device (FIFO + backlog) holds it."""
    far = os.open(far_link, os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(far, PAYLOAD)
    finally:
        os.close(far)

    def held() -> bool:
        u = d.status()["uarts"][0]
        taken = u["counters"]["bytes_received"]  # by the chip (RBR, or the FIFO)
        return bool(taken + u["link"]["rx_backlog_bytes"] == len(PAYLOAD))

    wait_for(held, 20)


def _holds_payload(ckpt: Checkpoint) -> bool:
    """The checkpoint has every byte of PAYLOAD: the chip's share, then the backlog."""
    backlog = ckpt.port.rx_backlog
    taken = ckpt.uart.statistics.bytes_received
    return taken + len(backlog) == len(PAYLOAD) and PAYLOAD.endswith(backlog)


def _read_all(bus: Path, count: int) -> bytes:
    """Read RBR while LSR.DR says there is data (no FIFO reset: that would flush RX)."""
    got = bytearray()
    with BusClient(bus) as client:
        deadline = time.monotonic() + 20
        while len(got) < count and time.monotonic() < deadline:
            if client.read(5) & 0x01:
                got.append(client.read(0))
    return bytes(got)


def _emergency(d: Daemon) -> Path:
    return d.runtime_dir / "emergency" / "uart0.checkpoint.json"


def test_full_state_dir_at_stop_writes_an_emergency_copy_and_exits_74(tmp_path: Path) -> None:
    """SIGTERM with the state directory full: an emergency copy in the runtime directory, an
    error naming both paths and the reason, exit 74, sockets and links removed; the next
    start resumes from the copy and the guest gets every unread byte."""
    with (
        socat_pair(tmp_path) as pair,
        daemon(tmp_path / "d", [_uart(pair.a)], interval_s=0, stop_retry_s=0) as d,
        small_tmpfs(tmp_path / "d" / "state"),
    ):
        d.start()
        _hold_input(d, pair.b)
        filler = fill_filesystem(d.state_dir)
        assert d.stop(signal.SIGTERM) == 74
        events = json_events(d.log())
        failed = [e for e in events if e["event"].startswith("final checkpoint failed")]
        assert failed and failed[0]["reason"] == "No space left on device"
        assert failed[0]["emergency_copy"] == str(_emergency(d))
        assert str(d.state_dir) in failed[0]["error"]
        assert not d.bus().exists() and not d.control.exists()
        assert (d.state_dir / "daemon.running").exists()  # the next start knows
        saved = read_checkpoint(_emergency(d))
        assert _holds_payload(saved)
        assert _emergency(d).stat().st_mode & 0o777 == 0o600
        filler.unlink()
        (d.state_dir / "filler2").unlink()
        d.start()
        assert "resuming from an emergency copy" in d.log()
        assert _read_all(d.bus(), len(PAYLOAD)) == PAYLOAD
        assert d.stop() == 0
        assert not _emergency(d).exists()  # the state directory has it now
        assert read_checkpoint(checkpoint_path(d.state_dir, "uart0")).meta.generation > (
            saved.meta.generation
        )


def test_final_checkpoint_is_retried_until_the_state_dir_has_room(tmp_path: Path) -> None:
    """A refused final checkpoint is retried (stop_retry_s); when space comes back it lands
    in the state directory, the emergency copy goes, and the daemon exits 0."""
    with (
        socat_pair(tmp_path) as pair,
        daemon(tmp_path / "d", [_uart(pair.a)], interval_s=0, stop_retry_s=60) as d,
        small_tmpfs(tmp_path / "d" / "state"),
    ):
        d.start()
        _hold_input(d, pair.b)
        filler = fill_filesystem(d.state_dir)
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "retrying the final checkpoint" in d.log(), 20)
        assert d.proc.poll() is None  # still holding the device
        filler.unlink()
        assert d.wait_exit(30) == 0
        d.proc = None
        assert "final checkpoint written after a retry" in d.log()
        saved = read_checkpoint(checkpoint_path(d.state_dir, "uart0"))
        assert _holds_payload(saved)
        assert not _emergency(d).exists()
        assert not (d.state_dir / "daemon.running").exists()


def test_read_only_state_dir_at_stop_exits_73(tmp_path: Path) -> None:
    """The state directory turned read-only under a running daemon: emergency copy, exit 73."""
    with (
        socat_pair(tmp_path) as pair,
        daemon(tmp_path / "d", [_uart(pair.a)], interval_s=0, stop_retry_s=0) as d,
        small_tmpfs(tmp_path / "d" / "state") as state,
    ):
        d.start()
        _hold_input(d, pair.b)
        with read_only_bind(state):
            assert d.stop(signal.SIGTERM) == 73
        failed = [e for e in json_events(d.log())
                  if e["event"].startswith("final checkpoint failed")]
        assert failed[0]["reason"] == "Read-only file system"
        saved = read_checkpoint(_emergency(d))
        assert _holds_payload(saved)


@pytest.mark.parametrize("trouble", ["full", "read-only"])
def test_start_on_an_unusable_state_dir_is_a_clear_error(tmp_path: Path, trouble: str) -> None:
    """`run` on a full (74) or read-only (73) state directory: one error line, no traceback,
    no socket left behind."""
    with (
        daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}]) as d,
        small_tmpfs(tmp_path / "d" / "state") as state,
    ):
        if trouble == "full":
            fill_filesystem(state)
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True, timeout=30)
        d.start(wait=False)
        code = d.wait_exit()
        d.proc = None
        assert code == (74 if trouble == "full" else 73), d.log()
        (fatal,) = [e for e in json_events(d.log()) if e["event"] == "fatal error"]
        assert fatal["level"] == "error" and str(state) in fatal["error"]
        assert ("No space left" if trouble == "full" else "Read-only") in fatal["error"]
        assert "Traceback" not in d.log()
        assert not d.bus().exists() and not d.control.exists()


def test_second_daemon_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    """A second daemon on a state directory in use exits 75 naming the first one's PID, and
    claims no crash; the first keeps serving and stops cleanly."""
    with (
        socat_pair(tmp_path) as pair,
        daemon(tmp_path / "a", [_uart(pair.a)]) as first,
        daemon(tmp_path / "b", [{"name": "uart0", "port": "pty:"}]) as second,
    ):
        first.start()
        assert first.proc is not None
        second.write_config()
        text = second.config_path.read_text().replace(
            f'state_dir = "{second.state_dir}"', f'state_dir = "{first.state_dir}"'
        )
        second.write_config = lambda: None  # type: ignore[method-assign]
        second.config_path.write_text(text)
        second.start(wait=False)
        assert second.wait_exit() == 75
        second.proc = None
        log = second.log()
        assert f"pid {first.proc.pid}" in log and "Traceback" not in log
        assert "resumed" not in log and "after_crash" not in log
        assert first.status()["uarts"][0]["name"] == "uart0"
        assert first.stop() == 0
        assert not (first.state_dir / "daemon.running").exists()
