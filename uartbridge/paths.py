"""Where the daemon keeps its sockets and state when the config does not say.

The units name things the same way these defaults do, so that a config in
``/etc/uartbridge/`` needs no paths, and a hand-run daemon or CLI finds what the unit uses:

=================================  ============  ===============================  ========
config                             instance      runtime / state directory (root)  unit
=================================  ============  ===============================  ========
/etc/uartbridge/uartbridge.toml    (none)        /run/uartbridge, /var/lib/…      uartbridge.service
/etc/uartbridge/NAME.toml          NAME          /run/uartbridge-NAME, …          uartbridge@NAME
anything else, or no config        (none)        /run/uartbridge, /var/lib/…
=================================  ============  ===============================  ========

Under a unit systemd says where its directories are (``$RUNTIME_DIRECTORY``,
``$STATE_DIRECTORY``) and those win. Not root: ``$XDG_RUNTIME_DIR`` (else
``/tmp/uartbridge[-NAME]-<uid>``) and ``$XDG_STATE_HOME`` (else ``~/.local/state``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .names import is_safe_name

CONFIG_DIR = Path("/etc/uartbridge")
BASE_NAME = "uartbridge"
DEFAULT_CONFIG = CONFIG_DIR / f"{BASE_NAME}.toml"
# Where a daemon writes a checkpoint its state directory refused (tmpfs, usually).
EMERGENCY_SUBDIR = "emergency"
# The optional socket units (systemd/uartbridge[@].socket) put their sockets in
# /run/<dir_name>.sockets: beside the runtime directory, which the service removes at stop.
SOCKET_UNIT_SUFFIX = ".sockets"


def instance_of(config_path: str | Path | None) -> str | None:
    """The instance a config file stands for: ``/etc/uartbridge/NAME.toml`` → NAME.

    None for ``uartbridge.toml`` (the single service), for a config anywhere else, and for
    no config. ``ValueError`` for a file in /etc/uartbridge whose name is not a safe name.
    """
    if config_path is None:
        return None
    path = Path(config_path).absolute()
    if path.parent != CONFIG_DIR or path.suffix != ".toml" or path.stem == BASE_NAME:
        return None
    if not is_safe_name(path.stem):
        raise ValueError(
            f"{path}: {path.stem!r} cannot name an instance (letters, digits, _ . -, "
            "starting with a letter or digit); set runtime_dir and state_dir in it"
        )
    return path.stem


def dir_name(instance: str | None) -> str:
    """``uartbridge`` or ``uartbridge-NAME``: the units' RuntimeDirectory=/StateDirectory=."""
    return BASE_NAME if instance is None else f"{BASE_NAME}-{instance}"


def socket_unit_dir(instance: str | None = None) -> Path:
    """Where the socket units keep the control and bus sockets: ``/run/uartbridge.sockets``
    or ``/run/uartbridge-NAME.sockets`` (a config names them there to use them)."""
    return Path("/run") / f"{dir_name(instance)}{SOCKET_UNIT_SUFFIX}"


def _systemd_dir(variable: str) -> Path | None:
    if env := os.environ.get(variable):
        return Path(env.split(":")[0])
    return None


def default_runtime_dir(instance: str | None = None) -> Path:
    """systemd's ``$RUNTIME_DIRECTORY``, else the table in the module docstring."""
    if (handed := _systemd_dir("RUNTIME_DIRECTORY")) is not None:
        return handed
    if env := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(env) / dir_name(instance)
    if os.geteuid() == 0:
        return Path("/run") / dir_name(instance)
    return Path(f"/tmp/{dir_name(instance)}-{os.geteuid()}")


def default_state_dir(instance: str | None = None) -> Path:
    """systemd's ``$STATE_DIRECTORY``, else the table in the module docstring."""
    if (handed := _systemd_dir("STATE_DIRECTORY")) is not None:
        return handed
    if os.geteuid() == 0 and not os.environ.get("XDG_STATE_HOME"):
        return Path("/var/lib") / dir_name(instance)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / dir_name(instance)


def runtime_dir_candidates() -> list[Path]:
    """Every directory where a daemon of this host may listen, for ``status`` to look at.

    ``/run/uartbridge`` and ``/run/uartbridge-*`` (DynamicUser's ``/run/private/…`` too, and
    the socket units' ``/run/uartbridge[-NAME].sockets``),
    ``$XDG_RUNTIME_DIR/uartbridge*`` and this user's ``/tmp/uartbridge*-<uid>``; each once
    (by its resolved path), in a stable order.
    """
    patterns: list[tuple[Path, str]] = [
        (Path("/run"), f"{BASE_NAME}"),
        (Path("/run"), f"{BASE_NAME}{SOCKET_UNIT_SUFFIX}"),
        (Path("/run"), f"{BASE_NAME}-*"),
        (Path("/run/private"), f"{BASE_NAME}*"),
    ]
    if env := os.environ.get("XDG_RUNTIME_DIR"):
        patterns.append((Path(env), f"{BASE_NAME}*"))
    patterns.append((Path("/tmp"), f"{BASE_NAME}*-{os.geteuid()}"))
    seen: set[str] = set()
    found: list[Path] = []
    for base, pattern in patterns:
        try:
            matches = sorted(base.glob(pattern))
        except OSError:
            continue
        for candidate in matches:
            try:
                real = os.path.realpath(candidate)
                if not os.path.isdir(candidate):
                    continue
            except OSError:
                continue
            if real not in seen:
                seen.add(real)
                found.append(candidate)
    return found


def bus_socket_path(runtime_dir: Path, uart_name: str) -> Path:
    """The default bus socket of a UART."""
    return runtime_dir / f"{uart_name}.bus"


def control_socket_path(runtime_dir: Path) -> Path:
    """The default control socket of the daemon."""
    return runtime_dir / "control.sock"


def emergency_dir(runtime_dir: Path) -> Path:
    """Where a daemon writes the checkpoints its state directory refused."""
    return runtime_dir / EMERGENCY_SUBDIR
