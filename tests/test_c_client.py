"""libuartbridge (clients/c) against the real daemon, and its decoder against the Python codec.

The library and its test programs are built with ``make`` into a temporary directory. The C
checks (``clients/c/tests/ub_check.c``) run as separate processes against a real
``python -m uartbridge run`` whose port is a socat null-modem; this file plays the far end
and the operator (restarting the daemon), all by PID.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from native import C_DIR, Program, bridge, build_c, far_gets, make
from procs import require_program

from uartbridge.bus.codec import (
    MAX_FRAME_LEN,
    Deadline,
    ErrorFrame,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
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
    encode,
    frame_bytes,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cbuild(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """libuartbridge and its test programs, built with make in a temporary directory."""
    return build_c(tmp_path_factory.mktemp("cbuild"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_c_register_semantics(cbuild: Path, tmp_path: Path) -> None:
    """C client: SCR round trip, WRITE_N/READ_N counts, LSR after THR, DLAB, pipelined reads."""
    with bridge(tmp_path) as (d, far), Program(cbuild / "ub_check", "semantics", d.bus()) as p:
        p.expect("ok semantics")
        p.finish()
        far_gets(far, b"x")


def test_c_irq_events_before_replies_over_tcp(cbuild: Path, tmp_path: Path) -> None:
    """C client over TCP, never spinning: IRQ events come before the replies that observe them."""
    port = _free_port()
    with (
        bridge(tmp_path, bus_tcp=f"127.0.0.1:{port}") as (_d, far),
        Program(cbuild / "ub_check", "irq", f"tcp:127.0.0.1:{port}") as p,
    ):
        p.expect("> send Q")
        os.write(far.fd, b"Q")
        p.expect("ok irq")
        p.finish()
        far_gets(far, b"zyw")


def test_c_bursts_write_n_4095_and_read_n(cbuild: Path, tmp_path: Path) -> None:
    """C client: write_n of 4095 bytes reaches the far end whole; read_n drains 3000 bytes."""
    sent = bytes((i * 7 + 3) & 0xFF for i in range(4095))
    typed = bytes((i * 13 + 5) & 0xFF for i in range(3000))
    with (
        bridge(tmp_path) as (d, far),
        Program(cbuild / "ub_check", "burst", d.bus(), "4095") as p,
    ):
        p.expect("> sent burst")
        far_gets(far, sent)
        p.expect("> ready rx")
        os.write(far.fd, typed)
        line = p.expect("> rx ")
        _, _, count, data = line.split(" ", 3)
        assert int(count) == len(typed)
        assert bytes.fromhex(data) == typed
        p.expect("ok burst")
        p.finish()


def test_c_client_reconnects_after_daemon_restart(cbuild: Path, tmp_path: Path) -> None:
    """C client: SHUTTING_DOWN surfaces at a stop; after the restart it reconnects, state kept."""
    with bridge(tmp_path) as (d, _far), Program(cbuild / "ub_check", "reconnect", d.bus()) as p:
        p.expect("> restart now")
        assert d.stop() == 0
        d.start()
        assert "resumed" in d.log()
        p.send("go")
        p.expect("ok reconnect")
        p.finish()


def test_c_client_refused_busy_and_malformed(cbuild: Path, tmp_path: Path) -> None:
    """C client: a second guest gets ERROR BUSY; a bad frame's MALFORMED code is surfaced."""
    with bridge(tmp_path) as (d, _far), Program(cbuild / "ub_check", "refused", d.bus()) as p:
        busy = p.expect("> busy ")
        assert "bus server error BUSY" in busy
        malformed = p.expect("> malformed ")
        assert "bus server error MALFORMED" in malformed
        p.expect("ok refused")
        p.finish()


def test_c_client_not_permitted_for_another_user(cbuild: Path, tmp_path: Path) -> None:
    """C client run by an unprivileged user over loopback TCP gets ERROR NOT_PERMITTED."""
    useradd = require_program("useradd")
    userdel = require_program("userdel")
    setpriv = require_program("setpriv")
    if os.geteuid() != 0:
        pytest.skip("needs root to create a user")
    user = f"ubc-{secrets.token_hex(6)}"  # fresh: never an account we did not create
    exe_dir = Path(tempfile.mkdtemp(prefix="ub-cexe-"))
    port = _free_port()
    try:
        subprocess.run([useradd, "--no-create-home", "--shell", "/usr/sbin/nologin", user],
                       check=True, capture_output=True, timeout=60)
        entry = pwd.getpwnam(user)
        exe_dir.chmod(0o755)
        exe = exe_dir / "ub_check"
        shutil.copy2(cbuild / "ub_check", exe)
        exe.chmod(0o755)
        drop = [setpriv, f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]
        with (
            bridge(tmp_path, bus_tcp=f"127.0.0.1:{port}"),
            Program(exe, "connect", f"tcp:127.0.0.1:{port}", preexec=drop) as p,
        ):
            line = p.expect("> connect ")
            assert line.startswith("> connect UB_E_REFUSED 8 bus server error NOT_PERMITTED"), line
            p.finish()
    finally:
        subprocess.run([userdel, user], capture_output=True, timeout=60)
        shutil.rmtree(exe_dir, ignore_errors=True)


