"""Clients of the register bus: ``BusClient`` (blocking) and ``AsyncBusClient`` (asyncio).

Both connect, say HELLO, and then turn register accesses into frames. Writes are posted
(no reply); reads, bursts of reads and SYNC wait for their reply. IRQ frames may arrive at any
time; the server sends each one before any reply that observes the new level, so ``irq`` is
exact as of the last reply read. ``wait_irq`` blocks until the line is high.

A target is a Unix socket path (``str`` or ``os.PathLike``), ``"tcp:HOST:PORT"``, or a
``(host, port)`` tuple. Every failure is a ``BusError``; an ERROR frame from the server is a
``BusRefusedError`` (a ``BusError``) carrying the server's ``code`` and ``message``.

Both speak protocol version 1 unless told otherwise (what every server understands). Guest
time (v2): pass ``guest_time_ns`` (the guest's time now) to ask for ``GUEST_TIME``; if the
UART's clock is the guest's the server grants it (``drives_time``), and then ``set_time``
moves the device's clock (posted, like a write), ``deadline_ns`` is the device's next
deadline in the guest's time as last reported (exact as of the last reply read, like
``irq``), and ``advance_to`` is ``set_time`` plus a round trip that makes ``deadline_ns``
current. A UART on host time does not grant it: the client then runs on host time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import select
import socket
import time
from collections import deque
from types import TracebackType
from typing import Self

from .bus.codec import (
    HEADER_SIZE,
    MAX_BURST,
    MAX_FRAME_LEN,
    SUPPORTED_VERSIONS,
    BusRefusedError,
    Capability,
    Deadline,
    ErrorFrame,
    Frame,
    FrameDecoder,
    FrameError,
    Hello,
    HelloReply,
    IrqEvent,
    Read,
    ReadN,
    ReadNReply,
    ReadReply,
    Sync,
    SyncReply,
    Time,
    Write,
    WriteN,
    decode_frame,
    encode,
)
from .errors import BusError

Target = str | os.PathLike[str] | tuple[str, int]

_RECV_SIZE = 65536


def parse_target(target: Target) -> tuple[str, int] | str:
    """A ``(host, port)`` for TCP targets, else the Unix socket path as a string."""
    if isinstance(target, tuple):
        host, port = target
        return str(host), int(port)
    text = os.fspath(target)
    if text.startswith("tcp:"):
        host, sep, port_text = text[4:].rpartition(":")
        if not sep or not port_text.isdigit():
            raise BusError(f"bad TCP bus target {text!r}: expected tcp:HOST:PORT")
        return host.strip("[]") or "127.0.0.1", int(port_text)
    return text


def _describe(target: tuple[str, int] | str) -> str:
    return f"tcp:{target[0]}:{target[1]}" if isinstance(target, tuple) else target


def _poll_ms(timeout_s: float | None) -> int:
    """A poll() timeout in ms, rounded up (so a wait is never shorter than asked); -1: forever."""
    if timeout_s is None:
        return -1
    return max(0, math.ceil(timeout_s * 1000))


def _chunks(data: bytes) -> list[bytes]:
    return [data[i : i + MAX_BURST] for i in range(0, len(data), MAX_BURST)]


def _hello(version: int | None, token: bytes | None, guest_time_ns: int | None) -> Hello:
    """The HELLO to send: v1 unless asked for v2 (or guest time, which needs v2)."""
    if version is None:
        version = 1 if guest_time_ns is None else 2
    if version not in SUPPORTED_VERSIONS:
        raise BusError(f"protocol version must be one of {SUPPORTED_VERSIONS}, not {version}")
    if guest_time_ns is None:
        return Hello(version, token)
    if version < 2:
        raise BusError("guest time needs protocol version 2")
    if type(guest_time_ns) is not int or guest_time_ns < 0:
        raise BusError(f"guest_time_ns must be an integer >= 0, not {guest_time_ns!r}")
    return Hello(version, token, int(Capability.GUEST_TIME), guest_time_ns)


class BusClient:
    """A blocking bus client; one request in flight at a time. Not thread-safe."""

    def __init__(
        self,
        target: Target,
        *,
        timeout_s: float | None = 10.0,
        spin_us: float = 100.0,
        token: bytes | None = None,
        version: int | None = None,
        guest_time_ns: int | None = None,
    ) -> None:
        """Connect to ``target`` and exchange HELLO; ``timeout_s`` bounds every wait for a reply.

        ``token`` (1..255 bytes) goes in HELLO for a TCP server that admits peers it cannot
        identify by their uid only with the operator's token (docs/bus-protocol.md §1.1).
        ``version``: the protocol version to speak (default 1, or 2 with ``guest_time_ns``);
        ``guest_time_ns``: the guest's time now, to drive the device's clock (module docstring).

        While waiting for a reply the client first busy-polls the socket for up to ``spin_us``
        (0: never), as QEMU's ``poll-max-ns`` does: a reply usually comes within tens of µs,
        and sleeping in ``poll()`` instead lets the CPU idle, whose wake-up (on a VM an
        inter-processor interrupt) can double the round trip. See bench/README.md.
        """
        if spin_us < 0:
            raise ValueError(f"spin_us must be >= 0, not {spin_us}")
        self._target = parse_target(target)
        self._timeout_s = timeout_s
        self._spin_ns = int(spin_us * 1000)
        self._decoder = FrameDecoder()
        hello = _hello(version, token, guest_time_ns)
        self._irq = False
        self._deadline_ns: int | None = None
        self._guest_time_ns = guest_time_ns
        self._closed = False
        self._tokens = itertools.count(1)
        self._sock = self._connect()
        # Non-blocking from here on, waiting with poll() only when the kernel says EAGAIN:
        # a socket with a timeout costs a poll() before every send and recv.
        self._sock.setblocking(False)
        self._rpoll = select.poll()
        self._rpoll.register(self._sock, select.POLLIN)
        self._wpoll = select.poll()
        self._wpoll.register(self._sock, select.POLLOUT)
        try:
            self._sock.sendall(encode(hello))
            reply = self._expect(HelloReply)
        except BaseException:
            self._sock.close()
            self._closed = True
            raise
        assert isinstance(reply, HelloReply)
        self.server_version = reply.version
        self.capabilities = reply.capabilities
        self.name = reply.name
        self._irq = reply.irq
        self.drives_time = bool(reply.capabilities & Capability.GUEST_TIME)
        if self.drives_time:
            self.sync()  # the DEADLINE frame that follows HELLO_REPLY is in

    def _connect(self) -> socket.socket:
        target = self._target
        try:
            if isinstance(target, tuple):
                sock = socket.create_connection(target, timeout=self._timeout_s)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self._timeout_s)
                try:
                    sock.connect(target)
                except BaseException:
                    sock.close()
                    raise
        except FileNotFoundError as exc:
            raise BusError(f"no bus socket at {target} (is the daemon running?)") from exc
        except OSError as exc:
            raise BusError(f"cannot connect to {_describe(target)}: {exc.strerror or exc}") from exc
        return sock

    # -- frames --

    def _send(self, data: bytes) -> None:
        if self._closed:
            raise BusError("bus connection is closed")
        try:
            self._send_all(data)
        except OSError as exc:
            # The server may have said why before closing: surface its ERROR frame if so.
            self._drain_after_failure()
            self._closed = True
            raise BusError(f"bus connection lost while sending: {exc.strerror or exc}") from exc

    def _send_all(self, data: bytes) -> None:
        sock = self._sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        timeout_s = self._timeout_s
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while view:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError("timed out")
            if not self._wpoll.poll(_poll_ms(remaining)):
                continue
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                continue

    def _drain_after_failure(self) -> None:
        with contextlib.suppress(OSError, BusError):
            self._sock.settimeout(0.0)
            data = self._sock.recv(_RECV_SIZE)
            if data:
                self._decoder.feed(data)
                while (frame := self._decoder.next_frame()) is not None:
                    self._dispatch(frame)

    def _dispatch(self, frame: Frame) -> Frame | None:
        """Handle IRQ and ERROR frames; return anything else (a reply)."""
        if isinstance(frame, IrqEvent):
            self._irq = frame.level
            return None
        if isinstance(frame, Deadline):
            self._deadline_ns = frame.deadline_ns
            return None
        if isinstance(frame, ErrorFrame):
            self.close()
            raise BusRefusedError(frame.code, frame.message)
        return frame

    def _fill(self, timeout_s: float | None) -> bool:
        """Receive once (waiting up to ``timeout_s``; None: forever). False on timeout."""
        try:
            if timeout_s != 0 and not self._rpoll.poll(_poll_ms(timeout_s)):
                return False
            data = self._sock.recv(_RECV_SIZE)
        except (TimeoutError, BlockingIOError):
            return False
        except OSError as exc:
            self.close()
            raise BusError(f"bus connection lost: {exc.strerror or exc}") from exc
        if not data:
            self.close()
            raise BusError("bus connection closed by the server")
        self._decoder.feed(data)
        return True

    def _spin(self) -> bool:
        """Busy-poll for data up to ``spin_us``; True if some came in."""
        recv = self._sock.recv
        clock = time.perf_counter_ns
        deadline = clock() + self._spin_ns
        while clock() < deadline:
            try:
                data = recv(_RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                return False  # _fill reports it
            if not data:
                return False
            self._decoder.feed(data)
            return True
        return False

    def _next_frame(self) -> Frame | None:
        try:
            return self._decoder.next_frame()
        except FrameError as exc:
            self.close()
            raise BusError(f"bad frame from the server: {exc}") from exc

    def _expect(self, kind: type[Frame]) -> Frame:
        deadline = None if self._timeout_s is None else time.monotonic() + self._timeout_s
        while True:
            while (frame := self._next_frame()) is not None:
                reply = self._dispatch(frame)
                if reply is None:
                    continue
                if not isinstance(reply, kind):
                    self.close()
                    raise BusError(
                        f"expected {kind.__name__} from the server, got {type(reply).__name__}"
                    )
                return reply
            if self._closed:
                raise BusError("bus connection is closed")
            if self._spin_ns and self._spin():
                continue
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._fill(remaining) and deadline is not None and time.monotonic() >= deadline:
                self.close()
                raise BusError(f"no {kind.__name__} from the server within {self._timeout_s} s")

    # -- registers --

    def read(self, offset: int) -> int:
        """Read the register at ``offset`` (0–7)."""
        self._send(encode(Read(offset)))
        reply = self._expect(ReadReply)
        assert isinstance(reply, ReadReply)
        return reply.value

    def read_regs(self, *offsets: int) -> list[int]:
        """Read several registers in order, in one round trip (the READs are pipelined).

        Exactly ``read(a); read(b); …`` as the device sees it; only the waiting is shared.
        """
        self._send(b"".join(encode(Read(offset)) for offset in offsets))
        values = []
        for _ in offsets:
            reply = self._expect(ReadReply)
            assert isinstance(reply, ReadReply)
            values.append(reply.value)
        return values

    def write(self, offset: int, value: int) -> None:
        """Write ``value`` to the register at ``offset`` (posted: returns without a reply)."""
        self._send(encode(Write(offset, value)))

    def write_many(self, offset: int, data: bytes, *, confirm: bool = False) -> None:
        """``len(data)`` writes to ``offset`` in order, in as few frames as fit (posted).

        ``confirm``: a SYNC goes in the same send and this returns once it is answered, so
        the writes were executed; a ``BusError`` instead (the daemon stopped) means they were
        not — the server executes whole what it finds in its socket at a stop, and a send
        the socket buffer takes at once (a 16-byte FIFO's worth does) reaches it whole
        (``docs/bus-protocol.md`` §1): resend them after reconnecting.
        """
        frames = b"".join(encode(WriteN(offset, chunk)) for chunk in _chunks(bytes(data)))
        if confirm:
            self._sync_after(frames)
        elif frames:
            self._send(frames)

    def read_many(self, offset: int, n: int) -> bytes:
        """Up to ``n`` reads of ``offset``; from RBR it stops when LSR.DR=0 or an error is due."""
        out = bytearray()
        while n > 0:
            count = min(n, MAX_BURST)
            self._send(encode(ReadN(offset, count)))
            reply = self._expect(ReadNReply)
            assert isinstance(reply, ReadNReply)
            out += reply.data
            n -= count
            if len(reply.data) < count:
                break
        return bytes(out)

    def sync(self) -> None:
        """A barrier: returns when the server has executed everything sent before."""
        self._sync_after(b"")

    def _sync_after(self, frames: bytes) -> None:
        """Send ``frames`` and a SYNC in one send; return when the SYNC is answered."""
        token = next(self._tokens) & 0xFFFFFFFF
        self._send(frames + encode(Sync(token)))
        reply = self._expect(SyncReply)
        assert isinstance(reply, SyncReply)
        if reply.token != token:
            self.close()
            raise BusError(f"SYNC token mismatch: sent {token}, got {reply.token}")

    # -- guest time (v2) --

    def set_time(self, now_ns: int) -> None:
        """The guest's time is now ``now_ns`` (posted: returns without a reply). The device's
        timers due by then run, each at its own time; DEADLINE frames follow."""
        if not self.drives_time:
            raise BusError("this connection does not drive the device's clock (no GUEST_TIME)")
        self._send(encode(Time(now_ns)))
        self._guest_time_ns = now_ns

    def advance_to(self, now_ns: int) -> int | None:
        """``set_time(now_ns)`` and a round trip: returns the device's next deadline (guest
        time), or None."""
        self.set_time(now_ns)
        self.sync()
        return self._deadline_ns

    @property
    def deadline_ns(self) -> int | None:
        """The device's next deadline in the guest's time, as of the last frame read (None:
        no timer armed, or this connection does not drive time)."""
        return self._deadline_ns

    @property
    def guest_time_ns(self) -> int | None:
        """The guest's time as last told to the server (None: not driving time)."""
        return self._guest_time_ns if self.drives_time else None

    # -- interrupts --

    @property
    def irq(self) -> bool:
        """The IRQ level as of the last frame read from the server."""
        return self._irq

    def poll_events(self) -> bool:
        """Take in whatever the server has sent, without blocking; returns the IRQ level."""
        while True:
            while (frame := self._next_frame()) is not None:
                reply = self._dispatch(frame)
                if reply is not None:
                    self.close()
                    raise BusError(f"unexpected {type(reply).__name__} from the server")
            if self._closed or not self._fill(0.0):
                return self._irq

    def wait_irq(self, timeout: float | None) -> bool:
        """Block until the IRQ line is high or ``timeout`` seconds pass; returns the level."""
        if self.poll_events():
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._irq:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            readable, _, _ = select.select([self._sock], [], [], remaining)
            if not readable:
                break
            self._fill(0.0)
            self.poll_events()
        return self._irq

    def fileno(self) -> int:
        """The socket's descriptor, for ``select`` (frames may already be buffered: see ``irq``)."""
        return self._sock.fileno()

    @property
    def closed(self) -> bool:
        """The connection is closed."""
        return self._closed

    def close(self) -> None:
        """Close the connection (the device stays as it is)."""
        if not self._closed:
            self._closed = True
            self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncBusClient:
    """An asyncio bus client. Requests may be issued from several tasks; replies match in order.

    Create it with ``await AsyncBusClient.connect(target)``.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Wrap a connected stream pair; use ``connect`` instead."""
        self._reader = reader
        self._writer = writer
        self._pending: deque[tuple[type[Frame], asyncio.Future[Frame]]] = deque()
        self._irq = False
        self._deadline_ns: int | None = None
        self._guest_time_ns: int | None = None
        self.drives_time = False
        self._irq_high = asyncio.Event()
        self._irq_changed = asyncio.Event()
        self._error: BusError | None = None
        self._tokens = itertools.count(1)
        self._reader_task: asyncio.Task[None] | None = None
        self.server_version = 0
        self.capabilities = 0
        self.name = ""

    @classmethod
    async def connect(
        cls,
        target: Target,
        *,
        timeout_s: float | None = 10.0,
        token: bytes | None = None,
        version: int | None = None,
        guest_time_ns: int | None = None,
    ) -> AsyncBusClient:
        """Connect to ``target`` and exchange HELLO (``token``, ``version`` and
        ``guest_time_ns`` as for ``BusClient``)."""
        hello = _hello(version, token, guest_time_ns)
        parsed = parse_target(target)
        try:
            if isinstance(parsed, tuple):
                opening = asyncio.open_connection(parsed[0], parsed[1])
            else:
                opening = asyncio.open_unix_connection(parsed)
            reader, writer = await asyncio.wait_for(opening, timeout_s)
        except FileNotFoundError as exc:
            raise BusError(f"no bus socket at {parsed} (is the daemon running?)") from exc
        except (OSError, TimeoutError) as exc:
            raise BusError(f"cannot connect to {_describe(parsed)}: {exc}") from exc
        if isinstance(parsed, tuple):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = cls(reader, writer)
        client._reader_task = asyncio.create_task(client._read_loop())
        try:
            reply = await asyncio.wait_for(client._request(encode(hello), HelloReply), timeout_s)
        except BaseException:
            await client.close()
            raise
        assert isinstance(reply, HelloReply)
        client.server_version = reply.version
        client.capabilities = reply.capabilities
        client.name = reply.name
        # IRQ frames cannot precede HELLO_REPLY, so the level it reports is the current one.
        client._set_irq(reply.irq)
        client.drives_time = bool(reply.capabilities & Capability.GUEST_TIME)
        if client.drives_time:
            client._guest_time_ns = guest_time_ns
            await client.sync()  # the DEADLINE frame that follows HELLO_REPLY is in
        return client

    def _set_irq(self, level: bool) -> None:
        self._irq = level
        if level:
            self._irq_high.set()
        else:
            self._irq_high.clear()

    async def _read_loop(self) -> None:
        reader = self._reader
        try:
            while True:
                header = await reader.readexactly(HEADER_SIZE)
                length = int.from_bytes(header, "big")
                if not 1 <= length <= MAX_FRAME_LEN:
                    raise BusError(f"bad frame length {length} from the server")
                body = await reader.readexactly(length)
                try:
                    frame = decode_frame(body[0], body[1:])
                except FrameError as exc:
                    raise BusError(f"bad frame from the server: {exc}") from exc
                if isinstance(frame, IrqEvent):
                    self._set_irq(frame.level)
                    continue
                if isinstance(frame, Deadline):
                    self._deadline_ns = frame.deadline_ns
                    continue
                if isinstance(frame, ErrorFrame):
                    raise BusRefusedError(frame.code, frame.message)
                if not self._pending:
                    raise BusError(f"unexpected {type(frame).__name__} from the server")
                kind, future = self._pending.popleft()
                if not isinstance(frame, kind):
                    raise BusError(
                        f"expected {kind.__name__} from the server, got {type(frame).__name__}"
                    )
                if not future.done():
                    future.set_result(frame)
        except asyncio.IncompleteReadError:
            self._fail(BusError("bus connection closed by the server"))
        except BusError as exc:
            self._fail(exc)
        except OSError as exc:
            self._fail(BusError(f"bus connection lost: {exc}"))
        except asyncio.CancelledError:
            self._fail(BusError("bus connection is closed"))
            raise

    def _fail(self, error: BusError) -> None:
        if self._error is None:
            self._error = error
        while self._pending:
            _, future = self._pending.popleft()
            if not future.done():
                future.set_exception(self._error)
        self._irq_high.set()  # wake waiters; they see the error
        self._writer.close()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    async def _post(self, data: bytes) -> None:
        self._check()
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (OSError, RuntimeError) as exc:
            self._fail(BusError(f"bus connection lost while sending: {exc}"))
            self._check()

    async def _request(self, data: bytes, kind: type[Frame]) -> Frame:
        self._check()
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending.append((kind, future))
        await self._post(data)
        return await future

    async def read(self, offset: int) -> int:
        """Read the register at ``offset``."""
        reply = await self._request(encode(Read(offset)), ReadReply)
        assert isinstance(reply, ReadReply)
        return reply.value

    async def write(self, offset: int, value: int) -> None:
        """Write a register (posted; waits only for the socket buffer)."""
        await self._post(encode(Write(offset, value)))

    async def write_many(self, offset: int, data: bytes) -> None:
        """``len(data)`` writes to ``offset``, in order (posted)."""
        if data:
            await self._post(
                b"".join(encode(WriteN(offset, chunk)) for chunk in _chunks(bytes(data)))
            )

    async def read_many(self, offset: int, n: int) -> bytes:
        """Up to ``n`` reads of ``offset`` (RBR: stops at DR=0 or a pending error)."""
        out = bytearray()
        while n > 0:
            count = min(n, MAX_BURST)
            reply = await self._request(encode(ReadN(offset, count)), ReadNReply)
            assert isinstance(reply, ReadNReply)
            out += reply.data
            n -= count
            if len(reply.data) < count:
                break
        return bytes(out)

    async def sync(self) -> None:
        """A barrier: returns when the server has executed everything sent before."""
        token = next(self._tokens) & 0xFFFFFFFF
        reply = await self._request(encode(Sync(token)), SyncReply)
        assert isinstance(reply, SyncReply)
        if reply.token != token:
            raise BusError(f"SYNC token mismatch: sent {token}, got {reply.token}")

    async def set_time(self, now_ns: int) -> None:
        """The guest's time is now ``now_ns`` (posted), as ``BusClient.set_time``."""
        if not self.drives_time:
            raise BusError("this connection does not drive the device's clock (no GUEST_TIME)")
        await self._post(encode(Time(now_ns)))
        self._guest_time_ns = now_ns

    async def advance_to(self, now_ns: int) -> int | None:
        """``set_time`` and a round trip: the device's next deadline (guest time), or None."""
        await self.set_time(now_ns)
        await self.sync()
        return self._deadline_ns

    @property
    def deadline_ns(self) -> int | None:
        """The device's next deadline in the guest's time, as of the last frame received."""
        return self._deadline_ns

    @property
    def guest_time_ns(self) -> int | None:
        """The guest's time as last told to the server (None: not driving time)."""
        return self._guest_time_ns if self.drives_time else None

    @property
    def irq(self) -> bool:
        """The IRQ level as of the last frame received."""
        return self._irq

    async def wait_irq(self, timeout: float | None) -> bool:
        """Wait until the IRQ line is high or ``timeout`` seconds pass; returns the level."""
        self._check()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._irq_high.wait(), timeout)
        self._check()
        return self._irq

    async def close(self) -> None:
        """Close the connection (the device stays as it is)."""
        if self._reader_task is not None and not self._reader_task.done():
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
        if self._error is None:
            self._error = BusError("bus connection is closed")
        self._writer.close()
        with contextlib.suppress(OSError, RuntimeError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


__all__ = ["AsyncBusClient", "BusClient", "Target", "parse_target"]
