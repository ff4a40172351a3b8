"""The daemon's configuration: a TOML file read into frozen dataclasses, strictly validated.

Every key, with its default, is documented in ``config.example.toml`` at the project root.
Validation is strict on purpose: an unknown key, a wrong type (``true`` is not an integer;
an integer is accepted where a float is expected), an unknown enum value, a negative size,
duplicate UART names or two things wanting the same socket are all a ``ConfigError`` whose
one-line message names the file, the key (dotted; ``uart[0]`` is the first ``[[uart]]``
table) and what was expected. No traceback ever reaches the user.

Defaults that depend on the environment (``runtime_dir``, ``state_dir``) are resolved when the
file is loaded, from ``uartbridge.paths`` (a file ``/etc/uartbridge/NAME.toml`` is instance
NAME, with the directories the ``uartbridge@NAME`` unit gets); derived paths
(``control_socket``, ``bus_socket``, the pty ``link``) from the resolved ``runtime_dir``.
Relative paths in a file resolve against the file's directory; symlinks are never resolved
(a socat pty link must stay a link).
"""

from __future__ import annotations

import argparse
import difflib
import grp
import ipaddress
import json
import math
import os
import re
import sys
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal, NoReturn, cast

from . import paths
from .bus.codec import MAX_TOKEN_LEN
from .errors import EX_NOINPUT, EX_OK, ConfigError, ConfigMissingError
from .eventloop import EVENT_LOOPS, EventLoopChoice, uvloop_version
from .names import NAME_RULE, is_safe_name
from .port.state import (
    MAX_RX_BACKLOG_BYTES,
    MAX_TX_BACKLOG_BYTES,
    DisconnectPolicy,
    PortSettings,
)
from .uart import PACES, Pace

LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]
ResumePolicy = Literal["auto", "never"]

LOG_FORMATS: tuple[LogFormat, ...] = ("auto", "json", "console")
LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")
RESUME_POLICIES: tuple[ResumePolicy, ...] = ("auto", "never")
DISCONNECT_POLICIES: tuple[DisconnectPolicy, ...] = ("buffer", "hold", "discard")
ClockMode = Literal["host", "guest"]
CLOCK_MODES: tuple[ClockMode, ...] = ("host", "guest")

PTY_URL = "pty:"
DEFAULT_SOURCE = "<default>"
# Bounds of the numbers whose extremes hurt: a checkpoint stores baudbase as an integer the
# chip could have (a 16550's clock / 16 is at most a few MHz; 100 MHz is generous), and a
# timer below these bounds would turn the event loop into a busy loop.
MAX_BAUDBASE = 100_000_000
MIN_INTERVAL_S = 0.1
MAX_INTERVAL_S = 86_400.0
MIN_RECONNECT_S = 0.01
MAX_RECONNECT_S = 3_600.0
MAX_STOP_RETRY_S = 3_600.0
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_URL_SCHEMES = ("rfc2217", "socket")
_GROUP_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?")


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonConfig:
    """The ``[daemon]`` table, with every default resolved.

    ``socket_group``: the group as written (a name or a gid; None for ""); ``socket_gid``:
    that group resolved on this host when the file was loaded.
    """

    runtime_dir: Path
    state_dir: Path
    control_socket: Path
    socket_group: str | int | None = None
    socket_gid: int | None = None
    log_format: LogFormat = "auto"
    log_level: LogLevel = "info"
    fail_fast: bool = False
    watchdog: bool = True
    event_loop: EventLoopChoice = "auto"


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointConfig:
    """The ``[checkpoint]`` table."""

    on_stop: bool = True
    resume: ResumePolicy = "auto"
    interval_s: float = 5.0
    keep_previous: bool = True
    stop_retry_s: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class UartConfig:
    """One ``[[uart]]`` table: the device, its host port and its sockets.

    ``tx_retry_limit``: None never drops the TSR byte; N drops it after N refused retries
    (QEMU's behaviour). ``bus_tcp``: (host, port) or None. ``bus_tcp_token``: the bytes of
    ``bus_tcp_token_file`` (None: no token; peers on another host are then refused).
    ``trace_file``: None is off. ``clock``: "host" (the host's monotonic clock) or "guest"
    (a bus v2 guest with GUEST_TIME drives it; others get host time). ``pace``: "none"
    (QEMU's instant line) or "line" (one character per character time).
    """

    name: str
    port: PortSettings
    baudbase: int = 115200
    tx_retry_limit: int | None = None
    clock: ClockMode = "host"
    pace: Pace = "none"
    bus_socket: Path
    bus_tcp: tuple[str, int] | None = None
    bus_tcp_token: bytes | None = field(default=None, repr=False)
    trace_file: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """A whole, validated configuration. ``source`` (where it came from) is not compared.

    ``instance``: NAME for ``/etc/uartbridge/NAME.toml`` (the ``uartbridge@NAME`` unit), None
    for the single service's config, any other file, or the embedded default.
    """

    daemon: DaemonConfig
    checkpoint: CheckpointConfig
    uarts: tuple[UartConfig, ...]
    source: str = field(compare=False)
    instance: str | None = None

    def uart(self, name: str) -> UartConfig:
        """The UART called ``name`` (KeyError if there is none)."""
        for u in self.uarts:
            if u.name == name:
                return u
        raise KeyError(name)


