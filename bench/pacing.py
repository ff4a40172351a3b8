"""Benchmark: line-rate pacing (``pace = "line"``) through a socat pty, achieved vs line rate.

For each baud rate (9600 and 115200, 8N1: the line rate is baud / 10 characters per second)
one UART with ``pace = "line"`` sits on one end of a socat null-modem; the far end is this
process on the other end.

- **TX**: the guest writes ``--seconds`` worth of bytes, refilling the TX FIFO (16 bytes) each
  time THRE says it is empty; the far end reads them as they come and time-stamps each chunk.
  Achieved rate: the bytes after the first chunk over the time from the first chunk to the
  last.
- **RX**: the far end writes the same amount at once (the kernel and the host's RX backlog
  hold it); the guest reads what enters the RX FIFO. Achieved rate: the bytes after the
  first read over the time from the first byte read to the last. Overruns (a guest too slow
  to read: the line does not wait, as on the chip) are counted.

``--via bridge`` (default) is an emulator in this process (``uartbridge.embed.Bridge``): it
polls LSR and refills within microseconds, so the figures are the device's pacing.
``--via daemon`` is the daemon with the reference driver (``Guest8250``) over the bus: every
refill and every read then waits a bus round trip (tens of µs to ms on a loaded machine), so
TX idles between bursts and RX may overrun at 115200 — what a guest that slow gets on a real
16550 too; those figures measure the guest as much as the device.

With ``--record DIR`` each run is also recorded (``Bridge(record=)`` / ``uartbridge run
--record``): the file's size per minute of this traffic is printed, and the replay checked.

Run: ``python bench/pacing.py [--via bridge|daemon] [--seconds 3] [--runs 3] [--record DIR]``.
Prints a table and one JSON line. A benchmark: nothing here asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (
    REPO,
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

BAUDS = (9600, 115200)
BITS_PER_CHAR = 10  # 8N1: start + 8 data + stop


def _control_status(d: Daemon) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "uartbridge", "status", "--json", "--config", str(d.config_path)],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )
    status: dict[str, object] = json.loads(done.stdout)
    return status


def _overruns(d: Daemon) -> int:
    status = _control_status(d)
    uart = status["uarts"][0]  # type: ignore[index]
    return int(uart["counters"]["overruns"])  # type: ignore[index]


class FarReader:
    """The far end, in a child process of its own (so it shares no interpreter lock with the
    guest): reads and time-stamps every chunk (monotonic seconds) until it has ``want``."""

    def __init__(self, fd: int, want: int) -> None:
        self.fd = fd
        self.want = want
        self.chunks: list[tuple[float, int]] = []
        self.total = 0
        self._pid = 0
        self._result = -1

    def start(self) -> None:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the far end
            os.close(read_end)
            code = 0
            try:
                chunks = self._read_all()
                with os.fdopen(write_end, "w") as out:
                    json.dump(chunks, out)
            except BaseException:
                code = 1
            os._exit(code)
        os.close(write_end)
        self._pid = pid
        self._result = read_end

    def _read_all(self) -> list[tuple[float, int]]:
        import select

        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        chunks: list[tuple[float, int]] = []
        total = 0
        deadline = time.monotonic() + 120
        while total < self.want and time.monotonic() < deadline:
            if not poller.poll(100):
                continue
            with contextlib.suppress(BlockingIOError):
                data = os.read(self.fd, 65536)
                if data:
                    chunks.append((time.monotonic(), len(data)))
                    total += len(data)
        return chunks

    def join(self, timeout: float) -> None:
        """Wait for the child (by its PID) and take its time stamps."""
        del timeout  # the child bounds itself (120 s)
        with os.fdopen(self._result) as f:
            text = f.read()
        os.waitpid(self._pid, 0)
        self.chunks = [(float(t), int(n)) for t, n in json.loads(text or "[]")]
        self.total = sum(n for _, n in self.chunks)


class FarWriter:
    """The far end writing ``data`` as fast as the pty takes it, in a child process."""

    def __init__(self, fd: int, data: bytes) -> None:
        self.fd = fd
        self.data = data
        self._pid = 0

    def start(self) -> None:
        pid = os.fork()
        if pid == 0:
            import select

            view = memoryview(self.data)
            poller = select.poll()
            poller.register(self.fd, select.POLLOUT)
            deadline = time.monotonic() + 120
            while view and time.monotonic() < deadline:
                if poller.poll(100):
                    with contextlib.suppress(BlockingIOError):
                        view = view[os.write(self.fd, view) :]
            os._exit(0)
        self._pid = pid

    def stop(self) -> None:
        """Stop the child by its PID (it may still be writing what nobody takes)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, signal.SIGTERM)
        os.waitpid(self._pid, 0)


