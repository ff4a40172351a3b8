"""The port link: one host port as the wire of one ``Uart16550``.

Theory of operation
-------------------
The link owns the host port and moves bytes between it and the model with exact accounting
(DESIGN.md, rules of the byte path):

- **Transmit is eager.** ``on_events`` (called by the daemon right after every bus operation)
  writes ``uart.tx_pending()`` with one non-blocking write in the same step; ``tx_sent(k)``
  for what the OS took, and on a short write or EAGAIN ``tx_blocked()`` plus a writer on the
  loop that retries when the fd is writable. Bytes leave the model only when the OS took them.
- **Receive is bounded.** The link reads at most ``uart.can_receive()`` plus the room left in
  ``rx_backlog``; with both full the reader is off the loop, unread input stays in the
  kernel (where the pty buffer or flow control holds the peer), and ``events.rx_space``
  turns the reader back on. Every byte read is in the model or in ``rx_backlog``.
  ``rx_backlog`` refills the RX FIFO when the guest has read it empty (one ``receive`` of up
  to the trigger level, QEMU's ``can_receive``), not after every RBR read (``_refill_due``):
  the guest never sees LSR.DR fall while input waits, and the FIFO drains below the trigger
  level between refills as a chip's does when the guest reads faster than the line (its
  RDA/CTI rules apply; CTI fires if it stops reading). A reset or a new trigger level, and
  line-rate pacing, refill at once.
- **Reader states.** EAGAIN or a short write → *stalled*; a write that goes through again →
  *connected*. EOF, EIO, ENXIO, ENODEV, a closed socket → *disconnected*: the fd leaves the
  loop (no spinning), ``on_disconnect`` decides what happens to the device's bytes
  (``buffer`` → ``tx_backlog``, replayed first on reconnect; ``hold`` → back-pressure;
  ``discard`` → dropped and counted), and the path is reopened with backoff
  (``reconnect_min_s`` doubling to ``reconnect_max_s``). A pty the daemon owns (``pty:``)
  keeps its master; its clients are seen through inotify on the slave.
- **Line settings and modem lines** go through ``termios_ops.TermiosOps`` (TCSANOW, never a
  flush; refused settings are logged once, counted and shown). Modem inputs are polled every
  10 ms only while the guest enabled MSI, plus once a character time after an MCR change.
  Ports without modem ioctls (ptys, sockets, RFC 2217 here) report DSR/DCD from the
  connection (high unless disconnected) and CTS from flow (high only while connected).

What a tty gets at open
-----------------------
The path is checked and taken exclusively first (``claim``: only terminals are ports; UUCP
lock files, flock, TIOCEXCL; a port in use is refused naming its holder). Then, before
anything else, ``termios_ops.take_raw_mode``: raw (no echo, no canonical mode, no signals, no
input or output translation), HUPCL off, CLOCAL|CREAD on, the configured flow control, and
PARMRK|INPCK on serial ports (a pty never marks anything, so its PARMRK is left as found).
The escaping of the input changes only there, and the bytes the kernel queued before it are
counted and read as they are (see ``take_raw_mode`` for the race and why it is closed). Then
the line: the guest's settings if it has set the line, else 115200 8N1 (what QEMU's tty
backend sets at open); then DTR/RTS from the guest's MCR (the kernel raises both at open).

Transmit on serial ports is paced: the kernel's output queue (TIOCOUTQ) is kept at most
``_outq_limit`` bytes (64, or 5 ms of characters at high rates) and re-checked on a timer at
the character time, so the bytes the wire has not taken stay in the device, where a
checkpoint sees them. At a stop (``quiesce``), after the peer is held (RTS down / XOFF) and a
bounded drain, what the kernel still holds for output is taken back (TCOOFF, TIOCOUTQ,
TCOFLUSH: those are the last bytes written, kept in ``_tx_tail``) to the front of
``tx_backlog``, and what it holds for input is read into ``rx_backlog`` (up to the format's
bound), since the last close of a serial port discards both. Ptys keep their buffers across
closes and show TIOCOUTQ 0, so neither happens there.

Choices worth knowing:
- pyserial 3.5 flushes the input queue at open and clears PARMRK/INPCK when it configures, so
  for tty paths the link opens the fd itself (``O_RDWR|O_NOCTTY|O_NONBLOCK``) and configures
  termios through ``termios_ops``; pyserial is used for the ``rfc2217://`` handler.
- Line settings are applied once per batch of bus operations, when they changed: a change
  is queued and applied in a ``call_soon`` at the end of the batch, or at once before any byte
  is written or read, so bytes go out under the settings the guest set before them. A break
  (LCR bit 6) switched on and off again between two byte writes still reaches the port (as a
  pulse); several such switches between the same bytes count as one.
- A transmitter waiting for the port (stalled on EAGAIN, CTS low, after an XOFF, or paced)
  does not try a write per THR write: the wake-up it waits for transmits.
- A byte marked ``ff 00 X`` is reported as a parity error when the port has parity enabled,
  else as a framing error (Linux marks both alike). The byte ``X`` is then received as data.
- Breaks and line errors keep their place in the received stream (``_rx_marks``, saved in
  checkpoints with ``rx_backlog``): each reaches the model once the guest has read every
  character before it, so LSR shows it with its own character next in RBR.
- Under ``xonxoff`` the kernel's IXON is off and the link reads XON/XOFF itself; under
  ``rtscts`` it reads CTS before writing. Either way bytes the peer holds back stay in the
  device (and its checkpoint) instead of in the kernel's output buffer.

Errors: ``PortUnavailableError`` from ``open()`` when the port is not there or in use (a
retrying link logs each new reason once, with its errno, and shows it with a hint as
``last_error`` in ``status``); ``PortError`` for a path that cannot be a port; every other
``OSError`` / ``termios.error`` / ``serial.SerialException`` is mapped where it enters.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import termios
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any, Protocol
from urllib.parse import urlsplit

import serial
import structlog

from ..errors import PortError, PortUnavailableError
from ..uart import RX_LINE_BYTES, LineSettings, ModemOutputs, Uart16550, UartEvents
from .claim import Claim, adopt_tty, claim_tty, errno_name, failure_hint
from .handle import fd_identity
from .owned_pty import Inotify, OwnedPty, adopt_pty, create_pty, master_hung_up
from .rfc2217 import PortGone, Rfc2217Io, WriteInFlight
from .state import (
    MAX_RX_BACKLOG_BYTES,
    MAX_TX_BACKLOG_BYTES,
    PortCounters,
    PortSettings,
    PortState,
    ReaderState,
)
from .termios_ops import (
    TIOCM_CD,
    TIOCM_CTS,
    TIOCM_DSR,
    TIOCM_DTR,
    TIOCM_RI,
    TIOCM_RTS,
    ParmrkDecoder,
    RealTermiosOps,
    TermiosOps,
    apply_line_settings,
    nearest_baud,
    take_raw_mode,
)

_XON, _XOFF = b"\x11", b"\x13"
MSI_POLL_S = 0.010
CTS_POLL_S = 0.010  # CTS is re-read this often only while it holds the transmitter back
DRAIN_TIMEOUT_S = 5.0  # quiesce waits this long for the OS to send what it accepted
OWNED_PTY_POLL_S = 1.0
WRITE_STALL_S = 1.0
OUTQ_MIN_BYTES = 64  # at most this much in a serial port's output queue (or OUTQ_TARGET_S)
OUTQ_TARGET_S = 0.005  # ... or this much line time, at rates where 64 bytes drain in < 5 ms
PACE_MIN_S = 0.001  # the loop's timers are no finer than this (epoll's millisecond)
PACE_MAX_S = 0.05  # ... and a slow line is looked at no less often than this
TX_TAIL_BYTES = 4096  # the last bytes written to a serial port, to take back at a stop
#: What a tty gets at open until the guest has set the line (QEMU's tty backend does this).
OPEN_LINE = LineSettings(baud=115200, data_bits=8, parity="N", stop_bits=1.0, break_on=False)
_GONE_ERRNOS = frozenset(
    {errno.EIO, errno.ENXIO, errno.ENODEV, errno.EPIPE, errno.ECONNRESET, errno.EBADF,
     errno.ENOTCONN, errno.ESHUTDOWN, errno.ETIMEDOUT, errno.EHOSTUNREACH}
)


class _Io(Protocol):
    is_tty: bool
    fd: int | None

    def read(self, n: int) -> bytes: ...
    def write(self, data: bytes) -> int: ...
    def want_read(self, callback: Callable[[], None] | None) -> None: ...
    def want_write(self, callback: Callable[[], None] | None) -> None: ...
    def close(self) -> None: ...


class _FdIo:
    """A non-blocking fd on the loop: os.read / os.write, add_reader / add_writer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, *, is_tty: bool,
                 owns_fd: bool = True, sock: socket.socket | None = None) -> None:
        self._loop = loop
        self.fd: int | None = fd
        self.is_tty = is_tty
        self._owns_fd = owns_fd
        self._sock = sock
        self._reading = False
        self._writing = False

    def read(self, n: int) -> bytes:
        assert self.fd is not None
        try:
            data = os.read(self.fd, n)
        except BlockingIOError:
            raise
        except OSError as exc:
            if exc.errno in _GONE_ERRNOS:
                raise PortGone(os.strerror(exc.errno or 0)) from exc
            raise PortError(f"read failed: {exc}") from exc
        if not data:
            raise PortGone("end of file")
        return data

    def write(self, data: bytes) -> int:
        assert self.fd is not None
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            raise
        except OSError as exc:
            if exc.errno in _GONE_ERRNOS:
                raise PortGone(os.strerror(exc.errno or 0)) from exc
            raise PortError(f"write failed: {exc}") from exc

    def want_read(self, callback: Callable[[], None] | None) -> None:
        if self.fd is None:
            return
        if callback is None:
            if self._reading:
                self._loop.remove_reader(self.fd)
                self._reading = False
        else:
            self._loop.add_reader(self.fd, callback)
            self._reading = True

    def want_write(self, callback: Callable[[], None] | None) -> None:
        if self.fd is None:
            return
        if callback is None:
            if self._writing:
                self._loop.remove_writer(self.fd)
                self._writing = False
        else:
            self._loop.add_writer(self.fd, callback)
            self._writing = True

    def close(self) -> None:
        self.want_read(None)
        self.want_write(None)
        if self._owns_fd and self.fd is not None:
            if self._sock is not None:
                self._sock.close()
            else:
                with contextlib.suppress(OSError):
                    os.close(self.fd)
        self.fd = None


