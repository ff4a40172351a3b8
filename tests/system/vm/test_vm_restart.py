"""`systemctl restart` keeps the port open: the fd store under a real systemd, in the VM.

The shipped template unit (``FileDescriptorStoreMax=``) on ``/dev/ttyS1``, a real 8250: the
daemon stores the tty's descriptor (``FDSTORE=1``, ``FDNAME=port.uart0``) and takes it back
from ``LISTEN_FDS`` at each start, so the tty is never closed across a restart. Shown by:
systemd (PID 1) holding a descriptor of ``/dev/ttyS1``; the daemon logging
``port.taken_over`` at every restart (never a mismatch or a refusal); and bytes the far end
sends *during* the restarts all reaching the guest, once, in order — a close would run the
8250 driver's shutdown and its next open clears the chip's FIFOs, losing what they held.

Uses the rig and helpers of test_vm.py (same fixtures; its own VM, booted once).
"""

from __future__ import annotations

import statistics
import threading
import time

import pytest
from guest_uart import pattern
from test_vm import (  # noqa: F401 (clean, installed and vm are fixtures)
    TEMPLATE,
    bus,
    clean,
    explain,
    far,
    gu,
    guest_read,
    init_uart,
    installed,
    same_bytes,
    show,
    start,
    vm,
    wait_active,
)
from vmrig import Vm

pytestmark = pytest.mark.system

RESTARTS = 5
INBOUND = 6400  # 100 chunks of 64 bytes, one every 0.25 s: traffic across every restart
CHUNK = 64


def _journal_count(machine: Vm, unit: str, text: str) -> int:
    out = machine.sh(f"journalctl -b --no-pager -o cat -u {unit} | grep -c -F '{text}'").stdout
    return int(out.strip() or 0)


def test_systemctl_restart_keeps_the_tty_open_under_traffic(clean: Vm) -> None:  # noqa: F811
    """5 × `systemctl restart uartbridge@ttyS1` while the far end sends: systemd holds the
    tty in its fd store, every start takes it back (port.taken_over, the same device), and
    every byte sent during the restarts arrives once, in order, as does what the guest sent."""
    machine = clean
    start(machine, TEMPLATE)
    init_uart(machine, TEMPLATE)
    held = machine.sh("ls -l /proc/1/fd | grep -c /dev/ttyS1").stdout.strip()
    assert int(held or 0) >= 1, (
        f"systemd holds no /dev/ttyS1 descriptor\n{explain(machine, TEMPLATE)}")
    taken_before = _journal_count(machine, TEMPLATE, "port.taken_over")
    outbound = pattern("fdstore-g2h", 3000)
    written = gu(machine, f"write {bus(machine, TEMPLATE)} --seed fdstore-g2h --count 3000")
    assert written["written"] == 3000, written

    inbound = pattern("fdstore-h2g", INBOUND)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            for offset in range(0, INBOUND, CHUNK):
                far(machine).send(inbound[offset:offset + CHUNK])
                time.sleep(0.25)
        except BaseException as exc:  # reported below
            errors.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    restart_s: list[float] = []
    pid = show(machine, TEMPLATE, "MainPID")["MainPID"]
    for _ in range(RESTARTS):
        result = machine.sh(f"a=$(date +%s%N); timeout 120 systemctl restart {TEMPLATE}; rc=$?; "
                       "b=$(date +%s%N); echo $(( (b - a) / 1000000 )); exit $rc",
                       timeout_s=180)
        assert result.rc == 0, f"{result}\n{explain(machine, TEMPLATE)}"
        restart_s.append(int(result.stdout.strip().splitlines()[-1]) / 1000)
        pid = wait_active(machine, TEMPLATE, not_pid=pid)["MainPID"]
    sender.join(120)
    assert not errors, errors
    taken = _journal_count(machine, TEMPLATE, "port.taken_over") - taken_before
    refused = (_journal_count(machine, TEMPLATE, "port.handover_mismatch")
               + _journal_count(machine, TEMPLATE, "port.handover_refused"))
    assert taken == RESTARTS and refused == 0, (
        f"taken over {taken} of {RESTARTS}, refused {refused}\n{explain(machine, TEMPLATE)}")
    problem = same_bytes("far end -> guest during restarts", inbound,
                         guest_read(machine, TEMPLATE, INBOUND))
    problem2 = same_bytes("guest -> far end", outbound, far(machine).wait_for(3000, timeout_s=120))
    assert not problem and not problem2, f"{problem}\n{problem2}\n{explain(machine, TEMPLATE)}"
    print(f"systemctl restart -> READY=1 (the command returns at READY=1, {machine.accel}): "
          f"median {statistics.median(restart_s):.3f} s, runs "
          + ", ".join(f"{s:.3f}" for s in restart_s))
