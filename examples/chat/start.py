"""A chat and push server with a web page: the longshore demo.

Run it with ``python3 dev.py demo`` (or ``python examples/chat/start.py start``), then
open http://127.0.0.1:2345/ in a few browser tabs and type. ``/nick NAME`` renames you,
``/who`` lists who is here, ``/quit`` leaves; the server also pushes the time every few
seconds. In another terminal, ``python examples/chat/start.py status`` shows the
processes, and ``python examples/chat/start.py connections`` every connection.

Two workers of one app: ``web`` (``http://``, port 2345) serves the page, ``chat``
(``websocket://``, port 2346) carries the messages. Any WebSocket client works too:
``python -m websockets ws://127.0.0.1:2346/``.

``CHAT_PORT`` and ``CHAT_WS_PORT`` change the ports (0 picks a free one; ``status`` shows
it); ``CHAT_PUSH_INTERVAL`` the seconds between pushes (0: none).

The chat runs in ``CHAT_PROCESSES`` (4) worker processes: every connection joins the
group ``chat`` and messages go out with ``channel.send_to_group``, which reaches members
in every process. ``CHAT_CHANNEL=redis://127.0.0.1:6379/0`` puts the channel on Redis:
start two copies (different ports, same Redis) and their users talk to each other.
"""

from __future__ import annotations

import asyncio
import html
import os
import time

from longshore import Timer, TcpConnection, Worker, channel, run_all
from longshore.http import Request, Response

PORT = int(os.environ.get("CHAT_PORT", "2345"))
WS_PORT = int(os.environ.get("CHAT_WS_PORT", "2346"))
PUSH_INTERVAL = float(os.environ.get("CHAT_PUSH_INTERVAL", "5"))

chat = Worker(f"websocket://0.0.0.0:{WS_PORT}", count=int(os.environ.get("CHAT_PROCESSES", "4")), name="chat")
Worker.channel = os.environ.get("CHAT_CHANNEL") or None
web = Worker(f"http://0.0.0.0:{PORT}", name="web")

nicknames: dict[TcpConnection, str] = {}


def broadcast(text: str, exclude: TcpConnection | None = None) -> None:
    """Send one message to everyone, in every process; a client that stopped reading only
    loses its own copy."""
    channel.send_to_group("chat", text, exclude=exclude)


def on_websocket_connected(connection: TcpConnection) -> None:
    #: A chat message is short: anything longer than 4 KiB closes that connection (1009).
    connection.max_package_size = 4096
    nicknames[connection] = f"guest{chat.id}.{connection.id}"
    channel.join_group(connection, "chat")
    connection.send(f"welcome, {nicknames[connection]}! /nick NAME, /who, /quit")
    broadcast(f"* {nicknames[connection]} joined from {connection.remote_ip}", exclude=connection)


def on_message(connection: TcpConnection, message: str | bytes) -> None:
    if isinstance(message, bytes):
        message = message.decode(errors="replace")
    line = message.strip()
    if not line:
        return
    if line.startswith("/nick "):
        old, new = nicknames[connection], line[6:].strip()[:32] or nicknames[connection]
        nicknames[connection] = new
        broadcast(f"* {old} is now {new}")
    elif line == "/who":
        asyncio.get_running_loop().create_task(who(connection))
    elif line == "/quit":
        connection.close("bye")
    else:
        broadcast(f"<{nicknames[connection]}> {line}")


async def who(connection: TcpConnection) -> None:
    try:
        everyone = f"{await channel.group_count('chat')} here"
    except channel.ChannelError:
        everyone = "the channel is down"
    connection.send(f"* {everyone}; on this process: " + ", ".join(sorted(nicknames.values())))


def on_close(connection: TcpConnection) -> None:
    name = nicknames.pop(connection, None)
    if name:
        broadcast(f"* {name} left")


def push() -> None:
    """Each process pushes to its own connections: no channel traffic needed."""
    text = time.strftime("* server time %H:%M:%S")
    for connection in list(nicknames):
        connection.send(text)


def on_chat_start(worker: Worker) -> None:
    if PUSH_INTERVAL > 0:
        Timer.add(PUSH_INTERVAL, push)


chat.on_websocket_connected = on_websocket_connected
chat.on_message = on_message
chat.on_close = on_close
chat.on_worker_start = on_chat_start


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>longshore chat</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 40em; }
  #messages { list-style: none; padding: 0; height: 60vh; overflow-y: auto; border: 1px solid #ccc; }
  #messages li { padding: 2px 8px; }
  #messages li:nth-child(odd) { background: #f6f6f6; }
  form { display: flex; gap: 8px; margin-top: 8px; }
  #text { flex: 1; }
</style>
</head>
<body>
<h1>longshore chat</h1>
<p id="state">connecting to <code>ws://HOST:__WS_PORT__/</code> ...</p>
<ul id="messages"></ul>
<form id="form"><input id="text" autocomplete="off" autofocus placeholder="say something, or /nick NAME"><button>send</button></form>
<script>
const state = document.getElementById("state");
const list = document.getElementById("messages");
const form = document.getElementById("form");
const input = document.getElementById("text");
let socket;

function show(text) {
  const item = document.createElement("li");
  item.textContent = text;
  list.appendChild(item);
  list.scrollTop = list.scrollHeight;
}

function open() {
  const url = `ws://${location.hostname}:__WS_PORT__/`;
  socket = new WebSocket(url);
  socket.onopen = () => { state.textContent = "connected to " + url; };
  socket.onmessage = (event) => show(event.data);
  socket.onclose = (event) => {
    state.textContent = `closed (${event.code}); reconnecting in 2 s ...`;
    setTimeout(open, 2000);
  };
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  if (input.value && socket.readyState === WebSocket.OPEN) socket.send(input.value);
  input.value = "";
});
open();
</script>
</body>
</html>
"""


def on_request(connection: TcpConnection, request: Request) -> None:
    if request.path != "/":
        connection.send(Response("not found\n", status=404))
        return
    # The master bound both listeners before it forked, so the chat port is known here.
    ws_port = (chat.bound_listen or "").rsplit(":", 1)[-1] or str(WS_PORT)
    connection.send(PAGE.replace("__WS_PORT__", html.escape(ws_port)))


web.on_message = on_request

if __name__ == "__main__":
    run_all()
