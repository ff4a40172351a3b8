"""The VM test's agent inside the guest: runs the host's commands from a virtio-serial port.

Started at boot by uartbridge-test-agent.service (system python3, standard library only).
Protocol, one JSON object per line each way:
  guest -> host  {"event": "hello", "boot_id": "...", "uptime_s": 12.3}   at start
  host -> guest  {"id": 7, "sh": "shell script", "timeout_s": 60, "stdin": "..."}
  guest -> host  {"id": 7, "rc": 0, "stdout": "...", "stderr": "...", "elapsed_s": 0.4}
Each request runs in its own thread (``bash -c``), so the host can run a command while another
one waits; ``rc`` is -1 with ``"timeout": true`` when the command ran out of time.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import threading
import time
from typing import Any

PORT = "/dev/virtio-ports/org.uartbridge.agent"


class Channel:
    """The virtio-serial port: line-framed JSON, writes serialised by a lock."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self.lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message) + "\n").encode()
        with self.lock:
            while data:
                try:
                    n = os.write(self.fd, data)
                except BlockingIOError:
                    select.select([], [self.fd], [], 1.0)
                    continue
                data = data[n:]

    def lines(self) -> Any:
        buf = b""
        while True:
            ready, _, _ = select.select([self.fd], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:  # the host side is not connected: wait for it
                time.sleep(0.2)
                continue
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    yield line


def handle(channel: Channel, request: dict[str, Any]) -> None:
    start = time.monotonic()
    reply: dict[str, Any] = {"id": request.get("id")}
    try:
        proc = subprocess.run(
            ["/bin/bash", "-c", request["sh"]],
            input=request.get("stdin", "").encode(),
            capture_output=True,
            timeout=float(request.get("timeout_s", 60)),
            check=False,
        )
        reply.update(rc=proc.returncode, stdout=proc.stdout.decode(errors="replace"),
                     stderr=proc.stderr.decode(errors="replace"))
    except subprocess.TimeoutExpired as exc:
        reply.update(rc=-1, timeout=True,
                     stdout=(exc.stdout or b"").decode(errors="replace"),
                     stderr=(exc.stderr or b"").decode(errors="replace"))
    except Exception as exc:  # a bad request: say so rather than die
        reply.update(rc=-2, stdout="", stderr=f"agent: {type(exc).__name__}: {exc}")
    reply["elapsed_s"] = round(time.monotonic() - start, 3)
    channel.send(reply)


def main() -> None:
    channel = Channel(PORT)
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
        boot_id = fh.read().strip()
    with open("/proc/uptime", encoding="ascii") as fh:
        uptime_s = float(fh.read().split()[0])
    channel.send({"event": "hello", "boot_id": boot_id, "uptime_s": uptime_s})
    for line in channel.lines():
        try:
            request = json.loads(line)
        except ValueError:
            channel.send({"id": None, "rc": -2, "stdout": "", "stderr": "agent: bad JSON"})
            continue
        threading.Thread(target=handle, args=(channel, request), daemon=True).start()


if __name__ == "__main__":
    main()
