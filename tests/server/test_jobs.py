"""/jobs/: bulk create, filters, ordering, pagination, bulk/partial updates, deletes, state logic."""

from __future__ import annotations

import datetime as dt
import json

import orjson
import pytest

from balsam.models import MAX_ITEMS_PER_BULK_OP


def test_bulk_create_returns_jobs_and_events(api, site_app):
    _site, app = site_app
    created = api.ok("POST", "/jobs/", 201, json=[
        {"workdir": "a/1", "app_id": app["id"], "tags": {"system": "H2O"}, "num_nodes": 2, "ranks_per_node": 4,
         "launch_params": {"cpu_affinity": "depth"}, "gpus_per_rank": 0.5, "data": {"x": [1, 2]}, "wall_time_min": 10,
         "serialized_parameters": "abc"},
        {"workdir": "a/2", "app_id": app["id"]},
    ])
    first = created[0]
    assert set(first) == {
        "id", "workdir", "app_id", "tags", "serialized_parameters", "data", "return_code", "num_nodes",
        "ranks_per_node", "threads_per_rank", "threads_per_core", "launch_params", "gpus_per_rank",
        "node_packing_count", "wall_time_min", "parent_ids", "batch_job_id", "state", "pending_file_cleanup",
        "serialized_return_value", "serialized_exception", "last_update",
    }
    assert first["state"] == "STAGED_IN" and first["tags"] == {"system": "H2O"} and first["gpus_per_rank"] == 0.5
    assert api.job(first["id"]) == first
    events = api.events(job_id=first["id"])
    assert [(e["from_state"], e["to_state"]) for e in events] == [("CREATED", "STAGED_IN")]


def test_create_validation_is_all_or_nothing(api, site_app):
    _site, app = site_app
    resp = api.http.post("/jobs/", json=[{"workdir": "ok", "app_id": app["id"]}, {"workdir": "bad", "app_id": app["id"], "num_nodes": "two"}])
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"] == ["body", 1, "num_nodes"]
    resp = api.http.post("/jobs/", json=[{"workdir": "x", "app_id": app["id"], "num_nodes": 0}])
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", 0, "num_nodes"]
    resp = api.http.post("/jobs/", json=[{"workdir": "dup", "app_id": app["id"]}, {"workdir": "dup", "app_id": app["id"]}])
    assert resp.status_code == 409 and "twice" in resp.json()["detail"]
    resp = api.http.post("/jobs/", json=[{"workdir": "x", "app_id": app["id"], "parent_ids": [99999999]}])
    assert resp.status_code == 404 and "99999999" in resp.json()["detail"]
    resp = api.http.post("/jobs/", json=[{"workdir": "x", "app_id": 99999999}])
    assert resp.status_code == 404
    resp = api.http.post("/jobs/", json={"workdir": "x", "app_id": app["id"]})
    assert resp.status_code == 422 and "list" in resp.json()["detail"][0]["msg"]
    resp = api.http.post("/jobs/", json=[{"workdir": f"w{i}", "app_id": app["id"]} for i in range(MAX_ITEMS_PER_BULK_OP + 1)])
    assert resp.status_code == 400
    assert api.ok("GET", "/jobs/", params={"app_id": app["id"]})["count"] == 0


