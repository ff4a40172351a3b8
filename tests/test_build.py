"""The two builds: the compiled core (mypyc) where it can be built, the pure sources otherwise.

The compiled build itself is tested by running the suite on it (scripts/test-compiled; CI
runs its ``--core`` part); these tests cover how a build is chosen and how the running one
is reported.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from procs import REPO

from uartbridge import buildinfo

BACKEND_DIR = REPO / "build_backend"


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """build_backend/uartbridge_build.py, imported as setup.py and pip import it."""
    monkeypatch.syspath_prepend(str(BACKEND_DIR))
    for name in ("UARTBRIDGE_PURE", "UARTBRIDGE_COMPILED", "CC"):
        monkeypatch.delenv(name, raising=False)
    module = importlib.import_module("uartbridge_build")
    yield module
    sys.modules.pop("uartbridge_build", None)


def test_version_names_the_build_the_modules_show() -> None:
    """`uartbridge --version` says "compiled (mypyc)" exactly when the hot modules it imports
    are extension modules, "pure Python" when they are .py files."""
    import uartbridge.uart

    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    compiled = str(uartbridge.uart.__file__).endswith(suffixes)
    out = subprocess.run([sys.executable, "-m", "uartbridge", "--version"], cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.startswith("uartbridge 0.1.0, ")
    assert ("compiled (mypyc)" in out) == compiled
    assert ("pure Python" in out) == (not compiled)
    assert buildinfo.build_name() in out


def test_every_compiled_module_has_its_source() -> None:
    """The modules the build compiles exist as .py files (the one source of both builds)."""
    for name in buildinfo.COMPILED_MODULES:
        importlib.import_module(name)
        path = REPO.joinpath(*name.split(".")).with_suffix(".py")
        assert path.is_file(), path


def test_the_build_compiles_the_modules_buildinfo_names(backend: ModuleType) -> None:
    """setup.py compiles exactly buildinfo.COMPILED_MODULES (read without importing it)."""
    expected = [name.replace(".", "/") + ".py" for name in buildinfo.COMPILED_MODULES]
    assert backend.module_paths() == expected


def test_no_c_compiler_means_the_pure_build(
    backend: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without a working compiler the build is pure and says why; UARTBRIDGE_COMPILED=1 then
    makes it fail instead; UARTBRIDGE_PURE=1 is pure whatever the compiler."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    problem = backend.compile_problem()
    assert problem is not None and "no working C compiler" in problem
    monkeypatch.setattr(sys, "argv", ["setup.py", "bdist_wheel"])
    assert backend.ext_modules() == []
    assert backend.compile_requirements() == []
    monkeypatch.setenv("UARTBRIDGE_COMPILED", "1")
    with pytest.raises(SystemExit, match="cannot compile: no working C compiler"):
        backend.ext_modules()
    failing = tmp_path / "failing-cc"
    failing.write_text("#!/bin/sh\necho 'fatal error: Python.h: No such file' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    monkeypatch.delenv("UARTBRIDGE_COMPILED")
    assert "cannot build an extension: fatal error: Python.h" in backend.compile_problem()
    monkeypatch.delenv("CC")
    monkeypatch.setenv("UARTBRIDGE_PURE", "1")
    assert backend.compile_problem() == "UARTBRIDGE_PURE is set"


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc").split()[0]) is None,
                    reason="needs a C compiler")
def test_a_working_compiler_asks_for_mypy_and_the_dependencies(backend: ModuleType) -> None:
    """Where a C compiler works the wheel build requires mypy (mypyc) and the runtime
    dependencies it type-checks against, and a build command gets the mypyc extensions."""
    if backend.c_compiler_problem() is not None:
        pytest.skip(f"this host cannot compile an extension: {backend.c_compiler_problem()}")
    requires = backend.compile_requirements()
    assert backend.MYPY_REQUIREMENT in requires and "pyserial>=3.5" in requires


def test_the_test_extras_carry_the_mypyc_the_backend_compiles_with(backend: ModuleType) -> None:
    """`pip install .[test]` installs the very mypy (mypyc) the compiled build pins, so
    scripts/test-compiled builds it with what the test extras installed (no isolation)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert backend.MYPY_REQUIREMENT in project["optional-dependencies"]["test"]


def test_uartbridge_pure_builds_the_pure_wheel(tmp_path: Path) -> None:
    """UARTBRIDGE_PURE=1 pip wheel gives a py3-none-any wheel with every .py and no
    extension module (a copy of the sources, built as `pip install .` builds: isolated,
    pip fetching setuptools, from its cache after the first time)."""
    src = tmp_path / "src"
    for name in ("pyproject.toml", "setup.py", "README.md", "MANIFEST.in"):
        shutil.copy2(REPO / name, src / name if src.exists() else _mkdir(src) / name)
    for name in ("uartbridge", "build_backend"):
        shutil.copytree(REPO / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = dict(os.environ, UARTBRIDGE_PURE="1")
    env.pop("UARTBRIDGE_COMPILED", None)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("uartbridge-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.endswith(".so")]
    for module in buildinfo.COMPILED_MODULES:
        assert module.replace(".", "/") + ".py" in names


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path
