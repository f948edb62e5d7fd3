"""The dashboard, end to end in real headless Chromium against a live scheduler and a real database.

The browser is Debian's chromium (`apt-get install -y chromium`) driven by the Python
`playwright` package with `executable_path`; nothing is downloaded (never `playwright
install`). Without /usr/bin/chromium or playwright these tests FAIL, saying what to install.

The scheduler runs under uvicorn in a thread on a free loopback port with the orchestrator
off; the tests write rounds, stages, candidates and training steps with the SQLAlchemy
models (as the orchestrator would) and publish events on `app.state.bus` to drive the
page live. Screenshots of each page go to test-artifacts/; the experiment page's is copied
to docs/dashboard.png (the README's picture) when that file is missing or when
GRADALIGN_UPDATE_DOCS_SCREENSHOT=1.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import re
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from scheduler_fixtures import experiment_body, make_settings
from live_scheduler import LiveScheduler
from services.scheduler.app import create_app
from services.scheduler.dashboard import STATIC_DIR
from services.scheduler.db import Candidate, Experiment, PoolProblem, Round, Stage, TrainStep, utcnow
from services.scheduler.schemas import ExperimentSpec

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
DOCS_SCREENSHOT = REPO / "docs" / "dashboard.png"
CHROMIUM = Path(os.environ.get("GRADALIGN_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
TOKEN = "dashboard-test-token-0123456789"
STAGES = ("rollout_train", "rollout_val", "score", "select", "train")
TRAIN_METRICS = ("loss", "mean_reward", "kl", "grad_norm", "entropy", "response_length", "tokens_per_second", "clip_fraction")
SVG_NAMESPACE = "http://www.w3.org/2000/svg"  # an XML namespace name, never fetched
TIMEOUT_MS = 15_000


# ---- the live scheduler ---------------------------------------------------------------------------


@pytest.fixture
def scheduler(tmp_path, database_url):
    live = LiveScheduler(make_settings(tmp_path, database_url, bootstrap_token=TOKEN))
    yield live
    live.stop()


def expect(locator):
    from playwright.sync_api import expect as _expect

    return _expect(locator)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(
            f"Chromium is missing at {CHROMIUM}: the dashboard tests drive a real browser. "
            "Install Debian's chromium with `apt-get install -y chromium` (or set GRADALIGN_CHROMIUM).",
            pytrace=False,
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "The Python package playwright is missing: `pip install -e '.[dev]'` (or `pip install playwright`). "
            "Do not run `playwright install`: the tests use Debian's chromium.",
            pytrace=False,
        )
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, scheduler):
    """A fresh browser context (own localStorage) at a laptop-sized viewport; fails the test on page errors."""
    yield from _open_page(browser, scheduler)


@pytest.fixture
def guarded_scheduler(tmp_path, database_url):
    """A scheduler with read_requires_token: every read, the event stream included, needs the token."""
    live = LiveScheduler(make_settings(tmp_path, database_url, bootstrap_token=TOKEN, read_requires_token=True))
    yield live
    live.stop()


@pytest.fixture
def guarded_page(browser, guarded_scheduler):
    yield from _open_page(browser, guarded_scheduler)


def _open_page(browser, scheduler):
    context = browser.new_context(viewport={"width": 1366, "height": 860}, base_url=scheduler.url)
    context.set_default_timeout(TIMEOUT_MS)
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    p.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" and "401" not in msg.text and "403" not in msg.text and "422" not in msg.text else None)
    p.on("requestfailed", lambda req: errors.append(f"request failed: {req.url}") if "/api/v1/events" not in req.url else None)
    yield p
    context.close()  # closes the event streams before the scheduler stops
    assert not errors, f"errors in the page: {errors}"


def _db_id(request) -> str:
    return request.node.callspec.params.get("database_url", "sqlite") if hasattr(request.node, "callspec") else "sqlite"


def _db_label(request) -> str:
    url = _db_id(request)
    return "postgresql" if str(url).startswith("postgresql") else "sqlite"


def screenshot(p, name: str, request) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"dashboard-{name}-{_db_label(request)}.png"
    p.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000, path
    return path


def login(p, token: str = TOKEN) -> None:
    p.fill("#token-input", token)
    p.click("#token-form button[type=submit]")
    p.wait_for_selector('#token-state[data-has-token="true"]')


# ---- seeding a running experiment directly in the database -------------------------------------


def _create(live: LiveScheduler, model_dir: Path, **overrides) -> int:
    body = experiment_body(model_dir, chunk_size=16, k=4, train_batch_size=4, iters_per_select=4, num_selections=6, n_samples_train=4)
    body.update(overrides)
    return live.app.state.experiments.create(ExperimentSpec(**body)).id


def _problems(artifact_root: Path) -> dict:
    from gradalign_common.datasets import load_problems
    from services.scheduler.datasets import resolve_dataset

    return {p.problem_id: p for p in load_problems(resolve_dataset("arith-train", artifact_root))}


def seed_experiment(
    live: LiveScheduler,
    model_dir: Path,
    tmp_path: Path,
    *,
    name: str,
    mode: str,
    rewards: list[float],
    running: bool,
    with_details: bool = True,
) -> int:
    """An experiment whose len(rewards) rounds are done; if running, the next round is at its score stage."""
    from gradalign_common.records import RolloutRecord, write_rollouts

    exp_id = _create(live, model_dir, name=name, mode=mode)
    rng = random.Random(exp_id)
    problems = _problems(live.app.state.settings.artifact_root) if with_details else {}
    t0 = utcnow() - dt.timedelta(minutes=20)
    accuracy: dict[tuple[int, str], float] = {}
    with live.sessions() as s:
        exp = s.get(Experiment, exp_id)
        pool = [pid for _, pid in sorted(s.execute(select(PoolProblem.position, PoolProblem.problem_id).where(PoolProblem.experiment_id == exp_id)).all())]
        clock = t0
        for r, reward in enumerate(rewards):
            rnd = Round(
                experiment_id=exp_id, index=r, status="completed", checkpoint_in=f"ckpt-{r}", checkpoint_out=f"ckpt-{r + 1}",
                validation_reward=reward, candidate_accuracy=0.35 + 0.05 * r + rng.uniform(0, 0.04), started_at=clock,
            )
            stages = []
            for name_, seconds in zip(STAGES, (21.0, 9.5, 14.2, 0.3, 31.0)):
                seconds *= rng.uniform(0.9, 1.1)
                result = None
                if name_ == "rollout_train" and with_details:
                    path = tmp_path / "rollouts" / f"{exp_id}-{r}.parquet"
                    records = []
                    for pid in pool[r * 16 : r * 16 + 16]:
                        truth = problems[pid].ground_truth
                        n_correct = rng.choice([0, 1, 2, 2, 3, 4])
                        accuracy[(r, pid)] = n_correct / 4
                        for i in range(4):
                            ok = i < n_correct
                            text = truth if ok else str(int(truth) + rng.randint(1, 9))
                            records.append(RolloutRecord(pid, (1, 2, 3), tuple(range(len(text) + 1)), float(ok), ok, text, "stop"))
                    write_rollouts(path, records)
                    result = {"paths": [str(path)]}
                stages.append(
                    Stage(
                        name=name_, status="succeeded", attempts=1, started_at=clock, finished_at=clock + dt.timedelta(seconds=seconds),
                        compute_seconds=seconds * 0.9, result=result,
                        progress_done=16 if name_ == "score" else 0, progress_total=16 if name_ == "score" else 0,
                        progress_unit="groups" if name_ == "score" else None,
                    )
                )
                clock += dt.timedelta(seconds=seconds + 0.2)
            rnd.stages = stages
            rnd.finished_at = clock
            rnd.compute_seconds = sum(st.compute_seconds for st in stages)
            rnd.overhead_seconds = 0.21 + 0.01 * r
            s.add(rnd)
            s.flush()
            if with_details:
                scored = sorted(((rng.gauss(0.1 * r, 0.3), pid) for pid in pool[r * 16 : r * 16 + 16]), reverse=True)
                for rank, (score, pid) in enumerate(scored, start=1):
                    acc = accuracy[(r, pid)]
                    s.add(
                        Candidate(
                            round_id=rnd.id, problem_id=pid, n_responses=4, accuracy=acc, mean_reward=acc, mean_response_length=3.0,
                            score=score, zero_advantage=acc in (0.0, 1.0), selected=rank <= 4, rank=rank if rank <= 4 else None,
                        )
                    )
                for step in range(1, 5):
                    g = r * 4 + step
                    metrics = {
                        "loss": 0.5 / g + rng.uniform(-0.02, 0.02), "mean_reward": reward + rng.uniform(-0.05, 0.05), "kl": 0.001 * g,
                        "grad_norm": rng.uniform(0.5, 1.5), "entropy": 1.2 - 0.03 * g, "response_length": 3 + rng.uniform(0, 1),
                        "tokens_per_second": 800 + rng.uniform(-50, 50), "clip_fraction": rng.uniform(0, 0.1),
                    }
                    s.add(TrainStep(round_id=rnd.id, step=step, metrics=metrics))
        exp.started_at, exp.current_round = t0, len(rewards)
        if running:
            rnd = Round(experiment_id=exp_id, index=len(rewards), status="running", checkpoint_in=f"ckpt-{len(rewards)}", started_at=clock)
            rnd.stages = [
                Stage(name="rollout_train", status="succeeded", attempts=1, started_at=clock, finished_at=clock + dt.timedelta(seconds=20), compute_seconds=19.0),
                Stage(name="rollout_val", status="succeeded", attempts=1, started_at=clock + dt.timedelta(seconds=20), finished_at=clock + dt.timedelta(seconds=30), compute_seconds=9.0),
                Stage(name="score", status="running", attempts=1, started_at=utcnow() - dt.timedelta(seconds=12), progress_done=3, progress_total=16, progress_unit="groups"),
                Stage(name="select", status="pending"),
                Stage(name="train", status="pending"),
            ]
            s.add(rnd)
            exp.status, exp.current_stage = "running", "score"
        else:
            exp.status, exp.current_stage, exp.finished_at = "completed", None, clock
        s.commit()
    return exp_id


def advance_to_train(live: LiveScheduler, exp_id: int, round_index: int) -> None:
    """What the orchestrator commits when score and select finish and train starts."""
    now = utcnow()
    with live.sessions() as s:
        rnd = s.scalar(select(Round).where(Round.experiment_id == exp_id, Round.index == round_index))
        by_name = {st.name: st for st in rnd.stages}
        by_name["score"].status, by_name["score"].finished_at, by_name["score"].compute_seconds = "succeeded", now - dt.timedelta(seconds=1), 11.0
        by_name["score"].progress_done = 16
        sel = by_name["select"]
        sel.status, sel.attempts, sel.started_at, sel.finished_at = "succeeded", 1, now - dt.timedelta(seconds=1), now
        train = by_name["train"]
        train.status, train.attempts, train.started_at = "running", 1, now
        train.progress_done, train.progress_total, train.progress_unit = 0, 4, "steps"
        s.get(Experiment, exp_id).current_stage = "train"
        s.commit()


def publish_until(live: LiveScheduler, p, event: dict, selector: str, tries: int = 10) -> None:
    """Publish `event` until `selector` appears: the first may go out before the page's stream subscribed."""
    for _ in range(tries):
        live.publish(event)
        try:
            p.wait_for_selector(selector, timeout=1500)
            return
        except Exception:  # noqa: BLE001 - playwright's TimeoutError; publish again
            continue
    raise AssertionError(f"the page never showed {selector!r} after publishing {event}")


