"""uartbridge's own units under a real systemd (PID 1) on real 8250 ttys, in a QEMU VM.

The guest is a debootstrapped Debian 12 (vmrig.py); uartbridge is installed in it the
documented way (``scripts/install-service``), and the shipped units run on ``/dev/ttyS1``
(``uartbridge@ttyS1``, ``/etc/uartbridge/ttyS1.toml`` with no paths) and ``/dev/ttyS2``
(``uartbridge.service``). The host test is the far end of both ttys (QEMU socket chardevs)
and of a hot-plugged USB adapter (``usb-serial``, bound by ``ftdi_sio``); a guest-side
``BusClient`` driver (guest_uart.py) is the emulator. Every byte check compares the exact
sequence: every byte once, in order.

The tests run in file order on one VM; each starts from a clean slate (units stopped, their
state and runtime directories cleaned, the tty's buffers flushed).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import rootfs
import vmrig
from guest_uart import pattern
from vmrig import FarEnd, Vm

pytestmark = pytest.mark.system

GU = "/opt/uartbridge/bin/python /root/uartbridge/tests/system/vm/guest_uart.py"
TEMPLATE = "uartbridge@ttyS1.service"
SINGLE = "uartbridge.service"
USB_UNIT = "uartbridge@ttyUSB0.service"
TTYS1_CONF = '[[uart]]\nname = "uart0"\nport = "/dev/ttyS1"\n'
SINGLE_CONF = '[[uart]]\nname = "uart2"\nport = "/dev/ttyS2"\n'
USB_CONF = '[[uart]]\nname = "uart0"\nport = "/dev/ttyUSB0"\n'
PERMISSION_ERRORS = (
    "permission denied|permissionerror|eacces|operation not permitted|read-only file"
)
RESTART_LOOP = 3  # restarts that tell a loop from a crash being recovered
SETTLE_S = 6.0  # longer than the units' RestartSec=2s: a restart loop shows in NRestarts


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vm() -> Iterator[Vm]:
    """The booted VM (image built once per run), powered off at the end."""
    rootfs.require_root_tools()
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is not installed (scripts/bootstrap --test)")
    work = Path(tempfile.mkdtemp(prefix="uartbridge-vm-", dir=rootfs.WORK_DIR))
    try:
        start = time.monotonic()
        img = vmrig.image(work, work / "build.log")
        print(f"VM image ready in {time.monotonic() - start:.1f} s")
        share = vmrig.share(work / "share")
        with vmrig.running_vm(work, img, share) as machine:
            yield machine
            print(f"VM boots: {', '.join(f'{s:.1f} s' for s in machine.boot_s)} "
                  f"({machine.accel})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def installed(vm: Vm) -> str:
    """uartbridge installed in the guest by scripts/install-service, from the checkout."""
    start = time.monotonic()
    out = vm.ok("rm -rf /root/uartbridge && cp -a /mnt/src/uartbridge /root/uartbridge && "
                "cd /root/uartbridge && scripts/install-service", timeout_s=900)
    print(f"install-service in the guest: {time.monotonic() - start:.1f} s")
    return out


@pytest.fixture
def clean(vm: Vm, installed: str) -> Iterator[Vm]:
    """A clean slate before the test; every uartbridge unit stopped after it."""
    clean_slate(vm)
    yield vm
    stop_all(vm)


# -- helpers ------------------------------------------------------------------------------


def far(vm: Vm, name: str = "ttyS1") -> FarEnd:
    end = {"ttyS1": vm.ttys1, "ttyS2": vm.ttys2, "usb": vm.usb}[name]
    assert end is not None
    return end


def show(vm: Vm, unit: str, *props: str) -> dict[str, str]:
    """``systemctl show`` properties of a unit."""
    out = vm.ok(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(vm: Vm, unit: str, extra: str = "", lines: int = 40) -> str:
    return vm.sh(f"journalctl -b --no-pager -u {unit} -n {lines} {extra}").stdout


def journal_fields(vm: Vm, unit: str, extra: str = "", lines: int = 8) -> str:
    """The unit's last journal entries, a few fields each (what native fields look like)."""
    keys = ["PRIORITY", "UART", "EVENT", "_TRANSPORT", "MESSAGE"]
    program = ("import json, sys\n"
               "for line in sys.stdin:\n"
               "    entry = json.loads(line)\n"
               f"    print({{k: entry.get(k) for k in {json.dumps(keys)}}})\n")
    script = (f"journalctl -b --no-pager -u {unit} -n {lines} -o json {extra} > /tmp/j.json; "
              f"python3 -c {shlex.quote(program)} < /tmp/j.json")
    return vm.sh(script).stdout


def explain(vm: Vm, unit: str) -> str:
    """What systemd and the journal say about a unit, for a failure message."""
    status = vm.sh(f"systemctl status --no-pager -n 0 {unit}").stdout
    return f"--- systemctl status {unit}\n{status}\n--- journal\n{journal(vm, unit)}"


def write_file(vm: Vm, path: str, text: str) -> None:
    """Write a file in the guest."""
    folder = shlex.quote(str(Path(path).parent))
    result = vm.sh(f"mkdir -p {folder} && cat > {shlex.quote(path)}", stdin=text)
    assert result.rc == 0, str(result)


def start(vm: Vm, unit: str, then: str = "") -> None:
    """``systemctl start`` (bounded); ``then`` runs right after it returns, in the same shell."""
    script = f"timeout 120 systemctl start {unit}" + (f" && {then}" if then else "")
    result = vm.sh(script, timeout_s=180)
    assert result.rc == 0, f"{unit} did not start:\n{result}\n{explain(vm, unit)}"


def stop_all(vm: Vm) -> None:
    vm.sh("timeout 120 systemctl stop 'uartbridge@*.socket' uartbridge.socket "
          "'uartbridge@*.service' uartbridge.service; "
          "systemctl reset-failed 'uartbridge@*.service' uartbridge.service", timeout_s=180)


def runtime_dir(vm: Vm, unit: str) -> str:
    """The unit's runtime directory as systemd makes it (RuntimeDirectory=, first entry)."""
    value = show(vm, unit, "RuntimeDirectory")["RuntimeDirectory"].split()
    assert value, f"{unit} has no RuntimeDirectory="
    return f"/run/{value[0]}"


def bus(vm: Vm, unit: str, uart: str = "uart0") -> str:
    return f"{runtime_dir(vm, unit)}/{uart}.bus"


def gu(vm: Vm, args: str, timeout_s: float = 180.0) -> dict[str, object]:
    """Run guest_uart.py in the guest; its JSON result."""
    data = vm.sh(f"{GU} {args}", timeout_s=timeout_s).json()
    assert isinstance(data, dict)
    return data


def guest_read(vm: Vm, unit: str, count: int, idle_s: float = 15.0) -> bytes:
    result = gu(vm, f"read {bus(vm, unit)} --count {count} --idle-s {idle_s} --timeout-s 300",
                timeout_s=400)
    return bytes.fromhex(str(result["hex"]))


def same_bytes(what: str, expected: bytes, got: bytes) -> str:
    """'' when equal, else a readable account: how many lost, duplicated, where it differs."""
    if got == expected:
        return ""
    first = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
                 min(len(expected), len(got)))
    kind = "a prefix: the rest LOST" if expected.startswith(got) else "different from offset"
    return (f"{what}: got {len(got)} of {len(expected)} bytes ({kind} {first}); "
            f"lost {max(0, len(expected) - len(got))}; "
            f"expected[{first}:{first + 8}]={expected[first:first + 8].hex()} "
            f"got[{first}:{first + 8}]={got[first:first + 8].hex()}")


