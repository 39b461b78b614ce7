"""longshore: a multi-process, event-driven socket server framework.

A start script creates :class:`Worker` objects, assigns their callbacks and calls
:func:`run_all`, which turns the command line (``start``, ``stop``, ``reload``,
``status`` ...) into a running master with its worker processes.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .cli import run_all
from .connection.async_tcp import AsyncTcpConnection
from .connection.tcp import TcpConnection
from .connection.udp import AsyncUdpConnection
from .errors import CONNECT_FAIL, PACKAGE_TOO_LARGE, PROTOCOL_ERROR, SEND_FAIL
from .protocols import Protocol, register_protocol
from .timer import Timer
from .worker import Worker

__all__ = [
    "CONNECT_FAIL",
    "PACKAGE_TOO_LARGE",
    "PROTOCOL_ERROR",
    "SEND_FAIL",
    "AsyncTcpConnection",
    "AsyncUdpConnection",
    "Protocol",
    "TcpConnection",
    "Timer",
    "Worker",
    "__version__",
    "run_all",
    "register_protocol",
]
