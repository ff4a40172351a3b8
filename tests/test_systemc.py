"""The SystemC/TLM-2.0 target (clients/systemc) and its example VP against the real daemon.

The VP is built with ``make`` into a temporary directory against Debian's libsystemc-dev.
Without it the test skips, except under CI (``CI`` set), where it fails: CI installs it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from native import SYSTEMC_DIR, Program, bridge, far_gets, make, need_c_toolchain

pytestmark = pytest.mark.e2e


def _have_systemc() -> bool:
    pkg_config = shutil.which("pkg-config")
    if pkg_config is not None:
        found = subprocess.run([pkg_config, "--exists", "systemc"], timeout=30)
        if found.returncode == 0:
            return True
    return Path("/usr/include/systemc.h").exists()


@pytest.fixture(scope="module")
def vp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example virtual platform, built with make in a temporary directory."""
    if not _have_systemc():
        if os.environ.get("CI"):
            pytest.fail("libsystemc-dev is not installed (CI installs it: scripts/bootstrap)")
        pytest.skip("libsystemc-dev is not installed")
    need_c_toolchain()
    build = tmp_path_factory.mktemp("scbuild")
    make(SYSTEMC_DIR, build)
    return build / "uartbridge_vp"


_SUMMARY = re.compile(
    r"vp: echoed (\d+) bytes; irq rising edges (\d+) on the signal, (\d+) on the bus; "
    r"(\d+) accesses; simulated (\d+) ns"
)


def test_systemc_vp_prints_banner_and_echoes_byte_exact(vp: Path, tmp_path: Path) -> None:
    """The TLM VP, polling LSR like a ns16550 driver, prints its banner and echoes exactly."""
    typed = bytes(b for b in range(256) if b != 0x04) + b"typed at the far end\r\n"
    env = dict(os.environ, SYSTEMC_DISABLE_COPYRIGHT_MESSAGE="1")
    with bridge(tmp_path) as (d, far):
        # Device tree layouts: reg-shift 2 with 32-bit accesses, and the PC's byte layout.
        for shift, width in ((2, 4), (0, 1)):
            banner = f"uartbridge VP, reg-shift {shift}, reg-io-width {width}\r\n".encode()
            far.received.clear()
            args = ["--reg-shift", str(shift), "--reg-io-width", str(width), "--check-errors"]
            with Program(vp, d.bus(), *args, "--banner", banner.decode(), env=env) as p:
                far_gets(far, banner)
                os.write(far.fd, typed + b"\x04")  # EOT ends the echo loop
                output = p.finish()
            far_gets(far, banner + typed)
            assert "vp: error responses ok" in output
            match = _SUMMARY.search(output)
            assert match is not None, output
            echoed, on_signal, on_bus, accesses, simulated_ns = map(int, match.groups())
            assert echoed == len(typed)
            # IER=RDI: the line rose as bytes came in, seen on the sc_signal and on the bus.
            assert 1 <= on_signal <= on_bus
            # Every access was annotated with the configured 100 ns.
            assert accesses > 2 * len(typed) and simulated_ns >= 100 * accesses
