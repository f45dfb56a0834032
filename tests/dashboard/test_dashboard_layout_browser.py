"""The dashboard's layout and scripts in a real headless Chromium (Debian's ``chromium`` driven by
Playwright, as tests/site/test_dashboard_browser.py) against a real uvicorn server: long values
wrap inside the window, times carry their zone, an empty Plots page says so, and the live refresh
backs off when the page is slow to build."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from balsam.models import SUBMITTED_BY_KEY  # noqa: E402

from dashboard_helpers import BOXES_JS, LAYOUT_JS, LINES_JS, make_campaign  # noqa: E402

CHROMIUM = os.environ.get("BALSAM_TEST_CHROMIUM", "/usr/bin/chromium")
VIEWPORT = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
LAPTOP = {"width": 1024, "height": 768}
SMALL_PHONE = {"width": 320, "height": 568}  # the narrowest phones (an iPhone SE's 320 CSS px)
LONG_KEY, LONG_VALUE = "k" * 200, "v" * 1024
LONG_WORKDIR = "w" * 300


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.fail(f"headless Chromium not found at {CHROMIUM}: `apt-get install chromium` (scripts/test.sh does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


def _page(chromium: Any, url: str, username: str, password: str, token: str = "", **context: Any) -> Any:
    """A logged-in tab (through the login form; with the user's API ``token``, through a one-time
    login link instead: no password hash for the server to check); ``context``: Playwright context options."""
    ctx = chromium.new_context(base_url=url, viewport=VIEWPORT, **context)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.errors = errors
    if token:
        link = httpx.post(f"{url}/dashboard/login-link", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert link.status_code == 200, link.text
        assert page.goto(link.json()["path"]).url == f"{url}/dashboard/"
        return page
    page.goto("/dashboard/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r".*/dashboard/$"))
    return page


@pytest.fixture
def user(live_server: str, register: Any) -> dict[str, Any]:
    username, password, _user_id, token, _ = register(live_server)
    return {"url": live_server, "username": username, "password": password, "token": token}


def _overflow(page: Any) -> int:
    """How far the page is wider than the window (px; <= 0: no horizontal scrolling)."""
    return page.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")


def _boxes(page: Any) -> dict[str, int]:
    """The tables' boxes that scroll sideways: how far each is wider than it shows (px, by its table).
    A table in a box never widens the page (_overflow): a value that does not wrap widens its box."""
    return page.evaluate(BOXES_JS)


def test_long_tags_and_workdirs_wrap_inside_the_window(chromium: Any, user: dict) -> None:
    """Before: a 200+1024-character tag or a 300-character workdir made the Jobs page 11,461 px wide
    at a 1280 px window (tags were ``white-space: nowrap``; the cells had no wrap rule)."""
    campaign = make_campaign(user["url"], user["token"], n_jobs=1, name=f"wide-{uuid.uuid4().hex[:6]}")
    api = httpx.Client(base_url=user["url"], headers={"Authorization": f"Bearer {user['token']}"}, timeout=30)
    made = api.post("/jobs/", json=[{"app_id": campaign["app"]["id"], "workdir": LONG_WORKDIR,
                                     "tags": {LONG_KEY: LONG_VALUE, "short": "x"}}])
    assert made.status_code == 201, made.text
    parent = made.json()[0]["id"]
    child = api.post("/jobs/", json=[{"app_id": campaign["app"]["id"], "workdir": LONG_WORKDIR + "/child",
                                      "tags": {LONG_KEY: LONG_VALUE}, "parent_ids": [parent]}])
    assert child.status_code == 201, child.text
    page = _page(chromium, user["url"], user["username"], user["password"])
    for path in ("/dashboard/jobs", f"/dashboard/jobs/{parent}", f"/dashboard/jobs/{child.json()[0]['id']}"):
        page.goto(path)
        assert LONG_VALUE in page.inner_text("main")  # wrapped, not cut
        assert _overflow(page) <= 2, f"{path} is {_overflow(page)} px wider than the window"
        assert _boxes(page) == {}, f"{path}: a table scrolls in its box at 1280 px: {_boxes(page)}"
    assert page.errors == []


#: Ordinary names, each on one line wherever it is shown (a site's 20 characters, a queue, an app).
SITE_NAME, QUEUE, APP_NAME = "theta-gpu-production", "polaris-debug-queue", "MolecularDynamicsSim"


def test_every_page_fits_a_phone_and_a_desktop_window(chromium: Any, user: dict) -> None:
    """Before: at 390 px (a phone) the whole page scrolled sideways, its filters with it: the Sites
    page was 977 px wide, Jobs 863, a job's page 633, BatchJobs 1,215 and Events 740; at 1280 px
    the BatchJobs table broke its site, queue, project and "queue_maintainer" inside a word. Later:
    at 320 px the filters' selects (Jobs) and the charts (Plots) stuck out by up to 33 px, at
    1024 px a site's Active BatchJobs table scrolled in its box (49 px: "Submitted by" had a floor),
    and a keyboard could not reach a box to scroll it. Now each page is no wider than the window at
    320, 390, 1024 and 1280 px (a table wider than a phone scrolls in its own box, which a keyboard
    reaches and a screen reader names; at 1024 px only the BatchJobs' 15 columns do, at 1280 none),
    the header, filters and pager lie in the window, no table header is broken inside a word, and
    names stay on one line."""
    api = httpx.Client(base_url=user["url"], headers={"Authorization": f"Bearer {user['token']}"}, timeout=30)
    site = api.post("/sites/", json={
        "name": SITE_NAME, "path": "/lus/grand/projects/datascience/theta-gpu-production",
        "backfill_windows": {QUEUE: [{"num_nodes": 2, "wall_time_min": 10}]},
        "allowed_queues": {QUEUE: {"max_nodes": 2, "max_walltime": 60, "max_queued_jobs": 1},
                           "prod": {"max_nodes": 512, "max_walltime": 1440, "max_queued_jobs": 0}},
        "queued_jobs": {"7": {"scheduler_id": 7, "queue": QUEUE, "num_nodes": 1, "wall_time_min": 5, "project": "p",
                              "state": "queued", "queued_time_min": 1, "time_remaining_min": 5,
                              "message": "Priority (waiting for resources with higher priority)"}}})
    assert site.status_code == 201, site.text
    site_id = site.json()["id"]
    app = api.post("/apps/", json={"site_id": site_id, "name": APP_NAME, "serialized_class": "", "source_code": "",
                                   "parameters": {}, "transfers": {}, "description": ""}).json()["id"]
    made = api.post("/jobs/", json=[{"app_id": app, "workdir": f"runs/{i}/" + "w" * 60, "tags": {"experiment": "e" * 80}}
                                    for i in range(2)])
    assert made.status_code == 201, made.text
    job = made.json()[0]["id"]
    bj = api.post("/batch-jobs/", json={"site_id": site_id, "project": "datascience", "queue": QUEUE, "num_nodes": 2,
                                        "wall_time_min": 30, "job_mode": "mpi", "filter_tags": {"experiment": "e1"},
                                        "status_info": {SUBMITTED_BY_KEY: "queue_maintainer", "waiting": "Priority"}})
    assert bj.status_code == 201, bj.text
    for state, data in (("PREPROCESSED", {}), ("RUNNING", {"num_nodes": 1}),
                        ("RUN_ERROR", {"returncode": 3, "error": "Traceback (most recent call last):\n" + "x" * 200})):
        assert api.patch("/jobs/", json=[{"id": job, "state": state, "state_data": data}]).status_code == 200
    assert api.patch("/jobs/", json=[{"id": job, "batch_job_id": bj.json()["id"]}]).status_code == 200
    api.close()
    names = {"/dashboard/": ".card td.name",  # the queues
             "/dashboard/jobs": "#jobs-table tbody td:nth-child(2), #jobs-table tbody td:nth-child(3)",  # site, app
             # site, submitted by, queue, project
             "/dashboard/batch-jobs": ", ".join(f"#batch-jobs tbody td:nth-child({n})" for n in (2, 5, 6, 7))}
    page = _page(chromium, user["url"], user["username"], user["password"], token=user["token"])
    wrong: dict[tuple[int, str], Any] = {}  # (window width, page): what is wrong there
    for path in ("/dashboard/", "/dashboard/jobs", f"/dashboard/jobs/{job}", "/dashboard/batch-jobs",
                 "/dashboard/events", "/dashboard/plots"):
        page.goto(path)
        if path == "/dashboard/plots":
            page.wait_for_selector("#chart-utilization canvas")  # (the charts follow the window's width)
        for viewport in (SMALL_PHONE, PHONE, LAPTOP, VIEWPORT):  # one load, each width: the same session, the same page
            page.set_viewport_size(viewport)
            # two frames: the window's resize event has run (plots.js resizes its charts on it)
            page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
            layout = page.evaluate(LAYOUT_JS)
            lines = page.evaluate(LINES_JS, names[path]) if path in names else [1]
            if viewport in (SMALL_PHONE, PHONE) or (viewport == LAPTOP and path == "/dashboard/batch-jobs"):
                layout.pop("boxes")  # a table wider than the window scrolls in its box; at 1280 px none does
            if (layout["overflow"] > 0 or layout.get("boxes") or layout["outside"] or layout["broken"]
                    or layout["unreachable"] or not lines or set(lines) != {1}):
                wrong[viewport["width"], path] = {**layout, "name lines": lines}
    assert not wrong, "\n".join(f"{width} px {path}: {what}" for (width, path), what in wrong.items())
    assert page.errors == []


def test_a_waiting_job_shows_its_deleted_and_failed_parents(chromium: Any, user: dict) -> None:
    """Before: a child of a FAILED and a deleted parent listed the FAILED one alone, and did not say
    what it waited for (nor what to do); with only the deleted parent, "Parents: None.". Under the
    server's rule (only the parents that still exist must be JOB_FINISHED) it waits for the FAILED one
    only; the deleted one is listed as such, not waited for."""
    campaign = make_campaign(user["url"], user["token"], n_jobs=1, name=f"dag-{uuid.uuid4().hex[:6]}")
    api = httpx.Client(base_url=user["url"], headers={"Authorization": f"Bearer {user['token']}"}, timeout=30)
    gone = api.post("/jobs/", json=[{"app_id": campaign["app"]["id"], "workdir": "gone"}]).json()[0]["id"]
    made = api.post("/jobs/", json=[{"app_id": campaign["app"]["id"], "workdir": LONG_WORKDIR,
                                     "parent_ids": [campaign["failed"], gone]}])
    assert made.status_code == 201, made.text
    assert api.delete(f"/jobs/{gone}").status_code == 204
    child = made.json()[0]["id"]
    page = _page(chromium, user["url"], user["username"], user["password"])
    page.goto(f"/dashboard/jobs/{child}")
    parents = page.inner_text("main").split("Parents")[1].split("Children")[0]
    assert f"{campaign['failed']} run/0 FAILED" in parents and f"{gone} deleted" in parents
    assert f"Waiting for: {campaign['failed']} (FAILED)\n" in parents  # the FAILED one only
    assert f"A deleted parent is not waited for ({gone})" in parents and "never finishes" not in parents
    assert f"balsam job modify -i {campaign['failed']} -s RESTART_READY" in parents
    assert f"balsam job modify -i {child} -s READY" in parents
    assert _overflow(page) <= 2, f"the page is {_overflow(page)} px wider than the window"
    assert page.errors == []
    api.close()


def test_times_show_their_zone_and_hover_shows_utc_once(chromium: Any, user: dict) -> None:
    """Before: a local time without its zone, and a hover of "... UTC (UTC)" (or "2 min ago (UTC)")."""
    campaign = make_campaign(user["url"], user["token"], n_jobs=2, name=f"tz-{uuid.uuid4().hex[:6]}")
    page = _page(chromium, user["url"], user["username"], user["password"], timezone_id="America/Chicago", locale="en-US")
    page.goto(f"/dashboard/jobs/{campaign['failed']}")
    times = page.evaluate("() => Array.from(document.querySelectorAll('main time[datetime]')).map(el =>"
                          " [el.getAttribute('datetime'), el.textContent, el.title])")
    assert len(times) >= 5  # last update and each event
    for iso, text, title in times:
        expected = page.evaluate("iso => new Date(iso).toLocaleString(undefined, {timeZoneName: 'short'})", iso)
        assert text == expected and re.search(r"\bC[DS]T$", text), (iso, text)
        assert title == page.evaluate("iso => new Date(iso).toISOString().replace(/\\.\\d{3}Z$/, 'Z')", iso), (iso, title)
        assert title.count("UTC") + title.count("Z") == 1 and "(UTC)" not in title
    # a relative time ("agent last heard 3 s ago") keeps its words; its hover is the UTC time, once
    page.goto("/dashboard/")
    heard = page.locator("main time[datetime]").first
    assert re.search(r"ago|now|never", heard.inner_text())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", heard.get_attribute("title"))
    assert page.errors == []


def test_an_empty_plots_page_says_there_is_no_data(chromium: Any, user: dict, register: Any) -> None:
    """Before: "First / last finished: /" and two blank charts for a user with no data yet."""
    page = _page(chromium, user["url"], user["username"], user["password"])
    page.goto("/dashboard/plots")
    page.wait_for_selector("#chart-throughput canvas")
    page.wait_for_selector("#plot-status:has-text('jobs finished')")
    assert page.inner_text("#summary-first-last") == "—"
    for chart in ("throughput", "utilization"):
        note = page.locator(f"#empty-{chart}")
        assert note.is_visible() and note.inner_text() == "No data yet"
    # with data, the figures and no note
    username, password, _id, token, _ = register(user["url"])
    make_campaign(user["url"], token, n_jobs=2, finished=True, name=f"plots-{uuid.uuid4().hex[:6]}")
    other = _page(chromium, user["url"], username, password)
    other.goto("/dashboard/plots")
    other.wait_for_selector("#plot-status:has-text('1 jobs finished')")
    assert "—" not in other.inner_text("#summary-first-last") and " / " in other.inner_text("#summary-first-last")
    assert not other.locator("#empty-throughput").is_visible() and not other.locator("#empty-utilization").is_visible()
    assert page.errors == [] and other.errors == []


def test_live_refresh_waits_ten_times_a_slow_page(chromium: Any, user: dict) -> None:
    """Before: a ?count=all page (a scan of every job) was reloaded every 5 s however long it took.

    The browser's clock is Playwright's fake one and the refresh's fetch answers when the test says
    (a stand-in for a slow server): the test moves time and reads when each refresh was asked for;
    nothing waits on real time."""
    make_campaign(user["url"], user["token"], n_jobs=2, name=f"live-{uuid.uuid4().hex[:6]}")
    page = _page(chromium, user["url"], user["username"], user["password"])
    page.context.add_init_script("""
        window.__calls = [];
        window.fetch = function (url) {
          return new Promise(function (resolve) { window.__calls.push({ url: String(url), at: Date.now(), resolve: resolve }); });
        };""")
    page.clock.install()
    page.clock.pause_at(dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=1))
    page.goto("/dashboard/jobs?count=all")
    page.wait_for_selector("#count-total")

    def asked() -> list[int]:
        """When (fake ms) each refresh was asked for."""
        return page.evaluate("() => window.__calls.map(c => c.at)")

    def answer() -> int:
        """The pending refresh gets this page as its answer; returns when (fake ms)."""
        return page.evaluate("""async () => {
            const refreshed = new Promise(r => document.addEventListener('balsam:refreshed', r, { once: true }));
            const call = window.__calls[window.__calls.length - 1];
            call.resolve(new Response(document.documentElement.outerHTML, { status: 200, headers: { 'Content-Type': 'text/html' } }));
            await refreshed;
            // one task later: the refresh's promise chain (which sets the next timer) has run
            await new Promise(r => { const c = new MessageChannel(); c.port1.onmessage = r; c.port2.postMessage(0); });
            return Date.now();
        }""")

    page.clock.run_for(5_000)
    assert len(asked()) == 1  # 5 s after the page loaded
    page.clock.run_for(100)  # a fast answer (0.1 s): the next refresh 5 s after it
    answered = answer()
    assert answered - asked()[0] == 100
    page.clock.run_for(6_000)
    assert len(asked()) == 2 and asked()[1] - answered == 5_000
    page.clock.run_for(2_000)  # a slow answer: 1 s past the call above, then 2 s
    answered = answer()
    took = answered - asked()[1]
    assert took == 3_000
    page.clock.run_for(29_000)
    assert len(asked()) == 2, "refreshed again before 10 x the last answer's time"
    page.clock.run_for(2_000)
    assert len(asked()) == 3 and asked()[2] - answered == 10 * took
    assert page.errors == []
