"""Helpers for the port-link tests: a guest that drives the model, real peers (socat), and a
fake serial port (``FakeOps``) for what a pty cannot show."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
import tty
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from procs import require_program, stop_process

from uartbridge.port import PortLink
from uartbridge.port.state import PortSettings
from uartbridge.port.termios_ops import TIOCM_CD, TIOCM_CTS, TIOCM_DSR, RealTermiosOps
from uartbridge.registers import Lsr
from uartbridge.uart import NO_EVENTS, Uart16550

need = require_program  # the tool's path; skip without it (fail when CI is set)


class Guest:
    """A guest driver on the model: writes THR only when THRE, 16 bytes per THRE."""

    def __init__(self, settings: PortSettings, **kwargs: object) -> None:
        self.uart = Uart16550()
        self.link = PortLink(self.uart, settings, on_uart_change=self.pump, **kwargs)  # type: ignore[arg-type]
        self.received = bytearray()

    def pump(self) -> None:
        """Hand every queued event to the link, as the daemon does."""
        events = self.uart.take_events()
        while events is not NO_EVENTS:
            self.link.on_events(events)
            events = self.uart.take_events()

    def setup(self, *, lcr: int = 0x03, mcr: int = 0x0B, ier: int = 0) -> None:
        """FIFOs on, 8N1 (or ``lcr``), DTR|RTS|OUT2."""
        self.uart.write(2, 0x07)
        self.uart.write(3, lcr)
        self.uart.write(4, mcr)
        self.uart.write(1, ier)
        self.pump()

    def fifos_on(self) -> None:
        """FCR: FIFOs on and reset (a driver's open), nothing else: the line is not set yet."""
        self.uart.write(2, 0x07)
        self.pump()

    def set_line(self, lcr: int = 0x03, *, ier: int = 0) -> None:
        """LCR (the guest's first line setting, when nothing else was set), MCR, IER."""
        self.uart.write(3, lcr)
        self.uart.write(4, 0x0B)
        self.uart.write(1, ier)
        self.pump()

    async def end_batch(self) -> None:
        """Let the loop turn, as after a batch of bus operations: queued line settings apply."""
        await asyncio.sleep(0)

    def lsr(self) -> int:
        return self.uart.read(5)

    def write_some(self, data: bytes) -> int:
        """Write up to 16 bytes if THRE; returns how many."""
        if not self.lsr() & Lsr.THRE:
            return 0
        n = 0
        for b in data[:16]:
            self.uart.write(0, b)
            n += 1
            self.pump()
        return n

    def read_all(self) -> bytes:
        """Read RBR while DR."""
        out = bytearray()
        while self.lsr() & Lsr.DR:
            out.append(self.uart.read(0))
            self.pump()
        self.received += out
        return bytes(out)

    async def send(self, data: bytes, *, timeout_s: float = 10.0) -> int:
        """Send ``data`` like a guest; returns how many bytes went in before the timeout."""
        sent = 0
        deadline = time.monotonic() + timeout_s
        while sent < len(data) and time.monotonic() < deadline:
            n = self.write_some(data[sent:])
            sent += n
            if not n:
                await asyncio.sleep(0.002)
        return sent

    async def receive(self, count: int, *, timeout_s: float = 5.0) -> bytes:
        """Read RBR until ``count`` bytes came in (or the timeout)."""
        deadline = time.monotonic() + timeout_s
        while len(self.received) < count and time.monotonic() < deadline:
            self.read_all()
            await asyncio.sleep(0.002)
        return bytes(self.received)


async def wait_for(predicate: object, timeout_s: float = 5.0) -> bool:
    """Poll ``predicate()`` on the loop until true or the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.005)
    return bool(predicate())  # type: ignore[operator]


async def send_and_collect(g: Guest, rest: bytes, fd: int, total: int,
                           timeout_s: float = 10.0) -> bytes:
    """Send ``rest`` like a guest while reading ``fd`` until ``total`` bytes came; those."""
    sender = asyncio.create_task(g.send(rest, timeout_s=timeout_s))
    got = bytearray()
    await wait_for(lambda: got.extend(read_available(fd)) or len(got) >= total, timeout_s)
    await sender
    return bytes(got)


def read_available(fd: int, limit: int = 1 << 20) -> bytes:
    """Everything readable now on a non-blocking fd."""
    out = bytearray()
    while len(out) < limit:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)


def open_raw(path: str) -> int:
    """Open a tty path non-blocking and make it raw, keeping what is already queued for it.

    TCSANOW, not setraw's default TCSAFLUSH: that discards unread input, and a writer that
    reacts to the open (the daemon delivers a pty's kept bytes when a client opens it) races
    the flush — README's embedding example lost its prompt so about 1 run in 10.
    """
    import termios
    import tty

    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(fd, termios.TCSANOW)
    return fd


@contextmanager
def raw_peer(path: Path | str) -> Iterator[int]:
    """The far end: ``path`` opened raw and non-blocking (``open_raw``), closed on exit."""
    fd = open_raw(str(path))
    try:
        yield fd
    finally:
        os.close(fd)


class Socat:
    """A socat virtual null-modem, stopped by PID."""

    def __init__(self, a: Path, b: Path) -> None:
        self.a, self.b = a, b
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        socat = need("socat")
        self.proc = subprocess.Popen(
            [socat, "pty,raw,echo=0,link=" + str(self.a), "pty,raw,echo=0,link=" + str(self.b)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while not (self.a.exists() and self.b.exists()):
            if time.monotonic() > deadline:
                raise RuntimeError("socat did not create its links")
            time.sleep(0.01)

    def stop(self, *, kill: bool = False) -> None:
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        stop_process(proc, signal.SIGKILL if kill else signal.SIGTERM, timeout_s=3)
        for link in (self.a, self.b):
            if kill and link.is_symlink():
                link.unlink()


@contextmanager
def socat_pair(tmp_path: Path, name: str = "s") -> Iterator[Socat]:
    """socat with links ``tmp_path/name-A`` and ``-B``; stopped in finally."""
    s = Socat(tmp_path / f"{name}-A", tmp_path / f"{name}-B")
    s.start()
    try:
        yield s
    finally:
        s.stop()


class FakeOps(RealTermiosOps):
    """A fake serial port (not a pty) for termios and modem ioctls; real calls for the rest
    (TIOCINQ on the real pty's input queue)."""

    def __init__(self) -> None:
        self.attrs: list[Any] | None = None
        self.modem = TIOCM_CTS | TIOCM_DSR | TIOCM_CD
        self.breaks: list[bool] = []
        self.refuse_mask = 0
        self.flow: list[int] = []
        self.drains = 0
        self.modem_reads = 0
        self.drain_gate: threading.Event | None = None  # tcdrain blocks until it is set
        self.outq: int | None = None  # TIOCOUTQ, when a test sets it
        self.flushes = 0
        self.exclusive: list[bool] = []
        self.tx_empty: bool | None = True
        self.calls: list[tuple[str, object]] = []  # tcsetattr/break/flow, in order

    def is_pty(self, fd: int) -> bool:
        return False

    def set_exclusive(self, fd: int, on: bool) -> None:
        self.exclusive.append(on)

    def flush_output(self, fd: int) -> None:
        self.flushes += 1
        self.calls.append(("flush", self.outq))
        self.outq = 0

    def transmitter_empty(self, fd: int) -> bool | None:
        return self.tx_empty

    def tcgetattr(self, fd: int) -> list[Any]:
        if self.attrs is None:
            self.attrs = super().tcgetattr(fd)
        return [*self.attrs[:6], list(self.attrs[6])]

    def tcsetattr(self, fd: int, attrs: list[Any]) -> None:
        self.calls.append(("tcsetattr", attrs[2]))
        if attrs[2] & self.refuse_mask:
            raise OSError(22, "Invalid argument")
        self.attrs = [*attrs[:6], list(attrs[6])]

    def modem_get(self, fd: int) -> int:
        self.modem_reads += 1
        return self.modem

    def modem_set(self, fd: int, *, set_bits: int, clear_bits: int) -> None:
        self.modem = (self.modem | set_bits) & ~clear_bits

    def set_break(self, fd: int, on: bool) -> None:
        self.breaks.append(on)
        self.calls.append(("break", on))

    def tcflow(self, fd: int, action: int) -> None:
        self.flow.append(action)
        self.calls.append(("tcflow", action))

    def tcdrain(self, fd: int) -> None:
        self.drains += 1
        if self.drain_gate is not None:
            self.drain_gate.wait(10)

    def output_queued(self, fd: int) -> int:
        if self.outq is not None:
            return self.outq
        return 123 if self.drain_gate is not None and not self.drain_gate.is_set() else 0


def on_fake_with(settings: PortSettings, test: Callable[[Guest, FakeOps, int], Awaitable[None]],
                  fake: FakeOps | None = None, **guest_kw: Any) -> None:
    """Run ``test(guest, fake, master)`` on a real pty the link takes as a serial port whose
    termios and modem ioctls are faked (``guest_kw``: more arguments for ``PortLink``)."""

    async def run() -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        ops = fake or FakeOps()
        try:
            g = Guest(replace(settings, url=os.ttyname(slave)), termios_ops=ops, **guest_kw)
            await g.link.open()
            await test(g, ops, master)
            await g.link.close()
        finally:
            os.close(master)
            os.close(slave)

    asyncio.run(run())
