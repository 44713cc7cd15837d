"""`llama-router`: llama.cpp's `llama-server` in router mode (`--models-dir` or `--models-preset`),
which runs one child server per model. `POST /models/load` and `POST /models/unload` start and stop
a child and answer at once; `GET /models` is the truth, and says when the change is done.

Start the router with `--models-max 0` so that the gateway alone decides what to evict."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from gateway.config.schema import ModelConfig
from gateway.residency.drivers.base import DriverError
from gateway.residency.drivers.http import HttpDriver

# A sleeping child is still resident: the router wakes it on the next request.
_RESIDENT = frozenset({"loaded", "sleeping"})
_STARTED = _RESIDENT | {"loading"}
_POLL_FIRST, _POLL_MAX = 0.05, 0.5  # seconds between looks at /models: quick at first
# The router waits its own `stop-timeout` (10 s by default) before it kills a child.
_UNLOAD_SLACK_S = 5.0

Status = dict[str, Any]


class LlamaRouterDriver(HttpDriver):
    @property
    def _by_id(self) -> dict[str, str]:
        return {model.served_name: model.name for model in self.models}

    async def load(self, model: ModelConfig) -> None:
        await self._request("load", model, unless=_STARTED)
        status = await self._wait(model, lambda value: value != "loading",
                                  self.backend.start_timeout)
        if status.get("value") not in _RESIDENT:
            code = status.get("exit_code", "unknown")
            raise DriverError(f"llama.cpp router could not load {model.served_name}: "
                              f"its server exited (code {code}); see the router's log")

    async def unload(self, model: ModelConfig) -> None:
        await self._request("unload", model, unless=frozenset({"unloaded"}))
        await self._wait(model, lambda value: value == "unloaded",
                         self.backend.stop_grace + _UNLOAD_SLACK_S)

    async def resident(self) -> set[str] | None:
        statuses = await self._statuses()
        return {self._by_id[served] for served, status in statuses.items()
                if served in self._by_id and status.get("value") in _RESIDENT}

    async def health(self) -> bool:
        return await self._answers("/health")

    async def _request(self, action: str, model: ModelConfig, unless: frozenset[str]) -> None:
        """POST /models/{action}; the router refuses a load of a running model and an unload of
        a stopped one, which is already the state we want."""
        try:
            await self._call("POST", f"/models/{action}", json={"model": model.served_name})
        except DriverError:
            if (await self._status(model)).get("value") not in unless:
                raise

    async def _wait(self, model: ModelConfig, done: Callable[[str], bool],
                    limit_s: float) -> Status:
        """Poll /models until `done(status value)`; DriverError after `limit_s`."""
        delay = _POLL_FIRST
        status: Status = {}
        try:
            async with asyncio.timeout(limit_s):
                while not done((status := await self._status(model)).get("value", "")):
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _POLL_MAX)
        except TimeoutError:
            raise DriverError(f"llama.cpp router: {model.served_name} still "
                              f"{status.get('value')!r} after {limit_s:g}s") from None
        return status

    async def _status(self, model: ModelConfig) -> Status:
        statuses = await self._statuses()
        if model.served_name not in statuses:
            known = ", ".join(sorted(statuses)) or "none"
            raise DriverError(f"llama.cpp router has no model {model.served_name!r} "
                              f"(it has: {known})")
        return statuses[model.served_name]

    async def _statuses(self) -> dict[str, Status]:
        """Each model id (and alias) the router knows, with its `status` object."""
        answer = await self._call("GET", "/models", limit_s=10)
        if not isinstance(answer, dict) or not isinstance(answer.get("data"), list):
            raise DriverError("llama.cpp router's /models gave an unexpected answer",
                              detail=f"{answer!r:.500}")
        statuses: dict[str, Status] = {}
        for entry in answer["data"]:
            status = entry.get("status") or {}
            for name in (entry.get("id"), *(entry.get("aliases") or ())):
                statuses[str(name)] = status
        return statuses
