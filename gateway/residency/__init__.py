"""Which models are in memory: `state` (one model's residency state machine), `admission` (the
queue, waiters and leases), `scheduler` (asks the policy, executes its plans, does the swap I/O),
`nodes` (each node's budget and swap lane), `snapshot` (the frozen read model everyone else
reads: `Scheduler.status()`), `memory` (what models were measured to hold, kept across restarts),
`coordination` (replicas sharing a node through Redis), `fallback` (which route serves a model
now: ordered fallback, or placement across nodes, by the relay's `health` of each backend),
`adapters` (LoRA adapters on a resident base) and `drivers/` (how each kind of backend loads
and unloads, and what its models hold)."""
