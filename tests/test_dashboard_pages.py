"""The dashboard's pages in real headless Chromium against a live scheduler and a real database: the
experiment list, an experiment's live page (timeline, charts, live progress, selection history), a
problem's page, and the comparison of experiments.

Experiments are seeded in the database and events published on the scheduler's bus
(tests/dashboard_fixtures.py). Screenshots of each page go to test-artifacts/; the experiment page's
is copied to docs/dashboard.png (the README's picture) when that file is missing or when
GRADALIGN_UPDATE_DOCS_SCREENSHOT=1.
"""

from __future__ import annotations

import os
import shutil

import pytest

from dashboard_fixtures import ARTIFACTS, REPO, advance_to_train, chart_points, count, db_label, expect, launch_chromium
from dashboard_fixtures import open_page, publish_until, screenshot, seed_experiment, start_scheduler, train_problems

DOCS_SCREENSHOT = REPO / "docs" / "dashboard.png"
TRAIN_METRICS = ("loss", "mean_reward", "kl", "grad_norm", "entropy", "response_length", "tokens_per_second", "clip_fraction")


# the module's fixtures: a live scheduler, Debian's Chromium (one per module) and a fresh page of it
scheduler = pytest.fixture(start_scheduler)
browser = pytest.fixture(scope="module")(launch_chromium)
page = pytest.fixture(open_page)


def test_list_and_live_experiment_page(scheduler, page, tiny_model_dir, tmp_path, request):
    running = seed_experiment(scheduler, tiny_model_dir, tmp_path, name="sim-arith", mode="sim", rewards=[0.31, 0.38, 0.46], running=True)
    done = seed_experiment(scheduler, tiny_model_dir, tmp_path, name="rand-arith", mode="rand", rewards=[0.30, 0.33, 0.35, 0.36, 0.38, 0.39], running=False, with_details=False)

    # -- the list shows the running experiment with its round, stage and last validation reward
    page.goto("/")
    page.keyboard.press("Tab")  # keyboard: the first stop is the skip link, which moves focus to the content
    assert page.evaluate("document.activeElement.className") == "skip-link"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    row = f'#experiments-table tr[data-experiment-id="{running}"]'
    page.wait_for_selector(f'{row}[data-status="running"]')
    cells = page.locator(f"{row} td").all_inner_texts()
    assert cells[2] == "sim-arith" and cells[3] == "sim" and cells[4] == "tiny-arith", cells
    assert cells[5] == "arith-train / arith-val" and cells[6].startswith("running") and cells[7] == "3 / 6", cells
    assert cells[8].startswith("Score"), cells
    expect(page.locator(f"{row} .reward-cell")).to_have_text("0.460")
    assert page.inner_text(f'#experiments-table tr[data-experiment-id="{done}"] td:nth-child(7)') == "completed"
    # a progress event updates the list's stage cell live
    publish_until(scheduler, page, {"type": "progress", "experiment_id": running, "round": 3, "stage": "score", "done": 5, "total": 16, "unit": "groups"},
                  f'{row} .stage-cell:has-text("5 / 16 groups")')
    # filters: by status (server side) and by text
    page.select_option("#filter-status", "running")
    expect(page.locator("#experiments-table tbody tr[data-experiment-id]")).to_have_count(1)
    assert count(page, row) == 1
    page.select_option("#filter-status", "")
    expect(page.locator("#experiments-table tbody tr[data-experiment-id]")).to_have_count(2)
    page.fill("#filter-text", "rand")
    assert count(page, "#experiments-table tbody tr[data-experiment-id]") == 1
    page.fill("#filter-text", "")
    expect(page.locator(f'#experiments-table tr[data-experiment-id="{done}"] .reward-cell')).to_have_text("0.390")
    screenshot(page, "list", request)

    # -- the experiment page: timeline with the running stage's progress
    page.click(f"{row} a.exp-link")
    page.wait_for_selector('main[data-loaded="true"][data-page="experiment"]')
    page.evaluate("window.__sameDocument = 'yes'")  # gone if the page reloads
    score_cell = '.stage[data-round="3"][data-stage="score"]'
    assert page.get_attribute(score_cell, "data-status") == "running"
    assert "3 / 16 groups" in page.inner_text(score_cell) or "5 / 16 groups" in page.inner_text(score_cell)
    assert count(page, '.stage[data-status="succeeded"]') == 3 * 5 + 2
    assert count(page, "#timeline-table tbody tr") == 4

    # -- charts: one point per completed round; one per training step; candidates vs selected
    assert chart_points(page, "validation-reward") == 3
    assert count(page, 'figure[data-chart="validation-reward"] g.series circle') == 3
    assert chart_points(page, "candidate-accuracy") == 3
    assert chart_points(page, "train-loss") == 12 and count(page, 'figure[data-chart="train-loss"] circle') == 12
    assert count(page, 'figure[data-chart^="train-"]') == len(TRAIN_METRICS)
    assert page.get_attribute('figure[data-chart="score-hist"] g[data-series="candidates"]', "data-points") == "16"
    assert page.get_attribute('figure[data-chart="score-hist"] g[data-series="selected"]', "data-points") == "4"
    assert page.get_attribute('figure[data-chart="accuracy-hist"] g[data-series="selected"]', "data-points") == "4"
    page.select_option("#hist-round", "0")
    page.wait_for_selector('figure[data-chart="score-hist"] .chart-title:has-text("round 0")')

    # -- live: a progress event moves the bar without a reload
    publish_until(scheduler, page, {"type": "progress", "experiment_id": running, "round": 3, "stage": "score", "done": 11, "total": 16, "unit": "groups"},
                  '#live-progress-text:has-text("11 / 16 groups")')
    assert page.get_attribute("#live-progress", "value") == "11"
    # the stage changes in the database, then stage_started is published: the timeline follows
    advance_to_train(scheduler, running, 3)
    publish_until(scheduler, page, {"type": "stage_started", "experiment_id": running, "round": 3, "stage": "train", "attempt": 1},
                  '.stage[data-round="3"][data-stage="train"][data-status="running"]')
    assert page.get_attribute(score_cell, "data-status") == "succeeded"
    assert page.get_attribute('.stage[data-round="3"][data-stage="select"]', "data-status") == "succeeded"
    assert "Train" in page.inner_text("#live-stage")
    # a training step arrives as a progress event carrying its metrics: the charts grow by one point
    metrics = {"loss": 0.03, "mean_reward": 0.47, "kl": 0.013, "grad_norm": 0.9, "entropy": 0.81, "response_length": 3.5, "tokens_per_second": 805.0, "clip_fraction": 0.04}
    publish_until(scheduler, page, {"type": "progress", "experiment_id": running, "round": 3, "stage": "train", "done": 1, "total": 4, "unit": "steps", "metrics": metrics},
                  '#live-progress-text:has-text("1 / 4 steps")')
    page.wait_for_selector('figure[data-chart="train-loss"][data-points="13"]')
    assert page.evaluate("window.__sameDocument") == "yes"
    page.select_option("#hist-round", "2")
    page.evaluate("window.scrollTo(0, 0)")
    screenshot(page, "experiment", request)
    top = ARTIFACTS / f"dashboard-experiment-top-{db_label(request)}.png"  # live panel, timeline and charts
    height = page.evaluate("document.getElementById('history-h').getBoundingClientRect().top + window.scrollY")
    page.screenshot(path=str(top), full_page=True, clip={"x": 0, "y": 0, "width": 1366, "height": int(height) - 8})
    if db_label(request) == "sqlite" and (not DOCS_SCREENSHOT.exists() or os.environ.get("GRADALIGN_UPDATE_DOCS_SCREENSHOT") == "1"):
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(top, DOCS_SCREENSHOT)

    # -- the selection history is searchable and links to a problem's prompt, responses and rewards
    assert page.inner_text("#history-count").endswith("of 48")
    page.select_option("#history-selected", "yes")
    assert page.inner_text("#history-count").endswith("of 12")
    first = page.get_attribute("#history-table tbody tr", "data-problem")
    first_round = page.get_attribute("#history-table tbody tr", "data-round")
    page.fill("#history-search", first)
    rows = page.locator("#history-table tbody tr[data-problem]")
    assert rows.count() >= 1 and all(first in pid for pid in rows.evaluate_all("rs => rs.map(r => r.dataset.problem)"))
    page.click(f'#history-table tbody tr[data-problem="{first}"][data-round="{first_round}"] a')
    page.wait_for_selector('main[data-loaded="true"][data-page="problem"]')
    problem = train_problems(scheduler.app.state.settings.artifact_root)[first]
    assert problem.prompt and "role" in problem.prompt
    assert page.inner_text("#prompt").strip().endswith(json_content(problem.prompt))
    assert count(page, "#responses-table tbody tr") == 4
    n_correct = count(page, "#responses-table tbody tr.is-correct")
    assert page.inner_text(".problem-facts").count(f"{n_correct / 4:.3f}") >= 1  # accuracy = correct / responses
    assert page.evaluate("window.__sameDocument") == "yes"
    screenshot(page, "problem", request)


