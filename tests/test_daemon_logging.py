"""Logging never takes the daemon down; the journal gets native entries; CLI output pipes.

Real pipes whose reader is gone or never reads, a real pty as a terminal, a real datagram
socket standing in for journald's (bound by the test and bind-mounted, in a private mount
namespace, where journald's socket lives: /run/systemd/journal/socket).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import REPO, Daemon, daemon, socat_pair, wait_for

from uartbridge import logs
from uartbridge.checkpoint import checkpoint_path, read_checkpoint
from uartbridge.client import BusClient

pytestmark = pytest.mark.e2e


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stop(d: Daemon, how: str) -> int:
    assert d.proc is not None
    if how == "checkpoint --stop":
        result = d.cli("checkpoint", "--stop", "--config", str(d.config_path))
        assert result.returncode == 0, result.stderr
        return d.wait_exit()
    return d.stop(signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)


def _auto_log_format(d: Daemon) -> None:
    """Write d's config with log_format = "auto" (the tests' default is "json")."""
    d.write_config()
    text = d.config_path.read_text().replace('log_format = "json"', 'log_format = "auto"')
    d.write_config = lambda: None  # type: ignore[method-assign]
    d.config_path.write_text(text)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "checkpoint --stop"])
def test_closed_log_pipe_keeps_the_daemon_serving_and_stoppable(
    tmp_path: Path, how: str
) -> None:
    """stdout/stderr a pipe with no reader (EPIPE): the daemon serves, does not spin, counts
    what it dropped, and stops cleanly with its final checkpoint."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with socat_pair(tmp_path) as pair, daemon(tmp_path / "d", [
        {"name": "uart0", "port": str(pair.a)}
    ], interval_s=0) as d:
        try:
            d.start(output=write_end)
        finally:
            os.close(write_end)
        assert d.proc is not None
        with BusClient(d.bus()) as client:  # connecting logs lines, which all fail
            client.write(7, 0x5A)
            assert client.read(7) == 0x5A
        status = d.status()
        assert status["log_lines_dropped"] > 0
        before = _cpu_s(d.proc.pid)
        time.sleep(2.0)
        assert _cpu_s(d.proc.pid) - before < 0.5  # idle: not spinning on EPIPE
        assert _stop(d, how) == 0
        d.proc = None
        assert read_checkpoint(checkpoint_path(d.state_dir, "uart0")).uart.scr == 0x5A


def test_a_reader_that_stops_reading_does_not_stall_the_daemon(tmp_path: Path) -> None:
    """A log pipe that fills up (its reader reads nothing): lines are dropped after a short
    wait, bus and control keep answering, and SIGTERM stops the daemon with its checkpoint."""
    read_end, write_end = os.pipe()
    with socat_pair(tmp_path) as pair, daemon(tmp_path / "d", [
        {"name": "uart0", "port": str(pair.a)}
    ], interval_s=0) as d:
        try:
            d.start(output=write_end)
            os.close(write_end)
            for _ in range(400):  # two log lines each, ~250 bytes apiece: > 64 KiB of pipe
                with BusClient(d.bus()) as client:
                    client.write(7, 0x33)
            with BusClient(d.bus()) as client:
                assert client.read(7) == 0x33
            assert d.status()["log_lines_dropped"] > 0
            assert d.stop(signal.SIGTERM) == 0
        finally:
            os.close(read_end)
        assert read_checkpoint(checkpoint_path(d.state_dir, "uart0")).uart.scr == 0x33


def test_console_logs_on_a_terminal_announce_in_plain_words(tmp_path: Path) -> None:
    """stderr a terminal: console log lines and the plain `uart0: pty … bus …` line go there;
    stdout (a file here) gets nothing."""
    master, slave = os.openpty()
    stdout_path = tmp_path / "stdout.txt"
    with (
        daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}]) as d,
        open(stdout_path, "wb") as stdout,
    ):
        _auto_log_format(d)
        d.start(output=stdout.fileno(), stderr=slave)
        os.close(slave)
        seen = b""
        pty = d.runtime_dir / "uart0.pty"
        expected = f"uart0: pty {pty}  bus {d.bus()}".encode()

        def announced() -> bool:
            nonlocal seen
            while select.select([master], [], [], 0.1)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break
            return expected in seen

        wait_for(announced, 20)
        assert b"ready" in seen and b'{"' not in seen  # console lines, no JSON
        assert d.stop() == 0
    os.close(master)
    assert stdout_path.read_bytes() == b""


