"""Listings by ``last_update`` read their rows from an index (migration 0025), not every job.

``Job.objects.filter(last_update_after=t)`` (a workflow polling for what changed) and
``order_by("-last_update")`` (the jobs changed last) read and sorted every job of the user's sites
before it (10^5 jobs: 29 ms per page; figures in docs/performance.md). Here the statements
``jobs_logic.list_jobs`` runs for them, caught as they execute, are explained on SQLite and
PostgreSQL over 3,000 jobs of one site, analyzed (the planners' statistics, as at scale: the site
does not narrow the jobs): the pages in ``last_update`` order read ``ix_jobs_last_update_id``
from one end with no sort, and a poll (``last_update_after``, in id order) counts its matches and
reads its page there, on SQLite too, whose planner walked the site's jobs in id order for the page
(``jobs_logic._job_page`` sorts a poll's few matches there)."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from starlette.datastructures import QueryParams as StarletteQueryParams

from balsam.server import jobs_logic
from balsam.server.db import create_db_engine
from balsam.server.http import QueryParams
from balsam.server.migrate import upgrade

INDEX = "ix_jobs_last_update_id"


def _seed(conn: sa.Connection) -> int:
    """A user, site and app with three jobs; the user's id."""
    user = conn.execute(sa.text("INSERT INTO users (username, date_joined) VALUES ('m', '2026-12-01') RETURNING id")).scalar()
    site = conn.execute(sa.text(
        "INSERT INTO sites (owner_id, name, path, backfill_windows, queued_jobs, optional_batch_job_params, "
        "allowed_projects, allowed_queues, transfer_locations, last_refresh, creation_date) VALUES "
        "(:u, 's', '/s', '{}', '[]', '{}', '[]', '[]', '{}', '2026-12-01', '2026-12-01') RETURNING id"), {"u": user}).scalar()
    app = conn.execute(sa.text(
        "INSERT INTO apps (site_id, name, description, serialized_class, source_code, parameters, transfers) "
        "VALUES (:s, 'A', '', '', '', '{}', '{}') RETURNING id"), {"s": site}).scalar()
    pg = conn.dialect.name == "postgresql"
    # 3,000 jobs changed a second apart from 2026-11-01 on; the poll below matches the last 10.
    series = ("generate_series(0, 2999) AS i" if pg else
              "(WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 2999) SELECT i FROM n)")
    stamp = ("TIMESTAMPTZ '2026-11-01 00:00:00+00' + i * INTERVAL '1 second'" if pg else
             "strftime('%Y-%m-%d %H:%M:%f', '2026-11-01 00:00:00', '+' || i || ' seconds')")
    conn.exec_driver_sql(
        "INSERT INTO jobs (site_id, app_id, workdir, tags, serialized_parameters, data, num_nodes, ranks_per_node, "
        "threads_per_rank, threads_per_core, launch_params, gpus_per_rank, node_packing_count, wall_time_min, "
        "parent_ids, state, pending_file_cleanup, serialized_return_value, serialized_exception, last_update) "
        f"SELECT {site}, {app}, 'w' || i, '{{}}', '', '{{}}', 1, 1, 1, 1, '{{}}', 0, 1, 0, '[]', 'STAGED_IN', true, '', '', "
        f"{stamp} FROM {series}".replace("%", "%%" if pg else "%"))
    conn.exec_driver_sql("ANALYZE")
    return user


def _plans(conn: sa.Connection, user_id: int, query: str) -> list[tuple[str, str]]:
    """Each statement ``list_jobs`` runs on the jobs' ``last_update`` for ``query``, and its plan."""
    seen: list[tuple[str, Any]] = []

    def catch(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if " jobs" in statement and statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    sa.event.listen(conn, "before_cursor_execute", catch)
    try:
        count, rows = jobs_logic.list_jobs(conn, user_id, QueryParams(StarletteQueryParams(query)), 100, 0)
    finally:
        sa.event.remove(conn, "before_cursor_execute", catch)
    assert count and rows, (count, rows)  # the page itself was read, not only a count
    pg = conn.dialect.name == "postgresql"
    cursor = conn.connection.dbapi_connection.cursor()
    plans = []
    for statement, parameters in seen:
        if "last_update" not in statement:
            continue  # the owner's site ids, the counters
        cursor.execute(("EXPLAIN " if pg else "EXPLAIN QUERY PLAN ") + statement, parameters)
        plans.append((statement, "\n".join(" ".join(map(str, row)) for row in cursor.fetchall())))
    cursor.close()
    assert plans, seen
    return plans


@pytest.mark.parametrize("query", ["ordering=-last_update", "ordering=last_update",
                                   "state=STAGED_IN&ordering=-last_update", "last_update_after=2026-11-01T00:49:50"])
def test_last_update_listings_read_the_index(database_url: str, query: str) -> None:
    upgrade(database_url)
    engine = create_db_engine(database_url)
    try:
        with engine.begin() as conn:
            user_id = _seed(conn)
        with engine.connect() as conn:
            plans = _plans(conn, user_id, query)
            for _statement, plan in plans:
                assert INDEX in plan, plan
                if "ordering" in query:
                    assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan
            # The page; a poll's count too (a listing's other counts come from the counters).
            assert len(plans) == (1 if "ordering" in query else 2), plans
    finally:
        engine.dispose()
