"""Benchmark: bytes/s through a real daemon and a socat pty, driven by the reference driver.

The daemon (a separate process) serves one UART whose port is link ``a`` of a socat
null-modem; the far end is link ``b``, opened raw by a helper process of this script. The
guest is ``uartbridge.guest.Guest8250`` in this process: probe, startup at 115200 8N1 (FIFOs
on, trigger 8), then interrupt-driven ``service()`` — on THRI at most 16 bytes per THRE (one
WRITE_N), on RDI/CTI ``rx_chars`` — exactly as the Linux 8250 driver would.

- guest → far end: the guest queues ``--bytes`` bytes; the far end reads until it has them
  all (and checks them); bytes / (time from the first ``write`` to the far end's last byte).
- far end → guest: the far end writes ``--bytes`` bytes as fast as the pty takes them; the
  guest services interrupts until it has them all (and checks them).
- ceiling: socat's own pty→pty throughput on a second null-modem, one process writing link
  ``a`` and another reading link ``b``, with the same amount of data.

The model paces nothing at the baud rate (a byte leaves when the OS took it), so these are
figures of the daemon's byte path, not of 115200 baud.

Run: ``python bench/throughput.py [--runs 5] [--bytes 1000000] [--build both|pure|compiled]
[--event-loop auto|asyncio|uvloop]``.
Prints a table (medians over runs) and one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import select
import time
from multiprocessing.connection import Connection
from pathlib import Path

from _builds import add_build_args, check_build, side_by_side
from _common import (
    Daemon,
    Figure,
    Socat,
    add_runs_arg,
    json_line,
    open_raw,
    print_table,
    temp_dir,
)

from uartbridge.client import BusClient
from uartbridge.guest import Guest8250


def pattern(n: int) -> bytes:
    """``n`` bytes of a pattern that shows loss, duplication and reordering."""
    block = bytes((i * 7 + (i >> 8)) & 0xFF for i in range(65536))
    reps = n // len(block) + 1
    return (block * reps)[:n]


# -- far-end helper process ------------------------------------------------------------------


def far_end(path: str, conn: Connection) -> None:
    """Serve commands from the parent: ("read", n) or ("write", n); reply with timestamps."""
    fd = open_raw(path)
    try:
        while True:
            cmd = conn.recv()
            if cmd is None:
                return
            op, n = cmd
            data = pattern(n)
            if op == "read":
                conn.send("ready")
                got = bytearray()
                while len(got) < n:
                    select.select([fd], [], [], 5.0)
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        break
                    got += chunk
                end = time.perf_counter()
                conn.send((end, bytes(got) == data, len(got)))
            elif op == "write":
                conn.send("ready")
                conn.recv()  # go
                start = time.perf_counter()
                view = memoryview(data)
                pos = 0
                while pos < n:
                    select.select([], [fd], [], 5.0)
                    try:
                        pos += os.write(fd, view[pos : pos + 4096])
                    except BlockingIOError:
                        continue
                conn.send(start)
            elif op == "drain":
                # Discard whatever is pending (between runs).
                while select.select([fd], [], [], 0.1)[0]:
                    try:
                        os.read(fd, 65536)
                    except BlockingIOError:
                        break
                conn.send("drained")
    finally:
        os.close(fd)


def start_far_end(path: Path) -> tuple[mp.process.BaseProcess, Connection]:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=far_end, args=(str(path), child), daemon=True)
    proc.start()
    return proc, parent


def stop_far_end(proc: mp.process.BaseProcess | None, conn: Connection | None) -> None:
    if conn is not None:
        with contextlib.suppress(OSError):
            conn.send(None)
    if proc is not None:
        proc.join(5.0)
        if proc.is_alive():
            proc.terminate()  # by its PID (multiprocessing sends SIGTERM to proc.pid)
            proc.join(5.0)


# -- guest side --------------------------------------------------------------------------------


def guest_to_far(guest: Guest8250, conn: Connection, n: int) -> float:
    conn.send(("read", n))
    assert conn.recv() == "ready"
    data = pattern(n)
    start = time.perf_counter()
    guest.write(data)
    while guest.tx_queued:
        guest.service(1.0)
    end, ok, got = conn.recv()
    if not ok:
        raise RuntimeError(f"guest -> far end: {got} of {n} bytes arrived, or not in order")
    return n / (end - start)


def far_to_guest(guest: Guest8250, conn: Connection, n: int) -> float:
    guest.read()
    conn.send(("write", n))
    assert conn.recv() == "ready"
    conn.send("go")
    got = bytearray()
    deadline = time.monotonic() + 120
    while len(got) < n and time.monotonic() < deadline:
        guest.service(1.0)
        got += guest.read()
    end = time.perf_counter()
    start = conn.recv()
    if bytes(got) != pattern(n):
        raise RuntimeError(f"far end -> guest: {len(got)} of {n} bytes, or not in order")
    return n / (end - start)


def socat_ceiling(root: Path, n: int) -> float:
    """socat pty→pty: a helper writes link a, this process reads link b."""
    pair = Socat(root / "ceil-a", root / "ceil-b").start()
    proc = conn = None
    try:
        proc, conn = start_far_end(pair.a)
        fd = open_raw(pair.b)
        try:
            conn.send(("write", n))
            assert conn.recv() == "ready"
            conn.send("go")
            got = 0
            while got < n:
                select.select([fd], [], [], 5.0)
                try:
                    got += len(os.read(fd, 65536))
                except BlockingIOError:
                    continue
            end = time.perf_counter()
            start = conn.recv()
        finally:
            os.close(fd)
        return n / (end - start)
    finally:
        stop_far_end(proc, conn)
        pair.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runs_arg(parser)
    parser.add_argument("--bytes", type=int, default=1_000_000, help="bytes per direction")
    add_build_args(parser)
    args = parser.parse_args()
    if args.build == "both":
        side_by_side(__file__, ["--bytes", str(args.bytes)], args.runs, args.event_loop)
        return
    build = check_build(args.build, args.event_loop)
    n = args.bytes

    tx: list[float] = []
    rx: list[float] = []
    ceiling: list[float] = []
    with temp_dir("tput") as root:
        pair = Socat(root / "a", root / "b")
        daemon = Daemon(root, [{"name": "uart0", "port": str(root / "a")}])
        proc = conn = None
        try:
            pair.start()
            daemon.start()
            proc, conn = start_far_end(pair.b)
            with BusClient(daemon.bus()) as client:
                guest = Guest8250(client)
                kind = guest.probe()
                guest.startup(115200)
                guest_to_far(guest, conn, min(n, 50_000))  # warm-up
                far_to_guest(guest, conn, min(n, 50_000))
                for _ in range(args.runs):
                    tx.append(guest_to_far(guest, conn, n) / 1000)
                    rx.append(far_to_guest(guest, conn, n) / 1000)
                    ceiling.append(socat_ceiling(root, n) / 1000)
                counters = guest.counters
                guest.shutdown()
        finally:
            stop_far_end(proc, conn)
            daemon.stop()
            pair.stop()

    ratio_tx = [t / c for t, c in zip(tx, ceiling, strict=True)]
    ratio_rx = [r / c for r, c in zip(rx, ceiling, strict=True)]
    figures = [
        Figure("guest_to_far_kBps", "guest -> far end (Guest8250, 16 B/THRE)", "kB/s",
               tx, 300, ">="),
        Figure("far_to_guest_kBps", "far end -> guest (Guest8250, trigger 8)", "kB/s",
               rx, 300, ">="),
        Figure("socat_ceiling_kBps", "socat pty -> pty (ceiling)", "kB/s", ceiling),
        Figure("ratio_guest_to_far", "guest -> far end / ceiling", "ratio", ratio_tx,
               digits=3),
        Figure("ratio_far_to_guest", "far end -> guest / ceiling", "ratio", ratio_rx,
               digits=3),
    ]
    print_table(
        f"throughput bench ({build}): {args.runs} runs, {n} bytes each way per run "
        f"(UART probed as {kind[0]}, FIFO {kind[1]})",
        figures,
        [f"guest interrupts: {counters.interrupts} (THRI {counters.thri}, RDI "
         f"{counters.rdi}, CTI {counters.cti}); kB = 1000 bytes"],
    )
    print(json_line("throughput", figures, bytes_per_run=n, uart=kind[0], build=build))


if __name__ == "__main__":
    main()
