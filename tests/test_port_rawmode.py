"""What a tty gets when the link takes it: raw at once, every byte read under its own mode.

On socat ptys (the real thing): bytes the peer sent before the open, before the guest's first
LCR write and right after a socat restart arrive exactly; a cooked pty with echo is made raw
before anything is read. On a fake serial port (``FakeOps``: the termios calls are faked, the
bytes run through a real pty, whose kernel never escapes them) the PARMRK boundary: the
bytes queued before PARMRK was on are counted and read as they are, the rest decoded.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import termios
import time
import tty
from pathlib import Path
from typing import Any

from _port_support import (
    FakeOps,
    Guest,
    need,
    raw_peer,
    read_available,
    socat_pair,
    wait_for,
)

from uartbridge.port.state import PortSettings, PortState, ReaderState
from uartbridge.registers import Ier, Lsr

# The example first, then every byte value, then flow-control and escape look-alikes.
DENSE = (
    bytes.fromhex("41 ff ff 42 ff 00 43 44 ff 00 00 45")
    + bytes(range(256))
    + b"\x11\x13\xff\x00\x00\x13\x11\xff\xff\xff\x00\x01\x00\xff"
)


def _no_line_events(g: Guest) -> None:
    """Nothing read was taken for a break or a line error, in the link or in the device."""
    counters: Any = g.link.status()["counters"]
    assert counters["breaks_received"] == counters["framing_errors"] == 0
    assert counters["parity_errors"] == 0
    stats = g.uart.statistics()
    assert stats.breaks == stats.line_errors == 0


def test_bytes_sent_before_the_open_arrive_exactly(tmp_path: Path) -> None:
    """A peer that talked before the link opened its socat pty: every byte, no phantom mark."""

    async def run() -> None:
        with socat_pair(tmp_path) as s, raw_peer(s.b) as peer:
            os.write(peer, DENSE)
            await asyncio.sleep(0.2)  # socat has moved them into the link's pty
            g = Guest(PortSettings(url=str(s.a)))
            g.fifos_on()  # (a FIFO reset after bytes came in would flush them: rx_flushed)
            await g.link.open()
            g.set_line(ier=Ier.RLSI)
            assert await g.receive(len(DENSE)) == DENSE
            _no_line_events(g)
            await g.link.close()

    asyncio.run(run())


def test_bytes_sent_before_the_first_lcr_write_arrive_exactly(tmp_path: Path) -> None:
    """Open first, the peer talks, and only then the guest sets the line: exactly what was sent."""

    async def run() -> None:
        with socat_pair(tmp_path) as s, raw_peer(s.b) as peer:
            g = Guest(PortSettings(url=str(s.a)))
            g.fifos_on()
            await g.link.open()
            os.write(peer, DENSE)
            await asyncio.sleep(0.2)
            g.set_line(ier=Ier.RLSI)  # the first LCR write
            await g.end_batch()
            os.write(peer, DENSE)
            assert await g.receive(2 * len(DENSE)) == 2 * DENSE
            _no_line_events(g)
            await g.link.close()

    asyncio.run(run())


def test_bytes_sent_right_after_a_socat_restart_arrive_exactly(tmp_path: Path) -> None:
    """socat restarted and the peer talking at once (before the link reopened): every byte."""

    async def run() -> None:
        with socat_pair(tmp_path) as s:
            g = Guest(PortSettings(url=str(s.a), reconnect_min_s=0.3))
            await g.link.open()
            g.setup(ier=Ier.RLSI)
            await g.end_batch()
            s.stop()
            assert await wait_for(lambda: g.link.reader_state is ReaderState.DISCONNECTED, 2)
            s.start()
            with raw_peer(s.b) as peer:
                os.write(peer, DENSE)  # queued in the new pty before the link reopens it
                assert g.link.reader_state is ReaderState.DISCONNECTED
                assert await g.receive(len(DENSE), timeout_s=10) == DENSE
            _no_line_events(g)
            assert g.link.status()["counters"]["reconnects"] == 1  # type: ignore[index]
            await g.link.close()

    asyncio.run(run())


def test_a_cooked_pty_with_echo_is_made_raw_at_open(tmp_path: Path) -> None:
    """A pty left cooked with echo (`stty sane`): from the open on, no echo, no CR→LF, no
    signals, no line editing, no output translation; a partial line queued before is kept."""
    stty = need("stty")

    async def run() -> None:
        with socat_pair(tmp_path) as s, raw_peer(s.b) as peer:
            subprocess.run([stty, "-F", str(s.a), "sane"], check=True, timeout=5)
            probe = os.open(s.a, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            try:
                lflag = termios.tcgetattr(probe)[3]
                assert lflag & termios.ECHO and lflag & termios.ICANON
                os.write(peer, b"xyz")  # a partial line: canonical mode holds it back
                await asyncio.sleep(0.2)
                read_available(peer)  # the kernel echoed it (before the link owned the pty)
                g = Guest(PortSettings(url=str(s.a)))
                g.fifos_on()
                await g.link.open()
                iflag, oflag, cflag, lflag = termios.tcgetattr(probe)[:4]
                for flag in (termios.ECHO, termios.ICANON, termios.ISIG, termios.IEXTEN):
                    assert not lflag & flag
                for flag in (termios.ICRNL, termios.INLCR, termios.IGNCR, termios.IXON,
                             termios.ISTRIP):
                    assert not iflag & flag
                assert not oflag & termios.OPOST
                assert not cflag & termios.HUPCL and cflag & termios.CLOCAL
                assert not iflag & termios.PARMRK  # a pty marks nothing: left as it was
                os.write(peer, b"abc\rdef\x03\x1a\x7f\x15\x04")  # before the first LCR write
                await asyncio.sleep(0.2)
                g.set_line()
                sent = b"xyz" + b"abc\rdef\x03\x1a\x7f\x15\x04"
                assert await g.receive(len(sent)) == sent
                assert read_available(peer) == b""  # nothing echoed since the open
                assert await g.send(b"line\n") == 5
                got = bytearray()
                assert await wait_for(lambda: got.extend(read_available(peer)) or got, 2)
                await asyncio.sleep(0.05)
                got += read_available(peer)
                assert bytes(got) == b"line\n"  # not "line\r\n" (ONLCR)
                await g.link.close()
            finally:
                os.close(probe)

    asyncio.run(run())


def _fake_serial_run(test: Any, fake: FakeOps | None = None, *, before: bytes = b"",
                     state: PortState | None = None) -> None:
    """Run ``test(guest, fake, master)`` on a pty the link takes as a serial port (FakeOps),
    with ``before`` queued first and the link restored from ``state``."""

    async def run() -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        ops = fake or FakeOps()
        try:
            if before:
                os.write(master, before)
                _wait_queued(slave, len(before))
            g = Guest(PortSettings(url=os.ttyname(slave)), termios_ops=ops)
            g.setup(lcr=0x1B, ier=Ier.RLSI)  # the device as resumed: 8E1, FIFOs on
            if state is not None:
                g.link.restore(state)
            await g.link.open()
            await test(g, ops, master)
            await g.link.close()
        finally:
            os.close(master)
            os.close(slave)

    asyncio.run(run())


def _wait_queued(fd: int, count: int) -> None:
    """Until the tty ``fd``'s line discipline has queued ``count`` bytes (a pty's master write
    reaches it through a kernel worker, a moment later)."""
    deadline = time.monotonic() + 5
    while FakeOps().input_queued(fd) < count:
        assert time.monotonic() < deadline, "the pty never queued the bytes"
        time.sleep(0.001)


def _read_with_errors(g: Guest) -> list[tuple[int, int]]:
    seen = []
    while (lsr := g.uart.read(5)) & Lsr.DR:
        seen.append((lsr & (Lsr.PE | Lsr.FE | Lsr.BI), g.uart.read(0)))
        g.pump()
    return seen


def test_serial_port_reads_bytes_queued_before_parmrk_as_they_are() -> None:
    """Serial port: PARMRK goes on at open; what was queued before is counted and read as it
    is, what came after is decoded (a parity error still reaches LSR on its own byte)."""

    async def body(g: Guest, fake: FakeOps, master: int) -> None:
        assert g.link.status()["parmrk"] is True
        assert fake.attrs is not None and fake.attrs[0] & termios.PARMRK
        assert fake.attrs[0] & termios.INPCK and not fake.attrs[2] & termios.HUPCL
        os.write(master, b"A\xff\x00Q\xff\xffZ")  # as the kernel queues it under PARMRK
        seen: list[tuple[int, int]] = []
        want = len(DENSE) + 4
        assert await wait_for(lambda: seen.extend(_read_with_errors(g)) or len(seen) >= want, 5)
        assert bytes(c for _, c in seen) == DENSE + b"AQ\xffZ"
        assert [e for e, _ in seen[: len(DENSE)]] == [0] * len(DENSE)
        assert [e for e, _ in seen[len(DENSE):]] == [0, Lsr.PE, 0, 0]
        counters: Any = g.link.status()["counters"]
        assert counters["parity_errors"] == 1 and counters["rx_escape_uncertain"] == 0

    _fake_serial_run(body, before=DENSE)


class _ArrivingDuringTheSwitch(FakeOps):
    """A serial port where ``during`` arrives while PARMRK is being turned on (the race)."""

    def __init__(self, master: list[int], during: bytes) -> None:
        super().__init__()
        self._master, self._during = master, during

    def tcsetattr(self, fd: int, attrs: list[Any]) -> None:
        super().tcsetattr(fd, attrs)
        if attrs[0] & termios.PARMRK and self._during:
            queued = self.input_queued(fd)
            os.write(self._master[0], self._during)
            _wait_queued(fd, queued + len(self._during))  # in the queue before the 2nd count
            self._during = b""


def _switch_race(during: bytes) -> tuple[bytes, Any]:
    got: dict[str, Any] = {}

    async def run() -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        try:
            g = Guest(PortSettings(url=os.ttyname(slave)),
                      termios_ops=_ArrivingDuringTheSwitch([master], during))
            await g.link.open()
            g.setup()
            got["data"] = await g.receive(len(during.replace(b"\xff\xff", b"\xff")))
            got["counters"] = g.link.status()["counters"]
            await g.link.close()
        finally:
            os.close(master)
            os.close(slave)

    asyncio.run(run())
    return got["data"], got["counters"]


def test_bytes_that_come_in_during_the_switch_are_counted_only_if_they_could_be_misread() -> None:
    """The open counts the queue on both sides of the PARMRK switch: bytes between the two
    counts are read as escaped; with no 0xFF among them that is exact, with one it is counted."""
    data, counters = _switch_race(b"plain text")
    assert data == b"plain text" and counters["rx_escape_uncertain"] == 0
    data, counters = _switch_race(b"x\xff\xffy")
    assert data == b"x\xffy"  # read as escaped (a doubled 0xFF)
    assert counters["rx_escape_uncertain"] == 4


def test_a_half_read_mark_is_saved_in_the_checkpoint_and_continued_after_restore() -> None:
    """The decoder's half-read PARMRK mark goes into the checkpoint (rx_escape) and a restored
    link finishes it with the bytes that follow: the error lands on its own byte."""
    saved: dict[str, PortState] = {}

    async def first(g: Guest, fake: FakeOps, master: int) -> None:
        os.write(master, b"ab\xff")  # cut inside a mark (the rest never came: the fake pty)
        assert await wait_for(lambda: g.link.state().rx_escape == b"\xff", 2)
        saved["state"] = g.link.state()
        assert await g.receive(2) == b"ab"

    _fake_serial_run(first)
    state = saved["state"]
    assert state.rx_escape == b"\xff"

    async def second(g: Guest, fake: FakeOps, master: int) -> None:
        os.write(master, b"\x00Qc")  # the mark's rest: a parity error on Q
        seen: list[tuple[int, int]] = []
        assert await wait_for(lambda: seen.extend(_read_with_errors(g)) or len(seen) >= 2, 2)
        assert seen == [(Lsr.PE, ord("Q")), (0, ord("c"))]
        assert g.link.state().rx_escape == b""

    _fake_serial_run(second, state=PortState(rx_escape=state.rx_escape))
