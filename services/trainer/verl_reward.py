"""The reward function verl calls for our problems (verl's `reward.custom_reward_function`).

verl 0.9.1 loads this file by path (`reward.custom_reward_function.path=<this file>`,
`reward.custom_reward_function.name=compute_score`; verl/trainer/ppo/reward.py
get_custom_reward_fn) inside its reward-loop workers, and its naive reward manager calls
`compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=...)` for
every response (extra_info is our row's plus verl's num_turns and rollout_reward_scores);
it returns the same reward our rollout and scoring services give
(gradalign_common.rewards), so every backend trains on one reward definition.

It is loaded outside our package, so it puts the repository root on sys.path first.
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from gradalign_common.rewards import compute_reward  # noqa: E402


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """The reward of one response text for a problem of `data_source` with answer `ground_truth`."""
    reward, _correct = compute_reward(str(data_source), str(solution_str), str(ground_truth))
    return float(reward)
