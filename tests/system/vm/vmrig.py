"""The VM rig: a debootstrapped Debian 12 image, QEMU, the guest agent, the far ends of the ttys.

The guest: systemd as PID 1, ``linux-image-amd64``, no network; the checkout (a ``git
clone`` of HEAD) and a wheelhouse of uartbridge's dependencies on a read-only 9p share at
``/mnt/src``, and ``/etc/pip.conf`` pointing pip at that wheelhouse, so that
``scripts/install-service`` runs inside the guest as documented. Serial ports: ttyS0 the
console (a log file here), ttyS1 and ttyS2 16550s whose host sides are Unix sockets
(``FarEnd``), a ``qemu-xhci`` controller for hot-plugging ``usb-serial`` through QMP, and a
virtio-serial port to the agent (agent.py). KVM when it boots a Linux guest here, TCG
otherwise (nested KVM fails on this project's machines).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rootfs

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
SUITE = "bookworm"
PACKAGES = (
    "linux-image-amd64", "initramfs-tools", "systemd-sysv", "udev", "kmod", "procps",
    "python3", "python3-venv",
)
# Timers that would wake a TCG guest in the middle of a test.
MASKED_UNITS = (
    "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "e2scrub_all.timer",
    "e2scrub_reap.service", "fstrim.timer",
)
IMAGE_SIZE = "3G"
MEMORY_MB = 1024
BOOT_TIMEOUT_S = 300.0  # TCG on a loaded 2-CPU machine; a boot is ~30-60 s when idle
KVM_PROBE_S = 120.0
AGENT_DIR = "/usr/local/lib/uartbridge-test"


def image_key() -> str:
    """What the image depends on: suite, packages, the agent, this builder."""
    digest = hashlib.sha256(f"{SUITE} {sorted(PACKAGES)} {MASKED_UNITS}".encode())
    for name in ("agent.py", "uartbridge-test-agent.service", "vmrig.py"):
        digest.update((HERE / name).read_bytes())
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class Image:
    """A bootable image: kernel, initrd and an ext4 root filesystem (never written to)."""

    kernel: Path
    initrd: Path
    disk: Path


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)


def build_image(dest: Path, log: Path) -> Image:
    """debootstrap the guest into a scratch root, configure it, and make ``dest``/disk.raw."""
    dest.mkdir(parents=True, exist_ok=True)
    scratch = Path(rootfs.WORK_DIR) / f"uartbridge-vmroot-{os.getpid()}-{time.monotonic_ns()}"
    root = scratch / "root"
    try:
        rootfs.debootstrap(root, SUITE, PACKAGES, log=log)
        _write(root / "etc/fstab",
               "LABEL=uartroot / ext4 rw,errors=remount-ro 0 0\n"
               "src /mnt/src 9p trans=virtio,version=9p2000.L,ro,msize=262144,nofail 0 0\n")
        _write(root / "etc/hostname", "uartvm\n")
        _write(root / "etc/hosts", "127.0.0.1 localhost\n127.0.1.1 uartvm\n")
        # pip in the guest has no network: the share's wheelhouse is its registry.
        _write(root / "etc/pip.conf",
               "[global]\nno-index = true\nfind-links = /mnt/src/wheels\n")
        (root / "mnt/src").mkdir(parents=True, exist_ok=True)
        agent_dir = root / AGENT_DIR.lstrip("/")
        agent_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(HERE / "agent.py", agent_dir / "agent.py")
        unit = "uartbridge-test-agent.service"
        shutil.copy2(HERE / unit, root / "etc/systemd/system" / unit)
        wants = root / "etc/systemd/system/multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / unit).symlink_to(f"/etc/systemd/system/{unit}")
        for masked in MASKED_UNITS:
            link = root / "etc/systemd/system" / masked
            link.unlink(missing_ok=True)
            link.symlink_to("/dev/null")
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        initrds = sorted((root / "boot").glob("initrd.img-*"))
        if not kernels or not initrds:
            found = sorted(p.name for p in (root / "boot").iterdir())
            raise AssertionError(f"no kernel/initrd in the guest's /boot: {found}")
        shutil.copy2(kernels[-1], dest / "vmlinuz")
        shutil.copy2(initrds[-1], dest / "initrd.img")
        disk = dest / "disk.raw"
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "uartroot", "-d", str(root), str(disk),
                        IMAGE_SIZE], check=True, timeout=600, capture_output=True)
    finally:
        rootfs.remove_root(scratch)
    return Image(dest / "vmlinuz", dest / "initrd.img", dest / "disk.raw")


def image(workdir: Path, log: Path) -> Image:
    """The image for this run: built into ``workdir``, or reused from UARTBRIDGE_VM_IMAGE_DIR
    (for developing the rig; CI builds it once per run) when that holds one for this key."""
    cache = os.environ.get("UARTBRIDGE_VM_IMAGE_DIR")
    dest = (Path(cache) if cache else workdir) / f"image-{image_key()}"
    done = dest / "complete"
    if not done.exists():
        shutil.rmtree(dest, ignore_errors=True)
        build_image(dest, log)
        done.write_text("ok\n")
    return Image(dest / "vmlinuz", dest / "initrd.img", dest / "disk.raw")


def wheelhouse(dest: Path) -> None:
    """Download uartbridge's dependencies and its build backend (as pyproject.toml says)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    wanted = [*project["project"]["dependencies"], *project["build-system"]["requires"], "wheel"]
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--dest", str(dest),
                    "--only-binary=:all:", "--python-version", "3.11", *wanted],
                   check=True, timeout=600)


