"""What ``status`` and ``connections`` show, built from the shared status table.

``collect`` reads the table (no signal, no waiting on any process) and returns the JSON
document that ``status --json`` prints; the renderers turn that document into tables.
A worker whose heartbeat has not moved for ``BUSY_AFTER`` seconds is shown as busy,
with its last published figures and how long it has been busy.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .runtime import Runtime
from .stats import STATE_NAMES, STATE_RUNNING, STATE_STOPPING, StatsTable


def make_console() -> Console:
    """A console for the terminal, or a wide plain one when output goes to a file or pipe."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=240, color_system=None)
    return console


def collect(table: StatsTable) -> dict[str, Any]:
    """The status document: master, processes, summary, exits."""
    header = table.read_header()
    master = dict(header.get("master", {}))
    now = time.time()
    if master.get("start_time"):
        master["uptime"] = round(now - master["start_time"], 1)
    processes: list[dict[str, Any]] = []
    for record in sorted(table.read_slots(), key=lambda r: (r.name, r.worker_id, r.started_at)):
        busy_for = record.busy_for if record.heartbeat > 0 else 0.0
        processes.append(
            {
                "pid": record.pid,
                "name": record.name,
                "worker_id": record.worker_id,
                "listen": record.listen,
                "state": STATE_NAMES.get(record.state, str(record.state)),
                "status": "busy" if busy_for > 0 else "idle",
                "busy_for": round(busy_for, 2),
                "memory": record.memory,
                "connections": record.connections,
                "send_fail": record.send_fail,
                "timers": record.timers,
                "total_request": record.total_request,
                "qps": round(record.qps, 1),
                "throw_exception": record.throw_exception,
                "protocol_error": record.protocol_error,
                "package_too_large": record.package_too_large,
                "connect_fail": record.connect_fail,
                "tls_error": record.tls_error,
                "channel": {
                    "published": record.channel_published,
                    "delivered": record.channel_delivered,
                    "dropped": record.channel_dropped,
                },
                "send_buffer_bytes": record.send_buffer_bytes,
                "bytes_read": record.bytes_read,
                "bytes_written": record.bytes_written,
                "started_at": record.started_at,
                "uptime": round(now - record.started_at, 1) if record.started_at else 0.0,
            }
        )
    summary: dict[str, Any] = {"processes": len(processes)}
    for key in ("connections", "send_fail", "timers", "total_request", "throw_exception", "memory", "send_buffer_bytes", "tls_error"):
        summary[key] = sum(process[key] for process in processes)
    summary["qps"] = round(sum(process["qps"] for process in processes), 1)
    summary["channel"] = {key: sum(process["channel"][key] for process in processes) for key in ("published", "delivered", "dropped")}
    summary["busy"] = sum(1 for process in processes if process["status"] == "busy")
    return {
        "master": master,
        "workers": header.get("workers", []),
        "processes": processes,
        "summary": summary,
        "exits": header.get("exits", []),
    }


def human_bytes(size: float) -> str:
    """``1.5M`` style sizes."""
    for unit in ("B", "K", "M", "G"):
        if size < 1024 or unit == "G":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}G"


def human_duration(seconds: float) -> str:
    """``2d 3h 4m 5s`` style durations."""
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    if days or hours or minutes:
        parts.append(f"{minutes}m")
    parts.append(f"{seconds}s")
    return " ".join(parts)


