"""The HTTP API: ``from longshore.http import Request, Response, FileResponse, ...``.

See :mod:`longshore.protocols.http` for the protocol itself.
"""

from __future__ import annotations

from .protocols.http import (
    Chunk,
    EventStream,
    FileResponse,
    FileSessionStore,
    Headers,
    HttpProtocol,
    MultiDict,
    RedisSessionStore,
    Request,
    Response,
    ServerSentEvent,
    Session,
    SessionStore,
    UploadedFile,
    configure_sessions,
    format_cookie,
)

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
]
