"""Line-rate pacing in the model (``pace="line"``), on an injected clock: exact to the ns.

The transmitter shifts one character per character time (start + data + parity + stop bits
at the configured baud), so THRE, TEMT, THRI, the TX FIFO and ``tx_pending()`` follow that
clock; bytes from the wire enter the RX FIFO one character time apart and overrun a full
FIFO as on the chip. Timers that run late give the same device as timers run on time, and a
state taken mid-character resumes mid-character.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.vectors import FakeClock
from uartbridge import Uart16550
from uartbridge.uart import NS_PER_S, TIMEOUT_CHARS, line_char_time_ns

RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, LSR = 3, 5
THRE, TEMT, DR, OE = 0x20, 0x40, 0x01, 0x02

CHAR_115200_8N1 = NS_PER_S * 10 // 115200  # 86 805 ns


def paced(clock: FakeClock, *, lcr: int = 0x03, divisor: int = 1, fcr: int = 0x07) -> Uart16550:
    """A paced device at 115200/divisor, LCR ``lcr``, FCR ``fcr``, IER THRI|RDI."""
    uart = Uart16550(clock=clock, pace="line")
    for offset, value in ((LCR, 0x80 | lcr), (DLL, divisor & 0xFF), (DLM, divisor >> 8),
                          (LCR, lcr), (FCR, fcr), (IER, 0x03)):
        uart.write(offset, value)
    uart.read(IIR)  # acknowledge the THRI the IER write raised
    return uart


def wire_takes_all(uart: Uart16550, sent: bytearray) -> None:
    """An eager wire: whatever is offered is taken at once."""
    pending = uart.tx_pending()
    if pending:
        uart.tx_sent(len(pending))
        sent += pending


def test_character_time_counts_every_bit_of_the_frame() -> None:
    """Start + data + parity + stop bits at baudbase/divisor: 8N1 10, 7E2 11, 5N1.5 7.5."""
    assert line_char_time_ns(115200, 1, 0x03) == CHAR_115200_8N1
    assert line_char_time_ns(115200, 12, 0x03) == NS_PER_S * 10 // 9600
    assert line_char_time_ns(115200, 12, 0x1E) == NS_PER_S * 11 // 9600  # 7E2
    assert line_char_time_ns(115200, 12, 0x0B) == NS_PER_S * 11 // 9600  # 8O1
    assert line_char_time_ns(115200, 12, 0x04) == NS_PER_S * 15 // (2 * 9600)  # 5N1.5


def test_fifo_burst_drains_one_character_time_apart_then_thre_then_temt() -> None:
    """16 bytes written at once: one is offered per character time; THRE (and THRI) rise
    exactly when the last enters the shift register, TEMT exactly one character later."""
    clock = FakeClock()
    uart = paced(clock)
    char = uart.line_char_time_ns
    assert char == CHAR_115200_8N1
    t0 = clock()
    sent = bytearray()
    for byte in b"0123456789ABCDEF":
        uart.write(THR, byte)
    wire_takes_all(uart, sent)
    assert sent == b"0" and uart.read(LSR) & (THRE | TEMT) == 0
    for k in range(1, 16):
        clock.set(t0 + k * char - 1)
        uart.poll()
        assert uart.tx_pending() == b"", k
        assert uart.read(LSR) & THRE == 0
        clock.set(t0 + k * char)
        uart.poll()
        assert uart.tx_pending() == b"0123456789ABCDEF"[k : k + 1], k
        wire_takes_all(uart, sent)
        if k < 15:
            assert not uart.irq and uart.read(LSR) & (THRE | TEMT) == 0
    assert uart.read(LSR) & (THRE | TEMT) == THRE  # the last byte is in the TSR: THRE only
    assert uart.irq and uart.read(IIR) == 0xC2
    clock.set(t0 + 16 * char - 1)
    assert uart.read(LSR) & TEMT == 0
    clock.set(t0 + 16 * char)
    assert uart.read(LSR) & (THRE | TEMT) == THRE | TEMT
    assert sent == b"0123456789ABCDEF"


def test_without_fifo_thre_rises_at_once_and_temt_a_character_later() -> None:
    """No FIFO: the byte goes THR → TSR at once (THRE=1, TEMT=0); a second byte waits in
    THR (THRE=0) until the first character has been shifted out."""
    clock = FakeClock()
    uart = paced(clock, fcr=0x00, divisor=12)
    char = uart.line_char_time_ns
    t0 = clock()
    sent = bytearray()
    uart.write(THR, ord("A"))
    wire_takes_all(uart, sent)
    assert uart.read(LSR) & (THRE | TEMT) == THRE
    clock.set(t0 + char // 3)
    uart.write(THR, ord("B"))
    assert uart.read(LSR) & (THRE | TEMT) == 0
    clock.set(t0 + char)
    assert uart.read(LSR) & (THRE | TEMT) == THRE and uart.tx_pending() == b"B"
    wire_takes_all(uart, sent)
    clock.set(t0 + 2 * char)
    assert uart.read(LSR) & (THRE | TEMT) == THRE | TEMT and sent == b"AB"


def test_a_wire_that_refuses_holds_the_line_until_it_takes_the_byte() -> None:
    """A refused byte keeps the line busy past its character time: the next character starts
    when the wire takes it, not at the end of the character time."""
    clock = FakeClock()
    uart = paced(clock)
    char = uart.line_char_time_ns
    t0 = clock()
    uart.write(THR, ord("x"))
    uart.write(THR, ord("y"))
    uart.tx_blocked()
    clock.set(t0 + 3 * char)
    uart.poll()
    assert uart.tx_pending() == b"x" and uart.state().tsr_retry == 1
    uart.tx_sent(1)
    assert uart.tx_pending() == b"y"  # the line was free: 'y' starts now
    uart.tx_sent(1)
    clock.set(t0 + 4 * char - 1)
    assert uart.read(LSR) & TEMT == 0
    clock.set(t0 + 4 * char)
    assert uart.read(LSR) & TEMT


def test_received_bytes_enter_one_character_time_apart_and_cti_follows_the_last() -> None:
    """A burst from the wire enters the RX FIFO one byte per character time from the moment
    it came; the receive timeout counts 4 character times from the last byte's entry."""
    clock = FakeClock()
    uart = paced(clock, fcr=0xC7)  # trigger 14: nothing but CTI reports 6 bytes
    char = uart.line_char_time_ns
    t0 = clock()
    assert uart.receive(b"abcdef") == 6
    assert uart.state().rx_fifo == b"a"  # the receiver was free: the first enters at once
    for k in range(1, 6):
        clock.set(t0 + k * char - 1)
        uart.poll()
        assert len(uart.state().rx_fifo) == k
        clock.set(t0 + k * char)
        uart.poll()
        assert uart.state().rx_fifo == b"abcdef"[: k + 1]
    last = t0 + 5 * char
    clock.set(last + TIMEOUT_CHARS * uart.char_time_ns - 1)
    assert uart.read(IIR) == 0xC1
    clock.set(last + TIMEOUT_CHARS * uart.char_time_ns)
    assert uart.read(IIR) == 0xCC