def count(p, selector: str) -> int:
    return p.locator(selector).count()


def chart_points(p, key: str) -> int:
    return int(p.get_attribute(f'figure[data-chart="{key}"]', "data-points"))


# ---- plain HTTP: everything is served locally ---------------------------------------------------


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.refs.append((tag, value))


def test_every_asset_is_served_locally(tmp_path):
    app = create_app(make_settings(tmp_path, f"sqlite:///{tmp_path / 'scheduler.db'}"))
    with TestClient(app) as client:
        index = client.get("/")
        assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in index.headers["content-security-policy"]
        parser = _Refs()
        parser.feed(index.text)
        assets = [(tag, ref) for tag, ref in parser.refs if not ref.startswith("#")]
        assert {ref for _, ref in assets} >= {"/static/app.js", "/static/style.css", "/static/favicon.svg"}
        for tag, ref in assets:
            parts = urlsplit(ref)
            assert not parts.scheme and not parts.netloc, f"<{tag}> refers to another host: {ref}"
            resp = client.get(ref)
            assert resp.status_code == 200, (ref, resp.status_code)
            assert len(resp.content) > 0
        assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/static/style.css").headers["content-type"].startswith("text/css")

        # the script is native ES modules, no build step: the page loads the entry module, the policy lets
        # same-origin modules run, and every module it imports (transitively) is served as JavaScript
        assert '<script type="module" src="/static/app.js"></script>' in index.text
        assert "script-src 'self'" in index.headers["content-security-policy"]
        served, todo = set(), ["/static/app.js"]
        while todo:
            ref = todo.pop()
            if ref in served:
                continue
            served.add(ref)
            resp = client.get(ref)
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/javascript"), (ref, resp.status_code)
            for spec in re.findall(r'^(?:import|export)\s[^;]*?\sfrom\s+"([^"]+)";', resp.text, re.M):
                assert spec.startswith(("./", "../")) and spec.endswith(".js"), f"{ref} imports {spec!r}: only relative .js modules"
                todo.append(urljoin(ref, spec))
        modules = {f"/static/{path.relative_to(STATIC_DIR).as_posix()}" for path in STATIC_DIR.rglob("*.js")}
        assert served == modules, f"modules nothing imports: {sorted(modules - served)}"
        # the bound: no module of the dashboard is a 2,000-line file again
        sizes = {path.relative_to(STATIC_DIR).as_posix(): len(path.read_text(encoding="utf-8").splitlines()) for path in STATIC_DIR.rglob("*.js")}
        assert max(sizes.values()) < 500, sizes

        # no file of the dashboard names another host (scripts, styles, fonts, images)
        for path in STATIC_DIR.rglob("*"):
            if path.is_file():
                text = path.read_text(encoding="utf-8")
                urls = [u for u in re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}[^\s\"')]*", text) if u != SVG_NAMESPACE]
                assert not urls, f"{path.name} names other hosts: {urls}"
                assert "@import" not in text and "@font-face" not in text, path.name

        # the single page answers every /ui/ path; nothing outside static/ is served
        for path in ("/ui/", "/ui/experiments/1", "/ui/compare"):
            resp = client.get(path)
            assert resp.status_code == 200 and '<script type="module" src="/static/app.js"' in resp.text, path
        assert client.get("/static/missing.js").status_code == 404
        assert client.get("/static/../router.py").status_code == 404
        assert client.get("/static/%2e%2e/router.py").status_code == 404
        # the API is still the API
        assert client.get("/api/v1/experiments").json()["total"] == 0


