"""Where a start script's run-time files live.

By default everything goes in a ``.longshore/`` folder next to the start script,
named after it (``start.py`` -> ``.longshore/start.pid``, ``start.log``,
``start.stdout.log``, ``start.stats``). ``Worker.pid_file``, ``Worker.log_file`` and
``Worker.stdout_file`` override the defaults; the status table sits next to the pid file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Runtime:
    """Absolute paths of the run-time files of one start script."""

    start_file: str
    pid_file: str
    log_file: str
    stdout_file: str
    stats_file: str

    @classmethod
    def for_start_file(
        cls, start_file: str, pid_file: str | None = None, log_file: str | None = None, stdout_file: str | None = None
    ) -> Runtime:
        """Default paths for ``start_file``, with the given overrides."""
        start_file = os.path.abspath(start_file)
        folder = os.path.join(os.path.dirname(start_file), ".longshore")
        stem = os.path.splitext(os.path.basename(start_file))[0] or "longshore"
        pid_file = os.path.abspath(pid_file) if pid_file else os.path.join(folder, f"{stem}.pid")
        return cls(
            start_file=start_file,
            pid_file=pid_file,
            log_file=os.path.abspath(log_file) if log_file else os.path.join(folder, f"{stem}.log"),
            stdout_file=os.path.abspath(stdout_file) if stdout_file else os.path.join(folder, f"{stem}.stdout.log"),
            stats_file=os.path.splitext(pid_file)[0] + ".stats",
        )

    def make_folders(self) -> None:
        """Create the folders the run-time files go in."""
        for path in (self.pid_file, self.log_file, self.stdout_file, self.stats_file):
            os.makedirs(os.path.dirname(path), exist_ok=True)

    def connections_file(self, pid: int) -> str:
        """Where worker ``pid`` writes its connection list."""
        return os.path.splitext(self.pid_file)[0] + f".conns.{pid}.json"

    def read_master_pid(self) -> int | None:
        """The pid of the running master, or None (no pid file, or a stale one)."""
        try:
            with open(self.pid_file) as file:
                pid = int(file.read().strip() or 0)
        except (OSError, ValueError):
            return None
        if pid <= 0:
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                cmdline = file.read()
            name = os.path.basename(self.start_file).encode()
            if b"longshore" not in cmdline and name not in cmdline:
                return None  # the pid was reused by an unrelated process
        except OSError:
            pass
        return pid
