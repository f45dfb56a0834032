"""The dashboard's EventLog page (SQLite and PostgreSQL, real uvicorn): the user's events newest
first, paged by the event id (the API's ``id__gt`` for "Newer") past the first page without a gap
or an overlap, the API's filters (bad dates and numbers refused with the API's message), event data
escaped, another user's events invisible, and the links to it from a job and a BatchJob."""

from __future__ import annotations

import html
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dashboard_helpers import logged_in_client, make_campaign, text_of  # noqa: E402

XSS = '<script>alert("ev")</script><img src=x onerror=alert(1)>'


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def dash(request: pytest.FixtureRequest, register: Any) -> dict[str, Any]:
    url = request.getfixturevalue("live_server" if request.param == "sqlite" else "live_server_pg")
    username, password, _user_id, token, _ = register(url)
    campaign = make_campaign(url, token, n_jobs=3, name=f"ev-{uuid.uuid4().hex[:6]}")
    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    made = api.post("/jobs/", json=[{"app_id": campaign["app"]["id"], "workdir": f"more/{i}"} for i in range(230)])
    assert made.status_code == 201, made.text
    return {"url": url, "client": logged_in_client(url, username, password), "api": api, "campaign": campaign,
            "register": register}


def _event_ids(page_html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<tr class="state-[A-Z_]+" id="event-(\d+)">', page_html)]


def _link(page_html: str, rel: str) -> str:
    match = re.search(rf'<a href="([^"]+)" rel="{rel}">', page_html)
    return html.unescape(match.group(1)) if match else ""


def _api_event_ids(api: httpx.Client, **params: Any) -> list[int]:
    answer = api.get("/events/", params={"limit": 1000, **params})
    assert answer.status_code == 200, answer.text
    return sorted((e["id"] for e in answer.json()["results"]), reverse=True)


def test_every_event_once_across_the_pages(dash: dict) -> None:
    """Before: no EventLog page (404): the events of a campaign were only in each job's history."""
    client = dash["client"]
    expected = _api_event_ids(dash["api"])
    assert len(expected) > 200
    page = client.get("/dashboard/events")
    assert page.status_code == 200, page.text
    seen, pages = _event_ids(page.text), [page.text]
    assert len(seen) == 100 and seen == sorted(seen, reverse=True)
    while _link(pages[-1], "next"):
        pages.append(client.get(_link(pages[-1], "next")).text)
        seen += _event_ids(pages[-1])
    assert seen == expected  # newest first, none twice, none left out
    # "Newer" from the second page is the first page again (the API's id__gt)
    second = pages[1]
    newer = _link(second, "prev")
    assert "after=" in newer
    assert _event_ids(client.get(newer).text) == _event_ids(pages[0])


def test_filters_are_the_apis_and_data_is_escaped(dash: dict) -> None:
    client, api = dash["client"], dash["api"]
    job_id = dash["campaign"]["jobs"][2]["id"]
    for state, data in (("PREPROCESSED", {}), ("RUNNING", {}), ("RUN_ERROR", {"error": XSS, "returncode": 2}),
                        ("FAILED", {"message": XSS})):
        assert api.patch("/jobs/", json=[{"id": job_id, "state": state, "state_data": data}]).status_code == 200
    page = client.get(f"/dashboard/events?job_id={job_id}")
    assert page.status_code == 200, page.text
    assert _event_ids(page.text) == _api_event_ids(api, job_id=job_id)
    assert XSS not in page.text and "<script>alert" not in page.text and "<img src=x" not in page.text
    assert html.unescape(text_of(page.text)).count('alert("ev")') == 2  # shown, as text, in both events
    failed = client.get(f"/dashboard/events?to_state=FAILED&site_id={dash['campaign']['site']['id']}")
    assert _event_ids(failed.text) == _api_event_ids(api, to_state="FAILED", site_id=dash["campaign"]["site"]["id"])
    assert len(_event_ids(failed.text)) == 2
    assert _event_ids(client.get("/dashboard/events?timestamp_before=2000-01-01T00:00:00").text) == []


@pytest.mark.parametrize("query, message", [
    ("timestamp_after=yesterday", "timestamp_after: expected an ISO-8601 datetime, got 'yesterday'"),
    ("timestamp_before=2024-13-45", "timestamp_before: expected an ISO-8601 datetime"),
    ("job_id=99999999999999999999", "job_id: integer out of range"),
    ("to_state=BOGUS", "to_state: expected one of"),
    ("before=abc", "before: expected an integer, got 'abc'"),
    ("tags=nocolon", "tags: expected KEY:VALUE, got 'nocolon'"),
])
def test_bad_filters_are_refused_with_the_apis_words(dash: dict, query: str, message: str) -> None:
    page = dash["client"].get(f"/dashboard/events?{query}")
    text = html.unescape(text_of(page.text))
    assert page.status_code == 422, text
    assert message in text, text
    assert 'action="/dashboard/events"' in page.text and "Traceback" not in page.text


def test_another_users_events_are_invisible(dash: dict) -> None:
    username, password, *_ = dash["register"](dash["url"])
    other = logged_in_client(dash["url"], username, password)
    job_id = dash["campaign"]["failed"]
    for path in ("/dashboard/events", f"/dashboard/events?job_id={job_id}",
                 f"/dashboard/events?site_id={dash['campaign']['site']['id']}"):
        page = other.get(path)
        assert page.status_code == 200 and _event_ids(page.text) == [], path
        assert "No matching events" in text_of(page.text)


def test_a_job_and_a_batch_job_link_to_their_events(dash: dict) -> None:
    client, api = dash["client"], dash["api"]
    job_id = dash["campaign"]["failed"]
    page = client.get(f"/dashboard/jobs/{job_id}")
    link = html.unescape(re.search(r'<a id="job-events-link" href="([^"]+)">', page.text).group(1))
    assert link == f"/dashboard/events?job_id={job_id}"
    assert _event_ids(client.get(link).text) == _api_event_ids(api, job_id=job_id)
    bj = api.post("/batch-jobs/", json={"site_id": dash["campaign"]["site"]["id"], "project": "p", "queue": "q", "num_nodes": 1,
                                        "wall_time_min": 5, "job_mode": "mpi"}).json()["id"]
    ran = dash["campaign"]["jobs"][1]["id"]
    assert api.patch("/jobs/", json=[{"id": ran, "batch_job_id": bj, "state": "PREPROCESSED"}]).status_code == 200
    bjs = client.get(f"/dashboard/batch-jobs?id={bj}")
    link = html.unescape(re.search(r'<a class="bj-events" href="([^"]+)">', bjs.text).group(1))
    assert link == f"/dashboard/events?batch_job_id={bj}"
    assert _event_ids(client.get(link).text) == _api_event_ids(api, batch_job_id=bj)