# ---- the browser ---------------------------------------------------------------------------------


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
    top = ARTIFACTS / f"dashboard-experiment-top-{_db_label(request)}.png"  # live panel, timeline and charts
    height = page.evaluate("document.getElementById('history-h').getBoundingClientRect().top + window.scrollY")
    page.screenshot(path=str(top), full_page=True, clip={"x": 0, "y": 0, "width": 1366, "height": int(height) - 8})
    if _db_label(request) == "sqlite" and (not DOCS_SCREENSHOT.exists() or os.environ.get("GRADALIGN_UPDATE_DOCS_SCREENSHOT") == "1"):
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
    problem = _problems(scheduler.app.state.settings.artifact_root)[first]
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


def test_create_form_shows_422_next_to_the_field(scheduler, page, tiny_model_dir, request):
    page.goto("/#/new")
    page.wait_for_selector('main[data-loaded="true"][data-page="create"]')
    login(page)
    page.fill("#field-name", "from-the-form")
    page.fill("#field-model", str(tiny_model_dir))
    for field, value in {"chunk_size": "16", "k": "32", "num_selections": "2", "train_batch_size": "4", "iters_per_select": "1"}.items():
        page.fill(f"#field-{field}", value)
    page.click("#create-submit")
    error = page.wait_for_selector('.field[data-field="k"] .field-error')
    assert "k=32" in error.inner_text()
    assert count(page, ".field-error") == 1
    assert page.get_attribute("#field-k", "aria-invalid") == "true"
    assert "error-k" in page.get_attribute("#field-k", "aria-describedby")
    assert page.is_visible("#form-errors")
    screenshot(page, "create-422", request)

    # a 422 raised by the service (model directory) lands next to the model field, the old error goes
    page.fill("#field-k", "4")
    page.fill("#field-model", str(tiny_model_dir.parent / "no-such-model"))
    page.click("#create-submit")
    page.wait_for_selector('.field[data-field="model"] .field-error')
    assert count(page, ".field-error") == 1 and count(page, '.field[data-field="k"] .field-error') == 0

    # a valid form creates the experiment and opens its page
    page.fill("#field-model", str(tiny_model_dir))
    page.click("#create-submit")
    page.wait_for_selector('main[data-loaded="true"][data-page="experiment"]')
    assert "from-the-form" in page.inner_text("#exp-title")
    assert scheduler.app.state.experiments.list(None, 0, 10)[1] == 1


