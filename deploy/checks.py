"""Checks of deploy/ that need neither a cluster nor a Docker engine (run by .ci/deploy-checks).

    python deploy/checks.py [--promtool PATH] [--write-prometheusrule]

- the PrometheusRule in k8s/ carries exactly the groups of prometheus/alerts.yml;
- every metric an alert or a dashboard panel reads is one the worker exports
  (`goalstream.metrics.Metrics`), and every panel's query parses (promtool);
- the Kubernetes manifests, as `kubectl kustomize` renders them, validate against the API
  schemas (kubernetes-validate, strict); the custom resources (KEDA, Prometheus Operator) parse
  and agree with the manifests they refer to;
- docker-compose.yml has the services, dependencies and mounts the stack needs.

Needs PyYAML, kubernetes-validate and prometheus-client (the deploy-checks venv has them).
Prints one line per failed check and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
sys.path.insert(0, str(ROOT))

from goalstream import constants  # noqa: E402
from goalstream.metrics import Metrics  # noqa: E402

ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS_RULE = DEPLOY / "k8s" / "prometheusrule.yaml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "goalstream.json"
COMPOSE = DEPLOY / "docker-compose.yml"
RUNBOOK = DEPLOY / "RUNBOOK.md"
K8S = DEPLOY / "k8s"

# The worker's drain deadline after SIGTERM when GOALSTREAM_SHUTDOWN_TIMEOUT_SECONDS is not set
# in the manifests (taken as 30 s, above the worker's default); Kubernetes and compose must wait
# longer than the deadline before they kill a worker.
DRAIN_SECONDS = 30.0
DRAIN_VARIABLE = "GOALSTREAM_SHUTDOWN_TIMEOUT_SECONDS"
# Kubernetes versions the core manifests must validate against (oldest supported, newest).
K8S_VERSIONS = ("1.29.0", "latest")
# Kinds that are not in the Kubernetes API schemas: parsed and checked here instead.
CUSTOM_KINDS = {
    "ScaledObject",
    "TriggerAuthentication",
    "PodMonitor",
    "ServiceMonitor",
    "PrometheusRule",
}
WORKER_JOB = "goalstream-worker"

failures: list[str] = []


def fail(message: str) -> None:
    failures.append(message)
    print(f"FAIL {message}")


def ok(message: str) -> None:
    print(f"ok   {message}")


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# -- Prometheus rules ---------------------------------------------------------------------------


class _Literal(str):
    """A string dumped in YAML's block style (multi-line PromQL stays readable)."""


def _literal_representer(dumper: yaml.SafeDumper, value: _Literal) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")


def _literals(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _literals(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_literals(v) for v in value]
    if isinstance(value, str) and "\n" in value:
        return _Literal(value)
    return value


def prometheus_rule_text(groups: list[dict[str, Any]]) -> str:
    """The PrometheusRule manifest carrying `groups`, as committed in k8s/prometheusrule.yaml."""
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "goalstream",
            "labels": {"app.kubernetes.io/name": "goalstream"},
        },
        "spec": {"groups": groups},
    }
    yaml.SafeDumper.add_representer(_Literal, _literal_representer)
    body = yaml.safe_dump(_literals(rule), sort_keys=False, width=1000)
    return (
        "# Generated from deploy/prometheus/alerts.yml by `python deploy/checks.py"
        " --write-prometheusrule`;\n# edit alerts.yml, not this file. If your Prometheus"
        " selects rules by label, add that label.\n" + body
    )


def check_prometheus_rule(write: bool) -> None:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    if write:
        PROMETHEUS_RULE.write_text(prometheus_rule_text(groups))
        ok(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}")
    committed = yaml.safe_load(PROMETHEUS_RULE.read_text())
    if committed.get("spec", {}).get("groups") != groups:
        fail(
            "k8s/prometheusrule.yaml differs from prometheus/alerts.yml; run"
            " `python deploy/checks.py --write-prometheusrule`"
        )
    else:
        ok("PrometheusRule carries the groups of alerts.yml")


