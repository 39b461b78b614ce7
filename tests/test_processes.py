"""Master and worker processes: forking, respawning, stopping, reloading, the command line."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from conftest import connect, is_closed, paced_producer, read_lines, wait_for

PID_ECHO = """
w = Worker("text://127.0.0.1:0", count=4, name="multi")

def on_message(conn, line):
    conn.send(f"{os.getpid()} {worker_id()} {line}")

def worker_id():
    return w.id

w.on_message = on_message
"""


def test_four_workers_serve_and_a_killed_worker_is_respawned_with_its_id(app_factory):
    app = app_factory(PID_ECHO).start()
    processes = app.wait_running(4)
    pids = {p["pid"] for p in processes}
    assert sorted(p["worker_id"] for p in processes) == [0, 1, 2, 3]
    port = app.port()
    seen = set()
    for index in range(40):
        sock = connect(port)
        sock.sendall(f"hello {index}\n".encode())
        pid, worker_id, *rest = read_lines(sock, 1)[0].split(" ")
        assert " ".join(rest) == f"hello {index}"
        assert int(pid) in pids
        seen.add(int(pid))
        sock.close()
    assert seen  # every answer came from one of the four workers

    victim = next(p for p in processes if p["worker_id"] == 2)
    os.kill(victim["pid"], signal.SIGKILL)

    def respawned():
        running = [p for p in app.processes() if p["state"] == "running"]
        return len(running) == 4 and victim["pid"] not in {p["pid"] for p in running} and running

    running = wait_for(respawned, what="the killed worker respawned")
    assert sorted(p["worker_id"] for p in running) == [0, 1, 2, 3]
    exits = app.status()["exits"]
    assert {"name": "multi", "status": "killed by SIGKILL", "count": 1} in exits
    sock = connect(port)
    sock.sendall(b"still there\n")
    assert read_lines(sock, 1)[0].endswith("still there")
    # `ps` shows what each process is.
    with open(f"/proc/{app.master_pid()}/cmdline", "rb") as file:
        assert file.read().startswith(b"longshore: master")
    with open(f"/proc/{running[0]['pid']}/cmdline", "rb") as file:
        assert file.read().startswith(b"longshore: worker multi text://127.0.0.1:")


def test_cli_says_already_running_and_not_running(app_factory):
    app = app_factory(PID_ECHO)
    result = app.cli("status", check=False)
    assert result.returncode == 1 and "not running" in result.stderr
    result = app.cli("stop", check=False)
    assert result.returncode == 1 and "not running" in result.stderr
    app.start()
    result = app.cli("start", "-d", check=False)
    assert result.returncode == 1 and "already running" in result.stdout
    pid = app.master_pid()
    assert pid and app.pid_file.exists()
    app.cli("stop")
    assert not app.pid_file.exists()
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z"


def test_graceful_stop_lets_an_in_flight_transfer_finish(app_factory):
    total = 20 * 1024 * 1024
    app = app_factory(paced_producer(total, 65536, name="transfer", stop_timeout=60)).start()
    port = app.port()
    sock = connect(port, timeout=30, rcvbuf=32 * 1024)
    sock.sendall(b"go")
    received = 0
    # Read slowly: about 2 MB/s, so that the transfer takes ~10 s.
    while received < 2 * 1024 * 1024:
        received += len(sock.recv(65536))
        time.sleep(0.02)
    stop = threading.Thread(target=app.cli, args=("stop", "-g"), kwargs={"timeout": 90})
    stop.start()
    # New connections are refused once the worker stops accepting.
    def refused():
        try:
            probe = socket.create_connection(("127.0.0.1", port), timeout=1)
        except OSError:
            return True
        probe.close()
        return False

    wait_for(refused, timeout=10, what="the listener to close")
    while True:
        data = sock.recv(65536)
        if not data:
            break
        received += len(data)
        time.sleep(0.005)
    stop.join(timeout=90)
    assert received == total
    assert not app.pid_file.exists()


def test_plain_stop_flushes_send_buffers(app_factory):
    app = app_factory(
        """
