"""A database failure inside a statement sent on a raw DBAPI cursor (the bulk paths: COPY, one JSON
document per statement, SQLite's executemany) is answered as one inside SQLAlchemy is: 503 with
Retry-After 5 for a lost connection (and the outage noted), 503 with Retry-After 1 for a deadlock,
409 for a conflict. Such errors used to bypass the app's handlers of SQLAlchemy's exceptions and
were answered 500 "Internal server error (OperationalError)" with "Unhandled error" in the log.

The failures are forced, not timed: a side connection locks ``log_events``, the request stops at
its raw-cursor statement writing events, the test waits until PostgreSQL reports it waiting on the
lock, then ends its backend (or closes a deadlock cycle on it)."""

from __future__ import annotations

import uuid
from typing import Any, Iterator

import pytest
import sqlalchemy as sa
from server_testlib import Api
from test_pg_races import blocked_by, call, connect, pid, pool, side, wait_until  # noqa: F401 (pool: a fixture)

KEY = "Idempotency-Key"


@pytest.fixture(scope="module")
def one_server(live_server_factory: Any) -> Any:
    """PostgreSQL behind one worker (its log is the one to read)."""
    return live_server_factory("postgresql")


@pytest.fixture
def api(one_server: Any, register: Any) -> Iterator[Api]:
    client = Api(one_server.url, register)
    yield client
    client.close()


def _waiting_query(watch: Any, backend: int) -> str:
    with watch.cursor() as cur:
        cur.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", (backend,))
        return cur.fetchone()[0]


def _log_since(server: Any, offset: int) -> str:
    return server.log_path.read_bytes()[offset:].decode(errors="replace")


@pytest.mark.postgres
@pytest.mark.parametrize("failure", ["terminate", "deadlock"])
def test_a_failure_inside_the_raw_event_insert_of_an_update_is_503(api: Api, one_server: Any, pool: Any,
                                                                    failure: str) -> None:
    site = api.site()
    app = api.app(site["id"])
    ids = sorted(j["id"] for j in api.jobs(app["id"], 5))
    body = [{"id": i, "state": "PREPROCESSED"} for i in ids]
    key = uuid.uuid4().hex
    log_start = one_server.log_path.stat().st_size
    with side(one_server) as (locker, watch):
        with locker.cursor() as cur:
            if failure == "deadlock":
                cur.execute("SET deadlock_timeout = '60s'")  # the request's backend is to find the cycle
            cur.execute("LOCK TABLE log_events IN ACCESS EXCLUSIVE MODE")
        update = pool.submit(call, api, "PATCH", "/jobs/", json=body, headers={KEY: key})
        backend = wait_until(lambda: blocked_by(watch, {pid(locker)}), "the update to wait for log_events")
        # The update holds its jobs' rows and waits in bulk_insert's raw cursor (the events).
        assert _waiting_query(watch, backend).startswith("INSERT INTO log_events")
        if failure == "terminate":
            with watch.cursor() as cur:
                cur.execute("SELECT pg_terminate_backend(%s)", (backend,))
            resp = update.result()
        else:
            closing = pool.submit(lambda: locker.cursor().execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE",
                                                                  (ids[0],)))
            resp = update.result()  # the update is the deadlock's victim; the locker then gets its row
            closing.result()
        locker.rollback()
    log = _log_since(one_server, log_start)
    assert resp.status_code == 503, resp.text
    if failure == "terminate":
        assert resp.headers["Retry-After"] == "5"
        assert "database is unavailable" in resp.json()["detail"]
        assert "Database unavailable on PATCH /jobs/" in log  # the outage branch, which notes the outage
    else:
        assert resp.headers["Retry-After"] == "1"
        assert "conflicted with a concurrent one" in resp.json()["detail"]
        assert "Transaction conflict on PATCH /jobs/" in log
        assert "Database unavailable" not in log  # a deadlock is no outage
    assert "Unhandled error" not in log, log
    # The client's retry, with the same key, applies the update once: one event per job.
    assert api.ok("PATCH", "/jobs/", json=body, headers={KEY: key}) == 5
    assert api.ok("PATCH", "/jobs/", json=body, headers={KEY: key}) == 5
    events = api.events(job_id=ids, to_state="PREPROCESSED", limit=100)
    assert sorted(e["job_id"] for e in events) == ids
    assert {j["id"]: j["state"] for j in api.ok("GET", "/jobs/", params={"id": ids})["results"]} == \
        dict.fromkeys(ids, "PREPROCESSED")


