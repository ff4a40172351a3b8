"""The real daemon coalesces a batch's output and keeps docs/bus-protocol.md's order.

A batch of bus frames (what one read of the socket brings) is executed in one turn: its IRQ
frames and replies leave in one write to the socket, and a burst of THR writes leaves in one
write to the port. The tests check what a guest and the far end can see of that: nothing is
lost, duplicated or reordered, and every IRQ frame comes before the reply that observes it.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from _port_support import raw_peer, read_available
from procs import daemon, socat_pair

from uartbridge.bus import (
    FrameDecoder,
    Hello,
    HelloReply,
    IrqEvent,
    Read,
    ReadReply,
    Sync,
    SyncReply,
    Write,
    WriteN,
    encode,
)
from uartbridge.registers import FCR, IER, IIR, LCR, LSR, THR, Ier

pytestmark = pytest.mark.e2e

TIMEOUT_S = 30.0


class Guest:
    """A raw guest on the bus socket: sends frames as one write, decodes what comes back."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT_S)
        self.sock.connect(str(path))
        self.decoder = FrameDecoder()
        self.send(Hello(1))
        assert isinstance(self.recv(), HelloReply)

    def send(self, *frames: object) -> None:
        self.sock.sendall(b"".join(encode(f) for f in frames))  # type: ignore[arg-type]

    def recv(self) -> object:
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                return frame
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the daemon closed the bus connection")
            self.decoder.feed(data)

    def until_sync(self, token: int) -> list[object]:
        frames = []
        while True:
            frame = self.recv()
            if frame == SyncReply(token):
                return frames
            frames.append(frame)


def test_a_batch_of_bursts_keeps_every_irq_frame_before_the_reply_that_sees_it(
        tmp_path: Path, each_event_loop: str) -> None:
    """20 × (16-byte WRITE_N to THR, READ IIR, READ LSR) sent as one batch through a real pty:
    the far end gets the 320 bytes once and in order; the replies come in request order,
    each IIR read sees THRI (the port took the burst before the read observed the device),
    and each IRQ edge (THRE back: high; the IIR read: low) precedes that read's reply."""
    data = bytes((i * 7 + 3) & 0xFF for i in range(320))
    with socat_pair(tmp_path) as s, raw_peer(s.b) as far, \
            daemon(tmp_path / "d", [{"name": "uart0", "port": str(s.a)}], interval_s=0) as d:
        d.daemon["event_loop"] = each_event_loop
        d.start()
        guest = Guest(d.bus())
        try:
            guest.send(Write(LCR, 0x03), Write(FCR, 0x07), Write(IER, Ier.THRI), Read(IIR),
                       Sync(1))
            assert guest.until_sync(1)[-2:] == [IrqEvent(False), ReadReply(IIR, 0xC2)]
            batch: list[object] = []
            for k in range(20):
                batch += [WriteN(THR, data[16 * k:16 * (k + 1)]), Read(IIR), Read(LSR)]
            guest.send(*batch, Sync(2))
            frames = guest.until_sync(2)
            got = bytearray()
            deadline = time.monotonic() + TIMEOUT_S
            while len(got) < len(data) and time.monotonic() < deadline:
                got += read_available(far)
            assert bytes(got) == data
        finally:
            guest.sock.close()
    replies = [f for f in frames if isinstance(f, ReadReply)]
    assert replies == [ReadReply(IIR, 0xC2), ReadReply(LSR, 0x60)] * 20
    assert all(isinstance(f, (ReadReply, IrqEvent)) for f in frames), frames
    level = False
    groups: list[list[bool]] = [[]]
    for frame in frames:
        if isinstance(frame, IrqEvent):
            assert frame.level != level, f"an IRQ frame that repeats the level: {frames}"
            level = frame.level
            groups[-1].append(level)
        elif frame == ReadReply(LSR, 0x60):
            groups.append([])
    # Per burst: the port took it (THRE: high) and the IIR read acknowledged it (low), both
    # before the IIR reply; the edges of the THR writes themselves may come before those.
    for edges in groups[:-1]:
        assert edges[-2:] == [True, False], frames
    assert groups[-1] == []