w = Worker("tcp://127.0.0.1:0", name="flush", stop_timeout=20)

def on_message(conn, data):
    conn.send(b"q" * 3_000_000)

w.on_message = on_message
"""
    ).start()
    sock = connect(app.port(), timeout=20, rcvbuf=16 * 1024)
    sock.sendall(b"x")
    time.sleep(0.3)
    stop = threading.Thread(target=app.cli, args=("stop",), kwargs={"timeout": 60})
    stop.start()
    received = 0
    while True:
        data = sock.recv(65536)
        if not data:
            break
        received += len(data)
        time.sleep(0.002)
    stop.join(timeout=60)
    assert received == 3_000_000


def test_worker_whose_start_hook_raises_is_retried_with_backoff(app_factory):
    app = app_factory(
        """
w = Worker("text://127.0.0.1:0", name="broken")

def on_worker_start(worker):
    raise RuntimeError("database unreachable")

w.on_worker_start = on_worker_start
ok = Worker("text://127.0.0.1:0", name="fine")
ok.on_message = lambda conn, line: conn.send(line)
"""
    )
    result = app.cli("start", "-d")
    assert "fail to start" in result.stdout
    time.sleep(3)
    status = app.status()
    exits = {(e["name"], e["status"]): e["count"] for e in status["exits"]}
    # With backoff (0.25, 0.5, 1, 2 s ...) three seconds allow a handful of attempts, not hundreds.
    assert 2 <= exits[("broken", "exit code 3")] <= 6
    assert "RuntimeError: database unreachable" in app.log()
    # The healthy worker serves all along.
    sock = connect(app.port(1))
    sock.sendall(b"hi\n")
    assert read_lines(sock, 1) == ["hi"]


def test_status_answers_at_once_and_shows_a_stuck_worker_busy(app_factory):
    app = app_factory(
        """
w = Worker("text://127.0.0.1:0", name="stuck", count=2)

def on_message(conn, line):
    if line == "sleep":
        time.sleep(3)
    conn.send(line)

w.on_message = on_message
"""
    ).start()
    app.wait_running(2)
    sock = connect(app.port())
    sock.sendall(b"ping\n")
    assert read_lines(sock, 1) == ["ping"]
    time.sleep(0.5)  # let the worker publish
    sock.sendall(b"sleep\n")
    time.sleep(1.2)
    started = time.monotonic()
    status = app.status()
    assert time.monotonic() - started < 1.0 + 1.0  # the command itself, python start-up included
    busy = [p for p in status["processes"] if p["status"] == "busy"]
    assert len(busy) == 1
    assert busy[0]["busy_for"] >= 0.75
    assert busy[0]["total_request"] == 1  # its last published figures
    idle = [p for p in status["processes"] if p["status"] == "idle"]
    assert len(idle) == 1
    assert read_lines(sock, 1, timeout=5) == ["sleep"]
    wait_for(lambda: all(p["status"] == "idle" for p in app.status()["processes"]), what="idle again")


def test_graceful_reload_replaces_every_worker_without_refusing_connections(app_factory):
    app = app_factory(PID_ECHO).start()
    before = {p["pid"] for p in app.wait_running(4)}
    port = app.port()
    failures = []
    answered = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                sock = connect(port, timeout=5)
                for index in range(5):
                    sock.sendall(f"r{index}\n".encode())
                    line = read_lines(sock, 1)[0]
                    if not line.endswith(f"r{index}"):
                        failures.append(line)
                    answered += 1
                sock.close()
            except OSError as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    # Twice: a connection accepted just as a worker's listener closes (not yet made
    # when it starts stopping) is served by that worker too.
    for _ in range(2):
        result = app.cli("reload", "-g", timeout=60)
        assert "reloaded" in result.stdout
        time.sleep(0.3)
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    after = {p["pid"] for p in app.wait_running(4)}
    assert not before & after
    assert failures == []
    assert answered > 100


def test_quick_reload_replaces_workers_and_keeps_ids(app_factory):
    app = app_factory(PID_ECHO).start()
    before = app.wait_running(4)
    app.cli("reload", timeout=60)
    after = app.wait_running(4)
    assert not {p["pid"] for p in before} & {p["pid"] for p in after}
    assert sorted(p["worker_id"] for p in after) == [0, 1, 2, 3]
    statuses = {e["status"] for e in app.status()["exits"]}
    assert statuses == {"exit code 0"}
    sock = connect(app.port())
    sock.sendall(b"after reload\n")
    assert read_lines(sock, 1)[0].endswith("after reload")


def test_reload_picks_up_changed_code_imported_in_on_worker_start(app_factory):
    app = app_factory(
        """
