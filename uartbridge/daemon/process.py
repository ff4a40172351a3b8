"""The daemon shell: UART services, the control socket, signals, timers and sd_notify.

Life cycle (uvicorn's ``server.py`` is the model):

1. **Lock.** Before anything else the daemon takes ``flock`` on ``<state_dir>/daemon.lock``
   (which holds its PID): a second daemon on the same state directory is refused (exit 75,
   naming the holder) before it looks at, or writes, anything there.
2. **Start.** A marker ``daemon.running`` (0600) says "a daemon is running here": finding it
   means the previous one died without its final checkpoint, and the age of the state we
   resume from is logged and reported as what a crash may have lost. Every UART resumes from
   its newest valid checkpoint (``[checkpoint] resume = "auto"``; an emergency copy in the
   runtime directory counts when it is newer), and all of them open their ports at the same
   time (a slow ``rfc2217://`` delays nobody else). Then the control socket listens and
   systemd hears READY=1.
3. **Serve** until SIGTERM/SIGINT or ``checkpoint --stop``. SIGHUP re-reads the config:
   what can change live (logging, the ``[checkpoint]`` table) is applied, the rest is named
   in a warning as needing a restart; a bad file changes nothing.
4. **Stop.** Quiesce each port, write each UART's final checkpoint (``on_stop``), close
   everything, remove the marker, exit 0. A final checkpoint the state directory refuses
   (full, read-only, I/O error) is written to ``<runtime_dir>/emergency/`` instead, logged
   as an error naming both paths and the reason, and retried for ``stop_retry_s`` (systemd's
   stop timeout is extended meanwhile); if the state directory never takes it the daemon
   exits 73 (cannot create) or 74 (I/O error) and leaves the marker. Sockets and pty links
   are removed in every case. A second signal ends the retry (or, before the final checkpoint
   was written, skips it: exit 70); a third exits at once.

Periodic checkpoints and the control socket's ``checkpoint`` are written by one writer thread
(the snapshot is taken on the loop, between two bus operations; encoding, writing and the
fsyncs are not, so a slow disk stalls no UART); the final checkpoint is written on the loop,
after the write in flight, so it lands last. Writes on the loop take their file descriptors
from a small reserve held open for them, so a storm of connections that uses up the
descriptor limit cannot stop them (a thread's write refused for want of descriptors is redone
there).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

from .. import __version__, buildinfo, eventloop, logs
from ..checkpoint import (
    Checkpoint,
    checkpoint_path,
    encode,
    latest_checkpoint,
    read_checkpoint,
)
from ..config import Config
from ..errors import (
    EX_OK,
    EX_SOFTWARE,
    CheckpointError,
    CheckpointWriteError,
    ConfigError,
    DaemonRunningError,
    DaemonStoppingError,
    StateDirError,
    UartBridgeError,
    exit_code_for_os_error,
)
from ..logs import get_logger
from ..paths import emergency_dir
from ..record import RecordWriter
from ..sockets import default_peer_allowed, ensure_private_dir
from . import handover, understudy
from . import sdnotify as _sdnotify
from .control_server import ControlServer
from .service import NS_PER_S, UartService

RUNNING_MARKER = "daemon.running"
LOCK_FILE = "daemon.lock"
# File descriptors a checkpoint write needs (temp file, directory fsync, scandir, reading
# the previous file) and that are kept free for it.
FD_RESERVE = 4
STOP_RETRY_INTERVAL_S = 1.0
# Held pending across the exec of a restart, so that a stop signal waits for the new run
# (after an understudy's handover, until it has taken the state back; then it stops normally).
HANDOVER_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
# A repeated event-loop error (EMFILE on accept…) is logged at most this often.
LOOP_ERROR_INTERVAL_S = 10.0


def _block_handover_signals() -> None:
    """Every helper thread's first act: the kernel gives a process-directed signal to any
    thread that does not block it, and one a helper took while the main thread held them
    across an exec was gone with the old image (signal(7)). Only the main thread takes them."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDOVER_SIGNALS)


def _helper_threads(prefix: str, max_workers: int | None = None) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=prefix,
                              initializer=_block_handover_signals)


class FdReserve:
    """A few descriptors held open on /dev/null, released for the length of a write.

    The event loop runs one callback at a time, so nothing can take the freed numbers
    between ``released()`` and the write inside it.
    """

    def __init__(self, count: int = FD_RESERVE) -> None:
        self._count = count
        self._fds: list[int] = []
        self.refill()

    def refill(self) -> None:
        """Open descriptors until the reserve is full again (as many as the limit allows)."""
        while len(self._fds) < self._count:
            try:
                self._fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """Close the reserve for the body; refill it afterwards."""
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        try:
            yield
        finally:
            self.refill()

    def close(self) -> None:
        """Close every reserved descriptor."""
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


