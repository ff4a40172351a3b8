"""The config file: defaults, the example file, strict validation, check-config exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import grp
import os
import re
from pathlib import Path

import pytest

from uartbridge import cli
from uartbridge.config import (
    CheckpointConfig,
    Config,
    DaemonConfig,
    UartConfig,
    check_config_command,
    default_config,
    load_config,
    parse_config,
)
from uartbridge.errors import EX_CONFIG, EX_NOINPUT, ConfigError, ConfigMissingError
from uartbridge.port.state import PortSettings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"
GROUP = grp.getgrgid(os.getgid()).gr_name
UART = '[[uart]]\nname = "uart0"\nport = "pty:"\n'


@pytest.fixture(autouse=True)
def _runtime_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Pin the environment-derived default directories to this test's tmp_path."""
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "run"))
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))


def write(tmp_path: Path, text: str, name: str = "ub.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_every_default(tmp_path: Path) -> None:
    """A [[uart]] with nothing else gets every documented default."""
    cfg = parse_config("[[uart]]\n", source=str(tmp_path / "c.toml"))
    run = tmp_path / "run"
    assert cfg.daemon == DaemonConfig(
        runtime_dir=run,
        state_dir=tmp_path / "state",
        control_socket=run / "control.sock",
        socket_group=None,
        socket_gid=None,
        log_format="auto",
        log_level="info",
        fail_fast=False,
        watchdog=True,
        event_loop="auto",
    )
    assert cfg.checkpoint == CheckpointConfig(
        on_stop=True, resume="auto", interval_s=5.0, keep_previous=True
    )
    assert cfg.uarts == (
        UartConfig(
            name="uart0",
            port=PortSettings(
                url="pty:",
                link_path=str(run / "uart0.pty"),
                on_disconnect="buffer",
                backlog_bytes=1048576,
                rx_backlog_bytes=4096,
                rtscts=False,
                xonxoff=False,
                reconnect_min_s=0.1,
                reconnect_max_s=5.0,
            ),
            baudbase=115200,
            tx_retry_limit=None,
            bus_socket=run / "uart0.bus",
            bus_tcp=None,
            trace_file=None,
        ),
    )


def test_example_file_loads_and_equals_defaults() -> None:
    """config.example.toml is valid and equal to the defaults it documents."""
    cfg = load_config(EXAMPLE)
    assert cfg == parse_config(UART, source="<test>")
    assert cfg.source == str(EXAMPLE)


def test_example_documents_every_key() -> None:
    """Every key the loader accepts appears, uncommented, in config.example.toml."""
    text = EXAMPLE.read_text(encoding="utf-8")
    keys = {line.split("=")[0].strip() for line in text.splitlines() if "=" in line
            and not line.lstrip().startswith("#")}
    expected = {f.name for f in dataclasses.fields(DaemonConfig)} - {"socket_gid"}
    expected |= {f.name for f in dataclasses.fields(CheckpointConfig)}
    expected |= {"name", "port", "link", "baudbase", "tx_retry_limit", "bus_socket", "bus_tcp",
                 "trace_file", "on_disconnect", "backlog_bytes", "rx_backlog_bytes", "rtscts",
                 "xonxoff", "reconnect_min_s", "reconnect_max_s", "bus_tcp_token_file", "lock_dir",
                 "clock", "pace"}
    assert keys == expected


def test_embedded_default_is_one_pty_uart() -> None:
    """default_config() is one UART named uart0 on a daemon-created pty."""
    cfg = default_config()
    assert cfg.source == "<default>"
    assert [u.name for u in cfg.uarts] == ["uart0"]
    assert cfg.uarts[0].port.url == "pty:"
    assert cfg == parse_config(UART, source="<test>")


def test_every_key_set(tmp_path: Path) -> None:
    """Every key, set to a non-default value, lands in the right field."""
    text = """
[daemon]
runtime_dir = "/srv/ub/run"
state_dir = "/srv/ub/state"
control_socket = "/srv/ub/ctl.sock"
socket_group = "{GROUP}"
log_format = "json"
log_level = "debug"
fail_fast = true
watchdog = false
event_loop = "asyncio"

[checkpoint]
on_stop = false
resume = "never"
interval_s = 0
keep_previous = false

[[uart]]
name = "con-1.a_b"
port = "/dev/ttyUSB3"
baudbase = 1843200
on_disconnect = "discard"
backlog_bytes = 0
rx_backlog_bytes = 1
rtscts = true
xonxoff = true
tx_retry_limit = 4
clock = "guest"
pace = "line"
bus_socket = "/srv/ub/b.sock"
bus_tcp = "[::1]:5555"
trace_file = "/srv/ub/trace.txt"
reconnect_min_s = 1
reconnect_max_s = 1
"""
    cfg = parse_config(text.replace("{GROUP}", GROUP), source=str(tmp_path / "c.toml"))
    d, c, u = cfg.daemon, cfg.checkpoint, cfg.uarts[0]
    assert (d.runtime_dir, d.state_dir, d.control_socket) == (
        Path("/srv/ub/run"), Path("/srv/ub/state"), Path("/srv/ub/ctl.sock"))
    assert (d.socket_group, d.socket_gid, d.log_format, d.log_level, d.fail_fast, d.watchdog) == (
        GROUP, os.getgid(), "json", "debug", True, False)
    assert d.event_loop == "asyncio"
    assert c == CheckpointConfig(on_stop=False, resume="never", interval_s=0.0,
                                 keep_previous=False)
    assert u.port == PortSettings(url="/dev/ttyUSB3", link_path=None, on_disconnect="discard",
                                  backlog_bytes=0, rx_backlog_bytes=1, rtscts=True, xonxoff=True,
                                  reconnect_min_s=1.0, reconnect_max_s=1.0)
    assert (u.name, u.baudbase, u.tx_retry_limit) == ("con-1.a_b", 1843200, 4)
    assert (u.clock, u.pace) == ("guest", "line")
    assert (u.bus_socket, u.bus_tcp, u.trace_file) == (
        Path("/srv/ub/b.sock"), ("::1", 5555), Path("/srv/ub/trace.txt"))


def test_derived_paths_follow_runtime_dir(tmp_path: Path) -> None:
    """control_socket, bus_socket and the pty link default to <runtime_dir>/…, per UART name."""
    cfg = parse_config('[daemon]\nruntime_dir = "/r"\n[[uart]]\n[[uart]]\nname = "b"\n',
                       source=str(tmp_path / "c.toml"))
    assert cfg.daemon.control_socket == Path("/r/control.sock")
    assert [u.name for u in cfg.uarts] == ["uart0", "b"]
    assert [u.bus_socket for u in cfg.uarts] == [Path("/r/uart0.bus"), Path("/r/b.bus")]
    assert [u.port.link_path for u in cfg.uarts] == ["/r/uart0.pty", "/r/b.pty"]


def test_relative_paths_resolve_against_config_dir(tmp_path: Path) -> None:
    """Relative paths in a file resolve against that file's directory, symlinks untouched."""
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (tmp_path / "real").mkdir()
    (conf_dir / "ttyA").symlink_to(tmp_path / "real")
    path = write(conf_dir, """
[daemon]
runtime_dir = "run"
state_dir = "../state"
[[uart]]
port = "ttyA"
trace_file = "traces/t.log"
bus_socket = "./b.sock"
[[uart]]
link = "links/p"
""")
    cfg = load_config(path)
    assert cfg.daemon.runtime_dir == conf_dir / "run"
    assert cfg.daemon.state_dir == conf_dir / ".." / "state"
    u0, u1 = cfg.uarts
    assert u0.port.url == str(conf_dir / "ttyA")
    assert u0.trace_file == conf_dir / "traces" / "t.log"
    assert u0.bus_socket == conf_dir / "b.sock"
    assert u1.port.link_path == str(conf_dir / "links" / "p")


def test_relative_load_path_gives_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config loaded by a relative path still yields absolute paths."""
    write(tmp_path, '[[uart]]\nport = "ttyA"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_config("ub.toml")
    assert cfg.uarts[0].port.url == str(tmp_path / "ttyA")


@pytest.mark.parametrize(
    "port",
    ["pty:", "/dev/ttyUSB0", "/dev/serial/by-id/usb-FTDI_A1-if00-port0",
     "rfc2217://localhost:7000", "rfc2217://10.0.0.2:2217?logging=debug",
     "socket://[::1]:4000", "socket://serial-gw.example.com:4001"],
)
def test_accepted_ports(port: str) -> None:
    """Every documented kind of port is accepted and kept as written."""
    cfg = parse_config(f'[[uart]]\nport = "{port}"\n', source="<test>")
    assert cfg.uarts[0].port.url == port


@pytest.mark.parametrize(
    ("text", "value"),
    [('"127.0.0.1:5555"', ("127.0.0.1", 5555)), ('"0.0.0.0:1"', ("0.0.0.0", 1)),
     ('"localhost:65535"', ("localhost", 65535)), ('"[fe80::1%eth0]:9"', ("fe80::1%eth0", 9))],
)
def test_bus_tcp_parses(text: str, value: tuple[str, int]) -> None:
    """bus_tcp takes HOST:PORT or [IPv6]:PORT, with any explicit host."""
    cfg = parse_config(f"[[uart]]\nbus_tcp = {text}\n", source="<test>")
    assert cfg.uarts[0].bus_tcp == value


@pytest.mark.parametrize(("text", "value"), [("-1", None), ("0", 0), ("4", 4)])
def test_tx_retry_limit(text: str, value: int | None) -> None:
    """tx_retry_limit -1 means never drop (None); N >= 0 is kept."""
    cfg = parse_config(f"[[uart]]\ntx_retry_limit = {text}\n", source="<test>")
    assert cfg.uarts[0].tx_retry_limit == value


@pytest.mark.parametrize(
    ("text", "value", "gid"),
    [('"20"', 20, 20), ("4321", 4321, 4321), (f'"{GROUP}"', GROUP, os.getgid())],
)
def test_socket_group_name_or_gid(text: str, value: str | int, gid: int) -> None:
    """socket_group takes a group name (resolved to socket_gid here) or a gid."""
    cfg = parse_config(f"[daemon]\nsocket_group = {text}\n{UART}", source="<test>")
    assert (cfg.daemon.socket_group, cfg.daemon.socket_gid) == (value, gid)


def test_int_accepted_for_float() -> None:
    """An integer is accepted where a number of seconds is expected, and becomes a float."""
    cfg = parse_config("[checkpoint]\ninterval_s = 2\n[[uart]]\nreconnect_max_s = 10\n",
                       source="<test>")
    assert cfg.checkpoint.interval_s == 2.0 and isinstance(cfg.checkpoint.interval_s, float)
    assert isinstance(cfg.uarts[0].port.reconnect_max_s, float)


# key, TOML snippet (placed in its table), expected fragment of the message
BAD = [
    ("daemon.log_format", "[daemon]\nlog_format = \"xml\"", '"auto", "json", "console"'),
    ("daemon.log_level", "[daemon]\nlog_level = \"INFO\"", '"debug", "info"'),
    ("daemon.fail_fast", "[daemon]\nfail_fast = 1", "expected a boolean"),
    ("daemon.watchdog", "[daemon]\nwatchdog = \"yes\"", "expected a boolean"),
    ("daemon.event_loop", "[daemon]\nevent_loop = \"fast\"", '"auto", "asyncio", "uvloop"'),
    ("daemon.runtime_dir", "[daemon]\nruntime_dir = 5", "expected a string"),
    ("daemon.socket_group", "[daemon]\nsocket_group = -1", "a group name or gid"),
    ("daemon.socket_group", "[daemon]\nsocket_group = \"a b\"", "a group name or gid"),
    ("daemon.socket_group", "[daemon]\nsocket_group = \"no-such-group-ub\"",
     "a group that exists on this host"),
    ("daemon.log_fromat", "[daemon]\nlog_fromat = \"json\"", "did you mean 'log_format'"),
    ("checkpoint.resume", "[checkpoint]\nresume = \"always\"", '"auto", "never"'),
    ("checkpoint.interval_s", "[checkpoint]\ninterval_s = -1", "from 0.1 to 86400, or 0 (off)"),
    ("checkpoint.interval_s", "[checkpoint]\ninterval_s = nan", "from 0.1 to 86400"),
    ("checkpoint.interval_s", "[checkpoint]\ninterval_s = inf", "from 0.1 to 86400"),
    ("checkpoint.interval_s", "[checkpoint]\ninterval_s = 1e-6", "from 0.1 to 86400"),
    ("checkpoint.stop_retry_s", "[checkpoint]\nstop_retry_s = 0.5", "from 1 to 3600, or 0"),
    ("checkpoint.stop_retry_s", "[checkpoint]\nstop_retry_s = 1e9", "from 1 to 3600"),
    ("checkpoint.interval_s", "[checkpoint]\ninterval_s = \"5\"", "a number of seconds"),
    ("checkpoint.on_stop", "[checkpoint]\non_stop = 0", "expected a boolean"),
    ("uart[0].on_disconnect", "on_disconnect = \"drop\"", '"buffer", "hold", "discard"'),
    ("uart[0].backlog_bytes", "backlog_bytes = -1", "a size in bytes from 0 to 16777216"),
    ("uart[0].backlog_bytes", "backlog_bytes = 16777217", "a size in bytes from 0 to 16777216"),
    ("uart[0].rx_backlog_bytes", "rx_backlog_bytes = -4096", "a size in bytes from 0 to 1048576"),
    ("uart[0].rx_backlog_bytes", "rx_backlog_bytes = 1048577", "a size in bytes from 0 to"),
    ("uart[0].backlog_bytes", "backlog_bytes = 1.5", "a size in bytes"),
    ("uart[0].baudbase", "baudbase = 0", "from 1 to 100000000"),
    ("uart[0].baudbase", f"baudbase = {2**63}", "from 1 to 100000000"),
    ("uart[0].baudbase", "baudbase = 100000001", "from 1 to 100000000"),
    ("uart[0].tx_retry_limit", "tx_retry_limit = -2", "-1 (never drop)"),
    ("uart[0].clock", "clock = \"virtual\"", '"host", "guest"'),
    ("uart[0].pace", "pace = \"fast\"", '"none", "line"'),
    ("uart[0].pace", "pace = true", "got true (a boolean)"),
    ("uart[0].name", "name = \"has space\"", "A-Z a-z 0-9 _ . -"),
    ("uart[0].name", "name = \"\"", "1 to 32 characters"),
    ("uart[0].name", f"name = \"{'x' * 33}\"", "1 to 32 characters"),
    ("uart[0].name", "name = \"a/b\"", "A-Z a-z 0-9 _ . -"),
    ("uart[0].name", "name = \"_x\"", "starting with a letter or digit"),
    ("uart[0].name", "name = \".x\"", "starting with a letter or digit"),
    ("uart[0].name", "name = \"..\"", "starting with a letter or digit"),
    ("uart[0].name", "name = \"-x\"", "starting with a letter or digit"),
    ("uart[0].port", "port = \"\"", "a tty path"),
    ("uart[0].port", "port = \"loop://\"", "rfc2217://HOST:PORT"),
    ("uart[0].port", "port = \"rfc2217://nohost\"", "rfc2217://HOST:PORT"),
    ("uart[0].link", "port = \"pty\"\nlink = \"x\"", '"" (link is only for port = "pty:")'),
    ("uart[0].port", "port = \"COM3:\"", "a tty path"),
    ("uart[0].link", "port = \"/dev/ttyUSB0\"\nlink = \"/run/x\"", 'only for port = "pty:"'),
    ("uart[0].bus_tcp", "bus_tcp = \"5555\"", '"HOST:PORT"'),
    ("uart[0].bus_tcp", "bus_tcp = \":5555\"", '"HOST:PORT"'),
    ("uart[0].bus_tcp", "bus_tcp = \"localhost:0\"", '"HOST:PORT"'),
    ("uart[0].bus_tcp", "bus_tcp = \"localhost:70000\"", '"HOST:PORT"'),
    ("uart[0].bus_tcp", "bus_tcp = \"::1:5555\"", '"HOST:PORT"'),
    ("uart[0].bus_tcp", "bus_tcp = \"[127.0.0.1]:5555\"", '"HOST:PORT"'),
    ("uart[0].bus_tcp", "bus_tcp = 5555", "expected a string"),
    ("uart[0].reconnect_min_s", "reconnect_min_s = 6", "at most reconnect_max_s (5)"),
    ("uart[0].reconnect_min_s", "reconnect_min_s = 0", "from 0.01 to 3600"),
    ("uart[0].reconnect_min_s", "reconnect_min_s = 1e-300", "from 0.01 to 3600"),
    ("uart[0].reconnect_max_s", "reconnect_max_s = -1.0", "from 0.01 to 3600"),
    ("uart[0].reconnect_max_s", "reconnect_max_s = 1e300", "from 0.01 to 3600"),
    ("uart[0].rtscts", "rtscts = \"true\"", "expected a boolean"),
    ("uart[0].baudrate", "baudrate = 9600", "unknown key"),
    ("uart[0].lock_dir", "lock_dir = \"var/lock\"", "an absolute directory"),
    ("uart[0].bus_tcp_token_file", "bus_tcp_token_file = \"/nonexistent/token\"",
     "a readable token file"),
]


def _token_file(tmp_path: Path, data: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "bus.token"
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_bus_tcp_token_file_is_read_without_its_newline(tmp_path: Path) -> None:
    """bus_tcp_token_file's bytes (a trailing newline stripped) become the UART's TCP token,
    kept out of the config's repr."""
    token = _token_file(tmp_path, b"s3cret\n")
    cfg = load_config(write(tmp_path, f'{UART}bus_tcp = "127.0.0.1:5555"\n'
                                      f'bus_tcp_token_file = "{token}"\n'))
    assert cfg.uarts[0].bus_tcp_token == b"s3cret"
    assert "s3cret" not in repr(cfg)


@pytest.mark.parametrize(
    ("data", "mode", "bus_tcp", "expected"),
    [
        (b"s3cret", 0o644, True, "a file only its owner can read (mode 0644: chmod 600)"),
        (b"s3cret", 0o640, True, "a file only its owner can read"),
        (b"\n", 0o600, True, "a token of 1 to 255 bytes"),
        (b"x" * 256, 0o600, True, "a token of 1 to 255 bytes"),
        (b"s3cret", 0o600, False, '"" (a token is only for bus_tcp)'),
    ],
)
def test_bad_bus_tcp_token_file_is_refused(
    tmp_path: Path, data: bytes, mode: int, bus_tcp: bool, expected: str
) -> None:
    """A token file others can read, an empty or oversized token, or a token without bus_tcp
    is a config error naming the key."""
    token = _token_file(tmp_path, data, mode)
    tcp = 'bus_tcp = "127.0.0.1:5555"\n' if bus_tcp else ""
    path = write(tmp_path, f'{UART}{tcp}bus_tcp_token_file = "{token}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "uart[0].bus_tcp_token_file" in str(info.value)
    assert expected in str(info.value)


@pytest.mark.parametrize(("text", "value"), [("\"/run/lock\"", "/run/lock"), ("\"\"", None)])
def test_lock_dir_reaches_the_port_settings(tmp_path: Path, text: str, value: str | None) -> None:
    """lock_dir names where UUCP lock files live; "" turns them off."""
    cfg = load_config(write(tmp_path, f"{UART}lock_dir = {text}\n"))
    assert cfg.uarts[0].port.lock_dir == value


@pytest.mark.parametrize(("key", "snippet", "expected"), BAD, ids=[f"{k}:{s.splitlines()[-1]}"
                                                                   for k, s, _ in BAD])
def test_bad_value_names_file_key_expectation(
    tmp_path: Path, key: str, snippet: str, expected: str
) -> None:
    """A bad key or value is a ConfigError naming the file, the dotted key and the expectation."""
    text = f"{snippet}\n{UART}" if snippet.startswith("[") else f"{UART}{snippet}\n"
    if snippet.startswith("port"):  # replace the UART's port rather than repeat the key
        text = f'[[uart]]\nname = "uart0"\n{snippet}\n'
    if snippet.startswith("name"):
        text = f"[[uart]]\n{snippet}\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert expected in message
    assert "\n" not in message
    assert info.value.exit_code == EX_CONFIG


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ('[[uart]]\nname = "a"\n[[uart]]\nname = "a"\n', "uart[1].name", "already used by uart[0]"),
        ('[[uart]]\nname = "a"\nbus_socket = "/r/x"\n[[uart]]\nbus_socket = "/r/x"\n',
         "uart[1].bus_socket", "already used by uart[0].bus_socket"),
        ('[daemon]\ncontrol_socket = "/r/c"\n[[uart]]\nbus_socket = "/r/c"\n',
         "uart[0].bus_socket", "already used by daemon.control_socket"),
        ('[daemon]\nruntime_dir = "/r"\ncontrol_socket = "/r/x.bus"\n[[uart]]\nname = "x"\n',
         "uart[0].bus_socket", "already used by daemon.control_socket"),
        ('[[uart]]\nbus_tcp = "127.0.0.1:9"\n[[uart]]\nbus_tcp = "127.0.0.1:9"\n',
         "uart[1].bus_tcp", "already used by uart[0].bus_tcp"),
        ('[[uart]]\nlink = "/r/l"\n[[uart]]\ntrace_file = "/r/l"\n', "uart[1].trace_file",
         "already used by uart[0].link"),
    ],
    ids=["name", "bus_socket", "control_socket", "derived", "bus_tcp", "link-vs-trace"],
)
def test_duplicates_are_errors(tmp_path: Path, text: str, key: str, expected: str) -> None:
    """Two UARTs may not share a name, a socket, an address or any path the daemon creates."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert expected in message


def test_derived_name_collision() -> None:
    """Explicit sockets that collide with another UART's default are caught too."""
    text = ('[daemon]\nruntime_dir = "/r"\n[[uart]]\nname = "a"\n'
            '[[uart]]\nname = "b"\nbus_socket = "/r/a.bus"\n')
    with pytest.raises(ConfigError, match=r"uart\[1\]\.bus_socket: .*already used by "
                                          r"uart\[0\]\.bus_socket"):
        parse_config(text, source="<test>")


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("[daemon]\n", "uart", "at least one [[uart]] table"),
        ("uart = []\n", "uart", "at least one [[uart]] table"),
        ("[uart]\nname = \"a\"\n", "uart", "an array of tables [[uart]]"),
        ('uart = ["a"]\n', "uart", "an array of tables [[uart]]"),
        (f"daemon = 3\n{UART}", "daemon", "a table [daemon]"),
        (f"[deamon]\n{UART}", "deamon", "did you mean 'daemon'"),
        (f"[checkpoint.sub]\nx = 1\n{UART}", "checkpoint.sub", "unknown key"),
    ],
)
def test_structure_errors(tmp_path: Path, text: str, key: str, expected: str) -> None:
    """Missing or misshapen tables are errors naming the file, the key and the expectation."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {key}: ")
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("key", "snippet"),
    [("daemon.fail_fast", "[daemon]\nfail_fast = 0"),
     ("uart[0].baudbase", "baudbase = true"),
     ("uart[0].tx_retry_limit", "tx_retry_limit = false"),
     ("uart[0].reconnect_min_s", "reconnect_min_s = true"),
     ("checkpoint.interval_s", "[checkpoint]\ninterval_s = true")],
)
def test_bool_is_not_int(key: str, snippet: str) -> None:
    """true/false is never accepted as a number, nor 0/1 as a boolean."""
    text = f"{snippet}\n{UART}" if snippet.startswith("[") else f"{UART}{snippet}\n"
    with pytest.raises(ConfigError, match=rf"^<test>: {re.escape(key)}: expected "):
        parse_config(text, source="<test>")


def test_invalid_toml_names_file(tmp_path: Path) -> None:
    """A TOML syntax error is a one-line ConfigError naming the file and the position."""
    path = write(tmp_path, "[daemon\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not valid TOML: .*line 1"):
        load_config(path)


def test_not_utf8_is_config_error(tmp_path: Path) -> None:
    """A file that is not UTF-8 is a ConfigError, not a UnicodeDecodeError."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[[uart]]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_missing_file_is_noinput(tmp_path: Path) -> None:
    """A missing config file is ConfigMissingError with exit code 66."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigMissingError, match=rf"^{path}: cannot read config file") as info:
        load_config(path)
    assert info.value.exit_code == EX_NOINPUT


def test_config_is_frozen_and_slotted() -> None:
    """Config values are frozen, slotted, keyword-only dataclasses."""
    cfg = default_config()
    for obj in (cfg, cfg.daemon, cfg.checkpoint, cfg.uarts[0]):
        assert not hasattr(obj, "__dict__")
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, dataclasses.fields(obj)[0].name, "x")
    assert cfg.uart("uart0") is cfg.uarts[0]
    with pytest.raises(TypeError):
        Config(cfg.daemon, cfg.checkpoint, cfg.uarts, "x")  # type: ignore[misc]


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config on a good file prints a short summary and exits 0."""
    path = write(tmp_path, '[[uart]]\nname = "console"\nport = "/dev/ttyUSB0"\n')
    assert check_config_command(argparse.Namespace(file=str(path))) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert f"{path}: OK, 1 UART" in out
    assert "uart console: port /dev/ttyUSB0" in out


