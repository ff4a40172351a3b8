"""A port is one link's alone, only ports are ports, and a pty link never replaces anything.

Real peers throughout: two uartbridge daemons on one socat pty, tio holding it under tmux,
UUCP lock files naming live and dead processes, a real unprivileged user (created for the
test) refused by a 0660 pty, and the daemon started on /dev/null, a FIFO and the like.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _port_support import Guest, need, raw_peer, socat_pair, wait_for
from procs import REPO, daemon, new_user, stop_process, stop_tmux
from procs import socat_pair as daemon_socat_pair
from procs import wait_for as wait_until

from uartbridge.errors import PortError, PortUnavailableError
from uartbridge.port.claim import claim_tty, lock_names
from uartbridge.port.owned_pty import create_pty
from uartbridge.port.state import PortSettings, ReaderState
from uartbridge.port.termios_ops import RealTermiosOps

pytestmark = pytest.mark.e2e


def _status_of(d: Any) -> dict[str, Any]:
    uart: dict[str, Any] = d.status()["uarts"][0]
    return uart


def _open_failures(log: str) -> list[dict[str, Any]]:
    events = []
    for line in log.splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "port.open_failed":
                events.append(event)
    return events


# -- two openers -----------------------------------------------------------------------------


def test_a_second_daemon_on_the_same_socat_pty_is_refused_naming_the_first(tmp_path: Path) -> None:
    """Daemon B on daemon A's port: refused (flock), A's PID in B's log and status, logged once
    over many retries; B takes the port when A stops. Nothing A reads is split with B."""
    uart = {"name": "uart0", "reconnect_min_s": 0.05, "reconnect_max_s": 0.1}
    with (
        daemon_socat_pair(tmp_path) as pair,
        daemon(tmp_path / "a", [{**uart, "port": str(pair.a)}]) as a,
        daemon(tmp_path / "b", [{**uart, "port": str(pair.a)}]) as b,
    ):
        a.start()
        assert a.proc is not None
        b.start()
        status = wait_until(lambda: (s := _status_of(b))["last_error"] and s, 10)
        assert status["reader_state"] == "disconnected"
        error = status["last_error"]
        assert f"in use by PID {a.proc.pid} (python" in error["message"], error
        # A's UUCP lock file (the default /var/lock) is seen first; tio's test shows flock.
        assert "(lock file /var/lock/LCK.." in error["message"] and error["errno"] == "EBUSY"
        assert "stop the program holding the port" in error["hint"]
        assert status["link"]["last_error"] == error
        text = b.cli("status", "--config", str(b.config_path)).stdout  # the text form too
        assert f"  last error  {error['message']}" in text, text
        assert f"hint: {error['hint']}" in text, text
        time.sleep(1.0)  # 10 or more retries
        failures = _open_failures(b.log())
        assert len(failures) == 1, failures
        assert f"PID {a.proc.pid}" in failures[0]["error"]
        assert _status_of(a)["reader_state"] == "connected"
        assert a.stop() == 0
        wait_until(lambda: _status_of(b)["reader_state"] == "connected", 10)
        assert _status_of(b)["link"]["exclusive"]["flock"] is True
        assert b.stop() == 0  # (a clean stop removes its UUCP lock file)


def test_fail_fast_daemon_exits_69_naming_the_holder(tmp_path: Path) -> None:
    """With fail_fast, a port held by another daemon is a start failure: exit 69, PID named."""
    with (
        daemon_socat_pair(tmp_path) as pair,
        daemon(tmp_path / "a", [{"name": "uart0", "port": str(pair.a)}]) as a,
    ):
        a.start()
        assert a.proc is not None
        config = tmp_path / "b.toml"
        config.write_text(
            "[daemon]\n"
            f'runtime_dir = "{tmp_path / "b-run"}"\nstate_dir = "{tmp_path / "b-state"}"\n'
            "fail_fast = true\n"
            f'[[uart]]\nname = "uart0"\nport = "{pair.a}"\n'
        )
        result = subprocess.run(
            [sys.executable, "-m", "uartbridge", "run", "--config", str(config)],
            capture_output=True, text=True, timeout=30, cwd=REPO,
        )
        assert result.returncode == 69, result.stderr
        assert f"in use by PID {a.proc.pid}" in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "b-run" / "uart0.bus").exists()
        assert a.stop() == 0


def test_tio_holding_the_port_under_tmux_is_named(tmp_path: Path) -> None:
    """tio holds the socat pty (flock): the link is refused naming tio's PID, and takes the
    port (retrying) once tio is gone."""
    tmux = need("tmux")
    tio = need("tio")
    env = {**os.environ, "TMUX_TMPDIR": str(tmp_path)}

    def pane() -> str:
        return subprocess.run([tmux, "capture-pane", "-p", "-t", "t"], env=env,
                              capture_output=True, text=True, timeout=5).stdout

    async def run() -> None:
        with socat_pair(tmp_path, "tio") as s:
            try:
                subprocess.run([tmux, "new-session", "-d", "-s", "t", "-x", "120", "-y", "20",
                                f"exec {tio} -b 115200 {s.a}"], env=env, check=True, timeout=5)
                assert await wait_for(lambda: "Connected" in pane(), 5)
                listed = subprocess.run([tmux, "list-panes", "-a", "-F", "#{pane_pid}"],
                                        env=env, capture_output=True, text=True, timeout=5)
                tio_pid = int(listed.stdout.split()[0])
                g = Guest(PortSettings(url=str(s.a), reconnect_min_s=0.05, reconnect_max_s=0.1))
                with pytest.raises(PortUnavailableError, match=rf"in use by PID {tio_pid} \(tio\)"):
                    await g.link.open()
                g = Guest(PortSettings(url=str(s.a), reconnect_min_s=0.05, reconnect_max_s=0.1))
                await g.link.open(retry=True)
                error: Any = g.link.status()["last_error"]
                assert f"PID {tio_pid} (tio)" in error["message"]
                assert g.link.reader_state is ReaderState.DISCONNECTED
                os.kill(tio_pid, signal.SIGTERM)
                assert await wait_for(lambda: g.link.reader_state is ReaderState.CONNECTED, 5)
                g.setup()
                with raw_peer(s.b) as peer:
                    os.write(peer, b"after tio")
                    assert await g.receive(9) == b"after tio"
                await g.link.close()
            finally:
                stop_tmux(tmux, env)

    asyncio.run(run())


def test_tiocexcl_is_taken_on_serial_ports_and_released_at_close() -> None:
    """A serial port (fake termios) is held with TIOCEXCL and released (TIOCNXCL) at close;
    a pty is not (its peer keeps the slave open, so the flag would outlive a crash)."""
    from _port_support import FakeOps

    async def run() -> None:
        master, slave = os.openpty()
        try:
            fake = FakeOps()
            g = Guest(PortSettings(url=os.ttyname(slave), lock_dir=None), termios_ops=fake)
            await g.link.open()
            assert fake.exclusive == [True]
            assert g.link.status()["exclusive"] == {
                "flock": True, "tiocexcl": True, "lock_file": None
            }
            await g.link.close()
            assert fake.exclusive == [True, False]
            real = Guest(PortSettings(url=os.ttyname(slave), lock_dir=None))
            await real.link.open()
            assert real.link.status()["exclusive"]["tiocexcl"] is False  # type: ignore[index]
            await real.link.close()
        finally:
            os.close(master)
            os.close(slave)

    asyncio.run(run())


# -- UUCP lock files ---------------------------------------------------------------------------


@contextlib.contextmanager
def _sleeper(holding: str | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A live process (``sleep``), with ``holding`` open as its stdin if given."""
    stdin = os.open(holding, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK) if holding else None
    try:
        proc = subprocess.Popen(["sleep", "60"], stdin=stdin)
    finally:
        if stdin is not None:
            os.close(stdin)
    try:
        wait_until(lambda: Path(f"/proc/{proc.pid}/comm").read_text().strip() == "sleep", 5)
        yield proc
    finally:
        stop_process(proc, signal.SIGKILL)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_uucp_lock_of_a_live_process_refuses_the_port_and_a_stale_one_is_replaced(
    tmp_path: Path,
) -> None:
    """LCK..<tty> naming a live PID refuses the port, naming it; a dead PID's lock is removed
    and ours written (PID, 10 characters, newline) and removed again at close."""
    locks = tmp_path / "lock"
    locks.mkdir()
    ops = RealTermiosOps()
    notes: list[str] = []
    master, slave = os.openpty()
    path = os.ttyname(slave)
    name = lock_names(path)[0]
    lock = locks / f"LCK..{name}"
    try:
        with _sleeper(holding=path) as holder:
            lock.write_text(f"{holder.pid:10d}\n")
            os.utime(lock, (time.time() - 60, time.time() - 60))
            with pytest.raises(PortUnavailableError) as info:
                claim_tty(path, ops, lock_dir=str(locks), note=notes.append)
            assert f"in use by PID {holder.pid} (sleep) (lock file {lock})" in str(info.value)
            assert lock.read_text() == f"{holder.pid:10d}\n"  # never touched
        lock.write_text(f"{_dead_pid():10d}\n")
        claim = claim_tty(path, ops, lock_dir=str(locks), note=notes.append)
        try:
            assert lock.read_bytes() == f"{os.getpid():10d}\n".encode()
            assert claim.status()["lock_file"] == str(lock)
            assert sorted(p.name for p in locks.iterdir()) == [lock.name]  # no temp left
        finally:
            claim.release(ops)
            os.close(claim.fd)
        assert not lock.exists()
        assert notes == []
    finally:
        os.close(master)
        os.close(slave)


