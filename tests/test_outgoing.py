"""Outgoing connections: TLS (text and wss), CONNECT_FAIL, reconnect with backoff after
the server is killed and restarted, and their place in status."""

from __future__ import annotations

import socket

from conftest import wait_for
from test_tls import certificates  # noqa: F401  (fixture)


def free_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def test_tls_client_reconnects_with_backoff_after_the_server_is_killed_and_restarted(app_factory, certificates):  # noqa: F811
    port, ws_port = free_port(), free_port()
    tls = f'{{"certfile": {certificates["cert"]!r}, "keyfile": {certificates["key"]!r}}}'
    server = app_factory(
        f"""
s = Worker("text://127.0.0.1:{port}", name="target", ssl={tls})
s.on_message = lambda conn, line: conn.send("target " + str(os.getpid()) + " " + line)
ws = Worker("websocket://127.0.0.1:{ws_port}", name="wss-target", ssl={tls})
ws.on_message = lambda conn, message: conn.send("wss " + message)
"""
    ).start()
    client = app_factory(
        f"""
AsyncTcpConnection.reconnect_min_delay = 0.1
AsyncTcpConnection.reconnect_max_delay = 0.4
c = Worker(None, name="client")
LOG = os.path.join(os.environ["APP_DIR"], "events.txt")

def record(*words):
    with open(LOG, "a") as f:
        f.write(" ".join(str(w) for w in words) + "\\n")

def on_worker_start(worker):
    upstream = AsyncTcpConnection("text://127.0.0.1:{port}", ssl={{"cafile": {certificates["ca"]!r}}})
    upstream.on_connect = lambda conn: (record("connect"), conn.send("hello"))
    upstream.on_message = lambda conn, line: record("message", line)
    upstream.on_error = lambda conn, code, message: record("error", code, conn.reconnect_attempts, message)
    upstream.on_close = lambda conn: (record("close"), conn.reconnect())
    upstream.connect()
    untrusted = AsyncTcpConnection("text://127.0.0.1:{port}", ssl=True)   # the system's CAs do not know ours
    untrusted.on_error = lambda conn, code, message: record("untrusted", code, message)
    untrusted.connect()
    wss = AsyncTcpConnection("wss://localhost:{ws_port}/feed", ssl={{"cafile": {certificates["ca"]!r}}})
    wss.on_connect = lambda conn: conn.send("over wss")
    wss.on_message = lambda conn, message: record("wss-message", message)
    wss.connect()

c.on_worker_start = on_worker_start
"""
    ).start()
    events = client.folder / "events.txt"

    def lines() -> list[str]:
        return events.read_text().splitlines() if events.exists() else []

    first_pid = server.processes("target")[0]["pid"]
    wait_for(lambda: f"message target {first_pid} hello" in lines(), what="the first answer")
    wait_for(lambda: "wss-message wss over wss" in lines(), what="the wss answer")
    untrusted = [line for line in lines() if line.startswith("untrusted")]
    assert untrusted and untrusted[0].startswith("untrusted 1 ") and "certificate verify failed" in untrusted[0]
    wait_for(lambda: client.processes("client")[0]["connections"] == 2, what="two outgoing connections in status")

    server.kill_everything()
    wait_for(lambda: sum(line.startswith("error 1 ") for line in lines()) >= 3, what="three failed reconnects")
    wait_for(lambda: (lambda p: p["connections"] == 0 and p["connect_fail"] >= 4)(client.processes("client")[0]), what="connect_fail in status")
    errors = [line.split(" ", 3) for line in lines() if line.startswith("error 1 ")]
    assert [int(error[2]) for error in errors[:3]] == [1, 2, 3]  # attempts grow: the delay doubles
    assert "Connection refused" in errors[0][3]
    assert lines().count("close") >= 4  # on_close after the cut and after every failed attempt

    server.pid_file.unlink(missing_ok=True)
    server.start()
    second_pid = server.processes("target")[0]["pid"]
    assert second_pid != first_pid
    wait_for(lambda: f"message target {second_pid} hello" in lines(), timeout=5, what="the answer after the restart")
    wait_for(lambda: client.processes("client")[0]["connections"] == 1, what="connected again (the wss one was not told to)")
