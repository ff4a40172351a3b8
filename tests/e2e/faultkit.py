"""Helpers for the fault soak: a guest and a far end that survive faults, and a gap analyser.

- ``SoakGuest``: ``streams.GuestRunner`` with a rate limit, ``finish()`` (end the stream at
  the next record boundary), a count of the LSR values the driver itself read, and, when
  asked, survival of a daemon crash (reconnect when told to, as an emulator would).
- ``SoakFarEnd``: ``streams.FarEnd`` with ``finish()``, that notices its pty hang up (socat
  died), records where each stream stood, and reopens the link when told to.
- ``segments`` / ``gaps``: how a received stream is stitched from pieces of the sent one,
  resynchronising on the record framing where a record was torn at a gap.
- ``rollback_split``: the exact shape a daemon crash leaves: prefix, replay, suffix.
"""

from __future__ import annotations

import errno
import json
import os
import select
import termios
import threading
import time
import tty
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streams import RECORD, FarEnd, GuestRunner

from uartbridge.client import BusClient
from uartbridge.control import request
from uartbridge.errors import BusError
from uartbridge.guest import Guest8250
from uartbridge.registers import IER, LSR, Lsr

# -- the guest ------------------------------------------------------------------------------


class SoakGuest(GuestRunner):
    """The reference guest with a rate limit, ``finish()``, LSR observation, crash survival.

    ``rate_bytes_per_s`` limits what the guest hands to its driver (measured from start, so
    a pause is followed by a burst). ``finish()`` ends ``tx_data`` where the guest stands
    (``finished`` is set then); ``tx_data`` is what it sent. With ``survive_crash`` a lost
    bus connection does not kill the thread: it sets ``bus_lost`` and waits for
    ``resume()``, then reconnects and writes IER again from the driver's own copy — the
    device came back from a checkpoint and may not hold the IER the driver last wrote.
    """

    def __init__(
        self,
        bus_path: Path,
        tx_data: bytes,
        *,
        rate_bytes_per_s: float | None = None,
        survive_crash: bool = False,
        chunk: int = 72 * RECORD.size,
    ) -> None:
        super().__init__(bus_path, tx_data, chunk=chunk)
        assert chunk % RECORD.size == 0, "chunks must end on a record boundary"
        self.rate_bytes_per_s = rate_bytes_per_s
        self.survive_crash = survive_crash
        self.lsr_reads = 0
        self.lsr_temt_low = 0
        self.lsr_thre_low = 0
        self.crashes = 0
        self.bus_lost = threading.Event()
        self.finished = threading.Event()
        self._finish = threading.Event()
        self._started = 0.0

    def start(self) -> None:
        """Connect, probe and start up the UART like Linux, then run (LSR reads observed)."""
        self.client = BusClient(self.bus_path)
        self.guest = Guest8250(self.client)
        kind = self.guest.probe()
        assert kind == ("16550A", 16), kind
        self.guest.startup(115200)
        self._observe(self.client)
        self._started = time.monotonic()
        self._thread.start()

    def finish(self) -> None:
        """End the stream where it stands (a record boundary); ``finished`` says when."""
        self._finish.set()

    def _observe(self, client: BusClient) -> None:
        """Count the LSR values the driver reads (no extra reads: LSR reads have effects)."""
        read = client.read

        def observed(offset: int) -> int:
            value = read(offset)
            if offset == LSR:
                self.lsr_reads += 1
                if not value & Lsr.TEMT:
                    self.lsr_temt_low += 1
                if not value & Lsr.THRE:
                    self.lsr_thre_low += 1
            return value

        client.read = observed  # type: ignore[method-assign]

    def _step(self) -> None:
        guest = self.guest
        assert guest is not None
        if self._finish.is_set() and not self.finished.is_set():
            self.tx_data = self.tx_data[: min(self.offset, len(self.tx_data))]
            self.finished.set()
        limit = len(self.tx_data)
        if self.rate_bytes_per_s is not None:
            limit = min(limit, int((time.monotonic() - self._started) * self.rate_bytes_per_s))
        try:
            if guest.tx_queued < 2048 and self.offset < limit:
                guest.write(self.tx_data[self.offset : self.offset + self.chunk])
                self.offset += self.chunk
            guest.service(0.01)
        except BusError:
            if not self.survive_crash or self._stop.is_set():
                raise
            self._reconnect_after_crash()
            return
        self.received += guest.read()

    def _reconnect_after_crash(self) -> None:
        assert self.client is not None and self.guest is not None
        self.crashes += 1
        self.client.close()
        self.bus_lost.set()
        self._resume.wait()
        self._resume.clear()
        if self._stop.is_set():
            return
        self.client = BusClient(self.bus_path)
        self.guest.client = self.client
        self._observe(self.client)
        self.client.write(IER, self.guest._ier)
        self.bus_lost.clear()

    def _do_pause(self) -> None:
        super()._do_pause()
        if not self._stop.is_set() and self.client is not None:
            self._observe(self.client)


