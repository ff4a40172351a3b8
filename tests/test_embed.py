"""uartbridge.embed.Bridge: the model with its real port, host path and checkpoints, in-process.

The far ends are real: socat null-modems and a pty the Bridge creates. A resumed Bridge runs
in a new process (tests/embed_resume.py) where the test says so.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from _port_support import FakeOps, open_raw, raw_peer, read_available, socat_pair

from uartbridge.checkpoint import read_checkpoint
from uartbridge.embed import Bridge
from uartbridge.errors import PortError, PortUnavailableError
from uartbridge.port.state import PortSettings, ReaderState
from uartbridge.record import replay

REPO = Path(__file__).resolve().parent.parent
RBR = THR = 0
IER, IIR, FCR, LCR, MCR, LSR = 1, 2, 2, 3, 4, 5
LSR_DR, LSR_BI, LSR_THRE, LSR_TEMT = 0x01, 0x10, 0x20, 0x40


def poll_until(bridge: Bridge, predicate: Any, timeout_s: float = 10.0) -> None:
    """Drive the bridge with poll() until ``predicate()`` holds; fail after the timeout."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        bridge.poll(0.005)


def read_all(bridge: Bridge) -> bytes:
    """RBR while LSR.DR, as a polled driver reads."""
    out = bytearray()
    while bridge.read(LSR) & LSR_DR:
        out.append(bridge.read(RBR))
    return bytes(out)


def test_bytes_both_ways_through_a_socat_pty_with_poll(tmp_path: Path) -> None:
    """Without asyncio: writes reach the far end by the next access or poll(), its bytes come
    in through poll()."""
    irqs: list[bool] = []
    with socat_pair(tmp_path) as s, raw_peer(s.b) as far, \
            Bridge(str(s.a), on_irq=irqs.append) as br:
        br.write(LCR, 0x03)
        br.write(FCR, 0x07)
        for value in b"hello, far end\r\n":
            assert br.read(LSR) & LSR_THRE
            br.write(THR, value)
        br.poll()  # the last THR write is posted: the emulator's loop gives the port its turn
        got = bytearray()
        deadline = time.monotonic() + 10
        while len(got) < 16 and time.monotonic() < deadline:
            got += read_available(far)
        assert bytes(got) == b"hello, far end\r\n"
        data = bytes(range(32, 127)) * 8  # 760 bytes: many times what the FIFO holds
        os.write(far, data)
        received = bytearray()
        poll_until(br, lambda: received.extend(read_all(br)) or len(received) >= len(data))
        assert bytes(received) == data
        assert br.reader_state is ReaderState.CONNECTED
        assert irqs == []  # IER = 0: no edge at all
        counters = br.status()["counters"]
        assert counters["bytes_read"] == len(data)  # type: ignore[index]
        assert counters["bytes_written"] == 16  # type: ignore[index]


def test_a_write_the_wire_takes_at_once_is_settled_by_the_next_access(tmp_path: Path) -> None:
    """A posted THR write the pty takes at once is finished by the next register access: its
    IRQ edges come before that access, and the next poll() finds no change left over."""
    irqs: list[bool] = []
    with socat_pair(tmp_path) as s, raw_peer(s.b) as far, \
            Bridge(str(s.a), on_irq=irqs.append) as br:
        br.write(LCR, 0x03)
        br.write(FCR, 0x07)
        br.write(IER, 0x02)  # THRI
        assert br.read(IIR) & 0x0F == 0x02 and not br.irq  # THRI acknowledged
        br.poll()
        irqs.clear()
        for value in b"sixteen bytes!\r\n"[:16]:
            br.write(THR, value)
            # The pty took the byte before this read: THRE and the IRQ are back already.
            assert br.read(LSR) & LSR_THRE and br.irq
            assert br.read(IIR) & 0x0F == 0x02 and not br.irq
            assert not br.poll(), "poll() found a change that write() had already settled"
        assert irqs == [True, False] * 16
        got = bytearray()
        deadline = time.monotonic() + 10
        while len(got) < 16 and time.monotonic() < deadline:
            got += read_available(far)
        assert bytes(got) == b"sixteen bytes!\r\n"[:16]


