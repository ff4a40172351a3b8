"""Per-register side effects of the model (reference §3–§8), its events and its counters."""

from __future__ import annotations

import pytest

from tests.vectors import SLOW, FakeClock, run
from uartbridge import LineSettings, ModemOutputs, Uart16550
from uartbridge.uart import QEMU_MAX_XMIT_RETRY


def p0(**kwargs: int | None) -> Uart16550:
    """A power-on device on a fake clock whose wire (via ``run``) takes every byte."""
    return Uart16550(clock=FakeClock(), **kwargs)  # type: ignore[arg-type]


def stall(uart: Uart16550) -> None:
    """Offer the pending bytes to a wire that refuses them (one refusal)."""
    if uart.tx_pending():
        uart.tx_blocked()


def keep(uart: Uart16550) -> None:
    """A wire that is never asked: bytes stay pending, nothing is refused."""


# -- access checks -------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [-1, 8, 100])
def test_offset_out_of_range(offset: int) -> None:
    """Reads and writes outside offsets 0–7 raise ValueError."""
    uart = p0()
    with pytest.raises(ValueError, match="offset"):
        uart.read(offset)
    with pytest.raises(ValueError, match="offset"):
        uart.write(offset, 0)


@pytest.mark.parametrize("value", [-1, 256, 0x1000])
def test_value_out_of_range(value: int) -> None:
    """Writes of values outside 0–255 raise ValueError and change nothing."""
    uart = p0()
    before = uart.state()
    with pytest.raises(ValueError, match="value"):
        uart.write(7, value)
    assert uart.state() == before


# -- DLAB, DLL/DLM -------------------------------------------------------------------------


def test_dlab_selects_divisor_latch() -> None:
    """With DLAB=1 offsets 0/1 are DLL/DLM: no transmission, IER and RX untouched."""
    uart = p0()
    run(uart, "W(1,0x05) W(3,0x83) W(0,0x34) W(1,0x12) R(0)→34 R(1)→12 R(1)→12 R(3)→83")
    assert uart.tx_pending() == b""
    assert uart.statistics().bytes_transmitted == 0
    run(uart, "W(3,0x03) R(1)→05 R(5)→60")
    assert uart.state().divisor == 0x1234


def test_divisor_sets_baud() -> None:
    """Divisor 1/3/12/0x180 gives 115200/38400/9600/300 baud; divisor 0 gives QEMU's 3500."""
    uart = p0()
    for divisor, baud in ((1, 115200), (3, 38400), (12, 9600), (0x180, 300), (0, 3500)):
        run(uart, f"W(3,0x80) W(0,0x{divisor & 0xFF:02X}) W(1,0x{divisor >> 8:02X}) W(3,0x03)")
        assert uart.line_settings.baud == baud


def test_baudbase_scales_baud() -> None:
    """A different baudbase scales the baud rate (divisor 1 → baudbase)."""
    uart = Uart16550(baudbase=921600, clock=FakeClock())
    run(uart, "W(3,0x80) W(0,0x01) W(1,0x00) W(3,0x03)")
    assert uart.line_settings.baud == 921600
    with pytest.raises(ValueError, match="baudbase"):
        Uart16550(baudbase=0, clock=FakeClock())


# -- IER -----------------------------------------------------------------------------------


def test_ier_masks_upper_bits() -> None:
    """IER keeps only bits 0–3; bits 4–7 read 0."""
    run(p0(), "W(1,0xF0) R(1)→00 W(1,0xFA) R(1)→0A")


def test_ier_thri_resample_on_enable() -> None:
    """Turning THRI on while THRE=1 raises THRI again even after it was acknowledged."""
    uart = p0()
    run(uart, "W(1,0x02) R(2)→02 R(2)→01 W(1,0x00) R(2)→01 W(1,0x02) R(2)→02")