# -- the far end ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Hangup:
    """Where the far end stood when its pty hung up."""

    received: int  # bytes it had read
    sent: int  # bytes the OS had taken from it


class SoakFarEnd(FarEnd):
    """The far end with ``finish()``, that survives its pty hanging up (socat died).

    On EOF or EIO it records a ``Hangup``, closes its fd, sets ``gone`` and waits for
    ``reopen()``; it then opens the (new) link path and goes on where its streams stood.
    The reopened pty is set raw with TCSANOW: TCSAFLUSH (tty.setraw's default) would throw
    away what the daemon already sent into the new socat.
    """

    def __init__(
        self, path: Path, tx_data: bytes, *, rate_bytes_per_s: float | None = None
    ) -> None:
        super().__init__(path, tx_data, rate_bytes_per_s=rate_bytes_per_s)
        self.hangups: list[Hangup] = []
        self.gone = threading.Event()
        self.finished = threading.Event()
        self._finish = threading.Event()
        self._reopen = threading.Event()

    def finish(self) -> None:
        """End the stream at the next record boundary; ``finished`` says when."""
        self._finish.set()

    def reopen(self) -> None:
        """Open the link path again (after ``gone``)."""
        self._reopen.set()

    def stop(self) -> None:
        """Stop the thread (also while it waits to reopen) and close the fd."""
        self._stop.set()
        self._reopen.set()
        super().stop()

    def _hung_up(self) -> None:
        self.hangups.append(Hangup(received=len(self.received), sent=self.offset))
        os.close(self.fd)
        self.fd = -1
        self.gone.set()
        self._reopen.wait()
        self._reopen.clear()
        if self._stop.is_set():
            return
        self.fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd, termios.TCSANOW)
        self.gone.clear()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            while not self._stop.is_set():
                if self._finish.is_set() and not self.finished.is_set():
                    end = -(-self.offset // RECORD.size) * RECORD.size
                    self.tx_data = self.tx_data[: min(end, len(self.tx_data))]
                    self.finished.set()
                end = min(len(self.tx_data), self.offset + 4096)
                if self.rate_bytes_per_s is not None:
                    allowed = int((time.monotonic() - started) * self.rate_bytes_per_s)
                    end = min(end, allowed)
                want_write = self.offset < end
                readers = [self.fd] if self.reading.is_set() else []
                writers = [self.fd] if want_write else []
                r, w, _ = select.select(readers, writers, [], 0.01)
                if r:
                    try:
                        data = os.read(self.fd, 65536)
                    except BlockingIOError:
                        data = None
                    except OSError as exc:
                        if exc.errno != errno.EIO:
                            raise
                        data = b""
                    if data == b"":
                        self._hung_up()
                        continue
                    if data:
                        self.received += data
                if w:
                    try:
                        self.offset += os.write(self.fd, self.tx_data[self.offset : end])
                    except BlockingIOError:
                        pass
                    except OSError as exc:
                        if exc.errno != errno.EIO:
                            raise
                        self._hung_up()
        except BaseException as exc:  # reported by check()
            self.error = exc


def wait_finished(*ends: SoakGuest | SoakFarEnd, timeout_s: float = 30.0) -> None:
    """Ask every end to finish its stream and wait until each has."""
    for end in ends:
        end.finish()
    deadline = time.monotonic() + timeout_s
    for end in ends:
        while not end.finished.wait(0.05):
            end.check()
            assert time.monotonic() < deadline, f"{end} did not finish its stream"


# -- the control socket, in-process (fast polling; the CLI is used where it is the point) -----


def control_status(control: Path) -> dict[str, Any]:
    """``status`` over the control socket without starting a CLI process."""
    reply = request(control, {"cmd": "status"})
    assert reply["ok"], reply
    status: dict[str, Any] = reply
    return status


def log_events(log_text: str, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of the daemon whose ``event`` is ``event``."""
    found = []
    for line in log_text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == event:
            found.append(record)
    return found


# -- the gap analyser -------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """``length`` bytes at ``at`` in the received stream equal to ``sent[src : src+length]``.

    ``src`` is None for bytes that could not be placed (a torn fragment with no whole
    record to resynchronise on, or garbage).
    """

    at: int
    src: int | None
    length: int


@dataclass(frozen=True)
class Gap:
    """Between two placed segments: ``delta`` > 0 bytes skipped, < 0 bytes repeated."""

    at: int  # offset in the received stream where the next segment starts
    prev_end: int  # offset in the sent stream where the previous segment ended
    next_src: int  # offset in the sent stream where the next segment starts
    delta: int


def _common_prefix(a: bytes, ai: int, b: bytes, bi: int) -> int:
    """How many bytes ``a[ai:]`` and ``b[bi:]`` have in common from the start."""
    n = min(len(a) - ai, len(b) - bi)
    done = 0
    step = 4096
    while done < n:
        k = min(step, n - done)
        if a[ai + done : ai + done + k] == b[bi + done : bi + done + k]:
            done += k
            continue
        for j in range(k):
            if a[ai + done + j] != b[bi + done + j]:
                return done + j
    return n


def _next_whole_record(received: bytes, p: int, sent: bytes) -> tuple[int, int] | None:
    """The first whole record of ``sent`` in ``received`` at or after ``p``: (at, src)."""
    size = RECORD.size
    q = received.find(b"<", p)
    while q != -1 and q + size <= len(received):
        if received[q + size - 1] == ord(">"):
            _start, seq, _tag, _end = RECORD.unpack_from(received, q)
            src = seq * size
            if src + size <= len(sent) and sent[src : src + size] == received[q : q + size]:
                return q, src
        q = received.find(b"<", q + 1)
    return None


def segments(received: bytes, sent: bytes) -> list[Segment]:
    """Split ``received`` into the longest runs that are contiguous pieces of ``sent``.

    Each run is located by the first whole record in it (its sequence number says where it
    comes from in ``sent``) and extended backwards over a torn record head and forwards as
    far as the bytes agree. Bytes before a whole record that do not continue into it (two
    gaps closer together than one record) are reported as an unplaced segment.
    """
    out: list[Segment] = []
    p = 0
    n = len(received)
    while p < n:
        found = _next_whole_record(received, p, sent)
        if found is None:
            out.append(Segment(p, None, n - p))
            break
        q, src = found
        start = src - (q - p)
        if q > p and (start < 0 or received[p:q] != sent[start:src]):
            out.append(Segment(p, None, q - p))
            p, start = q, src
        length = _common_prefix(received, p, sent, start)
        out.append(Segment(p, start, length))
        p += length
    return out


def gaps(segs: list[Segment], sent_len: int) -> list[Gap]:
    """The discontinuities between placed segments, with a leading and trailing one if any."""
    placed = [s for s in segs if s.src is not None]
    out: list[Gap] = []
    prev_end = 0
    at = 0
    for seg in placed:
        assert seg.src is not None
        if seg.src != prev_end:
            out.append(Gap(at=seg.at, prev_end=prev_end, next_src=seg.src,
                           delta=seg.src - prev_end))
        prev_end = seg.src + seg.length
        at = seg.at + seg.length
    if prev_end != sent_len:
        out.append(Gap(at=at, prev_end=prev_end, next_src=sent_len, delta=sent_len - prev_end))
    return out


def coverage(segs: list[Segment], sent_len: int) -> tuple[int, int]:
    """(bytes of ``sent`` received nowhere, bytes of ``sent`` received more than once)."""
    edges: list[tuple[int, int]] = []
    for s in segs:
        if s.src is not None and s.length:
            edges += [(s.src, 1), (s.src + s.length, -1)]
    edges.sort()
    missing = duplicated = 0
    depth = 0
    pos = 0
    for at, step in [*edges, (sent_len, 0)]:
        if depth == 0:
            missing += at - pos
        elif depth > 1:
            duplicated += (at - pos) * (depth - 1)
        depth += step
        pos = at
    return missing, duplicated


def describe(segs: list[Segment], sent_len: int) -> str:
    """A one-line picture of the segments, jumps, and what is missing or repeated overall."""
    pieces = []
    for s in segs:
        if s.src is None:
            pieces.append(f"[{s.length} B unplaced at {s.at}]")
        else:
            pieces.append(f"[sent {s.src}..{s.src + s.length}]")
    jumps = ", ".join(
        f"{'skips' if g.delta > 0 else 'jumps back'} {abs(g.delta)} B at sent {g.prev_end}"
        for g in gaps(segs, sent_len)
    )
    missing, duplicated = coverage(segs, sent_len)
    return (
        " ".join(pieces)
        + f"; jumps: {jumps or 'none'}; missing {missing} B, repeated {duplicated} B"
    )


@dataclass(frozen=True)
class RollbackSplit:
    """``received == sent[:prefix] + replay + sent[resume_at:]``."""

    prefix: int
    resume_at: int


def _common_suffix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    lo, hi = 0, n  # invariant: a suffix of length lo matches
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid :] == b[len(b) - mid :]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def rollback_split(received: bytes, sent: bytes, replay: bytes) -> RollbackSplit | None:
    """Whether ``received`` is a prefix of ``sent``, then ``replay``, then a suffix of ``sent``.

    That is the shape a crash and a resume from a checkpoint leave: what went out before
    the crash, what the checkpoint still held (sent again), then the rest. Returns the split
    with the longest prefix, or None if ``received`` has any other shape.
    """
    prefix_max = _common_prefix(received, 0, sent, 0)
    suffix_max = _common_suffix(received, sent)
    t = len(replay)
    lowest = max(0, len(received) - t - suffix_max)
    for a in range(min(prefix_max, len(received) - t), lowest - 1, -1):
        if received[a : a + t] == replay:
            tail = len(received) - a - t
            resume_at = len(sent) - tail
            if resume_at >= 0 and received[a + t :] == sent[resume_at:]:
                return RollbackSplit(prefix=a, resume_at=resume_at)
    return None
