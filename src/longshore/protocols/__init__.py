"""Protocols by listen-URL scheme, and the registry that maps one to the other.

Built in: ``tcp`` (raw bytes), ``text`` (lines), ``frame`` (length-prefixed), ``http``
(HTTP/1.1, :mod:`longshore.protocols.http`), ``websocket`` (server) and ``ws`` (client,
:mod:`longshore.protocols.websocket`). A user
protocol becomes available in listen URLs with :func:`register_protocol`, or is passed
directly as ``Worker(..., protocol=MyProtocol)``.
"""

from __future__ import annotations

from .base import PackageProtocol, Protocol, RawProtocol
from .frame import FrameProtocol
from .http import HttpProtocol
from .text import TextProtocol
from .websocket import WebSocketClientProtocol, WebSocketProtocol

_registry: dict[str, type[Protocol]] = {
    "tcp": RawProtocol,
    "udp": RawProtocol,
    "text": TextProtocol,
    "frame": FrameProtocol,
    "http": HttpProtocol,
    "websocket": WebSocketProtocol,
    "ws": WebSocketClientProtocol,
}


def register_protocol(scheme: str, protocol: type[Protocol]) -> None:
    """Make ``scheme://host:port`` listen URLs use ``protocol``."""
    if not (isinstance(protocol, type) and issubclass(protocol, Protocol)):
        raise TypeError("a protocol must be a subclass of longshore.protocols.Protocol")
    _registry[scheme.lower()] = protocol


def get_protocol(scheme: str) -> type[Protocol]:
    """Return the protocol class registered for ``scheme``; ValueError if there is none."""
    try:
        return _registry[scheme.lower()]
    except KeyError:
        known = ", ".join(sorted(_registry))
        raise ValueError(
            f"unknown protocol {scheme!r} (known: {known}); register yours with "
            "longshore.protocols.register_protocol(scheme, cls) or pass Worker(protocol=cls)"
        ) from None


__all__ = [
    "FrameProtocol",
    "HttpProtocol",
    "PackageProtocol",
    "Protocol",
    "RawProtocol",
    "TextProtocol",
    "WebSocketClientProtocol",
    "WebSocketProtocol",
    "get_protocol",
    "register_protocol",
]
