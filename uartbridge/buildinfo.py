"""Which build is running: the mypyc-compiled core, or the same sources as pure Python.

``COMPILED_MODULES`` are the hot modules (the model, the register map, the bus codec and
server, ...). ``pip install`` compiles them with mypyc where a C compiler and Python's headers
are available (``setup.py``; ``UARTBRIDGE_PURE=1`` forces the pure build); everything else,
and every module of a pure build, runs from its ``.py`` file. There is one source: a compiled
module is that ``.py`` file translated to C, and both builds pass the same tests.

What is running is read from the imported modules themselves (a compiled module is an
extension module), never from how the package was installed: a checkout run with
``python -m uartbridge`` imports its ``.py`` files even where a compiled build is installed.

This module imports only the standard library: ``setup.py`` reads ``COMPILED_MODULES`` from
it without importing the package.
"""

from __future__ import annotations

import importlib
import importlib.machinery

#: Compiled with mypyc in a compiled build (setup.py reads this tuple; keep it a literal).
#: ``uartbridge.record`` is here because its ``RecordingUart`` subclasses ``Uart16550``, and
#: a compiled class can only be subclassed by compiled code.
COMPILED_MODULES = (
    "uartbridge.registers",
    "uartbridge.uart",
    "uartbridge.bus.codec",
    "uartbridge.bus.server",
    "uartbridge.record",
)

COMPILED = "compiled (mypyc)"
PURE = "pure Python"


def is_compiled(module_name: str) -> bool:
    """The module, once imported, is an extension module (mypyc's output), not a .py file."""
    module = importlib.import_module(module_name)
    path = getattr(module, "__file__", None) or ""
    return path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def compiled_modules() -> list[str]:
    """The modules of ``COMPILED_MODULES`` that run compiled in this process."""
    return [name for name in COMPILED_MODULES if is_compiled(name)]


def build_name() -> str:
    """``compiled (mypyc)``, ``pure Python``, or ``partly compiled (mypyc: ...)`` when only
    some of the hot modules are compiled (a build that does not match its sources)."""
    compiled = compiled_modules()
    if not compiled:
        return PURE
    if len(compiled) == len(COMPILED_MODULES):
        return COMPILED
    short = ", ".join(name.removeprefix("uartbridge.") for name in compiled)
    return f"partly compiled (mypyc: {short})"


__all__ = ["COMPILED", "COMPILED_MODULES", "PURE", "build_name", "compiled_modules", "is_compiled"]
