"""A RISC-V 64 board on unicorn-engine that boots Debian's OpenSBI and U-Boot to the prompt.

The board is what an emulator author writes around ``uartbridge.embed.Bridge``: a CPU
(unicorn), RAM, a CLINT, and the 16550A — uartbridge's model with its real port, host path and
checkpoints — at the MMIO address the device tree (``board.dts``, compiled with ``dtc`` at
start) gives the firmware. The firmware is nobody's here: OpenSBI's generic ``fw_jump.bin``
(Debian ``opensbi``) with U-Boot's ``qemu-riscv64_smode`` build (Debian ``u-boot-qemu``) as
its payload at 0x80200000, entered as QEMU does (M-mode at the RAM base, a0 = hart id,
a1 = the FDT's address).

    python examples/unicorn_riscv/board.py --port pty:            # prints the pty for picocom
    python examples/unicorn_riscv/board.py --port /tmp/ttyA --checkpoint ckpt/
    python examples/unicorn_riscv/board.py --resume ckpt/          # continues exactly

``--checkpoint DIR``: on SIGINT/SIGTERM (or ``--stop-after-tx N``) the board stops between
two instructions, writes the whole board to DIR (CPU context, RAM, CLINT, and the UART with its
host path as a uartbridge checkpoint, ``DIR/uart0.checkpoint.json``) and exits; SIGUSR1 writes
one and goes on. ``--resume DIR`` continues it in a new process, here or elsewhere.

What the board does itself, because unicorn does not (uartbridge's field notes):

- **Traps.** unicorn's RISC-V core reports a synchronous exception to the interrupt hook with
  the PC already 4 past the faulting instruction (also for compressed ones) and does not enter
  the guest's handler. The board stops there and ``_enter_trap`` does the privileged spec's
  entry (mepc/mcause/mtval, mstatus MPP/MPIE/MIE, jump to mtvec; or the S-mode set when
  medeleg delegates it) before emulation goes on. There is no ``time`` CSR: U-Boot's
  ``rdtime`` traps and OpenSBI emulates it from the CLINT's mtime.
- **Interrupts.** The CLINT's timer (mtime >= mtimecmp) and software interrupt (msip) are
  delivered by the board between two instructions (see stopping), when enabled (mie, and
  mstatus.MIE or a lower privilege), with the same entry. The boot to the prompt needs
  neither (OpenSBI parks mtimecmp at all ones).
- **Stopping.** unicorn stopped from a memory callback stops *at* the accessing instruction:
  everything before it done, the device access done, the instruction not retired (resumed
  as is, it would read or write the device again). The board stops only there — in a UART
  or CLINT access, when a checkpoint, an exit or an interrupt is due — and retires that
  load or store itself (``_complete_access``: rd gets the value the device gave, the PC moves
  on), so the CPU state is exact and resuming is exact. (A block hook added to stop at the
  next block boundary does not do: it reaches only blocks translated after it, and a polling
  loop already translated, chained to itself, never sees it; dropping the translation cache
  does not break the chain either — measured with unicorn 2.1.4.) The stop is exact only if
  no hook wrote the PC since ``emu_start`` (unicorn then skips its PC sync at the stop), which
  is why traps are entered outside emulation. So a stop request is served at the guest's next
  device access: OpenSBI and U-Boot make them often (console output, LSR polls, mtime reads
  for ``rdtime``); a guest computing without touching a device defers the stop until it does.
- **Privilege.** unicorn checks the current privilege on ``reg_read``/``reg_write`` of CSRs
  too (an M-mode CSR read from S-mode returns garbage, a write is dropped): the board
  switches to M-mode around every CSR access and back. CSRs unicorn does not expose as
  registers (mcounteren, scounteren, PMP) are read and written by running ``csrr``/``csrw``
  in a scratch page mapped for the moment.

The console's hot path: U-Boot idle at its prompt reads LSR in a tight loop (about 600,000
times a second under unicorn). Each read is one ``Bridge.read``; after ``IDLE_POLLS``
consecutive idle reads (no data in, transmitter empty) the board lets the Bridge wait for
input for up to ``IDLE_WAIT_S`` (``poll(timeout)``, which returns at once when a byte comes),
so an idle prompt costs little CPU, and every ``TICK_ACCESSES`` device accesses it takes
what the port has (``poll()``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from unicorn import (
    UC_ARCH_RISCV,
    UC_ERR_INSN_INVALID,
    UC_HOOK_INTR,
    UC_MODE_RISCV64,
    Uc,
    UcError,
)
from unicorn import riscv_const as rv

from uartbridge.embed import Bridge
from uartbridge.errors import EX_DATAERR, EX_NOINPUT, EX_SOFTWARE, UartBridgeError
from uartbridge.port.state import PortSettings

HERE = Path(__file__).resolve().parent
DTS = HERE / "board.dts"
FIRMWARE = Path("/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_jump.bin")
PAYLOAD = Path("/usr/lib/u-boot/qemu-riscv64_smode/u-boot.bin")
# The U-Boot this board boots to its prompt: Debian 12's. Debian 13's (2025.01) gets past
# OpenSBI 1.6 but stops early with a load from 0x2000, which nothing on this board maps.
VERIFIED_UBOOT = ("2023.01",)

# The memory map; board.dts describes the same (checked by check_device_tree).
RAM_BASE = 0x8000_0000
RAM_SIZE = 128 << 20
PAYLOAD_ADDR = 0x8020_0000  # fw_jump's FW_JUMP_ADDR for the generic platform
FDT_ADDR = RAM_BASE + RAM_SIZE - (2 << 20)  # fw_jump copies it to FW_JUMP_FDT_ADDR itself
CLINT_BASE, CLINT_SIZE = 0x0200_0000, 0x1_0000
UART_BASE, UART_SIZE = 0x1000_0000, 0x100
UART_REG_SHIFT, UART_IO_WIDTH = 2, 4
TIMEBASE_HZ = 10_000_000
SCRATCH = 0x1000  # a page nothing else uses, mapped only while reading/writing hidden CSRs

MEMORY_MAP = (  # (node, property, expected cells as fdtget prints them)
    ("/memory@80000000", "reg", f"0 {RAM_BASE} 0 {RAM_SIZE}"),
    ("/soc/clint@2000000", "reg", f"0 {CLINT_BASE} 0 {CLINT_SIZE}"),
    ("/soc/serial@10000000", "reg", f"0 {UART_BASE} 0 {UART_SIZE}"),
    ("/soc/serial@10000000", "reg-shift", str(UART_REG_SHIFT)),
    ("/soc/serial@10000000", "reg-io-width", str(UART_IO_WIDTH)),
    ("/cpus", "timebase-frequency", str(TIMEBASE_HZ)),
)

# The console's hot path (see the module docstring).
IDLE_POLLS = 256
IDLE_WAIT_S = 0.02
TICK_ACCESSES = 1024
LSR_IDLE = 0x60  # THRE | TEMT, no data: a guest polling an idle line
IRQ_CHECK_S = 0.001

# CSRs and bits of the privileged spec.
PRV_S, PRV_M = 1, 3
MSTATUS_SIE, MSTATUS_MIE, MSTATUS_SPIE, MSTATUS_MPIE = 1 << 1, 1 << 3, 1 << 5, 1 << 7
MSTATUS_SPP, MSTATUS_MPP_SHIFT = 1 << 8, 11
IRQ_MSI, IRQ_MTI = 3, 7
CAUSE_ILLEGAL_INSN, CAUSE_BREAKPOINT = 2, 3
EBREAK, C_EBREAK = 0x0010_0073, 0x9002  # the two encodings of ebreak
CAUSE_INTERRUPT = 1 << 63
MAX_CAUSE = 63
CSR_REGS = {  # the CSRs unicorn exposes as registers
    "mstatus": rv.UC_RISCV_REG_MSTATUS,
    "misa": rv.UC_RISCV_REG_MISA,
    "medeleg": rv.UC_RISCV_REG_MEDELEG,
    "mideleg": rv.UC_RISCV_REG_MIDELEG,
    "mie": rv.UC_RISCV_REG_MIE,
    "mip": rv.UC_RISCV_REG_MIP,
    "mtvec": rv.UC_RISCV_REG_MTVEC,
    "mscratch": rv.UC_RISCV_REG_MSCRATCH,
    "mepc": rv.UC_RISCV_REG_MEPC,
    "mcause": rv.UC_RISCV_REG_MCAUSE,
    "mtval": rv.UC_RISCV_REG_MTVAL,
    "stvec": rv.UC_RISCV_REG_STVEC,
    "sscratch": rv.UC_RISCV_REG_SSCRATCH,
    "sepc": rv.UC_RISCV_REG_SEPC,
    "scause": rv.UC_RISCV_REG_SCAUSE,
    "stval": rv.UC_RISCV_REG_STVAL,
    "satp": rv.UC_RISCV_REG_SATP,
    "fcsr": rv.UC_RISCV_REG_FCSR,
}
HIDDEN_CSRS = {  # the CSRs it does not: reached with csrr/csrw in the scratch page
    "mcounteren": 0x306,
    "scounteren": 0x106,
    "pmpcfg0": 0x3A0,
    "pmpcfg2": 0x3A2,
    **{f"pmpaddr{i}": 0x3B0 + i for i in range(16)},
}
GPRS = [getattr(rv, f"UC_RISCV_REG_X{i}") for i in range(1, 32)]
FPRS = [getattr(rv, f"UC_RISCV_REG_F{i}") for i in range(32)]
U64 = (1 << 64) - 1

CHECKPOINT_FORMAT = "uartbridge-example-riscv64-board"
CHECKPOINT_VERSION = 1
UART_CHECKPOINT = "uart0.checkpoint.json"
RAM_FILE = "ram.zlib"


class BoardError(UartBridgeError):
    """The board cannot start or go on: firmware, device tree, emulation, or checkpoint."""

    exit_code = EX_SOFTWARE


class BoardCheckpointError(BoardError):
    """A board checkpoint directory that is missing, corrupt or not this board's."""

    exit_code = EX_DATAERR


