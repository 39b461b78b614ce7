"""Channels and groups: reach any connection of the application, in any process, on any machine.

Publish/subscribe between processes::

    from longshore import channel

    channel.subscribe("news", lambda topic, message: print(message))
    channel.publish("news", "hello")      # every subscriber, in every worker process

Addressing connections wherever they are::

    channel.client_id(conn)               # "3f2a9c1e-9d04be72-1a2b-1a40-7": host, instance, master pid, pid, connection
    channel.bind_uid(conn, "alice")
    channel.join_group(conn, "room:1")
    channel.send_to_uid("alice", "hi")
    channel.send_to_group("room:1", "hi all", exclude=channel.client_id(conn))
    channel.send_to_client(some_client_id, "just you")
    channel.send_to_all("server restarting")  # every client of this Worker
    await channel.is_online("alice"); await channel.group_count("room:1")

Messages keep their type: a ``str`` arrives as ``str`` (a text frame on a WebSocket),
``bytes`` as ``bytes``; ``publish`` also takes any JSON value.

The backend is chosen by one setting, ``Worker.channel``:

* ``None`` (default) or ``"embedded"``: a hub process of the master routes messages
  between the workers of this master, over a Unix socket; no other server. The hub is
  started only when the start script imports ``longshore.channel`` (or sets
  ``Worker.channel``); workers reconnect to it if it restarts.
* ``"redis://host:port/db"``: Redis pub/sub through redis-py's asyncio client, across
  every instance (machine) that uses the same Redis and ``Worker.channel_prefix``.
  Processes reconnect after a Redis restart, subscribe again and re-announce their
  uid and group counts.

Delivery is at most once. What is lost during an outage (hub or Redis unreachable):
messages a process publishes while its link is down (counted in that process's
``dropped``); messages published by others to this process while its link is down
(pub/sub keeps nothing: the publisher may have counted them as sent); ``is_online`` and
``group_count`` raise :class:`ChannelError` until the link is back. Sends to local
connections of the sending process still happen during an outage.

``status`` shows, per process, ``published`` (publish and send_to_* calls),
``delivered`` (messages handed to a subscriber callback or accepted by a connection's
``send()``) and ``dropped`` (messages lost here: not handed to the backend, or refused
by a connection whose send buffer is full or that is closed, which ``send_fail`` counts
too).

Everything works from a worker process (``on_worker_start`` or later).
``subscribe`` may also be called at the top level of the start script: every worker
process then subscribes when it starts.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TYPE_CHECKING, Any, Callable

from .core import Channel, ChannelError, ClientId, check_wire_topic, new_instance_tag, parse_client_id, process_address, user_topic
from .gateway import Gateway

if TYPE_CHECKING:
    from ..connection.tcp import TcpConnection
    from ..runtime import Runtime

log = logging.getLogger("longshore")

_channel: Channel | None = None
_gateway: Gateway | None = None
_early_subscriptions: list[tuple[str, Callable[[str, Any], Any]]] = []


def _setting() -> str:
    from ..worker import Worker

    return Worker.channel or "embedded"


def in_use() -> bool:
    """True when the application uses the channel (it imported this module or set ``Worker.channel``)."""
    from ..worker import Worker

    return Worker.channel is not None or __name__ in sys.modules


def needs_hub() -> bool:
    """True when the master must run the embedded hub."""
    return in_use() and _setting() == "embedded"


def hub_target(runtime: Runtime, owners: list[tuple[int, int]] | None = None) -> Callable[[], int]:
    """The hub process's entry point, for the master. ``owners``: the (uid, gid) the
    workers run as, when not the master's own: they must be able to connect."""
    from .embedded import hub_address, run_hub

    address = hub_address(runtime.pid_file)
    return lambda: run_hub(address, owners or [])


def start_in_master() -> None:
    """Master, when it starts (before it forks its workers): a new instance tag, which
    its workers inherit and put in their addresses and client ids."""
    new_instance_tag()


async def start_in_worker(runtime: Runtime) -> None:
    """Worker process: connect to the backend (before ``on_worker_start`` runs)."""
    global _channel, _gateway
    from ..connection import tcp
    from ..worker import Worker

    setting = _setting()
    address = process_address()
    backend: Any
    if setting == "embedded":
        from .embedded import EmbeddedBackend, hub_address

        backend = EmbeddedBackend(hub_address(runtime.pid_file))
    elif setting.startswith(("redis://", "rediss://", "unix://")):
        from .redis_backend import RedisBackend

        backend = RedisBackend(setting, address, Worker.channel_prefix)
    else:
        raise ValueError(f"Worker.channel: {setting!r} is neither 'embedded' nor a redis:// URL")
    _channel = Channel(backend, address, Worker.channel_prefix)
    _gateway = Gateway(_channel)
    for topic, callback in _early_subscriptions:
        _channel.subscribe(topic, callback)
    tcp.close_listeners.append(_gateway.forget)
    await backend.start()


async def stop_in_worker() -> None:
    """Worker process: leave the backend (after the connections are closed)."""
    global _channel, _gateway
    from ..connection import tcp

    if _gateway is not None:
        try:
            tcp.close_listeners.remove(_gateway.forget)
        except ValueError:
            pass
    if _channel is not None:
        try:
            await asyncio.wait_for(_channel.backend.stop(), 3.0)
        except Exception:
            log.exception("channel: error while stopping")
    _channel = _gateway = None


def _require_channel() -> Channel:
    if _channel is None:
        raise ChannelError("the channel is used from worker processes (on_worker_start or later)")
    return _channel


