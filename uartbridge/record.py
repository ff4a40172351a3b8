"""Record and replay: what came into a UART from outside, and the same run again, no port.

Theory of operation
-------------------
The model (``Uart16550``) is a function of its input operations and their times: each reads
the clock once and runs at that time (see ``uart.py``). So a run is reproduced exactly by the
same operations at the same times. ``RecordingUart`` is the model plus a recorder: every
input operation — a register access from the guest (the bus, or an emulator in-process),
bytes, breaks and line errors from the far end, modem-input changes, what the wire did with
an offered byte, a timer tick, a reset — is written with its time, and with what it gave
(the value read, the IRQ edges, the bytes the wire took) so a replay can check itself.
``replay`` runs a fresh model from the recorded initial state through the same operations at
the same times and compares, record by record: the first divergence is reported.

The file format is ``docs/recording-format.md``: a magic and a version, then length-free
binary records with zigzag-varint time deltas (ns), one stream per UART (``SELECT``),
written as they happen (buffered: at most ``FLUSH_BYTES`` or ``FLUSH_INTERVAL_S`` behind),
ending with ``END``. Its size is bounded by what changes the device, not by how often the
guest polls: a run of identical reads that changes nothing is one record, timer ticks and
modem polls that find nothing to do are not recorded.

Not recorded, because a replay does not need them: queries (``tx_pending``, ``can_receive``,
``irq``…), what the port link does with the model's events, the host's own path (backlogs,
reconnects). A replay reproduces the device, not the host.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

from . import __version__
from .checkpoint import read_uart_section, uart_section
from .errors import (
    EX_CANTCREAT,
    EX_NOINPUT,
    EX_OK,
    CheckpointError,
    RecordingError,
    exit_code_for_os_error,
)
from .registers import Lcr
from .uart import Clock, Pace, Uart16550, UartState

MAGIC = b"UBREC\x00"
FORMAT_VERSION = 1
FLUSH_BYTES = 64 * 1024
FLUSH_INTERVAL_S = 0.5
MAX_BEGIN_BYTES = 1 << 16  # a BEGIN record's JSON (one UART's state: about 1 KiB)
MAX_PAYLOAD_BYTES = 1 << 24  # a RECEIVE or TX_SENT record's bytes
EXIT_DIVERGED = 1  # like cmp(1) and diff(1): the replay differs from the recording

# Record kinds (the first byte of a record). READ and WRITE carry the offset in the low bits.
READ = 0x00  # .. 0x07: dt, u8 value
WRITE = 0x08  # .. 0x0F: dt, u8 value
READ_RUN = 0x10  # u8 offset, dt (of the last read), u8 value, varint count >= 2
RECEIVE = 0x11  # dt, varint n, n bytes: the bytes the device took from the wire
BREAK = 0x12  # dt
LINE_ERROR = 0x13  # dt, u8 bits: 1 parity, 2 framing
MODEM = 0x14  # dt, u8 levels: 1 cts, 2 dsr, 4 ri, 8 dcd
TX_SENT = 0x15  # dt, varint n, n bytes: what the wire took (checked by a replay)
TX_BLOCKED = 0x16  # dt
POLL = 0x17  # dt: the timers due then ran (a tick that found nothing is not recorded)
RESET = 0x18  # dt
IRQ = 0x20  # varint changes >= 1, u8 level: the IRQ edges of the operation just before
SELECT = 0xE0  # varint uart id: the records that follow are this UART's
BEGIN = 0xF0  # varint uart id, varint length, JSON: a UART's name, clock and initial state
META = 0xF1  # varint length, JSON: the writer's version, when
END = 0xFF  # the recording was closed cleanly

_OPS_WITH_DT = {RECEIVE, BREAK, LINE_ERROR, MODEM, TX_SENT, TX_BLOCKED, POLL, RESET}
_NAMES = ("RBR", "IER", "IIR", "LCR", "MCR", "LSR", "MSR", "SCR")
_WRITE_NAMES = ("THR", "IER", "FCR", "LCR", "MCR", "LSR", "MSR", "SCR")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _zigzag(value: int) -> int:
    return value << 1 if value >= 0 else ((-value) << 1) - 1


def _unzigzag(value: int) -> int:
    return value >> 1 if not value & 1 else -((value + 1) >> 1)


# -- writing ------------------------------------------------------------------------------


class RecordWriter:
    """One recording file, shared by the UARTs it records (each its own stream).

    A regular file, mode 0600 (an existing one is replaced; a symlink, device or FIFO is
    refused). Records are buffered and written at
    most ``FLUSH_BYTES`` or ``FLUSH_INTERVAL_S`` late, and at ``close``. A write that fails
    (disk full) ends the recording, logged once through ``on_error``; the device goes on.
    """

    def __init__(self, path: str | Path, *, on_error: Callable[[str], None] | None = None) -> None:
        """Create the file; ``RecordingError`` (73 / 74) if it cannot be created."""
        self.path = Path(path)
        self._on_error = on_error
        try:
            # O_NONBLOCK: a FIFO given by mistake must not hang the open (it is refused below).
            fd = os.open(
                self.path,
                os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
                0o600,
            )
        except OSError as exc:
            raise RecordingError(
                f"{self.path}: cannot create the recording: {exc.strerror or exc}",
                exit_code=exit_code_for_os_error(exc),
            ) from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise RecordingError(
                    f"{self.path}: cannot record there: not a regular file",
                    exit_code=EX_CANTCREAT,
                )
            os.ftruncate(fd, 0)
            os.fchmod(fd, 0o600)
            os.set_blocking(fd, True)
        except OSError as exc:
            os.close(fd)
            raise RecordingError(
                f"{self.path}: cannot create the recording: {exc.strerror or exc}",
                exit_code=exit_code_for_os_error(exc),
            ) from exc
        except RecordingError:
            os.close(fd)
            raise
        self._fd: int | None = fd
        self._buffer = bytearray(MAGIC)
        self._buffer.append(FORMAT_VERSION)
        meta = json.dumps(
            {"uartbridge_version": __version__, "created_unix_ns": time.time_ns()}
        ).encode()
        self._buffer += bytes((META,)) + _varint(len(meta)) + meta
        self._streams: list[_Stream] = []
        self._current = -1
        self._last_flush = time.monotonic()
        self._writes = 0
        self.failed: str | None = None
        self.bytes_written = 0

    def begin(self, name: str, clock: str, now_ns: int, state: UartState) -> _Stream:
        """A new UART stream starting at ``now_ns`` in ``state``."""
        uart_id = len(self._streams)
        doc = json.dumps(
            {"name": name, "clock": clock, "t0_ns": now_ns, "state": uart_section(state)},
            separators=(",", ":"),
        ).encode()
        self._buffer += bytes((BEGIN,)) + _varint(uart_id) + _varint(len(doc)) + doc
        self._current = uart_id
        stream = _Stream(self, uart_id, now_ns)
        self._streams.append(stream)
        return stream

    def write(self, uart_id: int, record: bytes) -> None:
        """Append one record of UART ``uart_id``."""
        if self._fd is None:
            return
        if uart_id != self._current:
            self._buffer += bytes((SELECT,)) + _varint(uart_id)
            self._current = uart_id
        self._buffer += record
        self._writes += 1
        if len(self._buffer) >= FLUSH_BYTES or (
            not self._writes & 0xFF and time.monotonic() - self._last_flush >= FLUSH_INTERVAL_S
        ):
            self.flush()

    def flush(self) -> None:
        """Write what is buffered to the file (not an fsync)."""
        fd = self._fd
        if fd is None or not self._buffer:
            return
        data = bytes(self._buffer)
        self._buffer.clear()
        try:
            with memoryview(data) as view:
                while view:
                    # Not view[os.write(...):]: mypyc (2.4) evaluates a call in a slice
                    # bound twice, which wrote every buffer twice in the compiled build.
                    written = os.write(fd, view)
                    view = view[written:]
        except OSError as exc:
            self._fail(f"{self.path}: recording stopped: {exc.strerror or exc}")
            return
        self.bytes_written += len(data)
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Finish every stream's pending record, write END, close the file. Idempotent."""
        if self._fd is None:
            return
        for stream in self._streams:
            stream.flush_run()
        self._buffer.append(END)
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _fail(self, message: str) -> None:
        self.failed = message
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._buffer.clear()
        if self._on_error is not None:
            self._on_error(message)


