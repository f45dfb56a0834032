"""A launcher's DELETE recorded before migration 0024 (no scope) and retried after it: what it
deleted is gone, so nothing proves that it lay in the launcher's site (the only way a scope-less
record is replayed to a launcher credential). The retry was refused as "already used for a
different request" (422, false: it is the same request): a launcher closing its Session warned
that it could not delete it. Now a delete by id is answered as a fresh request within the
launcher's site (404 for a record gone: the launcher's Session close takes it as "already gone"),
and a query delete is never run again (it deleted the matching jobs made since): its recorded
count is replayed, or 409 when its answer named jobs left RUNNING (their ids may be another
site's). The records stay as they were: the user's own credential still replays them. SQLite and
PostgreSQL."""

from __future__ import annotations

import uuid
from typing import Any, Iterator

import httpx
import pytest
import sqlalchemy as sa
from server_testlib import Api

from balsam.server.tables import idempotency_keys

HEADER = "Idempotency-Key"


@pytest.fixture
def engine(db_kind: str, request: pytest.FixtureRequest) -> Iterator[sa.Engine]:
    """The live server's database (the one ``api`` talks to)."""
    from balsam.server.db import create_db_engine

    live = request.getfixturevalue("_live_server_obj" if db_kind == "sqlite" else "_live_server_pg_obj")
    engine = create_db_engine(live.database_url)
    yield engine
    engine.dispose()


def _as_written_before_0024(engine: sa.Engine, user_id: int, keys: list[str]) -> None:
    """The keys' records as a server before migration 0024 wrote them: no scope (NULL after the
    upgrade); their fingerprint is the request's, as it is now."""
    with engine.begin() as conn:
        for key in keys:
            assert conn.execute(sa.text("UPDATE idempotency_keys SET scope = NULL WHERE user_id = :u AND key = :k"),
                                {"u": user_id, "k": key}).rowcount == 1


@pytest.fixture
def live_log(db_kind: str, request: pytest.FixtureRequest) -> Any:
    """The live server's log (``.log_path``)."""
    return request.getfixturevalue("_live_server_obj" if db_kind == "sqlite" else "_live_server_pg_obj").log_path


def test_a_launchers_delete_recorded_before_0024_is_answered_afresh(api: Api, engine: sa.Engine, live_log: Any) -> None:
    site = api.site()
    app = api.app(site["id"])
    cred = api.ok("POST", "/auth/credentials", 201, json={"site_id": site["id"], "ttl_sec": 600})
    tag = uuid.uuid4().hex[:8]
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {cred['access_token']}"},
                      timeout=60) as launcher:
        made = launcher.post("/sessions/", json={"site_id": site["id"]})
        assert made.status_code == 201, made.text
        session_id = made.json()["id"]
        made = launcher.post("/jobs/", json=[{"workdir": "gone/1", "app_id": app["id"]},
                                             {"workdir": "gone/2", "app_id": app["id"], "tags": {"d": tag}}])
        assert made.status_code == 201, made.text
        job_id = made.json()[0]["id"]
        deletes = {"session": ("DELETE", f"/sessions/{session_id}", None),
                   "job": ("DELETE", f"/jobs/{job_id}", None),
                   "query": ("DELETE", "/jobs/", {"tags": f"d:{tag}"})}
        first = {}
        for key, (method, path, params) in deletes.items():
            first[key] = launcher.request(method, path, params=params, headers={HEADER: key + tag})
            assert first[key].status_code in (200, 204), first[key].text
        assert first["query"].json() == 1
        _as_written_before_0024(engine, api.user_id, [key + tag for key in deletes])
        # A job matching the query delete, made after it: its retry must not delete it.
        since = api.jobs(app["id"], 1, prefix="made-since", tags={"d": tag})[0]

        for key, (method, path, params) in deletes.items():
            again = launcher.request(method, path, params=params, headers={HEADER: key + tag})
            if key == "query":  # its recorded answer again, nothing deleted
                assert (again.status_code, again.content) == (200, first[key].content), again.text
            else:  # gone: what a fresh delete answers, nothing deleted
                assert again.status_code == 404, again.text
                assert "not found" in again.text
        assert api.http.get(f"/jobs/{since['id']}").status_code == 200
        # The query delete's retry neither took nor renewed the key that was not its own (it warned
        # that its claim had lapsed and another request took it).
        assert not [line for line in live_log.read_text(errors="replace").splitlines() if f"query{tag}" in line]
        # The records stay as they were: the user's own credential replays the first answers.
        for key, (method, path, params) in deletes.items():
            replay = api.http.request(method, path, params=params, headers={HEADER: key + tag})
            assert (replay.status_code, replay.content) == (first[key].status_code, first[key].content), key
        # The same key on another request is still refused.
        refused = launcher.delete(f"/jobs/{job_id + 1}", headers={HEADER: "job" + tag})
        assert refused.status_code == 422 and "already used for a different request" in refused.text, refused.text


def test_a_launchers_query_delete_that_skipped_running_jobs_is_refused_not_replayed(api: Api, engine: sa.Engine) -> None:
    """Its Balsam-Skipped-Running header names jobs that may be another site's, and its count
    without them is not the answer: 409, and nothing is deleted (the job made since stays)."""
    site = api.site()
    app = api.app(site["id"])
    cred = api.ok("POST", "/auth/credentials", 201, json={"site_id": site["id"], "ttl_sec": 600})
    tag = uuid.uuid4().hex[:8]
    key = "skipped" + tag
    query = {"tags": f"d:{tag}"}
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {cred['access_token']}"},
                      timeout=60) as launcher:
        first = launcher.delete("/jobs/", params=query, headers={HEADER: key})
        assert (first.status_code, first.json()) == (200, 0), first.text
        # As a server before 0024 recorded an answer that left a RUNNING job out (of another site).
        skipped = [["Balsam-Skipped-Running", "count=1; ids=7"]]
        with engine.begin() as conn:
            assert conn.execute(sa.update(idempotency_keys).where(
                idempotency_keys.c.user_id == api.user_id, idempotency_keys.c.key == key,
            ).values(answer_headers=skipped)).rowcount == 1
        _as_written_before_0024(engine, api.user_id, [key])
        since = api.jobs(app["id"], 1, prefix="made-since", tags={"d": tag})[0]

        again = launcher.delete("/jobs/", params=query, headers={HEADER: key})
        assert again.status_code == 409, again.text
        detail = again.json()["detail"]
        assert "recorded before the server's upgrade" in detail and "resend with a new key" in detail
        assert "\n" not in detail and "Balsam-Skipped-Running" not in again.headers
    assert api.http.get(f"/jobs/{since['id']}").status_code == 200
    # The user's own credential replays the record, header and all.
    replay = api.http.delete("/jobs/", params=query, headers={HEADER: key})
    assert (replay.status_code, replay.json()) == (200, 0)
    assert replay.headers["Balsam-Skipped-Running"] == "count=1; ids=7"
