"""The live refresh and the keyboard in a real headless Chromium (Playwright, as
test_dashboard_live_browser.py) against a real uvicorn server, the page's timers on Playwright's
clock (each refresh asks the real server; nothing waits on real time): a job's page refreshes its
header with its history, its fields apart from its parents and children, and says when the job is
gone, and only then (a proxy's "not found" is a failed refresh, tried again); a focused box keeps
the focus when it stops scrolling; a chart fits a phone's window and its box, and is a Tab stop
where it scrolls, from the page's first draw, and resizing it is no error of the page."""

from __future__ import annotations

import datetime as dt
import re
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dashboard_helpers import make_campaign  # noqa: E402
from test_dashboard_layout_browser import SMALL_PHONE, _page, chromium  # noqa: E402,F401  (the browser fixture)

WAIT_MS = 60_000
#: Counts the answered refreshes (dashboard.js fires balsam:refreshed after each).
COUNT_REFRESHES = "() => { window.refreshes = 0; document.addEventListener('balsam:refreshed', () => window.refreshes++); }"
#: Each chart's name, how far it overflows its box, whether its box is a Tab stop, its canvas's width.
CHARTS_JS = """() => [...document.querySelectorAll('.chart')].map(c => ({label: c.getAttribute('aria-label'),
    role: c.getAttribute('role'), over: c.scrollWidth - c.clientWidth, stop: c.getAttribute('tabindex'),
    canvas: c.querySelector('canvas').getBoundingClientRect().width}))"""
#: Two frames (the chart pages run on the real clock): a resize's observers and uPlot's sizing have run.
TWO_FRAMES = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"


@pytest.fixture
def user(live_server: str, register: Any) -> dict[str, Any]:
    username, password, _user_id, token, _ = register(live_server)
    return {"url": live_server, "username": username, "password": password, "token": token}


def _live_page(chromium: Any, user: dict, path: str, viewport: "dict | None" = None) -> Any:
    page = _page(chromium, user["url"], user["username"], user["password"], token=user["token"])
    if viewport:
        page.set_viewport_size(viewport)
    page.clock.install()
    page.clock.pause_at(dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=1))  # an answer takes no time
    page.goto(path)
    page.evaluate(COUNT_REFRESHES)
    return page


def _refreshed(page: Any, n: int) -> None:
    """Move the clock to the next refresh and wait for its answer (the event, no timer)."""
    page.clock.run_for(5_000)
    page.wait_for_function(f"() => window.refreshes >= {n}", timeout=WAIT_MS)


def test_a_job_page_refreshes_its_header_with_its_history(chromium: Any, user: dict) -> None:
    """Before: the state badge, "last update" and the parents and children were outside the page's
    live region: after a state change the history said RUNNING and the header STAGED_IN until a
    reload. Regions the server did not change are still left as they are, focus kept."""
    camp = make_campaign(user["url"], user["token"], n_jobs=2)
    job = camp["jobs"][1]["id"]
    page = _live_page(chromium, user, f"/dashboard/jobs/{job}")
    assert page.inner_text("#job-state") == "STAGED_IN"
    # a keyboard user is on the header's link to the site; the Fields table is held to see it kept
    href = page.evaluate("""() => { const a = document.querySelector('main a[href*="#site-"]');
        a.focus({preventScroll: true}); window.fieldsBox = document.querySelector('[aria-label="Fields"]');
        return a.getAttribute('href'); }""")
    before = page.get_attribute("main time", "datetime")
    with httpx.Client(base_url=user["url"], headers={"Authorization": f"Bearer {user['token']}"}, timeout=60) as api:
        for state, data in (("PREPROCESSED", {}), ("RUNNING", {"num_nodes": 1})):
            assert api.patch("/jobs/", json=[{"id": job, "state": state, "state_data": data}]).status_code == 200
    _refreshed(page, 1)
    assert page.locator("#events td:text-is('RUNNING')").count() == 1  # the history (always was)
    assert page.inner_text("#job-state") == "RUNNING"  # and now the header with it
    assert page.get_attribute("main time", "datetime") != before  # "last update"
    assert page.evaluate("() => document.activeElement.getAttribute('href')") == href
    # the Fields table did not change (the state and the times are not among its fields): not rebuilt
    assert page.evaluate("() => document.querySelector('[aria-label=\"Fields\"]') === window.fieldsBox")
    assert page.errors == []


