"""Channels and groups: pub/sub and connection addressing across worker processes
(embedded hub) and across instances (a real redis-server), with real clients."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from conftest import App, wait_for

CHAT = """
from longshore import channel

w = Worker("text://127.0.0.1:0", count=int(os.environ.get("COUNT", "4")), name="chat", reuse_port=True)
if os.environ.get("CHANNEL"):
    Worker.channel = os.environ["CHANNEL"]
readers = set()
TcpConnection.default_max_send_buffer_size = int(os.environ.get("SEND_BUFFER", str(1 << 20)))

def on_connect(conn):
    conn.send("id " + channel.client_id(conn))

async def on_message(conn, line):
    cmd, _, rest = line.partition(" ")
    arg, _, text = rest.partition(" ")
    if cmd == "uid":
        channel.bind_uid(conn, arg); conn.send("ok")
    elif cmd == "join":
        channel.join_group(conn, arg); conn.send("ok")
    elif cmd == "leave":
        channel.leave_group(conn, arg); conn.send("ok")
    elif cmd == "touid":
        channel.send_to_uid(arg, text)
    elif cmd == "togroup":
        channel.send_to_group(arg, text)
    elif cmd == "togroupx":
        channel.send_to_group(arg, text, exclude=conn)
    elif cmd == "toclient":
        channel.send_to_client(arg, text)
    elif cmd == "toall":
        channel.send_to_all(rest)
    elif cmd == "online":
        try:
            conn.send(f"online {arg} {await channel.is_online(arg)}")
        except channel.ChannelError as exc:
            conn.send(f"online {arg} error")
    elif cmd == "uids":
        conn.send(f"uids {arg} {await channel.uid_count(arg)}")
    elif cmd == "count":
        try:
            conn.send(f"count {arg} {await channel.group_count(arg)}")
        except channel.ChannelError:
            conn.send(f"count {arg} error")
    elif cmd == "sub":
        readers.add(conn); conn.send("ok")
    elif cmd == "unsub":
        channel.unsubscribe("news"); conn.send("ok")
    elif cmd == "flood":
        for index in range(int(arg)):
            channel.send_to_group("flood", f"{index:06d}" + "x" * int(text))
    elif cmd == "pub":
        channel.publish("news", {"text": rest, "from": os.getpid()})

def on_news(topic, message):
    for conn in list(readers):
        conn.send(f"news {message['text']}")

def on_close(conn):
    readers.discard(conn)

