"""Periodic checkpoints are written off the event loop: a slow disk stalls no UART, and a stop
during such a write still leaves the final state on disk.

The slow disk is strace's fault injection (``delay_enter``) on the rename that puts a
written, fsynced temp file in place. strace counts calls per thread: the first rename of a
thread is held, that is the first periodic checkpoint (uart0's) in whichever thread writes it,
and the first checkpoint the event loop's thread writes itself (the final one: held too, which
only makes the stop slower). Nothing else renames here (no pty ``link``).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import Daemon, daemon, fill_filesystem, require_program, small_tmpfs, wait_for

from uartbridge.checkpoint import checkpoint_path, previous_path, read_checkpoint
from uartbridge.client import BusClient

pytestmark = pytest.mark.e2e

SCR = 7
RENAME_DELAY_US = 6_000_000
RENAMES = "rename,renameat,renameat2"


def _temp_files(state_dir: Path, name: str) -> list[Path]:
    return list(state_dir.glob(f".{name}.checkpoint.json.tmp-*"))


@contextlib.contextmanager
def _slow_first_rename(d: Daemon, *, nth: int = 1) -> Iterator[int]:
    """Start ``d`` under strace with each thread's ``nth`` rename held; yields the daemon's PID
    (strace's child), SIGKILLed at the end if it is still there."""
    strace = require_program("strace")
    d.start(prefix=(strace, "-f", "-o", os.devnull, "-e", f"trace={RENAMES}",
                    "-e", f"inject={RENAMES}:delay_enter={RENAME_DELAY_US}:when={nth}"))
    pid: int = d.status()["pid"]
    try:
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # strace detaches from it when it is killed


def test_another_uart_is_served_while_a_periodic_checkpoint_is_held(tmp_path: Path) -> None:
    """While uart0's periodic checkpoint is held in the middle (its temp file written, not yet
    renamed), uart1's guest connects and gets its READs answered: the write blocks no loop."""
    with daemon(tmp_path / "d", [
        {"name": "uart0", "port": "pty:"},
        {"name": "uart1", "port": "pty:"},
    ], interval_s=0.5) as d, _slow_first_rename(d) as pid:
        wait_for(lambda: _temp_files(d.state_dir, "uart0"), 30, 0.005)
        with BusClient(d.bus("uart1"), timeout_s=60) as client:
            client.write(SCR, 0x3C)
            reads = [client.read(SCR) for _ in range(20)]
        # Still held: uart0's checkpoint is not renamed into place yet.
        in_flight = _temp_files(d.state_dir, "uart0")
        renamed = checkpoint_path(d.state_dir, "uart0").exists()
        assert reads == [0x3C] * 20
        assert in_flight and not renamed, "the READs waited for the checkpoint write"
        os.kill(pid, signal.SIGTERM)
        assert d.wait_exit(60) == 0
        d.proc = None
        assert read_checkpoint(checkpoint_path(d.state_dir, "uart1")).uart.scr == 0x3C


def test_status_reports_the_checkpoint_on_disk_while_the_next_is_written(tmp_path: Path) -> None:
    """While the second periodic checkpoint is held in the middle (snapshot taken, file not yet
    in place), `status` reports the first one: the generation, path and age of the file that is
    on disk, not the generation of the snapshot still being written."""
    with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}], interval_s=0.5) as d, \
            _slow_first_rename(d, nth=2):
        path = checkpoint_path(d.state_dir, "uart0")
        wait_for(lambda: path.exists() and _temp_files(d.state_dir, "uart0"), 30, 0.005)
        on_disk = read_checkpoint(path).meta.generation
        reported = d.status()["uarts"][0]["last_checkpoint"]
        assert _temp_files(d.state_dir, "uart0"), "the second write is still held"
        assert reported["path"] == str(path)
        assert reported["generation"] == on_disk == 1, (reported, on_disk)


def test_a_stop_during_a_periodic_write_leaves_the_final_state(tmp_path: Path) -> None:
    """SIGTERM while a periodic checkpoint is held in the middle, after the guest changed the
    device: the final checkpoint waits for that write and lands after it, so the file holds
    the final state (the periodic one becomes the previous file), and no temp file is left."""
    with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}], interval_s=0.5) as d, \
            _slow_first_rename(d) as pid:
        wait_for(lambda: _temp_files(d.state_dir, "uart0"), 30, 0.005)
        with BusClient(d.bus("uart0"), timeout_s=60) as client:
            client.write(SCR, 0xA5)
            assert client.read(SCR) == 0xA5  # in the model, after the periodic snapshot
        os.kill(pid, signal.SIGTERM)
        assert d.wait_exit(60) == 0
        d.proc = None
    path = checkpoint_path(d.state_dir, "uart0")
    final = read_checkpoint(path)
    assert final.uart.scr == 0xA5
    periodic = read_checkpoint(previous_path(path))
    assert periodic.uart.scr != 0xA5
    assert final.meta.generation > periodic.meta.generation
    assert not _temp_files(d.state_dir, "uart0")


def test_periodic_checkpoints_go_on_with_no_descriptor_free(tmp_path: Path) -> None:
    """With the daemon's descriptor limit lowered to the descriptors it holds (every number
    below it taken), the writer thread's open fails with EMFILE: the write is redone on the
    loop inside the descriptor reserve, so periodic checkpoints go on, none is logged as
    failed, and the final one is written."""
    with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}], interval_s=0.5) as d:
        d.start()
        assert d.proc is not None
        pid = d.proc.pid
        path = checkpoint_path(d.state_dir, "uart0")
        wait_for(path.exists, 30)
        # The fewest held (none taken by a write in progress); lowest numbers come first.
        held = min((sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd")) for _ in range(5)),
                   key=len)
        assert held == list(range(len(held))), held
        _soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(held), hard))
        before = read_checkpoint(path).meta.generation
        wait_for(lambda: read_checkpoint(path).meta.generation > before + 3, 60)
        assert "periodic checkpoint failed" not in d.log()
        assert d.stop() == 0
        assert "checkpoint written" in d.log()


def test_no_checkpoint_lands_after_the_final_one(tmp_path: Path) -> None:
    """While the final checkpoint is being retried (a full state directory: a real small
    tmpfs), a `uartbridge checkpoint` request is refused (69, "stopping") instead of writing
    a later snapshot; when room comes back the final one lands and the daemon exits 0."""
    with (
        daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}], interval_s=0,
               stop_retry_s=60) as d,
        small_tmpfs(tmp_path / "d" / "state"),
    ):
        d.start()
        with BusClient(d.bus("uart0"), timeout_s=60) as client:
            client.write(SCR, 0x66)
        filler = fill_filesystem(d.state_dir)
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "retrying the final checkpoint" in d.log(), 30)
        refused = d.cli("checkpoint", "--config", str(d.config_path))
        assert refused.returncode == 69, (refused.returncode, refused.stderr)
        assert "stopping" in refused.stderr and "Traceback" not in refused.stderr
        filler.unlink()
        assert d.wait_exit(60) == 0
        d.proc = None
        assert read_checkpoint(checkpoint_path(d.state_dir, "uart0")).uart.scr == 0x66
