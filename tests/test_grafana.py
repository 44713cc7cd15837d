"""The Grafana dashboard (grafana/swapper-gateway.json): every query parses as PromQL, and every
metric and label it asks for is one a running gateway's /metrics exports, after the traffic the
dashboard is about (swaps, a stream with usage, a cache hit, an error)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.config.reader import parse_config
from tests.emulators import ollama as ollama_emulator

DASHBOARD = Path(__file__).resolve().parent.parent / "grafana" / "swapper-gateway.json"
VARIABLES = {"$__rate_interval": "5m", "$model": ".*", "$node": ".*"}
# Exported with a value only where the backend can tell (what a load measured, the node's free
# GPU memory): declared in /metrics, with or without samples here.
MEASURED_ONLY = {"swapper_node_measured_gb", "swapper_node_free_gb"}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every target; the variables' queries too."""
    found = [(panel["title"], target["expr"]) for panel in dashboard()["panels"]
             for target in panel.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*), \w+\)", variable["query"]["query"])
            assert inner, variable
            found.append((f"${variable['name']}", inner.group(1)))
    return found


def parsed(expr: str) -> Any:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return promql_parser.parse(expr)


def selectors(node: Any) -> Iterator[promql_parser.VectorSelector]:
    """Every series selector in an expression's syntax tree."""
    if isinstance(node, promql_parser.VectorSelector):
        yield node
        return
    if isinstance(node, list):
        for item in node:
            yield from selectors(item)
        return
    for attribute in ("lhs", "rhs", "expr", "args", "param", "vector_selector"):
        child = getattr(node, attribute, None)
        if child is not None:
            yield from selectors(child)


def test_the_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "swapper-gateway" and board["schemaVersion"] >= 36
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "node", "model"}
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"}
            assert used <= variables, (panel["title"], used)
    titles = " ".join(panel["title"].lower() for panel in board["panels"])
    for subject in ("swaps", "load duration", "queue depth", "time to first byte",
                    "tokens per second", "cache hit rate", "errors by code", "per node"):
        assert subject in titles, f"no panel for {subject}"


@pytest.mark.parametrize(("title", "expr"), queries(), ids=[t for t, _ in queries()])
def test_every_query_is_promql(title: str, expr: str) -> None:
    assert list(selectors(parsed(expr))), f"{title}: no metric in {expr}"


@dataclass
class Exported:
    declared: set[str]  # every name in /metrics (families, and their samples' names)
    labels: dict[str, set[str]]  # names with samples -> their label names


@pytest.fixture(scope="module")
def exported() -> Iterator[Exported]:
    """What the Prometheus text of a gateway exports after it swapped, streamed with usage,
    answered from its cache and refused a request."""
    from tests.servers import serve

    with serve(ollama_emulator.create_app({"a:7b": 4.0, "b:7b": 6.0}, load_delay=0.02)) as ollama:
        app = create_app(parse_config({
            "swapper": {"memory_budget_gb": 12},
            "backends": {"ollama": {"kind": "ollama", "base_url": ollama.url}},
            "models": {"alpha": {"path": "ollama:a:7b", "size_gb": 4},
                       "beta": {"path": "ollama:b:7b", "size_gb": 6}},
            "batching": {"window_ms": 0},
        }, source="test-config", env={}))
        with serve(app) as gateway, httpx.Client(base_url=gateway.url, timeout=30) as client:
            for model, text in (("alpha", "hi"), ("beta", "hi"), ("alpha", "again"),
                                ("alpha", "again")):  # two swaps, then a cache hit
                answer = client.post("/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": text}],
                    "temperature": 0, "stream": True})
                assert answer.status_code == 200
            refused = client.post("/v1/chat/completions", json={
                "model": "nope", "messages": [{"role": "user", "content": "hi"}]})
            assert refused.status_code == 404
            unserved = client.post("/v1/responses", json={"model": "alpha", "input": "hi"})
            assert unserved.status_code == 404  # an error counted for a known model
            text = client.get("/metrics", headers={"accept": "text/plain"}).text
    assert 'swapper_cache_requests_total{model="alpha",result="hit"} 1.0' in text
    found = Exported(set(), {})
    for family in text_string_to_metric_families(text):
        found.declared.add(family.name)
        for sample in family.samples:
            found.declared.add(sample.name)
            found.labels.setdefault(sample.name, set()).update(sample.labels)
    yield found


@pytest.mark.parametrize(("title", "expr"), queries(), ids=[t for t, _ in queries()])
def test_every_metric_and_label_queried_is_exported(exported: Exported, title: str,
                                                    expr: str) -> None:
    for selector in selectors(parsed(expr)):
        name = selector.name
        assert name in exported.declared, f"{title}: {name} is not in /metrics"
        if name in MEASURED_ONLY:
            continue
        assert name in exported.labels, f"{title}: {name} has no samples"
        for matcher in selector.matchers.matchers:
            assert matcher.name in exported.labels[name], f"{title}: {name} has no {matcher.name}"
