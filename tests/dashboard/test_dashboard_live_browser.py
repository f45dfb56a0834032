"""The dashboard's live refresh in a real headless Chromium (Playwright, as
test_dashboard_layout_browser.py) against a real uvicorn server: the Plots page's summary table is
filled from the same JSON as its charts, and a tab whose refreshes fail says since when its data is
stale, until the server answers again."""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
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



def test_a_refresh_keeps_a_table_scrolled_sideways(chromium: Any, user: dict) -> None:
    """Before: every refresh replaced each live region (its localized times never equal the server's
    HTML), so a wide table scrolled sideways in its box (a phone's 390 px) jumped back to its left
    edge every 5 s (and a link in it lost the focus); a region that did change lost the position.

    The browser's clock is Playwright's fake one (as test_live_refresh_waits_ten_times_a_slow_page):
    the test moves it to each refresh, which asks the real server; nothing waits on real time."""
    make_campaign(user["url"], user["token"], n_jobs=3)
    page = _page(chromium, user["url"], user["username"], user["password"], token=user["token"])
    page.set_viewport_size({"width": 390, "height": 844})
    page.clock.install()
    page.clock.pause_at(dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=1))  # an answer takes no time
    page.goto("/dashboard/jobs")
    page.evaluate("() => { window.refreshes = 0; document.addEventListener('balsam:refreshed', () => window.refreshes++); }")
    left = page.evaluate("""() => { const box = document.querySelector('[data-live] .table-scroll');
        box.scrollLeft = 120; window.scrolledBox = box; return box.scrollLeft; }""")
    assert left > 50  # the Jobs table is wider than a phone's window

    def refreshed(n: int) -> None:
        page.clock.run_for(5_000)  # to the next refresh; then its answer (the event, no timer)
        page.evaluate("""n => new Promise(done => { const seen = () => window.refreshes >= n ? done(true)
            : document.addEventListener('balsam:refreshed', seen, {once: true}); seen(); })""", n)

    refreshed(1)  # nothing changed: the region is left as it is
    assert page.evaluate("() => document.querySelector('[data-live] .table-scroll') === window.scrolledBox")
    assert page.evaluate("() => window.scrolledBox.scrollLeft") == left
    # the next answer differs (a job's workdir): the region is replaced, its box scrolled as it was
    page.route(re.compile(r".*/dashboard/jobs$"), lambda route: route.fulfill(
        response=(answer := route.fetch()), body=answer.text().replace("run/1<", "run/changed<")))
    # a keyboard user is on a job's link in the table (before: the focus fell back to the page)
    href = page.evaluate("""() => { const a = document.querySelector('#jobs-table a[href*="/dashboard/jobs/"]');
        a.focus({preventScroll: true}); return a.getAttribute('href'); }""")
    refreshed(2)
    assert page.locator("#jobs-table:has-text('run/changed')").count() == 1
    assert page.evaluate("() => document.querySelector('[data-live] .table-scroll') !== window.scrolledBox")
    assert page.evaluate("() => document.querySelector('[data-live] .table-scroll').scrollLeft") == left
    assert page.evaluate("() => document.activeElement.getAttribute('href')") == href
    assert page.evaluate("() => document.querySelector('[data-live]').contains(document.activeElement)")
    assert page.errors == []


def test_a_refresh_keeps_a_sites_box_scrolled_and_focused(chromium: Any, user: dict) -> None:
    """Before: a replaced Sites region gave each box the scroll of the box at the same place (its
    tables have no ids), so a table appearing in an earlier place (backfill windows reported) put it
    on the wrong box; and a focused box lost the focus to the page (the region changes at every
    refresh: "agent last heard N s ago")."""
    camp = make_campaign(user["url"], user["token"], n_jobs=1)
    site, name = camp["site"]["id"], camp["site"]["name"]
    queued = {"1001": {"scheduler_id": 1001, "state": "queued", "queue": "a-rather-long-queue-name", "num_nodes": 128,
                       "wall_time_min": 720, "project": "p", "time_remaining_min": 720, "queued_time_min": 33,
                       "message": "Resources: waiting for nodes to become available in the partition"}}
    headers = {"Authorization": f"Bearer {user['token']}"}
    with httpx.Client(base_url=user["url"], headers=headers, timeout=60) as api:
        assert api.put(f"/sites/{site}", json={"queued_jobs": queued}).status_code == 200
        page = _page(chromium, user["url"], user["username"], user["password"], token=user["token"])
        page.set_viewport_size({"width": 320, "height": 800})
        page.clock.install()
        page.clock.pause_at(dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=1))
        page.goto("/dashboard/")
        page.evaluate("() => { window.refreshes = 0; document.addEventListener('balsam:refreshed', () => window.refreshes++); }")
        label = f"{name}: in the scheduler's queue"
        box = "[...document.querySelectorAll('[data-live] .table-scroll')].find(b => b.getAttribute('aria-label') === label)"
        left = page.evaluate(f"label => {{ const b = {box}; b.scrollLeft = 150; b.focus(); return b.scrollLeft; }}", label)
        assert left > 50  # the queued job's table is wider than the window
        # a table appears before the scrolled one: every later box moves one place
        windows = {"debug": [{"num_nodes": 4, "wall_time_min": 30}]}
        assert api.put(f"/sites/{site}", json={"backfill_windows": windows}).status_code == 200
    page.clock.run_for(5_000)  # to the next refresh; then its answer (the event, no timer)
    page.evaluate("() => new Promise(done => window.refreshes ? done(true) : document.addEventListener('balsam:refreshed', done, {once: true}))")
    assert page.locator(f"[aria-label='{name}: backfill windows']").count() == 1
    scrolls = page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('[data-live] .table-scroll')]
        .map(b => [b.getAttribute('aria-label'), b.scrollLeft]))""")
    assert scrolls == {label: left, **{k: 0 for k in scrolls if k != label}}, scrolls
    assert page.evaluate("() => document.activeElement.getAttribute('aria-label')") == label
    # the new box does not scroll at 320 px: no Tab stop (before: every box was one)
    stops = page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('[data-live] .table-scroll')]
        .map(b => [b.getAttribute('aria-label'), b.scrollWidth > b.clientWidth ? b.tabIndex : b.getAttribute('tabindex')]))""")
    assert stops[label] == 0 and stops[f"{name}: backfill windows"] is None, stops
    assert page.errors == []
