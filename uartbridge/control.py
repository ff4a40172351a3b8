"""The control socket: one JSON object per line, request and reply, and its CLI commands.

Requests (one line each, at most ``MAX_LINE_BYTES``):

    {"cmd": "status"}
    {"cmd": "checkpoint", "uart": "uart0" | null, "output": "/path" | null, "stop": false}

Replies: ``{"ok": true, ...}`` or ``{"ok": false, "error": "...", "exit_code": N}``. A line
that is not a JSON object, an unknown command or a bad field gets an error reply and the
connection is closed; the daemon and its UARTs carry on.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import Any

from .errors import EX_OK, ControlError
from .paths import control_socket_path, default_runtime_dir

MAX_LINE_BYTES = 64 * 1024
REQUEST_TIMEOUT_S = 30.0


# -- client side -------------------------------------------------------------------------


def request(path: Path, message: dict[str, Any], *, timeout_s: float = REQUEST_TIMEOUT_S) -> Any:
    """Send one request to a daemon's control socket and return its reply."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            with sock.makefile("rb") as stream:
                line = stream.readline(MAX_LINE_BYTES * 16)
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


def control_path(args: argparse.Namespace) -> Path:
    """The control socket a CLI command talks to: --control, --config's, or the default."""
    if getattr(args, "control", None):
        return Path(args.control)
    if getattr(args, "config", None):
        from .config import load_config

        return load_config(args.config).daemon.control_socket
    return control_socket_path(default_runtime_dir())


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
    """``uartbridge status [--json]``."""
    reply = _checked(request(control_path(args), {"cmd": "status"}))
    reply.pop("ok", None)
    if args.json:
        print(json.dumps(reply, indent=2))
        return EX_OK
    print(f"daemon pid {reply['pid']}, up {reply['uptime_s']:.0f} s, config {reply['config']}")
    if reply.get("resumed_after_crash"):
        print("  (resumed after a crash: see each UART's resumed_from age)")
    for u in reply["uarts"]:
        held = (u.get("link") or {}).get("held_by_peer")
        state = f"{u['reader_state']} (held by {held})" if held else u["reader_state"]
        print(f"{u['name']}: {state}  port {u['port']}  line {u['line']}")
        if u.get("pty"):
            print(f"  pty         {u['pty']}")
        guest = "attached" if u["guest_connected"] else "none"
        print(f"  bus         {u['bus_socket']}  guest {guest}")
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
    return EX_OK


def checkpoint_command(args: argparse.Namespace) -> int:
    """``uartbridge checkpoint [--uart NAME] [--output FILE] [--stop]``."""
    message: dict[str, Any] = {
        "cmd": "checkpoint",
        "uart": args.uart,
        "output": str(Path(args.output).resolve()) if args.output else None,
        "stop": bool(args.stop),
    }
    reply = _checked(request(control_path(args), message))
    for name, path in reply["written"].items():
        print(f"{name}: {path}")
    if reply.get("stopped"):
        print("daemon stopped", file=sys.stderr)
    return EX_OK

