"""`vllm-sleep`: a vLLM server started with sleep mode; `POST /wake_up` loads,
`POST /sleep?level=1` unloads (the weights go to host RAM, a wake away: the sleep tier),
`POST /sleep?level=2` unloads fully (nothing kept, when the node's host memory is spoken for),
`GET /is_sleeping` is the truth."""

from __future__ import annotations

from gateway.config.schema import ModelConfig
from gateway.residency.drivers.base import DriverError
from gateway.residency.drivers.http import HttpDriver


class VllmSleepDriver(HttpDriver):
    sleeps = True

    async def load(self, model: ModelConfig) -> None:
        await self._call("POST", "/wake_up")

    async def unload(self, model: ModelConfig) -> None:
        await self._call("POST", "/sleep?level=1")

    async def unload_fully(self, model: ModelConfig) -> None:
        await self._call("POST", "/sleep?level=2")

    async def resident(self) -> set[str] | None:
        answer = await self._call("GET", "/is_sleeping", limit_s=10)
        if not isinstance(answer, dict) or "is_sleeping" not in answer:
            raise DriverError("vLLM's /is_sleeping gave an unexpected answer",
                              detail=f"{answer!r:.500}")
        return set() if answer["is_sleeping"] else {model.name for model in self.models}

    async def health(self) -> bool:
        return await self._answers("/health")
