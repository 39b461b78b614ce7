"""HTTP hardening against a real server with raw sockets: what a hostile client sends
(path traversal, trailers, odd framing) and what a careless handler might answer."""

from __future__ import annotations

import gzip
import json
import os
import socket
import time

import pytest

from conftest import App, connect, raw_exchange, read_rest, read_until_closed, wait_for

SERVER = r'''
import gzip
from longshore.http import Response, FileResponse, HttpProtocol, Chunk
APP_DIR = os.environ["APP_DIR"]
STATIC = os.path.join(APP_DIR, "static")
TcpConnection.default_max_package_size = 1024 * 1024

web = Worker("http://127.0.0.1:0", name="web", count=1)

def on_message(conn, request):
    path = request.path
    if path.startswith("/static/"):
        conn.send(FileResponse(path[len("/static"):], root=STATIC))
    elif path.startswith("/naive/"):  # the file name glued to the folder: relies on path
        conn.send(FileResponse(STATIC + path[len("/naive"):]))
    elif path.startswith("/echo"):
        conn.send(Response(json.dumps({
            "path": path,
            "target": request.target,
            "headers": request.headers.items(),
            "trailers": request.trailers.items(),
            "trailer_x": request.trailers.get("x-checksum"),
            "cookies": request.cookies,
            "body": request.body.decode("latin-1"),
            "keep_alive": request.keep_alive,
        }), content_type="application/json"))
    elif path == "/relay":  # an upstream answer's headers passed on as they were
        conn.send(Response(b"hello world", headers={"Content-Length": "5", "X-Up": "1"}))
    elif path == "/relay-te":
        conn.send(Response(b"hello world", headers={"Transfer-Encoding": "chunked", "Connection": "keep-alive"}))
    elif path == "/relay-chunked":
        conn.send(Response(b"part1;", chunked=True, headers={"Transfer-Encoding": "chunked", "Content-Length": "3"}))
        conn.send(Chunk(b"part2"))
        conn.send(Chunk(b""))
    elif path == "/relay-file":
        conn.send(FileResponse("index.html", root=STATIC, headers={"Content-Length": "2", "Transfer-Encoding": "gzip"}))
    elif path == "/bye":
        conn.send(Response("bye", headers={"connection": "close"}))
    elif path == "/form":
        if request.header("content-encoding") == "gzip":  # the application unpacks the body itself
            request.body = gzip.decompress(request.body)
        conn.send(Response(json.dumps({"fields": len(request.form.items()), "files": len(request.files.items())}), content_type="application/json"))
    elif path == "/upload-names":
        conn.send(Response(json.dumps([[f.filename, f.safe_filename] for f in request.files.getall("f")]), content_type="application/json"))
    elif path == "/build":  # a response made from what the client sent
        q = request.query
        try:
            kind = q["kind"]
            if kind == "reason":
                response = Response("built", 400, reason=q["x"])
            elif kind == "name":
                response = Response("built", headers={q["x"]: "1"})
            elif kind == "value":
                response = Response("built", headers=[("X-Value", q["x"])])
            elif kind == "set_header":
                response = Response("built").set_header("X-Value", q["x"])
            elif kind == "add_header":
                response = Response("built").add_header(q["x"], "1")
            elif kind == "content_type":
                response = Response("built", content_type=q["x"])
            elif kind == "cookie_name":
                response = Response("built").set_cookie(q["x"], "v")
            elif kind == "cookie_value":
                response = Response("built").set_cookie("c", q["x"])
            elif kind == "cookie_path":
                response = Response("built").set_cookie("c", "v", path=q["x"])
        except ValueError as exc:
            response = Response("refused", 500, headers={"X-Refused": type(exc).__name__})
        conn.send(response)
    else:
        conn.send(Response("Not Found", 404))

web.on_message = on_message
'''

