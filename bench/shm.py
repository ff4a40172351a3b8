"""Experiment (issue 12, item 4): a shared-memory bus transport against the Unix socket.

Question: would a ring pair in a memfd with eventfd doorbells, negotiated as a bus capability,
beat the Unix stream socket by >= 1.5x on the READ round trip or on guest -> far throughput?

Both sides are the real code. The **daemon side** is a forked process running the real
``Uart16550`` behind the real ``BusServer`` on an event loop of the daemon's kind
(``uartbridge.eventloop``: uvloop when installed), settled by a ``VirtualWire`` that takes
every byte at once (no pty: the transport is what is measured). Its frames are decoded,
executed and answered by ``_Connection`` -- the server's own code, byte for byte -- whether
they come from

- **unix**: the server's Unix socket (``BusServer.start_unix``), or
- **ring**: a ``RingTransport`` (below) that hands ``_Connection`` the bytes of a
  guest -> daemon ring and writes its output into a daemon -> guest ring, woken by an
  eventfd registered with the loop (``add_reader``), as a capability would be wired.

The **guest side** is this process: ``BusClient`` on the socket, ``RingClient`` (same frames,
same ``FrameDecoder``, same per-call ``encode``) on the rings.

The rings (one memfd, two single-producer/single-consumer byte rings, frames exactly as on
the socket): per ring a ``tail`` (written by the producer), a ``head`` (by the consumer) and
two flags, "consumer sleeps" and "producer sleeps (ring full)", each in its own cache line.
A producer rings the consumer's eventfd only if the consumer said it sleeps, so a busy peer
costs no syscall at all; a sleeper sets its flag, fences, re-checks, then sleeps. The fence is
an uncontended ``threading.Lock`` acquire/release (a ``lock``-prefixed instruction on x86,
a full barrier: Dekker's store->load order). Each sleep has a 5 ms safety timeout; a lost
wake-up is counted when it finds data waiting, the peer not between publishing and ringing
(a ``busy`` word, instrumentation only) and no ring (printed as a figure: it must be 0).

Variants (``spin``: a bounded busy-poll before sleeping, as ``BusClient(spin_us=...)``):

- unix, guest spin 0 / 100 us (BusClient's default is 100): the daemon sleeps in epoll.
- ring, guest spin 0 / 100 us; daemon sleeps in epoll on its eventfd.
- ring, guest spin 100 us and **daemon spin 100 us** (after each batch the daemon polls the
  ring before going back to the loop; on a socket the same poll would cost a recv each):
  the ring's best case, and one a daemon serving 256 UARTs could not afford.

Figures per variant: READ(SCR) round trip p50/p99 (us), and posted WRITE_N(THR, --burst
bytes) frames/s and bytes/s (n frames then one SYNC; counted only when the SYNC_REPLY is in,
and checked: the daemon's wire must have received exactly the bytes sent). For reference in
the same run: a bare AF_UNIX ping-pong (``_common.socket_ping_pong_p50_us``) and the real
daemon's READ round trip (``python -m uartbridge run``, ``BusClient`` with its defaults, port
a socat pty to /dev/null: ``bench/bus.py``'s measurement). Medians of --runs runs.

Run: ``python bench/shm.py [--runs 5] [--reads 5000] [--frames 20000] [--burst 16]
[--build both|pure|compiled] [--event-loop auto|asyncio|uvloop]``.
Linux, Python >= 3.10 (os.memfd_create, os.eventfd); standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import mmap
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _builds import add_build_args, check_build, side_by_side
from _common import (
    Daemon,
    Figure,
    add_runs_arg,
    json_line,
    need_program,
    percentile,
    print_table,
    read_round_trips,
    socket_ping_pong_p50_us,
    stop_process,
    temp_dir,
    wait_for,
)

from uartbridge.bus import codec
from uartbridge.bus.codec import (
    Capability,
    Deadline,
    ErrorFrame,
    Frame,
    FrameDecoder,
    Hello,
    HelloReply,
    IrqEvent,
    Read,
    ReadReply,
    Sync,
    SyncReply,
    WriteN,
    encode,
)
from uartbridge.bus.server import BusServer, VirtualWire, _Connection
from uartbridge.client import BusClient
from uartbridge.eventloop import loop_factory
from uartbridge.uart import Uart16550

THR, IER, FCR, LCR, SCR = 0, 1, 2, 3, 7
RING_SIZE = 256 * 1024  # bytes of frames per direction (the socket's buffers hold ~200 KiB)
LINE = 64  # cache line
# Control block of one ring: four u64 words, each in its own cache line.
TAIL, HEAD, CONSUMER_SLEEPS, PRODUCER_SLEEPS = 0, 1, 2, 3
# Instrumentation only (the lost wake-up count): set while a side is between publishing
# (TAIL or HEAD) and deciding whether to ring; x86 keeps stores in order and loads in order,
# so "data seen, then not busy, then no ring" proves a wake-up was lost.
PRODUCER_BUSY, CONSUMER_BUSY = 4, 5
CONTROL_SIZE = 6 * LINE
SAFETY_TIMEOUT_MS = 5
_U64 = struct.Struct("=Q")


# -- the rings ------------------------------------------------------------------------------


class Ring:
    """One single-producer/single-consumer byte ring in a shared mapping.

    ``tail`` and ``head`` only grow (u64, never wrap in practice); the data lives at
    ``index % size``. Each side keeps its own index in a local as well, so it reads the
    shared word of the other side only.
    """

    def __init__(self, mm: mmap.mmap, base: int, size: int) -> None:
        self.mm = mm
        self.base = base
        self.data = base + CONTROL_SIZE
        self.size = size
        self._fence_lock = threading.Lock()

    def get(self, word: int) -> int:
        return int(_U64.unpack_from(self.mm, self.base + word * LINE)[0])

    def set(self, word: int, value: int) -> None:
        _U64.pack_into(self.mm, self.base + word * LINE, value)

    def fence(self) -> None:
        """A full barrier: a store before it is visible before a load after it."""
        lock = self._fence_lock
        lock.acquire()
        lock.release()

    # producer side
    def free(self, tail: int) -> int:
        return self.size - (tail - self.get(HEAD))

    def put(self, tail: int, data: bytes | bytearray | memoryview) -> int:
        """Copy ``data`` (it fits: the caller checked ``free``) at ``tail``; publish; the new
        tail."""
        n = len(data)
        start = tail % self.size
        first = min(n, self.size - start)
        mm, at = self.mm, self.data
        mm[at + start : at + start + first] = data[:first]
        if first < n:
            mm[at : at + n - first] = data[first:]
        tail += n
        self.set(TAIL, tail)  # x86 stores stay in order: the bytes are visible first
        return tail

    # consumer side
    def take(self, head: int, limit: int) -> bytes:
        """Up to ``limit`` bytes from ``head`` (the caller advances HEAD when done)."""
        n = min(self.get(TAIL) - head, limit)
        if n <= 0:
            return b""
        start = head % self.size
        first = min(n, self.size - start)
        mm, at = self.mm, self.data
        if first == n:
            return mm[at + start : at + start + n]
        return mm[at + start : at + start + first] + mm[at : at + n - first]


class Channel:
    """A memfd holding two rings, and one eventfd per side (the side sleeps on its own)."""

    def __init__(self, size: int = RING_SIZE) -> None:
        self.fd = os.memfd_create("uartbridge-bus-ring", os.MFD_CLOEXEC)
        total = 2 * (CONTROL_SIZE + size)
        os.ftruncate(self.fd, total)
        self.mm = mmap.mmap(self.fd, total)
        self.to_daemon = Ring(self.mm, 0, size)
        self.to_guest = Ring(self.mm, CONTROL_SIZE + size, size)
        self.daemon_bell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.guest_bell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def close(self) -> None:
        self.mm.close()
        for fd in (self.fd, self.daemon_bell, self.guest_bell):
            os.close(fd)


def _ring(bell: int) -> None:
    os.eventfd_write(bell, 1)


def _clear(bell: int) -> bool:
    """Reset ``bell``; True if it had been rung."""
    try:
        os.eventfd_read(bell)
    except BlockingIOError:
        return False
    return True


# -- daemon side ----------------------------------------------------------------------------


class _QuietLog:
    """The server's log, minus the info lines; errors still reach stderr."""

    def info(self, *args: Any, **kw: Any) -> None:
        pass

    debug = info

    def warning(self, event: str, **kw: Any) -> None:
        print(f"daemon side: {event} {kw}", file=sys.stderr)

    error = warning

    def exception(self, event: str, **kw: Any) -> None:
        import traceback

        print(f"daemon side: {event} {kw}\n{traceback.format_exc()}", file=sys.stderr)


