"""Callbacks: exceptions, coroutines and their ordering, timers, outgoing connections, pipes."""

from __future__ import annotations

import socket
import threading
import time

from conftest import connect, is_closed, read_lines, wait_for


def test_exception_in_a_callback_is_logged_counted_and_the_worker_goes_on(app_factory):
    app = app_factory(
        """
w = Worker("text://127.0.0.1:0", name="faulty")

def on_message(conn, line):
    if line == "raise":
        raise KeyError("user bug")
    conn.send(line)

w.on_message = on_message
"""
    ).start()
    pid = app.processes()[0]["pid"]
    other = connect(app.port())
    sock = connect(app.port())
    sock.sendall(b"raise\nafter\n")
    assert read_lines(sock, 1) == ["after"]  # the same connection keeps working
    other.sendall(b"other\n")
    assert read_lines(other, 1) == ["other"]
    wait_for(lambda: app.processes()[0]["throw_exception"] == 1, what="throw_exception counted")
    assert app.processes()[0]["pid"] == pid
    log = app.log()
    assert "exception in on_message" in log and "KeyError: 'user bug'" in log and "Traceback" in log
    assert "exceptions" in app.cli("status").stdout


def test_coroutine_callbacks_keep_the_order_of_one_connection(app_factory):
    app = app_factory(
        """
import random
w = Worker("text://127.0.0.1:0", name="async")
events = []

async def on_connect(conn):
    await asyncio.sleep(0.05)
    conn.send("connected")

async def on_message(conn, line):
    await asyncio.sleep(random.random() / 100)
    if line == "fail":
        raise ValueError("async failure")
    conn.send("got " + line)

def on_close(conn):
    with open(os.path.join(os.environ["APP_DIR"], "closed.txt"), "a") as f:
        f.write("closed\\n")

w.on_connect = on_connect
w.on_message = on_message
w.on_close = on_close
"""
    ).start()
    sock = connect(app.port())
    lines = [str(i) for i in range(200)]
    sock.sendall(("\n".join(lines[:100]) + "\nfail\n" + "\n".join(lines[100:]) + "\n").encode())
    answers = read_lines(sock, 201, timeout=20)
    assert answers == ["connected"] + [f"got {i}" for i in lines]
    wait_for(lambda: app.processes()[0]["throw_exception"] == 1, what="the async exception counted")
    sock.close()
    wait_for(lambda: (app.folder / "closed.txt").exists(), what="on_close")


def test_timers_in_workers_one_shot_and_persistent(app_factory):
    app = app_factory(
        """
w = Worker(None, name="ticker")
ticks = {"n": 0}
path = os.path.join(os.environ["APP_DIR"], "ticks.txt")

def tick():
    ticks["n"] += 1
    if ticks["n"] == 5:
        Timer.delete(ticks["id"])
        with open(path, "w") as f:
            f.write(f"{ticks['n']} {Timer.count()}")

def once(word):
    with open(path + ".once", "w") as f:
        f.write(word)

def on_worker_start(worker):
    ticks["id"] = Timer.add(0.05, tick)
    Timer.add(0.1, once, "hello", persistent=False)
    Timer.add(60, lambda: None)

w.on_worker_start = on_worker_start
"""
    ).start()
    wait_for(lambda: (app.folder / "ticks.txt").exists(), what="five ticks")
    assert (app.folder / "ticks.txt").read_text() == "5 1"
    assert (app.folder / "ticks.txt.once").read_text() == "hello"
    wait_for(lambda: app.processes()[0]["timers"] == 1, what="one timer left in status")


def test_outgoing_connection_connect_fail_and_pipe_proxy(app_factory):
    # A closed port for CONNECT_FAIL.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed_port = probe.getsockname()[1]
    probe.close()
    app = app_factory(
        f"""
backend = Worker("text://127.0.0.1:0", name="backend")
backend.on_message = lambda conn, line: conn.send("backend " + line)

proxy = Worker("tcp://127.0.0.1:0", name="proxy")
path = os.path.join(os.environ["APP_DIR"], "connect.txt")

def on_worker_start(worker):
    failing = AsyncTcpConnection("text://127.0.0.1:{closed_port}")
    def on_error(conn, code, message):
        with open(path, "w") as f:
            f.write(f"{{code}} {{message}}")
    failing.on_error = on_error
    failing.connect()

def on_connect(conn):
    listen = [w for w in Worker._all if w.name == "backend"][0].bound_listen
    upstream = AsyncTcpConnection("tcp://" + listen.split("://")[1])
    conn.pipe(upstream)
    upstream.pipe(conn)
    upstream.on_close = lambda c: conn.close()
    conn.on_close = lambda c: upstream.close()
    upstream.connect()

proxy.on_worker_start = on_worker_start
proxy.on_connect = on_connect
"""
    ).start()
    wait_for(lambda: (app.folder / "connect.txt").exists(), what="CONNECT_FAIL")
    code, message = (app.folder / "connect.txt").read_text().split(" ", 1)
    assert code == "1" and "failed" in message
    sock = connect(app.port(1))
    sock.sendall(b"through the proxy\n")  # sent before the upstream is connected: it waits
    assert read_lines(sock, 1) == ["backend through the proxy"]
    big = b"y" * 5_000_000 + b"\n"
    received = []

    def reader() -> None:
        received.extend(read_lines(sock, 1, timeout=30))

    thread = threading.Thread(target=reader)
    thread.start()
    sock.sendall(big)
    thread.join(timeout=30)
    assert received == ["backend " + "y" * 5_000_000]
    proxy = next(p for p in app.processes() if p["name"] == "proxy")
    assert proxy["send_fail"] == 0
    sock.close()


