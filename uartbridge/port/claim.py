"""Taking a tty path for one link alone: what the path is, UUCP lock files, flock, TIOCEXCL.

The steps, in order, each before anything changes the port (``claim_tty``):

1. **What the path is.** Only a character device that is a terminal can be a port: a
   regular file, a directory, a FIFO, a socket, a block device, ``/dev/null`` or
   ``/dev/zero`` is refused (``PortError``, naming the path and what it is; at start the
   daemon exits 69). A missing path is ``PortUnavailableError`` (retried unless fail_fast).
2. **UUCP lock files**, as minicom, ser2net and lockdev write them: ``<lock_dir>/LCK..<name>``
   holding the holder's PID as ten ASCII characters and a newline (HDB UUCP). ``<name>`` is
   the last component of the device path (``ttyUSB0``; ``3`` for ``/dev/pts/3``) and, when the
   configured path is a link, of that path too; a lock under either name is honoured. A lock
   whose PID is dead is stale and removed; a live one refuses the port, naming the PID. Ours
   is created under the device's name atomically (a temporary file hard-linked into place,
   which fails if a lock appeared meanwhile) and removed at close if it still holds our PID.
   PIDs are recycled, so a lock older than a few seconds whose live PID has no fd on the port
   (where ``/proc/PID/fd`` can be read) is stale too.
   Where the directory is missing or not writable (a sandboxed unit: ``ProtectSystem=strict``
   makes ``/run/lock`` read-only unless ``ReadWritePaths=/run/lock``), existing locks are still
   honoured, ours is not created, and that is logged once per directory.
3. **open** ``O_RDWR|O_NOCTTY|O_NONBLOCK|O_CLOEXEC`` (never blocking on carrier, never a
   controlling terminal); not a terminal → refused as in 1.
4. **flock(LOCK_EX|LOCK_NB)**, what tio, picocom and pyserial's ``exclusive=True`` take. If
   someone holds it, its PID comes from ``/proc/locks`` (matched by device and inode).
5. **TIOCEXCL** on serial ports: further opens by non-root users fail with EBUSY while we
   hold it; cleared (TIOCNXCL) at close. Not on pty slaves: a pty's other end (socat) keeps
   the slave open, so the flag would outlive a crashed daemon there and refuse its restart
   (as a non-root user) until the peer restarts; flock and the lock file cover ptys.

**Adopting** a descriptor handed over by the previous run (``adopt_tty``): the fd must be a
terminal and the device the path names (same device number and node); the flock comes with it
(it belongs to the open file description, which the fd store or ``exec`` kept), TIOCEXCL is
still set (a tty flag, kept while the tty is open) and is set again; a UUCP lock file that
names the previous run (or a dead process) is rewritten with our PID, atomically; one that
names another live process is left alone and logged (we hold the port: it could not open it).

Every refusal is a ``PortUnavailableError`` (the holder may go away: the link retries)
raised from an ``OSError`` whose errno says what happened (EBUSY for a port in use), so the
link can log it once and give a hint (``failure_hint``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import os
import pwd
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PortError, PortUnavailableError
from .termios_ops import TermiosOps

OPEN_FLAGS = os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
_RETRY_ERRNOS = frozenset(  # open() errors that may pass: the link retries (else fatal)
    {errno.ENOENT, errno.ENXIO, errno.ENODEV, errno.EACCES, errno.EPERM, errno.EBUSY,
     errno.ENOTDIR, errno.ELOOP, errno.EIO, errno.EAGAIN}
)
_NOT_A_TERMINAL = {
    (1, 3): "/dev/null", (1, 5): "/dev/zero", (1, 7): "/dev/full", (1, 8): "/dev/random",
    (1, 9): "/dev/urandom",
}
_lock_dirs_reported: set[str] = set()  # "cannot create lock files here" is logged once each


def errno_name(err: int | None) -> str | None:
    """``EACCES`` for errno 13 (None for None or an unknown number)."""
    return None if err is None else errno.errorcode.get(err)


def _refused(path: str, what: str) -> PortError:
    return PortError(
        f"port {path} is {what}, not a serial port: a port is a tty (/dev/ttyUSB0, a "
        "/dev/serial/by-id link, a socat pty), pty:, rfc2217:// or socket://"
    )


def describe_non_port(path: str, info: os.stat_result) -> str | None:
    """What ``path`` is if it cannot be a port ("a regular file", "a FIFO"…), else None."""
    mode = info.st_mode
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a Unix socket"
    if stat.S_ISBLK(mode):
        return "a block device"
    if not stat.S_ISCHR(mode):
        return "not a device"
    known = _NOT_A_TERMINAL.get((os.major(info.st_rdev), os.minor(info.st_rdev)))
    if known is not None:
        return f"the character device {known}"
    return None


def check_port_path(path: str) -> os.stat_result:
    """Stat ``path`` (following links); refuse what cannot be a port (see the module doc)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise _unavailable(path, exc) from exc
    what = describe_non_port(path, info)
    if what is not None:
        raise _refused(path, what)
    return info


