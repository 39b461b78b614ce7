"""TLS listeners: text, https and wss with real clients; failed handshakes counted and
harmless to other clients; the send buffer contract over TLS."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import threading
import time

import httpx
import pytest
import trustme
from websockets.asyncio.client import connect as ws_connect

from conftest import connect, read_lines, wait_for


@pytest.fixture
def certificates(tmp_path):
    """A CA, a server certificate for 127.0.0.1/localhost/::1, and a client context trusting the CA."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost", "::1")
    cert_path, key_path, ca_path = tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem"
    server.cert_chain_pems[0].write_to_path(str(cert_path))
    for extra in server.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_path), append=True)
    server.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    client = ssl.create_default_context(cafile=str(ca_path))
    return {"cert": str(cert_path), "key": str(key_path), "ca": str(ca_path), "client": client}


def tls_connect(port: int, context: ssl.SSLContext, timeout: float = 5.0) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def test_text_over_tls_and_failed_handshakes_are_counted_without_disturbing_others(app_factory, certificates):
    app = app_factory(
        f"""
import ssl
context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
context.load_cert_chain({certificates["cert"]!r}, {certificates["key"]!r})
w = Worker("text://127.0.0.1:0", name="secure", ssl=context, ssl_handshake_timeout=1.0)
w.on_message = lambda conn, line: conn.send(f"tls {{line}} {{conn.transport.get_extra_info('ssl_object').version()}} {{conn.remote_ip}}")
paths = Worker("text://127.0.0.1:0", name="paths", transport="ssl",
               ssl={{"certfile": {certificates["cert"]!r}, "keyfile": {certificates["key"]!r}}})
paths.on_message = lambda conn, line: conn.send(line.upper())
"""
    ).start()
    port, paths_port = app.port(0), app.port(1)
    assert app.status()["workers"][0]["listen"].startswith("text://127.0.0.1:")
    good = tls_connect(port, certificates["client"])
    good.sendall(b"hello\n")
    answer = read_lines(good, 1)[0]
    assert answer.startswith("tls hello TLSv1.") and answer.endswith(" 127.0.0.1")

    # A plain-text client on the TLS port: closed, counted; the TLS client goes on.
    plain = connect(port)
    plain.sendall(b"hello in clear\n")
    plain.settimeout(5)
    received = b""
    try:
        while chunk := plain.recv(1024):  # perhaps a TLS alert, then EOF; never an answer
            received += chunk
    except ConnectionResetError:
        pass
    assert b"tls" not in received
    plain.close()
    # A client that does not trust the certificate aborts its handshake (openssl s_client).
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-verify_return_error", "-no-CAfile", "-no-CApath", "-no-CAstore"],
        input="", capture_output=True, text=True, timeout=20,
    )
    assert result.returncode != 0 and "verify" in (result.stdout + result.stderr).lower()
    # A client that connects and never starts the handshake is cut after ssl_handshake_timeout.
    silent = connect(port)
    started = time.monotonic()
    good.sendall(b"during the slow handshake\n")
    assert read_lines(good, 1)[0].startswith("tls during the slow handshake")
    silent.settimeout(5)
    try:
        assert silent.recv(1024) == b""
    except ConnectionResetError:
        pass
    assert 0.8 < time.monotonic() - started < 4
    # Health checks (connect, close without a byte) are not errors.
    for _ in range(5):
        connect(port).close()
    wait_for(lambda: app.processes("secure")[0]["tls_error"] == 3, what="three TLS errors counted")
    time.sleep(0.3)
    assert app.processes("secure")[0]["tls_error"] == 3
    process = app.processes("secure")[0]
    assert process["connections"] == 1 and process["send_fail"] == 0 and process["throw_exception"] == 0
    good.sendall(b"still here\n")
    assert read_lines(good, 1)[0].startswith("tls still here")
    assert "tls_errors" in app.cli("status").stdout
    assert "TLS handshake with 127.0.0.1:" in app.log()

    other = tls_connect(paths_port, certificates["client"])
    other.sendall(b"dict of paths\n")
    assert read_lines(other, 1) == ["DICT OF PATHS"]


