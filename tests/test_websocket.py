"""WebSocket server: the ``websockets`` library's client (and raw sockets for bad input)
against a real ``websocket://`` worker."""

from __future__ import annotations

import asyncio
import time
import zlib

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import connect, is_closed, wait_for
from wsutil import frame, handshake, read_close, read_frame

RECORDER = """
RESULTS = os.path.join(os.environ["APP_DIR"], "results.json")
results = {}

def save():
    with open(RESULTS + ".tmp", "w") as f:
        json.dump(results, f)
    os.replace(RESULTS + ".tmp", RESULTS)
"""

ECHO = (
    RECORDER
    + """
w = Worker("websocket://127.0.0.1:0", name="ws")
w.websocket_subprotocols = ["chat.v2", "chat.v1"]

def on_websocket_connect(conn, request):
    results.setdefault("requests", []).append({
        "path": request.path, "query": request.query.get("room"),
        "agent": request.headers.get("x-agent"), "cookie": request.cookies.get("sid"),
    })
    save()
    if request.path == "/private":
        return 401
    if request.path == "/forbidden":
        return False

async def on_slow_connect(conn, request):
    await asyncio.sleep(0.1)
    return None if request.query.get("ok") else 403

def on_websocket_connected(conn):
    conn.send("welcome " + (conn.websocket.subprotocol or "-"))

def on_message(conn, message):
    if message == "close-me":
        conn.close(code=4001, reason="as you wish")
    elif message == "kind":
        conn.send(type(message).__name__ + ":" + str(conn.websocket.compressed))
    elif message == "close-long":
        conn.close(code=4002, reason="é" * 100)
    elif message == "websocket-close":
        conn.websocket.close(4002, "bye")  # the protocol object's close: the same closing handshake
    elif isinstance(message, str) and message.startswith("close-code "):
        try:
            conn.close(code=int(message[11:]))
        except ValueError:
            conn.send("refused, open: %s" % conn.websocket.open)
    else:
        conn.send(message)

def on_close(conn):
    if conn.websocket.close_code is not None:
        results.setdefault("closes", []).append([conn.websocket.close_code, conn.websocket.close_reason])
        save()

def on_error(conn, code, message):
    results.setdefault("errors", []).append([code, message])
    save()

w.on_websocket_connect = on_websocket_connect
w.on_websocket_connected = on_websocket_connected
w.on_message = on_message
w.on_close = on_close
w.on_error = on_error

slow = Worker("websocket://127.0.0.1:0", name="slow")
slow.on_websocket_connect = on_slow_connect
slow.on_message = on_message
"""
)


def run(coroutine):
    return asyncio.run(coroutine)


def test_echo_with_the_websockets_client(app_factory):
    app = app_factory(ECHO).start()
    port = app.port()
    url = f"ws://127.0.0.1:{port}"

    async def scenario():
        async with ws_connect(
            f"{url}/room?room=blue", subprotocols=["chat.v1", "chat.v2"], additional_headers={"X-Agent": "t", "Cookie": "sid=abc; x=1"}
        ) as ws:
            assert await ws.recv() == "welcome chat.v1"  # the client's order decides
            assert ws.subprotocol == "chat.v1"
            await ws.send("hello")
            assert await ws.recv() == "hello"
            await ws.send("héllo ✓")
            assert await ws.recv() == "héllo ✓"
            await ws.send(b"\x00\xffbinary")
            assert await ws.recv() == b"\x00\xffbinary"
            await ws.send(["frag", "men", "ted"])  # one message in three frames
            assert await ws.recv() == "fragmented"
            await ws.send([b"\x01", b"\x02"])
            assert await ws.recv() == b"\x01\x02"
            big = "x" * 300_000 + "y"
            await ws.send(big)
            assert await ws.recv() == big
            await ws.send("kind")
            assert await ws.recv() == "str:True"
            latency = await (await ws.ping(b"abc"))
            assert latency >= 0
            await ws.send("close-me")
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd.code == 4001 and closed.value.rcvd.reason == "as you wish"

        async with ws_connect(url, compression=None) as ws:  # no permessage-deflate
            assert await ws.recv() == "welcome -"
            await ws.send("kind")
            assert await ws.recv() == "str:False"
            await ws.send(bytes(range(256)) * 1000)
            assert await ws.recv() == bytes(range(256)) * 1000
            await ws.close(4000, "bye")
        assert ws.close_code == 4000

    run(scenario())
    wait_for(lambda: len(app.read_json("results.json").get("closes", [])) >= 1, what="close codes recorded")
    results = app.read_json("results.json")
    assert results["requests"][0] == {"path": "/room", "query": "blue", "agent": "t", "cookie": "abc"}
    assert [4000, "bye"] in results["closes"]
    assert not results.get("errors")


