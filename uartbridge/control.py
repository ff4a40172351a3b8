"""The control socket: one JSON object per line, request and reply, and its CLI commands.

Requests (one line each, at most ``MAX_LINE_BYTES``):

    {"cmd": "status"}
    {"cmd": "checkpoint", "uart": "uart0" | null, "stop": false, "document": false}

Either may carry ``"config": "/abs/path.toml"`` or ``"instance": "NAME" | null``: a daemon
that is not the one named refuses the request, so a command can never act on another
daemon than the one its user named. ``"document": true`` returns each checkpoint as text
(``"documents": {name: text}``) instead of writing it, for ``checkpoint --output``: the CLI
writes the file itself, with its user's rights, relative to its own working directory.

Replies: ``{"ok": true, ...}`` or ``{"ok": false, "error": "...", "exit_code": N}``. A line
that is not a JSON object, an unknown command or key, or a bad field gets an error reply
and the connection is closed; the daemon and its UARTs carry on.

Which daemon a command talks to: ``--control SOCKET``; ``--config FILE`` (its
``control_socket``); ``--instance NAME`` (the running daemon of ``uartbridge@NAME``;
``uartbridge`` is the single service); with none of them, every daemon of this host is
found in the runtime directories (``paths.runtime_dir_candidates``): ``status`` shows all,
``checkpoint`` and ``console`` go on only when exactly one runs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import paths
from .errors import (
    EX_OK,
    EX_USAGE,
    CheckpointWriteError,
    ControlError,
    exit_code_for_os_error,
)

MAX_LINE_BYTES = 64 * 1024
# A reply may carry whole checkpoints (up to checkpoint.MAX_DOCUMENT_BYTES each).
MAX_REPLY_BYTES = 512 * 1024 * 1024
REQUEST_TIMEOUT_S = 30.0
DISCOVERY_TIMEOUT_S = 2.0


# -- client side -------------------------------------------------------------------------


def request(path: Path, message: dict[str, Any], *, timeout_s: float = REQUEST_TIMEOUT_S) -> Any:
    """Send one request to a daemon's control socket and return its reply."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            with sock.makefile("rb") as stream:
                line = stream.readline(MAX_REPLY_BYTES)
    except FileNotFoundError as exc:
        raise ControlError(f"no daemon is listening on {path} (is uartbridge running?)") from exc
    except ConnectionRefusedError as exc:
        raise ControlError(f"no daemon is listening on {path} (connection refused)") from exc
    except TimeoutError as exc:
        raise ControlError(f"the daemon on {path} did not answer within {timeout_s:g} s") from exc
    except OSError as exc:
        raise ControlError(f"cannot talk to the daemon on {path}: {exc.strerror}") from exc
    if not line:
        raise ControlError(f"the daemon on {path} closed the connection without a reply")
    try:
        return json.loads(line)
    except ValueError as exc:
        raise ControlError(f"the daemon on {path} sent a malformed reply") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """One daemon a command talks to: its control socket and what it must be."""

    control: Path
    identity: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] | None = None  # its status, when discovery already asked

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send ``message`` (with the identity the daemon must have); the checked reply."""
        return _checked(request(self.control, {**message, **self.identity}))


@dataclass(frozen=True, slots=True)
class Found:
    """A control socket found by ``discover``: its status, or why it did not answer."""

    control: Path
    status: dict[str, Any] | None
    error: str | None


def discover(timeout_s: float = DISCOVERY_TIMEOUT_S) -> list[Found]:
    """Every ``control.sock`` in this host's runtime directories, each asked for its status."""
    found: list[Found] = []
    for directory in paths.runtime_dir_candidates():
        control = paths.control_socket_path(directory)
        try:
            if not stat.S_ISSOCK(os.stat(control).st_mode):
                continue
        except OSError:
            continue
        try:
            reply = _checked(request(control, {"cmd": "status"}, timeout_s=timeout_s))
        except ControlError as exc:
            found.append(Found(control, None, str(exc)))
            continue
        reply.pop("ok", None)
        found.append(Found(control, reply, None))
    return found


def _instance_arg(value: str) -> str | None:
    return None if value == paths.BASE_NAME else value


def _label(status: dict[str, Any]) -> str:
    instance = status.get("instance")
    name = f"uartbridge@{instance}" if instance else "uartbridge"
    return f"{name} (pid {status.get('pid')}, config {status.get('config')})"


def resolve_target(args: argparse.Namespace) -> Target | None:
    """The daemon the user named (``--control``, ``--config``, ``--instance``), or None."""
    if getattr(args, "control", None):
        return Target(control=Path(args.control))
    if getattr(args, "config", None):
        from .config import load_config

        config = load_config(args.config)
        return Target(
            control=config.daemon.control_socket,
            identity={"config": os.path.abspath(args.config)},
        )
    if getattr(args, "instance", None) is not None:
        wanted = _instance_arg(args.instance)
        for found in discover():
            if found.status is not None and found.status.get("instance") == wanted:
                return Target(control=found.control, identity={"instance": wanted},
                              status=found.status)
        guess = paths.control_socket_path(paths.default_runtime_dir(wanted))
        return Target(control=guess, identity={"instance": wanted})
    return None


