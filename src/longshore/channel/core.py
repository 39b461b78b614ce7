"""The channel of one process: topics, callbacks, the message envelope, counters.

A backend moves opaque ``bytes`` between processes by topic (the embedded hub, or
Redis). :class:`Channel` adds what the application sees: several callbacks per topic,
messages that keep their type (``str``, ``bytes`` or a JSON value), delivery to the
publishing process's own subscribers without a round trip, and the ``published``,
``delivered`` and ``dropped`` counters shown by ``status``.

Envelope of every message on the wire: a JSON header, a newline, the body. The header
names the publishing process (``o``) so that it can skip its own message when the
backend echoes it back (Redis does), the kind of the body (``k``: ``s`` text, ``b``
bytes, ``j`` JSON), and whatever the gateway adds (a connection id, excluded clients).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import socket
from typing import Any, Callable, NamedTuple, Protocol as TypingProtocol

from .. import tasks
from ..stats import process_stats

log = logging.getLogger("longshore")


class ChannelError(RuntimeError):
    """The channel cannot do this now (not in a worker process, or its backend is unreachable)."""


class Backend(TypingProtocol):
    """What a channel backend provides (see ``embedded.py`` and ``redis_backend.py``).

    ``publish`` and ``set_count`` never block: they return at once, and ``publish``
    returns False when the message is dropped here (backend unreachable or its
    outgoing buffer full). ``on_message(topic, payload)`` is called for every message
    of a subscribed topic; ``on_connected()`` after every (re)connection.
    """

    connected: bool
    on_message: Callable[[str, bytes], None]
    on_connected: Callable[[], None]

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def subscribe(self, topic: str) -> None: ...
    def unsubscribe(self, topic: str) -> None: ...
    def publish(self, topic: str, payload: bytes) -> bool: ...
    def set_count(self, key: str, count: int) -> None: ...
    async def get_count(self, key: str) -> int: ...


def host_id() -> str:
    """Eight hex digits naming this machine (from /etc/machine-id, else the host name)."""
    seed = b""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path, "rb") as file:
                seed = file.read().strip()
            break
        except OSError:
            continue
    seed += socket.gethostname().encode()
    return hashlib.sha1(seed).hexdigest()[:8]


#: This instance's tag: eight hex digits drawn at random by the master when it starts
#: (:func:`new_instance_tag`) and inherited by the workers it forks. It tells apart
#: instances whose other address parts are alike: containers that share a host name
#: (or the host's network) and each run their master as pid 1 with the same worker
#: pids, or an instance restarted after a crash that gets its old pids again.
_instance_tag = secrets.token_hex(4)


def new_instance_tag() -> str:
    """Draw a new instance tag (the master, when it starts, before it forks its workers)."""
    global _instance_tag
    _instance_tag = secrets.token_hex(4)
    return _instance_tag


class ClientId(NamedTuple):
    """A parsed client id: ``<host>-<instance>-<master pid>-<worker pid>-<connection id>``
    (lowercase hex; the host and the instance tag are 8 digits each)."""

    host: str
    instance: str
    master_pid: int
    pid: int
    connection_id: int

    @property
    def process(self) -> str:
        """The address of the process that holds the connection (the first four parts)."""
        return f"{self.host}-{self.instance}-{self.master_pid:x}-{self.pid:x}"

    def __str__(self) -> str:
        return f"{self.process}-{self.connection_id:x}"


_NUMBER = "([0-9a-f]{1,16})"
_CLIENT_ID = re.compile(f"([0-9a-f]{{8}})-([0-9a-f]{{8}})-{_NUMBER}-{_NUMBER}-{_NUMBER}")


def parse_client_id(client_id: str) -> ClientId:
    """Split a client id into its parts; ValueError if it is not one (only the exact
    format is accepted: no sign, space, ``0x``, underscore, capital or over-long part)."""
    match = _CLIENT_ID.fullmatch(client_id) if isinstance(client_id, str) else None
    if match is None:
        raise ValueError(f"not a client id: {str(client_id)[:80]!r}")
    host, instance, master_pid, pid, connection_id = match.groups()
    return ClientId(host, instance, int(master_pid, 16), int(pid, 16), int(connection_id, 16))


def encode_envelope(origin: str, message: Any, extra: dict[str, Any] | None = None) -> bytes:
    """A message with its header, ready for the wire."""
    if isinstance(message, str):
        kind, body = "s", message.encode()
    elif isinstance(message, (bytes, bytearray, memoryview)):
        kind, body = "b", bytes(message)
    else:
        kind, body = "j", json.dumps(message, separators=(",", ":")).encode()
    header = {"o": origin, "k": kind}
    if extra:
        header.update(extra)
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + body


#: The longest topic on the wire, in bytes (the embedded hub's frames give a topic a
#: 2-byte length). A topic, uid or group name must fit in it together with the prefix
#: the channel puts in front of it, whatever the backend, so that an application behaves
#: the same on both.
MAX_WIRE_TOPIC = 65535


def user_topic(prefix: str, topic: str) -> str:
    """The wire topic of the application's pub/sub ``topic``."""
    return f"{prefix}:t:{topic}"


def check_wire_topic(wire_topic: str, kind: str, name: str) -> None:
    """ValueError if ``name`` (a topic, uid or group) cannot go on the wire as
    ``wire_topic``: over ``MAX_WIRE_TOPIC`` bytes with its prefix, or not UTF-8 text."""
    try:
        size = len(wire_topic.encode())
    except UnicodeEncodeError as exc:
        raise ValueError(f"channel: the {kind} {name[:40]!r} cannot be encoded as UTF-8 ({exc.reason})") from None
    if size > MAX_WIRE_TOPIC:
        length = len(name.encode())
        limit = MAX_WIRE_TOPIC - (size - length)
        raise ValueError(f"channel: the {kind} {name[:40]!r}... is {length} bytes long (UTF-8); at most {limit}")


