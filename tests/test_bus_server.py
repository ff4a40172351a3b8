"""BusServer on a real Unix socket, serving a bare model with the accept-all wire."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import stat
import threading
import time
from pathlib import Path

import pytest
from test_bus_support import (
    RawGuest,
    read_reg,
    run_async,
    serve,
    short_tmp_dir,
    started_server,
    sync,
    wait_for,
)

from uartbridge import Uart16550
from uartbridge.bus import (
    SERVER_CAPABILITIES,
    BusServer,
    ErrorCode,
    ErrorFrame,
    FrameDecoder,
    Hello,
    HelloReply,
    IrqEvent,
    Read,
    ReadN,
    ReadNReply,
    ReadReply,
    Sync,
    SyncReply,
    Time,
    VirtualWire,
    Write,
    WriteN,
    encode,
)
from uartbridge.errors import BusError
from uartbridge.registers import FCR, IER, IIR, LCR, LSR, MCR, RBR, SCR, THR, Ier, Mcr
from uartbridge.sockets import PeerCredentials

# Every test here runs on asyncio's loop and on uvloop's (the daemon's two loops).
pytestmark = pytest.mark.usefixtures("each_event_loop")


def test_the_server_runs_on_the_loop_each_run_asks_for(each_event_loop: str) -> None:
    """The parametrized runs really run the server on asyncio's loop and on uvloop's."""
    from uartbridge.eventloop import running_loop_name

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        assert running_loop_name() == each_event_loop
        guest = await RawGuest.open(path)
        assert guest.hello.name == "uart0"
        await guest.close()

    serve(body)


def test_hello_reports_version_capabilities_irq_and_name() -> None:
    """HELLO_REPLY carries version 1, the capabilities, the IRQ level and the UART name."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        guest = await RawGuest.open(path)
        assert guest.hello == HelloReply(1, int(SERVER_CAPABILITIES), False, "uart0")
        assert server.guest_connected
        await guest.close()
        await wait_for(lambda: not server.guest_connected)

    serve(body)


def test_read_write_registers() -> None:
    """WRITE is posted and READ returns the register value, with the model's semantics."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        guest = await RawGuest.open(path)
        guest.send(Write(SCR, 0x5A), Write(LCR, 0x83))
        assert (await read_reg(guest, SCR))[1] == 0x5A
        assert (await read_reg(guest, LCR))[1] == 0x83
        assert (await read_reg(guest, LSR))[1] == 0x60
        await guest.close()

    serve(body)


def test_write_n_to_thr_reaches_wire_once_in_order() -> None:
    """WRITE_N to THR puts every byte on the wire exactly once, in order."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        guest = await RawGuest.open(path)
        guest.send(Write(FCR, 0x07))
        data = bytes(range(256)) * 4
        for i in range(0, len(data), 16):
            guest.send(WriteN(THR, data[i : i + 16]))
        await sync(guest)
        assert bytes(wire.sent) == data
        assert uart.statistics().tx_overwrites == 0
        await guest.close()

    serve(body)


def test_write_n_elsewhere_is_n_writes() -> None:
    """WRITE_N to a register other than THR is just N writes: the last value stays."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        guest = await RawGuest.open(path)
        guest.send(WriteN(SCR, b"\x01\x02\x03"))
        assert (await read_reg(guest, SCR))[1] == 0x03
        guest.send(Write(LCR, 0x80), WriteN(0, b"\x10\x20"), Write(LCR, 0x03))
        await sync(guest)
        assert uart.state().divisor & 0xFF == 0x20
        assert wire.sent == b""
        await guest.close()

    serve(body)


def test_read_n_from_rbr_stops_when_empty() -> None:
    """READ_N from RBR returns what the FIFO holds and stops at LSR.DR=0."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        guest = await RawGuest.open(path)
        guest.send(Write(FCR, 0x07), Write(MCR, Mcr.LOOP), WriteN(THR, b"abc"))
        guest.send(ReadN(RBR, 10))
        reply = (await guest.recv_until(ReadNReply))[-1]
        assert reply == ReadNReply(RBR, b"abc")
        guest.send(ReadN(RBR, 10))
        assert (await guest.recv_until(ReadNReply))[-1] == ReadNReply(RBR, b"")
        assert (await read_reg(guest, LSR))[1] == 0x60
        await guest.close()

    serve(body)