def only_daemon(what: str) -> Target:
    """The one running daemon, for a command that names none; else a clear refusal."""
    running = [f for f in discover() if f.status is not None]
    if not running:
        raise ControlError(
            "no uartbridge daemon is running here (looked in "
            + ", ".join(str(d) for d in paths.runtime_dir_candidates() or [Path("/run")])
            + "); name one with --config, --instance or --control"
        )
    if len(running) > 1:
        err = ControlError(
            f"{len(running)} uartbridge daemons are running; say which one to {what} with "
            "--instance NAME or --config FILE:\n"
            + "\n".join(f"  {_label(f.status or {})}  control {f.control}" for f in running)
        )
        err.exit_code = EX_USAGE
        raise err
    status = running[0].status or {}
    return Target(control=running[0].control, identity={"instance": status.get("instance")},
                  status=status)


def control_path(args: argparse.Namespace) -> Path:
    """The control socket a CLI command talks to (see the module docstring)."""
    target = resolve_target(args) or only_daemon("talk to")
    return target.control


def _checked(reply: Any) -> dict[str, Any]:
    if not isinstance(reply, dict):
        raise ControlError("the daemon sent a malformed reply")
    if not reply.get("ok"):
        code = reply.get("exit_code")
        err = ControlError(str(reply.get("error", "request failed")))
        if type(code) is int:
            err.exit_code = code
        raise err
    return reply


def status_command(args: argparse.Namespace) -> int:
    """``uartbridge status [--json] [--config F | --instance N | --control S]``.

    With no selector, every daemon running here (``--json``: ``{"daemons": [...]}``).
    """
    target = resolve_target(args)
    if target is not None:
        reply = target.ask({"cmd": "status"})
        reply.pop("ok", None)
        if args.json:
            print(json.dumps(reply, indent=2))
        else:
            _print_status(reply)
        return EX_OK
    found = discover()
    running = [f.status for f in found if f.status is not None]
    if not running:
        only_daemon("show")  # raises the "none running" error
    if args.json:
        print(json.dumps({"daemons": running}, indent=2))
        return EX_OK
    for i, status in enumerate(running):
        if i:
            print()
        _print_status(status)
    for f in found:
        if f.status is None:
            print(f"\n{f.control}: not answering ({f.error})")
    return EX_OK


def _print_status(reply: dict[str, Any]) -> None:
    where = f"instance {reply['instance']}" if reply.get("instance") else "the single service"
    print(
        f"daemon pid {reply['pid']}, up {reply['uptime_s']:.0f} s, config {reply['config']}"
        f" ({where})"
    )
    if reply.get("build"):
        print(f"  uartbridge {reply.get('version')}, {reply['build']},"
              f" event loop {reply.get('event_loop')}")
    if reply.get("resumed_after_crash"):
        print("  (resumed after a crash: see each UART's resumed_from age)")
    if reply.get("restarts"):
        print(f"  restarted in place {reply['restarts']} times (uartbridge restart; uptime "
              "counts from the last)")
    for name, error in (reply.get("checkpoint_errors") or {}).items():
        print(f"  checkpoints of {name} are failing: {error}")
    if reply.get("log_lines_dropped"):
        print(f"  {reply['log_lines_dropped']} log lines could not be written (dropped)")
    for u in reply["uarts"]:
        held = (u.get("link") or {}).get("held_by_peer")
        state = f"{u['reader_state']} (held by {held})" if held else u["reader_state"]
        print(f"{u['name']}: {state}  port {u['port']}  line {u['line']}")
        if u.get("clock", "host") != "host" or u.get("pace", "none") != "none":
            t = u.get("time") or {}
            follows = "following the host" if t.get("host_time") else "guest's"
            deadline = t.get("next_deadline_in_ns")
            due = "none" if deadline is None else f"in {deadline} ns"
            print(f"  time        clock {u.get('clock')} ({follows})  pace {u.get('pace')}  "
                  f"now {t.get('now_ns')} ns  next deadline {due}")
        if u.get("pty"):
            print(f"  pty         {u['pty']}")
        guest = "attached" if u["guest_connected"] else "none"
        print(f"  bus         {u['bus_socket']}  guest {guest}")
        err = u.get("last_error")
        if err:
            print(f"  last error  {err['message']} ({err['age_s']:.0f} s ago)")
            if err.get("hint"):
                print(f"              hint: {err['hint']}")
        regs = u["registers"]
        print(
            "  registers   "
            + "  ".join(f"{k.upper()}={v['value']}" for k, v in regs.items())
        )
        print(f"  LSR bits    {' '.join(regs['lsr'].get('bits', [])) or '-'}")
        tsr = "busy" if u["tsr_busy"] else "empty"
        print(
            f"  FIFOs       rx {u['rx_fifo']}/16  tx {u['tx_fifo']}/16  "
            f"tsr {tsr}  tsr_retry {u['tsr_retry']}  irq {int(u['irq'])}"
        )
        link = u.get("link") or {}
        backlog = {k: v for k, v in link.items() if "backlog" in k}
        if backlog:
            print("  backlogs    " + "  ".join(f"{k} {v}" for k, v in backlog.items()))
        counters = dict(u["counters"])
        counters.update(link.get("counters", {}) if isinstance(link.get("counters"), dict) else {})
        print("  counters    " + "  ".join(f"{k}={v}" for k, v in counters.items() if v))
        ckpt = u.get("last_checkpoint")
        if ckpt:
            age_s, gen = ckpt["age_s"], ckpt["generation"]
            print(f"  checkpoint  {ckpt['path']}  {age_s:.1f} s ago  generation {gen}")
        else:
            print("  checkpoint  none yet")
        resumed = u.get("resumed_from")
        if resumed:
            age_s = resumed["age_s"]
            print(f"  resumed     {resumed['path']}  (state {age_s:.1f} s old at resume)")


