"""Datasets: upload, register a file under the data root, mix several, list and describe.

Every dataset is imported into the artifact store as one normalised, immutable parquet of
problem records (gradalign_common.datasets.import_dataset), so an experiment keeps reading
the same problems even if the original file changes. Names are unique; a failed import
leaves nothing stored (the import writes atomically and the row is added only after it).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import AsyncIterator

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker
from starlette.concurrency import run_in_threadpool

from gradalign_common.artifacts import ArtifactStore
from gradalign_common.datasets import import_dataset
from gradalign_common.errors import ConflictError, FieldError, InvalidInputError, NotFoundError
from services.scheduler.datasets import BUILTIN_DATASETS, check_under_data_root
from services.scheduler.db import Dataset
from services.scheduler.settings import SchedulerSettings


class UploadTooLarge(InvalidInputError):
    """The uploaded body exceeded max_upload_bytes (HTTP 413)."""


class DatasetService:
    def __init__(self, settings: SchedulerSettings, sessions: sessionmaker):
        self.settings, self.sessions = settings, sessions
        self.out_dir = ArtifactStore(settings.artifact_root).datasets_dir() / "registered"

    def _check_new_name(self, name: str) -> None:
        if name in BUILTIN_DATASETS:
            raise FieldError("name", f"{name!r} is a built-in dataset name")
        with self.sessions() as s:
            if s.scalar(select(Dataset).where(Dataset.name == name)) is not None:
                raise ConflictError(f"a dataset named {name!r} already exists")

    def _store(self, name: str, inputs: list[tuple[Path, int | None]], seed: int, origin: dict, input_field: str) -> Dataset:
        """Import `inputs` as dataset `name`; a bad input is a FieldError on `input_field`, the request field it came from."""
        try:
            meta = import_dataset(inputs, name, self.out_dir, seed=seed)
        except FieldError:
            raise
        except InvalidInputError as exc:
            raise FieldError(input_field, str(exc)) from None
        with self.sessions() as s:
            row = Dataset(
                name=name, path=meta["path"], n_rows=meta["n_problems"], data_sources=meta["data_sources"], origin=origin
            )
            s.add(row)
            s.commit()
            return row

    def register(self, name: str, path: str) -> Dataset:
        self._check_new_name(name)
        try:
            resolved = check_under_data_root(path, self.settings.data_root, self.settings.artifact_root)
        except InvalidInputError as exc:
            raise FieldError("path", str(exc)) from None
        return self._store(name, [(resolved, None)], 0, {"kind": "register", "path": str(resolved)}, "path")

    def mix(self, name: str, sources: list[tuple[str, int]], seed: int) -> Dataset:
        self._check_new_name(name)
        inputs = [(Path(self.get(ds).path), count) for ds, count in sources]
        origin = {"kind": "mix", "sources": [{"dataset": d, "count": c} for d, c in sources], "seed": seed}
        return self._store(name, inputs, seed, origin, "sources")

    async def upload(self, name: str, fmt: str, body: AsyncIterator[bytes]) -> Dataset:
        """Stream the request body to a temporary file (refusing more than max_upload_bytes), then import it."""
        self._check_new_name(name)
        tmp_dir = ArtifactStore(self.settings.artifact_root).datasets_dir() / "uploads"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = tmp_dir / f".{name}.upload-{uuid.uuid4().hex[:8]}.{fmt}"
        size = 0
        try:
            with tmp.open("wb") as fh:
                async for chunk in body:
                    size += len(chunk)
                    if size > self.settings.max_upload_bytes:
                        raise UploadTooLarge(f"upload exceeds max_upload_bytes={self.settings.max_upload_bytes}")
                    fh.write(chunk)
            if size == 0:
                raise FieldError("body", "the upload is empty")
            origin = {"kind": "upload", "format": fmt, "bytes": size}
            try:
                return await run_in_threadpool(self._store, name, [(tmp, None)], 0, origin, "body")
            except FieldError as exc:  # name the upload, not our temporary file
                raise FieldError(exc.field, exc.message.replace(str(tmp), "upload")) from None
        finally:
            tmp.unlink(missing_ok=True)

    def list(self) -> list[Dataset]:
        with self.sessions() as s:
            return list(s.scalars(select(Dataset).order_by(Dataset.name)))

    def get(self, name: str) -> Dataset:
        with self.sessions() as s:
            row = s.scalar(select(Dataset).where(Dataset.name == name))
            if row is None:
                raise NotFoundError(f"dataset {name!r} not found")
            return row
