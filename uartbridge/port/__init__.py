"""Port links: a host port (tty, socat pty, ``pty:``, ``rfc2217://``, ``socket://``) as the
wire of one ``Uart16550``.

``link`` holds ``PortLink`` (the byte path and the reader states); ``termios_ops`` the termios
and PARMRK details of ttys; ``owned_pty`` the pty the daemon creates; ``rfc2217`` the worker
thread around pyserial's RFC 2217 client; ``state`` the plain values (config, settings,
counters, the checkpointable ``PortState``) that the checkpoint and config modules share.
"""

from .link import PortLink
from .state import PortCounters, PortSettings, PortState, ReaderState

__all__ = ["PortCounters", "PortLink", "PortSettings", "PortState", "ReaderState"]
