"""``http://``: HTTP/1.1 (and 1.0) on top of ``httptools`` (llhttp).

Parsing is llhttp's job: it is fast, strict, and it already refuses what enables request
smuggling (``Content-Length`` together with ``Transfer-Encoding``, repeated
``Content-Length``). This module adds what a server needs around it, without doing I/O
itself except through its connection:

* one :class:`~.request.Request` per request, delivered in order; responses are matched
  to requests in the order they are sent, so pipelined requests get their answers in
  order;
* keep-alive (HTTP/1.1 by default, HTTP/1.0 with ``Connection: keep-alive``), and
  closing after the response when the client asked for ``Connection: close``;
* ``Expect: 100-continue`` (behind earlier pipelined answers, the ``100 Continue`` goes
  out when that request's turn comes, unless its body has started arriving), chunked
  request bodies, multipart bodies streamed to the upload parser as they arrive;
* limits: request line and headers over ``max_header_size`` (16 KiB) -> 431, a body over
  the connection's ``max_package_size`` -> 413, unparsable input -> 400, headers not
  complete within ``header_timeout`` seconds -> 408, no byte of a request body for
  ``body_timeout`` seconds -> 408. Each closes that connection only and is counted
  (``protocol_error`` / ``package_too_large``);
* idle keep-alive connections (every answer sent and written out, nothing received for
  ``keepalive_timeout`` seconds) are closed quietly;
* streamed responses (files, chunked bodies, Server-Sent Events). A file is read in
  pieces only as fast as the client takes them: the connection tells the protocol when
  its send buffer is full and when it has drained, and the protocol stops and resumes
  reading the file accordingly, so memory stays bounded whatever the file size.

The hot path (a small request, a ``str`` or ``bytes`` answer) builds the response from
pre-encoded header bytes and a ``Date`` line refreshed once a second. The timeouts cost
it nothing either: the same once-a-second tick looks at every open connection's state
and byte counters instead of arming a timer per request.
"""

from __future__ import annotations

import asyncio
import collections
import mimetypes
import os
import re
import stat
import sys
import time
from email.utils import formatdate, parsedate_to_datetime
from typing import Any

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from ...connection.tcp import PAUSED_BY_PROTOCOL
from ...errors import PackageTooLarge, ProtocolError
from ...stats import process_stats
from ..base import Protocol
from .request import FORM_URLENCODED, Request, media_type
from .response import Chunk, EventStream, FileResponse, Response, ServerSentEvent, STATUS_LINES
from .uploads import MultipartReader

_EMPTY: list[Any] = []


