"""API keys, admin rights, model allow-lists, per-key limits and tenant-scoped caching."""

from __future__ import annotations

import base64
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from structlog.testing import capture_logs

from gateway.app import create_app
from gateway.config.reader import load_config, parse_config
from gateway.config.reload import file_loader
from gateway.config.schema import ConfigError
from tests.emulators import openai_server as vllm_emulator
from tests.servers import serve, wait_until

ADMIN, TEAM_A, TEAM_B = "sk-admin-0123", "sk-team-a-4567", "sk-team-b-89ab"
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def vllm(start_server: Any) -> Any:
    return start_server(vllm_emulator.create_app(["org/m1", "org/m2"], tokens=6,
                                                 token_delay=0.01))


def gateway_with(start_gateway: Any, vllm: Any, **team_a: Any) -> Any:
    return start_gateway({
        "auth": {"keys": [
            {"name": "ops", "key": ADMIN, "admin": True},
            {"name": "team-a", "key": TEAM_A, "models": ["m1"], **team_a},
            {"name": "team-b", "key": TEAM_B},
        ]},
        "backends": {"vllm": {"kind": "openai", "base_url": vllm.url}},
        "models": {"m1": {"backend": "vllm", "served_name": "org/m1"},
                   "m2": {"backend": "vllm", "served_name": "org/m2"}},
    })


@pytest.fixture
def gateway(start_gateway: Any, vllm: Any) -> Any:
    return gateway_with(start_gateway, vllm)


