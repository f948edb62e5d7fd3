"""The scorers' HorizontalPodAutoscaler and the workers' drain in the Helm chart: the HPA never scales on CPU
use (no default metric, CPU/memory Resource metrics refused, enabling it without metrics fails with a
message), the queue-depth values and prometheus-adapter rule of docs/deploy.md render a valid HPA on the
scheduler's own metrics, scale-down is conservative by default, and each worker's terminationGracePeriodSeconds
covers its drain time (derived from shutdownGraceSeconds, or the render fails).

helm and kubernetes-validate come from the dev extra (tests/deploy_tools.py); the helpers are in
tests/deploy_fixtures.py.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

import deploy_tools
from deploy_fixtures import CHART, FULLNAME, KUBE_VERSIONS, RELEASE, ROOT, by_kind, container_of, env_of, helm_runner
from deploy_fixtures import manifests, render, require_tool

DRAIN_MARGIN_S = 30  # terminationGracePeriodSeconds = shutdownGraceSeconds + this (templates/workers.yaml)
DRAINED = ("rollout", "scoring")

helm = pytest.fixture(scope="module")(helm_runner)


def _docs_blocks() -> dict[str, dict]:
    """The YAML blocks of docs/deploy.md's "Autoscaling the scorers": the chart values and the adapter rule."""
    docs = (ROOT / "docs" / "deploy.md").read_text()
    section = docs[docs.index("#### Autoscaling the scorers"):]
    section = section[: section.index("\n#### ", 1)]
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section, re.S)]
    return {"values": next(b for b in blocks if "scoring" in b), "adapter": next(b for b in blocks if "rules" in b)}


@pytest.fixture(scope="module")
def docs_values(tmp_path_factory):
    path = tmp_path_factory.mktemp("autoscaling") / "docs-values.yaml"
    path.write_text(yaml.safe_dump(_docs_blocks()["values"]))
    return path


@pytest.fixture(scope="module")
def autoscaled(helm, docs_values) -> str:
    """The chart rendered with the docs' autoscaling values."""
    return render(helm, ["-f", str(docs_values)], docs_values)


def _template(helm, *args: str) -> subprocess.CompletedProcess:
    return helm("template", RELEASE, str(CHART), "--kube-version", KUBE_VERSIONS[0], *args, check=False)


def _fails(helm, *args: str) -> str:
    proc = _template(helm, *args)
    assert proc.returncode != 0, f"helm template {' '.join(args)} rendered:\n{proc.stdout[:2000]}"
    return proc.stderr


# --- the HPA ---------------------------------------------------------------------------------------


def test_docs_autoscaling_values_lint_and_render_valid_kubernetes(helm, autoscaled, docs_values, tmp_path):
    assert "0 chart(s) failed" in helm("lint", "--strict", str(CHART), "-f", str(docs_values)).stdout
    validator = require_tool(deploy_tools.kubernetes_validate)
    path = tmp_path / "autoscaled.yaml"
    path.write_text(autoscaled)
    count = len(manifests(autoscaled))
    for version in KUBE_VERSIONS:
        proc = subprocess.run([str(validator), "--strict", "-k", version, str(path)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"kubernetes-validate {version}:\n{proc.stdout}\n{proc.stderr}"
        assert proc.stdout.count(" passed for resource ") == count, proc.stdout


def test_the_hpa_scales_on_the_given_metric_never_cpu_and_scales_down_slowly(autoscaled):
    docs = manifests(autoscaled)
    hpa = by_kind(docs, "HorizontalPodAutoscaler")[f"{FULLNAME}-scoring"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{FULLNAME}-scoring"}
    assert hpa["metrics"] == _docs_blocks()["values"]["scoring"]["autoscaling"]["metrics"]
    assert all(m["type"] not in ("Resource", "ContainerResource") for m in hpa["metrics"]), hpa["metrics"]
    assert "cpu" not in yaml.safe_dump(hpa["metrics"]).lower()
    # the default behavior: one scorer at a time, every 10 minutes at most, after 10 minutes of lower demand
    assert hpa["behavior"] == {
        "scaleDown": {
            "stabilizationWindowSeconds": 600, "selectPolicy": "Min",
            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 600}],
        },
    }  # fmt: skip
    assert "replicas" not in by_kind(docs, "Deployment")[f"{FULLNAME}-scoring"]["spec"]  # the HPA owns it


def test_no_hpa_and_no_cpu_metric_by_default(helm):
    values = yaml.safe_load((CHART / "values.yaml").read_text())["scoring"]["autoscaling"]
    assert values["enabled"] is False and values["metrics"] == []
    assert "targetCPUUtilizationPercentage" not in values
    docs = manifests(_template(helm).stdout)
    assert not by_kind(docs, "HorizontalPodAutoscaler")


def test_behavior_given_is_merged_over_the_conservative_default(helm, docs_values):
    out = _template(helm, "-f", str(docs_values), "--set", "scoring.autoscaling.behavior.scaleUp.stabilizationWindowSeconds=60")
    assert out.returncode == 0, out.stderr
    behavior = by_kind(manifests(out.stdout), "HorizontalPodAutoscaler")[f"{FULLNAME}-scoring"]["spec"]["behavior"]
    assert behavior["scaleUp"] == {"stabilizationWindowSeconds": 60}
    assert behavior["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 600}]


def test_enabling_autoscaling_without_metrics_fails_with_a_message(helm):
    err = _fails(helm, "--set", "scoring.autoscaling.enabled=true")
    assert "scoring.autoscaling.enabled needs scoring.autoscaling.metrics" in err, err
    assert "Autoscaling the scorers" in err and "CPU" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "scoring.autoscaling.enabled=true", "--set", "scoring.autoscaling.metrics[0].type=Resource",
          "--set", "scoring.autoscaling.metrics[0].resource.name=cpu",
          "--set", "scoring.autoscaling.metrics[0].resource.target.type=Utilization",
          "--set", "scoring.autoscaling.metrics[0].resource.target.averageUtilization=70"],
         "a Resource metric on cpu does not measure a scorer's load"),
        # the former CPU default is gone: a values file that still sets it is told so
        (["--set", "scoring.autoscaling.targetCPUUtilizationPercentage=60"],
         "scoring.autoscaling.targetCPUUtilizationPercentage was removed"),
    ],
)
def test_cpu_scaling_is_refused_with_a_message(helm, args, message):
    assert message in _fails(helm, *args)