def flush_tty(vm: Vm, device: str = "/dev/ttyS1") -> None:
    """With no daemon on it: read the tty raw until quiet while the host side drains too."""
    end = far(vm)
    end.resume()
    script = (
        "import os, select, termios, time, tty\n"
        f"fd = os.open({device!r}, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)\n"
        "tty.setraw(fd)\n"
        "termios.tcflush(fd, termios.TCIOFLUSH)\n"
        "quiet = time.monotonic()\n"
        "while time.monotonic() - quiet < 1.5:\n"
        "    if select.select([fd], [], [], 0.2)[0]:\n"
        "        os.read(fd, 65536)\n"
        "        quiet = time.monotonic()\n"
        "os.close(fd)\n"
    )
    result = vm.sh("python3 -", stdin=script, timeout_s=60)
    assert result.rc == 0, str(result)
    time.sleep(0.5)
    end.take()


def clean_slate(vm: Vm) -> None:
    """No unit running, no checkpoint or runtime left, the base configs, ttyS1 flushed."""
    stop_all(vm)
    vm.sh(f"systemctl clean --what=state --what=runtime {TEMPLATE} {SINGLE} {USB_UNIT}; "
          "rm -f /etc/uartbridge/*.toml", timeout_s=60)
    write_file(vm, "/etc/uartbridge/ttyS1.toml", TTYS1_CONF)
    write_file(vm, "/etc/uartbridge/uartbridge.toml", SINGLE_CONF)
    flush_tty(vm)
    for end in (vm.ttys1, vm.ttys2, vm.usb):
        if end is not None:
            end.resume()
            end.take()


