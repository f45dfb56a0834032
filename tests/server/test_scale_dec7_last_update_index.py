"""Listings by ``last_update`` read their rows from an index (migration 0025), not every job.

``Job.objects.filter(last_update_after=t)`` (a workflow polling for what changed),
``last_update_before`` and ``order_by("-last_update")`` (the jobs changed last) read and sorted
every job of the user's sites before it (10^5 jobs: 29-45 ms per page; figures in
docs/performance.md). Here 13,000 jobs (12,000 of one user over two sites, 1,000 of another user
in between; every seventh job changed after the others, so that id and ``last_update`` orders
differ) are listed through ``jobs_logic.list_jobs`` and each page is compared, rows and order, with
the same listing worked out here in Python. The statements it runs, caught as they execute, are
explained: on SQLite first as a server leaves its database, with no planner statistics (it never
runs ANALYZE), then analyzed; on PostgreSQL analyzed (autovacuum does). A range of at most
``FEW_CHANGED`` (10,000) jobs of all users is read through ``ix_jobs_last_update_id`` on SQLite;
one more job, and the site's index, as before the migration (``jobs_logic._few_in_time_range``).
A page in ``last_update`` order walks that index from its end only while the walk's worst case
reads no more rows than the sort (``jobs_logic._walk_in_time_order``): not for a listing of old
jobs behind newer ones of another site or user, which the walk would read first."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.datastructures import QueryParams as StarletteQueryParams

from balsam.server import jobs_logic
from balsam.server.db import create_db_engine
from balsam.server.http import QueryParams
from balsam.server.migrate import upgrade

INDEX = "ix_jobs_last_update_id"
N = 13_000
START = dt.datetime(2026, 11, 1)


def _second(i: int) -> int:
    """Job i's ``last_update``, in seconds after START: in id order, but every seventh job later
    than all the others (changed since). Each job's time its own: a range holds an exact number."""
    return N + i if i % 7 == 0 else i


def _seed(conn: sa.Connection) -> tuple[int, dict[int, dict[str, Any]]]:
    """The user ``m`` (sites s1, s2) and user ``o`` (one site); N jobs. ``m``'s id and its jobs by id."""
    pg = conn.dialect.name == "postgresql"
    site_ids = []
    for owner in ("m", "o"):
        user = conn.execute(sa.text("INSERT INTO users (username, date_joined) VALUES (:n, '2026-12-01') RETURNING id"),
                            {"n": owner}).scalar()
        site_ids.append(user)
        for name in (("s1", "s2") if owner == "m" else ("o1",)):
            site_ids.append(conn.execute(sa.text(
                "INSERT INTO sites (owner_id, name, path, backfill_windows, queued_jobs, optional_batch_job_params, "
                "allowed_projects, allowed_queues, transfer_locations, last_refresh, creation_date) VALUES "
                "(:u, :n, '/s', '{}', '[]', '{}', '[]', '[]', '{}', '2026-12-01', '2026-12-01') RETURNING id"),
                {"u": user, "n": name}).scalar())
    m, s1, s2, _o, o1 = site_ids
    a1, a2, ao = [conn.execute(sa.text(
        "INSERT INTO apps (site_id, name, description, serialized_class, source_code, parameters, transfers) "
        "VALUES (:s, 'A', '', '', '', '{}', '{}') RETURNING id"), {"s": site_id}).scalar() for site_id in (s1, s2, o1)]
    series = (f"generate_series(0, {N - 1}) AS i" if pg else
              f"(WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {N - 1}) SELECT i FROM n)")
    seconds = f"(CASE WHEN i % 7 = 0 THEN {N} + i ELSE i END)"
    # SQLite: the text SQLAlchemy stores (six decimals), so that a bound equal to a job's time matches it.
    stamp = (f"TIMESTAMPTZ '2026-11-01 00:00:00+00' + {seconds} * INTERVAL '1 second'" if pg else
             f"strftime('%Y-%m-%d %H:%M:%S', '2026-11-01 00:00:00', '+' || {seconds} || ' seconds') || '.000000'")
    site, app = (f"CASE WHEN i % 13 = 0 THEN {o} WHEN i % 5 = 0 THEN {b} ELSE {a} END" for o, b, a in ((o1, s2, s1), (ao, a2, a1)))
    state = "CASE WHEN i % 3 = 0 THEN 'RUNNING' ELSE 'STAGED_IN' END"
    conn.exec_driver_sql(
        "INSERT INTO jobs (site_id, app_id, workdir, tags, serialized_parameters, data, num_nodes, ranks_per_node, "
        "threads_per_rank, threads_per_core, launch_params, gpus_per_rank, node_packing_count, wall_time_min, "
        "parent_ids, state, pending_file_cleanup, serialized_return_value, serialized_exception, last_update) "
        f"SELECT {site}, {app}, CAST(i AS TEXT), '{{}}', '', '{{}}', 1, 1, 1, 1, '{{}}', 0, 1, 0, '[]', {state}, false, "
        f"'', '', {stamp} FROM {series}".replace("%", "%%" if pg else "%"))
    owned = {}
    for job_id, site_id, workdir, state_value in conn.execute(sa.text("SELECT id, site_id, workdir, state FROM jobs")):
        i = int(workdir)
        if site_id in (s1, s2):
            owned[job_id] = {"second": _second(i), "state": state_value}
    return m, owned


