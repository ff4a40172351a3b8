"""The port link on plain ptys: open without flushing, refused settings, a daemon-owned pty."""

from __future__ import annotations

import asyncio
import ctypes.util
import os
import tty
from pathlib import Path
from typing import Any

from _port_support import Guest, read_available, wait_for

from uartbridge.port.state import PortSettings, ReaderState
from uartbridge.registers import Lsr


def test_input_queue_survives_open() -> None:
    """Bytes the peer wrote before the link opened the port are read after the open."""

    async def run() -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        path = os.ttyname(slave)
        try:
            os.write(master, b"written-before-open")
            g = Guest(PortSettings(url=path))
            await g.link.open()
            g.setup()
            assert await g.receive(19) == b"written-before-open"
            await g.link.close()
        finally:
            os.close(master)
            os.close(slave)

    asyncio.run(run())


def test_refused_settings_are_counted_and_the_link_keeps_running() -> None:
    """7 data bits and even parity on a pty are refused, counted, shown, and bytes still flow."""

    async def run() -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        try:
            g = Guest(PortSettings(url=os.ttyname(slave)))
            await g.link.open()
            g.setup(lcr=0x03)
            await g.end_batch()
            base = g.link.status()["counters"]["settings_refused"]  # type: ignore[index]
            g.setup(lcr=0x1A)  # 7 data bits, even parity
            await g.end_batch()
            status = g.link.status()
            assert "data_bits=7" in status["settings_refused"]  # type: ignore[operator]
            assert "parity=E" in status["settings_refused"]  # type: ignore[operator]
            assert status["counters"]["settings_refused"] == base + 2  # type: ignore[index]
            assert await g.send(b"still running") == 13
            assert await wait_for(lambda: g.lsr() & Lsr.TEMT)
            assert read_available(master) == b"still running"
            await g.link.close()
        finally:
            os.close(master)
            os.close(slave)

    asyncio.run(run())


def test_owned_pty_client_comes_stalls_and_goes(tmp_path: Path) -> None:
    """pty: no client → disconnected (buffered), client → connected + replay, stall, leave."""

    async def run() -> None:
        link_path = tmp_path / "guest-tty"
        g = Guest(PortSettings(url="pty:", link_path=str(link_path), on_disconnect="buffer"))
        await g.link.open()
        g.setup()
        try:
            assert g.link.slave_path == str(link_path)
            assert os.readlink(link_path).startswith("/dev/pts/")
            assert g.link.reader_state is ReaderState.DISCONNECTED
            assert await g.send(b"early") == 5
            assert g.link.state().tx_backlog == b"early"
            client = os.open(link_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            try:
                assert await wait_for(lambda: g.link.reader_state is ReaderState.CONNECTED, 2)
                early = bytearray()
                assert await wait_for(
                    lambda: early.extend(read_available(client)) or early == b"early", 1
                )
                assert g.link.state().tx_backlog == b""
                os.write(client, b"typed")
                assert await g.receive(5) == b"typed"
                # the client stops reading: stalled, nothing dropped
                big = bytes(range(256)) * 200
                sent = await g.send(big, timeout_s=1.0)
                assert sent < len(big)
                assert g.link.reader_state is ReaderState.STALLED
                assert g.uart.state().tsr_retry > 0
                got = bytearray()
                sender = asyncio.create_task(g.send(big[sent:], timeout_s=10))
                while len(got) < len(big):
                    got += read_available(client)
                    await asyncio.sleep(0.002)
                await sender
                assert bytes(got) == big
            finally:
                os.close(client)
            assert await wait_for(lambda: g.link.reader_state is ReaderState.DISCONNECTED, 2)
            assert not g.uart.state().msr & 0x80  # DCD fell
            assert await g.send(b"late") == 4
            assert g.link.state().tx_backlog == b"late"
        finally:
            await g.link.close()
        assert not link_path.exists()

    asyncio.run(run())


def test_restore_replays_tx_backlog_and_feeds_rx_backlog_then_quiesce_keeps_input() -> None:
    """restore(): tx_backlog goes out first, rx_backlog reaches RBR; quiesce reads nothing."""
    from uartbridge.port.state import PortState

    async def run() -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        try:
            g = Guest(PortSettings(url=os.ttyname(slave)))
            g.link.restore(PortState(rx_backlog=b"saved-rx", tx_backlog=b"saved-tx"))
            g.setup()  # the resumed device already has its FIFOs on
            await g.link.open()
            assert await g.send(b"+new") == 4
            assert await wait_for(lambda: g.lsr() & Lsr.TEMT)
            assert read_available(master) == b"saved-tx+new"
            assert await g.receive(8) == b"saved-rx"
            await g.link.quiesce()
            os.write(master, b"unread")
            await asyncio.sleep(0.05)
            assert g.link.state().rx_backlog == b"" and not g.lsr() & Lsr.DR
            await g.link.close()
        finally:
            os.close(master)
            os.close(slave)

    asyncio.run(run())


def test_inotify_looks_libc_up_once_not_per_pty(tmp_path: Path, monkeypatch: Any) -> None:
    """Watching several pty slaves looks libc up once: ``ctypes.util.find_library`` runs
    ``ldconfig -p`` (a subprocess) per call, which a 256-UART daemon paid 256 times at start.
    Each watch still sees an open of its path."""
    from uartbridge.port import owned_pty

    calls: list[str] = []
    real = ctypes.util.find_library

    def counting(name: str) -> str | None:
        calls.append(name)
        return real(name)

    monkeypatch.setattr(ctypes.util, "find_library", counting)
    cached = getattr(owned_pty, "_libc", None)
    if cached is not None:
        cached.cache_clear()
    for i in range(3):  # one watch at a time: inotify instances are limited per user (128)
        path = tmp_path / f"f{i}"
        path.write_bytes(b"")
        watch = owned_pty.Inotify(str(path))
        try:
            assert not watch.read_masks()
            os.close(os.open(path, os.O_RDONLY))
            assert watch.read_masks()
        finally:
            watch.close()
    assert calls == ["c"]
