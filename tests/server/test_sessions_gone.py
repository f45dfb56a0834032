"""The heartbeat names the held jobs a session lost: ``PUT /sessions/{id}`` with ``{"job_ids": [...]}``
answers ``gone``, those of them the session no longer holds (deleted, moved by their user). A body
without job_ids (Balsam 0.7's ``{}``) is the heartbeat alone, as before."""

from __future__ import annotations

from balsam.models import MAX_JOB_IDS_PER_SESSION_TICK
from server_testlib import runnable


def leased(api, site_id, app_id, n):
    session_id = api.ok("POST", "/sessions/", 201, json={"site_id": site_id})["id"]
    ids = runnable(api, app_id, n)
    got = [j["id"] for j in api.ok("POST", f"/sessions/{session_id}", json={"max_num_jobs": n, "filter_tags": {}})]
    assert sorted(got) == sorted(ids)
    return session_id, sorted(ids)


def test_the_heartbeat_names_deleted_and_moved_jobs(api, site_app):
    site, app = site_app
    session_id, (running, deleted, moved, kept) = leased(api, site["id"], app["id"], 4)
    api.patch_states([running, deleted, moved], "RUNNING")
    before = api.ok("PUT", f"/sessions/{session_id}", json={"job_ids": [running, deleted, moved, kept]})
    assert before["id"] == session_id and before["gone"] == []

    api.ok("DELETE", f"/jobs/{deleted}", 204)  # libEnsemble's BalsamTask.kill()
    api.patch_states([moved], "RUN_TIMEOUT")  # a user's move ends the lease
    answer = api.ok("PUT", f"/sessions/{session_id}", json={"job_ids": [kept, moved, running, deleted, deleted]})
    assert answer["gone"] == [deleted, moved]
    assert answer["heartbeat"] >= before["heartbeat"]
    # A job the session never held is not its own either.
    other = runnable(api, app["id"])[0]
    assert api.ok("PUT", f"/sessions/{session_id}", json={"job_ids": [running, other]})["gone"] == [other]


def test_a_heartbeat_without_job_ids_is_answered_as_before(api, site_app):
    site, app = site_app
    session_id, _ids = leased(api, site["id"], app["id"], 1)
    for kwargs in ({"json": {}}, {}, {"json": {"job_ids": None}}):
        answer = api.ok("PUT", f"/sessions/{session_id}", **kwargs)
        assert set(answer) == {"id", "heartbeat"}, (kwargs, answer)
    assert api.ok("PUT", f"/sessions/{session_id}", json={"job_ids": []})["gone"] == []


def test_a_bad_heartbeat_body_is_a_422_naming_the_field(api, site_app):
    site, app = site_app
    session_id, (job_id,) = leased(api, site["id"], app["id"], 1)
    cases = [
        ({"job_ids": 5}, ["body", "job_ids"]),
        ({"job_ids": [job_id, "7"]}, ["body", "job_ids", 1]),
        ({"job_ids": [True]}, ["body", "job_ids", 0]),
        ({"job_ids": [2**63]}, ["body", "job_ids", 0]),
        ({"job_ids": list(range(MAX_JOB_IDS_PER_SESSION_TICK + 1))}, ["body", "job_ids"]),
        ([job_id], ["body"]),
    ]
    for body, loc in cases:
        resp = api.http.put(f"/sessions/{session_id}", json=body)
        assert resp.status_code == 422, (body if len(str(body)) < 200 else loc, resp.text)
        assert resp.json()["detail"][0]["loc"] == loc, resp.text[:500]
    too_many = api.http.put(f"/sessions/{session_id}", json={"job_ids": list(range(MAX_JOB_IDS_PER_SESSION_TICK + 1))})
    assert f"at most {MAX_JOB_IDS_PER_SESSION_TICK}" in too_many.text
    # The limit itself is fine, and the job is still held.
    at_limit = list(range(1, MAX_JOB_IDS_PER_SESSION_TICK)) + [job_id]
    assert job_id not in api.ok("PUT", f"/sessions/{session_id}", json={"job_ids": at_limit})["gone"]
