"""Sessions: a session id cookie, and the data behind it in a pluggable store.

::

    from longshore.http import configure_sessions, FileSessionStore, RedisSessionStore

    configure_sessions(FileSessionStore("/var/lib/myapp/sessions"))     # or
    configure_sessions(RedisSessionStore("redis://127.0.0.1:6379/0"))

    async def on_message(conn, request):
        session = await request.session()
        session["visits"] = session.get("visits", 0) + 1
        await session.save()
        conn.send(f"visit {session['visits']}")

A session is a ``dict`` of JSON-serialisable values. A new session's id goes out as a
cookie on the response to the request that created it. Stores are asynchronous (the
Redis store talks to Redis with redis-py's asyncio client), so loading and saving never
block the worker.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
import time
from typing import TYPE_CHECKING, Any

from .response import format_cookie

if TYPE_CHECKING:
    from .request import Request

_VALID_ID = re.compile(r"^[0-9a-f]{32}$")


class SessionStore:
    """Where session data lives. Subclass it and implement the three coroutines."""

    async def load(self, session_id: str) -> dict[str, Any] | None:
        """The data of ``session_id``, or None if there is none (or it expired)."""
        raise NotImplementedError

    async def save(self, session_id: str, data: dict[str, Any], lifetime: int) -> None:
        """Keep ``data`` for ``lifetime`` seconds."""
        raise NotImplementedError

    async def delete(self, session_id: str) -> None:
        """Forget ``session_id``."""
        raise NotImplementedError


class FileSessionStore(SessionStore):
    """One JSON file per session in ``directory`` (created if missing); a file older
    than its lifetime counts as absent and is removed when next read."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = os.fspath(directory) if directory is not None else os.path.join(tempfile.gettempdir(), "longshore-sessions")
        os.makedirs(self.directory, exist_ok=True)

    def _path(self, session_id: str) -> str:
        return os.path.join(self.directory, f"sess_{session_id}.json")

    async def load(self, session_id: str) -> dict[str, Any] | None:
        path = self._path(session_id)
        try:
            with open(path) as file:
                record = json.load(file)
        except (OSError, ValueError):
            return None
        if record.get("expires", 0) < time.time():
            try:
                os.unlink(path)
            except OSError:
                pass
            return None
        data = record.get("data")
        return data if isinstance(data, dict) else None

    async def save(self, session_id: str, data: dict[str, Any], lifetime: int) -> None:
        path = self._path(session_id)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w") as file:
            json.dump({"expires": time.time() + lifetime, "data": data}, file)
        os.replace(temporary, path)

    async def delete(self, session_id: str) -> None:
        try:
            os.unlink(self._path(session_id))
        except OSError:
            pass


class RedisSessionStore(SessionStore):
    """Sessions as Redis strings (JSON) with an expiry, via redis-py's asyncio client.

    ``RedisSessionStore(url="redis://127.0.0.1:6379/0", prefix="longshore:session:")``,
    or ``RedisSessionStore(client=redis.asyncio.Redis(...))``. The client is created in
    the worker process on first use, so the store can be configured in the start script.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "longshore:session:", client: Any = None) -> None:
        self.url = url
        self.prefix = prefix
        self._client = client
        self._pid = os.getpid() if client is not None else 0

    @property
    def client(self) -> Any:
        """The redis-py asyncio client of this process."""
        if self._client is None or self._pid != os.getpid():
            import redis.asyncio

            self._client = redis.asyncio.Redis.from_url(self.url)
            self._pid = os.getpid()
        return self._client

    async def load(self, session_id: str) -> dict[str, Any] | None:
        raw = await self.client.get(self.prefix + session_id)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    async def save(self, session_id: str, data: dict[str, Any], lifetime: int) -> None:
        await self.client.set(self.prefix + session_id, json.dumps(data), ex=max(int(lifetime), 1))

    async def delete(self, session_id: str) -> None:
        await self.client.delete(self.prefix + session_id)


class SessionConfig:
    """How sessions work: the store, the cookie's name and attributes, the lifetime."""

    def __init__(self) -> None:
        self.store: SessionStore | None = None
        self.cookie_name = "LONGSHORE_SESSION"
        self.lifetime = 24 * 3600
        self.cookie_attributes: dict[str, Any] = {"path": "/", "httponly": True, "samesite": "Lax"}


session_config = SessionConfig()


def configure_sessions(
    store: SessionStore | None = None,
    *,
    cookie_name: str | None = None,
    lifetime: int | None = None,
    **cookie_attributes: Any,
) -> SessionConfig:
    """Choose the session store (default: a :class:`FileSessionStore` in the temporary
    folder), the cookie name, the lifetime in seconds, and cookie attributes
    (``path``, ``domain``, ``secure``, ``httponly``, ``samesite``)."""
    if store is not None:
        session_config.store = store
    if cookie_name is not None:
        session_config.cookie_name = cookie_name
    if lifetime is not None:
        session_config.lifetime = int(lifetime)
    session_config.cookie_attributes.update(cookie_attributes)
    return session_config


class Session(dict):  # type: ignore[type-arg]
    """One client's session data (a ``dict``); ``id``, ``is_new``, ``save()``, ``destroy()``,
    ``regenerate()``."""

    def __init__(self, session_id: str, data: dict[str, Any] | None, is_new: bool) -> None:
        super().__init__(data or {})
        self.id = session_id
        self.is_new = is_new
        self._send_cookie = is_new
        self._delete_cookie = False

    async def save(self) -> None:
        """Store the data (and keep the session alive for another lifetime)."""
        await _store().save(self.id, dict(self), session_config.lifetime)

    async def destroy(self) -> None:
        """Forget the session: its data is deleted and the client told to drop the cookie."""
        await _store().delete(self.id)
        self.clear()
        self._send_cookie = False
        self._delete_cookie = True

    async def regenerate(self) -> None:
        """Move the data to a new id (after a login, against session fixation)."""
        await _store().delete(self.id)
        self.id = secrets.token_hex(16)
        self._send_cookie = True
        self._delete_cookie = False
        await self.save()

    def _cookie_header(self) -> bytes | None:
        """The ``Set-Cookie`` line the response must carry, if any (sent once)."""
        config = session_config
        if self._send_cookie:
            self._send_cookie = False
            value = format_cookie(config.cookie_name, self.id, max_age=config.lifetime, **config.cookie_attributes)
        elif self._delete_cookie:
            self._delete_cookie = False
            attributes = {k: v for k, v in config.cookie_attributes.items() if k in ("path", "domain")}
            value = format_cookie(config.cookie_name, "", max_age=0, expires=0, samesite=None, **attributes)
        else:
            return None
        return b"Set-Cookie: " + value.encode("latin-1") + b"\r\n"


def _store() -> SessionStore:
    if session_config.store is None:
        session_config.store = FileSessionStore()
    return session_config.store


async def load_session(request: Request) -> Session:
    """The session of ``request``'s client: the stored one its cookie names, or a new one."""
    session_id = request.cookies.get(session_config.cookie_name)
    if session_id and _VALID_ID.match(session_id):
        data = await _store().load(session_id)
        if data is not None:
            return Session(session_id, data, is_new=False)
    return Session(secrets.token_hex(16), None, is_new=True)