def _at(second: int) -> str:
    return (START + dt.timedelta(seconds=second)).isoformat()


def _expected(owned: dict[int, dict[str, Any]], params: dict[str, str], limit: int, offset: int) -> tuple[int, list[int]]:
    """The listing worked out here: its count and the ids of its page, in its order."""
    def matches(job: dict[str, Any]) -> bool:
        if "last_update_after" in params and job["second"] < params["_after"]:
            return False
        if "last_update_before" in params and job["second"] > params["_before"]:
            return False
        return "state" not in params or job["state"] == params["state"]

    ids = [job_id for job_id, job in owned.items() if matches(job)]
    ordering = params.get("ordering", "id")
    key = (lambda i: (owned[i]["second"], i)) if ordering.lstrip("-") == "last_update" else (lambda i: i)
    ids.sort(key=key, reverse=ordering.startswith("-"))
    return len(ids), ids[offset:offset + limit]


def _listing(conn: sa.Connection, user_id: int, params: dict[str, str], limit: int, offset: int) -> tuple[int, list[int], list[str]]:
    """``list_jobs``' count and page ids, and the plans of its statements on the jobs' ``last_update``."""
    seen: list[tuple[str, Any]] = []

    def catch(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if " jobs" in statement and "last_update" in statement and statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    query = StarletteQueryParams([(k, v) for k, v in params.items() if not k.startswith("_")])
    sa.event.listen(conn, "before_cursor_execute", catch)
    try:
        count, rows = jobs_logic.list_jobs(conn, user_id, QueryParams(query), limit, offset)
    finally:
        sa.event.remove(conn, "before_cursor_execute", catch)
    pg = conn.dialect.name == "postgresql"
    cursor = conn.connection.dbapi_connection.cursor()
    plans = []
    for statement, parameters in seen:
        if "site_id" not in statement:
            continue  # SQLite's probe of the range (the index alone, bounded), the ids' span
        cursor.execute(("EXPLAIN " if pg else "EXPLAIN QUERY PLAN ") + statement, parameters)
        plans.append("\n".join(" ".join(map(str, row)) for row in cursor.fetchall()))
    cursor.close()
    return count, [row["id"] for row in rows], plans


def _cases() -> list[tuple[dict[str, str], "bool | dict[int, bool]", bool]]:
    """(query, whether SQLite reads it through the index (or that by the page's offset), whether
    PostgreSQL does): polls and
    ``last_update_before`` ranges of 100, 10,000 and 10,001 jobs of all users (the boundary),
    orderings. (PostgreSQL reads a range of most of the table, rightly, by other means.)"""
    seconds = sorted(_second(i) for i in range(N))  # every user's jobs: the range's size counts them all

    def after(k: int) -> dict[str, str]:  # the newest k jobs
        return {"last_update_after": _at(seconds[-k]), "_after": seconds[-k]}

    def before(k: int) -> dict[str, str]:  # the oldest k jobs
        return {"last_update_before": _at(seconds[k - 1]), "_before": seconds[k - 1]}

    few = jobs_logic.FEW_CHANGED
    return [
        ({"ordering": "-last_update"}, True, True),
        ({"ordering": "last_update"}, True, True),
        # 8,000 of 13,000 jobs: the walk's worst case (the 5,000 others, then offset + limit) reads
        # no more than the sort's 8,000 rows at offset 0, more at offset 2,950.
        ({"state": "STAGED_IN", "ordering": "-last_update"}, {0: True, 2950: False}, True),
        (after(100), True, True),
        (after(few), True, False),
        (after(few + 1), False, False),
        ({**after(few), "ordering": "-id"}, True, False),
        ({**after(few), "state": "RUNNING"}, True, False),
        ({**after(3000), "ordering": "-last_update"}, True, False),
        (before(100), True, True),
        (before(few), True, False),
        (before(few + 1), False, False),
        ({**before(few), "state": "RUNNING"}, True, False),
        ({**before(few + 1), "state": "RUNNING"}, False, False),
        ({**after(5000), **before(9000)}, True, False),
    ]


def test_last_update_listings_rows_order_and_plans(database_url: str) -> None:
    upgrade(database_url)
    engine = create_db_engine(database_url)
    try:
        with engine.begin() as conn:
            user_id, owned = _seed(conn)
        pg = engine.dialect.name == "postgresql"
        with engine.connect() as conn:
            if pg:
                conn.exec_driver_sql("ANALYZE")
            else:
                assert not conn.exec_driver_sql("SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'").scalar()
            for analyzed in ([True] if pg else [False, True]):
                if analyzed and not pg:
                    conn.exec_driver_sql("ANALYZE")
                for params, by_offset, pg_index in _cases():
                    for limit, offset in ((100, 0), (100, 2950)):
                        by_index = by_offset[offset] if isinstance(by_offset, dict) else by_offset
                        expected = _expected(owned, params, limit, offset)
                        count, ids, plans = _listing(conn, user_id, params, limit, offset)
                        where = (params, limit, offset, analyzed)
                        assert (count, ids) == expected, where
                        if offset >= count:
                            continue
                        assert ids, where
                        # The page; a range's count too (the others' counts come from the counters).
                        in_range = "_after" in params or "_before" in params
                        assert len(plans) == (2 if in_range else 1), (where, plans)
                        for plan in plans:
                            if (pg_index if pg else by_index):
                                assert INDEX in plan, (where, plan)
                            if pg:
                                continue
                            if by_index and "ordering" in params and params["ordering"].lstrip("-") == "last_update":
                                assert "TEMP B-TREE" not in plan, (where, plan)  # read in its order
                            if not by_index and not analyzed:
                                # Past FEW_CHANGED, or a walk that could read more than the sort: the
                                # site's index, as before migration 0025 (with statistics, whichever
                                # the planner picks).
                                assert INDEX not in plan and "ix_jobs_site_id" in plan, (where, plan)
            conn.rollback()
    finally:
        engine.dispose()


def _seed_skewed(conn: sa.Connection) -> tuple[dict[str, int], dict[str, int], dict[int, dict[str, Any]]]:
    """User ``m``'s idle site ``old`` (the 1,000 oldest jobs), user ``o``'s 5,000 jobs after them,
    then ``m``'s site ``new`` (the 500 newest), ``last_update`` in id order: the users' ids and
    the sites' by name, and every job by id (its ``second``, ``state``, ``site``: old, o or new)."""
    users, sites = {}, {}
    for owner, names in (("m", ("old", "new")), ("o", ("o",))):
        users[owner] = conn.execute(sa.text(
            "INSERT INTO users (username, date_joined) VALUES (:n, '2026-12-01') RETURNING id"), {"n": owner}).scalar()
        for name in names:
            sites[name] = conn.execute(sa.text(
                "INSERT INTO sites (owner_id, name, path, backfill_windows, queued_jobs, optional_batch_job_params, "
                "allowed_projects, allowed_queues, transfer_locations, last_refresh, creation_date) VALUES "
                "(:u, :n, '/s', '{}', '[]', '{}', '[]', '[]', '{}', '2026-12-01', '2026-12-01') RETURNING id"),
                {"u": users[owner], "n": name}).scalar()
    apps = {name: conn.execute(sa.text(
        "INSERT INTO apps (site_id, name, description, serialized_class, source_code, parameters, transfers) "
        "VALUES (:s, 'A', '', '', '', '{}', '{}') RETURNING id"), {"s": site_id}).scalar() for name, site_id in sites.items()}
    for name, first, n in (("old", 0, 1000), ("o", 1000, 5000), ("new", 6000, 500)):
        conn.exec_driver_sql(
            "INSERT INTO jobs (site_id, app_id, workdir, tags, serialized_parameters, data, num_nodes, ranks_per_node, "
            "threads_per_rank, threads_per_core, launch_params, gpus_per_rank, node_packing_count, wall_time_min, "
            "parent_ids, state, pending_file_cleanup, serialized_return_value, serialized_exception, last_update) "
            f"SELECT {sites[name]}, {apps[name]}, '{name}' || i, '{{}}', '', '{{}}', 1, 1, 1, 1, '{{}}', 0, 1, 0, '[]', "
            "CASE WHEN i % 3 = 0 THEN 'RUNNING' ELSE 'STAGED_IN' END, false, '', '', "
            "strftime('%Y-%m-%d %H:%M:%S', '2026-11-01 00:00:00', '+' || i || ' seconds') || '.000000' "
            f"FROM (WITH RECURSIVE n(i) AS (SELECT {first} UNION ALL SELECT i + 1 FROM n WHERE i < {first + n - 1}) "
            "SELECT i FROM n)")
    site_names = {site_id: name for name, site_id in sites.items()}
    rows = conn.execute(sa.text(
        "SELECT id, site_id, CAST(strftime('%s', last_update) - strftime('%s', '2026-11-01') AS INTEGER), state FROM jobs"))
    every = {job_id: {"second": second, "state": state, "site": site_names[site_id]} for job_id, site_id, second, state in rows}
    return users, sites, every


def test_last_update_order_walks_only_when_no_dearer_than_the_sort(tmp_path: Any) -> None:
    """A page in ``last_update`` order of old jobs behind newer ones (an idle site of a user whose
    other site, and another user, changed jobs since) is read through the site's index and sorted,
    not walked from the index's end through every newer job (at 10^6 jobs: 30 -> 222 ms); a listing
    holding most of the table is still walked, in the index's order. SQLite, with no statistics (as
    the server leaves it; the walk is SQLite's only)."""
    url = f"sqlite:///{tmp_path / 'skewed.db'}"
    upgrade(url)
    engine = create_db_engine(url)
    try:
        with engine.begin() as conn:
            users, site_ids, every = _seed_skewed(conn)
        m, o = users["m"], users["o"]
        with engine.connect() as conn:
            assert not conn.exec_driver_sql("SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'").scalar()
            cases = [  # user, its jobs in the listing (by site), query, walked
                (m, ("old",), {"site_id": str(site_ids["old"]), "ordering": "-last_update"}, False),
                (m, ("old",), {"site_id": str(site_ids["old"]), "ordering": "-last_update", "state": "RUNNING"}, False),
                (m, ("new",), {"site_id": str(site_ids["new"]), "ordering": "last_update"}, False),
                (m, ("old", "new"), {"ordering": "-last_update"}, False),
                (o, ("o",), {"ordering": "-last_update"}, True),
                (o, ("o",), {"ordering": "last_update"}, True),
            ]
            for user_id, names, params, walked in cases:
                owned = {job_id: job for job_id, job in every.items() if job["site"] in names}
                for limit, offset in ((100, 0), (100, 250)):
                    where = (params, limit, offset)
                    count, ids, plans = _listing(conn, user_id, params, limit, offset)
                    assert (count, ids) == _expected(owned, params, limit, offset), where
                    assert ids and len(plans) == 1, (where, plans)
                    if walked:
                        assert INDEX in plans[0] and "TEMP B-TREE" not in plans[0], (where, plans)
                    else:
                        assert INDEX not in plans[0] and "ix_jobs_site_id" in plans[0], (where, plans)
            conn.rollback()
    finally:
        engine.dispose()
