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
