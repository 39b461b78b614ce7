"""The send buffer contract, end to end: send_fail, dropping, buffer full/drain, close."""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
import time

import pytest

from conftest import connect, paced_producer, read_lines, read_until_closed, wait_for

RECORDER = """
RESULTS = os.path.join(os.environ["APP_DIR"], "results.json")
results = {"send": [], "errors": [], "closed": 0}

def save():
    with open(RESULTS + ".tmp", "w") as f:
        json.dump(results, f)
    os.replace(RESULTS + ".tmp", RESULTS)
"""


def test_send_to_a_client_that_disconnected_counts_send_fail(app_factory):
    app = app_factory(
        RECORDER
        + """
w = Worker("text://127.0.0.1:0", name="push")

def push(conn):
    results["send"].append(conn.send("too late"))
    save()

def on_message(conn, line):
    Timer.add(0.5, push, conn, persistent=False)
    conn.send("ok")

def on_error(conn, code, message):
    results["errors"].append([code, message])
    save()

w.on_message = on_message
w.on_error = on_error
"""
    ).start()
    port = app.port()
    sock = connect(port)
    sock.sendall(b"push me later\n")
    assert read_lines(sock, 1) == ["ok"]
    sock.close()
    wait_for(lambda: (app.folder / "results.json").exists() and app.read_json("results.json")["send"], what="the late send")
    assert app.read_json("results.json")["send"] == [False]
    wait_for(lambda: app.status()["processes"][0]["send_fail"] == 1, what="send_fail == 1 in status")
    assert app.status()["summary"]["send_fail"] == 1


