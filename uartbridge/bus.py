"""The register bus: the frame codec and the asyncio server that puts a UART on a socket.

Theory of operation
-------------------
A guest (an emulator, ``uartbridge.client``, the reference driver) connects to one socket per
UART and speaks length-prefixed binary frames (``docs/bus-protocol.md`` is the normative
description; this module is one implementation of it). Every frame is::

    u16 length (big-endian; counts the type byte and the payload, 1..MAX_FRAME_LEN)
    u8  type
    payload (length - 1 bytes)

The codec (``encode``, ``FrameDecoder``) is pure: bytes in, frame values out, and any
violation is a ``FrameError`` carrying the ``ErrorCode`` to send back. The server side is an
``asyncio.Protocol`` so that all frames of one ``read()`` batch are executed back to back
inside one callback: a checkpoint (another callback on the same loop) always falls *between*
two bus operations, never inside one.

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
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from pathlib import Path
from typing import Any

import structlog

from .errors import BusError
from .registers import FIFO_SIZE, RBR, THR
from .sockets import PeerCredentials, bind_unix, peer_credentials, tcp_peer_credentials
from .uart import Clock, Uart16550

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">HB")  # length, type
HEADER_SIZE = 2  # the length field alone; the type byte is counted by the length
MAX_FRAME_LEN = 4096  # type byte + payload
MAX_PAYLOAD = MAX_FRAME_LEN - 1
MAX_BURST = MAX_PAYLOAD - 1  # WRITE_N data, READ_N count, READ_N_REPLY data
MAX_NAME_LEN = 255
NUM_REGISTERS = 8

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_OFF_U16 = struct.Struct(">BH")
_HELLO_REPLY = struct.Struct(">HIB")


class FrameType(IntEnum):
    """The type byte. Guest → server types are < 0x80; server → guest ones ≥ 0x80."""

    HELLO = 0x01
    READ = 0x02
    WRITE = 0x03
    WRITE_N = 0x04
    READ_N = 0x05
    SYNC = 0x06
    HELLO_REPLY = 0x81
    READ_REPLY = 0x82
    READ_N_REPLY = 0x85
    SYNC_REPLY = 0x86
    IRQ = 0x90
    ERROR = 0xFF


class ErrorCode(IntEnum):
    """The code of an ERROR frame. The server closes the connection after sending one."""

    MALFORMED = 1  # a payload of the wrong size or content for its type, or length 0
    UNKNOWN_TYPE = 2  # a type byte this version does not define
    BAD_OFFSET = 3  # a register offset outside 0..7
    VERSION_MISMATCH = 4  # HELLO asked for a protocol version the server does not speak
    BUSY = 5  # another guest is connected to this UART
    FRAME_TOO_LARGE = 6  # a length above MAX_FRAME_LEN
    PROTOCOL = 7  # a valid frame at the wrong time (no HELLO first, a second HELLO, a reply)
    NOT_PERMITTED = 8  # the peer's credentials are refused
    STALLED = 9  # the guest did not read what the server sent for too long
    SHUTTING_DOWN = 10  # the server is closing
    INTERNAL = 11  # the server failed (a bug); the device state is unchanged by the frame


class Capability(IntFlag):
    """The capabilities bitmask of HELLO_REPLY. Guests ignore bits they do not know."""

    BURST = 0x01  # WRITE_N and READ_N
    SYNC = 0x02  # SYNC / SYNC_REPLY
    IRQ_EVENTS = 0x04  # IRQ frames on every level change


SERVER_CAPABILITIES = Capability.BURST | Capability.SYNC | Capability.IRQ_EVENTS


class FrameError(BusError):
    """A frame that breaks the protocol; ``code`` is what goes into the ERROR frame."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class BusRefusedError(BusError):
    """The server sent an ERROR frame (and closed the connection)."""

    def __init__(self, code: int, message: str) -> None:
        try:
            name = ErrorCode(code).name
        except ValueError:
            name = f"code {code}"
        super().__init__(f"bus server error {name}: {message}")
        self.code = code
        self.message = message


# -- frame values ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """Guest → server, first frame: the protocol version the guest speaks."""

    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class HelloReply:
    """Server → guest: version, capabilities, the IRQ level now, the UART's name."""

    version: int
    capabilities: int
    irq: bool
    name: str


@dataclass(frozen=True, slots=True)
class Read:
    """Read one register."""

    offset: int


