"""HTTP benchmarks: hello-world throughput with wrk, and memory while a large file streams.

    python benchmarks/bench_http.py [--duration 5] [--runs 3]       throughput
    python benchmarks/bench_http.py download [--size-mb 1024] [--rate-mb 1] [--slow-seconds 20]

Throughput: ``wrk -t1 -c50`` (on CPU 1, under taskset) against three servers answering
``Hello, World!`` on CPU 0, in the same run, alternating: a 1-worker longshore
``http://`` server (the worker pinned to CPU 0), a bare uvloop + httptools protocol that
answers a fixed response (the ceiling for Python), and uvicorn (uvloop, httptools) with
an ASGI app. Medians of ``--runs`` and the ratios are printed. Targets: longshore >= 0.75
of the bare server and >= 3 times uvicorn; exit status 0 when both are met.

Download: a 1-worker longshore server sends a ``--size-mb`` sparse file with
``FileResponse``; the client reads at ``--rate-mb`` MB/s for ``--slow-seconds``, then as
fast as it can, and the worker's RSS (``/proc``) is sampled all along. Target: growth
under 5 MB.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import child_env, cpu_seconds, pin, rss_bytes  # noqa: E402

BODY = "Hello, World!"

LONGSHORE = """\
from longshore import Worker, run_all
from longshore.http import FileResponse
import os

web = Worker("http://127.0.0.1:{port}", name="bench")

def on_message(conn, request):
    if request.path == "/big":
        conn.send(FileResponse(os.environ["BIG_FILE"]))
    else:
        conn.send("Hello, World!")

web.on_message = on_message

if __name__ == "__main__":
    run_all()
"""

BARE = """\
import asyncio, sys, uvloop, httptools

RESPONSE = b"HTTP/1.1 200 OK\\r\\nServer: bare\\r\\nContent-Type: text/html; charset=utf-8\\r\\nContent-Length: 13\\r\\n\\r\\nHello, World!"

class Bare(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)
    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()
    def on_message_complete(self):
        self.transport.write(RESPONSE)

