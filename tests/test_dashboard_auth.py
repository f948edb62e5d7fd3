"""The dashboard and the API token, in real headless Chromium against a live scheduler: actions say 401
and 403 until the right token is saved, and with read_requires_token the live event stream carries the
token (over fetch(), reconnecting with it) and stops, saying 401, without one.
Helpers: tests/dashboard_fixtures.py.
"""

from __future__ import annotations

import time

import pytest

from dashboard_fixtures import TOKEN, expect, launch_chromium, login, open_guarded_page, open_page, publish_until
from dashboard_fixtures import screenshot, seed_experiment, start_guarded_scheduler, start_scheduler
from services.scheduler.db import Experiment


# the module's fixtures: a live scheduler, Debian's Chromium (one per module) and a fresh page of it
scheduler = pytest.fixture(start_scheduler)
browser = pytest.fixture(scope="module")(launch_chromium)
page = pytest.fixture(open_page)
guarded_scheduler = pytest.fixture(start_guarded_scheduler)
guarded_page = pytest.fixture(open_guarded_page)


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
