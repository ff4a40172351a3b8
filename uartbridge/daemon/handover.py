"""Descriptors that outlive the daemon: handed to the next run in place, or to systemd.

One way back in serves both: the next run finds them as ``$LISTEN_FDS``/``$LISTEN_FDNAMES``
(``sdnotify.listen_fds``), whoever kept them.

- ``uartbridge restart`` (in place, no service manager needed): the daemon takes its final
  checkpoint, keeps its port descriptors and its listening sockets (bus, control) open,
  moves them to fds 3… and ``exec``\\ s itself with the same command line, the same PID, and
  ``$LISTEN_PID``/``$LISTEN_FDS``/``$LISTEN_FDNAMES`` set as systemd would, plus
  ``$UARTBRIDGE_HANDOVER`` (how many in-place restarts so far): the next run resumes from
  the state directory's newest checkpoint whatever ``[checkpoint] resume`` says.
  That exec alone is the fallback: ``uartbridge restart`` normally goes through an
  understudy (``understudy``), which takes these same descriptors, by these names, over a
  socketpair while the exec runs, and hands them back.
- Under systemd each open port's descriptor goes to the fd store (``FDSTORE=1``, see
  ``sdnotify``), which hands it back at the next start of the unit.

- A socket unit (``systemd/uartbridge@.socket``) hands the bus and control listeners at
  every start; the daemon takes them by address and never unlinks or rebinds them.

Names: ``port.<uart>`` (the open port: tty, an owned pty's master, a ``socket://``
connection), ``bus.<uart>`` (the bus's listening Unix socket), ``bus-tcp.<uart>`` (its TCP
listeners, also kept in the fd store), ``control``, ``listener`` (a socket unit's).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
from typing import Any, NoReturn

from ..sockets import ListenAddress, adopt_listener, probe_listener
from . import sdnotify

HANDOVER_ENV = "UARTBRIDGE_HANDOVER"
CONTROL_NAME = "control"
# The FileDescriptorName= of the shipped socket units, and the name an in-place restart
# hands on a listener that came from one (the next run then matches it by address, and
# leaves its socket file alone at stop: systemd made it, systemd removes it).
LISTENER_NAME = "listener"


def port_name(uart: str) -> str:
    """The name of a UART's port descriptor."""
    return f"port.{uart}"


def bus_name(uart: str) -> str:
    """The name of a UART's listening bus socket."""
    return f"bus.{uart}"


def bus_tcp_name(uart: str) -> str:
    """The name of a UART's listening TCP bus socket(s) in the fd store."""
    return f"bus-tcp.{uart}"


def restarts_so_far() -> int:
    """How many in-place restarts led to this run (0: none), from ``$UARTBRIDGE_HANDOVER``;
    the variable is removed so that no child sees it."""
    try:
        return max(0, int(os.environ.pop(HANDOVER_ENV, "0")))
    except ValueError:
        return 0


