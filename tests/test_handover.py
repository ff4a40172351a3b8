"""The pieces of a restart that closes nothing: fd identities, taking over a tty, a pty or a
listening socket, and the sd_notify fd store messages (real ptys, sockets and datagrams)."""

from __future__ import annotations

import array
import dataclasses
import os
import pty
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import structlog
from procs import REPO, new_user, shared_dir, socat_pair

from uartbridge.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    checkpoint_path,
    encode,
    read_checkpoint,
    write_checkpoint,
)
from uartbridge.daemon import sdnotify, understudy
from uartbridge.daemon.handover import HandedFds
from uartbridge.daemon.understudy import checkpoint_name, memfd_with
from uartbridge.errors import PortError
from uartbridge.port.claim import adopt_tty
from uartbridge.port.handle import fd_identity
from uartbridge.port.owned_pty import adopt_pty, create_pty
from uartbridge.port.termios_ops import RealTermiosOps
from uartbridge.sockets import adopt_listener, bind_unix

DATA = Path(__file__).parent / "data"


def _receive(sock: socket.socket) -> tuple[str, list[int]]:
    data, ancdata, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(16))
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data.decode(), list(fds)


def test_fd_identity_names_the_device_not_the_open(tmp_path: Path) -> None:
    """Two opens of one tty have one identity; another tty, a pty master, a connected and a
    listening socket, a regular file each get theirs (or None)."""
    with socat_pair(tmp_path, "one") as one, socat_pair(tmp_path, "two") as two:
        a1 = os.open(one.a, os.O_RDWR | os.O_NOCTTY)
        a2 = os.open(one.a, os.O_RDWR | os.O_NOCTTY)
        b = os.open(two.a, os.O_RDWR | os.O_NOCTTY)
        try:
            assert fd_identity(a1) == fd_identity(a2) is not None
            assert fd_identity(a1) != fd_identity(b)
            assert str(fd_identity(a1)).startswith("tty dev=")
        finally:
            for fd in (a1, a2, b):
                os.close(fd)
    master, slave = pty.openpty()
    try:
        assert fd_identity(master) == f"pty slave={os.ttyname(slave)}"
    finally:
        os.close(master)
        os.close(slave)
    left, right = socket.socketpair()
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    plain = tmp_path / "file"
    plain.write_bytes(b"")
    fd = os.open(plain, os.O_RDONLY)
    try:
        assert str(fd_identity(left.fileno())).startswith("socket ino=")
        assert fd_identity(left.fileno()) != fd_identity(right.fileno())
        assert fd_identity(listening.fileno()) is None
        assert fd_identity(fd) is None
    finally:
        for sock in (left, right, listening):
            sock.close()
        os.close(fd)


