"""WebSocket: backpressure with a client that stops reading, heartbeats, upgrade from an
``http://`` worker, and the ``ws://`` client against the ``websockets`` library's server."""

from __future__ import annotations

import asyncio
import threading
import time
from http import HTTPStatus

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed

from conftest import connect, is_closed, wait_for
from test_websocket import RECORDER
from wsutil import frame, handshake, read_close, read_frame


def test_a_client_that_stops_reading_is_dropped_while_another_gets_everything(app_factory):
    messages = 800
    app = app_factory(
        RECORDER
        + f"""
w = Worker("websocket://127.0.0.1:0", name="push")
MESSAGES = {messages}
PAD = "x" * (16 * 1024 - 8)
state = {{"n": 0, "started": False}}
results.update(accepted=0, dropped=0, send_fail_errors=0)

def tick():
    conns = list(w.connections.values())
    if len(conns) < 2 or state["n"] >= MESSAGES:
        return
    for _ in range(8):
        if state["n"] >= MESSAGES:
            break
        message = "%08d" % state["n"] + PAD
        for conn in conns:
            if conn.websocket.request.path == "/slow":
                if conn.send(message) is False:
                    results["dropped"] += 1
                else:
                    results["accepted"] += 1
            else:
                conn.send(message)
        state["n"] += 1
    save()

def on_error(conn, code, message):
    if code == SEND_FAIL:
        results["send_fail_errors"] += 1

w.on_error = on_error
w.on_worker_start = lambda worker: Timer.add(0.005, tick)
"""
    ).start()
    port = app.port()
    baseline = app.processes("push")[0]["memory"]
    slow = handshake(port, "/slow", rcvbuf=4096)  # never reads again

    async def reader():
        received = []
        async with ws_connect(f"ws://127.0.0.1:{port}/fast", max_size=None) as ws:
            while len(received) < messages:
                message = await asyncio.wait_for(ws.recv(), 20)
                received.append(int(message[:8]))
        return received

    received = asyncio.run(reader())
    assert received == list(range(messages))  # in order, nothing lost
    results = app.read_json("results.json")
    assert results["dropped"] > 0 and results["accepted"] > 0
    assert results["accepted"] * 16 * 1024 < 4 * 1024 * 1024  # what the slow client's buffers can hold
    process = wait_for(lambda: [p for p in app.processes("push") if p["send_fail"] >= results["dropped"]], what="send_fail")[0]
    assert results["send_fail_errors"] >= results["dropped"]
    assert process["memory"] - baseline < 40 * 1024 * 1024
    slow.close()


def test_heartbeat_pings_and_idle_timeout(app_factory):
    app = app_factory(
        """
w = Worker("websocket://127.0.0.1:0", name="hb")
w.websocket_ping_interval = 0.2
w.websocket_idle_timeout = 1.0
w.websocket_close_timeout = 0.3
w.on_message = lambda conn, message: conn.send(message)
"""
    ).start()
    port = app.port()
    silent = handshake(port)  # reads, but never answers a ping
    opcodes = []
    while True:
        _, opcode, payload = read_frame(silent)
        opcodes.append(opcode)
        if opcode == 8:
            assert int.from_bytes(payload[:2], "big") == 1001
            break
    assert opcodes.count(9) >= 2
    assert is_closed(silent)

    async def lively():
        async with ws_connect(f"ws://127.0.0.1:{port}", ping_interval=None) as ws:  # it only answers our pings
            await asyncio.sleep(2.0)
            await ws.send("still here")
            return await ws.recv()

    assert asyncio.run(lively()) == "still here"


