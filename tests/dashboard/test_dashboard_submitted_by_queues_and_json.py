"""Recent server features as the dashboard shows them (SQLite and PostgreSQL, real uvicorn): who
submitted a BatchJob (``status_info.submitted_by``, balsam.models.SUBMITTED_BY_KEY), a queue's
``min_nodes``, a job's ``data`` as the JSON it was inserted as (key order kept), and the link from a
job to its own BatchJob."""

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

from balsam.models import SUBMITTED_BY_KEY  # noqa: E402

from dashboard_helpers import logged_in_client, make_campaign, text_of  # noqa: E402


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def dash(request: pytest.FixtureRequest, register: Any) -> dict[str, Any]:
    url = request.getfixturevalue("live_server" if request.param == "sqlite" else "live_server_pg")
    username, password, _user_id, token, _ = register(url)
    campaign = make_campaign(url, token, n_jobs=2, name=f"new-{uuid.uuid4().hex[:6]}")
    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    return {"client": logged_in_client(url, username, password), "api": api, "campaign": campaign}


def _batch_job(api: httpx.Client, site_id: int, status_info: "dict | None" = None) -> int:
    body: dict[str, Any] = {"site_id": site_id, "project": "p", "queue": "prod", "num_nodes": 10, "wall_time_min": 30,
                            "job_mode": "mpi"}
    if status_info is not None:
        body["status_info"] = status_info
    made = api.post("/batch-jobs/", json=body)
    assert made.status_code == 201, made.text
    return made.json()["id"]


def _row(page_html: str, bj_id: int) -> str:
    match = re.search(rf'<tr id="bj-{bj_id}">(.*?)</tr>', page_html, re.S)
    assert match, f"no row of BatchJob {bj_id}"
    return html.unescape(text_of(match.group(1)))


def test_who_submitted_each_batch_job(dash: dict) -> None:
    """Before: no "Submitted by" column; a user's own BatchJob showed nothing at all, an agent's
    only as one more ``status_info`` line."""
    site_id = dash["campaign"]["site"]["id"]
    by_maintainer = _batch_job(dash["api"], site_id, {SUBMITTED_BY_KEY: "queue_maintainer"})
    by_elastic = _batch_job(dash["api"], site_id, {SUBMITTED_BY_KEY: "elastic_queue", "waiting": "for the backfill"})
    by_user = _batch_job(dash["api"], site_id)
    page = dash["client"].get("/dashboard/batch-jobs")
    assert page.status_code == 200, page.text
    header = html.unescape(text_of(re.search(r"<thead>(.*?)</thead>", page.text, re.S).group(1)))
    assert "Submitted by" in header
    cells = {bj: re.search(r'<td class="submitted-by"><span>([^<]*)</span></td>', re.search(rf'<tr id="bj-{bj}">(.*?)</tr>', page.text, re.S).group(1)).group(1)
             for bj in (by_maintainer, by_elastic, by_user)}
    assert cells == {by_maintainer: "queue_maintainer", by_elastic: "elastic_queue", by_user: "user"}
    # the other status_info keys stay in the Status column; submitted_by is not repeated there
    assert re.search(r"waiting\s*:\s*for the backfill", _row(page.text, by_elastic))
    assert SUBMITTED_BY_KEY not in _row(page.text, by_elastic)
    # the Sites page's active BatchJobs say it too
    sites = dash["client"].get("/dashboard/")
    assert sites.status_code == 200
    assert re.findall(r'<td class="submitted-by"><span>([^<]*)</span></td>', sites.text)[:3] == ["user", "elastic_queue", "queue_maintainer"]