def test_every_filter(api):
    site1, site2 = api.site(), api.site()
    app1, app2 = api.app(site1["id"], "A"), api.app(site2["id"], "B")
    bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site1["id"], "project": "p", "queue": "q", "num_nodes": 1,
                                                  "wall_time_min": 5, "job_mode": "mpi"})
    j1 = api.jobs(app1["id"], 3, prefix="alpha", tags={"k": "1", "sys": "h2o"})
    j2 = api.jobs(app2["id"], 2, prefix="beta", tags={"k": "2"}, pending_file_cleanup=False)
    child = api.jobs(app1["id"], 1, prefix="child", parent_ids=[j1[0]["id"], j2[0]["id"]])[0]
    api.ok("PUT", f"/jobs/{j1[1]['id']}", json={"batch_job_id": bj["id"]})

    def ids(**params):
        return sorted(j["id"] for j in api.ok("GET", "/jobs/", params=params)["results"])

    assert ids(id=[j1[0]["id"], j2[1]["id"]]) == sorted([j1[0]["id"], j2[1]["id"]])
    assert ids(parent_id=[j2[0]["id"]]) == [child["id"]]
    assert ids(app_id=app2["id"]) == sorted(j["id"] for j in j2)
    assert ids(site_id=[site2["id"]]) == sorted(j["id"] for j in j2)
    assert ids(batch_job_id=bj["id"]) == [j1[1]["id"]]
    assert ids(workdir__contains="beta") == sorted(j["id"] for j in j2)
    assert ids(workdir__contains="%") == []  # LIKE wildcards are matched literally
    assert ids(tags=["k:1", "sys:h2o"]) == sorted(j["id"] for j in j1)
    assert ids(tags="k:2") == sorted(j["id"] for j in j2)
    assert ids(state="AWAITING_PARENTS") == [child["id"]]
    assert ids(state=["AWAITING_PARENTS", "STAGED_IN"]) == sorted(j["id"] for j in [*j1, *j2, child])
    assert ids(state__ne="STAGED_IN") == [child["id"]]
    assert ids(pending_file_cleanup="false") == sorted(j["id"] for j in j2)
    assert ids(pending_file_cleanup="true", site_id=[site2["id"]]) == []
    mark = api.job(j1[1]["id"])["last_update"]
    assert ids(last_update_after=mark) == [j1[1]["id"]]
    assert j1[1]["id"] not in ids(last_update_before=j1[0]["last_update"])

    for bad in ({"state": "NOPE"}, {"id": "x"}, {"tags": "novalue"}, {"ordering": "app_id"}, {"last_update_after": "yesterday"},
                {"limit": -1}, {"limit": 100001}, {"pending_file_cleanup": "maybe"}, {"colour": "red"}):
        resp = api.http.get("/jobs/", params=bad)
        assert resp.status_code == 422, bad
        assert resp.json()["detail"][0]["loc"] == ["query", next(iter(bad))]


def test_ordering_and_pagination(api, site_app):
    _site, app = site_app
    jobs = api.ok("POST", "/jobs/", 201, json=[{"workdir": f"w/{name}", "app_id": app["id"]} for name in "cabed"])
    ids = [j["id"] for j in jobs]
    page = api.ok("GET", "/jobs/", params={"ordering": "workdir", "limit": 2, "offset": 1})
    assert page["count"] == 5 and [j["workdir"] for j in page["results"]] == ["w/b", "w/c"]
    assert [j["id"] for j in api.ok("GET", "/jobs/", params={"ordering": "-id"})["results"]] == ids[::-1]
    assert api.ok("GET", "/jobs/", params={"limit": 0}) == {"count": 5, "results": []}
    api.patch_states([ids[2]], "FAILED")
    assert api.ok("GET", "/jobs/", params={"ordering": "-last_update", "limit": 1})["results"][0]["id"] == ids[2]
    assert api.ok("GET", "/jobs/", params={"ordering": "state", "limit": 1})["results"][0]["id"] == ids[2]


def test_bulk_patch_put_by_filter_and_put_one(api, site_app):
    _site, app = site_app
    jobs = api.jobs(app["id"], 4, tags={"grp": "a"})
    ids = [j["id"] for j in jobs]
    ts = "2026-01-02T03:04:05+00:00"
    assert api.ok("PATCH", "/jobs/", json=[
        {"id": ids[0], "state": "PREPROCESSED", "state_timestamp": ts, "state_data": {"why": "test"}, "data": {"a": 1}},
        {"id": ids[1], "tags": {"grp": "b"}},
    ]) == 2
    first = api.job(ids[0])
    assert first["state"] == "PREPROCESSED" and first["data"] == {"a": 1}
    event = api.events(job_id=ids[0], to_state="PREPROCESSED")[0]
    assert event["timestamp"].startswith("2026-01-02T03:04:05") and event["data"] == {"why": "test"}
    assert api.ok("PUT", "/jobs/", params={"tags": "grp:a"}, json={"return_code": 3, "state": "FAILED"}) == 3
    assert {j["return_code"] for j in api.ok("GET", "/jobs/", params={"state": "FAILED"})["results"]} == {3}
    assert api.ok("PUT", f"/jobs/{ids[1]}", json={"num_nodes": 8}) == 1
    assert api.job(ids[1])["num_nodes"] == 8
    # No event for an update that does not change the state.
    before = len(api.events(job_id=ids[1]))
    api.ok("PUT", f"/jobs/{ids[1]}", json={"state": "STAGED_IN"})
    assert len(api.events(job_id=ids[1])) == before


