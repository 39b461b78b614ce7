"""AsyncTcpConnection: an outgoing connection with the same callbacks as accepted ones.

::

    conn = AsyncTcpConnection("text://127.0.0.1:2345")
    conn.on_connect = lambda c: c.send("hello")
    conn.on_message = lambda c, line: print(line)
    conn.on_close = lambda c: c.reconnect()       # again, after a growing delay
    conn.connect()

Any protocol scheme works, over TLS too (``ssl=True``, a context or a dict: see
:func:`longshore.connection.tls.client_context`; ``wss://`` is ``ws://`` with TLS).
Data sent before the connection is established waits (up to ``max_send_buffer_size``)
and goes out once it is. A failed attempt (refused, unreachable, timed out, a TLS
handshake or certificate that fails) counts ``connect_fail`` and calls
``on_error(conn, CONNECT_FAIL, message)``, then ``on_close(conn)``, so one
``on_close`` that calls :meth:`~AsyncTcpConnection.reconnect` keeps a client trying
whether the server went away or was never there. An established outgoing connection
counts in its process's ``connections`` like an accepted one.

``close()`` (or ``destroy()``) while connecting gives the attempt up: its socket is
closed, what ``send()`` queued is dropped (the application's own choice, as with
``destroy()``: not a ``send_fail``) and ``on_close`` follows, so every ``connect()`` ends
with one ``on_close``. A later ``connect()`` or ``reconnect()`` starts a new attempt.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from ..errors import CONNECT_FAIL, SEND_FAIL
from ..listen import parse_listen
from ..protocols import get_protocol
from ..protocols.base import Protocol
from ..stats import process_stats as _stats
from .tcp import CLOSED, CLOSING, CONNECTING, ESTABLISHED, Handlers, TcpConnection
from .tls import client_context

#: Client schemes that mean a protocol over TLS.
_TLS_SCHEMES = {"wss": "ws"}


class AsyncTcpConnection(TcpConnection):
    """An outgoing stream connection to ``remote_url`` (``scheme://host:port``, ``unix:///path``).

    ``ssl``: None (plain), True (verify against the system's CAs), an
    :class:`ssl.SSLContext` or a dict (``cafile``, ``verify``, ``certfile`` ...);
    ``server_hostname`` overrides the name checked in the certificate (default: the
    host of the URL); ``transport="ssl"`` is ``ssl=True``.
    """

    __slots__ = (
        "_connect_task",
        "_dialing",
        "_was_full",
        "remote_url",
        "_target",
        "_protocol_class",
        "ssl",
        "server_hostname",
        "ssl_handshake_timeout",
        "connect_timeout",
        "reconnect_attempts",
        "_ssl_context",
        "_pending",
        "_pending_size",
        "_reconnect_handle",
        "_reconnect_after_close",
    )

    #: ``reconnect()`` without a delay waits ``reconnect_min_delay * 2 ** attempts``
    #: seconds (attempts since the last established connection: for ``ws://``, since the
    #: last handshake the server accepted), at most
    #: ``reconnect_max_delay``, give or take 10 % so that many clients do not come back at once.
    reconnect_min_delay = 0.5
    reconnect_max_delay = 30.0

    def __init__(
        self,
        remote_url: str,
        *,
        protocol: type[Protocol] | str | None = None,
        ssl: Any = None,
        server_hostname: str | None = None,
        ssl_handshake_timeout: float = 10.0,
        transport: str | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        from ..worker import Worker

        address = parse_listen(remote_url)
        scheme = address.scheme
        if scheme in _TLS_SCHEMES:
            scheme = _TLS_SCHEMES[scheme]
            ssl = True if ssl is None else ssl
        if transport in ("ssl", "tls"):
            ssl = True if ssl is None else ssl
        elif transport not in (None, "tcp"):
            raise ValueError(f"transport={transport!r}: use 'ssl' for TLS (AsyncUdpConnection for udp://)")
        if address.transport == "udp":
            raise ValueError("udp:// is for AsyncUdpConnection")
        if isinstance(protocol, str):
            protocol = get_protocol(protocol)
        protocol_class = protocol or get_protocol(scheme)
        super().__init__(Worker.current, protocol_class, Handlers())
        self._own_handlers = True
        self.remote_url = remote_url
        self._target = address
        self._protocol_class = protocol_class
        self.ssl = ssl
        self._ssl_context = client_context(ssl)
        self.server_hostname = server_hostname
        self.ssl_handshake_timeout = ssl_handshake_timeout
        self.connect_timeout = connect_timeout
        #: Failed attempts since the last established connection (``reconnect()`` backoff).
        self.reconnect_attempts = 0
        self._pending: list[bytes | bytearray] = []
        self._pending_size = 0
        self._reconnect_handle: asyncio.TimerHandle | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._dialing = False  # the current attempt's socket is being made (connection_made may come)
        self._was_full = False
        self._reconnect_after_close: float | None = None

    def connect(self) -> None:
        """Start connecting (returns at once; ``on_connect`` or ``on_error`` follows)."""
        if self._state is ESTABLISHED or self._state is CLOSING:
            return
        previous = self._connect_task
        if self._state is CONNECTING and previous is not None and not previous.done():
            return  # an attempt is under way
        loop = asyncio.get_running_loop()
        if self._state is CLOSED:
            self._forget_last_connection()
        self._state = CONNECTING
        self.cancel_reconnect()  # connecting now: a reconnect planned earlier would start a second attempt later
        self._connect_task = loop.create_task(self._connect(previous))

    def _forget_last_connection(self) -> None:
        """A new connection starts as a new accepted one would: both ways open, reading,
        nothing unsent, no failed write, its own byte counts. A send buffer that was full
        when the last one closed is reported drained once the new one is up."""
        self._got_eof = self._read_shut = self._write_shut = False
        self._write_failed = False
        self._unsent_hint = 0
        self._cork, self._cork_size, self._cork_base = None, 0, 0
        self._was_full, self._buffer_full = self._was_full or self._buffer_full, False
        self._recv_paused = False
        self._held = self._held_messages = None
        if self._unsent_check is not None:
            self._unsent_check.cancel()
            self._unsent_check = None
        self.transport = None
        self.bytes_read = 0
        self.bytes_written = self._pending_size  # what waits from before goes out on the new one

    async def _connect(self, previous: asyncio.Task[None] | None) -> None:
        if previous is not None and not previous.done():
            # An attempt given up by close() (or one ending in its own on_close): let it
            # close its socket first, so that it never reaches connection_made.
            await asyncio.wait([previous])
        loop = asyncio.get_running_loop()
        target = self._target
        self.protocol = self._protocol_class(self)
        tls: dict[str, Any] = {}
        if self._ssl_context is not None:
            tls = {"ssl": self._ssl_context, "ssl_handshake_timeout": self.ssl_handshake_timeout}
            if target.transport == "unix" or self.server_hostname is not None:
                tls["server_hostname"] = self.server_hostname or "localhost"
        self._dialing = True
        try:
            if target.transport == "unix":
                coroutine = loop.create_unix_connection(lambda: self, target.path, **tls)
            else:
                coroutine = loop.create_connection(lambda: self, target.host, target.port, **tls)
            await asyncio.wait_for(coroutine, self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            if self._state is ESTABLISHED or self._connect_task is not asyncio.current_task():
                return
            self._connect_failed("timed out" if isinstance(exc, asyncio.TimeoutError) else (exc.strerror or str(exc)))
        finally:
            if self._connect_task is asyncio.current_task():
                self._dialing = False

    def _connect_failed(self, reason: str) -> None:
        if self._state is CLOSED:  # closed by the application while connecting
            return
        self._state = CLOSED
        self._dialing = False
        self.reconnect_attempts += 1
        _stats.connect_fail += 1
        self._emit_error(CONNECT_FAIL, f"connect to {self.remote_url} failed: {reason}")
        handler = self._handlers.on_close
        if handler is not None:
            self._call(handler, "on_close", self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        if self._state is not CONNECTING or not self._dialing:  # an attempt given up by close()
            transport.close()
            return
        self._was_full, self._buffer_full = self._was_full or self._buffer_full, False
        if not getattr(self._protocol, "connects_after_handshake", False):
            # Established. A protocol with a handshake of its own (ws://) says so once the
            # server has accepted it: until then the attempt may still fail.
            self.reconnect_attempts = 0
        super().connection_made(transport)

    def _established(self) -> None:
        # What was sent while connecting goes first, before anything on_connect sends.
        pending, self._pending, self._pending_size = self._pending, [], 0
        if pending:
            self.transport.write(b"".join(pending))  # type: ignore[union-attr]
        if self._write_shut:  # a pipe's source finished while connecting: end the stream after it
            self.transport.write_eof()  # type: ignore[union-attr]
        was_full, self._was_full = self._was_full, False
        if was_full and not self._buffer_full:
            self.resume_writing()  # what waited is on its way: let a paused source go on

    def _can_write_eof(self) -> bool:
        if self._state is CONNECTING:
            return self._ssl_context is None
        return super()._can_write_eof()

    def _write_ignoring_limit(self, data: bytes | bytearray) -> None:
        if self._state is not CONNECTING or self._write_shut:
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
        if self._state is CONNECTING and not self._write_shut:
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

    def reconnect(self, after: float | None = None) -> None:
        """Connect again ``after`` seconds from now, or after the backoff delay when
        ``after`` is None (see ``reconnect_min_delay``). An open connection is cut first
        (its ``on_close`` runs); the delay counts from then."""
        self.cancel_reconnect()
        if after is None:
            delay = min(self.reconnect_min_delay * 2 ** min(self.reconnect_attempts, 30), self.reconnect_max_delay)
            after = delay * random.uniform(0.9, 1.1)
        if self._state is ESTABLISHED or (self._state is CLOSING and self.transport is not None):
            self._reconnect_after_close = max(after, 0)
            self.destroy()
            return
        loop = asyncio.get_running_loop()
        self._reconnect_handle = loop.call_later(max(after, 0), self._reconnect_now)

    def _reconnect_now(self) -> None:
        self._reconnect_handle = None
        self.connect()

    def _after_close(self) -> None:
        after, self._reconnect_after_close = self._reconnect_after_close, None
        if after is not None and self._reconnect_handle is None:
            self._reconnect_handle = asyncio.get_running_loop().call_later(after, self._reconnect_now)

    def cancel_reconnect(self) -> None:
        """Forget a reconnect scheduled by :meth:`reconnect`."""
        self._reconnect_after_close = None
        if self._reconnect_handle is not None:
            self._reconnect_handle.cancel()
            self._reconnect_handle = None

    def close(self, data: Any = None, raw: bool = False) -> None:
        """As for accepted connections; also forgets a planned reconnect. While connecting,
        gives the attempt up: its socket is closed, nothing is sent (not even ``data``) and
        ``on_close`` follows."""
        self.cancel_reconnect()
        if self._state is CONNECTING:
            self._give_up()
            return
        super().close(data, raw)

    def destroy(self) -> None:
        """As for accepted connections; while connecting (a ``ws://`` handshake too), the
        attempt is given up as by :meth:`close`: ``on_close`` follows, no ``on_error``."""
        if self._state is CONNECTING:
            self.cancel_reconnect()
            self._give_up()
            return
        if self._state is ESTABLISHED:
            given_up = getattr(self._protocol, "given_up", None)  # a handshake under way ends here
            if given_up is not None:
                given_up()
        super().destroy()

    def _give_up(self) -> None:
        """Stop the attempt under way: close its socket (cancelling the task that makes
        it), drop what waits to be sent, and call ``on_close`` when ``connect()`` had
        started an attempt."""
        task = self._connect_task
        attempting = task is not None and not task.done()
        self._state = CLOSED
        self._dialing = False
        self.bytes_written -= self._pending_size
        self._pending, self._pending_size = [], 0
        if task is not None and attempting:
            task.cancel()
            handler = self._handlers.on_close
            if handler is not None:
                self._call(handler, "on_close", self)


__all__ = ["AsyncTcpConnection", "CONNECT_FAIL", "SEND_FAIL"]
