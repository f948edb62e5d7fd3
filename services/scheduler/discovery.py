"""Where the scheduler finds its workers: a static list from settings, or ready pods via the Kubernetes API.

In a cluster each worker kind (rollout, scoring, trainer) is a Deployment behind a headless
Service; the EndpointSlice controller lists the Service's pods in EndpointSlices labelled
``kubernetes.io/service-name=<service>``, each endpoint with its pod IP and conditions.
``KubernetesDiscovery`` lists those slices (DiscoveryV1Api.list_namespaced_endpoint_slice),
keeps the ready endpoints and returns ``ip:port`` with the port named ``grpc`` of the slice, so
the scheduler can fan rollout and scoring shards out over every ready replica. It needs RBAC to
get/list/watch ``endpointslices`` (discovery.k8s.io) in its namespace (the Helm chart grants it).

Outside a cluster ``StaticDiscovery`` returns the addresses from the scheduler's settings.

Both implement ``WorkerDiscovery``:

    discovery.addresses()        -> {"rollout": [...], "scoring": [...], "trainer": [...]}
    discovery.trainer_address()  -> "10.0.0.7:50053" or None when no trainer is ready

An empty list means no ready replica right now: callers treat it like an unavailable worker
(retry with backoff). ``make_discovery(settings)`` picks the implementation from settings.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable

from gradalign_common.logging_setup import get_logger

log = get_logger("gradalign.scheduler.discovery")

ROLES = ("rollout", "scoring", "trainer")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class DiscoveryError(RuntimeError):
    """Discovery could not be set up (e.g. not running in a cluster and no kubeconfig)."""


def _field(obj: Any, name: str, camel: str | None = None) -> Any:
    """A field of a kubernetes client model (attribute) or of a plain dict from the API's JSON."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        if name in obj:
            return obj[name]
        return obj.get(camel) if camel else None
    return getattr(obj, name, None)


def _is_ready(endpoint: Any) -> bool:
    """The endpoint's ready condition; a missing (nil) condition means ready, as the API defines it."""
    conditions = _field(endpoint, "conditions")
    ready = _field(conditions, "ready")
    return ready is None or bool(ready)


def _host_port(address: str, port: int) -> str:
    try:
        if isinstance(ipaddress.ip_address(address), ipaddress.IPv6Address):
            return f"[{address}]:{port}"
    except ValueError:  # an FQDN slice
        pass
    return f"{address}:{port}"


def _slice_port(slice_: Any, port_name: str) -> int | None:
    for port in _field(slice_, "ports") or ():
        if (_field(port, "name") or "") == port_name and _field(port, "port") is not None:
            return int(_field(port, "port"))
    return None


def ready_addresses(slices: Iterable[Any], port_name: str = "grpc") -> list[str]:
    """``host:port`` of every ready endpoint in the slices, with the port named ``port_name``.

    ``slices`` are V1EndpointSlice objects from the kubernetes client (or dicts as the API sends
    them). Endpoints whose ``conditions.ready`` is false (starting, failing readiness, terminating)
    are left out; a slice without a port of that name contributes nothing (its Service does not
    expose the worker's gRPC port). An address listed twice (a pod can briefly appear in two
    slices while they are rebalanced) is returned once. The result is sorted, so that callers
    shard work the same way for the same set of replicas.
    """
    found: set[str] = set()
    for slice_ in slices:
        port = _slice_port(slice_, port_name)
        if port is None:
            continue
        for endpoint in _field(slice_, "endpoints") or ():
            if not _is_ready(endpoint):
                continue
            for address in _field(endpoint, "addresses") or ():
                found.add(_host_port(address, port))
    return sorted(found)


class WorkerDiscovery(ABC):
    """Addresses (``host:port``) of the ready replicas of each worker kind."""

    @abstractmethod
    def addresses(self) -> dict[str, list[str]]:
        """{"rollout": [...], "scoring": [...], "trainer": [...]}, each sorted; may be empty."""

    def rollout_addresses(self) -> list[str]:
        return self.addresses()["rollout"]

    def scoring_addresses(self) -> list[str]:
        return self.addresses()["scoring"]

    def trainer_address(self) -> str | None:
        """The trainer to call (the first ready one; the chart runs one), or None if none is ready."""
        trainers = self.addresses()["trainer"]
        return trainers[0] if trainers else None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients (nothing to do for most implementations)."""


class StaticDiscovery(WorkerDiscovery):
    """Fixed addresses, e.g. the scheduler settings' rollout_addresses/scoring_addresses/trainer_address."""

    def __init__(self, rollout: Iterable[str], scoring: Iterable[str], trainer: str | Iterable[str] | None):
        trainers = [trainer] if isinstance(trainer, str) else list(trainer or ())
        self._addresses = {"rollout": list(rollout), "scoring": list(scoring), "trainer": trainers}

    @classmethod
    def from_settings(cls, settings: Any) -> StaticDiscovery:
        return cls(settings.rollout_addresses, settings.scoring_addresses, settings.trainer_address)

    def addresses(self) -> dict[str, list[str]]:
        return {role: list(values) for role, values in self._addresses.items()}