w = Worker("text://127.0.0.1:0", name="code")
handler = {}

def on_worker_start(worker):
    sys.path.insert(0, os.environ["APP_DIR"])
    import handlers
    handler["fn"] = handlers.answer

w.on_worker_start = on_worker_start
w.on_message = lambda conn, line: conn.send(handler["fn"](line))
"""
    )
    (app.folder / "handlers.py").write_text("def answer(line):\n    return 'v1 ' + line\n")
    app.start()
    sock = connect(app.port())
    sock.sendall(b"x\n")
    assert read_lines(sock, 1) == ["v1 x"]
    (app.folder / "handlers.py").write_text("def answer(line):\n    return 'v2 ' + line\n")
    app.cli("reload", "-g")
    sock = connect(app.port())
    sock.sendall(b"x\n")
    assert read_lines(sock, 1) == ["v2 x"]


def test_connections_command_lists_every_connection(app_factory):
    app = app_factory(
        """
w = Worker("text://127.0.0.1:0", name="listed", count=2)
w.on_message = lambda conn, line: conn.send(line)
"""
    ).start()
    app.wait_running(2)
    port = app.port()
    socks = [connect(port) for _ in range(6)]
    for sock in socks:
        sock.sendall(b"hi\n")
        assert read_lines(sock, 1) == ["hi"]
    import json

    listing = json.loads(app.cli("connections", "--json").stdout)
    rows = listing["connections"]
    assert len(rows) == 6
    remotes = {f"127.0.0.1:{sock.getsockname()[1]}" for sock in socks}
    assert {row["remote"] for row in rows} == remotes
    for row in rows:
        assert row["protocol"] == "text"
        assert row["local"] == f"127.0.0.1:{port}"
        assert row["bytes_read"] == 3 and row["bytes_written"] == 3
        assert row["state"] == "established"
    text = app.cli("connections").stdout
    assert "6 connection(s)" in text
    one_pid = rows[0]["pid"]
    filtered = json.loads(app.cli("connections", "--json", "--pid", str(one_pid)).stdout)["connections"]
    assert filtered and all(row["pid"] == one_pid for row in filtered)


def test_restart_gives_a_new_master_that_serves(app_factory):
    app = app_factory(
        """
w = Worker("text://127.0.0.1:0", name="again")
w.on_message = lambda conn, line: conn.send(line)
"""
    ).start()
    first = app.master_pid()
    app.cli("restart", "-d")
    second = app.master_pid()
    assert second and second != first
    sock = connect(app.port())
    sock.sendall(b"back\n")
    assert read_lines(sock, 1) == ["back"]


def test_graceful_reload_under_http_load_fails_no_request(app_factory):
    import httpx

    app = app_factory(
        """
from longshore.http import Response

