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
- ``first_runs`` alone (the active BatchJobs' first runs, one statement per 200 BatchJobs: one
  select per group of overlapping windows, each range-scanning the ``(to_state, timestamp)`` index
  over its group's range), beside the single select of the chunk (the BatchJobs' windows OR-ed,
  bounded by their overall range), which it replaced, and beside that select without its range.

Then the same again with the allocations hours apart (as in a long campaign): the first BatchJob's
start_time unchanged, the others' 3 h later (each submitted 30 min before its start). Each window
is still 2 min wide, but the chunk's overall range covers 3 h of RUNNING events.

    python benchmarks/dashboard_plots.py [--jobs 50000] [--batch-jobs 20] [--backends sqlite,postgresql] [--repeat 9]

The PostgreSQL database is dropped at the end.
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

from bench_server import drop_pg, prepare_pg

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


def single_select_first_runs(conn: sa.Connection, rows: list[Any], bounded: bool = True) -> dict[int, dt.datetime]:
    """``first_runs``'s former statement: one select for the chunk, its BatchJobs' windows OR-ed,
    bounded by their overall range (from the oldest window to the newest; ``bounded=False``: not,
    as before that)."""
    from balsam.analytics import ACTIVE_BATCH_JOB_STATES, first_run_window, submit_time
    from balsam.server.tables import jobs, log_events

    terms, earliests, latests = [], [], []
    active = [row for row in rows if row.state in ACTIVE_BATCH_JOB_STATES]
    for row in active:
        earliest, latest = first_run_window(submit_time(row.status_info), row.start_time)
        term = [jobs.c.batch_job_id == row.id]
        if earliest is not None:
            term.append(log_events.c.timestamp >= earliest)
        if latest is not None:
            term.append(log_events.c.timestamp <= latest)
        terms.append(sa.and_(*term))
        earliests.append(earliest)
        latests.append(latest)
    where = [log_events.c.to_state == "RUNNING", jobs.c.batch_job_id.in_([row.id for row in active]), sa.or_(*terms)]
    if all(when is not None for when in earliests):
        where.append(log_events.c.timestamp >= min(earliests))
    if all(when is not None for when in latests):
        where.append(log_events.c.timestamp <= max(latests))
    if not bounded:
        where = where[:3]  # its terms only: the planner reads every RUNNING event of these BatchJobs
    stmt = (sa.select(jobs.c.batch_job_id, sa.func.min(log_events.c.timestamp))
            .join(jobs, jobs.c.id == log_events.c.job_id).where(*where).group_by(jobs.c.batch_job_id))
    return {bj_id: when for bj_id, when in conn.execute(stmt)}


def hours_apart(url: str) -> None:
    """The first BatchJob's start unchanged, the others' 3 h later (submitted 30 min before)."""
    from balsam.server.db import normalize_database_url
    from balsam.server.tables import batch_jobs

    engine = sa.create_engine(normalize_database_url(url))
    with engine.begin() as conn:
        ids = conn.execute(sa.select(batch_jobs.c.id).order_by(batch_jobs.c.id)).scalars().all()
        for k, bj_id in enumerate(ids[1:], start=1):
            start = T0 + dt.timedelta(hours=3, seconds=60 * k)
            conn.execute(sa.update(batch_jobs).where(batch_jobs.c.id == bj_id).values(
                start_time=start, status_info={"submit_time": (start - dt.timedelta(minutes=30)).isoformat()}))
    engine.dispose()


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times), min(times), result


def run(url: str, args: argparse.Namespace) -> None:
    from balsam.server.http import QueryParams

    began = time.perf_counter()
    user, site = fill(url, args.jobs, args.batch_jobs)
    print(f"  filled {args.jobs} jobs, {args.jobs * (len(CHAIN) - 1)} events in {time.perf_counter() - began:.1f} s")
    q = QueryParams(StarletteQuery(f"site_id={site}"))
    for layout in ("started within minutes", "started hours apart"):
        if layout == "started hours apart":
            hours_apart(url)
        print(f"  allocations {layout}:")
        measure(url, user, q, args.repeat)


def measure(url: str, user: int, q: Any, repeat: int) -> None:
    from balsam.server.dashboard import plots
    from balsam.server.db import normalize_database_url
    from balsam.server.routes.batch_jobs import batch_jobs_select
    from balsam.server.routes.events import events_select
    from balsam.server.tables import log_events

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
            ("first_runs (a select per overlap group)", lambda: plots.first_runs(conn, rows)),
            ("former single select (overall range)", lambda: single_select_first_runs(conn, rows)),
            ("single select without its range", lambda: single_select_first_runs(conn, rows, bounded=False)),
        ]
        results = {}
        for name, fn in figures:
            median, best, results[name] = timed(fn, repeat)
            print(f"    {name:<40} median {median * 1000:8.1f} ms   min {best * 1000:8.1f} ms")
        mine = results["first_runs (a select per overlap group)"]
        same = mine == results["former single select (overall range)"]
        unbounded = mine == results["single select without its range"]
        print(f"    first_runs: {len(mine)} BatchJobs; same as the former single select: {same}; "
              f"same as without the range: {unbounded}")
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
            try:
                run(args.pg_url, args)
            finally:
                drop_pg(args.pg_url)  # a manual run leaves no database behind


if __name__ == "__main__":
    main()
