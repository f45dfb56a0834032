"""Plans of per-cycle reads that used to grow with every job or event (the audit at 10^6 jobs), on
both databases, in the style of test_acquire_plans.py: the statements are those the server builds
(recorded while its own functions run), explained on the live server's database.

- the file cleaner's listing (``state=JOB_FINISHED & pending_file_cleanup=true``) reads the partial
  index ``ix_jobs_cleanup`` (migration 0015), its count too, not every finished job of the site;
- acquires and backlog reads with tags test them on the rows of their own index, not with the GIN
  index of every job carrying the tag, finished ones included (PostgreSQL);
- events of one ``to_state`` come from ``ix_log_events_to_state_timestamp`` (migration 0015);
- a listing that ends on its page is not counted by a second query (its count is exact anyway).

Each database kind gets a server and database of its own for this file: the planner's statistics
are then those of the rows these tests make, not of whatever the session's shared database holds
(in a full run the shared PostgreSQL database held other tests' finished jobs still waiting for
their cleaner, the planner estimated 3,202 of this site's rows waiting instead of 20, and walked
the primary key instead of ``ix_jobs_cleanup``).
"""

from __future__ import annotations

import ast
from typing import Any, Callable, Iterator

import pytest
import sqlalchemy as sa
from starlette.datastructures import QueryParams as StarletteQueryParams

from balsam.server.backlog import backlog_by_state
from balsam.server.db import count_and_page, create_db_engine
from balsam.server.http import QueryParams
from balsam.server.jobs_logic import list_job_columns, list_jobs, list_jobs_json
from balsam.server.routes.events import events_select
from balsam.server.sessions_logic import candidates
from balsam.server.tables import jobs, sites
from balsam.states import PROCESSABLE_STATES

from server_testlib import runnable
from test_acquire_plans import _spec

#: Finished jobs a site has done (copies of one of its jobs, in 10 campaigns), to give the planners a
#: table in which reading every finished job, or every job of a campaign, costs what it costs at scale.
FINISHED = 10_000


@pytest.fixture(scope="module")
def _own_servers() -> dict:
    """This file's servers, one per database kind, started by the first test that needs one."""
    return {}


@pytest.fixture
def _own_server(db_kind: str, live_server_factory: Any, _own_servers: dict, request: pytest.FixtureRequest) -> Any:
    if db_kind not in _own_servers:
        _own_servers[db_kind] = live_server_factory(db_kind)
    server = _own_servers[db_kind]
    request.node._balsam_live_server = server  # its log is attached to a failure's report
    return server


@pytest.fixture
def server_url(_own_server: Any) -> str:
    """Overrides tests/server/conftest.py's: ``api`` talks to this file's own server."""
    return _own_server.url


@pytest.fixture
def engine(_own_server: Any) -> Iterator[sa.Engine]:
    """This file's own server's database."""
    engine = create_db_engine(_own_server.database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def finished_site(api, site_app, engine) -> Iterator[tuple[dict, dict, int]]:
    """A site with FINISHED finished jobs tagged ``campaign: c0`` to ``c9`` (a few of them waiting for
    the file cleaner), and the owner's user id; the copies are deleted afterwards."""
    site, app = site_app
    [seed] = api.jobs(app["id"], 1)
    columns = [c.name for c in jobs.columns if c.name not in ("id", "state", "pending_file_cleanup", "session_id", "tags")]
    names = ", ".join(columns)
    tags = "jsonb_build_object" if engine.dialect.name == "postgresql" else "json_object"
    with engine.begin() as conn:
        conn.execute(sa.text(
            f"INSERT INTO jobs ({names}, tags, state, pending_file_cleanup) "
            f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {FINISHED}) "
            f"SELECT {names}, {tags}('campaign', 'c' || (n.i % 10)), 'JOB_FINISHED', n.i % 500 = 0 "
            "FROM jobs, n WHERE jobs.id = :seed"), {"seed": seed["id"]})
        user_id = conn.execute(sa.select(sites.c.owner_id).where(sites.c.id == site["id"])).scalar_one()
    _analyze(engine)
    yield site, app, user_id
    with engine.begin() as conn:
        conn.execute(sa.delete(jobs).where(jobs.c.app_id == app["id"], jobs.c.state == "JOB_FINISHED"))


