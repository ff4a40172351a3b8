"""Benchmark: bytes/s through the embedding API (``uartbridge.embed.Bridge``) and a socat pty.

The emulator is this process: a ``Bridge`` on link ``a`` of a socat null-modem, driven by a
faithful polled 8250 driver loop (FIFOs on with trigger 8, as Linux sets a 16550A; 115200
8N1): out, read LSR and, when THRE, write at most 16 bytes to THR (one register write each),
else ``poll()``, and at the end wait for LSR.TEMT (the posted last burst goes out at that
read); in, read LSR and RBR while LSR.DR (one LSR read per byte, as Linux's
``serial8250_rx_chars``), ``poll(0.005)`` when dry. The far end is a helper process on link
``b`` (``throughput.far_end``), which checks the data.

Run: ``python bench/embed.py [--runs 5] [--bytes 1000000] [--build both|pure|compiled]``.
Prints a table (medians) and one JSON line.
"""

from __future__ import annotations

import argparse
import time

from _builds import add_build_args, check_build, side_by_side
from _common import Figure, Socat, add_runs_arg, json_line, print_table, temp_dir
from throughput import pattern, start_far_end, stop_far_end

from uartbridge.embed import Bridge

RBR = THR = 0
FCR, LCR, LSR = 2, 3, 5
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40


def guest_to_far(br: Bridge, conn: object, n: int) -> float:
    """Bytes/s out, to the far end's last byte."""
    conn.send(("read", n))  # type: ignore[attr-defined]
    assert conn.recv() == "ready"  # type: ignore[attr-defined]
    data = pattern(n)
    read, write, poll = br.read, br.write, br.poll
    start = time.perf_counter()
    pos = 0
    while pos < n:
        if read(LSR) & LSR_THRE:
            for value in data[pos:pos + 16]:
                write(THR, value)
            pos += 16
        else:
            poll()
    while not read(LSR) & LSR_TEMT:  # as a driver's close: the transmitter empties
        poll(0.001)
    end, ok, got = conn.recv()  # type: ignore[attr-defined]
    if not ok:
        raise RuntimeError(f"guest -> far end: {got} of {n} bytes, or not in order")
    return n / (end - start)


def far_to_guest(br: Bridge, conn: object, n: int) -> float:
    """Bytes/s in, from the far end's first write to the guest's last byte."""
    conn.send(("write", n))  # type: ignore[attr-defined]
    assert conn.recv() == "ready"  # type: ignore[attr-defined]
    read, poll = br.read, br.poll
    got = bytearray()
    conn.send("go")  # type: ignore[attr-defined]
    deadline = time.monotonic() + 120
    while len(got) < n and time.monotonic() < deadline:
        while read(LSR) & LSR_DR:
            got.append(read(RBR))
        poll(0.005)
    end = time.perf_counter()
    start = conn.recv()  # type: ignore[attr-defined]
    if bytes(got) != pattern(n):
        raise RuntimeError(f"far end -> guest: {len(got)} of {n} bytes, or not in order")
    return n / (end - start)


def main() -> None:
    """Run the benchmark and print a table and one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runs_arg(parser)
    parser.add_argument("--bytes", type=int, default=1_000_000, help="bytes per direction")
    add_build_args(parser)
    args = parser.parse_args()
    if args.build == "both":
        side_by_side(__file__, ["--bytes", str(args.bytes)], args.runs, args.event_loop)
        return
    build = check_build(args.build, args.event_loop)
    out: list[float] = []
    into: list[float] = []
    with temp_dir("embed") as root:
        pair = Socat(root / "a", root / "b").start()
        proc = conn = None
        try:
            proc, conn = start_far_end(pair.b)
            with Bridge(str(pair.a)) as br:
                br.write(LCR, 0x03)
                br.write(FCR, 0x87)  # FIFOs on, trigger 8: what Linux sets on a 16550A
                guest_to_far(br, conn, min(args.bytes, 50_000))  # warm-up
                far_to_guest(br, conn, min(args.bytes, 50_000))
                for _ in range(args.runs):
                    out.append(guest_to_far(br, conn, args.bytes) / 1e6)
                    into.append(far_to_guest(br, conn, args.bytes) / 1e6)
        finally:
            stop_far_end(proc, conn)
            pair.stop()
    figures = [
        Figure("guest_to_far_MBps", "in-process guest -> far end (16 B/THRE)", "MB/s", out,
               1.2, ">=", 2),
        Figure("far_to_guest_MBps", "far end -> in-process guest", "MB/s", into, 1.2, ">=", 2),
    ]
    print_table(f"embed bench ({build}): {args.runs} runs, {args.bytes:,} bytes each way",
                figures, ["target (issue 12): >= 1.2 MB/s each way with the compiled build"])
    print(json_line("embed", figures, build=build, bytes_per_run=args.bytes))


if __name__ == "__main__":
    main()
