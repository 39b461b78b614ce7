"""examples/proxy/start.py: bytes both ways, and a slow destination pauses the source."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from conftest import wait_for

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "proxy" / "start.py"


def test_proxy_example_pipes_both_ways_and_a_slow_destination_holds_the_source(app_factory):
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(1)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    proxy_port = probe.getsockname()[1]
    probe.close()
    body = EXAMPLE.read_text().replace("from __future__ import annotations\n", "").replace('if __name__ == "__main__":\n    run_all()\n', "")
    app = app_factory(body)
    app.env.update(PROXY_LISTEN=f"tcp://127.0.0.1:{proxy_port}", PROXY_TARGET=f"tcp://127.0.0.1:{target.getsockname()[1]}")
    app.start()
    worker_pid = app.processes("proxy")[0]["pid"]
    idle_memory = app.processes("proxy")[0]["memory"]

    client = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    upstream, _ = target.accept()
    upstream.settimeout(10)
    total = 40 * 1024 * 1024
    sent = [0]

    def push() -> None:
        block = b"p" * 65536
        while sent[0] < total:
            client.sendall(block)
            sent[0] += len(block)

    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    time.sleep(1.5)  # the destination reads nothing meanwhile
    held = sent[0]
    assert held < total / 2, f"the source was not paused: {held} bytes accepted"
    with open(f"/proc/{worker_pid}/status") as status:
        rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    assert rss < idle_memory + 8 * 1024 * 1024, (rss, idle_memory)

    received = 0
    while received < total:
        chunk = upstream.recv(1 << 20)
        assert chunk.strip(b"p") == b""
        received += len(chunk)
    pusher.join(10)
    assert received == total and sent[0] == total
    upstream.sendall(b"and back\n")  # the other way
    assert client.recv(100) == b"and back\n"
    upstream.close()  # the target closes: the proxy closes the client
    client.settimeout(5)
    assert client.recv(100) == b""
    wait_for(lambda: app.processes("proxy")[0]["connections"] == 0, what="both sides closed")
    assert app.processes("proxy")[0]["send_fail"] == 0
    target.close()