def test_a_guest_too_slow_to_read_sees_overruns_as_on_the_chip() -> None:
    """Bytes keep arriving at line rate whatever the FIFO holds: the 17th of 20 unread bytes
    overruns (LSR.OE), the FIFO keeps the first 16, and the three lost are counted."""
    clock = FakeClock()
    uart = paced(clock)
    char = uart.line_char_time_ns
    t0 = clock()
    assert uart.can_receive() > 20
    assert uart.receive(bytes(range(20))) == 20
    clock.set(t0 + 15 * char)
    assert uart.read(LSR) & OE == 0
    clock.set(t0 + 16 * char)
    assert uart.read(LSR) & OE
    clock.set(t0 + 19 * char)
    uart.poll()
    state = uart.state()
    assert state.rx_fifo == bytes(range(16)) and state.statistics.overruns == 4
    assert [uart.read(RBR) for _ in range(16)] == list(range(16))


def test_receive_slot_is_kept_between_bursts() -> None:
    """A byte arriving less than a character time after the one before waits for its slot."""
    clock = FakeClock()
    uart = paced(clock)
    char = uart.line_char_time_ns
    t0 = clock()
    uart.receive(b"a")
    clock.set(t0 + char // 2)
    uart.receive(b"b")
    assert uart.state().rx_fifo == b"a"
    clock.set(t0 + char)
    uart.poll()
    assert uart.state().rx_fifo == b"ab"


def test_loopback_is_paced_by_the_transmitter() -> None:
    """In loopback each byte reaches the receiver as it enters the shift register (as
    without pacing), and the next one a character time later."""
    clock = FakeClock()
    uart = paced(clock)
    uart.write(4, 0x10)
    char = uart.line_char_time_ns
    t0 = clock()
    for byte in b"xyz":
        uart.write(THR, byte)
    assert uart.tx_pending() == b"" and uart.state().rx_fifo == b"x"
    clock.set(t0 + 2 * char)
    uart.poll()
    assert uart.state().rx_fifo == b"xyz"
    clock.set(t0 + 3 * char)
    assert uart.read(LSR) & TEMT


def test_pace_none_is_qemus_instant_line() -> None:
    """The default: a 16-byte burst is offered whole and TEMT rises when the wire took it."""
    uart = Uart16550(clock=FakeClock())
    uart.write(FCR, 0x07)
    for byte in b"0123456789ABCDEF":
        uart.write(THR, byte)
    assert uart.tx_pending() == b"0123456789ABCDEF"
    uart.tx_sent(16)
    assert uart.read(LSR) & (THRE | TEMT) == THRE | TEMT


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("thr"), st.binary(min_size=1, max_size=20)),
        st.tuples(st.just("rx"), st.binary(min_size=1, max_size=40)),
        st.tuples(st.just("read"), st.sampled_from([RBR, IIR, LSR])),
        st.tuples(st.just("wait"), st.integers(0, 30 * CHAR_115200_8N1)),
        st.tuples(st.just("fcr"), st.sampled_from([0x07, 0x01, 0xC1, 0x00])),
        st.tuples(st.just("block"), st.just(0)),
    ),
    max_size=40,
)