def test_c_irq_echo_example_serves_interrupts_from_a_poll_loop(
    cbuild: Path, tmp_path: Path
) -> None:
    """examples/irq_echo.c: poll() on ub_fd, service on IRQ events, echo what the far end types."""
    typed = b"typed at the far end, echoed by an interrupt handler\r\n"
    with bridge(tmp_path) as (d, far), Program(cbuild / "ub_irq_echo", d.bus()) as p:
        p.expect("irq_echo: serving uart0")
        for i in range(0, len(typed), 9):  # in pieces: several interrupts
            os.write(far.fd, typed[i : i + 9])
            far_gets(far, typed[: i + 9])
        os.write(far.fd, b"q")
        p.finish()
        far_gets(far, typed + b"q")


def test_c_connect_waits_out_a_full_unix_backlog(cbuild: Path, tmp_path: Path) -> None:
    """ub_connect retries a Unix listener whose backlog is full (EAGAIN) until it is accepted.

    The server is a fake (a Python listener that is slow to accept): the daemon accepts at
    once, so only a listener that does not can show the full backlog.
    """
    path = tmp_path / "slow.bus"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.bind(str(path))
        listener.listen(0)
        while True:  # fill the backlog: a non-blocking connect then fails with EAGAIN
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            fillers.append(filler)
            filler.setblocking(False)
            try:
                filler.connect(str(path))
            except BlockingIOError:
                fillers.pop().close()
                break
        with Program(cbuild / "ub_check", "connect", path) as p:
            time.sleep(0.3)  # the client is retrying now
            listener.settimeout(20)
            for _ in fillers:
                listener.accept()[0].close()
            guest, _ = listener.accept()
            with guest:
                guest.settimeout(20)
                assert guest.recv(5) == encode(Hello(1))
                guest.sendall(encode(HelloReply(1, 7, False, "slow")))
                assert p.expect("> connect ").startswith("> connect UB_OK 0")
                p.finish()
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_c_connect_times_out_on_a_silent_server(cbuild: Path, tmp_path: Path) -> None:
    """ub_connect to a server that never answers HELLO fails with UB_E_TIMEOUT, not a hang.

    The server is a fake (a listener that accepts and stays silent): the daemon always answers.
    """
    path = tmp_path / "silent.bus"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        with Program(cbuild / "ub_check", "connect", path, "300") as p:
            line = p.expect("> connect ")
            assert line == "> connect UB_E_TIMEOUT 0 no HELLO_REPLY from the server within 300 ms"
            p.finish()


def test_c_library_installs_with_pkg_config(tmp_path: Path) -> None:
    """`make install` gives a pkg-config file; the example built with it runs on the .so."""
    pkg_config = require_program("pkg-config")
    cc = require_program("cc")
    prefix = tmp_path / "prefix"
    make(C_DIR, tmp_path / "build", "install", PREFIX=str(prefix))
    env = dict(os.environ, PKG_CONFIG_PATH=str(prefix / "lib" / "pkgconfig"))
    flags = subprocess.run(
        [pkg_config, "--cflags", "--libs", "uartbridge"],
        env=env, capture_output=True, text=True, check=True, timeout=30,
    ).stdout.split()
    assert f"-I{prefix / 'include'}" in flags and "-luartbridge" in flags
    exe = tmp_path / "hello"
    subprocess.run(
        [cc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-o", str(exe),
         str(C_DIR / "examples" / "hello.c"), *flags],
        check=True, capture_output=True, timeout=120,
    )
    needed = subprocess.run(["readelf", "-d", str(exe)], capture_output=True, text=True,
                            timeout=30).stdout
    assert "libuartbridge.so.0" in needed  # linked to the shared library
    run_env = dict(os.environ, LD_LIBRARY_PATH=str(prefix / "lib"))
    with bridge(tmp_path) as (d, far), Program(exe, d.bus(), env=run_env) as p:
        far_gets(far, b"hello from C\r\n")
        os.write(far.fd, b"echo")
        far_gets(far, b"hello from C\r\necho")
        os.write(far.fd, b"q")
        p.finish()


