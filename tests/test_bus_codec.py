"""The bus frame codec: round trips, and what it refuses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uartbridge.bus import (
    MAX_BURST,
    MAX_FRAME_LEN,
    NO_DEADLINE,
    Capability,
    Deadline,
    ErrorCode,
    ErrorFrame,
    Frame,
    FrameDecoder,
    FrameError,
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
    Write,
    WriteN,
    encode,
)
from uartbridge.errors import BusError

offsets = st.integers(0, 7)
bytes8 = st.integers(0, 255)
u32 = st.integers(0, 0xFFFFFFFF)
times = st.integers(0, NO_DEADLINE - 1)

frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(Hello, st.integers(0, 0xFFFF)),
    st.builds(Hello, st.integers(0, 0xFFFF), st.none(), u32, st.one_of(st.none(), times)),
    st.builds(Time, times),
    st.builds(Deadline, st.one_of(st.none(), times)),
    st.builds(
        HelloReply,
        st.integers(0, 0xFFFF),
        u32,
        st.booleans(),
        st.text(max_size=60).filter(lambda s: len(s.encode()) <= 255),
    ),
    st.builds(Read, offsets),
    st.builds(ReadReply, offsets, bytes8),
    st.builds(Write, offsets, bytes8),
    st.builds(WriteN, offsets, st.binary(min_size=1, max_size=300)),
    st.builds(ReadN, offsets, st.integers(1, MAX_BURST)),
    st.builds(ReadNReply, offsets, st.binary(max_size=300)),
    st.builds(Sync, u32),
    st.builds(SyncReply, u32),
    st.builds(IrqEvent, st.booleans()),
    st.builds(ErrorFrame, bytes8, st.text(max_size=60)),
)


def decode_all(data: bytes) -> list[Frame]:
    decoder = FrameDecoder()
    decoder.feed(data)
    return decoder.frames()


@given(st.lists(frames, max_size=8))
def test_round_trip(batch: list[Frame]) -> None:
    """Any sequence of frames decodes to itself after encoding."""
    assert decode_all(b"".join(encode(f) for f in batch)) == batch


@given(st.lists(frames, min_size=1, max_size=5), st.data())
def test_round_trip_any_split(batch: list[Frame], data: st.DataObject) -> None:
    """Frames split at arbitrary points decode the same as when fed at once."""
    wire = b"".join(encode(f) for f in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    decoder = FrameDecoder()
    out: list[Frame] = []
    last = 0
    for cut in [*cuts, len(wire)]:
        decoder.feed(wire[last:cut])
        last = cut
        out += decoder.frames()
    assert out == batch
    assert decoder.buffered == 0


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_only_raise_frame_errors(data: bytes) -> None:
    """Arbitrary bytes yield frames, wait for more, or raise FrameError: nothing else."""
    decoder = FrameDecoder()
    decoder.feed(data)
    try:
        decoder.frames()
    except FrameError as exc:
        assert isinstance(exc, BusError)
        assert isinstance(exc.code, ErrorCode)


def test_big_endian_length_includes_type() -> None:
    """The header is a big-endian u16 length counting the type byte, then the type."""
    assert encode(Write(3, 0x80)) == b"\x00\x03\x03\x03\x80"
    assert encode(Read(5)) == b"\x00\x02\x02\x05"
    assert encode(IrqEvent(True)) == b"\x00\x02\x90\x01"


def test_oversized_length_refused_from_header() -> None:
    """A length above MAX_FRAME_LEN is refused as soon as the two length bytes are in."""
    decoder = FrameDecoder()
    decoder.feed((MAX_FRAME_LEN + 1).to_bytes(2, "big"))
    with pytest.raises(FrameError) as info:
        decoder.next_frame()
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE


def test_max_length_frame_accepted() -> None:
    """A frame of exactly MAX_FRAME_LEN is fine: WRITE_N with MAX_BURST bytes."""
    wire = encode(WriteN(0, bytes(MAX_BURST)))
    assert len(wire) == 2 + MAX_FRAME_LEN
    assert decode_all(wire) == [WriteN(0, bytes(MAX_BURST))]


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (b"\x00\x00", ErrorCode.MALFORMED),
        (b"\x00\x01\x42", ErrorCode.UNKNOWN_TYPE),
        (b"\x00\x02\x02\x08", ErrorCode.BAD_OFFSET),
        (b"\x00\x03\x03\xff\x00", ErrorCode.BAD_OFFSET),
        (b"\x00\x03\x02\x00\x00", ErrorCode.MALFORMED),
        (b"\x00\x02\x04\x00", ErrorCode.MALFORMED),
        (b"\x00\x04\x05\x00\x00\x00", ErrorCode.MALFORMED),
        (b"\x00\x04\x05\x00\xff\xff", ErrorCode.MALFORMED),
        (b"\x00\x02\x01\x00", ErrorCode.MALFORMED),
        (b"\x00\x02\x90\x02", ErrorCode.MALFORMED),
        (b"\x00\x04\x06\x00\x00\x00", ErrorCode.MALFORMED),
    ],
)
def test_bad_frames_refused(wire: bytes, code: ErrorCode) -> None:
    """Zero length, unknown types, bad offsets and wrong payload sizes raise with their code."""
    with pytest.raises(FrameError) as info:
        decode_all(wire)
    assert info.value.code == code


def test_decoder_stays_broken_after_error() -> None:
    """After a bad frame the stream is out of sync: later good bytes still raise."""
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x01\x42")
    with pytest.raises(FrameError):
        decoder.next_frame()
    decoder.feed(encode(Read(0)))
    with pytest.raises(FrameError):
        decoder.next_frame()


def test_hello_ignores_reserved_trailing_bytes() -> None:
    """Bytes after HELLO's version are reserved for later versions and ignored."""
    assert decode_all(b"\x00\x05\x01\x00\x02\xaa\xbb") == [Hello(2)]