def _tx_chunks(trace: Path) -> list[bytes]:
    """The chunks the OS took for the port, one per write(2), from a Bridge's trace file."""
    lines = [line.split(" ", 2) for line in trace.read_text().splitlines()]
    return [bytes.fromhex(hexed) for _, direction, hexed in lines if direction == "tx"]


def test_a_burst_of_thr_writes_goes_to_the_pty_in_one_write(tmp_path: Path) -> None:
    """A polled driver's 16 THR writes per THRE reach the pty in ONE write(2) per burst (the
    trace file has a line per write the OS took), the bytes identical and in order."""
    data = bytes((i * 13 + 5) & 0xFF for i in range(16 * 20))
    trace = tmp_path / "trace.txt"
    with socat_pair(tmp_path) as s, raw_peer(s.b) as far, \
            Bridge(str(s.a), trace_file=trace) as br:
        br.write(LCR, 0x03)
        br.write(FCR, 0x07)
        got = bytearray()
        for pos in range(0, len(data), 16):
            while not br.read(LSR) & LSR_THRE:
                br.poll(0.001)
            for value in data[pos:pos + 16]:
                br.write(THR, value)
            got += read_available(far)  # keeps the pty from filling
        br.poll()
        deadline = time.monotonic() + 10
        while len(got) < len(data) and time.monotonic() < deadline:
            got += read_available(far)
    assert bytes(got) == data
    chunks = _tx_chunks(trace)
    assert b"".join(chunks) == data
    assert [len(chunk) for chunk in chunks] == [16] * 20


def test_posted_writes_are_in_a_checkpoint_once_wire_or_device(tmp_path: Path) -> None:
    """A stop-checkpoint right after posted THR writes: every byte is once either on the wire
    or in the checkpoint (TSR/TX FIFO, TX backlog), never both, never neither; a far end
    that reads gets them all before the port closes."""
    data = b"posted, then checkpointed"[:16]
    ckpt_path = tmp_path / "posted.json"
    with socat_pair(tmp_path) as s, raw_peer(s.b) as far:
        br = Bridge(str(s.a), name="posted").open()
        br.write(LCR, 0x03)
        br.write(FCR, 0x07)
        assert br.read(LSR) & LSR_THRE
        for value in data:
            br.write(THR, value)
        assert br.uart.state().tx_waiting(), "the writes are posted: the model holds them"
        br.checkpoint(ckpt_path, stop=True)
        got = bytearray()
        deadline = time.monotonic() + 10
        while len(got) < len(data) and time.monotonic() < deadline:
            got += read_available(far)
    ckpt = read_checkpoint(ckpt_path)
    kept = ckpt.port.tx_backlog + ckpt.uart.tx_waiting()
    assert bytes(got) + kept == data
    assert bytes(got) == data  # the reader took them: none left in the device


def test_the_rx_fifo_is_refilled_in_bulk_when_the_guest_has_read_it_empty(
    tmp_path: Path,
) -> None:
    """Far end -> guest with trigger 8: the port link refills the RX FIFO once per FIFO's
    worth the guest read (one receive of 8 bytes, seen in the device's recording), not after
    every RBR read, and the guest's LSR.DR never falls while input waits."""
    data = bytes((i * 7 + 3) & 0xFF for i in range(64))
    record = tmp_path / "rx.ubrec"
    with socat_pair(tmp_path) as s, raw_peer(s.b) as far, \
            Bridge(str(s.a), record=record) as br:
        br.write(LCR, 0x03)
        br.write(FCR, 0x87)  # FIFOs on, trigger 8
        os.write(far, data)
        poll_until(br, lambda: br.status()["rx_backlog_bytes"] == len(data) - 8)
        received = read_all(br)  # one LSR.DR run: DR stays up while the backlog lasts
    assert received == data
    from uartbridge.record import RECEIVE, _Reader

    with open(record, "rb") as f:
        reader = _Reader(f, str(record))
        reader.header()
        sizes = [len(r.args[0]) for r in reader.records() if r.kind == RECEIVE]
    assert sizes == [8] * 8
    assert replay(record).identical


