"""QEMU's own 16550 as a reference device, driven over qtest (reference/host-ports.md).

``QemuUart`` starts ``qemu-system-x86_64 -S`` (vCPU never runs, so the virtual clock is frozen
and SeaBIOS never touches the port) with an ``isa-serial`` at a non-standard base whose
chardev is a Unix socket we own: bytes QEMU's UART transmits arrive on that socket, and bytes
we write to it reach QEMU's receiver. Register accesses are ``inb``/``outb`` on the qtest
socket; ``irq_intercept_in ioapic`` reports the UART's IRQ line as ``IRQ raise N`` /
``IRQ lower N`` lines, which may arrive before any reply, so they are parsed wherever they
appear.

Received bytes are synchronised without touching a register: QEMU reads its chardev socket
only while the UART's ``can_receive`` allows, and ``SIOCOUTQ`` on our end of a Unix stream
socket counts what QEMU has not yet read. Once it reaches 0, one more qtest round trip
guarantees the receive callback has finished (QEMU's main loop is single-threaded).

QEMU is started with a parent-death signal and stopped by PID in ``close()``.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import termios
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

QEMU = "qemu-system-x86_64"
IOBASE = 0x2A0  # not a COM port: nothing else in the machine knows about it
IRQ = 5
# Generous limits for start-up and synchronisation; they only bound a hang, they are not
# assertions on timing.
START_TIMEOUT_S = 20.0
SYNC_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1
_UNIX_PATH_MAX = 100


def require_qemu() -> str:
    """The QEMU binary's path; skip the test without it, or fail when ``CI`` is set."""
    path = shutil.which(QEMU)
    if path is None:
        message = f"{QEMU} not installed (apt-get install qemu-system-x86)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; the QEMU differential tests must run in CI")
        pytest.skip(message)
    return path


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the test process dies (QEMU ignores EOF)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class QemuError(RuntimeError):
    """QEMU failed to start, answered a qtest command with an error, or stopped answering."""


