"""The ``.py`` sources of uartbridge's modules, for tests that look at the code itself.

Read from the package directory by path, never through ``inspect`` or a module's
``__file__``: in the compiled build the hot modules are extension modules (``inspect`` finds
no source for them), but their ``.py`` files sit beside them, and they are what was compiled.
So a test built on these helpers checks the same code in both builds.
"""

from __future__ import annotations

import ast
from pathlib import Path

import uartbridge

PACKAGE = Path(uartbridge.__file__).resolve().parent


def module_source(module: str) -> str:
    """The source text of ``uartbridge.<...>`` (e.g. ``uartbridge.uart``)."""
    parts = module.split(".")
    assert parts[0] == "uartbridge", module
    return PACKAGE.joinpath(*parts[1:]).with_suffix(".py").read_text(encoding="utf-8")


def class_node(module: str, name: str) -> ast.ClassDef:
    """The parsed top-level class ``name`` of ``module``."""
    for node in ast.parse(module_source(module)).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise LookupError(f"{module} has no class {name}")


def class_source(module: str, name: str) -> str:
    """The source text of the top-level class ``name`` of ``module``."""
    source = module_source(module)
    segment = ast.get_source_segment(source, class_node(module, name))
    assert segment is not None
    return segment
