"""Descriptors that outlive the daemon: handed to the next run in place, or to systemd.

One way back in serves both: the next run finds them as ``$LISTEN_FDS``/``$LISTEN_FDNAMES``
(``sdnotify.listen_fds``), whoever kept them.

- ``uartbridge restart`` (in place, no service manager needed): the daemon takes its final
  checkpoint, keeps its port descriptors and its listening sockets (bus, control) open,
  moves them to fds 3… and ``exec``\\ s itself with the same command line, the same PID, and
  ``$LISTEN_PID``/``$LISTEN_FDS``/``$LISTEN_FDNAMES`` set as systemd would, plus
  ``$UARTBRIDGE_HANDOVER`` (how many in-place restarts so far): the next run resumes from
  the state directory's newest checkpoint whatever ``[checkpoint] resume`` says.
- Under systemd each open port's descriptor goes to the fd store (``FDSTORE=1``, see
  ``sdnotify``), which hands it back at the next start of the unit.

Names: ``port.<uart>`` (the open port: tty, an owned pty's master, a ``socket://``
connection), ``bus.<uart>`` (the bus's listening Unix socket), ``control``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from typing import Any, NoReturn

from . import sdnotify

HANDOVER_ENV = "UARTBRIDGE_HANDOVER"
CONTROL_NAME = "control"


def port_name(uart: str) -> str:
    """The name of a UART's port descriptor."""
    return f"port.{uart}"


def bus_name(uart: str) -> str:
    """The name of a UART's listening bus socket."""
    return f"bus.{uart}"


def restarts_so_far() -> int:
    """How many in-place restarts led to this run (0: none), from ``$UARTBRIDGE_HANDOVER``;
    the variable is removed so that no child sees it."""
    try:
        return max(0, int(os.environ.pop(HANDOVER_ENV, "0")))
    except ValueError:
        return 0


class HandedFds:
    """The descriptors this run was handed, by name (``take`` them; ``close_rest``)."""

    def __init__(self, fds: list[tuple[str, int]]) -> None:
        self._fds: dict[str, int] = {}
        self._extra: list[tuple[str, int]] = []
        self.taken: list[str] = []  # the names taken so far
        for name, fd in fds:
            if name in self._fds:
                self._extra.append((name, self._fds[name]))  # the store had two: newest wins
            self._fds[name] = fd

    @classmethod
    def from_environment(cls) -> HandedFds:
        """What ``$LISTEN_FDS`` hands to this process (systemd's fd store, or our exec)."""
        return cls(sdnotify.listen_fds())

    def take(self, name: str) -> int | None:
        """The descriptor named ``name`` (the caller owns it from now on), or None."""
        fd = self._fds.pop(name, None)
        if fd is not None:
            self.taken.append(name)
        return fd

    def close_rest(self, log: Any) -> None:
        """Close what nobody took (a UART no longer configured…), naming each in the log."""
        for name, fd in [*self._extra, *self._fds.items()]:
            log.warning("handed-over descriptor not used; closed", name=name)
            if sdnotify.available() and sdnotify.valid_fd_name(name):
                sdnotify.remove_fd(name)
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._extra.clear()


def keep(fds: dict[str, int]) -> dict[str, int]:
    """Duplicates of ``fds`` above every open descriptor (close-on-exec until ``exec_in_place``
    moves them): closing the originals then closes nothing the next run needs."""
    try:
        highest = max(int(entry) for entry in os.listdir("/proc/self/fd"))
    except (OSError, ValueError):
        highest = 1024
    return {name: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, highest + 1)
            for name, fd in fds.items()}


def exec_in_place(kept: dict[str, int], restarts: int) -> NoReturn:
    """Move ``kept`` (from ``keep``) to fds 3… and exec this same command line with
    ``$LISTEN_*`` naming them. Raises ``OSError`` only if the exec itself fails."""
    names = list(kept)
    for index, name in enumerate(names):
        # dup2 targets are all below every kept duplicate (``keep`` put them higher); the
        # target inherits across exec (os.dup2 makes it inheritable).
        os.dup2(kept[name], sdnotify.SD_LISTEN_FDS_START + index)
    env = dict(os.environ)
    env.update({
        "LISTEN_PID": str(os.getpid()),  # exec keeps the PID
        "LISTEN_FDS": str(len(names)),
        "LISTEN_FDNAMES": ":".join(names),
        HANDOVER_ENV: str(restarts),
    })
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


__all__ = ["CONTROL_NAME", "HANDOVER_ENV", "HandedFds", "bus_name", "exec_in_place", "keep",
           "port_name", "restarts_so_far"]