def _error_response(status: int, extra: bytes = b"") -> bytes:
    body = STATUS_LINES[status][9:].decode().strip().encode() + b"\n"
    return (
        STATUS_LINES[status]
        + b"Server: longshore\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
        + extra
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


BAD_REQUEST = _error_response(400)
REQUEST_TIMEOUT = _error_response(408)
PAYLOAD_TOO_LARGE = _error_response(413)
NOT_IMPLEMENTED = _error_response(501)
HEADERS_TOO_LARGE = _error_response(431)
INTERNAL_ERROR = _error_response(500)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

_SERVER = b"Server: longshore\r\n"
_TEXT_HEAD = b"HTTP/1.1 200 OK\r\nServer: longshore\r\nContent-Type: text/html; charset=utf-8\r\n"
_CONTENT_LENGTHS = [b"Content-Length: %d\r\n\r\n" % n for n in range(1024)]
_CLOSE = b"Connection: close\r\n"
_KEEP_ALIVE = b"Connection: keep-alive\r\n"
_CHUNKED = b"Transfer-Encoding: chunked\r\n"

# Stream states of a connection whose response is still being sent.
_STREAM_CHUNKED = "chunked"  # Chunk objects, framed as HTTP chunks
_STREAM_UNFRAMED = "unframed"  # Chunk objects to an HTTP/1.0 client: raw, the end closes
_STREAM_DISCARD = "discard"  # Chunk objects after a HEAD request: nothing is sent
_STREAM_EVENTS = "events"  # Server-Sent Events until the connection closes
_ABANDONED = object()  # held after a failed handler's unfinished stream: close there

# -- the once-a-second tick: the Date header, late headers, slow bodies, idle keep-alive --
_date_line = b"Date: " + formatdate(usegmt=True).encode() + b"\r\n"
#: Protocols that are waiting for the rest of a request's headers, and since when.
_waiting: dict[HttpProtocol, float] = {}
#: Every open connection's protocol: the tick watches request bodies and idle keep-alive.
_open: set[HttpProtocol] = set()
_tick_handle: asyncio.TimerHandle | None = None


def _tick() -> None:
    global _date_line, _tick_handle
    _date_line = b"Date: " + formatdate(usegmt=True).encode() + b"\r\n"
    if _waiting:
        now = time.monotonic()
        for protocol, since in list(_waiting.items()):
            if protocol.connection.closed:
                _waiting.pop(protocol, None)
            elif now - since >= protocol.header_timeout:
                _waiting.pop(protocol, None)
                protocol._headers_timed_out()
    if _open:
        now = time.monotonic()
        for protocol in list(_open):
            if not protocol._watch(now):
                _open.discard(protocol)
    try:
        _tick_handle = asyncio.get_running_loop().call_later(1.0, _tick)
    except RuntimeError:
        _tick_handle = None


def _start_tick() -> None:
    global _tick_handle
    try:
        _tick_handle = asyncio.get_running_loop().call_later(1.0, _tick)
    except RuntimeError:  # no loop yet: the next connection made in a running loop starts it
        pass


def _content_length(size: int) -> bytes:
    return _CONTENT_LENGTHS[size] if size < 1024 else b"Content-Length: %d\r\n\r\n" % size


class HttpProtocol(Protocol):
    """HTTP/1.1 server protocol: ``feed`` gives :class:`Request` objects, ``encode`` takes
    responses (``str``, ``bytes``, :class:`Response` and its kinds).

    Class attributes to tune (set them in the start script, on this class or a subclass):

    * ``max_header_size`` (16 KiB): request line and headers; more gets 431.
    * ``header_timeout`` (10 s): a request's headers must be complete this long after
      its first byte (after the connection opened, for the first request); else 408.
      When earlier pipelined answers are still owed or being written, they go out whole
      first and the connection then closes without a 408 (nothing is cut short).
    * ``body_timeout`` (30 s): while a request body is due, a gap this long without a
      byte of it gets 408 (the time between two reads, not the whole upload; the clock
      stops while the server itself is not reading or still owes earlier answers).
    * ``keepalive_timeout`` (15 s): a connection with every answer sent and written out
      that receives nothing for this long is closed, without an answer. A response still
      being sent (a file, a chunked body, Server-Sent Events) keeps it open, and a
      connection upgraded to WebSocket follows the WebSocket settings instead.
    * ``max_owed_answers`` (32): while more answers than this are owed (pipelined
      requests whose handlers have not answered yet, or answers held behind a response
      still being streamed), the connection reads nothing more; it reads again once they
      have gone out. It also reads nothing while its send buffer is full (the requests
      already read wait unhandled until it has drained), so pipelined answers are never
      dropped for a full buffer.
    * ``max_form_fields`` (1000): a form body (urlencoded, or multipart counting files)
      with more fields than this gets 413, before the application sees it; 0 or None
      turns the limit off.
    * ``upload_memory_limit`` (1 MiB held in memory per uploaded file before it goes
      to a temporary file), ``upload_dir`` (None: the system's temporary folder),
      ``file_chunk_size`` (128 KiB).

    ``body_timeout`` and ``keepalive_timeout`` are checked once a second, so a
    connection goes up to a second after its time; 0 (or None) turns either off.
    """

    scheme = "http"

    max_header_size = 16 * 1024
    header_timeout = 10.0
    body_timeout: float | None = 30.0
    keepalive_timeout: float | None = 15.0
    upload_memory_limit = 1024 * 1024
    upload_dir: str | None = None
    file_chunk_size = 128 * 1024
    max_form_fields: int | None = 1000
    max_owed_answers = 32

    __slots__ = (
        "_parser",
        "_out",
        "_url",
        "_headers",
        "_header_size",
        "_partial_size",
        "_in_headers",
        "_waiting_since",
        "_request",
        "_body",
        "_body_size",
        "_content_type",
        "_expect",
        "_multipart",
        "_pending",
        "_closing",
        "_error",
        "_stream",
        "_stream_request",
        "_held",
        "_paused",
        "_stream_close_after",
        "_deferred_error",
        "_continue_for",
        "_turn_waits",
        "_graceful",
        "_seen_read",
        "_quiet_since",
        "_final_answer",
        "_trailers",
        "_trailing",
        "_input_paused",
        "_reading_stopped",
        "_upgrade",
    )

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self._parser = HttpRequestParser(self)
        self._out: list[Request] = _EMPTY
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_size = 0
        self._partial_size = 0
        self._in_headers = False
        self._request: Request | None = None
        self._body: list[bytes] | None = None
        self._body_size = 0
        self._content_type: bytes | None = None
        self._expect = False
        self._multipart: MultipartReader | None = None
        self._pending: collections.deque[Request] = collections.deque()
        self._closing = False
        self._error: ProtocolError | None = None
        self._stream: Any = None
        self._stream_request: Request | None = None  # whose chunked answer the stream is
        self._held: list[tuple[Any, Request | None]] | None = None
        self._paused = False
        self._stream_close_after = False
        self._deferred_error: ProtocolError | None = None
        self._continue_for: Request | None = None
        self._turn_waits = False
        self._graceful = False
        self._seen_read = 0
        self._quiet_since = 0.0
        self._final_answer: bytes | None = None
        self._trailers: list[tuple[bytes, bytes]] | None = None
        self._trailing = False
        self._input_paused = False  # this protocol holds the connection's input (_hold_input) until drained
        self._reading_stopped = False  # this protocol stopped the socket reads only
        self._upgrade = False
        # Waiting for the first request's headers starts now.
        self._waiting_since = time.monotonic()
        _waiting[self] = self._waiting_since
        _open.add(self)
        if _tick_handle is None:
            _start_tick()

    def buffered(self) -> int:
        return self._partial_size + self._body_size

    # -- input ---------------------------------------------------------------------------
    def feed(self, data: bytes) -> list[Any]:
        if self._closing:
            if not self._upgrade and self._owed():
                self._stop_reading()  # what comes now is ignored: no need to read it
            return _EMPTY
        pending = self._pending
        if pending and len(pending) >= self.max_owed_answers:
            # Answers owed to earlier reads (handlers that answer later): this read is
            # taken, the next waits until they have all been sent.
            self._stop_reading()
            self._turn_waits = True
        out: list[Request] = []
        self._out = out
        started_in_headers = self._in_headers
        headers = self._headers
        started_trailing = self._trailing
        body_before = self._body_size
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade:
            # An Upgrade (or CONNECT) request is answered like any other; what follows it
            # is not HTTP, so the connection closes after the answer.
            if out:
                out[-1].keep_alive = False
            self._closing = True
            self._upgrade = True
        except HttpParserError as exc:
            error = self._error or ProtocolError(f"malformed request: {exc}", response=BAD_REQUEST)
            self._error = None
            if self._closing:  # bytes after a request that closes the connection: ignored
                return out
            return self._fail(error, out)
        if self._in_headers:
            # What the parser holds of a request whose headers are incomplete (a line it has
            # not passed on yet) counts against max_header_size: every byte of each read
            # that went on with the same request, and of the read in which it began only
            # its last, incomplete line (the complete lines and the requests before it in
            # that read were counted as they were parsed).
            if started_in_headers and self._headers is headers:
                self._partial_size += len(data)
            else:
                self._partial_size = len(data) - data.rfind(b"\n") - 1
            if self._partial_size > self.max_header_size:
                return self._fail(ProtocolError("request headers too large", response=HEADERS_TOO_LARGE), out)
            if not self._waiting_since:
                self._waiting_since = time.monotonic()
                _waiting[self] = self._waiting_since
        elif self._trailing:
            # trailer fields still incomplete: httptools holds them until their line ends
            # (of the read in which the trailer section began, only its last line counts)
            if started_trailing and self._body_size == body_before:  # no chunk data in this read
                self._partial_size += len(data)
            else:
                self._partial_size = len(data) - data.rfind(b"\n") - 1
            if self._partial_size > self.max_header_size:
                return self._fail(ProtocolError("request trailers too large", response=HEADERS_TOO_LARGE), out)
        self._out = _EMPTY  # the requests are the application's now
        return out

    def _fail(self, error: ProtocolError, out: list[Request]) -> list[Request]:
        """Raise ``error``, or (when requests were parsed before it) deliver those first."""
        if not out:
            raise error
        self._closing = True
        asyncio.get_running_loop().call_soon(self._fail_later, error)
        return out

    def _fail_later(self, error: ProtocolError) -> None:
        if self._owed():  # answers still due or being sent: the error follows the last of them
            self._deferred_error = error
            self._turn_waits = True
            return
        connection = self.connection
        if not connection.closed:
            connection._protocol_error(error)

    def _owed(self) -> bool:
        """Whether an earlier answer is still due, being streamed, or held behind a stream."""
        return bool(self._pending) or self._stream is not None or bool(self._held)

    def _turn_came(self) -> None:
        """Every answer owed so far has been sent (it may still be in the send buffer):
        what waited for that happens now, a deferred error or a ``100 Continue``.

        Called soon after each point where that may have become true: the last owed answer
        encoded, a stream ended, the answers held behind it released. When another stream
        has started meanwhile, its end calls again.
        """
        if not self._turn_waits or self._owed():
            return
        self._turn_waits = False
        request, self._continue_for = self._continue_for, None
        error, self._deferred_error = self._deferred_error, None
        final, self._final_answer = self._final_answer, None
        connection = self.connection
        if connection.closed:
            return
        if not self._closing or self._upgrade:
            self._resume_reading()
        if final is not None:  # a failed request's 500: the last answer on this connection
            connection._write_ignoring_limit(final)
            if error is not None:  # bytes after it were bad too: counted, without an answer of its own
                error.response = None
                connection._protocol_error(error)
            connection.close()
        elif error is not None:
            connection._protocol_error(error)
        elif request is not None and request is self._request and not self._body_size and not self._closing:
            # the request waiting for its body is next to be answered, and the client
            # still waits for the go-ahead
            connection.send(CONTINUE, raw=True)

    def _headers_timed_out(self) -> None:
        """``header_timeout`` passed with a request's headers incomplete: 408, and close.

        When earlier pipelined answers are still owed or being written (a handler still
        working, a file going out to a slow reader), a 408 now would land inside them and
        cut a response short. Then the incomplete request is dropped instead: the owed
        answers are sent in full and the connection closes after the last of them,
        without a 408, like a keep-alive connection closing (clients retry a request that
        got no answer). Either way the timeout is counted as a protocol error.
        """
        self._waiting_since = 0.0
        connection = self.connection
        if connection.closed or self._closing:
            return  # already on its way out, after the answers owed
        self._closing = True
        message = f"request headers not received within {self.header_timeout:g} s"
        if self._owed():
            self._deferred_error = ProtocolError(message)
            self._turn_waits = True
            return
        connection._protocol_error(ProtocolError(message, response=REQUEST_TIMEOUT))

    def _watch(self, now: float) -> bool:
        """Once a second, from the tick: cut a stalled request body or an idle keep-alive
        connection. False when this protocol no longer needs watching.

        ``_quiet_since`` is when the tick first saw the connection quiet (no new bytes
        read, no answer due or being written), 0 while it is not. Counting from that
        tick rather than from the last byte means a connection is never cut early, at
        most a second late.
        """
        connection = self.connection
        if connection.closed or getattr(connection, "_protocol", None) is not self:
            return False  # closed, or upgraded to another protocol (WebSocket) that has its own rules
        read = connection.bytes_read
        if read != self._seen_read:
            self._seen_read = read
            self._quiet_since = now
            return True
        if self._closing or self._waiting_since or self._pending or self._stream is not None or connection._recv_paused or connection._serial_paused or connection.send_buffer_size:
            # on its way out, headers on their way (header_timeout's business), an answer
            # still due or being written, or the server itself not reading: not quiet
            self._quiet_since = 0.0
            return True
        if not self._quiet_since:
            self._quiet_since = now
            return True
        if self._request is not None:  # headers received, the body is late
            limit = self.body_timeout
            if limit and now - self._quiet_since >= limit:
                self._body_timed_out()
                return False
        else:
            limit = self.keepalive_timeout
            if limit and now - self._quiet_since >= limit:
                self._closing = True
                connection.close()
                return False
        return True

    def _body_timed_out(self) -> None:
        self._closing = True
        self._request = None
        self._body = None
        self._drop_upload()
        self.connection._protocol_error(ProtocolError(f"no request body received for {self.body_timeout:g} s", response=REQUEST_TIMEOUT))

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._in_headers = True
        self._url = b""
        self._headers = []
        self._header_size = 0
        self._partial_size = 0
        self._content_type = None
        self._expect = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_size += len(url)
        if self._header_size > self.max_header_size:
            self._error = ProtocolError("request line too long", response=HEADERS_TOO_LARGE)
            raise self._error

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._request is not None:  # after a chunked body: a trailer field
            self._on_trailer(name, value)
            return
        self._headers.append((name, value))
        self._header_size += len(name) + len(value) + 4
        if self._header_size > self.max_header_size:
            self._error = ProtocolError("request headers too large", response=HEADERS_TOO_LARGE)
            raise self._error
        size = len(name)
        if size == 12 and name.lower() == b"content-type":
            if self._content_type is not None:
                # a singleton field (RFC 9110, 5.3): the limits and the application could
                # each go by a different one
                self._error = ProtocolError("more than one Content-Type header", response=BAD_REQUEST)
                raise self._error
            self._content_type = value
        elif size == 6 and name.lower() == b"expect":
            if value.lower() != b"100-continue":
                self._error = ProtocolError("unsupported expectation", response=_error_response(417))
                raise self._error
            self._expect = True
        elif size == 14 and name.lower() == b"content-length":
            limit = self.connection.max_package_size
            if value.isdigit() and int(value) > limit:
                self._error = PackageTooLarge(f"request body of {int(value)} bytes is larger than {limit}", response=PAYLOAD_TOO_LARGE)
                raise self._error
        elif size == 17 and name.lower() == b"transfer-encoding" and value.strip().lower() != b"chunked":
            # llhttp refuses codings after 'chunked'; one before it ('gzip, chunked') it
            # would pass on undecoded: unsupported, and a framing others may read otherwise
            self._error = ProtocolError("unsupported transfer coding", response=NOT_IMPLEMENTED)
            raise self._error

    def _on_trailer(self, name: bytes, value: bytes) -> None:
        """A trailer field goes to ``request.trailers``, never among the headers: it came
        after the body, after whatever checked the headers had seen them."""
        self._header_size += len(name) + len(value) + 4
        if self._header_size > self.max_header_size:
            self._error = ProtocolError("request trailers too large", response=HEADERS_TOO_LARGE)
            raise self._error
        if self._trailers is None:
            self._trailers = [(name, value)]
        else:
            self._trailers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_headers = False
        if self._waiting_since:
            self._waiting_since = 0.0
            _waiting.pop(self, None)
        parser = self._parser
        version = parser.get_http_version()
        self._request = Request(self.connection, parser.get_method(), self._url, self._headers, version, parser.should_keep_alive())
        if version == "1.0":
            self._http_10(self._request)
        content_type = self._content_type
        if content_type is not None and media_type(content_type.decode("latin-1")) == "multipart/form-data":
            try:
                self._multipart = MultipartReader(content_type, self.upload_memory_limit, self.upload_dir)
            except ProtocolError as exc:
                self._error = ProtocolError(str(exc), response=BAD_REQUEST)
                raise self._error from None
        if self._expect:
            if self._owed():  # earlier answers first: the 100 goes out when this one's turn comes
                self._continue_for = self._request
                self._turn_waits = True
            else:
                self.connection.send(CONTINUE, raw=True)

    def _http_10(self, request: Request) -> None:
        """An HTTP/1.0 request with ``Transfer-Encoding`` has a framing an HTTP/1.0 hop
        may read otherwise (RFC 9112, section 6.1): it is answered, then the connection
        closes. Its ``Expect: 100-continue`` is ignored (RFC 9110, section 10.1.1): an
        HTTP/1.0 client does not wait for a ``100 Continue``, nor understand one."""
        self._expect = False
        for name, _ in self._headers:
            if len(name) == 17 and name.lower() == b"transfer-encoding":
                request.keep_alive = False
                break

    def on_chunk_header(self) -> None:
        # What follows is the chunk's data, or (after the last, empty chunk) the trailer
        # section; its size counts from here against max_header_size.
        self._trailing = True
        self._header_size = 0
        self._partial_size = 0

    def on_chunk_complete(self) -> None:
        self._trailing = False

    def on_body(self, body: bytes) -> None:
        self._trailing = False
        self._body_size += len(body)
        limit = self.connection.max_package_size
        if self._body_size > limit:
            self._error = PackageTooLarge(f"request body larger than {limit} bytes", response=PAYLOAD_TOO_LARGE)
            raise self._error
        multipart = self._multipart
        if multipart is not None:
            try:
                multipart.write(body)
            except ProtocolError as exc:
                self._error = ProtocolError(str(exc), response=BAD_REQUEST)
                raise self._error from None
            field_limit = self.max_form_fields
            if field_limit and len(multipart.fields) + len(multipart.files) > field_limit:
                self._too_many_fields(field_limit)
            return
        if self._body is None:
            self._body = [body]
        else:
            self._body.append(body)

    def _too_many_fields(self, limit: int) -> None:
        """A form body with more than ``max_form_fields`` fields: 413 (parsing them all
        would cost the worker time and memory out of proportion)."""
        self._error = PackageTooLarge(f"form with more than {limit} fields", response=PAYLOAD_TOO_LARGE)
        raise self._error

    def on_message_complete(self) -> None:
        request = self._request
        if request is None or self._closing:
            return
        self._request = None
        body = self._body
        if body is not None:
            request.body = body[0] if len(body) == 1 else b"".join(body)
            self._body = None
            content_type = self._content_type
            limit = self.max_form_fields
            if limit and content_type is not None and request.body.count(b"&") >= limit and media_type(content_type.decode("latin-1")) == FORM_URLENCODED:
                self._too_many_fields(limit)
        if self._trailers is not None:
            request.raw_trailers = self._trailers
            self._trailers = None
            if request.keep_alive and not self._parser.should_keep_alive():
                # llhttp heeds a trailer 'Connection: close' and would take what follows
                # for garbage: close after this answer instead
                request.keep_alive = False
        self._body_size = 0
        multipart = self._multipart
        if multipart is not None:
            self._multipart = None
            try:
                multipart.finish()
            except ProtocolError as exc:
                multipart.close()
                self._error = ProtocolError(str(exc), response=BAD_REQUEST)
                raise self._error from None
            from .request import MultiDict

            request._form = MultiDict(multipart.fields)
            request._files = MultiDict(multipart.files)
        if self._graceful:
            request.keep_alive = False
        self._out.append(request)
        self._pending.append(request)
        if not request.keep_alive:
            self._closing = True

    # -- output --------------------------------------------------------------------------
    def encode(self, message: Any) -> bytes:
        if self._stream is not None:
            return self._encode_in_stream(message)
        pending = self._pending
        request = pending.popleft() if pending else None
        if self._turn_waits and not pending:
            asyncio.get_running_loop().call_soon(self._turn_came)
        cls = type(message)
        if (cls is str or cls is bytes) and request is not None and request.keep_alive and request._session is None and request.version == "1.1" and request.method != "HEAD":
            body = message.encode() if cls is str else message
            return b"".join((_TEXT_HEAD, _date_line, _content_length(len(body)), body))
        try:
            return self._encode_for(message, request)
        except BaseException:
            # Nothing was sent (a header value that is not Latin-1, say): the request is
            # still the next to be answered.
            if request is not None:
                pending.appendleft(request)
            raise

    def _encode_for(self, message: Any, request: Request | None) -> bytes:
        if isinstance(message, Response):
            return self._encode_response(message, request)
        if isinstance(message, (str, bytes, bytearray, memoryview)):
            return self._encode_response(Response(message if isinstance(message, str) else bytes(message)), request)
        raise TypeError(f"an HTTP connection sends str, bytes or a Response, not {type(message).__name__}")

    def _schedule_close(self) -> None:
        self._closing = True
        asyncio.get_running_loop().call_soon(self._close_now)

    def _close_now(self) -> None:
        self.connection.close()

    def _encode_response(self, response: Response, request: Request | None, extra: list[bytes] | None = None) -> bytes:
        """``extra``: the header lines built already (a file's answer that turned into a
        404, 412, 416 or 304 keeps them, with the session cookie that is sent only once)."""
        keep_alive = request.keep_alive if request is not None else not self._closing
        head_only = request is not None and request.method == "HEAD"
        if extra is None:
            extra = [_SERVER, _date_line]
            if request is not None and request._session is not None:
                cookie = request._session._cookie_header()
                if cookie:
                    extra.append(cookie)
        if keep_alive and response.headers:
            value = response.get_header("connection")
            if value is not None and value.lower() == "close":
                keep_alive = False
        if isinstance(response, FileResponse):
            return self._start_file(response, request, keep_alive, head_only, extra)
        # The framing headers are the server's (Response.head_bytes leaves out the
        # application's); an application's 'Connection: close' closes after this answer.
        if not keep_alive:
            extra.append(_CLOSE)
        elif request is not None and request.version == "1.0":
            extra.append(_KEEP_ALIVE)
        status = response.status
        # (The head is made before any state changes: making it may raise.)
        if isinstance(response, EventStream):
            # The events follow until the connection closes: nothing else may follow them.
            head = response.head_bytes(b"".join(extra)) + b"\r\n"
            self._stream = _STREAM_EVENTS
            self._closing = True
            return head
        if response.chunked:
            if head_only:
                stream = _STREAM_DISCARD
            elif request is not None and request.version == "1.0":
                stream = _STREAM_UNFRAMED
                if keep_alive:  # the body's end is the connection's end
                    extra[-1:] = [_CLOSE] if extra[-1] is _KEEP_ALIVE else [extra[-1], _CLOSE]
                keep_alive = False
            else:
                stream = _STREAM_CHUNKED
                extra.append(_CHUNKED)
            head = response.head_bytes(b"".join(extra)) + b"\r\n"
            self._stream = stream
            self._stream_request = request
            self._stream_close_after = not keep_alive
            if response.body:
                head += self._encode_in_stream(Chunk(response.body))
            return head
        body = response.body
        if status < 200 or status == 204 or status == 304:
            head = response.head_bytes(b"".join(extra)) + b"\r\n"
        else:
            head = response.head_bytes(b"".join(extra)) + _content_length(len(body))
            if not head_only:
                head += body
        if not keep_alive:
            self._schedule_close()
        return head

    def _encode_in_stream(self, message: Any) -> bytes:
        stream = self._stream
        cls = type(message)
        if cls is Chunk and stream is not _STREAM_EVENTS and stream.__class__ is str:
            data = message.data
            if not data:
                self._end_stream(self._stream_close_after)
                return b"0\r\n\r\n" if stream is _STREAM_CHUNKED else b""
            if stream is _STREAM_CHUNKED:
                return b"%x\r\n%b\r\n" % (len(data), data)
            return data if stream is _STREAM_UNFRAMED else b""
        if stream is _STREAM_EVENTS:
            if cls is ServerSentEvent:
                return message.encode()
            if cls is str:
                return ServerSentEvent(message).encode()
        # A response to a later request (or its chunks): it waits until this stream has ended.
        request = None
        if cls is not Chunk and cls is not ServerSentEvent:
            pending = self._pending
            request = pending.popleft() if pending else None
        held = self._held
        if held is None:
            held = self._held = []
        held.append((message, request))
        if len(held) >= self.max_owed_answers:
            self._pause_input()  # _release_held() resumes
        return b""

    def _end_stream(self, close_after: bool) -> None:
        self._stream = None
        self._stream_request = None
        loop = asyncio.get_running_loop()
        if close_after:
            self._closing = True
            loop.call_soon(self._close_now)
        elif self._held:
            loop.call_soon(self._release_held)
        elif self._turn_waits:
            loop.call_soon(self._turn_came)

    def _release_held(self) -> None:
        held = self._held
        connection = self.connection
        while held and not connection.closed:
            if self._paused:
                return  # the send buffer is full: send_buffer_drained() goes on
            message, request = held[0]
            if message is _ABANDONED:  # a failed handler's stream, unfinished, went out
                held.clear()
                self._closing = True
                connection.close()
                return
            stream = self._stream
            cls = type(message)
            if cls is Chunk or cls is ServerSentEvent:
                if stream is None or stream.__class__ is _FilePump:
                    if stream is None:
                        held.pop(0)  # a chunk with no chunked response to belong to
                        continue
                    return  # behind a file that is still being sent
                held.pop(0)
                connection.send(self._encode_in_stream(message), raw=True)
            else:
                if stream is not None:
                    return  # the next response waits for this stream's end
                held.pop(0)
                try:
                    data = self._encode_for(message, request)
                except Exception:
                    from ...connection.tcp import report_exception

                    report_exception("an HTTP response", connection)
                    held.clear()  # this request gets a 500, and is the last answered
                    self._closing = True
                    connection._write_ignoring_limit(INTERNAL_ERROR)
                    connection.close()
                    return
                connection.send(data, raw=True)
        self._resume_input()
        if self._turn_waits:
            self._turn_came()

    # -- files -----------------------------------------------------------------------------
    def _start_file(self, response: FileResponse, request: Request | None, keep_alive: bool, head_only: bool, extra: list[bytes]) -> bytes:
        path = response.resolved_path()
        opened = _open_file(path) if path is not None else None
        if opened is None:
            return self._encode_response(Response("Not Found\n", 404, content_type="text/plain; charset=utf-8"), request, extra)
        file, info = opened
        try:
            size = info.st_size
            modified = int(info.st_mtime)
            headers = list(response.headers)
            names = {name.lower() for name, _ in headers}
            if "content-type" not in names:
                content_type = response.content_type or mimetypes.guess_type(response.download_name or response.path)[0] or "application/octet-stream"
                if content_type.startswith("text/") and "charset" not in content_type:
                    content_type += "; charset=utf-8"
                headers.append(("Content-Type", content_type))
            headers.append(("Last-Modified", formatdate(modified, usegmt=True)))
            if "etag" in names:
                etag = response.get_header("etag") or ""
            else:
                etag = f'"{info.st_mtime_ns:x}-{size:x}"'
                headers.append(("ETag", etag))
            headers.append(("Accept-Ranges", "bytes"))
            if response.download_name:
                from urllib.parse import quote

                headers.append(("Content-Disposition", f"attachment; filename*=UTF-8''{quote(response.download_name)}"))
            status = response.status
            start, length = 0, size
            if request is not None and status == 200:
                verdict = _preconditions(request, etag, modified)
                if verdict:
                    file.close()
                    if verdict == 304:
                        return self._encode_response(Response(b"", 304, headers=[h for h in headers if h[0] != "Content-Type"]), request, extra)
                    return self._encode_response(Response("Precondition Failed\n", 412, content_type="text/plain; charset=utf-8"), request, extra)
                ranges = request.headers.get("range") if request.method == "GET" else None
                if ranges is not None and _range_applies(request.headers.get("if-range"), etag, modified):
                    wanted = _parse_range(ranges, size)
                    if wanted is None:
                        file.close()
                        answer = Response(b"", 416, headers=[("Content-Range", f"bytes */{size}")])
                        return self._encode_response(answer, request, extra)
                    if wanted != (0, size):
                        start, length = wanted
                        status = 206
                        headers.append(("Content-Range", f"bytes {start}-{start + length - 1}/{size}"))
            head_response = Response(b"", status, headers)
            if not keep_alive:
                extra.append(_CLOSE)
            elif request is not None and request.version == "1.0":
                extra.append(_KEEP_ALIVE)
            head = head_response.head_bytes(b"".join(extra)) + _content_length(length)
            if head_only or length == 0 or length <= self.file_chunk_size:
                if not head_only and length:
                    file.seek(start)
                    head += file.read(length)
                file.close()
                if not keep_alive:
                    self._schedule_close()
                return head
            file.seek(start)
        except BaseException:
            file.close()
            raise
        pump = _FilePump(self, file, length, not keep_alive)
        self._stream = pump
        asyncio.get_running_loop().call_soon(pump.run)
        return head

    # -- flow control, from the connection ----------------------------------------------------
    def send_buffer_full(self) -> None:
        """The connection's send buffer reached its limit: stop producing, and take no
        new requests (those already read wait unhandled) until it has drained."""
        self._paused = True
        self._pause_input()

    def send_buffer_drained(self) -> None:
        """The connection's send buffer has been written out: produce again."""
        self._paused = False
        stream = self._stream
        if stream is not None and stream.__class__ is _FilePump and not stream.scheduled:
            stream.run()
        elif stream is None and self._held:
            self._release_held()
        self._resume_input()

    def send_dropped(self) -> None:
        """A send was dropped (the send buffer was full; ``send_fail`` and ``on_error``
        have seen it): an answer, or a piece of one, is lost. The client would take the
        next answer for the lost one, so the connection closes instead (after what its
        send buffer holds); the requests not answered yet get no answer."""
        self._closing = True
        self.connection.close()

    def _pause_input(self) -> None:
        """Read no more and hand no more requests to the application until
        :meth:`_resume_input` (the application's own ``pause_recv()``/``resume_recv()``
        neither lifts this nor is lifted by it)."""
        connection = self.connection
        if self._input_paused or connection.closed or connection._recv_paused & PAUSED_BY_PROTOCOL:
            return  # paused already (for good, when a failed request closes the connection)
        self._input_paused = True
        connection._hold_input()

    def _resume_input(self) -> None:
        """Undo :meth:`_pause_input` once the send buffer has room and few answers are held."""
        if not self._input_paused or self._paused or (self._held and len(self._held) >= self.max_owed_answers):
            return
        self._input_paused = False
        connection = self.connection
        if not connection.closed:
            connection._release_input()

    def handed_over(self) -> None:
        """Another protocol takes the connection over (a WebSocket upgrade): the answers
        still owed here will never be counted down, and this protocol will not hear of
        the send buffer's drain, so reading no longer waits for either."""
        self._resume_reading()
        if self._input_paused:
            self._input_paused = False
            if not self.connection.closed:
                self.connection._release_input()

    def _resume_reading(self) -> None:
        """Undo :meth:`_stop_reading` (unless the application or the coroutine queue
        holds reading paused for reasons of their own)."""
        if self._reading_stopped:
            self._reading_stopped = False
            connection = self.connection
            if not connection.closed and not connection._recv_paused and not connection._serial_paused:
                connection.transport.resume_reading()  # type: ignore[union-attr]

    def _stop_reading(self) -> None:
        """Stop the socket reads only (requests already read are still handled); reading
        resumes when every answer owed has been sent (:meth:`_turn_came`)."""
        connection = self.connection
        if not connection.closed:
            self._reading_stopped = True
            connection.transport.pause_reading()  # type: ignore[union-attr]

    def graceful_close(self) -> None:
        """The worker stops gracefully: close now if idle, else after the answer due."""
        self._graceful = True
        connection = self.connection
        stream = self._stream
        if stream is _STREAM_EVENTS:
            connection.close()  # an event stream has no end to wait for
            return
        if self._pending:
            self._pending[-1].keep_alive = False
            self._closing = True
        elif stream is not None:
            if not self._last_held_closes():
                if stream.__class__ is _FilePump:
                    stream.close_after = True
                else:
                    self._stream_close_after = True
            self._closing = True
        elif connection.bytes_written == 0:
            pass  # accepted just before the listener closed: its first request is on its way
        elif not self._in_headers and self._request is None:  # not amid a request (its body may still be coming)
            self._closing = True
            connection.close()

    def message_failed(self, message: Any) -> None:
        """``on_message`` raised on the request ``message`` (or its coroutine did, or a
        ``send()`` of its answer raised) before it was answered.

        It gets a ``500`` with ``Connection: close`` in its place (a ``413`` when the
        handler failed on a request over a limit, see :meth:`_failure_answer`): after the answers
        still owed to the requests before it, which go out whole first. The requests
        after it get no answer (their handlers are not called while the connection waits
        for its turn; clients send such requests again), and the connection closes after
        the 500. A request that had been answered before its handler raised is left be,
        unless its answer is a chunked body not ended yet (:meth:`_abandon_stream`).
        """
        connection = self.connection
        pending = self._pending
        if connection.closed:
            return
        if not any(request is message for request in pending):
            self._abandon_stream(message)
            return
        self._closing = True
        while pending.pop() is not message:
            pass  # the requests after it: never answered
        connection._hold_input()  # their handlers wait (for good: the connection closes)
        self._input_paused = False  # ... whatever drains, and whatever the application resumes
        self._final_answer = self._failure_answer()
        self._turn_waits = True
        self._turn_came()

    @staticmethod
    def _failure_answer() -> bytes:
        """What a failed handler's request gets: a 500, or a 413 (counted as
        ``package_too_large``) when the exception is the one ``request.form`` raises for
        too many fields. ``message_failed`` is called while that exception is handled."""
        exc = sys.exc_info()[1]
        if isinstance(exc, PackageTooLarge) and exc.response is PAYLOAD_TOO_LARGE:
            process_stats.package_too_large += 1
            return PAYLOAD_TOO_LARGE
        return INTERNAL_ERROR

    def _abandon_stream(self, message: Any) -> None:
        """The handler of ``message`` raised after it started a chunked answer, and never
        sent its end (``Chunk(b"")``), so nothing would ever end it: the connection closes
        after what was sent of it (its chunks still held behind an earlier stream go out
        first). No last chunk is sent: the client sees a body cut short, not a whole one.
        The requests after it get no answer."""
        stream = self._stream
        if message is self._stream_request and stream.__class__ is str and stream is not _STREAM_EVENTS:
            self._closing = True
            self.connection.close()
            return
        held = self._held
        if not held:
            return
        for index, (answer, request) in enumerate(held):
            if request is message:
                if isinstance(answer, Response) and answer.chunked and not isinstance(answer, (FileResponse, EventStream)):
                    break
                return  # an answer that ends by itself
        else:
            return
        end = index + 1
        while end < len(held) and type(held[end][0]) is Chunk:
            if not held[end][0].data:
                return  # it was ended before the handler raised
            end += 1
        del held[end:]
        held.append((_ABANDONED, None))
        self._closing = True
        self._pending.clear()  # the requests after it: never answered
        self.connection._hold_input()  # their handlers wait (for good: the connection closes)
        self._input_paused = False

    def _last_held_closes(self) -> bool:
        """Make the last answer held behind the running stream close the connection (its
        request no longer keeps it alive). False when no answer is held."""
        for message, request in reversed(self._held or _EMPTY):
            cls = type(message)
            if cls is not Chunk and cls is not ServerSentEvent:
                if request is not None:
                    request.keep_alive = False
                return True
        return False

    def connection_closed(self) -> None:
        """The connection is closed: release what a response in progress holds."""
        self._closing = True
        if self._waiting_since:
            self._waiting_since = 0.0
            _waiting.pop(self, None)
        _open.discard(self)
        stream = self._stream
        if stream is not None and stream.__class__ is _FilePump:
            stream.file.close()
        self._stream = None
        self._stream_request = None
        self._held = None
        self._pending.clear()
        self._turn_waits = False
        self._continue_for = None
        self._deferred_error = None
        self._final_answer = None
        # A request still arriving is never delivered: its uploads go now.
        self._request = None
        self._body = None
        self._out = _EMPTY
        self._drop_upload()

    def _drop_upload(self) -> None:
        """Close the files of a multipart body that will not be delivered (deleting those
        already on disk)."""
        multipart, self._multipart = self._multipart, None
        if multipart is not None:
            multipart.close()


_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)


