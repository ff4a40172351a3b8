"""examples/unicorn_riscv: unmodified OpenSBI and U-Boot (Debian's) on unicorn, console on a Bridge.

The firmware is nobody's here and its output is compared exactly; the expected text comes
from the firmware images themselves (OpenSBI's logo, U-Boot's version and toolchain strings).
The far end is a socat null-modem that outlives each board process, so a board checkpointed
in one process and resumed in the next is seen as one console. Needs unicorn (pip), dtc and
fdtget (device-tree-compiler), opensbi and u-boot-qemu: skipped without them, failed in CI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from _port_support import open_raw, read_available, socat_pair
from procs import require_program, stop_process

REPO = Path(__file__).resolve().parent.parent
BOARD = REPO / "examples" / "unicorn_riscv" / "board.py"
FIRMWARE = Path("/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_jump.bin")
PAYLOAD = Path("/usr/lib/u-boot/qemu-riscv64_smode/u-boot.bin")
PROMPT = b"=> "
COMMAND = b"echo hello; version\r"
TIMEOUT_S = 120.0  # bounds a hang only; the board reaches its prompt in about a second


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing (CI installs it: scripts/bootstrap --test)")
    pytest.skip(f"{what} is missing")


@pytest.fixture(scope="module")
def requirements() -> None:
    """unicorn, dtc, fdtget and the two firmware images, or skip (fail under CI)."""
    if importlib.util.find_spec("unicorn") is None:
        _missing("the unicorn Python package (pip install unicorn)")
    require_program("dtc")
    require_program("fdtget")
    require_program("socat")
    for image, package in ((FIRMWARE, "opensbi"), (PAYLOAD, "u-boot-qemu")):
        if not image.exists():
            _missing(f"{image} (apt-get install {package})")


def _cstring(image: bytes, start: bytes) -> bytes:
    """The NUL-terminated string of ``image`` that begins with ``start``."""
    at = image.index(start)
    return image[at:image.index(b"\0", at)]


class Console:
    """The far end of the board's console: a raw socat pty, read into ``transcript``."""

    def __init__(self, path: Path) -> None:
        self.fd = open_raw(str(path))
        self.transcript = bytearray()

    def read_until(self, marker: bytes, *, after: int, timeout_s: float = TIMEOUT_S) -> None:
        """Read until the transcript ends with ``marker`` found at or after ``after``."""
        deadline = time.monotonic() + timeout_s
        while not (self.transcript.endswith(marker) and self.transcript.find(marker, after) >= 0):
            chunk = read_available(self.fd)
            self.transcript += chunk
            if not chunk:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {marker!r}; got {bytes(self.transcript[-300:])!r}")
                time.sleep(0.002)

    def drain_while(self, proc: subprocess.Popen[bytes]) -> None:
        """Read until ``proc`` exited and nothing more comes."""
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            chunk = read_available(self.fd)
            self.transcript += chunk
            if not chunk:
                if proc.poll() is not None:
                    self.transcript += read_available(self.fd)
                    return
                if time.monotonic() > deadline:
                    raise AssertionError("the board did not stop")
                time.sleep(0.002)

    def type(self, text: bytes) -> None:
        """Type ``text`` at the far end (all at once, as a paste)."""
        os.write(self.fd, text)


def _board(port: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(BOARD), "--port", str(port), *args],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    """Wait for a board that should exit by itself; its exit code and stderr."""
    try:
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            stop_process(proc, signal.SIGKILL)
    return proc.returncode, err.decode(errors="replace")