def test_read_n_stops_before_a_pending_line_error() -> None:
    """READ_N from RBR returns nothing while LSR has OE pending, so LSR can be read first."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        guest = await RawGuest.open(path)
        guest.send(Write(FCR, 0x07), Write(MCR, Mcr.LOOP), WriteN(THR, bytes(range(17))))
        guest.send(ReadN(RBR, 32))
        assert (await guest.recv_until(ReadNReply))[-1] == ReadNReply(RBR, b"")
        assert (await read_reg(guest, LSR))[1] == 0x63
        guest.send(ReadN(RBR, 32))
        assert (await guest.recv_until(ReadNReply))[-1] == ReadNReply(RBR, bytes(range(16)))
        await guest.close()

    serve(body)


def test_read_n_elsewhere_is_n_reads() -> None:
    """READ_N of another offset, or of offset 0 under DLAB, is exactly N reads."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        guest = await RawGuest.open(path)
        guest.send(Write(SCR, 0x42), ReadN(SCR, 3))
        assert (await guest.recv_until(ReadNReply))[-1] == ReadNReply(SCR, b"\x42\x42\x42")
        guest.send(Write(LCR, 0x80), ReadN(0, 2), Write(LCR, 0))
        assert (await guest.recv_until(ReadNReply))[-1] == ReadNReply(0, b"\x0c\x0c")
        await guest.close()

    serve(body)


def test_irq_event_precedes_sync_reply() -> None:
    """Writing IER=THRI raises the IRQ; its event arrives before the next SYNC reply."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        guest = await RawGuest.open(path)
        guest.send(Write(IER, Ier.THRI))
        assert await sync(guest) == [IrqEvent(True)]
        await guest.close()

    serve(body)


def test_irq_low_event_precedes_read_reply() -> None:
    """Reading IIR acknowledges THRI; the IRQ-low event arrives before the READ reply."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        guest = await RawGuest.open(path)
        guest.send(Write(IER, Ier.THRI))
        before, value = await read_reg(guest, IIR)
        assert value == 0x02
        assert before == [IrqEvent(True), IrqEvent(False)]
        await guest.close()

    serve(body)


def test_thr_write_with_eager_wire_shows_edge() -> None:
    """A THR write under THRI drops and re-raises the IRQ (V17): both edges are reported."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        guest = await RawGuest.open(path)
        guest.send(Write(FCR, 0x07), Write(IER, Ier.THRI))
        assert (await read_reg(guest, IIR)) == ([IrqEvent(True), IrqEvent(False)], 0xC2)
        guest.send(Write(THR, 0x55))
        assert await sync(guest) == [IrqEvent(True)]
        assert wire.sent == b"\x55"
        await guest.close()

    serve(body)


def test_push_irq_reaches_guest_unsolicited() -> None:
    """An IRQ change from port input (push_irq) reaches the guest without a request."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        guest = await RawGuest.open(path)
        guest.send(Write(IER, Ier.RDI))
        await sync(guest)
        wire.feed(b"x")
        assert await guest.recv() == IrqEvent(True)
        before, value = await read_reg(guest, RBR)
        assert (before, value) == ([IrqEvent(False)], ord("x"))
        await guest.close()

    serve(body)