def test_check_config_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config on a bad file prints one stderr line naming file and key, and exits 78."""
    path = write(tmp_path, f'{UART}on_disconnect = "drop"\n')
    assert check_config_command(argparse.Namespace(file=str(path))) == 78
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert f"{path}: uart[0].on_disconnect: expected one of" in err
    assert "Traceback" not in err


def test_check_config_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config on a missing file prints one stderr line and exits 66."""
    path = tmp_path / "missing.toml"
    assert check_config_command(argparse.Namespace(file=str(path))) == 66
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and str(path) in err


def test_check_config_example(capsys: pytest.CaptureFixture[str]) -> None:
    """check-config accepts config.example.toml."""
    assert check_config_command(argparse.Namespace(file=str(EXAMPLE))) == 0
    assert "OK, 1 UART" in capsys.readouterr().out


def _cli_has_check_config() -> bool:
    for action in cli.build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return "check-config" in action.choices
    return False


@pytest.mark.skipif(not _cli_has_check_config(), reason="cli.py has no check-config yet")
@pytest.mark.parametrize(("text", "code"), [(UART, 0), ("[uart]\n", 78), (None, 66)])
def test_cli_check_config_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | None, code: int
) -> None:
    """`uartbridge check-config FILE` exits 0 (good), 78 (bad config), 66 (missing file)."""
    path = tmp_path / "cli.toml"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    assert cli.main(["check-config", str(path)]) == code
    if code:
        assert capsys.readouterr().err.count("\n") == 1


