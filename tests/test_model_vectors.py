"""Reference §13 test vectors that need no real back end, run on the pure model.

"P0" is a fresh ``Uart16550`` on a ``FakeClock`` whose wire takes every byte (the default
``sent`` of ``tests.vectors.run``). "slow" sets divisor 0xFFFF; with a FakeClock time only
moves when a test advances it, so "slow" is kept only where the reference has it.
"""

from __future__ import annotations

import dataclasses

import pytest

from tests.vectors import REGISTER_VECTORS, SLOW, FakeClock, run
from uartbridge import InvalidStateError, Uart16550, UartState
from uartbridge.registers import Fcr, Lsr

RESET_CTT_NS = 1_041_660


def p0() -> Uart16550:
    """A power-on device on a fake clock."""
    return Uart16550(clock=FakeClock())


class StalledWire:
    """A pty whose reader stopped reading: it absorbs ``room`` bytes, then refuses.

    Like an I/O layer, it tries one write when the device has something new; after a refusal
    (``tx_blocked``) it waits for writability, which only ``drain`` brings.
    """

    def __init__(self, room: int) -> None:
        self.room = room
        self.received = bytearray()
        self.stalled = False

    def __call__(self, uart: Uart16550) -> None:
        if self.stalled:
            return
        pending = uart.tx_pending()
        n = min(len(pending), self.room)
        if n:
            self.received += pending[:n]
            self.room -= n
            uart.tx_sent(n)
        if uart.tx_pending():
            uart.tx_blocked()
            self.stalled = True

    def drain(self, uart: Uart16550) -> bytes:
        """The reader reads everything: the device's pending bytes all go out."""
        self.stalled = False
        self.room = 1 << 30
        before = len(self.received)
        self(uart)
        return bytes(self.received[before:])


# -- register-level vectors (V1–V29, V36), straight §13 notation --------------------------

@pytest.mark.parametrize("name", sorted(REGISTER_VECTORS, key=lambda n: int(n[1:])))
def test_register_vector(name: str) -> None:
    """Each plain §13 register sequence reads back exactly the values the reference lists."""
    run(p0(), REGISTER_VECTORS[name])


def test_v1_irq_low_at_power_on() -> None:
    """V1: a power-on device holds its IRQ line low and queues no IRQ edge."""
    uart = p0()
    assert not uart.irq
    assert uart.take_events().irq_changes == ()


def test_v4_thri_edge_and_ack() -> None:
    """V4: enabling THRI raises the line; the IIR read that returns THRI lowers it."""
    uart = p0()
    uart.write(1, 0xFF)
    assert uart.irq
    assert uart.read(1) == 0x0F
    assert uart.read(2) == 0x02
    assert not uart.irq
    run(uart, "R(2)→01 R(2)→01")


def test_v17_tx_inside_write_reraises_thri() -> None:
    """V17: a THR write completes TX at once and re-raises THRI; IRQ trace up, down, up, down."""
    uart = p0()
    trace: list[bool] = []
    wire = bytearray()

    def sent(u: Uart16550) -> None:
        pending = u.tx_pending()
        wire.extend(pending)
        u.tx_sent(len(pending))

    for op in ("W(2,0x07)", "W(1,0x02)", "R(2)→C2", "R(2)→C1", "W(0,0x55)", "R(5)→60",
               "R(2)→C2", "R(2)→C1"):
        run(uart, op, sent=sent)
        trace.extend(uart.take_events().irq_changes)
    assert trace == [True, False, True, False]
    assert bytes(wire) == b"\x55"


def test_v27_size_fifo_counts_16() -> None:
    """V27: Linux size_fifo in loopback: 256 THR writes leave exactly 16 bytes, first LSR 63."""
    uart = p0()
    run(uart, "W(2,0x07) W(4,0x10) W(3,0x80) W(0,0x01) W(1,0x00) W(3,0x03)")
    for i in range(256):
        uart.write(0, i)
    assert uart.read(5) == 0x63
    got = []
    while uart.read(5) & Lsr.DR:
        got.append(uart.read(0))
    assert got == list(range(16))


# -- time-dependent vectors (V14, V15) ---------------------------------------------------


def test_v14_character_timeout() -> None:
    """V14: CTI rises exactly 4 reset character times after the last receive; RBR clears it."""
    clock = FakeClock()
    uart = Uart16550(clock=clock)
    run(uart, "W(2,0x81) W(1,0x01) W(4,0x10) W(0,0x31) W(0,0x32) W(0,0x33) R(2)→C1")
    assert uart.char_time_ns == RESET_CTT_NS
    clock.advance(4 * RESET_CTT_NS - 1)
    run(uart, "R(2)→C1")
    clock.advance(1)
    run(uart, "R(2)→CC R(0)→31 R(2)→C1")