def test_character_timeout_interrupt_from_wire_timer() -> None:
    """A tail below the trigger level raises CTI once the wire's timer runs the model's clock."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        guest = await RawGuest.open(path)
        guest.send(
            Write(LCR, 0x80), Write(0, 1), Write(1, 0), Write(LCR, 0x03),
            Write(FCR, 0x81), Write(IER, Ier.RDI),
        )
        await sync(guest)
        wire.feed(b"abc")
        assert await guest.recv() == IrqEvent(True)
        before, value = await read_reg(guest, IIR)
        assert (before, value) == ([], 0xCC)
        guest.send(ReadN(RBR, 16))
        frames = await guest.recv_until(ReadNReply)
        assert frames == [IrqEvent(False), ReadNReply(RBR, b"abc")]
        await guest.close()

    serve(body)


def test_second_guest_refused_busy() -> None:
    """A second connection gets ERROR BUSY and is closed; the first keeps working."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        first = await RawGuest.open(path)
        second = await RawGuest.open(path, hello=False)
        error = await second.expect_error_and_close()
        assert error.code == ErrorCode.BUSY
        first.send(Write(SCR, 9))
        assert (await read_reg(first, SCR))[1] == 9
        await first.close()

    serve(body)


@pytest.mark.parametrize(
    "opening", [b"", b"\x00\x40\x01\x00"], ids=["silent", "half-frame-promising-more"]
)
def test_peer_without_hello_is_dropped_and_frees_the_slot(opening: bytes) -> None:
    """A peer that never completes HELLO gets ERROR PROTOCOL after the timeout; a guest follows."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        squatter = await RawGuest.open(path, hello=False)
        squatter.send_raw(opening)
        error = await squatter.expect_error_and_close()
        assert error.code == ErrorCode.PROTOCOL
        assert "HELLO" in error.message
        await wait_for(lambda: not server.guest_connected)
        guest = await RawGuest.open(path)
        assert (await read_reg(guest, LSR))[1] == 0x60
        await guest.close()

    serve(body, hello_timeout_s=0.3)


def test_reconnect_leaves_device_state() -> None:
    """A guest that disconnects leaves the device as it was, and may reconnect."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        guest = await RawGuest.open(path)
        guest.send(Write(SCR, 0x77), Write(LCR, 0x1B), Write(IER, Ier.THRI))
        await sync(guest)
        await guest.close()
        await wait_for(lambda: not server.guest_connected)
        again = await RawGuest.open(path)
        assert again.hello.irq is True
        assert (await read_reg(again, SCR))[1] == 0x77
        assert (await read_reg(again, LCR))[1] == 0x1B
        assert (await read_reg(again, IIR)) == ([IrqEvent(False)], 0x02)
        await again.close()

    serve(body)


