"""AsyncTcpConnection: an outgoing connection with the same callbacks as accepted ones.

::

    conn = AsyncTcpConnection("text://127.0.0.1:2345")
    conn.on_connect = lambda c: c.send("hello")
    conn.on_message = lambda c, line: print(line)
    conn.on_close = lambda c: c.reconnect(1)
    conn.connect()

Data sent before the connection is established waits (up to
``max_send_buffer_size``) and goes out once it is. A failed attempt calls
``on_error(conn, CONNECT_FAIL, message)``; ``reconnect(after)`` tries again later.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..errors import CONNECT_FAIL, SEND_FAIL
from ..listen import parse_listen
from ..protocols import get_protocol
from ..protocols.base import Protocol
from ..stats import process_stats as _stats
from .tcp import CLOSED, CONNECTING, ESTABLISHED, Handlers, TcpConnection


class AsyncTcpConnection(TcpConnection):
    """An outgoing stream connection to ``remote_url`` (``scheme://host:port``)."""

    __slots__ = ("remote_url", "_target", "_protocol_class", "ssl", "connect_timeout", "_pending", "_pending_size", "_reconnect_handle")

    def __init__(
        self,
        remote_url: str,
        *,
        protocol: type[Protocol] | str | None = None,
        ssl: Any = None,
        connect_timeout: float = 10.0,
    ) -> None:
        from ..worker import Worker

        address = parse_listen(remote_url)
        if isinstance(protocol, str):
            protocol = get_protocol(protocol)
        protocol_class = protocol or get_protocol(address.scheme)
        super().__init__(Worker.current, protocol_class, Handlers())
        self._own_handlers = True
        self.remote_url = remote_url
        self._target = address
        self._protocol_class = protocol_class
        self.ssl = ssl
        self.connect_timeout = connect_timeout
        self._pending: list[bytes | bytearray] = []
        self._pending_size = 0
        self._reconnect_handle: asyncio.TimerHandle | None = None

    def connect(self) -> None:
        """Start connecting (returns at once; ``on_connect`` or ``on_error`` follows)."""
        loop = asyncio.get_running_loop()
        self._state = CONNECTING
        self._reconnect_handle = None
        loop.create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        target = self._target
        self.protocol = self._protocol_class(self)
        try:
            if target.transport == "unix":
                coroutine = loop.create_unix_connection(lambda: self, target.path, ssl=self.ssl)
            else:
                coroutine = loop.create_connection(lambda: self, target.host, target.port, ssl=self.ssl)
            await asyncio.wait_for(coroutine, self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            if self._state is ESTABLISHED:
                return
            self._state = CLOSED
            _stats.connect_fail += 1
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else (exc.strerror or str(exc))
            self._emit_error(CONNECT_FAIL, f"connect to {self.remote_url} failed: {reason}")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        was_full, self._buffer_full = self._buffer_full, False
        super().connection_made(transport)
        pending, self._pending, self._pending_size = self._pending, [], 0
        if pending:
            transport.write(b"".join(pending))  # type: ignore[attr-defined]
        if was_full and not self._buffer_full:
            self.resume_writing()  # what waited is on its way: let a paused source go on

    def _write_ignoring_limit(self, data: bytes | bytearray) -> None:
        if self._state is not CONNECTING:
            super()._write_ignoring_limit(data)
            return
        # A pipe into a connection still being made: keep the data, and pause the
        # source once a buffer's worth waits.
        self._pending.append(data)
        self._pending_size += len(data)
        self.bytes_written += len(data)
        if self._pending_size >= self.max_send_buffer_size and not self._buffer_full:
            self.pause_writing()

    def _send_when_not_established(self, data: Any, raw: bool) -> bool | None:
        if self._state is CONNECTING:
            if not raw:
                data = self._encode(data)
            elif isinstance(data, str):
                data = data.encode()
            if self._pending_size >= self.max_send_buffer_size:
                self._drop()
                return False
            self._pending.append(data)
            self._pending_size += len(data)
            self.bytes_written += len(data)
            return None
        _stats.send_fail += 1
        return False

    @property
    def send_buffer_size(self) -> int:
        if self._state is CONNECTING:
            return self._pending_size
        return super().send_buffer_size

    def reconnect(self, after: float = 0) -> None:
        """Connect again ``after`` seconds from now (closing the current connection first)."""
        self.cancel_reconnect()
        if self._state is ESTABLISHED:
            self.destroy()
        loop = asyncio.get_running_loop()
        self._reconnect_handle = loop.call_later(max(after, 0), self.connect)

    def cancel_reconnect(self) -> None:
        """Forget a reconnect scheduled by :meth:`reconnect`."""
        if self._reconnect_handle is not None:
            self._reconnect_handle.cancel()
            self._reconnect_handle = None


__all__ = ["AsyncTcpConnection", "CONNECT_FAIL", "SEND_FAIL"]