def wait_active(vm: Vm, unit: str, timeout_s: float = 120.0, not_pid: str = "") -> dict[str, str]:
    """Wait until ``unit`` is active/running (with a MainPID other than ``not_pid``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        props = show(vm, unit, "ActiveState", "SubState", "MainPID", "NRestarts")
        if props.get("ActiveState") == "active" and props.get("MainPID") not in ("0", not_pid):
            return props
        if int(props.get("NRestarts") or 0) > RESTART_LOOP:
            raise AssertionError(f"{unit} is in a restart loop: {props}\n{explain(vm, unit)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{unit} not active after {timeout_s:.0f} s: {props}\n"
                                 f"{explain(vm, unit)}")
        time.sleep(1)


def assert_steady(vm: Vm, unit: str) -> dict[str, str]:
    """Still active with the same MainPID and no restart after SETTLE_S."""
    before = show(vm, unit, "ActiveState", "MainPID", "NRestarts")
    time.sleep(SETTLE_S)
    after = show(vm, unit, "ActiveState", "SubState", "MainPID", "NRestarts")
    assert after["ActiveState"] == "active" and after["MainPID"] == before["MainPID"], (
        f"{unit} did not stay up: {before} -> {after}\n{explain(vm, unit)}")
    assert after["NRestarts"] == "0", f"{unit} restarted: {after}\n{explain(vm, unit)}"
    return after


def no_permission_errors(vm: Vm, unit: str) -> None:
    found = vm.sh(f"journalctl -b --no-pager -u {unit} | grep -i -E '{PERMISSION_ERRORS}'").stdout
    assert not found.strip(), f"{unit}: permission errors in the journal:\n{found}"


def init_uart(vm: Vm, unit: str, extra: str = "") -> None:
    gu(vm, f"init {bus(vm, unit)} {extra}")


def main_uid(vm: Vm, unit: str) -> int:
    pid = show(vm, unit, "MainPID")["MainPID"]
    line = vm.ok(f"grep ^Uid: /proc/{pid}/status")
    return int(line.split()[1])


# -- install ------------------------------------------------------------------------------


def test_install_service_in_the_guest(vm: Vm, installed: str) -> None:
    """scripts/install-service puts a non-editable uartbridge in /opt/uartbridge that an
    unprivileged user can run, links /usr/local/bin/uartbridge (the units' ExecStart=), and
    installs the units, the udev rule and /etc/uartbridge, with systemd reloaded."""
    target = vm.ok("readlink -f /usr/local/bin/uartbridge").strip()
    assert target == "/opt/uartbridge/bin/uartbridge", target
    vm.ok("runuser -u nobody -- /usr/local/bin/uartbridge --version")
    vm.ok("test -f /etc/udev/rules.d/99-uartbridge.rules && test -d /etc/uartbridge")
    # Not editable: the installed package does not read the checkout it came from.
    origin = vm.ok("cd / && /opt/uartbridge/bin/python -c "
                   "'import uartbridge; print(uartbridge.__file__)'")
    assert origin.startswith("/opt/uartbridge/lib/"), origin
    for unit in (SINGLE, TEMPLATE):
        props = show(vm, unit, "LoadState", "ExecStart")
        assert props["LoadState"] == "loaded", props
        assert "/usr/local/bin/uartbridge" in props["ExecStart"], props
    assert vm.sh("python3 -c 'import uartbridge'").rc != 0, "system python3 imports uartbridge"


# -- the units start as shipped -------------------------------------------------------------


def test_single_unit_starts_as_shipped(clean: Vm) -> None:
    """uartbridge.service alone (one UART on /dev/ttyS2, first in a fresh boot) starts, is
    ready when start returns, stays up, and has no permission error."""
    vm = clean
    start(vm, SINGLE, then=f"{GU} regs {bus(vm, SINGLE, 'uart2')}")
    assert_steady(vm, SINGLE)
    no_permission_errors(vm, SINGLE)


def test_template_instance_starts_as_shipped(clean: Vm) -> None:
    """uartbridge@ttyS1 (config without paths) starts under DynamicUser and the sandbox:
    `systemctl start` returns only after READY=1 (the bus answers at once), it stays up
    without restarting, and the journal has no permission error."""
    vm = clean
    start(vm, TEMPLATE, then=f"{GU} regs {bus(vm, TEMPLATE)}")
    props = show(vm, TEMPLATE, "Type", "ActiveState", "SubState")
    assert props == {"Type": "notify", "ActiveState": "active", "SubState": "running"}, props
    assert_steady(vm, TEMPLATE)
    no_permission_errors(vm, TEMPLATE)


def test_both_units_run_together_isolated(clean: Vm) -> None:
    """The single unit and a template instance run at once, with separate runtime and state
    directories and separate dynamic users; both buses answer."""
    vm = clean
    start(vm, SINGLE)
    start(vm, TEMPLATE)
    for unit in (SINGLE, TEMPLATE):
        assert_steady(vm, unit)
    dirs = {u: show(vm, u, "RuntimeDirectory", "StateDirectory") for u in (SINGLE, TEMPLATE)}
    assert dirs[SINGLE]["RuntimeDirectory"] != dirs[TEMPLATE]["RuntimeDirectory"], dirs
    assert dirs[SINGLE]["StateDirectory"] != dirs[TEMPLATE]["StateDirectory"], dirs
    gu(vm, f"regs {bus(vm, SINGLE, 'uart2')}")
    gu(vm, f"regs {bus(vm, TEMPLATE)}")
    uids = {u: main_uid(vm, u) for u in (SINGLE, TEMPLATE)}
    assert uids[SINGLE] != uids[TEMPLATE], f"both units run as the same user: {uids}"


def test_status_and_watchdog_reach_systemd(clean: Vm) -> None:
    """STATUS= shows in systemctl, and WATCHDOG=1 pings move systemd's watchdog timestamp."""
    vm = clean
    start(vm, TEMPLATE)
    first = show(vm, TEMPLATE, "StatusText", "WatchdogUSec", "WatchdogTimestampMonotonic")
    assert first["StatusText"].strip(), f"no STATUS= text: {first}"
    assert first["WatchdogUSec"] not in ("0", "infinity"), first
    deadline = time.monotonic() + 60
    while True:
        now = show(vm, TEMPLATE, "WatchdogTimestampMonotonic", "MainPID")
        if int(now["WatchdogTimestampMonotonic"]) > int(first["WatchdogTimestampMonotonic"]):
            break
        assert time.monotonic() < deadline, f"no WATCHDOG=1 in 60 s: {first} -> {now}"
        time.sleep(2)
    assert_steady(vm, TEMPLATE)


def test_sandbox_default_directories(clean: Vm) -> None:
    """With the config's default directories: sockets in the unit's runtime directory (0660),
    the final checkpoint in its state directory (0600, the dynamic user's), no permission
    error on the way."""
    vm = clean
    start(vm, TEMPLATE)
    run_dir = runtime_dir(vm, TEMPLATE)
    sock = vm.ok(f"stat -L -c '%a %F' {run_dir}/uart0.bus").split()
    assert sock[0] in ("660", "600") and sock[1] == "socket", sock
    uid = main_uid(vm, TEMPLATE)
    assert uid != 0, "the daemon runs as root"
    state = "/var/lib/" + show(vm, TEMPLATE, "StateDirectory")["StateDirectory"].split()[0]
    vm.ok(f"timeout 120 systemctl stop {TEMPLATE}", timeout_s=150)
    files = vm.ok(f"find -L {state} -name '*.json' -printf '%m %U %p\\n'").split("\n")
    files = [f for f in files if f.strip()]
    assert files, f"no checkpoint in {state} after stop\n{explain(vm, TEMPLATE)}"
    for line in files:
        mode, owner, path = line.split(" ", 2)
        assert mode == "600" and int(owner) == uid, f"{path}: mode {mode} owner {owner}"
    no_permission_errors(vm, TEMPLATE)
    level = vm.sh(f"systemd-analyze security --no-pager {TEMPLATE} | tail -1").stdout.strip()
    print(f"systemd-analyze security: {level}")


# -- bytes through the kernel's 8250 driver -------------------------------------------------


def _serial_counters(vm: Vm, line: int = 1) -> tuple[int, int]:
    text = vm.ok("cat /proc/tty/driver/serial")
    row = next(r for r in text.splitlines() if r.startswith(f"{line}:"))
    fields = dict(f.split(":", 1) for f in row.split() if ":" in f)
    return int(fields["tx"]), int(fields["rx"])


def test_bytes_both_ways_through_the_8250(clean: Vm) -> None:
    """A guest-side BusClient and the host's end of ttyS1 exchange 4,000 and 3,000 bytes,
    every byte once and in order, through the kernel's 8250 driver (its counters moved)."""
    vm = clean
    start(vm, TEMPLATE)
    init_uart(vm, TEMPLATE)
    tx0, rx0 = _serial_counters(vm)
    out = pattern("both-g2h", 4000)
    written = gu(vm, f"write {bus(vm, TEMPLATE)} --seed both-g2h --count 4000")
    assert written["written"] == 4000, written
    problem = same_bytes("guest -> host", out, far(vm).wait_for(4000, timeout_s=120))
    back = pattern("both-h2g", 3000)
    far(vm).send(back)
    problem2 = same_bytes("host -> guest", back, guest_read(vm, TEMPLATE, 3000))
    assert not problem and not problem2, f"{problem}\n{problem2}"
    tx1, rx1 = _serial_counters(vm)
    assert tx1 - tx0 >= 4000 and rx1 - rx0 >= 3000, (tx0, rx0, tx1, rx1)


def _proc_modem_lines(vm: Vm, line: int = 1) -> set[str]:
    """The modem lines the 8250 driver shows in /proc/tty/driver/serial (no open needed:
    any open of the tty, even `stty -F` or a TIOCMGET probe, raises DTR and RTS itself)."""
    text = vm.ok("cat /proc/tty/driver/serial")
    row = next(r for r in text.splitlines() if r.startswith(f"{line}:"))
    return set(row.split()[-1].split("|"))


def test_line_settings_reach_the_tty(clean: Vm) -> None:
    """LCR/divisor from the guest become the tty's speed, size, parity and stop bits (stty and
    tcgetattr); parity turns on PARMRK|INPCK; MCR DTR/RTS reach the line (the driver's view,
    and TIOCMGET); rtscts = true sets CRTSCTS."""
    vm = clean
    start(vm, TEMPLATE)
    b = bus(vm, TEMPLATE)
    gu(vm, f"init {b} --lcr 0x1a --divisor 12 --mcr 0x08")  # 9600 7E1, OUT2 only
    time.sleep(1)
    lines = _proc_modem_lines(vm)
    assert not lines & {"DTR", "RTS"}, f"MCR has DTR and RTS off, the line has {lines}"
    gu(vm, f"set {b} 4=0x0b")  # DTR RTS OUT2
    time.sleep(1)
    lines = _proc_modem_lines(vm)
    assert {"DTR", "RTS"} <= lines, f"MCR has DTR and RTS on, the line has {lines}"
    tty = gu(vm, "tty /dev/ttyS1")
    assert tty["dtr"] and tty["rts"], f"TIOCMGET: {tty}"
    stty = vm.ok("stty -F /dev/ttyS1 -a")
    assert "speed 9600 baud" in stty, stty
    line = (tty["csize"], tty["parenb"], tty["parodd"], tty["cstopb"])
    assert line == (7, True, False, False), tty
    assert tty["parmrk"] and tty["inpck"], f"parity without PARMRK|INPCK: {tty}\n{stty}"
    assert not tty["icanon"] and not tty["echo"] and not tty["opost"], f"not raw: {stty}"
    gu(vm, f"init {b} --lcr 0x07 --divisor 1 --mcr 0x0b")  # 115200 8N2
    time.sleep(1)
    tty = gu(vm, "tty /dev/ttyS1")
    stty = vm.ok("stty -F /dev/ttyS1 -a")
    assert "speed 115200 baud" in stty, stty
    assert (tty["csize"], tty["parenb"], tty["cstopb"]) == (8, False, True), tty
    assert not tty["crtscts"], tty
    vm.ok(f"timeout 120 systemctl stop {TEMPLATE}", timeout_s=150)
    write_file(vm, "/etc/uartbridge/ttyS1.toml", TTYS1_CONF + "rtscts = true\n")
    start(vm, TEMPLATE)
    tty = gu(vm, "tty /dev/ttyS1")
    assert tty["crtscts"], f"rtscts = true but no CRTSCTS: {tty}"


# -- restarts lose nothing ------------------------------------------------------------------


def _traffic_then(vm: Vm, action: str, seed: str) -> None:
    """Bytes queued both ways (far end -> device, unread; guest -> wire, still draining),
    then ``action``; afterwards every byte arrives once, in order."""
    start(vm, TEMPLATE)
    init_uart(vm, TEMPLATE)
    inbound = pattern(f"{seed}-h2g", 3000)
    far(vm).send(inbound)
    written = gu(vm, f"write {bus(vm, TEMPLATE)} --seed {seed}-g2h --count 3000")
    assert written["written"] == 3000, written
    if action == "reboot":
        vm.reboot()
    else:
        result = vm.sh(action, timeout_s=180)
        assert result.rc == 0, f"{result}\n{explain(vm, TEMPLATE)}"
    wait_active(vm, TEMPLATE)
    outbound = pattern(f"{seed}-g2h", 3000)
    problem = same_bytes("guest -> host", outbound, far(vm).wait_for(3000, timeout_s=120))
    problem2 = same_bytes("host -> guest", inbound, guest_read(vm, TEMPLATE, 3000))
    assert not problem and not problem2, f"{problem}\n{problem2}\n{explain(vm, TEMPLATE)}"


def test_restart_under_traffic_loses_nothing(clean: Vm) -> None:
    """`systemctl restart` with bytes queued both ways: checkpoint on stop, resume at start,
    every byte once in order."""
    _traffic_then(clean, f"timeout 120 systemctl restart {TEMPLATE}", "restart")


def test_stop_then_start_loses_nothing(clean: Vm) -> None:
    """`systemctl stop` then `start` with bytes queued both ways loses nothing."""
    _traffic_then(clean, f"timeout 120 systemctl stop {TEMPLATE} && "
                         f"! systemctl is-active -q {TEMPLATE} && "
                         f"timeout 120 systemctl start {TEMPLATE}", "stopstart")


def test_sigkill_restarts_and_resumes_from_the_periodic_checkpoint(clean: Vm) -> None:
    """SIGKILL: Restart= brings the daemon back, it resumes from the periodic checkpoint
    (bytes the device held then are still there) and says it resumed after a crash."""
    vm = clean
    start(vm, TEMPLATE)
    init_uart(vm, TEMPLATE)
    inbound = pattern("crash-h2g", 500)
    far(vm).send(inbound)
    time.sleep(8)  # > checkpoint.interval_s (5 s): a periodic checkpoint holds the bytes
    before = show(vm, TEMPLATE, "MainPID", "NRestarts")
    vm.ok(f"systemctl kill --kill-who=main -s SIGKILL {TEMPLATE}")
    after = wait_active(vm, TEMPLATE, not_pid=before["MainPID"])
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1, (before, after)
    problem = same_bytes("host -> guest after the crash", inbound,
                         guest_read(vm, TEMPLATE, 500))
    assert not problem, f"{problem}\n{explain(vm, TEMPLATE)}"
    said = journal(vm, TEMPLATE, "-p warning", lines=200).lower()
    assert "crash" in said, f"no crash warning in the journal:\n{said}"


def test_reboot_under_traffic_loses_nothing(clean: Vm) -> None:
    """An enabled instance across `systemctl reboot` with bytes queued both ways: it starts
    at boot, resumes, and every byte arrives once in order."""
    vm = clean
    vm.ok(f"systemctl enable {TEMPLATE}")
    try:
        _traffic_then(vm, "reboot", "reboot")
    finally:
        vm.sh(f"systemctl disable {TEMPLATE}")


# -- operating it ---------------------------------------------------------------------------


def test_status_with_no_options_lists_every_daemon(clean: Vm) -> None:
    """`uartbridge status` as root with no options finds the single unit and the instance."""
    vm = clean
    start(vm, SINGLE)
    start(vm, TEMPLATE)
    result = vm.sh("uartbridge status")
    assert result.rc == 0, str(result)
    assert "uart2" in result.stdout and "uart0" in result.stdout, str(result)


# -- a USB adapter, hot-plugged --------------------------------------------------------------


def _plug(vm: Vm) -> None:
    assert vm.qmp is not None
    # A fixed serial number, as a real adapter has: without one QEMU makes it up from the
    # USB port, which changes from plug to plug, and so would ID_SERIAL.
    vm.qmp.execute("device_add", driver="usb-serial", id="usbser0", chardev="usbser",
                   bus="xhci.0", serial="UB12345", **{"always-plugged": True})
    vm.ok("for i in $(seq 60); do test -c /dev/ttyUSB0 && exit 0; sleep 0.5; done; exit 1",
          timeout_s=60)


def _unplug(vm: Vm) -> None:
    assert vm.qmp is not None
    vm.qmp.execute("device_del", id="usbser0")
    vm.ok("for i in $(seq 60); do test -e /dev/ttyUSB0 || exit 0; sleep 0.5; done; exit 1",
          timeout_s=60)
    time.sleep(1)  # QEMU finalises the device after the guest let it go


def test_usb_adapter_hotplug(clean: Vm) -> None:
    """Plugging a USB serial adapter starts uartbridge@ttyUSB0 by the udev rule (with the
    adapter's ID_SERIAL put in it, as documented); unplugging it gives a disconnected reader;
    bytes the guest writes meanwhile are replayed, in order, when it is plugged back."""
    vm = clean
    write_file(vm, "/etc/uartbridge/ttyUSB0.toml", USB_CONF)
    _plug(vm)
    try:
        serial = vm.ok("udevadm info --query=property --name=/dev/ttyUSB0 | "
                       "sed -n 's/^ID_SERIAL=//p'").strip()
        assert serial, "the adapter has no ID_SERIAL"
        vm.ok(f"sed -i 's/ENV{{ID_SERIAL}}==\"[^\"]*\"/ENV{{ID_SERIAL}}==\"{serial}\"/' "
              "/etc/udev/rules.d/99-uartbridge.rules && udevadm control --reload")
        _unplug(vm)
        _plug(vm)
        wait_active(vm, USB_UNIT, timeout_s=120)
        init_uart(vm, USB_UNIT)
        first = pattern("usb-1", 500)
        gu(vm, f"write {bus(vm, USB_UNIT)} --seed usb-1 --count 500")
        problem = same_bytes("guest -> adapter", first, far(vm, "usb").wait_for(500, 120))
        assert not problem, problem
        _unplug(vm)
        status_cmd = f"uartbridge status --json --control {runtime_dir(vm, USB_UNIT)}/control.sock"
        deadline = time.monotonic() + 30
        while True:
            status = json.loads(vm.ok(status_cmd))
            state = status["uarts"][0]["reader_state"]
            if state == "disconnected":
                break
            assert time.monotonic() < deadline, f"reader is {state!r} after unplug"
            time.sleep(1)
        assert show(vm, USB_UNIT, "ActiveState")["ActiveState"] == "active"
        backlog = pattern("usb-2", 300)
        written = gu(vm, f"write {bus(vm, USB_UNIT)} --seed usb-2 --count 300 --idle-s 10")
        assert written["written"] == 300, f"the guest was held while unplugged: {written}"
        _plug(vm)
        problem = same_bytes("backlog replayed on re-plug", backlog,
                             far(vm, "usb").wait_for(300, 120))
        assert not problem, f"{problem}\n{explain(vm, USB_UNIT)}"
    finally:
        vm.sh(f"systemctl stop {USB_UNIT}")
        if vm.sh("test -e /dev/ttyUSB0").rc == 0:
            _unplug(vm)


def test_journal_native_fields_and_fatal_errors(clean: Vm) -> None:
    """journald gets native fields: `journalctl -u uartbridge@ttyUSB0 UART=uart0 -p warning`
    finds the unplug's port.disconnected warning (from test_usb_adapter_hotplug, this boot);
    a fatal start-up error is at error priority; permanent errors (bad config 78, missing
    config 66) do not restart the unit."""
    vm = clean
    problems = []
    plain = vm.sh(f"journalctl -b --no-pager -u {USB_UNIT} -o cat | grep -c disconnected")
    if plain.stdout.strip() in ("", "0"):
        problems.append(f"{USB_UNIT} logged no port.disconnected this boot "
                        "(test_usb_adapter_hotplug unplugs the adapter first)")
    else:
        found = vm.sh(f"journalctl -b --no-pager -u {USB_UNIT} UART=uart0 -p warning -o json")
        entries = [json.loads(line) for line in found.stdout.splitlines() if line.startswith("{")]
        if not any("disconnected" in str(e.get("MESSAGE", "")) + str(e.get("EVENT", ""))
                   for e in entries):
            problems.append(f"`journalctl -u {USB_UNIT} UART=uart0 -p warning` does not show "
                            f"the port.disconnected warning; the unit's journal there:\n"
                            f"{journal_fields(vm, USB_UNIT, '--grep disconnected', lines=3)}")
    write_file(vm, "/etc/uartbridge/broken.toml",
               '[[uart]]\nname = "uart0"\nport = "/dev/ttyS1"\nno_such_key = 1\n')
    for name, why in (("broken", "no_such_key"), ("nocfg", "nocfg")):
        bad = f"uartbridge@{name}.service"
        vm.sh(f"timeout 60 systemctl start {bad}", timeout_s=90)
        time.sleep(SETTLE_S)
        props = show(vm, bad, "NRestarts", "ExecMainStatus", "ActiveState")
        errors = vm.sh(f"journalctl -b --no-pager -u {bad} -p err -o cat").stdout
        if props["NRestarts"] != "0":
            problems.append(f"{bad}: a permanent error restarts the unit: {props}")
        if why not in errors:
            problems.append(f"{bad}: `journalctl -p err` lacks the error ({why}): {errors!r}\n"
                            f"{journal_fields(vm, bad, lines=4)}")
        vm.sh(f"systemctl stop {bad}; systemctl reset-failed {bad}")
    assert not problems, "\n".join(problems)


# -- issue 10 item 7: nothing lost in the kernel's tty buffers --------------------------------


def test_restart_keeps_far_end_bytes_the_kernel_held(clean: Vm) -> None:
    """12,000 bytes from the far end with the guest not reading (the device holds ~4 KiB,
    the kernel's tty buffers the rest); after `systemctl restart` all 12,000 reach the guest,
    once, in order."""
    vm = clean
    start(vm, TEMPLATE)
    init_uart(vm, TEMPLATE)
    inbound = pattern("kernel-h2g", 12000)
    far(vm).send(inbound, timeout_s=120)
    # Wait until the kernel's input queue stops growing (QEMU has fed what it will).
    last, stable_since = -1, time.monotonic()
    deadline = time.monotonic() + 120
    while time.monotonic() - stable_since < 3 and time.monotonic() < deadline:
        inq = int(str(gu(vm, "tty /dev/ttyS1")["inq"]))
        if inq != last:
            last, stable_since = inq, time.monotonic()
    print(f"before the restart the kernel's input queue held {last} bytes")
    result = vm.sh(f"timeout 120 systemctl restart {TEMPLATE}", timeout_s=180)
    assert result.rc == 0, f"{result}\n{explain(vm, TEMPLATE)}"
    wait_active(vm, TEMPLATE)
    problem = same_bytes("far end -> guest across a restart", inbound,
                         guest_read(vm, TEMPLATE, 12000))
    assert not problem, f"{problem} (the kernel held {last} before the restart)"


# What a 16550A itself holds for output: its 16-byte TX FIFO and the shift register. The
# kernel's 8250 driver clears the FIFOs at the last close (serial8250_do_shutdown ->
# serial8250_clear_fifos) and again at the next open; no program can read them back.
CHIP_TX_BYTES = 16 + 1


def _one_gap(expected: bytes, got: bytes) -> tuple[int, int] | None:
    """(offset, length) if ``got`` is ``expected`` with one run of bytes missing, else None."""
    if got == expected:
        return (len(expected), 0)
    first = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
                 len(got))
    missing = len(expected) - len(got)
    if missing > 0 and got[first:] == expected[first + missing:]:
        return (first, missing)
    return None