def test_a_lock_whose_pid_was_recycled_is_stale_but_a_young_one_is_honoured(
    tmp_path: Path,
) -> None:
    """A lock naming a live process that has no fd on the port: stale once it is older than
    a few seconds (the PID was recycled after its holder died), honoured while young (its
    writer may be about to open the port)."""
    locks = tmp_path / "lock"
    locks.mkdir()
    master, slave = os.openpty()
    path = os.ttyname(slave)
    lock = locks / f"LCK..{lock_names(path)[0]}"
    ops = RealTermiosOps()
    try:
        with _sleeper() as stranger:
            lock.write_text(f"{stranger.pid:10d}\n")
            with pytest.raises(PortUnavailableError, match=f"PID {stranger.pid}"):
                claim_tty(path, ops, lock_dir=str(locks), note=print)
            os.utime(lock, (time.time() - 60, time.time() - 60))
            claim = claim_tty(path, ops, lock_dir=str(locks), note=print)
            assert lock.read_text() == f"{os.getpid():10d}\n"
            claim.release(ops)
            os.close(claim.fd)
    finally:
        os.close(master)
        os.close(slave)


def test_uucp_lock_under_the_configured_link_name_is_honoured_too(tmp_path: Path) -> None:
    """A lock under the configured path's own name (a program that opened the link, not the
    device) refuses the port as well."""
    locks = tmp_path / "lock"
    locks.mkdir()
    master, slave = os.openpty()
    link = tmp_path / "my-adapter"
    link.symlink_to(os.ttyname(slave))
    try:
        assert lock_names(str(link)) == [os.path.basename(os.ttyname(slave)), "my-adapter"]
        with _sleeper() as holder:
            (locks / "LCK..my-adapter").write_text(f"{holder.pid:10d}\n")
            with pytest.raises(PortUnavailableError, match=f"PID {holder.pid}"):
                claim_tty(str(link), RealTermiosOps(), lock_dir=str(locks), note=print)
    finally:
        os.close(master)
        os.close(slave)


