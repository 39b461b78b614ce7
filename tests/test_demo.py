"""The README's demo: the chat server and its page, started the way a user starts it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
from websockets.asyncio.client import connect as ws_connect

ROOT = Path(__file__).resolve().parent.parent


def start_demo(tmp_path: Path, **extra: str):
    """Copy the demo, start it with free ports; return (cli, page port, chat port)."""
    script = tmp_path / "start.py"
    shutil.copy(ROOT / "examples" / "chat" / "start.py", script)
    env = {**os.environ, "CHAT_PORT": "0", "CHAT_WS_PORT": "0", **extra}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=60, check=True)

    cli("start", "-d")
    listens = {w["name"]: int(w["listen"].rsplit(":", 1)[1]) for w in json.loads(cli("status", "--json").stdout)["workers"]}
    return cli, listens["web"], listens["chat"]


def test_chat_demo_broadcasts_between_clients(tmp_path):
    cli, web_port, chat_port = start_demo(tmp_path, CHAT_PUSH_INTERVAL="0.3")
    try:
        page = httpx.get(f"http://127.0.0.1:{web_port}/")
        assert page.status_code == 200 and f":{chat_port}/" in page.text and "new WebSocket" in page.text
        assert httpx.get(f"http://127.0.0.1:{web_port}/favicon.ico").status_code == 404

        async def scenario():
            url = f"ws://127.0.0.1:{chat_port}/"
            async with ws_connect(url) as alice, ws_connect(url) as bob:

                async def line_with(ws, text):
                    # Messages from other processes may arrive in any order: wait for this one.
                    while True:
                        line = await asyncio.wait_for(ws.recv(), 5)
                        if text in line:
                            return line

                assert (await line_with(alice, "welcome")).startswith("welcome, guest")
                assert (await line_with(bob, "welcome")).startswith("welcome, guest")
                await line_with(alice, "joined")
                await alice.send("/nick alice")
                await line_with(bob, "is now alice")
                await alice.send("hello bob")
                assert await line_with(bob, "hello bob") == "<alice> hello bob"
                await line_with(bob, "* server time")  # the push arrives
                await bob.send("/quit")
                assert await line_with(bob, "bye") == "bye"
                assert (await line_with(alice, " left")).endswith("left")

        asyncio.run(scenario())
    finally:
        cli("stop")