def chat(gateway: Any, key: str | None, model: str = "m1", **extra: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(gateway.url + "/v1/chat/completions", headers=headers, timeout=30,
                      json={"model": model, "messages": MESSAGES, **extra})


def test_keys_are_required_and_checked(gateway: Any) -> None:
    missing = chat(gateway, None)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    wrong = chat(gateway, "sk-nope")
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert chat(gateway, TEAM_B).status_code == 200
    by_header = httpx.post(gateway.url + "/v1/chat/completions", headers={"x-api-key": TEAM_B},
                           json={"model": "m1", "messages": MESSAGES})
    assert by_header.status_code == 200
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_probes_and_the_prometheus_scrape_stay_open(gateway: Any) -> None:
    assert httpx.get(gateway.url + "/health").status_code == 200
    assert httpx.get(gateway.url + "/ready").status_code == 200
    scrape = httpx.get(gateway.url + "/metrics", headers={"accept": "text/plain"})
    assert scrape.status_code == 200 and "swapper_active_model" in scrape.text
    assert httpx.get(gateway.url + "/metrics").status_code == 401  # the JSON names models
    assert httpx.get(gateway.url + "/status").status_code == 401


def test_admin_routes_need_an_admin_key(gateway: Any) -> None:
    refused = httpx.delete(gateway.url + "/cache", headers={"authorization": f"Bearer {TEAM_B}"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_only"
    allowed = httpx.delete(gateway.url + "/cache", headers={"authorization": f"Bearer {ADMIN}"})
    assert allowed.status_code == 200


def test_model_allow_list(gateway: Any) -> None:
    assert chat(gateway, TEAM_A, "m1").status_code == 200
    hidden = chat(gateway, TEAM_A, "m2")
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "model_not_found"
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEAM_A, max_retries=0)
    assert [m.id for m in client.models.list()] == ["m1"]
    assert chat(gateway, TEAM_B, "m2").status_code == 200


def test_requests_per_minute_gives_openai_style_429(start_gateway: Any, vllm: Any) -> None:
    gateway = gateway_with(start_gateway, vllm, requests_per_minute=2)
    first = chat(gateway, TEAM_A)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert chat(gateway, TEAM_A).status_code == 200
    limited = chat(gateway, TEAM_A)
    assert limited.status_code == 429
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert int(limited.headers["retry-after"]) >= 1 and int(limited.headers["retry-after-ms"]) > 0
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert chat(gateway, TEAM_B).status_code == 200  # other keys are not affected
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEAM_A, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="m1", messages=MESSAGES)  # type: ignore[arg-type]


def test_max_concurrent_per_key(start_gateway: Any, start_server: Any) -> None:
    slow = start_server(vllm_emulator.create_app(["org/m1", "org/m2"], tokens=200,
                                                 token_delay=0.01))
    gateway = gateway_with(start_gateway, slow, max_concurrent=1)
    body = {"model": "m1", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {TEAM_A}"}) as running:
        chunks = running.iter_raw()  # held: a dropped iterator would close the stream
        next(chunks)
        second = chat(gateway, TEAM_A)
        assert second.status_code == 429 and "concurrent" in second.json()["error"]["message"]
    wait_until(lambda: chat(gateway, TEAM_A).status_code == 200, message="slot freed")


def test_token_budget_counts_streamed_usage(start_gateway: Any, vllm: Any) -> None:
    gateway = gateway_with(start_gateway, vllm, tokens_per_minute=12)
    streamed = chat(gateway, TEAM_A, stream=True, stream_options={"include_usage": True})
    assert streamed.status_code == 200  # about 7 tokens: some budget is left
    assert chat(gateway, TEAM_A).status_code == 200  # admitted, then charged
    spent = chat(gateway, TEAM_A)
    assert spent.status_code == 429 and "tokens" in spent.json()["error"]["message"]


def test_tenants_do_not_share_cache_entries(gateway: Any) -> None:
    assert chat(gateway, TEAM_A, temperature=0).headers["x-cache"] == "MISS"
    assert chat(gateway, TEAM_A, temperature=0).headers["x-cache"] == "HIT"
    assert chat(gateway, TEAM_B, temperature=0).headers["x-cache"] == "MISS"


def test_keys_are_never_logged(gateway: Any) -> None:
    with capture_logs() as logs:
        chat(gateway, TEAM_B)
        chat(gateway, "sk-wrong-secret")
        # The line is written once the answer has gone out, so it may follow the client's read.
        wait_until(lambda: sum(e["event"] == "request.done" for e in logs) == 2,
                   message="both requests logged")
    done = [entry for entry in logs if entry["event"] == "request.done"]
    assert [entry["tenant"] for entry in done] == ["team-b", None]
    assert TEAM_B not in repr(logs) and "sk-wrong-secret" not in repr(logs)


def test_keys_from_env_and_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("sk-from-file\n")
    config = parse_config({"auth": {"keys": [
        {"name": "file", "key_file": str(secret)},
        {"name": "env", "key_env": "TEAM_KEY"}]}},
        env={"TEAM_KEY": "sk-from-env", "SWAPPER_API_KEYS": "ci:sk-ci,bot:sk-bot",
             "SWAPPER_ADMIN_KEY": "sk-root"})
    keys = {key.name: key for key in config.auth.keys}
    assert keys["file"].secret == "sk-from-file" and keys["env"].secret == "sk-from-env"
    assert keys["ci"].secret == "sk-ci" and keys["admin"].admin
    with pytest.raises(ConfigError, match=r"auth.keys\[0\].key_env"):
        parse_config({"auth": {"keys": [{"name": "x", "key_env": "UNSET"}]}}, env={})


def test_open_gateway_without_keys(start_gateway: Any, vllm: Any) -> None:
    gateway = start_gateway({
        "backends": {"vllm": {"kind": "openai", "base_url": vllm.url}},
        "models": {"m1": {"backend": "vllm", "served_name": "org/m1"}}})
    assert chat(gateway, None).status_code == 200


def test_concurrency_slot_is_freed_when_a_client_leaves(start_gateway: Any, vllm: Any) -> None:
    gateway = gateway_with(start_gateway, vllm, max_concurrent=1)
    done = threading.Event()

    def leave_midway() -> None:
        body = {"model": "m1", "messages": MESSAGES, "stream": True}
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                          headers={"authorization": f"Bearer {TEAM_A}"}) as response:
            next(response.iter_raw())
        done.set()

    leave_midway()
    assert done.is_set()
    wait_until(lambda: chat(gateway, TEAM_A).status_code == 200, message="slot freed")


# -- the access table of docs/access.md, cell by cell -----------------------------------------

ACCESS_DOC = Path(__file__).resolve().parent.parent / "docs" / "access.md"
OPS, TEAM_A_ONLY = "sk-ops-table", "sk-team-a-table"
CALLERS = {"no key": None, "team-a": TEAM_A_ONLY, "ops": OPS}


def access_table() -> list[tuple[str, dict[str, int]]]:
    """The table's rows: the route cell, and the status each caller gets."""
    lines = ACCESS_DOC.read_text(encoding="utf-8").split("## The table", 1)[1].splitlines()
    rows = []
    for line in lines:
        if not line.startswith("| `"):
            continue
        route, *cells = (cell.strip() for cell in line.strip("|").split("|"))
        codes = [int(re.match(r"\d{3}", cell).group()) for cell in cells]  # type: ignore[union-attr]
        rows.append((route, dict(zip(CALLERS, codes, strict=True))))
    return rows


ANOTHER_SITE = "http://elsewhere.example"


def table_request(client: httpx.Client, route: str, key: str | None) -> httpx.Response:
    """The request a route cell describes: `METHOD /path`, an optional `model`, (Prometheus),
    from another site (an `Origin` header), the key as a Basic password."""
    method_path, *model = re.findall(r"`([^`]+)`", route.split(" (`Origin`)")[0])
    method, path = method_path.split(" ", 1)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    if key and "Basic password" in route:
        headers["authorization"] = "Basic " + base64.b64encode(f"anyone:{key}".encode()).decode()
    if "another site" in route:
        headers["origin"] = ANOTHER_SITE
    if "(Prometheus)" in route:
        headers["accept"] = "text/plain"
    body: dict[str, Any] | None = None
    if path == "/v1/chat/completions":
        body = {"model": model[0], "messages": MESSAGES}
    elif path == "/v1/completions":
        body = {"model": model[0], "prompt": "hello"}
    return client.request(method, path, headers=headers, json=body)


@pytest.fixture(scope="module")
def table_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """m-a and m-b on an always-on backend, keys as in the table; started from a file so that
    /admin/reload has something to re-read."""
    with serve(vllm_emulator.create_app(["org/m-a", "org/m-b"])) as backend:
        file = tmp_path_factory.mktemp("access") / "gateway.yaml"
        file.write_text(yaml.safe_dump({
            "auth": {"keys": [{"name": "ops", "key": OPS, "admin": True},
                              {"name": "team-a", "key": TEAM_A_ONLY, "models": ["m-a"]}]},
            "backends": {"vllm": {"kind": "openai", "base_url": backend.url}},
            "models": {"m-a": {"backend": "vllm", "served_name": "org/m-a"},
                       "m-b": {"backend": "vllm", "served_name": "org/m-b"}},
        }))
        app = create_app(load_config(file, env={}), loader=file_loader(str(file)))
        with serve(app) as gateway:
            yield gateway.url


def test_the_access_table_covers_every_route() -> None:
    routes = " ".join(route for route, _ in access_table())
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready",
                 "/status", "/models", "/load", "/unload", "/metrics", "/metrics/",
                 "/admin/reload", "/cache", "/ui"):
        assert path in routes, f"docs/access.md has no row for {path}"


