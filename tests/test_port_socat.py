"""The port link against real socat ptys: stalls, disconnects, reconnects, policies."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from _port_support import (
    Guest,
    raw_peer,
    read_available,
    send_and_collect,
    socat_pair,
    wait_for,
)

from uartbridge.port.state import PortSettings, ReaderState
from uartbridge.registers import Lsr

PATTERN = bytes(range(256)) * 200  # 51200 bytes, includes 0xff (PARMRK-escaped on input)


def test_stalled_reader_backpressures_then_delivers_everything(tmp_path: Path) -> None:
    """A far end that is open but not reading stalls the UART (TEMT=0, tsr_retry>0) losslessly."""

    async def run() -> None:
        with socat_pair(tmp_path) as s, raw_peer(s.b) as peer:
            g = Guest(PortSettings(url=str(s.a)))
            await g.link.open()
            g.setup()
            sent = await g.send(PATTERN, timeout_s=2.0)
            assert sent < len(PATTERN), "socat absorbed everything: no stall seen"
            assert g.link.reader_state is ReaderState.STALLED
            st = g.uart.state()
            assert not st.lsr & Lsr.TEMT
            assert st.tsr_retry > 0
            absorbed = g.link.status()["counters"]["bytes_written"]  # type: ignore[index]
            print(f"socat pty absorbed {absorbed} bytes before stalling")
            got = await send_and_collect(g, PATTERN[sent:], peer, len(PATTERN), 20.0)
            assert got == PATTERN
            assert await wait_for(lambda: g.link.reader_state is ReaderState.CONNECTED)
            await g.link.close()

    asyncio.run(run())


def test_bytes_both_ways_including_0xff(tmp_path: Path) -> None:
    """Bytes the peer writes (0xff included, PARMRK-escaped by the kernel) reach RBR once each."""

    async def run() -> None:
        with socat_pair(tmp_path) as s, raw_peer(s.b) as peer:
            g = Guest(PortSettings(url=str(s.a)))
            await g.link.open()
            g.setup()
            data = bytes(range(256)) * 4
            os.write(peer, data)
            assert await g.receive(len(data)) == data
            assert g.link.status()["counters"]["bytes_read"] == len(data)  # type: ignore[index]
            await g.link.close()

    asyncio.run(run())


async def _kill_and_restart(tmp_path: Path, policy: str) -> tuple[Guest, bytes, bytes]:
    """Send while socat is gone and back; returns the guest, what was sent, what arrived."""
    with socat_pair(tmp_path, policy) as s:
        g = Guest(PortSettings(url=str(s.a), on_disconnect=policy))  # type: ignore[arg-type]
        await g.link.open()
        g.setup()
        s.stop(kill=False)
        t0 = time.monotonic()
        assert await wait_for(lambda: g.link.reader_state is ReaderState.DISCONNECTED, 1.0)
        print(f"{policy}: disconnect seen after {time.monotonic() - t0:.3f} s")
        before = g.uart.state().msr
        assert not before & 0x80 and not before & 0x20  # DCD and DSR fell (no modem lines)
        cpu0 = time.process_time()
        await asyncio.sleep(3.0)
        cpu = time.process_time() - cpu0
        print(f"{policy}: CPU while disconnected: {cpu:.3f} s over 3 s")
        assert cpu <= 0.15
        payload = bytes(range(256)) * 8
        sent = await g.send(payload, timeout_s=1.0)
        assert sent == len(payload)
        s.start()
        with raw_peer(s.b) as peer:
            t0 = time.monotonic()
            assert await wait_for(lambda: g.link.reader_state is not ReaderState.DISCONNECTED, 2.0)
            print(f"{policy}: reconnect seen after {time.monotonic() - t0:.3f} s")
            tail = b"after-reconnect"
            assert await g.send(tail) == len(tail)
            got = bytearray()
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                got += read_available(peer)
                if got.endswith(tail):
                    break
                await asyncio.sleep(0.01)
            await g.link.close()
            return g, payload + tail, bytes(got)


def test_disconnect_buffer_replays_in_order(tmp_path: Path) -> None:
    """socat killed: disconnected fast, idle CPU, and with `buffer` every byte arrives in order."""
    g, sent, got = asyncio.run(_kill_and_restart(tmp_path, "buffer"))
    assert got == sent
    counters = g.link.status()["counters"]
    assert counters["disconnects"] == 1 and counters["reconnects"] == 1  # type: ignore[index]


def test_disconnect_discard_counts_losses(tmp_path: Path) -> None:
    """With `discard`, the bytes lost while disconnected equal bytes_discarded."""
    g, sent, got = asyncio.run(_kill_and_restart(tmp_path, "discard"))
    discarded = g.link.status()["counters"]["bytes_discarded"]  # type: ignore[index]
    assert discarded == len(sent) - len(got) > 0
    assert got == sent[discarded:]  # type: ignore[index]


def test_disconnect_hold_backpressures(tmp_path: Path) -> None:
    """With `hold`, a byte sent while disconnected stays in the TSR until the port is back."""

    async def run() -> None:
        with socat_pair(tmp_path, "hold") as s:
            g = Guest(PortSettings(url=str(s.a), on_disconnect="hold"))
            await g.link.open()
            g.setup()
            s.stop()
            assert await wait_for(lambda: g.link.reader_state is ReaderState.DISCONNECTED, 1.0)
            assert await g.send(b"x" * 40, timeout_s=0.3) == 16  # TSR + 15 in the FIFO
            assert not g.lsr() & Lsr.TEMT
            s.start()
            with raw_peer(s.b) as peer:
                assert await wait_for(lambda: g.link.reader_state is ReaderState.CONNECTED, 2.0)
                await asyncio.sleep(0.05)
                assert read_available(peer) == b"x" * 16
            await g.link.close()

    asyncio.run(run())


def test_xoff_under_xonxoff_stalls_and_xon_resumes_losslessly(tmp_path: Path) -> None:
    """xonxoff: an XOFF from the far end stalls the UART at once (TEMT=0, tsr_retry>0); XON: all."""

    async def run() -> None:
        with socat_pair(tmp_path, "xo") as s, raw_peer(s.b) as peer:
            g = Guest(PortSettings(url=str(s.a), xonxoff=True))
            await g.link.open()
            g.setup()
            assert await send_and_collect(g, b"before", peer, 6) == b"before"
            os.write(peer, b"\x13")  # XOFF
            await asyncio.sleep(0.1)
            payload = bytes(range(0x20, 0x7F)) * 4
            sent = await g.send(payload, timeout_s=0.5)
            assert sent < len(payload)  # the guest was held back, not the bytes dropped
            assert g.link.reader_state is ReaderState.STALLED
            assert g.link.status()["held_by_peer"] == "xoff"
            st = g.uart.state()
            assert not st.lsr & Lsr.TEMT and st.tsr_retry > 0
            assert read_available(peer) == b""
            # The held bytes are the device's (TSR + FIFO), none parked in the kernel.
            assert g.uart.tx_pending() == payload[:sent]
            os.write(peer, b"\x11")  # XON
            assert await send_and_collect(g, payload[sent:], peer, len(payload)) == payload
            assert await wait_for(lambda: g.link.reader_state is ReaderState.CONNECTED)
            assert g.read_all() == b""  # XOFF and XON are flow control, not data
            await g.link.close()

    asyncio.run(run())


def test_fcr_reset_or_trigger_lets_waiting_input_in_without_new_input(tmp_path: Path) -> None:
    """An RX reset or a higher trigger lets what waits in rx_backlog in at once (no new input)."""

    async def run() -> None:
        with socat_pair(tmp_path, "rfr") as s, raw_peer(s.b) as peer:
            g = Guest(PortSettings(url=str(s.a)))
            await g.link.open()
            g.setup()  # FIFOs on, trigger 1: the FIFO takes 1 byte, the rest waits
            os.write(peer, b"0123456789")
            assert await wait_for(lambda: g.link.state().rx_backlog == b"123456789")
            g.uart.write(2, 0x03)  # FE | RX FIFO reset: "0" is dropped
            g.pump()
            assert g.uart.state().rx_fifo == b"1"  # refilled in the same step
            g.uart.write(2, 0xC1)  # trigger 14: the FIFO may take the rest now
            g.pump()
            assert g.uart.state().rx_fifo == b"123456789"
            assert await g.receive(9) == b"123456789"
            await g.link.close()

    asyncio.run(run())
