"""One UART and its wire, without a bus: the model, its port link, the timer and snapshots.

This is the glue between the pure model (``Uart16550``) and its host port (``PortLink``),
shared by the daemon's ``UartService`` (which adds a ``BusServer`` and the config) and by
``uartbridge.embed.Bridge`` (which an emulator drives in-process). It has one rule (DESIGN.md,
the flow of data): after anything changes the model — a register access, bytes from the port,
a timer — ``settle()`` hands the model's events to the port link (eager transmit, line
settings, modem lines) until there are none left, and returns the IRQ level changes in order,
so the caller can deliver them before anything that observes them.

Who calls what:

- the owner of the register interface calls ``settle()`` after each access (or burst);
- the port link calls ``on_uart_change()`` when it changed the model (input, TX accepted,
  reconnect) from an event of its own, and so does the receive-timeout timer; both settle and
  hand the IRQ changes to ``on_change`` (possibly an empty list: the device changed without an
  IRQ edge). What the link does inside ``settle()`` (a transmit the OS takes at once) it does
  not report: ``settle()`` goes on taking the model's events and sees it there.

Everything runs on the thread of the event loop ``open()`` ran on; ``settle()`` may be called
while that loop is not running (an emulator between two ``Bridge.poll`` calls): the link's
writes happen at once, and what it schedules on the loop runs when the loop next runs.

The clock: by default the host's monotonic clock, and the model's timers (receive timeout,
line-rate pacing) run on the event loop at their deadlines. With any other ``clock`` (a
``GuestClock``, or an emulator's own) time is the guest's: no timer runs on the loop, and the
owner calls ``run_timers()`` when the guest's time reaches ``next_deadline_ns`` (or later: a
timer run late gives the same device). A ``GuestClock`` that follows the host meanwhile (a
guest that does not drive time, on the bus) has its timers run on the loop again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__
from .checkpoint import Checkpoint, CheckpointMeta, restore
from .clock import GuestClock
from .logs import TraceFile, get_logger
from .names import NAME_RULE, is_safe_name
from .port import PortLink
from .port.state import PortSettings
from .port.termios_ops import TermiosOps
from .record import RecordingUart, RecordWriter, clock_kind
from .uart import NO_EVENTS, Clock, Pace, Uart16550

NS_PER_S = 1_000_000_000


class UartDevice:
    """One UART: its model, its port link, its receive-timeout timer and its snapshots."""

    def __init__(
        self,
        name: str,
        port: PortSettings,
        *,
        baudbase: int = 115200,
        tx_retry_limit: int | None = None,
        pace: Pace = "none",
        clock: Clock | None = None,
        log: Any = None,
        trace_file: str | Path | None = None,
        termios_ops: TermiosOps | None = None,
        resume_from: Checkpoint | None = None,
        on_change: Callable[[list[bool]], None] | None = None,
        record: RecordWriter | None = None,
    ) -> None:
        """Build the device (resumed from ``resume_from`` if given); nothing is opened yet.

        ``baudbase``, ``tx_retry_limit`` and ``pace`` apply to a new device only (a resumed
        one has its own). ``clock`` is the model's (default: the host's monotonic clock);
        another one is the guest's time (see the module docstring). ``on_change(levels)``
        is called after the port link or the timer changed the model, with the IRQ level
        changes in order (maybe none). ``termios_ops``
        substitutes the termios/modem calls (tests with a fake port, as ``PortLink``).
        ``record``: every input operation of the model goes to this recording, from the
        device's state now (``uartbridge.record``).
        """
        if not is_safe_name(name):
            raise ValueError(f"UART name must be {NAME_RULE}, got {name!r}")
        self.name = name
        self.settings = port
        self.log = (log if log is not None else get_logger()).bind(uart=name)
        self.clock: Clock = clock if clock is not None else time.monotonic_ns
        self._host_clock = clock is None
        model = RecordingUart if record is not None else Uart16550
        if resume_from is not None:
            self.uart = restore(resume_from, clock=self.clock, model=model)
            self.generation = resume_from.meta.generation
        else:
            self.uart = model(
                baudbase=baudbase, clock=self.clock, tx_retry_limit=tx_retry_limit, pace=pace
            )
            self.generation = 0
        if isinstance(self.uart, RecordingUart) and record is not None:
            self.uart.start_recording(record, name, clock=clock_kind(self.clock))
        self.resumed_from = resume_from
        self.on_change = on_change
        self.trace_file = TraceFile(trace_file) if trace_file else None
        self.link = PortLink(
            self.uart,
            port,
            on_uart_change=self.on_uart_change,
            log=self.log,
            termios_ops=termios_ops,
            trace=self._trace if self.trace_file is not None else None,
        )
        if resume_from is not None:
            self.link.restore(resume_from.port)
        self.port_open = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline_ns: int | None = None

    # -- the glue ---------------------------------------------------------------------------

    def settle(self) -> list[bool]:
        """Hand the model's events to the port link until none are left; return IRQ changes."""
        uart = self.uart
        events = uart.take_events()
        if events is NO_EVENTS:
            deadline_ns = uart.next_deadline_ns()
            if deadline_ns is not None:
                armed = self._timer_deadline_ns
                if armed is None or armed > deadline_ns or not self._host_clock:
                    # On the host's clock an armed timer that fires first re-arms itself.
                    self._arm_timer()
            return []  # the common case (a status poll): decided without building a list
        levels: list[bool] = []
        while events is not NO_EVENTS:
            if self.port_open:
                self.link.on_events(events)
            levels.extend(events.irq_changes)
            events = uart.take_events()
        self._arm_timer()
        return levels

    def on_uart_change(self) -> None:
        """The port link (or the timer) changed the model: settle and report the IRQ changes."""
        levels = self.settle()
        if self.on_change is not None:
            self.on_change(levels)

    @property
    def host_time(self) -> bool:
        """The model's clock runs with the host's now (its timers run on the event loop)."""
        clock = self.clock
        return self._host_clock or (isinstance(clock, GuestClock) and clock.following_host)

    @property
    def next_deadline_ns(self) -> int | None:
        """When, on the device's clock, the next timer falls due (None: no timer armed)."""
        return self.uart.next_deadline_ns()

    def run_timers(self) -> list[bool]:
        """Guest time: run the timers due at the clock's time now and settle; returns the
        IRQ level changes (the caller delivers them). ``next_deadline_ns`` is then the next."""
        self.uart.poll()
        return self.settle()

    def _arm_timer(self) -> None:
        deadline_ns = self.uart.next_deadline_ns()
        loop = self._loop
        if not self.host_time:
            self._cancel_timer()  # guest time: the guest's clock runs the timers
            return
        if deadline_ns is None or loop is None:
            return  # no deadline, or not open yet: open() settles and arms it
        armed = self._timer_deadline_ns
        if armed is not None and armed <= deadline_ns:
            return  # the armed timer fires first; it re-arms for the later deadline
        if self._timer is not None:
            self._timer.cancel()
        if self._host_clock:
            # loop.time() is time.monotonic(), the model's clock in seconds.
            self._timer = loop.call_at(deadline_ns / NS_PER_S, self._on_timer)
        else:  # a guest clock following the host: the same rate, another origin
            delay_s = max(0, deadline_ns - self.clock()) / NS_PER_S
            self._timer = loop.call_later(delay_s, self._on_timer)
        self._timer_deadline_ns = deadline_ns

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_deadline_ns = None

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_deadline_ns = None
        if not self.host_time:
            return  # the clock stopped following the host since: the guest runs the timers
        self.uart.poll()
        self.on_uart_change()

    def _trace(self, direction: str, data: bytes) -> None:
        assert self.trace_file is not None
        self.trace_file.write(direction, data, time.monotonic_ns())

    # -- life cycle -------------------------------------------------------------------------

    async def open(self, *, retry: bool = False, adopt_fd: int | None = None) -> None:
        """Open the port on the running loop; ``PortUnavailableError`` if it is not there.

        With ``retry`` a port that is not there yet is no error: the link starts
        disconnected (``on_disconnect`` applies meanwhile) and reopens it with backoff.
        ``adopt_fd``: the port's descriptor handed over by the previous run (``PortLink.open``).
        """
        self._loop = asyncio.get_running_loop()
        await self.link.open(retry=retry, adopt_fd=adopt_fd)
        self.port_open = True
        self.on_uart_change()

    async def quiesce(self) -> None:
        """Stop taking input from the port and let the OS finish what it accepted."""
        if self.port_open:
            await self.link.quiesce()

    async def close(self, *, keep: bool = False) -> None:
        """Close the port and the trace; the model's state stays as it was (``keep``: the
        next run holds the port, ``PortLink.close``)."""
        self._cancel_timer()
        if self.port_open:
            await self.link.close(keep=keep)
            self.port_open = False
        if self.trace_file is not None:
            self.trace_file.close()

    # -- checkpoints ------------------------------------------------------------------------

    def snapshot(self) -> Checkpoint:
        """The whole UART as one value: model, host path and metadata (next generation).

        Take it between two register accesses, on the loop's thread, so that it is one
        instant of the device.
        """
        self.generation += 1
        return Checkpoint(
            meta=CheckpointMeta(
                uartbridge_version=__version__,
                uart_name=self.name,
                port=self.settings.url,
                created_unix_ns=time.time_ns(),
                generation=self.generation,
                port_handle=self.link.handle_identity(),
            ),
            uart=self.uart.state(),
            port=self.link.state(),
        )


__all__ = ["UartDevice"]
