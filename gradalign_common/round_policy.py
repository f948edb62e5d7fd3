"""The round policy: what one GradAlign round computes from its inputs, in one place.

The orchestrator (services/scheduler/stages.py) and the quality benchmark
(gradalign_tools/bench/quality.py) both follow it, so a benchmark result is a result of the product's
policy, not of a copy of it:

- which candidates a round takes from the experiment's ordered pool (`chunk_ids`; with dead-problem
  skipping on, `draw_chunk`: see below);
- the seed of each stage, derived from the experiment's seed and the round (`stage_seed`);
- how many candidates are kept (`n_selected`) and which (`select_round`);
- the zero-gradient rule: when a gradient mode cannot score because the validation gradient is
  zero (every validation group has zero advantage, so no cosine exists) or not finite, the round
  is scored and selected by the `rand` mode instead, and the round records why (`FALLBACK_MODE`).

Skipping dead problems (issue 18, after GRESO, arXiv 2506.02177; off by default). A group whose responses
all score alike has zero advantage: its rollouts cost full price and teach GRPO nothing. A problem's
*streak* is the number of its most recent rounds as a candidate, in a row, in which it was scored with
zero advantage (`zero_advantage_streaks`). With skipping on, a round walks the pool from a cursor (where
the previous round's walk ended) and skips each problem with probability

    p(streak) = min(cap, 1 - (1 - base) ** streak)      (0 for a streak of 0)

(GRESO's "select with probability p_explore ** streak", with base = 1 - p_explore, capped so that a dead
problem is re-tried at least 1 - cap of the times it comes up). The defaults base 0.5, cap 0.9 give 0.5,
0.75, 0.875, then 0.9. The chunk is filled from the following pool positions instead. The walk stops after
one pass over the pool (never loops, never repeats an id in a chunk); if that pass found fewer than
`chunk_size` live problems, the skipped ones are taken back, in walk order, until the chunk is full (a
mostly-dead pool costs what it costs without skipping). The draws are deterministic: a problem's draw in a
round is a hash of (the round's skip seed, its id), so a resumed round takes the same chunk. With skipping
off a round's chunk is exactly `chunk_ids(pool, r, M)` (and its cursor r*M), as before.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from gradalign_common.records import ScoreRecord
from gradalign_common.selection import SelectionMode, get_mode, select_top

# each stage's offset in the seed derivation; the order is part of every stored experiment's seeds
# ("skip_dead" is not a stage: it seeds the round's skip draws; a new key, so no stored seed moved)
STAGE_SEED_OFFSETS = {"rollout_train": 0, "rollout_val": 1, "score": 2, "train": 3, "skip_dead": 4}
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


# ---- skipping dead (zero-advantage) problems ------------------------------------------------------
DEFAULT_SKIP_BASE = 0.5
DEFAULT_SKIP_CAP = 0.9


@dataclass(frozen=True)
class SkipDead:
    """The skip setting: off, or on with p(streak) = min(cap, 1 - (1 - base) ** streak)."""

    enabled: bool = False
    base: float = DEFAULT_SKIP_BASE  # skip probability after one zero-advantage round, in (0, 1]
    cap: float = DEFAULT_SKIP_CAP  # never skip with more than this, in [0, 1): dead problems are re-tried now and then

    def __post_init__(self):
        if not 0.0 < self.base <= 1.0:
            raise ValueError(f"skip base must be in (0, 1], got {self.base!r}")
        if not 0.0 <= self.cap < 1.0:
            raise ValueError(f"skip cap must be in [0, 1), got {self.cap!r}")

    def probability(self, streak: int) -> float:
        """The probability that a problem with `streak` zero-advantage rounds in a row is skipped."""
        if not self.enabled or streak <= 0:
            return 0.0
        return min(self.cap, 1.0 - (1.0 - self.base) ** streak)


@dataclass(frozen=True)
class ChunkDraw:
    """A round's chunk: the candidates' ids in pool order, the problems skipped, and the pool cursors
    (modulo the pool size) where the walk started and where the next round's walk starts."""

    ids: list[str]
    skipped: list[str] = field(default_factory=list)
    start: int = 0
    end: int = 0


def skip_draw(seed: int, problem_id: str) -> float:
    """A uniform number in [0, 1) from (seed, problem id): the same on every machine and run."""
    digest = hashlib.blake2b(f"{seed}/{problem_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def draw_chunk(
    pool_order: Sequence[str],
    cursor: int,
    chunk_size: int,
    streaks: Mapping[str, int] | None = None,
    skip: SkipDead | None = None,
    seed: int = 0,
) -> ChunkDraw:
    """Round's chunk from the pool walked from `cursor`, skipping dead problems as `skip` says (module doc).

    `pool_order` needs only `len` and indexing (a lazy view of a large stored pool will do: at most
    max(chunk_size, pool size) positions are read, in order from the cursor). With skipping off (or no
    streaks) the chunk is positions [cursor, cursor + M) modulo the pool size, first occurrence kept, and
    the next cursor is cursor + M: `chunk_ids` for cursor r*M."""
    n = len(pool_order)
    if n < 1:
        raise ValueError("the pool is empty")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    start = cursor % n
    if skip is None or not skip.enabled:
        ids = list(dict.fromkeys(pool_order[(start + i) % n] for i in range(chunk_size)))
        return ChunkDraw(ids, [], start, (start + chunk_size) % n)
    streaks = streaks or {}
    walked: list[str] = []  # distinct ids in walk order
    seen: set[str] = set()
    taken: set[str] = set()
    skipped: list[str] = []
    steps = 0
    for steps in range(1, max(chunk_size, n) + 1):  # one pass over the pool at most (M positions when M > pool)
        pid = pool_order[(start + steps - 1) % n]
        if pid in seen:
            continue
        seen.add(pid)
        walked.append(pid)
        if skip_draw(seed, pid) < skip.probability(streaks.get(pid, 0)):
            skipped.append(pid)
        else:
            taken.add(pid)
            if len(taken) == chunk_size:
                break
    if len(taken) < chunk_size and skipped:  # a mostly-dead pool: re-try skipped ones rather than run short
        back = skipped[: chunk_size - len(taken)]
        taken.update(back)
        skipped = skipped[len(back) :]
    return ChunkDraw([pid for pid in walked if pid in taken], skipped, start, (start + steps) % n)


def update_streaks(streaks: dict[str, int], scored: Iterable[tuple[str, bool | None]]) -> dict[str, int]:
    """Fold one round's scored candidates (problem id, zero advantage) into `streaks` (in place; returned).
    A candidate with no zero-advantage flag (never scored) leaves its streak as it was."""
    for pid, zero in scored:
        if zero is None:
            continue
        streaks[pid] = streaks.get(pid, 0) + 1 if zero else 0
    return streaks


def zero_advantage_streaks(history: Iterable[tuple[int, str, bool | None]]) -> dict[str, int]:
    """Each problem's current zero-advantage streak from (round, problem id, zero advantage) rows of the
    rounds so far, in any order; problems whose last scored round had a non-zero advantage get 0."""
    by_round: dict[int, list[tuple[str, bool | None]]] = {}
    for r, pid, zero in history:
        by_round.setdefault(r, []).append((pid, zero))
    streaks: dict[str, int] = {}
    for r in sorted(by_round):
        update_streaks(streaks, by_round[r])
    return streaks