def test_an_unwritable_lock_directory_honours_locks_creates_none_and_says_so_once(
    tmp_path: Path,
) -> None:
    """A lock directory we may not write (run as a real unprivileged user): a live lock in it
    still refuses the port; without one the port opens, no lock is created, one note says so."""
    # Outside tmp_path (root's 0700): a root-owned 0755 directory the user can read, not write.
    locks = Path(tempfile.mkdtemp(prefix="uartbridge-locks-"))
    locks.chmod(0o755)
    master, slave = os.openpty()
    path = os.ttyname(slave)
    os.chmod(path, 0o666)
    lock = locks / f"LCK..{lock_names(path)[0]}"
    try:
        with new_user() as user, _sleeper() as holder:
            lock.write_text(f"{holder.pid:10d}\n")
            refused = _as_user(user, _try_claim, path, str(locks))
            assert f"PID {holder.pid}" in refused["error"], refused
            lock.unlink()
            first = _as_user(user, _try_claim, path, str(locks), 3)
            assert first["error"] is None, first
            assert first["lock_file"] is None and not lock.exists()
            assert len(first["notes"]) == 1 and "ReadWritePaths=/run/lock" in first["notes"][0]
    finally:
        os.close(master)
        os.close(slave)
        shutil.rmtree(locks)