def test_https_with_httpx_and_wss_with_websockets(app_factory, certificates):
    app = app_factory(
        f"""
TLS = {{"certfile": {certificates["cert"]!r}, "keyfile": {certificates["key"]!r}}}
web = Worker("http://127.0.0.1:0", name="web", ssl=TLS, count=2)
web.on_message = lambda conn, request: conn.send("secure " + request.path)
ws = Worker("websocket://127.0.0.1:0", name="ws", ssl=TLS)
ws.on_message = lambda conn, message: conn.send("wss " + message)
alias = Worker("https://127.0.0.1:0", name="alias", ssl=TLS)
alias.on_message = lambda conn, request: conn.send("alias " + request.method)
"""
    ).start()
    web_port, ws_port, alias_port = app.port(0), app.port(1), app.port(2)
    with httpx.Client(verify=certificates["client"]) as client:
        for index in range(5):  # keep-alive over one TLS connection
            response = client.get(f"https://127.0.0.1:{web_port}/page{index}")
            assert response.status_code == 200 and response.text == f"secure /page{index}"
        assert client.post(f"https://localhost:{alias_port}/", content=b"x").text == "alias POST"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"https://127.0.0.1:{web_port}/", verify=True)  # not a CA the system trusts

    async def talk() -> list[str]:
        async with ws_connect(f"wss://127.0.0.1:{ws_port}/chat", ssl=certificates["client"]) as websocket:
            answers = []
            for word in ("one", "two", "x" * 100_000):
                await websocket.send(word)
                answers.append(await websocket.recv())
            return answers

    assert asyncio.run(talk()) == ["wss one", "wss two", "wss " + "x" * 100_000]
    wait_for(lambda: app.processes("web")[0]["tls_error"] + app.processes("web")[1]["tls_error"] == 1, what="the untrusting client counted")


def test_send_buffer_contract_over_tls(app_factory, certificates):
    app = app_factory(
        f"""
RESULTS = os.path.join(os.environ["APP_DIR"], "results.json")
results = {{"accepted": 0, "dropped": 0, "full": 0, "drain": 0, "errors": []}}

def save():
    with open(RESULTS + ".tmp", "w") as f:
        json.dump(results, f)
    os.replace(RESULTS + ".tmp", RESULTS)

w = Worker("tcp://127.0.0.1:0", name="flood", ssl={{"certfile": {certificates["cert"]!r}, "keyfile": {certificates["key"]!r}}})
TcpConnection.default_max_send_buffer_size = 256 * 1024

def on_message(conn, data):
    if data.startswith(b"flood"):
        for _ in range(200):   # 200 x 64 KiB into a 256 KiB buffer of a client that does not read
            if conn.send(b"z" * 65536) is False:
                results["dropped"] += 1
            else:
                results["accepted"] += 1
        save()

def on_buffer_full(conn):
    results["full"] += 1
    save()

def on_buffer_drain(conn):
    results["drain"] += 1
    save()

def on_error(conn, code, message):
    results["errors"].append(code)

w.on_message = on_message
w.on_buffer_full = on_buffer_full
w.on_buffer_drain = on_buffer_drain
w.on_error = on_error
"""
    ).start()
    port = app.port()
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    client = certificates["client"].wrap_socket(raw, server_hostname="127.0.0.1")
    client.sendall(b"flood")
    wait_for(lambda: (app.folder / "results.json").exists() and app.read_json("results.json")["dropped"] > 0, what="drops")
    results = app.read_json("results.json")
    assert results["full"] == 1 and results["drain"] == 0
    assert results["accepted"] + results["dropped"] == 200 and results["dropped"] > 0
    wait_for(lambda: app.processes()[0]["send_fail"] == results["dropped"], what="send_fail == dropped")
    # What waits in the process: the limit plus one package (the kernel's socket buffer aside).
    wait_for(lambda: 0 < app.processes()[0]["send_buffer_bytes"] <= 256 * 1024 + 65536, what="send_buffer_bytes in status")
    # The client reads everything accepted; the buffer drains and on_buffer_drain fires.
    received = 0
    expected = results["accepted"] * 65536
    while received < expected:
        received += len(client.recv(1 << 20))
    assert received == expected
    wait_for(lambda: app.read_json("results.json")["drain"] == 1, what="on_buffer_drain")
    assert set(app.read_json("results.json")["errors"]) == {2}  # SEND_FAIL


def test_a_tls_side_of_two_way_pipes_closes_where_plain_tcp_would_half_close(app_factory, certificates):
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(1)
    app = app_factory(
        f"""
w = Worker("tcp://127.0.0.1:0", name="tlsproxy", ssl={{"certfile": {certificates["cert"]!r}, "keyfile": {certificates["key"]!r}}})

def on_connect(client):
    upstream = AsyncTcpConnection("tcp://127.0.0.1:{target.getsockname()[1]}")
    client.pipe(upstream)
    upstream.pipe(client)
    upstream.on_close = lambda _: client.close()
    client.on_close = lambda _: upstream.close()
    upstream.connect()

w.on_connect = on_connect
"""
    ).start()
    client = tls_connect(app.port(), certificates["client"], timeout=10)
    client.sendall(b"hello")
    upstream, _ = target.accept()
    upstream.settimeout(10)
    assert upstream.recv(100) == b"hello"
    answer = b"a" * 300_000
    upstream.sendall(answer)
    upstream.shutdown(socket.SHUT_WR)  # plain TCP would pass this on; TLS cannot: the proxy closes
    received = bytearray()
    while chunk := client.recv(1 << 20):
        received += chunk
    assert received == answer  # all of it, then the end
    assert upstream.recv(100) == b""  # the plain side is closed too, without the client closing
    client.close()  # (the TLS shutdown waits for the client's close_notify)
    wait_for(lambda: app.processes()[0]["connections"] == 0, what="both sides closed")
    process = app.processes()[0]
    assert process["throw_exception"] == 0 and process["send_fail"] == 0
    assert "eof_received" not in app.log() and "Traceback" not in app.log()
    upstream.close()
    target.close()


