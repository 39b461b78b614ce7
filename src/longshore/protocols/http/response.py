"""What an HTTP worker sends: ``Response``, ``FileResponse``, chunked bodies, Server-Sent Events.

``conn.send(x)`` on an HTTP connection accepts:

* ``str`` or ``bytes``: a ``200 OK`` response with that body (``text/html; charset=utf-8``);
* a :class:`Response`: status, headers, cookies and body as given;
* a :class:`FileResponse`: a file from disk, streamed in pieces as the send buffer drains,
  with an ``ETag``, conditional requests (304, 412) and ``Range`` (206) answered;
* ``Response(..., chunked=True)``, then :class:`Chunk` objects, then ``Chunk(b"")``;
* an :class:`EventStream`, then :class:`ServerSentEvent` objects, for as long as the
  connection stays open.

These classes only describe a response; the protocol turns them into bytes, with the
connection handling (``Connection: close``, keep-alive for HTTP/1.0, no body for ``HEAD``)
decided by the request they answer.
"""

from __future__ import annotations

import logging
import os
import re
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Iterable
from urllib.parse import quote

log = logging.getLogger("longshore")

#: Headers that frame the message on the connection: the server writes them itself.
FRAMING_HEADERS = frozenset(("content-length", "transfer-encoding", "connection"))
#: Framing headers an application set, already warned about (once per process and name).
_warned_framing: set[str] = set()


def _framing_ignored(lower: str) -> None:
    """An application set a framing header: it is left out; say so once per name."""
    if lower in _warned_framing or lower == "connection":
        return  # 'Connection: close' is a documented way to close after an answer
    _warned_framing.add(lower)
    log.warning(
        "HTTP: the %s header set by the application is not sent: the server frames responses itself "
        "(Content-Length, Transfer-Encoding, Connection); this is logged once",
        lower,
    )


#: ``HTTP/1.1 200 OK\r\n`` ... for every status ``http.HTTPStatus`` knows.
STATUS_LINES: dict[int, bytes] = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


#: A header (or cookie) name: an RFC 9110 token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: What may not appear in a header value or a reason phrase: control characters (CR, LF
#: and NUL above all: they would end the line and let the rest pass for another header),
#: and characters beyond Latin-1, which have no byte on the wire.
_UNSAFE = re.compile(r"[^\t\x20-\x7e\x80-\xff]")
#: What may not appear in a cookie attribute (a ';' would start another attribute).
_UNSAFE_ATTRIBUTE = re.compile(r"[^\x20-\x3a\x3c-\x7e\x80-\xff]")


def check_header(name: Any, value: Any) -> tuple[str, str]:
    """``(name, value)`` as strings, or ValueError when ``name`` is not a token or
    ``value`` holds a line break, another control character, or a character beyond
    Latin-1 (encode such text first, e.g. percent-encoding or RFC 8187)."""
    name = str(name)
    value = str(value)
    if _TOKEN.fullmatch(name) is None:
        raise ValueError(f"invalid header name {name!r}")
    if _UNSAFE.search(value) is not None:
        raise ValueError(f"header {name} has a line break, a control character or a non-Latin-1 character: {value!r}")
    return name, value


def status_line(status: int, reason: str | None = None) -> bytes:
    """The status line for ``status`` (with ``reason`` instead of the standard phrase)."""
    if reason is None:
        line = STATUS_LINES.get(status)
        if line is not None:
            return line
        reason = ""
    return f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")


def _header_bytes(name: str, value: Any) -> bytes:
    text = f"{name}: {value}"
    if _UNSAFE.search(text) is not None:  # set by hand in Response.headers, unchecked
        check_header(name, value)
    return text.encode("latin-1") + b"\r\n"


def format_cookie(
    name: str,
    value: str = "",
    *,
    max_age: int | None = None,
    expires: float | str | None = None,
    path: str | None = "/",
    domain: str | None = None,
    secure: bool = False,
    httponly: bool = False,
    samesite: str | None = "Lax",
) -> str:
    """The value of one ``Set-Cookie`` header. ``value`` is percent-encoded as needed (``%``
    included, so that :attr:`Request.cookies`, which decodes, gives it back as it was); a
    ``name`` that is not a token, or an attribute with a ``;`` or a control character,
    raises ValueError."""
    if _TOKEN.fullmatch(name) is None:
        raise ValueError(f"invalid cookie name {name!r}")
    for attribute in (expires if isinstance(expires, str) else None, path, domain, samesite):
        if attribute and _UNSAFE_ATTRIBUTE.search(attribute) is not None:
            raise ValueError(f"cookie attribute with a ';' or a control character: {attribute!r}")
    parts = [f"{name}={quote(value, safe='!#$&()*+-./:<=>?@[]^_`{|}~')}"]
    if max_age is not None:
        parts.append(f"Max-Age={int(max_age)}")
    if expires is not None:
        parts.append(f"Expires={expires if isinstance(expires, str) else formatdate(expires, usegmt=True)}")
    if path:
        parts.append(f"Path={path}")
    if domain:
        parts.append(f"Domain={domain}")
    if secure:
        parts.append("Secure")
    if httponly:
        parts.append("HttpOnly")
    if samesite:
        parts.append(f"SameSite={samesite}")
    return "; ".join(parts)