def test_ier_thri_disable_clears_latch() -> None:
    """Turning THRI off clears the latch: turning another bit on does not bring THRI back."""
    uart = p0()
    run(uart, "W(1,0x02) W(1,0x00) W(1,0x01) R(2)→01")
    assert not uart.state().thr_ipending


def test_ier_thri_enable_while_thre0_no_interrupt() -> None:
    """Turning THRI on while THRE=0 (TX stuck) raises nothing."""
    uart = p0()
    run(uart, "W(2,0x01) W(0,0x41) W(0,0x42) R(5)→00", sent=stall)
    run(uart, "W(1,0x02) R(2)→C1", sent=stall)
    assert not uart.irq


def test_ier_same_value_no_resample() -> None:
    """Rewriting the same IER value does not resample THRE (V5)."""
    run(p0(), "W(1,0x02) R(2)→02 W(1,0x02) R(2)→01")


# -- IIR -----------------------------------------------------------------------------------


def test_iir_read_acknowledges_only_thri() -> None:
    """IIR reads do not clear RLSI, RDI, CTI or MSI; only a returned THRI is acknowledged."""
    clock = FakeClock()
    uart = Uart16550(clock=clock)
    uart.write(1, 0x0F)
    run(uart, "R(2)→02 R(2)→01")
    uart.set_modem_inputs(cts=False, dsr=True, ri=False, dcd=True)
    run(uart, "R(2)→00 R(2)→00 R(6)→A1 R(2)→01")
    uart.receive(b"x")
    run(uart, "R(2)→04 R(2)→04 R(0)→78 R(2)→01")
    uart.receive_break()
    run(uart, "R(2)→06 R(2)→06 R(5)→71 R(2)→04 R(0)→00 R(2)→01")
    run(uart, "W(2,0xC1) R(2)→C2 R(2)→C1")  # the FE toggle's XFR re-raised THRI
    uart.receive(b"y")
    clock.advance(4 * uart.char_time_ns)
    run(uart, "R(2)→CC R(2)→CC R(0)→79 R(2)→C1")


def test_iir_priority() -> None:
    """Priority is RLSI > CTI > RDI > THRI > MSI (QEMU §4.1)."""
    clock = FakeClock()
    uart = Uart16550(clock=clock)
    run(uart, "W(2,0x01) W(1,0x0F)")
    uart.set_modem_inputs(cts=False, dsr=True, ri=False, dcd=True)
    uart.receive(b"a")
    uart.receive_line_error(parity=True)
    run(uart, "R(2)→C6")
    clock.advance(4 * uart.char_time_ns)
    uart.poll()
    run(uart, "R(5)→65 R(2)→CC R(2)→CC")  # CTI outranks the RDI that is also pending
    run(uart, "R(0)→61 R(2)→C2 R(2)→C0 R(6)→A1 R(2)→C1")


# -- FCR -----------------------------------------------------------------------------------


def test_fcr_stores_only_c9() -> None:
    """FCR keeps bits 0xC9 only (RFR/XFR are one-shot; bits 4–5 dropped)."""
    uart = p0()
    uart.write(2, 0xFF)
    assert uart.state().fcr == 0xC9
    run(uart, "R(2)→C1")  # XFR set the THRI latch, but IER.THRI=0


def test_fcr_rfr_flushes_rx_only() -> None:
    """RFR empties the RX FIFO, clears DR/BI, the timer and CTI; the TX side is untouched."""
    clock = FakeClock()
    uart = Uart16550(clock=clock)
    run(uart, "W(2,0x01) W(1,0x01) W(0,0x41) W(0,0x42)", sent=stall)
    uart.receive(b"a")
    uart.receive_break()
    clock.advance(4 * uart.char_time_ns)
    uart.poll()
    assert uart.state().timeout_ipending
    run(uart, "W(2,0x03) R(5)→00 R(2)→C1", sent=keep)
    state = uart.state()
    assert state.rx_fifo == b"" and not state.timeout_ipending
    assert uart.next_deadline_ns() is None
    assert uart.tx_pending() == b"AB"
    assert uart.statistics().rx_flushed == 2


