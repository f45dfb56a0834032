"""A bulk create whose jobs name more distinct parents than SQLite's bound-parameter limit.

SQLite builds with the default ``SQLITE_MAX_VARIABLE_NUMBER`` (32,766 since 3.32; the Debian build
the CI uses raises it to 250,000) refused the create's parent check, which sent every parent id as
its own bound parameter (``IN (?, ?, ...)``): a campaign's reduction step over 33,000 simulations,
or 3,300 stage-2 jobs of 10 parents each, got 500 ("too many SQL variables") instead of its jobs.
The check now sends the ids as one parameter (``= ANY(array)`` on PostgreSQL, ``json_each`` on
SQLite), as the server's other id lists do. The limit is set on the server's SQLite connections to
that default, so the test means the same on any build (SQLite only: PostgreSQL's client library
interpolated the list, which only cost time there: benchmarks/dag_dependencies.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from server_testlib import create_site_and_app, logged_in_test_client

SECRET = "dag-many-parents-test-secret-0123456789-abcdefgh"
#: SQLite's default SQLITE_MAX_VARIABLE_NUMBER since 3.32.0.
SQLITE_DEFAULT_MAX_VARIABLES = 32_766
PARENTS = SQLITE_DEFAULT_MAX_VARIABLES + 234  # 33,000
CHUNK = 5_000


def _default_sqlite_limit(engine: sa.Engine) -> None:
    """Every new connection of ``engine`` (SQLite) gets the default bound-parameter limit."""
    @event.listens_for(engine, "connect")
    def _limit(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, SQLITE_DEFAULT_MAX_VARIABLES)

    engine.dispose()  # the connections already pooled are opened again, with the limit


def _create(client: Any, jobs: list[dict]) -> list[dict]:
    made: list[dict] = []
    for start in range(0, len(jobs), CHUNK):
        resp = client.post("/jobs/", json=jobs[start:start + CHUNK])
        assert resp.status_code == 201, resp.text[:500]
        made.extend(resp.json())
    return made


def _finish(client: Any, ids: list[int]) -> None:
    steps = ("PREPROCESSED", "RUNNING", "RUN_DONE", "POSTPROCESSED")  # POSTPROCESSED: no stage-out, JOB_FINISHED
    per_call = CHUNK // len(steps)
    for start in range(0, len(ids), per_call):
        body = [{"id": i, "state": s} for i in ids[start:start + per_call] for s in steps]
        resp = client.patch("/jobs/", json=body)
        assert resp.status_code == 200, resp.text[:500]


def test_jobs_naming_more_parents_than_sqlites_parameter_limit_are_created_and_released(tmp_path: Path) -> None:
    with logged_in_test_client(f"sqlite:///{tmp_path / 'balsam.db'}", SECRET) as (client, app):
        _default_sqlite_limit(app.state.engine)
        _, app_id = create_site_and_app(client)
        parents = [j["id"] for j in _create(client, [{"workdir": f"sim/{i}", "app_id": app_id} for i in range(PARENTS)])]

        # One reduction over all of them, and 3,300 stage-2 jobs of 10 parents each, in one request.
        reduce_ = {"workdir": "reduce", "app_id": app_id, "parent_ids": parents}
        stage2 = [{"workdir": f"stage2/{k}", "app_id": app_id, "parent_ids": parents[k * 10:(k + 1) * 10]}
                  for k in range(PARENTS // 10)]
        resp = client.post("/jobs/", json=[reduce_, *stage2[:CHUNK - 1]])
        assert resp.status_code == 201, resp.text[:500]
        children = resp.json()
        assert {j["state"] for j in children} == {"AWAITING_PARENTS"}
        assert children[0]["parent_ids"] == parents
        assert children[1]["parent_ids"] == parents[:10]

        # A parent that is not the user's is still refused by name.
        resp = client.post("/jobs/", json=[{"workdir": "bad", "app_id": app_id, "parent_ids": [*parents, 10 ** 12]}])
        assert resp.status_code == 404, resp.text[:500]
        assert resp.json()["detail"] == f"Parent job not found: {10 ** 12}"

        # The first stage-2 job's parents finish: it goes on; the reduction waits for the rest.
        _finish(client, parents[:10])
        ids = [j["id"] for j in children[:2]]
        states = client.get("/jobs/", params={"id": ids, "limit": 10}).json()["results"]
        assert [(j["id"], j["state"]) for j in states] == [(ids[0], "AWAITING_PARENTS"), (ids[1], "STAGED_IN")]
