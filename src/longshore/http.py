"""The HTTP API: ``from longshore.http import Request, Response, FileResponse, ...``.

See :mod:`longshore.protocols.http` for the protocol itself.
"""

from __future__ import annotations

from .protocols.http import *  # noqa: F403  (the same names, one import path shorter)
from .protocols.http import __all__ as __all__
