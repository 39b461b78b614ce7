"""UDP: one ``on_message(conn, data)`` per datagram, ``conn.send()`` answers the sender.

Every datagram gets its own light :class:`UdpConnection` (the sender's address and the
worker's socket); there is no connection state between datagrams, so there is no
``on_connect`` or ``on_close``. A Worker's protocol applies to each datagram on its
own: ``Worker("udp://0.0.0.0:9000", protocol="text")`` expects every datagram to hold
whole lines. A datagram its protocol rejects is dropped and counted (``protocol_error``).
``total_request`` counts datagrams.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ..errors import SEND_FAIL, ProtocolError
from ..stats import process_stats as _stats
from .tcp import Handlers, report_exception

if TYPE_CHECKING:
    from ..protocols.base import Protocol
    from ..worker import Worker

log = logging.getLogger("longshore")


class UdpConnection:
    """The sender of one datagram, and a way to answer it."""

    __slots__ = ("worker", "transport", "protocol", "max_package_size", "_remote", "__dict__")

    id = 0
    default_max_package_size = 65535

    def __init__(self, worker: Worker | None, transport: asyncio.DatagramTransport, remote: Any, protocol_class: type[Protocol]) -> None:
        self.worker = worker
        self.transport = transport
        self._remote = remote
        self.max_package_size = self.default_max_package_size
        self.protocol = protocol_class(self)  # type: ignore[arg-type]

    def send(self, data: Any, raw: bool = False) -> bool:
        """Send one datagram to the sender: True, or False (counted in send_fail)."""
        if not raw:
            data = self.protocol.encode(data)
        elif isinstance(data, str):
            data = data.encode()
        if self.transport.is_closing():
            _stats.send_fail += 1
            return False
        try:
            self.transport.sendto(data, self._remote)
        except OSError as exc:
            _stats.send_fail += 1
            log.info("udp send to %s failed: %s", self.remote_address, exc)
            return False
        return True

    def close(self, data: Any = None, raw: bool = False) -> None:
        """Send ``data`` if given (a UDP 'connection' has nothing else to close)."""
        if data is not None:
            self.send(data, raw)

    @property
    def remote_ip(self) -> str:
        """The sender's IP address."""
        return str(self._remote[0]) if isinstance(self._remote, tuple) else ""

    @property
    def remote_port(self) -> int:
        """The sender's port."""
        return int(self._remote[1]) if isinstance(self._remote, tuple) else 0

    @property
    def remote_address(self) -> str:
        """``ip:port`` of the sender (``[ip]:port`` for IPv6)."""
        host, port = self.remote_ip, self.remote_port
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class UdpServer(asyncio.DatagramProtocol):
    """A worker's UDP socket: decodes each datagram and calls ``on_message``."""

    def __init__(self, worker: Worker, protocol_class: type[Protocol], handlers: Handlers) -> None:
        self.worker = worker
        self.protocol_class = protocol_class
        self.handlers = handlers
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        _stats.total_request += 1
        assert self.transport is not None
        connection = UdpConnection(self.worker, self.transport, addr, self.protocol_class)
        try:
            messages = connection.protocol.feed(data)
        except ProtocolError as exc:
            _stats.protocol_error += 1
            log.info("udp datagram from %s dropped: %s", connection.remote_address, exc)
            return
        if not messages and connection.protocol.buffered():
            _stats.protocol_error += 1
            log.info("udp datagram from %s dropped: an incomplete package", connection.remote_address)
            return
        handler = self.handlers.on_message
        if handler is None:
            return
        for message in messages:
            try:
                result = handler(connection, message)
                if result is not None and hasattr(result, "__await__"):
                    task = asyncio.get_running_loop().create_task(result)
                    task.add_done_callback(_report_task)
            except Exception:
                report_exception("on_message (udp)")

    def error_received(self, exc: Exception) -> None:
        log.info("udp socket error: %s", exc)


def _report_task(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        _stats.throw_exception += 1
        log.error("exception in on_message (udp)", exc_info=task.exception())


__all__ = ["SEND_FAIL", "UdpConnection", "UdpServer"]
