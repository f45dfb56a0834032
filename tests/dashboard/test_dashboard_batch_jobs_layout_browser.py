"""The BatchJobs table in a real headless Chromium (as test_dashboard_layout_browser.py): with its
"Submitted by" column, long filter tags and a long status_info, it still fits a 1280 px window."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from balsam.models import SUBMITTED_BY_KEY  # noqa: E402

from dashboard_helpers import LINES_JS, make_campaign  # noqa: E402
from test_dashboard_layout_browser import PHONE, QUEUE, VIEWPORT, _overflow, _page, chromium  # noqa: E402,F401  (the browser fixture)


def test_the_batch_jobs_table_fits_the_window(chromium: Any, live_server: str, register: Any) -> None:
    """(A guard for the column added with submitted_by: it made this page 41 px too wide.) Beside
    names of 46 characters and a long status, a BatchJob's ordinary names (a site's 20 characters,
    a queue, a project, who submitted it) keep their one line at 1280 px and in a phone's 390 px
    (where the table scrolls in its own box), and the page is never wider than the window; with
    ordinary names only, the table fits 1280 px without scrolling. Before: at 1280 px those names
    broke inside a word (the site's on 6 lines, the queue's on 3, the project's and
    "queue_maintainer" on 2), and at 390 px the page was 1,215 px wide."""
    username, password, _user_id, token, _ = register(live_server)
    campaign = make_campaign(live_server, token, n_jobs=1, name=f"bjwide-site-{uuid.uuid4().hex[:8]}")  # 20 characters
    api = httpx.Client(base_url=live_server, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    for who in ("queue_maintainer", "elastic_queue", None):
        info = {"waiting": "w" * 300, "path": "/very/long/" + "p" * 200}
        if who:
            info[SUBMITTED_BY_KEY] = who
        made = api.post("/batch-jobs/", json={"site_id": campaign["site"]["id"], "project": "project-" + "x" * 40,
                                              "queue": "queue-" + "q" * 40, "num_nodes": 128, "wall_time_min": 1440,
                                              "job_mode": "mpi", "filter_tags": {"experiment": "e" * 120},
                                              "status_info": info})
        assert made.status_code == 201, made.text
    ordinary = api.post("/batch-jobs/", json={"site_id": campaign["site"]["id"], "project": "datascience", "queue": QUEUE,
                                              "num_nodes": 8, "wall_time_min": 60, "job_mode": "mpi",
                                              "status_info": {SUBMITTED_BY_KEY: "queue_maintainer"}})
    assert ordinary.status_code == 201, ordinary.text
    row = f"#bj-{ordinary.json()['id']}"
    page = _page(chromium, live_server, username, password, token=token)
    page.goto("/dashboard/batch-jobs")
    assert page.locator("#batch-jobs td.submitted-by").all_inner_texts() == ["queue_maintainer", "user", "elastic_queue",
                                                                             "queue_maintainer"]
    names = ", ".join(f"{row} td:nth-child({n})" for n in (2, 5, 6, 7))  # site, submitted by, queue, project
    assert page.locator(names).all_inner_texts() == [campaign["site"]["name"], "queue_maintainer", QUEUE, "datascience"]
    for viewport in (VIEWPORT, PHONE):
        page.set_viewport_size(viewport)
        assert _overflow(page) <= 0, viewport
        assert page.evaluate(LINES_JS, names) == [1, 1, 1, 1], viewport
        # the queues of 46 characters wrap (within the window)
        assert set(page.evaluate(LINES_JS, f"#batch-jobs tbody tr:not({row}) td:nth-child(6)")) - {1}, viewport
    # With ordinary names only, the table fits 1280 px whole: no scrolling in its box either.
    page.set_viewport_size(VIEWPORT)
    page.goto(f"/dashboard/batch-jobs?id={ordinary.json()['id']}")
    assert page.evaluate(LINES_JS, names) == [1, 1, 1, 1]
    assert page.evaluate("() => { const box = document.querySelector('#batch-jobs').parentElement;"
                         " return box.scrollWidth - box.clientWidth; }") <= 0
    assert page.errors == []