@dataclass(frozen=True, slots=True)
class ReadReply:
    """The value a READ returned."""

    offset: int
    value: int


@dataclass(frozen=True, slots=True)
class Write:
    """Write one register (posted: no reply)."""

    offset: int
    value: int


@dataclass(frozen=True, slots=True)
class WriteN:
    """``len(data)`` writes to one offset, in order (posted: no reply)."""

    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ReadN:
    """Up to ``count`` reads of one offset; offset 0 with DLAB=0 stops early (see docs)."""

    offset: int
    count: int


@dataclass(frozen=True, slots=True)
class ReadNReply:
    """The values a READ_N returned (possibly fewer than asked, possibly none)."""

    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Sync:
    """A barrier: the reply comes after everything sent before it has been executed."""

    token: int


@dataclass(frozen=True, slots=True)
class SyncReply:
    """The answer to SYNC, same token."""

    token: int


@dataclass(frozen=True, slots=True)
class IrqEvent:
    """Server → guest, unsolicited: the IRQ line changed to ``level``."""

    level: bool


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """Server → guest: why the connection is about to be closed."""

    code: int
    message: str


Frame = (
    Hello
    | HelloReply
    | Read
    | ReadReply
    | Write
    | WriteN
    | ReadN
    | ReadNReply
    | Sync
    | SyncReply
    | IrqEvent
    | ErrorFrame
)


# -- codec ----------------------------------------------------------------------------------


def _check_offset(offset: int) -> None:
    if not 0 <= offset < NUM_REGISTERS:
        raise FrameError(ErrorCode.BAD_OFFSET, f"register offset must be 0..7, got {offset}")


def _frame(kind: FrameType, payload: bytes) -> bytes:
    return HEADER.pack(len(payload) + 1, kind) + payload


def _check_byte(name: str, value: int) -> None:
    if not 0 <= value <= 0xFF:
        raise FrameError(ErrorCode.MALFORMED, f"{name} must be 0..255, got {value}")


def encode(frame: Frame) -> bytes:
    """The bytes of one frame; raises ``FrameError`` for a value the protocol cannot carry."""
    if isinstance(frame, Read):
        _check_offset(frame.offset)
        return _frame(FrameType.READ, bytes((frame.offset,)))
    if isinstance(frame, Write):
        _check_offset(frame.offset)
        _check_byte("value", frame.value)
        return _frame(FrameType.WRITE, bytes((frame.offset, frame.value)))
    if isinstance(frame, ReadReply):
        _check_offset(frame.offset)
        _check_byte("value", frame.value)
        return _frame(FrameType.READ_REPLY, bytes((frame.offset, frame.value)))
    if isinstance(frame, IrqEvent):
        return _frame(FrameType.IRQ, b"\x01" if frame.level else b"\x00")
    if isinstance(frame, WriteN | ReadNReply):
        _check_offset(frame.offset)
        data = bytes(frame.data)
        if isinstance(frame, WriteN) and not data:
            raise FrameError(ErrorCode.MALFORMED, "WRITE_N needs at least one byte")
        if len(data) > MAX_BURST:
            raise FrameError(ErrorCode.MALFORMED, f"at most {MAX_BURST} bytes per burst")
        kind = FrameType.WRITE_N if isinstance(frame, WriteN) else FrameType.READ_N_REPLY
        return _frame(kind, bytes((frame.offset,)) + data)
    if isinstance(frame, ReadN):
        _check_offset(frame.offset)
        if not 1 <= frame.count <= MAX_BURST:
            raise FrameError(ErrorCode.MALFORMED, f"READ_N count must be 1..{MAX_BURST}")
        return _frame(FrameType.READ_N, _OFF_U16.pack(frame.offset, frame.count))
    if isinstance(frame, Sync | SyncReply):
        if not 0 <= frame.token <= 0xFFFFFFFF:
            raise FrameError(ErrorCode.MALFORMED, "SYNC token must fit in 32 bits")
        kind = FrameType.SYNC if isinstance(frame, Sync) else FrameType.SYNC_REPLY
        return _frame(kind, _U32.pack(frame.token))
    if isinstance(frame, Hello):
        if not 0 <= frame.version <= 0xFFFF:
            raise FrameError(ErrorCode.MALFORMED, "version must fit in 16 bits")
        return _frame(FrameType.HELLO, _U16.pack(frame.version))
    if isinstance(frame, HelloReply):
        name = frame.name.encode()
        if len(name) > MAX_NAME_LEN:
            raise FrameError(ErrorCode.MALFORMED, f"name longer than {MAX_NAME_LEN} bytes")
        if not 0 <= frame.version <= 0xFFFF or not 0 <= frame.capabilities <= 0xFFFFFFFF:
            raise FrameError(ErrorCode.MALFORMED, "version or capabilities out of range")
        head = _HELLO_REPLY.pack(frame.version, frame.capabilities, 1 if frame.irq else 0)
        return _frame(FrameType.HELLO_REPLY, head + name)
    if isinstance(frame, ErrorFrame):
        _check_byte("error code", frame.code)
        message = frame.message.encode()[: MAX_PAYLOAD - 1]
        return _frame(FrameType.ERROR, bytes((frame.code,)) + message)
    raise TypeError(f"not a frame: {frame!r}")


