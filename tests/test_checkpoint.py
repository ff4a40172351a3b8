"""Checkpoints: format, compatibility, validation, atomic files (docs/checkpoint-format.md)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uartbridge.checkpoint import (
    FORMAT_VERSION,
    MAX_RX_BACKLOG_BYTES,
    MAX_TX_BACKLOG_BYTES,
    Checkpoint,
    CheckpointMeta,
    checkpoint_path,
    content_hash,
    decode,
    encode,
    latest_checkpoint,
    previous_path,
    read_checkpoint,
    restore,
    to_document,
    write_checkpoint,
)
from uartbridge.errors import CheckpointError, CheckpointMissingError, InvalidStateError
from uartbridge.port.state import PortCounters, PortState, ReaderState
from uartbridge.uart import LineSettings, Uart16550, UartState, UartStatistics

sys.path.insert(0, str(Path(__file__).parent))
from vectors import FakeClock

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
GOLDEN = sorted(DATA.glob("checkpoint-v1-*.json"))
GOLDEN_V3 = DATA / "checkpoint-v3-stop-on-serial.json"
GOLDEN_V4 = DATA / "checkpoint-v4-paced-mid-character.json"
GOLDEN_V5 = DATA / "checkpoint-v5-handed-over-serial.json"
PACED = GOLDEN_V4.name


def make_checkpoint(
    uart: UartState | None = None,
    port: PortState | None = None,
    *,
    generation: int = 1,
    name: str = "ttyS0",
) -> Checkpoint:
    """A checkpoint of ``uart`` (default: power-on) with fixed metadata."""
    return Checkpoint(
        meta=CheckpointMeta(
            uartbridge_version="0.1.0",
            uart_name=name,
            port="/dev/ttyUSB0",
            created_unix_ns=1_764_000_000_000_000_000 + generation,
            generation=generation,
        ),
        uart=uart if uart is not None else Uart16550(clock=lambda: 0).state(),
        port=port if port is not None else PortState(),
    )


def golden_doc(name: str) -> dict[str, Any]:
    """The parsed JSON of a golden file (a v1 one by its short name)."""
    path = DATA / (name if name.endswith(".json") else f"checkpoint-v1-{name}.json")
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def upgraded_to_current(doc: dict[str, Any]) -> dict[str, Any]:
    """What a v1…v4 document says when written again by this version (docs §6): the keys
    each later version added, with the values that mean exactly the old behaviour."""
    doc = copy.deepcopy(doc)
    version = doc["format_version"]
    if version < 2:
        doc["port"]["rx_marks"] = []
    if version < 3:
        doc["port"]["rx_escape"] = ""
        doc["port"]["counters"].update(
            tx_reclaimed=0, rx_saved_at_stop=0, rx_dropped_at_stop=0, rx_escape_uncertain=0
        )
    if version < 4:
        doc["uart"].update(
            pace="none", tx_shift_remaining_ns=None, tx_line="", rx_line="",
            rx_slot_remaining_ns=None,
        )
    if version < 5:
        doc["meta"]["port_handle"] = None
    doc["format_version"] = FORMAT_VERSION
    del doc["sha256"]
    return doc


def rehashed(doc: dict[str, Any]) -> bytes:
    """``doc`` serialized with a freshly computed (so: correct) hash."""
    doc = copy.deepcopy(doc)
    doc["sha256"] = content_hash(doc)
    return json.dumps(doc).encode()


def refused(data: bytes) -> str:
    """Decode ``data``, which must fail with a CheckpointError; returns its message."""
    with pytest.raises(CheckpointError) as info:
        decode(data)
    return str(info.value)


# -- golden files: every later version must still load them -------------------------------

GOLDEN_EXPECTATIONS: dict[str, dict[str, object]] = {
    "idle": {
        "meta.uart_name": "ttyS0",
        "meta.generation": 1,
        "uart.divisor": 1,
        "uart.lcr": 0x03,
        "uart.fcr": 0xC1,
        "uart.iir": 0xC1,
        "uart.lsr": 0x60,
        "uart.tsr_busy": False,
        "uart.statistics.bytes_transmitted": 19,
        "port.reader_state": ReaderState.CONNECTED,
        "port.line_settings": LineSettings(
            baud=115200, data_bits=8, parity="N", stop_bits=1.0, break_on=False
        ),
    },
    "stuck-tx": {
        "meta.uart_name": "console",
        "meta.generation": 7,
        "uart.tsr": ord("."),
        "uart.tsr_busy": True,
        "uart.tsr_retry": 1,
        "uart.thr": ord("T"),
        "uart.tx_fifo": b"EFGHIJKLMNOPQRST",
        "uart.lsr": 0x00,
        "uart.iir": 0xC1,
        "port.reader_state": ReaderState.STALLED,
    },
    "rx-timeout": {
        "meta.port": "rfc2217://lab-host:7000",
        "uart.fcr": 0x81,
        "uart.rx_fifo": b"e quic",
        "uart.lsr": 0x61,
        "uart.timeout_remaining_ns": 247_220,
        "uart.timeout_ipending": False,
        "port.rx_backlog": b"k brown fox.",
    },
    "disconnected-backlog": {
        "meta.uart_name": "ttyS1",
        "meta.port": "pty:",
        "uart.msr": 0x1A,
        "uart.iir": 0xC0,
        "port.reader_state": ReaderState.DISCONNECTED,
        "port.tx_backlog": b"\x1b[0;32m OK \x1b[0m] Reached target Multi-User System.\r\nlogin: ",
        "port.counters.disconnects": 1,
        "port.line_settings": LineSettings(
            baud=9600, data_bits=8, parity="N", stop_bits=1.0, break_on=False
        ),
    },
    "nonfifo-break": {
        "uart.tx_retry_limit": 4,
        "uart.fcr": 0,
        "uart.rx_fifo": b"\x00",
        "uart.lsr": 0x71,
        "uart.iir": 0x06,
        "uart.reset_timing": True,
        "port.line_settings": None,
    },
    "fifo-after-reset": {
        "uart.fcr": 0x01,
        "uart.iir": 0x01,
        "uart.reset_timing": True,
    },
}


def _field(ckpt: Checkpoint, dotted: str) -> object:
    value: object = ckpt
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def test_golden_file_set_is_complete() -> None:
    """The golden files are exactly the ones the tests describe (none went missing)."""
    assert sorted(p.name for p in GOLDEN) == sorted(
        f"checkpoint-v1-{name}.json" for name in GOLDEN_EXPECTATIONS
    )
    assert sorted(p.name for p in DATA.glob("checkpoint-v[2-9]*.json")) == [
        "checkpoint-v2-line-events.json", "checkpoint-v3-stop-on-serial.json",
        "checkpoint-v4-paced-mid-character.json", "checkpoint-v5-handed-over-serial.json",
    ]


@pytest.mark.parametrize("name", sorted(GOLDEN_EXPECTATIONS))
def test_golden_v1_files_still_load(name: str) -> None:
    """Every format-1 golden file loads with this version and carries the recorded values."""
    ckpt = read_checkpoint(DATA / f"checkpoint-v1-{name}.json")
    assert ckpt.meta.format_version == 1
    for dotted, expected in GOLDEN_EXPECTATIONS[name].items():
        assert _field(ckpt, dotted) == expected, dotted


def test_golden_v2_file_loads_with_its_pending_line_events() -> None:
    """The format-2 golden file carries the breaks and errors waiting in the RX backlog."""
    path = DATA / "checkpoint-v2-line-events.json"
    ckpt = read_checkpoint(path)
    assert ckpt.meta.format_version == 2
    assert ckpt.port.rx_backlog == b"bcdXef"
    assert ckpt.port.rx_marks == ((3, "parity"), (5, "break"))
    assert ckpt.uart.rx_fifo == b"a"
    assert ckpt.port.rx_escape == b""
    assert ckpt.port.counters.tx_reclaimed == 0


def test_golden_v2_file_reencodes_with_only_the_v3_fields() -> None:
    """The v2 file written again says version 3 with rx_escape "" and the new counters 0."""
    path = DATA / "checkpoint-v2-line-events.json"
    ckpt = decode(path.read_bytes())
    current = dataclasses.replace(
        ckpt, meta=dataclasses.replace(ckpt.meta, format_version=FORMAT_VERSION)
    )
    written = json.loads(encode(current))
    del written["sha256"]
    assert written == upgraded_to_current(json.loads(path.read_bytes()))


def test_golden_v3_file_loads_with_what_a_stop_took_from_the_kernel() -> None:
    """The format-3 golden file: reclaimed output in tx_backlog, saved input, a half mark."""
    ckpt = read_checkpoint(GOLDEN_V3)
    assert ckpt.meta.format_version == 3
    assert ckpt.port.rx_escape == b"\xff"
    assert ckpt.port.tx_backlog == b"ok\r\nlogin: "
    assert ckpt.port.rx_backlog == b"k\r\n"
    counters = ckpt.port.counters
    assert (counters.tx_reclaimed, counters.rx_saved_at_stop) == (11, 3)
    assert (counters.rx_dropped_at_stop, counters.rx_escape_uncertain) == (0, 0)
    assert ckpt.port.reader_state is ReaderState.STALLED
    assert ckpt.uart.rx_fifo == b"o"
    if FORMAT_VERSION == 3:  # the newest golden file is exactly what this version writes
        assert encode(ckpt) == GOLDEN_V3.read_bytes()


def test_golden_v4_file_loads_a_paced_device_mid_character() -> None:
    """The format-4 golden file: line-rate pacing, 'e' on the transmit line refused once by
    a stalled reader, three bytes on the receive line; the newest golden file is exactly
    what this version writes."""
    ckpt = read_checkpoint(GOLDEN_V4)
    assert ckpt.meta.format_version == 4
    uart = ckpt.uart
    assert uart.pace == "line"
    assert (uart.tx_shift_remaining_ns, uart.rx_slot_remaining_ns) == (541_666, 841_666)
    assert (uart.tx_line, uart.tsr_retry, uart.tx_fifo) == (b"e", 1, b"llo")
    assert (uart.rx_line, uart.rx_fifo) == (b"abc", b"x")
    assert not uart.tsr_busy and uart.lsr == 0x01
    assert uart.tx_waiting() == b"ello"
    if FORMAT_VERSION == 4:
        assert encode(ckpt) == GOLDEN_V4.read_bytes()


def test_golden_v5_file_names_the_port_it_was_handed_over_with() -> None:
    """The format-5 golden file: a stop on a serial port whose descriptor went to the next
    run, with the port's identity in meta.port_handle; every older file loads with none; the
    newest golden file is exactly what this version writes."""
    ckpt = read_checkpoint(GOLDEN_V5)
    assert ckpt.meta.format_version == 5
    assert ckpt.meta.port_handle == "tty dev=0:5 ino=405 rdev=4:65"
    assert ckpt.port.tx_backlog == b"ok\r\nlogin: " and ckpt.port.rx_backlog == b"k\r\n"
    for older in sorted(DATA.glob("checkpoint-v[1-4]-*.json")):
        assert read_checkpoint(older).meta.port_handle is None, older.name
    if FORMAT_VERSION == 5:
        assert encode(ckpt) == GOLDEN_V5.read_bytes()


def test_v4_documents_load_with_no_port_handle_and_refuse_one() -> None:
    """A version-4 document upgrades to port_handle null; one that has the field is refused,
    naming it and the version it came with; a non-string handle is refused too."""
    doc = json.loads(GOLDEN_V4.read_bytes())
    assert decode(rehashed(doc)).meta.port_handle is None
    doc["meta"]["port_handle"] = "pty slave=/dev/pts/3"
    assert "meta.port_handle: unknown field in format version 4 (it came with 5)" in refused(
        rehashed(doc))
    current = json.loads(GOLDEN_V5.read_bytes())
    current["meta"]["port_handle"] = 7
    assert "meta.port_handle: must be a string or null" in refused(rehashed(current))
    current["meta"]["port_handle"] = "tty\nrdev"
    assert "meta.port_handle: must not contain control characters" in refused(rehashed(current))


def test_golden_v4_file_resumes_mid_character_on_a_new_clock() -> None:
    """Resumed on a clock far from the writer's: the refused byte is offered again and holds
    the line until the wire takes it; the bytes on the receive line enter one character time
    apart from their slot, to the nanosecond."""
    char_ns = 1_041_666  # 9600 8N1, 10 bits
    clock = FakeClock()
    clock.advance(987_654_321)
    uart = restore(read_checkpoint(GOLDEN_V4), clock=clock)
    assert uart.tx_pending() == b"e"
    clock.advance(541_666)
    uart.poll()
    assert uart.tx_pending() == b"e"  # held by the refusal: 'l' does not start
    uart.tx_sent(1)
    assert uart.tx_pending() == b"l"  # the character had ended: 'l' starts when 'e' is taken
    uart.tx_sent(1)
    clock.advance(841_666 - 541_666 - 1)
    uart.poll()
    assert uart.state().rx_fifo == b"x"
    clock.advance(1)
    uart.poll()
    assert uart.state().rx_fifo == b"xa"
    clock.advance(char_ns)
    uart.poll()
    assert uart.state().rx_fifo == b"xab" and uart.state().rx_line == b"c"


def test_v3_documents_load_as_qemus_unpaced_device() -> None:
    """A version-3 file (and so every older one) upgrades to pace "none" with no character
    on the line and nothing waiting on it; one that has a v4 field is refused, naming it."""
    ckpt = read_checkpoint(GOLDEN_V3)
    assert ckpt.uart.pace == "none"
    assert ckpt.uart.tx_shift_remaining_ns is None and ckpt.uart.rx_slot_remaining_ns is None
    assert ckpt.uart.rx_line == b"" and ckpt.uart.tx_line == b""
    doc = golden_doc(GOLDEN_V3.name)
    doc["uart"]["pace"] = "none"
    assert "uart.pace: unknown field in format version 3 (it came with 4)" in refused(
        rehashed(doc)
    )


def test_v2_documents_load_with_no_half_mark_and_zero_stop_counters() -> None:
    """A version-2 file upgrades to exactly what it meant: no half mark, nothing reclaimed."""
    doc = golden_doc("checkpoint-v2-line-events.json")
    ckpt = decode(rehashed(doc))
    assert ckpt.meta.format_version == 2
    assert ckpt.port.rx_escape == b""
    assert ckpt.port.counters.rx_saved_at_stop == 0
    assert ckpt.port.rx_marks == ((3, "parity"), (5, "break"))


@pytest.mark.parametrize(
    ("where", "key"),
    [(("port",), "rx_escape"), (("port", "counters"), "tx_reclaimed"),
     (("port", "counters"), "rx_escape_uncertain")],
)
def test_v3_fields_in_a_version_2_document_are_refused(where: tuple[str, ...], key: str) -> None:
    """rx_escape and the stop counters came with version 3: a v2 document with one is refused."""
    doc = golden_doc("checkpoint-v2-line-events.json")
    target = doc
    for part in where:
        target = target[part]
    target[key] = "" if key == "rx_escape" else 0
    message = refused(rehashed(doc))
    assert f"{'.'.join((*where, key))}: unknown field in format version 2" in message


RX_ESCAPE_RULES = [
    ("00", 'must be "", "ff" or "ff00"'),
    ("ffff", 'must be "", "ff" or "ff00"'),
    ("ff01", 'must be "", "ff" or "ff00"'),
    ("ff0000", "more than the 2 allowed"),
    ("FF", "lowercase hex"),
    (255, "must be a string"),
]


@pytest.mark.parametrize(
    ("value", "fragment"), RX_ESCAPE_RULES, ids=[repr(r[0]) for r in RX_ESCAPE_RULES]
)
def test_each_rx_escape_rule_is_enforced_on_load(value: object, fragment: str) -> None:
    """P6: rx_escape is the start of a PARMRK mark: "", "ff" or "ff00", nothing else."""
    doc = golden_doc(GOLDEN_V3.name)
    doc["port"]["rx_escape"] = value
    message = refused(rehashed(doc))
    assert "port.rx_escape" in message and fragment in message


def test_a_half_mark_that_is_no_mark_is_not_written() -> None:
    """The writer checks P6 too: rx_escape "00" never reaches a file."""
    with pytest.raises(CheckpointError, match=r"port\.rx_escape"):
        encode(make_checkpoint(port=PortState(rx_escape=b"\x00")))


def test_v1_documents_load_with_no_pending_line_events() -> None:
    """A version-1 file (no rx_marks) upgrades to exactly what it meant: nothing pending."""
    ckpt = decode(rehashed(golden_doc("rx-timeout")))
    assert ckpt.meta.format_version == 1
    assert ckpt.port.rx_marks == ()
    assert ckpt.port.rx_backlog == b"k brown fox."


def test_rx_marks_in_a_version_1_document_are_refused() -> None:
    """rx_marks came with version 2: a v1 document carrying it is refused, naming it."""
    doc = golden_doc("rx-timeout")
    doc["port"]["rx_marks"] = []
    assert "port.rx_marks: unknown field in format version 1" in refused(rehashed(doc))


RX_MARK_RULES = [
    ({"rx_marks": {}}, "port.rx_marks: must be a list"),
    ({"rx_marks": [{"at": 1}]}, "port.rx_marks[0].kind: missing"),
    ({"rx_marks": [{"at": 1, "kind": "break", "x": 0}]}, "port.rx_marks[0].x: unknown field"),
    ({"rx_marks": [{"at": -1, "kind": "break"}]}, "port.rx_marks[0].at: must be >= 0"),
    ({"rx_marks": [{"at": 7, "kind": "break"}]}, "port.rx_marks[0].at: must be an integer"),
    ({"rx_marks": [{"at": 4, "kind": "break"}, {"at": 2, "kind": "parity"}]},
     "port.rx_marks[1].at: must be an integer from 4"),
    ({"rx_marks": [{"at": 1, "kind": "overrun"}]}, "port.rx_marks[0].kind: must be one of"),
    ({"rx_marks": [{"at": True, "kind": "break"}]}, "port.rx_marks[0].at: must be an integer"),
]


@pytest.mark.parametrize(("change", "fragment"), RX_MARK_RULES,
                         ids=[r[1][:40] for r in RX_MARK_RULES])
def test_each_rx_mark_rule_is_enforced_on_load(change: dict[str, Any], fragment: str) -> None:
    """P5: marks are a list of {at, kind}, in stream order, within rx_backlog, of known kinds."""
    doc: dict[str, Any] = json.loads((DATA / "checkpoint-v2-line-events.json").read_text())
    doc["port"].update(change)
    assert fragment in refused(rehashed(doc))


def test_marks_that_do_not_fit_their_backlog_are_not_written() -> None:
    """The writer checks P5 too: a mark beyond rx_backlog never reaches a file."""
    ckpt = make_checkpoint(port=PortState(rx_backlog=b"ab", rx_marks=((3, "break"),)))
    with pytest.raises(CheckpointError, match=r"port.rx_marks\[0\].at"):
        encode(ckpt)


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.name)
def test_golden_v1_files_reencode_as_current_with_only_the_new_fields(path: Path) -> None:
    """A v1 file written again says the current version and carries only the fields added
    since (``rx_marks: []``, ``rx_escape: ""``, the v3 counters 0); every other key as it was."""
    ckpt = decode(path.read_bytes())
    current = dataclasses.replace(
        ckpt, meta=dataclasses.replace(ckpt.meta, format_version=FORMAT_VERSION)
    )
    written = json.loads(encode(current))
    del written["sha256"]
    assert written == upgraded_to_current(json.loads(path.read_bytes()))


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.name)
def test_golden_v1_files_restore_to_working_devices(path: Path) -> None:
    """A golden checkpoint restores into a device whose state is the checkpointed one."""
    ckpt = read_checkpoint(path)
    clock = FakeClock()
    uart = restore(ckpt, clock=clock)
    assert uart.state() == ckpt.uart


def test_stuck_transmitter_golden_resumes_sending_in_order() -> None:
    """The V32/V43 golden state resumes: the TSR byte, then the FIFO, in order, then THRE/TEMT."""
    uart = restore(read_checkpoint(DATA / "checkpoint-v1-stuck-tx.json"), clock=FakeClock())
    assert uart.tx_pending() == b".EFGHIJKLMNOPQRST"
    uart.tx_sent(17)
    assert uart.read(5) == 0x60


def test_rx_timeout_golden_fires_after_remaining_time_on_a_new_clock() -> None:
    """The armed receive timeout is restored as remaining time and fires exactly then."""
    ckpt = read_checkpoint(DATA / "checkpoint-v1-rx-timeout.json")
    clock = FakeClock()
    clock.now_ns = 5_000_000_000_000  # another host, another clock
    uart = restore(ckpt, clock=clock)
    uart.write(1, 0x01)
    clock.advance(247_219)
    assert uart.read(2) == 0xC1
    clock.advance(1)
    assert uart.read(2) == 0xCC


# -- format rules ---------------------------------------------------------------------


def test_every_section_is_written_even_when_empty() -> None:
    """An idle device's document still has every key: absence never stands for 'empty'."""
    doc = to_document(make_checkpoint())
    assert set(doc) == {"format", "format_version", "meta", "uart", "port", "sha256"}
    assert doc["uart"]["rx_fifo"] == "" and doc["uart"]["tx_fifo"] == ""
    assert doc["port"]["rx_backlog"] == "" and doc["port"]["tx_backlog"] == ""
    assert doc["uart"]["tsr_busy"] is False and doc["uart"]["timeout_remaining_ns"] is None