def _analyze(engine: sa.Engine) -> None:
    """Statistics of the jobs as they are now, on PostgreSQL (as autovacuum keeps them). SQLite: none
    (a server's database usually has none, the case its plans are made for)."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE jobs")


def _recorded_plans(engine: sa.Engine, run: Callable[[sa.Connection], Any], table: str = "jobs") -> list[str]:
    """Run ``run`` (a server function) on a connection, then the plan of each SELECT it sent that
    reads ``table``, explained with the parameters it was sent with (and the planner's settings as
    they are: a sort of a few rows is what makes ANDing the GIN index's bitmap look cheap)."""
    sent: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        sent.append((statement, parameters))

    with engine.connect() as conn:
        sa.event.listen(conn, "before_cursor_execute", record)
        try:
            with conn.begin():
                run(conn)
        finally:
            sa.event.remove(conn, "before_cursor_execute", record)
        pg = conn.dialect.name == "postgresql"
        plans = []
        for statement, parameters in sent:
            if not statement.lstrip().upper().startswith("SELECT") or f"FROM {table}" not in statement:
                continue
            with conn.begin():
                rows = conn.exec_driver_sql(("EXPLAIN (FORMAT JSON) " if pg else "EXPLAIN QUERY PLAN ") + statement,
                                            parameters).all()
            plans.append(str(rows[0][0]) if pg else " | ".join(str(row[-1]) for row in rows))
    assert plans, sent
    return plans


def _scans_whole(plan: str, table: str) -> bool:
    """Whether an explained plan reads every row of ``table`` (PostgreSQL's Seq Scan node, SQLite's
    SCAN without an index)."""
    if plan.startswith("[{"):
        nodes = [ast.literal_eval(plan)[0]["Plan"]]
        while nodes:
            node = nodes.pop()
            if node.get("Node Type") in ("Seq Scan", "Parallel Seq Scan") and node.get("Relation Name") == table:
                return True
            nodes.extend(node.get("Plans", []))
        return False
    return any(step.strip().startswith(f"SCAN {table}") and "INDEX" not in step for step in plan.split("|"))


def _query(**params: Any) -> QueryParams:
    items = [(k, str(v)) for k, values in params.items() for v in (values if isinstance(values, list) else [values])]
    return QueryParams(StarletteQueryParams(items))


@pytest.mark.parametrize("listing", [list_jobs, list_jobs_json, list_job_columns])
def test_file_cleaner_listing_reads_its_partial_index(finished_site, engine, listing):
    """The file cleaner's request (site_agent's file_cleaner: ``Job.objects.filter(site_id=...,
    state="JOB_FINISHED", pending_file_cleanup=True)[:batch]``), as each job listing answers it:
    the count and the page read ``ix_jobs_cleanup``, not the site's finished jobs."""
    site, _app, user_id = finished_site
    q = _query(site_id=site["id"], state="JOB_FINISHED", pending_file_cleanup="true", limit=100, offset=0)
    answers = []
    plans = _recorded_plans(engine, lambda conn: answers.append(listing(conn, user_id, q, 100, 0)))
    assert answers[0][0] == FINISHED // 500  # the count: exactly the jobs waiting for the cleaner
    for plan in plans:
        assert "ix_jobs_cleanup" in plan, plan
        assert "ix_jobs_site_id_state_id" not in plan and "SCAN jobs" not in plan, plan


def test_other_finished_listings_keep_their_plan(finished_site, engine):
    site, _app, user_id = finished_site
    q = _query(site_id=site["id"], state="JOB_FINISHED", pending_file_cleanup="false")
    answers = []
    for plan in _recorded_plans(engine, lambda conn: answers.append(list_jobs(conn, user_id, q, 10, 0))):
        assert "ix_jobs_cleanup" not in plan, plan
    assert answers[0][0] == FINISHED - FINISHED // 500


@pytest.mark.parametrize("states,serial_index,mpi_index", [
    (None, "ix_jobs_runnable_by_id", "ix_jobs_runnable_small_first"),
    (sorted(s.value for s in PROCESSABLE_STATES), "ix_jobs_processable_by_id", None)])
def test_acquires_with_tags_test_them_on_their_index_rows(api, finished_site, engine, states, serial_index, mpi_index):
    """A launcher's filter_tags (a campaign's tag, carried by every finished job of the campaign):
    on PostgreSQL the planner ANDed the partial index with the GIN index's bitmap of every job of
    the tag (10^6 jobs: an acquire 0.2 -> 17-38 ms)."""
    site, app, _user_id = finished_site
    ids = [i for k in range(10) for i in runnable(api, app["id"], 7, tags={"campaign": f"c{k}"})]
    if states:
        api.patch_states(ids, "RUNNING")
        api.patch_states(ids, "RUN_DONE")
    _analyze(engine)
    base = {"states": states} if states else {}
    requests = [({"max_wall_time_min": 30}, serial_index),
                ({"max_wall_time_min": 30, "serial_only": True, "max_nodes_per_job": 1}, serial_index)]
    if mpi_index:
        requests.append(({"max_wall_time_min": 30, "max_aggregate_nodes": 4.0}, mpi_index))
    for extra, _index in requests:  # the index once expected (see below)
        spec = _spec(**base, filter_tags={"campaign": "c3"}, max_num_jobs=100, **extra)
        # The statement the acquire runs (locked), explained as sent: the launcher's batch of 100.
        stmt = candidates(site["id"], spec, engine.dialect.name)
        [plan] = _recorded_plans(engine, lambda conn: conn.execute(stmt).all())
        # Which index the planner then takes depends on the statistics of the moment (a parallel
        # run's other tests, autovacuum; CI picked another than the leasable ones): what the fix is
        # about is that the GIN index over every tagged job, finished ones included, is not read.
        assert "ix_jobs_tags_gin" not in plan, (extra, plan)


def test_backlog_with_tags_tests_them_on_the_states_rows(api, finished_site, engine):
    site, app, _user_id = finished_site
    for k in range(10):
        runnable(api, app["id"], 7, tags={"campaign": f"c{k}"})
    _analyze(engine)
    answers = []
    plans = _recorded_plans(engine, lambda conn: answers.append(backlog_by_state(
        conn, site["id"], ["PREPROCESSED", "RESTART_READY"], {"campaign": "c3"}, leased=False, max_wall_time_min=30,
        serial_only=True)))
    assert answers[0]["PREPROCESSED"]["count"] == 7
    for plan in plans:
        assert "ix_jobs_tags_gin" not in plan, plan
        assert "ix_jobs_runnable" in plan or "ix_jobs_site_id_state_id" in plan, plan


def test_events_of_a_state_read_their_index(api, site_app, engine):
    site, app = site_app
    ids = runnable(api, app["id"], 5)
    with engine.connect() as conn:
        user_id = conn.execute(sa.select(sites.c.owner_id).where(sites.c.id == site["id"])).scalar_one()
    for ordering in ("-timestamp", "timestamp"):
        q = _query(to_state="PREPROCESSED", ordering=ordering)
        answers = []

        def listing(conn: sa.Connection) -> None:
            stmt, order = events_select(user_id, q, conn.dialect.name)
            answers.append(count_and_page(conn, stmt, order, 2, 0))

        for plan in _recorded_plans(engine, listing, table="log_events"):
            # Through the new index, or (a user with few jobs, as here) through the user's jobs and
            # ix_log_events_job_id: either way never a scan of every event.
            assert not _scans_whole(plan, "log_events"), plan
            assert "ix_log_events_to_state_timestamp" in plan or "ix_log_events_job_id" in plan, plan
        assert answers[0][0] == len(ids) and len(answers[0][1]) == 2


def test_a_listing_that_ends_on_its_page_is_not_counted_again(api, site_app, engine):
    """The count stays exact on every page (Balsam 0.7's client plans its pages from the count of
    its first request, ours takes the count of its last page): it is taken from the page when the
    page ends the listing, else counted."""
    site, app = site_app
    ids = runnable(api, app["id"], 5)  # 2 events each: CREATED -> ... -> PREPROCESSED
    with engine.connect() as conn:
        user_id = conn.execute(sa.select(sites.c.owner_id).where(sites.c.id == site["id"])).scalar_one()
        everything = events_select(user_id, _query(site_id=site["id"]), conn.dialect.name)[0]
        total = conn.execute(sa.select(sa.func.count()).select_from(everything.subquery())).scalar_one()
    assert total >= len(ids)

    def page(limit: int, offset: int, **filters: Any) -> tuple[int, int, bool]:
        sent: list[str] = []
        with engine.connect() as conn:
            sa.event.listen(conn, "before_cursor_execute", lambda *args: sent.append(args[2]))
            stmt, order = events_select(user_id, _query(site_id=site["id"], **filters), conn.dialect.name)
            count, rows = count_and_page(conn, stmt, order, limit, offset)
        return count, len(rows), any("count(" in s.lower() for s in sent)

    assert page(100, 0, job_id=ids[0])[0] == page(100, 0, job_id=ids[0])[1] > 0
    assert page(100, 0, job_id=ids[0])[2] is False  # one job's events: one page, no count query
    assert page(100, 0) == (total, total, False)
    assert page(100, 3) == (total, total - 3, False)  # the last page, at an offset
    assert page(total, 0) == (total, total, False)  # exactly full
    assert page(2, 0) == (total, 2, True)  # more beyond the page: counted
    assert page(2, 2) == (total, 2, True)
    assert page(2, total + 5) == (total, 0, True)  # past the end: counted
    assert page(0, 0) == (total, 0, True)  # a count request
