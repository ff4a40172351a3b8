"""One daemon per group of UARTs, as instances of the template unit run them, side by side.

``uartbridge@GROUP.service`` runs ``uartbridge run --config /etc/uartbridge/GROUP.toml``; a
config there with several ``[[uart]]`` tables and no paths runs in ``/run/uartbridge-GROUP``
and ``/var/lib/uartbridge-GROUP``. The daemons here are started that way, by hand (the VM test
``tests/system/vm/test_vm.py::test_both_units_run_together_isolated`` runs the units under
systemd): real daemons, real socat null-modems as the adapters, the reference 8250 guest on
every bus and a far end on every adapter's other side. Every config, directory and process is
the test's own (unique names) and removed or stopped by PID in ``finally``.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from procs import REPO, Daemon, Socat, socat_pair
from streams import FarEnd, GuestRunner, assert_exact, sequence_stream, wait_streams

from uartbridge.checkpoint import checkpoint_path
from uartbridge.client import BusClient
from uartbridge.registers import SCR

pytestmark = pytest.mark.e2e

ETC = Path("/etc/uartbridge")


@dataclass
class Instance(Daemon):
    """A daemon as ``uartbridge@GROUP`` starts it: /etc/uartbridge/GROUP.toml, no paths."""

    group: str = ""
    extra: str = ""  # more TOML, after the [[uart]] tables' keys are written

    @property
    def config_path(self) -> Path:
        return ETC / f"{self.group}.toml"

    @property
    def runtime_dir(self) -> Path:
        return Path(f"/run/uartbridge-{self.group}")

    @property
    def state_dir(self) -> Path:
        return Path(f"/var/lib/uartbridge-{self.group}")

    def write_config(self) -> None:
        text = self.extra
        for uart in self.uarts:
            text += "[[uart]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in uart.items())
        self.config_path.write_text(text)


@contextlib.contextmanager
def instances(tmp_path: Path, count: int) -> Iterator[list[Instance]]:
    """``count`` instance descriptions with unique GROUP names; at the end every process they
    started is stopped and their configs, runtime and state directories are removed."""
    if os.geteuid() != 0:
        pytest.skip("needs root (/etc/uartbridge, /run, /var/lib, as the units)")
    made_etc = not ETC.exists()
    ETC.mkdir(mode=0o755, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    made = []
    try:
        for k in range(count):
            root = tmp_path / f"i{k}"
            root.mkdir()
            made.append(Instance(root=root, uarts=[], group=f"t{tag}g{k}"))
        yield made
    finally:
        for inst in made:
            inst.stop()
            with contextlib.suppress(FileNotFoundError):
                inst.config_path.unlink()
            shutil.rmtree(inst.runtime_dir, ignore_errors=True)
            shutil.rmtree(inst.state_dir, ignore_errors=True)
        if made_etc:
            shutil.rmtree(ETC, ignore_errors=True)


@contextlib.contextmanager
def adapters(tmp_path: Path, count: int) -> Iterator[list[Socat]]:
    """``count`` socat null-modems: side ``a`` is the port, ``b`` the far end."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(socat_pair(tmp_path, f"adapter{k}")) for k in range(count)]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uartbridge", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def _by_pid(listed: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {d["pid"]: d for d in listed["daemons"]}


def test_two_instances_serve_disjoint_groups_of_uarts_side_by_side(tmp_path: Path) -> None:
    """Two instances, each with its own group of two adapters (same UART names in both):
    `status` with no options lists both with their own UARTs, ports and directories; every
    UART carries its own bytes both ways, once and in order; each stops with its own
    checkpoints."""
    names = ("console", "aux")
    with adapters(tmp_path, 4) as pairs, instances(tmp_path, 2) as (a, b):
        groups = {a.group: (a, pairs[:2]), b.group: (b, pairs[2:])}
        for inst, ports in groups.values():
            inst.uarts = [{"name": n, "port": str(p.a)} for n, p in zip(names, ports, strict=True)]
            inst.start()
        assert a.proc is not None and b.proc is not None

        listed = _cli("status", "--json")
        assert listed.returncode == 0, listed.stderr
        daemons = _by_pid(json.loads(listed.stdout))
        for inst, ports in groups.values():
            assert inst.proc is not None
            status = daemons[inst.proc.pid]
            assert status["instance"] == inst.group
            assert status["runtime_dir"] == str(inst.runtime_dir)
            assert status["state_dir"] == str(inst.state_dir)
            assert [(u["name"], u["port"], u["bus_socket"]) for u in status["uarts"]] == [
                (n, str(p.a), str(inst.bus(n))) for n, p in zip(names, ports, strict=True)]
            assert all(u["reader_state"] == "connected" for u in status["uarts"])
        human = _cli("status")
        assert human.returncode == 0, human.stderr
        for inst in (a, b):
            assert inst.proc is not None
            assert f"daemon pid {inst.proc.pid}," in human.stdout
            assert f"(instance {inst.group})" in human.stdout

        runners: list[tuple[str, GuestRunner, FarEnd]] = []
        try:
            for k, (inst, ports) in enumerate(groups.values()):
                for j, (name, pair) in enumerate(zip(names, ports, strict=True)):
                    tag = bytes((0x41 + 2 * k + j,))  # A..D: each UART's own records
                    guest = GuestRunner(inst.bus(name), sequence_stream(400, tag))
                    far = FarEnd(pair.b, sequence_stream(400, tag.lower()))
                    guest.start()  # probe first: the far end's bytes would fill the FIFO
                    far.start()
                    runners.append((f"{inst.group}/{name}", guest, far))
            for _, guest, far in runners:
                wait_streams(guest, far, timeout_s=120)
            for what, guest, far in runners:
                assert_exact(bytes(far.received), guest.tx_data, f"{what} guest -> far end")
                assert_exact(bytes(guest.received), far.tx_data, f"{what} far end -> guest")
        finally:
            for _, guest, far in runners:
                guest.stop()
                far.stop()

        for inst in (a, b):
            assert inst.stop() == 0
            for name in names:
                assert checkpoint_path(inst.state_dir, name).exists()
            assert sorted(p.name for p in inst.state_dir.glob("*.json")) == sorted(
                checkpoint_path(inst.state_dir, n).name for n in names)


def test_an_instance_claiming_another_instances_socket_is_refused(tmp_path: Path) -> None:
    """An instance whose bus or control socket is a path another instance listens on exits
    with a clear one-line error naming the path (no traceback) and leaves the first serving."""
    with instances(tmp_path, 3) as (first, bus_thief, control_thief):
        first.uarts = [{"name": "uart0", "port": "pty:"}]
        first.start()
        bus_thief.uarts = [{"name": "uart0", "port": "pty:",
                            "bus_socket": str(first.bus("uart0"))}]
        control_thief.extra = f"[daemon]\ncontrol_socket = {json.dumps(str(first.control))}\n"
        control_thief.uarts = [{"name": "uart0", "port": "pty:"}]
        for thief, path in ((bus_thief, first.bus("uart0")), (control_thief, first.control)):
            thief.write_config()
            done = _cli("run", "--config", str(thief.config_path))
            assert done.returncode == 69, (done.returncode, done.stderr)
            assert f"{path} is in use by another process" in done.stderr, done.stderr
            assert "Traceback" not in done.stderr
            with BusClient(first.bus("uart0")) as client:  # the first still serves its UART
                client.write(SCR, 0x5A)
                assert client.read(SCR) == 0x5A
        assert first.status()["instance"] == first.group
        assert first.stop() == 0