def test_stop_with_an_undrained_wire_loses_only_what_the_chip_held(clean: Vm) -> None:
    """The far end does not read (its socket fills, the 16550 holds its transmitter): 4,400
    bytes written by the guest (what the device does not take, it writes after the restart),
    `systemctl stop` then `start`, the far end reads. Every byte arrives once, in order,
    except at most what the UART chip itself held (its TX FIFO and shift register, which the
    driver clears at close), in one gap, and then the daemon warned at the stop."""
    vm = clean
    start(vm, TEMPLATE)
    init_uart(vm, TEMPLATE)
    far(vm).pause()
    first = gu(vm, f"write {bus(vm, TEMPLATE)} --seed undrained --count 4400 --idle-s 5",
               timeout_s=300)
    held = int(str(first["written"]))
    outq = gu(vm, "tty /dev/ttyS1")["outq"]
    print(f"the guest got {held} of 4400 bytes into the device; the kernel's output queue "
          f"held {outq}")
    invocation = show(vm, TEMPLATE, "InvocationID")["InvocationID"]
    stop = vm.sh(f"timeout 120 systemctl stop {TEMPLATE}", timeout_s=180)
    assert stop.rc == 0, f"{stop}\n{explain(vm, TEMPLATE)}"
    start(vm, TEMPLATE)
    far(vm).resume()
    rest = gu(vm, f"write {bus(vm, TEMPLATE)} --seed undrained --count 4400 --skip {held}",
              timeout_s=300)
    assert rest["written"] == 4400, rest
    expected = pattern("undrained", 4400)
    got = far(vm).wait_for(4400, timeout_s=180)
    what = "guest -> far end across a stop with an undrained wire"
    gap = _one_gap(expected, got)
    assert gap is not None and gap[1] <= CHIP_TX_BYTES, (
        f"{same_bytes(what, expected, got)} (kernel output queue held {outq} at the stop; "
        f"at most {CHIP_TX_BYTES} bytes in the UART chip may be lost, in one gap)")
    print(f"lost {gap[1]} bytes at offset {gap[0]} (in the UART chip at the stop)")
    if gap[1]:
        warned = vm.sh(f"journalctl -b --no-pager _SYSTEMD_INVOCATION_ID={invocation} "
                       "-o verbose | grep -c transmitter_not_empty").stdout.strip()
        assert warned not in ("", "0"), (
            f"{gap[1]} bytes lost in the chip without a warning at the stop:\n"
            f"{journal_fields(vm, TEMPLATE, lines=12)}")