class Response:
    """An HTTP response: ``Response(body=b"", status=200, headers=None, *, content_type=None)``.

    ``body`` is ``bytes`` or ``str`` (UTF-8). ``headers`` is a dict or a list of
    ``(name, value)`` pairs (a list may repeat names). ``Content-Length`` is added;
    the framing headers are the server's: a ``Content-Length`` or ``Transfer-Encoding``
    given here is not sent (a warning is logged once), and ``Connection: close`` closes
    the connection after this response (the server writes the header);
    ``Content-Type`` defaults to ``text/html; charset=utf-8`` when there is a body.
    Header names must be tokens and values may not hold line breaks, other control
    characters or characters beyond Latin-1; neither may ``reason``: ValueError when
    the response (or the header) is made, so nothing can split the response.
    ``chunked=True`` sends the head (and ``body``, if any, as the first chunk) with
    ``Transfer-Encoding: chunked``; follow it with :class:`Chunk` objects and end with
    ``Chunk(b"")``.
    """

    __slots__ = ("status", "reason", "headers", "body", "chunked", "content_type")

    def __init__(
        self,
        body: bytes | str = b"",
        status: int = 200,
        headers: dict[str, Any] | Iterable[tuple[str, Any]] | None = None,
        *,
        content_type: str | None = None,
        reason: str | None = None,
        chunked: bool = False,
    ) -> None:
        self.body = body.encode() if isinstance(body, str) else bytes(body)
        self.status = int(status)
        if not 100 <= self.status <= 999:
            raise ValueError(f"an HTTP status has three digits, not {status!r}")
        if reason is not None and _UNSAFE.search(reason) is not None:
            raise ValueError(f"reason phrase with a line break, a control character or a non-Latin-1 character: {reason!r}")
        self.reason = reason
        self.headers: list[tuple[str, str]] = []
        if headers:
            for name, value in headers.items() if isinstance(headers, dict) else headers:
                self.headers.append(check_header(name, value))
        if content_type is not None:
            check_header("Content-Type", content_type)
        self.content_type = content_type
        self.chunked = chunked

    def set_header(self, name: str, value: Any) -> Response:
        """Set ``name`` (replacing any header of that name, case-insensitive)."""
        name, value = check_header(name, value)
        lower = name.lower()
        self.headers = [(n, v) for n, v in self.headers if n.lower() != lower]
        self.headers.append((name, value))
        return self

    def add_header(self, name: str, value: Any) -> Response:
        """Add a header, keeping others of the same name."""
        self.headers.append(check_header(name, value))
        return self

    def get_header(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (case-insensitive)."""
        lower = name.lower()
        for n, v in self.headers:
            if n.lower() == lower:
                return v
        return default

    def set_cookie(self, name: str, value: str = "", **attributes: Any) -> Response:
        """Add a ``Set-Cookie`` header. Attributes: ``max_age``, ``expires`` (a Unix time
        or an HTTP date), ``path`` (``/``), ``domain``, ``secure``, ``httponly``,
        ``samesite`` (``Lax``; ``None`` leaves it out)."""
        self.headers.append(("Set-Cookie", format_cookie(name, value, **attributes)))
        return self

    def delete_cookie(self, name: str, path: str | None = "/", domain: str | None = None) -> Response:
        """Tell the client to forget cookie ``name``."""
        self.headers.append(("Set-Cookie", format_cookie(name, "", max_age=0, expires=0, path=path, domain=domain, samesite=None)))
        return self

    def head_bytes(self, extra: bytes = b"") -> bytes:
        """Status line and headers (without ``Content-Length`` and the final blank line).

        ``Content-Length``, ``Transfer-Encoding`` and ``Connection`` in :attr:`headers`
        are left out: the server writes the framing headers for what it actually sends
        (the first two are logged as a warning once per process)."""
        parts = [status_line(self.status, self.reason)]
        has_type = False
        for name, value in self.headers:
            lower = name.lower()
            if lower in FRAMING_HEADERS:
                _framing_ignored(lower)
                continue
            if not has_type and lower == "content-type":
                has_type = True
            parts.append(_header_bytes(name, value))
        if self.content_type is not None and not has_type:
            parts.append(_header_bytes("Content-Type", self.content_type))
            has_type = True
        if not has_type and (self.body or self.chunked) and self.status not in (204, 304):
            parts.append(b"Content-Type: text/html; charset=utf-8\r\n")
        parts.append(extra)
        return b"".join(parts)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.status} {len(self.body)} bytes>"


def safe_join(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> str | None:
    """The real path of ``path`` taken inside the folder ``root``, or None when it would
    lead outside ``root``.

    ``path`` is relative to ``root`` even when it starts with ``/`` (``request.path``
    does). Both are resolved with :func:`os.path.realpath`, so ``..`` segments and
    symbolic links are followed first: a symbolic link inside ``root`` that points
    outside it gives None too. A path with a NUL character gives None.
    """
    path = os.fspath(path)
    base = os.path.realpath(os.fspath(root))
    if "\0" in path or "\0" in base:
        return None
    full = os.path.realpath(os.path.join(base, path.lstrip("/")))
    if full == base or full.startswith(base.rstrip(os.sep) + os.sep):
        return full
    return None


class FileResponse(Response):
    """A file from disk, streamed in pieces paced by the connection's send buffer.

    ``FileResponse(path, status=200, headers=None, *, content_type=None, download_name=None, root=None)``.
    With ``root``, ``path`` is taken inside that folder (``FileResponse(request.path,
    root="static")``): it is resolved with :func:`safe_join`, and a path that leads
    outside ``root`` (through ``..`` or a symbolic link) gets ``404``, never a file
    from elsewhere. Without ``root``, ``path`` is opened as given: never build it from
    the request that way. The content type is guessed from the name when not given. ``Last-Modified``,
    ``ETag`` (a strong validator made of the file's modification time in nanoseconds
    and its size, unless ``headers`` gives one), ``Accept-Ranges: bytes`` and
    ``Content-Length`` are set.

    Conditional requests are evaluated in RFC 9110's order: ``If-Match`` (or, without
    it, ``If-Unmodified-Since``) that fails gets ``412 Precondition Failed``;
    ``If-None-Match`` naming the current tag (or ``*``) gets ``304 Not Modified`` for
    GET and HEAD (412 for other methods), and when it is present ``If-Modified-Since`` is
    ignored; otherwise ``If-Modified-Since`` gets 304 when the file has not changed since.
    A single ``Range: bytes=a-b`` on a GET gets ``206 Partial Content`` (``416`` when it
    lies beyond the end), unless an ``If-Range`` names another version of the file (a
    different tag, or a date other than its ``Last-Modified``): then the whole file
    goes with 200. ``download_name`` adds ``Content-Disposition: attachment``. A missing
    file, or anything that is not a regular file, gives ``404``. Only a ``status`` of
    200 is subject to conditions and ranges.
    """

    __slots__ = ("path", "download_name", "root")

    def __init__(
        self,
        path: str | os.PathLike[str],
        status: int = 200,
        headers: dict[str, Any] | Iterable[tuple[str, Any]] | None = None,
        *,
        content_type: str | None = None,
        download_name: str | None = None,
        root: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(b"", status, headers, content_type=content_type)
        self.path = os.fspath(path)
        self.download_name = download_name
        self.root = os.fspath(root) if root is not None else None

    def resolved_path(self) -> str | None:
        """The file to open: ``path`` itself, or with ``root`` its real path inside
        ``root`` (None when it lies outside)."""
        if self.root is None:
            return self.path
        return safe_join(self.root, self.path)


class Chunk:
    """One piece of a chunked response (``Response(..., chunked=True)``); ``Chunk(b"")`` ends it."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | str = b"") -> None:
        self.data = data.encode() if isinstance(data, str) else bytes(data)