# --------------------------------------------------------------------------------------------
# Loading


def default_config_path() -> Path | None:
    """``/etc/uartbridge/uartbridge.toml`` when it exists (the single unit's config), else None."""
    return paths.DEFAULT_CONFIG if paths.DEFAULT_CONFIG.exists() else None


def load_config_or_default(path: str | Path | None) -> Config:
    """``path``, else ``/etc/uartbridge/uartbridge.toml`` when it exists, else the embedded one."""
    if path is None:
        path = default_config_path()
    return load_config(path) if path is not None else default_config()


def load_config(path: str | Path) -> Config:
    """Read and validate a config file (``ConfigMissingError`` if it cannot be read)."""
    p = Path(path)
    try:
        instance = paths.instance_of(p)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    try:
        data = p.read_bytes()
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise ConfigMissingError(f"{p}: cannot read config file: {reason}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = f"{exc.reason} at byte {exc.start}"
        raise ConfigError(f"{p}: not valid TOML: not UTF-8 ({where})") from exc
    return parse_config(text, source=str(p), base_dir=p.absolute().parent, instance=instance)


def parse_config(
    text: str,
    *,
    source: str,
    base_dir: str | Path | None = None,
    instance: str | None = None,
) -> Config:
    """Validate TOML text; ``source`` names it in errors, ``instance`` picks default dirs.

    Relative paths resolve against ``base_dir``; by default the directory of ``source`` when
    ``source`` is a path, else the current directory.
    """
    if base_dir is None:
        looks_like_path = not (source.startswith("<") and source.endswith(">"))
        base_dir = Path(source).absolute().parent if looks_like_path else Path.cwd()
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    return _Builder(source, Path(base_dir).absolute(), instance).build(doc)


def default_config() -> Config:
    """The embedded default (``uartbridge/default.toml``): one UART ``uart0`` on a new pty."""
    text = resources.files("uartbridge").joinpath("default.toml").read_text(encoding="utf-8")
    return parse_config(text, source=DEFAULT_SOURCE)


def check_config_command(args: argparse.Namespace) -> int:
    """``uartbridge check-config [FILE]``: validate, print a short summary, return the exit code.

    Without FILE: ``/etc/uartbridge/uartbridge.toml``. On error: one line on stderr naming the
    file and key; 78 (bad config) or 66 (no file).
    """
    path = args.file if args.file is not None else default_config_path()
    if path is None:
        print(
            f"uartbridge: no FILE given and no {paths.DEFAULT_CONFIG}: nothing to check",
            file=sys.stderr,
        )
        return EX_NOINPUT
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(f"uartbridge: {exc}", file=sys.stderr)
        return exc.exit_code
    print(summarize(cfg))
    return EX_OK


def summarize(cfg: Config) -> str:
    """A few human-readable lines describing a config (what ``check-config`` prints)."""
    d = cfg.daemon
    c = cfg.checkpoint
    lines = [
        f"{cfg.source}: OK, {len(cfg.uarts)} UART{'s' if len(cfg.uarts) != 1 else ''}"
        + (f", instance {cfg.instance}" if cfg.instance is not None else ""),
        f"  runtime_dir {d.runtime_dir}  state_dir {d.state_dir}",
        f"  control socket {d.control_socket}"
        + (f" (group {d.socket_group}, gid {d.socket_gid})" if d.socket_group is not None else ""),
        f"  log {d.log_format}/{d.log_level}  fail_fast={_toml(d.fail_fast)}"
        f"  watchdog={_toml(d.watchdog)}  event_loop={d.event_loop}",
        f"  checkpoint on_stop={_toml(c.on_stop)} resume={c.resume}"
        f" interval_s={c.interval_s:g} keep_previous={_toml(c.keep_previous)}"
        f" stop_retry_s={c.stop_retry_s:g}",
    ]
    for u in cfg.uarts:
        port = u.port.url
        if u.port.link_path is not None:
            port += f" -> {u.port.link_path}"
        bus = str(u.bus_socket)
        if u.bus_tcp is not None:
            bus += f" + tcp {_hostport(u.bus_tcp)}"
        timing = ""
        if u.clock != "host" or u.pace != "none":
            timing = f"  clock={u.clock} pace={u.pace}"
        lines.append(
            f"  uart {u.name}: port {port}  bus {bus}  on_disconnect={u.port.on_disconnect}"
            + timing
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Validation


def _toml(value: object) -> str:
    """A value as TOML would write it, for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _describe(value: object) -> str:
    """What a TOML value is, for 'got …' in messages."""
    if isinstance(value, bool):
        return f"{_toml(value)} (a boolean)"
    if isinstance(value, int):
        return f"{value} (an integer)"
    if isinstance(value, float):
        return f"{value!r} (a float)"
    if isinstance(value, str):
        return f"{_toml(value)} (a string)"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"{value!s} (a {type(value).__name__})"


def _hostport(hp: tuple[str, int]) -> str:
    host, port = hp
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _choices(values: Iterable[str]) -> str:
    return "one of " + ", ".join(_toml(v) for v in values)


class _Table:
    """Typed, tracked access to one TOML table; ``finish`` rejects keys nobody asked for."""

    def __init__(self, builder: _Builder, table: Mapping[str, object], prefix: str) -> None:
        self.b = builder
        self.table = table
        self.prefix = prefix
        self.known: list[str] = []

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, expected: str, value: object) -> NoReturn:
        self.b.fail(self.key(name), f"expected {expected}, got {_describe(value)}")

    def raw(self, name: str, default: object) -> object:
        self.known.append(name)
        return self.table.get(name, default)

    def string(self, name: str, default: str) -> str:
        value = self.raw(name, default)
        if not isinstance(value, str):
            self.fail(name, "a string", value)
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            self.fail(name, "a boolean (true or false)", value)
        return value

    def integer(
        self, name: str, default: int, *, minimum: int, what: str, maximum: int | None = None
    ) -> int:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(name, what, value)
        if maximum is not None and value > maximum:
            self.fail(name, what, value)
        return value

    def seconds(
        self, name: str, default: float, *, minimum: float, maximum: float, zero_means: str = ""
    ) -> float:
        """A duration from ``minimum`` to ``maximum`` seconds (or 0 when ``zero_means`` says)."""
        what = f"a number of seconds from {minimum:g} to {maximum:g}"
        if zero_means:
            what += f", or 0 ({zero_means})"
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(name, what, value)
        number = float(value)
        if number == 0 and zero_means:
            return 0.0
        if not math.isfinite(number) or not minimum <= number <= maximum:
            self.fail(name, what, value)
        return number

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name, default)
        if not isinstance(value, str) or value not in choices:
            self.fail(name, _choices(choices), value)
        return value

    def path(self, name: str, default: Path | None) -> Path | None:
        """A path key: "" means the default; relative paths resolve against the file's dir."""
        value = self.string(name, "")
        if value == "":
            return default
        return self.b.resolve(value)

    def finish(self) -> None:
        for name in self.table:
            if name not in self.known:
                hint = difflib.get_close_matches(name, self.known, n=1)
                did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
                self.b.fail(
                    self.key(name),
                    f"unknown key (expected one of {', '.join(self.known)}){did_you_mean}",
                )


class _Builder:
    """Turns a parsed TOML document into a ``Config``, failing on the first bad key."""

    def __init__(self, source: str, base_dir: Path, instance: str | None = None) -> None:
        self.source = source
        self.base_dir = base_dir
        self.instance = instance

    def fail(self, key: str, message: str) -> NoReturn:
        raise ConfigError(f"{self.source}: {key}: {message}")

    def resolve(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def table(self, doc: Mapping[str, object], name: str) -> _Table:
        value = doc.get(name, {})
        if not isinstance(value, Mapping):
            self.fail(name, f"expected a table [{name}], got {_describe(value)}")
        return _Table(self, value, name)

    def build(self, doc: Mapping[str, object]) -> Config:
        top = _Table(self, doc, "")
        top.known.extend(["daemon", "checkpoint", "uart"])
        top.finish()
        daemon = self.daemon(self.table(doc, "daemon"))
        checkpoint = self.checkpoint(self.table(doc, "checkpoint"))
        uarts = self.uarts(doc.get("uart"), daemon)
        self.check_unique(daemon, uarts)
        return Config(
            daemon=daemon,
            checkpoint=checkpoint,
            uarts=uarts,
            source=self.source,
            instance=self.instance,
        )

    def daemon(self, t: _Table) -> DaemonConfig:
        runtime_dir = t.path("runtime_dir", None) or paths.default_runtime_dir(self.instance)
        state_dir = t.path("state_dir", None) or paths.default_state_dir(self.instance)
        control_socket = t.path("control_socket", paths.control_socket_path(runtime_dir))
        assert control_socket is not None
        socket_group, socket_gid = _socket_group(t)
        cfg = DaemonConfig(
            runtime_dir=runtime_dir,
            state_dir=state_dir,
            control_socket=control_socket,
            socket_group=socket_group,
            socket_gid=socket_gid,
            log_format=cast(LogFormat, t.choice("log_format", "auto", LOG_FORMATS)),
            log_level=cast(LogLevel, t.choice("log_level", "info", LOG_LEVELS)),
            fail_fast=t.boolean("fail_fast", False),
            watchdog=t.boolean("watchdog", True),
            event_loop=_event_loop(t),
        )
        t.finish()
        return cfg

    def checkpoint(self, t: _Table) -> CheckpointConfig:
        cfg = CheckpointConfig(
            on_stop=t.boolean("on_stop", True),
            resume=cast(ResumePolicy, t.choice("resume", "auto", RESUME_POLICIES)),
            interval_s=t.seconds(
                "interval_s", 5.0, minimum=MIN_INTERVAL_S, maximum=MAX_INTERVAL_S, zero_means="off"
            ),
            keep_previous=t.boolean("keep_previous", True),
            stop_retry_s=t.seconds(
                "stop_retry_s", 30.0, minimum=1.0, maximum=MAX_STOP_RETRY_S,
                zero_means="no retry",
            ),
        )
        t.finish()
        return cfg

    def uarts(self, value: object, daemon: DaemonConfig) -> tuple[UartConfig, ...]:
        if value is None:
            self.fail("uart", "expected at least one [[uart]] table, got none")
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            self.fail("uart", f"expected an array of tables [[uart]], got {_describe(value)}")
        if not value:
            self.fail("uart", "expected at least one [[uart]] table, got an empty array")
        return tuple(
            self.uart(_Table(self, table, f"uart[{i}]"), i, daemon) for i, table in enumerate(value)
        )

    def uart(self, t: _Table, index: int, daemon: DaemonConfig) -> UartConfig:
        name = t.string("name", f"uart{index}")
        if not is_safe_name(name):
            t.fail("name", NAME_RULE, name)
        url = self.port_url(t)
        link = t.path("link", None)
        if url == PTY_URL:
            link = link or daemon.runtime_dir / f"{name}.pty"
        elif link is not None:
            t.fail("link", '"" (link is only for port = "pty:")', t.table["link"])
        on_disconnect = t.choice("on_disconnect", "buffer", DISCONNECT_POLICIES)
        backlog = t.integer(
            "backlog_bytes",
            1 << 20,
            minimum=0,
            maximum=MAX_TX_BACKLOG_BYTES,
            what=f"a size in bytes from 0 to {MAX_TX_BACKLOG_BYTES}",
        )
        rx_backlog = t.integer(
            "rx_backlog_bytes",
            4096,
            minimum=0,
            maximum=MAX_RX_BACKLOG_BYTES,
            what=f"a size in bytes from 0 to {MAX_RX_BACKLOG_BYTES}",
        )
        rtscts = t.boolean("rtscts", False)
        xonxoff = t.boolean("xonxoff", False)
        baudbase = t.integer(
            "baudbase",
            115200,
            minimum=1,
            maximum=MAX_BAUDBASE,
            what=f"a clock rate in baud from 1 to {MAX_BAUDBASE}",
        )
        retry = t.integer(
            "tx_retry_limit", -1, minimum=-1, what="-1 (never drop) or a retry count >= 0"
        )
        clock = t.choice("clock", "host", CLOCK_MODES)
        pace = t.choice("pace", "none", PACES)
        bus_socket = t.path("bus_socket", paths.bus_socket_path(daemon.runtime_dir, name))
        assert bus_socket is not None
        bus_tcp_text = t.string("bus_tcp", "")
        bus_tcp = None
        if bus_tcp_text:
            bus_tcp = _parse_hostport(bus_tcp_text)
            if bus_tcp is None:
                t.fail(
                    "bus_tcp", '"HOST:PORT" such as "127.0.0.1:5555" (or "" for none)', bus_tcp_text
                )
        bus_tcp_token = self.token_file(t, "bus_tcp_token_file")
        if bus_tcp_token is not None and bus_tcp is None:
            t.fail(
                "bus_tcp_token_file",
                '"" (a token is only for bus_tcp)',
                t.table["bus_tcp_token_file"],
            )
        lock_dir = t.string("lock_dir", "/var/lock")
        if lock_dir and not lock_dir.startswith("/"):
            t.fail("lock_dir", 'an absolute directory, or "" for no UUCP lock files', lock_dir)
        trace_file = t.path("trace_file", None)
        rmin = t.seconds("reconnect_min_s", 0.1, minimum=MIN_RECONNECT_S, maximum=MAX_RECONNECT_S)
        rmax = t.seconds("reconnect_max_s", 5.0, minimum=MIN_RECONNECT_S, maximum=MAX_RECONNECT_S)
        if rmin > rmax:
            t.fail(
                "reconnect_min_s",
                f"at most reconnect_max_s ({rmax:g})",
                t.table.get("reconnect_min_s", rmin),
            )
        t.finish()
        return UartConfig(
            name=name,
            port=PortSettings(
                url=url,
                link_path=str(link) if link is not None else None,
                on_disconnect=cast(DisconnectPolicy, on_disconnect),
                backlog_bytes=backlog,
                rx_backlog_bytes=rx_backlog,
                rtscts=rtscts,
                xonxoff=xonxoff,
                reconnect_min_s=rmin,
                reconnect_max_s=rmax,
                lock_dir=lock_dir or None,
            ),
            baudbase=baudbase,
            tx_retry_limit=None if retry == -1 else retry,
            clock=cast(ClockMode, clock),
            pace=cast(Pace, pace),
            bus_socket=bus_socket,
            bus_tcp=bus_tcp,
            bus_tcp_token=bus_tcp_token,
            trace_file=trace_file,
        )

    def token_file(self, t: _Table, name: str) -> bytes | None:
        """A secret read from a file only its owner can read (trailing newline stripped)."""
        path = t.path(name, None)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                data = f.read(MAX_TOKEN_LEN + 2)
        except OSError as exc:
            t.fail(name, f"a readable token file ({exc.strerror})", str(path))
        if mode & 0o077:
            t.fail(name, f"a file only its owner can read (mode {mode & 0o777:04o}: chmod 600)",
                   str(path))
        token = data.rstrip(b"\r\n")
        if not 1 <= len(token) <= MAX_TOKEN_LEN:
            t.fail(name, f"a token of 1 to {MAX_TOKEN_LEN} bytes", f"{len(token)} bytes in {path}")
        return token

    def port_url(self, t: _Table) -> str:
        """``port``: "pty:", rfc2217:// or socket:// HOST:PORT, else a path (made absolute)."""
        expected = '"pty:", a tty path, "rfc2217://HOST:PORT" or "socket://HOST:PORT"'
        value = t.string("port", PTY_URL)
        if value == PTY_URL:
            return value
        scheme, sep, rest = value.partition("://")
        if sep:
            address = rest.split("?", 1)[0]
            if scheme not in _URL_SCHEMES or _parse_hostport(address) is None:
                t.fail("port", expected, value)
            return value
        if value == "" or value.endswith(":") or "\0" in value:
            t.fail("port", expected, value)
        return str(self.resolve(value))

    def check_unique(self, daemon: DaemonConfig, uarts: tuple[UartConfig, ...]) -> None:
        """Names, and every path or address the daemon creates, belong to one key only."""
        names: dict[str, str] = {}
        created: dict[str, str] = {os.path.normpath(daemon.control_socket): "daemon.control_socket"}
        tcp: dict[tuple[str, int], str] = {}
        for i, u in enumerate(uarts):
            prefix = f"uart[{i}]"
            if u.name in names:
                self.fail(
                    f"{prefix}.name",
                    f"expected a unique name, got {_toml(u.name)} "
                    f"(already used by {names[u.name]})",
                )
            names[u.name] = prefix
            mine = [("bus_socket", u.bus_socket)]
            if u.port.link_path is not None:
                mine.append(("link", Path(u.port.link_path)))
            if u.trace_file is not None:
                mine.append(("trace_file", u.trace_file))
            for key, p in mine:
                norm = os.path.normpath(p)
                if norm in created:
                    self.fail(
                        f"{prefix}.{key}",
                        f"expected a path of its own, got {_toml(norm)} "
                        f"(already used by {created[norm]})",
                    )
                created[norm] = f"{prefix}.{key}"
            if u.bus_tcp is not None:
                if u.bus_tcp in tcp:
                    self.fail(
                        f"{prefix}.bus_tcp",
                        f"expected an address of its own, got "
                        f"{_toml(_hostport(u.bus_tcp))} (already used by {tcp[u.bus_tcp]})",
                    )
                tcp[u.bus_tcp] = f"{prefix}.bus_tcp"


def _event_loop(t: _Table) -> EventLoopChoice:
    """``daemon.event_loop``: "uvloop" only where uvloop can be imported (as a group name must
    exist on this host), so check-config refuses what run would refuse."""
    choice = cast(EventLoopChoice, t.choice("event_loop", "auto", EVENT_LOOPS))
    if choice == "uvloop" and uvloop_version() is None:
        t.fail("event_loop", "\"auto\" or \"asyncio\" (uvloop is not installed: "
               "pip install 'uartbridge[fast]')", choice)
    return choice


def _socket_group(t: _Table) -> tuple[str | int | None, int | None]:
    """``daemon.socket_group``: (as written, resolved gid); a name must exist on this host."""
    expected = 'a group name or gid, or "" for none'
    group = t.raw("socket_group", "")
    if group == "":
        return None, None
    if isinstance(group, str) and group.isdigit():
        return int(group), int(group)
    if isinstance(group, int) and not isinstance(group, bool) and group >= 0:
        return group, group
    if not isinstance(group, str) or not _GROUP_RE.fullmatch(group):
        t.fail("socket_group", expected, group)
    try:
        return group, grp.getgrnam(group).gr_gid
    except KeyError:
        t.fail("socket_group", "a group that exists on this host", group)


def _parse_hostport(text: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` with an explicit host and a port 1-65535; else None."""
    m = re.fullmatch(r"\[([^\[\]]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", text)
    if m is None:
        return None
    if m.group(1) is not None:
        host, port = m.group(1), int(m.group(2))
        try:
            if ipaddress.ip_address(host).version != 6:
                return None
        except ValueError:
            return None
    else:
        host, port = m.group(3), int(m.group(4))
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if not _HOSTNAME_RE.fullmatch(host) or host.replace(".", "").isdigit():
                return None
    if not 1 <= port <= 65535:
        return None
    return host, port