def test_irq_callback_and_the_receive_timeout_timer_run_inside_poll(tmp_path: Path) -> None:
    """3 bytes under a trigger of 8: the receive-timeout timer raises CTI inside poll()."""
    irqs: list[bool] = []
    with socat_pair(tmp_path) as s, raw_peer(s.b) as far, \
            Bridge(str(s.a), on_irq=irqs.append) as br:
        br.write(LCR, 0x03)
        br.write(FCR, 0x87)  # FIFOs on, trigger 8
        br.write(IER, 0x01)  # RDI
        os.write(far, b"abc")
        poll_until(br, lambda: br.irq)
        assert irqs == [True]
        assert br.read(IIR) & 0x0F == 0x0C  # CTI: fewer than the trigger, timed out
        assert read_all(br) == b"abc"
        assert not br.irq and irqs == [True, False]


def test_an_asyncio_caller_awaits_the_bridge_on_its_own_loop(tmp_path: Path) -> None:
    """aopen/apoll/acheckpoint/aclose: the running loop does the I/O, apoll waits for input."""

    async def run() -> None:
        with socat_pair(tmp_path) as s, raw_peer(s.b) as far:
            async with Bridge(str(s.a), name="async0") as br:
                br.write(LCR, 0x03)
                br.write(THR, ord("x"))
                os.write(far, b"ping")
                received = bytearray()
                deadline = time.monotonic() + 10
                while len(received) < 4 and time.monotonic() < deadline:
                    await br.apoll(0.5)
                    received += read_all(br)
                assert bytes(received) == b"ping"
                sent = bytearray()  # socat relays it in its own time (CI saw b'' here)
                deadline = time.monotonic() + 10
                while len(sent) < 1 and time.monotonic() < deadline:
                    await br.apoll(0.05)  # the loop keeps doing the port's I/O meanwhile
                    sent += read_available(far)
                assert bytes(sent) == b"x"
                with pytest.raises(PortError, match="aopen"):
                    br.poll()
                path = await br.acheckpoint(tmp_path / "async0.json")
            assert read_checkpoint(path).meta.uart_name == "async0"

    asyncio.run(run())