@pytest.mark.parametrize(
    ("first", "code"),
    [
        (encode(Hello(3)), ErrorCode.VERSION_MISMATCH),  # it speaks 1 and 2
        (encode(Hello(0)), ErrorCode.VERSION_MISMATCH),
        (encode(Read(0)), ErrorCode.PROTOCOL),
        (encode(Hello(1)) + encode(Time(5)), ErrorCode.UNKNOWN_TYPE),  # TIME is v2's
        (encode(Hello(2)) + encode(Time(5)), ErrorCode.PROTOCOL),  # ... with GUEST_TIME
        (encode(Hello(1)) + encode(Hello(1)), ErrorCode.PROTOCOL),
        (encode(Hello(1)) + encode(ReadReply(0, 0)), ErrorCode.PROTOCOL),
        (b"\x00\x01\x42", ErrorCode.UNKNOWN_TYPE),
        (encode(Hello(1)) + b"\x00\x02\x02\x09", ErrorCode.BAD_OFFSET),
        (b"\xff\xff\xff\xff", ErrorCode.FRAME_TOO_LARGE),
        (b"GET / HTTP/1.0\r\n\r\n", ErrorCode.FRAME_TOO_LARGE),
    ],
)
def test_protocol_violations_get_error_then_close(first: bytes, code: ErrorCode) -> None:
    """A bad version, a missing HELLO, garbage or a huge length gets its ERROR, then close."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        guest = await RawGuest.open(path, hello=False)
        guest.send_raw(first)
        frames = []
        while True:
            frame = await guest.recv()
            frames.append(frame)
            if not isinstance(frame, HelloReply):
                break
        error = frames[-1]
        assert getattr(error, "code", None) == code, frames
        await guest.expect_closed()
        await wait_for(lambda: not server.guest_connected)
        again = await RawGuest.open(path)
        await again.close()

    serve(body)


def test_hostile_clients_do_not_disturb_another_uart() -> None:
    """Garbage, a 4 GB length, half frames and a READ flood never disturb another UART."""
    directory = short_tmp_dir()

    async def main() -> None:
        # hello_timeout_s: random garbage may start with a length that promises more bytes.
        s0, _uart0, wire0, path0 = await started_server(
            directory, "uart0", high_water=4096, stall_timeout_s=0.2, hello_timeout_s=0.5
        )
        s1, _uart1, wire1, path1 = await started_server(directory, "uart1")
        try:
            good = await RawGuest.open(path1)
            counter = 0

            async def good_still_works() -> None:
                nonlocal counter
                counter = (counter + 1) & 0xFF
                good.send(Write(SCR, counter))
                assert (await read_reg(good, SCR))[1] == counter

            # Garbage.
            bad = await RawGuest.open(path0, hello=False)
            bad.send_raw(os.urandom(64) + b"\x00\x01\x42")
            await bad.expect_closed()
            await good_still_works()
            # A 4 GB length (u32 0xFFFFFFFF read as a u16 length 0xFFFF: too large).
            bad = await RawGuest.open(path0)
            bad.send_raw((0xFFFFFFFF).to_bytes(4, "big"))
            assert (await bad.expect_error_and_close()).code == ErrorCode.FRAME_TOO_LARGE
            await good_still_works()
            # Half a frame, then close.
            bad = await RawGuest.open(path0)
            bad.send_raw(encode(WriteN(THR, b"x" * 100))[:50])
            await bad.close()
            await wait_for(lambda: not s0.guest_connected)
            assert wire0.sent == b""
            await good_still_works()
            # A flood of READs from a client that never reads its replies.
            flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            flood.setblocking(False)
            await asyncio.get_running_loop().sock_connect(flood, str(path0))
            try:
                flood.send(encode(Hello(1)))
                chunk = encode(Read(LSR)) * 4096
                sent = 0
                for _ in range(200):
                    with contextlib.suppress(BlockingIOError):
                        sent += flood.send(chunk)
                    conn = s0._guest
                    if conn is not None and conn._transport is not None:
                        assert conn._transport.get_write_buffer_size() <= s0.hard_limit
                    await good_still_works()
                    if not s0.guest_connected:
                        break
                assert sent > 0
                await wait_for(lambda: not s0.guest_connected)
            finally:
                flood.close()
            await good_still_works()
            # uart0 takes a well-behaved guest again.
            again = await RawGuest.open(path0)
            assert (await read_reg(again, LSR))[1] == 0x60
            await again.close()
            await good.close()
        finally:
            for wire in (wire0, wire1):
                wire.detach()
            await s0.close()
            await s1.close()

    try:
        run_async(main)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_socket_mode_is_0660() -> None:
    """The bus socket is created with mode 0660 by default."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660

    serve(body)


def test_peer_refused_by_credentials() -> None:
    """A peer that peer_allowed refuses gets ERROR NOT_PERMITTED and is closed."""
    seen = []

    def refuse(peer: object) -> bool:
        seen.append(peer)
        return False

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        guest = await RawGuest.open(path, hello=False)
        error = await guest.expect_error_and_close()
        assert error.code == ErrorCode.NOT_PERMITTED
        assert not server.guest_connected
        peer = seen[0]
        assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())  # type: ignore[attr-defined]

    serve(body, peer_allowed=refuse)


