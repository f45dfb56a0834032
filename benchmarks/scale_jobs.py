"""The REST API at 10^6 jobs in one database, beside the same calls at 10^4 (the peer, same run).

For each backend (SQLite in a temp dir; PostgreSQL in ``balsam_bench_scale``, recreated) a real
uvicorn server is started, one user with two sites is registered, and the database is filled with
SQL (``dashboard_jobs_page.fill``: realistic states, ten ``campaign`` tags). Then, first at the
small size and again after growing to the large one, through the routes the Python API uses:

- **insert**: the SQL fill rate, and ``POST /jobs/`` of 5,000 jobs into the full database
  (``Job.objects.bulk_create``);
- **page**: ``GET /jobs/?tags=campaign:c3&state=RUNNING&limit=100`` (a filtered page, count
  included), limit 20 ms on PostgreSQL and 50 ms on SQLite;
- **counts**: ``GET /jobs/?state=S&limit=0`` for each state (``Job.objects.filter(state=S).count()``),
  limit 20 ms;
- **acquire**: a launcher Session leasing 100 runnable jobs (should not depend on the backlog), as
  serial mode asks (in id order) and as mpi mode asks (``max_aggregate_nodes``: ordered by size and
  wall time, then packed first-fit into the free nodes);
- **acquire after the finished jobs**: every leasable job of the site is set JOB_FINISHED and
  1,000 PREPROCESSED and 1,000 STAGED_IN jobs are appended (a campaign's new jobs after its
  finished ones: the layout where reading the table in id order passes every finished job); then
  the launchers' acquires and the processing module's (its states, id order);
- **server RSS** after all of it.

With ``--other-paths`` (``--jobs 100000`` is enough: each size gets a database of its own, made
and, on PostgreSQL, dropped after), the paths beyond those targets instead, each beside the same
call at ``--small`` jobs: the site is filled as above, plus nine events per job (a second apart,
over days) and a DAG (a tenth of the jobs children of others); then through the REST routes the
Python API and the site agent use:

- events: of one job (``EventLog.objects.filter(job_id=...)``), of one state (``to_state``), of one
  hour (``timestamp_after/_before``): pages of 100, count included;
- ``GET /jobs/?parent_id=`` (a DAG's children; the file cleaner's busy-children check);
- ``last_update``: a poll for the jobs changed since a time (100 changed just before:
  ``Job.objects.filter(last_update_after=t)``) and the page of the jobs changed last
  (``order_by("-last_update")``);
- bulk writes, once each: ``PUT /jobs/?state=FAILED`` to RESTART_READY (1 % of the jobs), a
  ``PATCH`` of 5,000 jobs' ``data``, ``DELETE /jobs/?tags=campaign:c0`` (10 % of the jobs, with
  their events and children);
- server RSS at the end.

SQLite is measured as a server leaves its database: without planner statistics (the server never
runs ANALYZE; nor do its users). ``--sqlite-analyze`` runs ANALYZE after each fill, as this script
did before 7 December, to see what statistics change. PostgreSQL's are taken after each fill
(``VACUUM ANALYZE``), as its autovacuum does in a running server.

    python benchmarks/scale_jobs.py [--jobs 1000000] [--small 10000] [--backends sqlite,postgresql] [--repeat 9]
    python benchmarks/scale_jobs.py --other-paths --jobs 100000 [--small 10000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import psutil
import sqlalchemy as sa

from bench_server import drop_pg, open_user_site, prepare_pg, start_server
from dashboard_jobs_page import fill

PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/balsam_bench_scale"
LIMITS_MS = {"sqlite": {"page": 50.0, "count": 20.0}, "postgresql": {"page": 20.0, "count": 20.0}}
STATES = ("JOB_FINISHED", "STAGED_IN", "RUNNING", "PREPROCESSED", "RESTART_READY", "FAILED")


def timed_ms(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    fn()  # warm-up
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(round(0.95 * (len(samples) - 1))))]


def get_ok(api: httpx.Client, path: str, **params: Any) -> dict[str, Any]:
    answer = api.get(path, params=params)
    answer.raise_for_status()
    return answer.json()


def measure(api: httpx.Client, site_id: int, app_id: int, repeat: int, tag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["page"] = timed_ms(lambda: get_ok(api, "/jobs/", tags="campaign:c3", state="RUNNING", limit=100), repeat)
    counts = {s: timed_ms(lambda s=s: get_ok(api, "/jobs/", state=s, limit=0), repeat) for s in STATES}
    out["count"] = max(counts.values())  # the slowest state
    out["count_state"] = max(counts, key=lambda s: counts[s][0])
    rows = [{"workdir": f"ins/{tag}/{i}", "app_id": app_id, "tags": {"ins": tag}} for i in range(5000)]
    start = time.perf_counter()
    api.post("/jobs/", json=rows).raise_for_status()
    out["insert_rate"] = 5000 / (time.perf_counter() - start)
    api.request("DELETE", "/jobs/", params={"tags": f"ins:{tag}"}).raise_for_status()
    serial = {"max_num_jobs": 100, "filter_tags": {}, "states": ["PREPROCESSED", "RESTART_READY"], "max_nodes_per_job": 1,
              "max_wall_time_min": 60, "serial_only": False, "max_aggregate_nodes": None}
    # What mpi mode sends: room for 100 single-node jobs, packed first-fit in size order.
    mpi = dict(serial, max_aggregate_nodes=100.0)
    for key, body in (("acquire", serial), ("acquire_mpi", mpi)):
        samples = []
        for _ in range(repeat + 1):  # a new Session each time; deleting it gives the jobs back
            session = api.post("/sessions/", json={"site_id": site_id}).json()
            start = time.perf_counter()
            got = api.post(f"/sessions/{session['id']}", json=body)
            samples.append((time.perf_counter() - start) * 1000)
            got.raise_for_status()
            assert len(got.json()) == 100, str(got.json())[:300]
            api.delete(f"/sessions/{session['id']}").raise_for_status()
        samples = sorted(samples[1:])
        out[key] = (statistics.median(samples), samples[min(len(samples) - 1, int(round(0.95 * (len(samples) - 1))))])
    return out


def acquire_ms(api: httpx.Client, site_id: int, body: dict[str, Any], repeat: int) -> tuple[float, float]:
    """Median and p95 ms of ``body``'s acquire, each in a new Session (deleting it gives the jobs back)."""
    samples = []
    for _ in range(repeat + 1):
        session = api.post("/sessions/", json={"site_id": site_id}).json()
        start = time.perf_counter()
        got = api.post(f"/sessions/{session['id']}", json=body)
        samples.append((time.perf_counter() - start) * 1000)
        got.raise_for_status()
        assert len(got.json()) == body["max_num_jobs"], str(got.json())[:300]
        api.delete(f"/sessions/{session['id']}").raise_for_status()
    samples = sorted(samples[1:])
    return statistics.median(samples), samples[min(len(samples) - 1, int(round(0.95 * (len(samples) - 1))))]