def _cli_into_closed_pipe(*args: str) -> subprocess.CompletedProcess[bytes]:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "uartbridge", *args],
            stdout=write_end, stderr=subprocess.PIPE, timeout=60, cwd=REPO,
            # As users run it: stdout block-buffered into the pipe (some test environments
            # set PYTHONUNBUFFERED, which hides a failure at the interpreter's final flush).
            env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
        )
    finally:
        os.close(write_end)


def test_cli_output_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    """`status`, `inspect`, `check-config`, `--help` piped into a reader that is gone
    (`| head`, `| grep -q`): exit 0, nothing on stderr, no traceback."""
    with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}]) as d:
        d.start()
        checkpoint = d.cli("checkpoint", "--config", str(d.config_path))
        assert checkpoint.returncode == 0, checkpoint.stderr
        for args in (
            ("status", "--json", "--config", str(d.config_path)),
            ("status", "--config", str(d.config_path)),
            ("inspect", str(checkpoint_path(d.state_dir, "uart0"))),
            ("check-config", str(d.config_path)),
            ("--help",),
        ):
            result = _cli_into_closed_pipe(*args)
            assert result.returncode == 0, (args, result.stderr)
            assert result.stderr == b"", (args, result.stderr)


# -- the journal's native protocol ------------------------------------------------------------


def parse_journal_entry(data: bytes) -> dict[str, str]:
    """Decode one native-protocol datagram (``NAME=value`` lines; binary length form)."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(data):
        newline = data.index(b"\n", i)
        line = data[i:newline]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            i = newline + 1
        else:
            name = line
            (size,) = struct.unpack_from("<Q", data, newline + 1)
            start = newline + 9
            value = data[start : start + size]
            assert data[start + size : start + size + 1] == b"\n"
            i = start + size + 1
        fields[name.decode("ascii")] = value.decode("utf-8")
    return fields


def test_journal_entry_binary_form_and_field_names() -> None:
    """A value with a newline uses the length form; keys become journal field names."""
    entry = logs.journal_entry([("MESSAGE", "two\nlines"), ("UART", "uart0")])
    assert entry == b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\nUART=uart0\n"
    assert parse_journal_entry(entry) == {"MESSAGE": "two\nlines", "UART": "uart0"}
    assert logs.journal_field_name("bus_socket") == "BUS_SOCKET"
    assert logs.journal_field_name("_private") == "PRIVATE"
    assert logs.journal_field_name("9lives-x") == "LIVES_X"
    assert logs.journal_field_name("__") is None


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "journal.sock"))
    sock.settimeout(20)
    try:
        yield sock
    finally:
        sock.close()


def _namespace_prefix(tmp_path: Path) -> tuple[str, ...]:
    """Run under a private mount namespace where journald's socket is the test's socket."""
    if os.geteuid() != 0:
        pytest.skip("a mount namespace needs root")
    script = (
        "set -e; mount -t tmpfs tmpfs /run/systemd 2>/dev/null || mount -t tmpfs tmpfs /run; "
        "mkdir -p /run/systemd/journal; touch /run/systemd/journal/socket; "
        f'mount --bind "{tmp_path}/journal.sock" /run/systemd/journal/socket; exec "$@"'
    )
    return ("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh")


def _journal_stream_env(path: Path) -> dict[str, str]:
    st = os.stat(path)
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def _entries(sock: socket.socket, until: str) -> list[dict[str, str]]:
    got = []
    while True:
        fields = parse_journal_entry(sock.recv(1 << 20))
        got.append(fields)
        if fields.get("EVENT") == until:
            return got


def test_under_journald_entries_go_over_the_native_socket(
    tmp_path: Path, journal: socket.socket
) -> None:
    """JOURNAL_STREAM naming our stderr: each event is a native entry with MESSAGE,
    PRIORITY, SYSLOG_IDENTIFIER, EVENT and UART; nothing goes to the stream."""
    with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}]) as d:
        _auto_log_format(d)
        stream = tmp_path / "stream.log"
        with open(stream, "wb") as out:
            d.start(output=out.fileno(), prefix=_namespace_prefix(tmp_path),
                    env=_journal_stream_env(stream))
        entries = _entries(journal, "ready")
        ready = entries[-1]
        assert ready["UART"] == "uart0" and ready["PRIORITY"] == "6"
        assert ready["SYSLOG_IDENTIFIER"] == "uartbridge"
        assert ready["BUS_SOCKET"] == str(d.bus())
        assert ready["MESSAGE"].startswith("uart0: ready")
        assert d.stop() == 0
        assert stream.read_bytes() == b""


def test_fatal_start_error_reaches_the_journal_at_error_priority(
    tmp_path: Path, journal: socket.socket
) -> None:
    """A config error at start-up: an entry with PRIORITY=3 naming the key (exit 78)."""
    config = tmp_path / "bad.toml"
    config.write_text('[[uart]]\nname = "_x"\n')
    stream = tmp_path / "stream.log"
    with open(stream, "wb") as out:
        result = subprocess.run(
            [*_namespace_prefix(tmp_path), sys.executable, "-m", "uartbridge", "run",
             "--config", str(config)],
            stdout=out, stderr=out, timeout=60, cwd=REPO,
            env=dict(os.environ, **_journal_stream_env(stream)),
        )
    assert result.returncode == 78
    fatal = _entries(journal, "fatal error")[-1]
    assert fatal["PRIORITY"] == "3" and "uart[0].name" in fatal["MESSAGE"]
    assert stream.read_bytes() == b""


@pytest.fixture
def journal_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A file that $JOURNAL_STREAM names; logging is put back to stderr afterwards."""
    path = tmp_path / "stream.log"
    path.touch()
    monkeypatch.setenv("JOURNAL_STREAM", _journal_stream_env(path)["JOURNAL_STREAM"])
    try:
        yield path
    finally:
        logs.configure_logging("json", "info", stream=sys.stderr)


