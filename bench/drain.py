"""Benchmark: how long ``BusServer.close()`` takes to drain a guest at its bound.

At a stop the bus server executes every complete frame the guest already sent (what is in
the kernel's receive queue, at most ``drain_limit_bytes``, 256 KiB, and as many register
operations) before the final checkpoint. This measures the worst cases of that bound, in
process (one server on a Unix socket, ``VirtualWire`` as the port: it takes every byte): a
guest that queued more than 256 KiB of single THR writes, of LCR writes (each settled), of
4094-byte THR bursts, and of READ_N requests it never reads. The figure is the time the
stop is held per UART.

Run: ``python bench/drain.py``. Prints one line per case and one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the checkout on sys.path)
import structlog

from uartbridge import Uart16550
from uartbridge.bus import BusServer, Hello, ReadN, VirtualWire, Write, WriteN, encode
from uartbridge.registers import LCR, SCR, THR

QUEUED_BYTES = 300 * 1024  # more than the bound


async def one(frame: bytes) -> dict[str, float]:
    directory = Path(tempfile.mkdtemp(prefix="ub-drain-"))
    try:
        uart = Uart16550()
        wire = VirtualWire(uart)
        server = BusServer(uart, name="u", settle=wire, log=structlog.get_logger("quiet"))
        await server.start_unix(directory / "u.bus")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        sock.connect(str(directory / "u.bus"))
        sock.sendall(encode(Hello(1)))
        while not server.guest_connected:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # HELLO executed
        data = frame * (QUEUED_BYTES // len(frame) + 1)
        sock.sendall(data)  # no await: nothing of it read before close()
        start = time.perf_counter()
        await server.close()
        elapsed_ms = (time.perf_counter() - start) * 1e3
        sock.close()
        return {"queued_bytes": len(data), "close_ms": round(elapsed_ms, 1),
                "wire_bytes": len(wire.sent)}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    cases = {
        "single THR writes": encode(Write(THR, 0x41)),
        "LCR writes (each settled)": encode(Write(LCR, 0x03)),
        "4094-byte THR bursts": encode(WriteN(THR, b"x" * 4094)),
        "READ_N 4094 of SCR, unread": encode(ReadN(SCR, 4094)),
    }
    results = {}
    for name, frame in cases.items():
        results[name] = result = await one(frame)
        print(f"{name:30} queued {result['queued_bytes']:7} B  close() "
              f"{result['close_ms']:7.1f} ms  wire {result['wire_bytes']} B")
    print(json.dumps({"bench": "drain", "cases": results}))


if __name__ == "__main__":
    asyncio.run(main())