def test_the_adapter_rule_serves_the_schedulers_metrics_under_the_hpas_name():
    """docs' prometheus-adapter rule reads the gauges services/scheduler/capacity.py exports, by their label,
    and names the External metric the HPA values ask for."""
    from services.scheduler.capacity import QUEUE_DEPTH, SLOTS_BUSY

    blocks = _docs_blocks()
    (rule,) = blocks["adapter"]["rules"]["external"]
    (metric,) = blocks["values"]["scoring"]["autoscaling"]["metrics"]
    assert metric["type"] == "External" and metric["external"]["target"]["type"] == "AverageValue"
    assert rule["name"]["as"] == metric["external"]["metric"]["name"]
    assert QUEUE_DEPTH._labelnames == SLOTS_BUSY._labelnames == ("service",)
    assert metric["external"]["metric"]["selector"]["matchLabels"] == {"service": "scoring"}
    assert rule["seriesQuery"].startswith(f"{QUEUE_DEPTH._name}{{")
    for gauge in (QUEUE_DEPTH, SLOTS_BUSY):
        assert f"{gauge._name}{{<<.LabelMatchers>>}}" in rule["metricsQuery"], gauge._name
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}}


# --- the drain time and the pods' grace period -----------------------------------------------------


def _worker(docs: list[dict], role: str) -> tuple[dict, dict]:
    deployment = by_kind(docs, "Deployment")[f"{FULLNAME}-{role}"]
    return deployment["spec"]["template"]["spec"], env_of(container_of(deployment))


@pytest.mark.parametrize(("args", "drain"), [([], 3600), (["--set", "rollout.shutdownGraceSeconds=600", "--set", "scoring.shutdownGraceSeconds=600"], 600)])
def test_the_grace_period_is_derived_from_the_drain_time(helm, monkeypatch, args, drain):
    from services.rollout.settings import RolloutSettings
    from services.scoring.settings import ScoringSettings

    docs = manifests(_template(helm, *args).stdout)
    for role, settings_class in zip(DRAINED, (RolloutSettings, ScoringSettings)):
        pod, env = _worker(docs, role)
        assert pod["terminationGracePeriodSeconds"] == drain + DRAIN_MARGIN_S, role
        name = f"GRADALIGN_{role.upper()}_SHUTDOWN_GRACE_S"
        assert env[name]["value"] == str(drain)
        monkeypatch.setenv(name, env[name]["value"])  # the variable is the worker's setting
        assert settings_class().shutdown_grace_s == drain
    trainer, env = _worker(docs, "trainer")  # its own default: 90 s to finish a training request, then hand back
    assert trainer["terminationGracePeriodSeconds"] == 90 + DRAIN_MARGIN_S
    assert env["GRADALIGN_TRAINER_SHUTDOWN_GRACE_S"]["value"] == "90"


def test_a_longer_grace_period_may_be_set(helm):
    docs = manifests(_template(helm, "--set", "scoring.terminationGracePeriodSeconds=4000").stdout)
    assert _worker(docs, "scoring")[0]["terminationGracePeriodSeconds"] == 4000
    assert _worker(docs, "rollout")[0]["terminationGracePeriodSeconds"] == 3600 + DRAIN_MARGIN_S


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "scoring.terminationGracePeriodSeconds=60"],
         "scoring.terminationGracePeriodSeconds (60) must be at least scoring.shutdownGraceSeconds + 30 (3630)"),
        (["--set", "rollout.shutdownGraceSeconds=7200", "--set", "rollout.terminationGracePeriodSeconds=3630"],
         "rollout.terminationGracePeriodSeconds (3630) must be at least rollout.shutdownGraceSeconds + 30 (7230)"),
        # the drain time has one source, so the worker and its pod's grace period cannot disagree
        (["--set", "scoring.settings.SHUTDOWN_GRACE_S=10"], "set scoring.shutdownGraceSeconds, not scoring.settings.SHUTDOWN_GRACE_S"),
        (["--set", "rollout.extraEnv[0].name=GRADALIGN_ROLLOUT_SHUTDOWN_GRACE_S", "--set", "rollout.extraEnv[0].value=10"],
         "set rollout.shutdownGraceSeconds, not GRADALIGN_ROLLOUT_SHUTDOWN_GRACE_S in rollout.extraEnv"),
    ],
)
def test_a_grace_period_shorter_than_the_drain_fails_with_a_message(helm, args, message):
    assert message in _fails(helm, *args)
