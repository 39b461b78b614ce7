"""The master process: binds, forks, supervises, reloads and stops the workers.

Modelled on a classic arbiter: signal handlers only queue the signal and write a byte
to a wake-up pipe; one loop waits on that pipe, then handles queued signals, reaps
exited children, respawns, advances a reload and runs the master's timers. Nothing
slow happens in a signal handler, and every decision is logged.

States: ``running`` -> (``stopping``) -> ``stopped``. A reload is a sequence of steps
taken while running, one worker process at a time:

* graceful (SIGUSR2, ``reload -g``): fork the replacement, wait until it serves, then
  ask the old process to finish its connections and exit (SIGUSR2). The listening
  socket stays open in the master throughout, so no connection is refused. If the
  replacement cannot start, the reload is abandoned and the old process keeps serving.
* quick (SIGUSR1, ``reload``): ask the old process to stop (SIGUSR1), fork the
  replacement when it has exited, wait until it serves, go on. If the replacement
  cannot start, the reload is abandoned: the processes not replaced yet keep running
  the old code, this one is respawned (with back-off).

Besides the workers, the master may fork helper processes (:class:`Helper`): the
``monitor`` (``Worker.metrics_listen``: Prometheus metrics and the status page over
HTTP), the ``watcher`` (``start --watch``: a graceful reload when a Python file
changes) and the ``channel`` hub (:mod:`longshore.channel`, embedded backend: routes
pub/sub messages between the workers; forked before them). The master itself never
runs threads or an event loop (it forks), so anything that needs one lives in a helper. Helpers are supervised like workers: their
exits are logged and counted in the exit table, and they are respawned with back-off.
They are stopped after the workers.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import signal
import sys
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import __version__, lifeline, logs, runtime as runtimes, users
from .loop import loop_name
from .runtime import Runtime
from .stats import STATE_RUNNING, StatsTable, rss_bytes
from .timer import Timer
from .worker import CONTROL_SIGNALS, EXIT_BOOT_ERROR, Worker, run_worker_process

log = logging.getLogger("longshore")

RUNNING = "running"
STOPPING = "stopping"
STOPPED = "stopped"

#: How long a started worker must live for its exit not to count as a start-up failure.
MIN_HEALTHY_LIFETIME = 1.0
MAX_RESPAWN_DELAY = 10.0
#: How long a reload waits for a new worker to serve before giving that step up.
RELOAD_READY_TIMEOUT = 60.0


def describe_exit(status: int) -> str:
    """An exit status in words: ``exit code 1``, ``killed by SIGKILL``."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return f"killed by {name}"
    if os.WIFEXITED(status):
        return f"exit code {os.WEXITSTATUS(status)}"
    return f"status {status}"


def check_channel_setting(setting: str | None) -> None:
    """Refuse, before anything starts, a ``Worker.channel`` the workers could not use
    (each of them would otherwise fail at start, again and again)."""
    if setting is None or setting == "embedded":
        return
    from urllib.parse import urlsplit

    problem = f"Worker.channel: {setting!r} is neither 'embedded' nor a redis:// URL (redis://host:port/db, rediss://..., unix:///path)"
    try:
        parts = urlsplit(setting)
        parts.port  # a port that is not a number raises ValueError
    except ValueError:
        raise ValueError(problem) from None
    if parts.scheme in ("redis", "rediss"):
        database = parts.path.strip("/")
        if not parts.hostname or (database and not database.isdigit()):
            raise ValueError(problem)
    elif parts.scheme != "unix" or not parts.path:
        raise ValueError(problem)


@dataclass
class Child:
    """A worker process the master forked."""

    pid: int
    worker: Worker
    worker_index: int
    worker_id: int
    slot: int
    started: float = field(default_factory=time.monotonic)
    retiring: bool = False  # replaced by a reload: not respawned when it exits
    stop_requested: bool = False  # the master asked it to exit
    kill_at: float | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.worker_index, self.worker_id)


@dataclass
class Helper:
    """A helper process (not a worker) the master forks and keeps alive.

    ``target`` runs in the forked process and returns its exit code.
    """

    name: str
    target: Callable[[], int]
    pid: int | None = None
    started: float = 0.0
    failures: int = 0
    respawn_at: float | None = None
    stop_requested: bool = False