def test_fcr_xfr_keeps_tsr_byte() -> None:
    """XFR empties the TX FIFO, sets THRE and the THRI latch, and leaves the TSR byte (TEMT=0)."""
    uart = p0()
    run(uart, "W(2,0x01) W(0,0x41) W(0,0x42) W(0,0x43) R(5)→00", sent=stall)
    run(uart, "W(2,0x05) R(5)→20", sent=keep)
    assert uart.state().thr_ipending  # set even with IER.THRI=0
    assert uart.tx_pending() == b"A"
    assert uart.statistics().tx_flushed == 2
    uart.tx_sent(1)
    run(uart, "R(5)→60")


def test_fcr_xfr_non_fifo_drops_thr() -> None:
    """Without FIFOs, XFR discards an unsent THR byte but not the TSR byte."""
    uart = p0()
    run(uart, "W(0,0x41) W(0,0x42) R(5)→00", sent=stall)
    run(uart, "W(2,0x04) R(5)→20", sent=keep)
    assert uart.tx_pending() == b"A"
    assert uart.statistics().tx_flushed == 1


def test_fcr_fe_toggle_flushes_both() -> None:
    """Toggling FE flushes both FIFOs; rewriting FE with a new trigger keeps the data."""
    uart = p0()
    run(uart, SLOW + " W(2,0x01) W(4,0x10) W(0,0x41) W(2,0xC1) R(5)→61 W(4,0x00)")
    run(uart, "W(0,0x42) W(0,0x43)", sent=stall)
    assert uart.tx_pending() == b"BC"
    run(uart, "W(2,0x00) R(5)→20 R(2)→01", sent=keep)
    assert uart.tx_pending() == b"B"
    assert uart.state().rx_fifo == b""


@pytest.mark.parametrize(("fcr", "trigger"), [(0x01, 1), (0x41, 4), (0x81, 8), (0xC1, 14)])
def test_fcr_trigger_levels(fcr: int, trigger: int) -> None:
    """RDI rises exactly when the RX FIFO reaches the trigger level 1/4/8/14."""
    uart = p0()
    run(uart, SLOW + f" W(2,0x{fcr:02X}) W(1,0x01) W(4,0x10)")
    for i in range(trigger - 1):
        uart.write(0, i)
        assert uart.read(2) == 0xC1
    uart.write(0, 0x55)
    assert uart.read(2) == 0xC4
    assert uart.irq


# -- LCR -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lcr", "data_bits", "parity", "stop_bits"),
    [
        (0x00, 5, "N", 1.0),
        (0x01, 6, "N", 1.0),
        (0x02, 7, "N", 1.0),
        (0x03, 8, "N", 1.0),
        (0x04, 5, "N", 1.5),
        (0x07, 8, "N", 2.0),
        (0x0B, 8, "O", 1.0),
        (0x1B, 8, "E", 1.0),
        (0x2B, 8, "M", 1.0),
        (0x3B, 8, "S", 1.0),
        (0x23, 8, "N", 1.0),
        (0x1E, 7, "E", 2.0),
    ],
)
def test_lcr_line_settings(lcr: int, data_bits: int, parity: str, stop_bits: float) -> None:
    """LCR gives data bits, parity N/O/E and stick M/S, and 1, 1.5 (5-bit) or 2 stop bits."""
    uart = p0()
    uart.take_events()
    uart.write(3, lcr)
    expected = LineSettings(
        baud=9600, data_bits=data_bits, parity=parity,  # type: ignore[arg-type]
        stop_bits=stop_bits, break_on=False,
    )
    assert uart.line_settings == expected
    assert uart.take_events().line_settings == expected
    assert uart.read(3) == lcr


