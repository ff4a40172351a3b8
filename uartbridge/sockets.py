"""Socket helpers shared by the bus and the control socket: runtime dir, binding, peers.

Nothing here knows a protocol. The rules: the runtime directory is ours and not writable by
everyone; a Unix socket gets its permissions before anyone can connect (``chmod`` happens
between ``bind`` and ``listen``); a stale socket file is removed only if it *is* a socket
and nobody answers on it; a peer is identified by the kernel (``SO_PEERCRED``), never by
what it says.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BusError, UartBridgeError

# Linux <asm-generic/socket.h>; Python's socket module does not export it.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_UCRED = struct.Struct("3i")
_MAX_PEER_GROUPS = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerCredentials:
    """Who is at the other end of a Unix socket, as the kernel says (``SO_PEERCRED``).

    ``groups`` holds the peer's supplementary groups when the kernel tells them
    (``SO_PEERGROUPS``, Linux ≥ 4.13), else it is empty.
    """

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The credentials of the peer of a connected ``AF_UNIX`` socket."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError as exc:
        raise BusError(f"cannot read peer credentials: {exc}") from exc
    pid, uid, gid = _UCRED.unpack(raw)
    groups: tuple[int, ...] = ()
    with contextlib.suppress(OSError):
        raw_groups = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * _MAX_PEER_GROUPS)
        count = len(raw_groups) // 4
        groups = struct.unpack(f"{count}I", raw_groups[: 4 * count])
    return PeerCredentials(pid=pid, uid=uid, gid=gid, groups=groups)


def default_peer_allowed(allowed_gid: int | None) -> Callable[[PeerCredentials], bool]:
    """A peer check admitting root, the daemon's own uid, and (if given) one group.

    The group matches the peer's primary gid or one of its supplementary groups.
    """
    own_uid = os.geteuid()

    def allowed(peer: PeerCredentials) -> bool:
        if peer.uid in (0, own_uid):
            return True
        if allowed_gid is None:
            return False
        return peer.gid == allowed_gid or allowed_gid in peer.groups

    return allowed


# Where systemd puts the directories of a DynamicUser= unit; the unit sees a symlink to it.
SYSTEMD_PRIVATE_PARENTS = (Path("/run/private"), Path("/var/lib/private"))
_SYSTEMD_DIR_VARIABLES = ("RUNTIME_DIRECTORY", "STATE_DIRECTORY")


def _handed_by_systemd(path: Path) -> bool:
    """Whether ``path`` is exactly one of the directories systemd named in our environment."""
    for variable in _SYSTEMD_DIR_VARIABLES:
        if str(path) in os.environ.get(variable, "").split(":"):
            return True
    return False


def _systemd_private_target(path: Path, what: str, error: type[UartBridgeError]) -> Path:
    """The directory a DynamicUser= symlink points to, checked; ``error`` if it is not one.

    systemd makes ``/run/NAME`` and ``/var/lib/NAME`` symlinks to ``/run/private/NAME`` and
    ``/var/lib/private/NAME`` (root-owned parents, mode 0700). We follow such a link only when
    it is the path systemd handed us, is owned by root, and ends in a directory of that shape.
    """
    try:
        link = path.lstat()
        target = Path(os.path.realpath(path))
        parent = target.parent.lstat()
    except OSError as exc:
        raise error(f"cannot inspect {what} {path}: {exc.strerror}") from exc
    if (
        link.st_uid != 0
        or target.parent not in SYSTEMD_PRIVATE_PARENTS
        or target.name != path.name
        or parent.st_uid != 0
        or parent.st_mode & 0o022
    ):
        raise error(
            f"{what} {path} is a symlink to {target}, which is not the directory systemd "
            "makes for a DynamicUser= unit; refusing to follow it"
        )
    return target


def ensure_private_dir(
    path: Path,
    mode: int = 0o750,
    *,
    group: int | None = None,
    error: type[UartBridgeError] = BusError,
    what: str = "runtime directory",
) -> Path:
    """Create the directory ``path`` (mode ``mode``) or check the one that is there.

    Refuses (raising ``error``) a path that is not a directory, is owned by another user, or
    is writable by everyone. A symlink is refused too, except the one systemd hands a
    DynamicUser= unit in ``$RUNTIME_DIRECTORY``/``$STATE_DIRECTORY`` (see
    ``_systemd_private_target``). An existing directory keeps its mode (systemd may have set
    ``RuntimeDirectoryMode``). With ``group``, the directory gets that group and at least
    ``g+rx`` (so the group's members reach the sockets in it).
    """
    path = Path(path)
    try:
        path.mkdir(mode=mode, parents=True)
        os.chmod(path, mode)  # mkdir's mode is filtered by the umask
    except FileExistsError:
        pass
    except OSError as exc:
        raise error(f"cannot create {what} {path}: {exc.strerror}") from exc
    try:
        st = path.lstat()
    except OSError as exc:
        raise error(f"cannot inspect {what} {path}: {exc.strerror}") from exc
    if stat.S_ISLNK(st.st_mode) and _handed_by_systemd(path):
        st = _systemd_private_target(path, what, error).lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {path} is not a directory (or is a symlink)")
    if st.st_uid != os.geteuid():
        raise error(
            f"{what} {path} belongs to uid {st.st_uid}, not to us "
            f"(uid {os.geteuid()}); refusing to use it"
        )
    if st.st_mode & stat.S_IWOTH:
        raise error(f"{what} {path} is writable by everyone; refusing to use it")
    if group is not None:
        try:
            if st.st_gid != group:
                os.chown(path, -1, group)
            if st.st_mode & 0o050 != 0o050:
                os.chmod(path, stat.S_IMODE(st.st_mode) | 0o050)
        except OSError as exc:
            raise error(
                f"cannot give {what} {path} to group {group}: {exc.strerror} "
                "(the daemon must be a member of socket_group)"
            ) from exc
    return path


def _socket_is_live(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except OSError as exc:
        # EAGAIN (backlog full), EACCES…: somebody may be there; do not remove it.
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return True


def bind_unix(
    path: Path,
    mode: int = 0o660,
    *,
    group: int | None = None,
    error: type[UartBridgeError] = BusError,
) -> socket.socket:
    """A bound (not yet listening) ``AF_UNIX`` stream socket at ``path`` with mode ``mode``.

    A stale socket file left by a dead process is removed first; a live one (something
    answers) or a file that is not a socket is refused. ``chmod`` (and ``chown`` to
    ``group`` if given) happen before ``listen``, so no one can connect under looser rights.
    """
    path = Path(path)
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise error(f"cannot inspect {path}: {exc.strerror}") from exc
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise error(f"{path} exists and is not a socket; refusing to replace it")
        if _socket_is_live(path):
            raise error(f"{path} is in use by another process")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        sock.bind(os.fspath(path))
        bound = True
        os.chmod(path, mode)
        if group is not None:
            os.chown(path, -1, group)
    except OSError as exc:
        sock.close()
        if bound:
            with contextlib.suppress(OSError):
                path.unlink()
        raise error(f"cannot bind {path}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


# Where a listening socket listens: a Unix socket's path, or an IP socket's (family, sockaddr)
# as getaddrinfo gives it (only host and port are compared).
ListenAddress = Path | tuple[int, tuple[Any, ...]]


def _describe(address: ListenAddress) -> str:
    if isinstance(address, Path):
        return str(address)
    host, port = address[1][:2]
    return f"[{host}]:{port}" if address[0] == socket.AF_INET6 else f"{host}:{port}"


def listener_mismatch(sock: socket.socket, address: ListenAddress) -> str | None:
    """Why ``sock`` is not a listening stream socket at ``address`` (None: it is).

    A Unix one must be bound to that path and the path must still be a socket file (a file
    removed or replaced means no client can reach this socket by it any more).
    """
    family = socket.AF_UNIX if isinstance(address, Path) else address[0]
    try:
        if sock.family != family or sock.type != socket.SOCK_STREAM:
            kind = "Unix" if family == socket.AF_UNIX else "TCP"
            return f"not a {kind} stream socket ({sock.family!r}, {sock.type!r})"
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "not listening"
        name = sock.getsockname()
        if isinstance(address, Path):
            if name != os.fspath(address):
                return f"bound to {name!r}, not {address}"
            try:
                if not stat.S_ISSOCK(address.lstat().st_mode):
                    return f"{address} is no longer a socket file"
            except PermissionError:
                pass  # a socket unit's directory (root's, 0750) we may not enter: no check
        elif tuple(name[:2]) != tuple(address[1][:2]):
            return f"bound to {name[:2]!r}, not {_describe(address)}"
    except OSError as exc:
        return f"{_describe(address)}: {exc.strerror or exc}"
    return None


def probe_listener(fd: int, address: ListenAddress) -> bool:
    """Whether descriptor ``fd`` is a listening stream socket at ``address`` (``fd`` stays
    open and unchanged: a duplicate is inspected)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        return listener_mismatch(sock, address) is None
    finally:
        sock.close()


def adopt_listener(fd: int, address: ListenAddress) -> tuple[socket.socket | None, str | None]:
    """The listening stream socket ``fd`` handed to this run (by the previous run, systemd's
    fd store or a socket unit), if it listens at ``address`` (``listener_mismatch``):
    ``(socket, None)``, non-blocking; else ``fd`` is closed and ``(None, why)``."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.close(fd)
        return None, f"not a socket: {exc.strerror or exc}"
    why = listener_mismatch(sock, address)
    if why is not None:
        sock.close()
        return None, why
    sock.setblocking(False)
    return sock, None


__all__ = [
    "ListenAddress",
    "PeerCredentials",
    "adopt_listener",
    "bind_unix",
    "default_peer_allowed",
    "ensure_private_dir",
    "listener_mismatch",
    "peer_credentials",
    "probe_listener",
]
