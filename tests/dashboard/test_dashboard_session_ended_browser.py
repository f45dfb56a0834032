"""Open tabs whose session ends (revoked here, as logging out in another browser, a new password or
``balsam server revoke`` do) in a real headless Chromium against a real uvicorn server: the live
refresh takes each tab to the login page, which says the session ended, and logging in again returns
to the page the tab showed."""

from __future__ import annotations

import re
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from dashboard_helpers import make_campaign  # noqa: E402
from test_dashboard_layout_browser import _page, chromium  # noqa: E402,F401  (the browser fixture)

#: Waits for what the page shows (bounded so that a broken page fails instead of hanging), not timings.
WAIT_MS = 30_000


def test_open_tabs_say_the_session_ended(chromium: Any, live_server: str, register: Any) -> None:
    """Before: both tabs went to a bare login form, nothing saying why (the Jobs tab by its live
    refresh, the Plots tab by its data request's 401), and logging in from the first one failed."""
    username, password, _user_id, token, _ = register(live_server)
    campaign = make_campaign(live_server, token, n_jobs=2, finished=True, name=f"ended-{uuid.uuid4().hex[:6]}")
    site_id = campaign["site"]["id"]
    jobs = _page(chromium, live_server, username, password)
    jobs.goto(f"/dashboard/jobs?site_id={site_id}")
    plots = jobs.context.new_page()  # the same session, in a second tab
    plots.goto(f"/dashboard/plots?site_id={site_id}")
    plots.wait_for_selector("#plot-status:has-text('jobs finished')", timeout=WAIT_MS)
    api = httpx.Client(base_url=live_server, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    sessions = api.get("/auth/credentials", params={"kind": "dashboard"}).json()["results"]
    assert sessions
    for cred in sessions:
        assert api.delete(f"/auth/credentials/{cred['id']}").status_code in (200, 204)
    for tab in (jobs, plots):
        tab.wait_for_url(re.compile(r".*/dashboard/login\?.*"), timeout=WAIT_MS)
        notice = tab.wait_for_selector("#login-notice", timeout=WAIT_MS).inner_text()
        assert "Your dashboard session has ended" in notice and "log in again" in notice, notice
    # Logging in again from the first tab's form returns to the page it showed. Before: "The login
    # form expired" (the second tab's form had replaced the first one's nonce cookie).
    jobs.fill("input[name=username]", username)
    jobs.fill("input[name=password]", password)
    jobs.click("button[type=submit]")
    jobs.wait_for_url(re.compile(rf".*/dashboard/jobs\?site_id={site_id}$"), timeout=WAIT_MS)
    assert jobs.locator("#jobs-table").is_visible()
    # the second tab's form, sent after that login, goes on to its page too
    plots.fill("input[name=username]", username)
    plots.fill("input[name=password]", password)
    plots.click("button[type=submit]")
    plots.wait_for_url(re.compile(rf".*/dashboard/plots\?site_id={site_id}$"), timeout=WAIT_MS)
    plots.wait_for_selector("#plot-status:has-text('jobs finished')", timeout=WAIT_MS)
    assert jobs.errors == []
