"""/sites/ and /apps/: CRUD, filters, validation, cascades and tenancy."""

from __future__ import annotations

import datetime as dt


def test_site_crud_and_filters(api):
    site = api.site("theta", allowed_projects=["proj"], transfer_locations={"aps": "globus://abc-123"},
                    allowed_queues={"debug": {"max_nodes": 8, "max_walltime": 60, "max_queued_jobs": 1}})
    assert site["name"] == "theta" and site["path"] == "/projects/theta"
    assert site["allowed_queues"]["debug"]["max_nodes"] == 8
    assert site["creation_date"] and site["last_refresh"]
    other = api.site("cori")

    listing = api.ok("GET", "/sites/")
    assert listing["count"] == 2 and [s["id"] for s in listing["results"]] == [site["id"], other["id"]]
    assert api.ok("GET", "/sites/", params={"name": "cori"})["results"][0]["id"] == other["id"]
    assert api.ok("GET", "/sites/", params={"path": "thet"})["count"] == 1
    assert api.ok("GET", "/sites/", params={"id": [other["id"]]})["count"] == 1
    assert api.ok("GET", "/sites/", params={"limit": 1, "offset": 1})["results"][0]["id"] == other["id"]
    future = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)).isoformat()
    assert api.ok("GET", "/sites/", params={"last_refresh_after": future})["count"] == 0

    before = site["last_refresh"]
    updated = api.ok("PUT", f"/sites/{site['id']}", json={
        "backfill_windows": {"debug": [{"num_nodes": 4, "wall_time_min": 30}]},
        "queued_jobs": {"123": {"scheduler_id": 123, "state": "queued", "queue": "debug", "num_nodes": 1,
                                "wall_time_min": 5, "project": "p", "time_remaining_min": 5, "queued_time_min": 1}},
    })
    assert updated["backfill_windows"] == {"debug": [{"num_nodes": 4, "wall_time_min": 30}]}
    assert updated["queued_jobs"]["123"]["state"] == "queued"
    # a 0.7 agent's status (no message) is accepted, and answered in 0.7's format (no empty message)
    assert "message" not in updated["queued_jobs"]["123"]
    waiting = api.ok("PUT", f"/sites/{site['id']}", json={
        "queued_jobs": {"124": {"scheduler_id": 124, "state": "queued", "queue": "debug", "num_nodes": 9,
                                "wall_time_min": 5, "project": "p", "time_remaining_min": 5, "queued_time_min": 1,
                                "message": "PartitionNodeLimit"}},
    })
    assert waiting["queued_jobs"]["124"]["message"] == "PartitionNodeLimit"
    assert api.ok("GET", f"/sites/{site['id']}")["queued_jobs"] == waiting["queued_jobs"]
    assert updated["last_refresh"] > before
    assert api.ok("GET", f"/sites/{site['id']}")["backfill_windows"] == updated["backfill_windows"]

    api.ok("DELETE", f"/sites/{other['id']}", 204)
    assert api.http.get(f"/sites/{other['id']}").status_code == 404


def test_site_validation(api):
    api.site("dup")
    resp = api.http.post("/sites/", json={"name": "dup", "path": "/x"})
    assert resp.status_code == 409 and "already exists" in resp.json()["detail"]
    resp = api.http.post("/sites/", json={"name": "rel", "path": "relative/path"})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "path"]
    resp = api.http.post("/sites/", json={"name": "x", "path": "/x", "allowed_queues": {"q": {"max_nodes": "many"}}})
    assert resp.status_code == 422
    locs = [e["loc"] for e in resp.json()["detail"]]
    assert ["body", "allowed_queues", "q", "max_nodes"] in locs
    resp = api.http.post("/sites/", json={"path": "/x"})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "name"]
    # Limits that refuse every BatchJob: settings.yml's rule, also on the API (a direct PUT took them).
    site = api.site("limits")
    resp = api.http.put(f"/sites/{site['id']}", json={"allowed_queues": {"q": {"max_nodes": 0, "max_walltime": -3,
                                                                               "max_queued_jobs": -1}}})
    assert resp.status_code == 422
    assert sorted(e["loc"][-1] for e in resp.json()["detail"]) == ["max_nodes", "max_queued_jobs", "max_walltime"]
    assert api.ok("PUT", f"/sites/{site['id']}", json={"allowed_queues": {"q": {"max_nodes": 1, "max_walltime": 1,
                                                                                "max_queued_jobs": 0}}})
    resp = api.http.put("/sites/999999", json={"name": "x"})
    assert resp.status_code == 404
    resp = api.http.get("/sites/abc")
    assert resp.status_code == 422