def test_a_queue_minimum_is_shown(dash: dict) -> None:
    """Before: the Sites page showed no queue limits, so nothing said why the elastic queue asked
    for 10 nodes (a queue's min_nodes)."""
    site_id = dash["campaign"]["site"]["id"]
    queues = {"prod": {"max_nodes": 496, "max_walltime": 1440, "max_queued_jobs": 10, "min_nodes": 10},
              "debug": {"max_nodes": 2, "max_walltime": 60, "max_queued_jobs": 1}}
    assert dash["api"].put(f"/sites/{site_id}", json={"allowed_queues": queues}).status_code == 200
    page = dash["client"].get("/dashboard/")
    card = re.search(rf'<section class="card" id="site-{site_id}">(.*?)</section>', page.text, re.S).group(1)
    rows = {name: html.unescape(text_of(row)) for name, row in re.findall(r'<tr data-queue="([^"]+)">(.*?)</tr>', card, re.S)}
    assert rows == {"prod": "prod 10–496 1440 10", "debug": "debug 1–2 60 1"}


def test_job_data_reads_as_the_json_it_was_inserted_as(dash: dict) -> None:
    """Before: Python's repr (``{'b': [1, True, None]}``), not the JSON that was inserted."""
    data = {"zeta": {"b": [1, True, None], "a": "x"}, "alpha": False, "mid": 2.5, "text": "plain"}
    made = dash["api"].post("/jobs/", json=[{"app_id": dash["campaign"]["app"]["id"], "workdir": "data/1", "data": data}])
    assert made.status_code == 201, made.text
    page = dash["client"].get(f"/dashboard/jobs/{made.json()[0]['id']}")
    assert page.status_code == 200, page.text
    cell = re.search(r'<th scope="row">data</th><td class="wrap">(.*?)</td>', page.text, re.S).group(1)
    lines = [html.unescape(text_of(d)) for d in re.findall(r"<div>(.*?)</div>", cell, re.S)]
    assert lines == ['zeta: {"b": [1, true, null], "a": "x"}', "alpha: false", "mid: 2.5", "text: plain"]


def test_a_job_links_to_its_batch_job(dash: dict) -> None:
    """Before: "ran in BatchJob N" led to the list of jobs of that BatchJob; the BatchJob itself
    (its state, who submitted it, its status) could only be found by paging the BatchJobs list."""
    site_id = dash["campaign"]["site"]["id"]
    first = _batch_job(dash["api"], site_id, {SUBMITTED_BY_KEY: "elastic_queue"})
    for _ in range(3):  # newer BatchJobs in the list
        _batch_job(dash["api"], site_id)
    job_id = dash["campaign"]["jobs"][1]["id"]
    patched = dash["api"].patch("/jobs/", json=[{"id": job_id, "batch_job_id": first}])
    assert patched.status_code == 200, patched.text
    page = dash["client"].get(f"/dashboard/jobs/{job_id}")
    link = html.unescape(re.search(r'<a id="batch-job-link" href="([^"]+)">BatchJob (\d+)</a>', page.text).group(1))
    assert link == f"/dashboard/batch-jobs?id={first}"
    target = dash["client"].get(link)
    assert target.status_code == 200, target.text
    assert re.findall(r'<tr id="bj-(\d+)">', target.text) == [str(first)]
    assert "elastic_queue" in _row(target.text, first)
    assert 'name="id"' in target.text  # the filter is in the form, to clear or change it


def test_a_batch_jobs_page_past_the_last_leads_back(dash: dict) -> None:
    """Before: "No matching BatchJobs" under "3 BatchJobs", and "Newer" led to the page before the
    one asked for (page 99999, as empty)."""
    for _ in range(3):
        _batch_job(dash["api"], dash["campaign"]["site"]["id"])
    page = dash["client"].get("/dashboard/batch-jobs?page=100000")
    assert page.status_code == 200, page.text
    text = html.unescape(text_of(page.text))
    assert "Page 100,000 is past the last page (1)" in text and "No matching BatchJobs" not in text, text
    newer = html.unescape(re.search(r'<a href="([^"]+)" rel="prev">', page.text).group(1))
    assert newer == "/dashboard/batch-jobs?page=1"
    assert len(re.findall(r'<tr id="bj-', dash["client"].get(newer).text)) == 3
