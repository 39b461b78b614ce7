"""The baseline servers: a bare uvloop ``asyncio.Protocol``, with nothing of longshore.

    python bare_server.py echo [--host 127.0.0.1] [--port 0]
    python bare_server.py idle [--host 127.0.0.1] [--port 0]

``echo`` writes back whatever arrives (``data_received -> transport.write(data)``): the
ceiling a Python line-echo server can reach on this machine. ``idle`` keeps every
accepted transport and does nothing else: the least memory a connection can cost.

Once listening it prints ``port=<port>`` on stdout; it stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import sys

import uvloop


class EchoProtocol(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class IdleProtocol(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport


def raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


async def serve(kind: str, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    protocol = EchoProtocol if kind == "echo" else IdleProtocol
    server = await loop.create_server(protocol, host, port, backlog=1024)
    print(f"port={server.sockets[0].getsockname()[1]}", flush=True)
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    await stop
    server.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("echo", "idle"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    raise_nofile_limit()
    uvloop.run(serve(args.kind, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