def test_v14_poll_raises_irq_without_access() -> None:
    """V14 via poll(): the timer alone raises the line once the deadline has passed."""
    clock = FakeClock()
    uart = Uart16550(clock=clock)
    run(uart, "W(2,0x81) W(1,0x01) W(4,0x10) W(0,0x31)")
    deadline = uart.next_deadline_ns()
    assert deadline == clock() + 4 * RESET_CTT_NS
    uart.take_events()
    clock.advance(4 * RESET_CTT_NS)
    uart.poll()
    assert uart.irq
    assert uart.take_events().irq_changes == (True,)
    assert uart.next_deadline_ns() is None


def test_v15_cti_latched_while_masked() -> None:
    """V15: CTI is latched while IER.RDI=0 and shows as soon as RDI is enabled."""
    clock = FakeClock()
    uart = Uart16550(clock=clock)
    run(uart, "W(2,0x07) W(4,0x10) W(0,0x41)")
    clock.advance(4 * RESET_CTT_NS)
    uart.poll()
    run(uart, "R(2)→C1 W(1,0x01) R(2)→CC R(0)→41 R(2)→C1")


# -- breaks (V30, V31) --------------------------------------------------------------------


def test_v30_non_fifo_break() -> None:
    """V30: a break without FIFOs sets BI+DR, raises RLSI and reads as a NUL."""
    uart = p0()
    uart.write(1, 0x04)
    uart.receive_break()
    run(uart, "R(2)→06 R(5)→71 R(5)→61 R(2)→01 R(0)→00 R(5)→60")


def test_v31_fifo_break_attaches_to_older_byte() -> None:
    """V31: in FIFO mode BI shows with the older byte at the head; the NUL follows as data."""
    uart = p0()
    run(uart, SLOW + " W(2,0x81)")
    assert uart.receive(b"A") == 1
    uart.receive_break()
    run(uart, "R(5)→71 R(0)→41 R(5)→61 R(0)→00 R(5)→60")


# -- blocked back end (V32, V33) ----------------------------------------------------------


def test_v32_fifo_backpressure_overwrites_oldest() -> None:
    """V32: stalled wire, FIFO on: LSR 20 then 00, newest 16 kept; drain → TSR + 16, LSR 60, C2."""
    uart = p0()
    wire = StalledWire(room=5)
    run(uart, "W(2,0x07) W(1,0x02) R(2)→C2", sent=wire)
    for i in range(5):
        run(uart, f"W(0,0x{0x40 + i:02X}) R(5)→60", sent=wire)
    assert bytes(wire.received) == b"@ABCD"
    run(uart, "W(0,0x2E) R(5)→20 R(2)→C2", sent=wire)  # the stalling write: '.' stuck in TSR
    assert wire.stalled and uart.state().tsr_retry == 1
    payload = bytes(range(0x50, 0x50 + 21))  # 1 + 20 extra writes, only the newest 16 survive
    for b in payload:
        run(uart, f"W(0,0x{b:02X}) R(5)→00", sent=wire)
    assert uart.statistics().tx_overwrites == len(payload) - 16
    assert uart.tx_pending() == b"." + payload[-16:]
    assert wire.drain(uart) == b"." + payload[-16:]
    run(uart, "R(5)→60 R(2)→C2 R(2)→C1")
    assert uart.state().tsr_retry == 0


def test_v33_non_fifo_backpressure_overwrites_thr() -> None:
    """V33: stalled wire, FIFO off: LSR 20/IIR 02, writes overwrite THR; drain → TSR + last."""
    uart = p0()
    wire = StalledWire(room=3)
    run(uart, "W(1,0x02) R(2)→02 W(0,0x41) W(0,0x42) W(0,0x43) R(5)→60", sent=wire)
    run(uart, "W(0,0x2E) R(5)→20 R(2)→02", sent=wire)
    for b in b"xyz":
        run(uart, f"W(0,0x{b:02X}) R(5)→00", sent=wire)
    assert uart.statistics().tx_overwrites == 2
    assert wire.drain(uart) == b".z"
    assert bytes(wire.received) == b"ABC.z"
    run(uart, "R(5)→60 R(2)→02 R(2)→01")


# -- can_receive (V34) ---------------------------------------------------------------------


def test_v34_can_receive_fifo_table() -> None:
    """V34: FIFO on, trigger 8: can_receive is 8,3,0,1,1,0 at counts 0,5,8,9,15,16."""
    uart = p0()
    run(uart, SLOW + " W(2,0x87) W(4,0x10)")
    table = {0: 8, 5: 3, 8: 0, 9: 1, 15: 1, 16: 0}
    count = 0
    for target in sorted(table):
        while count < target:  # loopback bypasses can_receive, so it can fill past the trigger
            uart.write(0, count)
            count += 1
        assert len(uart.state().rx_fifo) == count
        assert uart.can_receive() == table[target], f"count {count}"


