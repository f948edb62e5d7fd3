"""What the Helm chart does for security: every container non-root, read-only and without
capabilities; NetworkPolicies that let only the scheduler reach the workers and databases and that
restrict every pod's egress; a bundled Redis that requires the password the scheduler's URL carries.

helm comes from the dev extra (tests/deploy_tools.py); the value sets and the helpers are in
tests/deploy_fixtures.py.
"""

from __future__ import annotations

import re

import pytest

from deploy_fixtures import FULLNAME, JUDGE_CIDR, RELEASE, VALUE_SETS, WORKERS, by_kind, container_of, env_of
from deploy_fixtures import gradalign_containers, helm_runner, manifests, render, render_value_sets, write_external_values


# the module's fixtures: helm, and the objects each value set renders (once per module)
helm = pytest.fixture(scope="module")(helm_runner)
external_values = pytest.fixture(scope="module")(write_external_values)
rendered = pytest.fixture(scope="module")(render_value_sets)


# --- pods ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", list(VALUE_SETS))
def test_every_gradalign_container_is_non_root_read_only_without_capabilities(rendered, values):
    for name, deployment in by_kind(rendered[values], "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in gradalign_containers(deployment):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert sc["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (name, container["name"])
            assert "limits" in container["resources"] and "requests" in container["resources"], (name, container["name"])


# --- the bundled Redis needs a password ----------------------------------------------------------


def test_bundled_redis_requires_the_password_the_scheduler_url_carries(rendered):
    docs = rendered["default"]
    redis = container_of(by_kind(docs, "Deployment")[f"{FULLNAME}-redis"])
    command = redis["command"]
    assert "--protected-mode" not in command, "no open Redis: requirepass instead"
    assert command[command.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"  # expanded by the kubelet from the env below
    env = env_of(redis)
    password_ref = {"name": f"{FULLNAME}-connections", "key": "redis-password"}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == password_ref
    assert env["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"] == password_ref  # the redis-cli readiness probe
    assert redis["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]
    secret = by_kind(docs, "Secret")[f"{FULLNAME}-connections"]["stringData"]
    password = secret["redis-password"]
    assert re.fullmatch(r"[A-Za-z0-9]{32}", password), "generated: 32 random characters"
    assert secret["redis-url"] == f"redis://:{password}@{FULLNAME}-redis:6379/0"
    # the scheduler (the one service that uses Redis) gets the URL from the Secret, never as a plain value
    scheduler = container_of(by_kind(docs, "Deployment")[f"{FULLNAME}-scheduler"])
    assert env_of(scheduler)["GRADALIGN_SCHEDULER_REDIS_URL"] == {
        "name": "GRADALIGN_SCHEDULER_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": f"{FULLNAME}-connections", "key": "redis-url"}}}
    for role in WORKERS:
        assert not any("REDIS" in name for name in env_of(container_of(by_kind(docs, "Deployment")[f"{FULLNAME}-{role}"]))), role


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


# --- NetworkPolicies: ingress --------------------------------------------------------------------


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
