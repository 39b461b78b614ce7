"""``websocket://``: WebSocket (RFC 6455) with permessage-deflate (RFC 7692).

``Worker("websocket://0.0.0.0:8080")`` gives ``on_message(conn, message)`` a ``str`` for
a text message and ``bytes`` for a binary one; ``conn.send(str)`` sends a text frame,
``conn.send(bytes)`` a binary frame. ``AsyncTcpConnection("ws://host:port/path")`` is the
client side, with the same callbacks.

Written here rather than taken from a library because the framing has to live inside
longshore's connection: the send buffer, its limits and ``send_fail`` counting are the
connection's, so frames are parsed straight out of ``data_received`` and encoded straight
into ``send``. Like every longshore protocol it does no I/O of its own beyond writing to
its connection, and the frame functions below are plain functions of bytes.

The opening handshake is parsed by ``httptools`` and handed to the application as a
:class:`longshore.http.Request` (path, query, headers, cookies):

* ``worker.on_websocket_connect(conn, request)`` decides: return ``None``/``True`` to
  accept, ``False`` to refuse with 403, an ``int`` to refuse with that HTTP status, or a
  ``str`` to accept with that subprotocol. It may be a coroutine function; frames sent
  before the handshake is answered wait for it.
* ``worker.on_websocket_connected(conn)`` runs once the 101 answer is sent.
* ``worker.websocket_subprotocols = ["chat", ...]``: the first subprotocol the client
  offers that is in this list is selected.

A WebSocket connection also has ``conn.ping(data=b"")``, ``conn.close(code=1000,
reason="")`` (which sends a close frame first), and ``conn.websocket`` (this protocol
object: ``request``, ``subprotocol``, ``close_code``, ``close_reason``, ``compressed``,
and ``close(code, reason)``, the same as ``conn.close(code=code, reason=reason)``).

Bad input closes the connection with a close frame and ``on_error``: 1002 for a protocol
error (an unmasked client frame, a bad opcode, reserved bits, a control frame that is
fragmented or too long, a continuation with nothing to continue...), 1007 for a text
message that is not UTF-8, 1009 for a message over ``max_package_size`` (checked on the
frame header, on the sum of fragments and while inflating, so a zip bomb stops at the
limit). Pings are answered with pongs by the protocol itself.

Heartbeats (class attributes, or ``worker.websocket_ping_interval`` /
``worker.websocket_idle_timeout``): a connection that has sent nothing for
``ping_interval`` seconds is pinged; one that has sent nothing, not even a pong, for
``idle_timeout`` seconds is closed with 1001. ``None`` turns either off.

Compression: a client that offers permessage-deflate gets it, with
``server_no_context_takeover`` and ``client_no_context_takeover``. Every message is
then compressed on its own, which lets the whole process share one compressor (a
per-connection zlib context costs hundreds of KiB, too much for 10,000 connections).
Messages under ``compress_min_size`` bytes go out uncompressed.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import os
import time
import zlib
from typing import Any, Callable, ClassVar
from urllib.parse import urlsplit

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser, HttpResponseParser

from .. import tasks
from ..connection.tcp import CLOSING, ESTABLISHED, TcpConnection
from ..errors import CONNECT_FAIL, PackageTooLarge, ProtocolError
from ..stats import process_stats as _stats
from .base import Protocol
from .http.request import Request
from .http.response import STATUS_LINES, status_line

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED = 1003
CLOSE_NO_STATUS = 1005
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011

#: Close codes a peer may send (RFC 6455 7.4, and the registered 1012-1014).
_VALID_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))

_DEFLATE_TAIL = b"\x00\x00\xff\xff"

# Handshake states.
_HANDSHAKE = 0
_DECIDING = 1  # waiting for an async on_websocket_connect
_OPEN = 2
_CLOSED = 3

_EMPTY: list[Any] = []

#: While the worker stops, the longest wait for the peer's close frame (seconds).
_STOP_LINGER = 0.5


# -- frames ----------------------------------------------------------------------------
def apply_mask(payload: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask`` (masking and unmasking are the same).

    One big-integer XOR over the whole payload: about 0.4 µs for 64 bytes and 400 MB/s
    for large payloads, some 30 times faster than a byte loop.
    """
    size = len(payload)
    if not size:
        return b""
    key = (bytes(mask) * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(size, "little")


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False, mask: bool = False) -> bytes:
    """One frame: header and payload (masked with a random key when ``mask``)."""
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    size = len(payload)
    bit = 0x80 if mask else 0
    if size < 126:
        header = bytes((first, bit | size))
    elif size < 65536:
        header = bytes((first, bit | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((first, bit | 127)) + size.to_bytes(8, "big")
    if mask:
        key = os.urandom(4)
        return header + key + apply_mask(payload, key)
    return header + payload


def close_payload(code: int | None, reason: str = "") -> bytes:
    """The payload of a close frame (empty when ``code`` is None or 1005).

    The reason is cut to the 123 bytes a control frame has room for, on a character
    boundary (the peer refuses a reason that is not UTF-8).
    """
    if code is None or code == CLOSE_NO_STATUS:
        return b""
    encoded = reason.encode()
    if len(encoded) > 123:
        encoded = encoded[:123].decode(errors="ignore").encode()
    return code.to_bytes(2, "big") + encoded


def _valid_close_code(code: int) -> bool:
    """Whether ``code`` may stand in a close frame: 1000-1003, 1007-1014 or 3000-4999
    (1005, 1006 and 1015 only ever describe a close, and the rest is reserved)."""
    return code in _VALID_CLOSE_CODES or 3000 <= code <= 4999


def check_close_code(code: int) -> None:
    """Raise ValueError unless ``code`` may be sent in a close frame (:func:`_valid_close_code`)."""
    if not _valid_close_code(code):
        raise ValueError(f"close code {code} may not be sent (1000-1003, 1007-1014 or 3000-4999)")


def accept_key(key: str | bytes) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key``."""
    if isinstance(key, str):
        key = key.encode()
    return base64.b64encode(hashlib.sha1(key.strip() + GUID).digest()).decode()


# Pre-built headers of small unmasked frames: the server's hot path.
_TEXT_HEADERS = [bytes((0x81, n)) for n in range(126)]
_BINARY_HEADERS = [bytes((0x82, n)) for n in range(126)]


# -- permessage-deflate ------------------------------------------------------------------
_compressors: dict[int, Any] = {}


def _compress(payload: bytes, window_bits: int) -> bytes:
    """Compress one message on its own (shared compressor, full flush, tail removed)."""
    compressor = _compressors.get(window_bits)
    if compressor is None:
        compressor = _compressors[window_bits] = zlib.compressobj(6, zlib.DEFLATED, -window_bits, 8)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_FULL_FLUSH)
    return data[:-4] if data.endswith(_DEFLATE_TAIL) else data


def _inflate(decompressor: Any, payload: bytes, limit: int) -> bytes:
    """Inflate one message, never producing more than ``limit`` + 1 bytes."""
    try:
        data = decompressor.decompress(payload + _DEFLATE_TAIL, limit + 1)
    except zlib.error as exc:
        raise _Fail(CLOSE_INVALID_DATA, f"bad compressed data: {exc}") from None
    if len(data) > limit or decompressor.unconsumed_tail:
        raise _Fail(CLOSE_TOO_BIG, f"message inflates beyond max_package_size {limit}")
    return data


def parse_extensions(header: str) -> list[tuple[str, dict[str, str | None]]]:
    """``Sec-WebSocket-Extensions`` as a list of ``(name, {param: value or None})``."""
    offers = []
    for item in header.split(","):
        parts = [part.strip() for part in item.split(";")]
        if not parts[0]:
            continue
        params: dict[str, str | None] = {}
        for part in parts[1:]:
            if not part:
                continue
            name, sep, value = part.partition("=")
            params[name.strip().lower()] = value.strip().strip('"') if sep else None
        offers.append((parts[0].lower(), params))
    return offers


def _window_bits(value: str | None, default: int = 15) -> int | None:
    if value is None:
        return default
    if not value.isdigit() or not 9 <= int(value) <= 15:
        return None
    return int(value)


def negotiate_deflate(header: str) -> tuple[str, int] | None:
    """Server side: the answer to an extensions offer, and the window to compress with.

    Accepts the first acceptable permessage-deflate offer, always with
    ``server_no_context_takeover; client_no_context_takeover``.
    """
    for name, params in parse_extensions(header):
        if name != "permessage-deflate":
            continue
        if set(params) - {"server_no_context_takeover", "client_no_context_takeover", "server_max_window_bits", "client_max_window_bits"}:
            continue
        if params.get("server_no_context_takeover") or params.get("client_no_context_takeover"):
            continue  # these take no value
        answer = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        window = 15
        if "server_max_window_bits" in params:
            bits = _window_bits(params["server_max_window_bits"], -1)
            if bits is None or bits < 0:
                continue
            window = bits
            answer += f"; server_max_window_bits={bits}"
        if "client_max_window_bits" in params and params["client_max_window_bits"] is not None:
            if _window_bits(params["client_max_window_bits"]) is None:
                continue
        return answer, window
    return None


# -- errors --------------------------------------------------------------------------------
class _Fail(Exception):
    """Raised inside the parser: close with ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _error_response(status: int, extra: bytes = b"", connection: bytes = b"close") -> bytes:
    """An HTTP refusal of a handshake (the connection closes after it)."""
    body = STATUS_LINES.get(status, status_line(status))[9:].strip() + b"\n"
    return (
        status_line(status)
        + b"Server: longshore\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: "
        + connection
        + b"\r\n"
        + extra
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


class _HeadParser:
    """httptools callbacks collecting a request or response head."""

    __slots__ = ("url", "reason", "headers", "complete")

    def __init__(self) -> None:
        self.url = b""
        #: The reason phrase of a response ("Forbidden").
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


class _BadHead(Exception):
    """The HTTP head of a handshake could not be read: ``too_large``, or malformed."""

    def __init__(self, detail: str = "", too_large: bool = False) -> None:
        super().__init__(detail)
        self.too_large = too_large


def _take_head(buffer: bytearray, parser_class: Any, max_size: int) -> tuple[_HeadParser, Any] | None:
    """Parse the HTTP head at the start of ``buffer`` and cut it from there.

    ``parser_class`` is httptools' ``HttpRequestParser`` (server) or
    ``HttpResponseParser`` (client). Returns ``(collected head, httptools parser)``, or
    None while the head is incomplete; raises :class:`_BadHead` when more than
    ``max_size`` bytes came without the end of the head, or when it does not parse.
    What follows the head (the first frames) stays in ``buffer``.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > max_size:
            raise _BadHead(too_large=True)
        return None
    if end + 4 > max_size:  # the whole head came at once, but too large all the same
        raise _BadHead(too_large=True)
    head = bytes(buffer[: end + 4])
    del buffer[: end + 4]
    collected = _HeadParser()
    parser = parser_class(collected)
    try:
        parser.feed_data(head)
    except HttpParserUpgrade:
        pass
    except HttpParserError as exc:
        raise _BadHead(str(exc)) from None
    if not collected.complete:
        raise _BadHead()
    return collected, parser


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    values = [value.decode("latin-1") for key, value in headers if key.lower() == name]
    return ", ".join(values) if values else None


def _detail(error: Exception) -> str:
    """``": what went wrong"``, or nothing when the error says nothing more."""
    text = str(error)
    return f": {text}" if text else ""


def _tokens(value: str | None) -> list[str]:
    return [token.strip().lower() for token in (value or "").split(",") if token.strip()]


# -- heartbeats ------------------------------------------------------------------------------
#: Open connections with a ping interval or an idle timeout.
_watched: dict[WebSocketProtocol, None] = {}
_tick_handle: asyncio.TimerHandle | None = None
_tick_interval = 1.0


def _watch(protocol: WebSocketProtocol) -> None:
    global _tick_handle, _tick_interval
    _watched[protocol] = None
    shortest = min(value for value in (protocol.ping_interval, protocol.idle_timeout) if value)
    interval = max(0.05, min(1.0, shortest / 4))
    if _tick_handle is None or interval < _tick_interval:
        if _tick_handle is not None:
            _tick_handle.cancel()
        _tick_interval = interval
        _tick_handle = asyncio.get_running_loop().call_later(interval, _tick)


def _watch_handshake(protocol: WebSocketProtocol) -> None:
    global _tick_handle
    loop = asyncio.get_running_loop()
    protocol._idle_since = time.monotonic()
    _watched[protocol] = None
    if _tick_handle is None:
        _tick_handle = loop.call_later(_tick_interval, _tick)


def _tick() -> None:
    global _tick_handle
    now = time.monotonic()
    for protocol in list(_watched):
        protocol._heartbeat(now)
    if _watched:
        _tick_handle = asyncio.get_running_loop().call_later(_tick_interval, _tick)
    else:
        _tick_handle = None


# -- the protocol ------------------------------------------------------------------------------
#: (message, deflate window, frame) of the last large message a server encoded.
_last_encoded: tuple[Any, int, bytes] = (None, -1, b"")


class WebSocketProtocol(Protocol):
    """Server side of a WebSocket connection; see the module docstring.

    Settings (class attributes; a worker attribute ``websocket_<name>`` overrides one for
    that worker): ``max_header_size`` (16 KiB handshake), ``ping_interval`` (25 s),
    ``idle_timeout`` (60 s), ``subprotocols`` (none), ``compression`` (True),
    ``compress_min_size`` (128 bytes), ``handshake_timeout`` (10 s: a connection that has
    not completed its handshake by then gets a 408 and is closed), ``close_timeout`` (2 s:
    after sending its close frame the connection reads on, dropping data frames, until the
    peer's close frame or the end of its stream, at most this long, and only then closes
    the socket; None closes it at once).
    """

    scheme = "websocket"
    client: ClassVar[bool] = False

    max_header_size: ClassVar[int] = 16 * 1024
    ping_interval: float | None = 25.0
    idle_timeout: float | None = 60.0
    subprotocols: ClassVar[tuple[str, ...]] = ()
    compression: ClassVar[bool] = True
    compress_min_size: int = 128
    handshake_timeout: ClassVar[float] = 10.0
    close_timeout: ClassVar[float | None] = 2.0

    __slots__ = (
        "_state",
        "_buffer",
        "_fragments",
        "_fragment_opcode",
        "_fragment_compressed",
        "_fragment_size",
        "_held",
        "_held_size",
        "_deflate_window",
        "_inflater",
        "_close_sent",
        "_linger",
        "_skip",
        "_seen_read",
        "_idle_since",
        "_last_ping",
        "_going_away",
        "request",
        "subprotocol",
        "close_code",
        "close_reason",
        "__dict__",
    )

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self._state = _HANDSHAKE
        self._buffer: bytearray | None = None
        self._fragments: list[bytes] | None = None
        self._fragment_opcode = 0
        self._fragment_compressed = False
        self._fragment_size = 0
        #: Frames sent before the handshake is answered (None once it is), and their size.
        self._held: list[bytes] | None = []
        self._held_size = 0
        #: Window bits to compress with; 0 when permessage-deflate is off.
        self._deflate_window = 0
        self._inflater: Any = None
        self._close_sent = False
        #: After our close frame: the timer that ends the wait for the peer's, and how
        #: many bytes of a data frame's payload are still to be dropped.
        self._linger: asyncio.TimerHandle | None = None
        self._skip = 0
        self._seen_read = 0
        self._idle_since = 0.0
        self._last_ping = 0.0
        self._going_away = False
        #: The handshake request (:class:`longshore.http.Request`).
        self.request: Request | None = None
        #: The selected subprotocol, or None.
        self.subprotocol: str | None = None
        #: The code and reason of the close frame received (None until one arrives).
        self.close_code: int | None = None
        self.close_reason = ""
        _adopt(connection)
        if not self.client:
            try:
                _watch_handshake(self)
            except RuntimeError:  # no running loop: built outside a worker
                pass

    @property
    def compressed(self) -> bool:
        """Whether permessage-deflate was negotiated."""
        return self._deflate_window != 0

    @property
    def open(self) -> bool:
        """True between the handshake and the close."""
        return self._state == _OPEN

    def buffered(self) -> int:
        return (len(self._buffer) if self._buffer else 0) + self._fragment_size

    def connection_closed(self) -> None:
        self._state = _CLOSED
        _watched.pop(self, None)
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None

    def _setting(self, name: str) -> Any:
        return getattr(self.connection.worker, "websocket_" + name, getattr(type(self), name))

    def hold(self, message: Any, raw: bool = False) -> bool | None:
        """``send()`` before the handshake is answered: keep the frame for after the 101.

        Held frames count toward the connection's ``max_send_buffer_size`` like a send
        buffer: a frame is held while less than that waits (None), else it is dropped,
        counted in ``send_fail`` and reported to ``on_error`` (False).
        """
        connection: Any = self.connection
        if self._held_size >= connection.max_send_buffer_size:
            connection._drop()
            return False
        if not raw:
            self.encode(message)  # held by encode
        else:
            data = message.encode() if isinstance(message, str) else bytes(message)
            self._held.append(data)  # type: ignore[union-attr]
            self._held_size += len(data)
        return None

    def _release_held(self, connection: Any) -> bytes:
        """The handshake is accepted: the frames held so far, and ``send()`` sends again."""
        held, self._held = self._held, None
        self._held_size = 0
        open_class = getattr(type(connection), "_open_class", None)
        if open_class is not None:
            connection.__class__ = open_class
        return b"".join(held) if held else b""

    # -- input -------------------------------------------------------------------------------
    def feed(self, data: bytes) -> list[Any]:
        state = self._state
        if state == _OPEN:
            buffer = self._buffer
            size = len(data)
            if buffer is None and 6 < size < 132 and self._fragments is None and not self.client:
                # The common case: one whole small masked data frame in the chunk.
                first = data[0]
                if (first == 0x81 or first == 0x82) and data[1] == 0x7A + size and size - 6 <= self.connection.max_package_size:  # mask bit | size - 6
                    length = size - 6
                    payload = (int.from_bytes(data[6:], "little") ^ int.from_bytes((data[2:6] * 32)[:length], "little")).to_bytes(length, "little")
                    if first == 0x82:
                        return [payload]
                    try:
                        return [payload.decode()]
                    except UnicodeDecodeError:
                        pass  # the general path below reports it
            if buffer:  # the rest of a frame: parse in place, no copy of what waits
                buffer += data
                data = buffer  # type: ignore[assignment]
            out: list[Any] = []
            try:
                self._parse(data, out)
            except _Fail as failure:
                return self._fail(failure, out)
            return out
        if state == _HANDSHAKE or state == _DECIDING:
            return self._feed_handshake(data)
        return _EMPTY

    def _parse(self, view: bytes | bytearray, out: list[Any]) -> None:
        size = len(view)
        position = 0
        limit = self.connection.max_package_size
        expect_mask = 0 if self.client else 0x80
        while size - position >= 2:
            first = view[position]
            second = view[position + 1]
            length = second & 0x7F
            head = 2
            if length == 126:
                if size - position < 4:
                    break
                length = (view[position + 2] << 8) | view[position + 3]
                head = 4
            elif length == 127:
                if size - position < 10:
                    break
                length = int.from_bytes(view[position + 2 : position + 10], "big")
                if length >> 63:
                    raise _Fail(CLOSE_PROTOCOL_ERROR, "frame length has its top bit set")
                head = 10
            if (second & 0x80) != expect_mask:
                raise _Fail(CLOSE_PROTOCOL_ERROR, "client frames must be masked" if expect_mask else "server frames must not be masked")
            if expect_mask:
                head += 4
            # The header is checked whole before the payload is waited for.
            opcode = first & 0x0F
            if opcode & 0x08:  # a control frame: not part of a message, not counted in its size
                if opcode > OP_PONG:
                    raise _Fail(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
                if not first & 0x80 or length > 125:
                    raise _Fail(CLOSE_PROTOCOL_ERROR, "control frames must be whole and at most 125 bytes")
                if first & 0x70:
                    raise _Fail(CLOSE_PROTOCOL_ERROR, "reserved bits set")
            else:
                if opcode == OP_CONTINUATION:
                    if self._fragments is None:
                        raise _Fail(CLOSE_PROTOCOL_ERROR, "continuation frame with nothing to continue")
                    if first & 0x70:
                        raise _Fail(CLOSE_PROTOCOL_ERROR, "reserved bits set")
                elif opcode > OP_BINARY:
                    raise _Fail(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
                else:
                    if self._fragments is not None:
                        raise _Fail(CLOSE_PROTOCOL_ERROR, "a new message began before the last one ended")
                    if first & 0x70 and ((first & 0x70) != 0x40 or not self._deflate_window):
                        raise _Fail(CLOSE_PROTOCOL_ERROR, "reserved bits set")
                if length + self._fragment_size > limit:
                    self._skip = max(0, position + head + length - size)  # the rest of it, dropped after the close
                    raise _Fail(CLOSE_TOO_BIG, f"message larger than max_package_size {limit}")
            end = position + head + length
            if end > size:
                break
            if expect_mask:
                payload = apply_mask(view[position + head : end], view[position + head - 4 : position + head])
            else:
                payload = bytes(view[position + head : end])
            position = end
            if opcode == OP_TEXT or opcode == OP_BINARY:
                compressed = first & 0x40 != 0
                if first & 0x80:
                    out.append(self._message(opcode, compressed, payload, limit))
                else:
                    self._fragments = [payload]
                    self._fragment_opcode = opcode
                    self._fragment_compressed = compressed
                    self._fragment_size = length
            elif opcode == OP_CONTINUATION:
                fragments = self._fragments
                fragments.append(payload)  # type: ignore[union-attr]
                self._fragment_size += length
                if first & 0x80:
                    self._fragments = None
                    self._fragment_size = 0
                    out.append(self._message(self._fragment_opcode, self._fragment_compressed, b"".join(fragments), limit))  # type: ignore[arg-type]
            elif opcode == OP_PING:
                self._send_control(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                self._received_close(payload)
                return
        buffer = self._buffer
        if position < size:
            if view is buffer:
                if position:
                    del buffer[:position]
            else:
                self._buffer = bytearray(view[position:])
        elif buffer is not None:
            self._buffer = None

    def _message(self, opcode: int, compressed: bool, payload: bytes, limit: int) -> Any:
        if compressed:
            inflater = self._inflater or zlib.decompressobj(-15)
            payload = _inflate(inflater, payload, limit)
        if opcode == OP_TEXT:
            try:
                return payload.decode()
            except UnicodeDecodeError as exc:
                raise _Fail(CLOSE_INVALID_DATA, f"text message is not UTF-8: {exc.reason}") from None
        return payload

    def _received_close(self, payload: bytes) -> None:
        self._state = _CLOSED
        if len(payload) == 1:
            raise _Fail(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
        code = CLOSE_NO_STATUS
        reason = ""
        if payload:
            code = int.from_bytes(payload[:2], "big")
            if not _valid_close_code(code):
                raise _Fail(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
            try:
                reason = payload[2:].decode()
            except UnicodeDecodeError:
                raise _Fail(CLOSE_INVALID_DATA, "close reason is not UTF-8") from None
        self.close_code = code
        self.close_reason = reason
        connection = self.connection
        if not self._close_sent:
            self._close_sent = True
            self._write(encode_frame(OP_CLOSE, close_payload(code), mask=self.client))
        _close_socket(connection)

    def _fail(self, failure: _Fail, out: list[Any]) -> list[Any]:
        self._state = _CLOSED
        self._buffer = None  # what follows is only scanned for the peer's close frame
        response = None
        if not self._close_sent:
            self._close_sent = True
            response = encode_frame(OP_CLOSE, close_payload(failure.code, str(failure)[:100]), mask=self.client)
        error_class = PackageTooLarge if failure.code == CLOSE_TOO_BIG else ProtocolError
        error = error_class(f"websocket {failure.code}: {failure}", response=response)
        if not out:
            raise error
        # Messages parsed before the bad frame are delivered first.
        asyncio.get_running_loop().call_soon(self._fail_later, error)
        return out

    def _fail_later(self, error: ProtocolError) -> None:
        if not self.connection.closed:
            self.connection._protocol_error(error)

    # -- output -----------------------------------------------------------------------------
    def encode(self, message: Any) -> bytes:
        if isinstance(message, str):
            payload = message.encode()
            headers = _TEXT_HEADERS
            opcode = 0x81
        else:
            payload = message if isinstance(message, bytes) else bytes(message)
            headers = _BINARY_HEADERS
            opcode = 0x82
        if self._held is not None:  # the handshake is not done yet: the frame waits
            frame = self._frame(opcode, payload)
            self._held.append(frame)
            self._held_size += len(frame)
            return b""
        size = len(payload)
        if size < 126 and not self.client and (not self._deflate_window or size < self.compress_min_size):
            return headers[size] + payload
        if self.client or (type(message) is not str and type(message) is not bytes):  # masked, or mutable
            return self._frame(opcode, payload)
        # One message sent to many connections (a broadcast) is framed, and compressed,
        # once: the last frame is kept with the message object it was made from.
        global _last_encoded
        window = self._deflate_window if size >= self.compress_min_size else 0
        last = _last_encoded
        if last[0] is message and last[1] == window:
            return last[2]
        frame = self._frame(opcode, payload)
        _last_encoded = (message, window, frame)
        return frame

    def _frame(self, first: int, payload: bytes) -> bytes:
        window = self._deflate_window
        if window and len(payload) >= self.compress_min_size:
            payload = _compress(payload, window)
            first |= 0x40
        return _frame_bytes(first, payload, self.client)

    def _write(self, data: bytes) -> None:
        connection: Any = self.connection
        if connection._state is ESTABLISHED and connection.transport is not None:
            connection._flush_cork()
            connection.transport.write(data)
            connection.bytes_written += len(data)

    def _send_control(self, opcode: int, payload: bytes) -> bool | None:
        if self._state != _OPEN:
            return False
        return self.connection.send(encode_frame(opcode, payload, mask=self.client), raw=True)

    def ping(self, data: bytes | str = b"") -> bool | None:
        """Send a ping frame (the peer answers with a pong)."""
        if isinstance(data, str):
            data = data.encode()
        self._last_ping = time.monotonic()
        return self._send_control(OP_PING, bytes(data[:125]))

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Close with ``code`` and ``reason``: the same as ``conn.close(code=code, reason=reason)``.

        A close frame, then the wait for the peer's (see ``close_timeout``), then the
        socket closes. Raises ValueError, before anything is sent, for a code that may
        not be sent (see :func:`check_close_code`)."""
        connection = self.connection
        if isinstance(connection, WebSocketMethods):
            connection.close(code=code, reason=reason)
            return
        check_close_code(code)
        self._send_close(code, reason)  # a connection without a closing handshake of its own

    def _send_close(self, code: int, reason: str) -> None:
        """Write a close frame (unless one was sent); the connection then closes the socket."""
        if not self._close_sent and self._state == _OPEN:
            self._close_sent = True
            self._state = _CLOSED
            self._write(encode_frame(OP_CLOSE, close_payload(code, reason), mask=self.client))
        self._state = _CLOSED
        _watched.pop(self, None)

    def graceful_close(self) -> None:
        """The worker stops gracefully: close with 1001 (going away) after what was sent.

        A connection has no natural end to wait for, so it is closed now, its send buffer
        written out first; a client that reconnects reaches a worker that stays. A
        handshake in progress is completed first.
        """
        if self._state == _OPEN:
            self.going_away()
            self.connection.close()  # after the peer's close frame (see close_timeout)
        elif self._state == _HANDSHAKE or self._state == _DECIDING:
            self._going_away = True

    def going_away(self) -> None:
        """The worker stops: an open connection gets a close frame with 1001 (going away).

        The wait for the peer's close frame is then at most ``_STOP_LINGER`` seconds, so
        that a stop or a reload is not held up by peers that do not answer."""
        self._going_away = True
        self._send_close(CLOSE_GOING_AWAY, "server going away" if not self.client else "going away")

    # -- closing handshake -----------------------------------------------------------------
    def linger(self) -> bool:
        """Our close frame is sent: wait for the peer's before closing the socket.

        Closing the socket while the peer still sends would make the kernel answer with a
        reset, which can destroy our close frame before the peer reads it. So the
        connection is closing (``closed`` is True, ``send()`` refuses) but reads on,
        dropping data frames, until the peer's close frame, the end of its stream, or
        ``close_timeout`` seconds. Returns False when there is nothing to wait for (the
        caller closes the socket now).
        """
        connection: Any = self.connection
        if self._linger is not None:
            return True
        if not self._close_sent or self.close_code is not None or connection._state is not ESTABLISHED or connection._got_eof:
            return False
        timeout = self._setting("close_timeout")
        if not timeout or connection.transport is None:
            return False
        if self._going_away:
            timeout = min(timeout, _STOP_LINGER)
        connection._state = CLOSING
        connection._flush_cork()
        connection._held_messages = None
        self._fragments = None
        self._fragment_size = 0
        self._linger = asyncio.get_running_loop().call_later(timeout, self._end_linger)
        reader = _Lingering(connection)
        connection.transport.set_protocol(reader)  # what arrives now goes to drain()
        held, connection._held = connection._held, None
        for data in held or ():  # read before the close but not handed on: the peer's close may be there
            reader.data_received(data)
        if self._linger is not None:
            connection.transport.resume_reading()
        return True

    def drain(self, data: bytes) -> None:
        """What the peer sends after our close frame: data frames are dropped, its close
        frame (code and reason kept in ``close_code`` and ``close_reason``) ends the wait."""
        skip = self._skip
        if skip:
            if len(data) <= skip:
                self._skip = skip - len(data)
                return
            data = data[skip:]
            self._skip = 0
        buffer = self._buffer
        if buffer:
            buffer += data
            data = buffer  # type: ignore[assignment]
        size = len(data)
        position = 0
        while size - position >= 2:
            first = data[position]
            second = data[position + 1]
            length = second & 0x7F
            head = 2
            if length == 126:
                if size - position < 4:
                    break
                length = (data[position + 2] << 8) | data[position + 3]
                head = 4
            elif length == 127:
                if size - position < 10:
                    break
                length = int.from_bytes(data[position + 2 : position + 10], "big")
                head = 10
            if second & 0x80:
                head += 4
            end = position + head + length
            if (first & 0x0F) == OP_CLOSE:
                if length > 125:  # not a close frame worth waiting for
                    self._end_linger()
                    return
                if end > size:
                    break
                payload = bytes(data[position + head : end])
                if second & 0x80:
                    payload = apply_mask(payload, data[position + head - 4 : position + head])
                self._peer_closed(payload)
                return
            if end > size:  # a data frame not all here: drop what came, skip the rest
                self._skip = end - size
                position = size
                break
            position = end
        self._buffer = bytearray(data[position:]) if position < size else None

    def _peer_closed(self, payload: bytes) -> None:
        """The peer's close frame came while lingering: keep its code, close the socket."""
        if len(payload) >= 2:
            code = int.from_bytes(payload[:2], "big")
            if _valid_close_code(code):
                self.close_code = code
                self.close_reason = payload[2:].decode(errors="replace")
        elif not payload:
            self.close_code = CLOSE_NO_STATUS
        self._end_linger()

    def _end_linger(self) -> None:
        """The peer answered our close frame, ended its stream, or took too long: close."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self._skip = 0
        self._buffer = None
        transport = self.connection.transport
        if transport is not None and not transport.is_closing():
            transport.close()  # what waits in the send buffer is written first

    # -- heartbeats ----------------------------------------------------------------------------
    def _heartbeat(self, now: float) -> None:
        connection: Any = self.connection
        state = self._state
        if state != _OPEN or connection.closed:
            if (state == _HANDSHAKE or state == _DECIDING) and not connection.closed:
                if now - self._idle_since >= self._setting("handshake_timeout"):
                    _watched.pop(self, None)
                    self._state = _CLOSED
                    self._handshake_expired()
                return
            _watched.pop(self, None)
            return
        read = connection.bytes_read
        if read != self._seen_read:
            self._seen_read = read
            self._idle_since = now
            return
        idle = now - self._idle_since
        if self.idle_timeout and idle >= self.idle_timeout:
            connection.close(code=CLOSE_GOING_AWAY, reason="idle timeout")
        elif self.ping_interval and idle >= self.ping_interval and now - self._last_ping >= self.ping_interval:
            self.ping()

    def _handshake_expired(self) -> None:
        """``handshake_timeout`` passed without a complete handshake: answer 408 and close."""
        self.connection._protocol_error(ProtocolError("handshake not completed in time", response=_error_response(408)))

    def _start_heartbeat(self) -> None:
        self.ping_interval = self._setting("ping_interval")
        self.idle_timeout = self._setting("idle_timeout")
        if self.ping_interval or self.idle_timeout:
            self._idle_since = self._last_ping = time.monotonic()
            self._seen_read = self.connection.bytes_read
            _watch(self)
        else:
            _watched.pop(self, None)

    # -- server handshake ------------------------------------------------------------------------
    def _feed_handshake(self, data: bytes) -> list[Any]:
        buffer = self._buffer
        if buffer is None:
            buffer = self._buffer = bytearray()
        buffer += data
        if self._state == _DECIDING:
            # Kept for after the decision; reading stays paused until then (again, in
            # case the application resumed it), so what waits is at most one read.
            self.connection.transport.pause_reading()  # type: ignore[union-attr]
            return _EMPTY
        try:
            parsed = _take_head(buffer, HttpRequestParser, self._setting("max_header_size"))
        except _BadHead as exc:
            if exc.too_large:
                raise ProtocolError("handshake headers too large", response=_error_response(431)) from None
            raise ProtocolError(f"malformed handshake{_detail(exc)}", response=_error_response(400)) from None
        if parsed is None:
            return _EMPTY
        head, http = parsed
        request = Request(self.connection, http.get_method(), head.url, head.headers, http.get_http_version(), True)
        self.accept(request)
        return self._after_open()

    def _after_open(self) -> list[Any]:
        buffer = self._buffer
        self._buffer = None
        if self._state == _OPEN and buffer:
            return self.feed(bytes(buffer))
        if self._state == _DECIDING and buffer is not None:
            self._buffer = buffer
        return _EMPTY

    def accept(self, request: Request) -> None:
        """Answer the handshake ``request`` (used by :func:`upgrade` for ``http://`` workers)."""
        self.request = request
        headers = request.raw_headers
        if request.method != "GET":
            raise ProtocolError("handshake is not a GET", response=_error_response(405, b"Allow: GET\r\n"))
        if request.version in ("1.0", "0.9"):
            raise ProtocolError(f"handshake over HTTP/{request.version}", response=_error_response(400))
        if not (_header(headers, b"host") or "").strip():
            raise ProtocolError("handshake without a Host header", response=_error_response(400))
        # A 426 names what to upgrade to, and the "upgrade" option goes with Connection's "close".
        if "websocket" not in _tokens(_header(headers, b"upgrade")) or "upgrade" not in _tokens(_header(headers, b"connection")):
            raise ProtocolError("not a WebSocket handshake", response=_error_response(426, b"Upgrade: websocket\r\n", b"Upgrade, close"))
        if (_header(headers, b"sec-websocket-version") or "").strip() != "13":
            raise ProtocolError(
                "unsupported WebSocket version", response=_error_response(426, b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n", b"Upgrade, close")
            )
        key = (_header(headers, b"sec-websocket-key") or "").strip()
        try:
            valid_key = len(base64.b64decode(key, validate=True)) == 16
        except ValueError:
            valid_key = False
        if not valid_key:
            raise ProtocolError("bad Sec-WebSocket-Key", response=_error_response(400))
        offered = [token.strip() for token in (_header(headers, b"sec-websocket-protocol") or "").split(",") if token.strip()]
        supported = self._setting("subprotocols")
        self.subprotocol = next((name for name in offered if name in supported), None)
        hook = getattr(self.connection, "_websocket_connect_hook", None) or getattr(self.connection.worker, "on_websocket_connect", None)
        if hook is not None:
            try:
                decision = hook(self.connection, request)
            except Exception:
                from ..connection.tcp import report_exception

                report_exception("on_websocket_connect", self.connection)
                decision = 500
            if decision is not None and hasattr(decision, "__await__"):
                self._state = _DECIDING
                # Nothing more is read until the decision: what the client sends
                # meanwhile waits in the socket, not in memory.
                self.connection.transport.pause_reading()  # type: ignore[union-attr]
                # A task of longshore.tasks: referenced until done, its failure logged and
                # counted, and cancelled when the worker stops.
                connection = self.connection
                task = tasks.run_coroutine(decision, f"on_websocket_connect (connection {connection.id}, {connection.remote_address})")
                task.add_done_callback(functools.partial(self._decided, key))
                return
            if not self._answer(key, decision):
                return
        else:
            self._answer(key, None)

    def _decided(self, key: str, task: asyncio.Future[Any]) -> None:
        connection: Any = self.connection
        if task.cancelled():  # the worker stops: no answer, the connection goes with it
            self._state = _CLOSED
            self._held = None
            self._held_size = 0
            if not connection.closed:
                _close_socket(connection)
            return
        if connection.closed:
            return
        decision: Any = 500 if task.exception() is not None else task.result()  # a failure is logged by longshore.tasks
        self._state = _HANDSHAKE
        if self._answer(key, decision):
            if not connection._recv_paused and not connection._serial_paused and not connection.closed:
                connection.transport.resume_reading()
            try:
                messages = self._after_open()
            except ProtocolError as exc:  # a bad frame came while deciding
                connection._protocol_error(exc)
                return
            if messages:
                _stats.total_request += len(messages)
                handler = connection.on_message
                if handler is not None:
                    connection._dispatch(handler, messages)

    def _answer(self, key: str, decision: Any) -> bool:
        """Send the 101 (True) or the refusal (False) the decision calls for."""
        connection: Any = self.connection
        if connection.closed:  # the application closed it while deciding
            self._state = _CLOSED
            self._held = None
            self._held_size = 0
            return False
        if decision is False:
            decision = 403
        if isinstance(decision, int) and not isinstance(decision, bool):
            self._state = _CLOSED
            self._held = None
            self._held_size = 0
            response = _error_response(decision)
            connection._flush_cork()  # answers collected before this one go first
            connection.transport.write(response)
            connection.bytes_written += len(response)
            _close_socket(connection)
            return False
        if isinstance(decision, str):
            self.subprotocol = decision
        lines = [
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
            accept_key(key).encode(),
            b"\r\n",
        ]
        if self.subprotocol:
            lines.append(b"Sec-WebSocket-Protocol: %s\r\n" % self.subprotocol.encode())
        extensions = self.request.header("sec-websocket-extensions") if self.request is not None else None
        if extensions and self._setting("compression"):
            deflate = negotiate_deflate(extensions)
            if deflate is not None:
                answer, self._deflate_window = deflate
                lines.append(b"Sec-WebSocket-Extensions: %s\r\n" % answer.encode())
        lines.append(b"\r\n")
        self.compress_min_size = self._setting("compress_min_size")
        held = self._release_held(connection)
        self._state = _OPEN
        handshake = b"".join(lines)
        connection._flush_cork()  # answers collected before this one go first
        connection.transport.write(handshake + held)
        connection.bytes_written += len(handshake) + len(held)
        self._start_heartbeat()
        if self._going_away:
            self.graceful_close()
            return True
        hook = getattr(connection, "_websocket_connected_hook", None) or getattr(connection.worker, "on_websocket_connected", None)
        if hook is not None:
            connection._call(hook, "on_websocket_connected", connection)
        return True


def _frame_bytes(first: int, payload: bytes, mask: bool) -> bytes:
    size = len(payload)
    bit = 0x80 if mask else 0
    if size < 126:
        header = bytes((first, bit | size))
    elif size < 65536:
        header = bytes((first, bit | 126, size >> 8, size & 0xFF))
    else:
        header = bytes((first, bit | 127)) + size.to_bytes(8, "big")
    if mask:
        key = os.urandom(4)
        return header + key + apply_mask(payload, key)
    return header + payload


class WebSocketMethods:
    """What a connection speaking WebSocket adds: :meth:`ping`, a close handshake, ``websocket``."""

    __slots__ = ()
    _protocol: Any
    _state: Any

    @property
    def websocket(self) -> WebSocketProtocol:
        """The WebSocket protocol state (``request``, ``subprotocol``, ``close_code`` ...)."""
        return self._protocol  # type: ignore[return-value]

    def ping(self, data: bytes | str = b"") -> bool | None:
        """Send a ping frame; the peer answers with a pong."""
        return self._protocol.ping(data)  # type: ignore[attr-defined,no-any-return]

    def close(self, data: Any = None, raw: bool = False, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Send ``data`` (if given), then a close frame with ``code`` and ``reason``, then close.

        Raises ValueError, before anything is sent, for a code that may not be sent (see
        :func:`check_close_code`)."""
        check_close_code(code)
        if data is not None and self._state is ESTABLISHED:
            self.send(data, raw)  # type: ignore[attr-defined]
        protocol = self._protocol
        if isinstance(protocol, WebSocketProtocol):
            protocol._send_close(code, reason)
            if protocol.linger():  # the socket closes after the peer's close frame
                cancel_reconnect = getattr(self, "cancel_reconnect", None)
                if cancel_reconnect is not None:  # a client closed by the application
                    cancel_reconnect()
                return
        super().close()  # type: ignore[misc]


class _HandshakeMethods:
    """A WebSocket connection whose handshake is not answered yet: what it sends is held.

    Its class, for the time of the handshake, is the open class with this in front;
    the protocol puts the open class back when the handshake is accepted, so the send
    path of an open connection is :class:`~longshore.TcpConnection`'s own, untouched.
    """

    __slots__ = ()
    _protocol: Any

    def send(self, data: Any, raw: bool = False) -> bool | None:
        """Hold ``data`` (as a frame, unless ``raw``) until the handshake is accepted."""
        protocol = self._protocol
        if not isinstance(protocol, WebSocketProtocol) or protocol._held is None or self.closed:  # type: ignore[attr-defined]
            return super().send(data, raw)  # type: ignore[misc,no-any-return]
        return protocol.hold(data, raw)  # type: ignore[no-any-return]

    @property
    def send_buffer_size(self) -> int:
        """Bytes accepted by ``send()`` and not yet written to the socket (held frames too)."""
        protocol = self._protocol
        held = protocol._held_size if isinstance(protocol, WebSocketProtocol) else 0
        return super().send_buffer_size + held  # type: ignore[misc,no-any-return]


class WebSocketConnection(WebSocketMethods, TcpConnection):
    """An accepted connection speaking WebSocket: adds :meth:`ping` and a close handshake.

    Connections of a ``websocket://`` worker (or upgraded by :func:`upgrade`) are of this
    class (or of a class built the same way on another connection class, e.g. TLS);
    everything else is :class:`~longshore.TcpConnection`'s.
    """

    __slots__ = ()


def _close_socket(connection: Any) -> None:
    """Close without another close frame (one was sent, or the handshake failed)."""
    if isinstance(connection, WebSocketMethods):
        super(WebSocketMethods, connection).close()  # type: ignore[misc]
    else:
        connection.close()


_classes: dict[type, type] = {TcpConnection: WebSocketConnection}
_handshake_classes: dict[type, type] = {}


def websocket_class(base: type) -> type:
    """The class a connection of class ``base`` takes when it starts speaking WebSocket.

    Built once per class: ``base`` with :class:`WebSocketMethods` in front. The mixins
    add methods only (empty ``__slots__``), so the instance layout stays the same, which
    is what lets a connection change class in place.
    """
    cls = _classes.get(base)
    if cls is None:
        cls = type(f"WebSocket{base.__name__}", (WebSocketMethods, base), {"__slots__": (), "__doc__": base.__doc__, "__module__": __name__})
        _classes[base] = cls
    return cls


def _handshake_class(open_class: type) -> type:
    """The class a connection of ``open_class`` has until its handshake is accepted."""
    cls = _handshake_classes.get(open_class)
    if cls is None:
        namespace = {"__slots__": (), "__doc__": open_class.__doc__, "__module__": open_class.__module__, "_open_class": open_class}
        cls = type(open_class.__name__, (_HandshakeMethods, open_class), namespace)
        cls.__qualname__ = open_class.__qualname__
        _handshake_classes[open_class] = cls
    return cls


class _Lingering(asyncio.Protocol):
    """The transport's protocol while a WebSocket connection waits for the peer's close frame.

    The connection is closing (``closed`` is True, ``send()`` refuses), so it reads
    nothing itself; what arrives is handed to :meth:`WebSocketProtocol.drain`, and the
    end of the connection goes back to it.
    """

    __slots__ = ("connection",)

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    def data_received(self, data: bytes) -> None:
        connection = self.connection
        connection.bytes_read += len(data)
        connection._protocol.drain(data)

    def eof_received(self) -> bool | None:
        self.connection._got_eof = True
        return None  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.connection.connection_lost(exc)

    def pause_writing(self) -> None:
        self.connection.pause_writing()

    def resume_writing(self) -> None:
        self.connection.resume_writing()


def _adopt(connection: Any) -> None:
    """Give ``connection`` the class of a WebSocket connection whose handshake is under way."""
    if not isinstance(connection, TcpConnection):
        return
    current = type(connection)
    if "_open_class" in current.__dict__:
        return
    open_class = current if issubclass(current, WebSocketMethods) else websocket_class(current)
    connection.__class__ = _handshake_class(open_class)


# -- upgrade from http:// ---------------------------------------------------------------------
def upgrade(
    connection: TcpConnection,
    request: Request,
    *,
    on_message: Callable[..., Any] | None = None,
    on_close: Callable[..., Any] | None = None,
    on_websocket_connect: Callable[..., Any] | None = None,
    on_websocket_connected: Callable[..., Any] | None = None,
) -> bool:
    """Turn an ``http://`` connection into a WebSocket, from ``on_message(conn, request)``.

    ::

        def on_message(conn, request):
            if request.path == "/ws":
                upgrade(conn, request, on_message=on_chat_message)
                return
            conn.send("a page")

    Returns True when the connection was upgraded (the 101 was sent, or an async
    ``on_websocket_connect`` is deciding), False when the request was refused (the
    answer was sent and the connection closes). The callbacks given here replace the
    worker's for this connection; the worker's ``on_websocket_connect`` and
    ``on_websocket_connected`` apply unless given.
    """
    protocol = WebSocketProtocol(connection)
    if on_message is not None:
        connection.on_message = on_message
    if on_close is not None:
        connection.on_close = on_close
    if on_websocket_connect is not None:
        connection._websocket_connect_hook = on_websocket_connect  # type: ignore[attr-defined]
    if on_websocket_connected is not None:
        connection._websocket_connected_hook = on_websocket_connected  # type: ignore[attr-defined]
    handed_over = getattr(connection.protocol, "handed_over", None)
    if handed_over is not None:
        handed_over()
    connection.protocol = protocol
    try:
        protocol.accept(request)
    except ProtocolError as exc:
        connection._protocol_error(exc)
        return False
    return protocol._state != _CLOSED


# -- client ------------------------------------------------------------------------------------
class WebSocketClientProtocol(WebSocketProtocol):
    """Client side (``ws://host:port/path`` in :class:`~longshore.AsyncTcpConnection`).

    Sends masked frames, offers permessage-deflate (``compression``) and the
    ``subprotocols`` class attribute (or ``conn.websocket_subprotocols``), and calls the
    connection's ``on_connect`` once the server has accepted the handshake. A refused or
    broken handshake, a connection the server closes before answering, or a handshake it
    has not answered within ``handshake_timeout`` seconds
    (``conn.websocket_handshake_timeout``) is a failed connect, reported as a refused TCP
    connect is: once the socket is closed, ``on_error(conn, CONNECT_FAIL, message)`` and
    then ``on_close`` (never ``on_connect``). The application giving the attempt up
    (``close()``, ``destroy()``, ``reconnect()``) only gets ``on_close``. Extra request
    headers go in ``conn.websocket_headers`` (a dict).
    """

    scheme = "ws"
    client = True
    ping_interval = None
    idle_timeout = None
    #: The connection counts as established (``reconnect_attempts`` starts over) only
    #: once the server accepts the handshake, not when the TCP connection is made.
    connects_after_handshake: ClassVar[bool] = True

    __slots__ = ("_key", "_failure")

    def __init__(self, connection: Any) -> None:
        previous = getattr(connection, "_protocol", None)
        super().__init__(connection)
        self._key = base64.b64encode(os.urandom(16)).decode()
        #: Why the handshake failed, reported once the socket is closed.
        self._failure: str | None = None
        if isinstance(previous, WebSocketClientProtocol) and previous._held:
            self._held = previous._held  # frames sent between the constructor and connect()
            self._held_size = previous._held_size

    def _setting(self, name: str) -> Any:
        return getattr(self.connection, "websocket_" + name, getattr(type(self), name))

    def connection_made(self) -> bool:
        """Send the opening handshake; ``on_connect`` waits for the server's 101."""
        connection: Any = self.connection
        request = self.handshake_request()
        connection.transport.write(request)
        connection.bytes_written += len(request)
        _watch_handshake(self)  # the answer is awaited for handshake_timeout seconds
        return False

    def connection_closed(self) -> None:
        failure = self._failure
        if self._state == _HANDSHAKE:  # the server closed the connection before the 101
            failure = "the server closed the connection " + ("in the middle of its answer" if self._buffer else "before answering")
        self._give_up_handshake()
        super().connection_closed()
        if failure is not None:
            self._connect_failed(failure)

    def _connect_failed(self, reason: str) -> None:
        """Report a failed handshake (the socket is closed, ``on_close`` is next), as a
        failed TCP connect is: one more attempt for the reconnect backoff, ``connect_fail``
        and ``on_error(conn, CONNECT_FAIL, ...)``."""
        connection: Any = self.connection
        if hasattr(connection, "reconnect_attempts"):
            connection.reconnect_attempts += 1
        _stats.connect_fail += 1
        connection._emit_error(CONNECT_FAIL, f"websocket handshake with {connection.remote_url} failed: {reason}")

    def _give_up_handshake(self) -> None:
        """No 101 is awaited any more: the frames held for after it are dropped."""
        if self._state == _HANDSHAKE:
            self._state = _CLOSED
        self._held = None
        self._held_size = 0
        _watched.pop(self, None)

    def given_up(self) -> None:
        """The application cuts the connection (``destroy()``, ``reconnect()``) while the
        handshake is under way: not a failed connect, as ``close()`` while connecting is not."""
        if self._state == _HANDSHAKE:
            self._give_up_handshake()

    def _handshake_expired(self) -> None:
        self._refused(f"no answer to the handshake within {self._setting('handshake_timeout')} s")

    def handshake_request(self) -> bytes:
        """The opening handshake for this connection's URL."""
        connection: Any = self.connection
        parts = urlsplit(connection.remote_url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {parts.netloc}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {self._key}",
            "Sec-WebSocket-Version: 13",
        ]
        subprotocols = self._setting("subprotocols")
        if subprotocols:
            lines.append("Sec-WebSocket-Protocol: " + ", ".join(subprotocols))
        if self._setting("compression"):
            lines.append("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")
        for name, value in (getattr(connection, "websocket_headers", None) or {}).items():
            lines.append(f"{name}: {value}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def _feed_handshake(self, data: bytes) -> list[Any]:
        buffer = self._buffer
        if buffer is None:
            buffer = self._buffer = bytearray()
        buffer += data
        try:
            parsed = _take_head(buffer, HttpResponseParser, self._setting("max_header_size"))
        except _BadHead as exc:
            if exc.too_large:
                return self._refused("handshake response headers too large")
            return self._refused(f"malformed handshake response{_detail(exc)}")
        if parsed is None:
            return _EMPTY
        head, http = parsed
        status = http.get_status_code()
        headers = head.headers
        if status != 101:
            reason = head.reason.decode("latin-1")[:100]
            return self._refused(f"server answered HTTP {status} {reason}".rstrip())
        if (_header(headers, b"sec-websocket-accept") or "").strip() != accept_key(self._key):
            return self._refused("bad Sec-WebSocket-Accept")
        if "websocket" not in _tokens(_header(headers, b"upgrade")):
            return self._refused("no Upgrade: websocket in the answer")
        self.subprotocol = (_header(headers, b"sec-websocket-protocol") or "").strip() or None
        extensions = _header(headers, b"sec-websocket-extensions")
        if extensions:
            accepted = parse_extensions(extensions)
            if len(accepted) != 1 or accepted[0][0] != "permessage-deflate":
                return self._refused(f"unexpected extensions {extensions!r}")
            params = accepted[0][1]
            window = _window_bits(params.get("client_max_window_bits"))
            if window is None or "server_max_window_bits" in params and _window_bits(params["server_max_window_bits"]) is None:
                return self._refused(f"bad permessage-deflate parameters {extensions!r}")
            self._deflate_window = window
            self._inflater = None if "server_no_context_takeover" in params else zlib.decompressobj(-15)
        self.compress_min_size = self._setting("compress_min_size")
        self._state = _OPEN
        connection = self.connection
        if hasattr(connection, "reconnect_attempts"):
            connection.reconnect_attempts = 0  # established: the reconnect backoff starts over
        held = self._release_held(connection)
        if held:
            self._write(held)
        self._start_heartbeat()
        handler = connection._handlers.on_connect
        if handler is not None:
            connection._call(handler, "on_connect", connection)
        return self._after_open()

    def _refused(self, message: str) -> list[Any]:
        """The handshake failed: close the socket; ``message`` is reported once it is closed."""
        self._give_up_handshake()
        self._failure = message
        _close_socket(self.connection)
        return _EMPTY


__all__ = [
    "WebSocketClientProtocol",
    "WebSocketConnection",
    "WebSocketMethods",
    "WebSocketProtocol",
    "accept_key",
    "apply_mask",
    "check_close_code",
    "close_payload",
    "encode_frame",
    "negotiate_deflate",
    "upgrade",
    "websocket_class",
]