# -- issue 13: `systemctl restart` keeps the port open (the fd store under a real systemd) ----
# The shipped template unit (FileDescriptorStoreMax=) on /dev/ttyS1 (the 8250) and on
# /dev/ttyUSB0 (QEMU's usb-serial, an FT232 bound by ftdi_sio): the daemon stores the tty's
# descriptor (FDSTORE=1, FDNAME=port.uart0) and takes it back from LISTEN_FDS at each start,
# so the tty is never closed: a close would run the driver's shutdown (the 8250's clears the
# chip's FIFOs; with HUPCL it drops DTR and RTS), losing what it held.

RESTARTS = 20  # per unit, as issue 13 asks
CHUNK = 64  # far end -> guest: CHUNK bytes every CHUNK_EVERY_S, across every restart
CHUNK_EVERY_S = 0.25
OUTBOUND = 3000  # guest -> far end: half before the restarts, half after
# The tty under test: its unit, its device, its far end (``far``).
PORTS = {"ttyS1": (TEMPLATE, "/dev/ttyS1", "ttyS1"), "ttyUSB0": (USB_UNIT, "/dev/ttyUSB0", "usb")}


def _journal_count(machine: Vm, unit: str, text: str) -> int:
    out = machine.sh(f"journalctl -b --no-pager -o cat -u {unit} | grep -c -F '{text}'").stdout
    return int(out.strip() or 0)


def _handovers(machine: Vm, unit: str) -> tuple[int, int]:
    """How many starts of ``unit`` this boot took the port over, and how many refused it."""
    refused = (_journal_count(machine, unit, "port.handover_mismatch")
               + _journal_count(machine, unit, "port.handover_refused"))
    return _journal_count(machine, unit, "port.taken_over"), refused


