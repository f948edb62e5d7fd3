"""The chart with trainer.ray.enabled: a KubeRay RayCluster, the trainer configured to submit verl to it,
and NetworkPolicies that let the trainer reach the head and Ray's pods reach each other.

`helm lint --strict` and `helm template` with Ray on (the GPU values plus 2 nodes x 8 GPUs) and off.
The built-in kinds are validated with kubernetes-validate, as tests/test_chart_render.py does; the
RayCluster (a custom resource: no registry package provides KubeRay's CRD schema) is checked for
the fields the KubeRay v1 API reference requires (ray.io/v1 RayCluster: headGroupSpec with
rayStartParams and a pod template, workerGroupSpecs with groupName, replicas, minReplicas,
maxReplicas, rayStartParams and a pod template; rayStartParams' values are strings), and its two
pod templates are validated by kubernetes-validate as v1 PodTemplates. helm and kubernetes-validate
come from the dev extra (tests/deploy_tools.py); a missing one fails, never skips.
"""

from __future__ import annotations

import subprocess
from urllib.parse import urlparse

import pytest
import yaml

import deploy_tools
from deploy_fixtures import CHART, FULLNAME, GPU_VALUES, KUBE_VERSIONS, NAMESPACE, RELEASE, by_kind, container_of, env_of
from deploy_fixtures import helm_runner, manifests, require_tool

helm = pytest.fixture(scope="module")(helm_runner)

RAY_VALUES = """
trainer:
  gpu: 0
  ray:
    enabled: true
    workers:
      replicas: 2
      gpusPerNode: 8
      shmSize: 64Gi
      nodeSelector: {nvidia.com/gpu.present: "true"}
      tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
    jobEnv: {NCCL_DEBUG: WARN}
networkPolicy:
  rayDashboardFrom:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ops}}
"""
RAY_CLUSTER = f"{FULLNAME}-ray"
HEAD_SERVICE = f"{RAY_CLUSTER}-head-svc"  # the Service KubeRay creates for the head
RAY_SELECTOR = {"app.kubernetes.io/name": "gradalign", "app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/component": "ray"}


def _template(helm, *args: str, check: bool = True):
    return helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSIONS[0], *args, check=check)


@pytest.fixture(scope="module")
def ray_values(tmp_path_factory):
    path = tmp_path_factory.mktemp("ray-values") / "ray.yaml"
    path.write_text(RAY_VALUES)
    return ["-f", str(GPU_VALUES), "-f", str(path)]


@pytest.fixture(scope="module")
def ray_docs(helm, ray_values) -> list[dict]:
    return manifests(_template(helm, *ray_values).stdout)


