"""/sessions/: create, acquire (every constraint), tick, delete, expiry sweep."""

from __future__ import annotations

import time

from server_testlib import SHORT_EXPIRY_SEC, Api, runnable


def acquire(api, session_id, **spec):
    body = {"max_num_jobs": 100, "filter_tags": {}, **spec}
    return api.ok("POST", f"/sessions/{session_id}", json=body)


def test_create_list_tick_delete(api):
    site = api.site()
    bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], "project": "p", "queue": "q", "num_nodes": 1,
                                                  "wall_time_min": 5, "job_mode": "mpi"})
    s1 = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"], "batch_job_id": bj["id"]})
    s2 = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})
    assert s1["batch_job_id"] == bj["id"] and s1["heartbeat"]
    listing = api.ok("GET", "/sessions/")
    assert listing["count"] == 2 and [s["id"] for s in listing["results"]] == [s1["id"], s2["id"]]
    assert api.ok("GET", "/sessions/", params={"id": [s2["id"]]})["results"] == [s2]
    tick = api.ok("PUT", f"/sessions/{s1['id']}")
    assert tick["heartbeat"] > s1["heartbeat"]
    api.ok("DELETE", f"/sessions/{s1['id']}", 204)
    assert api.http.put(f"/sessions/{s1['id']}").status_code == 404
    resp = api.http.post("/sessions/", json={"site_id": "x"})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "site_id"]
    assert api.http.post("/sessions/", json={"site_id": site["id"], "batch_job_id": 99999999}).status_code == 404


def test_acquire_marks_jobs_and_two_sessions_split(api, site_app):
    site, app = site_app
    ids = runnable(api, app["id"], 10)
    bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], "project": "p", "queue": "q", "num_nodes": 1,
                                                  "wall_time_min": 5, "job_mode": "mpi"})
    s1 = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"], "batch_job_id": bj["id"]})
    s2 = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})
    first = acquire(api, s1["id"], max_num_jobs=2)
    second = acquire(api, s2["id"], max_num_jobs=100)
    assert [j["id"] for j in first] == ids[:2] and [j["id"] for j in second] == ids[2:]
    assert all(j["batch_job_id"] == bj["id"] for j in first)
    assert acquire(api, s1["id"]) == [] and acquire(api, s2["id"]) == []
    # RUNNING keeps the lease; RUN_DONE releases it (batch_job_id is kept).
    api.patch_states(ids[:2], "RUNNING")
    assert api.ok("DELETE", "/jobs/", params={"id": ids[:2]}) == 0  # RUNNING in a session: skipped
    api.patch_states(ids[:2], "RUN_DONE")
    assert api.ok("DELETE", "/jobs/", params={"id": [ids[0]]}) == 1
    assert api.job(ids[1])["batch_job_id"] == bj["id"]
    # RESTART_READY jobs are runnable again for any session.
    api.patch_states([ids[1]], "RESTART_READY")
    assert [j["id"] for j in acquire(api, s1["id"])] == [ids[1]]


def test_acquire_constraints(api):
    site = api.site()
    app_a, app_b = api.app(site["id"], "A"), api.app(site["id"], "B")
    serial = runnable(api, app_a["id"], 2, tags={"kind": "serial"})
    mpi = runnable(api, app_a["id"], 1, num_nodes=4, wall_time_min=60, tags={"kind": "mpi"})
    multi_rank = runnable(api, app_a["id"], 1, ranks_per_node=8, tags={"kind": "serial"})
    other_app = runnable(api, app_b["id"], 1, tags={"kind": "serial"})
    staged = api.jobs(app_a["id"], 1)[0]["id"]  # STAGED_IN: not runnable
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]

    def try_ids(**spec):
        got = [j["id"] for j in api.ok("POST", f"/sessions/{session}", json={"max_num_jobs": 100, "filter_tags": {}, **spec})]
        if got:
            api.ok("DELETE", f"/sessions/{session}", 204)
        return sorted(got)

    assert try_ids(filter_tags={"kind": "mpi"}) == mpi
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    assert try_ids(serial_only=True, app_ids=[app_a["id"]]) == sorted(serial)
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    assert try_ids(max_nodes_per_job=1, filter_tags={"kind": "serial"}) == sorted(serial + multi_rank + other_app)
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    assert try_ids(max_wall_time_min=30, app_ids=[app_b["id"]]) == other_app
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    assert try_ids(states=["STAGED_IN"]) == [staged]
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    for bad in ({"max_num_jobs": 0}, {"max_num_jobs": 5000}, {"sort_by": "random"}, {"states": ["NOPE"]}, {"colour": 1}):
        resp = api.http.post(f"/sessions/{session}", json={"max_num_jobs": 10, "filter_tags": {}, **bad})
        assert resp.status_code == 422, bad
        assert resp.json()["detail"][0]["loc"][1] == next(iter(bad))


