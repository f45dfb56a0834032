"""The dashboard's windowed job count (``jobs_logic.count_jobs_by_state``: filters the counters cannot
answer, over the user's newest ``window`` jobs) is never the dearer way to count.

The audit (10^5 jobs of one site, PostgreSQL, the table filled since its last ANALYZE): the window's
statement read every job of the site with a bitmap scan and sorted them all for the newest 10,000
(the planner thought the site had a few hundred jobs), slower than counting every match (293 vs
116 ms for two tags). These tests make the same situation at a small scale (a fresh table: no
statistics) and check the plan the statement runs with, explained on the same connection at the
moment it is sent (with the planner settings it is sent with), and the counts.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator

import pytest
import sqlalchemy as sa
from starlette.datastructures import QueryParams as StarletteQueryParams

from server_testlib import create_site_and_app, logged_in_test_client

SECRET = "windowed-count-test-secret-0123456789-abcdefghijkl"
JOBS = 3000
WINDOW = 500


@pytest.fixture
def api(database_url: str) -> Iterator[dict[str, Any]]:
    with logged_in_test_client(database_url, SECRET) as (client, app):
        yield {"client": client, "engine": app.state.engine, "user_id": 1}


def _fill(client: Any, rare: set[int] = frozenset()) -> list[dict]:
    """JOBS jobs of one site (tags ``grp: i % 10`` and ``exp: scale``, ``rare: yes`` for the indices in
    ``rare``); every seventh one FAILED. No ANALYZE: the planner's statistics know none of them."""
    _site, app_id = create_site_and_app(client, "win")
    specs = [{"app_id": app_id, "workdir": f"runs/{i}",
              "tags": {"grp": str(i % 10), "exp": "scale", **({"rare": "yes"} if i in rare else {})}} for i in range(JOBS)]
    made = client.post("/jobs/", json=specs)
    assert made.status_code == 201, made.text
    created = made.json()
    failed = [j["id"] for j in created[::7]]
    answer = client.patch("/jobs/", json=[{"id": i, "state": "FAILED"} for i in failed])
    assert answer.status_code == 200, answer.text
    for job in created[::7]:
        job["state"] = "FAILED"
    return created


def _count(api: dict, items: list[tuple[str, str]], window: "int | None" = WINDOW) -> tuple[dict, bool, list[str], tuple]:
    """count_jobs_by_state, the plans of the statements it sent that read ``jobs`` (explained at the
    moment each was sent, on its connection), and the planner settings after it, in its transaction."""
    from balsam.server.http import QueryParams
    from balsam.server.jobs_logic import count_jobs_by_state

    engine = api["engine"]
    plans: list[str] = []

    def explain(_conn: Any, cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if not statement.lstrip().upper().startswith("SELECT") or "FROM jobs" not in statement:
            return
        pg = engine.dialect.name == "postgresql"
        other = cursor.connection.cursor()
        try:
            other.execute(("EXPLAIN (FORMAT JSON) " if pg else "EXPLAIN QUERY PLAN ") + statement, parameters)
            rows = other.fetchall()
        finally:
            other.close()
        plans.append(json.dumps(rows[0][0]) if pg else " | ".join(str(row[-1]) for row in rows))

    with engine.connect() as conn:
        sa.event.listen(conn, "before_cursor_execute", explain)
        try:
            with conn.begin():
                counts, exact = count_jobs_by_state(conn, api["user_id"], QueryParams(StarletteQueryParams(items)),
                                                    window=window)
                settings = ()
                if engine.dialect.name == "postgresql":
                    settings = tuple(conn.exec_driver_sql(
                        "SELECT current_setting('enable_bitmapscan'), current_setting('enable_seqscan'), "
                        "current_setting('jit')").one())
        finally:
            sa.event.remove(conn, "before_cursor_execute", explain)
    return counts, exact, plans, settings


def _nodes(plan: str) -> list[dict]:
    """Every node of an explained PostgreSQL plan (FORMAT JSON)."""
    todo, out = [json.loads(plan)[0]["Plan"]], []
    while todo:
        node = todo.pop()
        out.append(node)
        todo.extend(node.get("Plans", []))
    return out


def _truth(created: list[dict], keep: Callable[[int, dict], bool], newest: "int | None") -> dict[str, int]:
    """{state: n} of the jobs ``keep`` accepts (index, job), among the ``newest`` newest (None: all)."""
    ordered = sorted(enumerate(created), key=lambda pair: pair[1]["id"], reverse=True)
    out: dict[str, int] = {}
    for i, job in ordered[:newest] if newest is not None else ordered:
        if keep(i, job):
            out[job["state"]] = out.get(job["state"], 0) + 1
    return out


@pytest.mark.parametrize("filters,keep", [
    ([("tags", "grp:3"), ("tags", "exp:scale")], lambda i, _job: i % 10 == 3),
    ([("workdir__contains", "runs/1")], lambda i, _job: str(i).startswith("1")),
])
def test_window_is_read_from_the_site_index_whatever_the_statistics(api, filters, keep):
    created = _fill(api["client"])
    counts, exact, plans, settings = _count(api, filters)
    assert counts == _truth(created, keep, WINDOW) and not exact
    [plan] = plans
    if api["engine"].dialect.name == "postgresql":
        scans = [n for n in _nodes(plan) if n.get("Relation Name") == "jobs"]
        # Each site's newest WINDOW jobs from (site_id, id), newest first: not every job of the site
        # read (bitmap or sequential scan) and sorted.
        assert [(n["Node Type"], n.get("Index Name"), n.get("Scan Direction")) for n in scans] == [
            ("Index Scan", "ix_jobs_site_id_id", "Backward")], plan
        assert settings == ("on", "on", "on")  # the planner's settings are back as they were
    else:
        assert "ix_jobs_site_id_id" in plan and "SCAN jobs" not in plan, plan
    # A full count is what the window bounds: all the matches, exactly.
    counts, exact, _plans, _settings = _count(api, filters, window=None)
    assert counts == _truth(created, keep, None) and exact


def test_a_rare_tag_is_counted_exactly_through_the_tag_index(api):
    """PostgreSQL: a tag that at most WINDOW // RARE_TAG_SHARE jobs carry is counted over every job
    (exact) through the GIN index, even among old jobs the window does not reach; common tags
    keep the window (the test above). SQLite (no tag index): the window, as before."""
    rare = set(range(0, 60, 2))  # 30 jobs, all older than the newest WINDOW
    created = _fill(api["client"], rare)
    counts, exact, plans, _settings = _count(api, [("tags", "rare:yes"), ("tags", "exp:scale")])
    if api["engine"].dialect.name == "postgresql":
        assert counts == _truth(created, lambda i, _job: i in rare, None) and exact
        [plan] = plans
        indexes = {n.get("Index Name") for n in _nodes(plan)} - {None}
        assert "ix_jobs_tags_gin" in indexes and not {"ix_jobs_site_id_id", "ix_jobs_site_id_state_id"} & indexes, plan
        assert not [n for n in _nodes(plan) if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "jobs"], plan
    else:
        assert counts == {} and not exact
    # A tag no job carries: nothing to count, exactly (PostgreSQL), without reading the window.
    counts, exact, _plans, _settings = _count(api, [("tags", "rare:no"), ("tags", "exp:scale")])
    assert counts == {} and exact == (api["engine"].dialect.name == "postgresql")
