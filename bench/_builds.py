"""The two builds side by side: every bench runs its figures on the pure and the compiled build.

``--build both`` (the default) makes a bench the conductor: it runs itself as a child process
per build and per round (``--build pure`` / ``--build compiled``, one run each), alternating
which build goes first, and prints every figure for both builds with their ratio from the
same rounds. On a shared machine whose speed moves by tens of per cent within minutes, that
ratio is the figure to trust; the absolute values move with the machine.

The builds:

- **pure**: this checkout's ``uartbridge/`` (its ``.py`` files), as the tests run it.
- **compiled**: a copy of this checkout's ``uartbridge/`` with the extension modules of a
  wheel built from it with mypyc (``UARTBRIDGE_COMPILED=1 pip wheel``), cached under /tmp by
  a hash of the sources it was built from (a changed source builds it again, ~1 min).

A child finds its build through ``UARTBRIDGE_BENCH_TREE`` (``_common.TREE``: put first on
``sys.path``, and the daemon's working directory, so ``python -m uartbridge`` imports it) and
checks, through ``uartbridge.buildinfo``, that it runs the build it was asked for; a bench
that measures a daemon also asks the daemon (``check_daemon_build``: its ``status``).
``--event-loop`` sets the daemon's ``[daemon] event_loop`` (default ``auto``: uvloop when
installed) in both builds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BUILDS = ("pure", "compiled")
TREE_ENV = "UARTBRIDGE_BENCH_TREE"
BUILD_ENV = "UARTBRIDGE_BENCH_BUILD"
LOOP_ENV = "UARTBRIDGE_BENCH_EVENT_LOOP"


def add_build_args(parser: argparse.ArgumentParser) -> None:
    """``--build`` and ``--event-loop``."""
    parser.add_argument("--build", choices=("both", *BUILDS), default="both",
                        help="pure, compiled, or both side by side with their ratio (default)")
    parser.add_argument("--event-loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                        help="the daemon's [daemon] event_loop (default auto)")


def _source_hash() -> str:
    digest = hashlib.sha256()
    for root in ("uartbridge", "build_backend"):
        for path in sorted((REPO / root).rglob("*.py")):
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    for name in ("setup.py", "pyproject.toml"):
        digest.update((REPO / name).read_bytes())
    return digest.hexdigest()[:16]


def compiled_tree() -> Path:
    """A directory holding ``uartbridge/`` as compiled by mypyc (built once per source)."""
    cache = Path(tempfile.gettempdir()) / f"ub-bench-compiled-{_source_hash()}"
    tree = cache / "tree"
    if (tree / "uartbridge").is_dir():
        return tree
    dist = cache / "dist"
    shutil.rmtree(cache, ignore_errors=True)
    print(f"[building the compiled wheel from {REPO} into {dist} ...]", file=sys.stderr)
    env = dict(os.environ, UARTBRIDGE_COMPILED="1")
    env.pop("UARTBRIDGE_PURE", None)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist),
                    str(REPO)], check=True, env=env, cwd=REPO)
    (wheel,) = dist.glob("uartbridge-*.whl")
    staging = cache / "staging"
    shutil.copytree(REPO / "uartbridge", staging / "uartbridge",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(staging, members=[n for n in archive.namelist()
                                             if n.endswith(".so")])
    staging.rename(tree)
    return tree


def tree_for(build: str) -> Path:
    """Where ``build`` is imported from."""
    return REPO if build == "pure" else compiled_tree()


def check_build(build: str, event_loop: str | None = None) -> str:
    """In a child (or a run of one build): the build name it runs; SystemExit if it is not
    the one asked for. ``event_loop``: the daemon's ``[daemon] event_loop`` (``_common``)."""
    from uartbridge.buildinfo import COMPILED, PURE, build_name

    if event_loop is not None:
        os.environ[LOOP_ENV] = event_loop

    running = build_name()
    if running != {"pure": PURE, "compiled": COMPILED}[build]:
        raise SystemExit(f"asked for the {build} build but uartbridge runs {running}")
    return running


def check_daemon_build(control: Path, build: str, event_loop: str | None = None) -> str:
    """Ask a running daemon (``status`` on its control socket) which build and event loop it
    runs; SystemExit if not ``build`` (or not ``event_loop``, unless ``auto``). Returns
    ``"BUILD, LOOP"``. The bench process's own imports say nothing of an exec'd daemon's."""
    from uartbridge.buildinfo import COMPILED, PURE
    from uartbridge.control import request

    status = request(control, {"cmd": "status"})
    running, loop = status.get("build"), status.get("event_loop")
    if running != {"pure": PURE, "compiled": COMPILED}[build]:
        raise SystemExit(f"asked for the {build} build but the daemon runs {running}")
    if event_loop not in (None, "auto") and loop != event_loop:
        raise SystemExit(f"asked for the {event_loop} event loop but the daemon runs {loop}")
    return f"{running}, {loop}"