def _rate(stamps: list[tuple[float, int]]) -> float:
    """Characters per second after the first chunk (its own bytes came at the first instant)."""
    if len(stamps) < 2:
        return float("nan")
    first_t, first_n = stamps[0]
    last_t = stamps[-1][0]
    return (sum(n for _, n in stamps) - first_n) / (last_t - first_t)


def _payload(count: int) -> bytes:
    return bytes((i * 7 + 1) & 0xFF for i in range(count))


def run_bridge(baud: int, seconds: float, record: Path | None) -> dict[str, float]:
    """TX then RX at ``baud`` with an in-process Bridge refilling/draining on LSR."""
    from uartbridge.embed import Bridge

    count = int(baud / BITS_PER_CHAR * seconds)
    payload = _payload(count)
    divisor = 115200 // baud
    with temp_dir("pacing") as tmp:
        socat = Socat(a=tmp / "a", b=tmp / "b").start()
        far = open_raw(socat.b)
        try:
            with Bridge(str(socat.a), pace="line", record=record) as br:
                for offset, value in ((3, 0x83), (0, divisor & 0xFF), (1, divisor >> 8),
                                      (3, 0x03), (2, 0x07)):
                    br.write(offset, value)
                reader = FarReader(far, count)
                reader.start()
                started = time.monotonic()
                sent = 0
                while sent < count:
                    burst = payload[sent : sent + 16]
                    for value in burst:
                        br.write(0, value)
                    sent += len(burst)
                    br.poll()
                    # THRE comes when the last of the burst enters the shift register: watch
                    # LSR (no sleep: waking up costs more than a character at 115200), so the
                    # refill comes within that character, as an interrupt handler's would.
                    while not br.read(5) & 0x20:
                        pass
                while not br.read(5) & 0x40:
                    br.poll(0.001)
                reader.join(timeout=30)
                tx_rate = _rate(reader.chunks)
                tx_ok = reader.total == count
                writer = FarWriter(far, payload)
                writer.start()
                # The intake: every byte that entered the RX FIFO, read or lost to an overrun
                # (the line does not wait for a guest that is late, as on the chip).
                stamps: list[tuple[float, int]] = []
                taken = 0
                lost = br.uart.statistics().overruns
                deadline = time.monotonic() + seconds * 3 + 30
                while taken < count and time.monotonic() < deadline:
                    br.poll(0.0002)
                    got = 0
                    while br.read(5) & 0x01:
                        br.read(0)
                        got += 1
                    now_lost = br.uart.statistics().overruns
                    if got or now_lost != lost:
                        stamps.append((time.monotonic(), got + now_lost - lost))
                        taken += got + now_lost - lost
                        lost = now_lost
                writer.stop()
                overruns = br.uart.statistics().overruns
                elapsed = time.monotonic() - started
        finally:
            os.close(far)
            socat.stop()
    return _result(tx_rate, _rate(stamps), overruns, tx_ok,
                   elapsed, record)