SECRET = "top secret, outside the static folder\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hardening")
    static = folder / "static"
    (static / "sub").mkdir(parents=True)
    (static / "index.html").write_text("index page\n")
    (static / "sub" / "page.txt").write_text("sub page\n")
    (folder / "secret.txt").write_text(SECRET)
    os.symlink(folder / "secret.txt", static / "escape.txt")  # a link that leads outside
    os.symlink(static / "index.html", static / "inside.html")  # a link that stays inside
    os.mkfifo(static / "pipe")
    app = App(folder, SERVER).start()
    port = app.port()
    yield app, port, folder
    app.cli("stop", timeout=30, check=False)
    app.kill_everything()


def get(port: int, target: bytes, headers: bytes = b"") -> tuple[int, bytes]:
    """One request with ``Connection: close``: (status, body)."""
    answer = raw_exchange(port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + headers + b"Connection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# -- path traversal ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        b"/static/../secret.txt",
        b"/static/../../../../../../etc/passwd",
        b"/static/%2e%2e/secret.txt",
        b"/static/%2E%2E/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/hostname",
        b"/static/..%2fsecret.txt",
        b"/static/sub/..%2f..%2fsecret.txt",
        b"/static//etc/passwd",
        b"/static/escape.txt",
        b"/static/index.html%00.txt",
        b"/naive/../secret.txt",
        b"/naive/%2e%2e/secret.txt",
        b"/naive/..%2f..%2f..%2f..%2f..%2f..%2fetc/passwd",
    ],
)
def test_no_file_outside_the_root_is_served(server, target):
    app, port, folder = server
    status, body = get(port, target)
    assert status == 404, (target, status, body)
    assert SECRET.encode() not in body and b"root:" not in body


def test_files_inside_the_root_are_served(server):
    app, port, folder = server
    assert get(port, b"/static/index.html") == (200, b"index page\n")
    assert get(port, b"/static/sub/page.txt") == (200, b"sub page\n")
    assert get(port, b"/static/sub/../index.html") == (200, b"index page\n")
    assert get(port, b"/static/sub/%2e%2e/sub/./page.txt") == (200, b"sub page\n")
    assert get(port, b"/static/inside.html") == (200, b"index page\n")  # a link that stays inside
    assert get(port, b"/naive/sub/page.txt") == (200, b"sub page\n")
    assert get(port, b"/static/")[0] == 404  # the folder itself
    assert get(port, b"/static/sub")[0] == 404


def test_request_path_has_no_dot_segments(server):
    app, port, folder = server
    for target, path in [
        (b"/echo/a/../b/./c", "/echo/b/c"),
        (b"/echo/q/%2e%2e/%2E/x", "/echo/x"),
        (b"/echo/x/..%2fy", "/echo/y"),
        (b"/x/../../../echo/z/..", "/echo/"),
        (b"/echo/.well-known/a..b/...", "/echo/.well-known/a..b/..."),
        (b"/echo/a%20b", "/echo/a b"),
    ]:
        status, body = get(port, target)
        assert status == 200, target
        answer = json.loads(body)
        assert (answer["path"], answer["target"]) == (path, target.decode()), target


# -- chunked request trailers ----------------------------------------------------------------


