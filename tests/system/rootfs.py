"""Debootstrapped Debian roots for the system tests: build, configure like the host, mount.

A root gets the host's apt sources (its Debian entries, re-pointed at the root's suite), the
host's apt network settings, CA files and pip configuration, so that apt and pip inside reach
the same registries as this machine. Only debootstrap's download is cached (``--cache-dir``,
keyed by suite, variant and package list); every root is installed afresh.
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

# The debootstrap download cache (.debs only). CI may keep this directory between runs.
CACHE_DIR = Path(os.environ.get("UARTBRIDGE_TEST_CACHE", "/var/cache/uartbridge-tests"))
# Where roots and VM images are built (not under pytest's basetemp, which other sessions prune).
WORK_DIR = os.environ.get("UARTBRIDGE_TEST_WORK", "/var/tmp")
DEBOOTSTRAP_TIMEOUT_S = 900.0
PIP_CONFIG_FILES = (
    Path("/etc/pip.conf"),
    Path("/etc/xdg/pip/pip.conf"),
    Path.home() / ".config/pip/pip.conf",
    Path.home() / ".pip/pip.conf",
)
# pip options whose values may name local files or directories (file:// URLs included).
PIP_PATH_OPTIONS = (
    "find-links", "index-url", "extra-index-url", "constraint", "cert", "client-cert",
)
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
LOCAL_CAS = Path("/usr/local/share/ca-certificates")


def require_root_tools() -> None:
    """Skip unless this test can build roots here: root and debootstrap (CI fails instead)."""
    import pytest

    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    if shutil.which("debootstrap") is None:
        missing.append("debootstrap")
    if missing:
        message = f"system test needs {' and '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


# -- the host's apt configuration -------------------------------------------------------------


def host_codename() -> str:
    """The host's Debian codename (VERSION_CODENAME in /etc/os-release)."""
    text = Path("/etc/os-release").read_text(encoding="utf-8")
    found = re.search(r"^VERSION_CODENAME=\"?([a-z]+)\"?$", text, flags=re.MULTILINE)
    if not found:
        raise RuntimeError("/etc/os-release names no VERSION_CODENAME")
    return found.group(1)


def _source_stanzas() -> list[dict[str, str]]:
    """The host's enabled apt sources, one-line and deb822 forms, as deb822 fields."""
    stanzas: list[dict[str, str]] = []
    apt = Path("/etc/apt")
    lists = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for path in lists:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) < 4 or words[0] != "deb":
                continue
            options = {}
            if words[1].startswith("["):
                opts = []
                while words and not words[1].endswith("]"):
                    opts.append(words.pop(1))
                opts.append(words.pop(1))
                for opt in " ".join(opts).strip("[]").split():
                    key, _, value = opt.partition("=")
                    options[key.lower()] = value
            stanza = {"Types": "deb", "URIs": words[1], "Suites": words[2],
                      "Components": " ".join(words[3:])}
            if "signed-by" in options:
                stanza["Signed-By"] = options["signed-by"]
            stanzas.append(stanza)
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
            stanza: dict[str, str] = {}
            for line in block.splitlines():
                if line.startswith("#") or ":" not in line or line[0].isspace():
                    continue
                key, _, value = line.partition(":")
                stanza[key.strip()] = value.strip()
            if "deb" in stanza.get("Types", "").split() and stanza.get("Enabled", "yes") != "no":
                stanzas.append(stanza)
    return stanzas


def debian_sources(suite: str) -> tuple[str, str]:
    """(mirror URL, deb822 sources text) for ``suite``, from the host's Debian entries.

    An entry counts as Debian's when its suites are the host's codename or its -updates /
    -security suites; those are re-pointed at ``suite``. Other entries (third-party
    repositories) are left out: their keys and suites are the host's business.
    """
    host = host_codename()
    pattern = re.compile(rf"^{re.escape(host)}(-updates|-security|-backports)?$")
    mirror = ""
    out = []
    for stanza in _source_stanzas():
        suites = stanza.get("Suites", "").split()
        if not suites or not all(pattern.match(s) for s in suites):
            continue
        if host in suites and not mirror:
            mirror = stanza["URIs"].split()[0]
        new = dict(stanza, Suites=" ".join(suite + s[len(host):] for s in suites))
        out.append("\n".join(f"{k}: {v}" for k, v in new.items()))
    if not mirror:
        raise RuntimeError(f"the host's apt sources have no '{host}' entry to take a mirror from")
    return mirror, "\n\n".join(out) + "\n"