def _child(script: Path, build: str, argv: list[str], event_loop: str) -> dict[str, Any]:
    env = dict(os.environ, **{TREE_ENV: str(tree_for(build)), BUILD_ENV: build,
                              LOOP_ENV: event_loop})
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, str(script), *argv, "--build", build, "--runs", "1",
                           "--event-loop", event_loop],
                          capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{script.name} --build {build} failed ({done.returncode}):\n"
                         f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"bench"')]
    if not lines:
        raise SystemExit(f"{script.name} --build {build} printed no JSON line:\n{done.stdout}")
    return dict(json.loads(lines[-1]))


def side_by_side(script: str, argv: list[str], runs: int, event_loop: str) -> None:
    """Run ``script`` on both builds, ``runs`` rounds alternating the order; print the
    figures of both, the ratio compiled / pure, and one JSON line."""
    path = Path(script).resolve()
    tree_for("compiled")  # build before timing anything
    results: dict[str, list[dict[str, Any]]] = {build: [] for build in BUILDS}
    for round_ in range(runs):
        order = BUILDS if round_ % 2 == 0 else BUILDS[::-1]
        for build in order:
            print(f"[round {round_ + 1}/{runs}: {build}]", file=sys.stderr, flush=True)
            results[build].append(_child(path, build, argv, event_loop))
    first = results["pure"][0]
    bench = first["bench"]
    keys = [k for k, v in first.items() if isinstance(v, dict) and "runs" in v]
    figures: dict[str, Any] = {}
    for key in keys:
        per_build = {
            build: [value for result in results[build] for value in result[key]["runs"]]
            for build in BUILDS
        }
        medians = {build: statistics.median(values) for build, values in per_build.items()}
        # Issue 12's targets are the compiled build's: both builds are held against them.
        compiled = results["compiled"][0][key]
        target, direction = compiled["target"], compiled["direction"]
        met = {
            build: None if target is None else (
                medians[build] >= target if direction == ">=" else medians[build] <= target)
            for build in BUILDS
        }
        pure = medians["pure"]
        ratio = medians["compiled"] / pure if pure else float("nan")
        figures[key] = {"unit": first[key]["unit"], "digits": first[key].get("digits", 2),
                        "target": target, "direction": direction,
                        "median": medians, "runs": per_build, "met": met,
                        "ratio_compiled_to_pure": round(ratio, 3)}
    _print(bench, figures, runs, event_loop, results)
    def extras(result: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in result.items() if k not in keys and k != "machine"}

    # pure_extra: the first pure round's; extras: every round's, per build (loss counts …).
    print(json.dumps({"bench": bench, "builds": list(BUILDS), "rounds": runs,
                      "event_loop": event_loop, "figures": figures,
                      "pure_extra": extras(first),
                      "extras": {build: [extras(r) for r in results[build]] for build in BUILDS},
                      "machine": first.get("machine"), "load_avg": os.getloadavg()}))


def _print(bench: str, figures: dict[str, Any], runs: int, event_loop: str,
           results: dict[str, list[dict[str, Any]]]) -> None:
    print(f"{bench}: pure and compiled side by side, {runs} alternating rounds, "
          f"event_loop = {event_loop}; load average {os.getloadavg()[0]:.2f}")
    head = (f"{'figure':<34} {'unit':<8} {'pure':>12} {'compiled':>12} {'ratio':>7} "
            f"{'target':>12} {'met':>9}")
    print(head)
    print("-" * len(head))
    for key, fig in figures.items():
        target = "" if fig["target"] is None else f"{fig['direction']} {fig['target']:,}"
        met = "" if fig["target"] is None else "/".join(
            "yes" if fig["met"][b] else "NO" for b in BUILDS)
        digits = max(2, fig["digits"])  # the bench's own precision (idle CPU: 0.034 %)
        print(f"{key:<34} {fig['unit']:<8} {fig['median']['pure']:>12,.{digits}f} "
              f"{fig['median']['compiled']:>12,.{digits}f} {fig['ratio_compiled_to_pure']:>7.3f} "
              f"{target:>12} {met:>9}")
    print("  ratio = compiled / pure (medians of the same rounds); met: pure/compiled")


__all__ = ["BUILDS", "add_build_args", "check_build", "check_daemon_build", "compiled_tree",
           "side_by_side", "tree_for"]
