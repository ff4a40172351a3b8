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
- TCP admission cost: the same UART also listens on loopback TCP. ``--tcp-conns`` times
  (connect, HELLO, HELLO_REPLY, close) as root; the daemon's CPU time (``/proc/PID/stat``)
  per connection, with the host's TCP table as it is and again after ``--tcp-rows`` extra
  TIME_WAIT rows were made (any user can grow that table: a lookup that scans it, as reading
  ``/proc/net/tcp`` does, costs per connection what the table holds).

Run: ``python bench/bus.py [--runs 5] [--writes 200000] [--reads 20000] [--tcp-conns 1000]
[--tcp-rows 15000] [--build both|pure|compiled] [--event-loop auto|asyncio|uvloop]``.
Prints a table (medians over runs) and one JSON line.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import time

from _builds import add_build_args, check_build, side_by_side
from _common import (
    Daemon,
    Figure,
    add_runs_arg,
    cpu_seconds,
    json_line,
    need_program,
    percentile,
    print_table,
    read_round_trips,
    socket_ping_pong_p50_us,
    stop_process,
    temp_dir,
    wait_for,
)

from uartbridge.bus import Hello, HelloReply, decode_frame, encode
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


def tcp_admissions(pid: int, port: int, n: int) -> float:
    """``n`` loopback TCP connections (connect, HELLO, HELLO_REPLY, close); daemon CPU µs each."""
    hello = encode(Hello(1))
    start = cpu_seconds(pid)
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(hello)
            reply = b""
            while len(reply) < 3 or len(reply) < 2 + int.from_bytes(reply[:2], "big"):
                chunk = conn.recv(4096)
                if not chunk:
                    raise RuntimeError(f"TCP peer refused: {reply!r}")
                reply += chunk
            assert isinstance(decode_frame(reply[2], reply[3:]), HelloReply)
        # The slot frees when the daemon sees our close; wait for it so the next one is served.
        time.sleep(0.002)
    return (cpu_seconds(pid) - start) / n * 1e6


def grow_tcp_table(rows: int) -> None:
    """``rows`` TIME_WAIT sockets in this host's TCP table (they last tcp_fin_timeout, 60 s)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        for _ in range(rows):
            client = socket.create_connection(("127.0.0.1", port))
            accepted, _ = listener.accept()
            client.close()  # the side closing first keeps the TIME_WAIT row
            accepted.close()
    finally:
        listener.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runs_arg(parser)
    parser.add_argument("--writes", type=int, default=200_000, help="posted writes per run")
    parser.add_argument("--reads", type=int, default=20_000, help="READ round trips per run")
    parser.add_argument("--tcp-conns", type=int, default=1000, help="TCP admissions per run")
    parser.add_argument("--tcp-rows", type=int, default=15_000,
                        help="extra TIME_WAIT rows for the grown-table case")
    add_build_args(parser)
    args = parser.parse_args()
    if args.build == "both":
        side_by_side(__file__, ["--writes", str(args.writes), "--reads", str(args.reads),
                                "--tcp-conns", str(args.tcp_conns),
                                "--tcp-rows", str(args.tcp_rows)], args.runs, args.event_loop)
        return
    build = check_build(args.build, args.event_loop)
    socat = need_program("socat")

    rates: list[float] = []
    p50s: list[float] = []
    p99s: list[float] = []
    tcp_small: list[float] = []
    tcp_grown: list[float] = []
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        tcp_port = probe.getsockname()[1]
    with temp_dir("bus") as root:
        link = root / "wire"
        sink = None
        daemon = Daemon(root, [{"name": "uart0", "port": str(link),
                                "bus_tcp": f"127.0.0.1:{tcp_port}"}])
        try:
            # socat -u: what the daemon writes to the pty slave goes to /dev/null.
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
                read_round_trips(client.read, 1000)
                for _ in range(args.runs):
                    rates.append(posted_writes(client, args.writes))
                    rtts = read_round_trips(client.read, args.reads)
                    p50s.append(percentile(rtts, 0.50) / 1000)
                    p99s.append(percentile(rtts, 0.99) / 1000)
            if args.tcp_conns:
                tcp_admissions(daemon.pid, tcp_port, 50)  # warm-up
                for _ in range(args.runs):
                    tcp_small.append(tcp_admissions(daemon.pid, tcp_port, args.tcp_conns))
                grow_tcp_table(args.tcp_rows)
                for _ in range(args.runs):
                    tcp_grown.append(tcp_admissions(daemon.pid, tcp_port, args.tcp_conns))
        finally:
            daemon.stop()
            stop_process(sink)

    floor_us = socket_ping_pong_p50_us()
    figures = [
        Figure("posted_writes_per_s", "posted single THR writes (executed)", "ops/s",
               rates, 100_000, ">=", 0),
        Figure("read_rtt_p50_us", "READ round trip p50", "us", p50s, 50, "<="),
        Figure("read_rtt_p99_us", "READ round trip p99", "us", p99s, None),
        Figure("ping_pong_floor_us", "bare AF_UNIX ping-pong p50 (the floor)", "us",
               [floor_us], None),
        Figure("read_rtt_p50_over_floor", "READ p50 / floor", "ratio",
               [statistics.median(p50s) / floor_us], 2, "<=", 2),
    ]
    if tcp_small:
        figures += [
            Figure("tcp_admission_cpu_us", "TCP connect+HELLO: daemon CPU each", "us",
                   tcp_small, None, "<=", 0),
            Figure("tcp_admission_cpu_grown_us",
                   f"same, {args.tcp_rows:,} more rows in the TCP table", "us",
                   tcp_grown, None, "<=", 0),
        ]
    print_table(
        f"bus bench ({build}): {args.runs} runs, {args.writes} posted writes + SYNC and "
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
            tcp_conns_per_run=args.tcp_conns, tcp_extra_rows=args.tcp_rows,
            socket_ping_pong_p50_us=round(floor_us, 1), build=build,
        )
    )


if __name__ == "__main__":
    main()
