"""TCP peers: identified by one sock_diag query, refused unless positively permitted, or
authenticated by HELLO's token; nothing they sent runs before that."""

from __future__ import annotations

import asyncio
import builtins
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from test_bus_support import RawGuest, read_reg, serve, sync

from uartbridge import Uart16550
from uartbridge.bus import (
    BusServer,
    ErrorCode,
    Hello,
    HelloReply,
    Read,
    ReadReply,
    VirtualWire,
    Write,
    WriteN,
    decode_frame,
    encode,
)
from uartbridge.registers import FCR, SCR, THR
from uartbridge.sockdiag import (
    TCP_ESTABLISHED,
    DiagSocket,
    SockDiag,
    identify_tcp_peer,
    is_local_address,
)
from uartbridge.sockets import PeerCredentials

# Every test here runs on asyncio's loop and on uvloop's (the daemon's two loops).
pytestmark = pytest.mark.usefixtures("each_event_loop")

TOKEN = b"s3cret-token-for-tests"


@pytest.fixture
def diag() -> Any:
    d = SockDiag()
    try:
        yield d
    finally:
        d.close()


def _pair(family: socket.AddressFamily, listen_on: str, connect_to: str) -> tuple[
    socket.socket, socket.socket, socket.socket
]:
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind((listen_on, 0))
    except OSError as exc:
        listener.close()
        pytest.skip(f"no {listen_on} here: {exc}")
    listener.listen(1)
    client = socket.create_connection((connect_to, listener.getsockname()[1]))
    accepted, _ = listener.accept()
    return listener, client, accepted


@pytest.mark.parametrize(
    ("family", "listen_on", "connect_to"),
    [
        (socket.AF_INET, "127.0.0.1", "127.0.0.1"),
        (socket.AF_INET6, "::1", "::1"),
        (socket.AF_INET6, "::", "127.0.0.1"),  # dual stack: the peer shows as ::ffff:127.0.0.1
    ],
)
def test_tcp_peer_identified_by_one_sock_diag_query(
    diag: SockDiag, family: socket.AddressFamily, listen_on: str, connect_to: str
) -> None:
    """A live loopback peer is identified by its socket's owner; once closed it is not."""
    listener, client, accepted = _pair(family, listen_on, connect_to)
    try:
        peer = identify_tcp_peer(accepted, diag)
        assert peer.creds is not None, peer.reason
        assert peer.creds.uid == os.geteuid()
        assert peer.creds.gid == os.getegid() or os.getegid() in peer.creds.groups
        assert diag.queries == 1
        client.close()
        gone = identify_tcp_peer(accepted, diag)
        assert gone.creds is None and gone.local
        assert "FIN_WAIT" in gone.reason or "not found" in gone.reason
    finally:
        for sock in (client, accepted, listener):
            sock.close()


def test_a_socket_that_is_not_established_never_identifies_a_peer(diag: SockDiag) -> None:
    """An exact lookup can return a LISTEN socket (the kernel falls back to a listener on the
    peer's port); only an ESTABLISHED socket with an inode counts.

    A stand-in diag object returns what the kernel was seen to return (a real lookup for a
    listener's port is made first, to show the fallback is real): the window in which a
    real peer socket is gone while its 4-tuple is still ours is too short to hit on demand.
    """
    listener, client, accepted = _pair(socket.AF_INET, "127.0.0.1", "127.0.0.1")
    try:
        port = listener.getsockname()[1]
        seen = diag.lookup(socket.AF_INET, ("127.0.0.1", port), ("127.0.0.1", 9))
        assert seen is not None and seen.state_name == "LISTEN" and seen.inode != 0

        class Replaying:
            queries = 0

            def __init__(self, answer: DiagSocket) -> None:
                self.answer = answer

            def lookup(self, *args: object) -> DiagSocket:
                return self.answer

        for answer in (
            seen,  # LISTEN, uid 0 (root's listener), an inode
            DiagSocket(state=TCP_ESTABLISHED, uid=0, inode=0),  # orphaned mid-close
            DiagSocket(state=8, uid=0, inode=1234),  # CLOSE_WAIT
        ):
            verdict = identify_tcp_peer(accepted, Replaying(answer))  # type: ignore[arg-type]
            assert verdict.creds is None, answer
        ok = identify_tcp_peer(
            accepted, Replaying(DiagSocket(state=TCP_ESTABLISHED, uid=0, inode=1))  # type: ignore[arg-type]
        )
        assert ok.creds is not None and ok.creds.uid == 0
    finally:
        for sock in (client, accepted, listener):
            sock.close()


def test_is_local_address() -> None:
    """Loopback and this host's own addresses are local; a TEST-NET address is not."""
    assert is_local_address("127.0.0.1")
    assert is_local_address("::1")
    assert not is_local_address("192.0.2.1")  # RFC 5737: never a host's address


