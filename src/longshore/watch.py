"""``start --watch``: a graceful reload whenever a Python file changes (for development).

The master forks a watcher process (it may not run threads itself, since it forks, and
watchfiles runs its own). The watcher waits on the folder of the start script with
``watchfiles`` (inotify on Linux) and sends SIGUSR2 (graceful reload) to the master
when a ``.py`` file changes. As with ``reload -g``, what is reloaded is the code the
workers import in ``on_worker_start``; a change to the start script itself is logged
with a reminder that it needs a ``restart``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from .lifeline import master_gone

log = logging.getLogger("longshore")


def run_watcher(start_file: str, master_pid: int) -> int:
    """Entry point of the watcher process; returns its exit code."""
    from watchfiles import PythonFilter, watch

    try:
        from setproctitle import setproctitle

        setproctitle(f"longshore: watcher {os.path.dirname(start_file)}")
    except ImportError:  # pragma: no cover
        pass
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every batch; the watcher says what it does
    folder = os.path.dirname(start_file)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    runtime_folder = os.path.join(folder, ".longshore")
    changes_seen = watch(
        folder,
        watch_filter=PythonFilter(ignore_paths=[runtime_folder]),
        stop_event=stop,
        rust_timeout=1000,
        yield_on_timeout=True,
        debounce=400,
        step=50,
    )
    log.info("watcher pid %d watching %s for changed Python files", os.getpid(), folder)
    for changes in changes_seen:
        if master_gone(master_pid):
            log.warning("watcher: the master pid %d has gone; exiting", master_pid)
            return 0
        if not changes:
            continue
        paths = sorted({os.path.relpath(path, folder) for _, path in changes})
        if os.path.abspath(start_file) in {os.path.abspath(path) for _, path in changes}:
            log.warning("watcher: %s changed; a reload does not reload the start script: restart to apply it", os.path.basename(start_file))
        log.info("watcher: %s changed: graceful reload", ", ".join(paths[:10]) + (" ..." if len(paths) > 10 else ""))
        try:
            os.kill(master_pid, signal.SIGUSR2)
        except ProcessLookupError:
            return 0
    return 0
