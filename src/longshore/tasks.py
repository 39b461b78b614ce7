"""Coroutines of the application that run as tasks of their own: a coroutine timer
callback, a coroutine hook (``on_worker_reload``), a coroutine UDP ``on_message`` or
channel subscriber, a coroutine flow-control callback.

:func:`run_coroutine` keeps each task referenced until it ends (the loop itself keeps
only weak references), logs and counts (``throw_exception``) what it raises, and
:func:`running` gives the stopping worker the ones it must cancel.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Awaitable

from .stats import process_stats

log = logging.getLogger("longshore")

_tasks: set[asyncio.Future[Any]] = set()


def run_coroutine(awaitable: Awaitable[Any], what: str) -> asyncio.Future[Any]:
    """Run ``awaitable`` (a coroutine, usually) as a task; ``what`` names it in the log
    if it raises."""
    task = asyncio.ensure_future(awaitable)
    _tasks.add(task)
    task.add_done_callback(functools.partial(_done, what))
    return task


def _done(what: str, task: asyncio.Future[Any]) -> None:
    _tasks.discard(task)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        process_stats.throw_exception += 1
        log.error("exception in %s", what, exc_info=exc)


def running() -> set[asyncio.Future[Any]]:
    """The tasks still running (a stopping worker cancels them)."""
    return set(_tasks)


def forget_all() -> None:
    """Drop the references (a forked child starts without its parent's tasks)."""
    _tasks.clear()


__all__ = ["forget_all", "run_coroutine", "running"]
