"""Deployment artefacts: Prometheus rules and config (promtool), the Grafana dashboard, the compose
stack, the Kubernetes manifests (kubernetes-validate, offline) and the Dockerfile (hadolint).

Metric names and label values used by alerts and the dashboard must exist in ``Metrics``, so the
rules cannot drift from the code.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from billing_client.reference.settings import BillingSettings
from dispatcher import metrics as metrics_module
from dispatcher.metrics import Metrics
from dispatcher.settings import SENDER_RATE_SCOPES, Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dispatcher.json"
KUBERNETES_VERSION = "1.31.0"  # kubernetes-validate ships its schemas; no network needed
DATA_SUFFIXES = {".sql", ".json", ".yaml", ".yml"}
UNDER_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}

# Metrics Prometheus itself adds; every other name must come from dispatcher.metrics.
PROMETHEUS_BUILTINS = {"up"}
LABEL_VALUES: dict[str, tuple[str, ...]] = {
    "kind": metrics_module.KINDS, "outcome": metrics_module.OUTCOMES,
    "reason": metrics_module.DEAD_LETTER_REASONS, "operation": metrics_module.CREDIT_OPERATIONS,
    "type": metrics_module.LOW_BALANCE_TYPES, "code_class": metrics_module.CODE_CLASSES,
    "loop": metrics_module.LOOP_NAMES,
}


def _tool(name: str) -> str:
    """The tool's path; skip without it locally, fail under CI (where it must be installed)."""
    venv_bin = Path(sys.executable).parent  # console scripts of dev dependencies (hadolint)
    found = shutil.which(name) or shutil.which(name, path=str(venv_bin))
    if found is None:
        message = f"{name} is not installed (bash scripts/system-deps; make setup)"
        if UNDER_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


def _run(*args: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout}\n{result.stderr}"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _alert_rules() -> list[dict[str, Any]]:
    return [rule for group in _yaml(PROMETHEUS / "alerts.yml")["groups"]
            for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def _exported_names() -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry)
    return {sample.name for family in registry.collect() for sample in family.samples}


# --- Prometheus -------------------------------------------------------------------------------