w = Worker("http://127.0.0.1:0", name="web", count=2)
w.on_message = lambda conn, request: conn.send(Response(f"{os.getpid()} {request.path}"))
"""
    ).start()
    before = {p["pid"] for p in app.wait_running(2)}
    url = f"http://127.0.0.1:{app.port()}"
    failures: list[str] = []
    answered = 0
    answering_pids: set[int] = set()
    stop = threading.Event()

    def load() -> None:
        nonlocal answered
        # A new connection per request: every request meets the listening socket.
        with httpx.Client(headers={"Connection": "close"}, timeout=10) as client:
            index = 0
            while not stop.is_set():
                index += 1
                try:
                    response = client.get(f"{url}/r{index}")
                    pid, path = response.text.split(" ")
                    if response.status_code != 200 or path != f"/r{index}":
                        failures.append(f"{response.status_code} {response.text}")
                    answering_pids.add(int(pid))
                    answered += 1
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    app.cli("reload", "-g", timeout=60)
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(timeout=20)
    after = {p["pid"] for p in app.wait_running(2)}
    assert not before & after
    assert failures == []
    assert answered > 100
    assert answering_pids & before and answering_pids & after  # served by old, then new workers


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie nobody reaped counts as gone)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(") ", 1)[1].startswith("Z")
    except (ProcessLookupError, FileNotFoundError):
        return True


def test_quick_reload_asked_during_a_graceful_reload_step_still_retires_the_old_worker(app_factory):
    app = app_factory(
        """
w = Worker("text://127.0.0.1:0", name="slowstart")

async def on_worker_start(worker):
    await asyncio.sleep(1.0)  # a new process needs a while to serve

w.on_worker_start = on_worker_start
w.on_message = lambda conn, line: conn.send(str(os.getpid()))
"""
    ).start()
    (first,) = [p["pid"] for p in app.wait_running(1)]
    master = app.master_pid()
    os.kill(master, signal.SIGUSR2)  # graceful reload: the replacement starts ...
    time.sleep(0.3)
    os.kill(master, signal.SIGUSR1)  # ... and a quick reload is asked meanwhile
    wait_for(lambda: _gone(first), timeout=10, what=f"the first worker {first} to exit")
    (last,) = [p["pid"] for p in app.wait_running(1)]
    assert last != first
    sock = connect(app.port())
    sock.sendall(b"x\n")
    assert read_lines(sock, 1) == [str(last)]


def test_stop_is_not_lost_behind_many_exited_workers(app_factory):
    app = app_factory(
        """
idle = Worker(None, name="idle", count=20)
marker = os.path.join(os.environ["APP_DIR"], "busy")

def busy_master():
    with open(marker, "w"):
        pass
    time.sleep(2.5)  # the master loop is held up: signals pile up meanwhile

Worker.on_master_start = lambda: Timer.add(0.5, busy_master, persistent=False)
"""
    ).start()
    pids = [p["pid"] for p in app.wait_running(20)]
    master = app.master_pid()
    wait_for(lambda: (app.folder / "busy").exists(), what="the master's busy timer")
    for pid in pids:  # twenty children exit while the master is busy: twenty SIGCHLD
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.03)
    os.kill(master, signal.SIGTERM)
    wait_for(lambda: _gone(master), timeout=15, what="the master to stop")


#: Two echo workers whose start fails once the file ``broken`` exists in the app's folder.
FRAGILE = """
w = Worker("text://127.0.0.1:0", name="fragile", count=2)
broken = os.path.join(os.environ["APP_DIR"], "broken")

def on_worker_start(worker):
    if os.path.exists(broken):
        raise RuntimeError("the new code cannot start")

w.on_worker_start = on_worker_start
w.on_message = lambda conn, line: conn.send(line)
"""


def test_reload_says_when_the_master_abandoned_it_and_exits_1(app_factory):
    app = app_factory(FRAGILE).start()
    before = {p["pid"] for p in app.wait_running(2)}
    assert "last reload" not in app.cli("status").stdout  # none yet
    (app.folder / "broken").touch()
    result = app.cli("reload", "-g", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "reload abandoned: the new worker fragile[0] exited (exit code 3) before serving" in result.stderr
    assert "reloaded" not in result.stdout
    assert {p["pid"] for p in app.wait_running(2)} == before  # the old workers keep serving
    last = app.status()["master"]["last_reload"]
    assert last["result"] == "abandoned" and "exit code 3" in last["reason"]
    text = app.cli("status").stdout
    assert re.search(r"last reload: abandoned \(the new worker fragile\[0\] exited \(exit code 3\) before serving[^)]*\) \d+s ago", text), text

    (app.folder / "broken").unlink()
    result = app.cli("reload", "-g")
    assert "reloaded (2 new worker process(es))" in result.stdout
    assert app.status()["master"]["last_reload"]["result"] == "done"
    assert re.search(r"last reload: done \d+s ago\n", app.cli("status").stdout)
    assert not before & {p["pid"] for p in app.wait_running(2)}


def test_stop_during_an_async_on_worker_start_waits_for_it_to_finish(app_factory):
    app = app_factory(
        """
