"""Real processes for tests: socat null-modems and uartbridge daemons, stopped by PID."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
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


def _require_root(what: str) -> None:
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        if os.environ.get("CI"):
            pytest.fail(f"{what} needs root and useradd (CI runs as root)")
        pytest.skip(f"{what} needs root and useradd")


@contextlib.contextmanager
def new_group() -> Iterator[grp.struct_group]:
    """A real group created for the test (``groupadd``), removed in ``finally``."""
    _require_root("a test group")
    name = f"ubg{uuid.uuid4().hex[:10]}"
    subprocess.run(["groupadd", name], check=True, capture_output=True, timeout=30)
    try:
        yield grp.getgrnam(name)
    finally:
        subprocess.run(["groupdel", name], capture_output=True, timeout=30)


@contextlib.contextmanager
def new_user(*groups: str) -> Iterator[pwd.struct_passwd]:
    """A real unprivileged user (no home, no login, in ``groups``), removed in ``finally``."""
    _require_root("a test user")
    name = f"ubu{uuid.uuid4().hex[:10]}"
    extra = ["--groups", ",".join(groups)] if groups else []
    subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group",
         *extra, name],
        check=True, capture_output=True, timeout=30,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=30)


@contextlib.contextmanager
def shared_dir() -> Iterator[Path]:
    """A fresh directory every user can traverse (pytest's tmp_path is root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="uartbridge-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# Runs the uartbridge CLI as another user. The interpreter and its libraries may live where
# that user cannot read (this one is under /root): everything is imported first, as root,
# then every id is dropped (setgroups/setgid/setuid: real, effective and saved) before the
# command runs, so what it does to sockets and files it does with the user's rights only.
_CLI_AS_USER = r"""
import os, sys
import secrets, hashlib, stat, socket, json, tempfile
import uartbridge.cli, uartbridge.control, uartbridge.checkpoint, uartbridge.config
import uartbridge.console, uartbridge.inspect, uartbridge.errors
uid, gid = int(sys.argv[1]), int(sys.argv[2])
groups = [int(g) for g in sys.argv[3].split(",") if g]
os.setgroups(groups)
os.setgid(gid)
os.setuid(uid)
assert os.getuid() == os.geteuid() == uid and os.getresuid() == (uid, uid, uid)
os.chdir(sys.argv[4])
sys.exit(uartbridge.cli.main(sys.argv[5:]))
"""


def cli_as(
    user: pwd.struct_passwd, *args: str, cwd: Path, timeout_s: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``uartbridge ARGS`` run as ``user`` (with its groups), in ``cwd``."""
    groups = os.getgrouplist(user.pw_name, user.pw_gid)
    return subprocess.run(
        [sys.executable, "-c", _CLI_AS_USER, str(user.pw_uid), str(user.pw_gid),
         ",".join(map(str, groups)), str(cwd), *args],
        capture_output=True, text=True, timeout=timeout_s, cwd=REPO,
    )


def python_as(
    user: pwd.struct_passwd, code: str, *args: str, timeout_s: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """The system Python running ``code`` as ``user`` from the start (for plain syscalls)."""
    return subprocess.run(
        ["/usr/bin/python3", "-c", code, *args],
        capture_output=True, text=True, timeout=timeout_s, cwd="/",
        user=user.pw_uid, group=user.pw_gid,
        extra_groups=os.getgrouplist(user.pw_name, user.pw_gid),
    )


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "256k") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (made if missing), unmounted in ``finally``."""
    _require_root("a tmpfs mount")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                    str(path)], check=True, capture_output=True, timeout=30)
    try:
        yield path
    finally:
        done = subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@contextlib.contextmanager
def read_only_bind(path: Path) -> Iterator[Path]:
    """``path`` read-only from now on (a read-only bind mount over itself: new opens get
    EROFS even while a process holds files there open), undone in ``finally``."""
    _require_root("a read-only bind mount")
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True,
                   capture_output=True, timeout=30)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True,
                       capture_output=True, timeout=30)
        yield path
    finally:
        done = subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def fill_filesystem(directory: Path) -> Path:
    """Write a file in ``directory`` until the filesystem is full (ENOSPC); returns it."""
    filler = directory / "filler"
    chunk = b"\0" * 4096
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(chunk)
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC
    # Smaller writes too, so that not even one more page is left.
    with open(directory / "filler2", "wb", buffering=0) as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0")
    return filler


def pid_gone(pid: int) -> bool:
    """No process has this PID any more (reaped, or never was)."""
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
    while not all(pid_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)  # the tmux server reaps its panes
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            if not pid_gone(pid):
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
        """Stop socat by PID. After SIGKILL its links are removed here, as its SIGTERM
        handler would: a dangling link can later point at an unrelated test's pty."""
        if self.proc is not None:
            stop_process(self.proc, sig)
            self.proc = None
            for link in (self.a, self.b):
                if link.is_symlink():
                    link.unlink()


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
    daemon: dict[str, Any] = field(default_factory=dict)  # more [daemon] keys (event_loop)

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
            *(f"{k} = {_toml_value(v)}" for k, v in self.daemon.items()),
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

    def start(
        self,
        *command: str,
        wait: bool = True,
        output: int | None = None,
        stderr: int | None = None,
        prefix: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        """Start ``uartbridge run`` (or ``command``) and wait for READY=1 over sd_notify.

        Its stdout and stderr go to ``log_path``, or to the fd ``output`` when given (stderr
        to the fd ``stderr`` if that is given too);
        ``prefix`` runs it under a wrapper (``unshare …``), ``env`` adds variables.
        """
        self.write_config()
        self.runs += 1
        args = list(command) or ["run"]
        notify_path = self.root / f"notify-{self.runs}.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        full_env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), **(env or {}))
        argv = [*prefix, sys.executable, "-m", "uartbridge", *args,
                "--config", str(self.config_path)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log if output is None else output,
                stderr=subprocess.STDOUT if stderr is None else stderr,
                env=full_env,
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
