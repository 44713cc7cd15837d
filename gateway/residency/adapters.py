"""LoRA adapters: cheap models that a resident base model's vLLM serves beside it.

An adapter is a catalog model with `adapter_of: BASE`. It holds no memory of its own in the
node's budget, so the scheduler treats a request for it as demand for its base: it queues in the
base's queue (the policy sees one model, and a switch between adapters of a resident base is no
swap at all) and its lease holds a lease on the base (the base is not evicted while an adapter's
call runs). Before an adapter's first call on each residency of its base it is registered there
(vLLM's runtime LoRA API): `GET /v1/models` says whether vLLM already has it (`--lora-modules`,
another replica), else `POST /v1/load_lora_adapter` loads it, in milliseconds. A new residency
of the base starts with none.

`Adapters` is the one owner of those registrations; the adapter's `Residency` shows them (loaded
while registered on the live base, failed with a back-off when vLLM refused it).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable

import aiohttp

from gateway.config.schema import ModelConfig
from gateway.residency.admission import Slot
from gateway.residency.drivers.base import DriverError
from gateway.residency.drivers.http import call
from policies.backoff import retry_delay
from policies.types import State

SessionFor = Callable[[str], aiohttp.ClientSession]  # a backend's name -> its pooled session
_CONTROL_LIMIT_S = 30.0  # a registration reads a few MB from disk at most


class Adapters:
    def __init__(self, session_for: SessionFor, clock: Callable[[], float]) -> None:
        self._session_for = session_for
        self._clock = clock
        self._on: dict[str, float] = {}  # adapter -> the residency of its base it is known to
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def ready(self, adapter: Slot, base: Slot) -> bool:
        """Registered on the base's current residency: a call may go at once."""
        return adapter.residency.state is State.LOADED and self._on_live_base(adapter, base)

    def follow_base(self, adapter: Slot, base: Slot) -> None:
        """An adapter shown loaded whose base has left (or was reloaded) is gone with it."""
        if adapter.residency.state is State.LOADED and not self._on_live_base(adapter, base):
            adapter.residency.lost(self._clock(), time.time())
            self._on.pop(adapter.model.name, None)

    def _on_live_base(self, adapter: Slot, base: Slot) -> bool:
        r = base.residency
        return r.state is State.LOADED and self._on.get(adapter.model.name) == r.loaded_since

    async def register(self, adapter: Slot, base: Slot, url: str) -> None:
        """Make the adapter known to the base's vLLM at `url` (once per residency, however many
        calls ask at once); DriverError when vLLM refuses it, which backs the adapter off."""
        async with self._locks[adapter.model.name]:
            self.follow_base(adapter, base)
            if self.ready(adapter, base):
                return
            residency, since = adapter.residency, base.residency.loaded_since
            residency.begin_load(self._clock())
            try:
                await self._ensure_known(url, adapter.model, base.model)
            except DriverError as exc:
                residency.load_failed(self._clock(), exc.message,
                                      retry_delay(residency.failures + 1), exc.retryable,
                                      exc.detail)
                raise
            except BaseException:
                residency.load_failed(self._clock(), "registration was cut short", 0.0)
                raise
            residency.loaded(self._clock(), time.time())
            if since is not None:
                self._on[adapter.model.name] = since

    async def unregister(self, adapter: Slot, base: Slot, url: str) -> None:
        """Drop the adapter from its base's vLLM (`POST /v1/unload_lora_adapter`)."""
        async with self._locks[adapter.model.name]:
            if not self.ready(adapter, base):
                return
            adapter.residency.begin_unload()
            try:
                await self._call(adapter.model, "POST", url + "/v1/unload_lora_adapter",
                                 {"lora_name": adapter.model.served_name})
            finally:
                adapter.residency.unloaded(self._clock(), time.time())
                self._on.pop(adapter.model.name, None)

    async def _ensure_known(self, url: str, adapter: ModelConfig, base: ModelConfig) -> None:
        listed = await self._call(adapter, "GET", url + "/v1/models")
        entries = listed.get("data") if isinstance(listed, dict) else None
        if any(isinstance(e, dict) and e.get("id") == adapter.served_name
               for e in entries or ()):
            return  # started with --lora-modules, or registered by another replica
        if adapter.adapter_path is None:
            raise DriverError(f"the vLLM serving '{base.name}' has no adapter "
                              f"'{adapter.served_name}': give `adapter_path` or start it with "
                              "--lora-modules", retryable=False)
        try:
            await self._call(adapter, "POST", url + "/v1/load_lora_adapter",
                             {"lora_name": adapter.served_name, "lora_path": adapter.adapter_path})
        except DriverError as exc:
            if exc.status != 400 or "already" not in exc.detail:
                raise  # else another replica registered it a moment ago

    async def _call(self, adapter: ModelConfig, method: str, url: str,
                    body: dict[str, str] | None = None) -> object:
        who = f"backend '{adapter.backend}'"
        try:
            return await call(self._session_for(adapter.backend), method, url, json=body,
                              limit_s=_CONTROL_LIMIT_S, who=who)
        except DriverError as exc:
            # vLLM says 404 for an adapter folder it cannot find too, but in its own words.
            if exc.status == 404 and "lora_adapter" in url and "Loading lora" not in exc.detail:
                raise DriverError(f"{who} has no runtime LoRA API: start vLLM with --enable-lora "
                                  "and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True",
                                  detail=exc.detail, retryable=False) from exc
            raise
