"""Deployment artifacts: the Helm chart, docker-compose.yml, the Dockerfiles and the container health check.

Tools come from PyPI packages of the dev extra (tests/deploy_tools.py): helm (unpacked from the
aws-cdk kubectl-layer wheel), kubernetes-validate, check-jsonschema, hadolint. A missing tool is a
test failure with what to install, never a skip. No Docker engine is needed: the images are not
built here (users and CI build them elsewhere); their Dockerfiles are linted and checked.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

import deploy_tools

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "gradalign"
GPU_VALUES = CHART / "values-gpu.yaml"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = [ROOT / "docker" / "Dockerfile.cpu", ROOT / "docker" / "Dockerfile.cuda"]
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
RELEASE, NAMESPACE = "rel", "ml"
FULLNAME = "rel-gradalign"
# the newest Kubernetes the validator knows, and the oldest the chart supports (Chart.yaml kubeVersion)
KUBE_VERSIONS = ("1.37.0", "1.27.0")
WORKERS = ("rollout", "scoring", "trainer")

# Value sets rendered and validated. "external" covers the production branches (external
# PostgreSQL/Redis URLs, an existing artifact claim, static discovery, no PDB, restricted peers,
# egress to a judge and to an in-cluster database, a larger upload limit behind an Ingress).
JUDGE_CIDR = "203.0.113.7/32"
EXTERNAL_VALUES = f"""
postgresql: {{enabled: false}}
externalDatabase: {{url: "postgresql+psycopg://u:p@db.example.com:5432/gradalign"}}
redis: {{enabled: false}}
externalRedis: {{url: "redis://redis.example.com:6379/0"}}
auth: {{bootstrapToken: test-token}}
artifacts: {{existingClaim: shared-artifacts}}
scheduler:
  replicaCount: 2
  maxUploadBytes: 5368709120
  discovery: {{mode: static, refreshSeconds: 5}}
  service: {{type: LoadBalancer, port: 8000}}
podDisruptionBudget: {{enabled: false, maxUnavailable: 1}}
networkPolicy:
  enabled: true
  metricsFrom:
    - namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: monitoring}}}}
  externalDatabase:
    to:
      - namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: databases}}}}
    ports: [5432, 6432]
  judge:
    to:
      - ipBlock: {{cidr: "{JUDGE_CIDR}"}}
    ports: [8443]
ingress:
  enabled: true
  annotations: {{nginx.ingress.kubernetes.io/proxy-read-timeout: "86400"}}
rollout:
  settings: {{JUDGE_BASE_URL: "https://judge.example.com:8443/v1", JUDGE_MODEL: judge}}
scoring:
  settings: {{DTYPE: bfloat16}}
