"""A transparent TCP proxy: every client gets its own connection to the target, and
bytes flow both ways through ``pipe()``.

::

    PROXY_LISTEN=tcp://0.0.0.0:8000 PROXY_TARGET=tcp://10.0.0.2:80 python start.py start -d

``pipe()`` carries the backpressure: when one side cannot keep up, the send buffer of
the connection towards it fills, and the connection it reads from stops reading until
that buffer has drained. A slow destination thus slows the source down instead of
growing the proxy's memory.

A half-close is passed on: when one peer has finished sending (``shutdown(SHUT_WR)``,
``nc -N``), the proxy writes out what it sent and ends the stream towards the other peer,
whose answer still flows back; once both have finished, both connections close. (A peer
that closes its socket looks the same: the other peer sees the end of the stream, and
the proxy waits for it to finish too.) When a connection is lost (a reset) or runs over
TLS, which cannot half-close, ``on_close`` closes the other one, after its send buffer
was written out.
"""

from __future__ import annotations

import os

from longshore import AsyncTcpConnection, TcpConnection, Worker, run_all

LISTEN = os.environ.get("PROXY_LISTEN", "tcp://127.0.0.1:8000")
TARGET = os.environ.get("PROXY_TARGET", "tcp://127.0.0.1:8080")

proxy = Worker(LISTEN, name="proxy", count=int(os.environ.get("PROXY_PROCESSES", "1")))


def on_connect(client: TcpConnection) -> None:
    """Open a connection to the target for this client and pipe both ways."""
    upstream = AsyncTcpConnection(TARGET)
    client.pipe(upstream)
    upstream.pipe(client)
    upstream.on_close = lambda _: client.close()
    client.on_close = lambda _: upstream.close()
    upstream.connect()  # what the client sends meanwhile waits for it (and pauses it when too much)


proxy.on_connect = on_connect

if __name__ == "__main__":
    run_all()