def test_lcr_break_and_dlab_read_back() -> None:
    """LCR reads back all 8 bits; bit 6 is the break, bit 7 DLAB does not affect settings."""
    uart = p0()
    run(uart, "W(3,0xC3) R(3)→C3")
    assert uart.line_settings.break_on
    assert uart.line_settings.data_bits == 8


def test_lcr_char_time_frame_bits() -> None:
    """Char time counts start, data, parity and stop bits (2 stop for 5-bit words, as QEMU)."""
    uart = p0()
    run(uart, "W(3,0x80) W(0,0x01) W(1,0x00) W(3,0x0F)")  # 8 data, parity, 2 stop: 12 bits
    assert uart.char_time_ns == 1_000_000_000 * 12 // 115200
    run(uart, "W(3,0x04)")  # 5 data + 2 stop: 8 bits
    assert uart.char_time_ns == 1_000_000_000 * 8 // 115200


# -- MCR / modem outputs ---------------------------------------------------------------------


def test_mcr_mask_and_outputs() -> None:
    """MCR keeps bits 0–4; modem_outputs shows DTR, RTS, OUT1, OUT2, LOOP."""
    uart = p0()
    uart.take_events()
    run(uart, "W(4,0xE3) R(4)→03")
    outputs = ModemOutputs(dtr=True, rts=True, out1=False, out2=False, loop=False)
    assert uart.modem_outputs == outputs
    assert uart.take_events().modem_outputs == outputs
    run(uart, "W(4,0x03)")
    assert uart.take_events().modem_outputs is None  # unchanged: no event


def test_mcr_loopback_not_reported() -> None:
    """Entering or changing loopback reports no modem outputs; leaving it does."""
    uart = p0()
    uart.take_events()
    run(uart, "W(4,0x1B)")
    assert uart.take_events().modem_outputs is None
    assert uart.modem_outputs.loop
    run(uart, "W(4,0x10)")
    assert uart.take_events().modem_outputs is None
    run(uart, "W(4,0x01)")
    events = uart.take_events()
    assert events.modem_outputs == ModemOutputs(
        dtr=True, rts=False, out1=False, out2=False, loop=False
    )


# -- LSR -----------------------------------------------------------------------------------


def test_lsr_clears_error_bits_on_read() -> None:
    """An LSR read returns OE/PE/FE/BI and clears them (and RLSI); DR/THRE/TEMT stay."""
    uart = p0()
    uart.write(1, 0x04)
    uart.receive(b"a")
    uart.receive_break()  # non-FIFO: DR already set, BI
    uart.receive_line_error(parity=True, framing=True)
    assert uart.irq
    run(uart, "R(2)→06 R(5)→7D R(5)→61 R(2)→01")
    assert not uart.irq


def test_lsr_overrun_non_fifo() -> None:
    """A non-FIFO loopback byte arriving while DR=1 sets OE and replaces RBR."""
    run(p0(), "W(4,0x10) W(0,0x31) W(0,0x32) R(5)→63 R(5)→61 R(0)→32")


def test_lsr_write_ignored() -> None:
    """Writes to LSR and MSR change nothing."""
    uart = p0()
    before = uart.state()
    run(uart, "W(5,0xFF) W(6,0x0F)")
    assert uart.state() == before


def test_receive_line_error_counts() -> None:
    """receive_line_error sets PE/FE, counts once per call, and a no-error call does nothing."""
    uart = p0()
    uart.receive_line_error()
    assert uart.statistics().line_errors == 0
    uart.receive_line_error(framing=True)
    run(uart, "R(5)→68 R(5)→60")
    uart.receive_line_error(parity=True)
    run(uart, "R(5)→64")
    assert uart.statistics().line_errors == 2


# -- MSR -----------------------------------------------------------------------------------


