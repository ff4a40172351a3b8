"""Shared helpers for the bench scripts: processes by PID, configs, /proc figures, tables.

Every process a bench starts is started here and stopped by its PID (SIGTERM, then SIGKILL)
in the caller's ``finally``; nothing is ever killed by name. Everything lives in a temporary
directory and on loopback (Unix sockets and ptys). The daemon is ``python -m uartbridge``
from this checkout, started with ``NOTIFY_SOCKET`` pointing at a datagram socket of ours, and
is ready when it sends ``READY=1`` (sd_notify), as systemd would see it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import termios
import time
import tty
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# The uartbridge a bench (and the daemon it starts) imports: this checkout, or the compiled
# build's tree when _builds.py runs the bench as a child for it.
TREE = Path(os.environ.get("UARTBRIDGE_BENCH_TREE") or REPO)
if str(TREE) not in sys.path:
    sys.path.insert(0, str(TREE))

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# -- processes --------------------------------------------------------------------------------


def need_program(name: str) -> str:
    """The path of ``name`` or exit with a hint (the benches need real socat)."""
    path = shutil.which(name)
    if path is None:
        raise SystemExit(f"{name} is not installed (scripts/bootstrap --test installs it)")
    return path


def wait_for(predicate: Callable[[], Any], timeout_s: float = 10.0, what: str = "") -> Any:
    """Poll ``predicate`` every 5 ms until it is truthy; RuntimeError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s} s waiting for {what or predicate}")
        time.sleep(0.005)


def stop_process(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM,
                 timeout_s: float = 10.0) -> int | None:
    """Stop ``proc`` by its PID: ``sig``, wait, then SIGKILL. Returns its exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    """A fresh temporary directory, removed at the end (short path: Unix socket limits)."""
    path = Path(tempfile.mkdtemp(prefix=f"ub-{prefix}-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Socat:
    """A socat virtual null-modem: pty links ``a`` and ``b``; stop() by PID."""

    a: Path
    b: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Socat:
        socat = need_program("socat")
        for link in (self.a, self.b):
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
        self.proc = subprocess.Popen(
            [socat, f"pty,raw,echo=0,link={self.a}", f"pty,raw,echo=0,link={self.b}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: self.a.exists() and self.b.exists(), 5.0, "socat's pty links")
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


@dataclass
class Daemon:
    """A ``python -m uartbridge`` process with its own config, runtime and state dirs.

    ``uarts``: one dict of ``[[uart]]`` keys per UART. ``daemon`` and ``checkpoint`` add keys to
    those tables; anything not given keeps uartbridge's default (``log_level = "info"``,
    ``[checkpoint] interval_s = 5`` …). Only the runtime and state directories are forced
    into ``root``.
    """

    root: Path
    uarts: list[dict[str, Any]]
    daemon: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] = field(default_factory=dict)
    # Interpreter options before ``-m uartbridge`` (``-m cProfile -o FILE``: bench/scale.py).
    python_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0
    ready_s: float = 0.0  # exec → READY=1 of the last start

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

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def bus(self, name: str = "uart0") -> Path:
        return self.runtime_dir / f"{name}.bus"

    def pty(self, name: str = "uart0") -> Path:
        """The published slave of a ``pty:`` port."""
        return self.runtime_dir / f"{name}.pty"

    @property
    def log_path(self) -> Path:
        return self.root / f"daemon-{self.runs}.log"

    def write_config(self) -> None:
        daemon = {"runtime_dir": self.runtime_dir, "state_dir": self.state_dir, **self.daemon}
        loop = os.environ.get("UARTBRIDGE_BENCH_EVENT_LOOP")
        if loop and "event_loop" not in daemon:
            daemon["event_loop"] = loop
        lines = ["[daemon]"] + [f"{k} = {toml_value(v)}" for k, v in daemon.items()]
        if self.checkpoint:
            lines.append("[checkpoint]")
            lines += [f"{k} = {toml_value(v)}" for k, v in self.checkpoint.items()]
        for uart in self.uarts:
            lines.append("[[uart]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in uart.items()]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, *command: str, timeout_s: float = 30.0) -> float:
        """Start ``uartbridge run`` (or ``command``); wait for READY=1; returns exec→READY s."""
        self.write_config()
        self.runs += 1
        notify_path = self.root / f"notify-{self.runs}.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)
        args = list(command) or ["run"]
        try:
            with open(self.log_path, "wb") as log:
                start = time.perf_counter()
                self.proc = subprocess.Popen(
                    [sys.executable, *self.python_args, "-m", "uartbridge", *args,
                     "--config", str(self.config_path)],
                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=TREE,
                )
            self.ready_s = self._wait_ready(notify, start, timeout_s)
        finally:
            notify.close()
            with contextlib.suppress(FileNotFoundError):
                notify_path.unlink()
        return self.ready_s

    def _wait_ready(self, notify: socket.socket, start: float, timeout_s: float) -> float:
        notify.settimeout(0.05)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                message = notify.recv(65536).decode(errors="replace")
            except TimeoutError:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"daemon exited {self.proc.returncode}: {self.log()[-2000:]}"
                    ) from None
                continue
            if "READY=1" in message.split("\n"):
                return time.perf_counter() - start
        raise RuntimeError(f"daemon never sent READY=1: {self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        """Stop by PID (SIGTERM: a final checkpoint, then exit; SIGKILL after 20 s)."""
        code = stop_process(self.proc, timeout_s=20.0)
        self.proc = None
        return code


# -- far ends ---------------------------------------------------------------------------------


def open_raw(path: Path | str, *, blocking: bool = False) -> int:
    """Open a tty (pty slave, socat link) raw, 8 bit, no echo; non-blocking unless asked."""
    flags = os.O_RDWR | os.O_NOCTTY | (0 if blocking else os.O_NONBLOCK)
    fd = os.open(str(path), flags)
    with contextlib.suppress(termios.error):
        tty.setraw(fd)
    return fd


# -- /proc ------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds_fine(pid: int) -> float | None:
    """CPU time of ``pid``'s threads in seconds at ns resolution (/proc/PID/task/*/schedstat,
    field 1: time on CPU), or None where the kernel does not provide it."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all CPUs (/proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def rss_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in bytes (/proc/PID/status)."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