def _apt_network_conf() -> list[Path]:
    """The host's apt.conf files that set how apt reaches its mirrors (Acquire::…)."""
    confs = [Path("/etc/apt/apt.conf"), *sorted(Path("/etc/apt/apt.conf.d").glob("*"))]
    return [p for p in confs if p.is_file() and "Acquire::" in p.read_text(errors="replace")]


# -- the host's pip configuration -------------------------------------------------------------


def _pip_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("PIP_")}


def _pip_local_paths() -> tuple[list[Path], list[Path]]:
    """(directories, files) the host's pip configuration names: find-links, file:// indexes,
    constraints, CA files."""
    values: list[str] = []
    for path in PIP_CONFIG_FILES:
        if not path.is_file():
            continue
        parser = configparser.ConfigParser()
        parser.read(path, encoding="utf-8")
        for section in parser.sections():
            for option in PIP_PATH_OPTIONS:
                if parser.has_option(section, option):
                    values += parser.get(section, option).split()
    for key, value in _pip_env().items():
        if key.removeprefix("PIP_").lower().replace("_", "-") in PIP_PATH_OPTIONS:
            values += value.split()
    dirs: list[Path] = []
    files: list[Path] = []
    for value in values:
        local = value.removeprefix("file://")
        if not local.startswith("/"):
            continue
        path = Path(local)
        if path.is_file():
            files.append(path)
            continue
        if path.name == "simple":
            path = path.parent  # a PEP 503 index links to ../../files/…
        if path.is_dir() and not any(path.is_relative_to(d) for d in dirs):
            dirs = [d for d in dirs if not d.is_relative_to(path)] + [path]
    return dirs, files


def pip_local_dirs() -> list[Path]:
    """Local directories the host's pip configuration reads, to bind-mount into a root."""
    return _pip_local_paths()[0]


def _copy_in(src: Path, dest: Path) -> None:
    """Copy a host file to ``dest`` in a root, never through a symlink there (which could
    point at the host's own file)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink():
        dest.unlink()
    shutil.copyfile(src, dest)


def configure_like_host(root: Path, suite: str, homes: Sequence[Path] = (Path("/root"),)) -> None:
    """Copy in the host's apt sources and network settings, CA files and pip configuration."""
    _, sources = debian_sources(suite)
    apt = root / "etc/apt"
    (apt / "sources.list").unlink(missing_ok=True)
    (apt / "sources.list.d").mkdir(parents=True, exist_ok=True)
    (apt / "sources.list.d/debian.sources").write_text(sources, encoding="utf-8")
    for conf in _apt_network_conf():
        _copy_in(conf, root / conf.relative_to("/"))
    # This machine's CAs: the local ones survive update-ca-certificates inside the root.
    if LOCAL_CAS.is_dir():
        for ca in LOCAL_CAS.rglob("*"):
            if ca.is_file():
                _copy_in(ca, root / ca.relative_to("/"))
    if CA_BUNDLE.is_file():
        _copy_in(CA_BUNDLE, root / CA_BUNDLE.relative_to("/"))
    for conf in PIP_CONFIG_FILES:
        if not conf.is_file():
            continue
        if conf.is_relative_to(Path.home()):
            targets = [h / conf.relative_to(Path.home()) for h in homes]
        else:
            targets = [conf]
        for target in targets:
            _copy_in(conf, root / target.relative_to("/"))
    for named in _pip_local_paths()[1]:  # a constraints file, a CA file
        _copy_in(named, root / named.relative_to("/"))
    hosts = root / "etc/hosts"
    if not hosts.exists():
        hosts.write_text("127.0.0.1\tlocalhost\n::1\tlocalhost\n", encoding="ascii")
    hostname = (root / "etc/hostname").read_text(encoding="ascii").strip() or "localhost"
    with hosts.open("a", encoding="ascii") as fh:
        fh.write(f"127.0.1.1\t{hostname}\n")  # sudo looks the host name up


