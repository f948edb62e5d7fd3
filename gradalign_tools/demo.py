"""The demo: build the tiny model, start the stack, run a 2-round GradAlign experiment, report."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from tqdm import tqdm

from gradalign_common.tiny_model import build_and_save
from services.scheduler.status import STAGE_DONE, TERMINAL, ExperimentStatus, StageStatus
from gradalign_tools.stack import LocalStack, StackConfig, free_port

STAGE_ORDER = ("rollout_train", "rollout_val", "score", "select", "train")


def demo_experiment(model_dir: Path) -> dict:
    return {
        "name": "demo-sim",
        "model": str(model_dir),
        "train_dataset": "arith-train",
        "val_dataset": "arith-val",
        "chunk_size": 64,
        "k": 4,
        "mode": "sim",
        "num_selections": 2,
        "train_batch_size": 8,
        "iters_per_select": 4,
        "n_samples_train": 8,
        "n_samples_val": 8,
        "max_tokens": 4,
        "temperature": 1.0,
        "seed": 0,
        "learning_rate": 2e-4,
    }


def ensure_tiny_model(home: Path) -> Path:
    model_dir = home / "models" / "tiny-arith"
    if not (model_dir / "config.json").exists():
        print(f"building the tiny Qwen2 model (warm start on arithmetic) -> {model_dir}")
        build_and_save(model_dir)
    return model_dir


def follow(api_url: str, experiment_id: int, poll_s: float = 0.5) -> dict:
    """Show a progress bar over the experiment's stages until it ends; return its final record."""
    client = httpx.Client(base_url=api_url, timeout=10)
    exp = client.get(f"/api/v1/experiments/{experiment_id}").json()
    total = exp["config"]["num_selections"] * len(STAGE_ORDER)
    with tqdm(total=total, unit="stage", desc=f"experiment {experiment_id}") as bar:
        while True:
            exp = client.get(f"/api/v1/experiments/{experiment_id}").json()
            rounds = client.get(f"/api/v1/experiments/{experiment_id}/rounds").json()
            done = sum(1 for r in rounds for st in r["stages"] if st["status"] in STAGE_DONE)
            bar.update(done - bar.n)
            stage = exp["current_stage"] or "-"
            live = next((st for r in rounds for st in r["stages"] if st["status"] == StageStatus.RUNNING), None)
            detail = f"{live['progress_done']}/{live['progress_total']} {live['progress_unit'] or ''}" if live and live["progress_total"] else ""
            bar.set_postfix_str(f"round {exp['current_round']} {stage} {detail} {exp['status_detail'] or ''}".strip())
            if exp["status"] in TERMINAL:
                return exp
            time.sleep(poll_s)


def report(api_url: str, exp: dict) -> None:
    client = httpx.Client(base_url=api_url, timeout=10)
    print(f"\nexperiment {exp['id']} {exp['status']}" + (f": {exp['error']}" if exp["error"] else ""))
    for r in client.get(f"/api/v1/experiments/{exp['id']}/rounds").json():
        sel = client.get(f"/api/v1/experiments/{exp['id']}/rounds/{r['index']}/candidates", params={"selected": True, "limit": 5}).json()
        top = ", ".join(f"{c['problem_id']}({c['score']:.3f})" for c in sel["items"])
        vr = r["validation_reward"]
        print(
            f"round {r['index']}: validation reward {vr if vr is None else round(vr, 3)}, candidate accuracy "
            f"{r['candidate_accuracy'] if r['candidate_accuracy'] is None else round(r['candidate_accuracy'], 3)}, "
            f"selected {sel['total']} (top: {top}), overhead {r['overhead_seconds'] or 0:.2f}s, checkpoint {r['checkpoint_out']}"
        )


def run_demo(home: Path) -> int:
    home = home.resolve()
    model_dir = ensure_tiny_model(home)
    config = StackConfig(
        home=home, models_root=model_dir.parent, api_port=free_port(), rollout_port=free_port(), scoring_port=free_port(), trainer_port=free_port()
    )
    with LocalStack(config) as stack:
        print("starting scheduler, rollout, scoring and trainer ...")
        stack.start()
        print(f"API: {config.api_url}  (dashboard at {config.api_url}/, OpenAPI schema at {config.api_url}/openapi.json)")
        resp = httpx.post(
            f"{config.api_url}/api/v1/experiments", json=demo_experiment(model_dir), headers=config.auth_headers, timeout=60
        )
        if resp.status_code != 201:
            print(f"the scheduler refused the demo experiment: {resp.status_code} {resp.text}")
            return 1
        exp = follow(config.api_url, resp.json()["id"])
        report(config.api_url, exp)
        print(f"\nresults: database {home / 'scheduler.db'}, artifacts {home / 'artifacts'}, logs {home / 'logs'}")
        return 0 if exp["status"] == ExperimentStatus.COMPLETED else 1