class RingTransport(asyncio.Transport):
    """The daemon's end of a Channel as an asyncio transport for the server's ``_Connection``.

    Reading: the daemon's eventfd is registered with the loop; on a wake-up (or while
    ``spin_ns`` of busy-polling finds more) the bytes of the guest -> daemon ring are copied
    into the protocol's buffer and ``buffer_updated`` runs the frames, exactly as a socket
    read would. Writing: into the daemon -> guest ring, ringing the guest if it sleeps; what
    does not fit waits here (``pause_writing`` past the high-water mark) until the guest
    frees room and rings us.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, channel: Channel, spin_ns: int,
                 stats: dict[str, int]) -> None:
        super().__init__()
        self._loop = loop
        self._ch = channel
        self._in = channel.to_daemon
        self._out = channel.to_guest
        self._head = 0
        self._tail = 0
        self._backlog = bytearray()
        self._spin_ns = spin_ns
        self._stats = stats
        self._protocol: _Connection | None = None
        self._reading = True
        self._closing = False
        self._high = 64 * 1024
        self._write_paused = False
        self._wake_due = False
        self._in.set(CONSUMER_SLEEPS, 1)
        loop.add_reader(channel.daemon_bell, self._woken)
        self._safety = loop.call_later(SAFETY_TIMEOUT_MS / 1000, self._safety_check)

    def attach(self, protocol: _Connection) -> None:
        self._protocol = protocol
        protocol.connection_made(self)

    def _safety_check(self) -> None:
        """The safety net: data waiting with nobody woken is a lost wake-up (counted)."""
        if self._closing:
            return
        ring = self._in
        # Rung but not yet polled (libuv runs timers before polling) is not lost, nor is a
        # guest preempted between publishing and ringing (busy: check again next time).
        if (self._reading and not self._wake_due and ring.get(TAIL) != self._head
                and not ring.get(PRODUCER_BUSY)):
            if not _clear(self._ch.daemon_bell):
                self._stats["lost_wakeups"] += 1
            self._woken()
        self._safety = self._loop.call_later(SAFETY_TIMEOUT_MS / 1000, self._safety_check)

    def _woken(self) -> None:
        self._wake_due = False
        _clear(self._ch.daemon_bell)
        self._flush_backlog()
        if not self._reading or self._protocol is None:
            return
        ring = self._in
        ring.set(CONSUMER_SLEEPS, 0)
        clock = time.perf_counter_ns
        while self._reading and not self._closing:
            if self._drain_in():
                continue
            if self._spin_ns:  # bounded busy-poll of the ring's tail: no syscall
                deadline = clock() + self._spin_ns
                while clock() < deadline and ring.get(TAIL) == self._head:
                    pass
                if ring.get(TAIL) != self._head:
                    continue
            ring.set(CONSUMER_SLEEPS, 1)
            ring.fence()
            if ring.get(TAIL) == self._head:
                return  # asleep: the guest rings us
            ring.set(CONSUMER_SLEEPS, 0)
        ring.set(CONSUMER_SLEEPS, 1)

    def _drain_in(self) -> bool:
        protocol = self._protocol
        assert protocol is not None
        view = protocol.get_buffer(-1)
        data = self._in.take(self._head, len(view))
        if not data:
            return False
        n = len(data)
        view[:n] = data
        self._head += n
        ring = self._in
        ring.set(CONSUMER_BUSY, 1)
        ring.set(HEAD, self._head)
        ring.fence()
        if ring.get(PRODUCER_SLEEPS):
            _ring(self._ch.guest_bell)  # the guest waits for room
        ring.set(CONSUMER_BUSY, 0)
        protocol.buffer_updated(n)
        return True

    # -- asyncio.Transport --

    def write(self, data: bytes | bytearray | memoryview) -> None:  # type: ignore[override]
        if self._closing:
            return
        self._backlog += data
        self._flush_backlog()

    def _flush_backlog(self) -> None:
        if not self._backlog:
            return
        ring = self._out
        room = ring.free(self._tail)
        if room <= 0:
            ring.set(PRODUCER_SLEEPS, 1)
            ring.fence()
            room = ring.free(self._tail)
            if room <= 0:
                return
        ring.set(PRODUCER_SLEEPS, 0)
        n = min(room, len(self._backlog))
        ring.set(PRODUCER_BUSY, 1)
        self._tail = ring.put(self._tail, memoryview(self._backlog)[:n])
        del self._backlog[:n]
        ring.fence()
        if ring.get(CONSUMER_SLEEPS):
            _ring(self._ch.guest_bell)
        ring.set(PRODUCER_BUSY, 0)
        if self._backlog:
            ring.set(PRODUCER_SLEEPS, 1)
        paused = len(self._backlog) > self._high
        if paused != self._write_paused and self._protocol is not None:
            self._write_paused = paused
            if paused:
                self._protocol.pause_writing()
            else:
                self._protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return len(self._backlog)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 64 * 1024 if high is None else high

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if not self._reading:
            self._reading = True
            self._wake_due = True  # not a lost wake-up: _woken is on its way
            self._loop.call_soon(self._woken)

    def is_reading(self) -> bool:
        return self._reading

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._ch.daemon_bell)
        self._safety.cancel()
        if self._protocol is not None:
            self._loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class SpinSocketTransport(asyncio.Transport):
    """The socket counterpart of the ring's daemon spin: a Unix socket read by the loop, and
    after each batch busy-polled with non-blocking ``recv_into`` (a syscall each) for
    ``spin_ns`` before going back to the loop. Only for the ``unix_..._daemon_spin`` variant;
    the plain unix variants use the server's own listener and the loop's transports."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 spin_ns: int) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        sock.setblocking(False)
        self._spin_ns = spin_ns
        self._protocol: _Connection | None = None
        self._reading = True
        self._closing = False
        self._backlog = bytearray()
        loop.add_reader(sock.fileno(), self._readable)

    def attach(self, protocol: _Connection) -> None:
        self._protocol = protocol
        protocol.connection_made(self)

    def _readable(self) -> None:
        protocol = self._protocol
        if protocol is None:
            return
        clock = time.perf_counter_ns
        recv_into = self._sock.recv_into
        spinning_until = 0
        while self._reading and not self._closing:
            view = protocol.get_buffer(-1)
            try:
                n = recv_into(view)
            except BlockingIOError:
                if not spinning_until:
                    spinning_until = clock() + self._spin_ns
                if clock() < spinning_until:
                    continue
                return
            except OSError:
                n = 0
            if n == 0:
                protocol.eof_received()
                self.close()
                return
            spinning_until = 0
            protocol.buffer_updated(n)

    def write(self, data: bytes | bytearray | memoryview) -> None:  # type: ignore[override]
        if self._closing:
            return
        if not self._backlog:
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.close()
                return
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
            self._loop.add_writer(self._sock.fileno(), self._writable)
        self._backlog += data

    def _writable(self) -> None:
        try:
            sent = self._sock.send(self._backlog)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        del self._backlog[:sent]
        if not self._backlog:
            self._loop.remove_writer(self._sock.fileno())

    def get_write_buffer_size(self) -> int:
        return len(self._backlog)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # replies are small here and the guest reads them

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if not self._reading:
            self._reading = True
            self._loop.call_soon(self._readable)

    def is_reading(self) -> bool:
        return self._reading

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._sock.fileno())
        self._loop.remove_writer(self._sock.fileno())
        self._sock.close()
        if self._protocol is not None:
            self._loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def daemon_side(kind: str, path: str, channel: Channel | None, spin_ns: int, event_loop: str,
                control: socket.socket) -> None:
    """The forked daemon: a real BusServer for one UART; ``control`` says when to stop, and
    gets the figures back (bytes the wire took, lost wake-ups)."""
    stats = {"lost_wakeups": 0, "wire_bytes": 0}

    def sink(data: bytes) -> None:
        stats["wire_bytes"] += len(data)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        uart = Uart16550()
        wire = VirtualWire(uart, sink=sink)
        server = BusServer(uart, name="uart0", settle=wire, log=_QuietLog())
        wire.attach(server)
        transport: RingTransport | SpinSocketTransport | None = None
        listener = None
        if kind == "unix" and not spin_ns:
            await server.start_unix(Path(path))
        elif kind == "unix":
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(1)
            listener.setblocking(False)

            def accept() -> None:
                nonlocal transport
                assert listener is not None
                sock, _ = listener.accept()
                loop.remove_reader(listener.fileno())
                transport = SpinSocketTransport(loop, sock, spin_ns)
                conn = _Connection(server, peer="unix-spin", vetted=True, listener=0)
                server._connections.add(conn)
                transport.attach(conn)

            loop.add_reader(listener.fileno(), accept)
        else:
            assert channel is not None
            transport = RingTransport(loop, channel, spin_ns, stats)
            conn = _Connection(server, peer="shm", vetted=True, listener=0)
            server._connections.add(conn)
            transport.attach(conn)
        stop = loop.create_future()
        loop.add_reader(control.fileno(), lambda: stop.done() or stop.set_result(None))
        control.sendall(b"R")  # ready
        await stop
        loop.remove_reader(control.fileno())
        control.recv(1)
        wire.sent.clear()
        if listener is not None:
            with contextlib.suppress(ValueError):
                loop.remove_reader(listener.fileno())
            listener.close()
        if transport is not None:
            transport.close()
            for _ in range(3):  # connection_lost runs: the server sees no guest to drain
                await asyncio.sleep(0)
        await server.close()

    with asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner:  # type: ignore[arg-type]
        runner.run(main())
    control.sendall(json.dumps(stats).encode())
    control.shutdown(socket.SHUT_WR)


