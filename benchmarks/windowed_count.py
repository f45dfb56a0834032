"""The dashboard's windowed job count beside the full count it bounds (``count=all``).

Filters the counters cannot answer (two tags, a workdir substring...) are counted over the user's
newest 10,000 jobs (``jobs_logic.count_jobs_by_state``); ``count=all`` counts every job. The window
should never be the slower way. For each backend (SQLite in a temp dir; PostgreSQL in
``balsam_bench_windowed``, recreated) a real uvicorn server is started, one user with one site is
registered and ``--jobs`` jobs are created through ``POST /jobs/`` (as the audit did: tags
``grp: i % 10`` and ``exp: scale``, workdir ``runs/i``; every seventh FAILED). PostgreSQL is measured
twice: right after the inserts, before any ANALYZE (the statistics know none of the jobs: a server
whose autovacuum is off or has not run yet, the audit's case), then after ``VACUUM ANALYZE``.

For each filter: the count alone (``count_jobs_by_state`` in this process, on the same database),
windowed and full, and the dashboard's jobs page (``GET /dashboard/jobs?...``, its page of jobs
included) windowed and with ``count=all``; medians and 95th percentiles in ms.

    python benchmarks/windowed_count.py [--jobs 100000] [--backends sqlite,postgresql] [--repeat 11]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlencode

import httpx

from bench_server import open_user_site, prepare_pg, start_server
from dashboard_jobs_page import login

PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/balsam_bench_windowed"
FILTERS = {
    "tags grp:3 & exp:scale (10%)": [("tags", "grp:3"), ("tags", "exp:scale")],
    "tags grp:3 & exp:scale, state FAILED": [("tags", "grp:3"), ("tags", "exp:scale"), ("state", "FAILED")],
    "tags grp:3 & exp:none (no job)": [("tags", "grp:3"), ("tags", "exp:none")],
    "workdir__contains runs/ (all)": [("workdir__contains", "runs/")],
    "workdir__contains runs/99 (1%)": [("workdir__contains", "runs/99")],
}


def timed_ms(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    fn()  # warm-up
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(round(0.95 * (len(samples) - 1))))]


def measure(engine: Any, client: httpx.Client, user_id: int, repeat: int) -> None:
    from starlette.datastructures import QueryParams as StarletteQueryParams

    from balsam.server.http import QueryParams
    from balsam.server.jobs_logic import count_jobs_by_state

    def cell(pair: tuple[float, float]) -> str:
        return f"{pair[0]:6.1f}/{pair[1]:6.1f}"

    print(f"{'filter':<40} {'count: window':>15} {'count: all':>15} {'page: window':>15} {'page: all':>15}")
    for label, items in FILTERS.items():
        q = QueryParams(StarletteQueryParams(items))
        with engine.connect() as conn:
            def count(window: "int | None" = 10_000) -> tuple[dict, bool]:
                with conn.begin():
                    return count_jobs_by_state(conn, user_id, q, window=window)

            windowed, full = timed_ms(count, repeat), timed_ms(lambda: count(None), repeat)
        path = f"/dashboard/jobs?{urlencode(items)}"
        page = timed_ms(lambda: client.get(path).raise_for_status(), repeat)
        page_all = timed_ms(lambda: client.get(f"{path}&count=all").raise_for_status(), repeat)
        print(f"{label:<40} {cell(windowed):>15} {cell(full):>15} {cell(page):>15} {cell(page_all):>15}", flush=True)


def run_backend(name: str, database_url: str, n_jobs: int, repeat: int, workdir: Path) -> None:
    import sqlalchemy as sa

    from balsam.server.db import create_db_engine
    from balsam.server.migrate import upgrade_engine

    engine = create_db_engine(database_url)
    upgrade_engine(engine)
    proc, url = start_server(workdir, database_url, home=workdir / "home", create_tables=False)
    try:
        api, site, app, username, password = open_user_site(url, "windowed")
        started = time.perf_counter()
        for start in range(0, n_jobs, 5000):
            rows = [{"app_id": app["id"], "workdir": f"runs/{i}", "tags": {"grp": str(i % 10), "exp": "scale"}}
                    for i in range(start, min(n_jobs, start + 5000))]
            made = api.post("/jobs/", json=rows)
            made.raise_for_status()
            failed = [{"id": job["id"], "state": "FAILED"} for job in made.json()[::7]]
            api.patch("/jobs/", json=failed).raise_for_status()
        with engine.connect() as conn:
            user_id = conn.execute(sa.text("SELECT id FROM users WHERE username = :u"), {"u": username}).scalar_one()
        client = login(url, username, password)
        print(f"\n[{name}] {n_jobs:,} jobs of one site created through POST /jobs/ in {time.perf_counter() - started:.1f} s; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        if engine.dialect.name == "postgresql":
            print("-- before any ANALYZE (the statistics know none of the jobs)")
            measure(engine, client, user_id, repeat)
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM ANALYZE jobs")
            print("-- after VACUUM ANALYZE jobs")
        measure(engine, client, user_id, repeat)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--repeat", type=int, default=11)
    parser.add_argument("--pg-url", default=os.environ.get("BALSAM_BENCH_DATABASE_URL", PG_DEFAULT))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: servers stopped, temp dirs removed
    for backend in args.backends.split(","):
        workdir = Path(tempfile.mkdtemp(prefix=f"balsam-windowed-{backend}-"))
        try:
            if backend == "sqlite":
                url = f"sqlite:///{workdir / 'balsam.db'}"
            else:
                url = args.pg_url
                prepare_pg(url)
            run_backend(backend, url, args.jobs, args.repeat, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
