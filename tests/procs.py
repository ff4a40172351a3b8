"""Real processes for tests: socat null-modems and uartbridge daemons, stopped by PID."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


def require_program(name: str) -> str:
    """The path of a program the test needs: missing fails under CI, skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (CI installs it: scripts/bootstrap --test)")
        pytest.skip(f"{name} is not installed")
    return path


def wait_for(predicate: Any, timeout_s: float = 10.0, interval_s: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {predicate}")
        time.sleep(interval_s)


def stop_process(
    proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout_s: float = 10.0
) -> int:
    """Stop a process by PID: ``sig``, wait, then SIGKILL. Returns its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def stop_tmux(tmux: str, env: dict[str, str]) -> None:
    """Stop a test's tmux server: its pane processes by PID first, then the server.

    ``kill-server`` alone only sends SIGHUP, which some programs (tio) outlive, and the
    orphan is then nobody's to reap.
    """
    listed = subprocess.run(
        [tmux, "list-panes", "-a", "-F", "#{pane_pid}"],
        env=env, capture_output=True, text=True, timeout=5,
    )
    pids = [int(line) for line in listed.stdout.split() if line.isdigit()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 3
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)  # the tmux server reaps its panes
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
    subprocess.run([tmux, "kill-server"], env=env, capture_output=True, timeout=5)


@dataclass
class Socat:
    """A socat virtual null-modem: two pty links, ``a`` and ``b``."""

    a: Path
    b: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra_b: str) -> None:
        """Start (or restart) socat on the same link paths."""
        socat = require_program("socat")
        for link in (self.a, self.b):
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
        opts_b = ",".join(("pty", "raw", "echo=0", f"link={self.b}", *extra_b))
        self.proc = subprocess.Popen(
            [socat, "-d", "-d", f"pty,raw,echo=0,link={self.a}", opts_b],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: self.a.exists() and self.b.exists(), 5.0)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop socat by PID."""
        if self.proc is not None:
            stop_process(self.proc, sig)
            self.proc = None


@contextlib.contextmanager
def socat_pair(tmp_path: Path, name: str = "null") -> Iterator[Socat]:
    """A running socat null-modem under ``tmp_path``, stopped in ``finally``."""
    pair = Socat(a=tmp_path / f"{name}-a", b=tmp_path / f"{name}-b")
    try:
        pair.start()
        yield pair
    finally:
        pair.stop()


def json_events(text: str) -> list[dict[str, Any]]:
    """Every line of a JSON log stream, parsed; a line that is not a JSON object fails."""
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line in a JSON log stream: {line!r}") from None
        assert isinstance(event, dict), line
        events.append(event)
    return events


def ready_events(text: str) -> dict[str, dict[str, Any]]:
    """The daemon's ``ready`` events (the announcement of each UART), by UART name."""
    return {e["uart"]: e for e in json_events(text) if e.get("event") == "ready"}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


@dataclass
class Daemon:
    """A uartbridge daemon process with its own config, runtime and state directories."""

    root: Path
    uarts: list[dict[str, Any]]
    checkpoint: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0

    @property
    def runtime_dir(self) -> Path:
        return self.root / "run"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def config_path(self) -> Path:
        return self.root / "uartbridge.toml"

    @property
    def control(self) -> Path:
        return self.runtime_dir / "control.sock"

    def bus(self, name: str = "uart0") -> Path:
        """The bus socket of a UART."""
        return self.runtime_dir / f"{name}.bus"

    def write_config(self) -> None:
        lines = [
            "[daemon]",
            f"runtime_dir = {_toml_value(self.runtime_dir)}",
            f"state_dir = {_toml_value(self.state_dir)}",
            'log_format = "json"',
            'log_level = "debug"',
            "[checkpoint]",
        ]
        lines += [f"{k} = {_toml_value(v)}" for k, v in self.checkpoint.items()]
        for uart in self.uarts:
            lines.append("[[uart]]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in uart.items()]
        self.config_path.write_text("\n".join(lines) + "\n")

    @property
    def log_path(self) -> Path:
        return self.root / f"daemon-{self.runs}.log"

    def start(self, *command: str, wait: bool = True) -> None:
        """Start ``uartbridge run`` (or ``command``) and wait for READY=1 over sd_notify."""
        self.write_config()
        self.runs += 1
        args = list(command) or ["run"]
        notify_path = self.root / f"notify-{self.runs}.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "uartbridge", *args, "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        try:
            if wait:
                self._wait_ready(notify)
        finally:
            notify.close()

    def _wait_ready(self, notify: socket.socket) -> None:
        notify.settimeout(0.2)
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.log()}")
            try:
                message = notify.recv(4096).decode()
            except TimeoutError:
                continue
            if "READY=1" in message.split("\n"):
                return
        raise AssertionError(f"daemon never sent READY=1: {self.log()}")

    def log(self) -> str:
        """What the daemon printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        """The daemon's log so far, one JSON object per line (a non-JSON line fails)."""
        return json_events(self.log())

    def cli(self, *args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``uartbridge ARGS`` against this daemon's config."""
        return subprocess.run(
            [sys.executable, "-m", "uartbridge", *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=REPO,
        )

    def status(self) -> dict[str, Any]:
        """``uartbridge status --json``, parsed."""
        result = self.cli("status", "--json", "--config", str(self.config_path))
        assert result.returncode == 0, result.stderr
        status: dict[str, Any] = json.loads(result.stdout)
        return status

    def wait_exit(self, timeout_s: float = 20.0) -> int:
        """Wait for the daemon to exit on its own; returns its exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop the daemon by PID; returns its exit code."""
        if self.proc is None:
            return 0
        code = stop_process(self.proc, sig, timeout_s=20.0)
        self.proc = None
        return code


@contextlib.contextmanager
def daemon(root: Path, uarts: list[dict[str, Any]], **checkpoint: Any) -> Iterator[Daemon]:
    """A daemon description under ``root``; whatever process it started is stopped at the end."""
    root.mkdir(parents=True, exist_ok=True)
    d = Daemon(root=root, uarts=uarts, checkpoint=checkpoint)
    try:
        yield d
    finally:
        d.stop(signal.SIGKILL)
