"""``uartbridge inspect FILE [--json]``: decode and validate a checkpoint for humans.

Shows the metadata, every register decoded with its bit names, the hidden transmitter and
receiver state, both FIFOs and the host buffers as hex and printable text, the reader state,
the counters, the values a restore derives (IRQ level, trigger level, character time, baud)
and the validation verdict.

Exit codes (sysexits.h): 0 a valid checkpoint; 65 an invalid one (a one-line reason on
stderr); 66 a file that is missing or cannot be read. Never a traceback: every problem the
file can have arrives here as a ``CheckpointError``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import textwrap
import time
from dataclasses import fields, replace
from enum import IntFlag
from pathlib import Path

from .checkpoint import Checkpoint, read_checkpoint, restore
from .errors import EX_OK, CheckpointError, CheckpointMissingError
from .registers import (
    IIR_FIFO_BITS,
    TRIGGER_LEVELS,
    Fcr,
    Ier,
    Iir,
    Lcr,
    Lsr,
    Mcr,
    Msr,
    decode_bits,
)
from .uart import LineSettings

#: Text output shows at most this many bytes of a buffer (``--json`` shows all of it).
TEXT_BUFFER_LIMIT = 1024
_BYTES_PER_LINE = 16


def inspect_command(args: argparse.Namespace) -> int:
    """Print a checkpoint file decoded; the exit code says whether it is valid (0/65/66)."""
    path = Path(args.file)
    as_json = bool(getattr(args, "json", False))
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as exc:
        reason = one_line(str(exc))
        kind = "cannot read checkpoint" if isinstance(exc, CheckpointMissingError) else (
            "invalid checkpoint"
        )
        if as_json:
            verdict = {"file": str(path), "valid": False, "error": reason}
            _emit(json.dumps({**verdict, "exit_code": exc.exit_code}, ensure_ascii=True))
        print(f"uartbridge inspect: {kind}: {reason}", file=sys.stderr)
        return exc.exit_code
    report = describe(ckpt, path, now_unix_ns=time.time_ns())
    if as_json:
        _emit(json.dumps(report, indent=2, ensure_ascii=True))
    else:
        _emit(render_text(report))
    return EX_OK


def _emit(text: str) -> None:
    try:
        print(text)
        sys.stdout.flush()
    except UnicodeEncodeError:
        print(text.encode("ascii", "backslashreplace").decode("ascii"))
    except BrokenPipeError:  # `uartbridge inspect f | head`
        pass


def one_line(text: str) -> str:
    """``text`` on one line with every unprintable character escaped (file content is foreign)."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


# -- the report (a JSON-able dict; the text form renders it) -----------------------------------


def buffer_report(data: bytes) -> dict[str, object]:
    """A byte buffer as length, hex and printable text (non-printable bytes shown as '.')."""
    return {"length": len(data), "hex": data.hex(" "), "text": printable(data)}


def printable(data: bytes) -> str:
    """The bytes as text, with '.' for anything that is not printable ASCII."""
    return "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in data)


def _register(value: int, flags: type[IntFlag] | None = None, width: int = 2) -> dict[str, object]:
    entry: dict[str, object] = {"value": value, "hex": f"0x{value:0{width}x}"}
    if flags is not None:
        entry["bits"] = decode_bits(value, flags)
    return entry


def _line_report(settings: LineSettings | None) -> dict[str, object] | None:
    if settings is None:
        return None
    return {
        "baud": settings.baud,
        "data_bits": settings.data_bits,
        "parity": settings.parity,
        "stop_bits": settings.stop_bits,
        "break_on": settings.break_on,
        "summary": replace(settings, break_on=False).summary(),
    }


def _iir_name(iir: int) -> str:
    try:
        return Iir(iir & 0x0F).name
    except ValueError:  # pragma: no cover - the model only produces Iir values
        return f"0x{iir & 0x0F:x}"