def test_sections_carrying_data_are_written() -> None:
    """TSR, both FIFOs and both host backlogs appear in the document whenever they hold data."""
    doc = golden_doc("stuck-tx")
    assert doc["uart"]["tsr"] == ord(".") and doc["uart"]["tsr_busy"] is True
    assert bytes.fromhex(doc["uart"]["tx_fifo"]) == b"EFGHIJKLMNOPQRST"
    port = PortState(rx_backlog=b"in", tx_backlog=b"out", reader_state=ReaderState.DISCONNECTED)
    doc2 = to_document(make_checkpoint(port=port))
    assert doc2["port"]["rx_backlog"] == b"in".hex()
    assert doc2["port"]["tx_backlog"] == b"out".hex()


def test_derived_values_are_not_stored() -> None:
    """IIR's interrupt ID, IRQ level, trigger level, character time and baud are not in the file."""
    uart_keys = set(golden_doc("disconnected-backlog")["uart"])
    for derived in ("iir", "irq", "trigger_level", "char_time_ns", "baud", "line_settings"):
        assert derived not in uart_keys
    assert "iir_fifo" in uart_keys  # IIR bits 7-6 are state: a reset clears them, FCR stays (V35)


def test_derived_iir_is_recomputed_on_load() -> None:
    """Changing IER in a (re-hashed) file changes the loaded IIR: it is derived, never read."""
    doc = golden_doc("disconnected-backlog")
    assert decode(rehashed(doc)).uart.iir == 0xC0  # MSI pending
    doc["uart"]["ier"] = 0x05
    assert decode(rehashed(doc)).uart.iir == 0xC1


