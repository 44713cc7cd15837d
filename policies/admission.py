"""How long a request that cannot be served now should expect to wait: the basis of the
`Retry-After` the gateway sends with a 429 or 503, so clients come back when it can succeed."""

from __future__ import annotations

from policies.types import State


def expected_wait(*, state: State, load_s: float, loading_for_s: float, ahead: int,
                  lease_s: float, parallel: int) -> float:
    """Seconds until a request queued now gets its lease: what is left of the model's load (a
    whole load if it is not resident), then the requests ahead of it, `parallel` at a time."""
    if state is State.LOADING:
        loading = max(load_s - loading_for_s, 0.0)
    elif state is State.LOADED:
        loading = 0.0
    else:
        loading = load_s
    return loading + (ahead / max(parallel, 1)) * lease_s
