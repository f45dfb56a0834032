"""A job with thousands of parents (a campaign's reduction step) has a job page of bounded size: the
Parents list and the "Waiting for" line show the first PARENTS_SHOWN parents and say how many more
there are, as the Children list stops at 200.

Before: every parent was rendered, twice for a waiting job (the list and the "Waiting for" line):
a job with 20,000 parents had a 2.7 MB page that took 0.4 s to build (100,000 parents: some
14 MB), on every load of the page."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from dashboard_helpers import logged_in_client, make_campaign, text_of  # noqa: E402

PARENTS = 260


def test_a_fan_in_job_page_lists_a_bounded_number_of_parents(live_server: str, register: Any) -> None:
    username, password, _, token, _ = register(live_server)
    campaign = make_campaign(live_server, token, n_jobs=1)
    api = httpx.Client(base_url=live_server, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    made = api.post("/jobs/", json=[{"app_id": campaign["app"]["id"], "workdir": f"sim/{i}"} for i in range(PARENTS)])
    assert made.status_code == 201, made.text
    parent_ids = sorted(j["id"] for j in made.json())
    child = api.post("/jobs/", json=[{"app_id": campaign["app"]["id"], "workdir": "reduce", "parent_ids": parent_ids}])
    assert child.status_code == 201, child.text
    assert child.json()[0]["state"] == "AWAITING_PARENTS"
    api.close()
    client = logged_in_client(live_server, username, password)
    page = client.get(f"/dashboard/jobs/{child.json()[0]['id']}")
    assert page.status_code == 200, page.text
    listed = re.search(r'<ul id="parents">(.*?)</ul>', page.text, re.S)
    assert listed, page.text[:2000]
    shown = [int(i) for i in re.findall(r'<li><a href="[^"]*/jobs/(\d+)"', listed.group(1))]
    assert shown == parent_ids[:200]  # the first ones, in id order
    more = re.search(r'id="more-parents"[^>]*>(.*?)</p>', page.text, re.S)
    assert more and f"{PARENTS - 200} more" in text_of(more.group(1)), page.text[-3000:]
    waiting = re.search(r'id="waiting-for"[^>]*>(.*?)</p>', page.text, re.S)
    assert waiting, page.text[-3000:]
    waiting_text = text_of(waiting.group(1))
    assert f"{parent_ids[0]} (STAGED_IN)" in waiting_text and f"{parent_ids[-1]} (" not in waiting_text
    assert f"{PARENTS - 200} more" in waiting_text
    client.close()
