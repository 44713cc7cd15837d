"""Headless Chromium for the tests, driven over the DevTools protocol (JSON over a websocket,
with aiohttp): navigate, evaluate, click, answer a Basic login prompt, take a screenshot.

Debian's chromium, with the flags this machine needs (no sandbox as root, no background
networking: the network is closed and Chromium would keep asking). Waits are on conditions:
an event, or an expression in the page that becomes true.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--remote-debugging-port=0")
_LISTENING = "DevTools listening on "


class BrowserError(AssertionError):
    pass


class Page:
    """One tab. `login`: the (user, password) a Basic prompt is answered with, as a person
    would type them; None: the prompt is cancelled."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.login: tuple[str, str] | None = None
        self._ids = 0
        self._calls: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self.console: deque[str] = deque(maxlen=50)  # the page's errors, for failure messages
        self._answering: set[asyncio.Task[Any]] = set()  # held until done
        self._reader = asyncio.create_task(self._read())

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._ids += 1
        future = asyncio.get_running_loop().create_future()
        self._calls[self._ids] = future
        await self.ws.send_str(json.dumps({"id": self._ids, "method": method, "params": params}))
        async with asyncio.timeout(30):
            return await future

    async def _read(self) -> None:
        async for message in self.ws:
            data = json.loads(message.data)
            if "id" in data:
                future = self._calls.pop(data["id"])
                if "error" in data:
                    future.set_exception(BrowserError(f"{data['error']}"))
                else:
                    future.set_result(data.get("result", {}))
            else:
                await self._on_event(data["method"], data.get("params", {}))

    async def _on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Fetch.requestPaused":
            self._answer("Fetch.continueRequest", requestId=params["requestId"])
        elif method == "Fetch.authRequired":
            answer = ({"response": "ProvideCredentials", "username": self.login[0],
                       "password": self.login[1]} if self.login else {"response": "CancelAuth"})
            self._answer("Fetch.continueWithAuth", requestId=params["requestId"],
                         authChallengeResponse=answer)
        elif method == "Runtime.exceptionThrown":
            self.console.append(str(params["exceptionDetails"]))
        self._events.setdefault(method, asyncio.Queue()).put_nowait(params)

    def _answer(self, method: str, **params: Any) -> None:
        """A paused request is answered from the reader's side: it must not wait on itself."""
        task = asyncio.create_task(self.send(method, **params))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def event(self, method: str, within_s: float = 30.0) -> dict[str, Any]:
        queue = self._events.setdefault(method, asyncio.Queue())
        async with asyncio.timeout(within_s):
            return await queue.get()

    async def open(self, url: str, *, scripts: bool = True) -> None:
        """Load `url` and wait for its load event."""
        await self.send("Emulation.setScriptExecutionDisabled", value=not scripts)
        self._events.pop("Page.loadEventFired", None)
        await self.send("Page.navigate", url=url)
        await self.event("Page.loadEventFired")

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, within_s: float = 20.0) -> Any:
        """The value of `expression` once it is truthy in the page."""
        async with asyncio.timeout(within_s):
            while True:
                value = await self.evaluate(expression)
                if value:
                    return value
                await asyncio.sleep(0.05)

    async def screenshot(self) -> bytes:
        shot = await self.send("Page.captureScreenshot", format="png")
        return base64.b64decode(shot["data"])

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self.ws.close()


@contextlib.asynccontextmanager
async def chromium(profile: Path, window: tuple[int, int]) -> AsyncIterator[Page]:
    """A Chromium with one tab of `window` pixels (device scale 1), closed afterwards."""
    if CHROMIUM is None:
        import pytest

        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    process = await asyncio.create_subprocess_exec(
        CHROMIUM, *FLAGS, f"--user-data-dir={profile}",
        f"--window-size={window[0]},{window[1]}", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    said: deque[str] = deque(maxlen=40)
    try:
        endpoint = await _devtools_endpoint(process, said)
        drain = asyncio.create_task(_drain(process, said))  # a full pipe would stall it
        async with aiohttp.ClientSession() as session:
            page = await _first_tab(session, endpoint)
            await page.send("Page.enable")
            await page.send("Runtime.enable")
            await page.send("Fetch.enable", handleAuthRequests=True,
                            patterns=[{"urlPattern": "*"}])
            await page.send("Emulation.setDeviceMetricsOverride", width=window[0],
                            height=window[1], deviceScaleFactor=1, mobile=False)
            try:
                yield page
            finally:
                await page.close()
        drain.cancel()
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


async def _devtools_endpoint(process: asyncio.subprocess.Process, said: deque[str]) -> str:
    assert process.stderr is not None
    async with asyncio.timeout(60):
        while line := (await process.stderr.readline()).decode(errors="replace"):
            said.append(line)
            if line.startswith(_LISTENING):
                return line[len(_LISTENING):].strip()
    raise BrowserError("chromium did not start:\n" + "".join(said))


async def _drain(process: asyncio.subprocess.Process, said: deque[str]) -> None:
    assert process.stderr is not None
    while line := await process.stderr.readline():
        said.append(line.decode(errors="replace"))


async def _first_tab(session: aiohttp.ClientSession, browser_ws: str) -> Page:
    """The tab Chromium opened with about:blank, found through its /json/list."""
    http = browser_ws.replace("ws://", "http://", 1).split("/devtools/")[0]
    async with session.get(f"{http}/json/list") as answer:
        targets = await answer.json()
    (tab,) = [t for t in targets if t["type"] == "page"]
    return Page(await session.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0))