def check_runbook() -> None:
    """Every alert links to a section of RUNBOOK.md named after it."""
    headings = set(re.findall(r"^### (\w+)$", RUNBOOK.read_text(), re.MULTILINE))
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    alerts = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    for rule in alerts:
        name = rule["alert"]
        if name not in headings:
            fail(f"RUNBOOK.md has no section '### {name}'")
        if rule["annotations"].get("runbook_url") != f"RUNBOOK.md#{name.lower()}":
            fail(f"{name}: runbook_url does not point at its RUNBOOK.md section")
    ok(f"RUNBOOK.md has a section for each of the {len(alerts)} alerts")


# -- metric names -------------------------------------------------------------------------------


def exported_series_names() -> set[str]:
    """Every series name the worker's registry can expose, with the type's suffixes."""
    names: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for family in Metrics().registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


_METRIC = re.compile(r"\b(goal(?:stream)?_[a-z0-9_]+)\b")
# Label lists and matchers name labels (goal_type, ...), not metrics: drop them before looking.
_LABELS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)|\{[^}]*\}")


def metrics_read(expr: str) -> set[str]:
    """The goalstream metric names a PromQL expression reads."""
    return set(_METRIC.findall(_LABELS.sub(" ", expr)))


def check_metric_names(where: str, exprs: list[str], exported: set[str]) -> None:
    unknown = sorted({m for e in exprs for m in metrics_read(e)} - exported)
    if unknown:
        fail(f"{where} reads metrics the worker does not export: {', '.join(unknown)}")
    else:
        ok(f"{where}: every metric read is exported ({len(exprs)} queries)")