def test_acquire_aggregate_nodes(api, site_app):
    """0.7 scenario: 4 two-node jobs and 8 jobs packing 8 per node; a cap of 5 nodes takes 10 jobs."""
    site, app = site_app
    small = runnable(api, app["id"], 8, node_packing_count=8, wall_time_min=5)
    big = runnable(api, app["id"], 4, num_nodes=2, wall_time_min=10)
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    got = acquire(api, session, max_aggregate_nodes=5)
    assert len(got) == 10
    assert sorted(j["id"] for j in got) == sorted(small + big[:2])
    footprint = sum(j["num_nodes"] / j["node_packing_count"] for j in got)
    assert footprint <= 5
    api.ok("DELETE", f"/sessions/{session}", 204)
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    # long_large_first: longest wall time first, so the 2-node jobs go first.
    got = acquire(api, session, max_aggregate_nodes=4.5, sort_by="long_large_first")
    assert [j["id"] for j in got[:2]] == big[:2] and len(got) == 6


def test_delete_session_times_out_running_jobs(api, site_app):
    site, app = site_app
    ids = runnable(api, app["id"], 3)
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    acquire(api, session)
    api.patch_states(ids[:2], "RUNNING")
    api.ok("DELETE", f"/sessions/{session}", 204)
    assert [api.job(i)["state"] for i in ids] == ["RUN_TIMEOUT", "RUN_TIMEOUT", "PREPROCESSED"]
    event = api.events(job_id=ids[0])[0]
    # Said as it is: the Session was deleted (it did not expire).
    assert event["to_state"] == "RUN_TIMEOUT" and "Session was deleted" in event["data"]["message"]
    # All three are free again: the third one can be acquired by a new session.
    other = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    assert [j["id"] for j in acquire(api, other)] == [ids[2]]


def test_expired_session_is_swept(short_expiry_server, register):
    api = Api(short_expiry_server, register)
    site = api.site()
    app = api.app(site["id"])
    ids = runnable(api, app["id"], 4)
    dead = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    alive = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    assert len(acquire(api, dead, max_num_jobs=3)) == 3
    api.patch_states(ids[:2], "RUNNING")
    deadline = time.monotonic() + SHORT_EXPIRY_SEC * 3 + 5
    while time.monotonic() < deadline:
        api.ok("PUT", f"/sessions/{alive}")  # keeps 'alive' alive; 'dead' never ticks
        if api.ok("GET", "/sessions/", params={"id": [dead]})["count"] == 0:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the silent session was never swept")
    assert [api.job(i)["state"] for i in ids[:2]] == ["RUN_TIMEOUT", "RUN_TIMEOUT"]
    assert sorted(j["id"] for j in acquire(api, alive)) == ids[2:]
    api.close()