def test_adopt_tty_refuses_a_descriptor_of_another_tty(tmp_path: Path) -> None:
    """adopt_tty takes a descriptor of the path's own device and refuses another tty's."""
    ops = RealTermiosOps()
    with socat_pair(tmp_path, "one") as one, socat_pair(tmp_path, "two") as two:
        other = os.open(two.a, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            with pytest.raises(PortError, match="is not"):
                adopt_tty(other, str(one.a), ops, lock_dir=None, note=lambda _t: None)
        finally:
            os.close(other)
        mine = os.open(one.a, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            claim = adopt_tty(mine, str(one.a), ops, lock_dir=None, note=lambda _t: None)
            assert claim.fd == mine and claim.pty
        finally:
            os.close(mine)


def test_adopt_pty_keeps_the_slave_and_republishes_the_link(tmp_path: Path) -> None:
    """A kept pty master is taken over with its slave number; a missing link is published
    again; a descriptor that is not a pty master is refused."""
    link = tmp_path / "uart0.pty"
    owned = create_pty(str(link))
    slave = owned.slave_name
    kept = os.dup(owned.master_fd)
    owned.close(keep=True)
    assert os.path.realpath(link) == slave  # keep=True leaves the link
    link.unlink()
    again = adopt_pty(kept, str(link))
    try:
        assert again.slave_name == slave and os.path.realpath(link) == slave
    finally:
        again.close()
    assert not link.exists()
    left, right = socket.socketpair()
    try:
        with pytest.raises(PortError, match="not a pty master"):
            adopt_pty(left.fileno(), None)
    finally:
        left.close()
        right.close()


def test_adopt_listener_takes_only_the_unix_socket_at_the_path(tmp_path: Path) -> None:
    """The listening socket bound at the path is taken; one bound elsewhere, one not
    listening, or one whose file is gone is closed and refused with the reason."""
    path = tmp_path / "bus.sock"
    sock = bind_unix(path)
    sock.listen(4)
    taken, why = adopt_listener(os.dup(sock.fileno()), path)
    assert why is None and taken is not None
    taken.close()
    elsewhere, why = adopt_listener(os.dup(sock.fileno()), tmp_path / "other.sock")
    assert elsewhere is None and why is not None and "bound to" in why
    idle = bind_unix(tmp_path / "idle.sock")
    refused, why = adopt_listener(os.dup(idle.fileno()), tmp_path / "idle.sock")
    assert refused is None and why == "not listening"
    path.unlink()
    gone, why = adopt_listener(os.dup(sock.fileno()), path)
    assert gone is None and why is not None and "bus.sock" in why
    sock.close()
    idle.close()


def test_fd_store_messages_carry_the_fd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """store_fd sends FDSTORE=1, FDNAME= (FDPOLL=0 when asked) with the fd attached;
    remove_fd sends FDSTOREREMOVE=1; a name systemd would refuse raises ValueError."""
    path = tmp_path / "notify.sock"
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(path))
    manager.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    master, slave = pty.openpty()
    try:
        assert sdnotify.store_fd("port.uart0", master, poll=False)
        text, fds = _receive(manager)
        assert text.splitlines() == ["FDSTORE=1", "FDNAME=port.uart0", "FDPOLL=0"]
        assert len(fds) == 1 and fd_identity(fds[0]) == fd_identity(master)
        os.close(fds[0])
        assert sdnotify.remove_fd("port.uart0")
        text, fds = _receive(manager)
        assert text.splitlines() == ["FDSTOREREMOVE=1", "FDNAME=port.uart0"] and fds == []
        for bad in ("", "a:b", "x" * 256, "tab\there"):
            with pytest.raises(ValueError):
                sdnotify.store_fd(bad, master)
    finally:
        os.close(master)
        os.close(slave)
        manager.close()


def test_listen_fds_only_for_our_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    """listen_fds returns the named fds from 3 on only when LISTEN_PID is ours, and removes
    the variables either way; HandedFds keeps the newest of two with one name."""
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "control")
    assert sdnotify.listen_fds() == []
    assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ
    saved = {fd: os.dup(fd) if _open(fd) else None for fd in (3, 4)}  # put back after
    left, right = socket.socketpair()
    try:
        os.dup2(left.fileno(), 3)
        os.dup2(right.fileno(), 4)
        monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
        monkeypatch.setenv("LISTEN_FDS", "2")
        monkeypatch.setenv("LISTEN_FDNAMES", "port.a:port.a")
        found = sdnotify.listen_fds()
        assert found == [("port.a", 3), ("port.a", 4)]
        handed = HandedFds(found)
        assert handed.take("port.a") == 4 and handed.take("port.a") is None
    finally:
        left.close()
        right.close()
        for fd, copy in saved.items():
            if copy is None:
                os.close(fd)
            else:
                os.dup2(copy, fd, inheritable=False)
                os.close(copy)


