"""The dashboard's plots data (``plot_data``) of a site with active allocations: its time beside the
plain read of the same events, measured in the same run.

For each backend (SQLite in a temp dir; PostgreSQL in the database ``balsam_bench_dashboard_plots``,
recreated) the schema is created and filled directly with SQL: ``--jobs`` jobs (default 50,000)
spread over ``--batch-jobs`` running BatchJobs (default 20, submitted a minute apart, each with a
start_time recorded some 20 s after its first job ran), each job with its 7 state changes CREATED
-> ... -> JOB_FINISHED. Then, each ``--repeat`` times (after one warm-up), median and minimum printed:

- ``plot_data``: everything the plots page draws (throughput, busy, held);
- the peer: the plain read of the events plot_data reads (the site's RUNNING changes and its
  JOB_FINISHED ones), the floor of what plot_data can cost;
- ``first_runs`` alone (the active BatchJobs' first runs, one statement per 200 BatchJobs), beside
  the same statement without its overall time range (which lets the planner range-scan the
  ``(to_state, timestamp)`` index instead of reading every RUNNING event).

    python benchmarks/dashboard_plots.py [--jobs 50000] [--batch-jobs 20] [--backends sqlite,postgresql] [--repeat 9]
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import sqlalchemy as sa
from starlette.datastructures import QueryParams as StarletteQuery

from bench_server import prepare_pg

PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/balsam_bench_dashboard_plots"
T0 = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
CHAIN = ["CREATED", "READY", "STAGED_IN", "PREPROCESSED", "RUNNING", "RUN_DONE", "POSTPROCESSED", "JOB_FINISHED"]


def fill(url: str, n_jobs: int, n_bj: int) -> tuple[int, int]:
    """The campaign (see the module docstring); returns (user id, site id)."""
    from balsam.server.app import create_app
    from balsam.server.settings import ServerSettings
    from balsam.server.tables import apps, batch_jobs, jobs, log_events, sites, users

    app = create_app(settings=ServerSettings(database_url=url, secret_key="bench-plots-0123456789-abcdefghijklmnop"),
                     create_tables_now=True)
    engine = app.state.engine
    rng = random.Random(1)
    with engine.begin() as conn:
        user = conn.execute(sa.insert(users).values(username="bench", hashed_password="x", date_joined=T0)
                            .returning(users.c.id)).scalar_one()
        site = conn.execute(sa.insert(sites).values(
            owner_id=user, name="s", path="/s", backfill_windows={}, queued_jobs={}, optional_batch_job_params={},
            allowed_projects=[], allowed_queues={}, transfer_locations={}, last_refresh=T0, creation_date=T0,
        ).returning(sites.c.id)).scalar_one()
        app_id = conn.execute(sa.insert(apps).values(site_id=site, name="A", description="", serialized_class="",
                                                     source_code="", parameters={}, transfers={})
                              .returning(apps.c.id)).scalar_one()
        bjs = []
        for b in range(n_bj):
            submitted = T0 + dt.timedelta(seconds=60 * b)
            bjs.append(conn.execute(sa.insert(batch_jobs).values(
                site_id=site, project="p", queue="q", optional_params={}, num_nodes=8, wall_time_min=600,
                job_mode="mpi", partitions=None, filter_tags={}, state="running", scheduler_id=b + 1,
                status_info={"submit_time": submitted.isoformat()}, start_time=submitted + dt.timedelta(seconds=60),
                end_time=None).returning(batch_jobs.c.id)).scalar_one())
        step = 5000
        for first in range(0, n_jobs, step):
            rows = [dict(site_id=site, app_id=app_id, workdir=f"w{i}", tags={"k": str(i % 3)}, serialized_parameters="",
                         data={}, num_nodes=1, ranks_per_node=1, threads_per_rank=1, threads_per_core=1, launch_params={},
                         gpus_per_rank=0.0, node_packing_count=1, wall_time_min=0, parent_ids=[], state="JOB_FINISHED",
                         pending_file_cleanup=False, serialized_return_value="", serialized_exception="", last_update=T0,
                         batch_job_id=bjs[i % n_bj]) for i in range(first, min(n_jobs, first + step))]
            ids = conn.execute(sa.insert(jobs).returning(jobs.c.id), rows).scalars().all()
            events = []
            for k, job_id in enumerate(ids):
                i = first + k
                when = T0 + dt.timedelta(seconds=60 * (i % n_bj) + 25 + i * 0.5)
                for old, new in zip(CHAIN, CHAIN[1:]):
                    when += dt.timedelta(seconds=rng.random() * 5)
                    events.append({"job_id": job_id, "from_state": old, "to_state": new, "timestamp": when,
                                   "data": {"num_nodes": 1} if new == "RUNNING" else {}})
            conn.execute(sa.insert(log_events), events)
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
    engine.dispose()
    return user, site


def unbounded_first_runs(conn: sa.Connection, rows: list[Any]) -> dict[int, dt.datetime]:
    """``first_runs``'s statement without the chunk's overall time range (its terms only)."""
    from balsam.analytics import first_run_window
    from balsam.server.dashboard.plots import _submit_time
    from balsam.server.tables import jobs, log_events

    terms = []
    for row in rows:
        earliest, latest = first_run_window(_submit_time(row.status_info), row.start_time)
        term = [jobs.c.batch_job_id == row.id]
        if earliest is not None:
            term.append(log_events.c.timestamp >= earliest)
        if latest is not None:
            term.append(log_events.c.timestamp <= latest)
        terms.append(sa.and_(*term))
    stmt = (sa.select(jobs.c.batch_job_id, sa.func.min(log_events.c.timestamp))
            .join(jobs, jobs.c.id == log_events.c.job_id)
            .where(log_events.c.to_state == "RUNNING", jobs.c.batch_job_id.in_([row.id for row in rows]), sa.or_(*terms))
            .group_by(jobs.c.batch_job_id))
    return {bj_id: when for bj_id, when in conn.execute(stmt)}


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times), min(times), result


def run(url: str, args: argparse.Namespace) -> None:
    from balsam.server.dashboard import plots
    from balsam.server.db import normalize_database_url
    from balsam.server.http import QueryParams
    from balsam.server.routes.batch_jobs import batch_jobs_select
    from balsam.server.routes.events import events_select
    from balsam.server.tables import log_events

    began = time.perf_counter()
    user, site = fill(url, args.jobs, args.batch_jobs)
    print(f"  filled {args.jobs} jobs, {args.jobs * (len(CHAIN) - 1)} events in {time.perf_counter() - began:.1f} s")
    q = QueryParams(StarletteQuery(f"site_id={site}"))
    engine = sa.create_engine(normalize_database_url(url))
    with engine.connect() as conn:
        dialect = conn.dialect.name

        def plain_read() -> int:
            stmt, _order = events_select(user, q, dialect)
            stmt = stmt.where(sa.or_(log_events.c.to_state.in_(["RUNNING", "JOB_FINISHED"]),
                                     log_events.c.from_state == "RUNNING"))
            return len(conn.execute(stmt).all())

        stmt, _order = batch_jobs_select(user, q, dialect)
        rows = list(conn.execute(stmt))
        figures = [
            ("plot_data", lambda: plots.plot_data(conn, user, q)),
            ("peer: plain read of its events", plain_read),
            ("first_runs (one statement)", lambda: plots.first_runs(conn, rows)),
            ("first_runs without its time range", lambda: unbounded_first_runs(conn, rows)),
        ]
        results = {}
        for name, fn in figures:
            median, best, results[name] = timed(fn, args.repeat)
            print(f"  {name:<36} median {median * 1000:8.1f} ms   min {best * 1000:8.1f} ms")
        same = results["first_runs (one statement)"] == results["first_runs without its time range"]
        print(f"  first_runs: {len(results['first_runs (one statement)'])} BatchJobs; same as without the range: {same}")
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--batch-jobs", type=int, default=20)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--pg-url", default=PG_DEFAULT)
    args = parser.parse_args()
    for backend in args.backends.split(","):
        print(f"{backend}:")
        if backend == "sqlite":
            with tempfile.TemporaryDirectory() as tmp:
                run(f"sqlite:///{Path(tmp) / 'plots.db'}", args)
        else:
            prepare_pg(args.pg_url)
            run(args.pg_url, args)


if __name__ == "__main__":
    main()