def test_slow_reader_is_dropped_and_counted_while_a_reading_client_loses_nothing(app_factory):
    chunk_size = 16 * 1024
    chunks = 1000  # 16 MB each, paced by a timer
    app = app_factory(
        RECORDER
        + f"""
w = Worker("text://127.0.0.1:0", name="stream")
CHUNK = {chunk_size}
CHUNKS = {chunks}
streams = {{}}

def tick():
    for conn, state in list(streams.items()):
        for _ in range(4):
            if state["n"] >= CHUNKS:
                del streams[conn]
                results["done"] = results.get("done", 0) + 1
                save()
                break
            payload = (b"%08d" % state["n"]) + b"x" * (CHUNK - 9)
            ok = conn.send(payload)
            state["accepted" if ok is not False else "dropped"] += 1
            results.setdefault(state["name"], {{}})
            results[state["name"]] = {{"accepted": state["accepted"], "dropped": state["dropped"]}}
            state["n"] += 1

def on_worker_start(worker):
    Timer.add(0.004, tick)

def on_message(conn, line):
    streams[conn] = {{"n": 0, "accepted": 0, "dropped": 0, "name": line}}

def on_error(conn, code, message):
    results["errors"].append([code, message])

def on_buffer_full(conn):
    results["full"] = results.get("full", 0) + 1

w.on_worker_start = on_worker_start
w.on_message = on_message
w.on_error = on_error
w.on_buffer_full = on_buffer_full
"""
    ).start()
    port = app.port()
    stalled = connect(port, rcvbuf=4096)
    reader = connect(port, timeout=30)
    received = bytearray()

    def read_all() -> None:
        expected = chunk_size * chunks
        while len(received) < expected:
            data = reader.recv(1 << 20)
            if not data:
                break
            received.extend(data)

    thread = threading.Thread(target=read_all)
    thread.start()
    stalled.sendall(b"stalled\n")
    reader.sendall(b"reader\n")
    wait_for(lambda: app.read_json("results.json").get("done") == 2 if (app.folder / "results.json").exists() else False, timeout=60, what="both streams produced")
    thread.join(timeout=30)
    results = app.read_json("results.json")
    # The reading client: every chunk accepted and delivered, in order.
    assert results["reader"] == {"accepted": chunks, "dropped": 0}
    assert len(received) == chunk_size * chunks
    for index in (0, chunks // 2, chunks - 1):
        assert received[index * chunk_size : index * chunk_size + 8] == b"%08d" % index
    # The stalled client: buffered up to 1 MiB (plus what the kernel holds), then dropped.
    stalled_result = results["stalled"]
    assert stalled_result["dropped"] > 0
    assert stalled_result["accepted"] * chunk_size < 1024 * 1024 + 8 * 1024 * 1024
    send_fail_errors = [e for e in results["errors"] if e[0] == 2]
    assert len(send_fail_errors) == stalled_result["dropped"]
    assert send_fail_errors[0][1] == "send buffer full and drop package"
    assert results["full"] >= 1
    wait_for(lambda: app.status()["processes"][0]["send_fail"] == stalled_result["dropped"], what="status send_fail")
    stalled.close()
    reader.close()


def test_buffer_full_and_drain_pace_a_large_transfer(app_factory):
    total = 64 * 1024 * 1024
    app = app_factory(paced_producer(total, 256 * 1024, name="bulk")).start()
    port = app.port()
    memory_before = app.processes()[0]["memory"]
    sock = connect(port, timeout=30, rcvbuf=64 * 1024)
    sock.sendall(b"go")
    digest = hashlib.sha256()
    received = 0
    peak_memory = 0
    last_check = time.monotonic()
    while True:
        data = sock.recv(256 * 1024)
        if not data:
            break
        digest.update(data)
        received += len(data)
        if time.monotonic() - last_check > 0.3:
            time.sleep(0.05)  # a slowish reader
            peak_memory = max(peak_memory, app.processes()[0]["memory"])
            last_check = time.monotonic()
    expected = hashlib.sha256()
    chunk = 256 * 1024
    for index in range(total // chunk):
        expected.update(bytes([index % 251]) * chunk)
    assert received == total
    assert digest.hexdigest() == expected.hexdigest()
    process = app.processes()[0]
    assert process["send_fail"] == 0
    # The transfer is 64 MB; the worker never holds more than about one buffer of it.
    assert peak_memory - memory_before < 16 * 1024 * 1024, (memory_before, peak_memory)


def test_close_with_data_writes_everything_buffered_first(app_factory):
    app = app_factory(
        """
w = Worker("tcp://127.0.0.1:0", name="closer")

def on_message(conn, data):
    conn.send(b"a" * 500_000)
    conn.send(b"b" * 500_000)
    conn.close(b"bye")

w.on_message = on_message
"""
    ).start()
    sock = connect(app.port(), rcvbuf=8192)
    sock.sendall(b"x")
    time.sleep(0.3)  # let the server queue everything before we read
    data = read_until_closed(sock)
    assert data == b"a" * 500_000 + b"b" * 500_000 + b"bye"


def test_send_returns_true_none_false(app_factory):
    app = app_factory(
        RECORDER
        + """
w = Worker("tcp://127.0.0.1:0", name="ret")

def on_message(conn, data):
    if data.startswith(b"fill"):
        conn.max_send_buffer_size = 100_000
        small = conn.send(b"s" * 10)             # written to the socket at once
        big = conn.send(b"x" * 4_000_000)        # accepted whole, most of it waits
        refused = conn.send(b"y" * 10)           # the buffer is past its limit: dropped
        results["send"] = [small, big, refused, conn.send_buffer_size > 0]
        save()

w.on_message = on_message
"""
    ).start()
    sock = connect(app.port(), rcvbuf=4096)
    sock.sendall(b"fill")
    wait_for(lambda: (app.folder / "results.json").exists(), what="results")
    small, big, refused, waiting = app.read_json("results.json")["send"]
    assert small is True
    assert big is None  # queued: the socket took only part of 4 MB
    assert refused is False  # 4 MB wait, far past a 100 kB limit
    assert waiting
    sock.close()


def test_peer_that_resets_with_data_waiting_counts_send_fail(app_factory):
    import struct

    app = app_factory(
        RECORDER
        + """
w = Worker("tcp://127.0.0.1:0", name="reset")

def on_message(conn, data):
    conn.send(b"x" * 20_000_000)  # more than the kernel's socket buffers take: most waits here

def on_error(conn, code, message):
    results["errors"].append([code, message])
    save()

w.on_message = on_message
w.on_error = on_error
"""
    ).start()
    port = app.port()
    # A client that resets while the server still has data for it.
    sock = connect(port, rcvbuf=4096)
    sock.sendall(b"go")
    assert sock.recv(1) == b"x"  # the server is sending (20 MB: most of it still waits)
    time.sleep(0.1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    # A client that resets with nothing waiting loses nothing of ours: not a send_fail.
    idle = connect(port)
    time.sleep(0.3)
    idle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    idle.close()
    wait_for(lambda: (app.folder / "results.json").exists(), what="on_error")
    errors = app.read_json("results.json")["errors"]
    assert len(errors) == 1 and errors[0][0] == 2 and "peer went away" in errors[0][1]
    time.sleep(0.5)
    assert app.processes()[0]["send_fail"] == 1


def test_pipelined_answers_use_the_real_buffer_not_the_collected_bytes(app_factory):
    """Answers to many messages of one read are collected and written together; near a
    small limit they go out early instead of being dropped while the socket has room."""
    app = app_factory(
        RECORDER
        + """
w = Worker("text://127.0.0.1:0", name="echo")
def on_connect(conn):
    conn.max_send_buffer_size = 100
def on_message(conn, line):
    results["send"].append(conn.send("x" * 10))
    save()
def on_error(conn, code, message):
    results["errors"].append([code, message])
    save()
w.on_connect = on_connect
w.on_message = on_message
w.on_error = on_error
"""
    ).start()
    sock = connect(app.port())
    sock.sendall(b"".join(b"%d\n" % i for i in range(30)))  # one read: 30 messages
    assert read_lines(sock, 30) == ["x" * 10] * 30
    results = app.read_json("results.json")
    assert False not in results["send"] and results["errors"] == []
    assert app.status()["processes"][0]["send_fail"] == 0


def test_send_after_the_peer_reset_returns_false_once_counted(app_factory):
    app = app_factory(
        RECORDER
        + """
w = Worker("tcp://127.0.0.1:0", name="late")
def later(conn):
    results["send"] += [conn.send(b"after the reset"), conn.send(b"and again")]
    save()
def on_message(conn, data):
    conn.pause_recv()  # so the reset is noticed by the write, not by a read
    Timer.add(0.5, later, conn, persistent=False)
def on_error(conn, code, message):
    results["errors"].append([code, message])
    save()
def on_close(conn):
    results["closed"] += 1
    save()
w.on_message = on_message
w.on_error = on_error
w.on_close = on_close
"""
    ).start()
    sock = connect(app.port())
    sock.sendall(b"go")
    time.sleep(0.1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST
    wait_for(lambda: (app.folder / "results.json").exists() and app.read_json("results.json")["closed"] == 1, what="on_close")
    results = app.read_json("results.json")
    assert results["send"] == [False, False]
    assert [code for code, _ in results["errors"]] == [2]  # SEND_FAIL, reported once
    wait_for(lambda: app.status()["processes"][0]["send_fail"] == 2, what="both refused sends counted")


def test_a_reset_after_everything_was_read_is_not_a_send_fail(app_factory):
    size = 20_000_000
    app = app_factory(
        f"""
w = Worker("tcp://127.0.0.1:0", name="big")
def on_connect(conn):
    conn.max_send_buffer_size = 64 * 1024 * 1024  # the buffer never reaches its limit
w.on_connect = on_connect
w.on_message = lambda conn, data: conn.send(b"z" * {size})
"""
    ).start()
    for _ in range(3):
        sock = connect(app.port())
        sock.sendall(b"go")
        received = 0
        while received < size:
            chunk = sock.recv(1 << 20)
            assert chunk
            received += len(chunk)
        time.sleep(0.3)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    wait_for(lambda: app.status()["processes"][0]["connections"] == 0, what="connections closed")
    time.sleep(1.2)
    assert app.status()["processes"][0]["send_fail"] == 0


def test_async_producer_learns_of_a_full_buffer_while_it_awaits(app_factory):
    app = app_factory(
        RECORDER
        + """
w = Worker("tcp://127.0.0.1:0", name="producer")
paused = set()
async def on_message(conn, data):
    counts = {"accepted": 0, "dropped": 0}
    for _ in range(400):  # 25 MiB to a client that does not read
        if conn.id in paused:
            break
        counts["accepted" if conn.send(b"y" * 65536) is not False else "dropped"] += 1
        await asyncio.sleep(0)
    results["producer"] = counts
    save()
def on_buffer_full(conn):
    paused.add(conn.id)
w.on_message = on_message
w.on_buffer_full = on_buffer_full
"""
    ).start()
    sock = connect(app.port(), rcvbuf=4096)
    sock.sendall(b"go")
    wait_for(lambda: (app.folder / "results.json").exists() and "producer" in app.read_json("results.json"), what="the producer")
    counts = app.read_json("results.json")["producer"]
    assert counts["dropped"] == 0 and 0 < counts["accepted"] < 400
    assert app.status()["processes"][0]["send_fail"] == 0


@pytest.mark.parametrize("kind", ["def", "async def"])
def test_pause_recv_in_on_message_holds_the_rest_of_the_read(app_factory, kind):
    """Messages that arrived in the same read wait for resume_recv(), also when they are
    queued behind a coroutine callback."""
    app = app_factory(
        RECORDER
        + f"""
w = Worker("text://127.0.0.1:0", name="pausing")
{kind} on_message(conn, line):
    results["send"].append([line, round(time.monotonic(), 3)])
    save()
    if line == "a":
        conn.pause_recv()
        Timer.add(0.8, conn.resume_recv, persistent=False)
    conn.send(line)
w.on_message = on_message
"""
    ).start()
    sock = connect(app.port())
    sock.sendall(b"a\nb\nc\n")  # one read
    assert read_lines(sock, 3) == ["a", "b", "c"]
    (first, at_a), (second, at_b), (third, at_c) = app.read_json("results.json")["send"]
    assert (first, second, third) == ("a", "b", "c")
    assert at_b - at_a >= 0.7 and at_c >= at_b


def test_messages_held_by_pause_recv_are_dropped_when_the_connection_closes(app_factory):
    """Held messages wait for resume_recv(); a connection that closes first never gets
    them (queued behind a coroutine or not), and on_close still comes last."""
    app = app_factory(
        RECORDER
        + """
w = Worker("text://127.0.0.1:0", name="held")
async def on_message(conn, line):
    results["send"].append(line)
    save()
    if line == "a":
        conn.pause_recv()
        await asyncio.sleep(0.2)
def on_close(conn):
    results["closed"] += 1
    results["send"].append("closed")
    save()
w.on_message = on_message
w.on_close = on_close
"""
    ).start()
    sock = connect(app.port())
    sock.sendall(b"a\nb\nc\n")  # one read: b and c queue behind a coroutine
    time.sleep(0.5)
    app.cli("stop")  # a paused connection reads nothing, so the stop is what closes it
    sock.close()
    assert app.read_json("results.json")["send"] == ["a", "closed"]
