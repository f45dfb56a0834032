"""The references to apps and jobs hold on both databases: SQLite through its foreign keys,
PostgreSQL through the statement triggers of migration 0007 (checked and cascaded once per
statement). Same answers on both: a missing app or job is refused, deleting an app or a job
removes what refers to it, a referenced id cannot change; on PostgreSQL the triggers' locks make a
concurrent delete wait for an insert that refers to its row, and an insert wait for (then fail
after) a delete of the row it refers to."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import sqlalchemy as sa

from balsam.server.jobs_logic import EVENTS_OF_NEW_JOBS_SETTING, bulk_create_jobs, parse_job_creates
from balsam.server.tables import jobs
from server_testlib import create_site_and_app, logged_in_test_client


SECRET = "fk-triggers-test-secret-0123456789-abcdefghijklmnop"
MISSING = 987654


@pytest.fixture
def api(database_url: str) -> Iterator[dict[str, Any]]:
    with logged_in_test_client(database_url, SECRET) as (client, app):
        _, app_id = create_site_and_app(client)
        parent = client.post("/jobs/", json=[{"workdir": "p", "app_id": app_id}]).json()[0]["id"]
        child = client.post("/jobs/", json=[{"workdir": "c", "app_id": app_id, "parent_ids": [parent]}]).json()[0]["id"]
        with app.state.engine.begin() as conn:  # a transfer item of the child, straight into the table
            conn.exec_driver_sql(
                "INSERT INTO transfer_items (job_id, direction, local_path, remote_path, location_alias, recursive, "
                f"state, task_id, transfer_info) VALUES ({child}, 'in', 'a', '/b', 'x', false, 'pending', '', '{{}}')")
        yield {"client": client, "engine": app.state.engine, "app_id": app_id, "parent": parent, "child": child}


def _count(conn: sa.Connection, sql: str) -> int:
    return conn.exec_driver_sql(sql).scalar_one()


def _copy_job_sql(job_id: int, app_id: int, **values: str) -> str:
    """An INSERT of a copy of a job (every column but the id), with another app and workdir, and
    the SQL ``values`` of some columns by name."""
    names = [c.name for c in jobs.columns if c.name != "id"]
    values = {"app_id": str(app_id), "workdir": "workdir || '-copy'", **values}
    values = [values.get(n, n) for n in names]
    return f"INSERT INTO jobs ({', '.join(names)}) SELECT {', '.join(values)} FROM jobs WHERE id = {job_id}"


@pytest.mark.parametrize("statement", [
    "INSERT INTO log_events (job_id, timestamp, from_state, to_state, data) "
    f"SELECT {MISSING}, timestamp, from_state, to_state, data FROM log_events LIMIT 1",
    "UPDATE log_events SET job_id = {MISSING}",
    "INSERT INTO job_parents (child_id, parent_id) VALUES ({child}, {MISSING})",
    "UPDATE transfer_items SET job_id = {MISSING}",
    "UPDATE jobs SET app_id = {MISSING} WHERE id = {child}",
    "UPDATE jobs SET id = {MISSING} WHERE id = {parent}",
    "UPDATE apps SET id = {MISSING}",
    "COPY",
], ids=["event-of-missing-job", "event-moved-to-missing-job", "link-to-missing-parent",
        "item-moved-to-missing-job", "job-moved-to-missing-app", "referenced-job-id-changed",
        "referenced-app-id-changed", "job-of-missing-app"])
def test_missing_references_are_refused(api: dict, statement: str) -> None:
    if statement == "COPY":
        statement = _copy_job_sql(api["child"], MISSING)
    statement = statement.replace("{MISSING}", str(MISSING)).format(**api)
    with pytest.raises(sa.exc.IntegrityError):
        with api["engine"].begin() as conn:
            conn.exec_driver_sql(statement)
    with api["engine"].begin() as conn:  # the same statements with what exists pass
        conn.exec_driver_sql(_copy_job_sql(api["child"], api["app_id"]))
        conn.exec_driver_sql(f"UPDATE jobs SET app_id = {api['app_id']} WHERE id = {api['child']}")


def test_one_bulk_statement_with_one_missing_reference_is_refused(api: dict) -> None:
    with pytest.raises(sa.exc.IntegrityError, match="log_events"):
        with api["engine"].begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO log_events (job_id, timestamp, from_state, to_state, data) "
                f"SELECT j, now(), 'A', 'B', '{{}}' FROM (VALUES ({api['parent']}), ({api['child']}), ({MISSING})) AS v(j)"
                if api["engine"].dialect.name == "postgresql" else
                "INSERT INTO log_events (job_id, timestamp, from_state, to_state, data) "
                f"SELECT column1, '2026-01-01', 'A', 'B', '{{}}' FROM (VALUES ({api['parent']}), ({api['child']}), ({MISSING}))")
    with api["engine"].connect() as conn:
        assert _count(conn, "SELECT count(*) FROM log_events WHERE from_state = 'A'") == 0


def test_deleting_a_job_removes_its_events_links_and_transfer_items(api: dict) -> None:
    engine, parent, child = api["engine"], api["parent"], api["child"]
    with engine.connect() as conn:
        assert _count(conn, f"SELECT count(*) FROM log_events WHERE job_id IN ({parent}, {child})") == 2
        assert _count(conn, "SELECT count(*) FROM job_parents") == 1
    assert api["client"].delete(f"/jobs/{parent}").status_code == 204
    with engine.connect() as conn:
        assert _count(conn, f"SELECT count(*) FROM log_events WHERE job_id = {parent}") == 0
        assert _count(conn, "SELECT count(*) FROM job_parents") == 0  # by its parent
        assert _count(conn, f"SELECT count(*) FROM log_events WHERE job_id = {child}") >= 1
    assert api["client"].delete(f"/jobs/{child}").status_code == 204
    with engine.connect() as conn:
        for table in ("log_events", "transfer_items", "jobs"):
            assert _count(conn, f"SELECT count(*) FROM {table}") == 0, table


def test_deleting_an_app_removes_its_jobs_and_all_that_refers_to_them(api: dict) -> None:
    assert api["client"].delete(f"/apps/{api['app_id']}").status_code == 204
    with api["engine"].connect() as conn:
        for table in ("jobs", "log_events", "job_parents", "transfer_items"):
            assert _count(conn, f"SELECT count(*) FROM {table}") == 0, table


@pytest.mark.postgres
def test_pg_insert_and_delete_of_the_referenced_row_wait_for_each_other(api: dict) -> None:
    engine, parent, child = api["engine"], api["parent"], api["child"]
    if engine.dialect.name != "postgresql":
        pytest.skip("the lock order is PostgreSQL's (SQLite serializes writers)")
    event = ("INSERT INTO log_events (job_id, timestamp, from_state, to_state, data) "
             "VALUES ({}, now(), 'A', 'B', '{{}}')")
    # An open insert referring to the parent: its delete cannot proceed (it would wait; here it
    # gives up at once), and once the insert commits, the delete removes the new event too.
    with engine.connect() as inserter, engine.connect() as deleter:
        inserter.exec_driver_sql(event.format(parent))
        deleter.exec_driver_sql("SET LOCAL lock_timeout = '50ms'")
        with pytest.raises(sa.exc.OperationalError, match="lock timeout"):
            deleter.exec_driver_sql(f"DELETE FROM jobs WHERE id = {parent}")
        deleter.rollback()
        inserter.commit()
        deleter.exec_driver_sql(f"DELETE FROM jobs WHERE id = {parent}")
        deleter.commit()
    with engine.connect() as conn:
        assert _count(conn, f"SELECT count(*) FROM log_events WHERE job_id = {parent}") == 0
    # An open delete of the child: an insert referring to it waits, and fails once the delete commits.
    with engine.connect() as deleter, engine.connect() as inserter:
        deleter.exec_driver_sql(f"DELETE FROM jobs WHERE id = {child}")
        inserter.exec_driver_sql("SET LOCAL lock_timeout = '50ms'")
        with pytest.raises(sa.exc.OperationalError, match="lock timeout"):
            inserter.exec_driver_sql(event.format(child))
        inserter.rollback()
        deleter.commit()
        with pytest.raises(sa.exc.IntegrityError, match="fk_log_events_job_id_jobs"):
            inserter.exec_driver_sql(event.format(child))
    with engine.connect() as conn:
        assert _count(conn, "SELECT count(*) FROM log_events") == 0


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # what only its statement triggers do
def test_pg_created_events_skip_the_check_and_nothing_after_them_does(api: dict) -> None:
    """A bulk create's created events skip the check of their jobs (migration 0011: the server has
    just written those jobs), by a setting on for that one COPY: an event of a missing job written
    later in the same transaction is still refused, and so is one in any other transaction."""
    engine = api["engine"]
    bad_event = ("INSERT INTO log_events (job_id, timestamp, from_state, to_state, data) "
                 f"VALUES ({MISSING}, now(), 'A', 'B', '{{}}')")
    with engine.connect() as conn:
        user_id = conn.exec_driver_sql("SELECT id FROM users").scalar_one()
        created = bulk_create_jobs(conn, user_id, parse_job_creates(
            [{"workdir": f"new/{i}", "app_id": api["app_id"]} for i in range(3)]))
        ids = ", ".join(str(job["id"]) for job in created)
        assert _count(conn, f"SELECT count(*) FROM log_events WHERE job_id IN ({ids}) AND to_state = 'STAGED_IN'") == 3
        assert conn.exec_driver_sql(f"SELECT current_setting('{EVENTS_OF_NEW_JOBS_SETTING}')").scalar_one() == "off"
        with pytest.raises(sa.exc.IntegrityError, match="fk_log_events_job_id_jobs"):
            conn.exec_driver_sql(bad_event)
        conn.rollback()
    # What the setting does, and only within its transaction.
    with engine.connect() as conn:
        conn.exec_driver_sql(f"SELECT set_config('{EVENTS_OF_NEW_JOBS_SETTING}', 'on', true)")
        conn.exec_driver_sql(bad_event)
        conn.rollback()
        with pytest.raises(sa.exc.IntegrityError, match="fk_log_events_job_id_jobs"):
            conn.exec_driver_sql(bad_event)


@pytest.fixture
def leased(api: dict) -> dict[str, Any]:
    """``api`` plus a BatchJob and a session of it, through the API, and the parent job leased to
    them by an acquire (the statement that sets both references)."""
    client = api["client"]
    site_id = client.get(f"/apps/{api['app_id']}").json()["site_id"]
    batch_job = client.post("/batch-jobs/", json={"site_id": site_id, "project": "p", "queue": "q", "num_nodes": 1,
                                                  "wall_time_min": 10, "job_mode": "serial"}).json()["id"]
    session = client.post("/sessions/", json={"site_id": site_id, "batch_job_id": batch_job}).json()["id"]
    assert client.patch("/jobs/", json=[{"id": api["parent"], "state": "PREPROCESSED"}]).status_code == 200
    got = client.post(f"/sessions/{session}", json={"max_num_jobs": 10, "filter_tags": {}}).json()
    assert [job["id"] for job in got] == [api["parent"]]
    with api["engine"].connect() as conn:
        assert conn.exec_driver_sql(f"SELECT session_id, batch_job_id FROM jobs WHERE id = {api['parent']}").one() == (
            session, batch_job)
    return {**api, "session": session, "batch_job": batch_job}


@pytest.mark.parametrize("statement", [
    "UPDATE jobs SET session_id = {MISSING} WHERE id = {child}",
    "UPDATE jobs SET batch_job_id = {MISSING} WHERE id = {child}",
    "UPDATE jobs SET session_id = {MISSING}, state = 'RUNNING' WHERE id IN ({parent}, {child})",
    "COPY-SESSION",
    "UPDATE sessions SET id = {MISSING}",
    "UPDATE batch_jobs SET id = {MISSING}",
], ids=["job-leased-to-missing-session", "job-moved-to-missing-batch-job", "one-of-two-rows-to-missing-session",
        "job-of-missing-session", "referenced-session-id-changed", "referenced-batch-job-id-changed"])
def test_missing_lease_references_are_refused(leased: dict, statement: str) -> None:
    """A job's session and BatchJob hold as foreign keys did (migration 0012 on PostgreSQL)."""
    if statement == "COPY-SESSION":
        statement = _copy_job_sql(leased["child"], leased["app_id"], session_id=str(MISSING))
    statement = statement.replace("{MISSING}", str(MISSING)).format(**leased)
    with pytest.raises(sa.exc.IntegrityError):
        with leased["engine"].begin() as conn:
            conn.exec_driver_sql(statement)
    with leased["engine"].begin() as conn:  # what exists passes; an update that leaves the keys is not checked
        conn.exec_driver_sql(f"UPDATE jobs SET session_id = {leased['session']}, batch_job_id = {leased['batch_job']} "
                             f"WHERE id = {leased['child']}")
        conn.exec_driver_sql(f"UPDATE jobs SET state = 'RUNNING' WHERE id IN ({leased['parent']}, {leased['child']})")