def test_update_errors_change_nothing(api, site_app):
    _site, app = site_app
    ids = [j["id"] for j in api.jobs(app["id"], 3)]
    resp = api.http.patch("/jobs/", json=[{"id": ids[0], "state": "PREPROCESSED"}, {"id": ids[1], "state": "RUN_DONE"}])
    assert resp.status_code == 409
    assert f"job {ids[1]}" in resp.json()["detail"] and "STAGED_IN to RUN_DONE" in resp.json()["detail"]
    assert resp.json()["refused_ids"] == [ids[1]]  # every job that made the call fail, for the client to drop
    assert api.job(ids[0])["state"] == "STAGED_IN"
    # A job's later update in the same call is validated from the state its earlier one leaves:
    # here the third step is refused, so none is applied.
    resp = api.http.patch("/jobs/", json=[{"id": ids[0], "state": "PREPROCESSED"}, {"id": ids[0], "state": "RUNNING"},
                                          {"id": ids[0], "state": "STAGED_IN"}])
    assert resp.status_code == 409 and "RUNNING to STAGED_IN" in resp.json()["detail"]
    assert api.job(ids[0])["state"] == "STAGED_IN"
    resp = api.http.patch("/jobs/", json=[{"id": ids[0], "state": "BOGUS"}])
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", 0, "state"]
    resp = api.http.patch("/jobs/", json=[{"id": ids[0], "app_id": 5}])
    assert resp.status_code == 422 and resp.json()["detail"][0]["msg"] == "cannot be changed"
    resp = api.http.patch("/jobs/", json=[{"state": "FAILED"}])
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", 0, "id"]
    resp = api.http.patch("/jobs/", json=[{"id": ids[0], "state": "FAILED"}, {"id": 99999999, "state": "FAILED"}])
    assert resp.status_code == 404 and api.job(ids[0])["state"] == "STAGED_IN"
    assert resp.json()["refused_ids"] == [99999999]
    # All of them, where the detail shows 20.
    missing = list(range(99999000, 99999030))
    resp = api.http.patch("/jobs/", json=[{"id": i, "state": "FAILED"} for i in missing])
    assert resp.status_code == 404 and "(+10 more)" in resp.json()["detail"] and resp.json()["refused_ids"] == missing
    # A missing BatchJob the jobs refer to is not a job of the request: no refused_ids.
    resp = api.http.patch("/jobs/", json=[{"id": ids[0], "batch_job_id": 99999999}])
    assert resp.status_code == 404 and "BatchJob" in resp.json()["detail"] and "refused_ids" not in resp.json()
    resp = api.http.put(f"/jobs/{ids[0]}", json={"state": "CREATED"})
    assert resp.status_code == 409
    resp = api.http.put(f"/jobs/{ids[0]}", json={"batch_job_id": 99999999})
    assert resp.status_code == 404