def share(dest: Path) -> Path:
    """The 9p share: ``uartbridge/`` (a clone of HEAD) and ``wheels/``."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO),
                    str(dest / "uartbridge")], check=True, timeout=120)
    wheelhouse(dest / "wheels")
    return dest


# -- host-side ends ---------------------------------------------------------------------------


def _connect_unix(path: Path, timeout_s: float = 30.0) -> socket.socket:
    deadline = time.monotonic() + timeout_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class FarEnd:
    """The far end of a guest tty: QEMU's chardev socket, read by a thread unless paused.

    Paused, nothing is read, so the socket fills and the wire stops draining (QEMU's 16550
    then holds its transmitter: a peer that does not read).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = _connect_unix(path)
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._reading = threading.Event()
        self._reading.set()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            if not self._reading.wait(0.1):
                continue
            self.sock.settimeout(0.1)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self._buf += data

    def pause(self) -> None:
        """Stop reading (what is already read stays in the buffer)."""
        self._reading.clear()
        time.sleep(0.2)  # let a recv in progress finish

    def resume(self) -> None:
        self._reading.set()

    def send(self, data: bytes, timeout_s: float = 60.0) -> None:
        """Write ``data`` to the guest's tty (QEMU feeds the 16550 as it has room)."""
        self.sock.settimeout(timeout_s)
        self.sock.sendall(data)

    def take(self) -> bytes:
        """Everything read so far, and forget it."""
        with self._lock:
            data = bytes(self._buf)
            self._buf.clear()
        return data

    def wait_for(self, count: int, timeout_s: float, idle_s: float = 20.0) -> bytes:
        """Read until ``count`` bytes came (or ``idle_s`` without one, or ``timeout_s``)."""
        start = last = time.monotonic()
        seen = 0
        while True:
            with self._lock:
                have = len(self._buf)
            if have != seen:
                seen, last = have, time.monotonic()
            now = time.monotonic()
            if have >= count or now - last > idle_s or now - start > timeout_s:
                return self.take()
            time.sleep(0.05)

    def close(self) -> None:
        self._closed = True
        self._reading.set()
        with contextlib.suppress(OSError):
            self.sock.close()
        self._thread.join(2)


