"""/batch-jobs/: create, filters, single and bulk updates, state rules, delete."""

from __future__ import annotations

import httpx
import pytest
from server_testlib import runnable


def bj_body(site_id, **fields):
    return {"site_id": site_id, "project": "datascience", "queue": "debug", "num_nodes": 2, "wall_time_min": 30,
            "job_mode": "mpi", **fields}


def test_create_read_and_filters(api):
    site, site2 = api.site(), api.site()
    a = api.ok("POST", "/batch-jobs/", 201, json=bj_body(site["id"], filter_tags={"role": "sim"}, state="running",
                                                         optional_params={"ssds": "1"},
                                                         partitions=[{"job_mode": "mpi", "num_nodes": 1},
                                                                     {"job_mode": "serial", "num_nodes": 1, "filter_tags": {"w": "1"}}]))
    assert a["state"] == "pending_submission"  # the server decides the initial state
    assert a["partitions"][1] == {"job_mode": "serial", "num_nodes": 1, "filter_tags": {"w": "1"}}
    b = api.ok("POST", "/batch-jobs/", 201, json=bj_body(site2["id"], queue="prod", job_mode="serial"))
    assert api.ok("GET", f"/batch-jobs/{a['id']}") == a
    api.ok("PUT", f"/batch-jobs/{a['id']}", json={"scheduler_id": 4242, "state": "queued",
                                                   "start_time": "2026-01-01T10:00:00Z"})
    api.ok("PUT", f"/batch-jobs/{b['id']}", json={"start_time": "2026-01-02T10:00:00Z", "end_time": "2026-01-02T11:00:00Z"})

    def ids(**params):
        return [x["id"] for x in api.ok("GET", "/batch-jobs/", params=params)["results"]]

    assert ids(site_id=[site2["id"]]) == [b["id"]]
    assert ids(scheduler_id=4242) == [a["id"]]
    assert ids(queue="prod") == [b["id"]]
    assert ids(state=["queued"]) == [a["id"]]
    assert ids(filter_tags="role:sim") == [a["id"]]
    assert ids(start_time_after="2026-01-01T12:00:00Z") == [b["id"]]
    assert ids(start_time_before="2026-01-01T12:00:00Z") == [a["id"]]
    assert ids(end_time_after="2026-01-02T10:30:00Z") == [b["id"]]
    assert ids(end_time_before="2026-01-02T10:30:00Z") == []
    assert ids(ordering="-start_time") == [b["id"], a["id"]]
    assert ids(id=[a["id"], b["id"]], ordering="start_time") == [a["id"], b["id"]]


def test_validation(api):
    site = api.site()
    resp = api.http.post("/batch-jobs/", json=bj_body(site["id"], job_mode="threads"))
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "job_mode"]
    resp = api.http.post("/batch-jobs/", json=bj_body(site["id"], num_nodes=0))
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "num_nodes"]
    body = bj_body(site["id"])
    del body["project"]
    resp = api.http.post("/batch-jobs/", json=body)
    assert resp.status_code == 422 and resp.json()["detail"][0] == {"loc": ["body", "project"], "msg": "field required", "type": "value_error"}
    bj = api.ok("POST", "/batch-jobs/", 201, json=bj_body(site["id"]))
    resp = api.http.put(f"/batch-jobs/{bj['id']}", json={"state": "exploded"})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "state"]


def test_bulk_patch_and_state_rules(api):
    site = api.site()
    bjs = [api.ok("POST", "/batch-jobs/", 201, json=bj_body(site["id"])) for _ in range(3)]
    ids = [b["id"] for b in bjs]
    result = api.ok("PATCH", "/batch-jobs/", json=[
        {"id": ids[0], "state": "queued", "scheduler_id": 1},
        {"id": ids[1], "state": "submit_failed", "status_info": {"error": "no such project"}},
        {"id": ids[2], "state": "pending_deletion"},
    ])
    assert [(b["id"], b["state"]) for b in result] == [(ids[0], "queued"), (ids[1], "submit_failed"), (ids[2], "pending_deletion")]
    assert result[1]["status_info"] == {"error": "no such project"}
    # Invalid transitions refuse the whole request.
    resp = api.http.patch("/batch-jobs/", json=[{"id": ids[0], "state": "running"}, {"id": ids[1], "state": "running"}])
    assert resp.status_code == 409 and "submit_failed to running" in resp.json()["detail"]
    assert api.ok("GET", f"/batch-jobs/{ids[0]}")["state"] == "queued"
    # pending_deletion: only 'finished' is accepted as a state; other fields still update (0.7 rule).
    after = api.ok("PUT", f"/batch-jobs/{ids[2]}", json={"state": "running", "scheduler_id": 77})
    assert (after["state"], after["scheduler_id"]) == ("pending_deletion", 77)
    assert api.ok("PUT", f"/batch-jobs/{ids[2]}", json={"state": "finished"})["state"] == "finished"
    # Revoking an allocation that already ended (libEnsemble's revoke_allocation) keeps its final state.
    revoked = api.ok("PATCH", "/batch-jobs/", json=[{"id": ids[1], "state": "pending_deletion"},
                                                     {"id": ids[2], "state": "pending_deletion", "scheduler_id": 78}])
    assert [(b["state"], b["scheduler_id"]) for b in revoked] == [("submit_failed", None), ("finished", 78)]
    resp = api.http.patch("/batch-jobs/", json=[{"id": ids[0], "site_id": 3}])
    assert resp.status_code == 422
    resp = api.http.patch("/batch-jobs/", json=[{"id": ids[0]}, {"id": ids[0]}])
    assert resp.status_code == 422 and "duplicate" in resp.json()["detail"][0]["msg"]
    resp = api.http.patch("/batch-jobs/", json=[{"id": 99999999, "state": "queued"}])
    assert resp.status_code == 404


