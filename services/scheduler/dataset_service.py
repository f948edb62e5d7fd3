"""Datasets: upload, register a file under the data root, mix several, list and describe.

Every dataset is imported into the artifact store as one normalised, immutable parquet of
problem records (gradalign_common.datasets.import_dataset), so an experiment keeps reading
the same problems even if the original file changes. Names are unique; a failed import
leaves nothing stored (the import writes atomically and the row is added only after it).

Hostile input is bounded: reading is incremental and limited to max_dataset_rows rows and
max_dataset_bytes decoded bytes (413), each string field to max_field_chars (422), every ground
truth is checked against its reward (422). Each import writes files of its own (the name plus a
unique id, stored in the row), so concurrent requests under one name never share a file: the
one whose row insert wins keeps its file, the others remove theirs and get 409. Error messages
name files relative to the data root or the artifact root, never by absolute server paths.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import AsyncIterator

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker
from starlette.concurrency import run_in_threadpool

from gradalign_common.artifacts import ArtifactStore
from gradalign_common.datasets import DatasetTooLarge, import_dataset
from gradalign_common.errors import ConflictError, FieldError, InvalidInputError, NotFoundError
from services.scheduler.datasets import BUILTIN_DATASETS, check_under_data_root, display_path, scrub_paths
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

    def _scrub(self, message: str) -> str:
        return scrub_paths(message, self.settings.data_root, self.settings.artifact_root)

    def _store(
        self, name: str, inputs: list[tuple[Path, int | None]], labels: list[str], seed: int, origin: dict, input_field: str
    ) -> Dataset:
        """Import `inputs` (named `labels` in errors) as dataset `name`; a bad input is a FieldError on
        `input_field`, the request field it came from; one too large is UploadTooLarge (413)."""
        stem = f"{name}-{uuid.uuid4().hex}"  # this request's own files: nobody else writes them
        cfg = self.settings
        try:
            meta = import_dataset(
                inputs, name, self.out_dir, seed=seed, labels=labels, file_stem=stem,
                max_rows=cfg.max_dataset_rows, max_bytes=cfg.max_dataset_bytes, max_field_chars=cfg.max_field_chars,
            )
        except DatasetTooLarge as exc:
            raise UploadTooLarge(self._scrub(str(exc))) from None
        except FieldError as exc:
            raise FieldError(exc.field, self._scrub(exc.message)) from None
        except InvalidInputError as exc:
            raise FieldError(input_field, self._scrub(str(exc))) from None
        try:
            with self.sessions() as s:
                row = Dataset(
                    name=name, path=meta["path"], n_rows=meta["n_problems"], data_sources=meta["data_sources"], origin=origin
                )
                s.add(row)
                s.commit()
                return row
        except IntegrityError:
            # another request stored this name first: our row does not exist, so our files go
            for suffix in (".parquet", ".json"):
                (self.out_dir / f"{stem}{suffix}").unlink(missing_ok=True)
            raise ConflictError(f"a dataset named {name!r} already exists") from None
        # any other failure may or may not have committed the row: the files stay (at worst an orphan,
        # never a row without its file)

    def register(self, name: str, path: str) -> Dataset:
        self._check_new_name(name)
        try:
            resolved = check_under_data_root(path, self.settings.data_root, self.settings.artifact_root)
        except InvalidInputError as exc:
            raise FieldError("path", self._scrub(str(exc))) from None
        shown = display_path(resolved, self.settings.data_root, self.settings.artifact_root)
        return self._store(name, [(resolved, None)], [shown], 0, {"kind": "register", "path": shown}, "path")

    def mix(self, name: str, sources: list[tuple[str, int]], seed: int) -> Dataset:
        self._check_new_name(name)
        inputs = [(Path(self.get(ds).path), count) for ds, count in sources]
        origin = {"kind": "mix", "sources": [{"dataset": d, "count": c} for d, c in sources], "seed": seed}
        return self._store(name, inputs, [ds for ds, _ in sources], seed, origin, "sources")

    async def upload(self, name: str, fmt: str, body: AsyncIterator[bytes]) -> Dataset:
        """Stream the request body to a temporary file of its own (refusing more than max_upload_bytes),
        then import it."""
        self._check_new_name(name)
        tmp_dir = ArtifactStore(self.settings.artifact_root).datasets_dir() / "uploads"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = tmp_dir / f".{name}.upload-{uuid.uuid4().hex}.{fmt}"
        size = 0
        try:
            with tmp.open("xb") as fh:
                async for chunk in body:
                    size += len(chunk)
                    if size > self.settings.max_upload_bytes:
                        raise UploadTooLarge(f"upload exceeds max_upload_bytes={self.settings.max_upload_bytes}")
                    fh.write(chunk)
            if size == 0:
                raise FieldError("body", "the upload is empty")
            origin = {"kind": "upload", "format": fmt, "bytes": size}
            try:
                return await run_in_threadpool(self._store, name, [(tmp, None)], ["upload"], 0, origin, "body")
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
