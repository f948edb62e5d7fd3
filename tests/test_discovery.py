"""Worker discovery: ready EndpointSlice endpoints -> addresses, static lists, and the Kubernetes client end to end."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes import client as k8s

from services.scheduler.discovery import (
    KubernetesDiscovery,
    StaticDiscovery,
    make_discovery,
    ready_addresses,
)
from services.scheduler.settings import SchedulerSettings


def endpoint(ip: str, ready: bool | None = True, terminating: bool | None = None, conditions: bool = True) -> k8s.V1Endpoint:
    cond = k8s.V1EndpointConditions(ready=ready, serving=ready, terminating=terminating) if conditions else None
    return k8s.V1Endpoint(addresses=[ip], conditions=cond, target_ref=k8s.V1ObjectReference(kind="Pod", name=f"pod-{ip}"))


def endpoint_slice(service: str, endpoints: list, ports: list | None = None, address_type: str = "IPv4", name: str | None = None) -> k8s.V1EndpointSlice:
    if ports is None:
        ports = [k8s.DiscoveryV1EndpointPort(name="grpc", port=50052, protocol="TCP")]
    return k8s.V1EndpointSlice(
        api_version="discovery.k8s.io/v1",
        kind="EndpointSlice",
        address_type=address_type,
        metadata=k8s.V1ObjectMeta(name=name or f"{service}-abcde", labels={"kubernetes.io/service-name": service}),
        endpoints=endpoints,
        ports=ports,
    )


# --- ready_addresses over the client's model objects ---------------------------------------------


def test_ready_endpoints_only_with_the_grpc_port():
    s = endpoint_slice(
        "rel-scoring",
        [endpoint("10.0.0.3"), endpoint("10.0.0.1"), endpoint("10.0.0.2", ready=False), endpoint("10.0.0.4", ready=False, terminating=True)],
    )
    assert ready_addresses([s]) == ["10.0.0.1:50052", "10.0.0.3:50052"]


def test_nil_ready_condition_counts_as_ready():
    """The API defines a nil ready condition as ready (an endpoint with no conditions at all too)."""
    s = endpoint_slice("rel-rollout", [endpoint("10.0.1.1", ready=None), endpoint("10.0.1.2", conditions=False)])
    assert ready_addresses([s]) == ["10.0.1.1:50052", "10.0.1.2:50052"]


def test_port_is_taken_by_name_from_each_slice():
    ports = [
        k8s.DiscoveryV1EndpointPort(name="metrics", port=9090, protocol="TCP"),
        k8s.DiscoveryV1EndpointPort(name="grpc", port=50051, protocol="TCP"),
    ]
    a = endpoint_slice("rel-rollout", [endpoint("10.0.0.1")], ports=ports, name="a")
    b = endpoint_slice("rel-rollout", [endpoint("10.0.0.2")], ports=[k8s.DiscoveryV1EndpointPort(name="grpc", port=6000)], name="b")
    assert ready_addresses([a, b]) == ["10.0.0.1:50051", "10.0.0.2:6000"]
    assert ready_addresses([a], port_name="metrics") == ["10.0.0.1:9090"]


def test_slice_without_the_named_port_or_endpoints_gives_nothing():
    no_port = endpoint_slice("rel-scoring", [endpoint("10.0.0.1")], ports=[k8s.DiscoveryV1EndpointPort(name="http", port=80)])
    unnamed = endpoint_slice("rel-scoring", [endpoint("10.0.0.2")], ports=[k8s.DiscoveryV1EndpointPort(port=80)])
    empty = endpoint_slice("rel-scoring", None)
    no_ports = endpoint_slice("rel-scoring", [endpoint("10.0.0.3")], ports=[])
    assert ready_addresses([no_port, unnamed, empty, no_ports]) == []
    assert ready_addresses([]) == []


def test_duplicates_across_slices_are_listed_once_and_sorted():
    a = endpoint_slice("rel-scoring", [endpoint("10.0.0.9"), endpoint("10.0.0.1")], name="a")
    b = endpoint_slice("rel-scoring", [endpoint("10.0.0.1"), endpoint("10.0.0.5")], name="b")
    assert ready_addresses([b, a]) == ["10.0.0.1:50052", "10.0.0.5:50052", "10.0.0.9:50052"]


def test_ipv6_addresses_are_bracketed():
    s = endpoint_slice("rel-trainer", [endpoint("fd00::1")], address_type="IPv6",
                       ports=[k8s.DiscoveryV1EndpointPort(name="grpc", port=50053)])
    assert ready_addresses([s]) == ["[fd00::1]:50053"]


def test_plain_api_json_dicts_work_too():
    raw = {"addressType": "IPv4", "endpoints": [{"addresses": ["10.1.1.1"], "conditions": {"ready": True}},
                                                {"addresses": ["10.1.1.2"], "conditions": {"ready": False}}],
           "ports": [{"name": "grpc", "port": 50051, "protocol": "TCP"}]}
    assert ready_addresses([raw]) == ["10.1.1.1:50051"]
    # and the same JSON deserialized by the client
    assert ready_addresses([k8s.V1EndpointSlice.from_dict(raw)]) == ["10.1.1.1:50051"]


# --- StaticDiscovery ---------------------------------------------------------------------------


def test_static_discovery_from_settings():
    settings = SchedulerSettings(rollout_addresses=["r1:50051", "r2:50051"], scoring_addresses=["s1:50052"], trainer_address="t:50053")
    d = StaticDiscovery.from_settings(settings)
    assert d.addresses() == {"rollout": ["r1:50051", "r2:50051"], "scoring": ["s1:50052"], "trainer": ["t:50053"]}
    assert d.trainer_address() == "t:50053"
    assert d.rollout_addresses() == ["r1:50051", "r2:50051"]
    d.addresses()["rollout"].append("mutated")  # callers get copies
    assert d.rollout_addresses() == ["r1:50051", "r2:50051"]
    assert isinstance(make_discovery(settings), StaticDiscovery)


def test_make_discovery_rejects_unknown_kind(monkeypatch):
    monkeypatch.setenv("GRADALIGN_SCHEDULER_DISCOVERY", "consul")
    with pytest.raises(ValueError, match="static.*kubernetes"):
        make_discovery(SchedulerSettings())


def test_make_discovery_kubernetes_needs_service_names(monkeypatch):
    monkeypatch.setenv("GRADALIGN_SCHEDULER_DISCOVERY", "kubernetes")
    monkeypatch.setenv("GRADALIGN_SCHEDULER_ROLLOUT_SERVICE", "rel-rollout")
    with pytest.raises(ValueError, match="SCORING_SERVICE"):
        make_discovery(SchedulerSettings())


# --- KubernetesDiscovery with a fake DiscoveryV1Api ---------------------------------------------


class FakeDiscoveryApi:
    """Answers list_namespaced_endpoint_slice like the API server would, from slices by service name."""

    def __init__(self, slices: dict[str, list], page_size: int | None = None):
        self.slices = slices
        self.page_size = page_size
        self.calls: list[dict] = []
        self.fail: Exception | None = None

    def list_namespaced_endpoint_slice(self, namespace, label_selector=None, _continue=None, **kwargs):
        self.calls.append({"namespace": namespace, "label_selector": label_selector, "continue": _continue})
        if self.fail is not None:
            raise self.fail
        key, _, service = label_selector.partition("=")
        assert key == "kubernetes.io/service-name"
        items = self.slices.get(service, [])
        start = int(_continue or 0)
        end = len(items) if self.page_size is None else start + self.page_size
        token = str(end) if end < len(items) else None
        return k8s.V1EndpointSliceList(items=items[start:end], metadata=k8s.V1ListMeta(_continue=token))


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


SERVICES = {"rollout": "rel-rollout", "scoring": "rel-scoring", "trainer": "rel-trainer"}


def grpc_port(port: int) -> list:
    return [k8s.DiscoveryV1EndpointPort(name="grpc", port=port, protocol="TCP")]


def cluster_slices() -> dict[str, list]:
    return {
        "rel-rollout": [endpoint_slice("rel-rollout", [endpoint("10.0.0.1"), endpoint("10.0.0.2")], ports=grpc_port(50051))],
        "rel-scoring": [
            endpoint_slice("rel-scoring", [endpoint("10.0.1.1"), endpoint("10.0.1.2", ready=False)], name="s1"),
            endpoint_slice("rel-scoring", [endpoint("10.0.1.3")], name="s2"),
        ],
        "rel-trainer": [endpoint_slice("rel-trainer", [endpoint("10.0.2.1")], ports=grpc_port(50053))],
    }


def test_kubernetes_discovery_lists_each_service_by_label():
    api = FakeDiscoveryApi(cluster_slices())
    d = KubernetesDiscovery("ml", SERVICES, api=api, clock=Clock())
    assert d.addresses() == {
        "rollout": ["10.0.0.1:50051", "10.0.0.2:50051"],
        "scoring": ["10.0.1.1:50052", "10.0.1.3:50052"],
        "trainer": ["10.0.2.1:50053"],
    }
    assert d.trainer_address() == "10.0.2.1:50053"
    assert {c["namespace"] for c in api.calls} == {"ml"}
    assert sorted(c["label_selector"] for c in api.calls) == [
        "kubernetes.io/service-name=rel-rollout", "kubernetes.io/service-name=rel-scoring", "kubernetes.io/service-name=rel-trainer"]


def test_kubernetes_discovery_follows_continue_tokens():
    slices = {"rel-scoring": [endpoint_slice("rel-scoring", [endpoint(f"10.0.1.{i}")], name=f"s{i}") for i in range(1, 6)]}
    api = FakeDiscoveryApi(slices, page_size=2)
    d = KubernetesDiscovery("ml", {"scoring": "rel-scoring"}, api=api, clock=Clock())
    assert d.scoring_addresses() == [f"10.0.1.{i}:50052" for i in range(1, 6)]
    assert [c["continue"] for c in api.calls] == [None, "2", "4"]
    assert d.rollout_addresses() == [] and d.trainer_address() is None  # roles without a Service


def test_kubernetes_discovery_caches_for_the_refresh_interval_and_sees_scale_up():
    slices = cluster_slices()
    api, clock = FakeDiscoveryApi(slices), Clock()
    d = KubernetesDiscovery("ml", SERVICES, refresh_interval_s=5.0, api=api, clock=clock)
    assert d.scoring_addresses() == ["10.0.1.1:50052", "10.0.1.3:50052"]
    calls = len(api.calls)
    # a new scorer becomes ready, and the not-ready one too (e.g. the HPA scaled up, a pod finished loading)
    slices["rel-scoring"] = [
        endpoint_slice("rel-scoring", [endpoint("10.0.1.1"), endpoint("10.0.1.2")], name="s1"),
        endpoint_slice("rel-scoring", [endpoint("10.0.1.3"), endpoint("10.0.1.4")], name="s2"),
    ]
    clock.now += 4.9
    assert d.scoring_addresses() == ["10.0.1.1:50052", "10.0.1.3:50052"]  # cached
    assert len(api.calls) == calls
    clock.now += 0.2
    assert d.scoring_addresses() == ["10.0.1.1:50052", "10.0.1.2:50052", "10.0.1.3:50052", "10.0.1.4:50052"]
    # refresh() ignores the interval; a scale-down shows at once
    slices["rel-scoring"] = [endpoint_slice("rel-scoring", [endpoint("10.0.1.4", ready=False, terminating=True), endpoint("10.0.1.1")])]
    assert d.refresh()["scoring"] == ["10.0.1.1:50052"]


def test_kubernetes_discovery_keeps_last_good_answer_when_the_api_fails():
    api, clock = FakeDiscoveryApi(cluster_slices()), Clock()
    d = KubernetesDiscovery("ml", SERVICES, refresh_interval_s=1.0, api=api, clock=clock)
    good = d.addresses()
    api.fail = k8s.ApiException(status=403, reason="Forbidden")
    clock.now += 2
    assert d.addresses() == good
    assert isinstance(d.last_error, k8s.ApiException)
    calls = len(api.calls)
    assert d.addresses() == good  # no retry storm within the interval
    assert len(api.calls) == calls
    api.fail = None
    clock.now += 2
    assert d.addresses() == good and d.last_error is None


def test_kubernetes_discovery_before_any_success_is_empty():
    api = FakeDiscoveryApi({})
    api.fail = ConnectionError("api server down")
    d = KubernetesDiscovery("ml", SERVICES, api=api, clock=Clock())
    assert d.addresses() == {"rollout": [], "scoring": [], "trainer": []}
    assert d.trainer_address() is None
    assert isinstance(d.last_error, ConnectionError)


def test_kubernetes_discovery_rejects_unknown_roles():
    with pytest.raises(ValueError, match="unknown worker roles"):
        KubernetesDiscovery("ml", {"reward": "rel-reward"}, api=FakeDiscoveryApi({}))


# --- the real client against a fake API server ---------------------------------------------------


class _ApiServer(BaseHTTPRequestHandler):
    slices: dict = {}
    requests: list = []

    def do_GET(self):  # noqa: N802 - http.server API
        url = urlparse(self.path)
        type(self).requests.append(url)
        if url.path != "/apis/discovery.k8s.io/v1/namespaces/ml/endpointslices":
            self.send_error(404)
            return
        selector = parse_qs(url.query).get("labelSelector", [""])[0]
        service = selector.partition("=")[2]
        body = json.dumps({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList", "metadata": {"resourceVersion": "7"},
                           "items": type(self).slices.get(service, [])}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet
        pass


def test_kubernetes_discovery_through_the_real_client_and_http():
    """DiscoveryV1Api sends the label selector, and its deserialized V1EndpointSlices feed ready_addresses."""

    def raw(ip: str, ready: bool) -> dict:
        return {"addresses": [ip], "conditions": {"ready": ready, "serving": ready, "terminating": False},
                "targetRef": {"kind": "Pod", "name": f"pod-{ip}", "namespace": "ml"}}

    _ApiServer.slices = {
        "rel-scoring": [{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                         "metadata": {"name": "rel-scoring-x1", "labels": {"kubernetes.io/service-name": "rel-scoring"}},
                         "endpoints": [raw("10.2.0.1", True), raw("10.2.0.2", False), raw("10.2.0.3", True)],
                         "ports": [{"name": "metrics", "port": 9090, "protocol": "TCP"}, {"name": "grpc", "port": 50052, "protocol": "TCP"}]}],
    }
    _ApiServer.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ApiServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        config = k8s.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
        api = k8s.DiscoveryV1Api(k8s.ApiClient(config))
        d = KubernetesDiscovery("ml", {"scoring": "rel-scoring", "trainer": "rel-trainer"}, api=api)
        assert d.addresses() == {"rollout": [], "scoring": ["10.2.0.1:50052", "10.2.0.3:50052"], "trainer": []}
        selectors = sorted(parse_qs(u.query)["labelSelector"][0] for u in _ApiServer.requests)
        assert selectors == ["kubernetes.io/service-name=rel-scoring", "kubernetes.io/service-name=rel-trainer"]
        d.close()
    finally:
        server.shutdown()
        server.server_close()
