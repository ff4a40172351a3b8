"""Line settings, breaks, errors and modem lines: PARMRK parsing and a fake port.

The fake (``FakeOps``) replaces only the termios/modem-ioctl calls (``TermiosOps``), for what
a pty cannot show: data bits, parity, stop bits, break, DTR/RTS and CTS/DSR/RI/DCD. The byte
path still runs on a real pty.
"""

from __future__ import annotations

import asyncio
import os
import termios
import threading
import tty
from typing import Any

import pytest
from _port_support import FakeOps, Guest, on_fake_with, read_available, send_and_collect, wait_for

import uartbridge.port.link
from uartbridge.port.state import PortSettings, PortState, ReaderState
from uartbridge.port.termios_ops import (
    CMSPAR,
    TIOCM_CD,
    TIOCM_CTS,
    TIOCM_DTR,
    TIOCM_RTS,
    ParmrkDecoder,
    nearest_baud,
)
from uartbridge.registers import Ier, Lsr, Msr


def test_parmrk_decoder_break_error_and_escaped_ff_across_reads() -> None:
    """ff 00 00 is a break, ff 00 X an error on X, ff ff a literal 0xff, split anywhere."""
    stream = b"a\xff\xffb\xff\x00\x00c\xff\x00Zd\xff\xff"
    whole = ParmrkDecoder().feed(stream)
    assert whole == [("data", b"a\xffb"), ("break", None), ("data", b"c"), ("error", 0x5A),
                     ("data", b"d\xff")]
    for split in range(1, len(stream)):
        dec = ParmrkDecoder()
        items = dec.feed(stream[:split]) + dec.feed(stream[split:])
        merged: list[Any] = []
        for item in items:
            if merged and item[0] == "data" and merged[-1][0] == "data":
                merged[-1] = ("data", merged[-1][1] + item[1])
            else:
                merged.append(item)
        assert merged == whole, split
    dec = ParmrkDecoder()
    assert dec.feed(b"x\xff") == [("data", b"x")] and dec.partial == b"\xff"


def test_nearest_standard_baud() -> None:
    """A guest's divisor-derived baud becomes the nearest standard rate."""
    assert nearest_baud(115200) == 115200
    assert nearest_baud(3500) == 4800
    assert nearest_baud(9615) == 9600
    assert nearest_baud(1) == 50


def _with_fake(test: Any) -> None:
    on_fake_with(PortSettings(url=""), test)


def test_fake_port_gets_data_bits_parity_stop_bits_baud_and_break() -> None:
    """LCR/divisor become CS7, mark parity, CSTOPB and B9600 (TCSANOW); LCR.SBC drives break."""

    async def body(g: Guest, fake: FakeOps, master: int) -> None:
        g.uart.write(3, 0x80)
        g.uart.write(0, 12)  # 115200 / 12 = 9600
        g.uart.write(1, 0)
        g.setup(lcr=0x2E)  # 7 data bits, 2 stop, parity enabled, stick → mark
        await g.end_batch()
        assert fake.attrs is not None
        cflag = fake.attrs[2]
        assert cflag & termios.CSIZE == termios.CS7
        assert cflag & (termios.PARENB | termios.PARODD | CMSPAR) == (
            termios.PARENB | termios.PARODD | CMSPAR
        )
        assert cflag & termios.CSTOPB
        assert fake.attrs[4] == fake.attrs[5] == termios.B9600
        assert fake.attrs[0] & termios.PARMRK and fake.attrs[0] & termios.INPCK
        assert g.link.status()["settings_refused"] == []
        g.setup(lcr=0x2E | 0x40)
        await g.end_batch()
        g.setup(lcr=0x2E)
        await g.end_batch()
        assert fake.breaks == [True, False]

    _with_fake(body)


def test_fake_port_refusal_is_counted_once_per_apply() -> None:
    """A setting the port rejects with EINVAL is counted and shown; the rest still applies."""

    async def body(g: Guest, fake: FakeOps, master: int) -> None:
        fake.refuse_mask = termios.PARENB
        g.setup(lcr=0x1F)  # 8 data bits, 2 stop, even parity
        await g.end_batch()
        status = g.link.status()
        assert status["settings_refused"] == ["parity=E"]
        assert fake.attrs is not None and fake.attrs[2] & termios.CSTOPB
        assert status["counters"]["settings_refused"] == 1  # type: ignore[index]

    _with_fake(body)


