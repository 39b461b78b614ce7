"""HTTP/1.1 against a real server: httpx (sync and async), raw sockets, curl.

One server (a real start script run with ``start -d``) serves the tests of this module;
the tests that count errors read its counters before and after.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import socket
import subprocess
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import App, connect, is_closed, raw_exchange, wait_for
from wsutil import frame, handshake, read_frame
from longshore.errors import PackageTooLarge, ProtocolError
from longshore.protocols.http import HttpProtocol

SERVER = r'''
from longshore.http import Response, FileResponse, Chunk, HttpProtocol
HttpProtocol.header_timeout = 1.0
TcpConnection.default_max_package_size = 1024 * 1024

web = Worker("http://127.0.0.1:0", name="web")

def describe(request):
    return {
        "method": request.method,
        "path": request.path,
        "target": request.target,
        "query": {name: request.query.getall(name) for name in request.query},
        "headers": dict(request.headers.items()),
        "cookies": request.cookies,
        "body_size": len(request.body),
        "body": request.body.decode("latin-1")[:2000],
        "form": {name: request.form.getall(name) for name in request.form},
        "version": request.version,
        "keep_alive": request.keep_alive,
        "remote_ip": request.remote_ip,
        "remote_port": request.remote_port,
    }

def on_message(conn, request):
    path = request.path
    if path == "/raise-now":
        raise RuntimeError("failing before any answer")
    if path == "/bad-header":  # not Latin-1: sending it raises
        conn.send(Response("x", headers={"X-Name": "Jos\u00e9 \u2603"}))
    if path.startswith("/sized/"):  # about 800 KB, its number repeated
        tag = path[7:].encode() + b";"
        conn.send(Response(tag * (800_000 // len(tag))))
        return None
    if path == "/overflow":  # a producer that ignores on_buffer_full
        conn.send(Response(chunked=True))
        conn.send(Chunk(b"x" * (16 * 1024 * 1024)))
        conn.send(Chunk(b"tail"))  # the send buffer is full: dropped
        conn.send(Chunk(b""))
        return None
    if path == "/chunks-then-raise":  # a chunked answer started, never ended
        conn.send(Response("first;", chunked=True))
        conn.send(Chunk(b"second;"))
        raise RuntimeError("failing amid a chunked answer")
    return answer(conn, request)

async def answer(conn, request):
    path = request.path
    if path == "/":
        conn.send("hello")
    elif path == "/raise-later":
        await asyncio.sleep(0.05)
        raise RuntimeError("failing before any answer")
    elif path == "/chunks-then-raise-later":
        conn.send(Response("first;", chunked=True))
        await asyncio.sleep(0.05)
        conn.send(Chunk(b"second;"))
        raise RuntimeError("failing amid a chunked answer")
    elif path == "/bytes":
        conn.send(b"raw bytes")
    elif path == "/echo":
        conn.send(Response(json.dumps(describe(request)), content_type="application/json"))
    elif path == "/json":
        conn.send(Response(json.dumps({"got": request.json()}), content_type="application/json"))
    elif path.startswith("/status/"):
        conn.send(Response("status", int(path.rsplit("/", 1)[1])))
    elif path == "/cookie":
        response = Response("cookies", headers=[("X-Multi", "a"), ("X-Multi", "b")])
        response.set_cookie("plain", "v1")
        response.set_cookie("full", "a b;c", max_age=60, path="/app", domain="example.com", secure=True, httponly=True, samesite="Strict")
        response.delete_cookie("old")
        conn.send(response)
    elif path.startswith("/sleep/"):
        await asyncio.sleep(float(path.rsplit("/", 1)[1]))
        conn.send(path)
    elif path == "/close":
        conn.send(Response("bye", headers={"Connection": "close"}))
    elif path == "/file":
        conn.send(FileResponse(os.path.join(os.environ["APP_DIR"], "big.bin")))
    else:
        conn.send(Response("Not Found", 404))

web.on_message = on_message
'''

BIG_FILE_SIZE = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("http")
    with open(folder / "big.bin", "wb") as file:
        file.truncate(BIG_FILE_SIZE)  # sparse: read as zeros
    app = App(folder, SERVER).start()
    port = app.port()
    yield app, port
    app.cli("stop", timeout=30, check=False)
    app.kill_everything()


def base(port: int) -> str:
    return f"http://127.0.0.1:{port}"


_leftovers: dict[int, bytes] = {}


def read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, dict[str, str], bytes]:
    """Read one Content-Length-delimited response from a raw socket."""
    sock.settimeout(timeout)
    data = _leftovers.pop(id(sock), b"")
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(data)
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.decode().lower()] = value.decode().strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(rest)
        rest += chunk
    _leftovers[id(sock)] = rest[length:]
    return lines[0], headers, rest[:length]


def counters(app: App) -> dict:
    process = app.processes("web")[0]
    return {key: process[key] for key in ("total_request", "protocol_error", "package_too_large", "pid")}


# -- the basics, with httpx --------------------------------------------------------------


def test_hello_and_request_fields_with_httpx(server):
    app, port = server
    with httpx.Client(base_url=base(port)) as client:
        response = client.get("/")
        assert response.status_code == 200
        assert response.text == "hello"
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert "date" in response.headers
        assert client.get("/bytes").content == b"raw bytes"
        described = client.get(
            "/echo?a=1&a=2&b=%C3%A9&empty=", headers={"X-Custom": "Value", "Cookie": 'sid=abc; quoted="q v"'}
        ).json()
        assert described["method"] == "GET"
        assert described["path"] == "/echo"
        assert described["query"] == {"a": ["1", "2"], "b": ["é"], "empty": [""]}
        assert described["headers"]["X-Custom"] == "Value"
        assert described["cookies"] == {"sid": "abc", "quoted": "q v"}
        assert described["version"] == "1.1"
        assert described["remote_ip"] == "127.0.0.1"
        assert described["remote_port"] > 0
        assert client.get("/a%20b").status_code == 404
        assert client.post("/json", json={"x": [1, 2]}).json() == {"got": {"x": [1, 2]}}
        form = client.post("/echo", data={"name": "Zoë", "tag": ["a", "b"]}).json()
        assert form["form"] == {"name": ["Zoë"], "tag": ["a", "b"]}
        assert client.get("/status/201").status_code == 201
        assert client.get("/status/418").status_code == 418
        no_content = client.get("/status/204")
        assert no_content.status_code == 204 and no_content.content == b""
        head = client.head("/")
        assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == "5"


def test_headers_are_case_insensitive_and_cookies_have_attributes(server):
    app, port = server
    response = httpx.get(base(port) + "/cookie")
    assert response.headers.get_list("x-multi") == ["a", "b"]
    cookies = response.headers.get_list("set-cookie")
    assert cookies[0] == "plain=v1; Path=/; SameSite=Lax"
    assert cookies[1] == "full=a%20b%3Bc; Max-Age=60; Path=/app; Domain=example.com; Secure; HttpOnly; SameSite=Strict"
    assert cookies[2].startswith("old=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Path=/")
    sock = connect(port)
    sock.sendall(b"GET /echo HTTP/1.1\r\nhOsT: x\r\nX-LOUD: 1\r\n\r\n")
    status, headers, body = read_response(sock)
    described = json.loads(body)
    assert described["headers"] == {"hOsT": "x", "X-LOUD": "1"}


def test_async_httpx_many_concurrent_requests(server):
    app, port = server

    async def main() -> list[str]:
        async with httpx.AsyncClient(base_url=base(port)) as client:
            responses = await asyncio.gather(*(client.get(f"/echo?i={i}") for i in range(200)))
            return [r.json()["query"]["i"][0] for r in responses]

    assert asyncio.run(main()) == [str(i) for i in range(200)]


# -- connection handling, with raw sockets ------------------------------------------------


def test_keep_alive_serves_many_requests_on_one_connection(server):
    app, port = server
    sock = connect(port)
    for index in range(50):
        sock.sendall(f"GET /echo?i={index} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, headers, body = read_response(sock)
        assert status == b"HTTP/1.1 200 OK"
        assert json.loads(body)["query"] == {"i": [str(index)]}
        assert "connection" not in headers


def test_pipelined_requests_are_answered_in_order_even_behind_a_slow_handler(server):
    app, port = server
    sock = connect(port)
    requests = b"".join(
        f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        for path in ["/sleep/0.3", "/", "/echo?n=1", "/sleep/0.1", "/bytes"] * 4
    )
    # in pieces that cut requests in the middle
    for start in range(0, len(requests), 37):
        sock.sendall(requests[start : start + 37])
    bodies = [read_response(sock)[2] for _ in range(20)]
    for round_ in range(4):
        five = bodies[round_ * 5 : round_ * 5 + 5]
        assert five[0] == b"/sleep/0.3"
        assert five[1] == b"hello"
        assert json.loads(five[2])["query"] == {"n": ["1"]}
        assert five[3] == b"/sleep/0.1"
        assert five[4] == b"raw bytes"


def test_connection_close_and_http_1_0(server):
    app, port = server
    # HTTP/1.1 with Connection: close: one answer, then the server closes
    data = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /bytes HTTP/1.1\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close\r\n" in data
    assert data.endswith(b"\r\n\r\nhello") and b"raw bytes" not in data
    # HTTP/1.0: closes after the answer
    data = raw_exchange(port, b"GET / HTTP/1.0\r\n\r\n")
    assert data.endswith(b"hello") and b"Connection: close" in data
    # HTTP/1.0 with keep-alive: stays open, says so
    sock = connect(port)
    for _ in range(3):
        sock.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, body = read_response(sock)
        assert headers["connection"] == "keep-alive" and body == b"hello"
    # the application's Connection: close
    data = raw_exchange(port, b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n")
    assert data.endswith(b"bye")


def test_expect_100_continue_and_chunked_request_bodies(server):
    app, port = server
    sock = connect(port)
    sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    sock.settimeout(5)
    interim = b""
    while b"\r\n\r\n" not in interim:
        interim += sock.recv(100)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    sock.sendall(b"hello")
    status, headers, body = read_response(sock)
    assert json.loads(body)["body"] == "hello"
    chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nTrailer: x\r\n\r\n"
    for index in range(0, len(chunked), 5):
        sock.sendall(chunked[index : index + 5])
        time.sleep(0.001)
    status, headers, body = read_response(sock)
    assert json.loads(body)["body"] == "hello, world"
    with httpx.Client() as client:

        def parts():
            yield b"streamed "
            yield b"body"

        assert client.post(base(port) + "/echo", content=parts()).json()["body"] == "streamed body"


def test_100_continue_is_sent_when_the_request_gets_its_turn(server):
    app, port = server
    expecting = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    # behind an answer still being computed: the 100 follows that answer
    sock = connect(port)
    sock.sendall(b"GET /sleep/0.5 HTTP/1.1\r\nHost: x\r\n\r\n" + expecting)
    assert read_response(sock)[2] == b"/sleep/0.5"
    assert read_response(sock, timeout=2)[0] == b"HTTP/1.1 100 Continue"
    sock.sendall(b"hello")
    status, headers, body = read_response(sock)
    assert json.loads(body)["body"] == "hello"
    # behind a streamed file and an answer held behind it
    sock.sendall(b"GET /file HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n" + expecting)
    status, headers, body = read_response(sock, timeout=10)
    assert status == b"HTTP/1.1 200 OK" and len(body) == BIG_FILE_SIZE
    assert read_response(sock)[2] == b"hello"
    assert read_response(sock, timeout=2)[0] == b"HTTP/1.1 100 Continue"
    sock.sendall(b"world")
    assert json.loads(read_response(sock)[2])["body"] == "world"
    # a client that started its body without waiting gets no 100
    sock.sendall(b"GET /sleep/0.3 HTTP/1.1\r\nHost: x\r\n\r\n" + expecting + b"ab")
    assert read_response(sock)[2] == b"/sleep/0.3"
    time.sleep(0.2)
    sock.sendall(b"cde")
    status, headers, body = read_response(sock)
    assert status == b"HTTP/1.1 200 OK" and json.loads(body)["body"] == "abcde"
    sock.close()


# -- limits and bad input: each closes that connection only, and is counted -------------------


def test_headers_larger_than_16_kib_get_431(server):
    app, port = server
    before = counters(app)
    keeper = connect(port)
    keeper.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert read_response(keeper)[2] == b"hello"
    data = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 431 ")
    # the same, trickled in small pieces
    sock = connect(port)
    sock.sendall(b"GET / HTTP/1.1\r\nX-Big: ")
    try:
        for _ in range(40):
            sock.sendall(b"b" * 1000)
            time.sleep(0.005)
    except OSError:
        pass
    assert is_closed(sock)
    data = raw_exchange(port, b"GET /" + b"u" * 17000 + b" HTTP/1.1\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 431 ")
    keeper.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert read_response(keeper)[2] == b"hello"
    wait_for(lambda: counters(app)["protocol_error"] >= before["protocol_error"] + 3, what="431s counted")
    assert counters(app)["pid"] == before["pid"]


def test_pipelined_requests_read_amid_headers_do_not_count_as_one_big_header(server):
    """A read that ends one request's headers, holds hundreds of small requests (over
    16 KiB together) and begins another: no 431, every request answered."""
    app, port = server
    before = counters(app)
    one = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    sock = connect(port)
    sock.sendall(b"GET / HTTP/1.1\r\nHo")
    time.sleep(0.2)
    sock.sendall(b"st: x\r\n\r\n" + one * 700 + b"GET / HTTP/1.1\r\n")
    time.sleep(0.2)
    sock.sendall(b"Host: x\r\nConnection: close\r\n\r\n")
    data = read_to_end(sock)
    assert b" 431 " not in data
    assert data.count(b"HTTP/1.1 200 OK") == 702 and data.endswith(b"hello")
    assert counters(app)["protocol_error"] == before["protocol_error"]


def _answers(data: bytes) -> list[bytes]:
    """The status lines of the answers in ``data``."""
    return re.findall(rb"HTTP/1\.1 \d\d\d [^\r]*", data)


@pytest.mark.parametrize(
    "requests, statuses",
    [
        # on_message raises: alone, before another request, behind an answer still being
        # computed (a coroutine), behind a file still going out (a slow reader)
        ([b"GET /raise-now"], [b"500"]),
        ([b"GET /raise-now", b"HEAD /"], [b"500"]),
        ([b"GET /sleep/0.3", b"GET /raise-later", b"GET /"], [b"200", b"500"]),
        ([b"GET /file", b"GET /raise-now", b"GET /"], [b"200", b"500"]),
        # send() raises (a header value that is not Latin-1)
        ([b"GET /bad-header", b"GET /"], [b"500"]),
        ([b"GET /sleep/0.3", b"GET /bad-header", b"GET /"], [b"200", b"500"]),
    ],
)
def test_a_failing_handler_gets_a_500_in_its_place_and_the_connection_closes(server, requests, statuses):
    app, port = server
    before = counters(app)
    sock = connect(port, rcvbuf=64 * 1024)
    sock.sendall(b"".join(line + b" HTTP/1.1\r\nHost: x\r\n\r\n" for line in requests))
    time.sleep(0.5)  # the file, when there is one, is far from written out
    data = read_to_end(sock, timeout=5)  # the server closes
    assert [line.split()[1] for line in _answers(data)] == statuses, data[:300]
    if requests[0] == b"GET /file":
        assert len(data.partition(b"\r\n\r\n")[2]) > BIG_FILE_SIZE  # whole, then the 500
    error = data[data.index(b"HTTP/1.1 500") :]
    assert b"Connection: close\r\n" in error and error.endswith(b"\r\n\r\n500 Internal Server Error\n")
    assert counters(app)["protocol_error"] == before["protocol_error"]
    assert httpx.get(base(port)).text == "hello"  # the worker goes on


@pytest.mark.parametrize(
    "requests",
    [
        # the handler raises amid its chunked answer: at once, in a coroutine, and with
        # that answer held behind a file still going out (its chunks go out after it)
        [b"GET /chunks-then-raise", b"GET /"],
        [b"GET /chunks-then-raise-later", b"GET /"],
        [b"GET /file", b"GET /chunks-then-raise", b"GET /"],
    ],
)
def test_a_handler_failing_amid_its_chunked_answer_cuts_it_short_and_closes(server, requests):
    app, port = server
    before = counters(app)
    sock = connect(port, rcvbuf=64 * 1024)
    sock.sendall(b"".join(line + b" HTTP/1.1\r\nHost: x\r\n\r\n" for line in requests))
    time.sleep(0.3)  # the file, when there is one, is far from written out
    started = time.monotonic()
    data = read_to_end(sock, timeout=5)  # the server closes
    assert time.monotonic() - started < 3
    assert [line.split()[1] for line in _answers(data)] == [b"200"] * (len(requests) - 1), data[:300]
    if requests[0] == b"GET /file":
        assert len(data.partition(b"\r\n\r\n")[2]) > BIG_FILE_SIZE  # whole, then the cut answer
    cut = data[data.rindex(b"HTTP/1.1 200") :]
    assert b"Transfer-Encoding: chunked\r\n" in cut
    assert cut.endswith(b"\r\n\r\n6\r\nfirst;\r\n7\r\nsecond;\r\n")  # no last chunk
    assert counters(app)["protocol_error"] == before["protocol_error"]
    assert httpx.get(base(port)).text == "hello"  # the worker goes on


def test_pipelined_requests_behind_a_stalled_file_are_not_read_without_bound(server):
    """A client reads a file slowly and pipelines requests behind it as fast as it can:
    the server stops reading them (a few answers held, a few reads of up to 256 KB parsed)
    instead of reading and holding every answer in memory until the file is out."""
    app, port = server
    before = counters(app)
    sock = connect(port, rcvbuf=64 * 1024)
    sock.sendall(b"GET /file HTTP/1.1\r\nHost: x\r\n\r\n")
    stop = threading.Event()

    def slow_reader() -> None:  # about 2 MB/s: the file takes four seconds
        while not stop.is_set():
            try:
                sock.recv(64 * 1024)
            except OSError:
                pass
            time.sleep(0.03)

    reader = threading.Thread(target=slow_reader, daemon=True)
    reader.start()
    block = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 1000
    sent = 0
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            sent += sock.send(block)
        except socket.timeout:
            pass
        except OSError:  # the header timeout (1 s here) of a request cut by the last read
            break  # struck: the connection closes after the file (tested elsewhere)
    stop.set()
    reader.join()
    parsed = counters(app)["total_request"] - before["total_request"]
    sock.close()
    assert sent > 1_000_000  # the kernel's buffers took plenty
    # Measured: 4,000 to 32,000 requests parsed of the ~110,000 sent (a server reading
    # without bound parses nearly all of them: what it reads leaves the kernel's buffers).
    # The socket buffers take a good part of the file, so its last piece can be handed
    # over within the two seconds; reading then rightly resumes (under the send buffer's
    # own flow control), and how much more is parsed depends on the machine's pace.
    assert parsed < 50_000 and parsed < sent // len(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") // 2, (parsed, sent)


def test_pipelined_answers_are_never_dropped_for_a_full_send_buffer(server):
    """Ten pipelined answers of 800 KB each (eight times the send buffer): they all
    arrive, whole and in order, then the answer to the request sent after them."""
    app, port = server
    sock = connect(port, rcvbuf=64 * 1024)
    sock.sendall(b"".join(b"GET /sized/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(10)))
    time.sleep(1.0)  # nothing read meanwhile: the server's send buffer fills up
    for i in range(10):
        status, headers, body = read_response(sock, timeout=10)
        tag = b"%d;" % i
        assert status == b"HTTP/1.1 200 OK" and body == tag * (800_000 // len(tag)), (i, status, body[:20])
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(sock)[2] == b"hello"


def test_an_answer_dropped_for_a_full_send_buffer_closes_the_connection(server):
    """A handler that sends on into a full buffer loses a piece of its answer: the
    connection closes (the chunked body visibly cut short) rather than go on with the
    next answer in its place."""
    app, port = server
    sock = connect(port, rcvbuf=64 * 1024)
    sock.sendall(b"GET /overflow HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.5)
    data = read_to_end(sock, timeout=5)  # the server closes
    assert data.startswith(b"HTTP/1.1 200 OK") and b"Transfer-Encoding: chunked" in data
    assert not data.endswith(b"0\r\n\r\n") and b"tail" not in data and data.count(b"HTTP/1.1") == 1


def test_body_larger_than_max_package_size_gets_413(server):
    app, port = server
    before = counters(app)
    data = raw_exchange(port, b"POST /echo HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n" + b"x" * 1000)
    assert data.startswith(b"HTTP/1.1 413 ")
    sock = connect(port)
    sock.sendall(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    try:
        for _ in range(20):
            sock.sendall(b"10000\r\n" + b"y" * 0x10000 + b"\r\n")
    except OSError:
        pass
    sock.settimeout(5)
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    assert answer.startswith(b"HTTP/1.1 413 ")
    # with 100-continue the body is refused before it is sent
    data = raw_exchange(port, b"POST /echo HTTP/1.1\r\nContent-Length: 2000000\r\nExpect: 100-continue\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 413 ")
    wait_for(lambda: counters(app)["package_too_large"] >= before["package_too_large"] + 3, what="413s counted")
    assert httpx.get(base(port)).text == "hello"


@pytest.mark.parametrize(
    "payload",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad header line\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"G\x00T / HTTP/1.1\r\n\r\n",
        # request smuggling
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["request-line", "header", "version", "content-length", "nul", "cl-and-te", "two-cl", "te-identity", "bad-chunk"],
)
def test_malformed_requests_get_400_and_are_counted(server, payload):
    app, port = server
    before = counters(app)
    data = raw_exchange(port, payload)
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n"), data
    assert data.count(b"HTTP/1.1") == 1  # nothing was served from it
    wait_for(lambda: counters(app)["protocol_error"] == before["protocol_error"] + 1, what="400 counted")


def test_a_good_request_before_bad_bytes_is_still_answered(server):
    app, port = server
    data = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\nNOT HTTP AT ALL\r\n\r\n")
    first, _, rest = data.partition(b"hello")
    assert first.startswith(b"HTTP/1.1 200 OK") and rest.startswith(b"HTTP/1.1 400 ")
    # a streamed file before them goes out whole, the 400 after it
    data = raw_exchange(port, b"GET /file HTTP/1.1\r\nHost: x\r\n\r\nNOT HTTP AT ALL\r\n\r\n", timeout=10)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and rest[:BIG_FILE_SIZE].count(b"\0") == BIG_FILE_SIZE
    assert rest[BIG_FILE_SIZE:].startswith(b"HTTP/1.1 400 ")


def test_slow_headers_are_cut_after_the_timeout(server):
    app, port = server
    before = counters(app)
    slow = connect(port)
    started = time.monotonic()
    slow.sendall(b"GET / HTTP/1.1\r\n")
    sent_until_closed = 0
    slow.settimeout(0.3)
    data = b""
    while time.monotonic() - started < 5:
        try:
            slow.sendall(b"X-A: b\r\n")
            sent_until_closed += 1
        except OSError:
            break
        try:
            chunk = slow.recv(1000)
            if not chunk:
                break
            data += chunk
        except socket.timeout:
            pass
        except ConnectionResetError:
            break
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3.5
    assert data.startswith(b"HTTP/1.1 408 ")
    # a silent connection too
    silent = connect(port)
    assert is_closed(silent, timeout=4)
    wait_for(lambda: counters(app)["protocol_error"] >= before["protocol_error"] + 2, what="timeouts counted")
    assert httpx.get(base(port)).text == "hello"


def read_to_end(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Read (after what read_response left over) until the server closes."""
    sock.settimeout(timeout)
    data = _leftovers.pop(id(sock), b"")
    try:
        while chunk := sock.recv(1 << 20):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_header_timeout_behind_owed_answers_closes_after_them_without_a_408(server):
    app, port = server
    before = counters(app)
    stalled_next = b"GET / HTTP/1.1\r\nHost: x\r\nX-Half: "  # the next request stops in its headers
    # the answer to the first request is still being computed when the header timeout strikes
    computing = connect(port)
    computing.sendall(b"GET /sleep/2.2 HTTP/1.1\r\nHost: x\r\n\r\n" + stalled_next)
    # the answer to the first request is a file, going out to a reader that does not read yet
    slow_reader = connect(port, rcvbuf=64 * 1024)
    slow_reader.sendall(b"GET /file HTTP/1.1\r\nHost: x\r\n\r\n" + stalled_next)
    time.sleep(2.5)  # over twice the header timeout, with the file far from written out
    data = read_to_end(slow_reader)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: %d" % BIG_FILE_SIZE in head
    assert len(body) == BIG_FILE_SIZE and body.count(b"\0") == BIG_FILE_SIZE  # whole, and no 408 after it
    data = read_to_end(computing)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\n/sleep/2.2")
    assert data.count(b"HTTP/1.1") == 1
    # each is still a timeout, counted as such
    wait_for(lambda: counters(app)["protocol_error"] == before["protocol_error"] + 2, what="timeouts counted")


