"""Benchmark: 64 UARTs in one daemon, each a busy console in both directions.

One daemon (a separate process) serves 64 UARTs, each on a ``pty:`` port (the daemon
creates the ptys), with the default ``[checkpoint]`` settings (a checkpoint of every UART
every 5 s). Two more processes make the load:

- **far ends** (one process, ``--far-end`` mode of this script): opens the 64 pty slaves raw
  and, every 20 ms, writes what is due so that each UART receives 1,152 B/s (115200 baud,
  8N1, fully busy); it reads everything that arrives and checks it.
- **guests** (this process): 64 ``AsyncBusClient`` on one asyncio loop with a small polled
  16550 driver each (8N1, FIFOs on, trigger 14, IER = 0). Every 20 ms all 64 are polled
  concurrently: one READ_N on RBR (it drains the run of input), then, while bytes are due, LSR and
  on THRE at most 16 bytes with one WRITE_N; so each UART transmits 1,152 B/s.
  (An IRQ-driven driver in one Python process could not keep 64 UARTs busy both ways on
  this 2-CPU machine: it needs more round trips per byte, and with receive always pending
  an IIR-ident driver starves transmit.)

Each side sends exactly ``round(1152 × seconds)`` bytes per UART, a per-UART pattern, and
checks that the other side's bytes arrive once and in order (zero loss). Measured: the
daemon's CPU (utime + stime from ``/proc/PID/stat`` over the load window, % of one core) and
its RSS (VmHWM, the peak, and VmRSS at the end, from ``/proc/PID/status``).

Run: ``python bench/scale.py [--runs 5] [--seconds 30] [--uarts 64]
[--build both|pure|compiled] [--event-loop auto|asyncio|uvloop]``.
Prints a table (medians over runs) and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _builds import add_build_args, check_build, side_by_side
from _common import (
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

from uartbridge.client import AsyncBusClient

RATE_BPS = 1152  # bytes per second per direction per UART
TICK_S = 0.020
RBR = THR = 0
IER, IIR, FCR, LCR, MCR, LSR = 1, 2, 2, 3, 4, 5
IER_RDI, IER_THRI, IER_RLSI = 0x01, 0x02, 0x04
LSR_ERRORS = 0x1E  # OE PE FE BI


def stream(uart: int, direction: int, n: int) -> bytes:
    """The ``n`` bytes one side sends on one UART (direction 0: guest→far, 1: far→guest)."""
    return bytes((i + (i >> 8) * 3 + uart * 11 + direction * 101) & 0xFF for i in range(n))


def uart_name(i: int) -> str:
    return f"u{i:02d}"


# -- far ends -----------------------------------------------------------------------------------


def far_end_main(runtime: Path, uarts: int, total: int, deadline_s: float) -> None:
    """The far-end process: report READY, wait for ``go`` on stdin, run, print JSON."""
    fds = [open_raw(runtime / f"{uart_name(i)}.pty") for i in range(uarts)]
    out_streams = [stream(i, 1, total) for i in range(uarts)]
    in_expect = [stream(i, 0, total) for i in range(uarts)]
    sent = [0] * uarts
    got = [0] * uarts
    bad = [0] * uarts
    sel = selectors.DefaultSelector()
    for i, fd in enumerate(fds):
        sel.register(fd, selectors.EVENT_READ, i)
    print("READY", flush=True)
    sys.stdin.readline()
    start = time.monotonic()
    next_tick = start
    end_by = start + deadline_s
    while time.monotonic() < end_by:
        now = time.monotonic()
        if now >= next_tick:
            due = min(total, round(RATE_BPS * (now - start)))
            for i in range(uarts):
                if sent[i] < due:
                    with contextlib.suppress(BlockingIOError):
                        sent[i] += os.write(fds[i], out_streams[i][sent[i] : due])
            next_tick += TICK_S
        for key, _ in sel.select(max(0.0, next_tick - time.monotonic())):
            i = key.data
            try:
                chunk = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            pos = got[i]
            if chunk != in_expect[i][pos : pos + len(chunk)]:
                bad[i] += 1
            got[i] = pos + len(chunk)
        if all(s == total for s in sent) and all(g >= total for g in got):
            break
    print(json.dumps({"sent": sent, "got": got, "bad": bad,
                      "cpu_s": time.process_time()}), flush=True)
    for fd in fds:
        os.close(fd)


# -- guests ------------------------------------------------------------------------------------


class Guest:
    """A small polled 16550 driver on one AsyncBusClient (all 64 polled every tick)."""

    def __init__(self, index: int, client: AsyncBusClient, total: int) -> None:
        self.index = index
        self.client = client
        self.tx = bytearray()
        self.out = stream(index, 0, total)
        self.expect = stream(index, 1, total)
        self.total = total
        self.queued = 0
        self.got = 0
        self.bad = 0
        self.line_errors = 0

    @property
    def done(self) -> bool:
        return self.queued == self.total and not self.tx and self.got >= self.total

    async def startup(self) -> None:
        c = self.client
        for offset, value in ((LCR, 0x83), (0, 1), (1, 0), (LCR, 0x03), (FCR, 0x01),
                              (FCR, 0xC7), (MCR, 0x0B), (IER, 0)):
            await c.write(offset, value)
        await c.read(LSR)
        await c.read(RBR)
        await c.read(IIR)
        await c.sync()

    async def poll(self, due: int) -> None:
        """One tick: read what RBR has (one READ_N drains the run), then THR 16 bytes per THRE."""
        c = self.client
        if data := await c.read_many(RBR, 256):
            pos = self.got
            if data != self.expect[pos : pos + len(data)]:
                self.bad += 1
            self.got = pos + len(data)
        if self.queued < due:
            self.tx += self.out[self.queued : due]
            self.queued = due
        while self.tx:
            lsr = await c.read(LSR)
            if lsr & LSR_ERRORS:
                self.line_errors += 1
            if not lsr & 0x20:  # THRE
                break
            chunk = bytes(self.tx[:16])
            del self.tx[:16]
            await c.write_many(THR, chunk)


async def drive(guests: list[Guest], total: int, end_by: float) -> None:
    """Every TICK_S, poll every UART (concurrently); stop when all is sent and received."""
    start = time.monotonic()
    next_tick = start
    while time.monotonic() < end_by and not all(g.done for g in guests):
        due = min(total, round(RATE_BPS * (time.monotonic() - start)))
        await asyncio.gather(*(g.poll(due) for g in guests))
        next_tick += TICK_S
        await asyncio.sleep(max(0.0, next_tick - time.monotonic()))


async def load(daemon: Daemon, far: subprocess.Popen[str], uarts: int, total: int,
               seconds: float, deadline_s: float) -> dict[str, Any]:
    """Connect and start up the 64 guests, start the far end, run, measure the daemon."""
    clients = [await AsyncBusClient.connect(daemon.bus(uart_name(i))) for i in range(uarts)]
    try:
        guests = [Guest(i, c, total) for i, c in enumerate(clients)]
        await asyncio.gather(*(g.startup() for g in guests))
        await asyncio.sleep(0.5)
        assert far.stdin is not None
        cpu0 = cpu_seconds(daemon.pid)
        busy0, _ = machine_busy_seconds()
        load0 = time.process_time()
        t0 = time.monotonic()
        far.stdin.write("go\n")
        far.stdin.flush()
        end_by = t0 + deadline_s
        window: dict[str, float] = {}

        async def sample() -> None:
            # CPU over exactly the load window (the far end and the guests generate for
            # ``seconds``); draining what is still in flight afterwards is reported apart.
            await asyncio.sleep(max(0.0, t0 + seconds - time.monotonic()))
            window["elapsed"] = time.monotonic() - t0
            window["cpu"] = cpu_seconds(daemon.pid) - cpu0
            window["load_cpu"] = time.process_time() - load0
            window["machine_busy"] = machine_busy_seconds()[0] - busy0

        await asyncio.gather(sample(), drive(guests, total, end_by))
        finished_s = time.monotonic() - t0
        cpu_all = cpu_seconds(daemon.pid) - cpu0
        rss, hwm = rss_bytes(daemon.pid)
    finally:
        for c in clients:
            await c.close()
    return {"guests": guests, "elapsed": window["elapsed"], "cpu": window["cpu"],
            "load_cpu": window["load_cpu"], "machine_busy": window["machine_busy"],
            "finished_s": finished_s, "cpu_all": cpu_all, "rss": rss, "hwm": hwm}


# -- the run -------------------------------------------------------------------------------------


def one_run(root: Path, uarts: int, seconds: float, interval_s: float | None) -> dict[str, Any]:
    total = round(RATE_BPS * seconds)
    deadline_s = seconds + 20.0
    checkpoint = {} if interval_s is None else {"interval_s": interval_s}
    daemon = Daemon(root, [{"name": uart_name(i), "port": "pty:"} for i in range(uarts)],
                    checkpoint=checkpoint)
    far = None
    try:
        daemon.start(timeout_s=60)
        for i in range(uarts):
            wait_for(daemon.pty(uart_name(i)).exists, 5.0, "the pty links")
        far = subprocess.Popen(
            [sys.executable, __file__, "--far-end", str(daemon.runtime_dir),
             "--uarts", str(uarts), "--total", str(total), "--deadline", str(deadline_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert far.stdin is not None and far.stdout is not None
        if far.stdout.readline().strip() != "READY":
            raise RuntimeError("the far-end process did not start")
        measured = asyncio.run(load(daemon, far, uarts, total, seconds, deadline_s))
        guests: list[Guest] = measured["guests"]
        elapsed, cpu, load_cpu = measured["elapsed"], measured["cpu"], measured["load_cpu"]
        rss, hwm = measured["rss"], measured["hwm"]
        far_report = json.loads(far.stdout.readline())
        far.wait(timeout=30)
    finally:
        stop_process(far)
        daemon.stop()
    lost_to_far = sum(total - g for g in far_report["got"])
    lost_to_guest = sum(total - g.got for g in guests)
    errors = sum(far_report["bad"]) + sum(g.bad for g in guests)
    return {
        "cpu_pct": 100.0 * cpu / elapsed,
        "elapsed_s": elapsed,
        "cpu_nominal_pct": 100.0 * measured["cpu_all"] / seconds,
        "drain_s": measured["finished_s"] - seconds,
        "rss_mb": rss / 1e6,
        "hwm_mb": hwm / 1e6,
        "load_cpu_pct": 100.0 * load_cpu / elapsed,
        "machine_busy_pct": 100.0 * measured["machine_busy"] / elapsed / (os.cpu_count() or 1),
        "far_cpu_s": far_report["cpu_s"],
        "bytes_each_way": total * uarts,
        "missing_at_far": lost_to_far,
        "missing_at_guests": lost_to_guest,
        "out_of_order_chunks": errors,
        "line_errors": sum(g.line_errors for g in guests),
        "zero_loss": lost_to_far == 0 and lost_to_guest == 0 and errors == 0
        and all(g == total for g in far_report["got"])
        and all(g.got == total for g in guests),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runs_arg(parser)
    parser.add_argument("--seconds", type=float, default=30.0, help="load window per run")
    parser.add_argument("--uarts", type=int, default=64)
    parser.add_argument("--checkpoint-interval", type=float, default=None,
                        help="[checkpoint] interval_s for the daemon (default: its default, 5)")
    parser.add_argument("--far-end", help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    add_build_args(parser)
    args = parser.parse_args()
    if args.far_end:
        far_end_main(Path(args.far_end), args.uarts, args.total, args.deadline)
        return
    if args.build == "both":
        extra = [] if args.checkpoint_interval is None else [
            "--checkpoint-interval", str(args.checkpoint_interval)]
        side_by_side(__file__, ["--seconds", str(args.seconds), "--uarts", str(args.uarts),
                                *extra], args.runs, args.event_loop)
        return
    build = check_build(args.build, args.event_loop)

    results = []
    for run in range(args.runs):
        with temp_dir("scale") as root:
            result = one_run(root, args.uarts, args.seconds, args.checkpoint_interval)
        results.append(result)
        print(f"run {run + 1}: daemon CPU {result['cpu_pct']:.1f} % over "
              f"{result['elapsed_s']:.1f} s, all bytes in {result['drain_s']:.2f} s after the "
              f"window, RSS peak {result['hwm_mb']:.1f} MB, zero loss: {result['zero_loss']}",
              flush=True)

    figures = [
        Figure("daemon_cpu_pct", f"daemon CPU, {args.uarts} UARTs busy both ways",
               "% core", [r["cpu_pct"] for r in results], 50, "<="),
        Figure("daemon_cpu_nominal_pct", "  all bytes moved: daemon CPU s / window s", "% core",
               [r["cpu_nominal_pct"] for r in results]),
        Figure("daemon_rss_peak_mb", "daemon RSS, peak (VmHWM)", "MB",
               [r["hwm_mb"] for r in results], 150, "<="),
        Figure("daemon_rss_end_mb", "daemon RSS at the end (VmRSS)", "MB",
               [r["rss_mb"] for r in results]),
        Figure("load_cpu_pct", "load process (64 guests) CPU", "% core",
               [r["load_cpu_pct"] for r in results]),
        Figure("machine_busy_pct", "whole machine busy (all CPUs)", "%",
               [r["machine_busy_pct"] for r in results]),
        Figure("drain_s", "last byte in, after the load window", "s",
               [r["drain_s"] for r in results], digits=2),
    ]
    all_ok = all(r["zero_loss"] for r in results)
    print_table(
        f"scale bench ({build}): {args.runs} runs, {args.uarts} UARTs (pty:), {RATE_BPS} B/s "
        f"each way per UART for {args.seconds:g} s",
        figures,
        [f"zero loss (every byte once, in order, both directions, every run): "
         f"{'yes' if all_ok else 'NO'}; bytes each way per run: "
         f"{results[0]['bytes_each_way']:,}",
         "default [checkpoint] interval_s = 5 (64 checkpoints every 5 s) is included",
         "when the machine is saturated the bytes finish late (drain); the second CPU line "
         "divides all the daemon's CPU for all the bytes by the window"],
    )
    print(json_line(
        "scale", figures, uarts=args.uarts, seconds=args.seconds, rate_bps=RATE_BPS, build=build,
        zero_loss=all_ok,
        loss={k: [r[k] for r in results]
              for k in ("missing_at_far", "missing_at_guests", "out_of_order_chunks")},
    ))
    if not all_ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
