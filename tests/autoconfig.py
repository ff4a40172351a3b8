"""Linux 8250 ``autoconfig`` (reference §11.1), as a function over any register interface.

It follows ``drivers/tty/serial/8250/8250_port.c`` (v5.x era, with the 16550A variant checks
enabled): IER existence test, loopback test, the LCR 0xBF "EFR" write, FCR 0x01 and IIR >> 6,
then ``autoconfig_16550a``'s ST16C650/EFR, NatSemi SuperIO, TI16750 and XScale checks and
``size_fifo``, and finally the port reset the driver does after probing. Only the register
accesses matter here; names of chips the driver knows are returned as strings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

RX = TX = DLL = 0
IER = DLM = 1
IIR = FCR = EFR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

LCR_CONF_MODE_A = 0x80  # DLAB
LCR_CONF_MODE_B = 0xBF
LCR_WLEN8 = 0x03
MCR_LOOP = 0x10
FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
FCR_CLEAR_XMIT = 0x04
FCR7_64BYTE = 0x20
IER_UUE = 0x40
LSR_DR = 0x01

# uart_config[].fifo_size for the types this probe can name.
FIFO_SIZES = {
    "none": 0,
    "unknown": 1,
    "8250": 1,
    "16450": 1,
    "16550": 1,
    "16550A": 16,
    "16550A_FSL64": 64,
    "16650": 32,
    "EFR": 32,
    "NS16550A": 16,
    "16750": 64,
    "XScale": 32,
    "U6_16550A": 64,
}


class Registers(Protocol):
    """Anything with byte-wide register access at offsets 0–7."""

    def read(self, offset: int) -> int: ...

    def write(self, offset: int, value: int) -> None: ...


class Probe(NamedTuple):
    """What the driver concluded: the port type and its FIFO size in bytes."""

    type: str
    fifo_size: int


def _dl_read(port: Registers) -> int:
    return port.read(DLL) | port.read(DLM) << 8


def _dl_write(port: Registers, divisor: int) -> None:
    port.write(DLL, divisor & 0xFF)
    port.write(DLM, divisor >> 8 & 0xFF)


def size_fifo(port: Registers, *, settle: Callable[[], None] | None = None) -> int:
    """Count the RX FIFO depth: 256 bytes through loopback, then RBR reads while LSR.DR.

    ``settle`` stands for the driver's ``mdelay(20)`` (QEMU and the model loop back
    synchronously, so it is only needed for devices that pace their transmitter).
    """
    old_lcr = port.read(LCR)
    port.write(LCR, 0)
    old_fcr = port.read(FCR)  # reads IIR: the driver's own quirk, kept
    old_mcr = port.read(MCR)
    port.write(FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR | FCR_CLEAR_XMIT)
    port.write(MCR, MCR_LOOP)
    port.write(LCR, LCR_CONF_MODE_A)
    old_dl = _dl_read(port)
    _dl_write(port, 0x0001)
    port.write(LCR, LCR_WLEN8)
    for count in range(256):
        port.write(TX, count)
    if settle is not None:
        settle()
    count = 0
    while port.read(LSR) & LSR_DR and count < 256:
        port.read(RX)
        count += 1
    port.write(FCR, old_fcr)
    port.write(MCR, old_mcr)
    port.write(LCR, LCR_CONF_MODE_A)
    _dl_write(port, old_dl)
    port.write(LCR, old_lcr)
    return count


def _autoconfig_8250(port: Registers) -> str:
    scratch = port.read(SCR)
    port.write(SCR, 0xA5)
    status1 = port.read(SCR)
    port.write(SCR, 0x5A)
    status2 = port.read(SCR)
    port.write(SCR, scratch)
    return "16450" if status1 == 0xA5 and status2 == 0x5A else "8250"


def _autoconfig_16550a(port: Registers, settle: Callable[[], None] | None) -> tuple[str, int]:
    """The 16550A variants; returns the type and a measured FIFO size (0: not measured)."""
    # ST16C650V1: an EFR visible with DLAB set.
    port.write(LCR, LCR_CONF_MODE_A)
    if port.read(EFR) == 0:
        port.write(EFR, 0xA8)
        if port.read(EFR) != 0:
            kind = "16650"
        else:
            port.write(LCR, 0)
            port.write(FCR, FCR_ENABLE_FIFO | FCR7_64BYTE)
            status1 = port.read(IIR) >> 5
            port.write(FCR, 0)
            port.write(LCR, 0)
            kind = "16550A_FSL64" if status1 == 7 else "16550A"
        port.write(EFR, 0)
        return kind, 0
    # Other EFR chips need LCR = 0xBF.
    port.write(LCR, LCR_CONF_MODE_B)
    if port.read(EFR) == 0:
        return "EFR", 0
    # National Semiconductor SuperIO: bit 4 of "EXCR1" under LCR 0xE0 follows MCR.LOOP.
    port.write(LCR, 0)
    status1 = port.read(MCR)
    port.write(LCR, 0xE0)
    status2 = port.read(0x02)
    if not (status2 ^ status1) & MCR_LOOP:
        port.write(LCR, 0)
        port.write(MCR, status1 ^ MCR_LOOP)
        port.write(LCR, 0xE0)
        status2 = port.read(0x02)
        port.write(LCR, 0)
        port.write(MCR, status1)
        if (status2 ^ status1) & MCR_LOOP:
            return "NS16550A", 0
    # TI16750: IIR bit 5 follows FCR bit 5 only with DLAB set.
    port.write(LCR, 0)
    port.write(FCR, FCR_ENABLE_FIFO | FCR7_64BYTE)
    status1 = port.read(IIR) >> 5
    port.write(FCR, FCR_ENABLE_FIFO)
    port.write(LCR, LCR_CONF_MODE_A)
    port.write(FCR, FCR_ENABLE_FIFO | FCR7_64BYTE)
    status2 = port.read(IIR) >> 5
    port.write(FCR, FCR_ENABLE_FIFO)
    port.write(LCR, 0)
    if status1 == 6 and status2 == 7:
        return "16750", 0
    # XScale: IER bit 6 (UUE) sticks.
    iersave = port.read(IER)
    port.write(IER, iersave & ~IER_UUE & 0xFF)
    if not port.read(IER) & IER_UUE:
        port.write(IER, iersave | IER_UUE)
        if port.read(IER) & IER_UUE:
            return "XScale", 0
    port.write(IER, iersave)
    # 16550A or the 64-byte U6 part: count the FIFO.
    size = size_fifo(port, settle=settle)
    return ("U6_16550A" if size == 64 else "16550A"), size


def autoconfig(
    port: Registers,
    *,
    skip_loopback_test: bool = False,
    settle: Callable[[], None] | None = None,
) -> Probe:
    """Probe ``port`` as Linux's 8250 driver does; e.g. ``Probe("16550A", 16)`` for QEMU.

    The FIFO size is the one ``size_fifo`` counted when the probe ran it, else the driver's
    table value for the type. ``skip_loopback_test`` is ``UPF_SKIP_TEST`` (set for COM1–4).
    """
    # IER existence test.
    scratch = port.read(IER)
    port.write(IER, 0)
    scratch2 = port.read(IER) & 0x0F
    port.write(IER, 0x0F)
    scratch3 = port.read(IER) & 0x0F
    port.write(IER, scratch)
    if scratch2 != 0 or scratch3 != 0x0F:
        return Probe("none", 0)

    save_mcr = port.read(MCR)
    save_lcr = port.read(LCR)
    if not skip_loopback_test:
        port.write(MCR, MCR_LOOP | 0x0A)
        status1 = port.read(MSR) & 0xF0
        port.write(MCR, save_mcr)
        if status1 != 0x90:
            return Probe("none", 0)

    port.write(LCR, LCR_CONF_MODE_B)
    port.write(EFR, 0)
    port.write(LCR, 0)
    port.write(FCR, FCR_ENABLE_FIFO)
    measured = 0
    match port.read(IIR) >> 6:
        case 0:
            kind = _autoconfig_8250(port)
        case 1:
            kind = "unknown"
        case 2:
            kind = "16550"
        case _:
            kind, measured = _autoconfig_16550a(port, settle)
    port.write(LCR, save_lcr)

    # Reset the UART as the driver does after probing.
    port.write(MCR, save_mcr)
    if FIFO_SIZES[kind] > 1:
        port.write(FCR, FCR_ENABLE_FIFO)
        port.write(FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR | FCR_CLEAR_XMIT)
        port.write(FCR, 0)
    port.read(RX)
    port.write(IER, 0)
    return Probe(kind, measured or FIFO_SIZES[kind])


__all__ = ["FIFO_SIZES", "Probe", "Registers", "autoconfig", "size_fifo"]
