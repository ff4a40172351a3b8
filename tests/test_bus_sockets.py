"""Socket helpers: the runtime directory, binding, peer credentials and the default peer check."""

from __future__ import annotations

import os
import shutil
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_bus_support import short_tmp_dir

from uartbridge.errors import BusError, ControlError
from uartbridge.sockets import (
    PeerCredentials,
    bind_unix,
    default_peer_allowed,
    ensure_private_dir,
    peer_credentials,
)


@pytest.fixture
def tmp_dir() -> Iterator[Path]:
    directory = short_tmp_dir()
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_ensure_private_dir_creates_with_mode(tmp_dir: Path) -> None:
    """A missing runtime directory is created with the mode asked for, umask regardless."""
    target = tmp_dir / "run" / "uartbridge"
    old = os.umask(0o077)
    try:
        ensure_private_dir(target, 0o750)
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o750


def test_ensure_private_dir_keeps_existing_mode(tmp_dir: Path) -> None:
    """An existing directory of ours keeps its mode (systemd may have set it)."""
    target = tmp_dir / "rt"
    target.mkdir(mode=0o700)
    ensure_private_dir(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o700


def test_ensure_private_dir_refuses_world_writable(tmp_dir: Path) -> None:
    """A world-writable runtime directory is refused."""
    target = tmp_dir / "rt"
    target.mkdir()
    target.chmod(0o777)
    with pytest.raises(BusError, match="writable by everyone"):
        ensure_private_dir(target)


def test_ensure_private_dir_refuses_symlink_and_file(tmp_dir: Path) -> None:
    """A symlink or a regular file where the directory should be is refused."""
    real = tmp_dir / "real"
    real.mkdir()
    link = tmp_dir / "link"
    link.symlink_to(real)
    with pytest.raises(BusError, match="not a directory"):
        ensure_private_dir(link)
    plain = tmp_dir / "plain"
    plain.write_text("x")
    with pytest.raises(BusError):
        ensure_private_dir(plain)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_ensure_private_dir_refuses_foreign_owner(tmp_dir: Path) -> None:
    """A runtime directory owned by another user is refused, with the caller's error type."""
    target = tmp_dir / "rt"
    target.mkdir()
    os.chown(target, 65534, -1)
    with pytest.raises(ControlError, match="belongs to uid 65534"):
        ensure_private_dir(target, error=ControlError)


def test_peer_credentials_of_socketpair() -> None:
    """SO_PEERCRED names this process on both ends of a socketpair."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        creds = peer_credentials(a)
    finally:
        a.close()
        b.close()
    assert (creds.pid, creds.uid, creds.gid) == (os.getpid(), os.geteuid(), os.getegid())


def test_default_peer_allowed() -> None:
    """Root, the daemon's own uid and the configured group pass; anyone else is refused."""
    allow = default_peer_allowed(1234)
    me = os.geteuid()
    assert allow(PeerCredentials(pid=1, uid=0, gid=0))
    assert allow(PeerCredentials(pid=1, uid=me, gid=99))
    assert allow(PeerCredentials(pid=1, uid=4242, gid=1234))
    assert allow(PeerCredentials(pid=1, uid=4242, gid=5, groups=(7, 1234)))
    if me != 4242:
        assert not allow(PeerCredentials(pid=1, uid=4242, gid=5, groups=(7,)))
        assert not default_peer_allowed(None)(PeerCredentials(pid=1, uid=4242, gid=1234))


def test_bind_unix_sets_mode_before_listen(tmp_dir: Path) -> None:
    """bind_unix returns a bound socket whose file already has the requested mode."""
    path = tmp_dir / "s.sock"
    sock = bind_unix(path, 0o600)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_ISSOCK(path.stat().st_mode)
    finally:
        sock.close()


def test_bind_unix_replaces_stale_socket_only(tmp_dir: Path) -> None:
    """A dead socket file is replaced; a live one and a regular file are refused."""
    path = tmp_dir / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    sock = bind_unix(path)
    sock.listen(1)
    try:
        with pytest.raises(BusError, match="in use"):
            bind_unix(path)
    finally:
        sock.close()
    plain = tmp_dir / "file"
    plain.write_text("keep me")
    with pytest.raises(BusError, match="not a socket"):
        bind_unix(plain)
    assert plain.read_text() == "keep me"
