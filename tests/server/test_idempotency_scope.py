"""An Idempotency-Key's record keeps the scope of the credential that made it (migration 0024):
replayed to the user's own credential, and to any credential of the same site (the same token,
renewed, or a new one), never to a launcher of another scope. Records written before the
migration (no scope) replay to the launcher that made them: the server just before hashed the
scope into the request's fingerprint, and a launcher's retry after the upgrade was refused (422:
"already used for a different request"), dropping a pending acquire or a status update."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import sqlalchemy as sa
from server_testlib import Api

from balsam.server.idempotency import request_fingerprint

HEADER = "Idempotency-Key"


@pytest.fixture
def engine(db_kind: str, request: pytest.FixtureRequest) -> Iterator[sa.Engine]:
    """The live server's database (the one ``api`` talks to)."""
    from balsam.server.db import create_db_engine

    live = request.getfixturevalue("_live_server_obj" if db_kind == "sqlite" else "_live_server_pg_obj")
    engine = create_db_engine(live.database_url)
    yield engine
    engine.dispose()


def _launcher(api: Api, token: str) -> httpx.Client:
    return httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def _send(http: httpx.Client, method: str, path: str, body: Any, key: str) -> httpx.Response:
    """The request with ``body`` as exactly these bytes (their fingerprint is computed below)."""
    return http.request(method, path, content=json.dumps(body).encode(),
                        headers={HEADER: key, "Content-Type": "application/json"})


def test_a_launchers_keyed_requests_replay_to_every_credential_of_its_site(api: Api) -> None:
    site = api.site()
    app = api.app(site["id"])
    bj = api.ok("POST", "/batch-jobs/", 201, json={"site_id": site["id"], "project": "p", "queue": "q", "num_nodes": 1,
                                                 "wall_time_min": 30, "job_mode": "mpi"})
    cred = api.ok("POST", "/auth/credentials", 201, json={"site_id": site["id"], "batch_job_id": bj["id"], "ttl_sec": 600})
    renewed = api.ok("POST", f"/auth/credentials/{cred['id']}/renew", json={"ttl_sec": 900})
    other = api.ok("POST", "/auth/credentials", 201, json={"site_id": site["id"], "ttl_sec": 600})
    body = [{"workdir": "keyed/1", "app_id": app["id"]}]
    with _launcher(api, cred["access_token"]) as first, _launcher(api, renewed["access_token"]) as again, \
            _launcher(api, other["access_token"]) as third:
        made = first.post("/jobs/", json=body, headers={HEADER: "create"})
        assert made.status_code == 201, made.text
        job_id = made.json()[0]["id"]
        for http in (first, again, third):  # the same token, renewed, a new credential of the site
            replay = http.post("/jobs/", json=body, headers={HEADER: "create"})
            assert replay.status_code == 201, replay.text
            assert [j["id"] for j in replay.json()] == [job_id]
        session = first.post("/sessions/", json={"site_id": site["id"]}, headers={HEADER: "session"})
        assert session.status_code == 201, session.text
        for http in (again, third):
            replay = http.post("/sessions/", json={"site_id": site["id"]}, headers={HEADER: "session"})
            assert (replay.status_code, replay.json()["id"]) == (201, session.json()["id"]), replay.text
        put = first.put(f"/jobs/{job_id}", json={"data": {"x": 1}}, headers={HEADER: "put"})
        assert put.status_code == 200, put.text
        api.ok("PUT", f"/jobs/{job_id}", json={"data": {"x": 2}})  # changed since: the replay is the answer then
        for http in (again, third):
            replay = http.put(f"/jobs/{job_id}", json={"data": {"x": 1}}, headers={HEADER: "put"})
            assert (replay.status_code, replay.content) == (200, put.content)
        # The user's own credential replays its own keys as before, and the launcher's (the records
        # lie within the user's sites, all of which it reaches); a launcher is refused the user's.
        user_body = [{"workdir": "keyed/2", "app_id": app["id"]}]
        mine = api.ok("POST", "/jobs/", 201, json=user_body, headers={HEADER: "user"})
        assert api.ok("POST", "/jobs/", 201, json=user_body, headers={HEADER: "user"}) == mine
        assert [j["id"] for j in api.ok("POST", "/jobs/", 201, json=body, headers={HEADER: "create"})] == [job_id]
        refused = first.post("/jobs/", json=user_body, headers={HEADER: "user"})
        assert refused.status_code == 422 and "already used for a different request" in refused.text, refused.text


def _as_written_before_0024(engine: sa.Engine, user_id: int, key: str, fingerprint: str) -> None:
    """The key's record as a server before migration 0024 wrote it: the request's plain fingerprint
    (the scope hashed in neither, as before 35a4b0f), no scope (NULL after the upgrade)."""
    with engine.begin() as conn:
        has_scope = "scope" in {c["name"] for c in sa.inspect(conn).get_columns("idempotency_keys")}
        conn.execute(sa.text("UPDATE idempotency_keys SET request_hash = :h" + (", scope = NULL" if has_scope else "")
                             + " WHERE user_id = :u AND key = :k"), {"h": fingerprint, "u": user_id, "k": key})


