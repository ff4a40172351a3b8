"""The transmit accounting checks ``tx_sent(n)`` against a count, not a rebuilt ``tx_pending()``."""

from __future__ import annotations

import ast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sources import class_node

from uartbridge import Uart16550

THR, FCR, LCR, MCR = 0, 2, 3, 4


def test_the_model_never_builds_tx_pending_itself() -> None:
    """No method of Uart16550 calls tx_pending(): tx_sent(n), tx_blocked, take_events and
    reset count what waits instead of building its bytes. Read from the .py source, so the
    check holds for the compiled build too (its methods cannot be replaced at run time)."""
    calls = [
        (method.name, node.lineno)
        for method in class_node("uartbridge.uart", "Uart16550").body
        if isinstance(method, ast.FunctionDef) and method.name != "tx_pending"
        for node in ast.walk(method)
        if isinstance(node, ast.Attribute) and node.attr == "tx_pending"
    ]
    assert calls == []


def test_tx_sent_and_take_events_count_what_waits() -> None:
    """tx_sent(n), tx_blocked and take_events() account for exactly the bytes that wait."""
    uart = Uart16550(clock=lambda: 0)
    uart.write(LCR, 0x03)
    uart.write(FCR, 0x07)
    for value in b"abc":
        uart.write(THR, value)
    assert uart.tx_pending() == b"abc"
    assert uart.take_events().tx_ready
    uart.tx_sent(2)
    uart.write(THR, ord("d"))
    assert uart.take_events().tx_ready
    with pytest.raises(ValueError, match=r"tx_sent\(3\) but only 2 bytes are pending"):
        uart.tx_sent(3)
    uart.tx_blocked()
    uart.tx_sent(2)
    assert uart.tx_pending() == b""
    assert uart.statistics().bytes_transmitted == 4


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("thr"), st.integers(0, 255)),
        st.tuples(st.just("fcr"), st.sampled_from([0x00, 0x01, 0x07, 0x05, 0xC7])),
        st.tuples(st.just("mcr"), st.sampled_from([0x00, 0x10])),
        st.tuples(st.just("sent"), st.integers(0, 20)),
        st.tuples(st.just("blocked"), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(_ops)
def test_tx_sent_accepts_exactly_what_waits_in_every_mode(ops: list[tuple[str, int]]) -> None:
    """FIFO or not, loopback, stuck TSR: tx_sent(n) is refused iff n > len(tx_pending())."""
    uart = Uart16550(clock=lambda: 0)
    uart.write(LCR, 0x03)
    for op, value in ops:
        waiting = len(uart.tx_pending())
        if op == "thr":
            uart.write(THR, value)
        elif op == "fcr":
            uart.write(FCR, value)
        elif op == "mcr":
            uart.write(MCR, value)
        elif op == "blocked":
            if waiting:
                uart.tx_blocked()
            else:
                with pytest.raises(ValueError):
                    uart.tx_blocked()
        elif value > waiting:
            before = uart.state()
            with pytest.raises(ValueError):
                uart.tx_sent(value)
            assert uart.state() == before
        else:
            sent_before = uart.statistics().bytes_transmitted
            uart.tx_sent(value)
            assert uart.statistics().bytes_transmitted == sent_before + value
        uart.state().validate()
