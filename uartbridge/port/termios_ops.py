"""Termios, modem ioctls and PARMRK framing for the port link (no asyncio, no model state).

``TermiosOps`` is the small seam between the port link and the kernel: every termios call
and modem-line ioctl goes through it, so tests can substitute a fake port for what a pty
cannot show (data bits, parity, modem lines) while the byte path stays on real fds.
``termios.error`` (which is not an ``OSError``) is turned into ``OSError`` here, where it
enters.

``apply_line_settings`` applies the guest's line settings with ``TCSANOW`` (never a flush) one
setting at a time, reading each back: a setting the port rejects (EINVAL) or silently
changes (a pty turns 7 data bits into 8 and clears parity) is reported as refused.

``take_raw_mode`` is what a tty gets when the link takes it (see its docstring for why the
escaping of input can change only there, and how bytes queued before are told apart).

``ParmrkDecoder`` parses the input stream of a tty in ``PARMRK | INPCK`` mode, statefully
across reads: ``ff 00 00`` is a break, ``ff 00 X`` is a parity or framing error on ``X``
(Linux marks both the same way, so they cannot be told apart), ``ff ff`` is a literal 0xff.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import termios
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, Protocol

from ..uart import LineSettings

# Linux ioctl numbers not exported by the termios module (the values pyserial uses too).
TIOCSBRK: int = getattr(termios, "TIOCSBRK", 0x5427)
TIOCCBRK: int = getattr(termios, "TIOCCBRK", 0x5428)
CMSPAR: int = getattr(termios, "CMSPAR", 0o10000000000)
TIOCINQ: int = getattr(termios, "TIOCINQ", termios.FIONREAD)
TIOCSERGETLSR: int = getattr(termios, "TIOCSERGETLSR", 0x5459)
TIOCSER_TEMT: int = getattr(termios, "TIOCSER_TEMT", 0x01)
_UNIX98_PTY_SLAVE_MAJORS = range(136, 144)  # Documentation/admin-guide/devices.txt

TIOCM_DTR: int = termios.TIOCM_DTR
TIOCM_RTS: int = termios.TIOCM_RTS
TIOCM_CTS: int = termios.TIOCM_CTS
TIOCM_DSR: int = termios.TIOCM_DSR
TIOCM_RI: int = termios.TIOCM_RI
TIOCM_CD: int = termios.TIOCM_CD

STANDARD_BAUDS: tuple[int, ...] = tuple(
    b
    for b in (
        50, 75, 110, 134, 150, 200, 300, 600, 1200, 1800, 2400, 4800, 9600, 19200, 38400,
        57600, 115200, 230400, 460800, 500000, 576000, 921600, 1000000, 1152000, 1500000,
        2000000, 2500000, 3000000, 3500000, 4000000,
    )
    if hasattr(termios, f"B{b}")
)

Attrs = list[Any]


class TermiosOps(Protocol):
    """The kernel calls the port link makes on a tty fd (all raise ``OSError``)."""

    def tcgetattr(self, fd: int) -> Attrs:
        """Return the fd's termios attributes (termios.tcgetattr's list)."""
        ...

    def tcsetattr(self, fd: int, attrs: Attrs) -> None:
        """Apply attributes at once (TCSANOW): nothing is flushed."""
        ...

    def modem_get(self, fd: int) -> int:
        """TIOCMGET: the TIOCM_* bits (ENOTTY on a pty)."""
        ...

    def modem_set(self, fd: int, *, set_bits: int, clear_bits: int) -> None:
        """TIOCMBIS / TIOCMBIC."""
        ...

    def set_break(self, fd: int, on: bool) -> None:
        """TIOCSBRK / TIOCCBRK."""
        ...

    def tcdrain(self, fd: int) -> None:
        """Wait until the OS has sent what it accepted."""
        ...

    def output_queued(self, fd: int) -> int:
        """TIOCOUTQ: bytes the OS accepted and has not sent yet."""
        ...

    def tcflow(self, fd: int, action: int) -> None:
        """termios.tcflow (TCIOFF sends XOFF; TCOOFF/TCOON suspend/restart output)."""
        ...

    def input_queued(self, fd: int) -> int:
        """TIOCINQ: bytes in the input queue (all of them once the tty is not canonical)."""
        ...

    def flush_output(self, fd: int) -> None:
        """tcflush(TCOFLUSH): drop what the OS accepted and has not sent."""
        ...

    def transmitter_empty(self, fd: int) -> bool | None:
        """TIOCSERGETLSR: the UART's transmitter (FIFO and shift register) is empty; None if
        the driver cannot say."""
        ...

    def set_exclusive(self, fd: int, on: bool) -> None:
        """TIOCEXCL / TIOCNXCL: refuse (or allow again) further opens by non-root users."""
        ...

    def is_pty(self, fd: int) -> bool:
        """Whether ``fd`` is the slave side of a pseudo-terminal (not a serial port)."""
        ...


def _os_error(exc: termios.error) -> OSError:
    errno_, *rest = exc.args if exc.args else (0,)
    return OSError(errno_, rest[0] if rest else str(exc))


class RealTermiosOps:
    """``TermiosOps`` on the real kernel."""

    def tcgetattr(self, fd: int) -> Attrs:
        """Return the fd's termios attributes."""
        try:
            return termios.tcgetattr(fd)
        except termios.error as exc:
            raise _os_error(exc) from exc

    def tcsetattr(self, fd: int, attrs: Attrs) -> None:
        """Apply attributes with TCSANOW."""
        try:
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
        except termios.error as exc:
            raise _os_error(exc) from exc

    def modem_get(self, fd: int) -> int:
        """TIOCMGET."""
        raw = fcntl.ioctl(fd, termios.TIOCMGET, struct.pack("i", 0))
        value: int = struct.unpack("i", raw)[0]
        return value

    def modem_set(self, fd: int, *, set_bits: int, clear_bits: int) -> None:
        """TIOCMBIS / TIOCMBIC."""
        if set_bits:
            fcntl.ioctl(fd, termios.TIOCMBIS, struct.pack("i", set_bits))
        if clear_bits:
            fcntl.ioctl(fd, termios.TIOCMBIC, struct.pack("i", clear_bits))

    def set_break(self, fd: int, on: bool) -> None:
        """TIOCSBRK / TIOCCBRK."""
        fcntl.ioctl(fd, TIOCSBRK if on else TIOCCBRK)

    def tcdrain(self, fd: int) -> None:
        """termios.tcdrain."""
        try:
            termios.tcdrain(fd)
        except termios.error as exc:
            raise _os_error(exc) from exc

    def output_queued(self, fd: int) -> int:
        """TIOCOUTQ."""
        raw = fcntl.ioctl(fd, termios.TIOCOUTQ, struct.pack("i", 0))
        value: int = struct.unpack("i", raw)[0]
        return value

    def tcflow(self, fd: int, action: int) -> None:
        """termios.tcflow."""
        try:
            termios.tcflow(fd, action)
        except termios.error as exc:
            raise _os_error(exc) from exc

    def input_queued(self, fd: int) -> int:
        """TIOCINQ."""
        raw = fcntl.ioctl(fd, TIOCINQ, struct.pack("i", 0))
        value: int = struct.unpack("i", raw)[0]
        return value

    def flush_output(self, fd: int) -> None:
        """tcflush(TCOFLUSH)."""
        try:
            termios.tcflush(fd, termios.TCOFLUSH)
        except termios.error as exc:
            raise _os_error(exc) from exc

    def transmitter_empty(self, fd: int) -> bool | None:
        """TIOCSERGETLSR (serial drivers; ptys and most USB adapters say ENOTTY/EINVAL)."""
        try:
            raw = fcntl.ioctl(fd, TIOCSERGETLSR, struct.pack("I", 0))
        except OSError:
            return None
        return bool(struct.unpack("I", raw)[0] & TIOCSER_TEMT)

    def set_exclusive(self, fd: int, on: bool) -> None:
        """TIOCEXCL / TIOCNXCL."""
        fcntl.ioctl(fd, termios.TIOCEXCL if on else termios.TIOCNXCL)

    def is_pty(self, fd: int) -> bool:
        """The device's major number is a pty slave driver's (/proc/tty/drivers)."""
        return os.major(os.fstat(fd).st_rdev) in pty_slave_majors()