def test_close_tells_guest_and_removes_socket() -> None:
    """close() sends ERROR SHUTTING_DOWN to the guest and removes the socket file."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        guest = await RawGuest.open(path)
        await server.close()
        error = await guest.expect_error_and_close()
        assert error.code == ErrorCode.SHUTTING_DOWN
        assert not path.exists()

    serve(body)


async def _raw_guest(path: Path, tcp: tuple[str, int] | None = None) -> socket.socket:
    """A blocking socket (Unix, or TCP to ``tcp``) that has completed HELLO (the reply read
    on the loop)."""
    if tcp is None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
    else:
        sock = socket.create_connection(tcp)
    sock.sendall(encode(Hello(1)))
    sock.setblocking(False)
    decoder = FrameDecoder()
    while (reply := decoder.next_frame()) is None:
        decoder.feed(await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), 10))
    assert isinstance(reply, HelloReply), reply
    sock.setblocking(True)
    sock.settimeout(10)
    return sock


def _read_to_eof(sock: socket.socket) -> list[object]:
    """Every frame until the server's EOF (a reset fails the test: the close must be clean)."""
    decoder = FrameDecoder()
    while data := sock.recv(65536):
        decoder.feed(data)
    return list(decoder.frames())


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_close_executes_every_frame_the_guest_already_sent(transport: str) -> None:
    """close() first executes, in order, the frames already in the socket (posted THR writes
    reach the wire, a SYNC is answered), drops a partial frame, then closes without a reset."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        tcp = await server.start_tcp() if transport == "tcp" else None
        sock = await _raw_guest(path, tcp)
        try:
            singles = bytes(i % 251 for i in range(200))
            burst = bytes((i * 7) % 256 for i in range(3000))
            partial = encode(Write(SCR, 0x55))[:3]
            sock.sendall(b"".join(encode(Write(THR, b)) for b in singles)
                         + encode(WriteN(THR, burst)) + encode(Sync(9)) + partial)
            # No await in between: the loop has not read a byte of it when the stop begins.
            assert not wire.sent
            await server.close()
            assert bytes(wire.sent) == singles + burst
            assert uart.read(SCR) == 0  # the partial frame was never completed: not executed
            frames = await asyncio.to_thread(_read_to_eof, sock)
            assert frames[-2:] == [SyncReply(9), ErrorFrame(int(ErrorCode.SHUTTING_DOWN),
                                                           "server is shutting down")]
        finally:
            sock.close()

    serve(body)


def test_close_drain_is_bounded_in_register_operations() -> None:
    """A guest that queued more work than the drain's bound (READ_N asks 4094 reads in 6
    bytes) gets at most the bound executed at close; the frames after it are dropped."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        sock = await _raw_guest(path)
        try:
            sock.sendall(encode(Write(SCR, 0x11)) + encode(ReadN(SCR, 4094)) * 50
                         + encode(Write(SCR, 0x77)))
            await server.close()
            frames = await asyncio.to_thread(_read_to_eof, sock)
            replies = [f for f in frames if isinstance(f, ReadNReply)]
            assert 1 <= len(replies) <= 16384 // 4094
            assert all(r.data == b"\x11" * 4094 for r in replies)
            assert uart.read(SCR) == 0x11  # the write after the bound was not executed
        finally:
            sock.close()

    serve(body, drain_limit_bytes=16384)


def _wait_until_stuck(sent: list[int], *, settle_s: float = 0.05, timeout_s: float = 10.0) -> None:
    """Block (the loop too, on purpose) until ``sent[0]`` stops growing: the sender is blocked."""
    deadline = time.monotonic() + timeout_s
    last = -1
    while sent[0] != last and time.monotonic() < deadline:
        last = sent[0]
        time.sleep(settle_s)


def test_close_is_not_held_by_a_flooding_guest() -> None:
    """A guest that never stops sending THR bursts does not hold close(): the drain executes
    at most its bound of what the guest sent, and the guest is disconnected."""
    limit = 16384

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        sock = await _raw_guest(path)
        frame = encode(WriteN(THR, bytes(range(256)) * 15))
        sent = [0]

        def flood() -> None:
            with contextlib.suppress(OSError):
                while True:
                    sent[0] += sock.send(frame)

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        try:
            await wait_for(lambda: len(wire.sent) > 200_000)
            # Hold the loop until the flooder has filled the socket, so the guest has more in
            # flight than the bound however fast the server executes (the compiled core with
            # uvloop kept up with the flooder and emptied the socket before close).
            _wait_until_stuck(sent)
            before = len(wire.sent)
            await server.close()
            drained = len(wire.sent) - before
            assert drained <= limit
            # The guest had more in flight than the bound: the bound is what ended the drain.
            await wait_for(lambda: sent[0] > len(wire.sent) + limit)
            await asyncio.to_thread(flooder.join, 30)
            assert not flooder.is_alive()  # disconnected: its send failed
        finally:
            sock.close()

    serve(body, drain_limit_bytes=limit)