# -- the device tree ----------------------------------------------------------------------


def compile_device_tree(dts: Path = DTS) -> bytes:
    """``dtc`` the board's device tree; BoardError (naming the tool) if it cannot."""
    dtc = shutil.which("dtc")
    if dtc is None:
        raise BoardError("dtc not found: apt-get install device-tree-compiler")
    done = subprocess.run([dtc, "-q", "-I", "dts", "-O", "dtb", str(dts)],
                          capture_output=True, timeout=60, check=False)
    if done.returncode != 0:
        raise BoardError(f"dtc failed on {dts}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def check_device_tree(dtb: bytes) -> None:
    """The tree the firmware gets must describe this board's memory map (``fdtget``)."""
    fdtget = shutil.which("fdtget")
    if fdtget is None:
        raise BoardError("fdtget not found: apt-get install device-tree-compiler")
    with tempfile.NamedTemporaryFile(suffix=".dtb") as f:
        f.write(dtb)
        f.flush()
        for node, prop, expected in MEMORY_MAP:
            done = subprocess.run([fdtget, "-t", "u", f.name, node, prop],
                                  capture_output=True, text=True, timeout=60, check=False)
            got = done.stdout.strip() if done.returncode == 0 else done.stderr.strip()
            if got != expected:
                raise BoardError(f"board.dts: {node} {prop} is {got!r}, the board has "
                                 f"{expected!r}")


# -- the CLINT ------------------------------------------------------------------------------


@dataclass
class Clint:
    """SiFive's CLINT for one hart: msip at 0x0, mtimecmp at 0x4000, mtime at 0xbff8.

    mtime counts TIMEBASE_HZ ticks of the host's monotonic clock from ``mtime_base``; a
    checkpoint stores the count, so a resumed guest sees no jump.
    """

    msip: int = 0
    mtimecmp: int = U64
    mtime_base: int = 0
    clock_base_ns: int = 0

    MSIP, MTIMECMP, MTIME = 0x0, 0x4000, 0xBFF8

    def mtime(self) -> int:
        """The current mtime."""
        elapsed_ns = time.monotonic_ns() - self.clock_base_ns
        return (self.mtime_base + elapsed_ns * TIMEBASE_HZ // 1_000_000_000) & U64

    def set_mtime(self, value: int) -> None:
        """Make mtime read ``value`` now and count on from there."""
        self.mtime_base = value
        self.clock_base_ns = time.monotonic_ns()

    def _register(self, offset: int) -> tuple[int, int, int] | None:
        """(register base, width in bytes, value) for an offset inside one, else None."""
        for base, width, value in ((self.MSIP, 4, self.msip), (self.MTIMECMP, 8, self.mtimecmp),
                                   (self.MTIME, 8, None)):
            if base <= offset < base + width:
                return base, width, self.mtime() if value is None else value
        return None

    def read(self, offset: int, size: int) -> int:
        """An access of ``size`` bytes at ``offset``: the bytes of the register it falls in."""
        reg = self._register(offset)
        if reg is None:
            return 0
        base, _, value = reg
        return (value >> (8 * (offset - base))) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        """A write of ``size`` bytes at ``offset``: merged into the register it falls in."""
        reg = self._register(offset)
        if reg is None:
            return
        base, width, old = reg
        shift = 8 * (offset - base)
        mask = ((1 << (8 * size)) - 1) << shift
        new = ((old & ~mask) | ((value << shift) & mask)) & ((1 << (8 * width)) - 1)
        if base == self.MSIP:
            self.msip = new & 1
        elif base == self.MTIMECMP:
            self.mtimecmp = new
        else:
            self.set_mtime(new)

    def pending(self) -> int:
        """The mip bits this CLINT raises now: MTIP while mtime >= mtimecmp, MSIP from msip."""
        bits = (1 << IRQ_MSI) if self.msip else 0
        if self.mtimecmp != U64 and self.mtime() >= self.mtimecmp:
            bits |= 1 << IRQ_MTI
        return bits


# -- the board ------------------------------------------------------------------------------


class Board:
    """CPU, RAM, CLINT and the 16550A on a Bridge; ``run()`` until a stop is asked for."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.clint = Clint()
        self.tx_count = 0  # bytes the guest wrote to THR (for --stop-after-tx)
        self.stop_after_tx: int | None = None
        self.stop_requested = False
        self.checkpoint_requested = False
        self._stopped_in: tuple[str, int] | None = None  # the access emulation stopped in
        self._exception: tuple[int, int, int] | None = None  # (cause, epc, tval) to enter
        self._accesses = 0
        self._idle = 0
        self._last_irq_check_ns = 0
        self._in_stub = False
        self._stub_trap: int | None = None
        self.uc = uc = Uc(UC_ARCH_RISCV, UC_MODE_RISCV64)
        uc.mem_map(RAM_BASE, RAM_SIZE)
        uc.mmio_map(UART_BASE, 0x1000, self._uart_read, None, self._uart_write, None)
        uc.mmio_map(CLINT_BASE, CLINT_SIZE, self._clint_read, None, self._clint_write, None)
        uc.hook_add(UC_HOOK_INTR, self._on_exception)
        self._bridge_read = bridge.read
        self._bridge_write = bridge.write

    # -- boot ---------------------------------------------------------------------------------

    def load(self, firmware: Path, payload: Path, dtb: bytes) -> None:
        """Put the firmware, its payload and the FDT in RAM; the hart starts as QEMU's does."""
        for path, address in ((firmware, RAM_BASE), (payload, PAYLOAD_ADDR)):
            try:
                image = path.read_bytes()
            except OSError as exc:
                raise BoardError(f"{path}: cannot read: {exc.strerror}") from exc
            self.uc.mem_write(address, image)
        self.uc.mem_write(FDT_ADDR, dtb)
        self.uc.reg_write(rv.UC_RISCV_REG_A0, 0)  # hart id
        self.uc.reg_write(rv.UC_RISCV_REG_A1, FDT_ADDR)
        self.uc.reg_write(rv.UC_RISCV_REG_A2, 0)
        self.uc.reg_write(rv.UC_RISCV_REG_PC, RAM_BASE)
        self.clint.set_mtime(0)

    # -- the run loop ---------------------------------------------------------------------

    def run(self, on_checkpoint: Callable[[], None] | None = None) -> None:
        """Emulate until a stop is requested; ``on_checkpoint`` serves SIGUSR1's request."""
        uc = self.uc
        while True:
            pc = uc.reg_read(rv.UC_RISCV_REG_PC)
            try:
                uc.emu_start(pc, 0)
            except UcError as exc:
                pc = uc.reg_read(rv.UC_RISCV_REG_PC)
                if not self._is_ebreak(exc, pc):
                    raise BoardError(f"emulation failed at pc {pc:#x}: {exc}") from exc
                # unicorn 2.1.4 stops at an ebreak with "invalid instruction" instead of
                # raising the breakpoint exception (the interrupt hook never sees it), with
                # the PC at the ebreak. OpenSBI >= 1.3 probes for semihosting with one
                # (Debian 13's fw_jump.bin does at boot): the privileged spec's answer is a
                # breakpoint trap, mepc = mtval = its address.
                self._exception = (CAUSE_BREAKPOINT, pc, pc)
            if self._exception is not None:
                cause, epc, tval = self._exception
                self._exception = None
                self._enter_trap(cause, interrupt=False, epc=epc, tval=tval)
            elif self._stopped_in is not None:
                self._complete_access()
            else:
                pc = uc.reg_read(rv.UC_RISCV_REG_PC)
                raise BoardError(f"emulation stopped by itself at pc {pc:#x}")
            if self.stop_requested:
                return
            if self.checkpoint_requested:
                self.checkpoint_requested = False
                if on_checkpoint is not None:
                    on_checkpoint()
            self._take_interrupt()

    def _is_ebreak(self, exc: UcError, pc: int) -> bool:
        """Whether unicorn's "invalid instruction" at ``pc`` is an EBREAK or C.EBREAK."""
        if exc.errno != UC_ERR_INSN_INVALID:
            return False
        try:
            low = int.from_bytes(self.uc.mem_read(pc, 2), "little")
            if low == C_EBREAK:
                return True
            return int.from_bytes(self.uc.mem_read(pc, 4), "little") == EBREAK
        except UcError:
            return False

    def request_stop(self) -> None:
        """Stop at the next device access (signal handlers and other threads may call it)."""
        self.stop_requested = True

    def _stop_in(self, load_value: int | None) -> None:
        """Stop emulation inside this device access (``load_value``: what a load returned).

        unicorn then stops *at* the accessing instruction, everything before it done, the
        access itself done in the device but not retired: resumed as it is, it would access
        the device again. ``_complete_access`` retires it instead.
        """
        if self._stopped_in is None:
            self._stopped_in = ("load", load_value) if load_value is not None else ("store", 0)
            self.uc.emu_stop()

    def _complete_access(self) -> None:
        """Retire the load or store unicorn stopped in: rd = the value the device gave (sign-
        or zero-extended as the instruction says), pc past it. Any other instruction there is
        a BoardError (the board's devices are reached only by integer loads and stores)."""
        assert self._stopped_in is not None
        kind, value = self._stopped_in
        self._stopped_in = None
        uc = self.uc
        pc = uc.reg_read(rv.UC_RISCV_REG_PC)
        insn = int.from_bytes(uc.mem_read(pc, 2), "little")
        rd, width, signed = 0, 0, False
        if insn & 3 == 3:
            insn = int.from_bytes(uc.mem_read(pc, 4), "little")
            length, opcode, funct3 = 4, insn & 0x7F, (insn >> 12) & 7
            if kind == "load" and opcode == 0x03 and funct3 != 7:  # lb lh lw ld lbu lhu lwu
                rd, width, signed = (insn >> 7) & 31, 1 << (funct3 & 3), funct3 < 4
            elif not (kind == "store" and opcode == 0x23 and funct3 < 4):  # sb sh sw sd
                raise BoardError(f"cannot retire {insn:#010x} at {pc:#x} after a device access")
        else:
            length, quadrant, funct3 = 2, insn & 3, insn >> 13
            if kind == "load" and quadrant in (0, 2) and funct3 in (2, 3):  # c.lw(sp) c.ld(sp)
                rd = 8 + ((insn >> 2) & 7) if quadrant == 0 else (insn >> 7) & 31
                width, signed = 4 << (funct3 - 2), True
            elif not (kind == "store" and quadrant in (0, 2) and funct3 in (6, 7)):
                raise BoardError(f"cannot retire {insn:#06x} at {pc:#x} after a device access")
        if rd:
            value &= (1 << (8 * width)) - 1
            if signed and value >> (8 * width - 1):
                value -= 1 << (8 * width)
            uc.reg_write(GPRS[rd - 1], value & U64)
        uc.reg_write(rv.UC_RISCV_REG_PC, pc + length)

    def _after_access(self, load_value: int | None) -> None:
        """Every TICK_ACCESSES device accesses: port I/O, then stop for a request or an
        interrupt that may be due (at most every IRQ_CHECK_S while one stays masked)."""
        self._accesses = 0
        self.bridge.poll()
        if self.stop_requested or self.checkpoint_requested:
            self._stop_in(load_value)
            return
        now_ns = time.monotonic_ns()
        if self.clint.pending() and now_ns - self._last_irq_check_ns > IRQ_CHECK_S * 1e9:
            self._last_irq_check_ns = now_ns
            self._stop_in(load_value)

    # -- MMIO -----------------------------------------------------------------------------

    def _uart_read(self, uc: Uc, offset: int, size: int, user_data: Any) -> int:
        if offset & ((1 << UART_REG_SHIFT) - 1) or offset >= 8 << UART_REG_SHIFT:
            return 0  # the upper bytes of a 32-bit register, or past the eight registers
        reg = offset >> UART_REG_SHIFT
        value = self._bridge_read(reg)
        if reg == 5 and value == LSR_IDLE:
            self._idle += 1
            if self._idle >= IDLE_POLLS:
                # An idle guest polling LSR: wait for input (poll returns when it comes).
                self._idle = 0
                self.bridge.poll(IDLE_WAIT_S)
        else:
            self._idle = 0
        self._accesses += 1
        if self._accesses >= TICK_ACCESSES:
            self._after_access(value)
        return value

    def _uart_write(self, uc: Uc, offset: int, size: int, value: int, user_data: Any) -> None:
        if offset & ((1 << UART_REG_SHIFT) - 1) or offset >= 8 << UART_REG_SHIFT:
            return
        reg = offset >> UART_REG_SHIFT
        self._idle = 0
        self._bridge_write(reg, value & 0xFF)
        if reg == 0 and not self.bridge.uart.dlab:
            self.tx_count += 1
            if self.tx_count == self.stop_after_tx:
                self.request_stop()
                self._stop_in(None)
        self._accesses += 1
        if self._accesses >= TICK_ACCESSES:
            self._after_access(None)

    def _clint_read(self, uc: Uc, offset: int, size: int, user_data: Any) -> int:
        self._idle = 0
        value = self.clint.read(offset, size)
        self._accesses += 1
        if self._accesses >= TICK_ACCESSES:
            self._after_access(value)
        return value

    def _clint_write(self, uc: Uc, offset: int, size: int, value: int, user_data: Any) -> None:
        self.clint.write(offset, size, value)
        if self.clint.pending():
            self._stop_in(None)  # a timer set in the past, or an IPI to ourselves

    # -- privilege and CSRs ---------------------------------------------------------------

    @contextmanager
    def _machine_mode(self) -> Iterator[int]:
        """Run the body at M-mode (unicorn checks CSR access privilege); yields the old mode."""
        uc = self.uc
        priv = uc.reg_read(rv.UC_RISCV_REG_PRIV)
        uc.reg_write(rv.UC_RISCV_REG_PRIV, PRV_M)
        try:
            yield priv
        finally:
            uc.reg_write(rv.UC_RISCV_REG_PRIV, priv)

    def _enter_trap(self, cause: int, *, interrupt: bool, epc: int, tval: int) -> None:
        """The privileged spec's trap entry (§3.1.6.1, §4.1.1) from the current mode."""
        uc = self.uc
        with self._machine_mode() as priv:
            deleg = uc.reg_read(rv.UC_RISCV_REG_MIDELEG if interrupt else rv.UC_RISCV_REG_MEDELEG)
            mstatus = uc.reg_read(rv.UC_RISCV_REG_MSTATUS)
            code = cause | (CAUSE_INTERRUPT if interrupt else 0)
            if priv <= PRV_S and deleg >> cause & 1:
                target = PRV_S
                uc.reg_write(rv.UC_RISCV_REG_SEPC, epc)
                uc.reg_write(rv.UC_RISCV_REG_SCAUSE, code)
                uc.reg_write(rv.UC_RISCV_REG_STVAL, tval)
                spie = MSTATUS_SPIE if mstatus & MSTATUS_SIE else 0
                spp = MSTATUS_SPP if priv == PRV_S else 0
                mstatus = (mstatus & ~(MSTATUS_SPP | MSTATUS_SPIE | MSTATUS_SIE)) | spie | spp
                tvec = uc.reg_read(rv.UC_RISCV_REG_STVEC)
            else:
                target = PRV_M
                uc.reg_write(rv.UC_RISCV_REG_MEPC, epc)
                uc.reg_write(rv.UC_RISCV_REG_MCAUSE, code)
                uc.reg_write(rv.UC_RISCV_REG_MTVAL, tval)
                mpie = MSTATUS_MPIE if mstatus & MSTATUS_MIE else 0
                mstatus &= ~((3 << MSTATUS_MPP_SHIFT) | MSTATUS_MPIE | MSTATUS_MIE)
                mstatus |= mpie | (priv << MSTATUS_MPP_SHIFT)
                tvec = uc.reg_read(rv.UC_RISCV_REG_MTVEC)
            uc.reg_write(rv.UC_RISCV_REG_MSTATUS, mstatus)
        pc = tvec & ~3
        if interrupt and tvec & 3 == 1:
            pc += 4 * cause  # vectored mode, for interrupts only
        uc.reg_write(rv.UC_RISCV_REG_PRIV, target)
        uc.reg_write(rv.UC_RISCV_REG_PC, pc)

    def _on_exception(self, uc: Uc, intno: int, user_data: Any) -> None:
        """unicorn's interrupt hook: a synchronous exception the guest must handle itself.

        The trap is entered after emulation stopped (``run``), not here: a PC written from a
        hook leaves unicorn skipping its PC sync at the next stop from a device access
        (``skip_sync_pc_on_exit``, reset only by ``emu_start``), which would make that stop
        land at a block's start instead of at the accessing instruction.
        """
        if self._in_stub:
            self._stub_trap = intno
            uc.emu_stop()
            return
        if not 0 <= intno <= MAX_CAUSE:
            pc = uc.reg_read(rv.UC_RISCV_REG_PC)
            raise BoardError(f"unicorn raised {intno:#x} at pc {pc:#x}, which is no exception")
        # unicorn leaves the PC 4 past the faulting instruction, even a compressed one.
        epc = uc.reg_read(rv.UC_RISCV_REG_PC) - 4
        tval = 0
        if intno == CAUSE_ILLEGAL_INSN:
            low = int.from_bytes(uc.mem_read(epc, 2), "little")
            tval = low if low & 3 != 3 else int.from_bytes(uc.mem_read(epc, 4), "little")
        elif intno == CAUSE_BREAKPOINT:
            tval = epc
        self._exception = (intno, epc, tval)
        uc.emu_stop()

    def _take_interrupt(self) -> None:
        """Between two instructions: enter the highest-priority enabled CLINT interrupt."""
        pending = self.clint.pending()
        if not pending:
            return
        uc = self.uc
        with self._machine_mode() as priv:
            mie = uc.reg_read(rv.UC_RISCV_REG_MIE)
            mideleg = uc.reg_read(rv.UC_RISCV_REG_MIDELEG)
            mstatus = uc.reg_read(rv.UC_RISCV_REG_MSTATUS)
        for cause in (IRQ_MSI, IRQ_MTI):  # the spec's priority order (no external interrupts)
            bit = 1 << cause
            if not pending & mie & bit:
                continue
            if mideleg & bit:
                enabled = priv < PRV_S or (priv == PRV_S and mstatus & MSTATUS_SIE)
            else:
                enabled = priv < PRV_M or bool(mstatus & MSTATUS_MIE)
            if enabled:
                pc = uc.reg_read(rv.UC_RISCV_REG_PC)
                self._enter_trap(cause, interrupt=True, epc=pc, tval=0)
                return

    def _run_stub(self, instructions: list[int]) -> None:
        """Run a few instructions in M-mode in the scratch page (for CSRs without a register)."""
        uc = self.uc
        uc.mem_map(SCRATCH, 0x1000)
        saved_pc = uc.reg_read(rv.UC_RISCV_REG_PC)
        self._in_stub, self._stub_trap = True, None
        try:
            code = b"".join(i.to_bytes(4, "little") for i in instructions)
            uc.mem_write(SCRATCH, code)
            with self._machine_mode():
                uc.ctl_remove_cache(SCRATCH, SCRATCH + 0x1000)  # an older stub's translation
                uc.emu_start(SCRATCH, SCRATCH + len(code))
        finally:
            self._in_stub = False
            uc.mem_unmap(SCRATCH, 0x1000)
            uc.reg_write(rv.UC_RISCV_REG_PC, saved_pc)
        if self._stub_trap is not None:
            raise BoardError(f"a hidden CSR access trapped (cause {self._stub_trap})")

    def _hidden_csrs(self, values: dict[str, int] | None = None) -> dict[str, int]:
        """Read (or, given ``values``, write) mcounteren, scounteren and PMP by running
        ``csrr``/``csrw`` with x5.. as the values; x5.. are put back after."""
        uc = self.uc
        pairs = [(GPRS[4 + i], number) for i, number in enumerate(HIDDEN_CSRS.values())]
        saved = [uc.reg_read(reg) for reg, _ in pairs]
        if values is None:  # csrr xN, csr  (csrrs xN, csr, x0)
            code = [(csr << 20) | (2 << 12) | ((5 + i) << 7) | 0x73
                    for i, (_, csr) in enumerate(pairs)]
        else:  # csrw csr, xN  (csrrw x0, csr, xN)
            for (reg, _), name in zip(pairs, HIDDEN_CSRS, strict=True):
                uc.reg_write(reg, values[name])
            code = [(csr << 20) | ((5 + i) << 15) | (1 << 12) | 0x73
                    for i, (_, csr) in enumerate(pairs)]
        self._run_stub(code)
        result = {name: uc.reg_read(reg) for (reg, _), name in zip(pairs, HIDDEN_CSRS, strict=True)}
        for (reg, _), value in zip(pairs, saved, strict=True):
            uc.reg_write(reg, value)
        return result

    # -- checkpoints -------------------------------------------------------------------------

    def cpu_state(self) -> dict[str, Any]:
        """The hart: pc, privilege, x1–x31, f0–f31 and every CSR the board can reach."""
        uc = self.uc
        hidden = self._hidden_csrs()
        with self._machine_mode() as priv:
            csrs = {name: uc.reg_read(reg) for name, reg in CSR_REGS.items()}
        return {
            "pc": uc.reg_read(rv.UC_RISCV_REG_PC),
            "priv": priv,
            "x": [uc.reg_read(reg) for reg in GPRS],
            "f": [uc.reg_read(reg) for reg in FPRS],
            "csr": {**csrs, **hidden},
        }

    def set_cpu_state(self, cpu: dict[str, Any]) -> None:
        """Load ``cpu_state()``'s value back (PMP first, the privilege last)."""
        uc = self.uc
        self._hidden_csrs({name: cpu["csr"][name] for name in HIDDEN_CSRS})
        uc.reg_write(rv.UC_RISCV_REG_PRIV, PRV_M)
        for name, reg in CSR_REGS.items():
            if name != "misa":  # fixed by the CPU model; checked on load instead
                uc.reg_write(reg, cpu["csr"][name])
        for reg, value in zip(GPRS, cpu["x"], strict=True):
            uc.reg_write(reg, value)
        for reg, value in zip(FPRS, cpu["f"], strict=True):
            uc.reg_write(reg, value)
        uc.reg_write(rv.UC_RISCV_REG_PC, cpu["pc"])
        uc.reg_write(rv.UC_RISCV_REG_PRIV, cpu["priv"])

    def save(self, directory: Path, *, stop: bool) -> None:
        """Write the whole board to ``directory`` (the previous one kept as ``DIR.prev``).

        Call between two instructions (after ``run`` returned, or from its ``on_checkpoint``).
        With ``stop`` the UART's port is quiesced and closed (``Bridge.checkpoint(stop=True)``).
        """
        ram = bytes(self.uc.mem_read(RAM_BASE, RAM_SIZE))
        document = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "cpu": self.cpu_state(),
            "clint": {"msip": self.clint.msip, "mtimecmp": self.clint.mtimecmp,
                      "mtime": self.clint.mtime()},
            "ram": {"base": RAM_BASE, "size": RAM_SIZE, "file": RAM_FILE,
                    "sha256": hashlib.sha256(ram).hexdigest()},
            "uart": {"base": UART_BASE, "reg_shift": UART_REG_SHIFT, "file": UART_CHECKPOINT},
            "tx_count": self.tx_count,
        }
        directory = directory.resolve()
        directory.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            _write_file(temp / RAM_FILE, zlib.compress(ram, 1))
            self.bridge.checkpoint(temp / UART_CHECKPOINT, stop=stop, keep_previous=False)
            _write_file(temp / "board.json", json.dumps(document, indent=1).encode() + b"\n")
            previous = directory.with_name(directory.name + ".prev")
            if directory.exists():
                shutil.rmtree(previous, ignore_errors=True)
                directory.rename(previous)
            temp.rename(directory)
            _fsync_dir(directory.parent)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise

    def restore(self, directory: Path, document: dict[str, Any]) -> None:
        """Load a checked ``board.json`` document and its RAM image into this board."""
        ram = _read_ram(directory / RAM_FILE, document["ram"]["sha256"])
        self.uc.mem_write(RAM_BASE, ram)
        self.set_cpu_state(document["cpu"])
        clint = document["clint"]
        self.clint.msip = clint["msip"]
        self.clint.mtimecmp = clint["mtimecmp"]
        self.clint.set_mtime(clint["mtime"])
        self.tx_count = document["tx_count"]


# -- checkpoint files -----------------------------------------------------------------------


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_ram(path: Path, sha256: str) -> bytes:
    """The RAM image, decompressed no further than RAM_SIZE and checked against its hash."""
    try:
        packed = path.read_bytes()
    except OSError as exc:
        raise BoardCheckpointError(f"{path}: cannot read: {exc.strerror}") from exc
    inflate = zlib.decompressobj()
    try:
        ram = inflate.decompress(packed, RAM_SIZE + 1)
    except zlib.error as exc:
        raise BoardCheckpointError(f"{path}: not a zlib stream: {exc}") from exc
    if len(ram) != RAM_SIZE or inflate.unconsumed_tail or not inflate.eof:
        raise BoardCheckpointError(f"{path}: RAM image is not {RAM_SIZE} bytes")
    if hashlib.sha256(ram).hexdigest() != sha256:
        raise BoardCheckpointError(f"{path}: RAM image does not match its sha256")
    return ram


def _u64(value: Any, where: str) -> int:
    if type(value) is not int or not 0 <= value <= U64:
        raise BoardCheckpointError(f"board.json: {where}: must be an integer 0..2^64-1")
    return value


def _keys(section: Any, keys: set[str], where: str) -> dict[str, Any]:
    if not isinstance(section, dict):
        raise BoardCheckpointError(f"board.json: {where}: must be an object")
    if set(section) != keys:
        extra, missing = sorted(set(section) - keys), sorted(keys - set(section))
        raise BoardCheckpointError(f"board.json: {where}: unknown {extra} / missing {missing}")
    return section


def read_board_checkpoint(directory: Path) -> dict[str, Any]:
    """``board.json``, checked field by field: exact keys, integer ranges, this board's map."""
    path = directory / "board.json"
    try:
        document = json.loads(path.read_bytes())
    except OSError as exc:
        error = BoardCheckpointError(f"{path}: cannot read: {exc.strerror}")
        error.exit_code = EX_NOINPUT
        raise error from exc
    except ValueError as exc:
        raise BoardCheckpointError(f"{path}: not JSON: {exc}") from exc
    top = _keys(document, {"format", "format_version", "cpu", "clint", "ram", "uart", "tx_count"},
                "top level")
    if top["format"] != CHECKPOINT_FORMAT or top["format_version"] != CHECKPOINT_VERSION:
        raise BoardCheckpointError(f"{path}: not a {CHECKPOINT_FORMAT} version "
                                   f"{CHECKPOINT_VERSION} checkpoint")
    cpu = _keys(top["cpu"], {"pc", "priv", "x", "f", "csr"}, "cpu")
    _u64(cpu["pc"], "cpu.pc")
    if cpu["priv"] not in (0, 1, 3):
        raise BoardCheckpointError("board.json: cpu.priv: must be 0, 1 or 3")
    for name, count in (("x", 31), ("f", 32)):
        if not isinstance(cpu[name], list) or len(cpu[name]) != count:
            raise BoardCheckpointError(f"board.json: cpu.{name}: must list {count} registers")
        for i, value in enumerate(cpu[name]):
            _u64(value, f"cpu.{name}[{i}]")
    csr = _keys(cpu["csr"], set(CSR_REGS) | set(HIDDEN_CSRS), "cpu.csr")
    for name, value in csr.items():
        _u64(value, f"cpu.csr.{name}")
    clint = _keys(top["clint"], {"msip", "mtimecmp", "mtime"}, "clint")
    for name, value in clint.items():
        _u64(value, f"clint.{name}")
    if clint["msip"] > 1:
        raise BoardCheckpointError("board.json: clint.msip: must be 0 or 1")
    ram = _keys(top["ram"], {"base", "size", "file", "sha256"}, "ram")
    uart = _keys(top["uart"], {"base", "reg_shift", "file"}, "uart")
    if (ram["base"], ram["size"], ram["file"]) != (RAM_BASE, RAM_SIZE, RAM_FILE) or (
        uart["base"], uart["reg_shift"], uart["file"]) != (UART_BASE, UART_REG_SHIFT,
                                                           UART_CHECKPOINT):
        raise BoardCheckpointError("board.json: ram/uart: not this board's memory map")
    if not isinstance(ram["sha256"], str) or len(ram["sha256"]) != 64:
        raise BoardCheckpointError("board.json: ram.sha256: must be 64 hex digits")
    _u64(top["tx_count"], "tx_count")
    return top


# -- the command line -----------------------------------------------------------------------


def _port_settings(url: str, link: str | None) -> PortSettings:
    return PortSettings(url=url, link_path=link)


def uboot_version(payload: Path) -> str | None:
    """The version in a U-Boot image ("2023.01"), or None if it names none."""
    found = re.search(rb"U-Boot (20\d\d\.\d\d)", payload.read_bytes())
    return found.group(1).decode() if found else None


def build(args: argparse.Namespace) -> Board:
    """A board from the command line: booted afresh, or resumed from ``--resume``."""
    if args.resume is not None:
        directory = Path(args.resume)
        document = read_board_checkpoint(directory)
        port = _port_settings(args.port, args.link) if args.port else None
        bridge = Bridge.resume(directory / UART_CHECKPOINT, port=port, record=args.record)
        board = Board(bridge)
        board.restore(directory, document)
    else:
        dtb = compile_device_tree(Path(args.dts))
        check_device_tree(dtb)
        bridge = Bridge(_port_settings(args.port or "pty:", args.link), name="uart0",
                        record=args.record)
        board = Board(bridge)
        board.load(Path(args.firmware), Path(args.payload), dtb)
        version = uboot_version(Path(args.payload))
        if version not in VERIFIED_UBOOT:
            print(f"board: warning: U-Boot {version or '(unknown)'} is not one this board "
                  f"boots to its prompt (verified: {', '.join(VERIFIED_UBOOT)})",
                  file=sys.stderr)
    return board


def main(argv: list[str] | None = None) -> int:
    """Run the board; exit codes as uartbridge's (sysexits)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", help="the console's port URL (default pty:, or the "
                        "checkpoint's with --resume)")
    parser.add_argument("--link", help="for --port pty:, where to publish the pty's path")
    parser.add_argument("--firmware", default=str(FIRMWARE), help="OpenSBI fw_jump.bin")
    parser.add_argument("--payload", default=str(PAYLOAD), help="U-Boot (S-mode) u-boot.bin")
    parser.add_argument("--dts", default=str(DTS), help="the board's device tree source")
    parser.add_argument("--checkpoint", metavar="DIR",
                        help="on SIGINT/SIGTERM (or --stop-after-tx) write the board here and "
                        "exit; on SIGUSR1 write it and go on")
    parser.add_argument("--resume", metavar="DIR", help="continue a board checkpoint")
    parser.add_argument("--stop-after-tx", type=int, metavar="N",
                        help="stop (and checkpoint) once the guest wrote N bytes to THR")
    parser.add_argument("--record", metavar="FILE",
                        help="record the console UART's inputs (uartbridge replay FILE)")
    args = parser.parse_args(argv)
    if args.stop_after_tx is not None and args.stop_after_tx < 1:
        parser.error("--stop-after-tx must be at least 1")
    try:
        board = build(args)
    except (UartBridgeError, UcError) as exc:
        print(f"board: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", EX_SOFTWARE)
    board.stop_after_tx = args.stop_after_tx
    checkpoint_dir = Path(args.checkpoint) if args.checkpoint else None

    def on_signal(signum: int, frame: object) -> None:
        board.request_stop()

    def on_usr1(signum: int, frame: object) -> None:
        board.checkpoint_requested = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGUSR1, on_usr1)
    bridge = board.bridge
    try:
        bridge.open()
        print(f"board: console on {bridge.pty_path or bridge.port}", file=sys.stderr, flush=True)
        board.run(on_checkpoint=(lambda: board.save(checkpoint_dir, stop=False))
                  if checkpoint_dir else None)
        if checkpoint_dir is not None:
            board.save(checkpoint_dir, stop=True)
            print(f"board: checkpoint in {checkpoint_dir}", file=sys.stderr, flush=True)
    except UartBridgeError as exc:
        print(f"board: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        bridge.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