def test_fake_port_modem_lines_reach_msr_with_deltas() -> None:
    """MCR DTR/RTS reach the port; CTS/DSR/DCD changes show in MSR with delta bits (MSI poll)."""

    async def body(g: Guest, fake: FakeOps, master: int) -> None:
        g.setup(mcr=0x0B, ier=Ier.MSI)
        assert fake.modem & TIOCM_DTR and fake.modem & TIOCM_RTS
        g.uart.write(4, 0x08)  # drop DTR and RTS
        g.pump()
        assert not fake.modem & (TIOCM_DTR | TIOCM_RTS)
        g.uart.read(6)  # clear deltas
        fake.modem &= ~(TIOCM_CTS | TIOCM_CD)
        assert await wait_for(lambda: g.uart.irq, 1.0)
        msr = g.uart.read(6)
        assert msr & Msr.DCTS and msr & Msr.DDCD
        assert not msr & Msr.CTS and not msr & Msr.DCD and msr & Msr.DSR

    _with_fake(body)


def test_fake_port_line_error_and_break_reach_lsr() -> None:
    """A PARMRK-marked error and break set LSR.FE / LSR.BI when their own character is next."""

    async def body(g: Guest, fake: FakeOps, master: int) -> None:
        g.setup(ier=Ier.RLSI)
        # The pty cannot generate marks; write them as the kernel would put them in the queue.
        os.write(master, b"A\xff\x00Q")
        assert await wait_for(lambda: g.uart.state().lsr & Lsr.DR, 1.0)
        # "A" came first and is clean; the error belongs to "Q" and shows when "Q" is next.
        assert not g.uart.irq and not g.uart.read(5) & Lsr.FE
        assert g.uart.read(0) == ord("A")
        g.pump()
        assert await wait_for(lambda: g.uart.irq, 1.0)
        assert g.uart.read(5) & Lsr.FE
        assert g.uart.read(0) == ord("Q")
        os.write(master, b"\xff\x00\x00")
        assert await wait_for(lambda: g.uart.irq, 1.0)
        assert g.uart.read(5) & Lsr.BI
        assert g.uart.read(0) == 0  # the break's NUL
        counters = g.link.status()["counters"]
        assert counters["framing_errors"] == 1 and counters["breaks_received"] == 1  # type: ignore[index]

    _with_fake(body)


def test_error_and_break_behind_a_full_fifo_keep_their_place_in_the_stream() -> None:
    """With the FIFO full and bytes waiting, a parity error and a break reach the guest in order."""

    async def body(g: Guest, fake: FakeOps, master: int) -> None:
        g.setup(lcr=0x1B, ier=Ier.RLSI)  # 8E1: a marked character is a parity error
        head = bytes(range(0x41, 0x41 + 16))
        os.write(master, head + b"bcd" + b"\xff\x00X" + b"e" + b"\xff\x00\x00" + b"f")
        # The FIFO takes what the model offers (QEMU's can_receive rule); the rest, with the
        # error's and the break's places in it, waits in the link's backlog.
        assert await wait_for(lambda: g.link.state().rx_backlog.endswith(b"bcdXef"), 1.0)
        seen: list[tuple[int, int]] = []  # (LSR error bits, character), as a driver reads them
        deadline = asyncio.get_running_loop().time() + 5
        while len(seen) < 16 + 3 + 1 + 1 + 1 + 1 and asyncio.get_running_loop().time() < deadline:
            lsr = g.uart.read(5)
            if lsr & Lsr.DR:
                seen.append((lsr & (Lsr.PE | Lsr.FE | Lsr.BI), g.uart.read(0)))
                g.pump()
            else:
                await asyncio.sleep(0.005)
        expected = [(0, c) for c in head + b"bcd"]
        expected += [(Lsr.PE, ord("X")), (0, ord("e")), (Lsr.BI, 0), (0, ord("f"))]
        assert seen == expected
        counters = g.link.status()["counters"]
        assert counters["parity_errors"] == 1 and counters["breaks_received"] == 1  # type: ignore[index]

    _with_fake(body)

def test_quiesce_holds_the_peer_back_and_drains() -> None:
    """quiesce: RTS drops under rtscts, XOFF goes out under xonxoff, tcdrain runs, the guest
    gets nothing more; on a serial port later input is kept for the checkpoint instead."""

    async def run() -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        fake = FakeOps()
        try:
            settings = PortSettings(url=os.ttyname(slave), rtscts=True, xonxoff=True)
            g = Guest(settings, termios_ops=fake)
            await g.link.open()
            g.setup(mcr=0x0B)
            assert fake.modem & TIOCM_RTS
            await g.link.quiesce()
            assert not fake.modem & TIOCM_RTS
            assert fake.flow == [termios.TCIOFF]
            assert fake.drains == 1
            os.write(master, b"after quiesce")
            await asyncio.sleep(0.05)
            assert g.uart.read(5) & Lsr.DR == 0  # nothing reaches the guest once quiesced
            # A serial port's last close would discard it: the checkpoint takes it (issue 10).
            assert g.link.state().rx_backlog == b"after quiesce"
            assert g.uart.read(5) & Lsr.DR == 0
            await g.link.close()
        finally:
            os.close(master)
            os.close(slave)

    asyncio.run(run())


