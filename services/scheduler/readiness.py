"""Readiness of the scheduler: its database answers, and every discovered worker passes its gRPC health check."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

from gradalign_common.grpc_utils import check_health
from services.scheduler.discovery import WorkerDiscovery

WORKER_KINDS = ("rollout", "scoring", "trainer")


def readiness_checks(sessions: sessionmaker, discovery: WorkerDiscovery) -> dict[str, bool]:
    """{"database": ok, "<kind>@<address>": ok, ...}; a kind with no ready replica is `"<kind>@<none ready>": False`."""
    checks = {"database": _database_answers(sessions)}
    discovered = discovery.addresses()
    for kind in WORKER_KINDS:
        addresses = discovered.get(kind) or []
        if not addresses:
            checks[f"{kind}@<none ready>"] = False
        for address in addresses:
            checks[f"{kind}@{address}"] = check_health(address, timeout=1.0)
    return checks


def _database_answers(sessions: sessionmaker) -> bool:
    try:
        with sessions() as s:
            s.execute(text("SELECT 1"))
        return True
    except Exception:  # noqa: BLE001 - reported as not ready
        return False
