"""The systemd units and the udev rule: `systemd-analyze verify` clean, and the promised keys."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
SINGLE = SYSTEMD / "uartbridge.service"
TEMPLATE = SYSTEMD / "uartbridge@.service"
RULES = SYSTEMD / "99-uartbridge.rules"
INSTALLED = "/usr/local/bin/uartbridge"


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), …]} (systemd allows repeated keys)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path}: key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not a key=value line: {line}"
        current.append((key.strip(), value.strip()))
    return sections


def values(path: Path, section: str, key: str) -> list[str]:
    return [v for k, v in parse_unit(path).get(section, []) if k == key]


def one(path: Path, section: str, key: str) -> str:
    found = values(path, section, key)
    assert len(found) == 1, f"{path.name}: [{section}] {key}= appears {len(found)} times"
    return found[0]


def systemd_analyze() -> str:
    """The systemd-analyze binary; missing fails under CI and skips elsewhere."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is not installed (required when CI is set)")
        pytest.skip("systemd-analyze is not installed")
    return exe


def installed_script() -> str:
    """Where ExecStart= should point here: /usr/local/bin/uartbridge, or the real script.

    The real script is the one beside the running Python first (a venv's bin/, which is not
    on PATH when the venv's python is run by path, as README's test command does).
    """
    if os.access(INSTALLED, os.X_OK):
        return INSTALLED
    beside = Path(sys.executable).parent / "uartbridge"
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("uartbridge")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("the uartbridge console script is not installed")
        pytest.skip("the uartbridge console script is not installed")
    return found


def copy_unit(src: Path, dest_dir: Path) -> Path:
    """Copy a unit into dest_dir, pointing ExecStart= at the script installed here."""
    text = src.read_text(encoding="utf-8")
    assert f"ExecStart={INSTALLED} " in text
    dest = dest_dir / src.name
    dest.write_text(text.replace(INSTALLED, installed_script()), encoding="utf-8")
    return dest


def verify(exe: str, unit: Path) -> None:
    """Run `systemd-analyze verify`; any stderr output (warnings included) is a failure."""
    proc = subprocess.run(
        # --man=no: Documentation=man:uartbridge(1) is checked where the page is installed
        # (docs/uartbridge.1, by the service install), not here.
        [exe, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=unit.parent,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "cat"},
        check=False,
    )
    report = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report
    assert proc.stderr.strip() == "", report


def test_single_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify accepts uartbridge.service with no warning."""
    exe = systemd_analyze()
    verify(exe, copy_unit(SINGLE, tmp_path))


def test_template_instance_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify accepts uartbridge@ttyUSB0.service, built from the template."""
    exe = systemd_analyze()
    copy_unit(TEMPLATE, tmp_path)
    verify(exe, tmp_path / "uartbridge@ttyUSB0.service")


def test_verify_catches_unknown_keys(tmp_path: Path) -> None:
    """The verify check fails on a unit with an unknown key (it only warns, exit 0)."""
    exe = systemd_analyze()
    unit = copy_unit(SINGLE, tmp_path)
    unit.write_text(unit.read_text().replace("[Service]\n", "[Service]\nNoSuchKey=1\n"))
    with pytest.raises(AssertionError, match="NoSuchKey"):
        verify(exe, unit)


