"""Swaps shared by several gateway replicas on one GPU box: a lock per backend, in-flight counts,
and residency notices, all through Redis. Without Redis one replica is assumed (`LocalCoordinator`).

All keys live under `<ns>:coord:`, apart from the response cache's `<ns>:cache:`.

- The lock (`<ns>:coord:lock:<backend>`) lets one replica at a time load or unload on a backend.
- Each replica writes its in-flight count per model (`<ns>:coord:inflight:<model>`, a hash keyed by
  replica) as an absolute value, so a lost write heals with the next one; counts of a replica
  whose heartbeat key (`<ns>:coord:replica:<id>`) expired are ignored.
- Notices on `<ns>:coord:residency:<backend>`: `draining <model>` before an unload (others stop
  granting it), then a plain notice once the swap is over (others reconcile with the backend).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)

LOCK_LEASE_S = 15.0  # renewed every third of it while held; frees the box if a replica dies
HEARTBEAT_S = 2.0
HEARTBEAT_TTL_S = 3 * HEARTBEAT_S
POLL_S = 0.05
SETTLE_S = 0.1  # lets a grant made just before the draining notice arrived reach Redis
KEY_SPACE = "coord"
_REDIS_TIMEOUT_S = 2.0
_RECONNECT_S = 1.0

# Compare-and-delete / compare-and-extend: only the holder may release or renew its lock.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end " \
           "return 0"
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then " \
         "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"


@dataclass(frozen=True)
class Notice:
    """From another replica: it is about to unload `draining`, or (None) its swap ended."""

    backend: str
    draining: str | None = None


OnNotice = Callable[[Notice], None]


class Coordinator(Protocol):
    shared: bool  # other replicas may exist: reconcile before swapping

    async def start(self, on_notice: OnNotice) -> None: ...

    async def close(self) -> None: ...

    def lock(self, backends: Iterable[str],
             wait_s: float) -> AbstractAsyncContextManager[bool]:
        """Hold the backends' locks inside the block; yields False if not got within `wait_s`."""
        ...

    def leased(self, model: str, delta: int) -> None:
        """A lease on `model` was granted (+1) or released (-1); never blocks."""
        ...

    async def drain(self, backend: str, model: str, wait_s: float) -> bool:
        """Tell the others to stop granting `model`; True once none of them serves it."""
        ...

    async def changed(self, backends: Iterable[str]) -> None:
        """A swap on these backends is over (done or given up): the others look again."""
        ...


class LocalCoordinator:
    """A single replica: nothing to share."""

    shared = False

    async def start(self, on_notice: OnNotice) -> None:
        pass

    async def close(self) -> None:
        pass

    @contextlib.asynccontextmanager
    async def lock(self, backends: Iterable[str], wait_s: float) -> AsyncIterator[bool]:
        yield True

    def leased(self, model: str, delta: int) -> None:
        pass

    async def drain(self, backend: str, model: str, wait_s: float) -> bool:
        return True

    async def changed(self, backends: Iterable[str]) -> None:
        pass


def replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class RedisCoordinator:
    shared = True

    def __init__(self, url: str, replica: str, namespace: str = "swapper") -> None:
        self.replica = replica
        self._ns = namespace
        self._redis: Redis = Redis.from_url(url, socket_timeout=_REDIS_TIMEOUT_S,
                                            socket_connect_timeout=_REDIS_TIMEOUT_S)
        self._counts: Counter[str] = Counter()
        self._dirty: set[str] = set()
        self._flush = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, on_notice: OnNotice) -> None:
        self._tasks = [asyncio.create_task(work) for work in (
            self._heartbeat(), self._flush_counts(), self._listen(on_notice))]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):
            await self._redis.delete(self._key("replica", self.replica))
        await self._redis.aclose()

    def _key(self, kind: str, name: str) -> str:
        # A key space of its own: the response cache's keys (`<ns>:cache:...`) never collide
        # with these, whatever a model is called, and purging the cache leaves them be.
        return f"{self._ns}:{KEY_SPACE}:{kind}:{name}"

    # -- the lock ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lock(self, backends: Iterable[str], wait_s: float) -> AsyncIterator[bool]:
        keys = [self._key("lock", b) for b in sorted(set(backends))]  # one order: no deadlock
        held: list[str] = []
        renewing = asyncio.create_task(self._renew(held))
        try:
            async with asyncio.timeout(wait_s):
                for key in keys:
                    await self._acquire(key)
                    held.append(key)
        except TimeoutError:
            log.info("coordination.lock_busy", keys=keys)
        except (RedisError, OSError) as exc:
            # Availability first: without Redis, swap as a single replica would.
            log.warning("coordination.unavailable", error=str(exc))
            held[:] = keys
        try:
            yield len(held) == len(keys)
        finally:
            renewing.cancel()
            with contextlib.suppress(RedisError, OSError):
                for key in held:
                    await self._redis.eval(_RELEASE, 1, key, self.replica)

    async def _acquire(self, key: str) -> None:
        lease_ms = int(LOCK_LEASE_S * 1000)
        while True:
            if await self._redis.set(key, self.replica, nx=True, px=lease_ms):
                return
            await asyncio.sleep(POLL_S)  # a release is not announced: poll

    async def _renew(self, held: list[str]) -> None:
        while True:
            await asyncio.sleep(LOCK_LEASE_S / 3)
            for key in held:
                with contextlib.suppress(RedisError, OSError):
                    if not await self._redis.eval(_RENEW, 1, key, self.replica,
                                                  int(LOCK_LEASE_S * 1000)):
                        log.warning("coordination.lock_lost", key=key)

    # -- in-flight counts -------------------------------------------------------------------

    def leased(self, model: str, delta: int) -> None:
        self._counts[model] += delta
        self._dirty.add(model)
        self._flush.set()

    async def _flush_counts(self) -> None:
        while True:
            await self._flush.wait()
            self._flush.clear()
            models, self._dirty = self._dirty, set()
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for model in models:
                        pipe.hset(self._key("inflight", model), self.replica, self._counts[model])
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                self._dirty |= models  # absolute values: the next flush repairs it
                log.warning("coordination.flush_failed", error=str(exc))
                await asyncio.sleep(_RECONNECT_S)
                self._flush.set()

    async def _heartbeat(self) -> None:
        while True:
            with contextlib.suppress(RedisError, OSError):
                await self._redis.set(self._key("replica", self.replica), 1,
                                      px=int(HEARTBEAT_TTL_S * 1000))
            await asyncio.sleep(HEARTBEAT_S)

    async def in_flight_elsewhere(self, model: str) -> int:
        """Requests other live replicas serve with `model`; a dead replica's count is dropped."""
        key = self._key("inflight", model)
        counts = {r.decode(): int(n) for r, n in (await self._redis.hgetall(key)).items()}
        others = [r for r, n in counts.items() if r != self.replica and n > 0]
        if not others:
            return 0
        alive = await self._redis.mget([self._key("replica", r) for r in others])
        dead = [r for r, beat in zip(others, alive, strict=True) if beat is None]
        if dead:
            await self._redis.hdel(key, *dead)
        return sum(counts[r] for r, beat in zip(others, alive, strict=True) if beat is not None)

    async def drain(self, backend: str, model: str, wait_s: float) -> bool:
        try:
            await self._publish(backend, model)
            await asyncio.sleep(SETTLE_S)
            async with asyncio.timeout(wait_s):
                while busy := await self.in_flight_elsewhere(model):
                    log.debug("coordination.waiting", model=model, in_flight_elsewhere=busy)
                    await asyncio.sleep(POLL_S)
        except TimeoutError:
            log.info("coordination.drain_timeout", model=model, wait_s=wait_s)
            return False
        except (RedisError, OSError) as exc:
            log.warning("coordination.unavailable", error=str(exc))
        return True

    # -- notices ----------------------------------------------------------------------------

    async def changed(self, backends: Iterable[str]) -> None:
        for backend in set(backends):
            with contextlib.suppress(RedisError, OSError):
                await self._publish(backend, None)

    async def _publish(self, backend: str, draining: str | None) -> None:
        message = json.dumps({"replica": self.replica, "draining": draining})
        await self._redis.publish(self._key("residency", backend), message)

    async def _listen(self, on_notice: OnNotice) -> None:
        prefix = self._key("residency", "")
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.psubscribe(prefix + "*")
                    async for message in pubsub.listen():
                        notice = self._notice(message, prefix)
                        if notice is not None:
                            on_notice(notice)
            except (RedisError, OSError) as exc:
                log.warning("coordination.listen_failed", error=str(exc))
                await asyncio.sleep(_RECONNECT_S)

    def _notice(self, message: dict[str, Any], prefix: str) -> Notice | None:
        if message.get("type") != "pmessage":
            return None
        try:
            body = json.loads(message["data"])
        except ValueError:
            return None  # not one of ours
        if not isinstance(body, dict) or body.get("replica") == self.replica:
            return None
        return Notice(message["channel"].decode().removeprefix(prefix), body.get("draining"))
