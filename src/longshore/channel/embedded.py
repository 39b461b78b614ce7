"""The embedded channel: a hub process of the master, and each worker's link to it.

The hub is a helper process that the master forks (and respawns) when the
application uses the channel without Redis. It listens on a Unix socket next to the
pid file (``.longshore/<script>.channel.sock``). When that path is too long for
``sun_path``, the socket is ``hub.sock`` in a private folder of ``/tmp`` named after
the long path (see :func:`prepare_folder`); never an abstract socket, which would ignore
file permissions (any local user could connect) and which uvloop cannot connect to.
Every worker process keeps one connection to it and tells it which topics it subscribes
to; a message published to a topic goes to the subscribed processes only, never back to
its sender.

The framing is that of ``frame://``: a 4-byte big-endian length that counts itself,
then the payload. A payload is one operation byte, a 2-byte topic length, the topic,
then the operation's body:

====  ===================================  ====================================
op    worker -> hub                        body
====  ===================================  ====================================
S     subscribe to topic                   (none)
U     unsubscribe from topic               (none)
P     publish to topic                     the message (hub -> worker: op M)
C     this process holds N of key          8-byte signed N
Q     how many of key, in all processes?   4-byte query id (answer: op A, body:
                                           query id + 8-byte total)
====  ===================================  ====================================

The hub sends M (a message of a subscribed topic), A (an answer) and D (empty topic,
8-byte N: the hub dropped N messages for this worker since its last D).

The links are plain asyncio protocols rather than ``TcpConnection`` objects: they are
the framework's own plumbing, so they must not appear among the application's
connections, in its ``send_fail`` or in a graceful stop's wait. A link whose peer does
not read (more than ``LINK_BUFFER_LIMIT`` bytes waiting) loses messages (P and M
frames), and they are counted as dropped, like a slow client's. The other frames
(subscriptions, counts, queries and their answers) are small and always written: losing
one would leave a subscription or a count wrong until the next reconnection. The hub
tells a worker how many messages it dropped for it (a D frame, at most every
``DROP_REPORT_DELAY`` seconds), and that worker adds them to its ``dropped`` counter:
they are lost on the receiving side, where ``status`` shows them.

A worker reconnects after a hub restart with a growing delay (50 ms up to 1 s), then
subscribes again and re-announces its counts; what was published while it was away is
lost and, on the publisher's side, counted as dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import signal
import stat
from typing import Any, Callable

from ..stats import process_stats
from .core import ChannelError

log = logging.getLogger("longshore")

LINK_BUFFER_LIMIT = 64 * 1024 * 1024
MAX_FRAME = 256 * 1024 * 1024
RETRY_MIN = 0.05
RETRY_MAX = 1.0
QUERY_TIMEOUT = 3.0
#: How long the hub gathers the drops for a worker before it reports them.
DROP_REPORT_DELAY = 0.2

OP_SUBSCRIBE = ord("S")
OP_UNSUBSCRIBE = ord("U")
OP_PUBLISH = ord("P")
OP_MESSAGE = ord("M")
OP_COUNT = ord("C")
OP_QUERY = ord("Q")
OP_ANSWER = ord("A")
OP_DROPPED = ord("D")


#: The longest socket path kept next to the pid file (``sun_path``: 108 bytes on Linux, 104
#: on the BSDs, the final NUL included).
MAX_SOCKET_PATH = 99
#: Where the private folder of a hub whose own path is too long goes.
SHORT_SOCKET_ROOT = "/tmp"
PRIVATE_PREFIX = "longshore-channel-"


def hub_address(pid_file: str) -> str:
    """Where the hub of the application with this pid file listens: next to the pid file,
    or, when that path is too long, ``/tmp/longshore-channel-<hash of it>/hub.sock``.

    The name depends on the path only, so that the hub and the workers (which may run as
    another user) find the same one.
    """
    path = os.path.splitext(pid_file)[0] + ".channel.sock"
    if len(path.encode()) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha1(path.encode()).hexdigest()[:20]
    return os.path.join(SHORT_SOCKET_ROOT, PRIVATE_PREFIX + digest, "hub.sock")


def private_folder(address: str) -> str | None:
    """The private folder of ``address`` (see :func:`hub_address`), or None when the
    socket lives next to its pid file."""
    folder = os.path.dirname(address)
    if os.path.dirname(folder) == SHORT_SOCKET_ROOT and os.path.basename(folder).startswith(PRIVATE_PREFIX):
        return folder
    return None


def folder_access(owners: list[tuple[int, int]]) -> tuple[int, int]:
    """Mode and group of the private folder for workers running as ``owners`` (none:
    as the hub's user): 0700; 0710 with their group when they all share one; 0711
    when they run in several groups (the socket is then open to all, as it is when it
    lives next to the pid file)."""
    groups = {gid for _, gid in owners}
    if not groups:
        return 0o700, -1
    if len(groups) == 1:
        return 0o710, groups.pop()
    return 0o711, -1


def prepare_folder(folder: str, owners: list[tuple[int, int]]) -> None:
    """Make ``folder`` a folder of this process's user with the mode and group of
    :func:`folder_access`.

    Whatever else has the name (a symbolic link, a file, a folder of another user or
    one that others could write in) is removed first; ``OSError`` when that cannot be
    done or someone recreates it meanwhile.
    """
    mode, gid = folder_access(owners)
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        found = os.lstat(folder)
        if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.geteuid() or found.st_mode & 0o022:
            _remove_foreign(folder, found)
            os.mkdir(folder, 0o700)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        found = os.fstat(fd)
        if found.st_uid != os.geteuid():
            raise PermissionError(f"{folder} belongs to uid {found.st_uid}")
        if gid >= 0 and found.st_gid != gid:
            os.fchown(fd, -1, gid)
        if stat.S_IMODE(found.st_mode) != mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _remove_foreign(folder: str, found: os.stat_result) -> None:
    """Remove what holds the private folder's name and is not ours."""
    log.warning(
        "channel: %s is not a private folder of this user (uid %d, mode %o); replacing it",
        folder,
        found.st_uid,
        stat.S_IMODE(found.st_mode),
    )
    if not stat.S_ISDIR(found.st_mode):
        os.unlink(folder)
    elif shutil.rmtree.avoids_symlink_attacks:
        shutil.rmtree(folder)
    else:  # pragma: no cover - platforms without the fd-based functions
        raise PermissionError(f"{folder} belongs to uid {found.st_uid}")


def pack(op: int, topic: bytes, body: bytes = b"") -> bytes:
    """One frame: length, op, topic length, topic, body."""
    length = 4 + 3 + len(topic) + len(body)
    return length.to_bytes(4, "big") + bytes((op,)) + len(topic).to_bytes(2, "big") + topic + body


def split_frames(buffer: bytearray) -> list[bytes]:
    """Take the complete frames out of ``buffer`` (their payloads)."""
    frames = []
    position = 0
    size = len(buffer)
    while size - position >= 4:
        length = int.from_bytes(buffer[position : position + 4], "big")
        if length < 7 or length > MAX_FRAME:
            raise ValueError(f"bad channel frame length {length}")
        if size - position < length:
            break
        frames.append(bytes(buffer[position + 4 : position + length]))
        position += length
    if position:
        del buffer[:position]
    return frames


def unpack(frame: bytes) -> tuple[int, bytes, bytes]:
    """op, topic, body of a frame payload."""
    topic_end = 3 + int.from_bytes(frame[1:3], "big")
    return frame[0], frame[3:topic_end], frame[topic_end:]


class Link(asyncio.Protocol):
    """One end of a hub connection; hands complete frames to its owner."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        self.transport = transport  # type: ignore[assignment]
        self.owner.link_made(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            frames = split_frames(self.buffer)
        except ValueError as exc:
            log.error("channel: %s; closing the link", exc)
            if self.transport is not None:
                self.transport.abort()
            return
        for frame in frames:
            self.owner.frame_received(self, frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.owner.link_lost(self)

    def write(self, data: bytes, bounded: bool = False) -> bool:
        """Write one packed frame; False (and nothing written) if the link is closed.

        ``bounded`` (a message): also False if the peer is too far behind (more than
        ``LINK_BUFFER_LIMIT`` bytes waiting). Control frames are always written.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if bounded and transport.get_write_buffer_size() > LINK_BUFFER_LIMIT:
            return False
        transport.write(data)
        return True


# -- the hub process -----------------------------------------------------------------
class Hub:
    """The routing state of the hub: who subscribes to what, who holds how many of what."""

    def __init__(self) -> None:
        self.subscribers: dict[bytes, set[Link]] = {}
        self.topics_of: dict[Link, set[bytes]] = {}
        self.counts: dict[bytes, dict[Link, int]] = {}
        #: Messages dropped for each worker, not reported to it yet.
        self.unreported: dict[Link, int] = {}
        self.dropped = 0
        self.routed = 0

    def link_made(self, link: Link) -> None:
        self.topics_of[link] = set()

    def link_lost(self, link: Link) -> None:
        self.unreported.pop(link, None)
        for topic in self.topics_of.pop(link, ()):
            subscribers = self.subscribers.get(topic)
            if subscribers is not None:
                subscribers.discard(link)
                if not subscribers:
                    del self.subscribers[topic]
        for key in [key for key, holders in self.counts.items() if link in holders]:
            holders = self.counts[key]
            del holders[link]
            if not holders:
                del self.counts[key]

    def frame_received(self, link: Link, frame: bytes) -> None:
        op, topic, body = unpack(frame)
        if op == OP_PUBLISH:
            subscribers = self.subscribers.get(topic)
            if not subscribers:
                return
            message = None
            for subscriber in subscribers:
                if subscriber is link:
                    continue
                if message is None:
                    message = (len(frame) + 4).to_bytes(4, "big") + bytes((OP_MESSAGE,)) + frame[1:]
                if subscriber.write(message, bounded=True):
                    self.routed += 1
                else:
                    self.drop_for(subscriber)
        elif op == OP_SUBSCRIBE:
            self.subscribers.setdefault(topic, set()).add(link)
            self.topics_of.setdefault(link, set()).add(topic)
        elif op == OP_UNSUBSCRIBE:
            subscribers = self.subscribers.get(topic)
            if subscribers is not None:
                subscribers.discard(link)
                if not subscribers:
                    del self.subscribers[topic]
            self.topics_of.get(link, set()).discard(topic)
        elif op == OP_COUNT:
            count = int.from_bytes(body[:8], "big", signed=True)
            holders = self.counts.setdefault(topic, {})
            if count:
                holders[link] = count
            else:
                holders.pop(link, None)
                if not holders:
                    del self.counts[topic]
        elif op == OP_QUERY:
            total = sum(self.counts.get(topic, {}).values())
            link.write(pack(OP_ANSWER, b"", body[:4] + total.to_bytes(8, "big", signed=True)))


    def drop_for(self, link: Link) -> None:
        """A message for ``link`` was dropped: count it, and report it to that worker soon."""
        self.dropped += 1
        if not self.unreported:
            asyncio.get_running_loop().call_later(DROP_REPORT_DELAY, self.report_drops)
        self.unreported[link] = self.unreported.get(link, 0) + 1

    def report_drops(self) -> None:
        """Tell each worker how many messages were dropped for it (a D frame)."""
        unreported, self.unreported = self.unreported, {}
        for link, count in unreported.items():
            link.write(pack(OP_DROPPED, b"", count.to_bytes(8, "big")))


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def run_hub(address: str, owners: list[tuple[int, int]] | None = None) -> int:
    """Entry point of the hub process: serve until SIGTERM/SIGINT/SIGQUIT.

    The socket file is readable and writable by its owner only; when the workers run as
    another user (``owners``), it is given to that user, or opened to everyone when they
    run as several users. A private folder (:func:`private_folder`) is prepared before
    and removed after.
    """
    from ..loop import new_event_loop

    try:
        from setproctitle import setproctitle

        setproctitle("longshore: channel hub")
    except ImportError:  # pragma: no cover
        pass
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # reloads concern the workers
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    hub = Hub()
    folder = private_folder(address)
    if folder is not None:
        try:
            prepare_folder(folder, owners or [])
        except OSError as exc:
            log.error("channel hub: cannot prepare the folder of its socket %s: %s", folder, exc)
            loop.close()
            return 1

    async def serve() -> None:
        stopped = loop.create_future()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            loop.add_signal_handler(signum, _settle, stopped)
        try:
            os.unlink(address)
        except FileNotFoundError:
            pass
        old_mask = os.umask(0o177)
        try:
            server = await loop.create_unix_server(lambda: Link(hub), address)
        finally:
            os.umask(old_mask)
        if owners:
            if len(set(owners)) == 1:
                os.chown(address, *owners[0])
            else:
                os.chmod(address, 0o666)
        log.debug("channel hub pid %d listening on %s", os.getpid(), address)
        await stopped
        server.close()
        try:
            os.unlink(address)
            if folder is not None:
                os.rmdir(folder)
        except OSError:
            pass
        log.debug("channel hub: %d messages routed, %d dropped", hub.routed, hub.dropped)

    try:
        loop.run_until_complete(serve())
    finally:
        loop.close()
    return 0


# -- the worker side -----------------------------------------------------------------
class EmbeddedBackend:
    """A worker's connection to the hub (see the module docstring)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.link: Link | None = None
        self.connected = False
        self.stopping = False
        self.topics: set[str] = set()
        self.counts: dict[str, int] = {}
        self.queries: dict[int, asyncio.Future[int]] = {}
        self.next_query = 0
        self.retry_delay = RETRY_MIN
        self.ready: asyncio.Event | None = None
        self.connecting: asyncio.Task[None] | None = None  # kept referenced while it runs
        self.on_message: Callable[[str, bytes], None] = lambda topic, payload: None
        self.on_connected: Callable[[], None] = lambda: None

    async def start(self) -> None:
        """Connect; wait (up to 2 s) for the hub, which may still be starting."""
        self.ready = asyncio.Event()
        self._connect()
        try:
            await asyncio.wait_for(self.ready.wait(), 2.0)
        except asyncio.TimeoutError:
            log.warning("channel: the hub does not answer yet; retrying in the background")

    def _connect(self) -> None:
        if not self.stopping:
            self.connecting = asyncio.get_running_loop().create_task(self._try_connect())

    async def _try_connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_unix_connection(lambda: Link(self), self.address)
        except OSError as exc:
            delay, self.retry_delay = self.retry_delay, min(self.retry_delay * 2, RETRY_MAX)
            log.debug("channel: hub unreachable (%s); retrying in %.2f s", exc.strerror or exc, delay)
            loop.call_later(delay, self._connect)

    def link_made(self, link: Link) -> None:
        if self.stopping:
            if link.transport is not None:
                link.transport.close()
            return
        self.link = link
        self.connected = True
        self.retry_delay = RETRY_MIN
        for topic in self.topics:
            link.write(pack(OP_SUBSCRIBE, topic.encode()))
        for key, count in self.counts.items():
            link.write(pack(OP_COUNT, key.encode(), count.to_bytes(8, "big", signed=True)))
        if self.ready is not None:
            self.ready.set()
        self.on_connected()

    def link_lost(self, link: Link) -> None:
        if self.link is not link:
            return
        self.link = None
        self.connected = False
        if self.ready is not None:
            self.ready.clear()
        for future in self.queries.values():
            if not future.done():
                future.set_exception(ChannelError("the channel hub went away"))
        self.queries.clear()
        if not self.stopping:
            log.warning("channel: lost the hub; reconnecting")
            asyncio.get_running_loop().call_later(RETRY_MIN, self._connect)

    def frame_received(self, link: Link, frame: bytes) -> None:
        op, topic, body = unpack(frame)
        if op == OP_MESSAGE:
            self.on_message(topic.decode(), body)
        elif op == OP_ANSWER:
            future = self.queries.pop(int.from_bytes(body[:4], "big"), None)
            if future is not None and not future.done():
                future.set_result(int.from_bytes(body[4:12], "big", signed=True))
        elif op == OP_DROPPED:
            process_stats.channel_dropped += int.from_bytes(body[:8], "big")

    async def stop(self) -> None:
        """Close the link (the hub forgets this process's subscriptions and counts)."""
        self.stopping = True
        link = self.link
        if link is not None and link.transport is not None:
            link.transport.close()
            await asyncio.sleep(0)

    def subscribe(self, topic: str) -> None:
        if topic not in self.topics:
            self.topics.add(topic)
            if self.link is not None:
                self.link.write(pack(OP_SUBSCRIBE, topic.encode()))

    def unsubscribe(self, topic: str) -> None:
        if topic in self.topics:
            self.topics.discard(topic)
            if self.link is not None:
                self.link.write(pack(OP_UNSUBSCRIBE, topic.encode()))

    def publish(self, topic: str, payload: bytes) -> bool:
        link = self.link
        return link is not None and link.write(pack(OP_PUBLISH, topic.encode(), payload), bounded=True)

    def set_count(self, key: str, count: int) -> None:
        if count:
            self.counts[key] = count
        else:
            self.counts.pop(key, None)
        if self.link is not None:
            self.link.write(pack(OP_COUNT, key.encode(), count.to_bytes(8, "big", signed=True)))

    async def get_count(self, key: str) -> int:
        link = self.link
        if link is None:
            raise ChannelError("the channel hub is not connected")
        self.next_query = (self.next_query + 1) % (1 << 32)
        query = self.next_query
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.queries[query] = future
        if not link.write(pack(OP_QUERY, key.encode(), query.to_bytes(4, "big"))):
            self.queries.pop(query, None)
            raise ChannelError("the channel hub is not connected")
        try:
            return await asyncio.wait_for(future, QUERY_TIMEOUT)
        except asyncio.TimeoutError:
            self.queries.pop(query, None)
            raise ChannelError("the channel hub did not answer") from None

