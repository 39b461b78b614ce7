"""Operations: Prometheus metrics and the status page, log rotation, the daemon, running
workers as another user, and ``start --watch``."""

from __future__ import annotations

import json
import os
import pty
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import connect, read_lines, wait_for

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

METERED = """
Worker.metrics_listen = "127.0.0.1:0"
w = Worker("text://127.0.0.1:0", count=2, name="metered")

def on_message(conn, line):
    if line == "boom":
        raise ValueError("boom")
    conn.send(line)

w.on_message = on_message
"""


def http_get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.headers["Content-Type"], response.read().decode()


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics, parsed by prometheus_client: {(sample name, sorted labels): value}."""
    status, content_type, text = http_get(f"http://{address}/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def by_pid(samples, name: str) -> dict[int, float]:
    return {int(dict(labels)["pid"]): value for (sample, labels), value in samples.items() if sample == name}


def test_metrics_follow_real_traffic_and_the_monitor_is_supervised(app_factory):
    app = app_factory(METERED).start()
    processes = app.wait_running(2)
    address = app.status()["master"]["metrics_listen"]
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    socks = [connect(app.port()) for _ in range(3)]
    for round_ in range(10):
        for sock in socks:
            sock.sendall(f"m{round_}\n".encode())
            assert read_lines(sock, 1) == [f"m{round_}"]
    socks[0].sendall(b"boom\n")
    wait_for(lambda: app.status()["summary"]["total_request"] == 31, what="31 requests published")
    wait_for(lambda: app.status()["summary"]["throw_exception"] == 1, what="the exception published")
    status = {p["pid"]: p for p in app.status()["processes"]}
    assert set(status) == {p["pid"] for p in processes}

    # Only the master (which keeps it) and the monitor hold the metrics socket, not the workers.
    holders = _holders_of_listening_port(int(address.rsplit(":", 1)[1]))
    monitor_pid = next(h["pid"] for h in app.status()["master"]["helpers"] if h["name"] == "monitor")
    assert holders == {app.master_pid(), monitor_pid}

    samples = scrape(address)
    requests = by_pid(samples, "longshore_requests_total")
    assert requests == {pid: float(p["total_request"]) for pid, p in status.items()}
    assert sum(requests.values()) == 31
    assert sum(by_pid(samples, "longshore_connections").values()) == 3
    assert sum(by_pid(samples, "longshore_exceptions_total").values()) == 1
    assert by_pid(samples, "longshore_send_fail_total") == {pid: 0.0 for pid in status}
    assert by_pid(samples, "longshore_busy") == {pid: 0.0 for pid in status}
    assert all(value > 1_000_000 for value in by_pid(samples, "longshore_memory_bytes").values())
    assert set(by_pid(samples, "longshore_qps")) == set(status)
    assert set(by_pid(samples, "longshore_send_buffer_bytes")) == set(status)
    labels = {labels for (name, labels) in samples if name == "longshore_requests_total"}
    assert {dict(label)["worker"] for label in labels} == {"metered"}
    assert sorted(dict(label)["worker_id"] for label in labels) == ["0", "1"]

    # A killed worker shows up in the exit counter; its replacement gets its own series.
    victim = processes[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(app.wait_running(2)) == 2 and victim not in {p["pid"] for p in app.processes()}, what="respawn")
    samples = scrape(address)
    exits = {(dict(labels)["worker"], dict(labels)["status"]): value for (name, labels), value in samples.items() if name == "longshore_worker_exits_total"}
    assert exits == {("metered", "killed by SIGKILL"): 1.0}
    assert victim not in by_pid(samples, "longshore_connections")

    # The monitor is a supervised process: killed, it is logged, counted and respawned on the same port.
    monitor = next(h for h in app.status()["master"]["helpers"] if h["name"] == "monitor")
    os.kill(monitor["pid"], signal.SIGKILL)

    def respawned():
        helpers = app.status()["master"]["helpers"]
        return any(h["name"] == "monitor" and h["pid"] != monitor["pid"] for h in helpers)

    wait_for(respawned, what="the monitor respawned")
    assert {"name": "monitor", "status": "killed by SIGKILL", "count": 1} in app.status()["exits"]
    assert f"monitor pid {monitor['pid']} exited: killed by SIGKILL" in app.log()
    samples = wait_for(lambda: _try_scrape(address), what="metrics served again")
    assert sum(by_pid(samples, "longshore_requests_total").values()) >= 0
    document = json.loads(http_get(f"http://{address}/status.json")[2])
    assert {p["pid"] for p in document["processes"]} == {p["pid"] for p in app.processes()}
    assert http_get(f"http://{address}/")[1].startswith("text/html")
    # Workers and the monitor do not keep the metrics port: after stop it is free.
    app.cli("stop")
    host, port = address.rsplit(":", 1)
    import socket

    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    probe.bind((host, int(port)))
    probe.close()


def _holders_of_listening_port(port: int) -> set[int]:
    """Pids of the processes that have the listening TCP socket of ``port`` open."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":
            inodes.add(f"socket:[{fields[9]}]")
    assert inodes
    holders = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            links = {os.readlink(fd) for fd in (entry / "fd").iterdir()}
        except OSError:
            continue
        if links & inodes:
            holders.add(int(entry.name))
    return holders


