"""UDP workers: one on_message per datagram, answers to the sender, counted in status."""

from __future__ import annotations

import socket

from conftest import wait_for


def test_udp_echo_raw_and_text(app_factory):
    app = app_factory(
        """
raw = Worker("udp://127.0.0.1:0", name="udp-raw", count=2)
raw.on_message = lambda conn, data: conn.send(b"echo " + data + b" from " + conn.remote_ip.encode())
text = Worker("udp://127.0.0.1:0", name="udp-text", protocol="text")
text.on_message = lambda conn, line: conn.send(line.upper())
"""
    ).start()
    app.wait_running(2, name="udp-raw")
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5)
    raw_port, text_port = app.port(0), app.port(1)
    for index in range(10):
        client.sendto(f"hello {index}".encode(), ("127.0.0.1", raw_port))
        data, sender = client.recvfrom(2048)
        assert data == f"echo hello {index} from 127.0.0.1".encode()
        assert sender[1] == raw_port
    client.sendto("one\ntwo\n".encode(), ("127.0.0.1", text_port))
    assert client.recvfrom(100)[0] == b"ONE\n"
    assert client.recvfrom(100)[0] == b"TWO\n"
    # A datagram that is not a whole line is dropped and counted, and the worker goes on.
    client.sendto(b"no newline", ("127.0.0.1", text_port))
    client.sendto(b"\xff\xfe\n", ("127.0.0.1", text_port))
    client.sendto(b"still here\n", ("127.0.0.1", text_port))
    assert client.recvfrom(100)[0] == b"STILL HERE\n"

    def counted():
        processes = app.processes()
        raw_total = sum(p["total_request"] for p in processes if p["name"] == "udp-raw")
        text_process = next(p for p in processes if p["name"] == "udp-text")
        return raw_total == 10 and text_process["total_request"] == 4 and text_process["protocol_error"] == 2

    wait_for(counted, what="datagrams counted")


def test_outgoing_udp_to_a_udp_worker_and_to_a_closed_port(app_factory):
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    closed_port = probe.getsockname()[1]
    probe.close()
    app = app_factory(
        f"""
from longshore import AsyncUdpConnection
server = Worker("udp://127.0.0.1:0", name="udp-server", protocol="text")
server.on_message = lambda conn, line: conn.send("pong " + line)
client = Worker(None, name="udp-client")
def on_worker_start(worker):
    listen = [w for w in Worker._all if w.name == "udp-server"][0].bound_listen
    udp = AsyncUdpConnection(listen.replace("udp://", "udp://"), protocol="text")
    udp.on_connect = lambda conn: record("connect", conn.remote_address)
    udp.on_message = lambda conn, line: record("message", line)
    record("early", udp.send("sent before the socket was made"))
    udp.connect()
    worker.udp = udp
    Timer.add(0.1, lambda: udp.send("tick"), persistent=False)
    nobody = AsyncUdpConnection("udp://127.0.0.1:{closed_port}")
    nobody.on_error = lambda conn, code, message: record("error", code, message)
    nobody.on_connect = lambda conn: conn.send(b"anyone?")
    nobody.connect()

client.on_worker_start = on_worker_start
"""
    ).start()
    events = app.folder / "events.txt"
    wait_for(lambda: events.exists() and "message pong tick" in events.read_text(), what="answers")
    text = events.read_text()
    assert "early None" in text and "message pong sent before the socket was made" in text
    assert f"connect 127.0.0.1:{app.port(0)}" in text
    wait_for(lambda: "error 1 " in events.read_text(), what="CONNECT_FAIL from the closed port")
    wait_for(lambda: (lambda p: p["connections"] == 2 and p["connect_fail"] == 1 and p["total_request"] == 2)(app.processes("udp-client")[0]),
             what="outgoing udp counted in status")


def test_a_datagram_over_the_udp_maximum_is_refused_and_a_failed_send_is_counted(app_factory):
    app = app_factory(
        """
from longshore import AsyncUdpConnection
from longshore.connection.udp import UdpConnection
server = Worker("udp://127.0.0.1:0", name="udp-server")
def on_message(conn, data):
    if data == b"broadcast":  # the socket may not broadcast: the loop reports the failure later
        lost = UdpConnection(conn.worker, conn.transport, ("255.255.255.255", 9), type(conn.protocol))
        record("broadcast", lost.send(b"x"))
    elif data == b"outgoing":
        out = AsyncUdpConnection("udp://" + server.bound_listen.split("://")[1])
        out.on_error = lambda c, code, message: record("outgoing error", code, message)
        record("outgoing early", out.send(b"y" * 65508))
        out.on_connect = lambda c: record("outgoing", c.send(b"y" * 65508), c.send(b"y" * 65507))
        out.connect()
    else:
        record("reply", int(data), conn.send(b"x" * int(data)))

server.on_message = on_message
server.on_error = lambda conn, code, message: record("error", code, message)
"""
    ).start()
    port = app.port()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    client.sendto(b"65507", ("127.0.0.1", port))
    assert len(client.recv(1 << 17)) == 65507
    client.sendto(b"65508", ("127.0.0.1", port))
    client.sendto(b"3", ("127.0.0.1", port))
    assert client.recv(1 << 17) == b"xxx"  # nothing came for the one over the maximum
    events = app.folder / "events.txt"

    def lines() -> list[str]:
        return events.read_text().splitlines()

    assert "reply 65507 True" in lines() and "reply 65508 False" in lines()
    assert "error 2 datagram of 65508 bytes dropped: over the UDP maximum of 65507" in lines()
    wait_for(lambda: app.processes()[0]["send_fail"] == 1, what="the refused reply counted")
    client.sendto(b"outgoing", ("127.0.0.1", port))
    wait_for(lambda: any(line.startswith("outgoing True") or line.startswith("outgoing False") for line in lines()), what="the outgoing sends")
    assert "outgoing early False" in lines() and "outgoing False True" in lines()  # refused before the socket is made too
    assert lines().count("outgoing error 2 datagram of 65508 bytes dropped: over the UDP maximum of 65507") == 2
    wait_for(lambda: app.processes()[0]["send_fail"] == 3, what="the outgoing ones counted")
    client.sendto(b"broadcast", ("127.0.0.1", port))
    wait_for(lambda: any(line.startswith("broadcast") for line in lines()), what="the broadcast")
    wait_for(lambda: app.processes()[0]["send_fail"] == 4, what="the failed broadcast counted")
