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

from dashboard_helpers import make_campaign  # noqa: E402
from test_dashboard_layout_browser import _overflow, _page, chromium  # noqa: E402,F401  (the browser fixture)


def test_the_batch_jobs_table_fits_the_window(chromium: Any, live_server: str, register: Any) -> None:
    """(A guard for the column added with submitted_by: it made this page 41 px too wide.)"""
    username, password, _user_id, token, _ = register(live_server)
    campaign = make_campaign(live_server, token, n_jobs=1, name=f"bjwide-{uuid.uuid4().hex[:6]}")
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
    page = _page(chromium, live_server, username, password)
    page.goto("/dashboard/batch-jobs")
    assert page.locator("#batch-jobs td.submitted-by").all_inner_texts() == ["user", "elastic_queue", "queue_maintainer"]
    assert _overflow(page) <= 0
    assert page.errors == []