def test_msr_deltas_and_msi() -> None:
    """Input changes set DCTS/DDSR/DDCD and MSI; an MSR read returns and clears the deltas."""
    uart = p0()
    uart.write(1, 0x08)
    assert not uart.irq
    uart.set_modem_inputs(cts=False, dsr=False, ri=False, dcd=False)
    assert uart.irq
    run(uart, "R(2)→00 R(6)→0B R(6)→00 R(2)→01")
    assert not uart.irq
    uart.set_modem_inputs(cts=False, dsr=False, ri=False, dcd=False)  # no change
    run(uart, "R(2)→01 R(6)→00")


def test_msr_teri_only_on_ri_falling() -> None:
    """TERI is set when RI goes 1→0, never when it goes 0→1."""
    uart = p0()
    uart.set_modem_inputs(cts=True, dsr=True, ri=True, dcd=True)
    run(uart, "R(6)→F0")
    uart.set_modem_inputs(cts=True, dsr=True, ri=False, dcd=True)
    run(uart, "R(6)→B4 R(6)→B0")


def test_msr_teri_lost_on_later_change() -> None:
    """QEMU quirk (§8): a later input change while RI=0 drops an unread TERI."""
    uart = p0()
    uart.set_modem_inputs(cts=True, dsr=True, ri=True, dcd=True)
    uart.read(6)
    uart.set_modem_inputs(cts=True, dsr=True, ri=False, dcd=True)
    uart.set_modem_inputs(cts=False, dsr=True, ri=False, dcd=True)
    run(uart, "R(6)→A1")


def test_msr_no_msi_without_ier() -> None:
    """Deltas without IER.MSI raise no interrupt."""
    uart = p0()
    uart.set_modem_inputs(cts=False, dsr=True, ri=False, dcd=True)
    assert not uart.irq
    run(uart, "R(2)→01 R(6)→A1")


def test_msr_loopback_mapping_keeps_stored_deltas() -> None:
    """Loopback MSR maps OUT2/OUT1/DTR/RTS with no deltas; stored deltas show after leaving."""
    uart = p0()
    uart.set_modem_inputs(cts=False, dsr=True, ri=False, dcd=True)
    run(uart, "W(4,0x1A) R(6)→90 W(4,0x15) R(6)→60 W(4,0x00) R(6)→A1 R(6)→A0")


# -- SCR -----------------------------------------------------------------------------------


def test_scr_plain_storage() -> None:
    """SCR stores any byte, independent of DLAB, with no side effect."""
    uart = p0()
    run(uart, "W(7,0xFF) R(7)→FF W(3,0x80) R(7)→FF W(7,0x00) R(7)→00 R(5)→60 R(2)→01")


# -- transmitter retry policy -------------------------------------------------------------


def test_tx_retry_limit_none_keeps_byte() -> None:
    """With tx_retry_limit=None a refused byte stays in the TSR however often it is refused."""
    uart = p0()
    uart.write(0, 0x41)
    for _ in range(100):
        uart.tx_blocked()
    assert uart.tx_pending() == b"A"
    assert uart.state().tsr_retry == 100
    assert uart.statistics().refused_writes == 100
    assert uart.statistics().tx_dropped == 0
    run(uart, "R(5)→20")
    uart.tx_sent(1)
    run(uart, "R(5)→60")
    assert uart.state().tsr_retry == 0


def test_tx_retry_limit_qemu_drops_after_four_more() -> None:
    """With tx_retry_limit=4 (QEMU) a byte refused 4 more times after the first is dropped."""
    uart = p0(tx_retry_limit=QEMU_MAX_XMIT_RETRY)
    run(uart, "W(2,0x01) W(0,0x41) W(0,0x42)", sent=keep)
    for _ in range(1 + QEMU_MAX_XMIT_RETRY - 1):
        uart.tx_blocked()
        assert uart.tx_pending() == b"AB"
    uart.tx_blocked()
    assert uart.tx_pending() == b"B"
    stats = uart.statistics()
    assert stats.tx_dropped == 1
    assert stats.refused_writes == 1 + QEMU_MAX_XMIT_RETRY
    assert uart.state().tsr_retry == 0
    uart.tx_sent(1)
    run(uart, "R(5)→60")
    assert uart.statistics().bytes_transmitted == 1


