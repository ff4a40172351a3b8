"""The one rule for names that become file names: UARTs and daemon instances.

A UART's name names its checkpoint file (``<name>.checkpoint.json``), its bus socket and its
pty link; an instance's name names its directories (``/run/uartbridge-<name>``). Config,
checkpoint and CLI all check names with ``is_safe_name``, so that what one accepts the
others never refuse: 1 to 32 characters from ``A-Z a-z 0-9 _ . -``, the first one a letter
or a digit (so never ``.``, ``..``, a hidden file, nor something a command reads as an
option).
"""

from __future__ import annotations

import re

NAME_MAX_CHARS = 32
NAME_PATTERN = rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{NAME_MAX_CHARS - 1}}}"
NAME_RE = re.compile(NAME_PATTERN)
NAME_RULE = (
    f"1 to {NAME_MAX_CHARS} characters from A-Z a-z 0-9 _ . -, starting with a letter or digit"
)


def is_safe_name(name: object) -> bool:
    """Whether ``name`` may name a UART or an instance (see the module docstring)."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


__all__ = ["NAME_MAX_CHARS", "NAME_PATTERN", "NAME_RE", "NAME_RULE", "is_safe_name"]
