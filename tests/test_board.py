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
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _port_support import open_raw, read_available, socat_pair
from procs import require_program, stop_process, stop_tmux, wait_for

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


@pytest.fixture(scope="module")
def firmware(requirements: None) -> None:
    """Debian's firmware in the version the board boots to the prompt, or skip (also in CI):
    Debian 13's U-Boot 2025.01 is not supported yet (README, the board's section)."""
    sys.path.insert(0, str(BOARD.parent))
    import board as board_module

    version = board_module.uboot_version(PAYLOAD)
    if version not in board_module.VERIFIED_UBOOT:
        pytest.skip(f"{PAYLOAD} is U-Boot {version}; the board boots "
                    f"{', '.join(board_module.VERIFIED_UBOOT)} (Debian 12) to its prompt")


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
def uninterrupted(firmware: None, tmp_path_factory: pytest.TempPathFactory) -> bytes:
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


def test_sigusr1_writes_a_checkpoint_and_the_board_goes_on(
    uninterrupted: bytes, tmp_path: Path,
) -> None:
    """SIGUSR1 at the prompt writes a checkpoint and the board answers the next command;
    that checkpoint, resumed in a new process after the board stopped, answers it the same."""
    answer = uninterrupted[uninterrupted.index(PROMPT) + len(PROMPT):]
    ckpt = tmp_path / "ckpt"
    with socat_pair(tmp_path) as s:
        console = Console(s.b)
        try:
            proc = _board(s.a, "--checkpoint", str(ckpt))
            try:
                console.read_until(PROMPT, after=0)
                proc.send_signal(signal.SIGUSR1)
                deadline = time.monotonic() + TIMEOUT_S
                while not (ckpt / "board.json").exists():
                    assert time.monotonic() < deadline, "no checkpoint after SIGUSR1"
                    time.sleep(0.01)
                typed_at = len(console.transcript)
                console.type(COMMAND)
                console.read_until(PROMPT, after=typed_at)
                assert bytes(console.transcript[typed_at:]) == answer
            finally:
                code = stop_process(proc, signal.SIGTERM, timeout_s=30)
            assert code == 0
            at_prompt = ckpt.with_name("ckpt.prev")  # SIGTERM's checkpoint pushed it there
            assert _uart_in_checkpoint(at_prompt)["valid"]
            proc = _board(s.a, "--resume", str(at_prompt))
            try:
                typed_at = len(console.transcript)
                console.type(COMMAND)
                console.read_until(PROMPT, after=typed_at)
                assert bytes(console.transcript[typed_at:]) == answer
            finally:
                code = stop_process(proc, signal.SIGTERM, timeout_s=30)
            assert code == 0
        finally:
            os.close(console.fd)


