"""The lease-reference check on updates of jobs (``balsam_fk_jobs_leases_update``, migrations 0012
and 0019; PostgreSQL) reads each row of the statement a bounded number of times, whatever plan the
connection keeps for it.

PL/pgSQL plans the trigger's query at its first call on a connection and keeps that plan. Migration
0012's left join of the transition tables was planned as a nested loop after a first call with one
row, and every later bulk update on the connection read ``old_rows`` once per updated row: finishing
a parent with 10,000 children took 5.5 s, ~5 s of it in this trigger. No timing here: the plan of
the trigger's query, as ``auto_explain`` reports it (nested statements, ``log_level = notice``: the
plan comes back to this connection as a notice), tells how many transition-table rows it read.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator

import pytest

from balsam.server.db import create_db_engine
from balsam.server.migrate import alembic_config, head_revision, upgrade
from scratch_db import scratch_database
from server_testlib import create_site_and_app, logged_in_test_client

pytestmark = [pytest.mark.postgres, pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)]

SECRET = "lease-check-plan-test-secret-0123456789-abcdefghij"
N = 1500


@pytest.fixture
def filled(database_url: str) -> Iterator[dict[str, Any]]:
    """N jobs, a BatchJob and a session of it (through the API)."""
    with logged_in_test_client(database_url, SECRET) as (client, app):
        site_id, app_id = create_site_and_app(client)
        for start in range(0, N, 500):
            assert client.post("/jobs/", json=[{"workdir": f"w/{i}", "app_id": app_id}
                                               for i in range(start, min(N, start + 500))]).status_code == 201
        batch_job = client.post("/batch-jobs/", json={"site_id": site_id, "project": "p", "queue": "q", "num_nodes": 1,
                                                      "wall_time_min": 10, "job_mode": "serial"}).json()["id"]
        session = client.post("/sessions/", json={"site_id": site_id, "batch_job_id": batch_job}).json()["id"]
        yield {"url": database_url, "session": session, "batch_job": batch_job}


def _psycopg2(url: str) -> Any:
    import psycopg2
    from sqlalchemy.engine import make_url

    from balsam.server.db import normalize_database_url

    parsed = make_url(normalize_database_url(url))
    return psycopg2.connect(host=parsed.host, port=parsed.port, user=parsed.username, password=parsed.password,
                            dbname=parsed.database)


def _nodes(plan: dict) -> Iterator[dict]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _trigger_plans(notices: list[str]) -> list[dict]:
    """The plans auto_explain sent of the lease check's query (the job counts' triggers read both
    transition tables too)."""
    plans = []
    for notice in notices:
        match = re.search(r"plan:\s*(\{.*\})\s*$", notice, re.S)
        if match:
            explained = json.loads(match.group(1))
            text = explained["Query Text"]
            if "n.session_id" in text and "old_rows" in text and "new_rows" in text:
                plans.append(explained["Plan"])
    return plans


def _rows_read(plan: dict) -> int:
    """Transition-table rows the plan read: loops x (rows returned + rows its filter removed)."""
    return round(sum(node["Actual Loops"] * (node["Actual Rows"] + node.get("Rows Removed by Filter", 0))
                     for node in _nodes(plan) if node["Node Type"] == "Named Tuplestore Scan"))


@pytest.mark.parametrize("planner", ["default", "hash_and_merge_joins_off"])
def test_the_lease_check_reads_each_row_of_a_bulk_update_a_bounded_number_of_times(filled: dict, planner: str) -> None:
    """On a connection whose first update of jobs changed one row, updates of N jobs (keys NULL,
    keys set and unchanged, keys newly set) read at most 2 N transition-table rows (each side
    once). "hash_and_merge_joins_off" leaves the planner nothing but a nested loop where a query
    allows one: migration 0019's full join does not."""
    conn = _psycopg2(filled["url"])
    try:
        with conn.cursor() as cur:
            try:
                cur.execute("LOAD 'auto_explain'")
            except Exception as exc:  # noqa: BLE001 - the module is a contrib one
                pytest.skip(f"auto_explain is not available on this PostgreSQL server: {exc}")
            for setting in ("auto_explain.log_min_duration = 0", "auto_explain.log_analyze = on",
                            "auto_explain.log_nested_statements = on", "auto_explain.log_format = 'json'",
                            "auto_explain.log_level = 'notice'", "client_min_messages = notice"):
                cur.execute(f"SET {setting}")
            if planner != "default":
                cur.execute("SET enable_hashjoin = off")
                cur.execute("SET enable_mergejoin = off")
            cur.execute("UPDATE jobs SET last_update = now() WHERE id = (SELECT min(id) FROM jobs)")  # the first call
            conn.commit()
            cases = {
                "keys NULL": ("", "UPDATE jobs SET last_update = now()"),
                "keys unchanged": (f"UPDATE jobs SET session_id = {filled['session']}, batch_job_id = {filled['batch_job']}",
                                   "UPDATE jobs SET last_update = now()"),
                "keys set": ("", f"UPDATE jobs SET session_id = {filled['session']}, batch_job_id = {filled['batch_job']}"),
            }
            for case, (setup, bulk) in cases.items():
                if setup:
                    cur.execute(setup)
                del conn.notices[:]
                cur.execute(bulk)
                assert cur.rowcount == N
                plans = _trigger_plans(list(conn.notices))
                assert len(plans) == 1, (case, conn.notices[-3:])
                read = _rows_read(plans[0])
                assert read <= 2 * N, (case, read, [n["Node Type"] for n in _nodes(plans[0])])
                assert not any(n["Node Type"] == "Nested Loop" for n in _nodes(plans[0])), case
                conn.rollback()
    finally:
        conn.close()


def _function_definition(url: str) -> str:
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            return conn.exec_driver_sql(
                "SELECT pg_get_functiondef('balsam_fk_jobs_leases_update()'::regprocedure)").scalar_one()
    finally:
        engine.dispose()


def test_a_new_and_a_migrated_database_have_the_same_check_and_the_downgrade_restores_0012s(
        database_url: str, tmp_path: Any) -> None:
    """``database_url`` was made at head from nothing (as ``BALSAM_SERVER_CREATE_TABLES`` and
    ``balsam server migrate`` make one); another database is brought to 0018, then to head; a
    downgrade to 0018 gives back 0012's function, with its join of the transition tables."""
    from alembic import command

    new = _function_definition(database_url)
    assert "FULL JOIN" in new and " LEFT JOIN " not in new and "enable_nestloop" not in new
    with scratch_database(database_url, tmp_path, "lease_check") as other:
        assert upgrade(other, "0018_released_from_session") == "0018_released_from_session"
        at_0018 = _function_definition(other)
        assert "new_rows AS n LEFT JOIN old_rows AS o ON o.id = n.id" in at_0018
        assert upgrade(other) == head_revision()
        assert _function_definition(other) == new
        command.downgrade(alembic_config(other), "0018_released_from_session")
        assert _function_definition(other) == at_0018
        assert upgrade(other) == head_revision()
        assert _function_definition(other) == new