NEW_JOBS_SQL = "CASE WHEN i % 2 = 0 THEN 'PREPROCESSED' ELSE 'STAGED_IN' END"
PROCESSABLE = ["RUN_DONE", "RUN_ERROR", "RUN_TIMEOUT", "STAGED_IN"]


def measure_after_finished(engine: Any, api: httpx.Client, site_id: int, app_id: int, start: int, repeat: int) -> dict[str, Any]:
    """The acquires once the site's jobs are all finished but 2,000 appended after them."""
    import sqlalchemy as sa

    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE jobs SET state = 'JOB_FINISHED' WHERE site_id = :site AND state IN "
                             "('PREPROCESSED', 'RESTART_READY', 'STAGED_IN', 'RUN_DONE', 'RUN_ERROR', 'RUN_TIMEOUT')"),
                     {"site": site_id})
    fill(engine, app_id, site_id, start, 2000, NEW_JOBS_SQL)
    serial = {"max_num_jobs": 100, "filter_tags": {}, "states": ["PREPROCESSED", "RESTART_READY"], "max_nodes_per_job": 1,
              "max_wall_time_min": 60, "serial_only": False, "max_aggregate_nodes": None}
    return {
        "tail_acquire": acquire_ms(api, site_id, serial, repeat),
        "tail_acquire_mpi": acquire_ms(api, site_id, dict(serial, max_aggregate_nodes=100.0), repeat),
        "tail_processing": acquire_ms(api, site_id, {"max_num_jobs": 100, "filter_tags": {}, "states": PROCESSABLE}, repeat),
    }


