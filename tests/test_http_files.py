"""HTTP files, ranges, chunked responses, Server-Sent Events, uploads and sessions, against a
real server with real clients (httpx, curl, raw sockets, a real redis-server)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import time
from email.utils import formatdate

import httpx
import pytest

from conftest import App, connect, wait_for

SERVER = r'''
from longshore.http import (Response, FileResponse, Chunk, EventStream, ServerSentEvent,
                            HttpProtocol, configure_sessions, FileSessionStore, RedisSessionStore)
HttpProtocol.upload_memory_limit = 64 * 1024
HttpProtocol.upload_dir = os.environ.get("UPLOAD_DIR")
TcpConnection.default_max_package_size = 64 * 1024 * 1024
APP_DIR = os.environ["APP_DIR"]
if os.environ.get("REDIS_URL"):
    configure_sessions(RedisSessionStore(os.environ["REDIS_URL"]), cookie_name="SID", lifetime=600)
else:
    configure_sessions(FileSessionStore(os.path.join(APP_DIR, "sessions")), cookie_name="SID", lifetime=600)

web = Worker("http://127.0.0.1:0", name="web")
streams = {}
kept = []

def on_message(conn, request):
    path = request.path
    if path.startswith("/files/"):
        conn.send(FileResponse(os.path.join(APP_DIR, path[7:]), download_name=request.query.get("as")))
    elif path == "/chunked":
        conn.send(Response("first;", chunked=True, content_type="text/plain"))
        for index in range(3):
            conn.send(Chunk(f"part{index};"))
        conn.send(Chunk(b""))
    elif path == "/chunked-later":
        conn.send(Response(chunked=True))
        def more(step=[0]):
            step[0] += 1
            conn.send(Chunk(f"tick{step[0]};") if step[0] <= 3 else Chunk(""))
        for delay in (0.05, 0.1, 0.15, 0.2):
            Timer.add(delay, more, persistent=False)
    elif path == "/sse":
        conn.send(EventStream())
        conn.send(ServerSentEvent("hello", event="greeting", id=1, retry=1500))
        conn.send(ServerSentEvent("two\nlines", id=2))
        conn.send("plain text event")
        Timer.add(0.1, lambda: conn.close(), persistent=False)
    elif path == "/upload":
        files = {
            name: [{"filename": f.filename, "size": f.size, "content_type": f.content_type,
                    "sha256": hashlib.sha256(f.read()).hexdigest(), "on_disk": f.path is not None}
                   for f in request.files.getall(name)]
            for name in request.files
        }
        conn.send(Response(json.dumps({"form": request.form.to_dict(), "files": files}), content_type="application/json"))
    elif path == "/keep-upload":  # the application keeps the request (and its files)
        kept.append(request)
        conn.send(f"kept {request.files['f'].size}")
    elif path == "/session":
        return session_visit(conn, request)
    elif path.startswith("/session-files/"):
        return session_file(conn, request)
    elif path == "/logout":
        return logout(conn, request)
    else:
        conn.send(Response("Not Found", 404))

import hashlib

async def session_visit(conn, request):
    session = await request.session()
    session["visits"] = session.get("visits", 0) + 1
    await session.save()
    conn.send(Response(json.dumps({"id": session.id, "visits": session["visits"], "new": session.is_new}), content_type="application/json"))

async def session_file(conn, request):
    session = await request.session()
    session["seen"] = True
    await session.save()
    conn.send(FileResponse(os.path.join(APP_DIR, request.path[15:])))

async def logout(conn, request):
    session = await request.session()
    await session.destroy()
    conn.send("bye")

web.on_message = on_message
'''


def make_server(folder, env=None) -> tuple[App, int]:
    app = App(folder, SERVER)
    if env:
        app.env.update(env)
    app.start()
    return app, app.port()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("httpfiles")
    (folder / "small.txt").write_text("small file\n")
    (folder / "data.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 123))
    app, port = make_server(folder)
    yield app, port, folder
    app.cli("stop", timeout=30, check=False)
    app.kill_everything()


def url(port: int, path: str) -> str:
    return f"http://127.0.0.1:{port}{path}"


def test_file_download_ranges_and_not_modified(server):
    app, port, folder = server
    data = (folder / "data.bin").read_bytes()
    with httpx.Client() as client:
        small = client.get(url(port, "/files/small.txt"))
        assert small.text == "small file\n"
        assert small.headers["content-type"] == "text/plain; charset=utf-8"
        assert small.headers["accept-ranges"] == "bytes"
        big = client.get(url(port, "/files/data.bin?as=report 1.bin"))
        assert big.status_code == 200 and big.content == data
        assert big.headers["content-disposition"] == "attachment; filename*=UTF-8''report%201.bin"
        # the connection is still good after a streamed file
        assert client.get(url(port, "/files/small.txt")).text == "small file\n"
        last_modified = big.headers["last-modified"]
        not_modified = client.get(url(port, "/files/data.bin"), headers={"If-Modified-Since": last_modified})
        assert not_modified.status_code == 304 and not_modified.content == b""
        older = formatdate(os.stat(folder / "data.bin").st_mtime - 3600, usegmt=True)
        assert client.get(url(port, "/files/data.bin"), headers={"If-Modified-Since": older}).status_code == 200
        tail = client.get(url(port, "/files/data.bin"), headers={"Range": "bytes=-100"})
        assert tail.status_code == 206 and tail.content == data[-100:]
        assert tail.headers["content-range"] == f"bytes {len(data) - 100}-{len(data) - 1}/{len(data)}"
        beyond = client.get(url(port, "/files/data.bin"), headers={"Range": f"bytes={len(data) + 5}-"})
        assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(data)}"
        head = client.head(url(port, "/files/data.bin"))
        assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) == len(data)
        assert client.get(url(port, "/files/missing")).status_code == 404
        assert client.get(url(port, "/files/")).status_code == 404


def test_etag_and_conditional_requests(server):
    app, port, folder = server
    path = folder / "tagged.txt"
    path.write_bytes(b"0123456789" * 30)
    info = os.stat(path)
    with httpx.Client() as client:
        first = client.get(url(port, "/files/tagged.txt"))
        etag = first.headers["etag"]
        assert etag == f'"{info.st_mtime_ns:x}-{info.st_size:x}"'  # strong: size and mtime
        last_modified = first.headers["last-modified"]

        def get(method="GET", **headers):
            return client.request(method, url(port, "/files/tagged.txt"), headers=headers)

        # If-None-Match: 304 with the validators, whatever the list looks like
        for value in (etag, f'"other", {etag}', "*", "W/" + etag):
            answer = get(**{"If-None-Match": value})
            assert answer.status_code == 304 and answer.content == b"", value
            assert answer.headers["etag"] == etag and answer.headers["last-modified"] == last_modified
            assert "content-length" not in answer.headers
        assert get("HEAD", **{"If-None-Match": etag}).status_code == 304
        assert get(**{"If-None-Match": '"other"'}).status_code == 200
        # ... and it outranks If-Modified-Since, either way
        assert get(**{"If-None-Match": '"other"', "If-Modified-Since": last_modified}).status_code == 200
        assert get(**{"If-None-Match": etag, "If-Modified-Since": formatdate(info.st_mtime - 3600, usegmt=True)}).status_code == 304
        # a method that changes things gets 412 instead of 304
        assert get("POST", **{"If-None-Match": etag}).status_code == 412
        # If-Match and If-Unmodified-Since
        assert get(**{"If-Match": '"other"'}).status_code == 412
        assert get(**{"If-Match": "W/" + etag}).status_code == 412  # strong comparison
        assert get(**{"If-Match": etag}).content == path.read_bytes()
        assert get(**{"If-Unmodified-Since": formatdate(info.st_mtime - 3600, usegmt=True)}).status_code == 412
        assert get(**{"If-Unmodified-Since": last_modified}).status_code == 200
        # If-Range: the range only for the current version of the file
        for validator in (etag, last_modified):
            part = get(Range="bytes=10-19", **{"If-Range": validator})
            assert part.status_code == 206 and part.content == b"0123456789"
        for validator in ('"other"', "W/" + etag, formatdate(info.st_mtime - 3600, usegmt=True)):
            whole = get(Range="bytes=10-19", **{"If-Range": validator})
            assert whole.status_code == 200 and whole.content == path.read_bytes(), validator
        # a HEAD ignores Range
        assert get("HEAD", Range="bytes=10-19").status_code == 200
        # the file changes: a new tag, the old one no longer matches
        path.write_bytes(b"changed" * 40)
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 5_000_000_000))
        changed = get(**{"If-None-Match": etag})
        assert changed.status_code == 200 and changed.content == b"changed" * 40
        assert changed.headers["etag"] != etag
        assert get(Range="bytes=0-6", **{"If-Range": etag}).status_code == 200
        assert get(Range="bytes=0-6", **{"If-Range": changed.headers["etag"]}).content == b"changed"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_revalidates_with_its_saved_etag(server, tmp_path):
    app, port, folder = server
    saved = tmp_path / "etag"
    out = tmp_path / "out"
    command = ["curl", "-s", "-o", str(out), "-w", "%{http_code}", url(port, "/files/small.txt")]
    assert subprocess.run([*command, "--etag-save", str(saved)], capture_output=True, text=True, timeout=30).stdout == "200"
    assert saved.read_text().strip().startswith('"')
    assert subprocess.run([*command, "--etag-compare", str(saved)], capture_output=True, text=True, timeout=30).stdout == "304"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_ranges_and_upload(server, tmp_path):
    app, port, folder = server
    data = (folder / "data.bin").read_bytes()
    out = tmp_path / "part"
    result = subprocess.run(["curl", "-s", "-r", "1000-200999", "-o", str(out), "-w", "%{http_code}", url(port, "/files/data.bin")], capture_output=True, text=True, timeout=30)
    assert result.stdout == "206"
    assert out.read_bytes() == data[1000:201000]
    result = subprocess.run(["curl", "-s", "-r", "3145000-", "-o", str(out), "-w", "%{http_code}", url(port, "/files/data.bin")], capture_output=True, text=True, timeout=30)
    assert result.stdout == "206" and out.read_bytes() == data[3145000:]
    # a multipart upload: a big file goes to a temporary file, a small one stays in memory
    small = tmp_path / "note.txt"
    small.write_text("hi there")
    result = subprocess.run(
        ["curl", "-s", "-F", f"big=@{folder / 'data.bin'};type=application/x-data", "-F", f"small=@{small}", "-F", "title=Hello wörld", url(port, "/upload")],
        capture_output=True, text=True, timeout=30,
    )
    answer = json.loads(result.stdout)
    assert answer["form"] == {"title": "Hello wörld"}
    big = answer["files"]["big"][0]
    assert big == {"filename": "data.bin", "size": len(data), "content_type": "application/x-data", "sha256": hashlib.sha256(data).hexdigest(), "on_disk": True}
    assert answer["files"]["small"][0]["on_disk"] is False
    assert answer["files"]["small"][0]["sha256"] == hashlib.sha256(b"hi there").hexdigest()


def test_httpx_upload_and_malformed_multipart(server):
    app, port, folder = server
    with httpx.Client() as client:
        answer = client.post(url(port, "/upload"), data={"a": "1"}, files={"f": ("x.bin", b"\x00" * 1000, "application/octet-stream")}).json()
        assert answer["form"] == {"a": "1"} and answer["files"]["f"][0]["size"] == 1000
        bad = client.post(url(port, "/upload"), content=b"no boundary", headers={"Content-Type": "multipart/form-data"})
        assert bad.status_code == 400


def test_chunked_response_and_server_sent_events(server):
    app, port, folder = server
    with httpx.Client() as client:
        response = client.get(url(port, "/chunked"))
        assert response.headers["transfer-encoding"] == "chunked"
        assert response.text == "first;part0;part1;part2;"
        later = client.get(url(port, "/chunked-later"))
        assert later.text == "tick1;tick2;tick3;"
        assert client.get(url(port, "/files/small.txt")).text == "small file\n"
        with client.stream("GET", url(port, "/sse")) as events:
            assert events.headers["content-type"] == "text/event-stream"
            assert events.headers["cache-control"] == "no-cache"
            body = b"".join(events.iter_bytes())
    assert body == (
        b"event: greeting\nid: 1\nretry: 1500\ndata: hello\n\n"
        b"id: 2\ndata: two\ndata: lines\n\n"
        b"data: plain text event\n\n"
    )
    # HTTP/1.0 gets the chunked body unframed, ended by the close
    sock = connect(port)
    sock.sendall(b"GET /chunked HTTP/1.0\r\n\r\n")
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and body == b"first;part0;part1;part2;"


def test_pipelined_request_waits_behind_a_streamed_file(server):
    app, port, folder = server
    data = (folder / "data.bin").read_bytes()
    sock = connect(port)
    sock.sendall(b"GET /files/data.bin HTTP/1.1\r\n\r\nGET /chunked HTTP/1.1\r\n\r\nGET /files/small.txt HTTP/1.1\r\nConnection: close\r\n\r\n")
    received = b""
    sock.settimeout(10)
    while chunk := sock.recv(1 << 20):
        received += chunk
    first_head, _, rest = received.partition(b"\r\n\r\n")
    assert first_head.startswith(b"HTTP/1.1 200 OK")
    assert rest[: len(data)] == data
    rest = rest[len(data) :]
    assert rest.startswith(b"HTTP/1.1 200 OK") and b"0\r\n\r\nHTTP/1.1 200 OK" in rest
    assert rest.endswith(b"small file\n")


def test_large_file_to_a_slow_reader_keeps_memory_bounded(tmp_path):
    size = 64 * 1024 * 1024
    with open(tmp_path / "large.bin", "wb") as file:
        file.truncate(size)  # sparse: cheap to make, read as zeros
    app, port = make_server(tmp_path)
    try:
        before = app.processes("web")[0]["memory"]
        sock = connect(port, rcvbuf=64 * 1024)
        sock.sendall(b"GET /files/large.bin HTTP/1.1\r\n\r\n")
        received = 0
        peak = before
        started = time.monotonic()
        last_check = 0.0
        while received < size + 100:
            chunk = sock.recv(256 * 1024)
            if not chunk:
                break
            received += len(chunk)
            if received < 16 * 1024 * 1024:
                time.sleep(0.002)  # slow at first, while memory is watched
            if time.monotonic() - last_check > 0.25:
                last_check = time.monotonic()
                peak = max(peak, app.processes("web")[0]["memory"])
            if received >= size and time.monotonic() - started > 0:
                break
        assert received >= size
        peak = max(peak, app.processes("web")[0]["memory"])
        assert peak - before < 8 * 1024 * 1024, (before, peak)
    finally:
        app.cli("stop", timeout=30, check=False)
        app.kill_everything()


def _session_round_trip(port: int) -> None:
    with httpx.Client() as client:
        first = client.get(url(port, "/session"))
        cookie = first.headers["set-cookie"]
        assert cookie.startswith("SID=") and "HttpOnly" in cookie and "Max-Age=600" in cookie
        assert first.json()["visits"] == 1 and first.json()["new"] is True
        second = client.get(url(port, "/session")).json()
        assert second == {"id": first.json()["id"], "visits": 2, "new": False}
        third = client.get(url(port, "/session"))
        # each save keeps the session for another lifetime: the cookie goes out again with it
        assert third.headers["set-cookie"].startswith(f"SID={first.json()['id']};") and "Max-Age=600" in third.headers["set-cookie"]
        bye = client.get(url(port, "/logout"))
        assert "Max-Age=0" in bye.headers["set-cookie"]
        client.cookies.clear()
        client.cookies.set("SID", first.json()["id"])
        assert client.get(url(port, "/session")).json()["visits"] == 1
    with httpx.Client() as other:
        assert other.get(url(port, "/session")).json()["visits"] == 1


def test_sessions_in_files(server):
    app, port, folder = server
    _session_round_trip(port)
    assert any(name.startswith("sess_") for name in os.listdir(folder / "sessions"))


def test_a_new_session_cookie_goes_with_every_kind_of_file_answer(server):
    app, port, folder = server
    cases = [
        (b"/session-files/small.txt", b"", b"HTTP/1.1 200 OK"),
        (b"/session-files/missing.txt", b"", b"HTTP/1.1 404 "),
        (b"/session-files/small.txt", b"Range: bytes=99-\r\n", b"HTTP/1.1 416 "),
        (b"/session-files/small.txt", b'If-Match: "other"\r\n', b"HTTP/1.1 412 "),
    ]
    for path, header, status in cases:
        sock = connect(port)
        sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + header + b"Connection: close\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        head = received.partition(b"\r\n\r\n")[0]
        assert head.startswith(status), (path, header, head)
        assert b"\r\nSet-Cookie: SID=" in head, (path, header, head)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_sessions_in_redis(tmp_path):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    redis_port = probe.getsockname()[1]
    probe.close()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    app = None
    try:
        wait_for(lambda: _can_connect(redis_port), what="redis-server")
        app, port = make_server(tmp_path, {"REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"})
        _session_round_trip(port)
        import redis as redis_client

        keys = redis_client.Redis(port=redis_port).keys("longshore:session:*")
        assert len(keys) == 2
    finally:
        if app is not None:
            app.cli("stop", timeout=30, check=False)
            app.kill_everything()
        redis.terminate()
        redis.wait(10)


SESSIONS = r'''
from longshore.http import Response, configure_sessions, FileSessionStore
if os.environ.get("SESSION_DIR"):
    sweeps = {"gc_interval": float(os.environ["GC_INTERVAL"])} if os.environ.get("GC_INTERVAL") else {}
    configure_sessions(FileSessionStore(os.environ["SESSION_DIR"], **sweeps), lifetime=int(os.environ.get("LIFETIME", "600")))
if os.environ.get("STALE_TEMPORARY"):
    FileSessionStore.STALE_TEMPORARY = float(os.environ["STALE_TEMPORARY"])
web = Worker("http://127.0.0.1:0", name="web", user=os.environ.get("WORKER_USER") or None)

async def on_message(conn, request):
    path = request.path
    if path == "/cookie-set":
        response = Response("set")
        for index, value in enumerate(json.loads(request.query["values"])):
            response.set_cookie(f"c{index}", value)
        conn.send(response)
        return
    if path == "/cookie-get":
        conn.send(json.dumps(request.cookies))
        return
    try:
        session = await request.session()
        if path == "/visit":
            session["visits"] = session.get("visits", 0) + 1
            await session.save()
        elif path == "/peek":
            pass
        elif path == "/logout":  # an application that saves at the end of every request
            await session.destroy()
            await session.save()
        elif path == "/logout-then-flash":
            await session.destroy()
            session["flash"] = "bye"
            await session.save()
        elif path == "/unserialisable":
            session["tags"] = {"a", "b"}
            await session.save()
    except Exception as exc:
        conn.send(Response(f"{type(exc).__name__}: {exc}", 500))
        return
    conn.send(Response(json.dumps({"id": session.id, "new": session.is_new, "data": dict(session), "pid": os.getpid()}), content_type="application/json"))

web.on_message = on_message
'''


def _session_app(app_factory, **env: str):
    app = app_factory(SESSIONS)
    app.env.update(env)
    app.start()
    return app, app.port()


def test_the_default_session_folder_is_private_to_the_application(app_factory):
    app, port = _session_app(app_factory)
    with httpx.Client() as client:
        visit = client.get(url(port, "/visit")).json()
        assert client.get(url(port, "/visit")).json()["data"] == {"visits": 2}
    folder = app.folder / ".longshore" / "start.sessions"
    assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700
    files = os.listdir(folder)
    assert files == [f"sess_{visit['id']}.json"]
    assert stat.S_IMODE(os.stat(folder / files[0]).st_mode) == 0o600


@pytest.mark.parametrize("kind", ["symlink", "open-mode"])
def test_a_session_folder_others_could_reach_is_refused(app_factory, tmp_path, kind):
    app = app_factory(SESSIONS)
    folder = app.folder / ".longshore" / "start.sessions"
    folder.parent.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    if kind == "symlink":
        folder.symlink_to(elsewhere)
    else:
        folder.mkdir()
        folder.chmod(0o777)
    app.start()
    answer = httpx.get(url(app.port(), "/visit"))
    assert answer.status_code == 500 and "PermissionError" in answer.text and "refusing" in answer.text, answer.text
    assert os.listdir(elsewhere) == [] and os.listdir(folder) == []


def test_a_symlink_planted_where_a_session_is_written_is_not_followed(app_factory, tmp_path):
    folder = tmp_path / "sessions"
    app, port = _session_app(app_factory, SESSION_DIR=str(folder))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    with httpx.Client() as client:
        first = client.get(url(port, "/visit")).json()
        os.symlink(victim, folder / f"sess_{first['id']}.json.{first['pid']}.tmp")  # the temporary name once used
        assert client.get(url(port, "/visit")).json()["data"] == {"visits": 2}
    assert victim.read_text() == "precious\n"
    assert not os.path.islink(folder / f"sess_{first['id']}.json")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching the workers' user needs root")
def test_workers_running_as_another_user_get_the_default_session_folder(app_factory, tmp_path_factory):
    import pwd

    nobody = pwd.getpwnam("nobody")
    app = app_factory(SESSIONS)
    app.env["WORKER_USER"] = "nobody"
    # nobody must be able to pass through the test's folders (pytest makes them 0700)
    passages = [folder for folder in [app.folder, *app.folder.parents] if str(folder).startswith(str(tmp_path_factory.getbasetemp().parent))]
    modes = {folder: stat.S_IMODE(folder.stat().st_mode) for folder in passages}
    try:
        for folder, mode in modes.items():
            folder.chmod(mode | 0o011)
        app.start()
        with httpx.Client() as client:
            visit = client.get(url(app.port(), "/visit")).json()
            assert client.get(url(app.port(), "/visit")).json()["data"] == {"visits": 2}, visit
    finally:
        for folder, mode in modes.items():
            folder.chmod(mode)
    folder = app.folder / ".longshore" / "start.sessions"
    found = os.lstat(folder)
    assert (found.st_uid, stat.S_IMODE(found.st_mode)) == (nobody.pw_uid, 0o700)
    assert os.stat(folder / f"sess_{visit['id']}.json").st_uid == nobody.pw_uid


def test_expired_sessions_and_stale_temporary_files_are_collected(app_factory, tmp_path):
    folder = tmp_path / "sessions"
    app, port = _session_app(app_factory, SESSION_DIR=str(folder), LIFETIME="1", GC_INTERVAL="0.5", STALE_TEMPORARY="0.5")
    for _ in range(20):
        assert httpx.get(url(port, "/visit")).status_code == 200
    (folder / "sess_left.over.tmp").write_text("{")  # as a crash in the middle of a save leaves it
    time.sleep(1.2)
    with httpx.Client() as client:
        alive = client.get(url(port, "/visit")).json()["id"]
        wait_for(lambda: os.listdir(folder) == [f"sess_{alive}.json"], timeout=5, what=f"a sweep of {folder}")
        assert client.get(url(port, "/visit")).json()["data"] == {"visits": 2}


def test_an_active_session_cookie_is_sent_again_with_each_save(app_factory, tmp_path):
    app, port = _session_app(app_factory, SESSION_DIR=str(tmp_path / "sessions"), LIFETIME="2")
    jar = tmp_path / "jar"
    for step in range(3):  # curl drops the cookie after its Max-Age, as a browser does
        out = subprocess.run(["curl", "-s", "-i", "-c", jar, "-b", jar, url(port, "/visit")], capture_output=True, text=True, check=True).stdout
        body = json.loads(out.splitlines()[-1])
        assert body["data"] == {"visits": step + 1}, (step, out)
        assert f"Set-Cookie: LONGSHORE_SESSION={body['id']}; Max-Age=2;" in out
        time.sleep(1.2)
    assert "Set-Cookie" not in subprocess.run(["curl", "-s", "-i", "-b", jar, url(port, "/peek")], capture_output=True, text=True).stdout


def test_saving_a_destroyed_session_does_not_bring_its_id_back(app_factory, tmp_path):
    folder = tmp_path / "sessions"
    app, port = _session_app(app_factory, SESSION_DIR=str(folder))
    with httpx.Client() as client:
        old = client.get(url(port, "/visit")).json()["id"]
        bye = client.get(url(port, "/logout"))
        assert "Max-Age=0" in bye.headers["set-cookie"] and os.listdir(folder) == []
    with httpx.Client(cookies={"LONGSHORE_SESSION": old}) as client:
        again = client.get(url(port, "/peek")).json()
        assert again["new"] is True and again["id"] != old
        flash = client.get(url(port, "/logout-then-flash"))
        fresh = flash.json()
        assert fresh["id"] != old and fresh["data"] == {"flash": "bye"}
        assert flash.headers["set-cookie"].startswith(f"LONGSHORE_SESSION={fresh['id']};")
    assert os.listdir(folder) == [f"sess_{fresh['id']}.json"]


def test_a_session_id_must_match_exactly(app_factory, tmp_path):
    folder = tmp_path / "sessions"
    app, port = _session_app(app_factory, SESSION_DIR=str(folder))
    known = httpx.get(url(port, "/visit")).json()["id"]
    with open(folder / f"sess_{known}\n.json", "w") as file:
        json.dump({"expires": time.time() + 600, "data": {"planted": True}}, file)
    answer = httpx.get(url(port, "/peek"), headers={"Cookie": f"LONGSHORE_SESSION={known}%0A"}).json()
    assert answer["new"] is True and answer["id"] != known and answer["data"] == {}


def test_a_failed_session_save_leaves_no_temporary_file(app_factory, tmp_path):
    folder = tmp_path / "sessions"
    app, port = _session_app(app_factory, SESSION_DIR=str(folder))
    kept = httpx.get(url(port, "/visit")).json()["id"]
    answer = httpx.get(url(port, "/unserialisable"))
    assert answer.status_code == 500 and "TypeError" in answer.text
    assert os.listdir(folder) == [f"sess_{kept}.json"]


def test_cookie_values_come_back_as_they_were_set(app_factory):
    app, port = _session_app(app_factory)
    values = ["plain", "a b;c", "100%", "a%41b", "x%2Fy", "%", "%%25"]
    with httpx.Client() as client:
        client.get(url(port, "/cookie-set"), params={"values": json.dumps(values)})
        back = client.get(url(port, "/cookie-get")).json()
    assert [back.get(f"c{index}") for index in range(len(values))] == values


def _can_connect(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_graceful_stop_closes_idle_keep_alive_connections_and_finishes_answers(tmp_path):
    (tmp_path / "big.bin").write_bytes(os.urandom(16 * 1024 * 1024))
    app, port = make_server(tmp_path)
    try:
        idle = connect(port)
        idle.sendall(b"GET /files/missing HTTP/1.1\r\n\r\n")
        assert idle.recv(65536).startswith(b"HTTP/1.1 404")
        busy = connect(port, rcvbuf=64 * 1024)
        # a pipelined answer waits behind the file: it is owed too
        busy.sendall(b"GET /files/big.bin HTTP/1.1\r\n\r\nGET /files/missing HTTP/1.1\r\n\r\n")
        first = busy.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 OK")
        started = time.monotonic()
        stopper = subprocess.Popen([__import__("sys").executable, str(app.script), "stop", "-g"], cwd=app.folder, env=app.env)
        idle.settimeout(5)
        assert idle.recv(100) == b""  # closed at once
        received = first
        busy.settimeout(10)
        while chunk := busy.recv(1 << 20):
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        assert b"Connection: close" not in head  # the head went out before the stop
        big = (tmp_path / "big.bin").read_bytes()
        assert body[: len(big)] == big
        second_head, _, second_body = body[len(big) :].partition(b"\r\n\r\n")
        assert second_head.startswith(b"HTTP/1.1 404") and b"Connection: close" in second_head
        assert second_body == b"Not Found\n"
        assert stopper.wait(20) == 0
        assert time.monotonic() - started < 8
    finally:
        app.kill_everything()


def test_graceful_stop_lets_a_request_body_still_arriving_finish(tmp_path):
    app, port = make_server(tmp_path)
    try:
        sock = connect(port)
        sock.sendall(b"GET /files/missing HTTP/1.1\r\n\r\n")  # the connection has answered before
        assert sock.recv(65536).startswith(b"HTTP/1.1 404")
        sock.sendall(b"POST /upload HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 8\r\n\r\na=1")
        time.sleep(0.2)
        stopper = subprocess.Popen([__import__("sys").executable, str(app.script), "stop", "-g"], cwd=app.folder, env=app.env)
        time.sleep(1.0)  # the worker stops gracefully while the body is half there
        sock.sendall(b"&b=22")
        received = b""
        sock.settimeout(10)
        while chunk := sock.recv(65536):
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in head, received
        assert json.loads(body)["form"] == {"a": "1", "b": "22"}
        assert stopper.wait(20) == 0
    finally:
        app.kill_everything()


def test_upload_files_go_with_an_aborted_request_and_with_the_worker(tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    app, port = make_server(tmp_path, {"UPLOAD_DIR": str(uploads)})
    try:
        boundary = b"XyZbound"
        body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="f"; filename="a.bin"\r\n\r\n'
                + b"x" * 2_000_000 + b"\r\n--" + boundary + b"--\r\n")
        def head(path: bytes) -> bytes:
            return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=" + boundary
                    + b"\r\nContent-Length: %d\r\n\r\n" % len(body))
        # the client goes away in the middle of the upload: its temporary file goes too
        aborted = connect(port)
        aborted.sendall(head(b"/upload") + body[:1_000_000])
        wait_for(lambda: os.listdir(uploads), what="the upload on disk")
        aborted.close()
        wait_for(lambda: not os.listdir(uploads), timeout=3, what="the aborted upload's file removed")
        # a request the application keeps: its file lives on, until the worker ends
        kept = connect(port)
        kept.sendall(head(b"/keep-upload") + body)
        assert kept.recv(65536).endswith(b"kept 2000000")
        kept.close()
        time.sleep(0.3)
        assert len(os.listdir(uploads)) == 1
        app.cli("stop", timeout=30)
        assert os.listdir(uploads) == []
    finally:
        app.kill_everything()
