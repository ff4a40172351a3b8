"""README's Quick start, word for word, on fresh Debian 12 and 13 roots (debootstrap minbase).

Each root has only ``python3 git ca-certificates sudo`` (plus the host's apt, CA and pip
configuration, so that it reaches the same registries) and a ``git clone`` of this checkout.
The run command is run by an unprivileged user with sudo (so bootstrap's apt-get goes through
sudo and the daemon uses its non-root defaults), the test command by root, as CI does.
The clone has the committed tree (HEAD): uncommitted changes are not tested.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import rootfs
from procs import REPO
from readme_commands import quick_start_commands

from uartbridge.client import BusClient

pytestmark = pytest.mark.system

SUITES = ("bookworm", "trixie")
PACKAGES = ("python3", "git", "ca-certificates", "sudo")
USER = "tester"
RUN_READY_TIMEOUT_S = 900.0  # apt-get update + python3-venv + pip install, on a loaded machine
STOP_TIMEOUT_S = 60.0
SUITE_TIMEOUT_S = 2400.0  # the test command: apt (QEMU, SystemC, toolchains), pip, the suite
READY_LINE = re.compile(r"\bpty (\S+)\s+bus (\S+)")


@dataclass
class Root:
    """A fresh root, mounted, with the checkout cloned for root and for USER."""

    suite: str
    path: Path
    logs: Path
    uid: int
    gid: int

    def inside(self, path: str | Path) -> Path:
        """The host path of ``path`` inside the root."""
        return self.path / Path(path).relative_to("/")

    def command(self, script: str, *, user: bool, **env: str) -> list[str]:
        """chroot argv running ``script`` with bash, as USER or as root, in a clean env."""
        home = f"/home/{USER}" if user else "/root"
        environ = rootfs.root_env(home, USER if user else "root", **env)
        who = [f"--userspec={self.uid}:{self.gid}", f"--groups={self.gid}"] if user else []
        return ["chroot", *who, str(self.path), "/usr/bin/env", "-i",
                *(f"{k}={v}" for k, v in environ.items()), "/bin/bash", "-c", script]

    def run(self, script: str, *, user: bool = False, timeout_s: float = 120.0) -> str:
        """Run ``script`` in the root; its output, or an AssertionError with it."""
        proc = subprocess.run(self.command(script, user=user), capture_output=True, text=True,
                              timeout=timeout_s, check=False)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"[{self.suite}] {script!r}: exit {proc.returncode}\n{output}"
        return output


def _clone(root: Root, home: str, owner: tuple[int, int] | None) -> None:
    dest = root.inside(home) / "uartbridge"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(dest)],
                   check=True, timeout=120)
    if owner is not None:
        subprocess.run(["chown", "-R", f"{owner[0]}:{owner[1]}", str(dest)], check=True,
                       timeout=60)


@pytest.fixture(scope="module", params=SUITES)
def root(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Root]:
    """A fresh ``suite`` root (debootstrap, the host's configuration), mounted; removed after."""
    rootfs.require_root_tools()
    suite: str = request.param
    logs = tmp_path_factory.mktemp(f"fresh-{suite}-logs")
    # Outside pytest's basetemp, which other pytest sessions prune: this directory gets bind
    # mounts, and only remove_root (which refuses while anything is mounted) deletes it.
    path = Path(tempfile.mkdtemp(prefix=f"uartbridge-{suite}-", dir=rootfs.WORK_DIR)) / "root"
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"],
                           capture_output=True, text=True, timeout=30, check=False).stdout
    if dirty.strip():
        print(f"note: uncommitted changes in {REPO} are not in the clone:\n{dirty}")
    start = time.monotonic()
    try:
        took_s = rootfs.debootstrap(path, suite, PACKAGES, log=logs / "debootstrap.log")
        print(f"[{suite}] debootstrap {took_s:.1f} s")
        subprocess.run(["chroot", str(path), "useradd", "--create-home", "--shell",
                        "/bin/bash", USER], check=True, timeout=60)
        sudoers = path / "etc/sudoers.d" / USER
        sudoers.write_text(f"{USER} ALL=(ALL) NOPASSWD: ALL\n", encoding="ascii")
        sudoers.chmod(0o440)
        entry = next(line for line in (path / "etc/passwd").read_text().splitlines()
                     if line.startswith(f"{USER}:"))
        uid, gid = (int(x) for x in entry.split(":")[2:4])
        fresh = Root(suite, path, logs, uid, gid)
        rootfs.configure_like_host(path, suite, homes=(Path("/root"), Path(f"/home/{USER}")))
        # The user's pip configuration was copied in as root.
        subprocess.run(["chown", "-R", f"{uid}:{gid}", str(fresh.inside(f"/home/{USER}"))],
                       check=True, timeout=60)
        _clone(fresh, f"/home/{USER}", (uid, gid))
        _clone(fresh, "/root", None)
        with rootfs.mounted(path, rootfs.pip_local_dirs()):
            yield fresh
    finally:
        rootfs.remove_root(path.parent)  # refuses while anything is still mounted under it
        print(f"[{suite}] root total {time.monotonic() - start:.1f} s")


