"""Listing counts from the trigger-kept counters (migrations 0003 and 0005): ``GET /jobs/`` with
filters on sites, app, states and one tag answers its ``count`` from the counters, and the answer
equals a count over the rows after every kind of change (create, bulk and filtered state changes, a
tag change, deletes, cascades), on SQLite and PostgreSQL, before and after the deltas are folded."""

from __future__ import annotations

import itertools
from typing import Any, Iterator

import pytest
from server_testlib import create_site_and_app, logged_in_test_client


SECRET = "tag-counts-test-secret-0123456789-abcdefghijklmnop"


@pytest.fixture
def api(database_url: str) -> Iterator[dict[str, Any]]:
    with logged_in_test_client(database_url, SECRET) as (client, app):
        yield {"client": client, "engine": app.state.engine}


def _check_listing_counts(api: dict, sites: list[int], apps: list[int], fold: bool = False) -> None:
    site_of = dict(zip(apps, sites))
    """Every counter-answered listing count equals the count of the listed rows themselves."""
    from balsam.server.job_counts import fold_deltas

    client = api["client"]
    if fold:
        with api["engine"].begin() as conn:
            fold_deltas(conn)
    everything = client.get("/jobs/", params={"limit": 10000}).json()["results"]
    combos = itertools.product([None, *sites], [None, *apps], [None, "STAGED_IN", "RUNNING", "FAILED"],
                               [None, ("k", "0"), ("k", "1"), ("other", "x")])
    for site_id, app_id, state, tag in combos:
        params: dict[str, Any] = {"limit": 0}
        if site_id is not None:
            params["site_id"] = site_id
        if app_id is not None:
            params["app_id"] = app_id
        if state is not None:
            params["state"] = state
        if tag is not None:
            params["tags"] = f"{tag[0]}:{tag[1]}"
        truth = sum(1 for j in everything if (site_id is None or site_of[j["app_id"]] == site_id)
                    and (app_id is None or j["app_id"] == app_id) and (state is None or j["state"] == state)
                    and (tag is None or j["tags"].get(tag[0]) == tag[1]))
        assert client.get("/jobs/", params=params).json()["count"] == truth, params


def test_listing_counts_follow_every_change(api: dict) -> None:
    client = api["client"]
    (site1, app1), (site2, app2) = create_site_and_app(client, "one"), create_site_and_app(client, "two")
    jobs = client.post("/jobs/", json=[{"app_id": app1 if i % 4 else app2, "workdir": f"a/{i}",
                                        "tags": {"k": str(i % 3), **({"other": "x"} if i % 5 == 0 else {})}}
                                       for i in range(60)]).json()
    untagged = client.post("/jobs/", json=[{"app_id": app1, "workdir": f"u/{i}"} for i in range(5)]).json()
    ids = [j["id"] for j in jobs]
    sites, apps = [site1, site2], [app1, app2]
    _check_listing_counts(api, sites, apps)

    patch = [{"id": i, "state": "PREPROCESSED"} for i in ids[:30]]
    client.patch("/jobs/", json=patch).raise_for_status()
    client.patch("/jobs/", json=[{"id": i, "state": "RUNNING", "state_data": {"num_nodes": 1}} for i in ids[:20]]).raise_for_status()
    _check_listing_counts(api, sites, apps, fold=True)
    client.put("/jobs/", params={"tags": "k:1", "state": "STAGED_IN"}, json={"state": "FAILED"}).raise_for_status()
    client.patch("/jobs/", json=[{"id": i, "tags": {"k": "0"}} for i in ids[40:45]]).raise_for_status()  # a tag change
    _check_listing_counts(api, sites, apps)
    assert client.delete("/jobs/", params={"state": "FAILED"}).status_code == 200
    assert client.delete(f"/jobs/{ids[0]}").status_code == 204
    assert client.delete(f"/jobs/{untagged[0]['id']}").status_code == 204
    _check_listing_counts(api, sites, apps, fold=True)
    assert client.delete(f"/apps/{app2}").status_code == 204  # cascade
    _check_listing_counts(api, [site1], [app1])
    with api["engine"].connect() as conn:
        tagged_left = conn.exec_driver_sql("SELECT count(*) FROM jobs WHERE app_id = %d" % app2).scalar()
    assert tagged_left == 0


def test_listings_the_counters_cannot_answer_still_count_exactly(api: dict) -> None:
    client = api["client"]
    _site, app_id = create_site_and_app(client, "one")
    client.post("/jobs/", json=[{"app_id": app_id, "workdir": f"a/{i}", "tags": {"k": str(i % 2), "j": str(i % 3)}}
                                for i in range(30)]).raise_for_status()
    two_tags = client.get("/jobs/", params=[("tags", "k:0"), ("tags", "j:0"), ("limit", 0)]).json()
    assert two_tags["count"] == 5  # i % 6 == 0
    workdir = client.get("/jobs/", params={"workdir__contains": "a/1", "limit": 0}).json()
    assert workdir["count"] == 11  # a/1, a/10..a/19