def render_status(document: dict[str, Any]) -> Group:
    """The status document as rich renderables."""
    master = document["master"]
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(master.get("start_time", 0)))
    title = Text.assemble(
        ("longshore ", "bold"),
        f"{master.get('version', '')}  master pid {master.get('pid')}  {master.get('loop', '')}  Python {master.get('python', '')}\n",
        f"started {started}, up {human_duration(master.get('uptime', 0))}, state {master.get('state', '?')}",
        (" (reloading)" if master.get("reloading") else ""),
        f", master memory {human_bytes(master.get('memory', 0))}",
        _last_reload_line(master.get("last_reload")),
        (f"\nstatus page http://{master['metrics_listen']}/  metrics http://{master['metrics_listen']}/metrics" if master.get("metrics_listen") else ""),
    )
    table = Table(box=box.SIMPLE_HEAD, show_footer=True, pad_edge=False)
    summary = document["summary"]
    show_channel = any(summary.get("channel", {}).values())
    columns = [
        ("pid", "pid", f"{summary['processes']} proc"),
        ("worker", "worker", ""),
        ("listen", "listen", ""),
        ("memory", "memory", human_bytes(summary["memory"])),
        ("connections", "conns", str(summary["connections"])),
        ("send_fail", "send_fail", str(summary["send_fail"])),
        ("timers", "timers", str(summary["timers"])),
        ("total_request", "total_request", str(summary["total_request"])),
        ("qps", "qps", f"{summary['qps']:.0f}"),
        ("throw_exception", "exceptions", str(summary["throw_exception"])),
        *([("tls_error", "tls_errors", str(summary["tls_error"]))] if summary.get("tls_error") else []),
        *([("channel", "channel pub/deliv/drop", _channel_cell(summary["channel"]))] if show_channel else []),
        ("status", "status", f"{summary['busy']} busy" if summary["busy"] else "idle"),
    ]
    for key, heading, footer in columns:
        justify = "left" if key in ("worker", "listen", "status") else "right"
        table.add_column(heading, footer=footer, justify=justify)  # type: ignore[arg-type]
    for process in document["processes"]:
        if process["status"] == "busy":
            status = Text(f"busy {process['busy_for']:.1f}s", style="bold red")
        elif process["state"] != "running":
            status = Text(process["state"], style="yellow")
        else:
            status = Text("idle", style="green")
        table.add_row(
            str(process["pid"]),
            f"{process['name']}[{process['worker_id']}]",
            process["listen"],
            human_bytes(process["memory"]),
            str(process["connections"]),
            str(process["send_fail"]),
            str(process["timers"]),
            str(process["total_request"]),
            f"{process['qps']:.0f}",
            str(process["throw_exception"]),
            *([str(process.get("tls_error", 0))] if summary.get("tls_error") else []),
            *([_channel_cell(process["channel"])] if show_channel else []),
            status,
        )
    parts: list[Any] = [title, table]
    if document["exits"]:
        exits = Table(title="worker exits", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
        exits.add_column("worker")
        exits.add_column("exit status")
        exits.add_column("count", justify="right")
        for row in document["exits"]:
            exits.add_row(row["name"], row["status"], str(row["count"]))
        parts.append(exits)
    return Group(*parts)


def _last_reload_line(last: dict[str, Any] | None) -> str:
    """``last reload: done 12s ago`` (``abandoned (why) ...``, ``running, started ...``), or nothing when
    the master has not been asked to reload."""
    if not last:
        return ""
    line = f"\nlast reload: {last.get('result', '?')}"
    if last.get("reason"):
        line += f" ({last['reason']})"
    if last.get("at"):  # when it ended (when it started, while it runs)
        ago = human_duration(max(0.0, time.time() - last["at"]))
        line += f", started {ago} ago" if last.get("result") == "running" else f" {ago} ago"
    return line


def _channel_cell(counters: dict[str, int]) -> str:
    return f"{counters['published']}/{counters['delivered']}/{counters['dropped']}"


def print_status(document: dict[str, Any], console: Console | None = None) -> None:
    """Print one status table."""
    (console or make_console()).print(render_status(document))


def live_status(runtime: Runtime, table: StatsTable, interval: float = 1.0) -> int:
    """Redraw the status every ``interval`` seconds until Ctrl+C or the master stops.
    A ``restart`` is followed: the new master's table is read once it is in place."""
    console = make_console()
    follower = _TableFollower(table)
    try:
        if not console.is_terminal:
            while _master_runs(runtime):
                console.print(render_status(collect(follower.current())))
                console.print("")
                time.sleep(interval)
            return 0
        from rich.live import Live

        with Live(render_status(collect(follower.current())), console=console, refresh_per_second=4, screen=False) as live:
            while _master_runs(runtime):
                time.sleep(interval)
                live.update(render_status(collect(follower.current())))
    except KeyboardInterrupt:
        pass
    finally:
        follower.close()
    return 0


def _master_runs(runtime: Runtime, grace: float = 3.0) -> bool:
    """True while a master runs. During a ``restart`` there is no pid file for a moment:
    wait up to ``grace`` seconds for the next master before saying no."""
    deadline = time.monotonic() + grace
    while not runtime.read_master_pid():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


class _TableFollower:
    """The status table of whichever master runs now: each start of a master puts a new
    table file in place, and a table mapped earlier would go on showing the old one."""

    __slots__ = ("given", "table")

    def __init__(self, table: StatsTable) -> None:
        self.given = table  # the caller's: closed by the caller
        self.table = table

    def current(self) -> StatsTable:
        """The table to read now (reopened when the file was replaced)."""
        if self.table.is_current():
            return self.table
        try:
            fresh = StatsTable.open(self.table.path)
        except (OSError, ValueError):
            return self.table  # between two masters: show the last one a little longer
        self.close()
        self.table = fresh
        return fresh

    def close(self) -> None:
        """Unmap a table this follower opened itself."""
        if self.table is not self.given:
            self.table.close()
            self.table = self.given


def collect_connections(runtime: Runtime, table: StatsTable, timeout: float = 2.0) -> tuple[list[dict[str, Any]], list[int]]:
    """Ask every worker (SIGIO) for its connections; return the rows and the pids that
    did not answer in time (busy in user code)."""
    asked: list[int] = []
    # A list counts as fresh when its file changed after the signal. File times come
    # from a coarse kernel clock that can lag time.time() by a few milliseconds, so
    # compare with the file as it was, not with the time of asking.
    before: dict[int, tuple[int, int, int] | None] = {}
    for record in table.read_slots():
        if record.pid > 0 and record.state in (STATE_RUNNING, STATE_STOPPING):
            before[record.pid] = _file_signature(runtime.connections_file(record.pid))
            try:
                os.kill(record.pid, signal.SIGIO)
                asked.append(record.pid)
            except ProcessLookupError:
                pass
    rows: list[dict[str, Any]] = []
    waiting = set(asked)
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for pid in list(waiting):
            path = runtime.connections_file(pid)
            try:
                if _file_signature(path) in (None, before.get(pid)):
                    continue
                with open(path) as file:
                    rows.extend(json.load(file))
            except (OSError, ValueError):
                continue
            waiting.discard(pid)
        if waiting:
            time.sleep(0.02)
    rows.sort(key=lambda row: (-row["send_buffer"], row["worker"], row["pid"], row["id"]))
    return rows, sorted(waiting)


def _file_signature(path: str) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size)


def print_connections(rows: list[dict[str, Any]], silent: list[int], console: Console | None = None) -> None:
    """Print the connection list, largest send buffer first."""
    console = console or make_console()
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title=f"{len(rows)} connection(s)", title_justify="left")
    for heading in ("worker", "pid", "id", "protocol", "local", "remote", "send_buffer", "recv_buffer", "bytes_read", "bytes_written", "state", "age"):
        table.add_column(heading, justify="left" if heading in ("worker", "protocol", "local", "remote", "state") else "right")
    for row in rows:
        table.add_row(
            f"{row['worker']}[{row['worker_id']}]",
            str(row["pid"]),
            str(row["id"]),
            row["protocol"],
            row["local"],
            row["remote"],
            str(row["send_buffer"]),
            str(row["recv_buffer"]),
            str(row["bytes_read"]),
            str(row["bytes_written"]),
            row["state"] + (" (paused)" if row.get("paused") else ""),
            f"{row['age']:.1f}s",
        )
    console.print(table)
    for pid in silent:
        console.print(f"worker pid {pid} did not answer (busy in user code?)", style="yellow")
