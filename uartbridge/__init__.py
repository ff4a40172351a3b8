"""uartbridge: a checkpointable 16550A UART for emulators, whose wire is a real serial port."""

from .errors import (
    BusError,
    CheckpointError,
    ConfigError,
    ControlError,
    InvalidStateError,
    PortError,
    PortUnavailableError,
    UartBridgeError,
)
from .uart import (
    LineSettings,
    ModemOutputs,
    Uart16550,
    UartEvents,
    UartState,
    UartStatistics,
)

__version__ = "0.1.0"

__all__ = [
    "BusError",
    "CheckpointError",
    "ConfigError",
    "ControlError",
    "InvalidStateError",
    "LineSettings",
    "ModemOutputs",
    "PortError",
    "PortUnavailableError",
    "Uart16550",
    "UartBridgeError",
    "UartEvents",
    "UartState",
    "UartStatistics",
    "__version__",
]
