"""The round policy (gradalign_common/round_policy.py) and its zero-gradient rule, as the product runs it:
the real scoring service answers FAILED_PRECONDITION for a zero validation gradient, and the score stage
then scores the round by the fallback mode and records why."""

from __future__ import annotations

import grpc
import pytest

from gradalign_common.errors import ZeroValidationGradientError
from gradalign_common.grpc_utils import channel
from gradalign_common.pb import scoring_pb2, scoring_pb2_grpc
from gradalign_common.records import RolloutRecord, ScoreRecord, write_rollouts
from gradalign_common.round_policy import chunk_ids, chunk_positions, select_round, stage_seed
from services.scheduler import stages
from services.scheduler.app import create_app
from services.scheduler.db import Stage
from services.scheduler.spec import ExperimentSpec
from services.scheduler.stages import STAGES, RoundResults, ScoreResult, SelectResult
from services.scheduler.workers import WorkerRejected
from services.scoring.server import start_server
from services.scoring.settings import ScoringSettings

from scheduler_fixtures import experiment_body, make_settings
from test_stages import RecordingWorkers, install_workers


def test_chunks_wrap_the_pool_and_keep_first_occurrences():
    assert chunk_positions(2, 4, 10) == [8, 9, 0, 1]
    assert chunk_ids(["a", "b", "c"], 1, 4) == ["b", "c", "a"]  # positions 4,5,6,7 -> b c a b; b kept once
    assert len({stage_seed(7, r, s) for r in range(3) for s in ("rollout_train", "rollout_val", "score", "train")}) == 12


def test_a_fallback_round_is_selected_by_the_fallback_mode():
    scores = [ScoreRecord(pid, score, 0.5, 4, False) for pid, score in (("a", 0.9), ("b", 0.1), ("c", 0.5), ("d", 0.7))]
    assert select_round(scores, "negsim", 4, 2) == ["b", "c"]  # negsim: lowest first
    assert select_round(scores, "negsim", 4, 2, fallback="zero validation gradient") == ["a", "d"]  # rand: highest first


def test_the_scoring_service_answers_failed_precondition_for_a_zero_validation_gradient(tmp_path, tiny_model_dir):
    candidates = [RolloutRecord("c", (1, 2), (3, 4), float(i % 2), bool(i % 2)) for i in range(4)]
    solved = [RolloutRecord("v", (1, 2), (3, 4), 1.0, True) for _ in range(4)]  # one group, zero advantage
    paths = [str(write_rollouts(tmp_path / name, rs)) for name, rs in (("c.parquet", candidates), ("v.parquet", solved))]
    server, _, port = start_server(ScoringSettings(host="127.0.0.1", port=0))
    try:
        with channel(f"127.0.0.1:{port}") as ch, pytest.raises(grpc.RpcError) as err:
            request = scoring_pb2.ScoreRequest(
                checkpoint=str(tiny_model_dir), candidate_paths=paths[:1], validation_paths=paths[1:], mode="sim"
            )
            list(scoring_pb2_grpc.ScoringServiceStub(ch).Score(request, timeout=60))
    finally:
        server.stop(grace=None)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "validation gradient is zero" in err.value.details()


def test_the_score_stage_falls_back_when_the_validation_gradient_is_zero(tmp_path, tiny_model_dir, monkeypatch):
    rec = install_workers(monkeypatch, RecordingWorkers(), ("generate", "train"))

    def score(address, deadline_s, request, progress=None, scope=None):
        if request.mode != "rand":  # what the scoring service answers when g_V is zero
            rec.requests["scoring"].append(request)
            raise WorkerRejected("scoring", address, grpc.StatusCode.FAILED_PRECONDITION, str(ZeroValidationGradientError("the validation gradient is zero")))
        return rec.score(address, deadline_s, request, progress, scope)

    monkeypatch.setattr(stages.workers, "score", score)
    app = create_app(make_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", run_orchestrator=False))
    exp = app.state.experiments.create(ExperimentSpec(**experiment_body(tiny_model_dir, num_selections=1, mode="negsim")))
    orch = app.state.orchestrator
    orch._uids[exp.id] = exp.uid
    for _ in range(len(STAGES) + 1):
        assert orch.step(exp.id)
    assert app.state.experiments.get(exp.id).status == "completed"
    first, second = rec.requests["scoring"]
    assert (first.mode, second.mode) == ("negsim", "rand")
    assert "/score-rand/" in second.request_id and list(second.validation_paths) == []
    with app.state.sessions() as s:
        results = RoundResults.from_rows({st.name: st.result for st in s.query(Stage).all()})
    scored = results.get("score", ScoreResult)
    assert scored.mode == "rand" and "validation gradient is zero" in scored.fallback
    # selected by rand's order (highest first), not negsim's (lowest first)
    chosen = results.get("select", SelectResult).selected
    rows = {c.problem_id: c.score for c in app.state.experiments.candidates(exp.id, 0, None, 0, 1000)[0]}
    assert chosen == sorted(rows, key=lambda pid: (-rows[pid], pid))[:4]
