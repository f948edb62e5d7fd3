"""What the verl backend refuses up front: requests and selections verl would reject minutes in,
or that its config cannot express (sampling stop strings)."""

from __future__ import annotations

from typing import Sequence

from gradalign_common.errors import InvalidInputError
from gradalign_common.records import Problem
from gradalign_common.rewards import get_reward_fn
from services.trainer.backends.verl.options import VerlOptions
from services.trainer.grpo import GRPOConfig


def check_verl_request(config: GRPOConfig, num_problems: int, options: VerlOptions) -> None:
    """Raise InvalidInputError for what verl would reject (or that we cannot express) before launching it."""
    options.validate()
    config.validate()
    if config.batch_size > num_problems:
        raise InvalidInputError(
            f"hyperparams.batch_size {config.batch_size} is larger than the selection ({num_problems} problems)"
        )
    responses = config.batch_size * config.n_samples
    if responses % options.n_gpus:
        raise InvalidInputError(
            f"verl needs batch_size x n ({config.batch_size} x {config.n_samples} = {responses}) "
            f"divisible by the GPU count ({options.n_gpus})"
        )
    if config.stop:
        raise InvalidInputError("hyperparams.sampling.stop is not supported by the verl backend")


def check_problems(problems: Sequence[Problem]) -> None:
    """Raise InvalidInputError for a selection verl would choke on minutes in: empty, duplicate ids,
    a data source our reward function (verl_reward.py) does not know."""
    if not problems:
        raise InvalidInputError("the selection is empty: no problems to train on")
    ids = [p.problem_id for p in problems]
    if len(set(ids)) != len(ids):
        raise InvalidInputError("the selection has duplicate problem ids")
    for data_source in sorted({p.data_source for p in problems}):
        get_reward_fn(data_source)
