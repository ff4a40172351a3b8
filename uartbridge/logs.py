"""Logging: structlog to stderr or the journal; it never takes the daemon down.

Where lines go (``configure_logging``):

- **journald** (``$JOURNAL_STREAM`` names our stderr, ``log_format = "auto"``): one entry per
  event over the journal's native socket ``/run/systemd/journal/socket`` (a datagram of
  ``FIELD=value`` lines; a value with a newline in the binary length form), with the fields
  ``MESSAGE``, ``PRIORITY`` (syslog level), ``SYSLOG_IDENTIFIER=uartbridge``, ``EVENT``,
  ``UART`` and every other key of the event upper-cased, so that
  ``journalctl -u uartbridge@ttyUSB0 UART=uart0 -p warning`` works. An entry the socket
  refuses (journald restarting, too big) goes to the stream instead, as a JSON line with a
  ``<N>`` priority prefix (journald strips it). A few dozen lines of the standard library do
  this; systemd's Python binding would need a C extension and libsystemd for the same.
- **elsewhere**: JSON lines on stderr when it is not a TTY (``"auto"``), console lines on a
  TTY; ``log_format`` may force either.

A line that cannot be written is dropped and counted, never raised (``dropped_lines``): a
closed pipe (EPIPE), a hung-up terminal (EIO), a reader that stopped reading (a line waits
at most ``STREAM_WAIT_S`` once, then lines are dropped without waiting until the stream is
writable again, when one line says how many were lost). Nothing that is not JSON is ever
written into a JSON stream.

Every UART logs through a logger bound to it: ``get_logger(uart=name)``. Payload bytes are
never logged by default: any ``bytes`` value in an event is replaced by ``"<N bytes>"``.
Payloads go to the optional per-UART ``TraceFile`` instead (``trace_file`` in the config).

Records from the standard library's ``logging`` (asyncio's "Task exception was never
retrieved", for example) go the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import socket
import struct
import sys
from collections.abc import MutableMapping
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO, cast

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from .errors import ConfigError

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
FORMATS = ("auto", "json", "console")
TRACE_DIRECTIONS = ("tx", "rx", "bus")

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "uartbridge"
# How long one line may wait for a stream that does not take it before lines are dropped.
STREAM_WAIT_S = 0.1

# syslog priorities (journald's PRIORITY= and its "<N>" stream prefix).
_SYSLOG_PRIORITY = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
}
_FIELD_BAD = re.compile(r"[^A-Z0-9_]")
# Keys the journal has its own fields for, or that are ours in the entry already.
_NOT_FIELDS = frozenset({"event", "level", "timestamp", "uart"})

_stdlib_handler: logging.Handler | None = None
_sink: _Sink | None = None


def configure_logging(
    fmt: str = "auto",
    level: str = "info",
    *,
    stream: TextIO | None = None,
    log_payload: bool = False,
) -> None:
    """Configure structlog (and stdlib logging) to write to ``stream`` (default stderr).

    ``fmt``: "auto" (the journal when ``stream`` is its stream, else JSON unless the stream
    is a TTY), "json" or "console". ``level``: the minimum level. ``log_payload``: render
    ``bytes`` values as hex instead of redacting them. May be called again; the new
    configuration replaces the old one (the count of dropped lines carries on).
    """
    global _stdlib_handler, _sink
    if fmt not in FORMATS:
        raise ConfigError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if level not in LEVELS:
        raise ConfigError(f"log level {level!r}: expected one of {', '.join(LEVELS)}")
    out = stream if stream is not None else sys.stderr
    tty = _isatty(out)
    journal_stream = _is_journal_stream(out)
    # "auto" on the journal's stream: native entries; an explicit format is honoured there.
    native = journal_stream and fmt == "auto"
    if fmt == "auto":
        fmt = "console" if tty and not journal_stream else "json"
    dropped = _sink.dropped if _sink is not None else 0
    _sink = _Sink(out, journal_stream=journal_stream, dropped=dropped)

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        _show_payload if log_payload else _redact_payload,
    ]
    output: Processor
    if fmt == "json":
        shared.append(structlog.processors.format_exc_info)
        output = _JsonOutput(_sink, native=native)
    else:
        colors = tty and "NO_COLOR" not in os.environ
        output = _ConsoleOutput(_sink, structlog.dev.ConsoleRenderer(colors=colors))

    levelno = LEVELS[level]
    structlog.configure(
        processors=[*shared, output],
        wrapper_class=structlog.make_filtering_bound_logger(levelno),
        logger_factory=structlog.ReturnLoggerFactory(),
        context_class=dict,
        cache_logger_on_first_use=False,
    )

    root = logging.getLogger()
    if _stdlib_handler is not None:
        root.removeHandler(_stdlib_handler)
    handler = _ToStructlog()
    root.addHandler(handler)
    root.setLevel(levelno)
    _stdlib_handler = handler


def get_logger(**bound: Any) -> FilteringBoundLogger:
    """A logger with ``bound`` key/values on every event, e.g. ``get_logger(uart="uart0")``."""
    return cast(FilteringBoundLogger, structlog.get_logger(**bound))


def dropped_lines() -> int:
    """How many log lines could not be written since the process started."""
    return _sink.dropped if _sink is not None else 0


def logging_is_console() -> bool:
    """Whether log lines are meant for a human (console format), not a machine."""
    return isinstance(_current_output(), _ConsoleOutput)


def _current_output() -> object:
    processors = structlog.get_config().get("processors") or [None]
    return processors[-1]


def announce(text: str) -> None:
    """A plain line for the human reading console logs (the daemon's "uart0: pty … bus …");
    nothing in a JSON or journal configuration, whose ``ready`` event says the same."""
    if _sink is not None and logging_is_console():
        _sink.write_line(text + "\n")


def fatal(message: str, **fields: Any) -> None:
    """Report an error that ends the process, where the logs go, at error priority.

    Console logs (or none configured yet) get the plain ``uartbridge: message`` line on
    stderr; JSON and journal logs get an ``error`` event (PRIORITY=3 in the journal) with
    ``error=message``, so ``journalctl -p err`` shows why a unit did not start.
    """
    if _sink is None or logging_is_console():
        line = f"uartbridge: {message}\n"
        if _sink is None:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(line)
                sys.stderr.flush()
        else:
            _sink.write_line(line)
        return
    get_logger().error("fatal error", error=message, **fields)


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _is_journal_stream(stream: TextIO) -> bool:
    """Whether ``stream`` is the journald stream systemd names in ``$JOURNAL_STREAM``."""
    env = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = env.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return st.st_dev == int(dev) and st.st_ino == int(ino)
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is both
        return False


def _redact_payload(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    """Replace payload bytes by their length: data never reaches the log by default."""
    for key, value in event.items():
        if isinstance(value, bytes | bytearray | memoryview):
            event[key] = f"<{memoryview(value).nbytes} bytes>"
    return event


def _show_payload(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    """Render payload bytes as hex (``log_payload=True``; for debugging only)."""
    for key, value in event.items():
        if isinstance(value, bytes | bytearray | memoryview):
            event[key] = bytes(value).hex(" ")
    return event


# -- where lines go -----------------------------------------------------------------------


class _Sink:
    """Writes whole lines to a stream, or entries to the journal; never raises."""

    def __init__(self, stream: TextIO, *, journal_stream: bool, dropped: int = 0) -> None:
        self.stream = stream
        self.journal_stream = journal_stream
        self.dropped = dropped
        self._congested_since_drop = 0  # lines dropped while the stream was not writable
        self._half_line = False  # a line was cut short: start the next one on a new line
        self._journal: socket.socket | None = None
        try:
            self.fd: int | None = stream.fileno()
        except (AttributeError, ValueError, OSError):
            self.fd = None

    # stream lines

    def write_line(self, line: str) -> bool:
        """Write one whole line (ending in a newline); False (counted) if it was dropped."""
        if self.fd is None:
            try:
                self.stream.write(line)
                self.stream.flush()
            except (OSError, ValueError):
                self.dropped += 1
                return False
            return True
        if self._congested_since_drop:
            if not self._writable(0):
                return self._drop()
            note = f"({self._congested_since_drop} log lines were dropped: stream not writable)"
            self._congested_since_drop = 0
            if not self._write_fd(self._note(note)):
                return self._drop()
        elif not self._writable(STREAM_WAIT_S):
            self._congested_since_drop = 1
            self.dropped += 1
            return False
        return self._write_fd(line) or self._drop()

    def _note(self, text: str) -> str:
        """A line the stream's reader can parse: JSON for JSON streams, else plain."""
        if isinstance(_current_output(), _ConsoleOutput):
            return text + "\n"
        return json.dumps({"event": "log lines dropped", "level": "warning",
                           "detail": text}) + "\n"

    def _drop(self) -> bool:
        self.dropped += 1
        if self._congested_since_drop:
            self._congested_since_drop += 1
        return False

    def _writable(self, timeout_s: float) -> bool:
        assert self.fd is not None
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        try:
            events = poller.poll(int(timeout_s * 1000))
        except (OSError, ValueError):
            return False
        # POLLERR/POLLHUP: let the write fail with its errno (EPIPE, EIO) and be counted.
        return bool(events)

    def _write_fd(self, line: str) -> bool:
        assert self.fd is not None
        data = line.encode("utf-8", "replace")
        if self._half_line:
            data = b"\n" + data
            self._half_line = False
        view = memoryview(data)
        first = True
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                n = 0
            except OSError:
                self._half_line = not first
                return False
            first = False
            view = view[n:]
            if view and not self._writable(STREAM_WAIT_S):
                self._half_line = True
                return False
        return True

    # journal entries

    def send_journal(self, fields: list[tuple[str, str]]) -> bool:
        """Send one entry over the journal's native socket; False if it did not go."""
        data = journal_entry(fields)
        try:
            if self._journal is None:
                self._journal = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._journal.sendto(data, JOURNAL_SOCKET)
        except OSError:
            return False
        return True


def journal_entry(fields: list[tuple[str, str]]) -> bytes:
    """The native-protocol datagram for ``fields`` (systemd's ``sd_journal_sendv`` format).

    ``NAME=value\n`` for a value without a newline; otherwise ``NAME\n``, the value's length
    as a 64-bit little-endian integer, the value and ``\n``.
    """
    out = bytearray()
    for name, value in fields:
        raw = value.encode("utf-8", "replace")
        if b"\n" in raw:
            out += name.encode("ascii") + b"\n" + struct.pack("<Q", len(raw)) + raw + b"\n"
        else:
            out += name.encode("ascii") + b"=" + raw + b"\n"
    return bytes(out)


def journal_field_name(key: str) -> str | None:
    """An event key as a journal field name (``A-Z 0-9 _``, not starting with ``_`` or a
    digit, at most 64 characters); None if nothing is left of it."""
    name = _FIELD_BAD.sub("_", key.upper()).lstrip("_0123456789")[:64]
    return name or None


def _text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


class _JsonOutput:
    """The last processor for JSON: a journal entry (native) or a JSON line."""

    def __init__(self, sink: _Sink, *, native: bool) -> None:
        self._json = structlog.processors.JSONRenderer()
        self._sink = sink
        self._native = native

    def __call__(
        self, logger: WrappedLogger, method: str, event: MutableMapping[str, Any]
    ) -> str:
        level = str(event.get("level", method))
        priority = _SYSLOG_PRIORITY.get(level, 6)
        if self._native and self._sink.send_journal(self._fields(event, priority)):
            raise structlog.DropEvent
        line = cast(str, self._json(logger, method, event))
        prefix = f"<{priority}>" if self._sink.journal_stream else ""
        self._sink.write_line(f"{prefix}{line}\n")
        raise structlog.DropEvent

    @staticmethod
    def _fields(event: MutableMapping[str, Any], priority: int) -> list[tuple[str, str]]:
        name = str(event.get("event", ""))
        uart = event.get("uart")
        extra = [(k, v) for k, v in event.items() if k not in _NOT_FIELDS]
        summary = " ".join(f"{k}={_text(v)}" for k, v in extra if k != "exception")
        message = (f"{uart}: " if uart is not None else "") + name
        if summary:
            message += "  " + summary
        if "exception" in event:
            message += "\n" + _text(event["exception"])
        fields = [
            ("MESSAGE", message),
            ("PRIORITY", str(priority)),
            ("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER),
            ("EVENT", name),
        ]
        if uart is not None:
            fields.append(("UART", _text(uart)))
        taken = {f for f, _ in fields}
        for key, value in extra:
            field = journal_field_name(key)
            if field is not None and field not in taken:
                taken.add(field)
                fields.append((field, _text(value)))
        return fields


class _ConsoleOutput:
    """The last processor for console lines."""

    def __init__(self, sink: _Sink, renderer: Processor) -> None:
        self._sink = sink
        self._renderer = renderer

    def __call__(
        self, logger: WrappedLogger, method: str, event: MutableMapping[str, Any]
    ) -> str:
        line = cast(str, self._renderer(logger, method, event))
        if self._sink.journal_stream:
            level = str(event.get("level", method))
            line = f"<{_SYSLOG_PRIORITY.get(level, 6)}>{line}"
        self._sink.write_line(line + "\n")
        raise structlog.DropEvent


class _ToStructlog(logging.Handler):
    """Hands stdlib ``logging`` records to structlog, so they go the same way."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            log = structlog.get_logger().bind(logger=record.name)
            level = record.levelname.lower()
            method = getattr(log, level if level in LEVELS else "info")
            method(record.getMessage(), exc_info=record.exc_info or None)
        except Exception:
            if _sink is not None:
                _sink.dropped += 1


class TraceFile:
    """A per-UART payload trace: one line per chunk, ``<monotonic ns> <direction> <hex>``.

    Directions: ``tx`` (to the wire), ``rx`` (from the wire), ``bus`` (register traffic).
    Hex bytes are space-separated (``bytes.fromhex`` reads them back). The file is opened in
    append mode with mode 0600 (tightened if it already existed); each line is written with
    one ``write(2)``, so a crash never leaves half a line. A write error disables the trace
    (logged once, ``error`` keeps it); it never interrupts the byte path.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.error: OSError | None = None
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            self._fd: int | None = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise ConfigError(f"trace_file {self.path}: cannot open: {exc.strerror}") from exc
        with contextlib.suppress(OSError):
            os.fchmod(self._fd, 0o600)

    @property
    def closed(self) -> bool:
        """Whether the trace no longer writes (closed, or disabled by an error)."""
        return self._fd is None

    def write(self, direction: str, data: bytes, now_ns: int) -> None:
        """Append one line for ``data`` moving in ``direction`` at ``now_ns`` (monotonic)."""
        if direction not in TRACE_DIRECTIONS:
            raise ValueError(f"trace direction {direction!r}: expected one of {TRACE_DIRECTIONS}")
        if self._fd is None or not data:
            return
        line = f"{now_ns} {direction} {bytes(data).hex(' ')}\n".encode("ascii")
        try:
            while line:
                n = os.write(self._fd, line)
                line = line[n:]
        except OSError as exc:
            self.error = exc
            self.close()
            get_logger(trace_file=str(self.path)).warning(
                "trace file disabled", error=exc.strerror or str(exc)
            )

    def close(self) -> None:
        """Close the file (idempotent; a failing close of a trace is not worth an error)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> TraceFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