@pytest.mark.parametrize(
    "frame",
    [
        Read(8),
        Write(0, 256),
        WriteN(0, b""),
        WriteN(0, bytes(MAX_BURST + 1)),
        ReadN(0, 0),
        ReadN(0, MAX_BURST + 1),
        Sync(1 << 32),
        HelloReply(1, 0, False, "x" * 256),
    ],
)
def test_encode_refuses_values_the_protocol_cannot_carry(frame: Frame) -> None:
    """Encoding an out-of-range field raises FrameError instead of sending garbage."""
    with pytest.raises(FrameError):
        encode(frame)


def test_v2_frames_on_the_wire() -> None:
    """TIME and DEADLINE carry a big-endian u64 (all ones: no deadline); HELLO v2 asks for
    GUEST_TIME with a CAPS field (tag 2, u32) and gives the guest's time in TIME (tag 3)."""
    assert encode(Time(0x0102030405060708)) == b"\x00\x09\x07\x01\x02\x03\x04\x05\x06\x07\x08"
    assert encode(Deadline(None)) == b"\x00\x09\x91" + b"\xff" * 8
    assert encode(Deadline(5)) == b"\x00\x09\x91" + bytes(7) + b"\x05"
    hello = Hello(2, None, int(Capability.GUEST_TIME), 7)
    assert encode(hello) == (
        b"\x00\x13\x01\x00\x02" + b"\x02\x04\x00\x00\x00\x10" + b"\x03\x08" + bytes(7) + b"\x07"
    )
    assert decode_all(encode(hello)) == [hello]
    assert encode(Hello(1)) == b"\x00\x03\x01\x00\x01"  # v1 unchanged


@pytest.mark.parametrize(
    "wire",
    [
        b"\x00\x09\x07" + b"\xff" * 8,  # TIME cannot be "no time"
        b"\x00\x05\x07\x00\x00\x00\x01",  # TIME is 8 bytes
        b"\x00\x03\x91\x00\x00",  # DEADLINE is 8 bytes
    ],
)
def test_bad_v2_frames_refused(wire: bytes) -> None:
    """A v2 frame of the wrong size, or a time of all ones, is MALFORMED."""
    with pytest.raises(FrameError) as info:
        decode_all(wire)
    assert info.value.code == ErrorCode.MALFORMED


def test_encode_refuses_a_time_the_protocol_cannot_carry() -> None:
    """Negative times and 2**64-1 and beyond do not fit a TIME."""
    for value in (-1, NO_DEADLINE, NO_DEADLINE + 1):
        with pytest.raises(FrameError):
            encode(Time(value))
