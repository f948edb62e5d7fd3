"""Live progress of a running stage: the sum of its parallel requests' progress, on the stage row and as events.

A stage fans out over worker replicas; each request streams (done, total, unit). The stage's
progress is the sum over its requests. Every report is published as a `progress` event (the
dashboard and the API's event stream show it live); the stage row is written at most once a
second, and always at the end, so the database is not written per batch.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from sqlalchemy.orm import sessionmaker

from services.scheduler.db import Stage

ProgressFn = Callable[[int, int, str], None]


class StageProgress:
    def __init__(self, sessions: sessionmaker, publish: Callable[..., None], write_every_s: float = 1.0):
        self.sessions, self.publish, self.write_every_s = sessions, publish, write_every_s
        self._written: dict[int, float] = {}  # stage id -> when its row was last written

    def callbacks(self, experiment_id: int, round_index: int, stage_id: int, stage: str, n_jobs: int) -> Callable[[int], ProgressFn]:
        """`for_request(i)`: the progress callback of the stage's i-th of n_jobs parallel requests."""
        done, total = [0] * max(n_jobs, 1), [0] * max(n_jobs, 1)
        lock = threading.Lock()

        def for_request(i: int) -> ProgressFn:
            def report(d: int, t: int, unit: str) -> None:
                with lock:
                    done[i], total[i] = d, t
                    d_all, t_all = sum(done), sum(total)
                self.record(experiment_id, round_index, stage_id, stage, d_all, t_all, unit)

            return report

        return for_request

    def record(self, experiment_id: int, round_index: int, stage_id: int, stage: str, done: int, total: int, unit: str) -> None:
        now = time.monotonic()
        if done >= total or now - self._written.get(stage_id, 0.0) >= self.write_every_s:
            self._written[stage_id] = now
            with self.sessions() as s:
                st = s.get(Stage, stage_id)
                if st is not None:
                    st.progress_done, st.progress_total, st.progress_unit = done, total, unit
                    s.commit()
        self.publish(experiment_id, "progress", round=round_index, stage=stage, done=done, total=total, unit=unit)
