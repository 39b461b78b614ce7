"""The protocol interface: how a byte stream becomes packages, and messages become bytes.

A protocol is sans-I/O: it never reads or writes a socket. The connection hands it the
bytes that arrived (``feed``) and gets back the complete packages, each of which becomes
one ``on_message(conn, package)`` call; ``conn.send(message)`` passes the message through
``encode`` before writing it.

One protocol object exists per connection, so a protocol may keep parsing state (a
partial line, a half-read header) in its own attributes. ``feed`` is the bulk form of the
classic ``input``/``decode`` pair: one call handles every package in a chunk, which keeps
the per-package cost on the hot path low. Protocols that think in terms of "how long is
the next package?" can subclass :class:`PackageProtocol` and implement ``input`` and
``decode`` instead.

Errors: ``feed`` raises :class:`~longshore.errors.PackageTooLarge` when a package would
exceed ``connection.max_package_size`` and :class:`~longshore.errors.ProtocolError` for
bytes it cannot make sense of. Either closes that connection only, calls
``on_error(conn, code, message)`` and is counted; the worker goes on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import PackageTooLarge, ProtocolError

if TYPE_CHECKING:
    from ..connection.tcp import TcpConnection


class Protocol:
    """Base class of every protocol: one instance per connection.

    Subclasses implement :meth:`feed` and :meth:`encode`. ``scheme`` is the name used
    in listen URLs (``text://0.0.0.0:2345``).
    """

    __slots__ = ("connection",)

    scheme: ClassVar[str] = ""
    #: False for protocols whose ``feed`` hands on bytes as they arrive (no framing):
    #: their packages are bounded by the socket read size, not by ``max_package_size``.
    framed: ClassVar[bool] = True

    def __init__(self, connection: TcpConnection) -> None:
        self.connection = connection

    def feed(self, data: bytes) -> list[Any]:
        """Take the bytes that just arrived; return the packages they complete (maybe none)."""
        raise NotImplementedError

    def encode(self, message: Any) -> bytes:
        """Turn what the application passes to ``send()`` into bytes for the wire."""
        raise NotImplementedError

    def buffered(self) -> int:
        """How many received bytes wait for the rest of their package."""
        return 0

    def connection_made(self) -> bool:
        """The connection is up: called before what waited is written and before ``on_connect``.

        Return False to hold ``on_connect`` back: the protocol then calls it itself once
        it is ready (a WebSocket client, when the server has accepted its handshake).
        """
        return True

    def graceful_close(self) -> None:
        """The worker is stopping gracefully: end the connection once that loses nothing.

        Request/response protocols close an idle connection at once and a busy one
        after its current answer. The default does nothing: the connection ends when
        the peer closes it (or when ``stop_timeout`` runs out).
        """

    def message_failed(self, message: Any) -> None:
        """``on_message`` raised on ``message`` (or the coroutine it returned did).

        The exception has been logged and counted. A request/response protocol answers
        the request here if it was left unanswered (HTTP: a 500, then it closes), so that
        later answers are not taken for this one's. The default does nothing.
        """

    def send_dropped(self) -> None:
        """A send was dropped because the send buffer was full (after ``send_fail`` was
        counted and ``on_error`` called). A protocol that cannot lose a message without
        its peer misreading what follows closes the connection here (HTTP does). The
        default does nothing.
        """

    def going_away(self) -> None:
        """The worker stops now (``stop``, ``reload``, or a graceful stop whose time is up).

        The connection is closed right after this call, its send buffer written out
        first. A protocol that can tell its peer why does it here (a WebSocket sends a
        close frame with 1001, going away); the default does nothing.
        """


class RawProtocol(Protocol):
    """``tcp://``: bytes are delivered as they arrive, with no framing."""

    __slots__ = ()
    scheme = "tcp"
    framed = False

    def feed(self, data: bytes) -> list[Any]:
        return [data]

    def encode(self, message: Any) -> bytes:
        if isinstance(message, str):
            return message.encode()
        return message


class PackageProtocol(Protocol):
    """A protocol described by the length of its next package.

    Implement :meth:`input` (how long is the package at the start of ``buffer``? 0 when
    that is not known yet) and optionally :meth:`decode` and :meth:`encode`. The base
    class keeps the partial package between reads and enforces ``max_package_size``.
    """

    __slots__ = ("_buffer",)

    def __init__(self, connection: TcpConnection) -> None:
        super().__init__(connection)
        self._buffer = bytearray()

    def input(self, buffer: bytes | bytearray) -> int:
        """Return the length of the first package in ``buffer``, or 0 if unknown yet."""
        raise NotImplementedError

    def decode(self, package: bytes) -> Any:
        """Turn one complete package into the message given to ``on_message``."""
        return package

    def encode(self, message: Any) -> bytes:
        if isinstance(message, str):
            return message.encode()
        return message

    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Any]:
        buffer = self._buffer
        buffer += data
        limit = self.connection.max_package_size
        packages: list[Any] = []
        while buffer:
            length = self.input(buffer)
            if length < 0:
                raise ProtocolError("malformed package")
            if length == 0:
                if len(buffer) > limit:
                    raise PackageTooLarge(f"package larger than {limit} bytes")
                break
            if length > limit:
                raise PackageTooLarge(f"package of {length} bytes is larger than {limit}")
            if len(buffer) < length:
                break
            package = bytes(buffer[:length])
            del buffer[:length]
            packages.append(self.decode(package))
        return packages
