"""Updates sent under a session's lease (``"session_id"`` in a PATCH /jobs/ item): applied only while
that session holds the job, checked with the strict transition table; a user's move of a leased
job ends the lease, so the holder's late updates cannot undo it."""

from __future__ import annotations

import pytest
from server_testlib import runnable

#: What the processing module leases (its hooks' states).
PROCESSABLE = ["STAGED_IN", "RUN_DONE", "RUN_ERROR", "RUN_TIMEOUT"]


def session(api, site_id):
    return api.ok("POST", "/sessions/", 201, json={"site_id": site_id})["id"]


def acquire(api, session_id, **spec):
    body = {"max_num_jobs": 100, "filter_tags": {}, **spec}
    return [j["id"] for j in api.ok("POST", f"/sessions/{session_id}", json=body)]


def refused(api, items, job_id, *texts):
    resp = api.http.patch("/jobs/", json=items)
    assert resp.status_code == 409, resp.text
    body = resp.json()
    assert body["refused_ids"] == [job_id], body
    for text in texts:
        assert text in body["detail"], body
    return body


def test_the_processing_module_cannot_undo_a_users_failed(api, site_app):
    """The processing session holds a RUN_TIMEOUT job; the user fails it; the module's RESTART_READY
    (its default handle_timeout, computed before) is refused and the job stays FAILED."""
    site, app = site_app
    (jid,) = runnable(api, app["id"])
    for state in ("RUNNING", "RUN_TIMEOUT"):
        api.patch_states([jid], state)
    processing = session(api, site["id"])
    assert acquire(api, processing, states=PROCESSABLE) == [jid]
    api.patch_states([jid], "FAILED", state_data={"message": "user gives up"})
    refused(api, [{"id": jid, "state": "RESTART_READY", "session_id": processing}], jid,
            f"job {jid} is no longer held by session {processing} (now: no session)")
    assert api.job(jid)["state"] == "FAILED"
    assert [e["to_state"] for e in api.events(job_id=jid, ordering="timestamp")][-1] == "FAILED"


def test_a_stale_update_of_the_processing_module_does_not_hit_the_next_run(api, site_app):
    """The processing session holds a RUN_ERROR job; the user re-runs it and launcher L takes it;
    the module's stale FAILED is refused, and L's RUNNING and RUN_DONE go through."""
    site, app = site_app
    (jid,) = runnable(api, app["id"])
    for state in ("RUNNING", "RUN_ERROR"):
        api.patch_states([jid], state)
    processing = session(api, site["id"])
    assert acquire(api, processing, states=PROCESSABLE) == [jid]
    api.patch_states([jid], "RESTART_READY")  # a user, while the module's handle_error runs
    launcher = session(api, site["id"])
    assert acquire(api, launcher) == [jid]
    api.ok("PATCH", "/jobs/", json=[{"id": jid, "state": "RUNNING", "session_id": launcher}])
    refused(api, [{"id": jid, "state": "FAILED", "state_data": {"message": "default handle_error"},
                   "session_id": processing}], jid,
            f"job {jid} is no longer held by session {processing} (now: session {launcher})")
    assert api.job(jid)["state"] == "RUNNING"
    api.ok("PATCH", "/jobs/", json=[{"id": jid, "state": "RUN_DONE", "return_code": 0, "session_id": launcher}])
    assert api.job(jid)["state"] == "RUN_DONE"


def test_a_users_move_ends_the_lease_and_the_job_can_be_leased_again(api, site_app):
    site, app = site_app
    ids = runnable(api, app["id"], 2)
    first = session(api, site["id"])
    assert acquire(api, first) == ids
    api.patch_states([ids[0]], "RESTART_READY")  # forced by a user: first's lease on it ends
    # first's RUNNING of that job is refused, alone in its call or with a valid one (all-or-nothing).
    refused(api, [{"id": ids[1], "state": "RUNNING", "session_id": first},
                  {"id": ids[0], "state": "RUNNING", "session_id": first}], ids[0], "no longer held")
    assert [api.job(i)["state"] for i in ids] == ["RESTART_READY", "PREPROCESSED"]
    second = session(api, site["id"])
    # Leased again once first no longer holds it: two of its heartbeats without it (it may have
    # started it; test_requeue_while_running.py).
    assert acquire(api, second) == []
    for _ in range(2):
        assert api.ok("PUT", f"/sessions/{first}", json={"job_ids": [ids[1]]})["gone"] == []
    assert acquire(api, second) == [ids[0]]
    api.ok("PATCH", "/jobs/", json=[{"id": i, "state": "RUNNING", "session_id": s} for i, s in zip(ids, (second, first))])
    # Deleting first times out only its own RUNNING job.
    api.ok("DELETE", f"/sessions/{first}", 204)
    assert [api.job(i)["state"] for i in ids] == ["RUNNING", "RUN_TIMEOUT"]


