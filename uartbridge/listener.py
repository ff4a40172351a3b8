"""Accepting connections without being taken down by a connect storm.

``asyncio.start_server`` accepts in the loop and reports every failed ``accept`` through the
loop's exception handler: under ``EMFILE`` that is one traceback per attempt (80–150k lines a
minute were seen). ``Listener`` is the small replacement the bus uses: it accepts with
``add_reader`` on the listening socket, at most ``ACCEPT_BATCH`` connections per callback
(other sockets get their turn), hands each accepted socket to ``on_accept`` synchronously
(so a peer can be vetted and refused before any transport or buffer exists), and on a
resource error (``EMFILE``, ``ENFILE``, ``ENOBUFS``, ``ENOMEM``) stops accepting for
``backoff_s`` and logs through a ``LogLimiter``: the first failure at once, then one line per
interval with the count of what it held back.

Two hooks let an owner keep its own limits on the same loop: ``admit()`` is asked before each
accept (False: accepting waits ``backoff_s``, the backlog holds the peers), and
``make_room()`` after a resource error (True: it freed a descriptor, e.g. by closing an idle
connection, so accepting resumes on the next turn of the loop instead of after the backoff).
Both the bus and the control socket accept through this class.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from typing import Any

ACCEPT_BATCH = 32
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept(2) errors that are the peer's business (it went away, or the kernel raced us).
_TRANSIENT_ERRNOS = frozenset({
    errno.EAGAIN, errno.ECONNABORTED, errno.EINTR, errno.EPROTO, errno.EPERM,
})


class LogLimiter:
    """At most one log line per ``interval_s`` for one kind of event, with a count.

    ``hit(**fields)``: the first event logs at once; events within the next ``interval_s`` are
    only counted, and when the interval ends one line reports how many there were (the fields
    of the last one). A quiet interval ends the limiting.
    """

    def __init__(self, log: Any, event: str, *, interval_s: float = 10.0,
                 level: str = "warning") -> None:
        self._emit = getattr(log, level)
        self._event = event
        self.interval_s = interval_s
        self._held = 0
        self._last: dict[str, Any] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.total = 0

    def hit(self, **fields: Any) -> None:
        """Count one event; log it now if no line was logged within the interval."""
        self.total += 1
        if self._timer is None:
            self._emit(self._event, **fields)
            self._arm()
            return
        self._held += 1
        self._last = fields

    def _arm(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._held:
            self._emit(self._event, repeated=self._held, interval_s=self.interval_s,
                       **self._last)
            self._held = 0
            self._arm()

    def close(self) -> None:
        """Stop the timer (a held count is logged now)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._held:
            self._emit(self._event, repeated=self._held, **self._last)
            self._held = 0


class Listener:
    """Accepts on one listening socket and hands each connection to ``on_accept``.

    ``on_accept(sock)`` gets a non-blocking connected socket and owns it from then on.
    ``errors`` counts accept failures (resource errors back off for ``backoff_s``).
    """

    def __init__(
        self,
        sock: socket.socket,
        on_accept: Callable[[socket.socket], None],
        *,
        log: Any,
        name: str,
        event: str = "accept_failed",
        level: str = "warning",
        backoff_s: float = 0.1,
        log_interval_s: float = 10.0,
        batch: int = ACCEPT_BATCH,
        admit: Callable[[], bool] | None = None,
        make_room: Callable[[], bool] | None = None,
    ) -> None:
        self.sock = sock
        self._on_accept = on_accept
        self._admit = admit
        self._make_room = make_room
        self._batch = batch
        self._loop = asyncio.get_running_loop()
        self.backoff_s = backoff_s
        self._name = name
        self._log = log
        self._errors = LogLimiter(log, event, interval_s=log_interval_s, level=level)
        self._retry: asyncio.TimerHandle | None = None
        self._reading = False
        self._closed = False
        sock.setblocking(False)
        self._start_reading()

    @property
    def errors(self) -> int:
        """How many accept calls failed so far."""
        return self._errors.total

    def _start_reading(self) -> None:
        self._retry = None
        if not self._closed and not self._reading:
            self._loop.add_reader(self.sock.fileno(), self._accept_ready)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False

    def _pause(self, delay_s: float) -> None:
        """The backlog stays readable: stop watching it for ``delay_s`` (no busy loop)."""
        self._stop_reading()
        if not self._closed and self._retry is None:
            self._retry = self._loop.call_later(delay_s, self._start_reading)

    def _accept_ready(self) -> None:
        for _ in range(self._batch):
            if self._admit is not None and not self._admit():
                self._pause(self.backoff_s)
                return
            try:
                conn, _addr = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _TRANSIENT_ERRNOS:
                    continue
                # Out of fds or memory: the backlog stays readable, so accepting again at
                # once would spin. Pause, log (limited), and try again later.
                self._errors.hit(listener=self._name, error=exc.strerror or str(exc),
                                 errno=errno.errorcode.get(exc.errno or 0, "?"))
                freed = self._make_room is not None and self._make_room()
                self._pause(0.0 if freed else self.backoff_s)
                return
            conn.setblocking(False)
            try:
                self._on_accept(conn)
            except Exception:
                conn.close()
                self._log.exception("accept_handler_failed", listener=self._name)

    def close(self) -> None:
        """Stop accepting and close the listening socket."""
        self.detach().close()

    def detach(self) -> socket.socket:
        """Stop accepting and hand the listening socket over (still listening: connections
        wait in its backlog for whoever accepts next)."""
        self._closed = True
        self._stop_reading()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._errors.close()
        return self.sock


__all__ = ["ACCEPT_BATCH", "Listener", "LogLimiter"]