def checkpoint_command(args: argparse.Namespace) -> int:
    """``uartbridge checkpoint [--uart NAME] [--output FILE] [--stop]``.

    ``--output``: the daemon sends the checkpoint back and this process writes FILE (atomic,
    mode 0600) with its own rights; an existing FILE must be a regular file.
    """
    target = resolve_target(args) or only_daemon("checkpoint")
    output = Path(args.output) if args.output else None
    name = args.uart
    if output is not None:
        _check_output(output)
        if name is None:
            status = target.status or target.ask({"cmd": "status"})
            names = [u["name"] for u in status.get("uarts", [])]
            if len(names) != 1:
                err = ControlError(
                    f"--output needs --uart when the daemon serves several UARTs "
                    f"({', '.join(names)})"
                )
                err.exit_code = EX_USAGE
                raise err
            name = names[0]
    message: dict[str, Any] = {
        "cmd": "checkpoint",
        "uart": args.uart,
        "stop": bool(args.stop),
        "document": output is not None,
    }
    raw = request(target.control, {**message, **target.identity})
    documents = raw.get("documents") if isinstance(raw, dict) else None
    document = documents.get(name) if isinstance(documents, dict) else None
    if output is not None and isinstance(document, str):
        # Even when the daemon's own write failed, the state it sent is saved here.
        _write_output(output, document)
        print(f"{name}: {output}")
    reply = _checked(raw)
    if output is not None and not isinstance(document, str):
        raise ControlError(f"the daemon sent no checkpoint for {name!r}")
    for uart, path in reply.get("written", {}).items():
        print(f"{uart}: {path}")
    if reply.get("stopped"):
        print("daemon stopped", file=sys.stderr)
    return EX_OK


RESTART_TIMEOUT_S = 60.0


def restart_command(args: argparse.Namespace) -> int:
    """``uartbridge restart``: the daemon re-executes itself in place, keeping its ports and
    listening sockets open (``daemon.handover``); this waits until the new run answers and
    prints how long that took (request to answer: the restart's downtime, as a client sees it).
    """
    target = resolve_target(args) or only_daemon("restart")
    started = time.monotonic()
    reply = target.ask({"cmd": "restart"})
    before = int(reply.get("restarts", 0))
    deadline = started + RESTART_TIMEOUT_S
    while True:
        # The control socket is handed over too: this waits in its backlog, not refused.
        # The understudy answers meanwhile (the same count), and a request it accepted just
        # before it hands back is closed unanswered: asked again.
        try:
            status: dict[str, Any] = target.ask({"cmd": "status"})
        except ControlError as exc:
            if "without a reply" not in str(exc) or time.monotonic() > deadline:
                raise
            continue
        if int(status.get("restarts", 0)) > before:
            break
        if time.monotonic() > deadline:
            raise ControlError(f"the daemon did not come back within {RESTART_TIMEOUT_S:g} s")
        time.sleep(0.01)
    print(f"restarted in place (pid {status.get('pid')}, restart {status.get('restarts')}) "
          f"in {time.monotonic() - started:.3f} s")
    return EX_OK


def _check_output(path: Path) -> None:
    """Refuse before asking the daemon: an output that is there and is not a regular file."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CheckpointWriteError(
            f"{path}: cannot write checkpoint: {exc.strerror}",
            exit_code=exit_code_for_os_error(exc), reason=exc.strerror or "",
        ) from exc
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointWriteError(
            f"{path}: exists and is not a regular file; refusing to replace it",
            exit_code=73,
        )


def _write_output(path: Path, document: str) -> None:
    """Validate the daemon's checkpoint and write it to ``path`` atomically (0600)."""
    from .checkpoint import decode, write_checkpoint
    from .errors import CheckpointError

    ckpt = decode(document.encode("utf-8"))
    _check_output(path)
    try:
        write_checkpoint(path, ckpt, keep_previous=False)
    except CheckpointError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError):
            raise CheckpointWriteError(
                str(exc), exit_code=exit_code_for_os_error(cause), reason=cause.strerror or ""
            ) from cause
        raise