# -- idle keep-alive and slow request bodies, on a server with 1 s timeouts ----------------

TIMEOUTS_SERVER = r"""
from longshore.http import Response, FileResponse, Chunk, EventStream, ServerSentEvent, HttpProtocol
from longshore.websocket import upgrade
HttpProtocol.keepalive_timeout = 1.0
HttpProtocol.body_timeout = 1.0
HttpProtocol.header_timeout = 5.0
APP_DIR = os.environ["APP_DIR"]

web = Worker("http://127.0.0.1:0", name="web")

async def on_message(conn, request):
    path = request.path
    if path == "/":
        conn.send("hello")
    elif path == "/upload":
        conn.send(f"got {len(request.body)}")
    elif path.startswith("/sleep/"):
        await asyncio.sleep(float(path.rsplit("/", 1)[1]))
        conn.send("slept")
    elif path == "/chunks":  # quiet for longer than the keep-alive timeout between chunks
        conn.send(Response(chunked=True, content_type="text/plain"))
        for index in range(2):
            await asyncio.sleep(1.5)
            conn.send(Chunk(f"tick{index};"))
        conn.send(Chunk(b""))
    elif path == "/events":
        conn.send(EventStream())
        await asyncio.sleep(2.5)
        conn.send(ServerSentEvent("late"))
    elif path == "/file":
        conn.send(FileResponse(os.path.join(APP_DIR, "big.bin")))
    elif path == "/bytes":  # one send, far bigger than the socket takes at once
        conn.send(b"b" * (4 * 1024 * 1024))
    elif path == "/ws":
        upgrade(conn, request, on_message=lambda c, m: c.send("ws:" + m))
    else:
        conn.send(Response("Not Found", 404))

web.on_message = on_message
"""


