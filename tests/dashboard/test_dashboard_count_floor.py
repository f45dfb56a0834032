"""The jobs page's "at least N matching jobs" when the count looked at the newest jobs only
(filters the counters cannot answer, e.g. workdir): N is never below what the page itself lists.

Before: with more than COUNT_SCAN_WINDOW jobs and a filter only older jobs match, the page read
"at least 0 matching jobs" above a full table of matching rows. The window is made small here
(monkeypatch) instead of creating 10^4 jobs, so the server runs in this process: a real uvicorn
in a thread, on SQLite and on PostgreSQL."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dashboard_helpers import logged_in_client, text_of  # noqa: E402

WINDOW = 20
OLD, NEW = 30, 30  # jobs "old/<i>" first, then "new/<i>": the window sees only new ones


@pytest.fixture
def in_process_server(database_url: str, monkeypatch: pytest.MonkeyPatch, register: Any,
                      serve_in_process: Any) -> dict[str, Any]:
    from balsam.server import jobs_logic
    from balsam.server.app import create_app
    from balsam.server.settings import ServerSettings

    monkeypatch.setattr(jobs_logic, "COUNT_SCAN_WINDOW", WINDOW)
    url = serve_in_process(create_app(
        settings=ServerSettings(database_url=database_url, registration="open",
                                secret_key="count-floor-secret-0123456789-abcdefghijklmnop"),
        create_tables_now=True))
    username, password, _user_id, token, _ = register(url)
    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    site = api.post("/sites/", json={"name": "floor", "path": "/tmp/floor"}).json()
    app_row = api.post("/apps/", json={"site_id": site["id"], "name": "Sim", "serialized_class": "", "source_code": "",
                                       "parameters": {}, "transfers": {}, "description": ""}).json()
    for prefix, n in (("old", OLD), ("new", NEW)):
        made = api.post("/jobs/", json=[{"app_id": app_row["id"], "workdir": f"{prefix}/{i}", "tags": {"k": "v"}}
                                        for i in range(n)])
        assert made.status_code == 201, made.text
    return {"client": logged_in_client(url, username, password)}


def _heading(client: httpx.Client, query: str) -> tuple[str, int, str]:
    page = client.get(f"/dashboard/jobs?{query}")
    assert page.status_code == 200, page.text
    rows = len(re.findall(r'href="/dashboard/jobs/\d+"', page.text))
    match = re.search(r"<h2>([^<]*matching jobs?)</h2>", page.text)
    assert match, text_of(page.text)
    return " ".join(match.group(1).split()), rows, page.text


def test_the_lower_bound_is_never_below_the_rows_shown(in_process_server: dict) -> None:
    client = in_process_server["client"]
    # Only old jobs match: the window (the newest 20, all "new") counts none of them.
    heading, rows, html = _heading(client, "workdir__contains=old")
    assert rows == OLD
    assert heading == f"at least {OLD} matching jobs"
    assert 'id="counts-partial"' in html and "count=all" in html  # the way to an exact count stays
    # A full page with more beyond: at least one more than the page lists.
    heading, rows, html = _heading(client, "workdir__contains=old&limit=25")
    assert rows == 25 and heading == "at least 26 matching jobs"
    assert 'rel="next"' in html
    # The window's own count, when it is higher than the page, stays the bound.
    heading, rows, _ = _heading(client, "workdir__contains=new&limit=25")
    assert rows == 25 and heading == "at least 26 matching jobs"
    heading, rows, _ = _heading(client, "workdir__contains=/&limit=5")
    assert rows == 5 and heading == f"at least {WINDOW} matching jobs"
    # Counting all: exact, no "at least".
    heading, rows, html = _heading(client, "workdir__contains=old&count=all")
    assert heading == f"{OLD} matching jobs" and 'id="counts-partial"' not in html
    # Nothing matches: still honest (0, exact only when counted all).
    heading, rows, _ = _heading(client, "workdir__contains=nowhere")
    assert rows == 0 and heading == "at least 0 matching jobs"
