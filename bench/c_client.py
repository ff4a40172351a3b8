"""Benchmark: READ round trip of the C client (libuartbridge) next to BusClient's, one run.

The daemon (``python -m uartbridge run``, a separate process) serves one UART whose port is a
socat pty whose other side is ``/dev/null``, as in ``bench/bus.py``. The C side is
``clients/c/tests/ub_bench.c``, built with ``make`` into a temporary directory and run as its
own process; the Python side is ``uartbridge.client.BusClient`` in this process. Both read
SCR one READ at a time, each timed around the call (C: ``clock_gettime(CLOCK_MONOTONIC)``,
Python: ``perf_counter_ns``), with the same ``spin_us``. Only one guest may hold the UART, so
they take turns: per run, the C client connects, warms up (1000 READs), measures, and leaves;
then BusClient does the same. Figures are medians over runs of each run's p50 and p99.

Run: ``python bench/c_client.py [--runs 5] [--reads 20000] [--spin-us 100]``.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import subprocess

from _common import (
    REPO,
    Daemon,
    Figure,
    add_runs_arg,
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

from uartbridge.client import BusClient

SCR = 7


def python_run(bus: str, reads: int, spin_us: float) -> tuple[float, float]:
    """(p50, p99) in µs of ``reads`` BusClient.read(SCR) round trips, after a warm-up."""
    with BusClient(bus, spin_us=spin_us) as client:
        read_round_trips(client.read, 1000, SCR)  # warm-up
        times = read_round_trips(client.read, reads, SCR)
    return percentile(times, 0.50) / 1000, percentile(times, 0.99) / 1000


def c_run(program: str, bus: str, reads: int, spin_us: float) -> tuple[float, float]:
    """(p50, p99) in µs of ``reads`` ub_read(SCR) round trips by ub_bench."""
    result = subprocess.run(
        [program, bus, str(reads), str(int(spin_us)), "1"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"ub_bench failed: {result.stderr.strip()}")
    _, p50_ns, p99_ns, _max_ns = result.stdout.split()
    return int(p50_ns) / 1000, int(p99_ns) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runs_arg(parser)
    parser.add_argument("--reads", type=int, default=20_000, help="READ round trips per run")
    parser.add_argument("--spin-us", type=float, default=100.0,
                        help="busy-poll window of both clients (default 100, as both default)")
    args = parser.parse_args()
    socat = need_program("socat")
    make = need_program("make")

    c50: list[float] = []
    c99: list[float] = []
    py50: list[float] = []
    py99: list[float] = []
    with temp_dir("cbench") as root:
        build = root / "build"
        subprocess.run(
            [make, "-s", "-C", str(REPO / "clients" / "c"), f"BUILDDIR={build}",
             f"{build}/ub_bench"],
            check=True, timeout=600,
        )
        link = root / "wire"
        sink = None
        daemon = Daemon(root, [{"name": "uart0", "port": str(link)}])
        try:
            sink = subprocess.Popen(
                [socat, "-u", f"pty,raw,echo=0,link={link}", "/dev/null"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            wait_for(link.exists, 5.0, "socat's pty link")
            daemon.start()
            bus = str(daemon.bus())
            with BusClient(bus) as client:  # as a driver leaves it: 8N1, FIFOs on, IER 0
                for offset, value in ((3, 0x03), (2, 0x07), (1, 0x00)):
                    client.write(offset, value)
                client.sync()
            for _ in range(args.runs):
                p50, p99 = c_run(str(build / "ub_bench"), bus, args.reads, args.spin_us)
                c50.append(p50)
                c99.append(p99)
                p50, p99 = python_run(bus, args.reads, args.spin_us)
                py50.append(p50)
                py99.append(p99)
        finally:
            daemon.stop()
            stop_process(sink)

    floor_us = socket_ping_pong_p50_us()
    figures = [
        Figure("c_read_rtt_p50_us", "C client (libuartbridge) READ p50", "us", c50),
        Figure("c_read_rtt_p99_us", "C client (libuartbridge) READ p99", "us", c99),
        Figure("py_read_rtt_p50_us", "BusClient READ p50", "us", py50),
        Figure("py_read_rtt_p99_us", "BusClient READ p99", "us", py99),
    ]
    print_table(
        f"C client vs BusClient: {args.runs} runs of {args.reads} READ(SCR) each, taking "
        f"turns on one daemon, spin_us {args.spin_us:g}",
        figures,
        [
            "daemon: separate process, port = socat pty -> /dev/null",
            "floor: a bare AF_UNIX 1-byte ping-pong between two processes sleeping in recv,"
            f" p50 {floor_us:.1f} us",
        ],
    )
    print(json_line("c_client", figures, reads_per_run=args.reads, spin_us=args.spin_us,
                    socket_ping_pong_p50_us=round(floor_us, 1)))


if __name__ == "__main__":
    main()
