"""``frame://``: length-prefixed binary packages.

Every package starts with a 4-byte big-endian unsigned length that counts the header
itself, then ``length - 4`` bytes of payload. Payloads are delivered as ``bytes``;
``send(b"abc")`` writes ``b"\\x00\\x00\\x00\\x07abc"``. A length below 4 is a protocol
error; a length above ``max_package_size`` closes the connection before any of the
payload is buffered.
"""

from __future__ import annotations

from typing import Any

from ..errors import PackageTooLarge, ProtocolError
from .base import Protocol

HEADER_SIZE = 4


class FrameProtocol(Protocol):
    """4-byte length-prefixed frames; see the module docstring."""

    __slots__ = ("_buffer",)
    scheme = "frame"

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self._buffer: bytearray | None = None

    def buffered(self) -> int:
        return len(self._buffer) if self._buffer else 0

    def feed(self, data: bytes) -> list[Any]:
        buffer = self._buffer
        if buffer:
            buffer += data
            view: bytes | bytearray = buffer
        else:
            view = data
        size = len(view)
        limit = self.connection.max_package_size
        packages: list[Any] = []
        position = 0
        while size - position >= HEADER_SIZE:
            length = int.from_bytes(view[position : position + HEADER_SIZE], "big")
            if length < HEADER_SIZE:
                raise ProtocolError(f"frame length {length} is below the header size")
            if length > limit:
                raise PackageTooLarge(f"frame of {length} bytes is larger than max_package_size {limit}")
            if size - position < length:
                break
            packages.append(bytes(view[position + HEADER_SIZE : position + length]))
            position += length
        if buffer:
            del buffer[:position]
        elif position < size:
            self._buffer = bytearray(view[position:])
        return packages

    def encode(self, message: Any) -> bytes:
        if isinstance(message, str):
            message = message.encode()
        elif not isinstance(message, (bytes, bytearray, memoryview)):
            message = str(message).encode()  # a number, say: its text, as print() shows it
        return (len(message) + HEADER_SIZE).to_bytes(HEADER_SIZE, "big") + message
