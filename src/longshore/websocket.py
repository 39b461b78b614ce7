"""The WebSocket API: ``from longshore.websocket import upgrade, WebSocketConnection, ...``.

See :mod:`longshore.protocols.websocket` for the protocol itself.
"""

from __future__ import annotations

from .protocols.websocket import (
    CLOSE_GOING_AWAY,
    CLOSE_INVALID_DATA,
    CLOSE_NORMAL,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    WebSocketClientProtocol,
    WebSocketConnection,
    WebSocketProtocol,
    upgrade,
)

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INVALID_DATA",
    "CLOSE_NORMAL",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_TOO_BIG",
    "WebSocketClientProtocol",
    "WebSocketConnection",
    "WebSocketProtocol",
    "upgrade",
]
