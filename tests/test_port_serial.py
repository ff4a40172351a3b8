"""A serial port's kernel buffers and the cost of a guest's register writes.

What a pty cannot show is run on a fake serial port (``FakeOps``: the termios calls, TIOCOUTQ
and the flushes are faked and recorded; the bytes still go through a real pty): line
settings applied once per batch and in their place among the bytes, the output queue kept
short, what it holds taken back at a stop, what the input queue holds saved at a stop. The
stalled port that sees no write per THR write is a real socat pty.
"""

from __future__ import annotations

import asyncio
import os
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from _port_support import (
    FakeOps,
    Guest,
    on_fake_with,
    raw_peer,
    read_available,
    socat_pair,
    wait_for,
)

import uartbridge.port.link
from uartbridge.port.link import _FdIo
from uartbridge.port.state import PortSettings, ReaderState
from uartbridge.registers import Lsr


def _tracing(fake: FakeOps) -> Callable[[str, bytes], None]:
    """A trace that records what the OS took into ``fake.calls``, among the termios calls."""

    def trace(direction: str, data: bytes) -> None:
        fake.calls.append((direction, data))

    return trace


def _at_115200_8n1(g: Guest) -> None:
    """Divisor 1 (115200 baud with the PC clock), then FIFOs, 8N1, DTR|RTS|OUT2."""
    g.uart.write(3, 0x80)
    g.uart.write(0, 1)
    g.uart.write(1, 0)
    g.setup()


def _run(settings: PortSettings, body: Any, fake: FakeOps | None = None, **kw: Any) -> None:
    fake = fake or FakeOps()
    on_fake_with(settings, body, fake, trace=_tracing(fake), **kw)


# -- line settings: once per batch, in their place -------------------------------------------


def test_line_settings_are_applied_once_per_batch_not_per_register_write() -> None:
    """32 LCR toggles in one batch of bus operations cost one application (a few tcsetattr),
    made at the end of the batch, with the last value."""

    async def body(g: Guest, fake: FakeOps, master: int) -> None:
        g.setup()
        await g.end_batch()
        fake.calls.clear()
        for i in range(32):
            g.uart.write(3, 0x1B if i % 2 == 0 else 0x03)  # 8E1 / 8N1, each a settle
            g.pump()
        g.uart.write(3, 0x1B)
        g.pump()
        assert fake.calls == []  # nothing yet: the batch is still running
        await g.end_batch()
        sets = [c for c in fake.calls if c[0] == "tcsetattr"]
        assert 1 <= len(sets) <= 4, fake.calls
        assert fake.attrs is not None and fake.attrs[2] & termios.PARENB

    _run(PortSettings(url=""), body)


def test_bytes_go_out_under_the_settings_the_guest_set_before_them() -> None:
    """LCR, THR, LCR, THR in one batch: each byte is written after its own line setting."""

    async def body(g: Guest, fake: FakeOps, master: int) -> None:
        g.setup()
        await g.end_batch()
        fake.calls.clear()
        for lcr, byte in ((0x02, b"a"), (0x1B, b"b"), (0x03, b"c")):  # 7N1, 8E1, 8N1
            g.uart.write(3, lcr)
            g.pump()
            g.uart.write(0, byte[0])
            g.pump()
        await g.end_batch()
        cflag_before: dict[bytes, int] = {}
        cflag = None
        for kind, value in fake.calls:
            if kind == "tcsetattr":
                cflag = value
            elif kind == "tx":
                assert isinstance(value, bytes) and cflag is not None
                for b in value:
                    cflag_before[bytes((b,))] = cflag
        assert cflag_before[b"a"] & termios.CSIZE == termios.CS7
        assert not cflag_before[b"a"] & termios.PARENB
        assert cflag_before[b"b"] & termios.CSIZE == termios.CS8
        assert cflag_before[b"b"] & termios.PARENB
        assert not cflag_before[b"c"] & termios.PARENB
        assert read_available(master) == b"abc"

    _run(PortSettings(url=""), body)


