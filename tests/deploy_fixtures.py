"""Shared helpers of the deployment tests (test_chart_*.py, test_compose.py, test_images.py).

The chart's paths and release names, the value sets rendered, helm run in a temporary home, and
accessors of the rendered objects. The chart test modules turn `helm_runner`, `write_external_values`
and `render_value_sets` into their module-scoped fixtures `helm`, `external_values` and `rendered`
(a fixture outside conftest.py belongs to one module, so each renders the chart once for itself).

Tools come from PyPI packages of the dev extra (tests/deploy_tools.py); `require_tool` turns a
missing one into a test failure with what to install, never a skip.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

import deploy_tools

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "gradalign"
GPU_VALUES = CHART / "values-gpu.yaml"
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


def require_tool(fn):
    """fn() (a deploy_tools lookup); a missing tool fails the test with what to install."""
    try:
        return fn()
    except deploy_tools.ToolMissing as exc:
        pytest.fail(str(exc), pytrace=False)


def helm_runner(tmp_path_factory):
    """The fixture `helm`: run(*args, check=True) runs helm with its cache/config/data folders in a temp
    dir (no state left in $HOME) and fails the test when it fails, unless check=False."""
    home = tmp_path_factory.mktemp("helm-home")
    env = dict(os.environ)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[var] = str(home / var.lower())
    binary = require_tool(deploy_tools.helm)

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, timeout=120)
        if check and proc.returncode != 0:
            pytest.fail(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}", pytrace=False)
        return proc

    version = run("version", "--short").stdout.strip()
    assert re.match(r"v[34]\.", version), version
    return run


# --- rendering -----------------------------------------------------------------------------------


def write_external_values(tmp_path_factory) -> Path:
    """The fixture `external_values`: EXTERNAL_VALUES as a values file."""
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


def render_value_sets(helm, external_values) -> dict[str, list[dict]]:
    """The fixture `rendered`: the objects each of VALUE_SETS renders."""
    return {name: manifests(render(helm, args, external_values)) for name, args in VALUE_SETS.items()}


# --- the rendered objects ------------------------------------------------------------------------


def gradalign_containers(deployment: dict) -> list[dict]:
    spec = deployment["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def container_of(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}