def split_responses(data: bytes) -> list[tuple[bytes, bytes]]:
    """Content-Length-delimited responses read to the end: [(head, body), ...]."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        out.append((head, rest[:length]))
        data = rest[length:]
    return out


def test_trailers_stay_apart_from_the_headers(server):
    app, port, folder = server
    answers = split_responses(raw_exchange(
        port,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nCookie: a=1\r\n\r\n"
        b"3\r\nabc\r\n0\r\n"
        b"X-Checksum: 42\r\nX-Admin: 1\r\nCookie: SID=evil\r\nX-Forwarded-For: 10.0.0.1\r\n"
        b"Expect: teapot\r\n\r\n"
        b"GET /echo/next HTTP/1.1\r\nHost: y\r\nConnection: close\r\n\r\n",
    ))
    assert len(answers) == 2
    head, body = answers[0]
    assert head.startswith(b"HTTP/1.1 200 "), head
    answer = json.loads(body)
    names = [name.lower() for name, _ in answer["headers"]]
    assert names == ["host", "transfer-encoding", "cookie"]
    assert answer["cookies"] == {"a": "1"}
    assert answer["body"] == "abc" and answer["keep_alive"] is True
    assert answer["trailer_x"] == "42"  # case-insensitive
    assert [name for name, _ in answer["trailers"]] == ["X-Checksum", "X-Admin", "Cookie", "X-Forwarded-For", "Expect"]
    # the connection goes on
    answer = json.loads(answers[1][1])
    assert answer["path"] == "/echo/next" and answer["trailers"] == []
    # a trailer 'Connection: close': the answer goes, then the connection closes (what
    # follows is not taken for a request)
    answers = split_responses(raw_exchange(
        port,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nConnection: close\r\n\r\n"
        b"GET /echo/next HTTP/1.1\r\nHost: y\r\n\r\n",
    ))
    assert len(answers) == 1 and answers[0][0].startswith(b"HTTP/1.1 200 ") and b"Connection: close" in answers[0][0]
    assert json.loads(answers[0][1])["trailers"] == [["Connection", "close"]]
    # a Content-Length trailer is refused by the parser (400), not taken for a body size (413)
    answer = raw_exchange(port, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nContent-Length: 99999999999\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]


def test_trailers_over_max_header_size_get_431(server):
    app, port, folder = server
    before = app.processes("web")[0]["protocol_error"]
    # one endless trailer field, arriving in pieces
    sock = connect(port)
    sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: ")
    time.sleep(0.05)
    try:
        for _ in range(200):  # up to 800 KiB; the server answers after about 16
            sock.sendall(b"a" * 4096)
            time.sleep(0.002)
    except (BrokenPipeError, ConnectionResetError):
        pass
    answer = read_rest(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    # many small trailer fields, all at once
    many = b"".join(b"X-F%d: %s\r\n" % (index, b"b" * 100) for index in range(300))
    answer = raw_exchange(port, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n" + many + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    wait_for(lambda: app.processes("web")[0]["protocol_error"] >= before + 2, what="431s counted")
    # a body of many small chunks is no trailer: it is served
    chunks = b"".join(b"1\r\n%c\r\n" % (97 + index % 26) for index in range(20000))
    answer = raw_exchange(port, b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\nX-Checksum: 7\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert len(json.loads(body)["body"]) == 20000 and json.loads(body)["trailer_x"] == "7"


# -- response splitting ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, value",
    [
        ("reason", "Bad\r\nSet-Cookie: injected=1"),
        ("reason", "Bad\nSet-Cookie: injected=1"),
        ("name", "X-A\r\nSet-Cookie: injected=1\r\nX-B"),
        ("name", "X A"),
        ("name", "X:A"),
        ("value", "a\r\nSet-Cookie: injected=1"),
        ("value", "a\rSet-Cookie: injected=1"),
        ("value", "a\x00b"),
        ("value", "snow \u2603"),
        ("set_header", "a\nSet-Cookie: injected=1"),
        ("add_header", "X\r\nSet-Cookie: injected=1\r\nX-B"),
        ("content_type", "text/html\r\nSet-Cookie: injected=1"),
        ("cookie_name", "a=b\r\nSet-Cookie: injected"),
        ("cookie_name", "a;b"),
        ("cookie_path", "/\r\nSet-Cookie: injected=1"),
        ("cookie_path", "/; Domain=evil.example"),
    ],
)
def test_line_breaks_and_bad_names_are_refused_when_the_response_is_made(server, kind, value):
    from urllib.parse import urlencode

    app, port, folder = server
    answer = raw_exchange(port, b"GET /build?" + urlencode({"kind": kind, "x": value}).encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 "), answer
    assert b"X-Refused: ValueError" in head and body == b"refused"
    assert b"injected" not in answer and b"evil" not in answer


def test_safe_values_are_sent_as_given(server):
    from urllib.parse import urlencode

    app, port, folder = server
    for kind, value, expected in [
        ("reason", "Tr\u00e8s Bien", b"HTTP/1.1 400 Tr\xe8s Bien\r\n"),
        ("value", "Jos\u00e9\tand a tab", b"\r\nX-Value: Jos\xe9\tand a tab\r\n"),
        ("name", "X-Custom_Name.1", b"\r\nX-Custom_Name.1: 1\r\n"),
        ("cookie_value", "a b;c\r\nd", b"\r\nSet-Cookie: c=a%20b%3Bc%0D%0Ad; Path=/; SameSite=Lax\r\n"),
    ]:
        answer = raw_exchange(port, b"GET /build?" + urlencode({"kind": kind, "x": value}).encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert expected in answer and answer.endswith(b"\r\n\r\nbuilt"), (kind, answer)


# -- framing headers are the server's ------------------------------------------------------


def header_lines(head: bytes, name: bytes) -> list[bytes]:
    return [line for line in head.split(b"\r\n")[1:] if line.lower().startswith(name.lower() + b":")]


def test_framing_headers_set_by_the_application_are_left_out(server):
    app, port, folder = server
    sock = connect(port)
    sock.sendall(
        b"GET /relay HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /relay-te HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /relay-file HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /relay HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    data = read_until_closed(sock)
    sock.close()
    answers = split_responses(data)
    assert [body for _, body in answers] == [b"hello world", b"hello world", b"index page\n", b"hello world"]
    for head, body in answers:
        assert header_lines(head, b"content-length") == [b"Content-Length: %d" % len(body)], head
        assert header_lines(head, b"transfer-encoding") == [], head
    assert header_lines(answers[0][0], b"x-up") == [b"X-Up: 1"]
    assert header_lines(answers[1][0], b"connection") == []  # the application's keep-alive is not sent
    assert header_lines(answers[3][0], b"connection") == [b"Connection: close"]  # only ours
    # a chunked response: one Transfer-Encoding, no Content-Length
    answer = raw_exchange(port, b"GET /relay-chunked HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert header_lines(head, b"transfer-encoding") == [b"Transfer-Encoding: chunked"], head
    assert header_lines(head, b"content-length") == [] and body == b"6\r\npart1;\r\n5\r\npart2\r\n0\r\n\r\n"
    # the application's 'Connection: close' still closes, with a single header
    sock = connect(port)
    sock.sendall(b"GET /bye HTTP/1.1\r\nHost: x\r\n\r\n")
    data = read_until_closed(sock)
    sock.close()
    assert header_lines(data.partition(b"\r\n\r\n")[0], b"connection") == [b"Connection: close"] and data.endswith(b"bye")
    # said once per process and header name
    log = app.log()
    assert log.count("the content-length header set by the application is not sent") == 1, log
    assert log.count("the transfer-encoding header set by the application is not sent") == 1, log


# -- only regular files ----------------------------------------------------------------------


def test_a_fifo_or_a_device_gets_404_without_blocking_the_worker(server):
    app, port, folder = server
    fifo = folder / "static" / "pipe"
    try:
        for target in (b"/static/pipe", b"/naive/pipe"):
            status, body = get(port, target)  # a blocked worker would answer nothing
            assert status == 404, target
        assert get(port, b"/static/index.html") == (200, b"index page\n")
    finally:
        try:  # should a worker wait on the FIFO, let it go
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


# -- request framing -----------------------------------------------------------------------------


def test_a_transfer_coding_other_than_chunked_gets_501(server):
    app, port, folder = server
    before = app.processes("web")[0]["protocol_error"]
    for coding in (b"gzip, chunked", b"deflate,chunked", b"x-custom , chunked"):
        answer = raw_exchange(port, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + coding + b"\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 501 ") and answer.count(b"HTTP/1.1") == 1, (coding, answer)
    wait_for(lambda: app.processes("web")[0]["protocol_error"] >= before + 3, what="501s counted")
    answer = raw_exchange(port, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:  Chunked \r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and json.loads(answer.partition(b"\r\n\r\n")[2])["body"] == "abc"


def test_http_1_0_with_transfer_encoding_is_answered_then_closed(server):
    app, port, folder = server
    answer = raw_exchange(
        port,
        b"POST /echo HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        b"GET /echo/smuggled HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    )
    answers = split_responses(answer)
    assert len(answers) == 1, answer
    head, body = answers[0]
    assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in head
    assert json.loads(body)["body"] == "abc" and json.loads(body)["keep_alive"] is False
    # without Transfer-Encoding, HTTP/1.0 keep-alive still works
    answer = raw_exchange(port, b"GET /echo/1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /echo/2 HTTP/1.0\r\n\r\n")
    assert [json.loads(body)["path"] for _, body in split_responses(answer)] == ["/echo/1", "/echo/2"]


def test_expect_100_continue_is_ignored_on_http_1_0(server):
    app, port, folder = server
    sock = connect(port)
    sock.sendall(b"POST /echo HTTP/1.0\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    sock.settimeout(0.5)
    with pytest.raises(socket.timeout):
        sock.recv(100)  # no '100 Continue': an HTTP/1.0 client would take it for the answer
    sock.settimeout(5)
    sock.sendall(b"abc")
    data = read_until_closed(sock)
    sock.close()
    assert data.startswith(b"HTTP/1.1 200 ") and b"100 Continue" not in data
    assert json.loads(data.partition(b"\r\n\r\n")[2])["body"] == "abc"
    # HTTP/1.1 still gets it
    sock = connect(port)
    sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
    assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
    sock.close()


# -- form field count ----------------------------------------------------------------------------


def post(port: int, content_type: bytes, body: bytes) -> tuple[int, bytes]:
    answer = raw_exchange(port, b"POST /form HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: " + content_type + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    head, _, rest = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


def multipart(fields: int, files: int) -> bytes:
    parts = [b"--B\r\nContent-Disposition: form-data; name=\"f%d\"\r\n\r\nv\r\n" % index for index in range(fields)]
    parts += [b"--B\r\nContent-Disposition: form-data; name=\"u%d\"; filename=\"u.txt\"\r\n\r\ndata\r\n" % index for index in range(files)]
    return b"".join(parts) + b"--B--\r\n"


def test_forms_with_more_than_max_form_fields_get_413(server):
    app, port, folder = server
    before = app.processes("web")[0]["package_too_large"]
    urlencoded = b"application/x-www-form-urlencoded"
    assert post(port, urlencoded, b"&".join(b"k%d=v" % index for index in range(1000))) == (200, b'{"fields": 1000, "files": 0}')
    status, _ = post(port, urlencoded, b"&".join(b"k%d=v" % index for index in range(1001)))
    assert status == 413
    status, _ = post(port, urlencoded, b"&" * 200000)  # a large body of empty fields
    assert status == 413
    form_data = b"multipart/form-data; boundary=B"
    assert post(port, form_data, multipart(990, 10)) == (200, b'{"fields": 990, "files": 10}')
    assert post(port, form_data, multipart(1001, 0))[0] == 413
    assert post(port, form_data, multipart(995, 6))[0] == 413
    wait_for(lambda: app.processes("web")[0]["package_too_large"] >= before + 4, what="413s counted")


def test_uploaded_file_names_are_raw_and_safe_filename_is_a_plain_name(server):
    app, port, folder = server
    names = ["../../etc/passwd", "..\\..\\win.ini", "..", ".htaccess", "report 2024.pdf"]
    body = b"".join(
        b"--B\r\nContent-Disposition: form-data; name=\"f\"; filename=\"" + name.encode() + b"\"\r\n\r\ndata\r\n" for name in names
    ) + b"--B--\r\n"
    answer = raw_exchange(port, b"POST /upload-names HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: multipart/form-data; boundary=B\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer
    assert json.loads(rest) == [
        ["../../etc/passwd", "passwd"],
        ["..\\..\\win.ini", "win.ini"],
        ["..", "upload"],
        [".htaccess", "htaccess"],
        ["report 2024.pdf", "report 2024.pdf"],
    ]



def _closed_after(port: int, request: bytes) -> bytes:
    """The whole answer to ``request`` (sent without ``Connection: close``): the server
    must close the connection by itself."""
    sock = connect(port)
    sock.sendall(request)
    answer = read_until_closed(sock)
    sock.close()
    return answer


@pytest.mark.parametrize(
    "content_types",
    [
        [b"application/x-www-form-urlencoded", b"text/plain"],
        [b"text/plain", b"application/x-www-form-urlencoded"],
        [b"application/x-www-form-urlencoded", b"application/x-www-form-urlencoded"],
        [b"multipart/form-data; boundary=B", b"application/x-www-form-urlencoded"],
    ],
)
def test_a_request_with_more_than_one_content_type_gets_400(server, content_types):
    # Content-Type is a singleton field (RFC 9110, 5.3): with two, the field limit and
    # request.form could each go by a different one (3000 fields got through as 200).
    app, port, folder = server
    before = app.processes("web")[0]["protocol_error"]
    body = b"a&" * 3000
    fields = b"".join(b"Content-Type: " + value + b"\r\n" for value in content_types)
    answer = _closed_after(port, b"POST /form HTTP/1.1\r\nHost: x\r\n" + fields + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 1
    wait_for(lambda: app.processes("web")[0]["protocol_error"] == before + 1, what="the 400 counted")


def test_content_type_is_read_the_same_way_for_the_field_limit_and_for_request_form(server):
    # Only spaces and tabs surround a media type: a value that starts with another byte
    # (a no-break space, which str.strip() removes) is not a form, neither for the limit
    # nor for request.form (3000 fields got through as 200).
    app, port, folder = server
    status, body = post(port, b"\xa0application/x-www-form-urlencoded", b"a&" * 3000)
    assert (status, json.loads(body)) == (200, {"fields": 0, "files": 0})
    status, body = post(port, b"\tApplication/X-WWW-Form-Urlencoded ; charset=utf-8", b"a&" * 999)
    assert (status, json.loads(body)) == (200, {"fields": 999, "files": 0})


def test_a_form_the_application_reads_is_limited_too(server):
    # The application unpacks a gzip body itself: the limit the protocol checked on the
    # bytes received does not see these fields; request.form answers 413 all the same.
    app, port, folder = server
    before = app.processes("web")[0]["package_too_large"]
    form = b"application/x-www-form-urlencoded"

    def gzipped(body: bytes) -> tuple[int, bytes]:
        packed = gzip.compress(body)
        answer = raw_exchange(port, b"POST /form HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Encoding: gzip\r\nContent-Type: " + form + b"\r\nContent-Length: %d\r\n\r\n" % len(packed) + packed)
        head, _, rest = answer.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), rest

    assert gzipped(b"&".join(b"k%d=v" % index for index in range(1000))) == (200, b'{"fields": 1000, "files": 0}')
    status, _ = gzipped(b"a&" * 100000)
    assert status == 413
    wait_for(lambda: app.processes("web")[0]["package_too_large"] == before + 1, what="the 413 counted")


CUT_SHORT = [
    b"--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n",  # no closing boundary
    b"--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--B",  # a boundary, not the closing one
    b"--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--B-",  # half the closing boundary
    b"--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--B\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x\"\r\n\r\n" + b"z" * 3000,
    b"",  # nothing at all
]


def test_a_multipart_body_cut_short_gets_400(server):
    # It was delivered as 200, its last part silently left out.
    app, port, folder = server
    before = app.processes("web")[0]["protocol_error"]
    form_data = b"multipart/form-data; boundary=B"
    for body in CUT_SHORT:
        assert post(port, form_data, body)[0] == 400, body[-20:]
    wait_for(lambda: app.processes("web")[0]["protocol_error"] == before + len(CUT_SHORT), what="the 400s counted")
    # What a browser sends for a form without fields, only the closing boundary, is an
    # empty form (and what follows that boundary, the epilogue, is ignored).
    assert post(port, form_data, b"--B--\r\n") == (200, b'{"fields": 0, "files": 0}')
    assert post(port, form_data, b"--B--\r\nepilogue") == (200, b'{"fields": 0, "files": 0}')


def test_the_multipart_parser_writes_nothing_in_the_log(app_factory):
    # It logged at INFO for each file moved to disk, and a WARNING for each malformed
    # body, which is reported (once) as the connection's 400 already.
    app = app_factory("""
