"""Where the daemon keeps its sockets and state when the config does not say."""

from __future__ import annotations

import os
from pathlib import Path


def default_runtime_dir() -> Path:
    """systemd's ``$RUNTIME_DIRECTORY``, else ``$XDG_RUNTIME_DIR/uartbridge``, else /tmp."""
    if env := os.environ.get("RUNTIME_DIRECTORY"):
        return Path(env.split(":")[0])
    if env := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(env) / "uartbridge"
    if os.geteuid() == 0:
        return Path("/run/uartbridge")
    return Path(f"/tmp/uartbridge-{os.geteuid()}")


def default_state_dir() -> Path:
    """systemd's ``$STATE_DIRECTORY``, else ``$XDG_STATE_HOME/uartbridge``, else ~/.local/state."""
    if env := os.environ.get("STATE_DIRECTORY"):
        return Path(env.split(":")[0])
    if os.geteuid() == 0 and not os.environ.get("XDG_STATE_HOME"):
        return Path("/var/lib/uartbridge")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "uartbridge"


def bus_socket_path(runtime_dir: Path, uart_name: str) -> Path:
    """The default bus socket of a UART."""
    return runtime_dir / f"{uart_name}.bus"


def control_socket_path(runtime_dir: Path) -> Path:
    """The default control socket of the daemon."""
    return runtime_dir / "control.sock"
