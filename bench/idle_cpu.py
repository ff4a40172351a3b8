"""Benchmark: CPU of an idle daemon — one UART, a guest attached, no traffic.

The daemon (``python -m uartbridge run``) runs with the default configuration (one UART on
a ``pty:`` port, ``[checkpoint] interval_s = 5``, ``log_level = "info"``), only its runtime
and state directories moved into a temporary directory. A guest is attached: a
``BusClient`` on which ``Guest8250`` did ``probe`` and ``startup`` (FIFOs on, IER = RDI|RLSI)
and which then sits idle (connected, waiting for IRQs). CPU is utime + stime of the daemon's
PID from ``/proc/PID/stat`` (and, finer, the threads' time on CPU from
``/proc/PID/task/*/schedstat``) over a window of ``--seconds`` (default 10), as % of one core.
Clock ticks are 1/``SC_CLK_TCK`` s (usually 10 ms), so over 10 s the resolution is 0.1 %.

Variants, each its own daemon:
- ``far end attached``: a client has the pty slave open (a terminal on the wire).
- ``no far end``: nobody has the pty open (the reader is "disconnected"; inotify watches it).
- ``no periodic checkpoint``: as the first, with ``interval_s = 0``, to show what the
  periodic checkpoint (two of them per 10 s window, each with two fsyncs) costs.

Run: ``python bench/idle_cpu.py [--runs 5] [--seconds 10] [--build both|pure|compiled]
[--event-loop auto|asyncio|uvloop]``: by default the pure and the compiled build side by side
(``_builds.py``: one window per variant per build and round), with their ratio.
Prints a table (medians over runs) and one JSON line.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from _builds import add_build_args, check_build, check_daemon_build, side_by_side
from _common import (
    Daemon,
    Figure,
    add_runs_arg,
    cpu_seconds,
    cpu_seconds_fine,
    json_line,
    open_raw,
    print_table,
    temp_dir,
    wait_for,
)

from uartbridge.client import BusClient
from uartbridge.guest import Guest8250


def measure(
    variant: str, runs: int, seconds: float, build: str
) -> tuple[list[float], list[float], dict[str, Any]]:
    checkpoint = {"interval_s": 0} if variant == "no_checkpoint" else {}
    with temp_dir("idle") as root:
        daemon = Daemon(root, [{"name": "uart0", "port": "pty:"}], checkpoint=checkpoint)
        far = -1
        try:
            daemon.start()
            running = check_daemon_build(daemon.control, build,
                                         os.environ.get("UARTBRIDGE_BENCH_EVENT_LOOP"))
            if variant != "no_far_end":
                wait_for(daemon.pty().exists, 5.0, "the pty link")
                far = open_raw(daemon.pty())
            with BusClient(daemon.bus()) as client:
                guest = Guest8250(client)
                guest.probe()
                guest.startup(115200)
                client.sync()
                time.sleep(1.0)  # let start-up work settle
                out: list[float] = []
                fine: list[float] = []
                for _ in range(runs):
                    before = cpu_seconds(daemon.pid)
                    before_fine = cpu_seconds_fine(daemon.pid)
                    start = time.monotonic()
                    time.sleep(seconds)
                    used = cpu_seconds(daemon.pid) - before
                    after_fine = cpu_seconds_fine(daemon.pid)
                    elapsed = time.monotonic() - start
                    out.append(100.0 * used / elapsed)
                    if before_fine is not None and after_fine is not None:
                        fine.append(100.0 * (after_fine - before_fine) / elapsed)
                if client.poll_events():
                    raise RuntimeError("the IRQ rose while idle")
            checkpoints = sorted(p.name for p in daemon.state_dir.iterdir())
        finally:
            if far >= 0:
                os.close(far)
            daemon.stop()
    return out, fine, {"state_files": checkpoints, "daemon": running}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runs_arg(parser)
    parser.add_argument("--seconds", type=float, default=10.0, help="window per run")
    add_build_args(parser)
    args = parser.parse_args()
    if args.build == "both":
        side_by_side(__file__, ["--seconds", str(args.seconds)], args.runs, args.event_loop)
        return
    build = check_build(args.build, args.event_loop)

    attached, attached_fine, info = measure("far_end", args.runs, args.seconds, args.build)
    no_far, no_far_fine, _ = measure("no_far_end", args.runs, args.seconds, args.build)
    no_ckpt, no_ckpt_fine, _ = measure("no_checkpoint", args.runs, args.seconds, args.build)
    figures = [
        Figure("idle_cpu_pct", "idle CPU, default config, far end attached", "% core",
               attached, 0.5, "<=", 2),
        Figure("idle_cpu_no_far_end_pct", "idle CPU, default config, no far end", "% core",
               no_far, 0.5, "<=", 2),
        Figure("idle_cpu_no_checkpoint_pct", "idle CPU, interval_s = 0, far end attached",
               "% core", no_ckpt, None, "<=", 2),
    ]
    for key, label, values in (
        ("idle_cpu_fine_pct", "  same, from schedstat (ns resolution)", attached_fine),
        ("idle_cpu_no_far_end_fine_pct", "  no far end, from schedstat", no_far_fine),
        ("idle_cpu_no_checkpoint_fine_pct", "  interval_s = 0, from schedstat", no_ckpt_fine),
    ):
        if values:
            figures.append(Figure(key, label, "% core", values, None, "<=", 3))
    print_table(
        f"idle CPU bench ({info['daemon']}): {args.runs} windows of {args.seconds:g} s per "
        "variant, guest attached (Guest8250 startup, IER=RDI|RLSI)",
        figures,
        ["default [checkpoint] interval_s = 5: two periodic checkpoints per 10 s window",
         f"state dir after the run: {', '.join(info['state_files'])}"],
    )
    print(json_line("idle_cpu", figures, seconds=args.seconds, build=build,
                    daemon=info["daemon"]))


if __name__ == "__main__":
    main()
