"""The one exception tree of uartbridge.

    UartBridgeError
    ├── InvalidStateError      a UartState the device cannot be in (also a ValueError)
    ├── CheckpointError        a checkpoint file that is corrupt, truncated or inconsistent
    │   ├── CheckpointMissingError the checkpoint file is missing or unreadable
    │   └── CheckpointWriteError   a checkpoint that cannot be written (disk full, read-only…)
    ├── ConfigError            a bad config file, key or value
    │   └── ConfigMissingError     the config file is missing or unreadable
    ├── StateDirError          the state or runtime directory cannot be used (73 / 74)
    ├── DaemonRunningError     another daemon holds this state directory (75)
    ├── PortError              the host port failed (open, configure, I/O)
    │   └── PortUnavailableError   the port is not there (missing path, refused connection)
    ├── BusError               the register bus (malformed frame, refused connection, closed)
    ├── ControlError           the control socket (daemon not running, bad request)
    └── RecordingError         a recording that is corrupt (65), missing (66) or cannot be
                               written (73 / 74)

Foreign errors (OSError, termios.error, serial.SerialException, tomllib.TOMLDecodeError,
json.JSONDecodeError) are mapped to these where they enter, with ``raise ... from exc``.
Each error class carries the process exit code the CLI uses for it (sysexits.h).
"""

from __future__ import annotations

import errno

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_CONFIG = 78

# errno values that mean "cannot create here" (73) rather than "I/O failed" (74).
_CANTCREAT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT,
                               errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.EEXIST})


def exit_code_for_os_error(exc: OSError) -> int:
    """73 (can't create: permission, read-only, missing directory) or 74 (I/O: ENOSPC, EIO…)."""
    return EX_CANTCREAT if exc.errno in _CANTCREAT_ERRNOS else EX_IOERR


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


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written: the state is fine, the filesystem is not.

    ``exit_code`` is 73 or 74 from the errno (``exit_code_for_os_error``); ``reason`` is the
    system's words for it ("No space left on device").
    """

    exit_code = EX_IOERR

    def __init__(self, message: str, *, exit_code: int = EX_IOERR, reason: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.reason = reason or message


class ConfigError(UartBridgeError):
    """A config file that is missing, malformed, or has a bad key or value."""

    exit_code = EX_CONFIG


class ConfigMissingError(ConfigError):
    """A config file that does not exist or cannot be read."""

    exit_code = EX_NOINPUT


class StateDirError(UartBridgeError):
    """The state or runtime directory cannot be created, locked or written (73 or 74)."""

    exit_code = EX_CANTCREAT

    def __init__(self, message: str, *, exit_code: int = EX_CANTCREAT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class DaemonRunningError(UartBridgeError):
    """Another daemon holds the lock on this state directory (75, EX_TEMPFAIL)."""

    exit_code = EX_TEMPFAIL


class DaemonStoppingError(UartBridgeError):
    """The daemon is stopping and does not serve this request any more (69)."""

    exit_code = EX_UNAVAILABLE


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


class RecordingError(UartBridgeError):
    """A recording (``uartbridge run --record``) that is not a valid one, that cannot be
    read (66), or that cannot be written (73 / 74 from the errno)."""

    exit_code = EX_DATAERR

    def __init__(self, message: str, *, exit_code: int = EX_DATAERR) -> None:
        super().__init__(message)
        self.exit_code = exit_code