def test_checkpoint_with_backlog_break_and_stuck_tsr_resumes_exactly_in_a_new_process(
    tmp_path: Path,
) -> None:
    """A stop-checkpoint holding RX backlog, a break in it and a stuck TSR byte; a new process
    resumes it and every byte arrives once, in order, both ways (the break at its place).

    A pty cannot carry a break, so the port is a fake serial port for termios only
    (``FakeOps``): the link decodes PARMRK marks, and the far end writes a break as the
    kernel marks one (``ff 00 00``); the byte path is the real socat pty."""
    rx_head = b"0123456789abcdefghijklmnopqrstuvwxyz"  # 36: past the FIFO, into the backlog
    rx_tail = bytes(range(0x20, 0x7F)) * 3  # 285: the rest waits in the kernel
    tx = bytes((i * 7) & 0xFF for i in range(200_000))
    trailer = b"<after resume>"
    ckpt_path = tmp_path / "embed0.checkpoint.json"
    with socat_pair(tmp_path) as s, raw_peer(s.b) as far:
        settings = PortSettings(url=str(s.a), rx_backlog_bytes=64)
        br = Bridge(settings, name="embed0", termios_ops=FakeOps()).open()
        br.write(LCR, 0x03)
        br.write(FCR, 0x07)  # FIFOs on, trigger 1
        br.write(MCR, 0x03)
        os.write(far, rx_head + b"\xff\x00\x00" + rx_tail)
        poll_until(br, lambda: br.status()["counters"]["breaks_received"] == 1)  # type: ignore[index]
        first = bytes(br.read(RBR) for _ in range(5))
        br.poll()
        # The guest writes while THRE says so until the far end (not reading) stalls the wire.
        sent = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if br.read(LSR) & LSR_THRE:
                for value in tx[sent:sent + 16]:
                    br.write(THR, value)
                sent += min(16, len(tx) - sent)
            elif br.uart.state().tsr_retry > 0:
                break
            else:
                br.poll(0.001)
        state = br.uart.state()
        assert state.tsr_busy and state.tsr_retry > 0 and state.tx_fifo
        assert br.reader_state is ReaderState.STALLED
        br.checkpoint(ckpt_path, stop=True)
        with pytest.raises(PortError, match="closed"):
            br.read(LSR)

        ckpt = read_checkpoint(ckpt_path)
        assert ckpt.uart.tsr_busy and ckpt.uart.tsr_retry > 0
        assert ckpt.port.rx_backlog and len(ckpt.port.rx_marks) == 1
        (at, kind), = ckpt.port.rx_marks
        assert kind == "break" and 0 < at < len(ckpt.port.rx_backlog)
        inspected = subprocess.run(
            [sys.executable, "-m", "uartbridge", "inspect", str(ckpt_path)],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )
        assert inspected.returncode == 0, inspected.stderr
        assert "verdict      valid" in inspected.stdout
        assert f"break after {at} bytes" in inspected.stdout
        assert f"tsr_retry={ckpt.uart.tsr_retry}" in inspected.stdout

        expected_rx = rx_head + b"\x00" + rx_tail
        child = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "embed_resume.py"), str(ckpt_path),
             str(len(expected_rx) - len(first)), trailer.hex()],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            wire = bytearray()
            deadline = time.monotonic() + 60
            while len(wire) < sent + len(trailer) and time.monotonic() < deadline:
                chunk = read_available(far)
                wire += chunk
                if not chunk:
                    time.sleep(0.005)
            out, err = child.communicate(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == 0, err.decode()
        assert bytes(wire) == tx[:sent] + trailer
        assert read_available(far) == b""
    report = json.loads(out)
    received = first + bytes.fromhex(report["rx"])
    assert received == expected_rx
    lsr_bits = [0] * len(first) + report["lsr"]
    assert [i for i, bits in enumerate(lsr_bits) if bits] == [len(rx_head)]
    assert lsr_bits[len(rx_head)] == LSR_BI


def test_tx_backlog_of_a_pty_nobody_opened_survives_a_checkpoint(tmp_path: Path) -> None:
    """pty: with no client buffers the output (on_disconnect=buffer); a resumed Bridge on a
    new pty delivers it, then what follows, to the first terminal that opens it."""
    link = tmp_path / "console"
    settings = PortSettings(url="pty:", link_path=str(link))
    ckpt_path = tmp_path / "c.json"
    with Bridge(settings, name="console") as br:
        assert br.pty_path == str(link)
        br.write(LCR, 0x03)
        for value in b"while nobody listened\r\n":
            br.write(THR, value)
        br.poll()
        assert br.reader_state is ReaderState.DISCONNECTED
        assert br.status()["tx_backlog_bytes"] == 23
        br.checkpoint(ckpt_path, stop=True)
    assert read_checkpoint(ckpt_path).port.tx_backlog == b"while nobody listened\r\n"
    with Bridge.resume(ckpt_path, port=settings) as br:
        assert br.generation == 1
        for value in b"and after\r\n":
            br.write(THR, value)
        far = open_raw(str(link))
        try:
            got = bytearray()
            poll_until(br, lambda: got.extend(read_available(far)) or len(got) >= 34)
            assert bytes(got) == b"while nobody listened\r\nand after\r\n"
        finally:
            os.close(far)


def test_a_missing_port_is_a_clear_error_or_retried_until_it_appears(tmp_path: Path) -> None:
    """open() on a missing path: PortUnavailableError; open(retry=True) waits for it,
    buffering the guest's output, and delivers it when socat creates the path."""
    missing = tmp_path / "later-A"  # the path socat_pair(tmp_path, "later") creates
    with pytest.raises(PortUnavailableError, match="later-A"):
        Bridge(str(missing)).open()
    br = Bridge(PortSettings(url=str(missing), reconnect_max_s=0.2)).open(retry=True)
    try:
        assert br.reader_state is ReaderState.DISCONNECTED
        br.write(LCR, 0x03)
        for value in b"early":
            br.write(THR, value)
        with socat_pair(tmp_path, "later") as s, raw_peer(s.b) as far:
            got = bytearray()
            poll_until(br, lambda: got.extend(read_available(far)) or len(got) >= 5)
            assert bytes(got) == b"early"
            assert br.reader_state is ReaderState.CONNECTED
    finally:
        br.close()
    with pytest.raises(PortError, match="closed"):
        br.write(THR, 0)
    br.close()  # idempotent


def test_bad_arguments_are_refused_before_anything_opens() -> None:
    """A bad name, an empty port and a poll before open() are clear errors."""
    with pytest.raises(ValueError, match="UART name"):
        Bridge("pty:", name="no spaces")
    with pytest.raises(ValueError, match="port"):
        Bridge("")
    with pytest.raises(PortError, match="poll"):
        Bridge("pty:").poll()


def _example(markdown: Path, heading: str) -> str:
    """The first ```python block after ``heading`` in ``markdown``."""
    text = markdown.read_text()
    after = text[text.index(heading):]
    start = after.index("```python\n") + len("```python\n")
    return after[start:after.index("```", start)]


def test_the_readme_example_runs_a_console_on_its_own_pty(tmp_path: Path) -> None:
    """README's embedding example, run as written: its prompt waits for the terminal, what
    the terminal types comes in to Enter, and its checkpoint is valid for `uartbridge inspect`."""
    code = _example(REPO / "README.md", "## Embedding in a Python emulator")
    assert code == _example(REPO / "docs" / "embedding.md", "## A first example")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("terminal: /dev/pts/"), first + proc.stderr.read()
        time.sleep(0.2)  # the prompt is written before any terminal is there: it is kept
        far = open_raw(first.split(": ", 1)[1].strip())
        try:
            prompt = bytearray()
            deadline = time.monotonic() + 30
            while len(prompt) < 13 and time.monotonic() < deadline:
                prompt += read_available(far)
                time.sleep(0.005)
            assert bytes(prompt) == b"type a line: "
            os.write(far, b"hello\r")
            out, err = proc.communicate(timeout=60)
        finally:
            os.close(far)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out == "got hello\n"
    inspected = subprocess.run(
        [sys.executable, "-m", "uartbridge", "inspect", "--json",
         str(tmp_path / "console.checkpoint.json")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert inspected.returncode == 0, inspected.stderr
    counters = json.loads(inspected.stdout)["counters"]
    assert counters["uart"]["bytes_transmitted"] == 13
    assert counters["uart"]["bytes_received"] == 6


def test_a_bridge_on_a_guest_clock_times_out_in_guest_time_only(tmp_path: Path) -> None:
    """With ``clock=GuestClock()`` the receive timeout waits for the emulator's time: polling
    the port for a second of host time fires nothing; ``advance_to`` one ns short of the
    deadline the Bridge reported fires nothing; at it, CTI rises (``on_irq``), and a
    checkpoint taken meanwhile holds the time left, not the host's."""
    from uartbridge.clock import GuestClock

    irqs: list[bool] = []
    clock = GuestClock(42)
    with socat_pair(tmp_path) as s, raw_peer(s.b) as far, \
            Bridge(str(s.a), clock=clock, on_irq=irqs.append) as br:
        for offset, value in ((LCR, 0x83), (0, 1), (1, 0), (LCR, 0x03), (FCR, 0x81), (IER, 1)):
            br.write(offset, value)
        assert br.next_deadline_ns is None
        os.write(far, b"abc")
        poll_until(br, lambda: br.read(LSR) & LSR_DR)
        deadline = br.next_deadline_ns
        assert deadline == 42 + 4 * 86_805
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            br.poll(0.05)
        assert br.read(IIR) == 0xC1 and irqs == []
        assert br.snapshot().uart.timeout_remaining_ns == 4 * 86_805
        assert br.advance_to(deadline - 1) == deadline
        assert br.read(IIR) == 0xC1 and irqs == []
        assert br.advance_to(deadline) is None
        assert irqs == [True] and br.read(IIR) == 0xCC
        assert read_all(br) == b"abc"
