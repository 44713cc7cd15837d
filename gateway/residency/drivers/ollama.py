"""`ollama`: load with `POST /api/generate {model, keep_alive}` and no prompt, unload with
`keep_alive: 0`, and take `GET /api/ps` as the truth about what is resident."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.config.schema import ModelConfig
from gateway.redaction import public_line
from gateway.residency.drivers.base import DriverError
from gateway.residency.drivers.http import HttpDriver

_POLL_FIRST_S, _POLL_MAX_S = 0.01, 0.5
_UNLOAD_SLACK_S = 20.0  # beyond stop_grace: a generation in flight ends at its next token


def canonical(name: str) -> str:
    """Ollama reports `qwen2.5` as `qwen2.5:latest`."""
    return name if ":" in name else f"{name}:latest"


class OllamaDriver(HttpDriver):
    @property
    def _by_served(self) -> dict[str, str]:
        return {canonical(model.served_name): model.name for model in self.models}

    async def load(self, model: ModelConfig) -> None:
        # The gateway decides when to unload, so Ollama is asked to keep the model forever.
        body: dict[str, Any] = {"model": model.served_name, "keep_alive": -1}
        if model.num_ctx:
            body["options"] = {"num_ctx": model.num_ctx}
        answer = await self._call("POST", "/api/generate", json=body)
        if isinstance(answer, dict) and answer.get("error"):
            raise DriverError(f"Ollama could not load {model.served_name}: "
                              f"{public_line(str(answer['error']))}", detail=str(answer))

    async def unload(self, model: ModelConfig) -> None:
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
        answer = await self._call("GET", "/api/ps", limit_s=10)
        if not isinstance(answer, dict) or not isinstance(answer.get("models"), list):
            raise DriverError("Ollama's /api/ps gave an unexpected answer",
                              detail=f"{answer!r:.500}")
        names = (entry.get("name") or entry.get("model") for entry in answer["models"])
        return {self._by_served[canonical(n)] for n in names if canonical(n) in self._by_served}

    async def health(self) -> bool:
        return await self._answers("/api/version")