from longshore.http import HttpProtocol
HttpProtocol.upload_memory_limit = 1000
w = Worker("http://127.0.0.1:0", name="web")
w.on_message = lambda conn, request: conn.send("%d files" % len(request.files.items()))
""").start()
    port = app.port()
    body = b"--B\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x\"\r\n\r\n" + b"z" * 5000 + b"\r\n--B--\r\n"
    head = b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: multipart/form-data; boundary=B\r\nContent-Length: %d\r\n\r\n"
    assert raw_exchange(port, head % len(body) + body).endswith(b"\r\n\r\n1 files")
    garbage = b"hello\r\n--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--B--\r\n"
    assert raw_exchange(port, head % len(garbage) + garbage).startswith(b"HTTP/1.1 400 ")
    wait_for(lambda: "closed: malformed multipart body" in app.log(), what="the 400 logged")
    assert "python_multipart" not in app.log()


def _read_for(sock: socket.socket, seconds: float) -> bytes:
    sock.settimeout(seconds)
    return read_rest(sock)


def test_chunk_data_read_after_its_size_line_is_not_taken_for_trailers(app_factory):
    app = app_factory("""
w = Worker("http://127.0.0.1:0", name="web")
w.on_message = lambda conn, request: conn.send("got %d" % len(request.body))
""").start()
    sock = connect(app.port())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    time.sleep(0.05)
    sock.sendall(b"5000\r\n")  # a read that ends after a size line ...
    time.sleep(0.05)
    sock.sendall(b"a" * 0x5000 + b"\r\n5000\r\n")  # ... then the data (over 16 KiB) and the next size line
    time.sleep(0.05)
    sock.sendall(b"b" * 0x5000 + b"\r\n0\r\n\r\n")
    answer = _read_for(sock, 1.0)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"got 40960"), answer[:80]
    assert app.processes("web")[0]["protocol_error"] == 0


UPGRADING = """
from longshore.websocket import upgrade
w = Worker("http://127.0.0.1:0", name="web")
async def late(conn, request):
    await asyncio.sleep(0.01)
    conn.send("late " + request.path)
