"""The experiment page's "Suspect rewards" panel in real headless Chromium against a live scheduler and a real
database: suspects and watch with their evidence, sorting and filtering, links to each problem's page, the
downloads (with the token when reads need one), and the reason shown for a mode without flags."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from dashboard_fixtures import TOKEN, count, expect, launch_chromium, login, open_page, screenshot, seed_experiment
from gradalign_common.datasets import load_problems
from live_scheduler import LiveScheduler
from scheduler_fixtures import make_settings
from services.scheduler.db import Candidate, PoolProblem, Round


def _start(tmp_path, database_url, **overrides):
    live = LiveScheduler(make_settings(tmp_path, database_url, bootstrap_token=TOKEN, suspect_rule="cosine", **overrides))
    yield live
    live.stop()


scheduler = pytest.fixture(_start)
browser = pytest.fixture(scope="module")(launch_chromium)
page = pytest.fixture(open_page)


@pytest.fixture
def guarded_scheduler(tmp_path, database_url):
    yield from _start(tmp_path, database_url, read_requires_token=True)


@pytest.fixture
def guarded_page(browser, guarded_scheduler):
    yield from open_page(browser, guarded_scheduler)


def seed_suspects(live: LiveScheduler, exp_id: int) -> tuple[str, str, str]:
    """Every candidate of the seeded rounds 0-2 aligned (positive scores), then: A against the validation gradient in
    rounds 0 and 1 (a suspect; also a candidate of round 2, aligned there), B in round 1 and C in round 2 (watch)."""
    with live.sessions() as s:
        positions = s.execute(select(PoolProblem.position, PoolProblem.problem_id).where(PoolProblem.experiment_id == exp_id)).all()
        pool = [pid for _, pid in sorted(positions)]
        rounds = {r.index: r for r in s.scalars(select(Round).where(Round.experiment_id == exp_id))}
        for i, c in enumerate(s.scalars(select(Candidate).where(Candidate.round_id.in_([r.id for r in rounds.values()])))):
            c.score = 0.2 + 0.01 * (i % 16)
        a, b, c_ = pool[0], pool[17], pool[33]
        for rnd, pid, score in ((0, a, -0.4), (1, b, -0.2), (2, c_, -0.6)):
            cand = s.scalar(select(Candidate).where(Candidate.round_id == rounds[rnd].id, Candidate.problem_id == pid))
            cand.score, cand.zero_advantage, cand.accuracy = score, False, 0.25
        for rnd, score in ((1, -0.3), (2, 0.2)):
            s.add(Candidate(round_id=rounds[rnd].id, problem_id=a, n_responses=4, accuracy=0.25, mean_reward=0.25,
                            mean_response_length=3.0, score=score, zero_advantage=False))
        s.commit()
    return a, b, c_


def _rows(p) -> list[str]:
    return p.locator("#suspects-table tbody tr[data-problem]").evaluate_all("rs => rs.map(r => r.dataset.problem)")


def test_suspect_rewards_panel(scheduler, page, tiny_model_dir, tmp_path, request):
    exp_id = seed_experiment(scheduler, tiny_model_dir, tmp_path, name="sim-arith", mode="sim", rewards=[0.31, 0.38, 0.46], running=False)
    a, b, c = seed_suspects(scheduler, exp_id)
    page.goto(f"/#/experiments/{exp_id}")
    page.wait_for_selector('main[data-loaded="true"][data-page="experiment"]')
    page.wait_for_selector('#suspects-panel[data-available="true"]')
    summary = page.inner_text("#suspects-summary")
    assert "1 suspect" in summary and "2 watch" in summary and "rule cosine" in summary and "3 scored rounds" in summary
    assert _rows(page) == [a, *sorted([b, c], key=lambda x: int(x))]  # most flagged first
    assert page.get_attribute(f'#suspects-table tr[data-problem="{a}"]', "data-status") == "suspect"
    cells = page.locator(f'#suspects-table tr[data-problem="{a}"] td').all_inner_texts()
    assert cells[1] == "suspect" and cells[2] == "2 of 3" and cells[3] == "-0.400" and cells[4] == "0.250", cells
    evidence = f'#suspects-table tr[data-problem="{a}"] ul.evidence li'
    assert count(page, evidence) == 3 and count(page, f"{evidence}.flagged") == 2
    assert "round 0: cos -0.400, acc 0.25" in page.inner_text(f'{evidence}[data-round="0"]')

    # sortable: lowest cosine first, then the other way; filterable by status
    page.click('#suspects-table button[data-sort="alignment"]')
    assert _rows(page) == [c, a, b]
    page.click('#suspects-table button[data-sort="alignment"]')
    assert _rows(page) == [b, a, c]
    assert page.get_attribute('#suspects-table th[aria-sort="descending"] button', "data-sort") == "alignment"
    page.select_option("#suspects-status", "watch")
    expect(page.locator("#suspects-table tbody tr[data-problem]")).to_have_count(2)
    assert "status=watch" in page.get_attribute("#suspects-export-jsonl", "href")
    page.select_option("#suspects-status", "")
    screenshot(page, "suspects", request)

    # the downloads: the flagged problems' records, loading back as the same problems
    with page.expect_download() as got:
        page.click("#suspects-export-jsonl")
    download = got.value
    assert download.suggested_filename == f"experiment-{exp_id}-suspects.jsonl"
    path = tmp_path / "suspects.jsonl"
    download.save_as(path)
    assert {p.problem_id for p in load_problems(path)} == {a, b, c}
    with page.expect_download() as got:
        page.click("#suspects-export-parquet")
    assert got.value.suggested_filename.endswith(".parquet")

    # each round of the evidence links to the problem's page in that round
    page.click(f'{evidence}[data-round="0"] a')
    page.wait_for_selector('main[data-loaded="true"][data-page="problem"]')
    assert page.inner_text("h1").startswith(f"Problem {a}") and count(page, "#responses-table tbody tr") == 4
    page.go_back()
    page.wait_for_selector('main[data-loaded="true"][data-page="experiment"]')
    page.click(f'#suspects-table tr[data-problem="{a}"] td:first-child a')  # the problem itself: its latest flagged round
    page.wait_for_selector('main[data-loaded="true"][data-page="problem"]')
    assert page.evaluate("location.hash").endswith(f"/rounds/1/problems/{a}")


def test_a_mode_without_flags_says_why(scheduler, page, tiny_model_dir, tmp_path):
    exp_id = seed_experiment(scheduler, tiny_model_dir, tmp_path, name="rand-arith", mode="rand", rewards=[0.3, 0.33], running=False)
    page.goto(f"/#/experiments/{exp_id}")
    page.wait_for_selector('#suspects-panel[data-available="false"]')
    assert "external validation set" in page.inner_text("#suspects-summary")
    assert not page.is_visible("#suspects-export-jsonl") and count(page, "#suspects-table") == 0


def test_downloads_carry_the_token_when_reads_need_one(guarded_scheduler, guarded_page, tiny_model_dir, tmp_path):
    exp_id = seed_experiment(guarded_scheduler, tiny_model_dir, tmp_path, name="sim-arith", mode="sim", rewards=[0.31, 0.38, 0.46], running=False)
    a, b, c = seed_suspects(guarded_scheduler, exp_id)
    guarded_page.goto("/")
    login(guarded_page)
    guarded_page.goto(f"/#/experiments/{exp_id}")
    guarded_page.wait_for_selector('#suspects-panel[data-available="true"]')
    guarded_page.select_option("#suspects-status", "suspect")
    with guarded_page.expect_download() as got:
        guarded_page.click("#suspects-export-jsonl")
    path = tmp_path / "suspect.jsonl"
    got.value.save_as(path)
    assert [p.problem_id for p in load_problems(path)] == [a]
