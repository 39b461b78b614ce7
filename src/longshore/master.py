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
  replacement when it has exited, wait until it serves, go on.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from . import __version__, logs
from .loop import loop_name
from .runtime import Runtime
from .stats import STATE_RUNNING, StatsTable, rss_bytes
from .timer import Timer
from .worker import EXIT_BOOT_ERROR, Worker, run_worker_process

log = logging.getLogger("longshore")

RUNNING = "running"
STOPPING = "stopping"
STOPPED = "stopped"

#: How long a started worker must live for its exit not to count as a start-up failure.
MIN_HEALTHY_LIFETIME = 1.0
MAX_RESPAWN_DELAY = 10.0


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
class ReloadStep:
    """The worker process being replaced right now."""

    key: tuple[int, int]
    old_pid: int
    new_pid: int | None
    phase: str  # "exit": waiting for the old process to go; "ready": for the new one to serve
    started: float = field(default_factory=time.monotonic)


class Master:
    """Supervises the worker processes of one start script."""

    def __init__(self, workers: list[Worker], runtime: Runtime, daemon: bool = False) -> None:
        self.workers = workers
        self.runtime = runtime
        self.daemon = daemon
        self.state = RUNNING
        self.children: dict[int, Child] = {}
        self.assigned: dict[tuple[int, int], int] = {}
        self.pending_spawns: dict[tuple[int, int], float] = {}
        self.failures: collections.Counter[tuple[int, int]] = collections.Counter()
        self.exits: collections.Counter[tuple[str, str]] = collections.Counter()
        self.signal_queue: list[int] = []
        self.wake_r = self.wake_w = -1
        self.ready_fd: int | None = None
        self.ready_deadline = 0.0
        self.reload_queue: collections.deque[tuple[int, int]] = collections.deque()
        self.reload_graceful = False
        self.reload_step: ReloadStep | None = None
        self.stop_deadline = 0.0
        self.stop_graceful = False
        self.started_at = time.time()
        self.table: StatsTable | None = None
        self.header_dirty = True
        self.header_written = 0.0

    # -- start ---------------------------------------------------------------------------
    def start(self) -> int:
        """Run the master (returns only in the launching process or when stopped)."""
        runtime = self.runtime
        running = runtime.read_master_pid()
        if running:
            print(f"longshore: {os.path.basename(runtime.start_file)} is already running (master pid {running})")
            return 1
        runtime.make_folders()
        for worker in self.workers:
            try:
                worker.bind()
            except OSError as exc:
                print(f"longshore: cannot listen on {worker.listen}: {exc.strerror or exc}", file=sys.stderr)
                for other in self.workers:
                    other.unbind()
                return 1
        if self.daemon:
            launcher_code = self.daemonize()
            if launcher_code is not None:
                return launcher_code
        logs.configure(runtime.log_file, foreground=not self.daemon)
        try:
            return self.run()
        except BaseException:
            log.exception("master failed")
            self.kill_all(signal.SIGKILL)
            self.cleanup()
            raise

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
        slots = sum(worker.count for worker in self.workers) * 2 + 8
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
        for index, worker in enumerate(self.workers):
            for worker_id in range(worker.count):
                self.spawn((index, worker_id))
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
        if len(self.signal_queue) < 16:
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
        timeout = 1.0
        if self.pending_spawns:
            timeout = min(timeout, max(0.0, min(self.pending_spawns.values()) - time.monotonic()))
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
            if self.reload_step is not None or self.reload_queue:
                self.advance_reload()
            if self.ready_fd is not None:
                self.report_ready(now)
        elif self.state == STOPPING:
            if not self.children:
                self.state = STOPPED
            elif now >= self.stop_deadline:
                for child in self.children.values():
                    log.warning("worker %s[%d] pid %d did not stop in time: SIGKILL", child.worker.name, child.worker_id, child.pid)
                self.kill_all(signal.SIGKILL)
                self.stop_deadline = now + 5.0
        for child in self.children.values():
            if child.kill_at is not None and now >= child.kill_at:
                log.warning("worker %s[%d] pid %d did not exit in time: SIGKILL", child.worker.name, child.worker_id, child.pid)
                self.send(child.pid, signal.SIGKILL)
                child.kill_at = None
        if self.header_dirty or time.time() - self.header_written >= 1.0:
            self.write_header()

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
    def spawn(self, key: tuple[int, int]) -> int:
        """Fork a worker process for (worker index, worker id)."""
        assert self.table is not None
        index, worker_id = key
        worker = self.workers[index]
        slot = self.table.claim(0, worker_id, worker.name, worker.bound_listen or "")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self.become_worker()
            run_worker_process(worker, worker_id, self.table, slot, self.runtime)
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
        self.children.clear()

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
        if step is not None and step.phase == "ready" and step.new_pid == child.pid and self.reload_graceful:
            # The replacement died before it served: keep the old process, give up the reload.
            self.assigned[key] = step.old_pid
            old = self.children.get(step.old_pid)
            if old is not None:
                old.retiring = False
            log.error(
                "reload abandoned: the new worker %s[%d] exited (%s) before serving; the old workers keep running",
                child.worker.name,
                child.worker_id,
                words,
            )
            self.reload_step = None
            self.reload_queue.clear()
            return
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
        self.reload_queue.clear()
        self.reload_step = None
        self.kill_all(signal.SIGQUIT if graceful else signal.SIGTERM)
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
        if self.state != RUNNING:
            return
        log.info("master pid %d: %s reload", os.getpid(), "graceful" if graceful else "quick")
        self.call_master_hook("on_master_reload")
        queue = collections.deque()
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
                    old.retiring = True
                    new_pid = self.spawn(key)
                    self.reload_step = ReloadStep(key, old_pid, new_pid, "ready")
                else:
                    old.kill_at = now + stop_timeout + 3.0
                    old.stop_requested = True
                    self.send(old_pid, signal.SIGUSR1)
                    self.reload_step = ReloadStep(key, old_pid, None, "exit")
                log.info("reload: replacing worker %s[%d] pid %d", old.worker.name, key[1], old_pid)
                return
            log.info("reload done")
            self.header_dirty = True
            return
        if step.phase == "exit":
            new_pid = self.assigned.get(step.key)
            if step.old_pid not in self.children and new_pid is not None:
                step.new_pid = new_pid
                step.phase = "ready"
            elif step.old_pid not in self.children and step.key not in self.pending_spawns:
                self.reload_step = None  # respawn was not scheduled (stopping): nothing to wait for
            return
        if step.phase == "ready":
            new_pid = self.assigned.get(step.key)
            if new_pid is None:
                return  # died; being respawned
            if new_pid != step.new_pid:
                step.new_pid = new_pid
            states = {record.pid: record.state for record in self.table.read_slots()}
            if states.get(new_pid) == STATE_RUNNING:
                if self.reload_graceful:
                    old = self.children.get(step.old_pid)
                    if old is not None:
                        old.kill_at = None  # a graceful stop takes as long as its connections need (stop_timeout)
                        self.send(step.old_pid, signal.SIGUSR2)
                        old.kill_at = now + old.worker.stop_timeout + 5.0
                log.info("reload: worker %s[%d] replaced by pid %d", self.workers[step.key[0]].name, step.key[1], new_pid)
                self.reload_step = None

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
                "memory": rss_bytes(),
                "version": __version__,
                "loop": loop_name(),
                "python": sys.version.split()[0],
                "updated": time.time(),
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

