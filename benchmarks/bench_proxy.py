"""Throughput of a TCP stream through longshore's proxy example, against a direct
connection, and the proxy's memory meanwhile.

::

    python benchmarks/bench_proxy.py [--size-mb 1024] [--runs 3]

A sink process reads a size (8 bytes), then that many bytes, and answers with the byte
count. The client sends ``--size-mb`` of data and waits for that answer:
once straight to the sink, once through ``examples/proxy/start.py`` (one worker
process, run as a daemon). The runs alternate; medians are printed, with the proxy
worker's peak resident memory (sampled every 20 ms from /proc).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import Process, Queue

from benchlib import REPO, child_env, describe_machine, median, rss_bytes

EXAMPLE = os.path.join(REPO, "examples", "proxy", "start.py")
CHUNK = 1 << 20


def sink(port_queue: Queue) -> None:
    """Accept connections; read a size, then that many bytes; answer with the count (8 bytes)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port_queue.put(listener.getsockname()[1])
    buffer = bytearray(CHUNK)
    while True:
        conn, _ = listener.accept()
        header = b""
        while len(header) < 8:
            header += conn.recv(8 - len(header))
        expected = int.from_bytes(header, "big")
        total = 0
        while total < expected:
            size = conn.recv_into(buffer)
            if not size:
                break
            total += size
        conn.sendall(total.to_bytes(8, "big"))
        conn.close()


def transfer(port: int, size: int) -> float:
    """Send ``size`` bytes to 127.0.0.1:port and wait for the count; return seconds."""
    payload = memoryview(os.urandom(CHUNK))
    started = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(size.to_bytes(8, "big"))
    sent = 0
    while sent < size:
        piece = payload[: min(CHUNK, size - sent)]
        sock.sendall(piece)
        sent += len(piece)
    answer = b""
    while len(answer) < 8:
        chunk = sock.recv(8 - len(answer))
        if not chunk:
            raise RuntimeError("the sink closed without its count")
        answer += chunk
    elapsed = time.perf_counter() - started
    sock.close()
    if int.from_bytes(answer, "big") != size:
        raise RuntimeError(f"the sink got {int.from_bytes(answer, 'big')} of {size} bytes")
    return elapsed


class Sampler(threading.Thread):
    """Peak RSS of one process, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.running = True

    def run(self) -> None:
        while self.running:
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except OSError:
                pass
            time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mb * CHUNK
    print(describe_machine(), flush=True)

    ports: Queue = Queue()
    sink_process = Process(target=sink, args=(ports,), daemon=True)
    sink_process.start()
    sink_port = ports.get(timeout=10)

    folder = tempfile.mkdtemp(prefix="longshore-bench-proxy-")
    script = os.path.join(folder, "start.py")
    shutil.copy(EXAMPLE, script)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    proxy_port = probe.getsockname()[1]
    probe.close()
    env = {**child_env(), "PROXY_LISTEN": f"tcp://127.0.0.1:{proxy_port}", "PROXY_TARGET": f"tcp://127.0.0.1:{sink_port}"}

    def command(*words: str) -> str:
        result = subprocess.run([sys.executable, script, *words], cwd=folder, env=env, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"start.py {' '.join(words)}: {result.stdout}{result.stderr}")
        return result.stdout

    import json

    command("start", "-d")
    try:
        deadline = time.monotonic() + 20
        while True:
            processes = [p for p in json.loads(command("status", "--json"))["processes"] if p["state"] == "running"]
            if processes:
                worker_pid = processes[0]["pid"]
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the proxy did not start")
            time.sleep(0.1)
        idle_rss = rss_bytes(worker_pid)
        direct: list[float] = []
        proxied: list[float] = []
        peaks: list[int] = []
        for run in range(args.runs):
            direct.append(transfer(sink_port, size))
            sampler = Sampler(worker_pid)
            sampler.start()
            proxied.append(transfer(proxy_port, size))
            sampler.running = False
            sampler.join()
            peaks.append(sampler.peak)
            print(
                f"run {run + 1}: direct {size / direct[-1] / 1e6:8.0f} MB/s   proxy {size / proxied[-1] / 1e6:8.0f} MB/s"
                f"   proxy worker peak RSS {peaks[-1] / 1e6:.1f} MB",
                flush=True,
            )
        document = json.loads(command("status", "--json"))
        send_fail = sum(p["send_fail"] for p in document["processes"])
    finally:
        command("stop")
        shutil.rmtree(folder, ignore_errors=True)
        sink_process.terminate()

    direct_rate = size / median(direct) / 1e6
    proxy_rate = size / median(proxied) / 1e6
    print()
    print(f"{args.size_mb} MiB stream, median of {args.runs} runs")
    print(f"  direct            {direct_rate:8.0f} MB/s  ({median(direct):.2f} s)")
    print(f"  through the proxy {proxy_rate:8.0f} MB/s  ({median(proxied):.2f} s)")
    print(f"  proxy / direct    {proxy_rate / direct_rate:8.2f}")
    print(f"  proxy worker RSS  idle {idle_rss / 1e6:.1f} MB, peak during the transfer {median(peaks) / 1e6:.1f} MB (median of peaks)")
    print(f"  proxy send_fail   {send_fail}")


if __name__ == "__main__":
    main()
