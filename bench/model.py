"""Benchmark: register operations per second of the pure model, for a driver-like mix.

Each round does what an 8250-style driver and an eager I/O layer do: read IIR, read LSR, and
when THRE is set write a burst of 16 bytes to THR, after which the wire takes them all
(``tx_sent``); the wire delivers as many bytes as ``can_receive()`` allows (``receive``), and
the driver drains them (RBR reads, each followed by an LSR read). FIFOs on, trigger 8, IER
RDI|THRI|RLSI, 115200 8N1, the daemon's clock (``time.monotonic_ns``). Only register reads
and writes are counted as operations.

Run: ``python bench/model.py [--ops N] [--runs 5]``. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from uartbridge import Uart16550

RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
LSR = 5
LSR_DR = 0x01
LSR_THRE = 0x20
BURST = 16


def setup() -> Uart16550:
    """A device configured as Linux leaves it: 115200 8N1, FIFOs on (trigger 8), IER 0x07."""
    uart = Uart16550(clock=time.monotonic_ns)
    for offset, value in ((LCR, 0x83), (DLL, 1), (DLM, 0), (LCR, 0x03), (FCR, 0x01),
                          (FCR, 0x87), (IER, 0x07)):
        uart.write(offset, value)
    return uart


def one_run(target_ops: int) -> tuple[int, float]:
    """Run rounds until ``target_ops`` register operations are done; (ops, seconds)."""
    uart = setup()
    read = uart.read
    write = uart.write
    tx_pending = uart.tx_pending
    tx_sent = uart.tx_sent
    receive = uart.receive
    can_receive = uart.can_receive
    payload = bytes(range(256)) * 2
    incoming = b"The quick brown fox jumps over the lazy dog. " * 4
    ops = 0
    pos = 0
    start = time.perf_counter()
    while ops < target_ops:
        read(IIR)
        lsr = read(LSR)
        ops += 2
        if lsr & LSR_THRE:
            for value in payload[pos:pos + BURST]:
                write(THR, value)
            pos = (pos + BURST) & 0xFF
            ops += BURST
            tx_sent(len(tx_pending()))
        room = can_receive()
        if room:
            receive(incoming[:room])
            incoming = incoming[room:] + incoming[:room]
        while read(LSR) & LSR_DR:
            read(RBR)
            ops += 2
        ops += 1
    return ops, time.perf_counter() - start


def main() -> None:
    """Run the benchmark and print a table and one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=2_000_000, help="register ops per run")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    one_run(min(args.ops, 100_000))  # warm-up
    rates = []
    print(f"{'run':>4} {'ops':>10} {'seconds':>9} {'ops/s':>12}")
    for i in range(args.runs):
        ops, seconds = one_run(args.ops)
        rate = ops / seconds
        rates.append(round(rate))
        print(f"{i + 1:>4} {ops:>10} {seconds:>9.3f} {rate:>12,.0f}")
    median = round(statistics.median(rates))
    print(f"median {median:,.0f} register ops/s")
    print(json.dumps({
        "bench": "model",
        "ops_per_s_median": median,
        "runs": rates,
        "python": platform.python_version(),
    }))


if __name__ == "__main__":
    main()
