"""Embedding: a 16550A with its real port, host path and checkpoints, inside an emulator.

``Bridge`` is what an emulator written in Python (unicorn, Qiling, a cocotb bench, a
hand-written interpreter) embeds instead of the daemon: the register model, the port link
behind it (a tty, a socat pty, ``pty:``, ``rfc2217://``, ``socket://``), the lossless host
path (RX backlog, TX backlog kept while nobody reads, line events in their place) and
checkpoints in the daemon's file format (``uartbridge inspect`` reads them, and
``uartbridge resume`` could carry one on). The glue is ``uartbridge.device.UartDevice``, the
same as the daemon's.

Two ways to drive it
--------------------
- **Your own loop, no asyncio** (``open()``): the Bridge keeps a private event loop. Call
  ``poll(timeout_s)`` regularly — ``poll()`` does what is ready and returns at once;
  ``poll(0.01)`` waits up to 10 ms for the port to change the device (an idle guest). Input
  from the port reaches the model only inside ``poll``; output goes to the port as set out in
  "Posted THR writes" below.
- **asyncio** (``await aopen()``): the Bridge uses the running loop, which does the I/O by
  itself; ``await apoll(timeout_s)`` waits for a change, if you want to.

Thread rule: a Bridge is not thread-safe. Every call — ``read``, ``write``, ``poll``,
``checkpoint``, ``close`` — comes from the one thread that opened it (for asyncio: the loop's
thread). ``on_irq`` is called on that thread, inside the call that caused the change. An
emulator that runs its CPU on another thread must take its own lock around every call,
``poll`` included (then keep ``poll``'s timeout short, since it holds the lock meanwhile).

Register accesses are ``read(offset)`` / ``write(offset, value)`` with offsets 0–7 (DLAB as
on the chip: map your bus's ``reg-shift`` / ``reg-io-width`` onto them). The IRQ output is
``irq``; ``on_irq(level)`` is called for every change, in order.

Posted THR writes
-----------------
A THR write is *posted*, as on the bus (docs/bus-protocol.md, "Settling"; the one rule is
``Uart16550.write_can_post``): the byte is in the model at once (TSR, TX FIFO), and the run of
THR writes goes to the port in one ``os.write`` at the next ``read``, write to another
register, ``poll``, ``run_timers`` / ``advance_to``, ``irq``, ``next_deadline_ns``,
checkpoint or ``close`` — or before a THR write that would overwrite an unsent byte. Every
observation comes after the port had its chance, so the guest reads what it would have read
had each byte gone at once; until then LSR's THRE/TEMT and the THRE interrupt stand as on a
chip whose FIFO is still sending (its IRQ edges reach ``on_irq`` at that point). A byte is in
the model until the OS took it, so a checkpoint always sees it once. With ``aopen()`` the
posted bytes also go at the loop's next step.

Time
----
By default the device runs on the host's clock: the receive timeout (and line-rate pacing,
``pace="line"``) fire inside ``poll`` when they are due. An emulator with a virtual clock
passes ``clock=``: a ``uartbridge.clock.GuestClock`` it moves with ``advance_to(now_ns)``,
or any callable returning its own time in ns (then call ``run_timers()`` when that time
reaches ``next_deadline_ns``). Either way the device's timers fire at guest deadlines only:
``advance_to`` / ``run_timers`` return the next deadline (None: none), which the emulator
schedules as one of its own timer events; a paused guest sees no timeout. A timer run late
(the emulator advanced past the deadline in one step) leaves the device exactly as one run
on time. Checkpoints store timers as time remaining, so a checkpoint resumes in either mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

from .checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from .clock import GuestClock
from .device import UartDevice
from .errors import PortError
from .logs import get_logger
from .port.state import PortSettings, ReaderState
from .port.termios_ops import TermiosOps
from .record import RecordWriter
from .uart import Clock, Pace, Uart16550

IrqCallback = Callable[[bool], None]


def default_log() -> Any:
    """The logger a Bridge uses when given none: the application's structlog configuration
    if it made one, else warnings and errors only, on stderr (an emulator's stdout is often
    its console)."""
    if structlog.is_configured():
        return get_logger()
    return structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )


def _settings(port: str | PortSettings) -> PortSettings:
    if isinstance(port, PortSettings):
        return port
    if not isinstance(port, str) or not port:
        raise ValueError(f"port must be a URL or a PortSettings, got {port!r}")
    return PortSettings(url=port)


class Bridge:
    """One 16550A whose wire is a host port, driven from an emulator's own loop."""

    def __init__(
        self,
        port: str | PortSettings,
        *,
        name: str = "uart0",
        baudbase: int = 115200,
        tx_retry_limit: int | None = None,
        pace: Pace = "none",
        clock: Clock | None = None,
        on_irq: IrqCallback | None = None,
        log: Any = None,
        trace_file: str | Path | None = None,
        termios_ops: TermiosOps | None = None,
        resume_from: Checkpoint | None = None,
        record: str | Path | None = None,
    ) -> None:
        """A device on ``port`` (a URL such as ``"pty:"`` or ``"/dev/ttyUSB0"``, or
        ``PortSettings`` for the policies); nothing is opened until ``open()``/``aopen()``.

        ``name`` is the UART's name in checkpoints. ``on_irq(level)`` sees every IRQ change.
        ``pace="line"`` moves bytes at the line rate (default ``"none"``: QEMU's instant
        line). ``clock`` is the guest's time (module docstring, "Time"); None: the host's.
        ``log`` is a structlog logger (default: ``default_log()``); ``trace_file`` records
        every chunk to and from the port, as the daemon's ``trace_file``.
        ``termios_ops`` replaces the termios and modem calls (tests with a fake port).
        ``resume_from`` continues a checkpoint (``Bridge.resume`` reads one from a file).
        ``record`` writes every input of the device to that file (``uartbridge replay`` runs
        it again without a port; ``uartbridge.record.replay`` in-process); closed by
        ``close``.
        """
        self.on_irq = on_irq
        self.log = log if log is not None else default_log()
        self._recorder: RecordWriter | None = None
        if record is not None:
            self._recorder = RecordWriter(
                record, on_error=lambda message: self.log.error("recording stopped",
                                                                reason=message)
            )
        self._device = UartDevice(
            name,
            _settings(port),
            baudbase=baudbase,
            tx_retry_limit=tx_retry_limit,
            pace=pace,
            clock=clock,
            log=self.log,
            trace_file=trace_file,
            termios_ops=termios_ops,
            resume_from=resume_from,
            on_change=self._on_change,
            record=self._recorder,
        )
        self._uart_read = self._device.uart.read
        self._uart_write = self._device.uart.write
        self._settle = self._device.settle
        self._write_can_post = self._device.uart.write_can_post
        self._posted = False  # THR writes applied to the model, the port not given its turn
        self._own_loop: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # aopen(): the running loop
        self._async = False
        self._closed = False
        self._changed = False  # the port or the timer changed the device since the last poll
        self._waiting = False  # poll() is waiting: a change stops the private loop
        self._change_event: asyncio.Event | None = None

    @classmethod
    def resume(
        cls,
        path: str | Path,
        *,
        port: str | PortSettings | None = None,
        clock: Clock | None = None,
        on_irq: IrqCallback | None = None,
        log: Any = None,
        trace_file: str | Path | None = None,
        termios_ops: TermiosOps | None = None,
        record: str | Path | None = None,
    ) -> Bridge:
        """A Bridge that continues the checkpoint at ``path`` (not opened yet).

        The port is the checkpoint's unless ``port`` names another (a URL or settings); the
        name, the device and the host path — RX backlog, line events, TX backlog, the byte
        in the shift register — are the checkpoint's. ``CheckpointError`` (or
        ``CheckpointMissingError``) if the file is not a valid checkpoint. ``clock`` as for a
        new Bridge: the timers continue with the time they had left, on that clock.
        """
        ckpt = read_checkpoint(path)
        return cls(
            port if port is not None else ckpt.meta.port,
            name=ckpt.meta.uart_name,
            clock=clock,
            on_irq=on_irq,
            log=log,
            trace_file=trace_file,
            termios_ops=termios_ops,
            resume_from=ckpt,
            record=record,
        )

    # -- life cycle ---------------------------------------------------------------------------

    def open(self, *, retry: bool = False) -> Bridge:
        """Open the port on a private event loop (for callers without asyncio); returns self.

        ``PortUnavailableError`` if the port is not there, unless ``retry``: then the link
        starts disconnected and keeps reopening it (``on_disconnect`` applies meanwhile).
        """
        self._check_usable()
        if self._own_loop is not None or self._async:
            raise PortError("the bridge is already open")
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._device.open(retry=retry))
        except BaseException:
            loop.run_until_complete(self._device.close())
            loop.close()
            raise
        self._own_loop = loop
        return self

    async def aopen(self, *, retry: bool = False) -> Bridge:
        """Open the port on the running event loop (for asyncio callers); returns self."""
        self._check_usable()
        if self._own_loop is not None or self._async:
            raise PortError("the bridge is already open")
        self._async = True
        self._loop = asyncio.get_running_loop()
        self._change_event = asyncio.Event()
        try:
            await self._device.open(retry=retry)
        except BaseException:
            await self._device.close()
            self._async = False
            self._loop = None
            raise
        return self

    def close(self) -> None:
        """Close the port (not a checkpoint: see ``checkpoint(stop=True)``). Idempotent."""
        if self._closed:
            return
        if self._async:
            raise PortError("opened with aopen(): use await aclose()")
        self._flush()
        self._closed = True
        loop = self._own_loop
        if loop is None:
            self._close_recording()
            return
        try:
            loop.run_until_complete(self._device.close())
        finally:
            loop.close()
            self._own_loop = None
            self._close_recording()

    def _close_recording(self) -> None:
        if self._recorder is not None:
            self._recorder.close()

    async def aclose(self) -> None:
        """Close the port (asyncio). Idempotent."""
        if self._closed:
            return
        if self._own_loop is not None:
            raise PortError("opened with open(): use close()")
        self._flush()
        self._closed = True
        try:
            await self._device.close()
        finally:
            self._close_recording()

    def __enter__(self) -> Bridge:
        if self._own_loop is None:
            self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Bridge:
        if not self._async:
            await self.aopen()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _check_usable(self) -> None:
        if self._closed:
            raise PortError(f"bridge {self.name}: closed (after close() or checkpoint(stop=True))")

    # -- the emulator's side ------------------------------------------------------------------

    def read(self, offset: int) -> int:
        """Read the register at ``offset`` (0–7) with its side effects; returns 0–255."""
        if self._closed:
            self._check_usable()
        if self._posted:
            self._flush()
        value = self._uart_read(offset)
        levels = self._settle()
        if levels:
            self._deliver(levels)
        return value

    def write(self, offset: int, value: int) -> None:
        """Write ``value`` (0–255) to the register at ``offset`` (0–7). A THR write is posted
        (module docstring, "Posted THR writes"); any other write reaches the port at once."""
        if self._closed:
            self._check_usable()
        if self._write_can_post(offset):
            self._uart_write(offset, value)
            if not self._posted:
                self._posted = True
                if self._loop is not None:
                    self._loop.call_soon(self._flush)
            return
        # Not postable: the posted bytes go first, then this write, settled at once.
        if self._posted:
            self._flush()
        self._uart_write(offset, value)
        levels = self._settle()
        if levels:
            self._deliver(levels)

    def _flush(self) -> None:
        """Give the port its turn for the posted THR writes (one settle: one ``os.write``)."""
        if not self._posted:
            return
        self._posted = False
        levels = self._settle()
        if levels:
            self._deliver(levels)

    @property
    def irq(self) -> bool:
        """The level of the UART's interrupt output (after the posted writes went out)."""
        if self._posted:
            self._flush()
        return self._device.uart.irq

    @property
    def uart(self) -> Uart16550:
        """The register model itself, to look at (``state()``, ``line_settings``...).

        Change it only through the Bridge (``read``/``write``): a change made directly
        reaches the port at the next access or ``poll``.
        """
        return self._device.uart

    @property
    def name(self) -> str:
        """The UART's name (in checkpoints)."""
        return self._device.name

    @property
    def port(self) -> str:
        """The port's URL."""
        return self._device.settings.url

    @property
    def reader_state(self) -> ReaderState:
        """Who is at the far end: connected, stalled or disconnected."""
        return self._device.link.reader_state

    @property
    def pty_path(self) -> str | None:
        """For ``pty:``: the path a terminal (picocom, tio, screen) attaches to."""
        return self._device.link.slave_path

    @property
    def generation(self) -> int:
        """The generation of the last checkpoint written (or resumed from); 0 if none."""
        return self._device.generation

    def status(self) -> dict[str, object]:
        """The port link's picture: reader state, backlogs, counters, last error."""
        return self._device.link.status()

    # -- guest time ---------------------------------------------------------------------------

    @property
    def next_deadline_ns(self) -> int | None:
        """When, on the device's clock, its next timer falls due (None: no timer armed).

        With a guest clock, schedule an event of your own then and call ``advance_to`` (or
        ``run_timers``) when your time reaches it. It changes after register accesses and
        input from the port too: read it again after each, or after ``poll``.
        """
        if self._posted:
            self._flush()
        return self._device.next_deadline_ns

    def run_timers(self) -> int | None:
        """Run the device's timers due at its clock's time now (IRQ changes go to
        ``on_irq``); returns the next deadline, or None."""
        if self._closed:
            self._check_usable()
        self._flush()
        levels = self._device.run_timers()
        if levels:
            self._deliver(levels)
        return self._device.next_deadline_ns

    def advance_to(self, now_ns: int) -> int | None:
        """The guest's time is now ``now_ns`` (``clock`` must be a ``GuestClock``): the timers
        due by then run, each at its own time; returns the next deadline, or None."""
        clock = self._device.clock
        if not isinstance(clock, GuestClock):
            raise TypeError("advance_to() needs Bridge(clock=GuestClock()); use run_timers()")
        clock.set(now_ns)
        return self.run_timers()

    def _deliver(self, levels: list[bool]) -> None:
        callback = self.on_irq
        if callback is not None:
            for level in levels:
                callback(level)

    def _on_change(self, levels: list[bool]) -> None:
        """The port link or the timer changed the device (UartDevice.on_change)."""
        self._changed = True
        if levels:
            self._deliver(levels)
        if self._waiting and self._own_loop is not None:
            self._own_loop.stop()
        if self._change_event is not None:
            self._change_event.set()

    # -- driving the I/O ----------------------------------------------------------------------

    def poll(self, timeout_s: float = 0.0) -> bool:
        """Do the port's pending I/O; with ``timeout_s`` > 0, wait up to that long for input.

        Returns True if the port (or the receive-timeout timer) changed the device since the
        last ``poll``: bytes or a line event came in, the wire took bytes that waited, a
        reader came or went. Only for a Bridge opened with ``open()``.
        """
        loop = self._own_loop
        if loop is None:
            self._check_usable()
            raise PortError("poll() needs open(); with aopen() the running loop does the I/O")
        if self._posted:
            self._flush()
            self._changed = True  # the wire took bytes that waited: no wait for more
        if timeout_s > 0 and not self._changed:
            stop = loop.call_later(timeout_s, loop.stop)
            self._waiting = True
            try:
                loop.run_forever()
            finally:
                self._waiting = False
                stop.cancel()
        else:
            # One turn of the loop: what the kernel has ready now, then the callbacks due.
            loop.call_soon(loop.stop)
            loop.run_forever()
        changed, self._changed = self._changed, False
        return changed

    async def apoll(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the port to change the device (asyncio); see ``poll``."""
        event = self._change_event
        if event is None or not self._async:
            self._check_usable()
            raise PortError("apoll() needs aopen(); with open() use poll()")
        if self._posted:
            self._flush()
            self._changed = True
        if not self._changed:
            event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout_s)
        changed, self._changed = self._changed, False
        return changed

    # -- checkpoints --------------------------------------------------------------------------

    def snapshot(self) -> Checkpoint:
        """The device and its host path now, as a value (the next generation)."""
        self._flush()
        return self._device.snapshot()

    def checkpoint(
        self, path: str | Path, *, stop: bool = False, keep_previous: bool = True
    ) -> Path:
        """Write a checkpoint of the device and its host path to ``path`` (atomic, 0600).

        Take it between two register accesses. The file is the daemon's format
        (``uartbridge inspect`` reads it; ``Bridge.resume`` continues it). With ``stop``, the
        port is quiesced first — no more input is taken, what the OS accepted is sent — and
        closed after: the checkpoint is then the last word of this Bridge, as
        ``uartbridge checkpoint --stop`` is for the daemon. ``keep_previous`` keeps the file
        that was at ``path`` as ``<name>.prev.json``.
        """
        loop = self._own_loop
        self._flush()
        if stop:
            if loop is None:
                self._check_usable()
                if self._async:
                    raise PortError("opened with aopen(): use await acheckpoint()")
            else:
                loop.run_until_complete(self._device.quiesce())
        path = Path(path)
        write_checkpoint(path, self.snapshot(), keep_previous=keep_previous)
        if stop:
            self.close()
        return path

    async def acheckpoint(
        self, path: str | Path, *, stop: bool = False, keep_previous: bool = True
    ) -> Path:
        """``checkpoint`` for a Bridge opened with ``aopen()``."""
        self._flush()
        if stop:
            await self._device.quiesce()
        path = Path(path)
        write_checkpoint(path, self.snapshot(), keep_previous=keep_previous)
        if stop:
            await self.aclose()
        return path


__all__ = ["Bridge", "IrqCallback", "default_log"]
