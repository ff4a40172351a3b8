"""Shared helpers for the bus tests: a server in a background thread, a raw async guest.

No tests here; the bus, client and guest test modules import from this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from uartbridge import Uart16550
from uartbridge.bus import (
    BusServer,
    ErrorFrame,
    Frame,
    FrameDecoder,
    Hello,
    HelloReply,
    Read,
    ReadReply,
    Sync,
    SyncReply,
    VirtualWire,
    encode,
)

T = TypeVar("T")

# The loop the servers of these helpers run on: asyncio's unless a test module asks for each
# loop in turn (``pytestmark = pytest.mark.usefixtures("each_event_loop")``, conftest.py).
LOOP_FACTORY: list[Callable[[], asyncio.AbstractEventLoop]] = [asyncio.new_event_loop]

REPLY_TIMEOUT_S = 10.0


def short_tmp_dir() -> Path:
    """A fresh directory under /tmp with a short name (Unix socket paths max out at 107)."""
    return Path(tempfile.mkdtemp(prefix="ubus-"))


class ServerThread:
    """A ``BusServer`` for a fresh model with a ``VirtualWire``, on its own loop and thread."""

    def __init__(self, *, name: str = "uart0", echo: bool = False, **server_kwargs: Any) -> None:
        self.name = name
        self.echo = echo
        self.server_kwargs = server_kwargs
        self.dir = short_tmp_dir()
        self.path = self.dir / f"{name}.bus"
        self.loop = LOOP_FACTORY[0]()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.uart: Uart16550
        self.wire: VirtualWire
        self.server: BusServer
        self.tcp: tuple[str, int] | None = None

    def __enter__(self) -> ServerThread:
        self.thread.start()
        try:
            self.run(self._start())
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    async def _start(self) -> None:
        self.uart = Uart16550()
        loop = asyncio.get_running_loop()

        def echo(data: bytes) -> None:
            loop.call_soon(self.wire.feed, data)

        self.wire = VirtualWire(self.uart, sink=echo if self.echo else None)
        self.server = BusServer(self.uart, name=self.name, settle=self.wire, **self.server_kwargs)
        await self.server.start_unix(self.path)
        self.tcp = await self.server.start_tcp()
        self.wire.attach(self.server)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the server's loop and return its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout=REPLY_TIMEOUT_S)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn(*args)`` on the server's loop (the model is not thread-safe)."""

        async def wrapper() -> T:
            return fn(*args)

        return self.run(wrapper())

    def feed(self, data: bytes) -> None:
        """Bytes arriving from the wire (IRQ changes are pushed to the guest)."""
        self.call(self.wire.feed, data)

    def sent(self) -> bytes:
        """Everything the wire has taken so far."""
        return self.call(lambda: bytes(self.wire.sent))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self.thread.is_alive() and hasattr(self, "server"):
                self.wire.detach()
                self.run(self.server.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=REPLY_TIMEOUT_S)
            if not self.thread.is_alive():
                self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)


class RawGuest:
    """A minimal asyncio guest speaking frames, for server tests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder()

    @classmethod
    async def open(cls, path: Path, *, hello: bool = True) -> RawGuest:
        reader, writer = await asyncio.open_unix_connection(str(path))
        guest = cls(reader, writer)
        if hello:
            guest.send(Hello(1))
            reply = await guest.recv()
            assert isinstance(reply, HelloReply), reply
            guest.hello = reply
        return guest

    hello: HelloReply

    def send(self, *frames: Frame) -> None:
        self.writer.write(b"".join(encode(f) for f in frames))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def recv(self) -> Frame:
        """The next frame (fails the test after REPLY_TIMEOUT_S)."""
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                return frame
            data = await asyncio.wait_for(self.reader.read(65536), REPLY_TIMEOUT_S)
            if not data:
                raise EOFError("server closed the connection")
            self.decoder.feed(data)

    async def recv_until(self, kind: type[Frame]) -> list[Frame]:
        """Frames up to and including the first of ``kind``."""
        frames: list[Frame] = []
        while True:
            frame = await self.recv()
            frames.append(frame)
            if isinstance(frame, kind):
                return frames

    async def expect_error_and_close(self) -> ErrorFrame:
        """The next frame is an ERROR and the server closes right after it."""
        frame = await self.recv()
        assert isinstance(frame, ErrorFrame), frame
        await self.expect_closed()
        return frame

    async def expect_closed(self) -> None:
        """The server closes the connection (remaining frames are skipped)."""
        while True:
            try:
                data = await asyncio.wait_for(self.reader.read(65536), REPLY_TIMEOUT_S)
            except ConnectionResetError:
                return
            if not data:
                return

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, BrokenPipeError):
            await self.writer.wait_closed()


async def wait_for(predicate: Callable[[], bool], *, timeout_s: float = REPLY_TIMEOUT_S) -> None:
    """Poll ``predicate`` on the loop until it holds (fails after ``timeout_s``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


async def started_server(
    directory: Path, name: str, **kwargs: Any
) -> tuple[BusServer, Uart16550, VirtualWire, Path]:
    """A server on a fresh model and wire, listening at ``directory/name.bus``."""
    uart = Uart16550()
    wire = VirtualWire(uart)
    server = BusServer(uart, name=name, settle=wire, **kwargs)
    path = directory / f"{name}.bus"
    await server.start_unix(path)
    wire.attach(server)
    return server, uart, wire, path


Body = Callable[[BusServer, Uart16550, VirtualWire, Path], Awaitable[None]]


def serve(body: Body, **kwargs: object) -> None:
    """Run ``body(server, uart, wire, path)`` with a started server; always clean up."""
    directory = short_tmp_dir()

    async def main() -> None:
        server, uart, wire, path = await started_server(directory, "uart0", **kwargs)  # type: ignore[arg-type]
        try:
            await body(server, uart, wire, path)
        finally:
            wire.detach()
            await server.close()

    try:
        run_async(main)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def read_reg(guest: RawGuest, offset: int) -> tuple[list[object], int]:
    """READ ``offset``: (the frames before the reply, the value)."""
    guest.send(Read(offset))
    frames = await guest.recv_until(ReadReply)
    reply = frames[-1]
    assert isinstance(reply, ReadReply)
    assert reply.offset == offset
    return list(frames[:-1]), reply.value


async def sync(guest: RawGuest, token: int = 7) -> list[object]:
    """SYNC: the frames before the reply."""
    guest.send(Sync(token))
    frames = await guest.recv_until(SyncReply)
    assert frames[-1] == SyncReply(token)
    return list(frames[:-1])



def run_async(main: Callable[[], Awaitable[None]]) -> None:
    """Run an async test body on a fresh loop."""

    async def runner() -> None:
        await main()

    with asyncio.Runner(loop_factory=LOOP_FACTORY[0]) as loop_runner:
        loop_runner.run(runner())


