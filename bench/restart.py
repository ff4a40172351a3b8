"""Benchmark: `uartbridge restart` (through an understudy, the PID kept) downtime.

The restart is two handovers (``uartbridge/daemon/understudy.py``): the running daemon to
its understudy S (then the daemon re-executes itself, the same PID, while S serves), and S
back to the new run. Each is a quiesce, a checkpoint, an fd pass and a resume; the guest and
the far end see one gap at each, and this reports both, for both.

One daemon (a separate process) serves one UART on a socat pty. Under way all the time:

- a **guest** (``Guest8250`` over the bus, its own thread) transmits a counting byte sequence
  whenever THR is empty and reads SCR every turn; when the daemon drops its bus connection
  at the restart it reconnects at once (the connection waits in the inherited socket's
  backlog). Its *gaps* are the longest times between two of its completed bus operations,
  one at each handover.
- a **far end** (the other socat pty, its own thread) reads what the guest sends. Its
  *gaps* are the longest times between two arrivals (one at each handover); it also checks
  the bytes are the sequence, with none lost or doubled, and that socat never exits (it
  would, on a hang-up).

Each run sends ``{"cmd": "restart"}`` over the control socket (what ``uartbridge restart``
sends) and measures from before ``connect()`` to the ``READY=1`` the new run sends over
``NOTIFY_SOCKET`` (this bench's datagram socket, as systemd would see it). The gaps are taken
over the run (1 s of steady traffic before, 1 s after), split at S's "understudy handing
back" log line: before it, the first handover's; after it, the second's. Gaps under 2 ms
are not recorded (0 means none longer). Nothing here asserts on time.

Run: ``python bench/restart.py [--runs 10] [--build both|pure|compiled]
[--event-loop auto|asyncio|uvloop]``: by default the pure and the compiled build side by side
(``_builds.py``: one restart per build and round, each with its own daemon), with their ratio.
Prints a table (medians) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from _builds import add_build_args, check_build, check_daemon_build, side_by_side
from _common import (
    TREE,
    Daemon,
    Figure,
    Socat,
    add_runs_arg,
    json_line,
    open_raw,
    print_table,
    stop_process,
    temp_dir,
)

from uartbridge.client import BusClient
from uartbridge.control import request
from uartbridge.errors import BusError
from uartbridge.guest import Guest8250

SCR = 7
MIN_GAP_S = 0.002


class GuestLoop(threading.Thread):
    """Transmits a counting sequence and reads SCR; reconnects when the bus drops."""

    def __init__(self, bus: Path) -> None:
        super().__init__(daemon=True)
        self.bus = bus
        self.next_byte = 0
        self.sent = 0
        self.last_op = time.time()
        self.gaps: list[tuple[float, float]] = []  # (when: wall clock, gap seconds) over 2 ms
        self.reconnects = 0
        self.resent = 0  # THR writes a dropped connection did not confirm, sent again
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            first = True
            while not self.stop_event.is_set():
                try:
                    with BusClient(self.bus, timeout_s=30, spin_us=0) as client:
                        guest = Guest8250(client)
                        if first:
                            guest.startup(115200)
                            first = False
                        else:
                            self.reconnects += 1
                        self._serve(client)
                except BusError:
                    continue  # an unconfirmed THR write is sent again (``_serve``)
        except BaseException as exc:
            self.error = exc

    def _op(self) -> None:
        now = time.time()  # the wall clock: compared with the daemon's log timestamps
        gap = now - self.last_op
        if gap > MIN_GAP_S:
            self.gaps.append((now, gap))
        self.last_op = now

    def _serve(self, client: BusClient) -> None:
        while not self.stop_event.is_set():
            lsr = client.read(5)
            self._op()
            if lsr & 0x20:
                # Confirmed (a SYNC in the same send): a BusError means it was not executed
                # and the next connection sends it again (docs/bus-protocol.md §1).
                try:
                    client.write_many(0, bytes([self.next_byte]), confirm=True)
                except BusError:
                    self.resent += 1
                    raise
                self.next_byte = (self.next_byte + 1) & 0xFF
                self.sent += 1
            client.read(SCR)
            self._op()
            time.sleep(0.0005)


class FarLoop(threading.Thread):
    """Reads the guest's bytes; checks the sequence; records the gaps between arrivals."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.fd = open_raw(path)
        self.expect = 0
        self.received = 0
        self.wrong = 0
        self.last = time.time()
        self.gaps: list[tuple[float, float]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            r, _w, _x = select.select([self.fd], [], [], 0.01)
            if not r:
                continue
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            now = time.time()
            if now - self.last > MIN_GAP_S:
                self.gaps.append((now, now - self.last))
            self.last = now
            for byte in data:
                if byte != self.expect:
                    self.wrong += 1
                self.expect = (byte + 1) & 0xFF
            self.received += len(data)


def phases(log_text: str) -> tuple[list[float], list[float], list[float]]:
    """From the daemon's JSON log: request → exec (the old run: quiesce, final checkpoint,
    the handover to S) and exec → ready (the new run: interpreter start, imports, take-back),
    per restart; and the times S began to hand back."""
    times: dict[str, list[float]] = {"restarting in place": [], "exec": [], "ready": [],
                                     "understudy handing back": []}
    for line in log_text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        name = event.get("event")
        if name in times:
            stamp = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
            times[name].append(stamp.timestamp())
    ready = times["ready"][1:]  # the first "ready" is the first start's
    old = [b - a for a, b in zip(times["restarting in place"], times["exec"], strict=False)]
    new = [b - a for a, b in zip(times["exec"], ready, strict=False)]
    return old, new, times["understudy handing back"]


def longest(gaps: list[tuple[float, float]], since: float, until: float) -> float:
    return max((gap for when, gap in gaps if since <= when < until), default=0.0)


def split_gaps(gaps: list[tuple[float, float]], began: list[float],
               handing_back: list[float]) -> tuple[list[float], list[float]]:
    """Per restart, the longest gap at the first handover (from the request to S's hand
    back) and at the second (from there to the next request)."""
    first: list[float] = []
    second: list[float] = []
    for i, start in enumerate(began):
        end = began[i + 1] if i + 1 < len(began) else float("inf")
        boundary = min((t for t in handing_back if start <= t < end), default=end)
        first.append(longest(gaps, start, boundary))
        second.append(longest(gaps, boundary, end))
    return first, second


def wait_ready(notify: socket.socket, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            message = notify.recv(65536).decode(errors="replace")
        except TimeoutError:
            continue
        if "READY=1" in message.split("\n"):
            return
    raise RuntimeError("no READY=1 after the restart")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_runs_arg(parser, default=10)
    add_build_args(parser)
    args = parser.parse_args()
    if args.build == "both":
        side_by_side(__file__, [], args.runs, args.event_loop)
        return 0
    build = check_build(args.build, args.event_loop)
    event_loop = os.environ.get("UARTBRIDGE_BENCH_EVENT_LOOP")
    ready: list[float] = []
    began_at: list[float] = []
    with temp_dir("uartbridge-bench-restart-") as root:
        socat = Socat(a=root / "a", b=root / "b").start()
        d = Daemon(root=root / "d", uarts=[{"name": "uart0", "port": str(socat.a)}],
                   daemon={"log_format": "json"}, checkpoint={"interval_s": 0})
        d.root.mkdir()
        d.write_config()
        notify_path = root / "notify.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.settimeout(0.05)
        proc = None
        guest = far = None
        try:
            with open(d.log_path, "wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "uartbridge", "run", "--config", str(d.config_path)],
                    stdout=log, stderr=subprocess.STDOUT, cwd=TREE,
                    env=dict(os.environ, NOTIFY_SOCKET=str(notify_path)),
                )
            wait_ready(notify)
            running = check_daemon_build(d.control, args.build, event_loop)
            far = FarLoop(socat.b)
            far.start()
            guest = GuestLoop(d.bus())
            guest.start()
            time.sleep(1.0)
            for _run in range(args.runs):
                began_at.append(time.time())
                start = time.perf_counter()
                reply = request(d.control, {"cmd": "restart"})
                assert reply.get("ok"), reply
                wait_ready(notify)
                ready.append(time.perf_counter() - start)
                time.sleep(1.0)
                if guest.error is not None:
                    raise RuntimeError(f"guest failed: {guest.error!r}")
            assert socat.proc is not None
            socat_alive = socat.proc.poll() is None
            assert proc.poll() is None, "the daemon exited"
            pid_kept = request(d.control, {"cmd": "status"})["pid"] == proc.pid
            # The exec'd run is the same build (the same command line, in the same tree).
            running_after = check_daemon_build(d.control, args.build, event_loop)
            old_s, new_s, handing_back = phases(d.log())
        finally:
            for loop in (guest, far):
                if loop is not None:
                    loop.stop_event.set()
                    loop.join(5)
            stop_process(proc)
            notify.close()
            socat.stop()
    assert guest is not None and far is not None
    guest_1, guest_2 = split_gaps(guest.gaps, began_at, handing_back)
    far_1, far_2 = split_gaps(far.gaps, began_at, handing_back)
    figures = [
        Figure("restart_to_ready_s", "restart request → READY=1", "ms",
               [v * 1000 for v in ready]),
        Figure("old_run_s", "  of which request → exec (old run)", "ms",
               [v * 1000 for v in old_s]),
        Figure("new_run_s", "  of which exec → ready (new run)", "ms",
               [v * 1000 for v in new_s]),
        Figure("guest_gap_s", "longest gap between guest bus operations", "ms",
               [max(a, b) * 1000 for a, b in zip(guest_1, guest_2, strict=True)],
               target=100.0, direction="<="),
        Figure("guest_gap_1_s", "  at the handover to the understudy", "ms",
               [v * 1000 for v in guest_1]),
        Figure("guest_gap_2_s", "  at the take-back by the new run", "ms",
               [v * 1000 for v in guest_2]),
        Figure("far_end_gap_s", "longest gap between bytes at the far end", "ms",
               [max(a, b) * 1000 for a, b in zip(far_1, far_2, strict=True)]),
        Figure("far_end_gap_1_s", "  at the handover to the understudy", "ms",
               [v * 1000 for v in far_1]),
        Figure("far_end_gap_2_s", "  at the take-back by the new run", "ms",
               [v * 1000 for v in far_2]),
    ]
    notes = [
        f"far end: {far.received} bytes of {guest.sent} sent, {far.wrong} out of sequence, "
        f"{guest.resent} THR writes sent again after the bus dropped; "
        f"socat alive at the end: {socat_alive}; same PID: {pid_kept}; "
        f"guest reconnects: {guest.reconnects}",
    ]
    print_table(f"uartbridge restart (understudy, PID kept; {running}, after the restarts "
                f"{running_after}), {args.runs} runs", figures, notes)
    print(json_line("restart", figures, bytes_sent=guest.sent, bytes_received=far.received,
                    out_of_sequence=far.wrong, resent=guest.resent,
                    socat_alive=socat_alive, pid_kept=pid_kept,
                    guest_reconnects=guest.reconnects, build=build, daemon=running_after))
    return 0


if __name__ == "__main__":
    sys.exit(main())
