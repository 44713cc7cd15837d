from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.caching import MAX_TTL_S, CacheDecision, cache_decision, cache_key, key_prefix

CHAT = {
    "model": "llama",
    "messages": [{"role": "user", "content": "Hi"}],
    "temperature": 0,
    "max_tokens": 16,
}


def decide(
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    *,
    endpoint: str = "chat/completions",
    model_enabled: bool = True,
) -> CacheDecision:
    return cache_decision(
        endpoint,
        CHAT if body is None else body,
        headers or {},
        model_enabled=model_enabled,
        default_ttl_s=600,
    )


def key(body: dict[str, Any], **overrides: Any) -> str:
    arguments = {
        "model": "llama-3-8b",
        "endpoint": "chat/completions",
        "tenant": "team-a",
        "namespace": "swapper",
    }
    return cache_key(body=body, **{**arguments, **overrides})


# --- decision -------------------------------------------------------------------------------


def test_temperature_zero_is_cacheable() -> None:
    assert decide() == CacheDecision(read=True, write=True, ttl_s=600, reason="deterministic")


def test_seed_makes_a_sampled_request_cacheable() -> None:
    decision = decide({**CHAT, "temperature": 0.8, "seed": 7})
    assert (decision.read, decision.write) == (True, True)


@pytest.mark.parametrize("temperature", [None, 0.7, 1])
def test_sampled_request_is_not_cached(temperature: float | None) -> None:
    body = {**CHAT, "temperature": temperature}
    if temperature is None:
        del body["temperature"]
    decision = decide(body)
    assert decision.bypass and decision.reason == "nondeterministic"


@pytest.mark.parametrize("seed", [None, True, "7"])
def test_only_an_integer_seed_counts(seed: object) -> None:
    assert decide({**CHAT, "temperature": 0.5, "seed": seed}).bypass


def test_embeddings_are_always_cacheable() -> None:
    body = {"model": "nomic", "input": "hello", "temperature": 0.9}
    assert decide(body, endpoint="embeddings").reason == "embeddings"


def test_legacy_completions_follow_the_chat_rule() -> None:
    body = {"model": "llama", "prompt": "Once", "temperature": 0.0}
    assert decide(body, endpoint="completions").read
    assert decide({**body, "temperature": 1.0}, endpoint="completions").bypass


def test_operator_can_disable_a_model() -> None:
    assert decide(model_enabled=False) == CacheDecision(False, False, 600, "model_disabled")


def test_unknown_endpoint_is_never_cached() -> None:
    assert decide(endpoint="audio/speech").reason == "endpoint"


def test_no_cache_skips_the_read_but_stores_the_fresh_answer() -> None:
    decision = decide(headers={"Cache-Control": "no-cache"})
    assert (decision.read, decision.write, decision.reason) == (False, True, "no-cache")


@pytest.mark.parametrize("value", ["no-store", "No-Store", "max-age=60, no-store"])
def test_no_store_bypasses_everything(value: str) -> None:
    decision = decide(headers={"cache-control": value})
    assert decision.bypass and decision.reason == "no-store"


def test_x_cache_ttl_overrides_the_default() -> None:
    assert decide(headers={"X-Cache-TTL": "30"}).ttl_s == 30


def test_max_age_overrides_the_default() -> None:
    assert decide(headers={"Cache-Control": "max-age=45"}).ttl_s == 45


def test_x_cache_ttl_wins_over_max_age() -> None:
    headers = {"x-cache-ttl": "5", "cache-control": "max-age=45"}
    assert decide(headers=headers).ttl_s == 5


@pytest.mark.parametrize("value", ["soon", "-3", "inf", "nan", ""])
def test_unusable_ttl_falls_back_to_the_default(value: str) -> None:
    assert decide(headers={"X-Cache-TTL": value}).ttl_s == 600


