"""/transfers/ and /events/: items created with jobs, updates that drive job states, event filters."""

from __future__ import annotations

import datetime as dt

import pytest


@pytest.fixture
def transfer_app(api):
    site = api.site(transfer_locations={"aps": "globus://aps-endpoint", "home": "globus://home-endpoint"})
    app = api.app(site["id"], "Xfer", transfers={
        "input": {"required": True, "direction": "in", "local_path": "input.dat"},
        "extra": {"required": False, "direction": "in", "local_path": ".", "recursive": True},
        "result": {"required": False, "direction": "out", "local_path": "result.dat"},
    })
    return site, app


def test_items_created_with_jobs(api, transfer_app):
    _site, app = transfer_app
    job = api.jobs(app["id"], transfers={"input": "aps:/data/in.dat", "result": {"location_alias": "home", "path": "/out/r.dat"}})[0]
    assert job["state"] == "READY"
    items = api.ok("GET", "/transfers/", params={"job_id": [job["id"]]})["results"]
    assert [(i["direction"], i["state"], i["local_path"], i["remote_path"], i["location_alias"]) for i in items] == [
        ("in", "pending", "input.dat", "/data/in.dat", "aps"),
        ("out", "awaiting_job", "result.dat", "/out/r.dat", "home"),
    ]
    assert api.ok("GET", f"/transfers/{items[0]['id']}") == items[0]


def test_transfer_validation(api, transfer_app):
    _site, app = transfer_app
    cases = [
        ({}, ["body", 0, "transfers", "input"], "required transfer slot"),
        ({"input": "nowhere:/x"}, ["body", 0, "transfers", "input", "location_alias"], "unknown location alias"),
        ({"input": "aps:/x", "bogus": "aps:/y"}, ["body", 0, "transfers", "bogus"], "no such transfer slot"),
        ({"input": "aps:relative/path"}, ["body", 0, "transfers", "input", "path"], "absolute"),
    ]
    for transfers, loc, text in cases:
        resp = api.http.post("/jobs/", json=[{"workdir": "x", "app_id": app["id"], "transfers": transfers}])
        assert resp.status_code == 422, transfers
        detail = resp.json()["detail"][0]
        assert detail["loc"] == loc and text in detail["msg"], detail


def test_stage_in_then_stage_out_and_children(api, transfer_app):
    _site, app = transfer_app
    parent = api.jobs(app["id"], transfers={"input": "aps:/d/in", "extra": "aps:/d/dir", "result": "home:/o/r"})[0]
    child = api.jobs(app["id"], parent_ids=[parent["id"]], transfers={"input": "aps:/d/in2"})[0]
    assert (parent["state"], child["state"]) == ("READY", "AWAITING_PARENTS")
    items = {(i["job_id"], i["direction"], i["local_path"]): i for i in api.ok("GET", "/transfers/")["results"]}
    ins = [items[(parent["id"], "in", "input.dat")], items[(parent["id"], "in", ".")]]

    api.ok("PUT", f"/transfers/{ins[0]['id']}", json={"state": "active", "task_id": "globus:1"})
    api.ok("PATCH", "/transfers/", json=[{"id": ins[0]["id"], "state": "done"}])
    assert api.job(parent["id"])["state"] == "READY"
    updated = api.ok("PATCH", "/transfers/", json=[{"id": ins[1]["id"], "state": "done", "transfer_info": {"bytes": 10}}])
    assert updated[0]["transfer_info"] == {"bytes": 10}
    assert api.job(parent["id"])["state"] == "STAGED_IN"

    for state in ("PREPROCESSED", "RUNNING", "RUN_DONE", "POSTPROCESSED"):
        api.patch_states([parent["id"]], state)
    out = items[(parent["id"], "out", "result.dat")]
    assert api.ok("GET", f"/transfers/{out['id']}")["state"] == "pending"  # stage-out released
    assert api.job(parent["id"])["state"] == "POSTPROCESSED"
    assert api.ok("GET", "/transfers/", params={"direction": "out", "state": ["pending"], "job_state": "POSTPROCESSED"})["count"] == 1

    # Stage-out completion finishes the job AND releases its children (Balsam 0.7 missed this path).
    api.ok("PATCH", "/transfers/", json=[{"id": out["id"], "state": "done"}])
    assert api.job(parent["id"])["state"] == "JOB_FINISHED"
    assert api.job(child["id"])["state"] == "READY"  # its own stage-in is pending
    child_in = api.ok("GET", "/transfers/", params={"job_id": [child["id"]]})["results"][0]
    api.ok("PUT", f"/transfers/{child_in['id']}", json={"state": "done"})
    assert api.job(child["id"])["state"] == "STAGED_IN"
    history = [(e["from_state"], e["to_state"]) for e in api.events(job_id=parent["id"], ordering="timestamp")]
    assert history[0] == ("CREATED", "READY") and ("READY", "STAGED_IN") in history
    assert history[-1] == ("POSTPROCESSED", "JOB_FINISHED")


