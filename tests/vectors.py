"""A tiny runner for reference/uart16550.md §13 notation: ``W(o,v)`` and ``R(o)→v``."""

from __future__ import annotations

import re
from collections.abc import Callable

from uartbridge import Uart16550

# The value group is optional as a whole (comma included), so ``R(5)→60`` parses too.
_OP = re.compile(r"([WR])\((\d)(?:,\s*(0x[0-9A-Fa-f]+|'.'))?\)\s*(?:→\s*([0-9A-Fa-f]{2}))?")

SLOW = "W(3,0x80) W(0,0xFF) W(1,0xFF) W(3,0x03)"


class FakeClock:
    """A clock the test moves by hand (trio MockClock style)."""

    def __init__(self) -> None:
        self.now_ns = 1_000_000

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, ns: int) -> None:
        self.now_ns += ns


def _value(text: str) -> int:
    return ord(text[1]) if text.startswith("'") else int(text, 16)


def run(
    uart: Uart16550,
    script: str,
    *,
    sent: Callable[[Uart16550], None] | None = None,
) -> None:
    """Run a §13 sequence; every ``R(o)→v`` is asserted. After each write, ``sent`` (if given)
    plays the wire (default: the wire takes every pending byte, like QEMU's P0 back end)."""
    ops = _OP.findall(script)
    # Every W(...) and R(...) must have parsed: a silently skipped check is no check.
    assert len(ops) == script.count("W(") + script.count("R("), f"unparsed op in {script!r}"
    for kind, offset, value, expected in ops:
        if kind == "W":
            uart.write(int(offset), _value(value))
            if sent is None:
                uart.tx_sent(len(uart.tx_pending()))
            else:
                sent(uart)
        else:
            got = uart.read(int(offset))
            if expected:
                assert got == int(expected, 16), (
                    f"{script!r}: R({offset}) = {got:02X}, expected {expected}"
                )
