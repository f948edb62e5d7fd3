"""Datasets: upload, register a file under the data root, mix registered ones, list, get."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request

from services.scheduler.deps import READ_ACCESS, WRITE_ACCESS, DatasetsDep
from services.scheduler.errors import DATASET_NOT_FOUND, NAME_CONFLICT, UPLOAD_TOO_LARGE
from services.scheduler.schemas import DATASET_NAME_PATTERN, DatasetMix, DatasetOut, DatasetRegister

router = APIRouter(prefix="/api/v1/datasets", tags=["datasets"])


UPLOAD_BODY = {  # the route reads the raw body itself, so FastAPI cannot see it: described here
    "requestBody": {
        "required": True,
        "description": "the dataset file as it is: JSON lines (format=jsonl) or a parquet file (format=parquet)",
        "content": {
            "application/x-ndjson": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post(
    "/upload", status_code=201, response_model=DatasetOut, dependencies=WRITE_ACCESS,
    responses={**NAME_CONFLICT, **UPLOAD_TOO_LARGE}, openapi_extra=UPLOAD_BODY,
)
async def upload_dataset(
    request: Request,
    datasets: DatasetsDep,
    name: str = Query(min_length=1, max_length=128, pattern=DATASET_NAME_PATTERN),
    format: Literal["jsonl", "parquet"] = Query(description="format of the request body"),
) -> DatasetOut:
    """Upload a dataset file as the raw request body (streamed; VERL-style records)."""
    return DatasetOut.model_validate(await datasets.upload(name, format, request.stream()))


@router.post("/register", status_code=201, response_model=DatasetOut, dependencies=WRITE_ACCESS, responses=NAME_CONFLICT)
def register_dataset(body: DatasetRegister, datasets: DatasetsDep) -> DatasetOut:
    """Import a file that lies under the scheduler's data root."""
    return DatasetOut.model_validate(datasets.register(body.name, body.path))


@router.post(
    "/mix", status_code=201, response_model=DatasetOut, dependencies=WRITE_ACCESS,
    responses={**DATASET_NOT_FOUND, **NAME_CONFLICT},
)
def mix_datasets(body: DatasetMix, datasets: DatasetsDep) -> DatasetOut:
    """A new dataset of `count` problems from each registered dataset (0: all), shuffled with `seed`."""
    return DatasetOut.model_validate(datasets.mix(body.name, [(s.dataset, s.count) for s in body.sources], body.seed))


@router.get("", response_model=list[DatasetOut], dependencies=READ_ACCESS)
def list_datasets(datasets: DatasetsDep) -> list[DatasetOut]:
    return [DatasetOut.model_validate(d) for d in datasets.list()]


@router.get("/{name}", response_model=DatasetOut, dependencies=READ_ACCESS, responses=DATASET_NOT_FOUND)
def get_dataset(name: str, datasets: DatasetsDep) -> DatasetOut:
    return DatasetOut.model_validate(datasets.get(name))
