"""The dashboard's job count with a tag rare among the user's jobs but common among other users'
(PostgreSQL): its cost and its answer depend on the user's own jobs only.

The audit (user A: 200,000 jobs, 51 of them tagged ``grp:x``; user B: 10^6 jobs tagged ``grp:x``):
A's count of ``grp:x`` + ``exp:scale`` was exact over all of A's jobs, a parallel sequential scan of
the whole table (B's jobs too): 725 ms where the window took 24. Now it is exact only while A has
at most ``EXACT_COUNT_WINDOWS`` windows of jobs, read through A's sites' index, else the window.
Plans are checked (EXPLAIN on the statement's connection, as it is sent), never timings."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from server_testlib import Api
from starlette.datastructures import QueryParams as StarletteQueryParams

from balsam.server import jobs_logic
from balsam.server.http import QueryParams


def _count(engine: sa.Engine, user_id: int, items: list[tuple[str, str]], window: int) -> tuple[dict, bool, list[dict]]:
    """count_jobs_by_state and the plans (FORMAT JSON) of the statements it sent that read ``jobs``."""
    plans: list[dict] = []

    def explain(_conn: Any, cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if not statement.lstrip().upper().startswith("SELECT") or "FROM jobs" not in statement:
            return
        other = cursor.connection.cursor()
        try:
            other.execute("EXPLAIN (FORMAT JSON) " + statement, parameters)
            plans.append(other.fetchall()[0][0][0]["Plan"])
        finally:
            other.close()

    with engine.connect() as conn:
        sa.event.listen(conn, "before_cursor_execute", explain)
        try:
            with conn.begin():
                counts, exact = jobs_logic.count_jobs_by_state(conn, user_id, QueryParams(StarletteQueryParams(items)),
                                                               window=window)
        finally:
            sa.event.remove(conn, "before_cursor_execute", explain)
    return counts, exact, plans


def _jobs_scans(plan: dict) -> list[dict]:
    todo, out = [plan], []
    while todo:
        node = todo.pop()
        if node.get("Relation Name") == "jobs":
            out.append(node)
        todo.extend(node.get("Plans", []))
    return out


@pytest.mark.postgres
def test_a_tag_rare_for_the_user_but_common_for_others_reads_only_the_users_jobs(_live_server_pg_obj: Any,
                                                                                 register: Any) -> None:
    a, b = Api(_live_server_pg_obj.url, register), Api(_live_server_pg_obj.url, register)
    engine = sa.create_engine(_live_server_pg_obj.database_url)
    try:
        tag = f"x-{uuid.uuid4().hex[:8]}"
        app_a = a.app(a.site()["id"])
        # A: one job tagged (the oldest), then 150 others; B: 40 jobs tagged (more than any window's
        # rare share below: the tag index would return B's jobs).
        [tagged] = a.jobs(app_a["id"], 1, tags={"grp": tag, "exp": "scale"})
        a.jobs(app_a["id"], 150, tags={"grp": "a", "exp": "scale"})
        app_b = b.app(b.site()["id"])
        b.jobs(app_b["id"], 40, tags={"grp": tag, "exp": "scale"})
        items = [("tags", f"grp:{tag}"), ("tags", "exp:scale")]

        # window 20: the tag is rare for A (1 <= 20 // RARE_TAG_SHARE) and A has at most
        # EXACT_COUNT_WINDOWS (10) windows of jobs (151 <= 200): exact, A's jobs read through A's site's
        # index, not the tag index (B's 40) nor the whole table.
        counts, exact, plans = _count(engine, a.user_id, items, window=20)
        assert (counts, exact) == ({tagged["state"]: 1}, True)
        [plan] = plans
        scans = _jobs_scans(plan)
        assert scans and all(n["Node Type"] in ("Index Scan", "Index Only Scan")
                             and n.get("Index Name") in ("ix_jobs_site_id_id", "ix_jobs_site_id_state_id")
                             for n in scans), json.dumps(plan)

        # window 10: the tag is still rare for A (1 <= 1), but A has more than EXACT_COUNT_WINDOWS
        # windows (151 > 100): the newest 10 jobs only (the tagged one is older), whatever B has.
        counts, exact, plans = _count(engine, a.user_id, items, window=10)
        assert (counts, exact) == ({}, False)
        [plan] = plans
        assert [(n["Node Type"], n.get("Index Name")) for n in _jobs_scans(plan)] == [
            ("Index Scan", "ix_jobs_site_id_id")], json.dumps(plan)
    finally:
        engine.dispose()
        a.close()
        b.close()