class Qmp:
    """QEMU's monitor protocol (JSON) on a Unix socket."""

    def __init__(self, path: Path) -> None:
        self.sock = _connect_unix(path)
        self.sock.settimeout(30)
        self.file = self.sock.makefile("rwb")
        self.events: list[dict[str, Any]] = []
        json.loads(self.file.readline())  # greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run a QMP command; its "return", or an AssertionError with QEMU's error."""
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.file.write(json.dumps(message).encode() + b"\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise AssertionError(f"QMP {command} {arguments}: {reply['error']}")
            return reply.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# -- the agent ------------------------------------------------------------------------------


@dataclass
class Result:
    """What a guest command did."""

    script: str
    rc: int
    stdout: str
    stderr: str
    elapsed_s: float
    timed_out: bool = False

    def __str__(self) -> str:
        return (f"$ {self.script}\nexit {self.rc}{' (timed out)' if self.timed_out else ''}, "
                f"{self.elapsed_s:.1f} s\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}")

    def json(self) -> Any:
        """The last stdout line, as JSON (guest_uart.py prints one object)."""
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        assert lines and self.rc == 0, str(self)
        return json.loads(lines[-1])


@dataclass
class Pending:
    """A guest command still running."""

    request_id: int
    script: str
    timeout_s: float
    done: threading.Event = field(default_factory=threading.Event)
    reply: dict[str, Any] = field(default_factory=dict)


class Agent:
    """The host side of agent.py's virtio-serial channel."""

    def __init__(self, path: Path) -> None:
        self.sock = _connect_unix(path)
        self._lock = threading.Lock()
        self._pending: dict[int, Pending] = {}
        self._next_id = 1
        self.hellos: list[dict[str, Any]] = []
        self._hello = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if message.get("event") == "hello":
                    with self._hello:
                        self.hellos.append(message)
                        self._hello.notify_all()
                    continue
                with self._lock:
                    pending = self._pending.pop(message.get("id"), None)
                if pending is not None:
                    pending.reply = message
                    pending.done.set()

    def wait_hello(self, after: int, timeout_s: float) -> dict[str, Any] | None:
        """The first hello beyond the first ``after`` ones (a boot), or None on timeout."""
        with self._hello:
            self._hello.wait_for(lambda: len(self.hellos) > after, timeout_s)
            return self.hellos[after] if len(self.hellos) > after else None

    def spawn(self, script: str, timeout_s: float = 60.0, stdin: str = "") -> Pending:
        """Start ``script`` (bash) in the guest; ``wait`` for it."""
        with self._lock:
            request_id = self._next_id
            self._next_id += 1
            pending = Pending(request_id, script, timeout_s)
            self._pending[request_id] = pending
        line = json.dumps({"id": request_id, "sh": script, "timeout_s": timeout_s,
                           "stdin": stdin}).encode() + b"\n"
        self.sock.sendall(line)
        return pending

    def wait(self, pending: Pending) -> Result:
        """The result of a spawned command (the agent's own timeout, plus slack)."""
        if not pending.done.wait(pending.timeout_s + 30):
            with self._lock:
                self._pending.pop(pending.request_id, None)
            return Result(pending.script, -1, "", "no answer from the guest agent",
                          pending.timeout_s + 30, timed_out=True)
        r = pending.reply
        return Result(pending.script, int(r.get("rc", -2)), r.get("stdout", ""),
                      r.get("stderr", ""), float(r.get("elapsed_s", 0)),
                      bool(r.get("timeout")))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# -- the VM ---------------------------------------------------------------------------------


def kvm_usable() -> bool:
    """/dev/kvm can be opened (whether it boots a Linux guest is tried by booting)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


class Vm:
    """One QEMU process with the rig's devices; ``sh`` runs commands in the guest."""

    def __init__(self, workdir: Path, img: Image, share_dir: Path) -> None:
        self.workdir = workdir
        self.image = img
        self.share_dir = share_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.accel = ""
        self.agent: Agent | None = None
        self.qmp: Qmp | None = None
        self.ttys1: FarEnd | None = None
        self.ttys2: FarEnd | None = None
        self.usb: FarEnd | None = None
        self.boots = 0
        self.boot_s: list[float] = []

    def path(self, name: str) -> Path:
        return self.workdir / name

    @property
    def console_log(self) -> Path:
        return self.path(f"console-{self.accel}.log")

    @property
    def trace_log(self) -> Path:
        return self.path(f"trace-{self.accel}.log")

    def trace_mark(self) -> int:
        """Where QEMU's trace log ends now (for ``trace_since``)."""
        try:
            return self.trace_log.stat().st_size
        except FileNotFoundError:
            return 0

    def trace_since(self, mark: int) -> list[str]:
        """The trace lines QEMU wrote after ``mark`` (``trace_mark``)."""
        with self.trace_log.open("rb") as log:
            log.seek(mark)
            return log.read().decode("ascii", "replace").splitlines()

    def console_tail(self, lines: int = 40) -> str:
        return rootfs.tail(self.console_log, lines)

    def _argv(self, accel: str) -> list[str]:
        w = self.path
        cpu = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg"]
        return [
            "qemu-system-x86_64", "-machine", "pc", *cpu, "-smp", "2", "-m", str(MEMORY_MB),
            "-nodefaults", "-display", "none", "-vga", "none", "-nic", "none",
            "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
            "-append", "root=LABEL=uartroot rw console=ttyS0,115200 panic=10 quiet "
                       "systemd.show_status=1 mitigations=off",
            "-drive", f"file={w('overlay.qcow2')},if=virtio,format=qcow2,cache=unsafe",
            "-chardev", f"file,id=con,path={self.console_log}", "-serial", "chardev:con",
            "-chardev", f"socket,id=s1,path={w('ttyS1.sock')},server=on,wait=off",
            "-serial", "chardev:s1",
            "-chardev", f"socket,id=s2,path={w('ttyS2.sock')},server=on,wait=off",
            "-serial", "chardev:s2",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=agent,path={w('agent.sock')},server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=org.uartbridge.agent",
            "-fsdev", f"local,id=src,path={self.share_dir},security_model=none,readonly=on",
            "-device", "virtio-9p-pci,fsdev=src,mount_tag=src",
            "-device", "qemu-xhci,id=xhci",
            "-chardev", f"socket,id=usbser,path={w('usb.sock')},server=on,wait=off",
            "-qmp", f"unix:{w('qmp.sock')},server=on,wait=off",
            # The modem-control lines as the guest's drivers set them, for the tests that
            # check a tty is never closed (``trace_since``): QEMU's 16550 register writes and
            # its usb-serial's control requests (hw/char, hw/usb trace-events).
            "-trace", "serial_write", "-trace", "usb_serial_handle_control",
            "-D", str(self.trace_log),
        ]

    def _launch(self, accel: str) -> float:
        """Start QEMU and wait for the agent's hello; the boot's seconds, or raise."""
        self.accel = accel
        overlay = self.path("overlay.qcow2")
        overlay.unlink(missing_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.image.disk),
                        "-F", "raw", str(overlay)], check=True, timeout=60)
        for name in ("ttyS1.sock", "ttyS2.sock", "agent.sock", "usb.sock", "qmp.sock"):
            self.path(name).unlink(missing_ok=True)
        start = time.monotonic()
        with self.path(f"qemu-{accel}.log").open("wb") as log:
            self.proc = subprocess.Popen(self._argv(accel), stdout=log, stderr=subprocess.STDOUT)
        self.qmp = Qmp(self.path("qmp.sock"))
        self.agent = Agent(self.path("agent.sock"))
        self.ttys1 = FarEnd(self.path("ttyS1.sock"))
        self.ttys2 = FarEnd(self.path("ttyS2.sock"))
        self.usb = FarEnd(self.path("usb.sock"))
        limit_s = KVM_PROBE_S if accel == "kvm" else BOOT_TIMEOUT_S
        hello = self._wait_boot(0, limit_s)
        if hello is None:
            raise TimeoutError(f"no agent after {limit_s:.0f} s under {accel}: "
                               f"{self._why_not()}\n{self.console_tail()}")
        self.boots = 1
        took_s = time.monotonic() - start
        self.boot_s.append(took_s)
        return took_s

    def _why_not(self) -> str:
        if self.proc is not None and self.proc.poll() is not None:
            log = self.path(f"qemu-{self.accel}.log")
            return f"QEMU exited {self.proc.returncode}: {rootfs.tail(log)}"
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                return f"QEMU status {self.qmp.execute('query-status')}"
        return "QEMU is running"

    def _wait_boot(self, after: int, limit_s: float) -> dict[str, Any] | None:
        """Wait for the agent's hello number ``after``, failing early if QEMU died or the
        guest stopped (KVM's internal error leaves QEMU paused)."""
        assert self.agent is not None and self.qmp is not None
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            hello = self.agent.wait_hello(after, 2.0)
            if hello is not None:
                return hello
            if self.proc is not None and self.proc.poll() is not None:
                return None
            status = self.qmp.execute("query-status")
            if status.get("status") in ("internal-error", "guest-panicked", "shutdown"):
                return None
        return None

    def start(self) -> None:
        """Boot: KVM first when /dev/kvm opens (UARTBRIDGE_VM_ACCEL=tcg|kvm forces one)."""
        forced = os.environ.get("UARTBRIDGE_VM_ACCEL", "")
        order = [forced] if forced else (["kvm", "tcg"] if kvm_usable() else ["tcg"])
        errors = []
        for accel in order:
            try:
                took_s = self._launch(accel)
                print(f"VM booted under {accel} in {took_s:.1f} s")
                return
            except (TimeoutError, OSError, AssertionError) as exc:
                errors.append(f"{accel}: {exc}")
                self.stop()
        raise AssertionError("the VM did not boot:\n" + "\n\n".join(errors))

    def sh(self, script: str, timeout_s: float = 60.0, stdin: str = "") -> Result:
        """Run ``script`` in the guest and wait for it."""
        assert self.agent is not None
        return self.agent.wait(self.agent.spawn(script, timeout_s, stdin))

    def ok(self, script: str, timeout_s: float = 60.0) -> str:
        """Run ``script``; its stdout, or an AssertionError with everything it said."""
        result = self.sh(script, timeout_s)
        assert result.rc == 0, str(result)
        return result.stdout

    def reboot(self) -> float:
        """``systemctl reboot`` in the guest and wait for the agent; the seconds it took."""
        assert self.agent is not None
        seen = len(self.agent.hellos)
        start = time.monotonic()
        self.agent.spawn("systemctl reboot", timeout_s=30)
        hello = self._wait_boot(seen, BOOT_TIMEOUT_S)
        if hello is None:
            raise AssertionError(f"no agent after the reboot: {self._why_not()}\n"
                                 f"{self.console_tail()}")
        self.boots += 1
        took_s = time.monotonic() - start
        self.boot_s.append(took_s)
        return took_s

    def stop(self) -> None:
        """Power off (QMP quit), by PID if QEMU does not go; close the host ends."""
        for end in (self.ttys1, self.ttys2, self.usb):
            if end is not None:
                end.close()
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.execute("quit")
            self.qmp.close()
        if self.agent is not None:
            self.agent.close()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.qmp = self.agent = self.ttys1 = self.ttys2 = self.usb = None


@contextlib.contextmanager
def running_vm(workdir: Path, img: Image, share_dir: Path) -> Iterator[Vm]:
    """A booted VM, powered off in ``finally``."""
    vm = Vm(workdir, img, share_dir)
    try:
        vm.start()
        yield vm
    finally:
        vm.stop()
