"""Nodes as the scheduler runs them: each a unit of memory and of swapping.

A node (`nodes:` in the config; an old config is one node built from `swapper:`) has its own
budget, its own swap lane and its own batching window: the policy decides over the node's models
alone, against the node's budget, and a swap on one node never waits for a swap on another.

    node A lane:  plan ─► [unload x ─► load y] ─► plan ─► ...
    node B lane:  plan ─► [load z] ─────────────► plan ─► ...      (at the same time)

Within a lane one load or unload runs at a time (a node's memory is one pool). Replicas sharing
a node take its lock (`Lane.backends`, every managed backend on it) before they swap on it.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field, replace

from gateway.config.schema import GatewayConfig, NodeConfig
from policies.types import Budget, ModelView


@dataclass(eq=False)
class Lane:
    """One node's swap lane: whether a swap runs on it, and what its last plan was made from."""

    config: NodeConfig
    swapping: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one swap at a time on the node
    views: dict[str, ModelView] = field(default_factory=dict)  # the last plan's snapshot
    backends: tuple[str, ...] = ()  # the managed backends on it: what a swap locks
    free_gb: float | None = None  # free GPU memory at the last reading, where it can be read
    # What the node can really hold for the gateway: what it held plus what was free, at the
    # last reading (another program on the GPU shrinks it below the configured budget).
    capacity_gb: float | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def budget(self) -> Budget:
        return self.config.budget()

    def saw_free(self, free_gb: float, resident_gb: float) -> None:
        self.free_gb = free_gb
        self.capacity_gb = free_gb + resident_gb

    def room(self) -> Budget:
        """The budget the policy plans with: the configured one, shrunk to the memory the node
        really has when its free memory can be read."""
        budget = self.budget
        if self.capacity_gb is None:
            return budget
        memory = min(budget.memory_gb or math.inf, self.capacity_gb)
        return replace(budget, memory_gb=memory)


def lanes_for(config: GatewayConfig, managed: set[str],
              kept: dict[str, Lane]) -> dict[str, Lane]:
    """The lanes of `config`'s nodes; a node that stays keeps its lane (a swap may be running
    on it). `managed`: the backends whose residency the gateway manages."""
    lanes = {}
    for name, node in config.fleet().items():
        lane = kept.get(name) or Lane(node)
        lane.config = node
        lane.backends = tuple(sorted(b for b in managed if config.node_of(b) == name))
        lanes[name] = lane
    return lanes