def test_close_codes_and_reasons_given_by_the_application(app_factory):
    app = app_factory(ECHO).start()
    port = app.port()

    async def scenario():
        async with ws_connect(f"ws://127.0.0.1:{port}/", compression=None) as ws:
            assert await ws.recv() == "welcome -"
            for code in (1005, 1006, 1015, 1004, 999, 2000, 5000):  # codes that may not be sent
                await ws.send(f"close-code {code}")
                assert await ws.recv() == "refused, open: True", code
            await ws.send("close-long")
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            # Cut to the 123 bytes that fit, on a character boundary: 61 two-byte characters.
            assert closed.value.rcvd.code == 4002 and closed.value.rcvd.reason == "é" * 61

    run(scenario())


def test_closing_through_conn_websocket_is_the_whole_closing_handshake(app_factory):
    app = app_factory(ECHO).start()
    port = app.port()

    async def scenario():
        async with ws_connect(f"ws://127.0.0.1:{port}/", compression=None, close_timeout=5) as ws:
            assert await ws.recv() == "welcome -"
            await ws.send("websocket-close")
            started = time.monotonic()
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd.code == 4002 and closed.value.rcvd.reason == "bye"
            await ws.wait_closed()
            # The server closed the TCP connection once our close frame came, rather than
            # leaving it open until our close_timeout.
            assert time.monotonic() - started < 2

    run(scenario())
    # The server read the answer to its close frame.
    wait_for(lambda: [4002, "bye"] in app.read_json("results.json").get("closes", []), what="the close answer read")


def test_a_client_still_sending_when_the_server_closes_gets_the_close_frame(app_factory):
    app = app_factory(ECHO + "\nw.websocket_close_timeout = 2.0\n").start()
    port = app.port()
    # A raw client: "close-me", then a megabyte more in the same burst. The server reads
    # on (dropping it) instead of closing a socket with data unread, which would reset it.
    sock = handshake(port)
    read_frame(sock)  # welcome
    sock.sendall(frame(1, b"close-me") + frame(2, b"z" * 65536) * 16)
    assert read_close(sock) == (4001, "as you wish")
    sock.sendall(frame(8, (1000).to_bytes(2, "big") + b"ok"))  # the answer ends the wait at once
    started = time.monotonic()
    assert is_closed(sock)
    assert time.monotonic() - started < 1.5  # at once, not after close_timeout
    wait_for(lambda: app.read_json("results.json").get("closes"), what="the close recorded")
    assert app.read_json("results.json")["closes"] == [[1000, "ok"]]  # the peer's answer

    # A peer that never answers: the socket closes after close_timeout.
    silent = handshake(port)
    read_frame(silent)
    silent.sendall(frame(1, b"close-me"))
    assert read_close(silent)[0] == 4001
    started = time.monotonic()
    assert is_closed(silent)
    assert 1.7 < time.monotonic() - started < 5

    # The websockets client, sending as fast as it can, learns the code too.
    async def flood():
        async with ws_connect(f"ws://127.0.0.1:{port}/", compression=None, max_queue=None) as ws:
            assert await ws.recv() == "welcome -"
            try:
                for i in range(5000):
                    await ws.send("close-me" if i == 50 else "m" * 2000)
                    if i % 100 == 0:
                        await asyncio.sleep(0)
                while True:
                    await ws.recv()
            except ConnectionClosed as closed:
                return closed.rcvd and closed.rcvd.code

    started = time.monotonic()
    assert run(flood()) == 4001
    assert time.monotonic() - started < 5


def test_handshake_refusals(app_factory):
    app = app_factory(ECHO).start()
    port, slow_port = app.port(0), app.port(1)

    async def status_of(url):
        try:
            async with ws_connect(url) as ws:
                await ws.send("echo")
                assert await ws.recv() in ("echo", "welcome -")
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code

    async def scenario():
        assert await status_of(f"ws://127.0.0.1:{port}/private") == 401
        assert await status_of(f"ws://127.0.0.1:{port}/forbidden") == 403
        assert await status_of(f"ws://127.0.0.1:{port}/open") == 101
        assert await status_of(f"ws://127.0.0.1:{slow_port}/?ok=1") == 101  # async hook
        assert await status_of(f"ws://127.0.0.1:{slow_port}/") == 403

    run(scenario())
    for request, status in [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"426"),  # plain HTTP
        (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n", b"426"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n", b"400"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", b"405"),
        (b"\x16\x03\x01 not http at all\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", b"400"),  # no Host
        (b"GET / HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", b"400"),
    ]:
        sock = connect(port)
        sock.sendall(request)
        answer = sock.recv(4096)
        assert answer.split(b" ")[1] == status, (request, answer)
        assert is_closed(sock)
        if status == b"426":  # one Connection header, with both options
            lines = answer.split(b"\r\n\r\n")[0].split(b"\r\n")
            assert [line for line in lines if line.lower().startswith(b"connection:")] == [b"Connection: Upgrade, close"], answer
            assert b"Upgrade: websocket" in lines, answer