def test_canonical_form_is_the_documented_one() -> None:
    """The hash is SHA-256 over sorted, compact, UTF-8 JSON of the document without sha256."""
    raw = golden_doc("idle")
    claimed = raw.pop("sha256")
    canonical = json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert hashlib.sha256(canonical.encode("utf-8")).hexdigest() == claimed


def test_non_ascii_port_name_round_trips_and_hashes_as_utf8() -> None:
    """A non-ASCII port path is stored as UTF-8 and the hash covers its UTF-8 bytes."""
    ckpt = make_checkpoint()
    meta = dataclasses.replace(ckpt.meta, port="/dev/serial/by-id/µ")
    ckpt = dataclasses.replace(ckpt, meta=meta)
    data = encode(ckpt)
    assert "µ".encode() in data
    assert decode(data) == ckpt


def test_newer_format_version_is_refused_naming_it() -> None:
    """A file of a newer format version is refused with a message naming both versions."""
    doc = golden_doc("idle")
    doc["format_version"] = FORMAT_VERSION + 1
    message = refused(rehashed(doc))
    assert f"format version {FORMAT_VERSION + 1} is newer" in message


@pytest.mark.parametrize("version", [0, -1, True, "1", 1.0, None])
def test_bad_format_versions_are_refused(version: object) -> None:
    """A format version that is not a known positive integer is refused."""
    doc = golden_doc("idle")
    doc["format_version"] = version
    assert "format_version" in refused(rehashed(doc))