def _try_scrape(address):
    try:
        return scrape(address)
    except OSError:
        return None


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_status_page_renders_every_process_in_a_browser(app_factory, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium); .ci/run installs it")
    app = app_factory(METERED).start()
    processes = app.wait_running(2)
    address = app.status()["master"]["metrics_listen"]
    sock = connect(app.port())
    for index in range(5):
        sock.sendall(f"{index}\n".encode())
        read_lines(sock, 1)
    time.sleep(1.2)  # a couple of qps samples for the charts

    def run_chromium(*args: str) -> subprocess.CompletedProcess[str]:
        profile = tempfile.mkdtemp(dir=tmp_path, prefix="chromium-")
        return subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    result = run_chromium("--virtual-time-budget=5000", "--dump-dom", f"http://{address}/")
    dom = result.stdout
    assert "<title>longshore status</title>" in dom, result.stderr[-2000:]
    for process in processes:  # rows exist only once the page's script has fetched /status.json
        assert f'<tr data-pid="{process["pid"]}">' in dom
    assert "metered[0]" in dom and "metered[1]" in dom
    assert "<polyline" in dom  # the qps charts
    assert '<div id="error"></div>' in dom  # every fetch succeeded
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "status-page.png"
    if screenshot.exists():
        screenshot.unlink()
    run_chromium("--virtual-time-budget=5000", "--window-size=1280,500", f"--screenshot={screenshot}", f"http://{address}/")
    assert screenshot.exists() and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


CHATTY = """
import logging
Worker.log_max_bytes = 40_000
Worker.log_backup_count = 2
applog = logging.getLogger("app")
w = Worker("text://127.0.0.1:0", count=2, name="chatty")

def on_worker_start(worker):
    Timer.add(0.1, lambda: applog.info("tick %d", os.getpid()))

def on_message(conn, line):
    for index in range(int(line)):
        applog.info("bulk %d %s", index, "x" * 150)
    conn.send("done")

w.on_worker_start = on_worker_start
w.on_message = on_message
"""


def test_log_rotation_by_size_with_many_writers(app_factory):
    app = app_factory(CHATTY).start()
    pids = {p["pid"] for p in app.wait_running(2)}
    folder = app.folder / ".longshore"
    log_file, first, second, third = (folder / name for name in ("start.log", "start.log.1", "start.log.2", "start.log.3"))
    sock = connect(app.port())
    sock.sendall(b"300\n")  # about 60 kB of log
    assert read_lines(sock, 1) == ["done"]
    wait_for(first.exists, what="the log file rotated")
    time.sleep(1.0)  # every process has written at least once since
    size = first.stat().st_size
    inode = first.stat().st_ino
    time.sleep(1.0)
    assert first.stat().st_ino == inode and first.stat().st_size == size, "a process still writes to the rotated file"
    current = log_file.read_text()
    for pid in pids:
        assert f"{pid} INFO app: tick {pid}" in current
    assert "log file rotated" in log_file.read_text() + first.read_text()
    # The master writes to the new file too.
    victim = sorted(pids)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: f"pid {victim} exited: killed by SIGKILL" in log_file.read_text(), what="the master's line in the new file")
    # Keeps log_backup_count old files.
    for _ in range(3):
        inode = first.stat().st_ino
        sock = connect(app.port())  # the first one may have belonged to the killed worker
        sock.sendall(b"300\n")
        assert read_lines(sock, 1) == ["done"]
        wait_for(lambda: first.stat().st_ino != inode, what="another rotation")
    assert second.exists() and not third.exists()
    assert all(path.stat().st_size < 200_000 for path in (log_file, first, second))