def test_upgrade_from_an_http_worker(app_factory):
    app = app_factory(
        """
from longshore.websocket import upgrade

web = Worker("http://127.0.0.1:0", name="web")

def on_request(conn, request):
    if request.path == "/ws":
        upgrade(conn, request, on_message=lambda c, m: c.send("ws:" + m),
                on_websocket_connected=lambda c: c.send("hi " + c.websocket.request.query.get("name", "")))
        return
    conn.send("page")

web.on_message = on_request
"""
    ).start()
    port = app.port()
    assert httpx.get(f"http://127.0.0.1:{port}/").text == "page"

    async def scenario():
        async with ws_connect(f"ws://127.0.0.1:{port}/ws?name=ann") as ws:
            assert await ws.recv() == "hi ann"
            await ws.send("a")
            assert await ws.recv() == "ws:a"

    asyncio.run(scenario())


class LibraryServer:
    """A ``websockets`` library server on a thread of the test process."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.extensions: list[str] = []
        self.pongs = 0
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.main(),), daemon=True)
        self.stop_event: asyncio.Event | None = None
        self.port = 0

    async def handler(self, ws) -> None:
        self.paths.append(ws.request.path)
        self.extensions.append(",".join(type(e).__name__ for e in ws.protocol.extensions))
        try:
            await self.serve_one(ws)
        except ConnectionClosed:  # a close with an application code ends the loop this way
            pass

    async def serve_one(self, ws) -> None:
        async for message in ws:
            if message == "frag":
                await ws.send(["fr", "ag", "ments"])
            elif message == "ping":
                await asyncio.wait_for(await ws.ping(b"hb"), 5)
                self.pongs += 1
                await ws.send("pong seen")
            elif message == "close":
                await ws.close(4002, "server bye")
            else:
                await ws.send(message)

    def process_request(self, connection, request):
        if request.path == "/refuse":
            return connection.respond(HTTPStatus.FORBIDDEN, "no\n")
        return None

    async def main(self) -> None:
        self.stop_event = asyncio.Event()
        async with ws_serve(self.handler, "127.0.0.1", 0, process_request=self.process_request, max_size=None) as server:
            self.port = server.sockets[0].getsockname()[1]
            self.ready.set()
            await self.stop_event.wait()

    def __enter__(self) -> LibraryServer:
        self.thread.start()
        self.ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)  # type: ignore[union-attr]
        self.thread.join(5)


def test_our_client_against_the_websockets_library_server(app_factory):
    with LibraryServer() as server:
        app = app_factory(
            RECORDER
            + f"""
PORT = {server.port}
w = Worker(None, name="client")
results.update(messages=[], events=[], errors=[])

def on_connect(conn):
    results["events"].append("connect " + (conn.websocket.subprotocol or "-"))
    for message in ["hello", b"\\x00\\x01", "z" * 200000, "frag", "ping", "close"]:
        conn.send(message)
    save()

def on_message(conn, message):
    results["messages"].append(message if isinstance(message, str) and len(message) < 100 else [type(message).__name__, len(message)])
    save()

def on_close(conn):
    results["events"].append(["close", conn.websocket.close_code, conn.websocket.close_reason])
    save()

def on_error(conn, code, message):
    results["errors"].append([code, message])
    save()

def start(worker):
    conn = AsyncTcpConnection(f"ws://127.0.0.1:{{PORT}}/echo?x=1")
    conn.on_connect, conn.on_message, conn.on_close, conn.on_error = on_connect, on_message, on_close, on_error
    conn.connect()
    conn.send("early")  # waits for the handshake
    refused = AsyncTcpConnection(f"ws://127.0.0.1:{{PORT}}/refuse")
    refused.on_error = on_error
    refused.on_connect = lambda c: results["events"].append("refused connection opened?!")
    refused.connect()

