"""The bus server: the asyncio protocol that puts one UART on a socket.

The server side is an ``asyncio.Protocol`` so that all frames of one ``read()`` batch are
executed back to back inside one callback: a checkpoint (another callback on the same loop)
always falls *between* two bus operations, never inside one.

After each operation that touched the model the server calls the daemon's ``settle()``, which
lets the wire take bytes and returns the IRQ level changes since the last call; each change
becomes an IRQ frame, written *before* the reply, so a guest that sees a reply has already
seen every IRQ edge the reply observes. Changes that happen outside bus operations (port
input, the receive-timeout timer) reach the guest through ``BusServer.push_irq``.

Hostile or broken clients cannot hurt the daemon: lengths are checked as soon as the header
is in, so the read buffer holds at most one batch plus one frame; when the transport's write
buffer passes the high-water mark the server stops executing frames and stops reading (the
kernel's socket buffers then hold the client back), and a client that stays that way for
``stall_timeout_s`` is dropped. Every ERROR frame is followed by the server closing the
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from ..errors import BusError
from ..registers import FIFO_SIZE, RBR, THR
from ..sockets import PeerCredentials, bind_unix, peer_credentials, tcp_peer_credentials
from ..uart import Clock, Uart16550
from .codec import (
    MAX_NAME_LEN,
    PROTOCOL_VERSION,
    SERVER_CAPABILITIES,
    U32,
    ErrorCode,
    ErrorFrame,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    Hello,
    HelloReply,
    Read,
    ReadN,
    Sync,
    Write,
    WriteN,
    encode,
    frame_bytes,
)

# -- a virtual wire for tests and standalone use ----------------------------------------------


class VirtualWire:
    """A settle function with an ideal wire: it takes every byte at once and feeds input.

    Calling the object is the ``settle`` the server wants: it drains ``take_events()``, moves
    all of ``tx_pending()`` into ``sent`` (through ``sink`` if given), moves as much of the
    input backlog (``feed``) into the model as it accepts, and returns the IRQ changes. Once
    ``attach``-ed to a server on a running loop it also runs the model's receive-timeout timer
    (``uart.poll()`` at ``uart.next_deadline_ns()``) and pushes the resulting IRQ changes, so
    the character-timeout interrupt works without a daemon. ``clock`` must be the model's.
    """

    def __init__(
        self,
        uart: Uart16550,
        *,
        sink: Callable[[bytes], None] | None = None,
        clock: Clock = time.monotonic_ns,
    ) -> None:
        """A wire for ``uart``; ``sink`` sees each batch of transmitted bytes."""
        self.uart = uart
        self.sent = bytearray()
        self._sink = sink
        self._clock = clock
        self._backlog = bytearray()
        self._server: BusServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: int | None = None

    def __call__(self) -> list[bool]:
        """Settle: let the wire take everything, refill the receiver, return IRQ changes."""
        uart = self.uart
        changes: list[bool] = []
        for _ in range(4 * FIFO_SIZE):  # each pass moves bytes; the receiver bounds the passes
            progressed = False
            pending = uart.tx_pending()
            if pending:
                uart.tx_sent(len(pending))
                self.sent += pending
                if self._sink is not None:
                    self._sink(pending)
                progressed = True
            if self._backlog:
                taken = uart.receive(bytes(self._backlog))
                if taken:
                    del self._backlog[:taken]
                    progressed = True
            changes.extend(uart.take_events().irq_changes)
            if not progressed:
                break
        self._arm_timer()
        return _collapse(changes)

    @property
    def backlog(self) -> int:
        """Input bytes waiting for room in the receiver."""
        return len(self._backlog)

    def feed(self, data: bytes) -> None:
        """Bytes arriving from the wire; delivered as the receiver has room.

        Call it on the server's loop; when attached, IRQ changes are pushed to the guest.
        """
        self._backlog += data
        changes = self()
        if self._server is not None:
            self._server.push_irq(changes)

    def attach(self, server: BusServer) -> None:
        """Run the receive-timeout timer on the running loop and push IRQ changes to ``server``."""
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._arm_timer()

    def detach(self) -> None:
        """Stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_deadline = None
        self._server = None

    def _arm_timer(self) -> None:
        if self._loop is None or self._server is None:
            return
        deadline = self.uart.next_deadline_ns()
        if deadline == self._timer_deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_deadline = deadline
        if deadline is not None:
            delay_s = max(0, deadline - self._clock()) / 1e9
            self._timer = self._loop.call_later(delay_s, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_deadline = None
        deadline = self.uart.next_deadline_ns()
        if deadline is not None and self._clock() < deadline:
            self._arm_timer()
            return
        self.uart.poll()
        changes = self()
        if self._server is not None:
            self._server.push_irq(changes)


def _collapse(changes: list[bool]) -> list[bool]:
    """Drop repeats of the same level (a change list alternates by definition)."""
    out: list[bool] = []
    for level in changes:
        if not out or out[-1] != level:
            out.append(level)
    return out


def accept_all_settle(
    uart: Uart16550, *, sink: Callable[[bytes], None] | None = None
) -> VirtualWire:
    """The default settle for tests and standalone use: a ``VirtualWire`` that takes all."""
    return VirtualWire(uart, sink=sink)


# -- the server -----------------------------------------------------------------------------


class _Connection(asyncio.BufferedProtocol):
    """One client connection; at most one per server is the guest.

    A ``BufferedProtocol``: the transport reads into one buffer per connection
    (``recv_into``) instead of allocating ``max_size`` (256 KiB) for every read, which glibc
    may serve with mmap/mremap/munmap, three more system calls per bus frame.
    """

    def __init__(self, server: BusServer, *, unix: bool) -> None:
        self._server = server
        self._unix = unix
        self._transport: asyncio.Transport | None = None
        self._decoder = FrameDecoder()
        self._hello = False
        self._is_guest = False
        self._irq_sent = False
        self._write_paused = False
        self._closing = False
        self._stall_timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self._claim_timer: asyncio.TimerHandle | None = None
        self._hello_timer: asyncio.TimerHandle | None = None
        self._claim_deadline = 0.0
        self._peer = "?"
        self.frames_executed = 0
        # Output of the frames being executed by _run, written with one transport.write
        # (one send: IRQ frames and the reply reach the guest together); None outside _run.
        self._out: bytearray | None = None
        self._unsettled = False  # posted writes not yet followed by a settle
        self._rbuf = bytearray(_READ_SIZE)
        self._rview = memoryview(self._rbuf)

    # -- transport callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        server = self._server
        transport.set_write_buffer_limits(high=server.high_water, low=server.high_water // 4)
        if not self._vet_peer(transport, transport.get_extra_info("socket")):
            server.log.warning("bus.peer_refused", uart=server.name, peer=self._peer)
            self._fail(ErrorCode.NOT_PERMITTED, "peer credentials refused")
            return
        if server.closing:
            self._fail(ErrorCode.SHUTTING_DOWN, "server is shutting down")
            return
        # A guest that just closed may not have been noticed yet (its EOF is in the same
        # poll batch): give the slot a short grace before answering BUSY.
        self._claim_deadline = asyncio.get_running_loop().time() + server.busy_grace_s
        self._try_claim()

    def _vet_peer(self, transport: asyncio.Transport, sock: socket.socket | None) -> bool:
        """Name the peer for the logs; False if ``peer_allowed`` refuses it (by SO_PEERCRED on
        the Unix socket; on TCP, by the uid owning the peer's socket when it is on this host)."""
        check = self._server.peer_allowed
        if self._unix and sock is not None:
            try:
                creds = peer_credentials(sock)
            except BusError:
                self._peer = "unknown"
                return check is None
            self._peer = f"pid={creds.pid} uid={creds.uid} gid={creds.gid}"
            return check is None or check(creds)
        self._peer = str(transport.get_extra_info("peername"))
        if check is None or sock is None:
            return True
        try:
            tcp_creds = tcp_peer_credentials(sock)
        except BusError:
            return False
        if tcp_creds is None:
            # A peer on another host, possible only on a non-loopback address the operator
            # configured: there is nothing to check it against.
            return True
        self._peer += f" uid={tcp_creds.uid}"
        return check(tcp_creds)

    def _try_claim(self) -> None:
        self._claim_timer = None
        server = self._server
        transport = self._transport
        if self._closing or transport is None:
            return
        if server._guest is None:
            server._guest = self
            self._is_guest = True
            server.log.info("bus.guest_connected", uart=server.name, peer=self._peer)
            # A peer holding the slot without ever completing HELLO (silent, or a garbage
            # length promising more bytes) would lock the UART's real guest out for good.
            self._hello_timer = asyncio.get_running_loop().call_later(
                server.hello_timeout_s, self._no_hello
            )
            transport.resume_reading()
            self._run()
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._claim_deadline:
            transport.pause_reading()
            self._claim_timer = loop.call_later(0.01, self._try_claim)
            return
        server.log.warning("bus.busy", uart=server.name, peer=self._peer)
        self._fail(ErrorCode.BUSY, f"UART {server.name} already has a guest")

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._rview

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self._rview[:nbytes]))

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._decoder.feed(data)
        if self._is_guest:
            self._run()
        elif self._transport is not None:
            self._transport.pause_reading()  # keep at most this batch until the slot is ours

    def eof_received(self) -> bool | None:
        if self._decoder.buffered:
            # A half frame and then EOF: say so, as for any other malformed input.
            self._fail(ErrorCode.MALFORMED, "connection closed in the middle of a frame")
            return True
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        for timer in (self._stall_timer, self._abort_timer, self._claim_timer, self._hello_timer):
            if timer is not None:
                timer.cancel()
        self._stall_timer = self._abort_timer = self._claim_timer = self._hello_timer = None
        server = self._server
        server._connections.discard(self)
        if self._is_guest and server._guest is self:
            server._guest = None
            server.log.info(
                "bus.guest_disconnected",
                uart=server.name,
                peer=self._peer,
                frames=self.frames_executed,
                error=str(exc) if exc else None,
            )
        self._transport = None

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._transport is not None:
            self._transport.pause_reading()
        if self._stall_timer is None and not self._closing:
            loop = asyncio.get_running_loop()
            self._stall_timer = loop.call_later(self._server.stall_timeout_s, self._stalled)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self._closing or self._transport is None:
            return
        if self._is_guest:
            self._transport.resume_reading()
            self._run()

    # -- frame execution --

    def _run(self) -> None:
        """Execute buffered frames back to back until none is left or output is backed up."""
        if self._out is not None:
            self._run_frames()  # re-entered: the outer call flushes
            return
        self._out = bytearray()
        try:
            self._run_frames()
            if self._unsettled:
                self._settle()  # posted writes of this batch reach the wire in this step
        except Exception:
            self._internal_error()
        finally:
            self._flush()
            self._out = None

    def _run_frames(self) -> None:
        decoder = self._decoder
        while not self._closing and not self._write_paused:
            try:
                frame = decoder.next_frame()
            except FrameError as exc:
                self._server.log.warning(
                    "bus.bad_frame", uart=self._server.name, peer=self._peer, error=str(exc)
                )
                self._fail(exc.code, exc.message)
                return
            if frame is None:
                return
            try:
                self._execute(frame)
            except FrameError as exc:
                self._fail(exc.code, exc.message)
                return
            except Exception:
                self._internal_error()
                return
            self.frames_executed += 1

    def _execute(self, frame: Frame) -> None:
        server = self._server
        uart = server.uart
        if not self._hello:
            if not isinstance(frame, Hello):
                raise FrameError(ErrorCode.PROTOCOL, "the first frame must be HELLO")
            if frame.version != PROTOCOL_VERSION:
                raise FrameError(
                    ErrorCode.VERSION_MISMATCH,
                    f"protocol version {frame.version} not supported; "
                    f"this server speaks {PROTOCOL_VERSION}",
                )
            self._hello = True
            if self._hello_timer is not None:
                self._hello_timer.cancel()
                self._hello_timer = None
            self._irq_sent = uart.irq
            self._send(
                encode(HelloReply(PROTOCOL_VERSION, SERVER_CAPABILITIES, uart.irq, server.name))
            )
            return
        # Posted writes are settled lazily: before anything that observes the device (a
        # reply), before a THR write that would overwrite an unsent byte, and at the end of
        # the batch. The guest cannot tell (every observation comes after a settle), and a
        # burst of THR writes leaves in one os.write (see docs/bus-protocol.md, "Settling").
        if isinstance(frame, Write):
            self._write_register(frame.offset, frame.value)
        elif isinstance(frame, Read):
            if self._unsettled:
                self._settle()
            value = uart.read(frame.offset)
            self._settle()
            self._send(frame_bytes(FrameType.READ_REPLY, bytes((frame.offset, value))))
        elif isinstance(frame, WriteN):
            offset = frame.offset
            for value in frame.data:
                self._write_register(offset, value)
        elif isinstance(frame, ReadN):
            data = self._read_n(frame.offset, frame.count)
            self._settle()
            self._send(frame_bytes(FrameType.READ_N_REPLY, bytes((frame.offset,)) + data))
        elif isinstance(frame, Sync):
            if self._unsettled:
                self._settle()
            self._send(frame_bytes(FrameType.SYNC_REPLY, U32.pack(frame.token)))
        elif isinstance(frame, Hello):
            raise FrameError(ErrorCode.PROTOCOL, "HELLO sent twice")
        else:
            raise FrameError(
                ErrorCode.PROTOCOL, f"{type(frame).__name__} is not sent by a guest"
            )

    def _internal_error(self) -> None:
        """Our own bug (or the daemon's settle failed): log it, tell the guest, disconnect."""
        exc = sys.exc_info()[1]
        self._server.log.exception("bus.internal_error", uart=self._server.name)
        self._unsettled = False
        self._fail(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}")

    def _write_register(self, offset: int, value: int) -> None:
        """A posted write. Only THR writes are left unsettled: any other register write may
        flush, loop back or re-time what waits, so the wire takes it first; so it does
        before a THR write that would overwrite an unsent byte."""
        uart = self._server.uart
        if self._unsettled and (
            offset != THR or uart.dlab or uart.tx_full()
        ):
            self._settle()
        uart.write(offset, value)
        self._unsettled = True

    def _read_n(self, offset: int, count: int) -> bytes:
        """READ_N: ``count`` reads of ``offset``; RBR reads stop at DR=0 or a pending error.

        For RBR (offset 0, DLAB=0) the stop rule is evaluated on LSR as it stands, without
        LSR's read side effects. When the RX FIFO runs dry the burst settles once, so the
        port can refill it from what it already read (as a back end delivers input between
        two guest reads), and goes on while data keeps coming.
        """
        uart = self._server.uart
        read = uart.read
        if self._unsettled:
            self._settle()
        if offset != RBR or uart.dlab:
            return bytes([read(offset) for _ in range(count)])
        data = bytearray()
        while len(data) < count:
            available = uart.rx_readable()
            if not available:
                self._settle()
                available = uart.rx_readable()
                if not available:
                    break
            data += bytes([read(RBR) for _ in range(min(count - len(data), available))])
        return bytes(data)

    def _settle(self) -> None:
        self._unsettled = False
        self.send_irq(self._server.settle())

    def send_irq(self, levels: Sequence[bool]) -> None:
        """IRQ frames for the levels that differ from the last one the guest was told."""
        if not self._hello or self._closing:
            return
        for level in levels:
            if level != self._irq_sent:
                self._irq_sent = level
                self._send(_IRQ_HIGH if level else _IRQ_LOW)

    def _send(self, data: bytes) -> None:
        out = self._out
        if out is not None:
            out += data
            if len(out) >= _OUT_BATCH:
                self._flush()  # lets pause_writing stop the batch near the high-water mark
            return
        self._write(data)

    def _flush(self) -> None:
        out = self._out
        if out:
            data = bytes(out)
            out.clear()
            self._write(data)

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or self._closing:
            return
        transport.write(data)
        if transport.get_write_buffer_size() > self._server.hard_limit:
            self._server.log.warning(
                "bus.output_overflow", uart=self._server.name, peer=self._peer
            )
            self._closing = True
            transport.abort()

    def _no_hello(self) -> None:
        self._hello_timer = None
        if self._hello or self._closing:
            return
        self._server.log.warning("bus.no_hello", uart=self._server.name, peer=self._peer)
        self._fail(
            ErrorCode.PROTOCOL, f"no complete HELLO within {self._server.hello_timeout_s:g} s"
        )

    def _stalled(self) -> None:
        self._stall_timer = None
        if self._transport is None or self._closing:
            return
        self._server.log.warning("bus.guest_stalled", uart=self._server.name, peer=self._peer)
        self._closing = True
        self._transport.abort()

    def _fail(self, code: ErrorCode, message: str) -> None:
        """Send an ERROR frame, then close (aborting if the peer does not take it)."""
        self._flush()  # the replies to earlier frames go first
        transport = self._transport
        if transport is None or self._closing:
            return
        transport.write(encode(ErrorFrame(int(code), message)))
        self._closing = True
        transport.close()
        loop = asyncio.get_running_loop()
        self._abort_timer = loop.call_later(self._server.close_grace_s, transport.abort)

    def shutdown(self) -> None:
        """The server is closing: tell the peer, then close."""
        self._fail(ErrorCode.SHUTTING_DOWN, "server is shutting down")