def test_a_job_page_keeps_its_fields_and_says_when_the_job_is_gone(chromium: Any, user: dict) -> None:
    """Before: the Fields table shared its live region with the parents and children (up to 200 of
    each), so a listed parent's change of state rebuilt it and a selection in it was lost. And a job
    deleted while its page was open: each refresh got "not found", which changed nothing (no note,
    the old state shown as current), asked again every 5 s and logged a console error each time."""
    camp = make_campaign(user["url"], user["token"], n_jobs=2)
    parent = camp["jobs"][1]["id"]
    with httpx.Client(base_url=user["url"], headers={"Authorization": f"Bearer {user['token']}"}, timeout=60) as api:
        created = api.post("/jobs/", json=[{"app_id": camp["app"]["id"], "workdir": "run/child", "parent_ids": [parent]}])
        assert created.status_code == 201, created.text
        job = created.json()[0]["id"]
        page = _live_page(chromium, user, f"/dashboard/jobs/{job}")
        # a user selected a field's value (to copy it); the page's fetches are counted from here
        selected = page.evaluate("""() => { const td = document.querySelector('table.fields td');
            const range = document.createRange(); range.selectNodeContents(td);
            getSelection().removeAllRanges(); getSelection().addRange(range);
            window.fieldsBox = document.querySelector('[aria-label="Fields"]');
            window.fetches = 0; const fetch = window.fetch; window.fetch = (...a) => (window.fetches++, fetch(...a));
            return getSelection().toString(); }""")
        assert selected.strip()
        assert api.patch("/jobs/", json=[{"id": parent, "state": "PREPROCESSED", "state_data": {}}]).status_code == 200
        _refreshed(page, 1)
        assert page.inner_text(f"#parents li:has(a[href$='/jobs/{parent}']) .badge") == "PREPROCESSED"  # the family
        assert page.evaluate("""() => [document.querySelector('[aria-label="Fields"]') === window.fieldsBox,
            getSelection().toString()]""") == [True, selected]  # not rebuilt, the selection kept
        state = page.inner_text("#job-state")
        assert api.delete(f"/jobs/{job}").status_code == 204
    page.clock.run_for(5_000)
    note = page.wait_for_selector("#live-stale:not([hidden])", timeout=WAIT_MS).inner_text()
    assert note.startswith(f"Job {job} not found: shown as of ") and "no longer refreshed" in note, note
    assert page.inner_text("#job-state") == state  # what it showed, marked as such
    page.clock.run_for(600_000)  # ten minutes: not asked again
    assert page.evaluate("() => window.fetches") == 2
    # the browser's own line for the one "not found" answer, and no other error
    assert len(page.errors) == 1 and "404" in page.errors[0], page.errors


@pytest.mark.parametrize("which", ["jobs", "job"])
def test_a_proxys_not_found_is_a_failed_refresh_not_the_end(chromium: Any, user: dict, which: str) -> None:
    """Before: any 404 ended the live refresh for good, on every page: one "404 page not found" of a
    proxy (Traefik's while the server behind it restarts) and the page was never refreshed again,
    even after ticking "live updates" off and on. The server answers "not found" only to a job's
    page, with its own error page: only that ends the refreshes (the test above)."""
    camp = make_campaign(user["url"], user["token"], n_jobs=2)
    job = camp["jobs"][1]["id"]
    page = _live_page(chromium, user, "/dashboard/jobs" if which == "jobs" else f"/dashboard/jobs/{job}")
    _refreshed(page, 1)
    proxy = re.compile(r".*/dashboard/jobs(/\d+)?$")
    page.route(proxy, lambda route: route.fulfill(status=404, content_type="text/plain", body="404 page not found\n"))
    page.clock.run_for(5_000)
    note = page.wait_for_selector("#live-stale:not([hidden])", timeout=WAIT_MS).inner_text()
    assert note.startswith("not updated since ") and note.endswith("(the server answered 404)"), note
    page.unroute(proxy)
    with httpx.Client(base_url=user["url"], headers={"Authorization": f"Bearer {user['token']}"}, timeout=60) as api:
        assert api.patch("/jobs/", json=[{"id": job, "state": "PREPROCESSED", "state_data": {}}]).status_code == 200
    _refreshed(page, 2)  # the next period (one failure: no longer wait), the server's answer again
    shown = f"#jobs-table tr:has(a[href$='/jobs/{job}'])" if which == "jobs" else "#job-state"
    assert "PREPROCESSED" in page.inner_text(shown)
    assert page.is_hidden("#live-stale")