w.on_worker_start = start
"""
        ).start()
        results = wait_for(lambda: (r := app.read_json("results.json")) and ["close", 4002, "server bye"] in r["events"] and r, what="the close", timeout=15)
        assert results["messages"] == ["early", "hello", ["bytes", 2], ["str", 200000], "fragments", "pong seen"]
        assert results["events"][0] == "connect -"
        assert results["errors"] and results["errors"][0][0] == 1 and "403" in results["errors"][0][1]
        assert server.paths[0] == "/echo?x=1"
        assert server.extensions[0] == "PerMessageDeflate"
        assert server.pongs == 1


class ThreadedServer:
    """A listener on 127.0.0.1 (port 0) whose ``handle(sock)`` runs in a thread per
    accepted connection; ``close()`` stops it and closes what it accepted."""

    def __init__(self) -> None:
        import socket

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(sock)
            threading.Thread(target=self.handle, args=(sock,), daemon=True).start()

    def handle(self, sock) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            sock.close()


class RawServer(ThreadedServer):
    """A hand-written server that answers the handshake and then misbehaves, per path."""

    CASES = {
        "/masked": b"\x81\x82abcd" + bytes(x ^ y for x, y in zip(b"hi", b"ab")),
        "/utf8": b"\x81\x02\xc3\x28",
        "/big": b"\x82\x7e\x10\x00" + b"x" * 4096,
        "/rsv": b"\xc1\x02hi",
        "/opcode": b"\x83\x00",
    }

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        super().__init__()

    def handle(self, sock) -> None:
        from longshore.protocols.websocket import accept_key

        with sock:
            sock.settimeout(5)
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(4096)
            path = head.split(b" ")[1].decode()
            key = [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"sec-websocket-key")][0]
            if path == "/badkey":
                key = b"AAAAAAAAAAAAAAAAAAAAAA=="
            sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + accept_key(key).encode() + b"\r\n\r\n")
            if path not in self.CASES:
                return
            sock.sendall(self.CASES[path])
            data = b""
            try:
                while len(data) < 8:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                pass
            if len(data) >= 8 and data[0] == 0x88 and data[1] & 0x80:  # a masked close frame
                mask = data[2:6]
                self.codes[path] = int.from_bytes(bytes(b ^ mask[i] for i, b in enumerate(data[6:8])), "big")


def test_our_client_refuses_bad_input_from_a_server(app_factory):
    server = RawServer()
    try:
        app = app_factory(
            RECORDER
            + f"""
PORT = {server.port}
w = Worker(None, name="client")
results.update(errors={{}}, connected=[])

def start(worker):
    for path in ["/masked", "/utf8", "/big", "/rsv", "/opcode", "/badkey"]:
        conn = AsyncTcpConnection(f"ws://127.0.0.1:{{PORT}}{{path}}")
        conn.max_package_size = 1000
        conn.on_connect = lambda c, path=path: (results["connected"].append(path), save())
        conn.on_error = lambda c, code, message, path=path: (results["errors"].__setitem__(path, [code, message]), save())
        conn.connect()
    save()

w.on_worker_start = start
"""
        ).start()
        results = wait_for(lambda: (r := app.read_json("results.json")) and len(r["errors"]) == 6 and r, what="six errors")
        wait_for(lambda: len(server.codes) == 5, what="five close frames")
        assert server.codes == {"/masked": 1002, "/utf8": 1007, "/big": 1009, "/rsv": 1002, "/opcode": 1002}
        assert results["errors"]["/badkey"][0] == 1  # CONNECT_FAIL
        assert "Sec-WebSocket-Accept" in results["errors"]["/badkey"][1]
        assert "/badkey" not in results["connected"]
        assert {code for code, _ in results["errors"].values()} == {1, 3, 4}
    finally:
        server.close()


def test_graceful_stop_says_going_away_without_waiting_for_stop_timeout(app_factory):
    app = app_factory(
        """
w = Worker("websocket://127.0.0.1:0", name="ws", stop_timeout=20)
w.on_websocket_connected = lambda conn: conn.send("x" * 100_000)
"""
    ).start()
    port = app.port()

    async def scenario():
        async with ws_connect(f"ws://127.0.0.1:{port}/") as ws:
            stopping = asyncio.get_running_loop().run_in_executor(None, app.cli, "stop", "-g")
            assert await ws.recv() == "x" * 100_000  # what was sent arrives first
            await ws.wait_closed()
            await stopping
            return ws.close_code

    started = time.monotonic()
    assert asyncio.run(scenario()) == 1001
    assert time.monotonic() - started < 10


def test_stop_and_reload_say_going_away_while_the_application_closes_normally(app_factory):
    app = app_factory(
        """
