"""The CLI finds daemons the way the units start them; systemd's own directories.

Daemons here listen in the host's real /run (``/run/uartbridge-<name>``) and read configs
from the real /etc/uartbridge, as under the units; every directory and file a test makes
there is unique to it and removed in ``finally``. systemd's DynamicUser= directories
(symlinks into /run/private and /var/lib/private) are built in a private mount namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import REPO, Daemon, daemon

from uartbridge.checkpoint import checkpoint_path

pytestmark = pytest.mark.e2e

ETC = Path("/etc/uartbridge")


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uartbridge", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (/run, /etc/uartbridge)")


@contextlib.contextmanager
def run_dir_daemon(tmp_path: Path, tag: str) -> Iterator[Daemon]:
    """A daemon whose runtime directory is /run/uartbridge-<unique> (found by discovery)."""
    run = Path("/run") / f"uartbridge-t{uuid.uuid4().hex[:8]}{tag}"
    with daemon(tmp_path / tag, [{"name": "uart0", "port": "pty:"}], interval_s=0) as d:
        d.write_config()
        text = d.config_path.read_text().replace(str(d.runtime_dir), str(run))
        d.write_config = lambda: None  # type: ignore[method-assign]
        d.config_path.write_text(text)
        d.root.joinpath("run").symlink_to(run)  # so that d.control, d.bus() point there
        try:
            yield d
        finally:
            d.stop()
            shutil.rmtree(run, ignore_errors=True)


def test_status_lists_every_daemon_and_checkpoint_refuses_to_guess(tmp_path: Path) -> None:
    """No option: `status` shows every daemon running here; `checkpoint` with two of them
    refuses (64) and lists them, touching neither; a named one is checkpointed."""
    _root_only()
    with run_dir_daemon(tmp_path, "a") as a, run_dir_daemon(tmp_path, "b") as b:
        a.start()
        b.start()
        assert a.proc is not None and b.proc is not None
        listed = _cli("status", "--json")
        assert listed.returncode == 0, listed.stderr
        pids = {s["pid"] for s in json.loads(listed.stdout)["daemons"]}
        assert {a.proc.pid, b.proc.pid} <= pids
        human = _cli("status")
        assert f"daemon pid {a.proc.pid}" in human.stdout
        assert f"daemon pid {b.proc.pid}" in human.stdout
        refused = _cli("checkpoint", "--stop")
        assert refused.returncode == 64, refused.stderr
        assert str(a.proc.pid) in refused.stderr and str(b.proc.pid) in refused.stderr
        assert not checkpoint_path(a.state_dir, "uart0").exists()
        assert not checkpoint_path(b.state_dir, "uart0").exists()
        assert a.proc.poll() is None and b.proc.poll() is None
        named = _cli("checkpoint", "--config", str(a.config_path))
        assert named.returncode == 0, named.stderr
        assert checkpoint_path(a.state_dir, "uart0").exists()
        assert not checkpoint_path(b.state_dir, "uart0").exists()


@contextlib.contextmanager
def etc_config(name: str, text: str) -> Iterator[Path]:
    """/etc/uartbridge/NAME.toml for the test (the directory too, if it was not there)."""
    _root_only()
    made_dir = not ETC.exists()
    ETC.mkdir(mode=0o755, exist_ok=True)
    path = ETC / f"{name}.toml"
    assert not path.exists(), f"{path} exists already"
    path.write_text(text)
    try:
        yield path
    finally:
        path.unlink()
        if made_dir:
            shutil.rmtree(ETC, ignore_errors=True)


def test_an_instance_config_needs_no_paths_and_is_found_by_name(tmp_path: Path) -> None:
    """/etc/uartbridge/NAME.toml without paths runs in /run/uartbridge-NAME and
    /var/lib/uartbridge-NAME (the uartbridge@NAME unit's); `--instance NAME` and
    `--config` find it, `checkpoint --stop --instance` stops it and no other daemon."""
    name = f"t{uuid.uuid4().hex[:8]}"
    run, state = Path(f"/run/uartbridge-{name}"), Path(f"/var/lib/uartbridge-{name}")
    with (
        etc_config(name, '[[uart]]\nname = "uart0"\nport = "pty:"\n') as config,
        run_dir_daemon(tmp_path, "other") as other,
    ):
        proc = None
        try:
            summary = _cli("check-config", str(config))
            assert summary.returncode == 0, summary.stderr
            assert f"instance {name}" in summary.stdout
            assert f"runtime_dir {run}  state_dir {state}" in summary.stdout
            other.start()
            proc = subprocess.Popen([sys.executable, "-m", "uartbridge", "run", "--config",
                                     str(config)], cwd=REPO, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            deadline = 200
            while not (run / "control.sock").exists() and deadline:
                subprocess.run(["sleep", "0.05"])
                deadline -= 1
            for selector in (("--instance", name), ("--config", str(config))):
                status = _cli("status", "--json", *selector)
                assert status.returncode == 0, status.stderr
                reply = json.loads(status.stdout)
                assert reply["pid"] == proc.pid and reply["instance"] == name
                assert reply["runtime_dir"] == str(run) and reply["state_dir"] == str(state)
            console = subprocess.run(
                [sys.executable, "-m", "uartbridge", "console", "--instance", name,
                 "--linger", "0.1"], input=b"hi", capture_output=True, timeout=60, cwd=REPO,
            )
            assert console.returncode == 0, console.stderr
            stopped = _cli("checkpoint", "--stop", "--instance", name)
            assert stopped.returncode == 0, stopped.stderr
            assert proc.wait(20) == 0
            assert checkpoint_path(state, "uart0").exists()
            assert other.proc is not None and other.proc.poll() is None
            missing = _cli("status", "--instance", "no-such-instance")
            assert missing.returncode == 69 and "Traceback" not in missing.stderr
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            shutil.rmtree(run, ignore_errors=True)
            shutil.rmtree(state, ignore_errors=True)


def test_the_default_config_is_etc_uartbridge_toml(tmp_path: Path) -> None:
    """With no FILE, check-config reads /etc/uartbridge/uartbridge.toml when it exists, and
    `run` with no --config serves it."""
    if (ETC / "uartbridge.toml").exists():
        pytest.skip("this host has a real /etc/uartbridge/uartbridge.toml")
    text = (f'[daemon]\nruntime_dir = "{tmp_path}/run"\nstate_dir = "{tmp_path}/state"\n'
            '[[uart]]\nname = "dflt"\nport = "pty:"\n')
    with etc_config("uartbridge", text) as config:
        checked = _cli("check-config")
        assert checked.returncode == 0 and f"{config}: OK" in checked.stdout
        proc = subprocess.Popen([sys.executable, "-m", "uartbridge", "run"], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            control = tmp_path / "run" / "control.sock"
            for _ in range(400):
                if control.exists():
                    break
                subprocess.run(["sleep", "0.05"])
            status = _cli("status", "--json", "--control", str(control))
            reply = json.loads(status.stdout)
            assert reply["config"] == str(config) and reply["instance"] is None
            assert [u["name"] for u in reply["uarts"]] == ["dflt"]
        finally:
            proc.terminate()
            assert proc.wait(20) == 0
    missing = _cli("check-config")
    assert missing.returncode == 66 and "uartbridge.toml" in missing.stderr


# -- systemd's DynamicUser= directories ----------------------------------------------------

DYNAMIC_DIRS = r"""
set -e
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=0755 tmpfs /var/lib
mkdir -m 0700 /run/private /var/lib/private
mkdir -m 0750 /run/private/uartbridge-dyn
mkdir -m 0700 /var/lib/private/uartbridge-dyn
ln -s private/uartbridge-dyn /run/uartbridge-dyn
ln -s private/uartbridge-dyn /var/lib/uartbridge-dyn
if [ -n "$PLANT" ]; then rm /run/uartbridge-dyn; ln -s "$PLANT" /run/uartbridge-dyn; fi
exec "$@"
"""


def _dynamic_prefix() -> tuple[str, ...]:
    _root_only()
    return ("unshare", "--mount", "--propagation", "private", "sh", "-c", DYNAMIC_DIRS, "sh")


SYSTEMD_ENV = {"RUNTIME_DIRECTORY": "/run/uartbridge-dyn",
               "STATE_DIRECTORY": "/var/lib/uartbridge-dyn"}


def test_dynamic_user_directories_are_accepted(tmp_path: Path) -> None:
    """$RUNTIME_DIRECTORY/$STATE_DIRECTORY symlinks into /run/private and /var/lib/private
    (what DynamicUser= makes): the daemon starts there and writes its checkpoint."""
    with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}]) as d:
        d.write_config()
        d.config_path.write_text('[daemon]\nlog_format = "json"\n[[uart]]\nname = "uart0"\n')
        d.write_config = lambda: None  # type: ignore[method-assign]
        d.start(prefix=_dynamic_prefix(), env=SYSTEMD_ENV)
        assert d.stop() == 0, d.log()
        written = [e for e in d.events() if e["event"] == "checkpoint written"]
        assert written[0]["path"] == "/var/lib/uartbridge-dyn/uart0.checkpoint.json"


def test_a_planted_symlink_is_refused(tmp_path: Path) -> None:
    """$RUNTIME_DIRECTORY a symlink to anywhere but systemd's private directory: refused
    (69) with a message saying so."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with daemon(tmp_path / "d", [{"name": "uart0", "port": "pty:"}]) as d:
        d.write_config()
        d.config_path.write_text('[daemon]\nlog_format = "json"\n[[uart]]\nname = "uart0"\n')
        d.write_config = lambda: None  # type: ignore[method-assign]
        d.start(prefix=_dynamic_prefix(), env={**SYSTEMD_ENV, "PLANT": str(elsewhere)},
                wait=False)
        assert d.wait_exit() == 69
        d.proc = None
        (fatal,) = [e for e in d.events() if e["event"] == "fatal error"]
        assert "not the directory systemd makes" in fatal["error"]
        assert not any(elsewhere.iterdir())


def test_a_symlink_nobody_handed_us_is_refused(tmp_path: Path) -> None:
    """A runtime_dir that is a symlink, not named by systemd: refused, as before."""
    real = tmp_path / "real"
    real.mkdir(mode=0o750)
    link = tmp_path / "link"
    link.symlink_to(real)
    config = tmp_path / "c.toml"
    config.write_text(f'[daemon]\nruntime_dir = "{link}"\nstate_dir = "{tmp_path}/s"\n'
                      '[[uart]]\nname = "uart0"\n')
    result = _cli("run", "--config", str(config))
    assert result.returncode == 69 and "is a symlink" in result.stderr
    assert not any(real.iterdir())