def ensure_standard_fds() -> None:
    """Open /dev/null on any of fds 0-2 that is closed, so that no socket or port we open
    later gets number 2 and receives our log lines."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def lock_state_dir(state_dir: Path) -> int:
    """Take the daemon's lock on ``state_dir``; returns the fd that holds it (kept open).

    ``DaemonRunningError`` (75) naming the holder's PID when another daemon has it;
    ``StateDirError`` (73/74) when the lock file cannot be created or written.
    """
    path = state_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise StateDirError(
            f"state directory {state_dir}: cannot open {LOCK_FILE}: {exc.strerror}",
            exit_code=exit_code_for_os_error(exc),
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise DaemonRunningError(
            f"another uartbridge (pid {holder}) is running on state directory {state_dir}; "
            "refusing to start a second one"
        ) from exc
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as exc:
        os.close(fd)
        raise StateDirError(
            f"state directory {state_dir}: cannot write {LOCK_FILE}: {exc.strerror}",
            exit_code=exit_code_for_os_error(exc),
        ) from exc
    return fd


def _write_marker(path: Path) -> None:
    """``daemon.running`` with our PID, mode 0600 (``StateDirError`` if it cannot be written)."""
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StateDirError(
            f"state directory {path.parent}: cannot write {path.name}: {exc.strerror}",
            exit_code=exit_code_for_os_error(exc),
        ) from exc


class Daemon:
    """One daemon process serving the UARTs of one config."""

    def __init__(
        self,
        config: Config,
        *,
        resume: dict[str, tuple[Checkpoint, Path]] | None = None,
        reload: Callable[[], Config] | None = None,
        log_overrides: dict[str, str] | None = None,
        record: Path | None = None,
    ) -> None:
        self.config = config
        self.record_path = record  # --record: every UART's inputs go to this one file
        self._recorder: RecordWriter | None = None
        self.log_overrides = log_overrides or {}
        self.log = get_logger()
        self.explicit_resume = resume or {}
        self._reload_config = reload  # () -> Config, for SIGHUP; None: reload not possible
        self.services: dict[str, UartService] = {}
        self.control: ControlServer | None = None
        self.stop_event = asyncio.Event()
        self.stopped_by_request = False
        self.crashed_before = False
        self.started_mono_ns = time.monotonic_ns()
        self._lock_fd: int | None = None
        self._marker_written = False
        self._fd_reserve: FdReserve | None = None
        self._signals = 0
        self._final_written = False
        self._stop_task: asyncio.Task[int] | None = None
        self._final_task: asyncio.Task[dict[str, Any]] | None = None
        self._retry_wakeup = asyncio.Event()
        self._periodic: asyncio.Task[None] | None = None
        self._periodic_errors: dict[str, str] = {}
        # Checkpoint writes: one thread, and the one write in flight (see ``_write``).
        self._writer = _helper_threads("checkpoint", max_workers=1)
        self._in_flight: asyncio.Task[Path] | None = None
        self._emergency: set[str] = set()  # UARTs with an emergency copy on disk
        self._unsaved: dict[str, tuple[Checkpoint, CheckpointWriteError]] = {}
        self._loop_errors: dict[str, tuple[float, int]] = {}
        # In-place restarts (``uartbridge restart``): how many led to this run; requested?
        self.restarts = handover.restarts_so_far()
        self._restart_prepared = False
        self._restart_requested = False
        self._handing_over = False
        # The understudy (``understudy``): in S, its pair to the main process; in the main
        # process, the S spawned for a restart under way.
        self._pair = understudy.my_pair()
        self.is_understudy = self._pair is not None
        self._main_pid = os.getpid()
        self._spawning = False
        self._understudy: tuple[subprocess.Popen[bytes], socket.socket] | None = None
        self._give_requested = False
        self._orphaned = False
        self._handed: handover.HandedFds | None = None
        self._pair_task: asyncio.Task[None] | None = None

    # -- start ----------------------------------------------------------------------------

    def _handed_checkpoint(self, name: str) -> tuple[Checkpoint, Path] | None:
        """The checkpoint an understudy handover carried in a memfd, read by the file
        reader (``read_checkpoint``: the same validation); a bad one is refused, logged,
        and the state directory's (written by the same handover) is used instead."""
        fd = None if self._handed is None else self._handed.take(understudy.checkpoint_name(name))
        if fd is None:
            return None
        try:
            ckpt = read_checkpoint(understudy.fd_path(fd))
            return ckpt, checkpoint_path(self.config.daemon.state_dir, name)
        except CheckpointError as exc:
            self.log.warning("handover checkpoint refused; resuming from the state directory",
                             uart=name, problem=str(exc))
            return None
        finally:
            os.close(fd)

    def _resume_source(self, name: str) -> tuple[Checkpoint | None, Path | None]:
        in_memory = self._handed_checkpoint(name)
        if in_memory is not None:
            return in_memory
        if self.restarts and name in self.explicit_resume:
            # An in-place restart resumes from the checkpoint it just wrote, not from the
            # file `uartbridge resume FILE` named at the first start.
            pass
        elif name in self.explicit_resume:
            ckpt, path = self.explicit_resume[name]
            return ckpt, path
        if self.config.checkpoint.resume != "auto" and not self.restarts:
            return None, None
        problems: list[str] = []
        found = latest_checkpoint(self.config.daemon.state_dir, name, problems=problems)
        emergency = self._emergency_source(name)
        if emergency is not None and (
            found is None or emergency[0].meta.generation > found[0].meta.generation
        ):
            self.log.warning(
                "resuming from an emergency copy (the state directory refused the last one)",
                uart=name,
                path=str(emergency[1]),
            )
            return emergency
        if found is None and problems:
            # Starting afresh would silently throw the saved device away (docs/design.md rule 4).
            raise CheckpointError(
                f"{name}: no valid checkpoint in {self.config.daemon.state_dir}: "
                + "; ".join(problems)
                + ' (move the files away, or set [checkpoint] resume = "never")'
            )
        for problem in problems:
            self.log.warning("skipped an invalid checkpoint", uart=name, problem=problem)
        return found if found is not None else (None, None)

    def _emergency_source(self, name: str) -> tuple[Checkpoint, Path] | None:
        directory = emergency_dir(self.config.daemon.runtime_dir)
        if not directory.is_dir():
            return None
        problems: list[str] = []
        found = latest_checkpoint(directory, name, problems=problems)
        for problem in problems:
            self.log.warning("skipped an invalid emergency copy", uart=name, problem=problem)
        if found is not None:
            self._emergency.add(name)
        return found

    async def start(self, handed: handover.HandedFds | None = None) -> None:
        """Lock the state directory, resume or create every UART, open ports, listen.

        ``handed``: what the previous run (or an understudy) handed over; by default what
        ``$LISTEN_FDS`` holds. With the state directory's lock among it (``lock``: the
        understudy's handovers) the lock is kept, not taken anew, and the marker is not
        a crash's: the previous holder handed over."""
        daemon_cfg = self.config.daemon
        state_dir = daemon_cfg.state_dir
        if handed is None:
            handed = handover.HandedFds.from_environment()
        self._handed = handed
        ensure_private_dir(state_dir, mode=0o700, error=StateDirError, what="state directory")
        marker = state_dir / RUNNING_MARKER
        self._lock_fd = handed.take(understudy.LOCK_NAME)
        if self._lock_fd is None:
            self._lock_fd = lock_state_dir(state_dir)
            self.crashed_before = marker.exists()
        if not self.is_understudy:  # S never writes nor removes the marker
            _write_marker(marker)
            self._marker_written = True
        self._fd_reserve = FdReserve()
        ensure_private_dir(daemon_cfg.runtime_dir, group=daemon_cfg.socket_gid)
        peer_allowed = default_peer_allowed(daemon_cfg.socket_gid)
        if self.record_path is not None:
            self._recorder = RecordWriter(
                self.record_path,
                on_error=lambda message: self.log.error("recording stopped", reason=message),
            )
            self.log.info("recording", path=str(self.record_path))
        for uart_cfg in self.config.uarts:
            ckpt, path = self._resume_source(uart_cfg.name)
            service = UartService(
                uart_cfg,
                state_dir=state_dir,
                keep_previous=self.config.checkpoint.keep_previous,
                log=self.log,
                peer_allowed=peer_allowed,
                resume_from=ckpt,
                resumed_path=path,
                record=self._recorder,
            )
            self.services[uart_cfg.name] = service
            if ckpt is not None:
                age_s = (time.time_ns() - ckpt.meta.created_unix_ns) / NS_PER_S
                log = service.log.warning if self.crashed_before else service.log.info
                log(
                    "resumed from checkpoint",
                    path=str(path),
                    generation=ckpt.meta.generation,
                    age_s=round(age_s, 3),
                    after_crash=self.crashed_before,
                )
        # All ports at once: one that takes seconds to answer delays no other UART.
        results = await asyncio.gather(
            *(
                s.start(fail_fast=daemon_cfg.fail_fast, socket_gid=daemon_cfg.socket_gid,
                        handed=handed)
                for s in self.services.values()
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        self.control = ControlServer(
            self,
            daemon_cfg.control_socket,
            peer_allowed=peer_allowed,
            group=daemon_cfg.socket_gid,
        )
        taken = handed.take_listener(daemon_cfg.control_socket, name=handover.CONTROL_NAME,
                                     log=self.log)
        if taken is None:
            await self.control.start()
        else:
            await self.control.start(taken[0], owned=taken[1] == handover.CONTROL_NAME)
        handed.close_rest(self.log)
        if self.restarts:
            self.log.info("restarted in place", restarts=self.restarts,
                          handed_over=sorted(handed.taken))
        self._warn_of_a_small_fd_store()

    def _warn_of_a_small_fd_store(self) -> None:
        """Say at start when systemd's fd store cannot keep every port and TCP bus listener:
        the next ``systemctl restart`` closes what did not fit. systemd >= 254 sets
        ``$FDSTORE`` to a non-zero ``FileDescriptorStoreMax=`` (systemd.exec(5)); 252 never
        does, and an unset or zero limit leaves it unset, so only a small store is seen."""
        limit = _sdnotify.fd_store_limit()
        needed = sum(s.fd_store_slots for s in self.services.values())
        if _sdnotify.available() and limit is not None and limit < needed:
            self.log.warning(
                "fd store too small", limit=limit, needed=needed,
                hint="a systemctl restart closes and reopens the ports it cannot keep: DTR "
                "stays (HUPCL is off) but bytes the far end sends meanwhile can be lost; "
                "raise FileDescriptorStoreMax= (the shipped units say 512)",
            )

    # -- run ------------------------------------------------------------------------------

    async def run(self) -> int:
        """Start, serve until asked to stop, stop. Returns the exit code."""
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._on_loop_error)
        loop.set_default_executor(_helper_threads("daemon"))
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        code = EX_SOFTWARE
        started = False
        watchdog: asyncio.Task[None] | None = None
        try:
            if self.is_understudy:
                handed = await self._await_handover()
                if handed is None:
                    return EX_OK
            else:
                handed = await self._take_back()
            await self.start(handed)
            started = True
            # Stop signals held across an understudy's exec are delivered now (handled).
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDOVER_SIGNALS)
            if self.is_understudy:
                self._pair_task = asyncio.create_task(self._serve_pair())
            else:
                self._announce()
            self._periodic = asyncio.create_task(self._periodic_checkpoints())
            interval = _sdnotify.watchdog_interval_s() if self.config.daemon.watchdog else None
            if interval:
                watchdog = asyncio.create_task(self._watchdog(interval))
            await self.stop_event.wait()
            for task in (self._periodic, watchdog):
                if task is not None:
                    task.cancel()
            if self._give_requested:
                await self._hand_back()
            if self._restart_requested:
                await self._restart_in_place()  # returns only if the restart cannot be done
            _sdnotify.stopping()
            self._stop_task = asyncio.create_task(self._stop_sequence())
            try:
                code = await self._stop_task
            except asyncio.CancelledError:
                self.log.warning("second signal: exiting without a final checkpoint")
                code = EX_SOFTWARE
        finally:
            for task in (self._periodic, watchdog):
                if task is not None:
                    task.cancel()
            await self._close_all()
            await self._writes_finished()  # after the control socket: no new write comes
            # A start that failed is no crash: leave the marker only if one was there.
            self._finish_files(code if started or self.crashed_before else EX_OK)
        self.log.info("stopped", exit_code=code, log_lines_dropped=logs.dropped_lines())
        return code

    async def begin_restart(self) -> None:
        """Before ``prepare_restart``: start the understudy S and wait until it is ready
        (``understudy``). ``HandoverError`` saying why not: the restart is abandoned and
        this run serves on. If S cannot even be spawned the restart is an exec alone."""
        if self.is_understudy:
            raise understudy.HandoverError("a restart is under way (this is its understudy)")
        if self._spawning or self._understudy is not None or self._restart_prepared:
            raise understudy.HandoverError("a restart is already under way")
        self._spawning = True
        try:
            try:
                proc, sock = understudy.spawn()
            except OSError as exc:
                self.log.warning("restart: cannot start an understudy; exec alone",
                                 error=str(exc))
                return
            try:
                await asyncio.get_running_loop().run_in_executor(
                    None, understudy.wait_ready, sock, proc)
                if self.stop_event.is_set():
                    raise understudy.HandoverError("the daemon is stopping")
            except understudy.HandoverError as exc:
                await self._dismiss((proc, sock))
                self.log.error("restart abandoned; this run serves on", reason=str(exc))
                raise understudy.HandoverError(f"restart abandoned: {exc}") from None
            self._understudy = (proc, sock)
            self.log.info("understudy ready", pid=proc.pid)
        finally:
            self._spawning = False

    async def _dismiss(self, pair: tuple[subprocess.Popen[bytes], socket.socket]) -> None:
        """Send an understudy away unused: it sees EOF and exits; killed if it lingers."""
        proc, sock = pair
        sock.close()
        try:
            await asyncio.get_running_loop().run_in_executor(None, proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.get_running_loop().run_in_executor(None, proc.wait)

    def _detach_listeners(self) -> None:
        """Stop accepting on the control and bus sockets (kept open: who connects from now
        on waits in their backlogs for the next holder)."""
        if self.control is not None:
            self.control.detach_listener()
        for service in self.services.values():
            service.bus.detach_listeners()

    def prepare_restart(self) -> None:
        """Before ``request_restart``: ``_detach_listeners``."""
        if self.stop_event.is_set():
            return
        self._restart_prepared = True
        self._detach_listeners()

    def request_restart(self) -> None:
        """Restart in place (``uartbridge restart``) after the request has been answered."""
        if self._restart_prepared and not self.stop_event.is_set():
            self._restart_requested = True
            self.stop_event.set()

    async def _quiesce_and_collect(self, *, with_state: bool) -> list[tuple[str, int]] | None:
        """What every handover does first: quiesce, write the final checkpoint to disk (as
        for a stop), collect the descriptors the next holder keeps (``handover.keep``) and
        close the rest. ``with_state`` (an understudy's handover): the state directory's
        lock and each checkpoint in a memfd go too. None if the state directory refused a
        checkpoint and the state is not carried in memory (nothing is closed then)."""
        self._handing_over = True
        self.stopped_by_request = True  # the checkpoint is needed whatever on_stop says
        if self.control is not None:
            await self.control.finish()  # before the quiesce: requests see a live device
        result = await self._final()
        if self._unsaved:
            if not with_state:
                return None
            self.log.error("final checkpoint not in the state directory; its state is "
                           "handed over in memory", unsaved=sorted(self._unsaved))
        fds: list[tuple[str, int]] = []
        for service in self.services.values():
            fds += service.handover_fds()
        if self.control is not None:
            await self.control.close()
            if self.control.kept is not None:
                name = handover.CONTROL_NAME if self.control.owned else handover.LISTENER_NAME
                fds.append((name, self.control.kept.fileno()))
        if with_state and self._lock_fd is not None:
            fds.append((understudy.LOCK_NAME, self._lock_fd))
        kept = handover.keep(fds)
        if with_state:
            kept += [(understudy.checkpoint_name(name), understudy.memfd_with(encode(ckpt)))
                     for name, ckpt in result["snapshots"].items()]
        for service in self.services.values():
            with contextlib.suppress(Exception):
                await service.stop(keep=True)
        if self._recorder is not None:
            self._recorder.close()
        return kept

    async def _restart_in_place(self) -> None:
        """Hand everything to the understudy (``begin_restart``) and ``exec`` this same
        command line keeping only the pair to it; without an understudy, ``exec`` keeping
        the ports and the listening sockets (``handover``). Returns only if that cannot be
        done (the state directory refused the checkpoint): the daemon then stops as on
        SIGTERM."""
        pair = self._understudy
        self.log.info("restarting in place", restarts=self.restarts + 1,
                      understudy=None if pair is None else pair[0].pid)
        _sdnotify.reloading()
        # From here a stop signal waits for the new run (exec keeps it pending; the new run
        # handles it once it serves). One this run took already is raised again for it.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDOVER_SIGNALS)
        kept = await self._quiesce_and_collect(with_state=pair is not None)
        if self._unsaved and pair is not None:
            # Today's rule: a restart never resumes older state than the stop would keep.
            for _name, fd in kept or []:
                os.close(fd)
            kept = None
        if kept is None:
            self.log.error("restart abandoned: the final checkpoint was not written; stopping",
                           unsaved=sorted(self._unsaved))
            if pair is not None:
                await self._dismiss(pair)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDOVER_SIGNALS)
            return
        if self._signals:
            os.kill(os.getpid(), signal.SIGTERM)
        if pair is not None:
            proc, sock = pair
            try:
                understudy.send(sock, "handover", kept, restarts=self.restarts + 1,
                                main_pid=os.getpid())
            except understudy.HandoverError as exc:
                # S died since it was ready: nothing went; the exec alone, as without one.
                self.log.warning("understudy gone; exec alone", error=str(exc))
                with contextlib.suppress(OSError):
                    proc.wait(1)
                kept = understudy.without_state(kept)
            else:
                # The new run keeps the ports and listeners too (S has the same open files):
                # if S dies before handing back, it serves them on, closing nothing.
                self.log.info("exec", understudy=proc.pid, fds=sorted(n for n, _ in kept))
                os.environ[understudy.UNDERSTUDY_PID_ENV] = str(proc.pid)
                self._exec(handover.keep([(understudy.SOCKET_NAME, sock.fileno()),
                                          *understudy.without_state(kept, close=False)]))
        self._finish_files(EX_OK)
        self.log.info("exec", fds=sorted(name for name, _fd in kept))
        self._exec(kept)

    def _exec(self, kept: list[tuple[str, int]]) -> NoReturn:
        try:
            handover.exec_in_place(kept, self.restarts + 1)
        except OSError as exc:  # the interpreter is gone (an upgrade removed it…)
            self.log.error("restart failed: cannot exec", error=str(exc))
            os._exit(EX_SOFTWARE)

    # -- the understudy's side, and taking back from it ---------------------------------------

    async def _await_handover(self) -> handover.HandedFds | None:
        """In S: say ``ready`` (everything imported, the config valid) and wait for the
        handover; None if the main process gave the restart up (S then exits quietly)."""
        assert self._pair is not None
        try:
            understudy.send(self._pair, "ready", pid=os.getpid())
            header, fds = await asyncio.get_running_loop().run_in_executor(
                None, understudy.receive, self._pair)
        except understudy.HandoverError as exc:
            self.log.info("understudy not needed; exiting", reason=str(exc))
            return None
        if header["msg"] != "handover":
            for _name, fd in fds:
                os.close(fd)
            self.log.error("understudy: unexpected message; exiting", msg=header["msg"])
            return None
        self.restarts = max(0, int(header.get("restarts", 1)))
        self._main_pid = int(header.get("main_pid", os.getppid()))
        self.log.info("understudy serving", handed=sorted(name for name, _fd in fds))
        return handover.HandedFds(fds)

    async def _serve_pair(self) -> None:
        """In S: wait for the main process to ask for the state back (``give``); if it is
        gone instead, nobody will: stop as on SIGTERM (final checkpoint on disk)."""
        assert self._pair is not None
        try:
            header, fds = await asyncio.get_running_loop().run_in_executor(
                None, understudy.receive, self._pair)
        except understudy.HandoverError as exc:
            self.log.error("understudy: the main process has gone; stopping", reason=str(exc))
            self._orphaned = True
            self.stop_event.set()
            return
        for _name, fd in fds:
            os.close(fd)
        self._give_requested = header["msg"] == "give"
        self._orphaned = not self._give_requested
        self.stop_event.set()

    async def _hand_back(self) -> NoReturn:
        """In S: the second handover, to the new main run; then exit 0 (nothing else:
        sockets, links and the marker are the main process's)."""
        assert self._pair is not None
        self.log.info("understudy handing back")
        self._detach_listeners()
        kept = await self._quiesce_and_collect(with_state=True)
        code = EX_OK
        try:
            understudy.send(self._pair, "handover", kept or [], restarts=self.restarts,
                            main_pid=self._main_pid)
        except understudy.HandoverError as exc:
            self.log.error("understudy: cannot hand back", error=str(exc))
            code = EX_SOFTWARE
        self.log.info("understudy handed back; exiting", exit_code=code)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    async def _take_back(self) -> handover.HandedFds:
        """What this run was handed (``$LISTEN_FDS``); after an understudy restart, first
        what the understudy hands back. If it has gone, nothing: the state directory's
        checkpoint (O's or S's, both written before any handover) and the ports' paths."""
        handed = handover.HandedFds.from_environment()
        fd = handed.take(understudy.SOCKET_NAME)
        pid_text = os.environ.pop(understudy.UNDERSTUDY_PID_ENV, None)
        if fd is None:
            return handed
        loop = asyncio.get_running_loop()
        sock = socket.socket(fileno=fd)
        fds: list[tuple[str, int]] = []
        try:
            self.log.info("taking the state back from the understudy", pid=pid_text)
            understudy.send(sock, "give")
            sock.settimeout(understudy.GIVE_TIMEOUT_S)
            header, fds = await loop.run_in_executor(None, understudy.receive, sock)
            if header["msg"] != "handover":
                raise understudy.HandoverError(f"understudy said {header['msg']!r}")
        except understudy.HandoverError as exc:
            for _name, got in fds:
                os.close(got)
            fds = []
            self.log.error("understudy gone before handing back; resuming from the state "
                           "directory with the ports and listeners kept across the exec",
                           reason=str(exc))
            if pid_text is not None:
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid_text), signal.SIGKILL)  # hung: it must not hold the lock
        finally:
            sock.close()
        if pid_text is not None:
            with contextlib.suppress(ValueError):
                code = await loop.run_in_executor(None, understudy.reap, int(pid_text))
                if code not in (0, None) and fds:
                    self.log.warning("understudy exit status", exit_code=code)
        handed.add(fds)
        return handed

    async def _stop_sequence(self) -> int:
        """Quiesce and save (unless ``on_stop`` is off); the exit code."""
        if not self.stopped_by_request and not self.config.checkpoint.on_stop:
            return EX_OK
        await self._final()
        if self._unsaved:
            return await self._retry_unsaved()
        return EX_OK

    def _finish_files(self, code: int) -> None:
        """The marker goes only when every UART's state is safe in the state directory."""
        if self._marker_written and code == EX_OK:
            with contextlib.suppress(OSError):
                (self.config.daemon.state_dir / RUNNING_MARKER).unlink()
        if self._fd_reserve is not None:
            self._fd_reserve.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock; the file stays (others lock it)
            self._lock_fd = None

    def _on_signal(self) -> None:
        if self.is_understudy and not self._orphaned:
            # The main process takes the state back before it stops (HANDOVER_SIGNALS).
            self.log.info("understudy: signal left to the main process")
            return
        self._signals += 1
        if self._signals == 1:
            self.log.info("stopping on signal")
            self.stop_event.set()
            return
        if self._signals >= 3:
            self.log.warning("third signal: exiting at once")
            os._exit(EX_SOFTWARE)
        if self._unsaved:
            self.log.warning("second signal: no more retries", unsaved=sorted(self._unsaved))
            self._retry_wakeup.set()
        elif self._final_written or not self.config.checkpoint.on_stop:
            self.log.info("second signal: the final checkpoint is written; finishing the stop")
        else:
            for task in (self._final_task, self._stop_task):
                if task is not None:
                    task.cancel()

    def _announce(self) -> None:
        for service in self.services.values():
            where = service.link.slave_path if service.port_open else None
            port = f"pty {where}" if where else f"port {service.config.port.url}"
            service.log.info(
                "ready",
                port=service.config.port.url,
                pty=where,
                bus_socket=str(service.config.bus_socket),
            )
            logs.announce(f"{service.name}: {port}  bus {service.config.bus_socket}")
        _sdnotify.ready(self.status_line())

    def status_line(self) -> str:
        """The one-line summary systemd shows as STATUS=."""
        parts = []
        for s in self.services.values():
            state = str(s.link.reader_state) if s.port_open else "port closed"
            guest = "guest" if s.bus.guest_connected else "no guest"
            parts.append(f"{s.name}: {state}, {guest}")
        return "; ".join(parts)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio's errors (an EMFILE on accept…), each kind at most once per interval."""
        message = str(context.get("message", "event loop error"))
        exc = context.get("exception")
        key = f"{message}|{type(exc).__name__}"
        now = time.monotonic()
        last, held = self._loop_errors.get(key, (0.0, 0))
        if now - last < LOOP_ERROR_INTERVAL_S:
            self._loop_errors[key] = (last, held + 1)
            return
        self._loop_errors[key] = (now, 0)
        fields: dict[str, Any] = {"error": str(exc) if exc is not None else None}
        if held:
            fields["repeated"] = held
        if isinstance(exc, OSError) and exc.errno is not None:
            fields["errno"] = exc.errno
            self.log.error(message, **fields)
        else:
            self.log.error(message, exc_info=exc, **fields)

    # -- periodic work -----------------------------------------------------------------------

    async def _periodic_checkpoints(self) -> None:
        interval_s = self.config.checkpoint.interval_s
        if interval_s <= 0:
            return
        while True:
            await asyncio.sleep(interval_s)
            for service in self.services.values():
                await self._write(service, periodic=True)
            _sdnotify.status(self.status_line())

    async def _write(
        self,
        service: UartService,
        ckpt: Checkpoint | None = None,
        *,
        periodic: bool = False,
        in_loop: bool = False,
    ) -> Path | None:
        """Write one state-directory checkpoint (``ckpt``, or a snapshot taken now); None
        (logged once per reason) if a periodic one is refused, otherwise a refusal raises.

        Every checkpoint write goes through here, one at a time (of any UART: one thread
        writes them anyway): this waits for the one in flight first, so a UART's files land
        in snapshot order, its final one (``in_loop``) last, and a write on the loop never
        runs beside one in the thread (which could take the descriptors the reserve frees).
        A write runs in the writer thread (encode, write, two fsyncs: tens of ms that would
        stall every UART), except ``in_loop`` (the final one and its retries: every bus is
        closed by then, and a second signal must see whether it is written) and a retry when
        the thread ran out of descriptors (``_write_now``).
        """
        while self._in_flight is not None and not self._in_flight.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._in_flight)  # its outcome is its caller's
        if self._final_task is not None and not in_loop:
            # The final checkpoint is being taken (or is written): it must be the last one.
            if periodic:
                return None
            raise DaemonStoppingError(f"{service.name}: the daemon is stopping; its final "
                                      "checkpoint is the last one")
        if ckpt is None:
            ckpt = service.snapshot()  # after the wait: a later snapshot never lands earlier
        try:
            if in_loop:
                return self._saved(service, ckpt, self._write_reserved(service, ckpt))
            self._in_flight = asyncio.create_task(self._write_now(service, ckpt))
            # Shielded: a cancelled caller (the periodic task at stop) leaves the write to
            # finish, and still in flight for the next writer and for shutdown to wait on.
            return await asyncio.shield(self._in_flight)
        except CheckpointWriteError as exc:
            if not periodic:
                raise
            if self._periodic_errors.get(service.name) != exc.reason:
                self._periodic_errors[service.name] = exc.reason
                service.log.error("periodic checkpoint failed", error=str(exc),
                                  reason=exc.reason, hint="the device keeps its state; "
                                  "retried every interval_s")
            return None
        except UartBridgeError as exc:
            if not periodic:
                raise
            service.log.error("periodic checkpoint failed", error=str(exc))
            return None

    async def _write_now(self, service: UartService, ckpt: Checkpoint) -> Path:
        """The in-flight write: the file in the writer thread, then its bookkeeping."""
        loop = asyncio.get_running_loop()
        try:
            path = await loop.run_in_executor(self._writer, service.write_checkpoint, ckpt)
        except CheckpointWriteError as exc:
            cause = exc.__cause__
            if not isinstance(cause, OSError) or cause.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            # Out of descriptors (a connection storm). The reserve cannot serve the thread:
            # the loop goes on meanwhile and its next accept would take the numbers freed for
            # it. So this write is redone here, in the loop, inside the reserve.
            path = self._write_reserved(service, ckpt)
        return self._saved(service, ckpt, path)

    def _write_reserved(
        self, service: UartService, ckpt: Checkpoint, *, directory: Path | None = None
    ) -> Path:
        """Write in the loop, with the descriptor reserve released for it."""
        with self._reserved_fds():
            if directory is not None:
                ensure_private_dir(directory, mode=0o700, error=StateDirError,
                                   what="emergency directory")
            return service.write_checkpoint(ckpt, directory=directory)

    def _saved(self, service: UartService, ckpt: Checkpoint, path: Path) -> Path:
        """Bookkeeping of a state-directory write, in the same loop step as its end."""
        service.checkpoint_saved(path, ckpt)
        if self._periodic_errors.pop(service.name, None) is not None:
            service.log.info("checkpoints written again", path=str(path))
        self._drop_emergency(service)
        return path

    async def _writes_finished(self) -> None:
        """Wait for the write in flight (shutdown: the thread's last file lands whole)."""
        if self._in_flight is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._in_flight)
        self._writer.shutdown(wait=True)

    @contextlib.contextmanager
    def _reserved_fds(self) -> Iterator[None]:
        if self._fd_reserve is None:
            yield
            return
        with self._fd_reserve.released():
            yield

    def _drop_emergency(self, service: UartService) -> None:
        """A state-directory checkpoint supersedes an emergency copy: remove it."""
        if service.name not in self._emergency:
            return
        self._emergency.discard(service.name)
        directory = emergency_dir(self.config.daemon.runtime_dir)
        for path in directory.glob(f"{service.name}.checkpoint*.json"):
            with contextlib.suppress(OSError):
                path.unlink()
        with contextlib.suppress(OSError):
            directory.rmdir()

    async def _watchdog(self, interval_s: float) -> None:
        while True:
            _sdnotify.watchdog()
            await asyncio.sleep(interval_s / 2)

    # -- SIGHUP -------------------------------------------------------------------------------

    def _on_hup(self) -> None:
        if self.stop_event.is_set():
            return
        asyncio.get_running_loop().call_soon(self.reload)

    def reload(self) -> None:
        """Re-read the config; apply logging and ``[checkpoint]``, name what needs a restart."""
        if self._reload_config is None:
            self.log.warning("SIGHUP: nothing to re-read (no config file); carrying on")
            return
        _sdnotify.reloading()
        try:
            new: Config = self._reload_config()
        except UartBridgeError as exc:
            self.log.error("SIGHUP: config not reloaded, the running one stays", error=str(exc))
            _sdnotify.ready(self.status_line())
            return
        old = self.config
        ignored = [
            f"daemon.{f.name}"
            for f in dataclasses.fields(old.daemon)
            if f.name not in ("log_format", "log_level")
            and getattr(old.daemon, f.name) != getattr(new.daemon, f.name)
        ]
        old_uarts = {u.name: u for u in old.uarts}
        new_uarts = {u.name: u for u in new.uarts}
        for name in sorted(old_uarts.keys() | new_uarts.keys()):
            if old_uarts.get(name) != new_uarts.get(name):
                ignored.append(f"uart {name}")
        applied = dataclasses.replace(old, checkpoint=new.checkpoint, daemon=dataclasses.replace(
            old.daemon, log_format=new.daemon.log_format, log_level=new.daemon.log_level))
        self.config = applied
        _setup_logging(applied, self.log_overrides)
        for service in self.services.values():
            service.keep_previous = applied.checkpoint.keep_previous
        if old.checkpoint.interval_s != applied.checkpoint.interval_s and self._periodic:
            self._periodic.cancel()
            self._periodic = asyncio.create_task(self._periodic_checkpoints())
        self.log.info("SIGHUP: config reloaded", source=new.source, applied=["daemon.log_format",
                      "daemon.log_level", "checkpoint"], needs_restart=ignored or None)
        if ignored:
            self.log.warning("SIGHUP: these changes need a restart", keys=ignored)
        _sdnotify.ready(self.status_line())

    # -- operations for the control socket --------------------------------------------------

    async def checkpoint_all(
        self,
        *,
        stop: bool,
        only: str | None = None,
        documents: bool = False,
    ) -> dict[str, Any]:
        """Checkpoint every UART (or ``only``) into the state directory; ``stop`` quiesces
        every UART first and makes it the final checkpoint (then the daemon stops).

        With ``documents`` the checkpoints are also returned as text (``encode``), for the
        client to write where it wants with its own rights; without ``stop`` they are then
        not written to the state directory at all.

        Returns ``{"written": {name: path}, "documents": {name: text}, "failed": {name:
        message}}``; ``failed`` only when stopping (see ``_final``), otherwise a refusal raises.
        """
        if stop:
            result = await self._final()
            texts = {name: encode(ckpt).decode("utf-8")
                     for name, ckpt in result["snapshots"].items()} if documents else {}
            return {"written": result["written"], "documents": texts,
                    "failed": result["failed"], "exit_code": result["exit_code"]}
        targets = [self.services[only]] if only else list(self.services.values())
        written: dict[str, str] = {}
        texts = {}
        for service in targets:
            if documents:
                texts[service.name] = encode(service.snapshot()).decode("utf-8")
                continue
            written[service.name] = str(await self._write(service))
            service.log.info("checkpoint written", path=written[service.name], stop=False)
        return {"written": written, "documents": texts, "failed": {}}

    async def _final(self) -> dict[str, Any]:
        """The final checkpoint, taken once however many ask (a signal, ``checkpoint --stop``)."""
        if self._final_task is None:
            self._final_task = asyncio.create_task(self._save_final())
        return await self._final_task

    async def _save_final(self) -> dict[str, Any]:
        """Quiesce every UART and write its final checkpoint; a refused one goes to the
        emergency directory and into ``_unsaved`` for ``_retry_unsaved``."""
        services = list(self.services.values())
        for service in services:
            await service.quiesce(keep_listening=self._handing_over)
        written: dict[str, str] = {}
        failed: dict[str, str] = {}
        snapshots: dict[str, Checkpoint] = {}
        for service in services:
            ckpt = snapshots[service.name] = service.snapshot()
            try:
                written[service.name] = str(await self._write(service, ckpt, in_loop=True))
            except CheckpointWriteError as exc:
                failed[service.name] = self._save_emergency(service, ckpt, exc)
                continue
            service.log.info("checkpoint written", path=written[service.name], stop=True)
        self._final_written = not failed
        codes = [exc.exit_code for _ckpt, exc in self._unsaved.values()]
        return {"written": written, "failed": failed, "snapshots": snapshots,
                "exit_code": max(codes, default=EX_OK)}

    def _save_emergency(
        self, service: UartService, ckpt: Checkpoint, exc: CheckpointWriteError
    ) -> str:
        """Write ``ckpt`` to the emergency directory; log and return what happened."""
        self._unsaved[service.name] = (ckpt, exc)
        directory = emergency_dir(self.config.daemon.runtime_dir)
        try:
            path = self._write_reserved(service, ckpt, directory=directory)
        except UartBridgeError as second:
            message = (f"final checkpoint not written: {exc.reason} "
                       f"(and no emergency copy: {second})")
            service.log.error("final checkpoint failed", error=str(exc), reason=exc.reason,
                              emergency_error=str(second))
            return message
        self._emergency.add(service.name)
        service.log.error(
            "final checkpoint failed; emergency copy written",
            error=str(exc),
            reason=exc.reason,
            emergency_copy=str(path),
            hint="free the state directory, or resume from the emergency copy",
        )
        return f"final checkpoint not written: {exc.reason}; emergency copy at {path}"

    async def _retry_unsaved(self) -> int:
        """Retry the refused final checkpoints for ``stop_retry_s``; the exit code."""
        retry_s = self.config.checkpoint.stop_retry_s
        deadline = time.monotonic() + retry_s
        if retry_s > 0:
            self.log.warning("retrying the final checkpoint", seconds=retry_s,
                             uarts=sorted(self._unsaved))
        while self._unsaved and time.monotonic() < deadline and not self._retry_wakeup.is_set():
            _sdnotify.extend_timeout(STOP_RETRY_INTERVAL_S * 5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retry_wakeup.wait(), STOP_RETRY_INTERVAL_S)
            for name, (ckpt, _exc) in list(self._unsaved.items()):
                service = self.services[name]
                try:
                    path = await self._write(service, ckpt, in_loop=True)
                except CheckpointWriteError as again:
                    self._unsaved[name] = (ckpt, again)
                    continue
                del self._unsaved[name]
                service.log.info("final checkpoint written after a retry", path=str(path))
        if not self._unsaved:
            self._final_written = True
            return EX_OK
        for name, (_ckpt, failure) in self._unsaved.items():
            self.services[name].log.error(
                "exiting with the final checkpoint not in the state directory",
                reason=failure.reason,
                emergency_copy=str(emergency_dir(self.config.daemon.runtime_dir))
                if name in self._emergency else None,
                exit_code=failure.exit_code,
            )
        return max(failure.exit_code for _c, failure in self._unsaved.values())

    def request_stop(self) -> None:
        """Stop after a ``checkpoint --stop`` has been answered."""
        self.stopped_by_request = True
        self._signals = max(self._signals, 1)
        self.stop_event.set()

    def status(self) -> dict[str, Any]:
        """What ``uartbridge status`` shows."""
        return {
            "version": __version__,
            "build": buildinfo.build_name(),
            "event_loop": eventloop.running_loop_name(),
            "uptime_s": round((time.monotonic_ns() - self.started_mono_ns) / NS_PER_S, 3),
            "config": self.config.source,
            "instance": self.config.instance,
            "runtime_dir": str(self.config.daemon.runtime_dir),
            "state_dir": str(self.config.daemon.state_dir),
            "resumed_after_crash": self.crashed_before,
            # An understudy shows the main process's PID and count: a restart is complete
            # when the main process answers with one more.
            "pid": self._main_pid,
            "understudy_pid": os.getpid() if self.is_understudy else None,
            "restarts": self.restarts - 1 if self.is_understudy else self.restarts,
            "checkpoint_errors": dict(self._periodic_errors),
            "log_lines_dropped": logs.dropped_lines(),
            "uarts": [s.status() for s in self.services.values()],
        }

    async def _close_all(self) -> None:
        if self.control is not None:
            await self.control.close()
        for service in self.services.values():
            with contextlib.suppress(Exception):
                await service.stop()
        if self._recorder is not None:
            self._recorder.close()


