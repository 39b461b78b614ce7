"""Per-process counters and the shared table through which ``status`` reads them.

Every worker counts in plain Python integers (:data:`process_stats`), which costs
nothing on the hot path. A timer in the worker copies the counters into its slot of a
memory-mapped file several times a second, together with a heartbeat. ``status`` maps
the same file and reads it without sending a signal or waiting for any process, so a
worker stuck in user code can never make ``status`` hang: its heartbeat stops moving,
which is exactly how it is shown as busy, with its last published figures.

Layout of the file: a header (magic, slot count, a sequence number and a JSON document
the master rewrites: its pid, start time, the exit table, the configured workers), then
fixed-size slots, one per live worker process. Each slot is written under a sequence
lock (odd while being written), so a reader never sees half an update.

``time.monotonic()`` is CLOCK_MONOTONIC on Linux: one clock for every process of the
machine, so heartbeats written by a worker can be compared by the status command.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import time
from dataclasses import dataclass
from typing import Any

MAGIC = b"LSST"
VERSION = 1
HEADER_SIZE = 256 * 1024
SLOT_SIZE = 512
# magic, version, slot count, header sequence, json length
_HEADER_PREFIX = struct.Struct("<4sIIQI")
# seq, pid, worker_id, state, started_at, heartbeat, connections, send_fail, timers,
# total_request, throw_exception, memory, qps, send_buffer_bytes, bytes_read,
# bytes_written, busy_since_wall, ..., name, listen, channel_published, channel_delivered,
# channel_dropped
_SEQ = struct.Struct("<Q")
_LENGTH = struct.Struct("<I")
_HEADER_SEQ_OFFSET = 12  # magic (4) + version (4) + slot count (4)
_SLOT = struct.Struct("<QqiidddqqqqqqdqqqqqqQ64s192sqqq")

STATE_FREE = 0
STATE_STARTING = 1
STATE_RUNNING = 2
STATE_STOPPING = 3
STATE_NAMES = {STATE_FREE: "free", STATE_STARTING: "starting", STATE_RUNNING: "running", STATE_STOPPING: "stopping"}

#: A worker whose heartbeat is older than this is shown as busy (stuck in a callback).
BUSY_AFTER = 0.75
#: How often a worker publishes its counters.
PUBLISH_INTERVAL = 0.2


class ProcessStats:
    """The counters of this process. Module-level singleton: :data:`process_stats`."""

    __slots__ = (
        "connections",
        "send_fail",
        "total_request",
        "throw_exception",
        "bytes_read",
        "bytes_written",
        "connect_fail",
        "protocol_error",
        "package_too_large",
        "tls_error",
        "channel_published",
        "channel_delivered",
        "channel_dropped",
    )

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Zero every counter (a new worker process starts from zero)."""
        self.connections = 0
        self.send_fail = 0
        self.total_request = 0
        self.throw_exception = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.connect_fail = 0
        self.protocol_error = 0
        self.package_too_large = 0
        self.tls_error = 0
        self.channel_published = 0
        self.channel_delivered = 0
        self.channel_dropped = 0


process_stats = ProcessStats()


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * mmap.PAGESIZE
    except (OSError, IndexError, ValueError):
        return 0


@dataclass
class SlotRecord:
    """One worker's published figures, as read from the table."""

    slot: int
    pid: int
    worker_id: int
    state: int
    started_at: float
    heartbeat: float
    connections: int
    send_fail: int
    timers: int
    total_request: int
    throw_exception: int
    memory: int
    qps: float
    send_buffer_bytes: int
    bytes_read: int
    bytes_written: int
    busy_since: float
    protocol_error: int
    package_too_large: int
    connect_fail: int
    tls_error: int
    name: str
    listen: str
    channel_published: int = 0
    channel_delivered: int = 0
    channel_dropped: int = 0

    @property
    def busy_for(self) -> float:
        """Seconds since the worker's loop last came round (0 when it is idle)."""
        if self.heartbeat <= 0:
            return 0.0
        lag = time.monotonic() - self.heartbeat
        return lag if lag > BUSY_AFTER else 0.0


