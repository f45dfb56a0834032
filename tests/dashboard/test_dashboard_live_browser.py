"""The dashboard's live refresh in a real headless Chromium (Playwright, as
test_dashboard_layout_browser.py) against a real uvicorn server: the Plots page's summary table is
filled from the same JSON as its charts, and a tab whose refreshes fail says since when its data is
stale, until the server answers again."""

from __future__ import annotations

import json
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dashboard_helpers import make_campaign  # noqa: E402
from test_dashboard_layout_browser import _page, chromium  # noqa: E402,F401  (the browser fixture)

#: Waits for what the page shows (bounded so that a broken page fails instead of hanging), not timings.
WAIT_MS = 60_000


@pytest.fixture
def user(live_server: str, register: Any) -> dict[str, Any]:
    username, password, _user_id, token, _ = register(live_server)
    return {"url": live_server, "username": username, "password": password, "token": token}


def test_the_plots_summary_is_filled_from_the_data_request(chromium: Any, user: dict) -> None:
    """Before: the table was rendered by the page (its own plot_data) and refreshed by refetching the
    whole page; figures only the data request has never reached it."""
    first, last = 1714557600.0, 1714561200.0
    payload = {"throughput": {"t": [first, last], "finished": [1, 12345]},
               "utilization": {"t": [first, last], "busy": [7, 0], "available": [16, 16]},
               "summary": {"finished": 12345, "first_finished": first, "last_finished": last,
                           "busy_now": 7, "available_now": 16, "peak_busy": 9},
               "generated": last}
    page = _page(chromium, user["url"], user["username"], user["password"], timezone_id="UTC", locale="en-US")
    asked: list[str] = []

    def answer(route: Any) -> None:
        asked.append(route.request.url)
        route.fulfill(status=200, content_type="application/json", body=json.dumps(payload))

    page.route(re.compile(r".*/dashboard/plots/data.*"), answer)
    page.goto("/dashboard/plots")
    page.wait_for_selector("#summary-finished:has-text('12,345')", timeout=WAIT_MS)
    assert page.inner_text("#summary-busy") == "7 (9)"
    assert page.inner_text("#summary-available") == "16"
    first_last = page.inner_text("#summary-first-last")
    assert first_last.count(" / ") == 1 and "5/1/2024" in first_last and "UTC" in first_last, first_last
    times = page.locator("#summary-first-last time")
    assert times.count() == 2 and times.first.get_attribute("title") == "2024-05-01T10:00:00Z"
    assert len(asked) == 1  # one request for the charts and the table
    assert page.locator("[data-live]").count() == 0  # no second refresh loop (dashboard.js's) on this page
    assert page.errors == []


def test_a_tab_says_when_the_server_stops_answering(chromium: Any, live_server_factory: Any, register: Any) -> None:
    """Before: with the server down, the tab kept showing the last data as if it were current
    (dashboard.js's refresh ignored the failure); ``balsam job ls --watch`` says so."""
    server = live_server_factory("sqlite")
    username, password, _user_id, token, _ = register(server.url)
    make_campaign(server.url, token, n_jobs=2, finished=True, name=f"stale-{uuid.uuid4().hex[:6]}")
    jobs = _page(chromium, server.url, username, password)
    jobs.goto("/dashboard/jobs")
    plots = jobs.context.new_page()  # the same session, in a second tab
    plots.errors = []
    plots.on("pageerror", lambda exc: plots.errors.append(f"page error: {exc}"))
    plots.on("console", lambda msg: plots.errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    plots.goto("/dashboard/plots")
    plots.wait_for_selector("#plot-status:has-text('jobs finished')", timeout=WAIT_MS)
    assert jobs.locator("#live-stale").is_hidden() and plots.locator("#live-stale").is_hidden()
    server.stop()
    stale = re.compile(r"^not updated since \d\d:\d\d:\d\d \(server not answering\)$")
    for tab in (jobs, plots):
        tab.wait_for_selector("#live-stale:has-text('server not answering')", timeout=WAIT_MS)
        assert stale.match(tab.inner_text("#live-stale")), tab.inner_text("#live-stale")
    server.start()  # the same port and database: the session cookie still holds
    for tab in (jobs, plots):
        tab.wait_for_selector("#live-stale", state="hidden", timeout=WAIT_MS)
    assert jobs.locator("#jobs-table").is_visible()
    assert plots.inner_text("#summary-finished") == "1"
    # the browser logs each refused connection; nothing else went wrong
    assert [e for e in jobs.errors + plots.errors if "ERR_CONNECTION_REFUSED" not in e] == []
