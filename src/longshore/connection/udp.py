"""UDP: one ``on_message(conn, data)`` per datagram, ``conn.send()`` answers the sender.

Every datagram gets its own light :class:`UdpConnection` (the sender's address and the
worker's socket); there is no connection state between datagrams, so there is no
``on_connect`` or ``on_close``. A Worker's protocol applies to each datagram on its
own: ``Worker("udp://0.0.0.0:9000", protocol="text")`` expects every datagram to hold
whole lines. A datagram its protocol rejects is dropped and counted (``protocol_error``).
``total_request`` counts datagrams.

A datagram carries at most 65507 bytes over IPv4 (65535 less the IP and UDP headers)
and 65527 over IPv6: ``send()`` refuses a larger one at once (False, ``send_fail``,
``on_error(conn, SEND_FAIL, ...)``) instead of leaving the socket to fail it later. A
send the socket reports failed afterwards (``error_received``) counts in ``send_fail``
too.

:class:`AsyncUdpConnection` is the outgoing side: a socket connected to one server,
``send()`` to it, ``on_message`` for each datagram it answers with.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import TYPE_CHECKING, Any

from .. import tasks
from ..errors import CONNECT_FAIL, SEND_FAIL, ProtocolError
from ..listen import parse_listen
from ..stats import process_stats as _stats
from .address import RemoteAddress
from .tcp import Handlers, report_exception

if TYPE_CHECKING:
    from ..protocols.base import Protocol
    from ..worker import Worker

log = logging.getLogger("longshore")

#: The largest payload of one UDP datagram: 65535 less the IPv4 (20) and UDP (8) headers;
#: over IPv6 only the UDP header counts in the 65535 (no jumbograms).
MAX_DATAGRAM_IPV4 = 65507
MAX_DATAGRAM_IPV6 = 65527


def max_datagram(host: str) -> int:
    """The largest payload one datagram to ``host`` (an IP address) can carry. An
    IPv4-mapped IPv6 address (``::ffff:1.2.3.4``, a dual-stack socket) goes as IPv4."""
    return MAX_DATAGRAM_IPV6 if ":" in host and "." not in host else MAX_DATAGRAM_IPV4


def _too_large(size: int, limit: int) -> str:
    return f"datagram of {size} bytes dropped: over the UDP maximum of {limit}"


class UdpConnection(RemoteAddress):
    """The sender of one datagram, and a way to answer it."""

    __slots__ = ("worker", "transport", "protocol", "max_package_size", "_remote", "_handlers", "__dict__")

    id = 0
    default_max_package_size = 65535

    def __init__(self, worker: Worker | None, transport: asyncio.DatagramTransport, remote: Any, protocol_class: type[Protocol],
                 handlers: Handlers | None = None) -> None:
        self.worker = worker
        self.transport = transport
        self._remote = remote
        self._handlers = handlers
        self.max_package_size = self.default_max_package_size
        self.protocol = protocol_class(self)  # type: ignore[arg-type]

    def send(self, data: Any, raw: bool = False) -> bool:
        """Send one datagram to the sender: True, or False (closed socket, a datagram over
        the UDP maximum, or refused by the socket: counted in send_fail; the last two also
        call ``on_error(conn, SEND_FAIL, ...)``)."""
        if not raw:
            data = self.protocol.encode(data)
        elif isinstance(data, str):
            data = data.encode()
        if self.transport.is_closing():
            _stats.send_fail += 1
            return False
        limit = max_datagram(self._remote[0])
        if len(data) > limit:
            return self._failed(_too_large(len(data), limit))
        try:
            self.transport.sendto(data, self._remote)
        except OSError as exc:
            return self._failed(f"udp send to {self.remote_address} failed: {exc}")
        return True

    def _failed(self, message: str) -> bool:
        _stats.send_fail += 1
        log.info("udp send to %s: %s", self.remote_address, message)
        _call(self._handlers.on_error if self._handlers is not None else None, "on_error (udp)", self, SEND_FAIL, message)
        return False

    def close(self, data: Any = None, raw: bool = False) -> None:
        """Send ``data`` if given (a UDP 'connection' has nothing else to close)."""
        if data is not None:
            self.send(data, raw)



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
        connection = UdpConnection(self.worker, self.transport, addr, self.protocol_class, self.handlers)
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
            _call(handler, "on_message (udp)", connection, message)

    def error_received(self, exc: Exception) -> None:
        # A datagram the socket failed to send after sendto() returned (the loop reports
        # send errors here): nothing says to whom, but it is a failed send.
        _stats.send_fail += 1
        log.info("udp socket error: %s", exc)


class AsyncUdpConnection(RemoteAddress, asyncio.DatagramProtocol):
    """An outgoing UDP "connection": a socket connected to ``remote_url`` (``udp://host:port``).

    ::

        stats = AsyncUdpConnection("udp://10.0.0.5:8125", protocol="text")
        stats.on_message = lambda conn, line: print(line)
        stats.connect()
        stats.send("requests:1|c")

    Callbacks: ``on_connect(conn)`` once the socket is ready (sends made before wait
    for it), ``on_message(conn, data)`` per datagram (decoded by ``protocol``, as for
    UDP workers), ``on_error(conn, code, message)`` (``CONNECT_FAIL`` when the address
    cannot be resolved or nobody listens there, as the peer's ICMP answer reports it),
    ``on_close(conn)``. ``send()`` returns True, None (queued before the socket is ready)
    or False (closed, or the socket refused it: counted in ``send_fail``). While open it
    counts in its process's ``connections``.
    """

    #: Datagrams kept while the socket is being made; more are refused.
    max_pending = 1024

    def __init__(self, remote_url: str, *, protocol: type[Protocol] | str | None = None) -> None:
        from ..protocols import get_protocol
        from ..worker import Worker

        address = parse_listen(remote_url)
        if address.transport != "udp":
            raise ValueError(f"{remote_url!r}: AsyncUdpConnection takes udp://host:port")
        if isinstance(protocol, str):
            protocol = get_protocol(protocol)
        self.remote_url = remote_url
        self.worker = Worker.current
        self.protocol_class: type[Protocol] = protocol or get_protocol("udp")
        self.max_package_size = UdpConnection.default_max_package_size
        self.protocol = self.protocol_class(self)  # type: ignore[arg-type]
        self.transport: asyncio.DatagramTransport | None = None
        self.on_connect: Any = None
        self.on_message: Any = None
        self.on_error: Any = None
        self.on_close: Any = None
        self._address = address
        self._pending: list[bytes] = []
        self._state = "new"
        self._remote: Any = (address.host, address.port)

    def connect(self) -> None:
        """Create the socket (returns at once; ``on_connect`` or ``on_error`` follows)."""
        if self._state not in ("new", "closed"):
            return
        self._state = "connecting"
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_datagram_endpoint(lambda: self, remote_addr=(self._address.host, self._address.port))
        except OSError as exc:
            self._state = "closed"
            _stats.connect_fail += 1
            self._emit(self.on_error, "on_error", CONNECT_FAIL, f"connect to {self.remote_url} failed: {exc.strerror or exc}")
            self._emit(self.on_close, "on_close")

    # -- asyncio.DatagramProtocol ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        if self._state == "closed":  # closed while connecting
            transport.close()
            return
        self.transport = transport  # type: ignore[assignment]
        self._remote = transport.get_extra_info("peername") or self._remote
        self._state = "open"
        _stats.connections += 1
        pending, self._pending = self._pending, []
        for data in pending:
            self._sendto(data)
        self._emit(self.on_connect, "on_connect")

    def datagram_received(self, data: bytes, addr: Any) -> None:
        _stats.total_request += 1
        try:
            messages = self.protocol.feed(data)
        except ProtocolError as exc:
            _stats.protocol_error += 1
            log.info("udp datagram from %s dropped: %s", self.remote_address, exc)
            return
        if not messages and self.protocol.buffered():
            _stats.protocol_error += 1
            self.protocol = self.protocol_class(self)  # type: ignore[arg-type]  # forget the partial package
            return
        for message in messages:
            self._emit(self.on_message, "on_message (udp)", message)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionRefusedError):
            _stats.connect_fail += 1
            self._emit(self.on_error, "on_error", CONNECT_FAIL, f"{self.remote_url}: nobody listens there ({exc.strerror or exc})")
        else:
            _stats.send_fail += 1
            self._emit(self.on_error, "on_error", SEND_FAIL, f"{self.remote_url}: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state == "open":
            _stats.connections -= 1
        self._state = "closed"
        self.transport = None
        self._emit(self.on_close, "on_close")

    # -- sending ------------------------------------------------------------------------------
    def send(self, data: Any, raw: bool = False) -> bool | None:
        """Send one datagram: True, None (waits for the socket) or False (counted in send_fail)."""
        if not raw:
            data = self.protocol.encode(data)
        elif isinstance(data, str):
            data = data.encode()
        limit = self._max_datagram()
        if len(data) > limit:
            _stats.send_fail += 1
            self._emit(self.on_error, "on_error", SEND_FAIL, _too_large(len(data), limit))
            return False
        if self._state in ("new", "connecting"):
            if len(self._pending) >= self.max_pending:
                _stats.send_fail += 1
                return False
            self._pending.append(data)
            return None
        if self._state != "open":
            _stats.send_fail += 1
            return False
        return self._transmit(data)  # checked above, against the server's address

    def _max_datagram(self) -> int:
        """The UDP maximum towards the server; before the socket is made and while its
        address is a name, the larger one (the exact check comes when it is sent)."""
        host = str(self._remote[0])
        if self._state != "open":  # once open, the address is the socket's peer: an IP
            try:
                ipaddress.ip_address(host)
            except ValueError:
                return MAX_DATAGRAM_IPV6
        return max_datagram(host)

    def _sendto(self, data: bytes) -> bool:
        """Send what was queued before the socket was made (checked again: its address
        may have been a name that turned out IPv4)."""
        limit = self._max_datagram()
        if len(data) > limit:
            _stats.send_fail += 1
            self._emit(self.on_error, "on_error", SEND_FAIL, _too_large(len(data), limit))
            return False
        return self._transmit(data)

    def _transmit(self, data: bytes) -> bool:
        try:
            self.transport.sendto(data)  # type: ignore[union-attr]
        except OSError as exc:
            _stats.send_fail += 1
            self._emit(self.on_error, "on_error", SEND_FAIL, f"send to {self.remote_url} failed: {exc}")
            return False
        return True

    def close(self, data: Any = None, raw: bool = False) -> None:
        """Send ``data`` if given, then close the socket (``on_close`` follows)."""
        if data is not None:
            self.send(data, raw)
        if self._state in ("new", "connecting"):
            self._state = "closed"
        elif self.transport is not None:
            self.transport.close()

    @property
    def closed(self) -> bool:
        """True unless the socket is open or being made."""
        return self._state == "closed"


    def _emit(self, handler: Any, what: str, *args: Any) -> None:
        _call(handler, what, self, *args)


def _call(handler: Any, what: str, *args: Any) -> None:
    """Run a UDP callback (a function, or a coroutine function whose coroutine runs as
    its own task); what it raises is logged and counted."""
    if handler is None:
        return
    try:
        result = handler(*args)
        if asyncio.iscoroutine(result):
            tasks.run_coroutine(result, what)
    except Exception:
        report_exception(what)


__all__ = ["AsyncUdpConnection", "MAX_DATAGRAM_IPV4", "MAX_DATAGRAM_IPV6", "SEND_FAIL", "UdpConnection", "UdpServer", "max_datagram"]