def _expect_size(kind: FrameType, payload: bytes, size: int) -> None:
    if len(payload) != size:
        raise FrameError(
            ErrorCode.MALFORMED,
            f"{kind.name} payload must be {size} bytes, got {len(payload)}",
        )


def _decode_read(payload: bytes) -> Frame:
    _expect_size(FrameType.READ, payload, 1)
    _check_offset(payload[0])
    return Read(payload[0])


def _decode_write(payload: bytes) -> Frame:
    _expect_size(FrameType.WRITE, payload, 2)
    _check_offset(payload[0])
    return Write(payload[0], payload[1])


def _decode_write_n(payload: bytes) -> Frame:
    if len(payload) < 2:
        raise FrameError(ErrorCode.MALFORMED, "WRITE_N needs an offset and at least one byte")
    _check_offset(payload[0])
    return WriteN(payload[0], payload[1:])


def _decode_read_n(payload: bytes) -> Frame:
    _expect_size(FrameType.READ_N, payload, 3)
    offset, count = _OFF_U16.unpack(payload)
    _check_offset(offset)
    if not 1 <= count <= MAX_BURST:
        raise FrameError(ErrorCode.MALFORMED, f"READ_N count must be 1..{MAX_BURST}, got {count}")
    return ReadN(offset, count)


def _decode_sync(payload: bytes) -> Frame:
    _expect_size(FrameType.SYNC, payload, 4)
    return Sync(_U32.unpack(payload)[0])


def _decode_hello(payload: bytes) -> Frame:
    # Bytes after the version are reserved for later versions and ignored by version 1.
    if len(payload) < 2:
        raise FrameError(ErrorCode.MALFORMED, "HELLO payload must hold a u16 version")
    return Hello(_U16.unpack_from(payload)[0])


def _decode_hello_reply(payload: bytes) -> Frame:
    if not _HELLO_REPLY.size <= len(payload) <= _HELLO_REPLY.size + MAX_NAME_LEN:
        raise FrameError(ErrorCode.MALFORMED, "HELLO_REPLY payload has the wrong size")
    version, caps, irq = _HELLO_REPLY.unpack_from(payload)
    if irq > 1:
        raise FrameError(ErrorCode.MALFORMED, f"IRQ level must be 0 or 1, got {irq}")
    try:
        name = payload[_HELLO_REPLY.size :].decode()
    except UnicodeDecodeError as exc:
        raise FrameError(ErrorCode.MALFORMED, "HELLO_REPLY name is not UTF-8") from exc
    return HelloReply(version, caps, bool(irq), name)


def _decode_read_reply(payload: bytes) -> Frame:
    _expect_size(FrameType.READ_REPLY, payload, 2)
    _check_offset(payload[0])
    return ReadReply(payload[0], payload[1])


def _decode_read_n_reply(payload: bytes) -> Frame:
    if not payload:
        raise FrameError(ErrorCode.MALFORMED, "READ_N_REPLY needs an offset")
    _check_offset(payload[0])
    return ReadNReply(payload[0], payload[1:])


def _decode_sync_reply(payload: bytes) -> Frame:
    _expect_size(FrameType.SYNC_REPLY, payload, 4)
    return SyncReply(_U32.unpack(payload)[0])


