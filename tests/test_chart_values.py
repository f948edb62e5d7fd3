"""The Helm chart's values: values violating values.schema.json or each other fail at install with a
message; the upload limit is one value for the API and the Ingress; every scheduler variable the
chart sets is a scheduler setting; docs/deploy.md and NOTES.txt tell users what to set and how to
reach the dashboard.

helm comes from the dev extra (tests/deploy_tools.py); the value sets and the helpers are in
tests/deploy_fixtures.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from deploy_fixtures import CHART, FULLNAME, GPU_VALUES, KUBE_VERSIONS, NAMESPACE, RELEASE, ROOT, VALUE_SETS, by_kind
from deploy_fixtures import container_of, env_of, gradalign_containers, helm_runner, render_value_sets, write_external_values


# the module's fixtures: helm, and the objects each value set renders (once per module)
helm = pytest.fixture(scope="module")(helm_runner)
external_values = pytest.fixture(scope="module")(write_external_values)
rendered = pytest.fixture(scope="module")(render_value_sets)


# --- the upload limit, the Ingress and the event stream ------------------------------------------


def _scheduler_settings(container: dict, monkeypatch):
    from services.scheduler.settings import SchedulerSettings

    for name, entry in env_of(container).items():
        if name.startswith("GRADALIGN_SCHEDULER_") and "value" in entry:
            monkeypatch.setenv(name, entry["value"])
    return SchedulerSettings()


@pytest.mark.parametrize(("values", "limit", "read_timeout"), [("gpu", 1 << 30, "3600"), ("external", 5 << 30, "86400")])
def test_ingress_body_size_is_the_apis_upload_limit(rendered, monkeypatch, values, limit, read_timeout):
    docs = rendered[values]
    annotations = by_kind(docs, "Ingress")[FULLNAME]["metadata"]["annotations"]
    container = container_of(by_kind(docs, "Deployment")[f"{FULLNAME}-scheduler"])
    # ingress-nginx' default (1m) would refuse uploads the API accepts: both come from scheduler.maxUploadBytes
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == str(limit)
    assert env_of(container)["GRADALIGN_SCHEDULER_MAX_UPLOAD_BYTES"]["value"] == str(limit)
    assert _scheduler_settings(container, monkeypatch).max_upload_bytes == limit
    # the live events (server-sent, idle between events) are neither buffered nor cut after nginx' 60 s
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == read_timeout  # a given annotation wins
    assert annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "3600"


def test_default_upload_limit_is_the_schedulers_own_default(rendered, monkeypatch):
    from services.scheduler.settings import SchedulerSettings

    container = container_of(by_kind(rendered["default"], "Deployment")[f"{FULLNAME}-scheduler"])
    assert int(env_of(container)["GRADALIGN_SCHEDULER_MAX_UPLOAD_BYTES"]["value"]) == SchedulerSettings.model_fields["max_upload_bytes"].default


# --- every variable the chart sets is read by the code -------------------------------------------


@pytest.mark.parametrize("values", list(VALUE_SETS))
def test_every_scheduler_variable_the_chart_sets_is_a_scheduler_setting(rendered, values):
    """A variable no code reads (like the former GRADALIGN_SCHEDULER_API_TOKENS_FILE) is a setting that silently does nothing."""
    from services.scheduler.settings import SchedulerSettings

    scheduler = by_kind(rendered[values], "Deployment")[f"{FULLNAME}-scheduler"]
    for container in gradalign_containers(scheduler):
        for name in env_of(container):
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


# --- values.schema.json: wrong values fail at install --------------------------------------------


def _bad_values() -> list:
    """The values violating the schema, tests/data/chart_bad_values.yaml: one case each (its values and the key
    the refusal must name)."""
    cases = yaml.safe_load((Path(__file__).resolve().parent / "data" / "chart_bad_values.yaml").read_text())
    assert isinstance(cases, list) and cases, "tests/data/chart_bad_values.yaml holds no cases"
    return [pytest.param(c["values"], c["key"], id=c["case"]) for c in cases]


@pytest.mark.parametrize(("values", "key"), _bad_values())
def test_values_violating_the_schema_fail_template_and_lint(helm, values, key, tmp_path):
    bad = tmp_path / "bad-values.yaml"
    bad.write_text(yaml.safe_dump(values))
    for command in (["template", RELEASE, str(CHART)], ["lint", "--strict", str(CHART)]):
        proc = helm(*command, "-f", str(bad), check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, f"helm {command[0]} accepted {values!r}:\n{out}"
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


# --- NOTES.txt -----------------------------------------------------------------------------------


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
