"""Values describing the host side of one UART: the reader state and the bytes in flight.

Shared by the port link (which produces them), the checkpoint (which stores them) and the
daemon (which reports them). No behaviour here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from ..uart import LineSettings

DisconnectPolicy = Literal["buffer", "hold", "discard"]

# Bounds of the host buffers: the config refuses more, and so does a checkpoint reader.
MAX_RX_BACKLOG_BYTES = 1 << 20
RX_MARK_KINDS = ("break", "parity", "framing")
RX_ESCAPE_PREFIXES = (b"", b"\xff", b"\xff\x00")  # a PARMRK mark cut after 0, 1 or 2 bytes
MAX_TX_BACKLOG_BYTES = 16 << 20


class ReaderState(StrEnum):
    """Who is at the far end of the wire (DESIGN.md, reader states)."""

    CONNECTED = "connected"
    STALLED = "stalled"
    DISCONNECTED = "disconnected"


@dataclass(frozen=True, slots=True, kw_only=True)
class PortCounters:
    """Counters of the host side; every byte lost by policy is counted here."""

    bytes_read: int = 0
    bytes_written: int = 0
    bytes_discarded: int = 0
    settings_refused: int = 0
    disconnects: int = 0
    reconnects: int = 0
    breaks_received: int = 0
    parity_errors: int = 0
    framing_errors: int = 0
    # Format version 3: what a stop takes out of a real tty's kernel buffers, and the one
    # thing an open cannot always tell (see PortLink, "What a tty gets at open").
    tx_reclaimed: int = 0
    rx_saved_at_stop: int = 0
    rx_dropped_at_stop: int = 0
    rx_escape_uncertain: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class PortState:
    """The host path of one UART, as a checkpoint sees it.

    ``rx_backlog``: bytes read from the port that the RX FIFO has not taken yet.
    ``tx_backlog``: bytes the device sent while the reader was disconnected
    (``on_disconnect = "buffer"``), to be replayed in order on reconnect.
    ``line_settings``: what was last applied to the port (None: nothing applied yet).
    ``rx_marks``: breaks and line errors read from the port that wait for the guest to read
    the bytes before them: ``(bytes of rx_backlog before it, kind)``, in order; kind is one of
    ``RX_MARK_KINDS``.
    ``rx_escape``: the start of a PARMRK mark read from the port whose rest was not read yet
    (one of ``RX_ESCAPE_PREFIXES``): the decoder continues from it.
    """

    rx_backlog: bytes = b""
    tx_backlog: bytes = b""
    reader_state: ReaderState = ReaderState.CONNECTED
    line_settings: LineSettings | None = None
    counters: PortCounters = field(default_factory=PortCounters)
    rx_marks: tuple[tuple[int, str], ...] = ()
    rx_escape: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class PortSettings:
    """How to open and run one host port (built from a ``[[uart]]`` config table).

    ``url``: a tty path (``/dev/ttyUSB0``, a ``/dev/serial/by-id/…`` link, a socat pty link),
    ``pty:`` (the daemon creates a pty and publishes its slave at ``link_path``),
    ``rfc2217://host:port`` or ``socket://host:port`` (pyserial URL handlers).
    ``lock_dir``: where UUCP lock files (``LCK..<tty>``) are honoured and created for tty
    paths; None: none are (flock and TIOCEXCL still apply).
    """

    url: str
    link_path: str | None = None
    on_disconnect: DisconnectPolicy = "buffer"
    backlog_bytes: int = 1 << 20
    rx_backlog_bytes: int = 4096
    rtscts: bool = False
    xonxoff: bool = False
    reconnect_min_s: float = 0.1
    reconnect_max_s: float = 5.0
    lock_dir: str | None = "/var/lock"
