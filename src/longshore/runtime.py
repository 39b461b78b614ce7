"""Where a start script's run-time files live.

By default everything goes in a ``.longshore/`` folder next to the start script,
named after it (``start.py`` -> ``.longshore/start.pid``, ``start.log``,
``start.stdout.log``, ``start.stats``, ``start.sessions/`` for the file session store).
``Worker.pid_file``, ``Worker.log_file`` and ``Worker.stdout_file`` override the
defaults; the status table and the session folder sit next to the pid file.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

#: The run-time files of the start script this process serves (set by the master, and
#: inherited by its workers); None outside a longshore server.
current: Runtime | None = None


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

    @property
    def sessions_folder(self) -> str:
        """The default folder of the file session store, next to the pid file."""
        return os.path.splitext(self.pid_file)[0] + ".sessions"

    def prepare_sessions_folder(self, owners: list[tuple[int, int]]) -> None:
        """Create the session folder (0700) for the workers' user, when they all switch to
        one user: they could not create it themselves in a folder of the master's user.
        An existing folder is left as it is (the store checks it when it is first used)."""
        uids = {uid for uid, _ in owners}
        if len(uids) != 1:
            return
        folder = self.sessions_folder
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            return
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) != 0o700:
                os.fchmod(fd, 0o700)
            os.fchown(fd, *owners[0])
        finally:
            os.close(fd)

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