w = Worker("websocket://127.0.0.1:0", name="ws")
w.on_websocket_connected = lambda conn: conn.send("welcome")
w.on_message = lambda conn, message: conn.close() if message == "bye" else conn.send(message)
"""
    ).start()
    port = app.port()

    def opened():
        sock = handshake(port)
        assert read_frame(sock)[2] == b"welcome"
        return sock

    by_application = opened()
    by_application.sendall(frame(0x1, b"bye"))
    assert read_close(by_application)[0] == 1000
    by_application.close()

    reloaded = opened()
    app.cli("reload")
    assert read_close(reloaded) == (1001, "server going away")
    reloaded.close()

    stopped = opened()  # served by the new worker
    app.cli("stop")
    assert read_close(stopped) == (1001, "server going away")
    stopped.close()


def test_a_connection_upgraded_during_a_graceful_stop_is_told_going_away_at_once(app_factory):
    app = app_factory(
        """
from longshore.websocket import upgrade

web = Worker("http://127.0.0.1:0", name="web", stop_timeout=8)
stopping = asyncio.Event()
web.on_worker_stop = lambda worker: stopping.set()

async def on_request(conn, request):
    open(os.path.join(os.environ["APP_DIR"], "asked"), "w").close()
    await stopping.wait()  # the answer comes once the graceful stop has begun
    upgrade(conn, request, on_websocket_connected=lambda c: c.send("late hello"))

web.on_message = on_request
"""
    ).start()
    port = app.port()
    sock = connect(port, timeout=10)
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    sock.sendall(
        f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    wait_for(lambda: (app.folder / "asked").exists(), what="the request")
    started = time.monotonic()
    stopping = threading.Thread(target=app.cli, args=("stop", "-g"))
    stopping.start()
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, "closed before the handshake answer"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101")
    assert read_frame(sock)[2] == b"late hello"
    assert read_close(sock) == (1001, "server going away")
    assert time.monotonic() - started < 6  # not at the end of stop_timeout
    stopping.join(30)
    sock.close()


HELD = (
    RECORDER
    + """
w = Worker("websocket://127.0.0.1:0", name="ws")
MESSAGE = 298  # a 300-byte text message is a 304-byte frame: three fit under 1000, the fourth reaches it
results.update(returns={}, errors={}, buffered={}, received=[])

def send_three(conn, prefix):
    path = conn.websocket.request.path if conn.websocket.request else "/" + results.setdefault("next", "?")
    for i in range(3):
        results["returns"].setdefault(path, []).append(conn.send(f"{prefix}{i}" + "x" * MESSAGE))
    results["buffered"][path] = conn.send_buffer_size
    save()

def on_connect(conn):
    conn.max_send_buffer_size = 1000
    conn.on_error = lambda c, code, message: (results["errors"].setdefault(c.websocket.request.path, []).append(code), save())
    for i in range(3):
        results["returns"].setdefault(str(conn.id), []).append(conn.send(f"c{i}" + "x" * MESSAGE))

async def later(conn):
    await asyncio.sleep(0.05)
    send_three(conn, "w")

def on_websocket_connect(conn, request):
    results["returns"][request.path] = results["returns"].pop(str(conn.id))
    if request.path == "/later":
        return later(conn)
    send_three(conn, "w")

w.on_connect = on_connect
w.on_websocket_connect = on_websocket_connect

def on_websocket_connected(conn):
    from longshore.websocket import WebSocketConnection
    # Open: the plain send path again, and the class the documentation names.
    results["open_class"] = [type(conn).send is TcpConnection.send, isinstance(conn, WebSocketConnection)]
    conn.send("open")

