"""Logging: JSON lines for journald, console on a TTY, payload redaction, the trace file."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from uartbridge import logs
from uartbridge.errors import ConfigError
from uartbridge.logs import TraceFile, configure_logging, get_logger

ANSI = re.compile(r"\x1b\[[0-9;]*m")


class FakeTTY(io.StringIO):
    """A text stream that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """Leave structlog and the root logger as they were."""
    root = logging.getLogger()
    level = root.level
    yield
    if logs._stdlib_handler is not None:
        root.removeHandler(logs._stdlib_handler)
        logs._stdlib_handler = None
    root.setLevel(level)
    structlog.reset_defaults()


def json_lines(text: str) -> list[dict[str, object]]:
    lines = text.splitlines()
    assert lines and text.endswith("\n")
    return [json.loads(line) for line in lines]


def test_json_one_object_per_line_with_uart() -> None:
    """JSON format writes one JSON object per line, with the bound uart, level and timestamp."""
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    log = get_logger(uart="uart0")
    log.info("port opened", port="/dev/ttyUSB0")
    log.warning("reader disconnected", backlog=3)
    first, second = json_lines(out.getvalue())
    assert first["event"] == "port opened" and first["uart"] == "uart0"
    assert first["level"] == "info" and first["port"] == "/dev/ttyUSB0"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", str(first["timestamp"]))
    assert second["level"] == "warning" and second["uart"] == "uart0" and second["backlog"] == 3


def test_auto_is_json_when_not_a_tty() -> None:
    """'auto' writes JSON when the stream is not a terminal (journald, a pipe)."""
    out = io.StringIO()
    configure_logging("auto", "info", stream=out)
    get_logger(uart="a").info("hello")
    assert json_lines(out.getvalue())[0]["event"] == "hello"


def test_auto_is_console_on_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    """'auto' writes human-readable lines on a terminal."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    out = FakeTTY()
    configure_logging("auto", "info", stream=out)
    get_logger(uart="uart1").info("port opened", port="pty:")
    text = ANSI.sub("", out.getvalue())
    assert not text.lstrip().startswith("{")
    assert "port opened" in text and "uart=uart1" in text and "[info" in text
    assert text.count("\n") == 1


def test_console_without_tty_has_no_colors() -> None:
    """'console' on a non-terminal stream is plain text without ANSI escapes."""
    out = io.StringIO()
    configure_logging("console", "info", stream=out)
    get_logger(uart="u").info("plain")
    assert "\x1b[" not in out.getvalue() and "uart=u" in out.getvalue()


def test_level_filters() -> None:
    """Events below the configured level are dropped."""
    out = io.StringIO()
    configure_logging("json", "warning", stream=out)
    log = get_logger()
    log.debug("d")
    log.info("i")
    log.error("e")
    assert [e["event"] for e in json_lines(out.getvalue())] == ["e"]


def test_payload_bytes_never_logged_by_default() -> None:
    """bytes values are replaced by their length; the payload itself never reaches the log."""
    out = io.StringIO()
    configure_logging("json", "debug", stream=out)
    get_logger(uart="u").debug("rx", data=b"secret!", view=memoryview(b"ab"))
    (event,) = json_lines(out.getvalue())
    assert event["data"] == "<7 bytes>" and event["view"] == "<2 bytes>"
    assert "secret" not in out.getvalue()


def test_payload_logged_as_hex_when_asked() -> None:
    """With log_payload=True, bytes values are rendered as hex."""
    out = io.StringIO()
    configure_logging("json", "debug", stream=out, log_payload=True)
    get_logger().debug("rx", data=b"\x00A")
    assert json_lines(out.getvalue())[0]["data"] == "00 41"


def test_exception_stays_one_json_line() -> None:
    """An exception's traceback is a field of the one JSON line, not extra lines."""
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    try:
        raise OSError(5, "Input/output error")
    except OSError:
        get_logger(uart="u").exception("port failed")
    (event,) = json_lines(out.getvalue())
    assert event["level"] == "error" and "OSError" in str(event["exception"])


