"""Register offsets and bit names of the 16550A (reference §1; Linux ``serial_reg.h`` names).

Names only, no behaviour: the model (``uart.py``), the checkpoint inspector and the reference
guest driver all speak in these terms.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final


class Reg(IntEnum):
    """Register offsets from the UART base (DLAB selects DLL/DLM at 0/1)."""

    RBR_THR_DLL = 0
    IER_DLM = 1
    IIR_FCR = 2
    LCR = 3
    MCR = 4
    LSR = 5
    MSR = 6
    SCR = 7


RBR: Final = 0
THR: Final = 0
DLL: Final = 0
IER: Final = 1
DLM: Final = 1
IIR: Final = 2
FCR: Final = 2
LCR: Final = 3
MCR: Final = 4
LSR: Final = 5
MSR: Final = 6
SCR: Final = 7

FIFO_SIZE: Final = 16


class Ier(IntFlag):
    """Interrupt enable register (only the low nibble is stored)."""

    RDI = 0x01
    THRI = 0x02
    RLSI = 0x04
    MSI = 0x08


class Iir(IntEnum):
    """Interrupt identification values (low nibble)."""

    MSI = 0x00
    NO_INT = 0x01
    THRI = 0x02
    RDI = 0x04
    RLSI = 0x06
    CTI = 0x0C


IIR_ID_MASK: Final = 0x06
IIR_FIFO_BITS: Final = 0xC0


class Fcr(IntFlag):
    """FIFO control register (write-only; only 0xC9 is remembered)."""

    FE = 0x01
    RFR = 0x02
    XFR = 0x04
    DMS = 0x08
    TRIGGER_MASK = 0xC0


FCR_STORED_MASK: Final = 0xC9
TRIGGER_LEVELS: Final = (1, 4, 8, 14)


class Lcr(IntFlag):
    """Line control register."""

    WLS_MASK = 0x03
    STOP = 0x04
    PEN = 0x08
    EPS = 0x10
    SPAR = 0x20
    SBC = 0x40
    DLAB = 0x80


class Mcr(IntFlag):
    """Modem control register (bits 0–4 stored)."""

    DTR = 0x01
    RTS = 0x02
    OUT1 = 0x04
    OUT2 = 0x08
    LOOP = 0x10


MCR_MASK: Final = 0x1F


class Lsr(IntFlag):
    """Line status register."""

    DR = 0x01
    OE = 0x02
    PE = 0x04
    FE = 0x08
    BI = 0x10
    THRE = 0x20
    TEMT = 0x40
    FIFOE = 0x80


LSR_INT_ANY: Final = 0x1E


class Msr(IntFlag):
    """Modem status register: deltas in the low nibble, line levels in the high one."""

    DCTS = 0x01
    DDSR = 0x02
    TERI = 0x04
    DDCD = 0x08
    CTS = 0x10
    DSR = 0x20
    RI = 0x40
    DCD = 0x80


MSR_DELTA_MASK: Final = 0x0F

REGISTER_BITS: dict[str, type[IntFlag]] = {
    "ier": Ier,
    "lcr": Lcr,
    "mcr": Mcr,
    "lsr": Lsr,
    "msr": Msr,
}


def decode_bits(value: int, flags: type[IntFlag]) -> list[str]:
    """Names of the single-bit flags of ``flags`` that are set in ``value``."""
    return [
        str(member.name)
        for member in flags
        if member.name and member.value and member.value & (member.value - 1) == 0
        and value & member.value
    ]
