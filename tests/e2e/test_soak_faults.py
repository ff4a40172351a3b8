"""Faults under two-way traffic: a stalled reader, socat killed, the daemon killed, hostile peers.

Streams are sequence-numbered records in both directions: the reference guest on the bus,
a far end on the other socat pty. Where a fault may legitimately lose bytes (the OS had
handed them to a socat that died; a crash rolls the device back to its last periodic
checkpoint), the test computes *exactly* which bytes those are from independent
measurements and asserts the received stream is the sent one minus (or plus) exactly them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from faultkit import (
    SoakFarEnd,
    SoakGuest,
    control_status,
    describe,
    gaps,
    log_events,
    rollback_split,
    segments,
    wait_finished,
)
from procs import Daemon, daemon, socat_pair, wait_for
from streams import assert_exact, sequence_stream, wait_streams

from uartbridge.bus import MAX_FRAME_LEN, ErrorCode, FrameType, Hello, Read, encode
from uartbridge.checkpoint import latest_checkpoint
from uartbridge.client import BusClient
from uartbridge.errors import BusError
from uartbridge.registers import FIFO_SIZE, RBR, SCR

pytestmark = pytest.mark.e2e

STREAM_RECORDS = 200_000  # more than any scenario takes: the streams are ended by finish()


def _uart(name: str, link: Path, **extra: object) -> dict[str, object]:
    return {"name": name, "port": str(link), **extra}


def _moved(guest: SoakGuest, far: SoakFarEnd, *, by: int = 2048) -> None:
    """Wait until each direction carried at least ``by`` more bytes."""
    far0, guest0 = len(far.received), len(guest.received)

    def moved() -> bool:
        guest.check()
        far.check()
        return len(far.received) >= far0 + by and len(guest.received) >= guest0 + by

    wait_for(moved, timeout_s=60.0)


def _uart_status(d: Daemon, index: int = 0) -> dict[str, Any]:
    status: dict[str, Any] = control_status(d.control)["uarts"][index]
    return status


# -- a stalled reader -------------------------------------------------------------------------


def test_far_end_stalled_five_seconds_back_pressures_the_guest_and_loses_nothing(
    tmp_path: Path, record_property: Any
) -> None:
    """A far end that stops reading for 5 s back-pressures the guest; then both streams exact."""
    with (
        socat_pair(tmp_path) as pair,
        daemon(tmp_path / "d", [_uart("uart0", pair.a)], interval_s=0) as d,
    ):
        d.start()
        # The guest writes as fast as its driver goes, so that the ~35–40 KB the socat ptys
        # accept fill up within the stall; the far end writes at a modest steady rate.
        guest = SoakGuest(d.bus(), sequence_stream(STREAM_RECORDS, b"g"))
        far = SoakFarEnd(pair.b, sequence_stream(STREAM_RECORDS, b"f"), rate_bytes_per_s=8000)
        guest.start()
        far.start()
        try:
            _moved(guest, far)
            far.stall()
            stalled_at = time.monotonic()
            samples: list[dict[str, Any]] = []
            seen_at = (0, 0, 0)
            seen_after_s = 0.0
            cli_view: dict[str, Any] | None = None
            # Stall for 5 s, and (on a slow machine) until the back-pressure has been seen
            # and the guest has had 1 s more to read LSR while it lasts.
            seen_mono = 0.0
            while (
                time.monotonic() - stalled_at < 5.0
                or not samples
                or time.monotonic() - seen_mono < 1.0
            ):
                guest.check()
                far.check()
                uart = _uart_status(d)
                if uart["reader_state"] == "stalled" and uart["tsr_busy"]:
                    if not samples:  # the guest's view from the moment the daemon saw it
                        assert guest.guest is not None
                        seen_at = (guest.lsr_reads, guest.lsr_temt_low,
                                   guest.guest.counters.tx_bytes)
                        seen_after_s = time.monotonic() - stalled_at
                        seen_mono = time.monotonic()
                    samples.append(uart)
                    if cli_view is None:
                        cli_view = d.status()["uarts"][0]  # the real `status --json`
                assert time.monotonic() - stalled_at < 60.0, "the reader never showed stalled"
                time.sleep(0.1)
            assert guest.guest is not None
            seen_end = (guest.lsr_reads, guest.lsr_temt_low, guest.guest.counters.tx_bytes)
            last = samples[-1]
            received_during_stall = len(far.received)
            far.drain()
            _moved(guest, far)
            wait_finished(guest, far)
            wait_streams(guest, far, timeout_s=120.0)
            assert_exact(bytes(far.received), guest.tx_data, "guest → far end")
            assert_exact(bytes(guest.received), far.tx_data, "far end → guest")
        finally:
            guest.stop()
            far.stop()
        assert cli_view is not None
        for view in (cli_view, last):
            # Back-pressure as the device shows it: the byte waits in the TSR, TEMT is 0,
            # every refused write is counted, and the guest filled the FIFO behind it.
            assert view["reader_state"] == "stalled", view
            assert view["temt"] is False and view["tsr_busy"] is True, view
            assert view["tsr_retry"] > 0, view
            assert view["registers"]["lsr"]["value"] in ("0x00", "0x01"), view  # THRE=TEMT=0
            assert view["link"]["counters"]["bytes_discarded"] == 0, view
        # The guest's last 16-byte burst is all in the device: the head byte in the TSR, the
        # rest in the FIFO, and no THRE to let it write more.
        assert last["tx_fifo"] + int(last["tsr_busy"]) >= FIFO_SIZE, last
        # The guest's own LSR reads (its driver reads LSR while servicing the receive
        # interrupts of the other stream) saw TEMT=0 while the reader was stalled.
        assert seen_end[1] > seen_at[1], (seen_at, seen_end)
        final = _uart_status(d) if d.proc else {}
        measured = {
            "guest_to_far_bytes": len(guest.tx_data),
            "far_to_guest_bytes": len(far.tx_data),
            "far_received_before_drain": received_during_stall,
            "stalled_samples": len(samples),
            "stall_seen_after_s": round(seen_after_s, 2),
            "tsr_retry_max": max(s["tsr_retry"] for s in samples),
            "guest_lsr_reads_while_stalled": seen_end[0] - seen_at[0],
            "guest_lsr_temt0_while_stalled": seen_end[1] - seen_at[1],
            "guest_tx_bytes_accepted_while_stalled": seen_end[2] - seen_at[2],
            "refused_writes": final.get("counters", {}).get("refused_writes"),
        }
        record_property("stall", measured)
        print("stall:", measured)


# -- socat killed and restarted ---------------------------------------------------------------


@pytest.mark.parametrize("policy", ["buffer", "discard", "hold", "buffer+resume"])
def test_socat_killed_and_restarted_loses_only_what_socat_held(
    tmp_path: Path, policy: str, record_property: Any
) -> None:
    """socat SIGKILLed and restarted: only what socat held is lost, plus exactly the discards.

    How the loss is made exact, without stopping the traffic:

    - ``W``: the daemon's ``bytes_written`` counter (bytes the OS took from it) read while
      the link is disconnected. It cannot move then: ``buffer`` puts bytes in the backlog,
      ``discard`` counts them in ``bytes_discarded``; neither writes.
    - ``F``: what the far end had read from its pty when that pty hung up.
    - So ``guest_tx[F:W]`` is exactly what the OS had handed to the socat that died (its
      pty buffers and its own buffer), a loss no daemon can see or prevent.
    - ``D``: the final ``bytes_discarded``. Bytes leave the model in order, so the discarded
      ones are ``guest_tx[W:W+D]``, and every byte is either written or discarded:
      ``bytes_written + bytes_discarded == len(guest_tx)``.

    Asserted: the far end received exactly ``guest_tx[:F] + guest_tx[W+D:]`` (``D == 0``
    for ``buffer``), i.e. one gap at the kill, of ``W - F`` bytes held by socat plus ``D``
    counted discards. The other direction likewise: ``R`` = the daemon's ``bytes_read``
    while disconnected, ``S`` = what the OS had taken from the far end at the hang-up; the
    guest received exactly ``far_tx[:R] + far_tx[S:]``.

    ``hold``: the guest is back-pressured at once (TSR busy, ``tsr_retry`` counting), no
    backlog; same assertion with ``D == 0``.

    ``buffer+resume``: as ``buffer``, and while socat is dead (the backlog holding bytes)
    the daemon is stopped with ``checkpoint --stop`` and resumed from that file; the
    backlog travels in the checkpoint and is replayed when socat is back. Same assertion.
    """
    resume_while_gone = policy == "buffer+resume"
    policy = policy.removesuffix("+resume")
    uart = _uart(
        "uart0", tmp_path / "null-a", on_disconnect=policy,
        reconnect_min_s=0.05, reconnect_max_s=0.2,
    )
    with (
        socat_pair(tmp_path) as pair,
        daemon(tmp_path / "d", [uart], interval_s=0) as d,
    ):
        d.start()
        guest = SoakGuest(d.bus(), sequence_stream(STREAM_RECORDS, b"g"), rate_bytes_per_s=16000)
        far = SoakFarEnd(pair.b, sequence_stream(STREAM_RECORDS, b"f"), rate_bytes_per_s=16000)
        guest.start()
        far.start()
        try:
            _moved(guest, far, by=8192)
            # The far end stops reading until the ptys and socat hold some KB of the guest's
            # stream, so that the kill takes bytes with it (and likely tears a record).
            far.stall()
            wait_for(
                lambda: _uart_status(d)["link"]["counters"]["bytes_written"]
                >= len(far.received) + 4096,
                timeout_s=60.0, interval_s=0.02,
            )
            pair.stop(signal.SIGKILL)
            far.drain()  # reading again, the far end finds its pty hung up
            wait_for(far.gone.is_set, timeout_s=10.0)
            gone = wait_for(
                lambda: (u := _uart_status(d))["reader_state"] == "disconnected" and u,
                timeout_s=10.0,
            )
            written_at_kill = gone["link"]["counters"]["bytes_written"]
            read_at_kill = gone["link"]["counters"]["bytes_read"]
            # Let the guest go on writing into the disconnected link for a while.
            def held() -> dict[str, Any] | None:
                u = _uart_status(d)
                if policy == "buffer":
                    return u if u["link"]["tx_backlog_bytes"] >= 2048 else None
                if policy == "discard":
                    return u if u["link"]["counters"]["bytes_discarded"] >= 2048 else None
                # hold: the guest is back-pressured at once, nothing is kept outside the model
                return u if u["tsr_busy"] and u["tx_fifo"] and u["tsr_retry"] > 0 else None

            during = wait_for(held, timeout_s=60.0)
            assert during["reader_state"] == "disconnected"
            assert during["link"]["counters"]["bytes_written"] == written_at_kill
            if resume_while_gone:
                guest.pause()
                output = tmp_path / "while-gone.json"
                result = d.cli(
                    "checkpoint", "--stop", "--output", str(output),
                    "--config", str(d.config_path),
                )
                assert result.returncode == 0, result.stderr + d.log()
                assert d.wait_exit() == 0, d.log()
                d.proc = None
                d.start("resume", str(output))
                guest.resume()
                resumed = _uart_status(d)
                assert resumed["link"]["tx_backlog_bytes"] >= during["link"]["tx_backlog_bytes"]
                assert resumed["link"]["counters"]["bytes_written"] == written_at_kill
            pair.start()
            far.reopen()
            _moved(guest, far, by=8192)
            wait_finished(guest, far)
            hang = far.hangups[0]
            discarded = 0

            def complete() -> bool:
                nonlocal discarded
                guest.check()
                far.check()
                u = _uart_status(d)
                discarded = u["link"]["counters"]["bytes_discarded"]
                want_far = len(guest.tx_data) - (written_at_kill - hang.received) - discarded
                want_guest = len(far.tx_data) - (hang.sent - read_at_kill)
                return len(far.received) >= want_far and len(guest.received) >= want_guest

            wait_for(complete, timeout_s=120.0, interval_s=0.05)
            time.sleep(0.3)  # anything extra (a duplicate) would arrive now
            final = _uart_status(d)
        finally:
            guest.stop()
            far.stop()
        counters = final["link"]["counters"]
        guest_tx, far_tx = guest.tx_data, far.tx_data
        to_far, to_guest = bytes(far.received), bytes(guest.received)
        w, f, dsc = written_at_kill, hang.received, counters["bytes_discarded"]
        assert len(far.hangups) == 1
        assert counters["disconnects"] == 1, counters
        if not resume_while_gone:  # a resumed daemon's first open is not a reconnect
            assert counters["reconnects"] == 1, counters
        assert counters["bytes_written"] + dsc == len(guest_tx), counters
        if policy == "discard":
            assert dsc >= 2048, counters
        else:
            assert dsc == 0, counters
        if policy == "hold":
            assert during["link"]["tx_backlog_bytes"] == 0, during
        far_segs = segments(to_far, guest_tx)
        guest_segs = segments(to_guest, far_tx)
        assert to_far == guest_tx[:f] + guest_tx[w + dsc :], (
            f"guest → far end, expected one gap of {w - f} B (socat) + {dsc} B (discarded) "
            f"at {f}: {describe(far_segs, len(guest_tx))}"
        )
        assert to_guest == far_tx[:read_at_kill] + far_tx[hang.sent :], (
            f"far end → guest, expected one gap of {hang.sent - read_at_kill} B at "
            f"{read_at_kill}: {describe(guest_segs, len(far_tx))}"
        )
        # The same seen through the record framing alone (the analyser knows nothing of W/F):
        # at most one gap per direction, no duplication, nothing unplaced.
        far_gaps = gaps(far_segs, len(guest_tx))
        guest_gaps = gaps(guest_segs, len(far_tx))
        assert all(s.src is not None for s in far_segs + guest_segs)
        assert [g.delta for g in far_gaps] == ([w - f + dsc] if w - f + dsc else [])
        assert [g.delta for g in guest_gaps] == (
            [hang.sent - read_at_kill] if hang.sent - read_at_kill else []
        )
        measured = {
            "policy": policy + ("+resume" if resume_while_gone else ""),
            "guest_to_far_bytes": len(guest_tx),
            "far_to_guest_bytes": len(far_tx),
            "socat_held_guest_to_far": w - f,
            "socat_held_far_to_guest": hang.sent - read_at_kill,
            "bytes_discarded": dsc,
            "tx_backlog_peak_seen": during["link"]["tx_backlog_bytes"],
            "far_gaps": [(g.prev_end, g.delta) for g in far_gaps],
            "guest_gaps": [(g.prev_end, g.delta) for g in guest_gaps],
        }
        record_property("socat_kill", measured)
        print("socat kill:", measured)


# -- the daemon killed ------------------------------------------------------------------------


def _quiet(guest: SoakGuest, far: SoakFarEnd, d: Daemon) -> bool:
    """Both streams ended, everything sent has left every buffer between them."""
    guest.check()
    far.check()
    if guest.bus_lost.is_set() or guest.guest is None:
        return False
    if guest.guest.tx_queued or guest.offset < len(guest.tx_data):
        return False
    if far.offset < len(far.tx_data):
        return False
    u = _uart_status(d)
    return bool(
        u["temt"]
        and u["rx_fifo"] == 0
        and u["link"]["rx_backlog_bytes"] == 0
        and u["link"]["tx_backlog_bytes"] == 0
    )


@pytest.mark.parametrize("reader", ["reading", "stalled"])
def test_sigkill_resumes_from_the_periodic_checkpoint_and_reports_its_age(
    tmp_path: Path, reader: str, record_property: Any
) -> None:
    """SIGKILL mid-stream: restart resumes the periodic checkpoint, reports its age; loss bounded.

    What is asserted, precisely. Let C be the checkpoint the restart resumed from (the
    newest valid one when the daemon died; its generation is the one reported).

    - Age: C was written at most ``interval_s`` + 0.5 s (timer and write slack) before the
      kill; the restart logs "resumed from checkpoint" with ``after_crash=true`` and an
      ``age_s`` that is C's age at the restart, and ``status --json`` shows
      ``resumed_after_crash`` and ``resumed_from`` (generation, ``age_s``).
    - Guest → far end. ``T`` = the TX bytes C held (backlog, TSR, FIFO), which are
      ``guest_tx[w:w+len(T)]`` with ``w`` = C's ``bytes_written``. The far end received
      exactly ``guest_tx[:a] + T + guest_tx[g:]``: everything the dead daemon had handed
      to the OS (``a`` >= ``w``), then ``T`` again (the resumed device sends what it held),
      then the guest's stream from where its driver stood. Repeated: the part of ``T``
      already in ``guest_tx[:a]`` (<= len(T) <= 17). Lost: ``g - max(a, w+len(T))`` bytes,
      those the guest wrote after C that had not reached the OS at the kill: at most
      FIFO_SIZE + 1 (what the TSR and FIFO can hold, or one unexecuted 16-byte burst).
    - Far end → guest. ``R`` = C's RX FIFO + RX backlog = ``far_tx[r-len(R):r]`` with ``r``
      = C's ``bytes_read``. The guest received exactly ``far_tx[:a'] + R + far_tx[g':]``.
      Repeated: the part of ``R`` the guest had already read (<= len(R)). Lost:
      ``g' - max(a', r)``: read from the port after C but not yet delivered to the guest
      at the kill, at most FIFO_SIZE + rx_backlog_bytes.

    The guest (like an emulator whose VM keeps running) reconnects after the restart and
    writes IER again from its own copy; it is not rolled back, so the loss above is real
    and is what the reported age bounds.

    With ``reader="stalled"`` the far end stops reading before the kill and C is taken
    while the reader is stalled, so C holds the byte stuck in the TSR and the FIFO behind
    it (``T`` is not empty): the resumed device must deliver them, within the same bounds.
    """
    interval_s = 0.5
    rx_backlog_bytes = 4096
    with (
        socat_pair(tmp_path) as pair,
        daemon(
            tmp_path / "d",
            [_uart("uart0", pair.a, rx_backlog_bytes=rx_backlog_bytes)],
            interval_s=interval_s,
        ) as d,
    ):
        d.start()
        guest = SoakGuest(
            d.bus(), sequence_stream(STREAM_RECORDS, b"g"),
            rate_bytes_per_s=16000 if reader == "reading" else None, survive_crash=True,
        )
        far = SoakFarEnd(pair.b, sequence_stream(STREAM_RECORDS, b"f"), rate_bytes_per_s=16000)
        guest.start()
        far.start()
        try:
            _moved(guest, far)
            wait_for(lambda: _uart_status(d)["last_checkpoint"] is not None, timeout_s=10.0)
            _moved(guest, far)
            if reader == "stalled":
                far.stall()
                stalled = wait_for(
                    lambda: (u := _uart_status(d))["reader_state"] == "stalled"
                    and u["tsr_busy"] and u["last_checkpoint"] and u,
                    timeout_s=60.0, interval_s=0.05,
                )
                generation = stalled["last_checkpoint"]["generation"]
                wait_for(  # a periodic checkpoint taken while stalled
                    lambda: _uart_status(d)["last_checkpoint"]["generation"] > generation,
                    timeout_s=10.0, interval_s=0.05,
                )
            killed_unix_ns = time.time_ns()
            killed_at = time.monotonic()
            d.stop(signal.SIGKILL)
            found = latest_checkpoint(d.state_dir, "uart0")
            assert found is not None
            ckpt, ckpt_path = found
            age_at_kill_s = (killed_unix_ns - ckpt.meta.created_unix_ns) / 1e9
            wait_for(guest.bus_lost.is_set, timeout_s=10.0)
            d.start()
            ready_at = time.monotonic()
            guest.resume()
            status = d.status()  # the real `status --json`
            far.drain()
            _moved(guest, far)
            wait_finished(guest, far)
            wait_for(lambda: _quiet(guest, far, d), timeout_s=120.0, interval_s=0.05)
            time.sleep(0.3)
        finally:
            guest.stop()
            far.stop()
        # -- the report of the resume
        assert age_at_kill_s <= interval_s + 0.5, age_at_kill_s
        resumed = log_events(d.log(), "resumed from checkpoint")
        assert len(resumed) == 1, d.log()
        event = resumed[0]
        assert event["after_crash"] is True and event["generation"] == ckpt.meta.generation
        assert event["path"] == str(ckpt_path)
        restart_s = ready_at - killed_at
        assert age_at_kill_s - 0.05 <= event["age_s"] <= age_at_kill_s + restart_s + 0.05, (
            event, age_at_kill_s, restart_s,
        )
        assert status["resumed_after_crash"] is True
        rf = status["uarts"][0]["resumed_from"]
        assert rf["generation"] == ckpt.meta.generation and rf["age_s"] >= event["age_s"], rf
        # -- guest → far end
        guest_tx, far_tx = guest.tx_data, far.tx_data
        tx_held = ckpt.port.tx_backlog + ckpt.uart.tx_waiting()
        w = ckpt.port.counters.bytes_written
        assert ckpt.port.tx_backlog == b""  # the reader was connected throughout
        if reader == "stalled":
            assert ckpt.uart.tsr_busy and ckpt.uart.tsr_retry > 0, ckpt.uart
        assert tx_held == guest_tx[w : w + len(tx_held)]
        to_far = bytes(far.received)
        split = rollback_split(to_far, guest_tx, tx_held)
        assert split is not None, describe(segments(to_far, guest_tx), len(guest_tx))
        a, g = split.prefix, split.resume_at
        assert a >= w
        tx_repeated = max(0, min(a, w + len(tx_held)) - w)
        tx_lost = g - max(a, w + len(tx_held))
        assert 0 <= tx_lost <= FIFO_SIZE + 1, (tx_lost, split)
        # -- far end → guest
        rx_held = ckpt.uart.rx_fifo + ckpt.port.rx_backlog
        r = ckpt.port.counters.bytes_read
        assert rx_held == far_tx[r - len(rx_held) : r]
        to_guest = bytes(guest.received)
        rsplit = rollback_split(to_guest, far_tx, rx_held)
        assert rsplit is not None, describe(segments(to_guest, far_tx), len(far_tx))
        a2, g2 = rsplit.prefix, rsplit.resume_at
        assert a2 >= r - len(rx_held)
        rx_repeated = max(0, min(a2, r) - (r - len(rx_held)))
        rx_lost = g2 - max(a2, r)
        assert 0 <= rx_lost <= FIFO_SIZE + rx_backlog_bytes, (rx_lost, rsplit)
        measured = {
            "reader": reader,
            "guest_to_far_bytes": len(guest_tx),
            "far_to_guest_bytes": len(far_tx),
            "checkpoint_age_at_kill_s": round(age_at_kill_s, 3),
            "reported_age_s": event["age_s"],
            "restart_s": round(restart_s, 3),
            "tx_held_in_checkpoint": len(tx_held),
            "tx_repeated": tx_repeated,
            "tx_lost": tx_lost,
            "rx_held_in_checkpoint": len(rx_held),
            "rx_repeated": rx_repeated,
            "rx_lost": rx_lost,
            "far_picture": describe(segments(to_far, guest_tx), len(guest_tx)),
            "guest_picture": describe(segments(to_guest, far_tx), len(far_tx)),
        }
        record_property("sigkill", measured)
        print("sigkill:", measured)


# -- hostile peers beside a healthy UART --------------------------------------------------------


def _bus_connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(path))
    return s


def _read_until_closed(s: socket.socket, limit_s: float = 10.0) -> bytes:
    data = b""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _error_code(reply: bytes) -> int | None:
    """The code of the first ERROR frame in ``reply`` (skipping other frames), if any."""
    pos = 0
    while pos + 3 <= len(reply):
        (length,) = struct.unpack_from(">H", reply, pos)
        kind = reply[pos + 2]
        if kind == FrameType.ERROR:
            return reply[pos + 3] if pos + 3 < len(reply) else None
        pos += 2 + length
    return None


class Hostile:
    """Hostile clients of one daemon, run on a thread; each outcome is recorded."""

    def __init__(self, d: Daemon, target_bus: Path, guarded_bus: Path) -> None:
        self.d = d
        self.target = target_bus
        self.guarded = guarded_bus
        self.outcomes: dict[str, Any] = {}
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join(120)
        assert not self._thread.is_alive(), "hostile clients did not finish"
        if self.error is not None:
            raise AssertionError(f"hostile thread failed: {self.error!r}") from self.error

    def _run(self) -> None:
        try:
            for _ in range(2):
                self._round()
        except BaseException as exc:
            self.error = exc

    def _count(self, key: str, value: Any) -> None:
        self.outcomes.setdefault(key, []).append(value)

    def _round(self) -> None:
        rng = os.urandom
        # 1. Garbage on the target bus.
        with _bus_connect(self.target) as s:
            s.sendall(rng(4096))
            self._count("garbage", _error_code(_read_until_closed(s)))
        # 2. A header announcing a huge frame.
        with _bus_connect(self.target) as s:
            s.sendall(struct.pack(">HB", 0xFFFF, FrameType.WRITE_N) + b"\x00" * 100)
            self._count("huge_length", _error_code(_read_until_closed(s)))
        # 3. A valid max-size header and then half of the frame, held open for a while; a
        #    second client meanwhile is refused (the holder has the slot), then EOF.
        with _bus_connect(self.target) as s:
            s.sendall(encode(Hello(1)) + struct.pack(">HB", MAX_FRAME_LEN, FrameType.WRITE_N))
            s.sendall(b"\x00" * 1000)
            with _bus_connect(self.target) as other:
                self._count("busy_while_held", _error_code(_read_until_closed(other)))
            time.sleep(0.5)
            s.shutdown(socket.SHUT_WR)
            self._count("half_frame_eof", _error_code(_read_until_closed(s)))
        # 4. A flood of READs whose replies are never read, for 2 s, then a hard close.
        s = _bus_connect(self.target)
        s.setblocking(False)
        read_frame = encode(Read(RBR))
        pending = encode(Hello(1)) + read_frame * 20_000
        sent = 0
        deadline = time.monotonic() + 2.0
        blocked = 0
        try:
            while time.monotonic() < deadline:
                if len(pending) < 16_000:
                    pending += read_frame * 4000  # whole frames: the stream stays well formed
                try:
                    k = s.send(pending)
                except BlockingIOError:
                    blocked += 1
                    time.sleep(0.01)
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += k
                pending = pending[k:]
        finally:
            s.close()
        self._count("flood_bytes_sent", sent)
        self._count("flood_send_blocked", blocked)
        # 5. A client on the *healthy* UART's bus: refused, the healthy guest keeps its slot.
        with _bus_connect(self.guarded) as s:
            s.sendall(encode(Hello(1)) + rng(512))
            self._count("guarded_bus", _error_code(_read_until_closed(s)))
        # 6. Garbage on the control socket.
        for line in (
            b"not json\n", b"[1, 2]\n", b'{"cmd": "explode"}\n', b"\xff\xfe\x00garbage\n",
            b'{"cmd": "checkpoint", "uart": 7}\n', b'{"cmd": "checkpoint", "stop": "yes"}\n',
            b"x" * 200_000 + b"\n",
        ):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.settimeout(10)
                c.connect(str(self.d.control))
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    c.sendall(line)
                reply = _read_until_closed(c)
                self._count("control", reply[:60])
        # 7. Control connections that send half a line and hang, and many that just close.
        idle = []
        for _ in range(5):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(str(self.d.control))
            c.sendall(b'{"cmd": "sta')
            idle.append(c)
        for _ in range(50):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.connect(str(self.d.control))
        # A real status request still gets its answer while those hang.
        self._count("status_while_idle", control_status(self.d.control)["uarts"][1]["name"])
        for c in idle:
            c.close()


def test_hostile_bus_and_control_clients_leave_a_healthy_uart_untouched(
    tmp_path: Path, record_property: Any
) -> None:
    """Garbage, huge lengths, half frames, READ floods and control garbage: healthy UART exact."""
    with (
        socat_pair(tmp_path, "good") as good,
        socat_pair(tmp_path, "bad") as bad,
        daemon(
            tmp_path / "d", [_uart("uart0", good.a), _uart("uart1", bad.a)], interval_s=0
        ) as d,
    ):
        d.start()
        guest = SoakGuest(d.bus("uart0"), sequence_stream(STREAM_RECORDS, b"g"),
                          rate_bytes_per_s=16000)
        far = SoakFarEnd(good.b, sequence_stream(STREAM_RECORDS, b"f"), rate_bytes_per_s=16000)
        guest.start()
        far.start()
        hostile = Hostile(d, d.bus("uart1"), d.bus("uart0"))
        try:
            _moved(guest, far)
            hostile.start()
            hostile.join()
            _moved(guest, far)
            wait_finished(guest, far)
            wait_streams(guest, far, timeout_s=120.0)
            assert_exact(bytes(far.received), guest.tx_data, "healthy guest → far end")
            assert_exact(bytes(guest.received), far.tx_data, "healthy far end → guest")
        finally:
            guest.stop()
            far.stop()
        out = hostile.outcomes
        assert out["garbage"] and all(c is not None for c in out["garbage"]), out
        assert set(out["huge_length"]) == {ErrorCode.FRAME_TOO_LARGE}, out
        assert set(out["busy_while_held"]) == {ErrorCode.BUSY}, out
        assert set(out["half_frame_eof"]) == {ErrorCode.MALFORMED}, out
        assert set(out["guarded_bus"]) == {ErrorCode.BUSY}, out
        assert all(b'"ok": false' in r for r in out["control"]), out["control"]
        assert out["status_while_idle"] == ["uart1", "uart1"], out
        # The READ flood was held back: the server stopped reading once its replies piled up.
        assert all(n > 0 for n in out["flood_send_blocked"]), out
        # The daemon still serves both UARTs: uart1 takes a new guest once the flood is gone.
        assert d.proc is not None and d.proc.poll() is None

        def uart1_usable() -> bool:
            try:
                with BusClient(d.bus("uart1"), timeout_s=5) as client:
                    client.write(SCR, 0x5A)
                    return client.read(SCR) == 0x5A
            except BusError:
                return False

        wait_for(uart1_usable, timeout_s=60.0, interval_s=0.2)
        status = d.status()
        assert [u["name"] for u in status["uarts"]] == ["uart0", "uart1"]
        assert status["uarts"][0]["link"]["counters"]["bytes_discarded"] == 0
        measured = {
            "guest_to_far_bytes": len(guest.tx_data),
            "far_to_guest_bytes": len(far.tx_data),
            "flood_bytes_sent": out["flood_bytes_sent"],
            "flood_send_blocked": out["flood_send_blocked"],
            "garbage_codes": out["garbage"],
        }
        record_property("hostile", measured)
        print("hostile:", measured)