def on_message(conn, request):
    if request.path == "/ws":
        upgrade(conn, request, on_message=lambda c, m: c.send("echo:" + m))
    elif request.path.startswith("/late"):
        return late(conn, request)
    else:
        conn.send("answer " + request.path)
w.on_message = on_message
"""
WS_REQUEST = (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
MASKED_HELLO = bytes([0x81, 0x85, 1, 2, 3, 4]) + bytes(b ^ (1, 2, 3, 4)[i % 4] for i, b in enumerate(b"hello"))


def test_the_101_follows_the_answers_before_it(app_factory):
    app = app_factory(UPGRADING).start()
    sock = connect(app.port())
    sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n" + WS_REQUEST)  # one read: /a's answer is collected first
    answer = _read_for(sock, 1.0)
    assert answer.startswith(b"HTTP/1.1 200 ") and b"answer /a" in answer.split(b"HTTP/1.1 101")[0], answer[:200]


def test_an_upgrade_behind_many_late_answers_reads_its_frames(app_factory):
    app = app_factory(UPGRADING).start()
    sock = connect(app.port())
    sock.sendall(b"".join(b"GET /late%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(50)))
    time.sleep(0.02)
    sock.sendall(WS_REQUEST)
    answer = _read_for(sock, 1.5)
    assert answer.count(b"HTTP/1.1 200 ") == 50 and b"HTTP/1.1 101 " in answer
    sock.sendall(MASKED_HELLO)
    assert b"echo:hello" in _read_for(sock, 1.5)


# -- pause_recv() and the protocol's own flow control ----------------------------------------

PAUSING = """
import socket
from longshore.http import Response, Chunk, HttpProtocol
HttpProtocol.max_owed_answers = 4
w = Worker("http://127.0.0.1:0", name="web")
state = {}