w = Worker("text://127.0.0.1:0", name="booting")
events = os.path.join(os.environ["APP_DIR"], "events.txt")

def note(text):
    with open(events, "a") as f:
        f.write(text + "\\n")

async def on_worker_start(worker):
    note("start begins")
    worker.pool = None
    await asyncio.sleep(1.0)
    worker.pool = "pool"
    note("start ends")

w.on_worker_start = on_worker_start
w.on_worker_stop = lambda worker: note(f"stop {worker.pool}")
"""
    )
    events = app.folder / "events.txt"
    master = subprocess.Popen([sys.executable, str(app.script), "start"], cwd=app.folder, env=app.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: events.exists() and "start begins" in events.read_text(), what="on_worker_start to begin")
        master.send_signal(signal.SIGTERM)
        assert master.wait(timeout=20) == 0
    finally:
        if master.poll() is None:
            master.kill()
    assert events.read_text().split("\n") == ["start begins", "start ends", "stop pool", ""]


def test_workers_stop_when_the_master_is_killed(app_factory):
    app = app_factory(
        """
w = Worker("text://127.0.0.1:0", name="orphans", count=2)
w.on_message = lambda conn, line: conn.send(line)
"""
    ).start()
    pids = [p["pid"] for p in app.wait_running(2)]
    port = app.port()
    sock = connect(port)
    sock.sendall(b"hi\n")
    assert read_lines(sock, 1) == ["hi"]
    os.kill(app.master_pid(), signal.SIGKILL)
    for pid in pids:
        wait_for(lambda: _gone(pid), timeout=5, what=f"worker {pid} to stop")
    assert is_closed(sock, timeout=2)
    try:
        connect(port, timeout=1).close()
    except OSError:
        pass
    else:
        raise AssertionError("the killed master's port still accepts connections")
    assert "start.py is not running" in app.cli("stop", check=False).stderr


def test_a_stale_pid_file_naming_another_apps_worker_is_ignored(app_factory):
    """A master killed with SIGKILL leaves its pid file; its pid may then belong to a
    process of another longshore app (titled "longshore: ..."): ``start`` must start and
    ``stop`` must leave that process alone."""
    body = """
