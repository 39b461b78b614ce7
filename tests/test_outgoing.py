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


def test_close_while_connecting_gives_the_attempt_up_and_a_later_connect_starts_afresh(app_factory):
    # A TLS "server" that accepts and never answers: the client's handshake waits there.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    silent.settimeout(5)
    target = free_port()
    app = app_factory(
        f"""
from longshore.stats import process_stats
target = Worker("text://127.0.0.1:{target}", name="target")
target.on_message = lambda conn, line: record("target got", line)

def on_worker_start(worker):
    # Plain TCP: close() right after connect(), then connect() again.
    plain = AsyncTcpConnection("text://127.0.0.1:{target}")
    plain.on_connect = lambda conn: record("plain connect")
    plain.on_error = lambda conn, code, message: record("plain error", code, message)
    plain.on_close = lambda conn: record("plain close", conn.state)
    plain.connect()
    record("queued", plain.send("dropped"))
    plain.close()
    record("after close", plain.state, plain.send_buffer_size, plain.bytes_written, plain.send("refused"))
    plain.connect()
    record("queued", plain.send("kept"))

    # TLS stuck in its handshake: close() later, while it waits, then connect() again.
    stuck = AsyncTcpConnection("text://127.0.0.1:{silent.getsockname()[1]}", ssl={{"verify": False}},
                               connect_timeout=30, ssl_handshake_timeout=30)
    stuck.on_connect = lambda conn: record("stuck connect")
    stuck.on_error = lambda conn, code, message: record("stuck error", code, message)
    stuck.on_close = lambda conn: record("stuck close", conn.state)
    stuck.connect()
    stuck.send("never")
    def give_up():
        record("stuck before close", stuck.state)
        stuck.close()
        stuck.connect()
        record("stuck after connect", stuck.state)
    Timer.add(0.5, give_up, persistent=False)
    Timer.add(1.5, lambda: record("send_fail", process_stats.send_fail, "connect_fail", process_stats.connect_fail), persistent=False)

target.on_worker_start = on_worker_start
"""
    ).start()
    events = app.folder / "events.txt"

    def lines() -> list[str]:
        return events.read_text().splitlines() if events.exists() else []

    first, _ = silent.accept()
    first.settimeout(5)
    assert first.recv(4096)  # the ClientHello: the handshake waits for an answer
    # close() closed the half-made socket, and the new connect() made another one.
    while first.recv(4096):
        pass
    second, _ = silent.accept()
    second.settimeout(5)
    assert second.recv(4096)
    wait_for(lambda: any(line.startswith("send_fail") for line in lines()), what="the counters")
    got = lines()
    assert got[:4] == ["queued None", "plain close closed", "after close closed 0 0 False", "queued None"]
    assert "plain connect" in got and "target got kept" in got and "target got dropped" not in got
    assert "stuck before close connecting" in got and "stuck after connect connecting" in got
    assert got.count("stuck close closed") == 1 and got.index("stuck close closed") < got.index("stuck after connect connecting")
    assert not any("error" in line for line in got)
    # Dropped by the application's own close(): not a send_fail; the refused send() is one.
    assert "send_fail 1 connect_fail 0" in got
    second.close()
    first.close()
    silent.close()


def test_a_new_connection_starts_afresh_after_the_last_one_failed_a_write(app_factory):
    port = free_port()
    app = app_factory(
        f"""
from longshore.stats import process_stats
target = Worker("text://127.0.0.1:{port}", name="target")
accepted = [0]

def on_connect(conn):
    accepted[0] += 1
    if accepted[0] <= 2:
        Timer.add(0.3, conn.close, persistent=False)  # the client no longer reads: its writes meet a reset

target.on_connect = on_connect
target.on_message = lambda conn, line: conn.send("echo " + line)
def on_worker_start(worker):
    client = AsyncTcpConnection("text://127.0.0.1:{port}")
    rounds = [0]

    def on_connect(conn):
        rounds[0] += 1
        n = rounds[0]
        record("round", n, "read", conn.bytes_read, "written", conn.bytes_written)
        if n <= 2:
            Timer.add(0.1, conn.pause_recv, persistent=False)  # the server's FIN goes unseen
            def write():
                conn.send("first")
                Timer.add(0.1, lambda: record("round", n, "second send", conn.send("second"), "send_fail", process_stats.send_fail), persistent=False)
            Timer.add(0.5, write, persistent=False)
        else:
            conn.send("hello")

    client.on_connect = on_connect
    client.on_message = lambda conn, line: record("message", line, "read", conn.bytes_read, "written", conn.bytes_written)
    client.on_error = lambda conn, code, message: record("error", code)
    client.on_close = lambda conn: conn.connect()  # at once, from on_close
    client.connect()

target.on_worker_start = on_worker_start
"""
    ).start()
    events = app.folder / "events.txt"

    def lines() -> list[str]:
        return events.read_text().splitlines() if events.exists() else []

    wait_for(lambda: any(line.startswith("message") for line in lines()), what="the third connection's answer")
    got = lines()
    # A failed write is counted once per connection: on the second connection too.
    assert got.count("error 2") == 2
    assert "round 1 second send False send_fail 1" in got and "round 2 second send False send_fail 2" in got
    # The third connection reads (pause_recv belonged to the last one) and counts its own bytes.
    assert "round 3 read 0 written 0" in got
    assert "message echo hello read 11 written 6" in got


def test_connect_forgets_a_reconnect_planned_before_it(app_factory):
    """``reconnect(after)`` then ``connect()`` at once: one attempt, not a second one when
    the planned delay runs out (here after the server has closed the first connection)."""
    target = free_port()
    app = app_factory(
        f"""
target = Worker("text://127.0.0.1:{target}", name="target")
def served(conn, line):
    record("target got", line)
    conn.close()

target.on_message = served

def on_worker_start(worker):
    client = AsyncTcpConnection("text://127.0.0.1:{target}")
    client.on_connect = lambda conn: conn.send("hello")
    client.on_close = lambda conn: record("client close")
    client.reconnect(1.0)
    client.connect()
    Timer.add(2.0, lambda: record("done"), persistent=False)

target.on_worker_start = on_worker_start
"""
    ).start()
    events = app.folder / "events.txt"
    wait_for(lambda: events.exists() and "done" in events.read_text(), what="the planned delay to pass")
    assert events.read_text().splitlines() == ["target got hello", "client close", "done"]
