"""Checkpoints of one UART: encode, decode (fully validated), atomic write, newest valid.

Theory of operation
-------------------
A checkpoint is the whole device (the model's ``UartState``), the host path (``PortState``:
bytes read from the port but not yet taken by the RX FIFO, the TX backlog kept while the
reader is disconnected, the reader state, the line settings last applied, counters) and
metadata. The file format is specified in ``docs/checkpoint-format.md``; in short: pretty
JSON, every key always written (absence is an error, never "empty" — DESIGN rule 4 made
mechanical), byte buffers as lowercase hex, no floats, a SHA-256 over the canonical JSON of
the document without its ``sha256`` key, and nothing derivable stored (IIR's interrupt ID,
the IRQ level, trigger level, character time and baud are recomputed on load).

``decode`` checks, in this order, and builds nothing before all of it passed:
size and UTF-8 → JSON syntax (no duplicate keys, no NaN) → the format marker → the version
(a newer one is refused, naming it) → the hash → the schema (unknown sections or fields are
refused, naming them; missing ones too; exact JSON types: a boolean is not an integer, an
integer is not a float; hex is even-length lowercase) → consistency (``UartState.validate``
and the host-path rules ``_check_port`` / ``_check_meta``). Every failure is a
``CheckpointError`` naming the field and the rule.

Files are written atomically (temporary file in the same directory, fsync, rename, fsync of
the directory), mode 0600, and the previous *valid* checkpoint is kept beside the new one as
``<name>.checkpoint.prev.json``. A writer killed at any instant leaves the current file (old
or new) whole; leftover temporary files are ignored by readers and removed by the next write.
One writer per UART is assumed (the daemon that owns it).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import stat
from dataclasses import dataclass, fields
from pathlib import Path
from typing import cast

from . import __version__
from .errors import CheckpointError, CheckpointMissingError, InvalidStateError
from .names import NAME_RULE, is_safe_name
from .port.state import (
    MAX_RX_BACKLOG_BYTES,
    MAX_TX_BACKLOG_BYTES,
    RX_ESCAPE_PREFIXES,
    RX_MARK_KINDS,
    PortCounters,
    PortState,
    ReaderState,
)
from .registers import IIR_FIFO_BITS, Iir
from .uart import (
    RX_LINE_BYTES,
    TX_LINE_BYTES,
    Clock,
    LineSettings,
    Pace,
    Parity,
    Uart16550,
    UartState,
    UartStatistics,
)

log = logging.getLogger(__name__)

FORMAT_NAME = "uartbridge-checkpoint"
FORMAT_VERSION = 5
#: Host-path bounds (format limits; the config's backlog sizes must stay below them).
#: A bigger file is refused before it is parsed (two hex backlogs plus a few KiB).
MAX_DOCUMENT_BYTES = 2 * (MAX_RX_BACKLOG_BYTES + MAX_TX_BACKLOG_BYTES) + (1 << 20)
#: Every integer of the document fits a signed 64-bit integer (portable readers).
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
MAX_STRING_CHARS = 4096
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_STOP_BITS = {1.0: "1", 1.5: "1.5", 2.0: "2"}
_STOP_BITS_FROM_TEXT = {text: bits for bits, text in _STOP_BITS.items()}
_PARITIES: tuple[Parity, ...] = ("N", "O", "E", "M", "S")

# Keys of each section, in the order the file shows them (the hash sorts them anyway).
_TOP_KEYS = ("format", "format_version", "meta", "uart", "port", "sha256")
_META_KEYS = (
    "uartbridge_version", "uart_name", "port", "created_unix_ns", "generation", "port_handle",
)
_UART_KEYS = (
    "baudbase",
    "tx_retry_limit",
    "divisor",
    "rbr",
    "ier",
    "iir_fifo",
    "lcr",
    "mcr",
    "lsr",
    "msr",
    "scr",
    "fcr",
    "thr",
    "tsr",
    "tsr_busy",
    "tsr_retry",
    "thr_ipending",
    "timeout_ipending",
    "rx_fifo",
    "tx_fifo",
    "timeout_remaining_ns",
    "reset_timing",
    "statistics",
    "pace",
    "tx_shift_remaining_ns",
    "tx_line",
    "rx_line",
    "rx_slot_remaining_ns",
)
#: Device keys that came with format version 4 (line-rate pacing), with what older files meant.
_UART_V4: dict[str, object] = {
    "pace": "none",
    "tx_shift_remaining_ns": None,
    "tx_line": "",
    "rx_line": "",
    "rx_slot_remaining_ns": None,
}
_STATISTICS_KEYS = tuple(f.name for f in fields(UartStatistics))
_PORT_KEYS = (
    "reader_state", "rx_backlog", "tx_backlog", "line_settings", "counters", "rx_marks",
    "rx_escape",
)
_MARK_KEYS = ("at", "kind")
_LINE_KEYS = ("baud", "data_bits", "parity", "stop_bits", "break_on")
_COUNTER_KEYS = tuple(f.name for f in fields(PortCounters))
#: Port counters that came with format version 3 (absent from 1 and 2; 0 is what they meant).
_COUNTERS_V3 = ("tx_reclaimed", "rx_saved_at_stop", "rx_dropped_at_stop", "rx_escape_uncertain")


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointMeta:
    """Who wrote a checkpoint, of what, when (wall clock, for humans), and its generation.

    ``generation`` increases with every checkpoint of a UART (≥ 1); ``created_unix_ns`` is
    ``time.time_ns()`` at snapshot time (never used for timers: those are stored as remaining
    time in ``UartState``). ``port_handle`` (format 5) names the open port the state belongs
    to (``PortLink.handle_identity``: the tty's device and inode, an owned pty's slave, a
    socket's inode and addresses), or None when none was open: a descriptor handed to the
    next run resumes with this checkpoint only if it is that port.
    """

    format_version: int = FORMAT_VERSION
    uartbridge_version: str = __version__
    uart_name: str
    port: str
    created_unix_ns: int
    generation: int
    port_handle: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """A whole checkpoint of one UART: metadata, the device, and the host path."""

    meta: CheckpointMeta
    uart: UartState
    port: PortState


# -- errors -------------------------------------------------------------------------------


def _show(value: object) -> str:
    """A short, single-line rendering of a foreign JSON value for an error message."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):
        text = ascii(value)
    if len(text) > 48:
        text = text[:45] + "..."
    if isinstance(value, bool) or value is None:
        return text
    if isinstance(value, float):
        return f"{text} (a float)"
    if isinstance(value, str):
        return f"{text} (a string)"
    if isinstance(value, list):
        return f"{text} (an array)"
    if isinstance(value, dict):
        return "an object"
    return text


def _error(path: str, rule: str) -> CheckpointError:
    return CheckpointError(f"{path}: {rule}")


# -- encoding ---------------------------------------------------------------------------


def canonical_bytes(document: dict[str, object]) -> bytes:
    """The canonical form the hash covers: the document without ``sha256``, sorted, compact."""
    content = {key: value for key, value in document.items() if key != "sha256"}
    try:
        text = json.dumps(
            content, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        return text.encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError (lone surrogate) is a ValueError
        raise CheckpointError(f"document cannot be put in canonical form: {exc}") from exc


def content_hash(document: dict[str, object]) -> str:
    """The lowercase hex SHA-256 of ``canonical_bytes(document)``."""
    return hashlib.sha256(canonical_bytes(document)).hexdigest()


def _line_settings_doc(settings: LineSettings | None) -> dict[str, object] | None:
    if settings is None:
        return None
    return {
        "baud": settings.baud,
        "data_bits": settings.data_bits,
        "parity": settings.parity,
        "stop_bits": _STOP_BITS[settings.stop_bits],
        "break_on": settings.break_on,
    }


def uart_section(uart: UartState) -> dict[str, object]:
    """The ``uart`` section of a checkpoint document (also a recording's initial state)."""
    return {
        "baudbase": uart.baudbase,
        "tx_retry_limit": uart.tx_retry_limit,
        "divisor": uart.divisor,
        "rbr": uart.rbr,
        "ier": uart.ier,
        "iir_fifo": bool(uart.iir & IIR_FIFO_BITS),
        "lcr": uart.lcr,
        "mcr": uart.mcr,
        "lsr": uart.lsr,
        "msr": uart.msr,
        "scr": uart.scr,
        "fcr": uart.fcr,
        "thr": uart.thr,
        "tsr": uart.tsr,
        "tsr_busy": uart.tsr_busy,
        "tsr_retry": uart.tsr_retry,
        "thr_ipending": uart.thr_ipending,
        "timeout_ipending": uart.timeout_ipending,
        "rx_fifo": uart.rx_fifo.hex(),
        "tx_fifo": uart.tx_fifo.hex(),
        "timeout_remaining_ns": uart.timeout_remaining_ns,
        "reset_timing": uart.reset_timing,
        "statistics": {name: getattr(uart.statistics, name) for name in _STATISTICS_KEYS},
        "pace": uart.pace,
        "tx_shift_remaining_ns": uart.tx_shift_remaining_ns,
        "tx_line": uart.tx_line.hex(),
        "rx_line": uart.rx_line.hex(),
        "rx_slot_remaining_ns": uart.rx_slot_remaining_ns,
    }


def to_document(ckpt: Checkpoint) -> dict[str, object]:
    """The JSON document of a checkpoint (validated first), ``sha256`` included."""
    _check_checkpoint(ckpt)
    meta, uart, port = ckpt.meta, ckpt.uart, ckpt.port
    document: dict[str, object] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "meta": {
            "uartbridge_version": meta.uartbridge_version,
            "uart_name": meta.uart_name,
            "port": meta.port,
            "created_unix_ns": meta.created_unix_ns,
            "generation": meta.generation,
            "port_handle": meta.port_handle,
        },
        "uart": uart_section(uart),
        "port": {
            "reader_state": str(port.reader_state.value),
            "rx_backlog": port.rx_backlog.hex(),
            "tx_backlog": port.tx_backlog.hex(),
            "line_settings": _line_settings_doc(port.line_settings),
            "counters": {name: getattr(port.counters, name) for name in _COUNTER_KEYS},
            "rx_marks": [{"at": at, "kind": kind} for at, kind in port.rx_marks],
            "rx_escape": port.rx_escape.hex(),
        },
    }
    document["sha256"] = content_hash(document)
    return document


def encode(ckpt: Checkpoint) -> bytes:
    """The file contents of a checkpoint: indented UTF-8 JSON ending in a newline.

    Raises ``CheckpointError`` if the checkpoint is not one ``decode`` would accept.
    """
    document = to_document(ckpt)
    return (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


# -- consistency rules (shared by encode and decode) ----------------------------------------


def _check_string(value: object, path: str, *, max_chars: int = MAX_STRING_CHARS) -> str:
    if not isinstance(value, str):
        raise _error(path, f"must be a string, got {_show(value)}")
    if not value:
        raise _error(path, "must not be empty")
    if len(value) > max_chars:
        raise _error(path, f"must be at most {max_chars} characters, got {len(value)}")
    if _CONTROL_RE.search(value):
        raise _error(path, f"must not contain control characters, got {_show(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _error(path, "must be valid Unicode (lone surrogate)") from exc
    return value


def _check_meta(meta: CheckpointMeta, *, writing: bool) -> None:
    """Metadata rules M1–M4 (docs/checkpoint-format.md §5, step 8)."""
    version = meta.format_version
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION or (
        writing and version != FORMAT_VERSION
    ):
        raise _error(
            "meta.format_version",
            f"this uartbridge writes format version {FORMAT_VERSION}, got {version!r}",
        )
    _check_string(meta.uartbridge_version, "meta.uartbridge_version", max_chars=64)
    name = _check_string(meta.uart_name, "meta.uart_name", max_chars=64)
    if not is_safe_name(name):
        raise _error("meta.uart_name", f"must be {NAME_RULE} (it names files), got {_show(name)}")
    _check_string(meta.port, "meta.port")
    for key in ("created_unix_ns", "generation"):
        value = getattr(meta, key)
        if type(value) is not int or not 0 <= value <= INT64_MAX:
            raise _error(f"meta.{key}", f"must be an integer 0..2**63-1, got {value!r}")
    if meta.generation < 1:
        raise _error("meta.generation", f"must be >= 1, got {meta.generation}")
    if meta.port_handle is not None:
        _check_string(meta.port_handle, "meta.port_handle")


def _check_line_settings(settings: LineSettings | None) -> None:
    """Host-path rule P4: line settings that a port could have been given."""
    if settings is None:
        return
    path = "port.line_settings"
    baud = settings.baud
    if type(baud) is not int or not 1 <= baud <= INT64_MAX:
        raise _error(f"{path}.baud", f"must be a positive integer, got {baud!r}")
    if type(settings.data_bits) is not int or not 5 <= settings.data_bits <= 8:
        raise _error(f"{path}.data_bits", f"must be 5..8, got {settings.data_bits!r}")
    if settings.parity not in _PARITIES:
        raise _error(f"{path}.parity", f"must be one of N, O, E, M, S, got {settings.parity!r}")
    if type(settings.stop_bits) not in (float, int) or settings.stop_bits not in _STOP_BITS:
        raise _error(f"{path}.stop_bits", f"must be 1, 1.5 or 2, got {settings.stop_bits!r}")
    if settings.stop_bits == 1.5 and settings.data_bits != 5:
        raise _error(f"{path}.stop_bits", "1.5 stop bits exist only with 5 data bits")
    if settings.stop_bits == 2.0 and settings.data_bits == 5:
        raise _error(f"{path}.stop_bits", "5 data bits take 1 or 1.5 stop bits, not 2")
    if type(settings.break_on) is not bool:
        raise _error(f"{path}.break_on", f"must be a boolean, got {settings.break_on!r}")


def _check_port(port: PortState) -> None:
    """Host-path rules P1–P6 (docs/checkpoint-format.md §5, step 8)."""
    if not isinstance(port.reader_state, ReaderState):
        raise _error(
            "port.reader_state",
            f"must be one of connected, stalled, disconnected, got {port.reader_state!r}",
        )
    for name, limit in (("rx_backlog", MAX_RX_BACKLOG_BYTES), ("tx_backlog", MAX_TX_BACKLOG_BYTES)):
        value = getattr(port, name)
        if type(value) is not bytes:
            raise _error(f"port.{name}", "must be bytes")
        if len(value) > limit:
            raise _error(f"port.{name}", f"holds {len(value)} bytes, more than the {limit} allowed")
    _check_line_settings(port.line_settings)
    _check_rx_marks(port.rx_marks, len(port.rx_backlog))
    if port.rx_escape not in RX_ESCAPE_PREFIXES:
        raise _error(
            "port.rx_escape",
            f'must be "", "ff" or "ff00" (the start of a PARMRK mark), got {port.rx_escape!r}',
        )
    for name in _COUNTER_KEYS:
        value = getattr(port.counters, name)
        if type(value) is not int or not 0 <= value <= INT64_MAX:
            raise _error(f"port.counters.{name}", f"must be an integer 0..2**63-1, got {value!r}")


def _check_rx_marks(marks: object, backlog_bytes: int) -> None:
    """P5: marks in stream order, each within rx_backlog, of a known kind, bounded in number."""
    if not isinstance(marks, tuple):
        raise _error("port.rx_marks", "must be a sequence of (at, kind)")
    if len(marks) > MAX_RX_BACKLOG_BYTES:
        raise _error(
            "port.rx_marks",
            f"holds {len(marks)} marks, more than the {MAX_RX_BACKLOG_BYTES} allowed",
        )
    previous = 0
    for i, mark in enumerate(marks):
        path = f"port.rx_marks[{i}]"
        if not (isinstance(mark, tuple) and len(mark) == 2):
            raise _error(path, "must be (at, kind)")
        at, kind = mark
        if type(at) is not int or not previous <= at <= backlog_bytes:
            raise _error(
                f"{path}.at",
                f"must be an integer from {previous} (the mark before) to {backlog_bytes} "
                f"(the rx_backlog length), got {_show(at)}",
            )
        if kind not in RX_MARK_KINDS:
            raise _error(
                f"{path}.kind", f"must be one of {', '.join(RX_MARK_KINDS)}, got {_show(kind)}"
            )
        previous = at


def _check_uart(uart: UartState) -> None:
    """The device's rules (``UartState.validate``, reference §14.2) as a CheckpointError."""
    try:
        uart.validate()
    except InvalidStateError as exc:
        raise CheckpointError(str(exc)) from exc
    # What the writer writes, the reader must read: every integer fits 64 bits.
    for name in ("baudbase", "tx_retry_limit", "tsr_retry", "timeout_remaining_ns",
                 "tx_shift_remaining_ns", "rx_slot_remaining_ns"):
        value = getattr(uart, name)
        if value is not None and value > INT64_MAX:
            raise _error(f"uart.{name}", "must fit a signed 64-bit integer")
    for name in _STATISTICS_KEYS:
        if getattr(uart.statistics, name) > INT64_MAX:
            raise _error(f"uart.statistics.{name}", "must fit a signed 64-bit integer")


def _check_checkpoint(ckpt: Checkpoint) -> None:
    if not isinstance(ckpt, Checkpoint):
        raise CheckpointError(f"not a Checkpoint: {type(ckpt).__name__}")
    _check_meta(ckpt.meta, writing=True)
    _check_uart(ckpt.uart)
    _check_port(ckpt.port)


# -- decoding ---------------------------------------------------------------------------


class _DuplicateKeyError(Exception):
    pass


def _object_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed")


def _parse_json(data: bytes) -> object:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CheckpointError(f"expected bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise CheckpointError("empty file")
    if len(data) > MAX_DOCUMENT_BYTES:
        raise CheckpointError(f"{len(data)} bytes, more than the {MAX_DOCUMENT_BYTES} allowed")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"not UTF-8 text (byte {exc.start}): not a checkpoint") from exc
    try:
        return json.loads(text, object_pairs_hook=_object_pairs, parse_constant=_refuse_constant)
    except _DuplicateKeyError as exc:
        raise CheckpointError(f"not valid JSON: duplicate key {_key(exc.args[0])}") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except (ValueError, RecursionError) as exc:  # huge integers, NaN, absurd nesting
        raise CheckpointError(f"not valid JSON: {str(exc).splitlines()[0]}") from exc


def _section(value: object, path: str, keys: tuple[str, ...]) -> dict[str, object]:
    """An object with exactly ``keys``: unknown ones are refused first, then missing ones."""
    if not isinstance(value, dict):
        raise _error(path, f"must be an object, got {_show(value)}")
    for key in value:
        if key not in keys:
            if _simple_key(key):
                raise _error(f"{path}.{key}", "unknown field (written by a newer uartbridge?)")
            raise _error(path, f"unknown field {_key(key)} (written by a newer uartbridge?)")
    for key in keys:
        if key not in value:
            raise _error(f"{path}.{key}", "missing (every field is always written)")
    return value


def _key(key: str) -> str:
    """A foreign key, quoted and escaped for a one-line message."""
    text = json.dumps(key, ensure_ascii=True)
    return text if len(text) <= 48 else text[:44] + '..."'


def _simple_key(key: str) -> bool:
    return bool(re.fullmatch(r"[a-z0-9_]{1,40}", key))


def _int(section: dict[str, object], key: str, path: str) -> int:
    value = section[key]
    if type(value) is not int:
        raise _error(f"{path}.{key}", f"must be an integer, got {_show(value)}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise _error(f"{path}.{key}", "must fit a signed 64-bit integer")
    return value


def _count(section: dict[str, object], key: str, path: str) -> int:
    value = _int(section, key, path)
    if value < 0:
        raise _error(f"{path}.{key}", f"must be >= 0, got {value}")
    return value


def _opt_int(section: dict[str, object], key: str, path: str) -> int | None:
    return None if section[key] is None else _int(section, key, path)


def _bool(section: dict[str, object], key: str, path: str) -> bool:
    value = section[key]
    if type(value) is not bool:
        raise _error(f"{path}.{key}", f"must be true or false, got {_show(value)}")
    return value


def _str(section: dict[str, object], key: str, path: str) -> str:
    value = section[key]
    if not isinstance(value, str):
        raise _error(f"{path}.{key}", f"must be a string, got {_show(value)}")
    return value


def _opt_str(section: dict[str, object], key: str, path: str) -> str | None:
    value = section[key]
    if value is None:
        return None
    if not isinstance(value, str):
        raise _error(f"{path}.{key}", f"must be a string or null, got {_show(value)}")
    return value


def _hex(section: dict[str, object], key: str, path: str, limit: int) -> bytes:
    value = _str(section, key, path)
    if len(value) > 2 * limit:
        raise _error(
            f"{path}.{key}", f"holds {len(value) // 2} bytes, more than the {limit} allowed"
        )
    try:
        data = bytes.fromhex(value)
    except ValueError:
        data = None
    # fromhex also takes upper case and spaces; the round trip admits only the canonical form.
    if data is None or data.hex() != value:
        raise _error(f"{path}.{key}", f"must be even-length lowercase hex, got {_show(value)}")
    return data


def _read_meta(document: dict[str, object], version: int) -> CheckpointMeta:
    section = _section(document["meta"], "meta", _META_KEYS)
    meta = CheckpointMeta(
        format_version=version,
        uartbridge_version=_str(section, "uartbridge_version", "meta"),
        uart_name=_str(section, "uart_name", "meta"),
        port=_str(section, "port", "meta"),
        created_unix_ns=_int(section, "created_unix_ns", "meta"),
        generation=_int(section, "generation", "meta"),
        port_handle=_opt_str(section, "port_handle", "meta"),
    )
    _check_meta(meta, writing=False)
    return meta


def _read_uart(document: dict[str, object]) -> UartState:
    return read_uart_section(document["uart"])


def read_uart_section(value: object, path: str = "uart") -> UartState:
    """The device of a ``uart`` section, fully validated (``CheckpointError`` naming the
    field and the rule otherwise)."""
    section = _section(value, path, _UART_KEYS)
    iir_fifo = _bool(section, "iir_fifo", path)
    stats_section = _section(section["statistics"], f"{path}.statistics", _STATISTICS_KEYS)
    statistics = UartStatistics(
        **{key: _int(stats_section, key, f"{path}.statistics") for key in _STATISTICS_KEYS}
    )
    # FIFO and line lengths are UartState.validate's rule; the limits here only bound the work.
    state = UartState(
        baudbase=_int(section, "baudbase", path),
        tx_retry_limit=_opt_int(section, "tx_retry_limit", path),
        divisor=_int(section, "divisor", path),
        rbr=_int(section, "rbr", path),
        ier=_int(section, "ier", path),
        iir=(IIR_FIFO_BITS if iir_fifo else 0) | int(Iir.NO_INT),
        lcr=_int(section, "lcr", path),
        mcr=_int(section, "mcr", path),
        lsr=_int(section, "lsr", path),
        msr=_int(section, "msr", path),
        scr=_int(section, "scr", path),
        fcr=_int(section, "fcr", path),
        thr=_int(section, "thr", path),
        tsr=_int(section, "tsr", path),
        tsr_busy=_bool(section, "tsr_busy", path),
        tsr_retry=_int(section, "tsr_retry", path),
        thr_ipending=_bool(section, "thr_ipending", path),
        timeout_ipending=_bool(section, "timeout_ipending", path),
        rx_fifo=_hex(section, "rx_fifo", path, 64),
        tx_fifo=_hex(section, "tx_fifo", path, 64),
        timeout_remaining_ns=_opt_int(section, "timeout_remaining_ns", path),
        reset_timing=_bool(section, "reset_timing", path),
        statistics=statistics,
        pace=_pace(section, path),
        tx_shift_remaining_ns=_opt_int(section, "tx_shift_remaining_ns", path),
        tx_line=_hex(section, "tx_line", path, 4 * TX_LINE_BYTES),
        rx_line=_hex(section, "rx_line", path, 4 * RX_LINE_BYTES),
        rx_slot_remaining_ns=_opt_int(section, "rx_slot_remaining_ns", path),
    )
    _check_uart(state)
    return state


def _pace(section: dict[str, object], path: str) -> Pace:
    # Any string here: UartState.validate names an unknown one with the other device rules.
    return cast(Pace, _str(section, "pace", path))


def _derive(state: UartState) -> UartState:
    """The state with IIR's interrupt ID recomputed by the model (a throwaway device; the
    timer is kept as remaining time, so a clock standing at 0 gives the same state back)."""
    return Uart16550.from_state(state, clock=_zero_clock).state()


def _zero_clock() -> int:
    return 0


def _read_line_settings(value: object) -> LineSettings | None:
    if value is None:
        return None
    path = "port.line_settings"
    section = _section(value, path, _LINE_KEYS)
    parity = _str(section, "parity", path)
    if parity not in _PARITIES:
        raise _error(f"{path}.parity", f"must be one of N, O, E, M, S, got {_show(parity)}")
    stop_text = _str(section, "stop_bits", path)
    if stop_text not in _STOP_BITS_FROM_TEXT:
        raise _error(f"{path}.stop_bits", f'must be "1", "1.5" or "2", got {_show(stop_text)}')
    settings = LineSettings(
        baud=_int(section, "baud", path),
        data_bits=_int(section, "data_bits", path),
        parity=_PARITIES[_PARITIES.index(parity)],
        stop_bits=_STOP_BITS_FROM_TEXT[stop_text],
        break_on=_bool(section, "break_on", path),
    )
    return settings


def _read_port(document: dict[str, object]) -> PortState:
    path = "port"
    section = _section(document[path], path, _PORT_KEYS)
    reader = _str(section, "reader_state", path)
    try:
        reader_state = ReaderState(reader)
    except ValueError as exc:
        raise _error(
            f"{path}.reader_state",
            f"must be one of connected, stalled, disconnected, got {_show(reader)}",
        ) from exc
    counters_section = _section(section["counters"], f"{path}.counters", _COUNTER_KEYS)
    marks = section["rx_marks"]
    if not isinstance(marks, list):
        raise _error(f"{path}.rx_marks", f"must be a list, got {_show(marks)}")
    rx_marks = []
    for i, mark in enumerate(marks):
        mark_path = f"{path}.rx_marks[{i}]"
        item = _section(mark, mark_path, _MARK_KEYS)
        rx_marks.append((_count(item, "at", mark_path), _str(item, "kind", mark_path)))
    port = PortState(
        rx_backlog=_hex(section, "rx_backlog", path, MAX_RX_BACKLOG_BYTES),
        tx_backlog=_hex(section, "tx_backlog", path, MAX_TX_BACKLOG_BYTES),
        reader_state=reader_state,
        line_settings=_read_line_settings(section["line_settings"]),
        counters=PortCounters(
            **{key: _count(counters_section, key, f"{path}.counters") for key in _COUNTER_KEYS}
        ),
        rx_marks=tuple(rx_marks),
        rx_escape=_hex(section, "rx_escape", path, 2),
    )
    _check_port(port)
    return port


def _upgrade_v1(document: dict[str, object]) -> dict[str, object]:
    """Version 1 had no ``port.rx_marks``: a v1 writer delivered breaks and line errors at
    once, so none was ever pending."""
    port = document.get("port")
    if not isinstance(port, dict):
        return document  # the checks below name what is wrong
    if "rx_marks" in port:
        raise _error("port.rx_marks", "unknown field in format version 1 (it came with 2)")
    return {**document, "port": {**port, "rx_marks": []}}


def _upgrade_v2(document: dict[str, object], version: int) -> dict[str, object]:
    """Version 2 had no ``port.rx_escape`` and none of the counters of ``_COUNTERS_V3``: a v2
    writer never stood inside a PARMRK mark at a checkpoint it could not finish (it had no
    way to say so) and never reclaimed or saved kernel buffers at a stop, so "" and 0."""
    port = document.get("port")
    if not isinstance(port, dict):
        return document
    if "rx_escape" in port:
        raise _error(
            "port.rx_escape", f"unknown field in format version {version} (it came with 3)"
        )
    upgraded: dict[str, object] = {**port, "rx_escape": ""}
    counters = port.get("counters")
    if isinstance(counters, dict):  # (anything else: the schema check names what is wrong)
        for key in _COUNTERS_V3:
            if key in counters:
                raise _error(
                    f"port.counters.{key}",
                    f"unknown field in format version {version} (it came with 3)",
                )
        upgraded["counters"] = {**counters, **dict.fromkeys(_COUNTERS_V3, 0)}
    return {**document, "port": upgraded}


def _add_fields(
    document: dict[str, object], section: str, defaults: dict[str, object], version: int,
    since: int,
) -> dict[str, object]:
    """``document`` with ``section`` given the fields that came with format ``since``, at
    ``defaults``; one already there in a version-``version`` file is refused."""
    fields = document.get(section)
    if not isinstance(fields, dict):
        return document  # (the schema check names what is wrong)
    for key in defaults:
        if key in fields:
            raise _error(
                f"{section}.{key}",
                f"unknown field in format version {version} (it came with {since})",
            )
    return {**document, section: {**fields, **defaults}}


def _upgrade_v3(document: dict[str, object], version: int) -> dict[str, object]:
    """Versions 1 to 3 had no line-rate pacing: the device was QEMU's (``pace`` "none"), with
    no character on the line and nothing waiting to come in at line rate."""
    return _add_fields(document, "uart", _UART_V4, version, since=4)


def _upgrade_v4(document: dict[str, object], version: int) -> dict[str, object]:
    """Versions 1 to 4 did not say which open port the state belongs to: a writer of those
    never handed a port to its next run, so no descriptor may resume with it (null)."""
    return _add_fields(document, "meta", {"port_handle": None}, version, since=5)


def from_document(document: object) -> Checkpoint:
    """Validate a parsed JSON document (format, version, hash, schema, consistency)."""
    if not isinstance(document, dict):
        raise CheckpointError(f"not a checkpoint: the document is {_show(document)}, not an object")
    if document.get("format") != FORMAT_NAME:
        raise _error("format", f"must be {FORMAT_NAME!r}: not a uartbridge checkpoint")
    if "format_version" not in document:
        raise _error("format_version", "missing")
    version = document["format_version"]
    if type(version) is not int:
        raise _error("format_version", f"must be an integer, got {_show(version)}")
    if version > FORMAT_VERSION:
        raise _error(
            "format_version",
            f"format version {version} is newer than this uartbridge reads "
            f"(up to {FORMAT_VERSION}); upgrade uartbridge",
        )
    if version < 1:
        raise _error("format_version", f"unknown format version {version}")
    if "sha256" not in document:
        raise _error("sha256", "missing: every checkpoint carries its hash")
    claimed = document["sha256"]
    if not isinstance(claimed, str) or not _SHA256_RE.fullmatch(claimed):
        raise _error("sha256", f"must be 64 lowercase hex digits, got {_show(claimed)}")
    actual = content_hash(document)
    if actual != claimed:
        raise _error(
            "sha256",
            f"integrity check failed: content hashes to {actual[:12]}…, file says "
            f"{claimed[:12]}… (corrupt or edited)",
        )
    # Older versions are upgraded here, once their hash is checked, one step at a time, to
    # exactly what they meant (docs/checkpoint-format.md, §6).
    if version == 1:
        document = _upgrade_v1(document)
    if version <= 2:
        document = _upgrade_v2(document, version)
    if version <= 3:
        document = _upgrade_v3(document, version)
    if version <= 4:
        document = _upgrade_v4(document, version)
    for key in document:
        if key not in _TOP_KEYS:
            raise CheckpointError(f"unknown section {_key(key)} (written by a newer uartbridge?)")
    for key in _TOP_KEYS:
        if key not in document:
            raise _error(key, "missing section (every section is always written)")
    meta = _read_meta(document, version)
    uart = _read_uart(document)
    port = _read_port(document)
    # Everything is validated: only now is anything built from the state.
    return Checkpoint(meta=meta, uart=_derive(uart), port=port)


def decode(data: bytes) -> Checkpoint:
    """Parse and fully validate the contents of a checkpoint file.

    Raises ``CheckpointError`` (naming the field and the rule) for anything that is not a
    whole, consistent checkpoint of a format version this uartbridge reads.
    """
    return from_document(_parse_json(data))


# -- files -------------------------------------------------------------------------------


def checkpoint_path(state_dir: Path | str, uart_name: str) -> Path:
    """``<state_dir>/<uart_name>.checkpoint.json`` (``ValueError`` for an unsafe name)."""
    if not is_safe_name(uart_name):
        raise ValueError(f"UART name must be {NAME_RULE}, got {uart_name!r}")
    return Path(state_dir) / f"{uart_name}.checkpoint.json"


def previous_path(path: Path | str) -> Path:
    """Where the previous checkpoint is kept: ``x.checkpoint.json`` → ``x.checkpoint.prev.json``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _temp_re(path: Path) -> re.Pattern[str]:
    return re.compile(re.escape(f".{path.name}.tmp-") + r"[0-9a-f]{16}")


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")


def read_checkpoint(path: Path | str) -> Checkpoint:
    """Read and validate one checkpoint file.

    ``CheckpointMissingError`` if it is missing, unreadable, or not a regular file;
    ``CheckpointError`` if it is not a valid checkpoint. Messages start with the path.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise CheckpointMissingError(f"{path}: cannot open: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise CheckpointMissingError(f"{path}: cannot read: {kind}")
        chunks = []
        remaining = MAX_DOCUMENT_BYTES + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, max(info.st_size + 1, 1 << 16)))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
    except OSError as exc:
        raise CheckpointMissingError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    try:
        return decode(data)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def _fsync_dir(directory: Path) -> None:
    """Make the renames durable. Filesystems that cannot fsync a directory say EINVAL."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _remove_stale_temps(path: Path) -> None:
    """Remove temporary files a killed writer of ``path`` left behind."""
    pattern = _temp_re(path)
    try:
        with os.scandir(path.parent) as entries:
            stale = [entry.path for entry in entries if pattern.fullmatch(entry.name)]
    except FileNotFoundError:
        return
    for name in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


# What this process last wrote at each path: (st_dev, st_ino, st_size, st_mtime_ns). A current
# file still matching it was validated (by encode) and fsynced by us, and need not be re-read.
_written: dict[str, tuple[int, int, int, int]] = {}


def _identity(info: os.stat_result) -> tuple[int, int, int, int]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def _is_valid(path: Path) -> bool:
    """Whether the file at ``path`` is a valid checkpoint worth keeping as the previous one."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return False
    if _written.get(str(path)) == _identity(info):
        return True
    try:
        read_checkpoint(path)
    except CheckpointError:
        return False
    return True


def write_checkpoint(path: Path | str, ckpt: Checkpoint, *, keep_previous: bool = True) -> None:
    """Write ``ckpt`` to ``path`` atomically (mode 0600), keeping the previous one.

    The previous file at ``path`` is kept as ``previous_path(path)`` if it is a valid
    checkpoint (an invalid one is not allowed to push out a good previous one); a file this
    process wrote and that is unchanged since (same inode, size, mtime) is known valid, any
    other is read and validated first. With ``keep_previous=False`` the previous file is left
    alone. At every instant ``path`` holds a whole checkpoint, old or new. Raises
    ``CheckpointError`` for a checkpoint that is not valid or a file that cannot be written.
    """
    path = Path(path)
    data = encode(ckpt)
    directory = path.parent
    try:
        _remove_stale_temps(path)
        temp, identity = _write_temp(path, data)
        try:
            if keep_previous and _is_valid(path):
                _keep_previous(path)
            elif keep_previous and path.exists():
                log.warning("checkpoint %s is not valid; not keeping it as previous", path)
            os.replace(temp, path)
        except BaseException:
            _unlink_quietly(temp)
            raise
        _written[str(path)] = identity
        _fsync_dir(directory)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write checkpoint: {exc.strerror or exc}") from exc


def _write_temp(path: Path, data: bytes) -> tuple[Path, tuple[int, int, int, int]]:
    while True:
        temp = _temp_path(path)
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:  # pragma: no cover - 64 random bits
            continue
        break
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
        identity = _identity(os.fstat(fd))
    except BaseException:
        os.close(fd)
        _unlink_quietly(temp)
        raise
    os.close(fd)
    return temp, identity


def _keep_previous(path: Path) -> None:
    """Make ``previous_path(path)`` the file now at ``path`` without ever removing ``path``."""
    previous = previous_path(path)
    link = _temp_path(path)
    try:
        os.link(path, link)
    except OSError:
        # No hard links here (some FUSE/vfat): rename; for an instant only the previous file
        # exists, which readers accept (latest_checkpoint looks at both).
        os.replace(path, previous)
        return
    os.replace(link, previous)
    # rename() between two links of one inode does nothing: the link may still be there.
    _unlink_quietly(link)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def latest_checkpoint(
    state_dir: Path | str, uart_name: str, *, problems: list[str] | None = None
) -> tuple[Checkpoint, Path] | None:
    """The newest valid checkpoint of ``uart_name`` (current or previous file) and its path.

    Invalid files are skipped; why is logged and, if ``problems`` is given, appended to it.
    None with no problems: there is no checkpoint. None *with* problems: checkpoints exist but
    none is valid — a caller should refuse to start fresh rather than lose state silently.
    The highest generation wins; on a tie the current file.
    """
    path = checkpoint_path(state_dir, uart_name)
    best: tuple[Checkpoint, Path] | None = None
    for candidate in (path, previous_path(path)):
        try:
            ckpt = read_checkpoint(candidate)
        except CheckpointMissingError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                continue
            _problem(problems, str(exc))
            continue
        except CheckpointError as exc:
            _problem(problems, str(exc))
            continue
        if ckpt.meta.uart_name != uart_name:
            _problem(
                problems,
                f"{candidate}: meta.uart_name: belongs to UART {ckpt.meta.uart_name!r}, "
                f"not {uart_name!r}",
            )
            continue
        if best is None or ckpt.meta.generation > best[0].meta.generation:
            best = (ckpt, candidate)
    return best


def _problem(problems: list[str] | None, message: str) -> None:
    log.warning("skipping checkpoint: %s", message)
    if problems is not None:
        problems.append(message)


def restore(
    ckpt: Checkpoint, *, clock: Clock, model: type[Uart16550] = Uart16550
) -> Uart16550:
    """A device that continues where the checkpoint left it (timers re-armed on ``clock``);
    ``model`` is the class to build (``uartbridge.record.RecordingUart`` to record it)."""
    try:
        return model.from_state(ckpt.uart, clock=clock)
    except InvalidStateError as exc:
        raise CheckpointError(str(exc)) from exc


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_RX_BACKLOG_BYTES",
    "MAX_TX_BACKLOG_BYTES",
    "Checkpoint",
    "CheckpointMeta",
    "canonical_bytes",
    "checkpoint_path",
    "content_hash",
    "decode",
    "encode",
    "from_document",
    "latest_checkpoint",
    "previous_path",
    "read_checkpoint",
    "read_uart_section",
    "restore",
    "to_document",
    "uart_section",
    "write_checkpoint",
]
