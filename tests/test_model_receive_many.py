"""``Uart16550.receive_many``: the port link's bulk refill equals feeding the bytes one by one.

The per-byte path is what a back end that offers one byte per call does: ``receive`` of one
byte, again and again, until one is refused. Two devices brought to the same state by the
same random register operations, input and time, on two clocks, take the same data, one
through ``receive_many`` and one through that loop; afterwards everything observable is the
same: the count taken, ``state()``, the IRQ level, the events and every register read.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.vectors import FakeClock
from uartbridge import Uart16550

# Register writes that put the receiver in every shape: FIFOs off/on, each trigger level,
# loopback (which fills the RX FIFO past the trigger level), IER, divisor/LCR changes.
SETUP_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.sampled_from([1, 2, 3, 4]), st.integers(0, 255)),
        st.tuples(st.just("write"), st.just(2), st.sampled_from([0x01, 0x41, 0x81, 0xC1, 0x07])),
        st.tuples(st.just("write"), st.just(4), st.sampled_from([0x10, 0x00, 0x0B])),
        st.tuples(st.just("write"), st.just(0), st.integers(0, 255)),
        st.tuples(st.just("read"), st.sampled_from([0, 2, 5]), st.just(0)),
        st.tuples(st.just("receive"), st.just(0), st.integers(1, 40)),
        st.tuples(st.just("advance"), st.just(0), st.integers(0, 2_000_000)),
    ),
    max_size=30,
)


def _apply(uart: Uart16550, clock: FakeClock, op: tuple[str, int, int]) -> None:
    kind, offset, value = op
    if kind == "write":
        uart.write(offset, value)
    elif kind == "read":
        uart.read(offset)
    elif kind == "receive":
        uart.receive(bytes(range(value)))
    else:
        clock.advance(value)
    if uart.tx_pending():
        uart.tx_sent(len(uart.tx_pending()))


def _per_byte(uart: Uart16550, data: bytes) -> int:
    taken = 0
    for byte in data:
        if not uart.receive(bytes((byte,))):
            break
        taken += 1
    return taken


@settings(max_examples=300, deadline=None)
@given(
    pace=st.sampled_from(["none", "line"]),
    setup=SETUP_OPS,
    data=st.binary(min_size=0, max_size=300),
)
def test_receive_many_leaves_the_device_as_one_byte_per_receive_does(
    pace: str, setup: list[tuple[str, int, int]], data: bytes
) -> None:
    """receive_many(data) and one-byte receive() calls until one is refused: same count taken,
    same state, IRQ, events and register reads after, from any receiver state."""
    clock_a, clock_b = FakeClock(), FakeClock()
    bulk = Uart16550(clock=clock_a, pace=pace)  # type: ignore[arg-type]
    single = Uart16550(clock=clock_b, pace=pace)  # type: ignore[arg-type]
    for op in setup:
        _apply(bulk, clock_a, op)
        _apply(single, clock_b, op)
    bulk.take_events()
    single.take_events()
    assert bulk.state() == single.state()
    assert bulk.receive_many(data) == _per_byte(single, data)
    assert bulk.state() == single.state()
    assert bulk.irq == single.irq
    assert bulk.take_events() == single.take_events()
    for offset in (5, 2, 0, 0, 5, 6):
        assert bulk.read(offset) == single.read(offset)
    clock_a.advance(10_000_000)
    clock_b.advance(10_000_000)
    bulk.poll()
    single.poll()
    assert bulk.state() == single.state()
