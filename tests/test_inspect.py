"""`uartbridge inspect FILE [--json]`: decoded view, verdict, exit codes 0/65/66, no traceback."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import uartbridge.inspect  # noqa: F401  (imported before any privilege drop below)
from uartbridge.checkpoint import (
    Checkpoint,
    CheckpointMeta,
    content_hash,
    encode,
    read_checkpoint,
)
from uartbridge.cli import main
from uartbridge.port.state import PortState, ReaderState
from uartbridge.uart import Uart16550

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
STUCK = DATA / "checkpoint-v1-stuck-tx.json"
GOLDEN = sorted(DATA.glob("checkpoint-v*-*.json"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    code = main(["inspect", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str, code: int) -> None:
    """stderr holds exactly one line and no traceback."""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert code in (65, 66)


def write_doc(path: Path, doc: dict[str, Any], *, rehash: bool = True) -> Path:
    """Write ``doc`` as JSON (with a fresh hash unless told otherwise)."""
    doc = copy.deepcopy(doc)
    if rehash:
        doc["sha256"] = content_hash(doc)
    path.write_text(json.dumps(doc, indent=2))
    return path


def test_valid_file_shows_registers_with_bit_names(capsys: pytest.CaptureFixture[str]) -> None:
    """A valid checkpoint exits 0 and shows registers decoded with their bit names."""
    code, out, err = run(capsys, str(STUCK))
    assert code == 0 and err == ""
    assert "valid" in out
    assert "IER      0x07    RDI THRI RLSI" in out
    assert "MCR      0x0b    DTR RTS OUT2" in out
    assert "MSR      0xb0    CTS DSR DCD" in out
    assert "LCR      0x03    115200 8N1" in out
    assert "IIR      0xc1    NO_INT, FIFO bits; IRQ low" in out


def test_valid_file_shows_fifos_as_hex_and_text(capsys: pytest.CaptureFixture[str]) -> None:
    """FIFOs appear as hex and printable text; the stuck TSR byte and its retries are shown."""
    _, out, _ = run(capsys, str(STUCK))
    assert "45 46 47 48 49 4a 4b 4c 4d 4e 4f 50 51 52 53 54  |EFGHIJKLMNOPQRST|" in out
    assert "TSR 0x2e, busy, tsr_retry=1" in out
    assert "to the wire  17 bytes" in out


def test_valid_file_shows_host_path_counters_and_metadata(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Reader state, host buffers, counters and metadata are all shown."""
    _, out, _ = run(capsys, str(DATA / "checkpoint-v1-disconnected-backlog.json"))
    assert "reader       disconnected" in out
    assert "tx_backlog   59 bytes" in out
    assert "|.[0;32m OK .[0m]|" in out  # escape bytes shown as '.'
    assert "disconnects=1" in out and "bytes_transmitted=59" in out
    assert "ttyS1 on pty:, generation 12" in out
    assert "line         9600 8N1, break off" in out


def test_rx_file_shows_timeout_and_backlog(capsys: pytest.CaptureFixture[str]) -> None:
    """The receive timeout's remaining time and the RX backlog are shown."""
    _, out, _ = run(capsys, str(DATA / "checkpoint-v1-rx-timeout.json"))
    assert "armed, 247220 ns remaining" in out
    assert "rx_backlog   12 bytes" in out and "|k brown fox.|" in out
    assert "LSR      0x61    DR THRE TEMT" in out


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.name)
def test_every_golden_file_inspects_in_both_forms(
    capsys: pytest.CaptureFixture[str], path: Path
) -> None:
    """Every golden file gives exit 0 as text and as JSON."""
    assert run(capsys, str(path))[0] == 0
    code, out, _ = run(capsys, str(path), "--json")
    assert code == 0 and json.loads(out)["valid"] is True


def test_pending_line_events_are_shown(capsys: pytest.CaptureFixture[str]) -> None:
    """Breaks and errors waiting in the RX backlog appear in the text and in --json."""
    path = str(DATA / "checkpoint-v2-line-events.json")
    code, out, _ = run(capsys, path)
    assert code == 0
    assert "rx_marks     parity after 3 bytes, break after 5 bytes" in out
    code, out, _ = run(capsys, path, "--json")
    assert code == 0
    assert json.loads(out)["port"]["rx_marks"] == [
        {"at": 3, "kind": "parity"}, {"at": 5, "kind": "break"}
    ]


