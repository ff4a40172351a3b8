"""BusClient and AsyncBusClient against a server running in a thread's event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_bus_support import ServerThread

from uartbridge.bus import ErrorCode
from uartbridge.client import AsyncBusClient, BusClient, BusRefusedError, parse_target
from uartbridge.errors import BusError
from uartbridge.registers import FCR, IER, IIR, LCR, LSR, MCR, RBR, SCR, THR, Ier, Mcr

# Every test here runs on asyncio's loop and on uvloop's (the daemon's two loops).
pytestmark = pytest.mark.usefixtures("each_event_loop")


def test_parse_target_forms() -> None:
    """A path, "tcp:HOST:PORT" and a (host, port) tuple are all targets."""
    assert parse_target("/run/x.bus") == "/run/x.bus"
    assert parse_target(Path("/run/x.bus")) == "/run/x.bus"
    assert parse_target("tcp:127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert parse_target("tcp:[::1]:5000") == ("::1", 5000)
    assert parse_target(("localhost", 7)) == ("localhost", 7)
    with pytest.raises(BusError):
        parse_target("tcp:nohostport")


def test_hello_and_register_access() -> None:
    """The client learns name and capabilities, and reads back what it wrote."""
    with ServerThread(name="uart7") as srv, BusClient(srv.path) as client:
        assert client.name == "uart7"
        assert client.server_version == 1
        assert client.capabilities & 0x7 == 0x7
        client.write(SCR, 0xA5)
        assert client.read(SCR) == 0xA5
        assert client.read(LSR) == 0x60


@pytest.mark.parametrize("spin_us", [0.0, 100.0, 1e6])
def test_busy_poll_setting_changes_nothing_but_the_waiting(spin_us: float) -> None:
    """With any spin_us (0: poll() at once) replies, IRQ and a server's close behave the same."""
    with ServerThread() as srv:
        client = BusClient(srv.path, spin_us=spin_us)
        try:
            client.write(IER, Ier.THRI)
            assert client.read_regs(IIR, LSR) == [0x02, 0x60]
            client.write(SCR, 0x5A)
            assert client.read(SCR) == 0x5A
            srv.run(srv.server.close())
            with pytest.raises(BusError):  # EOF ends the spin; it does not wait it out
                client.read(LSR)
            assert client.closed
        finally:
            client.close()


def test_negative_spin_is_refused() -> None:
    """spin_us below zero is a ValueError naming it."""
    with ServerThread() as srv, pytest.raises(ValueError, match="spin_us"):
        BusClient(srv.path, spin_us=-1)


def test_tcp_targets() -> None:
    """The client connects over TCP given "tcp:host:port" or a tuple."""
    with ServerThread() as srv:
        assert srv.tcp is not None
        host, port = srv.tcp
        with BusClient(f"tcp:{host}:{port}") as client:
            client.write(SCR, 1)
            assert client.read(SCR) == 1
        with BusClient((host, port)) as client:
            assert client.read(SCR) == 1


def test_read_regs_is_reads_in_order_in_one_round_trip() -> None:
    """read_regs(a, b, …) returns what read(a), read(b), … would, side effects in order."""
    with ServerThread() as srv, BusClient(srv.path) as client:
        client.write(IER, Ier.THRI)
        # IIR shows THRI and its read acknowledges it; the following LSR read sees THRE.
        assert client.read_regs(IIR, IIR, LSR, SCR) == [0x02, 0x01, 0x60, 0x00]
        client.write(FCR, 0x07)
        client.write(MCR, Mcr.LOOP)
        client.write_many(THR, b"ab")
        assert client.read_regs(RBR, LSR, RBR, LSR) == [ord("a"), 0x61, ord("b"), 0x60]


def test_bursts_and_sync() -> None:
    """write_many reaches the wire in order; read_many drains the RX FIFO and stops at empty."""
    with ServerThread() as srv, BusClient(srv.path) as client:
        client.write(FCR, 0x07)
        data = bytes(range(256)) * 40  # more than one frame's worth
        for i in range(0, len(data), 16):
            client.write_many(THR, data[i : i + 16])
        client.sync()
        assert srv.sent() == data
        client.write(MCR, Mcr.LOOP)
        client.write_many(THR, b"hello")
        assert client.read_many(RBR, 100) == b"hello"
        assert client.read_many(RBR, 100) == b""


def test_confirmed_write_many_returns_once_executed() -> None:
    """write_many(confirm=True) returns when the device has executed the writes (no sync)."""
    with ServerThread() as srv, BusClient(srv.path) as client:
        client.write(FCR, 0x07)
        client.write_many(THR, b"0123456789abcdef", confirm=True)
        assert srv.sent() == b"0123456789abcdef"
        client.write_many(THR, b"", confirm=True)  # a bare barrier
        assert srv.sent() == b"0123456789abcdef"