w.on_websocket_connected = on_websocket_connected
w.on_message = lambda conn, message: (results["received"].append(message[:2]), save())

client = Worker(None, name="client")

def start(worker):
    global RESULTS  # this process records into a file of its own
    RESULTS = os.path.join(os.environ["APP_DIR"], "client.json")
    results.clear()
    conn = AsyncTcpConnection(w.bound_listen.replace("websocket://", "ws://") + "/from-client")
    conn.max_send_buffer_size = 1000
    conn.on_error = lambda c, code, message: (results.setdefault("errors", []).append(code), save())
    results["returns"] = [conn.send(f"k{i}" + "x" * MESSAGE) for i in range(6)]  # held while connecting
    results["buffered"] = conn.send_buffer_size
    conn.connect()
    save()

client.on_worker_start = start
"""
)


def test_frames_sent_before_the_handshake_count_toward_the_send_buffer_and_follow_the_101_in_order(app_factory):
    app = app_factory(HELD).start()
    port = app.port()
    for path in ("/now", "/later"):
        sock = handshake(port, path)
        frames = [read_frame(sock)[2][:2] for _ in range(5)]
        assert frames == [b"c0", b"c1", b"c2", b"w0", b"op"], path  # "open" is sent after the 101
        sock.close()
    results = wait_for(lambda: (r := app.read_json("results.json")) and len(r["received"]) == 4 and r, what="the client's messages")
    for path in ("/now", "/later"):
        assert results["returns"][path] == [None, None, None, None, False, False], path
        assert results["errors"][path] == [2, 2], path  # SEND_FAIL
        assert results["buffered"][path] == 4 * 304
    # The client: held while connecting, then until the server's 101, within the same limit.
    assert results["open_class"] == [True, True]
    client = app.read_json("client.json")
    assert client["returns"] == [None, None, None, None, False, False]
    assert client["errors"] == [2, 2]
    assert client["buffered"] == 4 * 308  # masked frames: 4 bytes more each
    assert results["received"] == ["k0", "k1", "k2", "k3"]
    wait_for(lambda: sum(p["send_fail"] for p in app.processes()) >= 6, what="send_fail counted")


DECIDING = (
    RECORDER
    + """
w = Worker("websocket://127.0.0.1:0", name="ws", stop_timeout=4)
results.update(messages=[], errors=[], decided=[])

async def on_websocket_connect(conn, request):
    try:
        await asyncio.sleep(float(request.query.get("wait", "0.2")))
    finally:
        results["decided"].append(request.path)
        save()
    if request.path == "/raise":
        raise RuntimeError("lookup failed")
    return 403 if request.path == "/refuse" else None

