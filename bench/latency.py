"""Benchmark: latency from a byte written at the far end to the IRQ event at the guest.

The daemon (a separate process) serves one UART whose port is link ``a`` of a socat
null-modem; this process holds link ``b`` (the far end, raw) and a ``BusClient`` (the guest).
The UART is set to 8N1, FIFOs on with trigger 1 (FCR 0x07), IER = RDI. Each sample:
``os.write(far_end, 1 byte)`` → ``client.wait_irq()`` returns True; the time between the two
(``perf_counter_ns``) is the latency. The guest then reads RBR (the IRQ falls) and waits a
random 0–2 ms so that samples do not line up with anything periodic.

The path measured: far end → pty → socat → pty → the daemon's reader → model (RDI) →
IRQ frame on the bus → the client's poll/recv.

Run: ``python bench/latency.py [--runs 5] [--samples 2000]``.
Prints a table (medians over runs of p50 and p99) and one JSON line.
"""

from __future__ import annotations

import argparse
import os
import random
import time

from _common import (
    Daemon,
    Figure,
    Socat,
    add_runs_arg,
    json_line,
    open_raw,
    percentile,
    print_table,
    temp_dir,
)

from uartbridge.client import BusClient

RBR, IER, FCR, LCR, IIR = 0, 1, 2, 3, 2
IER_RDI = 0x01


def one_run(client: BusClient, far: int, samples: int) -> list[int]:
    out = []
    clock = time.perf_counter_ns
    for i in range(samples):
        time.sleep(random.uniform(0, 0.002))
        if client.poll_events():
            raise RuntimeError("IRQ already high before the byte was written")
        start = clock()
        os.write(far, bytes((i & 0xFF,)))
        if not client.wait_irq(2.0):
            raise RuntimeError("no IRQ within 2 s")
        out.append(clock() - start)
        value = client.read(RBR)
        if value != i & 0xFF:
            raise RuntimeError(f"read {value:#04x}, wrote {i & 0xFF:#04x}")
        if client.irq:
            raise RuntimeError("IRQ still high after reading RBR")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runs_arg(parser)
    parser.add_argument("--samples", type=int, default=2000, help="bytes per run")
    args = parser.parse_args()

    p50s: list[float] = []
    p99s: list[float] = []
    maxs: list[float] = []
    with temp_dir("lat") as root:
        pair = Socat(root / "a", root / "b")
        daemon = Daemon(root, [{"name": "uart0", "port": str(root / "a")}])
        far = -1
        try:
            pair.start()
            daemon.start()
            far = open_raw(pair.b)
            with BusClient(daemon.bus()) as client:
                for offset, value in ((LCR, 0x03), (FCR, 0x07), (IER, IER_RDI)):
                    client.write(offset, value)
                client.read(IIR)
                client.sync()
                one_run(client, far, 100)  # warm-up
                for _ in range(args.runs):
                    lat = one_run(client, far, args.samples)
                    p50s.append(percentile(lat, 0.50) / 1000)
                    p99s.append(percentile(lat, 0.99) / 1000)
                    maxs.append(max(lat) / 1000)
        finally:
            if far >= 0:
                os.close(far)
            daemon.stop()
            pair.stop()

    figures = [
        Figure("latency_p50_us", "far-end write -> guest IRQ, p50", "us", p50s, None),
        Figure("latency_p99_us", "far-end write -> guest IRQ, p99", "us", p99s, 2000, "<="),
        Figure("latency_max_us", "far-end write -> guest IRQ, max", "us", maxs, None),
    ]
    print_table(
        f"latency bench: {args.runs} runs of {args.samples} bytes "
        "(trigger 1, IER=RDI, socat pty)",
        figures,
    )
    print(json_line("latency", figures, samples_per_run=args.samples))


if __name__ == "__main__":
    main()