@dataclass(slots=True)
class _Run:
    offset: int
    value: int
    count: int
    at_ns: int


class _Stream:
    """One UART's records: times as deltas from the previous record, runs of reads folded."""

    __slots__ = ("_last_ns", "_run", "_writer", "uart_id")

    def __init__(self, writer: RecordWriter, uart_id: int, t0_ns: int) -> None:
        self._writer = writer
        self.uart_id = uart_id
        self._last_ns = t0_ns
        self._run: _Run | None = None

    def _dt(self, now_ns: int) -> bytes:
        delta = now_ns - self._last_ns
        self._last_ns = now_ns
        return _varint(_zigzag(delta))

    def op(self, kind: int, now_ns: int, payload: bytes, edges: int, level: bool) -> None:
        """One operation (and its IRQ edges, if any)."""
        if self._run is not None:
            self.flush_run()
        record = bytes((kind,)) + self._dt(now_ns) + payload
        if edges:
            record += bytes((IRQ,)) + _varint(edges) + (b"\x01" if level else b"\x00")
        self._writer.write(self.uart_id, record)

    def read(
        self, offset: int, value: int, now_ns: int, *, foldable: bool, ran: bool, edges: int,
        level: bool,
    ) -> None:
        """A register read. Reads that changed nothing (no timer ran, no IRQ edge, not a FIFO
        read) and return what the one before returned fold into one READ_RUN: replayed all
        at the last one's time, they give the same values and leave the same device."""
        run = self._run
        if foldable and not edges:
            if run is not None and not ran and run.offset == offset and run.value == value:
                run.count += 1
                run.at_ns = now_ns
                return
            if run is not None:
                self.flush_run()
            self._run = _Run(offset, value, 1, now_ns)
            return
        self.op(READ | offset, now_ns, bytes((value,)), edges, level)

    def flush_run(self) -> None:
        """Write the pending run of reads."""
        run = self._run
        if run is None:
            return
        self._run = None
        if run.count == 1:
            record = bytes((READ | run.offset,)) + self._dt(run.at_ns) + bytes((run.value,))
        else:
            record = (
                bytes((READ_RUN, run.offset)) + self._dt(run.at_ns) + bytes((run.value,))
                + _varint(run.count)
            )
        self._writer.write(self.uart_id, record)