def run_backend(name: str, database_url: str, small: int, large: int, repeat: int, workdir: Path,
                sqlite_analyze: bool) -> None:
    from balsam.server.db import create_db_engine
    from balsam.server.migrate import upgrade_engine

    engine = create_db_engine(database_url)
    upgrade_engine(engine)
    proc, url = start_server(workdir, database_url, home=workdir / "home", create_tables=False)
    try:
        api, site, app, *_ = open_user_site(url, "scale")
        results = {}
        filled = 0
        for size in (small, large):
            start = time.perf_counter()
            fill(engine, app["id"], site["id"], filled, size - filled)
            fill_sec = time.perf_counter() - start
            if engine.dialect.name == "postgresql":
                with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.exec_driver_sql("VACUUM ANALYZE jobs")
            elif sqlite_analyze:
                with engine.begin() as conn:
                    conn.exec_driver_sql("ANALYZE")
            rate = (size - filled) / fill_sec
            filled = size
            results[size] = measure(api, site["id"], app["id"], repeat, f"{name}{size}")
            results[size]["fill_rate"] = rate
            results[size].update(measure_after_finished(engine, api, site["id"], app["id"], filled, repeat))
            filled += 2000
        rss = psutil.Process(proc.pid).memory_info().rss / 2**20
        lim = LIMITS_MS[name]
        stats = " (ANALYZEd)" if name == "sqlite" and sqlite_analyze else ""
        print(f"\n[{name}{stats}] median / p95 in ms; peer: the same call at {small:,} jobs, this run; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"{'figure':<60} {small:>12,} {large:>12,}   limit")

        def row(label: str, key: str, limit: Any = None) -> None:
            a, b = results[small][key], results[large][key]
            cells = [f"{a[0]:6.1f}/{a[1]:5.1f}", f"{b[0]:6.1f}/{b[1]:5.1f}"]
            verdict = "" if limit is None else (f"{limit:.0f} ms {'ok' if b[0] < limit else 'OVER'}")
            print(f"{label:<60} {cells[0]:>12} {cells[1]:>12}   {verdict}")

        row("page: tags=campaign:c3 & state=RUNNING, limit 100", "page", lim["page"])
        row(f"count of one state (slowest: {results[large]['count_state']})", "count", lim["count"])
        row("acquire 100 jobs (Session), serial mode's request", "acquire")
        row("acquire 100 jobs (Session), mpi mode's request", "acquire_mpi")
        row("new jobs after the finished ones: serial mode's acquire", "tail_acquire")
        row("new jobs after the finished ones: mpi mode's acquire", "tail_acquire_mpi")
        row("new jobs after the finished ones: processing module's", "tail_processing")
        print(f"{'insert: SQL fill, jobs/s':<60} {results[small]['fill_rate']:>12,.0f} {results[large]['fill_rate']:>12,.0f}")
        print(f"{'insert: POST /jobs/ 5,000 into the database, jobs/s':<60} {results[small]['insert_rate']:>12,.0f} "
              f"{results[large]['insert_rate']:>12,.0f}")
        print(f"{'server RSS after the run':<60} {rss:>25.0f} MiB")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        engine.dispose()


def median_ms(fn: Callable[[], Any], repeat: int) -> float:
    return timed_ms(fn, repeat)[0]


def once_ms(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def fill_events_and_dag(engine: sa.Engine, n: int, sqlite_analyze: bool) -> list[int]:
    """Nine events per job, a second apart going back from now, and job ``n/2 + i`` a child of
    job ``i`` for the first tenth; the jobs' ids in order."""
    pg = engine.dialect.name == "postgresql"
    with engine.begin() as conn:
        if pg:
            conn.exec_driver_sql(
                "INSERT INTO log_events (job_id, timestamp, from_state, to_state, data) SELECT j.id, "
                "now() - ((j.id * 10 + k) || ' seconds')::interval, 'RUNNING', "
                "CASE WHEN k %% 3 = 0 THEN 'RUN_DONE' ELSE 'RUNNING' END, '{}'::jsonb FROM jobs j, generate_series(1, 9) k")
        else:
            conn.exec_driver_sql(
                "INSERT INTO log_events (job_id, timestamp, from_state, to_state, data) SELECT j.id, "
                "strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || (j.id * 10 + k.i) || ' seconds'), 'RUNNING', "
                "CASE WHEN k.i % 3 = 0 THEN 'RUN_DONE' ELSE 'RUNNING' END, '{}' FROM jobs j, "
                "(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 9) SELECT i FROM n) k")
        ids = [row[0] for row in conn.exec_driver_sql("SELECT id FROM jobs ORDER BY id")]
        conn.execute(sa.text("INSERT INTO job_parents (child_id, parent_id) VALUES (:c, :p)"),
                     [{"c": ids[n // 2 + i], "p": ids[i]} for i in range(n // 10)])
    if pg:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    elif sqlite_analyze:
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    return ids


def other_paths_size(name: str, database_url: str, n: int, repeat: int, workdir: Path,
                     sqlite_analyze: bool) -> dict[str, float]:
    from balsam.server.db import create_db_engine
    from balsam.server.migrate import upgrade_engine

    out: dict[str, float] = {}
    engine = proc = None
    try:  # from the database's creation on: whatever fails after it, the finally drops it
        if name == "postgresql":
            prepare_pg(database_url)
        engine = create_db_engine(database_url)
        upgrade_engine(engine)
        proc, url = start_server(workdir, database_url, home=workdir / "home", create_tables=False)
        api, site, app, *_ = open_user_site(url, f"other{n}")
        for start in range(0, n, 50_000):  # in batches: one statement per 50,000 jobs
            fill(engine, app["id"], site["id"], start, min(50_000, n - start))
        ids = fill_events_and_dag(engine, n, sqlite_analyze)

        def get(path: str, **params: Any) -> Any:
            answer = api.get(path, params=params)
            answer.raise_for_status()
            return answer.json()

        now = dt.datetime.now(dt.timezone.utc)
        hour = {"timestamp_after": (now - dt.timedelta(hours=2)).isoformat(), "timestamp_before": (now - dt.timedelta(hours=1)).isoformat()}
        out["ev_job"] = median_ms(lambda: get("/events/", job_id=ids[n // 3], limit=100), repeat)
        out["ev_state"] = median_ms(lambda: get("/events/", to_state="RUN_DONE", limit=100), repeat)
        out["ev_hour"] = median_ms(lambda: get("/events/", limit=100, **hour), repeat)
        out["children"] = median_ms(lambda: get("/jobs/", parent_id=",".join(map(str, ids[:100])), limit=100), repeat)
        since = dt.datetime.now(dt.timezone.utc).isoformat()
        api.patch("/jobs/", json=[{"id": i, "data": {"seen": 1}} for i in ids[1::n // 100][:100]]).raise_for_status()
        out["poll"] = median_ms(lambda: get("/jobs/", last_update_after=since, limit=100), repeat)
        out["latest"] = median_ms(lambda: get("/jobs/", ordering="-last_update", limit=100), repeat)
        out["put_state"] = once_ms(lambda: api.put("/jobs/", params={"state": "FAILED"}, json={"state": "RESTART_READY"}).raise_for_status())
        some = ids[::max(1, len(ids) // 5000)][:5000]  # 5,000 jobs spread over the table
        out["patch_data"] = once_ms(lambda: api.patch("/jobs/", json=[{"id": i, "data": {"k": i}} for i in some]).raise_for_status())
        out["delete"] = once_ms(lambda: api.request("DELETE", "/jobs/", params={"tags": "campaign:c0"}).raise_for_status())
        out["rss"] = psutil.Process(proc.pid).memory_info().rss / 2**20
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        if engine is not None:
            engine.dispose()
        if name == "postgresql":
            drop_pg(database_url)
    return out


OTHER_ROWS = [
    ("ev_job", "events of one job, page of 100"),
    ("ev_state", "events to_state=RUN_DONE, page of 100 (exact count of all)"),
    ("ev_hour", "events of one hour, page of 100"),
    ("children", "jobs ?parent_id= (100 parents)"),
    ("poll", "jobs ?last_update_after= (100 changed since)"),
    ("latest", "jobs ?ordering=-last_update, page of 100"),
    ("put_state", "PUT ?state=FAILED -> RESTART_READY (1 % of jobs), once"),
    ("patch_data", "PATCH 5,000 jobs' data, once"),
    ("delete", "DELETE ?tags=campaign:c0 (10 %, events, children), once"),
]


def run_other_paths(backend: str, pg_url: str, small: int, large: int, repeat: int, sqlite_analyze: bool) -> None:
    """``--other-paths``: each size in a database of its own (PostgreSQL's made and dropped)."""
    results = {}
    for n in (small, large):
        workdir = Path(tempfile.mkdtemp(prefix=f"balsam-other-{backend}-"))
        try:
            url = f"sqlite:///{workdir / 'balsam.db'}" if backend == "sqlite" else pg_url
            results[n] = other_paths_size(backend, url, n, repeat, workdir, sqlite_analyze)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    stats = " (ANALYZEd)" if backend == "sqlite" and sqlite_analyze else ""
    print(f"\n[{backend}{stats}] other paths, median ms; peer: the same call at {small:,} jobs, this run; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'figure':<62} {small:>10,} {large:>10,}   ratio (jobs x{large / small:.0f})")
    for key, label in OTHER_ROWS:
        a, b = results[small][key], results[large][key]
        print(f"{label:<62} {a:>10.1f} {b:>10.1f}   x{b / max(a, 1e-3):.1f}")
    print(f"{'server RSS at the end, MiB':<62} {results[small]['rss']:>10.0f} {results[large]['rss']:>10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--pg-url", default=os.environ.get("BALSAM_BENCH_DATABASE_URL", PG_DEFAULT))
    parser.add_argument("--other-paths", action="store_true",
                        help="the paths beyond the targets instead (events, children, last_update, bulk writes; see above)")
    parser.add_argument("--sqlite-analyze", action="store_true",
                        help="run ANALYZE on SQLite after each fill (a server never does: off by default)")
    args = parser.parse_args()
    if args.other_paths and args.jobs > 500_000:
        # Its PUT moves the FAILED jobs (1 %) in one call, at most 5,000 (the bulk routes' cap).
        parser.error(f"--other-paths takes at most 500,000 --jobs ({args.jobs:,})")
    if args.jobs < args.small + 2000:
        # Each size's measurement appends 2,000 new jobs; the large fill starts after them.
        parser.error(f"--jobs ({args.jobs:,}) must be at least --small + 2,000 ({args.small + 2000:,})")
    # SIGTERM unwinds through the finally blocks: servers stopped, temp dirs removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.other_paths:
        for backend in args.backends.split(","):
            run_other_paths(backend, args.pg_url, args.small, args.jobs, args.repeat, args.sqlite_analyze)
        return
    for backend in args.backends.split(","):
        workdir = Path(tempfile.mkdtemp(prefix=f"balsam-scale-{backend}-"))
        try:
            if backend == "sqlite":
                url = f"sqlite:///{workdir / 'balsam.db'}"
            else:
                url = args.pg_url
                prepare_pg(url)
            run_backend(backend, url, args.small, args.jobs, args.repeat, workdir, args.sqlite_analyze)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
