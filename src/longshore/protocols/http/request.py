"""The ``Request`` an HTTP worker's ``on_message(conn, request)`` receives.

Everything that costs something is computed on first use and kept: the path and query
are split and decoded from the raw target only when asked for, the headers become a
case-insensitive mapping only when ``request.headers`` is read, cookies and form fields
are parsed only when read. A handler that only looks at ``request.path`` pays for that
alone.
"""

from __future__ import annotations

import json as _json
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import parse_qsl, unquote

from ...errors import PackageTooLarge

if TYPE_CHECKING:
    from .session import Session


class MultiDict:
    """A read-only mapping where a name may have several values (query, form fields).

    ``d[name]`` and ``d.get(name)`` give the first value, ``d.getall(name)`` every value
    in order; iteration yields each name once.
    """

    __slots__ = ("_items", "_index")

    def __init__(self, items: list[tuple[str, Any]] | None = None) -> None:
        self._items: list[tuple[str, Any]] = items or []
        index: dict[str, list[Any]] = {}
        for name, value in self._items:
            index.setdefault(name, []).append(value)
        self._index = index

    def _key(self, name: str) -> str:
        return name

    def __getitem__(self, name: str) -> Any:
        return self._index[self._key(name)][0]

    def get(self, name: str, default: Any = None) -> Any:
        """The first value of ``name``, or ``default``."""
        values = self._index.get(self._key(name))
        return values[0] if values else default

    def getall(self, name: str) -> list[Any]:
        """Every value of ``name``, in the order they came (an empty list if none)."""
        return list(self._index.get(self._key(name), ()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._key(name) in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> Any:
        """The names, each once."""
        return self._index.keys()

    def items(self) -> list[tuple[str, Any]]:
        """Every ``(name, value)`` pair, repeated names included, in order."""
        return list(self._items)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of the first value of each name."""
        return {name: values[0] for name, values in self._index.items()}

    def __eq__(self, other: object) -> bool:
        if isinstance(other, MultiDict):
            return self._items == other._items
        if isinstance(other, dict):
            return self.to_dict() == other
        return NotImplemented

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._items!r})"


class Headers(MultiDict):
    """Request headers: names are case-insensitive (``h["content-type"]``, ``h["Content-Type"]``)."""

    __slots__ = ()

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        items = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw]
        self._items = items
        index: dict[str, list[Any]] = {}
        for name, value in items:
            index.setdefault(name.lower(), []).append(value)
        self._index = index

    def _key(self, name: str) -> str:
        return name.lower()

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)


def remove_dot_segments(path: str) -> str:
    """``path`` (starting with ``/``) without its ``.`` and ``..`` segments, as RFC 3986
    (section 5.2.4) resolves them: ``/a/./b/../c`` is ``/a/c``; a ``..`` at the top stays
    at ``/``. A path ending in a dot segment keeps its final ``/`` (``/a/b/..`` is ``/a/``)."""
    segments = path.split("/")
    kept: list[str] = []
    for segment in segments[1:]:
        if segment == "..":
            if kept:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
    if segments[-1] == "." or segments[-1] == "..":
        kept.append("")
    return "/" + "/".join(kept)


def media_type(value: str) -> str:
    """The media type of a ``Content-Type`` value, lowercase and without its parameters
    (``application/json``): only the spaces and tabs HTTP allows around it are removed.
    The protocol's checks and :class:`Request` read the body's type with this alike."""
    return value.partition(";")[0].strip(" \t").lower()


#: The media type of a urlencoded form body.
FORM_URLENCODED = "application/x-www-form-urlencoded"


_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT")}


class Request:
    """One HTTP request, as given to ``on_message(conn, request)``.

    Attributes: ``method`` (``"GET"``), ``target`` (the raw request target, ``str``),
    ``version`` (``"1.1"`` or ``"1.0"``), ``body`` (``bytes``; empty for multipart
    uploads, whose parts are in ``form`` and ``files``), ``keep_alive`` (whether the
    connection stays open after the response), ``connection``.

    Computed on first use: ``path`` (percent-decoded), ``query_string``, ``query``
    (a :class:`MultiDict` of ``str``), ``headers`` (case-insensitive :class:`Headers`),
    ``trailers`` (the same, for the trailer fields after a chunked body),
    ``cookies`` (``dict``), ``form`` (:class:`MultiDict`, from urlencoded or multipart
    bodies), ``files`` (:class:`MultiDict` of :class:`UploadedFile`), ``json()``,
    ``remote_address``/``remote_ip``/``remote_port``, ``session()``.
    """

    __slots__ = (
        "connection",
        "method",
        "_target",
        "raw_headers",
        "raw_trailers",
        "version",
        "keep_alive",
        "body",
        "_path",
        "_query",
        "_headers",
        "_trailers",
        "_cookies",
        "_form",
        "_files",
        "_session",
        "__dict__",
    )

    def __init__(self, connection: Any, method: bytes, target: bytes, raw_headers: list[tuple[bytes, bytes]], version: str, keep_alive: bool) -> None:
        self.connection = connection
        self.method: str = _METHODS.get(method) or method.decode("latin-1")
        self._target = target
        #: The headers as received: a list of ``(name, value)`` byte pairs.
        self.raw_headers = raw_headers
        #: The trailer fields that followed a chunked body, as received (usually none).
        self.raw_trailers: list[tuple[bytes, bytes]] | tuple[()] = ()
        self.version = version
        self.keep_alive = keep_alive
        self.body: bytes = b""
        self._path: str | None = None
        self._query: MultiDict | None = None
        self._headers: Headers | None = None
        self._trailers: Headers | None = None
        self._cookies: dict[str, str] | None = None
        self._form: MultiDict | None = None
        self._files: MultiDict | None = None
        self._session: Session | None = None

    # -- target --------------------------------------------------------------------------
    @property
    def target(self) -> str:
        """The request target exactly as sent (``/a%20b?x=1``)."""
        return self._target.decode("latin-1")

    @property
    def path(self) -> str:
        """The path, percent-decoded (``/a b``), its dot segments removed (``/a/../b`` is
        ``/b``; encoded ones such as ``/%2e%2e/`` or ``..%2f`` too): it never climbs above
        ``/``. :attr:`target` keeps the path as sent."""
        path = self._path
        if path is None:
            raw = self._target.partition(b"?")[0]
            if raw.startswith(b"http://") or raw.startswith(b"https://"):  # absolute form
                raw = b"/" + raw.split(b"/", 3)[3] if raw.count(b"/") >= 3 else b"/"
            path = unquote(raw.decode("latin-1")) if b"%" in raw else raw.decode("latin-1")
            if "/." in path and path[:1] == "/":
                path = remove_dot_segments(path)
            self._path = path
        return path

    @property
    def query_string(self) -> str:
        """What follows ``?`` in the target, undecoded (``''`` if nothing)."""
        return self._target.partition(b"?")[2].decode("latin-1")

    @property
    def query(self) -> MultiDict:
        """The query parameters: ``request.query["page"]``, ``request.query.getall("tag")``."""
        query = self._query
        if query is None:
            query = self._query = MultiDict(parse_qsl(self.query_string, keep_blank_values=True))
        return query

    # -- headers -------------------------------------------------------------------------
    @property
    def headers(self) -> Headers:
        """The headers, case-insensitive: ``request.headers.get("user-agent")``."""
        headers = self._headers
        if headers is None:
            headers = self._headers = Headers(self.raw_headers)
        return headers

    @property
    def trailers(self) -> Headers:
        """The trailer fields sent after a chunked body, case-insensitive like
        :attr:`headers` (usually empty). They are kept apart: never among ``headers``,
        ``cookies`` or anything else that reads the headers."""
        trailers = self._trailers
        if trailers is None:
            trailers = self._trailers = Headers(list(self.raw_trailers))
        return trailers

    def header(self, name: str, default: str | None = None) -> str | None:
        """One header's (first) value, case-insensitive."""
        return self.headers.get(name, default)

    @property
    def host(self) -> str:
        """The ``Host`` header ('' if absent)."""
        return self.headers.get("host", "")

    @property
    def content_type(self) -> str:
        """The media type of the body, without parameters (``application/json``)."""
        return media_type(self.headers.get("content-type", ""))

    @property
    def cookies(self) -> dict[str, str]:
        """The cookies the client sent, by name."""
        cookies = self._cookies
        if cookies is None:
            cookies = self._cookies = {}
            for header in self.headers.getall("cookie"):
                for pair in header.split(";"):
                    name, sep, value = pair.strip().partition("=")
                    if sep and name:
                        value = value.strip()
                        if len(value) >= 2 and value[0] == value[-1] == '"':
                            value = value[1:-1]
                        cookies.setdefault(name, unquote(value))
        return cookies

    # -- body ----------------------------------------------------------------------------
    def json(self) -> Any:
        """The body parsed as JSON (``ValueError`` if it is not)."""
        return _json.loads(self.body)

    @property
    def form(self) -> MultiDict:
        """Form fields of an ``application/x-www-form-urlencoded`` or multipart body.

        A urlencoded body with more fields than ``HttpProtocol.max_form_fields`` raises
        :class:`~longshore.errors.PackageTooLarge`, answered with a 413 (the protocol
        refuses such a body before delivering it, but not one the application set itself,
        say after unpacking it)."""
        form = self._form
        if form is None:
            if self.content_type == FORM_URLENCODED:
                form = MultiDict(self._parse_urlencoded())
            else:
                form = MultiDict()
            self._form = form
        return form

    def _parse_urlencoded(self) -> list[tuple[str, str]]:
        from .protocol import PAYLOAD_TOO_LARGE, HttpProtocol

        protocol = getattr(self.connection, "protocol", None)
        limit = protocol.max_form_fields if isinstance(protocol, HttpProtocol) else HttpProtocol.max_form_fields
        try:
            return parse_qsl(self.body.decode("latin-1"), keep_blank_values=True, max_num_fields=limit or None)
        except ValueError:  # more than max_num_fields
            raise PackageTooLarge(f"form with more than {limit} fields", response=PAYLOAD_TOO_LARGE) from None

    @property
    def files(self) -> MultiDict:
        """Uploaded files of a multipart body, by field name (:class:`UploadedFile`)."""
        files = self._files
        if files is None:
            files = self._files = MultiDict()
        return files

    # -- peer ----------------------------------------------------------------------------
    @property
    def remote_address(self) -> str:
        """``ip:port`` of the client."""
        return self.connection.remote_address if self.connection is not None else ""

    @property
    def remote_ip(self) -> str:
        """The client's IP address."""
        return self.connection.remote_ip if self.connection is not None else ""

    @property
    def remote_port(self) -> int:
        """The client's port."""
        return self.connection.remote_port if self.connection is not None else 0

    # -- session -------------------------------------------------------------------------
    async def session(self) -> Session:
        """This client's session (loaded from the configured store, or a new one).

        A new session's id cookie is added to the response sent for this request.
        Changes are kept by ``await session.save()``.
        """
        if self._session is None:
            from .session import load_session

            self._session = await load_session(self)
        return self._session

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target} HTTP/{self.version}>"
