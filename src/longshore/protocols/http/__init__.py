"""HTTP/1.1: ``Worker("http://0.0.0.0:8080")`` gives ``on_message(conn, request)`` a
:class:`Request`; ``conn.send()`` takes a :class:`Response`, ``str`` or ``bytes``.

The public names are re-exported by :mod:`longshore.http`.
"""

from __future__ import annotations

from .protocol import HttpProtocol
from .request import Headers, MultiDict, Request
from .response import Chunk, EventStream, FileResponse, Response, ServerSentEvent, format_cookie, safe_join
from .session import FileSessionStore, RedisSessionStore, Session, SessionStore, configure_sessions
from .uploads import UploadedFile, safe_filename

__all__ = [
    "Chunk",
    "EventStream",
    "FileResponse",
    "FileSessionStore",
    "Headers",
    "HttpProtocol",
    "MultiDict",
    "RedisSessionStore",
    "Request",
    "Response",
    "ServerSentEvent",
    "Session",
    "SessionStore",
    "UploadedFile",
    "configure_sessions",
    "format_cookie",
    "safe_filename",
    "safe_join",
]
