"""A pty the daemon owns: create it, publish its slave, and watch clients come and go.

The daemon holds the master. Its slave is opened and closed once at creation, which arms
HUP, so "no client yet" and "client left" look the same (reference/host-ports.md). Clients
are seen through inotify on the slave's ``/dev/pts/N`` (IN_OPEN, IN_CLOSE_WRITE,
IN_CLOSE_NOWRITE) via ctypes; where inotify is unavailable the caller polls the master for
POLLHUP once a second instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import struct
import tty
from dataclasses import dataclass

IN_OPEN = 0x00000020
IN_CLOSE_WRITE = 0x00000008
IN_CLOSE_NOWRITE = 0x00000010
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")


@dataclass(slots=True)
class OwnedPty:
    """The master fd, the slave's /dev/pts path and the published link (if any)."""

    master_fd: int
    slave_name: str
    link_path: str | None

    @property
    def published_path(self) -> str:
        """Where clients open the slave."""
        return self.link_path or self.slave_name

    def close(self) -> None:
        """Close the master and remove the link if it still points at our slave."""
        if self.link_path is not None:
            with contextlib.suppress(OSError):
                if os.readlink(self.link_path) == self.slave_name:
                    os.unlink(self.link_path)
        with contextlib.suppress(OSError):
            os.close(self.master_fd)


def create_pty(link_path: str | None) -> OwnedPty:
    """Open a raw pty pair, arm HUP, and publish the slave at ``link_path`` (atomically)."""
    master_fd, slave_fd = os.openpty()
    try:
        slave_name = os.ttyname(slave_fd)
        tty.setraw(slave_fd)
    finally:
        os.close(slave_fd)  # opened and closed once: HUP is armed until a client opens it
    os.set_blocking(master_fd, False)
    if link_path is not None:
        tmp = f"{link_path}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        try:
            os.symlink(slave_name, tmp)
            os.replace(tmp, link_path)
        except OSError:
            os.close(master_fd)
            raise
    return OwnedPty(master_fd=master_fd, slave_name=slave_name, link_path=link_path)


def master_hung_up(master_fd: int) -> bool:
    """True if no client has the slave open (POLLHUP on the master)."""
    poller = select.poll()
    poller.register(master_fd, select.POLLIN | select.POLLOUT)
    return any(ev & select.POLLHUP for _, ev in poller.poll(0))


class Inotify:
    """A minimal non-blocking inotify on one path (ctypes, Linux)."""

    def __init__(self, path: str) -> None:
        """Watch ``path`` for open and close; raises OSError if inotify is unavailable."""
        libc_name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(libc_name, use_errno=True)
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        wd = libc.inotify_add_watch(
            fd, os.fsencode(path), IN_OPEN | IN_CLOSE_WRITE | IN_CLOSE_NOWRITE
        )
        if wd < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, os.strerror(err))
        self.fd: int = fd

    def read_masks(self) -> list[int]:
        """The event masks waiting (empty if none)."""
        try:
            buf = os.read(self.fd, 4096)
        except BlockingIOError:
            return []
        masks: list[int] = []
        offset = 0
        while offset + _EVENT.size <= len(buf):
            _wd, mask, _cookie, length = _EVENT.unpack_from(buf, offset)
            masks.append(mask)
            offset += _EVENT.size + length
        return masks

    def close(self) -> None:
        """Stop watching."""
        with contextlib.suppress(OSError):
            os.close(self.fd)