@pytest.mark.parametrize("unit", [SINGLE, TEMPLATE], ids=lambda p: p.name)
def test_service_keys(unit: Path) -> None:
    """Both units are notify services with watchdog, restart, SIGTERM stop and hardening."""
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30s",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "Environment": "PYTHONUNBUFFERED=1",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "SupplementaryGroups": "dialout",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",  # sock_diag
        "ReadWritePaths": "-/run/lock",  # UUCP lock files
        "LockPersonality": "yes",
        "RestrictRealtime": "yes",
        "SystemCallArchitectures": "native",
        "UMask": "0077",
        "DevicePolicy": "closed",
        "RuntimeDirectoryMode": "0750",
    }
    for key, value in expected.items():
        assert one(unit, "Service", key) == value, key
    assert one(unit, "Service", "TimeoutStopSec")
    devices = values(unit, "Service", "DeviceAllow")
    for device in ("char-ttyUSB rw", "char-ttyACM rw", "/dev/ptmx rw", "char-pts rw"):
        assert device in devices
    # Permanent errors never restart (an instance without a config must not loop on 66).
    assert one(unit, "Service", "RestartPreventExitStatus").split() == [
        "64", "65", "66", "73", "75", "78"]
    assert one(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert int(one(unit, "Service", "LimitNOFILE")) >= 4096
    assert one(unit, "Service", "DynamicUser") == "yes"
    # Preserved runtime directories of a DynamicUser= unit live under /run/private (0700),
    # where socket_group members could not reach the sockets.
    assert one(unit, "Service", "RuntimeDirectoryPreserve") == "no"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


@pytest.mark.parametrize("unit", [SINGLE, TEMPLATE], ids=lambda p: p.name)
def test_units_keep_port_fds_in_the_fd_store(unit: Path) -> None:
    """Both units give the daemon an fd store (FileDescriptorStoreMax= > 0): across
    `systemctl restart` it keeps the open ports there instead of closing them."""
    assert int(one(unit, "Service", "FileDescriptorStoreMax")) >= 16


def test_single_unit_paths() -> None:
    """The single unit runs /etc/uartbridge/uartbridge.toml with /run and /var/lib dirs."""
    assert one(SINGLE, "Service", "ExecStart") == (
        f"{INSTALLED} run --config /etc/uartbridge/uartbridge.toml")
    assert one(SINGLE, "Service", "RuntimeDirectory") == "uartbridge"
    assert one(SINGLE, "Service", "StateDirectory") == "uartbridge"
    assert one(SINGLE, "Service", "User") == "uartbridge"


def test_template_paths_per_instance() -> None:
    """The template reads /etc/uartbridge/%i.toml, with its own directories beside the single
    unit's (not inside them: both can run) and its own transient user."""
    assert one(TEMPLATE, "Service", "ExecStart") == (
        f"{INSTALLED} run --config /etc/uartbridge/%i.toml")
    assert one(TEMPLATE, "Service", "RuntimeDirectory") == "uartbridge-%i"
    assert one(TEMPLATE, "Service", "StateDirectory") == "uartbridge-%i"
    assert one(TEMPLATE, "Service", "User") == "uartbridge-%i"


def test_unit_directories_are_the_daemons_defaults(tmp_path: Path) -> None:
    """What the units name is what the daemon (and the CLI) derive from the config path, so
    /etc/uartbridge/NAME.toml needs no paths and a hand-run CLI finds the unit's daemon."""
    from uartbridge import paths

    for unit, config, instance in ((SINGLE, "/etc/uartbridge/uartbridge.toml", None),
                                   (TEMPLATE, "/etc/uartbridge/%i.toml", "ttyUSB0")):
        assert one(unit, "Service", "ExecStart").endswith(f"--config {config}")
        derived = paths.instance_of(config.replace("%i", "ttyUSB0"))
        assert derived == instance
        name = one(unit, "Service", "RuntimeDirectory").replace("%i", "ttyUSB0")
        assert paths.dir_name(derived) == name
        assert one(unit, "Service", "StateDirectory").replace("%i", "ttyUSB0") == name


def test_units_differ_only_per_instance() -> None:
    """Both units carry the same settings, apart from the per-instance ones."""
    per_instance = {"Description", "ExecStart", "RuntimeDirectory", "StateDirectory", "User"}
    single, template = parse_unit(SINGLE), parse_unit(TEMPLATE)
    assert single.keys() == template.keys()
    for section in single:
        assert [kv for kv in single[section] if kv[0] not in per_instance] == [
            kv for kv in template[section] if kv[0] not in per_instance
        ], section


@pytest.mark.parametrize("unit", [SINGLE, TEMPLATE], ids=lambda p: p.name)
def test_security_exposure_stays_low(tmp_path: Path, unit: Path) -> None:
    """`systemd-analyze security --offline` rates both units at most 2.0 ("OK")."""
    exe = systemd_analyze()
    copy_unit(unit, tmp_path)
    name = "uartbridge@ttyUSB0.service" if unit is TEMPLATE else unit.name
    proc = subprocess.run(
        [exe, "security", "--offline=yes", "--threshold=20", "--no-pager", name],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "cat"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "Overall exposure level" in line]
    assert lines, proc.stdout
    score = float(lines[-1].split("Overall exposure level for")[1].split(":")[1].split()[0])
    assert score <= 2.0, lines[-1]


def test_udev_rule_starts_the_instance() -> None:
    """The udev example wants uartbridge@%k.service when its tty adapter is added."""
    rules = [line for line in RULES.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert len(rules) == 1
    rule = rules[0]
    for part in ('ACTION=="add"', 'SUBSYSTEM=="tty"', 'ENV{ID_SERIAL}=="', 'TAG+="systemd"',
                 'ENV{SYSTEMD_WANTS}+="uartbridge@%k.service"'):
        assert part in rule


# -- the optional socket units ---------------------------------------------------------------

SINGLE_SOCKET = SYSTEMD / "uartbridge.socket"
TEMPLATE_SOCKET = SYSTEMD / "uartbridge@.socket"


def test_socket_units_verify(tmp_path: Path) -> None:
    """systemd-analyze verify accepts uartbridge.socket and uartbridge@ttyS1.socket (each
    beside the service it activates) with no warning."""
    exe = systemd_analyze()
    for service, sock in ((SINGLE, SINGLE_SOCKET), (TEMPLATE, TEMPLATE_SOCKET)):
        copy_unit(service, tmp_path)
        (tmp_path / sock.name).write_text(sock.read_text(encoding="utf-8"), encoding="utf-8")
    verify(exe, tmp_path / SINGLE_SOCKET.name)
    verify(exe, tmp_path / "uartbridge@ttyS1.socket")


@pytest.mark.parametrize(("sock", "service", "instance"),
                         [(SINGLE_SOCKET, SINGLE, None), (TEMPLATE_SOCKET, TEMPLATE, "%i")],
                         ids=["single", "template"])
def test_socket_units_keep_private_sockets_outside_the_runtime_directory(
        sock: Path, service: Path, instance: str | None) -> None:
    """Each socket unit activates its service, names its sockets as the daemon takes them
    (FileDescriptorName= is handover.LISTENER_NAME), keeps them in paths.socket_unit_dir —
    not in the service's RuntimeDirectory=, which systemd removes at every stop — with a
    0750 directory and 0660 sockets, and listens for the control socket and uart0's bus."""
    from uartbridge import paths
    from uartbridge.daemon import handover

    assert one(sock, "Socket", "Service") == service.name.replace("@.", "@%i.")
    assert one(sock, "Socket", "FileDescriptorName") == handover.LISTENER_NAME
    assert one(sock, "Socket", "DirectoryMode") == "0750"
    assert int(one(sock, "Socket", "SocketMode"), 8) & 0o007 == 0  # 0660 or tighter
    assert one(sock, "Socket", "RemoveOnStop") == "yes"
    assert "Accept" not in dict(parse_unit(sock)["Socket"])  # one daemon takes them all
    directory = paths.socket_unit_dir(instance)
    listens = [Path(v) for v in values(sock, "Socket", "ListenStream")]
    assert listens == [paths.control_socket_path(directory),
                       paths.bus_socket_path(directory, "uart0")]
    runtime = Path("/run") / one(service, "Service", "RuntimeDirectory")
    assert all(runtime not in p.parents for p in listens), listens
    assert one(sock, "Install", "WantedBy") == "sockets.target"


def test_socket_units_differ_only_per_instance() -> None:
    """Both socket units carry the same settings, apart from the per-instance ones."""
    per_instance = {"Description", "ListenStream", "Service"}
    single, template = parse_unit(SINGLE_SOCKET), parse_unit(TEMPLATE_SOCKET)
    assert single.keys() == template.keys()
    for section in single:
        assert [kv for kv in single[section] if kv[0] not in per_instance] == [
            kv for kv in template[section] if kv[0] not in per_instance], section


def test_socket_unit_directories_are_found_by_status(monkeypatch: pytest.MonkeyPatch) -> None:
    """`uartbridge status` with no options looks in the socket units' directories too."""
    from uartbridge import paths

    assert paths.socket_unit_dir(None) == Path("/run/uartbridge.sockets")
    assert paths.socket_unit_dir("ttyS1") == Path("/run/uartbridge-ttyS1.sockets")
    globbed: list[tuple[str, str]] = []
    real_glob = Path.glob

    def spy(self: Path, pattern: str) -> object:
        globbed.append((str(self), pattern))
        return real_glob(self, pattern)

    monkeypatch.setattr(Path, "glob", spy)
    paths.runtime_dir_candidates()
    covered = {(base, pattern) for base, pattern in globbed if base == "/run"}
    assert ("/run", "uartbridge.sockets") in covered
    assert ("/run", "uartbridge-*") in covered  # uartbridge-NAME.sockets