def _proc_stat(pid: int) -> dict[str, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return {"ppid": int(fields[1]), "pgrp": int(fields[2]), "session": int(fields[3]), "tty_nr": int(fields[4])}


PRINTER = """
w = Worker("text://127.0.0.1:0", count=2, name="printer")

def on_worker_start(worker):
    print(f"print from worker {worker.id} pid {os.getpid()}")
    print(f"stderr from worker {worker.id}", file=sys.stderr)

w.on_worker_start = on_worker_start
w.on_message = lambda conn, line: conn.send(line)
"""


def test_daemon_detaches_from_the_terminal_and_logs_every_decision(app_factory):
    import fcntl
    import termios

    app = app_factory(PRINTER)
    controller, terminal = pty.openpty()
    try:
        # Launch from a session whose controlling terminal is a pseudo-terminal, as a shell would.
        launcher = subprocess.Popen(
            [sys.executable, str(app.script), "start", "-d"],
            cwd=app.folder,
            env=app.env,
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        launcher_stat = _proc_stat(launcher.pid)
        assert launcher.wait(timeout=30) == 0
        output = os.read(controller, 65536).decode(errors="replace")
    finally:
        os.close(terminal)
        os.close(controller)
    assert "longshore started" in output
    assert launcher_stat["tty_nr"] != 0  # the launcher had a terminal ...
    master = app.master_pid()
    daemon = _proc_stat(master)
    assert daemon["tty_nr"] == 0  # ... the daemon has none
    assert daemon["session"] not in (launcher_stat["session"], os.getsid(0))
    assert daemon["session"] != master  # not a session leader: it can never acquire a terminal again
    processes = app.wait_running(2)
    for process in processes:
        assert _proc_stat(process["pid"])["tty_nr"] == 0
    assert os.readlink(f"/proc/{master}/fd/0") == "/dev/null"
    stdout_file = app.folder / ".longshore" / "start.stdout.log"
    wait_for(lambda: stdout_file.read_text().count("print from worker") == 2, what="the workers' prints")
    text = stdout_file.read_text()
    for process in processes:
        assert f"print from worker {process['worker_id']} pid {process['pid']}" in text
    assert "stderr from worker 0" in text and "stderr from worker 1" in text

    log = lambda: (app.folder / ".longshore" / "start.log").read_text()  # noqa: E731
    for process in processes:
        assert f"spawned worker printer[{process['worker_id']}] pid {process['pid']}" in log()
    os.kill(processes[0]["pid"], signal.SIGKILL)
    wait_for(lambda: f"printer[{processes[0]['worker_id']}] pid {processes[0]['pid']} exited: killed by SIGKILL" in log(), what="exit logged")
    app.wait_running(2)
    app.cli("reload", "-g")
    text = log()
    assert f"master pid {master}: graceful reload" in text
    assert text.count("reload: replacing worker printer") == 2
    assert text.count("reload: worker printer") >= 2 and "replaced by pid" in text
    assert "reload done" in text
    app.cli("stop")
    text = log()
    assert f"master pid {master}: stop" in text
    assert f"master pid {master} stopped" in text


RUN_AS_NOBODY = """
import logging
Worker.log_file = os.environ["SHARED_LOG"]
Worker.log_max_bytes = 30_000
applog = logging.getLogger("app")
w = Worker("text://127.0.0.1:0", count=2, name="unprivileged", user="nobody")

def on_worker_start(worker):
    applog.info("worker %d runs as uid %d gid %d", worker.id, os.getuid(), os.getgid())
    Timer.add(0.1, lambda: applog.info("tick %d", os.getpid()))

def on_message(conn, line):
    for index in range(int(line)):
        applog.info("bulk %d %s", index, "y" * 150)
    conn.send(f"{os.getuid()}")

w.on_worker_start = on_worker_start
w.on_message = on_message
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_workers_run_as_another_user_and_still_log_after_rotation(app_factory):
    nobody = pwd.getpwnam("nobody")
    shared = Path(tempfile.mkdtemp(prefix="longshore-user-"))
    shared.chmod(0o755)  # the log file's folder must be reachable by the workers' user
    try:
        app = app_factory(RUN_AS_NOBODY)
        log_file = shared / "app.log"
        log_file.write_text("left by an earlier run as root\n")
        app.env["SHARED_LOG"] = str(log_file)
        app.start()
        processes = app.wait_running(2)
        for process in processes:
            uid_line = next(line for line in Path(f"/proc/{process['pid']}/status").read_text().splitlines() if line.startswith("Uid:"))
            assert uid_line.split()[1:] == [str(nobody.pw_uid)] * 4
        assert os.stat(f"/proc/{app.master_pid()}").st_uid == 0
        assert os.stat(log_file).st_uid == nobody.pw_uid
        text = log_file.read_text()
        assert text.count(f"runs as uid {nobody.pw_uid} gid {nobody.pw_gid}") == 2
        sock = connect(app.port())
        sock.sendall(b"250\n")
        assert read_lines(sock, 1) == [str(nobody.pw_uid)]
        rotated = Path(f"{log_file}.1")
        wait_for(rotated.exists, what="rotation")
        assert os.stat(log_file).st_uid == nobody.pw_uid  # the new file is the workers' too
        time.sleep(0.6)
        for process in processes:  # every worker reopened the new file
            wait_for(lambda: f"tick {process['pid']}" in log_file.read_text(), what="ticks in the new file")
        size = rotated.stat().st_size
        time.sleep(0.5)
        assert rotated.stat().st_size == size
        # The connections command still hears from workers that cannot write the run-time folder.
        listing = json.loads(app.cli("connections", "--json").stdout)
        assert len(listing["connections"]) == 1 and listing["no_answer"] == []
        app.cli("stop")
    finally:
        shutil.rmtree(shared, ignore_errors=True)


WATCHED = """
w = Worker("text://127.0.0.1:0", count=2, name="dev")
handler = {}

def on_worker_start(worker):
    sys.path.insert(0, os.environ["APP_DIR"])
    import handlers
    handler["fn"] = handlers.answer

w.on_worker_start = on_worker_start
w.on_message = lambda conn, line: conn.send(handler["fn"](line))
"""


def test_watch_reloads_when_a_module_changes(app_factory):
    app = app_factory(WATCHED)
    (app.folder / "handlers.py").write_text("def answer(line):\n    return 'v1 ' + line\n")
    app.cli("start", "-d", "--watch")
    before = {p["pid"] for p in app.wait_running(2)}
    port = app.port()

    def ask() -> str:
        sock = connect(port)
        sock.sendall(b"x\n")
        answer = read_lines(sock, 1)[0]
        sock.close()
        return answer

    assert ask() == "v1 x"
    watcher = wait_for(lambda: [h for h in app.status()["master"]["helpers"] if h["name"] == "watcher"], what="the watcher")
    wait_for(lambda: f"watcher pid {watcher[0]['pid']} watching" in app.log(), what="the watcher to watch")
    (app.folder / "handlers.py").write_text("def answer(line):\n    return 'v2 ' + line\n")
    wait_for(lambda: ask() == "v2 x", timeout=15, what="the new code to answer")

    def replaced():
        running = {p["pid"] for p in app.processes() if p["state"] == "running"}
        return len(running) == 2 and not running & before

    wait_for(replaced, timeout=15, what="two new worker processes")
    text = app.log()
    assert "watcher: handlers.py changed: graceful reload" in text
    assert "graceful reload" in text


def test_log_backup_count_zero_truncates_the_log_file_at_the_limit(app_factory):
    app = app_factory(
        """
import logging
Worker.log_max_bytes = 4000
Worker.log_backup_count = 0
applog = logging.getLogger("app")
w = Worker("text://127.0.0.1:0", name="chatty")

def on_message(conn, line):
    for index in range(int(line)):
        applog.info("bulk %d %s", index, "x" * 100)
    conn.send("done")

w.on_message = on_message
"""
    ).start()
    app.wait_running(1)
    folder = app.folder / ".longshore"
    log_file = folder / "start.log"
    sock = connect(app.port())
    sock.sendall(b"100\n")  # about 15 kB of log
    assert read_lines(sock, 1) == ["done"]
    wait_for(lambda: log_file.stat().st_size < 4000, what="the log file truncated")
    time.sleep(1.5)  # three checks of the master's loop
    text = log_file.read_text()
    assert text.count("log file rotated") <= 1, text  # once, not at every check
    assert log_file.stat().st_size < 4000
    assert not [name for name in os.listdir(folder) if name.startswith("start.log.")]
    sock.sendall(b"3\n")  # every process goes on writing into the same, shorter file
    assert read_lines(sock, 1) == ["done"]
    wait_for(lambda: "bulk 2 " in log_file.read_text(), what="the worker's lines after the truncation")


def _new_masters_rows(app) -> list[tuple[int, str]]:
    return [(p["pid"], p["state"]) for p in app.status()["processes"]]


def test_a_start_after_the_master_was_killed_gets_a_table_of_its_own(app_factory):
    """kill -9 of the master leaves a worker writing out a send buffer; the next master's
    status table must not show that orphan (nor have it overwrite the new rows)."""
    app = app_factory(
        """
w = Worker("tcp://127.0.0.1:0", count=1, name="w", stop_timeout=4)

def on_message(conn, data):
    for _ in range(100):
        conn.send(b"z" * 65536)

w.on_message = on_message
"""
    ).start()
    [old] = app.wait_running(1)
    sock = connect(app.port(), rcvbuf=4096)
    orphan = old["pid"]
    try:
        sock.sendall(b"go")
        wait_for(lambda: app.processes()[0]["send_buffer_bytes"] > 0, what="a send buffer")
        os.kill(app.master_pid(), signal.SIGKILL)
        app.start()
        [new] = app.wait_running(1)
        assert new["pid"] != orphan
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # the orphan publishes 5 times a second
            assert os.path.exists(f"/proc/{orphan}")  # (still there, still writing)
            assert _new_masters_rows(app) == [(new["pid"], "running")]
    finally:
        sock.close()
        try:
            os.kill(orphan, signal.SIGKILL)
        except ProcessLookupError:
            pass


SLOW_START = """
Worker.metrics_listen = "127.0.0.1:0"
a = Worker("text://127.0.0.1:0", count=1, name="twin")
a.on_message = lambda conn, line: conn.send(line)
b = Worker("text://127.0.0.1:0", count=1, name="twin")  # the same name, on purpose
b.on_message = lambda conn, line: conn.send(line)

# A worker process that takes its time before its first report: with the file "slow"
# present, each new process waits 1.5 s before making its event loop.
import longshore.worker as _worker
_make_loop = _worker.new_event_loop

def _slow_loop():
    if os.path.exists(os.path.join(os.environ["APP_DIR"], "slow")):
        time.sleep(1.5)
    return _make_loop()

_worker.new_event_loop = _slow_loop
"""


def test_a_respawning_process_shows_none_of_the_dead_ones_figures_nor_a_pid_0_series(app_factory):
    app = app_factory(SLOW_START).start()
    old = app.wait_running(2)
    address = app.status()["master"]["metrics_listen"]
    for index in range(2):
        sock = connect(app.port(index))
        for line in range(10):
            sock.sendall(b"x\n")
            assert read_lines(sock, 1) == ["x"]
        sock.close()
    wait_for(lambda: [p["total_request"] for p in app.processes()] == [10, 10], what="the requests counted")
    (app.folder / "slow").touch()
    for process in old:
        os.kill(process["pid"], signal.SIGKILL)
    old_pids = {p["pid"] for p in old}
    deadline = time.monotonic() + 1.2
    seen_starting = set()
    while time.monotonic() < deadline:
        for process in app.processes():
            if process["pid"] in old_pids:
                continue
            assert process["pid"] > 0 and process["total_request"] == 0 and process["memory"] == 0, process
            seen_starting.add(process["pid"])
        status, _, text = http_get(f"http://{address}/metrics")  # the parser refuses duplicate series
        samples = [
            (sample.name, tuple(sorted(sample.labels.items())))
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if "pid" in sample.labels
        ]
        assert len(samples) == len(set(samples)), "duplicate series"
        assert not [s for s in samples if dict(s[1])["pid"] == "0"], text
    assert len(seen_starting) == 2  # the new processes were there, under their own pids
    (app.folder / "slow").unlink()
    assert {p["pid"] for p in app.wait_running(2)} == seen_starting


def test_status_live_follows_a_restart(app_factory):
    app = app_factory('w = Worker("text://127.0.0.1:0", count=1, name="w")\n').start()
    app.wait_running(1)
    live = subprocess.Popen(
        [sys.executable, str(app.script), "status", "-d"], cwd=app.folder, env=app.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        time.sleep(0.5)
        app.cli("restart", "-d")
        master = app.master_pid()
        [worker] = app.wait_running(1)
        time.sleep(2.5)  # two more redraws
        assert live.poll() is None, live.communicate()[0]
    finally:
        live.terminate()
    frames = [frame for frame in live.communicate(timeout=10)[0].split("\n\n") if "master pid" in frame]
    assert f"master pid {master} " in frames[-1], frames[-1]
    assert f" {worker['pid']} " in frames[-1], frames[-1]