def test_records_written_before_the_scope_replay_to_their_launcher_only(api: Api, engine: sa.Engine) -> None:
    site1, site2 = api.site(), api.site()
    app1, app2 = api.app(site1["id"]), api.app(site2["id"])
    cred = api.ok("POST", "/auth/credentials", 201, json={"site_id": site1["id"], "ttl_sec": 600})
    renewed = api.ok("POST", f"/auth/credentials/{cred['id']}/renew", json={"ttl_sec": 900})
    create = [{"workdir": "old/1", "app_id": app1["id"]}]
    with _launcher(api, cred["access_token"]) as launcher, _launcher(api, renewed["access_token"]) as again:
        made = _send(launcher, "POST", "/jobs/", create, "old-create")
        assert made.status_code == 201, made.text
        job_id = made.json()[0]["id"]
        update = [{"id": job_id, "data": {"step": 1}}]
        patched = _send(launcher, "PATCH", "/jobs/", update, "old-patch")
        assert patched.status_code == 200, patched.text
        session = _send(launcher, "POST", "/sessions/", {"site_id": site1["id"]}, "old-session")
        assert session.status_code == 201, session.text
        # The user's own records: one of site 1 only (within the launcher's site), one of site 2.
        user_site1 = [{"workdir": "old/2", "app_id": app1["id"]}]
        user_site2 = [{"workdir": "old/3", "app_id": app2["id"]}]
        mine1 = _send(api.http, "POST", "/jobs/", user_site1, "old-user-1")
        mine2 = _send(api.http, "POST", "/jobs/", user_site2, "old-user-2")
        assert mine1.status_code == mine2.status_code == 201
        for key, method, path, body in (("old-create", "POST", "/jobs/", create), ("old-patch", "PATCH", "/jobs/", update),
                                        ("old-session", "POST", "/sessions/", {"site_id": site1["id"]}),
                                        ("old-user-1", "POST", "/jobs/", user_site1),
                                        ("old-user-2", "POST", "/jobs/", user_site2)):
            _as_written_before_0024(engine, api.user_id, key, request_fingerprint(method, path, "", json.dumps(body).encode()))

        api.ok("PUT", f"/jobs/{job_id}", json={"data": {"step": 2}})
        for http in (launcher, again):  # retried after the upgrade, by the token or its renewal
            replay = _send(http, "POST", "/jobs/", create, "old-create")
            assert replay.status_code == 201, replay.text
            assert [j["id"] for j in replay.json()] == [job_id]
            replay = _send(http, "PATCH", "/jobs/", update, "old-patch")
            assert (replay.status_code, replay.content) == (200, patched.content), replay.text
            replay = _send(http, "POST", "/sessions/", {"site_id": site1["id"]}, "old-session")
            assert (replay.status_code, replay.json().get("id")) == (201, session.json()["id"]), replay.text
            replay = _send(http, "POST", "/jobs/", user_site1, "old-user-1")
            assert (replay.status_code, replay.json()) == (201, mine1.json()), replay.text
            # Site 2's job: outside the launcher's site, refused as a different request.
            refused = _send(http, "POST", "/jobs/", user_site2, "old-user-2")
            assert refused.status_code == 422 and "already used for a different request" in refused.text, refused.text
        # The user's own credential replays them all, as before.
        replay = _send(api.http, "POST", "/jobs/", user_site2, "old-user-2")
        assert (replay.status_code, replay.json()) == (201, mine2.json())
        assert _send(api.http, "PATCH", "/jobs/", update, "old-patch").content == patched.content


def test_migration_0024_keeps_the_records_stored_before(tmp_path: Path) -> None:
    """A record written at 0023 is there after the upgrade, its scope NULL; the downgrade keeps it.
    SQLite only (the same nullable ADD COLUMN on PostgreSQL, whose schema up and down
    tests/server/test_migrations.py checks): a scratch PostgreSQL database migrated to 0023 takes
    ~6 s of CI."""
    from alembic import command

    from balsam.server.db import create_db_engine
    from balsam.server.migrate import alembic_config, upgrade

    now = dt.datetime.now(dt.timezone.utc)
    url = f"sqlite:///{tmp_path / 'key_scope.db'}"
    assert upgrade(url, "0023_hold_waiting_stage_ins") == "0023_hold_waiting_stage_ins"
    engine = create_db_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO users (id, username, date_joined) VALUES (1, 'u', :now)"), {"now": now})
            conn.execute(sa.text(
                "INSERT INTO idempotency_keys (user_id, key, request_hash, status_code, resource, resource_ids, "
                "created, expires) VALUES (1, 'k', 'h', 201, 'jobs', '[7]', :now, :now)"), {"now": now})
        assert upgrade(url, "0024_idempotency_key_scope") == "0024_idempotency_key_scope"
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT request_hash, scope FROM idempotency_keys WHERE key = 'k'")).one() == ("h", None)
        command.downgrade(alembic_config(url), "0023_hold_waiting_stage_ins")
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM idempotency_keys WHERE key = 'k'")).scalar() == 1
    finally:
        engine.dispose()
