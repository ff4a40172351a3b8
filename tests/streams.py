"""Byte streams for end-to-end tests: the reference guest and a far end, each on a thread.

Streams are sequence-numbered so a receiver can tell loss, duplication and reordering apart:
``sequence_stream(n)`` is records of 8 bytes, ``b"<" + seq (u32 big-endian) + tag + b">"``.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import termios
import threading
import time
import tty
from pathlib import Path

from uartbridge.client import BusClient
from uartbridge.errors import BusError
from uartbridge.guest import Guest8250

RECORD = struct.Struct(">cIcc")


def sequence_stream(records: int, tag: bytes) -> bytes:
    """``records`` 8-byte records numbered 0..records-1, each marked with one ``tag`` byte."""
    return b"".join(RECORD.pack(b"<", i, tag, b">") for i in range(records))


def sequence_numbers(data: bytes) -> list[int]:
    """The record numbers in a received stream (it must consist of whole, aligned records)."""
    assert len(data) % RECORD.size == 0, f"{len(data)} bytes is not whole records"
    numbers = []
    for offset in range(0, len(data), RECORD.size):
        start, seq, _tag, end = RECORD.unpack_from(data, offset)
        assert (start, end) == (b"<", b">"), (
            f"torn record at byte {offset}: {data[offset : offset + 8]!r}"
        )
        numbers.append(seq)
    return numbers


def guest_receive(guest: Guest8250, count: int, timeout_s: float = 10.0) -> bytes:
    """What ``guest`` receives, serving its interrupts, until ``count`` bytes or
    ``timeout_s`` (the caller asserts on the bytes, never on the time)."""
    received = b""
    deadline = time.monotonic() + timeout_s
    while len(received) < count and time.monotonic() < deadline:
        guest.service(0.05)
        received += guest.read()
    return received


class GuestRunner:
    """The reference 8250 guest on its own thread: sends ``tx_data``, keeps what it receives.

    ``pause()`` stops it at a bus-operation boundary (after a SYNC, so every posted write has
    been executed) and closes its connection — what an emulator does when it pauses the VM
    for a snapshot. ``resume()`` reconnects without re-initialising the UART: the device
    state is the daemon's to keep.
    """

    def __init__(self, bus_path: Path, tx_data: bytes, *, chunk: int = 512) -> None:
        self.bus_path = bus_path
        self.tx_data = tx_data
        self.chunk = chunk
        self.offset = 0
        self.received = bytearray()
        self.error: BaseException | None = None
        self.max_tsr_seen = 0
        self._stop = threading.Event()
        self._pause = threading.Event()
        self._paused = threading.Event()
        self._resume = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.client: BusClient | None = None
        self.guest: Guest8250 | None = None

    def start(self) -> None:
        """Connect, probe and start up the UART like Linux, then run."""
        self.client = BusClient(self.bus_path)
        self.guest = Guest8250(self.client)
        kind = self.guest.probe()
        assert kind == ("16550A", 16), kind
        self.guest.startup(115200)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._pause.is_set():
                    self._do_pause()
                    continue
                self._step()
        except BaseException as exc:  # reported by check()
            self.error = exc

    def _step(self) -> None:
        guest = self.guest
        assert guest is not None
        if guest.tx_queued < 2048 and self.offset < len(self.tx_data):
            guest.write(self.tx_data[self.offset : self.offset + self.chunk])
            self.offset += self.chunk
        guest.service(0.01)
        self.received += guest.read()

    def _do_pause(self) -> None:
        assert self.client is not None
        self._pause.clear()  # honoured; a pause() after the coming resume() is a new request
        with contextlib.suppress(BusError):
            self.client.sync()
        self.client.close()
        self._paused.set()
        self._resume.wait()
        self._resume.clear()
        if self._stop.is_set():
            return
        self.client = BusClient(self.bus_path)
        assert self.guest is not None
        self.guest.client = self.client

    def pause(self, timeout_s: float = 10.0) -> None:
        """Stop at an operation boundary and disconnect from the bus."""
        self._pause.set()
        if not self._paused.wait(timeout_s):
            self.check()
            raise AssertionError("guest did not pause")

    def resume(self, bus_path: Path | None = None) -> None:
        """Reconnect (to ``bus_path`` if it moved) and go on."""
        if bus_path is not None:
            self.bus_path = bus_path
        # Cleared here, not by the thread: a pause() right after resume() must wait for the
        # thread to pause again, not return on the flag of the previous pause.
        self._paused.clear()
        self._resume.set()

    def stop(self) -> None:
        """Stop the thread and close the connection."""
        self._stop.set()
        self._resume.set()
        if self._thread.is_alive():
            self._thread.join(10)
        if self.client is not None:
            self.client.close()

    def check(self) -> None:
        """Raise whatever the thread died of."""
        if self.error is not None:
            raise AssertionError(f"guest thread failed: {self.error!r}") from self.error


class FarEnd:
    """The far end of the wire on its own thread: writes ``tx_data``, keeps what it reads.

    ``stall()`` stops reading (the stalled reader); ``drain()`` reads again.
    """

    def __init__(
        self, path: Path, tx_data: bytes, *, rate_bytes_per_s: float | None = None
    ) -> None:
        self.path = path
        self.tx_data = tx_data
        self.rate_bytes_per_s = rate_bytes_per_s
        self.offset = 0
        self.received = bytearray()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.reading = threading.Event()
        self.reading.set()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        """Open the path and start the thread."""
        self.fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        # TCSANOW: tty.setraw's default TCSAFLUSH would discard what the daemon already sent.
        tty.setraw(self.fd, termios.TCSANOW)
        self._thread.start()

    def stall(self) -> None:
        """Stop reading (the peer is there but does not read)."""
        self.reading.clear()

    def drain(self) -> None:
        """Read again."""
        self.reading.set()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            while not self._stop.is_set():
                want_write = self.offset < len(self.tx_data)
                if want_write and self.rate_bytes_per_s is not None:
                    allowed = int((time.monotonic() - started) * self.rate_bytes_per_s)
                    want_write = self.offset < allowed
                readers = [self.fd] if self.reading.is_set() else []
                writers = [self.fd] if want_write else []
                r, w, _ = select.select(readers, writers, [], 0.01)
                if r:
                    with contextlib.suppress(BlockingIOError):
                        self.received += os.read(self.fd, 65536)
                if w:
                    end = min(len(self.tx_data), self.offset + 4096)
                    if self.rate_bytes_per_s is not None:
                        end = min(end, max(self.offset + 1, allowed))
                    with contextlib.suppress(BlockingIOError):
                        self.offset += os.write(self.fd, self.tx_data[self.offset : end])
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        """Stop the thread and close the fd."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        with contextlib.suppress(OSError, AttributeError):
            os.close(self.fd)

    def check(self) -> None:
        """Raise whatever the thread died of."""
        if self.error is not None:
            raise AssertionError(f"far-end thread failed: {self.error!r}") from self.error


def wait_streams(guest: GuestRunner, far: FarEnd, timeout_s: float = 60.0) -> None:
    """Wait until each side received everything the other sent (or time out, then compare)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        guest.check()
        far.check()
        if len(guest.received) >= len(far.tx_data) and len(far.received) >= len(guest.tx_data):
            return
        time.sleep(0.02)


def assert_exact(received: bytes, sent: bytes, what: str) -> None:
    """``received`` is ``sent``: nothing lost, nothing duplicated, order kept."""
    if received == sent:
        return
    got = sequence_numbers(bytes(received[: len(received) - len(received) % RECORD.size]))
    expected = list(range(len(sent) // RECORD.size))
    missing = sorted(set(expected) - set(got))
    duplicated = len(got) - len(set(got))
    raise AssertionError(
        f"{what}: got {len(received)} of {len(sent)} bytes; "
        f"{len(missing)} records missing (first {missing[:5]}), {duplicated} duplicated, "
        f"in order: {got == sorted(got)}"
    )