@pytest.fixture(scope="module")
def timeouts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("httptimeouts")
    with open(folder / "big.bin", "wb") as file:
        file.truncate(8 * 1024 * 1024)
    app = App(folder, TIMEOUTS_SERVER).start()
    port = app.port()
    yield app, port
    app.cli("stop", timeout=30, check=False)
    app.kill_everything()


def read_until(sock: socket.socket, marker: bytes, timeout: float = 5.0) -> bytes:
    """Read (after what read_response left over) until ``marker`` has arrived."""
    sock.settimeout(timeout)
    data = _leftovers.pop(id(sock), b"")
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(data)
        data += chunk
    return data


def test_idle_keep_alive_connection_is_closed_quietly(timeouts):
    app, port = timeouts
    before = counters(app)
    pooled = httpx.Client()
    assert pooled.get(base(port)).text == "hello"
    idle = connect(port)
    idle.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(idle)[2] == b"hello"
    answered = time.monotonic()
    assert not is_closed(idle, timeout=0.8)  # not before its time
    # a client that keeps talking, with gaps shorter than the timeout, stays
    lively = connect(port)
    while time.monotonic() - answered < 3.0:
        lively.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(lively)[2] == b"hello"
        time.sleep(0.4)
    idle.settimeout(0.5)
    assert idle.recv(100) == b""  # closed, with no answer (no 408)
    lively.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(lively)[2] == b"hello"
    # httpx finds its pooled connection closed and opens another by itself
    assert pooled.get(base(port)).text == "hello"
    pooled.close()
    # a quiet close is not an error
    time.sleep(0.5)
    assert counters(app)["protocol_error"] == before["protocol_error"]


