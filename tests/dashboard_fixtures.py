"""Shared helpers of the dashboard tests (test_dashboard_*.py): a live scheduler, Debian's Chromium,
a page that fails the test on page errors, and experiments seeded in the database.

The browser is Debian's chromium (`apt-get install -y chromium`) driven by the Python
`playwright` package with `executable_path`; nothing is downloaded (never `playwright
install`). Without /usr/bin/chromium or playwright the browser tests FAIL, saying what to install.

The scheduler runs under uvicorn in a thread on a free loopback port with the orchestrator off;
`seed_experiment` writes rounds, stages, candidates and training steps with the SQLAlchemy models
(as the orchestrator would), and `publish_until` publishes events on `app.state.bus` to drive the
page live. The test modules turn `start_scheduler`, `launch_chromium` and `open_page` (and the
guarded variants) into their fixtures `scheduler`, `browser` (one per module) and `page`.
"""

from __future__ import annotations

import datetime as dt
import os
import random
from pathlib import Path

import pytest
from sqlalchemy import select

from scheduler_fixtures import experiment_body, make_settings
from live_scheduler import LiveScheduler
from services.scheduler.db import Candidate, Experiment, PoolProblem, Round, Stage, TrainStep, utcnow
from services.scheduler.schemas import ExperimentSpec

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
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
TIMEOUT_MS = 15_000


# ---- the live scheduler, the browser, the page --------------------------------------------------


def start_scheduler(tmp_path, database_url):
    """The fixture `scheduler`: a live scheduler whose bootstrap token is TOKEN."""
    live = LiveScheduler(make_settings(tmp_path, database_url, bootstrap_token=TOKEN))
    yield live
    live.stop()


def start_guarded_scheduler(tmp_path, database_url):
    """The fixture `guarded_scheduler`: a scheduler with read_requires_token: every read, the event
    stream included, needs the token."""
    live = LiveScheduler(make_settings(tmp_path, database_url, bootstrap_token=TOKEN, read_requires_token=True))
    yield live
    live.stop()


def expect(locator):
    from playwright.sync_api import expect as _expect

    return _expect(locator)


def launch_chromium():
    """The fixture `browser`: Debian's headless Chromium through playwright; fails (never skips) without either."""
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


def open_page(browser, scheduler):
    """The fixture `page`: a fresh browser context (own localStorage) at a laptop-sized viewport; fails
    the test on page errors."""
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


def open_guarded_page(browser, guarded_scheduler):
    """The fixture `guarded_page`: `page` on the guarded scheduler."""
    yield from open_page(browser, guarded_scheduler)


def _db_id(request) -> str:
    return request.node.callspec.params.get("database_url", "sqlite") if hasattr(request.node, "callspec") else "sqlite"


def db_label(request) -> str:
    url = _db_id(request)
    return "postgresql" if str(url).startswith("postgresql") else "sqlite"


def screenshot(p, name: str, request) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"dashboard-{name}-{db_label(request)}.png"
    p.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000, path
    return path


def login(p, token: str = TOKEN) -> None:
    p.fill("#token-input", token)
    p.click("#token-form button[type=submit]")
    p.wait_for_selector('#token-state[data-has-token="true"]')


# ---- seeding a running experiment directly in the database --------------------------------------


def _create(live: LiveScheduler, model_dir: Path, **overrides) -> int:
    body = experiment_body(model_dir, chunk_size=16, k=4, train_batch_size=4, iters_per_select=4, num_selections=6, n_samples_train=4)
    body.update(overrides)
    return live.app.state.experiments.create(ExperimentSpec(**body)).id


def train_problems(artifact_root: Path) -> dict:
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
    problems = train_problems(live.app.state.settings.artifact_root) if with_details else {}
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