class HandedFds:
    """The descriptors this run was handed, by name (``take`` them; ``close_rest``).

    Listening sockets are taken with ``take_listener``, by the address they must listen at:
    the one named for that role if there is one (``bus.<uart>``, ``control``: from our own
    in-place restart), else any handed descriptor that listens there (a socket unit's, named
    by its ``FileDescriptorName=``, or a TCP listener kept in the fd store, ``bus-tcp.<uart>``).
    """

    def __init__(self, fds: list[tuple[str, int]]) -> None:
        self._fds: list[tuple[str, int]] = list(fds)  # in order: the newest of a name last
        self._stale: list[tuple[str, int]] = []  # older ones of a name taken (for close_rest)
        self.taken: list[str] = []  # the names taken so far
        self.stored: set[str] = set()  # names this run put in the fd store anew
        self._taken_files: set[tuple[int, int]] = set()  # (st_dev, st_ino) of those taken

    @classmethod
    def from_environment(cls) -> HandedFds:
        """What ``$LISTEN_FDS`` hands to this process (systemd's fd store, or our exec)."""
        return cls(sdnotify.listen_fds())

    def add(self, fds: list[tuple[str, int]]) -> None:
        """More descriptors handed to this run (an understudy's, after ``$LISTEN_FDS``)."""
        self._fds += fds

    def _pop(self, index: int) -> int:
        name, fd = self._fds.pop(index)
        self.taken.append(name)
        with contextlib.suppress(OSError):
            self._taken_files.add(_file_of(fd))
        return fd

    def take(self, name: str) -> int | None:
        """The descriptor named ``name`` (the caller owns it from now on), or None. If the
        store had two of that name the newest is taken (``close_rest`` closes the other)."""
        indexes = [i for i, (found, _fd) in enumerate(self._fds) if found == name]
        if not indexes:
            return None
        fd = self._pop(indexes[-1])
        self._stale += [self._fds[i] for i in indexes[:-1]]
        self._fds = [entry for i, entry in enumerate(self._fds) if i not in indexes[:-1]]
        return fd

    def take_listener(
        self, address: ListenAddress, *, name: str | None, log: Any
    ) -> tuple[socket.socket, str] | None:
        """A handed listening socket for ``address`` and the name it was handed under, or
        None (then bind one). The one named ``name`` is checked (``listener_mismatch``): a
        mismatch is logged, the descriptor closed, and None returned. Without one named so,
        the first handed descriptor listening at ``address`` is taken, whatever its name."""
        if name is not None:
            fd = self.take(name)
            if fd is not None:
                sock, why = adopt_listener(fd, address)
                if sock is None:
                    log.warning("listener.handover_refused", name=name, reason=why,
                                hint="binding it anew")
                    return None
                return sock, name
        for index, (found, fd) in enumerate(self._fds):
            if probe_listener(fd, address):
                sock, _why = adopt_listener(self._pop(index), address)
                if sock is not None:
                    return sock, found
        return None

    def close_rest(self, log: Any) -> None:
        """Close what nobody took (a UART no longer configured, a socket unit's socket the
        config does not name…), naming each in the log; drop it from the fd store."""
        for name, fd in [*self._stale, *self._fds]:
            try:
                copy = _file_of(fd) in self._taken_files
            except OSError:
                copy = False
            if copy:  # the same file as one taken (after an understudy's hand-back)
                with contextlib.suppress(OSError):
                    os.close(fd)
                continue
            log.warning("handed-over descriptor not used; closed", name=name)
            # FDSTOREREMOVE drops every fd of the name: not one this run stored again.
            mine = name in self.taken or name in self.stored
            if sdnotify.available() and sdnotify.valid_fd_name(name) and not mine:
                sdnotify.remove_fd(name)
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._stale.clear()


def _file_of(fd: int) -> tuple[int, int]:
    """What ``fd`` refers to: two descriptors of one socket, tty or pty master agree."""
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def keep(fds: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Duplicates of ``fds`` above every open descriptor (close-on-exec until ``exec_in_place``
    moves them): closing the originals then closes nothing the next run needs."""
    try:
        highest = max(int(entry) for entry in os.listdir("/proc/self/fd"))
    except (OSError, ValueError):
        highest = 1024
    return [(name, fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, highest + 1)) for name, fd in fds]


def exec_in_place(kept: list[tuple[str, int]], restarts: int) -> NoReturn:
    """Move ``kept`` (from ``keep``) to fds 3… and exec this same command line with
    ``$LISTEN_*`` naming them. Raises ``OSError`` only if the exec itself fails."""
    names = [name for name, _fd in kept]
    for index, (_name, fd) in enumerate(kept):
        # dup2 targets are all below every kept duplicate (``keep`` put them higher); the
        # target inherits across exec (os.dup2 makes it inheritable).
        os.dup2(fd, sdnotify.SD_LISTEN_FDS_START + index)
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


__all__ = ["CONTROL_NAME", "HANDOVER_ENV", "LISTENER_NAME", "HandedFds", "bus_name",
           "bus_tcp_name", "exec_in_place", "keep", "port_name", "restarts_so_far"]