class RecordingUart(Uart16550):
    """A ``Uart16550`` that records every input operation once ``start_recording`` ran.

    Build it as the model would be (``RecordingUart(...)`` or ``RecordingUart.from_state``),
    then ``start_recording(writer, name)`` before the first operation to record.
    """

    _stream: _Stream | None = None

    def start_recording(self, writer: RecordWriter, name: str, *, clock: str = "host") -> None:
        """Begin this UART's stream: its state now (timers due run first) is the start."""
        now = self._now_ns = self._clock()
        due = self._due_ns
        if due is not None and now >= due:
            self._advance(now)
        self._stream = writer.begin(name, clock, now, self._state_at(now))

    def _ran(self, due: int | None) -> bool:
        return due is not None and due <= self._now_ns

    def read(self, offset: int) -> int:
        """Read a register (recorded)."""
        stream = self._stream
        if stream is None:
            return super().read(offset)
        due, edges = self._due_ns, self._irq_edges
        value = super().read(offset)
        foldable = offset != 0 or bool(self._lcr & Lcr.DLAB)
        stream.read(offset, value, self._now_ns, foldable=foldable, ran=self._ran(due),
                    edges=self._irq_edges - edges, level=self._irq)
        return value

    def write(self, offset: int, value: int) -> None:
        """Write a register (recorded)."""
        stream = self._stream
        if stream is None:
            super().write(offset, value)
            return
        edges = self._irq_edges
        super().write(offset, value)
        stream.op(WRITE | offset, self._now_ns, bytes((value,)), self._irq_edges - edges,
                  self._irq)

    def receive(self, data: bytes) -> int:
        """Bytes from the wire (recorded: the bytes taken)."""
        stream = self._stream
        if stream is None:
            return super().receive(data)
        due, edges = self._due_ns, self._irq_edges
        n = super().receive(data)
        if n:
            stream.op(RECEIVE, self._now_ns, _varint(n) + bytes(data[:n]),
                      self._irq_edges - edges, self._irq)
        elif self._ran(due):
            stream.op(POLL, self._now_ns, b"", self._irq_edges - edges, self._irq)
        return n

    def receive_break(self) -> None:
        """A break from the wire (recorded)."""
        self._recorded(BREAK, b"", super().receive_break)

    def receive_line_error(self, *, parity: bool = False, framing: bool = False) -> None:
        """A parity or framing error from the wire (recorded)."""
        bits = (1 if parity else 0) | (2 if framing else 0)
        # The parent's method named directly, not super() in a closure: mypyc (2.4) passes
        # the closure's environment as ``self`` there.
        apply = functools.partial(
            Uart16550.receive_line_error, self, parity=parity, framing=framing
        )
        self._recorded(LINE_ERROR, bytes((bits,)), apply)

    def set_modem_inputs(self, *, cts: bool, dsr: bool, ri: bool, dcd: bool) -> None:
        """New modem input levels (recorded when they change something)."""
        stream = self._stream
        if stream is None:
            super().set_modem_inputs(cts=cts, dsr=dsr, ri=ri, dcd=dcd)
            return
        due, edges, msr = self._due_ns, self._irq_edges, self._msr
        super().set_modem_inputs(cts=cts, dsr=dsr, ri=ri, dcd=dcd)
        if self._msr != msr or self._ran(due):
            levels = (1 if cts else 0) | (2 if dsr else 0) | (4 if ri else 0) | (8 if dcd else 0)
            stream.op(MODEM, self._now_ns, bytes((levels,)), self._irq_edges - edges,
                      self._irq)

    def tx_sent(self, n: int) -> None:
        """The wire took bytes (recorded with them)."""
        stream = self._stream
        if stream is None:
            super().tx_sent(n)
            return
        edges = self._irq_edges
        taken = self.tx_pending()[:n] if n > 0 else b""
        super().tx_sent(n)
        stream.op(TX_SENT, self._now_ns, _varint(len(taken)) + taken, self._irq_edges - edges,
                  self._irq)

    def tx_blocked(self) -> None:
        """The wire refused a byte (recorded)."""
        self._recorded(TX_BLOCKED, b"", super().tx_blocked)

    def poll(self) -> None:
        """Run the timers due (recorded when one ran)."""
        stream = self._stream
        if stream is None:
            super().poll()
            return
        due, edges = self._due_ns, self._irq_edges
        super().poll()
        if self._ran(due):
            stream.op(POLL, self._now_ns, b"", self._irq_edges - edges, self._irq)

    def reset(self) -> None:
        """System reset (recorded)."""
        self._recorded(RESET, b"", super().reset)

    def state(self, *, run_timers: bool = False) -> UartState:
        """As ``Uart16550.state``; with ``run_timers`` the timers that ran are recorded."""
        stream = self._stream
        if stream is None or not run_timers:
            return super().state(run_timers=run_timers)
        due, edges = self._due_ns, self._irq_edges
        state = super().state(run_timers=True)
        if self._ran(due):
            stream.op(POLL, self._now_ns, b"", self._irq_edges - edges, self._irq)
        return state

    def _recorded(self, kind: int, payload: bytes, apply: Callable[[], None]) -> None:
        stream = self._stream
        if stream is None:
            apply()
            return
        edges = self._irq_edges
        apply()
        stream.op(kind, self._now_ns, payload, self._irq_edges - edges, self._irq)


