"""VerlJob: one verl run laid out on disk (its scratch directory, dataset and both command lines)
before anything runs."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from gradalign_common.logging_setup import get_logger
from gradalign_common.records import Problem
from services.trainer.backends.verl.checks import check_problems, check_verl_request
from services.trainer.backends.verl.command import VERL_VERSION, actor_checkpoint_dir, merge_command, train_command
from services.trainer.backends.verl.dataset import write_verl_dataset
from services.trainer.backends.verl.options import VerlOptions
from services.trainer.grpo import GRPOConfig

log = get_logger("gradalign.trainer.verl")

REPO_ROOT = Path(__file__).resolve().parents[4]  # on verl's PYTHONPATH, for the reward file's imports

@dataclass(frozen=True)
class VerlJob:
    """Everything one verl run needs: its scratch directory, dataset, commands and where the result goes."""

    work_dir: Path
    train_files: Path
    checkpoint_dir: Path  # verl's trainer.default_local_dir
    actor_dir: Path  # checkpoint_dir/global_step_<steps>/actor
    output_dir: Path  # the Hugging Face directory the merger writes
    steps: int
    train_command: list[str]
    merge_command: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the subprocesses' environment


def max_prompt_tokens(problems: Sequence[Problem], tokenizer) -> int:
    """The longest prompt in tokens, as verl renders it (the chat template with the generation prompt)."""
    from gradalign_common.prompts import render_prompt

    return max(len(tokenizer(render_prompt(p.prompt, tokenizer), add_special_tokens=False)["input_ids"]) for p in problems)


def prepare_job(
    problems: Sequence[Problem],
    config: GRPOConfig,
    *,
    model_path: str | Path,
    output_dir: str | Path,
    work_dir: str | Path,
    options: VerlOptions = VerlOptions(),
    reference_path: str | Path | None = None,
    tokenizer=None,
    experiment_name: str = "gradalign",
) -> VerlJob:
    """Write the dataset under work_dir and build both commands; nothing runs yet.

    `reference_path` (the KL reference the request names) cannot be honoured by verl 0.9.1:
    its reference policy is the actor's starting weights, `model_path` (see
    services.trainer.backends.verl.command). A different one is logged and otherwise ignored."""
    check_problems(problems)
    check_verl_request(config, len(problems), options)
    if config.kl_coef > 0 and reference_path is not None and Path(reference_path) != Path(model_path):
        log.warning(
            "verl_reference_is_the_starting_checkpoint",
            requested=str(reference_path),
            used=str(model_path),
            reason=f"verl {VERL_VERSION} builds its reference policy from the actor's model",
        )
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    train_files = write_verl_dataset(work_dir / "train.parquet", problems)
    checkpoint_dir = work_dir / "verl-checkpoints"
    actor_dir = actor_checkpoint_dir(checkpoint_dir, config.steps)
    prompt_length = max_prompt_tokens(problems, tokenizer) if tokenizer is not None else None
    command = train_command(
        config,
        options=options,
        model_path=model_path,
        train_files=train_files,
        val_files=train_files,
        checkpoint_dir=checkpoint_dir,
        num_problems=len(problems),
        max_prompt_length=prompt_length,
        experiment_name=experiment_name,
    )
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return VerlJob(
        work_dir=work_dir,
        train_files=train_files,
        checkpoint_dir=checkpoint_dir,
        actor_dir=actor_dir,
        output_dir=Path(output_dir),
        steps=config.steps,
        train_command=command,
        merge_command=merge_command(actor_dir, output_dir, options.python),
        env={"PYTHONPATH": pythonpath, "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1"},
    )


def new_work_dir(root: str | Path, name: str) -> Path:
    """A fresh scratch directory named like an atomic_path temporary (`.NAME-verl.tmp-xxxxxxxx`), so the
    start-up sweep removes it if the trainer is killed mid-run."""
    return Path(root) / f".{name}-verl.tmp-{uuid.uuid4().hex[:8]}"