def _unavailable(path: str, exc: OSError) -> PortUnavailableError:
    """``cannot open PATH: Permission denied [EACCES]`` (retried by the link)."""
    name = errno_name(exc.errno)
    return PortUnavailableError(
        f"cannot open {path}: {exc.strerror or exc}" + (f" [{name}]" if name else "")
    )


def process_label(pid: int) -> str:
    """``PID 1234 (tio)``, or just ``PID 1234`` when /proc does not say."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as comm:
            name = comm.read().strip()
    except OSError:
        name = ""
    return f"PID {pid} ({name})" if name else f"PID {pid}"


def flock_holder(info: os.stat_result) -> int | None:
    """The PID holding a FLOCK on the file ``info`` describes, from /proc/locks, or None."""
    want = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1150 00:1a:3 0 EOF" ("->" marks a waiter)
                if (len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == want
                        and fields[4].isdigit()):
                    return int(fields[4])
    except OSError:
        return None
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


@dataclass(slots=True)
class UucpLock:
    """Our ``LCK..<name>`` file, if we created one (removed by ``release``)."""

    path: Path | None = None

    def release(self) -> None:
        """Remove our lock file if it still names us."""
        path, self.path = self.path, None
        if path is None:
            return
        with contextlib.suppress(OSError):
            if _read_lock_pid(path) == os.getpid():
                path.unlink()


def lock_names(path: str) -> list[str]:
    """``LCK..`` names for a port path: the device's own name first, then the given one."""
    names = [os.path.basename(os.path.realpath(path)), os.path.basename(path)]
    return [n for i, n in enumerate(names) if n and n not in names[:i]]


def _read_lock_pid(path: Path) -> int | None:
    """The PID in a lock file: ASCII (HDB) or a 4-byte binary int (old Kermit/UUCP)."""
    data = path.read_bytes()[:64]
    text = data.strip()
    if text.isdigit():
        return int(text)
    if len(data) == 4:
        return int.from_bytes(data, "little")
    return None


def take_uucp_lock(path: str, lock_dir: str | None, note: Callable[[str], None]) -> UucpLock:
    """Honour existing ``LCK..`` files for ``path`` and create ours (see the module doc).

    ``note`` gets what is worth logging (once per lock directory): ours cannot be created.
    """
    lock = UucpLock()
    if lock_dir is None:
        return lock
    directory = Path(lock_dir)
    names = lock_names(path)
    for name in names:
        _honour(directory / f"LCK..{name}", path)
    ours = directory / f"LCK..{names[0]}"
    writable = directory.is_dir() and os.access(directory, os.W_OK | os.X_OK)
    if not writable:
        if lock_dir not in _lock_dirs_reported:
            _lock_dirs_reported.add(lock_dir)
            note(
                f"{lock_dir} is missing or not writable: existing UUCP locks are honoured, "
                "ours are not created (under systemd: ReadWritePaths=/run/lock)"
            )
        return lock
    temp = directory / f"LTMP.{os.getpid()}.{names[0]}"
    try:
        _write_our_pid(temp)
        for _attempt in range(2):
            try:
                os.link(temp, ours)
                lock.path = ours
                break
            except FileExistsError:
                _honour(ours, path)  # raises unless it was stale (then it is gone: retry)
    except OSError as exc:
        if lock_dir not in _lock_dirs_reported:
            _lock_dirs_reported.add(lock_dir)
            note(f"cannot create {ours}: {exc.strerror or exc}; not locking it")
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()
    return lock


