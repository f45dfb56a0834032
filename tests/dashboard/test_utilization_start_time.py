"""The dashboard's utilization plot ("Nodes held") of an allocation that started before the site
agent recorded its start_time (SQLite and PostgreSQL).

The agent records a BatchJob's start_time when its status poll sees the job running, up to
``scheduler.sync_period`` after the launcher started its first job: the plot showed busy nodes where
none were held until then (a real agent with the local scheduler, sync_period 5 s: "Nodes held" rose
5.1 s after the scheduler started the job, the first job ran 0.3 s after it). The plot now counts an
active BatchJob's nodes from its first job's start at the latest, as the Python API does
(``balsam.analytics.first_runs_query``), read in one statement.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).parent))

from dashboard_helpers import login  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

T0 = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
NOW = 600


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


#: name -> (nodes, state, submitted, start_time, end_time), seconds after T0
BATCH_JOBS = {
    "running": (2, "running", 0, 5, None),      # its first job ran at 0.3, the agent saw it at 5
    "queued": (4, "queued", 100, None, None),   # the API still says queued; its launcher runs a job at 101
    "finished": (8, "finished", 200, 210, 300),  # ended: its start came from the scheduler's history
    "idle": (16, "running", 400, 405, None),    # no job ran in it yet: from its start_time
    "overlap": (4, "running", 10, 505, None),   # submitted at 10, really started at 500 (rev1 finding 1)
}
#: (job, BatchJob, RUNNING at, done at): "rerun" ran at -50 in an earlier allocation (before
#: "running" was submitted), then at 3 in "running"; "late" ran in "finished" after its start.
JOB_RUNS = [("first", "running", 0.3, 50), ("rerun", "running", -50, -40), ("rerun", "running", 3, 40),
            ("q1", "queued", 101, 150), ("late", "finished", 220, 250),
            # x ran at 60 in "running" (after "overlap" was submitted), failed, and ran again at 501 in
            # "overlap", its batch_job_id now: its run at 60 is more than FIRST_RUN_LOOKBACK before
            # overlap's recorded start, another allocation's.
            ("x", "overlap", 60, 70), ("x", "overlap", 501, 550)]


@pytest.fixture
def campaign(database_url: str) -> Iterator[SimpleNamespace]:
    from starlette.testclient import TestClient

    from balsam.server.app import create_app
    from balsam.server.auth import hash_password
    from balsam.server.settings import ServerSettings
    from balsam.server.tables import apps, batch_jobs, jobs, log_events, sites, users

    app = create_app(settings=ServerSettings(database_url=database_url,
                                             secret_key="utilization-start-0123456789-abcdefghijklmnop"),
                     create_tables_now=True)
    with app.state.engine.begin() as conn:
        user = conn.execute(sa.insert(users).values(username="carol", hashed_password=hash_password("pw-carol"),
                                                    date_joined=T0).returning(users.c.id)).scalar_one()
        site = conn.execute(sa.insert(sites).values(
            owner_id=user, name="site-c", path="/sites/c", backfill_windows={}, queued_jobs={},
            optional_batch_job_params={}, allowed_projects=[], allowed_queues={}, transfer_locations={},
            last_refresh=T0, creation_date=T0).returning(sites.c.id)).scalar_one()
        app_id = conn.execute(sa.insert(apps).values(
            site_id=site, name="Sim", description="", serialized_class="", source_code="", parameters={},
            transfers={}).returning(apps.c.id)).scalar_one()
        bj_ids = {}
        for name, (nodes, state, submitted, start, end) in BATCH_JOBS.items():
            bj_ids[name] = conn.execute(sa.insert(batch_jobs).values(
                site_id=site, project="p", queue="q", optional_params={}, num_nodes=nodes, wall_time_min=60,
                job_mode="mpi", partitions=None, filter_tags={}, state=state, scheduler_id=len(bj_ids) + 1,
                status_info={"submit_time": at(submitted).isoformat()},
                start_time=None if start is None else at(start), end_time=None if end is None else at(end),
            ).returning(batch_jobs.c.id)).scalar_one()
        job_ids = {}
        for job, bj, _run, _done in JOB_RUNS:
            if job not in job_ids:
                job_ids[job] = conn.execute(sa.insert(jobs).values(
                    site_id=site, app_id=app_id, workdir=job, tags={}, serialized_parameters="", data={},
                    num_nodes=1, ranks_per_node=1, threads_per_rank=1, threads_per_core=1, launch_params={},
                    gpus_per_rank=0.0, node_packing_count=1, wall_time_min=0, parent_ids=[], state="RUN_DONE",
                    pending_file_cleanup=False, serialized_return_value="", serialized_exception="",
                    last_update=T0, batch_job_id=bj_ids[bj]).returning(jobs.c.id)).scalar_one()
        conn.execute(sa.insert(log_events), [
            row for job, _bj, run, done in JOB_RUNS for row in (
                {"job_id": job_ids[job], "from_state": "PREPROCESSED", "to_state": "RUNNING", "timestamp": at(run),
                 "data": {"num_nodes": 1}},
                {"job_id": job_ids[job], "from_state": "RUNNING", "to_state": "RUN_DONE", "timestamp": at(done),
                 "data": {}})
        ])
    with TestClient(app) as client:
        yield SimpleNamespace(client=client, site=site, user=user, engine=app.state.engine)


def test_nodes_held_from_the_first_job_run_in_an_allocation_not_yet_seen_started(
        campaign: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam.server.dashboard import plots

    real = plots.plot_data
    monkeypatch.setattr("balsam.server.dashboard.views.plot_data",
                        lambda conn, user_id, q, **kw: real(conn, user_id, q, **{"now": at(NOW), **kw}))
    client = campaign.client
    assert login(client, "carol", "pw-carol").status_code == 303
    answer = client.get("/dashboard/plots/data", params={"site_id": campaign.site})
    assert answer.status_code == 200, answer.text
    util = answer.json()["utilization"]
    held = {round(t - T0.timestamp(), 3): a for t, a in zip(util["t"], util["available"])}
    # "running" from its first job's run since its submission (0.3; not the re-run's -50, an earlier
    # allocation's), "queued" from its job's run (101), "finished" from its start_time (its job ran
    # later), "idle" from its start_time; "overlap" from x's run in it (501), not from x's run in
    # "running" at 60 (it counted 4 more nodes from 60 on); the active ones until now.
    assert held == {-50: 0, -40: 0, 0.3: 2, 3: 2, 40: 2, 50: 2, 60: 2, 70: 2, 101: 6, 150: 6, 210: 14, 220: 14,
                    250: 14, 300: 6, 405: 22, 501: 26, 550: 26, NOW: 0}, held
    busy = dict(zip(held, util["busy"]))
    assert all(busy[t] <= held[t] for t in held if t >= 0), (busy, held)  # never busy beyond what is held


def test_first_runs_range_scans_the_running_events_index(campaign: SimpleNamespace) -> None:
    # rev1 finding 3: the statement read every RUNNING event (the index searched by to_state only).
    # rev6 finding 3: its one time range, from the oldest active BatchJob's window to the newest,
    # still covered every RUNNING event between allocations started hours apart. Each group of
    # overlapping windows now bounds its own scan: "running" [0, 5] apart from the others (from
    # "queued"'s submission at 100 on, its start not recorded). The plan, not a time.
    from starlette.datastructures import QueryParams as StarletteQuery

    from balsam.server.dashboard import plots
    from balsam.server.http import QueryParams

    engine = campaign.engine
    sent: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if "min(log_events.timestamp)" in statement:
            sent.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        with engine.connect() as conn:
            q = QueryParams(StarletteQuery(f"site_id={campaign.site}"))
            stmt, _order = plots.batch_jobs_select(campaign.user, q, conn.dialect.name)
            found = plots.first_runs(conn, list(conn.execute(stmt)))
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    assert len(found) == 3 and len(sent) == 1, (found, sent)
    statement, parameters = sent[0]
    assert statement.count("UNION ALL") == 1, statement  # two selects, one per group
    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        cursor = raw.cursor()
        if engine.dialect.name == "sqlite":
            cursor.execute("EXPLAIN QUERY PLAN " + statement, parameters)
            scans = [str(row[-1]) for row in cursor.fetchall() if "log_events" in str(row[-1])]
            index = "SEARCH log_events USING INDEX ix_log_events_to_state_timestamp "
            assert sorted(scans) == sorted([index + "(to_state=? AND timestamp>?)",
                                            index + "(to_state=? AND timestamp>? AND timestamp<?)"]), scans
        else:
            cursor.execute("SET enable_seqscan = off")  # these few rows: the planner would read them all
            cursor.execute("EXPLAIN " + statement, parameters)
            conds = [row[0].strip() for row in cursor.fetchall() if "Index Cond: (((to_state)" in row[0]]
            assert len(conds) == 2 and sum("\"timestamp\" <=" in cond for cond in conds) == 1, conds
        cursor.close()