@pytest.mark.parametrize(
    ("where", "key"),
    [((), "uart_2"), (("uart",), "poll_msl"), (("port",), "xoff"), (("meta",), "hostname"),
     (("uart", "statistics"), "frames"), (("port", "counters"), "retries")],
)
def test_unknown_section_or_field_is_refused_naming_it(where: tuple[str, ...], key: str) -> None:
    """A section or field this version does not know is refused, and the message names it."""
    doc = golden_doc("rx-timeout")
    target = doc
    for part in where:
        target = target[part]
    target[key] = 1
    message = refused(rehashed(doc))
    assert key in message and "unknown" in message


def _paths(doc: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for key, value in doc.items():
        paths.append((*prefix, key))
        if isinstance(value, dict):
            paths += _paths(value, (*prefix, key))
    return paths


@pytest.mark.parametrize(
    ("golden", "path"),
    [("idle", p) for p in _paths(golden_doc("idle")) if p != ("sha256",)]
    + [(GOLDEN_V3.name, p) for p in _paths(golden_doc(GOLDEN_V3.name))
       if p[:1] == ("port",)],
    ids=lambda v: ".".join(v) if isinstance(v, tuple) else v[:16],
)
def test_missing_key_is_refused_naming_it(golden: str, path: tuple[str, ...]) -> None:
    """Deleting any key (even one holding an empty value) makes the file invalid, naming it."""
    doc = golden_doc(golden)
    target = doc
    for part in path[:-1]:
        target = target[part]
    del target[path[-1]]
    message = refused(rehashed(doc))
    assert path[-1] in message


def test_missing_hash_is_refused() -> None:
    """A document without its sha256 is refused."""
    doc = golden_doc("idle")
    del doc["sha256"]
    assert "sha256" in refused(json.dumps(doc).encode())


def test_edited_value_without_rehash_fails_integrity() -> None:
    """Changing one value without fixing the hash is detected as corruption."""
    doc = golden_doc("stuck-tx")
    doc["uart"]["tsr_retry"] = 2
    message = refused(json.dumps(doc).encode())
    assert "sha256" in message and "integrity" in message


@pytest.mark.parametrize("bad", ["", "00", "G" * 64, "A" * 64, 5, None])
def test_malformed_hash_is_refused(bad: object) -> None:
    """A sha256 that is not 64 lowercase hex digits is refused."""
    doc = golden_doc("idle")
    doc["sha256"] = bad
    assert "sha256" in refused(json.dumps(doc).encode())


# -- schema: exact JSON types --------------------------------------------------------------

SCHEMA_CASES = [
    (("uart", "ier"), True, "must be an integer"),
    (("uart", "ier"), 1.0, "a float"),
    (("uart", "lsr"), "0x60", "must be an integer"),
    (("uart", "divisor"), 2**64, "64-bit"),
    (("uart", "tsr_busy"), 0, "must be true or false"),
    (("uart", "iir_fifo"), "yes", "must be true or false"),
    (("uart", "tx_retry_limit"), 1.5, "must be an integer"),
    (("uart", "timeout_remaining_ns"), False, "must be an integer"),
    (("uart", "rx_fifo"), "ABC0", "lowercase hex"),
    (("uart", "rx_fifo"), "abc", "even-length"),
    (("uart", "rx_fifo"), "zz", "hex"),
    (("uart", "rx_fifo"), " 00", "hex"),
    (("uart", "rx_fifo"), "00\n", "hex"),
    (("uart", "rx_fifo"), ["00"], "must be a string"),
    (("uart", "statistics"), [], "must be an object"),
    (("uart", "statistics", "breaks"), None, "must be an integer"),
    (("uart",), None, "must be an object"),
    (("port", "reader_state"), "hung", "connected, stalled, disconnected"),
    (("port", "reader_state"), 1, "must be a string"),
    (("port", "tx_backlog"), "0", "even-length"),
    (("port", "line_settings"), "115200 8N1", "must be an object"),
    (("port", "counters", "disconnects"), -1, "must be >= 0"),
    (("port", "counters", "reconnects"), True, "must be an integer"),
    (("meta", "generation"), "3", "must be an integer"),
    (("meta", "uart_name"), 5, "must be a string"),
    (("meta",), [], "must be an object"),
]


@pytest.mark.parametrize(("path", "value", "rule"), SCHEMA_CASES, ids=lambda v: repr(v)[:30])
def test_wrong_types_are_refused_naming_field_and_rule(
    path: tuple[str, ...], value: object, rule: str
) -> None:
    """A value of the wrong JSON type is refused with its field's path and the rule broken."""
    doc = golden_doc("rx-timeout")
    target = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    message = refused(rehashed(doc))
    assert ".".join(path) in message
    assert rule in message


# -- consistency: one test per rule of UartState.validate, through a re-hashed document ---

VALIDATE_RULES = [
    # (golden, changes to the uart section, expected message fragment)
    ("idle", {"rbr": 256}, "rbr: must be an integer 0..255"),
    ("idle", {"lcr": -1}, "lcr: must be an integer 0..255"),
    ("idle", {"msr": 300}, "msr: must be an integer 0..255"),
    ("idle", {"scr": 256}, "scr: must be an integer 0..255"),
    ("idle", {"thr": 256}, "thr: must be an integer 0..255"),
    ("idle", {"tsr": -5}, "tsr: must be an integer 0..255"),
    ("idle", {"lsr": 0x1E0}, "lsr: must be an integer 0..255"),
    ("idle", {"baudbase": 0}, "baudbase: must be a positive integer"),
    ("idle", {"divisor": 0x10000}, "divisor: must be an integer 0..65535"),
    ("idle", {"ier": 0x10}, "ier: only bits 0-3 exist"),
    ("idle", {"mcr": 0x20}, "mcr: only bits 0-4 exist"),
    ("idle", {"fcr": 0xC3}, "fcr: only bits 0xC9 are stored"),
    ("fifo-after-reset", {"fcr": 0x00, "iir_fifo": True}, "iir: FIFO bits set while FCR.FE=0"),
    ("idle", {"lsr": 0xE0}, "lsr: bit 7 (FIFOE) is never set"),
    ("idle", {"rx_fifo": "00" * 17, "lsr": 0x61}, "rx_fifo: must be at most 16 bytes"),
    ("idle", {"tx_fifo": "41" * 17}, "tx_fifo: must be at most 16 bytes"),
    ("idle", {"tsr_retry": -1}, "tsr_retry: must be a non-negative integer"),
    ("idle", {"tx_retry_limit": -1}, "tx_retry_limit: must be None or a non-negative"),
    ("stuck-tx", {"tx_retry_limit": 0}, "tsr_retry=1 exceeds tx_retry_limit=0"),
    ("rx-timeout", {"timeout_remaining_ns": -1}, "timeout_remaining_ns: must be None or >= 0"),
    ("idle", {"statistics": {"breaks": -1}}, "statistics.breaks: must be a non-negative"),
    ("idle", {"tsr_busy": True}, "lsr: tsr not empty but TEMT=1"),
    ("idle", {"lsr": 0x20}, "lsr: tsr empty but TEMT=0"),
    ("idle", {"tsr_retry": 2}, "tsr_retry: tsr empty but tsr_retry=2"),
    ("fifo-after-reset", {"lsr": 0x40}, "lsr: THRE=0 (data waiting) while the tsr is empty"),
    ("stuck-tx", {"thr_ipending": True}, "thr_ipending: THRE interrupt pending while THRE=0"),
    ("stuck-tx", {"lsr": 0x20}, "tx_fifo: 16 bytes queued but THRE=1"),
    ("stuck-tx", {"tx_fifo": ""}, "tx_fifo: empty but THRE=0 (FIFO mode)"),
    ("nonfifo-break", {"tx_fifo": "41"}, "tx_fifo: holds data while FIFOs are disabled"),
    ("rx-timeout", {"rx_fifo": ""}, "rx_fifo: empty but LSR.DR=1 (FIFO mode)"),
    ("rx-timeout", {"lsr": 0x60}, "rx_fifo: holds 6 bytes but LSR.DR=0"),
    ("nonfifo-break", {"rx_fifo": "41"}, "rx_fifo: holds non-NUL data while FIFOs are disabled"),
    ("idle", {"timeout_ipending": True}, "timeout_ipending: set without data"),
    ("nonfifo-break", {"timeout_remaining_ns": 5}, "timeout_remaining_ns: receive timeout armed"),
    (PACED, {"pace": "fast"}, 'pace: must be "none" or "line"'),
    (PACED, {"rx_line": "00" * 257}, "rx_line: must be at most 256 bytes"),
    (PACED, {"pace": "none"}, "tx_shift_remaining_ns: line-rate timing without pace = line"),
    (PACED, {"pace": "none", "tx_shift_remaining_ns": None, "lsr": 0x41, "tx_fifo": "",
             "tx_line": "", "tsr_retry": 0}, "rx_line: line-rate timing without pace = line"),
    (PACED, {"pace": "none", "tx_shift_remaining_ns": None, "lsr": 0x41, "tx_fifo": "",
             "tx_line": "", "tsr_retry": 0, "rx_line": ""},
     "rx_slot_remaining_ns: line-rate timing without pace = line"),
    (PACED, {"rx_slot_remaining_ns": None}, "rx_slot_remaining_ns: None while bytes wait"),
    (PACED, {"tx_line": "00" * 257}, "tx_line: must be at most 256 bytes"),
    (PACED, {"pace": "none", "tx_shift_remaining_ns": None, "lsr": 0x41, "tx_fifo": "",
             "rx_line": "", "rx_slot_remaining_ns": None, "tsr_retry": 0},
     "tx_line: line-rate timing without pace = line"),
    (PACED, {"tsr_busy": True}, "tsr_busy: set with pace = line"),
    (PACED, {"tx_line": ""}, "tsr_retry: tsr empty but tsr_retry=1"),
    (PACED, {"lsr": 0x41}, "lsr: a character is on the line but TEMT=1"),
    (PACED, {"tx_shift_remaining_ns": -1}, "tx_shift_remaining_ns: must be None or >= 0"),
    (PACED, {"rx_slot_remaining_ns": -1}, "rx_slot_remaining_ns: must be None or >= 0"),
]


@pytest.mark.parametrize(("golden", "changes", "fragment"), VALIDATE_RULES,
                         ids=[r[2][:40] for r in VALIDATE_RULES])
def test_each_device_rule_is_enforced_on_load(
    golden: str, changes: dict[str, Any], fragment: str
) -> None:
    """Each rule of UartState.validate refuses a re-hashed document breaking it, naming it."""
    doc = golden_doc(golden)
    for key, value in changes.items():
        if isinstance(value, dict):
            doc["uart"][key].update(value)
        else:
            doc["uart"][key] = value
    message = refused(rehashed(doc))
    assert message.startswith("inconsistent state: ")
    assert fragment in message


def test_device_rule_failure_chains_the_invalid_state_error() -> None:
    """An inconsistent device state is a CheckpointError raised from the InvalidStateError."""
    doc = golden_doc("idle")
    doc["uart"]["tsr_retry"] = 2
    with pytest.raises(CheckpointError) as info:
        decode(rehashed(doc))
    assert isinstance(info.value.__cause__, InvalidStateError)
    assert str(info.value) == "inconsistent state: tsr_retry: tsr empty but tsr_retry=2"


def test_validate_rule_table_covers_every_rule_message() -> None:
    """Every failure message in UartState.validate has a test above (keeps the table honest)."""
    import re

    from sources import class_source

    source = class_source("uartbridge.uart", "UartState")  # the .py, in either build
    rules = re.findall(r'_fail\(\s*"([a-z_]+)"', source)
    covered = {fragment.split(":")[0] for _, _, fragment in VALIDATE_RULES}
    assert rules and set(rules) <= covered, set(rules) - covered


HOST_RULES = [
    # (section path, value, expected fragment)
    (("meta", "generation"), 0, "meta.generation: must be >= 1"),
    (("meta", "generation"), -3, "meta.generation: must be an integer 0..2**63-1"),
    (("meta", "created_unix_ns"), -1, "meta.created_unix_ns: must be an integer 0..2**63-1"),
    (("meta", "uart_name"), "../etc", "meta.uart_name: must be 1 to 32 characters"),
    (("meta", "uart_name"), "", "meta.uart_name: must not be empty"),
    (("meta", "port"), "", "meta.port: must not be empty"),
    (("meta", "port"), "/dev/tty\x1b[2J", "meta.port: must not contain control characters"),
    (("meta", "port"), "x" * 5000, "meta.port: must be at most 4096 characters"),
    (("meta", "uartbridge_version"), "", "meta.uartbridge_version: must not be empty"),
    (("port", "rx_backlog"), "00" * (MAX_RX_BACKLOG_BYTES + 1), "port.rx_backlog: holds"),
    (("port", "tx_backlog"), "00" * (MAX_TX_BACKLOG_BYTES + 1), "port.tx_backlog: holds"),
    (("port", "reader_state"), "CONNECTED", "port.reader_state: must be one of"),
    (("port", "line_settings", "data_bits"), 9, "port.line_settings.data_bits: must be 5..8"),
    (("port", "line_settings", "parity"), "X", "port.line_settings.parity: must be one of"),
    (("port", "line_settings", "stop_bits"), "3", "port.line_settings.stop_bits: must be"),
    (("port", "line_settings", "stop_bits"), 1, "port.line_settings.stop_bits: must be a string"),
    (("port", "line_settings", "stop_bits"), "1.5", "1.5 stop bits exist only with 5 data bits"),
    (("port", "line_settings", "baud"), 0, "port.line_settings.baud: must be a positive"),
    (("port", "line_settings", "break_on"), 1, "port.line_settings.break_on: must be true"),
    (("port", "counters", "bytes_read"), -1, "port.counters.bytes_read: must be >= 0"),
]


@pytest.mark.parametrize(("path", "value", "fragment"), HOST_RULES,
                         ids=[r[2][:40] for r in HOST_RULES])
def test_each_host_path_rule_is_enforced_on_load(
    path: tuple[str, ...], value: object, fragment: str
) -> None:
    """Each metadata and host-path rule refuses a re-hashed document breaking it, naming it."""
    doc = golden_doc("idle")
    target = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    assert fragment in refused(rehashed(doc))


def test_two_stop_bits_with_five_data_bits_is_refused() -> None:
    """Line settings with 5 data bits and 2 stop bits cannot have been applied (1.5 is)."""
    doc = golden_doc("idle")
    doc["port"]["line_settings"].update(data_bits=5, stop_bits="2")
    assert "5 data bits take 1 or 1.5 stop bits" in refused(rehashed(doc))


def test_invalid_port_section_builds_no_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode builds nothing from a state until the whole document has been validated."""
    import uartbridge.checkpoint as checkpoint_module

    built: list[UartState] = []

    class Spy:
        """Stands for Uart16550 where the checkpoint module names it (the class itself
        cannot be patched in the compiled build); counts every device built from a state."""

        @staticmethod
        def from_state(state: UartState, **kwargs: Any) -> Uart16550:
            built.append(state)
            return Uart16550.from_state(state, **kwargs)

    assert checkpoint_module.Uart16550 is Uart16550
    monkeypatch.setattr(checkpoint_module, "Uart16550", Spy)
    doc = golden_doc("stuck-tx")
    doc["port"]["reader_state"] = "gone"
    refused(rehashed(doc))
    assert built == []
    decode(rehashed(golden_doc("stuck-tx")))
    assert len(built) == 1


# -- JSON-level garbage --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty"),
        (b"\xff\xfe{}", "UTF-8"),
        (b"\xef\xbb\xbf{}", "JSON"),
        (b"[]", "not an object"),
        (b"{}", "not a uartbridge checkpoint"),
        (b'{"format": "other"}', "not a uartbridge checkpoint"),
        (b"{" * 100_000, "JSON"),
        (b"[" * 100_000, "JSON"),
        (b'{"a": NaN}', "JSON"),
        (b'{"a": Infinity}', "JSON"),
        (b'{"a": 1' + b"0" * 5000 + b"}", "JSON"),
        (b'{"a": 1, "a": 2}', "duplicate key"),
        (b'{"a": "\\ud800"}', "not a uartbridge"),
        (b"\x00" * 100, "JSON"),
        (b"PK\x03\x04 binary", "JSON"),
    ],
)
def test_garbage_is_refused_as_checkpoint_error(data: bytes, fragment: str) -> None:
    """Empty, binary, non-UTF-8, non-JSON, absurdly nested and non-checkpoint data are refused."""
    assert fragment in refused(data)


def test_lone_surrogate_in_a_string_is_refused() -> None:
    """A string with a lone surrogate (valid JSON, not valid Unicode) is refused, not crashed on."""
    text = rehashed(golden_doc("idle")).decode().replace('"/dev/ttyUSB0"', '"/dev/\\ud800"')
    assert "canonical" in refused(text.encode())


def test_duplicate_key_in_a_section_is_refused() -> None:
    """Two values for one key cannot be told apart by hash re-serialization: refused."""
    text = rehashed(golden_doc("idle")).decode().replace('"scr": 0', '"scr": 0, "scr": 1', 1)
    assert "duplicate key" in refused(text.encode())


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.name)
def test_every_truncation_of_a_golden_file_is_refused(path: Path) -> None:
    """A golden file cut anywhere (a writer killed mid-file, a full disk) is refused."""
    data = path.read_bytes()
    for cut in range(len(data.rstrip())):
        with pytest.raises(CheckpointError):
            decode(data[:cut])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_are_refused(data: bytes) -> None:
    """Random bytes never decode and never raise anything but CheckpointError."""
    with pytest.raises(CheckpointError):
        decode(data)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def mutated_documents(draw: st.DrawFn) -> tuple[bytes, str]:
    """A golden document with a few random edits; re-hashed or not."""
    name = draw(st.sampled_from(sorted(GOLDEN_EXPECTATIONS)))
    doc = golden_doc(name)
    edits = draw(st.integers(1, 3))
    for _ in range(edits):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        parent: Any = doc
        for part in path[:-1]:
            parent = parent[part]
        key = path[-1]
        action = draw(st.sampled_from(["replace", "delete", "add", "retype", "tweak"]))
        if action == "replace":
            parent[key] = draw(JSON_VALUES)
        elif action == "delete":
            del parent[key]
        elif action == "add":
            parent[draw(st.text(max_size=10))] = draw(JSON_VALUES)
        elif action == "retype":
            value = parent[key]
            parent[key] = draw(st.sampled_from([str(value), [value], {"v": value}, None, 1.0]))
        else:
            value = parent[key]
            if type(value) is int:
                parent[key] = value + draw(st.sampled_from([-1, 1, 255, -(2**63), 2**64]))
            elif type(value) is bool:
                parent[key] = not value
            elif isinstance(value, str):
                parent[key] = value + draw(st.sampled_from(["0", "00", "ff", "A", ""]))
    if draw(st.booleans()):
        with contextlib.suppress(CheckpointError):
            doc["sha256"] = content_hash(doc)
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass"), name


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_documents())
def test_mutated_documents_raise_only_checkpoint_error(case: tuple[bytes, str]) -> None:
    """Any mutation either loads as a fully valid checkpoint or is refused with CheckpointError."""
    data, _ = case
    try:
        ckpt = decode(data)
    except CheckpointError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    ckpt.uart.validate()  # whatever loads is a state the device can be in
    # A writer writes only the newest version: an older file comes back upgraded, same state.
    current = dataclasses.replace(
        ckpt, meta=dataclasses.replace(ckpt.meta, format_version=FORMAT_VERSION)
    )
    assert decode(encode(current)) == current


# -- round trip of every state the model reaches ---------------------------------------------

REGISTER_WRITES = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 7), st.integers(0, 255)),
    st.tuples(st.just("write"), st.just(0), st.integers(0, 255)),
    st.tuples(st.just("write"), st.just(1), st.integers(0, 15)),
    st.tuples(st.just("write"), st.just(2), st.sampled_from([0x00, 0x01, 0x07, 0x41, 0x81, 0xC7])),
    st.tuples(st.just("write"), st.just(3), st.sampled_from([0x00, 0x03, 0x1B, 0x43, 0x80])),
    st.tuples(st.just("write"), st.just(4), st.sampled_from([0x00, 0x0B, 0x10, 0x1B])),
)
OPERATIONS = st.one_of(
    REGISTER_WRITES,
    st.tuples(st.just("read"), st.integers(0, 7)),
    st.tuples(st.just("receive"), st.binary(min_size=1, max_size=20)),
    st.tuples(st.just("break")),
    st.tuples(st.just("line_error"), st.booleans(), st.booleans()),
    st.tuples(st.just("tx_sent"), st.integers(0, 20)),
    st.tuples(st.just("tx_blocked")),
    st.tuples(st.just("advance"), st.integers(0, 3_000_000)),
    st.tuples(st.just("modem"), st.integers(0, 15)),
    st.tuples(st.just("reset")),
)


def apply(uart: Uart16550, clock: FakeClock, op: tuple[Any, ...]) -> object:
    """Apply one operation; returns what the outside world sees of it."""
    kind = op[0]
    if kind == "write":
        uart.write(op[1], op[2])
        result: object = None
    elif kind == "read":
        result = uart.read(op[1])
    elif kind == "receive":
        result = uart.receive(op[1])
    elif kind == "break":
        result = uart.receive_break()
    elif kind == "line_error":
        result = uart.receive_line_error(parity=op[1], framing=op[2])
    elif kind == "tx_sent":
        n = min(op[1], len(uart.tx_pending()))
        uart.tx_sent(n)
        result = n
    elif kind == "tx_blocked":
        result = bool(uart.tx_pending()) and uart.tx_blocked() is None
    elif kind == "advance":
        clock.advance(op[1])
        uart.poll()
        result = None
    elif kind == "modem":
        bits = op[1]
        uart.set_modem_inputs(cts=bool(bits & 1), dsr=bool(bits & 2), ri=bool(bits & 4),
                              dcd=bool(bits & 8))
        result = None
    else:
        uart.reset()
        result = None
    return (result, uart.irq, uart.tx_pending(), uart.can_receive(), uart.take_events())


READER_STATES = st.sampled_from(list(ReaderState))
LINE_SETTINGS = st.none() | st.builds(
    LineSettings,
    baud=st.integers(1, 4_000_000),
    data_bits=st.integers(6, 8),
    parity=st.sampled_from(["N", "O", "E", "M", "S"]),
    stop_bits=st.sampled_from([1.0, 2.0]),
    break_on=st.booleans(),
)
PORT_STATES = st.builds(
    PortState,
    rx_backlog=st.binary(max_size=64),
    tx_backlog=st.binary(max_size=64),
    reader_state=READER_STATES,
    line_settings=LINE_SETTINGS,
    counters=st.builds(PortCounters, **{
        f.name: st.integers(0, 2**63 - 1) for f in dataclasses.fields(PortCounters)
    }),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    retry_limit=st.none() | st.integers(0, 4),
    before=st.lists(OPERATIONS, max_size=60),
    after=st.lists(OPERATIONS, max_size=30),
    port=PORT_STATES,
    generation=st.integers(1, 2**62),
)
def test_round_trip_is_identity_and_restored_device_behaves_identically(
    retry_limit: int | None,
    before: list[tuple[Any, ...]],
    after: list[tuple[Any, ...]],
    port: PortState,
    generation: int,
) -> None:
    """decode(encode(c)) == c for every reached state, and the restored device acts the same."""
    clock = FakeClock()
    uart = Uart16550(clock=clock, tx_retry_limit=retry_limit)
    for op in before:
        apply(uart, clock, op)
    ckpt = make_checkpoint(uart.state(), port, generation=generation)
    loaded = decode(encode(ckpt))
    assert loaded == ckpt

    other_clock = FakeClock()
    other_clock.now_ns = clock.now_ns + 7_000_000_000_000  # resumed elsewhere, later
    twin = restore(loaded, clock=other_clock)
    assert twin.state() == uart.state()
    uart.take_events()
    twin.take_events()
    for op in after:
        assert apply(twin, other_clock, op) == apply(uart, clock, op), op
        assert twin.state() == uart.state()


def test_encode_refuses_an_inconsistent_state() -> None:
    """A checkpoint the reader would refuse is never written."""
    bad = dataclasses.replace(Uart16550(clock=lambda: 0).state(), tsr_retry=3)
    with pytest.raises(CheckpointError, match="tsr empty but tsr_retry=3"):
        encode(make_checkpoint(bad))


def test_encode_refuses_an_unwritable_format_version() -> None:
    """The writer writes only the current format version."""
    ckpt = make_checkpoint()
    old = dataclasses.replace(ckpt, meta=dataclasses.replace(ckpt.meta, format_version=99))
    with pytest.raises(CheckpointError, match="format_version"):
        encode(old)


def test_restore_maps_invalid_state_to_checkpoint_error() -> None:
    """restore() of a hand-built inconsistent checkpoint raises CheckpointError, not ValueError."""
    bad = dataclasses.replace(Uart16550(clock=lambda: 0).state(), lsr=0x20)
    with pytest.raises(CheckpointError, match="TEMT=0"):
        restore(make_checkpoint(bad), clock=FakeClock())


# -- files ----------------------------------------------------------------------------------


def test_checkpoint_path_and_previous_path() -> None:
    """Files are <dir>/<name>.checkpoint.json; the previous one <name>.checkpoint.prev.json."""
    path = checkpoint_path("/var/lib/uartbridge", "ttyS0")
    assert path == Path("/var/lib/uartbridge/ttyS0.checkpoint.json")
    assert previous_path(path) == Path("/var/lib/uartbridge/ttyS0.checkpoint.prev.json")


@pytest.mark.parametrize(
    "name", ["", "../x", "a/b", ".hidden", "x" * 33, "_x", "-x", "..", "tty S0", "é"]
)
def test_checkpoint_path_refuses_unsafe_names(name: str) -> None:
    """A UART name that could escape the state directory or hide a file is refused."""
    with pytest.raises(ValueError, match="UART name"):
        checkpoint_path("/tmp", name)


def test_write_is_mode_0600_and_reads_back(tmp_path: Path) -> None:
    """A written checkpoint is private (0600) and reads back equal."""
    path = checkpoint_path(tmp_path, "ttyS0")
    ckpt = make_checkpoint(generation=1)
    write_checkpoint(path, ckpt)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_checkpoint(path) == ckpt


def test_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """Each write keeps the one before as .prev; both are private and valid."""
    path = checkpoint_path(tmp_path, "ttyS0")
    for generation in (1, 2, 3):
        write_checkpoint(path, make_checkpoint(generation=generation))
    assert read_checkpoint(path).meta.generation == 3
    assert read_checkpoint(previous_path(path)).meta.generation == 2
    assert stat.S_IMODE(previous_path(path).stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ttyS0.checkpoint.json", "ttyS0.checkpoint.prev.json"
    ]


def test_write_does_not_push_out_a_good_previous_with_a_corrupt_current(tmp_path: Path) -> None:
    """A corrupt current file is overwritten, but never kept in place of the good previous one."""
    path = checkpoint_path(tmp_path, "ttyS0")
    write_checkpoint(path, make_checkpoint(generation=1))
    write_checkpoint(path, make_checkpoint(generation=2))
    path.write_bytes(path.read_bytes()[:100])
    write_checkpoint(path, make_checkpoint(generation=3))
    assert read_checkpoint(path).meta.generation == 3
    assert read_checkpoint(previous_path(path)).meta.generation == 1


def test_write_to_a_missing_directory_is_a_checkpoint_error(tmp_path: Path) -> None:
    """A checkpoint that cannot be written raises CheckpointError naming the path."""
    path = checkpoint_path(tmp_path / "absent", "ttyS0")
    with pytest.raises(CheckpointError, match="cannot write"):
        write_checkpoint(path, make_checkpoint())


def test_latest_is_none_without_files(tmp_path: Path) -> None:
    """No checkpoint files: None, and no problems to report."""
    problems: list[str] = []
    assert latest_checkpoint(tmp_path, "ttyS0", problems=problems) is None
    assert problems == []


def test_latest_prefers_the_current_file(tmp_path: Path) -> None:
    """With both files valid, the current (newest generation) one is returned with its path."""
    path = checkpoint_path(tmp_path, "ttyS0")
    write_checkpoint(path, make_checkpoint(generation=4))
    write_checkpoint(path, make_checkpoint(generation=5))
    found = latest_checkpoint(tmp_path, "ttyS0")
    assert found is not None
    assert found[0].meta.generation == 5 and found[1] == path


def test_latest_falls_back_to_previous_and_says_why(tmp_path: Path) -> None:
    """A corrupt current file is skipped for the previous one, and the reason names the file."""
    path = checkpoint_path(tmp_path, "ttyS0")
    write_checkpoint(path, make_checkpoint(generation=1))
    write_checkpoint(path, make_checkpoint(generation=2))
    doc = json.loads(path.read_text())
    doc["uart"]["tsr_retry"] = 9
    path.write_text(json.dumps(doc))
    problems: list[str] = []
    found = latest_checkpoint(tmp_path, "ttyS0", problems=problems)
    assert found is not None and found[0].meta.generation == 1
    assert found[1] == previous_path(path)
    assert len(problems) == 1 and str(path) in problems[0] and "sha256" in problems[0]


def test_latest_with_only_invalid_files_returns_none_with_reasons(tmp_path: Path) -> None:
    """Checkpoints that exist but are all invalid give None and one reason per file."""
    path = checkpoint_path(tmp_path, "ttyS0")
    path.write_text("{")
    previous_path(path).write_bytes(b"")
    problems: list[str] = []
    assert latest_checkpoint(tmp_path, "ttyS0", problems=problems) is None
    assert len(problems) == 2


def test_latest_skips_a_checkpoint_of_another_uart(tmp_path: Path) -> None:
    """A file holding another UART's checkpoint (a copy gone wrong) is not resumed."""
    path = checkpoint_path(tmp_path, "ttyS0")
    write_checkpoint(path, make_checkpoint(name="ttyS1"))
    problems: list[str] = []
    assert latest_checkpoint(tmp_path, "ttyS0", problems=problems) is None
    assert "ttyS1" in problems[0]


def test_latest_picks_the_higher_generation(tmp_path: Path) -> None:
    """If the previous file is somehow newer, the higher generation wins."""
    path = checkpoint_path(tmp_path, "ttyS0")
    write_checkpoint(path, make_checkpoint(generation=9))
    write_checkpoint(path, make_checkpoint(generation=3))
    found = latest_checkpoint(tmp_path, "ttyS0")
    assert found is not None and found[0].meta.generation == 9


def test_leftover_temp_files_are_ignored_and_cleaned(tmp_path: Path) -> None:
    """Temp files of a killed writer don't confuse the loader; the next write removes them."""
    path = checkpoint_path(tmp_path, "ttyS0")
    write_checkpoint(path, make_checkpoint(generation=1))
    stale = tmp_path / ".ttyS0.checkpoint.json.tmp-0123456789abcdef"
    stale.write_bytes(encode(make_checkpoint(generation=99))[:50])
    other = tmp_path / ".ttyS1.checkpoint.json.tmp-0123456789abcdef"
    other.write_bytes(b"someone else's")
    found = latest_checkpoint(tmp_path, "ttyS0")
    assert found is not None and found[0].meta.generation == 1
    write_checkpoint(path, make_checkpoint(generation=2))
    assert not stale.exists()
    assert other.exists()


def test_read_missing_file_is_checkpoint_missing_error(tmp_path: Path) -> None:
    """A missing file is CheckpointMissingError (exit 66), naming the path."""
    with pytest.raises(CheckpointMissingError, match=r"absent\.json"):
        read_checkpoint(tmp_path / "absent.json")


def test_read_directory_or_fifo_is_checkpoint_missing_error(tmp_path: Path) -> None:
    """A directory or a FIFO is not a readable checkpoint (and reading never blocks)."""
    with pytest.raises(CheckpointMissingError, match="directory"):
        read_checkpoint(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointMissingError, match="not a regular file"):
        read_checkpoint(fifo)


def test_read_invalid_file_names_the_path(tmp_path: Path) -> None:
    """An invalid file's error message starts with its path."""
    path = tmp_path / "bad.json"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert not isinstance(info.value, CheckpointMissingError)
    assert str(info.value).startswith(str(path))


# -- crash safety: SIGKILL a writer at random moments ---------------------------------------------

KILL_ROUNDS = 250

# A fork server: imports once, then per "go" line forks a writer that resumes from the newest
# valid checkpoint and writes generation after generation until it is SIGKILLed.
WRITER = r"""
import os, sys
from pathlib import Path
from uartbridge.checkpoint import (Checkpoint, CheckpointMeta, checkpoint_path,
    latest_checkpoint, write_checkpoint)
from uartbridge.port.state import PortState, ReaderState
from uartbridge.uart import Uart16550
exec(sys.argv[2])
state_dir = Path(sys.argv[1])
path = checkpoint_path(state_dir, "ttyS0")
uart_state = Uart16550(clock=lambda: 0).state()
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        found = latest_checkpoint(state_dir, "ttyS0")
        generation = found[0].meta.generation if found else 0
        first = True
        while True:
            generation += 1
            write_checkpoint(path, Checkpoint(
                meta=CheckpointMeta(uart_name="ttyS0", port="pty:", created_unix_ns=generation,
                                    generation=generation),
                uart=uart_state,
                port=PortState(tx_backlog=payload(generation),
                               reader_state=ReaderState.DISCONNECTED)))
            if first:
                print(os.getpid(), generation, flush=True)
                first = False
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""
PAYLOAD = (
    "def payload(generation):\n"
    "    return bytes([generation % 251]) * (generation * 37 % 3000)\n"
)


def payload(generation: int) -> bytes:
    """The TX backlog the writer puts in checkpoint ``generation`` (same code as the writer's)."""
    namespace: dict[str, Any] = {}
    exec(PAYLOAD, namespace)
    result: bytes = namespace["payload"](generation)
    return result


def test_writer_killed_at_random_moments_leaves_a_whole_checkpoint(tmp_path: Path) -> None:
    """SIGKILL at any instant of writing leaves the old or the new checkpoint whole, never less."""
    rng = random.Random(20_25)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), PAYLOAD],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )
    assert server.stdin is not None and server.stdout is not None
    newest = 0
    interrupted = 0
    try:
        for _ in range(KILL_ROUNDS):
            server.stdin.write("go\n")
            server.stdin.flush()
            pid_text, first_generation = server.stdout.readline().split()
            time.sleep(rng.uniform(0, 0.006))
            os.kill(int(pid_text), signal.SIGKILL)
            assert server.stdout.readline() == "reaped\n"

            problems: list[str] = []
            found = latest_checkpoint(tmp_path, "ttyS0", problems=problems)
            assert problems == []
            assert found is not None
            ckpt, _ = found
            generation = ckpt.meta.generation
            assert generation >= int(first_generation) and generation >= newest
            assert ckpt.port.tx_backlog == payload(generation)
            assert ckpt.meta.created_unix_ns == generation
            newest = generation
            previous = previous_path(checkpoint_path(tmp_path, "ttyS0"))
            if previous.exists():  # equal when killed between keeping it and the final rename
                assert read_checkpoint(previous).meta.generation <= generation
            temps = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
            assert len(temps) <= 2, temps  # only what the killed write itself left
            interrupted += bool(temps)
    finally:
        server.stdin.close()
        server.wait(timeout=10)
    print(f"{KILL_ROUNDS} kills, {interrupted} inside a write, newest generation {newest}")
    assert interrupted > 0, "no kill landed inside a write; the test proves nothing"
    write_checkpoint(checkpoint_path(tmp_path, "ttyS0"), make_checkpoint(generation=newest + 1))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_statistics_fields_are_all_stored() -> None:
    """Every UartStatistics and PortCounters field has a key (a new counter cannot be dropped)."""
    doc = to_document(make_checkpoint())
    assert set(doc["uart"]["statistics"]) == {f.name for f in dataclasses.fields(UartStatistics)}
    assert set(doc["port"]["counters"]) == {f.name for f in dataclasses.fields(PortCounters)}


def test_encode_refuses_integers_a_reader_could_not_read() -> None:
    """A counter beyond 64 bits is refused when writing, not discovered when resuming."""
    state = dataclasses.replace(
        Uart16550(clock=lambda: 0).state(), statistics=UartStatistics(bytes_received=2**64)
    )
    with pytest.raises(CheckpointError, match=r"statistics\.bytes_received: must fit"):
        encode(make_checkpoint(state))


def test_keep_previous_false_leaves_the_previous_file_alone(tmp_path: Path) -> None:
    """write_checkpoint(keep_previous=False) replaces the current file and keeps no previous."""
    path = checkpoint_path(tmp_path, "uart0")
    write_checkpoint(path, make_checkpoint(generation=1), keep_previous=False)
    write_checkpoint(path, make_checkpoint(generation=2), keep_previous=False)
    assert read_checkpoint(path).meta.generation == 2
    assert not previous_path(path).exists()
