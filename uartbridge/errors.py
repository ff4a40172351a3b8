"""The one exception tree of uartbridge.

    UartBridgeError
    ├── InvalidStateError      a UartState the device cannot be in (also a ValueError)
    ├── CheckpointError        a checkpoint file that is corrupt, truncated or inconsistent
    │   └── CheckpointMissingError the checkpoint file is missing or unreadable
    ├── ConfigError            a bad config file, key or value
    │   └── ConfigMissingError     the config file is missing or unreadable
    ├── PortError              the host port failed (open, configure, I/O)
    │   └── PortUnavailableError   the port is not there (missing path, refused connection)
    ├── BusError               the register bus (malformed frame, refused connection, closed)
    └── ControlError           the control socket (daemon not running, bad request)

Foreign errors (OSError, termios.error, serial.SerialException, tomllib.TOMLDecodeError,
json.JSONDecodeError) are mapped to these where they enter, with ``raise ... from exc``.
Each error class carries the process exit code the CLI uses for it (sysexits.h).
"""

from __future__ import annotations

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CONFIG = 78


class UartBridgeError(Exception):
    """Base of every error uartbridge raises on purpose."""

    exit_code: int = EX_SOFTWARE


class InvalidStateError(UartBridgeError, ValueError):
    """A device state that violates a rule of the 16550A (reference §14.2)."""

    exit_code = EX_DATAERR


class CheckpointError(UartBridgeError):
    """A checkpoint that cannot be loaded: corrupt, truncated, unknown or inconsistent."""

    exit_code = EX_DATAERR


class CheckpointMissingError(CheckpointError):
    """A checkpoint file that does not exist or cannot be read."""

    exit_code = EX_NOINPUT


class ConfigError(UartBridgeError):
    """A config file that is missing, malformed, or has a bad key or value."""

    exit_code = EX_CONFIG


class ConfigMissingError(ConfigError):
    """A config file that does not exist or cannot be read."""

    exit_code = EX_NOINPUT


class PortError(UartBridgeError):
    """The host port failed while open (I/O, configuration)."""

    exit_code = EX_UNAVAILABLE


class PortUnavailableError(PortError):
    """The host port could not be opened (missing path, refused connection)."""


class BusError(UartBridgeError):
    """The register bus: a malformed frame, a refused or closed connection."""

    exit_code = EX_UNAVAILABLE


class ControlError(UartBridgeError):
    """The control socket: no daemon listening, or a request it refused."""

    exit_code = EX_UNAVAILABLE