def test_run_done_and_postprocessed_in_one_call_release_stage_out_or_finish(api, transfer_app):
    """What a launcher sends for a job whose app keeps the default postprocess: RUN_DONE, then
    POSTPROCESSED, in one PATCH. The server does what it does for two calls: stage-out items go
    pending (the job waits in POSTPROCESSED), a job without them finishes and frees its children."""
    _site, app = transfer_app
    staged = api.jobs(app["id"], transfers={"input": "aps:/d/in", "result": "home:/o/r"})[0]
    plain = api.jobs(app["id"], transfers={"input": "aps:/d/in"})[0]
    child = api.jobs(app["id"], parent_ids=[plain["id"]], transfers={"input": "aps:/d/in2"})[0]
    ids = [staged["id"], plain["id"]]
    stage_in = api.ok("GET", "/transfers/", params={"job_id": ids, "direction": "in"})["results"]
    api.ok("PATCH", "/transfers/", json=[{"id": i["id"], "state": "done"} for i in stage_in])
    assert [api.job(i)["state"] for i in ids] == ["STAGED_IN", "STAGED_IN"]
    for state in ("PREPROCESSED", "RUNNING"):
        api.patch_states(ids, state)
    stamp = dt.datetime.now(dt.timezone.utc).isoformat()  # the exit's time, on both events
    api.ok("PATCH", "/jobs/", json=[u for i in ids for u in (
        {"id": i, "state": "RUN_DONE", "state_timestamp": stamp, "return_code": 0},
        {"id": i, "state": "POSTPROCESSED", "state_timestamp": stamp})])
    assert api.job(staged["id"])["state"] == "POSTPROCESSED"
    out = api.ok("GET", "/transfers/", params={"job_id": [staged["id"]], "direction": "out"})["results"][0]
    assert out["state"] == "pending"
    assert api.job(plain["id"])["state"] == "JOB_FINISHED"
    assert api.job(child["id"])["state"] == "READY"  # released; its own stage-in is pending
    history = [(e["from_state"], e["to_state"]) for e in api.events(job_id=plain["id"], ordering="timestamp")]
    assert history[-3:] == [("RUNNING", "RUN_DONE"), ("RUN_DONE", "POSTPROCESSED"), ("POSTPROCESSED", "JOB_FINISHED")]


def test_item_in_error_fails_its_job_with_the_reason(api, transfer_app):
    """An item in ``error`` (its tries used up) moves its job to FAILED with the error in the event,
    in either direction; a job already done is left alone."""
    _site, app = transfer_app
    a = api.jobs(app["id"], transfers={"input": "aps:/d/a", "result": "home:/o/a"})[0]
    b = api.jobs(app["id"], transfers={"input": "aps:/d/b", "result": "home:/o/b"})[0]
    items = {(i["job_id"], i["direction"]): i for i in api.ok("GET", "/transfers/")["results"]}
    info = {"error": "no such file or directory: /d/a", "attempts": 3}
    api.ok("PATCH", "/transfers/", json=[{"id": items[(a["id"], "in")]["id"], "state": "error", "transfer_info": info}])
    assert api.job(a["id"])["state"] == "FAILED"
    last = api.events(job_id=a["id"], ordering="timestamp")[-1]
    assert (last["from_state"], last["to_state"]) == ("READY", "FAILED")
    assert last["data"]["error"] == info["error"] and last["data"]["attempts"] == 3
    assert last["data"]["message"] == "Transfer failed: stage-in of aps:/d/a to input.dat: no such file or directory: /d/a"

    api.ok("PATCH", "/transfers/", json=[{"id": items[(b["id"], "in")]["id"], "state": "done"}])
    for state in ("PREPROCESSED", "RUNNING", "RUN_DONE", "POSTPROCESSED"):
        api.patch_states([b["id"]], state)
    api.ok("PATCH", "/transfers/", json=[{"id": items[(b["id"], "out")]["id"], "state": "error",
                                          "transfer_info": {"error": "permission denied"}}])
    assert api.job(b["id"])["state"] == "FAILED"
    last = api.events(job_id=b["id"], ordering="timestamp")[-1]
    assert last["data"]["message"] == "Transfer failed: stage-out of result.dat to home:/o/b: permission denied"
    # Again on a FAILED job: no second event.
    api.ok("PATCH", "/transfers/", json=[{"id": items[(b["id"], "out")]["id"], "state": "error"}])
    assert len([e for e in api.events(job_id=b["id"]) if e["to_state"] == "FAILED"]) == 1


