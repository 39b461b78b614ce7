"""WebSocket in a real browser: headless Chromium (driven over the DevTools protocol)
on the demo page, and a page that stops reading while the server pushes."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any

import pytest
from websockets.asyncio.client import connect as ws_connect

from conftest import wait_for
from test_demo import start_demo
from test_websocket import RECORDER

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium")


class Browser:
    """Headless Chromium with a DevTools connection; pages live in their own browser
    contexts (so each has its own renderer process, and a busy page blocks nobody else)."""

    def __init__(self) -> None:
        self.profile = tempfile.mkdtemp(prefix="longshore-chromium-")
        self.process = subprocess.Popen(
            [
                CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-renderer-backgrounding", "--disable-background-timer-throttling",
                f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.url = ""
        assert self.process.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            if "DevTools listening on " in line:
                self.url = line.split("DevTools listening on ", 1)[1].strip()
                break
        assert self.url, "chromium did not start"
        threading.Thread(target=self.process.stderr.read, daemon=True).start()  # keep the pipe drained
        self.loop = asyncio.new_event_loop()
        self.ids = 0
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.ws: Any = None
        self.run(self._connect())

    def run(self, coroutine: Any, timeout: float = 30) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, timeout))

    async def _connect(self) -> None:
        self.ws = await ws_connect(self.url, max_size=None, ping_interval=None)
        self.reader = self.loop.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            message = json.loads(raw)
            future = self.pending.pop(message.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(message)

    async def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self.ids += 1
        future = self.loop.create_future()
        self.pending[self.ids] = future
        command: dict[str, Any] = {"id": self.ids, "method": method, "params": params}
        if session:
            command["sessionId"] = session
        await self.ws.send(json.dumps(command))
        answer = await future
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]  # type: ignore[no-any-return]

    def open(self, url: str) -> str:
        """Open ``url`` in a new, separate browser context; returns the page's session id."""

        async def go() -> str:
            context = (await self.call("Target.createBrowserContext"))["browserContextId"]
            target = (await self.call("Target.createTarget", url=url, browserContextId=context))["targetId"]
            return (await self.call("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]  # type: ignore[no-any-return]

        return self.run(go())  # type: ignore[no-any-return]

    async def aevaluate(self, session: str, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", session, expression=expression, returnByValue=True)
        return result["result"].get("value")

    def evaluate(self, session: str, expression: str) -> Any:
        return self.run(self.aevaluate(session, expression))

    def close(self) -> None:
        try:
            self.run(self.ws.close(), 5)
        except Exception:
            pass
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.loop.close()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def browser():
    instance = Browser()
    yield instance
    instance.close()


LINES = "Array.from(document.querySelectorAll('#messages li')).map(li => li.textContent)"


def dom_lines(browser: Browser, page: str) -> list[str]:
    return browser.evaluate(page, LINES) or []


def test_demo_page_shows_live_messages(tmp_path, browser):
    cli, web_port, chat_port = start_demo(tmp_path, CHAT_PUSH_INTERVAL="0.5")
    try:
        page = browser.open(f"http://127.0.0.1:{web_port}/")
        wait_for(lambda: any(line.startswith("welcome, guest") for line in dom_lines(browser, page)), what="the welcome in the DOM")

        async def talk() -> str:
            async with ws_connect(f"ws://127.0.0.1:{chat_port}/") as ws:
                await ws.send("/nick python")
                await ws.send("hello browser")
                # The page sends through its own form; this client sees it.
                browser_line = ""
                deadline = time.monotonic() + 10
                sent = False
                while time.monotonic() < deadline:
                    if not sent and any("hello browser" in line for line in await browser.aevaluate(page, LINES)):
                        await browser.aevaluate(page, "document.getElementById('text').value = 'hello python'; document.getElementById('form').requestSubmit(); true")
                        sent = True
                    try:
                        line = await asyncio.wait_for(ws.recv(), 0.2)
                    except asyncio.TimeoutError:
                        continue
                    if "hello python" in line:
                        browser_line = line
                        break
                return browser_line

        assert browser.run(talk()).endswith("> hello python")
        lines = dom_lines(browser, page)
        assert "<python> hello browser" in lines
        assert any(line.startswith("* server time") for line in wait_for(lambda: [l for l in dom_lines(browser, page) if "server time" in l], what="a push"))
    finally:
        cli("stop")


PUSH_APP = (
    RECORDER
    + """
MESSAGES = 3000
import base64
PAD = base64.b64encode(os.urandom(6 * 1024))[: 8 * 1024 - 8].decode()  # compresses poorly, like real data
push = Worker("websocket://127.0.0.1:0", name="push")
web = Worker("http://127.0.0.1:0", name="web")
state = {"n": 0, "ready": {}}
results.update(accepted=0, dropped=0)

PAGE = '''<!doctype html><meta charset="utf-8"><body><script>
window.received = 0; window.bad = 0; window.expected = 0;
const socket = new WebSocket("ws://" + location.hostname + ":__PORT__" + location.pathname);
socket.onopen = () => socket.send("ready");
socket.onmessage = (event) => {
  const seq = parseInt(event.data.slice(0, 8), 10);
  if (seq !== window.expected) window.bad++;
  window.expected = seq + 1;
  window.received++;
  if (location.pathname === "/busy" && window.received === 1) {
    setTimeout(() => { const end = Date.now() + 25000; while (Date.now() < end) {} }, 0);
  }
};
</script>'''

def page(conn, request):
    conn.send(PAGE.replace("__PORT__", push.bound_listen.rsplit(":", 1)[1]))

def tick():
    ready = state["ready"]
    if len(ready) < 2 or state["n"] >= MESSAGES:
        return
    for _ in range(16):
        if state["n"] >= MESSAGES:
            break
        message = "%08d" % state["n"] + PAD
        for path, conn in ready.items():
            ok = conn.send(message)
            if path == "/busy":
                results["accepted" if ok is not False else "dropped"] += 1
        state["n"] += 1
    results["sent"] = state["n"]
    save()

def on_message(conn, message):
    if message == "ready":
        state["ready"][conn.websocket.request.path] = conn

push.on_message = on_message
push.on_worker_start = lambda worker: Timer.add(0.005, tick)
web.on_message = page
"""
)


def test_a_busy_browser_tab_is_dropped_while_another_tab_gets_everything(app_factory, browser):
    app = app_factory(PUSH_APP).start()
    push_port, web_port = app.port(0), app.port(1)
    baseline = app.processes("push")[0]["memory"]
    # Different host names: different sites, so the busy tab's renderer is its own.
    good = browser.open(f"http://127.0.0.1:{web_port}/good")
    browser.open(f"http://localhost:{web_port}/busy")
    wait_for(lambda: (app.folder / "results.json").exists() and app.read_json("results.json").get("sent") == 3000, timeout=30, what="the pushes")
    wait_for(lambda: browser.evaluate(good, "window.received") == 3000, timeout=30, what="the good tab to get everything")
    assert browser.evaluate(good, "window.bad") == 0
    results = app.read_json("results.json")
    assert results["dropped"] > 0, results
    process = wait_for(lambda: [p for p in app.processes("push") if p["send_fail"] >= results["dropped"]], what="send_fail in status")[0]
    assert process["send_fail"] == results["dropped"]
    assert process["memory"] - baseline < 48 * 1024 * 1024
    assert push_port != web_port
