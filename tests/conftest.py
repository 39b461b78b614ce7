"""Test harness: real start scripts, run as real daemons, talked to over real sockets.

``app_factory(body)`` writes a start script into a temporary folder (its run-time files
land in ``.longshore/`` there), and returns an :class:`App` that runs its command line.
Every app is stopped at the end of its test, and killed if it will not stop.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import pytest

HEADER = """\
import os, sys, json, time, asyncio
from longshore import Worker, Timer, TcpConnection, AsyncTcpConnection, run_all
from longshore.errors import SEND_FAIL, CONNECT_FAIL


def record(*words):  # a line in events.txt in the app's folder, for the test to read
    with open(os.path.join(os.environ["APP_DIR"], "events.txt"), "a") as f:
        f.write(" ".join(str(w) for w in words) + "\\n")
"""

FOOTER = """

if __name__ == "__main__":
    run_all()
"""


def paced_producer(total: int, chunk: int, name: str = "producer", stop_timeout: float = 10.0) -> str:
    """A start script body: a ``tcp://`` worker that, on a client's first bytes, sends it
    ``total`` bytes in blocks of ``chunk`` (block i is ``bytes([i % 251]) * chunk``),
    pausing on ``on_buffer_full`` and going on at ``on_buffer_drain``, then closes."""
    return f"""
w = Worker("tcp://127.0.0.1:0", name="{name}", stop_timeout={stop_timeout})
TOTAL = {total}
CHUNK = {chunk}
state = {{}}

def produce(conn):
    s = state[conn]
    while s["sent"] < TOTAL and not s["full"]:
        n = min(CHUNK, TOTAL - s["sent"])
        assert conn.send(bytes([s["sent"] // CHUNK % 251]) * n) is not False
        s["sent"] += n
    if s["sent"] >= TOTAL and not s["closing"]:
        s["closing"] = True
        conn.close()

def on_message(conn, data):
    if conn not in state:
        state[conn] = {{"sent": 0, "full": False, "closing": False}}
        produce(conn)

def on_buffer_full(conn):
    state[conn]["full"] = True

def on_buffer_drain(conn):
    state[conn]["full"] = False
    produce(conn)

w.on_message = on_message
w.on_buffer_full = on_buffer_full
w.on_buffer_drain = on_buffer_drain
"""


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class App:
    """A start script in its own folder, driven through its command line."""

    def __init__(self, folder: Path, body: str, name: str = "start.py") -> None:
        self.folder = folder
        self.script = folder / name
        self.script.write_text(HEADER + textwrap.dedent(body) + FOOTER)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "APP_DIR": str(folder)}

    def cli(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``python start.py <args>``."""
        result = subprocess.run(
            [sys.executable, str(self.script), *args],
            cwd=self.folder,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}\nlog:\n{self.log()}"
            )
        return result

    def start(self) -> App:
        """``start -d``; returns once the daemon says its workers run."""
        self.cli("start", "-d")
        return self

    def status(self) -> dict[str, Any]:
        """``status --json``, parsed."""
        return json.loads(self.cli("status", "--json", timeout=10).stdout)

    def port(self, index: int = 0) -> int:
        """The port the ``index``-th Worker listens on."""
        listen = self.status()["workers"][index]["listen"]
        return int(listen.rsplit(":", 1)[1])

    def processes(self, name: str | None = None) -> list[dict[str, Any]]:
        return [p for p in self.status()["processes"] if name is None or p["name"] == name]

    def wait_running(self, count: int, name: str | None = None, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until ``count`` processes (of worker ``name``) are running."""

        def ready() -> list[dict[str, Any]] | None:
            processes = [p for p in self.processes(name) if p["state"] == "running"]
            return processes if len(processes) == count else None

        return wait_for(ready, timeout, what=f"{count} running processes")

    def master_pid(self) -> int | None:
        try:
            return int((self.folder / ".longshore" / "start.pid").read_text())
        except (OSError, ValueError):
            return None

    @property
    def pid_file(self) -> Path:
        return self.folder / ".longshore" / "start.pid"

    def log(self) -> str:
        text = ""
        for name in ("start.log", "start.stdout.log"):
            path = self.folder / ".longshore" / name
            if path.exists():
                text += f"--- {name}\n" + path.read_text(errors="replace")[-20000:]
        return text

    def read_json(self, name: str) -> Any:
        return json.loads((self.folder / name).read_text())

    def kill_everything(self) -> None:
        """Last resort at teardown: SIGKILL the master and its workers."""
        pid = self.master_pid()
        if pid is None:
            return
        try:
            children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        except FileNotFoundError:
            children = []
        for target in [pid, *map(int, children)]:
            try:
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def app_factory(tmp_path: Path):
    apps: list[App] = []
    counter = iter(range(1000))

    def make(body: str, subfolder: str = "") -> App:
        """``subfolder``: put the app one folder deeper (a long name makes long paths)."""
        folder = tmp_path / f"app{next(counter)}"
        if subfolder:
            folder = folder / subfolder
        folder.mkdir(parents=True)
        app = App(folder, body)
        apps.append(app)
        return app

    yield make
    for app in apps:
        if app.master_pid() is not None:
            try:
                app.cli("stop", timeout=30, check=False)
            except subprocess.TimeoutExpired:
                pass
            app.kill_everything()


def connect(port: int, timeout: float = 5.0, rcvbuf: int | None = None) -> socket.socket:
    """A blocking client socket to 127.0.0.1:port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    return sock


def read_lines(sock: socket.socket, count: int, timeout: float = 5.0) -> list[str]:
    """Read ``count`` newline-terminated lines."""
    sock.settimeout(timeout)
    data = b""
    while data.count(b"\n") < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode().split("\n")[:count]


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes (a timeout fails the test)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_rest(sock: socket.socket) -> bytes:
    """What the peer sends until it closes, resets, or the socket's timeout passes."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return data


def raw_exchange(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send ``payload``, read until the server closes."""
    sock = connect(port, timeout)
    sock.sendall(payload)
    data = read_rest(sock)
    sock.close()
    return data


def is_closed(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True if the peer closed (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
