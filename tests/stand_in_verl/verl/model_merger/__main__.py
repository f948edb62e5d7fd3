"""Stand-in for `python -m verl.model_merger merge --backend fsdp --local_dir <actor> --target_dir <dir>`
(verl 0.9.1's argparse, trimmed): checks the actor's layout, then writes a loadable Hugging Face
directory (the starting checkpoint's files) plus `stand-in-run.json`, what the trainer stand-in recorded."""

import argparse
import json
import shutil
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
ran = json.loads((local / f"model_world_size_{world_size}_rank_0.pt").read_text())
shutil.copytree(ran["args"]["actor_rollout_ref.model.path"], a.target_dir, dirs_exist_ok=True)
(Path(a.target_dir) / "stand-in-run.json").write_text(json.dumps(ran))
