"""Stream transports: Unix sockets and IPv6."""

from __future__ import annotations

import json
import os
import socket

import pytest

from conftest import read_lines, wait_for


def test_unix_socket_worker_serves_and_removes_its_socket(app_factory, tmp_path):
    path = tmp_path / "app.sock"
    app = app_factory(
        f"""
w = Worker("unix://{path}", name="local", protocol="text", count=2, unix_mode=0o660)
w.on_message = lambda conn, line: conn.send("unix " + line + " " + repr(conn.remote_address))
"""
    ).start()
    assert path.exists() and oct(path.stat().st_mode & 0o777) == "0o660"
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(str(path))
    client.sendall(b"hi\n")
    assert read_lines(client, 1) == ["unix hi ''"]
    client.close()
    app.cli("stop")
    assert not path.exists()


def test_unix_socket_with_reuse_port_is_shared_by_the_workers(app_factory, tmp_path):
    """A Unix socket has one path: reuse_port does not apply, every worker serves the
    master's socket, and a graceful reload replaces them without a failed start."""
    path = tmp_path / "shared.sock"
    app = app_factory(
        f"""
w = Worker("unix://{path}", name="local", protocol="text", count=2, reuse_port=True)
w.on_message = lambda conn, line: conn.send(f"{{os.getpid()}} {{line}}")
"""
    ).start()
    first = {process["pid"] for process in app.wait_running(2, "local")}
    pids = set()
    for _ in range(40):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(5)
        client.connect(str(path))
        client.sendall(b"hi\n")
        pids.add(int(read_lines(client, 1)[0].split()[0]))
        client.close()
    assert pids <= first
    app.cli("reload", "-g")
    second = {process["pid"] for process in app.wait_running(2, "local")}
    assert not first & second
    assert app.status()["exits"] == [] or all("exit code 0" in exit["status"] for exit in app.status()["exits"])
    app.cli("stop")
    assert not path.exists()


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback on this machine")
def test_ipv6_listener_and_addresses(app_factory):
    app = app_factory(
        """
w = Worker("text://[::1]:0", name="six")
w.on_message = lambda conn, line: conn.send(conn.remote_ip + " " + line)
"""
    ).start()
    listen = app.status()["workers"][0]["listen"]
    assert listen.startswith("text://[::1]:")
    port = int(listen.rsplit(":", 1)[1])
    client = socket.create_connection(("::1", port), timeout=5)
    client.sendall(b"hello\n")
    assert read_lines(client, 1) == ["::1 hello"]
    rows = json.loads(app.cli("connections", "--json").stdout)["connections"]
    assert rows[0]["remote"] == f"[::1]:{client.getsockname()[1]}"
    assert rows[0]["local"] == f"[::1]:{port}"


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback on this machine")
def test_dual_stack_listener_takes_ipv4_and_ipv6_clients(app_factory):
    app = app_factory(
        """
w = Worker("text://[::]:0", name="both")
w.on_message = lambda conn, line: conn.send(conn.remote_address + " " + conn.local_address + " " + line)
udp = Worker("udp://[::]:0", name="both-udp")
udp.on_message = lambda conn, data: conn.send(conn.remote_ip + " " + conn.remote_address + " " + data.decode())
"""
    ).start()
    listen = app.status()["workers"][0]["listen"]
    assert listen.startswith("text://[::]:")
    port = int(listen.rsplit(":", 1)[1])
    four = socket.create_connection(("127.0.0.1", port), timeout=5)
    six = socket.create_connection(("::1", port), timeout=5)
    four.sendall(b"over ipv4\n")
    six.sendall(b"over ipv6\n")
    assert read_lines(four, 1) == [f"127.0.0.1:{four.getsockname()[1]} 127.0.0.1:{port} over ipv4"]
    assert read_lines(six, 1) == [f"[::1]:{six.getsockname()[1]} [::1]:{port} over ipv6"]
    rows = json.loads(app.cli("connections", "--json").stdout)["connections"]
    assert sorted(row["remote"] for row in rows) == sorted([f"127.0.0.1:{four.getsockname()[1]}", f"[::1]:{six.getsockname()[1]}"])
    assert sorted(row["local"] for row in rows) == sorted([f"127.0.0.1:{port}", f"[::1]:{port}"])
    udp_port = app.port(1)
    datagram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    datagram.settimeout(5)
    datagram.sendto(b"over udp", ("127.0.0.1", udp_port))
    assert datagram.recv(100).decode() == f"127.0.0.1 127.0.0.1:{datagram.getsockname()[1]} over udp"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run workers as another user")
def test_unix_socket_belongs_to_the_workers_user(app_factory, tmp_path):
    import pwd

    nobody = pwd.getpwnam("nobody")
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "owned.sock"
    app = app_factory(
        f"""
w = Worker("unix://{path}", name="owned", protocol="text", user="nobody", unix_mode=0o600)
w.on_message = lambda conn, line: conn.send(str(os.getuid()) + " " + line)
"""
    ).start()
    info = path.stat()
    assert (info.st_uid, info.st_gid, oct(info.st_mode & 0o777)) == (nobody.pw_uid, nobody.pw_gid, "0o600")
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(str(path))
    client.sendall(b"who\n")
    assert read_lines(client, 1) == [f"{nobody.pw_uid} who"]
    client.close()
    app.cli("stop")
    assert not path.exists()


def test_a_unix_socket_in_use_is_not_taken_over_and_a_stale_one_is_replaced(app_factory, tmp_path):
    path = tmp_path / "shared.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody accepts on it: what a crash leaves
    body = f"""
w = Worker("unix://{path}", name="{{name}}", protocol="text")
w.on_message = lambda conn, line: conn.send("{{name}} " + line)
"""
    first = app_factory(body.format(name="first")).start()

    def ask() -> list[str]:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(5)
        client.connect(str(path))
        client.sendall(b"hi\n")
        try:
            return read_lines(client, 1)
        finally:
            client.close()

    assert ask() == ["first hi"]
    second = app_factory(body.format(name="second"))
    result = second.cli("start", "-d", check=False)
    assert result.returncode == 1
    assert f"cannot listen on unix://{path}: address in use" in result.stderr
    assert path.exists() and ask() == ["first hi"]
    first.cli("stop")
    assert not path.exists()
