"""A launcher's DELETE recorded before migration 0024 (no scope) and retried after it: what it
deleted is gone, so nothing proves that it lay in the launcher's site (the only way a scope-less
record is replayed to a launcher credential). The retry was refused as "already used for a
different request" (422, false: it is the same request): a launcher closing its Session warned
that it could not delete it. Now it is answered as a fresh request within the launcher's site (404
for a record gone: "already gone" to our clients; a query delete's count of what matches now), and
the record stays as it was: the user's own credential still replays it. SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from typing import Any, Iterator

import httpx
import pytest
import sqlalchemy as sa
from server_testlib import Api

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


def test_a_launchers_delete_recorded_before_0024_is_answered_afresh(api: Api, engine: sa.Engine) -> None:
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

        for key, (method, path, params) in deletes.items():
            again = launcher.request(method, path, params=params, headers={HEADER: key + tag})
            if key == "query":  # what matches now: nothing (the job the first one deleted is gone)
                assert (again.status_code, again.json()) == (200, 0), again.text
            else:  # gone: what a fresh delete answers, nothing deleted
                assert again.status_code == 404, again.text
                assert "not found" in again.text
        # The records stay as they were: the user's own credential replays the first answers.
        for key, (method, path, params) in deletes.items():
            replay = api.http.request(method, path, params=params, headers={HEADER: key + tag})
            assert (replay.status_code, replay.content) == (first[key].status_code, first[key].content), key
        # The same key on another request is still refused.
        refused = launcher.delete(f"/jobs/{job_id + 1}", headers={HEADER: "job" + tag})
        assert refused.status_code == 422 and "already used for a different request" in refused.text, refused.text