def decode_envelope(payload: bytes) -> tuple[dict[str, Any], Any]:
    """The header and the message (of its original type) of a wire payload."""
    end = payload.index(b"\n")
    header = json.loads(payload[:end])
    body = payload[end + 1 :]
    kind = header.get("k")
    if kind == "s":
        return header, body.decode()
    if kind == "j":
        return header, json.loads(body)
    return header, bytes(body)


class Channel:
    """Publish/subscribe for the processes of an application (one object per worker process).

    ``prefix`` namespaces every topic on the backend, so that several applications can
    share one Redis; every instance of one application must use the same prefix.
    """

    def __init__(self, backend: Backend, address: str, prefix: str) -> None:
        self.backend = backend
        #: This process's address: ``<host>-<instance>-<master pid>-<pid>`` (hex).
        self.address = address
        self.prefix = prefix
        self.callbacks: dict[str, list[Callable[[str, Any], Any]]] = {}
        self.routes: dict[str, Callable[[dict[str, Any], Any], None]] = {}
        self.reconnect_listeners: list[Callable[[], None]] = []
        backend.on_message = self._on_message
        backend.on_connected = self._on_connected

    # -- topics of the application -------------------------------------------------
    def user_topic(self, topic: str) -> str:
        return user_topic(self.prefix, topic)

    def subscribe(self, topic: str, callback: Callable[[str, Any], Any]) -> None:
        """Call ``callback(topic, message)`` for every message published to ``topic``."""
        check_wire_topic(self.user_topic(topic), "topic", topic)
        callbacks = self.callbacks.setdefault(topic, [])
        callbacks.append(callback)
        if len(callbacks) == 1:
            self.route(self.user_topic(topic), functools.partial(self._dispatch_routed, topic))

    def unsubscribe(self, topic: str, callback: Callable[[str, Any], Any] | None = None) -> None:
        """Stop calling ``callback`` (every callback of ``topic`` when None)."""
        callbacks = self.callbacks.get(topic)
        if not callbacks:
            return
        if callback is None:
            callbacks.clear()
        else:
            try:
                callbacks.remove(callback)
            except ValueError:
                pass
        if not callbacks:
            del self.callbacks[topic]
            self.unroute(self.user_topic(topic))

    def publish(self, topic: str, message: Any) -> bool:
        """Send ``message`` to every subscriber of ``topic``, in every process.

        Subscribers in this process are called soon (from the event loop), the others
        through the backend; all get a copy decoded from the wire payload (a change made
        to ``message`` after the call reaches none of them; a tuple arrives as a list).
        Returns False when the message could not be handed to the backend (it still
        reaches this process's subscribers); ``dropped`` counts it.
        """
        wire_topic = self.user_topic(topic)
        check_wire_topic(wire_topic, "topic", topic)
        payload = encode_envelope(self.address, message)
        process_stats.channel_published += 1
        if topic in self.callbacks:
            asyncio.get_running_loop().call_soon(self._dispatch_own, topic, payload)
        return self.send(wire_topic, payload)

    def _dispatch_own(self, topic: str, payload: bytes) -> None:
        """This process's subscribers get the copy the others get, decoded from the same
        payload: not the publisher's object, which it may change after ``publish``."""
        if topic in self.callbacks:
            self._dispatch(topic, decode_envelope(payload)[1])

    def _dispatch_routed(self, topic: str, header: dict[str, Any], message: Any) -> None:
        self._dispatch(topic, message)

    def _dispatch(self, topic: str, message: Any) -> None:
        for callback in list(self.callbacks.get(topic, ())):
            process_stats.channel_delivered += 1
            try:
                result = callback(topic, message)
                if asyncio.iscoroutine(result):
                    tasks.run_coroutine(result, f"the channel callback of topic {topic!r}")
            except Exception:
                process_stats.throw_exception += 1
                log.exception("exception in the channel callback of topic %r", topic)

    # -- wire topics ---------------------------------------------------------------
    def route(self, wire_topic: str, handler: Callable[[dict[str, Any], Any], None]) -> None:
        """Deliver messages of ``wire_topic`` to ``handler(header, message)`` and subscribe."""
        self.routes[wire_topic] = handler
        self.backend.subscribe(wire_topic)

    def unroute(self, wire_topic: str) -> None:
        if self.routes.pop(wire_topic, None) is not None:
            self.backend.unsubscribe(wire_topic)

    def send(self, wire_topic: str, payload: bytes) -> bool:
        """Hand ``payload`` to the backend; count it as dropped if it refuses."""
        if self.backend.publish(wire_topic, payload):
            return True
        process_stats.channel_dropped += 1
        return False

    def _on_message(self, wire_topic: str, payload: bytes) -> None:
        handler = self.routes.get(wire_topic)
        if handler is None:
            return
        try:
            header, message = decode_envelope(payload)
        except (ValueError, UnicodeDecodeError):
            log.warning("channel: a malformed message on %s was ignored", wire_topic)
            return
        if header.get("o") == self.address:
            return  # ours, echoed back: already delivered here
        try:
            handler(header, message)
        except Exception:
            process_stats.throw_exception += 1
            log.exception("exception delivering a channel message of %s", wire_topic)

    def _on_connected(self) -> None:
        for listener in list(self.reconnect_listeners):
            listener()


def process_address(master_pid: int | None = None) -> str:
    """The address of this process, as used in client ids: host, instance tag, master
    pid, pid (see :class:`ClientId`)."""
    return f"{host_id()}-{_instance_tag}-{(master_pid or os.getppid()):x}-{os.getpid():x}"