async def main():
    server = await asyncio.get_running_loop().create_server(Bare, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    await server.serve_forever()

uvloop.run(main())
"""

ASGI = """\
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/html; charset=utf-8")]})
    await send({"type": "http.response.body", "body": b"Hello, World!"})
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


class Longshore:
    name = "longshore"

    def __init__(self, folder: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.folder = folder
        self.script = os.path.join(folder, "start.py")
        with open(self.script, "w") as file:
            file.write(LONGSHORE.format(port=self.port))
        self.env = {**child_env(), **(env or {})}

    def command(self, *args: str) -> str:
        result = subprocess.run([sys.executable, self.script, *args], cwd=self.folder, env=self.env, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"start.py {' '.join(args)}: {result.stdout}{result.stderr}")
        return result.stdout

    def start(self) -> int:
        import json

        self.command("start", "-d")
        wait_port(self.port)
        pid = json.loads(self.command("status", "--json"))["processes"][0]["pid"]
        pin(pid, 0)
        self.pid = pid
        return pid

    def stop(self) -> None:
        self.command("stop")


class Subprocess:
    def __init__(self, name: str, argv: list[str], port: int, cwd: str) -> None:
        self.name = name
        self.port = port
        self.process = subprocess.Popen(["taskset", "-c", "0", *argv], cwd=cwd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> int:
        wait_port(self.port)
        return self.process.pid

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def run_wrk(port: int, duration: float, connections: int, pid: int) -> tuple[float, float]:
    """(requests/s, requests per second of server CPU time)."""
    url = f"http://127.0.0.1:{port}/"
    subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", "-d1s", url], capture_output=True, timeout=30)  # warm-up
    cpu_before = cpu_seconds(pid)
    result = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", url], capture_output=True, text=True, timeout=duration + 30)
    match = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    if not match or "Non-2xx" in result.stdout or "Socket errors" in result.stdout:
        print(result.stdout, file=sys.stderr)
    if not match:
        raise RuntimeError("wrk printed no Requests/sec")
    cpu = cpu_seconds(pid) - cpu_before
    done = int(re.search(r"(\d+) requests in", result.stdout).group(1))
    return float(match.group(1)), done / cpu if cpu > 0 else 0.0


def throughput(args: argparse.Namespace) -> int:
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")
    folder = tempfile.mkdtemp(prefix="longshore-bench-http-")
    with open(os.path.join(folder, "bare.py"), "w") as file:
        file.write(BARE)
    with open(os.path.join(folder, "asgi_app.py"), "w") as file:
        file.write(ASGI)
    results: dict[str, list[float]] = {"longshore": [], "bare": [], "uvicorn": []}
    per_cpu: dict[str, list[float]] = {name: [] for name in results}
    for run in range(args.runs):
        for name in results:
            if name == "longshore":
                server = Longshore(folder)
            elif name == "bare":
                port = free_port()
                server = Subprocess("bare", [sys.executable, "bare.py", str(port)], port, folder)
            else:
                port = free_port()
                argv = [sys.executable, "-m", "uvicorn", "asgi_app:app", "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning", "--port", str(port)]
                server = Subprocess("uvicorn", argv, port, folder)
            pid = server.start()
            try:
                rate, rate_per_cpu = run_wrk(server.port, args.duration, args.connections, pid)
            finally:
                server.stop()
            results[name].append(rate)
            per_cpu[name].append(rate_per_cpu)
            print(f"run {run + 1} {name:10s} {rate:12,.0f} req/s {rate_per_cpu:12,.0f} req per server CPU-second", flush=True)
    medians = {name: statistics.median(values) for name, values in results.items()}
    print()
    print(f"wrk -t1 -c{args.connections} -d{args.duration:g}s, servers on CPU 0, wrk on CPU 1; medians of {args.runs} runs")
    for name, value in medians.items():
        print(f"  {name:10s} {value:12,.0f} req/s {statistics.median(per_cpu[name]):12,.0f} req/CPU-s")
    to_bare = medians["longshore"] / medians["bare"]
    to_uvicorn = medians["longshore"] / medians["uvicorn"]
    print(f"  longshore / bare    = {to_bare:.2f}  (target >= 0.75)")
    print(f"  longshore / uvicorn = {to_uvicorn:.2f}  (target >= 3)")
    return 0 if to_bare >= 0.75 and to_uvicorn >= 3 else 1


def download(args: argparse.Namespace) -> int:
    folder = tempfile.mkdtemp(prefix="longshore-bench-download-")
    big = os.path.join(folder, "big.bin")
    size = args.size_mb * 1024 * 1024
    with open(big, "wb") as file:
        file.truncate(size)
    server = Longshore(folder, {"BIG_FILE": big})
    pid = server.start()
    try:
        time.sleep(0.5)
        before = rss_bytes(pid)
        peak = before
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        rate = args.rate_mb * 1024 * 1024
        received = 0
        started = time.monotonic()
        last_sample = 0.0
        slow_until = started + args.slow_seconds
        while received < size:
            now = time.monotonic()
            if now < slow_until:
                allowed = int((now - started) * rate) + 64 * 1024
                if received >= allowed:
                    time.sleep(0.01)
                    continue
                chunk = sock.recv(min(64 * 1024, allowed - received))
            else:
                chunk = sock.recv(1024 * 1024)
            if not chunk:
                break
            received += len(chunk)
            if now - last_sample > 0.2:
                last_sample = now
                peak = max(peak, rss_bytes(pid))
        elapsed = time.monotonic() - started
        peak = max(peak, rss_bytes(pid))
        sock.close()
    finally:
        server.stop()
    growth = (peak - before) / 1024 / 1024
    print(f"{received / 1024 / 1024:,.0f} MB received in {elapsed:.1f} s ({args.slow_seconds:g} s at {args.rate_mb:g} MB/s, then full speed)")
    print(f"worker RSS before {before / 1024 / 1024:.1f} MB, peak {peak / 1024 / 1024:.1f} MB, growth {growth:.2f} MB (target < 5 MB)")
    return 0 if growth < 5 and received >= size else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="throughput", choices=["throughput", "download"])
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--rate-mb", type=float, default=1)
    parser.add_argument("--slow-seconds", type=float, default=20)
    args = parser.parse_args()
    return throughput(args) if args.mode == "throughput" else download(args)


if __name__ == "__main__":
    sys.exit(main())
