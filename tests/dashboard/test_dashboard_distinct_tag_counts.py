"""A tag given twice is one filter on the dashboard, as in the API's listings (``tags=a:1&tags=a:1``
is one clause there: http.QueryParams.key_values): the Jobs page counts and lists as for the tag
given once, its limit of 100 tags counts distinct ones, and its Tags field and links carry each
tag once.

Before: the dashboard counted every repetition: ``tags=batch:1`` sent 101 times (one filter for
the API, which lists its jobs) was refused with "at most 100 tags, got 101" on the Jobs, Events
and Plots pages, and ``batch:1 batch:1`` typed in the Tags field came back doubled, in the field
and in every link of the page (count all, the states, the pager)."""

from __future__ import annotations

import html
import re
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from dashboard_helpers import text_of  # noqa: E402

REPEATS = 101  # one more than the limit of distinct tags (balsam.models.MAX_TAG_FILTERS)


def _client(url: str, token: str) -> httpx.Client:
    """A dashboard client logged in through a one-time login link (no password hash to check)."""
    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    path = api.post("/dashboard/login-link").json()["path"]
    api.close()
    client = httpx.Client(base_url=url, timeout=60)
    assert client.get(path, follow_redirects=True).url.path == "/dashboard/"
    return client


def _jobs_page(client: httpx.Client, query: list[tuple[str, str]]) -> tuple[str, str]:
    """The Jobs page's heading ("3 matching jobs") and its HTML."""
    page = client.get("/dashboard/jobs?" + urlencode(query))
    assert page.status_code == 200, re.findall(r'role="alert">([^<]*)<', page.text)
    match = re.search(r"<h2>([^<]*matching jobs?)</h2>", page.text)
    assert match, text_of(page.text)[:300]
    return " ".join(match.group(1).split()), page.text


def test_a_repeated_tag_is_one_filter(live_server: str, register: Any) -> None:
    _username, _password, _user_id, token, _ = register(live_server)
    api = httpx.Client(base_url=live_server, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    site = api.post("/sites/", json={"name": f"dup-{uuid.uuid4().hex[:6]}", "path": "/tmp/dup"}).json()["id"]
    app = api.post("/apps/", json={"site_id": site, "name": "Sim", "serialized_class": "", "source_code": "",
                                   "parameters": {}, "transfers": {}, "description": ""}).json()["id"]
    made = api.post("/jobs/", json=[{"app_id": app, "workdir": f"run/{i}", "tags": {"batch": str(i % 2)}} for i in range(4)]
                    + [{"app_id": app, "workdir": f"exp/{i}", "tags": {"batch": "1", "exp": "a"}} for i in range(2)])
    assert made.status_code == 201, made.text
    site = str(site)
    client = _client(live_server, token)
    once, once_html = _jobs_page(client, [("site_id", site), ("tags", "batch:1")])
    assert once == "4 matching jobs"  # run/1, run/3 and the two exp:a ones
    # The same tag REPEATS times (past the limit of 100 tags): one filter, the same exact count.
    repeated, repeated_html = _jobs_page(client, [("site_id", site)] + [("tags", "batch:1")] * REPEATS)
    assert repeated == once and 'id="counts-partial"' not in repeated_html
    assert re.findall(r'href="/dashboard/jobs/(\d+)"', repeated_html) == re.findall(r'href="/dashboard/jobs/(\d+)"', once_html)
    # Two distinct tags (counted by a scan, not the one-tag counters), each given several times:
    # the same as each given once.
    both, both_html = _jobs_page(client, [("site_id", site), ("tags", "batch:1 exp:a")])
    assert both == "2 matching jobs"
    both_repeated, both_repeated_html = _jobs_page(client, [("site_id", site), ("tags", "batch:1 exp:a, batch:1")]
                                                   + [("tags", "exp:a")] * REPEATS)
    assert both_repeated == both and 'id="counts-partial"' not in both_repeated_html
    # Typed twice in the field: shown once, and every link of the page carries it once.
    _, typed_html = _jobs_page(client, [("site_id", site), ("tags", "batch:1 batch:1")])
    assert re.search(r'<input name="tags" value="([^"]*)"', typed_html).group(1) == "batch:1"
    links = [html.unescape(h) for h in re.findall(r'href="(/dashboard/jobs\?[^"]*)"', typed_html)]
    assert links, "no filtered links on the page"
    for link in links:
        assert [v for k, v in parse_qsl(urlsplit(link).query) if k == "tags"] == ["batch:1"], link
    # The other pages with a tag filter take the repeated tag as the API does (its listing, one filter).
    assert api.get("/jobs/", params=[("tags", "batch:1")] * REPEATS).status_code == 200
    for path in ("/dashboard/events", "/dashboard/plots"):
        page = client.get(path + "?" + urlencode([("tags", "batch:1")] * REPEATS))
        assert page.status_code == 200 and 'role="alert"' not in page.text, (path, text_of(page.text)[:300])
    # 101 distinct tags are still refused, naming how many.
    page = client.get("/dashboard/jobs?" + urlencode([("tags", f"t{i}:1") for i in range(REPEATS)]))
    assert page.status_code == 422 and f"at most 100 tags, got {REPEATS}" in text_of(page.text)
    api.close()
    client.close()