def describe(ckpt: Checkpoint, path: Path, *, now_unix_ns: int) -> dict[str, object]:
    """Everything ``inspect`` shows, as a JSON-able dict."""
    meta, uart, port = ckpt.meta, ckpt.uart, ckpt.port
    device = restore(ckpt, clock=lambda: 0)
    created = datetime.datetime.fromtimestamp(meta.created_unix_ns / 1e9, tz=datetime.UTC)
    return {
        "file": str(path),
        "valid": True,
        "verdict": "valid: sha256, schema and consistency checks passed",
        "meta": {
            "format_version": meta.format_version,
            "uartbridge_version": meta.uartbridge_version,
            "uart_name": meta.uart_name,
            "port": meta.port,
            "generation": meta.generation,
            "created_unix_ns": meta.created_unix_ns,
            "created_utc": created.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "age_s": round((now_unix_ns - meta.created_unix_ns) / 1e9, 3),
        },
        "registers": {
            "divisor": _register(uart.divisor, width=4),
            "rbr": _register(uart.rbr),
            "thr": _register(uart.thr),
            "ier": _register(uart.ier, Ier),
            "iir": {
                **_register(uart.iir),
                "interrupt": _iir_name(uart.iir),
                "fifo_bits": bool(uart.iir & IIR_FIFO_BITS),
            },
            "fcr": {
                **_register(uart.fcr, Fcr),
                "trigger_level": TRIGGER_LEVELS[uart.fcr >> 6],
            },
            "lcr": {**_register(uart.lcr, Lcr), "word_length": (uart.lcr & Lcr.WLS_MASK) + 5},
            "mcr": _register(uart.mcr, Mcr),
            "lsr": _register(uart.lsr, Lsr),
            "msr": _register(uart.msr, Msr),
            "scr": _register(uart.scr),
        },
        "transmitter": {
            "tsr": uart.tsr,
            "tsr_busy": uart.tsr_busy,
            "tsr_retry": uart.tsr_retry,
            "tx_retry_limit": uart.tx_retry_limit,
            "thr_ipending": uart.thr_ipending,
            "tx_fifo": buffer_report(uart.tx_fifo),
            "waiting_for_wire": buffer_report(uart.tx_waiting()),
            "tx_line": buffer_report(uart.tx_line),
            "tx_shift_remaining_ns": uart.tx_shift_remaining_ns,
        },
        "receiver": {
            "rx_fifo": buffer_report(uart.rx_fifo),
            "timeout_ipending": uart.timeout_ipending,
            "timeout_remaining_ns": uart.timeout_remaining_ns,
            "rx_line": buffer_report(uart.rx_line),
            "rx_slot_remaining_ns": uart.rx_slot_remaining_ns,
        },
        "derived": {
            "irq": device.irq,
            "fifo_enabled": uart.fifo_enabled,
            "trigger_level": TRIGGER_LEVELS[uart.fcr >> 6],
            "char_time_ns": device.char_time_ns,
            "pace": uart.pace,
            "line_char_time_ns": device.line_char_time_ns,
            "reset_timing": uart.reset_timing,
            "baudbase": uart.baudbase,
            "line_settings": _line_report(device.line_settings),
        },
        "port": {
            "reader_state": str(port.reader_state.value),
            "line_settings": _line_report(port.line_settings),
            "rx_backlog": buffer_report(port.rx_backlog),
            "rx_marks": [{"at": at, "kind": kind} for at, kind in port.rx_marks],
            "rx_escape": port.rx_escape.hex(),
            "tx_backlog": buffer_report(port.tx_backlog),
        },
        "counters": {
            "uart": {f.name: getattr(uart.statistics, f.name) for f in fields(uart.statistics)},
            "port": {f.name: getattr(port.counters, f.name) for f in fields(port.counters)},
        },
    }


# -- text rendering ---------------------------------------------------------------------


def _get(report: dict[str, object], *keys: str) -> object:
    value: object = report
    for key in keys:
        assert isinstance(value, dict)
        value = value[key]
    return value