@cache
def pty_slave_majors() -> frozenset[int]:
    """Major numbers of pty slave drivers ("pty:slave" in /proc/tty/drivers), else UNIX98's."""
    majors: set[int] = set()
    with (
        contextlib.suppress(OSError),
        open("/proc/tty/drivers", encoding="ascii", errors="replace") as drivers,
    ):
        for line in drivers:
            fields = line.split()
            if len(fields) >= 5 and fields[-1] == "pty:slave" and fields[2].isdigit():
                majors.add(int(fields[2]))
    return frozenset(majors or _UNIX98_PTY_SLAVE_MAJORS)


def nearest_baud(baud: int) -> int:
    """The standard rate nearest to ``baud`` (by ratio, so 110 stays 110 and 3500 → 3600-ish)."""
    return min(STANDARD_BAUDS, key=lambda b: max(b, baud) / max(1, min(b, baud)))


def raw_attrs(attrs: Attrs, *, parmrk: bool, rtscts: bool, xonxoff: bool) -> Attrs:
    """``attrs`` made raw, with PARMRK|INPCK marking (or neither) and the flow control.

    Raw: no echo, no canonical line editing, no signals, no input or output translation
    (ICRNL, INLCR, IGNCR, ISTRIP, OPOST…), breaks and errors not ignored, CLOCAL|CREAD on, and
    HUPCL off, so that the last close (also a crash's) leaves DTR/RTS where the guest's MCR
    put them instead of dropping them. Baud, CSIZE, parity and stop bits are left alone.
    """
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
    cc = list(cc)
    cflag |= termios.CLOCAL | termios.CREAD
    cflag &= ~termios.HUPCL
    lflag &= ~(
        termios.ICANON | termios.ECHO | termios.ECHOE | termios.ECHOK | termios.ECHONL
        | termios.ISIG | termios.IEXTEN | termios.ECHOCTL | termios.ECHOKE | termios.ECHOPRT
        | termios.TOSTOP | getattr(termios, "EXTPROC", 0)
    )
    oflag &= ~(termios.OPOST | termios.ONLCR | termios.OCRNL | termios.ONLRET | termios.ONOCR)
    iflag &= ~(
        termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IGNBRK | termios.BRKINT
        | termios.IUCLC | termios.ISTRIP | termios.IGNPAR | termios.IXANY | termios.IMAXBEL
        | getattr(termios, "IUTF8", 0)
    )
    if parmrk:
        iflag |= termios.PARMRK | termios.INPCK
    else:
        iflag &= ~(termios.PARMRK | termios.INPCK)
    # IXON stays off: the link reads XON/XOFF itself (PortLink._take_flow_chars), so that
    # bytes an XOFF holds back stay in the device and its checkpoint, not in the kernel.
    iflag &= ~termios.IXON
    if xonxoff:
        iflag |= termios.IXOFF
    else:
        iflag &= ~termios.IXOFF
    if rtscts:
        cflag |= termios.CRTSCTS
    else:
        cflag &= ~termios.CRTSCTS
    cc[termios.VMIN] = 0
    cc[termios.VTIME] = 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


