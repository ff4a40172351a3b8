"""One UART in the daemon: the model, its port link, its bus server and its checkpoints.

The glue has one rule (DESIGN.md, the flow of data): after anything changes the model —
a bus operation, bytes from the port, a timer — ``settle()`` hands the model's events to the
port link (eager transmit, line settings, modem lines) until there are none left, and returns
the IRQ level changes for the bus to push, in order, before any reply that observes them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import __version__
from ..bus import BusServer
from ..checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    CheckpointMeta,
    checkpoint_path,
    write_checkpoint,
)
from ..config import UartConfig
from ..errors import CheckpointError, CheckpointWriteError, exit_code_for_os_error
from ..logs import TraceFile
from ..port import PortLink
from ..registers import REGISTER_BITS, Lsr, decode_bits
from ..sockets import PeerCredentials
from ..uart import NO_EVENTS, Uart16550

NS_PER_S = 1_000_000_000


class UartService:
    """One configured UART: owns its model, port link and bus server."""

    def __init__(
        self,
        config: UartConfig,
        *,
        state_dir: Path,
        keep_previous: bool = True,
        log: Any,
        peer_allowed: Callable[[PeerCredentials], bool] | None = None,
        resume_from: Checkpoint | None = None,
        resumed_path: Path | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.state_dir = state_dir
        self.keep_previous = keep_previous
        self.log = log.bind(uart=config.name)
        if resume_from is not None:
            self.uart = Uart16550.from_state(resume_from.uart, clock=time.monotonic_ns)
            self.generation = resume_from.meta.generation
        else:
            self.uart = Uart16550(
                baudbase=config.baudbase,
                clock=time.monotonic_ns,
                tx_retry_limit=config.tx_retry_limit,
            )
            self.generation = 0
        self.resumed_from = resume_from
        self.resumed_path = resumed_path
        self.trace_file = TraceFile(config.trace_file) if config.trace_file else None
        self.link = PortLink(
            self.uart,
            config.port,
            on_uart_change=self.on_uart_change,
            log=self.log,
            trace=self._trace if self.trace_file is not None else None,
        )
        if resume_from is not None:
            self.link.restore(resume_from.port)
        self.bus = BusServer(
            self.uart,
            name=config.name,
            settle=self.settle,
            peer_allowed=peer_allowed,
            log=self.log,
        )
        self.last_checkpoint_path: Path | None = None
        self.last_checkpoint_unix_ns: int | None = None
        self.port_open = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline_ns: int | None = None

    # -- the glue ---------------------------------------------------------------------------

    def settle(self) -> list[bool]:
        """Hand the model's events to the port link until none are left; return IRQ changes."""
        levels: list[bool] = []
        uart = self.uart
        while (events := uart.take_events()) is not NO_EVENTS:
            if self.port_open:
                self.link.on_events(events)
            levels.extend(events.irq_changes)
        self._arm_timer()
        return levels

    def on_uart_change(self) -> None:
        """The port link (or a timer) changed the model: settle and push IRQ changes."""
        levels = self.settle()
        if levels:
            self.bus.push_irq(levels)

    def _arm_timer(self) -> None:
        deadline_ns = self.uart.next_deadline_ns()
        if deadline_ns is None:
            return
        armed = self._timer_deadline_ns
        if armed is not None and armed <= deadline_ns:
            return  # the armed timer fires first; it re-arms for the later deadline
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        # loop.time() is time.monotonic(), the model's clock in seconds.
        self._timer = loop.call_at(deadline_ns / NS_PER_S, self._on_timer)
        self._timer_deadline_ns = deadline_ns

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_deadline_ns = None
        self.uart.poll()
        self.on_uart_change()

    def _trace(self, direction: str, data: bytes) -> None:
        assert self.trace_file is not None
        self.trace_file.write(direction, data, time.monotonic_ns())

    # -- life cycle -------------------------------------------------------------------------

    async def start(self, *, fail_fast: bool, socket_gid: int | None = None) -> None:
        """Open the port (or keep trying in the background) and listen on the bus.

        ``socket_gid`` (``socket_group``) gets the bus socket and our pty's slave, mode 0660;
        without one the slave is 0600 (the tty layer hands it out 0620, group tty).
        """
        await self.bus.start_unix(self.config.bus_socket)
        self._share(self.config.bus_socket, socket_gid, private_mode=None)
        if self.config.bus_tcp is not None:
            host, port = self.config.bus_tcp
            await self.bus.start_tcp(host, port)
        # Without fail_fast, a port that is not there yet (or in use, or not permitted) is
        # reopened by the link with backoff, and its on_disconnect policy applies meanwhile;
        # the link logs each new reason once (port.open_failed, with errno and a hint).
        await self.link.open(retry=not fail_fast)
        self.port_open = True
        if self.link.slave_path is not None:  # a link to /dev/pts/N: chown/chmod follow it
            self._share(Path(self.link.slave_path), socket_gid, private_mode=0o600)
        self.on_uart_change()

    def _share(self, path: Path, gid: int | None, *, private_mode: int | None) -> None:
        try:
            if gid is not None:
                os.chown(path, -1, gid)
                os.chmod(path, 0o660)
            elif private_mode is not None:
                os.chmod(path, private_mode)
        except OSError as exc:
            self.log.warning("socket_group not applied", path=str(path), error=exc.strerror)

    async def stop(self) -> None:
        """Close the bus and the port; the model's state stays as it was."""
        if self._timer is not None:
            self._timer.cancel()
        await self.bus.close()
        if self.port_open:
            await self.link.close()
            self.port_open = False
        if self.trace_file is not None:
            self.trace_file.close()

    # -- checkpoints ------------------------------------------------------------------------

    def snapshot(self) -> Checkpoint:
        """The whole UART as one value, taken in one event-loop step (between bus operations)."""
        self.generation += 1
        return Checkpoint(
            meta=CheckpointMeta(
                format_version=FORMAT_VERSION,
                uartbridge_version=__version__,
                uart_name=self.name,
                port=self.config.port.url,
                created_unix_ns=time.time_ns(),
                generation=self.generation,
            ),
            uart=self.uart.state(),
            port=self.link.state(),
        )

    def write_checkpoint(
        self, ckpt: Checkpoint | None = None, *, directory: Path | None = None
    ) -> Path:
        """Write ``ckpt`` (default: a new snapshot) atomically into the state directory (or
        ``directory``: the emergency one); returns the path.

        ``CheckpointWriteError`` (exit code 73 or 74 from the errno) when the filesystem
        refuses it; the state it would have saved is still in ``ckpt`` and in the device.
        """
        if ckpt is None:
            ckpt = self.snapshot()
        path = checkpoint_path(directory or self.state_dir, self.name)
        try:
            write_checkpoint(path, ckpt, keep_previous=self.keep_previous and directory is None)
        except CheckpointError as exc:
            cause = exc.__cause__
            if not isinstance(cause, OSError):
                raise
            raise CheckpointWriteError(
                str(exc),
                exit_code=exit_code_for_os_error(cause),
                reason=cause.strerror or str(cause),
            ) from cause
        if directory is None:
            self.last_checkpoint_path = path
            self.last_checkpoint_unix_ns = ckpt.meta.created_unix_ns
        return path

    async def quiesce(self) -> None:
        """Stop taking input from the port and let the OS finish what it accepted."""
        await self.bus.close()
        if self.port_open:
            await self.link.quiesce()

    # -- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What ``uartbridge status`` shows for this UART."""
        state = self.uart.state()
        registers: dict[str, dict[str, Any]] = {}
        for name in ("ier", "iir", "lcr", "mcr", "lsr", "msr", "scr", "fcr"):
            value = getattr(state, name)
            registers[name] = {"value": f"{value:#04x}"}
            if name in REGISTER_BITS:
                registers[name]["bits"] = decode_bits(value, REGISTER_BITS[name])
        port_status = self.link.status()
        now_ns = time.time_ns()
        last_ckpt = None
        if self.last_checkpoint_unix_ns is not None:
            last_ckpt = {
                "path": str(self.last_checkpoint_path),
                "age_s": round((now_ns - self.last_checkpoint_unix_ns) / NS_PER_S, 3),
                "generation": self.generation,
            }
        resumed = None
        if self.resumed_from is not None:
            resumed = {
                "path": str(self.resumed_path),
                "generation": self.resumed_from.meta.generation,
                "age_s": round((now_ns - self.resumed_from.meta.created_unix_ns) / NS_PER_S, 3),
            }
        return {
            "name": self.name,
            "port": self.config.port.url,
            "port_open": self.port_open,
            "reader_state": str(self.link.reader_state) if self.port_open else "disconnected",
            "pty": self.link.slave_path,
            "bus_socket": str(self.config.bus_socket),
            "guest_connected": self.bus.guest_connected,
            "irq": self.uart.irq,
            "divisor": state.divisor,
            "line": self.uart.line_settings.summary(),
            "registers": registers,
            "rx_fifo": len(state.rx_fifo),
            "tx_fifo": len(state.tx_fifo),
            "tsr_busy": state.tsr_busy,
            "tsr_retry": state.tsr_retry,
            "temt": bool(state.lsr & Lsr.TEMT),
            "counters": dataclasses.asdict(state.statistics),
            "link": port_status,
            "last_error": port_status["last_error"],
            "last_checkpoint": last_ckpt,
            "resumed_from": resumed,
        }

