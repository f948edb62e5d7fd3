"""The round policy: what one GradAlign round computes from its inputs, in one place.

The orchestrator (services/scheduler/stages.py) and the quality benchmark
(gradalign_tools/bench/quality.py) both follow it, so a benchmark result is a result of the product's
policy, not of a copy of it:

- which candidates a round takes from the experiment's ordered pool (`chunk_ids`);
- the seed of each stage, derived from the experiment's seed and the round (`stage_seed`);
- how many candidates are kept (`n_selected`) and which (`select_round`);
- the zero-gradient rule: when a gradient mode cannot score because the validation gradient is
  zero (every validation group has zero advantage, so no cosine exists) or not finite, the round
  is scored and selected by the `rand` mode instead, and the round records why (`FALLBACK_MODE`).
"""

from __future__ import annotations

from typing import Sequence

from gradalign_common.records import ScoreRecord
from gradalign_common.selection import SelectionMode, get_mode, select_top

# each stage's offset in the seed derivation; the order is part of every stored experiment's seeds
STAGE_SEED_OFFSETS = {"rollout_train": 0, "rollout_val": 1, "score": 2, "train": 3}
FALLBACK_MODE = "rand"


def stage_seed(seed: int, round_index: int, stage: str) -> int:
    """The seed of `stage` in round `round_index` of an experiment seeded `seed`."""
    return (seed * 1_000_003 + round_index * 101 + STAGE_SEED_OFFSETS[stage] * 7) % (2**31 - 1)


def chunk_positions(round_index: int, chunk_size: int, pool_size: int) -> list[int]:
    """Pool positions of round r's chunk: [r*M, (r+1)*M) modulo the pool size, in order (a pool smaller
    than M wraps, so a position can repeat)."""
    if pool_size < 1:
        raise ValueError("the pool is empty")
    return [(round_index * chunk_size + i) % pool_size for i in range(chunk_size)]


def chunk_ids(pool_order: Sequence[str], round_index: int, chunk_size: int) -> list[str]:
    """Problem ids of round r's candidates from the experiment's ordered pool, first occurrence kept."""
    ids = [pool_order[p] for p in chunk_positions(round_index, chunk_size, len(pool_order))]
    return list(dict.fromkeys(ids))


def n_selected(chunk_size: int, k: int) -> int:
    """How many candidates a round keeps: M/k."""
    return chunk_size // k


def scoring_mode(mode: str | SelectionMode, fallback: str | None) -> SelectionMode:
    """The mode a round's scores and selection follow: the experiment's, or FALLBACK_MODE when the round fell back."""
    return get_mode(FALLBACK_MODE if fallback else mode)


def select_round(scores: Sequence[ScoreRecord], mode: str | SelectionMode, chunk_size: int, k: int, fallback: str | None = None) -> list[str]:
    """The ids of the round's selected candidates, in rank order."""
    return select_top(scores, scoring_mode(mode, fallback), n_selected(chunk_size, k))
