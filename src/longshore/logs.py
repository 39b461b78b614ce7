"""Logging set-up: the ``longshore`` logger, to the log file and (in the foreground) stderr.

Several processes write the same log file, and it is rotated by size
(``Worker.log_max_bytes``, ``Worker.log_backup_count``) with the stdlib's
``logging.handlers``; with ``log_backup_count = 0`` the file is emptied instead. Rotation is safe with many writers because only the master
rotates: its :class:`MasterFileHandler` (a ``RotatingFileHandler``) renames the files,
both when it logs and when its main loop finds the file over the limit. Every other
process (workers, the monitor, the watcher) writes through a :class:`ChildFileHandler`
(a ``WatchedFileHandler``), which notices that the file it holds was renamed and
reopens the path before its next record: no process keeps writing to a rotated file.
The file is opened in append mode, so lines from several processes do not overwrite
each other; records carry the pid, which tells the processes apart.

When workers run as another user (``Worker.user``), the master gives the log file to
that user (or makes it writable for all of them when there are several), each time it
creates one, so that workers can reopen it after a rotation.
"""

from __future__ import annotations

from typing import NoReturn

import logging
import logging.handlers
import os
import sys

FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUP_COUNT = 5


class MasterFileHandler(logging.handlers.RotatingFileHandler):
    """The master's log file handler: appends, and rotates by size.

    ``owners`` is a list of ``(uid, gid)`` pairs of the users workers run as; a new log
    file is created with the right owner before it is put in place, so a worker never
    finds a log file it cannot open.
    """

    def __init__(self, filename: str, max_bytes: int, backup_count: int, owners: list[tuple[int, int]] | None = None) -> None:
        self.owners = sorted(set(owners or []))
        super().__init__(filename, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8", delay=True)
        self.stream = self._open()

    def _open(self):  # type: ignore[no-untyped-def]
        if self.owners:
            if os.path.exists(self.baseFilename):  # left by an earlier run
                share_existing_file(self.baseFilename, self.owners)
            else:
                prepare_shared_file(self.baseFilename, self.owners)
        return super()._open()

    def doRollover(self) -> None:
        """Rename the files; with ``backup_count`` 0 (or less) keep no old file: empty
        this one instead (every process appends to it, so each goes on at its new end)."""
        if self.backupCount > 0:
            super().doRollover()
            return
        if self.stream is not None:
            self.stream.flush()
        try:
            os.truncate(self.baseFilename, 0)
        except FileNotFoundError:  # removed meanwhile: start a new one
            if self.stream is not None:
                self.stream.close()
            self.stream = self._open()

    def rotate_if_needed(self) -> bool:
        """Rotate when the file (written by every process) has reached the limit."""
        if self.maxBytes <= 0:
            return False
        try:
            size = os.stat(self.baseFilename).st_size
        except OSError:
            return False
        if size < self.maxBytes:
            return False
        self.acquire()
        try:
            self.doRollover()
        finally:
            self.release()
        return True


class ChildFileHandler(logging.handlers.WatchedFileHandler):
    """The log file handler of every process but the master: reopens the file after
    the master rotated it. If the file cannot be reopened (no permission), records go
    to stderr rather than to the rotated file."""

    def __init__(self, filename: str) -> None:
        super().__init__(filename, encoding="utf-8", delay=True)
        self.fallback = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.fallback:
            try:
                self.reopenIfNeeded()
                if self.stream is None:
                    self.stream = self._open()
            except OSError:
                self.fallback = True
        if self.fallback:
            try:
                sys.stderr.write(self.format(record) + "\n")
                sys.stderr.flush()
            except Exception:
                self.handleError(record)
            return
        logging.FileHandler.emit(self, record)


def prepare_shared_file(path: str, owners: list[tuple[int, int]]) -> None:
    """Create ``path`` (if missing) owned by the only user in ``owners``, or writable
    for everyone when there are several; atomic, so nobody sees it half set up."""
    temporary = f"{path}.{os.getpid()}.new"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        if len(owners) == 1:
            os.fchown(fd, *owners[0])
        else:
            os.fchmod(fd, 0o666)
    finally:
        os.close(fd)
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(temporary)


def share_existing_file(path: str, owners: list[tuple[int, int]]) -> None:
    """Give an existing ``path`` to the only user in ``owners``, or make it writable for all."""
    if len(owners) == 1:
        os.chown(path, *owners[0])
    else:
        os.chmod(path, 0o666)


def _longshore_handlers() -> list[logging.Handler]:
    return [handler for handler in logging.getLogger().handlers if getattr(handler, "_longshore", False)]


def configure(
    log_file: str,
    foreground: bool,
    level: int = logging.INFO,
    max_bytes: int = DEFAULT_MAX_BYTES,
    backup_count: int = DEFAULT_BACKUP_COUNT,
    owners: list[tuple[int, int]] | None = None,
) -> None:
    """Master: send the root logger (and so ``longshore`` and the application's loggers)
    to ``log_file``, rotated at ``max_bytes`` keeping ``backup_count`` old files
    (``max_bytes=0``: never), and also to stderr when running in the foreground."""
    root = logging.getLogger()
    for handler in _longshore_handlers():
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(FORMAT)
    handlers: list[logging.Handler] = [MasterFileHandler(log_file, max_bytes, backup_count, owners)]
    if foreground:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._longshore = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > level:
        root.setLevel(level)


def rotate_if_needed() -> bool:
    """Master: rotate the log file if it has grown past its limit."""
    for handler in _longshore_handlers():
        if isinstance(handler, MasterFileHandler):
            return handler.rotate_if_needed()
    return False


def configure_child() -> None:
    """In a process forked by the master: leave rotating to the master, and reopen the
    log file whenever the master has rotated it."""
    root = logging.getLogger()
    for handler in _longshore_handlers():
        if isinstance(handler, MasterFileHandler):
            child = ChildFileHandler(handler.baseFilename)
            child.setFormatter(handler.formatter)
            child._longshore = True  # type: ignore[attr-defined]
            root.removeHandler(handler)
            if handler.stream is not None:
                handler.stream.close()  # this process's copy of the descriptor
                handler.stream = None  # type: ignore[assignment]
            root.addHandler(child)


def flush_and_exit(code: int) -> NoReturn:
    """End a forked child: flush every log handler and stdout/stderr, then ``os._exit``."""
    for handler in logging.getLogger().handlers + logging.getLogger("longshore").handlers:
        try:
            handler.flush()
        except Exception:
            pass
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    os._exit(code)
