"""Which models are in memory: `state` (one model's residency state machine), `admission` (the
queue, waiters and leases), `scheduler` (asks the policy, executes its plans, does the swap I/O),
`coordination` (replicas sharing a box through Redis), `fallback` and `backend_health` (which route
serves a model now) and `drivers/` (how each kind of backend loads and unloads)."""
