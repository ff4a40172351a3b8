"""Benchmark: the register bus of a real daemon — posted THR writes/s and READ round trips.

The daemon (``python -m uartbridge run``, a separate process) serves one UART whose port is a
socat pty; socat's other side is ``/dev/null``, so the wire takes every byte at once and each
THR write goes through the whole path (frame decode → model → eager ``os.write`` to the pty →
settle). The client is ``uartbridge.client.BusClient`` in this process, over the Unix socket.
The UART is set as a driver leaves it (8N1, FIFOs on), IER = 0 (no IRQ frames).

- posted THR writes/s: ``n`` single WRITE frames (THR), then one SYNC; writes / (time from
  the first send to SYNC_REPLY) — executed writes, not just sent ones.
- READ round trip: ``BusClient.read(SCR)`` timed one by one with ``perf_counter_ns``
  (send READ, receive READ_REPLY); p50 and p99 per run.

Run: ``python bench/bus.py [--runs 5] [--writes 200000] [--reads 20000]``.
Prints a table (medians over runs) and one JSON line.
"""

from __future__ import annotations

import argparse
import time

from _common import (
    Daemon,
    Figure,
    add_runs_arg,
    json_line,
    need_program,
    percentile,
    print_table,
    socket_ping_pong_p50_us,
    stop_process,
    temp_dir,
    wait_for,
)

from uartbridge.client import BusClient

THR, IER, FCR, LCR, SCR = 0, 1, 2, 3, 7


def posted_writes(client: BusClient, n: int) -> float:
    """``n`` posted THR writes + SYNC; executed writes per second."""
    write = client.write
    payload = bytes(range(256))
    start = time.perf_counter()
    for i in range(n):
        write(THR, payload[i & 0xFF])
    client.sync()
    return n / (time.perf_counter() - start)


def read_round_trips(client: BusClient, n: int) -> list[int]:
    """``n`` READ round trips, each in ns."""
    read = client.read
    clock = time.perf_counter_ns
    out = []
    for _ in range(n):
        start = clock()
        read(SCR)
        out.append(clock() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runs_arg(parser)
    parser.add_argument("--writes", type=int, default=200_000, help="posted writes per run")
    parser.add_argument("--reads", type=int, default=20_000, help="READ round trips per run")
    args = parser.parse_args()
    socat = need_program("socat")

    rates: list[float] = []
    p50s: list[float] = []
    p99s: list[float] = []
    with temp_dir("bus") as root:
        link = root / "wire"
        sink = None
        daemon = Daemon(root, [{"name": "uart0", "port": str(link)}])
        try:
            # socat -u: what the daemon writes to the pty slave goes to /dev/null.
            import subprocess

            sink = subprocess.Popen(
                [socat, "-u", f"pty,raw,echo=0,link={link}", "/dev/null"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            wait_for(link.exists, 5.0, "socat's pty link")
            daemon.start()
            with BusClient(daemon.bus()) as client:
                for offset, value in ((LCR, 0x03), (FCR, 0x07), (IER, 0x00)):
                    client.write(offset, value)
                client.sync()
                posted_writes(client, min(args.writes, 20_000))  # warm-up
                read_round_trips(client, 1000)
                for _ in range(args.runs):
                    rates.append(posted_writes(client, args.writes))
                    rtts = read_round_trips(client, args.reads)
                    p50s.append(percentile(rtts, 0.50) / 1000)
                    p99s.append(percentile(rtts, 0.99) / 1000)
        finally:
            daemon.stop()
            stop_process(sink)

    floor_us = socket_ping_pong_p50_us()
    figures = [
        Figure("posted_writes_per_s", "posted single THR writes (executed)", "ops/s",
               rates, 100_000, ">=", 0),
        Figure("read_rtt_p50_us", "READ round trip p50", "us", p50s, 50, "<="),
        Figure("read_rtt_p99_us", "READ round trip p99", "us", p99s, None),
    ]
    print_table(
        f"bus bench: {args.runs} runs, {args.writes} posted writes + SYNC and "
        f"{args.reads} READs per run",
        figures,
        [
            "daemon: separate process, port = socat pty -> /dev/null; client: BusClient",
            "floor: a bare AF_UNIX 1-byte ping-pong between two processes sleeping in recv"
            f" (BusClient spins instead), p50 {floor_us:.1f} us",
        ],
    )
    print(
        json_line(
            "bus", figures, writes_per_run=args.writes, reads_per_run=args.reads,
            socket_ping_pong_p50_us=round(floor_us, 1),
        )
    )


if __name__ == "__main__":
    main()
