"""A reference interrupt-driven 8250-family driver over the register bus.

It does what the Linux 8250 driver does (reference/uart16550.md §11), step for step where the
device can tell the difference: ``probe`` is ``autoconfig`` + ``autoconfig_16550a`` +
``size_fifo``; ``startup`` is ``serial8250_do_startup`` + ``set_termios``; ``service`` is
``serial8250_handle_irq`` with ``rx_chars``, ``modem_status`` and ``tx_chars``. Receive data
arrives by RDI at the trigger level and by the character timeout (CTI) for the tail; transmit
is driven by THRI, the first one coming from the IER rising-edge resample.

Two liberties, both allowed by the bus protocol and invisible to the device: ``rx_chars``
reads runs of characters with one READ_N (the server stops at LSR.DR=0 or a pending line
error, exactly where Linux's per-character LSR check would stop), and ``tx_chars`` writes
its up-to-16 bytes with one WRITE_N (Linux writes them without looking at LSR in between).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .client import BusClient
from .errors import BusError
from .registers import (
    FCR,
    FIFO_SIZE,
    IER,
    IIR,
    LCR,
    LSR,
    MCR,
    MSR,
    RBR,
    SCR,
    THR,
    Fcr,
    Ier,
    Iir,
    Lcr,
    Lsr,
    Mcr,
)

IIR_RX_BIT = 0x04  # set for RDI (0x04), CTI (0x0C) and RLSI (0x06)
RX_CHARS_MAX = 256  # Linux's per-interrupt receive budget
SERVICE_PASSES = 16  # IIR re-reads per service() call before giving up (a stuck line)
LSR_ERRORS = Lsr.OE | Lsr.PE | Lsr.FE | Lsr.BI


@dataclass(slots=True)
class GuestCounters:
    """What the driver saw: bytes, line events and interrupts by kind."""

    tx_bytes: int = 0
    rx_bytes: int = 0
    breaks: int = 0
    overruns: int = 0
    parity_errors: int = 0
    framing_errors: int = 0
    interrupts: int = 0
    rdi: int = 0
    cti: int = 0
    thri: int = 0
    rlsi: int = 0
    msi: int = 0


class Guest8250:
    """An interrupt-driven 16550A driver on a ``BusClient``."""

    def __init__(self, client: BusClient, *, baudbase: int = 115200) -> None:
        """A driver for the UART behind ``client`` (``baudbase``: the UART's input clock / 16)."""
        self.client = client
        self.baudbase = baudbase
        self.counters = GuestCounters()
        self.tx_loadsz = FIFO_SIZE
        self.bug_thre = False
        self.bug_txen = False
        self.msr = 0
        self._ier = 0
        self._tx = bytearray()
        self._rx = bytearray()

    # -- probing (autoconfig) -------------------------------------------------------------

    def probe(self) -> tuple[str, int]:
        """Identify the UART as Linux's ``autoconfig`` does; returns (type, FIFO size).

        A 16550A answers ``("16550A", 16)``; no UART at all answers ``("unknown", 0)``.
        Leaves the FIFOs off and IER = 0, as Linux does.
        """
        c = self.client
        # 1. IER existence test.
        saved_ier = c.read(IER)
        c.write(IER, 0)
        first = c.read(IER) & 0x0F
        c.write(IER, 0x0F)
        second = c.read(IER) & 0x0F
        c.write(IER, saved_ier)
        if first != 0 or second != 0x0F:
            return ("unknown", 0)
        # 2. Loopback test: LOOP|OUT2|RTS must read back as DCD|CTS.
        saved_mcr = c.read(MCR)
        c.write(MCR, Mcr.LOOP | Mcr.OUT2 | Mcr.RTS)
        looped = c.read(MSR) & 0xF0
        c.write(MCR, saved_mcr)
        if looped != 0x90:
            return ("unknown", 0)
        # 3. EFR probe write under LCR 0xBF, then the FIFO test.
        saved_lcr = c.read(LCR)
        c.write(LCR, 0xBF)
        c.write(2, 0)  # "EFR" on 16650s; an FCR write here
        c.write(LCR, 0)
        c.write(FCR, Fcr.FE)
        scratch = c.read(IIR) >> 6
        kind: tuple[str, int]
        if scratch == 0:
            kind = self._probe_8250()
        elif scratch == 1:
            kind = ("unknown", 1)
        elif scratch == 2:
            kind = ("16550", 1)
        else:
            kind = self._probe_16550a()
        c.write(LCR, saved_lcr)
        # 6. Clear the FIFOs and leave them off, RBR read, interrupts off.
        c.write(FCR, Fcr.FE)
        c.write(FCR, Fcr.FE | Fcr.RFR | Fcr.XFR)
        c.write(FCR, 0)
        c.read(RBR)
        c.write(IER, 0)
        self._ier = 0
        self.tx_loadsz = kind[1] if kind[1] else 1
        return kind

    def _probe_8250(self) -> tuple[str, int]:
        c = self.client
        saved = c.read(SCR)
        c.write(SCR, 0xA5)
        first = c.read(SCR)
        c.write(SCR, 0x5A)
        second = c.read(SCR)
        c.write(SCR, saved)
        return ("16450", 1) if (first, second) == (0xA5, 0x5A) else ("8250", 1)

    def _probe_16550a(self) -> tuple[str, int]:
        """``autoconfig_16550a``: rule out the 650/850/NatSemi/16750/XScale look-alikes."""
        c = self.client
        c.write(LCR, Lcr.DLAB)
        if c.read(2) == 0:
            return ("16650V1", 32)
        c.write(LCR, 0xBF)
        if c.read(2) == 0:
            return ("16650", 32)
        # NatSemi SuperIO: EXCR1 bit 4 under LCR 0xE0 follows MCR.LOOP.
        c.write(LCR, 0)
        status1 = c.read(MCR)
        c.write(LCR, 0xE0)
        status2 = c.read(2)
        if not (status2 ^ status1) & Mcr.LOOP:
            c.write(LCR, 0)
            c.write(MCR, status1 ^ Mcr.LOOP)
            c.write(LCR, 0xE0)
            status2 = c.read(2)
            c.write(LCR, 0)
            c.write(MCR, status1)
            if (status2 ^ status1) & Mcr.LOOP:
                return ("NS16550A", 16)
        # TI16750: FCR bit 5 (64-byte FIFO) is honoured only under DLAB.
        c.write(LCR, 0)
        c.write(FCR, Fcr.FE | 0x20)
        status1 = c.read(IIR) >> 5
        c.write(FCR, Fcr.FE)
        c.write(LCR, Lcr.DLAB)
        c.write(FCR, Fcr.FE | 0x20)
        status2 = c.read(IIR) >> 5
        c.write(FCR, Fcr.FE)
        c.write(LCR, 0)
        if (status1, status2) == (6, 7):
            return ("16750", 64)
        # XScale: IER bit 6 (UUE) sticks.
        saved_ier = c.read(IER)
        c.write(IER, saved_ier | 0x40)
        sticky = c.read(IER) & 0x40
        c.write(IER, saved_ier)
        if sticky:
            return ("XScale", 32)
        return ("16550A", self._size_fifo())

    def _size_fifo(self) -> int:
        """Linux ``size_fifo``: loop 256 bytes back at divisor 1 and count what the RX FIFO kept."""
        c = self.client
        old_lcr = c.read(LCR)
        old_mcr = c.read(MCR)
        old_fcr = c.read(IIR)  # sic: Linux "saves FCR" by reading offset 2
        c.write(FCR, Fcr.FE | Fcr.RFR | Fcr.XFR)
        c.write(MCR, Mcr.LOOP)
        c.write(LCR, Lcr.DLAB)
        old_dl = c.read(0) | (c.read(1) << 8)
        c.write(0, 1)
        c.write(1, 0)
        c.write(LCR, 0x03)
        c.write_many(THR, bytes(range(256)))
        c.sync()
        # Linux's mdelay(20): a UART paced at the line rate (pace = "line", or real silicon)
        # is still looping characters back for 17 character times; counting before they are
        # all in would read the 17th as well.
        time.sleep(0.020)
        count = 0
        while count < 256 and c.read(LSR) & Lsr.DR:
            c.read(RBR)
            count += 1
        c.write(FCR, old_fcr & 0xFF)
        c.write(MCR, old_mcr)
        c.write(LCR, Lcr.DLAB)
        c.write(0, old_dl & 0xFF)
        c.write(1, old_dl >> 8)
        c.write(LCR, old_lcr)
        return count

    # -- start-up -----------------------------------------------------------------------------

    def startup(self, baud: int = 115200) -> None:
        """``serial8250_do_startup`` + ``set_termios`` for 8N1 at ``baud``, interrupts on."""
        c = self.client
        c.write(FCR, Fcr.FE)
        c.write(FCR, Fcr.FE | Fcr.RFR | Fcr.XFR)
        c.write(FCR, 0)
        lsr = c.read(LSR)
        c.read(RBR)
        c.read(IIR)
        c.read(MSR)
        if lsr == 0xFF:
            raise BusError("LSR safety check engaged: LSR reads 0xFF (no UART there?)")
        # THRE re-assert test (UART_BUG_THRE).
        self._wait_for_lsr(Lsr.THRE, timeout_s=1.0)
        c.write(IER, Ier.THRI)
        iir1 = c.read(IIR)
        c.write(IER, 0)
        c.write(IER, Ier.THRI)
        iir2 = c.read(IIR)
        c.write(IER, 0)
        self.bug_thre = not iir1 & Iir.NO_INT and bool(iir2 & Iir.NO_INT)
        c.write(LCR, 0x03)
        c.write(MCR, Mcr.OUT2)
        # TXEN test (UART_BUG_TXEN).
        c.write(IER, Ier.THRI)
        lsr = c.read(LSR)
        iir = c.read(IIR)
        c.write(IER, 0)
        self.bug_txen = bool(lsr & Lsr.TEMT and iir & Iir.NO_INT)
        # "Clear the interrupt registers again for luck."
        c.read(LSR)
        c.read(RBR)
        c.read(IIR)
        c.read(MSR)
        self._ier = Ier.RLSI | Ier.RDI
        self.set_termios(baud)

    def set_termios(self, baud: int) -> None:
        """8N1 at ``baud``: IER, divisor, LCR, FCR (0x01 then 0x87), MCR DTR|RTS|OUT2."""
        if baud <= 0:
            raise ValueError(f"baud must be positive, got {baud}")
        c = self.client
        divisor = min(0xFFFF, max(1, round(self.baudbase / baud)))
        c.write(IER, self._ier)
        c.write(LCR, Lcr.DLAB | 0x03)
        c.write(0, divisor & 0xFF)
        c.write(1, divisor >> 8)
        c.write(LCR, 0x03)
        trigger = 0x00 if baud < 2400 else 0x80  # trigger 1 below 2400 baud, else 8
        c.write(FCR, Fcr.FE)
        c.write(FCR, Fcr.FE | Fcr.RFR | Fcr.XFR | trigger)
        c.write(MCR, Mcr.DTR | Mcr.RTS | Mcr.OUT2)

    def shutdown(self) -> None:
        """Interrupts off, OUT2 and break off, FIFOs cleared (``serial8250_do_shutdown``)."""
        c = self.client
        self._ier = 0
        c.write(IER, 0)
        c.write(MCR, c.read(MCR) & ~Mcr.OUT2 & 0xFF)
        c.write(LCR, c.read(LCR) & ~Lcr.SBC & 0xFF)
        c.write(FCR, Fcr.FE | Fcr.RFR | Fcr.XFR)
        c.write(FCR, 0)
        c.read(RBR)
        c.sync()

    def _wait_for_lsr(self, bits: int, *, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.client.read(LSR) & bits == bits:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)

    # -- data -------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue ``data`` for transmission; THRI (by the IER resample) starts it."""
        if not data:
            return
        self._tx += data
        if not self._ier & Ier.THRI:
            self._ier |= Ier.THRI
            self.client.write(IER, self._ier)

    def read(self) -> bytes:
        """The bytes received since the last call."""
        data = bytes(self._rx)
        self._rx.clear()
        return data

    @property
    def tx_queued(self) -> int:
        """Bytes queued by ``write`` and not yet handed to the UART."""
        return len(self._tx)

    # -- interrupts -------------------------------------------------------------------------

    def service(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` s for the IRQ and handle it; True if anything was handled."""
        if not self.client.wait_irq(timeout):
            return False
        c = self.client
        handled = False
        for _ in range(SERVICE_PASSES):
            if self._ier & Ier.RLSI:
                # IIR then LSR in one round trip. Reading LSR first-hand would only differ
                # when IIR says NO_INT, and then (RLSI enabled) LSR holds no error bit for
                # that read to clear: the device sees the same accesses as Linux makes.
                iir, lsr = c.read_regs(IIR, LSR)
            else:
                iir = c.read(IIR)
                lsr = -1
            if iir & Iir.NO_INT:
                if lsr >= 0 and lsr & LSR_ERRORS:
                    # A line error arrived between the two reads (they can straddle two
                    # batches): this LSR read cleared it, so take it now.
                    handled = True
                    if lsr & (Lsr.DR | Lsr.BI):
                        self._rx_chars(lsr)
                    else:
                        self._account_errors(lsr)
                break
            handled = True
            self._count_interrupt(iir & 0x0F)
            if lsr < 0:
                lsr = c.read(LSR)
            if lsr & (Lsr.DR | Lsr.BI) and iir & IIR_RX_BIT:
                lsr = self._rx_chars(lsr)
            if iir & 0x0F == Iir.MSI:
                self.msr = c.read(MSR)
            if lsr & Lsr.THRE and self._ier & Ier.THRI:
                self._tx_chars()
        return handled

    def _count_interrupt(self, ident: int) -> None:
        counters = self.counters
        counters.interrupts += 1
        if ident == Iir.RDI:
            counters.rdi += 1
        elif ident == Iir.CTI:
            counters.cti += 1
        elif ident == Iir.THRI:
            counters.thri += 1
        elif ident == Iir.RLSI:
            counters.rlsi += 1
        elif ident == Iir.MSI:
            counters.msi += 1

    def _rx_chars(self, lsr: int) -> int:
        """Read characters while LSR shows DR or BI (at most 256); returns the last LSR."""
        c = self.client
        budget = RX_CHARS_MAX
        while budget > 0 and lsr & (Lsr.DR | Lsr.BI):
            if lsr & LSR_ERRORS:
                # The error bits belong to the character at the head of the FIFO.
                ch = c.read(RBR) if lsr & Lsr.DR else 0
                budget -= 1
                self._account_errors(lsr)
                if lsr & Lsr.BI:
                    if ch:
                        self._rx.append(ch)
                        self.counters.rx_bytes += 1
                else:
                    self._rx.append(ch)
                    self.counters.rx_bytes += 1
            else:
                data = c.read_many(RBR, budget)
                budget -= len(data)
                self._rx += data
                self.counters.rx_bytes += len(data)
            lsr = c.read(LSR)
        return lsr

    def _account_errors(self, lsr: int) -> None:
        counters = self.counters
        if lsr & Lsr.BI:
            counters.breaks += 1
        if lsr & Lsr.OE:
            counters.overruns += 1
        if lsr & Lsr.PE:
            counters.parity_errors += 1
        if lsr & Lsr.FE:
            counters.framing_errors += 1

    def _tx_chars(self) -> None:
        """Write up to ``tx_loadsz`` bytes in one burst; THRI off once the queue is empty."""
        if self._tx:
            chunk = bytes(self._tx[: self.tx_loadsz])
            del self._tx[: len(chunk)]
            self.client.write_many(THR, chunk)
            self.counters.tx_bytes += len(chunk)
        if not self._tx:
            self._ier &= ~Ier.THRI
            self.client.write(IER, self._ier)

    def drain(self, timeout: float) -> bool:
        """Service interrupts until every queued byte has left the UART (LSR.TEMT) or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if not self._tx and self.client.read(LSR) & Lsr.TEMT:
                return True
            if remaining <= 0:
                return False
            self.service(min(remaining, 0.05))


__all__ = ["Guest8250", "GuestCounters"]