def test_a_break_keeps_its_place_among_the_bytes() -> None:
    """THR a, break on, THR b, break off, THR c, break on+off in one batch: the port sees a,
    break, b, no break, c, and the last break as a pulse."""

    async def body(g: Guest, fake: FakeOps, master: int) -> None:
        g.setup()
        await g.end_batch()
        fake.calls.clear()
        for offset, value in ((0, ord("a")), (3, 0x43), (0, ord("b")), (3, 0x03),
                              (0, ord("c")), (3, 0x43), (3, 0x03)):
            g.uart.write(offset, value)
            g.pump()
        await g.end_batch()
        seen = [c for c in fake.calls if c[0] in ("tx", "break")]
        assert seen == [("tx", b"a"), ("break", True), ("tx", b"b"), ("break", False),
                        ("tx", b"c"), ("break", True), ("break", False)]
        assert not [c for c in fake.calls if c[0] == "tcsetattr"]  # only the break changed

    _run(PortSettings(url=""), body)


def test_a_stalled_port_sees_no_write_attempt_per_thr_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a socat pty stalls (its peer does not read), a guest flooding THR costs no
    os.write per byte: the link waits for POLLOUT, which transmits."""
    attempts = [0]
    real_write = _FdIo.write

    def counting_write(self: _FdIo, data: bytes) -> int:
        attempts[0] += 1
        return real_write(self, data)

    monkeypatch.setattr(_FdIo, "write", counting_write)

    async def run() -> None:
        with socat_pair(tmp_path) as s, raw_peer(s.b) as peer:
            g = Guest(PortSettings(url=str(s.a)))
            await g.link.open()
            g.setup()
            big = bytes(range(256)) * 400
            sent = await g.send(big, timeout_s=3.0)
            assert sent < len(big) and g.link.reader_state is ReaderState.STALLED
            before = attempts[0]
            for i in range(300):  # a guest ignoring THRE: every write is a bus operation
                g.uart.write(0, i & 0xFF)
                g.pump()
            assert attempts[0] - before <= 1, attempts[0] - before
            assert g.uart.statistics().tx_overwrites > 0  # the guest's own fault, counted
            read_available(peer)  # the peer reads again: the waiting bytes go out
            assert await wait_for(lambda: read_available(peer) or g.lsr() & Lsr.TEMT, 5)
            await g.link.close()

    asyncio.run(run())


# -- the output queue of a serial port ---------------------------------------------------------


def test_the_output_queue_is_kept_short_and_rechecked_at_the_character_time() -> None:
    """With TIOCOUTQ at the limit nothing is written (and the link does not spin checking);
    with room for 4 bytes at most 4 go at once; with an empty queue the rest goes out."""

    async def body(g: Guest, fake: FakeOps, master: int) -> None:
        _at_115200_8n1(g)
        await g.end_batch()
        limit = uartbridge.port.link.OUTQ_MIN_BYTES
        fake.outq = limit
        checks = [0]
        real = fake.output_queued

        def counted(fd: int) -> int:
            checks[0] += 1
            return real(fd)

        fake.output_queued = counted  # type: ignore[method-assign]
        assert await g.send(b"0123456789abcdef", timeout_s=1) == 16
        await asyncio.sleep(0.3)
        assert read_available(master) == b""
        assert g.link.reader_state is ReaderState.CONNECTED  # paced, not stalled (< 1 s)
        # 115200 8N1: re-checked every ~2.8 ms (half the queue), not in a loop.
        assert 20 <= checks[0] <= 400, checks[0]
        fake.calls.clear()
        fake.outq = limit - 4
        assert await wait_for(lambda: g.lsr() & Lsr.TEMT, 2)
        chunks = [v for k, v in fake.calls if k == "tx"]
        assert b"".join(chunks) == b"0123456789abcdef"  # type: ignore[arg-type]
        assert max(len(c) for c in chunks) <= 4  # type: ignore[arg-type]
        fake.outq = 0
        assert await g.send(b"more", timeout_s=1) == 4
        assert await wait_for(lambda: g.lsr() & Lsr.TEMT, 2)
        assert read_available(master) == b"0123456789abcdefmore"

    _run(PortSettings(url=""), body)


def test_an_output_queue_that_does_not_drain_is_a_stalled_reader(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TIOCOUTQ stuck at the limit for WRITE_STALL_S: stalled (TEMT 0, one refusal counted);
    once it drains, connected again and every byte goes out in order."""
    monkeypatch.setattr(uartbridge.port.link, "WRITE_STALL_S", 0.2)

    async def body(g: Guest, fake: FakeOps, master: int) -> None:
        g.setup()
        await g.end_batch()
        fake.outq = 10_000
        assert await g.send(b"held back", timeout_s=1) == 9
        assert await wait_for(lambda: g.link.reader_state is ReaderState.STALLED, 2)
        st = g.uart.state()
        assert not st.lsr & Lsr.TEMT and st.tsr_retry == 1
        await asyncio.sleep(0.3)
        assert g.uart.state().tsr_retry == 1  # no refusal per check
        fake.outq = 0
        assert await wait_for(lambda: g.link.reader_state is ReaderState.CONNECTED, 2)
        assert await wait_for(lambda: g.lsr() & Lsr.TEMT, 2)
        assert read_available(master) == b"held back"

    _run(PortSettings(url=""), body)