def test_delete_keeps_jobs(api, site_app):
    site, app = site_app
    bj = api.ok("POST", "/batch-jobs/", 201, json=bj_body(site["id"]))
    job = api.jobs(app["id"], batch_job_id=bj["id"])[0]
    assert job["batch_job_id"] == bj["id"]
    api.ok("DELETE", f"/batch-jobs/{bj['id']}", 204)
    assert api.http.get(f"/batch-jobs/{bj['id']}").status_code == 404
    assert api.job(job["id"])["batch_job_id"] is None


def _launcher(api, site_id, bj_id):
    cred = api.ok("POST", "/auth/credentials", 201, json={"site_id": site_id, "batch_job_id": bj_id, "ttl_sec": 3600})
    client = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {cred['access_token']}"}, timeout=60)
    # A first call: the server process now trusts this credential (BALSAM_AUTH_REVOCATION_CACHE_SEC).
    assert client.get(f"/sites/{site_id}").status_code == 200
    return client


@pytest.mark.parametrize("end", ["put_finished", "patch_finished", "delete_batch_job", "delete_site"])
def test_ending_an_allocation_refuses_its_launcher_at_once(api, end):
    """Before: the revoked launcher token kept working ~5 s, until the process's credential cache
    checked again (security.md promises revocation at once in the process that revoked it)."""
    site = api.site()
    bj = api.ok("POST", "/batch-jobs/", 201, json=bj_body(site["id"]))
    launcher = _launcher(api, site["id"], bj["id"])
    try:
        if end == "put_finished":
            api.ok("PUT", f"/batch-jobs/{bj['id']}", json={"state": "finished"})
        elif end == "patch_finished":
            api.ok("PATCH", "/batch-jobs/", json=[{"id": bj["id"], "state": "finished"}])
        elif end == "delete_batch_job":
            api.ok("DELETE", f"/batch-jobs/{bj['id']}", 204)
        else:
            api.ok("DELETE", f"/sites/{site['id']}", 204)
        resp = launcher.get("/jobs/")
        assert resp.status_code == 401, resp.text
    finally:
        launcher.close()


def test_deleting_a_batch_job_ends_its_sessions(api, site_app):
    """Before: the session survived (batch_job_id nulled) and kept its jobs leased (DELETE /jobs/ID
    answered 409); now as when the BatchJob finishes: RUNNING -> RUN_TIMEOUT, the others freed."""
    site, app = site_app
    ids = runnable(api, app["id"], 2)
    bj = api.ok("POST", "/batch-jobs/", 201, json=bj_body(site["id"]))
    launcher = _launcher(api, site["id"], bj["id"])
    try:
        session = launcher.post("/sessions/", json={"site_id": site["id"], "batch_job_id": bj["id"]}).json()
        acquired = launcher.post(f"/sessions/{session['id']}", json={"max_num_jobs": 2}).json()
        assert sorted(j["id"] for j in acquired) == ids
        assert launcher.patch("/jobs/", json=[{"id": ids[0], "state": "RUNNING"}]).status_code == 200
    finally:
        launcher.close()
    api.ok("DELETE", f"/batch-jobs/{bj['id']}", 204)
    assert api.ok("GET", "/sessions/", params={"id": session["id"]})["count"] == 0
    assert [api.job(i)["state"] for i in ids] == ["RUN_TIMEOUT", "PREPROCESSED"]
    api.ok("DELETE", f"/jobs/{ids[1]}", 204)  # no longer leased