def test_tcp_identification_never_reads_the_proc_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Admitting a TCP peer costs one sock_diag query, never a read of /proc/net/tcp*."""
    real_open = builtins.open
    opened: list[str] = []

    def spy(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        host, port = await server.start_tcp()
        for i in range(3):
            reader, writer = await asyncio.open_connection(host, port)
            guest = RawGuest(reader, writer)
            guest.send(Hello(1), Write(SCR, i), Read(SCR))
            frames = await guest.recv_until(ReadReply)
            assert frames[-1] == ReadReply(SCR, i)
            await guest.close()
            while server.guest_connected:
                await asyncio.sleep(0.005)
        assert not [f for f in opened if f.startswith("/proc/net/")]
        assert server.tcp_lookups == 3

    serve(body)


def test_tcp_peer_refused_by_uid_gets_error_and_nothing_runs() -> None:
    """A TCP peer whose uid peer_allowed refuses gets NOT_PERMITTED; its frames never run."""
    seen: list[PeerCredentials] = []

    def refuse(peer: PeerCredentials) -> bool:
        seen.append(peer)
        return False

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        host, port = await server.start_tcp()
        reader, writer = await asyncio.open_connection(host, port)
        guest = RawGuest(reader, writer)
        guest.send(Hello(1), Write(SCR, 0x42), WriteN(THR, b"never"))
        error = await guest.expect_error_and_close()
        assert error.code == ErrorCode.NOT_PERMITTED
        assert [peer.uid for peer in seen] == [os.geteuid()]
        assert uart.state().scr == 0 and wire.sent == b""

    serve(body, peer_allowed=refuse)


def test_tcp_peer_that_closed_before_it_was_vetted_is_refused() -> None:
    """HELLO + a THR burst + close, all before the server looks: refused, nothing on the wire,
    even for a peer whose uid would be permitted."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        host, port = await server.start_tcp()
        for _ in range(5):
            # Blocking calls: the server's loop (this one) does not run until the peer is gone.
            client = socket.create_connection((host, port))
            burst = encode(Hello(1)) + encode(Write(FCR, 7)) + encode(WriteN(THR, b"X" * 64))
            client.sendall(burst)
            client.close()
        await asyncio.sleep(0.3)
        assert wire.sent == b""
        assert uart.state().fcr == 0
        assert not server.guest_connected

    serve(body, peer_allowed=lambda peer: True)


def _hello_with(token: bytes | None) -> bytes:
    return encode(Hello(1, token))


@pytest.mark.parametrize(
    ("token", "admitted"),
    [(TOKEN, True), (b"wrong", False), (None, False), (TOKEN[:-1], False)],
    ids=["right", "wrong", "none", "prefix"],
)
def test_tcp_token_admits_a_peer_not_identified_as_permitted(
    token: bytes | None, admitted: bool
) -> None:
    """With tcp_token, a peer refused by uid is admitted only by HELLO's right token; frames
    sent after a wrong or missing token never run."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        host, port = await server.start_tcp()
        reader, writer = await asyncio.open_connection(host, port)
        guest = RawGuest(reader, writer)
        guest.send_raw(_hello_with(token))
        guest.send(Write(SCR, 0x5A), WriteN(THR, b"hi"))
        if admitted:
            hello = await guest.recv()
            assert isinstance(hello, HelloReply) and hello.name == "uart0"
            assert (await read_reg(guest, SCR))[1] == 0x5A
            await sync(guest)
            assert wire.sent == b"hi"
            await guest.close()
        else:
            error = await guest.expect_error_and_close()
            assert error.code == ErrorCode.NOT_PERMITTED
            assert uart.state().scr == 0 and wire.sent == b""

    serve(body, peer_allowed=lambda peer: False, tcp_token=TOKEN)


def test_unix_peers_need_no_token_when_one_is_configured() -> None:
    """The token is for TCP only: a permitted Unix-socket peer is served as before."""

    async def body(server: BusServer, uart: Uart16550, wire: VirtualWire, path: Path) -> None:
        guest = await RawGuest.open(path)
        guest.send(Write(SCR, 3))
        assert (await read_reg(guest, SCR))[1] == 3
        await guest.close()

    serve(body, tcp_token=TOKEN)


def test_hello_token_round_trips_and_unknown_fields_are_skipped() -> None:
    """HELLO's TOKEN field encodes and decodes; unknown fields and a torn tail are skipped."""
    raw = encode(Hello(1, b"abc"))
    assert raw == b"\x00\x08\x01\x00\x01\x01\x03abc"
    payload = raw[3:]
    assert decode_frame(0x01, payload) == Hello(1, b"abc")
    assert decode_frame(0x01, b"\x00\x01\x7f\x02zz\x01\x03abc") == Hello(1, b"abc")
    assert decode_frame(0x01, b"\x00\x01\x01\x09ab") == Hello(1, None)  # torn: no token
    assert "abc" not in repr(Hello(1, b"abc"))
