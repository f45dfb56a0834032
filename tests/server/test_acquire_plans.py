"""The acquires' query plans, on both databases: mpi mode's request (``max_aggregate_nodes``) reads a
site's runnable jobs from a partial index in packing order (migration 0010) instead of sorting every
runnable job, in both orders, with or without the other filters a launcher sends; other requests
keep their plan. SQLite uses a partial index only when the query repeats the index's predicate
word for word, which these plans would lose first if the two drifted apart.

The jobs come from a live server (as launchers make them); the plans are read from the same
database with the statement the server builds (``sessions_logic.candidates``)."""

from __future__ import annotations

import json
from typing import Any, Iterator

import pytest
import sqlalchemy as sa

from balsam.models import SessionAcquire
from balsam.serialization import from_dict
from balsam.server.db import create_db_engine
from balsam.server.sessions_logic import candidates
from balsam.server.tables import jobs
from balsam.states import PROCESSABLE_STATES

from server_testlib import runnable


@pytest.fixture
def engine(db_kind: str, request: pytest.FixtureRequest) -> Iterator[sa.Engine]:
    server = request.getfixturevalue("_live_server_obj" if db_kind == "sqlite" else "_live_server_pg_obj")
    engine = create_db_engine(server.database_url)
    yield engine
    engine.dispose()


def _plan(engine: sa.Engine, stmt: sa.Select) -> str:
    """The plan of ``stmt`` executed as the server executes it (its parameters bound by the driver),
    as one string. On PostgreSQL sorting is disabled for the plan: with a few hundred rows a sort is
    the cheapest plan whatever the indexes, and the question is only whether an index can deliver
    the order (a Sort node still appears if none can)."""
    with engine.connect() as conn:
        pg = conn.dialect.name == "postgresql"
        prefix = "EXPLAIN (FORMAT JSON) " if pg else "EXPLAIN QUERY PLAN "

        def explain(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> Any:
            return prefix + statement, parameters

        with conn.begin():
            if pg:
                conn.exec_driver_sql("SET LOCAL enable_sort = off")
            sa.event.listen(conn, "before_cursor_execute", explain, retval=True)
            try:
                rows = conn.execute(stmt).all()
            finally:
                sa.event.remove(conn, "before_cursor_execute", explain)
        return json.dumps(rows[0][0]) if pg else " | ".join(str(row[-1]) for row in rows)


def _spec(**fields: Any) -> SessionAcquire:
    return from_dict(SessionAcquire, {"max_num_jobs": 8, **fields})


@pytest.mark.parametrize("sort_by,index", [(None, "ix_jobs_runnable_small_first"),
                                           ("long_large_first", "ix_jobs_runnable_long_large_first")])
def test_mpi_mode_acquire_reads_runnable_jobs_from_an_index_in_packing_order(api, site_app, engine, sort_by, index):
    site, app = site_app
    runnable(api, app["id"], 40, node_packing_count=4, wall_time_min=5, tags={"campaign": "a"})
    runnable(api, app["id"], 10, num_nodes=2, wall_time_min=20, tags={"campaign": "b"})
    for extra in ({}, {"filter_tags": {"campaign": "a"}, "max_wall_time_min": 30, "max_nodes_per_job": 2},
                  {"max_wall_time_min": 30}, {"max_nodes_per_job": 1}, {"app_ids": [app["id"]], "max_wall_time_min": 30}):
        spec = _spec(max_aggregate_nodes=3.0, sort_by=sort_by, **extra)
        plan = _plan(engine, candidates(site["id"], spec, engine.dialect.name))
        assert index in plan, (extra, plan)
        if engine.dialect.name == "sqlite":
            assert "TEMP B-TREE" not in plan, (extra, plan)  # no sort of the site's runnable jobs
        else:
            assert '"Node Type": "Sort"' not in plan, (extra, plan)


@pytest.mark.parametrize("states,index", [(None, "ix_jobs_runnable_by_id"),
                                          (sorted(s.value for s in PROCESSABLE_STATES), "ix_jobs_processable_by_id")])
def test_id_order_acquires_read_their_own_index(api, site_app, engine, states, index):
    """Serial mode's request and the processing module's: the leasable jobs in id order from an
    index of their own, not the table read in id order past the jobs of other states (which is
    what SQLite chose when a campaign's new jobs came after its finished ones)."""
    site, app = site_app
    runnable(api, app["id"], 20)
    # What launchers send (the wall time left, always; nodes, serial only, tags and apps as set).
    for extra in ({}, {"max_wall_time_min": 30}, {"max_wall_time_min": 30, "max_nodes_per_job": 2},
                  {"max_wall_time_min": 30, "serial_only": True, "filter_tags": {"campaign": "a"}},
                  {"app_ids": [app["id"]], "max_nodes_per_job": 1}):
        spec = _spec(**({"states": states} if states else {}), **extra)
        stmt = candidates(site["id"], spec, engine.dialect.name)
        # The statement the acquire runs: the lease, with the candidates as a subquery.
        lease = sa.update(jobs).where(jobs.c.id.in_(sa.select(stmt.subquery().c.id))).values(session_id=None)
        for plan in (_plan(engine, stmt), _plan(engine, lease.returning(jobs.c.id))):
            assert index in plan, (extra, plan)
            if engine.dialect.name == "sqlite":
                assert "SCAN jobs" not in plan and "TEMP B-TREE" not in plan, (extra, plan)
            else:
                assert '"Node Type": "Sort"' not in plan, (extra, plan)


def test_other_acquires_keep_their_plan(api, site_app, engine):
    site, app = site_app
    runnable(api, app["id"], 20)
    # States no index is for: the general filter, served by the (site, state, id) index.
    spec = _spec(max_aggregate_nodes=2.0, states=["RUN_DONE", "POSTPROCESSED"])
    plan = _plan(engine, candidates(site["id"], spec, engine.dialect.name))
    assert "ix_jobs_runnable" not in plan and "ix_jobs_processable" not in plan, plan
