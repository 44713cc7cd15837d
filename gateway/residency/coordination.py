"""Swaps shared by several gateway replicas on one GPU box: a lock per backend, in-flight counts,
and residency notices, all through Redis. Without Redis one replica is assumed (`LocalCoordinator`).

All keys live under `<ns>:coord:`, apart from the response cache's `<ns>:cache:`.

- The lock (`<ns>:coord:lock:<backend>`) lets one replica at a time load or unload on a backend.
- Each replica writes its in-flight count per model (`<ns>:coord:inflight:<model>`, a hash keyed by
  replica) as an absolute value, so a lost write heals with the next one; counts of a replica
  whose heartbeat key (`<ns>:coord:replica:<id>`) expired are ignored.
- Notices on `<ns>:coord:residency:<backend>`: `draining <model>` before an unload (others stop
  granting it), then a plain notice once the swap is over (others reconcile with the backend).

It fails safe. A replica that cannot get the lock, keep it, or read the others' counts neither
loads nor unloads: it waits for Redis (up to the swap timeout) instead of guessing. The one
exception is a replica that last saw no other replica alive: it goes on as a single replica
would (a replica started while Redis was away has seen nobody, and assumes company). A Redis
that comes back empty (restarted without persistence) has forgotten locks and counts: for the
first SETTLE_S of a Redis server's uptime nobody takes a lock or trusts the counts, time for
every replica to re-assert the lock it still holds and to write its counts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.residency import tasks

log = structlog.get_logger(__name__)

LOCK_LEASE_S = 15.0  # frees the box this long after a replica holding the lock died
RENEW_S = 1.0  # the holder renews (or, after a Redis restart, re-asserts) its lock this often
# Renewals failing this long: the lease may have run out, so the lock is no longer vouched for.
LOST_AFTER_S = LOCK_LEASE_S * 2 / 3
HEARTBEAT_S = 2.0  # also how often a replica writes all its counts again
HEARTBEAT_TTL_S = 3 * HEARTBEAT_S
SETTLE_S = 2 * HEARTBEAT_S  # a young Redis: time for locks to be re-asserted, counts rewritten
POLL_S = 0.05
GRANT_SETTLE_S = 0.1  # lets a grant made just before the draining notice arrived reach Redis
KEY_SPACE = "coord"
_REDIS_TIMEOUT_S = 2.0
_RECONNECT_S = 1.0
_BACKOFF_MAX_S = 1.0

# Seconds since this Redis server started: a young one may have lost what replicas wrote.
_UPTIME = ("local up = tonumber(string.match(redis.call('info', 'server'), "
           "'uptime_in_seconds:(%d+)')) ")
# 1: the lock is ours; 0: another replica holds it; -1: Redis has just (re)started.
_ACQUIRE = _UPTIME + (
    "if up < tonumber(ARGV[3]) then return -1 end "
    "if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end return 0")
# 1: renewed; 2: it was gone (Redis restarted) and is ours again; 0: another replica has it.
_RENEW = (
    "local holder = redis.call('get', KEYS[1]) "
    "if holder == ARGV[1] then redis.call('pexpire', KEYS[1], ARGV[2]) return 1 end "
    "if not holder then redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2 end "
    "return 0")
# Compare-and-delete: only the holder may release its lock.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end " \
           "return 0"
# Beat; the number of other replicas alive.
_HEARTBEAT = (
    "redis.call('set', KEYS[1], '1', 'PX', ARGV[2]) redis.call('sadd', KEYS[2], ARGV[1]) "
    "local others = 0 "
    "for _, r in ipairs(redis.call('smembers', KEYS[2])) do if r ~= ARGV[1] then "
    "if redis.call('exists', ARGV[3] .. r) == 1 then others = others + 1 "
    "else redis.call('srem', KEYS[2], r) end end end "
    "return others")
_UNREACHABLE = (RedisError, OSError)


def _check(scope: asyncio.Timeout) -> None:
    """TimeoutError once `scope` is past its deadline. A wait that polls Redis cannot count on
    the scope's cancellation alone: a send may swallow it (`tasks`), and the wait polls on."""
    when = scope.when()
    if when is not None and asyncio.get_running_loop().time() >= when:
        raise TimeoutError


@dataclass(frozen=True)
class Notice:
    """From another replica: it is about to unload `draining`, or (None) its swap ended."""

    backend: str
    draining: str | None = None


OnNotice = Callable[[Notice], None]


class SwapLock:
    """What `lock()` yields: truthy while held.

    `held` turns False if the lock is lost midway (another replica holds it now, or it could
    not be renewed for longer than is safe): its holder must then begin no further load or
    unload. `alone`: held without Redis, by a replica that last saw no other.
    """

    def __init__(self, held: bool = False, *, alone: bool = False) -> None:
        self.held = held
        self.alone = alone

    def __bool__(self) -> bool:
        return self.held

    def __repr__(self) -> str:
        return f"SwapLock(held={self.held}, alone={self.alone})"


