"""Real unprivileged users against a root daemon: socket_group, and `checkpoint --output`.

Users and a group are created for each test (useradd/groupadd) and removed in ``finally``.
The CLI runs as the user (tests/procs.py ``cli_as``: imported as root, then every id dropped
before the command runs); plain socket and file operations run under the system Python as
the user from the start (``python_as``).
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from procs import Daemon, cli_as, daemon, new_group, new_user, python_as, shared_dir

from uartbridge.checkpoint import read_checkpoint

pytestmark = pytest.mark.e2e

CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(exc.strerror); sys.exit(1)
print("connected")
"""
OPEN = """
import os, sys
try:
    os.close(os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY))
except OSError as exc:
    print(exc.strerror); sys.exit(1)
print("opened")
"""


@dataclass
class Setup:
    d: Daemon
    group: grp.struct_group
    member: pwd.struct_passwd
    outsider: pwd.struct_passwd
    root: Path


@pytest.fixture
def setup() -> Iterator[Setup]:
    """A root daemon (one pty UART) whose socket_group is a fresh group with one member."""
    with (
        shared_dir() as root,
        new_group() as group,
        new_user(group.gr_name) as member,
        new_user() as outsider,
        daemon(root / "d", [{"name": "uart0", "port": "pty:"}], interval_s=0) as d,
    ):
        d.write_config()
        text = d.config_path.read_text().replace(
            "[daemon]\n", f'[daemon]\nsocket_group = "{group.gr_name}"\n'
        )
        d.write_config = lambda: None  # type: ignore[method-assign]
        d.config_path.write_text(text)
        (root / "d").chmod(0o755)
        d.start()
        yield Setup(d=d, group=group, member=member, outsider=outsider, root=root)


def test_socket_group_members_reach_sockets_and_pty_others_do_not(setup: Setup) -> None:
    """socket_group owns the runtime directory (g+rx), both sockets and the pty slave (0660):
    a member connects and opens them, a non-member gets EACCES."""
    d = setup.d
    gid = setup.group.gr_gid
    run_st = d.runtime_dir.stat()
    assert run_st.st_gid == gid and stat.S_IMODE(run_st.st_mode) & 0o050 == 0o050
    assert not stat.S_IMODE(run_st.st_mode) & 0o007
    slave = d.runtime_dir / "uart0.pty"
    for path in (d.bus(), d.control, slave):
        st = path.stat()
        assert st.st_gid == gid and stat.S_IMODE(st.st_mode) == 0o660, (path, oct(st.st_mode))
    for path in (d.bus(), d.control):
        ok = python_as(setup.member, CONNECT, str(path))
        assert ok.returncode == 0 and "connected" in ok.stdout, ok
        refused = python_as(setup.outsider, CONNECT, str(path))
        assert refused.returncode == 1 and "Permission denied" in refused.stdout, refused
    assert python_as(setup.member, OPEN, str(slave)).returncode == 0
    denied = python_as(setup.outsider, OPEN, str(slave))
    assert denied.returncode == 1 and "Permission denied" in denied.stdout
    status = cli_as(setup.member, "status", "--control", str(d.control), cwd=setup.root)
    assert status.returncode == 0 and "uart0" in status.stdout, status.stderr
    status = cli_as(setup.outsider, "status", "--control", str(d.control), cwd=setup.root)
    assert status.returncode == 69 and "Permission denied" in status.stderr


def test_without_socket_group_the_pty_slave_is_private(tmp_path: Path) -> None:
    """No socket_group: the daemon's pty slave is 0600 (not the tty layer's 0620 group tty)."""
    with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}]) as d:
        d.start()
        st = (d.runtime_dir / "uart0.pty").stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()


def test_output_over_a_file_the_user_may_not_write_is_refused(setup: Setup) -> None:
    """`checkpoint --output` onto a root-owned 0644 file in a root-owned directory, by a
    group member: EACCES from the member's own write (73); the file is untouched."""
    locked = setup.root / "locked"
    locked.mkdir(mode=0o755)
    target = locked / "precious.conf"
    target.write_text("root's own data\n")
    target.chmod(0o644)
    result = cli_as(setup.member, "checkpoint", "--control", str(setup.d.control),
                    "--output", str(target), cwd=setup.root)
    assert result.returncode == 73, result.stderr
    assert "Permission denied" in result.stderr and "Traceback" not in result.stderr
    assert target.read_text() == "root's own data\n"
    st = target.stat()
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o644


@pytest.mark.parametrize("as_root", [False, True], ids=["member", "root"])
def test_output_over_a_device_node_is_refused(setup: Setup, as_root: bool) -> None:
    """`checkpoint --output` naming a device node (c 1,3, in a directory the client may
    write): refused as not a regular file (73), the node stays."""
    owned = setup.root / "mine"
    owned.mkdir(mode=0o755)
    os.chown(owned, setup.member.pw_uid, setup.member.pw_gid)
    node = owned / "null"
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    args = ("checkpoint", "--control", str(setup.d.control), "--output", str(node))
    result = setup.d.cli(*args) if as_root else cli_as(setup.member, *args, cwd=setup.root)
    assert result.returncode == 73, result.stderr
    assert "not a regular file" in result.stderr
    st = node.lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


def test_relative_output_is_the_clients_and_written_with_its_rights(setup: Setup) -> None:
    """A relative --output lands in the client's working directory, owned by the client,
    mode 0600, and holds a valid checkpoint of the UART."""
    owned = setup.root / "work"
    owned.mkdir(mode=0o755)
    os.chown(owned, setup.member.pw_uid, setup.member.pw_gid)
    result = cli_as(setup.member, "checkpoint", "--control", str(setup.d.control),
                    "--output", "saved.json", cwd=owned)
    assert result.returncode == 0, result.stderr
    saved = owned / "saved.json"
    st = saved.stat()
    assert st.st_uid == setup.member.pw_uid and stat.S_IMODE(st.st_mode) == 0o600
    assert read_checkpoint(saved).meta.uart_name == "uart0"
    assert not (Path(__file__).resolve().parent.parent / "saved.json").exists()
