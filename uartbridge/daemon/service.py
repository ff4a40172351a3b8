"""One UART in the daemon: the device (model, port link, timer, snapshots) plus a bus server.

The glue between the model and its port — ``settle()``, the receive-timeout timer, the
snapshot — is ``uartbridge.device.UartDevice``, shared with ``uartbridge.embed.Bridge``. This
service adds what only the daemon has: the bus server (IRQ changes are pushed to the guest,
in order, before any reply that observes them), the config, the state directory and status.

``clock = "guest"`` gives the device a ``GuestClock`` that the bus server hands to a v2
guest asking for GUEST_TIME (and lets follow the host for any other guest); ``pace`` is the
model's (a resumed device keeps the pace it was checkpointed with, as its baudbase).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..bus import BusServer
from ..bus.server import ROLE_TCP, ROLE_UNIX, ROLE_UNIX_HANDED
from ..checkpoint import Checkpoint, checkpoint_path, write_checkpoint
from ..clock import GuestClock
from ..config import UartConfig
from ..device import UartDevice
from ..errors import CheckpointError, CheckpointWriteError, exit_code_for_os_error
from ..port import PortLink
from ..port.handle import fd_identity
from ..record import RecordWriter
from ..registers import REGISTER_BITS, Lsr, decode_bits
from ..sockets import PeerCredentials
from ..uart import Uart16550
from . import sdnotify as _sdnotify
from .handover import LISTENER_NAME, HandedFds, bus_name, bus_tcp_name, port_name

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
        record: RecordWriter | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.state_dir = state_dir
        self.keep_previous = keep_previous
        self.guest_clock = GuestClock() if config.clock == "guest" else None
        self.device = UartDevice(
            config.name,
            config.port,
            baudbase=config.baudbase,
            tx_retry_limit=config.tx_retry_limit,
            pace=config.pace,
            clock=self.guest_clock,
            log=log,
            trace_file=config.trace_file,
            resume_from=resume_from,
            on_change=self._push_irq,
            record=record,
        )
        self.log = self.device.log
        self.resumed_from = resume_from
        self.resumed_path = resumed_path
        self.bus = BusServer(
            self.device.uart,
            name=config.name,
            settle=self.device.settle,
            peer_allowed=peer_allowed,
            tcp_token=config.bus_tcp_token,
            log=self.log,
            guest_clock=self.guest_clock,
        )
        if resume_from is not None and resume_from.uart.pace != config.pace:
            self.log.warning(
                "pace kept from the checkpoint",
                pace=resume_from.uart.pace,
                configured=config.pace,
            )
        # The checkpoint on disk, for ``status``: recorded when its file is in place, not when
        # its snapshot is taken (the writer thread writes it later, the device's generation
        # counts snapshots).
        self.last_checkpoint_path: Path | None = None
        # The TCP bus listeners a socket unit handed (by fd): not for the fd store.
        self._tcp_from_unit: set[int] = set()
        self.last_checkpoint_unix_ns: int | None = None
        self.last_checkpoint_generation: int | None = None

    @property
    def uart(self) -> Uart16550:
        """The register model."""
        return self.device.uart

    @property
    def link(self) -> PortLink:
        """The port link."""
        return self.device.link

    @property
    def port_open(self) -> bool:
        """Whether the port link is open."""
        return self.device.port_open

    def _push_irq(self, levels: list[bool]) -> None:
        """The port link or the timer changed the device: push its IRQ changes to the guest
        (and, to a guest that drives time, the new deadline: so even with no change)."""
        self.bus.push_irq(levels)

    # -- life cycle -------------------------------------------------------------------------

    async def start(
        self, *, fail_fast: bool, socket_gid: int | None = None, handed: HandedFds | None = None
    ) -> None:
        """Open the port (or keep trying in the background) and listen on the bus.

        ``socket_gid`` (``socket_group``) gets the bus socket and our pty's slave, mode 0660;
        without one the slave is 0600 (the tty layer hands it out 0620, group tty).
        ``handed``: descriptors the previous run left (``handover``): the bus's listening
        socket, and the port's, taken only if it is the port the resumed checkpoint names
        (``meta.port_handle``); otherwise it is closed, logged, and the path is opened.
        """
        taken = None if handed is None else handed.take_listener(
            self.config.bus_socket, name=bus_name(self.name), log=self.log)
        if taken is None:
            await self.bus.start_unix(self.config.bus_socket)
            self._share(self.config.bus_socket, socket_gid, private_mode=None)
        else:
            # Ours (our in-place restart named it bus.<uart>) or a socket unit's: that file
            # is systemd's, with the unit's SocketMode=/SocketGroup=, and stays at our stop.
            await self.bus.start_unix(self.config.bus_socket, sock=taken[0],
                                      owned=taken[1] == bus_name(self.name))
        if self.config.bus_tcp is not None:
            await self._start_tcp(handed)
        # Without fail_fast, a port that is not there yet (or in use, or not permitted) is
        # reopened by the link with backoff, and its on_disconnect policy applies meanwhile;
        # the link logs each new reason once (port.open_failed, with errno and a hint).
        port_fd = None if handed is None else self._handed_port(handed)
        self.link.on_port_fd = self._store_port_fd
        await self.device.open(retry=not fail_fast, adopt_fd=port_fd)
        if self.link.slave_path is not None:  # a link to /dev/pts/N: chown/chmod follow it
            self._share(Path(self.link.slave_path), socket_gid, private_mode=0o600)

    async def _start_tcp(self, handed: HandedFds | None) -> None:
        """The TCP bus listeners: handed over where one listens at the address (the previous
        run's, the fd store's, a socket unit's), else bound. Under systemd the ones not from
        a socket unit go to the fd store (``bus-tcp.<uart>``): across ``systemctl restart``
        the port stays bound and connections wait in its backlog."""
        assert self.config.bus_tcp is not None
        host, port = self.config.bus_tcp
        from_unit = self._tcp_from_unit

        def take(family: int, address: tuple[Any, ...]) -> socket.socket | None:
            if handed is None:
                return None
            taken = handed.take_listener((family, address), name=None, log=self.log)
            if taken is None:
                return None
            if taken[1] != bus_tcp_name(self.name):  # a socket unit's (systemd keeps it)
                from_unit.add(taken[0].fileno())
            return taken[0]

        await self.bus.start_tcp(host, port, take=take)
        if not _sdnotify.available():
            return
        name = bus_tcp_name(self.name)
        _sdnotify.remove_fd(name)
        if handed is not None:
            handed.stored.add(name)
        for sock in self.bus.tcp_sockets:
            if sock.fileno() not in from_unit:
                _sdnotify.store_fd(name, sock.fileno())

    def _handed_port(self, handed: HandedFds) -> int | None:
        """The handed-over port descriptor if the resumed checkpoint was taken with it."""
        fd = handed.take(port_name(self.name))
        if fd is None:
            return None
        expected = None if self.resumed_from is None else self.resumed_from.meta.port_handle
        actual = fd_identity(fd)
        if expected is not None and actual == expected:
            return fd
        self.log.warning(
            "port.handover_mismatch", checkpoint_handle=expected, handed_handle=actual,
            hint="the state was not taken with this descriptor; it is closed and the port's "
            "path opened instead",
        )
        with contextlib.suppress(OSError):
            os.close(fd)
        return None

    def _store_port_fd(self, fd: int | None) -> None:
        """Under systemd, keep the open port's descriptor in the fd store (``handover``)."""
        if not _sdnotify.available():
            return
        name = port_name(self.name)
        _sdnotify.remove_fd(name)
        if fd is not None:
            # An owned pty's master shows POLLHUP while no client has the slave: keep it.
            _sdnotify.store_fd(name, fd, poll=self.link.slave_path is None)

    def _share(self, path: Path, gid: int | None, *, private_mode: int | None) -> None:
        try:
            if gid is not None:
                os.chown(path, -1, gid)
                os.chmod(path, 0o660)
            elif private_mode is not None:
                os.chmod(path, private_mode)
        except OSError as exc:
            self.log.warning("socket_group not applied", path=str(path), error=exc.strerror)

    async def stop(self, *, keep: bool = False) -> None:
        """Close the bus and the port; the model's state stays as it was (``keep``: the
        next run holds the port, see ``PortLink.close``)."""
        self.link.on_port_fd = None  # what the fd store holds stays there for the next start
        await self.bus.close()
        await self.device.close(keep=keep)

    # -- checkpoints ------------------------------------------------------------------------

    def snapshot(self) -> Checkpoint:
        """The whole UART as one value, taken in one event-loop step (between bus operations)."""
        return self.device.snapshot()

    def write_checkpoint(self, ckpt: Checkpoint, *, directory: Path | None = None) -> Path:
        """Write ``ckpt`` atomically into the state directory (or ``directory``: the emergency
        one); returns the path. Only the file: safe off the event loop (the daemon's writer
        thread); ``checkpoint_saved`` records it afterwards, on the loop.

        ``CheckpointWriteError`` (exit code 73 or 74 from the errno) when the filesystem
        refuses it; the state it would have saved is still in ``ckpt`` and in the device.
        """
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
        return path

    def checkpoint_saved(self, path: Path, ckpt: Checkpoint) -> None:
        """``ckpt`` is now the state directory's checkpoint at ``path`` (for ``status``)."""
        self.last_checkpoint_path = path
        self.last_checkpoint_unix_ns = ckpt.meta.created_unix_ns
        self.last_checkpoint_generation = ckpt.meta.generation

    async def quiesce(self, *, keep_listening: bool = False) -> None:
        """Stop taking input from the port and let the OS finish what it accepted
        (``keep_listening``: the bus's listening socket stays open for the next run)."""
        await self.bus.close(keep_listening=keep_listening)
        await self.device.quiesce()

    @property
    def fd_store_slots(self) -> int:
        """How many descriptors this UART keeps in systemd's fd store: its port if a restart
        can keep it, and its TCP bus listeners but those a socket unit holds."""
        own_tcp = [s for s in self.bus.tcp_sockets if s.fileno() not in self._tcp_from_unit]
        return int(self.link.can_be_kept) + len(own_tcp)

    def handover_fds(self) -> list[tuple[str, int]]:
        """The descriptors the next run takes over, named: the open port, the bus
        listeners (a socket unit's under ``LISTENER_NAME``: the next run leaves its file)."""
        fds: list[tuple[str, int]] = []
        fd = self.link.port_fd
        if fd is not None and self.port_open:
            fds.append((port_name(self.name), fd))
        names = {ROLE_UNIX: bus_name(self.name), ROLE_UNIX_HANDED: LISTENER_NAME,
                 ROLE_TCP: bus_tcp_name(self.name)}
        for role, sock in self.bus.kept:
            unit = role == ROLE_TCP and sock.fileno() in self._tcp_from_unit
            fds.append((LISTENER_NAME if unit else names[role], sock.fileno()))
        return fds

    # -- status -----------------------------------------------------------------------------

    def _time_status(self) -> dict[str, Any]:
        """The device's clock: its reading, whether it follows the host, the next deadline."""
        deadline = self.device.next_deadline_ns
        now_ns = self.device.clock()
        return {
            "now_ns": now_ns,
            "host_time": self.device.host_time,
            "next_deadline_in_ns": None if deadline is None else max(0, deadline - now_ns),
        }

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
                "generation": self.last_checkpoint_generation,
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
            "clock": self.config.clock,
            "pace": self.uart.pace,
            "time": self._time_status(),
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