class _SendLog:
    """A socket stand-in that records every send() (the client's own socket underneath)."""

    def __init__(self, sock: object) -> None:
        self._sock = sock
        self.sends: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sends.append(bytes(data))
        return self._sock.send(data)  # type: ignore[attr-defined, no-any-return]

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


def test_confirmed_write_many_sends_writes_and_sync_at_once() -> None:
    """The writes and their SYNC leave in one send(): a stop finds both or neither in the
    socket (docs/bus-protocol.md §1), so no reply means none was executed."""
    with ServerThread() as srv, BusClient(srv.path) as client:
        log = _SendLog(client._sock)
        client._sock = log  # type: ignore[assignment]
        client.write_many(THR, b"xyz", confirm=True)
        assert len(log.sends) == 1
        assert log.sends[0].count(b"xyz") == 1 and len(log.sends[0]) > len(b"xyz") + 8


def test_irq_property_and_wait_irq() -> None:
    """irq follows the events seen with replies; wait_irq returns True high, False on timeout."""
    with ServerThread() as srv, BusClient(srv.path) as client:
        assert client.irq is False
        assert client.wait_irq(0.01) is False
        client.write(IER, Ier.THRI)
        assert client.wait_irq(5.0) is True
        assert client.read(IIR) == 0x02
        assert client.irq is False
        client.write(IER, Ier.RDI)
        client.sync()
        srv.feed(b"z")
        assert client.wait_irq(5.0) is True
        assert client.read(RBR) == ord("z")
        assert client.irq is False


def test_second_client_refused_busy() -> None:
    """A second client gets a BusRefusedError with code BUSY."""
    with ServerThread() as srv, BusClient(srv.path) as first:
        with pytest.raises(BusRefusedError) as info:
            BusClient(srv.path)
        assert info.value.code == ErrorCode.BUSY
        assert isinstance(info.value, BusError)
        assert first.read(LSR) == 0x60


def test_reconnect_keeps_state() -> None:
    """Closing and reconnecting finds the device as it was left."""
    with ServerThread() as srv:
        with BusClient(srv.path) as client:
            client.write(LCR, 0x1B)
        with BusClient(srv.path) as client:
            assert client.read(LCR) == 0x1B


def test_missing_socket_is_bus_error(tmp_path: Path) -> None:
    """Connecting to a socket that is not there raises BusError naming it."""
    missing = tmp_path / "nope.bus"
    with pytest.raises(BusError, match="no bus socket"):
        BusClient(missing)


def test_server_shutdown_surfaces_as_bus_error() -> None:
    """When the server closes, the next request raises BusError (the server's code if seen)."""
    with ServerThread() as srv:
        client = BusClient(srv.path)
        try:
            srv.run(srv.server.close())
            with pytest.raises(BusError):
                client.read(LSR)
            assert client.closed
        finally:
            client.close()


def test_async_client_basics() -> None:
    """AsyncBusClient reads, writes, bursts, syncs and waits for the IRQ."""
    with ServerThread() as srv:

        async def main() -> None:
            async with await AsyncBusClient.connect(srv.path) as client:
                assert client.name == "uart0"
                await client.write(SCR, 0x3C)
                assert await client.read(SCR) == 0x3C
                await client.write(FCR, 0x07)
                await client.write_many(THR, b"abcdef")
                await client.sync()
                assert srv.sent() == b"abcdef"
                assert await client.wait_irq(0.01) is False
                await client.write(IER, Ier.THRI)
                assert await client.wait_irq(5.0) is True
                results = await asyncio.gather(client.read(IIR), client.read(SCR))
                assert results == [0xC2, 0x3C]
                assert client.irq is False
                await client.write(MCR, Mcr.LOOP)
                await client.write_many(THR, b"xy")
                assert await client.read_many(RBR, 10) == b"xy"

        asyncio.run(main())


def test_async_client_busy_and_tcp() -> None:
    """AsyncBusClient over TCP; a second connection is refused with BUSY."""
    with ServerThread() as srv:
        assert srv.tcp is not None

        async def main() -> None:
            client = await AsyncBusClient.connect(srv.tcp)  # type: ignore[arg-type]
            try:
                with pytest.raises(BusRefusedError) as info:
                    await AsyncBusClient.connect(srv.path)
                assert info.value.code == ErrorCode.BUSY
                assert await client.read(LSR) == 0x60
            finally:
                await client.close()
            with pytest.raises(BusError):
                await client.read(LSR)

        asyncio.run(main())
