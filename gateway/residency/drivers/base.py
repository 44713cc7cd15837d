"""The small protocol every driver implements; the scheduler never knows which one it holds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.config.schema import BackendConfig, ModelConfig


class DriverError(Exception):
    """A load, unload or health check failed.

    The message is what a client may read: one line, no backend URLs, server paths, exception
    class names or process output. `detail` keeps all of that for logs and for admins.
    `retryable` is False when trying again cannot help until an operator acts (a model file
    that does not exist, a command that cannot run): clients should then not retry.
    """

    def __init__(self, message: str, *, detail: str | None = None,
                 retryable: bool = True, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail or message
        self.retryable = retryable
        self.status = status  # the backend's HTTP status, when it answered one


@dataclass(frozen=True)
class Measured:
    """What a resident model really holds, as its backend or host reports it."""

    gb: float  # all of its memory: what the node's budget counts
    source: str  # where the figure comes from: "ollama", "nvidia-smi", "rss"
    gpu_gb: float | None = None  # the part in GPU memory, where it is told apart (Ollama)


# Called by a driver when a model it had loaded went away by itself (crash, backend eviction).
LostCallback = Callable[[str, str], None]  # (model name, reason)


class Driver(Protocol):
    backend: BackendConfig
    models: list[ModelConfig]  # the backend's models; a reload may replace the list
    # False for backends someone else runs: their models are always on and outside the budget.
    manages_residency: bool
    # True when `unload` puts a model to sleep (its weights in host RAM, a wake away) and
    # `unload_fully` frees them too (vLLM sleep level 2); False: both simply unload.
    sleeps: bool

    async def start(self, on_lost: LostCallback) -> None:
        """Open what the driver needs; `on_lost` reports models that vanish by themselves."""

    async def load(self, model: ModelConfig) -> None:
        """Make `model` ready to serve; raise DriverError if it cannot be."""

    async def unload(self, model: ModelConfig) -> None:
        """Free `model`'s memory (its GPU memory, for a driver that `sleeps`); raise
        DriverError if that failed."""

    async def unload_fully(self, model: ModelConfig) -> None:
        """Free all `model`'s memory, host RAM too; for most drivers the same as `unload`."""

    async def resident(self) -> set[str] | None:
        """Names (model.name) the backend itself says are loaded; None if it cannot tell."""

    def url_for(self, model: ModelConfig) -> str:
        """The base URL (without /v1) that serves `model` right now."""

    async def health(self) -> bool:
        """Whether the backend answers at all."""

    async def measure(self) -> dict[str, Measured] | None:
        """What each resident model (by name) really holds; None if the backend cannot tell."""

    async def free_gb(self) -> float | None:
        """Free memory on the backend's node (its GPUs), where it can be read; else None."""

    def server_of(self, model: ModelConfig) -> tuple[int, int] | None:
        """(pid, port) of the server process the driver runs for `model`, if it runs one."""

    def after_request(self, model: ModelConfig) -> None:
        """A request for `model` has ended (its lease was released); never blocks. Drivers
        whose backend changes its own residency on requests (Ollama) react here."""

    async def close(self) -> None:
        """Release everything; a process driver stops the processes it started."""
