"""Where a start script's run-time files live.

By default everything goes in a ``.longshore/`` folder next to the start script,
named after it (``start.py`` -> ``.longshore/start.pid``, ``start.log``,
``start.stdout.log``, ``start.stats``, ``start.lock``, ``start.sessions/`` for the file session store).
``Worker.pid_file``, ``Worker.log_file`` and ``Worker.stdout_file`` override the
defaults; the status table and the session folder sit next to the pid file.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time
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

    @property
    def lock_file(self) -> str:
        """The file the running master holds an exclusive lock on, next to the pid file
        (never removed: a new master must lock the same file as the one it replaces)."""
        return os.path.splitext(self.pid_file)[0] + ".lock"

    def acquire_lock(self, wait: float = 1.0) -> int | None:
        """Take the master's lock; return its descriptor (close it to release the lock),
        or None when another master holds it. A command that only looks at the lock holds
        it shared for an instant: trying again for up to ``wait`` seconds gets past it.
        A stale pid file is removed once the lock is taken.

        The descriptor is not inherited across exec; processes forked while it is open
        share the lock, so they must close it (the master's workers do, at once)."""
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        if fd < 3:  # started with stdin/stdout/stderr closed: the daemon replaces those
            fd, low = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3), fd
            os.close(low)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return None
                time.sleep(0.02)
        try:
            os.unlink(self.pid_file)
        except FileNotFoundError:
            pass
        return fd

    def master_is_running(self) -> bool | None:
        """Whether a master holds the lock; None when the lock file cannot be opened
        (another user's, for instance)."""
        try:
            fd = os.open(self.lock_file, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return None
        finally:
            os.close(fd)  # (releases the shared lock if it was taken)
        return False

    def read_master_pid(self) -> int | None:
        """The pid of the running master, or None (not running, or still starting).

        A master holds the lock file from start to exit, so a pid file left by a master
        that was killed, whose pid may belong to any other process by now, is ignored.
        When the lock cannot be checked, the pid counts only if that process's title
        names this start file."""
        running = self.master_is_running()
        if running is False:
            return None
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
            pass
        if running is None and not self._is_master_title(pid):
            return None
        return pid

    def _is_master_title(self, pid: int) -> bool:
        """Whether process ``pid`` has the title of this start file's master."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                cmdline = file.read()
        except OSError:
            return False
        title = cmdline.split(b"\0")[0].rstrip()
        return title.startswith(b"longshore: master") and title.endswith(f" start_file={self.start_file}".encode())