# -- guest side -----------------------------------------------------------------------------


class RingClient:
    """A blocking guest on a Channel: BusClient's frames and decoding, the rings' transport.

    ``spin_us``: busy-poll the daemon -> guest ring that long before sleeping on the eventfd.
    """

    def __init__(self, channel: Channel, *, spin_us: float, timeout_s: float = 10.0) -> None:
        self._ch = channel
        self._out = channel.to_daemon
        self._in = channel.to_guest
        self._tail = 0
        self._head = 0
        self._spin_ns = int(spin_us * 1000)
        self._timeout_s = timeout_s
        self._decoder = FrameDecoder()
        self._poll = select.poll()
        self._poll.register(channel.guest_bell, select.POLLIN)
        self._tokens = 0
        self.irq = False
        self.lost_wakeups = 0
        self.sleeps = 0
        self._in.set(CONSUMER_SLEEPS, 0)
        self._send(encode(Hello(1)))
        reply = self._expect(HelloReply)
        assert isinstance(reply, HelloReply) and reply.capabilities & Capability.BURST
        self.irq = reply.irq

    def _sleep(self, ready: Callable[[], bool], busy: Callable[[], int]) -> None:
        """Sleep on our eventfd until ``ready()`` (the caller has set its sleep flag and
        fenced); a safety timeout that finds it ready, the peer not ``busy()`` publishing,
        and no ring, counts a lost wake-up."""
        deadline = time.monotonic() + self._timeout_s
        while not ready():
            self.sleeps += 1
            if self._poll.poll(SAFETY_TIMEOUT_MS):
                _clear(self._ch.guest_bell)
            elif ready() and not busy() and not _clear(self._ch.guest_bell):
                self.lost_wakeups += 1
            if time.monotonic() > deadline:
                raise RuntimeError("no progress from the daemon side within the timeout")

    def _send(self, data: bytes) -> None:
        ring = self._out
        view = memoryview(data)
        while view:
            room = ring.free(self._tail)
            if room <= 0:
                ring.set(PRODUCER_SLEEPS, 1)
                ring.fence()
                self._sleep(lambda: ring.free(self._tail) > 0,
                            lambda: ring.get(CONSUMER_BUSY))
                ring.set(PRODUCER_SLEEPS, 0)
                continue
            n = min(room, len(view))
            ring.set(PRODUCER_BUSY, 1)
            self._tail = ring.put(self._tail, view[:n])
            view = view[n:]
            ring.fence()
            if ring.get(CONSUMER_SLEEPS):
                _ring(self._ch.daemon_bell)
            ring.set(PRODUCER_BUSY, 0)

    def _fill(self) -> None:
        ring = self._in
        data = ring.take(self._head, 65536)
        if not data:
            if self._spin_ns:
                clock = time.perf_counter_ns
                deadline = clock() + self._spin_ns
                while clock() < deadline and ring.get(TAIL) == self._head:
                    pass
            if ring.get(TAIL) == self._head:
                ring.set(CONSUMER_SLEEPS, 1)
                ring.fence()
                self._sleep(lambda: ring.get(TAIL) != self._head,
                            lambda: ring.get(PRODUCER_BUSY))
                ring.set(CONSUMER_SLEEPS, 0)
            data = ring.take(self._head, 65536)
        self._head += len(data)
        ring.set(CONSUMER_BUSY, 1)
        ring.set(HEAD, self._head)
        ring.fence()
        if ring.get(PRODUCER_SLEEPS):
            _ring(self._ch.daemon_bell)
        ring.set(CONSUMER_BUSY, 0)
        self._decoder.feed(data)

    def _expect(self, kind: type[Frame]) -> Frame:
        while True:
            while (frame := self._decoder.next_frame()) is not None:
                if isinstance(frame, IrqEvent):
                    self.irq = frame.level
                    continue
                if isinstance(frame, Deadline):
                    continue
                if isinstance(frame, ErrorFrame):
                    raise RuntimeError(f"daemon side refused: {frame}")
                if not isinstance(frame, kind):
                    raise RuntimeError(f"expected {kind.__name__}, got {frame}")
                return frame
            self._fill()

    def read(self, offset: int) -> int:
        self._send(encode(Read(offset)))
        reply = self._expect(ReadReply)
        assert isinstance(reply, ReadReply)
        return reply.value

    def write(self, offset: int, value: int) -> None:
        self._send(encode(codec.Write(offset, value)))

    def write_many(self, offset: int, data: bytes) -> None:
        self._send(encode(WriteN(offset, data)))

    def sync(self) -> None:
        self._tokens += 1
        self._send(encode(Sync(self._tokens)))
        reply = self._expect(SyncReply)
        assert isinstance(reply, SyncReply) and reply.token == self._tokens

    def close(self) -> None:
        self._poll.unregister(self._ch.guest_bell)


