"""Which port an open descriptor is: the identity a checkpoint records (``meta.port_handle``).

A port descriptor handed to the next run of the daemon (systemd's fd store, ``uartbridge
restart``) resumes with a checkpoint only if the two agree: the checkpoint names the port it
was taken with, and ``fd_identity`` says what the descriptor is. The identity is computed from
the descriptor alone (nothing it claims), and is stable for as long as the port stays open:

- ``tty dev=M:m ino=N rdev=M:m``: a terminal device (serial port, USB adapter, a pty slave
  such as a socat link): the filesystem and inode of its device node and its device number.
  A re-plugged adapter gets a new node (a new inode), so the descriptor of the old one is
  never taken for it.
- ``pty slave=/dev/pts/N``: the master of a pty the daemon owns (``TIOCGPTN``). The number
  stays ours while the master is open.
- ``socket ino=N local=A peer=B``: a connected socket port (``socket://``); its inode is the
  socket's own.

Anything else (a regular file, a closed descriptor, a listening socket) has no identity: None.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import struct

# <asm-generic/ioctls.h>: _IOR('T', 0x30, unsigned int).
TIOCGPTN = 0x80045430
# The multiplexer every UNIX98 pty master is opened through (/dev/ptmx, or devpts' own).
PTMX_MAJOR = 5
PTMX_MINOR = 2


def _dev(value: int) -> str:
    return f"{os.major(value)}:{os.minor(value)}"


def pty_index(fd: int) -> int | None:
    """The slave number of the pty master ``fd`` (None if it is not one)."""
    try:
        raw = fcntl.ioctl(fd, TIOCGPTN, struct.pack("I", 0))
    except OSError:
        return None
    return int(struct.unpack("I", raw)[0])


def is_pty_master(info: os.stat_result) -> bool:
    """Whether a character device is /dev/ptmx (a pty master is opened through it)."""
    return (stat.S_ISCHR(info.st_mode) and os.major(info.st_rdev) == PTMX_MAJOR
            and os.minor(info.st_rdev) == PTMX_MINOR)


def fd_identity(fd: int) -> str | None:
    """The identity of the port open on ``fd`` (module docstring), or None."""
    try:
        info = os.fstat(fd)
    except OSError:
        return None
    if stat.S_ISCHR(info.st_mode):
        if is_pty_master(info):
            index = pty_index(fd)
            return None if index is None else f"pty slave=/dev/pts/{index}"
        if not os.isatty(fd):
            return None
        return f"tty dev={_dev(info.st_dev)} ino={info.st_ino} rdev={_dev(info.st_rdev)}"
    if stat.S_ISSOCK(info.st_mode):
        try:
            with socket.socket(fileno=os.dup(fd)) as sock:
                return f"socket ino={info.st_ino} local={_address(sock.getsockname())} " \
                       f"peer={_address(sock.getpeername())}"
        except OSError:
            return None  # not connected (a listening socket is no port)
    return None


def _address(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(address, bytes):
        return address.decode("utf-8", "replace") or "unnamed"
    return str(address) or "unnamed"


__all__ = ["fd_identity", "is_pty_master", "pty_index"]
