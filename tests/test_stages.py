"""The stage table: requests are built from the typed spec, keyed by the experiment's uid, and the
validation rollouts a score request names come from what the mode says, not from its name.

The gRPC clients are replaced by the stand-in servicers called in-process (a unit test of the
orchestrator and stages around them); tests/test_orchestrator_concurrency.py runs the same stand-ins
behind real gRPC servers.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from gradalign_tools.bench.standin_workers import CallLog, StandInRollout, StandInScoring, StandInTrainer
from services.scheduler import stages
from services.scheduler.app import create_app
from services.scheduler.db import Stage
from services.scheduler.spec import ExperimentSpec
from services.scheduler.stages import STAGES, RoundResults, RolloutResult, SelectResult, TrainResult

from scheduler_fixtures import experiment_body, make_settings


class RecordingWorkers:
    """workers.generate/score/train, answered by the stand-in servicers in-process; every request kept."""

    def __init__(self):
        log = CallLog()
        self.rollout, self.scoring, self.trainer = StandInRollout(0.0, log), StandInScoring(0.0, log), StandInTrainer(0.0, log)
        self.requests: dict[str, list] = {"rollout": [], "scoring": [], "trainer": []}

    def generate(self, address, deadline_s, request, progress=None, scope=None):
        self.requests["rollout"].append(request)
        return next(e.result for e in self.rollout.Generate(request, None) if e.HasField("result"))

    def score(self, address, deadline_s, request, progress=None, scope=None):
        self.requests["scoring"].append(request)
        events = list(self.scoring.Score(request, None))
        return [e.score for e in events if e.HasField("score")], next(e.summary for e in events if e.HasField("summary"))

    def train(self, address, deadline_s, request, on_step=None, scope=None):
        self.requests["trainer"].append(request)
        return next(e.result for e in self.trainer.Train(request, None) if e.HasField("result"))


def install_workers(monkeypatch, rec: RecordingWorkers, names=("generate", "score", "train")) -> RecordingWorkers:
    """`rec`'s methods in place of the scheduler's worker clients (stages.workers.<name>) for the test; `rec` back."""
    for name in names:
        monkeypatch.setattr(stages.workers, name, getattr(rec, name))
    return rec


@pytest.fixture
def recorded(monkeypatch):
    return install_workers(monkeypatch, RecordingWorkers())


def _run_one_round(tmp_path: Path, model_dir: Path, **overrides):
    app = create_app(make_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", run_orchestrator=False))
    service, orch = app.state.experiments, app.state.orchestrator
    exp = service.create(ExperimentSpec(**experiment_body(model_dir, num_selections=1, **overrides)))
    orch._uids[exp.id] = exp.uid
    for _ in range(len(STAGES) + 1):
        assert orch.step(exp.id)
    return app, service.get(exp.id)


@pytest.mark.parametrize(
    "mode, validation_from",
    [("sim", "rollout_val"), ("dot", "rollout_val"), ("align", "rollout_train"), ("rand", None), ("accgreedy", None)],
)
def test_score_requests_name_the_validation_rollouts_the_mode_asks_for(tmp_path, tiny_model_dir, recorded, mode, validation_from):
    _, exp = _run_one_round(tmp_path, tiny_model_dir, mode=mode)
    assert exp.status == "completed", exp.error
    by_stage = {}
    for r in recorded.requests["rollout"]:
        by_stage.setdefault(r.request_id.split("/")[2], []).append(r.output_path)
    (score,) = recorded.requests["scoring"]
    assert list(score.validation_paths) == (by_stage[validation_from] if validation_from else [])
    assert list(score.candidate_paths) == by_stage["rollout_train"]


def test_requests_are_built_from_the_typed_spec_and_keyed_by_the_uid(tmp_path, tiny_model_dir, recorded):
    app, exp = _run_one_round(
        tmp_path, tiny_model_dir, scoring_method="top-layers-2", scoring_dtype="bfloat16", max_grad_norm=0.25,
        learning_rate=3e-4, reuse_rollouts=False, scoring_memory_budget="6GiB",
    )
    assert exp.status == "completed", exp.error
    assert len(exp.uid) == 32 and exp.uid != str(exp.id)
    requests = [r for rs in recorded.requests.values() for r in rs]
    assert requests and all(r.request_id.startswith(f"{exp.uid}/0/") for r in requests)
    exp_dir = str(app.state.orchestrator.store.experiment_dir(exp.uid))
    outputs = [r.output_path for r in recorded.requests["rollout"] + recorded.requests["scoring"]]
    assert all(p.startswith(exp_dir + "/") for p in outputs + [recorded.requests["trainer"][0].output_checkpoint])
    (score,) = recorded.requests["scoring"]
    assert (score.method, score.dtype, score.mode, score.memory_budget) == ("top-layers-2", "bfloat16", "sim", "6GiB")
    (train,) = recorded.requests["trainer"]
    assert train.hyperparams.max_grad_norm == pytest.approx(0.25)
    assert train.hyperparams.learning_rate == pytest.approx(3e-4)
    assert list(train.rollouts_paths) == []  # reuse_rollouts=False
    assert train.reference_checkpoint == str(tiny_model_dir.resolve())


def test_stage_results_are_stored_and_read_back_typed(tmp_path, tiny_model_dir, recorded):
    app, exp = _run_one_round(tmp_path, tiny_model_dir)
    with app.state.sessions() as s:
        rows = {st.name: st.result for st in s.query(Stage).all()}
    results = RoundResults.from_rows(rows)
    assert isinstance(results.get("rollout_train", RolloutResult), RolloutResult)
    selected = results.get("select", SelectResult)
    assert len(selected.selected) == 16 // 4 and Path(selected.path).exists()
    assert results.get("train", TrainResult).checkpoint == recorded.requests["trainer"][0].output_checkpoint
    with pytest.raises(RuntimeError, match="no TrainResult"):
        RoundResults.from_rows({}).get("train", TrainResult)


def test_a_failed_stage_shows_no_server_path(tmp_path, tiny_model_dir, recorded, monkeypatch):
    """A worker's error naming artifact-store and models-root files is stored (and shown by the API) with
    those paths relative to their roots."""
    from services.scheduler.workers import WorkerRejected

    artifacts = tmp_path / "artifacts"

    def failing_train(address, deadline_s, request, on_step=None, scope=None):
        raise WorkerRejected("trainer", address, grpc.StatusCode.INVALID_ARGUMENT,
                             f"cannot read {artifacts}/experiments/x/select.parquet beside {tiny_model_dir}/config.json")

    monkeypatch.setattr(stages.workers, "train", failing_train)
    app = create_app(make_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", run_orchestrator=False,
                                   retry_limit=0, models_root=tiny_model_dir.parent))
    service, orch = app.state.experiments, app.state.orchestrator
    exp = service.create(ExperimentSpec(**experiment_body(tiny_model_dir, num_selections=1)))
    orch._uids[exp.id] = exp.uid
    for _ in range(len(STAGES) + 1):
        orch.step(exp.id)
    failed = service.get(exp.id)
    assert failed.status == "failed", failed.status
    assert "artifacts/experiments/x/select.parquet" in failed.error and "models/tiny-arith/config.json" in failed.error
    assert str(tmp_path) not in failed.error and str(tiny_model_dir) not in failed.error
