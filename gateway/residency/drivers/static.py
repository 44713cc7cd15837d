"""`static` (config kind `openai`): a server someone else runs; always on, outside the budget."""

from __future__ import annotations

from gateway.config.schema import ModelConfig
from gateway.residency.drivers.http import HttpDriver


class StaticDriver(HttpDriver):
    manages_residency = False

    async def load(self, model: ModelConfig) -> None:
        pass

    async def unload(self, model: ModelConfig) -> None:
        pass

    async def resident(self) -> set[str] | None:
        return None

    async def health(self) -> bool:
        return await self._answers("/v1/models")
