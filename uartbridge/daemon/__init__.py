"""The daemon: UART services (``service``), the process and its life cycle (``process``), the
control socket's server side (``control_server``) and systemd's notify protocol (``sdnotify``).
"""

from .process import Daemon, resume_command, run_command, serve
from .service import UartService

__all__ = ["Daemon", "UartService", "resume_command", "run_command", "serve"]
