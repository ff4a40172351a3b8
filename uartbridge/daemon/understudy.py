"""The understudy: ``uartbridge restart`` with the guest never waiting for a start-up.

An ``exec`` in place (``handover.exec_in_place``) keeps the PID and every descriptor, but the
guest waits while the new interpreter starts and imports (~300 ms). So the restart is split
in two handovers of one protocol, over one ``socketpair`` (``SOCK_SEQPACKET``: one message
per record, descriptors with ``SCM_RIGHTS``):

1. The running daemon O spawns S, the same command line with ``$UARTBRIDGE_UNDERSTUDY``
   naming its end of the pair. S imports everything, reads and validates the config, says
   ``ready`` and waits. If S fails (bad config, import error, exits, no ``ready`` within
   ``READY_TIMEOUT_S``) the restart is abandoned and O serves on (its reply says why).
2. O quiesces and writes its final checkpoint to disk as for a stop, then sends S a
   ``handover``: each UART's checkpoint in a sealed memfd (``checkpoint.<uart>``) and the
   descriptors an ``exec`` would keep (``port.<uart>``, ``bus.<uart>``, ``control``…, and
   ``lock``, the state directory's flock), by the names ``handover`` gives them. S resumes
   from the memfds (read by the same validating reader as a file) and serves.
3. O ``exec``\\ s itself keeping its end of the pair (``understudy`` in ``$LISTEN_FDS``, S's
   PID in ``$UARTBRIDGE_UNDERSTUDY_PID``) and, untouched until S is gone, its own copies of
   the ports and listeners (``without_state``). The new run asks ``give``; S quiesces, writes
   its checkpoint to disk, sends a ``handover`` back the same way and exits 0 (the copies of
   what S handed back are closed: ``HandedFds.close_rest``). If S dies first, the new run
   resumes from the disk with its copies: nothing is closed.

S is never the main PID: it has no ``$NOTIFY_SOCKET`` (no READY, no fd store), writes no
``daemon.running``, unlinks no socket or pty link, and leaves SIGTERM/SIGINT to the main
process (which takes the state back before it stops).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
from typing import Any

from ..errors import UartBridgeError

UNDERSTUDY_ENV = "UARTBRIDGE_UNDERSTUDY"  # in S: its end of the socketpair
UNDERSTUDY_PID_ENV = "UARTBRIDGE_UNDERSTUDY_PID"  # in the new main run: S's PID
SOCKET_NAME = "understudy"  # the pair's end in the new main run's $LISTEN_FDS
LOCK_NAME = "lock"  # the state directory's lock (flock follows the open file)
READY_TIMEOUT_S = 20.0  # below the control client's 30 s: its reply says why
GIVE_TIMEOUT_S = 60.0  # S's quiesce + final checkpoint (a slow disk)
MAX_MESSAGE = 1 << 16
MAX_FDS = 250  # SCM_RIGHTS carries at most 253 per message
# Environment a child must not inherit: it is not the service manager's main process.
_NOT_FOR_S = ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "LISTEN_PID", "LISTEN_FDS",
              "LISTEN_FDNAMES", "LISTEN_PIDFDID", "UARTBRIDGE_HANDOVER", UNDERSTUDY_PID_ENV)


class HandoverError(UartBridgeError):
    """The other side of the understudy pair failed, left, or sent something malformed."""


def checkpoint_name(uart: str) -> str:
    """The name of a UART's checkpoint memfd in a handover."""
    return f"checkpoint.{uart}"


def without_state(kept: list[tuple[str, int]], *, close: bool = True) -> list[tuple[str, int]]:
    """``kept`` without what only an understudy takes (the lock, the checkpoint memfds):
    what an exec hands the next run. ``close``: those are closed here."""
    state = [(name, fd) for name, fd in kept
             if name == LOCK_NAME or name.startswith(checkpoint_name(""))]
    if close:
        for _name, fd in state:
            os.close(fd)
    return [entry for entry in kept if entry not in state]


