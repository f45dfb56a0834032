"""The live refresh of a page backs off while the server fails to answer, in a real headless
Chromium (Playwright, as test_dashboard_live_browser.py) against a real uvicorn server, the page's
timers driven by Playwright's clock (no waiting on real time).

Before: a failed refresh was retried every 5 s for as long as it failed (a server answering 503,
or not answering at all, was asked 12 times a minute by every open tab). Now each failure after the
first doubles the wait (5 s, 10 s, 20 s, 40 s, then every 60 s) and the first answer goes back to
every 5 s."""

from __future__ import annotations

import re
import sys
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from dashboard_helpers import make_campaign  # noqa: E402
from test_dashboard_layout_browser import _page, chromium  # noqa: E402,F401  (the browser fixture)

WAIT_MS = 60_000
#: Counts the page's refresh requests as they are made (synchronously, inside the timer's callback).
COUNT_FETCHES = """
window.__refreshes = 0;
const realFetch = window.fetch;
window.fetch = function () { window.__refreshes += 1; return realFetch.apply(this, arguments); };
window.__refreshed = 0;
document.addEventListener("balsam:refreshed", function () { window.__refreshed += 1; });
"""


def test_failed_refreshes_back_off_and_an_answer_resets_them(chromium: Any, live_server: str, register: Any) -> None:
    username, password, _user_id, token, _ = register(live_server)
    make_campaign(live_server, token, n_jobs=2, name=f"backoff-{uuid.uuid4().hex[:6]}")
    page = _page(chromium, live_server, username, password)
    page.add_init_script(COUNT_FETCHES)
    page.clock.install()
    page.goto("/dashboard/jobs")
    page.wait_for_selector("#jobs-table")
    answers: list[int] = []
    down = {"on": True}

    def refresh(route: Any) -> None:
        if route.request.resource_type != "fetch":
            route.continue_()
        elif down["on"]:
            answers.append(503)
            route.fulfill(status=503, content_type="text/plain", body="overloaded")
        else:
            answers.append(200)
            route.continue_()

    page.route(re.compile(r".*/dashboard/jobs$"), refresh)

    def refreshes() -> int:
        return page.evaluate("window.__refreshes")

    def answered(advance_ms: int) -> None:
        """Advance the page's clock by advance_ms and wait until the page has handled the refresh
        this makes: a failure writes the stale note (cleared first), an answer fires
        balsam:refreshed; the next refresh's timer is set in the same task, before either is seen."""
        done = page.evaluate("document.getElementById('live-stale').textContent = ''; window.__refreshed")
        page.clock.run_for(advance_ms)
        if down["on"]:
            page.wait_for_selector("#live-stale:has-text('answered 503')", timeout=WAIT_MS)
        else:
            page.wait_for_function(f"() => window.__refreshed > {done}", timeout=WAIT_MS)

    answered(5_000)
    for failed, expected_wait in enumerate((5_000, 10_000, 20_000, 40_000, 60_000, 60_000), start=1):
        n = refreshes()
        page.clock.run_for(expected_wait - 1_000)
        made = refreshes() - n
        assert made == 0, f"{made} refreshes within {expected_wait - 1_000} ms of failure {failed}"
        answered(1_000)
    assert answers == [503] * 7
    down["on"] = False
    answered(60_000)
    assert answers[-1] == 200
    n = refreshes()
    answered(5_000)  # back to every 5 s
    assert refreshes() == n + 1 and answers == [503] * 7 + [200, 200]
    assert [e for e in page.errors if "503" not in e] == []