# -- the defaults the units expect ---------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "instance"),
    [
        ("/etc/uartbridge/uartbridge.toml", None),
        ("/etc/uartbridge/ttyUSB0.toml", "ttyUSB0"),
        ("/etc/uartbridge/sub/ttyUSB0.toml", None),
        ("/tmp/walk/walk.toml", None),
        ("/etc/uartbridge/ttyS1.conf", None),
    ],
)
def test_instance_of_a_config_path(path: str, instance: str | None) -> None:
    """/etc/uartbridge/NAME.toml is instance NAME (uartbridge@NAME); nothing else is one."""
    from uartbridge.paths import instance_of

    assert instance_of(path) == instance


def test_an_instance_name_that_cannot_name_a_directory_is_refused() -> None:
    """/etc/uartbridge/_x.toml cannot derive directories: a ConfigError naming the fix."""
    from uartbridge.paths import instance_of

    with pytest.raises(ValueError, match="set runtime_dir and state_dir"):
        instance_of("/etc/uartbridge/_x.toml")


def test_instance_defaults_are_the_template_units_directories(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Root, no systemd variables: instance NAME gets /run/uartbridge-NAME and
    /var/lib/uartbridge-NAME; no instance gets /run/uartbridge and /var/lib/uartbridge."""
    for variable in ("RUNTIME_DIRECTORY", "STATE_DIRECTORY", "XDG_RUNTIME_DIR",
                     "XDG_STATE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    cfg = parse_config(UART, source="<test>", instance="ttyS1")
    assert cfg.instance == "ttyS1"
    assert cfg.daemon.runtime_dir == Path("/run/uartbridge-ttyS1")
    assert cfg.daemon.state_dir == Path("/var/lib/uartbridge-ttyS1")
    assert cfg.daemon.control_socket == Path("/run/uartbridge-ttyS1/control.sock")
    plain = parse_config(UART, source="<test>")
    assert plain.daemon.runtime_dir == Path("/run/uartbridge")
    assert plain.daemon.state_dir == Path("/var/lib/uartbridge")


def test_systemd_directories_win_over_the_instance_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Under a unit, $RUNTIME_DIRECTORY/$STATE_DIRECTORY are used as systemd named them."""
    cfg = parse_config(UART, source="<test>", instance="ttyS1")
    assert cfg.daemon.runtime_dir == tmp_path / "run"
    assert cfg.daemon.state_dir == tmp_path / "state"


def test_one_name_rule_for_config_and_checkpoint() -> None:
    """The config's UART name rule is the names module's; every name it accepts names a
    checkpoint file (checkpoint_path does not refuse it)."""
    from uartbridge.checkpoint import checkpoint_path
    from uartbridge.names import is_safe_name

    for name in ("uart0", "a", "ttyUSB0", "a..b", "x-", "9", "A_b.c-d", "x" * 32):
        assert is_safe_name(name)
        parse_config(f'[[uart]]\nname = "{name}"\n', source="<test>")
        checkpoint_path("/tmp", name)
    for name in ("_x", ".x", "..", "-x", "", "x" * 33, "a/b", "a b", "é"):
        assert not is_safe_name(name)