def test_tx_blocked_and_sent_misuse() -> None:
    """tx_blocked with nothing pending and tx_sent past the pending bytes raise ValueError."""
    uart = p0()
    with pytest.raises(ValueError, match="pending"):
        uart.tx_blocked()
    with pytest.raises(ValueError, match="pending"):
        uart.tx_sent(1)
    with pytest.raises(ValueError, match="pending"):
        uart.tx_sent(-1)


def test_tx_sent_partial() -> None:
    """tx_sent(k) takes the oldest k bytes; THRE rises when the last queued byte enters TSR."""
    uart = p0()
    run(uart, "W(2,0x01) W(1,0x02) R(2)→C2", sent=keep)
    for b in b"abcd":
        uart.write(0, b)
    run(uart, "R(5)→00 R(2)→C1", sent=keep)
    uart.tx_sent(2)
    assert uart.tx_pending() == b"cd"
    run(uart, "R(5)→00", sent=keep)
    uart.tx_sent(1)
    run(uart, "R(5)→20 R(2)→C2", sent=keep)
    uart.tx_sent(1)
    run(uart, "R(5)→60")


# -- events --------------------------------------------------------------------------------


def test_events_irq_edge_inside_thr_write() -> None:
    """V17: a THR write while THRI is pending drops and re-raises the line: (False, True)."""
    uart = p0()
    uart.write(1, 0x02)
    assert uart.take_events().irq_changes == (True,)
    uart.write(0, 0x41)  # the byte moves to the TSR at once: THRE and THRI rise again
    events = uart.take_events()
    assert events.irq_changes == (False, True)
    assert events.tx_ready
    assert uart.irq
    uart.tx_sent(1)
    assert uart.read(2) == 0x02
    assert uart.take_events().irq_changes == (False,)
    uart.write(0, 0x42)  # THRI acknowledged: the write only raises
    assert uart.take_events().irq_changes == (True,)


def test_events_irq_changes_keep_last_two() -> None:
    """irq_changes holds at most the last two levels, so the final level is always last."""
    uart = p0()
    for _ in range(3):
        uart.write(1, 0x02)
        uart.write(1, 0x00)
    assert uart.take_events().irq_changes == (True, False)
    assert uart.take_events().irq_changes == ()


def test_events_tx_ready_only_with_pending_bytes() -> None:
    """tx_ready is reported when bytes wait for the wire, not after they left or in loopback."""
    uart = p0()
    uart.write(0, 0x41)
    assert uart.take_events().tx_ready
    uart.write(0, 0x42)
    uart.tx_sent(2)
    assert not uart.take_events().tx_ready
    uart.write(4, 0x10)
    uart.write(0, 0x43)
    assert not uart.take_events().tx_ready


def test_events_rx_space_on_rbr_read() -> None:
    """An RBR read reports rx_space (not in loopback, where QEMU does not kick the back end)."""
    uart = p0()
    uart.receive(b"a")
    assert not uart.take_events().rx_space
    uart.read(0)
    assert uart.take_events().rx_space
    uart.write(4, 0x10)
    uart.write(0, 0x41)
    uart.take_events()
    uart.read(0)
    assert not uart.take_events().rx_space


def test_events_msi_enabled() -> None:
    """msi_enabled is reported when IER.MSI changes, and when reset turns it off."""
    uart = p0()
    uart.write(1, 0x01)
    assert uart.take_events().msi_enabled is None
    uart.write(1, 0x09)
    assert uart.take_events().msi_enabled is True
    assert uart.msi_enabled
    uart.write(1, 0x08)
    assert uart.take_events().msi_enabled is None
    uart.reset()
    assert uart.take_events().msi_enabled is False