def json_content(prompt: str) -> str:
    import json

    return json.loads(prompt)[-1]["content"]


def test_compare_overlays_experiments(scheduler, page, tiny_model_dir, tmp_path, request):
    a = seed_experiment(scheduler, tiny_model_dir, tmp_path, name="sim-arith", mode="sim", rewards=[0.31, 0.38, 0.46, 0.5], running=False, with_details=False)
    b = seed_experiment(scheduler, tiny_model_dir, tmp_path, name="rand-arith", mode="rand", rewards=[0.30, 0.33, 0.35, 0.36, 0.38, 0.39], running=False, with_details=False)
    page.goto(f"/#/compare?ids={a},{b}")
    page.wait_for_selector('main[data-loaded="true"][data-page="compare"]')
    assert chart_points(page, "compare") == 10
    assert page.get_attribute('figure[data-chart="compare"]', "data-series-count") == "2"
    assert count(page, 'figure[data-chart="compare"] g.series') == 2
    assert count(page, 'figure[data-chart="compare"] circle') == 10
    page.uncheck(f"#cmp-{b}")
    page.wait_for_selector('figure[data-chart="compare"][data-points="4"]')
    assert page.evaluate("location.hash") == f"#/compare?ids={a}"
    page.check(f"#cmp-{b}")
    page.wait_for_selector('figure[data-chart="compare"][data-points="10"]')
    page.select_option("#compare-metric", "candidate_accuracy")
    page.wait_for_selector('figure[data-chart="compare"] .chart-title:has-text("Candidate accuracy")')
    page.select_option("#compare-metric", "validation_reward")
    screenshot(page, "compare", request)
