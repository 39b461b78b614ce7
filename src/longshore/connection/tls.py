"""TLS for stream connections: certificates, contexts, and the server-side handshake.

``Worker("http://0.0.0.0:443", ssl={"certfile": "cert.pem", "keyfile": "key.pem"})``
(or ``ssl=ssl_context``, or ``transport="ssl"`` to say it in the workerman way) serves
its protocol over TLS. Outgoing connections take ``ssl=True``, a context or a dict
(:func:`client_context`).

Why the handshake runs here and not inside ``loop.create_server(ssl=...)``: there, a
failed handshake (a plain-text client, an unknown CA, a client that never finishes) is
swallowed by the loop and never reaches the application, so it can be neither counted
nor logged. A :class:`TlsAcceptor` takes each accepted socket, runs the handshake with
``loop.start_tls`` (bounded by ``ssl_handshake_timeout``), and only then hands the TLS
transport to the connection, whose ``connection_made`` runs as for plain TCP. A failed
handshake counts ``tls_error``, is logged at INFO level, and closes that socket only;
the loop never waits on it, so other clients are not disturbed. A client that connects
and closes without sending a byte (a load balancer's TCP health check) is not an error:
it is closed quietly and not counted.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as _ssl
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..stats import process_stats as _stats

if TYPE_CHECKING:
    from .tcp import TcpConnection

log = logging.getLogger("longshore")

#: What a Worker or AsyncTcpConnection accepts as ``ssl=``.
SslOption = Any

_SERVER_KEYS = {"certfile", "keyfile", "password", "cafile", "capath", "verify_client", "ciphers", "alpn", "minimum_version"}
_CLIENT_KEYS = {"cafile", "capath", "verify", "certfile", "keyfile", "password", "ciphers", "alpn", "minimum_version"}


def _check_keys(options: Mapping[str, Any], allowed: set[str], what: str) -> None:
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"unknown {what} ssl option(s) {sorted(unknown)}; known: {sorted(allowed)}")


def server_context(option: SslOption) -> _ssl.SSLContext:
    """An SSLContext for a listening worker.

    ``option`` is an :class:`ssl.SSLContext` (used as it is) or a dict:
    ``certfile`` and ``keyfile`` (PEM paths; ``keyfile`` may be left out when the
    certificate file holds the key), ``password`` for an encrypted key, ``cafile`` /
    ``capath`` with ``verify_client=True`` to require client certificates, ``ciphers``,
    ``alpn`` (a list such as ``["http/1.1"]``) and ``minimum_version``
    (an :class:`ssl.TLSVersion`).
    """
    if isinstance(option, _ssl.SSLContext):
        return option
    if not isinstance(option, Mapping):
        raise TypeError("ssl= takes an ssl.SSLContext or a dict like {'certfile': ..., 'keyfile': ...}")
    _check_keys(option, _SERVER_KEYS, "server")
    if not option.get("certfile"):
        raise ValueError("a TLS listener needs ssl={'certfile': ..., 'keyfile': ...}")
    context = _ssl.create_default_context(_ssl.Purpose.CLIENT_AUTH, cafile=option.get("cafile"), capath=option.get("capath"))
    context.load_cert_chain(option["certfile"], option.get("keyfile"), option.get("password"))
    if option.get("verify_client"):
        context.verify_mode = _ssl.CERT_REQUIRED
    _common_options(context, option)
    return context


def client_context(option: SslOption) -> _ssl.SSLContext | None:
    """An SSLContext for an outgoing connection (None: plain TCP).

    ``True`` verifies the server against the system's CAs and the host name;
    an :class:`ssl.SSLContext` is used as it is; a dict takes ``cafile`` / ``capath``
    (trust these CAs), ``verify=False`` (no certificate or host name check: tests only),
    ``certfile`` / ``keyfile`` / ``password`` (a client certificate), ``ciphers``,
    ``alpn`` and ``minimum_version``.
    """
    if option is None or option is False:
        return None
    if option is True:
        return _ssl.create_default_context()
    if isinstance(option, _ssl.SSLContext):
        return option
    if not isinstance(option, Mapping):
        raise TypeError("ssl= takes True, an ssl.SSLContext or a dict like {'cafile': ...}")
    _check_keys(option, _CLIENT_KEYS, "client")
    context = _ssl.create_default_context(cafile=option.get("cafile"), capath=option.get("capath"))
    if option.get("verify", True) is False:
        context.check_hostname = False
        context.verify_mode = _ssl.CERT_NONE
    if option.get("certfile"):
        context.load_cert_chain(option["certfile"], option.get("keyfile"), option.get("password"))
    _common_options(context, option)
    return context


def _common_options(context: _ssl.SSLContext, option: Mapping[str, Any]) -> None:
    if option.get("ciphers"):
        context.set_ciphers(option["ciphers"])
    if option.get("alpn"):
        context.set_alpn_protocols(list(option["alpn"]))
    if option.get("minimum_version"):
        context.minimum_version = option["minimum_version"]


#: Handshakes under way in this process (so that a stopping worker can end them).
_handshakes: set[asyncio.Task[Any]] = set()


class TlsAcceptor(asyncio.Protocol):
    """Owns one accepted socket until its TLS handshake is done.

    On success the TLS transport is given to the connection made by ``make_connection``
    (its ``connection_made`` runs then, as for plain TCP); on failure the socket is
    closed and ``tls_error`` counted. The acceptor also stands in as the TLS layer's
    application protocol during the handshake, so a failed handshake never reaches the
    connection.

    The handshake starts when the client's first bytes (its ClientHello) arrive: they are
    kept here and handed to the TLS layer right after it takes the socket over, ahead of
    anything read later. A client that closes before sending anything was only checking
    that the port answers.

    Application data that comes in the read that finishes the handshake (a client may
    send its first request together with its Finished message) is decrypted by the TLS
    layer before the connection takes over: it is kept here and given to the connection
    right after its ``connection_made``.
    """

    __slots__ = ("context", "make_connection", "handshake_timeout", "transport", "early", "late", "lost", "spoke")

    def __init__(self, context: _ssl.SSLContext, make_connection: Callable[[], TcpConnection], handshake_timeout: float) -> None:
        self.context = context
        self.make_connection = make_connection
        self.handshake_timeout = handshake_timeout
        self.transport: asyncio.BaseTransport | None = None
        self.early: bytearray | None = bytearray()
        #: Decrypted application data read before the connection took over.
        self.late: bytearray | None = None
        self.lost = False
        #: Resolved True by the client's first bytes, False by its EOF or a lost socket.
        self.spoke: asyncio.Future[bool] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        self.transport = transport
        loop = asyncio.get_running_loop()
        self.spoke = loop.create_future()
        task = loop.create_task(self._handshake(transport))
        _handshakes.add(task)
        task.add_done_callback(_handshakes.discard)

    def data_received(self, data: bytes) -> None:
        early = self.early
        if early is not None:  # before the TLS layer took over
            early += data
            self.transport.pause_reading()  # type: ignore[union-attr]
            self._first_sign(True)
            return
        # From the TLS layer: application data, read with the end of the handshake.
        if self.late is None:
            self.late = bytearray()
        self.late += data

    def eof_received(self) -> bool | None:
        self._first_sign(False)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._first_sign(False)

    def _first_sign(self, spoke: bool) -> None:
        future = self.spoke
        if future is not None and not future.done():
            future.set_result(spoke)

    def _hand_over_early_bytes(self) -> None:
        early, self.early = self.early, None
        if not early or self.transport is None or self.transport.is_closing():
            return
        tls_layer = self.transport.get_protocol()
        if tls_layer is self:
            return
        view = memoryview(early)
        while view:
            buffer = tls_layer.get_buffer(len(view))  # type: ignore[attr-defined]
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            tls_layer.buffer_updated(size)  # type: ignore[attr-defined]
            view = view[size:]

    async def _handshake(self, transport: asyncio.BaseTransport) -> None:
        loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        started = loop.time()
        assert self.spoke is not None
        try:
            spoke = await asyncio.wait_for(self.spoke, self.handshake_timeout)
        except asyncio.CancelledError:
            transport.abort()  # type: ignore[attr-defined]
            raise
        except asyncio.TimeoutError:
            _stats.tls_error += 1
            transport.abort()  # type: ignore[attr-defined]
            log.info("TLS handshake with %s failed: timed out (nothing received)", _format_peer(peer))
            return
        if not spoke or self.lost:  # connected and closed without a byte: a health check
            transport.abort()  # type: ignore[attr-defined]
            log.debug("TLS port: %s closed without sending anything", _format_peer(peer))
            return
        # start_tls sets the TLS layer on the transport at once and schedules its start and
        # the resumed reading; this callback, scheduled before them, feeds it the early
        # bytes first.
        loop.call_soon(self._hand_over_early_bytes)
        try:
            tls_transport = await loop.start_tls(
                transport,  # type: ignore[arg-type]
                self,
                self.context,
                server_side=True,
                ssl_handshake_timeout=max(self.handshake_timeout - (loop.time() - started), 0.1),
            )
        except asyncio.CancelledError:
            transport.abort()  # type: ignore[attr-defined]
            raise
        except Exception as exc:  # SSLError, timeout, reset: the client's fault, not ours
            self.late = None
            _stats.tls_error += 1
            transport.abort()  # type: ignore[attr-defined]
            log.info("TLS handshake with %s failed: %s", _format_peer(peer), _describe(exc))
            return
        if tls_transport is None or tls_transport.is_closing():
            self.late = None
            _stats.tls_error += 1
            log.info("TLS handshake with %s failed: the connection closed", _format_peer(peer))
            return
        connection = self.make_connection()
        tls_transport.set_protocol(connection)
        connection.connection_made(tls_transport)
        late, self.late = self.late, None
        if late:  # what came with the client's Finished, ahead of anything read from now on
            connection.data_received(bytes(late))


def pending_handshakes() -> int:
    """How many handshakes are under way in this process."""
    return len(_handshakes)


def abort_handshakes() -> None:
    """Cancel every handshake under way (a stopping worker)."""
    for task in list(_handshakes):
        task.cancel()


def _format_peer(peer: Any) -> str:
    if isinstance(peer, tuple):
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(peer or "a Unix socket client")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    if isinstance(exc, _ssl.SSLError):
        return exc.reason or str(exc)
    return str(exc) or type(exc).__name__


__all__ = ["TlsAcceptor", "abort_handshakes", "client_context", "pending_handshakes", "server_context"]