def test_a_focused_box_keeps_the_focus_when_it_stops_scrolling(chromium: Any, user: dict) -> None:
    """Before: a focused table's box that no longer scrolled (a refresh made its table narrower, or
    the window wider) lost its tabindex and so the focus, to the page itself. Now it keeps the focus
    (focusable, tabindex -1: not a Tab stop) until the keyboard leaves it; then it is no stop."""
    make_campaign(user["url"], user["token"], n_jobs=3)
    page = _live_page(chromium, user, "/dashboard/jobs", {"width": 390, "height": 844})
    box = "document.querySelector('[aria-label=\"Jobs\"]')"
    assert page.evaluate(f"() => {{ const b = {box}; b.focus(); return [b.scrollWidth > b.clientWidth, b.tabIndex]; }}") == [True, 0]
    # the next answer's table fits a phone (its long columns gone)
    page.route(re.compile(r".*/dashboard/jobs$"), lambda route: route.fulfill(
        response=(answer := route.fetch()), body=re.sub(r'(<table[^>]*id="jobs-table"[^>]*>).*?</table>',
                                                        r"\1<tbody><tr><td>1</td></tr></tbody></table>", answer.text(), flags=re.S)))
    _refreshed(page, 1)
    assert page.evaluate(f"() => {{ const b = {box}; return [b.scrollWidth > b.clientWidth, b.getAttribute('tabindex'), b === document.activeElement]; }}") \
        == [False, "-1", True]
    page.keyboard.press("Tab")  # leaves it: no longer a stop of any kind
    assert page.evaluate(f"() => [{box}.getAttribute('tabindex'), document.activeElement === document.body]") == [None, False]
    # the same when the window gets wider: a page whose table scrolls, focused, then a desktop's width
    page.unroute(re.compile(r".*/dashboard/jobs$"))
    _refreshed(page, 2)
    assert page.evaluate(f"() => {{ const b = {box}; b.focus(); return [b.scrollWidth > b.clientWidth, b.tabIndex]; }}") == [True, 0]
    # (the page's requestAnimationFrame is Playwright's paused clock's: the resize event itself is awaited,
    # its listener added after dashboard.js's, which has run when it is called)
    page.evaluate("() => { window.resized = new Promise(r => window.addEventListener('resize', r, {once: true})); }")
    page.set_viewport_size({"width": 1280, "height": 900})
    page.evaluate("() => window.resized")
    assert page.evaluate(f"() => {{ const b = {box}; return [b.scrollWidth > b.clientWidth, b.getAttribute('tabindex'), b === document.activeElement]; }}") \
        == [False, "-1", True]
    assert page.errors == []