def test_bad_frames_close_with_the_right_code(app_factory):
    app = app_factory(
        ECHO
        + """
def small(worker):
    TcpConnection.default_max_package_size = 1000
w.on_worker_start = small
w.websocket_close_timeout = 0.5  # a frame declared 2**40 bytes long: the answer is taken for its payload
"""
    ).start()
    port = app.port()
    deflate = "Sec-WebSocket-Extensions: permessage-deflate\r\n"
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb_payload = bomb.compress(b"\x00" * 10_000_000) + bomb.flush(zlib.Z_SYNC_FLUSH)
    bomb_payload = bomb_payload[:-4]
    cases = [
        ("unmasked frame", frame(1, b"hi", mask=False), 1002, ""),
        ("invalid UTF-8", frame(1, b"\xff\xfe"), 1007, ""),
        ("too large", frame(2, b"x" * 1001), 1009, ""),
        ("too large declared", frame(2, b"", length=1 << 40)[:10], 1009, ""),
        ("fragments too large", frame(2, b"x" * 600, fin=False) + frame(0, b"x" * 600), 1009, ""),
        ("zip bomb", frame(2, bomb_payload, rsv=0x40), 1009, deflate),
        ("rsv1 without deflate", frame(1, b"hi", rsv=0x40), 1002, ""),
        ("rsv2", frame(1, b"hi", rsv=0x20), 1002, deflate),
        ("unknown opcode", frame(3, b""), 1002, ""),
        ("fragmented ping", frame(9, b"", fin=False), 1002, ""),
        ("long ping", frame(9, b"p" * 126), 1002, ""),
        ("orphan continuation", frame(0, b"x"), 1002, ""),
        ("new message mid-fragment", frame(1, b"a", fin=False) + frame(1, b"b"), 1002, ""),
        ("bad close code", frame(8, (1005).to_bytes(2, "big")), 1002, ""),
        ("one-byte close", frame(8, b"\x03"), 1002, ""),
        ("close reason not UTF-8", frame(8, (1000).to_bytes(2, "big") + b"\xff"), 1007, ""),
    ]
    for name, data, code, extra in cases:
        sock = handshake(port, extra=extra)
        assert read_frame(sock)[2].startswith(b"welcome")
        sock.sendall(data)
        assert read_close(sock)[0] == code, name
        try:
            sock.sendall(frame(8, b""))  # the answer a client gives: the server closes then
        except OSError:
            pass
        assert is_closed(sock), name

    # Control frames between fragments are answered; the message arrives whole.
    sock = handshake(port)
    read_frame(sock)
    sock.sendall(frame(1, b"ab", fin=False) + frame(9, b"ping!") + frame(0, b"cd", fin=False) + frame(10, b"") + frame(0, b"ef"))
    assert read_frame(sock)[1:] == (10, b"ping!")
    assert read_frame(sock)[1:] == (1, b"abcdef")
    # A valid compressed message (the client's own deflate) is inflated.
    sock.sendall(frame(8, (1000).to_bytes(2, "big") + "fin ✓".encode()))
    assert read_close(sock) == (1000, "")
    assert is_closed(sock)

    results = wait_for(lambda: len(app.read_json("results.json").get("errors", [])) >= len(cases) and app.read_json("results.json"))
    assert len(results["errors"]) == len(cases)
    process = app.processes("ws")[0]
    assert process["status"] in ("idle", "busy")


def test_compressed_input_is_inflated(app_factory):
    app = app_factory(ECHO).start()
    port = app.port()
    sock = handshake(port, extra="Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n")
    read_frame(sock)
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    payload = compressor.compress("compress me ".encode() * 50) + compressor.flush(zlib.Z_SYNC_FLUSH)
    sock.sendall(frame(1, payload[:-4], rsv=0x40))
    first, opcode, data = read_frame(sock)
    assert opcode == 1 and first & 0x40  # echoed compressed
    assert zlib.decompressobj(-15).decompress(data + b"\x00\x00\xff\xff") == "compress me ".encode() * 50
    sock.close()


def test_a_silent_connection_gets_408_after_the_handshake_timeout(app_factory):
    app = app_factory(
        """
w = Worker("websocket://127.0.0.1:0", name="ws")
w.websocket_handshake_timeout = 0.5
w.on_message = lambda conn, message: conn.send(message)
"""
    ).start()
    port = app.port()
    sock = connect(port)
    sock.sendall(b"GET / HTTP/1.1\r\n")  # and nothing more
    started = time.monotonic()
    answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408")
    assert is_closed(sock)
    assert 0.4 < time.monotonic() - started < 3
    # A connection that completes its handshake is not affected.
    ok = handshake(port)
    time.sleep(1.0)
    ok.sendall(frame(1, b"still"))
    assert read_frame(ok)[2] == b"still"


def test_one_broadcast_message_is_framed_once_and_reaches_everyone(app_factory):
    app = app_factory(
        """
w = Worker("websocket://127.0.0.1:0", name="ws")

def on_message(conn, message):
    big = message * 1000
    for other in list(w.connections.values()):
        other.send(big)

w.on_message = on_message
"""
    ).start()
    port = app.port()
    deflate = "Sec-WebSocket-Extensions: permessage-deflate\r\n"
    plain, compressed = handshake(port), handshake(port, extra=deflate)
    plain.sendall(frame(1, b"ab"))
    assert read_frame(plain)[2] == b"ab" * 1000
    first, _, payload = read_frame(compressed)
    assert first & 0x40 and zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff") == b"ab" * 1000