def test_app_crud_filters_and_uniqueness(api):
    site = api.site("s1")
    site2 = api.site("s2")
    app = api.app(site["id"], "Hello", parameters={"name": {"required": True}, "greeting": {"required": False, "default": "hi", "help": "word"}},
                  transfers={"input": {"required": False, "direction": "in", "local_path": "in.txt"}})
    assert app["parameters"]["greeting"] == {"required": False, "default": "hi", "help": "word"}
    assert app["transfers"]["input"]["direction"] == "in" and app["transfers"]["input"]["recursive"] is False
    app2 = api.app(site2["id"], "Hello")
    assert api.ok("GET", "/apps/")["count"] == 2
    assert api.ok("GET", "/apps/", params={"site_id": site["id"]})["results"][0]["id"] == app["id"]
    assert api.ok("GET", "/apps/", params={"site_name": "s2"})["results"][0]["id"] == app2["id"]
    assert api.ok("GET", "/apps/", params={"site_path": "/projects/s1"})["count"] == 1
    assert api.ok("GET", "/apps/", params={"name": "Hello", "id": [app["id"], app2["id"]]})["count"] == 2

    resp = api.http.post("/apps/", json={"site_id": site["id"], "name": "Hello", "serialized_class": "", "source_code": ""})
    assert resp.status_code == 409 and resp.json()["detail"] == "An app with this site_id and name already exists"
    api.app(site["id"], "Other")
    resp = api.http.put(f"/apps/{app['id']}", json={"name": "Other"})
    assert resp.status_code == 409
    renamed = api.ok("PUT", f"/apps/{app['id']}", json={"name": "Renamed", "description": "doc"})
    assert renamed["name"] == "Renamed" and renamed["description"] == "doc"
    resp = api.http.put(f"/apps/{app['id']}", json={"site_id": site2["id"]})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "site_id"]
    resp = api.http.post("/apps/", json={"site_id": site["id"], "name": "not an identifier", "serialized_class": "", "source_code": ""})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "name"]
    resp = api.http.post("/apps/", json={"site_id": 999999, "name": "X", "serialized_class": "", "source_code": ""})
    assert resp.status_code == 404


def test_deleting_a_site_cascades(api):
    site = api.site()
    app = api.app(site["id"])
    jobs = api.jobs(app["id"], 3)
    bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], "project": "p", "queue": "q", "num_nodes": 1,
                                                  "wall_time_min": 5, "job_mode": "mpi"})
    api.ok("DELETE", f"/sites/{site['id']}", 204)
    assert api.http.get(f"/apps/{app['id']}").status_code == 404
    assert api.http.get(f"/jobs/{jobs[0]['id']}").status_code == 404
    assert api.http.get(f"/batch-jobs/{bj['id']}").status_code == 404
    assert api.ok("GET", "/events/", params={"job_id": jobs[0]["id"]})["count"] == 0


def test_deleting_an_app_deletes_its_jobs(api, site_app):
    _site, app = site_app
    jobs = api.jobs(app["id"], 2)
    api.ok("DELETE", f"/apps/{app['id']}", 204)
    assert api.ok("GET", "/jobs/", params={"id": [j["id"] for j in jobs]})["count"] == 0


def test_users_cannot_see_or_touch_each_other(api, other_api):
    site = api.site("mine")
    app = api.app(site["id"])
    job = api.jobs(app["id"])[0]
    bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], "project": "p", "queue": "q", "num_nodes": 1,
                                                  "wall_time_min": 5, "job_mode": "mpi"})
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})

    for path in ("/sites/", "/apps/", "/jobs/", "/batch-jobs/", "/sessions/", "/events/", "/transfers/"):
        assert other_api.ok("GET", path)["count"] == 0, path
    for path in (f"/sites/{site['id']}", f"/apps/{app['id']}", f"/jobs/{job['id']}", f"/batch-jobs/{bj['id']}"):
        assert other_api.http.get(path).status_code == 404, path
        assert other_api.http.put(path, json={}).status_code == 404, path
        assert other_api.http.delete(path).status_code == 404, path
    # Creating things that point into another user's data is refused with 404 as well.
    assert other_api.http.post("/apps/", json={"site_id": site["id"], "name": "X", "serialized_class": "", "source_code": ""}).status_code == 404
    assert other_api.http.post("/jobs/", json=[{"workdir": "x", "app_id": app["id"]}]).status_code == 404
    assert other_api.http.post("/batch-jobs/", json={"site_id": site["id"], "project": "p", "queue": "q", "num_nodes": 1,
                                                     "wall_time_min": 5, "job_mode": "mpi"}).status_code == 404
    assert other_api.http.post("/sessions/", json={"site_id": site["id"]}).status_code == 404
    assert other_api.http.post(f"/sessions/{session['id']}", json={"max_num_jobs": 5, "filter_tags": {}}).status_code == 404
    assert other_api.http.put(f"/sessions/{session['id']}").status_code == 404
    assert other_api.http.delete(f"/sessions/{session['id']}").status_code == 404
    assert other_api.http.patch("/jobs/", json=[{"id": job["id"], "state": "FAILED"}]).status_code == 404
    assert other_api.http.patch("/batch-jobs/", json=[{"id": bj["id"], "state": "queued"}]).status_code == 404
    # Filters never reach other users' rows.
    assert other_api.ok("PUT", "/jobs/", params={"id": [job["id"]]}, json={"data": {"x": 1}}) == 0
    assert other_api.ok("DELETE", "/jobs/", params={"id": [job["id"]]}) == 0
    # A user may reuse another user's site name.
    other_api.site("mine")
    assert api.job(job["id"])["data"] == {}