def _create_body_schema(doc: dict) -> dict:
    """The JSON schema of POST /api/v1/experiments' body in an OpenAPI document, its $ref resolved."""
    schema = doc["paths"]["/api/v1/experiments"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    ref = schema["$ref"]
    assert ref.startswith("#/components/schemas/"), ref
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]]


def test_create_form_is_built_from_the_openapi_schema(scheduler, page, tiny_model_dir):
    """The form cannot drift from the API: one input per property of the body schema (ExperimentSpec),
    enums as selects with exactly the enum's options, the API's defaults prefilled; submitted with only
    the required fields filled, it creates an experiment whose config is the API's defaults."""
    doc = page.request.get(f"{scheduler.url}/openapi.json").json()
    schema = _create_body_schema(doc)
    props, required = schema["properties"], set(schema["required"])
    assert {"weight_decay", "reuse_rollouts", "keep_last_checkpoints", "keep_best_checkpoints", "priority", "max_grad_norm", "scoring_dtype"} <= set(props)
    page.goto("/#/new")
    page.wait_for_selector('main[data-loaded="true"][data-page="create"]')
    login(page)
    assert page.locator("#create-form .field[data-field]").evaluate_all("fs => fs.map(f => f.dataset.field)") == list(props)
    for name, prop in props.items():
        control = page.locator(f"#field-{name}")
        expect(control).to_have_count(1)
        assert page.locator(f'#create-form label[for="field-{name}"]').count() == 1, name
        assert (control.get_attribute("aria-required") == "true") == (name in required), name
        if "enum" in prop:
            assert control.evaluate("el => el.tagName") == "SELECT", name
            assert control.locator("option").evaluate_all("os => os.map(o => o.value)") == [str(v) for v in prop["enum"]], name
        if prop.get("type") == "boolean":
            assert control.get_attribute("type") == "checkbox" and control.is_checked() == bool(prop.get("default")), name
        elif "default" in prop:
            value = control.input_value()
            assert (float(value) == prop["default"]) if prop.get("type") in ("integer", "number") else value == str(prop["default"]), (name, value)
        if prop.get("description"):
            expect(page.locator(f"#help-{name}")).to_have_count(1)
    assert page.locator("#field-mode option").evaluate_all("os => os.map(o => o.value)") == props["mode"]["enum"]

    # only the required fields without a value are left to fill
    empty = [name for name in props if page.locator(f"#field-{name}").get_attribute("type") == "text" and not page.input_value(f"#field-{name}")]
    filled = {"model": str(tiny_model_dir), "chunk_size": 16, "k": 4, "num_selections": 2, "train_batch_size": 4, "iters_per_select": 1}
    assert set(empty) - {"keep_last_checkpoints"} == set(filled), empty
    for name, value in filled.items():
        page.fill(f"#field-{name}", str(value))
    page.click("#create-submit")
    page.wait_for_selector('main[data-loaded="true"][data-page="experiment"]')
    (exp,), total = scheduler.app.state.experiments.list(None, 0, 10)
    assert total == 1
    expected = ExperimentSpec(**filled, train_dataset="arith-train", val_dataset="arith-val").model_dump(mode="json")
    config = {key: exp.config[key] for key in expected}
    assert Path(config.pop("model")).resolve() == Path(expected.pop("model")).resolve()
    assert config == expected