def memfd_with(data: bytes) -> int:
    """A sealed memfd holding ``data`` (close-on-exec): nobody can change it once sent."""
    fd = os.memfd_create("uartbridge-checkpoint", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK
                    | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fd_path(fd: int) -> str:
    """A path that opens ``fd``'s file anew (for ``read_checkpoint``: the file reader)."""
    return f"/proc/self/fd/{fd}"


def send(sock: socket.socket, msg: str, fds: list[tuple[str, int]] | None = None,
         **fields: Any) -> None:
    """One message: a JSON header (``msg``, ``names`` of the fds, ``fields``) and the fds.
    More fds than one message carries (a group of many UARTs) go first in ``part`` records,
    which ``receive`` joins."""
    named = fds or []
    parts = [named[i:i + MAX_FDS] for i in range(0, len(named), MAX_FDS)] or [[]]
    try:
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            header = json.dumps({"msg": msg if last else "part",
                                 "names": [name for name, _fd in part],
                                 **(fields if last else {})})
            if part:
                socket.send_fds(sock, [header.encode()], [fd for _name, fd in part])
            else:
                sock.sendall(header.encode())
    except OSError as exc:
        raise HandoverError(f"understudy pair: cannot send {msg!r}: {exc.strerror or exc}") \
            from exc


def receive(sock: socket.socket) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """The next message: its header and its fds by name (``part`` records joined).
    ``HandoverError`` when the other side has gone (EOF) or sent something this side does
    not understand (every fd received closed)."""
    got: list[tuple[str, int]] = []
    try:
        while True:
            header, fds = _receive_one(sock)
            got += fds
            if header["msg"] != "part":
                return header, got
    except BaseException:
        for _name, fd in got:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise


def _receive_one(sock: socket.socket) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    try:
        data, fds, flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    except OSError as exc:
        raise HandoverError(f"understudy pair: {exc.strerror or exc}") from exc
    try:
        if not data and not fds:
            raise HandoverError("understudy pair: the other side has gone")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise HandoverError("understudy pair: message truncated")
        try:
            header = json.loads(data)
        except ValueError as exc:
            raise HandoverError("understudy pair: not a JSON header") from exc
        names = header.get("names") if isinstance(header, dict) else None
        if (not isinstance(header.get("msg"), str) or not isinstance(names, list)
                or len(names) != len(fds) or not all(isinstance(n, str) for n in names)):
            raise HandoverError("understudy pair: malformed header")
    except HandoverError:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    for fd in fds:
        os.set_inheritable(fd, False)
    return header, list(zip(names, fds, strict=True))


def spawn() -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start S (this command line, the config re-read, the code on disk now); returns it and
    our end of the pair. ``OSError`` if it cannot be started at all."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        env = {k: v for k, v in os.environ.items() if k not in _NOT_FOR_S}
        env[UNDERSTUDY_ENV] = str(theirs.fileno())
        sys.stdout.flush()
        sys.stderr.flush()
        proc = subprocess.Popen([sys.executable, *sys.orig_argv[1:]], env=env,
                                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()  # S has it: EOF on ours once S exits
    return proc, ours


def wait_ready(sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
    """Block until S says ``ready``; ``HandoverError`` saying why it will not (blocking: run
    it off the event loop)."""
    sock.settimeout(READY_TIMEOUT_S)
    try:
        header, fds = receive(sock)
    except TimeoutError:
        raise HandoverError(f"the new run was not ready within {READY_TIMEOUT_S:g} s") from None
    except HandoverError:
        code = proc.wait(5)
        raise HandoverError(f"the new run exited (code {code}) before it was ready") from None
    finally:
        sock.settimeout(None)
    for _name, fd in fds:
        os.close(fd)
    if header["msg"] == "failed":
        proc.wait(5)
        raise HandoverError(f"the new run refused to start: {header.get('error')}")
    if header["msg"] != "ready":
        raise HandoverError(f"the new run said {header['msg']!r}, not 'ready'")


def reap(pid: int) -> int | None:
    """Wait for S to exit (it does right after handing back); its exit status."""
    try:
        _pid, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status)


def my_pair() -> socket.socket | None:
    """In S: its end of the pair (``$UARTBRIDGE_UNDERSTUDY``, removed), or None."""
    value = os.environ.pop(UNDERSTUDY_ENV, None)
    if value is None:
        return None
    try:
        fd = int(value)
        os.set_inheritable(fd, False)
        return socket.socket(fileno=fd)
    except (ValueError, OSError):
        return None


def report_failure(message: str) -> None:
    """In S that cannot start (bad config…): tell O why, so that its reply can say it."""
    sock = my_pair()
    if sock is None:
        return
    with contextlib.suppress(HandoverError), sock:
        send(sock, "failed", error=message)


__all__ = ["GIVE_TIMEOUT_S", "LOCK_NAME", "MAX_FDS", "SOCKET_NAME", "UNDERSTUDY_ENV",
           "UNDERSTUDY_PID_ENV", "HandoverError", "checkpoint_name", "fd_path", "memfd_with",
           "my_pair", "reap", "receive", "report_failure", "send", "spawn", "wait_ready",
           "without_state"]