def test_bulk_patch_applies_a_jobs_updates_in_order(api, site_app):
    """A launcher sends a short task's RUNNING and RUN_DONE in one call: one row write, one event
    each with its own time and data, the other fields merged (a later update wins)."""
    site, app = site_app
    ids = [j["id"] for j in api.jobs(app["id"], 3)]
    api.patch_states(ids, "PREPROCESSED")
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})
    assert len(api.ok("POST", f"/sessions/{session['id']}", json={"max_num_jobs": 3, "filter_tags": {}})) == 3
    t1, t2, t3 = "2026-01-02T03:04:05+00:00", "2026-01-02T03:04:06+00:00", "2026-01-02T03:04:07+00:00"
    assert api.ok("PATCH", "/jobs/", json=[
        {"id": ids[0], "state": "RUNNING", "state_timestamp": t1, "state_data": {"num_nodes": 0.25}, "data": {"a": 1}},
        {"id": ids[1], "state": "RUNNING", "state_timestamp": t1},
        {"id": ids[0], "state": "RUN_DONE", "state_timestamp": t2, "return_code": 0, "data": {"b": 2}},
        {"id": ids[2], "data": {"c": 3}},
        {"id": ids[0], "state": "POSTPROCESSED", "state_timestamp": t3},
    ]) == 3
    first = api.job(ids[0])
    assert (first["state"], first["return_code"], first["data"]) == ("JOB_FINISHED", 0, {"b": 2})
    moves = {(e["from_state"], e["to_state"]): (e["timestamp"][:19], e["data"]) for e in api.events(job_id=ids[0])}
    assert moves[("PREPROCESSED", "RUNNING")] == ("2026-01-02T03:04:05", {"num_nodes": 0.25})
    assert moves[("RUNNING", "RUN_DONE")] == ("2026-01-02T03:04:06", {})
    assert moves[("RUN_DONE", "POSTPROCESSED")] == ("2026-01-02T03:04:07", {})
    assert moves[("POSTPROCESSED", "JOB_FINISHED")][1] == {"message": "Skipped stage out"}
    assert set(moves) == {("CREATED", "STAGED_IN"), ("STAGED_IN", "PREPROCESSED"), ("PREPROCESSED", "RUNNING"),
                          ("RUNNING", "RUN_DONE"), ("RUN_DONE", "POSTPROCESSED"), ("POSTPROCESSED", "JOB_FINISHED")}
    assert api.job(ids[1])["state"] == "RUNNING" and api.job(ids[2])["data"] == {"c": 3}
    # The session let go of the job that went on past RUNNING, and still holds the running one.
    assert api.http.delete(f"/sessions/{session['id']}").status_code in (200, 204)
    assert api.job(ids[0])["state"] == "JOB_FINISHED" and api.job(ids[1])["state"] == "RUN_TIMEOUT"


def test_users_may_force_restart_and_fail_but_not_leave_running(api, site_app):
    site, app = site_app
    job = api.jobs(app["id"])[0]
    api.patch_states([job["id"]], "FAILED")
    api.patch_states([job["id"]], "RESTART_READY")
    assert api.job(job["id"])["state"] == "RESTART_READY"
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})
    assert len(api.ok("POST", f"/sessions/{session['id']}", json={"max_num_jobs": 1, "filter_tags": {}})) == 1
    api.patch_states([job["id"]], "RUNNING")
    resp = api.http.put(f"/jobs/{job['id']}", json={"state": "RESTART_READY"})
    assert resp.status_code == 409 and "RUNNING" in resp.json()["detail"]


def test_staged_out_is_stored_as_finished(api):
    site = api.site(transfer_locations={"dtn": "globus://endpoint-1"})
    app = api.app(site["id"], transfers={"result": {"required": True, "direction": "out", "local_path": "out.dat"}})
    job = api.jobs(app["id"], transfers={"result": "dtn:/remote/out.dat"})[0]
    run_to(api, [job["id"]])
    assert api.job(job["id"])["state"] == "POSTPROCESSED"
    api.patch_states([job["id"]], "STAGED_OUT")
    assert api.job(job["id"])["state"] == "JOB_FINISHED"
    last = api.events(job_id=job["id"])[0]
    assert (last["from_state"], last["to_state"]) == ("POSTPROCESSED", "JOB_FINISHED")


def test_postprocessed_without_stage_out_finishes(api, site_app):
    _site, app = site_app
    job = api.jobs(app["id"])[0]
    for state in ("PREPROCESSED", "RUNNING", "RUN_DONE", "POSTPROCESSED"):
        api.patch_states([job["id"]], state)
    assert api.job(job["id"])["state"] == "JOB_FINISHED"
    last = api.events(job_id=job["id"])[0]
    assert (last["from_state"], last["to_state"], last["data"]) == ("POSTPROCESSED", "JOB_FINISHED", {"message": "Skipped stage out"})


def run_to(api, ids, final="POSTPROCESSED", via="patch"):
    for state in ("PREPROCESSED", "RUNNING", "RUN_DONE", final):
        if via == "patch":
            api.patch_states(ids, state)
        elif via == "put_filter":
            assert api.ok("PUT", "/jobs/", params={"id": ids}, json={"state": state}) == len(ids)
        else:
            for job_id in ids:
                assert api.ok("PUT", f"/jobs/{job_id}", json={"state": state}) == 1


