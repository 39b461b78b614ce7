"""Addressing connections wherever they are: client ids, uids, groups.

Each worker process keeps only its own connections' bindings (uid, groups) and, on the
channel, subscribes to one topic per uid and per group it holds members of, plus one
topic for itself (``send_to_client``) and one for its Worker (``send_to_all``). A send is
delivered at once to the matching connections of the sending process and published
once; every other process that holds matching connections gets it from the channel
and delivers it to them. A message therefore crosses the channel once per process,
never once per connection.

``send_to_all`` reaches the connections accepted by the sending Worker: the processes
of the Worker with the same name, in every instance. Never outgoing connections
(``AsyncTcpConnection``), never the connections of other Workers (an HTTP keep-alive
connection of another Worker would otherwise get bytes in the middle of its responses).

Delivery to a connection is ``conn.send()``, so each connection's send buffer contract
holds: a client that does not read loses its own copies (counted in ``send_fail`` and
in the channel's ``dropped``), and nobody else waits for it.

Counts (``is_online``, ``group_count``) are kept per process by the backend: every
process announces how many connections it holds for a uid or a group, and a query adds
them up over the live processes.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Iterable

from ..stats import process_stats
from .core import Channel, check_wire_topic, encode_envelope, parse_client_id

if TYPE_CHECKING:
    from ..connection.tcp import TcpConnection


def _current_worker_name() -> str:
    from ..worker import Worker

    worker = Worker.current
    return worker.name if worker is not None else "none"


class Gateway:
    """The uid and group bindings of this process's connections, and the ``send_to_*`` calls."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.address = channel.address
        prefix = channel.prefix
        self.process_topic = f"{prefix}:gw:p:{self.address}"
        #: ``send_to_all``'s topic: one per Worker name, shared by its processes everywhere.
        self.all_topic = f"{prefix}:gw:all:{_current_worker_name()}"
        self.uid_prefix = f"{prefix}:gw:u:"
        self.group_prefix = f"{prefix}:gw:g:"
        self.uid_of: dict[TcpConnection, str] = {}
        self.by_uid: dict[str, set[TcpConnection]] = {}
        self.groups_of: dict[TcpConnection, set[str]] = {}
        self.members: dict[str, set[TcpConnection]] = {}
        channel.route(self.process_topic, self._on_process_message)
        channel.route(self.all_topic, self._on_all_message)

    # -- ids -----------------------------------------------------------------------
    def client_id(self, connection: TcpConnection) -> str:
        """The globally unique id of ``connection``."""
        return f"{self.address}-{connection.id:x}"

    def _local_ids(self, exclude: Iterable[str]) -> set[int]:
        ids = set()
        for client_id in exclude:
            try:
                parsed = parse_client_id(client_id)
            except ValueError:
                continue
            if parsed.process == self.address:
                ids.add(parsed.connection_id)
        return ids

    def _exclude_list(self, exclude: Any) -> list[str]:
        if exclude is None:
            return []
        if isinstance(exclude, str) or hasattr(exclude, "send"):
            exclude = [exclude]
        return [item if isinstance(item, str) else self.client_id(item) for item in exclude]

    # -- bindings ------------------------------------------------------------------
    def bind_uid(self, connection: TcpConnection, uid: str) -> None:
        uid = str(uid)
        check_wire_topic(self.uid_prefix + uid, "uid", uid)
        if connection.closed:
            return
        current = self.uid_of.get(connection)
        if current == uid:
            return
        if current is not None:
            self.unbind_uid(connection)
        self.uid_of[connection] = uid
        holders = self.by_uid.setdefault(uid, set())
        holders.add(connection)
        if len(holders) == 1:
            self.channel.route(self.uid_prefix + uid, functools.partial(self._on_uid_message, uid))
        self.channel.backend.set_count(f"u:{uid}", len(holders))

    def unbind_uid(self, connection: TcpConnection) -> None:
        uid = self.uid_of.pop(connection, None)
        if uid is None:
            return
        holders = self.by_uid.get(uid)
        if holders is None:
            return
        holders.discard(connection)
        self.channel.backend.set_count(f"u:{uid}", len(holders))
        if not holders:
            del self.by_uid[uid]
            self.channel.unroute(self.uid_prefix + uid)

    def join_group(self, connection: TcpConnection, group: str) -> None:
        group = str(group)
        check_wire_topic(self.group_prefix + group, "group", group)
        if connection.closed:
            return
        groups = self.groups_of.setdefault(connection, set())
        if group in groups:
            return
        groups.add(group)
        members = self.members.setdefault(group, set())
        members.add(connection)
        if len(members) == 1:
            self.channel.route(self.group_prefix + group, functools.partial(self._on_group_message, group))
        self.channel.backend.set_count(f"g:{group}", len(members))

    def leave_group(self, connection: TcpConnection, group: str) -> None:
        group = str(group)
        groups = self.groups_of.get(connection)
        if not groups or group not in groups:
            return
        groups.discard(group)
        if not groups:
            del self.groups_of[connection]
        members = self.members.get(group)
        if members is None:
            return
        members.discard(connection)
        self.channel.backend.set_count(f"g:{group}", len(members))
        if not members:
            del self.members[group]
            self.channel.unroute(self.group_prefix + group)

    def forget(self, connection: TcpConnection) -> None:
        """A connection closed: drop its uid and groups."""
        if connection in self.uid_of:
            self.unbind_uid(connection)
        groups = self.groups_of.get(connection)
        if groups:
            for group in list(groups):
                self.leave_group(connection, group)

    # -- sending -------------------------------------------------------------------
    @staticmethod
    def deliver(connections: Iterable[TcpConnection], message: Any, exclude: set[int] | None = None) -> int:
        """``send()`` to each connection; count what was accepted and what was refused."""
        accepted = 0
        for connection in list(connections):
            if exclude and connection.id in exclude:
                continue
            if connection.send(message) is False:
                process_stats.channel_dropped += 1
            else:
                accepted += 1
        process_stats.channel_delivered += accepted
        return accepted

    def _local_connections(self) -> dict[int, TcpConnection]:
        from ..worker import Worker

        worker = Worker.current
        return worker.connections if worker is not None else {}

    def _accepted_connections(self) -> list[TcpConnection]:
        """This process's connections accepted by its Worker (not the outgoing ones)."""
        from ..connection.async_tcp import AsyncTcpConnection

        return [connection for connection in self._local_connections().values() if not isinstance(connection, AsyncTcpConnection)]

    def send_to_client(self, client_id: str, message: Any) -> bool:
        """ValueError, before anything is sent or counted, if ``client_id`` is not one."""
        parsed = parse_client_id(client_id)
        topic = f"{self.channel.prefix}:gw:p:{parsed.process}"
        check_wire_topic(topic, "client id", client_id)
        process_stats.channel_published += 1
        if parsed.process == self.address:
            connection = self._local_connections().get(parsed.connection_id)
            if connection is None:
                process_stats.channel_dropped += 1
                return False
            return self.deliver((connection,), message) == 1
        return self.channel.send(topic, encode_envelope(self.address, message, {"c": parsed.connection_id}))

    def send_to_uid(self, uid: str, message: Any) -> bool:
        uid = str(uid)
        check_wire_topic(self.uid_prefix + uid, "uid", uid)
        process_stats.channel_published += 1
        holders = self.by_uid.get(uid)
        if holders:
            self.deliver(holders, message)
        return self.channel.send(self.uid_prefix + uid, encode_envelope(self.address, message))

    def send_to_group(self, group: str, message: Any, exclude: Any = None) -> bool:
        group = str(group)
        check_wire_topic(self.group_prefix + group, "group", group)
        excluded = self._exclude_list(exclude)
        process_stats.channel_published += 1
        members = self.members.get(group)
        if members:
            self.deliver(members, message, self._local_ids(excluded))
        extra = {"x": excluded} if excluded else None
        return self.channel.send(self.group_prefix + group, encode_envelope(self.address, message, extra))

    def send_to_all(self, message: Any, exclude: Any = None) -> bool:
        excluded = self._exclude_list(exclude)
        process_stats.channel_published += 1
        self.deliver(self._accepted_connections(), message, self._local_ids(excluded))
        extra = {"x": excluded} if excluded else None
        return self.channel.send(self.all_topic, encode_envelope(self.address, message, extra))

    # -- receiving -----------------------------------------------------------------
    def _on_process_message(self, header: dict[str, Any], message: Any) -> None:
        connection = self._local_connections().get(header.get("c", -1))
        if connection is None:
            process_stats.channel_dropped += 1
            return
        self.deliver((connection,), message)

    def _on_uid_message(self, uid: str, header: dict[str, Any], message: Any) -> None:
        holders = self.by_uid.get(uid)
        if holders:
            self.deliver(holders, message)

    def _on_group_message(self, group: str, header: dict[str, Any], message: Any) -> None:
        members = self.members.get(group)
        if members:
            excluded = header.get("x")
            self.deliver(members, message, self._local_ids(excluded) if excluded else None)

    def _on_all_message(self, header: dict[str, Any], message: Any) -> None:
        excluded = header.get("x")
        self.deliver(self._accepted_connections(), message, self._local_ids(excluded) if excluded else None)

    # -- counts --------------------------------------------------------------------
    async def uid_count(self, uid: str) -> int:
        check_wire_topic(self.uid_prefix + uid, "uid", uid)
        return await self.channel.backend.get_count(f"u:{uid}")

    async def group_count(self, group: str) -> int:
        check_wire_topic(self.group_prefix + group, "group", group)
        return await self.channel.backend.get_count(f"g:{group}")