def test_picocom_on_the_boards_own_pty_gets_the_prompt_and_runs_a_command(
    firmware: None, tmp_path: Path,
) -> None:
    """--port pty: publishes a pty; picocom (under tmux) attached after the boot gets the
    output kept while nobody listened, the prompt, and U-Boot's answer to typed keys."""
    tmux, picocom = require_program("tmux"), require_program("picocom")
    env = dict(os.environ, TMUX_TMPDIR=str(tmp_path / "tmux"))
    (tmp_path / "tmux").mkdir()
    link = tmp_path / "console"
    version = _cstring(PAYLOAD.read_bytes(), b"U-Boot 20").decode()

    def run_tmux(*args: str) -> str:
        return subprocess.run([tmux, *args], env=env, capture_output=True, text=True,
                              check=True, timeout=10).stdout

    def screen() -> str:
        return run_tmux("capture-pane", "-p", "-S", "-200", "-t", "term")

    proc = subprocess.Popen([sys.executable, str(BOARD), "--port", "pty:", "--link", str(link)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(link.exists, TIMEOUT_S)
        run_tmux("new-session", "-d", "-s", "term", "-x", "120", "-y", "50",
                 f"{picocom} -q -b 115200 {link}")
        wait_for(lambda: screen().rstrip().endswith("=>"), TIMEOUT_S)
        assert "OpenSBI v" in screen() and version in screen()
        run_tmux("send-keys", "-t", "term", "echo typed in picocom", "Enter")
        wait_for(lambda: "\ntyped in picocom\n" in screen(), TIMEOUT_S)
    finally:
        stop_tmux(tmux, env)
        code = stop_process(proc, signal.SIGTERM, timeout_s=30)
    assert code == 0


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


# -- the board's own trap and interrupt entry, on a few hand-assembled instructions --------


def _i(op: int, rd: int, f3: int, rs1: int, imm: int) -> int:
    return ((imm & 0xFFF) << 20) | (rs1 << 15) | (f3 << 12) | (rd << 7) | op


def _s(f3: int, rs1: int, rs2: int, imm: int) -> int:
    return (((imm >> 5) & 0x7F) << 25) | (rs2 << 20) | (rs1 << 15) | (f3 << 12) | (
        (imm & 0x1F) << 7) | 0x23


def addi(rd: int, rs1: int, imm: int) -> int:
    return _i(0x13, rd, 0, rs1, imm)


def csrrw(rd: int, csr: int, rs1: int) -> int:
    return _i(0x73, rd, 1, rs1, csr)


def csrrs(rd: int, csr: int, rs1: int) -> int:
    return _i(0x73, rd, 2, rs1, csr)


def lui(rd: int, imm20: int) -> int:
    return (imm20 << 12) | (rd << 7) | 0x37


def auipc(rd: int, imm20: int) -> int:
    return (imm20 << 12) | (rd << 7) | 0x17


def jal_self() -> int:
    return 0x6F  # jal x0, 0: the same instruction forever


T0, T1, T2, T3, A0, A1, A2, A3, A4, A5 = 5, 6, 7, 28, 10, 11, 12, 13, 14, 15
MSTATUS, MIE_CSR, MTVEC, MEPC, MCAUSE, MTVAL = 0x300, 0x304, 0x305, 0x341, 0x342, 0x343
MEDELEG, STVEC, SEPC, SCAUSE, STVAL, SSTATUS = 0x302, 0x105, 0x141, 0x142, 0x143, 0x100
HANDLER = 0x100


def _program(main: list[int], handler: list[int]) -> bytes:
    """``main`` at the RAM base, ``handler`` at +0x100, then 'write THR, poll LSR forever'."""
    tail = [lui(T3, 0x10000), addi(A0, 0, ord("!")), _s(2, T3, A0, 0),  # sw a0, THR
            _i(0x03, A1, 2, T3, 0x14), 0xFF5FF06F]  # lw a1, LSR; j -4 (the lw, forever)
    body = b"".join(x.to_bytes(4, "little") for x in main)
    assert len(body) <= HANDLER
    body = body.ljust(HANDLER, b"\0")
    return body + b"".join(x.to_bytes(4, "little") for x in handler + tail)


def _run_program(program: bytes) -> Any:
    """Load ``program`` into a board (console on a pty nobody opens) and run it to its first
    THR write (or for 30 s)."""
    sys.path.insert(0, str(BOARD.parent))
    import board as board_module

    from uartbridge.embed import Bridge

    bridge = Bridge("pty:").open()
    board = board_module.Board(bridge)
    board.uc.mem_write(board_module.RAM_BASE, program)
    board.uc.reg_write(board_module.rv.UC_RISCV_REG_PC, board_module.RAM_BASE)
    board.clint.set_mtime(0)
    board.stop_after_tx = 1
    watchdog = threading.Timer(30, board.request_stop)  # bounds a hang: the stop is checked
    watchdog.start()
    try:
        board.run()
    finally:
        watchdog.cancel()
        bridge.close()
    assert board.tx_count == 1, "the handler did not run"
    return board, board_module.rv


def _reg(board: Any, rv: Any, number: int) -> int:
    return int(board.uc.reg_read(getattr(rv, f"UC_RISCV_REG_X{number}")))


@pytest.mark.parametrize(("irq", "enable", "raise_it"), [
    (7, 0x80, [lui(T2, 0x2004), _s(3, T2, 0, 0)]),  # MTI: mtimecmp = 0, due at once
    (3, 0x08, [lui(T2, 0x2000), addi(T1, 0, 1), _s(2, T2, T1, 0)]),  # MSI: msip = 1
])
def test_clint_interrupts_enter_the_machine_trap_handler(
    requirements: None, irq: int, enable: int, raise_it: list[int],
) -> None:
    """A due mtimecmp or msip with mie and mstatus.MIE set enters mtvec between two blocks:
    mcause = interrupt | cause, mepc = the next instruction once MIE was set (the wait
    loop), MPIE = 1, MIE = 0, MPP = M."""
    main = [auipc(T0, 0), addi(T0, T0, HANDLER), csrrw(0, MTVEC, T0),
            addi(T1, 0, enable), csrrw(0, MIE_CSR, T1), *raise_it,
            _i(0x73, 0, 6, 8, MSTATUS),  # csrrsi mstatus, MIE
            lui(T3, 0x10000), _i(0x03, A1, 2, T3, 0x14), 0xFFDFF06F]  # lw LSR; j -4: wait
    handler = [csrrs(A2, MCAUSE, 0), csrrs(A3, MEPC, 0), csrrs(A4, MSTATUS, 0),
               lui(T2, 0x2004), addi(T1, 0, -1), _s(3, T2, T1, 0),  # mtimecmp = all ones
               lui(T2, 0x2000), _s(2, T2, 0, 0)]  # msip = 0
    board, rv = _run_program(_program(main, handler))
    enabled_at = 0x8000_0000 + 4 * (len(main) - 3)  # after csrrsi: where it may be taken
    assert _reg(board, rv, A2) == (1 << 63) | irq
    assert enabled_at <= _reg(board, rv, A3) <= enabled_at + 8
    mstatus = _reg(board, rv, A4)
    assert mstatus & 0x80 and not mstatus & 0x08 and (mstatus >> 11) & 3 == 3


def test_an_exception_medeleg_delegates_enters_the_supervisor_handler(requirements: None) -> None:
    """An illegal instruction in S-mode with medeleg bit 2 goes to stvec: sepc = the
    instruction (unicorn's PC is 4 past it), stval = its bits, SPP = S, the mode S."""
    s_code = 0x200
    illegal = csrrs(A5, MSTATUS, 0)  # an M-mode CSR read from S-mode
    main = [auipc(T0, 0), addi(T0, T0, HANDLER), csrrw(0, STVEC, T0),
            addi(T1, 0, 1 << 2), csrrw(0, MEDELEG, T1),
            addi(T1, 0, -1), csrrw(0, 0x3B0, T1),  # pmpaddr0: everything (NAPOT) ...
            addi(T1, 0, 0x1F), csrrw(0, 0x3A0, T1),  # ... pmpcfg0: RWX for S-mode
            lui(T1, 0x2), addi(T1, T1, -0x800), _i(0x73, 0, 3, T1, MSTATUS),  # clear MPP
            lui(T1, 0x1), addi(T1, T1, -0x800), csrrs(0, MSTATUS, T1)]  # MPP = S
    main += [auipc(T0, 0), addi(T0, T0, s_code - 4 * len(main)), csrrw(0, MEPC, T0),
             0x30200073]  # mret: to S-mode at s_code
    handler = [csrrs(A2, SCAUSE, 0), csrrs(A3, SEPC, 0), csrrs(A4, STVAL, 0),
               csrrs(A5, SSTATUS, 0)]
    program = bytearray(_program(main, handler))
    program = program.ljust(s_code, b"\0") + illegal.to_bytes(4, "little")
    board, rv = _run_program(bytes(program))
    assert _reg(board, rv, A2) == 2
    assert _reg(board, rv, A3) == 0x8000_0000 + s_code
    assert _reg(board, rv, A4) == illegal
    assert _reg(board, rv, A5) & 0x100  # SPP: it came from S-mode
    assert board.uc.reg_read(rv.UC_RISCV_REG_PRIV) == 1


@pytest.mark.parametrize("ebreak", [0x0010_0073, 0x9002])  # ebreak, c.ebreak
def test_an_ebreak_enters_the_machine_handler_as_a_breakpoint(
    requirements: None, ebreak: int,
) -> None:
    """ebreak (which unicorn reports as an invalid instruction, never to the interrupt hook)
    traps as the privileged spec says: mcause 3, mepc = mtval = its address. Debian 13's
    OpenSBI probes for semihosting with one at boot and stopped the board there before."""
    main = [auipc(T0, 0), addi(T0, T0, HANDLER), csrrw(0, MTVEC, T0),
            0x01F01013]  # slli x0, x0, 0x1f: the semihosting sequence's first half
    at = 0x8000_0000 + 4 * len(main)
    program = b"".join(x.to_bytes(4, "little") for x in main)
    program += ebreak.to_bytes(4 if ebreak & 3 == 3 else 2, "little")
    handler = [csrrs(A2, MCAUSE, 0), csrrs(A3, MEPC, 0), csrrs(A4, MTVAL, 0)]
    image = bytearray(_program(main, handler))
    image[:len(program)] = program
    board, rv = _run_program(bytes(image))
    assert _reg(board, rv, A2) == 3
    assert _reg(board, rv, A3) == at
    assert _reg(board, rv, A4) == at