Guest = BusClient | RingClient


def posted_bursts(client: Guest, frames: int, burst: int) -> float:
    """``frames`` posted WRITE_N(THR, ``burst`` bytes), then SYNC; executed frames/s."""
    payload = bytes(range(burst))
    write_many = client.write_many
    start = time.perf_counter()
    for _ in range(frames):
        write_many(THR, payload)
    client.sync()
    return frames / (time.perf_counter() - start)


# -- one variant ----------------------------------------------------------------------------

VARIANTS = [
    # (key, transport, guest spin us, daemon spin us)
    ("unix_spin0", "unix", 0, 0),
    ("unix_spin100", "unix", 100, 0),
    ("ring_spin0", "ring", 0, 0),
    ("ring_spin100", "ring", 100, 0),
    ("unix_spin100_daemon_spin100", "unix", 100, 100),
    ("ring_spin100_daemon_spin100", "ring", 100, 100),
]


def run_variant(kind: str, guest_spin_us: float, daemon_spin_us: float, root: Path,
                args: argparse.Namespace) -> dict[str, Any]:
    """Fork the daemon side, measure --runs times, stop it; the per-run figures."""
    path = root / f"v{time.perf_counter_ns()}.bus"
    channel = Channel() if kind == "ring" else None
    here, there = socket.socketpair()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the daemon side
        code = 0
        try:
            here.close()
            if args.pin:
                os.sched_setaffinity(0, {1})
            daemon_side(kind, str(path), channel, int(daemon_spin_us * 1000), args.event_loop,
                        there)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 70
        finally:
            os._exit(code)
    there.close()
    out: dict[str, Any] = {"p50": [], "p99": [], "fps": [], "bps": []}
    client: Guest | None = None
    affinity = os.sched_getaffinity(0)
    if args.pin:
        os.sched_setaffinity(0, {0})
    try:
        here.settimeout(30)
        if here.recv(1) != b"R":
            raise RuntimeError("daemon side did not start")
        if kind == "unix":
            client = BusClient(path, spin_us=guest_spin_us)
        else:
            assert channel is not None
            client = RingClient(channel, spin_us=guest_spin_us)
        for offset, value in ((LCR, 0x03), (FCR, 0x07), (IER, 0x00)):
            client.write(offset, value)
        client.sync()
        read_round_trips(client.read, 500)  # warm-up
        posted_bursts(client, 1000, args.burst)
        sent_frames = 1000
        for _ in range(args.runs):
            rtts = read_round_trips(client.read, args.reads)
            out["p50"].append(percentile(rtts, 0.5) / 1000)
            out["p99"].append(percentile(rtts, 0.99) / 1000)
            fps = posted_bursts(client, args.frames, args.burst)
            sent_frames += args.frames
            out["fps"].append(fps)
            out["bps"].append(fps * args.burst)
        if isinstance(client, RingClient):
            out["guest_lost_wakeups"] = client.lost_wakeups
            out["guest_sleeps"] = client.sleeps
            client.close()
        else:
            client.close()
        client = None
        here.sendall(b"S")
        reply = b""
        while chunk := here.recv(4096):
            reply += chunk
        stats = json.loads(reply)
        expected = sent_frames * args.burst
        if stats["wire_bytes"] != expected:
            raise RuntimeError(f"the daemon's wire took {stats['wire_bytes']} bytes, "
                               f"the guest sent {expected}")
        out["daemon_lost_wakeups"] = stats["lost_wakeups"]
    finally:
        os.sched_setaffinity(0, affinity)
        if client is not None:
            client.close()
        here.close()
        _, status = os.waitpid(pid, 0)
        if channel is not None:
            channel.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"daemon side exited {os.waitstatus_to_exitcode(status)}")
    return out


