"""Measure the board: time to the U-Boot prompt, where the time goes, and the idle prompt.

1. **Time to the prompt**: ``board.py`` as a process on one end of a socat null-modem, from
   spawning it to ``=> `` at the other end (medians of ``--runs``).
2. **Profile to the prompt**: the board in this process (built first: dtc, fdtget, images),
   then ``run()`` under cProfile until the prompt; own time per part:
   the 16550 model (``uartbridge/uart.py``), the rest of uartbridge (Bridge, device glue,
   port link), asyncio, the port's system calls, the board's Python, and unicorn (its
   binding, and the emulation itself, which is counted in ``emu_start``).
3. **Idle at the prompt** for ``--idle-s``: LSR reads per second and the process's CPU use,
   with the board's idle wait and without it (``IDLE_POLLS`` out of reach).

Run: ``python examples/unicorn_riscv/measure.py [--runs 5] [--idle-s 3]``. Prints a table
and one JSON line.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tty
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import board as board_module  # noqa: E402  (beside this script)

PROMPT = b"=> "


class NullModem:
    """socat pty,raw,echo=0,link=A pty,raw,echo=0,link=B in a temporary directory."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="board-measure-"))
        self.a, self.b = self.dir / "A", self.dir / "B"
        self.proc = subprocess.Popen(
            ["socat", f"pty,raw,echo=0,link={self.a}", f"pty,raw,echo=0,link={self.b}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not (self.a.exists() and self.b.exists()):
            if time.monotonic() > deadline:
                raise RuntimeError("socat did not start")
            time.sleep(0.01)
        self.fd = os.open(self.b, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd)

    def wait_for(self, marker: bytes, timeout_s: float = 120.0) -> float:
        """Read until ``marker`` came; the monotonic time it did."""
        got = bytearray()
        deadline = time.monotonic() + timeout_s
        while marker not in got:
            try:
                got += os.read(self.fd, 65536)
                continue
            except BlockingIOError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {marker!r} within {timeout_s} s")
            time.sleep(0.0005)
        return time.monotonic()

    def close(self) -> None:
        """Stop socat (by PID) and remove the directory."""
        os.close(self.fd)
        self.proc.terminate()
        self.proc.wait(10)
        for path in (self.a, self.b):
            if path.is_symlink():
                path.unlink()
        self.dir.rmdir()


def time_to_prompt(runs: int) -> list[float]:
    """Seconds from spawning board.py to its first prompt at the far end, per run."""
    times = []
    for _ in range(runs):
        modem = NullModem()
        try:
            start = time.monotonic()
            proc = subprocess.Popen([sys.executable, str(HERE / "board.py"), "--port",
                                     str(modem.a)], stderr=subprocess.DEVNULL)
            times.append(modem.wait_for(PROMPT) - start)
            proc.terminate()
            proc.wait(30)
        finally:
            modem.close()
    return times


def _in_process_board(port: Path) -> Any:
    args = argparse.Namespace(resume=None, port=str(port), link=None, dts=str(board_module.DTS),
                              firmware=str(board_module.FIRMWARE),
                              payload=str(board_module.PAYLOAD))
    board = board_module.build(args)
    board.bridge.open()
    return board


def _stop_when(modem: NullModem, marker: bytes, board: Any, seen: dict[str, float]) -> None:
    seen["at"] = modem.wait_for(marker)
    board.request_stop()


def profile_to_prompt() -> dict[str, Any]:
    """Run the board here under cProfile until its prompt; own time per part of the stack."""
    modem = NullModem()
    seen: dict[str, float] = {}
    profiler = cProfile.Profile()
    try:
        start = time.monotonic()
        board = _in_process_board(modem.a)
        built = time.monotonic()
        watcher = threading.Thread(target=_stop_when, args=(modem, PROMPT, board, seen))
        watcher.start()
        profiler.enable()
        board.run()
        profiler.disable()
        watcher.join()
        board.bridge.close()
    finally:
        modem.close()
    parts = {"model (uartbridge/uart.py)": 0.0, "Bridge, glue, port link (uartbridge/*)": 0.0,
             "asyncio + selectors": 0.0, "port I/O syscalls (os.write, epoll)": 0.0,
             "board (board.py)": 0.0,
             "unicorn (binding + emulation)": 0.0, "other": 0.0}
    stats = pstats.Stats(profiler)
    for (filename, _, name), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        if filename == "~" and ("posix.write" in name or "epoll" in name or "posix.read" in name):
            key = "port I/O syscalls (os.write, epoll)"
        elif filename.endswith("uartbridge/uart.py"):
            key = "model (uartbridge/uart.py)"
        elif "/uartbridge/" in filename:
            key = "Bridge, glue, port link (uartbridge/*)"
        elif "asyncio" in filename or "selectors" in filename:
            key = "asyncio + selectors"
        elif filename.endswith("board.py"):
            key = "board (board.py)"
        elif "unicorn" in filename:
            key = "unicorn (binding + emulation)"
        else:
            key = "other"
        parts[key] += tottime
    total = sum(parts.values())
    return {
        "build_s": round(built - start, 3),
        "prompt_after_s": round(seen["at"] - start, 3),
        "profiled_s": round(total, 3),
        "share": {key: round(value / total, 4) for key, value in parts.items()},
    }


def idle_at_prompt(seconds: float, *, idle_wait: bool) -> dict[str, float]:
    """LSR reads per second and CPU use while U-Boot sits at its prompt."""
    modem = NullModem()
    saved = board_module.IDLE_POLLS
    try:
        if not idle_wait:
            board_module.IDLE_POLLS = 1 << 62
        board = _in_process_board(modem.a)
        reads = [0]
        inner = board._bridge_read

        def counting_read(offset: int) -> int:
            if offset == 5:
                reads[0] += 1
            return int(inner(offset))

        result: dict[str, float] = {}

        def watch() -> None:
            modem.wait_for(PROMPT)
            time.sleep(0.2)
            reads[0] = 0
            cpu0, wall0 = time.process_time(), time.monotonic()
            time.sleep(seconds)
            result["lsr_reads_per_s"] = round(reads[0] / (time.monotonic() - wall0))
            result["cpu_percent"] = round(100 * (time.process_time() - cpu0)
                                          / (time.monotonic() - wall0), 1)
            board.request_stop()

        board._bridge_read = counting_read
        watcher = threading.Thread(target=watch)
        watcher.start()
        board.run()
        watcher.join()
        board.bridge.close()
    finally:
        board_module.IDLE_POLLS = saved
        modem.close()
    return result


def main() -> None:
    """Run the three measurements; print a table and one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--idle-s", type=float, default=3.0)
    args = parser.parse_args()
    times = time_to_prompt(args.runs)
    profile = profile_to_prompt()
    idle = idle_at_prompt(args.idle_s, idle_wait=True)
    busy = idle_at_prompt(args.idle_s, idle_wait=False)
    print(f"time to the U-Boot prompt (process start -> '=> '): median "
          f"{statistics.median(times):.3f} s, runs {', '.join(f'{t:.3f}' for t in times)}")
    print(f"in-process: built (dtc, fdtget, images) in {profile['build_s']} s, prompt after "
          f"{profile['prompt_after_s']} s; profile of run() to the prompt "
          f"({profile['profiled_s']} s), own time:")
    for key, share in profile["share"].items():
        print(f"  {share:7.1%}  {key}")
    print(f"idle prompt, with the idle wait:    {idle['lsr_reads_per_s']:>9,} LSR reads/s, "
          f"{idle['cpu_percent']}% CPU")
    print(f"idle prompt, without the idle wait: {busy['lsr_reads_per_s']:>9,} LSR reads/s, "
          f"{busy['cpu_percent']}% CPU")
    print(json.dumps({
        "bench": "unicorn_riscv_board",
        "time_to_prompt_s_median": round(statistics.median(times), 3),
        "time_to_prompt_s_runs": [round(t, 3) for t in times],
        "profile": profile,
        "idle_with_wait": idle,
        "idle_without_wait": busy,
        "python": platform.python_version(),
    }))


if __name__ == "__main__":
    main()
