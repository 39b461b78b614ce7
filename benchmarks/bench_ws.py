"""WebSocket echo throughput and broadcast latency: a 1-worker longshore ``websocket://``
server against a server written with the ``websockets`` library, in the same run.

    python benchmarks/bench_ws.py [--duration 5] [--runs 3] [--broadcast 10000]

Echo: the C load client (benchmarks/wsloadclient.c, built automatically) opens
``--connections`` connections and keeps 1 and 16 masked ``--size``-byte text frames in
flight on each. Servers run on CPU 0, the client on CPU 1; runs alternate the servers
(ABBA order) and the table shows medians and the longshore/websockets ratio.
Target (longshore issue): ratio >= 5 at every pipeline depth.

Broadcast: ``--broadcast`` connections; one trigger message makes the server send one
64-byte message to every connection; the time until every connection has it, median of
``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import benchlib

TARGET_RATIO = 5.0
SERVER_CPU = 0
CLIENT_CPU = 1
WSLOADCLIENT = os.path.join(benchlib.BUILD_DIR, "wsloadclient")
LIBRARY_SERVER = os.path.join(benchlib.HERE, "ws_library_server.py")

SCRIPT = """\
import resource
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))

from longshore import Worker, run_all

worker = Worker("websocket://127.0.0.1:0", count=1, name="bench")
PAYLOAD = "x" * 64

def on_message(conn, message):
    if message == "broadcast":
        for other in list(worker.connections.values()):
            other.send(PAYLOAD)
    else:
        conn.send(message)

worker.on_message = on_message

if __name__ == "__main__":
    run_all()
