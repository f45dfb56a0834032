"""The created events of a bulk create (SQLite writes them in one INSERT over a JSON array of the
new ids, PostgreSQL by COPY): one per job, in job-id order, its state and time those of the job,
found by the event filters as any other event, and none left behind by a create that fails."""

from __future__ import annotations

import datetime as dt
import uuid

from balsam.serialization import parse_datetime


def _created_events(api, tag: str) -> list[dict]:
    events = api.ok("GET", "/events/", params={"tags": f"batch:{tag}", "from_state": "CREATED", "limit": 5000,
                                               "ordering": "timestamp"})
    return events["results"]


def test_one_event_per_job_in_id_order(api, site_app):
    _site, app = site_app
    waiting_parent = api.jobs(app["id"])[0]  # STAGED_IN, not finished: its children wait for it
    tag = uuid.uuid4().hex[:8]
    before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    body = [{"workdir": f"ev/{tag}/{i}", "app_id": app["id"], "tags": {"batch": tag},
             "parent_ids": [waiting_parent["id"]] if i % 3 == 0 else []} for i in range(600)]
    created = api.ok("POST", "/jobs/", 201, json=body)
    assert len(created) == 600
    assert {job["state"] for job in created[::3]} == {"AWAITING_PARENTS"}
    assert {job["state"] for i, job in enumerate(created) if i % 3} == {"STAGED_IN"}

    events = _created_events(api, tag)
    assert len(events) == 600
    by_job = {event["job_id"]: event for event in events}
    assert sorted(by_job) == [job["id"] for job in created]
    for job in created:
        event = by_job[job["id"]]
        assert (event["from_state"], event["to_state"], event["data"]) == ("CREATED", job["state"], {})
        assert parse_datetime(event["timestamp"]) == parse_datetime(job["last_update"])
    # Event ids grow with the job ids (the order the jobs were given in).
    event_ids = [by_job[job["id"]]["id"] for job in created]
    assert event_ids == sorted(event_ids) and len(set(event_ids)) == 600
    # Their time is stored as any other event's: the time filters find them.
    after = api.ok("GET", "/events/", params={"tags": f"batch:{tag}", "timestamp_after": before.isoformat(),
                                              "to_state": "AWAITING_PARENTS", "limit": 5000})
    assert sorted(e["job_id"] for e in after["results"]) == [job["id"] for job in created[::3]]
    gone = api.ok("GET", "/events/", params={"tags": f"batch:{tag}", "timestamp_before": before.isoformat()})
    assert gone["count"] == 0


def test_all_staged_in_without_parents(api, site_app):
    _site, app = site_app
    tag = uuid.uuid4().hex[:8]
    created = api.ok("POST", "/jobs/", 201, json=[{"workdir": f"plain/{tag}/{i}", "app_id": app["id"],
                                                    "tags": {"batch": tag}} for i in range(50)])
    events = _created_events(api, tag)
    assert sorted((e["job_id"], e["to_state"]) for e in events) == [(job["id"], "STAGED_IN") for job in created]


def test_failed_create_leaves_no_events(api, site_app):
    _site, app = site_app
    tag = uuid.uuid4().hex[:8]
    body = [{"workdir": f"dup/{tag}/{i % 40}", "app_id": app["id"], "tags": {"batch": tag}} for i in range(41)]
    resp = api.http.post("/jobs/", json=body)
    assert resp.status_code == 409 and "appears twice" in resp.text
    assert _created_events(api, tag) == []
    assert api.ok("GET", "/jobs/", params={"tags": f"batch:{tag}"})["count"] == 0