w.on_websocket_connect = on_websocket_connect
w.on_message = lambda conn, message: (results["messages"].append(message), save())
w.on_error = lambda conn, code, message: (results["errors"].append([code, message]), save())
"""
)

UPGRADE_REQUEST = (
    "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def test_nothing_more_is_read_while_an_async_on_websocket_connect_decides(app_factory):
    app = app_factory(DECIDING).start()
    port = app.port()
    baseline = app.processes("ws")[0]["memory"]
    sock = connect(port)
    sock.sendall(UPGRADE_REQUEST.format(path="/refuse?wait=2").encode())
    sock.setblocking(False)
    junk = b"\x00" * (1 << 20)
    sent = 0
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            sent += sock.send(junk)
        except BlockingIOError:
            time.sleep(0.01)
    # What the socket buffers hold, not what a client can push in a second (hundreds of MiB).
    assert sent < 48 * 1024 * 1024
    assert app.processes("ws")[0]["memory"] - baseline < 48 * 1024 * 1024
    sock.close()


def test_frames_that_came_while_an_async_on_websocket_connect_decided_are_read_after_it(app_factory):
    app = app_factory(DECIDING).start()
    port = app.port()
    # Good frames, in the chunk of the handshake and after it: delivered and counted.
    good = connect(port)
    good.sendall(UPGRADE_REQUEST.format(path="/good?wait=0.3").encode() + frame(1, b"one"))
    time.sleep(0.05)
    good.sendall(frame(1, b"two") + frame(1, b"three"))
    assert good.recv(12) == b"HTTP/1.1 101"
    # A bad frame: the connection is failed with 1002 (not left open), and on_error hears of it.
    bad = connect(port)
    bad.sendall(UPGRADE_REQUEST.format(path="/bad?wait=0.3").encode() + frame(1, b"hi", mask=False))
    head = b""
    while b"\r\n\r\n" not in head:
        head += bad.recv(1)
    assert head.startswith(b"HTTP/1.1 101")
    assert read_close(bad)[0] == 1002
    assert is_closed(bad)
    results = wait_for(lambda: (r := app.read_json("results.json")) and len(r["messages"]) == 3 and r["errors"] and r, what="messages and the error")
    assert results["messages"] == ["one", "two", "three"]
    assert results["errors"][0][0] == 3  # PROTOCOL_ERROR
    process = app.processes("ws")[0]
    assert process["total_request"] == 3
    assert process["protocol_error"] == 1
    good.close()


def test_a_stop_cancels_an_async_on_websocket_connect_still_deciding(app_factory):
    app = app_factory(DECIDING).start()
    port = app.port()
    failing = connect(port)
    failing.sendall(UPGRADE_REQUEST.format(path="/raise?wait=0").encode())
    assert failing.recv(12) == b"HTTP/1.1 500"
    assert wait_for(lambda: app.processes("ws")[0]["throw_exception"]) == 1  # counted once
    sock = connect(port, timeout=10)
    sock.sendall(UPGRADE_REQUEST.format(path="/lookup?wait=30").encode())
    time.sleep(0.3)
    started = time.monotonic()
    app.cli("stop")
    assert time.monotonic() - started < 4
    assert is_closed(sock)  # no answer: the worker went away
    assert app.read_json("results.json")["decided"] == ["/raise", "/lookup"]  # its finally block ran
    log = app.log()
    assert log.count("exception in on_websocket_connect") == 1 and "did not end" not in log
    assert "Task was destroyed" not in log


def test_our_client_gives_up_on_a_server_that_never_answers_the_handshake(app_factory):
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []
    threading.Thread(target=lambda: [accepted.append(listener.accept()) for _ in range(2)], daemon=True).start()
    try:
        app = app_factory(
            RECORDER
            + f"""
w = Worker(None, name="client")
results.update(events=[])

def on_close(conn):
    results["events"].append("close")
    save()
    if results["events"].count("close") < 2:
        conn.reconnect(0.1)

def start(worker):
    conn = AsyncTcpConnection("ws://127.0.0.1:{listener.getsockname()[1]}/silent")
    conn.websocket_handshake_timeout = 0.5
    conn.on_connect = lambda c: (results["events"].append("connect"), save())
    conn.on_error = lambda c, code, message: (results["events"].append([code, message]), save())
    conn.on_close = on_close
    conn.connect()
    save()

w.on_worker_start = start
"""
        )
        started = time.monotonic()
        app.start()
        events = wait_for(lambda: (r := app.read_json("results.json")) and r["events"].count("close") == 2 and r["events"], what="two attempts")
        assert time.monotonic() - started < 8
        assert [event if event == "close" else event[0] for event in events] == [1, "close", 1, "close"]  # CONNECT_FAIL
        assert "no answer to the handshake within 0.5 s" in events[0][1]
        assert len(accepted) == 2  # the reconnect reached the server again
        assert app.processes("client")[0]["connect_fail"] == 2
    finally:
        listener.close()
        for sock, _ in accepted:
            sock.close()


def test_our_client_backs_off_longer_and_longer_while_the_server_refuses_its_handshake(app_factory):
    app = app_factory(
        RECORDER
        + """