def test_without_the_journal_socket_entries_fall_back_to_the_stream(
    tmp_path: Path, journal_stream: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JOURNAL_STREAM set but no socket to send to: JSON lines with a <N> priority prefix."""
    monkeypatch.setattr(logs, "JOURNAL_SOCKET", str(tmp_path / "nobody-listens.sock"))
    with open(journal_stream, "w", encoding="utf-8") as out:
        logs.configure_logging("auto", "info", stream=out)
        logs.get_logger(uart="u").warning("fell back", detail=1)
    line = journal_stream.read_text(encoding="utf-8")
    assert line.startswith("<4>{")
    assert json.loads(line[3:])["event"] == "fell back"


def test_journal_native_entry_from_a_real_socket_in_process(
    tmp_path: Path, journal: socket.socket, journal_stream: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In-process: a warning, and an error with a multi-line exception, arrive whole as
    native entries at PRIORITY=4 and 3; the stream gets nothing."""
    monkeypatch.setattr(logs, "JOURNAL_SOCKET", str(tmp_path / "journal.sock"))
    with open(journal_stream, "w", encoding="utf-8") as out:
        logs.configure_logging("auto", "info", stream=out)
        log = logs.get_logger(uart="uart7")
        log.warning("port.drain_timeout", os_queued_bytes=12)
        try:
            raise OSError(5, "Input/output error")
        except OSError:
            log.exception("port failed")
    first = parse_journal_entry(journal.recv(65536))
    second = parse_journal_entry(journal.recv(65536))
    assert first["PRIORITY"] == "4" and first["OS_QUEUED_BYTES"] == "12"
    assert first["EVENT"] == "port.drain_timeout" and first["UART"] == "uart7"
    assert second["PRIORITY"] == "3" and "OSError" in second["EXCEPTION"]
    assert "\n" in second["MESSAGE"]
    assert journal_stream.read_text() == ""