def test_what_a_stop_took_from_the_kernel_is_shown(capsys: pytest.CaptureFixture[str]) -> None:
    """A half-read PARMRK mark and the stop counters (v3) appear in the text and in --json."""
    path = str(DATA / "checkpoint-v3-stop-on-serial.json")
    code, out, _ = run(capsys, path)
    assert code == 0
    assert "rx_escape    ff (a PARMRK mark begun" in out
    assert "tx_reclaimed=11" in out and "rx_saved_at_stop=3" in out
    code, out, _ = run(capsys, path, "--json")
    report = json.loads(out)
    assert report["port"]["rx_escape"] == "ff"
    assert report["port"]["tx_backlog"]["text"] == "ok..login: "
    assert report["counters"]["port"]["rx_dropped_at_stop"] == 0


def test_line_rate_pacing_state_is_shown(capsys: pytest.CaptureFixture[str]) -> None:
    """A paced checkpoint (v4) shows its pace, the character on the transmit line and its
    time left, and the bytes on the receive line, in the text and in --json; an unpaced one
    shows no pacing lines."""
    path = str(DATA / "checkpoint-v4-paced-mid-character.json")
    code, out, _ = run(capsys, path)
    assert code == 0
    assert "pace         line: 1041666 ns a character; 541666 ns left" in out
    assert "tx line      1 byte" in out and "rx line      3 bytes" in out
    assert "the next byte can enter in 841666 ns" in out
    code, out, _ = run(capsys, path, "--json")
    report = json.loads(out)
    assert report["derived"]["pace"] == "line"
    assert report["transmitter"]["tx_line"]["text"] == "e"
    assert report["receiver"]["rx_line"]["text"] == "abc"
    assert report["receiver"]["rx_slot_remaining_ns"] == 841_666
    code, out, _ = run(capsys, str(STUCK))
    assert code == 0 and "pace " not in out and "rx line" not in out


