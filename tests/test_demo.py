"""The README's demo: the chat server, started the way a user starts it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import connect, read_lines

ROOT = Path(__file__).resolve().parent.parent


def test_chat_demo_broadcasts_between_clients(tmp_path):
    script = tmp_path / "start.py"
    shutil.copy(ROOT / "examples" / "chat" / "start.py", script)
    env = {**os.environ, "CHAT_PORT": "0"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=60, check=True)

    cli("start", "-d")
    try:
        port = int(json.loads(cli("status", "--json").stdout)["workers"][0]["listen"].rsplit(":", 1)[1])
        alice = connect(port)
        assert read_lines(alice, 1)[0].startswith("welcome, guest")
        bob = connect(port)
        assert read_lines(bob, 1)[0].startswith("welcome, guest")
        assert "joined" in read_lines(alice, 1)[0]
        alice.sendall(b"/nick alice\n")
        assert read_lines(bob, 1) == [read_lines(alice, 1)[0]]
        alice.sendall(b"hello bob\n")
        assert read_lines(bob, 1) == ["<alice> hello bob"]
        bob.sendall(b"/quit\n")
        assert read_lines(bob, 1) == ["bye"]
        assert read_lines(alice, 2)[1].endswith("left")
    finally:
        cli("stop")
