"""The bus frame codec: pure, bytes in and frame values out (``docs/bus-protocol.md``).

Every frame is::

    u16 length (big-endian; counts the type byte and the payload, 1..MAX_FRAME_LEN)
    u8  type
    payload (length - 1 bytes)

``encode`` and ``FrameDecoder`` know no sockets and no model; any violation is a
``FrameError`` carrying the ``ErrorCode`` to send back.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

from ..errors import BusError

PROTOCOL_VERSION = 2  # the newest; a server speaks every version in SUPPORTED_VERSIONS
SUPPORTED_VERSIONS = (1, 2)
HEADER = struct.Struct(">HB")  # length, type
HEADER_SIZE = 2  # the length field alone; the type byte is counted by the length
MAX_FRAME_LEN = 4096  # type byte + payload
MAX_PAYLOAD = MAX_FRAME_LEN - 1
MAX_BURST = MAX_PAYLOAD - 1  # WRITE_N data, READ_N count, READ_N_REPLY data
MAX_NAME_LEN = 255
NUM_REGISTERS = 8

_U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
_OFF_U16 = struct.Struct(">BH")
U64 = struct.Struct(">Q")
#: DEADLINE's value for "no timer armed".
NO_DEADLINE = (1 << 64) - 1
_HELLO_REPLY = struct.Struct(">HIB")


class FrameType(IntEnum):
    """The type byte. Guest → server types are < 0x80; server → guest ones ≥ 0x80."""

    HELLO = 0x01
    READ = 0x02
    WRITE = 0x03
    WRITE_N = 0x04
    READ_N = 0x05
    SYNC = 0x06
    TIME = 0x07  # v2
    HELLO_REPLY = 0x81
    READ_REPLY = 0x82
    READ_N_REPLY = 0x85
    SYNC_REPLY = 0x86
    IRQ = 0x90
    DEADLINE = 0x91  # v2
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
    BAD_TIME = 12  # v2: a TIME earlier than the one before


class Capability(IntFlag):
    """The capabilities bitmask of HELLO_REPLY. Guests ignore bits they do not know."""

    BURST = 0x01  # WRITE_N and READ_N
    SYNC = 0x02  # SYNC / SYNC_REPLY
    IRQ_EVENTS = 0x04  # IRQ frames on every level change
    HELLO_TOKEN = 0x08  # HELLO's TOKEN field is understood (TCP peers may authenticate)
    GUEST_TIME = 0x10  # v2, negotiated: the guest drives the device's clock (TIME, DEADLINE)
    LINE_PACE = 0x20  # v2, informative: the UART moves bytes at the line rate (pace = line)


SERVER_CAPABILITIES = (
    Capability.BURST | Capability.SYNC | Capability.IRQ_EVENTS | Capability.HELLO_TOKEN
)


class HelloField(IntEnum):
    """Tags of the optional fields after HELLO's version (``u8 tag, u8 length, value``)."""

    TOKEN = 0x01  # an authentication token, 1..255 bytes (docs/bus-protocol.md §1.1)
    CAPS = 0x02  # v2: u32, the negotiable capabilities the guest asks for (GUEST_TIME)
    TIME = 0x03  # v2: u64, the guest's time now in ns (with GUEST_TIME)


MAX_TOKEN_LEN = 255


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
    """Guest → server, first frame: the protocol version the guest speaks (and a token).

    ``token`` authenticates a TCP peer the server cannot identify by its uid; it is left
    out of ``repr`` so that it never reaches a log. v2: ``caps`` asks for negotiable
    capabilities (``Capability.GUEST_TIME``), ``time_ns`` is the guest's time now.
    """

    version: int = PROTOCOL_VERSION
    token: bytes | None = field(default=None, repr=False)
    caps: int = 0
    time_ns: int | None = None


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
class Time:
    """v2, guest → server (posted): the guest's time is now ``now_ns``."""

    now_ns: int


@dataclass(frozen=True, slots=True)
class Deadline:
    """v2, server → guest, unsolicited: the device's next timer falls due at ``deadline_ns``
    of the guest's time (None: no timer armed)."""

    deadline_ns: int | None


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
    | Time
    | Deadline
    | IrqEvent
    | ErrorFrame
)


# -- codec ----------------------------------------------------------------------------------


def _check_offset(offset: int) -> None:
    if not 0 <= offset < NUM_REGISTERS:
        raise FrameError(ErrorCode.BAD_OFFSET, f"register offset must be 0..7, got {offset}")


def frame_bytes(kind: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload) + 1, kind) + payload


def _check_byte(name: str, value: int) -> None:
    if not 0 <= value <= 0xFF:
        raise FrameError(ErrorCode.MALFORMED, f"{name} must be 0..255, got {value}")