channel.subscribe("news", on_news)
w.on_connect = on_connect
w.on_message = on_message
w.on_close = on_close
"""


class Client:
    """A line client of the chat app."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client_id: str) -> None:
        self.reader = reader
        self.writer = writer
        self.id = client_id
        self.pid = int(client_id.split("-")[-2], 16)
        self.instance = client_id.rsplit("-", 2)[0]

    @classmethod
    async def open(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        line = (await asyncio.wait_for(reader.readline(), 10)).decode().strip()
        assert line.startswith("id "), line
        return cls(reader, writer, line[3:])

    def send(self, line: str) -> None:
        self.writer.write(line.encode() + b"\n")

    async def line(self, timeout: float = 5.0) -> str:
        return (await asyncio.wait_for(self.reader.readline(), timeout)).decode().rstrip("\n")

    async def ask(self, line: str) -> str:
        self.send(line)
        return await self.line()

    async def silent(self, timeout: float = 0.3) -> bool:
        try:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
        except asyncio.TimeoutError:
            return True
        raise AssertionError(f"unexpected line {line!r}")

    def close(self) -> None:
        self.writer.close()


async def spread(port: int, processes: int, limit: int = 400) -> list[Client]:
    """Open connections until ``processes`` different worker processes hold one; return
    one client per process (the others are closed)."""
    chosen: dict[int, Client] = {}
    extra: list[Client] = []
    for _ in range(limit // 20):
        # connections arriving together spread over the processes better than one by one
        for client in await asyncio.gather(*(Client.open(port) for _ in range(20))):
            if client.pid in chosen:
                extra.append(client)
            else:
                chosen[client.pid] = client
        if len(chosen) == processes:
            break
    for client in extra:
        client.close()
    assert len(chosen) == processes, f"connections reached only {len(chosen)} processes"
    return list(chosen.values())


async def exercise(a: Client, b: Client, c: Client, tag: str) -> None:
    """Every addressing call, from ``a`` towards clients held by other processes."""
    assert await b.ask(f"uid bob{tag}") == "ok"
    assert await c.ask(f"uid bob{tag}") == "ok"
    await wait_for_answer(a, f"online bob{tag}", f"online bob{tag} True")  # counts settle within milliseconds
    await wait_for_answer(a, f"uids bob{tag}", f"uids bob{tag} 2")
    assert await a.ask(f"online nobody{tag}") == f"online nobody{tag} False"
    a.send(f"touid bob{tag} hi bob")
    assert await b.line() == "hi bob" and await c.line() == "hi bob"
    a.send(f"toclient {c.id} only c")
    assert await c.line() == "only c"
    assert await b.silent()
    for client in (a, b, c):
        assert await client.ask(f"join room{tag}") == "ok"
    await wait_for_answer(b, f"count room{tag}", f"count room{tag} 3")
    a.send(f"togroup room{tag} hello room")
    for client in (a, b, c):
        assert await client.line() == "hello room"
    b.send(f"togroupx room{tag} not to b")
    assert await a.line() == "not to b" and await c.line() == "not to b"
    assert await b.silent()
    assert await c.ask(f"leave room{tag}") == "ok"
    await wait_for_answer(a, f"count room{tag}", f"count room{tag} 2")
    a.send(f"togroup room{tag} after leave")
    assert await a.line() == "after leave" and await b.line() == "after leave"
    assert await c.silent()
    for client in (a, b, c):
        assert await client.ask("sub") == "ok"
    c.send(f"pub flash{tag}")
    for client in (a, b, c):
        assert await client.line() == f"news flash{tag}"


def test_embedded_channel_across_four_workers(app_factory):
    """Pub/sub and every addressing call between the 4 workers of one master; a group
    of 1,000 connections spread over them gets one broadcast; the counters show it."""
    app = app_factory(CHAT).start()
    port = app.port()
    assert "channel" in [helper["name"] for helper in app.status()["master"]["helpers"]]

    async def main() -> None:
        a, b, c, d = await spread(port, 4)
        await exercise(a, b, c, "1")
        d.send("toall to everyone")
        for client in (a, b, c, d):
            assert await client.line() == "to everyone"
        b.close()
        await asyncio.sleep(0.3)
        assert await a.ask("online bob1") == "online bob1 True"  # c is still bob1
        c.close()
        await wait_for_answer(a, "online bob1", "online bob1 False")
        assert await a.ask("unsub") == "ok"  # a's process no longer hears "news"
        assert await d.ask("sub") == "ok"
        d.send("pub late")
        assert await d.line() == "news late"
        assert await a.silent()
        a.close()
        d.close()

        # 1,000 connections over the 4 workers, one group, one broadcast
        clients = await asyncio.gather(*(Client.open(port) for _ in range(1000)))
        for client in clients:
            client.send("join big")
        await asyncio.gather(*(expect(client, "ok") for client in clients))
        assert len({client.pid for client in clients}) == 4
        assert await clients[0].ask("count big") == "count big 1000"
        started = time.monotonic()
        clients[-1].send("togroup big broadcast!")
        await asyncio.gather(*(expect(client, "broadcast!") for client in clients))
        elapsed = time.monotonic() - started
        assert elapsed < 5, elapsed
        for client in clients:
            client.close()

    asyncio.run(main())
    document = wait_for(lambda: _with_delivered(app.status(), 1000), what="channel counters")
    per_process = [process["channel"]["delivered"] for process in document["processes"]]
    assert all(delivered > 0 for delivered in per_process), per_process
    assert sum(process["channel"]["published"] for process in document["processes"]) >= 9
    assert "pub/deliv/drop" in app.cli("status").stdout


def test_embedded_hub_restart_and_reload(app_factory):
    """The workers reconnect to a respawned hub, and new workers after a reload join in."""
    app = app_factory(CHAT)
    app.env["COUNT"] = "2"
    port = app.start().port()
    hub_pid = next(helper["pid"] for helper in app.status()["master"]["helpers"] if helper["name"] == "channel")
    os.kill(hub_pid, signal.SIGKILL)
    wait_for(lambda: _hub_pid(app) not in (None, hub_pid), what="a new hub")

    async def round_trip(tag: str) -> None:
        a, b = await spread(port, 2)
        for client in (a, b):
            assert await client.ask(f"join r{tag}") == "ok"
        await wait_for_answer(a, f"count r{tag}", f"count r{tag} 2")
        a.send(f"togroup r{tag} across {tag}")
        assert await a.line() == f"across {tag}" and await b.line() == f"across {tag}"
        a.close()
        b.close()

    asyncio.run(round_trip("hub"))
    assert any(row["name"] == "channel" and row["status"] == "killed by SIGKILL" for row in app.status()["exits"])
    old = {process["pid"] for process in app.processes("chat")}
    app.cli("reload")
    wait_for(lambda: not old & {p["pid"] for p in app.wait_running(2, "chat")}, what="reloaded workers")
    asyncio.run(round_trip("reload"))


SPY = """
import errno, socket, sys
probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    probe.connect(sys.argv[1])
    print("connected")
except OSError as exc:
    print(errno.errorcode.get(exc.errno, exc.errno))
"""


async def two_workers_share_a_group(port: int, text: str) -> None:
    """Clients on two workers join group ``deep``, count 2, and both get ``text`` sent to it."""
    a, b = await spread(port, 2)
    for client in (a, b):
        assert await client.ask("join deep") == "ok"
    await wait_for_answer(a, "count deep", "count deep 2")
    a.send(f"togroup deep {text}")
    assert await a.line() == text and await b.line() == text
    a.close()
    b.close()


def test_embedded_hub_with_a_socket_path_too_long_for_sun_path(app_factory):
    """In a deep app folder the hub's socket cannot live next to the pid file: it is a
    file in a private folder (0700, replaced if someone else made it), never an abstract
    socket (which ignores permissions, and which uvloop cannot connect to); the workers
    reach it, another user cannot, and the folder goes when the master stops."""
    from longshore.channel import embedded

    app = app_factory(CHAT, subfolder="deep-" + "d" * 100)
    app.env["COUNT"] = "2"
    assert len(str(app.pid_file.with_suffix(".channel.sock")).encode()) >= 108
    address = embedded.hub_address(str(app.pid_file))
    assert not address.startswith("\0") and len(address.encode()) < 100, address
    folder = os.path.dirname(address)
    squatter = os.geteuid() == 0
    shutil.rmtree(folder, ignore_errors=True)
    os.mkdir(folder)
    os.chmod(folder, 0o777)
    if squatter:  # another user got there first: the hub must not use their folder
        import pwd

        nobody = pwd.getpwnam("nobody")
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    port = app.start().port()
    asyncio.run(two_workers_share_a_group(port, "across the hub"))
    folder_stat = os.lstat(folder)
    assert stat.S_ISDIR(folder_stat.st_mode) and folder_stat.st_uid == os.geteuid()
    assert stat.S_IMODE(folder_stat.st_mode) == 0o700, oct(folder_stat.st_mode)
    socket_stat = os.lstat(address)
    assert stat.S_ISSOCK(socket_stat.st_mode) and stat.S_IMODE(socket_stat.st_mode) == 0o600
    if squatter and shutil.which("setpriv"):
        spy = subprocess.run(
            ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups", sys.executable, "-c", SPY, address],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert spy.stdout.strip() == "EACCES", (spy.stdout, spy.stderr)
    assert "hub does not answer" not in app.log()
    app.cli("stop")
    assert not os.path.lexists(folder)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_embedded_hub_with_a_long_path_and_workers_run_as_another_user(app_factory):
    """Workers that run as ``nobody`` reach the hub in its private folder (the master's,
    open to their group only), through a socket that is theirs."""
    import pwd

    from longshore.channel import embedded

    nobody = pwd.getpwnam("nobody")
    app = app_factory(CHAT + "\nw.user = 'nobody'\n", subfolder="deep-" + "d" * 100)
    app.env["COUNT"] = "2"
    address = embedded.hub_address(str(app.pid_file))
    port = app.start().port()
    asyncio.run(two_workers_share_a_group(port, "as nobody"))
    for process in app.processes("chat"):
        assert os.stat(f"/proc/{process['pid']}").st_uid == nobody.pw_uid
    folder_stat = os.lstat(os.path.dirname(address))
    assert (folder_stat.st_uid, folder_stat.st_gid, stat.S_IMODE(folder_stat.st_mode)) == (0, nobody.pw_gid, 0o710)
    socket_stat = os.lstat(address)
    assert (socket_stat.st_uid, stat.S_IMODE(socket_stat.st_mode)) == (nobody.pw_uid, 0o600)
    app.cli("stop")
    assert not os.path.lexists(os.path.dirname(address))


def test_slow_group_member_is_dropped_not_waited_for(app_factory):
    """A member that stops reading loses its copies (send_fail, channel dropped); the
    others, in this process and in others, get every message."""
    app = app_factory(CHAT)
    app.env["COUNT"] = "2"
    app.env["SEND_BUFFER"] = str(256 * 1024)
    port = app.start().port()

    async def main() -> None:
        fast = await spread(port, 2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow = Client(reader, writer, (await reader.readline()).decode().strip()[3:])
        for client in (*fast, slow):
            assert await client.ask("join flood") == "ok"
        await wait_for_answer(fast[0], "count flood", "count flood 3")
        sender = fast[0]
        for burst in range(40):  # 40 bursts of 20 x 10 KB: 8 MB for each member
            sender.send("flood 20 10000")
            for client in fast:
                for index in range(20):
                    line = await client.line()
                    assert line.startswith(f"{index:06d}") and len(line) == 10006, line[:20]
        for client in (*fast, slow):
            client.close()

    asyncio.run(main())

    def counted():
        processes = app.status()["processes"]
        send_fail = sum(p["send_fail"] for p in processes)
        dropped = sum(p["channel"]["dropped"] for p in processes)
        return (send_fail, dropped) if send_fail and dropped else None

    send_fail, dropped = wait_for(counted, what="the slow member's drops counted")
    assert dropped >= 1 and send_fail >= dropped


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_channel_across_instances(app_factory, tmp_path):
    """Two instances (different ports) sharing one Redis: every call crosses between
    them; Redis is killed and restarted mid-test, and the instances carry on."""
    redis_port = _free_port()
    redis = _start_redis(redis_port, tmp_path)
    try:
        apps = []
        for _ in range(2):
            app = app_factory(CHAT)
            app.env["CHANNEL"] = f"redis://127.0.0.1:{redis_port}/0"
            app.env["COUNT"] = "2"
            apps.append(app.start())
        ports = [app.port() for app in apps]
        assert "channel" not in [helper["name"] for helper in apps[0].status()["master"]["helpers"]]

        async def first() -> list[Client]:
            a, a2 = await spread(ports[0], 2)
            b, c = await spread(ports[1], 2)
            assert a.instance != b.instance and b.instance == c.instance
            await exercise(a, b, c, "x")
            a2.send("toall all instances")
            for client in (a, a2, b, c):
                assert await client.line() == "all instances"
            return [a, a2, b, c]

        async def outage(clients: list[Client]) -> None:
            a, a2, b, c = clients
            nonlocal redis
            redis.kill()
            redis.wait()
            await asyncio.sleep(0.5)
            a.send("togroup roomx during outage")  # members: a (this instance), b (the other)
            assert await a.line() == "during outage"  # the local member still gets it
            assert await b.silent(0.5)  # lost for the other instance
            assert await a.ask("count roomx") == "count roomx error"
            redis = _start_redis(redis_port, tmp_path)
            # Redis came back empty: the processes resubscribe and re-announce their counts
            await wait_for_answer(a, "count roomx", "count roomx 2", timeout=15)
            await wait_for_answer(c, "online bobx", "online bobx True")
            a.send("togroup roomx after outage")
            assert await a.line() == "after outage" and await b.line() == "after outage"
            c.send(f"toclient {a2.id} direct again")
            assert await a2.line() == "direct again"
            for client in clients:
                client.close()

        async def big_group() -> None:
            # 1,000 connections over the 4 workers of the two instances
            clients = await asyncio.gather(*(Client.open(ports[index % 2]) for index in range(1000)))
            for client in clients:
                client.send("join big")
            await asyncio.gather(*(expect(client, "ok") for client in clients))
            assert len({client.pid for client in clients}) == 4
            await wait_for_answer(clients[1], "count big", "count big 1000")
            clients[0].send("togroup big over redis")
            await asyncio.gather(*(expect(client, "over redis") for client in clients))
            for client in clients:
                client.close()

        async def main() -> None:
            clients = await first()
            await outage(clients)
            await big_group()

        asyncio.run(main())
        dropped = wait_for(
            lambda: sum(p["channel"]["dropped"] for p in apps[0].status()["processes"]) or None, what="dropped counted"
        )
        assert dropped >= 1
    finally:
        redis.kill()
        redis.wait()


# -- helpers ---------------------------------------------------------------------------
async def expect(client: Client, line: str) -> None:
    got = await client.line(timeout=20)
    assert got == line, (got, line)


async def wait_for_answer(client: Client, question: str, answer: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = await client.ask(question)
        if got == answer:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{question!r}: {got!r}, expected {answer!r}")
        await asyncio.sleep(0.1)


def _with_delivered(document, minimum):
    total = sum(process["channel"]["delivered"] for process in document["processes"])
    return document if total >= minimum else None


def _hub_pid(app):
    for helper in app.status()["master"]["helpers"]:
        if helper["name"] == "channel":
            return helper["pid"]
    return None


def _free_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def _start_redis(port: int, folder) -> subprocess.Popen:
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    wait_for(up, what="redis-server")
    return process


# -- the demo ----------------------------------------------------------------------------
def _start_demo(folder, **extra: str):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    folder.mkdir()
    script = folder / "start.py"
    shutil.copy(root / "examples" / "chat" / "start.py", script)
    env = {**os.environ, "CHAT_PORT": "0", "CHAT_WS_PORT": "0", "CHAT_PUSH_INTERVAL": "0", **extra}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=60, check=True)

    cli("start", "-d")
    document = json.loads(cli("status", "--json").stdout)
    port = next(int(w["listen"].rsplit(":", 1)[1]) for w in document["workers"] if w["name"] == "chat")
    return cli, port, document


async def _demo_clients(url: str, count: int) -> list:
    from websockets.asyncio.client import connect as ws_connect

    clients = await asyncio.gather(*(ws_connect(url, max_queue=None) for _ in range(count)))
    for client in clients:
        assert (await asyncio.wait_for(client.recv(), 5)).startswith("welcome, guest")
    return list(clients)


async def _demo_room_size(client, size: int) -> None:
    """Ask ``/who`` until the room counts ``size`` (counts settle within milliseconds)."""
    deadline = time.monotonic() + 10
    while True:
        await client.send("/who")
        while not (line := await asyncio.wait_for(client.recv(), 5)).startswith("* "):
            pass
        if line.startswith(f"* {size} here"):
            return
        if time.monotonic() > deadline:
            raise AssertionError(line)
        await asyncio.sleep(0.05)


async def _demo_expect(client, text: str) -> None:
    while True:
        line = await asyncio.wait_for(client.recv(), 5)
        if line == text:
            return


def test_demo_chat_four_processes_and_two_instances(tmp_path):
    """The README demo: 4 chat processes share one room (embedded channel); then two
    copies on different ports share one Redis and their users talk to each other."""
    cli, port, document = _start_demo(tmp_path / "one")
    try:
        assert len([p for p in document["processes"] if p["name"] == "chat"]) == 4

        def chat_processes_with_clients() -> int:
            processes = json.loads(cli("status", "--json").stdout)["processes"]
            return len([p for p in processes if p["name"] == "chat" and p["connections"]])

        async def one_instance() -> None:
            clients = await _demo_clients(f"ws://127.0.0.1:{port}/", 24)
            # One shared listening socket: a busy machine may let one process accept a
            # whole burst. Add clients one by one until the room spans processes.
            while chat_processes_with_clients() < 2 and len(clients) < 120:
                await asyncio.sleep(0.05)
                clients += await _demo_clients(f"ws://127.0.0.1:{port}/", 1)
            await _demo_room_size(clients[1], len(clients))
            await clients[0].send("/nick alice")
            await clients[0].send("hello everyone")
            await asyncio.gather(*(_demo_expect(client, "<alice> hello everyone") for client in clients[1:]))
            for client in clients:
                await client.close()

        asyncio.run(one_instance())

        def delivered() -> list[int] | None:
            counts = [p["channel"]["delivered"] for p in json.loads(cli("status", "--json").stdout)["processes"]]
            return counts if sum(counts) >= 23 else None

        counts = wait_for(delivered, what="delivered counters")
        assert len([count for count in counts if count]) >= 2, counts  # the room spans processes
    finally:
        cli("stop")
    if shutil.which("redis-server") is None:
        return
    redis_port = _free_port()
    redis = _start_redis(redis_port, tmp_path)
    url = f"redis://127.0.0.1:{redis_port}/0"
    clis = []
    try:
        ports = []
        for name in ("a", "b"):
            cli, port, _ = _start_demo(tmp_path / name, CHAT_CHANNEL=url, CHAT_PROCESSES="2")
            clis.append(cli)
            ports.append(port)

        async def two_instances() -> None:
            first = await _demo_clients(f"ws://127.0.0.1:{ports[0]}/", 4)
            second = await _demo_clients(f"ws://127.0.0.1:{ports[1]}/", 4)
            await _demo_room_size(first[0], 8)  # every process has subscribed to the room
            await first[0].send("/nick ann")
            await first[0].send("from instance a")
            await asyncio.gather(*(_demo_expect(client, "<ann> from instance a") for client in first[1:] + second))
            await second[0].send("/nick ben")
            await second[0].send("from instance b")
            await asyncio.gather(*(_demo_expect(client, "<ben> from instance b") for client in first + second[1:]))
            for client in first + second:
                await client.close()

        asyncio.run(two_instances())
    finally:
        for cli in clis:
            cli("stop")
        redis.kill()
        redis.wait()


@pytest.mark.parametrize("setting", ["rabbitmq://127.0.0.1:5672", "redis://127.0.0.1:port/0", "redis://127.0.0.1:6379/zero", "embeded"])
def test_unusable_channel_setting_is_refused_at_start(app_factory, setting):
    app = app_factory(f"""
    Worker.channel = {setting!r}
    w = Worker("text://127.0.0.1:0", name="chat")
    """)
    result = app.cli("start", "-d", check=False, timeout=20)
    assert result.returncode == 1
    assert f"Worker.channel: {setting!r}" in result.stderr
    assert app.master_pid() is None


def test_a_failing_coroutine_subscriber_is_logged_and_counted(app_factory):
    app = app_factory("""
from longshore import channel

w = Worker("text://127.0.0.1:0", name="pubsub")

async def broken(topic, message):
    await asyncio.sleep(0)
    raise RuntimeError("subscriber failed on " + message)

async def fine(topic, message):
    await asyncio.sleep(0)
    for conn in list(w.connections.values()):
        conn.send("got " + message)

def on_worker_start(worker):
    channel.subscribe("news", broken)
    channel.subscribe("news", fine)

w.on_worker_start = on_worker_start
w.on_message = lambda conn, line: channel.publish("news", line)
""").start()
    sock = socket.create_connection(("127.0.0.1", app.port()), timeout=5)
    with sock, sock.makefile("rwb") as stream:
        for word in ("one", "two"):
            stream.write(word.encode() + b"\n")
            stream.flush()
            assert stream.readline() == b"got " + word.encode() + b"\n"
    wait_for(lambda: app.processes("pubsub")[0]["throw_exception"] == 2, what="both failures counted")
    log = app.log()
    assert "RuntimeError: subscriber failed on one" in log and "the channel callback of topic 'news'" in log


def test_send_to_all_reaches_only_the_senders_worker(app_factory):
    """send_to_all from the "chat" Worker reaches the chat clients of both its processes,
    but neither the HTTP keep-alive connections of the "web" Worker (whose next response
    must come out intact) nor the outgoing connections the chat processes hold."""
    upstream = socket.create_server(("127.0.0.1", 0))
    app = app_factory("""
from longshore import channel

chat = Worker("text://127.0.0.1:0", name="chat", count=2, reuse_port=True)
web = Worker("http://127.0.0.1:0", name="web")
links = []

def on_worker_start(worker):
    link = AsyncTcpConnection("text://127.0.0.1:" + os.environ["UPSTREAM"])
    link.on_connect = lambda c: c.send("hello upstream")
    link.connect()
    links.append(link)

def on_message(conn, line):
    if line.startswith("toall "):
        conn.send("sent " + str(channel.send_to_all(line[6:])))

chat.on_connect = lambda conn: conn.send("id " + channel.client_id(conn))
chat.on_worker_start = on_worker_start
chat.on_message = on_message
web.on_message = lambda conn, request: conn.send("page " + request.path)
""")
    app.env["UPSTREAM"] = str(upstream.getsockname()[1])
    app.start()
    port, web_port = app.port(0), app.port(1)
    upstream.settimeout(5)
    links = [upstream.accept()[0] for _ in range(2)]
    for link in links:
        link.settimeout(5)
        assert link.recv(100) == b"hello upstream\n"

    async def main() -> None:
        a, b = await spread(port, 2)
        reader, writer = await asyncio.open_connection("127.0.0.1", web_port)
        writer.write(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"page /one"), 5)
        assert first.startswith(b"HTTP/1.1 200"), first
        a.send("toall server restarting")
        assert await a.line() == "server restarting" and await a.line() == "sent True"
        assert await b.line() == "server restarting"
        writer.write(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
        second = await asyncio.wait_for(reader.readuntil(b"page /two"), 5)
        assert second.startswith(b"HTTP/1.1 200") and b"restarting" not in second, second
        writer.close()
        a.close()
        b.close()

    asyncio.run(main())
    for link in links:
        link.settimeout(0.3)
        with pytest.raises(socket.timeout):
            data = link.recv(100)
            raise AssertionError(f"an outgoing connection got {data!r}")
        link.close()
    upstream.close()


LINK_FLOOD = """
from longshore import channel
from longshore.channel import embedded

embedded.LINK_BUFFER_LIMIT = 1 << 20  # (the hub and the workers are forked after this)
w = Worker("text://127.0.0.1:0", name="chat", count=2, reuse_port=True)
got = [0]

def on_news(topic, message):
    got[0] += 1

async def on_message(conn, line):
    cmd, _, arg = line.partition(" ")
    if cmd == "burst":  # the link to the hub is far behind, then a join in the same callback
        ok = sum(1 for _ in range(40) if channel.publish("other", b"z" * 100_000))
        channel.join_group(conn, "room")
        conn.send(f"burst {ok}")
    elif cmd == "block":  # not reading the hub while others publish, then a query
        time.sleep(float(arg))
        try:
            conn.send(f"count {await channel.group_count('nobody')}")
        except channel.ChannelError as exc:
            conn.send(f"count error {exc}")
    elif cmd == "flood":  # 500 KB at a time: the hub keeps up with this worker
        ok = 0
        for index in range(int(arg)):
            ok += channel.publish("news", b"z" * 100_000)
            if index % 5 == 4:
                await asyncio.sleep(0.01)
        conn.send(f"flood {ok}")
    elif cmd == "count":
        conn.send(f"count {arg} {await channel.group_count(arg)}")
    elif cmd == "say":
        channel.send_to_group(arg, "hi " + arg)
    elif cmd == "got":
        conn.send(f"got {got[0]}")

channel.subscribe("news", on_news)
w.on_connect = lambda conn: conn.send("id " + channel.client_id(conn))
w.on_message = on_message
"""


def test_embedded_control_frames_survive_a_full_link(app_factory):
    """A worker whose link to the hub is over its buffer limit still subscribes and
    announces its count (only messages are dropped); the hub still answers a query of
    a worker whose link is full of messages."""
    app = app_factory(LINK_FLOOD)
    port = app.start().port()

    async def main() -> None:
        a, b = await spread(port, 2)
        line = await a.ask("burst")
        assert line.startswith("burst ") and int(line.split()[1]) < 40, line  # some were dropped
        await wait_for_answer(b, "count room", "count room 1", timeout=3)
        b.send("say room")
        assert await a.line() == "hi room"
        a.send("block 1")
        await asyncio.sleep(0.2)
        line = await b.ask("flood 40")  # 4 MB for a's process, which does not read
        assert line.startswith("flood "), line
        assert await a.line(timeout=10) == "count 0"
        a.close()
        b.close()

    asyncio.run(main())


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_count_that_drops_to_zero_while_unwritable_is_deleted(app_factory, tmp_path):
    """A uid that leaves while Redis is down (Redis then comes back from its dump, with
    the old count), or whose HDEL batch fails, is not counted by the other processes."""
    import redis as redis_client

    redis_port = _free_port()
    redis = _start_redis(redis_port, tmp_path)
    app = app_factory(CHAT)
    app.env["CHANNEL"] = f"redis://127.0.0.1:{redis_port}/0"
    app.env["COUNT"] = "2"
    port = app.start().port()
    admin = redis_client.Redis(port=redis_port)
    try:

        async def main() -> None:
            nonlocal redis
            a, b = await spread(port, 2)
            a2 = next(client for client in await spread(port, 2) if client.pid == a.pid)
            # 1. alice leaves during an outage; Redis restarts from its dump
            assert await a.ask("uid alice") == "ok"
            await wait_for_answer(b, "online alice", "online alice True")
            with socket.create_connection(("127.0.0.1", redis_port)) as shutdown:
                shutdown.sendall(b"SHUTDOWN SAVE\r\n")
                redis.wait(10)
            a.close()
            await asyncio.sleep(0.3)
            redis = _start_redis(redis_port, tmp_path)
            assert admin.hgetall("longshore:count:u:alice")  # the old count, from the dump
            await wait_for_answer(b, "online alice", "online alice False", timeout=5)
            # 2. carol leaves, and the batch that deletes her count fails
            assert await a2.ask("uid carol") == "ok"
            await wait_for_answer(b, "online carol", "online carol True")
            admin.execute_command("CLIENT", "PAUSE", "1000", "WRITE")
            a2.close()
            await asyncio.sleep(0.3)  # the HDEL waits in Redis: its connection is killed
            admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            await wait_for_answer(b, "online carol", "online carol False", timeout=5)
            assert not admin.hgetall("longshore:count:u:carol")
            b.close()

        asyncio.run(main())
    finally:
        app.cli("stop", check=False)
        redis.kill()
        redis.wait()


LONG_NAMES = """
from longshore import channel
from longshore.connection import tcp

w = Worker("text://127.0.0.1:0", name="chat")
watchers = set()
boom = set()

def failing_listener(conn):
    if conn.id in boom:
        raise RuntimeError("close listener failed")

def on_worker_start(worker):
    tcp.close_listeners.insert(0, failing_listener)

async def on_message(conn, line):
    cmd, _, arg = line.partition(" ")
    name = "n" * int(arg[1:]) if arg.startswith("*") else "\\ud800" if arg == "bad" else arg
    calls = {
        "join": lambda: channel.join_group(conn, name),
        "uid": lambda: channel.bind_uid(conn, name),
        "sub": lambda: channel.subscribe(name, print),
        "pub": lambda: channel.publish(name, "x"),
        "togroup": lambda: channel.send_to_group(name, "x"),
        "touid": lambda: channel.send_to_uid(name, "x"),
        "count": lambda: channel.group_count(name),
        "online": lambda: channel.is_online(name),
    }
    if cmd == "watch":
        watchers.add(conn); conn.send("ok")
    elif cmd == "boom":
        boom.add(conn.id); conn.send("ok")
    else:
        try:
            result = calls[cmd]()
            if asyncio.iscoroutine(result):
                result = await result
        except Exception as exc:
            conn.send(f"{type(exc).__name__}")
        else:
            conn.send(f"{cmd} {result}")

def on_close(conn):
    for watcher in watchers:
        watcher.send(f"closed {conn.id}")

w.on_worker_start = on_worker_start
w.on_connect = lambda conn: conn.send("id " + channel.client_id(conn))
w.on_message = on_message
w.on_close = on_close
"""


def test_names_too_long_for_the_wire_are_refused(app_factory):
    """A topic, uid or group over 65535 bytes (with its prefix) or not UTF-8 raises
    ValueError before anything changes: the connection still closes with its on_close,
    and the worker still re-announces its groups to a respawned hub. A close listener
    that fails does not stop the others, nor on_close."""
    app = app_factory(LONG_NAMES)
    port = app.start().port()

    async def main() -> None:
        a, b = await Client.open(port), await Client.open(port)
        assert await b.ask("watch") == "ok"
        for cmd in ("join", "uid", "sub", "pub", "togroup", "touid", "count", "online"):
            assert await a.ask(f"{cmd} *70000") == "ValueError", cmd
            assert await a.ask(f"{cmd} bad") == "ValueError", cmd
        assert await a.ask("join *65000") == "join None"  # within the limit
        assert await a.ask("join room") == "join None"
        assert await b.ask("count room") == "count 1"
        hub = _hub_pid(app)
        os.kill(hub, signal.SIGKILL)
        wait_for(lambda: _hub_pid(app) not in (None, hub), what="a new hub")
        await wait_for_answer(b, "count room", "count 1")  # counts announced again
        a.close()
        assert await b.line() == f"closed {int(a.id.rsplit('-', 1)[1], 16)}"
        await wait_for_answer(b, "count room", "count 0")
        c = await Client.open(port)
        assert await c.ask("join room") == "join None" and await c.ask("boom") == "ok"
        await wait_for_answer(b, "count room", "count 1")
        c.close()
        assert await b.line() == f"closed {int(c.id.rsplit('-', 1)[1], 16)}"
        await wait_for_answer(b, "count room", "count 0")  # the gateway still forgot c
        b.close()

    asyncio.run(main())
    wait_for(lambda: app.processes("chat")[0]["throw_exception"] == 1, what="the failing close listener counted")  # published a moment later
    assert "exception in a close listener" in app.log() and "RuntimeError: close listener failed" in app.log()


def test_embedded_hub_drops_for_a_slow_worker_are_counted_by_that_worker(app_factory):
    """Messages the hub drops for a worker that does not read show up in that worker's
    ``dropped``: what it received plus what it was told was dropped is what was sent."""
    app = app_factory(LINK_FLOOD)
    port = app.start().port()

    async def main() -> tuple[int, int]:
        a, b = await spread(port, 2)
        a.send("block 1")
        await asyncio.sleep(0.2)
        sent = int((await b.ask("flood 40")).split()[1])
        assert await a.line(timeout=10) == "count 0"
        await asyncio.sleep(0.5)
        got = int((await a.ask("got")).split()[1])
        a.close()
        b.close()
        return a.pid, sent - got

    pid, lost = asyncio.run(main())
    assert lost >= 10, lost
    assert next(p for p in app.processes("chat") if p["pid"] == pid)["channel"]["dropped"] == lost


# -- addresses, client ids, local delivery -----------------------------------------------
def _pid_namespaces_usable() -> bool:
    try:
        probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _start_in_pid_namespace(app: App, port: int) -> subprocess.Popen:
    """``start`` (foreground) in a new pid namespace, as in a container: the master is pid
    1 and its workers 2, 3... Killing the returned ``unshare`` kills every process in it."""
    process = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", sys.executable, str(app.script), "start"],
        cwd=app.folder,
        env={**app.env, "PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    wait_for(listening, what="the instance in its pid namespace")
    return process


@pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("unshare") is None, reason="needs redis-server and unshare")
def test_instances_alike_but_for_their_start_keep_apart(tmp_path):
    """Two instances on one host, each in its own pid namespace (containers that share the
    host's name or network: master pid 1, workers 2, 3...) and one Redis. The processes
    with the same pids count each other and get each other's messages (none is taken for
    its own echo). The first instance is killed and started again with the same pids: a
    client id of its first run reaches nobody, not the new connection with the same pids
    and number."""
    if not _pid_namespaces_usable():
        pytest.skip("pid namespaces are not available here")
    redis_port = _free_port()
    redis = _start_redis(redis_port, tmp_path)
    # Not app_factory: the pid files say 1, which its teardown must never signal.
    apps = []
    for name, count in (("first", "1"), ("second", "2")):
        (tmp_path / name).mkdir()
        app = App(tmp_path / name, CHAT.replace('"text://127.0.0.1:0"', '"text://127.0.0.1:" + os.environ["PORT"]'))
        app.env.update(CHANNEL=f"redis://127.0.0.1:{redis_port}/0", COUNT=count)
        apps.append(app)
    running: list[subprocess.Popen] = []

    def pids(client: Client) -> list[str]:  # master pid, worker pid (and the number)
        return client.id.split("-")[-3:]

    try:
        ports = [_free_port(), _free_port(), _free_port()]
        running.append(_start_in_pid_namespace(apps[0], ports[0]))
        running.append(_start_in_pid_namespace(apps[1], ports[1]))

        async def alike() -> tuple[Client, Client, Client]:
            a = await Client.open(ports[0])
            for _ in range(50):  # until both workers listen
                try:
                    b2, b3 = sorted(await spread(ports[1], 2, limit=40), key=lambda client: client.pid)
                    break
                except AssertionError:
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("the second instance's workers did not both listen")
            assert pids(a)[:2] == pids(b2)[:2] == ["1", "2"] and pids(b3)[:2] == ["1", "3"]
            for client in (a, b2):
                assert await client.ask("join room") == "ok"
            await wait_for_answer(b3, "count room", "count room 2")
            a.send("togroup room from the first")
            assert await a.line() == "from the first" and await b2.line() == "from the first"
            assert await b2.ask("uid bob") == "ok"
            await wait_for_answer(a, "online bob", "online bob True")
            a.send("touid bob to bob")
            assert await b2.line() == "to bob"
            return a, b2, b3

        async def restarted(old: Client, sender: Client) -> None:
            c = await Client.open(ports[2])
            assert pids(c) == pids(old)
            for attempt in range(50):  # until the new worker has subscribed
                sender.send(f"toclient {old.id} to the first run's client")
                sender.send(f"toclient {c.id} to c {attempt}")
                try:
                    line = await c.line(timeout=0.2)
                except asyncio.TimeoutError:
                    continue
                assert line.startswith("to c "), line
                break
            else:
                raise AssertionError("c never got its message")
            c.close()

        async def main() -> None:
            a, b2, b3 = await alike()
            running[0].kill()
            running[0].wait()
            assert await a.reader.read() == b""
            (apps[0].folder / ".longshore" / "start.pid").unlink()
            running.append(_start_in_pid_namespace(apps[0], ports[2]))
            await restarted(a, b3)
            b2.close()
            b3.close()

        asyncio.run(main())
    finally:
        for process in running:
            process.kill()
            process.wait()
        redis.kill()
        redis.wait()


HOSTILE_IDS = """
from longshore import channel

w = Worker("text://127.0.0.1:0", name="chat")

def on_message(conn, line):
    try:
        conn.send(f"sent {channel.send_to_client(line, 'hi')}")
    except ValueError:
        conn.send("ValueError")

w.on_connect = lambda conn: conn.send("id " + channel.client_id(conn))
w.on_message = on_message
"""


def test_malformed_client_ids_raise_value_error(app_factory):
    """send_to_client with an id that is not exactly a client id (from a hostile client:
    a part over 16 hex digits, 0x, a sign, an underscore, spaces, capitals, a part too
    many or too few) raises ValueError and sends nothing; a well-formed id works."""
    app = app_factory(HOSTILE_IDS).start()

    async def main() -> None:
        a = await Client.open(app.port())
        process, number = a.id.rsplit("-", 1)
        host, rest = a.id.split("-", 1)
        for bad in (
            f"{process}-{'f' * 70000}",
            f"{process}-{'1' * 17}",
            f"{process}-0x{number}",
            f"{process}-+{number}",
            f"{process}-{number}_0",
            f"{process}- {number} ",
            f"{process}-",
            f"{a.id}-1",
            rest,
            f"{host.upper()}a-{rest}",
            f"{'f' * 70000}-{rest}",
            "not an id",
        ):
            assert await a.ask(bad) == "ValueError", bad[:100]
        assert await a.ask(a.id) == "hi" and await a.line() == "sent True"
        assert await a.ask(f"{process}-{'f' * 16}") == "sent False"  # well-formed, no such connection
        a.close()

    asyncio.run(main())
    assert app.processes("chat")[0]["throw_exception"] == 0


LOCAL_COPY = """
from longshore import channel

w = Worker("text://127.0.0.1:0", name="chat")

def on_item(topic, message):
    for conn in list(w.connections.values()):
        conn.send(f"got {type(message['items']).__name__} {message['n']}")

def on_message(conn, line):
    message = {"items": (1, 2), "n": 1}
    channel.publish("items", message)
    message["n"] = 2  # the publisher reuses its object at once

channel.subscribe("items", on_item)
w.on_message = on_message
"""


def test_local_subscribers_get_a_decoded_copy(app_factory):
    """The publishing process's own subscribers get what the other processes get: a copy
    decoded from the wire (a tuple arrives as a list), which the publisher's later
    changes to its object do not reach."""
    app = app_factory(LOCAL_COPY).start()
    with socket.create_connection(("127.0.0.1", app.port()), timeout=5) as sock, sock.makefile("rwb") as stream:
        stream.write(b"publish\n")
        stream.flush()
        assert stream.readline() == b"got list 1\n"


class _SlowRedisProxy:
    """A TCP proxy to Redis, run in the test's event loop: each new connection waits
    ``delay`` seconds before it is connected upstream; ``cut()`` closes every connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay = 0.0
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        await asyncio.sleep(self.delay)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.writers.add(upstream_writer)
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_groups_joined_and_left_while_reconnecting(app_factory, tmp_path):
    """Groups joined while the process's subscribed connection to Redis is being set up
    again (a proxy delays each new connection by 1 s) are subscribed once it is up: the
    others see their counts and their messages reach the member. Groups left meanwhile
    are unsubscribed."""
    import redis as redis_client

    redis_port = _free_port()
    redis = _start_redis(redis_port, tmp_path)
    admin = redis_client.Redis(port=redis_port)
    app = app_factory(CHAT)
    app.env["COUNT"] = "2"
    groups = range(20)
    try:

        async def main() -> None:
            proxy = _SlowRedisProxy(redis_port)
            app.env["CHANNEL"] = f"redis://127.0.0.1:{await proxy.start()}/0"
            await asyncio.to_thread(app.start)
            a, b = await spread(await asyncio.to_thread(app.port), 2)
            for index in groups:
                assert await a.ask(f"join old{index}") == "ok"
            await wait_for_answer(b, f"count old{groups[-1]}", f"count old{groups[-1]} 1")
            proxy.delay = 1.0
            proxy.cut()
            # one join and one leave every 0.1 s while a's process connects again (the
            # connections that the cut left in redis-py's pool fail first)
            for index in groups:
                assert await a.ask(f"join new{index}") == "ok"
                assert await a.ask(f"leave old{index}") == "ok"
                await asyncio.sleep(0.1)
            for index in groups:
                await wait_for_answer(b, f"count new{index}", f"count new{index} 1", timeout=5)
                b.send(f"togroup new{index} reached {index}")
                assert await a.line() == f"reached {index}"
            topics = [f"longshore:gw:g:old{index}" for index in groups]
            assert admin.pubsub_numsub(*topics) == [(topic.encode(), 0) for topic in topics]
            a.close()
            b.close()

        asyncio.run(main())
    finally:
        app.cli("stop", check=False)
        redis.kill()
        redis.wait()


REDIS_OUTBOX = """
from longshore import channel
from longshore.channel import redis_backend

redis_backend.OUTBOX_LIMIT = 4 << 20  # bytes (the workers are forked after this)
Worker.channel = os.environ["CHANNEL"]
w = Worker("text://127.0.0.1:0", name="pub")

async def on_message(conn, line):
    cmd, _, arg = line.partition(" ")
    if cmd == "pub":  # arg messages of 1 MiB
        ok = sum(1 for _ in range(int(arg)) if channel.publish("big", b"z" * (1 << 20)))
        conn.send(f"pub {ok}")
    elif cmd == "count":
        try:
            conn.send(f"count {await channel.group_count(arg)}")
        except channel.ChannelError:
            conn.send("count error")

w.on_connect = lambda conn: conn.send("id " + channel.client_id(conn))
w.on_message = on_message
"""


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_outbox_is_bounded_by_bytes_while_redis_stalls(app_factory, tmp_path):
    """While Redis stalls (SIGSTOP: its connections stay open), publish takes messages
    up to OUTBOX_LIMIT bytes and refuses the rest (counted as dropped), so the worker's
    memory stays bounded; the batch that times out is a disconnection (what waited is
    dropped, queries fail at once), and the worker carries on once Redis is back."""
    redis_port = _free_port()
    redis = _start_redis(redis_port, tmp_path)
    app = app_factory(REDIS_OUTBOX)
    app.env["CHANNEL"] = f"redis://127.0.0.1:{redis_port}/0"
    port = app.start().port()
    try:

        async def main() -> None:
            client = await Client.open(port)
            pid = client.pid
            assert await client.ask("pub 1") == "pub 1"
            before = _rss(pid)
            os.kill(redis.pid, signal.SIGSTOP)
            line = await client.ask("pub 32")
            assert 2 <= int(line.split()[1]) <= 5, line  # 4 MiB (encoded), and the one that went over
            assert _rss(pid) - before < 16 << 20, (before, _rss(pid))
            # the batch times out (redis-py's 5 s): every message of "pub 32" is lost
            await asyncio.to_thread(
                wait_for,
                lambda: app.processes("pub")[0]["channel"]["dropped"] >= 32,
                10,
                what="the lost messages counted",
            )
            started = time.monotonic()
            assert await client.ask("count room") == "count error"
            assert time.monotonic() - started < 1, "a query still waited for the stalled Redis"
            os.kill(redis.pid, signal.SIGCONT)
            await wait_for_answer(client, "pub 1", "pub 1", timeout=15)
            client.close()

        asyncio.run(main())
    finally:
        os.kill(redis.pid, signal.SIGCONT)
        app.cli("stop", check=False)
        redis.kill()
        redis.wait()


SHORT_ALIVE = """
from longshore.channel import redis_backend

redis_backend.ALIVE_SECONDS = 1  # (the workers are forked after this)
redis_backend.ALIVE_REFRESH = 0.3
""" + CHAT


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_count_fields_of_dead_processes_are_deleted(app_factory, tmp_path):
    """The count fields of a process killed with -9 are deleted by the first count
    query after its alive key expired; a process that could not refresh its alive key
    in time (stopped) and lost its fields that way writes them again."""
    import redis as redis_client

    redis_port = _free_port()
    redis = _start_redis(redis_port, tmp_path)
    admin = redis_client.Redis(port=redis_port)
    app = app_factory(SHORT_ALIVE)
    app.env["CHANNEL"] = f"redis://127.0.0.1:{redis_port}/0"
    app.env["COUNT"] = "2"
    port = app.start().port()
    try:

        async def main() -> None:
            a, b = await spread(port, 2)
            assert await a.ask("uid ghost") == "ok" and await a.ask("join haunt") == "ok"
            assert await b.ask("uid sleeper") == "ok"
            await wait_for_answer(b, "online ghost", "online ghost True")
            await wait_for_answer(a, "online sleeper", "online sleeper True")
            # b's process stops for longer than its alive key lives: a's query deletes its field
            os.kill(b.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(1.5)
                assert await a.ask("online sleeper") == "online sleeper False"
                assert not admin.exists("longshore:count:u:sleeper")
            finally:
                os.kill(b.pid, signal.SIGCONT)
            await wait_for_answer(a, "online sleeper", "online sleeper True", timeout=3)  # written again
            # a's process is killed: its fields go once its alive key has expired
            os.kill(a.pid, signal.SIGKILL)
            await asyncio.sleep(1.5)
            assert await b.ask("online ghost") == "online ghost False"
            assert await b.ask("count haunt") == "count haunt 0"
            assert not admin.exists("longshore:count:u:ghost") and not admin.exists("longshore:count:g:haunt")
            a.close()
            b.close()

        asyncio.run(main())
    finally:
        app.cli("stop", check=False)
        redis.kill()
        redis.wait()
