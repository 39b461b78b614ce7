"""The Redis channel: pub/sub and counts through redis-py's asyncio client.

Each worker process holds two Redis connections: one subscribed (pub/sub), read by a
task that hands every message to the channel, and one for commands, used by a writer
task that sends what the process publishes in pipelined batches (a broadcast from an
event loop callback never waits for Redis).

Counts: each process writes how many connections it holds for a key into the hash
``<prefix>:count:<key>`` (field: its process address) and keeps a key
``<prefix>:alive:<address>`` with a short expiry alive. A query adds up the fields of
live processes only, so a process that died without cleaning up stops counting within
``ALIVE_SECONDS``; the same query (a Lua script, so atomically) deletes the fields of
processes whose alive key is gone. A process whose alive key had expired while it lived
(it could not refresh it for ``ALIVE_SECONDS``: its fields may have been deleted)
finds it out when it refreshes the key (``SET NX`` creates it) and rewrites its counts.

A count is written as it is when the writer sends it, not as it was when it changed:
``set_count`` marks the key dirty, and the writer's next batch writes its current value
(``HSET``, or ``HDEL`` once it is zero). A batch that fails marks its keys dirty again
(tried again shortly); a reconnection rewrites every key this process ever wrote, so a
count that dropped to zero during an outage is deleted too (Redis may have kept the
old value, or loaded it from disk). Count writes go out one pipeline at a time, so an
older value can never land after a newer one.

Outages: when the subscribed connection fails, or a batch or count query fails to
reach Redis or times out (a Redis that stalls keeps its connections open), the process
marks itself disconnected and tries again with a growing delay (50 ms up to 1 s). Once
back, it subscribes again and rewrites its counts and alive key (Redis may have
restarted empty). While disconnected, ``publish`` refuses at once (the channel counts
the message as dropped); the messages of a batch that fails to reach Redis, and those
still waiting behind it, are counted as dropped too. Messages waiting for the writer
are bounded by size (``OUTBOX_LIMIT`` bytes), beyond which ``publish`` refuses.
Messages that others published to this process during the outage are lost: Redis
pub/sub keeps nothing for an absent subscriber.

Subscriptions made while the subscribed connection is being set up are sent once it is
up (``SUBSCRIBE`` takes its topic list before it connects).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Callable

from ..stats import process_stats
from .core import ChannelError

log = logging.getLogger("longshore")

RETRY_MIN = 0.05
RETRY_MAX = 1.0
ALIVE_SECONDS = 10
ALIVE_REFRESH = 3.0
#: Bytes of messages waiting for the writer (or in its batch) beyond which ``publish``
#: refuses (Redis is too slow, or stalls); like the embedded hub's LINK_BUFFER_LIMIT.
OUTBOX_LIMIT = 64 * 1024 * 1024
BATCH = 1000

#: Adds up the count fields of ``KEYS[1]`` whose process is alive (key ``ARGV[1]`` +
#: field), except the field ``ARGV[2]`` (the caller's own), and deletes the others.
COUNT_SCRIPT = """
local total = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
    local address = fields[i]
    if address ~= ARGV[2] then
        if redis.call('EXISTS', ARGV[1] .. address) == 1 then
            total = total + tonumber(fields[i + 1])
        else
            redis.call('HDEL', KEYS[1], address)
        end
    end
