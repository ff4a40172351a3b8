"""Bus protocol v2 in the server: GUEST_TIME negotiation, TIME, DEADLINE; v1 unchanged.

A ``BusServer`` on a model whose clock is a ``GuestClock``, with a ``VirtualWire`` (an ideal
wire, so the tests see the protocol, not a port), and a raw frame-level guest.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest
from test_bus_support import RawGuest, run_async, short_tmp_dir, sync, wait_for

from uartbridge import Uart16550
from uartbridge.bus import (
    SERVER_CAPABILITIES,
    BusServer,
    Capability,
    Deadline,
    ErrorCode,
    Hello,
    HelloReply,
    IrqEvent,
    Time,
    VirtualWire,
    Write,
    encode,
)
from uartbridge.clock import GuestClock
from uartbridge.registers import FCR, IER, IIR, LCR, MCR, THR
from uartbridge.uart import NS_PER_S, TIMEOUT_CHARS, Pace

# Every test here runs on asyncio's loop and on uvloop's (the daemon's two loops).
pytestmark = pytest.mark.usefixtures("each_event_loop")

CTI_NS = TIMEOUT_CHARS * (NS_PER_S * 10 // 115200)  # 4 characters at 115200 8N1
GUEST_TIME = int(Capability.GUEST_TIME)


def serve_time(body: object, *, guest_clock: bool = True, pace: Pace = "none") -> None:
    """Run ``body(server, uart, clock, path)`` on a server whose UART runs on a GuestClock
    (``guest_clock``) or on the host's clock."""
    directory = short_tmp_dir()

    async def main() -> None:
        clock = GuestClock(1_000)
        uart = Uart16550(clock=clock, pace=pace) if guest_clock else Uart16550(pace=pace)
        wire = VirtualWire(uart, clock=clock if guest_clock else time.monotonic_ns)
        server = BusServer(
            uart, name="uart0", settle=wire, guest_clock=clock if guest_clock else None
        )
        path = directory / "uart0.bus"
        await server.start_unix(path)
        wire.attach(server)
        try:
            await body(server, uart, clock, path)  # type: ignore[operator]
        finally:
            wire.detach()
            await server.close()

    try:
        run_async(main)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def hello(path: Path, frame: Hello) -> tuple[RawGuest, HelloReply]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    guest = RawGuest(reader, writer)
    guest.send(frame)
    reply = await guest.recv()
    assert isinstance(reply, HelloReply), reply
    return guest, reply


def test_v1_hello_is_unchanged_and_gets_host_time() -> None:
    """A v1 HELLO on a guest-time UART gets exactly the v1 reply (version 1, capabilities
    0x0F) and the clock follows the host while it is attached, standing still after."""

    async def body(server: BusServer, uart: Uart16550, clock: GuestClock, path: Path) -> None:
        guest, reply = await hello(path, Hello(1))
        assert reply == HelloReply(1, int(SERVER_CAPABILITIES), False, "uart0")
        assert clock.following_host
        before = clock()
        await asyncio.sleep(0.02)
        assert clock() > before
        await guest.close()
        await wait_for(lambda: not server.guest_connected)
        assert not clock.following_host
        stopped = clock()
        await asyncio.sleep(0.02)
        assert clock() == stopped

    serve_time(body)


def test_guest_time_is_granted_and_deadlines_follow_in_the_guests_time() -> None:
    """HELLO v2 asking for GUEST_TIME gets it (and a DEADLINE right after the reply); TIME
    moves the device's clock by what the guest's moved; the receive timeout's deadline comes
    as a DEADLINE in the guest's own time, after the IRQ frames and before the reply."""

    async def body(server: BusServer, uart: Uart16550, clock: GuestClock, path: Path) -> None:
        base = 10**15
        guest, reply = await hello(path, Hello(2, None, GUEST_TIME, base))
        assert reply.version == 2
        assert reply.capabilities == int(SERVER_CAPABILITIES) | GUEST_TIME
        assert await guest.recv() == Deadline(None)
        assert not clock.following_host
        for offset, value in ((LCR, 0x83), (0, 1), (1, 0), (LCR, 3), (FCR, 0x81), (IER, 1),
                              (MCR, 0x10)):
            guest.send(Write(offset, value))
        guest.send(Write(THR, 0x41))  # loopback: one byte in the RX FIFO, trigger 8
        assert await sync(guest) == [Deadline(base + CTI_NS)]
        device_then = clock()
        guest.send(Time(base + CTI_NS - 1))
        assert await sync(guest) == []
        assert clock() == device_then + CTI_NS - 1
        guest.send(Time(base + CTI_NS))
        assert await sync(guest) == [IrqEvent(True), Deadline(None)]
        assert uart.read(IIR) == 0xCC
        await guest.close()

    serve_time(body)