def root_env(home: str, user: str, **extra: str) -> dict[str, str]:
    """A login-like environment for a command in a root, with the host's PIP_* settings."""
    env = {
        "HOME": home, "USER": user, "LOGNAME": user, "LANG": "C.UTF-8", "TERM": "dumb",
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    }
    env.update(_pip_env())
    env.update(extra)
    return env


# -- debootstrap --------------------------------------------------------------------------


def debootstrap(root: Path, suite: str, packages: Sequence[str], *, log: Path) -> float:
    """Install a minbase ``suite`` with ``packages`` into ``root``; returns seconds taken.

    The .debs are cached under CACHE_DIR by suite and package list (a download cache only:
    the root itself is always installed afresh).
    """
    mirror, _ = debian_sources(suite)
    include = ",".join(sorted(packages))
    key = hashlib.sha256(f"{suite} minbase {include} {mirror}".encode()).hexdigest()[:12]
    cache = CACHE_DIR / f"debootstrap-{suite}-{key}"
    cache.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with (cache / ".lock").open("w") as lock, log.open("ab") as out:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two sessions may share a cache
        proc = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={include}",
             f"--cache-dir={cache}", suite, str(root), mirror],
            stdout=out, stderr=subprocess.STDOUT, timeout=DEBOOTSTRAP_TIMEOUT_S, check=False,
        )
    if proc.returncode != 0:
        raise AssertionError(f"debootstrap {suite} failed (exit {proc.returncode}):\n"
                             + tail(log))
    return time.monotonic() - start


def tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a log file, for an assertion message."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


# -- mounts and processes -------------------------------------------------------------------


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root`` (from /proc/mounts), deepest last."""
    prefix = str(root.resolve())
    found = []
    for line in Path("/proc/mounts").read_text(encoding="utf-8").splitlines():
        point = line.split()[1].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found


def processes_in(root: Path) -> list[int]:
    """PIDs of the processes whose root directory is ``root`` (they were started in it)."""
    target = str(root.resolve())
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(entry / "root") == target:
                pids.append(int(entry.name))
    return pids


def stop_processes_in(root: Path) -> list[int]:
    """Stop what still runs inside ``root`` (ours: the test started it there), by PID."""
    left = processes_in(root)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while processes_in(root) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = processes_in(root)
        if not left:
            break
    return left


@contextlib.contextmanager
def mounted(root: Path, ro_binds: Sequence[Path] = ()) -> Iterator[None]:
    """/proc, /sys, /dev, /dev/pts (and read-only binds) in ``root``; all unmounted after.

    On the way out, processes left in the root are stopped by PID, every mount under the root
    is unmounted, and /proc/mounts is checked: a mount left behind is an error (and the root
    must then not be deleted).
    """
    done: list[Path] = []

    def mount(args: list[str], point: Path) -> None:
        point.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", *args, str(point)], check=True, timeout=30)
        done.append(point)

    try:
        # The root as a private mount of its own first, so that nothing mounted below it
        # propagates to the host's mounts (on a systemd host / is a shared mount).
        mount(["--bind", str(root)], root)
        subprocess.run(["mount", "--make-private", str(root)], check=True, timeout=30)
        mount(["-t", "proc", "proc"], root / "proc")
        mount(["-t", "sysfs", "sysfs"], root / "sys")
        mount(["--bind", "/dev"], root / "dev")
        mount(["--bind", "/dev/pts"], root / "dev/pts")
        mount(["-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs"], root / "dev/shm")
        for path in ro_binds:
            point = root / path.relative_to("/")
            mount(["--bind", str(path)], point)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(point)], check=True,
                           timeout=30)
        yield
    finally:
        stop_processes_in(root)
        for point in reversed(mounts_under(root)):
            if subprocess.run(["umount", point], timeout=60, check=False).returncode != 0:
                subprocess.run(["umount", "-l", point], timeout=60, check=False)
        left = mounts_under(root)
        if left:
            raise AssertionError(f"mounts left under {root}: {left}")


def remove_root(root: Path) -> None:
    """Delete a root, only once nothing is mounted under it (never through a bind mount)."""
    if mounts_under(root):
        raise AssertionError(f"not deleting {root}: still mounted: {mounts_under(root)}")
    subprocess.run(["rm", "-rf", "--one-file-system", str(root)], timeout=300, check=False)