def run(uart: Uart16550, clock: FakeClock, ops: list[tuple[str, object]], *,
        polls: list[int] | None = None) -> list[object]:
    """Apply ``ops`` with an eager wire (it takes what is offered after every operation, as
    the port link does after each settle); with ``polls``, also poll at extra instants inside
    each wait. Returns the values read, IRQ levels, then every byte sent and the final state."""
    out: list[object] = []
    sent = bytearray()
    blocked = False

    def settle() -> None:
        pending = uart.tx_pending()
        if pending and not blocked:
            uart.tx_sent(len(pending))
            sent.extend(pending)

    for kind, arg in ops:
        if kind == "thr":
            assert isinstance(arg, bytes)
            for byte in arg:
                uart.write(THR, byte)
                settle()
        elif kind == "rx":
            assert isinstance(arg, bytes)
            out.append(uart.receive(arg))
        elif kind == "read":
            assert isinstance(arg, int)
            out.append(uart.read(arg))
        elif kind == "wait":
            assert isinstance(arg, int)
            end = clock() + arg
            for step in polls or []:
                if clock() + step < end:
                    clock.advance(step)
                    uart.poll()
                    settle()
            clock.set(end)
            blocked = False  # a wire that refused takes again after a wait
        elif kind == "fcr":
            assert isinstance(arg, int)
            uart.write(FCR, arg)
        elif kind == "block" and uart.tx_pending():
            uart.tx_blocked()
            blocked = True
        settle()
        lsr = uart.read(LSR)  # an operation first: queries show the device as of the last one
        out.append((uart.irq, lsr))
        settle()
    uart.poll()
    settle()
    out.append(bytes(sent))
    out.append(uart.state())
    return out


@settings(max_examples=60, deadline=None)
@given(OPS, st.lists(st.integers(1, 3 * CHAR_115200_8N1), min_size=1, max_size=6))
def test_timers_that_run_late_give_the_same_device(
    ops: list[tuple[str, object]], polls: list[int]
) -> None:
    """Polling at extra instants (on time) or not at all (each timer runs late, at the next
    operation) gives the same register values, IRQ levels, bytes and state."""
    clock_a, clock_b = FakeClock(), FakeClock()
    assert run(paced(clock_a), clock_a, ops) == run(paced(clock_b), clock_b, ops, polls=polls)


@settings(max_examples=60, deadline=None)
@given(OPS, OPS, st.integers(0, 10**12))
def test_a_state_taken_mid_character_resumes_mid_character(
    before: list[tuple[str, object]], after: list[tuple[str, object]], offset_ns: int
) -> None:
    """A clone made from ``state()`` at any instant, on a clock far from the original's,
    answers every later operation exactly as the original does."""
    clock = FakeClock()
    uart = paced(clock)
    run(uart, clock, before)
    other = FakeClock()
    other.advance(offset_ns)
    clone = Uart16550.from_state(uart.state(), clock=other)
    assert run(uart, clock, after)[:-2] == run(clone, other, after)[:-2]