class Coordinator(Protocol):
    shared: bool  # other replicas may exist: reconcile before swapping

    async def start(self, on_notice: OnNotice) -> None: ...

    async def close(self) -> None: ...

    def lock(self, backends: Iterable[str],
             wait_s: float) -> AbstractAsyncContextManager[SwapLock]:
        """Hold the backends' locks inside the block; the SwapLock is falsy if they were not
        got within `wait_s`, and turns falsy if they are lost meanwhile."""
        ...

    def leased(self, model: str, delta: int) -> None:
        """A lease on `model` was granted (+1) or released (-1); never blocks."""
        ...

    async def drain(self, backend: str, model: str, wait_s: float) -> bool:
        """Tell the others to stop granting `model`; True once none of them serves it. False
        when that cannot be known (Redis away) or the backend's lock is not held: no unload."""
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
    async def lock(self, backends: Iterable[str], wait_s: float) -> AsyncIterator[SwapLock]:
        yield SwapLock(held=True, alone=True)

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
        # One immediate retry (a pooled connection a restarted Redis closed), no back-off: a
        # Redis that is away must be known at once, not after seconds of retries.
        self._redis: Redis = Redis.from_url(url, socket_timeout=_REDIS_TIMEOUT_S,
                                            socket_connect_timeout=_REDIS_TIMEOUT_S,
                                            retry=Retry(NoBackoff(), 1))
        self._counts: Counter[str] = Counter()
        self._dirty: set[str] = set()
        self._flush = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._others: int | None = None  # other live replicas at the last heartbeat
        self._held: dict[str, SwapLock] = {}  # backend -> the lock held on it now
        self._unavailable = False  # Redis is away: said once per outage

    @property
    def alone(self) -> bool:
        """The last heartbeat Redis answered saw no other replica."""
        return self._others == 0

    async def start(self, on_notice: OnNotice) -> None:
        self._tasks = [asyncio.create_task(work) for work in (
            self._heartbeat(), self._flush_counts(), self._listen(on_notice))]

    async def close(self) -> None:
        await tasks.stop(self._tasks)
        with contextlib.suppress(*_UNREACHABLE):
            await self._redis.delete(self._key("replica", self.replica))
            await self._redis.srem(self._key("replicas", "all"), self.replica)
        await self._redis.aclose()

    def _key(self, kind: str, name: str) -> str:
        # A key space of its own: the response cache's keys (`<ns>:cache:...`) never collide
        # with these, whatever a model is called, and purging the cache leaves them be.
        return f"{self._ns}:{KEY_SPACE}:{kind}:{name}"

    # -- the lock ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lock(self, backends: Iterable[str], wait_s: float) -> AsyncIterator[SwapLock]:
        names = sorted(set(backends))  # one order: no deadlock
        keys = [self._key("lock", b) for b in names]
        handle, taken = await self._take(keys, wait_s)
        renewing = asyncio.create_task(self._renew(handle, taken)) if handle.held else None
        if handle.held:
            self._held.update(dict.fromkeys(names, handle))
        try:
            yield handle
        finally:
            if renewing is not None:
                await tasks.stop([renewing])
            for name in names:
                if self._held.get(name) is handle:
                    del self._held[name]
            handle.held = False
            with contextlib.suppress(*_UNREACHABLE):
                for key in taken:
                    await self._redis.eval(_RELEASE, 1, key, self.replica)

    async def _take(self, keys: list[str], wait_s: float) -> tuple[SwapLock, list[str]]:
        """The lock (held or not) and the keys set in Redis; releases what it got if it fails."""
        taken: list[str] = []
        try:
            async with asyncio.timeout(wait_s) as scope:
                for key in keys:
                    if not await self._acquire(key, scope):
                        # Kept (re-asserted) as soon as Redis answers again, like any lock.
                        return SwapLock(held=True, alone=True), keys
                    taken.append(key)
        except TimeoutError:
            log.info("coordination.lock_busy", keys=keys, wait_s=wait_s)
            with contextlib.suppress(*_UNREACHABLE):
                for key in taken:
                    await self._redis.eval(_RELEASE, 1, key, self.replica)
            return SwapLock(), []
        return SwapLock(held=True), taken

    async def _acquire(self, key: str, scope: asyncio.Timeout) -> bool:
        """Wait for `key` (True once set); False at once if Redis is away and this replica is
        known to be alone. Any other replica waits for Redis: no lock, no swap."""
        lease_ms = int(LOCK_LEASE_S * 1000)
        backoff = POLL_S
        while True:
            _check(scope)
            try:
                got = await self._redis.eval(_ACQUIRE, 1, key, self.replica, lease_ms,
                                             SETTLE_S)
            except _UNREACHABLE as exc:
                if self.alone:
                    self._say_unavailable(exc, "swapping as the only replica")
                    return False
                self._say_unavailable(exc, "no swap until Redis answers")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                continue
            self._say_available()
            if got == 1:
                return True
            await asyncio.sleep(POLL_S)  # a release is not announced: poll

    async def _renew(self, handle: SwapLock, keys: list[str]) -> None:
        """Keep the lock while the block runs; `handle.held` goes False if it is lost."""
        renewed = time.monotonic()
        lease_ms = int(LOCK_LEASE_S * 1000)
        while handle.held:
            await asyncio.sleep(RENEW_S)
            try:
                results = [await self._redis.eval(_RENEW, 1, key, self.replica, lease_ms)
                           for key in keys]
            except _UNREACHABLE as exc:
                if not handle.alone and time.monotonic() - renewed > LOST_AFTER_S:
                    self._lose(handle, keys, f"not renewed for {LOST_AFTER_S:g}s: {exc}")
                continue
            if 0 in results:
                self._lose(handle, keys, "another replica holds it")
                return
            if 2 in results:
                log.warning("coordination.lock_reasserted", keys=keys,
                            reason="Redis had forgotten it")
            renewed = time.monotonic()

    @staticmethod
    def _lose(handle: SwapLock, keys: list[str], reason: str) -> None:
        handle.held = False
        log.warning("coordination.lock_lost", keys=keys, reason=reason)

    def _say_unavailable(self, exc: BaseException, consequence: str) -> None:
        if not self._unavailable:
            self._unavailable = True
            log.warning("coordination.unavailable", error=str(exc)[:200], then=consequence)

    def _say_available(self) -> None:
        if self._unavailable:
            self._unavailable = False
            log.info("coordination.available")

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
            except _UNREACHABLE as exc:
                self._dirty |= models  # absolute values: the next flush repairs it
                log.warning("coordination.flush_failed", error=str(exc)[:200])
                await asyncio.sleep(_RECONNECT_S)
                self._flush.set()

    async def _heartbeat(self) -> None:
        ttl_ms = int(HEARTBEAT_TTL_S * 1000)
        while True:
            try:
                self._others = int(await self._redis.eval(
                    _HEARTBEAT, 2, self._key("replica", self.replica),
                    self._key("replicas", "all"), self.replica, ttl_ms,
                    self._key("replica", "")))
            except _UNREACHABLE:
                pass  # `alone` keeps what Redis last said
            else:
                # Counts are written again on every beat: a Redis that lost them has them back
                # before it is SETTLE_S old.
                self._dirty.update(self._counts)
                self._flush.set()
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
        handle = self._held.get(backend)
        if handle is None or not handle.held:
            log.warning("coordination.drain_refused", model=model, reason="lock not held")
            return False
        try:
            await self._publish(backend, model)
            await asyncio.sleep(GRANT_SETTLE_S)
            async with asyncio.timeout(wait_s) as scope:
                while busy := await self._busy_elsewhere(model):
                    log.debug("coordination.waiting", model=model, in_flight_elsewhere=busy)
                    _check(scope)
                    await asyncio.sleep(POLL_S)
                    if not handle.held:
                        return False
        except TimeoutError:
            log.info("coordination.drain_timeout", model=model, wait_s=wait_s)
            return False
        except _UNREACHABLE as exc:
            if handle.alone or self.alone:
                return handle.held  # nobody else can be serving it
            self._say_unavailable(exc, f"{model} stays: the others' requests cannot be counted")
            return False
        return handle.held

    async def _busy_elsewhere(self, model: str) -> int:
        """Requests elsewhere, or 1 while Redis is young (the counts may not be back yet)."""
        if int(await self._redis.eval(_UPTIME + "return up", 0)) < SETTLE_S:
            return 1
        return await self.in_flight_elsewhere(model)

    # -- notices ----------------------------------------------------------------------------

    async def changed(self, backends: Iterable[str]) -> None:
        for backend in set(backends):
            with contextlib.suppress(*_UNREACHABLE):
                await self._publish(backend, None)

    async def _publish(self, backend: str, draining: str | None) -> None:
        message = json.dumps({"replica": self.replica, "draining": draining})
        await self._redis.publish(self._key("residency", backend), message)

    async def _listen(self, on_notice: OnNotice) -> None:
        prefix = self._key("residency", "")
        heard: set[str] = set()  # backends other replicas swap on
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.psubscribe(prefix + "*")
                    for backend in heard:  # notices may have been missed meanwhile: look again
                        on_notice(Notice(backend))
                    async for message in pubsub.listen():
                        notice = self._notice(message, prefix)
                        if notice is not None:
                            heard.add(notice.backend)
                            on_notice(notice)
            except _UNREACHABLE as exc:
                log.warning("coordination.listen_failed", error=str(exc)[:200])
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
