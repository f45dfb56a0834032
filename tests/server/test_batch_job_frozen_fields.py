"""A submitted BatchJob's num_nodes, wall_time_min, queue, project and job_mode: nothing applies a
change of them to the scheduler, so once it has left pending_submission a change is refused (409,
nothing updated) and the record keeps telling what the scheduler holds. The same value is accepted:
0.7's BatchJob.save() sends every field set since it was read."""

from __future__ import annotations

import pytest

from test_batch_jobs import bj_body

FROZEN = [("num_nodes", 8), ("wall_time_min", 600), ("queue", "prod"), ("project", "other"), ("job_mode", "serial")]


def _queued(api, site_id: int, count: int = 1) -> list[dict]:
    made = [api.ok("POST", "/batch-jobs/", 201, json=bj_body(site_id)) for _ in range(count)]
    return api.ok("PATCH", "/batch-jobs/", json=[{"id": b["id"], "state": "queued", "scheduler_id": 500 + i}
                                                 for i, b in enumerate(made)])


@pytest.mark.parametrize("field,value", FROZEN)
def test_a_queued_batch_job_refuses_a_change_the_scheduler_never_sees(api, field, value):
    site = api.site()
    (bj,) = _queued(api, site["id"])
    resp = api.http.put(f"/batch-jobs/{bj['id']}", json={field: value, "status_info": {"note": "x"}})
    assert resp.status_code == 409, resp.text
    detail = resp.json()["detail"]
    assert f"batch job {bj['id']}: {field} {bj[field]!r} -> {value!r} while queued" in detail, detail
    assert api.ok("GET", f"/batch-jobs/{bj['id']}") == bj  # nothing updated, status_info neither


def test_the_same_values_and_the_other_fields_are_accepted(api):
    site = api.site()
    (bj,) = _queued(api, site["id"])
    whole = {k: v for k, v in bj.items() if k not in ("id", "site_id")}  # a client re-sending the whole object
    after = api.ok("PUT", f"/batch-jobs/{bj['id']}", json={**whole, "status_info": {"scheduler_reason": "Priority"}})
    assert after == {**bj, "status_info": {"scheduler_reason": "Priority"}}
    running = api.ok("PUT", f"/batch-jobs/{bj['id']}", json={"state": "running", "num_nodes": 2, "filter_tags": {"a": "b"}})
    assert (running["state"], running["num_nodes"], running["filter_tags"]) == ("running", 2, {"a": "b"})


def test_pending_submission_may_still_change_even_with_its_submission(api):
    site = api.site()
    bj = api.ok("POST", "/batch-jobs/", 201, json=bj_body(site["id"]))
    changed = api.ok("PUT", f"/batch-jobs/{bj['id']}", json={"num_nodes": 4, "wall_time_min": 60, "queue": "prod"})
    assert (changed["num_nodes"], changed["wall_time_min"], changed["queue"]) == (4, 60, "prod")
    # the stored state is what counts: the change that submits it may still fix its size
    (done,) = api.ok("PATCH", "/batch-jobs/", json=[{"id": bj["id"], "state": "queued", "scheduler_id": 9, "num_nodes": 3}])
    assert (done["state"], done["num_nodes"]) == ("queued", 3)


@pytest.mark.parametrize("state", ["running", "finished", "submit_failed", "pending_deletion"])
def test_every_state_after_submission_is_frozen(api, state):
    site = api.site()
    bj = api.ok("POST", "/batch-jobs/", 201, json=bj_body(site["id"]))
    path = {"running": ["queued", "running"], "finished": ["queued", "running", "finished"],
            "submit_failed": ["submit_failed"], "pending_deletion": ["pending_deletion"]}[state]
    for step in path:
        api.ok("PUT", f"/batch-jobs/{bj['id']}", json={"state": step})
    resp = api.http.put(f"/batch-jobs/{bj['id']}", json={"wall_time_min": 90})
    assert resp.status_code == 409 and f"wall_time_min 30 -> 90 while {state}" in resp.json()["detail"], resp.text


def test_a_bulk_update_refuses_as_a_whole_and_names_the_rows(api):
    site = api.site()
    pending = api.ok("POST", "/batch-jobs/", 201, json=bj_body(site["id"]))
    first, second = _queued(api, site["id"], 2)
    resp = api.http.patch("/batch-jobs/", json=[
        {"id": pending["id"], "num_nodes": 16},
        {"id": first["id"], "num_nodes": 2, "status_info": {"a": "1"}},  # the same value
        {"id": second["id"], "wall_time_min": 45, "queue": "prod"},
    ])
    assert resp.status_code == 409, resp.text
    body = resp.json()
    assert body["refused_ids"] == [second["id"]]
    assert f"batch job {second['id']}: wall_time_min 30 -> 45, queue 'debug' -> 'prod' while queued" in body["detail"]
    listed = api.ok("GET", "/batch-jobs/", params={"site_id": site["id"]})["results"]
    assert [(b["num_nodes"], b["status_info"]) for b in listed] == [(2, {}), (2, {}), (2, {})]  # nothing updated
    ok = api.ok("PATCH", "/batch-jobs/", json=[{"id": pending["id"], "num_nodes": 16},
                                               {"id": first["id"], "num_nodes": 2, "status_info": {"a": "1"}}])
    assert [(b["num_nodes"], b["status_info"]) for b in ok] == [(16, {}), (2, {"a": "1"})]
