"""services.scheduler.bulk: bulk candidate updates (COPY + UPDATE ... FROM on PostgreSQL, executemany elsewhere)."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from services.scheduler.bulk import insert_candidates, update_candidates
from services.scheduler.db import Candidate, Experiment, Round, make_engine, make_session_factory
from services.scheduler.migrate import upgrade


@pytest.fixture
def sessions(database_url):
    engine = make_engine(database_url)
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


def _round_with_candidates(sessions, n: int) -> list[int]:
    with sessions() as s:
        exp = Experiment(name="bulk", status="running", config={}, checkpoint="-", pool_size=n)
        s.add(exp)
        s.flush()
        rnd = Round(experiment_id=exp.id, index=0, status="running", checkpoint_in="-")
        s.add(rnd)
        s.flush()
        insert_candidates(s, [
            {"round_id": rnd.id, "problem_id": f"p{i}", "n_responses": 8, "accuracy": 0.5, "mean_reward": 0.5,
             "mean_response_length": 3.0, "selected": False}
            for i in range(n)
        ])
        s.commit()
        return list(s.scalars(select(Candidate.id).where(Candidate.round_id == rnd.id).order_by(Candidate.id)))


def _stored(sessions) -> dict[int, tuple]:
    with sessions() as s:
        rows = s.execute(select(Candidate.id, Candidate.score, Candidate.zero_advantage, Candidate.selected, Candidate.rank))
        return {r[0]: tuple(r[1:]) for r in rows}


def test_update_candidates_sets_every_row_by_id(sessions):
    ids = _round_with_candidates(sessions, 257)
    rows = [{"id": cid, "score": 0.25 - 0.001 * i, "zero_advantage": i % 3 == 0, "selected": i < 10, "rank": i if i < 10 else None}
            for i, cid in enumerate(ids)]
    with sessions() as s:
        update_candidates(s, rows)
        # a second update in the same transaction (the staging table is recreated)
        update_candidates(s, [{"id": ids[0], "score": 9.0}])
        s.commit()
    stored = _stored(sessions)
    for i, cid in enumerate(ids):
        score, zero, selected, rank = stored[cid]
        assert score == pytest.approx(9.0 if i == 0 else 0.25 - 0.001 * i)
        assert zero is (i % 3 == 0) and selected is (i < 10) and rank == (i if i < 10 else None)


def test_a_rolled_back_update_leaves_nothing_changed(sessions):
    ids = _round_with_candidates(sessions, 20)
    before = _stored(sessions)
    with sessions() as s:
        update_candidates(s, [{"id": cid, "score": 1.0, "selected": True} for cid in ids])
        s.rollback()
    assert _stored(sessions) == before


def test_rows_must_name_the_same_known_columns(sessions):
    ids = _round_with_candidates(sessions, 2)
    with sessions() as s:
        with pytest.raises(ValueError, match="same columns"):
            update_candidates(s, [{"id": ids[0], "score": 1.0}, {"id": ids[1], "rank": 2}])
        with pytest.raises(ValueError, match="unknown"):
            update_candidates(s, [{"id": ids[0], "no_such_column": 1}])
        update_candidates(s, [])  # nothing to do