class Terminal:
    """The master side of the pty a command runs on, copied to a log file as it comes."""

    def __init__(self, master: int, log_path: Path) -> None:
        self.master = master
        self.log = log_path.open("wb")
        self.data = bytearray()

    def read(self, timeout_s: float) -> None:
        """Take what the terminal shows within ``timeout_s``."""
        if select.select([self.master], [], [], timeout_s)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: nothing has the slave open any more
                time.sleep(timeout_s)
                return
            self.data += chunk
            self.log.write(chunk)
            self.log.flush()

    def text(self) -> str:
        return self.data.decode(errors="replace")

    def close(self) -> None:
        self.log.close()
        os.close(self.master)


def _daemon_pid(root: Root) -> int | None:
    """The uartbridge daemon running in the root (its python process), if any."""
    for pid in rootfs.processes_in(root.path):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"uartbridge") for a in argv[:2]) and b"run" in argv:
            return pid
    return None


def test_readme_run_command_in_fresh_root(root: Root) -> None:
    """README's run command, as a user with sudo: the daemon prints its pty and bus, serves
    the bus, and on SIGTERM writes its final checkpoint and exits 0; nothing goes into the
    system's Python."""
    run_cmd, _ = quick_start_commands()
    log_path = root.logs / "run.log"
    start = time.monotonic()
    # On a terminal, as README's reader runs it: the daemon then logs in plain words and
    # announces "uart0: pty … bus …" (its JSON and journal logs have a "ready" event instead).
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(root.command(f"cd ~/uartbridge && {run_cmd}", user=True),
                                stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    finally:
        os.close(slave)
    terminal = Terminal(master, log_path)
    try:
        found = None
        while found is None and proc.poll() is None:
            if time.monotonic() - start > RUN_READY_TIMEOUT_S:
                break
            terminal.read(0.5)
            found = READY_LINE.search(terminal.text())
        assert found, (f"[{root.suite}] no 'pty … bus …' line "
                       f"(exit {proc.poll()}):\n{rootfs.tail(log_path)}")
        ready_s = time.monotonic() - start
        pty, bus = Path(found.group(1)), Path(found.group(2))
        assert root.inside(pty).resolve().is_char_device(), f"{pty} is not a pty"
        with BusClient(root.inside(bus), timeout_s=30) as client:
            assert client.name, "the bus answered HELLO without a UART name"
        pid = _daemon_pid(root)
        assert pid is not None, f"no uartbridge process in the root:\n{rootfs.tail(log_path)}"
        stopped_at = time.time()
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            terminal.read(0.2)
        code = proc.wait(timeout=5)
        terminal.read(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        terminal.close()
    output = log_path.read_text(errors="replace")
    assert code == 0, f"[{root.suite}] exit {code} after SIGTERM:\n{rootfs.tail(log_path)}"
    assert "Traceback" not in output, output
    state = root.inside(f"/home/{USER}/.local/state/uartbridge")
    checkpoints = [p for p in state.rglob("*.json") if p.stat().st_mtime >= stopped_at - 1]
    assert checkpoints, (f"[{root.suite}] no checkpoint written at stop under {state}: "
                         f"{sorted(state.rglob('*'))}")
    for checkpoint in checkpoints:
        inside = Path("/") / checkpoint.relative_to(root.path)
        root.run(f"cd ~/uartbridge && .venv/bin/uartbridge inspect {inside}", user=True)
    # Nothing went into the system's Python: uartbridge imports only in .venv.
    system = subprocess.run(root.command("python3 -c 'import uartbridge'", user=True),
                            capture_output=True, timeout=60, check=False)
    assert system.returncode != 0, "uartbridge is importable by the system's python3"
    print(f"[{root.suite}] run command: ready after {ready_s:.1f} s, "
          f"total {time.monotonic() - start:.1f} s")


def test_readme_test_command_in_fresh_root(root: Root) -> None:
    """README's test command, as root: bootstrap --test installs everything the suite needs
    (CI=1: a missing program fails instead of skipping) and the whole suite passes."""
    _, test_cmd = quick_start_commands()
    log_path = root.logs / "test.log"
    start = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(root.command(f"cd /root/uartbridge && {test_cmd}", user=False,
                                             CI="1"),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait(timeout=SUITE_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    took_s = time.monotonic() - start
    output = log_path.read_text(errors="replace")
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    assert code == 0, (f"[{root.suite}] exit {code} after {took_s:.0f} s:\n"
                       f"{rootfs.tail(log_path, 120)}")
    assert summary and "passed" in summary[-1], rootfs.tail(log_path)
    print(f"[{root.suite}] test command: {took_s:.1f} s; {summary[-1].strip()}")