# -- figures ----------------------------------------------------------------------------------


def read_round_trips(read: Callable[[int], object], n: int, register: int = 7) -> list[int]:
    """``n`` READ round trips of ``register`` (SCR) through a client's ``read``, each in ns."""
    clock = time.perf_counter_ns
    out = []
    for _ in range(n):
        start = clock()
        read(register)
        out.append(clock() - start)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank on sorted values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Figure:
    """One figure over several runs, with its target and direction (``<=`` or ``>=``)."""

    key: str
    label: str
    unit: str
    runs: list[float]
    target: float | None = None
    direction: str = ">="  # the figure meets the target when median >= target (or <=)
    digits: int = 1

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        if self.direction == ">=":
            return self.median >= self.target
        return self.median <= self.target

    def fmt(self, value: float) -> str:
        return f"{value:,.{self.digits}f}"


def print_table(title: str, figures: Sequence[Figure], notes: Sequence[str] = ()) -> None:
    """A table: figure, unit, median, min, max, target, met."""
    print(title)
    head = f"{'figure':<44} {'unit':<8} {'median':>12} {'min':>12} {'max':>12} " \
           f"{'target':>12} {'met':>4}"
    print(head)
    print("-" * len(head))
    for fig in figures:
        target = "" if fig.target is None else f"{fig.direction} {fig.fmt(fig.target)}"
        met = "" if fig.met is None else ("yes" if fig.met else "NO")
        print(f"{fig.label:<44} {fig.unit:<8} {fig.fmt(fig.median):>12} "
              f"{fig.fmt(min(fig.runs)):>12} {fig.fmt(max(fig.runs)):>12} {target:>12} {met:>4}")
    for note in notes:
        print(f"  {note}")


def json_line(bench: str, figures: Sequence[Figure], **extra: Any) -> str:
    """One JSON line: per figure its median, min, max, runs, target and met."""
    out: dict[str, Any] = {"bench": bench}
    for fig in figures:
        out[fig.key] = {
            "median": round(fig.median, 6),
            "min": round(min(fig.runs), 6),
            "max": round(max(fig.runs), 6),
            "unit": fig.unit,
            "target": fig.target,
            "direction": fig.direction if fig.target is not None else None,
            "met": fig.met,
            "digits": fig.digits,
            "runs": [round(v, 6) for v in fig.runs],
        }
    out.update(extra)
    out["machine"] = machine()
    return json.dumps(out)


def machine() -> dict[str, Any]:
    """nproc, CPU model, Python, kernel."""
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def add_runs_arg(parser: Any, default: int = 5) -> None:
    parser.add_argument("--runs", type=int, default=default,
                        help=f"repetitions; figures are medians (default {default})")


def socket_ping_pong_p50_us(rounds: int = 5000) -> float:
    """The machine's floor for a round trip: p50 of a bare 1-byte AF_UNIX ping-pong between
    two processes (this VM's scheduler latency moves it between ~10 and ~50 µs)."""
    import socket as _socket

    here, there = _socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the echo process
        here.close()
        while data := there.recv(64):
            there.send(data)
        os._exit(0)
    there.close()
    times: list[int] = []
    try:
        for _ in range(rounds):
            start = time.perf_counter_ns()
            here.send(b"x")
            here.recv(64)
            times.append(time.perf_counter_ns() - start)
    finally:
        here.close()
        os.waitpid(pid, 0)
    return percentile(times, 0.5) / 1000