def serve(
    config: Config,
    *,
    resume: dict[str, tuple[Checkpoint, Path]] | None = None,
    reload: Callable[[], Config] | None = None,
    log_overrides: dict[str, str] | None = None,
    record: Path | None = None,
) -> int:
    """Run a daemon for ``config`` until it stops; returns the exit code."""

    async def main() -> int:
        daemon = Daemon(
            config, resume=resume, reload=reload, log_overrides=log_overrides, record=record
        )
        return await daemon.run()

    try:
        return eventloop.run(main(), config.daemon.event_loop)
    except UartBridgeError as exc:
        return _fail(exc)
    except Exception as exc:
        understudy.report_failure(f"internal error: {exc!r}")
        get_logger().exception("internal error", error=str(exc))
        logs.fatal(f"internal error: {exc!r}", exit_code=EX_SOFTWARE)
        return EX_SOFTWARE


def _setup_logging(config: Config, overrides: dict[str, str] | None = None) -> None:
    overrides = overrides or {}
    logs.configure_logging(
        overrides.get("log_format") or config.daemon.log_format,
        overrides.get("log_level") or config.daemon.log_level,
    )


def _log_overrides(args: Any) -> dict[str, str]:
    overrides: dict[str, str] = {}
    if getattr(args, "verbose", False):
        overrides["log_level"] = "debug"
    if getattr(args, "log_level", None):
        overrides["log_level"] = args.log_level
    if getattr(args, "log_format", None):
        overrides["log_format"] = args.log_format
    return overrides


