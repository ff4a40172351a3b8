"""The daemon's event loop: uvloop when installed, asyncio otherwise, or as configured."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from procs import REPO

from uartbridge.config import parse_config
from uartbridge.errors import EX_CONFIG, ConfigError
from uartbridge.eventloop import resolve, run, running_loop_name


def _without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` now raises ImportError


def test_auto_takes_uvloop_when_installed_and_asyncio_without(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """event_loop = "auto" runs on uvloop where it imports, on asyncio's loop where not."""
    assert resolve("auto") == "uvloop"  # uvloop is a test extra

    async def which() -> str:
        return running_loop_name()

    assert run(which(), "auto") == "uvloop"
    assert run(which(), "asyncio") == "asyncio"
    _without_uvloop(monkeypatch)
    assert resolve("auto") == "asyncio"
    assert run(which(), "auto") == "asyncio"


def test_forcing_uvloop_without_it_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """event_loop = "uvloop" where uvloop is missing: refused when the config is read (as
    check-config shows), naming the key and how to install it; running it is refused too."""
    _without_uvloop(monkeypatch)
    with pytest.raises(ConfigError, match=r"daemon\.event_loop: .*uartbridge\[fast\]"):
        parse_config('[daemon]\nevent_loop = "uvloop"\n[[uart]]\n', source="c.toml")
    assert parse_config('[daemon]\nevent_loop = "asyncio"\n[[uart]]\n', source="c.toml")

    async def never() -> None:
        raise AssertionError("must not run")

    with pytest.raises(ConfigError, match="uvloop is not installed"):
        run(never(), "uvloop")


def test_run_with_uvloop_forced_but_missing_exits_78_with_one_line(tmp_path: Path) -> None:
    """`uartbridge run` with event_loop = "uvloop" and no uvloop: exit 78, one line, no
    traceback. (uvloop is hidden by a package of that name that fails to import.)"""
    hide = tmp_path / "hide" / "uvloop"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text('raise ImportError("hidden by the test")\n')
    config = tmp_path / "ub.toml"
    config.write_text(
        f'[daemon]\nevent_loop = "uvloop"\nruntime_dir = "{tmp_path}/run"\n'
        f'state_dir = "{tmp_path}/state"\n[[uart]]\n'
    )
    env = {"PYTHONPATH": str(tmp_path / "hide"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "uartbridge", "run", "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=env,
    )
    assert done.returncode == EX_CONFIG, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "event_loop" in lines[0] and "uartbridge[fast]" in lines[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was created


def test_the_loop_runs_what_asyncio_run_would() -> None:
    """eventloop.run returns the coroutine's value and closes its loop, on either loop."""
    loops: list[asyncio.AbstractEventLoop] = []

    async def body(value: int) -> int:
        loops.append(asyncio.get_running_loop())
        await asyncio.sleep(0)
        return value * 2

    assert run(body(21), "asyncio") == 42
    assert run(body(4), "uvloop") == 8
    assert all(loop.is_closed() for loop in loops)
