"""The trainer service with the verl backend, end to end with a stand-in `verl` package (the tests put
it on PYTHONPATH) that answers `python -m verl.trainer.main_ppo` and `python -m verl.model_merger
merge` the way verl 0.9.1 lays out its outputs: a run streams verl's steps and leaves a merged,
loadable checkpoint; a failed or refused run leaves nothing; a cancelled or timed-out run, or a
killed trainer, ends the verl processes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import grpc
import pytest

from gradalign_common.modeling import load_model
from gradalign_common.pb import common_pb2, training_pb2, training_pb2_grpc
from gradalign_common.records import write_problems
from services.trainer.backends.verl.command import REWARD_FILE
from services.trainer.backends.verl.options import VerlOptions
from services.trainer.backends.verl.process import VerlRunError
from services.trainer.backends.verl.run import iter_verl
from services.trainer.grpo import GRPOConfig
from services.trainer.marker import MARKER_NAME
from services.trainer.server import create_server
from services.trainer.settings import TrainerSettings
from trainer_fixtures import constant_answer_problems
from verl_fixtures import prepare_test_job


# --- the stand-in verl -------------------------------------------------------------------------------


STAND_IN_VERL = Path(__file__).resolve().parent / "stand_in_verl"  # verl.trainer.main_ppo and verl.model_merger


@pytest.fixture
def fake_verl(monkeypatch) -> Path:
    """`python -m verl...` runs the stand-ins (tests/stand_in_verl/README.md) in the processes the backend starts."""
    monkeypatch.setenv("PYTHONPATH", str(STAND_IN_VERL))
    return STAND_IN_VERL


# --- the service -------------------------------------------------------------------------------------


@pytest.fixture
def verl_stub(tmp_path, fake_verl):
    settings = TrainerSettings(
        host="127.0.0.1", port=0, artifact_root=tmp_path / "artifacts", backend="verl", verl_python=sys.executable
    )
    server, _, port = create_server(settings)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield training_pb2_grpc.TrainerServiceStub(channel)
    channel.close()
    server.stop(None)


def _verl_request(checkpoint, problems_path, output, **hp) -> training_pb2.TrainRequest:
    values = dict(
        steps=3,
        batch_size=2,
        learning_rate=1e-6,
        kl_coef=0.01,
        sampling=common_pb2.SamplingParams(n=4, max_tokens=8, temperature=1.0),
        seed=5,
    )
    values.update(hp)
    return training_pb2.TrainRequest(
        request_id="verl-1",
        checkpoint=str(checkpoint),
        problems_path=str(problems_path),
        output_checkpoint=str(output),
        hyperparams=training_pb2.TrainHyperparams(**values),
        reference_checkpoint=str(checkpoint),
    )


def test_the_service_runs_verl_then_the_merger(verl_stub, random_tiny_checkpoint, tmp_path):
    problems_path = write_problems(tmp_path / "artifacts" / "selection.parquet", constant_answer_problems(5))
    output = tmp_path / "artifacts" / "checkpoints" / "round-00001"
    events = list(verl_stub.Train(_verl_request(random_tiny_checkpoint, problems_path, output), timeout=120))
    steps = [e.step for e in events if e.WhichOneof("event") == "step"]
    result = events[-1].result
    assert [s.step for s in steps] == [1, 2, 3]
    assert all(s.mean_reward == 1.0 for s in steps)  # the fake scored "7" with our reward file
    assert steps[0].loss == pytest.approx(0.1 - 0.0 * 2.0) and steps[0].tokens_per_second == pytest.approx(3.0 * 8 / 0.5)
    assert result.checkpoint == str(output) and result.steps == 3 and result.optimizer_state_path == ""
    load_model(output)  # the merged directory is a loadable HF checkpoint
    args = json.loads((output / "stand-in-run.json").read_text())["args"]
    assert args["actor_rollout_ref.model.path"] == str(random_tiny_checkpoint)
    assert args["data.train_batch_size"] == "2" and args["trainer.total_epochs"] == "2"  # 3 steps of 2 out of 5
    assert args["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu"] == "4"
    assert "actor_rollout_ref.ref.model.path" not in args  # the reference is the starting checkpoint
    assert args["actor_rollout_ref.model.override_config.attn_implementation"] == "sdpa"
    assert args["reward.custom_reward_function.path"] == str(REWARD_FILE)
    assert int(args["data.max_prompt_length"]) >= 1024
    marker = json.loads((output / MARKER_NAME).read_text())
    assert marker["backend"] == "verl" and [m["step"] for m in marker["metrics"]] == [1, 2, 3]
    assert sorted(p.name for p in output.parent.iterdir()) == ["round-00001"]  # scratch and staging removed


def test_a_failed_verl_run_leaves_nothing(verl_stub, random_tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("STAND_IN_VERL_FAIL", "1")
    problems_path = write_problems(tmp_path / "artifacts" / "selection.parquet", constant_answer_problems(5))
    output = tmp_path / "artifacts" / "checkpoints" / "round-00001"
    with pytest.raises(grpc.RpcError) as info:
        list(verl_stub.Train(_verl_request(random_tiny_checkpoint, problems_path, output), timeout=120))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "exited with status 1" in info.value.details() and "Error executing job" in info.value.details()
    assert list(output.parent.iterdir()) == []


def test_the_verl_backend_refuses_what_it_cannot_do(verl_stub, random_tiny_checkpoint, tmp_path):
    problems_path = write_problems(tmp_path / "artifacts" / "selection.parquet", constant_answer_problems(5))
    output = tmp_path / "artifacts" / "checkpoints" / "round-00001"
    req = _verl_request(random_tiny_checkpoint, problems_path, output)
    req.export_optimizer_state = True
    with pytest.raises(grpc.RpcError) as info:
        list(verl_stub.Train(req, timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not supported by the verl backend" in info.value.details()
    req = _verl_request(random_tiny_checkpoint, problems_path, output)
    req.hyperparams.sampling.stop.append("\n")
    with pytest.raises(grpc.RpcError) as info:
        list(verl_stub.Train(req, timeout=60))
    assert "stop is not supported" in info.value.details()
    assert not output.parent.exists()


# --- the verl processes end with the run -------------------------------------------------------------


def test_a_cancelled_or_timed_out_run_ends_the_verl_process_group(fake_verl, tmp_path, monkeypatch, random_tiny_checkpoint):
    monkeypatch.setenv("STAND_IN_VERL_GATE", str(tmp_path / "never"))  # stays at step 1
    monkeypatch.setenv("STAND_IN_VERL_PID_FILE", str(tmp_path / "verl.pid"))
    config = GRPOConfig(steps=3, batch_size=2, n_samples=2, learning_rate=1e-6, max_tokens=4)
    job = prepare_test_job(config, random_tiny_checkpoint, tmp_path, options=VerlOptions(python=sys.executable))
    seen = []
    started = time.monotonic()
    with pytest.raises(VerlRunError, match="cancelled"):
        for m in iter_verl(job, config, should_stop=lambda: len(seen) >= 1):
            seen.append(m)
    assert [m.step for m in seen] == [1] and time.monotonic() - started < 30
    pid = int((tmp_path / "verl.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # ended and reaped
    with pytest.raises(VerlRunError, match="timed out"):
        list(iter_verl(job, config, timeout_s=1.0))
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_verl_dies_with_a_killed_trainer(tmp_path):
    import signal
    import subprocess

    from services.trainer.backends.verl.process import _LAUNCHER

    # a stand-in trainer that starts a long "verl" through the launcher, then gets SIGKILLed
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', sys.argv[1], str(os.getpid()), 'sleep', '60'])\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(60)\n",
            _LAUNCHER,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    verl_pid = int(trainer.stdout.readline())
    time.sleep(0.5)  # let the launcher exec `sleep`
    assert Path(f"/proc/{verl_pid}/cmdline").read_bytes().startswith(b"sleep")
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{verl_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state in ("Z", "X"):
            break
        time.sleep(0.05)
    else:
        os.kill(verl_pid, signal.SIGKILL)
        pytest.fail("the child outlived its trainer")