def test_keep_alive_timeout_spares_connections_still_answering(timeouts):
    app, port = timeouts
    request = "GET {} HTTP/1.1\r\nHost: x\r\n\r\n"
    waiting = connect(port)
    waiting.sendall(request.format("/sleep/2.5").encode())
    chunks = connect(port)
    chunks.sendall(request.format("/chunks").encode())
    events = connect(port)
    events.sendall(request.format("/events").encode())
    download = connect(port, rcvbuf=64 * 1024)
    download.sendall(request.format("/file").encode())
    big = connect(port, rcvbuf=64 * 1024)
    big.sendall(request.format("/bytes").encode())
    ws = handshake(port, "/ws")
    idle = connect(port)
    idle.sendall(request.format("/").encode())
    assert read_response(idle)[2] == b"hello"
    time.sleep(3.2)  # nobody reads or sends for three keep-alive timeouts
    idle.settimeout(0.5)
    assert idle.recv(100) == b""  # the only idle one is gone
    assert read_response(waiting)[2] == b"slept"
    waiting.sendall(request.format("/").encode())
    assert read_response(waiting)[2] == b"hello"
    body = read_until(chunks, b"0\r\n\r\n").partition(b"\r\n\r\n")[2]
    assert body == b"6\r\ntick0;\r\n6\r\ntick1;\r\n0\r\n\r\n"
    assert read_until(events, b"data: late\n\n").startswith(b"HTTP/1.1 200 OK")
    status, _, data = read_response(download, timeout=10)
    assert status == b"HTTP/1.1 200 OK" and len(data) == 8 * 1024 * 1024
    download.sendall(request.format("/").encode())
    assert read_response(download)[2] == b"hello"
    status, _, data = read_response(big, timeout=10)
    assert len(data) == 4 * 1024 * 1024 and data.count(b"b") == len(data)
    big.sendall(request.format("/").encode())  # a close would only have come after the data
    assert read_response(big)[2] == b"hello"
    ws.sendall(frame(1, b"still here"))
    assert read_frame(ws)[1:] == (1, b"ws:still here")
    for sock in (waiting, chunks, events, download, big, ws):
        sock.close()


