"""Signals: SIGHUP re-reads the config, a second Ctrl-C tells the truth; resume's UART name."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import REPO, daemon, json_events, require_program, socat_pair, wait_for

from uartbridge.checkpoint import checkpoint_path, read_checkpoint
from uartbridge.client import BusClient

pytestmark = pytest.mark.e2e


def test_sighup_reloads_the_config_and_keeps_serving(tmp_path: Path) -> None:
    """SIGHUP re-reads the file: logging and [checkpoint] apply at once, a changed UART is
    named as needing a restart; the daemon keeps its device and stops cleanly after."""
    with socat_pair(tmp_path) as pair, daemon(tmp_path / "d", [
        {"name": "uart0", "port": str(pair.a)}
    ], interval_s=0) as d:
        d.start()
        assert d.proc is not None
        with BusClient(d.bus()) as client:
            client.write(7, 0x42)
        d.checkpoint["interval_s"] = 0.2
        d.uarts[0]["rx_backlog_bytes"] = 1024
        d.write_config()
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: config reloaded" in d.log(), 20)
        (changes,) = [e for e in d.events() if e["event"] == "SIGHUP: these changes need a restart"]
        assert changes["keys"] == ["uart uart0"]
        # the new interval_s applies: periodic checkpoints start
        wait_for(lambda: checkpoint_path(d.state_dir, "uart0").exists(), 20)
        with BusClient(d.bus()) as client:
            assert client.read(7) == 0x42
        assert d.stop() == 0
        assert not (d.state_dir / "daemon.running").exists()


def test_sighup_with_a_broken_config_changes_nothing(tmp_path: Path) -> None:
    """SIGHUP with a config that no longer validates: an error, the running config stays."""
    with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}], interval_s=0) as d:
        d.start()
        assert d.proc is not None
        pid = d.proc.pid
        d.config_path.write_text("[daemon]\nno_such_key = 1\n")
        d.write_config = lambda: None  # type: ignore[method-assign]
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: config not reloaded" in d.log(), 20)
        (event,) = [e for e in d.events() if e["event"].startswith("SIGHUP: config not")]
        assert event["level"] == "error" and "no_such_key" in event["error"]
        time.sleep(0.5)
        assert d.proc.poll() is None and d.proc.pid == pid
        assert d.stop() == 0
        assert checkpoint_path(d.state_dir, "uart0").exists()


def test_second_ctrl_c_after_the_final_checkpoint_tells_the_truth(tmp_path: Path) -> None:
    """A second SIGINT that arrives after the final checkpoint is on disk (held there by an
    injected 1.5 s delay in the daemon's last fsync, under strace): no claim of "exiting
    without a final checkpoint", exit 0, the checkpoint complete."""
    strace = require_program("strace")
    with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}], interval_s=0) as d:
        # fsync #1 is the marker at start; #2 the checkpoint's temp file, #3 its directory.
        d.start(prefix=(strace, "-f", "-o", os.devnull, "-e", "trace=fsync",
                        "-e", "inject=fsync:delay_exit=1500000:when=2+"))
        pid = d.status()["pid"]  # the daemon, strace's child
        try:
            with BusClient(d.bus()) as client:
                client.write(7, 0x17)
            os.kill(pid, signal.SIGINT)
            wait_for(lambda: checkpoint_path(d.state_dir, "uart0").exists(), 20, 0.001)
            os.kill(pid, signal.SIGINT)  # while the daemon still sits in the directory's fsync
            assert d.wait_exit(30) == 0
            d.proc = None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # strace detaches from it when it is killed
        assert "without a final checkpoint" not in d.log()
        assert "the final checkpoint is written" in d.log()
        assert read_checkpoint(checkpoint_path(d.state_dir, "uart0")).uart.scr == 0x17


def test_resume_into_a_differently_named_uart_is_refused_or_mapped(tmp_path: Path) -> None:
    """`resume FILE --config C` where C has no UART of FILE's name: refused (78) with a hint;
    `--uart NAME` maps it explicitly and the state is then saved under NAME."""
    with daemon(tmp_path / "old", [{"name": "console", "port": "pty:"}], interval_s=0) as old:
        old.start()
        with BusClient(old.bus("console")) as client:
            client.write(7, 0x99)
        assert old.stop() == 0
    saved = checkpoint_path(old.state_dir, "console")
    with daemon(tmp_path / "new", [{"name": "uart0", "port": "pty:"}], interval_s=0) as new:
        new.write_config()
        refused = subprocess.run(
            [sys.executable, "-m", "uartbridge", "resume", str(saved), "--config",
             str(new.config_path)],
            capture_output=True, text=True, timeout=60, cwd=REPO,
        )
        assert refused.returncode == 78
        assert "--uart" in refused.stderr and "'console'" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert not new.state_dir.exists() or not any(new.state_dir.iterdir())
        new.start("resume", str(saved), "--uart", "uart0")
        with BusClient(new.bus("uart0")) as client:
            assert client.read(7) == 0x99
        assert new.stop() == 0
        mapped = read_checkpoint(checkpoint_path(new.state_dir, "uart0"))
        assert mapped.meta.uart_name == "uart0" and mapped.uart.scr == 0x99
        assert not checkpoint_path(new.state_dir, "console").exists()
        status_lines = [e for e in json_events(new.log()) if e.get("event") == "ready"]
        assert [e["uart"] for e in status_lines] == ["uart0"]