@pytest.fixture(scope="module")
def uninterrupted(requirements: None, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The console of one board run without a checkpoint: boot, the command, its output."""
    tmp = tmp_path_factory.mktemp("board-plain")
    with socat_pair(tmp) as s:
        console = Console(s.b)
        try:
            started = time.monotonic()
            proc = _board(s.a)
            console.read_until(PROMPT, after=0)
            print(f"board: U-Boot prompt {time.monotonic() - started:.2f} s after the start")
            typed_at = len(console.transcript)
            console.type(COMMAND)
            console.read_until(PROMPT, after=typed_at)
            assert stop_process(proc, signal.SIGTERM, timeout_s=30) == 0
        finally:
            os.close(console.fd)
    return bytes(console.transcript)


def test_opensbi_and_uboot_print_their_banners_and_run_a_typed_command(
    uninterrupted: bytes,
) -> None:
    """Both firmwares' drivers print through the Bridge exactly, and U-Boot runs what is typed."""
    opensbi = FIRMWARE.read_bytes()
    uboot = PAYLOAD.read_bytes()
    logo = _cstring(opensbi, b"   ____").replace(b"\n", b"\r\n")
    version = _cstring(uboot, b"U-Boot 20")
    gcc = _cstring(uboot, b"riscv64-linux-gnu-gcc").rstrip(b"\n")
    ld = _cstring(uboot, b"GNU ld").rstrip(b"\n")
    out = uninterrupted
    assert re.match(rb"\r\nOpenSBI v\d+\.\d+\r\n", out)
    assert out.index(logo) == out.index(b"\r\n", 2) + 2  # the logo right after the version line
    assert b"Platform Name             : uartbridge unicorn RISC-V board\r\n" in out
    assert b"Platform Console Device   : uart8250\r\n" in out
    assert b"Domain0 Next Address      : 0x0000000080200000\r\n" in out
    assert b"\r\n\r\n" + version + b"\r\n\r\nCPU:   rv64imafdc\r\n" in out
    assert b"Model: uartbridge unicorn RISC-V board\r\nDRAM:  128 MiB\r\n" in out
    assert b"In:    serial@10000000\r\nOut:   serial@10000000\r\nErr:   serial@10000000\r\n" in out
    first_prompt = out.index(PROMPT)
    assert out[first_prompt:] == (
        PROMPT + b"echo hello; version\r\nhello\r\n" + version + b"\r\n\r\n" + gcc + b"\r\n"
        + ld + b"\r\n" + PROMPT
    )


def _uart_in_checkpoint(directory: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "uartbridge", "inspect", "--json",
         str(directory / "uart0.checkpoint.json")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_checkpoints_mid_output_resumed_in_new_processes_give_the_uninterrupted_output(
    uninterrupted: bytes, tmp_path: Path,
) -> None:
    """Stopped mid-banner and again mid-echo of typed input, each resumed in a new process:
    the console shows exactly the uninterrupted run's bytes (typed input kept in the host path)."""
    prompt_at = uninterrupted.index(PROMPT) + len(PROMPT)
    mid_banner = uninterrupted.index(b"U-Boot 20") + 10
    mid_echo = prompt_at + 5  # 5 characters of the typed command echoed, 15 still to come
    first, second = tmp_path / "ckpt-banner", tmp_path / "ckpt-echo"
    with socat_pair(tmp_path) as s:
        console = Console(s.b)
        try:
            proc = _board(s.a, "--checkpoint", str(first), "--stop-after-tx", str(mid_banner))
            console.drain_while(proc)
            code, err = _finish(proc)
            assert code == 0, err
            assert bytes(console.transcript) == uninterrupted[:mid_banner]

            proc = _board(s.a, "--resume", str(first), "--checkpoint", str(second),
                          "--stop-after-tx", str(mid_echo))
            console.read_until(PROMPT, after=mid_banner)
            console.type(COMMAND)
            console.drain_while(proc)
            code, err = _finish(proc)
            assert code == 0, err
            assert bytes(console.transcript) == uninterrupted[:mid_echo]
            uart = _uart_in_checkpoint(second)
            waiting = bytes.fromhex(uart["receiver"]["rx_fifo"]["hex"]) + bytes.fromhex(
                uart["port"]["rx_backlog"]["hex"])
            assert waiting and COMMAND.endswith(waiting)  # the rest of the typing, in order

            proc = _board(s.a, "--resume", str(second))
            try:
                console.read_until(PROMPT, after=mid_echo)
            finally:
                code = stop_process(proc, signal.SIGTERM, timeout_s=30)
            assert code == 0
        finally:
            os.close(console.fd)
    assert bytes(console.transcript) == uninterrupted


def test_a_bad_board_checkpoint_is_refused_with_one_line(
    requirements: None, tmp_path: Path,
) -> None:
    """A missing checkpoint exits 66, a corrupt one 65, each with a one-line reason."""
    missing = subprocess.run([sys.executable, str(BOARD), "--resume", str(tmp_path / "none")],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 66
    assert missing.stderr.count("\n") == 1 and "cannot read" in missing.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "board.json").write_text('{"format": "uartbridge-example-riscv64-board"}')
    corrupt = subprocess.run([sys.executable, str(BOARD), "--resume", str(bad)],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert corrupt.returncode == 65
    assert corrupt.stderr.count("\n") == 1 and "missing" in corrupt.stderr
