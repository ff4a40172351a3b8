"""A guest in a new process: resume a Bridge checkpoint, read what comes in, send a trailer.

Run by tests/test_embed.py as ``python tests/embed_resume.py CHECKPOINT RX_COUNT TRAILER_HEX``.
It resumes the Bridge (same port as the checkpoint), reads RBR like a polled driver (LSR, then
RBR while DR) until RX_COUNT characters came in, noting the LSR error bits of each, writes
TRAILER after whatever the checkpoint still had to send (THR only while THRE), waits until
the transmitter is empty (TEMT), closes, and prints one JSON line: ``{"rx": hex, "lsr":
[bits per character]}``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from uartbridge.embed import Bridge

LSR_DR, LSR_ERRORS, LSR_THRE, LSR_TEMT = 0x01, 0x1E, 0x20, 0x40
TIMEOUT_S = 60.0


def main() -> None:
    """Resume, receive, send the trailer, drain, report."""
    path, count, trailer = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
    bridge = Bridge.resume(path).open()
    rx = bytearray()
    lsr_bits: list[int] = []
    sent = 0
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        lsr = bridge.read(5)
        while lsr & LSR_DR:
            lsr_bits.append(lsr & LSR_ERRORS)
            rx.append(bridge.read(0))
            lsr = bridge.read(5)
        if lsr & LSR_THRE and sent < len(trailer):
            bridge.write(0, trailer[sent])
            sent += 1
            continue
        if len(rx) >= count and sent == len(trailer) and lsr & LSR_TEMT:
            break
        bridge.poll(0.01)
    bridge.close()
    print(json.dumps({"rx": rx.hex(), "lsr": lsr_bits, "trailer_sent": sent}))


if __name__ == "__main__":
    main()