def test_a_holders_updates_are_checked_strictly_and_may_come_in_groups(api, site_app):
    site, app = site_app
    ids = runnable(api, app["id"], 3)
    launcher = session(api, site["id"])
    assert acquire(api, launcher) == ids
    # Forceable by a user, not by the holder: PREPROCESSED -> RESTART_READY.
    refused(api, [{"id": ids[0], "state": "RESTART_READY", "session_id": launcher}], ids[0],
            "cannot change from PREPROCESSED to RESTART_READY")
    # A short task's RUNNING, RUN_DONE and POSTPROCESSED in one call: all under the lease it held
    # when the call came (its RUN_DONE ends the lease, its POSTPROCESSED still applies).
    api.ok("PATCH", "/jobs/", json=[{"id": ids[0], "state": s, "session_id": launcher}
                                    for s in ("RUNNING", "RUN_DONE", "POSTPROCESSED")])
    assert api.job(ids[0])["state"] == "JOB_FINISHED"
    # A later update of that job under the lease is refused: the lease ended with RUN_DONE.
    refused(api, [{"id": ids[0], "data": {"x": 1}, "session_id": launcher}], ids[0], "(now: no session)")
    # RUNNING keeps the lease: the holder reports the exit in a later call.
    api.ok("PATCH", "/jobs/", json=[{"id": ids[1], "state": "RUNNING", "session_id": launcher}])
    api.ok("PATCH", "/jobs/", json=[{"id": ids[1], "state": "RUN_ERROR", "session_id": launcher}])
    # A user's move and the holder's later one in the same call: the holder's is refused.
    refused(api, [{"id": ids[2], "state": "FAILED"}, {"id": ids[2], "state": "RUNNING", "session_id": launcher}],
            ids[2], "(now: no session)")
    assert api.job(ids[2])["state"] == "PREPROCESSED"


def test_updates_without_a_session_are_unchanged(api, site_app):
    """Users and Balsam 0.7 clients send no session: forced moves as before; a 0.7 launcher's
    RUNNING keeps its lease (its session still times the job out)."""
    site, app = site_app
    ids = runnable(api, app["id"], 2)
    launcher = session(api, site["id"])
    assert acquire(api, launcher) == ids
    api.patch_states(ids, "RUNNING")
    api.patch_states([ids[0]], "RUN_DONE")
    api.patch_states([ids[0]], "RESTART_READY")
    api.ok("DELETE", f"/sessions/{launcher}", 204)
    assert [api.job(i)["state"] for i in ids] == ["RESTART_READY", "RUN_TIMEOUT"]


def test_single_put_and_put_by_filter_carry_a_session_too(api, site_app):
    site, app = site_app
    ids = runnable(api, app["id"], 2)
    launcher = session(api, site["id"])
    assert acquire(api, launcher) == ids
    assert api.ok("PUT", f"/jobs/{ids[0]}", json={"state": "RUNNING", "session_id": launcher}) == 1
    resp = api.http.put(f"/jobs/{ids[0]}", json={"state": "RUN_DONE", "session_id": launcher + 1})
    assert resp.status_code == 409 and resp.json()["refused_ids"] == [ids[0]]
    assert api.ok("PUT", "/jobs/", params={"id": ids}, json={"data": {"k": 1}, "session_id": launcher}) == 2
    api.patch_states([ids[1]], "FAILED")
    resp = api.http.put("/jobs/", params={"id": ids}, json={"data": {"k": 2}, "session_id": launcher})
    assert resp.status_code == 409 and resp.json()["refused_ids"] == [ids[1]]
    assert [api.job(i)["data"] for i in ids] == [{"k": 1}, {"k": 1}]


@pytest.mark.parametrize("value", ["1", None, 1.5, True, 2**63])  # session ids are 64-bit
def test_a_session_id_must_be_an_integer(api, site_app, value):
    _site, app = site_app
    (jid,) = runnable(api, app["id"])
    resp = api.http.patch("/jobs/", json=[{"id": jid, "state": "FAILED", "session_id": value}])
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"] == ["body", 0, "session_id"]
    assert api.job(jid)["state"] == "PREPROCESSED"