# -- the decoder and the receive path, against the Python codec ----------------------------


@pytest.fixture(scope="module")
def decoder(cbuild: Path) -> Iterator[Program]:
    """The ub_decode program, one request per line."""
    with Program(cbuild / "ub_decode") as program:
        yield program


def _ask(program: Program, request: str, stream: bytes) -> str:
    program.send(f"{request} {stream.hex()}")
    return program.expect("", timeout_s=30)


def _raw_frames(stream: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each complete frame, validity aside (for ERROR's raw message)."""
    pos = 0
    while len(stream) - pos >= 3:
        length = int.from_bytes(stream[pos : pos + 2], "big")
        if not 1 <= length <= MAX_FRAME_LEN or len(stream) - pos < 2 + length:
            return
        yield stream[pos + 2], stream[pos + 3 : pos + 2 + length]
        pos += 2 + length


def _token(frame: Frame, payload: bytes) -> str:
    match frame:
        case Hello(version):
            return f"hello:{version}"
        case Read(offset):
            return f"read:{offset}"
        case Write(offset, value):
            return f"write:{offset}:{value}"
        case WriteN(offset, data):
            return f"write_n:{offset}:{data.hex()}"
        case ReadN(offset, count):
            return f"read_n:{offset}:{count}"
        case Sync(token):
            return f"sync:{token}"
        case HelloReply(version, caps, irq, name):
            return f"hello_reply:{version}:{caps}:{int(irq)}:{name.encode().hex()}"
        case ReadReply(offset, value):
            return f"read_reply:{offset}:{value}"
        case ReadNReply(offset, data):
            return f"read_n_reply:{offset}:{data.hex()}"
        case SyncReply(token):
            return f"sync_reply:{token}"
        case IrqEvent(level):
            return f"irq:{int(level)}"
        case Time(now_ns):
            return f"time:{now_ns}"
        case Deadline(deadline_ns):
            return f"deadline:{'none' if deadline_ns is None else deadline_ns}"
        case ErrorFrame(code, _message):
            return f"error:{code}:{payload[1:].hex()}"  # the raw bytes, not the decoded text
    raise AssertionError(f"no token for {frame!r}")


def _python_frames(stream: bytes) -> str:
    """What ub_decode's "frames" mode must answer, by uartbridge.bus.codec."""
    decoder = FrameDecoder()
    decoder.feed(stream)
    raw = _raw_frames(stream)
    tokens = []
    while True:
        try:
            frame = decoder.next_frame()
        except FrameError as exc:
            return " ".join([*tokens, f"err:{int(exc.code)}"])
        if frame is None:
            return " ".join([*tokens, f"end:{decoder.buffered}"])
        tokens.append(_token(frame, next(raw)[1]))


def _python_client(stream: bytes, close_at_end: bool) -> str:
    """What a client receiving ``stream`` after its HELLO must report (uartbridge.h rules).

    HELLO_REPLY must come first and carry BURST|SYNC|IRQ_EVENTS (``ub_name`` is a C string,
    cut at a NUL); then IRQ frames are events
    (a repeated level is none), an ERROR ends with UB_E_REFUSED and its code and message (cut
    at 255 bytes), any other frame or a bad one with UB_E_PROTOCOL, the end of the stream
    with UB_E_CLOSED if the server closed, else "idle" with every frame handled.
    """
    decoder = FrameDecoder()
    decoder.feed(stream)
    raw = _raw_frames(stream)
    tokens: list[str] = []
    hello: str | None = None
    level = False

    def end(status: str, code: int = 0, message: bytes = b"") -> str:
        tail = [hello] if hello else []
        status_token = f"status:{status}:{code}:{message[:255].hex()}"
        return " ".join([*tokens, *tail, f"level:{int(level)}", status_token])

    while True:
        try:
            frame = decoder.next_frame()
        except FrameError:
            return end("UB_E_PROTOCOL")
        if frame is None:
            return end("UB_E_CLOSED") if close_at_end else end("idle")
        payload = next(raw)[1]
        if isinstance(frame, ErrorFrame):
            return end("UB_E_REFUSED", frame.code, payload[1:])
        if hello is None:
            if not isinstance(frame, HelloReply) or frame.capabilities & 7 != 7:
                return end("UB_E_PROTOCOL")
            name = frame.name.split("\0")[0].encode()  # a C string ends at a NUL
            hello = f"hello:{frame.version}:{frame.capabilities}:{name.hex()}"
        elif not isinstance(frame, IrqEvent):
            return end("UB_E_PROTOCOL")
        new_level = frame.irq if isinstance(frame, HelloReply) else frame.level
        if new_level != level:
            level = new_level
            tokens.append(f"irq:{int(level)}")


# A server's stream: valid frames of every type, frames with arbitrary headers and payloads
# (wrong sizes, offsets, levels, types, lengths 0 and > 4096), and loose bytes.
_names = st.text(max_size=40).filter(lambda s: len(s.encode()) <= 255)
_valid = st.one_of(
    st.builds(HelloReply, st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.booleans(),
              _names),
    st.builds(HelloReply, st.just(1), st.just(7), st.booleans(), _names),
    st.builds(IrqEvent, st.booleans()),
    st.builds(IrqEvent, st.booleans()),
    st.builds(ErrorFrame, st.integers(0, 255), st.text(max_size=300)),
    st.builds(ReadReply, st.integers(0, 7), st.integers(0, 255)),
    st.builds(ReadNReply, st.integers(0, 7), st.binary(max_size=300)),
    st.builds(SyncReply, st.integers(0, 0xFFFFFFFF)),
    st.builds(Read, st.integers(0, 7)),
    st.builds(Write, st.integers(0, 7), st.integers(0, 255)),
    st.builds(WriteN, st.integers(0, 7), st.binary(min_size=1, max_size=50)),
    st.builds(ReadN, st.integers(0, 7), st.integers(1, 4094)),
    st.builds(Sync, st.integers(0, 0xFFFFFFFF)),
    st.builds(Hello, st.integers(0, 0xFFFF)),
    st.builds(Time, st.integers(0, 2**64 - 2)),  # v2: the decoder knows them too
    st.builds(Deadline, st.one_of(st.none(), st.integers(0, 2**64 - 2))),
).map(encode)
_types = st.sampled_from([int(t) for t in FrameType] + [0x00, 0x07, 0x80, 0x83, 0x91, 0xFE])
_odd = st.one_of(
    st.builds(frame_bytes, _types, st.binary(max_size=12)),
    st.binary(max_size=8).map(  # a HELLO_REPLY whose name may not be UTF-8
        lambda name: frame_bytes(FrameType.HELLO_REPLY, b"\0\1\0\0\0\7\0" + name)
    ),
    st.integers(0, 0xFFFF).map(lambda n: n.to_bytes(2, "big")),
    st.binary(min_size=1, max_size=6),
)
_piece = st.one_of(_valid, _valid, _valid, _odd)
_hello = st.builds(HelloReply, st.just(1), st.just(7), st.booleans(), _names).map(encode)
_streams = st.tuples(st.one_of(_hello, st.just(b"")), st.lists(_piece, max_size=12)).map(
    lambda parts: parts[0] + b"".join(parts[1])
)
# For the client: whether the server stays connected at the end. Only after a whole
# HELLO_REPLY, or the client would wait out its timeout for one.
_client_streams = st.tuples(_hello, st.lists(_piece, max_size=12), st.booleans()).map(
    lambda parts: (parts[0] + b"".join(parts[1]), parts[2])
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=_streams, seed=st.integers(0, 2**32 - 1))
def test_c_frame_decoder_matches_python_codec(
    decoder: Program, stream: bytes, seed: int
) -> None:
    """ub_parse_frame, fed in random chunks, decodes every stream exactly as the codec does."""
    assert _ask(decoder, f"frames {seed}", stream) == _python_frames(stream)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=_streams, seed=st.integers(0, 2**32 - 1))
def test_c_client_receive_path_follows_the_protocol(
    decoder: Program, stream: bytes, seed: int
) -> None:
    """A client fed any server stream in random chunks reports the events and status it must."""
    assert _ask(decoder, f"client {seed} 1", stream) == _python_client(stream, True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_client_streams, seed=st.integers(0, 2**32 - 1))
def test_c_client_leaves_no_frame_behind_a_quiet_fd(
    decoder: Program, case: tuple[bytes, bool], seed: int
) -> None:
    """Once its fd is quiet, the client has handled every complete frame it received."""
    stream, close_at_end = case
    request = f"client {seed} {int(close_at_end)}"
    assert _ask(decoder, request, stream) == _python_client(stream, close_at_end)
