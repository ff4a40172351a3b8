"""A small sd_notify(3): tell systemd we are ready, stopping, alive — no dependency.

``notify`` sends one AF_UNIX datagram to ``$NOTIFY_SOCKET`` (a path, or an abstract socket
written ``@name``). Without the variable it does nothing and returns False; on a missing or
refusing socket it returns False too. It never raises and never logs: notifications are
best effort, and the daemon must run the same with or without systemd.

The watchdog: ``watchdog_interval_s()`` reads ``$WATCHDOG_USEC`` (honouring
``$WATCHDOG_PID``: the interval is only ours when the PID is ours). Send ``watchdog()`` at
about half that interval, as sd_watchdog_enabled(3) advises.

The file descriptor store (systemd's "File Descriptor Store" documentation):
``store_fd(name, fd)`` sends ``FDSTORE=1`` and ``FDNAME=`` with the fd attached
(``SCM_RIGHTS``); systemd keeps its copy while the unit runs or restarts (a job queued) and
hands it back at the next start in ``$LISTEN_FDS``/``$LISTEN_FDNAMES``; with ``poll=False``
(``FDPOLL=0``) it keeps an fd that shows POLLHUP too (a pty master with no client), else such
an fd is dropped. ``remove_fd(name)`` is ``FDSTOREREMOVE=1``. ``barrier()`` waits until
systemd has processed every message sent before it (``BARRIER=1``). systemd accepts fds only
with ``FileDescriptorStoreMax=`` > 0, and does not say when it refuses them; from systemd 254
on, ``$FDSTORE`` names the limit (``fd_store_limit()``). ``listen_fds()`` takes the fds
handed to this process (sd_listen_fds_with_names(3)): only when ``$LISTEN_PID`` is ours, and
the variables are removed so that no child takes them again.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import select
import socket
import time

# A notification is a handful of bytes; never let a wedged manager stall the event loop long.
_SEND_TIMEOUT_S = 1.0


SD_LISTEN_FDS_START = 3
# The names systemd accepts (sd_notify(3)): at most 255 characters, no control character, no
# ':' (LISTEN_FDNAMES separates names with it).
FDNAME_MAX_CHARS = 255


def _address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    return None  # unset, empty, or a transport we do not speak (vsock:)


def available() -> bool:
    """Whether there is a service manager to notify (``$NOTIFY_SOCKET`` names a socket)."""
    return _address() is not None


def notify(message: str, fds: tuple[int, ...] = ()) -> bool:
    """Send ``message`` (``KEY=VALUE`` lines), with ``fds`` attached; True when sent."""
    address = _address()
    if address is None:
        return False
    try:
        data = message.encode("utf-8")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT_S)
            sock.connect(address)
            if fds:
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sock.sendmsg([data], rights)
            else:
                sock.sendall(data)
    except (OSError, ValueError, UnicodeError):
        return False
    return True


def valid_fd_name(name: str) -> bool:
    """Whether systemd takes ``name`` as an FDNAME= (1..255 printable ASCII, no ':')."""
    return (0 < len(name) <= FDNAME_MAX_CHARS and name.isascii() and name.isprintable()
            and ":" not in name)


def store_fd(name: str, fd: int, *, poll: bool = True) -> bool:
    """``FDSTORE=1`` with ``FDNAME=name`` (and ``FDPOLL=0`` unless ``poll``) for ``fd``."""
    if not valid_fd_name(name):
        raise ValueError(f"not a valid fd store name: {name!r}")
    return notify(f"FDSTORE=1\nFDNAME={name}" + ("" if poll else "\nFDPOLL=0"), (fd,))


def remove_fd(name: str) -> bool:
    """``FDSTOREREMOVE=1`` for every stored fd named ``name``."""
    if not valid_fd_name(name):
        raise ValueError(f"not a valid fd store name: {name!r}")
    return notify(f"FDSTOREREMOVE=1\nFDNAME={name}")


def barrier(timeout_s: float = 5.0) -> bool:
    """``BARRIER=1``: True once systemd has processed every earlier message (it closes the
    pipe end sent along); False with no manager, or after ``timeout_s``."""
    if not available():
        return False
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        sent = notify("BARRIER=1", (write_end,))
        os.close(write_end)
        write_end = -1
        if not sent:
            return False
        poller = select.poll()
        poller.register(read_end, select.POLLHUP)
        return bool(poller.poll(int(timeout_s * 1000)))
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)


def fd_store_limit() -> int | None:
    """``$FDSTORE`` (systemd ≥ 254: the unit's ``FileDescriptorStoreMax=``); None if unset."""
    try:
        return int(os.environ["FDSTORE"])
    except (KeyError, ValueError):
        return None


def listen_fds() -> list[tuple[str, int]]:
    """The fds handed to this process, as ``(name, fd)`` from fd 3 on (sd_listen_fds(3)).

    Only when ``$LISTEN_PID`` is our PID (else they were meant for another process: none).
    The variables are removed either way, and each fd is made close-on-exec. A name is
    ``"unknown"`` where ``$LISTEN_FDNAMES`` gives none (systemd's own default).
    """
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    names_text = os.environ.pop("LISTEN_FDNAMES", None)
    os.environ.pop("LISTEN_PIDFDID", None)
    try:
        if pid is None or count is None or int(pid) != os.getpid():
            return []
        n = int(count)
    except ValueError:
        return []
    names = names_text.split(":") if names_text else []
    found: list[tuple[str, int]] = []
    for i in range(max(0, n)):
        fd = SD_LISTEN_FDS_START + i
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue  # announced but not there
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        found.append((names[i] if i < len(names) and names[i] else "unknown", fd))
    return found


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
