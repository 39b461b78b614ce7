"""Error codes passed to ``on_error(conn, code, message)`` and the exceptions protocols raise."""

from __future__ import annotations

#: An outgoing connection could not be established (``AsyncTcpConnection``).
CONNECT_FAIL = 1
#: Data was not delivered: the send buffer was full, the connection was closed, or the
#: peer went away while data was being written.
SEND_FAIL = 2
#: The peer sent bytes its protocol cannot accept; the connection is closed.
PROTOCOL_ERROR = 3
#: A package was larger than ``max_package_size``; the connection is closed.
PACKAGE_TOO_LARGE = 4


class LongshoreError(Exception):
    """Base class of every error longshore raises on purpose."""


class ProtocolError(LongshoreError):
    """The peer sent bytes the protocol cannot accept; its connection is closed.

    ``response`` (bytes) is written to the peer before the connection closes, for
    protocols that answer bad input (an HTTP 400, a WebSocket close frame).
    """

    code = PROTOCOL_ERROR

    def __init__(self, message: str, response: bytes | None = None) -> None:
        super().__init__(message)
        self.response = response


class PackageTooLarge(ProtocolError):
    """A package is larger than the connection's ``max_package_size``."""

    code = PACKAGE_TOO_LARGE