def test_tcp_listener_on_loopback() -> None:
    """start_tcp binds loopback by default and serves the same protocol."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        host, port = await server.start_tcp()
        assert host == "127.0.0.1"
        reader, writer = await asyncio.open_connection(host, port)
        guest = RawGuest(reader, writer)
        guest.send(Hello(1), Write(SCR, 3), Read(SCR))
        frames = await guest.recv_until(ReadReply)
        assert frames[-1] == ReadReply(SCR, 3)
        await guest.close()

    serve(body)


def test_tcp_peer_is_checked_by_the_uid_owning_its_socket() -> None:
    """Over loopback TCP peer_allowed sees the peer's uid (from /proc/net/tcp) and can refuse."""
    seen: list[PeerCredentials] = []

    def refuse(peer: PeerCredentials) -> bool:
        seen.append(peer)
        return False

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        host, port = await server.start_tcp()
        reader, writer = await asyncio.open_connection(host, port)
        error = await RawGuest(reader, writer).expect_error_and_close()
        assert error.code == ErrorCode.NOT_PERMITTED
        assert [peer.uid for peer in seen] == [os.geteuid()]

    serve(body, peer_allowed=refuse)


def test_settle_failure_is_internal_error_and_server_survives() -> None:
    """A settle that raises costs that guest an ERROR INTERNAL; the next guest is served."""
    directory = short_tmp_dir()

    async def main() -> None:
        uart = Uart16550()
        wire = VirtualWire(uart)
        broken = [True]

        def settle() -> list[bool]:
            if broken[0]:
                raise RuntimeError("boom")
            return wire()

        server = BusServer(uart, name="uart0", settle=settle)
        path = directory / "uart0.bus"
        await server.start_unix(path)
        try:
            guest = await RawGuest.open(path)
            guest.send(Write(SCR, 1))
            assert (await guest.expect_error_and_close()).code == ErrorCode.INTERNAL
            broken[0] = False
            await wait_for(lambda: not server.guest_connected)
            again = await RawGuest.open(path)
            assert (await read_reg(again, SCR))[1] == 1
            await again.close()
        finally:
            await server.close()

    try:
        run_async(main)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_stale_socket_replaced_and_live_socket_refused() -> None:
    """start_unix replaces a dead socket file but refuses one another server listens on."""
    directory = short_tmp_dir()

    async def main() -> None:
        path = directory / "uart0.bus"
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(path))
        stale.close()
        server, _uart, wire, path = await started_server(directory, "uart0")
        try:
            other = BusServer(Uart16550(), name="other", settle=VirtualWire(Uart16550()))
            with pytest.raises(BusError, match="in use"):
                await other.start_unix(path)
            guest = await RawGuest.open(path)
            await guest.close()
        finally:
            wire.detach()
            await server.close()

    try:
        run_async(main)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_thr_bursts_lose_nothing_when_the_wire_takes_everything() -> None:
    """WRITE_N and runs of posted WRITEs to THR, far past 16 bytes, all reach the wire in order."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        guest = await RawGuest.open(path)
        data = bytes(range(256)) * 2
        guest.send(Write(FCR, 0x07), WriteN(THR, data))
        guest.send(*[Write(THR, b) for b in data])
        guest.send(Write(FCR, 0x00), *[Write(THR, b) for b in data[:40]])  # without FIFOs too
        assert (await read_reg(guest, LSR))[1] == 0x60
        assert bytes(wire.sent) == data + data + data[:40]
        assert uart.statistics().tx_overwrites == 0
        await guest.close()

    serve(body)


def test_read_n_goes_on_while_the_port_refills_the_fifo() -> None:
    """READ_N from RBR drains the FIFO, lets the port refill it, and returns the whole run."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        guest = await RawGuest.open(path)
        guest.send(Write(FCR, 0x87))  # trigger 8: the port fills the FIFO 8 bytes at a time
        assert (await read_reg(guest, LSR))[1] == 0x60
        wire.feed(bytes(range(100)))
        assert uart.state().rx_fifo == bytes(range(8))
        guest.send(ReadN(RBR, 256))
        assert (await guest.recv_until(ReadNReply))[-1] == ReadNReply(RBR, bytes(range(100)))
        await guest.close()

    serve(body)