def _start_logging(args: Any) -> dict[str, str]:
    """Logging before the config is read (so that its errors go where the logs go)."""
    ensure_standard_fds()
    overrides = _log_overrides(args)
    logs.configure_logging(overrides.get("log_format", "auto"),
                           overrides.get("log_level", "info"))
    return overrides


def _load(path: str | None) -> Config:
    from ..config import load_config_or_default

    return load_config_or_default(path)


def _fail(exc: UartBridgeError) -> int:
    understudy.report_failure(str(exc))  # an understudy's main process says why, too
    logs.fatal(str(exc), exit_code=exc.exit_code)
    return exc.exit_code


def run_command(args: Any) -> int:
    """``uartbridge run [--config FILE]``: serve until stopped."""
    overrides = _start_logging(args)
    try:
        config = _load(args.config)
    except UartBridgeError as exc:
        return _fail(exc)
    _setup_logging(config, overrides)
    return serve(config, reload=lambda: _load(args.config), log_overrides=overrides,
                 record=_record_path(args))


def resume_command(args: Any) -> int:
    """``uartbridge resume FILE [--config FILE] [--uart NAME] [--port URL]``.

    The checkpoint's UART must be one of the config's, under the same name; ``--uart NAME``
    maps it onto the config's UART NAME explicitly (it is then saved under NAME).
    """
    from ..checkpoint import read_checkpoint

    overrides = _start_logging(args)
    try:
        ckpt = read_checkpoint(Path(args.file))
        config = _load(args.config)
        name, config = _resume_target(config, ckpt, args)
    except UartBridgeError as exc:
        return _fail(exc)
    _setup_logging(config, overrides)

    def reload() -> Config:
        return _resume_target(_load(args.config), ckpt, args)[1]

    return serve(config, resume={name: (ckpt, Path(args.file))}, reload=reload,
                 log_overrides=overrides, record=_record_path(args))


def _record_path(args: Any) -> Path | None:
    record = getattr(args, "record", None)
    return Path(record) if record else None


def _resume_target(config: Config, ckpt: Checkpoint, args: Any) -> tuple[str, Config]:
    """The config UART the checkpoint resumes into (and the config, with ``--port``)."""
    saved = ckpt.meta.uart_name
    wanted = getattr(args, "uart", None) or saved
    names = [u.name for u in config.uarts]
    if wanted not in names:
        if getattr(args, "uart", None):
            raise ConfigError(f"{config.source}: no [[uart]] named {wanted!r} (it has "
                              f"{', '.join(names)}); --uart names one of them")
        raise ConfigError(
            f"{args.file} is UART {saved!r}, and {config.source} has no [[uart]] named "
            f"{saved!r} (it has {', '.join(names)}): its state would be saved where this "
            f"config never looks. Resume it into one of them explicitly with --uart NAME"
        )
    uarts = list(config.uarts)
    index = names.index(wanted)
    if args.port:
        uart_cfg = uarts[index]
        uarts[index] = dataclasses.replace(
            uart_cfg, port=dataclasses.replace(uart_cfg.port, url=args.port)
        )
    return wanted, dataclasses.replace(config, uarts=tuple(uarts))
