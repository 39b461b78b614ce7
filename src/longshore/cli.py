"""The command line of a start script: ``python start.py <command> [options]``.

========================  ===============================================================
``start [-d] [--watch]``  run the master and its workers (``-d``: as a daemon;
                          ``--watch``: reload when a Python file changes)
``stop [-g]``             stop (``-g``: gracefully, letting connections finish)
``restart [-d] [-g]``     stop, then start
``reload [-g]``           replace the workers one at a time (``-g``: gracefully)
``status [-d] [--json]``  the process table (``-d``: redraw every second)
``connections [--json]``  every connection of every worker, largest send buffer first
========================  ===============================================================

Every command but ``start`` talks to the running master through its pid file and
status table; with nothing running it says so and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

from .runtime import Runtime
from .stats import StatsTable
from .worker import Worker


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Run and control a longshore application.")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    start = commands.add_parser("start", help="start the master and its workers")
    start.add_argument("-d", "--daemon", action="store_true", help="run in the background")
    start.add_argument("--watch", action="store_true", help="reload gracefully when a Python file next to the start script changes")
    stop = commands.add_parser("stop", help="stop")
    stop.add_argument("-g", "--graceful", action="store_true", help="let connections finish first")
    restart = commands.add_parser("restart", help="stop, then start")
    restart.add_argument("-d", "--daemon", action="store_true", help="run in the background")
    restart.add_argument("-g", "--graceful", action="store_true", help="stop gracefully")
    restart.add_argument("--watch", action="store_true", help="reload gracefully when a Python file changes")
    reload = commands.add_parser("reload", help="replace the workers one at a time")
    reload.add_argument("-g", "--graceful", action="store_true", help="let old workers finish their connections")
    reload.add_argument("--no-wait", action="store_true", help="do not wait for the reload to finish")
    status = commands.add_parser("status", help="show every process")
    status.add_argument("-d", "--live", action="store_true", help="redraw every second")
    status.add_argument("--json", action="store_true", help="print JSON")
    connections = commands.add_parser("connections", help="list every connection")
    connections.add_argument("--json", action="store_true", help="print JSON")
    connections.add_argument("--worker", help="only this worker name")
    connections.add_argument("--pid", type=int, help="only this worker process")
    return parser


def run_all(argv: list[str] | None = None) -> None:
    """Run the command named on the command line for every Worker created so far."""
    start_file = sys.argv[0] if sys.argv and sys.argv[0] else "longshore"
    parser = build_parser(f"python {os.path.basename(start_file)}")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    workers = list(Worker._all)
    runtime = Runtime.for_start_file(start_file, Worker.pid_file, Worker.log_file, Worker.stdout_file)
    sys.exit(dispatch(args, workers, runtime))


def dispatch(args: argparse.Namespace, workers: list[Worker], runtime: Runtime) -> int:
    """Run one parsed command; return the exit status."""
    command = args.command
    if command == "start":
        return start(workers, runtime, args.daemon, args.watch)
    if command == "restart":
        if runtime.read_master_pid():
            code = stop(runtime, workers, args.graceful)
            if code:
                return code
        return start(workers, runtime, args.daemon, args.watch)
    master_pid = runtime.read_master_pid()
    if master_pid is None:
        print(f"longshore: {os.path.basename(runtime.start_file)} is not running", file=sys.stderr)
        return 1
    if command == "stop":
        return stop(runtime, workers, args.graceful)
    if command == "reload":
        return reload(runtime, master_pid, args.graceful, not args.no_wait)
    table = open_table(runtime)
    if table is None:
        return 1
    try:
        if command == "status":
            from . import status

            if args.live:
                return status.live_status(runtime, table)
            document = status.collect(table)
            if args.json:
                print(json.dumps(document, indent=2))
            else:
                status.print_status(document)
            return 0
        if command == "connections":
            from . import status

            rows, silent = status.collect_connections(runtime, table)
            if args.worker:
                rows = [row for row in rows if row["worker"] == args.worker]
            if args.pid:
                rows = [row for row in rows if row["pid"] == args.pid]
            if args.json:
                print(json.dumps({"connections": rows, "no_answer": silent}, indent=2))
            else:
                status.print_connections(rows, silent)
            return 0
    finally:
        table.close()
    return 2


def open_table(runtime: Runtime) -> StatsTable | None:
    """Map the running master's status table (waiting briefly if it is just starting)."""
    deadline = time.monotonic() + 2.0
    while True:
        try:
            return StatsTable.open(runtime.stats_file)
        except (OSError, ValueError) as exc:
            if time.monotonic() > deadline:
                print(f"longshore: cannot read the status table {runtime.stats_file}: {exc}", file=sys.stderr)
                return None
            time.sleep(0.05)


