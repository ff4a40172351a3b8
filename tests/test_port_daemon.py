"""The port as the daemon runs it: a peer that talked before `run`, and what a guest's open
does to bytes that came while no guest was attached (rx_flushed in status)."""

from __future__ import annotations

import os
import time
import tty
from pathlib import Path
from typing import Any

import pytest
from procs import daemon, socat_pair, wait_for

from uartbridge.client import BusClient
from uartbridge.guest import Guest8250
from uartbridge.registers import Lsr

pytestmark = pytest.mark.e2e

DENSE = bytes.fromhex("41 ff ff 42 ff 00 43 44 ff 00 00 45") + bytes(range(256)) + (
    b"\x11\x13\xff\x00\x00\x13\xff"
)


def _peer(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(fd)
    return fd


def test_bytes_sent_before_run_reach_the_guest_exactly(tmp_path: Path) -> None:
    """The far end talks before `uartbridge run` opens the port; the guest, setting the line
    only afterwards and reading RBR (no FIFO reset), gets every byte, with no line event."""
    with socat_pair(tmp_path) as pair, daemon(tmp_path / "d", [
        {"name": "uart0", "port": str(pair.a)}
    ]) as d:
        peer = _peer(pair.b)
        try:
            os.write(peer, DENSE)
            time.sleep(0.2)
            d.start()
            with BusClient(d.bus()) as c:
                c.write(3, 0x03)  # the guest's first LCR write comes after the bytes
                got = bytearray()
                deadline = time.monotonic() + 20
                while len(got) < len(DENSE) and time.monotonic() < deadline:
                    lsr = c.read(5)
                    assert not lsr & (Lsr.BI | Lsr.FE | Lsr.PE), hex(lsr)
                    if lsr & Lsr.DR:
                        got.append(c.read(0))
            assert bytes(got) == DENSE
            link = d.status()["uarts"][0]["link"]
            assert link["counters"]["breaks_received"] == link["counters"]["framing_errors"] == 0
            assert d.stop() == 0
        finally:
            os.close(peer)


def test_bytes_from_before_a_guest_are_flushed_by_its_fifo_reset_and_shown(
    tmp_path: Path,
) -> None:
    """Bytes the far end sends while no guest is attached wait in the device; the next guest's
    driver open resets the RX FIFO, which drops what the FIFO held, counted as rx_flushed in
    `status` (JSON and text); what waited behind the FIFO arrives, in order."""
    stale = b"stale bytes from before any guest!"
    with socat_pair(tmp_path) as pair, daemon(tmp_path / "d", [
        {"name": "uart0", "port": str(pair.a)}
    ]) as d:
        d.start()
        peer = _peer(pair.b)
        try:
            os.write(peer, stale)
            wait_for(lambda: d.status()["uarts"][0]["link"]["counters"]["bytes_read"]
                     == len(stale), 10)
            with BusClient(d.bus()) as client:
                guest = Guest8250(client)
                guest.startup(115200)
                received = b""
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline:
                    guest.service(0.05)
                    received += guest.read()
        finally:
            os.close(peer)
        status: dict[str, Any] = d.status()["uarts"][0]
        flushed = status["counters"]["rx_flushed"]
        assert flushed >= 1
        assert stale.endswith(received) and len(received) + flushed <= len(stale)
        text = d.cli("status", "--config", str(d.config_path))
        assert text.returncode == 0 and f"rx_flushed={flushed}" in text.stdout
        assert d.stop() == 0
