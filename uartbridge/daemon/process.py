"""The daemon shell: UART services, the control socket, signals, timers and sd_notify.

Life cycle (uvicorn's ``server.py`` is the model): start every UART (resuming from its newest
valid checkpoint when ``[checkpoint] resume = "auto"``), listen, tell systemd READY=1, then
wait for SIGTERM/SIGINT or a ``checkpoint --stop``. Stopping quiesces each port, writes each
UART's checkpoint (``on_stop``), closes everything and exits 0. A second signal forces exit.

A marker file in the state directory says "a daemon is running here"; finding it at start
means the previous daemon died without its final checkpoint, and the age of the state we
resume from is logged and reported as what a crash may have lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, latest_checkpoint
from ..config import Config
from ..errors import (
    EX_OK,
    EX_SOFTWARE,
    CheckpointError,
    UartBridgeError,
)
from ..logs import get_logger
from ..sockets import default_peer_allowed, ensure_private_dir
from . import sdnotify as _sdnotify
from .control_server import ControlServer
from .service import NS_PER_S, UartService

RUNNING_MARKER = "daemon.running"


class Daemon:
    """One daemon process serving the UARTs of one config."""

    def __init__(
        self,
        config: Config,
        *,
        resume: dict[str, tuple[Checkpoint, Path]] | None = None,
    ) -> None:
        self.config = config
        self.log = get_logger()
        self.explicit_resume = resume or {}
        self.services: dict[str, UartService] = {}
        self.control: ControlServer | None = None
        self.stop_event = asyncio.Event()
        self.stopped_by_request = False
        self.crashed_before = False
        self.started_mono_ns = time.monotonic_ns()

    # -- start ----------------------------------------------------------------------------

    def _resume_source(self, name: str) -> tuple[Checkpoint | None, Path | None]:
        if name in self.explicit_resume:
            ckpt, path = self.explicit_resume[name]
            return ckpt, path
        if self.config.checkpoint.resume != "auto":
            return None, None
        problems: list[str] = []
        found = latest_checkpoint(self.config.daemon.state_dir, name, problems=problems)
        if found is None and problems:
            # Starting afresh would silently throw the saved device away (DESIGN.md rule 4).
            raise CheckpointError(
                f"{name}: no valid checkpoint in {self.config.daemon.state_dir}: "
                + "; ".join(problems)
                + ' (move the files away, or set [checkpoint] resume = "never")'
            )
        for problem in problems:
            self.log.warning("skipped an invalid checkpoint", uart=name, problem=problem)
        return found if found is not None else (None, None)

    async def start(self) -> None:
        """Create directories, resume or create every UART, open ports, listen."""
        daemon_cfg = self.config.daemon
        ensure_private_dir(daemon_cfg.runtime_dir)
        ensure_private_dir(daemon_cfg.state_dir, mode=0o700)
        marker = daemon_cfg.state_dir / RUNNING_MARKER
        self.crashed_before = marker.exists()
        peer_allowed = default_peer_allowed(daemon_cfg.socket_gid)
        for uart_cfg in self.config.uarts:
            ckpt, path = self._resume_source(uart_cfg.name)
            service = UartService(
                uart_cfg,
                state_dir=daemon_cfg.state_dir,
                keep_previous=self.config.checkpoint.keep_previous,
                log=self.log,
                peer_allowed=peer_allowed,
                resume_from=ckpt,
                resumed_path=path,
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
        for service in self.services.values():
            await service.start(fail_fast=daemon_cfg.fail_fast)
        self.control = ControlServer(self, daemon_cfg.control_socket, peer_allowed=peer_allowed)
        await self.control.start()
        marker.write_text(f"{os.getpid()}\n")

    # -- run ------------------------------------------------------------------------------

    async def run(self) -> int:
        """Start, serve until asked to stop, stop. Returns the exit code."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal)
        try:
            await self.start()
        except UartBridgeError:
            await self._close_all()
            raise
        self._announce()
        tasks = [asyncio.create_task(self._periodic_checkpoints())]
        interval = _sdnotify.watchdog_interval_s() if self.config.daemon.watchdog else None
        if interval:
            tasks.append(asyncio.create_task(self._watchdog(interval)))
        try:
            await self.stop_event.wait()
        finally:
            for task in tasks:
                task.cancel()
        _sdnotify.stopping()
        if not self.stopped_by_request and self.config.checkpoint.on_stop:
            await self.checkpoint_all(stop=True)
        await self._close_all()
        with contextlib.suppress(FileNotFoundError):
            (self.config.daemon.state_dir / RUNNING_MARKER).unlink()
        self.log.info("stopped")
        return EX_OK

    def _on_signal(self) -> None:
        if self.stop_event.is_set():
            self.log.warning("second signal: exiting without a final checkpoint")
            os._exit(EX_SOFTWARE)
        self.log.info("stopping on signal")
        self.stop_event.set()

    def _announce(self) -> None:
        lines = []
        for service in self.services.values():
            where = service.link.slave_path if service.port_open else None
            port = f"pty {where}" if where else f"port {service.config.port.url}"
            lines.append(f"{service.name}: {port}  bus {service.config.bus_socket}")
            service.log.info(
                "ready",
                port=service.config.port.url,
                pty=where,
                bus_socket=str(service.config.bus_socket),
            )
        print("\n".join(lines), flush=True)
        _sdnotify.ready(self.status_line())

    def status_line(self) -> str:
        """The one-line summary systemd shows as STATUS=."""
        parts = []
        for s in self.services.values():
            state = str(s.link.reader_state) if s.port_open else "port closed"
            guest = "guest" if s.bus.guest_connected else "no guest"
            parts.append(f"{s.name}: {state}, {guest}")
        return "; ".join(parts)

    async def _periodic_checkpoints(self) -> None:
        interval_s = self.config.checkpoint.interval_s
        if interval_s <= 0:
            return
        while True:
            await asyncio.sleep(interval_s)
            for service in self.services.values():
                try:
                    service.write_checkpoint()
                except UartBridgeError as exc:
                    service.log.error("periodic checkpoint failed", error=str(exc))
            _sdnotify.status(self.status_line())

    async def _watchdog(self, interval_s: float) -> None:
        while True:
            _sdnotify.watchdog()
            await asyncio.sleep(interval_s / 2)

    # -- operations for the control socket --------------------------------------------------

    async def checkpoint_all(
        self,
        *,
        stop: bool,
        only: str | None = None,
        output: Path | None = None,
    ) -> dict[str, str]:
        """Write checkpoints (all UARTs, or ``only``); with ``stop``, quiesce first."""
        targets = [self.services[only]] if only else list(self.services.values())
        if stop:
            # Stopping saves every UART, so that nothing is lost with the process.
            targets = list(self.services.values())
            for service in targets:
                await service.quiesce()
        output_for = only or (targets[0].name if len(self.services) == 1 else None)
        written: dict[str, str] = {}
        for service in targets:
            path = output if service.name == output_for else None
            written[service.name] = str(service.write_checkpoint(path, also_state_dir=stop))
            service.log.info("checkpoint written", path=written[service.name], stop=stop)
        return written

    def request_stop(self) -> None:
        """Stop after a ``checkpoint --stop`` has been answered."""
        self.stopped_by_request = True
        self.stop_event.set()

    def status(self) -> dict[str, Any]:
        """What ``uartbridge status`` shows."""
        return {
            "pid": os.getpid(),
            "uptime_s": round((time.monotonic_ns() - self.started_mono_ns) / NS_PER_S, 3),
            "config": self.config.source,
            "resumed_after_crash": self.crashed_before,
            "uarts": [s.status() for s in self.services.values()],
        }

    async def _close_all(self) -> None:
        if self.control is not None:
            await self.control.close()
        for service in self.services.values():
            await service.stop()


