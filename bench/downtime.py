"""Benchmark: ``checkpoint --stop`` downtime and ``resume`` to READY=1.

Each run: a daemon (separate process) serves one UART on a socat pty; a guest
(``Guest8250``: probe, startup) is attached and the far end has written 5 bytes that wait in
the RX FIFO, so the checkpoint carries data. Then:

1. **stop request**: this process connects to the control socket and sends
   ``{"cmd": "checkpoint", "stop": true}`` — what ``uartbridge checkpoint --stop`` sends —
   and reads the reply. The daemon replies after it has quiesced the port, closed the bus
   and written the checkpoint (atomically, file and directory fsynced). Measured: from
   before ``connect()`` to the reply line received = *the guest's downtime up to the
   checkpoint being safe on disk* (target ≤ 20 ms).
2. **process exit**: from the same start to ``waitpid`` returning (the daemon has closed
   everything and exited) — reported separately; nothing waits on it.
3. **resume to READY=1**: ``python -m uartbridge resume FILE --config …`` is started with
   ``NOTIFY_SOCKET`` set; measured from just before ``fork/exec`` to the ``READY=1``
   datagram (target ≤ 500 ms). This includes the interpreter's start and imports.
4. Check: a guest reconnects to the resumed daemon and reads back the 5 bytes.

The CLI (``uartbridge checkpoint --stop``) adds its own interpreter start-up (measured once,
reported as ``cli_checkpoint_stop_s``) to figure 1.

Run: ``python bench/downtime.py [--runs 5] [--build both|pure|compiled]
[--event-loop auto|asyncio|uvloop]``: by default the pure and the compiled build side by side
(``_builds.py``: one run per build and round, each after its own warm-up run), with their
ratio. Prints a table (medians) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
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
    temp_dir,
)

from uartbridge.client import BusClient
from uartbridge.guest import Guest8250

PAYLOAD = b"hello"


def stop_request(control: Path) -> tuple[float, dict[str, object]]:
    """Send checkpoint --stop over the control socket; (seconds to the reply, reply)."""
    start = time.perf_counter()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(control))
        sock.sendall(json.dumps({"cmd": "checkpoint", "stop": True}).encode() + b"\n")
        with sock.makefile("rb") as stream:
            line = stream.readline()
    elapsed = time.perf_counter() - start
    reply = json.loads(line)
    if not reply.get("ok"):
        raise RuntimeError(f"checkpoint --stop failed: {reply}")
    return elapsed, reply


def prepare(daemon: Daemon, far: int) -> BusClient:
    client = BusClient(daemon.bus())
    guest = Guest8250(client)
    guest.probe()
    guest.startup(115200)
    client.write(1, 0)  # IER = 0: the bytes stay in the RX FIFO
    os.write(far, PAYLOAD)
    deadline = time.monotonic() + 5
    while client.read(5) & 0x01 == 0:  # LSR.DR
        if time.monotonic() > deadline:
            raise RuntimeError("the far end's bytes never reached the RX FIFO")
        time.sleep(0.001)
    time.sleep(0.05)  # all 5 bytes in
    return client


def one_run(root: Path, pair: Socat, far: int, run: int,
            build: str) -> tuple[float, float, float, str]:
    daemon = Daemon(root / f"run{run}", [{"name": "uart0", "port": str(pair.a)}])
    daemon.root.mkdir()
    client = None
    try:
        daemon.start()
        check_daemon_build(daemon.control, build, os.environ.get("UARTBRIDGE_BENCH_EVENT_LOOP"))
        client = prepare(daemon, far)
        proc = daemon.proc
        assert proc is not None
        start = time.perf_counter()
        request_s, reply = stop_request(daemon.control)
        proc.wait(timeout=30)
        exit_s = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"daemon exited {proc.returncode}: {daemon.log()[-2000:]}")
        client.close()
        written = reply["written"]
        assert isinstance(written, dict)
        path = written["uart0"]
        ready_s = daemon.start("resume", str(path))
        running = check_daemon_build(daemon.control, build,
                                     os.environ.get("UARTBRIDGE_BENCH_EVENT_LOOP"))
        with BusClient(daemon.bus()) as again:
            got = again.read_many(0, 16)
        if got != PAYLOAD:
            raise RuntimeError(f"after resume the RX FIFO holds {got!r}, not {PAYLOAD!r}")
        return request_s, exit_s, ready_s, running
    finally:
        if client is not None:
            client.close()
        daemon.stop()


def cli_stop_once(root: Path, pair: Socat, far: int) -> float:
    daemon = Daemon(root / "cli", [{"name": "uart0", "port": str(pair.a)}])
    daemon.root.mkdir()
    client = None
    try:
        daemon.start()
        client = prepare(daemon, far)
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "uartbridge", "checkpoint", "--stop",
             "--config", str(daemon.config_path)],
            check=True, capture_output=True, cwd=TREE,
        )
        return time.perf_counter() - start
    finally:
        if client is not None:
            client.close()
        daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runs_arg(parser)
    add_build_args(parser)
    args = parser.parse_args()
    if args.build == "both":
        side_by_side(__file__, [], args.runs, args.event_loop)
        return
    build = check_build(args.build, args.event_loop)

    requests: list[float] = []
    exits: list[float] = []
    readies: list[float] = []
    with temp_dir("down") as root:
        pair = Socat(root / "a", root / "b")
        far = -1
        try:
            pair.start()
            far = open_raw(pair.b)
            one_run(root, pair, far, 0, args.build)  # warm-up (page cache, .pyc)
            for run in range(1, args.runs + 1):
                request_s, exit_s, ready_s, running = one_run(root, pair, far, run, args.build)
                requests.append(request_s * 1000)
                exits.append(exit_s * 1000)
                readies.append(ready_s * 1000)
            cli_s = cli_stop_once(root, pair, far)
        finally:
            if far >= 0:
                os.close(far)
            pair.stop()

    figures = [
        Figure("stop_request_ms", "checkpoint --stop: request -> reply (on disk)", "ms",
               requests, 20, "<=", 2),
        Figure("stop_exit_ms", "checkpoint --stop: request -> process exited", "ms",
               exits, None, "<=", 2),
        Figure("resume_ready_ms", "resume: exec -> READY=1", "ms", readies, 500, "<=", 1),
    ]
    print_table(
        f"downtime bench ({running}): {args.runs} runs (socat pty, guest attached, 5 bytes "
        "in the RX FIFO)",
        figures,
        [f"the CLI `uartbridge checkpoint --stop` took {cli_s * 1000:.0f} ms once "
         "(interpreter start-up + the same request)",
         "every resumed daemon gave the 5 bytes back to a reconnecting guest"],
    )
    print(json_line("downtime", figures, cli_checkpoint_stop_s=round(cli_s, 4), build=build,
                    daemon=running))


if __name__ == "__main__":
    main()
