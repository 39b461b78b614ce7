"""Broadcast to a group of WebSocket connections spread over the worker processes,
through the channel: embedded hub and Redis, with one process and no channel as the
reference.

    python benchmarks/bench_broadcast.py [--connections 10000] [--workers 4] [--rounds 10]
                                         [--backends none,embedded,redis]

Each backend gets a longshore ``websocket://`` app (a start script generated into a
temporary folder, ``start -d``) with ``--workers`` processes on ``reuse_port`` sockets,
so the connections spread evenly. Every connection joins the group ``all`` when its
handshake completes. The C client (benchmarks/wsloadclient.c, broadcast mode) opens the
connections, then, ``--rounds`` times, sends ``broadcast`` on its first connection; that
worker calls ``channel.send_to_group("all", 64-byte text)``, and the round ends when
every connection has received it. Reported: the median and largest time to reach all,
and deliveries per second (connections / median time).

``none`` is one process looping over its own connections (no channel): the floor for
the time to reach everyone. ``redis`` starts its own ``redis-server`` on a free port.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import benchlib
from bench_ws import WSLOADCLIENT, build

SCRIPT = """\
import os, resource
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))

from longshore import Worker, run_all

BACKEND = os.environ["BENCH_BACKEND"]
PAYLOAD = "x" * 64
worker = Worker("websocket://127.0.0.1:0", count=int(os.environ["BENCH_WORKERS"]), name="bench", reuse_port=True)

if BACKEND == "none":
    def on_message(conn, message):
        if message == "broadcast":
            for other in list(worker.connections.values()):
                other.send(PAYLOAD)
else:
    from longshore import channel

    if BACKEND != "embedded":
        Worker.channel = BACKEND

    def on_websocket_connected(conn):
        channel.join_group(conn, "all")

    def on_message(conn, message):
        if message == "broadcast":
            channel.send_to_group("all", PAYLOAD)

    worker.on_websocket_connected = on_websocket_connected

worker.on_message = on_message

if __name__ == "__main__":
    run_all()
"""


class App:
    """The benchmark app for one backend, run as a daemon."""

    def __init__(self, backend: str, workers: int) -> None:
        self.folder = tempfile.mkdtemp(prefix="longshore-bench-broadcast-")
        self.script = os.path.join(self.folder, "start.py")
        with open(self.script, "w") as file:
            file.write(SCRIPT)
        self.env = {**benchlib.child_env(), "BENCH_BACKEND": backend, "BENCH_WORKERS": str(workers)}
        self.workers = workers

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, self.script, *args], cwd=self.folder, env=self.env, capture_output=True, text=True, timeout=90)

    def start(self) -> int:
        result = self.cli("start", "-d")
        if result.returncode != 0:
            sys.exit(f"longshore did not start: {result.stderr}")
        deadline = time.monotonic() + 20
        while True:
            document = self.status()
            running = [p for p in document["processes"] if p["state"] == "running"]
            if len(running) == self.workers:
                return int(document["workers"][0]["listen"].rsplit(":", 1)[1])
            if time.monotonic() > deadline:
                sys.exit("the workers did not start")
            time.sleep(0.1)

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json").stdout)

    def stop(self) -> None:
        self.cli("stop")
        shutil.rmtree(self.folder, ignore_errors=True)


def start_redis() -> tuple[subprocess.Popen[bytes], int]:
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, port
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                sys.exit("redis-server did not start")
            time.sleep(0.05)


def run_client(connections: int, rounds: int, port: int) -> dict[str, float]:
    return benchlib.run_client([WSLOADCLIENT, "-b", str(rounds), "-c", str(connections), "127.0.0.1", str(port)], 600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--backends", default="none,embedded,redis")
    options = parser.parse_args()
    build()
    benchlib.raise_nofile_limit(options.connections + 100)
    print(f"machine: {benchlib.describe_machine()}")
    print(f"one 64-byte text message to a group of {options.connections} WebSocket connections, {options.rounds} rounds")
    redis: subprocess.Popen[bytes] | None = None
    rows = []
    try:
        for backend in options.backends.split(","):
            setting = backend
            if backend == "redis":
                redis, redis_port = start_redis()
                setting = f"redis://127.0.0.1:{redis_port}/0"
            workers = 1 if backend == "none" else options.workers
            app = App(setting, workers)
            port = app.start()
            try:
                values = run_client(options.connections, options.rounds, port)
                time.sleep(0.5)  # let the counters be published
                document = app.status()
            finally:
                app.stop()
            spread = [p.get("channel", {}).get("delivered", 0) // options.rounds for p in document["processes"]]
            delivered = sum(p.get("channel", {}).get("delivered", 0) for p in document["processes"])
            dropped = sum(p.get("channel", {}).get("dropped", 0) for p in document["processes"])
            rate = values["connections"] / (values["median_ms"] / 1000) if values["median_ms"] else 0.0
            rows.append((backend, workers, values, rate, delivered, dropped))
            print(
                f"  {backend:9s} workers {workers}  connections {values['connections']:.0f} (reached per process and round: {spread})"
                f"  median {values['median_ms']:.1f} ms  max {values['max_ms']:.1f} ms  {rate:,.0f} deliveries/s"
                f"  channel delivered {delivered} dropped {dropped}  errors {values['errors']:.0f}",
                flush=True,
            )
    finally:
        if redis is not None:
            redis.kill()
            redis.wait()
    print()
    print(f"{'backend':9s}  {'workers':>7}  {'median ms':>9}  {'max ms':>8}  {'deliveries/s':>12}")
    for backend, workers, values, rate, _, _ in rows:
        print(f"{backend:9s}  {workers:>7}  {values['median_ms']:>9.1f}  {values['max_ms']:>8.1f}  {rate:>12,.0f}")


if __name__ == "__main__":
    main()
