"""Stateful property tests of the model: random driver and wire behaviour, checked invariants.

A small reference of the *data path only* (TSR + TX queue, RX FIFO/RBR, loopback, flushes,
overwrites, breaks, reset) runs beside the model; it knows nothing of interrupts or LSR
error bits. After every step:

* ``tx_pending()`` equals the reference's TSR byte + queue, so every byte the guest wrote
  leaves through ``tx_pending``/``tx_sent`` (or loops back to the receiver) exactly once and
  in order, unless the guest itself discarded it (XFR/FE toggle, overwrite of a full
  FIFO/THR, ``reset()``) or the retry policy dropped it;
* the RX FIFO equals the reference's, and every RBR read returns the reference's byte, so
  every byte accepted by ``receive`` (and every loopback byte and break NUL) is read once,
  in order; ``can_receive()`` equals the §7.1 formula;
* ``uart.state().validate()`` never raises;
* a shadow clone made with ``Uart16550.from_state(uart.state(), clock=same_clock)`` at a
  random step answers every later operation exactly as the original does (return values,
  ``irq``, ``tx_pending()``, ``state()`` and ``take_events()``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests.vectors import FakeClock
from uartbridge import Uart16550
from uartbridge.registers import TRIGGER_LEVELS

T = TypeVar("T")

BYTES = st.integers(0, 255)
IER_VALUES = st.one_of(st.sampled_from([0x00, 0x01, 0x02, 0x03, 0x05, 0x07, 0x08, 0x0F]), BYTES)
FCR_VALUES = st.one_of(
    st.sampled_from([0x00, 0x01, 0x07, 0x41, 0x81, 0x87, 0xC1, 0xC7, 0x03, 0x05, 0x06]), BYTES
)
LCR_VALUES = st.one_of(
    st.sampled_from([0x03, 0x03, 0x00, 0x1B, 0x43, 0x83, 0x80, 0xBF]), BYTES
)
MCR_VALUES = st.one_of(st.sampled_from([0x00, 0x03, 0x08, 0x0B, 0x10, 0x1A, 0x1F]), BYTES)
DIVISOR_BYTES = st.sampled_from([0x00, 0x01, 0x02, 0x0C, 0x60, 0xFF])
OFFSETS = st.integers(0, 7)


class DataPath:
    """The reference: where each byte is, by the rules of reference §3.1–§3.6, §6, §7."""

    def __init__(self, retry_limit: int | None) -> None:
        self.retry_limit = retry_limit
        self.lcr = 0
        self.mcr = 0x08
        self.fcr = 0
        self.tsr: int | None = None
        self.retry = 0
        self.queue: list[int] = []
        self.rx: list[int] = []
        self.dr = False
        self.rbr = 0

    @property
    def fifo(self) -> bool:
        return bool(self.fcr & 0x01)

    @property
    def loop(self) -> bool:
        return bool(self.mcr & 0x10)

    def pending(self) -> bytes:
        head = [] if self.tsr is None else [self.tsr]
        return bytes(head + self.queue)

    def can_receive(self) -> int:
        if self.fifo:
            count, trigger = len(self.rx), TRIGGER_LEVELS[self.fcr >> 6]
            if count >= 16:
                return 0
            return trigger - count if count <= trigger else 1
        return 0 if self.dr else 1

    def rx_byte(self, value: int) -> None:
        if self.fifo:
            if len(self.rx) < 16:
                self.rx.append(value)
        else:
            self.rbr = value
        self.dr = True

    def rx_break(self) -> None:
        self.rbr = 0
        if len(self.rx) < 16:
            self.rx.append(0)
        self.dr = True

    def read_rbr(self) -> int:
        if self.fifo:
            value = self.rx.pop(0) if self.rx else 0
            if not self.rx:
                self.dr = False
            return value
        self.dr = False
        return self.rbr

    def xmit(self) -> None:
        while True:
            if self.tsr is None:
                if not self.queue:
                    return
                self.tsr = self.queue.pop(0)
            if not self.loop:
                return
            self.rx_byte(self.tsr)
            self.tsr = None
            self.retry = 0

    def write(self, offset: int, value: int) -> None:
        if offset == 0 and not self.lcr & 0x80:
            if self.fifo:
                if len(self.queue) >= 16:
                    del self.queue[0]
                self.queue.append(value)
            else:
                self.queue = [value]
            if self.tsr is None:
                self.xmit()
        elif offset == 2:
            toggle = bool((value ^ self.fcr) & 0x01)
            if toggle or value & 0x02:
                self.rx.clear()
                self.dr = False
            if toggle or value & 0x04:
                self.queue.clear()
            self.fcr = value & 0xC9
        elif offset == 3:
            self.lcr = value
        elif offset == 4:
            self.mcr = value & 0x1F

    def tx_sent(self, n: int) -> None:
        for _ in range(n):
            if self.tsr is None:
                self.queue.pop(0)
            self.tsr = None
            self.retry = 0
        self.xmit()

    def tx_blocked(self) -> None:
        if self.tsr is None:
            self.tsr = self.queue.pop(0)
        if self.retry_limit is not None and self.retry >= self.retry_limit:
            self.tsr = None
            self.retry = 0
            self.xmit()
        else:
            self.retry += 1

    def reset(self) -> None:
        self.lcr = 0
        self.mcr = 0x08
        self.tsr = None
        self.retry = 0
        self.queue.clear()
        self.rx.clear()
        self.dr = False
        self.rbr = 0


class UartMachine(RuleBasedStateMachine):
    """Random register traffic, wire traffic, time and resets against the data-path reference."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.uart = Uart16550(clock=self.clock)
        self.ref = DataPath(None)
        self.shadow: Uart16550 | None = None
        self.wire = bytearray()

    @initialize(limit=st.sampled_from([None, None, None, 0, 1, 4]))
    def configure(self, limit: int | None) -> None:
        self.uart = Uart16550(clock=self.clock, tx_retry_limit=limit)
        self.ref = DataPath(limit)

    def apply(self, op: Callable[[Uart16550], T]) -> T:
        """Run ``op`` on the device and on the shadow clone; both must answer alike."""
        result = op(self.uart)
        events = self.uart.take_events()
        if self.shadow is not None:
            assert op(self.shadow) == result
            assert self.shadow.take_events() == events
            assert self.shadow.irq == self.uart.irq
            assert self.shadow.tx_pending() == self.uart.tx_pending()
            assert self.shadow.state() == self.uart.state()
        return result

    # -- the guest --------------------------------------------------------------------------

    def write(self, offset: int, value: int) -> None:
        self.apply(lambda u: u.write(offset, value))
        self.ref.write(offset, value)

    @rule(value=BYTES)
    def write_thr(self, value: int) -> None:
        self.write(0, value)

    @rule(data=st.binary(min_size=1, max_size=24))
    def write_thr_burst(self, data: bytes) -> None:
        for value in data:
            self.write(0, value)

    @rule(value=IER_VALUES)
    def write_ier(self, value: int) -> None:
        self.write(1, value)

    @rule(value=FCR_VALUES)
    def write_fcr(self, value: int) -> None:
        self.write(2, value)

    @rule(value=LCR_VALUES)
    def write_lcr(self, value: int) -> None:
        self.write(3, value)

    @rule(value=MCR_VALUES)
    def write_mcr(self, value: int) -> None:
        self.write(4, value)

    @rule(offset=st.sampled_from([0, 1]), value=DIVISOR_BYTES)
    def write_divisor(self, offset: int, value: int) -> None:
        lcr = self.ref.lcr
        self.write(3, lcr | 0x80)
        self.write(offset, value)
        self.write(3, lcr & 0x7F)

    @rule(offset=OFFSETS, value=BYTES)
    def write_any(self, offset: int, value: int) -> None:
        self.write(offset, value)

    @rule(offset=OFFSETS)
    def read(self, offset: int) -> None:
        value = self.apply(lambda u: u.read(offset))
        assert 0 <= value <= 0xFF
        if offset == 0 and not self.ref.lcr & 0x80:
            assert value == self.ref.read_rbr()

    @rule()
    def read_rbr(self) -> None:
        self.read(0)

    @rule()
    def read_iir_lsr(self) -> None:
        self.read(2)
        self.read(5)

    @rule()
    def reset(self) -> None:
        self.apply(lambda u: u.reset())
        self.ref.reset()

    # -- the wire ---------------------------------------------------------------------------

    @rule(data=st.binary(min_size=1, max_size=20))
    def receive(self, data: bytes) -> None:
        expected = self.ref.can_receive()
        assert self.apply(lambda u: u.can_receive()) == expected
        taken = self.apply(lambda u: u.receive(data))
        assert taken == min(len(data), expected)
        for value in data[:taken]:
            self.ref.rx_byte(value)

    @rule()
    def receive_break(self) -> None:
        self.apply(lambda u: u.receive_break())
        self.ref.rx_break()

    @rule(parity=st.booleans(), framing=st.booleans())
    def receive_line_error(self, parity: bool, framing: bool) -> None:
        self.apply(lambda u: u.receive_line_error(parity=parity, framing=framing))

    @precondition(lambda self: bool(self.ref.pending()))
    @rule(data=st.data())
    def tx_sent(self, data: st.DataObject) -> None:
        pending = self.uart.tx_pending()
        n = data.draw(st.integers(0, len(pending)), label="n")
        self.wire += pending[:n]
        self.apply(lambda u: u.tx_sent(n))
        self.ref.tx_sent(n)

    @precondition(lambda self: bool(self.ref.pending()))
    @rule()
    def tx_sent_all(self) -> None:
        pending = self.uart.tx_pending()
        self.wire += pending
        self.apply(lambda u: u.tx_sent(len(pending)))
        self.ref.tx_sent(len(pending))

    @precondition(lambda self: bool(self.ref.pending()))
    @rule()
    def tx_blocked(self) -> None:
        self.apply(lambda u: u.tx_blocked())
        self.ref.tx_blocked()

    @rule(cts=st.booleans(), dsr=st.booleans(), ri=st.booleans(), dcd=st.booleans())
    def set_modem_inputs(self, cts: bool, dsr: bool, ri: bool, dcd: bool) -> None:
        self.apply(lambda u: u.set_modem_inputs(cts=cts, dsr=dsr, ri=ri, dcd=dcd))

    # -- time and checkpoints ---------------------------------------------------------------

    @rule(chars=st.sampled_from([0, 1, 3, 4, 5, 100]), extra_ns=st.sampled_from([-1, 0, 1]))
    def advance_and_poll(self, chars: int, extra_ns: int) -> None:
        armed = self.uart.next_deadline_ns()
        was_pending = self.uart.state().timeout_ipending
        self.clock.advance(max(0, chars * self.uart.char_time_ns + extra_ns))
        self.apply(lambda u: u.poll())
        deadline = self.apply(lambda u: u.next_deadline_ns())
        assert deadline is None or deadline > self.clock()  # a due timer has run
        due = armed is not None and self.clock() >= armed
        # CTI is latched exactly when the 4-character timer fell due with data in the FIFO.
        expected = was_pending or (due and bool(self.ref.rx))
        assert self.uart.state().timeout_ipending == expected

    @rule()
    def clone(self) -> None:
        self.shadow = Uart16550.from_state(self.uart.state(), clock=self.clock)
        self.shadow.take_events()  # from_state queues the re-apply events once
        self.uart.take_events()

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def state_is_valid(self) -> None:
        self.uart.state().validate()

    @invariant()
    def tx_matches_reference(self) -> None:
        assert self.uart.tx_pending() == self.ref.pending()
        state = self.uart.state()
        assert state.tsr_busy == (self.ref.tsr is not None)
        assert bool(state.lsr & 0x40) == (self.ref.tsr is None)  # TEMT
        assert bool(state.lsr & 0x20) == (not self.ref.queue)  # THRE
        if self.ref.tsr is not None:
            assert state.tsr_retry == self.ref.retry

    @invariant()
    def rx_matches_reference(self) -> None:
        state = self.uart.state()
        assert state.rx_fifo == bytes(self.ref.rx)
        assert bool(state.lsr & 0x01) == self.ref.dr
        assert state.rbr == self.ref.rbr


UartMachine.TestCase.settings = settings(
    max_examples=400,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestUartMachine = UartMachine.TestCase
