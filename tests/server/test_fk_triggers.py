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


def _copy_job_sql(job_id: int, app_id: int) -> str:
    """An INSERT of a copy of a job (every column but the id), with another app and workdir."""
    names = [c.name for c in jobs.columns if c.name != "id"]
    values = [str(app_id) if n == "app_id" else "workdir || '-copy'" if n == "workdir" else n for n in names]
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
