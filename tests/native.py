"""Native code for tests: build clients/c and clients/systemc with make, run programs by PID.

Builds go to a temporary directory (``BUILDDIR=``), never into the tree. A program runs as a
``Program``: its stdout is read line by line with a timeout, so a test can wait for a step
("> restart now"), act, and answer on stdin; it is stopped by PID in ``finally``.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

from procs import REPO, Daemon, daemon, require_program, socat_pair, stop_process, wait_for
from streams import FarEnd

C_DIR = REPO / "clients" / "c"
SYSTEMC_DIR = REPO / "clients" / "systemc"


def make(source: Path, build: Path, *targets: str, **variables: str) -> None:
    """``make -C source BUILDDIR=build targets``; fail with make's output if it fails."""
    require_program("make")
    args = [shutil.which("make") or "make", "-s", "-C", str(source), f"BUILDDIR={build}"]
    args += [f"{key}={value}" for key, value in variables.items()]
    result = subprocess.run([*args, *targets], capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"make {' '.join(targets)} failed:\n{output}"


class Program:
    """A native program with line-by-line access to its stdout; stopped by PID on exit."""

    def __init__(self, *argv: str | Path, env: dict[str, str] | None = None,
                 preexec: list[str] | None = None) -> None:
        """Start ``argv`` (prefixed by ``preexec``, e.g. a setpriv command line)."""
        self.argv = [*(preexec or []), *map(str, argv)]
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env,
        )
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        self._buf = b""
        self.lines: list[str] = []

    def _read_line(self, deadline: float) -> str | None:
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self._fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(self._fd, 65536)
            if not chunk:
                if not self._buf:
                    return None
                self._buf += b"\n"
                break
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        text = line.decode(errors="replace")
        self.lines.append(text)
        return text

    def expect(self, prefix: str, timeout_s: float = 60.0) -> str:
        """The next line starting with ``prefix`` (earlier lines are kept in ``lines``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            line = self._read_line(deadline)
            if line is None:
                raise AssertionError(
                    f"{self.argv[0]}: no line {prefix!r} within {timeout_s} s; output:\n"
                    + "\n".join(self.lines)
                )
            if line.startswith("FAIL"):
                raise AssertionError(f"{' '.join(self.argv)}: {line}\n" + "\n".join(self.lines))
            if line.startswith(prefix):
                return line

    def send(self, line: str) -> None:
        """Write one line to the program's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def finish(self, timeout_s: float = 60.0) -> str:
        """Wait for the program to exit 0; returns all of its output."""
        deadline = time.monotonic() + timeout_s
        while self._read_line(deadline) is not None:
            pass
        code = self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        output = "\n".join(self.lines)
        assert code == 0, f"{' '.join(self.argv)} exited {code}:\n{output}"
        return output

    def stop(self) -> None:
        """Stop the program by PID (if it still runs) and close its pipes."""
        stop_process(self.proc)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def need_c_toolchain() -> None:
    """make and a C compiler: missing fails under CI, skips elsewhere."""
    require_program("make")
    require_program("cc")


def build_c(build: Path) -> Path:
    """Build libuartbridge and its test programs into ``build``; returns ``build``."""
    need_c_toolchain()
    make(C_DIR, build, "check-programs")
    return build


@contextlib.contextmanager
def bridge(tmp_path: Path, **uart: object) -> Iterator[tuple[Daemon, FarEnd]]:
    """A daemon with one UART ("uart0") on a socat pty; the far end reads the other side.

    Write to the far end with ``os.write(far.fd, ...)``; what it read is ``far.received``.
    """
    with (
        socat_pair(tmp_path) as pair,
        daemon(tmp_path / "d", [{"name": "uart0", "port": str(pair.a), **uart}]) as d,
    ):
        d.start()
        far = FarEnd(pair.b, b"")
        far.start()
        try:
            yield d, far
        finally:
            far.stop()


def far_gets(far: FarEnd, expected: bytes, timeout_s: float = 30.0) -> None:
    """Wait until the far end has read ``len(expected)`` bytes; they must be ``expected``."""
    wait_for(lambda: len(far.received) >= len(expected), timeout_s)
    far.check()
    assert bytes(far.received) == expected


__all__ = [
    "C_DIR",
    "SYSTEMC_DIR",
    "Program",
    "bridge",
    "build_c",
    "far_gets",
    "make",
    "need_c_toolchain",
]
