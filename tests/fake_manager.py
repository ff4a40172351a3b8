"""A fake service manager for the daemon's fd-store and socket-activation tests."""

from __future__ import annotations

import array
import fcntl
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from procs import REPO, Daemon


class FakeManager:
    """A fake service manager: a NOTIFY_SOCKET that keeps the fds sent with ``FDSTORE=1``
    (SCM_RIGHTS) by ``FDNAME=``, and starts the daemon with them as ``LISTEN_FDS``.

    A fake because systemd does not run as a service manager on this machine; it does what
    systemd's fd store does for the daemon (keep the fds, hand them back in order with
    ``LISTEN_FDNAMES`` and ``LISTEN_PID``). The real one is exercised in the VM test.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / "manager-notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.store: dict[str, int] = {}
        self.messages: list[str] = []

    def pump(self, until: str | None = None, timeout_s: float = 20.0) -> None:
        """Receive notifications (until one contains ``until``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, min(0.2, deadline - time.monotonic())))
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(64))
            except TimeoutError:
                if until is None:
                    return
                continue
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            text = data.decode()
            self.messages.append(text)
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            if fields.get("FDSTOREREMOVE") == "1":
                old = self.store.pop(fields.get("FDNAME", ""), None)
                if old is not None:
                    os.close(old)
            if fields.get("FDSTORE") == "1":
                for fd in fds:
                    old = self.store.pop(fields["FDNAME"], None)
                    if old is not None:
                        os.close(old)
                    self.store[fields["FDNAME"]] = fd
            else:
                for fd in fds:
                    os.close(fd)
            if until is not None and until in text.splitlines():
                return
        if until is not None:
            raise AssertionError(f"no {until} from the daemon: {self.messages}")

    def start(self, d: Daemon, fds: dict[str, int] | list[tuple[str, int]],
              *, wait: bool = True, env: dict[str, str] | None = None) -> None:
        """Start ``uartbridge run`` for ``d`` with ``fds`` as LISTEN_FDS (from fd 3 on), in
        order (a list may repeat a name, as a socket unit's FileDescriptorName= does) and
        ``env`` added to its environment; ``wait``: until READY=1."""
        d.write_config()
        d.runs += 1
        pairs = list(fds.items()) if isinstance(fds, dict) else list(fds)
        names = [name for name, _fd in pairs]
        order = [fd for _name, fd in pairs]

        def place() -> None:  # in the child: the fds at 3…, as sd_listen_fds(3) expects
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 512) for fd in order]  # above the targets
            for index, fd in enumerate(high):
                os.dup2(fd, 3 + index)

        env = dict(os.environ, NOTIFY_SOCKET=str(self.path), LISTEN_FDS=str(len(names)),
                   LISTEN_FDNAMES=":".join(names), **(env or {}))
        env.pop("LISTEN_PID", None)
        with open(d.log_path, "wb") as log:
            # LISTEN_PID is the child's own PID: known only after the fork, so the wrapper
            # shell sets it and execs the daemon (the PID stays).
            d.proc = subprocess.Popen(
                ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", sys.executable, "-m",
                 "uartbridge", "run", "--config", str(d.config_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                preexec_fn=place, pass_fds=tuple(range(3, 3 + len(names))),
            )
        if wait:
            self.pump("READY=1")

    def close(self) -> None:
        for fd in self.store.values():
            os.close(fd)
        self.store.clear()
        self.sock.close()