def _dict(report: dict[str, object], *keys: str) -> dict[str, object]:
    value = _get(report, *keys)
    assert isinstance(value, dict)
    return value


def _rx_line_lines(rx: dict[str, object], paced: bool) -> list[str]:
    """With line-rate pacing: the bytes on their way in and when the next one enters."""
    if not paced:
        return []
    rx_line = rx["rx_line"]
    assert isinstance(rx_line, dict)
    slot = rx["rx_slot_remaining_ns"]
    when = "at once" if slot is None else f"in {slot} ns"
    return [f"  rx line      the next byte can enter {when}", *_buffer_lines("rx line", rx_line)]


def hexdump(data: bytes, *, indent: str = "    ", limit: int = TEXT_BUFFER_LIMIT) -> list[str]:
    """Classic hexdump lines: offset, 16 bytes of hex, printable text."""
    lines = []
    shown = data[:limit]
    for offset in range(0, len(shown), _BYTES_PER_LINE):
        chunk = shown[offset : offset + _BYTES_PER_LINE]
        hex_text = chunk.hex(" ").ljust(3 * _BYTES_PER_LINE - 1)
        lines.append(f"{indent}{offset:06x}  {hex_text}  |{printable(chunk)}|")
    if len(data) > limit:
        lines.append(f"{indent}… {len(data) - limit} more bytes (--json shows all)")
    return lines


def _buffer_lines(label: str, buffer: dict[str, object]) -> list[str]:
    length = buffer["length"]
    hex_text = buffer["hex"]
    assert isinstance(length, int) and isinstance(hex_text, str)
    if not length:
        return [f"  {label:<12} empty"]
    data = bytes.fromhex(hex_text)
    return [f"  {label:<12} {length} byte{'s' if length != 1 else ''}", *hexdump(data)]


def _age(age_s: object) -> str:
    """How old the state is, in a unit a human reads at a glance."""
    assert isinstance(age_s, int | float)
    if age_s < 0:
        return f"{-age_s:.3f} s in the future: check the clocks"
    for unit, seconds in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if age_s >= seconds:
            return f"{age_s / seconds:.1f} {unit} ago"
    return f"{age_s:.3f} s ago"


def _yes(value: object) -> str:
    return "yes" if value else "no"


def _bits(entry: dict[str, object]) -> str:
    bits = entry.get("bits")
    assert isinstance(bits, list)
    return " ".join(str(b) for b in bits) or "-"


