"""Fidelity of an approximate scoring method against exact: Spearman rank correlation and top-n overlap.

Pure functions of the scores (shared/spec/gradalign-score.md, "Methods": an approximate method
reports its fidelity against exact in the benchmark).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from gradalign_common.records import ScoreRecord
from gradalign_common.selection import select_top


def rankdata(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (nan when either side is constant or there are < 2 values)."""
    if len(a) < 2:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def fidelity(exact: Sequence[ScoreRecord], approximate: Sequence[ScoreRecord], mode: str, fraction: float) -> dict:
    """Spearman over the non-zero-advantage candidates and the overlap of the selected top fraction."""
    by_id = {s.problem_id: s.score for s in approximate}
    live = [s for s in exact if not s.zero_advantage]
    n_select = max(1, round(fraction * len(exact)))
    top_exact = set(select_top(exact, mode, n_select))
    top_approx = set(select_top(approximate, mode, n_select))
    return {
        "spearman": spearman([s.score for s in live], [by_id[s.problem_id] for s in live]),
        "top_overlap": len(top_exact & top_approx) / n_select,
        "n_select": n_select,
    }
