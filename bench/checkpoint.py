"""Checkpoint cost: snapshot + encode + atomic write, and read + validate + restore.

Usage: ``python bench/checkpoint.py [--dir DIR] [--rounds N] [--backlog BYTES]``

The device is in a busy state (the V32/V43 stuck transmitter with a full TX FIFO, and six bytes
in the RX FIFO with the receive timeout armed), the host path holds an RX backlog and a TX
backlog of ``--backlog`` bytes. The write includes both fsyncs (file and directory) and the
validation of the current file before it is kept as the previous one. Prints a table and one
JSON line; the target is a median of at most 2 ms for each side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from uartbridge.checkpoint import (
    Checkpoint,
    CheckpointMeta,
    checkpoint_path,
    read_checkpoint,
    restore,
    write_checkpoint,
)
from uartbridge.port.state import PortState, ReaderState
from uartbridge.uart import Uart16550


class Clock:
    """A clock that only moves when told (the bench measures with perf_counter_ns)."""

    def __init__(self) -> None:
        self.now_ns = 1_000_000

    def __call__(self) -> int:
        return self.now_ns


def busy_device(clock: Clock) -> Uart16550:
    """A device with a stuck TSR, a full TX FIFO, RX data and an armed timeout."""
    uart = Uart16550(clock=clock)
    for offset, value in ((3, 0x80), (0, 0x01), (1, 0x00), (3, 0x03), (2, 0x87), (4, 0x0B)):
        uart.write(offset, value)
    uart.write(1, 0x07)
    uart.write(0, ord("."))
    uart.tx_blocked()
    for byte in b"ABCDEFGHIJKLMNOPQRST":
        uart.write(0, byte)
    uart.receive(b"hello!")
    return uart


def main() -> int:
    """Run the benchmark; print a table and one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="state directory (default: a fresh temporary one)")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--backlog", type=int, default=4096, help="TX backlog bytes")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        clock = Clock()
        uart = busy_device(clock)
        port = PortState(
            rx_backlog=b"k brown fox." * 4,
            tx_backlog=bytes(range(256)) * (args.backlog // 256),
            reader_state=ReaderState.STALLED,
            line_settings=uart.line_settings,
        )
        path = checkpoint_path(directory, "ttyS0")
        write_ns: list[int] = []
        read_ns: list[int] = []
        for generation in range(1, args.rounds + 1):
            clock.now_ns += 1000
            start = time.perf_counter_ns()
            ckpt = Checkpoint(
                meta=CheckpointMeta(
                    uart_name="ttyS0",
                    port="/dev/ttyUSB0",
                    created_unix_ns=time.time_ns(),
                    generation=generation,
                ),
                uart=uart.state(),
                port=port,
            )
            write_checkpoint(path, ckpt)
            write_ns.append(time.perf_counter_ns() - start)
        for _ in range(args.rounds):
            start = time.perf_counter_ns()
            restored = restore(read_checkpoint(path), clock=clock)
            read_ns.append(time.perf_counter_ns() - start)
        assert restored.state().tx_fifo == uart.state().tx_fifo
        size = path.stat().st_size
        filesystem = os.statvfs(directory)

    result = {
        "bench": "checkpoint",
        "rounds": args.rounds,
        "file_bytes": size,
        "tx_backlog_bytes": len(port.tx_backlog),
        "write_median_ms": round(statistics.median(write_ns) / 1e6, 3),
        "write_p90_ms": round(sorted(write_ns)[int(0.9 * len(write_ns))] / 1e6, 3),
        "read_median_ms": round(statistics.median(read_ns) / 1e6, 3),
        "read_p90_ms": round(sorted(read_ns)[int(0.9 * len(read_ns))] / 1e6, 3),
        "target_ms": 2.0,
        "fs_block_size": filesystem.f_bsize,
    }
    print(f"checkpoint bench: {args.rounds} rounds, file {size} bytes, "
          f"TX backlog {len(port.tx_backlog)} bytes")
    print(f"{'operation':<44}{'median ms':>10}{'p90 ms':>10}")
    print(f"{'snapshot + encode + atomic write (2 fsync)':<44}"
          f"{result['write_median_ms']:>10.3f}{result['write_p90_ms']:>10.3f}")
    print(f"{'read + validate + restore':<44}"
          f"{result['read_median_ms']:>10.3f}{result['read_p90_ms']:>10.3f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