def end_stream(conn):
    state[conn]["stream_ended"] = True
    conn.send(Chunk(b"end"))
    conn.send(Chunk(b""))

def app_resume(conn):
    state[conn]["app_resumed"] = True
    conn.resume_recv()

def on_message(conn, request):
    path, query = request.path, request.query
    seen = state.setdefault(conn, {"stream_ended": False, "app_resumed": False})
    if path == "/stream":  # a chunked answer that ends later: the answers after it are held
        conn.send(Response(b"start", chunked=True))
        Timer.add(float(query["end"]), end_stream, conn, persistent=False)
    elif path == "/big":  # fills the send buffer of a client that does not read yet
        conn.max_send_buffer_size = 1000
        conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        if query.get("pause") == "before":
            conn.pause_recv()
        conn.send(Response(b"b" * (1024 * 1024)))
        Timer.add(float(query["resume"]), app_resume, conn, persistent=False)
    elif path == "/pause":
        if query["when"] == "before":  # the application pauses, then its answer makes the protocol pause
            conn.pause_recv()
            conn.send("paused")
        else:  # the answer makes the protocol pause, then the application pauses too
            conn.send("paused")
            conn.pause_recv()
        Timer.add(float(query["resume"]), app_resume, conn, persistent=False)
    else:
        conn.send(Response(json.dumps(seen), content_type="application/json"))
