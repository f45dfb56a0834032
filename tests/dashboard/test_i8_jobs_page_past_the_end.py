"""A Jobs page past the end of the list (an old "Older"/"Newer" link, a typed ``before``) says so
and leads back to the newest, as the BatchJobs page says "past the last page"; "No matching jobs"
is for filters that match nothing.

Before: ``/dashboard/jobs?before=1`` with 120 jobs said "120 matching jobs" and, right below it,
"No matching jobs."."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from dashboard_helpers import logged_in_client, make_campaign, text_of  # noqa: E402


def test_a_page_past_the_end_is_not_called_empty(live_server: str, register: Any) -> None:
    username, password, _, token, _ = register(live_server)
    campaign = make_campaign(live_server, token, n_jobs=3)
    ids = sorted(j["id"] for j in campaign["jobs"])
    site = campaign["site"]["id"]
    client = logged_in_client(live_server, username, password)
    for query in (f"site_id={site}&before={ids[0]}", f"site_id={site}&after={ids[-1]}"):
        page = client.get(f"/dashboard/jobs?{query}")
        assert page.status_code == 200, page.text
        text = text_of(page.text)
        assert "3 matching jobs" in text and "No matching jobs" not in text, text
        note = re.search(r'id="past-the-end"[^>]*>(.*?)</p>', page.text, re.S)
        assert note and "past the end" in text_of(note.group(1)), text
        assert re.search(r'<a href="[^"]*/dashboard/jobs\?site_id=\d+">« Newest</a>', page.text), text
    nothing = client.get(f"/dashboard/jobs?site_id={site}&tags=absent:x")
    assert nothing.status_code == 200 and "No matching jobs." in text_of(nothing.text)
    assert 'id="past-the-end"' not in nothing.text
    client.close()