def test_a_rerun_stages_out_again_after_a_failed_or_done_stage_out(api, transfer_app):
    """A job FAILED by its stage-out (item in ``error``), re-run by the user: at its next
    POSTPROCESSED the item is ``pending`` again with its tries forgotten, and the job finishes once
    it is done. So is an item ``done`` by an earlier run: the re-run's files are staged out too."""
    _site, app = transfer_app
    job = api.jobs(app["id"], transfers={"input": "aps:/d/in", "result": "home:/o/r"})[0]
    jid = job["id"]
    items = {i["direction"]: i for i in api.ok("GET", "/transfers/", params={"job_id": [jid]})["results"]}
    api.ok("PATCH", "/transfers/", json=[{"id": items["in"]["id"], "state": "done"}])
    out = items["out"]["id"]

    def run_to_postprocessed():
        for state in ("PREPROCESSED", "RUNNING", "RUN_DONE", "POSTPROCESSED"):
            api.patch_states([jid], state)

    run_to_postprocessed()
    api.ok("PATCH", "/transfers/", json=[{"id": out, "state": "active", "task_id": "globus:1"}])
    api.ok("PATCH", "/transfers/", json=[{"id": out, "state": "error", "task_id": "",
                                          "transfer_info": {"error": "boom", "attempts": 3, "bytes": 5}}])
    assert api.job(jid)["state"] == "FAILED"
    api.patch_states([jid], "RESTART_READY")
    for state in ("RUNNING", "RUN_DONE", "POSTPROCESSED"):
        api.patch_states([jid], state)
    assert api.job(jid)["state"] == "POSTPROCESSED"
    item = api.ok("GET", f"/transfers/{out}")
    assert (item["state"], item["task_id"], item["transfer_info"]) == ("pending", "", {"bytes": 5})
    api.ok("PATCH", "/transfers/", json=[{"id": out, "state": "done"}])
    assert api.job(jid)["state"] == "JOB_FINISHED"

    # Done, and re-run again (a user's RESTART_READY): the stage-out is not skipped.
    api.patch_states([jid], "RESTART_READY")
    for state in ("RUNNING", "RUN_DONE", "POSTPROCESSED"):
        api.patch_states([jid], state)
    assert api.job(jid)["state"] == "POSTPROCESSED"
    assert api.ok("GET", f"/transfers/{out}")["state"] == "pending"
    # The stage-in item is not touched (a re-run does not stage in again).
    assert api.ok("GET", f"/transfers/{items['in']['id']}")["state"] == "done"
    history = [(e["from_state"], e["to_state"]) for e in api.events(job_id=jid, ordering="timestamp")]
    assert history[-1] == ("RUN_DONE", "POSTPROCESSED")


def test_a_rerun_after_a_failed_stage_in_stages_in_again(api, transfer_app):
    """A job FAILED by its stage-in, re-run by the user (RESTART_READY, what the docs say to do):
    a launcher ran it without its inputs. It now goes back to READY, its failed item pending with
    fresh tries, its done items left done; once staged in it goes on as a new job does."""
    _site, app = transfer_app
    job = api.jobs(app["id"], transfers={"input": "aps:/d/in", "extra": "aps:/d/extra"})[0]
    jid = job["id"]
    items = {i["local_path"]: i for i in api.ok("GET", "/transfers/", params={"job_id": [jid]})["results"]}
    inp, extra = items["input.dat"]["id"], items["."]["id"]
    api.ok("PATCH", "/transfers/", json=[{"id": extra, "state": "done"}])
    api.ok("PATCH", "/transfers/", json=[{"id": inp, "state": "error", "task_id": "",
                                          "transfer_info": {"error": "no such file", "attempts": 3, "bytes": 0}}])
    assert api.job(jid)["state"] == "FAILED"
    api.patch_states([jid], "RESTART_READY")
    assert api.job(jid)["state"] == "READY"
    assert api.ok("GET", f"/transfers/{inp}")["state"] == "pending"
    assert api.ok("GET", f"/transfers/{inp}")["transfer_info"] == {"bytes": 0}
    assert api.ok("GET", f"/transfers/{extra}")["state"] == "done"
    history = [(e["from_state"], e["to_state"]) for e in api.events(job_id=jid, ordering="timestamp")]
    assert history[-2:] == [("FAILED", "RESTART_READY"), ("RESTART_READY", "READY")]
    api.ok("PATCH", "/transfers/", json=[{"id": inp, "state": "done"}])
    assert api.job(jid)["state"] == "STAGED_IN"
    # A re-run of a job whose stage-in was done is not staged again.
    for state in ("PREPROCESSED", "RUNNING", "RUN_ERROR", "FAILED", "RESTART_READY"):
        api.patch_states([jid], state)
    assert api.job(jid)["state"] == "RESTART_READY"


