"""Guest-time mode through the daemon: a bus v2 guest drives the UART's clock.

A real daemon (``clock = "guest"``) on a socat null-modem; the guest is ``BusClient`` speaking
protocol v2 with GUEST_TIME, the far end a process writing to socat's other pty. Host time
goes by in seconds while the guest's time moves by microseconds: the receive timeout and
line-rate pacing follow the guest's time only. v1 clients on the same UART get host time.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest
from procs import daemon, socat_pair, wait_for

from uartbridge.bus.codec import Capability
from uartbridge.client import BusClient
from uartbridge.uart import NS_PER_S, TIMEOUT_CHARS

pytestmark = pytest.mark.e2e

THR = RBR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, LSR = 3, 5
CHAR_NS = NS_PER_S * 10 // 115200  # 86 805 ns: 115200 8N1, QEMU's formula and the frame's
BASE_NS = 5 * 10**12  # the guest's own time base (its clock is not the daemon's)


def set_line(client: BusClient, fcr: int, ier: int) -> None:
    """115200 8N1, FCR, IER (DLAB writes, then the registers)."""
    for offset, value in ((LCR, 0x83), (DLL, 1), (DLM, 0), (LCR, 0x03), (FCR, fcr), (IER, ier)):
        client.write(offset, value)
    client.sync()


def test_a_guest_whose_clock_crawls_sees_cti_after_four_of_its_character_times(
    tmp_path: Path,
) -> None:
    """Input arrives, seconds of host time pass with the guest's time still (a paused guest:
    no timeout), then the guest advances its clock by microseconds: CTI rises exactly when
    its own time is 4 character times past the input, and DEADLINE told it when."""
    with socat_pair(tmp_path) as pair, daemon(
        tmp_path / "d", [{"name": "uart0", "port": str(pair.a), "clock": "guest"}]
    ) as d:
        d.start()
        with BusClient(d.bus(), guest_time_ns=BASE_NS) as client:
            assert client.drives_time and client.server_version == 2
            assert client.capabilities & Capability.GUEST_TIME
            set_line(client, fcr=0x81, ier=0x01)  # FIFO trigger 8: 3 bytes only time out
            assert client.deadline_ns is None
            far = os.open(pair.b, os.O_RDWR | os.O_NOCTTY)
            try:
                os.write(far, b"abc")
                wait_for(lambda: client.read(LSR) & 0x01, 10.0)
                client.sync()
                assert client.deadline_ns == BASE_NS + TIMEOUT_CHARS * CHAR_NS
                time.sleep(1.0)  # paused: 1 s of host time, no guest time
                assert client.read(IIR) == 0xC1 and not client.irq
                deadline = client.advance_to(BASE_NS + TIMEOUT_CHARS * CHAR_NS - 1)
                assert deadline == BASE_NS + TIMEOUT_CHARS * CHAR_NS
                assert client.read(IIR) == 0xC1 and not client.irq
                assert client.advance_to(BASE_NS + TIMEOUT_CHARS * CHAR_NS) is None
                assert client.irq and client.read(IIR) == 0xCC
                assert client.read_many(RBR, 16) == b"abc"
            finally:
                os.close(far)


def test_line_rate_pacing_in_guest_time(tmp_path: Path) -> None:
    """With pace = line the transmitter shifts one character per character time of the
    guest's time: 16 bytes written, the far end gets one, host time passes and it gets no
    more; each character time the guest advances, one more — DEADLINE tells it when."""
    with socat_pair(tmp_path) as pair, daemon(
        tmp_path / "d",
        [{"name": "uart0", "port": str(pair.a), "clock": "guest", "pace": "line"}],
    ) as d:
        d.start()
        far = os.open(pair.b, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        got = bytearray()

        def read_far() -> bytes:
            with contextlib.suppress(BlockingIOError):
                got.extend(os.read(far, 4096))
            return bytes(got)

        try:
            with BusClient(d.bus(), guest_time_ns=BASE_NS) as client:
                assert client.capabilities & Capability.LINE_PACE
                set_line(client, fcr=0x07, ier=0x00)
                client.write_many(THR, b"0123456789ABCDEF")
                client.sync()
                wait_for(lambda: read_far() == b"0", 10.0)
                assert client.deadline_ns == BASE_NS + CHAR_NS
                time.sleep(0.5)
                assert read_far() == b"0" and client.read(LSR) & 0x60 == 0
                for k in range(1, 5):
                    assert client.advance_to(BASE_NS + k * CHAR_NS) == BASE_NS + (k + 1) * CHAR_NS
                    wait_for(lambda k=k: read_far() == b"0123456789ABCDEF"[: k + 1], 10.0)
                # The guest jumps ahead by 20 character times in one step: the rest goes out
                # (the characters ran at their own times), THRE then TEMT as the chip's.
                assert client.advance_to(BASE_NS + 24 * CHAR_NS) is None
                wait_for(lambda: read_far() == b"0123456789ABCDEF", 10.0)
                assert client.read(LSR) & 0x60 == 0x60
        finally:
            os.close(far)


def test_a_v1_guest_on_a_guest_time_uart_gets_host_time(tmp_path: Path) -> None:
    """A v1 client (and a v2 one that does not ask for GUEST_TIME) is not asked for time:
    the UART's clock follows the host while it is attached, so CTI comes within host time;
    the text status says so."""
    with socat_pair(tmp_path) as pair, daemon(
        tmp_path / "d", [{"name": "uart0", "port": str(pair.a), "clock": "guest"}]
    ) as d:
        d.start()
        far = os.open(pair.b, os.O_RDWR | os.O_NOCTTY)
        try:
            for version in (1, 2):
                with BusClient(d.bus(), version=version) as client:
                    assert client.server_version == version and not client.drives_time
                    assert client.capabilities == 0x0F  # v2: no GUEST_TIME, no LINE_PACE
                    set_line(client, fcr=0x81, ier=0x01)
                    os.write(far, b"xy")
                    assert client.wait_irq(10.0)
                    assert client.read(IIR) == 0xCC
                    assert client.read_many(RBR, 16) == b"xy"
                    text = d.cli("status", "--config", str(d.config_path)).stdout
                    assert "  time        clock guest (following the host)  pace none" in text
        finally:
            os.close(far)


def test_time_stands_still_between_guests(tmp_path: Path) -> None:
    """A guest that drives time leaves; input arrives; seconds later a new one attaches at a
    time base of its own: no timeout has fired, and it fires 4 character times into the new
    guest's time."""
    with socat_pair(tmp_path) as pair, daemon(
        tmp_path / "d", [{"name": "uart0", "port": str(pair.a), "clock": "guest"}]
    ) as d:
        d.start()
        with BusClient(d.bus(), guest_time_ns=BASE_NS) as client:
            set_line(client, fcr=0x81, ier=0x01)
            client.advance_to(BASE_NS + 10**9)
        far = os.open(pair.b, os.O_RDWR | os.O_NOCTTY)
        try:
            os.write(far, b"q")
            time.sleep(1.0)
            other_base = 7
            with BusClient(d.bus(), guest_time_ns=other_base) as client:
                wait_for(lambda: client.read(LSR) & 0x01, 10.0)
                assert client.read(IIR) == 0xC1
                deadline = client.deadline_ns
                assert deadline is not None and other_base < deadline
                assert deadline <= other_base + TIMEOUT_CHARS * CHAR_NS
                client.advance_to(deadline)
                assert client.read(IIR) == 0xCC
        finally:
            os.close(far)