def real_daemon_read_rtt(runs: int, reads: int) -> tuple[list[float], list[float]]:
    """The real daemon (``python -m uartbridge run``, port a socat pty to /dev/null) with
    ``BusClient``'s defaults: READ(SCR) p50 and p99 per run (bench/bus.py's measurement)."""
    socat = need_program("socat")
    p50s: list[float] = []
    p99s: list[float] = []
    with temp_dir("shm-real") as root:
        link = root / "wire"
        daemon = Daemon(root, [{"name": "uart0", "port": str(link)}])
        sink = None
        try:
            sink = subprocess.Popen([socat, "-u", f"pty,raw,echo=0,link={link}", "/dev/null"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for(link.exists, 5.0, "socat's pty link")
            daemon.start()
            with BusClient(daemon.bus()) as client:
                for offset, value in ((LCR, 0x03), (FCR, 0x07), (IER, 0x00)):
                    client.write(offset, value)
                client.sync()
                read_round_trips(client.read, 500)
                for _ in range(runs):
                    rtts = read_round_trips(client.read, reads)
                    p50s.append(percentile(rtts, 0.5) / 1000)
                    p99s.append(percentile(rtts, 0.99) / 1000)
        finally:
            daemon.stop()
            stop_process(sink)
    return p50s, p99s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runs_arg(parser)
    parser.add_argument("--reads", type=int, default=5000, help="READ round trips per run")
    parser.add_argument("--frames", type=int, default=20_000,
                        help="posted WRITE_N frames per run")
    parser.add_argument("--burst", type=int, default=16, help="bytes per WRITE_N (THR)")
    parser.add_argument("--pin", action="store_true",
                        help="guest side on CPU 0, daemon side on CPU 1 (default: the scheduler's)")
    parser.add_argument("--variants", default=",".join(v[0] for v in VARIANTS),
                        help="comma-separated subset of the variants (default all)")
    add_build_args(parser)
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - {v[0] for v in VARIANTS}
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    if not 1 <= args.burst <= codec.MAX_BURST:
        parser.error(f"--burst must be 1..{codec.MAX_BURST}")
    if args.build == "both":
        side_by_side(__file__, ["--reads", str(args.reads), "--frames", str(args.frames),
                                "--burst", str(args.burst), "--variants", args.variants,
                                *(["--pin"] if args.pin else [])], args.runs, args.event_loop)
        return
    build = check_build(args.build, args.event_loop)
    variants = [v for v in VARIANTS if v[0] in args.variants.split(",")]
    load_before = os.getloadavg()
    floor_us = socket_ping_pong_p50_us()
    results: dict[str, dict[str, Any]] = {}
    with temp_dir("shm") as root:
        for key, kind, guest_spin, daemon_spin in variants:
            results[key] = run_variant(kind, guest_spin, daemon_spin, root, args)
    real_p50, real_p99 = real_daemon_read_rtt(args.runs, args.reads)
    load_after = os.getloadavg()

    figures: list[Figure] = []
    for key, _, _, _ in variants:
        r = results[key]
        figures += [
            Figure(f"{key}_read_p50_us", f"{key}: READ p50", "us", r["p50"], None),
            Figure(f"{key}_read_p99_us", f"{key}: READ p99", "us", r["p99"], None),
            Figure(f"{key}_write_n_frames_per_s", f"{key}: WRITE_N({args.burst}) executed",
                   "frames/s", r["fps"], None, ">=", 0),
            Figure(f"{key}_write_n_bytes_per_s", f"{key}: WRITE_N bytes executed", "B/s",
                   r["bps"], None, ">=", 0),
        ]
    # The threshold: the best ring variant against the best socket variant, same run.
    unix = [k for k in results if k.startswith("unix")]
    ring = [k for k in results if k.startswith("ring")]
    if unix and ring:
        def best(keys: list[str], what: str, pick: Callable[..., float]) -> float:
            return pick(statistics.median(results[k][what]) for k in keys)

        figures += [
            Figure("read_speedup_ring_over_unix", "READ p50: best unix / best ring", "x",
                   [best(unix, "p50", min) / best(ring, "p50", min)], 1.5, ">=", 2),
            Figure("write_n_speedup_ring_over_unix", "WRITE_N frames/s: best ring / best unix",
                   "x", [best(ring, "fps", max) / best(unix, "fps", max)], 1.5, ">=", 2),
        ]
    lost_total = sum(results[k].get("guest_lost_wakeups", 0) + results[k]["daemon_lost_wakeups"]
                     for k in results)
    figures += [
        Figure("lost_wakeups_total", "lost wake-ups, all variants (must be 0)", "count",
               [lost_total], 0, "<=", 0),
        Figure("ping_pong_floor_us", "bare AF_UNIX ping-pong p50 (floor)", "us", [floor_us]),
        Figure("real_daemon_read_p50_us", "real daemon READ p50 (BusClient)", "us", real_p50),
        Figure("real_daemon_read_p99_us", "real daemon READ p99 (BusClient)", "us", real_p99),
    ]
    lost = {k: (results[k].get("guest_lost_wakeups", 0), results[k]["daemon_lost_wakeups"])
            for k in results}
    print_table(
        f"shm bench ({build}): {args.runs} runs, {args.reads} READs and {args.frames} "
        f"WRITE_N({args.burst}) + SYNC per run per variant",
        figures,
        [
            "daemon side: the real BusServer/_Connection + Uart16550 + VirtualWire, forked,"
            " on the daemon's event loop; guest: BusClient (unix) or RingClient (ring)",
            "unix_spinN: BusClient(spin_us=N); ring_spinN: the guest polls the ring N us;"
            " daemon_spin100: the daemon polls the ring 100 us after each batch",
            f"lost wake-ups (guest, daemon) per variant: {lost}",
            f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}",
        ],
    )
    print(json_line("shm", figures, build=build, burst=args.burst, lost_wakeups=lost,
                    load_before=load_before, load_after=load_after))


if __name__ == "__main__":
    main()
