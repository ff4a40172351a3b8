"""The guest side of the VM test: a polled 16550 driver on a ``BusClient``, and tty probes.

Run inside the VM with the installed uartbridge's Python (``/opt/uartbridge/bin/python``);
each subcommand prints one JSON object. The host test imports ``pattern`` from here, so both
sides compute the same bytes. Polled (LSR.THRE / LSR.DR) rather than interrupt-driven: a
driver that survives a daemon restart without re-running start-up (which would reset the
FIFOs the checkpoint kept), as a guest whose emulator reconnects to the bus does.

    init   SOCKET [--lcr 0x03] [--divisor 1] [--mcr 0x0b]   program the UART, FIFOs on
    set    SOCKET OFFSET=VALUE ...                          raw register writes (DLAB aware)
    write  SOCKET --seed S --count N [--skip K] [--idle-s T]
    read   SOCKET --count N [--idle-s T] [--timeout-s T]
    regs   SOCKET
    loop   SOCKET --seed S --count N --read-count-file F [--session-s T] [--timeout-s T]
    tty    DEVICE                                           termios, modem lines, queues
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import struct
import sys
import termios
import time
from typing import Any

FIFO_ENABLE_CLEAR_TRIGGER8 = 0x87  # FCR: FIFOs on, both cleared, RX trigger 8
LSR_DR = 0x01
LSR_THRE = 0x20
FIFO_SIZE = 16


def pattern(seed: str, count: int) -> bytes:
    """``count`` pseudo-random bytes (all 256 values) named by ``seed``; the same on both sides."""
    out = bytearray()
    block = 0
    while len(out) < count:
        out += hashlib.sha256(f"{seed}:{block}".encode()).digest()
        block += 1
    return bytes(out[:count])


def _client(socket_path: str) -> Any:
    from uartbridge.client import BusClient  # only inside the VM's venv

    return BusClient(socket_path, timeout_s=30.0, spin_us=0)


def cmd_init(args: argparse.Namespace) -> dict[str, Any]:
    with _client(args.socket) as bus:
        bus.write(1, 0)                                # IER off
        bus.write(3, 0x80 | args.lcr)                  # DLAB
        bus.write(0, args.divisor & 0xFF)
        bus.write(1, args.divisor >> 8)
        bus.write(3, args.lcr)
        bus.write(2, FIFO_ENABLE_CLEAR_TRIGGER8)
        bus.write(4, args.mcr)
        bus.sync()
        return {"lsr": bus.read(5), "msr": bus.read(6)}


def cmd_set(args: argparse.Namespace) -> dict[str, Any]:
    with _client(args.socket) as bus:
        for item in args.writes:
            offset, _, value = item.partition("=")
            bus.write(int(offset, 0), int(value, 0))
        bus.sync()
        return {"lcr": bus.read(3), "mcr": bus.read(4)}


def cmd_write(args: argparse.Namespace) -> dict[str, Any]:
    """Write pattern[skip:count] through THR, 16 bytes per THRE; stop early when THRE has not
    come back for ``idle_s`` (a wire that does not drain). Prints how many were written."""
    data = pattern(args.seed, args.count)
    done = args.skip
    with _client(args.socket) as bus:
        last_progress = time.monotonic()
        while done < len(data):
            if bus.read(5) & LSR_THRE:
                chunk = data[done : done + FIFO_SIZE]
                bus.write_many(0, chunk)
                done += len(chunk)
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > args.idle_s:
                break
            else:
                time.sleep(0.002)
        bus.sync()  # every THR write above was executed by the device
    return {"written": done, "count": args.count}


def cmd_read(args: argparse.Namespace) -> dict[str, Any]:
    """Read RBR while LSR.DR, until ``count`` bytes, ``idle_s`` without one, or ``timeout_s``."""
    got = bytearray()
    with _client(args.socket) as bus:
        start = last = time.monotonic()
        while len(got) < args.count:
            now = time.monotonic()
            if now - last > args.idle_s or now - start > args.timeout_s:
                break
            if bus.read(5) & LSR_DR:
                got += bus.read_many(0, min(256, args.count - len(got)))
                last = time.monotonic()
            else:
                time.sleep(0.002)
    return {"n": len(got), "hex": got.hex()}


def cmd_loop(args: argparse.Namespace) -> dict[str, Any]:
    """An emulator that reconnects all the time: sessions of ``session_s`` (connect, write
    pattern bytes while THRE, read while DR, close), back to back, until ``count`` bytes are
    written and as many read as the file ``read_count_file`` says once it exists (the host
    writes it when it has sent its last byte), or ``timeout_s``. A failed connect is retried after
    10 ms and counted by errno (``refused``; a HELLO answered with an error: ``turned_away``);
    a session the daemon ends (its stop) is a reconnect; a write counts as done only once
    confirmed (``write_many(confirm=True)``), so what a stop cut off is sent again. Reports
    every gap longer than 50 ms between two operations that succeeded, and the longest."""
    import errno

    from uartbridge.errors import BusError

    data = pattern(args.seed, args.count)
    done = 0
    got = bytearray()
    refused: dict[str, int] = {}  # connect() errors by errno
    turned_away: dict[str, int] = {}
    sessions = dropped = 0
    gaps: list[float] = []
    longest = 0.0
    start = last_ok = time.monotonic()

    def ok() -> None:
        nonlocal last_ok, longest
        now = time.monotonic()
        longest = max(longest, now - last_ok)
        if now - last_ok > 0.05:
            gaps.append(round(now - last_ok, 4))
        last_ok = now

    def more_to_read() -> bool:
        try:
            with open(args.read_count_file) as file:
                return len(got) < int(file.read())
        except (OSError, ValueError):
            return True  # not written yet: the host is still sending

    while (done < len(data) or more_to_read()) and time.monotonic() - start < args.timeout_s:
        try:
            bus = _client(args.socket)
        except BusError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno is not None:  # connect() failed
                name = errno.errorcode.get(cause.errno, str(cause.errno))
                refused[name] = refused.get(name, 0) + 1
            else:  # connected, but HELLO was answered with an error (SHUTTING_DOWN, BUSY)
                turned_away[str(exc)[:60]] = turned_away.get(str(exc)[:60], 0) + 1
            time.sleep(0.01)
            continue
        sessions += 1
        ok()
        try:
            with bus:
                until = time.monotonic() + args.session_s
                while time.monotonic() < until:
                    lsr = bus.read(5)
                    ok()
                    if lsr & LSR_DR:
                        got += bus.read_many(0, 256)
                        ok()
                    if lsr & LSR_THRE and done < len(data):
                        chunk = data[done:done + FIFO_SIZE]
                        # Executed once this returns; if the daemon stops first it was not,
                        # and the next session sends it again (docs/bus-protocol.md §1).
                        bus.write_many(0, chunk, confirm=True)
                        done += len(chunk)
                        ok()
                    elif not lsr & LSR_DR:
                        time.sleep(0.002)
                bus.sync()
                ok()
        except BusError:
            dropped += 1  # the daemon stopped under this session: reconnect
    return {"written": done, "n": len(got), "hex": got.hex(), "refused": refused,
            "turned_away": turned_away,
            "sessions": sessions, "dropped": dropped, "gaps": gaps,
            "longest_gap_s": round(longest, 4)}


def cmd_regs(args: argparse.Namespace) -> dict[str, Any]:
    with _client(args.socket) as bus:
        return {name: bus.read(off) for name, off in
                (("ier", 1), ("iir", 2), ("lcr", 3), ("mcr", 4), ("lsr", 5), ("msr", 6))}


def cmd_tty(args: argparse.Namespace) -> dict[str, Any]:
    """The tty as the kernel has it: termios flags, modem lines, input/output queue sizes."""
    fd = os.open(args.device, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        iflag, oflag, cflag, lflag, ispeed, ospeed, _ = termios.tcgetattr(fd)

        def ioctl_int(request: int) -> int:
            return int(struct.unpack("i", fcntl.ioctl(fd, request, struct.pack("i", 0)))[0])

        bits = ioctl_int(termios.TIOCMGET)
        return {
            "parmrk": bool(iflag & termios.PARMRK), "inpck": bool(iflag & termios.INPCK),
            "crtscts": bool(cflag & termios.CRTSCTS), "cstopb": bool(cflag & termios.CSTOPB),
            "parenb": bool(cflag & termios.PARENB), "parodd": bool(cflag & termios.PARODD),
            "csize": {termios.CS5: 5, termios.CS6: 6, termios.CS7: 7, termios.CS8: 8}[
                cflag & termios.CSIZE],
            "icanon": bool(lflag & termios.ICANON), "echo": bool(lflag & termios.ECHO),
            "opost": bool(oflag & termios.OPOST),
            "dtr": bool(bits & termios.TIOCM_DTR), "rts": bool(bits & termios.TIOCM_RTS),
            "cts": bool(bits & termios.TIOCM_CTS),
            "inq": ioctl_int(termios.FIONREAD), "outq": ioctl_int(termios.TIOCOUTQ),
            "ispeed": ispeed, "ospeed": ospeed,
        }
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="guest_uart.py")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init")
    p.add_argument("socket")
    p.add_argument("--lcr", type=lambda s: int(s, 0), default=0x03)
    p.add_argument("--divisor", type=lambda s: int(s, 0), default=1)
    p.add_argument("--mcr", type=lambda s: int(s, 0), default=0x0B)  # DTR RTS OUT2
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("set")
    p.add_argument("socket")
    p.add_argument("writes", nargs="+")
    p.set_defaults(func=cmd_set)
    p = sub.add_parser("write")
    p.add_argument("socket")
    p.add_argument("--seed", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--skip", type=int, default=0)
    p.add_argument("--idle-s", type=float, default=30.0)
    p.set_defaults(func=cmd_write)
    p = sub.add_parser("read")
    p.add_argument("socket")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--idle-s", type=float, default=10.0)
    p.add_argument("--timeout-s", type=float, default=120.0)
    p.set_defaults(func=cmd_read)
    p = sub.add_parser("loop")
    p.add_argument("socket")
    p.add_argument("--seed", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--read-count-file", required=True)
    p.add_argument("--session-s", type=float, default=0.3)
    p.add_argument("--timeout-s", type=float, default=240.0)
    p.set_defaults(func=cmd_loop)
    p = sub.add_parser("regs")
    p.add_argument("socket")
    p.set_defaults(func=cmd_regs)
    p = sub.add_parser("tty")
    p.add_argument("device")
    p.set_defaults(func=cmd_tty)
    args = parser.parse_args(argv)
    print(json.dumps(args.func(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
