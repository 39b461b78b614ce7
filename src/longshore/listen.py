"""Listen URLs and the sockets behind them.

``scheme://host:port`` binds TCP (``[::1]`` style for IPv6); ``unix:///path`` binds a
Unix socket (raw bytes unless the Worker names a protocol); ``udp://host:port`` binds
UDP. The scheme names the protocol (see :mod:`longshore.protocols`).

A Unix socket file that already exists is removed before binding only when it is stale
(left by a crash: connecting to it is refused); one that a running server still accepts
on is left alone, and binding fails with "address in use".
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class ListenAddress:
    """A parsed listen URL."""

    url: str
    scheme: str
    transport: str  # "tcp", "udp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def display(self, port: int | None = None) -> str:
        """The URL with the real port (after binding port 0)."""
        if self.transport == "unix":
            return self.url
        port = self.port if port is None else port
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{port}"


def parse_listen(url: str) -> ListenAddress:
    """Parse a listen URL; ValueError with a clear message when it is not one."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if not scheme or "://" not in url:
        raise ValueError(f"listen URL {url!r} needs a scheme, like text://0.0.0.0:2345")
    if scheme == "unix":
        path = parts.path or parts.netloc
        if not path:
            raise ValueError(f"listen URL {url!r} needs a path: unix:///run/app.sock")
        return ListenAddress(url, "tcp", "unix", path=path)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"listen URL {url!r} has an invalid port") from None
    if parts.hostname is None or port is None:
        raise ValueError(f"listen URL {url!r} needs a host and a port, like {scheme}://0.0.0.0:2345")
    transport = "udp" if scheme == "udp" else "tcp"
    return ListenAddress(url, scheme, transport, host=parts.hostname, port=port)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _unix_socket_in_use(path: str) -> bool:
    """True unless connecting to the socket file ``path`` is refused (nobody accepts on
    it: stale) or it has gone. A server too busy to accept (a full backlog, a timeout)
    or a socket we may not connect to counts as in use: it is never removed."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True
    finally:
        probe.close()
    return True


def bind_socket(address: ListenAddress, *, reuse_port: bool = False, backlog: int = 1024, listen: bool = True,
                unix_mode: int = 0o666) -> socket.socket:
    """Create, bind and (for streams) listen on a non-blocking socket for ``address``."""
    if address.transport == "unix":
        try:
            mode = os.stat(address.path).st_mode
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISSOCK(mode):
                if _unix_socket_in_use(address.path):
                    raise OSError(errno.EADDRINUSE, f"address in use: a server accepts on {address.path}")
                os.unlink(address.path)  # a stale socket left by a crash
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(address.path)
            os.chmod(address.path, unix_mode)
            if listen:
                sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock
    family = _family(address.host)
    kind = socket.SOCK_DGRAM if address.transport == "udp" else socket.SOCK_STREAM
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and address.host in ("::", ""):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((address.host, address.port))
        if listen and kind == socket.SOCK_STREAM:
            sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
