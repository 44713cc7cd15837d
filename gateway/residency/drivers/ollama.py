"""`ollama`: load with `POST /api/generate {model, keep_alive}` and no prompt, unload with
`keep_alive: 0`, and take `GET /api/ps` as the truth about what is resident.

Residency is the gateway's decision, not Ollama's timer. A model is loaded with `keep_alive: -1`
(forever), but Ollama sets a model's keep-alive anew on every request that names none, and its
OpenAI layer (`/v1`, what the gateway relays) never does: after each request the model would
unload once Ollama's own default (OLLAMA_KEEP_ALIVE, 5 min) has passed, whatever the gateway's
`ttl` says. So the pin is put back after requests: a no-prompt `keep_alive: -1` call, sent in
the background a moment after a request starts or ends (one per model at a time, never while
the gateway unloads it, and only while Ollama still lists the model, so a pin never loads one);
and a periodic look at `/api/ps` re-pins a model that someone else's request left on a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Coroutine
from typing import Any

import structlog

from gateway.config.schema import ModelConfig
from gateway.redaction import public_line
from gateway.residency.drivers.base import DriverError, LostCallback, Measured
from gateway.residency.drivers.http import HttpDriver

log = structlog.get_logger(__name__)

_POLL_FIRST_S, _POLL_MAX_S = 0.01, 0.5
_UNLOAD_SLACK_S = 20.0  # beyond stop_grace: a generation in flight ends at its next token
# A request's keep-alive takes effect when Ollama schedules it, just after the gateway granted
# it; the pin follows within this, and the requests of a burst share one pin.
PIN_DELAY_S = 0.5
PIN_CHECK_S = 30.0  # how often /api/ps is read for pinned models left on a timer
_FOREVER_YEARS = 100  # Ollama shows "forever" as an expiry ~292 years ahead


def canonical(name: str) -> str:
    """Ollama reports `qwen2.5` as `qwen2.5:latest`."""
    return name if ":" in name else f"{name}:latest"


class OllamaDriver(HttpDriver):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pinned: set[str] = set()  # loaded by the gateway and not unloaded since
        self._due: dict[str, asyncio.Task[None]] = {}  # pins waiting out PIN_DELAY_S
        self._pinning: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # pin vs unload
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def _by_served(self) -> dict[str, str]:
        return {canonical(model.served_name): model.name for model in self.models}

    @property
    def pins_pending(self) -> int:
        """Pins scheduled or being sent."""
        return len(self._tasks)

    async def start(self, on_lost: LostCallback) -> None:
        self._spawn(self._check_pins_forever())

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def load(self, model: ModelConfig) -> None:
        answer = await self._call("POST", "/api/generate", json=_pin_body(model))
        if isinstance(answer, dict) and answer.get("error"):
            raise DriverError(f"Ollama could not load {model.served_name}: "
                              f"{public_line(str(answer['error']))}", detail=str(answer))
        self._pinned.add(model.name)

    async def unload(self, model: ModelConfig) -> None:
        self._pinned.discard(model.name)
        due = self._due.pop(model.name, None)
        if due is not None:
            due.cancel()
        async with self._pinning[model.name]:  # a pin on its way lands first, not after
            await self._unload(model)

    async def _unload(self, model: ModelConfig) -> None:
        body = {"model": model.served_name, "keep_alive": 0}
        await self._call("POST", "/api/generate", json=body)
        # Ollama defers an unload while the model still serves a request (one whose client
        # left, say): the memory is free only once /api/ps no longer lists it.
        delay = _POLL_FIRST_S
        async with asyncio.timeout(self.backend.stop_grace + _UNLOAD_SLACK_S):
            while model.name in (await self.resident() or ()):
                await asyncio.sleep(delay)
                delay = min(delay * 2, _POLL_MAX_S)

    async def resident(self) -> set[str] | None:
        return set(await self._expiries())

    async def health(self) -> bool:
        return await self._answers("/api/version")

    def url_for(self, model: ModelConfig) -> str:
        self._pin_soon(model)  # a request is about to reset the model's keep-alive
        return self.base_url

    def after_request(self, model: ModelConfig) -> None:
        self._pin_soon(model)

    # -- keeping the pin ------------------------------------------------------------------------

    def _pin_soon(self, model: ModelConfig) -> None:
        """Pin `model` again within PIN_DELAY_S, unless a pin is already due."""
        if model.name in self._pinned and model.name not in self._due:
            self._due[model.name] = self._spawn(self._pin_later(model))

    async def _pin_later(self, model: ModelConfig) -> None:
        try:
            await asyncio.sleep(PIN_DELAY_S)
        finally:
            if self._due.get(model.name) is asyncio.current_task():
                del self._due[model.name]  # from now on a request asks for the next pin
        try:
            await self._pin(model)
        except (DriverError, TimeoutError) as exc:
            log.warning("ollama.pin_failed", model=model.name, error=str(exc))

    async def _pin(self, model: ModelConfig) -> None:
        async with self._pinning[model.name]:
            if model.name not in self._pinned:
                return  # unloaded meanwhile
            if model.name not in await self._expiries():
                return  # gone from Ollama: a pin would load it again, over the budget maybe
            await self._call("POST", "/api/generate", json=_pin_body(model))
        log.debug("ollama.pinned", model=model.name)

    async def _check_pins_forever(self) -> None:
        while True:
            await asyncio.sleep(PIN_CHECK_S)
            with contextlib.suppress(DriverError, TimeoutError):
                await self._check_pins()

    async def _check_pins(self) -> None:
        """Re-pin what Ollama shows on a timer: requests that did not come through us."""
        for name, expires_at in (await self._expiries()).items():
            model = next((m for m in self.models if m.name == name), None)
            if model is not None and not _forever(expires_at):
                log.info("ollama.pin_lost", model=name, expires_at=expires_at)
                self._pin_soon(model)

    async def measure(self) -> dict[str, Measured]:
        """/api/ps says what each model holds: `size` in all, `size_vram` of it on the GPU."""
        return {name: _measured(entry) for name, entry in (await self._running()).items()}

    async def _expiries(self) -> dict[str, str]:
        """Our resident models (by name) with their `expires_at` as Ollama reports it."""
        return {name: str(entry.get("expires_at", ""))
                for name, entry in (await self._running()).items()}

    async def _running(self) -> dict[str, dict[str, Any]]:
        """Our resident models (by name) with what /api/ps says of each."""
        answer = await self._call("GET", "/api/ps", limit_s=10)
        if not isinstance(answer, dict) or not isinstance(answer.get("models"), list):
            raise DriverError("Ollama's /api/ps gave an unexpected answer",
                              detail=f"{answer!r:.500}")
        by_served = self._by_served
        found = {}
        for entry in answer["models"]:
            served = canonical(str(entry.get("name") or entry.get("model")))
            if served in by_served and isinstance(entry, dict):
                found[by_served[served]] = entry
        return found

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _pin_body(model: ModelConfig) -> dict[str, Any]:
    """Load, or pin again: the same body, so that a pin never differs from the load in an
    option (`num_ctx`) that would make Ollama reload the model."""
    body: dict[str, Any] = {"model": model.served_name, "keep_alive": -1}
    if model.num_ctx:
        body["options"] = {"num_ctx": model.num_ctx}
    return body


def _measured(entry: dict[str, Any]) -> Measured:
    size, vram = entry.get("size"), entry.get("size_vram")
    gb = float(size) / 1e9 if isinstance(size, int | float) else 0.0
    gpu = float(vram) / 1e9 if isinstance(vram, int | float) else None
    return Measured(gb, "ollama", gpu)


def _forever(expires_at: str) -> bool:
    """Whether Ollama's `expires_at` (RFC 3339) is its "never": centuries ahead."""
    try:
        return int(expires_at[:4]) - time.gmtime().tm_year > _FOREVER_YEARS
    except ValueError:
        return True  # cannot tell: leave it be
