"""The one owner of a call's resources: its lease on the model, its leadership of identical calls
in flight, and the answer it settles them with.

Opened when the call is admitted, closed exactly once however the call ends: an answer, a backend
error, the client gone, a cancellation, a bug. Nothing else releases the lease or settles the
followers, so no follower waits forever and no lease outlives its call. A streamed answer takes
the owner along: its response closes it when the stream ends.
"""

from __future__ import annotations

import asyncio
import time

from gateway.cache.replay import Record
from gateway.calls.coalescing import Leadership
from gateway.config.schema import ModelConfig
from gateway.errors import GatewayError
from gateway.relay.client import UpstreamResponse
from gateway.residency.admission import Lease, Waiter
from gateway.residency.scheduler import Scheduler


class CallOwner:
    def __init__(self, scheduler: Scheduler, leadership: Leadership | None = None) -> None:
        self._scheduler = scheduler
        self.leadership = leadership
        self.record: Record | None = None  # the complete answer, once there is one
        self._lease: Lease | None = None
        self._waiter: Waiter | None = None
        self._waiting: asyncio.Task[Lease] | None = None
        self._asked_at = 0.0
        self._upstream: UpstreamResponse | None = None
        self.closed = False

    def ask(self, route: ModelConfig, deadline_s: float | None) -> asyncio.Future[Lease]:
        """Ask for a lease on `route`: a future that holds it at once when the model admits,
        or once its turn comes (failing after `deadline_s`). 429/503 are raised right here."""
        if self.closed:
            raise RuntimeError("a closed call asked for a lease")
        self.drop_lease()
        self._asked_at = time.perf_counter()
        ticket = self._scheduler.request(route)
        if isinstance(ticket, Lease):
            self._lease = ticket
            ready: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
            ready.set_result(ticket)
            return ready
        self._waiter = ticket
        self._waiting = asyncio.ensure_future(self._scheduler.wait(ticket, deadline_s))
        return self._waiting

    def gave_up(self, waited_s: float) -> GatewayError:
        """The client's own deadline passed before the lease came: leave the queue."""
        assert self._waiter is not None
        return self._scheduler.gave_up(self._waiter, waited_s)

    def waited_ms(self) -> float:
        return round((time.perf_counter() - self._asked_at) * 1000, 2)

    def opened(self, response: UpstreamResponse) -> None:
        """The upstream answer being relayed: its connection is dropped if the call ends first."""
        self._upstream = response

    def answered(self, record: Record | None) -> None:
        """The complete answer, to hand to the followers when the call closes."""
        self.record = record

    def close(self) -> None:
        """Release what the call holds and settle its followers: exactly once."""
        if self.closed:
            return
        self.closed = True
        self.drop_lease()
        if self.leadership is not None:
            self.leadership.settle(self.record)

    def drop_lease(self) -> None:
        """Give back the lease (or the place in a queue) and the upstream answer, if any: when
        the call ends, or before it tries another route."""
        if self._upstream is not None:
            self._upstream.close()  # a no-op once a complete answer went back to the pool
        if self._waiter is not None:
            self._scheduler.abandon(self._waiter)  # out of the queue, or its lease given back
        if self._waiting is not None:
            self._waiting.cancel()  # a no-op once it holds the lease abandon just gave back
        if self._lease is not None:
            self._lease.release()
        self._lease = self._waiter = self._waiting = self._upstream = None
