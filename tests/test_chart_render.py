"""The Helm chart charts/gradalign: `helm lint`, every rendered object valid Kubernetes, and what the
default, GPU and external value sets render (the scheduler, the workers, their Services, RBAC and
discovery).

helm (unpacked from the aws-cdk kubectl-layer wheel) and kubernetes-validate come from the dev
extra (tests/deploy_tools.py); a missing tool is a test failure with what to install, never a skip.
The value sets and the helpers are in tests/deploy_fixtures.py.
"""

from __future__ import annotations

import json
import subprocess

import pytest

import deploy_tools
from deploy_fixtures import CHART, FULLNAME, GPU_VALUES, KUBE_VERSIONS, NAMESPACE, VALUE_SETS, WORKERS, by_kind, env_of
from deploy_fixtures import helm_runner, manifests, render, render_value_sets, require_tool, write_external_values


# the module's fixtures: helm, and the objects each value set renders (once per module)
helm = pytest.fixture(scope="module")(helm_runner)
external_values = pytest.fixture(scope="module")(write_external_values)
rendered = pytest.fixture(scope="module")(render_value_sets)


# --- helm lint / template / kubernetes-validate --------------------------------------------------


@pytest.mark.parametrize("values", ["default", "gpu"])
def test_helm_lint(helm, values):
    args = ["-f", str(GPU_VALUES)] if values == "gpu" else []
    out = helm("lint", "--strict", str(CHART), *args).stdout
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("values", list(VALUE_SETS))
def test_rendered_manifests_are_valid_kubernetes(helm, values, tmp_path, external_values):
    """Every rendered object validates (strictly: no unknown fields) against the newest and the oldest supported API."""
    validator = require_tool(deploy_tools.kubernetes_validate)
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
    assert env_of(migrate)["GRADALIGN_SCHEDULER_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-connections", "key": "database-url"}
    (container,) = pod["containers"]
    assert container["command"] == ["gradalign", "serve", "scheduler"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    env = env_of(container)
    assert env["GRADALIGN_SCHEDULER_HOST"]["value"] == "0.0.0.0"
    assert env["GRADALIGN_SCHEDULER_BOOTSTRAP_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-api-token", "key": "bootstrap-token"}
    assert env["GRADALIGN_SCHEDULER_REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"] == "redis-url"
    assert json.loads(env["GRADALIGN_SCHEDULER_SCORING_ADDRESSES"]["value"]) == [f"{FULLNAME}-scoring:50052"]
    assert env["GRADALIGN_SCHEDULER_DISCOVERY"]["value"] == "kubernetes"
    assert env["GRADALIGN_SCHEDULER_DISCOVERY_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # experiments' models and dataset files lie in the artifact store every pod mounts
    assert env["GRADALIGN_SCHEDULER_MODELS_ROOT"]["value"] == "/data/artifacts/models"
    assert env["GRADALIGN_SCHEDULER_DATA_ROOT"]["value"] == "/data/artifacts/data"


def test_workers_probe_grpc_and_run_hardened(rendered):
    deployments = by_kind(rendered["default"], "Deployment")
    for role, port in zip(WORKERS, (50051, 50052, 50053)):
        pod = deployments[f"{FULLNAME}-{role}"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["command"] == ["gradalign", "serve", role]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": port}, (role, probe)
        env = env_of(container)
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


# --- GPU and external values ---------------------------------------------------------------------


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
        assert env_of(container)[f"GRADALIGN_{role.upper()}_DEVICE"]["value"] == "cuda"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert {v["name"]: v for v in pod["volumes"]}["shm"]["emptyDir"]["medium"] == "Memory"
    assert deployments[f"{FULLNAME}-rollout"]["spec"]["replicas"] == 2
    assert "nodeAffinity" in deployments[f"{FULLNAME}-trainer"]["spec"]["template"]["spec"]["affinity"]
    trainer_env = env_of(deployments[f"{FULLNAME}-trainer"]["spec"]["template"]["spec"]["containers"][0])
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
    scheduler_env = env_of(deployments[f"{FULLNAME}-scheduler"]["spec"]["template"]["spec"]["containers"][0])
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
    assert env_of(pod["containers"][0])["GRADALIGN_SCORING_DTYPE"]["value"] == "bfloat16"
    scheduler = by_kind(docs, "Deployment")[f"{FULLNAME}-scheduler"]["spec"]["template"]["spec"]
    env = env_of(scheduler["containers"][0])
    assert env["GRADALIGN_SCHEDULER_DISCOVERY"]["value"] == "static"
    assert scheduler["automountServiceAccountToken"] is False


def test_chart_discovery_settings_build_a_kubernetes_discovery(rendered, monkeypatch):
    """The scheduler env the chart sets is what services.scheduler.discovery.make_discovery reads."""
    from services.scheduler import discovery
    from services.scheduler.settings import SchedulerSettings

    container = by_kind(rendered["default"], "Deployment")[f"{FULLNAME}-scheduler"]["spec"]["template"]["spec"]["containers"][0]
    for name, entry in env_of(container).items():
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