def _open_file(path: str) -> tuple[Any, os.stat_result] | None:
    """``path`` opened for reading, with its stat, if it is a regular file, else None
    (missing, unreadable, a NUL in its name, a folder, a FIFO, a device).

    It is opened without blocking and checked before anything is read: a plain open of a
    FIFO would wait for a writer, and the whole worker with it. (For a regular file,
    ``O_NONBLOCK`` changes nothing.)
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except (OSError, ValueError):
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            return None
        return os.fdopen(fd, "rb"), info
    except BaseException:
        os.close(fd)
        raise


# -- conditional requests (RFC 9110, section 13) ---------------------------------------------
_ENTITY_TAG = re.compile(r'(W/)?("[^"]*")')


def _tag_in(header: str, etag: str, strong: bool) -> bool:
    """Whether the entity-tag list ``header`` (``If-Match`` and the like) names ``etag``.

    Strong comparison (``If-Match``, ``If-Range``) needs both tags strong and equal; weak
    comparison (``If-None-Match``) compares them without their ``W/``.
    """
    if header.strip() == "*":
        return True
    ours_weak = etag.startswith("W/")
    ours = etag[2:] if ours_weak else etag
    if strong and ours_weak:
        return False
    for weak, tag in _ENTITY_TAG.findall(header):
        if tag == ours and not (strong and weak):
            return True
    return False


def _http_date(value: str | None) -> float | None:
    """The Unix time of an HTTP date, None when it is absent or not a date."""
    if value is None:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _joined(request: Request, name: str) -> str | None:
    """Every value of a list header, joined (clients may repeat ``If-None-Match``)."""
    values = request.headers.getall(name)
    return ", ".join(values) if values else None


def _preconditions(request: Request, etag: str, modified: int) -> int:
    """Evaluate a file request's conditions in RFC 9110's order: 0 to answer normally,
    304 (Not Modified) or 412 (Precondition Failed).

    ``If-Match`` (or, without it, ``If-Unmodified-Since``) fails with 412; a matching
    ``If-None-Match`` gives 304 to GET and HEAD, 412 to other methods; only without
    ``If-None-Match`` does ``If-Modified-Since`` count, for GET and HEAD.
    """
    if_match = _joined(request, "if-match")
    if if_match is not None:
        if not _tag_in(if_match, etag, strong=True):
            return 412
    else:
        since = _http_date(request.headers.get("if-unmodified-since"))
        if since is not None and modified > since:
            return 412
    safe = request.method == "GET" or request.method == "HEAD"
    if_none_match = _joined(request, "if-none-match")
    if if_none_match is not None:
        if _tag_in(if_none_match, etag, strong=False):
            return 304 if safe else 412
    elif safe:
        since = _http_date(request.headers.get("if-modified-since"))
        if since is not None and modified <= since:
            return 304
    return 0


def _range_applies(if_range: str | None, etag: str, modified: int) -> bool:
    """Whether ``Range`` is honoured: no ``If-Range``, or one naming the current file (its
    strong entity tag, or exactly its ``Last-Modified`` date). Otherwise the whole file goes."""
    if if_range is None:
        return True
    if_range = if_range.strip()
    if if_range.startswith('"') or if_range.startswith("W/"):
        return _tag_in(if_range, etag, strong=True)
    return _http_date(if_range) == modified


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """``(start, length)`` of a single ``bytes=`` range; ``(0, size)`` to ignore the header;
    None when it cannot be satisfied."""
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return (0, size)  # other units and multiple ranges: the whole file
    first, dash, last = spec.strip().partition("-")
    try:
        if not dash:
            return (0, size)
        if not first:  # the last N bytes
            count = int(last)
            if count <= 0:
                return None
            count = min(count, size)
            return (size - count, count) if size else None
        begin = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return (0, size)
    if begin >= size:
        return None
    if begin < 0 or end < begin:
        return (0, size)
    end = min(end, size - 1)
    return (begin, end - begin + 1)


class _FilePump:
    """Copies a file to a connection in pieces while its send buffer has room."""

    __slots__ = ("protocol", "file", "remaining", "close_after", "scheduled")

    #: At most this many bytes are handed to the connection per turn of the event loop.
    TURN_BUDGET = 1024 * 1024

    def __init__(self, protocol: HttpProtocol, file: Any, remaining: int, close_after: bool) -> None:
        self.protocol = protocol
        self.file = file
        self.remaining = remaining
        self.close_after = close_after
        self.scheduled = True

    def run(self) -> None:
        self.scheduled = False
        protocol = self.protocol
        connection = protocol.connection
        if protocol._stream is not self:
            return
        chunk_size = protocol.file_chunk_size
        budget = self.TURN_BUDGET
        file = self.file
        while True:
            if connection.closed:
                file.close()
                return
            if protocol._paused:
                return  # send_buffer_drained() calls run() again
            if self.remaining <= 0:
                file.close()
                protocol._end_stream(self.close_after)
                return
            if budget <= 0:
                self.scheduled = True
                asyncio.get_running_loop().call_soon(self.run)
                return
            data = file.read(min(chunk_size, self.remaining))
            if not data:  # the file shrank: the promised length cannot be kept
                file.close()
                protocol._stream = None
                connection.destroy()
                return
            self.remaining -= len(data)
            budget -= len(data)
            connection.send(data, raw=True)