def alert_exprs() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            if target.get("expr"):
                exprs.append(target["expr"])
    return exprs


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def check_dashboard(promtool: str | None) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in _panels(dashboard["panels"])]
    if len(ids) != len(set(ids)):
        fail("dashboard: panel ids repeat")
    for panel in _panels(dashboard["panels"]):
        if panel["type"] != "row" and panel.get("datasource", {}).get("uid") != "${datasource}":
            fail(f"dashboard panel {panel['title']!r} does not use the $datasource variable")
    if promtool is None:
        print("skip dashboard queries: promtool not found")
        return
    # promtool parses recording rules: wrap each query in one, with Grafana's variables filled.
    rules = [
        {"record": f"dashboard:query_{i}", "expr": e.replace("$__rate_interval", "1m")}
        for i, e in enumerate(dashboard_exprs())
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
        f.flush()
        result = subprocess.run(
            [promtool, "check", "rules", f.name], capture_output=True, text=True
        )
    if result.returncode != 0:
        fail(f"dashboard queries do not parse:\n{result.stdout}{result.stderr}")
    else:
        ok(f"dashboard: {len(rules)} queries parse")


# -- Kubernetes ---------------------------------------------------------------------------------


def rendered_manifests() -> list[dict[str, Any]]:
    """The manifests as `kubectl kustomize` renders them, or the listed files as they are."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run(
            [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, check=False
        )
        if out.returncode != 0:
            fail(f"kubectl kustomize deploy/k8s failed: {out.stderr.strip()}")
            return []
        ok("kubectl kustomize renders deploy/k8s")
        return [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    print("skip kustomize rendering: kubectl not found; checking the files as they are")
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        docs += load_all(K8S / resource)
    return docs


def check_core_manifests(docs: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    versions = [kubernetes_validate.latest_version() if v == "latest" else v for v in K8S_VERSIONS]
    core = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
    for version in versions:
        bad = 0
        for doc in core:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except Exception as exc:  # ValidationError, SchemaNotFoundError: both are failures
                bad += 1
                fail(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc}")
        if not bad:
            ok(f"{len(core)} core manifests validate against Kubernetes {version} (strict)")


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    fail(f"no {kind}/{name} in deploy/k8s")
    return None


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def check_custom_resources(docs: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in docs}
    for kind in ("ScaledObject", "PodMonitor", "ServiceMonitor", "PrometheusRule"):
        if kind not in kinds:
            fail(f"deploy/k8s has no {kind}")
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS and not (
            doc.get("apiVersion") and doc.get("metadata", {}).get("name") and doc.get("spec")
        ):
            fail(f"{doc['kind']} lacks apiVersion, metadata.name or spec")
    worker = _find(docs, "Deployment", "goalstream-worker")
    admin_service = _find(docs, "Service", "goalstream-admin")
    config = _find(docs, "ConfigMap", "goalstream-config")
    if worker is None or admin_service is None or config is None:
        return
    check_worker(worker, float(config["data"].get(DRAIN_VARIABLE, DRAIN_SECONDS)))
    check_keda(docs, worker, config)
    check_monitors(docs, worker, admin_service)
    rule = _find(docs, "PrometheusRule", "goalstream")
    if rule is not None and rule["spec"]["groups"] != yaml.safe_load(ALERTS.read_text())["groups"]:
        fail("the rendered PrometheusRule differs from alerts.yml")


def check_worker(worker: dict[str, Any], drain: float) -> None:
    grace = worker["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    if grace <= drain:
        fail(f"worker terminationGracePeriodSeconds {grace} <= the {drain:g} s drain deadline")
    else:
        ok(f"worker grace period {grace} s > {drain:g} s drain deadline")


def check_keda(docs: list[dict[str, Any]], worker: dict[str, Any], config: dict[str, Any]) -> None:
    scaled = _find(docs, "ScaledObject", "goalstream-worker")
    if scaled is None:
        return
    spec = scaled["spec"]
    if spec["scaleTargetRef"]["name"] != worker["metadata"]["name"]:
        fail("ScaledObject does not target the worker Deployment")
    group = config["data"].get("GOALSTREAM_GROUP", constants.DEFAULT_GROUP)
    streams = config["data"].get("GOALSTREAM_STREAMS")
    expected = tuple(streams.split(",")) if streams else constants.DEFAULT_STREAMS
    env = {e["name"] for e in _container(worker).get("env", [])}
    kinds: dict[str, set[str]] = {s: set() for s in expected}
    for trigger in spec["triggers"]:
        meta = trigger["metadata"]
        if trigger["type"] != "redis-streams":
            fail(f"unexpected trigger type {trigger['type']}")
            continue
        if meta.get("consumerGroup") != group:
            fail(f"trigger {trigger.get('name')}: consumerGroup is not {group!r}")
        for key in ("addressFromEnv", "passwordFromEnv"):
            if key in meta and meta[key] not in env:
                fail(f"trigger {trigger.get('name')}: {key} {meta[key]} not in the worker's env")
        if meta.get("stream") not in kinds:
            fail(f"trigger {trigger.get('name')}: stream {meta.get('stream')} is not consumed")
            continue
        for kind in ("lagCount", "pendingEntriesCount"):
            if kind in meta:
                kinds[meta["stream"]].add(kind)
    missing = [s for s, k in kinds.items() if k != {"lagCount", "pendingEntriesCount"}]
    if missing:
        fail(f"ScaledObject lacks a lag or a pending trigger for: {', '.join(missing)}")
    else:
        ok(f"ScaledObject: lag and pending triggers for all {len(kinds)} streams, group {group}")
    if spec.get("minReplicaCount", 0) < 1:
        fail("ScaledObject may scale the workers to zero (nothing would sample the backlog)")


def _relabelled_job(endpoint: dict[str, Any]) -> str | None:
    for relabel in endpoint.get("relabelings", []):
        if relabel.get("targetLabel") == "job":
            return relabel.get("replacement")  # type: ignore[no-any-return]
    return None


def check_monitors(
    docs: list[dict[str, Any]], worker: dict[str, Any], admin_service: dict[str, Any]
) -> None:
    pod_monitor = _find(docs, "PodMonitor", "goalstream-worker")
    service_monitor = _find(docs, "ServiceMonitor", "goalstream-admin")
    if pod_monitor is None or service_monitor is None:
        return
    pod_labels = worker["spec"]["template"]["metadata"]["labels"]
    selector = pod_monitor["spec"]["selector"]["matchLabels"]
    if any(pod_labels.get(k) != v for k, v in selector.items()):
        fail("PodMonitor selector does not match the worker pods")
    ports = {p["name"] for p in _container(worker)["ports"]}
    for endpoint in pod_monitor["spec"]["podMetricsEndpoints"]:
        if endpoint["port"] not in ports:
            fail(f"PodMonitor port {endpoint['port']} is not a worker container port")
        if _relabelled_job(endpoint) != WORKER_JOB:
            fail(f"PodMonitor does not set job={WORKER_JOB} (the alerts use it)")
    service_ports = {p["name"] for p in admin_service["spec"]["ports"]}
    for endpoint in service_monitor["spec"]["endpoints"]:
        if endpoint["port"] not in service_ports:
            fail(f"ServiceMonitor port {endpoint['port']} is not an admin Service port")
    ok("PodMonitor and ServiceMonitor match their pods, ports and job names")


# -- docker compose -----------------------------------------------------------------------------


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(number) * units[unit]
    return total


def check_compose() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    wanted = {"redis", "postgres", "migrate", "worker", "admin", "prometheus", "grafana"}
    if missing := wanted - set(services):
        fail(f"docker-compose.yml lacks services: {', '.join(sorted(missing))}")
        return
    redis_command = " ".join(services["redis"].get("command", []))
    if "--appendonly yes" not in redis_command:
        fail("docker-compose.yml: Redis runs without the append-only file")
    worker = services["worker"]
    if worker.get("deploy", {}).get("replicas") != 3:
        fail("docker-compose.yml: not three workers")
    drain = float(worker.get("environment", {}).get(DRAIN_VARIABLE, DRAIN_SECONDS))
    if _seconds(worker.get("stop_grace_period", "10s")) <= drain:
        fail("docker-compose.yml: worker stop_grace_period is not above the drain deadline")
    for name in ("worker", "admin"):
        condition = services[name].get("depends_on", {}).get("migrate", {}).get("condition")
        if condition != "service_completed_successfully":
            fail(f"docker-compose.yml: {name} does not wait for the migration")
        if services[name]["command"][0] != name:
            fail(f"docker-compose.yml: {name} does not run `goalstream {name}`")
    if services["migrate"]["command"] != ["migrate"]:
        fail("docker-compose.yml: migrate does not run `goalstream migrate`")
    mounts = " ".join(services["prometheus"].get("volumes", []))
    if "./prometheus/alerts.yml:" not in mounts or "./prometheus/prometheus.yml:" not in mounts:
        fail("docker-compose.yml: Prometheus lacks its config or the alert rules")
    mounts = " ".join(services["grafana"].get("volumes", []))
    if "./grafana/provisioning:" not in mounts or "./grafana/dashboards:" not in mounts:
        fail("docker-compose.yml: Grafana lacks its provisioning or the dashboard")
    for path in re.findall(r"\./([\w/.-]+):", " ".join(_all_volumes(services))):
        if not (DEPLOY / path).exists():
            fail(f"docker-compose.yml mounts {path}, which does not exist")
    if not failures:
        ok("docker-compose.yml: services, dependencies and mounts")


def _all_volumes(services: dict[str, Any]) -> Iterator[str]:
    for service in services.values():
        yield from (v for v in service.get("volumes", []) if isinstance(v, str))


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--promtool", default=shutil.which("promtool"))
    parser.add_argument("--write-prometheusrule", action="store_true")
    args = parser.parse_args(argv)

    check_prometheus_rule(args.write_prometheusrule)
    check_runbook()
    exported = exported_series_names() | {"up"}
    check_metric_names("alerts.yml", alert_exprs(), exported)
    check_metric_names("dashboard", dashboard_exprs(), exported)
    check_dashboard(args.promtool)
    docs = rendered_manifests()
    if docs:
        check_core_manifests(docs)
        check_custom_resources(docs)
    check_compose()
    if failures:
        print(f"\n{len(failures)} deploy check(s) failed")
        return 1
    print("\nall deploy checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
