"""Benchmark: one guest flooding its UART must not stall another UART of the same daemon.

A real daemon (``python -m uartbridge run``, a separate process) serves two UARTs. ``uart0``'s
port is a socat pty whose other side nobody opens: a *stalled* port (it takes ~35 KB, then
every write is refused). ``uart1``'s port is a socat pty into ``/dev/null``.

A flooder process attaches to ``uart0`` and, phase by phase, sends nothing but maximum-size
WRITE_N frames (4,094 writes each) as fast as the socket takes them, with a SYNC every 16
frames read back by a second thread (so the figure "flood ops/s" counts executed writes):

- ``lcr``: LCR toggled between 8N1 and 8N2 (every write a line-setting change);
- ``dll``: DLL writes under DLAB=1 (every write a baud change);
- ``thr``: THR writes, FIFOs on, into the stalled port;
- ``break``: LCR toggled between 8N1 and 8N1+break.

Meanwhile this process is the guest of ``uart1`` (``BusClient``) and times ``read(SCR)``
round trips, one every ~0.5 ms, for the whole phase; a ``baseline`` phase has no flood. At the
end of each phase it also times a reconnect (connect + HELLO) to ``uart1``.
Target (issue 9, C12): ``uart1``'s READ p99 ≤ 5 ms and max ≤ 50 ms under every flood.

Periodic checkpoints run at the config's default (every 5 s); ``--checkpoint-interval 0.1``
puts about 30 of them in every phase, to see what they cost the other UART.

Run: ``python bench/isolation.py [--runs 3] [--seconds 3] [--checkpoint-interval S]``. Prints
a table per phase (medians over runs) and one JSON line.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from _common import (
    REPO,
    Daemon,
    Figure,
    add_runs_arg,
    json_line,
    need_program,
    percentile,
    print_table,
    stop_process,
    temp_dir,
    wait_for,
)

from uartbridge.client import BusClient

SCR = 7
PHASES = ("baseline", "lcr", "dll", "thr", "break")

FLOODER = r"""
import select, socket, sys, threading, time
sys.path.insert(0, sys.argv[1])
from uartbridge.bus import FrameDecoder, Hello, Sync, SyncReply, Write, WriteN, encode
path, phase = sys.argv[2], sys.argv[3]
MAX = 4094
setup, offset, data = {
    "lcr": ([Write(3, 0x03)], 3, bytes([0x03, 0x07]) * (MAX // 2)),
    "dll": ([Write(3, 0x83)], 0, bytes((i % 254) + 1 for i in range(MAX))),
    "thr": ([Write(3, 0x03), Write(2, 0x07)], 0, bytes(range(256)) * 15 + bytes(range(254))),
    "break": ([Write(3, 0x03)], 3, bytes([0x03, 0x43]) * (MAX // 2)),
}[phase]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(path)
sock.sendall(encode(Hello(1)) + b"".join(encode(f) for f in setup))
batch = encode(WriteN(offset, data)) * 16
stop = threading.Event()
synced = [0]
def reader():
    dec = FrameDecoder()
    while True:
        try:
            chunk = sock.recv(65536)
        except OSError:  # closed by the main thread at the end
            return
        if not chunk:
            return
        dec.feed(chunk)
        for frame in dec.frames():
            if isinstance(frame, SyncReply):
                synced[0] = frame.token
threading.Thread(target=reader, daemon=True).start()
print("ready", flush=True)
sys.stdin.readline()  # "go"
start = time.perf_counter()
token = 0
while not select.select([sys.stdin], [], [], 0)[0]:  # until "stop"
    token += 1
    sock.sendall(batch + encode(Sync(token)))
elapsed = time.perf_counter() - start
while synced[0] < token - 4 and time.perf_counter() - start < elapsed + 30:
    time.sleep(0.01)
print(f"{synced[0] * 16 * MAX / elapsed:.0f}", flush=True)
sock.close()
"""


def measure(client: BusClient, seconds: float) -> list[int]:
    """READ round trips (ns), one every ~0.5 ms for ``seconds``."""
    clock = time.perf_counter_ns
    out: list[int] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = clock()
        client.read(SCR)
        out.append(clock() - start)
        time.sleep(0.0005)
    return out


def run_phase(daemon: Daemon, phase: str, seconds: float) -> tuple[list[int], float, float]:
    """(READ round trips in ns, flood ops/s, reconnect s) for one phase."""
    flooder = None
    client = BusClient(daemon.bus("uart1"))
    try:
        client.read(SCR)
        rate = 0.0
        if phase != "baseline":
            flooder = subprocess.Popen(
                [sys.executable, "-c", FLOODER, str(REPO), str(daemon.bus("uart0")), phase],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            assert flooder.stdin is not None and flooder.stdout is not None
            assert flooder.stdout.readline().strip() == "ready"
            flooder.stdin.write("go\n")
            flooder.stdin.flush()
            time.sleep(0.2)  # let the flood build up
        rtts = measure(client, seconds)
        if flooder is not None:
            assert flooder.stdin is not None and flooder.stdout is not None
            flooder.stdin.write("stop\n")
            flooder.stdin.flush()
            rate = float(flooder.stdout.readline() or 0)
            flooder.wait(timeout=60)
        client.close()
        start = time.perf_counter()
        client = BusClient(daemon.bus("uart1"))  # the slot is free again: connect + HELLO
        reconnect_s = time.perf_counter() - start
        return rtts, rate, reconnect_s
    finally:
        client.close()
        stop_process(flooder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runs_arg(parser, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per phase")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated phases")
    parser.add_argument("--checkpoint-interval", type=float, default=None,
                        help="[checkpoint] interval_s (default: the config's default, 5 s)")
    args = parser.parse_args()
    socat = need_program("socat")
    phases = [p for p in args.phases.split(",") if p]

    results: dict[str, dict[str, list[float]]] = {
        p: {"p50": [], "p99": [], "max": [], "rate": [], "reconnect": []} for p in phases
    }
    with temp_dir("iso") as root:
        stalled_a, stalled_b, sink_link = root / "stalled-a", root / "stalled-b", root / "sink"
        procs: list[subprocess.Popen[bytes]] = []
        daemon = Daemon(root, [
            {"name": "uart0", "port": str(stalled_a)},
            {"name": "uart1", "port": str(sink_link)},
        ], checkpoint={} if args.checkpoint_interval is None else {
            "interval_s": args.checkpoint_interval})
        try:
            # uart0: a null-modem whose B side nobody opens (stalled); uart1: into /dev/null.
            procs.append(subprocess.Popen(
                [socat, f"pty,raw,echo=0,link={stalled_a}", f"pty,raw,echo=0,link={stalled_b}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
            procs.append(subprocess.Popen(
                [socat, "-u", f"pty,raw,echo=0,link={sink_link}", "/dev/null"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
            wait_for(lambda: stalled_a.exists() and sink_link.exists(), 5.0, "socat's ptys")
            daemon.start()
            for _ in range(args.runs):
                for phase in phases:
                    rtts, rate, reconnect_s = run_phase(daemon, phase, args.seconds)
                    r = results[phase]
                    r["p50"].append(percentile(rtts, 0.50) / 1e6)
                    r["p99"].append(percentile(rtts, 0.99) / 1e6)
                    r["max"].append(max(rtts) / 1e6)
                    r["rate"].append(rate)
                    r["reconnect"].append(reconnect_s * 1e3)
        finally:
            daemon.stop()
            for proc in procs:
                stop_process(proc)

    figures: list[Figure] = []
    for phase in phases:
        r = results[phase]
        flood = phase != "baseline"
        figures += [
            Figure(f"{phase}_read_p50_ms", f"{phase}: uart1 READ p50", "ms", r["p50"], None,
                   "<=", 3),
            Figure(f"{phase}_read_p99_ms", f"{phase}: uart1 READ p99", "ms", r["p99"],
                   5.0 if flood else None, "<=", 3),
            Figure(f"{phase}_read_max_ms", f"{phase}: uart1 READ max", "ms", r["max"],
                   50.0 if flood else None, "<=", 3),
            Figure(f"{phase}_reconnect_ms", f"{phase}: uart1 connect + HELLO", "ms",
                   r["reconnect"], None, "<=", 3),
        ]
        if flood:
            figures.append(Figure(f"{phase}_flood_ops_per_s", f"{phase}: flood writes executed",
                                  "ops/s", r["rate"], None, ">=", 0))
    print_table(
        f"isolation bench: {args.runs} runs, {args.seconds:g} s per phase, "
        "WRITE_N frames of 4,094 writes",
        figures,
        ["uart0: flooded, port = socat pty nobody reads (stalled); "
         "uart1: measured, port = socat pty -> /dev/null",
         "READ = BusClient.read(SCR) on uart1, one every ~0.5 ms during the flood"],
    )
    print(json_line("isolation", figures, seconds_per_phase=args.seconds))


if __name__ == "__main__":
    main()