def _try_claim(path: str, lock_dir: str, times: int = 1) -> dict[str, Any]:
    notes: list[str] = []
    ops = RealTermiosOps()
    result: dict[str, Any] = {"notes": notes, "error": None, "lock_file": None}
    for _ in range(times):
        try:
            claim = claim_tty(path, ops, lock_dir=lock_dir, note=notes.append)
        except PortError as exc:
            result["error"] = str(exc)
            return result
        result["lock_file"] = claim.status()["lock_file"]
        claim.release(ops)
        os.close(claim.fd)
    return result


# -- a real unprivileged user ------------------------------------------------------------------




def _as_user(user: pwd.struct_passwd, func: Any, *args: Any) -> dict[str, Any]:
    """Run ``func(*args)`` in a forked child as ``user`` (the interpreter's files under /root
    stay out of its reach: everything it needs is imported already); its JSON result."""
    for codec in ("ascii", "utf-8", "latin-1"):  # loaded lazily from the stdlib otherwise
        codecs.lookup(codec)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            result = func(*args)
            os.write(write_end, json.dumps(result).encode())
        except BaseException as exc:
            os.write(write_end, json.dumps({"child_error": repr(exc)}).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(data or b"{}")
    assert "child_error" not in result, result
    return result


def _open_as_unprivileged(path: str, wait_s: float, ready_fd: int) -> dict[str, Any]:
    """In the child: a retrying link on ``path`` for ``wait_s``; then a byte on ``ready_fd``
    (the parent permits the user) and the link's own reopening. What it saw and logged."""
    import structlog

    events: list[dict[str, Any]] = []

    def capture(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        events.append({k: str(v) for k, v in event.items()})
        raise structlog.DropEvent

    log = structlog.wrap_logger(None, processors=[capture])

    async def run() -> dict[str, Any]:
        g = Guest(PortSettings(url=path, reconnect_min_s=0.05, reconnect_max_s=0.1,
                               lock_dir=None), log=log)
        await g.link.open(retry=True)
        await asyncio.sleep(wait_s)  # about ten retries
        refused = g.link.status()["last_error"]
        state_then = str(g.link.reader_state)
        os.write(ready_fd, b"x")
        opened = await wait_for(lambda: g.link.reader_state is ReaderState.CONNECTED, 10)
        await g.link.close()
        return {"refused": refused, "state_then": state_then, "opened": opened,
                "events": events}

    return asyncio.run(run())


def test_permission_denied_is_logged_once_with_errno_and_a_dialout_hint(tmp_path: Path) -> None:
    """A real user not in the port's group: EACCES logged once over many retries, status says
    errno and the hint to add it to the group; once permitted, the link opens by itself."""
    dialout = grp.getgrnam("dialout").gr_gid
    with socat_pair(tmp_path, "perm") as s:
        device = os.path.realpath(s.a)
        os.chown(device, 0, dialout)
        os.chmod(device, 0o660)
        ready_r, ready_w = os.pipe()

        def permit() -> None:
            if os.read(ready_r, 1):
                os.chmod(device, 0o666)

        helper = threading.Thread(target=permit, daemon=True)
        try:
            with new_user() as user:
                helper.start()
                result = _as_user(user, _open_as_unprivileged, device, 0.8, ready_w)
                helper.join(5)
        finally:
            os.close(ready_w)
            os.close(ready_r)
    refused = result["refused"]
    assert result["state_then"] == "disconnected"
    assert refused["errno"] == "EACCES"
    assert "Permission denied [EACCES]" in refused["message"]
    assert (
        f"is root:dialout 0660 and user {user.pw_name} is not in group dialout" in refused["hint"]
    )
    assert "SupplementaryGroups=dialout" in refused["hint"]
    failures = [e for e in result["events"] if e["event"] == "port.open_failed"]
    assert len(failures) == 1, result["events"]
    assert failures[0]["errno"] == "EACCES"
    assert result["opened"] is True
    assert any(e["event"] == "port.opened" for e in result["events"])


# -- only ports are ports ----------------------------------------------------------------------


def _run_once(tmp_path: Path, uart: dict[str, str]) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "u.toml"
    lines = ["[daemon]", f'runtime_dir = "{tmp_path / "run"}"', f'state_dir = "{tmp_path / "st"}"',
             "[[uart]]", 'name = "uart0"'] + [f'{k} = "{v}"' for k, v in uart.items()]
    config.write_text("\n".join(lines) + "\n")
    return subprocess.run(
        [sys.executable, "-m", "uartbridge", "run", "--config", str(config)],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )


@pytest.mark.parametrize(
    ("kind", "why"),
    [("null", "the character device /dev/null"), ("zero", "the character device /dev/zero"),
     ("file", "a regular file"), ("fifo", "a FIFO"), ("dir", "a directory")],
)
def test_what_is_not_a_port_is_refused_at_start_with_69(
    tmp_path: Path, kind: str, why: str
) -> None:
    """port = /dev/null, /dev/zero, a regular file, a FIFO or a directory: exit 69 at start,
    naming the path and what it is; nothing left behind, the file untouched."""
    path = {"null": "/dev/null", "zero": "/dev/zero"}.get(kind, str(tmp_path / f"not-a-{kind}"))
    if kind == "file":
        Path(path).write_bytes(b"precious")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        os.mkdir(path)
    result = _run_once(tmp_path, {"port": path})
    assert result.returncode == 69, result.stdout + result.stderr
    assert f"port {path} is {why}, not a serial port" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "uart0.bus").exists()
    if kind == "file":
        assert Path(path).read_bytes() == b"precious"


# -- a pty link never replaces what is not ours ------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "dir", "foreign-symlink", "symlink-elsewhere"])
def test_a_pty_link_path_holding_something_else_is_refused_and_left_alone(
    tmp_path: Path, kind: str
) -> None:
    """pty: with ``link`` at a regular file, a directory, another user's symlink or our symlink
    to a non-pty: refused (PortError, exit 69) and the thing there is untouched."""
    link = tmp_path / "guest-tty"
    if kind == "file":
        link.write_bytes(b"precious")
    elif kind == "dir":
        link.mkdir()
    elif kind == "foreign-symlink":
        link.symlink_to("/dev/pts/0")
        os.lchown(link, 65534, 65534)
    else:
        link.symlink_to("/etc/hostname")
    before = os.lstat(link)
    with pytest.raises(PortError, match=f"link path {link} holds .*; uartbridge replaces only"):
        create_pty(str(link))
    after = os.lstat(link)
    assert (after.st_ino, after.st_mode, after.st_uid) == (before.st_ino, before.st_mode,
                                                          before.st_uid)
    if kind == "file":
        assert link.read_bytes() == b"precious"


def test_our_stale_pty_link_is_replaced_and_what_took_its_place_is_not_removed(
    tmp_path: Path,
) -> None:
    """Our own symlink to a pty left by a crash is replaced; at stop, a file that took the
    link's place meanwhile is not removed (only our symlink to our slave is)."""

    async def run() -> None:
        link = tmp_path / "guest-tty"
        link.symlink_to("/dev/pts/99999")  # a stale one of ours
        g = Guest(PortSettings(url="pty:", link_path=str(link)))
        await g.link.open()
        assert os.readlink(link) == g.link.status()["slave_path"] or os.readlink(link).startswith(
            "/dev/pts/")
        assert os.readlink(link) != "/dev/pts/99999"
        await g.link.close()
        assert not link.exists() and not link.is_symlink()
        g = Guest(PortSettings(url="pty:", link_path=str(link)))
        await g.link.open()
        replacement = tmp_path / "replacement"
        replacement.write_bytes(b"someone's file")
        os.replace(replacement, link)
        await g.link.close()
        assert link.read_bytes() == b"someone's file"

    asyncio.run(run())


def test_daemon_with_a_pty_link_on_a_regular_file_exits_69_and_keeps_the_file(
    tmp_path: Path,
) -> None:
    """`run` with port = "pty:" and link at an existing file: exit 69, the file intact."""
    target = tmp_path / "precious.txt"
    target.write_bytes(b"do not replace me")
    result = _run_once(tmp_path, {"port": "pty:", "link": str(target)})
    assert result.returncode == 69, result.stderr
    assert f"link path {target} holds a regular file" in result.stderr
    assert "Traceback" not in result.stderr
    assert target.read_bytes() == b"do not replace me"