def test_time_that_goes_back_is_refused() -> None:
    """A TIME earlier than the one before is ERROR BAD_TIME, and the connection closes."""

    async def body(server: BusServer, uart: Uart16550, clock: GuestClock, path: Path) -> None:
        guest, _ = await hello(path, Hello(2, None, GUEST_TIME, 500))
        assert await guest.recv() == Deadline(None)
        guest.send(Time(600), Time(599))
        error = await guest.expect_error_and_close()
        assert error.code == ErrorCode.BAD_TIME

    serve_time(body)


def test_guest_time_without_a_time_is_malformed() -> None:
    """GUEST_TIME asked for without HELLO's TIME field is MALFORMED."""

    async def body(server: BusServer, uart: Uart16550, clock: GuestClock, path: Path) -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        guest = RawGuest(reader, writer)
        guest.send(Hello(2, None, GUEST_TIME, None))
        error = await guest.expect_error_and_close()
        assert error.code == ErrorCode.MALFORMED

    serve_time(body)


def test_a_host_time_uart_does_not_grant_guest_time() -> None:
    """On a UART whose clock is the host's, GUEST_TIME is not granted, LINE_PACE tells of
    pacing, and a TIME frame is a PROTOCOL error."""

    async def body(server: BusServer, uart: Uart16550, clock: GuestClock, path: Path) -> None:
        guest, reply = await hello(path, Hello(2, None, GUEST_TIME, 5))
        assert reply.capabilities == int(SERVER_CAPABILITIES | Capability.LINE_PACE)
        guest.send(Time(6))
        error = await guest.expect_error_and_close()
        assert error.code == ErrorCode.PROTOCOL

    serve_time(body, guest_clock=False, pace="line")


def test_the_v2_session_of_the_protocol_page_is_what_the_server_does() -> None:
    """docs/bus-protocol.md §7's guest-time session, byte for byte (the line settings are
    the writes the page leaves out)."""

    def wire(text: str) -> bytes:
        return bytes.fromhex(text)

    async def body(server: BusServer, uart: Uart16550, clock: GuestClock, path: Path) -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(wire("00 13 01 00 02 02 04 00 00 00 10 03 08 00 00 00 00 00 0f 42 40"))
        expected = wire("00 0d 81 00 02 00 00 00 3f 00 75 61 72 74 30")
        expected += wire("00 09 91 ff ff ff ff ff ff ff ff")
        assert await reader.readexactly(len(expected)) == expected
        for offset, value in ((LCR, 0x83), (0, 1), (1, 0), (LCR, 0x03)):
            writer.write(encode(Write(offset, value)))
        writer.write(wire("00 03 03 00 41") + wire("00 05 06 00 00 00 01"))
        expected = wire("00 09 91 00 00 00 00 00 10 95 55") + wire("00 05 86 00 00 00 01")
        assert await reader.readexactly(len(expected)) == expected
        writer.write(wire("00 09 07 00 00 00 00 00 10 95 55") + wire("00 05 06 00 00 00 02"))
        expected = wire("00 09 91 ff ff ff ff ff ff ff ff") + wire("00 05 86 00 00 00 02")
        assert await reader.readexactly(len(expected)) == expected
        assert uart.read(5) & 0x40  # TEMT: 'A' has been shifted out, in the guest's time
        writer.close()

    serve_time(body, pace="line")