@dataclass(frozen=True, slots=True)
class RawMode:
    """How the input of a tty the link just took is to be read.

    ``parmrk``: the stream is PARMRK-escaped from here on. ``plain_bytes``: that many bytes at
    the head of the input queue were queued before PARMRK was on and are read as they are.
    ``window_bytes``: the bytes after those that the kernel queued while the mode changed;
    read as escaped, they can only be misread if they hold a 0xFF (the link counts that).
    """

    parmrk: bool
    plain_bytes: int = 0
    window_bytes: int = 0


def take_raw_mode(
    ops: TermiosOps, fd: int, *, serial: bool, rtscts: bool, xonxoff: bool
) -> RawMode:
    """Make the tty ``fd`` raw the moment the link owns it; say how to read what it queued.

    The kernel escapes input (PARMRK) when it queues it, under the mode of that instant, so
    the escaping of a stream may change only where the link can tell the two sides apart:

    - A pty never marks a break or an error (every byte it passes is a normal one), so PARMRK
      would only double 0xFF. Its PARMRK is left as it is found: no boundary ever exists, and
      bytes queued before the open (a socat restart, a peer talking first) read exactly.
    - A serial port (real UART, USB adapter) gets PARMRK|INPCK, so that breaks and line errors
      reach LSR. If it has PARMRK already (the kernel keeps a tty's termios across closes:
      our last run), nothing changes. Otherwise the queue is counted (TIOCINQ) just before
      the one tcsetattr that turns PARMRK on and again just after: the first count was queued
      unescaped (``plain_bytes``); what came in between the two (``window_bytes``, usually
      none: the kernel empties a serial port's queue at its last close, so only what arrived
      since this open() can be there) is read as escaped. Before that, a first tcsetattr
      makes the line raw without PARMRK: no escaping changes there, and a canonical queue
      (whose partial line TIOCINQ would not count) becomes fully countable.

    If the port refuses PARMRK (reads back without it), INPCK goes too and nothing is escaped.
    """
    old = ops.tcgetattr(fd)
    had_parmrk = bool(old[0] & termios.PARMRK)
    if not serial or had_parmrk:
        ops.tcsetattr(fd, raw_attrs(old, parmrk=had_parmrk, rtscts=rtscts, xonxoff=xonxoff))
        return RawMode(parmrk=had_parmrk)
    plain = raw_attrs(old, parmrk=False, rtscts=rtscts, xonxoff=xonxoff)
    ops.tcsetattr(fd, plain)
    before = ops.input_queued(fd)
    ops.tcsetattr(fd, raw_attrs(plain, parmrk=True, rtscts=rtscts, xonxoff=xonxoff))
    after = ops.input_queued(fd)
    if not ops.tcgetattr(fd)[0] & termios.PARMRK:
        ops.tcsetattr(fd, plain)
        return RawMode(parmrk=False)
    return RawMode(parmrk=True, plain_bytes=before, window_bytes=max(0, after - before))