def _port_kind(url: str) -> str:
    if url == "pty:" or url.startswith("pty:"):
        return "pty"
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme == "rfc2217":
        return "rfc2217"
    if scheme == "socket":
        return "socket"
    if scheme:
        raise PortError(f"unsupported port URL scheme {scheme!r} in {url!r}")
    return "tty"


class PortLink:
    """One host port wired to one ``Uart16550`` (see the module docstring)."""

    def __init__(
        self,
        uart: Uart16550,
        settings: PortSettings,
        *,
        on_uart_change: Callable[[], None],
        log: structlog.typing.FilteringBoundLogger | None = None,
        termios_ops: TermiosOps | None = None,
        trace: Callable[[str, bytes], None] | None = None,
    ) -> None:
        """Bind the link to its device and settings; nothing is opened yet.

        ``termios_ops`` substitutes the termios/modem-ioctl calls (tests with a fake port).
        ``trace(direction, data)`` sees every chunk the OS took ("tx") or gave ("rx").
        """
        self._trace = trace
        self._uart = uart
        self._settings = settings
        self._on_uart_change = on_uart_change
        self._log: Any = (log or structlog.get_logger()).bind(port=settings.url)
        self._ops: TermiosOps = termios_ops or RealTermiosOps()
        self._kind = _port_kind(settings.url)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._io: _Io | None = None
        self._owned: OwnedPty | None = None
        self._inotify: Inotify | None = None
        self._state = ReaderState.DISCONNECTED
        self._rx_backlog = bytearray()
        self._rx_top = 0  # the RX FIFO's fill after the last refill (_refill_due)
        # Breaks and line errors read from the port: (backlog bytes before it, kind).
        self._rx_marks: deque[tuple[int, str]] = deque()
        self._tx_backlog = bytearray()
        self._counters: dict[str, int] = asdict(PortCounters())
        self._line: LineSettings | None = None
        self._break_on = False
        self._refused: list[str] = []
        self._refused_logged: set[str] = set()
        # (message, errno name, hint, monotonic ns) of the last error; the last open failure
        # that was logged (each new reason once, not once per retry).
        self._last_error: tuple[str, str | None, str | None, int] | None = None
        self._open_failure_logged: str | None = None
        self._decoder = ParmrkDecoder()
        self._parmrk = False
        self._claim: Claim | None = None
        self._rx_plain_left = 0  # queued before PARMRK was on: read as they are
        self._rx_window_left = 0  # queued while it was turned on (take_raw_mode)
        self._line_pending: LineSettings | None = None  # the guest's, not applied yet
        self._break_toggles = 0  # LCR.SBC changes queued since the last application
        self._line_handle: asyncio.Handle | None = None
        self._pace_handle: asyncio.TimerHandle | None = None
        self._pace_outq = 0  # the output queue at the last pacing check
        self._pace_progress_ns = 0  # when the output queue last shrank
        self._tx_tail = bytearray()  # the last bytes written to a serial port
        self._rx_left_counted = 0  # input left in the kernel at a stop, already counted
        self._has_modem_lines = False
        self._reading = False
        self._writing = False
        self._quiesced = False
        self._closed = False
        self._in_events = False
        self._reconnect_delay_s = settings.reconnect_min_s
        self._reconnect_handle: asyncio.TimerHandle | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._msi_handle: asyncio.TimerHandle | None = None
        self._refresh_handle: asyncio.TimerHandle | None = None
        self._owned_poll_handle: asyncio.TimerHandle | None = None
        self._stall_handle: asyncio.TimerHandle | None = None
        self._cts_handle: asyncio.TimerHandle | None = None
        self._soft_flow = False  # xonxoff on a tty: XON/XOFF handled here, not by IXON
        self._xoff = False  # the peer sent XOFF and no XON since
        self._opened = False
        # Called with the open port's descriptor whenever it changes (None: none open).
        self.on_port_fd: Callable[[int | None], None] | None = None
        self._reported_fd: int | None = None

    # -- public API ------------------------------------------------------------------------

    @property
    def reader_state(self) -> ReaderState:
        """Who is at the far end: connected, stalled or disconnected."""
        return self._state

    @property
    def slave_path(self) -> str | None:
        """For ``pty:``: the published link path (or /dev/pts/N without ``link_path``)."""
        return None if self._owned is None else self._owned.published_path

    def restore(self, state: PortState) -> None:
        """Before ``open()``: take back the backlogs, counters and last line settings."""
        if self._opened:
            raise PortError("restore() must come before open()")
        self._rx_backlog = bytearray(state.rx_backlog)
        self._rx_marks = deque(state.rx_marks)
        self._tx_backlog = bytearray(state.tx_backlog)
        self._counters = asdict(state.counters)
        self._line = state.line_settings
        self._decoder.resume(state.rx_escape)

    def state(self) -> PortState:
        """The host path as a checkpoint sees it (take it with ``uart.state()``)."""
        self._flush_line()
        if isinstance(self._io, Rfc2217Io):
            # Bounded by what a checkpoint may hold; the rest stays queued for the link.
            self._rx_backlog += self._io.drain(MAX_RX_BACKLOG_BYTES - len(self._rx_backlog))
        elif self._quiesced and self._serial:
            self._save_kernel_input()  # what came in since quiesce: the close would drop it
        return PortState(
            rx_backlog=bytes(self._rx_backlog),
            tx_backlog=bytes(self._tx_backlog),
            reader_state=self._state,
            line_settings=self._line,
            counters=PortCounters(**self._counters),
            rx_marks=tuple(self._rx_marks),
            rx_escape=self._decoder.partial,
        )

    def status(self) -> dict[str, object]:
        """A JSON-able picture: url, reader state, backlogs, counters, refusals, last error."""
        claim = self._claim
        return {
            "url": self._settings.url,
            "kind": self._kind,
            "slave_path": self.slave_path,
            "reader_state": str(self._state),
            "rx_backlog_bytes": len(self._rx_backlog),
            "tx_backlog_bytes": len(self._tx_backlog),
            "on_disconnect": self._settings.on_disconnect,
            "counters": dict(self._counters),
            "settings_refused": list(self._refused),
            "modem_lines": "port" if self._has_modem_lines else "synthesized",
            "held_by_peer": self._held_by_peer() if self._io is not None else None,
            "tty": None if claim is None else ("pty" if claim.pty else "serial"),
            "parmrk": self._parmrk,
            "exclusive": None if claim is None else claim.status(),
            "last_error": self.last_error(),
        }

    def last_error(self) -> dict[str, object] | None:
        """The last error: ``message`` (with the errno name), ``errno``, ``hint``, ``age_s``."""
        if self._last_error is None:
            return None
        message, name, hint, at_ns = self._last_error
        return {
            "message": message,
            "errno": name,
            "hint": hint,
            "age_s": round((time.monotonic_ns() - at_ns) / 1e9, 3),
        }

    async def open(self, *, retry: bool = False, adopt_fd: int | None = None) -> None:
        """Open the port; ``PortUnavailableError`` if it is not there.

        With ``retry``, a port that is not there yet is no error: the link starts
        disconnected (``on_disconnect`` applies to what the guest sends meanwhile) and keeps
        reopening the path with backoff, as after a disconnect.

        ``adopt_fd``: the port's descriptor handed over by the previous run (the caller has
        checked it against the checkpoint's ``port_handle``); the link owns it from now on.
        If it is not this port after all it is closed, logged, and the path is opened.
        """
        if self._opened:
            raise PortError("port link already open")
        self._loop = asyncio.get_running_loop()
        if adopt_fd is not None and self._adopt(adopt_fd):
            self._opened = True
            return
        if self._kind == "pty":
            self._open_owned_pty()
        else:
            try:
                await self._connect()
            except PortUnavailableError as exc:
                if not retry:
                    raise
                self._opened = True
                self._open_failed(exc)
                self._synthesize_modem_inputs()
                self._schedule_reconnect()
                return
        self._opened = True

    def on_events(self, events: UartEvents) -> None:
        """React to what the model did (called synchronously; never calls on_uart_change).

        The caller takes the model's events until none are left (``UartDevice.settle``), so
        what this does to the model (bytes the OS took, bytes read in) shows up there, in the
        same settle: no deferred notification (it cost a loop round, an ``epoll_wait``, per
        transmitting settle and found nothing left to do).
        """
        if self._closed or not self._opened:
            return
        self._in_events = True
        try:
            if events.line_settings is not None:
                self._queue_line(events.line_settings)
            if events.modem_outputs is not None:
                self._apply_modem_outputs(events.modem_outputs)
                self._schedule_refresh(self._uart.char_time_ns / 1e9)
            if events.msi_enabled is not None:
                self._update_msi_poll()
            if events.rx_space and self._refill_due():
                self._pump_rx()
                self._update_reading()
            if events.tx_ready and not self._tx_parked():
                self._transmit()
        finally:
            self._in_events = False

    async def quiesce(self) -> None:
        """Stop reading and writing, hold the peer back, and let the OS send what it took.

        On a serial port, then take back what the OS accepted and could not send within the
        bounded drain (to the front of ``tx_backlog``) and read what it received (into
        ``rx_backlog``): the last close of a serial port would discard both.
        """
        self._flush_line()
        self._quiesced = True
        self._set_reading(False)
        self._set_writing(False)
        self._cancel_pace()
        io = self._io
        if io is None:
            return
        fd = io.fd
        if io.is_tty and fd is not None and self._state is not ReaderState.DISCONNECTED:
            if self._settings.rtscts and self._has_modem_lines:
                with contextlib.suppress(OSError):
                    self._ops.modem_set(fd, set_bits=0, clear_bits=TIOCM_RTS)
            if self._settings.xonxoff:
                with contextlib.suppress(OSError):
                    self._ops.tcflow(fd, termios.TCIOFF)
            if self._kind == "tty":
                await self._drain(fd)
            if self._serial:
                self._reclaim_output(fd)
                self._check_transmitter(fd)
                self._save_kernel_input()
        elif isinstance(io, Rfc2217Io):
            await io.wait_writes()
            self._transmit_backlog_or_model_count(io)

    def _reclaim_output(self, fd: int) -> None:
        """Take what the kernel still holds for output back into ``tx_backlog``.

        The kernel's output queue holds the *last* bytes written (in ``_tx_tail``). Output is
        suspended first (TCOOFF: the driver stops feeding the UART), so the count taken
        before the flush holds still; what a flush cannot drop (a USB adapter's URB in
        flight) is still counted after it and is not taken back.
        """
        queued = self._os_queued(fd)
        if not queued:
            return
        tail = self._tx_tail
        if queued > len(tail) or len(self._tx_backlog) + queued > MAX_TX_BACKLOG_BYTES:
            self._log.warning(
                "port.tx_not_reclaimed", os_queued_bytes=queued, known_bytes=len(tail),
                hint="more is queued than this link wrote, or the backlog is full: left to the OS",
            )
            return
        try:
            self._ops.tcflow(fd, termios.TCOOFF)
            before = self._ops.output_queued(fd)
            self._ops.flush_output(fd)
            after = self._ops.output_queued(fd)
        except OSError as exc:
            self._error("taking back the output queue failed", exc)
            self._log.warning("port.tx_not_reclaimed", error=str(exc))
            return
        finally:
            with contextlib.suppress(OSError):
                self._ops.tcflow(fd, termios.TCOON)
        taken = max(0, min(before, len(tail)) - after)
        if taken:
            self._tx_backlog[:0] = tail[len(tail) - taken:]
            self._counters["tx_reclaimed"] += taken
            self._log.info("port.tx_reclaimed", bytes=taken, still_in_flight=after)
        tail.clear()

    def _check_transmitter(self, fd: int) -> None:
        """Warn if the UART itself still holds bytes (its FIFO): the close resets it."""
        if self._ops.transmitter_empty(fd) is False:
            self._log.warning(
                "port.transmitter_not_empty",
                hint="the UART's own FIFO still holds bytes the wire has not taken; the "
                "driver resets it at close (at most its FIFO size), so they may not arrive",
            )

    def _save_kernel_input(self) -> None:
        """Read what the kernel holds for input into ``rx_backlog``, up to the format's bound
        (``MAX_RX_BACKLOG_BYTES``); what is left beyond it is counted as dropped at stop."""
        io = self._io
        if io is None or io.fd is None:
            return
        read_before = self._counters["bytes_read"]
        room = MAX_RX_BACKLOG_BYTES - len(self._rx_backlog) - 2  # 2: a mark's tail
        while room > 0:
            try:
                raw = io.read(min(room, 65536))
            except (BlockingIOError, PortGone, PortError):
                break
            room -= len(raw)
            if self._trace is not None:
                self._trace("rx", raw)
            self._receive_raw(raw, pump=False)
        self._finish_mark(pump=False)
        saved = self._counters["bytes_read"] - read_before
        self._counters["rx_saved_at_stop"] += saved
        left = 0
        with contextlib.suppress(OSError):
            left = self._ops.input_queued(io.fd)
        if left > self._rx_left_counted:  # (state() may look again: count each byte once)
            self._counters["rx_dropped_at_stop"] += left - self._rx_left_counted
            self._rx_left_counted = left
            self._log.warning(
                "port.rx_dropped_at_stop", bytes=left, bound=MAX_RX_BACKLOG_BYTES,
                hint="more input than a checkpoint holds: the close discards the rest",
            )
        if saved:
            self._log.info("port.rx_saved_at_stop", bytes=saved)

    def _os_queued(self, fd: int) -> int | None:
        """Bytes the OS accepted and has not sent yet, or None if it cannot say."""
        try:
            return self._ops.output_queued(fd)
        except OSError:
            return None

    async def _drain(self, fd: int) -> None:
        """tcdrain, bounded by DRAIN_TIMEOUT_S: a peer holding flow control (XOFF, CTS low)
        must not hang a checkpoint. On a daemon thread, which exit never waits for."""
        loop = asyncio.get_running_loop()
        drained: asyncio.Future[None] = loop.create_future()

        def finish() -> None:
            if not drained.done():
                drained.set_result(None)

        def run() -> None:
            with contextlib.suppress(OSError):
                self._ops.tcdrain(fd)
            with contextlib.suppress(RuntimeError):  # the loop may be closed by now
                loop.call_soon_threadsafe(finish)

        threading.Thread(target=run, name="uartbridge-tcdrain", daemon=True).start()
        try:
            await asyncio.wait_for(drained, DRAIN_TIMEOUT_S)
        except TimeoutError:
            self._log.warning(
                "port.drain_timeout",
                seconds=DRAIN_TIMEOUT_S,
                os_queued_bytes=self._os_queued(fd),
                hint="the peer holds flow control; the OS keeps what it accepted",
            )

    @property
    def port_fd(self) -> int | None:
        """The open port's descriptor (an owned pty's master), or None; None for an
        ``rfc2217://`` port too (pyserial's connection cannot be handed to another run)."""
        if self._owned is not None:
            return self._owned.master_fd
        if self._io is None or isinstance(self._io, Rfc2217Io):
            return None
        return self._io.fd

    @property
    def can_be_kept(self) -> bool:
        """Whether a restart can keep this port open (its ``port_fd`` handed on): every kind
        but ``rfc2217://``, whose telnet state lives in pyserial, in this process."""
        return self._kind != "rfc2217"

    def handle_identity(self) -> str | None:
        """Which port is open (``handle.fd_identity``: a checkpoint's ``port_handle``)."""
        fd = self.port_fd
        return None if fd is None else fd_identity(fd)

    async def close(self, *, keep: bool = False) -> None:
        """Close the port and stop every timer and watch.

        ``keep``: the port goes on in the next run, which holds a copy of its descriptor: an
        owned pty's link stays (ours is closed; the pty is not, while the copy lives).
        """
        self._closed = True
        for handle in (self._reconnect_handle, self._msi_handle, self._refresh_handle,
                       self._owned_poll_handle, self._stall_handle, self._cts_handle,
                       self._line_handle):
            if handle is not None:
                handle.cancel()
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reconnect_task
        self._close_io()
        if self._inotify is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._inotify.fd)
            self._inotify.close()
            self._inotify = None
        if self._owned is not None:
            self._owned.close(keep=keep)
        self._report_fd()

    # -- notifications -----------------------------------------------------------------------

    def _notify(self) -> None:
        """The model changed: tell the daemon, unless inside on_events, whose caller takes the
        model's events until none are left (and so sees this change)."""
        if not self._in_events:
            self._on_uart_change()

    def _error(self, message: str, exc: BaseException | None = None) -> None:
        text = message if exc is None else f"{message}: {exc}"
        self._last_error = (text, errno_name(_errno_of(exc)), None, time.monotonic_ns())

    def _open_failed(self, exc: PortError) -> None:
        """The port could not be opened: shown in status; logged once per new reason."""
        err = _errno_of(exc)
        hint = failure_hint(self._settings.url, err) if self._kind == "tty" else None
        text = str(exc)
        self._last_error = (text, errno_name(err), hint, time.monotonic_ns())
        if text != self._open_failure_logged:
            self._open_failure_logged = text
            self._log.warning(
                "port.open_failed", error=text, errno=errno_name(err), hint=hint,
                retry_max_s=self._settings.reconnect_max_s,
            )

    # -- opening and reconnecting ---------------------------------------------------------------

    def _report_fd(self) -> None:
        """Tell ``on_port_fd`` when the open descriptor changed (the fd store follows it)."""
        fd = None if self._closed else self.port_fd
        if fd != self._reported_fd:
            self._reported_fd = fd
            if self.on_port_fd is not None:
                self.on_port_fd(fd)

    def _adopt(self, fd: int) -> bool:
        """Take over ``fd`` as this link's open port; False (fd closed, logged) if it is not."""
        assert self._loop is not None
        url = self._settings.url
        try:
            if self._kind == "pty":
                self._owned = adopt_pty(fd, self._settings.link_path)
                self._start_owned_pty()
            elif self._kind == "tty":
                claim = adopt_tty(fd, url, self._ops, lock_dir=self._settings.lock_dir,
                                  note=lambda text: self._log.warning("port.lock_files",
                                                                      note=text))
                self._start_tty(claim)
            elif self._kind == "socket":
                sock = socket.socket(fileno=fd)
                try:
                    sock.getpeername()
                except OSError as exc:
                    sock.detach()
                    raise PortError(f"the handed-over socket is not connected: {exc}") from exc
                sock.setblocking(False)
                self._io = _FdIo(self._loop, fd, is_tty=False, sock=sock)
                self._parmrk = False
                self._start_stream(resumed_stream=True)
            else:
                raise PortError(f"a {self._kind} port cannot be handed over")
        except (PortError, OSError) as exc:
            self._owned = None
            self._io = None
            with contextlib.suppress(OSError):
                os.close(fd)
            self._log.warning("port.handover_refused", error=str(exc),
                              hint="the handed-over descriptor is closed; opening the path")
            return False
        self._log.info("port.taken_over", handle=self.handle_identity())
        return True

    def _open_owned_pty(self) -> None:
        try:
            self._owned = create_pty(self._settings.link_path)
        except OSError as exc:
            raise PortUnavailableError(f"cannot create a pty: {exc}") from exc
        self._log.info("port.pty_created", slave=self._owned.slave_name,
                       link=self._owned.link_path)
        self._start_owned_pty()

    def _start_owned_pty(self) -> None:
        assert self._loop is not None and self._owned is not None
        master = self._owned.master_fd
        self._io = _FdIo(self._loop, master, is_tty=True, owns_fd=False)
        self._parmrk = False  # the master's own discipline is raw; PARMRK would act on the slave
        self._configure_port()
        try:
            self._inotify = Inotify(self._owned.slave_name)
            self._loop.add_reader(self._inotify.fd, self._on_inotify)
        except OSError as exc:
            self._log.warning("port.inotify_unavailable", error=str(exc))
            self._inotify = None
        self._state = ReaderState.DISCONNECTED
        self._check_owned_client()
        self._report_fd()

    def _on_inotify(self) -> None:
        if self._inotify is None:
            return
        if self._inotify.read_masks():
            self._check_owned_client()

    def _check_owned_client(self) -> None:
        """Compare the master's HUP with our state (inotify event or the 1 s fallback)."""
        if self._owned is None or self._closed:
            return
        hung_up = master_hung_up(self._owned.master_fd)
        if hung_up and self._state is not ReaderState.DISCONNECTED:
            self._lost("client closed the pty")
        elif not hung_up and self._state is ReaderState.DISCONNECTED:
            self._connected()
        if self._inotify is None and self._loop is not None:
            self._owned_poll_handle = self._loop.call_later(
                OWNED_PTY_POLL_S, self._check_owned_client
            )

    async def _connect(self) -> None:
        """Open the path or URL (not ``pty:``) and start the byte path."""
        assert self._loop is not None
        url = self._settings.url
        io: _Io
        resumed_stream = not self._opened  # a restored link continues the stream it left
        if self._kind == "tty":
            claim = claim_tty(url, self._ops, lock_dir=self._settings.lock_dir,
                              note=lambda text: self._log.warning("port.lock_files", note=text))
            self._start_tty(claim, resumed_stream=resumed_stream)
            return
        if self._kind == "socket":
            parts = urlsplit(url)
            host, port = parts.hostname or "localhost", parts.port
            if port is None:
                raise PortError(f"no port number in {url!r}")
            try:
                sock = await asyncio.wait_for(
                    self._loop.run_in_executor(
                        None, lambda: socket.create_connection((host, port), timeout=5)
                    ),
                    10,
                )
            except (OSError, TimeoutError) as exc:
                raise PortUnavailableError(f"cannot connect to {url}: {exc}") from exc
            sock.setblocking(False)
            io = _FdIo(self._loop, sock.fileno(), is_tty=False, sock=sock)
            self._parmrk = False
        else:
            try:
                io = await Rfc2217Io.open(self._loop, url)
            except (serial.SerialException, OSError, ValueError) as exc:
                raise PortUnavailableError(f"cannot open {url}: {exc}") from exc
            self._parmrk = False
        self._io = io
        self._start_stream(resumed_stream=resumed_stream)

    def _start_tty(self, claim: Claim, *, resumed_stream: bool = True) -> None:
        """Raw mode on the claimed tty (``take_raw_mode``: a handed-over one that has PARMRK
        already keeps its escaping), then the byte path."""
        assert self._loop is not None
        try:
            mode = take_raw_mode(self._ops, claim.fd, serial=not claim.pty,
                                 rtscts=self._settings.rtscts, xonxoff=self._settings.xonxoff)
        except OSError as exc:
            claim.release(self._ops)
            os.close(claim.fd)
            raise PortUnavailableError(f"cannot configure {self._settings.url}: {exc}") from exc
        self._claim = claim
        self._io = _FdIo(self._loop, claim.fd, is_tty=True)
        self._parmrk = mode.parmrk
        self._rx_plain_left = mode.plain_bytes
        self._rx_window_left = mode.window_bytes
        self._start_stream(resumed_stream=resumed_stream)

    def _start_stream(self, *, resumed_stream: bool) -> None:
        """The port is open (``self._io``): configure it and start moving bytes."""
        io = self._io
        assert io is not None
        if not (resumed_stream and self._parmrk):
            if self._decoder.partial and resumed_stream:
                self._log.warning(
                    "port.rx_escape_dropped", partial=self._decoder.partial.hex(),
                    hint="the checkpoint held half a PARMRK mark; this port's input is not escaped",
                )
            self._decoder = ParmrkDecoder()
        if self._open_failure_logged is not None:
            self._log.info("port.opened", after=self._open_failure_logged)
            self._open_failure_logged = None
        self._soft_flow = self._settings.xonxoff and io.is_tty
        self._xoff = False  # a new connection starts with the peer ready, as IXON would
        self._configure_port()
        self._connected()
        self._report_fd()

    def _configure_port(self) -> None:
        """Apply the last line settings (or the model's) and the model's modem outputs."""
        io = self._io
        if io is None:
            return
        self._has_modem_lines = False
        if io.is_tty and io.fd is not None:
            try:
                self._ops.modem_get(io.fd)
                self._has_modem_lines = True
            except OSError:
                self._has_modem_lines = False
        self._refused = []
        # The guest's line once it has set one; until then a tty path gets what QEMU's tty
        # backend sets at open. (A pty the daemon owns is its client's: left alone.)
        if self._uart.line_configured:
            line: LineSettings | None = self._uart.line_settings
        else:
            line = OPEN_LINE if self._kind == "tty" else None
        self._line = None
        self._line_pending = None
        self._break_toggles = 0
        self._break_on = False  # a port comes out of open() without a break
        if line is not None:
            self._apply_line(line)
        self._apply_modem_outputs(self._uart.modem_outputs)
        self._update_msi_poll()

    def _connected(self) -> None:
        was = self._state
        self._reconnect_delay_s = self._settings.reconnect_min_s
        if was is ReaderState.DISCONNECTED and self._opened:
            self._counters["reconnects"] += 1
            self._log.info("port.reconnected")
        self._set_state(ReaderState.CONNECTED)
        changed = self._pump_rx()
        self._update_reading()
        changed |= self._transmit()
        if changed:
            self._notify()

    def _lost(self, reason: str) -> None:
        """The reader is gone: fd off the loop, policy applies, reconnect is scheduled."""
        if self._state is ReaderState.DISCONNECTED:
            return
        self._counters["disconnects"] += 1
        self._error(f"disconnected: {reason}")
        self._log.warning("port.disconnected", reason=reason)
        self._set_reading(False)
        self._set_writing(False)
        self._cancel_stall_timer()
        if self._kind != "pty":
            self._close_io()
        self._set_state(ReaderState.DISCONNECTED)
        if self._uart.tx_pending() and self._transmit():
            self._notify()
        if self._kind != "pty":
            self._schedule_reconnect()
        elif self._inotify is None and self._owned_poll_handle is None:
            self._check_owned_client()

    def _close_io(self) -> None:
        io = self._io
        self._set_reading(False)
        self._set_writing(False)
        self._cancel_pace()
        self._io = None
        claim, self._claim = self._claim, None
        if claim is not None:
            claim.release(self._ops)  # TIOCNXCL and our lock file, before the fd goes
        if io is not None:
            io.close()
        self._tx_tail.clear()
        self._pace_outq = self._pace_progress_ns = 0
        self._rx_plain_left = self._rx_window_left = 0  # they counted that port's queue
        self._report_fd()

    def _schedule_reconnect(self) -> None:
        if self._closed or self._loop is None or self._quiesced:
            return
        delay = self._reconnect_delay_s
        self._reconnect_delay_s = min(delay * 2, self._settings.reconnect_max_s)
        self._reconnect_handle = self._loop.call_later(delay, self._start_reconnect)

    def _start_reconnect(self) -> None:
        assert self._loop is not None
        self._reconnect_handle = None
        self._reconnect_task = self._loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        try:
            await self._connect()
        except PortError as exc:
            self._open_failed(exc)
            self._schedule_reconnect()
        finally:
            self._reconnect_task = None

    # -- reader state -----------------------------------------------------------------------

    def _set_state(self, new: ReaderState) -> None:
        if new is self._state:
            return
        self._log.debug("port.reader_state", old=str(self._state), new=str(new))
        self._state = new
        if new is not ReaderState.STALLED:
            self._cancel_stall_timer()
        if not self._has_modem_lines:
            self._synthesize_modem_inputs()

    def _synthesize_modem_inputs(self) -> None:
        present = self._state is not ReaderState.DISCONNECTED
        self._uart.set_modem_inputs(
            cts=self._state is ReaderState.CONNECTED, dsr=present, ri=False, dcd=present
        )
        self._notify()

    def _cancel_stall_timer(self) -> None:
        if self._stall_handle is not None:
            self._stall_handle.cancel()
            self._stall_handle = None

    # -- transmit ---------------------------------------------------------------------------

    def _set_writing(self, on: bool) -> None:
        if on == self._writing:
            return
        io = self._io
        self._writing = on and io is not None
        if io is not None:
            io.want_write(self._on_writable if on else None)

    def _on_writable(self) -> None:
        if self._closed:
            return
        if self._transmit():
            self._notify()

    def _tx_parked(self) -> bool:
        """The transmitter waits for a wake-up that will transmit (the kernel's queue to
        drain, POLLOUT, CTS, XON): a new THR byte need not try a write of its own."""
        if self._pace_handle is not None:
            return True
        return self._state is ReaderState.STALLED and (
            self._writing or self._cts_handle is not None or self._xoff
        )

    def _transmit(self) -> bool:
        """Move bytes towards the wire; True if the model changed."""
        if self._quiesced:
            return False
        io = self._io
        if io is None or self._state is ReaderState.DISCONNECTED:
            return self._apply_disconnect_policy()
        self._flush_line()  # bytes go out under the settings the guest set before them
        uart = self._uart
        changed = False
        held_by = self._held_by_peer()
        if held_by is not None:
            # DESIGN.md, reader states: CTS low under rtscts, XOFF under xonxoff is a stalled
            # reader. Writing on would park the bytes in the kernel's buffer (a UART driver
            # takes 4 KiB while its transmitter is stopped), out of any checkpoint's sight.
            if uart.tx_pending():
                uart.tx_blocked()
                changed = True
            self._set_state(ReaderState.STALLED)
            self._set_writing(False)  # the fd stays writable: wait for CTS / XON, not POLLOUT
            if held_by == "cts":
                self._schedule_cts_poll()  # XON comes in as input and calls _transmit itself
            return changed
        try:
            # Replay the backlog first, in order, before anything newer.
            # A thread-backed port returns the count of a write that finished: start the next.
            threaded = isinstance(io, Rfc2217Io)
            while self._tx_backlog:
                room = self._pace_room(io)
                if room == 0:
                    return changed  # the kernel's queue is full enough: a timer re-checks
                chunk = bytes(self._tx_backlog[: min(65536, room or 65536)])
                k = self._write(io, chunk)
                del self._tx_backlog[:k]
                self._counters["bytes_written"] += k
                if k < len(chunk) and not (threaded and k):
                    raise BlockingIOError
            while True:
                pending = uart.tx_pending()
                if not pending:
                    self._set_writing(False)
                    self._set_state(ReaderState.CONNECTED)
                    return changed
                room = self._pace_room(io)
                if room == 0:
                    return changed
                data = pending if room is None else pending[:room]
                k = self._write(io, data)
                if k:
                    uart.tx_sent(k)
                    self._counters["bytes_written"] += k
                    changed = True
                if k < len(data) and not (threaded and k):
                    raise BlockingIOError
                if not threaded:
                    self._set_writing(False)
                    self._set_state(ReaderState.CONNECTED)
                    if room is None:
                        return changed
                    # Paced: go round, to write what the queue still has room for.
        except BlockingIOError:
            if uart.tx_pending():
                uart.tx_blocked()
                changed = True
            self._set_state(ReaderState.STALLED)
            self._set_writing(True)
            return changed
        except WriteInFlight:
            self._set_writing(True)
            self._arm_stall_timer()
            return changed
        except PortGone as exc:
            self._lost(str(exc))
            return True
        except PortError as exc:
            self._error("write failed", exc)
            self._lost(str(exc))
            return True

    # -- pacing a serial port's output queue ---------------------------------------------

    @property
    def _serial(self) -> bool:
        """The link holds a serial port (not a pty): its kernel buffers need care."""
        return self._claim is not None and not self._claim.pty and self._io is not None

    def _char_s(self) -> float:
        """One character on the port's line, in seconds (as last applied)."""
        ls = self._line or OPEN_LINE
        bits = 1 + ls.data_bits + (0 if ls.parity == "N" else 1) + (1 if ls.stop_bits == 1 else 2)
        return bits / nearest_baud(ls.baud)

    def _outq_limit(self) -> int:
        """How much the kernel's output queue may hold: a FIFO's worth, or OUTQ_TARGET_S."""
        return min(TX_TAIL_BYTES, max(OUTQ_MIN_BYTES, int(OUTQ_TARGET_S / self._char_s())))

    def _pace_room(self, io: _Io) -> int | None:
        """How much may be written now (None: no limit); 0 arms the re-check timer."""
        if not self._serial or io.fd is None:
            return None
        queued = self._os_queued(io.fd)
        if queued is None:
            return None
        now_ns = time.monotonic_ns()
        if queued < self._pace_outq or not self._pace_progress_ns:
            self._pace_progress_ns = now_ns  # the wire takes bytes
        self._pace_outq = queued
        room = self._outq_limit() - queued
        if room > 0:
            return room
        self._arm_pace(queued, now_ns)
        return 0

    def _arm_pace(self, queued: int, now_ns: int) -> None:
        """Re-check at about the time the queue is half drained (a character time at the
        least: never a spin). A queue that has not shrunk for WRITE_STALL_S is a stall."""
        if self._pace_handle is not None or self._loop is None:
            return
        char_s = self._char_s()
        half_drained_s = (queued - self._outq_limit() // 2) * char_s
        delay_s = min(PACE_MAX_S, max(PACE_MIN_S, char_s, half_drained_s))
        if now_ns - self._pace_progress_ns >= WRITE_STALL_S * 1e9:
            if self._state is not ReaderState.STALLED:
                self._set_state(ReaderState.STALLED)
                if self._uart.tx_pending():
                    self._uart.tx_blocked()
                self._notify()
            delay_s = max(delay_s, CTS_POLL_S)

        def tick() -> None:
            self._pace_handle = None
            self._on_writable()

        self._pace_handle = self._loop.call_later(delay_s, tick)

    def _cancel_pace(self) -> None:
        if self._pace_handle is not None:
            self._pace_handle.cancel()
            self._pace_handle = None

    def _held_by_peer(self) -> str | None:
        """While there is data to send: "xoff" after the peer's XOFF under ``xonxoff``, "cts"
        for CTS low under ``rtscts`` on a port with modem lines, else None."""
        cts_gate = self._settings.rtscts and self._has_modem_lines
        if not (self._xoff or cts_gate):
            return None  # the common case, decided without looking at the data
        if not (self._tx_backlog or self._uart.tx_pending()):
            return None
        if self._xoff:
            return "xoff"
        io = self._io
        if io is None or io.fd is None:
            return None
        try:
            cts = bool(self._ops.modem_get(io.fd) & TIOCM_CTS)
        except OSError:
            return None  # the write that follows reports what is wrong with the port
        return None if cts else "cts"

    def _schedule_cts_poll(self) -> None:
        if self._cts_handle is not None or self._loop is None:
            return

        def tick() -> None:
            self._cts_handle = None
            self._on_writable()

        self._cts_handle = self._loop.call_later(CTS_POLL_S, tick)

    def _write(self, io: _Io, data: bytes) -> int:
        try:
            k = io.write(data)
        except BlockingIOError:
            return 0
        if k and self._trace is not None:
            self._trace("tx", data[:k])
        if k and self._serial:
            # What the kernel holds is the last bytes written: keep them to take back.
            tail = self._tx_tail
            tail += data[:k]
            if len(tail) > TX_TAIL_BYTES:
                del tail[: len(tail) - TX_TAIL_BYTES]
            self._pace_outq += k
        return k

    def _transmit_backlog_or_model_count(self, io: Rfc2217Io) -> None:
        """After an RFC 2217 write returned: account for it without starting another."""
        k = io.take_result()
        if k is None:
            return
        self._counters["bytes_written"] += k
        if self._tx_backlog:
            if k and self._trace is not None:
                self._trace("tx", bytes(self._tx_backlog[:k]))
            del self._tx_backlog[:k]
        elif k:
            if self._trace is not None:
                self._trace("tx", self._uart.tx_pending()[:k])
            self._uart.tx_sent(k)
            self._notify()

    def _arm_stall_timer(self) -> None:
        """A thread write that has not returned after WRITE_STALL_S means a stalled reader."""
        if self._stall_handle is not None or self._loop is None:
            return

        def fire() -> None:
            self._stall_handle = None
            io = self._io
            if isinstance(io, Rfc2217Io) and io.write_in_flight:
                self._set_state(ReaderState.STALLED)
                if self._uart.tx_pending():
                    self._uart.tx_blocked()
                self._notify()

        self._stall_handle = self._loop.call_later(WRITE_STALL_S, fire)

    def _apply_disconnect_policy(self) -> bool:
        uart = self._uart
        pending = uart.tx_pending()
        if not pending:
            return False
        policy = self._settings.on_disconnect
        if policy == "discard":
            uart.tx_sent(len(pending))
            self._counters["bytes_discarded"] += len(pending)
        elif policy == "hold":
            uart.tx_blocked()
        else:
            room = max(0, self._settings.backlog_bytes - len(self._tx_backlog))
            k = min(room, len(pending))
            if k:
                self._tx_backlog += pending[:k]
                uart.tx_sent(k)
            if k < len(pending):
                uart.tx_blocked()
        return True

    # -- receive ------------------------------------------------------------------------------

    def _set_reading(self, on: bool) -> None:
        if on == self._reading:
            return
        io = self._io
        self._reading = on and io is not None
        if io is not None:
            io.want_read(self._on_readable if on else None)

    def _rx_room(self) -> int:
        # A mark counts as a byte: a peer sending nothing but breaks is bounded too.
        waiting = len(self._rx_backlog) + len(self._rx_marks)
        return self._uart.can_receive() + max(0, self._settings.rx_backlog_bytes - waiting)

    def _update_reading(self) -> None:
        # Hysteresis: once the reader is off for lack of room, it comes back when half the
        # backlog is free, not for every RBR read (each toggle is two epoll_ctl calls and a
        # tiny read). Reads are still bounded by the room there is.
        need = 1 if self._reading else max(1, self._settings.rx_backlog_bytes // 2)
        want = (
            self._io is not None
            and not self._quiesced
            and not self._closed
            and self._state is not ReaderState.DISCONNECTED
            and self._rx_room() >= need
        )
        self._set_reading(want)

    def _refill_due(self) -> bool:
        """After ``rx_space``: refill the RX FIFO now, or wait until the guest read it empty.

        It waits only in the steady state of a guest reading RBR: the FIFO holds bytes and the
        model would take back exactly what was read since the last refill (its fill plus
        ``can_receive()`` is the level that refill left). Then the next refill, at empty,
        is one ``receive`` of up to the trigger level instead of one byte per RBR read (see
        "Receive is bounded"). Anything else — the FIFO empty, a reset or a new trigger
        level, loopback bytes, line-rate pacing (whose line must not run dry) — refills now.
        """
        uart = self._uart
        count = uart.rx_count()
        if not count or uart.pace == "line":
            return True
        return count + uart.can_receive() != self._rx_top

    def _pump_rx(self) -> bool:
        """Move rx_backlog into the model as far as it takes; True if anything moved.

        A break or line error read from the port waits at its place in the stream until the
        guest has read every character before it, so that it reaches LSR with its own
        character at the head of the FIFO (the chip keeps error bits per FIFO entry, the model
        like QEMU only in LSR): the guest's LSR-then-RBR read pairs them as a 16550 would.
        """
        moved = False
        uart = self._uart
        marks = self._rx_marks
        backlog = self._rx_backlog
        while True:
            if marks and marks[0][0] == 0:
                if uart.rx_count():
                    break
                self._apply_rx_mark(marks.popleft()[1])
                moved = True
                continue
            if not backlog:
                break
            # All the model takes (receive_many: QEMU's trigger-level rule, one call), asked
            # first, so a full FIFO costs no copy; never past the next mark.
            if not uart.can_receive():
                break
            limit = min(RX_LINE_BYTES, marks[0][0]) if marks else RX_LINE_BYTES
            n = uart.receive_many(bytes(backlog[:limit]))
            if not n:
                break
            del backlog[:n]
            if marks:
                for i, (position, kind) in enumerate(marks):
                    marks[i] = (position - n, kind)
            moved = True
        self._rx_top = uart.rx_count()
        return moved

    def _apply_rx_mark(self, kind: str) -> None:
        if kind == "break":
            self._uart.receive_break()
        else:
            self._uart.receive_line_error(parity=kind == "parity", framing=kind == "framing")

    def _on_readable(self) -> None:
        if self._closed or self._io is None:
            return
        self._flush_line()  # bytes are read under the settings the guest set before
        changed = self._pump_rx()
        room = self._rx_room()
        if room <= 0:
            self._set_reading(False)
            if changed:
                self._notify()
            return
        try:
            raw = self._io.read(room)
        except BlockingIOError:
            raw = b""
        except PortGone as exc:
            self._lost(str(exc))
            return
        except PortError as exc:
            self._error("read failed", exc)
            self._lost(str(exc))
            return
        if raw:
            if self._trace is not None:
                self._trace("rx", raw)
            changed |= self._receive_raw(raw)
            changed |= self._finish_mark()
            if self._io is None:
                return  # the mark's rest found the port gone
        self._update_reading()
        if changed:
            self._notify()

    def _take_flow_chars(self, data: bytes) -> bytes:
        """Under ``xonxoff``, as the kernel's IXON would but in sight of a checkpoint: XOFF
        (DC3) holds the transmitter, XON (DC1) lets it go; neither is data for the guest."""
        last = max(data.rfind(_XOFF), data.rfind(_XON))
        if last < 0:
            return data
        xoff = data[last] == _XOFF[0]
        if xoff != self._xoff:
            self._xoff = xoff
            self._log.debug("port.flow", xoff=xoff)
            if not xoff and self._loop is not None:
                # Transmit again in a step of its own: we are inside the port's reader.
                self._loop.call_soon(self._on_writable)
        return data.replace(_XON, b"").replace(_XOFF, b"")

    def _finish_mark(self, *, pump: bool = True) -> bool:
        """A read that ended inside a PARMRK mark reads its rest at once (1 or 2 bytes).

        The kernel queues a mark whole and makes it readable whole (n_tty commits after each
        chunk it received), so the rest is there; reading it keeps the link from ever
        standing inside a mark between two events (a checkpoint then has no half mark to
        save, though ``rx_escape`` could carry one).
        """
        changed = False
        for _ in range(2):
            io = self._io
            if io is None or not (self._parmrk and self._decoder.partial):
                break
            try:
                raw = io.read(1)
            except BlockingIOError:
                break
            except PortGone as exc:
                self._lost(str(exc))
                return True
            except PortError as exc:
                self._error("read failed", exc)
                self._lost(str(exc))
                return True
            if self._trace is not None:
                self._trace("rx", raw)
            changed |= self._receive_raw(raw, pump=pump)
        return changed

    def _take_data(self, value: bytes) -> None:
        if self._soft_flow:  # after PARMRK decoding: ff 00 13 is an error, not XOFF
            value = self._take_flow_chars(value)
        self._rx_backlog += value
        self._counters["bytes_read"] += len(value)

    def _receive_raw(self, raw: bytes, *, pump: bool = True) -> bool:
        """Decode bytes read from the port into rx_backlog (and its marks), each under the
        mode it was queued in (``take_raw_mode``); with ``pump``, feed the model."""
        if self._rx_plain_left:
            k = min(len(raw), self._rx_plain_left)
            self._rx_plain_left -= k
            self._take_data(raw[:k])  # queued before PARMRK was on: nothing is escaped
            raw = raw[k:]
        if raw and self._rx_window_left:
            k = min(len(raw), self._rx_window_left)
            self._rx_window_left -= k
            if 0xFF in raw[:k]:
                # Queued while PARMRK was turned on, on either side of it: read as escaped,
                # which is exact unless a 0xFF among them came in just before.
                self._counters["rx_escape_uncertain"] += k
                self._log.warning("port.rx_escape_uncertain", bytes=k)
        if not raw:
            pass
        elif not self._parmrk:
            self._take_data(raw)
        else:
            parity_on = self._line is not None and self._line.parity != "N"
            backlog = self._rx_backlog
            for kind, value in self._decoder.feed(raw):
                if kind == "data":
                    assert isinstance(value, bytes)
                    self._take_data(value)
                elif kind == "break":
                    self._rx_marks.append((len(backlog), "break"))
                    self._counters["breaks_received"] += 1
                else:
                    assert isinstance(value, int)
                    # PARMRK does not say which error: parity if the line has parity, else
                    # framing.
                    error = "parity" if parity_on else "framing"
                    self._rx_marks.append((len(backlog), error))
                    self._counters[f"{error}_errors"] += 1
                    backlog.append(value)
                    self._counters["bytes_read"] += 1
        if pump:
            self._pump_rx()
        return True

    # -- line settings and modem lines ----------------------------------------------------------

    def _queue_line(self, ls: LineSettings) -> None:
        """The guest changed the line: apply it at the end of this batch of bus operations
        (or before the next byte goes out or comes in), once, however often it changed."""
        last_break = self._break_on if self._line_pending is None else self._line_pending.break_on
        if ls.break_on != last_break:
            self._break_toggles += 1
        self._line_pending = ls
        if self._line_handle is None and self._loop is not None:
            self._line_handle = self._loop.call_soon(self._flush_line_soon)

    def _flush_line_soon(self) -> None:
        self._line_handle = None
        if not self._closed:
            self._flush_line()

    def _flush_line(self) -> None:
        """Apply the queued line settings, if any (see ``_queue_line``)."""
        ls = self._line_pending
        if ls is None:
            return
        self._line_pending = None
        # A break switched on and off again (or off and on) between two bytes: a pulse.
        pulse = self._break_toggles >= 2 and ls.break_on == self._break_on
        self._break_toggles = 0
        self._apply_line(ls, pulse=pulse)

    def _apply_line(self, ls: LineSettings, *, pulse: bool = False) -> None:
        io = self._io
        plain = replace(ls, break_on=False)
        if io is not None and (self._line is None or replace(self._line, break_on=False) != plain):
            refused: list[str] = []
            try:
                if isinstance(io, Rfc2217Io):
                    fut = io.run_blocking(
                        lambda: io.apply_line_settings(ls, nearest_baud(ls.baud))
                    )
                    fut.add_done_callback(self._line_refused_done)
                elif io.is_tty and io.fd is not None:
                    refused = apply_line_settings(
                        self._ops, io.fd, ls, parmrk=self._parmrk,
                        rtscts=self._settings.rtscts, xonxoff=self._settings.xonxoff,
                    )
            except (OSError, serial.SerialException) as exc:
                self._error("line settings failed", exc)
                self._log.warning("port.line_settings_failed", error=str(exc))
            self._record_refused(refused)
        if io is not None and (pulse or ls.break_on != self._break_on):
            levels = (not ls.break_on, ls.break_on) if pulse else (ls.break_on,)
            for on in levels:
                self._set_break(io, on)
            self._break_on = ls.break_on
        self._line = ls

    def _set_break(self, io: _Io, on: bool) -> None:
        try:
            if isinstance(io, Rfc2217Io):
                io.run_blocking(lambda: io.set_break(on))
            elif io.is_tty and io.fd is not None:
                self._ops.set_break(io.fd, on)
        except (OSError, serial.SerialException) as exc:
            self._error("break failed", exc)

    def _line_refused_done(self, fut: asyncio.Future[list[str]]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self._error("line settings failed", exc)
            return
        self._record_refused(fut.result())

    def _record_refused(self, refused: list[str]) -> None:
        self._refused = refused
        for item in refused:
            self._counters["settings_refused"] += 1
            if item not in self._refused_logged:
                self._refused_logged.add(item)
                self._log.warning("port.setting_refused", setting=item)

    def _apply_modem_outputs(self, out: ModemOutputs) -> None:
        io = self._io
        if io is None:
            return
        if isinstance(io, Rfc2217Io):
            io.run_blocking(lambda: io.set_modem(dtr=out.dtr, rts=out.rts))
            return
        if not self._has_modem_lines or io.fd is None:
            return
        set_bits = (TIOCM_DTR if out.dtr else 0) | (TIOCM_RTS if out.rts else 0)
        clear_bits = (TIOCM_DTR | TIOCM_RTS) & ~set_bits
        try:
            self._ops.modem_set(io.fd, set_bits=set_bits, clear_bits=clear_bits)
        except OSError as exc:
            self._error("modem outputs failed", exc)

    def _refresh_modem_inputs(self) -> None:
        io = self._io
        if not self._has_modem_lines or io is None or io.fd is None:
            return
        try:
            bits = self._ops.modem_get(io.fd)
        except OSError as exc:
            self._error("modem inputs failed", exc)
            return
        cts = bool(bits & TIOCM_CTS)
        self._uart.set_modem_inputs(
            cts=cts, dsr=bool(bits & TIOCM_DSR), ri=bool(bits & TIOCM_RI),
            dcd=bool(bits & TIOCM_CD),
        )
        if self._settings.rtscts and self._state is not ReaderState.DISCONNECTED:
            self._transmit()  # CTS gates the transmitter (_held_by_peer)
        self._notify()

    def _schedule_refresh(self, delay_s: float) -> None:
        if self._loop is None or not self._has_modem_lines:
            return
        if self._refresh_handle is not None:
            self._refresh_handle.cancel()

        def run() -> None:
            self._refresh_handle = None
            self._refresh_modem_inputs()

        self._refresh_handle = self._loop.call_later(delay_s, run)

    def _update_msi_poll(self) -> None:
        if self._loop is None:
            return
        want = self._has_modem_lines and self._uart.msi_enabled and not self._closed
        if want and self._msi_handle is None:
            self._msi_handle = self._loop.call_later(MSI_POLL_S, self._msi_tick)
        elif not want and self._msi_handle is not None:
            self._msi_handle.cancel()
            self._msi_handle = None

    def _msi_tick(self) -> None:
        self._msi_handle = None
        self._refresh_modem_inputs()
        self._update_msi_poll()


def _errno_of(exc: BaseException | None) -> int | None:
    """The errno of ``exc`` or of the OSError it was raised from, if any."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        exc = exc.__cause__
    return None


__all__ = ["PortLink"]
