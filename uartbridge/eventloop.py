"""The daemon's event loop: uvloop when it is installed (``uartbridge[fast]``), else asyncio.

``[daemon] event_loop`` chooses: ``"auto"`` (the default) takes uvloop if it can be imported
and asyncio's own loop otherwise; ``"asyncio"`` and ``"uvloop"`` force one (``"uvloop"``
without uvloop installed is a config error, exit 78). Both loops run the same code: nothing
in uartbridge depends on the loop's classes (uvloop's transports, for one, are not
``asyncio.Transport`` subclasses). uvloop saves a few per cent of CPU per bus frame at scale.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

from .errors import ConfigError

EventLoopChoice = Literal["auto", "asyncio", "uvloop"]
EVENT_LOOPS: tuple[EventLoopChoice, ...] = ("auto", "asyncio", "uvloop")

T = TypeVar("T")


def uvloop_version() -> str | None:
    """The installed uvloop's version, or None when it cannot be imported."""
    try:
        module = importlib.import_module("uvloop")
    except ImportError:
        return None
    return str(getattr(module, "__version__", "?"))


def resolve(choice: EventLoopChoice) -> Literal["asyncio", "uvloop"]:
    """The loop ``choice`` means on this host; ``ConfigError`` for uvloop when it is absent."""
    if choice == "asyncio":
        return "asyncio"
    available = uvloop_version() is not None
    if choice == "uvloop" and not available:
        raise ConfigError(
            'event_loop = "uvloop" but uvloop is not installed '
            "(pip install 'uartbridge[fast]', or event_loop = \"auto\")"
        )
    return "uvloop" if available else "asyncio"


def loop_factory(choice: EventLoopChoice) -> Callable[[], asyncio.AbstractEventLoop]:
    """A function making a new loop of the kind ``choice`` resolves to."""
    if resolve(choice) == "uvloop":
        uvloop: Any = importlib.import_module("uvloop")
        return uvloop.new_event_loop  # type: ignore[no-any-return]
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: EventLoopChoice = "auto") -> T:
    """``asyncio.run(main)`` on the loop ``choice`` resolves to."""
    try:
        factory = loop_factory(choice)
    except BaseException:
        main.close()  # never awaited: say so quietly instead of a RuntimeWarning
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def running_loop_name() -> str:
    """``uvloop`` or ``asyncio``: the kind of the loop running in this thread."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.split(".")[0] == "uvloop" else "asyncio"


__all__ = [
    "EVENT_LOOPS",
    "EventLoopChoice",
    "loop_factory",
    "resolve",
    "run",
    "running_loop_name",
    "uvloop_version",
]