w = Worker("text://127.0.0.1:0", count=1, name="{name}")
w.on_message = lambda conn, line: conn.send(line)
"""
    other = app_factory(body.format(name="other")).start()
    [worker] = other.wait_running(1)
    app = app_factory(body.format(name="mine"))
    app.pid_file.parent.mkdir()
    app.pid_file.write_text(f"{worker['pid']}\n")
    result = app.cli("stop", check=False)
    assert result.returncode == 1 and "not running" in result.stderr
    app.start()
    master = app.master_pid()
    assert master and master != worker["pid"]
    assert app.cli("status", "--json").returncode == 0
    app.cli("stop")
    assert _gone(master) and not app.pid_file.exists()
    assert [(p["pid"], p["state"]) for p in other.processes()] == [(worker["pid"], "running")]
    assert other.status()["exits"] == []
    sock = connect(other.port())
    sock.sendall(b"still here\n")
    assert read_lines(sock, 1) == ["still here"]
    sock.close()


def test_graceful_reload_with_reuse_port_serves_what_waits_in_the_old_listeners_backlog(app_factory):
    """With reuse_port each process listens on a socket of its own, and closing it would
    reset the connections waiting in its backlog: the old worker accepts them first.
    Its ``on_worker_reload`` blocks it for a moment while clients connect, so that some
    of them wait in the old socket's backlog when it stops listening."""
    app = app_factory(
        """
w = Worker("text://127.0.0.1:0", count=1, name="own", reuse_port=True)
w.on_message = lambda conn, line: conn.send(f"{os.getpid()} {line}")

def on_worker_reload(worker):
    with open(os.path.join(os.environ["APP_DIR"], "reloading"), "w"):
        pass
    time.sleep(1.5)

w.on_worker_reload = on_worker_reload
"""
    ).start()
    old_pid = app.wait_running(1)[0]["pid"]
    port = app.port()
    reload = threading.Thread(target=app.cli, args=("reload", "-g"), kwargs={"timeout": 60})
    reload.start()
    wait_for(lambda: (app.folder / "reloading").exists(), what="the old worker to block in on_worker_reload")
    clients = [connect(port, timeout=10) for _ in range(40)]  # the kernel completes each handshake
    answers = []
    for index, client in enumerate(clients):
        client.sendall(f"c{index}\n".encode())
    for index, client in enumerate(clients):
        try:
            answers.append(read_lines(client, 1, timeout=10)[0])
        except OSError as exc:
            answers.append(repr(exc))
        client.close()
    reload.join(timeout=60)
    assert [answer.split(" ", 1)[-1] for answer in answers] == [f"c{index}" for index in range(40)], answers
    served_by_old = sum(answer.startswith(f"{old_pid} ") for answer in answers)
    assert served_by_old > 0  # some waited in the old socket's backlog and were served by it
    log = app.log()
    assert "taken over from its listener's backlog" in log


def test_quick_reload_whose_new_code_cannot_start_is_abandoned_and_exits_1(app_factory):
    app = app_factory(FRAGILE).start()
    before = {p["pid"] for p in app.wait_running(2)}
    (app.folder / "broken").touch()
    started = time.monotonic()
    result = app.cli("reload", check=False, timeout=30)
    assert time.monotonic() - started < 10
    assert result.returncode == 1, result.stdout + result.stderr
    assert "reload abandoned: the new worker fragile[0] exited (exit code 3) before serving and the old one is gone" in result.stderr
    last = app.status()["master"]["last_reload"]
    assert last["result"] == "abandoned" and "fragile[0]" in last["reason"]
    assert not app.status()["master"]["reloading"]
    rows = app.processes()
    assert len(before & {p["pid"] for p in rows}) == 1  # the other worker keeps its old code and serves
    # Once the code is fixed, the next reload replaces every process.
    (app.folder / "broken").unlink()
    result = app.cli("reload", timeout=60)
    assert "reloaded" in result.stdout
    assert not before & {p["pid"] for p in app.wait_running(2)}


def test_a_terminal_hang_up_stops_a_foreground_server_like_ctrl_c(app_factory):
    """Closing the terminal sends SIGHUP to the whole process group: the workers must
    stop through the master (on_worker_stop runs, exit code 0), not die of the signal."""
    app = app_factory(
        """
w = Worker("text://127.0.0.1:0", name="fg")
w.on_worker_stop = lambda worker: record("stopped", os.getpid())
"""
    )
    master = subprocess.Popen(
        [sys.executable, str(app.script), "start"], cwd=app.folder, env=app.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_for(lambda: app.cli("status", check=False).returncode == 0, timeout=15, what="the master to start")
        pid = app.wait_running(1)[0]["pid"]
        os.killpg(master.pid, signal.SIGHUP)
        assert master.wait(timeout=20) == 0
    finally:
        if master.poll() is None:
            master.kill()
    events = app.folder / "events.txt"
    assert events.exists() and f"stopped {pid}" in events.read_text()
    log = app.log()
    assert f"pid {pid} exited: exit code 0" in log, log