def clock_kind(clock: Clock) -> str:
    """How a recording names a clock: "host" (monotonic), "guest" (GuestClock), "custom"."""
    from .clock import GuestClock

    if clock is time.monotonic_ns:
        return "host"
    return "guest" if isinstance(clock, GuestClock) else "custom"


# -- reading ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """One record as read: its position, UART id, kind, time (ns, absolute on that UART's
    clock; None for IRQ) and arguments."""

    index: int
    offset_bytes: int
    uart_id: int
    kind: int
    at_ns: int | None
    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """A UART's stream: its name, clock kind, start time and initial state."""

    uart_id: int
    name: str
    clock: str
    t0_ns: int
    state: UartState


class _Reader:
    """Parses a recording incrementally from a binary file."""

    def __init__(self, f: BinaryIO, source: str) -> None:
        self._f = f
        self._source = source
        self._buf = b""
        self._pos = 0
        self._consumed = 0
        self.streams: dict[int, StreamInfo] = {}
        self.meta: dict[str, Any] = {}
        self.ended = False
        self.truncated = False
        self._last: dict[int, int] = {}

    @property
    def offset(self) -> int:
        return self._consumed + self._pos

    def _fill(self, n: int) -> bool:
        while len(self._buf) - self._pos < n:
            chunk = self._f.read(1 << 16)
            if not chunk:
                return False
            self._consumed += self._pos
            self._buf = self._buf[self._pos :] + chunk
            self._pos = 0
        return True

    def _take(self, n: int) -> bytes:
        if not self._fill(n):
            raise _Truncated
        data = self._buf[self._pos : self._pos + n]
        self._pos += n
        return data

    def _byte(self) -> int:
        return self._take(1)[0]

    def _uvarint(self) -> int:
        value = shift = 0
        while True:
            byte = self._byte()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 70:
                raise self._bad("a varint longer than 10 bytes")

    def _bad(self, what: str) -> RecordingError:
        return RecordingError(f"{self._source}: byte {self.offset}: {what}: not a valid recording")

    def header(self) -> None:
        if not self._fill(len(MAGIC) + 1) or self._take(len(MAGIC)) != MAGIC:
            raise RecordingError(f"{self._source}: not a uartbridge recording (no UBREC magic)")
        version = self._byte()
        if version != FORMAT_VERSION:
            raise RecordingError(
                f"{self._source}: recording format version {version}; this uartbridge reads "
                f"version {FORMAT_VERSION}"
            )

    def records(self) -> Iterator[Record]:
        """Every operation and IRQ record, in file order (BEGIN/META/SELECT handled here)."""
        current = -1
        index = 0
        while True:
            start = self.offset
            if not self._fill(1):
                return  # no END: the writer was stopped abruptly (the caller is told)
            try:
                kind = self._byte()
                if kind == END:
                    self.ended = True
                    if self._fill(1):
                        raise self._bad("data after END")
                    return
                if kind == META:
                    self.meta = self._json(self._uvarint())
                    continue
                if kind == BEGIN:
                    current = self._begin()
                    continue
                if kind == SELECT:
                    current = self._uvarint()
                    if current not in self.streams:
                        raise self._bad(f"SELECT of UART {current}, which has no BEGIN")
                    continue
                if current < 0:
                    raise self._bad("an operation before any BEGIN")
                record = self._record(index, start, current, kind)
            except _Truncated:
                self.truncated = True
                return
            index += 1
            yield record

    def _json(self, size: int) -> dict[str, Any]:
        if size > MAX_BEGIN_BYTES:
            raise self._bad(f"a {size}-byte header record")
        try:
            value = json.loads(self._take(size))
        except ValueError as exc:
            raise self._bad("a header record that is not JSON") from exc
        if not isinstance(value, dict):
            raise self._bad("a header record that is not a JSON object")
        return value

    def _begin(self) -> int:
        uart_id = self._uvarint()
        doc = self._json(self._uvarint())
        if uart_id in self.streams or uart_id != len(self.streams):
            raise self._bad(f"BEGIN of UART {uart_id} out of order")
        name, clock, t0 = doc.get("name"), doc.get("clock"), doc.get("t0_ns")
        if not isinstance(name, str) or not isinstance(clock, str) or type(t0) is not int:
            raise self._bad("a BEGIN without name, clock and t0_ns")
        try:
            state = read_uart_section(doc.get("state"), "state")
        except CheckpointError as exc:
            raise self._bad(f"UART {name!r}: initial state: {exc}") from exc
        self.streams[uart_id] = StreamInfo(uart_id, name, clock, t0, state)
        self._last[uart_id] = t0
        return uart_id

    def _at(self, uart_id: int) -> int:
        at = self._last[uart_id] + _unzigzag(self._uvarint())
        self._last[uart_id] = at
        return at

    def _bytes(self) -> bytes:
        size = self._uvarint()
        if size > MAX_PAYLOAD_BYTES:
            raise self._bad(f"a {size}-byte payload")
        return self._take(size)

    def _record(self, index: int, start: int, uart_id: int, kind: int) -> Record:
        args: tuple[Any, ...]
        if kind <= WRITE + 7:
            at = self._at(uart_id)
            args = (kind & 7, self._byte())
            return Record(index, start, uart_id, kind & ~7, at, args)
        if kind == READ_RUN:
            offset = self._byte()
            if offset > 7:
                raise self._bad(f"READ_RUN of offset {offset}")
            at = self._at(uart_id)
            args = (offset, self._byte(), self._uvarint())
            return Record(index, start, uart_id, kind, at, args)
        if kind == IRQ:
            changes = self._uvarint()
            level = self._byte()
            if not changes or level > 1:
                raise self._bad("an IRQ record of no change or a level other than 0/1")
            return Record(index, start, uart_id, kind, None, (changes, bool(level)))
        if kind not in _OPS_WITH_DT:
            raise self._bad(f"unknown record kind {kind:#04x}")
        at = self._at(uart_id)
        if kind in (RECEIVE, TX_SENT):
            args = (self._bytes(),)
        elif kind in (LINE_ERROR, MODEM):
            args = (self._byte(),)
        else:
            args = ()
        return Record(index, start, uart_id, kind, at, args)


