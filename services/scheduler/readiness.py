"""Readiness of the scheduler: whether its database answers (what gates readiness), and each discovered worker's
gRPC health (reported beside it), the workers checked at once with a short timeout."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import text
from sqlalchemy.orm import sessionmaker

from gradalign_common.grpc_utils import check_health
from services.scheduler.discovery import WorkerDiscovery

WORKER_KINDS = ("rollout", "scoring", "trainer")


def readiness_checks(sessions: sessionmaker, discovery: WorkerDiscovery) -> dict[str, bool]:
    """{"database": ok, "<kind>@<address>": ok, ...}; a kind with no ready replica is `"<kind>@<none ready>": False`."""
    checks = {"database": _database_answers(sessions)}
    discovered = discovery.addresses()
    targets = []
    for kind in WORKER_KINDS:
        addresses = discovered.get(kind) or []
        if not addresses:
            checks[f"{kind}@<none ready>"] = False
        targets += [(f"{kind}@{address}", address) for address in addresses]
    if targets:
        with ThreadPoolExecutor(max_workers=min(len(targets), 16)) as pool:
            for key, ok in zip((k for k, _ in targets), pool.map(lambda t: check_health(t[1], timeout=0.5), targets)):
                checks[key] = ok
    return checks


def _database_answers(sessions: sessionmaker) -> bool:
    try:
        with sessions() as s:
            s.execute(text("SELECT 1"))
        return True
    except Exception:  # noqa: BLE001 - reported as not ready
        return False