class StatsTable:
    """A memory-mapped table of worker slots plus a JSON header owned by the master."""

    def __init__(self, path: str, mapping: mmap.mmap, slots: int, identity: tuple[int, int] = (0, 0)) -> None:
        self.path = path
        self.map = mapping
        self.slots = slots
        #: (device, inode) of the mapped file: each master start makes a new one.
        self.identity = identity

    def is_current(self) -> bool:
        """True while ``path`` still names the file this table maps (False once a
        new master has put its own table there, or the file is gone)."""
        try:
            info = os.stat(self.path)
        except OSError:
            return False
        return (info.st_dev, info.st_ino) == self.identity

    # -- creation and opening ------------------------------------------------------
    @classmethod
    def create(cls, path: str, slots: int) -> StatsTable:
        """Create a fresh table file with ``slots`` slots and map it shared.

        The table is built under a temporary name and renamed over ``path``: processes
        that still map an older table (orphans of a master that was killed) keep writing
        into their own, now unnamed, file instead of into this one, and the old file is
        never truncated under them (which would kill them with SIGBUS)."""
        size = HEADER_SIZE + slots * SLOT_SIZE
        temporary = f"{path}.{os.getpid()}.new"
        try:
            os.unlink(temporary)  # left by a master that died right here
        except FileNotFoundError:
            pass
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            _HEADER_PREFIX.pack_into(mapping, 0, MAGIC, VERSION, slots, 0, 0)
            os.rename(temporary, path)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
        info = os.fstat(fd)
        os.close(fd)
        return cls(path, mapping, slots, (info.st_dev, info.st_ino))

    @classmethod
    def open(cls, path: str) -> StatsTable:
        """Map an existing table read-only (the status command)."""
        with open(path, "rb") as file:
            mapping = mmap.mmap(file.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ)
            info = os.fstat(file.fileno())
        magic, version, slots, _, _ = _HEADER_PREFIX.unpack_from(mapping, 0)
        if magic != MAGIC or version != VERSION:
            mapping.close()
            raise ValueError(f"{path} is not a longshore status table")
        return cls(path, mapping, slots, (info.st_dev, info.st_ino))

    def close(self) -> None:
        """Unmap the table."""
        self.map.close()

    # -- header (master only) ------------------------------------------------------
    def write_header(self, document: dict[str, Any]) -> None:
        """Replace the header JSON document."""
        data = json.dumps(document, separators=(",", ":")).encode()
        limit = HEADER_SIZE - _HEADER_PREFIX.size
        if len(data) > limit:
            data = json.dumps({**document, "exits": document.get("exits", [])[:100]}, separators=(",", ":")).encode()
        if len(data) > limit:
            data = json.dumps({**document, "exits": []}, separators=(",", ":")).encode()[:limit]
        seq = _HEADER_PREFIX.unpack_from(self.map, 0)[3]
        seq += seq & 1  # odd: a writer died mid-write
        # Only the sequence word changes first: struct.pack_into zeroes its whole area
        # before writing, which a reader could take for a finished even sequence.
        _SEQ.pack_into(self.map, _HEADER_SEQ_OFFSET, seq + 1)
        self.map[_HEADER_PREFIX.size : _HEADER_PREFIX.size + len(data)] = data
        _LENGTH.pack_into(self.map, _HEADER_SEQ_OFFSET + 8, len(data))
        _SEQ.pack_into(self.map, _HEADER_SEQ_OFFSET, seq + 2)

    def read_header(self) -> dict[str, Any]:
        """Read the header JSON document written by the master."""
        for _ in range(100):
            _, _, _, seq, length = _HEADER_PREFIX.unpack_from(self.map, 0)
            if seq % 2:
                time.sleep(0.001)
                continue
            data = self.map[_HEADER_PREFIX.size : _HEADER_PREFIX.size + length]
            if _HEADER_PREFIX.unpack_from(self.map, 0)[3] == seq:
                return json.loads(data) if data else {}
        return {}

    # -- slots ---------------------------------------------------------------------
    def _offset(self, slot: int) -> int:
        return HEADER_SIZE + slot * SLOT_SIZE

    def claim(self, pid: int, worker_id: int, name: str, listen: str) -> int:
        """Master: take a free slot for a new worker process; return its index. Every
        field of the slot is written: nothing of the process that had it before stays."""
        for slot in range(self.slots):
            if self._read_raw(slot)[3] == STATE_FREE:
                self.write_slot(
                    slot,
                    **{
                        **_ZERO_RECORD,
                        "pid": pid,
                        "worker_id": worker_id,
                        "state": STATE_STARTING,
                        "started_at": time.time(),
                        "name": name,
                        "listen": listen,
                    },
                )
                return slot
        raise RuntimeError("status table is full")

    def set_pid(self, slot: int, pid: int) -> None:
        """Master: record the pid of the process just forked for a claimed slot."""
        self.write_slot(slot, pid=pid)

    def release(self, slot: int) -> None:
        """Master: free the slot of a process that has exited."""
        self.write_slot(slot, **_ZERO_RECORD)

    def set_state(self, slot: int, state: int) -> None:
        """Change only the state of a slot."""
        self.write_slot(slot, state=state)

    def _read_raw(self, slot: int) -> tuple[Any, ...]:
        offset = self._offset(slot)
        for _ in range(1000):
            values = _SLOT.unpack_from(self.map, offset)
            if values[0] % 2 == 0 and _SLOT.unpack_from(self.map, offset)[0] == values[0]:
                return values
        return values

    def write_slot(self, slot: int, **fields: Any) -> None:
        """Update some fields of a slot under its sequence lock. Only the bytes of the
        given fields are written, so a writer never puts back stale copies of fields
        that another process (the master, or the worker) changed meanwhile."""
        offset = self._offset(slot)
        seq = _SEQ.unpack_from(self.map, offset)[0]
        seq += seq & 1  # odd: a writer died mid-write
        _SEQ.pack_into(self.map, offset, seq + 1)
        for key, value in fields.items():
            field_offset, field = _FIELD_STRUCTS[key]
            if key in ("name", "listen"):
                value = value.encode()[: field.size] if isinstance(value, str) else value
            field.pack_into(self.map, offset + field_offset, value)
        _SEQ.pack_into(self.map, offset, seq + 2)

    def read_slots(self) -> list[SlotRecord]:
        """Every slot in use, in slot order."""
        records = []
        for slot in range(self.slots):
            values = self._read_raw(slot)
            if values[3] == STATE_FREE:
                continue
            fields = dict(zip(_FIELDS, values))
            fields.pop("seq")
            fields["name"] = fields["name"].rstrip(b"\0").decode(errors="replace")
            fields["listen"] = fields["listen"].rstrip(b"\0").decode(errors="replace")
            records.append(SlotRecord(slot=slot, **fields))
        return records