class KubernetesDiscovery(WorkerDiscovery):
    """Ready replicas from the EndpointSlices of each worker's Service, refreshed at most every ``refresh_interval_s``.

    ``service_names`` maps role -> Service name, e.g. {"rollout": "gradalign-rollout", ...}.
    ``api`` is a ``kubernetes.client.DiscoveryV1Api`` (built from the in-cluster service account
    when omitted). When a refresh fails (API server unreachable, RBAC missing) the last good answer
    is kept, the error is logged and kept in ``last_error``; before any success the lists are empty.
    """

    def __init__(
        self,
        namespace: str,
        service_names: Mapping[str, str],
        port_name: str = "grpc",
        refresh_interval_s: float = 5.0,
        api: Any = None,
        clock: Callable[[], float] = time.monotonic,
        request_timeout_s: float = 5.0,
    ):
        unknown = set(service_names) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown worker roles {sorted(unknown)}; expected some of {ROLES}")
        if refresh_interval_s < 0:
            raise ValueError("refresh_interval_s must be >= 0")
        self.namespace = namespace
        self.service_names = dict(service_names)
        self.port_name = port_name
        self.refresh_interval_s = refresh_interval_s
        self.request_timeout_s = request_timeout_s
        self._api = api if api is not None else _incluster_api()
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, list[str]] = {role: [] for role in ROLES}
        self._fetched_at: float | None = None
        self.last_error: Exception | None = None

    @classmethod
    def in_cluster(
        cls, service_names: Mapping[str, str], namespace: str | None = None, **kwargs: Any
    ) -> KubernetesDiscovery:
        """Use the pod's service account; the namespace defaults to the pod's own."""
        return cls(namespace or current_namespace(), service_names, **kwargs)

    def _list_slices(self, service: str) -> list[Any]:
        items: list[Any] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {
                "label_selector": f"{SERVICE_NAME_LABEL}={service}",
                "_request_timeout": self.request_timeout_s,
            }
            if token:
                kwargs["_continue"] = token
            page = self._api.list_namespaced_endpoint_slice(self.namespace, **kwargs)
            items.extend(_field(page, "items") or ())
            meta = _field(page, "metadata")
            # the continue token: `var_continue` on the pydantic models (client >= 37), `_continue` before
            token = _field(meta, "var_continue") or _field(meta, "_continue") or _field(meta, "continue")
            if not token:
                return items

    def refresh(self) -> dict[str, list[str]]:
        """List the slices now (ignoring the refresh interval) and return the new addresses."""
        with self._lock:
            return self._refresh_locked()

    def _refresh_locked(self) -> dict[str, list[str]]:
        try:
            fresh = {role: [] for role in ROLES}
            for role, service in self.service_names.items():
                fresh[role] = ready_addresses(self._list_slices(service), self.port_name)
        except Exception as exc:  # noqa: BLE001 - keep the last good answer; the caller retries
            self.last_error = exc
            self._fetched_at = self._clock()  # do not hammer a failing API server on every call
            log.warning("discovery_failed", namespace=self.namespace, error=f"{type(exc).__name__}: {exc}")
            return {role: list(v) for role, v in self._cache.items()}
        if fresh != self._cache:
            log.info("workers_discovered", **{role: len(v) for role, v in fresh.items()})
        self._cache = fresh
        self._fetched_at = self._clock()
        self.last_error = None
        return {role: list(v) for role, v in fresh.items()}

    def addresses(self) -> dict[str, list[str]]:
        with self._lock:
            stale = self._fetched_at is None or self._clock() - self._fetched_at >= self.refresh_interval_s
            if stale:
                return self._refresh_locked()
            return {role: list(v) for role, v in self._cache.items()}

    def close(self) -> None:
        client = getattr(self._api, "api_client", None)
        if client is not None and hasattr(client, "close"):
            client.close()


def current_namespace(default: str = "default") -> str:
    """The pod's namespace (from its service account mount), or ``default`` outside a cluster."""
    try:
        return NAMESPACE_FILE.read_text().strip() or default
    except OSError:
        return default


def _incluster_api() -> Any:
    try:
        from kubernetes import client, config
    except ImportError as exc:  # pragma: no cover - kubernetes is a dependency
        raise DiscoveryError("Kubernetes discovery needs the `kubernetes` package") from exc
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except Exception as exc:  # noqa: BLE001
            raise DiscoveryError(f"not in a cluster and no usable kubeconfig: {exc}") from exc
    return client.DiscoveryV1Api()


def make_discovery(settings: Any) -> WorkerDiscovery:
    """The discovery the scheduler settings ask for.

    Reads these optional settings (env GRADALIGN_SCHEDULER_<NAME>; the Helm chart sets them):
    ``discovery`` ("static" default, or "kubernetes"), ``discovery_namespace`` (default: the
    pod's), ``rollout_service``/``scoring_service``/``trainer_service`` (Service names),
    ``discovery_port_name`` ("grpc"), ``discovery_refresh_s`` (5.0).
    """
    import os

    def setting(name: str, default: Any) -> Any:
        value = getattr(settings, name, None)
        if value is None:
            value = os.environ.get(f"GRADALIGN_SCHEDULER_{name.upper()}")
        return default if value in (None, "") else value

    kind = str(setting("discovery", "static")).lower()
    if kind == "static":
        return StaticDiscovery.from_settings(settings)
    if kind != "kubernetes":
        raise ValueError(f"discovery must be 'static' or 'kubernetes', not {kind!r}")
    services = {role: setting(f"{role}_service", None) for role in ROLES}
    missing = [f"GRADALIGN_SCHEDULER_{role.upper()}_SERVICE" for role, name in services.items() if not name]
    if missing:
        raise ValueError(f"kubernetes discovery needs the Service names: set {', '.join(missing)}")
    return KubernetesDiscovery.in_cluster(
        services,
        namespace=setting("discovery_namespace", None),
        port_name=str(setting("discovery_port_name", "grpc")),
        refresh_interval_s=float(setting("discovery_refresh_s", 5.0)),
    )
