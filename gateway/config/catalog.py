"""The model catalog: public names and aliases resolved to a model and its backend."""

from __future__ import annotations

from collections.abc import Iterable

from gateway.config.schema import BackendConfig, GatewayConfig, ModelConfig
from gateway.errors import model_not_found


class Catalog:
    def __init__(self, config: GatewayConfig) -> None:
        self.backends = dict(config.backends)
        self._models = dict(config.models)
        self._names = {
            alias: model
            for model in self._models.values()
            for alias in (model.name, *model.aliases)
        }

    def resolve(self, name: str) -> ModelConfig:
        """The model a client's `model` field names; 404 `model_not_found` otherwise."""
        model = self._names.get(name)
        if model is None:
            raise model_not_found(name)
        return model

    def get(self, name: str) -> ModelConfig | None:
        return self._names.get(name)

    def backend_of(self, model: ModelConfig) -> BackendConfig:
        return self.backends[model.backend]

    def models(self) -> Iterable[ModelConfig]:
        """The public models, as clients name them."""
        return self._models.values()

    def all_models(self) -> Iterable[ModelConfig]:
        """Every route: each public model and its fallbacks (`model@backend`)."""
        for model in self._models.values():
            yield model
            yield from model.fallbacks

    def routes(self, model: ModelConfig) -> list[ModelConfig]:
        return [model, *model.fallbacks]
