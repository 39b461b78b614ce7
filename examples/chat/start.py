"""A line-based chat server: the longshore demo.

Run it with ``python3 dev.py demo`` (or ``python examples/chat/start.py start``), then,
in other terminals, ``nc 127.0.0.1 2345`` (or ``telnet 127.0.0.1 2345``) a few times and
type. ``/nick NAME`` renames you, ``/who`` lists who is here, ``/quit`` leaves. In yet
another terminal, ``python examples/chat/start.py status`` shows the processes, and
``python examples/chat/start.py connections`` every connection.

``CHAT_PORT`` changes the port (0 picks a free one; ``status`` shows it).
"""

from __future__ import annotations

import os

from longshore import Timer, TcpConnection, Worker, run_all

PORT = int(os.environ.get("CHAT_PORT", "2345"))

chat = Worker(f"text://0.0.0.0:{PORT}", name="chat")
#: A chat line is short: anything longer than 4 KiB closes that connection.
TcpConnection.default_max_package_size = 4096

nicknames: dict[TcpConnection, str] = {}


def broadcast(text: str, exclude: TcpConnection | None = None) -> None:
    """Send one line to everyone; a client that stopped reading only loses its own copy."""
    for connection in list(chat.connections.values()):
        if connection is not exclude:
            connection.send(text)


def on_connect(connection: TcpConnection) -> None:
    nicknames[connection] = f"guest{connection.id}"
    connection.send(f"welcome, {nicknames[connection]}! /nick NAME, /who, /quit")
    broadcast(f"* {nicknames[connection]} joined from {connection.remote_ip}", exclude=connection)


def on_message(connection: TcpConnection, line: str) -> None:
    line = line.strip()
    if not line:
        return
    if line.startswith("/nick "):
        old, new = nicknames[connection], line[6:].strip()[:32] or nicknames[connection]
        nicknames[connection] = new
        broadcast(f"* {old} is now {new}")
    elif line == "/who":
        connection.send("* here: " + ", ".join(sorted(nicknames.values())))
    elif line == "/quit":
        connection.close("bye")
    else:
        broadcast(f"<{nicknames[connection]}> {line}")


def on_close(connection: TcpConnection) -> None:
    name = nicknames.pop(connection, None)
    if name:
        broadcast(f"* {name} left")


def on_worker_start(worker: Worker) -> None:
    # A heartbeat line every minute keeps idle NAT mappings open (and shows a timer in status).
    Timer.add(60, broadcast, "* tick")


chat.on_connect = on_connect
chat.on_message = on_message
chat.on_close = on_close
chat.on_worker_start = on_worker_start

if __name__ == "__main__":
    run_all()
