"""The 16550A register model: pure, embeddable, checkpointable.

Theory of operation
-------------------
``Uart16550`` is a state machine with no I/O of its own (h11 style). What goes in: register
reads and writes from the guest, bytes and breaks from the wire (``receive``,
``receive_break``), what the OS did with bytes offered to the wire (``tx_sent``,
``tx_blocked``), modem input levels, and clock readings (an injected callable returning
integer nanoseconds). What comes out: register values, the IRQ level, the bytes waiting for
the wire (``tx_pending``), line settings, modem outputs, and a queue of events
(``take_events``) so the I/O layer never polls registers.

Behaviour follows QEMU's ``hw/char/serial.c`` (reference/uart16550.md §1–§8): one handler per
register access, and one ``_update_irq`` that recomputes IIR from scratch after every change.

The transmitter, the part where this model differs in *structure* from QEMU: QEMU writes the
TSR byte to its back end synchronously inside the THR write. Here the wire belongs to the
caller, so a byte moves THR/TX FIFO → TSR at once (THRE/THRI rise then, as in QEMU §6) and
waits in the TSR, ``tsr_busy`` and TEMT=0, until the owner of the wire reports ``tx_sent``
(TEMT rises when nothing else is queued) or ``tx_blocked`` (``tsr_retry`` counts up, like
QEMU's refused write). An I/O layer that writes eagerly in the same step makes the guest see
exactly QEMU's LSR values. Deliberate deviation: the TSR byte is never dropped after a number
of retries unless ``tx_retry_limit`` asks for QEMU's ``MAX_XMIT_RETRY`` behaviour.

Time: every input operation reads the clock once and runs at that time, after running the
timers due by then, each at its own time (so a timer that runs late — the host's loop was
busy, or a guest-time emulator advanced its clock in one step — leaves the device exactly as
one that ran on time). A run is therefore a function of its operations and their times alone:
``uartbridge.record`` records and replays exactly that. Queries (``tx_pending``,
``can_receive``, ``irq``…) show the device as of the last operation.

Line-rate pacing (``pace="line"``; the default ``"none"`` is QEMU's instant line): the
transmitter starts one character per character time (start, data, parity and stop bits at
the configured baud, ``line_char_time_ns``). THR/TX FIFO → TSR happens when the line is free,
so THRE, THRI and the FIFO's draining follow that clock, and TEMT rises when the last
character has ended. A byte joins ``tx_pending()`` (the transmit line, at most
``TX_LINE_BYTES``) when its character starts; the wire's refusal (``tx_blocked``) holds the
line until it takes the byte. Bytes from the wire join the receive line (at most
``RX_LINE_BYTES``) and enter the RX FIFO one character time apart, whatever it holds: a guest
too slow to read sees overruns as on the chip (QEMU's ``can_receive`` flow control cannot
apply to a real wire running at its rate). Loopback hands each byte to the receiver when its
character starts, as without pacing.

Invariants (checked by ``UartState.validate``, reference §14.2): TSR busy (or, with pacing, a
character on the line) ⇔ TEMT=0; ``tsr_retry`` > 0 ⇒ a byte waits for the wire; THRE=0 ⇒ the
transmitter is busy; FIFO mode: TX FIFO non-empty ⇔ THRE=0, DR ⇔ RX FIFO non-empty.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Final, Literal

from .errors import InvalidStateError
from .registers import (
    FCR_STORED_MASK,
    FIFO_SIZE,
    IIR_FIFO_BITS,
    IIR_ID_MASK,
    LSR_INT_ANY,
    MCR_MASK,
    MSR_DELTA_MASK,
    TRIGGER_LEVELS,
)
from .registers import Fcr as _Fcr
from .registers import Ier as _Ier
from .registers import Iir as _Iir
from .registers import Lcr as _Lcr
from .registers import Lsr as _Lsr
from .registers import Mcr as _Mcr
from .registers import Msr as _Msr

_NO_INT: Final = int(_Iir.NO_INT)


class Fcr:
    """FCR bits as plain ints: the model (and every state it emits) holds only plain ints.

    IntFlag arithmetic is many times slower than int arithmetic and leaks IntFlag values into
    ``UartState`` fields, which ``validate`` refuses; so the hot paths use these copies.
    """

    FE: Final = int(_Fcr.FE)
    RFR: Final = int(_Fcr.RFR)
    XFR: Final = int(_Fcr.XFR)


class Ier:
    """IER bits as plain ints (see ``Fcr``)."""

    RDI: Final = int(_Ier.RDI)
    THRI: Final = int(_Ier.THRI)
    RLSI: Final = int(_Ier.RLSI)
    MSI: Final = int(_Ier.MSI)


class Iir:
    """IIR interrupt IDs as plain ints (see ``Fcr``)."""

    MSI: Final = int(_Iir.MSI)
    NO_INT: Final = int(_Iir.NO_INT)
    THRI: Final = int(_Iir.THRI)
    RDI: Final = int(_Iir.RDI)
    RLSI: Final = int(_Iir.RLSI)
    CTI: Final = int(_Iir.CTI)


class Lcr:
    """LCR bits as plain ints (see ``Fcr``)."""

    WLS_MASK: Final = int(_Lcr.WLS_MASK)
    STOP: Final = int(_Lcr.STOP)
    PEN: Final = int(_Lcr.PEN)
    EPS: Final = int(_Lcr.EPS)
    SPAR: Final = int(_Lcr.SPAR)
    SBC: Final = int(_Lcr.SBC)
    DLAB: Final = int(_Lcr.DLAB)


class Lsr:
    """LSR bits as plain ints (see ``Fcr``)."""

    DR: Final = int(_Lsr.DR)
    OE: Final = int(_Lsr.OE)
    PE: Final = int(_Lsr.PE)
    FE: Final = int(_Lsr.FE)
    BI: Final = int(_Lsr.BI)
    THRE: Final = int(_Lsr.THRE)
    TEMT: Final = int(_Lsr.TEMT)
    FIFOE: Final = int(_Lsr.FIFOE)


class Mcr:
    """MCR bits as plain ints (see ``Fcr``)."""

    DTR: Final = int(_Mcr.DTR)
    RTS: Final = int(_Mcr.RTS)
    OUT1: Final = int(_Mcr.OUT1)
    OUT2: Final = int(_Mcr.OUT2)
    LOOP: Final = int(_Mcr.LOOP)


class Msr:
    """MSR bits as plain ints (see ``Fcr``)."""

    DCTS: Final = int(_Msr.DCTS)
    DDSR: Final = int(_Msr.DDSR)
    TERI: Final = int(_Msr.TERI)
    DDCD: Final = int(_Msr.DDCD)
    CTS: Final = int(_Msr.CTS)
    DSR: Final = int(_Msr.DSR)
    RI: Final = int(_Msr.RI)
    DCD: Final = int(_Msr.DCD)

Clock = Callable[[], int]
Parity = Literal["N", "O", "E", "M", "S"]
#: How the device meets time on the line: "none" is QEMU's (a byte leaves and enters at once),
#: "line" shifts one character per character time at the configured baud and frame.
Pace = Literal["none", "line"]
PACES: tuple[Pace, ...] = ("none", "line")

NS_PER_S: Final = 1_000_000_000
# QEMU's serial_reset sets the character time directly to (1e9 // 9600) * 10 ns, not derived
# from LCR (which reads 0, i.e. 5N1), until the next LCR/DLL/DLM write (reference §2, V38).
RESET_CHAR_TIME_NS: Final = (NS_PER_S // 9600) * 10
# Modern QEMU's answer to a zero divisor (reference §5): about 3500 baud.
ZERO_DIVISOR_BAUD: Final = 3500
# How many character times of silence raise the character-timeout interrupt (§4.3).
TIMEOUT_CHARS: Final = 4
# QEMU's MAX_XMIT_RETRY, for users who ask for QEMU's drop-after-retries behaviour.
QEMU_MAX_XMIT_RETRY: Final = 4
# Line-rate pacing: bytes from the wire that wait, in order, to be shifted in one character
# time apart (they are "on the line"). Enough for the host's timers to be tens of ms late at
# 115200 without the line running dry; the rest waits in the host's RX backlog and kernel.
RX_LINE_BYTES: Final = 256
# ... and bytes whose character has started on the transmit line but the wire has not taken
# yet (the host collects them after the operation or timer that started them). A full line
# holds the transmitter back, as a wire that refuses does.
TX_LINE_BYTES: Final = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class LineSettings:
    """What the guest asked of the line: from the divisor and LCR."""

    baud: int
    data_bits: int
    parity: Parity
    stop_bits: float
    break_on: bool

    def summary(self) -> str:
        """The usual short form, e.g. ``115200 8N1`` (``9600 7E1.5``), plus ``break`` if on."""
        text = f"{self.baud} {self.data_bits}{self.parity}{self.stop_bits:g}"
        return text + " break" if self.break_on else text


@dataclass(frozen=True, slots=True, kw_only=True)
class ModemOutputs:
    """The MCR outputs: DTR and RTS go to the port; OUT1, OUT2 and LOOP stay in the device."""

    dtr: bool
    rts: bool
    out1: bool
    out2: bool
    loop: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class UartStatistics:
    """Counters: every byte that enters, leaves or is lost is counted somewhere."""

    bytes_received: int = 0
    bytes_transmitted: int = 0
    bytes_looped_back: int = 0
    refused_writes: int = 0
    tx_overwrites: int = 0
    tx_dropped: int = 0
    tx_flushed: int = 0
    rx_flushed: int = 0
    overruns: int = 0
    breaks: int = 0
    line_errors: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class UartEvents:
    """What changed since the last ``take_events()``.

    ``irq_changes`` lists IRQ levels in the order they were taken (at most the last two, so an
    edge hidden inside one access — low then high — still shows). The other fields are the
    new value, or None when unchanged (``break_on``: LCR's break bit changed to this level).
    ``tx_ready`` means new bytes wait for the wire; ``rx_space`` means the guest read RBR, so
    ``can_receive()`` may have grown.
    """

    irq_changes: tuple[bool, ...] = ()
    line_settings: LineSettings | None = None
    break_on: bool | None = None
    modem_outputs: ModemOutputs | None = None
    msi_enabled: bool | None = None
    tx_ready: bool = False
    rx_space: bool = False

    @property
    def irq(self) -> bool | None:
        """The IRQ level after the last change, or None if it did not change."""
        return self.irq_changes[-1] if self.irq_changes else None


NO_EVENTS = UartEvents()


def _fail(field_name: str, rule: str) -> InvalidStateError:
    return InvalidStateError(f"inconsistent state: {field_name}: {rule}")


@dataclass(frozen=True, slots=True, kw_only=True)
class UartState:
    """Everything the device is, as a value: save it, and ``Uart16550.from_state`` goes on.

    Registers as the chip holds them; ``msr`` bits 4–7 are the modem input levels. Hidden
    state as in QEMU: ``thr``, ``tsr`` (meaningful while ``tsr_busy``), ``tsr_retry``, the THRE
    interrupt latch and the character-timeout flag. The receive-timeout deadline is kept as
    the time *remaining* (ns) so a state can be resumed on another clock. IIR's interrupt ID,
    the IRQ level, the trigger level and the character time are derived, never stored;
    ``reset_timing`` says the character time is still the power-on value (reference §2).

    Line-rate pacing (``pace == "line"``) adds the shift registers' timing, as time remaining:
    ``tx_shift_remaining_ns``, until the character on the transmit line has been shifted out
    (None: the line is idle; 0: it is due now, or held by a wire that refuses); ``tx_line``,
    bytes whose character has started and that the wire has not taken yet, oldest first (they
    replace the TSR byte: ``tsr_busy`` stays False, ``tsr`` is the last byte that started, and
    ``tsr_retry`` counts refusals of ``tx_line``'s first byte); ``rx_line``, bytes from the
    wire that enter the RX FIFO one character time apart, oldest first;
    ``rx_slot_remaining_ns``, until the next of them can complete (None: at once). Without
    pacing they are None, empty, empty and None.
    """

    baudbase: int = 115200
    tx_retry_limit: int | None = None
    divisor: int = 0x0C
    rbr: int = 0
    ier: int = 0
    iir: int = Iir.NO_INT
    lcr: int = 0
    mcr: int = Mcr.OUT2
    lsr: int = Lsr.THRE | Lsr.TEMT
    msr: int = Msr.DCD | Msr.DSR | Msr.CTS
    scr: int = 0
    fcr: int = 0
    thr: int = 0
    tsr: int = 0
    tsr_busy: bool = False
    tsr_retry: int = 0
    thr_ipending: bool = False
    timeout_ipending: bool = False
    rx_fifo: bytes = b""
    tx_fifo: bytes = b""
    timeout_remaining_ns: int | None = None
    reset_timing: bool = True
    statistics: UartStatistics = field(default_factory=UartStatistics)
    pace: Pace = "none"
    tx_shift_remaining_ns: int | None = None
    tx_line: bytes = b""
    rx_line: bytes = b""
    rx_slot_remaining_ns: int | None = None

    @property
    def modem_inputs(self) -> dict[str, bool]:
        """The modem input levels the state holds (MSR bits 4–7): cts, dsr, ri, dcd."""
        return {
            "cts": bool(self.msr & Msr.CTS),
            "dsr": bool(self.msr & Msr.DSR),
            "ri": bool(self.msr & Msr.RI),
            "dcd": bool(self.msr & Msr.DCD),
        }

    @property
    def fifo_enabled(self) -> bool:
        """FCR.FE: the FIFOs are on."""
        return bool(self.fcr & Fcr.FE)

    def tx_waiting(self) -> bytes:
        """The bytes waiting for the wire, oldest first: TSR (or the transmit line, with
        pacing), then the TX FIFO or THR."""
        head = bytes((self.tsr,)) if self.tsr_busy else self.tx_line
        if self.fifo_enabled:
            return head + self.tx_fifo
        if not self.lsr & Lsr.THRE:
            return head + bytes((self.thr,))
        return head

    def validate(self) -> None:
        """Raise ``InvalidStateError`` naming the field and the rule for an impossible state."""
        self._validate_ranges()
        self._validate_transmitter()
        self._validate_receiver()

    def _validate_ranges(self) -> None:
        for name in ("rbr", "iir", "lcr", "lsr", "msr", "scr", "thr", "tsr"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= 0xFF:
                raise _fail(name, f"must be an integer 0..255, got {value!r}")
        for name in ("tsr_busy", "thr_ipending", "timeout_ipending", "reset_timing"):
            if type(getattr(self, name)) is not bool:
                raise _fail(name, "must be a boolean")
        if type(self.baudbase) is not int or self.baudbase <= 0:
            raise _fail("baudbase", f"must be a positive integer, got {self.baudbase!r}")
        if type(self.divisor) is not int or not 0 <= self.divisor <= 0xFFFF:
            raise _fail("divisor", f"must be an integer 0..65535, got {self.divisor!r}")
        if type(self.ier) is not int or not 0 <= self.ier <= 0x0F:
            raise _fail("ier", f"only bits 0-3 exist (ier <= 0x0F), got {self.ier!r}")
        if type(self.mcr) is not int or not 0 <= self.mcr <= MCR_MASK:
            raise _fail("mcr", f"only bits 0-4 exist (mcr <= 0x1F), got {self.mcr!r}")
        if type(self.fcr) is not int or not 0 <= self.fcr <= 0xFF or self.fcr & ~FCR_STORED_MASK:
            raise _fail("fcr", f"only bits 0xC9 are stored, got {self.fcr!r}")
        if self.iir & 0x30 or self.iir & IIR_FIFO_BITS not in (0, IIR_FIFO_BITS):
            raise _fail("iir", f"bits 4-5 are 0 and bits 6-7 both or neither, got {self.iir:#04x}")
        if self.iir & IIR_FIFO_BITS and not self.fifo_enabled:
            raise _fail("iir", "FIFO bits set while FCR.FE=0")
        if self.lsr & Lsr.FIFOE:
            raise _fail("lsr", "bit 7 (FIFOE) is never set by this device")
        for name in ("rx_fifo", "tx_fifo"):
            value = getattr(self, name)
            if type(value) is not bytes or len(value) > FIFO_SIZE:
                raise _fail(name, f"must be at most {FIFO_SIZE} bytes")
        if type(self.tsr_retry) is not int or self.tsr_retry < 0:
            raise _fail("tsr_retry", f"must be a non-negative integer, got {self.tsr_retry!r}")
        limit = self.tx_retry_limit
        if limit is not None and (type(limit) is not int or limit < 0):
            raise _fail("tx_retry_limit", f"must be None or a non-negative integer, got {limit!r}")
        if limit is not None and self.tsr_retry > limit:
            raise _fail("tsr_retry", f"tsr_retry={self.tsr_retry} exceeds tx_retry_limit={limit}")
        for name in ("timeout_remaining_ns", "tx_shift_remaining_ns", "rx_slot_remaining_ns"):
            remaining = getattr(self, name)
            if remaining is not None and (type(remaining) is not int or remaining < 0):
                raise _fail(name, f"must be None or >= 0, got {remaining!r}")
        if self.pace not in PACES:
            raise _fail("pace", f'must be "none" or "line", got {self.pace!r}')
        if type(self.rx_line) is not bytes or len(self.rx_line) > RX_LINE_BYTES:
            raise _fail("rx_line", f"must be at most {RX_LINE_BYTES} bytes")
        if type(self.tx_line) is not bytes or len(self.tx_line) > TX_LINE_BYTES:
            raise _fail("tx_line", f"must be at most {TX_LINE_BYTES} bytes")
        if self.pace == "none":
            for name, idle in (
                ("tx_shift_remaining_ns", None), ("tx_line", b""), ("rx_line", b""),
                ("rx_slot_remaining_ns", None),
            ):
                if getattr(self, name) != idle:
                    raise _fail(name, "line-rate timing without pace = line")
        elif self.rx_line and self.rx_slot_remaining_ns is None:
            raise _fail("rx_slot_remaining_ns", "None while bytes wait on the line (rx_line)")
        for counter in fields(self.statistics):
            value = getattr(self.statistics, counter.name)
            if type(value) is not int or value < 0:
                raise _fail(f"statistics.{counter.name}", "must be a non-negative integer")

    def _validate_transmitter(self) -> None:
        temt = bool(self.lsr & Lsr.TEMT)
        thre = bool(self.lsr & Lsr.THRE)
        # With pacing the transmitter is busy while a character is on the line (or a wire
        # that refuses holds it there): that is what TEMT=0 then shows.
        shifting = self.tx_shift_remaining_ns is not None
        busy = self.tsr_busy or shifting
        if self.tsr_busy and self.pace == "line":
            raise _fail("tsr_busy", "set with pace = line (tx_line holds the bytes for the wire)")
        if busy and temt:
            what = "tsr not empty" if self.tsr_busy else "a character is on the line"
            raise _fail("lsr", f"{what} but TEMT=1 (tsr_retry={self.tsr_retry})")
        if not busy and not temt:
            raise _fail("lsr", "tsr empty but TEMT=0")
        if self.tsr_retry > 0 and not (self.tsr_busy or self.tx_line):
            raise _fail("tsr_retry", f"tsr empty but tsr_retry={self.tsr_retry}")
        if not thre and not busy:
            raise _fail("lsr", "THRE=0 (data waiting) while the tsr is empty")
        if self.thr_ipending and not thre:
            raise _fail("thr_ipending", "THRE interrupt pending while THRE=0")
        if self.fifo_enabled:
            if self.tx_fifo and thre:
                raise _fail("tx_fifo", f"{len(self.tx_fifo)} bytes queued but THRE=1")
            if not self.tx_fifo and not thre:
                raise _fail("tx_fifo", "empty but THRE=0 (FIFO mode)")
        elif self.tx_fifo:
            raise _fail("tx_fifo", "holds data while FIFOs are disabled")

    def _validate_receiver(self) -> None:
        dr = bool(self.lsr & Lsr.DR)
        if self.fifo_enabled:
            if dr and not self.rx_fifo:
                raise _fail("rx_fifo", "empty but LSR.DR=1 (FIFO mode)")
            if self.rx_fifo and not dr:
                raise _fail("rx_fifo", f"holds {len(self.rx_fifo)} bytes but LSR.DR=0")
        elif self.rx_fifo.strip(b"\x00"):
            # Without FIFOs only breaks push into the hidden RX FIFO, always NUL (§7.3).
            raise _fail("rx_fifo", "holds non-NUL data while FIFOs are disabled")
        if self.timeout_ipending and not (self.fifo_enabled and self.rx_fifo):
            raise _fail("timeout_ipending", "set without data in an enabled RX FIFO")
        if self.timeout_remaining_ns is not None and not self.fifo_enabled:
            raise _fail("timeout_remaining_ns", "receive timeout armed while FIFOs are disabled")


def frame_bits(lcr: int) -> int:
    """Bits per character on the wire: start + data + parity + stop (QEMU: 2 stop for 5-bit)."""
    bits = 1 + (lcr & Lcr.WLS_MASK) + 5
    if lcr & Lcr.PEN:
        bits += 1
    return bits + (2 if lcr & Lcr.STOP else 1)


def char_time_ns(baudbase: int, divisor: int, lcr: int) -> int:
    """Time of one character in ns, exact integer arithmetic (modern QEMU's figures, §5/V38)."""
    if divisor == 0:
        return NS_PER_S * frame_bits(lcr) // ZERO_DIVISOR_BAUD
    return NS_PER_S * divisor * frame_bits(lcr) // baudbase


def line_char_time_ns(baudbase: int, divisor: int, lcr: int) -> int:
    """One character on the wire in ns, as line-rate pacing times it: start + data + parity +
    stop bits, with the chip's 1.5 stop bits for 5-bit words (QEMU's ``char_time_ns`` counts
    2 there, and keeps its power-on value until the line is set; pacing uses the real frame)."""
    data_bits = (lcr & Lcr.WLS_MASK) + 5
    half_bits = 2 * (1 + data_bits + (1 if lcr & Lcr.PEN else 0))
    if lcr & Lcr.STOP:
        half_bits += 3 if data_bits == 5 else 4
    else:
        half_bits += 2
    if divisor == 0:
        return NS_PER_S * half_bits // (2 * ZERO_DIVISOR_BAUD)
    return NS_PER_S * half_bits * divisor // (2 * baudbase)


def line_settings_of(baudbase: int, divisor: int, lcr: int) -> LineSettings:
    """The line settings a divisor and LCR describe."""
    parity: Parity = "N"
    if lcr & Lcr.PEN:
        if lcr & Lcr.SPAR:
            parity = "S" if lcr & Lcr.EPS else "M"
        else:
            parity = "E" if lcr & Lcr.EPS else "O"
    data_bits = (lcr & Lcr.WLS_MASK) + 5
    stop_bits = 1.0 if not lcr & Lcr.STOP else (1.5 if data_bits == 5 else 2.0)
    baud = ZERO_DIVISOR_BAUD if divisor == 0 else max(1, round(baudbase / divisor))
    return LineSettings(
        baud=baud,
        data_bits=data_bits,
        parity=parity,
        stop_bits=stop_bits,
        break_on=bool(lcr & Lcr.SBC),
    )


def modem_outputs_of(mcr: int) -> ModemOutputs:
    """The modem outputs an MCR value describes."""
    return ModemOutputs(
        dtr=bool(mcr & Mcr.DTR),
        rts=bool(mcr & Mcr.RTS),
        out1=bool(mcr & Mcr.OUT1),
        out2=bool(mcr & Mcr.OUT2),
        loop=bool(mcr & Mcr.LOOP),
    )


class Uart16550:
    """A 16550A UART as QEMU models it, with the wire left to its owner.

    Offsets are 0–7 with DLAB as on the chip. Time comes only from ``clock`` (integer ns).
    """

    def __init__(
        self,
        *,
        baudbase: int = 115200,
        clock: Clock = time.monotonic_ns,
        tx_retry_limit: int | None = None,
        pace: Pace = "none",
    ) -> None:
        """Create a device in its power-on state (reference §2).

        ``pace="line"`` times the shift registers at the line rate (see the class docstring);
        the default ``"none"`` is QEMU's: bytes leave and enter at once.
        """
        if type(baudbase) is not int or baudbase <= 0:
            raise ValueError(f"baudbase must be a positive integer, got {baudbase!r}")
        if tx_retry_limit is not None and (type(tx_retry_limit) is not int or tx_retry_limit < 0):
            raise ValueError(f"tx_retry_limit must be None or >= 0, got {tx_retry_limit!r}")
        if pace not in PACES:
            raise ValueError(f'pace must be "none" or "line", got {pace!r}')
        self._clock = clock
        self._now_ns = 0  # the time of the input operation running (or of the last one)
        self._irq_edges = 0
        self._due_ns: int | None = None  # the earliest armed timer (what _advance runs)
        self._load(
            UartState(baudbase=baudbase, tx_retry_limit=tx_retry_limit, pace=pace), now_ns=None
        )
        self._read_handlers: tuple[Callable[[], int], ...] = (
            self._read_rbr,
            self._read_ier,
            self._read_iir,
            lambda: self._lcr,
            lambda: self._mcr,
            self._read_lsr,
            self._read_msr,
            lambda: self._scr,
        )
        self._write_handlers: tuple[Callable[[int], None], ...] = (
            self._write_thr,
            self._write_ier,
            self._write_fcr,
            self._write_lcr,
            self._write_mcr,
            _ignore_write,
            _ignore_write,
            self._write_scr,
        )

    # -- construction and state ---------------------------------------------------------

    @classmethod
    def from_state(cls, state: UartState, *, clock: Clock = time.monotonic_ns) -> Uart16550:
        """A device that continues exactly where ``state`` was (validated first).

        Derived values (IIR's interrupt ID, IRQ level, trigger level, character time) are
        recomputed. Events are queued for the line settings, the modem outputs and any
        pending transmission, so the I/O layer re-applies them to its (maybe new) port.
        """
        state.validate()
        uart = cls(
            baudbase=state.baudbase,
            clock=clock,
            tx_retry_limit=state.tx_retry_limit,
            pace=state.pace,
        )
        uart._now_ns = now_ns = clock()
        uart._load(state, now_ns=now_ns)
        uart._line_changed = True
        uart._break_changed = bool(state.lcr & Lcr.SBC)
        uart._modem_outputs_changed = True
        uart._tx_ready = uart._tx_count() > 0
        return uart

    def _load(self, state: UartState, *, now_ns: int | None) -> None:
        self._baudbase = state.baudbase
        self._tx_retry_limit = state.tx_retry_limit
        self._divisor = state.divisor
        self._rbr = state.rbr
        self._ier = state.ier
        self._iir = state.iir & IIR_FIFO_BITS
        self._lcr = state.lcr
        self._mcr = state.mcr
        self._lsr = state.lsr
        self._msr = state.msr
        self._scr = state.scr
        self._fcr = state.fcr
        self._trigger = TRIGGER_LEVELS[state.fcr >> 6]
        self._thr = state.thr
        self._tsr = state.tsr
        self._tsr_busy = state.tsr_busy
        self._tsr_retry = state.tsr_retry
        self._thr_ipending = state.thr_ipending
        self._timeout_ipending = state.timeout_ipending
        self._rx = bytearray(state.rx_fifo)
        self._tx = bytearray(state.tx_fifo)
        base_ns = 0 if now_ns is None else now_ns
        remaining = state.timeout_remaining_ns
        self._timeout_ns = None if remaining is None else base_ns + remaining
        self._pace: Pace = state.pace
        self._paced = state.pace == "line"
        remaining = state.tx_shift_remaining_ns
        self._tx_end_ns = None if remaining is None else base_ns + remaining
        self._tx_line = bytearray(state.tx_line)
        self._rx_line = bytearray(state.rx_line)
        remaining = state.rx_slot_remaining_ns
        self._rx_slot_ns = None if remaining is None else base_ns + remaining
        self._update_due()
        self._reset_timing = state.reset_timing
        self._char_time_ns = (
            RESET_CHAR_TIME_NS
            if state.reset_timing
            else char_time_ns(state.baudbase, state.divisor, state.lcr)
        )
        self._line_char_ns = line_char_time_ns(state.baudbase, state.divisor, state.lcr)
        self._stats = {f.name: getattr(state.statistics, f.name) for f in fields(UartStatistics)}
        self._irq = False
        self._irq_changes: list[bool] = []
        self._line_changed = False
        self._break_changed = False
        self._modem_outputs_changed = False
        self._msi_changed = False
        self._tx_ready = False
        self._rx_space = False
        self._update_irq()
        self._irq_changes.clear()

    def state(self, *, run_timers: bool = False) -> UartState:
        """A snapshot of the whole device; ``Uart16550.from_state`` resumes it exactly.

        Timers are stored as time remaining from one reading of the clock. A timer that is
        already due (nobody has called ``poll`` since) is stored as 0; with ``run_timers``
        the due timers run first, at their own times, so none is (this changes the device:
        hand its events on as after any other input).
        """
        now = self._clock()
        if run_timers:
            self._now_ns = now
            due = self._due_ns
            if due is not None and now >= due:
                self._advance(now)
        return self._state_at(now)

    def _state_at(self, now: int) -> UartState:
        remaining = None
        if self._timeout_ns is not None:
            remaining = max(0, self._timeout_ns - now)
        tx_shift = None if self._tx_end_ns is None else max(0, self._tx_end_ns - now)
        slot = self._rx_slot_ns
        rx_slot = None
        if slot is not None and (slot > now or self._rx_line):
            rx_slot = max(0, slot - now)
        return UartState(
            baudbase=self._baudbase,
            tx_retry_limit=self._tx_retry_limit,
            divisor=self._divisor,
            rbr=self._rbr,
            ier=self._ier,
            iir=self._iir,
            lcr=self._lcr,
            mcr=self._mcr,
            lsr=self._lsr,
            msr=self._msr,
            scr=self._scr,
            fcr=self._fcr,
            thr=self._thr,
            tsr=self._tsr,
            tsr_busy=self._tsr_busy,
            tsr_retry=self._tsr_retry,
            thr_ipending=self._thr_ipending,
            timeout_ipending=self._timeout_ipending,
            rx_fifo=bytes(self._rx),
            tx_fifo=bytes(self._tx),
            timeout_remaining_ns=remaining,
            reset_timing=self._reset_timing,
            statistics=self.statistics(),
            pace=self._pace,
            tx_shift_remaining_ns=tx_shift,
            tx_line=bytes(self._tx_line),
            rx_line=bytes(self._rx_line),
            rx_slot_remaining_ns=rx_slot,
        )

    def reset(self) -> None:
        """System reset as QEMU does it (§2): FCR and THR survive, pending TX/RX is flushed."""
        self._begin()
        stats = self._stats
        stats["tx_flushed"] += self._tx_waiting_count()
        stats["rx_flushed"] += len(self._rx) + len(self._rx_line) + (
            1 if self._lsr & Lsr.DR and not self._fcr & Fcr.FE else 0
        )
        old_mcr = self._mcr
        self._msi_changed = bool(self._ier & Ier.MSI)
        had_break = bool(self._lcr & Lcr.SBC)
        self._rbr = self._ier = self._lcr = self._scr = 0
        self._iir = Iir.NO_INT
        self._lsr = Lsr.THRE | Lsr.TEMT
        self._msr &= ~MSR_DELTA_MASK & 0xFF
        self._divisor = 0x0C
        self._mcr = Mcr.OUT2
        self._tsr_busy = False
        self._tsr_retry = 0
        self._reset_timing = True
        self._char_time_ns = RESET_CHAR_TIME_NS
        self._line_char_ns = line_char_time_ns(self._baudbase, self._divisor, self._lcr)
        self._timeout_ipending = False
        self._timeout_ns = None
        self._tx_end_ns = None
        self._tx_line.clear()
        self._rx_line.clear()
        self._rx_slot_ns = None
        self._due_ns = None
        self._rx.clear()
        self._tx.clear()
        self._thr_ipending = False
        self._set_irq(False)
        if had_break:
            self._line_changed = self._break_changed = True
        if old_mcr != self._mcr:
            self._modem_outputs_changed = True

    # -- properties ---------------------------------------------------------------------

    @property
    def irq(self) -> bool:
        """The level of the interrupt output (high while IIR shows an interrupt)."""
        return self._irq

    @property
    def line_settings(self) -> LineSettings:
        """Baud, data bits, parity, stop bits and break, as the divisor and LCR say."""
        return line_settings_of(self._baudbase, self._divisor, self._lcr)

    @property
    def line_configured(self) -> bool:
        """The guest wrote LCR or the divisor since reset (QEMU pushes no settings before)."""
        return not self._reset_timing

    @property
    def modem_outputs(self) -> ModemOutputs:
        """DTR, RTS, OUT1, OUT2 and LOOP, as MCR says."""
        return modem_outputs_of(self._mcr)

    @property
    def char_time_ns(self) -> int:
        """The time of one character on the line in ns (QEMU's ``char_transmit_time``)."""
        return self._char_time_ns

    @property
    def line_char_time_ns(self) -> int:
        """One character on the wire in ns as line-rate pacing times it (the real frame)."""
        return self._line_char_ns

    @property
    def pace(self) -> Pace:
        """``"line"``: the shift registers move one character per character time."""
        return self._pace

    @property
    def irq_edges(self) -> int:
        """How many times the IRQ level has changed since the device was created (not
        checkpointed; a recorder compares it before and after an operation)."""
        return self._irq_edges

    @property
    def now_ns(self) -> int:
        """The clock reading of the last input operation (what it ran at)."""
        return self._now_ns

    @property
    def msi_enabled(self) -> bool:
        """IER.MSI: the guest wants modem-status interrupts (so modem lines are worth polling)."""
        return bool(self._ier & Ier.MSI)

    def statistics(self) -> UartStatistics:
        """The device's counters (bytes in and out, refusals, overwrites, overruns, breaks)."""
        return UartStatistics(**self._stats)

    # -- register access ----------------------------------------------------------------

    # Every input operation (a register access, input from the wire, what the wire did with
    # a byte, a modem change, poll, reset) reads the clock exactly once, runs the timers due
    # by then, and runs at that time: so a run is a function of its operations and their
    # times alone (what makes ``uartbridge replay`` exact).

    def read(self, offset: int) -> int:
        """Read the register at ``offset`` (0–7), with the chip's side effects."""
        if not 0 <= offset <= 7:
            raise ValueError(f"register offset must be 0..7, got {offset!r}")
        now = self._now_ns = self._clock()
        due = self._due_ns
        if due is not None and now >= due:
            self._advance(now)
        return self._read_handlers[offset]()

    def write(self, offset: int, value: int) -> None:
        """Write ``value`` (0–255) to the register at ``offset`` (0–7)."""
        if not 0 <= offset <= 7:
            raise ValueError(f"register offset must be 0..7, got {offset!r}")
        if not 0 <= value <= 0xFF:
            raise ValueError(f"register value must be 0..255, got {value!r}")
        now = self._now_ns = self._clock()
        due = self._due_ns
        if due is not None and now >= due:
            self._advance(now)
        self._write_handlers[offset](value)

    def _begin(self) -> int:
        """Start an input operation: read the clock once and run what is due by then."""
        now = self._now_ns = self._clock()
        due = self._due_ns
        if due is not None and now >= due:
            self._advance(now)
        return now

    def _read_rbr(self) -> int:
        if self._lcr & Lcr.DLAB:
            return self._divisor & 0xFF
        if self._fcr & Fcr.FE:
            rx = self._rx
            value = rx.pop(0) if rx else 0
            if rx:
                self._set_timeout(self._now_ns + TIMEOUT_CHARS * self._char_time_ns)
            else:
                self._lsr &= ~(Lsr.DR | Lsr.BI)
            self._timeout_ipending = False
        else:
            value = self._rbr
            self._lsr &= ~(Lsr.DR | Lsr.BI)
        self._update_irq()
        if not self._mcr & Mcr.LOOP:
            self._rx_space = True
        return value

    def _read_ier(self) -> int:
        if self._lcr & Lcr.DLAB:
            return self._divisor >> 8
        return self._ier

    def _read_iir(self) -> int:
        value = self._iir
        if value & IIR_ID_MASK == Iir.THRI:
            self._thr_ipending = False
            self._update_irq()
        return value

    def _read_lsr(self) -> int:
        value = self._lsr
        # QEMU clears BI and OE on read; PE/FE (which QEMU never sets) clear too, as on the chip.
        if value & LSR_INT_ANY:
            self._lsr &= ~LSR_INT_ANY
            self._update_irq()
        return value

    def _read_msr(self) -> int:
        mcr = self._mcr
        if mcr & Mcr.LOOP:
            # OUT2→DCD, OUT1→RI, DTR→DSR, RTS→CTS; no delta bits (§3.10).
            return ((mcr & 0x0C) << 4) | ((mcr & Mcr.RTS) << 3) | ((mcr & Mcr.DTR) << 5)
        value = self._msr
        if value & MSR_DELTA_MASK:
            self._msr &= ~MSR_DELTA_MASK & 0xFF
            self._update_irq()
        return value

    def _write_thr(self, value: int) -> None:
        if self._lcr & Lcr.DLAB:
            self._divisor = (self._divisor & 0xFF00) | value
            self._update_parameters()
            return
        self._thr = value
        if self._fcr & Fcr.FE:
            if len(self._tx) >= FIFO_SIZE:
                # "xmit overruns overwrite data": the oldest queued byte is lost (§3.2).
                del self._tx[0]
                self._stats["tx_overwrites"] += 1
            self._tx.append(value)
        elif not self._lsr & Lsr.THRE:
            self._stats["tx_overwrites"] += 1
        self._thr_ipending = False
        self._lsr &= ~(Lsr.THRE | Lsr.TEMT)
        self._update_irq()
        if not self._tsr_busy:
            self._xmit()
        self._tx_ready = True

    def _write_ier(self, value: int) -> None:
        if self._lcr & Lcr.DLAB:
            self._divisor = (self._divisor & 0x00FF) | (value << 8)
            self._update_parameters()
            return
        changed = (self._ier ^ value) & 0x0F
        self._ier = value & 0x0F
        if changed & Ier.MSI:
            self._msi_changed = True
        if changed & Ier.THRI:
            # Rising-edge resample of THRE (§3.4): "not in the datasheet, but Windows relies
            # on it", and Linux's THRE re-assert test too (§11.2).
            self._thr_ipending = bool(self._ier & Ier.THRI and self._lsr & Lsr.THRE)
        if changed:
            self._update_irq()

    def _write_fcr(self, value: int) -> None:
        if (value ^ self._fcr) & Fcr.FE:
            value |= Fcr.RFR | Fcr.XFR
        if value & Fcr.RFR:
            self._stats["rx_flushed"] += len(self._rx) if self._fcr & Fcr.FE else (
                1 if self._lsr & Lsr.DR else 0
            )
            self._lsr &= ~(Lsr.DR | Lsr.BI)
            self._set_timeout(None)
            self._timeout_ipending = False
            self._rx.clear()
        if value & Fcr.XFR:
            # The TSR byte survives (TEMT untouched); queued bytes are the guest's to discard.
            flushed = len(self._tx) if self._fcr & Fcr.FE else (0 if self._lsr & Lsr.THRE else 1)
            self._stats["tx_flushed"] += flushed
            self._lsr |= Lsr.THRE
            self._thr_ipending = True
            self._tx.clear()
        self._fcr = value & FCR_STORED_MASK
        if self._fcr & Fcr.FE:
            self._iir |= IIR_FIFO_BITS
            self._trigger = TRIGGER_LEVELS[self._fcr >> 6]
        else:
            self._iir &= ~IIR_FIFO_BITS
        if not self._mcr & Mcr.LOOP:
            # A reset or a new trigger level changes what can_receive() allows: the wire may
            # move in what waits for room (as after an RBR read).
            self._rx_space = True
        self._update_irq()

    def _write_lcr(self, value: int) -> None:
        old = self._lcr
        self._lcr = value
        self._update_parameters()
        if (old ^ value) & Lcr.SBC:
            self._break_changed = True

    def _write_mcr(self, value: int) -> None:
        old = self._mcr
        self._mcr = value & MCR_MASK
        # QEMU leaves the host lines alone in loopback (§3.8).
        if not value & Mcr.LOOP and old != self._mcr:
            self._modem_outputs_changed = True
        if old & Mcr.LOOP and not value & Mcr.LOOP:
            self._rx_space = True  # the wire is connected again

    def _write_scr(self, value: int) -> None:
        self._scr = value

    def _update_parameters(self) -> None:
        # A character already on the line keeps the end it had; the next one takes the new
        # rate (a chip would re-time the bits left; the difference is under one character).
        self._reset_timing = False
        self._char_time_ns = char_time_ns(self._baudbase, self._divisor, self._lcr)
        self._line_char_ns = line_char_time_ns(self._baudbase, self._divisor, self._lcr)
        self._line_changed = True

    # -- interrupts -----------------------------------------------------------------------

    def _update_irq(self) -> None:
        """Recompute IIR from scratch (QEMU ``serial_update_irq``, §4.1)."""
        ier = self._ier
        lsr = self._lsr
        if ier & Ier.RLSI and lsr & LSR_INT_ANY:
            ident = Iir.RLSI
        elif ier & Ier.RDI and self._timeout_ipending:
            # QEMU masks CTI with IER.RDI: "observed on existing hardware".
            ident = Iir.CTI
        elif (
            ier & Ier.RDI
            and lsr & Lsr.DR
            and (not self._fcr & Fcr.FE or len(self._rx) >= self._trigger)
        ):
            ident = Iir.RDI
        elif ier & Ier.THRI and self._thr_ipending:
            ident = Iir.THRI
        elif ier & Ier.MSI and self._msr & MSR_DELTA_MASK:
            ident = Iir.MSI
        else:
            ident = _NO_INT
        self._iir = ident | (self._iir & 0xF0)
        level = ident != _NO_INT
        if level != self._irq:  # _set_irq, inlined: this runs after every access
            self._irq = level
            self._irq_edges += 1
            changes = self._irq_changes
            changes.append(level)
            if len(changes) > 2:
                del changes[0]

    def _set_irq(self, level: bool) -> None:
        if level != self._irq:
            self._irq = level
            self._irq_edges += 1
            changes = self._irq_changes
            changes.append(level)
            if len(changes) > 2:
                del changes[0]

    # -- time -----------------------------------------------------------------------------

    def next_deadline_ns(self) -> int | None:
        """When (on ``clock``) the next timer falls due, or None if none is armed.

        The receive timeout, and with line-rate pacing the end of the character on the
        transmit line and the next character entering from the line. Call ``poll`` then
        (or any other input operation: each runs what is due first).
        """
        return self._due_ns

    def poll(self) -> None:
        """Run the timers that are due at ``clock()``, each at its own time (§4.3)."""
        self._begin()

    def _set_timeout(self, deadline_ns: int | None) -> None:
        self._timeout_ns = deadline_ns
        if self._paced:
            self._update_due()
        else:
            self._due_ns = deadline_ns

    def _update_due(self) -> None:
        due = self._timeout_ns
        if self._paced:
            tx_end = self._tx_end_ns
            # A wire that refuses (or a full line) holds the line: it frees when the wire
            # takes what waits (tx_sent), not at the end of the character.
            if tx_end is not None and not self._tx_held() and (due is None or tx_end < due):
                due = tx_end
            slot = self._rx_slot_ns
            if self._rx_line and slot is not None and (due is None or slot < due):
                due = slot
        self._due_ns = due

    def _advance(self, now: int) -> None:
        """Run every timer due at or before ``now`` in time order, each at its own time (a
        timer that runs late gives the same result as one that ran on time). Ties: the
        receive timeout, then the transmitter, then the receiver."""
        while True:
            at = self._timeout_ns
            kind = 0
            if self._paced:
                tx_end = self._tx_end_ns
                if tx_end is not None and not self._tx_held() and (at is None or tx_end < at):
                    at, kind = tx_end, 1
                slot = self._rx_slot_ns
                if self._rx_line and slot is not None and (at is None or slot < at):
                    at, kind = slot, 2
            if at is None or at > now:
                break
            self._now_ns = at
            if kind == 0:
                self._timeout_ns = None
                if self._rx:
                    self._timeout_ipending = True
                    self._update_irq()
            elif kind == 1:
                self._tx_end_ns = None
                self._tx_line_free()
            else:
                self._rx_slot_ns = at + self._line_char_ns
                self._receive(bytes((self._rx_line.pop(0),)))
                if not self._mcr & Mcr.LOOP:
                    self._rx_space = True  # the line has room: the wire may move more in
        self._now_ns = now
        self._update_due()

    # -- receive --------------------------------------------------------------------------

    def can_receive(self) -> int:
        """How many bytes ``receive`` takes now: capped at the trigger level (§7.1).

        With line-rate pacing: the room on the line (``RX_LINE_BYTES`` bytes wait there to
        enter one character time apart, whatever the FIFO holds: a guest too slow to read
        sees overruns, as on the chip).
        """
        if self._paced:
            return RX_LINE_BYTES - len(self._rx_line)
        if self._fcr & Fcr.FE:
            count = len(self._rx)
            if count >= FIFO_SIZE:
                return 0
            return self._trigger - count if count <= self._trigger else 1
        return 0 if self._lsr & Lsr.DR else 1

    @property
    def dlab(self) -> bool:
        """LCR.DLAB: offsets 0 and 1 address the divisor latch."""
        return bool(self._lcr & Lcr.DLAB)

    def tx_full(self) -> bool:
        """A THR write now would overwrite an unsent byte (TX FIFO full, or THR holding one)."""
        if self._fcr & Fcr.FE:
            return len(self._tx) >= FIFO_SIZE
        return not self._lsr & Lsr.THRE

    def write_can_post(self, offset: int) -> bool:
        """A write to ``offset`` now may be *posted*: applied without the wire being given
        its turn first. True for a THR write (DLAB 0) that overwrites no unsent byte; any
        other register write may flush, loop back or re-time what waits (FCR, MCR loopback,
        LCR, the divisor), so the wire takes what waits before it.

        The rule the bus server and ``embed.Bridge`` post THR writes by, so that a burst
        leaves in one ``os.write`` (docs/bus-protocol.md, "Settling"). No side effects.
        """
        return offset == 0 and not self._lcr & Lcr.DLAB and not self.tx_full()

    def rx_count(self) -> int:
        """Characters waiting in the RX FIFO (or 1 if RBR holds one), and with line-rate
        pacing those still on the line; no side effects."""
        on_line = len(self._rx_line)
        if self._fcr & Fcr.FE:
            return len(self._rx) + on_line
        return (1 if self._lsr & Lsr.DR else 0) + on_line

    def rx_readable(self) -> int:
        """How many RBR reads find a character with no line error pending, as LSR stands now.

        0 while LSR.DR is 0 or any of OE, PE, FE, BI is set; else the RX FIFO's fill (1
        without FIFOs). No side effects: the bus's READ_N stop rule without ``state()``.
        """
        lsr = self._lsr
        if not lsr & Lsr.DR or lsr & (Lsr.OE | Lsr.PE | Lsr.FE | Lsr.BI):
            return 0
        return len(self._rx) if self._fcr & Fcr.FE else 1

    def receive(self, data: bytes) -> int:
        """Take bytes from the wire; returns how many were accepted (≤ ``can_receive()``).

        With line-rate pacing they join the line: the first enters the RX FIFO now if the
        receiver is free, each next one a character time after the one before.
        """
        now = self._begin()
        n = min(len(data), self.can_receive())
        if n:
            self._stats["bytes_received"] += n
            if not self._paced:
                self._receive(data[:n])
                return n
            if not self._rx_line:
                slot = self._rx_slot_ns
                self._rx_slot_ns = now if slot is None or slot < now else slot
            self._rx_line += data[:n]
            self._advance(now)
        return n

    def receive_many(self, data: bytes) -> int:
        """Take bytes from the wire as repeated ``receive`` calls would, until one takes
        nothing (a full FIFO, a full line); returns how many were taken in all.

        The same state after as feeding ``data`` one byte per ``receive`` until one is
        refused (above the trigger level QEMU's ``can_receive`` offers one byte at a time,
        so that loop is one call per byte): the port link's bulk refill, in one call.
        """
        taken = 0
        while taken < len(data):
            n = self.receive(data[taken:] if taken else data)
            if not n:
                break
            taken += n
        return taken

    def _receive(self, data: bytes) -> None:
        """QEMU ``serial_receive1``: no ``can_receive`` check (loopback bypasses it)."""
        if self._fcr & Fcr.FE:
            room = FIFO_SIZE - len(self._rx)
            if len(data) > room:
                # "Receive overruns do not overwrite FIFO contents" (§7.2).
                self._stats["overruns"] += len(data) - room
                self._lsr |= Lsr.OE
                data = data[:room]
            self._rx += data
            self._lsr |= Lsr.DR
            self._set_timeout(self._now_ns + TIMEOUT_CHARS * self._char_time_ns)
        else:
            if self._lsr & Lsr.DR:
                self._stats["overruns"] += 1
                self._lsr |= Lsr.OE
            self._rbr = data[0]
            self._lsr |= Lsr.DR
        self._update_irq()

    def receive_break(self) -> None:
        """A break came in from the wire: a NUL with LSR.BI, RLSI if enabled (§7.3)."""
        self._begin()
        self._stats["breaks"] += 1
        self._rbr = 0
        # QEMU pushes the NUL into the RX FIFO even without FIFOs (§7.3 quirk, kept).
        if len(self._rx) < FIFO_SIZE:
            self._rx.append(0)
        else:
            self._stats["overruns"] += 1
            self._lsr |= Lsr.OE
        self._lsr |= Lsr.BI | Lsr.DR
        self._update_irq()

    def receive_line_error(self, *, parity: bool = False, framing: bool = False) -> None:
        """A parity or framing error came in from the wire: LSR.PE/FE, RLSI if enabled.

        QEMU never sets PE/FE (its chardevs carry no such information); a real port does.
        """
        self._begin()
        bits = (Lsr.PE if parity else 0) | (Lsr.FE if framing else 0)
        if bits:
            self._stats["line_errors"] += 1
            self._lsr |= bits
            self._update_irq()

    # -- transmit -------------------------------------------------------------------------

    def tx_pending(self) -> bytes:
        """The bytes waiting for the wire, oldest first: the TSR byte, then the FIFO or THR.

        With line-rate pacing, the transmit line: the bytes whose character has started (one
        more each character time); the rest wait in the FIFO or THR.
        """
        if self._paced:
            return bytes(self._tx_line)
        head = bytes((self._tsr,)) if self._tsr_busy else b""
        if self._fcr & Fcr.FE:
            return head + self._tx
        if not self._lsr & Lsr.THRE:
            return head + bytes((self._thr,))
        return head

    def _tx_waiting_count(self) -> int:
        """Bytes the device still has to send: the TSR byte (or the transmit line) and the TX
        FIFO (or THR)."""
        queued = len(self._tx) if self._fcr & Fcr.FE else (0 if self._lsr & Lsr.THRE else 1)
        return queued + len(self._tx_line) + (1 if self._tsr_busy else 0)

    def _tx_count(self) -> int:
        """``len(tx_pending())``, without building the bytes."""
        if self._paced:
            return len(self._tx_line)
        return self._tx_waiting_count()

    def tx_sent(self, n: int) -> None:
        """The OS took the first ``n`` bytes of ``tx_pending()``."""
        now = self._begin()
        if n < 0 or n > self._tx_count():
            # Counted, not built: a driver that just called tx_pending() pays for it once.
            raise ValueError(f"tx_sent({n}) but only {self._tx_count()} bytes are pending")
        if self._paced:
            if n:
                held = self._tx_held()
                del self._tx_line[:n]
                self._stats["bytes_transmitted"] += n
                self._tx_release(now, held)
            return
        for _ in range(n):
            if not self._tsr_busy:
                self._load_tsr()
            self._tsr_busy = False
            self._tsr_retry = 0
        self._stats["bytes_transmitted"] += n
        self._xmit()

    def tx_blocked(self) -> None:
        """A write of the head byte was refused: it sits in the TSR and ``tsr_retry`` counts up.

        With ``tx_retry_limit`` set, a byte refused that many times more is dropped and
        counted (QEMU's MAX_XMIT_RETRY); by default it waits for the wire forever. With
        line-rate pacing the refusal holds the line: no next character starts (and TEMT
        stays 0) until the wire takes the byte.
        """
        now = self._begin()
        if self._paced:
            if not self._tx_line:
                raise ValueError("tx_blocked() but no byte is pending")
            self._stats["refused_writes"] += 1
            limit = self._tx_retry_limit
            if limit is not None and self._tsr_retry >= limit:
                self._stats["tx_dropped"] += 1
                del self._tx_line[0]
                self._tx_release(now, True)
                return
            self._tsr_retry += 1
            if self._tx_end_ns is None:
                self._tx_end_ns = now  # the line is busy again: the wire holds a byte
                self._lsr &= ~Lsr.TEMT
            self._update_due()
            return
        if not self._tsr_busy:
            if not self._tx_count():
                raise ValueError("tx_blocked() but no byte is pending")
            self._load_tsr()
        self._stats["refused_writes"] += 1
        limit = self._tx_retry_limit
        if limit is not None and self._tsr_retry >= limit:
            self._stats["tx_dropped"] += 1
            self._tsr_busy = False
            self._tsr_retry = 0
            self._xmit()
        else:
            self._tsr_retry += 1

    def _tx_held(self) -> bool:
        """Line-rate pacing: the wire refused the first byte of the line, or the line is
        full: no next character starts until the wire takes some."""
        return self._tsr_retry > 0 or len(self._tx_line) >= TX_LINE_BYTES

    def _tx_release(self, now: int, held: bool) -> None:
        """Line-rate pacing: the wire took (or the retry policy dropped) bytes of the line.
        A line that was ``held`` goes on from now if its character's end has passed."""
        self._tsr_retry = 0
        tx_end = self._tx_end_ns
        if held and tx_end is not None and tx_end < now:
            self._tx_end_ns = now  # the schedule goes on from now, not from while it was held
        self._advance(now)

    def _take_next(self) -> int:
        """The next queued byte leaves THR or the TX FIFO (for the TSR); THRE (and THRI) rise
        if nothing is left."""
        if self._fcr & Fcr.FE:
            byte = self._tx.pop(0)
            if not self._tx:
                self._lsr |= Lsr.THRE
        else:
            byte = self._thr
            self._lsr |= Lsr.THRE
        self._tsr = byte
        if self._lsr & Lsr.THRE and not self._thr_ipending:
            self._thr_ipending = True
            self._update_irq()
        return byte

    def _load_tsr(self) -> None:
        """Move the next queued byte into the TSR; THRE (and THRI) rise if nothing is left."""
        self._take_next()
        self._tsr_busy = True

    def _xmit(self) -> None:
        """Load the TSR if it is free; in loopback, deliver straight to the receiver (§6)."""
        if self._paced:
            if self._tx_end_ns is None and not self._lsr & Lsr.THRE:
                self._start_char()
            return
        while True:
            if not self._tsr_busy:
                if self._lsr & Lsr.THRE:
                    break
                self._load_tsr()
            if not self._mcr & Mcr.LOOP:
                return
            self._receive(bytes((self._tsr,)))
            self._stats["bytes_looped_back"] += 1
            self._tsr_busy = False
            self._tsr_retry = 0
        self._lsr |= Lsr.TEMT

    def _tx_line_free(self) -> None:
        """Line-rate pacing: the transmit line is free (at ``_now_ns``): the next queued byte
        starts its character, or the transmitter is empty (TEMT)."""
        if self._lsr & Lsr.THRE:
            self._lsr |= Lsr.TEMT
        else:
            self._start_char()

    def _start_char(self) -> None:
        """Line-rate pacing: the next queued byte starts its character now and joins the line
        for the wire (in loopback the receiver gets it at once, as without pacing)."""
        byte = self._take_next()
        self._tx_end_ns = self._now_ns + self._line_char_ns
        if self._mcr & Mcr.LOOP:
            self._receive(bytes((byte,)))
            self._stats["bytes_looped_back"] += 1
        else:
            self._tx_line.append(byte)
            self._tx_ready = True
        self._update_due()

    # -- modem inputs and events -----------------------------------------------------------

    def set_modem_inputs(self, *, cts: bool, dsr: bool, ri: bool, dcd: bool) -> None:
        """New levels of the port's CTS, DSR, RI and DCD; delta bits and MSI follow (§8)."""
        self._begin()
        old = self._msr
        levels = (
            (Msr.CTS if cts else 0)
            | (Msr.DSR if dsr else 0)
            | (Msr.RI if ri else 0)
            | (Msr.DCD if dcd else 0)
        )
        new = (old & MSR_DELTA_MASK) | levels
        if new != old:
            new |= ((new >> 4) ^ (old >> 4)) & MSR_DELTA_MASK
            # TERI only on RI 1→0; QEMU's clean-up also drops an unread TERI (§8 quirk).
            if new & Msr.TERI and not old & Msr.RI:
                new &= ~Msr.TERI
            self._msr = new
            self._update_irq()

    def take_events(self) -> UartEvents:
        """What changed since the last call (IRQ edges, line, modem outputs, TX, RX space)."""
        if not (
            self._irq_changes
            or self._line_changed
            or self._break_changed
            or self._modem_outputs_changed
            or self._msi_changed
            or self._tx_ready
            or self._rx_space
        ):
            return NO_EVENTS
        events = UartEvents(
            irq_changes=tuple(self._irq_changes),
            line_settings=self.line_settings if self._line_changed else None,
            break_on=bool(self._lcr & Lcr.SBC) if self._break_changed else None,
            modem_outputs=self.modem_outputs if self._modem_outputs_changed else None,
            msi_enabled=self.msi_enabled if self._msi_changed else None,
            tx_ready=self._tx_ready and self._tx_count() > 0,
            rx_space=self._rx_space,
        )
        self._irq_changes.clear()
        self._line_changed = self._modem_outputs_changed = self._msi_changed = False
        self._break_changed = self._tx_ready = self._rx_space = False
        return events


def _ignore_write(value: int) -> None:
    """LSR and MSR writes are ignored (QEMU, §1)."""


__all__ = [
    "NO_EVENTS",
    "PACES",
    "QEMU_MAX_XMIT_RETRY",
    "RX_LINE_BYTES",
    "TX_LINE_BYTES",
    "Clock",
    "LineSettings",
    "ModemOutputs",
    "Pace",
    "Uart16550",
    "UartEvents",
    "UartState",
    "UartStatistics",
    "char_time_ns",
    "frame_bits",
    "line_char_time_ns",
    "line_settings_of",
    "modem_outputs_of",
]
