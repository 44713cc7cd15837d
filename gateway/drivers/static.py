"""`static` (config kind `openai`): a server someone else runs; always on, outside the budget."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.config import BackendConfig, ModelConfig
from gateway.drivers.base import LostCallback
from gateway.drivers.http import answers
from gateway.upstream import Upstreams


class StaticDriver:
    manages_residency = False

    def __init__(self, backend: BackendConfig, models: Sequence[ModelConfig],
                 upstreams: Upstreams) -> None:
        assert backend.base_url is not None
        self.backend = backend
        self.base_url = backend.base_url
        self.upstreams = upstreams

    async def start(self, on_lost: LostCallback) -> None:
        pass

    async def load(self, model: ModelConfig) -> None:
        pass

    async def unload(self, model: ModelConfig) -> None:
        pass

    async def resident(self) -> set[str] | None:
        return None

    def url_for(self, model: ModelConfig) -> str:
        return self.base_url

    async def health(self) -> bool:
        session = self.upstreams.session(self.backend.name)
        return await answers(session, f"{self.base_url}/v1/models")

    async def close(self) -> None:
        pass
