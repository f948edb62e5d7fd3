"""Suspect rewards of an experiment: the problems whose gradient points against the validation gradient, and
their records for fixing or dropping (services.scheduler.suspect_service)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Response

from gradalign_common.dataset_records import RecordFormat
from gradalign_common.suspects import get_rule, rule_names
from services.scheduler.deps import READ_ACCESS, SuspectsDep
from services.scheduler.errors import EXPERIMENT_NOT_FOUND, STATUS_CONFLICT
from services.scheduler.routes.params import MAX_INT32, ExperimentId
from services.scheduler.schemas import SuspectList
from services.scheduler.suspect_service import SortOrder, SuspectSort, SuspectStatus

router = APIRouter(
    prefix="/api/v1/experiments/{experiment_id}", tags=["suspects"], dependencies=READ_ACCESS, responses=EXPERIMENT_NOT_FOUND,
)

RuleName = Literal[tuple(rule_names())]  # type: ignore[valid-type]
STATUS_QUERY = Query(default=None, description="suspect: flagged in >= min_rounds rounds; watch: in fewer; none: both")
RULE_QUERY = Query(
    default=None,
    description="the flag rule (default: the scheduler's suspect_rule). "
    + " ".join(f"{n}: {get_rule(n).description}" for n in rule_names()),
)
THRESHOLD_QUERY = Query(
    default=None, allow_inf_nan=False,
    description="the rule's threshold (default: the scheduler's suspect_threshold, else the rule's own); per rule, "
    "its range and default: "
    + "; ".join(f"{n} [{get_rule(n).threshold_range[0]:g}, {get_rule(n).threshold_range[1]:g}], {get_rule(n).default_threshold:g}" for n in rule_names()),
)
MIN_ROUNDS_QUERY = Query(default=None, ge=1, le=100_000, description="default: the scheduler's suspect_min_rounds")
CONFLICT = {409: {**STATUS_CONFLICT[409], "description": "the experiment's mode gives no flags, or its train dataset file is gone"}}


@router.get("/suspects", response_model=SuspectList)
def list_suspects(
    experiment_id: ExperimentId,
    suspects: SuspectsDep,
    status: SuspectStatus | None = STATUS_QUERY,
    sort: SuspectSort = Query(
        default="flags", description="flags (most rounds flagged), alignment (lowest), accuracy (lowest), "
        "last_round (latest flag), problem_id; ties by problem_id"
    ),
    order: SortOrder | None = Query(default=None, description="default: the sort key's direction given above"),
    rule: RuleName | None = RULE_QUERY,
    threshold: float | None = THRESHOLD_QUERY,
    min_rounds: int | None = MIN_ROUNDS_QUERY,
    offset: int = Query(default=0, ge=0, le=MAX_INT32),
    limit: int = Query(default=100, ge=1, le=10_000),
) -> SuspectList:
    """Problems flagged by the suspect-reward rule in at least one scored round, with the evidence of every round
    that scored them. An experiment whose mode has no external validation set answers available=false."""
    params = suspects.params(rule, threshold, min_rounds)
    return SuspectList.model_validate(suspects.listing(experiment_id, params, status, sort, order, offset, limit))


@router.get("/suspects.{fmt}", response_class=Response, responses=CONFLICT)
def export_suspects(
    experiment_id: ExperimentId,
    fmt: RecordFormat,
    suspects: SuspectsDep,
    status: SuspectStatus | None = STATUS_QUERY,
    rule: RuleName | None = RULE_QUERY,
    threshold: float | None = THRESHOLD_QUERY,
    min_rounds: int | None = MIN_ROUNDS_QUERY,
) -> Response:
    """The flagged problems' records from the experiment's train dataset file, in the file's own record format
    (JSONL or parquet; gradalign_common.dataset_records), to fix or drop them; they load back as the same problems."""
    export = suspects.export(experiment_id, suspects.params(rule, threshold, min_rounds), status, fmt)
    headers = {"Content-Disposition": f'attachment; filename="{export.filename}"'}
    return Response(export.content, media_type=export.media_type, headers=headers)