class EventStream(Response):
    """The head of a Server-Sent Events stream (``text/event-stream``, no caching).

    After it, send :class:`ServerSentEvent` objects (a ``str`` is sent as an event's
    ``data``). The stream lasts until the connection is closed, so the connection
    serves no further requests.
    """

    __slots__ = ()

    def __init__(self, headers: dict[str, Any] | Iterable[tuple[str, Any]] | None = None, status: int = 200) -> None:
        super().__init__(b"", status, headers)
        if self.get_header("content-type") is None:
            self.headers.append(("Content-Type", "text/event-stream"))
        if self.get_header("cache-control") is None:
            self.headers.append(("Cache-Control", "no-cache"))


class ServerSentEvent:
    """One Server-Sent Event: ``ServerSentEvent(data, event=None, id=None, retry=None)``.

    ``data`` may span several lines (each becomes a ``data:`` line); ``retry`` is in
    milliseconds. ``ServerSentEvent(comment="keep-alive")`` sends a comment line.
    """

    __slots__ = ("data", "event", "id", "retry", "comment")

    def __init__(self, data: str | None = None, event: str | None = None, id: str | int | None = None, retry: int | None = None, comment: str | None = None) -> None:
        self.data = data
        self.event = event
        self.id = id
        self.retry = retry
        self.comment = comment

    def encode(self) -> bytes:
        """The event on the wire, ending with a blank line."""
        lines: list[str] = []
        if self.comment is not None:
            lines.extend(": " + line for line in str(self.comment).splitlines() or [""])
        for field, value in (("event", self.event), ("id", self.id)):
            if value is not None:
                text = str(value)
                if "\n" in text or "\r" in text:
                    raise ValueError(f"an event's {field} cannot contain a line break")
                lines.append(f"{field}: {text}")
        if self.retry is not None:
            lines.append(f"retry: {int(self.retry)}")
        if self.data is not None:
            lines.extend("data: " + line for line in str(self.data).replace("\r\n", "\n").replace("\r", "\n").split("\n"))
        return ("\n".join(lines) + "\n\n").encode()
