"""The reference 8250 guest driver over the bus: probe, start-up, interrupt-driven data."""

from __future__ import annotations

import time

from test_bus_support import ServerThread

from uartbridge.client import BusClient
from uartbridge.guest import Guest8250
from uartbridge.registers import LCR, MCR, Mcr

PATIENCE_S = 10.0  # a generous bound for "eventually"; no test asserts on elapsed time


def pump(guest: Guest8250, done: object) -> None:
    """Service interrupts until ``done()`` holds (fails after PATIENCE_S)."""
    deadline = time.monotonic() + PATIENCE_S
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, "guest made no progress"
        guest.service(0.05)


def test_probe_identifies_16550a() -> None:
    """Linux's autoconfig over the bus finds a 16550A with a 16-byte FIFO."""
    with ServerThread() as srv, BusClient(srv.path) as client:
        guest = Guest8250(client)
        assert guest.probe() == ("16550A", 16)
        state = srv.call(srv.uart.state)
        assert (state.fcr, state.ier, state.mcr & Mcr.LOOP) == (0, 0, 0)
        assert srv.sent() == b""  # size_fifo's 256 bytes stayed in loopback


def test_startup_programs_the_uart() -> None:
    """startup leaves 8N1, the divisor, FIFO trigger 8, DTR|RTS|OUT2 and IER RLSI|RDI."""
    with ServerThread() as srv, BusClient(srv.path) as client:
        guest = Guest8250(client)
        guest.startup(115200)
        client.sync()
        state = srv.call(srv.uart.state)
        assert state.lcr == 0x03
        assert state.divisor == 1
        assert state.fcr == 0x81
        assert state.mcr == Mcr.DTR | Mcr.RTS | Mcr.OUT2
        assert state.ier == 0x05
        assert not guest.bug_thre and not guest.bug_txen
        guest.startup(9600)
        client.sync()
        assert srv.call(srv.uart.state).divisor == 12


def test_transmit_reaches_wire_once_in_order() -> None:
    """Bytes written by the guest reach the wire exactly once and in order, driven by THRI."""
    with ServerThread() as srv, BusClient(srv.path) as client:
        guest = Guest8250(client)
        guest.startup()
        data = bytes(range(256)) * 8 + b"tail"
        guest.write(data)
        pump(guest, lambda: guest.tx_queued == 0 and len(srv.sent()) >= len(data))
        client.sync()
        assert srv.sent() == data
        assert guest.counters.tx_bytes == len(data)
        assert guest.counters.thri > 0
        assert srv.call(srv.uart.statistics).tx_overwrites == 0


def test_receive_by_rdi_and_cti_tail() -> None:
    """Received bytes reach read() by RDI at the trigger and by CTI for a tail below it."""
    with ServerThread() as srv, BusClient(srv.path) as client:
        guest = Guest8250(client)
        guest.startup()
        client.sync()
        got = bytearray()

        def received(n: int) -> object:
            def check() -> bool:
                got.extend(guest.read())
                return len(got) >= n

            return check

        # Divisor 0xFFFF makes the receive timeout ~45 s, so the body is surely taken by RDI.
        client.write(LCR, 0x83)
        client.write(0, 0xFF)
        client.write(1, 0xFF)
        client.write(LCR, 0x03)
        body = bytes(range(96))  # 12 trigger levels' worth
        srv.feed(body)
        pump(guest, received(len(body)))
        assert guest.counters.rdi > 0
        assert guest.counters.cti == 0
        guest.set_termios(115200)  # back to a timeout of 4 character times at 115200 baud
        tail = b"the end"  # 7 bytes, below the trigger of 8: only the timeout delivers them
        srv.feed(tail)
        pump(guest, received(len(body) + len(tail)))
        assert bytes(got) == body + tail
        assert guest.counters.cti > 0
        assert guest.counters.rx_bytes == len(body) + len(tail)


def test_loopback_exchange() -> None:
    """In MCR loopback the guest receives what it sends and the wire sees nothing."""
    with ServerThread() as srv, BusClient(srv.path) as client:
        guest = Guest8250(client)
        guest.startup()
        client.write(MCR, Mcr.LOOP | Mcr.OUT2 | Mcr.DTR | Mcr.RTS)
        message = b"hello over the loop"
        got = bytearray()
        guest.write(message)

        def complete() -> bool:
            got.extend(guest.read())
            return len(got) >= len(message)

        pump(guest, complete)
        assert bytes(got) == message
        assert srv.sent() == b""


def test_echo_round_trip() -> None:
    """With a far end that echoes, a burst sent comes back whole and in order."""
    with ServerThread(echo=True) as srv, BusClient(srv.path) as client:
        guest = Guest8250(client)
        guest.startup()
        message = bytes(range(256)) * 4
        guest.write(message)
        got = bytearray()

        def complete() -> bool:
            got.extend(guest.read())
            return len(got) >= len(message)

        pump(guest, complete)
        assert bytes(got) == message


def test_break_is_counted() -> None:
    """A break from the wire raises RLSI and the driver counts it."""
    with ServerThread() as srv, BusClient(srv.path) as client:
        guest = Guest8250(client)
        guest.startup()
        client.sync()

        def send_break() -> None:
            srv.uart.receive_break()
            srv.server.push_irq(srv.wire())

        srv.call(send_break)
        pump(guest, lambda: guest.counters.breaks == 1)
        assert guest.counters.rlsi >= 1
