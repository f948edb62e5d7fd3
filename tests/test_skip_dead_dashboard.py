"""The experiment page's rounds table with skipping dead problems (issue 18) in real headless Chromium against a live
scheduler and a real database: per round, the candidates skipped and the rollouts that saved, and the totals over
the experiment; nothing of it for an experiment that does not skip."""

from __future__ import annotations

import httpx
import pytest

from dashboard_fixtures import count, launch_chromium, open_page, screenshot, seed_experiment, start_scheduler
from services.scheduler.db import Experiment, Round

scheduler = pytest.fixture(start_scheduler)
browser = pytest.fixture(scope="module")(launch_chromium)
page = pytest.fixture(open_page)

SKIPPED = {0: 0, 1: 3, 2: 5}  # round -> candidates skipped (4 samples each, 3 tokens per response)


def _set_skips(live, exp_id: int, enabled: bool) -> None:
    with live.sessions() as s:
        exp = s.get(Experiment, exp_id)
        exp.config = {**exp.config, "skip_dead": enabled, "skip_dead_base": 0.5, "skip_dead_cap": 0.9}
        for rnd in s.query(Round).filter(Round.experiment_id == exp_id):
            n = SKIPPED[rnd.index] if enabled else 0
            rnd.skipped_candidates, rnd.rollouts_saved, rnd.tokens_saved = n, 4 * n, 12.0 * n
            rnd.chunk_start, rnd.chunk_end = 0, 16 + n
        s.commit()


def test_the_rounds_table_shows_what_skipping_saved(scheduler, page, tiny_model_dir, tmp_path, request):
    exp_id = seed_experiment(scheduler, tiny_model_dir, tmp_path, name="skip-arith", mode="sim", rewards=[0.31, 0.38, 0.46], running=False)
    _set_skips(scheduler, exp_id, enabled=True)
    rounds = httpx.get(f"{scheduler.url}/api/v1/experiments/{exp_id}/rounds").json()
    assert [(r["skipped_candidates"], r["rollouts_saved"]) for r in rounds] == [(0, 0), (3, 12), (5, 20)]
    page.goto(f"/#/experiments/{exp_id}")
    page.wait_for_selector('main[data-loaded="true"][data-page="experiment"]')
    summary = page.locator("#skip-summary")
    assert summary.is_visible()
    text = summary.inner_text()
    assert "8 candidates skipped" in text and "32 rollouts saved" in text and "about 96 generated tokens" in text, text
    assert "over 3 rounds" in text and "min(0.9, 1 − (1 − 0.5)^streak)" in text, text
    assert "Skipped" in page.locator("#timeline-table thead").inner_text()
    for index, n in SKIPPED.items():
        cell = page.locator(f'#timeline-table tr[data-round="{index}"] td.skip-cell')
        assert cell.get_attribute("data-skipped") == str(n) and cell.get_attribute("data-rollouts-saved") == str(4 * n)
        assert cell.inner_text().split() == [str(n), str(4 * n), "rollouts"]
    screenshot(page, "skip-dead", request)


def test_an_experiment_that_does_not_skip_shows_no_skip_column(scheduler, page, tiny_model_dir, tmp_path):
    exp_id = seed_experiment(scheduler, tiny_model_dir, tmp_path, name="plain", mode="sim", rewards=[0.3, 0.33], running=False)
    _set_skips(scheduler, exp_id, enabled=False)
    page.goto(f"/#/experiments/{exp_id}")
    page.wait_for_selector('main[data-loaded="true"][data-page="experiment"]')
    assert not page.locator("#skip-summary").is_visible()
    assert count(page, "#timeline-table td.skip-cell") == 0
    assert "Skipped" not in page.locator("#timeline-table thead").inner_text()