@dataclass
class ReloadStep:
    """The worker process being replaced right now."""

    key: tuple[int, int]
    old_pid: int
    new_pid: int | None
    phase: str  # "exit": waiting for the old process to go; "ready": for the new one to serve
    graceful: bool  # how this step replaces the process (a reload asked meanwhile does not change it)
    started: float = field(default_factory=time.monotonic)


def _migrates_requests() -> bool:
    """True when the kernel moves what waits in a closing SO_REUSEPORT listener's backlog
    to another listener of its group (Linux 5.14+, ``net.ipv4.tcp_migrate_req=1``); also
    True where that cannot be known (the hint would only be noise)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_migrate_req") as file:
            return file.read().strip() != "0"
    except OSError:
        return True


class Master:
    """Supervises the worker processes of one start script."""

    def __init__(self, workers: list[Worker], runtime: Runtime, daemon: bool = False, watch: bool = False) -> None:
        self.workers = workers
        self.runtime = runtime
        self.daemon = daemon
        self.watch = watch
        self.helpers: list[Helper] = []
        self.metrics_socket: socket.socket | None = None
        self.metrics_listen = ""
        self.state = RUNNING
        self.children: dict[int, Child] = {}
        self.assigned: dict[tuple[int, int], int] = {}
        self.pending_spawns: dict[tuple[int, int], float] = {}
        self.failures: collections.Counter[tuple[int, int]] = collections.Counter()
        self.exits: collections.Counter[tuple[str, str]] = collections.Counter()
        self.signal_queue: list[int] = []
        self.wake_r = self.wake_w = -1
        self.ready_fd: int | None = None
        self.lock_fd: int | None = None
        self.ready_deadline = 0.0
        self.reload_queue: collections.deque[tuple[int, int]] = collections.deque()
        self.reload_graceful = False
        self.reload_step: ReloadStep | None = None
        #: How the latest reload went, for the ``reload`` command: its number, "running",
        #: "done" or "abandoned", and why it was abandoned.
        self.last_reload: dict[str, Any] | None = None
        self.stop_deadline = 0.0
        self.stop_graceful = False
        self.started_at = time.time()
        self.table: StatsTable | None = None
        self.header_dirty = True
        self.header_written = 0.0

    # -- start ---------------------------------------------------------------------------
    def start(self) -> int:
        """Run the master (returns only in the launching process or when stopped).

        The master holds the lock file from here until it exits: that, not the pid file
        (a master killed with SIGKILL leaves it, and its pid may be reused), tells the
        commands whether it runs."""
        runtime = self.runtime
        try:
            runtime.make_folders()
            self.lock_fd = runtime.acquire_lock()
        except OSError as exc:
            print(f"longshore: cannot lock {runtime.lock_file}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        if self.lock_fd is None:
            running = runtime.read_master_pid()
            pid_note = f" (master pid {running})" if running else ""
            print(f"longshore: {os.path.basename(runtime.start_file)} is already running{pid_note}")
            return 1
        try:
            return self.start_locked()
        finally:
            self.close_lock()

    def close_lock(self) -> None:
        """Close this process's descriptor of the lock file. The lock is released when the
        last process sharing it (the master, or a child just forked) closes it."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def start_locked(self) -> int:
        """:meth:`start` once the lock is taken."""
        runtime = self.runtime
        runtimes.current = runtime  # (the workers inherit it)
        try:
            owners = self.worker_identities()
            check_channel_setting(Worker.channel)
        except ValueError as exc:
            print(f"longshore: {exc}", file=sys.stderr)
            return 1
        if owners:
            try:
                runtime.prepare_sessions_folder([(identity.uid, identity.gid) for identity in owners])
            except OSError as exc:
                print(f"longshore: cannot prepare {runtime.sessions_folder}: {exc.strerror or exc}", file=sys.stderr)
                return 1
        for worker in self.workers:
            try:
                worker.bind()
            except OSError as exc:
                print(f"longshore: cannot listen on {worker.listen}: {exc.strerror or exc}", file=sys.stderr)
                for other in self.workers:
                    other.unbind()
                return 1
        if Worker.metrics_listen:
            from .monitor import bind_metrics_socket

            try:
                self.metrics_socket, self.metrics_listen = bind_metrics_socket(Worker.metrics_listen)
            except (OSError, ValueError) as exc:
                print(f"longshore: cannot listen on metrics_listen {Worker.metrics_listen}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
                for worker in self.workers:
                    worker.unbind()
                return 1
        if self.daemon:
            launcher_code = self.daemonize()
            if launcher_code is not None:
                return launcher_code
        logs.configure(
            runtime.log_file,
            foreground=not self.daemon,
            max_bytes=Worker.log_max_bytes,
            backup_count=Worker.log_backup_count,
            owners=[(identity.uid, identity.gid) for identity in owners],
        )
        try:
            return self.run()
        except BaseException:
            log.exception("master failed")
            self.kill_all(signal.SIGKILL)
            self.kill_helpers(signal.SIGKILL)
            self.cleanup()
            raise

    def worker_identities(self) -> list[users.Identity]:
        """The users workers will run as (checked before anything starts)."""
        identities = []
        for worker in self.workers:
            identity = users.resolve(worker.user, worker.group)
            if identity is not None and users.needs_switch(identity) and users.can_switch():
                identities.append(identity)
        return identities

    def daemonize(self) -> int | None:
        """Detach: double fork, new session, stdin from /dev/null, output to stdout_file.

        Returns the exit code in the launching process (after the daemon reported that
        its workers run) and None in the daemon.
        """
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid > 0:
            os.close(ready_w)
            os.waitpid(pid, 0)  # the intermediate process exits at once
            report = b""
            while True:
                chunk = os.read(ready_r, 4096)
                if not chunk:
                    break
                report += chunk
            os.close(ready_r)
            text = report.decode(errors="replace").strip()
            if text.startswith("ok"):
                print(text[3:] if len(text) > 3 else "longshore started")
                return 0
            print(f"longshore: start failed: {text or 'the daemon exited; see ' + self.runtime.log_file}", file=sys.stderr)
            return 1
        os.close(ready_r)
        os.setsid()
        if os.fork() > 0:
            os._exit(0)
        os.umask(0o022)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        out = os.open(self.runtime.stdout_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        self.ready_fd = ready_w
        return None

    def run(self) -> int:
        runtime = self.runtime
        with open(runtime.pid_file, "w") as file:
            file.write(f"{os.getpid()}\n")
        # Retiring processes finish their connections beside their replacements: room
        # for a few generations of them.
        slots = sum(worker.count for worker in self.workers) * 4 + 16
        self.table = StatsTable.create(runtime.stats_file, slots)
        try:
            from setproctitle import setproctitle

            setproctitle(f"longshore: master process  start_file={runtime.start_file}")
        except ImportError:  # pragma: no cover
            pass
        self.init_signals()
        Timer._in_master = True
        log.info(
            "longshore %s master pid %d starting (%s, Python %s)",
            __version__,
            os.getpid(),
            loop_name(),
            sys.version.split()[0],
        )
        for worker in self.workers:
            log.info("worker %s: %s, %d process(es)", worker.name, worker.bound_listen or "(no listener)", worker.count)
            if worker.socket_per_process and worker.address is not None and worker.address.transport != "udp" and not _migrates_requests():
                log.info(
                    "worker %s: reuse_port: a connection that completes in the instant a stopping process closes its "
                    "socket is reset; set the sysctl net.ipv4.tcp_migrate_req=1 to have the kernel hand it to another process",
                    worker.name,
                )
            identity = users.resolve(worker.user, worker.group)
            if users.needs_switch(identity):
                if users.can_switch():
                    log.info("worker %s runs as %s", worker.name, identity)
                else:
                    log.warning("worker %s: user/group %s ignored: the master does not run as root", worker.name, identity)
        self.create_helpers()
        for helper in self.helpers:
            if helper.name == "channel":  # before the workers, which connect to it at once
                self.spawn_helper(helper)
        for index, worker in enumerate(self.workers):
            for worker_id in range(worker.count):
                self.spawn((index, worker_id))
        for helper in self.helpers:
            if helper.pid is None:
                self.spawn_helper(helper)
        self.ready_deadline = time.monotonic() + 10.0
        if not self.daemon:
            self.print_banner()
        self.call_master_hook("on_master_start")
        self.write_header()
        self.main_loop()
        self.cleanup()
        log.info("master pid %d stopped", os.getpid())
        return 0

    def print_banner(self) -> None:
        lines = [f"longshore {__version__}  master pid {os.getpid()}  ({loop_name()})"]
        for worker in self.workers:
            lines.append(f"  {worker.name:<16} {worker.bound_listen or '(no listener)':<36} processes: {worker.count}")
        if self.metrics_listen:
            lines.append(f"  status page http://{self.metrics_listen}/  metrics http://{self.metrics_listen}/metrics")
        if self.watch:
            lines.append(f"  watching {os.path.dirname(self.runtime.start_file)} for changed Python files")
        lines.append("Press Ctrl+C to stop.")
        print("\n".join(lines), flush=True)

    # -- signals ---------------------------------------------------------------------------
    def init_signals(self) -> None:
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(signum, self.on_signal)
        signal.signal(signal.SIGIO, signal.SIG_IGN)

    def on_signal(self, signum: int, frame: Any) -> None:
        # SIGCHLD only wakes the loop (which reaps on every pass): exiting children
        # must not fill the queue and crowd out a stop.
        if signum != signal.SIGCHLD and len(self.signal_queue) < 16:
            self.signal_queue.append(signum)
        try:
            os.write(self.wake_w, b".")
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EINTR):
                raise

    def handle_signals(self) -> None:
        while self.signal_queue:
            signum = self.signal_queue.pop(0)
            if signum in (signal.SIGINT, signal.SIGTERM):
                self.stop(graceful=False)
            elif signum == signal.SIGQUIT:
                self.stop(graceful=True)
            elif signum == signal.SIGUSR1:
                self.reload(graceful=False)
            elif signum == signal.SIGUSR2:
                self.reload(graceful=True)
            elif signum == signal.SIGHUP and not self.daemon:
                self.stop(graceful=False)

    # -- main loop -------------------------------------------------------------------------
    def main_loop(self) -> None:
        while self.state != STOPPED:
            self.wait(self.next_timeout())
            self.handle_signals()
            self.reap()
            self.maintain()
            Timer._run_master_due()

    def next_timeout(self) -> float:
        timeout = 0.5  # also how often the log file size is checked
        if self.pending_spawns:
            timeout = min(timeout, max(0.0, min(self.pending_spawns.values()) - time.monotonic()))
        for helper in self.helpers:
            if helper.respawn_at is not None:
                timeout = min(timeout, max(0.0, helper.respawn_at - time.monotonic()))
        if self.reload_step is not None or self.reload_queue or self.ready_fd is not None or self.state == STOPPING:
            timeout = min(timeout, 0.05)
        next_timer = Timer._run_master_due()
        if next_timer is not None:
            timeout = min(timeout, next_timer)
        return timeout

    def wait(self, timeout: float) -> None:
        try:
            ready, _, _ = select.select([self.wake_r], [], [], timeout)
        except InterruptedError:
            return
        if ready:
            try:
                while os.read(self.wake_r, 4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass

    def maintain(self) -> None:
        now = time.monotonic()
        if self.state == RUNNING:
            for key, due in list(self.pending_spawns.items()):
                if due <= now:
                    del self.pending_spawns[key]
                    self.spawn(key)
            for helper in self.helpers:
                if helper.respawn_at is not None and helper.respawn_at <= now:
                    self.spawn_helper(helper)
            if self.reload_step is not None or self.reload_queue:
                self.advance_reload()
            if self.ready_fd is not None:
                self.report_ready(now)
        elif self.state == STOPPING:
            if not self.children:
                self.stop_helpers()  # the workers are gone: the monitor has nothing more to show
                if not any(helper.pid for helper in self.helpers):
                    self.state = STOPPED
            if self.state == STOPPING and now >= self.stop_deadline:
                for child in self.children.values():
                    log.warning("worker %s[%d] pid %d did not stop in time: SIGKILL", child.worker.name, child.worker_id, child.pid)
                for helper in self.helpers:
                    if helper.pid:
                        log.warning("%s pid %d did not stop in time: SIGKILL", helper.name, helper.pid)
                self.kill_all(signal.SIGKILL)
                self.kill_helpers(signal.SIGKILL)
                self.stop_deadline = now + 5.0
        for child in self.children.values():
            if child.kill_at is not None and now >= child.kill_at:
                log.warning("worker %s[%d] pid %d did not exit in time: SIGKILL", child.worker.name, child.worker_id, child.pid)
                self.send(child.pid, signal.SIGKILL)
                child.kill_at = None
        if self.header_dirty or time.time() - self.header_written >= 1.0:
            self.write_header()
        try:
            if logs.rotate_if_needed():
                log.info("log file rotated")
        except OSError:
            log.exception("could not rotate the log file")

    def report_ready(self, now: float) -> None:
        """Tell the launching process (start -d) that the workers are up."""
        assert self.table is not None and self.ready_fd is not None
        states = {record.pid: record.state for record in self.table.read_slots()}
        all_running = all(states.get(pid) == STATE_RUNNING for pid in self.assigned.values())
        complete = len(self.assigned) == sum(worker.count for worker in self.workers)
        failed = [key for key, count in self.failures.items() if count]
        if (all_running and complete) or now >= self.ready_deadline or failed:
            processes = sum(worker.count for worker in self.workers)
            if failed:
                message = f"ok longshore started (master pid {os.getpid()}), but some workers fail to start; see {self.runtime.log_file}"
            elif all_running and complete:
                message = f"ok longshore started: master pid {os.getpid()}, {processes} worker process(es)"
            else:
                message = f"ok longshore started (master pid {os.getpid()}); some workers are still starting"
            try:
                os.write(self.ready_fd, message.encode())
            except OSError:
                pass
            os.close(self.ready_fd)
            self.ready_fd = None

    # -- processes -------------------------------------------------------------------------
    def spawn(self, key: tuple[int, int]) -> int | None:
        """Fork a worker process for (worker index, worker id); None if it must wait."""
        assert self.table is not None
        index, worker_id = key
        worker = self.workers[index]
        try:
            slot = self.table.claim(0, worker_id, worker.name, worker.bound_listen or "")
        except RuntimeError:
            # Every slot is taken by processes still finishing their connections.
            log.error("no free status slot for worker %s[%d]; trying again in 1 s", worker.name, worker_id)
            self.pending_spawns[key] = time.monotonic() + 1.0
            return None
        sys.stdout.flush()
        sys.stderr.flush()
        # Until the worker's loop handles them, a stop or reload signal must wait, not
        # kill it with the default action (or dump core, for SIGQUIT).
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, CONTROL_SIGNALS)
        master_pid = os.getpid()
        pid = -1
        try:
            pid = os.fork()
            if pid == 0:
                self.become_worker()
                run_worker_process(worker, worker_id, self.table, slot, self.runtime, master_pid)
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
            if pid < 0:  # fork failed
                self.table.release(slot)
        # The row is this process's from now on (/metrics leaves out rows of pid 0).
        self.table.set_pid(slot, pid)
        self.children[pid] = Child(pid, worker, index, worker_id, slot)
        self.assigned[key] = pid
        self.header_dirty = True
        log.info("spawned worker %s[%d] pid %d", worker.name, worker_id, pid)
        return pid

    def become_worker(self) -> None:
        """In a fresh fork: drop the master's state that a worker must not keep."""
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        for fd in (self.wake_r, self.wake_w, self.ready_fd):
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if self.metrics_socket is not None:
            self.metrics_socket.close()
            self.metrics_socket = None
        self.close_lock()  # a child left behind by a killed master must not hold it
        self.children.clear()
        self.helpers = []
        logs.configure_child()

    # -- helper processes ----------------------------------------------------------------
    def create_helpers(self) -> None:
        """The helper processes this configuration asks for."""
        if "longshore.channel" in sys.modules or Worker.channel is not None:
            from . import channel

            channel.start_in_master()
            if channel.needs_hub():
                owners = [(identity.uid, identity.gid) for identity in self.worker_identities()]
                self.helpers.append(Helper("channel", channel.hub_target(self.runtime, owners)))
        if self.metrics_socket is not None:
            from .monitor import run_monitor

            metrics_socket, stats_file, master_pid = self.metrics_socket, self.runtime.stats_file, os.getpid()
            self.helpers.append(Helper("monitor", lambda: run_monitor(metrics_socket, stats_file, master_pid)))
        if self.watch:
            from .watch import run_watcher

            start_file, master_pid = self.runtime.start_file, os.getpid()
            self.helpers.append(Helper("watcher", lambda: run_watcher(start_file, master_pid)))

    def spawn_helper(self, helper: Helper) -> None:
        """Fork the process of ``helper``."""
        helper.respawn_at = None
        helper.stop_requested = False
        sys.stdout.flush()
        sys.stderr.flush()
        master_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            # Out of the terminal's process group: Ctrl+C reaches the master and the
            # workers, and the master stops its helpers once the workers are gone.
            os.setpgid(0, 0)
            if lifeline.follow_master(master_pid):  # SIGTERM (a stop) when the master dies
                logs.flush_and_exit(0)
            metrics_socket = self.metrics_socket
            self.metrics_socket = None  # kept open for the monitor
            self.become_worker()
            for worker in self.workers:  # not worker.unbind(): that would remove Unix socket files
                if worker._socket is not None:
                    worker._socket.close()
                    worker._socket = None
            if self.table is not None:
                self.table.close()  # a helper maps the table read-only if it needs it
                self.table = None
            if metrics_socket is not None and helper.name != "monitor":
                metrics_socket.close()
            code = 1
            try:
                code = helper.target()
            except BaseException:
                log.exception("%s failed", helper.name)
            finally:
                logs.flush_and_exit(code)
        helper.pid = pid
        helper.started = time.monotonic()
        self.header_dirty = True
        log.info("spawned %s pid %d", helper.name, pid)

    def on_helper_exit(self, helper: Helper, status: int) -> None:
        words = describe_exit(status)
        self.exits[(helper.name, words)] += 1
        self.header_dirty = True
        lived = time.monotonic() - helper.started
        expected = helper.stop_requested or self.state != RUNNING
        log.log(logging.INFO if expected else logging.WARNING, "%s pid %d exited: %s (after %.1f s)", helper.name, helper.pid, words, lived)
        helper.pid = None
        if self.state != RUNNING:
            return
        if lived < MIN_HEALTHY_LIFETIME:
            helper.failures += 1
            delay = min(0.25 * 2 ** (helper.failures - 1), MAX_RESPAWN_DELAY)
            log.warning("%s failed to start or died at once; respawning in %.2f s", helper.name, delay)
        else:
            helper.failures = 0
            delay = 0.0
        helper.respawn_at = time.monotonic() + delay

    def stop_helpers(self) -> None:
        """Ask every helper process to exit (once)."""
        for helper in self.helpers:
            helper.respawn_at = None
            if helper.pid and not helper.stop_requested:
                helper.stop_requested = True
                self.send(helper.pid, signal.SIGTERM)

    def kill_helpers(self, signum: int) -> None:
        for helper in self.helpers:
            if helper.pid:
                helper.stop_requested = True
                self.send(helper.pid, signum)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                for helper in self.helpers:
                    if helper.pid == pid:
                        self.on_helper_exit(helper, status)
                continue
            self.on_child_exit(child, status)

    def on_child_exit(self, child: Child, status: int) -> None:
        assert self.table is not None
        self.table.release(child.slot)
        words = describe_exit(status)
        self.exits[(child.worker.name, words)] += 1
        self.header_dirty = True
        lived = time.monotonic() - child.started
        expected = self.state == STOPPING or child.retiring
        level = logging.INFO if expected or words == "exit code 0" else logging.WARNING
        log.log(level, "worker %s[%d] pid %d exited: %s (after %.1f s)", child.worker.name, child.worker_id, child.pid, words, lived)
        try:
            os.unlink(self.runtime.connections_file(child.pid))
        except OSError:
            pass
        if child.worker.on_worker_exit is not None:
            try:
                child.worker.on_worker_exit(child.worker, status, child.pid)
            except Exception:
                log.exception("exception in on_worker_exit")
        key = child.key
        step = self.reload_step
        if step is not None and step.key == key and child.pid != step.old_pid:
            # The replacement died before it served: keep the old process (graceful), give
            # up the reload. (A quick reload's replacement is respawned with back-off.)
            self.reload_step = None
            self.reload_queue.clear()
            old = self.children.get(step.old_pid)
            failed = f"the new worker {child.worker.name}[{child.worker_id}] exited ({words}) before serving"
            if old is not None:
                self.assigned[key] = step.old_pid
                old.retiring = False
                self.abandon_reload(f"{failed}; the old workers keep running")
                return
            self.abandon_reload(f"{failed} and the old one is gone; respawning")
        if self.assigned.get(key) != child.pid:
            return
        del self.assigned[key]
        if self.state != RUNNING:
            return
        boot_error = os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_BOOT_ERROR
        boot_failure = boot_error or (lived < MIN_HEALTHY_LIFETIME and not child.stop_requested)
        if boot_failure:
            self.failures[key] += 1
            delay = min(0.25 * 2 ** (self.failures[key] - 1), MAX_RESPAWN_DELAY)
            log.warning("worker %s[%d] failed to start or died at once; respawning in %.2f s", child.worker.name, child.worker_id, delay)
        else:
            self.failures[key] = 0
            delay = 0.0
        self.pending_spawns[key] = time.monotonic() + delay

    def send(self, pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def kill_all(self, signum: int) -> None:
        for pid, child in list(self.children.items()):
            child.stop_requested = True
            self.send(pid, signum)

    # -- stop --------------------------------------------------------------------------------
    def stop(self, graceful: bool) -> None:
        if self.state == STOPPING:
            if self.stop_graceful and not graceful:
                log.info("stop: graceful stop turned into a quick stop")
                self.stop_graceful = False
                self.kill_all(signal.SIGTERM)
            elif not graceful:
                log.warning("stop asked again: killing the workers")
                self.kill_all(signal.SIGKILL)
            return
        self.state = STOPPING
        self.stop_graceful = graceful
        self.header_dirty = True
        log.info("master pid %d: %s", os.getpid(), "graceful stop" if graceful else "stop")
        self.call_master_hook("on_master_stop")
        self.pending_spawns.clear()
        if self.reload_step is not None or self.reload_queue:
            self.abandon_reload("the master is stopping")
        self.kill_all(signal.SIGQUIT if graceful else signal.SIGTERM)
        for helper in self.helpers:
            helper.respawn_at = None
            if helper.name == "watcher" and helper.pid:  # no reloads while stopping
                helper.stop_requested = True
                self.send(helper.pid, signal.SIGTERM)
        for worker in self.workers:
            worker.unbind()
        longest = max((worker.stop_timeout for worker in self.workers), default=2.0)
        self.stop_deadline = time.monotonic() + longest + 3.0
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None

    def cleanup(self) -> None:
        for worker in self.workers:
            worker.unbind()
        if self.metrics_socket is not None:
            self.metrics_socket.close()
            self.metrics_socket = None
        for path in (self.runtime.pid_file, self.runtime.stats_file):
            try:
                os.unlink(path)
            except OSError:
                pass
        if self.table is not None:
            self.table.close()
            self.table = None

    # -- reload ------------------------------------------------------------------------------
    def reload(self, graceful: bool) -> None:
        number = (self.last_reload or {}).get("id", 0) + 1
        if self.state != RUNNING:
            self.last_reload = {"id": number, "result": "abandoned", "reason": "the master is stopping", "at": time.time()}
            self.header_dirty = True
            return
        log.info("master pid %d: %s reload", os.getpid(), "graceful" if graceful else "quick")
        self.last_reload = {"id": number, "result": "running", "reason": None, "at": time.time()}
        self.call_master_hook("on_master_reload")
        queue: collections.deque[tuple[int, int]] = collections.deque()
        for key, pid in sorted(self.assigned.items()):
            worker = self.workers[key[0]]
            if worker.reloadable:
                queue.append(key)
            else:  # only on_worker_reload
                self.send(pid, signal.SIGUSR2 if graceful else signal.SIGUSR1)
        if self.reload_step is not None:  # a reload is under way: start over with every process
            log.info("reload: restarting the reload in progress")
        self.reload_queue = queue
        self.reload_graceful = graceful
        self.header_dirty = True
        if not queue and self.reload_step is None:  # nothing to replace (reloadable=False only)
            self.reload_done()

    def advance_reload(self) -> None:
        assert self.table is not None
        now = time.monotonic()
        step = self.reload_step
        if step is None:
            while self.reload_queue:
                key = self.reload_queue.popleft()
                old_pid = self.assigned.get(key)
                if old_pid is None or old_pid not in self.children:
                    continue  # not running now; its respawn runs the new code anyway
                old = self.children[old_pid]
                stop_timeout = old.worker.stop_timeout
                if self.reload_graceful:
                    new_pid = self.spawn(key)
                    if new_pid is None:  # no room yet: this step again later
                        self.assigned[key] = old_pid
                        self.pending_spawns.pop(key, None)
                        self.reload_queue.appendleft(key)
                        return
                    old.retiring = True
                    self.reload_step = ReloadStep(key, old_pid, new_pid, "ready", graceful=True)
                else:
                    old.kill_at = now + stop_timeout + 3.0
                    old.stop_requested = True
                    self.send(old_pid, signal.SIGUSR1)
                    self.reload_step = ReloadStep(key, old_pid, None, "exit", graceful=False)
                log.info("reload: replacing worker %s[%d] pid %d", old.worker.name, key[1], old_pid)
                return
            self.reload_done()
            return
        if step.phase == "exit":
            new_pid = self.assigned.get(step.key)
            if step.old_pid not in self.children and new_pid is not None:
                step.new_pid = new_pid
                step.phase = "ready"
                step.started = now  # the readiness timeout counts from the replacement's start
            elif step.old_pid not in self.children and step.key not in self.pending_spawns:
                self.finish_reload_step()  # respawn was not scheduled (stopping): nothing to wait for
            return
        if step.phase == "ready":
            new_pid = self.assigned.get(step.key)
            if new_pid is None:
                return  # died; being respawned
            step.new_pid = new_pid  # (a respawn abandons the reload: the same process)
            states = {record.pid: record.state for record in self.table.read_slots()}
            if states.get(new_pid) != STATE_RUNNING and now - step.started > RELOAD_READY_TIMEOUT:
                name = self.workers[step.key[0]].name
                if step.graceful and new_pid in self.children:
                    log.error("reload: new worker %s[%d] pid %d is not serving after %.0f s: killing it", name, step.key[1], new_pid, RELOAD_READY_TIMEOUT)
                    self.send(new_pid, signal.SIGKILL)  # its exit abandons the reload, the old one stays
                    step.started = now
                else:
                    self.abandon_reload(f"worker {name}[{step.key[1]}] is not serving after {RELOAD_READY_TIMEOUT:.0f} s")
                return
            if states.get(new_pid) == STATE_RUNNING:
                if step.graceful:
                    retiring = self.children.get(step.old_pid)
                    if retiring is not None:
                        retiring.kill_at = None  # a graceful stop takes as long as its connections need (stop_timeout)
                        self.send(step.old_pid, signal.SIGUSR2)
                        retiring.kill_at = now + retiring.worker.stop_timeout + 5.0
                log.info("reload: worker %s[%d] replaced by pid %d", self.workers[step.key[0]].name, step.key[1], new_pid)
                self.finish_reload_step()

    def finish_reload_step(self) -> None:
        self.reload_step = None
        if not self.reload_queue:
            self.reload_done()

    def reload_done(self) -> None:
        """Every process of the reload has been replaced."""
        log.info("reload done")
        if self.last_reload is not None:
            self.last_reload.update(result="done", reason=None, at=time.time())
        self.header_dirty = True

    def abandon_reload(self, reason: str) -> None:
        """Give the reload up (the processes not replaced yet keep running); say why."""
        log.error("reload abandoned: %s", reason)
        self.reload_step = None
        self.reload_queue.clear()
        if self.last_reload is not None:
            self.last_reload.update(result="abandoned", reason=reason, at=time.time())
        self.header_dirty = True

    # -- hooks and the status header ---------------------------------------------------
    def call_master_hook(self, name: str) -> None:
        hook = getattr(Worker, name, None)
        if hook is None:
            return
        try:
            hook()
        except Exception:
            log.exception("exception in Worker.%s", name)

    def write_header(self) -> None:
        if self.table is None:
            return
        document = {
            "master": {
                "pid": os.getpid(),
                "start_time": self.started_at,
                "start_file": self.runtime.start_file,
                "state": self.state,
                "reloading": self.reload_step is not None or bool(self.reload_queue),
                "last_reload": self.last_reload,
                "memory": rss_bytes(),
                "version": __version__,
                "loop": loop_name(),
                "python": sys.version.split()[0],
                "updated": time.time(),
                "metrics_listen": self.metrics_listen or None,
                "watch": self.watch,
                "helpers": [{"name": helper.name, "pid": helper.pid} for helper in self.helpers if helper.pid],
            },
            "workers": [
                {"name": worker.name, "listen": worker.bound_listen, "count": worker.count, "reloadable": worker.reloadable}
                for worker in self.workers
            ],
            "exits": [{"name": name, "status": status, "count": count} for (name, status), count in sorted(self.exits.items())],
        }
        self.table.write_header(document)
        self.header_dirty = False
        self.header_written = time.time()