def serve(config: Config, *, resume: dict[str, tuple[Checkpoint, Path]] | None = None) -> int:
    """Run a daemon for ``config`` until it stops; returns the exit code."""
    try:
        return asyncio.run(Daemon(config, resume=resume).run())
    except UartBridgeError as exc:
        print(f"uartbridge: {exc}", file=sys.stderr)
        return exc.exit_code


def _load_config(path: str | None) -> Config:
    from ..config import default_config, load_config

    return load_config(path) if path else default_config()


def _setup_logging(config: Config) -> None:
    from ..logs import configure_logging

    configure_logging(config.daemon.log_format, config.daemon.log_level)


def run_command(args: Any) -> int:
    """``uartbridge run [--config FILE]``: serve until stopped."""
    config = _load_config(args.config)
    _setup_logging(config)
    return serve(config)


def resume_command(args: Any) -> int:
    """``uartbridge resume FILE [--config FILE] [--port URL]``: run, starting from FILE."""
    import dataclasses

    from ..checkpoint import read_checkpoint
    from ..errors import ConfigError

    ckpt = read_checkpoint(Path(args.file))
    config = _load_config(args.config)
    name = ckpt.meta.uart_name
    uarts = list(config.uarts)
    index = next((i for i, u in enumerate(uarts) if u.name == name), None)
    if index is None:
        if len(uarts) != 1:
            raise ConfigError(
                f"{config.source}: no [[uart]] named {name!r} for checkpoint {args.file}"
            )
        index = 0
    uart_cfg = uarts[index]
    if uart_cfg.name != name:
        uart_cfg = dataclasses.replace(uart_cfg, name=name)
    if args.port:
        uart_cfg = dataclasses.replace(
            uart_cfg, port=dataclasses.replace(uart_cfg.port, url=args.port)
        )
    uarts[index] = uart_cfg
    config = dataclasses.replace(config, uarts=tuple(uarts))
    _setup_logging(config)
    return serve(config, resume={name: (ckpt, Path(args.file))})