@pytest.mark.parametrize("headers", [{"X-Cache-TTL": "0"}, {"Cache-Control": "max-age=0"}])
def test_zero_ttl_means_do_not_cache(headers: dict[str, str]) -> None:
    decision = decide(headers=headers)
    assert decision.bypass and decision.reason == "ttl_zero"


@pytest.mark.parametrize("headers", [{"X-Cache-TTL": "1e17"}, {"Cache-Control": "max-age=1e300"}])
def test_a_client_ttl_is_cut_to_the_maximum(headers: dict[str, str]) -> None:
    assert decide(headers=headers).ttl_s == MAX_TTL_S


def test_cache_keys_never_share_a_prefix_with_coordination() -> None:
    assert not "swapper:coord:lock:ollama".startswith(key_prefix("swapper"))
    assert not "swapper:coord:lock:ollama".startswith(key_prefix("swapper", "coord"))


def test_explicit_ttl_opts_a_sampled_request_in() -> None:
    decision = decide({**CHAT, "temperature": 1.2}, {"X-Cache-TTL": "120"})
    assert decision == CacheDecision(True, True, 120, "client_opt_in")


def test_default_ttl_of_zero_disables_caching() -> None:
    decision = cache_decision("embeddings", {}, {}, model_enabled=True, default_ttl_s=0)
    assert decision.bypass


# --- key ------------------------------------------------------------------------------------


def test_key_names_namespace_and_model_in_clear() -> None:
    value = key(CHAT)
    assert value.startswith("swapper:cache:llama-3-8b:")
    assert len(value.rsplit(":", 1)[1]) == 64


def test_key_ignores_field_order_and_whitespace() -> None:
    reordered = orjson.loads(orjson.dumps(dict(reversed(list(CHAT.items())))))
    spaced = orjson.loads(
        b'{ "max_tokens" : 16 , "temperature" : 0.0 ,\n "messages" :'
        b' [ { "content" : "Hi" , "role" : "user" } ] , "model" : "x" }'
    )
    assert key(CHAT) == key(reordered) == key(spaced)


def test_key_ignores_transport_and_bookkeeping_fields() -> None:
    noisy = {
        **CHAT,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "alice",
        "model": "an-alias",
    }
    assert key(CHAT) == key(noisy)


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.5},
        {"messages": [{"role": "user", "content": "Hello"}]},
        {"messages": [{"role": "system", "content": "Hi"}]},
        {"max_tokens": 17},
        {"seed": 1},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"response_format": {"type": "json_object"}},
        {"top_k": 40},  # backend extensions change the output too
    ],
)
def test_key_changes_with_every_output_field(change: dict[str, Any]) -> None:
    assert key(CHAT) != key({**CHAT, **change})


def test_key_depends_on_resolved_model_endpoint_and_namespace() -> None:
    base = key(CHAT)
    assert base != key(CHAT, model="llama-3-70b")
    assert base != key(CHAT, endpoint="completions")
    assert base != key(CHAT, namespace="other")


def test_tenants_do_not_share_keys_unless_shared() -> None:
    assert key(CHAT, tenant="team-a") != key(CHAT, tenant="team-b")
    assert key(CHAT, tenant="team-a") != key(CHAT, tenant=None)
    assert key(CHAT, tenant=None) == key(CHAT, tenant=None)


def test_model_prefix_cannot_match_a_longer_model_name() -> None:
    # Ollama names contain ':'; "qwen" must not purge "qwen:7b".
    assert key(CHAT, model="qwen:7b").startswith(key_prefix("swapper", "qwen:7b"))
    assert not key(CHAT, model="qwen:7b").startswith(key_prefix("swapper", "qwen"))
    assert key(CHAT).startswith(key_prefix("swapper"))


json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=5)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(st.dictionaries(st.text(max_size=6), json_values, max_size=5))
def test_key_is_stable_under_reordering_and_a_json_round_trip(body: dict[str, Any]) -> None:
    shuffled = json.loads(json.dumps(dict(reversed(list(body.items()))), indent=2))
    assert key(body) == key(shuffled)