def test_v34_can_receive_non_fifo() -> None:
    """V34: FIFO off: can_receive is 1 while DR=0 and 0 while DR=1."""
    uart = p0()
    assert uart.can_receive() == 1
    assert uart.receive(b"AB") == 1
    assert uart.can_receive() == 0
    assert uart.receive(b"B") == 0
    assert uart.read(0) == 0x41
    assert uart.can_receive() == 1


@pytest.mark.parametrize(("fcr", "trigger"), [(0x07, 1), (0x47, 4), (0x87, 8), (0xC7, 14)])
def test_v34_burst_fills_to_trigger(fcr: int, trigger: int) -> None:
    """V34: a 20-byte burst leaves exactly trigger-many bytes in the RX FIFO, LSR 61, no OE."""
    uart = p0()
    run(uart, SLOW + f" W(2,0x{fcr:02X})")
    burst = bytes(range(0x61, 0x61 + 20))
    taken = uart.receive(burst)
    assert taken == trigger
    assert uart.receive(burst[taken:]) == 0
    assert uart.state().rx_fifo == burst[:trigger]
    run(uart, "R(5)→61")
    assert uart.statistics().overruns == 0


# -- reset (V35) -------------------------------------------------------------------------


def test_v35_fcr_survives_reset() -> None:
    """V35: reset() keeps FCR: IIR reads 01 but RX still runs in FIFO mode; FE=1 doesn't flush."""
    uart = p0()
    run(uart, "W(2,0x01) R(2)→C1")
    uart.reset()
    assert uart.state().fcr & Fcr.FE
    run(uart, "R(2)→01 R(4)→08")
    run(uart, SLOW + " W(4,0x10) W(0,0x41) W(0,0x42) R(5)→61 R(0)→41 R(0)→42 R(5)→60 "
        "W(2,0x01) R(2)→C1")


def test_v35_fe_rewrite_after_reset_keeps_rx() -> None:
    """V35: after reset, writing FCR with FE=1 again does not flush received bytes."""
    uart = p0()
    run(uart, "W(2,0x01)")
    uart.reset()
    run(uart, SLOW + " W(4,0x10) W(0,0x41) W(2,0x01) R(2)→C1 R(5)→61 R(0)→41")


# -- break out (V37) ---------------------------------------------------------------------


def test_v37_break_edges_in_line_settings() -> None:
    """V37: LCR bit 6 edges show as changes of line_settings.break_on, nothing else does.

    The model reports line settings after every LCR/DLL/DLM write (QEMU re-sends SET_PARAMS on
    each), so an unchanged break level can be reported again: the I/O layer acts on changes of
    ``break_on`` only, which is what QEMU's SET_BREAK-on-edge amounts to.
    """
    uart = p0()
    uart.take_events()
    applied = False
    edges: list[bool] = []
    for value in (0x40, 0x40, 0x43, 0x00, 0x00, 0x03):
        uart.write(3, value)
        settings = uart.take_events().line_settings
        assert settings is not None
        assert settings.break_on == bool(value & 0x40)
        if settings.break_on != applied:
            applied = settings.break_on
            edges.append(applied)
    assert edges == [True, False]
    uart.write(7, 0x12)  # not a line register: no line settings
    assert uart.take_events().line_settings is None


# -- character time (V38) ----------------------------------------------------------------


def test_v38_char_time() -> None:
    """V38: char time is 1 041 660 ns at reset, 86 805 at 115200 8N1, 729 166 at 5N1 div 12.

    The model computes exact integers (floor of 1e9·divisor·bits/baudbase), which equal modern
    QEMU's float figures (86 805 / 729 166), not the older integer ones (86 800 / 729 162).
    The reset value is QEMU's fixed (1e9 // 9600) × 10, not derived from LCR=0 (5N1).
    """
    uart = p0()
    assert uart.char_time_ns == RESET_CTT_NS
    run(uart, "W(3,0x80) W(0,0x01) W(1,0x00) W(3,0x03)")
    assert uart.char_time_ns == 86_805
    run(uart, "W(3,0x80) W(0,0x0C) W(3,0x00)")
    assert uart.char_time_ns == 729_166
    uart.reset()
    assert uart.char_time_ns == RESET_CTT_NS


# -- checkpoint consistency (V39–V43) as UartState.validate() ------------------------------


