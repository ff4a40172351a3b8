"""``uartbridge console``: missing socket handling and piped (non-TTY) operation."""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path

import pytest
from test_bus_support import ServerThread

from uartbridge.console import add_arguments, console_command, run_console


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_missing_socket_exits_69_with_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No socket at the path: a one-line message naming it and exit code 69, no traceback."""
    missing = tmp_path / "uart3.bus"
    assert console_command(parse(["--uart", "uart3", "--socket", str(missing)])) == 69
    err = capsys.readouterr().err
    assert str(missing) in err
    assert "Traceback" not in err


def test_default_socket_path_follows_runtime_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --socket the console looks for RUNTIME_DIRECTORY/NAME.bus."""
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    assert console_command(parse(["--uart", "ttyX"])) == 69
    assert str(tmp_path / "ttyX.bus") in capsys.readouterr().err


def test_piped_input_goes_out_and_echo_comes_back() -> None:
    """Piped stdin is transmitted until EOF; what the UART receives is copied to stdout."""
    with ServerThread(echo=True) as srv:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        collected = bytearray()

        def collect() -> None:
            while chunk := os.read(out_r, 4096):
                collected.extend(chunk)

        reader = threading.Thread(target=collect)
        reader.start()
        message = b"hello, far end\n" * 20
        try:
            os.write(in_w, message)
            os.close(in_w)
            in_w = -1
            code = run_console(
                str(srv.path), stdin_fd=in_r, stdout_fd=out_w, interactive=False, linger_s=1.0
            )
        finally:
            for fd in (in_w, in_r, out_w):
                if fd >= 0:
                    os.close(fd)
            reader.join(timeout=10)
            os.close(out_r)
        assert code == 0
        assert srv.sent() == message
        assert bytes(collected) == message


def test_config_names_the_bus_socket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--config FILE: the console attaches to that config's UART's bus socket."""
    config = tmp_path / "c.toml"
    config.write_text(f'[daemon]\nruntime_dir = "{tmp_path}/run"\n[[uart]]\nname = "ttyQ"\n'
                      f'bus_socket = "{tmp_path}/q.bus"\n')
    assert console_command(parse(["--config", str(config)])) == 69
    assert str(tmp_path / "q.bus") in capsys.readouterr().err


def test_config_without_that_uart_is_a_config_error(tmp_path: Path) -> None:
    """--config FILE --uart NAME that the config does not have: a ConfigError naming both."""
    from uartbridge.errors import ConfigError

    config = tmp_path / "c.toml"
    config.write_text('[[uart]]\nname = "ttyQ"\n')
    with pytest.raises(ConfigError, match="no \\[\\[uart\\]\\] named 'other'"):
        console_command(parse(["--config", str(config), "--uart", "other"]))