@pytest.mark.parametrize("via", ["patch", "put_filter", "put_one"])
def test_children_released_when_all_parents_finish(api, site_app, via):
    _site, app = site_app
    parents = api.jobs(app["id"], 2)
    pids = [p["id"] for p in parents]
    child = api.jobs(app["id"], 1, parent_ids=pids)[0]
    grandchild = api.jobs(app["id"], 1, parent_ids=[child["id"]])[0]
    assert child["state"] == grandchild["state"] == "AWAITING_PARENTS"
    assert sorted(child["parent_ids"]) == sorted(pids)
    run_to(api, pids[:1], via=via)
    assert api.job(child["id"])["state"] == "AWAITING_PARENTS"
    run_to(api, pids[1:], via=via)
    assert api.job(child["id"])["state"] == "STAGED_IN"
    assert api.job(grandchild["id"])["state"] == "AWAITING_PARENTS"
    released = api.events(job_id=child["id"])[0]
    assert (released["from_state"], released["to_state"]) == ("AWAITING_PARENTS", "STAGED_IN")
    # A job whose parents already finished starts STAGED_IN.
    assert api.jobs(app["id"], 1, parent_ids=pids)[0]["state"] == "STAGED_IN"


def test_failed_parent_keeps_children_waiting(api, site_app):
    _site, app = site_app
    parent = api.jobs(app["id"])[0]
    child = api.jobs(app["id"], parent_ids=[parent["id"]])[0]
    api.patch_states([parent["id"]], "FAILED")
    assert api.job(child["id"])["state"] == "AWAITING_PARENTS"


def test_query_delete_and_delete_one(api, site_app):
    site, app = site_app
    jobs = api.jobs(app["id"], 4, tags={"del": "yes"})
    keep = api.jobs(app["id"], 1, tags={"del": "no"})[0]
    api.ok("DELETE", f"/jobs/{jobs[0]['id']}", 204)
    assert api.http.get(f"/jobs/{jobs[0]['id']}").status_code == 404
    assert api.http.delete(f"/jobs/{jobs[0]['id']}").status_code == 404
    # A query delete skips the jobs RUNNING in a launcher (named in a header, as 0.7 skipped the
    # locked ones) and deletes the others, leased (a launcher's prefetched job) or not. (It refused
    # the whole delete, 409, when any matching job was leased.)
    api.patch_states([jobs[1]["id"], jobs[2]["id"]], "PREPROCESSED")
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})
    api.ok("POST", f"/sessions/{session['id']}", json={"max_num_jobs": 10, "filter_tags": {}})
    api.patch_states([jobs[1]["id"]], "RUNNING")
    resp = api.http.delete("/jobs/", params={"tags": "del:yes"})
    assert resp.status_code == 200 and resp.json() == 2
    assert resp.headers["Balsam-Skipped-Running"] == f"count=1; ids={jobs[1]['id']}"
    assert [j["id"] for j in api.ok("GET", "/jobs/", params={"tags": "del:yes"})["results"]] == [jobs[1]["id"]]
    # Deleting one job by id takes it even while RUNNING, as in 0.7 (libEnsemble's BalsamTask.kill()
    # deletes its job): its launcher finds it gone at its next heartbeat and ends its run.
    api.ok("DELETE", f"/jobs/{jobs[1]['id']}", 204)
    assert api.http.get(f"/jobs/{jobs[1]['id']}").status_code == 404
    api.ok("DELETE", f"/sessions/{session['id']}", 204)
    assert api.ok("DELETE", "/jobs/", params={"tags": "del:yes"}) == 0
    (listed,) = api.ok("GET", "/jobs/", params={"app_id": app["id"]})["results"]
    assert _same_time(listed) == _same_time(api.job(keep["id"]))


def _same_time(job: dict) -> dict:
    # PostgreSQL writes a listing's microseconds without trailing zeros; Python writes all six.
    return dict(job, last_update=dt.datetime.fromisoformat(job["last_update"]))


def _moves(api, job_id):
    """(from, to, message) of a job's events, oldest first."""
    events = sorted(api.events(job_id=job_id), key=lambda e: (e["timestamp"], e["id"]))
    return [(e["from_state"], e["to_state"], (e.get("data") or {}).get("message")) for e in events]


