"""examples/proxy/start.py: bytes both ways, a slow destination pauses the source, and a
half-close is passed on while the other way goes on."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from conftest import App, wait_for

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "proxy" / "start.py"


def start_proxy(app_factory, target: socket.socket, connect_delay: float = 0.0) -> tuple[App, int]:
    """The example, started towards ``target``; returns the app and the proxy's port.
    ``connect_delay``: the proxy connects upstream that much later than it would."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    proxy_port = probe.getsockname()[1]
    probe.close()
    body = EXAMPLE.read_text().replace("from __future__ import annotations\n", "").replace('if __name__ == "__main__":\n    run_all()\n', "")
    if connect_delay:
        body = body.replace("    upstream.connect()", f"    asyncio.get_running_loop().call_later({connect_delay}, upstream.connect)")
        assert "call_later" in body
    app = app_factory(body)
    app.env.update(PROXY_LISTEN=f"tcp://127.0.0.1:{proxy_port}", PROXY_TARGET=f"tcp://127.0.0.1:{target.getsockname()[1]}")
    app.start()
    return app, proxy_port


def listening() -> socket.socket:
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(4)
    return target


def read_to_eof(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(1 << 20):
        data += chunk
    return bytes(data)


def test_proxy_example_pipes_both_ways_and_a_slow_destination_holds_the_source(app_factory):
    target = listening()
    app, proxy_port = start_proxy(app_factory, target)
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
    upstream.close()  # the target closes: the client sees the end of the stream
    client.settimeout(5)
    assert client.recv(100) == b""
    client.close()  # and once it closes too, so does the proxy, both ways
    wait_for(lambda: app.processes("proxy")[0]["connections"] == 0, what="both sides closed")
    assert app.processes("proxy")[0]["send_fail"] == 0
    target.close()


@pytest.mark.parametrize("while_connecting", [False, True], ids=["connected", "while-connecting"])
def test_proxy_passes_a_half_close_on_and_the_whole_answer_back(app_factory, while_connecting):
    target = listening()
    app, proxy_port = start_proxy(app_factory, target, connect_delay=0.5 if while_connecting else 0.0)
    request = b"q" * 300_000
    answer = bytes(range(256)) * (4 * 1024 * 1024 // 256)  # more than a send buffer
    heard: list[bytes] = []

    def upstream_server() -> None:  # reads the whole request (to EOF), then answers and closes
        upstream, _ = target.accept()
        upstream.settimeout(10)
        heard.append(read_to_eof(upstream))
        upstream.sendall(answer)
        upstream.close()

    server = threading.Thread(target=upstream_server, daemon=True)
    server.start()
    client = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    client.sendall(request)
    if not while_connecting:
        wait_for(lambda: app.processes("proxy")[0]["connections"] == 2, what="the proxy connected upstream")
    client.shutdown(socket.SHUT_WR)  # like `nc -N`: the request is sent, now the answer
    assert read_to_eof(client) == answer
    server.join(10)
    assert heard == [request]
    client.close()
    wait_for(lambda: app.processes("proxy")[0]["connections"] == 0, what="both sides closed")
    assert app.processes("proxy")[0]["send_fail"] == 0
    target.close()


def test_proxy_keeps_the_other_way_open_after_the_target_half_closes(app_factory):
    target = listening()
    app, proxy_port = start_proxy(app_factory, target)
    client = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    upstream, _ = target.accept()
    upstream.settimeout(10)
    upstream.sendall(b"greeting\n")
    upstream.shutdown(socket.SHUT_WR)  # the target is done talking, still listening
    assert read_to_eof(client) == b"greeting\n"  # the client sees the end of the stream ...
    wait_for(lambda: app.processes("proxy")[0]["connections"] == 2, what="both connections open")  # ... and they stay
    client.sendall(b"late words\n")  # the client can still talk
    client.shutdown(socket.SHUT_WR)
    assert read_to_eof(upstream) == b"late words\n"
    wait_for(lambda: app.processes("proxy")[0]["connections"] == 0, what="both sides closed")
    upstream.close()
    client.close()
    assert app.processes("proxy")[0]["send_fail"] == 0
    target.close()
