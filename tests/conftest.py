"""Shared test set-up: the helpers beside the tests (procs, streams, vectors) import as modules."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import uartbridge

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# The suite runs on both builds (CI: .ci/run, scripts/test-compiled). UARTBRIDGE_EXPECT_BUILD
# names the one this run must be testing, so that a "compiled" run that imported the .py
# files (or a pure one that found stray extension modules) fails at once instead of passing
# on the wrong build.
_EXPECT_BUILD = os.environ.get("UARTBRIDGE_EXPECT_BUILD", "")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to run on another build than UARTBRIDGE_EXPECT_BUILD names (if it is set)."""
    if not _EXPECT_BUILD:
        return
    from uartbridge.buildinfo import COMPILED, PURE, build_name

    expected = {"compiled": COMPILED, "pure": PURE}.get(_EXPECT_BUILD)
    if expected is None:
        raise pytest.UsageError(f"UARTBRIDGE_EXPECT_BUILD must be compiled or pure, "
                                f"got {_EXPECT_BUILD!r}")
    running = build_name()
    if running != expected:
        raise pytest.UsageError(f"UARTBRIDGE_EXPECT_BUILD={_EXPECT_BUILD} but the tests "
                                f"import the {running} build (uartbridge from "
                                f"{Path(uartbridge.__file__).parent})")


@pytest.fixture(params=["asyncio", "uvloop"])
def each_event_loop(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test once on asyncio's loop and once on uvloop's (the daemon's two loops):
    the in-process bus helpers (test_bus_support) take their loop from here."""
    import test_bus_support

    from uartbridge.eventloop import loop_factory

    factory = loop_factory(request.param)  # a missing uvloop is an error: it is a test extra
    saved = test_bus_support.LOOP_FACTORY[0]
    test_bus_support.LOOP_FACTORY[0] = factory
    try:
        yield str(request.param)
    finally:
        test_bus_support.LOOP_FACTORY[0] = saved


def pytest_report_header(config: pytest.Config) -> str:
    """The build under test, in the header of every run."""
    from uartbridge.buildinfo import build_name

    return f"uartbridge build: {build_name()} ({Path(uartbridge.__file__).parent})"