def test_promtool_checks_rules_config_and_rule_unit_tests() -> None:
    promtool = _tool("promtool")
    _run(promtool, "check", "rules", str(PROMETHEUS / "alerts.yml"))
    _run(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    _run(promtool, "test", "rules", str(PROMETHEUS / "alerts_test.yml"))


def test_promtool_lints_the_exposition() -> None:
    body, _ = Metrics(CollectorRegistry()).render()
    result = subprocess.run([_tool("promtool"), "check", "metrics"], input=body,
                            capture_output=True, timeout=60, check=False)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    tests = _yaml(PROMETHEUS / "alerts_test.yml")["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    for rule in _alert_rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case.get("exp_alerts") for case in mine), f"{rule['alert']} never fires"
        assert any(not case.get("exp_alerts") for case in mine), f"{rule['alert']} always fires"


def test_alerts_have_severity_summary_and_a_runbook_section() -> None:
    runbook = (PROMETHEUS / "runbook.md").read_text()
    anchors = {line[3:].strip().lower() for line in runbook.splitlines() if line.startswith("## ")}
    for rule in _alert_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"])
        path, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert path == "deploy/prometheus/runbook.md" and anchor == rule["alert"].lower()
        assert anchor in anchors, f"runbook.md has no section for {rule['alert']}"


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_metric_names_and_label_values_exist_in_metrics(source: str) -> None:
    exprs = ([rule["expr"] for rule in _alert_rules()] if source == "alerts"
             else _dashboard_exprs())
    exported = _exported_names()
    for expr in exprs:
        for name in re.findall(r"\bdispatcher_[a-z0-9_]+", expr):
            assert name in exported, f"{source}: {name} is not exported by Metrics"
        for label, op, value in re.findall(r'\b([a-z_]+)\s*(=~|!~|!=|=)\s*"([^"]*)"', expr):
            if label in LABEL_VALUES and "$" not in value:
                for alternative in value.split("|"):
                    assert alternative in LABEL_VALUES[label], f"{source}: {label}{op}{value}"
    used = {n for e in exprs for n in re.findall(r"\b([a-z_:][a-z0-9_:]*)\{", e)}
    assert used - exported <= PROMETHEUS_BUILTINS


def test_dashboard_is_valid_and_covers_every_area(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    rows = {p["title"] for p in panels if p["type"] == "row"}
    assert {"Throughput", "Latency", "Credits", "Held and paused", "Outbox", "Twilio"} <= rows
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    # promtool parses every query as a recording rule once Grafana's variables are filled in.
    exprs = [e.replace("$__rate_interval", "5m").replace("$instance", ".*")
             for e in _dashboard_exprs()]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    _run(_tool("promtool"), "check", "rules", str(tmp_path / "dashboard_rules.yml"))


# --- compose ----------------------------------------------------------------------------------

def _compose() -> dict[str, Any]:
    data: dict[str, Any] = _yaml(DEPLOY / "compose.yaml")
    return data


def _env_keys_are_settings(env: dict[str, str]) -> None:
    dispatcher = {f"DISPATCHER_{f.name.upper()}" for f in fields(Settings)}
    billing = {f"BILLING_{f.name.upper()}" for f in fields(BillingSettings)}
    unknown = set(env) - dispatcher - billing
    assert not unknown, f"not read by any settings: {sorted(unknown)}"


def test_compose_services_images_and_healthchecks() -> None:
    services = _compose()["services"]
    assert {"postgres", "rabbitmq", "migrate", "dispatcher", "billing", "twilio-sandbox",
            "prometheus"} <= set(services)
    assert services["postgres"]["image"] == "postgres:15"
    assert services["rabbitmq"]["image"] == "rabbitmq:3.10-management"
    assert services["migrate"]["command"] == ["migrate"]
    assert services["dispatcher"]["command"] == ["run"]
    assert services["billing"]["entrypoint"] == ["python", "-m", "billing_client.reference"]
    assert services["twilio-sandbox"]["entrypoint"] == ["python", "-m", "dispatcher.sandbox"]
    for name, service in services.items():
        check = service["healthcheck"]
        if name == "migrate":
            assert check == {"disable": True}  # one-shot: depends_on waits for its exit code
        else:
            assert check["test"][0] in {"CMD", "CMD-SHELL"} and check["retries"] >= 3, name
        if service.get("image") == "dispatcher:local":
            _env_keys_are_settings(service["environment"])


def test_compose_start_order_and_graceful_stop() -> None:
    services = _compose()["services"]
    assert services["dispatcher"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "rabbitmq": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
        "twilio-sandbox": {"condition": "service_healthy"},
    }
    assert services["billing"]["depends_on"]["migrate"] == {
        "condition": "service_completed_successfully"}
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    env = services["dispatcher"]["environment"]
    grace = int(services["dispatcher"]["stop_grace_period"].removesuffix("s"))
    assert grace > float(env["DISPATCHER_SHUTDOWN_TIMEOUT_SECONDS"])
    assert env["DISPATCHER_TWILIO_BASE_URL"] == "http://twilio-sandbox:8765"


def test_compose_mounts_files_that_exist() -> None:
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()


# --- Kubernetes -------------------------------------------------------------------------------

def _manifests(folder: Path = K8S) -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in sorted(folder.glob("*.yaml"))
            if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kind(kind: str) -> dict[str, Any]:
    [doc] = [doc for _, doc in _manifests() if doc["kind"] == kind]
    return doc


def test_manifests_validate_against_kubernetes_schemas() -> None:
    kinds = set()
    for path, doc in _manifests():
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {exc.message} at {list(exc.path)}")
        assert "namespace" not in doc["metadata"], f"{path.name} must stay namespace-agnostic"
        kinds.add(doc["kind"])
    assert {"Deployment", "Service", "PodDisruptionBudget", "Job", "ConfigMap", "Secret",
            "HorizontalPodAutoscaler"} <= kinds


def test_strict_validation_rejects_a_typo() -> None:
    deployment = _kind("Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 3}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    listed = _yaml(K8S / "kustomization.yaml")["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml")
                                    if p.name != "kustomization.yaml")


def test_deployment_probes_drain_and_security() -> None:
    spec = _kind("Deployment")["spec"]
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    assert spec["replicas"] == 3
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(_kind("ConfigMap")["data"]["DISPATCHER_SHUTDOWN_TIMEOUT_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] > 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}


def test_job_hpa_pdb_and_config_fit_the_deployment() -> None:
    labels = _kind("Deployment")["spec"]["selector"]["matchLabels"]
    assert _kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == labels
    assert _kind("Service")["spec"]["selector"] == labels
    job_container = _kind("Job")["spec"]["template"]["spec"]["containers"][0]
    assert job_container["args"] == ["migrate"]
    hpa = _kind("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == _kind("Deployment")["metadata"]["name"]
    assert hpa["metrics"][0]["external"]["metric"]["name"] == "rabbitmq_queue_messages_ready"
    assert hpa["minReplicas"] >= 3
    _env_keys_are_settings(_kind("ConfigMap")["data"])
    secret = _kind("Secret")["stringData"]
    _env_keys_are_settings(secret)
    assert all(("FAKE" in v or "CHANGE-ME" in v) for k, v in secret.items() if "TWILIO" in k)


def test_optional_custom_resources_parse() -> None:
    docs = _manifests(K8S / "optional")
    assert {doc["kind"] for _, doc in docs} == {"ScaledObject", "TriggerAuthentication",
                                                 "ServiceMonitor"}
    for _, doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"]


# --- Dockerfile -------------------------------------------------------------------------------

def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines
            if line and not line.startswith("#")]


def test_hadolint_passes() -> None:
    _run(_tool("hadolint"), str(ROOT / "Dockerfile"))


def test_dockerfile_multi_stage_non_root_with_healthcheck() -> None:
    instructions = _instructions()
    stages = [arg for op, arg in instructions if op == "FROM"]
    assert len(stages) >= 2 and stages[0].endswith("AS builder")
    final = len(instructions) - [op for op, _ in instructions][::-1].index("FROM") - 1
    runtime = instructions[final:]
    assert any("python:3.11-slim" in arg for op, arg in instructions if op == "ARG")
    users = [arg for op, arg in runtime if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert users[-1].split(":")[0].isdigit(), "numeric UID, so runAsNonRoot can verify it"
    [healthcheck] = [arg for op, arg in runtime if op == "HEALTHCHECK"]
    assert "/healthz" in healthcheck and "urllib" in healthcheck
    assert ("ENTRYPOINT", '["dispatcher"]') in runtime and ("CMD", '["run"]') in runtime
    assert ("EXPOSE", "8080") in runtime
    assert not [arg for op, arg in instructions if op == "ADD" and "://" in arg]


def test_dockerignore_keeps_the_context_to_the_package() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "requirements/runtime.txt", "README.md", "dispatcher",
                       "billing_client"}


def test_wheel_ships_every_data_file() -> None:
    """The image installs the wheel: every data file the packages read must be in it."""
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]
    for package, patterns in package_data.items():
        for path in (ROOT / package).rglob("*"):
            if path.is_file() and (path.suffix in DATA_SUFFIXES or path.name == "py.typed"):
                relative = path.relative_to(ROOT / package).as_posix()
                assert any(fnmatch.fnmatch(relative, p) for p in patterns), \
                    f"{package}/{relative} is missing from [tool.setuptools.package-data]"


# --- The cluster shape (issue 18): k8s-cluster overlay and compose.cluster.yaml -------------------

K8S_CLUSTER = DEPLOY / "k8s-cluster"
HELPER_ENV = {"PGPASSWORD", "RABBITMQ_USERNAME", "RABBITMQ_PASSWORD"}  # not settings: inputs


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.split("/")[1:]]


def _json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    """The JSON 6902 ``add`` and ``remove`` the overlay uses, applied in place."""
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        assert last in node or op["op"] == "add", f"{op['path']} not in the base"
        if op["op"] == "add":
            node[last] = op["value"]
        else:
            assert op["op"] == "remove", op
            del node[last]


def _cluster_overlay() -> list[dict[str, Any]]:
    """What ``kubectl kustomize deploy/k8s-cluster`` builds, composed in Python."""
    kustomization = _yaml(K8S_CLUSTER / "kustomization.yaml")
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        path = (K8S_CLUSTER / resource).resolve()
        if path.is_dir():
            base = _yaml(path / "kustomization.yaml")["resources"]
            docs += [doc for name in base for doc in yaml.safe_load_all((path / name).read_text())
                     if doc]
        else:
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in kustomization["patches"]:
        target = patch["target"]
        [doc] = [d for d in docs if d["kind"] == target["kind"]
                 and d["metadata"]["name"] == target["name"]]
        _json_patch(doc, _yaml(K8S_CLUSTER / patch["path"]))
    return docs


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [doc] = [doc for doc in docs if doc["kind"] == kind]
    return doc


def _hosts(url: str) -> list[str]:
    """``host:port`` of each host of a (multi-host) URL."""
    netloc = url.split("://", 1)[1].split("/", 1)[0]
    return netloc.rpartition("@")[2].split(",")


def test_cluster_overlay_resources_validate_and_the_operators_are_referenced() -> None:
    docs = _cluster_overlay()
    kinds = {doc["kind"] for doc in docs}
    assert {"RabbitmqCluster", "Cluster", "Deployment", "Job", "ConfigMap", "Secret"} <= kinds
    for doc in docs:
        if doc["apiVersion"].endswith((".com/v1beta1", ".cnpg.io/v1")):
            continue  # custom resources: checked field by field below
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}: {exc.message} at {list(exc.path)}")
    rabbit = _one(docs, "RabbitmqCluster")
    assert rabbit["apiVersion"] == "rabbitmq.com/v1beta1"
    assert rabbit["spec"]["replicas"] == 3
    postgres = _one(docs, "Cluster")
    assert postgres["apiVersion"] == "postgresql.cnpg.io/v1"
    assert postgres["spec"]["instances"] in (2, 3)
    sync = postgres["spec"]["postgresql"].get("synchronous")
    assert (sync and sync["number"] >= 1 and sync["method"] in {"any", "first"}) or (
        postgres["spec"].get("minSyncReplicas", 0) >= 1)
    assert postgres["spec"]["imageName"].endswith(":15")  # the version the tests run on


def test_cluster_overlay_connection_settings() -> None:
    docs = _cluster_overlay()
    rabbit = _one(docs, "RabbitmqCluster")["metadata"]["name"]
    cluster = _one(docs, "Cluster")
    initdb = cluster["spec"]["bootstrap"]["initdb"]
    config = _one(docs, "ConfigMap")["data"]
    _env_keys_are_settings(config)
    # The URLs come from the operators, not from the placeholder Secret (no shadowing).
    secret = _one(docs, "Secret")["stringData"]
    assert not {"DISPATCHER_DATABASE_URL", "DISPATCHER_AMQP_URL"} & set(secret)
    dsn = config["DISPATCHER_DATABASE_URL"]
    assert _hosts(dsn) == [f"{cluster['metadata']['name']}-rw:5432"]
    assert dsn.split("://")[1].split("@")[0] == initdb["owner"]  # password from PGPASSWORD
    assert dsn.split("/")[-1] == f"{initdb['database']}?target_session_attrs=read-write"
    assert config["DISPATCHER_SENDER_RATE_SCOPE"] in SENDER_RATE_SCOPES
    for workload in ("Deployment", "Job"):
        [container] = _one(docs, workload)["spec"]["template"]["spec"]["containers"]
        env = container["env"]
        names = [e["name"] for e in env]
        _env_keys_are_settings({n: "" for n in names if n not in HELPER_ENV})
        secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in env if "valueFrom" in e}
        assert secrets == {f"{cluster['metadata']['name']}-app", f"{rabbit}-default-user"}
        [amqp] = [e["value"] for e in env if e["name"] == "DISPATCHER_AMQP_URL"]
        urls = amqp.split(",")
        assert [_hosts(url) for url in urls] == [
            [f"{rabbit}-server-{i}.{rabbit}-nodes:5672"] for i in range(3)]
        defined_before = names[:names.index("DISPATCHER_AMQP_URL")]
        assert set(re.findall(r"\$\((\w+)\)", amqp)) <= set(defined_before)


def test_cluster_overlay_renders_with_kubectl_kustomize() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:  # optional: the Python composition above checks the same patches
        pytest.skip("kubectl is not installed")
    result = subprocess.run([kubectl, "kustomize", str(K8S_CLUSTER)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    composed = _cluster_overlay()
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in composed)
    for kind in ("ConfigMap", "Deployment", "Job"):
        assert _one(rendered, kind)["spec" if kind != "ConfigMap" else "data"] == _one(
            composed, kind)["spec" if kind != "ConfigMap" else "data"]


def _cluster_compose() -> dict[str, Any]:
    data: dict[str, Any] = _yaml(DEPLOY / "compose.cluster.yaml")
    return data


def test_compose_cluster_services_and_images_match_the_single_node_stack() -> None:
    services = _cluster_compose()["services"]
    single = _compose()["services"]
    brokers = sorted(n for n in services if n.startswith("rabbitmq-"))
    assert brokers == ["rabbitmq-1", "rabbitmq-2", "rabbitmq-3"]
    replicas = sorted(n for n in services if n.startswith("dispatcher-"))
    assert len(replicas) == 2
    assert {"postgres-primary", "postgres-standby", "migrate", "twilio-sandbox",
            "billing"} <= set(services)
    for name in brokers:
        assert services[name]["image"] == single["rabbitmq"]["image"]
        assert services[name]["hostname"] == name
    assert len({services[n]["environment"]["RABBITMQ_ERLANG_COOKIE"] for n in brokers}) == 1
    conf = (DEPLOY / "rabbitmq" / "cluster.conf").read_text()
    assert sorted(re.findall(r"classic_config\.nodes\.\d+ = rabbit@(\S+)", conf)) == brokers
    for name in ("postgres-primary", "postgres-standby"):
        assert services[name]["image"] == single["postgres"]["image"]
    for name, service in services.items():
        check = service["healthcheck"]
        if name == "migrate":
            assert check == {"disable": True}
        else:
            assert check["test"][0] in {"CMD", "CMD-SHELL"} and check["retries"] >= 3, name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
    published = [p.split(":")[0] for s in services.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published))


def test_compose_cluster_replication_is_synchronous_to_the_standby() -> None:
    services = _cluster_compose()["services"]
    init = (DEPLOY / "postgres" / "primary-init.sh").read_text()
    # Set by the init script, never on the command line: the image's first-start server takes
    # the command's options, and its initialisation would wait for a standby forever.
    assert "synchronous_standby_names" not in " ".join(services["postgres-primary"]["command"])
    [names] = re.findall(r"ALTER SYSTEM SET synchronous_standby_names = '([^']+)'", init)
    standby = (DEPLOY / "postgres" / "standby-start.sh").read_text()
    [application] = re.findall(r"application_name=(\w+)", standby)
    assert re.fullmatch(rf"FIRST 1 \({application}\)", names)
    assert "host=postgres-primary " in standby and "user=replicator " in standby
    # Promoted, the standby commits alone: it must not inherit the wait for a standby.
    assert standby.rstrip().endswith("-c synchronous_standby_names=")
    assert "REPLICATION LOGIN" in init and "host replication replicator" in init
    primary = services["postgres-primary"]
    assert "./postgres/primary-init.sh:/docker-entrypoint-initdb.d/10-replication.sh:ro" in (
        primary["volumes"])
    assert services["postgres-standby"]["depends_on"]["postgres-primary"] == {
        "condition": "service_healthy"}


def test_compose_cluster_replicas_list_every_node() -> None:
    services = _cluster_compose()["services"]
    brokers = {f"{n}:5672" for n in services if n.startswith("rabbitmq-")}
    databases = {"postgres-primary:5432", "postgres-standby:5432"}
    replicas = [s for n, s in services.items() if n.startswith("dispatcher-")]
    envs = [replica["environment"] for replica in replicas]
    for replica, env in zip(replicas, envs, strict=True):
        _env_keys_are_settings(env)
        assert {h for url in env["DISPATCHER_AMQP_URL"].split(",") for h in _hosts(url)} == brokers
        assert set(_hosts(env["DISPATCHER_DATABASE_URL"])) == databases
        assert env["DISPATCHER_DATABASE_URL"].endswith("?target_session_attrs=read-write")
        assert env["DISPATCHER_SENDER_RATE_SCOPE"] == "shared"
        grace = int(replica["stop_grace_period"].removesuffix("s"))
        assert grace > float(env["DISPATCHER_SHUTDOWN_TIMEOUT_SECONDS"])
        assert replica["command"] == ["run"]
        waits = replica["depends_on"]
        assert {n for n in waits if waits[n]["condition"] == "service_healthy"} >= {
            b.split(":")[0] for b in brokers} | {d.split(":")[0] for d in databases}
        assert waits["migrate"] == {"condition": "service_completed_successfully"}
    # The replicas differ only in the address Twilio calls back.
    same = [{k: v for k, v in env.items() if k != "DISPATCHER_PUBLIC_BASE_URL"} for env in envs]
    assert all(s == same[0] for s in same)
    assert len({env["DISPATCHER_PUBLIC_BASE_URL"] for env in envs}) == len(envs)
    billing = services["billing"]["environment"]
    _env_keys_are_settings(billing)
    assert {h for url in billing["BILLING_AMQP_URL"].split(",") for h in _hosts(url)} == brokers
    assert set(_hosts(billing["BILLING_DATABASE_URL"])) == databases
