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

A session is a ``dict`` of JSON-serialisable values. Its id goes out as a cookie on the
response to the request that created it, and again (with a fresh ``Max-Age``) on the
response to each request that saved it. Each ``save()`` writes the whole session: when
requests of one session are handled at once (in different workers), the last save wins.
Stores are asynchronous (the Redis store talks to Redis with redis-py's asyncio client),
so loading and saving never block the worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import stat
import tempfile
import time
from typing import TYPE_CHECKING, Any

from .response import format_cookie

if TYPE_CHECKING:
    from .request import Request

log = logging.getLogger("longshore")

_VALID_ID = re.compile(r"[0-9a-f]{32}")


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
    """One JSON file per session in ``directory``; a file older than its lifetime counts as
    absent.

    The default folder is private to the application: ``.longshore/<start>.sessions/``
    next to the start script (next to the pid file), or ``<tmp>/longshore-sessions-<uid>``
    outside a longshore server. The folder is prepared when the store is first used, in
    the worker process (after it switched user): created with mode 0700 if missing, and
    otherwise refused (:class:`PermissionError`) unless it is a real folder (not a
    symbolic link) of this process's user that neither its group nor others can reach.
    Session files are 0600, written to a fresh temporary file and renamed into place.

    Expired sessions are collected in a thread, at most once per ``gc_interval`` seconds
    in each process, by the first ``save()`` after it: a file's modification time is its
    expiry, so the sweep reads only expired files; temporary files left over by a crash
    go after ``STALE_TEMPORARY`` seconds.
    """

    #: Seconds after which a temporary file left in the folder is removed by a sweep.
    STALE_TEMPORARY = 600.0

    def __init__(self, directory: str | os.PathLike[str] | None = None, *, gc_interval: float = 300.0) -> None:
        self._directory = os.fspath(directory) if directory is not None else None
        self.gc_interval = float(gc_interval)
        self._prepared: tuple[int, str] | None = None  # (pid, folder) once checked
        self._next_sweep = 0.0
        self._sweeping = False

    @property
    def directory(self) -> str:
        """The folder of the session files."""
        return self._directory if self._directory is not None else default_folder()

    def _folder(self) -> str:
        """The checked folder (prepared on first use in each process)."""
        prepared = self._prepared
        if prepared is None or prepared[0] != os.getpid():
            directory = self.directory
            prepare_private_folder(directory)
            prepared = self._prepared = (os.getpid(), directory)
        return prepared[1]

    def _path(self, session_id: str) -> str:
        return os.path.join(self._folder(), f"sess_{session_id}.json")

    async def load(self, session_id: str) -> dict[str, Any] | None:
        path = self._path(session_id)
        try:
            record = _read_record(path)
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or not isinstance(record.get("expires"), (int, float)) or record["expires"] < time.time():
            try:
                os.unlink(path)
            except OSError:
                pass
            return None
        data = record.get("data")
        return data if isinstance(data, dict) else None

    async def save(self, session_id: str, data: dict[str, Any], lifetime: int) -> None:
        expires = time.time() + lifetime
        text = json.dumps({"expires": expires, "data": data})  # before any file is made: it may raise
        path = self._path(session_id)
        fd, temporary = tempfile.mkstemp(prefix=f"sess_{session_id}.", suffix=".tmp", dir=os.path.dirname(path))  # 0600, O_EXCL
        try:
            with os.fdopen(fd, "w") as file:
                file.write(text)
                file.flush()
                os.utime(file.fileno(), (expires, expires))  # the sweep reads the expiry here
            os.replace(temporary, path)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
        if time.monotonic() >= self._next_sweep and not self._sweeping:
            self._start_sweep()

    async def delete(self, session_id: str) -> None:
        try:
            os.unlink(self._path(session_id))
        except OSError:
            pass

    def _start_sweep(self) -> None:
        self._next_sweep = time.monotonic() + self.gc_interval
        self._sweeping = True
        future = asyncio.get_running_loop().run_in_executor(None, self.sweep)
        future.add_done_callback(self._sweep_done)

    def _sweep_done(self, future: asyncio.Future[int]) -> None:
        self._sweeping = False
        if not future.cancelled() and future.exception() is not None:
            log.warning("sessions: sweeping %s failed: %s", self.directory, future.exception())

    def sweep(self) -> int:
        """Remove the expired session files and stale temporary files; how many went.
        (Blocking: the store runs it in a thread.)"""
        now = time.time()
        removed = 0
        with os.scandir(self._folder()) as entries:
            for entry in entries:
                name = entry.name
                if not name.startswith("sess_"):
                    continue
                try:
                    found = entry.stat(follow_symlinks=False)
                    if name.endswith(".json"):
                        if found.st_mtime >= now or not _expired(entry.path, now):
                            continue
                        if os.lstat(entry.path).st_ino != found.st_ino:
                            continue  # saved again meanwhile
                    elif not name.endswith(".tmp") or found.st_ctime > now - self.STALE_TEMPORARY:
                        continue
                    os.unlink(entry.path)
                    removed += 1
                except OSError:
                    continue
        return removed


def _read_record(path: str) -> Any:
    """The JSON in the session file at ``path``, never through a symbolic link (OSError
    when it cannot be read, ValueError when it is not JSON)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as file:
        return json.load(file)


def _expired(path: str, now: float) -> bool:
    """Whether the session file at ``path`` has expired (or is not a session record)."""
    try:
        record = _read_record(path)
    except ValueError:
        return True
    except OSError:
        return False  # gone meanwhile (or not ours to read)
    expires = record.get("expires") if isinstance(record, dict) else None
    return not isinstance(expires, (int, float)) or expires < now


def default_folder() -> str:
    """Where the file store keeps sessions when it is given no folder: next to the start
    script's pid file, or a folder of this user in the temporary folder."""
    from ... import runtime

    if runtime.current is not None:
        return runtime.current.sessions_folder
    return os.path.join(tempfile.gettempdir(), f"longshore-sessions-{os.geteuid()}")


def prepare_private_folder(folder: str) -> None:
    """Create ``folder`` with mode 0700, or check that the existing one is a folder (not a
    symbolic link) of this process's user without access for group and others;
    :class:`PermissionError` saying why otherwise."""
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    found = os.lstat(folder)
    if not stat.S_ISDIR(found.st_mode):
        raise PermissionError(f"session folder {folder} is not a folder (a symbolic link or a file): refusing to use it")
    if found.st_uid != os.geteuid():
        raise PermissionError(f"session folder {folder} belongs to uid {found.st_uid}, not to this process's uid {os.geteuid()}: refusing to use it")
    if found.st_mode & 0o077:
        raise PermissionError(
            f"session folder {folder} has mode {stat.S_IMODE(found.st_mode):04o}: its group or others can reach it; "
            f"refusing to use it (chmod 700 it)"
        )


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
        self._destroyed = False

    async def save(self) -> None:
        """Store the data and keep the session alive for another lifetime (the cookie
        goes out again with the new ``Max-Age``). After :meth:`destroy`, an empty session
        is not stored, and one given new data is stored under a new id."""
        if self._destroyed:
            if not self:
                return
            self._destroyed = False
            self.id = secrets.token_hex(16)
            self.is_new = True
        await _store().save(self.id, dict(self), session_config.lifetime)
        self._send_cookie = True
        self._delete_cookie = False

    async def destroy(self) -> None:
        """Forget the session: its data is deleted and the client told to drop the cookie."""
        await _store().delete(self.id)
        self.clear()
        self._destroyed = True
        self._send_cookie = False
        self._delete_cookie = True

    async def regenerate(self) -> None:
        """Move the data to a new id (after a login, against session fixation)."""
        if not self._destroyed:
            await _store().delete(self.id)
        self._destroyed = False
        self.id = secrets.token_hex(16)
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
    if session_id and _VALID_ID.fullmatch(session_id):
        data = await _store().load(session_id)
        if data is not None:
            return Session(session_id, data, is_new=False)
    return Session(secrets.token_hex(16), None, is_new=True)