def test_v39_temt0_without_tsr_refused() -> None:
    """V39: LSR.TEMT=0 with no byte in the TSR is refused, naming the tsr rule."""
    bad = UartState(lsr=0x20)  # THRE=1, TEMT=0, tsr_busy=False
    with pytest.raises(InvalidStateError, match="tsr"):
        bad.validate()
    with pytest.raises(InvalidStateError, match="tsr"):
        Uart16550.from_state(bad, clock=FakeClock())


def test_v39_tsr_retry_with_temt1_refused() -> None:
    """V39: tsr_retry>0 with TEMT=1 (TSR empty) is refused, naming tsr_retry."""
    with pytest.raises(InvalidStateError, match="tsr_retry"):
        UartState(tsr_retry=1).validate()
    with pytest.raises(InvalidStateError, match="tsr"):
        UartState(tsr_busy=True, tsr_retry=1, tsr=0x2E).validate()  # TEMT=1 and a TSR byte


def test_v40_dr_without_rx_fifo_refused() -> None:
    """V40: FIFO mode with LSR.DR=1 and an empty RX FIFO is refused (no phantom NUL)."""
    bad = UartState(fcr=0x01, iir=0xC1, lsr=0x61)
    with pytest.raises(InvalidStateError, match="rx_fifo"):
        bad.validate()
    good = dataclasses.replace(bad, rx_fifo=b"hi")
    uart = Uart16550.from_state(good, clock=FakeClock())
    run(uart, "R(5)→61 R(0)→68 R(0)→69 R(5)→60")


def stuck_tx_state() -> UartState:
    """The V32 state: a byte stuck in the TSR and a full TX FIFO (wire stalled)."""
    uart = p0()
    wire = StalledWire(room=0)
    run(uart, "W(2,0x07) W(1,0x02)", sent=wire)
    for b in b".EFGHIJKLMNOPQRST":
        uart.write(0, b)
        wire(uart)
    return uart.state()


def test_v42_thre0_with_empty_tx_fifo_refused() -> None:
    """V42: FIFO mode, THRE=0 with an empty TX FIFO is refused (QEMU's later assertion)."""
    bad = dataclasses.replace(stuck_tx_state(), tx_fifo=b"")
    with pytest.raises(InvalidStateError, match="tx_fifo"):
        bad.validate()


def test_v41_restored_stuck_tx_is_not_wedged() -> None:
    """V41: a stuck-TX state restored with from_state sends TSR byte + FIFO once the wire takes."""
    state = stuck_tx_state()
    state.validate()
    clock = FakeClock()
    clock.advance(123_456_789)
    uart = Uart16550.from_state(state, clock=clock)
    events = uart.take_events()
    assert events.tx_ready
    run(uart, "R(5)→00")
    pending = uart.tx_pending()
    assert pending == b".EFGHIJKLMNOPQRST"
    uart.tx_sent(len(pending))
    run(uart, "R(5)→60 R(2)→C2 R(2)→C1")
    run(uart, "W(0,0x55) R(5)→60")  # and the transmitter goes on


def test_v41_restored_stuck_tx_retries_after_refusal() -> None:
    """V41: a restored stuck TSR byte can be refused again and still goes out later."""
    uart = Uart16550.from_state(stuck_tx_state(), clock=FakeClock())
    uart.tx_blocked()
    assert uart.state().tsr_retry == 2
    uart.tx_sent(1)
    assert uart.tx_pending() == b"EFGHIJKLMNOPQRST"
    uart.tx_sent(16)
    run(uart, "R(5)→60")


def test_v43_stuck_state_contents() -> None:
    """V43: the V32 state carries tsr_retry=1, tsr='.', thr='T' and the newest 16 in order."""
    state = stuck_tx_state()
    assert state.tsr_busy and state.tsr_retry == 1
    assert state.tsr == ord(".") and state.thr == ord("T")
    assert state.tx_fifo == b"EFGHIJKLMNOPQRST"
    assert state.tx_waiting() == b".EFGHIJKLMNOPQRST"
    assert state.lsr == 0x00


def test_v43_loopback_rx_state_keeps_hidden_thri() -> None:
    """V43: loopback RX with THRI hidden behind RDI keeps thr_ipending, RX FIFO and the timer."""
    uart = p0()
    run(uart, SLOW + " W(2,0x07) W(4,0x10) W(1,0x03) W(0,0x58) R(2)→C4")
    state = uart.state()
    assert state.thr_ipending
    assert state.rx_fifo == b"X"
    assert state.timeout_remaining_ns == 4 * uart.char_time_ns
    clone = Uart16550.from_state(state, clock=FakeClock())
    run(clone, "R(2)→C4 R(0)→58 R(2)→C2 R(2)→C1")