def test_slow_request_body_gets_408(timeouts):
    app, port = timeouts
    before = counters(app)
    # the clock does not run while the server still owes an earlier answer
    pipelined = connect(port)
    pipelined.sendall(b"GET /sleep/2.2 HTTP/1.1\r\nHost: x\r\n\r\nPOST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n" + b"y" * 10)
    # a body that stops coming
    stalled = connect(port)
    stalled.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    started = time.monotonic()
    # a chunked body that stops after its first chunk
    stalled_chunks = connect(port)
    stalled_chunks.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    data = b""
    stalled.settimeout(5)
    try:
        while chunk := stalled.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    elapsed = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in data
    assert 0.9 <= elapsed < 3.5, elapsed
    assert read_response(stalled_chunks)[0] == b"HTTP/1.1 408 Request Timeout"
    assert is_closed(stalled_chunks)
    assert read_response(pipelined)[2] == b"slept"
    pipelined.sendall(b"y" * 10)
    assert read_response(pipelined)[2] == b"got 20"
    # a body that keeps coming, slowly but with gaps under the timeout, is fine
    trickle = connect(port)
    trickle.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\n")
    for _ in range(6):
        time.sleep(0.4)
        trickle.sendall(b"x" * 10)
    assert read_response(trickle)[2] == b"got 60"
    wait_for(lambda: counters(app)["protocol_error"] == before["protocol_error"] + 2, what="the two body timeouts counted")