def test_a_big_batch_runs_in_turns_and_another_uart_is_served_in_between() -> None:
    """A 60 KiB batch of bursts runs a budget per turn: another UART's READ, sent after the
    batch, is executed after at most a turn of it, not after all of it."""
    directory = short_tmp_dir()

    async def main() -> None:
        s0, uart0, wire0, path0 = await started_server(directory, "uart0")
        uart1 = Uart16550()
        wire1 = VirtualWire(uart1)
        seen_by_uart1: list[int] = []

        def settle1() -> list[bool]:
            conn = s0._guest
            seen_by_uart1.append(conn.frames_executed if conn is not None else -1)
            return wire1()

        s1 = BusServer(uart1, name="uart1", settle=settle1)
        path1 = directory / "uart1.bus"
        await s1.start_unix(path1)
        try:
            flood = await RawGuest.open(path0)
            other = await RawGuest.open(path1)
            frames = [WriteN(SCR, bytes([i]) * 4094) for i in range(14)]  # 14 x 4098 bytes
            flood.send(*frames, Sync(1))
            other.send(Read(SCR))
            assert (await other.recv_until(ReadReply))[-1] == ReadReply(SCR, 0)
            assert (await flood.recv_until(SyncReply))[-1] == SyncReply(1)
            conn_frames = seen_by_uart1[0]
            # HELLO + at most two turns of one maximal burst each had run, of 15 frames.
            assert 1 <= conn_frames <= 3, seen_by_uart1
            assert uart0.state().scr == 13
            await flood.close()
            await other.close()
        finally:
            wire0.detach()
            await s0.close()
            await s1.close()

    try:
        run_async(main)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_turns_keep_irq_frames_before_replies_and_stop_between_frames() -> None:
    """Across turns IRQ frames still precede the reply that observes them, and what runs
    between two turns (a checkpoint, say) sees the device between two frames."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        guest = await RawGuest.open(path)
        data = bytes(i % 255 for i in range(4093)) + b"\xff"  # 0xFF only as the last write
        seen: list[tuple[int, int]] = []  # (frames executed, SCR) whenever the observer ran
        stop = False

        async def observe() -> None:
            while not stop:
                conn = server._guest
                seen.append((conn.frames_executed if conn else -1, uart.state().scr))
                await asyncio.sleep(0)

        observer = asyncio.create_task(observe())
        guest.send(Write(IER, Ier.THRI), *[WriteN(SCR, data) for _ in range(12)], Read(IIR))
        frames = await guest.recv_until(ReadReply)
        stop = True
        await observer
        assert frames == [IrqEvent(True), IrqEvent(False), ReadReply(IIR, 0x02)]
        assert {scr for _, scr in seen} <= {0x00, 0xFF}
        # HELLO is frame 1, the IER write 2, the bursts 3..14: seen part-way, turn by turn.
        midway = {n for n, _ in seen if 2 < n < 14}
        assert len(midway) >= 6, seen
        await guest.close()

    serve(body)


def test_write_n_to_a_register_settles_once_per_burst() -> None:
    """WRITE_N of LCR toggles is settled once (the port gets the final line settings), not
    once per write."""
    calls: list[int] = []

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        def counting() -> list[bool]:
            calls.append(1)
            return wire()

        server.settle = counting
        guest = await RawGuest.open(path)
        await sync(guest)
        calls.clear()
        guest.send(WriteN(LCR, bytes([0x03, 0x1B]) * 2047), WriteN(LCR, b"\x03"))
        await sync(guest)
        assert len(calls) <= 3, len(calls)
        assert uart.line_settings.summary().startswith("8N1") or uart.state().lcr == 0x03
        await guest.close()

    serve(body)


def test_write_n_to_thr_asks_a_refusing_port_once_per_burst() -> None:
    """A THR burst into a port that takes nothing asks it once, not once per byte; the
    overwritten bytes are counted as the chip's overwrites."""
    calls: list[int] = []

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        def refusing() -> list[bool]:
            calls.append(1)
            return list(uart.take_events().irq_changes)

        server.settle = refusing
        guest = await RawGuest.open(path)
        guest.send(Write(FCR, 0x07))
        await sync(guest)
        calls.clear()
        guest.send(WriteN(THR, bytes(range(256)) * 15))
        await sync(guest)
        assert len(calls) <= 4, len(calls)
        assert uart.statistics().tx_overwrites == 256 * 15 - 16 - 1  # FIFO + TSR hold 17
        await guest.close()

    serve(body)


