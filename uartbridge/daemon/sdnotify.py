"""A small sd_notify(3): tell systemd we are ready, stopping, alive — no dependency.

``notify`` sends one AF_UNIX datagram to ``$NOTIFY_SOCKET`` (a path, or an abstract socket
written ``@name``). Without the variable it does nothing and returns False; on a missing or
refusing socket it returns False too. It never raises and never logs: notifications are
best effort, and the daemon must run the same with or without systemd.

The watchdog: ``watchdog_interval_s()`` reads ``$WATCHDOG_USEC`` (honouring
``$WATCHDOG_PID``: the interval is only ours when the PID is ours). Send ``watchdog()`` at
about half that interval, as sd_watchdog_enabled(3) advises.
"""

from __future__ import annotations

import os
import socket
import time

# A notification is a handful of bytes; never let a wedged manager stall the event loop long.
_SEND_TIMEOUT_S = 1.0


def notify(message: str) -> bool:
    """Send ``message`` (``KEY=VALUE`` lines) to systemd; True when the datagram was sent."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False  # unset, empty, or a transport we do not speak (vsock:)
    try:
        data = message.encode("utf-8")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT_S)
            sock.connect(address)
            sock.sendall(data)
    except (OSError, ValueError, UnicodeError):
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def ready(status: str | None = None) -> bool:
    """``READY=1``, with an optional ``STATUS=`` line."""
    message = "READY=1"
    if status is not None:
        message += f"\nSTATUS={_one_line(status)}"
    return notify(message)


def status(text: str) -> bool:
    """``STATUS=text``: the one-line status ``systemctl status`` shows."""
    return notify(f"STATUS={_one_line(text)}")


def stopping() -> bool:
    """``STOPPING=1``: shutdown has begun (checkpointing, closing ports)."""
    return notify("STOPPING=1")


def reloading() -> bool:
    """``RELOADING=1`` (with ``MONOTONIC_USEC=``, as systemd ≥ 253 asks): re-reading the config.

    Send ``ready()`` when done.
    """
    return notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")


def extend_timeout(seconds: float) -> bool:
    """``EXTEND_TIMEOUT_USEC=``: we are still working (a final checkpoint being retried);
    systemd should wait ``seconds`` more before it gives up on the stop."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1_000_000))}")


def watchdog() -> bool:
    """``WATCHDOG=1``: the daemon is alive (the event loop turned)."""
    return notify("WATCHDOG=1")


def watchdog_interval_s() -> float | None:
    """The watchdog interval systemd expects from this process, in seconds; None if none.

    From ``$WATCHDOG_USEC``; None when it is unset, not a positive integer, or when
    ``$WATCHDOG_PID`` is set to another process's PID.
    """
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000