def test_close_rest_closes_copies_of_what_was_taken_quietly_and_warns_of_the_rest() -> None:
    """After an understudy's hand-back the new run holds two copies of each port and
    listener (its own, kept across the exec, and the understudy's): the one not taken is
    closed without a warning; a descriptor of another file still gets the warning."""
    left, right = socket.socketpair()
    copy, other = os.dup(left.fileno()), os.dup(right.fileno())
    try:
        handed = HandedFds([("port.a", copy), ("stray", other)])
        handed.add([("port.a", left.detach())])
        taken = handed.take("port.a")
        with structlog.testing.capture_logs() as logs:
            handed.close_rest(structlog.get_logger())
        assert [(e["event"], e["name"]) for e in logs] == [
            ("handed-over descriptor not used; closed", "stray")]
        assert not _open(copy) and not _open(other) and taken is not None and _open(taken)
        os.close(taken)
    finally:
        right.close()


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_barrier_waits_for_the_manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """barrier() sends BARRIER=1 with a pipe's write end and is True once the manager has
    closed it; with a manager that keeps it, False after the timeout; with none, False."""
    assert not sdnotify.barrier(0.1)  # no NOTIFY_SOCKET
    path = tmp_path / "notify.sock"
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(path))
    manager.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        assert not sdnotify.barrier(0.2)  # sent, but nobody read it: the pipe stays open
        text, fds = _receive(manager)
        assert text == "BARRIER=1" and len(fds) == 1
        os.close(fds[0])  # (that barrier has already timed out)
        def answer() -> None:
            text, fds = _receive(manager)
            assert text == "BARRIER=1"
            for fd in fds:
                os.close(fd)

        helper = threading.Thread(target=answer)
        helper.start()
        assert sdnotify.barrier(5.0)
        helper.join(5)
    finally:
        manager.close()