def test_actions_need_a_token_and_say_so(scheduler, page, tiny_model_dir, tmp_path, request):
    exp_id = seed_experiment(scheduler, tiny_model_dir, tmp_path, name="to-cancel", mode="sim", rewards=[0.3], running=True, with_details=False)
    page.on("dialog", lambda d: d.accept())
    sent: list[str | None] = []
    page.on("request", lambda r: sent.append(r.headers.get("authorization")) if r.method == "POST" else None)
    page.goto(f"/#/experiments/{exp_id}")
    page.wait_for_selector('main[data-loaded="true"][data-page="experiment"]')

    # no token: the API's 401 is shown, and nothing changed
    page.click("#action-cancel")
    banner = page.wait_for_selector('#banner[data-status-code="401"]')
    assert "401 Unauthorized" in banner.inner_text() and "API token" in banner.inner_text()
    assert sent == [None]
    # a wrong token: 403
    login(page, "not-a-valid-token")
    page.click("#action-cancel")
    page.wait_for_selector('#banner[data-status-code="403"]')
    assert "403 Forbidden" in page.inner_text("#banner")
    assert sent[-1] == "Bearer not-a-valid-token"
    with scheduler.sessions() as s:
        assert s.get(Experiment, exp_id).status == "running"
    screenshot(page, "auth-error", request)

    # the right token (kept in localStorage across reloads): cancel, then resume
    login(page)
    page.reload()
    page.wait_for_selector('main[data-loaded="true"][data-page="experiment"]')
    assert page.input_value("#token-input") == TOKEN
    page.click("#action-cancel")
    page.wait_for_selector('#exp-title[data-status="cancelled"]')
    assert sent[-1] == f"Bearer {TOKEN}"
    assert page.is_enabled("#action-resume") and not page.is_enabled("#action-cancel")
    page.click("#action-resume")
    page.wait_for_selector('#exp-title[data-status="running"]')
    with scheduler.sessions() as s:
        assert s.get(Experiment, exp_id).status == "running"