end
return total
"""


class RedisBackend:
    """A worker's link to Redis (see the module docstring)."""

    def __init__(self, url: str, address: str, prefix: str) -> None:
        self.url = url
        self.address = address
        self.prefix = prefix
        self.connected = False
        self.stopping = False
        self.topics: set[str] = set()
        self.counts: dict[str, int] = {}
        #: Keys whose field this process may have written and not deleted since.
        self.written: set[str] = set()
        #: Keys whose current count is still to be written.
        self.dirty: set[str] = set()
        self.count_lock: asyncio.Lock | None = None
        self.outbox: deque[tuple[Any, ...]] = deque()
        #: Payload bytes of the messages in ``outbox`` and in the batch being sent.
        self.outbox_bytes = 0
        #: A command failed to reach Redis: the reader drops the subscribed connection.
        self.link_failed = False
        self.wake: asyncio.Event | None = None
        self.ready: asyncio.Event | None = None
        self.client: Any = None
        self.pubsub: Any = None
        self.tasks: list[asyncio.Task[Any]] = []
        self.subscribing: set[asyncio.Task[Any]] = set()
        self.unsubscribing: set[asyncio.Task[Any]] = set()
        self.control_topic = f"{prefix}:ctl:{address}"
        self.alive_key = f"{prefix}:alive:{address}"
        self.count_script: Any = None
        self.on_message: Callable[[str, bytes], None] = lambda topic, payload: None
        self.on_connected: Callable[[], None] = lambda: None

    def _new_client(self) -> Any:
        import redis.asyncio
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No retries inside redis-py: a failure must reach this backend, which then
        # resubscribes and rewrites its counts itself.
        return redis.asyncio.Redis.from_url(self.url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=2.0)

    async def start(self) -> None:
        """Start the reader and writer tasks; wait (up to 2 s) for the first connection."""
        self.wake = asyncio.Event()
        self.ready = asyncio.Event()
        self.count_lock = asyncio.Lock()
        self.client = self._new_client()
        self.count_script = self.client.register_script(COUNT_SCRIPT)
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._read_loop()), loop.create_task(self._write_loop()), loop.create_task(self._keep_alive())]
        try:
            await asyncio.wait_for(self.ready.wait(), 2.0)
        except asyncio.TimeoutError:
            log.warning("channel: Redis %s is not reachable yet; retrying in the background", self.url)

    async def stop(self) -> None:
        """Flush what waits, remove this process's counts, close the connections."""
        self.stopping = True
        if self.connected:
            self.counts.clear()
            self.dirty |= self.written
            self.outbox.append(("delete", self.alive_key))
            if self.wake is not None:
                self.wake.set()
            for _ in range(100):
                if not self.outbox and not self.dirty:
                    break
                await asyncio.sleep(0.01)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for closable in (self.pubsub, self.client):
            if closable is not None:
                try:
                    await closable.aclose()
                except Exception:
                    pass

    # -- reading (subscriptions) ---------------------------------------------------
    async def _read_loop(self) -> None:
        delay = RETRY_MIN
        while not self.stopping:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            self.link_failed = False
            try:
                await self._subscribe_all(pubsub)
                await self._resync()
                self.connected = True
                delay = RETRY_MIN
                assert self.ready is not None and self.wake is not None
                self.ready.set()
                self.wake.set()  # counts that changed during the resync
                log.info("channel: connected to Redis %s", self.url)
                self.on_connected()
                while not self.link_failed:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "message":
                        self.on_message(message["channel"].decode(), message["data"])
                raise ConnectionError("a command to Redis failed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connected:
                    log.warning("channel: lost Redis %s (%s); reconnecting", self.url, exc)
                else:
                    log.debug("channel: Redis %s unreachable (%s)", self.url, exc)
            finally:
                self.connected = False
                self.pubsub = None
                if self.ready is not None:
                    self.ready.clear()
                try:
                    await pubsub.aclose()
                except Exception:
                    pass
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _subscribe_all(self, pubsub: Any) -> None:
        """Subscribe ``pubsub`` to the control topic and ``self.topics``, then make it
        the one that ``subscribe`` and ``unsubscribe`` use.

        Until then they only change ``self.topics``, which may change while this
        connects: what changed meanwhile is sent once connected.
        """
        sent = set(self.topics)
        await pubsub.subscribe(self.control_topic, *sent)
        self.pubsub = pubsub
        added, removed = self.topics - sent, sent - self.topics
        if added:
            await pubsub.subscribe(*added)
        if removed:
            await pubsub.unsubscribe(*removed)

    async def _resync(self) -> None:
        """Rewrite this process's counts and alive key (Redis may have restarted empty,
        or with values that changed during the outage)."""
        assert self.count_lock is not None
        async with self.count_lock:
            pipe = self.client.pipeline(transaction=False)
            pipe.set(self.alive_key, 1, ex=ALIVE_SECONDS)
            keys = self.written | self.dirty
            self.dirty.clear()
            self._write_counts(pipe, keys)
            await self._execute_counts(pipe, keys)

    def _write_counts(self, pipe: Any, keys: set[str]) -> None:
        """Add the current value of each key's count to ``pipe``."""
        for key in keys:
            count = self.counts.get(key, 0)
            if count:
                pipe.hset(f"{self.prefix}:count:{key}", self.address, count)
            else:
                pipe.hdel(f"{self.prefix}:count:{key}", self.address)

    async def _execute_counts(self, pipe: Any, keys: set[str]) -> None:
        """Run ``pipe``, which writes ``keys``; if it fails, they are dirty again."""
        try:
            await pipe.execute()
        except BaseException:
            self.dirty |= keys
            raise
        self.written -= {key for key in keys if key not in self.counts}

    def subscribe(self, topic: str) -> None:
        if topic in self.topics:
            return
        self.topics.add(topic)
        if self.pubsub is not None:
            task = asyncio.get_running_loop().create_task(self._pubsub_call("subscribe", topic))
            self.subscribing.add(task)
            task.add_done_callback(self.subscribing.discard)

    def unsubscribe(self, topic: str) -> None:
        if topic not in self.topics:
            return
        self.topics.discard(topic)
        if self.pubsub is not None:
            task = asyncio.get_running_loop().create_task(self._pubsub_call("unsubscribe", topic))
            self.unsubscribing.add(task)  # kept referenced until done
            task.add_done_callback(self.unsubscribing.discard)

    async def _pubsub_call(self, method: str, topic: str) -> None:
        pubsub = self.pubsub
        if pubsub is None:
            return  # the next connection subscribes to self.topics
        try:
            await getattr(pubsub, method)(topic)
        except Exception as exc:
            log.debug("channel: %s %s failed (%s); done again on reconnection", method, topic, exc)

    # -- writing (publishing and counts) ---------------------------------------------
    def publish(self, topic: str, payload: bytes) -> bool:
        if not self.connected or self.outbox_bytes > OUTBOX_LIMIT:
            return False
        self.outbox.append(("publish", topic, payload))
        self.outbox_bytes += len(payload)
        assert self.wake is not None
        self.wake.set()
        return True

    def set_count(self, key: str, count: int) -> None:
        if count:
            self.counts[key] = count
            self.written.add(key)
        else:
            self.counts.pop(key, None)
        self.dirty.add(key)
        if self.connected:  # else written on reconnection
            assert self.wake is not None
            self.wake.set()

    async def _write_loop(self) -> None:
        assert self.wake is not None and self.count_lock is not None
        outbox = self.outbox
        while True:
            await self.wake.wait()
            self.wake.clear()
            while outbox or (self.dirty and self.connected):
                async with self.count_lock:
                    if self.subscribing:
                        # A count announces members only once their topic is subscribed:
                        # whoever sees the count may send to them at once.
                        await asyncio.gather(*list(self.subscribing), return_exceptions=True)
                    failed = await self._write_batch()
                if failed:
                    # Counts are tried again shortly (or by the resync of a reconnection).
                    asyncio.get_running_loop().call_later(RETRY_MIN, self.wake.set)
                    break

    async def _write_batch(self) -> bool:
        """Send one batch: queued commands and the dirty counts. True if it failed."""
        outbox = self.outbox
        batch = [outbox.popleft() for _ in range(min(BATCH, len(outbox)))]
        size = sum(len(command[2]) for command in batch if command[0] == "publish")
        keys: set[str] = set()
        if self.connected:
            keys, self.dirty = self.dirty, set()
        pipe = self.client.pipeline(transaction=False)
        for command in batch:
            getattr(pipe, command[0])(*command[1:])
        self._write_counts(pipe, keys)
        try:
            await self._execute_counts(pipe, keys)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            lost = sum(1 for command in batch if command[0] == "publish")
            process_stats.channel_dropped += lost
            if lost:
                log.warning("channel: %d message(s) to Redis lost (%s)", lost, exc)
            if keys:
                log.warning("channel: %d count(s) not written to Redis (%s); trying again", len(keys), exc)
            if _is_link_error(exc):
                self._lose_link(exc)
            return bool(keys)
        finally:
            self.outbox_bytes -= size
        return False

    def _lose_link(self, exc: BaseException) -> None:
        """A command failed to reach Redis, or timed out: refuse to publish, drop what
        waits to be sent, and have the reader connect again (which resyncs)."""
        lost = [command for command in self.outbox if command[0] == "publish"]
        self.outbox.clear()
        self.outbox_bytes -= sum(len(command[2]) for command in lost)
        process_stats.channel_dropped += len(lost)
        if self.connected:  # else the reader knows already (or is connecting)
            self.connected = False
            self.link_failed = True
            log.warning("channel: Redis %s failed (%s); reconnecting", self.url, exc)
        if lost:
            log.warning("channel: %d message(s) waiting for Redis lost", len(lost))

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(ALIVE_REFRESH)
            if self.connected and not self.stopping:
                await self._refresh_alive()

    async def _refresh_alive(self) -> None:
        """Refresh the alive key. If it had expired, another process may have deleted
        this process's count fields since (see ``COUNT_SCRIPT``): write them again."""
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.alive_key, 1, ex=ALIVE_SECONDS, nx=True)  # only if it had expired
        pipe.expire(self.alive_key, ALIVE_SECONDS)
        try:
            created, _ = await pipe.execute()
        except Exception as exc:
            log.debug("channel: the alive key not refreshed (%s)", exc)
            if _is_link_error(exc):
                self._lose_link(exc)
            return
        if created and self.connected:
            self.dirty |= self.written
            assert self.wake is not None
            self.wake.set()

    # -- counts ----------------------------------------------------------------------
    async def get_count(self, key: str) -> int:
        if not self.connected:
            raise ChannelError(f"Redis {self.url} is not connected")
        try:
            total = await self.count_script(keys=[f"{self.prefix}:count:{key}"], args=[f"{self.prefix}:alive:", self.address])
        except Exception as exc:
            if _is_link_error(exc):
                self._lose_link(exc)
            raise ChannelError(f"Redis {self.url}: {exc}") from exc
        return int(total) + self.counts.get(key, 0)


def _is_link_error(exc: BaseException) -> bool:
    """Whether ``exc`` says Redis could not be reached (or did not answer in time), as
    opposed to an error reply."""
    from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeoutError

    return isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError))
