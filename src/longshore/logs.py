"""Logging set-up: the ``longshore`` logger, to the log file and (in the foreground) stderr.

The master configures logging before it forks, so workers inherit the same handlers;
the file is opened in append mode, so lines from several processes do not overwrite
each other. Records carry the pid, which tells the processes apart.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"


def configure(log_file: str, foreground: bool, level: int = logging.INFO) -> None:
    """Send the root logger (and so ``longshore`` and the application's loggers) to
    ``log_file``, and also to stderr when running in the foreground."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_longshore", False):
            root.removeHandler(handler)
            handler.close()
    formatter = logging.Formatter(FORMAT)
    handlers: list[logging.Handler] = [logging.FileHandler(log_file, encoding="utf-8")]
    if foreground:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._longshore = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > level:
        root.setLevel(level)