def test_deleting_a_session_or_its_batch_job_clears_the_leases(leased: dict) -> None:
    engine, parent = leased["engine"], leased["parent"]
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DELETE FROM sessions WHERE id = {leased['session']}")
        assert conn.exec_driver_sql(f"SELECT session_id, batch_job_id FROM jobs WHERE id = {parent}").one() == (
            None, leased["batch_job"])
        conn.exec_driver_sql(f"DELETE FROM batch_jobs WHERE id = {leased['batch_job']}")
        assert conn.exec_driver_sql(f"SELECT session_id, batch_job_id FROM jobs WHERE id = {parent}").one() == (None, None)
        assert _count(conn, "SELECT count(*) FROM jobs") == 2


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # the lock order is PostgreSQL's
def test_pg_lease_checks_lock_only_keys_that_change(leased: dict) -> None:
    """A lease locks its session ``FOR KEY SHARE`` (a delete of the session waits for it, as for a
    foreign key); a state change of leased jobs, which leaves the keys as they are, locks nothing,
    so it never waits on the session's row (a sweep deleting the session holds it)."""
    engine, session, parent, child = leased["engine"], leased["session"], leased["parent"], leased["child"]
    with engine.connect() as holder, engine.connect() as writer:
        holder.exec_driver_sql(f"SELECT 1 FROM sessions WHERE id = {session} FOR UPDATE")  # as a delete holds it
        writer.exec_driver_sql("SET LOCAL lock_timeout = '50ms'")
        writer.exec_driver_sql(f"UPDATE jobs SET state = 'RUNNING' WHERE id = {parent}")  # no wait
        with pytest.raises(sa.exc.OperationalError, match="lock timeout"):
            writer.exec_driver_sql(f"UPDATE jobs SET session_id = {session} WHERE id = {child}")
        writer.rollback()
        holder.rollback()


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # the lock order is PostgreSQL's
def test_pg_lease_checks_lock_only_the_keys_each_row_changed(leased: dict) -> None:
    """Per row and per column (migration 0019 changed the check's plan, not this): in one update,
    a row that keeps its session but changes its BatchJob locks only the new BatchJob, another row
    newly leased locks only its own new session, and a row leaving its session and BatchJob
    (NULL) locks nothing; a row moving to a locked session waits for it."""
    engine, client, session, batch_job = leased["engine"], leased["client"], leased["session"], leased["batch_job"]
    parent, child = leased["parent"], leased["child"]
    site_id = client.get(f"/apps/{leased['app_id']}").json()["site_id"]
    other_session = client.post("/sessions/", json={"site_id": site_id}).json()["id"]
    other_batch_job = client.post("/batch-jobs/", json={"site_id": site_id, "project": "p", "queue": "q", "num_nodes": 1,
                                                        "wall_time_min": 10, "job_mode": "serial"}).json()["id"]
    with engine.connect() as holder, engine.connect() as writer:
        holder.exec_driver_sql(f"SELECT 1 FROM sessions WHERE id = {session} FOR UPDATE")
        holder.exec_driver_sql(f"SELECT 1 FROM batch_jobs WHERE id = {batch_job} FOR UPDATE")
        writer.exec_driver_sql("SET LOCAL lock_timeout = '50ms'")
        writer.exec_driver_sql(
            f"UPDATE jobs SET batch_job_id = CASE WHEN id = {parent} THEN {other_batch_job} ELSE batch_job_id END, "
            f"session_id = CASE WHEN id = {child} THEN {other_session} ELSE session_id END "
            f"WHERE id IN ({parent}, {child})")  # no wait
        assert writer.exec_driver_sql(f"SELECT id, session_id, batch_job_id FROM jobs WHERE id IN ({parent}, {child}) "
                                      "ORDER BY id").all() == [(parent, session, other_batch_job),
                                                               (child, other_session, None)]
        writer.exec_driver_sql(f"UPDATE jobs SET session_id = NULL, batch_job_id = NULL WHERE id = {parent}")  # no wait
        with pytest.raises(sa.exc.OperationalError, match="lock timeout"):
            writer.exec_driver_sql(f"UPDATE jobs SET session_id = {session} WHERE id IN ({parent}, {child})")
        writer.rollback()
        holder.rollback()
