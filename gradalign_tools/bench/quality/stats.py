"""Means and spreads of the benchmark's figures."""

from __future__ import annotations

import statistics
from typing import Sequence


def mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def std(xs: Sequence[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0