def test_live_events_send_the_token_when_reads_need_one(guarded_scheduler, guarded_page, tiny_model_dir, tmp_path):
    """With read_requires_token the event stream needs the header EventSource cannot send: the page
    streams over fetch() with the saved token, reconnects with it, and stops (saying 401) without one."""
    live, p = guarded_scheduler, guarded_page
    exp_id = seed_experiment(live, tiny_model_dir, tmp_path, name="guarded", mode="sim", rewards=[0.3], running=True, with_details=False)
    streams: list[str | None] = []  # the Authorization header of each request for the event stream
    refused: list[int] = []
    p.on("request", lambda r: streams.append(r.headers.get("authorization")) if "/api/v1/events" in r.url else None)
    p.on("response", lambda r: refused.append(r.status) if "/api/v1/events" in r.url and r.status >= 400 else None)

    # no token: the stream is refused once with 401, the page says so and does not retry
    p.goto("/")
    p.wait_for_selector('#banner[data-status-code="401"]')
    conn = p.locator(".head-aside .conn")
    expect(conn).to_have_attribute("data-state", "closed")
    expect(conn).to_have_text("disconnected")
    p.wait_for_timeout(3500)  # a retry (after 1 s, then 2 s) would have happened by now
    assert streams == [None] and refused == [401], (streams, refused)
    assert "401 Unauthorized" in p.inner_text("#banner")

    # the token in the token box: the refused stream reconnects at once, with it, without a reload
    login(p)
    expect(conn).to_have_attribute("data-state", "live")
    assert streams[1:] == [f"Bearer {TOKEN}"] and refused == [401], (streams, refused)
    # and the experiment page's stream carries it too and goes live
    p.goto(f"/#/experiments/{exp_id}")
    p.wait_for_selector('main[data-loaded="true"][data-page="experiment"]')
    p.wait_for_selector('#conn[data-state="live"]')
    assert streams[1:] and all(h == f"Bearer {TOKEN}" for h in streams[1:]), streams
    # an event published after the page loaded reaches it
    publish_until(live, p, {"type": "progress", "experiment_id": exp_id, "round": 1, "stage": "score", "done": 9, "total": 16, "unit": "groups"},
                  '#live-progress-text:has-text("9 / 16 groups")')
    assert p.get_attribute("#live-progress", "value") == "9"

    # the server ends the stream: the page reconnects, with the token again, and keeps updating
    opened = len(streams)
    live.app.state.shutdown.set()
    deadline = time.monotonic() + 10
    while len(streams) <= opened and time.monotonic() < deadline:
        p.wait_for_timeout(100)
    live.app.state.shutdown.clear()
    assert len(streams) > opened, "the page did not reconnect after the stream ended"
    publish_until(live, p, {"type": "progress", "experiment_id": exp_id, "round": 1, "stage": "score", "done": 12, "total": 16, "unit": "groups"},
                  '#live-progress-text:has-text("12 / 16 groups")')
    expect(p.locator("#conn")).to_have_attribute("data-state", "live")
    assert all(h == f"Bearer {TOKEN}" for h in streams[1:]), streams
    assert refused == [401], refused
