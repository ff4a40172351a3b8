"""The byte path to an ``rfc2217://`` port (pyserial's client), which has no pollable fd.

pyserial's RFC 2217 ``Serial`` runs its own socket reader thread and blocks in ``write``
(``sendall``). This adapter gives the port link the same non-blocking shape as a fd:

- ``write(data)`` hands at most ``CHUNK`` bytes to one worker thread and raises
  ``WriteInFlight``; when the worker's ``write`` returned, ``on_writable`` fires and the next
  ``write`` (whose data starts with the same bytes, since nothing left the model meanwhile)
  returns that count. So bytes leave the model only when the handler's write returned.
- received bytes land in pyserial's queue, replaced here by a bounded one (``QUEUE_BYTES``)
  that wakes the loop: when it is full pyserial's reader stops reading the socket and TCP
  holds the far end back. What it holds is drained into ``rx_backlog`` at a checkpoint
  (``drain``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

import serial
import serial.rfc2217

from ..uart import LineSettings

CHUNK = 4096
QUEUE_BYTES = 4096  # pyserial queues one byte per item


class PortGone(Exception):
    """The connection is gone (EOF, EIO, socket error): the reader is disconnected."""


class WriteInFlight(Exception):
    """The bytes were handed to a writer thread; the count comes when its write returned."""


class _WakingQueue(queue.Queue[Any]):
    """pyserial's read queue, bounded (DESIGN rule 3), waking the loop on every put.

    When it is full, pyserial's socket reader waits here, stops reading the socket, and TCP
    back-pressures the far end as a full tty input queue would. It gives up only once the
    port is closing (pyserial's ``close`` joins that thread).
    """

    def __init__(self, wake: Callable[[], None], alive: Callable[[], bool]) -> None:
        super().__init__(maxsize=QUEUE_BYTES)
        self._wake = wake
        self._alive = alive

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        while True:
            try:
                super().put(item, True, 0.05)
                break
            except queue.Full:
                if not self._alive():
                    return
        self._wake()


class _WakingSerial(serial.rfc2217.Serial):  # type: ignore[misc]
    """pyserial's RFC 2217 client whose read queue wakes the event loop."""

    wake: Callable[[], None] = staticmethod(lambda: None)

    @property
    def _read_buffer(self) -> Any:
        return self.__dict__.get("_rb")

    @_read_buffer.setter
    def _read_buffer(self, value: Any) -> None:
        self.__dict__["_rb"] = (
            None if value is None else _WakingQueue(lambda: self.wake(), lambda: self.is_open)
        )


class Rfc2217Io:
    """One open RFC 2217 connection, driven from the event loop."""

    is_tty: bool = False
    fd: int | None = None

    def __init__(self, loop: asyncio.AbstractEventLoop, ser: Any,
                 executor: concurrent.futures.ThreadPoolExecutor) -> None:
        """Wrap an open ``_WakingSerial`` (use ``Rfc2217Io.open``)."""
        self._loop = loop
        self._ser = ser
        self._executor = executor
        self._on_readable: Callable[[], None] | None = None
        self._on_writable: Callable[[], None] | None = None
        self._wake_scheduled = threading.Event()
        self._inflight: asyncio.Future[int] | None = None
        self._result: int | None = None
        self._gone = False
        ser.wake = self._wake_from_thread
        self._wake_from_thread()

    @classmethod
    async def open(cls, loop: asyncio.AbstractEventLoop, url: str) -> Rfc2217Io:
        """Connect (blocking negotiation on a worker thread); raises ``serial.SerialException``."""
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rfc2217")

        def connect() -> Any:
            ser = _WakingSerial(None, timeout=0)
            ser.port = url
            ser.open()
            return ser

        try:
            ser = await loop.run_in_executor(executor, connect)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(loop, ser, executor)

    def _wake_from_thread(self) -> None:
        if not self._wake_scheduled.is_set():
            self._wake_scheduled.set()
            with contextlib.suppress(RuntimeError):  # the loop is closed
                self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._wake_scheduled.clear()
        if self._on_readable is not None:
            self._on_readable()

    def want_read(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` when bytes are queued (None: stop)."""
        self._on_readable = callback
        if callback is not None and self._queued():
            self._wake_from_thread()

    def want_write(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` when the write in flight returned (None: stop)."""
        self._on_writable = callback

    def _queued(self) -> int:
        rb = self._ser._read_buffer
        return 0 if rb is None else int(rb.qsize())

    def read(self, n: int) -> bytes:
        """Up to ``n`` queued bytes; BlockingIOError if none; PortGone at EOF."""
        rb = self._ser._read_buffer
        out = bytearray()
        while len(out) < n:
            try:
                item = rb.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._gone = True
                break
            out += item
        if out:
            return bytes(out)
        if self._gone:
            raise PortGone("rfc2217 connection closed")
        raise BlockingIOError

    def drain(self, limit: int) -> bytes:
        """What pyserial has queued, up to ``limit`` bytes (for a checkpoint)."""
        if limit <= 0:
            return b""
        try:
            return self.read(limit)
        except (BlockingIOError, PortGone):
            return b""

    def write(self, data: bytes) -> int:
        """See the module docstring: WriteInFlight now, the count on the next call."""
        if self._result is not None:
            n, self._result = self._result, None
            return n
        if self._inflight is not None:
            raise WriteInFlight
        if self._gone:
            raise PortGone("rfc2217 connection closed")
        chunk = bytes(data[:CHUNK])
        fut = self._loop.run_in_executor(self._executor, self._ser.write, chunk)
        self._inflight = fut
        fut.add_done_callback(self._write_done)
        raise WriteInFlight

    def _write_done(self, fut: asyncio.Future[int]) -> None:
        self._inflight = None
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self._gone = True
        else:
            self._result = fut.result()
        if self._on_writable is not None:
            self._on_writable()

    def take_result(self) -> int | None:
        """The count of the write that returned and was not yet collected (None: none)."""
        n, self._result = self._result, None
        return n

    @property
    def write_in_flight(self) -> bool:
        """A worker thread is inside ``write``."""
        return self._inflight is not None

    async def wait_writes(self) -> None:
        """Until the write in flight (if any) returned."""
        fut = self._inflight
        if fut is not None:
            await asyncio.wait([fut])

    def apply_line_settings(self, ls: LineSettings, baud: int) -> list[str]:
        """Send the settings in one round (blocking: run it on the worker); the refused ones.

        pyserial's property setters would renegotiate all four values per attribute; setting
        its fields and reconfiguring once sends each value once. A server that does not
        acknowledge a value makes pyserial raise without naming it, so all four are refused.
        """
        ser = self._ser
        ser._baudrate = baud
        ser._bytesize = ls.data_bits
        ser._parity = ls.parity
        ser._stopbits = 1.5 if ls.stop_bits == 1.5 else int(ls.stop_bits)
        try:
            ser._reconfigure_port()
        except (serial.SerialException, ValueError):
            return [f"baud={baud}", f"data_bits={ls.data_bits}", f"parity={ls.parity}",
                    f"stop_bits={ls.stop_bits}"]
        return []

    def set_break(self, on: bool) -> None:
        """SET-CONTROL break on/off."""
        self._ser.break_condition = on

    def set_modem(self, *, dtr: bool, rts: bool) -> None:
        """SET-CONTROL DTR/RTS when changed (not acknowledged with ``?ign_set_control``)."""
        if self._ser.dtr != dtr:
            self._ser.dtr = dtr
        if self._ser.rts != rts:
            self._ser.rts = rts

    def run_blocking(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run a blocking pyserial call on the worker thread (after any write in flight)."""
        return self._loop.run_in_executor(self._executor, fn)

    def close(self) -> None:
        """Close the connection (the worker finishes in the background)."""
        self._on_readable = self._on_writable = None
        ser = self._ser
        self._executor.submit(ser.close)
        self._executor.shutdown(wait=False)
