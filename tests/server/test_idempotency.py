"""Exactly-once creates, acquires, updates and deletes: the Idempotency-Key header (SQLite and
PostgreSQL).

Without the key, a POST whose answer is lost and is then resent is applied twice (3 jobs asked
for, 6 stored), and a resent PUT, PATCH or DELETE is refused for the change the first one made (409,
404); these tests send the same key twice, as the client does when it retries.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from server_testlib import Api, create_jobs_at_once

KEY = "Idempotency-Key"


def post_twice(api: Api, path: str, body: Any, status: int = 201) -> tuple[Any, Any]:
    key = uuid.uuid4().hex
    first = api.ok("POST", path, status, json=body, headers={KEY: key})
    again = api.ok("POST", path, status, json=body, headers={KEY: key})
    return first, again


def count(api: Api, path: str, **params: Any) -> int:
    return api.ok("GET", path, params={"limit": 0, **params})["count"]


def test_a_retried_job_create_stores_the_jobs_once(api: Api, site_app: tuple[dict, dict]) -> None:
    _site, app = site_app
    body = [{"workdir": f"once/{i}", "app_id": app["id"]} for i in range(3)]
    first, again = post_twice(api, "/jobs/", body)
    assert [j["id"] for j in again] == [j["id"] for j in first]
    assert [j["workdir"] for j in again] == ["once/0", "once/1", "once/2"]
    assert count(api, "/jobs/", app_id=app["id"]) == 3
    # The creation events are not doubled either.
    assert len(api.events(job_id=[j["id"] for j in first])) == 3


def test_retried_site_app_batch_job_and_session_creates_are_applied_once(api: Api) -> None:
    name = f"idem-{uuid.uuid4().hex[:6]}"
    site, site_again = post_twice(api, "/sites/", {"name": name, "path": f"/p/{name}"})
    assert site_again == site
    assert count(api, "/sites/", name=name) == 1

    app_body = {"site_id": site["id"], "name": "Once", "serialized_class": "eA==", "source_code": "class Once: ..."}
    app, app_again = post_twice(api, "/apps/", app_body)
    assert app_again["id"] == app["id"]
    assert count(api, "/apps/", site_id=site["id"]) == 1

    bj_body = {"site_id": site["id"], "num_nodes": 1, "wall_time_min": 5, "job_mode": "mpi", "queue": "q", "project": "p"}
    bj, bj_again = post_twice(api, "/batch-jobs/", bj_body)
    assert bj_again["id"] == bj["id"]
    assert count(api, "/batch-jobs/", site_id=site["id"]) == 1  # no duplicate allocation

    session, session_again = post_twice(api, "/sessions/", {"site_id": site["id"], "batch_job_id": bj["id"]})
    assert session_again["id"] == session["id"]
    assert [s["id"] for s in api.ok("GET", "/sessions/")["results"]] == [session["id"]]


def test_a_key_reused_for_a_different_request_is_refused(api: Api, site_app: tuple[dict, dict]) -> None:
    _site, app = site_app
    key = uuid.uuid4().hex
    api.ok("POST", "/jobs/", 201, json=[{"workdir": "k/1", "app_id": app["id"]}], headers={KEY: key})
    resp = api.http.post("/jobs/", json=[{"workdir": "k/2", "app_id": app["id"]}], headers={KEY: key})
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert detail[0]["loc"] == ["header", KEY] and "different request" in detail[0]["msg"]
    assert count(api, "/jobs/", app_id=app["id"]) == 1


def test_keys_are_per_user(api: Api, other_api: Api) -> None:
    key = uuid.uuid4().hex
    mine = api.ok("POST", "/sites/", 201, json={"name": "same-key", "path": "/a"}, headers={KEY: key})
    theirs = other_api.ok("POST", "/sites/", 201, json={"name": "same-key", "path": "/a"}, headers={KEY: key})
    assert mine["id"] != theirs["id"]


def test_a_replay_of_a_deleted_record_says_so(api: Api) -> None:
    key = uuid.uuid4().hex
    site = api.ok("POST", "/sites/", 201, json={"name": "gone-soon", "path": "/g"}, headers={KEY: key})
    api.ok("DELETE", f"/sites/{site['id']}", 204)
    resp = api.http.post("/sites/", json={"name": "gone-soon", "path": "/g"}, headers={KEY: key})
    assert resp.status_code == 409 and "deleted since" in resp.json()["detail"], resp.text


def test_a_replayed_bulk_create_some_of_whose_jobs_were_deleted_says_so(api: Api, site_app: tuple[dict, dict]) -> None:
    """Before: 201 with the jobs still there, a shorter list that no longer lined up with the request."""
    _site, app = site_app
    body = [{"workdir": f"gone/{i}", "app_id": app["id"]} for i in range(3)]
    key = uuid.uuid4().hex
    ids = [job["id"] for job in api.ok("POST", "/jobs/", 201, json=body, headers={KEY: key})]
    api.ok("DELETE", f"/jobs/{ids[1]}", 204)
    for prefer in ({}, {"Prefer": "return=minimal"}):
        resp = api.http.post("/jobs/", json=body, headers={KEY: key, **prefer})
        assert resp.status_code == 409, resp.text
        assert "deleted since" in resp.json()["detail"] and str(ids[1]) in resp.json()["detail"]
    assert count(api, "/jobs/", app_id=app["id"]) == 2  # nothing was created again


def _acquire(api: Api, session_id: int, key: str, n: int = 10) -> list[int]:
    body = {"max_num_jobs": n, "states": ["PREPROCESSED"], "filter_tags": {}}
    return [j["id"] for j in api.ok("POST", f"/sessions/{session_id}", json=body, headers={KEY: key})]


def _runnable_jobs_and_session(api: Api, site_app: tuple[dict, dict], count: int) -> tuple[list[int], dict]:
    site, app = site_app
    ids = [j["id"] for j in api.jobs(app["id"], count)]
    api.patch_states(ids, "PREPROCESSED")
    return ids, api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})


def test_a_retried_acquire_returns_the_same_jobs(api: Api, site_app: tuple[dict, dict]) -> None:
    ids, session = _runnable_jobs_and_session(api, site_app, 5)
    key = uuid.uuid4().hex
    leased = _acquire(api, session["id"], key)
    assert sorted(leased) == ids
    # The answer was lost; the launcher resends the same request: the same jobs, not an empty list.
    assert _acquire(api, session["id"], key) == leased
    # A new request finds nothing left: every job went to this session exactly once.
    assert _acquire(api, session["id"], uuid.uuid4().hex) == []
    # A job that left the session since (a user forced it back) is not handed out again.
    api.ok("PUT", f"/jobs/{ids[0]}", json={"state": "RESTART_READY"})
    assert _acquire(api, session["id"], key) == leased[1:]


def test_a_replayed_acquire_of_an_expired_session_is_not_found(api: Api, site_app: tuple[dict, dict]) -> None:
    ids, session = _runnable_jobs_and_session(api, site_app, 2)
    site = site_app[0]
    key = uuid.uuid4().hex
    assert sorted(_acquire(api, session["id"], key)) == ids
    api.ok("DELETE", f"/sessions/{session['id']}", 204)  # as the expiry sweep does: the jobs are free again
    resp = api.http.post(f"/sessions/{session['id']}", json={"max_num_jobs": 10}, headers={KEY: key})
    assert resp.status_code == 404
    other = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})
    assert sorted(_acquire(api, other["id"], uuid.uuid4().hex)) == ids


def test_concurrent_duplicates_are_applied_once(api: Api, site_app: tuple[dict, dict]) -> None:
    """A retry that arrives while the original is still being applied waits for it, then replays."""
    _site, app = site_app
    key = uuid.uuid4().hex
    body = [{"workdir": f"race/{i}", "app_id": app["id"]} for i in range(200)]

    answers = create_jobs_at_once(api, body, key)
    assert all(a == answers[0] for a in answers)
    assert count(api, "/jobs/", app_id=app["id"]) == 200


@pytest.fixture
def short_ttl_api(db_kind: str, live_server_factory: Any, register: Any) -> Any:
    server = live_server_factory(db_kind, env={"BALSAM_IDEMPOTENCY_TTL_SEC": "1", "BALSAM_SESSION_SWEEP_SEC": "1"})
    client = Api(server.url, register)
    yield client
    client.close()


def test_keys_expire(short_ttl_api: Api) -> None:
    import time

    api = short_ttl_api
    key = uuid.uuid4().hex
    first = api.ok("POST", "/sites/", 201, json={"name": "ttl-1", "path": "/t"}, headers={KEY: key})
    time.sleep(1.5)  # the TTL itself is what is tested: past it the key starts a new life
    second = api.ok("POST", "/sites/", 201, json={"name": "ttl-2", "path": "/t"}, headers={KEY: key})
    assert second["id"] != first["id"]


# -- updates and deletes (PUT, PATCH, DELETE): the routing layer claims the key and records the answer


def send_twice(api: Api, method: str, path: str, status: int = 200, **kwargs: Any) -> tuple[Any, Any]:
    """The same update or delete twice with one key, as the client resends one whose answer was
    lost: both answers, as raw responses (bodies and statuses compared byte for byte)."""
    headers = {KEY: uuid.uuid4().hex}
    first = api.http.request(method, path, headers=headers, **kwargs)
    again = api.http.request(method, path, headers=headers, **kwargs)
    assert first.status_code == status, f"{method} {path} -> {first.status_code}: {first.text}"
    return first, again


def _run_done_job(api: Api, app_id: int) -> int:
    (job_id,) = [j["id"] for j in api.jobs(app_id, 1)]
    for state in ("PREPROCESSED", "RUNNING", "RUN_DONE"):
        api.ok("PUT", f"/jobs/{job_id}", json={"state": state})
    return job_id


def _transitions(api: Api, job_id: int) -> list[tuple[str, str]]:
    return sorted((e["from_state"], e["to_state"]) for e in api.events(job_id=job_id))


def test_a_replayed_state_change_answers_as_the_first_did(api: Api, site_app: tuple[dict, dict]) -> None:
    """POSTPROCESSED: the server finishes the job at once, so a resend without the record was
    refused (409 "cannot change from JOB_FINISHED to POSTPROCESSED") for a change it had applied."""
    _site, app = site_app
    job_id = _run_done_job(api, app["id"])
    first, again = send_twice(api, "PUT", f"/jobs/{job_id}", json={"state": "POSTPROCESSED"})
    assert (again.status_code, again.content, again.headers["content-type"]) == \
        (first.status_code, first.content, first.headers["content-type"])
    assert api.job(job_id)["state"] == "JOB_FINISHED"
    assert _transitions(api, job_id).count(("RUN_DONE", "POSTPROCESSED")) == 1
    assert _transitions(api, job_id).count(("POSTPROCESSED", "JOB_FINISHED")) == 1
    # The same resend without a key is applied again, and refused: what the record prevents.
    resp = api.http.put(f"/jobs/{job_id}", json={"state": "POSTPROCESSED"})
    assert resp.status_code == 409 and "JOB_FINISHED" in resp.text, resp.text


def test_a_replayed_bulk_patch_answers_its_count(api: Api, site_app: tuple[dict, dict]) -> None:
    _site, app = site_app
    ids = [_run_done_job(api, app["id"]) for _ in range(3)]
    body = [{"id": i, "state": "POSTPROCESSED"} for i in ids]
    first, again = send_twice(api, "PATCH", "/jobs/", json=body)
    assert first.json() == again.json() == 3
    assert {api.job(i)["state"] for i in ids} == {"JOB_FINISHED"}
    for job_id in ids:
        assert _transitions(api, job_id).count(("POSTPROCESSED", "JOB_FINISHED")) == 1
    # A query update (PUT /jobs/?filters) too.
    tag = uuid.uuid4().hex[:8]
    more = [j["id"] for j in api.jobs(app["id"], 2, tags={"q": tag})]
    first, again = send_twice(api, "PUT", "/jobs/", params={"tags": f"q:{tag}"}, json={"state": "PREPROCESSED"})
    assert first.json() == again.json() == 2
    assert {api.job(i)["state"] for i in more} == {"PREPROCESSED"}


def test_replayed_deletes_answer_as_the_first_did(api: Api, site_app: tuple[dict, dict]) -> None:
    """Without the record: 404 "Job N not found", and a count of 0 for the jobs the first one deleted."""
    site, app = site_app
    (job_id,) = [j["id"] for j in api.jobs(app["id"], 1)]
    first, again = send_twice(api, "DELETE", f"/jobs/{job_id}", 204)
    assert again.status_code == 204 and again.content == b""
    assert api.http.get(f"/jobs/{job_id}").status_code == 404

    tag = uuid.uuid4().hex[:8]
    api.jobs(app["id"], 2, tags={"d": tag})
    first, again = send_twice(api, "DELETE", "/jobs/", params={"tags": f"d:{tag}"})
    assert first.json() == again.json() == 2
    assert count(api, "/jobs/", app_id=app["id"]) == 0

    bj_body = {"site_id": site["id"], "num_nodes": 1, "wall_time_min": 5, "job_mode": "mpi", "queue": "q", "project": "p"}
    bj = api.ok("POST", "/batch-jobs/", 201, json=bj_body)
    _first, again = send_twice(api, "DELETE", f"/batch-jobs/{bj['id']}", 204)
    assert again.status_code == 204
    _first, again = send_twice(api, "DELETE", f"/apps/{app['id']}", 204)
    assert again.status_code == 204
    _first, again = send_twice(api, "DELETE", f"/sites/{site['id']}", 204)
    assert again.status_code == 204
    assert count(api, "/sites/", id=site["id"]) == 0


def test_a_replayed_record_update_answers_the_record_as_it_was(api: Api, site_app: tuple[dict, dict]) -> None:
    site, _app = site_app
    first, again = send_twice(api, "PUT", f"/sites/{site['id']}", json={"allowed_projects": ["one"]})
    api.ok("PUT", f"/sites/{site['id']}", json={"allowed_projects": ["two"]})
    again = api.http.put(f"/sites/{site['id']}", json={"allowed_projects": ["one"]}, headers={KEY: first.request.headers[KEY]})
    assert again.status_code == 200 and again.json() == first.json()
    assert first.json()["allowed_projects"] == ["one"]
    # Replayed, not applied: a later change stays.
    assert api.ok("GET", f"/sites/{site['id']}")["allowed_projects"] == ["two"]


def test_an_update_key_reused_for_a_different_request_is_refused(api: Api, site_app: tuple[dict, dict]) -> None:
    _site, app = site_app
    ids = [j["id"] for j in api.jobs(app["id"], 2)]
    key = uuid.uuid4().hex
    api.ok("PUT", f"/jobs/{ids[0]}", json={"state": "PREPROCESSED"}, headers={KEY: key})
    for method, path, body in (("PUT", f"/jobs/{ids[0]}", {"state": "RESTART_READY"}),  # another body
                               ("PUT", f"/jobs/{ids[1]}", {"state": "PREPROCESSED"}),  # another path
                               ("PATCH", "/jobs/", [{"id": ids[1], "state": "PREPROCESSED"}]),
                               ("DELETE", f"/jobs/{ids[1]}", None)):
        resp = api.http.request(method, path, json=body, headers={KEY: key})
        assert resp.status_code == 422, resp.text
        assert resp.json()["detail"][0]["loc"] == ["header", KEY] and "different request" in resp.text
    assert [api.job(i)["state"] for i in ids] == ["PREPROCESSED", "STAGED_IN"]  # nothing applied
    # A create's key on an update is another request too.
    site_key = uuid.uuid4().hex
    site = api.ok("POST", "/sites/", 201, json={"name": "k-site", "path": "/k"}, headers={KEY: site_key})
    resp = api.http.put(f"/sites/{site['id']}", json={"name": "k-site-2"}, headers={KEY: site_key})
    assert resp.status_code == 422, resp.text


def test_a_refused_update_leaves_its_key_for_the_retry(api: Api) -> None:
    """Only an applied request is recorded: a refusal rolls the claim back with everything else."""
    one, two = api.site(), api.site()
    key = uuid.uuid4().hex
    resp = api.http.put(f"/sites/{one['id']}", json={"name": two["name"]}, headers={KEY: key})
    assert resp.status_code == 409, resp.text
    api.ok("DELETE", f"/sites/{two['id']}", 204)
    renamed = api.ok("PUT", f"/sites/{one['id']}", json={"name": two["name"]}, headers={KEY: key})
    assert renamed["name"] == two["name"]


def test_heartbeats_ignore_the_key(api: Api, site_app: tuple[dict, dict]) -> None:
    """PUT /sessions/{id} is applied each time (a later heartbeat, never an old answer): it is
    harmless twice and the most frequent write, so it writes no key."""
    import time

    site, _app = site_app
    session = api.ok("POST", "/sessions/", 201, json={"site_id": site["id"]})
    key = uuid.uuid4().hex
    first = api.ok("PUT", f"/sessions/{session['id']}", headers={KEY: key})
    time.sleep(0.05)
    again = api.ok("PUT", f"/sessions/{session['id']}", headers={KEY: key})
    assert again["heartbeat"] > first["heartbeat"]
    # Ending the session is recorded: a resend is answered 204, not 404.
    _first, again_end = send_twice(api, "DELETE", f"/sessions/{session['id']}", 204)
    assert again_end.status_code == 204


def test_concurrent_duplicate_updates_are_applied_once(api: Api, site_app: tuple[dict, dict]) -> None:
    """A resend that arrives while the first is being applied waits for it, then gets its answer
    (not a 409 for a state change the first one made)."""
    import concurrent.futures

    import httpx

    _site, app = site_app
    ids = [_run_done_job(api, app["id"]) for _ in range(20)]
    body = [{"id": i, "state": "POSTPROCESSED"} for i in ids]
    headers = {"Authorization": f"Bearer {api.token}", KEY: uuid.uuid4().hex}

    def patch() -> tuple[int, Any]:
        with httpx.Client(base_url=api.url, headers=headers, timeout=120) as http:
            resp = http.patch("/jobs/", json=body)
            return resp.status_code, resp.json()

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: patch(), range(6)))
    assert answers == [(200, 20)] * 6
    assert len(api.events(job_id=ids, to_state="JOB_FINISHED", limit=100)) == 20