class QemuUart:
    """One QEMU process with one ``isa-serial``, as a device with ``read``/``write``.

    ``irq`` is the line's level as last reported; ``irq_trace`` every edge in order (True =
    raise). ``op_edges`` holds the edges reported during the most recent register access.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        iobase: int = IOBASE,
        irq: int = IRQ,
        qmp: bool = False,
        binary: str = QEMU,
    ) -> None:
        """Start QEMU with its qtest, chardev (and optionally QMP) sockets in ``workdir``."""
        self.iobase = iobase
        self.irq_number = irq
        self.irq = False
        self.irq_trace: list[bool] = []
        self.op_edges: list[bool] = []
        self._buf = b""
        self._qmp_buf = b""
        self._proc: subprocess.Popen[bytes] | None = None
        self._listeners: list[socket.socket] = []
        self._paths: list[str] = []
        self._qtest: socket.socket | None = None
        self._serial: socket.socket | None = None
        self._qmp: socket.socket | None = None
        # Unix socket paths are limited to ~108 bytes; pytest's tmp_path can be longer.
        if len(str(workdir)) > _UNIX_PATH_MAX - 10:
            workdir = Path(tempfile.mkdtemp(prefix="qemu-uart-"))
        self.workdir = workdir
        self._binary = binary
        self._with_qmp = qmp
        self._generation = 0
        self._start_checked()

    def _start_checked(self) -> None:
        try:
            self._start(self._binary, self._with_qmp)
        except BaseException:
            self.close()
            raise

    def restart(self) -> None:
        """Stop QEMU and start a new one (e.g. after bytes were left in its input)."""
        self.close()
        self._buf = self._qmp_buf = b""
        self.irq = False
        self.op_edges = []
        self._generation += 1
        self._start_checked()

    # -- process ------------------------------------------------------------------------

    def _listen(self, name: str) -> tuple[socket.socket, str]:
        path = str(self.workdir / f"{self._generation}{name}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listeners.append(sock)
        sock.bind(path)
        sock.listen(1)
        self._paths.append(path)
        return sock, path

    def _start(self, binary: str, qmp: bool) -> None:
        lq, qpath = self._listen("q.sock")
        ls, spath = self._listen("s.sock")
        argv = [
            binary, "-machine", "pc", "-accel", "tcg", "-S", "-display", "none",
            "-nodefaults", "-monitor", "none",
            "-qtest", f"unix:{qpath}", "-qtest-log", "/dev/null",
            "-chardev", f"socket,id=s0,path={spath}",
            "-device", f"isa-serial,chardev=s0,iobase={self.iobase:#x},irq={self.irq_number}",
        ]  # fmt: skip
        lm = None
        if qmp:
            lm, mpath = self._listen("m.sock")
            argv += ["-qmp", f"unix:{mpath}"]
        self._stderr_path = self.workdir / f"{self._generation}qemu.stderr"
        with open(self._stderr_path, "wb") as stderr:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                preexec_fn=_die_with_parent,
            )
        self._qtest = self._accept(lq)
        self._serial = self._accept(ls)
        self._serial.setblocking(False)
        if lm is not None:
            self._qmp = self._accept(lm)
            self._qmp_greeting()
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()
        self.command("irq_intercept_in ioapic")

    def _accept(self, listener: socket.socket) -> socket.socket:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select([listener], [], [], 0.05)
            if ready:
                conn, _ = listener.accept()
                return conn
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise QemuError(f"QEMU exited with {self._proc.returncode}: {self._stderr()}")
        raise QemuError(f"QEMU did not connect within {START_TIMEOUT_S} s: {self._stderr()}")

    def _stderr(self) -> str:
        try:
            return self._stderr_path.read_text(errors="replace").strip()
        except OSError:
            return ""

    def close(self) -> None:
        """Stop QEMU by PID (terminate, wait, kill if needed) and close the sockets."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            for sock in (self._qtest, self._serial, self._qmp, *self._listeners):
                if sock is not None:
                    sock.close()
            self._qtest = self._serial = self._qmp = None
            self._listeners.clear()
            for path in self._paths:
                with suppress(FileNotFoundError):
                    os.unlink(path)
            self._paths.clear()

    def __enter__(self) -> QemuUart:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- qtest --------------------------------------------------------------------------

    def _readline(self) -> str:
        sock = self._qtest
        assert sock is not None, "QEMU is closed"
        while b"\n" not in self._buf:
            ready, _, _ = select.select([sock], [], [], SYNC_TIMEOUT_S)
            if not ready:
                raise QemuError(f"qtest: no answer within {SYNC_TIMEOUT_S} s")
            chunk = sock.recv(65536)
            if not chunk:
                raise QemuError(f"qtest socket closed: {self._stderr()}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode().strip()

    def _irq_line(self, line: str) -> bool:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "IRQ" and parts[1] in ("raise", "lower"):
            if int(parts[2]) == self.irq_number:
                level = parts[1] == "raise"
                self.irq = level
                self.irq_trace.append(level)
                self.op_edges.append(level)
            return True
        return False

    def commands(self, cmds: list[str]) -> list[str]:
        """Send qtest commands in one go; return each reply (IRQ lines are tracked)."""
        sock = self._qtest
        assert sock is not None, "QEMU is closed"
        sock.sendall("".join(c + "\n" for c in cmds).encode())
        replies = []
        for cmd in cmds:
            while True:
                line = self._readline()
                if self._irq_line(line):
                    continue
                if line.startswith("OK"):
                    replies.append(line)
                    break
                raise QemuError(f"qtest {cmd!r}: {line!r}")
        return replies

    def command(self, cmd: str) -> str:
        """Send one qtest command and return its ``OK …`` reply."""
        return self.commands([cmd])[0]

    # -- device interface ----------------------------------------------------------------

    def read(self, offset: int) -> int:
        """``inb`` from the UART register at ``offset``."""
        self.op_edges = []
        return int(self.command(f"inb {self.iobase + offset:#x}").split()[1], 16)

    def write(self, offset: int, value: int) -> None:
        """``outb`` to the UART register at ``offset``."""
        self.op_edges = []
        self.command(f"outb {self.iobase + offset:#x} {value:#x}")

    def batch(self, ops: list[tuple[int, int | None]]) -> list[int]:
        """Several accesses in one qtest message, which QEMU runs in one main-loop step
        (nothing from the chardev can come in between). ``(offset, value)`` writes,
        ``(offset, None)`` reads; returns the values read, in order."""
        self.op_edges = []
        base = self.iobase
        cmds = [f"inb {base + o:#x}" if v is None else f"outb {base + o:#x} {v:#x}" for o, v in ops]
        replies = self.commands(cmds)
        return [int(r.split()[1], 16) for (_, v), r in zip(ops, replies, strict=True) if v is None]

    def sync(self) -> None:
        """One qtest round trip: everything QEMU's main loop had pending has run."""
        self.commands(["endianness"])

    def received(self) -> bytes:
        """The bytes QEMU's UART has transmitted since the last call (non-blocking).

        QEMU hands a byte to its socket inside the THR write, so by the time ``outb``
        answered the byte is already in our receive queue: a round trip is settle enough.
        """
        sock = self._serial
        assert sock is not None, "QEMU is closed"
        self.sync()
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                return data
            if not chunk:
                raise QemuError("QEMU closed the serial socket")
            data += chunk

    def unread(self) -> int:
        """SIOCOUTQ on our end of the serial socket: written, but not yet read by QEMU."""
        sock = self._serial
        assert sock is not None, "QEMU is closed"
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        count: int = struct.unpack("i", raw)[0]
        return count

    def send(self, data: bytes, *, wait: bool = True) -> None:
        """Write ``data`` to QEMU's receiver; with ``wait``, return once QEMU has taken all
        of it (it only reads as much as its ``can_receive`` allows: don't send more)."""
        sock = self._serial
        assert sock is not None, "QEMU is closed"
        self.op_edges = []
        sock.setblocking(True)
        try:
            sock.sendall(data)
        finally:
            sock.setblocking(False)
        if wait and not self.wait_taken():
            raise QemuError(f"QEMU did not take {data!r} within {SYNC_TIMEOUT_S} s")

    def wait_taken(self, timeout_s: float = SYNC_TIMEOUT_S) -> bool:
        """Wait until QEMU has read everything we sent, then sync the main loop.

        False if it has not after ``timeout_s`` and 100 round trips (its ``can_receive`` was
        smaller than what was sent); the bytes then stay in its input until it has room.
        """
        deadline = time.monotonic() + timeout_s
        trips = 0
        while self.unread():
            if trips >= 100 and time.monotonic() > deadline:
                return False
            self.sync()
            trips += 1
        self.sync()
        return True

    # -- QMP (optional) ----------------------------------------------------------------

    def _qmp_message(self) -> dict[str, object]:
        sock = self._qmp
        assert sock is not None, "started without qmp=True"
        while b"\n" not in self._qmp_buf:
            ready, _, _ = select.select([sock], [], [], SYNC_TIMEOUT_S)
            if not ready:
                raise QemuError(f"QMP: no answer within {SYNC_TIMEOUT_S} s")
            chunk = sock.recv(65536)
            if not chunk:
                raise QemuError(f"QMP socket closed: {self._stderr()}")
            self._qmp_buf += chunk
        line, _, self._qmp_buf = self._qmp_buf.partition(b"\n")
        message: dict[str, object] = json.loads(line)
        return message

    def _qmp_execute(self, command: str) -> None:
        sock = self._qmp
        assert sock is not None, "started without qmp=True"
        sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
        while True:
            message = self._qmp_message()
            if "return" in message:
                return
            if "error" in message:
                raise QemuError(f"QMP {command}: {message['error']}")

    def _qmp_greeting(self) -> None:
        self._qmp_message()
        self._qmp_execute("qmp_capabilities")

    def system_reset(self) -> None:
        """QMP ``system_reset``; returns once the RESET event says the devices were reset."""
        sock = self._qmp
        assert sock is not None, "started without qmp=True"
        sock.sendall(b'{"execute": "system_reset"}\n')
        got_return = got_event = False
        while not (got_return and got_event):
            message = self._qmp_message()
            if "error" in message:
                raise QemuError(f"QMP system_reset: {message['error']}")
            got_return = got_return or "return" in message
            got_event = got_event or message.get("event") == "RESET"
        self.op_edges = []
        self.sync()


@contextmanager
def qemu_uart(workdir: Path, *, qmp: bool = False) -> Iterator[QemuUart]:
    """A running ``QemuUart`` for the ``with`` block; QEMU is stopped by PID afterwards.

    Without QEMU installed the test is skipped, or fails when the ``CI`` variable is set.
    """
    dev = QemuUart(workdir, qmp=qmp, binary=require_qemu())
    try:
        yield dev
    finally:
        dev.close()