def run_daemon(baud: int, seconds: float, record: Path | None) -> dict[str, float]:
    """TX then RX at ``baud`` through the daemon and the reference driver over the bus."""
    count = int(baud / BITS_PER_CHAR * seconds)
    payload = _payload(count)
    with temp_dir("pacing") as tmp:
        socat = Socat(a=tmp / "a", b=tmp / "b").start()
        d = Daemon(tmp / "d", [{"name": "uart0", "port": str(socat.a), "pace": "line"}],
                   daemon={"log_level": "warning"})
        far = -1
        try:
            (tmp / "d").mkdir()
            d.start(*(("run", "--record", str(record)) if record else ()))
            far = open_raw(socat.b)
            with BusClient(d.bus(), spin_us=0) as client:
                guest = Guest8250(client)
                guest.probe()
                guest.startup(baud)
                reader = FarReader(far, count)
                reader.start()
                started = time.monotonic()
                guest.write(payload)
                guest.drain(seconds * 3 + 30)
                reader.join(timeout=30)
                tx_rate = _rate(reader.chunks)
                tx_ok = reader.total == count
                writer = FarWriter(far, payload)
                writer.start()
                stamps: list[tuple[float, int]] = []
                received = 0
                quiet_since = time.monotonic()
                while received < count and time.monotonic() - quiet_since < 2.0:
                    guest.service(0.05)
                    data = guest.read()
                    if data:
                        stamps.append((time.monotonic(), len(data)))
                        received += len(data)
                        quiet_since = time.monotonic()
                writer.stop()
                elapsed = time.monotonic() - started
            overruns = _overruns(d)
        finally:
            d.stop()
            if far >= 0:
                os.close(far)
            socat.stop()
    return _result(tx_rate, _rate(stamps), overruns, tx_ok, elapsed, record)


def _result(tx: float, rx: float, overruns: int, tx_ok: bool, elapsed: float,
            record: Path | None) -> dict[str, float]:
    out = {"tx": tx, "rx": rx, "overruns": float(overruns), "tx_complete": float(tx_ok),
           "elapsed_s": elapsed}
    if record is not None:
        out["record_bytes"] = float(record.stat().st_size)
        done = subprocess.run([sys.executable, "-m", "uartbridge", "replay", str(record)],
                              capture_output=True, text=True, timeout=600, cwd=REPO)
        out["replay_identical"] = float(done.returncode == 0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--via", choices=("bridge", "daemon"), default="bridge",
                        help="an emulator in this process (default), or the daemon and the "
                        "reference driver over the bus")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="line time moved each way per run (default 3 s)")
    parser.add_argument("--record", metavar="DIR",
                        help="record each run into DIR and report the recording's size")
    add_runs_arg(parser, default=3)
    args = parser.parse_args()
    record_dir = Path(args.record) if args.record else None
    if record_dir is not None:
        record_dir.mkdir(parents=True, exist_ok=True)
    figures: list[Figure] = []
    notes: list[str] = []
    extra: dict[str, object] = {}
    for baud in BAUDS:
        line_rate = baud / BITS_PER_CHAR
        runs = []
        for i in range(args.runs):
            record = record_dir / f"pacing-{baud}-{i}.ubrec" if record_dir else None
            run = run_bridge if args.via == "bridge" else run_daemon
            runs.append(run(baud, args.seconds, record))
        for way in ("tx", "rx"):
            figures.append(Figure(
                f"{way}_{baud}_error_pct", f"{way.upper()} at {baud}: achieved vs line rate",
                "%", [100 * (r[way] - line_rate) / line_rate for r in runs], digits=3,
            ))
            figures.append(Figure(
                f"{way}_{baud}_cps", f"{way.upper()} at {baud}: achieved rate", "char/s",
                [r[way] for r in runs], digits=1,
            ))
        notes.append(f"{baud}: line rate {line_rate:,.1f} char/s; overruns "
                     f"{[int(r['overruns']) for r in runs]}; TX complete "
                     f"{[bool(r['tx_complete']) for r in runs]}")
        if record_dir is not None:
            per_min = [r["record_bytes"] / r["elapsed_s"] * 60 for r in runs]
            figures.append(Figure(f"record_{baud}_bytes_per_min",
                                  f"recording at {baud}, this traffic", "B/min", per_min,
                                  digits=0))
            notes.append(f"{baud}: replay identical {[bool(r['replay_identical']) for r in runs]}")
        extra[str(baud)] = runs
    print_table(f"line-rate pacing through a socat pty (pace = \"line\", via {args.via})",
                figures, notes)
    print(json_line("pacing", figures, via=args.via, seconds=args.seconds, runs_detail=extra))


if __name__ == "__main__":
    main()