def test_data_sent_with_the_clients_finished_reaches_the_connection_on_the_stdlib_loop(app_factory, certificates):
    app = app_factory(
        f"""
import longshore.loop
longshore.loop._uvloop = None  # the stdlib loop, whose TLS layer hands data over with the handshake's end
w = Worker("text://127.0.0.1:0", name="tls", ssl={{"certfile": {certificates["cert"]!r}, "keyfile": {certificates["key"]!r}}})
w.on_connect = lambda conn: conn.send("hello " + type(asyncio.get_running_loop()).__module__)
w.on_message = lambda conn, line: conn.send("echo " + line)
"""
    ).start()
    port = app.port()
    # A client that writes its first lines in the same packet as its Finished message.
    client = certificates["client"].wrap_bio(incoming := ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="127.0.0.1")
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    while True:
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            incoming.write(sock.recv(65536))
    finished = outgoing.read()
    client.write(b"one\ntwo\n")
    sock.sendall(finished + outgoing.read())
    received = b""
    while received.count(b"\n") < 3:
        try:
            received += client.read(65536)
        except ssl.SSLWantReadError:
            data = sock.recv(65536)
            assert data, received
            incoming.write(data)
    assert received == b"hello asyncio.unix_events\necho one\necho two\n"
    sock.close()


def test_graceful_reload_completes_a_handshake_under_way_and_serves_it(app_factory, certificates):
    """A client the old worker accepted, still in its TLS handshake when ``reload -g``
    begins, is served by that worker, not cut."""
    app = app_factory(
        f"""
import ssl
context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
context.load_cert_chain({certificates["cert"]!r}, {certificates["key"]!r})
w = Worker("text://127.0.0.1:0", name="secure", ssl=context, ssl_handshake_timeout=20.0, stop_timeout=20)
w.on_message = lambda conn, line: conn.send(f"{{os.getpid()}} {{line}}")
"""
    ).start()
    old_pid = app.wait_running(1)[0]["pid"]
    port = app.port()
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    time.sleep(0.3)  # accepted by the old worker; its handshake waits for the ClientHello
    app.cli("reload", "-g")
    wait_for(lambda: "stopping gracefully" in app.log(), what="the old worker to stop gracefully")
    client = certificates["client"].wrap_socket(raw, server_hostname="127.0.0.1")
    client.sendall(b"late hello\n")
    assert read_lines(client, 1, timeout=10) == [f"{old_pid} late hello"]
    client.close()
    wait_for(lambda: old_pid not in {p["pid"] for p in app.processes()} and "exited: exit code 0" in app.log(), what="the old worker to exit")
    fresh = tls_connect(port, certificates["client"])
    fresh.sendall(b"again\n")
    pid, line = read_lines(fresh, 1)[0].split(" ", 1)
    assert line == "again" and int(pid) != old_pid


def test_a_handshake_waited_on_at_a_graceful_stop_holds_back_nobody_else(app_factory, certificates):
    """While a graceful stop waits for a TLS client that connected and has not said
    anything, the other connections are told at once (an idle keep-alive closes) and
    ``on_worker_stop`` runs at once."""
    app = app_factory(
        f"""
w = Worker("http://127.0.0.1:0", name="secure", ssl={{"certfile": {certificates["cert"]!r}, "keyfile": {certificates["key"]!r}}},
           ssl_handshake_timeout=30, stop_timeout=30)
w.on_message = lambda conn, request: conn.send("hello")
w.on_worker_stop = lambda worker: record("on_worker_stop")
"""
    ).start()
    port = app.port()
    kept = tls_connect(port, certificates["client"], timeout=10)
    kept.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert kept.recv(4096).startswith(b"HTTP/1.1 200 ")
    silent = connect(port)  # connected, no ClientHello yet
    time.sleep(0.3)
    stopper = threading.Thread(target=app.cli, args=("stop", "-g"), kwargs={"timeout": 60})
    started = time.monotonic()
    stopper.start()
    try:
        assert kept.recv(4096) == b""  # the idle keep-alive connection is closed ...
        assert time.monotonic() - started < 5  # ... now, not once the handshake is given up
        kept.close()
        events = app.folder / "events.txt"
        wait_for(lambda: events.exists() and "on_worker_stop" in events.read_text(), timeout=5, what="on_worker_stop")
        assert app.master_pid() is not None  # still waiting for the silent client
    finally:
        silent.close()  # its handshake ends, and so does the stop
        stopper.join(timeout=60)
    assert app.master_pid() is None