"""


def build() -> str:
    """The WebSocket load client (built on first use)."""
    return benchlib.build_c("wsloadclient")


class LongshoreWs:
    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="longshore-bench-ws-")
        self.script = os.path.join(self.folder, "start.py")
        with open(self.script, "w") as file:
            file.write(SCRIPT)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, self.script, *args], cwd=self.folder, env=benchlib.child_env(), capture_output=True, text=True, timeout=90)

    def start(self) -> benchlib.Server:
        result = self.cli("start", "-d")
        if result.returncode != 0:
            sys.exit(f"longshore did not start: {result.stderr}")
        import json

        deadline = time.monotonic() + 20
        while True:
            document = json.loads(self.cli("status", "--json").stdout)
            processes = [p for p in document["processes"] if p["state"] == "running" and p["pid"] > 0]
            listen = document["workers"][0]["listen"]
            if processes and not listen.endswith(":0"):
                break
            if time.monotonic() > deadline:
                sys.exit("longshore worker did not start")
            time.sleep(0.1)
        pid = processes[0]["pid"]
        return benchlib.Server("longshore", "127.0.0.1", int(listen.rsplit(":", 1)[1]), pid, stop_fn=self.stop)

    def stop(self) -> None:
        self.cli("stop")
        shutil.rmtree(self.folder, ignore_errors=True)


def start_library(uvloop: bool) -> benchlib.Server:
    command = [sys.executable, LIBRARY_SERVER] + (["--uvloop"] if uvloop else [])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=benchlib.child_env())
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith("port="):
        process.kill()
        sys.exit(f"websockets server did not start: {line!r}")

    def stop() -> None:
        process.terminate()
        process.wait(10)

    return benchlib.Server("websockets", "127.0.0.1", int(line[5:]), process.pid, stop_fn=stop)


def run_client(args: list[str], timeout: float) -> dict[str, float]:
    prefix = benchlib.taskset_prefix(CLIENT_CPU if benchlib.pinning_possible() else None)
    return benchlib.run_client([*prefix, WSLOADCLIENT, *args], timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--pipelines", default="1,16")
    parser.add_argument("--broadcast", type=int, default=10000, help="connections for the broadcast test (0: skip)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--library-uvloop", action="store_true", help="run the websockets server on uvloop")
    options = parser.parse_args()
    build()
    benchlib.raise_nofile_limit(options.broadcast + 100)
    pinned = benchlib.pinning_possible()
    print(f"machine: {benchlib.describe_machine()}")
    print(f"servers on CPU {SERVER_CPU}, client on CPU {CLIENT_CPU}" if pinned else "no CPU pinning (needs 2 CPUs and taskset)")
    longshore = LongshoreWs()
    servers = {"longshore": longshore.start(), "websockets": start_library(options.library_uvloop)}
    try:
        if pinned:
            for server in servers.values():
                benchlib.pin(server.pid, SERVER_CPU)
        pipelines = [int(p) for p in options.pipelines.split(",")]
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        order = ["longshore", "websockets", "websockets", "longshore"]
        for run in range(options.runs):
            for pipeline in pipelines:
                for name in order[:2] if run % 2 == 0 else order[2:]:
                    server = servers[name]
                    cpu_before = benchlib.cpu_seconds(server.pid)
                    busy_before = benchlib.busy_cpu_seconds()
                    started = time.monotonic()
                    values = run_client(
                        ["-c", str(options.connections), "-d", str(options.duration), "-w", str(options.warmup),
                         "-s", str(options.size), "-p", str(pipeline), server.host, str(server.port)],
                        options.duration + options.warmup + 60,
                    )  # fmt: skip
                    elapsed = time.monotonic() - started
                    server_cpu = benchlib.cpu_seconds(server.pid) - cpu_before
                    machine_cpu = benchlib.busy_cpu_seconds() - busy_before
                    values["server_cpu_pct"] = 100 * server_cpu / elapsed
                    values["machine_cpu_pct"] = 100 * machine_cpu / elapsed
                    # Messages per CPU-second of the server: less sensitive to other load.
                    values["per_cpu_second"] = values["msgs_per_sec"] / (server_cpu / elapsed) if server_cpu else 0.0
                    results.setdefault((name, pipeline), []).append(values)
                    print(
                        f"  run {run + 1} {name:10s} p={pipeline:<2d} {values['msgs_per_sec']:>10,.0f} msg/s  p50 {values['p50_us']:.0f} us"
                        f"  p99 {values['p99_us']:.0f} us  errors {values['errors']:.0f}  server CPU {values['server_cpu_pct']:.0f}%"
                        f"  all CPUs {values['machine_cpu_pct']:.0f}% of 1",
                        flush=True,
                    )
        print()
        print(f"echo, {options.connections} connections, {options.size}-byte text messages, medians of {options.runs} runs:")
        print(f"{'in flight':>9}  {'longshore msg/s':>16}  {'websockets msg/s':>16}  {'ratio':>6}  {'per server CPU-s (l/w)':>24}  {'p50 us (l/w)':>14}  {'p99 us (l/w)':>14}")
        for pipeline in pipelines:
            ours = results[("longshore", pipeline)]
            theirs = results[("websockets", pipeline)]
            rate = benchlib.median([v["msgs_per_sec"] for v in ours])
            base = benchlib.median([v["msgs_per_sec"] for v in theirs])
            p50 = f"{benchlib.median([v['p50_us'] for v in ours]):.0f}/{benchlib.median([v['p50_us'] for v in theirs]):.0f}"
            p99 = f"{benchlib.median([v['p99_us'] for v in ours]):.0f}/{benchlib.median([v['p99_us'] for v in theirs]):.0f}"
            ratio = rate / base if base else float("inf")
            per_cpu = f"{benchlib.median([v['per_cpu_second'] for v in ours]):,.0f}/{benchlib.median([v['per_cpu_second'] for v in theirs]):,.0f}"
            verdict = "ok" if ratio >= TARGET_RATIO else f"below target {TARGET_RATIO:g}"
            print(f"{pipeline:>9}  {rate:>16,.0f}  {base:>16,.0f}  {ratio:>6.2f}  {per_cpu:>24}  {p50:>14}  {p99:>14}  {verdict}")
        if options.broadcast:
            print()
            print(f"broadcast: one 64-byte message to {options.broadcast} connections, {options.rounds} rounds:")
            for name, server in servers.items():
                values = run_client(["-b", str(options.rounds), "-c", str(options.broadcast), server.host, str(server.port)], 300)
                print(f"  {name:10s} connections {values['connections']:.0f}  median {values['median_ms']:.1f} ms  max {values['max_ms']:.1f} ms  errors {values['errors']:.0f}", flush=True)
                time.sleep(1.0)
    finally:
        for server in servers.values():
            server.stop()


if __name__ == "__main__":
    main()