def test_stdlib_logging_rendered_the_same() -> None:
    """Records from stdlib logging (asyncio's, for example) come out as JSON lines too."""
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    logging.getLogger("asyncio").error("Task exception was never retrieved")
    (event,) = json_lines(out.getvalue())
    assert event["event"] == "Task exception was never retrieved"
    assert event["level"] == "error" and event["logger"] == "asyncio"


def test_reconfigure_replaces_handler() -> None:
    """Configuring twice leaves one stdlib handler, writing to the new stream."""
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", "info", stream=first)
    configure_logging("json", "info", stream=second)
    logging.getLogger("x").warning("once")
    assert first.getvalue() == ""
    assert len(json_lines(second.getvalue())) == 1


def test_journald_stream_gets_priority_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the stream $JOURNAL_STREAM names, each JSON line carries a <N> syslog priority."""
    path = tmp_path / "journal-stream.txt"
    with path.open("w", encoding="utf-8") as out:
        st = os.fstat(out.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        configure_logging("auto", "debug", stream=out)
        log = get_logger(uart="u")
        log.info("i")
        log.error("e")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("<6>{") and lines[1].startswith("<3>{")
    assert json.loads(lines[0][3:])["event"] == "i"


def test_other_stream_gets_no_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream other than the journal's gets plain JSON lines."""
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    path = tmp_path / "not-journal.txt"
    with path.open("w", encoding="utf-8") as out:
        configure_logging("json", "info", stream=out)
        get_logger().info("x")
    assert path.read_text(encoding="utf-8").startswith("{")


@pytest.mark.parametrize(("fmt", "level"), [("xml", "info"), ("json", "verbose")])
def test_bad_format_or_level(fmt: str, level: str) -> None:
    """An unknown format or level is a ConfigError."""
    with pytest.raises(ConfigError):
        configure_logging(fmt, level, stream=io.StringIO())


def test_trace_file_format_and_mode(tmp_path: Path) -> None:
    """The trace has one '<ns> <direction> <hex>' line per chunk, in a file of mode 0600."""
    path = tmp_path / "uart0.trace"
    with TraceFile(path) as trace:
        trace.write("tx", b"AT\r", 1_000)
        trace.write("rx", b"\x00\xffOK", 2_500)
        trace.write("bus", b"\x03\x80", 3_000)
        trace.write("rx", b"", 4_000)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text(encoding="ascii").splitlines()
    assert lines == ["1000 tx 41 54 0d", "2500 rx 00 ff 4f 4b", "3000 bus 03 80"]
    assert bytes.fromhex(lines[1].split(" ", 2)[2]) == b"\x00\xffOK"


def test_trace_file_appends_and_tightens_mode(tmp_path: Path) -> None:
    """Reopening appends, and an existing file with a looser mode is set to 0600."""
    path = tmp_path / "t.trace"
    path.write_text("1 tx 00\n", encoding="ascii")
    path.chmod(0o644)
    trace = TraceFile(path)
    trace.write("tx", b"\x01", 2)
    trace.close()
    trace.close()
    assert trace.closed
    trace.write("tx", b"\x02", 3)  # after close: nothing
    assert path.read_text(encoding="ascii") == "1 tx 00\n2 tx 01\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_trace_file_rejects_unknown_direction(tmp_path: Path) -> None:
    """A direction other than tx, rx or bus is a ValueError."""
    with TraceFile(tmp_path / "d.trace") as trace, pytest.raises(ValueError):
        trace.write("out", b"x", 1)


def test_trace_file_unopenable_is_config_error(tmp_path: Path) -> None:
    """A trace file that cannot be opened is a ConfigError naming it."""
    path = tmp_path / "no-such-dir" / "t.trace"
    with pytest.raises(ConfigError, match="no-such-dir"):
        TraceFile(path)


def test_trace_write_error_disables_trace(tmp_path: Path) -> None:
    """A failing write disables the trace and keeps the error, never raising into the caller."""
    trace = TraceFile(tmp_path / "e.trace")
    assert trace._fd is not None
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, trace._fd)  # the disk is full: the next write fails with ENOSPC
    os.close(full)
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    trace.write("tx", b"x", 1)
    assert trace.closed and isinstance(trace.error, OSError)
    assert json_lines(out.getvalue())[0]["event"] == "trace file disabled"