_FIELDS = (
    "seq",
    "pid",
    "worker_id",
    "state",
    "started_at",
    "heartbeat",
    "busy_since",
    "connections",
    "send_fail",
    "timers",
    "total_request",
    "throw_exception",
    "memory",
    "qps",
    "send_buffer_bytes",
    "bytes_read",
    "bytes_written",
    "protocol_error",
    "package_too_large",
    "connect_fail",
    "tls_error",
    "name",
    "listen",
    "channel_published",
    "channel_delivered",
    "channel_dropped",
)


def _field_structs() -> dict[str, tuple[int, struct.Struct]]:
    """Each field's offset in a slot and the struct of that field alone."""
    codes = re.findall(r"\d*[a-zA-Z]", _SLOT.format[1:])
    assert len(codes) == len(_FIELDS), "slot layout mismatch"
    result: dict[str, tuple[int, struct.Struct]] = {}
    offset = 0
    for name, code in zip(_FIELDS, codes):
        field = struct.Struct("<" + code)
        result[name] = (offset, field)
        offset += field.size
    assert offset == _SLOT.size
    return result


_FIELD_STRUCTS = _field_structs()
#: Every field of a slot but its sequence number, zeroed (a free slot).
_ZERO_RECORD: dict[str, Any] = dict(zip(_FIELDS[1:], _SLOT.unpack(bytes(_SLOT.size))[1:]))
assert _SLOT.size <= SLOT_SIZE