def test_json_output_is_machine_readable(capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints one JSON document with the decoded registers, buffers and verdict."""
    code, out, _ = run(capsys, str(STUCK), "--json")
    report = json.loads(out)
    assert code == 0 and report["valid"] is True
    assert report["registers"]["lsr"] == {"value": 0, "hex": "0x00", "bits": []}
    assert report["registers"]["ier"]["bits"] == ["RDI", "THRI", "RLSI"]
    assert report["registers"]["iir"]["interrupt"] == "NO_INT"
    assert report["transmitter"]["tx_fifo"]["text"] == "EFGHIJKLMNOPQRST"
    assert report["transmitter"]["tsr_retry"] == 1
    assert report["port"]["reader_state"] == "stalled"
    assert report["meta"]["generation"] == 7
    assert report["derived"]["irq"] is False
    assert report["derived"]["char_time_ns"] == 86_805
    assert report["counters"]["uart"]["tx_overwrites"] == 4


def test_large_backlog_is_cut_in_text_and_whole_in_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Text output shows the first KiB of a big buffer and says so; --json shows all of it."""
    ckpt = Checkpoint(
        meta=CheckpointMeta(uart_name="ttyS0", port="pty:", created_unix_ns=1, generation=1),
        uart=Uart16550(clock=lambda: 0).state(),
        port=PortState(tx_backlog=b"x" * 5000, reader_state=ReaderState.DISCONNECTED),
    )
    path = tmp_path / "big.json"
    path.write_bytes(encode(ckpt))
    _, out, _ = run(capsys, str(path))
    assert "3976 more bytes (--json shows all)" in out
    _, out, _ = run(capsys, str(path), "--json")
    assert json.loads(out)["port"]["tx_backlog"]["length"] == 5000


def test_inconsistent_file_exits_65_with_one_line_reason(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A re-hashed but inconsistent file exits 65 with the rule on one stderr line."""
    doc = json.loads((DATA / "checkpoint-v1-idle.json").read_text())
    doc["uart"]["tsr_retry"] = 2
    path = write_doc(tmp_path / "bad.json", doc)
    code, out, err = run(capsys, str(path))
    assert code == 65 and out == ""
    assert_one_line_error(err, code)
    assert "inconsistent state: tsr_retry: tsr empty but tsr_retry=2" in err
    assert str(path) in err


def test_invalid_file_with_json_reports_the_verdict(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """With --json an invalid file still exits 65, and stdout carries a JSON verdict."""
    doc = json.loads((DATA / "checkpoint-v1-idle.json").read_text())
    doc["uart"]["lsr"] = 0x20
    path = write_doc(tmp_path / "bad.json", doc, rehash=False)
    code, out, err = run(capsys, str(path), "--json")
    verdict = json.loads(out)
    assert code == 65 and verdict["valid"] is False and verdict["exit_code"] == 65
    assert "sha256" in verdict["error"]
    assert_one_line_error(err, code)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage",
        b"\x00\x01\x02\xff\xfe binary",
        b"\x89PNG\r\n\x1a\n",
        b"{\n",
        b"[1, 2, 3]\n",
        b'{"format": "uartbridge-checkpoint", "format_version": 99}',
        (DATA / "checkpoint-v1-stuck-tx.json").read_bytes()[:700],
    ],
    ids=["empty", "garbage", "binary", "png", "open-brace", "array", "newer", "truncated"],
)
def test_broken_files_exit_65_without_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes
) -> None:
    """Empty, garbage, binary, truncated and foreign files exit 65 with a one-line reason."""
    path = tmp_path / "broken.json"
    path.write_bytes(content)
    code, out, err = run(capsys, str(path))
    assert code == 65 and out == ""
    assert_one_line_error(err, code)


def test_missing_file_exits_66(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A missing file exits 66 with a one-line reason."""
    code, _, err = run(capsys, str(tmp_path / "nope.json"))
    assert code == 66
    assert_one_line_error(err, code)
    assert "No such file" in err


def test_directory_exits_66(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A directory is not a readable checkpoint: exit 66."""
    code, _, err = run(capsys, str(tmp_path))
    assert code == 66
    assert_one_line_error(err, code)
    assert "directory" in err


def test_fifo_exits_66_without_blocking(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A named pipe is refused at once (exit 66) rather than read forever."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code, _, err = run(capsys, str(fifo))
    assert code == 66
    assert_one_line_error(err, code)


def _run_as_nobody(argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI in a forked child that dropped root privileges (uid/gid 65534)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        status = 70
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
            code = main(argv)
            result = json.dumps([code, sys.stdout.getvalue(), sys.stderr.getvalue()])
            os.write(write_end, result.encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and data, "child failed"
    code, out, err = json.loads(data)
    return code, out, err


def test_permission_denied_exits_66(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A file the user may not read exits 66 with a one-line reason."""
    path = tmp_path / "secret.json"
    path.write_bytes(STUCK.read_bytes())
    path.chmod(0o000)
    if os.geteuid() == 0:
        code, out, err = _run_as_nobody(["inspect", str(path)])
    else:
        code, out, err = run(capsys, str(path))
    assert code == 66 and out == ""
    assert_one_line_error(err, code)
    assert "Permission denied" in err


def test_unprintable_file_name_stays_on_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A file name with a newline and an escape sequence is escaped: still one stderr line."""
    path = tmp_path / "evil\n\x1b[2Jname.json"
    path.write_bytes(b"junk")
    code, _, err = run(capsys, str(path))
    assert code == 65
    assert_one_line_error(err, code)
    assert "\x1b" not in err and "\\n" in err


def test_subprocess_python_m_uartbridge_inspect() -> None:
    """`python -m uartbridge inspect` works as a real process: 0 for valid, 65 for garbage."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    good = subprocess.run(
        [sys.executable, "-m", "uartbridge", "inspect", str(STUCK), "--json"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["meta"]["uart_name"] == "console"
    bad = subprocess.run(
        [sys.executable, "-m", "uartbridge", "inspect", str(DATA)],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert bad.returncode == 66
    assert "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1


def test_inspect_matches_what_read_checkpoint_loads(capsys: pytest.CaptureFixture[str]) -> None:
    """The JSON view reports exactly the loaded checkpoint's values."""
    ckpt = read_checkpoint(DATA / "checkpoint-v1-rx-timeout.json")
    _, out, _ = run(capsys, str(DATA / "checkpoint-v1-rx-timeout.json"), "--json")
    report = json.loads(out)
    assert bytes.fromhex(report["receiver"]["rx_fifo"]["hex"].replace(" ", "")) == ckpt.uart.rx_fifo
    assert report["receiver"]["timeout_remaining_ns"] == ckpt.uart.timeout_remaining_ns
    assert report["meta"]["created_unix_ns"] == ckpt.meta.created_unix_ns