def test_parent_delete_removes_link(api, site_app):
    """Deleting a child's only (unfinished) parent releases it at once: a deleted parent does not
    block (as in 0.7), and the delete re-checks the children (0.7 did not: they stayed waiting)."""
    _site, app = site_app
    parent = api.jobs(app["id"])[0]
    child = api.jobs(app["id"], parent_ids=[parent["id"]])[0]
    assert child["state"] == "AWAITING_PARENTS"
    api.ok("DELETE", f"/jobs/{parent['id']}", 204)
    assert api.ok("GET", "/jobs/", params={"parent_id": [parent["id"]]})["count"] == 0
    after = api.job(child["id"])
    assert (after["state"], after["parent_ids"]) == ("STAGED_IN", [parent["id"]])  # no stage-in: straight on
    assert _moves(api, child["id"]) == [
        ("CREATED", "AWAITING_PARENTS", None),
        ("AWAITING_PARENTS", "STAGED_IN", f"All remaining parents finished (deleted: {parent['id']})"),
    ]


@pytest.mark.parametrize("via", ["by_id", "query"])
@pytest.mark.parametrize("deleted_finished", [False, True], ids=["unfinished", "finished"])
def test_a_deleted_parent_does_not_block_its_children(api, site_app, deleted_finished, via):
    """A parent deleted (finished or not: ``balsam job rm --state JOB_FINISHED`` cleans up finished
    ones) while the child's other parent still runs: the child waits for that one, and its finish
    releases the child, once, saying which parent was gone (docs/api.md). 8028a93 kept it waiting
    for ever."""
    _site, app = site_app
    deleted, other = (p["id"] for p in api.jobs(app["id"], 2))
    if deleted_finished:
        run_to(api, [deleted])
        assert api.job(deleted)["state"] == "JOB_FINISHED"
    child = api.jobs(app["id"], 1, parent_ids=[deleted, other])[0]
    sibling = api.jobs(app["id"], 1, parent_ids=[other])[0]  # the same finish releases it
    assert child["state"] == sibling["state"] == "AWAITING_PARENTS"
    if via == "by_id":
        api.ok("DELETE", f"/jobs/{deleted}", 204)
    else:
        assert api.ok("DELETE", "/jobs/", params={"id": [deleted]}) == 1
    assert api.job(child["id"])["state"] == "AWAITING_PARENTS"  # the other parent runs
    run_to(api, [other])
    assert api.job(other)["state"] == "JOB_FINISHED"
    after = api.job(child["id"])
    assert (after["state"], sorted(after["parent_ids"])) == ("STAGED_IN", sorted([deleted, other]))
    assert _moves(api, child["id"]) == [
        ("CREATED", "AWAITING_PARENTS", None),
        ("AWAITING_PARENTS", "STAGED_IN", f"All remaining parents finished (deleted: {deleted})"),
    ]
    assert _moves(api, sibling["id"])[-1] == ("AWAITING_PARENTS", "STAGED_IN", "All parents finished")


def test_a_delete_releases_children_whose_remaining_parents_finished(api):
    """The other parents finished first: the delete itself releases the child (0.7 left it waiting
    for ever), in one query delete that also takes a child (gone, not released) and leaves a child
    whose remaining parent still runs waiting, until that one finishes. A child with an input to
    stage in goes to READY."""
    site = api.site(transfer_locations={"dtn": "globus://endpoint-1"})
    app = api.app(site["id"], transfers={"in": {"required": False, "direction": "in", "local_path": "in.dat"}})
    deleted, done, running = (p["id"] for p in api.jobs(app["id"], 3))
    run_to(api, [done])
    child, doomed = (j["id"] for j in api.jobs(app["id"], 2, parent_ids=[deleted, done]))
    staging = api.jobs(app["id"], 1, parent_ids=[deleted, done], transfers={"in": "dtn:/remote/in.dat"})[0]["id"]
    waits = api.jobs(app["id"], 1, parent_ids=[deleted, running])[0]["id"]
    assert {api.job(j)["state"] for j in (child, doomed, staging, waits)} == {"AWAITING_PARENTS"}
    assert api.ok("DELETE", "/jobs/", params={"id": [deleted, doomed]}) == 2
    message = f"All remaining parents finished (deleted: {deleted})"
    assert _moves(api, child)[1:] == [("AWAITING_PARENTS", "STAGED_IN", message)]
    assert _moves(api, staging)[1:] == [("AWAITING_PARENTS", "READY", message)]
    assert api.http.get(f"/jobs/{doomed}").status_code == 404
    assert api.job(waits)["state"] == "AWAITING_PARENTS"
    run_to(api, [running])
    assert _moves(api, waits)[1:] == [("AWAITING_PARENTS", "STAGED_IN", message)]


