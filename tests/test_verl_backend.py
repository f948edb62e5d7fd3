"""The verl backend (services/trainer/backends/verl), without verl installed.

The command for a sample request is checked against the expected argument list; the
dataset against verl's RL parquet format; the service end to end with a stand-in `verl`
package (tests put it on PYTHONPATH) that answers `python -m verl.trainer.main_ppo` and
`python -m verl.model_merger merge` the way verl 0.9.1 lays out its outputs. That the real
verl 0.9.1 accepts these commands is tests/test_verl_config.py's job.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import grpc
import pyarrow.parquet as pq
import pytest

from gradalign_common.errors import InvalidInputError
from gradalign_common.datasets import load_problems
from gradalign_common.modeling import load_model
from gradalign_common.pb import common_pb2, training_pb2, training_pb2_grpc
from gradalign_common.prompts import encode_messages
from gradalign_common.records import Problem, write_problems
from services.trainer.backends.verl.checks import check_verl_request
from services.trainer.backends.verl.command import (
    REWARD_FILE,
    VERL_VERSION,
    actor_checkpoint_dir,
    epochs_for,
    hydra_value,
    merge_command,
    micro_batch_per_gpu,
    train_command,
)
from services.trainer.backends.verl.dataset import verl_record, write_verl_dataset
from services.trainer.backends.verl.job import max_prompt_tokens, prepare_job
from services.trainer.backends.verl.metrics import parse_console_metrics, step_metrics_from_verl
from services.trainer.backends.verl.options import VerlOptions
from services.trainer.backends.verl.process import VerlRunError
from services.trainer.backends.verl.run import iter_verl
from services.trainer.grpo import GRPOConfig
from services.trainer.marker import MARKER_NAME
from services.trainer.server import create_server
from services.trainer.settings import TrainerSettings
from services.trainer.verl_reward import compute_score
from trainer_fixtures import constant_answer_problems

SAMPLE = GRPOConfig(
    steps=4,
    batch_size=8,
    n_samples=8,
    learning_rate=1e-6,
    clip_eps=0.28,
    kl_coef=0.001,
    entropy_coef=0.001,
    max_grad_norm=1.0,
    max_tokens=3072,
    temperature=1.0,
    top_p=0.95,
    seed=7,
    weight_decay=0.01,
)
CLUSTER = VerlOptions(n_gpus_per_node=8, nnodes=1, tensor_parallel_size=2, gpu_memory_utilization=0.6, micro_batch_size_per_gpu=4)


def sample_command(**overrides) -> list[str]:
    kwargs = dict(
        options=CLUSTER,
        model_path="/ckpt/round-00003",
        train_files="/scratch/job/train.parquet",
        val_files="/scratch/job/train.parquet",
        checkpoint_dir="/scratch/job/verl-checkpoints",
        num_problems=20,
        experiment_name="round-00004",
    )
    kwargs.update(overrides)
    return train_command(SAMPLE, **kwargs)


def test_the_train_command_for_a_sample_request():
    assert VERL_VERSION == "0.9.1"
    assert sample_command() == [
        "python3",
        "-m",
        "verl.trainer.main_ppo",
        "algorithm.adv_estimator=grpo",
        "algorithm.norm_adv_by_std_in_grpo=True",
        "algorithm.use_kl_in_reward=False",
        "data.train_files=/scratch/job/train.parquet",
        "data.val_files=/scratch/job/train.parquet",
        "data.train_batch_size=8",
        "data.max_prompt_length=1024",
        "data.max_response_length=3072",
        "data.filter_overlong_prompts=False",
        "data.truncation=error",
        "data.shuffle=True",
        "data.seed=7",
        "actor_rollout_ref.model.path=/ckpt/round-00003",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.model.use_remove_padding=False",
        "actor_rollout_ref.actor.optim.lr=1e-06",
        "actor_rollout_ref.actor.optim.weight_decay=0.01",
        "actor_rollout_ref.actor.optim.clip_grad=1.0",
        "actor_rollout_ref.actor.ppo_mini_batch_size=8",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.actor.ppo_epochs=1",
        "actor_rollout_ref.actor.use_kl_loss=True",
        "actor_rollout_ref.actor.kl_loss_coef=0.001",
        "actor_rollout_ref.actor.kl_loss_type=low_var_kl",
        "actor_rollout_ref.actor.entropy_coeff=0.001",
        "actor_rollout_ref.actor.clip_ratio=0.28",
        "actor_rollout_ref.actor.clip_ratio_low=0.28",
        "actor_rollout_ref.actor.clip_ratio_high=0.28",
        "actor_rollout_ref.actor.loss_agg_mode=token-mean",
        "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model]",
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.n=8",
        "actor_rollout_ref.rollout.temperature=1.0",
        "actor_rollout_ref.rollout.top_p=0.95",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=2",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.6",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
        f"reward.custom_reward_function.path={REWARD_FILE}",
        "reward.custom_reward_function.name=compute_score",
        "trainer.total_training_steps=4",
        "trainer.total_epochs=2",
        "trainer.n_gpus_per_node=8",
        "trainer.nnodes=1",
        "trainer.default_local_dir=/scratch/job/verl-checkpoints",
        "trainer.save_freq=4",
        "trainer.resume_mode=disable",
        "trainer.test_freq=-1",
        "trainer.val_before_train=False",
        "trainer.critic_warmup=0",
        "trainer.logger=[console]",
        "trainer.project_name=gradalign",
        "trainer.experiment_name=round-00004",
    ]


def test_command_variants():
    no_kl = train_command(dataclasses.replace(SAMPLE, kl_coef=0.0), **_kwargs())
    assert "actor_rollout_ref.actor.use_kl_loss=False" in no_kl
    # no separate reference model in verl 0.9.1 (the reference is the starting checkpoint)
    assert not any("actor_rollout_ref.ref.model" in a for a in [*no_kl, *sample_command()])
    # with flash-attn in verl's environment, verl's attention defaults stay (flash_attention_2, no padding)
    flash = sample_command(options=dataclasses.replace(CLUSTER, attn_implementation="flash_attention_2"))
    assert not any("attn_implementation" in a or "use_remove_padding" in a for a in flash)
    assert [a for a in sample_command() if a not in flash] == [
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.model.use_remove_padding=False",
    ]
    eager = sample_command(options=dataclasses.replace(CLUSTER, attn_implementation="eager"))
    assert "+actor_rollout_ref.model.override_config.attn_implementation=eager" in eager
    with pytest.raises(InvalidInputError, match="attn_implementation"):
        sample_command(options=dataclasses.replace(CLUSTER, attn_implementation="flash_attention_3"))
    # the longest prompt raises max_prompt_length; extra overrides come last; odd strings are quoted
    extra = dataclasses.replace(CLUSTER, python="/opt/verl/bin/python", extra_overrides=("trainer.device=npu",))
    cmd = sample_command(options=extra, max_prompt_length=2048, model_path="/ckpt/a b,c", experiment_name="it's")
    assert cmd[0] == "/opt/verl/bin/python" and cmd[-1] == "trainer.device=npu"
    assert "data.max_prompt_length=2048" in cmd
    assert "actor_rollout_ref.model.path='/ckpt/a b,c'" in cmd
    assert "trainer.experiment_name='it\\'s'" in cmd


def test_settings_reach_the_command():
    options = TrainerSettings(verl_attn_implementation="eager", verl_n_gpus_per_node=2).verl_options()
    assert options.attn_implementation == "eager" and options.n_gpus == 2
    assert VerlOptions().attn_implementation == "sdpa"


def _kwargs(**overrides):
    kwargs = dict(
        options=CLUSTER,
        model_path="/m",
        train_files="/t.parquet",
        val_files="/t.parquet",
        checkpoint_dir="/c",
        num_problems=20,
    )
    kwargs.update(overrides)
    return kwargs


def test_merge_command_and_checkpoint_layout():
    actor = actor_checkpoint_dir("/scratch/job/verl-checkpoints", 4)
    assert actor == Path("/scratch/job/verl-checkpoints/global_step_4/actor")
    assert merge_command(actor, "/ckpt/.round-00004.tmp-1234abcd") == [
        "python3",
        "-m",
        "verl.model_merger",
        "merge",
        "--backend",
        "fsdp",
        "--local_dir",
        "/scratch/job/verl-checkpoints/global_step_4/actor",
        "--target_dir",
        "/ckpt/.round-00004.tmp-1234abcd",
    ]


def test_hydra_values():
    assert [hydra_value(v) for v in (True, False, 3, 0.5, 1e-6, ["console"], [])] == [
        "True",
        "False",
        "3",
        "0.5",
        "1e-06",
        "[console]",
        "[]",
    ]
    assert hydra_value("/a/b-c_d.parquet") == "/a/b-c_d.parquet"
    assert hydra_value("123") == "'123'" and hydra_value("true") == "'true'" and hydra_value("null") == "'null'"
    assert hydra_value("a=b") == "'a=b'" and hydra_value("") == "''"
    with pytest.raises(InvalidInputError):
        hydra_value(float("nan"))


def test_batch_checks_and_micro_batches():
    assert micro_batch_per_gpu(SAMPLE, CLUSTER) == 4  # 64 responses / 8 GPUs = 8 per GPU
    assert micro_batch_per_gpu(dataclasses.replace(SAMPLE, batch_size=3), dataclasses.replace(CLUSTER, n_gpus_per_node=2)) == 4
    assert micro_batch_per_gpu(dataclasses.replace(SAMPLE, batch_size=3, n_samples=6), VerlOptions(micro_batch_size_per_gpu=4)) == 3
    assert micro_batch_per_gpu(SAMPLE, VerlOptions(micro_batch_size_per_gpu=1000)) == 64
    assert epochs_for(4, 8, 20) == 2 and epochs_for(1, 8, 8) == 1 and epochs_for(5, 2, 5) == 3
    cases = [
        (dataclasses.replace(SAMPLE, batch_size=3, n_samples=2), CLUSTER, 20, "divisible by the GPU count"),
        (SAMPLE, CLUSTER, 7, "larger than the selection"),
        (dataclasses.replace(SAMPLE, stop=("\n",)), CLUSTER, 20, "stop is not supported"),
        (SAMPLE, dataclasses.replace(CLUSTER, tensor_parallel_size=3), 20, "must divide the GPU count"),
        (SAMPLE, dataclasses.replace(CLUSTER, gpu_memory_utilization=0.0), 20, "gpu_memory_utilization"),
    ]
    for config, options, n, match in cases:
        with pytest.raises(InvalidInputError, match=match):
            check_verl_request(config, n, options)


def test_the_dataset_is_verl_rl_parquet(tmp_path):
    problems = [
        Problem("p-1", encode_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1="}]), "arith", "2"),
        Problem("p-2", encode_messages([{"role": "user", "content": "Say 7"}]), "exact_match", "7"),
    ]
    path = write_verl_dataset(tmp_path / "train.parquet", problems)
    table = pq.read_table(path)
    assert table.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    rows = table.to_pylist()
    assert rows[0] == {
        "data_source": "arith",
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1="}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "2"},
        "extra_info": {"index": "p-1", "split": "train"},
    }
    assert rows[1] == verl_record(problems[1])
    assert rows[1]["ability"] == "exact_match"
    assert load_problems(path) == problems  # our VERL-format reader reads it back unchanged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.parquet"]
    with pytest.raises(InvalidInputError):
        write_verl_dataset(tmp_path / "empty.parquet", [])


def test_console_metrics_lines():
    line = (
        "(TaskRunner pid=123) step:3 - actor/pg_loss:np.float64(-0.25) - actor/kl_loss:0.002 - "
        "actor/grad_norm:np.float32(1.5) - actor/entropy:0.75 - actor/pg_clipfrac:0.125 - "
        "critic/score/mean:0.5 - response_length/mean:100.0 - timing_s/step:32.0 - perf/throughput:900.0 - "
        "training/epoch:0 - val-core/x/acc/mean@1:nan"
    )
    parsed = parse_console_metrics(line)
    assert parsed["step"] == 3 and parsed["actor/pg_loss"] == -0.25 and parsed["actor/grad_norm"] == 1.5
    m = step_metrics_from_verl(parsed, SAMPLE, n_gpus=8)
    assert m.step == 3 and m.mean_reward == 0.5 and m.kl == 0.002 and m.clip_fraction == 0.125
    assert m.loss == pytest.approx(-0.25 + 0.001 * 0.002 - 0.001 * 0.75)
    assert m.tokens_per_second == pytest.approx(100.0 * 64 / 32.0)
    no_timing = step_metrics_from_verl({k: v for k, v in parsed.items() if k != "timing_s/step"}, SAMPLE, 8)
    assert no_timing.tokens_per_second == 900.0 * 8
    assert parse_console_metrics("Training Progress:  25%|##5  | 1/4") is None
    assert parse_console_metrics("step:0 - val-core/acc:0.5") == {"step": 0.0, "val-core/acc": 0.5}
    assert step_metrics_from_verl({"step": 0.0, "val-core/acc": 0.5}, SAMPLE) is None  # validation only


def test_the_reward_file_verl_loads():
    assert compute_score("exact_match", "7", "7") == 1.0
    assert compute_score(data_source="arith", solution_str="12", ground_truth="13", extra_info={"index": "1"}) == 0.0


# --- the service with a stand-in verl ----------------------------------------------------------------

FAKE_MAIN_PPO = '''
import importlib.util, json, os, sys
from pathlib import Path
import pyarrow.parquet as pq

def value(v):
    return v[1:-1].replace("\\\\'", "'") if v.startswith("'") else v

args = {k.lstrip("+"): value(v) for k, v in (a.split("=", 1) for a in sys.argv[1:])}
print("[validate_config] All configuration checks passed successfully!", flush=True)
if os.environ.get("FAKE_VERL_FAIL"):
    print("Error executing job with overrides: ...", flush=True)
    sys.exit(1)
# verl 0.9.1's main_ppo loads the reward function from reward.custom_reward_function (verl/trainer/ppo/reward.py)
spec = importlib.util.spec_from_file_location("custom_module", args["reward.custom_reward_function.path"])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
score = getattr(module, args["reward.custom_reward_function.name"])
rows = pq.read_table(args["data.train_files"]).to_pylist()
rewards = [score(data_source=r["data_source"], solution_str="7", ground_truth=r["reward_model"]["ground_truth"],
                 extra_info={**r["extra_info"], "num_turns": None, "rollout_reward_scores": {}}) for r in rows]
steps = int(args["trainer.total_training_steps"])
for step in range(1, steps + 1):
    print(f"Training Progress: {step}/{steps}", flush=True)
    print(f"(TaskRunnerV1 pid=42) step:{step} - actor/pg_loss:np.float64({0.1 * step}) - actor/kl_loss:0.0 - "
          f"actor/grad_norm:np.float32(1.5) - actor/entropy:2.0 - actor/pg_clipfrac:0.0 - "
          f"critic/score/mean:{sum(rewards) / len(rewards)} - response_length/mean:3.0 - timing_s/step:0.5", flush=True)
    if os.environ.get("FAKE_VERL_HANG"):
        Path(f"fake-verl-{step}.pid").write_text(str(os.getpid()))  # in the job's work dir (our cwd)
        import time
        time.sleep(120)
# verl 0.9.1's layout (trainer/ppo/v1/trainer_base.py _save_checkpoint, utils/checkpoint/fsdp_checkpoint_manager.py):
# <default_local_dir>/global_step_<N>/actor/{model_world_size_<W>_rank_<r>.pt, fsdp_config.json, huggingface/}, data.pt
world_size = int(args["trainer.n_gpus_per_node"]) * int(args["trainer.nnodes"])
step_dir = Path(args["trainer.default_local_dir"]) / f"global_step_{steps}"
actor = step_dir / "actor"
(actor / "huggingface").mkdir(parents=True)
for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
    src = Path(args["actor_rollout_ref.model.path"]) / name
    if src.exists():
        (actor / "huggingface" / name).write_bytes(src.read_bytes())
(actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 1, "world_size": world_size}))
for rank in range(world_size):  # stand-ins for the sharded state dicts: the arguments, as JSON
    (actor / f"model_world_size_{world_size}_rank_{rank}.pt").write_text(json.dumps(args))
(step_dir / "data.pt").write_bytes(b"")
'''

# verl 0.9.1's merger argparse (verl/model_merger/base_model_merger.py parse_args), trimmed
FAKE_MERGER = '''
import argparse, json, shutil
from pathlib import Path
parser = argparse.ArgumentParser()
sub = parser.add_subparsers(dest="operation", required=True)
base = argparse.ArgumentParser(add_help=False)
base.add_argument("--backend", type=str, required=True, choices=["fsdp", "megatron"])
base.add_argument("--local_dir", type=str, default=None)
merge = sub.add_parser("merge", parents=[base])
merge.add_argument("--target_dir", default="tmp", type=str)
a = parser.parse_args()
assert a.operation == "merge" and a.backend == "fsdp"
local = Path(a.local_dir)
world_size = json.loads((local / "fsdp_config.json").read_text())["world_size"]
assert (local / "huggingface" / "config.json").is_file()
args = json.loads((local / f"model_world_size_{world_size}_rank_0.pt").read_text())
shutil.copytree(args["actor_rollout_ref.model.path"], a.target_dir, dirs_exist_ok=True)
(Path(a.target_dir) / "verl-args.json").write_text(json.dumps(args))
'''


@pytest.fixture
def fake_verl(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "fake-verl"
    files = {
        "verl/__init__.py": "",
        "verl/trainer/__init__.py": "",
        "verl/trainer/main_ppo.py": FAKE_MAIN_PPO,
        "verl/model_merger/__init__.py": "",
        "verl/model_merger/__main__.py": FAKE_MERGER,
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))
    monkeypatch.setenv("PYTHONPATH", str(root))
    return root


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
    args = json.loads((output / "verl-args.json").read_text())
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
    monkeypatch.setenv("FAKE_VERL_FAIL", "1")
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


def test_prepare_job_writes_the_dataset_and_both_commands(tmp_path, random_tiny_checkpoint):
    from gradalign_common.modeling import load_tokenizer

    problems = constant_answer_problems(4)
    config = GRPOConfig(steps=2, batch_size=2, n_samples=2, learning_rate=1e-6, max_tokens=4)
    job = prepare_job(
        problems,
        config,
        model_path=random_tiny_checkpoint,
        output_dir=tmp_path / "out",
        work_dir=tmp_path / "work",
        options=VerlOptions(max_prompt_length=1),
        tokenizer=load_tokenizer(random_tiny_checkpoint),
    )
    assert job.train_files == tmp_path / "work" / "train.parquet" and job.train_files.exists()
    assert job.actor_dir == tmp_path / "work" / "verl-checkpoints" / "global_step_2" / "actor"
    assert job.merge_command[-3:] == [str(job.actor_dir), "--target_dir", str(tmp_path / "out")]
    longest = max_prompt_tokens(problems, load_tokenizer(random_tiny_checkpoint))
    assert longest > 1 and f"data.max_prompt_length={longest}" in job.train_command  # raised to the longest prompt
    assert job.env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(REWARD_FILE).parents[2])


def test_a_reference_other_than_the_starting_checkpoint_is_logged_not_passed(tmp_path, random_tiny_checkpoint, capsys, caplog):
    config = GRPOConfig(steps=1, batch_size=2, n_samples=2, learning_rate=1e-6, max_tokens=4, kl_coef=0.01)
    job = prepare_job(
        constant_answer_problems(4),
        config,
        model_path=random_tiny_checkpoint,
        output_dir=tmp_path / "out",
        work_dir=tmp_path / "work",
        reference_path=tmp_path / "the-runs-initial-model",
    )
    assert "actor_rollout_ref.actor.use_kl_loss=True" in job.train_command
    assert not any("actor_rollout_ref.ref.model" in a for a in job.train_command)
    # structlog prints to stdout, or goes through stdlib logging once a command in this process configured it
    assert "verl_reference_is_the_starting_checkpoint" in capsys.readouterr().out + caplog.text


def test_a_cancelled_or_timed_out_run_ends_the_verl_process_group(fake_verl, tmp_path, monkeypatch, random_tiny_checkpoint):
    monkeypatch.setenv("FAKE_VERL_HANG", "1")
    config = GRPOConfig(steps=3, batch_size=2, n_samples=2, learning_rate=1e-6, max_tokens=4)
    job = prepare_job(
        constant_answer_problems(4),
        config,
        model_path=random_tiny_checkpoint,
        output_dir=tmp_path / "out",
        work_dir=tmp_path / "work",
        options=VerlOptions(python=sys.executable),
    )
    seen = []
    started = time.monotonic()
    with pytest.raises(VerlRunError, match="cancelled"):
        for m in iter_verl(job, config, should_stop=lambda: len(seen) >= 1):
            seen.append(m)
    assert [m.step for m in seen] == [1] and time.monotonic() - started < 30
    pid = int((job.work_dir / "fake-verl-1.pid").read_text())
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