@pytest.mark.parametrize(("route", "codes"), access_table(), ids=[r for r, _ in access_table()])
def test_every_route_follows_the_access_table(table_gateway: str, route: str,
                                              codes: dict[str, int]) -> None:
    with httpx.Client(base_url=table_gateway, timeout=30) as client:
        for caller, key in CALLERS.items():
            answer = table_request(client, route, key)
            assert answer.status_code == codes[caller], (caller, answer.text)
            if answer.status_code >= 400:
                assert set(answer.json()["error"]) == {"message", "type", "param", "code"}


def names_seen(url: str, path: str, key: str | None) -> set[str]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    body = httpx.get(url + path, headers=headers, timeout=10).json()
    if path == "/v1/models":
        return {m["id"] for m in body["data"]}
    if path == "/models":
        return {m["name"] for m in body["models"]}
    if path == "/metrics":
        return {m["model_name"] for m in body["metrics"]}
    assert path == "/status"
    named = {*body["available_models"], *body["loaded_models"], *body["models"],
             *(d["model"] for d in body["decisions"])}
    return named | ({body["active_model"]} if body["active_model"] else set())


@pytest.mark.parametrize("path", ["/v1/models", "/models", "/status", "/metrics"])
def test_a_limited_key_never_sees_another_model(table_gateway: str, path: str) -> None:
    assert names_seen(table_gateway, path, TEAM_A_ONLY) == {"m-a"}
    assert names_seen(table_gateway, path, OPS) == {"m-a", "m-b"}


