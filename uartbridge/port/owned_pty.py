"""A pty the daemon owns: create it, publish its slave, and watch clients come and go.

The slave is published at the configured link path as a symlink; that path is only ever
created, or replaced when it holds our own symlink to a pty (a stale one, after a crash), and
removed at close only while it is still our symlink to our slave: a file, a directory or
another user's symlink there is refused at start (``PortError``, exit 69) and never touched.

The daemon holds the master. Its slave is opened and closed once at creation, which arms
HUP, so "no client yet" and "client left" look the same (reference/host-ports.md). Clients
are seen through inotify on the slave's ``/dev/pts/N`` (IN_OPEN, IN_CLOSE_WRITE,
IN_CLOSE_NOWRITE) via ctypes; where inotify is unavailable the caller polls the master for
POLLHUP once a second instead.

Across a restart the master is handed to the next run (``adopt_pty``): its slave keeps its
number, so the link keeps pointing at it and a client that has the slave open never sees a
hang-up; ``OwnedPty.close(keep=True)`` leaves both the master's open file and the link.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import re
import select
import stat
import struct
import tty
from dataclasses import dataclass

from ..errors import PortError
from .handle import is_pty_master, pty_index

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

    def close(self, *, keep: bool = False) -> None:
        """Close the master and remove the link if it is still our symlink to our slave.

        ``keep``: the pty goes on in the next run (which holds the master too): the link
        stays, and closing our descriptor does not close the pty.
        """
        if self.link_path is not None and not keep:
            with contextlib.suppress(OSError):
                if _our_symlink(self.link_path) == self.slave_name:
                    os.unlink(self.link_path)
        with contextlib.suppress(OSError):
            os.close(self.master_fd)


_PTS_RE = re.compile(r"/dev/pts/[0-9]+")


def _our_symlink(path: str) -> str | None:
    """The target of ``path`` if it is a symlink we own to a pty slave, else None."""
    info = os.lstat(path)
    if not stat.S_ISLNK(info.st_mode) or info.st_uid != os.geteuid():
        return None
    target = os.readlink(path)
    return target if _PTS_RE.fullmatch(target) else None


def _what_is_at(path: str) -> str | None:
    """None if ``path`` is free or our own (stale) symlink to a pty; else what is there."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        if _our_symlink(path) is not None:
            return None
        if info.st_uid != os.geteuid():
            return f"a symlink of uid {info.st_uid}"
        return f"a symlink to {os.readlink(path)}, not to a pty"
    if stat.S_ISREG(info.st_mode):
        return "a regular file"
    if stat.S_ISDIR(info.st_mode):
        return "a directory"
    return "not a symlink"


def create_pty(link_path: str | None) -> OwnedPty:
    """Open a raw pty pair, arm HUP, and publish the slave at ``link_path`` (atomically).

    ``link_path`` may be free or hold our own symlink to a pty (left by a daemon that died);
    anything else there (a file, a directory, another user's symlink, a symlink elsewhere) is
    never replaced: ``PortError`` naming it.
    """
    if link_path is not None:
        what = _what_is_at(link_path)
        if what is not None:
            raise PortError(
                f"link path {link_path} holds {what}; uartbridge replaces only its own "
                "symlink to a pty: move it away or choose another link"
            )
    master_fd, slave_fd = os.openpty()
    try:
        slave_name = os.ttyname(slave_fd)
        tty.setraw(slave_fd)
    finally:
        os.close(slave_fd)  # opened and closed once: HUP is armed until a client opens it
    os.set_blocking(master_fd, False)
    if link_path is not None:
        try:
            _publish(slave_name, link_path)
        except BaseException:
            os.close(master_fd)
            raise
    return OwnedPty(master_fd=master_fd, slave_name=slave_name, link_path=link_path)


def adopt_pty(master_fd: int, link_path: str | None) -> OwnedPty:
    """The pty whose master ``master_fd`` the previous run handed over, published at
    ``link_path`` again (kept if it already points at its slave). ``PortError`` if the
    descriptor is not a pty master, or the link path holds something that is not ours."""
    try:
        info = os.fstat(master_fd)
    except OSError as exc:
        raise PortError(f"the handed-over pty descriptor cannot be used: {exc}") from exc
    index = pty_index(master_fd) if is_pty_master(info) else None
    if index is None:
        raise PortError("the descriptor handed over for a pty: port is not a pty master")
    slave_name = f"/dev/pts/{index}"
    os.set_blocking(master_fd, False)
    if link_path is not None:
        try:
            current = _our_symlink(link_path)
        except FileNotFoundError:
            current = None
        if current != slave_name:
            what = _what_is_at(link_path)
            if what is not None:
                raise PortError(
                    f"link path {link_path} holds {what}; uartbridge replaces only its own "
                    "symlink to a pty: move it away or choose another link"
                )
            _publish(slave_name, link_path)
    return OwnedPty(master_fd=master_fd, slave_name=slave_name, link_path=link_path)


def _publish(slave_name: str, link_path: str) -> None:
    """symlink() where the path is free (it never overwrites); our stale symlink is replaced
    by rename, after a new check, so a client never sees the link missing."""
    try:
        os.symlink(slave_name, link_path)
        return
    except FileExistsError:
        pass
    tmp = f"{link_path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(slave_name, tmp)
    try:
        what = _what_is_at(link_path)
        if what is not None:
            raise PortError(f"link path {link_path} holds {what} (it appeared meanwhile)")
        os.replace(tmp, link_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def master_hung_up(master_fd: int) -> bool:
    """True if no client has the slave open (POLLHUP on the master)."""
    poller = select.poll()
    poller.register(master_fd, select.POLLIN | select.POLLOUT)
    return any(ev & select.POLLHUP for _, ev in poller.poll(0))


@functools.cache
def _libc() -> ctypes.CDLL:
    """libc, loaded once: ``find_library`` runs ``ldconfig -p`` (a subprocess) on every call,
    which cost 1-2 ms per ``pty:`` UART at start (256 of them: 0.3-0.5 s, bench/scale.py)."""
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class Inotify:
    """A minimal non-blocking inotify on one path (ctypes, Linux)."""

    def __init__(self, path: str) -> None:
        """Watch ``path`` for open and close; raises OSError if inotify is unavailable."""
        libc = _libc()
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
