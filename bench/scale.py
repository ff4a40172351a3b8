"""Benchmark: N UARTs, each a busy console both ways, in K daemons; CPU and RSS per process.

``--processes K`` daemons (default 1), each a separate ``python -m uartbridge run`` with its
own config, runtime and state directories, as ``uartbridge@GROUP`` instances of the template
unit would be, serve ``--uarts N`` ``pty:`` UARTs (the daemons create the ptys) split into K
contiguous groups, with the default ``[checkpoint]`` settings (a checkpoint of every UART
every 5 s). ``--load-procs L`` load processes (default: one per 128 UARTs) make the load, each
for a contiguous slice of the UARTs and both sides of each:

- **far end**: the pty slave, opened raw; every 20 ms it writes what is due so that the UART
  receives 1,152 B/s (115200 baud, 8N1, fully busy), and it reads and checks what arrives;
- **guest**: a small polled 16550 driver on the UART's bus socket (8N1, FIFOs on, trigger 14,
  IER = 0). Every 20 ms: one READ_N on RBR (it drains the run of input), then, while bytes are
  due, LSR and on THRE at most 16 bytes with one WRITE_N; so each UART transmits 1,152 B/s.
  A WRITE_N and the LSR read after it leave in one ``send``.

A load process is one selector loop over its sockets and ptys (no asyncio: an asyncio client
per UART cost more CPU than the daemon at 256 UARTs), and always runs this checkout's pure
Python, so the load is the same for both builds. An IRQ-driven driver would need more round
trips per byte, and with receive always pending an IIR-ident driver starves transmit (Linux
looks at LSR).

Each side sends exactly ``round(1152 × seconds)`` bytes per UART, a per-UART pattern, and
checks that the other side's bytes arrive once and in order. Measured over the load window,
from ``/proc/PID/stat`` (utime + stime, % of one core): every daemon's CPU and their sum, and
every load process's; each daemon's RSS (VmHWM, the peak); the time the last byte arrived
after the load stopped; and the CPU the daemons needed for the whole load (their CPU until the
last byte arrived, divided by the window), which the target applies to: in the window they
get only what the machine gives them. It **keeps up** when nothing is missing or out of
order and every byte arrived within ``DRAIN_TARGET_S`` of the end of the load. The target
for the daemons' CPU is issue 12's per-UART budget: 25 % of a core for 64 UARTs, so 100 % for
256.

Run: ``python bench/scale.py [--runs 5] [--seconds 30] [--uarts 64] [--processes 1]
[--load-procs L] [--build both|pure|compiled] [--event-loop auto|asyncio|uvloop]
[--profile FILE]``. Prints a table (medians over runs) and one JSON line. ``--profile FILE``
(one build, ``--build pure`` to see the Python) runs the first daemon under cProfile and
prints its top functions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pstats
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _builds import BUILD_ENV, TREE_ENV, add_build_args, check_build, side_by_side
from _common import (
    REPO,
    Daemon,
    Figure,
    add_runs_arg,
    cpu_seconds,
    json_line,
    machine_busy_seconds,
    open_raw,
    print_table,
    rss_bytes,
    stop_process,
    temp_dir,
    wait_for,
)

from uartbridge.bus.codec import (
    ErrorFrame,
    FrameDecoder,
    Read,
    ReadN,
    ReadNReply,
    ReadReply,
    WriteN,
    encode,
)
from uartbridge.client import BusClient

RATE_BPS = 1152  # bytes per second per direction per UART
TICK_S = 0.020
UARTS_PER_LOAD_PROC = 128
DRAIN_TARGET_S = 1.0  # "keeps up": every byte in within this long after the load stopped
CPU_PCT_PER_UART = 25.0 / 64  # issue 12: 64 UARTs <= 25 % of a core, 256 <= 100 %
RBR = THR = 0
IER, IIR, FCR, LCR, MCR, LSR = 1, 2, 2, 3, 4, 5
LSR_THRE = 0x20
LSR_ERRORS = 0x1E  # OE PE FE BI
READ_N_RBR = encode(ReadN(RBR, 256))
READ_LSR = encode(Read(LSR))


def stream(uart: int, direction: int, n: int) -> bytes:
    """The ``n`` bytes one side sends on one UART (direction 0: guest→far, 1: far→guest)."""
    return bytes((i + (i >> 8) * 3 + uart * 11 + direction * 101) & 0xFF for i in range(n))


def uart_name(i: int) -> str:
    return f"u{i:03d}"


def split(n: int, parts: int) -> list[range]:
    """``range(n)`` in ``parts`` contiguous slices of (nearly) equal size."""
    return [range(n * k // parts, n * (k + 1) // parts) for k in range(parts)]


# -- a load process --------------------------------------------------------------------------

IDLE, WANT_READ_N, WANT_LSR = 0, 1, 2


class Line:
    """One UART as the load sees it: the guest's bus socket and the far end's pty."""

    def __init__(self, index: int, bus: str, pty: str, total: int) -> None:
        self.index = index
        self.total = total
        client = BusClient(bus, timeout_s=30.0)
        try:  # the driver's startup, with the blocking client; the loop takes its socket
            for offset, value in ((LCR, 0x83), (0, 1), (1, 0), (LCR, 0x03), (FCR, 0x01),
                                  (FCR, 0xC7), (MCR, 0x0B), (IER, 0)):
                client.write(offset, value)
            client.read_regs(LSR, RBR, IIR)
            client.sync()  # every reply is in: nothing is left in the client's buffer
            self.sock = socket.socket(fileno=os.dup(client.fileno()))
        finally:
            client.close()
        self.sock.setblocking(True)  # only read when the selector says so; sends are small
        self.decoder = FrameDecoder()
        self.state = IDLE
        self.due = 0
        self.tx = bytearray()
        self.queued = 0
        self.guest_out = stream(index, 0, total)
        self.guest_expect = stream(index, 1, total)
        self.guest_got = 0
        self.fd = open_raw(pty)
        self.far_out = stream(index, 1, total)
        self.far_expect = stream(index, 0, total)
        self.far_sent = 0
        self.far_got = 0
        self.bad = 0
        self.line_errors = 0
        self.late_polls = 0
        self.last_in = 0.0  # monotonic time of the last byte that arrived, either side

    @property
    def done(self) -> bool:
        return (self.far_sent == self.total and self.far_got >= self.total
                and self.queued == self.total and not self.tx and self.guest_got >= self.total)

    def tick(self, due: int) -> None:
        """The far end writes what is due; the guest starts its poll (if the last one is over)."""
        if self.far_sent < due:
            with contextlib.suppress(BlockingIOError):
                self.far_sent += os.write(self.fd, self.far_out[self.far_sent : due])
        if self.state != IDLE:
            self.late_polls += 1
            return
        self.due = due
        self.sock.send(READ_N_RBR)
        self.state = WANT_READ_N

    def far_readable(self, now: float) -> None:
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        pos = self.far_got
        if chunk != self.far_expect[pos : pos + len(chunk)]:
            self.bad += 1
        self.far_got = pos + len(chunk)
        self.last_in = now

    def bus_readable(self, now: float) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise RuntimeError(f"{uart_name(self.index)}: the daemon closed the bus")
        self.decoder.feed(data)
        while (frame := self.decoder.next_frame()) is not None:
            if isinstance(frame, ReadNReply):
                if frame.data:
                    pos = self.guest_got
                    if frame.data != self.guest_expect[pos : pos + len(frame.data)]:
                        self.bad += 1
                    self.guest_got = pos + len(frame.data)
                    self.last_in = now
                if self.queued < self.due:
                    self.tx += self.guest_out[self.queued : self.due]
                    self.queued = self.due
                self._next_lsr()
            elif isinstance(frame, ReadReply):
                if frame.value & LSR_ERRORS:
                    self.line_errors += 1
                if not frame.value & LSR_THRE:
                    self.state = IDLE
                    continue
                chunk = bytes(self.tx[:16])
                del self.tx[:16]
                self.sock.send(encode(WriteN(THR, chunk)) + (READ_LSR if self.tx else b""))
                self.state = WANT_LSR if self.tx else IDLE
            elif isinstance(frame, ErrorFrame):
                raise RuntimeError(f"{uart_name(self.index)}: {frame}")
            # IRQ frames: IER = 0, the line stays low; nothing to do

    def _next_lsr(self) -> None:
        if self.tx:
            self.sock.send(READ_LSR)
            self.state = WANT_LSR
        else:
            self.state = IDLE


def load_main(spec_path: Path) -> None:
    """A load process: connect and start up its UARTs, print READY, wait for ``go T0`` on
    stdin (T0 on the monotonic clock, the same in every process), run, print one JSON line."""
    spec = json.loads(spec_path.read_text())
    total, deadline_s = spec["total"], spec["deadline_s"]
    lines = [Line(u["index"], u["bus"], u["pty"], total) for u in spec["uarts"]]
    sel = selectors.DefaultSelector()
    for line in lines:
        sel.register(line.sock, selectors.EVENT_READ, line.bus_readable)
        sel.register(line.fd, selectors.EVENT_READ, line.far_readable)
    print("READY", flush=True)
    start = float(sys.stdin.readline().split()[1])
    cpu0 = time.process_time()
    missed_ticks = 0
    next_tick = start
    end_by = start + deadline_s
    time.sleep(max(0.0, start - time.monotonic()))
    while (now := time.monotonic()) < end_by:
        if now >= next_tick:
            due = min(total, round(RATE_BPS * (now - start)))
            for line in lines:
                line.tick(due)
            next_tick += TICK_S
            if next_tick < now:  # a whole tick behind: this process is the bottleneck
                missed_ticks += 1
                next_tick = now + TICK_S
            if all(line.done for line in lines):
                break
        events = sel.select(max(0.0, next_tick - time.monotonic()))
        now = time.monotonic()
        for key, _ in events:
            key.data(now)
    print(json.dumps({
        "far_sent": [x.far_sent for x in lines], "far_got": [x.far_got for x in lines],
        "guest_queued": [x.queued for x in lines], "guest_got": [x.guest_got for x in lines],
        "bad": sum(x.bad for x in lines), "line_errors": sum(x.line_errors for x in lines),
        "late_polls": sum(x.late_polls for x in lines), "missed_ticks": missed_ticks,
        "last_in_s": max(x.last_in for x in lines) - start, "cpu_s": time.process_time() - cpu0,
    }), flush=True)
    for line in lines:
        line.sock.close()
        os.close(line.fd)


# -- the run -------------------------------------------------------------------------------------


def one_run(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    uarts, seconds = args.uarts, args.seconds
    total = round(RATE_BPS * seconds)
    checkpoint = {} if args.checkpoint_interval is None else {
        "interval_s": args.checkpoint_interval}
    daemons = [
        Daemon(root / f"d{k}", [{"name": uart_name(i), "port": "pty:"} for i in group],
               checkpoint=checkpoint,
               python_args=["-m", "cProfile", "-o", str(Path(args.profile).resolve())]
               if args.profile and k == 0 else [])
        for k, group in enumerate(split(uarts, args.processes))
    ]
    owner = {i: d for d, group in zip(daemons, split(uarts, args.processes), strict=True)
             for i in group}
    loads: list[subprocess.Popen[str]] = []
    try:
        for d in daemons:
            d.root.mkdir()
            d.start(timeout_s=120)
        for i in range(uarts):
            wait_for(owner[i].pty(uart_name(i)).exists, 10.0, "the pty links")
        # The load processes run the checkout's pure Python whatever the daemons' build.
        env = dict(os.environ, **{TREE_ENV: str(REPO)})
        env.pop(BUILD_ENV, None)
        for k, part in enumerate(split(uarts, args.load_procs)):
            spec = root / f"load{k}.json"
            spec.write_text(json.dumps({"total": total, "deadline_s": seconds + 20.0, "uarts": [
                {"index": i, "bus": str(owner[i].bus(uart_name(i))),
                 "pty": str(owner[i].pty(uart_name(i)))} for i in part]}))
            loads.append(subprocess.Popen([sys.executable, __file__, "--load", str(spec)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          text=True, env=env, cwd=REPO))
        for proc in loads:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "READY":
                raise RuntimeError("a load process did not start")
        load_avg = os.getloadavg()
        t0 = time.monotonic() + 0.2
        for proc in loads:
            assert proc.stdin is not None
            proc.stdin.write(f"go {t0!r}\n")
            proc.stdin.flush()
        time.sleep(max(0.0, t0 - time.monotonic()))
        pids = [d.pid for d in daemons] + [p.pid for p in loads]
        cpu0 = {pid: cpu_seconds(pid) for pid in pids}
        busy0, _ = machine_busy_seconds()
        start = time.monotonic()
        time.sleep(max(0.0, t0 + seconds - time.monotonic()))
        elapsed = time.monotonic() - start
        cpu = {pid: cpu_seconds(pid) - cpu0[pid] for pid in pids}
        busy = machine_busy_seconds()[0] - busy0
        reports = []
        for proc in loads:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"load process {proc.pid} exited {proc.wait()}")
            reports.append(json.loads(line))
        cpu_all = sum(cpu_seconds(d.pid) - cpu0[d.pid] for d in daemons)
        rss = [rss_bytes(d.pid) for d in daemons]
        for proc in loads:
            proc.wait(timeout=30)
    finally:
        for proc in loads:
            stop_process(proc)
        for d in daemons:
            d.stop()
    far_got = [g for r in reports for g in r["far_got"]]
    guest_got = [g for r in reports for g in r["guest_got"]]
    missing = sum(total - g for g in far_got) + sum(total - g for g in guest_got)
    bad = sum(r["bad"] for r in reports)
    last_in_s = max(r["last_in_s"] for r in reports)
    zero_loss = bad == 0 and all(g == total for g in far_got + guest_got)
    drain_s = last_in_s - seconds
    return {
        "daemon_cpu_pct": [100.0 * cpu[pid] / elapsed for pid in pids[: len(daemons)]],
        "daemon_hwm_mb": [hwm / 1e6 for _, hwm in rss],
        "load_cpu_pct": [100.0 * cpu[pid] / elapsed for pid in pids[len(daemons) :]],
        "cpu_nominal_pct": 100.0 * cpu_all / seconds,
        "elapsed_s": elapsed,
        "machine_busy_pct": 100.0 * busy / elapsed / (os.cpu_count() or 1),
        "load_avg_1min": load_avg[0],
        "drain_s": drain_s,
        "missing": missing,
        "out_of_order_chunks": bad,
        "line_errors": sum(r["line_errors"] for r in reports),
        "late_polls": sum(r["late_polls"] for r in reports),
        "missed_ticks": sum(r["missed_ticks"] for r in reports),
        "bytes_each_way": total * uarts,
        "zero_loss": zero_loss,
        "keeps_up": zero_loss and drain_s <= DRAIN_TARGET_S,
    }


def print_profile(path: str) -> None:
    stats = pstats.Stats(path)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runs_arg(parser)
    parser.add_argument("--seconds", type=float, default=30.0, help="load window per run")
    parser.add_argument("--uarts", type=int, default=64)
    parser.add_argument("--processes", type=int, default=1,
                        help="daemons, the UARTs split evenly between them (default 1)")
    parser.add_argument("--load-procs", type=int, default=None,
                        help=f"load processes (default one per {UARTS_PER_LOAD_PROC} UARTs)")
    parser.add_argument("--checkpoint-interval", type=float, default=None,
                        help="[checkpoint] interval_s for the daemon (default: its default, 5)")
    parser.add_argument("--profile", help="one build: run the first daemon under cProfile, "
                        "write its stats to this file and print the top functions")
    parser.add_argument("--load", help=argparse.SUPPRESS)
    add_build_args(parser)
    args = parser.parse_args()
    if args.load:
        load_main(Path(args.load))
        return
    if not 1 <= args.processes <= args.uarts:
        parser.error("--processes must be 1..--uarts")
    if args.load_procs is None:
        args.load_procs = max(1, math.ceil(args.uarts / UARTS_PER_LOAD_PROC))
    if not 1 <= args.load_procs <= args.uarts:
        parser.error("--load-procs must be 1..--uarts")
    if args.build == "both":
        if args.profile:
            parser.error("--profile needs one build (--build pure or compiled)")
        extra = [] if args.checkpoint_interval is None else [
            "--checkpoint-interval", str(args.checkpoint_interval)]
        side_by_side(__file__, ["--seconds", str(args.seconds), "--uarts", str(args.uarts),
                                "--processes", str(args.processes),
                                "--load-procs", str(args.load_procs), *extra],
                     args.runs, args.event_loop)
        return
    build = check_build(args.build, args.event_loop)

    results = []
    for run in range(args.runs):
        with temp_dir("scale") as root:
            r = one_run(root, args)
        results.append(r)
        per = " + ".join(f"{c:.1f}" for c in r["daemon_cpu_pct"])
        print(f"run {run + 1}: daemons CPU {per} = {sum(r['daemon_cpu_pct']):.1f} % over "
              f"{r['elapsed_s']:.1f} s; load CPU "
              f"{' + '.join(f'{c:.1f}' for c in r['load_cpu_pct'])} %; last byte "
              f"{r['drain_s']:+.2f} s after the window; zero loss: {r['zero_loss']}; "
              f"load average {r['load_avg_1min']:.2f}", flush=True)

    k = args.processes
    target_pct = round(CPU_PCT_PER_UART * args.uarts, 1)
    figures = [
        Figure("daemon_cpu_pct", f"daemons' CPU, sum of {k}, {args.uarts} UARTs", "% core",
               [sum(r["daemon_cpu_pct"]) for r in results]),
        *(Figure(f"daemon{j}_cpu_pct", f"  daemon {j} ({len(g)} UARTs)", "% core",
                 [r["daemon_cpu_pct"][j] for r in results])
          for j, g in enumerate(split(args.uarts, k)) if k > 1),
        Figure("daemon_cpu_max_pct", "  the busiest daemon (one core at most)", "% core",
               [max(r["daemon_cpu_pct"]) for r in results], 100, "<="),
        Figure("daemon_cpu_nominal_pct", "  needed: their CPU s to the last byte / window",
               "% core", [r["cpu_nominal_pct"] for r in results], target_pct, "<="),
        Figure("daemon_rss_peak_mb", "daemon RSS peak (VmHWM), the largest", "MB",
               [max(r["daemon_hwm_mb"]) for r in results], 150, "<="),
        Figure("daemon_rss_sum_mb", "  sum over the daemons", "MB",
               [sum(r["daemon_hwm_mb"]) for r in results]),
        Figure("load_cpu_pct", f"load processes' CPU, sum of {args.load_procs}", "% core",
               [sum(r["load_cpu_pct"]) for r in results]),
        Figure("load_cpu_max_pct", "  the busiest load process", "% core",
               [max(r["load_cpu_pct"]) for r in results]),
        Figure("load_missed_ticks", "  ticks the load fell a whole tick behind", "ticks",
               [r["missed_ticks"] for r in results], digits=0),
        Figure("late_polls", "  polls still running at their UART's next tick", "polls",
               [r["late_polls"] for r in results], digits=0),
        Figure("machine_busy_pct", "whole machine busy (all CPUs)", "%",
               [r["machine_busy_pct"] for r in results]),
        Figure("load_avg_1min", "load average (1 min) at the start", "",
               [r["load_avg_1min"] for r in results], digits=2),
        Figure("drain_s", "last byte in, after the load window", "s",
               [r["drain_s"] for r in results], DRAIN_TARGET_S, "<=", digits=2),
        Figure("missing_bytes", "bytes missing or out of order (both ways)", "bytes",
               [r["missing"] + r["out_of_order_chunks"] for r in results], 0, "<=", digits=0),
    ]
    keeps_up = all(r["keeps_up"] for r in results)
    print_table(
        f"scale bench ({build}): {args.runs} runs, {args.uarts} UARTs (pty:) in {k} daemon(s), "
        f"{RATE_BPS} B/s each way per UART for {args.seconds:g} s, {args.load_procs} load "
        "process(es)",
        figures,
        [f"keeps up (every byte once, in order, both ways, all in within {DRAIN_TARGET_S:g} s "
         f"after the load, every run): {'yes' if keeps_up else 'NO'}; bytes each way per run: "
         f"{results[0]['bytes_each_way']:,}",
         f"CPU target: {CPU_PCT_PER_UART * 64:g} % of a core per 64 UARTs (issue 12); the "
         "default [checkpoint] interval_s = 5 is included",
         "the first CPU line is what the daemons got in the window; when they (or the "
         "machine) cannot keep up the bytes finish late (drain), and 'needed' divides all "
         "their CPU until the last byte by the window: the target applies to that"],
    )
    print(json_line(
        "scale", figures, uarts=args.uarts, processes=k, load_procs=args.load_procs,
        seconds=args.seconds, rate_bps=RATE_BPS, build=build, keeps_up=keeps_up,
        per_daemon_cpu_pct=[r["daemon_cpu_pct"] for r in results],
        per_daemon_rss_peak_mb=[r["daemon_hwm_mb"] for r in results],
        per_load_cpu_pct=[r["load_cpu_pct"] for r in results],
        line_errors=[r["line_errors"] for r in results],
    ))
    if args.profile:
        print_profile(args.profile)
    # A run of one build says "did not keep up" by its exit code; a child of --build both
    # does not (the conductor would stop, and the other build's figures matter as much).
    if not keeps_up and BUILD_ENV not in os.environ:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