def test_health_names_only_a_model_the_caller_may_see(table_gateway: str) -> None:
    def active(key: str | None) -> Any:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.get(table_gateway + "/health", headers=headers).json()["active_model"]

    assert active(None) is None
    assert active("sk-not-a-key") is None  # a wrong key on a probe is no key, not a 401
    assert active(TEAM_A_ONLY) in ("m-a", None)
    assert active(OPS) in ("m-a", "m-b")


def test_the_status_page_asks_a_browser_for_the_key(table_gateway: str) -> None:
    refused = httpx.get(table_gateway + "/ui")
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
    page = httpx.get(table_gateway + "/ui", auth=("anyone", OPS))
    assert page.status_code == 200 and "m-a" in page.text and "m-b" in page.text
    assert 'data-admin="true"' in page.text  # the page offers its actions


def test_a_limited_key_reads_the_page_with_its_models_only(table_gateway: str) -> None:
    page = httpx.get(table_gateway + "/ui", auth=("anyone", TEAM_A_ONLY))
    assert page.status_code == 200 and "m-a" in page.text
    assert "m-b" not in page.text
    assert 'data-admin="false"' in page.text  # read-only: no actions offered


def test_a_remembered_basic_password_never_acts(table_gateway: str) -> None:
    """What a browser does by itself, once the page was read with Basic credentials, and so
    what another site's page could make it do."""
    with httpx.Client(base_url=table_gateway, auth=("anyone", OPS), timeout=30) as browser:
        assert browser.get("/ui").status_code == 200
        for method, path in (("POST", "/models/m-a/unload"), ("DELETE", "/cache"),
                             ("POST", "/admin/reload")):
            answer = browser.request(method, path)
            assert answer.status_code == 401, (path, answer.text)


def test_another_sites_page_cannot_act_even_with_the_key(table_gateway: str) -> None:
    bearer = {"authorization": f"Bearer {OPS}"}
    host = table_gateway.removeprefix("http://")
    refused = httpx.post(table_gateway + "/models/m-a/load",
                         headers={**bearer, "origin": ANOTHER_SITE})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "cross_origin"
    null = httpx.delete(table_gateway + "/cache", headers={**bearer, "origin": "null"})
    assert null.status_code == 403
    own = httpx.post(table_gateway + "/models/m-a/load",
                     headers={**bearer, "origin": f"http://{host}"})
    assert own.status_code == 200  # the status page itself, on the gateway's own origin
    proxied = httpx.delete(table_gateway + "/cache", headers={
        **bearer, "origin": "https://swapper.example.com",
        "x-forwarded-host": "swapper.example.com"})
    assert proxied.status_code == 200  # behind an ingress that forwards the public host


def test_an_open_gateway_refuses_other_sites_too(start_gateway: Any, vllm: Any) -> None:
    gateway = start_gateway({
        "backends": {"vllm": {"kind": "openai", "base_url": vllm.url}},
        "models": {"m1": {"backend": "vllm", "served_name": "org/m1"}}})
    assert httpx.delete(gateway.url + "/cache", headers={"origin": ANOTHER_SITE}
                        ).status_code == 403
    assert httpx.delete(gateway.url + "/cache").status_code == 200
