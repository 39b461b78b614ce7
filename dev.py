#!/usr/bin/env python3
"""Developer entry point; needs only Python 3.11+.

    python3 dev.py demo [start options]   run the chat demo (examples/chat/start.py start)
    python3 dev.py test [pytest options]  run the test suite

Each command first makes a virtual environment in .venv (once) and installs the
project into it with what the command needs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, ".venv")
PYTHON = os.path.join(VENV, "bin", "python")


def ensure_environment(extra: str) -> None:
    """Create .venv and install the project (with ``extra``) when something changed."""
    if sys.version_info < (3, 11):
        sys.exit("longshore needs Python 3.11 or newer")
    if not os.path.exists(PYTHON):
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    marker = os.path.join(VENV, f".installed-{extra or 'base'}")
    stamp = str(os.path.getmtime(os.path.join(ROOT, "pyproject.toml")))
    if os.path.exists(marker) and open(marker).read() == stamp:
        return
    target = f"{ROOT}[{extra}]" if extra else ROOT
    print(f"installing longshore{'[' + extra + ']' if extra else ''} into .venv ...", flush=True)
    subprocess.check_call([PYTHON, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", target])
    with open(marker, "w") as file:
        file.write(stamp)


def main() -> int:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    rest = sys.argv[2:]
    if command == "demo":
        ensure_environment("")
        script = os.path.join(ROOT, "examples", "chat", "start.py")
        print("chat demo: open http://127.0.0.1:2345/ in a few browser tabs, Ctrl+C stops it", flush=True)
        return subprocess.call([PYTHON, script, "start", *rest])
    if command == "test":
        ensure_environment("test")
        return subprocess.call([PYTHON, "-m", "pytest", *rest], cwd=ROOT)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