def test_a_chart_fits_a_small_phone(chromium: Any, user: dict) -> None:
    """Before: plots.js drew each chart at least 320 px wide, so at 320 px it scrolled sideways in
    its box, which no key could reach (only the tables' boxes were Tab stops). Now a chart is drawn
    at its box's width (its whole time axis in view), down to 200 px; below that its box scrolls, a
    named Tab stop as a table's box."""
    make_campaign(user["url"], user["token"], n_jobs=2, finished=True)
    page = _page(chromium, user["url"], user["username"], user["password"], token=user["token"])
    page.set_viewport_size(SMALL_PHONE)
    page.goto("/dashboard/plots")
    page.wait_for_selector("#plot-status:has-text('jobs finished')", timeout=WAIT_MS)
    charts = page.evaluate(CHARTS_JS)
    assert [(c["label"], c["role"], c["over"], c["stop"]) for c in charts] == [
        ("Throughput chart", "region", 0, None), ("Utilization chart", "region", 0, None)], charts
    assert all(200 <= c["canvas"] < 300 for c in charts), charts
    assert page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth") <= 0
    # narrower than any phone: the chart keeps 200 px and scrolls in its box, a Tab stop
    page.set_viewport_size({"width": 200, "height": 568})
    page.evaluate(TWO_FRAMES)
    charts = page.evaluate(CHARTS_JS)
    assert all(c["over"] > 0 and c["stop"] == "0" for c in charts), charts
    page.set_viewport_size(SMALL_PHONE)
    page.evaluate(TWO_FRAMES)
    assert [(c["over"], c["stop"]) for c in page.evaluate(CHARTS_JS)] == [(0, None), (0, None)]
    # its box narrows with no resize event (a classic vertical scrollbar appears, as drawing the charts
    # makes a desktop's page tall enough for one: 15 px): the chart follows its box, not the window
    page.evaluate("() => { document.body.style.marginRight = '15px'; }")
    page.evaluate(TWO_FRAMES)
    assert [(c["over"], c["stop"]) for c in page.evaluate(CHARTS_JS)] == [(0, None), (0, None)]
    assert page.errors == []


def test_a_chart_too_wide_from_the_first_draw_is_a_tab_stop(chromium: Any, user: dict) -> None:
    """Before: the Tab stops were set right after uPlot was made, before it sized its canvas (a
    deferred step): a chart that scrolled from the page's first draw (a window narrower than about
    250 px) was no stop. And without JavaScript the page had two empty named regions."""
    make_campaign(user["url"], user["token"], n_jobs=2, finished=True)
    page = _page(chromium, user["url"], user["username"], user["password"], token=user["token"])
    served = page.request.get("/dashboard/plots").text()  # as a browser without JavaScript has it
    assert re.findall(r'<div class="chart"[^>]*>', served) == ['<div class="chart" id="chart-throughput">',
                                                              '<div class="chart" id="chart-utilization">']
    page.set_viewport_size({"width": 200, "height": 568})
    page.goto("/dashboard/plots")
    page.wait_for_selector("#plot-status:has-text('jobs finished')", timeout=WAIT_MS)
    page.evaluate(TWO_FRAMES)
    charts = page.evaluate(CHARTS_JS)
    assert [(c["label"], c["role"], c["over"] > 0, c["stop"]) for c in charts] == [
        ("Throughput chart", "region", True, "0"), ("Utilization chart", "region", True, "0")], charts
    assert page.errors == []


def test_resizing_the_charts_is_no_error_of_the_page(chromium: Any, user: dict) -> None:
    """Before: plots.js resized a chart inside its box's ResizeObserver callback; the chart's legend
    re-wrapped, changing the height of the box observed, and the browser reported "ResizeObserver
    loop completed with undelivered notifications" as an error event of the window (6 times as the
    window narrowed from 1280 to 180 px; not an uncaught exception, so page.errors misses it)."""
    make_campaign(user["url"], user["token"], n_jobs=2, finished=True)
    page = _page(chromium, user["url"], user["username"], user["password"], token=user["token"])
    page.add_init_script("window.windowErrors = []; "
                         "window.addEventListener('error', e => window.windowErrors.push(String(e.message)));")
    page.set_viewport_size({"width": 1280, "height": 800})
    page.goto("/dashboard/plots")
    page.wait_for_selector("#plot-status:has-text('jobs finished')", timeout=WAIT_MS)
    widths = []
    for width in range(1280, 179, -20):
        page.set_viewport_size({"width": width, "height": 800})
        page.evaluate(TWO_FRAMES)
        widths.append(page.evaluate("() => document.getElementById('chart-throughput').querySelector('canvas')"
                                    ".getBoundingClientRect().width"))
    assert widths[0] > 1000 and widths[-1] == 200, widths  # the charts followed the window down to 200 px
    assert page.evaluate("() => window.windowErrors") == []
    assert page.errors == []
