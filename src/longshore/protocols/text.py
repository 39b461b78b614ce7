"""``text://``: newline-delimited UTF-8 lines.

Each line (without its ``\\n`` and an optional ``\\r`` before it) is one package,
delivered as ``str``. ``send("hi")`` writes ``b"hi\\n"``. A line longer than
``max_package_size``, or bytes that are not UTF-8, close the connection.
"""

from __future__ import annotations

from typing import Any

from ..errors import PackageTooLarge, ProtocolError
from .base import Protocol


class TextProtocol(Protocol):
    """Newline-delimited text; see the module docstring."""

    __slots__ = ("_partial",)
    scheme = "text"

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self._partial: bytes | bytearray = b""

    def buffered(self) -> int:
        return len(self._partial)

    def feed(self, data: bytes) -> list[Any]:
        partial = self._partial
        if partial:
            if b"\n" not in data:  # a long line still arriving: grow it in place
                partial += data
                if len(partial) > self.connection.max_package_size:
                    raise PackageTooLarge("line longer than max_package_size")
                return []
            data = bytes(partial) + data
        if data[-1:] == b"\n":  # the usual case: the chunk ends at a line end
            self._partial = b""
        else:
            end = data.rfind(b"\n")
            if end < 0:
                if len(data) > self.connection.max_package_size:
                    raise PackageTooLarge("line longer than max_package_size")
                self._partial = bytearray(data)
                return []
            self._partial = bytearray(data[end + 1 :])
            data = data[: end + 1]
        limit = self.connection.max_package_size
        if len(data) > limit or len(self._partial) > limit:
            if len(self._partial) > limit or any(len(line) > limit for line in data.split(b"\n")):
                raise PackageTooLarge("line longer than max_package_size")
        try:
            text = data.decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"text line is not UTF-8: {exc.reason}") from None
        lines = text.split("\n")
        lines.pop()
        if "\r" in text:
            return [line[:-1] if line.endswith("\r") else line for line in lines]
        return lines

    def encode(self, message: Any) -> bytes:
        if isinstance(message, str):
            return (message + "\n").encode()
        if isinstance(message, (bytes, bytearray, memoryview)):
            return bytes(message) + b"\n"
        return (str(message) + "\n").encode()  # a number, say: its text, as print() shows it
