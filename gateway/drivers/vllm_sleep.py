"""`vllm-sleep`: a vLLM server started with sleep mode; `POST /wake_up` loads,
`POST /sleep?level=1` unloads, `GET /is_sleeping` is the truth."""

from __future__ import annotations

from collections.abc import Sequence

import aiohttp

from gateway.config import BackendConfig, ModelConfig
from gateway.drivers.base import DriverError, LostCallback
from gateway.drivers.http import answers, call
from gateway.upstream import Upstreams


class VllmSleepDriver:
    manages_residency = True

    def __init__(self, backend: BackendConfig, models: Sequence[ModelConfig],
                 upstreams: Upstreams) -> None:
        assert backend.base_url is not None
        self.backend = backend
        self.base_url = backend.base_url
        self.upstreams = upstreams
        self._models = [model.name for model in models]

    @property
    def _session(self) -> aiohttp.ClientSession:
        return self.upstreams.session(self.backend.name)

    async def start(self, on_lost: LostCallback) -> None:
        pass

    async def load(self, model: ModelConfig) -> None:
        await call(self._session, "POST", f"{self.base_url}/wake_up")

    async def unload(self, model: ModelConfig) -> None:
        await call(self._session, "POST", f"{self.base_url}/sleep?level=1")

    async def resident(self) -> set[str] | None:
        answer = await call(self._session, "GET", f"{self.base_url}/is_sleeping", limit_s=10)
        if not isinstance(answer, dict) or "is_sleeping" not in answer:
            raise DriverError(f"vLLM's /is_sleeping gave an unexpected answer: {answer!r:.200}")
        return set() if answer["is_sleeping"] else set(self._models)

    def url_for(self, model: ModelConfig) -> str:
        return self.base_url

    async def health(self) -> bool:
        return await answers(self._session, f"{self.base_url}/health")

    async def close(self) -> None:
        pass
