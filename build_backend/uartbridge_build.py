"""The build backend: setuptools, plus the hot modules compiled with mypyc where possible.

One source: ``uartbridge.buildinfo.COMPILED_MODULES`` are compiled from their ``.py`` files
with mypyc when a C compiler and Python's headers work here; otherwise (or with
``UARTBRIDGE_PURE=1``) the wheel is the pure-Python one, with a line on stderr saying why.
``UARTBRIDGE_COMPILED=1`` makes a build that cannot compile fail instead of falling back
(CI uses it, so that "compiled" is never silently pure). An editable install is always pure:
compiled modules beside the sources would shadow every later edit of them.

mypy (which contains mypyc) and the runtime dependencies (mypyc type-checks the modules
against them) are build requirements only when compiling: ``get_requires_for_build_wheel``.
This file is the PEP 517 backend named in pyproject.toml (``backend-path``); ``setup.py``
calls ``ext_modules()``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import (  # noqa: F401  (the hooks we do not change)
    build_sdist,
    get_requires_for_build_sdist,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)

ROOT = Path(__file__).resolve().parent.parent
# The mypyc the compiled build is tested with (scripts/test-compiled): a newer one is another
# compiler, to be tested before it is taken.
MYPY_REQUIREMENT = "mypy==2.4.1"
PURE_ENV = "UARTBRIDGE_PURE"
COMPILED_ENV = "UARTBRIDGE_COMPILED"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def module_paths() -> list[str]:
    """The source files of ``COMPILED_MODULES``, read from buildinfo.py without importing."""
    tree = ast.parse((ROOT / "uartbridge" / "buildinfo.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "COMPILED_MODULES" for t in node.targets
        ):
            names = ast.literal_eval(node.value)
            return [name.replace(".", "/") + ".py" for name in names]
    raise RuntimeError("uartbridge/buildinfo.py has no COMPILED_MODULES")


def c_compiler_problem() -> str | None:
    """Why a Python extension cannot be compiled here (None: it can).

    Compiles and links a one-line extension with the compiler and flags Python was built
    with (``CC``, ``CFLAGS``..., as setuptools would), so a missing compiler or missing
    headers (Debian: python3-dev) show up before mypyc runs.
    """
    include = sysconfig.get_paths().get("include", "")
    if not (Path(include) / "Python.h").exists():
        return f"Python's headers are not installed (no {include}/Python.h; Debian: python3-dev)"
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    with tempfile.TemporaryDirectory(prefix="ub-cc-") as tmp:
        source = Path(tmp) / "probe.c"
        source.write_text("#include <Python.h>\nint ub_probe(void) { return 0; }\n")
        command = [*cc.split(), "-shared", "-fPIC", f"-I{include}", str(source),
                   "-o", str(Path(tmp) / "probe.so")]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"no working C compiler ({cc.split()[0]}: {exc})"
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["failed"])[0]
            return f"the C compiler {cc.split()[0]} cannot build an extension: {first}"
    return None


def compile_problem() -> str | None:
    """Why this build is pure (None: it compiles)."""
    if _flag(PURE_ENV):
        return f"{PURE_ENV} is set"
    return c_compiler_problem()


def _pure(reason: str) -> list[Any]:
    if _flag(COMPILED_ENV) and not _flag(PURE_ENV):
        raise SystemExit(f"uartbridge: {COMPILED_ENV} is set but cannot compile: {reason}")
    print(f"uartbridge: building the pure-Python package ({reason})", file=sys.stderr)
    return []


def setup_arguments() -> dict[str, Any]:
    """What setup.py passes to setup(): the mypyc extensions ([] for the pure build), and a
    build directory of each build's own, so a pure wheel never packs a compiled module left
    in build/ by an earlier compiled build."""
    extensions = ext_modules()
    flavour = "mypyc" if extensions else "pure"
    return {"ext_modules": extensions, "options": {"build": {"build_base": f"build/{flavour}"}}}


def ext_modules() -> list[Any]:
    """The mypyc extensions for setup(), or [] for the pure build."""
    building = {"build", "build_ext", "bdist_wheel", "install", "develop"} & set(sys.argv[1:])
    if not building:
        return []  # metadata, sdist, clean: no extension is built, do not run mypyc
    problem = compile_problem()
    if problem is not None:
        return _pure(problem)
    try:
        from mypyc.build import mypycify
    except ImportError:
        return _pure(f"mypyc is not installed ({MYPY_REQUIREMENT})")
    print("uartbridge: compiling " + ", ".join(module_paths()) + " with mypyc", file=sys.stderr)
    return list(mypycify(module_paths(), opt_level="3", group_name="uartbridge",
                         target_dir="build/mypyc/c"))


def _runtime_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return list(project.get("dependencies", []))


# -- PEP 517 hooks ------------------------------------------------------------------------------


def compile_requirements() -> list[str]:
    """What a compiled build needs besides setuptools ([] when this build is pure)."""
    if compile_problem() is not None:
        return []
    return [MYPY_REQUIREMENT, *_runtime_requirements()]


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    """setuptools' requirements, plus mypy and the runtime dependencies when compiling."""
    return [*_setuptools.get_requires_for_build_wheel(config_settings), *compile_requirements()]


def build_wheel(wheel_directory: str, config_settings: dict[str, Any] | None = None,
                metadata_directory: str | None = None) -> str:
    """A wheel: compiled where possible (see the module docstring)."""
    return str(_setuptools.build_wheel(wheel_directory, config_settings, metadata_directory))


def get_requires_for_build_editable(config_settings: dict[str, Any] | None = None) -> list[str]:
    """An editable install is pure: setuptools' requirements only."""
    return list(_setuptools.get_requires_for_build_editable(config_settings))


def build_editable(wheel_directory: str, config_settings: dict[str, Any] | None = None,
                   metadata_directory: str | None = None) -> str:
    """An editable install, always pure (an extension beside a .py file shadows it)."""
    os.environ[PURE_ENV] = "1"
    os.environ.pop(COMPILED_ENV, None)
    return str(_setuptools.build_editable(wheel_directory, config_settings, metadata_directory))
