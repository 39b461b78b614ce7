"""Timers: ``Timer.add(interval, fn, *args, persistent=True)``.

In a worker, timers run on the worker's event loop. In the master (from a master hook
such as ``Worker.on_master_start``) they run in the master's own loop, between its
checks for signals and exited children. A persistent timer fires at a fixed rate
(``interval``, ``2 * interval``, ... after it was added) and skips beats it missed
instead of firing them in a burst. ``fn`` may be a coroutine function; each firing
then runs as its own task, cancelled when the worker stops if it is still running. An exception in ``fn`` is logged and counted
(``throw_exception``); a persistent timer keeps firing.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from typing import Any, Callable

from . import tasks
from .stats import process_stats

log = logging.getLogger("longshore")


class _Entry:
    __slots__ = ("timer_id", "interval", "fn", "args", "persistent", "due", "handle", "cancelled")

    def __init__(self, timer_id: int, interval: float, fn: Callable[..., Any], args: tuple[Any, ...], persistent: bool):
        self.timer_id = timer_id
        self.interval = interval
        self.fn = fn
        self.args = args
        self.persistent = persistent
        self.due = 0.0
        self.handle: asyncio.TimerHandle | None = None
        self.cancelled = False

    def __lt__(self, other: _Entry) -> bool:
        return self.due < other.due


def _run_callback(entry: _Entry) -> None:
    try:
        result = entry.fn(*entry.args)
        if asyncio.iscoroutine(result):
            tasks.run_coroutine(result, f"timer {entry.timer_id} ({entry.fn!r})")
    except Exception:
        process_stats.throw_exception += 1
        log.exception("exception in timer %d (%r)", entry.timer_id, entry.fn)


class Timer:
    """Add and delete timers; every method is a class method."""

    _ids = itertools.count(1)
    _timers: dict[int, _Entry] = {}
    # The master's scheduler: a heap of entries polled by the master loop.
    _master_heap: list[_Entry] = []
    _in_master = False

    @classmethod
    def add(cls, interval: float, fn: Callable[..., Any], *args: Any, persistent: bool = True) -> int:
        """Call ``fn(*args)`` after ``interval`` seconds (every ``interval`` if persistent).

        Returns the timer id for :meth:`delete`.
        """
        if interval <= 0:
            raise ValueError("a timer interval must be greater than 0")
        if not callable(fn):
            raise TypeError("a timer needs a callable")
        entry = _Entry(next(cls._ids), float(interval), fn, args, persistent)
        if cls._in_master:
            entry.due = time.monotonic() + entry.interval
            heapq.heappush(cls._master_heap, entry)
        else:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError(
                    "Timer.add needs a running worker or master: call it from "
                    "on_worker_start (or Worker.on_master_start for the master)"
                ) from None
            entry.due = loop.time() + entry.interval
            entry.handle = loop.call_at(entry.due, cls._fire, entry)
        cls._timers[entry.timer_id] = entry
        return entry.timer_id

    @classmethod
    def _next_due(cls, entry: _Entry, now: float) -> float:
        due = entry.due + entry.interval
        if due <= now:  # missed beats: skip them rather than firing in a burst
            due += ((now - due) // entry.interval + 1) * entry.interval
        return due

    @classmethod
    def _fire(cls, entry: _Entry) -> None:
        if entry.cancelled:
            return
        if entry.persistent:
            loop = asyncio.get_running_loop()
            entry.due = cls._next_due(entry, loop.time())
            entry.handle = loop.call_at(entry.due, cls._fire, entry)
        else:
            cls._timers.pop(entry.timer_id, None)
        _run_callback(entry)

    @classmethod
    def delete(cls, timer_id: int) -> bool:
        """Cancel a timer; returns False if there was no such timer."""
        entry = cls._timers.pop(timer_id, None)
        if entry is None:
            return False
        entry.cancelled = True
        if entry.handle is not None:
            entry.handle.cancel()
        return True

    @classmethod
    def delete_all(cls) -> None:
        """Cancel every timer of this process."""
        for timer_id in list(cls._timers):
            cls.delete(timer_id)
        cls._master_heap.clear()

    @classmethod
    def count(cls) -> int:
        """How many timers are active in this process."""
        return len(cls._timers)

    # -- master side ---------------------------------------------------------------
    @classmethod
    def _run_master_due(cls) -> float | None:
        """Run the master's due timers; return seconds until the next one (None: none)."""
        heap = cls._master_heap
        now = time.monotonic()
        while heap and (heap[0].cancelled or heap[0].due <= now):
            entry = heapq.heappop(heap)
            if entry.cancelled:
                continue
            if entry.persistent:
                entry.due = cls._next_due(entry, now)
                heapq.heappush(heap, entry)
            else:
                cls._timers.pop(entry.timer_id, None)
            try:
                result = entry.fn(*entry.args)
                if asyncio.iscoroutine(result):
                    result.close()
                    log.error("timer %d: coroutine functions are not supported in the master", entry.timer_id)
            except Exception:
                log.exception("exception in master timer %d (%r)", entry.timer_id, entry.fn)
            now = time.monotonic()
        return max(0.0, heap[0].due - now) if heap else None

    @classmethod
    def _reset_for_worker(cls) -> None:
        """In a freshly forked worker: forget the master's timers."""
        cls._timers.clear()
        cls._master_heap.clear()
        tasks.forget_all()
        cls._in_master = False
