"""Path parameters shared by the experiment and result routes (bounded to what the database's integers hold)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

MAX_INT32 = 2**31 - 1

ExperimentId = Annotated[int, Path(ge=1, le=MAX_INT32)]
RoundIndex = Annotated[int, Path(ge=0, le=MAX_INT32)]