def _traffic_across(machine: Vm, tty: str, seed: str, action: Callable[[], None]) -> int:
    """``action`` (restarts of the tty's unit) under traffic both ways: the far end sends from
    before it until a second after it, the guest writes half of OUTBOUND before and half
    after. Checks that systemd holds the tty, that no start refused the handed tty, and every
    byte once, in order, both ways; how many starts took the tty over."""
    unit, device, end = PORTS[tty]
    # By device number: PID 1's link names the node in the private /dev (PrivateDevices=) of
    # the run that stored it last, e.g. "/ttyS1", which is not a path PID 1 sees.
    held = machine.sh(f"rdev=$(stat -c %t:%T {device}); for f in /proc/1/fd/*; do "
                      "stat -L -c %t:%T $f 2>/dev/null; done | grep -c -x $rdev").stdout.strip()
    assert int(held or 0) >= 1, f"systemd holds no {device} descriptor\n{explain(machine, unit)}"
    taken_before, refused_before = _handovers(machine, unit)
    half = OUTBOUND // 2
    written = gu(machine, f"write {bus(machine, unit)} --seed {seed}-g2h --count {half}")
    assert written["written"] == half, written
    inbound = pattern(f"{seed}-h2g", CHUNK * 4000)  # far more than any run sends
    sent = 0
    stop = threading.Event()
    errors: list[BaseException] = []

    def send() -> None:
        nonlocal sent
        try:
            while not stop.is_set() and sent < len(inbound):
                far(machine, end).send(inbound[sent:sent + CHUNK])
                sent += CHUNK
                time.sleep(CHUNK_EVERY_S)
        except BaseException as exc:  # reported below
            errors.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        action()
        time.sleep(1.0)  # traffic after the last start too
    finally:
        stop.set()
        sender.join(120)
    assert not errors, errors
    written = gu(machine, f"write {bus(machine, unit)} --seed {seed}-g2h --count {OUTBOUND} "
                 f"--skip {half}")
    assert written["written"] == OUTBOUND, written
    taken, refused = (n - before for n, before in
                      zip(_handovers(machine, unit), (taken_before, refused_before), strict=True))
    problem = same_bytes(f"far end -> guest ({tty})", inbound[:sent],
                         guest_read(machine, unit, sent))
    problem2 = same_bytes(f"guest -> far end ({tty})", pattern(f"{seed}-g2h", OUTBOUND),
                          far(machine, end).wait_for(OUTBOUND, timeout_s=120))
    assert refused == 0 and not problem and not problem2, (
        f"refused the handed tty {refused} times\n{problem}\n{problem2}\n{explain(machine, unit)}")
    print(f"{tty}: {sent} bytes far end -> guest, {OUTBOUND} guest -> far end, "
          f"tty taken over {taken} times")
    return taken


# What the guest's drivers did to the modem-control lines, from QEMU's trace (vmrig
# ``trace_since``): its 16550's register writes ("serial_write write addr 0x04 val 0x0b": MCR)
# and its usb-serial's control requests ("got control 0x4001, value 0x303").
MCR_WRITE = re.compile(r"serial_write write addr 0x04 val 0x([0-9a-f]+)")
MCR_DTR, MCR_RTS, MCR_OUT2 = 0x01, 0x02, 0x08
USB_CONTROL = re.compile(r"usb_serial_handle_control .* got control 0x([0-9a-f]+), "
                         r"value 0x([0-9a-f]+)")
# FTDI vendor requests (QEMU hw/usb/dev-serial.c): ftdi_sio resets the chip at every open;
# SET_MDM_CTRL's value has the lines to change in its high byte, their levels in the low.
FTDI_RESET, FTDI_SET_MDM_CTRL = 0x4000, 0x4001


def _line_events(lines: list[str], tty: str) -> list[str]:
    """What in QEMU's trace ``lines`` shows ``tty`` closed, opened, or DTR/RTS dropped.

    The 8250: its shutdown at the last close writes MCR without OUT2
    (serial8250_do_shutdown), and HUPCL or a hang-up writes it without DTR/RTS; every MCR
    write the daemon's starts make keeps DTR, RTS and OUT2 (the guest's MCR is 0x0b). The
    FT232: ftdi_sio's open sends FTDI_RESET; a drop is SET_MDM_CTRL with a line low.
    (Other ttys of the VM are closed, or the console's, which writes no MCR.)"""
    found = []
    for line in lines:
        if tty == "ttyS1" and (mcr := MCR_WRITE.search(line)):
            value = int(mcr[1], 16)
            if value & (MCR_DTR | MCR_RTS | MCR_OUT2) != MCR_DTR | MCR_RTS | MCR_OUT2:
                found.append(f"MCR={value:#04x}")
        elif tty == "ttyUSB0" and (control := USB_CONTROL.search(line)):
            request, value = int(control[1], 16), int(control[2], 16)
            if request == FTDI_RESET:
                found.append(f"FTDI reset (an open), value {value:#x}")
            elif request == FTDI_SET_MDM_CTRL and (value >> 8) & ~value & 0x03:
                found.append(f"FTDI SET_MDM_CTRL {value:#06x} (a line dropped)")
    return found


def _timed_restart(machine: Vm, unit: str) -> float:
    """`systemctl restart` (which returns at READY=1); the seconds it took, in the guest."""
    result = machine.sh(f"a=$(date +%s%N); timeout 120 systemctl restart {unit}; rc=$?; "
                        "b=$(date +%s%N); echo $(( (b - a) / 1000000 )); exit $rc",
                        timeout_s=180)
    assert result.rc == 0, f"{result}\n{explain(machine, unit)}"
    return int(result.stdout.strip().splitlines()[-1]) / 1000


@pytest.mark.parametrize("tty", ["ttyS1", "ttyUSB0"])
def test_systemctl_restart_keeps_the_tty_open_under_traffic(clean: Vm, tty: str) -> None:
    """20 × `systemctl restart` of uartbridge@ttyS1 (8250) or uartbridge@ttyUSB0 (QEMU's
    usb-serial, ftdi_sio) while the far end sends: systemd holds the tty in its fd store,
    every start takes it back (port.taken_over, none refused), the guest's driver never
    closes nor reopens it and DTR/RTS never drop (QEMU's own view of the chip), and every
    byte arrives once, in order, both ways."""
    machine = clean
    unit = PORTS[tty][0]
    if tty == "ttyUSB0":
        write_file(machine, "/etc/uartbridge/ttyUSB0.toml", USB_CONF)
        _plug(machine)
    try:
        start(machine, unit)
        init_uart(machine, unit)
        restart_s: list[float] = []
        seen: list[list[str]] = []  # per restart: what QEMU saw of a close, an open, a drop

        def restarts() -> None:
            pid = show(machine, unit, "MainPID")["MainPID"]
            for _ in range(RESTARTS):
                mark = machine.trace_mark()
                restart_s.append(_timed_restart(machine, unit))
                pid = wait_active(machine, unit, not_pid=pid)["MainPID"]
                seen.append(_line_events(machine.trace_since(mark), tty))

        taken = _traffic_across(machine, tty, f"fdstore-{tty}", restarts)
        assert taken == RESTARTS, (
            f"the tty was taken over at {taken} of {RESTARTS} starts\n{explain(machine, unit)}")
        assert not any(seen), (
            "the tty was closed, opened or lost DTR/RTS during restarts "
            f"{[n + 1 for n, events in enumerate(seen) if events]}: {seen}")
        # The check sees a close: a stop empties the fd store, the next start opens the tty.
        mark = machine.trace_mark()
        machine.ok(f"systemctl stop {unit} && systemctl start {unit}", timeout_s=180)
        assert _line_events(machine.trace_since(mark), tty), (
            "QEMU's trace shows no close or open across stop + start: it cannot tell")
    finally:
        if tty == "ttyUSB0":
            machine.sh(f"systemctl stop {unit}", timeout_s=120)
            if machine.sh("test -e /dev/ttyUSB0").rc == 0:
                _unplug(machine)
    print(f"{tty}: systemctl restart -> READY=1 (the command returns at READY=1, "
          f"{machine.accel}): median {statistics.median(restart_s):.3f} s, runs "
          + ", ".join(f"{s:.3f}" for s in restart_s))