w = Worker("websocket://127.0.0.1:0", name="ws")
handshakes = []

def on_websocket_connect(conn, request):
    handshakes.append(request.path)
    return 403 if len(handshakes) <= 3 else None  # the fourth attempt gets in

w.on_websocket_connect = on_websocket_connect

AsyncTcpConnection.reconnect_min_delay = 0.1
client = Worker(None, name="client")
results.update(closes=[], attempts=[], connected=[])

def on_error(conn, code, message):
    results["attempts"].append([code, conn.reconnect_attempts])
    save()

def on_close(conn):
    results["closes"].append(time.monotonic())
    save()
    if not results["connected"]:
        conn.reconnect()

def on_connect(conn):
    results["connected"].append(conn.reconnect_attempts)
    save()
    conn.close()  # closed by the application: no reconnect

def start(worker):
    global RESULTS  # this process records into a file of its own
    RESULTS = os.path.join(os.environ["APP_DIR"], "client.json")
    conn = AsyncTcpConnection(w.bound_listen.replace("websocket://", "ws://") + "/refused")
    conn.on_connect, conn.on_error, conn.on_close = on_connect, on_error, on_close
    conn.connect()

client.on_worker_start = start
"""
    ).start()
    results = wait_for(lambda: (r := app.read_json("client.json")) and r["connected"] and len(r["closes"]) == 4 and r, what="four attempts", timeout=10)
    assert results["attempts"] == [[1, 1], [1, 2], [1, 3]]  # CONNECT_FAIL, and the attempts count up
    assert results["connected"] == [0]  # an accepted handshake starts the count over
    closes = results["closes"]
    gaps = [later - earlier for earlier, later in zip(closes, closes[1:])]
    # 0.2, 0.4, 0.8 s give or take 10 %: each wait clearly longer than the one before.
    assert gaps[0] > 0.15 and gaps[1] > gaps[0] * 1.5 and gaps[2] > gaps[1] * 1.5, gaps


class HandshakeSpoiler(ThreadedServer):
    """A raw server that accepts TCP connections and spoils every WebSocket handshake
    the same way: ``drop`` (closes without answering), ``403`` (refuses), ``badkey`` (a
    101 with a wrong Sec-WebSocket-Accept, then waits) or ``silent`` (never answers)."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.paths: list[str] = []
        super().__init__()

    def handle(self, sock) -> None:
        try:
            sock.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    return
                head += chunk
            self.paths.append(head.split(b" ")[1].decode())
            if self.behaviour == "403":
                sock.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            elif self.behaviour == "badkey":
                sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n")
            if self.behaviour in ("badkey", "silent"):
                while sock.recv(4096):  # until the client gives up
                    pass
        except OSError:
            pass
        finally:
            sock.close()


SPOILED_HANDSHAKE_CLIENT = """
AsyncTcpConnection.reconnect_min_delay = 0.05
w = Worker(None, name="client")
results.update(events={"on_error": [], "on_close": []})

def on_websocket_connected(conn):
    results["events"][conn.mode].append("websocket connected")
    save()

w.on_websocket_connected = on_websocket_connected

def on_connect(conn):
    results["events"][conn.mode].append("connect")
    save()

def on_error(conn, code, message):
    events = results["events"][conn.mode]
    events.append([code, message, conn.reconnect_attempts])
    save()
    if conn.mode == "on_error" and events.count("close") < 2:
        conn.reconnect()

def on_close(conn):
    events = results["events"][conn.mode]
    events.append("close")
    save()
    if conn.mode == "on_close" and events.count("close") < 3:
        conn.reconnect()

class Client(AsyncTcpConnection):
    websocket_handshake_timeout = 0.3

def start(worker):
    for mode in ("on_error", "on_close"):  # where the client calls reconnect()
        conn = Client(f"ws://127.0.0.1:{PORT}/" + mode)
        conn.mode = mode
        conn.on_connect, conn.on_error, conn.on_close = on_connect, on_error, on_close
        conn.connect()
        conn.send("early")  # held for after a 101 that never comes
    save()

w.on_worker_start = start
"""