def _write_our_pid(path: Path) -> None:
    """A lock file's content as HDB UUCP writes it: our PID, ten characters, a newline."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, f"{os.getpid():10d}\n".encode("ascii"))
    finally:
        os.close(fd)


def _honour(lock_path: Path, port_path: str) -> None:
    """Refuse the port if ``lock_path`` names a live process; remove it if stale."""
    try:
        pid = _read_lock_pid(lock_path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise PortUnavailableError(
            f"port {port_path}: cannot read its lock file {lock_path}: {exc.strerror or exc}"
        ) from exc
    if pid is None or pid <= 0:
        raise PortUnavailableError(
            f"port {port_path} is locked by {lock_path}, which names no PID "
            "(remove it if no program uses the port)"
        ) from OSError(errno.EBUSY, "locked")
    if pid == os.getpid() and lock_path in _our_lock_paths():
        raise PortUnavailableError(
            f"port {port_path} is already used by this daemon (another [[uart]])"
        ) from OSError(errno.EBUSY, "locked")
    if pid != os.getpid() and _pid_alive(pid) and not _reused_pid(pid, lock_path, port_path):
        raise PortUnavailableError(
            f"port {port_path} is in use by {process_label(pid)} (lock file {lock_path})"
        ) from OSError(errno.EBUSY, "locked")
    # Stale: its process is gone (or it is a leftover with a recycled PID).
    with contextlib.suppress(FileNotFoundError):
        lock_path.unlink()


LOCK_SETTLE_S = 5.0  # a lock this young may belong to a program about to open the port


def _reused_pid(pid: int, lock_path: Path, port_path: str) -> bool:
    """A live ``pid`` that is not the lock's writer: the lock is older than LOCK_SETTLE_S and
    /proc shows the process has no fd on the port (PIDs are recycled: a holder that was
    killed leaves its lock behind). False whenever /proc cannot tell (another user's fds)."""
    try:
        if time.time() - lock_path.stat().st_mtime < LOCK_SETTLE_S:
            return False
        device = os.path.realpath(port_path)
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == device:
                return False
    return True


_held: dict[Path, int] = {}  # lock files this process holds (path → fd of the port)


def _our_lock_paths() -> set[Path]:
    return set(_held)


@dataclass(slots=True)
class Claim:
    """A tty taken for one link: its fd, whether it is a pty, and what to undo at close."""

    fd: int
    path: str
    pty: bool
    lock: UucpLock
    exclusive: bool = False

    def status(self) -> dict[str, Any]:
        """For ``status``: how the port is held."""
        return {
            "flock": True,
            "tiocexcl": self.exclusive,
            "lock_file": None if self.lock.path is None else str(self.lock.path),
        }

    def release(self, ops: TermiosOps) -> None:
        """Undo TIOCEXCL and remove our lock file (the fd is closed by its owner)."""
        if self.exclusive:
            with contextlib.suppress(OSError):
                ops.set_exclusive(self.fd, False)
            self.exclusive = False
        if self.lock.path is not None:
            _held.pop(self.lock.path, None)
        self.lock.release()


def claim_tty(
    path: str, ops: TermiosOps, *, lock_dir: str | None, note: Callable[[str], None]
) -> Claim:
    """Check, lock, open, flock and TIOCEXCL ``path`` (module doc); the caller owns the fd.

    ``note`` gets what is worth logging about lock files (see ``take_uucp_lock``).
    """
    check_port_path(path)
    lock = take_uucp_lock(path, lock_dir, note)
    try:
        try:
            fd = os.open(path, OPEN_FLAGS)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise _busy(path, exc) from exc
            if exc.errno in _RETRY_ERRNOS:
                raise _unavailable(path, exc) from exc
            raise PortError(f"cannot open {path}: {exc.strerror or exc}") from exc
        try:
            if not os.isatty(fd):
                raise _refused(path, "a character device that is not a terminal")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise _busy(path, exc, os.fstat(fd)) from exc
            except OSError:
                pass  # a filesystem without flock: TIOCEXCL and the lock file still apply
            claim = _exclusive_claim(fd, path, lock, ops)
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        lock.release()
        raise
    if lock.path is not None:
        _held[lock.path] = fd
    return claim



def _exclusive_claim(fd: int, path: str, lock: UucpLock, ops: TermiosOps) -> Claim:
    """The Claim on ``fd``, with TIOCEXCL on a serial port (not on a pty: it would outlive
    a crash while socat holds the slave)."""
    pty = ops.is_pty(fd)
    claim = Claim(fd=fd, path=path, pty=pty, lock=lock)
    if not pty:
        with contextlib.suppress(OSError):
            ops.set_exclusive(fd, True)
            claim.exclusive = True
    return claim

def adopt_tty(
    fd: int,
    path: str,
    ops: TermiosOps,
    *,
    lock_dir: str | None,
    note: Callable[[str], None],
    previous_pids: tuple[int, ...] = (),
) -> Claim:
    """Take over the tty open on ``fd`` (handed over by the previous run) as the claim of
    ``path``: ``PortError`` if ``fd`` is not that terminal (the caller then opens the path).

    ``previous_pids``: the PIDs whose UUCP lock files on this port are ours to take over
    (the run that handed the fd over; our own PID after ``exec``).
    """
    try:
        mine = os.fstat(fd)
        theirs = check_port_path(path)
    except OSError as exc:
        raise PortError(f"cannot check the handed-over descriptor of {path}: {exc}") from exc
    if not os.isatty(fd):
        raise PortError(f"the descriptor handed over for {path} is not a terminal")
    if (mine.st_rdev, mine.st_ino, mine.st_dev) != (theirs.st_rdev, theirs.st_ino, theirs.st_dev):
        raise PortError(
            f"the descriptor handed over is not {path} (device {os.major(mine.st_rdev)}:"
            f"{os.minor(mine.st_rdev)}, {path} is {os.major(theirs.st_rdev)}:"
            f"{os.minor(theirs.st_rdev)} now)"
        )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours already: a no-op on this OFD
    except BlockingIOError as exc:
        raise _busy(path, exc, mine) from exc
    except OSError:
        pass
    lock = take_over_uucp_lock(path, lock_dir, note, previous_pids)
    claim = _exclusive_claim(fd, path, lock, ops)
    if lock.path is not None:
        _held[lock.path] = fd
    return claim


def take_over_uucp_lock(
    path: str, lock_dir: str | None, note: Callable[[str], None], previous_pids: tuple[int, ...]
) -> UucpLock:
    """Our ``LCK..`` file for a port we already hold: one naming ``previous_pids`` or a dead
    process is replaced by ours (rename: never a moment without one); none is created."""
    lock = UucpLock()
    if lock_dir is None:
        return lock
    directory = Path(lock_dir)
    names = lock_names(path)
    for name in names:
        lock_path = directory / f"LCK..{name}"
        try:
            pid = _read_lock_pid(lock_path)
        except OSError:  # none (or unreadable): nothing to honour or replace
            continue
        if pid is not None and pid > 0 and pid != os.getpid() and pid not in previous_pids \
                and _pid_alive(pid):
            note(f"{lock_path} names {process_label(pid)}, which cannot have the port (this "
                 "daemon holds it since before its restart): left alone")
            return lock
        if name != names[0]:
            with contextlib.suppress(OSError):
                lock_path.unlink()  # the link name's lock: ours is under the device's name
    ours = directory / f"LCK..{names[0]}"
    if not (directory.is_dir() and os.access(directory, os.W_OK | os.X_OK)):
        return take_uucp_lock(path, lock_dir, note)  # logs "not writable" once, honours others
    temp = directory / f"LTMP.{os.getpid()}.{names[0]}"
    try:
        _write_our_pid(temp)
        os.replace(temp, ours)
        lock.path = ours
    except OSError as exc:
        note(f"cannot take over {ours}: {exc.strerror or exc}; not locking it")
        with contextlib.suppress(OSError):
            temp.unlink()
    return lock


def _busy(path: str, exc: OSError, info: os.stat_result | None = None) -> PortUnavailableError:
    """The port is in use: name the holder where /proc/locks or a lock file can tell."""
    if info is None:
        with contextlib.suppress(OSError):
            info = os.stat(path)
    holder = flock_holder(info) if info is not None else None
    how = "flock" if isinstance(exc, BlockingIOError) else "TIOCEXCL"
    who = process_label(holder) if holder is not None else "another program"
    return PortUnavailableError(f"port {path} is in use by {who} ({how}) [EBUSY]")


def failure_hint(path: str, err: int | None) -> str | None:
    """A hint for an operator when opening ``path`` failed with ``err`` (None: no hint)."""
    if err in (errno.EACCES, errno.EPERM):
        return _permission_hint(path)
    if err == errno.EBUSY:
        return "stop the program holding the port, or point this UART at another port"
    if err in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return "is the adapter plugged in (or socat running)? the daemon reopens it when it appears"
    return None


def _permission_hint(path: str) -> str:
    user = _user_name(os.geteuid())
    try:
        info = os.stat(path)
    except OSError:
        return f"user {user} may not open {path}: check its permissions"
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = str(info.st_gid)
    where = f"{path} is {_user_name(info.st_uid)}:{group} {stat.S_IMODE(info.st_mode):04o}"
    in_group = info.st_gid == os.getegid() or info.st_gid in os.getgroups()
    if info.st_mode & stat.S_IRGRP and info.st_mode & stat.S_IWGRP and not in_group:
        return (
            f"{where} and user {user} is not in group {group}: add it "
            f"(usermod -aG {group} {user}; under systemd: SupplementaryGroups={group})"
        )
    return f"{where}; user {user} may not open it for reading and writing"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
