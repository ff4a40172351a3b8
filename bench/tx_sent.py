"""Benchmark: the transmit accounting an eager I/O layer does per byte, and per burst.

Per byte: write THR, ``tx_pending()``, ``tx_sent(len)`` — what the port link does after a
guest's single THR write with a port that accepts (and what an embedding's polled console
does). Per byte with events: the same with ``take_events()`` after each step, as the port link's
settle does. Per burst: 16 THR writes, then one ``tx_pending()`` / ``tx_sent(16)``. FIFOs on,
115200 8N1. Prints ns per byte for each, medians of ``--runs`` (and the minima of the per-byte
figures: the least disturbed run, for back-to-back comparisons on a busy machine).

Run: ``python bench/tx_sent.py [--bytes N] [--runs 5]``. Prints a table and one JSON line.
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

THR = 0
FCR = 2
LCR = 3


def setup() -> Uart16550:
    """115200 8N1 with FIFOs on."""
    uart = Uart16550(clock=time.monotonic_ns)
    uart.write(LCR, 0x03)
    uart.write(FCR, 0x07)
    return uart


def per_byte(count: int) -> float:
    """ns per byte: THR write, tx_pending, tx_sent for every byte."""
    uart = setup()
    write, pending, sent = uart.write, uart.tx_pending, uart.tx_sent
    start = time.perf_counter_ns()
    for i in range(count):
        write(THR, i & 0xFF)
        sent(len(pending()))
    return (time.perf_counter_ns() - start) / count


def per_byte_with_events(count: int) -> float:
    """ns per byte: THR write, take_events, tx_pending, tx_sent, as the port link does it."""
    uart = setup()
    write, pending, sent, take = uart.write, uart.tx_pending, uart.tx_sent, uart.take_events
    start = time.perf_counter_ns()
    for i in range(count):
        write(THR, i & 0xFF)
        take()
        sent(len(pending()))
        take()
    return (time.perf_counter_ns() - start) / count


def per_burst(count: int) -> float:
    """ns per byte: 16 THR writes, then one tx_pending / tx_sent(16)."""
    uart = setup()
    write, pending, sent = uart.write, uart.tx_pending, uart.tx_sent
    start = time.perf_counter_ns()
    for i in range(count // 16):
        for j in range(16):
            write(THR, (i + j) & 0xFF)
        sent(len(pending()))
    return (time.perf_counter_ns() - start) / (count // 16 * 16)


def main() -> None:
    """Run both figures and print a table and one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=500_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    per_byte(10_000)  # warm-up
    byte_runs = [per_byte(args.bytes) for _ in range(args.runs)]
    event_runs = [per_byte_with_events(args.bytes) for _ in range(args.runs)]
    burst_runs = [per_burst(args.bytes) for _ in range(args.runs)]
    result = {
        "bench": "tx_sent",
        "per_byte_ns_median": round(statistics.median(byte_runs), 1),
        "per_byte_ns_min": round(min(byte_runs), 1),
        "per_byte_with_events_ns_min": round(min(event_runs), 1),
        "per_byte_with_events_ns_median": round(statistics.median(event_runs), 1),
        "per_burst_ns_per_byte_median": round(statistics.median(burst_runs), 1),
        "python": platform.python_version(),
    }
    print(f"per byte  (THR, tx_pending, tx_sent(1)):   {result['per_byte_ns_median']:8.1f} ns")
    print(f"per byte with events (+ take_events):  "
          f"{result['per_byte_with_events_ns_median']:8.1f} ns")
    print(f"per burst (16 THR, tx_pending, tx_sent(16)): "
          f"{result['per_burst_ns_per_byte_median']:6.1f} ns per byte")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