def start(workers: list[Worker], runtime: Runtime, daemon: bool, watch: bool = False) -> int:
    """``start``: run the master (in the foreground, or as a daemon); ``watch``: reload
    gracefully whenever a Python file in the start script's folder changes."""
    if not workers:
        print("longshore: the start script created no Worker", file=sys.stderr)
        return 1
    from .master import Master

    return Master(workers, runtime, daemon=daemon, watch=watch).start()


def stop(runtime: Runtime, workers: list[Worker], graceful: bool) -> int:
    """``stop``: signal the master and wait until it has exited."""
    pid = runtime.read_master_pid()
    if pid is None:
        print(f"longshore: {os.path.basename(runtime.start_file)} is not running", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGQUIT if graceful else signal.SIGTERM)
    except PermissionError:
        print(f"longshore: not allowed to signal master pid {pid} (it runs as another user)", file=sys.stderr)
        return 1
    except ProcessLookupError:
        print(f"longshore: {os.path.basename(runtime.start_file)} is not running", file=sys.stderr)
        return 1
    print(f"longshore: stopping{' gracefully' if graceful else ''} (master pid {pid}) ...", flush=True)
    longest = max((worker.stop_timeout for worker in workers), default=10.0)
    deadline = time.monotonic() + longest + 15.0
    while time.monotonic() < deadline:
        if not _alive(pid):
            print("longshore: stopped")
            return 0
        time.sleep(0.05)
    print(f"longshore: master pid {pid} has not stopped after {longest + 15:.0f} s", file=sys.stderr)
    return 1


def reload(runtime: Runtime, master_pid: int, graceful: bool, wait: bool) -> int:
    """``reload``: signal the master; wait until every worker has been replaced.

    Exits with status 1 when the master gave the reload up (a new worker could not
    start: the old ones keep serving), saying why.
    """
    table = open_table(runtime) if wait else None
    before = {record.pid for record in table.read_slots()} if table else set()
    previous = _last_reload(table) if table else None
    try:
        os.kill(master_pid, signal.SIGUSR2 if graceful else signal.SIGUSR1)
    except (PermissionError, ProcessLookupError) as exc:
        if table is not None:
            table.close()
        if isinstance(exc, PermissionError):
            print(f"longshore: not allowed to signal master pid {master_pid} (it runs as another user)", file=sys.stderr)
        else:
            print(f"longshore: {os.path.basename(runtime.start_file)} is not running", file=sys.stderr)
        return 1
    print(f"longshore: {'graceful ' if graceful else ''}reload sent to master pid {master_pid}", flush=True)
    if table is None:
        return 0
    try:
        deadline = time.monotonic() + 120.0
        time.sleep(0.2)
        while time.monotonic() < deadline:
            header = table.read_header().get("master", {})
            if previous is None:  # a master that does not say how its reloads went
                finished = not header.get("reloading")
                outcome: dict[str, Any] = {"result": "done"}
            else:
                outcome = header.get("last_reload") or {}
                finished = outcome.get("id", 0) > previous.get("id", 0) and outcome.get("result") != "running"
            if finished and outcome.get("result") == "abandoned":
                print(f"longshore: reload abandoned: {outcome.get('reason')}; see {runtime.log_file}", file=sys.stderr)
                return 1
            if finished:
                after = {record.pid for record in table.read_slots() if record.state == 2}
                print(f"longshore: reloaded ({len(after - before)} new worker process(es))")
                return 0
            if not _alive(master_pid):
                print(f"longshore: master pid {master_pid} exited during the reload", file=sys.stderr)
                return 1
            time.sleep(0.1)
        print("longshore: the reload is still running; see status", file=sys.stderr)
        return 1
    finally:
        table.close()


def _last_reload(table: StatsTable) -> dict[str, Any] | None:
    """The master's record of its latest reload (``{}`` before the first one), or None
    when the master does not keep one."""
    header = table.read_header().get("master", {})
    if "last_reload" not in header:
        return None
    return header["last_reload"] or {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own child in tests) counts as gone
        with open(f"/proc/{pid}/stat") as file:
            return file.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True