@pytest.mark.parametrize(
    "behaviour, reason",
    [
        ("drop", "the server closed the connection before answering"),
        ("403", "server answered HTTP 403 Forbidden"),
        ("badkey", "bad Sec-WebSocket-Accept"),
        ("silent", "no answer to the handshake within 0.3 s"),
    ],
)
def test_a_spoiled_handshake_is_a_failed_connect_and_the_client_reconnects_with_backoff(app_factory, behaviour, reason):
    server = HandshakeSpoiler(behaviour)
    try:
        app = app_factory(RECORDER + f"PORT = {server.port}\n" + SPOILED_HANDSHAKE_CLIENT).start()

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # three attempts of each client (or what came of them)
            results = app.read_json("results.json")
            if results and all(events.count("close") == 3 for events in results["events"].values()):
                break
            time.sleep(0.05)
        time.sleep(0.3)  # nothing more comes (no fourth attempt, no late callback)
        results = app.read_json("results.json")
        for mode, events in results["events"].items():
            # Each attempt: CONNECT_FAIL saying why, then on_close, as for a refused TCP
            # connect; never on_connect nor the connected hook; the backoff grows.
            assert [event if event == "close" else [event[0], event[2]] for event in events] == [[1, 1], "close", [1, 2], "close", [1, 3], "close"], (mode, events)
            for event in events[::2]:
                assert event[1].startswith(f"websocket handshake with ws://127.0.0.1:{server.port}/{mode} failed: {reason}"), (mode, event)
        assert sorted(server.paths) == ["/on_close"] * 3 + ["/on_error"] * 3  # every reconnect reached the server
        stats = app.processes("client")[0]
        assert stats["connect_fail"] == 6
        assert stats["connections"] == 0
        assert stats["send_fail"] == 0  # what waited for the 101 was given up, not a failed send
    finally:
        server.close()


def test_a_handshake_given_up_by_the_application_is_not_a_failed_connect(app_factory):
    server = HandshakeSpoiler("silent")
    try:
        app = app_factory(
            RECORDER
            + f"""
PORT = {server.port}
w = Worker(None, name="client")
results.update(events=[])

def record(event):
    results["events"].append(event)
    save()

def on_close(conn):
    record(["close", conn.reconnect_attempts])
    if len(results["events"]) == 1:  # reconnect() connects again in 0.05 s
        asyncio.get_running_loop().call_later(0.4, conn.destroy)
    elif len(results["events"]) == 2:
        conn.connect()
        asyncio.get_running_loop().call_later(0.3, conn.close)

def start(worker):
    conn = AsyncTcpConnection(f"ws://127.0.0.1:{{PORT}}/given-up")
    conn.websocket_handshake_timeout = 10
    conn.on_connect = lambda c: record("connect")
    conn.on_error = lambda c, code, message: record([code, message])
    conn.on_close = on_close
    conn.connect()
    asyncio.get_running_loop().call_later(0.3, conn.reconnect, 0.05)  # cuts the attempt, then connects again
    save()

w.on_worker_start = start
"""
        ).start()
        # reconnect(), then destroy(), then close() while the server has not answered:
        # on_close each time, no CONNECT_FAIL, and no failed attempt for the backoff.
        events = wait_for(lambda: (r := app.read_json("results.json")) and len(r["events"]) >= 3 and r["events"], what="three closes")
        time.sleep(0.3)
        assert app.read_json("results.json")["events"] == events == [["close", 0], ["close", 0], ["close", 0]]
        assert server.paths == ["/given-up"] * 3
        assert app.processes("client")[0]["connect_fail"] == 0
    finally:
        server.close()
