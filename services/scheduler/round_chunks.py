"""A round's chunk of candidates from an experiment's stored pool, by the round policy.

With skip_dead off, round r takes pool positions [r*M, (r+1)*M) (gradalign_common.round_policy.chunk_positions);
with it on, gradalign_common.round_policy.draw_chunk walks the stored pool from where the previous round's walk
ended, skipping problems by their zero-advantage streaks in the stored candidates of earlier rounds. The walk and
what it skipped are written on the round row, so a resumed round draws the same chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select as sql_select
from sqlalchemy.orm import Session

from gradalign_common.logging_setup import get_logger
from gradalign_common.round_policy import ChunkDraw, chunk_positions, draw_chunk, zero_advantage_streaks
from services.scheduler.db import Candidate, Experiment, PoolProblem, Round
from services.scheduler.spec import StoredSpec

log = get_logger("gradalign.round_chunks")


def draw_round_chunk(s: Session, exp_id: int, round_id: int, r: int, spec: StoredSpec, skip_seed: int) -> ChunkDraw:
    """Round r's candidates from the stored pool order, by the round policy: positions [r*M, (r+1)*M) mod the pool
    size (chunk_positions) with skipping off; with skip_dead on, round_policy.draw_chunk from the cursor where the
    previous round's walk ended, with each problem's zero-advantage streak from the stored candidates of the
    earlier rounds and the round's skip seed, so a resumed round draws the same chunk. The walk and what it
    skipped are written on the round row (chunk_start/end, skipped_candidates, rollouts_saved, tokens_saved)."""
    m = spec.chunk_size
    pool_size = s.get(Experiment, exp_id).pool_size
    tokens_saved = 0.0
    if not spec.skip_dead:
        positions = chunk_positions(r, m, pool_size)
        rows = s.execute(
            sql_select(PoolProblem.position, PoolProblem.problem_id).where(
                PoolProblem.experiment_id == exp_id, PoolProblem.position.in_(set(positions))
            )
        ).all()
        at = dict(rows)
        draw = ChunkDraw(list(dict.fromkeys(at[p] for p in positions)), [], positions[0], (r * m + m) % pool_size)
    else:
        previous_end = s.scalar(sql_select(Round.chunk_end).where(Round.experiment_id == exp_id, Round.index == r - 1))
        cursor = previous_end if previous_end is not None else (r * m) % pool_size
        history = s.execute(
            sql_select(Round.index, Candidate.problem_id, Candidate.zero_advantage, Candidate.mean_response_length)
            .join(Round, Candidate.round_id == Round.id)
            .where(Round.experiment_id == exp_id, Round.index < r)
            .order_by(Round.index)
        ).all()
        streaks = zero_advantage_streaks((i, pid, zero) for i, pid, zero, _ in history)
        draw = draw_chunk(StoredPool(s, exp_id, pool_size, m), cursor, m, streaks, spec.skip_setting(), skip_seed)
        last_length = {pid: length for _, pid, _, length in history}  # by round: the latest wins
        tokens_saved = sum(last_length.get(pid, 0.0) for pid in draw.skipped) * spec.n_samples_train
    rnd = s.get(Round, round_id)
    rnd.chunk_start, rnd.chunk_end = draw.start, draw.end
    rnd.skipped_candidates = len(draw.skipped)
    rnd.rollouts_saved = len(draw.skipped) * spec.n_samples_train
    rnd.tokens_saved = tokens_saved
    s.commit()
    if draw.skipped:
        log.info("skipped_dead", experiment=exp_id, round=r, skipped=len(draw.skipped), chunk=len(draw.ids))
    return draw


class StoredPool(Sequence):
    """An experiment's stored pool order as a lazy sequence: positions are read in blocks as a walk reaches them."""

    def __init__(self, session, experiment_id: int, size: int, block: int):
        self.session, self.experiment_id, self.size, self.block = session, experiment_id, size, max(block, 256)
        self.cache: dict[int, str] = {}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, position):
        if not isinstance(position, int) or not 0 <= position < self.size:
            raise IndexError(position)
        if position not in self.cache:
            rows = self.session.execute(
                sql_select(PoolProblem.position, PoolProblem.problem_id).where(
                    PoolProblem.experiment_id == self.experiment_id,
                    PoolProblem.position >= position, PoolProblem.position < position + self.block,
                )
            ).all()
            self.cache.update(rows)
        return self.cache[position]
