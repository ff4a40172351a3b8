"""Benchmark: the daemon's system calls per READ frame and per 16-byte burst (``strace -c -f``).

The daemon serves one UART whose port is link ``a`` of a socat null-modem; a helper process
reads link ``b`` (and checks the data). The guest is ``Guest8250`` in this process (probe,
startup at 115200 8N1, FIFOs on). ``strace -c -f -p PID`` is attached to the daemon (all its
threads) for one phase at a time, and detached (SIGINT, by its PID) after it:

- **READ**: ``--reads`` single ``read(SCR)`` round trips (IER = 0: no IRQ frames), one at a
  time; calls / READ.
- **rx**: the far end writes ``--bursts`` × 16 bytes as fast as the pty takes them; the guest
  services its interrupts (trigger 8); calls / 16 bytes received.
- **burst**: the guest sends ``--bursts`` × 16 bytes interrupt-driven, as Linux's 8250 driver
  does (per THRI: IIR + LSR read, one WRITE_N of at most 16 bytes); calls / 16-byte burst.

Counts, not times: strace slows the daemon, but a call made per frame is made under strace
too. How many round trips the guest makes per burst moves with the machine's load (a pass
that finds IIR empty costs one more), and every round trip costs the daemon a wake-up, a read
and a send; "epoll waits per bus socket read" does not depend on that: above 1.00 the loop
takes rounds that read nothing.

Run: ``python bench/syscalls.py [--runs 3] [--reads 5000] [--bursts 3000]
[--build both|pure|compiled] [--event-loop auto|asyncio|uvloop]``.
Prints a table (medians over runs, and the calls by name of the last run) and one JSON line.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from _builds import add_build_args, check_build, side_by_side
from _common import (
    Daemon,
    Figure,
    Socat,
    add_runs_arg,
    json_line,
    need_program,
    print_table,
    stop_process,
    temp_dir,
    wait_for,
)
from throughput import far_to_guest, guest_to_far, start_far_end, stop_far_end

from uartbridge.client import BusClient
from uartbridge.guest import Guest8250

SCR = 7
IER = 1


def _traced(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("TracerPid:"):
                return int(line.split()[1]) != 0
    return False


def strace_counts(pid: int, out: Path, work: Callable[[], None]) -> dict[str, int]:
    """Run ``work`` with ``strace -c -f`` attached to ``pid``; the calls by name."""
    strace = need_program("strace")
    proc = subprocess.Popen([strace, "-c", "-f", "-q", "-o", str(out), "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _traced(pid), 10.0, "strace attached")
        time.sleep(0.2)  # all threads attached
        work()
    finally:
        # SIGINT: strace detaches and writes its summary.
        stop_process(proc, signal.SIGINT, timeout_s=20.0)
    counts: dict[str, int] = {}
    row = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")
    for line in out.read_text().splitlines():
        match = row.match(line)
        if match and match.group(2) != "total":
            counts[match.group(2)] = int(match.group(1))
    return counts


def per_unit(counts: dict[str, int], units: int) -> dict[str, float]:
    return {name: calls / units for name, calls in sorted(counts.items(), key=lambda kv: -kv[1])}


def loop_waits_per_socket_read(counts: dict[str, float]) -> float:
    """epoll waits per read of the bus socket: 1.00 when every wake-up of the loop is for
    input and nothing else takes a round of its own. (In the burst phase the daemon reads
    nothing but the bus socket: the far end only reads.)"""
    waits = counts.get("epoll_wait", 0.0) + counts.get("epoll_pwait", 0.0)
    reads = counts.get("recvfrom", 0.0) + counts.get("read", 0.0)
    return waits / reads if reads else float("nan")


def one_run(root: Path, reads: int,
            bursts: int) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    pair = Socat(root / "a", root / "b")
    daemon = Daemon(root, [{"name": "uart0", "port": str(root / "a")}],
                    checkpoint={"interval_s": 0})
    proc = conn = None
    try:
        pair.start()
        daemon.start()
        proc, conn = start_far_end(pair.b)
        with BusClient(daemon.bus()) as client:
            guest = Guest8250(client)
            guest.probe()
            guest.startup(115200)
            guest_to_far(guest, conn, 16 * 200)  # warm-up
            ier = client.read(IER)
            client.write(IER, 0)

            def do_reads() -> None:
                read = client.read
                for _ in range(reads):
                    read(SCR)

            read_counts = strace_counts(daemon.pid, root / "reads.strace", do_reads)
            client.write(IER, ier)

            def do_bursts() -> None:
                guest_to_far(guest, conn, 16 * bursts)

            burst_counts = strace_counts(daemon.pid, root / "bursts.strace", do_bursts)

            def do_receive() -> None:
                far_to_guest(guest, conn, 16 * bursts)

            rx_counts = strace_counts(daemon.pid, root / "rx.strace", do_receive)
            guest.shutdown()
        return (per_unit(read_counts, reads), per_unit(burst_counts, bursts),
                per_unit(rx_counts, bursts))
    finally:
        stop_far_end(proc, conn)
        daemon.stop()
        pair.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runs_arg(parser, default=3)
    parser.add_argument("--reads", type=int, default=5000)
    parser.add_argument("--bursts", type=int, default=3000, help="16-byte bursts")
    add_build_args(parser)
    args = parser.parse_args()
    if args.build == "both":
        side_by_side(__file__, ["--reads", str(args.reads), "--bursts", str(args.bursts)],
                     args.runs, args.event_loop)
        return
    build = check_build(args.build, args.event_loop)
    per_read: list[float] = []
    per_burst: list[float] = []
    per_rx: list[float] = []
    waits_per_recv: list[float] = []
    names: dict[str, list[float]] = {}
    last: tuple[dict[str, float], dict[str, float], dict[str, float]] = ({}, {}, {})
    for i in range(args.runs):
        with temp_dir(f"sys{i}") as root:
            last = one_run(root, args.reads, args.bursts)
        per_read.append(sum(last[0].values()))
        per_burst.append(sum(last[1].values()))
        per_rx.append(sum(last[2].values()))
        waits_per_recv.append(loop_waits_per_socket_read(last[1]))
        for phase, counts in zip(("read", "burst", "rx"), last, strict=True):
            for name, value in counts.items():
                names.setdefault(f"{phase}_{name}", []).append(value)
    figures = [
        Figure("syscalls_per_read", "daemon syscalls per READ frame", "calls", per_read,
               digits=2),
        Figure("syscalls_per_burst", "daemon syscalls per 16-byte burst (Guest8250)", "calls",
               per_burst, digits=2),
        Figure("burst_waits_per_socket_read", "bursts: epoll waits per bus socket read",
               "ratio", waits_per_recv, digits=2),
        Figure("syscalls_per_rx_16", "daemon syscalls per 16 bytes far end -> guest", "calls",
               per_rx, digits=2),
    ]
    # The calls by name that make up at least 0.05 per unit (medians over the runs).
    figures += [Figure(f"{key}_per_unit", f"  {key.replace('_', ': ', 1)}", "calls", values,
                       digits=2)
                for key, values in names.items()
                if len(values) == args.runs and sorted(values)[len(values) // 2] >= 0.05]
    print_table(f"syscalls bench ({build}, event loop "
                f"{args.event_loop}): {args.runs} runs, "
                f"{args.reads} READs, {args.bursts} bursts of 16 bytes", figures)
    print(json_line("syscalls", figures, build=build))


if __name__ == "__main__":
    main()