def test_total_request_counts_each_request(server):
    app, port = server
    time.sleep(0.5)  # let the figures of earlier requests be published
    before = counters(app)["total_request"]
    sock = connect(port)
    sock.sendall(b"GET / HTTP/1.1\r\n\r\n" * 10)
    for _ in range(10):
        read_response(sock)
    with httpx.Client() as client:
        for _ in range(5):
            client.get(base(port) + "/")
    wait_for(lambda: counters(app)["total_request"] == before + 15, what="15 requests counted")


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_wrk_keep_alive_under_load(server):
    app, port = server
    time.sleep(0.5)
    before = counters(app)
    result = subprocess.run(["wrk", "-t1", "-c20", "-d1s", base(port) + "/"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "Socket errors" not in result.stdout and "Non-2xx" not in result.stdout, result.stdout
    done = int(re.search(r"(\d+) requests in", result.stdout).group(1))
    assert done > 1000
    # wrk counts answered requests; a few more may have been sent when it stopped
    wait_for(lambda: done <= counters(app)["total_request"] - before["total_request"] <= done + 20, what="wrk's requests counted")
    after = counters(app)
    assert after["protocol_error"] == before["protocol_error"] and after["pid"] == before["pid"]


def test_random_bytes_never_crash_the_worker(server):
    app, port = server
    before = counters(app)
    rng = random.Random(42)
    prefixes = [b"", b"GET / HTTP/1.1\r\n", b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n", b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"]
    for _ in range(60):
        sock = connect(port)
        try:
            sock.sendall(rng.choice(prefixes) + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 2000))))
        except OSError:
            pass
        sock.close()
    assert httpx.get(base(port)).text == "hello"
    after = counters(app)
    assert after["pid"] == before["pid"]
    assert app.status()["exits"] == []


