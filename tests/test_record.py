"""Record and replay: a recorded run, re-run on a fresh model with no port, is identical.

Hypothesis-generated runs on the model (both paces, time moving, the wire refusing), the
daemon's ``--record`` with the reference driver (``Guest8250``) through a real socat pty, a
``Bridge(record=...)`` in-process, and the firmware board's scripted run: each replay gives
every register value, IRQ edge and transmitted byte the recording saw. A damaged recording
is a divergence (exit 1) or refused (exit 65), never a silent pass.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import REPO, daemon, socat_pair, stop_process, wait_for
from test_board import COMMAND, PROMPT, TIMEOUT_S, Console
from test_board import firmware as firmware  # the board's firmware: skip/fail fixture
from test_board import requirements as requirements  # the board's skip/fail fixture

from tests.vectors import FakeClock
from uartbridge.client import BusClient
from uartbridge.errors import RecordingError
from uartbridge.guest import Guest8250
from uartbridge.record import EXIT_DIVERGED, READ, RecordingUart, RecordWriter, replay
from uartbridge.uart import Pace

THR = RBR = 0
IER, IIR, FCR, LCR, MCR, LSR, MSR = 1, 2, 2, 3, 4, 5, 6

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 7), st.integers(0, 255)),
        st.tuples(st.just("read"), st.integers(0, 7), st.integers(1, 3)),
        # A polling guest: the same register read again and again as time goes by (timers
        # fall due in the middle: what a fold of identical reads must not hide).
        st.tuples(st.just("spin"), st.sampled_from([RBR, IIR, LSR, MSR]),
                  st.integers(2, 40), st.integers(1, 200_000)),
        st.tuples(st.just("thr"), st.binary(min_size=1, max_size=20)),
        st.tuples(st.just("rx"), st.binary(min_size=1, max_size=30)),
        st.tuples(st.just("wait"), st.integers(0, 3 * 10**6)),
        st.tuples(st.just("wire"), st.sampled_from(["take", "refuse"])),
        st.tuples(st.just("break"), st.just(0)),
        st.tuples(st.just("error"), st.sampled_from([(True, False), (False, True)])),
        st.tuples(st.just("modem"), st.integers(0, 15)),
        st.tuples(st.just("poll"), st.just(0)),
        st.tuples(st.just("reset"), st.just(0)),
    ),
    max_size=60,
)


def drive(
    uart: RecordingUart, clock: FakeClock, ops: list[tuple[object, ...]]
) -> dict[str, object]:
    """Apply ``ops`` to a recording device; what a live observer saw."""
    reads: list[int] = []
    sent = bytearray()
    edges = uart.irq_edges
    for op in ops:
        kind = op[0]
        if kind == "write":
            uart.write(int(op[1]), int(op[2]))  # type: ignore[call-overload]
        elif kind == "read":
            reads += [uart.read(int(op[1])) for _ in range(int(op[2]))]  # type: ignore[call-overload]
        elif kind == "spin":
            for _ in range(int(op[2])):  # type: ignore[call-overload]
                reads.append(uart.read(int(op[1])))  # type: ignore[call-overload]
                clock.advance(int(op[3]))  # type: ignore[call-overload]
        elif kind == "thr":
            for byte in op[1]:  # type: ignore[attr-defined]
                uart.write(THR, byte)
        elif kind == "rx":
            uart.receive(op[1])  # type: ignore[arg-type]
        elif kind == "wait":
            clock.advance(int(op[1]))  # type: ignore[call-overload]
        elif kind == "wire":
            pending = uart.tx_pending()
            if pending and op[1] == "take":
                uart.tx_sent(len(pending))
                sent += pending
            elif pending:
                uart.tx_blocked()
        elif kind == "break":
            uart.receive_break()
        elif kind == "error":
            parity, framing = op[1]  # type: ignore[misc]
            uart.receive_line_error(parity=parity, framing=framing)
        elif kind == "modem":
            levels = int(op[1])  # type: ignore[call-overload]
            uart.set_modem_inputs(cts=bool(levels & 1), dsr=bool(levels & 2),
                                  ri=bool(levels & 4), dcd=bool(levels & 8))
        elif kind == "poll":
            uart.poll()
        elif kind == "reset":
            uart.reset()
    return {"reads": len(reads), "tx": bytes(sent), "edges": uart.irq_edges - edges}


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(OPS, st.sampled_from(["none", "line"]), st.integers(0, 10**15))
def test_generated_runs_replay_identically(
    tmp_path: Path, ops: list[tuple[object, ...]], pace: Pace, start_ns: int
) -> None:
    """Any run of inputs on the model (either pace), recorded, replays with the same values,
    IRQ edges and bytes — and the replay counts exactly what a live observer saw."""
    path = tmp_path / "run.ubrec"
    clock = FakeClock()
    clock.advance(start_ns)
    writer = RecordWriter(path)
    uart = RecordingUart(clock=clock, pace=pace)
    uart.write(FCR, 0x07)  # before the recording: part of its initial state
    uart.start_recording(writer, "uart0", clock="custom")
    live = drive(uart, clock, ops)
    writer.close()
    report = replay(path)
    assert report.identical, report.divergence
    (stream,) = report.streams.values()
    assert (stream.reads, stream.irq_edges, stream.pace) == (live["reads"], live["edges"], pace)
    assert stream.tx_bytes == len(live["tx"])  # type: ignore[arg-type]


def test_a_polling_guest_costs_a_record_per_change_not_per_read(tmp_path: Path) -> None:
    """10 000 LSR polls that see nothing change are one record; the replay still reads 10 000
    times and checks each."""
    sizes = []
    for polls in (0, 10_000):
        path = tmp_path / f"poll-{polls}.ubrec"
        clock = FakeClock()
        writer = RecordWriter(path)
        uart = RecordingUart(clock=clock)
        uart.start_recording(writer, "uart0")
        for _ in range(polls):
            clock.advance(1_000)
            assert uart.read(LSR) == 0x60
        writer.close()
        sizes.append(path.stat().st_size)
    assert sizes[1] - sizes[0] <= 12  # READ_RUN: kind, offset, dt, value, count
    report = replay(path)
    assert report.identical and report.streams[0].reads == 10_000


def test_a_timer_firing_in_a_poll_loop_is_not_folded_away(tmp_path: Path) -> None:
    """An LSR poll loop during which the receive timeout raises the IRQ: LSR reads the same
    all along, but the read that saw the edge is recorded on its own, so the replay raises
    the edge at the same read (folding it into the run would move it)."""
    path = tmp_path / "cti.ubrec"
    clock = FakeClock()
    writer = RecordWriter(path)
    uart = RecordingUart(clock=clock)
    uart.start_recording(writer, "uart0")
    uart.write(FCR, 0x81)  # trigger 8
    uart.write(IER, 0x01)
    uart.receive(b"xy")
    lsr = {uart.read(LSR) for _ in range(3)}
    for _ in range(60):
        clock.advance(100_000)  # 6 ms in all: CTI (4.17 ms) falls due in the middle
        lsr.add(uart.read(LSR))
    assert lsr == {0x61} and uart.irq
    writer.close()
    report = replay(path)
    assert report.identical, report.divergence
    assert report.streams[0].irq_edges == 1 and report.streams[0].reads == 63


def _flip_first_read(path: Path) -> None:
    """Change the value of the first single READ of LSR in the file (a damaged recording)."""
    from uartbridge.record import _Reader

    with open(path, "rb") as f:
        reader = _Reader(f, str(path))
        reader.header()
        first = next(r for r in reader.records() if r.kind == READ and r.args[0] == LSR)
    data = bytearray(path.read_bytes())
    assert data[first.offset_bytes] == READ | LSR
    data[first.offset_bytes + 2] ^= 0x01  # kind, a one-byte time delta, the value
    path.write_bytes(bytes(data))


def test_a_damaged_recording_diverges_and_names_the_record(tmp_path: Path) -> None:
    """One recorded value changed: `uartbridge replay` exits 1 and names the record, the
    register and both values; `--print` shows what ran up to there."""
    path = tmp_path / "run.ubrec"
    clock = FakeClock()
    writer = RecordWriter(path)
    uart = RecordingUart(clock=clock)
    uart.start_recording(writer, "uart0")
    uart.write(FCR, 0x07)
    uart.write(MCR, 0x10)
    uart.write(THR, 0x41)
    clock.advance(10)
    uart.read(LSR)
    uart.read(RBR)
    writer.close()
    ok = subprocess.run([sys.executable, "-m", "uartbridge", "replay", str(path)],
                        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert ok.returncode == 0 and "identical" in ok.stdout, ok.stdout + ok.stderr
    _flip_first_read(path)
    bad = subprocess.run([sys.executable, "-m", "uartbridge", "replay", "--print", str(path)],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert bad.returncode == EXIT_DIVERGED, bad.stdout + bad.stderr
    assert "DIVERGED at record 3" in bad.stdout
    assert "READ LSR: recorded 0x60, replayed 0x61" in bad.stdout
    assert "uart0 " in bad.stdout and "WRITE THR 0x41" in bad.stdout


def test_files_that_are_not_recordings_are_refused(tmp_path: Path) -> None:
    """Not a recording: 65 with one line; missing: 66; a newer version: 65 naming it; a
    recording cut inside a record replays what it holds and says so (exit 0)."""

    def run(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "uartbridge", "replay", str(path)],
                              capture_output=True, text=True, timeout=60, cwd=REPO)

    junk = tmp_path / "junk"
    junk.write_bytes(b"hello")
    done = run(junk)
    assert done.returncode == 65 and "not a uartbridge recording" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert run(tmp_path / "missing").returncode == 66
    newer = tmp_path / "newer"
    newer.write_bytes(b"UBREC\x00\x07")
    done = run(newer)
    assert done.returncode == 65 and "format version 7" in done.stderr
    path = tmp_path / "cut.ubrec"
    clock = FakeClock()
    writer = RecordWriter(path)
    uart = RecordingUart(clock=clock)
    uart.start_recording(writer, "uart0")
    uart.write(SCR := 7, 0x5A)
    assert uart.read(SCR) == 0x5A
    writer.close()
    data = path.read_bytes()
    path.write_bytes(data[:-3])  # the END and the READ's last bytes are gone
    done = run(path)
    assert done.returncode == 0 and "ends inside a record" in done.stdout
    bogus = tmp_path / "bogus.ubrec"
    bogus.write_bytes(data[:-1] + b"\x77\x00")
    with pytest.raises(RecordingError, match="unknown record kind 0x77"):
        replay(bogus)


def test_the_daemon_records_guest8250_over_a_socat_pty_and_it_replays(tmp_path: Path) -> None:
    """`uartbridge run --record`: the reference driver probes, starts up at 9600 with line-rate
    pacing (slow enough that a driver on the bus keeps up: nothing overruns), writes and reads
    through a real socat pty while the far end answers; after the daemon stops, `uartbridge
    replay` is identical, and the bytes it says the device sent and received are the far
    end's."""
    record = tmp_path / "run.ubrec"
    with socat_pair(tmp_path) as pair, daemon(
        tmp_path / "d", [{"name": "uart0", "port": str(pair.a), "pace": "line"}]
    ) as d:
        d.start("run", "--record", str(record))
        far = os.open(pair.b, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        got = bytearray()
        try:
            with BusClient(d.bus()) as client:
                guest = Guest8250(client)
                assert guest.probe() == ("16550A", 16)
                guest.startup(9600)
                message = b"the guest speaks at line rate " * 4
                guest.write(message)
                assert guest.drain(20)

                def far_read() -> bool:
                    with contextlib.suppress(BlockingIOError):
                        got.extend(os.read(far, 4096))
                    return len(got) >= len(message)

                wait_for(far_read, 20.0)
                assert bytes(got) == message
                answer = bytes(range(256))
                received = bytearray()
                deadline = time.monotonic() + 60
                # Eight bytes at a time, the next once they are read: the 16-byte FIFO never
                # fills. Sent at once, 256 bytes at line rate overrun (as on the chip) a guest
                # that a loaded machine does not schedule for 16 character times (17 ms).
                for start in range(0, len(answer), 8):
                    os.write(far, answer[start : start + 8])
                    while len(received) < start + 8 and time.monotonic() < deadline:
                        guest.service(0.05)
                        received += guest.read()
                assert bytes(received) == answer
        finally:
            os.close(far)
        assert d.stop() == 0
    done = subprocess.run([sys.executable, "-m", "uartbridge", "replay", str(record)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "identical" in done.stdout and "pace line" in done.stdout
    report = replay(record)
    stream = report.streams[0]
    assert report.ended and stream.tx_bytes == len(message) and stream.rx_bytes == len(answer)
    assert stream.irq_edges > 0 and record.stat().st_mode & 0o777 == 0o600


def test_a_bridge_records_in_process(tmp_path: Path) -> None:
    """``Bridge(record=...)``: an emulator's run through a socat pty, replayed identically."""
    from _port_support import raw_peer, read_available

    from uartbridge.embed import Bridge

    record = tmp_path / "bridge.ubrec"
    with socat_pair(tmp_path) as s, raw_peer(s.b) as far, \
            Bridge(str(s.a), record=record) as br:
        br.write(LCR, 0x03)
        br.write(FCR, 0x87)
        br.write(IER, 0x01)
        for value in b"ping":
            while not br.read(LSR) & 0x20:
                br.poll(0.01)
            br.write(THR, value)
        got = bytearray()
        wait_for(lambda: got.extend(read_available(far)) or len(got) >= 4, 10.0)
        os.write(far, b"pong")
        echoed = bytearray()
        deadline = time.monotonic() + 10
        while len(echoed) < 4 and time.monotonic() < deadline:
            br.poll(0.01)
            while br.read(LSR) & 0x01:
                echoed.append(br.read(RBR))
        assert bytes(got) == b"ping" and bytes(echoed) == b"pong"
    report = replay(record)
    assert report.identical and report.ended
    assert (report.streams[0].tx_bytes, report.streams[0].rx_bytes) == (4, 4)


BOARD = REPO / "examples" / "unicorn_riscv" / "board.py"


def test_the_firmware_boards_scripted_run_replays(firmware: None, tmp_path: Path) -> None:
    """The unicorn board (OpenSBI, U-Boot) recording its console Bridge: boot to the prompt,
    a typed command, its output; the replay is identical, and the bytes it sent are exactly
    what the console received."""
    record = tmp_path / "board.ubrec"
    with socat_pair(tmp_path) as s:
        console = Console(s.b)
        proc = subprocess.Popen(
            [sys.executable, str(BOARD), "--port", str(s.a), "--record", str(record)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            console.read_until(PROMPT, after=0, timeout_s=TIMEOUT_S)
            typed_at = len(console.transcript)
            console.type(COMMAND)
            console.read_until(PROMPT, after=typed_at, timeout_s=TIMEOUT_S)
            assert stop_process(proc, signal.SIGTERM, timeout_s=30) == 0
        finally:
            if proc.poll() is None:
                stop_process(proc, signal.SIGKILL)
            os.close(console.fd)
    report = replay(record)
    assert report.identical, report.divergence
    stream = report.streams[0]
    assert stream.tx_bytes == len(console.transcript)
    assert stream.rx_bytes == len(COMMAND)
    print(f"board recording: {record.stat().st_size} bytes for {stream.operations} operations "
          f"({stream.reads} register reads)")


def test_two_uarts_share_one_recording(tmp_path: Path) -> None:
    """Two devices on one writer, their operations interleaved (and on clocks of their own):
    two streams, each replayed on its own model, identical."""
    path = tmp_path / "two.ubrec"
    writer = RecordWriter(path)
    clocks = [FakeClock(), FakeClock()]
    clocks[1].advance(10**12)
    uarts = [RecordingUart(clock=clocks[0]), RecordingUart(clock=clocks[1], pace="line")]
    for i, uart in enumerate(uarts):
        uart.start_recording(writer, f"u{i}")
    for step in range(50):
        for i, uart in enumerate(uarts):
            clocks[i].advance(30_000 * (i + 1))
            uart.write(7, (step * (i + 3)) & 0xFF)
            assert uart.read(7) == (step * (i + 3)) & 0xFF
            uart.write(THR, step)
            pending = uart.tx_pending()
            if pending:
                uart.tx_sent(len(pending))
    writer.close()
    report = replay(path)
    assert report.identical, report.divergence
    assert [s.name for s in report.streams.values()] == ["u0", "u1"]
    assert [s.reads for s in report.streams.values()] == [50, 50]
    assert report.streams[0].tx_bytes == 50 and report.streams[1].pace == "line"


def test_a_recording_path_that_cannot_be_one_is_refused(tmp_path: Path) -> None:
    """A directory that is not there (73), a device or FIFO (73, and /dev/null keeps its
    mode): refused with one line before anything starts; a symlink is not followed."""
    with pytest.raises(RecordingError) as info:
        RecordWriter(tmp_path / "no" / "such" / "dir.ubrec")
    assert info.value.exit_code == 73
    before = os.stat("/dev/null").st_mode
    with pytest.raises(RecordingError, match="not a regular file") as info:
        RecordWriter("/dev/null")
    assert info.value.exit_code == 73 and os.stat("/dev/null").st_mode == before
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(RecordingError):
        RecordWriter(fifo)
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(RecordingError):
        RecordWriter(tmp_path / "link")
    assert target.read_bytes() == b"keep"
    done = subprocess.run(
        [sys.executable, "-m", "uartbridge", "run", "--record", str(tmp_path / "no" / "x")],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env=dict(os.environ, RUNTIME_DIRECTORY=str(tmp_path / "run"),
                 STATE_DIRECTORY=str(tmp_path / "state")),
    )
    assert done.returncode == 73 and "cannot create the recording" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_full_disk_ends_the_recording_not_the_device(tmp_path: Path) -> None:
    """The recording's filesystem fills up: the recording stops (reported once), the device
    goes on, and what was written before replays identically."""
    from procs import fill_filesystem, small_tmpfs

    errors: list[str] = []
    with small_tmpfs(tmp_path / "small", "256k") as small:
        path = small / "run.ubrec"
        writer = RecordWriter(path, on_error=errors.append)
        clock = FakeClock()
        uart = RecordingUart(clock=clock)
        uart.start_recording(writer, "uart0")
        uart.write(7, 1)
        writer.flush()
        fill_filesystem(small)
        for i in range(30_000):  # far more than the 64 KiB buffer: the flush must fail
            clock.advance(1_000)
            uart.write(7, i & 0xFF)
        assert uart.read(7) == 29_999 & 0xFF  # the device did not notice
        writer.close()
        assert len(errors) == 1 and "No space left" in errors[0]
        report = replay(path)
        assert report.identical and not report.ended
