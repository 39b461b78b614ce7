"""TcpConnection: one accepted stream connection, as an ``asyncio.Protocol``.

The hot path is ``data_received``: the protocol splits the bytes into packages, each
package is one ``on_message`` call, and what the callbacks send while they run is
collected and written with one ``transport.write`` when they return (so sixteen
pipelined requests cost one system call, not sixteen).

The send buffer is the transport's write buffer. Its high-water mark is set to
``max_send_buffer_size``, so asyncio's own flow control (``pause_writing`` /
``resume_writing``) becomes ``on_buffer_full`` / ``on_buffer_drain``.

Callbacks may be plain functions or coroutine functions. A connection runs its
callbacks one after the other: when one returns an awaitable, the connection keeps
later callbacks (the next ``on_message``, ``on_close``) in a queue and runs them, in
order, after it finishes. Messages of one connection are therefore always handled in
the order they arrived, and ``on_close`` comes after the last ``on_message``. While
that queue is long the connection stops reading, so a slow coroutine throttles its
own client and nobody else.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from typing import TYPE_CHECKING, Any, Callable

from .. import tasks
from ..errors import PACKAGE_TOO_LARGE, SEND_FAIL, ProtocolError
from ..stats import process_stats as _stats
from .address import RemoteAddress, format_address

if TYPE_CHECKING:
    from ..protocols.base import Protocol
    from ..worker import Worker

log = logging.getLogger("longshore")

CONNECTING = 0
ESTABLISHED = 1
CLOSING = 2
CLOSED = 3
STATE_NAMES = {CONNECTING: "connecting", ESTABLISHED: "established", CLOSING: "closing", CLOSED: "closed"}

#: Sends collected during one ``data_received`` are written together up to this size.
CORK_LIMIT = 64 * 1024
#: Above this many queued callbacks (behind a running coroutine) a connection stops reading.
SERIAL_QUEUE_LIMIT = 64
#: While data waits in a send buffer below its limit, when (seconds) to look whether it
#: is out yet (so a peer that goes away after reading everything is not counted): first
#: after UNSENT_CHECK_INTERVAL, then twice as long each time, at most UNSENT_CHECK_MAX.
UNSENT_CHECK_INTERVAL = 0.05
UNSENT_CHECK_MAX = 1.0
#: Why reading is paused (the bits of ``TcpConnection._recv_paused``, 0 while reading):
#: the application's ``pause_recv()``, the protocol's own flow control. Each side's
#: resume lifts its own bit only; reading goes on once none is left.
PAUSED_BY_APP = 1
PAUSED_BY_PROTOCOL = 2

_connection_ids = itertools.count(1)

_PEER_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
#: ``_start_serial``'s awaitable came from a callback other than ``on_message``.
_NO_MESSAGE: Any = object()

#: Called with every accepted connection that closes, before its ``on_close`` (the
#: channel's gateway forgets the connection's uid and groups here).
close_listeners: list[Callable[[TcpConnection], None]] = []


def report_exception(what: str, connection: TcpConnection | None = None) -> None:
    """Log the exception being handled, with its traceback, and count it."""
    _stats.throw_exception += 1
    if connection is not None:
        log.exception("exception in %s (connection %s, %s)", what, connection.id, connection.remote_address)
    else:
        log.exception("exception in %s", what)


class Handlers:
    """The callbacks of a worker (shared by its connections) or of one connection."""

    __slots__ = ("on_connect", "on_message", "on_close", "on_error", "on_buffer_full", "on_buffer_drain")

    def __init__(self, source: Any = None) -> None:
        self.on_connect: Callable[..., Any] | None = getattr(source, "on_connect", None)
        self.on_message: Callable[..., Any] | None = getattr(source, "on_message", None)
        self.on_close: Callable[..., Any] | None = getattr(source, "on_close", None)
        self.on_error: Callable[..., Any] | None = getattr(source, "on_error", None)
        self.on_buffer_full: Callable[..., Any] | None = getattr(source, "on_buffer_full", None)
        self.on_buffer_drain: Callable[..., Any] | None = getattr(source, "on_buffer_drain", None)

    def copy(self) -> Handlers:
        """A private copy, for a connection that overrides one callback."""
        return Handlers(self)


def _handler_property(name: str) -> property:
    def get(self: TcpConnection) -> Callable[..., Any] | None:
        return getattr(self._handlers, name)  # type: ignore[no-any-return]

    def set(self: TcpConnection, fn: Callable[..., Any] | None) -> None:
        if not self._own_handlers:
            self._handlers = self._handlers.copy()
            self._own_handlers = True
        setattr(self._handlers, name, fn)

    return property(get, set, doc=f"This connection's ``{name}`` callback (defaults to its worker's).")


class TcpConnection(RemoteAddress, asyncio.Protocol):
    """A stream connection accepted by a worker.

    ``send(data)`` returns True when the socket took all of the data, None when some of
    it waits in the send buffer, and False when it was refused: the connection is
    closed, or the send buffer is full (the data is dropped, ``send_fail`` counts it
    and ``on_error(conn, SEND_FAIL, ...)`` is called).

    A send is accepted while the send buffer is below ``max_send_buffer_size``; the
    send that makes it reach the limit is still accepted whole (a package is never cut)
    and fires ``on_buffer_full``; from then on sends are dropped until the buffer has
    been written out below the limit. The buffer thus holds at most the limit plus one
    package. ``on_buffer_drain`` fires when a full buffer has been written out completely.
    """

    #: Send buffer limit of new connections, in bytes.
    default_max_send_buffer_size = 1024 * 1024
    #: Largest package a protocol accepts on new connections, in bytes.
    default_max_package_size = 10 * 1024 * 1024

    __slots__ = (
        "id",
        "worker",
        "transport",
        "_protocol",
        "max_package_size",
        "bytes_read",
        "bytes_written",
        "created_at",
        "_state",
        "_handlers",
        "_own_handlers",
        "_encode",
        "_max_send_buffer_size",
        "_cork",
        "_cork_size",
        "_cork_base",
        "_recv_paused",
        "_held",
        "_held_messages",
        "_serial",
        "_serial_paused",
        "_buffer_full",
        "_unsent_hint",
        "_remote",
        "_pipe_to",
        "_got_eof",
        "_read_shut",
        "_write_shut",
        "_write_failed",
        "_unsent_check",
        "_resumed",
        "__dict__",
    )

    def __init__(self, worker: Worker | None, protocol_class: type[Protocol], handlers: Handlers) -> None:
        self.id = 0
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        self._protocol = protocol = protocol_class(self)
        self._encode = protocol.encode
        self.max_package_size = self.default_max_package_size
        self.bytes_read = 0
        self.bytes_written = 0
        self.created_at = 0.0
        self._state = CONNECTING
        self._handlers = handlers
        self._own_handlers = False
        self._max_send_buffer_size = self.default_max_send_buffer_size
        self._cork: list[bytes] | None = None
        self._cork_size = 0
        self._cork_base = 0
        self._recv_paused = 0  # why reading is paused: PAUSED_BY_APP | PAUSED_BY_PROTOCOL bits
        self._held: list[bytes] | None = None
        self._held_messages: list[Any] | None = None  # decoded, not yet delivered (paused in a batch)
        self._serial: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] | None = None
        self._serial_paused = False
        self._buffer_full = False
        self._unsent_hint = 0
        self._remote: Any = None
        self._pipe_to: TcpConnection | None = None
        self._got_eof = False  # the peer has finished sending
        self._read_shut = False  # ... and all it sent was passed on (a two-way pipe)
        self._write_shut = False  # our end of the stream was sent (after the send buffer)
        self._write_failed = False  # a write failed: the peer went away (counted once)
        self._unsent_check: asyncio.TimerHandle | None = None
        self._resumed: asyncio.Future[None] | None = None  # awaited by queued messages while paused

    @property
    def protocol(self) -> Protocol:
        """This connection's protocol object (replace it to switch protocols, e.g. on an upgrade)."""
        return self._protocol

    @protocol.setter
    def protocol(self, protocol: Protocol) -> None:
        self._protocol = protocol
        self._encode = protocol.encode

    on_connect = _handler_property("on_connect")
    on_message = _handler_property("on_message")
    on_close = _handler_property("on_close")
    on_error = _handler_property("on_error")
    on_buffer_full = _handler_property("on_buffer_full")
    on_buffer_drain = _handler_property("on_buffer_drain")

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        self.transport = transport  # type: ignore[assignment]
        self._state = ESTABLISHED
        self._remote = transport.get_extra_info("peername")  # shown plain by RemoteAddress (an IPv4 client of [::] too)
        loop = asyncio.get_running_loop()
        self.created_at = loop.time()
        transport.set_write_buffer_limits(high=max(self._max_send_buffer_size - 1, 0), low=0)  # type: ignore[attr-defined]
        worker = self.worker
        self.id = next(_connection_ids)
        if worker is not None:
            worker.connections[self.id] = self
        _stats.connections += 1
        ready = self._protocol.connection_made()
        self._established()
        handler = self._handlers.on_connect
        if handler is not None and ready:
            self._call(handler, "on_connect", self)

    def _established(self) -> None:
        """Hook for subclasses: the connection is up, ``on_connect`` is next."""

    def data_received(self, data: bytes) -> None:
        self.bytes_read += len(data)
        if self._state is not ESTABLISHED:
            return
        if self._recv_paused:  # paused before the transport could stop reading
            self._hold(data)
            return
        try:
            messages = self._protocol.feed(data)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        count = len(messages)
        if not count:
            return
        _stats.total_request += count
        handler = self._handlers.on_message
        if handler is None:
            return
        if count == 1 and self._serial is None:
            try:
                result = handler(self, messages[0])
            except Exception:
                report_exception("on_message", self)
                self._protocol.message_failed(messages[0])
                return
            if result is not None and hasattr(result, "__await__"):
                self._start_serial(result, messages[0])
            return
        self._dispatch(handler, messages)

    def _dispatch(self, handler: Callable[..., Any], messages: list[Any]) -> None:
        """Call ``on_message`` for each of several messages, writing their answers at once."""
        if self._serial is not None:  # a coroutine of this connection is running
            for message in messages:
                self._queue_serial(handler, (self, message))
            return
        self._cork_base = self.transport.get_write_buffer_size()  # type: ignore[union-attr]
        cork: list[bytes] = []
        self._cork = cork
        try:
            for index, message in enumerate(messages):
                try:
                    result = handler(self, message)
                except Exception:
                    report_exception("on_message", self)
                    self._protocol.message_failed(message)
                    result = None
                if result is not None and hasattr(result, "__await__"):
                    self._start_serial(result, message)
                if self._serial is not None:  # a coroutine runs now: the rest waits behind it
                    for later in messages[index + 1 :]:
                        self._queue_serial(handler, (self, later))
                    break
                if self._state is not ESTABLISHED:
                    break
                if self._recv_paused:  # pause_recv(): the rest waits for resume_recv()
                    if index + 1 < len(messages):
                        self._held_messages = messages[index + 1 :]
                    break
        finally:
            self._cork = None
            if cork:
                self._write_cork(cork)

    def eof_received(self) -> bool | None:
        if self._got_eof:  # reading resumed after the peer had finished: nothing new
            return True
        self._got_eof = True
        if self._pipes_half_close():
            # Both ways piped (a proxy): pass the half-close on, keep the other way open.
            if self._serial is not None:
                self._queue_serial(TcpConnection._input_ended, (self,))
            else:
                self._input_ended()
            return True
        if self._serial is not None:
            # The peer has finished sending, but callbacks still run: answer them, then close.
            self._queue_serial(TcpConnection.close, (self,))
            return True
        return None  # close our side too, once the send buffer is written out

    def _pipes_half_close(self) -> bool:
        """True when this connection and the one it pipes into pipe into each other and
        both can end their stream while reading on (plain TCP or Unix sockets, not TLS)."""
        dest = self._pipe_to
        return dest is not None and dest._pipe_to is self and self._can_write_eof() and dest._can_write_eof()

    def _can_write_eof(self) -> bool:
        """True when this connection can end its stream and keep reading (not TLS)."""
        return self._state is ESTABLISHED and self.transport is not None and self.transport.can_write_eof()

    def _input_ended(self) -> None:
        """Everything the peer sent has been passed on: end the stream towards the pipe's
        destination (after its send buffer), and close once both ways have ended."""
        self._read_shut = True
        dest = self._pipe_to
        if dest is not None and not dest.closed:
            dest._shut_write()
        elif self._state is ESTABLISHED:  # nobody left to answer through this connection
            self.close()
            return
        if self._write_shut and self._state is ESTABLISHED:
            self.close()

    def _shut_write(self) -> None:
        """Send the end of the stream once the send buffer is written out; reading goes on.
        Sends are refused from now on. Closes the connection when its peer had ended too."""
        if self._write_shut:
            return
        self._write_shut = True
        if self._state is not ESTABLISHED:  # connecting: sent when established
            return
        self._flush_cork()
        self.transport.write_eof()  # type: ignore[union-attr]
        if self._read_shut:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state is CLOSED:
            return
        self._state = CLOSED
        self._release_queue()
        if self._unsent_check is not None:
            self._unsent_check.cancel()
            self._unsent_check = None
        worker = self.worker
        if worker is not None:
            worker.connections.pop(self.id, None)
            worker._closed_bytes_read += self.bytes_read
            worker._closed_bytes_written += self.bytes_written
        _stats.connections -= 1
        for listener in close_listeners:
            try:
                listener(self)
            except Exception:  # the close (and on_close) goes on
                report_exception("a close listener", self)
        hook = getattr(self.protocol, "connection_closed", None)
        if hook is not None:
            hook()
        if exc is not None and isinstance(exc, _PEER_GONE) and not self._write_failed and (self._buffer_full or self._unsent_hint or self._cork_size):
            _stats.send_fail += 1
            self._emit_error(SEND_FAIL, f"peer went away with data unsent: {exc}")
        handler = self._handlers.on_close
        if handler is not None:
            self._call(handler, "on_close", self)
        self._after_close()

    def _after_close(self) -> None:
        """Hook for subclasses (reconnecting clients)."""

    def pause_writing(self) -> None:
        self._buffer_full = True
        hook = getattr(self.protocol, "send_buffer_full", None)
        if hook is not None:
            hook()
        handler = self._handlers.on_buffer_full
        if handler is not None:
            self._call(handler, "on_buffer_full", self, at_once=True)

    def resume_writing(self) -> None:
        self._buffer_full = False
        self._unsent_hint = 0  # the low-water mark is 0: everything was written
        hook = getattr(self.protocol, "send_buffer_drained", None)
        if hook is not None:
            hook()
        handler = self._handlers.on_buffer_drain
        if handler is not None:
            self._call(handler, "on_buffer_drain", self, at_once=True)

    # -- sending -------------------------------------------------------------------------
    def send(self, data: Any, raw: bool = False) -> bool | None:
        """Encode ``data`` with the connection's protocol (unless ``raw``) and send it.

        Returns True (the socket took all of it), None (accepted; some of it waits in the send buffer) or False
        (refused: connection closed or its stream ended by a piped half-close, or send buffer full and the
        data dropped).
        """
        if self._state is not ESTABLISHED or self._write_shut:
            return self._send_when_not_established(data, raw)
        if not raw:
            data = self._encode(data)
        elif isinstance(data, str):
            data = data.encode()
        cork = self._cork
        if cork is not None:  # inside data_received: collect, write once when it returns
            base = self._cork_base
            size = self._cork_size + len(data)
            if size <= CORK_LIMIT and base + size < self._max_send_buffer_size:
                cork.append(data if type(data) is bytes else bytes(data))
                self._cork_size = size
                return None if base else True  # collected data counts as written
            # Large, or reaching the limit: what was collected goes out now, and this send
            # takes the normal way (which drops it, or fires on_buffer_full, by the real buffer).
            self._flush_cork()
        transport = self.transport
        waiting = transport.get_write_buffer_size()  # type: ignore[union-attr]
        if waiting >= self._max_send_buffer_size:
            self._drop()
            return False
        self.bytes_written += len(data)
        # What may still wait when the peer goes away: the transport clears its buffer
        # before connection_lost, so keep an estimate (refreshed by the stats publisher).
        transport.write(data)  # type: ignore[union-attr]
        # What still waits: kept because the transport empties its buffer before
        # connection_lost, where a peer that went away must be told apart.
        left = self._unsent_hint = transport.get_write_buffer_size()  # type: ignore[union-attr]
        if not left and transport.is_closing() and not self._got_eof:  # type: ignore[union-attr]
            self.bytes_written -= len(data)
            return self._write_failure()
        if left and self._unsent_check is None:
            self._watch_unsent()
        if cork is not None:
            self._cork_base = left
        return None if waiting or left else True

    def _watch_unsent(self, delay: float = UNSENT_CHECK_INTERVAL) -> None:
        """Some data waits for the socket: look again shortly, so that ``_unsent_hint``
        says 0 soon after it is written out (below the high-water mark no event says so),
        and a peer that then goes away is not taken for one that left data behind. A
        client that stays slow is looked at less and less often (at most once a second)."""
        self._unsent_check = asyncio.get_running_loop().call_later(delay, self._check_unsent, delay)

    def _check_unsent(self, delay: float) -> None:
        self._unsent_check = None
        transport = self.transport
        if self._state is CLOSED or transport is None:
            return
        if self._buffer_full:  # resume_writing will say when it is empty
            return
        if transport.is_closing() and self._state is ESTABLISHED:
            return  # the transport failed by itself: connection_lost must still see what waited
        if self._unsent_hint:
            self._unsent_hint = transport.get_write_buffer_size()
            if self._unsent_hint:
                self._watch_unsent(min(delay * 2, UNSENT_CHECK_MAX))

    def _write_failure(self) -> bool:
        """The transport failed a write and is closing: the peer went away (reset, broken
        pipe). Count it once, tell the application, refuse further sends."""
        if not self._write_failed:
            self._write_failed = True
            self._write_shut = True
            _stats.send_fail += 1
            self._emit_error(SEND_FAIL, "peer went away: write failed")
        return False

    def _send_when_not_established(self, data: Any, raw: bool) -> bool | None:
        _stats.send_fail += 1
        return False

    def _write_cork(self, cork: list[bytes]) -> None:
        size, self._cork_size = self._cork_size, 0
        if self._state is CLOSED or self.transport is None:
            return
        self.bytes_written += size
        transport = self.transport
        transport.write(cork[0] if len(cork) == 1 else b"".join(cork))
        left = self._unsent_hint = transport.get_write_buffer_size()
        if not left and transport.is_closing() and not self._got_eof and self._state is not CLOSED:
            self._write_failure()
        elif left and self._unsent_check is None:
            self._watch_unsent()

    def _flush_cork(self) -> None:
        cork = self._cork
        if cork:
            self._write_cork(cork)
            cork.clear()
            self._cork_base = self.transport.get_write_buffer_size() if self._state is not CLOSED else 0  # type: ignore[union-attr]

    def _write_ignoring_limit(self, data: bytes | bytearray) -> None:
        """Write without the buffer-size check (pipes: the source pauses instead)."""
        if self._state is not ESTABLISHED or self._write_shut:
            _stats.send_fail += 1
            return
        self._flush_cork()
        self.bytes_written += len(data)
        self.transport.write(data)  # type: ignore[union-attr]

    def _drop(self) -> None:
        _stats.send_fail += 1
        self._emit_error(SEND_FAIL, "send buffer full and drop package", at_once=True)  # also while a coroutine waits
        self._protocol.send_dropped()

    @property
    def send_buffer_size(self) -> int:
        """Bytes accepted by ``send()`` and not yet written to the socket."""
        if self.transport is None or self._state is CLOSED:
            return self._cork_size
        return self.transport.get_write_buffer_size() + self._cork_size

    @property
    def max_send_buffer_size(self) -> int:
        """This connection's send buffer limit in bytes (``default_max_send_buffer_size``)."""
        return self._max_send_buffer_size

    @max_send_buffer_size.setter
    def max_send_buffer_size(self, size: int) -> None:
        self._max_send_buffer_size = int(size)
        if self.transport is not None and self._state is ESTABLISHED:
            self.transport.set_write_buffer_limits(high=max(int(size) - 1, 0), low=0)

    # -- closing -------------------------------------------------------------------------
    def close(self, data: Any = None, raw: bool = False) -> None:
        """Send ``data`` (if given), write out the send buffer, then close."""
        if self._state is not ESTABLISHED:
            if self._state is CONNECTING:
                self._state = CLOSED
            return
        if data is not None:
            self.send(data, raw)
        self._state = CLOSING
        self._flush_cork()
        self.transport.close()  # type: ignore[union-attr]

    def destroy(self) -> None:
        """Close at once, discarding whatever waits in the send buffer."""
        if self._state is CLOSED:
            return
        self._state = CLOSING
        self._cork_size = 0
        if self._cork:
            self._cork.clear()
        if self.transport is not None:
            self.transport.abort()

    @property
    def state(self) -> str:
        """``connecting``, ``established``, ``closing`` or ``closed``."""
        return STATE_NAMES[self._state]

    @property
    def closed(self) -> bool:
        """True once the connection is closing or closed."""
        return self._state >= CLOSING

    # -- reading control -----------------------------------------------------------------
    def pause_recv(self) -> None:
        """Stop reading from the socket until :meth:`resume_recv`."""
        self._pause(PAUSED_BY_APP)

    def resume_recv(self) -> None:
        """Read from the socket again (once the protocol's own flow control, e.g. an HTTP
        connection's full send buffer, no longer holds reading paused as well)."""
        self._resume(PAUSED_BY_APP)

    def _hold_input(self) -> None:
        """For the protocol: read nothing and hand no message over until
        :meth:`_release_input`, whatever the application's ``pause_recv()`` and
        ``resume_recv()`` do meanwhile (and the other way round)."""
        self._pause(PAUSED_BY_PROTOCOL)

    def _release_input(self) -> None:
        """For the protocol: undo :meth:`_hold_input` (reading resumes unless the
        application has paused it too)."""
        self._resume(PAUSED_BY_PROTOCOL)

    def _pause(self, reason: int) -> None:
        self._recv_paused |= reason
        if self._state is ESTABLISHED and not self._serial_paused:
            self.transport.pause_reading()  # type: ignore[union-attr]

    def _resume(self, reason: int) -> None:
        paused = self._recv_paused = self._recv_paused & ~reason
        if paused:
            return  # the other side still holds reading paused
        self._release_queue()
        if self._held or self._held_messages:
            asyncio.get_running_loop().call_soon(self._deliver_held)
        elif self._state is ESTABLISHED and not self._serial_paused:
            self.transport.resume_reading()  # type: ignore[union-attr]

    def _hold(self, data: bytes) -> None:
        # A transport starts reading when connection_made returns, even if on_connect
        # paused it: keep what arrives and stop reading until resume_recv.
        if self._held is None:
            self._held = []
        self._held.append(data)
        self.bytes_read -= len(data)  # counted again when delivered
        self.transport.pause_reading()  # type: ignore[union-attr]

    def _deliver_held(self) -> None:
        messages, self._held_messages = self._held_messages, None
        if messages and self._state is ESTABLISHED:
            if self._recv_paused:  # paused again before this ran
                self._held_messages = messages
                return
            handler = self._handlers.on_message
            if handler is not None:
                self._dispatch(handler, messages)
            if self._recv_paused or self._state is not ESTABLISHED:
                return  # what else was held waits for the next resume_recv()
        held, self._held = self._held, None
        for data in held or ():
            if self._recv_paused:  # paused again while delivering: keep the rest
                self._held = (self._held or []) + [data]
                continue
            self.data_received(data)
        if not self._recv_paused and self._state is ESTABLISHED and not self._serial_paused:
            self.transport.resume_reading()  # type: ignore[union-attr]

    def pipe(self, dest: TcpConnection) -> TcpConnection:
        """Forward everything this connection receives to ``dest``, with backpressure.

        While ``dest``'s send buffer is full this connection stops reading; it reads
        again once ``dest`` has drained. This replaces this connection's ``on_message``
        and ``dest``'s ``on_buffer_full``/``on_buffer_drain``. Closing is left to the
        application (close ``dest`` in this connection's ``on_close`` if that is wanted).

        When the two connections pipe into each other (a proxy), a half-close is passed
        on: once one peer has finished sending, what it sent is written out to the other
        and that one's stream is ended (``shutdown(SHUT_WR)``); the other way goes on
        until its peer finishes too, then both connections close. TLS cannot half-close:
        a TLS connection on either side closes when its peer finishes, as when not piped.
        """
        source = self
        self._pipe_to = dest

        def forward(connection: TcpConnection, data: Any) -> None:
            dest._write_ignoring_limit(data if isinstance(data, (bytes, bytearray)) else dest.protocol.encode(data))

        def full(connection: TcpConnection) -> None:
            source.pause_recv()

        def drained(connection: TcpConnection) -> None:
            source.resume_recv()

        self.on_message = forward
        dest.on_buffer_full = full
        dest.on_buffer_drain = drained
        if dest._buffer_full:
            self.pause_recv()
        return dest

    # -- addresses -----------------------------------------------------------------------
    @property
    def local_address(self) -> str:
        """``ip:port`` this connection was accepted on."""
        return format_address(self.transport.get_extra_info("sockname") if self.transport is not None else None)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} id={self.id} {self.remote_address} {self.state}>"

    # -- callbacks -----------------------------------------------------------------------
    def _call(self, handler: Callable[..., Any], what: str, *args: Any, at_once: bool = False) -> None:
        """Run a callback now, or behind the coroutine this connection is running.

        ``at_once``: now in any case (flow control: an async producer must learn in time
        that it has to pause); a coroutine it returns then runs on its own."""
        if self._serial is not None and not at_once:
            self._queue_serial(handler, args)
            return
        try:
            result = handler(*args)
        except Exception:
            report_exception(what, self)
            return
        if result is not None and hasattr(result, "__await__"):
            if self._serial is None:
                self._start_serial(result)
            else:
                tasks.run_coroutine(result, f"{what} (connection {self.id}, {self.remote_address})")

    def _emit_error(self, code: int, message: str, at_once: bool = False) -> None:
        handler = self._handlers.on_error
        if handler is not None:
            self._call(handler, "on_error", self, code, message, at_once=at_once)

    def _protocol_error(self, exc: ProtocolError) -> None:
        if exc.code == PACKAGE_TOO_LARGE:
            _stats.package_too_large += 1
        else:
            _stats.protocol_error += 1
        log.info("connection %s from %s closed: %s", self.id, self.remote_address, exc)
        self._emit_error(exc.code, str(exc))
        if self._state is ESTABLISHED:
            if exc.response and not self._write_shut:
                self._flush_cork()  # answers collected before the error go first
                self.transport.write(exc.response)  # type: ignore[union-attr]
                self.bytes_written += len(exc.response)
            self.close()

    def _start_serial(self, awaitable: Any, message: Any = _NO_MESSAGE) -> None:
        """Run ``awaitable`` (returned by ``on_message(message)``, or another callback)."""
        if self._serial is not None:  # one is running: this one waits its turn
            self._queue_serial(_awaited, (awaitable,))
            return
        self._serial = collections.deque()
        # Kept with the application's other tasks: a stopping worker cancels it, and the
        # connection still gets its on_close (see _run_serial).
        tasks.run_coroutine(self._run_serial(awaitable, message), "a coroutine callback")

    def _queue_serial(self, handler: Callable[..., Any], args: tuple[Any, ...]) -> None:
        serial = self._serial
        assert serial is not None
        serial.append((handler, args))
        if len(serial) >= SERIAL_QUEUE_LIMIT and not self._serial_paused and self._state is ESTABLISHED:
            self._serial_paused = True
            if not self._recv_paused:
                self.transport.pause_reading()  # type: ignore[union-attr]

    async def _run_serial(self, awaitable: Any, message: Any = _NO_MESSAGE) -> None:
        try:
            await awaitable
        except Exception:
            report_exception("a coroutine callback", self)
            if message is not _NO_MESSAGE:
                self._protocol.message_failed(message)
        except asyncio.CancelledError:  # the worker is stopping
            await self._serial_cancelled()
            raise
        serial = self._serial
        while serial:
            handler, args = serial.popleft()
            if self._serial_paused and len(serial) < SERIAL_QUEUE_LIMIT // 2:
                self._serial_paused = False
                if not self._recv_paused and self._state is ESTABLISHED:
                    self.transport.resume_reading()  # type: ignore[union-attr]
            try:
                if self._recv_paused and handler is self._handlers.on_message:
                    # pause_recv(): messages already read wait for resume_recv() too
                    # (and again if reading was paused again before this went on).
                    while self._recv_paused and self._state is ESTABLISHED:
                        self._resumed = asyncio.get_running_loop().create_future()
                        await self._resumed
                    if self._recv_paused:  # closed while paused: dropped, as held ones are
                        continue
                result = handler(*args)
                if result is not None and hasattr(result, "__await__"):
                    await result
            except Exception:
                report_exception(getattr(handler, "__name__", "callback"), self)
                if handler is self._handlers.on_message:
                    self._protocol.message_failed(args[1])
            except asyncio.CancelledError:
                await self._serial_cancelled()
                raise
        self._serial = None
        if self._serial_paused:
            self._serial_paused = False
            if not self._recv_paused and self._state is ESTABLISHED:
                self.transport.resume_reading()  # type: ignore[union-attr]

    def _release_queue(self) -> None:
        """Let the queued callbacks go on (reading resumed, or the connection closed)."""
        resumed, self._resumed = self._resumed, None
        if resumed is not None and not resumed.done():
            resumed.set_result(None)

    async def _serial_cancelled(self) -> None:
        """The stopping worker cancelled the coroutine this connection was running: drop
        the messages queued behind it, but still run its ``on_error`` and ``on_close``."""
        serial = self._serial
        last = (self._handlers.on_error, self._handlers.on_close)
        while serial:
            handler, args = serial.popleft()
            if handler not in last:
                if handler is _awaited and hasattr(args[0], "close"):
                    args[0].close()  # a coroutine never started
                continue
            try:
                result = handler(*args)
                if result is not None and hasattr(result, "__await__"):
                    await result
            except Exception:
                report_exception(getattr(handler, "__name__", "callback"), self)
        self._serial = None
        self._serial_paused = False


def _awaited(awaitable: Any) -> Any:
    """Queue entry for an awaitable that is already made: the runner awaits it."""
    return awaitable