def test_cts_low_under_rtscts_stalls_at_once_and_cts_high_delivers_in_order() -> None:
    """rtscts: CTS low holds every byte in the UART (TEMT=0, tsr_retry>0) without spinning."""

    async def body(g: Guest, fake: FakeOps, master: int) -> None:
        g.setup()
        fake.modem &= ~TIOCM_CTS
        payload = bytes(range(40))
        sent = await g.send(payload, timeout_s=0.3)
        assert sent == 16  # TSR + 15 in the FIFO, then the guest is held back
        assert g.link.reader_state is ReaderState.STALLED
        st = g.uart.state()
        assert not st.lsr & Lsr.TEMT and st.tsr_retry > 0
        assert read_available(master) == b""  # nothing parked in the kernel's buffer
        reads = fake.modem_reads
        await asyncio.sleep(0.3)
        # CTS is re-read on a 10 ms timer while it holds data back (about 30 reads here);
        # a writable fd left on the loop would make that thousands.
        assert fake.modem_reads - reads < 200
        fake.modem |= TIOCM_CTS
        assert await send_and_collect(g, payload[sent:], master, len(payload)) == payload
        assert await wait_for(lambda: g.link.reader_state is ReaderState.CONNECTED)

    on_fake_with(PortSettings(url="", rtscts=True), body)


def test_quiesce_gives_up_on_a_drain_the_peer_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tcdrain held up by the peer's flow control ends quiesce after DRAIN_TIMEOUT_S."""
    monkeypatch.setattr(uartbridge.port.link, "DRAIN_TIMEOUT_S", 0.2)
    fake = FakeOps()
    fake.drain_gate = threading.Event()

    async def body(g: Guest, ops: FakeOps, master: int) -> None:
        g.setup()
        try:
            await asyncio.wait_for(g.link.quiesce(), 5)
            assert ops.drains == 1
        finally:
            ops.drain_gate.set()  # type: ignore[union-attr]

    on_fake_with(PortSettings(url=""), body, fake)


def test_xonxoff_is_read_by_the_link_not_by_ixon() -> None:
    """xonxoff: IXOFF on, IXON off; XOFF/XON leave the data stream, an error on 0x13 stays."""

    async def body(g: Guest, fake: FakeOps, master: int) -> None:
        g.setup(lcr=0x1B)  # 8E1
        await g.end_batch()
        assert fake.attrs is not None
        assert fake.attrs[0] & termios.IXOFF and not fake.attrs[0] & termios.IXON
        os.write(master, b"a\x13b\xff\x00\x13c")  # XOFF, then a parity error on a 0x13 byte
        assert await g.receive(4) == b"ab\x13c"
        assert await g.send(b"held", timeout_s=0.2) == 4  # into the device: TSR + FIFO
        assert g.link.status()["held_by_peer"] == "xoff"
        assert read_available(master) == b""
        os.write(master, b"\x11")
        got = bytearray()
        assert await wait_for(lambda: got.extend(read_available(master)) or got == b"held", 2)
        assert g.link.status()["held_by_peer"] is None

    on_fake_with(PortSettings(url="", xonxoff=True), body)


def test_line_events_saved_in_a_checkpoint_come_back_in_their_place() -> None:
    """A link restored with rx_marks delivers the error and the break where they were."""

    async def run() -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        try:
            g = Guest(PortSettings(url=os.ttyname(slave)), termios_ops=FakeOps())
            # The device as restored: FIFOs on, 8E1, RLSI (the daemon restores the model first).
            for offset, value in ((2, 0x07), (3, 0x1B), (4, 0x0B), (1, Ier.RLSI)):
                g.uart.write(offset, value)
            g.link.restore(PortState(rx_backlog=b"bcdXef", rx_marks=((3, "parity"), (5, "break"))))
            await g.link.open()
            g.pump()
            seen = []
            for _ in range(7):
                lsr = g.uart.read(5)
                assert lsr & Lsr.DR
                seen.append((lsr & (Lsr.PE | Lsr.BI), g.uart.read(0)))
                g.pump()
            assert seen == [(0, ord("b")), (0, ord("c")), (0, ord("d")), (Lsr.PE, ord("X")),
                            (0, ord("e")), (Lsr.BI, 0), (0, ord("f"))]
            assert g.link.state().rx_marks == ()
            await g.link.close()
        finally:
            os.close(master)
            os.close(slave)

    asyncio.run(run())