# -- issue 13: an upgrade onto another installed version keeps the tty and the state ---------
# The previous release is the first whose `systemctl restart` keeps the port (the merge of
# branch 'restart', checkpoint format 5 with port_handle): older ones cannot hand a tty over.
# Its wheel is built on the host from that commit's source (OLD_SOURCE), offline (the share's
# wheelhouse has setuptools and wheel). Both commits say version 0.1.0: the build copy of the
# old one gets the local label OLD_VERSION so that `uartbridge --version` tells them apart
# (the code under test is not touched).
OLD_COMMIT = "93a20ceb4cd85fcc417b423baf4df7bc5d64d5c3"
OLD_VERSION = "0.1.0+fdstore.93a20ce"
# Its source as `git archive OLD_COMMIT uartbridge pyproject.toml README.md | xz -9` made it,
# kept in the tree: a shallow clone (CI's may be one) has no OLD_COMMIT to archive.
OLD_SOURCE = Path(__file__).parent / "old-release" / "uartbridge-93a20ce.tar.xz"
VENV_PIP = ("PIP_DISABLE_PIP_VERSION_CHECK=1 /opt/uartbridge/bin/python -m pip install -q "
            "--no-deps --force-reinstall --no-cache-dir")


@pytest.fixture(scope="module")
def old_wheel(vm: Vm) -> str:
    """OLD_COMMIT's wheel (version OLD_VERSION), built into the share; its path in the guest."""
    dest = vm.share_dir / "old"
    src = dest / "src"
    src.mkdir(parents=True)
    with tarfile.open(OLD_SOURCE) as archive:
        # filter= came with Python 3.11.4; Debian 12's 3.11.2 may not have it (our own file)
        archive.extractall(src, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    for name in ("pyproject.toml", "uartbridge/__init__.py"):
        path = src / name
        text = path.read_text(encoding="utf-8")
        assert text.count('"0.1.0"') == 1, f"{name} at {OLD_COMMIT} does not say 0.1.0 once"
        path.write_text(text.replace('"0.1.0"', f'"{OLD_VERSION}"'), encoding="utf-8")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                    "--find-links", str(vm.share_dir / "wheels"), "-w", str(dest), str(src)],
                   check=True, timeout=300)
    wheels = sorted(dest.glob("uartbridge-*.whl"))
    assert len(wheels) == 1, wheels
    return f"/mnt/src/old/{wheels[0].name}"


def _running_version(machine: Vm) -> object:
    """The version the running daemon reports in its status (OLD_COMMIT's has no such key)."""
    status = json.loads(machine.ok("uartbridge status --json --instance ttyS1"))
    return status.get("version")


def test_upgrade_to_another_version_keeps_the_tty_and_the_state(clean: Vm, old_wheel: str
                                                                ) -> None:
    """uartbridge@ttyS1 under traffic both ways: the previous release's wheel installed and
    `systemctl restart` (a downgrade), then scripts/install-service installs this checkout
    and restarts the unit (the upgrade): each version takes the tty from the fd store over
    from the other, resumes the other's checkpoint, and every byte arrives once, in order."""
    machine = clean
    new_version = machine.ok("uartbridge --version").strip()
    took: dict[str, float] = {}

    def resumed_in_this_run() -> str:
        invocation = show(machine, TEMPLATE, "InvocationID")["InvocationID"]
        return machine.sh(f"journalctl -b --no-pager -o cat _SYSTEMD_INVOCATION_ID="
                          f"{invocation} | grep -F 'resumed from checkpoint'").stdout.strip()

    try:
        start(machine, TEMPLATE)
        init_uart(machine, TEMPLATE)

        def downgrade() -> None:
            pid = show(machine, TEMPLATE, "MainPID")["MainPID"]
            machine.ok(f"{VENV_PIP} {old_wheel}", timeout_s=300)
            took["downgrade restart"] = _timed_restart(machine, TEMPLATE)
            wait_active(machine, TEMPLATE, not_pid=pid)

        assert _traffic_across(machine, "ttyS1", "downgrade", downgrade) == 1
        assert OLD_VERSION in machine.ok("uartbridge --version"), "the old wheel is not installed"
        assert _running_version(machine) is None, "the old version is not the one running"
        assert resumed_in_this_run(), f"the old one did not resume\n{explain(machine, TEMPLATE)}"

        def upgrade() -> None:
            pid = show(machine, TEMPLATE, "MainPID")["MainPID"]
            begin = time.monotonic()
            machine.ok("cd /root/uartbridge && scripts/install-service", timeout_s=900)
            wait_active(machine, TEMPLATE, not_pid=pid)
            took["install-service"] = time.monotonic() - begin

        assert _traffic_across(machine, "ttyS1", "upgrade", upgrade) == 1
        assert machine.ok("uartbridge --version").strip() == new_version
        assert _running_version(machine) == new_version.split()[1].rstrip(","), (
            f"the new version is not the one running: {new_version}")
        assert resumed_in_this_run(), f"the new one did not resume\n{explain(machine, TEMPLATE)}"
        print(f"{new_version} -> {OLD_VERSION} -> back ({machine.accel}): "
              + ", ".join(f"{k} {v:.1f} s" for k, v in took.items()))
    finally:
        if machine.sh("uartbridge --version").stdout.strip() != new_version:
            machine.ok("cd /root/uartbridge && scripts/install-service", timeout_s=900)


# -- issue 13 item 2: the bus survives `systemctl restart` (the optional socket unit) ---------
# uartbridge@ttyS1.socket holds the control and bus sockets in /run/uartbridge-ttyS1.sockets
# (the config names them there); the daemon takes them from LISTEN_FDS at every start. The
# same reconnecting emulator runs first without the socket unit (the sockets are the
# daemon's, in the runtime directory systemd removes at each stop), then with it.

SOCKET_UNIT = "uartbridge@ttyS1.socket"
SOCKET_DIR = "/run/uartbridge-ttyS1.sockets"
SOCKETS_CONF = (f'[daemon]\ncontrol_socket = "{SOCKET_DIR}/control.sock"\n'
                f'{TTYS1_CONF}bus_socket = "{SOCKET_DIR}/uart0.bus"\n')
SOCKET_RESTARTS = 3
LOOP_OUT = 2000  # guest -> far end, written as the THRE allows while reconnecting


def _systemctl_restart(machine: Vm) -> Callable[[], None]:
    """One `systemctl restart` of the template instance, waiting for its new MainPID."""
    pid = show(machine, TEMPLATE, "MainPID")["MainPID"]

    def restart() -> None:
        nonlocal pid
        restarted = machine.sh(f"timeout 120 systemctl restart {TEMPLATE}", timeout_s=180)
        assert restarted.rc == 0, f"{restarted}\n{explain(machine, TEMPLATE)}"
        pid = wait_active(machine, TEMPLATE, not_pid=pid)["MainPID"]

    return restart


def _reconnecting_guest(machine: Vm, bus_path: str, seed: str,
                        restart: Callable[[], None]) -> dict[str, object]:
    """SOCKET_RESTARTS × ``restart`` of the template instance while the guest_uart `loop`
    emulator reconnects over and over and the far end sends 64 bytes every 0.2 s; checks
    every byte once, in order, both ways; the loop's report."""
    count_file = f"/tmp/{seed}.count"
    machine.sh(f"rm -f {count_file}")
    inbound = pattern(f"{seed}-h2g", 64 * 400)
    sent = 0
    stop = threading.Event()
    result: dict[str, object] = {}

    def send() -> None:
        nonlocal sent
        while not stop.is_set() and sent < len(inbound):
            far(machine).send(inbound[sent:sent + 64])
            sent += 64
            time.sleep(0.2)

    def loop() -> None:
        result.update(gu(machine, f"loop {bus_path} --seed {seed}-g2h --count {LOOP_OUT} "
                         f"--read-count-file {count_file} --timeout-s 300", timeout_s=400))

    sender = threading.Thread(target=send, daemon=True)
    guest = threading.Thread(target=loop, daemon=True)
    sender.start()
    guest.start()
    try:
        for _ in range(SOCKET_RESTARTS):
            time.sleep(1.0)
            restart()
        time.sleep(1.0)  # traffic after the last restart too
    finally:
        stop.set()
        sender.join(60)
        write_file(machine, count_file, str(sent))
        guest.join(420)
    assert result, "the guest loop did not report"
    problem = same_bytes("far end -> reconnecting guest", inbound[:sent],
                         bytes.fromhex(str(result["hex"])))
    problem2 = same_bytes("reconnecting guest -> far end", pattern(f"{seed}-g2h", LOOP_OUT),
                          far(machine).wait_for(LOOP_OUT, timeout_s=120))
    assert result["written"] == LOOP_OUT and not problem and not problem2, (
        f"{problem}\n{problem2}\n{ {k: v for k, v in result.items() if k != 'hex'} }\n"
        f"{explain(machine, TEMPLATE)}")
    return result