def test_background_sweep_without_requests(short_expiry_server, register):
    """No client request is needed: the server's periodic sweep reclaims the jobs."""
    api = Api(short_expiry_server, register)
    site = api.site()
    app = api.app(site["id"])
    ids = runnable(api, app["id"], 2)
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    acquire(api, session)
    api.patch_states(ids, "RUNNING")
    # Waited for: the sweeper runs every second in the server's event loop, and a fixed sleep of
    # SHORT_EXPIRY_SEC + 2.5 s left it 1.5 s of slack on a loaded host. GET /jobs/{id} sweeps
    # nothing itself: only the periodic sweep can make these RUN_TIMEOUT.
    deadline = time.monotonic() + SHORT_EXPIRY_SEC + 60
    while any(api.job(i)["state"] == "RUNNING" for i in ids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [api.job(i)["state"] for i in ids] == ["RUN_TIMEOUT", "RUN_TIMEOUT"]
    assert api.ok("GET", "/sessions/")["count"] == 0
    api.close()


def test_finished_batch_job_ends_its_sessions(api, site_app):
    site, app = site_app
    ids = runnable(api, app["id"], 1)
    bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], "project": "p", "queue": "q", "num_nodes": 1,
                                                  "wall_time_min": 5, "job_mode": "mpi"})
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"], "batch_job_id": bj["id"]})["id"]
    acquire(api, session)
    api.patch_states(ids, "RUNNING")
    api.ok("PUT", f"/batch-jobs/{bj['id']}", json={"state": "finished"})
    assert api.http.put(f"/sessions/{session}").status_code == 404
    assert api.job(ids[0])["state"] == "RUN_TIMEOUT"


def test_a_server_restart_expires_no_session_that_heartbeats_again(db_kind, live_server_factory, register):
    """The server killed -9 and down longer than the session expiry: on restart, a launcher that
    survived (it heartbeats again) keeps its session and its RUNNING jobs (expiring it would run
    them twice); a session that stays silent still expires, an expiry period after the restart."""
    server = live_server_factory(db_kind, env={"BALSAM_SESSION_EXPIRE_SEC": str(SHORT_EXPIRY_SEC),
                                              "BALSAM_SESSION_SWEEP_SEC": "1"})
    api = Api(server.url, register)
    site = api.site()
    app = api.app(site["id"])
    ids = runnable(api, app["id"], 4)
    alive = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    silent = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})["id"]
    kept = [j["id"] for j in acquire(api, alive, max_num_jobs=2)]
    lost = [j["id"] for j in acquire(api, silent, max_num_jobs=2)]
    assert sorted(kept + lost) == sorted(ids)
    api.patch_states(ids, "RUNNING")
    server.proc.kill()
    server.proc.wait(10)
    time.sleep(SHORT_EXPIRY_SEC * 2 + 1)  # down for longer than the expiry: no heartbeat could arrive
    server.start()
    api.ok("PUT", f"/sessions/{alive}")  # the surviving launcher's next heartbeat
    assert [api.job(i)["state"] for i in ids] == ["RUNNING"] * 4
    deadline = time.monotonic() + SHORT_EXPIRY_SEC * 3 + 5
    while api.ok("GET", "/sessions/", params={"id": [silent]})["count"]:
        assert time.monotonic() < deadline, "the silent session was never swept after the restart"
        api.ok("PUT", f"/sessions/{alive}")
        time.sleep(0.5)
    assert [api.job(i)["state"] for i in kept + lost] == ["RUNNING", "RUNNING", "RUN_TIMEOUT", "RUN_TIMEOUT"]
    api.close()


def test_jobs_of_a_finished_batch_job_say_it_ended_not_that_a_session_expired(api, site_app):
    """A BatchJob the scheduler reports finished (scancel, its wall time) ends its sessions at once:
    the RUNNING jobs' events said "Session expired: job was stuck in RUNNING state" though nothing
    expired; now they say the BatchJob ended. A session left without heartbeats still expires."""
    site, app = site_app
    ids = runnable(api, app["id"], 2)
    bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], "project": "p", "queue": "q", "num_nodes": 1,
                                                   "wall_time_min": 10, "job_mode": "mpi"})
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"], "batch_job_id": bj["id"]})["id"]
    acquire(api, session)
    api.patch_states(ids, "RUNNING")
    for state in ("queued", "running", "finished"):
        api.ok("PUT", f"/batch-jobs/{bj['id']}", 200, json={"state": state})
    assert [api.job(i)["state"] for i in ids] == ["RUN_TIMEOUT", "RUN_TIMEOUT"]
    message = api.events(job_id=ids[0])[0]["data"]["message"]
    assert "BatchJob ended" in message and "expired" not in message, message
