"""What each model was measured to hold, remembered across restarts.

A model's `size_gb` is a first guess; once it has been loaded, what its backend reports (Ollama's
`/api/ps`) or its server's process group holds (nvidia-smi, else RSS) is what the budget counts.
The figures are kept by backend and served name (a route), in Redis when the gateway has one
(`<ns>:coord:memory`, a hash beside the replicas' coordination keys, so purging the response
cache keeps them), else in this process only.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Sequence
from typing import Protocol

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.config.schema import GatewayConfig, ModelConfig
from gateway.residency.admission import Slot
from gateway.residency.drivers.base import Driver, DriverError, Measured
from gateway.residency.nodes import Lane
from policies.types import State

log = structlog.get_logger(__name__)

_REDIS_TIMEOUT_S = 2.0
_CHANGE_GB = 0.05  # smaller changes (a KV cache filling) are not news for the policy
_ROOM_SLACK_GB = 0.05  # a reading of free memory is rounded to MiB; do not refuse for that
_HOLDING = (State.LOADED, State.LOADING, State.UNLOADING)


def route_key(model: ModelConfig) -> str:
    """A route's figures belong to what the backend serves, whatever the config calls it."""
    return f"{model.backend}/{model.served_name}"


class MemoryBook(Protocol):
    async def load(self) -> dict[str, Measured]: ...

    async def record(self, key: str, measured: Measured) -> None: ...

    async def close(self) -> None: ...


class LocalBook:
    """No Redis: remembered while the process runs."""

    def __init__(self) -> None:
        self._figures: dict[str, Measured] = {}

    async def load(self) -> dict[str, Measured]:
        return dict(self._figures)

    async def record(self, key: str, measured: Measured) -> None:
        self._figures[key] = measured

    async def close(self) -> None:
        pass


class RedisBook:
    def __init__(self, url: str, namespace: str) -> None:
        self._key = f"{namespace}:coord:memory"
        self._redis: Redis = Redis.from_url(url, socket_timeout=_REDIS_TIMEOUT_S,
                                            socket_connect_timeout=_REDIS_TIMEOUT_S)

    async def load(self) -> dict[str, Measured]:
        try:
            raw = await self._redis.hgetall(self._key)
        except (RedisError, OSError) as exc:
            log.warning("memory.unavailable", error=str(exc)[:200], then="first guesses")
            return {}
        figures = {}
        for key, value in raw.items():
            with contextlib.suppress(ValueError, TypeError, KeyError):
                data = json.loads(value)
                figures[key.decode()] = Measured(float(data["gb"]), str(data["source"]),
                                                 data.get("gpu_gb"))
        return figures

    async def record(self, key: str, measured: Measured) -> None:
        value = json.dumps({"gb": measured.gb, "source": measured.source,
                            "gpu_gb": measured.gpu_gb})
        try:
            await self._redis.hset(self._key, key, value)
        except (RedisError, OSError) as exc:
            log.warning("memory.not_kept", key=key, error=str(exc)[:200])

    async def close(self) -> None:
        await self._redis.aclose()


def book_for(config: GatewayConfig) -> MemoryBook:
    url = config.cache.redis_url
    return LocalBook() if url is None else RedisBook(url, config.cache.namespace)


class Meter:
    """Measures what resident models hold, remembers it (`book`), and gives each slot its
    figure: the policies then count it instead of the configured `size_gb`."""

    def __init__(self, book: MemoryBook) -> None:
        self.book = book
        self.known: dict[str, Measured] = {}

    async def start(self) -> None:
        self.known = await self.book.load()

    def recall(self, model: ModelConfig) -> Measured | None:
        return self.known.get(route_key(model))

    async def measure(self, driver: Driver, slots: Iterable[Slot]) -> bool:
        """Ask `driver` what its loaded models hold; True if a figure changed."""
        try:
            figures = await driver.measure()
        except (DriverError, TimeoutError) as exc:
            log.info("memory.measure_failed", backend=driver.backend.name, error=str(exc))
            return False
        if not figures:
            return False
        changed = False
        for slot in slots:
            found = figures.get(slot.model.name)
            if found is None or found.gb <= 0 or slot.residency.state is not State.LOADED:
                continue
            if slot.measured is None or abs(slot.measured.gb - found.gb) > _CHANGE_GB:
                changed = True
                log.info("memory.measured", model=slot.model.name, gb=round(found.gb, 3),
                         source=found.source, size_gb=slot.model.size_gb)
                self.known[route_key(slot.model)] = found
                await self.book.record(route_key(slot.model), found)
            slot.measured = found
        return changed

    async def measure_node(self, lane: Lane, drivers: Sequence[Driver],
                           slots: Iterable[Slot]) -> bool:
        """What the node's resident models hold, and what its GPUs have free; True if news."""
        slots = list(slots)
        changed = False
        for driver in drivers:
            changed |= await self.measure(driver, [s for s in slots if s.driver is driver])
        free = await _free_gb(drivers)
        if free is not None:
            lane.saw_free(free, _resident_gb(lane, slots))
        return changed

    async def room_for(self, lane: Lane, drivers: Sequence[Driver], slots: Iterable[Slot],
                       slot: Slot) -> bool:
        """Where the node's free memory can be read, whether what the model needs is free;
        if not, the node's room shrinks to what it really has and the policy decides again
        (evicting more)."""
        free = await _free_gb(drivers)
        if free is None:
            return True
        lane.saw_free(free, _resident_gb(lane, slots))
        need = slot.size_gb
        if need <= free + _ROOM_SLACK_GB:
            return True
        log.info("scheduler.swap_deferred", node=lane.name, load=slot.model.name,
                 reason="not enough free memory", needs_gb=round(need, 2),
                 free_gb=round(free, 2))
        return False


async def _free_gb(drivers: Iterable[Driver]) -> float | None:
    for driver in drivers:
        try:
            free = await driver.free_gb()
        except (DriverError, TimeoutError):
            continue
        if free is not None:
            return free  # the node's drivers share its GPUs: one reading is the node's
    return None


def _resident_gb(lane: Lane, slots: Iterable[Slot]) -> float:
    """What the node's managed models hold or are about to (loading, unloading)."""
    return sum(s.size_gb for s in slots
               if s.managed and s.node == lane.name and s.residency.state in _HOLDING)
