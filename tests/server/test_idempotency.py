"""Exactly-once creates and acquires: the Idempotency-Key header (SQLite and PostgreSQL).

Without the key, a POST whose answer is lost and is then resent is applied twice (3 jobs asked
for, 6 stored); these tests send the same key twice, as the client does when it retries.
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
