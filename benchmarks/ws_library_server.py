"""The baseline: an echo/broadcast server written with the ``websockets`` library.

    python ws_library_server.py [--host 127.0.0.1] [--port 0] [--uvloop]

Every text message is echoed, except ``broadcast``, which sends one message to every
open connection (``websockets.broadcast``). The library's defaults are kept (its own
asyncio loop unless ``--uvloop``). Prints ``port=<port>`` once listening; stops on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal

from websockets import broadcast
from websockets.exceptions import ConnectionClosed
from websockets.asyncio.server import serve

CONNECTIONS: set = set()
PAYLOAD = "x" * 64


async def handler(ws) -> None:
    CONNECTIONS.add(ws)
    try:
        async for message in ws:
            if message == "broadcast":
                broadcast(CONNECTIONS, PAYLOAD)
            else:
                await ws.send(message)
    except ConnectionClosed:  # the load client closes without a close frame
        pass
    finally:
        CONNECTIONS.discard(ws)


async def main(host: str, port: int) -> None:
    stop = asyncio.get_running_loop().create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    async with serve(handler, host, port, compression=None, max_size=None) as server:
        print(f"port={server.sockets[0].getsockname()[1]}", flush=True)
        await stop


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--uvloop", action="store_true")
    options = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if options.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(main(options.host, options.port))
