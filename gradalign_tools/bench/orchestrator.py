"""`gradalign bench orchestrator`: experiments side by side against stand-in workers.

The real scheduler (API, database, orchestrator) drives N experiments x R rounds against
stand-in gRPC workers whose stages sleep a set time (gradalign_tools.bench.standin_workers), each
replica serving one request at a time. Two runs in the same process:
- serial: max_parallel_experiments = 1 (experiments one after another, as before side-by-side);
- side by side: every experiment has its own driver.
Reported: wall time of each, the ratio, the floor (the busiest worker's total work: no schedule
can beat it) and the serial sum of stages, and each experiment's share of each worker's time
(fairness: 1/N each is perfectly fair).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from gradalign_tools.bench.standin_workers import Call, StandInWorkers


@dataclass
class OrchestratorRun:
    wall_s: float
    calls: list[Call]
    statuses: list[str]
    stages: dict  # experiment id -> list of stage dicts from the API


def run_experiments(
    home: Path,
    workers: StandInWorkers,
    n_experiments: int,
    rounds: int,
    max_parallel: int,
    model_dir: Path,
    priorities: list[float] | None = None,
    timeout_s: float = 600.0,
    **settings_overrides,
) -> OrchestratorRun:
    """POST n_experiments through the real API (in process) and wait until all end."""
    from fastapi.testclient import TestClient

    from services.scheduler.app import create_app
    from services.scheduler.settings import SchedulerSettings

    settings = SchedulerSettings(
        database_url=f"sqlite:///{home / 'scheduler.db'}", artifact_root=home / "artifacts", data_root=home,
        models_root=model_dir.parent,
        rollout_addresses=[workers.addresses["rollout"]], scoring_addresses=[workers.addresses["scoring"]],
        trainer_address=workers.addresses["trainer"], poll_interval_s=0.05, auth_enabled=False,
        max_parallel_experiments=max_parallel, log_level="WARNING", **settings_overrides,
    )
    body = {
        "model": str(model_dir), "train_dataset": "arith-train", "val_dataset": "arith-val", "chunk_size": 16, "k": 4,
        "mode": "sim", "num_selections": rounds, "train_batch_size": 4, "iters_per_select": 1, "n_samples_train": 4,
        "n_samples_val": 4, "max_tokens": 4,
    }
    already = len(workers.log.snapshot())
    with TestClient(create_app(settings)) as client:
        started = time.monotonic()
        ids = []
        for i in range(n_experiments):
            extra = {"priority": priorities[i]} if priorities else {}
            resp = client.post("/api/v1/experiments", json={**body, "name": f"bench-{i}", "seed": i, **extra})
            resp.raise_for_status()
            ids.append(resp.json()["id"])
        deadline = started + timeout_s
        while True:
            exps = [client.get(f"/api/v1/experiments/{i}").json() for i in ids]
            if all(e["status"] in ("completed", "failed", "cancelled") for e in exps) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        wall = time.monotonic() - started
        stages = {i: [s for r in client.get(f"/api/v1/experiments/{i}/rounds").json() for s in r["stages"]] for i in ids}
    return OrchestratorRun(wall, workers.log.snapshot()[already:], [e["status"] for e in exps], stages)


def worker_shares(calls: list[Call]) -> dict[str, dict[str, float]]:
    """{service: {experiment: its share of that service's busy time}}."""
    busy: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for c in calls:
        busy[c.service][c.experiment] += c.seconds
    return {svc: {exp: t / sum(per.values()) for exp, t in sorted(per.items())} for svc, per in busy.items()}


def floor_seconds(calls: list[Call]) -> float:
    """The busiest service's total work: with one slot per service no schedule finishes sooner."""
    per: dict[str, float] = defaultdict(float)
    for c in calls:
        per[c.service] += c.seconds
    return max(per.values(), default=0.0)


def orchestrator_command(
    experiments: int = typer.Option(4, "--experiments", min=1, help="Experiments run at once."),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Rounds per experiment."),
    rollout_s: float = typer.Option(0.5, "--rollout-s", help="Seconds of each stand-in rollout request."),
    scoring_s: float = typer.Option(0.3, "--scoring-s", help="Seconds of each stand-in scoring request."),
    train_step_s: float = typer.Option(0.6, "--train-step-s", help="Seconds of each stand-in GRPO step."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the figures as JSON here."),
) -> None:
    """Experiments side by side vs one after another, against stand-in workers (capacity 1 each)."""
    from gradalign_common.tiny_model import TinyModelSpec, build_and_save

    with tempfile.TemporaryDirectory(prefix="gradalign-bench-orch-") as tmp:
        tmp = Path(tmp)
        model = build_and_save(tmp / "model", TinyModelSpec(warmup_steps=0))
        with StandInWorkers(rollout_s=rollout_s, scoring_s=scoring_s, train_step_s=train_step_s) as workers:
            serial = run_experiments(tmp / "serial", workers, experiments, rounds, 1, model)
            parallel = run_experiments(tmp / "parallel", workers, experiments, rounds, experiments, model)
    sum_of_stages = sum(c.seconds for c in serial.calls)
    floor = floor_seconds(parallel.calls)
    shares = worker_shares(parallel.calls)
    figures = {
        "experiments": experiments, "rounds": rounds,
        "serial_s": serial.wall_s, "side_by_side_s": parallel.wall_s, "ratio": parallel.wall_s / serial.wall_s,
        "sum_of_worker_calls_s": sum_of_stages, "floor_busiest_worker_s": floor,
        "side_by_side_over_floor": parallel.wall_s / floor if floor else None,
        "statuses": {"serial": serial.statuses, "side_by_side": parallel.statuses},
        "worker_share_per_experiment": shares,
    }
    typer.echo(f"{experiments} experiments x {rounds} rounds, stand-in workers (rollout {rollout_s}s, scoring {scoring_s}s, "
               f"train step {train_step_s}s), one slot per worker")
    typer.echo(f"  one after another : {serial.wall_s:7.2f} s   (sum of worker calls {sum_of_stages:.2f} s)")
    typer.echo(f"  side by side      : {parallel.wall_s:7.2f} s   = {figures['ratio']:.2f}x the serial time")
    typer.echo(f"  floor (busiest worker's total work): {floor:.2f} s; side by side = {figures['side_by_side_over_floor']:.2f}x the floor")
    for svc, per in sorted(shares.items()):
        typer.echo(f"  {svc:8s} share per experiment: " + ", ".join(f"{exp[:8]}: {share:.2f}" for exp, share in per.items()))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(figures, indent=2) + "\n")