def test_put_by_filter_validation(api, site_app):
    _site, app = site_app
    ids = [j["id"] for j in api.jobs(app["id"], 3)]
    assert api.ok("PUT", "/jobs/", params={"id": ids}, json={"wall_time_min": 7}) == 3
    resp = api.http.put("/jobs/", params={"id": ids}, json={"wall_time_min": "long"})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "wall_time_min"]


@pytest.mark.parametrize("item", [
    {"workdir": "a/b", "app_id": 1},
    {"workdir": "a/b/", "app_id": 1, "num_nodes": "2"},
    {"workdir": "./x//y", "app_id": 1, "gpus_per_rank": 1, "parent_ids": [3, 2, 3]},
    {"workdir": "w", "app_id": 1, "tags": {"k": "v"}, "data": {"x": [1, {"y": None}]}, "launch_params": {"a": "b"},
     "return_code": 0, "batch_job_id": None, "pending_file_cleanup": False, "serialized_parameters": "abc",
     "id": None, "state": None, "state_data": {}, "transfers": {}, "wall_time_min": 30, "node_packing_count": 8},
])
def test_fast_create_parser_matches_the_model(item):
    """The create fast path and balsam.serialization agree on every accepted payload."""
    from balsam.models import Job
    from balsam.serialization import from_dict
    from balsam.server.jobs_logic import CREATE_DEFAULTS, _spec_of_job, parse_job_creates

    (fast,) = parse_job_creates([item])
    slow = _spec_of_job(from_dict(Job, item))
    for name in CREATE_DEFAULTS:
        fast_value, slow_value = fast.get(name, CREATE_DEFAULTS[name]), slow[name]
        assert fast_value == slow_value and type(fast_value) is type(slow_value), name


@pytest.mark.parametrize("body", [
    [{"workdir": "a", "app_id": 1, "tags": {"k": "v" * 1025}}, {"workdir": "b", "app_id": 1}],
    [{"workdir": "a", "app_id": 1}, {"workdir": "b" * 5000, "app_id": 1, "data": {"workdir": "x" * 4097}}],
    [{"workdir": "a", "app_id": 1, "launch_params": {"k" * 300: "v"}, "serialized_parameters": "p" * 600_000}],
    [{"workdir": "a", "app_id": 1, "data": {"deep": [{"text": "t" * 1_048_577}]}}, "s" * 1_048_577],
    [{"workdir": "a", "app_id": 1, "data": {"big": 2**63}}],
])
def test_create_size_limits_as_for_any_body(body):
    """The create parser checks the size limits item by item; its errors are those of the whole-body check."""
    from balsam.server.errors import ValidationFailed
    from balsam.server.jobs_logic import parse_job_creates
    from balsam.server.limits import field_size_errors

    expected = [{"loc": list(loc), "msg": msg, "type": "value_error"} for loc, msg in field_size_errors(body)]
    assert expected
    with pytest.raises(ValidationFailed) as caught:
        parse_job_creates(body)
    assert caught.value.detail == expected


