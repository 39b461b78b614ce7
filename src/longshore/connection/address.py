"""Socket addresses as people read them, shared by every connection class.

A dual-stack ``[::]`` socket sees an IPv4 peer as an IPv4-mapped IPv6 address
(``::ffff:127.0.0.1``), on both ends of the connection; it is shown as the plain IPv4
address it is (``127.0.0.1``), whichever end it names.
"""

from __future__ import annotations

from typing import Any

_MAPPED_PREFIX = "::ffff:"


def plain_host(host: str) -> str:
    """``host``, with an IPv4-mapped IPv6 address (``::ffff:1.2.3.4``) made plain IPv4."""
    if host[:7].lower() == _MAPPED_PREFIX and "." in host:
        return host[7:]
    return host


def format_address(address: Any) -> str:
    """``ip:port``, ``[ip]:port`` for IPv6, the path (or '') for Unix sockets."""
    if isinstance(address, tuple):
        host, port = plain_host(address[0]), address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address or "")


class RemoteAddress:
    """``remote_ip``, ``remote_port`` and ``remote_address`` from ``self._remote``."""

    __slots__ = ()
    _remote: Any

    @property
    def remote_address(self) -> str:
        """``ip:port`` of the peer (``[ip]:port`` for IPv6; the path for Unix sockets)."""
        return format_address(self._remote)

    @property
    def remote_ip(self) -> str:
        """The peer's IP address ('' for Unix sockets)."""
        return plain_host(str(self._remote[0])) if isinstance(self._remote, tuple) else ""

    @property
    def remote_port(self) -> int:
        """The peer's port (0 for Unix sockets)."""
        return int(self._remote[1]) if isinstance(self._remote, tuple) else 0