"""
VALUE_SETS: dict[str, list[str]] = {
    "default": [],
    "gpu": ["-f", str(GPU_VALUES), "--set", "ingress.enabled=true"],
    "external": ["-f", "{external}"],
}


# --- tools ---------------------------------------------------------------------------------------


def _tool(fn):
    try:
        return fn()
    except deploy_tools.ToolMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def helm_env(tmp_path_factory) -> dict[str, str]:
    """helm with its cache/config/data folders in a temp dir (no state left in $HOME)."""
    home = tmp_path_factory.mktemp("helm-home")
    env = dict(os.environ)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[var] = str(home / var.lower())
    return env


@pytest.fixture(scope="module")
def helm(helm_env):
    binary = _tool(deploy_tools.helm)

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(binary), *args], capture_output=True, text=True, env=helm_env, timeout=120)
        if check and proc.returncode != 0:
            pytest.fail(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}", pytrace=False)
        return proc

    version = run("version", "--short").stdout.strip()
    assert re.match(r"v[34]\.", version), version
    return run


@pytest.fixture(scope="module")
def external_values(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("values") / "external.yaml"
    path.write_text(EXTERNAL_VALUES)
    return path


def render(helm, value_args: list[str], external: Path) -> str:
    args = [str(external) if a == "{external}" else a for a in value_args]
    return helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSIONS[0], *args).stdout


def manifests(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.fixture(scope="module")
def rendered(helm, external_values) -> dict[str, list[dict]]:
    return {name: manifests(render(helm, args, external_values)) for name, args in VALUE_SETS.items()}


# --- helm lint / template / kubernetes-validate --------------------------------------------------


@pytest.mark.parametrize("values", ["default", "gpu"])
def test_helm_lint(helm, values):
    args = ["-f", str(GPU_VALUES)] if values == "gpu" else []
    out = helm("lint", "--strict", str(CHART), *args).stdout
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("values", list(VALUE_SETS))
def test_rendered_manifests_are_valid_kubernetes(helm, values, tmp_path, external_values):
    """Every rendered object validates (strictly: no unknown fields) against the newest and the oldest supported API."""
    validator = _tool(deploy_tools.kubernetes_validate)
    path = tmp_path / f"{values}.yaml"
    path.write_text(render(helm, VALUE_SETS[values], external_values))
    count = len(manifests(path.read_text()))
    assert count >= 15
    for version in KUBE_VERSIONS:
        proc = subprocess.run([str(validator), "--strict", "-k", version, str(path)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"kubernetes-validate {version}:\n{proc.stdout}\n{proc.stderr}"
        passed = proc.stdout.count(" passed for resource ")
        assert passed == count, f"{passed} of {count} objects reported as passed against {version}:\n{proc.stdout}"


# --- what the default values render --------------------------------------------------------------


def _gradalign_containers(deployment: dict) -> list[dict]:
    spec = deployment["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_default_render_has_every_part(rendered):
    docs = rendered["default"]
    deployments = by_kind(docs, "Deployment")
    assert set(deployments) == {f"{FULLNAME}-{c}" for c in ("scheduler", *WORKERS, "postgresql", "redis")}
    services = by_kind(docs, "Service")
    for role, port in zip(WORKERS, (50051, 50052, 50053)):
        svc = services[f"{FULLNAME}-{role}"]["spec"]
        assert svc["clusterIP"] == "None", "worker Services are headless so EndpointSlices list every pod"
        assert {"name": "grpc", "port": port, "targetPort": "grpc", "protocol": "TCP"} in svc["ports"]
    assert services[f"{FULLNAME}-scheduler"]["spec"]["ports"][0]["name"] == "http"
    pvc = by_kind(docs, "PersistentVolumeClaim")[f"{FULLNAME}-artifacts"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert set(by_kind(docs, "PodDisruptionBudget")) == {f"{FULLNAME}-{r}" for r in WORKERS}  # 1 scheduler: none
    assert set(by_kind(docs, "NetworkPolicy")) == {f"{FULLNAME}-{c}" for c in ("scheduler", *WORKERS, "postgresql", "redis")}
    assert set(by_kind(docs, "Secret")) == {f"{FULLNAME}-connections", f"{FULLNAME}-api-token"}
    assert not by_kind(docs, "HorizontalPodAutoscaler") and not by_kind(docs, "Ingress")


def test_scheduler_rbac_allows_reading_endpointslices_only(rendered):
    docs = rendered["default"]
    role = by_kind(docs, "Role")[f"{FULLNAME}-scheduler"]
    assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}]
    binding = by_kind(docs, "RoleBinding")[f"{FULLNAME}-scheduler"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{FULLNAME}-scheduler", "namespace": NAMESPACE}]
    deployments = by_kind(docs, "Deployment")
    scheduler = deployments[f"{FULLNAME}-scheduler"]["spec"]["template"]["spec"]
    assert scheduler["serviceAccountName"] == f"{FULLNAME}-scheduler" and scheduler["automountServiceAccountToken"] is True
    for role_name in WORKERS:
        worker = deployments[f"{FULLNAME}-{role_name}"]["spec"]["template"]["spec"]
        assert worker["automountServiceAccountToken"] is False


def test_scheduler_migrates_first_and_probes_http(rendered):
    scheduler = by_kind(rendered["default"], "Deployment")[f"{FULLNAME}-scheduler"]
    assert scheduler["spec"]["replicas"] == 1
    # leases keep each experiment on one replica: a rolling update keeps the API up
    assert scheduler["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod = scheduler["spec"]["template"]["spec"]
    (migrate,) = pod["initContainers"]
    assert migrate["command"] == ["gradalign", "db", "upgrade"]
    assert _env(migrate)["GRADALIGN_SCHEDULER_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-connections", "key": "database-url"}
    (container,) = pod["containers"]
    assert container["command"] == ["gradalign", "serve", "scheduler"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    env = _env(container)
    assert env["GRADALIGN_SCHEDULER_HOST"]["value"] == "0.0.0.0"
    assert env["GRADALIGN_SCHEDULER_BOOTSTRAP_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-api-token", "key": "bootstrap-token"}
    assert env["GRADALIGN_SCHEDULER_REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"] == "redis-url"
    assert json.loads(env["GRADALIGN_SCHEDULER_SCORING_ADDRESSES"]["value"]) == [f"{FULLNAME}-scoring:50052"]
    assert env["GRADALIGN_SCHEDULER_DISCOVERY"]["value"] == "kubernetes"
    assert env["GRADALIGN_SCHEDULER_DISCOVERY_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_workers_probe_grpc_and_run_hardened(rendered):
    deployments = by_kind(rendered["default"], "Deployment")
    for role, port in zip(WORKERS, (50051, 50052, 50053)):
        pod = deployments[f"{FULLNAME}-{role}"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["command"] == ["gradalign", "serve", role]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": port}, (role, probe)
        env = _env(container)
        prefix = f"GRADALIGN_{role.upper()}_"
        assert env[prefix + "HOST"]["value"] == "0.0.0.0"
        assert env[prefix + "PORT"]["value"] == str(port)
        assert env[prefix + "ARTIFACT_ROOT"]["value"] == "/data/artifacts"
        assert env[prefix + "DEVICE"]["value"] == "cpu"
        assert container["image"] == "gradalign:0.1.0-cpu"
        assert "nvidia.com/gpu" not in json.dumps(container["resources"])
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["artifacts"] == "/data/artifacts"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["artifacts"]["persistentVolumeClaim"]["claimName"] == f"{FULLNAME}-artifacts"
    assert deployments[f"{FULLNAME}-trainer"]["spec"]["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize("values", list(VALUE_SETS))
def test_every_gradalign_container_is_non_root_read_only_without_capabilities(rendered, values):
    for name, deployment in by_kind(rendered[values], "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in _gradalign_containers(deployment):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert sc["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (name, container["name"])
            assert "limits" in container["resources"] and "requests" in container["resources"], (name, container["name"])


def test_network_policies_let_only_the_scheduler_reach_workers_and_databases(rendered):
    policies = by_kind(rendered["default"], "NetworkPolicy")
    scheduler_peer = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gradalign", "app.kubernetes.io/instance": RELEASE,
                                                       "app.kubernetes.io/component": "scheduler"}}}
    for target in (*WORKERS, "postgresql", "redis"):
        rules = policies[f"{FULLNAME}-{target}"]["spec"]["ingress"]
        assert rules[0]["from"] == [scheduler_peer], target
    # metrics: from anywhere by default, from the given peers when set
    assert "from" not in policies[f"{FULLNAME}-scoring"]["spec"]["ingress"][1]
    external = by_kind(rendered["external"], "NetworkPolicy")[f"{FULLNAME}-scoring"]["spec"]["ingress"][1]
    assert external["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}


# --- GPU values ----------------------------------------------------------------------------------


def test_gpu_values_request_gpus_and_schedule_on_gpu_nodes(rendered):
    docs = rendered["gpu"]
    deployments = by_kind(docs, "Deployment")
    assert set(deployments) == {f"{FULLNAME}-{c}" for c in ("scheduler", *WORKERS)}  # external databases
    gpus = {"rollout": 1, "scoring": 1, "trainer": 4}
    for role in WORKERS:
        pod = deployments[f"{FULLNAME}-{role}"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == "gradalign:0.1.0-cuda", role
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus[role]
        assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus[role]
        assert _env(container)[f"GRADALIGN_{role.upper()}_DEVICE"]["value"] == "cuda"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert {v["name"]: v for v in pod["volumes"]}["shm"]["emptyDir"]["medium"] == "Memory"
    assert deployments[f"{FULLNAME}-rollout"]["spec"]["replicas"] == 2
    assert "nodeAffinity" in deployments[f"{FULLNAME}-trainer"]["spec"]["template"]["spec"]["affinity"]
    trainer_env = _env(deployments[f"{FULLNAME}-trainer"]["spec"]["template"]["spec"]["containers"][0])
    assert trainer_env["GRADALIGN_TRAINER_BACKEND"]["value"] == "verl"
    assert trainer_env["GRADALIGN_TRAINER_VERL_N_GPUS_PER_NODE"]["value"] == "4"
    # the scorers are autoscaled: the HPA owns their replica count
    assert "replicas" not in deployments[f"{FULLNAME}-scoring"]["spec"]
    hpa = by_kind(docs, "HorizontalPodAutoscaler")[f"{FULLNAME}-scoring"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{FULLNAME}-scoring"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 8)
    # existing Secrets: the chart creates none
    assert not by_kind(docs, "Secret")
    scheduler_env = _env(deployments[f"{FULLNAME}-scheduler"]["spec"]["template"]["spec"]["containers"][0])
    assert scheduler_env["GRADALIGN_SCHEDULER_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "gradalign-db", "key": "database-url"}
    assert scheduler_env["GRADALIGN_SCHEDULER_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "gradalign-redis", "key": "redis-url"}
    assert scheduler_env["GRADALIGN_SCHEDULER_BOOTSTRAP_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "gradalign-api-token"
    ingress = by_kind(docs, "Ingress")[FULLNAME]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{FULLNAME}-scheduler", "port": {"name": "http"}}


def test_external_values_use_the_given_urls_and_claim(rendered):
    docs = rendered["external"]
    assert f"{FULLNAME}-postgresql" not in by_kind(docs, "Deployment")
    assert not by_kind(docs, "PersistentVolumeClaim") and not by_kind(docs, "PodDisruptionBudget")
    assert by_kind(docs, "Deployment")[f"{FULLNAME}-scheduler"]["spec"]["replicas"] == 2
    secret = by_kind(docs, "Secret")[f"{FULLNAME}-connections"]["stringData"]
    assert secret == {"database-url": "postgresql+psycopg://u:p@db.example.com:5432/gradalign", "redis-url": "redis://redis.example.com:6379/0"}
    assert by_kind(docs, "Secret")[f"{FULLNAME}-api-token"]["stringData"] == {"bootstrap-token": "test-token"}
    pod = by_kind(docs, "Deployment")[f"{FULLNAME}-scoring"]["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["artifacts"]["persistentVolumeClaim"]["claimName"] == "shared-artifacts"
    assert _env(pod["containers"][0])["GRADALIGN_SCORING_DTYPE"]["value"] == "bfloat16"
    scheduler = by_kind(docs, "Deployment")[f"{FULLNAME}-scheduler"]["spec"]["template"]["spec"]
    env = _env(scheduler["containers"][0])
    assert env["GRADALIGN_SCHEDULER_DISCOVERY"]["value"] == "static"
    assert scheduler["automountServiceAccountToken"] is False


def test_chart_discovery_settings_build_a_kubernetes_discovery(rendered, monkeypatch):
    """The scheduler env the chart sets is what services.scheduler.discovery.make_discovery reads."""
    from services.scheduler import discovery
    from services.scheduler.settings import SchedulerSettings

    container = by_kind(rendered["default"], "Deployment")[f"{FULLNAME}-scheduler"]["spec"]["template"]["spec"]["containers"][0]
    for name, entry in _env(container).items():
        if name.startswith("GRADALIGN_SCHEDULER_") and "value" in entry:
            monkeypatch.setenv(name, entry["value"])
    monkeypatch.setenv("GRADALIGN_SCHEDULER_DISCOVERY_NAMESPACE", NAMESPACE)  # the fieldRef
    monkeypatch.setattr(discovery, "_incluster_api", lambda: object())
    d = discovery.make_discovery(SchedulerSettings())
    assert isinstance(d, discovery.KubernetesDiscovery)
    assert d.namespace == NAMESPACE and d.port_name == "grpc" and d.refresh_interval_s == 5.0
    services = by_kind(rendered["default"], "Service")
    assert d.service_names == {role: f"{FULLNAME}-{role}" for role in WORKERS}
    for name in d.service_names.values():
        assert any(p["name"] == "grpc" for p in services[name]["spec"]["ports"])


# --- the bundled Redis needs a password --------------------------------------------------------


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_bundled_redis_requires_the_password_the_scheduler_url_carries(rendered):
    docs = rendered["default"]
    redis = _container(by_kind(docs, "Deployment")[f"{FULLNAME}-redis"])
    command = redis["command"]
    assert "--protected-mode" not in command, "no open Redis: requirepass instead"
    assert command[command.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"  # expanded by the kubelet from the env below
    env = _env(redis)
    password_ref = {"name": f"{FULLNAME}-connections", "key": "redis-password"}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == password_ref
    assert env["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"] == password_ref  # the redis-cli readiness probe
    assert redis["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]
    secret = by_kind(docs, "Secret")[f"{FULLNAME}-connections"]["stringData"]
    password = secret["redis-password"]
    assert re.fullmatch(r"[A-Za-z0-9]{32}", password), "generated: 32 random characters"
    assert secret["redis-url"] == f"redis://:{password}@{FULLNAME}-redis:6379/0"
    # the scheduler (the one service that uses Redis) gets the URL from the Secret, never as a plain value
    scheduler = _container(by_kind(docs, "Deployment")[f"{FULLNAME}-scheduler"])
    assert _env(scheduler)["GRADALIGN_SCHEDULER_REDIS_URL"] == {
        "name": "GRADALIGN_SCHEDULER_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": f"{FULLNAME}-connections", "key": "redis-url"}}}
    for role in WORKERS:
        assert not any("REDIS" in name for name in _env(_container(by_kind(docs, "Deployment")[f"{FULLNAME}-{role}"]))), role


def test_a_given_redis_password_is_encoded_into_the_url(helm, external_values):
    """redis-py decodes the URL the chart writes back to the given password (and SQLAlchemy the PostgreSQL one)."""
    from redis.connection import parse_url
    from sqlalchemy.engine import make_url

    odd = "p@ss w/rd+:%?#"
    docs = manifests(render(helm, ["--set-string", f"redis.auth.password={odd}", "--set-string", f"postgresql.auth.password={odd}"],
                            external_values))
    secret = by_kind(docs, "Secret")[f"{FULLNAME}-connections"]["stringData"]
    assert secret["redis-password"] == odd and secret["postgres-password"] == odd
    parsed = parse_url(secret["redis-url"])
    assert (parsed["password"], parsed["host"], parsed["port"]) == (odd, f"{FULLNAME}-redis", 6379)
    assert make_url(secret["database-url"]).password == odd
    # the pod restarts when the given password changes
    annotations = by_kind(docs, "Deployment")[f"{FULLNAME}-redis"]["spec"]["template"]["metadata"]["annotations"]
    other = by_kind(manifests(render(helm, ["--set-string", "redis.auth.password=other"], external_values)), "Deployment")
    assert other[f"{FULLNAME}-redis"]["spec"]["template"]["metadata"]["annotations"]["checksum/password"] != annotations["checksum/password"]


# --- NetworkPolicies: egress ---------------------------------------------------------------------


def _peer(component: str) -> dict:
    return {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gradalign", "app.kubernetes.io/instance": RELEASE,
                                            "app.kubernetes.io/component": component}}}


DNS_RULE = {
    "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
    "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
}
ANYWHERE = [{"ipBlock": {"cidr": "0.0.0.0/0"}}]


def _tcp(*ports: int) -> list[dict]:
    return [{"port": p, "protocol": "TCP"} for p in ports]


@pytest.mark.parametrize("values", list(VALUE_SETS))
def test_every_network_policy_restricts_egress_and_never_allows_everything(rendered, values):
    policies = by_kind(rendered[values], "NetworkPolicy")
    deployments = by_kind(rendered[values], "Deployment")
    # networkPolicy.enabled is on by default: every pod of the chart is selected by a policy with Egress
    assert {name for name, p in policies.items() if "Egress" in p["spec"]["policyTypes"]} == set(deployments)
    for name, policy in policies.items():
        for rule in policy["spec"]["egress"]:
            assert rule.get("to"), f"{name}: an egress rule without `to` allows every destination: {rule}"
            assert rule.get("ports"), f"{name}: an egress rule without ports: {rule}"


def test_default_egress_of_each_pod(rendered):
    policies = by_kind(rendered["default"], "NetworkPolicy")
    scheduler = policies[f"{FULLNAME}-scheduler"]["spec"]
    assert scheduler["policyTypes"] == ["Ingress", "Egress"]
    assert scheduler["egress"] == [
        DNS_RULE,
        {"to": [_peer("rollout")], "ports": _tcp(50051)},
        {"to": [_peer("scoring")], "ports": _tcp(50052)},
        {"to": [_peer("trainer")], "ports": _tcp(50053)},
        {"to": [_peer("postgresql")], "ports": _tcp(5432)},
        {"to": [_peer("redis")], "ports": _tcp(6379)},
        # the Kubernetes API for EndpointSlice discovery (networkPolicy.kubernetesApi: narrow it to your API server)
        {"to": ANYWHERE, "ports": _tcp(443, 6443)},
    ]
    for role in WORKERS:  # the artifact store is a volume: DNS is all a worker needs (no judge configured)
        assert policies[f"{FULLNAME}-{role}"]["spec"]["egress"] == [DNS_RULE], role
    for db in ("postgresql", "redis"):
        spec = policies[f"{FULLNAME}-{db}"]["spec"]
        assert spec["policyTypes"] == ["Ingress", "Egress"] and spec["egress"] == [], db


def test_external_egress_reaches_the_configured_database_redis_and_judge(rendered):
    policies = by_kind(rendered["external"], "NetworkPolicy")
    assert set(policies) == {f"{FULLNAME}-{c}" for c in ("scheduler", *WORKERS)}
    egress = policies[f"{FULLNAME}-scheduler"]["spec"]["egress"]
    # no bundled databases, static discovery: no pod peers for them and no Kubernetes API rule
    assert {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "databases"}}}],
            "ports": _tcp(5432, 6432)} in egress
    assert {"to": ANYWHERE, "ports": _tcp(6379)} in egress
    assert not any(_peer(db) in rule["to"] for rule in egress for db in ("postgresql", "redis"))
    assert not any(443 in [p["port"] for p in rule["ports"]] for rule in egress)
    assert len(egress) == 1 + 3 + 2
    judge = {"to": [{"ipBlock": {"cidr": JUDGE_CIDR}}], "ports": _tcp(8443)}
    assert policies[f"{FULLNAME}-rollout"]["spec"]["egress"] == [DNS_RULE, judge]
    for role in ("scoring", "trainer"):  # only the rollout workers call the judge
        assert policies[f"{FULLNAME}-{role}"]["spec"]["egress"] == [DNS_RULE], role


def test_egress_options(helm, external_values):
    docs = manifests(render(helm, [
        "--set", "networkPolicy.kubernetesApi.to[0].ipBlock.cidr=10.0.0.10/32", "--set", "networkPolicy.kubernetesApi.ports={6443}",
        "--set", "networkPolicy.dns.to[0].ipBlock.cidr=169.254.20.10/32",
        "--set", "networkPolicy.workerEgress[0].to[0].ipBlock.cidr=10.1.0.0/16", "--set", "networkPolicy.workerEgress[0].ports[0].port=4318",
    ], external_values))
    policies = by_kind(docs, "NetworkPolicy")
    scheduler = policies[f"{FULLNAME}-scheduler"]["spec"]["egress"]
    assert scheduler[-1] == {"to": [{"ipBlock": {"cidr": "10.0.0.10/32"}}], "ports": _tcp(6443)}
    assert scheduler[0]["to"] == [{"ipBlock": {"cidr": "169.254.20.10/32"}}]
    assert policies[f"{FULLNAME}-trainer"]["spec"]["egress"][-1] == {"to": [{"ipBlock": {"cidr": "10.1.0.0/16"}}], "ports": [{"port": 4318}]}
    # a judge URL without a judge peer: no rule (nothing opens by default), and a warning at install
    docs = manifests(render(helm, ["--set", "rollout.settings.JUDGE_BASE_URL=https://judge.example.com/v1"], external_values))
    assert by_kind(docs, "NetworkPolicy")[f"{FULLNAME}-rollout"]["spec"]["egress"] == [DNS_RULE]
    assert not by_kind(manifests(render(helm, ["--set", "networkPolicy.enabled=false"], external_values)), "NetworkPolicy")


# --- the upload limit, the Ingress and the event stream -----------------------------------------


def _scheduler_settings(container: dict, monkeypatch):
    from services.scheduler.settings import SchedulerSettings

    for name, entry in _env(container).items():
        if name.startswith("GRADALIGN_SCHEDULER_") and "value" in entry:
            monkeypatch.setenv(name, entry["value"])
    return SchedulerSettings()


@pytest.mark.parametrize(("values", "limit", "read_timeout"), [("gpu", 1 << 30, "3600"), ("external", 5 << 30, "86400")])
def test_ingress_body_size_is_the_apis_upload_limit(rendered, monkeypatch, values, limit, read_timeout):
    docs = rendered[values]
    annotations = by_kind(docs, "Ingress")[FULLNAME]["metadata"]["annotations"]
    container = _container(by_kind(docs, "Deployment")[f"{FULLNAME}-scheduler"])
    # ingress-nginx' default (1m) would refuse uploads the API accepts: both come from scheduler.maxUploadBytes
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == str(limit)
    assert _env(container)["GRADALIGN_SCHEDULER_MAX_UPLOAD_BYTES"]["value"] == str(limit)
    assert _scheduler_settings(container, monkeypatch).max_upload_bytes == limit
    # the live events (server-sent, idle between events) are neither buffered nor cut after nginx' 60 s
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == read_timeout  # a given annotation wins
    assert annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "3600"


def test_default_upload_limit_is_the_schedulers_own_default(rendered, monkeypatch):
    from services.scheduler.settings import SchedulerSettings

    container = _container(by_kind(rendered["default"], "Deployment")[f"{FULLNAME}-scheduler"])
    assert int(_env(container)["GRADALIGN_SCHEDULER_MAX_UPLOAD_BYTES"]["value"]) == SchedulerSettings.model_fields["max_upload_bytes"].default


# --- every variable the chart sets is read by the code ------------------------------------------


@pytest.mark.parametrize("values", list(VALUE_SETS))
def test_every_scheduler_variable_the_chart_sets_is_a_scheduler_setting(rendered, values):
    """A variable no code reads (like the former GRADALIGN_SCHEDULER_API_TOKENS_FILE) is a setting that silently does nothing."""
    from services.scheduler.settings import SchedulerSettings

    scheduler = by_kind(rendered[values], "Deployment")[f"{FULLNAME}-scheduler"]
    for container in _gradalign_containers(scheduler):
        for name in _env(container):
            if name.startswith("GRADALIGN_SCHEDULER_"):
                assert name.removeprefix("GRADALIGN_SCHEDULER_").lower() in SchedulerSettings.model_fields, (values, name)
    assert not any("TOKENS_FILE" in json.dumps(doc) for doc in rendered[values])


def test_docs_describe_what_users_must_set():
    docs = (ROOT / "docs" / "deploy.md").read_text()
    for needle in ("scheduler.maxUploadBytes", "redis.auth.password", "networkPolicy.kubernetesApi", "networkPolicy.judge",
                   "networkPolicy.externalDatabase", "networkPolicy.dns", "advisory lock"):
        assert needle in docs, needle
    for text in (docs, (CHART / "values.yaml").read_text(), (CHART / "values.schema.json").read_text()):
        assert "tokensFileEnv" not in text and "API_TOKENS_FILE" not in text


# --- values.schema.json: wrong values fail at install ------------------------------------------


BAD_VALUES = {
    "unknown key": ("scoring:\n  replicas: 2\n", "replicas"),
    "wrong type": ("rollout:\n  replicaCount: two\n", "replicaCount"),
    "negative gpu": ("trainer:\n  gpu: -1\n", "gpu"),
    "bad enum": ("rollout:\n  backend: tensorrt\n", "backend"),
    "two trainers": ("trainer:\n  replicaCount: 2\n", "replicaCount"),
    "bad quantity": ("scoring:\n  resources:\n    limits:\n      memory: lots\n", "memory"),
    "bad port": ("scheduler:\n  port: 70000\n", "port"),
    "bad pull policy": ("cudaImage:\n  pullPolicy: Sometimes\n", "pullPolicy"),
    "bad discovery": ("scheduler:\n  discovery:\n    mode: consul\n", "mode"),
    "unknown top-level": ("workers:\n  gpu: 1\n", "workers"),
    # no code reads GRADALIGN_SCHEDULER_API_TOKENS_FILE: the value that set it is gone
    "removed tokensFileEnv": ("auth:\n  tokensFileEnv: GRADALIGN_SCHEDULER_API_TOKENS_FILE\n", "tokensFileEnv"),
    "bad upload limit": ("scheduler:\n  maxUploadBytes: 0\n", "maxUploadBytes"),
    "judge port as text": ("networkPolicy:\n  judge:\n    to: []\n    ports: [https]\n", "ports"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_values_violating_the_schema_fail_template_and_lint(helm, case, tmp_path):
    text, key = BAD_VALUES[case]
    bad = tmp_path / "bad-values.yaml"
    bad.write_text(text)
    for command in (["template", RELEASE, str(CHART)], ["lint", "--strict", str(CHART)]):
        proc = helm(*command, "-f", str(bad), check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, f"helm {command[0]} accepted {case!r}:\n{out}"
        assert "schema" in out and key in out, out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "postgresql.enabled=false"], "no database"),
        (["--set", "externalDatabase.url=postgresql+psycopg://x@h/db"], "choose one database"),
        (["--set", "externalRedis.url=redis://h:6379/0"], "choose one Redis"),
        (["--set", "redis.enabled=false", "--set", "scheduler.replicaCount=2"], "needs Redis"),
        (["--set", "scoring.autoscaling.enabled=true", "--set", "scoring.autoscaling.minReplicas=5",
          "--set", "scoring.autoscaling.maxReplicas=2"], "minReplicas"),
        # the upload limit has one source, so the API and the proxy cannot disagree
        (["--set", "scheduler.settings.MAX_UPLOAD_BYTES=10"], "scheduler.maxUploadBytes"),
        (["--set", "scheduler.extraEnv[0].name=GRADALIGN_SCHEDULER_MAX_UPLOAD_BYTES", "--set", "scheduler.extraEnv[0].value=10"],
         "scheduler.maxUploadBytes"),
        (["--set", "ingress.enabled=true", "--set-string", "ingress.annotations.nginx\\.ingress\\.kubernetes\\.io/proxy-body-size=8m"],
         "scheduler.maxUploadBytes"),
    ],
)
def test_inconsistent_values_fail_with_a_message(helm, args, message):
    proc = helm("template", RELEASE, str(CHART), "--kube-version", KUBE_VERSIONS[0], *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_notes_say_how_to_reach_the_dashboard(helm):
    """NOTES.txt as `helm install` prints it (a client-side dry run: Helm >= 3.13, no cluster)."""
    version = helm("version", "--short").stdout.strip()
    major, minor = (int(x) for x in re.match(r"v(\d+)\.(\d+)", version).groups())
    if (major, minor) < (3, 13):
        pytest.fail(f"{version} cannot render NOTES.txt without a cluster (needs `install --dry-run=client`, Helm >= 3.13)", pytrace=False)
    out = helm("install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE).stdout
    notes = out[out.index("NOTES:"):]
    assert f"kubectl port-forward -n {NAMESPACE} svc/{FULLNAME}-scheduler 8000:8000" in notes
    assert "http://127.0.0.1:8000/" in notes and "dashboard" in notes
    assert f"kubectl get secret -n {NAMESPACE} {FULLNAME}-api-token" in notes
    assert "WARNING: the bundled PostgreSQL and Redis" in notes
    out = helm("install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE, "-f", str(GPU_VALUES), "--set", "ingress.enabled=true").stdout
    notes = out[out.index("NOTES:"):]
    assert "https://gradalign.example.com/" in notes and "port-forward" not in notes and "WARNING" not in notes


# --- docker-compose.yml --------------------------------------------------------------------------


def _check_compose(path: Path) -> subprocess.CompletedProcess:
    tool = _tool(deploy_tools.check_jsonschema)
    return subprocess.run([str(tool), "--builtin-schema", "vendor.compose-spec", str(path)], capture_output=True, text=True, timeout=120)


def test_compose_file_matches_the_compose_spec():
    proc = _check_compose(COMPOSE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_validation_catches_mistakes(tmp_path):
    """The validator is strict: a misspelt service key fails (so the check above means something)."""
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE.read_text().replace('command: ["gradalign", "serve", "trainer"]', 'comand: ["gradalign", "serve", "trainer"]', 1))
    proc = _check_compose(bad)
    assert proc.returncode != 0 and "comand" in proc.stdout + proc.stderr


def test_compose_services():
    compose = yaml.safe_load(COMPOSE.read_text())  # PyYAML resolves the << merge keys like compose does
    services = compose["services"]
    assert {"postgres", "redis", "scheduler", *WORKERS, *(f"{w}-gpu" for w in WORKERS)} == set(services)
    for name in ("postgres", "redis"):
        assert re.search(r":[\w.-]+@sha256:[0-9a-f]{64}$", services[name]["image"]), name
    scheduler = services["scheduler"]
    assert re.search(r"gradalign db upgrade && exec gradalign serve scheduler", " ".join(scheduler["command"]))
    assert scheduler["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert scheduler["environment"]["GRADALIGN_SCHEDULER_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "artifacts" in compose["volumes"]
    for name in ("scheduler", *WORKERS, *(f"{w}-gpu" for w in WORKERS)):
        svc = services[name]
        assert "artifacts:/data/artifacts" in svc["volumes"], name
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name
    for role in WORKERS:
        cpu, gpu = services[role], services[f"{role}-gpu"]
        assert cpu["build"]["dockerfile"] == "docker/Dockerfile.cpu" and "profiles" not in cpu
        assert cpu["command"] == gpu["command"] == ["gradalign", "serve", role]
        assert cpu["environment"][f"GRADALIGN_{role.upper()}_DEVICE"] == "cpu"
        assert gpu["profiles"] == ["gpu"]
        assert gpu["build"]["dockerfile"] == "docker/Dockerfile.cuda"
        assert gpu["environment"][f"GRADALIGN_{role.upper()}_DEVICE"] == "cuda"
        (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert gpu["networks"]["default"]["aliases"] == [role]  # the scheduler's addresses name either set


# --- Dockerfiles ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    tool = _tool(deploy_tools.hadolint)
    proc = subprocess.run([str(tool), "--failure-threshold", "error", str(dockerfile)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_policies(dockerfile):
    text = dockerfile.read_text()
    # base images pinned by tag and digest (through the ARG the FROM lines use)
    bases = re.findall(r"^ARG \w+_IMAGE=(\S+)$", text, re.M)
    assert bases and all(re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", b) for b in bases), bases
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "multi-stage"
    assert re.search(r"^FROM \$\{\w+_IMAGE\} AS runtime$", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] == "10001:10001", "the final stage runs as a fixed non-root UID"
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[\"python\", \"/opt/gradalign/share/healthcheck.py\"\]", text, re.M)
    # no secrets baked in: no ENV/ARG named like a credential
    assert not re.search(r"^(ENV|ARG)\s+\S*(PASSWORD|SECRET|TOKEN|API_KEY)", text, re.M | re.I)
    assert "check_install.py /src" in text
    if dockerfile.name == "Dockerfile.cpu":
        torch = text.index('"torch==${TORCH_VERSION}"')
        assert "ARG TORCH_VERSION=2.13.0" in text and "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
        assert torch < text.index("pip install --no-cache-dir --no-deps /src"), "torch before the project"
    else:
        # the pinned stack as locked, checked where it is built and where it runs
        assert "RUN pip install --no-cache-dir -r /src/requirements/gpu.lock" in text
        assert "check_gpu_stack.py --lock /src/requirements/gpu.lock" in text
        runtime = text[text.index("AS runtime"):]
        assert "check_gpu_stack.py --lock /opt/gradalign/share/gpu.lock --compiler" in runtime
        # Triton compiles its launcher at the first kernel: a C compiler and Python's headers at run time
        apt = re.search(r"apt-get install[^\n]*", runtime).group(0)
        assert {"gcc", "libc6-dev", "python3.12-dev"} <= set(apt.split()), apt


def test_dockerignore_is_an_allow_list():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {
        "pyproject.toml", "README.md", "gradalign_common", "gradalign_tools", "services", "protos",
        "docker/check_install.py", "docker/check_gpu_stack.py", "docker/healthcheck.py", "requirements/gpu.lock",
    }
    # everything the Dockerfiles COPY from the context is allowed in
    for dockerfile in DOCKERFILES:
        for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile.read_text(), re.M):
            for source in sources.split():
                assert source.rstrip("/") in allowed, (dockerfile.name, source)


def test_wheel_packs_every_source_file(tmp_path):
    """The images install the project non-editable: every file of the packages must be in the wheel.

    Data files (Alembic migrations, the dashboard's static files) need package-data in
    pyproject.toml; without it the image build fails (docker/check_install.py) or a service breaks
    at run time. Built from a copy of the sources, so the work tree gets no build/ folder.
    """
    import shutil
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("gradalign_common", "gradalign_tools", "services", "protos"):
        shutil.copytree(ROOT / package, src / package, ignore=ignore)
    try:
        import setuptools  # noqa: F401 - the build backend, when the venv has it
        isolation = ["--no-build-isolation"]
    except ImportError:
        isolation = []  # pip fetches setuptools from the package index
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *isolation, "-w", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("gradalign-*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(
        str(path.relative_to(src))
        for package in ("gradalign_common", "gradalign_tools", "services")
        for path in (src / package).rglob("*")
        if path.is_file() and str(path.relative_to(src)) not in packed
    )
    assert not missing, f"not in the wheel (add them to [tool.setuptools.package-data] in pyproject.toml): {missing}"


# --- the images' health check script -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("GRADALIGN_")}
    full.update(env)
    return subprocess.run([sys.executable, str(HEALTHCHECK)], capture_output=True, text=True, env=full, timeout=60)


def test_healthcheck_of_a_grpc_worker():
    from grpc_health.v1 import health_pb2

    from gradalign_common.grpc_utils import build_server

    server, health, port = build_server("127.0.0.1", 0, ["gradalign.v1.ScoringService"])
    server.start()
    try:
        env = {"GRADALIGN_SERVICE": "scoring", "GRADALIGN_SCORING_PORT": str(port)}
        health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        proc = _healthcheck(env)
        assert proc.returncode == 1 and "NOT_SERVING" in proc.stderr, proc.stderr
        health.set("", health_pb2.HealthCheckResponse.SERVING)
        proc = _healthcheck(env)
        assert proc.returncode == 0, proc.stderr
    finally:
        server.stop(0)
    proc = _healthcheck({"GRADALIGN_SERVICE": "scoring", "GRADALIGN_SCORING_PORT": str(_free_port())})
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stderr, proc.stderr


class _Healthz(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        code = type(self).status if self.path == "/healthz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_healthcheck_of_the_scheduler():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {"GRADALIGN_SERVICE": "scheduler", "GRADALIGN_SCHEDULER_PORT": str(server.server_address[1])}
        _Healthz.status = 200
        assert _healthcheck(env).returncode == 0
        _Healthz.status = 503
        proc = _healthcheck(env)
        assert proc.returncode == 1 and "503" in proc.stderr, proc.stderr
    finally:
        server.shutdown()
        server.server_close()