def test_transfer_filters_and_errors(api, transfer_app):
    site, app = transfer_app
    j1 = api.jobs(app["id"], tags={"t": "1"}, transfers={"input": "aps:/a"})[0]
    j2 = api.jobs(app["id"], tags={"t": "2"}, transfers={"input": "aps:/b", "result": "home:/c"})[0]

    def count(**params):
        return api.ok("GET", "/transfers/", params=params)["count"]

    assert count() == 3 and count(site_id=site["id"]) == 3
    assert count(tags="t:2") == 2 and count(direction="in") == 2 and count(state=["awaiting_job"]) == 1
    assert count(job_id=[j1["id"], j2["id"]]) == 3 and count(job_state="READY") == 3
    first = api.ok("GET", "/transfers/", params={"limit": 1})["results"][0]
    assert count(id=[first["id"]]) == 1
    resp = api.http.put(f"/transfers/{first['id']}", json={"state": "teleported"})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "state"]
    resp = api.http.put(f"/transfers/{first['id']}", json={"remote_path": "/elsewhere"})
    assert resp.status_code == 422 and resp.json()["detail"][0]["msg"] == "cannot be changed"
    resp = api.http.patch("/transfers/", json=[{"id": first["id"], "state": "done"}, {"id": 99999999, "state": "done"}])
    assert resp.status_code == 404 and api.ok("GET", f"/transfers/{first['id']}")["state"] == "pending"
    assert api.http.get("/transfers/", params={"direction": "sideways"}).status_code == 422
    # ordering=state: in-flight items (active, inactive) come before pending ones, then by id.
    ids = [t["id"] for t in api.ok("GET", "/transfers/", params={"ordering": "id"})["results"]]
    api.ok("PATCH", "/transfers/", json=[{"id": ids[-1], "state": "active", "task_id": "local:1"}])
    by_state = [(t["state"], t["id"]) for t in api.ok("GET", "/transfers/", params={"ordering": "state"})["results"]]
    assert by_state[0] == ("active", ids[-1]) and [i for _, i in by_state[1:]] == sorted(ids[:-1])
    assert [t["id"] for t in api.ok("GET", "/transfers/", params={"ordering": "-id"})["results"]] == ids[::-1]
    assert api.http.get("/transfers/", params={"ordering": "size"}).status_code == 422


def test_event_filters(api, site_app):
    site, app = site_app
    bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], "project": "p", "queue": "q", "num_nodes": 1,
                                                  "wall_time_min": 5, "job_mode": "mpi"})
    api.ok("PUT", f"/batch-jobs/{bj['id']}", json={"scheduler_id": 9001})
    jobs = api.jobs(app["id"], 2, tags={"e": "1"})
    other = api.jobs(app["id"], 1, tags={"e": "2"})[0]
    ids = [j["id"] for j in jobs]
    api.patch_states(ids, "PREPROCESSED")
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"], "batch_job_id": bj["id"]})
    api.ok("POST", f"/sessions/{session['id']}", json={"max_num_jobs": 10, "filter_tags": {"e": "1"}})
    api.ok("PATCH", "/jobs/", json=[{"id": i, "state": "RUNNING", "state_data": {"num_nodes": 1}} for i in ids])
    api.ok("PATCH", "/jobs/", json=[{"id": ids[0], "state": "RUN_ERROR", "state_data": {"returncode": 1, "error": "boom"},
                                     "state_timestamp": "2030-01-01T00:00:00Z"}])

    def count(**params):
        return api.ok("GET", "/events/", params=params)["count"]

    assert count(job_id=ids) == 7
    assert count(to_state="RUNNING") == 2 and count(from_state="RUNNING") == 1
    assert count(batch_job_id=bj["id"]) == 7 and count(scheduler_id=9001) == 7
    assert count(tags="e:2") == 1 and count(data="error:boom") == 1 and count(data="num_nodes:1") == 2
    assert count(data=["returncode:1", "error:boom"]) == 1 and count(data="error:bo") == 0
    assert count(timestamp_after="2029-12-31T00:00:00Z") == 1
    assert count(timestamp_before="2029-12-31T00:00:00Z", job_id=[ids[0]]) == 3
    newest = api.ok("GET", "/events/", params={"limit": 1})["results"][0]
    assert newest["to_state"] == "RUN_ERROR" and newest["data"] == {"returncode": 1, "error": "boom"}
    oldest = api.ok("GET", "/events/", params={"ordering": "timestamp", "limit": 1, "job_id": [other["id"]]})["results"][0]
    assert (oldest["from_state"], oldest["to_state"]) == ("CREATED", "STAGED_IN")
    assert api.http.get("/events/", params={"to_state": "LOST"}).status_code == 422
    assert api.http.post("/events/", json={}).status_code == 405