def test_on_turn_end_runs_once_per_turn_after_the_last_settle() -> None:
    """on_turn_end is called once per turn of frames, after that turn's final settle."""
    events: list[str] = []

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        def settle() -> list[bool]:
            events.append("settle")
            return wire()

        server.settle = settle
        server.on_turn_end = lambda: events.append("end")
        guest = await RawGuest.open(path)
        events.clear()
        guest.send(*[WriteN(LCR, bytes([0x03, 0x07]) * 2047) for _ in range(3)], Sync(5))
        await guest.recv_until(SyncReply)
        assert events.count("end") == 3  # three maximal bursts: three turns
        assert events[-2:] == ["settle", "end"]
        assert all(events[i - 1] == "settle" for i, e in enumerate(events) if e == "end")
        await guest.close()

    serve(body, time_budget_s=60.0)  # turns end by the op budget alone here


def test_input_that_arrives_during_a_turn_is_served_before_the_next_turn() -> None:
    """A READ that reaches another UART while a flood's turn runs is executed right after
    that turn, before the flood's next one (the next turn waits for the loop's next poll)."""
    directory = short_tmp_dir()

    async def main() -> None:
        s0, _uart0, wire0, path0 = await started_server(directory, "uart0", time_budget_s=60.0)
        uart1 = Uart16550()
        wire1 = VirtualWire(uart1)
        at_read: list[int] = []
        at_trigger: list[int] = []

        def settle1() -> list[bool]:
            conn = s0._guest
            at_read.append(conn.frames_executed if conn is not None else -1)
            return wire1()

        s1 = BusServer(uart1, name="uart1", settle=settle1)
        path1 = directory / "uart1.bus"
        await s1.start_unix(path1)
        try:
            flood = await RawGuest.open(path0)
            other = await RawGuest.open(path1)
            at_read.clear()

            def turn_end() -> None:
                conn = s0._guest
                if conn is not None and conn.slices == 3 and not at_trigger:
                    at_trigger.append(conn.frames_executed)
                    other.send(Read(SCR))  # reaches uart1's socket now, mid-flood

            s0.on_turn_end = turn_end
            flood.send(*[WriteN(SCR, bytes([i]) * 4094) for i in range(10)], Sync(1))
            assert (await other.recv_until(ReadReply))[-1] == ReadReply(SCR, 0)
            assert (await flood.recv_until(SyncReply))[-1] == SyncReply(1)
            assert at_trigger and at_read[0] == at_trigger[0], (at_trigger, at_read)
            await flood.close()
            await other.close()
        finally:
            wire0.detach()
            await s0.close()
            await s1.close()

    try:
        run_async(main)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