def test_minimal_create_answer_columns_listing_and_replay(api, site_app):
    """``Prefer: return=minimal`` answers {id, state, last_update} per job (in the request's order,
    also when replayed for a retried Idempotency-Key); ``Accept: COLUMNS_MEDIA_TYPE`` lists the
    same jobs as columns of the fields of the object listing (each column the JSON text of its
    list of values)."""
    from balsam.server.jobs_logic import COLUMNS_MEDIA_TYPE

    _site, app = site_app
    parent = api.jobs(app["id"])[0]
    body = [{"workdir": f"m/{i}", "app_id": app["id"], "tags": {"m": str(i % 2)}, "gpus_per_rank": i % 2,
             "parent_ids": [parent["id"]] if i == 3 else [], "data": {"i": i}} for i in range(6)]
    headers = {"Prefer": "return=minimal", "Idempotency-Key": "minimal-1"}
    resp = api.http.post("/jobs/", json=body, headers=headers)
    assert resp.status_code == 201 and resp.headers["preference-applied"] == "return=minimal"
    minimal = resp.json()
    assert [set(job) for job in minimal] == [{"id", "state", "last_update"}] * 6
    assert [job["state"] for job in minimal] == ["STAGED_IN"] * 3 + ["AWAITING_PARENTS"] + ["STAGED_IN"] * 2
    ids = [job["id"] for job in minimal]
    assert ids == sorted(ids)
    replay = api.http.post("/jobs/", json=body, headers=headers)
    assert replay.status_code == 201 and replay.json() == minimal
    full = api.ok("GET", "/jobs/", params={"app_id": app["id"], "workdir__contains": "m/"})
    by_id = {job["id"]: job for job in full["results"]}
    for sent, got in zip(body, minimal):
        job = by_id[got["id"]]
        assert job["workdir"] == sent["workdir"] and job["state"] == got["state"]
        assert job["last_update"] == got["last_update"]  # one instant, one text (also on PostgreSQL)
        assert job["gpus_per_rank"] == float(sent["gpus_per_rank"]) and job["data"] == sent["data"]
    assert len(api.events(job_id=ids[3])) == 1

    for params in ({"app_id": app["id"]}, {"tags": "m:1", "ordering": "-workdir", "limit": 2, "offset": 1}):
        objects = api.ok("GET", "/jobs/", params=params)
        columns = api.http.get("/jobs/", params=params, headers={"Accept": COLUMNS_MEDIA_TYPE})
        assert columns.status_code == 200 and columns.headers["content-type"].startswith(COLUMNS_MEDIA_TYPE)
        page = columns.json()
        assert page["count"] == objects["count"]
        listed = [dict(zip(page["fields"], row)) for row in zip(*(json.loads(c) for c in page["columns"]))]
        assert len(listed) == len(objects["results"])
        for row, obj in zip(listed, objects["results"]):
            assert row.keys() == obj.keys()
            for name, value in obj.items():
                assert row[name] == value, name


@pytest.mark.parametrize("stored", ["2026-01-02 03:04:05.120000", "2026-01-02 03:04:05", "2026-01-02 03:04:05.000001"])
def test_listings_write_times_as_every_answer_does(api, site_app, db_kind, request, stored):
    """Every form of a job listing (objects and columns, written by the server or by the database)
    writes ``last_update`` as the create's answer and orjson do: six digits of microseconds, none
    when they are zero. (PostgreSQL's own JSON drops trailing zeros; SQLite stores six digits.)"""
    import sqlalchemy as sa

    from balsam.server.db import normalize_database_url
    from balsam.server.jobs_logic import COLUMNS_MEDIA_TYPE
    from balsam.server.tables import jobs

    _site, app = site_app
    job = api.jobs(app["id"], 1, tags={"clock": stored})[0]
    server = request.getfixturevalue("_live_server_obj" if db_kind == "sqlite" else "_live_server_pg_obj")
    engine = sa.create_engine(normalize_database_url(server.database_url))
    with engine.begin() as conn:  # stored as the server stores it (through the column's type)
        instant = dt.datetime.fromisoformat(stored).replace(tzinfo=dt.timezone.utc)
        conn.execute(sa.update(jobs).where(jobs.c.id == job["id"]).values(last_update=instant))
    engine.dispose()
    expected = dt.datetime.fromisoformat(stored).isoformat()
    assert expected == orjson.dumps(dt.datetime.fromisoformat(stored)).decode().strip('"')
    params = {"tags": f"clock:{stored}"}
    assert [j["last_update"] for j in api.ok("GET", "/jobs/", params=params)["results"]] == [expected]
    assert api.job(job["id"])["last_update"] == expected
    page = api.http.get("/jobs/", params=params, headers={"Accept": COLUMNS_MEDIA_TYPE}).json()
    assert json.loads(page["columns"][page["fields"].index("last_update")]) == [expected]
