"""The monitor: a helper process serving metrics and a status page over HTTP.

``Worker.metrics_listen = "127.0.0.1:9100"`` makes the master bind that address (before
it forks, so port 0 resolves once and the port survives a respawn of the monitor) and
fork this process, which maps the status table read-only and serves:

=================  =====================================================================
``/metrics``       Prometheus text format (:mod:`longshore.metrics`)
``/status.json``   the ``status --json`` document, plus ``qps_history``: per pid, the
                   qps of the last minutes, one sample a second
``/``              a status page: the ``status`` table, redrawn every second, with a
                   small qps chart per process (plain HTML and inline JavaScript)
=================  =====================================================================

It runs asyncio (the master must not), and it is a separate process so that a slow
scraper never delays the master's supervision. The HTTP handled here is the small
subset these three read-only pages need (GET/HEAD, one request per connection); a
full HTTP stack would be more code to load than the pages themselves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
from collections import deque

from .lifeline import master_gone
from .loop import new_event_loop
from .metrics import exposition, make_registry
from .stats import StatsTable
from .status import collect
from .status_page import STATUS_PAGE

log = logging.getLogger("longshore")

#: Seconds of qps history kept per process for the status page.
HISTORY_SECONDS = 120
MAX_REQUEST_HEAD = 16 * 1024
REQUEST_TIMEOUT = 10.0
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def parse_host_port(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9100"``, ``"[::1]:9100"``, ``":9100"`` (all interfaces) -> (host, port)."""
    if "://" in listen:
        listen = listen.split("://", 1)[1]
    host, separator, port_text = listen.rpartition(":")
    if not separator or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{listen!r} is not host:port")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)


def bind_metrics_socket(listen: str) -> tuple[socket.socket, str]:
    """Master: bind and listen on ``listen``; return the socket and the bound ``host:port``."""
    host, port = parse_host_port(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=128)
    sock.setblocking(False)
    bound_port = sock.getsockname()[1]
    return sock, (f"[{host}]:{bound_port}" if family == socket.AF_INET6 else f"{host}:{bound_port}")


def run_monitor(sock: socket.socket, stats_file: str, master_pid: int) -> int:
    """Entry point of the monitor process; returns its exit code."""
    try:
        from setproctitle import setproctitle

        name = sock.getsockname()
        setproctitle(f"longshore: monitor http://{name[0]}:{name[1]}/")
    except ImportError:  # pragma: no cover
        pass
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(Monitor(sock, stats_file, master_pid).serve())
    finally:
        loop.close()


class Monitor:
    """The HTTP server of the monitor process."""

    def __init__(self, sock: socket.socket, stats_file: str, master_pid: int) -> None:
        self.sock = sock
        self.table = StatsTable.open(stats_file)
        self.master_pid = master_pid
        self.registry = make_registry(self.table)
        self.history: dict[int, deque[float]] = {}
        self.stopped: asyncio.Future[int] | None = None

    async def serve(self) -> int:
        """Serve until SIGTERM/SIGINT, or until the master is gone."""
        loop = asyncio.get_running_loop()
        self.stopped = loop.create_future()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        server = await asyncio.start_server(self.handle, sock=self.sock, limit=MAX_REQUEST_HEAD)
        log.info("monitor pid %d serving http://%s:%d/ (metrics at /metrics)", os.getpid(), *self.sock.getsockname()[:2])
        sampler = loop.create_task(self.sample_forever())
        try:
            return await self.stopped
        finally:
            sampler.cancel()
            server.close()
            self.table.close()

    def stop(self) -> None:
        if self.stopped is not None and not self.stopped.done():
            self.stopped.set_result(0)

    async def sample_forever(self) -> None:
        """Once a second: record every process's qps; exit if the master has gone."""
        while True:
            if master_gone(self.master_pid):
                log.warning("monitor: the master pid %d has gone; exiting", self.master_pid)
                self.stop()
                return
            self.sample()
            await asyncio.sleep(1.0)

    def sample(self) -> None:
        live = set()
        for record in self.table.read_slots():
            if record.pid <= 0:
                continue
            live.add(record.pid)
            self.history.setdefault(record.pid, deque(maxlen=HISTORY_SECONDS)).append(round(record.qps, 1))
        for pid in list(self.history):
            if pid not in live:
                del self.history[pid]

    # -- HTTP --------------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
                return
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                self.respond(writer, 400, "text/plain; charset=utf-8", b"bad request\n")
            else:
                method, target = parts[0], parts[1]
                status, content_type, body = self.route(method, target.split("?", 1)[0])
                self.respond(writer, status, content_type, body, head_only=method == "HEAD")
            await writer.drain()
        except ConnectionError:
            pass
        except Exception:
            log.exception("monitor: error while answering a request")
        finally:
            writer.close()

    def route(self, method: str, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a request."""
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"method not allowed\n"
        if path == "/metrics":
            return 200, PROMETHEUS_CONTENT_TYPE, exposition(self.registry)
        if path == "/status.json":
            document = collect(self.table)
            document["qps_history"] = {str(pid): list(samples) for pid, samples in self.history.items()}
            document["time"] = time.time()
            return 200, "application/json", json.dumps(document).encode()
        if path in ("/", "/index.html"):
            return 200, "text/html; charset=utf-8", STATUS_PAGE.encode()
        return 404, "text/plain; charset=utf-8", b"not found: try /, /metrics or /status.json\n"

    def respond(self, writer: asyncio.StreamWriter, status: int, content_type: str, body: bytes, head_only: bool = False) -> None:
        reasons = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
        head = (
            f"HTTP/1.1 {status} {reasons.get(status, 'Error')}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        writer.write(head if head_only else head + body)
