"""Memory per idle connection: 10,000 open connections on one worker process.

    python benchmarks/bench_idle_memory.py [--connections 10000] [--runs 3]

For a 1-worker longshore ``text://`` server and, as the baseline, a bare uvloop
``asyncio.Protocol`` server that only keeps its transport (benchmarks/bare_server.py
idle), in the same run: read the serving process's RSS (VmRSS from /proc), open the
connections from this process, wait until the server holds all of them (longshore:
``status --json``; both: its open file descriptors), wait a second for the heap to
settle, read RSS again. (after - before) / connections, in KiB.

Before the first reading a few connections are opened and closed, so that one-time
costs (code paths run for the first time, the loop's read buffer) are not counted as
per-connection memory. Target (longshore issue): <= 2.5 KiB per connection (the bare
server: about 1.3 KiB).
"""

from __future__ import annotations

import argparse
import socket
import sys
import time

import benchlib

TARGET_KIB = 2.5
FD_MARGIN = 200  # descriptors besides the connections (stdio, listener, epoll, logs, ...)
WARM_UP_CONNECTIONS = 20


class Clients:
    """Plain blocking client sockets held open by this process."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []

    def open(self, server: benchlib.Server, count: int, catch_up: object = None) -> None:
        for i in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect((server.host, server.port))
            self.sockets.append(sock)
            if catch_up is not None and (i + 1) % 1000 == 0:
                catch_up(i + 1)  # type: ignore[operator]

    def close(self) -> None:
        for sock in self.sockets:
            try:
                # RST instead of FIN: no TIME_WAIT left behind on the client's ports.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                sock.close()
            except OSError:
                pass
        self.sockets.clear()


def wait_for(condition: object, timeout: float, what: str) -> float:
    """Poll ``condition()`` until true; return the seconds it took."""
    started = time.monotonic()
    while not condition():  # type: ignore[operator]
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def measure(
    name: str, server: benchlib.Server, count: int, app: benchlib.LongshoreApp | None
) -> dict[str, float]:
    pid = server.pid
    warm = Clients()
    warm.open(server, WARM_UP_CONNECTIONS)
    base_fds = benchlib.fd_count(pid)
    wait_for(lambda: benchlib.fd_count(pid) >= base_fds, 10, "the warm-up connections")
    warm.close()
    time.sleep(1.0)
    idle_fds = benchlib.fd_count(pid)
    before = benchlib.rss_bytes(pid)

    def accepted() -> int:
        return benchlib.fd_count(pid) - idle_fds

    def catch_up(opened: int) -> None:  # keep the accept queue short
        wait_for(lambda: accepted() >= opened - 500, 30, f"the server to accept {opened - 500} connections")

    clients = Clients()
    started = time.monotonic()
    try:
        clients.open(server, count, catch_up)
        connect_seconds = time.monotonic() - started
        wait_for(lambda: accepted() >= count, 60, f"{count} connections in the server's descriptors")
        if app is not None:

            def status_connections() -> bool:
                return app.status()["processes"][0]["connections"] >= count

            wait_for(status_connections, 60, f"status --json to show {count} connections")
        all_seconds = time.monotonic() - started
        time.sleep(1.0)  # let the allocator and the GC settle
        after = benchlib.rss_bytes(pid)
        status_memory = None
        if app is not None:
            process = app.status()["processes"][0]
            status_memory = process["memory"]
            shown = process["connections"]
        else:
            shown = accepted()
    finally:
        clients.close()
    per_connection = (after - before) / count / 1024
    print(
        f"  {name:<9} before {before / 2**20:7.1f} MiB  after {after / 2**20:7.1f} MiB  "
        f"connections {shown}  ({connect_seconds:.1f} s to connect, {all_seconds:.1f} s until all accepted)  "
        f"=> {per_connection:.2f} KiB per connection"
        + (f"  [status memory {status_memory / 2**20:.1f} MiB]" if status_memory else ""),
        flush=True,
    )
    return {"per_connection_kib": per_connection, "before": before, "after": after}


def main() -> int:
    parser = argparse.ArgumentParser(description="memory per idle connection, longshore vs bare uvloop")
    parser.add_argument("--connections", type=int, default=10000, help="open connections (10000)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions, each with fresh servers (3)")
    args = parser.parse_args()

    count = args.connections
    hard = benchlib.nofile_hard_limit()
    needed = count + FD_MARGIN
    print(f"bench_idle_memory: {benchlib.describe_machine()}")
    if hard is not None and hard < needed:
        count = max(hard - FD_MARGIN, 100)
        print(
            f"WARNING: the hard RLIMIT_NOFILE is {hard} (ulimit -Hn); measuring {count} connections "
            f"instead of {args.connections}"
        )
        needed = count + FD_MARGIN
    soft = benchlib.raise_nofile_limit(needed)
    print(f"{count} idle connections per server, {args.runs} runs; RLIMIT_NOFILE soft {soft}, hard {hard or 'unlimited'}")

    results: dict[str, list[float]] = {"longshore": [], "bare": []}
    problems: list[str] = []
    for run in range(args.runs):
        print(f"run {run + 1}/{args.runs}", flush=True)
        order = ["longshore", "bare"] if run % 2 == 0 else ["bare", "longshore"]
        for name in order:
            if name == "longshore":
                app = benchlib.LongshoreApp("idle", nofile=needed)
                try:
                    server = app.start()
                    results[name].append(measure(name, server, count, app)["per_connection_kib"])
                finally:
                    app.stop()
                    problems += app.log_problems()
                    app.cleanup()
            else:
                server = benchlib.start_bare("idle")
                try:
                    results[name].append(measure(name, server, count, None)["per_connection_kib"])
                finally:
                    server.stop()

    ours = benchlib.median(results["longshore"])
    bare = benchlib.median(results["bare"])
    print()
    print(f"{'server':<10} {'KiB per idle connection (median)':>33} {'runs':>24}")
    for name, value in (("longshore", ours), ("bare", bare)):
        runs = ", ".join(f"{v:.2f}" for v in results[name])
        print(f"{name:<10} {value:>33.2f} {runs:>24}")
    ratio = ours / bare if bare > 0 else float("nan")
    met = ours <= TARGET_KIB
    print(f"\nlongshore/bare = {ratio:.2f}; longshore target <= {TARGET_KIB} KiB: {'met' if met else 'NOT met'}")
    if problems:
        print("\nlongshore log warnings/errors:")
        for line in problems[:40]:
            print(f"  {line}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