def test_timers_in_the_master(app_factory):
    app = app_factory(
        """
w = Worker(None, name="idle")
path = os.path.join(os.environ["APP_DIR"], "master-ticks.txt")

def tick():
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\\n")

def on_master_start():
    Timer.add(0.1, tick)

Worker.on_master_start = on_master_start
"""
    ).start()
    path = app.folder / "master-ticks.txt"
    wait_for(lambda: path.exists() and len(path.read_text().split()) >= 3, what="three master ticks")
    assert set(path.read_text().split()) == {str(app.master_pid())}


def test_pause_recv_in_on_connect_holds_the_data_until_resume(app_factory):
    app = app_factory(
        """
w = Worker("text://127.0.0.1:0", name="paused")

def on_connect(conn):
    conn.pause_recv()
    Timer.add(1.0, conn.resume_recv, persistent=False)
    conn.started = time.monotonic()

def on_message(conn, line):
    conn.send(f"{time.monotonic() - conn.started:.2f} {line}")

w.on_connect = on_connect
w.on_message = on_message
"""
    ).start()
    sock = connect(app.port())
    sock.sendall(b"early\n")
    waited, line = read_lines(sock, 1)[0].split(" ")
    assert line == "early"
    assert float(waited) >= 0.9  # read only once resume_recv ran


def test_async_answer_reaches_a_client_that_half_closed(app_factory):
    app = app_factory(
        """
w = Worker("text://127.0.0.1:0", name="halfclose")

async def on_message(conn, line):
    await asyncio.sleep(0.2)
    conn.send("echo " + line)

w.on_message = on_message
"""
    ).start()
    sock = connect(app.port())
    sock.sendall(b"one\ntwo\n")
    sock.shutdown(socket.SHUT_WR)  # done sending; still reading
    assert read_lines(sock, 2) == ["echo one", "echo two"]
    assert is_closed(sock)  # then the server closes its side
    assert app.processes()[0]["send_fail"] == 0


def test_stop_cancels_coroutines_of_timers_and_hooks(app_factory):
    app = app_factory(
        """
w = Worker(None, name="busy", reloadable=False)
events = os.path.join(os.environ["APP_DIR"], "events.txt")

def note(text):
    with open(events, "a") as f:
        f.write(text + "\\n")

async def wait_long(name):
    note(f"{name} waits")
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        note(f"{name} cancelled")
        raise

w.on_worker_start = lambda worker: Timer.add(0.1, wait_long, "timer", persistent=False)
w.on_worker_reload = lambda worker: wait_long("reload hook")
"""
    ).start()
    events = app.folder / "events.txt"
    wait_for(lambda: events.exists() and "timer waits" in events.read_text(), what="the timer's coroutine")
    app.cli("reload")  # reloadable=False: only on_worker_reload runs
    wait_for(lambda: "reload hook waits" in events.read_text(), what="the reload hook's coroutine")
    started = time.monotonic()
    app.cli("stop")
    assert time.monotonic() - started < 5
    assert sorted(events.read_text().split("\n")[2:]) == ["", "reload hook cancelled", "timer cancelled"]


def test_stop_cancels_a_waiting_coroutine_callback_and_still_calls_on_close(app_factory):
    app = app_factory(
        """
w = Worker("text://127.0.0.1:0", name="waiting", stop_timeout=2)
events = os.path.join(os.environ["APP_DIR"], "events.txt")

def note(text):
    with open(events, "a") as f:
        f.write(text + "\\n")

async def on_message(conn, line):
    note(f"{line} waits")
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        note(f"{line} cancelled")
        raise

w.on_message = on_message
w.on_close = lambda conn: note("on_close")
"""
    ).start()
    events = app.folder / "events.txt"
    sock = connect(app.port())
    sock.sendall(b"first\n")
    wait_for(lambda: events.exists() and "first waits" in events.read_text(), what="the first message's coroutine")
    sock.sendall(b"second\n")  # queued behind the first: dropped at the stop
    time.sleep(0.2)
    started = time.monotonic()
    app.cli("stop")
    assert time.monotonic() - started < 5
    assert events.read_text().split("\n") == ["first waits", "first cancelled", "on_close", ""]
    assert is_closed(sock)