def _require_gateway() -> Gateway:
    if _gateway is None:
        raise ChannelError("the channel is used from worker processes (on_worker_start or later)")
    return _gateway


# -- publish / subscribe ---------------------------------------------------------------
def subscribe(topic: str, callback: Callable[[str, Any], Any]) -> None:
    """Call ``callback(topic, message)`` (a function or coroutine function) for each
    message published to ``topic`` by any process.

    ValueError if ``topic`` is too long (see :data:`core.MAX_WIRE_TOPIC`); the same goes
    for the uids and groups of the calls below.
    """
    if _channel is None:
        from ..worker import Worker

        check_wire_topic(user_topic(Worker.channel_prefix, topic), "topic", topic)
        _early_subscriptions.append((topic, callback))
        return
    _channel.subscribe(topic, callback)


def unsubscribe(topic: str, callback: Callable[[str, Any], Any] | None = None) -> None:
    """Stop receiving ``topic`` (only ``callback``, or every callback when None)."""
    if _channel is None:
        _early_subscriptions[:] = [(t, c) for t, c in _early_subscriptions if t != topic or (callback is not None and c is not callback)]
        return
    _channel.unsubscribe(topic, callback)


def publish(topic: str, message: Any) -> bool:
    """Send ``message`` (``str``, ``bytes`` or a JSON value) to every subscriber of ``topic``.

    Returns False when the backend could not take it (counted in ``dropped``).
    """
    return _require_channel().publish(topic, message)


# -- addressing connections --------------------------------------------------------------
def client_id(connection: TcpConnection) -> str:
    """The globally unique, parseable id of ``connection`` (see :func:`parse_client_id`)."""
    return _require_gateway().client_id(connection)


def bind_uid(connection: TcpConnection, uid: str) -> None:
    """Bind ``connection`` to the user ``uid`` (a uid may have many connections; a
    connection has one uid: binding again moves it). Undone when the connection closes."""
    _require_gateway().bind_uid(connection, uid)


def unbind_uid(connection: TcpConnection) -> None:
    """Undo :func:`bind_uid`."""
    _require_gateway().unbind_uid(connection)


def get_uid(connection: TcpConnection) -> str | None:
    """The uid ``connection`` is bound to, or None."""
    return _require_gateway().uid_of.get(connection)


def join_group(connection: TcpConnection, group: str) -> None:
    """Add ``connection`` to ``group`` (left automatically when it closes)."""
    _require_gateway().join_group(connection, group)


def leave_group(connection: TcpConnection, group: str) -> None:
    """Remove ``connection`` from ``group``."""
    _require_gateway().leave_group(connection, group)


def get_groups(connection: TcpConnection) -> set[str]:
    """The groups ``connection`` belongs to."""
    return set(_require_gateway().groups_of.get(connection, ()))


def send_to_client(client_id: str, data: Any) -> bool:
    """Send ``data`` to the connection ``client_id``, wherever it is.

    Returns False if it was dropped here (unknown local connection, refused send, or
    the backend unreachable); True once handed over (delivery is not confirmed).
    ValueError if ``client_id`` is not exactly a client id (see :func:`parse_client_id`).
    """
    return _require_gateway().send_to_client(client_id, data)


def send_to_uid(uid: str, data: Any) -> bool:
    """Send ``data`` to every connection bound to ``uid``, in every process."""
    return _require_gateway().send_to_uid(uid, data)


def send_to_group(group: str, data: Any, exclude: Any = None) -> bool:
    """Send ``data`` to every member of ``group``, in every process, except ``exclude``
    (a client id, a local connection, or a list of them)."""
    return _require_gateway().send_to_group(group, data, exclude)


def send_to_all(data: Any, exclude: Any = None) -> bool:
    """Send ``data`` to every connection accepted by this process's Worker, in each of
    its processes (and, with Redis, in every instance: the Worker of the same name),
    except ``exclude``. Outgoing connections (``AsyncTcpConnection``) and the
    connections of the application's other Workers are left alone."""
    return _require_gateway().send_to_all(data, exclude)


async def is_online(uid: str) -> bool:
    """True if a connection anywhere is bound to ``uid``; ChannelError if the backend is unreachable."""
    gateway = _require_gateway()
    if gateway.by_uid.get(str(uid)):
        return True
    return await gateway.uid_count(str(uid)) > 0


async def uid_count(uid: str) -> int:
    """How many connections, in all processes, are bound to ``uid``."""
    return await _require_gateway().uid_count(str(uid))


async def group_count(group: str) -> int:
    """How many connections, in all processes, are members of ``group``."""
    return await _require_gateway().group_count(str(group))


def local_group_count(group: str) -> int:
    """How many connections of this process are members of ``group`` (no round trip)."""
    return len(_require_gateway().members.get(str(group), ()))


def connected() -> bool:
    """True while this process is connected to its backend."""
    return _channel is not None and bool(_channel.backend.connected)


__all__ = [
    "Channel",
    "ChannelError",
    "ClientId",
    "bind_uid",
    "client_id",
    "connected",
    "get_groups",
    "get_uid",
    "group_count",
    "in_use",
    "is_online",
    "join_group",
    "leave_group",
    "local_group_count",
    "parse_client_id",
    "publish",
    "send_to_all",
    "send_to_client",
    "send_to_group",
    "send_to_uid",
    "subscribe",
    "uid_count",
    "unbind_uid",
    "unsubscribe",
]
