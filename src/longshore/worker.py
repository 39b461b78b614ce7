"""What a Worker is, and how one worker process runs.

A :class:`Worker` is configuration: a listen URL, a process count, callbacks. The
master forks ``count`` processes for it; each runs :func:`run_worker_process`, which
builds a fresh event loop, calls ``on_worker_start``, accepts connections on the socket
the master bound (or on its own ``SO_REUSEPORT`` socket), publishes its counters into
the status table, and stops on the master's signal:

=========  ===========================================================================
SIGTERM    stop: stop accepting, close every connection (writing out send buffers),
SIGINT     wait up to ``stop_timeout`` for them to drain, exit
SIGQUIT    graceful stop: stop accepting, wait (up to ``stop_timeout``) for the
           connections to end by themselves, then as above
SIGUSR1    reload: like SIGTERM; a Worker with ``reloadable=False`` only gets
           ``on_worker_reload`` and keeps running
SIGUSR2    graceful reload: like SIGQUIT (``reloadable=False``: ``on_worker_reload``)
SIGIO      write the list of connections for the ``connections`` command
=========  ===========================================================================

A stop or reload signal that arrives while the worker starts is handled once start-up
(``on_worker_start``, however long it awaits) is over: ``on_worker_stop`` never runs
beside ``on_worker_start``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import socket
import sys
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, ClassVar, NoReturn

from .connection.tcp import Handlers, TcpConnection, report_exception
from .connection.tls import TlsAcceptor, abort_handshakes, pending_handshakes, server_context
from .listen import ListenAddress, bind_socket, parse_listen
from .loop import new_event_loop
from .protocols import get_protocol
from .protocols.base import Protocol
from .stats import PUBLISH_INTERVAL, STATE_RUNNING, STATE_STOPPING, StatsTable, process_stats, rss_bytes
from .timer import Timer
from . import lifeline, logs, tasks, users

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("longshore")

#: Exit code of a worker whose ``on_worker_start`` raised: the master backs off.
EXIT_BOOT_ERROR = 3

#: Listen schemes that mean a protocol over TLS.
_TLS_SCHEMES = {"https": "http", "wss": "websocket"}

#: At a stop, how long cancelled coroutines (callbacks, timers, hooks) get to finish.
CANCEL_GRACE = 1.0
#: Loop turns a stopping worker waits for connections accepted just before its listener closed.
ACCEPT_SETTLE_TURNS = 4

#: Signals the master sends its workers; blocked from the fork until the loop handles them.
CONTROL_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2})

_SIGNAL_ACTIONS = {
    signal.SIGTERM: ("stop", False),
    signal.SIGINT: ("stop", False),
    signal.SIGQUIT: ("stop", True),
    signal.SIGUSR1: ("reload", False),
    signal.SIGUSR2: ("reload", True),
}


def _ignore_signal(signum: int, frame: Any) -> None:
    """A signal handler that does nothing."""


class Worker:
    """A group of ``count`` identical processes serving one listen URL.

    ``listen`` is a URL (``text://0.0.0.0:2345``, ``frame://``, ``tcp://``,
    ``unix:///path``, or a registered protocol's scheme) or None for a worker that only
    runs timers. ``ssl`` (an :class:`ssl.SSLContext`, or a dict with ``certfile`` and
    ``keyfile``: :func:`longshore.connection.tls.server_context`) serves the protocol over
    TLS; ``transport="ssl"`` says the same, and ``https://`` / ``wss://`` listen URLs are
    ``http://`` / ``websocket://`` with TLS. Callbacks are assigned as attributes::

        worker = Worker("text://0.0.0.0:2345", count=4, name="chat")
        worker.on_message = lambda conn, line: conn.send(line)

    ``worker.id`` is the process slot, 0..count-1, kept when a process is respawned.
    """

    #: Every Worker created in this program, in creation order.
    _all: ClassVar[list[Worker]] = []
    #: The Worker this process runs (None in the master).
    current: ClassVar[Worker | None] = None

    #: Where the master writes its pid (default: ``.longshore/<script>.pid`` next to the start script).
    pid_file: ClassVar[str | None] = None
    #: The log file (default: ``.longshore/<script>.log``).
    log_file: ClassVar[str | None] = None
    #: Where a daemon's stdout and stderr go (default: ``.longshore/<script>.stdout.log``).
    stdout_file: ClassVar[str | None] = None
    #: The log file is rotated when it reaches this size (0: never) ...
    log_max_bytes: ClassVar[int] = 10 * 1024 * 1024
    #: ... keeping this many old files (``start.log.1`` is the newest).
    log_backup_count: ClassVar[int] = 5
    #: ``"127.0.0.1:9100"``: serve Prometheus metrics (``/metrics``) and a status page
    #: (``/``) from a monitor process; port 0 picks a free port (see ``status``).
    metrics_listen: ClassVar[str | None] = None
    #: The channel backend (:mod:`longshore.channel`): None or ``"embedded"`` (a hub
    #: process of the master; started when the start script imports
    #: ``longshore.channel``), or ``"redis://host:port/db"`` (across machines).
    channel: ClassVar[str | None] = None
    #: Namespace of the channel's topics and keys: the same for every instance of one application.
    channel_prefix: ClassVar[str] = "longshore"
    #: Master hooks (class attributes): called in the master process.
    on_master_start: ClassVar[Callable[[], Any] | None] = None
    on_master_stop: ClassVar[Callable[[], Any] | None] = None
    on_master_reload: ClassVar[Callable[[], Any] | None] = None

    def __init__(
        self,
        listen: str | None = None,
        *,
        count: int = 1,
        name: str | None = None,
        reuse_port: bool = False,
        protocol: type[Protocol] | str | None = None,
        backlog: int = 1024,
        reloadable: bool = True,
        stop_timeout: float = 10.0,
        unix_mode: int = 0o666,
        user: str | int | None = None,
        group: str | int | None = None,
        ssl: Any = None,
        transport: str | None = None,
        ssl_handshake_timeout: float = 10.0,
    ) -> None:
        if count < 1:
            raise ValueError("a Worker needs count >= 1")
        self.listen = listen
        self.address: ListenAddress | None = parse_listen(listen) if listen else None
        tls_scheme = self.address is not None and self.address.scheme in _TLS_SCHEMES
        if transport not in (None, "tcp", "ssl", "tls"):
            raise ValueError(f"transport={transport!r}: use 'ssl' for TLS (udp and unix come from the listen URL)")
        if (transport in ("ssl", "tls") or tls_scheme) and ssl is None:
            raise ValueError("a TLS worker needs ssl=ssl_context or ssl={'certfile': ..., 'keyfile': ...}")
        if ssl is not None and self.address is not None and self.address.transport == "udp":
            raise ValueError("TLS is for stream listeners, not udp://")
        #: The TLS option (an SSLContext or a dict of certificate paths), or None.
        self.ssl = ssl
        self.transport = "ssl" if ssl is not None else "tcp"
        self.ssl_handshake_timeout = ssl_handshake_timeout
        if isinstance(protocol, str):
            protocol = get_protocol(protocol)
        elif protocol is None and self.address is not None:
            protocol = get_protocol(_TLS_SCHEMES.get(self.address.scheme, self.address.scheme))
        self.protocol: type[Protocol] | None = protocol
        self.count = count
        self.name = name or "none"
        self.reuse_port = reuse_port
        self.backlog = backlog
        self.reloadable = reloadable
        self.stop_timeout = stop_timeout
        self.unix_mode = unix_mode
        #: Run the worker processes as this user (and group; default: the user's own).
        #: Takes effect when the master runs as root.
        self.user = user
        self.group = group
        #: The process slot, 0..count-1 (set in the worker process).
        self.id = -1
        #: Open connections of this process, by connection id.
        self.connections: dict[int, TcpConnection] = {}
        self.on_worker_start: Callable[[Worker], Any] | None = None
        self.on_worker_stop: Callable[[Worker], Any] | None = None
        self.on_worker_reload: Callable[[Worker], Any] | None = None
        self.on_worker_exit: Callable[[Worker, int, int], Any] | None = None
        self.on_connect: Callable[[TcpConnection], Any] | None = None
        self.on_message: Callable[[TcpConnection, Any], Any] | None = None
        self.on_close: Callable[[TcpConnection], Any] | None = None
        self.on_error: Callable[[TcpConnection, int, str], Any] | None = None
        self.on_buffer_full: Callable[[TcpConnection], Any] | None = None
        self.on_buffer_drain: Callable[[TcpConnection], Any] | None = None
        #: The listen URL with the real port, once bound (port 0 picks a free one).
        self.bound_listen = listen or ""
        self._socket: socket.socket | None = None
        self._closed_bytes_read = 0
        self._closed_bytes_written = 0
        Worker._all.append(self)

    def __repr__(self) -> str:
        return f"<Worker {self.name} {self.listen or '(no listener)'} count={self.count}>"

    # -- master side -------------------------------------------------------------------
    @property
    def socket_per_process(self) -> bool:
        """Each worker process binds its own SO_REUSEPORT socket (``reuse_port``; a Unix
        socket has one path, so its workers always share the master's socket)."""
        return self.reuse_port and self.address is not None and self.address.transport != "unix"

    def bind(self) -> None:
        """Master: bind the listening socket (a placeholder only, with reuse_port)."""
        if self.address is None or self._socket is not None:
            return
        # With a socket per process the master still binds (without listening) so that
        # port 0 resolves to one port that every worker process then shares.
        per_worker = self.socket_per_process
        self._socket = bind_socket(
            self.address,
            reuse_port=per_worker,
            backlog=self.backlog,
            listen=not per_worker,
            unix_mode=self.unix_mode,
        )
        if self.address.transport != "unix":
            self.bound_listen = self.address.display(self._socket.getsockname()[1])
        else:
            self._give_unix_socket_to_user()
        if self.ssl is not None:
            server_context(self.ssl)  # a missing or wrong certificate stops `start` here

    def _give_unix_socket_to_user(self) -> None:
        """A Unix socket file belongs to the user the workers run as."""
        identity = users.resolve(self.user, self.group)
        if identity is not None and users.needs_switch(identity) and users.can_switch():
            assert self.address is not None
            os.chown(self.address.path, identity.uid, identity.gid)

    def unbind(self) -> None:
        """Master: close the listening socket (and remove a Unix socket file)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
            if self.address is not None and self.address.transport == "unix":
                try:
                    os.unlink(self.address.path)
                except FileNotFoundError:
                    pass


def _channel_in_use() -> bool:
    """True when the application uses :mod:`longshore.channel` (imported, or ``Worker.channel`` set)."""
    return Worker.channel is not None or "longshore.channel" in sys.modules


def run_worker_process(worker: Worker, worker_id: int, table: StatsTable, slot: int, runtime: Runtime, master_pid: int) -> NoReturn:
    """Entry point of a forked worker process; never returns."""
    code = 1
    try:
        code = _WorkerProcess(worker, worker_id, table, slot, runtime, master_pid).run()
    except BaseException:
        log.exception("worker %s[%d] failed", worker.name, worker_id)
    uploads = sys.modules.get("longshore.protocols.http.uploads")
    if uploads is not None:  # os._exit runs no finalizers: remove the uploads' temporary files
        uploads.remove_temporary_files()
    logs.flush_and_exit(code)


class _WorkerProcess:
    """The running state of one worker process."""

    def __init__(self, worker: Worker, worker_id: int, table: StatsTable, slot: int, runtime: Runtime, master_pid: int) -> None:
        self.worker = worker
        self.worker_id = worker_id
        self.table = table
        self.slot = slot
        self.runtime = runtime
        self.master_pid = master_pid
        self.master_lost = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: asyncio.AbstractServer | None = None
        #: What the listener makes of an accepted socket, when this process listens on a
        #: socket of its own (reuse_port): its backlog is taken over before it closes.
        self.own_listener_factory: Callable[[], asyncio.BaseProtocol] | None = None
        self.udp_transport: asyncio.BaseTransport | None = None
        self.stopping = False
        self.graceful = False
        #: False until start-up (``on_worker_start``, the listener) is over; signals
        #: that arrive before wait in ``early_signals``.
        self.started = False
        self.early_signals: list[tuple[str, bool]] = []
        self.done: asyncio.Future[int] | None = None
        self.shutdown_task: asyncio.Task[None] | None = None
        self.qps_samples: deque[tuple[float, int]] = deque()
        self.publish_count = 0
        self.cached_send_buffer = 0
        self.cached_bytes = (0, 0)
        self.connections_fd: int | None = None
        self.own_socket: socket.socket | None = None
        self.ssl_context: Any = None

    def run(self) -> int:
        worker = self.worker
        worker.id = self.worker_id
        Worker.current = worker
        process_stats.reset()
        Timer._reset_for_worker()
        random.seed()
        for other in Worker._all:  # this process serves only its own listener
            if other is not worker and other._socket is not None:
                other._socket.close()
                other._socket = None
        for signum in (*_SIGNAL_ACTIONS, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        # A closed terminal sends SIGHUP to the whole process group: the master stops
        # the workers then, as for Ctrl+C. (A handler, not SIG_IGN, which programs the
        # worker runs would inherit.)
        signal.signal(signal.SIGHUP, _ignore_signal)
        signal.signal(signal.SIGIO, signal.SIG_IGN)  # until the loop handles it
        try:
            from setproctitle import setproctitle

            setproctitle(f"longshore: worker {worker.name} {worker.bound_listen or '(no listener)'}".rstrip())
        except ImportError:  # pragma: no cover
            pass
        if worker.ssl is not None:  # read the key while still allowed to; a reload rereads it
            self.ssl_context = server_context(worker.ssl)
        identity = users.resolve(worker.user, worker.group) if users.can_switch() else None
        if identity is not None and users.needs_switch(identity):
            self.prepare_user_switch()
            users.switch_to(identity)
        if lifeline.follow_master(self.master_pid):  # (after the user switch, which resets it)
            # The master died before the kernel could be told: stop as soon as the loop runs.
            os.kill(os.getpid(), signal.SIGTERM)
        loop = new_event_loop()
        asyncio.set_event_loop(loop)
        self.loop = loop
        loop.set_exception_handler(self._loop_exception)
        try:
            return loop.run_until_complete(self.main())
        finally:
            try:
                loop.close()
            except Exception:
                pass

    def prepare_user_switch(self) -> None:
        """Before giving up root: open what the worker cannot open afterwards."""
        # The connection list is written through a descriptor opened now: the run-time
        # folder may be out of the new user's reach.
        self.connections_fd = os.open(self.runtime.connections_file(os.getpid()), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        worker = self.worker
        address = worker.address
        if worker.socket_per_process and address is not None:
            # SO_REUSEPORT sockets of one port must belong to the same user: bind as root
            # (listening starts once the worker serves).
            port = worker._socket.getsockname()[1] if worker._socket is not None else address.port
            own = ListenAddress(address.url, address.scheme, address.transport, address.host, port, address.path)
            self.own_socket = bind_socket(own, reuse_port=True, backlog=worker.backlog, listen=False)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        process_stats.throw_exception += 1
        log.error("worker %s[%d]: %s", self.worker.name, self.worker_id, context.get("message"), exc_info=exc)

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        worker = self.worker
        self.done = loop.create_future()
        for signum, (action, graceful) in _SIGNAL_ACTIONS.items():
            loop.add_signal_handler(signum, self.on_signal, action, graceful)
        loop.add_signal_handler(signal.SIGIO, self.dump_connections)
        # The master forked us with these blocked: what it sent meanwhile arrives now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, CONTROL_SIGNALS)
        self.publish()
        if _channel_in_use():
            from . import channel

            await channel.start_in_worker(self.runtime)
        if worker.on_worker_start is not None:
            try:
                result = worker.on_worker_start(worker)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                process_stats.throw_exception += 1
                log.exception("on_worker_start of worker %s[%d] raised; exiting", worker.name, self.worker_id)
                return EXIT_BOOT_ERROR
        if worker.address is not None and not self.stop_asked_early():
            await self.start_serving()
        self.started = True
        early, self.early_signals = self.early_signals, []
        for action, graceful in early:  # a stop now runs after on_worker_start, never beside it
            self.on_signal(action, graceful)
        if not self.stopping:
            self.table.set_state(self.slot, STATE_RUNNING)
            log.debug("worker %s[%d] pid %d running", worker.name, self.worker_id, os.getpid())
        return await self.done

    def stop_asked_early(self) -> bool:
        """True when a signal that arrived during start-up will stop this process."""
        return any(action == "stop" or self.worker.reloadable for action, _ in self.early_signals)

    async def start_serving(self) -> None:
        worker = self.worker
        address = worker.address
        assert address is not None and worker.protocol is not None
        if self.own_socket is not None:
            if worker._socket is not None:
                worker._socket.close()
            sock = self.own_socket
            sock.listen(worker.backlog)
        elif worker.socket_per_process:
            port = worker._socket.getsockname()[1] if worker._socket is not None else address.port
            if worker._socket is not None:
                worker._socket.close()
            own = ListenAddress(address.url, address.scheme, address.transport, address.host, port, address.path)
            sock = bind_socket(own, reuse_port=True, backlog=worker.backlog)
        else:
            assert worker._socket is not None, "the master binds a worker's socket before forking"
            sock = worker._socket
        worker._socket = None
        handlers = Handlers(worker)
        protocol_class = worker.protocol

        def factory() -> TcpConnection:
            return TcpConnection(worker, protocol_class, handlers)

        loop = asyncio.get_running_loop()
        if address.transport == "udp":
            from .connection.udp import UdpServer

            transport, _ = await loop.create_datagram_endpoint(lambda: UdpServer(worker, protocol_class, handlers), sock=sock)
            self.udp_transport = transport
            return
        accepted: Callable[[], asyncio.BaseProtocol] = factory
        if self.ssl_context is not None:
            context, timeout = self.ssl_context, worker.ssl_handshake_timeout
            accepted = lambda: TlsAcceptor(context, factory, timeout)  # noqa: E731
        if worker.socket_per_process:
            self.own_listener_factory = accepted
        self.server = await loop.create_server(accepted, sock=sock, backlog=worker.backlog)

    # -- signals -----------------------------------------------------------------------
    def on_signal(self, action: str, graceful: bool) -> None:
        if not self.started:  # handled once start-up is over
            self.early_signals.append((action, graceful))
            return
        worker = self.worker
        if action == "reload" and not worker.reloadable:
            if worker.on_worker_reload is not None:
                self.call_hook(worker.on_worker_reload, "on_worker_reload")
            return
        if action == "reload" and worker.on_worker_reload is not None:
            self.call_hook(worker.on_worker_reload, "on_worker_reload")
        if self.stopping:
            if self.graceful and not graceful:
                self.graceful = False  # escalate a graceful stop to a quick one
            return
        self.stopping = True
        self.graceful = graceful
        self.shutdown_task = asyncio.get_running_loop().create_task(self.shutdown())

    def call_hook(self, hook: Callable[[Worker], Any], what: str) -> None:
        try:
            result = hook(self.worker)
            if asyncio.iscoroutine(result):
                tasks.run_coroutine(result, what)
        except Exception:
            report_exception(what)

    async def shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        worker = self.worker
        self.table.set_state(self.slot, STATE_STOPPING)
        if self.server is not None:
            await self.close_listener(self.server)
        if self.udp_transport is not None:
            self.udp_transport.close()
        # Connections accepted just before the listener closed are not in
        # worker.connections yet: the loop calls their connection_made soon (uvloop:
        # one turn; the stdlib loop: through a task). Let them arrive, so that they are
        # served or told like the others rather than cut when the process exits.
        for _ in range(ACCEPT_SETTLE_TURNS):
            await asyncio.sleep(0)
        handshakes = pending_handshakes()
        log.info(
            "worker %s[%d] pid %d %s (%d connections%s)",
            worker.name,
            self.worker_id,
            os.getpid(),
            "stopping gracefully" if self.graceful else "stopping",
            len(worker.connections),
            f", {handshakes} TLS handshakes" if handshakes else "",
        )
        deadline = loop.time() + worker.stop_timeout
        if not self.graceful:
            abort_handshakes()
        if worker.on_worker_stop is not None:
            try:
                result = worker.on_worker_stop(worker)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                report_exception("on_worker_stop")
        told: dict[int, Protocol] = {}
        # A TLS handshake under way is a client that connected: it may finish (bounded by
        # ssl_handshake_timeout) and is then told like the other connections.
        while self.graceful and (worker.connections or pending_handshakes()) and loop.time() < deadline:
            self.tell_graceful(told)
            await asyncio.sleep(0.05)
        abort_handshakes()
        if self.graceful and worker.connections:
            deadline = loop.time() + 1.0  # graceful time is up: flush briefly, then cut
        for connection in list(worker.connections.values()):
            try:
                connection.protocol.going_away()
            except Exception:
                report_exception("going_away", connection)
            connection.close()
        while worker.connections and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(worker.connections.values()):
            connection.destroy()
        await asyncio.sleep(0)
        Timer.delete_all()
        # What still awaits is cancelled; a connection's on_close still runs (after the
        # last message it handled).
        await self.cancel_tasks(tasks.running(), "coroutine callbacks, timers or hooks")
        if _channel_in_use():
            from . import channel

            await channel.stop_in_worker()
        self.publish()
        if self.done is not None and not self.done.done():
            self.done.set_result(0)

    async def close_listener(self, server: asyncio.AbstractServer) -> None:
        """Stop accepting. A shared listening socket stays open in the master and the
        other workers, so what waits in its backlog is theirs. A socket of this process's
        own (reuse_port) would reset what waits in its backlog when it closes: those
        connections are accepted here first, from a copy of the socket closed at once
        after it (only a connection completing in that instant can still be reset)."""
        factory = self.own_listener_factory
        sockets = getattr(server, "sockets", None)  # asyncio.Server's (and uvloop's)
        if factory is None or not sockets:
            server.close()
            return
        spare = socket.socket(fileno=os.dup(sockets[0].fileno()))
        server.close()
        for _ in range(2):
            await asyncio.sleep(0)  # the loop closes its own descriptor of the socket
        waiting: list[socket.socket] = []
        try:
            spare.setblocking(False)
            while True:
                try:
                    client, _ = spare.accept()
                except (BlockingIOError, InterruptedError):
                    break
                client.setblocking(False)
                waiting.append(client)
        except OSError as exc:
            log.warning("worker %s[%d]: taking over the backlog of its listener: %s", self.worker.name, self.worker_id, exc)
        finally:
            spare.close()
        if waiting:
            log.info("worker %s[%d]: %d connections taken over from its listener's backlog", self.worker.name, self.worker_id, len(waiting))
        loop = asyncio.get_running_loop()
        for client in waiting:
            try:
                await loop.connect_accepted_socket(factory, client)
            except OSError:
                client.close()  # the client left meanwhile

    async def cancel_tasks(self, running: set[asyncio.Future[Any]], what: str) -> None:
        """Cancel ``running`` tasks and give them a moment to run their ``finally`` blocks."""
        for task in running:
            task.cancel()
        if not running:
            return
        _, pending = await asyncio.wait(running, timeout=CANCEL_GRACE)
        if pending:
            log.warning("worker %s[%d]: %d %s did not end within %.1f s of being cancelled", self.worker.name, self.worker_id, len(pending), what, CANCEL_GRACE)

    def tell_graceful(self, told: dict[int, Protocol]) -> None:
        """Call ``graceful_close`` once on each connection's protocol, and again on a
        protocol that replaced it meanwhile (an ``http://`` connection upgraded to WebSocket)."""
        for connection in list(self.worker.connections.values()):
            protocol = connection.protocol
            if told.get(connection.id) is protocol:
                continue
            told[connection.id] = protocol
            try:
                protocol.graceful_close()
            except Exception:
                report_exception("graceful_close", connection)

    # -- status ------------------------------------------------------------------------
    def publish(self) -> None:
        """Copy this process's counters into its slot; re-arms itself."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        total = process_stats.total_request
        samples = self.qps_samples
        samples.append((now, total))
        while len(samples) > 2 and now - samples[1][0] >= 1.0:
            samples.popleft()
        first_time, first_total = samples[0]
        qps = (total - first_total) / (now - first_time) if now - first_time > 0.05 else 0.0
        connections = self.worker.connections
        if self.publish_count % 5 == 0:  # the costlier sums and checks once a second
            self.check_master()
            send_buffer = read = written = 0
            for connection in connections.values():
                waiting = connection.send_buffer_size
                transport = connection.transport
                if transport is None or not transport.is_closing() or connection.state != "established":
                    connection._unsent_hint = waiting  # (a transport that failed by itself keeps it for connection_lost)
                send_buffer += waiting
                read += connection.bytes_read
                written += connection.bytes_written
            self.cached_send_buffer = send_buffer
            self.cached_bytes = (read + self.worker._closed_bytes_read, written + self.worker._closed_bytes_written)
        self.publish_count += 1
        self.table.write_slot(
            self.slot,
            pid=os.getpid(),
            heartbeat=now,
            connections=process_stats.connections,
            send_fail=process_stats.send_fail,
            timers=Timer.count(),
            total_request=total,
            throw_exception=process_stats.throw_exception,
            memory=rss_bytes(),
            qps=qps,
            send_buffer_bytes=self.cached_send_buffer,
            bytes_read=self.cached_bytes[0],
            bytes_written=self.cached_bytes[1],
            protocol_error=process_stats.protocol_error,
            package_too_large=process_stats.package_too_large,
            connect_fail=process_stats.connect_fail,
            tls_error=process_stats.tls_error,
            channel_published=process_stats.channel_published,
            channel_delivered=process_stats.channel_delivered,
            channel_dropped=process_stats.channel_dropped,
        )
        if self.done is None or not self.done.done():
            loop.call_later(PUBLISH_INTERVAL, self.publish)

    def check_master(self) -> None:
        """Stop (quickly, writing out send buffers) once the master has died."""
        if self.master_lost or not lifeline.master_gone(self.master_pid):
            return
        self.master_lost = True
        log.warning("worker %s[%d] pid %d: the master pid %d has gone; stopping", self.worker.name, self.worker_id, os.getpid(), self.master_pid)
        self.on_signal("stop", False)

    def dump_connections(self) -> None:
        """Write this process's connections as JSON for the ``connections`` command."""
        worker = self.worker
        loop = asyncio.get_running_loop()
        now = loop.time()
        rows = [
            {
                "pid": os.getpid(),
                "worker": worker.name,
                "worker_id": self.worker_id,
                "id": connection.id,
                "protocol": connection.protocol.scheme or type(connection.protocol).__name__,
                "local": connection.local_address,
                "remote": connection.remote_address,
                "send_buffer": connection.send_buffer_size,
                "recv_buffer": connection.protocol.buffered(),
                "bytes_read": connection.bytes_read,
                "bytes_written": connection.bytes_written,
                "state": connection.state,
                "age": round(now - connection.created_at, 3),
                "paused": bool(connection._recv_paused),
            }
            for connection in list(worker.connections.values())
        ]
        path = self.runtime.connections_file(os.getpid())
        temporary = f"{path}.tmp"
        if self.connections_fd is not None:  # running as another user: write in place
            try:
                data = json.dumps(rows).encode()
                os.ftruncate(self.connections_fd, 0)
                os.pwrite(self.connections_fd, data, 0)
            except OSError:
                log.exception("could not write the connection list to %s", path)
            return
        try:
            with open(temporary, "w") as file:
                json.dump(rows, file)
            os.replace(temporary, path)
        except OSError:
            log.exception("could not write the connection list to %s", path)