class _Truncated(Exception):
    """The file ended inside a record."""


# -- replaying ----------------------------------------------------------------------------


@dataclass(slots=True)
class StreamReport:
    """What a replay of one UART did."""

    name: str
    clock: str
    pace: Pace
    operations: int = 0
    reads: int = 0
    irq_edges: int = 0
    tx_bytes: int = 0
    rx_bytes: int = 0
    first_ns: int = 0
    last_ns: int = 0


@dataclass(slots=True)
class ReplayReport:
    """The outcome of a replay: per UART what ran, and the first divergence (None: none)."""

    path: str
    streams: dict[int, StreamReport] = field(default_factory=dict)
    records: int = 0
    divergence: str | None = None
    ended: bool = False
    truncated: bool = False

    @property
    def identical(self) -> bool:
        """Every record replayed gave what the recording saw."""
        return self.divergence is None


class _Clock:
    __slots__ = ("now_ns",)

    def __init__(self, now_ns: int) -> None:
        self.now_ns = now_ns

    def __call__(self) -> int:
        return self.now_ns


Printer = Callable[[str], None]


def replay(path: str | Path, *, emit: Printer | None = None) -> ReplayReport:
    """Re-run every UART of the recording at ``path`` on a fresh model and compare.

    ``emit(line)``, if given, sees one line per record replayed (register reads with their
    values, writes, IRQ edges, bytes in and out, ticks). Stops at the first divergence
    (``report.divergence``). ``RecordingError`` (65; 66 for a missing file) if the file is
    not a recording.
    """
    path = Path(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, after the generator is done
    except OSError as exc:
        raise RecordingError(
            f"{path}: cannot open the recording: {exc.strerror or exc}", exit_code=EX_NOINPUT
        ) from exc
    with f:
        return _replay(_Reader(f, str(path)), str(path), emit)


def _replay(reader: _Reader, source: str, emit: Printer | None) -> ReplayReport:
    reader.header()
    report = ReplayReport(path=source)
    uarts: dict[int, tuple[Uart16550, _Clock, StreamReport]] = {}
    expect_irq: tuple[int, int, bool] | None = None  # (uart id, changes, level) still due

    def device(uart_id: int) -> tuple[Uart16550, _Clock, StreamReport]:
        entry = uarts.get(uart_id)
        if entry is None:
            info = reader.streams[uart_id]
            clock = _Clock(info.t0_ns)
            uart = Uart16550.from_state(info.state, clock=clock)
            stats = StreamReport(info.name, info.clock, info.state.pace, first_ns=info.t0_ns,
                                 last_ns=info.t0_ns)
            entry = (uart, clock, stats)
            uarts[uart_id] = entry
            report.streams[uart_id] = stats
        return entry

    def diverge(record: Record, what: str) -> ReplayReport:
        name = reader.streams[record.uart_id].name
        when = "" if record.at_ns is None else (
            f", t+{(record.at_ns - reader.streams[record.uart_id].t0_ns) / 1e9:.9f} s"
        )
        where = f"byte {record.offset_bytes}, {name}{when}"
        report.divergence = f"record {record.index} ({where}): {what}"
        return report

    for record in reader.records():
        report.records += 1
        uart, clock, stats = device(record.uart_id)
        if record.kind == IRQ:
            changes, level = record.args
            if expect_irq != (record.uart_id, changes, level):
                got = "none" if expect_irq is None else f"{expect_irq[1]} to {int(expect_irq[2])}"
                return diverge(record, f"IRQ: recorded {changes} edge(s) to {int(level)}, "
                                       f"replayed {got}")
            expect_irq = None
            stats.irq_edges += changes
            if emit is not None:
                more = f" ({changes} edges)" if changes > 1 else ""
                emit(f"{stats.name} IRQ {int(level)}{more}")
            continue
        if expect_irq is not None:
            return diverge(record, f"the replay raised {expect_irq[1]} IRQ edge(s) to "
                                   f"{int(expect_irq[2])} that the recording did not see")
        assert record.at_ns is not None
        clock.now_ns = record.at_ns
        stats.last_ns = record.at_ns
        stats.operations += 1
        edges = uart.irq_edges
        problem = _apply(uart, record, stats, emit)
        if problem is not None:
            return diverge(record, problem)
        if uart.irq_edges != edges:
            expect_irq = (record.uart_id, uart.irq_edges - edges, uart.irq)
    report.ended = reader.ended
    report.truncated = reader.truncated
    if expect_irq is not None and reader.ended:
        report.divergence = (
            f"at the end: the replay raised {expect_irq[1]} IRQ edge(s) the recording did not see"
        )
    for uart_id in reader.streams:
        device(uart_id)
    return report


def _apply(
    uart: Uart16550, record: Record, stats: StreamReport, emit: Printer | None
) -> str | None:
    """Replay one operation; a description of the divergence, or None."""
    kind, args = record.kind, record.args
    name = stats.name
    if kind == READ:
        offset, expected = args
        value = uart.read(offset)
        stats.reads += 1
        if emit is not None:
            emit(f"{name} {record.at_ns} READ {_NAMES[offset]} {value:#04x}")
        if value != expected:
            return f"READ {_NAMES[offset]}: recorded {expected:#04x}, replayed {value:#04x}"
        return None
    if kind == READ_RUN:
        offset, expected, count = args
        for i in range(count):
            value = uart.read(offset)
            if value != expected:
                return (f"READ {_NAMES[offset]} ({i + 1} of {count} alike): recorded "
                        f"{expected:#04x}, replayed {value:#04x}")
        stats.reads += count
        if emit is not None:
            emit(f"{name} {record.at_ns} READ {_NAMES[offset]} {expected:#04x} x{count}")
        return None
    if kind == WRITE:
        offset, value = args
        uart.write(offset, value)
        if emit is not None:
            emit(f"{name} {record.at_ns} WRITE {_WRITE_NAMES[offset]} {value:#04x}")
        return None
    if kind == RECEIVE:
        (data,) = args
        n = uart.receive(data)
        stats.rx_bytes += n
        if emit is not None:
            emit(f"{name} {record.at_ns} RX {data.hex()}")
        if n != len(data):
            return f"RECEIVE: the recorded device took {len(data)} bytes, the replayed {n}"
        return None
    if kind == TX_SENT:
        (data,) = args
        pending = uart.tx_pending()
        if pending[: len(data)] != data:
            return f"TX: recorded {data.hex() or '(none)'}, replayed {pending.hex() or '(none)'}"
        uart.tx_sent(len(data))
        stats.tx_bytes += len(data)
        if emit is not None:
            emit(f"{name} {record.at_ns} TX {data.hex()}")
        return None
    if kind == TX_BLOCKED:
        if not uart.tx_pending():
            return "TX_BLOCKED: the replayed device offers no byte"
        uart.tx_blocked()
    elif kind == BREAK:
        uart.receive_break()
    elif kind == LINE_ERROR:
        (bits,) = args
        uart.receive_line_error(parity=bool(bits & 1), framing=bool(bits & 2))
    elif kind == MODEM:
        (levels,) = args
        uart.set_modem_inputs(cts=bool(levels & 1), dsr=bool(levels & 2), ri=bool(levels & 4),
                              dcd=bool(levels & 8))
    elif kind == POLL:
        uart.poll()
    elif kind == RESET:
        uart.reset()
    if emit is not None:
        emit(f"{name} {record.at_ns} {_KIND_NAMES[kind]}" + (f" {args[0]:#04x}" if args else ""))
    return None


_KIND_NAMES = {TX_BLOCKED: "TX_BLOCKED", BREAK: "BREAK", LINE_ERROR: "LINE_ERROR",
               MODEM: "MODEM", POLL: "POLL", RESET: "RESET"}


def format_report(report: ReplayReport) -> str:
    """The summary ``uartbridge replay`` prints."""
    lines = []
    for stats in report.streams.values():
        span_s = (stats.last_ns - stats.first_ns) / 1e9
        lines.append(
            f"{stats.name}: {stats.operations} operations over {span_s:.6f} s of device time "
            f"(clock {stats.clock}, pace {stats.pace}): {stats.reads} register reads, "
            f"{stats.irq_edges} IRQ edges, {stats.tx_bytes} bytes sent, {stats.rx_bytes} "
            "bytes received"
        )
    if report.divergence is not None:
        lines.append(f"DIVERGED at {report.divergence}")
    else:
        lines.append(f"identical: {report.records} records replayed as recorded")
    if report.truncated:
        lines.append("note: the file ends inside a record (the recorder was killed?)")
    elif not report.ended:
        lines.append("note: the recording has no END record (it was not closed)")
    return "\n".join(lines)


def replay_command(args: Any) -> int:
    """``uartbridge replay FILE [--print]``: 0 identical, 1 diverged, 65 bad file, 66 missing."""
    out: IO[str] = sys.stdout
    emit: Printer | None = None
    if getattr(args, "print", False):

        def emit(line: str) -> None:
            print(line, file=out)

    try:
        report = replay(args.file, emit=emit)
    except RecordingError as exc:
        with contextlib.suppress(OSError, ValueError):
            print(f"uartbridge: {exc}", file=sys.stderr)
        return exc.exit_code
    print(format_report(report), file=out)
    return EX_OK if report.identical else EXIT_DIVERGED


__all__ = [
    "EXIT_DIVERGED",
    "FORMAT_VERSION",
    "MAGIC",
    "RecordWriter",
    "RecordingUart",
    "ReplayReport",
    "StreamReport",
    "clock_kind",
    "format_report",
    "replay",
    "replay_command",
]