def test_events_empty_when_nothing_changed() -> None:
    """take_events() returns no changes when nothing happened since the last call."""
    uart = p0()
    uart.take_events()
    uart.read(5)
    uart.read(7)
    events = uart.take_events()
    assert events.irq_changes == () and events.line_settings is None
    assert events.modem_outputs is None and events.msi_enabled is None
    assert not events.tx_ready and not events.rx_space


# -- statistics ----------------------------------------------------------------------------


def test_statistics_counters() -> None:
    """Every byte in, out, looped back, flushed, overwritten or overrun is counted."""
    uart = p0()
    run(uart, "W(0,0x41) W(0,0x42)")
    uart.receive(b"xy")
    run(uart, "R(0) W(4,0x10) W(0,0x43) W(0,0x44) R(0) W(4,0x00) W(2,0x07)")
    uart.receive_break()
    uart.receive_line_error(framing=True)
    run(uart, "W(0,0x45) W(0,0x46)", sent=stall)
    stats = uart.statistics()
    assert stats.bytes_transmitted == 2
    assert stats.bytes_received == 1
    assert stats.bytes_looped_back == 2
    assert stats.overruns == 1
    assert stats.breaks == 1
    assert stats.line_errors == 1
    assert stats.refused_writes == 2  # one refusal after each of the two writes
    assert stats.rx_flushed == 0  # the FE toggle found DR=0
    uart.reset()
    stats = uart.statistics()
    assert stats.tx_flushed == 2
    assert stats.rx_flushed == 1  # the break's NUL


def test_events_report_the_irq_level_and_break_edges() -> None:
    """take_events(): `irq` is the last level taken; `break_on` only when LCR's break bit moved."""
    uart = Uart16550(clock=FakeClock())
    uart.take_events()
    uart.write(1, 0x02)
    events = uart.take_events()
    assert events.irq is True and events.break_on is None
    uart.write(3, 0x43)
    assert uart.take_events().break_on is True
    uart.write(3, 0x43)
    assert uart.take_events().break_on is None
    uart.write(3, 0x03)
    assert uart.take_events().break_on is False
    assert uart.take_events().irq is None


def test_state_exposes_modem_inputs() -> None:
    """UartState.modem_inputs are the MSR levels set by set_modem_inputs."""
    uart = Uart16550(clock=FakeClock())
    uart.set_modem_inputs(cts=False, dsr=True, ri=True, dcd=False)
    assert uart.state().modem_inputs == {"cts": False, "dsr": True, "ri": True, "dcd": False}


def test_line_settings_summary() -> None:
    """LineSettings.summary() is the usual short form, with "break" when LCR.SBC is set."""
    uart = Uart16550(clock=FakeClock())
    uart.write(3, 0x80)
    uart.write(0, 0x0C)
    uart.write(3, 0x1E | 0x40)  # 7 data bits, even parity, 2 stop bits, break
    assert uart.line_settings.summary() == "9600 7E2 break"


def test_rx_count_and_rx_readable_have_no_side_effects() -> None:
    """rx_count() is the RX fill (1/0 without FIFOs), rx_readable() stops at a pending error."""
    uart = Uart16550(clock=FakeClock())
    assert uart.rx_count() == 0
    assert uart.receive(b"a") == 1
    assert (uart.rx_count(), uart.rx_readable()) == (1, 1)
    assert uart.read(0) == ord("a") and uart.rx_count() == 0
    uart.write(2, 0xC7)  # FIFOs on, trigger 14
    assert uart.receive(b"bcd") == 3
    before = uart.state()
    assert (uart.rx_count(), uart.rx_readable()) == (3, 3)
    assert uart.state() == before
    uart.receive_line_error(parity=True)
    assert (uart.rx_count(), uart.rx_readable()) == (3, 0)
    assert uart.read(5) & 0x04  # PE, cleared by this read
    assert uart.rx_readable() == 3
