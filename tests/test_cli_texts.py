"""The words users read: --help, the man page, README's links and its walk-through."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import REPO, require_program, wait_for

from uartbridge import cli, manpage

README = REPO / "README.md"


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("name", [c[0] for c in cli.COMMANDS])
def test_every_subcommand_explains_itself(name: str) -> None:
    """`uartbridge CMD --help`: a one-line summary, a description, help for every argument,
    and examples that run this very command."""
    parser = _subparsers()[name]
    summary = next(c[1] for c in cli.COMMANDS if c[0] == name)
    assert summary and "\n" not in summary
    assert parser.description and len(parser.description) > len(summary)
    for action in parser._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help, f"{name}: {action.dest} has no help"
    assert parser.epilog and parser.epilog.startswith("examples:")
    examples = [line.strip() for line in parser.epilog.splitlines()[1:] if line.strip()]
    assert examples and all(
        e.startswith(f"uartbridge {name}") or f"| uartbridge {name}" in e for e in examples
    )
    text = subprocess.run([sys.executable, "-m", "uartbridge", name, "--help"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert text.returncode == 0 and "examples:" in text.stdout


def test_console_finds_the_daemon_like_the_others() -> None:
    """`console` takes --config, --instance and --control, as status and checkpoint do."""
    for name in ("console", "status", "checkpoint"):
        options = {o for a in _subparsers()[name]._actions for o in a.option_strings}
        assert {"--config", "--instance", "--control"} <= options, name


def test_the_man_page_is_the_parser() -> None:
    """docs/uartbridge.1 is what `python3 -m uartbridge.manpage` prints (regenerate it)."""
    assert (REPO / "docs" / "uartbridge.1").read_text() == manpage.render(), (
        "docs/uartbridge.1 is stale: python3 -m uartbridge.manpage > docs/uartbridge.1"
    )


def test_the_man_page_renders() -> None:
    """man(1) formats the page without a warning."""
    man = require_program("man")
    result = subprocess.run(
        [man, "--warnings", "-l", str(REPO / "docs" / "uartbridge.1")],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, MANWIDTH="80"),
    )
    assert result.returncode == 0 and "checkpoint" in result.stdout
    assert result.stderr == "", result.stderr


LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_no_link_leaves_the_repository() -> None:
    """Every relative link in README.md and docs/*.md names a file of the repository; none
    points at ../shared or anywhere outside."""
    pages = [README, *sorted((REPO / "docs").rglob("*.md"))]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert "../shared" not in text, page
        for target in LINK.findall(text):
            if target.startswith(("http://", "https://", "mailto:", "#", "man:")):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            assert path.is_relative_to(REPO), (page, target)
            assert path.exists(), (page, target)


def _walkthrough_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("### A first session", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.S)


def test_the_readme_walkthrough_runs_verbatim(tmp_path: Path) -> None:
    """README's first session, its shell blocks run as written (only /tmp/walk moved to a
    directory of the test's, and python3 being the test's interpreter); the interactive
    steps between them (picocom, console) are the text's, not run here."""
    require_program("socat")
    blocks = _walkthrough_blocks()
    assert len(blocks) == 2 and "mkdir -p /tmp/walk" in blocks[0]
    walk = tmp_path / "walk"
    # python3 is this interpreter (its venv's bin first on PATH).
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    script = "set -e\n"
    for i, block in enumerate(blocks):
        script += block.replace("/tmp/walk", str(walk))
        if i == 0:  # let the daemon come up before the second block talks to it
            script += f"for i in $(seq 200); do [ -S {walk}/run/control.sock ] && break; " \
                      "sleep 0.05; done\n"
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:  # background jobs keep them
        # Its own session: the shell's background jobs (socat, the daemon) share its process
        # group, which the test stops by its id in finally, whatever happened.
        shell = subprocess.Popen(["bash", "-c", script], stdout=stdout, stderr=stderr,
                                 cwd=REPO, env=env, start_new_session=True)
    try:
        code = shell.wait(timeout=120)
        stdout_text, stderr_text = out.read_text(), err.read_text()
        assert code == 0, stdout_text + stderr_text
        assert f"{walk}/walk.toml: OK, 1 UART" in stdout_text
        assert "uart0: connected" in stdout_text  # status, with socat as the far end
        assert f"uart0: {walk}/state/uart0.checkpoint.json" in stdout_text
        assert "daemon stopped" in stderr_text
        control = walk / "run" / "control.sock"
        wait_for(control.exists, 20)  # the resumed daemon
        status = subprocess.run([sys.executable, "-m", "uartbridge", "status", "--control",
                                 str(control)], capture_output=True, text=True, timeout=60,
                                cwd=REPO)
        assert "resumed" in status.stdout, status.stdout + status.stderr
    finally:
        _stop_group(shell.pid)


def _gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _stop_group(pgid: int) -> None:
    """SIGTERM the process group (the resumed daemon checkpoints and exits), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while not _gone(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