_OUT_BATCH = 16 * 1024
_READ_SIZE = 64 * 1024
_IRQ_HIGH = frame_bytes(FrameType.IRQ, b"\x01")
_IRQ_LOW = frame_bytes(FrameType.IRQ, b"\x00")


class BusServer:
    """Serves one UART on a Unix socket (and optionally TCP) to at most one guest at a time."""

    def __init__(
        self,
        uart: Uart16550,
        *,
        name: str,
        settle: Callable[[], Sequence[bool]],
        peer_allowed: Callable[[PeerCredentials], bool] | None = None,
        log: Any = None,
        high_water: int = 64 * 1024,
        stall_timeout_s: float = 30.0,
        close_grace_s: float = 1.0,
        busy_grace_s: float = 0.25,
        hello_timeout_s: float = 5.0,
    ) -> None:
        """A server for ``uart`` named ``name`` (≤ 255 UTF-8 bytes; sent in HELLO_REPLY).

        ``settle`` is called after every operation that touched the model and returns the
        IRQ level changes, in order, since its last call. ``peer_allowed`` vets Unix-socket
        peers by their kernel credentials (None: everyone who may open the socket file).
        ``high_water`` bounds the output buffered for a guest before the server stops
        executing its frames; a guest that does not drain it for ``stall_timeout_s`` is
        dropped. A connection finding the guest slot taken waits up to ``busy_grace_s`` for
        it (a guest reconnecting may race its own hang-up) before it is refused with BUSY.
        A guest that has not completed HELLO ``hello_timeout_s`` after taking the slot is
        refused with PROTOCOL and closed, freeing the slot.
        """
        if len(name.encode()) > MAX_NAME_LEN:
            raise ValueError(f"UART name longer than {MAX_NAME_LEN} bytes: {name!r}")
        self.uart = uart
        self.name = name
        self.settle = settle
        self.peer_allowed = peer_allowed
        self.log: Any = log if log is not None else structlog.get_logger("uartbridge.bus")
        self.high_water = high_water
        # Past this the guest is dropped (only unsolicited IRQ frames can grow it that far).
        self.hard_limit = max(16 * high_water, 1 << 20)
        self.stall_timeout_s = stall_timeout_s
        self.close_grace_s = close_grace_s
        self.busy_grace_s = busy_grace_s
        self.hello_timeout_s = hello_timeout_s
        self.closing = False
        self._guest: _Connection | None = None
        self._connections: set[_Connection] = set()
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[tuple[Path, int]] = []

    def _protocol_factory(self, *, unix: bool) -> Callable[[], _Connection]:
        def factory() -> _Connection:
            conn = _Connection(self, unix=unix)
            self._connections.add(conn)
            return conn

        return factory

    async def start_unix(self, path: Path, *, mode: int = 0o660) -> None:
        """Listen on a Unix socket at ``path`` (a stale socket file is replaced)."""
        path = Path(path)
        sock = bind_unix(path, mode)
        inode = os.stat(path).st_ino
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_unix_server(self._protocol_factory(unix=True), sock=sock)
        except OSError as exc:
            sock.close()
            raise BusError(f"cannot listen on {path}: {exc}") from exc
        self._servers.append(server)
        self._unix_paths.append((path, inode))
        self.log.info("bus.listening", uart=self.name, socket=str(path))

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on TCP (loopback unless told otherwise); returns the bound (host, port).

        A peer on this host is checked with ``peer_allowed`` by the uid that owns its socket
        (``/proc/net/tcp``); a peer on another host (a non-loopback ``host``) is admitted.
        """
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(
                self._protocol_factory(unix=False), host, port, reuse_address=True
            )
        except OSError as exc:
            raise BusError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        for sock in server.sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._servers.append(server)
        bound = server.sockets[0].getsockname()
        self.log.info("bus.listening", uart=self.name, tcp=f"{bound[0]}:{bound[1]}")
        return str(bound[0]), int(bound[1])

    def push_irq(self, levels: Sequence[bool]) -> None:
        """IRQ changes that happened outside bus operations (port input, timers)."""
        guest = self._guest
        if guest is not None and levels:
            guest.send_irq(levels)

    @property
    def guest_connected(self) -> bool:
        """A guest holds this UART's bus connection."""
        return self._guest is not None

    async def close(self) -> None:
        """Stop listening, close every connection (the guest is told), remove socket files."""
        self.closing = True
        for server in self._servers:
            server.close()
        for conn in list(self._connections):
            conn.shutdown()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout=self.close_grace_s + 1)
        self._servers.clear()
        for path, inode in self._unix_paths:
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == inode:
                    path.unlink()
        self._unix_paths.clear()
        # Give transports a turn to flush the ERROR frame and close.
        for _ in range(3):
            if not self._connections:
                break
            await asyncio.sleep(0)