def render_text(report: dict[str, object]) -> str:
    """The human form of ``describe``'s report."""
    meta = _dict(report, "meta")
    regs = _dict(report, "registers")
    tx = _dict(report, "transmitter")
    rx = _dict(report, "receiver")
    derived = _dict(report, "derived")
    port = _dict(report, "port")
    counters = _dict(report, "counters")

    def reg(name: str) -> dict[str, object]:
        entry = regs[name]
        assert isinstance(entry, dict)
        return entry

    line = derived["line_settings"]
    assert isinstance(line, dict)
    ier, iir, fcr, lcr = reg("ier"), reg("iir"), reg("fcr"), reg("lcr")
    limit = "none" if tx["tx_retry_limit"] is None else tx["tx_retry_limit"]
    out = [
        f"checkpoint   {one_line(str(report['file']))}",
        f"verdict      {report['verdict']}",
        f"format       version {meta['format_version']}, "
        f"written by uartbridge {one_line(str(meta['uartbridge_version']))}",
        f"uart         {one_line(str(meta['uart_name']))} on {one_line(str(meta['port']))}, "
        f"generation {meta['generation']}",
        f"created      {meta['created_utc']} ({_age(meta['age_s'])})",
        "",
        "registers",
        f"  DLL/DLM  {reg('divisor')['hex']}  baudbase {derived['baudbase']} → {line['baud']} baud",
        f"  RBR      {reg('rbr')['hex']}",
        f"  THR      {reg('thr')['hex']}",
        f"  IER      {ier['hex']}    {_bits(ier)}",
        f"  IIR      {iir['hex']}    {iir['interrupt']}"
        f"{', FIFO bits' if iir['fifo_bits'] else ''}; IRQ {'high' if derived['irq'] else 'low'}",
        f"  FCR      {fcr['hex']}    {_bits(fcr)}; trigger level {fcr['trigger_level']}",
        f"  LCR      {lcr['hex']}    {line['summary']}"
        f"{' ' + _bits(lcr) if lcr['bits'] else ''}",
        f"  MCR      {reg('mcr')['hex']}    {_bits(reg('mcr'))}",
        f"  LSR      {reg('lsr')['hex']}    {_bits(reg('lsr'))}",
        f"  MSR      {reg('msr')['hex']}    {_bits(reg('msr'))}",
        f"  SCR      {reg('scr')['hex']}",
        "",
        "transmitter",
        f"  TSR 0x{tx['tsr']:02x}, {'busy' if tx['tsr_busy'] else 'empty'}, "
        f"tsr_retry={tx['tsr_retry']} (limit {limit}), thr_ipending {_yes(tx['thr_ipending'])}",
    ]
    tx_fifo = tx["tx_fifo"]
    waiting = tx["waiting_for_wire"]
    rx_fifo = rx["rx_fifo"]
    assert isinstance(tx_fifo, dict) and isinstance(waiting, dict) and isinstance(rx_fifo, dict)
    out += _buffer_lines("tx_fifo", tx_fifo)
    out += _buffer_lines("to the wire", waiting)
    paced = derived["pace"] == "line"
    if paced:
        tx_line = tx["tx_line"]
        assert isinstance(tx_line, dict)
        shift = tx["tx_shift_remaining_ns"]
        out.append(
            f"  pace         line: {derived['line_char_time_ns']} ns a character; "
            + ("the line is idle" if shift is None else f"{shift} ns left of the character on it")
        )
        out += _buffer_lines("tx line", tx_line)
    remaining = rx["timeout_remaining_ns"]
    out += [
        "",
        "receiver",
        *_buffer_lines("rx_fifo", rx_fifo),
        f"  timeout      {'not armed' if remaining is None else f'armed, {remaining} ns remaining'}"
        f", timeout_ipending {_yes(rx['timeout_ipending'])}",
        f"  char time    {derived['char_time_ns']} ns"
        f"{' (power-on value)' if derived['reset_timing'] else ''}",
        *_rx_line_lines(rx, paced),
        "",
        "host path",
        f"  reader       {port['reader_state']}",
    ]
    applied = port["line_settings"]
    if isinstance(applied, dict):
        out.append(
            f"  line         {applied['summary']}, break {'on' if applied['break_on'] else 'off'}"
            " (last applied to the port)"
        )
    else:
        out.append("  line         nothing applied to the port yet")
    rx_backlog, tx_backlog = port["rx_backlog"], port["tx_backlog"]
    assert isinstance(rx_backlog, dict) and isinstance(tx_backlog, dict)
    out += _buffer_lines("rx_backlog", rx_backlog)
    marks = port["rx_marks"]
    assert isinstance(marks, list)
    if marks:
        text = ", ".join(f"{m['kind']} after {m['at']} bytes" for m in marks)
        out += textwrap.wrap(text, 96, initial_indent="  rx_marks     ", subsequent_indent=" " * 15)
    escape = port["rx_escape"]
    if escape:
        out.append(f"  rx_escape    {escape} (a PARMRK mark begun; its rest is still on the port)")
    out += _buffer_lines("tx_backlog", tx_backlog)
    out += ["", "counters"]
    for side in ("uart", "port"):
        values = counters[side]
        assert isinstance(values, dict)
        text = " ".join(f"{k}={v}" for k, v in values.items())
        out += textwrap.wrap(text, 96, initial_indent=f"  {side:<6}", subsequent_indent=" " * 8)
    return "\n".join(out)
