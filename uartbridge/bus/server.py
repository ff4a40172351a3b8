"""The bus server: puts one UART on a socket (Unix, and TCP if configured) for one guest.

**Who gets in.** Connections are accepted by our own ``Listener`` (not ``start_server``), so
that a peer is vetted on the bare socket, before any transport, buffer or frame exists: on
the Unix socket by ``SO_PEERCRED``; on TCP by one netlink ``sock_diag`` query for the peer's
socket (``uartbridge.sockdiag``: ESTABLISHED, with an owner). A refused peer gets an ERROR
frame and is closed at once. A TCP peer that cannot be identified as permitted (another host,
a socket already closed, a uid not permitted) is admitted only if a ``tcp_token`` is
configured and its HELLO carries that token; nothing it sent is executed before. Each
listening socket keeps at most ``max_pending`` connections that are not an attached guest
(waiting for the slot, or for HELLO): more are refused BUSY at once, so a connect storm costs
neither file descriptors nor memory, and accept errors are logged at most once per interval.

**Fair share.** The frames a guest sent are executed back to back in ``_run``, in order, each
to completion, but one call executes at most ``op_budget`` register operations (a burst
counts its length) or runs for ``time_budget_s``; then the server stops reading that guest,
settles, flushes, and continues with ``loop.call_later(0, …)`` — after the I/O callbacks of
the loop's next poll and every other ready callback (another UART's guest, port I/O, a
checkpoint). A checkpoint therefore still falls between
two bus operations, never inside one.

**Ordering.** After an operation that touched the model the server calls the daemon's
``settle()``, which lets the wire take bytes and returns the IRQ level changes since the
last call; each change becomes an IRQ frame, written *before* the reply, so a guest that sees
a reply has already seen every IRQ edge the reply observes. Changes that happen outside bus
operations (port input, the receive-timeout timer) reach the guest through ``push_irq``.

**Hostile clients.** Lengths are checked as soon as the header is in, so the decoder holds
at most one read plus one frame; when the transport's write buffer passes the high-water
mark the server stops executing frames and stops reading (the kernel's socket buffers then
hold the client back), and a client that stays that way for ``stall_timeout_s`` is dropped.
Every ERROR frame is followed by the server closing the connection.

**Stop.** ``close`` (the daemon's stop and quiesce, before the final checkpoint) first
executes every complete frame the guest already sent — decoded, buffered, or in the kernel's
receive queue when the stop begins — without turns and bounded (``drain_limit_bytes`` read,
as many register operations), then settles, so the posted writes are in the device and the
checkpoint taken next. A partial frame is dropped; the queue emptied, the close is orderly.

**Time (protocol v2).** On a UART whose clock is the guest's (``guest_clock``), a v2 guest
that asks for ``GUEST_TIME`` in HELLO drives it: each TIME frame advances the clock by what
the guest's time moved and runs the timers due; after every settle the server sends a
DEADLINE frame when the device's next deadline (in the guest's time) changed. Any other
guest (v1, or v2 without the capability) gets host time: the clock follows the host while it
is attached. With no guest attached the clock stands still.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hmac
import os
import socket
import sys
import termios
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import structlog

from ..clock import GuestClock
from ..errors import BusError
from ..listener import Listener, LogLimiter
from ..registers import FIFO_SIZE, RBR, THR
from ..sockdiag import SockDiag, identify_tcp_peer
from ..sockets import PeerCredentials, bind_unix, peer_credentials
from ..uart import Clock, Uart16550
from .codec import (
    MAX_NAME_LEN,
    NO_DEADLINE,
    SERVER_CAPABILITIES,
    SUPPORTED_VERSIONS,
    U32,
    U64,
    Capability,
    ErrorCode,
    ErrorFrame,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    Hello,
    HelloReply,
    Read,
    ReadN,
    Sync,
    Time,
    Write,
    WriteN,
    encode,
    frame_bytes,
)

# -- a virtual wire for tests and standalone use ----------------------------------------------


class VirtualWire:
    """A settle function with an ideal wire: it takes every byte at once and feeds input.

    Calling the object is the ``settle`` the server wants: it drains ``take_events()``, moves
    all of ``tx_pending()`` into ``sent`` (through ``sink`` if given), moves as much of the
    input backlog (``feed``) into the model as it accepts, and returns the IRQ changes. Once
    ``attach``-ed to a server on a running loop it also runs the model's receive-timeout timer
    (``uart.poll()`` at ``uart.next_deadline_ns()``) and pushes the resulting IRQ changes, so
    the character-timeout interrupt works without a daemon. ``clock`` must be the model's.
    """

    def __init__(
        self,
        uart: Uart16550,
        *,
        sink: Callable[[bytes], None] | None = None,
        clock: Clock = time.monotonic_ns,
    ) -> None:
        """A wire for ``uart``; ``sink`` sees each batch of transmitted bytes."""
        self.uart = uart
        self.sent = bytearray()
        self._sink = sink
        self._clock = clock
        self._backlog = bytearray()
        self._server: BusServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: int | None = None

    def __call__(self) -> list[bool]:
        """Settle: let the wire take everything, refill the receiver, return IRQ changes."""
        uart = self.uart
        changes: list[bool] = []
        for _ in range(4 * FIFO_SIZE):  # each pass moves bytes; the receiver bounds the passes
            progressed = False
            pending = uart.tx_pending()
            if pending:
                uart.tx_sent(len(pending))
                self.sent += pending
                if self._sink is not None:
                    self._sink(pending)
                progressed = True
            if self._backlog:
                taken = uart.receive(bytes(self._backlog))
                if taken:
                    del self._backlog[:taken]
                    progressed = True
            changes.extend(uart.take_events().irq_changes)
            if not progressed:
                break
        self._arm_timer()
        return _collapse(changes)

    @property
    def backlog(self) -> int:
        """Input bytes waiting for room in the receiver."""
        return len(self._backlog)

    def feed(self, data: bytes) -> None:
        """Bytes arriving from the wire; delivered as the receiver has room.

        Call it on the server's loop; when attached, IRQ changes are pushed to the guest.
        """
        self._backlog += data
        changes = self()
        if self._server is not None:
            self._server.push_irq(changes)

    def attach(self, server: BusServer) -> None:
        """Run the receive-timeout timer on the running loop and push IRQ changes to ``server``."""
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._arm_timer()

    def detach(self) -> None:
        """Stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_deadline = None
        self._server = None

    def _arm_timer(self) -> None:
        if self._loop is None or self._server is None:
            return
        clock = self._clock
        if isinstance(clock, GuestClock) and not clock.following_host:
            if self._timer is not None:  # guest time: TIME frames run the timers
                self._timer.cancel()
            self._timer = None
            self._timer_deadline = None
            return
        deadline = self.uart.next_deadline_ns()
        if deadline == self._timer_deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_deadline = deadline
        if deadline is not None:
            delay_s = max(0, deadline - self._clock()) / 1e9
            self._timer = self._loop.call_later(delay_s, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_deadline = None
        deadline = self.uart.next_deadline_ns()
        if deadline is not None and self._clock() < deadline:
            self._arm_timer()
            return
        self.uart.poll()
        changes = self()
        if self._server is not None:
            self._server.push_irq(changes)


def _collapse(changes: list[bool]) -> list[bool]:
    """Drop repeats of the same level (a change list alternates by definition)."""
    out: list[bool] = []
    for level in changes:
        if not out or out[-1] != level:
            out.append(level)
    return out


def accept_all_settle(
    uart: Uart16550, *, sink: Callable[[bytes], None] | None = None
) -> VirtualWire:
    """The default settle for tests and standalone use: a ``VirtualWire`` that takes all."""
    return VirtualWire(uart, sink=sink)


# -- the server -----------------------------------------------------------------------------

# What a listening socket is to the server (``BusServer.kept``): a Unix socket whose file it
# made (or a previous run of it), one handed by a socket unit (its file is not ours), TCP.
ROLE_UNIX = "unix"
ROLE_UNIX_HANDED = "unix-handed"
ROLE_TCP = "tcp"


def _cost(frame: Frame) -> int:
    """Register operations a frame performs (what the fair-share budget counts)."""
    if isinstance(frame, WriteN):
        return len(frame.data)
    if isinstance(frame, ReadN):
        return frame.count
    return 1


class _Connection(asyncio.BufferedProtocol):
    """One accepted, vetted connection; at most one per server is the guest.

    ``vetted`` is False for a TCP peer that must still authenticate with HELLO's token: until
    then it only reads (small reads, at most one frame) and never takes the guest slot.
    Reads go into the server's one read buffer (``get_buffer``; the bytes are copied into the
    decoder at once), a small slice of it unless this connection is the guest.
    """

    def __init__(self, server: BusServer, *, peer: str, vetted: bool, listener: int) -> None:
        self._server = server
        self._peer = peer
        self._vetted = vetted
        self.listener = listener
        self._transport: asyncio.Transport | None = None
        self._decoder = FrameDecoder()
        self._hello = False
        self._is_guest = False
        self._irq_sent = False
        self._write_paused = False
        self._closing = False
        self._reading = True
        self._stall_timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self._claim_timer: asyncio.TimerHandle | None = None
        self._hello_timer: asyncio.TimerHandle | None = None
        self._continuation: asyncio.Handle | None = None
        self._claim_deadline = 0.0
        self.frames_executed = 0
        self.slices = 0  # how many _run calls executed frames (fair-share turns)
        # A frame taken from the decoder and not executed yet: the budget ran out before it,
        # or it is the HELLO that authenticated the peer.
        self._pending_frame: Frame | None = None
        # Output of the frames being executed by _run, written with one transport.write
        # (one send: IRQ frames and the reply reach the guest together); None outside _run.
        self._out: bytearray | None = None
        self._unsettled = False  # posted writes not yet followed by a settle
        self._version = 0  # the protocol version HELLO agreed on
        # Guest time (v2, GUEST_TIME granted): the guest's time at its last TIME (or HELLO),
        # and the last DEADLINE sent (in the guest's time; NO_DEADLINE: none).
        self._guest_time_ns: int | None = None
        self._deadline_sent: int | None = None
        self._follows_host = False  # this guest gets host time on a guest-time UART
        self._draining = False  # the server is stopping: see drain()
        self.replies_dropped = 0  # output frames the drain could not send (backed up)

    @property
    def drives_time(self) -> bool:
        """This guest was granted GUEST_TIME: it drives the device's clock."""
        return self._guest_time_ns is not None

    @property
    def drainable(self) -> bool:
        """The guest's connection is open: ``drain`` would execute what it sent."""
        return self._is_guest and not self._closing and self._transport is not None

    @property
    def attached(self) -> bool:
        """This connection is the guest and has completed HELLO (it is not pending)."""
        return self._is_guest and self._hello

    # -- transport callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not isinstance-checked: uvloop's transports are not asyncio.Transport subclasses.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        server = self._server
        transport.set_write_buffer_limits(high=server.high_water, low=server.high_water // 4)
        if server.closing:
            self._fail(ErrorCode.SHUTTING_DOWN, "server is shutting down")
            return
        loop = asyncio.get_running_loop()
        # Whoever holds a connection without completing HELLO (silent, a garbage length
        # promising more bytes, no token) is dropped: it would hold the slot or a pending place.
        self._hello_timer = loop.call_later(server.hello_timeout_s, self._no_hello)
        if self._vetted:
            self._start_claim()

    def _start_claim(self) -> None:
        # A guest that just closed may not have been noticed yet (its EOF is in the same
        # poll batch): give the slot a short grace before answering BUSY.
        self._claim_deadline = asyncio.get_running_loop().time() + self._server.busy_grace_s
        self._try_claim()

    def _try_claim(self) -> None:
        self._claim_timer = None
        server = self._server
        if self._closing or self._transport is None:
            return
        if server._guest is None:
            server._guest = self
            self._is_guest = True
            server.log.info("bus.guest_connected", uart=server.name, peer=self._peer)
            self._run()
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._claim_deadline:
            self._claim_timer = loop.call_later(0.01, self._try_claim)
            self._update_reading()
            return
        server.warn_limited("bus.busy", peer=self._peer)
        self._fail(ErrorCode.BUSY, f"UART {server.name} already has a guest")

    def get_buffer(self, sizehint: int) -> memoryview:
        server = self._server
        return server._rview if self._is_guest else server._rview_small

    def buffer_updated(self, nbytes: int) -> None:
        if self._closing:
            return
        view = self._server._rview_small if not self._is_guest else self._server._rview
        self._decoder.feed(view[:nbytes])
        if not self._vetted:
            self._authenticate()
        elif self._is_guest:
            if self._continuation is None:
                self._run()
        else:
            self._update_reading()  # keep at most this read until the slot is ours

    def eof_received(self) -> bool | None:
        if self._decoder.buffered:
            # A half frame and then EOF: say so, as for any other malformed input.
            self._fail(ErrorCode.MALFORMED, "connection closed in the middle of a frame")
            return True
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        for timer in (self._stall_timer, self._abort_timer, self._claim_timer, self._hello_timer,
                      self._continuation):
            if timer is not None:
                timer.cancel()
        self._stall_timer = self._abort_timer = self._claim_timer = self._hello_timer = None
        self._continuation = None
        server = self._server
        server._connections.discard(self)
        if self._is_guest and server._guest is self:
            server._guest = None
            server.guest_left(self)
            server.log.info(
                "bus.guest_disconnected",
                uart=server.name,
                peer=self._peer,
                frames=self.frames_executed,
                error=str(exc) if exc else None,
            )
        self._transport = None

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()
        if self._stall_timer is None and not self._closing:
            loop = asyncio.get_running_loop()
            self._stall_timer = loop.call_later(self._server.stall_timeout_s, self._stalled)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self._closing or self._transport is None:
            return
        if self._is_guest and self._continuation is None:
            self._run()
        else:
            self._update_reading()

    def _update_reading(self) -> None:
        """Read only what may be buffered now: as the guest, while nothing waits for its
        turn; while authenticating, up to the first frame; while waiting for the slot, one
        small read."""
        transport = self._transport
        if transport is None or self._closing:
            return
        if not self._vetted:
            want = True
        elif self._is_guest:
            want = (
                not self._write_paused
                and self._continuation is None
                and self._pending_frame is None
            )
        else:
            want = not self._decoder.buffered
        if want != self._reading:
            self._reading = want
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    # -- authentication (TCP peers that are not identified as permitted) --

    def _authenticate(self) -> None:
        server = self._server
        try:
            frame = self._decoder.next_frame()
        except FrameError as exc:
            self._fail(exc.code, exc.message)
            return
        if frame is None:
            return  # the decoder holds at most one frame: read on
        if not isinstance(frame, Hello):
            self._fail(ErrorCode.PROTOCOL, "the first frame must be HELLO")
            return
        token = server.tcp_token
        if token is None or frame.token is None or not hmac.compare_digest(frame.token, token):
            server.warn_limited("bus.peer_refused", peer=self._peer, reason="no valid token")
            self._fail(ErrorCode.NOT_PERMITTED, "peer not permitted (no valid token)")
            return
        server.log.info("bus.peer_authenticated", uart=server.name, peer=self._peer)
        self._vetted = True
        self._pending_frame = frame  # executed first, as the guest's HELLO
        self._update_reading()
        self._start_claim()

    # -- frame execution --

    def _run(self) -> None:
        """Execute buffered frames in order until none is left, output is backed up, or this
        turn's budget is spent (then continue after everything else that is ready)."""
        self._continuation = None
        if self._out is not None or self._closing:
            return  # re-entered: the outer call goes on
        self._out = bytearray()
        more = False
        try:
            more = self._run_frames()
            if self._unsettled:
                self._settle()  # posted writes of this turn reach the wire in this turn
            turn_end = self._server.on_turn_end
            if turn_end is not None:
                turn_end()
        except Exception:
            self._internal_error()
        finally:
            self._flush()
            self._out = None
        if more and not self._closing and not self._write_paused:
            # call_later(0), not call_soon: a timer that is due runs after the I/O callbacks
            # of the loop's next poll, so whatever became ready during this turn (another
            # UART's guest, a port) goes first; a call_soon would run before that poll.
            self._continuation = asyncio.get_running_loop().call_later(0, self._run)
        self._update_reading()

    def _run_frames(self) -> bool:
        """True when the budget ran out with a frame left (in ``_pending_frame``)."""
        server = self._server
        decoder = self._decoder
        budget = server.op_budget
        clock = time.perf_counter_ns
        deadline = clock() + server.time_budget_ns
        ops = 0
        while not self._closing and not self._write_paused:
            frame = self._pending_frame
            self._pending_frame = None
            if frame is None:
                try:
                    frame = decoder.next_frame()
                except FrameError as exc:
                    server.warn_limited("bus.bad_frame", peer=self._peer, error=str(exc))
                    self._fail(exc.code, exc.message)
                    return False
                if frame is None:
                    return False
            cost = _cost(frame)
            if ops and (ops + cost > budget or clock() >= deadline):
                self._pending_frame = frame
                self.slices += 1
                return True
            try:
                self._execute(frame)
            except FrameError as exc:
                self._fail(exc.code, exc.message)
                return False
            except Exception:
                self._internal_error()
                return False
            ops += cost
            self.frames_executed += 1
        if ops:
            self.slices += 1
        return False

    def _execute(self, frame: Frame) -> None:
        server = self._server
        uart = server.uart
        if not self._hello:
            if not isinstance(frame, Hello):
                raise FrameError(ErrorCode.PROTOCOL, "the first frame must be HELLO")
            if frame.version not in SUPPORTED_VERSIONS:
                raise FrameError(
                    ErrorCode.VERSION_MISMATCH,
                    f"protocol version {frame.version} not supported; "
                    f"this server speaks {' and '.join(map(str, SUPPORTED_VERSIONS))}",
                )
            if frame.version >= 2:
                self._hello_v2(frame)
            else:
                self._hello_v1()
            return
        if isinstance(frame, Time):
            if self._version < 2:
                raise FrameError(ErrorCode.UNKNOWN_TYPE, "frame type 0x07 (TIME) is protocol v2")
            self._advance_time(frame.now_ns)
            return
        # Posted writes are settled lazily: before anything that observes the device (a
        # reply), before a THR write that would overwrite an unsent byte, and at the end of
        # the turn. The guest cannot tell (every observation comes after a settle), and a
        # burst of THR writes leaves in one os.write (see docs/bus-protocol.md, "Settling").
        if isinstance(frame, Write):
            self._write_register(frame.offset, frame.value)
        elif isinstance(frame, Read):
            if self._unsettled:
                self._settle()
            value = uart.read(frame.offset)
            self._settle()
            self._send(frame_bytes(FrameType.READ_REPLY, bytes((frame.offset, value))))
        elif isinstance(frame, WriteN):
            self._write_burst(frame.offset, frame.data)
        elif isinstance(frame, ReadN):
            data = self._read_n(frame.offset, frame.count)
            self._settle()
            self._send(frame_bytes(FrameType.READ_N_REPLY, bytes((frame.offset,)) + data))
        elif isinstance(frame, Sync):
            if self._unsettled:
                self._settle()
            self._send(frame_bytes(FrameType.SYNC_REPLY, U32.pack(frame.token)))
        elif isinstance(frame, Hello):
            raise FrameError(ErrorCode.PROTOCOL, "HELLO sent twice")
        else:
            raise FrameError(
                ErrorCode.PROTOCOL, f"{type(frame).__name__} is not sent by a guest"
            )

    def _hello_v1(self) -> None:
        """HELLO v1: exactly the v1 reply (capabilities 0x0F); host time on a guest-time UART."""
        self._complete_hello(1, SERVER_CAPABILITIES)
        self._take_host_time()

    def _hello_v2(self, frame: Hello) -> None:
        """HELLO v2: the negotiated capabilities; GUEST_TIME if asked for and the UART's clock
        is the guest's."""
        server = self._server
        caps = SERVER_CAPABILITIES
        if server.uart.pace == "line":
            caps |= Capability.LINE_PACE
        clock = server.guest_clock
        wants_time = bool(frame.caps & Capability.GUEST_TIME)
        if wants_time and clock is not None:
            if frame.time_ns is None:
                raise FrameError(ErrorCode.MALFORMED, "GUEST_TIME needs HELLO's TIME field")
            clock.hold()
            self._guest_time_ns = frame.time_ns
            self._complete_hello(2, caps | Capability.GUEST_TIME)
            self._send_deadline()
            return
        self._complete_hello(2, caps)
        self._take_host_time()

    def _complete_hello(self, version: int, caps: int) -> None:
        server = self._server
        self._hello = True
        self._version = version
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        self._irq_sent = server.uart.irq
        self._send(encode(HelloReply(version, int(caps), server.uart.irq, server.name)))

    def _take_host_time(self) -> None:
        """A guest that does not drive time, on a guest-time UART: the clock follows the host
        while it is attached (settled, so the device's timers run on the loop again)."""
        clock = self._server.guest_clock
        if clock is not None:
            clock.follow_host()
            self._follows_host = True
            self._settle()

    def _advance_time(self, now_ns: int) -> None:
        """TIME: the guest's time moved to ``now_ns``; the device's clock moves as much and the
        timers due by then run (each at its own time). Settled lazily, as a posted write."""
        last = self._guest_time_ns
        clock = self._server.guest_clock
        if last is None or clock is None:
            raise FrameError(ErrorCode.PROTOCOL, "TIME needs the GUEST_TIME capability (HELLO v2)")
        if now_ns < last:
            raise FrameError(ErrorCode.BAD_TIME, f"TIME went back: {now_ns} < {last}")
        if now_ns > last:
            clock.advance(now_ns - last)
            self._guest_time_ns = now_ns
            self._server.uart.poll()
            self._unsettled = True

    def _send_deadline(self) -> None:
        """A DEADLINE frame if the device's next deadline, in the guest's time, changed."""
        base = self._guest_time_ns
        clock = self._server.guest_clock
        if base is None or clock is None or not self._hello or self._closing:
            return
        due = self._server.uart.next_deadline_ns()
        deadline = NO_DEADLINE if due is None else base + max(0, due - clock())
        if deadline != self._deadline_sent:
            self._deadline_sent = deadline
            self._send(frame_bytes(FrameType.DEADLINE, U64.pack(min(deadline, NO_DEADLINE))))

    def release_clock(self) -> None:
        """This guest left: a clock that followed the host for it stands still again."""
        clock = self._server.guest_clock
        if clock is not None and self._follows_host:
            clock.hold()
        self._follows_host = False

    def _internal_error(self) -> None:
        """Our own bug (or the daemon's settle failed): log it, tell the guest, disconnect."""
        exc = sys.exc_info()[1]
        self._server.log.exception("bus.internal_error", uart=self._server.name)
        self._unsettled = False
        self._fail(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}")

    def _write_register(self, offset: int, value: int) -> None:
        """A posted write. Only THR writes are left unsettled: any other register write may
        flush, loop back or re-time what waits, so the wire takes it first; so it does
        before a THR write that would overwrite an unsent byte."""
        uart = self._server.uart
        if self._unsettled and not uart.write_can_post(offset):
            self._settle()
        uart.write(offset, value)
        self._unsettled = True

    def _write_burst(self, offset: int, data: bytes) -> None:
        """WRITE_N: ``len(data)`` writes of ``offset``, one bus operation.

        To a register other than THR the writes run back to back and are settled once, after
        the burst (the port gets the final line settings and modem outputs, the guest the IRQ
        edges the model kept: §4.6). To THR the port is given the chance to take what waits
        before a write that would overwrite an unsent byte — but once per burst: if it took
        nothing (a stalled reader), asking again for every later byte of the same burst
        would only repeat the refusal.
        """
        uart = self._server.uart
        write = uart.write
        if self._unsettled:
            self._settle()
        if offset != THR or uart.dlab:
            for value in data:
                write(offset, value)
            self._unsettled = True
            return
        refused = False
        tx_full = uart.tx_full
        for value in data:
            if self._unsettled and not refused and tx_full():
                self._settle()
                refused = tx_full()
            write(THR, value)
            self._unsettled = True

    def _read_n(self, offset: int, count: int) -> bytes:
        """READ_N: ``count`` reads of ``offset``; RBR reads stop at DR=0 or a pending error.

        For RBR (offset 0, DLAB=0) the stop rule is evaluated on LSR as it stands, without
        LSR's read side effects. When the RX FIFO runs dry the burst settles once, so the
        port can refill it from what it already read (as a back end delivers input between
        two guest reads), and goes on while data keeps coming.
        """
        uart = self._server.uart
        read = uart.read
        if self._unsettled:
            self._settle()
        if offset != RBR or uart.dlab:
            return bytes([read(offset) for _ in range(count)])
        data = bytearray()
        while len(data) < count:
            available = uart.rx_readable()
            if not available:
                self._settle()
                available = uart.rx_readable()
                if not available:
                    break
            data += bytes([read(RBR) for _ in range(min(count - len(data), available))])
        return bytes(data)

    def _settle(self) -> None:
        self._unsettled = False
        self.send_irq(self._server.settle())

    def send_irq(self, levels: Sequence[bool]) -> None:
        """IRQ frames for the levels that differ from the last one the guest was told; then,
        for a guest that drives time, a DEADLINE frame if the next deadline changed."""
        if not self._hello or self._closing:
            return
        for level in levels:
            if level != self._irq_sent:
                self._irq_sent = level
                self._send(_IRQ_HIGH if level else _IRQ_LOW)
        if self._guest_time_ns is not None:
            self._send_deadline()

    def _send(self, data: bytes) -> None:
        out = self._out
        if out is not None:
            out += data
            if len(out) >= _OUT_BATCH:
                self._flush()  # lets pause_writing stop the batch near the high-water mark
            return
        self._write(data)

    def _flush(self) -> None:
        out = self._out
        if out:
            data = bytes(out)
            out.clear()
            self._write(data)

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or self._closing:
            return
        if self._draining and transport.get_write_buffer_size() >= self._server.high_water:
            self.replies_dropped += 1  # the guest is going away and not reading: best effort
            return
        transport.write(data)
        if transport.get_write_buffer_size() > self._server.hard_limit:
            self._server.log.warning(
                "bus.output_overflow", uart=self._server.name, peer=self._peer
            )
            self._closing = True
            transport.abort()

    def _no_hello(self) -> None:
        self._hello_timer = None
        if self._hello or self._closing:
            return
        self._server.warn_limited("bus.no_hello", peer=self._peer)
        self._fail(
            ErrorCode.PROTOCOL, f"no complete HELLO within {self._server.hello_timeout_s:g} s"
        )

    def _stalled(self) -> None:
        self._stall_timer = None
        if self._transport is None or self._closing:
            return
        self._server.log.warning("bus.guest_stalled", uart=self._server.name, peer=self._peer)
        self._closing = True
        self._transport.abort()

    def _fail(self, code: ErrorCode, message: str) -> None:
        """Send an ERROR frame, then close (aborting if the peer does not take it)."""
        self._flush()  # the replies to earlier frames go first
        transport = self._transport
        if transport is None or self._closing:
            return
        transport.write(encode(ErrorFrame(int(code), message)))
        self._closing = True
        if self._continuation is not None:
            self._continuation.cancel()
            self._continuation = None
        transport.close()
        loop = asyncio.get_running_loop()
        self._abort_timer = loop.call_later(self._server.close_grace_s, transport.abort)

    def shutdown(self) -> None:
        """The server is closing: tell the peer, then close."""
        self._fail(ErrorCode.SHUTTING_DOWN, "server is shutting down")

    def drain(self, limit_bytes: int) -> tuple[int, int]:
        """The server is stopping: execute every complete frame this guest already sent.

        Those are the frames decoded or buffered here and those in the kernel's receive queue
        when the drain begins (``FIONREAD``), of which at most ``limit_bytes`` are read, with
        non-blocking reads: what a guest sends meanwhile does not prolong the stop. The frames
        run in order, without turns, at most ``limit_bytes`` register operations in all (a
        READ_N may ask for 4094 reads in 6 bytes); posted writes reach the device (and the
        port, by the settle at the end), replies are sent while the socket takes them
        (``_write``: never more than the high-water mark is buffered). A partial frame at
        the end is dropped: the guest never completed it. Returns (bytes read, register
        operations executed). Only for the guest; ``shutdown`` closes afterwards.
        """
        transport = self._transport
        if not self.drainable or transport is None:
            return 0, 0
        if self._continuation is not None:
            self._continuation.cancel()
            self._continuation = None
        server = self._server
        self._draining = True
        self._out = bytearray()
        read = ops = 0
        try:
            fd = transport.get_extra_info("socket").fileno()
            try:
                queued = int.from_bytes(
                    fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder
                )
            except OSError:
                queued = 0
            to_read = min(queued, limit_bytes)
            ops = self._drain_frames(limit_bytes)
            view = server._rview
            while to_read > 0 and not self._closing and ops < limit_bytes:
                try:
                    n = os.readv(fd, [view[: min(to_read, len(view))]])
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break  # the guest is gone; what it sent before is executed
                if n == 0:
                    break
                read += n
                to_read -= n
                self._decoder.feed(view[:n])
                ops += self._drain_frames(limit_bytes - ops)
            if self._unsettled and not self._closing:
                self._settle()
            turn_end = server.on_turn_end
            if turn_end is not None:
                turn_end()
        except Exception:
            self._internal_error()
        finally:
            self._flush()
            self._out = None
        return read, ops

    def _drain_frames(self, budget: int) -> int:
        """Execute buffered complete frames in order, up to ``budget`` register operations
        (the drain at a stop: no turns, whatever the output's back-pressure); their count."""
        ops = 0
        while not self._closing:
            frame = self._pending_frame
            self._pending_frame = None
            if frame is None:
                try:
                    frame = self._decoder.next_frame()
                except FrameError as exc:
                    self._fail(exc.code, exc.message)
                    break
                if frame is None:
                    break
            cost = _cost(frame)
            if ops + cost > budget:
                self._pending_frame = frame
                break
            try:
                self._execute(frame)
            except FrameError as exc:
                self._fail(exc.code, exc.message)
                break
            ops += cost
            self.frames_executed += 1
        return ops


_OUT_BATCH = 16 * 1024
_READ_SIZE = 64 * 1024
_SMALL_READ_SIZE = 512  # what a connection that is not the guest may read at a time
_IRQ_HIGH = frame_bytes(FrameType.IRQ, b"\x01")
_IRQ_LOW = frame_bytes(FrameType.IRQ, b"\x00")
_LISTEN_BACKLOG = 128


def _refuse_now(sock: socket.socket, code: ErrorCode, message: str) -> None:
    """ERROR frame (best effort: one non-blocking send) and close, on the bare socket."""
    with contextlib.suppress(OSError):
        sock.send(encode(ErrorFrame(int(code), message)))
    sock.close()


class BusServer:
    """Serves one UART on a Unix socket (and optionally TCP) to at most one guest at a time."""

    def __init__(
        self,
        uart: Uart16550,
        *,
        name: str,
        settle: Callable[[], Sequence[bool]],
        peer_allowed: Callable[[PeerCredentials], bool] | None = None,
        tcp_token: bytes | None = None,
        log: Any = None,
        high_water: int = 64 * 1024,
        stall_timeout_s: float = 30.0,
        close_grace_s: float = 1.0,
        busy_grace_s: float = 0.25,
        hello_timeout_s: float = 5.0,
        max_pending: int = 8,
        op_budget: int = 4096,
        time_budget_s: float = 0.002,
        log_interval_s: float = 10.0,
        on_turn_end: Callable[[], None] | None = None,
        guest_clock: GuestClock | None = None,
        drain_limit_bytes: int = 256 * 1024,
    ) -> None:
        """A server for ``uart`` named ``name`` (≤ 255 UTF-8 bytes; sent in HELLO_REPLY).

        ``settle`` is called after every operation that touched the model and returns the
        IRQ level changes, in order, since its last call. ``peer_allowed`` vets peers by
        their kernel credentials: ``SO_PEERCRED`` on the Unix socket, the owner of the peer's
        socket on TCP (None: every peer the kernel identifies). ``tcp_token`` (1..255 bytes)
        admits a TCP peer that is not identified as permitted — a peer on another host — if
        its HELLO carries it; without it such peers are refused. ``high_water`` bounds the
        output buffered for a guest before the server stops executing its frames; a guest
        that does not drain it for ``stall_timeout_s`` is dropped. A connection finding the
        guest slot taken waits up to ``busy_grace_s`` for it (a guest reconnecting may race
        its own hang-up) before it is refused with BUSY. A connection that has not completed
        HELLO ``hello_timeout_s`` after it was accepted is refused with PROTOCOL and closed.
        ``max_pending`` caps, per listening socket, the connections that are not the
        attached guest. ``op_budget`` register operations or ``time_budget_s`` end a
        guest's turn; ``log_interval_s`` is the least time between two log lines about
        refused peers or failed accepts. ``on_turn_end`` is called at the end of every turn
        of a guest's frames, after its last settle and before its output is sent: the place
        for a port to apply, once, what the turn's register writes changed (line settings).
        ``guest_clock``: the UART's clock is the guest's (``clock = "guest"``): a v2 guest
        with GUEST_TIME drives it, any other guest gets host time while attached (the
        module docstring, "Time"); it must be the model's clock. ``close`` first executes
        the frames the guest already sent, reading at most ``drain_limit_bytes`` of them
        from the socket and executing at most as many register operations (``drain``).
        """
        if len(name.encode()) > MAX_NAME_LEN:
            raise ValueError(f"UART name longer than {MAX_NAME_LEN} bytes: {name!r}")
        if tcp_token is not None and not 1 <= len(tcp_token) <= 255:
            raise ValueError("tcp_token must be 1..255 bytes")
        self.uart = uart
        self.name = name
        self.settle = settle
        self.peer_allowed = peer_allowed
        self.tcp_token = tcp_token
        self.log: Any = log if log is not None else structlog.get_logger("uartbridge.bus")
        self.high_water = high_water
        # Past this the guest is dropped (only unsolicited IRQ frames can grow it that far).
        self.hard_limit = max(16 * high_water, 1 << 20)
        self.stall_timeout_s = stall_timeout_s
        self.close_grace_s = close_grace_s
        self.busy_grace_s = busy_grace_s
        self.hello_timeout_s = hello_timeout_s
        self.max_pending = max_pending
        self.op_budget = op_budget
        self.time_budget_ns = int(time_budget_s * 1e9)
        self.log_interval_s = log_interval_s
        self.on_turn_end = on_turn_end
        self.guest_clock = guest_clock
        self.drain_limit_bytes = drain_limit_bytes
        self.closing = False
        self._guest: _Connection | None = None
        self._connections: set[_Connection] = set()
        self._listeners: list[Listener] = []
        self._roles: dict[Listener, str] = {}  # ROLE_UNIX, ROLE_UNIX_HANDED or ROLE_TCP
        self._unix_paths: list[tuple[Path, int]] = []  # socket files ours to remove at close
        # Listening sockets kept open by ``close(keep_listening=True)``, for the next run:
        # (role, socket).
        self.kept: list[tuple[str, socket.socket]] = []
        self._attaching: set[asyncio.Task[None]] = set()
        self._diag: SockDiag | None = None
        self._diag_error = ""
        # One read buffer for every connection of this server (all on one loop): a transport
        # reads into it and the connection copies the bytes into its decoder at once.
        self._rbuf = bytearray(_READ_SIZE)
        self._rview = memoryview(self._rbuf)
        self._rview_small = self._rview[:_SMALL_READ_SIZE]
        self._limiters: dict[str, LogLimiter] = {}

    def warn_limited(self, event: str, **fields: Any) -> None:
        """A warning about one connection that any peer can provoke at will (refused, busy,
        garbage): at most one line per ``log_interval_s`` per event, with a count."""
        limiter = self._limiters.get(event)
        if limiter is None:
            limiter = LogLimiter(self.log, event, interval_s=self.log_interval_s)
            self._limiters[event] = limiter
        limiter.hit(uart=self.name, **fields)

    # -- listening --------------------------------------------------------------------------

    def _listen(self, sock: socket.socket, *, role: str, what: str) -> None:
        index = len(self._listeners)
        unix = role != ROLE_TCP
        listener = Listener(
            sock,
            lambda conn: self._accept(conn, unix=unix, listener=index),
            log=self.log,
            name=f"{self.name} {what}",
            event="bus.accept_failed",
            log_interval_s=self.log_interval_s,
        )
        self._listeners.append(listener)
        self._roles[listener] = role

    async def start_unix(
        self,
        path: Path,
        *,
        mode: int = 0o660,
        sock: socket.socket | None = None,
        owned: bool = True,
    ) -> None:
        """Listen on a Unix socket at ``path`` (a stale socket file is replaced); ``sock``:
        the one listening there already (handed over). ``owned``: the socket file is ours,
        removed at ``close``; a handed socket that is not (a socket unit's) is never
        unlinked nor rebound."""
        path = Path(path)
        handed = sock is not None
        if sock is None:
            sock, owned = bind_unix(path, mode), True
        try:
            # Not stat-ed unless ours: a socket unit's may be in a directory we cannot enter.
            inode = os.stat(path).st_ino if owned else 0
            sock.listen(_LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            raise BusError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
        self._listen(sock, role=ROLE_UNIX if owned else ROLE_UNIX_HANDED, what=str(path))
        if owned:
            self._unix_paths.append((path, inode))
        self.log.info("bus.listening", uart=self.name, socket=str(path),
                      handed_over=handed or None)

    async def start_tcp(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        take: Callable[[int, tuple[Any, ...]], socket.socket | None] | None = None,
    ) -> tuple[str, int]:
        """Listen on TCP (loopback unless told otherwise); returns the bound (host, port).

        ``take(family, sockaddr)``: a listening socket handed over for that address, or None
        (then one is bound): for each address ``host`` resolves to, it is asked first.

        A peer is admitted when the kernel identifies its socket as an ESTABLISHED socket on
        this host owned by a user ``peer_allowed`` permits (``uartbridge.sockdiag``), or, with
        ``tcp_token``, when its HELLO carries the token; anyone else is refused.
        """
        if self._diag is None and not self._diag_error:
            try:
                self._diag = SockDiag()
            except BusError as exc:
                self._diag_error = str(exc)
                self.log.error("bus.tcp_identification_unavailable", uart=self.name,
                               error=str(exc))
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except OSError as exc:
            raise BusError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        bound: tuple[str, int] | None = None
        socks: list[socket.socket] = []
        try:
            for family, kind, proto, _name, address in infos:
                handed = None if take is None else take(family, address)
                if handed is not None:
                    sock = handed
                    socks.append(sock)
                else:
                    sock = socket.socket(family, kind, proto)
                    socks.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind(address)
                # Accepted sockets inherit it (Linux): replies leave without Nagle's delay.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.listen(_LISTEN_BACKLOG)
                if bound is None:
                    name = sock.getsockname()
                    bound = (str(name[0]), int(name[1]))
        except OSError as exc:
            for sock in socks:
                sock.close()
            raise BusError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        assert bound is not None
        for sock in socks:
            sock.setblocking(False)
            self._listen(sock, role=ROLE_TCP, what=f"tcp {bound[0]}:{bound[1]}")
        self.log.info("bus.listening", uart=self.name, tcp=f"{bound[0]}:{bound[1]}")
        return bound

    # -- admission --------------------------------------------------------------------------

    def _accept(self, sock: socket.socket, *, unix: bool, listener: int) -> None:
        """A new connection, before any transport: vet, cap, then attach (or refuse)."""
        if self.closing:
            _refuse_now(sock, ErrorCode.SHUTTING_DOWN, "server is shutting down")
            return
        peer, vetted, refusal = self._vet(sock, unix=unix)
        if refusal:
            self.warn_limited("bus.peer_refused", peer=peer, reason=refusal)
            _refuse_now(sock, ErrorCode.NOT_PERMITTED, f"peer not permitted: {refusal}")
            return
        pending = sum(
            1 for c in self._connections if c.listener == listener and not c.attached
        )
        if pending >= self.max_pending:
            self.warn_limited("bus.too_many_pending", peer=peer, pending=pending)
            _refuse_now(sock, ErrorCode.BUSY, "too many connections waiting; try later")
            return
        conn = _Connection(self, peer=peer, vetted=vetted, listener=listener)
        self._connections.add(conn)
        task = asyncio.get_running_loop().create_task(self._attach(conn, sock))
        self._attaching.add(task)
        task.add_done_callback(self._attaching.discard)

    async def _attach(self, conn: _Connection, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: conn, sock)
        except OSError:
            self._connections.discard(conn)
            sock.close()

    def _vet(self, sock: socket.socket, *, unix: bool) -> tuple[str, bool, str]:
        """(peer name for the logs, vetted, refusal reason or "").

        Not vetted (and not refused): a TCP peer that may still authenticate by token.
        """
        check = self.peer_allowed
        if unix:
            try:
                creds = peer_credentials(sock)
            except BusError as exc:
                return "unknown", False, str(exc)
            peer = f"pid={creds.pid} uid={creds.uid} gid={creds.gid}"
            if check is None or check(creds):
                return peer, True, ""
            return peer, False, f"uid {creds.uid} is not permitted"
        try:
            peer = str(sock.getpeername()[:2])
        except OSError:
            peer = "?"
        if self._diag is None:
            reason = f"TCP peers cannot be identified: {self._diag_error}"
        else:
            ident = identify_tcp_peer(sock, self._diag)
            if ident.creds is not None:
                peer += f" uid={ident.creds.uid}"
                if check is None or check(ident.creds):
                    return peer, True, ""
                reason = f"uid {ident.creds.uid} is not permitted"
            else:
                reason = ident.reason
                if not ident.local and self.tcp_token is None:
                    reason += "; a peer on another host needs a token (bus_tcp_token)"
        if self.tcp_token is not None:
            return peer, False, ""  # its HELLO must carry the token
        return peer, False, reason

    # -- the guest ----------------------------------------------------------------------------

    def push_irq(self, levels: Sequence[bool]) -> None:
        """IRQ changes that happened outside bus operations (port input, timers); a guest
        that drives time also hears of a new deadline (so call it with no levels too)."""
        guest = self._guest
        if guest is not None and (levels or guest.drives_time):
            guest.send_irq(levels)

    def guest_left(self, conn: _Connection) -> None:
        """The guest's connection is gone: a clock that followed the host stands still."""
        conn.release_clock()
        if self.guest_clock is not None:
            self.settle()  # the device's loop timer stops (guest time, nobody drives it)

    @property
    def guest_connected(self) -> bool:
        """A guest holds this UART's bus connection."""
        return self._guest is not None

    @property
    def accept_errors(self) -> int:
        """Failed accept calls on all listening sockets so far."""
        return sum(listener.errors for listener in self._listeners)

    @property
    def tcp_lookups(self) -> int:
        """How many sock_diag queries identified TCP peers (one or so per connection)."""
        return self._diag.queries if self._diag is not None else 0

    @property
    def tcp_sockets(self) -> list[socket.socket]:
        """The listening TCP sockets (for the fd store)."""
        return [listener.sock for listener in self._listeners
                if self._roles.get(listener) == ROLE_TCP]

    def detach_listeners(self) -> None:
        """Stop accepting on every listening socket and keep them open (``kept``, with their
        role) for the next run: who connects from now on waits in the backlog for it."""
        for listener in list(self._listeners):
            self._listeners.remove(listener)
            self.kept.append((self._roles.pop(listener, ROLE_TCP), listener.detach()))

    async def close(self, *, keep_listening: bool = False) -> None:
        """Stop listening, execute what the guest already sent (``_Connection.drain``), close
        every connection (the guest is told), remove socket files.

        ``keep_listening``: the listening sockets stay open and their files stay, for the
        next run (``kept``); connections wait in the backlog meanwhile.
        """
        self.closing = True
        if keep_listening:
            self.detach_listeners()
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        self._roles.clear()
        for path, inode in self._unix_paths:
            with contextlib.suppress(OSError):
                if not keep_listening and os.stat(path).st_ino == inode:
                    path.unlink()
        self._unix_paths.clear()
        for task in list(self._attaching):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, timeout=self.close_grace_s + 1)
        guest = self._guest
        if guest is not None and guest.drainable:
            # Frames the guest sent before the stop are executed before anything else, so
            # its posted writes are in the device (and in the checkpoint taken after this).
            frames = guest.frames_executed
            read, ops = guest.drain(self.drain_limit_bytes)
            bounded = read >= self.drain_limit_bytes or guest._pending_frame is not None
            # A guest past the bound (flooding) loses what it sent beyond it: say so.
            log = self.log.warning if bounded else self.log.info
            log("bus.drained", uart=self.name, peer=guest._peer, bytes_read=read,
                frames=guest.frames_executed - frames, operations=ops,
                bytes_left=guest._decoder.buffered, bounded=bounded,
                replies_dropped=guest.replies_dropped)
        for conn in list(self._connections):
            conn.shutdown()
        for limiter in self._limiters.values():
            limiter.close()
        if self._diag is not None:
            self._diag.close()
            self._diag = None
        # Give transports a turn to flush the ERROR frame and close.
        for _ in range(3):
            if not self._connections:
                break
            await asyncio.sleep(0)
