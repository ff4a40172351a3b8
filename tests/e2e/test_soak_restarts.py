"""Zero-loss soak: many checkpoint/resume and SIGTERM/run cycles under two-way traffic.

Both streams are sequence-numbered records (streams.sequence_stream). The guest is the
reference 8250 driver over the bus; the far end reads and writes the other socat pty the
whole time, the daemon's downtime included (what it writes then waits in the ptys, where
the next daemon reads it). Every cycle waits until both directions moved since the last
one, so each checkpoint is taken with bytes on the move (the RX FIFO and backlog fill while
the guest is paused); the last STALLED_CYCLES run with the far end not reading, so those
checkpoints carry the byte stuck in the TSR and the TX FIFO behind it. At the end both
streams must be exact: nothing lost, nothing duplicated, order kept.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from faultkit import SoakFarEnd, SoakGuest, control_status, log_events, wait_finished
from procs import Daemon, daemon, socat_pair, wait_for
from streams import assert_exact, sequence_stream, wait_streams

from uartbridge.checkpoint import checkpoint_path, read_checkpoint

pytestmark = pytest.mark.e2e

RATE_BYTES_PER_S = 16_000  # each way; the guest's own pace is the limit on a slow machine
STREAM_RECORDS = 300_000  # far more than the cycles take: the streams are ended by finish()
STALLED_CYCLES = 5  # the last cycles run with the far end not reading: TSR and FIFO full


def _uart(link: Path) -> dict[str, object]:
    return {"name": "uart0", "port": str(link)}


def _wait_both_moved(guest: SoakGuest, far: SoakFarEnd, since: tuple[int, int]) -> None:
    """Until the far end got new guest bytes and the guest got new far-end bytes."""

    def moved() -> bool:
        guest.check()
        far.check()
        return len(far.received) > since[0] + 256 and len(guest.received) > since[1] + 256

    wait_for(moved, timeout_s=30.0)


def _in_flight(path: Path) -> dict[str, int]:
    """What a checkpoint file holds of the two streams."""
    ckpt = read_checkpoint(path)
    return {
        "tx": len(ckpt.uart.tx_waiting()) + len(ckpt.port.tx_backlog),
        "rx": len(ckpt.uart.rx_fifo) + len(ckpt.port.rx_backlog),
    }


def _wait_stalled(d: Daemon) -> dict[str, Any]:
    """Until the daemon reports the reader stalled with a byte stuck in the TSR."""

    def stalled() -> dict[str, Any] | None:
        uart: dict[str, Any] = control_status(d.control)["uarts"][0]
        return uart if uart["reader_state"] == "stalled" and uart["tsr_busy"] else None

    found: dict[str, Any] = wait_for(stalled, timeout_s=60.0, interval_s=0.05)
    return found


def _run_streams(d: Daemon, pair_b: Path, cycle: Any, cycles: int) -> dict[str, int]:
    """Run both streams through ``cycles`` cycles; the last STALLED_CYCLES with a stalled reader.

    Before each stalled cycle the daemon must report the reader stalled and a byte in the
    TSR, so that those checkpoints carry the shift register, a full TX FIFO and the retry
    count — and the resumed daemon must deliver them exactly once.
    """
    guest_tx = sequence_stream(STREAM_RECORDS, b"g")
    far_tx = sequence_stream(STREAM_RECORDS, b"f")
    guest = SoakGuest(d.bus(), guest_tx, rate_bytes_per_s=RATE_BYTES_PER_S)
    far = SoakFarEnd(pair_b, far_tx, rate_bytes_per_s=RATE_BYTES_PER_S)
    guest.start()
    far.start()
    totals = {"cycles_tx_in_flight": 0, "cycles_rx_in_flight": 0}
    try:
        for n in range(cycles):
            if n == cycles - STALLED_CYCLES:
                far.stall()
            if n >= cycles - STALLED_CYCLES:
                _wait_stalled(d)
            else:
                _wait_both_moved(guest, far, (len(far.received), len(guest.received)))
            guest.pause()
            held = cycle(n)
            guest.resume()
            totals["cycles_tx_in_flight"] += bool(held["tx"])
            totals["cycles_rx_in_flight"] += bool(held["rx"])
        far.drain()
        _wait_both_moved(guest, far, (len(far.received), len(guest.received)))
        wait_finished(guest, far)
        wait_streams(guest, far, timeout_s=120.0)
        assert_exact(bytes(far.received), guest.tx_data, "guest → far end")
        assert_exact(bytes(guest.received), far.tx_data, "far end → guest")
        totals["guest_to_far_bytes"] = len(guest.tx_data)
        totals["far_to_guest_bytes"] = len(far.tx_data)
    finally:
        guest.stop()
        far.stop()
    return totals


def test_fifty_checkpoint_stop_resume_cycles_lose_and_duplicate_nothing(
    tmp_path: Path, record_property: Any
) -> None:
    """50 × `checkpoint --stop` + `resume` under two-way traffic: both streams exact."""
    with (
        socat_pair(tmp_path) as pair,
        daemon(tmp_path / "d", [_uart(pair.a)], interval_s=0) as d,
    ):
        d.start()

        def cycle(n: int) -> dict[str, int]:
            output = tmp_path / f"cycle{n}.json"
            result = d.cli(
                "checkpoint", "--stop", "--output", str(output), "--config", str(d.config_path)
            )
            assert result.returncode == 0, result.stderr + d.log()
            assert d.wait_exit() == 0, d.log()
            d.proc = None
            d.start("resume", str(output))
            return _in_flight(output)

        totals = _run_streams(d, pair.b, cycle, 50)
        status = control_status(d.control)["uarts"][0]
        assert status["link"]["counters"]["bytes_discarded"] == 0
        assert status["counters"]["tx_dropped"] == 0
        totals["daemon_runs"] = d.runs
        record_property("soak", totals)
        print("checkpoint/resume soak:", totals)
        # The soak is only worth something if the checkpoints carried bytes in flight.
        assert totals["cycles_rx_in_flight"] > 0, totals
        assert totals["cycles_tx_in_flight"] >= STALLED_CYCLES, totals


def test_twenty_sigterm_run_cycles_lose_and_duplicate_nothing(
    tmp_path: Path, record_property: Any
) -> None:
    """20 × SIGTERM + `run` (systemctl restart) under two-way traffic: both streams exact."""
    with (
        socat_pair(tmp_path) as pair,
        daemon(tmp_path / "d", [_uart(pair.a)], interval_s=0) as d,
    ):
        d.start()
        state_file = checkpoint_path(d.state_dir, "uart0")

        def cycle(n: int) -> dict[str, int]:
            assert d.stop(signal.SIGTERM) == 0, d.log()
            held = _in_flight(state_file)
            d.start()
            resumed = log_events(d.log(), "resumed from checkpoint")
            assert len(resumed) == 1 and resumed[0]["after_crash"] is False, d.log()
            return held

        totals = _run_streams(d, pair.b, cycle, 20)
        totals["daemon_runs"] = d.runs
        record_property("soak", totals)
        print("SIGTERM/run soak:", totals)
        assert totals["cycles_rx_in_flight"] > 0, totals
        assert totals["cycles_tx_in_flight"] >= STALLED_CYCLES, totals
