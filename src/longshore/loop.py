"""The event loop: uvloop wherever it installs, the stdlib loop elsewhere."""

from __future__ import annotations

import asyncio

try:  # pragma: no cover - depends on the platform
    import uvloop as _uvloop
except ImportError:  # pragma: no cover
    _uvloop = None  # type: ignore[assignment]


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's if available."""
    if _uvloop is not None:
        return _uvloop.new_event_loop()
    return asyncio.new_event_loop()


def loop_name() -> str:
    """``uvloop <version>`` or ``asyncio``: what :func:`new_event_loop` gives."""
    if _uvloop is not None:
        return f"uvloop {_uvloop.__version__}"
    return "asyncio"