def test_listener_in_a_directory_the_daemon_cannot_enter_is_taken(tmp_path: Path) -> None:
    """A socket unit's listener lives in a root-owned 0750 directory the daemon's user cannot
    enter: an unprivileged process handed it still takes it (getsockname() names the path;
    the file cannot be looked at) — and one bound elsewhere is still refused."""
    directory = tmp_path / "sockets"
    directory.mkdir(mode=0o750)
    os.chmod(directory, 0o750)
    os.chmod(tmp_path, 0o755)
    path = directory / "uart0.bus"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(4)
    check = ("import sys; from pathlib import Path; from uartbridge.sockets import "
             "listener_mismatch, socket; s = socket.socket(fileno=int(sys.argv[2])); "
             "print(listener_mismatch(s, Path(sys.argv[1])), "
             "listener_mismatch(s, Path(sys.argv[1] + '.other')) is not None)")
    with new_user() as user, shared_dir() as lib:
        # The system's python3 and a copy of the package: the venv and the checkout may live
        # where the user cannot read (a fresh root's clone is under /root, 0700).
        shutil.copytree(REPO / "uartbridge", lib / "uartbridge",
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        fd = os.dup(sock.fileno())
        try:
            proc = subprocess.run(
                ["/usr/bin/python3", "-c", check, str(path), str(fd)], capture_output=True,
                text=True, timeout=60, cwd="/", env={"PYTHONPATH": str(lib)},
                user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                pass_fds=(fd,),
            )
        finally:
            os.close(fd)
    sock.close()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["None", "True"], proc.stdout


# -- the understudy's handover: memfd checkpoints and the message protocol ------------------


def _paced(generation: int = 2) -> Checkpoint:
    """The ``paced`` test checkpoint as this version writes it, at ``generation``."""
    ckpt = read_checkpoint(DATA / "checkpoint-v4-paced-mid-character.json")
    return dataclasses.replace(ckpt, meta=dataclasses.replace(
        ckpt.meta, format_version=FORMAT_VERSION, generation=generation))


def _daemon_with_memfd(tmp_path: Path, memfd_bytes: bytes) -> tuple[Any, Checkpoint]:
    """A Daemon (not run) for UART ``paced`` whose state directory holds a valid checkpoint
    (generation 2) and whose handover carries ``memfd_bytes`` in a memfd."""
    from procs import Daemon as DaemonFiles

    from uartbridge.config import load_config
    from uartbridge.daemon.process import Daemon

    files = DaemonFiles(root=tmp_path, uarts=[{"name": "paced", "port": "pty:"}],
                        checkpoint={"resume": "never"})
    files.write_config()
    on_disk = _paced()
    files.state_dir.mkdir(mode=0o700)
    write_checkpoint(checkpoint_path(files.state_dir, "paced"), on_disk)
    d = Daemon(load_config(files.config_path))
    d.restarts = 1
    d._handed = HandedFds([(checkpoint_name("paced"), memfd_with(memfd_bytes))])
    return d, on_disk


def test_handover_memfd_checkpoint_is_resumed_before_the_state_directory_s(
    tmp_path: Path,
) -> None:
    """A valid checkpoint in the handover's memfd is the one resumed (newer than the file)."""
    d, _on_disk = _daemon_with_memfd(tmp_path, encode(_paced(7)))
    ckpt, path = d._resume_source("paced")
    assert ckpt is not None and ckpt.meta.generation == 7
    assert path == checkpoint_path(d.config.daemon.state_dir, "paced")


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "empty"])
def test_bad_handover_memfd_checkpoint_is_refused_and_the_file_resumed(
    tmp_path: Path, damage: str
) -> None:
    """A truncated, corrupt or empty memfd checkpoint is refused by the file reader's rules
    (logged as a warning naming the problem, no exception) and the state directory's
    checkpoint, written by the same handover, is resumed instead."""
    good = encode(_paced())
    data = {"truncated": good[: len(good) // 2],
            "corrupt": good.replace(b'"generation": 2', b'"generation": "2"'),
            "empty": b""}[damage]
    assert data != good
    d, on_disk = _daemon_with_memfd(tmp_path, data)
    with structlog.testing.capture_logs() as logs:
        ckpt, _path = d._resume_source("paced")
    assert ckpt == on_disk
    refused = [e for e in logs if e["event"].startswith("handover checkpoint refused")]
    assert len(refused) == 1 and refused[0]["uart"] == "paced", logs
    assert d._handed is not None and d._handed.take(checkpoint_name("paced")) is None


def test_handover_message_carries_named_fds_and_refuses_a_malformed_one() -> None:
    """``send``/``receive`` carry a header and named descriptors (the same files arrive);
    a header whose names do not match the descriptors is refused and its fds closed."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    memfd = memfd_with(b"state")
    try:
        understudy.send(ours, "handover", [("checkpoint.u", memfd)], restarts=3)
        header, fds = understudy.receive(theirs)
        assert header["msg"] == "handover" and header["restarts"] == 3
        assert [name for name, _fd in fds] == ["checkpoint.u"]
        with open(understudy.fd_path(fds[0][1]), "rb") as f:
            assert f.read() == b"state"
        os.close(fds[0][1])
        with pytest.raises(OSError):  # sealed: nobody changes it once sent
            os.write(memfd, b"x")
        socket.send_fds(ours, [b'{"msg": "handover", "names": []}'], [memfd])
        with pytest.raises(understudy.HandoverError, match="malformed"):
            understudy.receive(theirs)
        ours.close()
        with pytest.raises(understudy.HandoverError, match="gone"):
            understudy.receive(theirs)
    finally:
        os.close(memfd)
        ours.close()
        theirs.close()


def test_handover_of_more_fds_than_one_message_carries_arrives_whole() -> None:
    """More descriptors than SCM_RIGHTS carries in one message (a group of many UARTs: a
    port, a bus socket and a checkpoint each) arrive all, in order, under their names."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    memfd = memfd_with(b"state")
    sent = [(f"port.u{i}", os.dup(memfd)) for i in range(understudy.MAX_FDS + 50)]
    received: list[tuple[str, int]] = []
    try:
        understudy.send(ours, "handover", sent, restarts=1)
        header, received = understudy.receive(theirs)
        assert header["msg"] == "handover" and header["restarts"] == 1
        assert [name for name, _fd in received] == [name for name, _fd in sent]
        assert all(os.fstat(fd).st_ino == os.fstat(memfd).st_ino for _name, fd in received)
    finally:
        for _name, fd in sent + received:
            os.close(fd)
        os.close(memfd)
        ours.close()
        theirs.close()
