"""The device's clock in guest-time mode: time moves when the guest says so.

A UART's model reads one clock (integer ns). In host-time mode that is the host's monotonic
clock and the device's timers run on the event loop. In guest-time mode it is a
``GuestClock``: the emulator that runs the guest tells it the guest's time, over the bus
(protocol v2 ``TIME`` frames) or in-process (``Bridge.advance_to``), and the device's timers
— the receive timeout, line-rate pacing — fire at guest deadlines, when the guest's time
reaches them. A guest that is paused (its time does not advance) sees no timer fire.

While a guest that does not drive time is attached to a guest-time UART (a bus v1 client, or
v2 without the ``GUEST_TIME`` capability) the clock follows the host's from where it stands
(``follow_host``) and stops there again when it leaves (``hold``): such a guest gets host
time, and the device's time never jumps or goes back.
"""

from __future__ import annotations

import time


class GuestClock:
    """A clock (callable, ns) that moves only when told, or follows the host meanwhile."""

    __slots__ = ("_host_ref_ns", "_now_ns")

    def __init__(self, now_ns: int = 0) -> None:
        """A clock standing at ``now_ns``."""
        if type(now_ns) is not int or now_ns < 0:
            raise ValueError(f"now_ns must be an integer >= 0, got {now_ns!r}")
        self._now_ns = now_ns
        self._host_ref_ns: int | None = None

    def __call__(self) -> int:
        """The time now, in ns."""
        ref = self._host_ref_ns
        if ref is None:
            return self._now_ns
        return self._now_ns + (time.monotonic_ns() - ref)

    @property
    def following_host(self) -> bool:
        """The clock runs with the host's monotonic clock (``follow_host``)."""
        return self._host_ref_ns is not None

    def set(self, now_ns: int) -> None:
        """The guest's time is ``now_ns`` (never earlier than the clock stands)."""
        if self._host_ref_ns is not None:
            raise ValueError("the clock follows the host: hold() it before setting it")
        if type(now_ns) is not int or now_ns < self._now_ns:
            raise ValueError(f"time cannot go back: {now_ns!r} < {self._now_ns}")
        self._now_ns = now_ns

    def advance(self, delta_ns: int) -> None:
        """The guest's time moved on by ``delta_ns`` (>= 0)."""
        if type(delta_ns) is not int or delta_ns < 0:
            raise ValueError(f"delta_ns must be an integer >= 0, got {delta_ns!r}")
        self.set(self._now_ns + delta_ns)

    def follow_host(self) -> None:
        """Run with the host's monotonic clock from where the clock stands now."""
        if self._host_ref_ns is None:
            self._host_ref_ns = time.monotonic_ns()

    def hold(self) -> None:
        """Stop following the host: the clock stands where it is until set again."""
        if self._host_ref_ns is not None:
            self._now_ns = self()
            self._host_ref_ns = None


__all__ = ["GuestClock"]
