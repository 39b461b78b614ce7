"""A tiny raw WebSocket client for byte-exact tests (bad input the libraries refuse to send)."""

from __future__ import annotations

import base64
import os
import socket

from conftest import connect


def handshake(port: int, path: str = "/", extra: str = "", rcvbuf: int | None = None) -> socket.socket:
    """Open a raw socket and complete the opening handshake; returns the socket."""
    sock = connect(port, rcvbuf=rcvbuf)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, "closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, mask: bool = True, length: int | None = None) -> bytes:
    """A client frame (masked unless told otherwise); ``length`` overrides the declared size."""
    size = len(payload) if length is None else length
    first = (0x80 if fin else 0) | rsv | opcode
    bit = 0x80 if mask else 0
    if size < 126:
        header = bytes((first, bit | size))
    elif size < 65536:
        header = bytes((first, bit | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((first, bit | 127)) + size.to_bytes(8, "big")
    if not mask:
        return header + payload
    key = os.urandom(4)
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("connection closed")
        data += chunk
    return data


def read_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    """One server frame: ``(first byte, opcode, payload)``."""
    first, second = recv_exact(sock, 2)
    assert not second & 0x80, "server frames must not be masked"
    size = second & 0x7F
    if size == 126:
        size = int.from_bytes(recv_exact(sock, 2), "big")
    elif size == 127:
        size = int.from_bytes(recv_exact(sock, 8), "big")
    return first, first & 0x0F, recv_exact(sock, size)


def read_close(sock: socket.socket) -> tuple[int, str]:
    """Read frames until a close frame; return its code and reason."""
    while True:
        _, opcode, payload = read_frame(sock)
        if opcode == 8:
            return int.from_bytes(payload[:2], "big"), payload[2:].decode(errors="replace")