def encode(frame: Frame) -> bytes:
    """The bytes of one frame; raises ``FrameError`` for a value the protocol cannot carry."""
    if isinstance(frame, Read):
        _check_offset(frame.offset)
        return frame_bytes(FrameType.READ, bytes((frame.offset,)))
    if isinstance(frame, Write):
        _check_offset(frame.offset)
        _check_byte("value", frame.value)
        return frame_bytes(FrameType.WRITE, bytes((frame.offset, frame.value)))
    if isinstance(frame, ReadReply):
        _check_offset(frame.offset)
        _check_byte("value", frame.value)
        return frame_bytes(FrameType.READ_REPLY, bytes((frame.offset, frame.value)))
    if isinstance(frame, IrqEvent):
        return frame_bytes(FrameType.IRQ, b"\x01" if frame.level else b"\x00")
    if isinstance(frame, WriteN | ReadNReply):
        _check_offset(frame.offset)
        data = bytes(frame.data)
        if isinstance(frame, WriteN) and not data:
            raise FrameError(ErrorCode.MALFORMED, "WRITE_N needs at least one byte")
        if len(data) > MAX_BURST:
            raise FrameError(ErrorCode.MALFORMED, f"at most {MAX_BURST} bytes per burst")
        kind = FrameType.WRITE_N if isinstance(frame, WriteN) else FrameType.READ_N_REPLY
        return frame_bytes(kind, bytes((frame.offset,)) + data)
    if isinstance(frame, ReadN):
        _check_offset(frame.offset)
        if not 1 <= frame.count <= MAX_BURST:
            raise FrameError(ErrorCode.MALFORMED, f"READ_N count must be 1..{MAX_BURST}")
        return frame_bytes(FrameType.READ_N, _OFF_U16.pack(frame.offset, frame.count))
    if isinstance(frame, Sync | SyncReply):
        if not 0 <= frame.token <= 0xFFFFFFFF:
            raise FrameError(ErrorCode.MALFORMED, "SYNC token must fit in 32 bits")
        kind = FrameType.SYNC if isinstance(frame, Sync) else FrameType.SYNC_REPLY
        return frame_bytes(kind, U32.pack(frame.token))
    if isinstance(frame, Time | Deadline):
        value = frame.now_ns if isinstance(frame, Time) else frame.deadline_ns
        if value is None:
            value = NO_DEADLINE
        elif not 0 <= value < NO_DEADLINE:
            raise FrameError(ErrorCode.MALFORMED, "a time must be 0..2**64-2 ns")
        kind = FrameType.TIME if isinstance(frame, Time) else FrameType.DEADLINE
        return frame_bytes(kind, U64.pack(value))
    if isinstance(frame, Hello):
        if not 0 <= frame.version <= 0xFFFF:
            raise FrameError(ErrorCode.MALFORMED, "version must fit in 16 bits")
        payload = _U16.pack(frame.version)
        if frame.token is not None:
            if not 1 <= len(frame.token) <= MAX_TOKEN_LEN:
                raise FrameError(ErrorCode.MALFORMED, f"token must be 1..{MAX_TOKEN_LEN} bytes")
            payload += bytes((HelloField.TOKEN, len(frame.token))) + frame.token
        if frame.caps:
            if not 0 <= frame.caps <= 0xFFFFFFFF:
                raise FrameError(ErrorCode.MALFORMED, "caps must fit in 32 bits")
            payload += bytes((HelloField.CAPS, 4)) + U32.pack(frame.caps)
        if frame.time_ns is not None:
            if not 0 <= frame.time_ns < NO_DEADLINE:
                raise FrameError(ErrorCode.MALFORMED, "a time must be 0..2**64-2 ns")
            payload += bytes((HelloField.TIME, 8)) + U64.pack(frame.time_ns)
        return frame_bytes(FrameType.HELLO, payload)
    if isinstance(frame, HelloReply):
        name = frame.name.encode()
        if len(name) > MAX_NAME_LEN:
            raise FrameError(ErrorCode.MALFORMED, f"name longer than {MAX_NAME_LEN} bytes")
        if not 0 <= frame.version <= 0xFFFF or not 0 <= frame.capabilities <= 0xFFFFFFFF:
            raise FrameError(ErrorCode.MALFORMED, "version or capabilities out of range")
        head = _HELLO_REPLY.pack(frame.version, frame.capabilities, 1 if frame.irq else 0)
        return frame_bytes(FrameType.HELLO_REPLY, head + name)
    if isinstance(frame, ErrorFrame):
        _check_byte("error code", frame.code)
        message = frame.message.encode()[: MAX_PAYLOAD - 1]
        return frame_bytes(FrameType.ERROR, bytes((frame.code,)) + message)
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
    return Sync(U32.unpack(payload)[0])


def _decode_hello(payload: bytes) -> Frame:
    # After the version: optional fields (u8 tag, u8 length, value). Unknown tags are skipped;
    # a tail that is not a whole field ends the list (v1 called these bytes "reserved").
    if len(payload) < 2:
        raise FrameError(ErrorCode.MALFORMED, "HELLO payload must hold a u16 version")
    token = None
    caps = 0
    time_ns = None
    pos = 2
    while pos + 2 <= len(payload):
        tag, size = payload[pos], payload[pos + 1]
        value = payload[pos + 2 : pos + 2 + size]
        if len(value) < size:
            break
        if tag == HelloField.TOKEN and size:
            token = value
        elif tag == HelloField.CAPS and size == 4:
            caps = U32.unpack(value)[0]
        elif tag == HelloField.TIME and size == 8:
            time_ns = U64.unpack(value)[0]
        pos += 2 + size
    return Hello(_U16.unpack_from(payload)[0], token, caps, time_ns)


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
    return SyncReply(U32.unpack(payload)[0])


def _decode_time(payload: bytes) -> Frame:
    _expect_size(FrameType.TIME, payload, 8)
    now_ns = U64.unpack(payload)[0]
    if now_ns == NO_DEADLINE:
        raise FrameError(ErrorCode.MALFORMED, "TIME must be 0..2**64-2 ns")
    return Time(now_ns)


def _decode_deadline(payload: bytes) -> Frame:
    _expect_size(FrameType.DEADLINE, payload, 8)
    value = U64.unpack(payload)[0]
    return Deadline(None if value == NO_DEADLINE else value)


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
    FrameType.TIME: _decode_time,
    FrameType.HELLO_REPLY: _decode_hello_reply,
    FrameType.READ_REPLY: _decode_read_reply,
    FrameType.READ_N_REPLY: _decode_read_n_reply,
    FrameType.SYNC_REPLY: _decode_sync_reply,
    FrameType.IRQ: _decode_irq,
    FrameType.DEADLINE: _decode_deadline,
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

    def feed(self, data: bytes | bytearray | memoryview) -> None:
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