w.on_message = on_message
"""


def _pipelined(*targets: str) -> bytes:
    """Requests sent in one write; the last one closes the connection."""
    requests = [f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n" for target in targets[:-1]]
    requests.append(f"GET {targets[-1]} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    return "".join(requests).encode()


def _last_json(answer: bytes) -> dict:
    return json.loads(answer[answer.rindex(b"\r\n\r\n") + 4 :])


@pytest.mark.parametrize("when", ["before", "after"])
def test_pause_recv_and_held_answers_each_hold_reading_until_their_own_resume(app_factory, when):
    # /a1 .. /pause: four answers held behind the stream, so the protocol pauses; the
    # application pauses too (before or after that). /next is handed over only once the
    # stream has ended (the protocol's reason) and the application has resumed (its own),
    # whichever of the two comes last.
    app = app_factory(PAUSING).start()
    for stream_end, app_resume in ((0.3, 1.0), (1.0, 0.3)):
        sock = connect(app.port())
        sock.sendall(_pipelined(f"/stream?end={stream_end}", "/a1", "/a2", "/a3", f"/pause?when={when}&resume={app_resume}", "/next"))
        answer = read_until_closed(sock)
        assert answer.count(b"HTTP/1.1 200 ") == 6, answer
        assert b"\r\n3\r\nend\r\n0\r\n\r\n" in answer and answer.count(b"paused") == 1
        assert _last_json(answer) == {"stream_ended": True, "app_resumed": True}, (stream_end, app_resume)


def test_resume_recv_does_not_lift_the_pause_of_a_full_send_buffer(app_factory):
    # The application pauses, then its answer fills the send buffer; its resume_recv()
    # comes while the client still reads nothing. /next waits for the drain: answered
    # into the full buffer, its answer would be dropped and the connection closed.
    app = app_factory(PAUSING).start()
    sock = connect(app.port(), rcvbuf=16 * 1024)
    sock.sendall(_pipelined("/big?pause=before&resume=0.2", "/next"))
    time.sleep(0.6)
    answer = read_until_closed(sock)
    answers = answer.count(b"HTTP/1.1 200 ")
    assert answers == 2, answer[-200:]
    assert _last_json(answer) == {"stream_ended": False, "app_resumed": True}
    assert app.processes("web")[0]["send_fail"] == 0