def _longest_gaps(result: dict[str, object]) -> list[float]:
    """The SOCKET_RESTARTS longest gaps the guest saw (one per restart)."""
    found = result["gaps"]
    assert isinstance(found, list)
    return sorted((float(g) for g in found), reverse=True)[:SOCKET_RESTARTS]


def test_socket_unit_keeps_the_bus_across_systemctl_restart(clean: Vm) -> None:
    """With uartbridge@ttyS1.socket enabled, an emulator reconnecting in a loop under traffic
    both ways across 3 × `systemctl restart uartbridge@ttyS1` is never refused (no
    ECONNREFUSED, no ENOENT: it waits in the listen queue), the socket files keep their inode
    (0660 in a 0750 directory), and every byte arrives once, in order. The same loop without
    the socket unit is refused meanwhile; both runs print the guest's longest gaps."""
    machine = clean
    start(machine, TEMPLATE)
    init_uart(machine, TEMPLATE)
    without = _reconnecting_guest(machine, bus(machine, TEMPLATE), "nosock",
                                  _systemctl_restart(machine))
    stop_all(machine)
    write_file(machine, "/etc/uartbridge/ttyS1.toml", SOCKETS_CONF)
    machine.ok(f"systemctl enable --now {SOCKET_UNIT}")
    try:
        start(machine, TEMPLATE)
        socket_bus = f"{SOCKET_DIR}/uart0.bus"
        modes = machine.ok(f"stat -c '%a %U %G %i' {SOCKET_DIR} {socket_bus} "
                           f"{SOCKET_DIR}/control.sock").strip().splitlines()
        assert [m.rsplit(" ", 1)[0] for m in modes] == [
            "750 root root", "660 root root", "660 root root"], modes
        status = json.loads(machine.ok("uartbridge status --json --instance ttyS1"))
        assert status["uarts"][0]["bus_socket"] == socket_bus, status
        with_unit = _reconnecting_guest(machine, socket_bus, "sock",
                                        _systemctl_restart(machine))
        assert with_unit["refused"] == {}, (
            f"refused with the socket unit: {with_unit['refused']}\n"
            f"{explain(machine, TEMPLATE)}")
        inode = machine.ok(f"stat -c %i {socket_bus}").strip()
        assert inode == modes[1].rsplit(" ", 1)[1], "the bus socket was bound anew"
        assert _journal_count(machine, TEMPLATE, "listener.handover_refused") == 0
    finally:
        machine.sh(f"systemctl disable --now {SOCKET_UNIT}")
    assert without["refused"], "without the socket unit the loop was never refused: no gap?"
    for label, result in (("without the socket unit", without), ("with it", with_unit)):
        gaps = _longest_gaps(result)
        print(f"guest's longest reconnect gaps {label} ({machine.accel}): median "
              f"{statistics.median(gaps):.3f} s, each {', '.join(f'{g:.3f}' for g in gaps)}; "
              f"refused {result['refused']}, turned away {result['turned_away']}, "
              f"sessions {result['sessions']}, "
              f"ended by a stop {result['dropped']}")


# -- issue 13 items 3 and 4: `uartbridge restart` under systemd (in place, the same MainPID) --


def test_restart_in_place_under_systemd_keeps_the_main_pid_and_the_bus(clean: Vm) -> None:
    """`uartbridge restart --instance ttyS1` 3 times under the reconnecting emulator and the
    far end's traffic: systemd's MainPID stays, the unit is not restarted nor warned about
    notifications from another PID, no connect is refused, every byte once, in order, both
    ways; prints the guest's longest gaps (the handover's downtime as a guest sees it)."""
    machine = clean
    start(machine, TEMPLATE)
    init_uart(machine, TEMPLATE)
    before = show(machine, TEMPLATE, "MainPID", "NRestarts", "InvocationID")
    took: list[str] = []

    def restart() -> None:
        done = machine.sh("timeout 120 uartbridge restart --instance ttyS1", timeout_s=180)
        assert done.rc == 0, f"{done}\n{explain(machine, TEMPLATE)}"
        took.append(done.stdout.strip().rsplit(" ", 2)[-2])

    result = _reconnecting_guest(machine, bus(machine, TEMPLATE), "inplace", restart)
    after = show(machine, TEMPLATE, "MainPID", "NRestarts", "InvocationID", "ActiveState")
    assert after["ActiveState"] == "active" and all(
        after[key] == before[key] for key in before), f"{before} -> {after}"
    assert result["refused"] == {}, result["refused"]
    assert _journal_count(machine, TEMPLATE, "port.taken_over") >= SOCKET_RESTARTS
    complaints = machine.sh("journalctl -b --no-pager -o cat _PID=1 | grep -c -F "
                            "'reception only permitted for main PID'").stdout.strip()
    assert complaints in ("", "0"), f"systemd refused {complaints} notifications"
    gaps = _longest_gaps(result)
    print(f"uartbridge restart in place ({machine.accel}): request -> answer {', '.join(took)} s; "
          f"guest's longest gaps {', '.join(f'{g:.3f}' for g in gaps) or 'none over 50 ms'}, "
          f"the longest between two operations {result.get('longest_gap_s')} s; "
          f"sessions {result['sessions']}, ended by a restart {result['dropped']}")


# -- uninstall (last: it removes what the tests above use) ---------------------------------


def test_uninstall_service(clean: Vm) -> None:
    """scripts/uninstall-service stops the units (final checkpoint kept), removes the units,
    the rule, the link and /opt/uartbridge, keeps /etc/uartbridge; --purge removes those too."""
    vm = clean
    # Whether the unit starts is other tests' business; if it runs, its checkpoint must stay.
    ran = vm.sh(f"timeout 120 systemctl start {TEMPLATE}", timeout_s=180).rc == 0
    vm.ok(f"systemctl enable {TEMPLATE}")
    state = "/var/lib/" + show(vm, TEMPLATE, "StateDirectory")["StateDirectory"].split()[0]
    vm.ok("cd /root/uartbridge && scripts/uninstall-service", timeout_s=300)
    gone = ("/opt/uartbridge /usr/local/bin/uartbridge /etc/systemd/system/uartbridge.service "
            "/etc/systemd/system/uartbridge@.service /etc/udev/rules.d/99-uartbridge.rules "
            f"/etc/systemd/system/multi-user.target.wants/{TEMPLATE}")
    left = vm.sh(f"for p in {gone}; do test -e $p -o -L $p && echo $p; done").stdout.split()
    assert not left, f"left behind: {left}"
    props = show(vm, TEMPLATE, "LoadState", "ActiveState")
    assert props["ActiveState"] != "active" and props["LoadState"] != "loaded", props
    vm.ok("test -f /etc/uartbridge/ttyS1.toml")
    if ran:
        kept = vm.sh(f"find -L {state} -name '*.json' | grep -q .")
        assert kept.rc == 0, f"the final checkpoint is gone from {state}:\n{kept}"
    vm.ok("cd /root/uartbridge && scripts/uninstall-service --purge", timeout_s=300)
    purged = vm.sh("ls -d /etc/uartbridge /var/lib/uartbridge /var/lib/private/uartbridge* "
                   "2>/dev/null").stdout.split()
    assert not purged, f"--purge left {purged}"