@pytest.mark.postgres
def test_a_lost_connection_inside_the_copy_of_a_bulk_create_is_503(api: Api, one_server: Any, pool: Any) -> None:
    """The bulk create's raw cursor (ids, COPY of the jobs and of their events, the trigger's
    setting): a connection ended while it waits there is an outage, and the retry creates once."""
    site = api.site()
    app = api.app(site["id"])
    body = [{"workdir": f"copy/{i}", "app_id": app["id"]} for i in range(5)]
    key = uuid.uuid4().hex
    log_start = one_server.log_path.stat().st_size
    with side(one_server) as (locker, watch):
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE log_events IN ACCESS EXCLUSIVE MODE")
        create = pool.submit(call, api, "POST", "/jobs/", json=body, headers={KEY: key})
        backend = wait_until(lambda: blocked_by(watch, {pid(locker)}), "the create to wait for log_events")
        assert _waiting_query(watch, backend).startswith("COPY log_events")
        with watch.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (backend,))
        resp = create.result()
        locker.rollback()
    log = _log_since(one_server, log_start)
    assert resp.status_code == 503, resp.text
    assert resp.headers["Retry-After"] == "5"
    assert "Unhandled error" not in log, log
    first = api.ok("POST", "/jobs/", 201, json=body, headers={KEY: key})
    again = api.ok("POST", "/jobs/", 201, json=body, headers={KEY: key})
    assert [j["id"] for j in first] == [j["id"] for j in again]
    stored = api.ok("GET", "/jobs/", params={"site_id": site["id"], "limit": 100})["results"]
    assert sorted(j["workdir"] for j in stored) == sorted(b["workdir"] for b in body)
    created = api.events(job_id=[j["id"] for j in first], to_state="STAGED_IN", limit=100)
    assert sorted(e["job_id"] for e in created) == sorted(j["id"] for j in first)


def test_raw_cursor_errors_are_sqlalchemy_errors_the_app_answers(database_url: str) -> None:
    """Both databases: a refused statement on a raw cursor raises SQLAlchemy's IntegrityError, and
    SQLite's "database is locked" (another connection holding the write lock; no busy wait) raises
    SQLAlchemy's OperationalError, which the app counts as an outage (503 + Retry-After 5)."""
    from balsam.server.app import _is_db_outage
    from balsam.server.db import create_db_engine, raw_cursor, read_tx, write_tx
    from balsam.server.migrate import upgrade_engine

    engine = create_db_engine(database_url)
    try:
        upgrade_engine(engine)
        marker = "?" if engine.dialect.name == "sqlite" else "%s"
        with engine.connect() as conn:
            with pytest.raises(sa.exc.IntegrityError, match="(?i)foreign key"):
                with conn.begin():
                    with raw_cursor(conn) as cur:
                        cur.execute(f"INSERT INTO log_events (job_id, timestamp, from_state, to_state, data) "
                                    f"VALUES ({marker}, '2026-12-01', 'CREATED', 'STAGED_IN', '{{}}')", (987654,))
            assert conn.execute(sa.text("SELECT count(*) FROM log_events")).scalar_one() == 0
        if engine.dialect.name != "sqlite":
            return
        with write_tx(engine):  # holds SQLite's write lock
            with read_tx(engine) as conn:
                conn.exec_driver_sql("PRAGMA busy_timeout = 0")  # answer at once, not after the timeout
                with pytest.raises(sa.exc.OperationalError, match="database is locked") as caught:
                    with raw_cursor(conn) as cur:
                        cur.execute("DELETE FROM log_events")
                conn.exec_driver_sql("PRAGMA busy_timeout = 60000")
        assert _is_db_outage(caught.value)
    finally:
        engine.dispose()