def _validate(objects: list[dict], path) -> None:
    validator = require_tool(deploy_tools.kubernetes_validate)
    path.write_text(yaml.safe_dump_all(objects))
    for version in KUBE_VERSIONS:
        proc = subprocess.run([str(validator), "--strict", "-k", version, str(path)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"kubernetes-validate {version}:\n{proc.stdout}\n{proc.stderr}"
        assert proc.stdout.count(" passed for resource ") == len(objects), proc.stdout


def test_helm_lint_with_ray(helm, ray_values):
    assert "0 chart(s) failed" in helm("lint", "--strict", str(CHART), *ray_values).stdout


def test_the_built_in_kinds_rendered_with_ray_are_valid_kubernetes(ray_docs, tmp_path):
    built_in = [d for d in ray_docs if d["kind"] != "RayCluster"]
    assert len(built_in) == len(ray_docs) - 1
    _validate(built_in, tmp_path / "ray-built-in.yaml")


def test_the_raycluster_has_what_kuberay_requires(ray_docs, tmp_path):
    [cluster] = by_kind(ray_docs, "RayCluster").values()
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["name"] == RAY_CLUSTER
    spec = cluster["spec"]
    assert spec["rayVersion"] == "2.60.0"  # the Ray of the CUDA image
    head = spec["headGroupSpec"]
    [workers] = spec["workerGroupSpecs"]
    for group in (head, workers):
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["name"] and c["image"].endswith("-cuda") for c in containers)
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0" and head["rayStartParams"]["num-cpus"] == "0"
    assert {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]} == {
        "gcs-server": 6379,
        "dashboard": 8265,
        "client": 10001,
    }
    assert workers["groupName"] == "gpu" and workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 2
    pod = workers["template"]["spec"]
    [worker] = pod["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 8 and worker["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    for group in (head, workers):  # the artifact store at the trainer's path; hardened like every GradAlign pod
        template = group["template"]
        assert {k: template["metadata"]["labels"][k] for k in RAY_SELECTOR} == RAY_SELECTOR
        (container,) = template["spec"]["containers"]
        assert {"name": "artifacts", "mountPath": "/data/artifacts"} in container["volumeMounts"]
        claims = [v for v in template["spec"]["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [{"name": "artifacts", "persistentVolumeClaim": {"claimName": f"{FULLNAME}-artifacts"}}]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert template["spec"]["automountServiceAccountToken"] is False
    assert {"name": "shm", "mountPath": "/dev/shm"} in worker["volumeMounts"]
    # both pod templates are valid Kubernetes (as v1 PodTemplates)
    pod_templates = [
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{RAY_CLUSTER}-{name}"}, "template": group["template"]}
        for name, group in (("head", head), ("gpu", workers))
    ]
    _validate(pod_templates, tmp_path / "ray-pod-templates.yaml")


def test_the_trainer_submits_to_the_head(ray_docs, monkeypatch):
    from services.trainer.settings import TrainerSettings

    container = container_of(by_kind(ray_docs, "Deployment")[f"{FULLNAME}-trainer"])
    env = {name: e["value"] for name, e in env_of(container).items() if "value" in e}
    address = urlparse(env["GRADALIGN_TRAINER_RAY_ADDRESS"])
    assert (address.scheme, address.hostname, address.port) == ("http", f"{HEAD_SERVICE}.{NAMESPACE}.svc", 8265)
    assert env["GRADALIGN_TRAINER_VERL_LAUNCHER"] == "ray" and env["GRADALIGN_TRAINER_BACKEND"] == "verl"
    assert env["GRADALIGN_TRAINER_VERL_NNODES"] == "2" and env["GRADALIGN_TRAINER_VERL_N_GPUS_PER_NODE"] == "8"
    assert container["image"].endswith("-cuda")  # it runs verl's model merger
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})  # and needs no GPU of its own
    # what the chart sets is what the trainer reads (and accepts at start-up)
    for name, value in env.items():
        if name.startswith("GRADALIGN_TRAINER_"):
            assert name.removeprefix("GRADALIGN_TRAINER_").lower() in TrainerSettings.model_fields, name
            monkeypatch.setenv(name, value)
    settings = TrainerSettings()
    assert settings.verl_launcher == "ray" and settings.ray_env_vars == {"NCCL_DEBUG": "WARN"}
    assert settings.verl_options().n_gpus == 16


def test_network_policies_let_the_trainer_reach_the_head_and_ray_pods_each_other(ray_docs):
    policies = by_kind(ray_docs, "NetworkPolicy")
    head = {**RAY_SELECTOR, "gradalign.io/ray-node": "head"}
    trainer_egress = policies[f"{FULLNAME}-trainer"]["spec"]["egress"]
    assert {"to": [{"podSelector": {"matchLabels": head}}], "ports": [{"port": 8265, "protocol": "TCP"}]} in trainer_egress
    ray = policies[RAY_CLUSTER]["spec"]
    assert ray["podSelector"] == {"matchLabels": RAY_SELECTOR} and ray["policyTypes"] == ["Ingress", "Egress"]
    ray_pods = [{"podSelector": {"matchLabels": RAY_SELECTOR}}]
    trainer = {"podSelector": {"matchLabels": {**RAY_SELECTOR, "app.kubernetes.io/component": "trainer"}}}
    ops = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}}}
    assert ray["ingress"] == [
        {"from": ray_pods},  # every port among Ray's pods
        {"from": [trainer, ops], "ports": [{"port": 8265, "protocol": "TCP"}]},
    ]
    assert ray["egress"][1:] == [{"to": ray_pods}] and ray["egress"][0]["ports"][0]["port"] == 53  # DNS, each other
    for rule in ray["egress"]:
        assert rule.get("to"), f"an egress rule without `to` allows every destination: {rule}"
    # the Ray pods carry the labels the policies select
    [cluster] = by_kind(ray_docs, "RayCluster").values()
    labels = cluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert {k: labels[k] for k in head} == head


@pytest.mark.parametrize("values", ["default", "gpu"])
def test_without_ray_nothing_of_it_is_rendered(helm, values):
    docs = manifests(_template(helm, *(["-f", str(GPU_VALUES)] if values == "gpu" else [])).stdout)
    assert not by_kind(docs, "RayCluster") and RAY_CLUSTER not in by_kind(docs, "NetworkPolicy")
    env = env_of(container_of(by_kind(docs, "Deployment")[f"{FULLNAME}-trainer"]))
    assert not any(name.startswith(("GRADALIGN_TRAINER_RAY_", "GRADALIGN_TRAINER_VERL_LAUNCHER")) for name in env)
    trainer_policy = by_kind(docs, "NetworkPolicy")[f"{FULLNAME}-trainer"]["spec"]
    assert "8265" not in yaml.safe_dump(trainer_policy)


def test_ray_values_are_checked(helm, ray_values):
    proc = _template(helm, *ray_values, "--set", "trainer.backend=torch", check=False)
    assert proc.returncode != 0 and "trainer.ray.enabled" in proc.stderr and "trainer.backend=verl" in proc.stderr
    proc = _template(helm, *ray_values, "--set", "trainer.ray.workers.gpusPerNode=0", check=False)
    assert proc.returncode != 0 and "schema" in proc.stderr and "gpusPerNode" in proc.stderr
    proc = _template(helm, *ray_values, "--set", "trainer.ray.head.replicas=2", check=False)
    assert proc.returncode != 0 and "schema" in proc.stderr
