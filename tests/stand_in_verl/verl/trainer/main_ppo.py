"""Stand-in for `python -m verl.trainer.main_ppo <hydra overrides>` (verl 0.9.1), as run by a launcher.

It reads what the real trainer reads from the command (the dataset parquet, the reward
function file, the starting checkpoint: absolute paths on the artifact store), prints verl's
console lines (`step:N - key:value - ...`, prefixed like Ray's TaskRunner output), and saves
the actor the way verl 0.9.1 lays it out: <trainer.default_local_dir>/global_step_<N>/actor/
{model_world_size_<W>_rank_<r>.pt, fsdp_config.json, huggingface/}. The "shards" hold the
parsed overrides and where the process ran, as JSON, for the merger stand-in and the tests.

Environment (the Ray job's runtime_env in the tests):
- STAND_IN_VERL_PID_FILE: write this process's pid there first;
- STAND_IN_VERL_FAIL: print an error and exit 1 before training;
- STAND_IN_VERL_GATE: after step 1, wait (at most 300 s) until this path exists.
"""

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq


def _value(text: str) -> str:
    return text[1:-1].replace("\\'", "'") if text.startswith("'") else text


args = {k.lstrip("+"): _value(v) for k, v in (a.split("=", 1) for a in sys.argv[1:])}
if os.environ.get("STAND_IN_VERL_PID_FILE"):
    Path(os.environ["STAND_IN_VERL_PID_FILE"]).write_text(str(os.getpid()))
print("[validate_config] All configuration checks passed successfully!", flush=True)
if os.environ.get("STAND_IN_VERL_FAIL"):
    print("(TaskRunner pid=42) torch.OutOfMemoryError: CUDA out of memory (stand-in)", flush=True)
    print("Error executing job with overrides: [...]", flush=True)
    sys.exit(1)

# verl 0.9.1's main_ppo loads the reward function from reward.custom_reward_function
spec = importlib.util.spec_from_file_location("custom_module", args["reward.custom_reward_function.path"])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
score = getattr(module, args["reward.custom_reward_function.name"])
rows = pq.read_table(args["data.train_files"]).to_pylist()
rewards = [
    score(data_source=r["data_source"], solution_str="7", ground_truth=r["reward_model"]["ground_truth"],
          extra_info={**r["extra_info"], "num_turns": None, "rollout_reward_scores": {}})  # as verl 0.9.1 calls it
    for r in rows
]
steps = int(args["trainer.total_training_steps"])
gate = os.environ.get("STAND_IN_VERL_GATE")
for step in range(1, steps + 1):
    print(f"Training Progress: {step}/{steps}", flush=True)
    print(
        f"(TaskRunner pid={os.getpid()}) step:{step} - actor/pg_loss:np.float64({0.1 * step}) - actor/kl_loss:0.0 - "
        f"actor/grad_norm:np.float32(1.5) - actor/entropy:2.0 - actor/pg_clipfrac:0.0 - "
        f"critic/score/mean:{sum(rewards) / len(rewards)} - response_length/mean:3.0 - timing_s/step:0.5",
        flush=True,
    )
    if step == 1 and gate:
        deadline = time.monotonic() + 300
        while not Path(gate).exists():
            if time.monotonic() > deadline:
                print(f"the gate {gate} never opened", flush=True)
                sys.exit(3)
            time.sleep(0.1)

world_size = int(args["trainer.n_gpus_per_node"]) * int(args["trainer.nnodes"])
step_dir = Path(args["trainer.default_local_dir"]) / f"global_step_{steps}"
actor = step_dir / "actor"
(actor / "huggingface").mkdir(parents=True, exist_ok=True)
for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
    src = Path(args["actor_rollout_ref.model.path"]) / name
    if src.exists():
        (actor / "huggingface" / name).write_bytes(src.read_bytes())
(actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 1, "world_size": world_size}))
ran = {"args": args, "ray_job_config": json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "null"))}
for rank in range(world_size):
    (actor / f"model_world_size_{world_size}_rank_{rank}.pt").write_text(json.dumps(ran))
(step_dir / "data.pt").write_bytes(b"")
print(f"saved the actor to {actor}", flush=True)