_CSIZE = {5: termios.CS5, 6: termios.CS6, 7: termios.CS7, 8: termios.CS8}
_PARITY_MASK = termios.PARENB | termios.PARODD | CMSPAR
_PARITY = {
    "N": 0,
    "O": termios.PARENB | termios.PARODD,
    "E": termios.PARENB,
    "M": termios.PARENB | termios.PARODD | CMSPAR,
    "S": termios.PARENB | CMSPAR,
}


@dataclass(frozen=True, slots=True)
class _Step:
    name: str
    value: object
    mask: int
    bits: int


def _steps(ls: LineSettings) -> tuple[_Step, ...]:
    return (
        _Step("data_bits", ls.data_bits, termios.CSIZE, _CSIZE[ls.data_bits]),
        _Step("parity", ls.parity, _PARITY_MASK, _PARITY[ls.parity]),
        _Step("stop_bits", ls.stop_bits, termios.CSTOPB, termios.CSTOPB if ls.stop_bits > 1 else 0),
    )


def apply_line_settings(
    ops: TermiosOps,
    fd: int,
    ls: LineSettings,
    *,
    parmrk: bool,
    rtscts: bool,
    xonxoff: bool,
) -> list[str]:
    """Apply ``ls`` (without the break bit) to the tty ``fd``; return the refused settings.

    Raw mode, flow control and the baud rate (nearest standard rate) go first, then data
    bits, parity and stop bits one at a time, each read back. Nothing is flushed (TCSANOW).
    ``OSError`` other than EINVAL (EIO: the port went away) propagates.
    """
    refused: list[str] = []
    baud = nearest_baud(ls.baud)
    speed = getattr(termios, f"B{baud}")
    current = raw_attrs(ops.tcgetattr(fd), parmrk=parmrk, rtscts=rtscts, xonxoff=xonxoff)
    current[4] = current[5] = speed
    try:
        ops.tcsetattr(fd, current)
    except OSError as exc:
        if exc.errno != 22:
            raise
        refused.append(f"baud={baud}")
    current = ops.tcgetattr(fd)
    if current[5] != speed and f"baud={baud}" not in refused:
        refused.append(f"baud={baud}")
    for step in _steps(ls):
        if current[2] & step.mask == step.bits:
            continue
        trial = list(current)
        trial[2] = (current[2] & ~step.mask) | step.bits
        try:
            ops.tcsetattr(fd, trial)
        except OSError as exc:
            if exc.errno != 22:
                raise
            refused.append(f"{step.name}={step.value}")
            continue
        readback = ops.tcgetattr(fd)
        if readback[2] & step.mask != step.bits:
            refused.append(f"{step.name}={step.value}")
            ops.tcsetattr(fd, current)
        else:
            current = readback
    return refused


Item = tuple[Literal["data"], bytes] | tuple[Literal["break"], None] | tuple[Literal["error"], int]


class ParmrkDecoder:
    """Stateful decoder of a PARMRK stream: data runs, breaks, and errors on a byte."""

    __slots__ = ("_state",)

    def __init__(self) -> None:
        """Start between marks."""
        self._state = 0  # 0: normal, 1: seen ff, 2: seen ff 00

    @property
    def partial(self) -> bytes:
        """The raw bytes of an unfinished mark (kept across reads, saved in checkpoints)."""
        return (b"", b"\xff", b"\xff\x00")[self._state]

    def resume(self, partial: bytes) -> None:
        """Continue after ``partial`` (a value of ``partial``, e.g. from a checkpoint)."""
        self._state = (b"", b"\xff", b"\xff\x00").index(partial)

    def feed(self, raw: bytes) -> list[Item]:
        """Decode ``raw``; returns items in order (adjacent data merged)."""
        items: list[Item] = []
        data = bytearray()

        def flush() -> None:
            if data:
                items.append(("data", bytes(data)))
                data.clear()

        state = self._state
        i = 0
        n = len(raw)
        while i < n:
            if state == 0:
                j = raw.find(b"\xff", i)
                if j < 0:
                    data += raw[i:]
                    break
                data += raw[i:j]
                state = 1
                i = j + 1
            elif state == 1:
                b = raw[i]
                i += 1
                if b == 0xFF:
                    data.append(0xFF)
                    state = 0
                elif b == 0:
                    state = 2
                else:  # not a mark (cannot happen with PARMRK): keep both bytes
                    data += bytes((0xFF, b))
                    state = 0
            else:
                b = raw[i]
                i += 1
                flush()
                if b == 0:
                    items.append(("break", None))
                else:
                    items.append(("error", b))
                state = 0
        flush()
        self._state = state
        return items