# -- sans-I/O: the protocol byte for byte ---------------------------------------------------


class FakeConnection:
    """What the protocol uses of its connection, without a network."""

    max_package_size = 4096
    closed = False
    remote_address = "127.0.0.1:1"

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data, raw=False):
        self.sent.append(data)
        return True


def _protocol() -> HttpProtocol:
    return HttpProtocol(FakeConnection())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.sampled_from([b"", b"GET / HTTP/1.1\r\n", b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"PUT /x HTTP/1.1\r\nContent-Length: 3\r\n\r\n"]))
def test_random_bytes_parse_or_raise_protocol_error(data, prefix):
    async def run() -> None:
        protocol = _protocol()
        try:
            for request in protocol.feed(prefix + data):
                protocol.encode("x")
        except ProtocolError as exc:
            assert exc.response and exc.response.startswith(b"HTTP/1.1 4")

    asyncio.run(run())


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 60), max_size=30))
def test_any_split_gives_the_same_requests(cuts):
    wire = (
        b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\n\r\n"
        b"POST /b HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
        b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )

    async def run() -> list:
        protocol = _protocol()
        out = []
        position = 0
        for cut in cuts:
            out += protocol.feed(wire[position : position + cut])
            position += cut
        out += protocol.feed(wire[position:])
        return [(r.method, r.path, r.body) for r in out]

    assert asyncio.run(run()) == [("GET", "/a", b""), ("POST", "/b", b"hello"), ("PUT", "/c", b"abc")]


def test_limits_sans_io():
    async def run() -> None:
        with pytest.raises(PackageTooLarge) as info:
            _protocol().feed(b"POST / HTTP/1.1\r\nContent-Length: 5000\r\n\r\n")
        assert info.value.response.startswith(b"HTTP/1.1 413 ")
        with pytest.raises(ProtocolError) as info:
            _protocol().feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
        assert info.value.response.startswith(b"HTTP/1.1 431 ")
        with pytest.raises(ProtocolError) as info:
            _protocol().feed(b"GET / HTTP/1.1\r\nExpect: teapot\r\n\r\n")
        assert info.value.response.startswith(b"HTTP/1.1 417 ")

    asyncio.run(run())