def _decode_irq(payload: bytes) -> Frame:
    _expect_size(FrameType.IRQ, payload, 1)
    if payload[0] > 1:
        raise FrameError(ErrorCode.MALFORMED, f"IRQ level must be 0 or 1, got {payload[0]}")
    return IrqEvent(payload[0] == 1)


def _decode_error(payload: bytes) -> Frame:
    if not payload:
        raise FrameError(ErrorCode.MALFORMED, "ERROR needs a code")
    return ErrorFrame(payload[0], payload[1:].decode(errors="replace"))


_DECODERS: dict[int, Callable[[bytes], Frame]] = {
    FrameType.HELLO: _decode_hello,
    FrameType.READ: _decode_read,
    FrameType.WRITE: _decode_write,
    FrameType.WRITE_N: _decode_write_n,
    FrameType.READ_N: _decode_read_n,
    FrameType.SYNC: _decode_sync,
    FrameType.HELLO_REPLY: _decode_hello_reply,
    FrameType.READ_REPLY: _decode_read_reply,
    FrameType.READ_N_REPLY: _decode_read_n_reply,
    FrameType.SYNC_REPLY: _decode_sync_reply,
    FrameType.IRQ: _decode_irq,
    FrameType.ERROR: _decode_error,
}


def decode_frame(kind: int, payload: bytes) -> Frame:
    """The frame value of a type byte and its payload; ``FrameError`` if it is not one."""
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise FrameError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {kind:#04x}")
    return decoder(payload)


class FrameDecoder:
    """Splits a byte stream into frames. Feed bytes, then take frames one at a time.

    A length of 0 or above ``MAX_FRAME_LEN`` is refused as soon as the two length bytes are
    in, so the buffer never grows beyond what was fed plus one frame. After a
    ``FrameError`` the stream is out of sync: the decoder stays broken (every call raises).
    """

    __slots__ = ("_buf", "_error", "_pos")

    def __init__(self) -> None:
        """An empty decoder."""
        self._buf = bytearray()
        self._pos = 0
        self._error: FrameError | None = None

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > 65536:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames."""
        return len(self._buf) - self._pos

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes are fed."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < HEADER_SIZE:
            return None
        length = (buf[pos] << 8) | buf[pos + 1]
        if length == 0 or length > MAX_FRAME_LEN:
            code = ErrorCode.MALFORMED if length == 0 else ErrorCode.FRAME_TOO_LARGE
            self._error = FrameError(
                code, f"frame length {length} outside 1..{MAX_FRAME_LEN}"
            )
            raise self._error
        end = pos + HEADER_SIZE + length
        if len(buf) < end:
            return None
        kind = buf[pos + HEADER_SIZE]
        payload = bytes(buf[pos + HEADER_SIZE + 1 : end])
        self._pos = end
        try:
            return decode_frame(kind, payload)
        except FrameError as exc:
            self._error = exc
            raise

    def frames(self) -> list[Frame]:
        """Every complete frame buffered now."""
        out: list[Frame] = []
        while (frame := self.next_frame()) is not None:
            out.append(frame)
        return out


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
            self._send(_frame(FrameType.READ_REPLY, bytes((frame.offset, value))))
        elif isinstance(frame, WriteN):
            offset = frame.offset
            for value in frame.data:
                self._write_register(offset, value)
        elif isinstance(frame, ReadN):
            data = self._read_n(frame.offset, frame.count)
            self._settle()
            self._send(_frame(FrameType.READ_N_REPLY, bytes((frame.offset,)) + data))
        elif isinstance(frame, Sync):
            if self._unsettled:
                self._settle()
            self._send(_frame(FrameType.SYNC_REPLY, _U32.pack(frame.token)))
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
_IRQ_HIGH = _frame(FrameType.IRQ, b"\x01")
_IRQ_LOW = _frame(FrameType.IRQ, b"\x00")


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


__all__ = [
    "MAX_BURST",
    "MAX_FRAME_LEN",
    "PROTOCOL_VERSION",
    "SERVER_CAPABILITIES",
    "BusRefusedError",
    "BusServer",
    "Capability",
    "ErrorCode",
    "ErrorFrame",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "FrameType",
    "Hello",
    "HelloReply",
    "IrqEvent",
    "Read",
    "ReadN",
    "ReadNReply",
    "ReadReply",
    "Sync",
    "SyncReply",
    "VirtualWire",
    "Write",
    "WriteN",
    "accept_all_settle",
    "decode_frame",
    "encode",
]