# -- a stop on a serial port: nothing left in the kernel -------------------------------------


def _capture_log() -> tuple[Any, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []

    def capture(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        events.append(dict(event))
        raise structlog.DropEvent

    return structlog.wrap_logger(None, processors=[capture]), events


@pytest.mark.parametrize("in_flight", [0, 2])
def test_a_stop_takes_back_what_the_kernel_could_not_send(
    monkeypatch: pytest.MonkeyPatch, in_flight: int
) -> None:
    """A wire that does not drain: quiesce gives up after its bounded wait, suspends output,
    and puts the bytes TIOCOUTQ still counts (the last ones written; not those a flush cannot
    drop) back at the front of tx_backlog, before what was there: nothing lost."""
    monkeypatch.setattr(uartbridge.port.link, "DRAIN_TIMEOUT_S", 0.2)
    fake = FakeOps()
    fake.drain_gate = threading.Event()
    log, events = _capture_log()
    fake.tx_empty = False

    def flush(fd: int) -> None:
        fake.calls.append(("flush", fake.outq))
        fake.outq = in_flight

    fake.flush_output = flush  # type: ignore[method-assign]

    async def body(g: Guest, ops: FakeOps, master: int) -> None:
        _at_115200_8n1(g)
        await g.end_batch()
        ops.outq = 0
        try:
            assert await g.send(b"0123456789", timeout_s=1) == 10
            assert await wait_for(lambda: g.lsr() & Lsr.TEMT, 2)
            assert read_available(master) == b"0123456789"
            ops.outq = 6  # "6789" and "45" never left the kernel
            t0 = time.monotonic()
            await asyncio.wait_for(g.link.quiesce(), 5)
            assert time.monotonic() - t0 < 2  # the bounded wait, not the wire
        finally:
            ops.drain_gate.set()  # type: ignore[union-attr]
        order = [c for c in ops.calls if c[0] in ("tcflow", "flush")]
        assert order == [("tcflow", termios.TCOOFF), ("flush", 6), ("tcflow", termios.TCOON)]
        state = g.link.state()
        taken = 6 - in_flight
        assert state.tx_backlog == b"0123456789"[10 - taken:]
        assert state.counters.tx_reclaimed == taken
        assert any(e["event"] == "port.tx_reclaimed" for e in events)
        assert any(e["event"] == "port.transmitter_not_empty" for e in events)

    on_fake_with(PortSettings(url=""), body, fake, trace=_tracing(fake), log=log)


def test_a_stop_saves_the_kernel_input_into_rx_backlog_up_to_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Input waiting in a serial port's kernel queue at a stop (more than rx_backlog_bytes
    lets the link read while running) is read into rx_backlog, in order, up to the format's
    bound; what is beyond it is counted as dropped at stop."""
    monkeypatch.setattr(uartbridge.port.link, "MAX_RX_BACKLOG_BYTES", 3000)

    async def body(g: Guest, fake: FakeOps, master: int) -> None:
        g.setup()  # the guest never reads: FIFO full, the backlog full, the rest in the kernel
        await g.end_batch()
        stream = bytes(i % 251 for i in range(4000))
        os.write(master, stream)
        assert await wait_for(lambda: len(g.link.state().rx_backlog) >= 1000 - 16, 2)
        await asyncio.sleep(0.1)
        await g.link.quiesce()
        state = g.link.state()
        fifo = g.uart.state().rx_fifo
        assert fifo + state.rx_backlog == stream[: len(fifo) + len(state.rx_backlog)]
        assert len(state.rx_backlog) >= 3000 - 2 - 16
        counters = state.counters
        assert counters.rx_saved_at_stop > 0
        assert len(fifo) + len(state.rx_backlog) + counters.rx_dropped_at_stop == len(stream)

    on_fake_with(PortSettings(url="", rx_backlog_bytes=1000), body)
