"""Logging: structlog to stdout, JSON lines for journald, human-readable on a terminal.

Following structlog's advice, the daemon logs to stdout and lets systemd route it: JSON lines
when stdout is not a TTY (``log_format = "auto"``), ``ConsoleRenderer`` on a TTY. When stdout is
the journal's stream (``$JOURNAL_STREAM`` names it), each JSON line gets a ``<N>`` syslog
priority prefix, which journald strips and uses as the entry's priority.

Every UART logs through a logger bound to it: ``get_logger(uart=name)``. Payload bytes are
never logged by default: any ``bytes`` value in an event is replaced by ``"<N bytes>"``.
Payloads go to the optional per-UART ``TraceFile`` instead (``trace_file`` in the config).

Records from the standard library's ``logging`` (asyncio's "Task exception was never
retrieved", for example) are rendered the same way, on the same stream.
"""

from __future__ import annotations

import contextlib
import logging
import os
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

# syslog priorities for journald's "<N>" stdout prefix (SyslogLevelPrefix=, on by default).
_SYSLOG_PRIORITY = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
}

_stdlib_handler: logging.Handler | None = None


def configure_logging(
    fmt: str = "auto",
    level: str = "info",
    *,
    stream: TextIO | None = None,
    log_payload: bool = False,
) -> None:
    """Configure structlog (and stdlib logging) to write to ``stream`` (default stdout).

    ``fmt``: "auto" (JSON unless the stream is a TTY), "json" or "console". ``level``: the
    minimum level. ``log_payload``: render ``bytes`` values as hex instead of redacting them.
    May be called again; the new configuration replaces the old one.
    """
    global _stdlib_handler
    if fmt not in FORMATS:
        raise ConfigError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if level not in LEVELS:
        raise ConfigError(f"log level {level!r}: expected one of {', '.join(LEVELS)}")
    out = stream if stream is not None else sys.stdout
    tty = _isatty(out)
    if fmt == "auto":
        fmt = "console" if tty else "json"

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        _show_payload if log_payload else _redact_payload,
    ]
    renderer: Processor
    if fmt == "json":
        shared.append(structlog.processors.format_exc_info)
        renderer = _JsonLines(journald=_is_journal_stream(out))
    else:
        colors = tty and "NO_COLOR" not in os.environ
        renderer = structlog.dev.ConsoleRenderer(colors=colors)

    levelno = LEVELS[level]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(levelno),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        context_class=dict,
        cache_logger_on_first_use=False,
    )

    root = logging.getLogger()
    if _stdlib_handler is not None:
        root.removeHandler(_stdlib_handler)
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root.addHandler(handler)
    root.setLevel(levelno)
    _stdlib_handler = handler


def get_logger(**bound: Any) -> FilteringBoundLogger:
    """A logger with ``bound`` key/values on every event, e.g. ``get_logger(uart="uart0")``."""
    return cast(FilteringBoundLogger, structlog.get_logger(**bound))


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
    except (AttributeError, ValueError, OSError):
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


class _JsonLines:
    """structlog's JSONRenderer, with a ``<N>`` priority prefix when writing to journald."""

    def __init__(self, *, journald: bool) -> None:
        self._json = structlog.processors.JSONRenderer()
        self._journald = journald

    def __call__(
        self, logger: WrappedLogger, method: str, event: MutableMapping[str, Any]
    ) -> str:
        level = str(event.get("level", method))
        line = cast(str, self._json(logger, method, event))
        if self._journald:
            return f"<{_SYSLOG_PRIORITY.get(level, 6)}>{line}"
        return line


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
