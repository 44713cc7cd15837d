"""The Helm chart: linted, rendered and every manifest validated strictly, with no helm binary.

`helm_python` (helm-python-sdk) embeds Helm's Go SDK; `kubernetes_validate` holds the Kubernetes
OpenAPI schemas (strict: unknown fields fail); the ServiceMonitor, a Prometheus Operator CRD those
schemas lack, is checked against cloudcoil's generated models of that CRD.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

from gateway.config.reader import parse_config
from gateway.config.schema import GatewayConfig

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "swapper-gateway"
VALUES_ALL = yaml.safe_load((ROOT / "helm" / "values-all.yaml").read_text(encoding="utf-8"))
KUBERNETES = ("1.30.0", kubernetes_validate.latest_version())  # the chart's minimum, the newest
RELEASE = "demo"
Manifest = dict[str, Any]
Case = tuple[dict[str, Any] | None, list[Manifest]]  # values (None: defaults), manifests


def render(values: dict[str, Any] | None = None) -> list[Manifest]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=RELEASE, namespace="llm")
    return [doc for name, text in sorted(rendered.items()) if name.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module", params=["default", "all"])
def case(request: pytest.FixtureRequest) -> Case:
    values = VALUES_ALL if request.param == "all" else None
    return values, render(values)


def find(manifests: list[Manifest], kind: str, component: str = "gateway") -> Manifest:
    (found,) = [m for m in manifests if m["kind"] == kind
                and m["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    return found


def gateway_container(manifests: list[Manifest]) -> Manifest:
    (container,) = find(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def pod_env(manifests: list[Manifest]) -> dict[str, str]:
    """The gateway container's environment: plain values, and items of the chart's Secrets."""
    secrets = {m["metadata"]["name"]: m["stringData"] for m in manifests if m["kind"] == "Secret"}
    env = {}
    for item in gateway_container(manifests)["env"]:
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        value = secrets.get(ref["name"], {}).get(ref["key"]) if ref else item.get("value")
        if value is not None:
            env[item["name"]] = value
    return env


def gateway_config(manifests: list[Manifest]) -> GatewayConfig:
    """The config as the pod would load it: the ConfigMap's file under the pod's environment."""
    data = yaml.safe_load(find(manifests, "ConfigMap")["data"]["swapper_config.yaml"])
    return parse_config(data, source="configmap", env=pod_env(manifests))


def test_lint_is_clean(case: Case) -> None:
    report = helm.lint(CHART, case[0], strict=True, kube_version="v1.30.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("version", KUBERNETES)
def test_every_manifest_validates_strictly(case: Case, version: str) -> None:
    for manifest in case[1]:
        if manifest["kind"] == "ServiceMonitor":
            validate_service_monitor(manifest)
        else:
            kubernetes_validate.validate(manifest, version, strict=True)


def validate_service_monitor(manifest: Manifest) -> None:
    """The CRD's model ignores unknown fields; a lossless round trip shows there were none."""
    model = ServiceMonitor.model_validate(manifest)
    assert model.model_dump(mode="json", by_alias=True, exclude_unset=True) == manifest


def test_config_map_is_a_config_the_gateway_accepts(case: Case) -> None:
    values, manifests = case
    config = gateway_config(manifests)
    assert config.unknown_keys == ()
    assert set(config.models) == set((values or {}).get("config", {}).get("models", {}))
    redis = f"redis://{RELEASE}-swapper-gateway-redis:6379/0" if values else None
    assert config.cache.redis_url == redis
    keys = [(key.name, key.admin) for key in config.auth.keys]
    assert keys == ([("team-a", False), ("team-b", False), ("admin", True)] if values else [])


def test_probes_security_and_shutdown_grace(case: Case) -> None:
    manifests = case[1]
    pod = find(manifests, "Deployment")["spec"]["template"]["spec"]
    container = gateway_container(manifests)
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid()
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = gateway_config(manifests).server.shutdown_grace_s
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace


def dockerfile_uid() -> int:
    match = re.search(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert match, "the Dockerfile names its user by uid"
    return int(match.group(1))


def test_service_and_monitors_select_the_gateway_pods_only(case: Case) -> None:
    manifests = case[1]
    pods = {m["metadata"]["name"]: m["spec"]["template"]["metadata"]["labels"]
            for m in manifests if m["kind"] == "Deployment"}
    service = find(manifests, "Service")
    selectors = [service["spec"]["selector"]] + [
        m["spec"]["selector"]["matchLabels"] for m in manifests
        if m["kind"] in ("PodDisruptionBudget", "ServiceMonitor")
    ]
    for selector in selectors:
        assert [name for name, labels in pods.items() if selector.items() <= labels.items()] == [
            f"{RELEASE}-swapper-gateway"]
    port = gateway_container(manifests)["ports"][0]
    assert (port["name"], service["spec"]["ports"][0]["targetPort"]) == ("http", "http")
    assert str(port["containerPort"]) in gateway_container(manifests)["args"]


def test_optional_objects_appear_only_when_enabled() -> None:
    assert Counter(m["kind"] for m in render()) == Counter(
        ["ConfigMap", "Deployment", "Service", "ServiceAccount"])
    assert Counter(m["kind"] for m in render(VALUES_ALL)) == Counter(
        ["ConfigMap", "ConfigMap", "Deployment", "Deployment", "HorizontalPodAutoscaler", "Ingress",
         "PodDisruptionBudget", "Secret", "Service", "Service", "ServiceAccount", "ServiceMonitor"])


def test_the_grafana_dashboard_is_a_configmap_for_grafanas_sidecar() -> None:
    (board,) = [m for m in render(VALUES_ALL) if m["kind"] == "ConfigMap"
                and m["metadata"]["labels"]["app.kubernetes.io/component"] == "dashboard"]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert board["metadata"]["namespace"] == "monitoring"
    assert board["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    shipped = json.loads((ROOT / "grafana" / "swapper-gateway.json").read_text(encoding="utf-8"))
    assert json.loads(board["data"]["swapper-gateway.json"]) == shipped  # the repository's own


def test_ingress_is_ready_for_server_sent_events() -> None:
    annotations = find(render({"ingress": {"enabled": True}}), "Ingress")["metadata"][
        "annotations"]
    nginx = "nginx.ingress.kubernetes.io/"
    assert annotations[nginx + "proxy-buffering"] == "off"
    assert int(annotations[nginx + "proxy-read-timeout"]) >= 3600
    assert int(annotations[nginx + "proxy-send-timeout"]) >= 3600
    overridden = find(render(VALUES_ALL), "Ingress")["metadata"]["annotations"]
    assert overridden[nginx + "proxy-read-timeout"] == "7200"  # values' annotations win
    assert overridden[nginx + "proxy-buffering"] == "off"


def test_api_keys_from_an_existing_secret_reach_the_env() -> None:
    manifests = render({"apiKeys": {"existingSecret": "my-keys"}})
    assert "Secret" not in {m["kind"] for m in manifests}
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in gateway_container(manifests)["env"]
           if "valueFrom" in e}
    assert env == {
        "SWAPPER_API_KEYS": {"name": "my-keys", "key": "api-keys", "optional": True},
        "SWAPPER_ADMIN_KEY": {"name": "my-keys", "key": "admin-key", "optional": True},
    }


def test_api_keys_can_be_mounted_as_files() -> None:
    manifests = render(VALUES_ALL)
    mounts = {m["name"]: m["mountPath"] for m in gateway_container(manifests)["volumeMounts"]}
    assert mounts["api-keys"] == VALUES_ALL["apiKeys"]["mountPath"]
    (volume,) = [v for v in find(manifests, "Deployment")["spec"]["template"]["spec"]["volumes"]
                 if v["name"] == "api-keys"]
    assert volume["secret"]["secretName"] == find(manifests, "Secret")["metadata"]["name"]


def test_external_redis_url_goes_into_the_config() -> None:
    manifests = render({"replicaCount": 2, "externalRedis": {"url": "redis://cache:6379/3"}})
    assert gateway_config(manifests).cache.redis_url == "redis://cache:6379/3"
    assert "redis" not in {m["metadata"]["labels"]["app.kubernetes.io/component"]
                           for m in manifests}


@pytest.mark.parametrize(("values", "message"), [
    ({"terminationGracePeriodSeconds": 30}, "terminationGracePeriodSeconds"),
    ({"replicaCount": 2}, "several replicas need Redis"),
    ({"autoscaling": {"enabled": True}}, "several replicas need Redis"),
])
def test_values_that_would_cut_streams_or_split_replicas_are_refused(
    values: dict[str, Any], message: str,
) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render(values)
