"""What a deleted user's token gets while a server process still remembers it as good
(``BALSAM_AUTH_REVOCATION_CACHE_SEC``), as docs/security.md says it: never a write, and either the
401 every request soon gets or the answers of a user who owns nothing (empty lists, 404 for their
records; ``POST /sites/`` 401 on PostgreSQL, 404 on SQLite, whose refusal names no table)."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from server_testlib import Api

SITE_CREATE_WITHIN = {"postgresql": "This token's user no longer exists",
                      "sqlite": "A record this request refers to (its site, app, BatchJob or parent jobs) no longer exists"}


def test_a_deleted_users_token_writes_nothing_and_gets_the_documented_answers(db_kind: str, request: pytest.FixtureRequest,
                                                                              register: Any) -> None:
    server = request.getfixturevalue("_live_server_obj" if db_kind == "sqlite" else "_live_server_pg_obj")
    api = Api(server.url, register)
    engine = sa.create_engine(server.database_url)
    try:
        site = api.site()
        (job,) = api.jobs(api.app(site["id"])["id"], 1)
        api.ok("GET", "/sites/")  # the credential is checked and remembered now
        with engine.begin() as conn:
            if db_kind == "sqlite":
                conn.exec_driver_sql("PRAGMA foreign_keys = ON")  # the delete takes the user's records along
            conn.execute(sa.text("DELETE FROM users WHERE id = :id"), {"id": api.user_id})
        # 401 where the process no longer remembers the token (the cache's time passed meanwhile).
        answers = {
            ("POST", "/sites/"): (401 if db_kind == "postgresql" else 404, SITE_CREATE_WITHIN[db_kind]),
            ("GET", "/sites/"): (200, None),
            ("PUT", f"/jobs/{job['id']}"): (404, f"Job not found: {job['id']}"),
            ("POST", "/batch-jobs/"): (404, f"Site {site['id']} not found"),
        }
        bodies = {"/sites/": {"name": "after-delete", "path": "/p/after-delete"}, f"/jobs/{job['id']}": {"tags": {"a": "b"}},
                  "/batch-jobs/": {"site_id": site["id"], "num_nodes": 1, "wall_time_min": 5, "queue": "q",
                                   "project": "p", "job_mode": "mpi"}}
        for (method, path), (status, detail) in answers.items():
            resp = api.http.request(method, path, json=bodies[path] if method != "GET" else None)
            if resp.status_code == 401:
                continue
            assert resp.status_code == status, (method, path, resp.text)
            if detail is not None:
                assert resp.json()["detail"] == detail, (method, path, resp.text)
            else:
                assert resp.json() == {"count": 0, "results": []}, resp.text
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM batch_jobs WHERE site_id = :id"), {"id": site["id"]}).scalar() == 0
            assert conn.execute(sa.text("SELECT count(*) FROM sites WHERE owner_id = :id"), {"id": api.user_id}).scalar() == 0
            assert conn.execute(sa.text("SELECT count(*) FROM jobs WHERE id = :id"), {"id": job["id"]}).scalar() == 0
    finally:
        engine.dispose()
        api.close()
