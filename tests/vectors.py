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

    def set(self, now_ns: int) -> None:
        """Jump to ``now_ns`` (forward only, as a clock goes)."""
        assert now_ns >= self.now_ns, (now_ns, self.now_ns)
        self.now_ns = now_ns


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


def _thr_writes(values: range | list[int]) -> str:
    return " ".join(f"W(0,{v:#04x})" for v in values)


# The plain register sequences of reference §13 (V1–V29, V36): the model and QEMU must both
# read back exactly these values (tests/test_model_vectors.py, tests/test_qemu_differential.py).
REGISTER_VECTORS: dict[str, str] = {
    "V1": "R(0)→00 R(1)→00 R(2)→01 R(3)→00 R(4)→08 R(5)→60 R(6)→B0 R(7)→00",
    "V2": "W(3,0x80) R(0)→0C R(1)→00 W(0,0x01) W(1,0x00) R(0)→01 R(1)→00 R(5)→60 "
    "W(3,0x03) R(3)→03 R(1)→00 R(5)→60",
    "V3": "W(7,0xA5) R(7)→A5 W(7,0x5A) R(7)→5A",
    "V4": "W(1,0xFF) R(1)→0F R(2)→02 R(2)→01 R(2)→01",
    "V5": "W(1,0x0F) R(2)→02 R(2)→01 W(1,0x0F) R(2)→01 W(1,0x0D) R(2)→01 W(1,0x0F) R(2)→02",
    "V6": "W(2,0x07) R(2)→C1 W(2,0x00) R(2)→01",
    "V7": "W(1,0x02) R(2)→02 R(2)→01 W(2,0x07) R(2)→C2 R(2)→C1 W(2,0x01) R(2)→C1 "
    "W(2,0x05) R(2)→C2",
    "V8": "W(4,0x1A) R(6)→90 W(4,0x11) R(6)→20 W(4,0x12) R(6)→10 W(4,0x14) R(6)→40 "
    "W(4,0x18) R(6)→80 W(4,0x1F) R(6)→F0 W(4,0x10) R(6)→00 W(4,0x08) R(6)→B0 "
    "W(4,0xFF) R(4)→1F",
    "V9": "W(4,0x10) W(0,0x41) R(5)→61 R(0)→41 R(5)→60 R(0)→41 R(5)→60",
    "V10": "W(4,0x10) W(1,0x05) W(0,0x41) R(2)→04 W(0,0x42) R(2)→06 R(5)→63 R(2)→04 "
    "R(5)→61 R(0)→42 R(2)→01 R(5)→60",
    "V11": SLOW + " W(2,0x07) W(4,0x10) W(0,'A') W(0,'B') W(0,'C') R(5)→61 R(0)→41 "
    "R(0)→42 R(5)→61 R(0)→43 R(5)→60 R(0)→00",
    "V12": SLOW + " W(2,0x07) W(4,0x10) " + _thr_writes(range(17)) + " R(5)→63 R(5)→61 "
    + " ".join(f"R(0)→{i:02X}" for i in range(16)) + " R(5)→60",
    "V13": SLOW + " W(2,0x81) W(1,0x01) W(4,0x10) " + _thr_writes(range(0x30, 0x37))
    + " R(2)→C1 R(5)→61 W(0,0x37) R(2)→C4 R(0)→30 R(2)→C1",
    "V16": SLOW + " W(2,0x07) W(4,0x10) W(1,0x03) W(0,0x58) R(2)→C4 R(2)→C4 R(0)→58 "
    "R(2)→C2 R(2)→C1",
    "V17": "W(2,0x07) W(1,0x02) R(2)→C2 R(2)→C1 W(0,0x55) R(5)→60 R(2)→C2 R(2)→C1",
    "V18": SLOW + " W(2,0x01) W(4,0x10) W(0,0x41) W(0,0x42) R(5)→61 W(2,0x03) R(5)→60 "
    "R(2)→C1 R(0)→00",
    "V19": SLOW + " W(2,0x01) W(4,0x10) W(0,0x41) W(2,0xC1) R(5)→61 R(0)→41",
    "V20": SLOW + " W(2,0x01) W(4,0x10) W(0,0x41) W(2,0x00) R(5)→60 R(2)→01 R(0)→00",
    "V21": "W(2,0x01) W(3,0xBF) R(3)→BF R(2)→C1 W(2,0x00) W(3,0x00) R(2)→01",
    "V22": "W(4,0xEF) R(4)→0F W(5,0x00) R(5)→60 W(6,0xFF) R(6)→B0",
    "V23": SLOW + " W(2,0x01) W(4,0x10) W(0,0x41) W(3,0x80) R(0)→FF W(0,0x01) W(3,0x00) "
    "R(5)→61 R(0)→41 R(5)→60 W(3,0x80) R(0)→01",
    "V24": "W(1,0x40) R(1)→00 R(2)→01",
    "V25": "W(3,0xBF) W(2,0x00) W(3,0x00) W(2,0x01) R(2)→C1",
    "V26": "W(2,0x01) W(2,0x21) R(2)→C1 W(3,0x80) W(2,0x21) R(2)→C1 W(2,0x01) W(3,0x00)",
    "V28": "W(1,0x02) R(2)→02 W(1,0x00) W(1,0x02) R(2)→02 W(1,0x00) R(2)→01",
    "V29": "W(1,0x02) R(5)→60 R(2)→02 W(1,0x00)",
    "V36": SLOW + " W(4,0x10) W(1,0x01) W(0,0x5A) R(2)→04 W(2,0x07) R(5)→60 R(2)→C1",
}
