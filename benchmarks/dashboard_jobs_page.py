"""The dashboard's jobs page with 10^6 jobs: time to answer, beside the 200 ms limit.

For each backend (SQLite in a temp dir; PostgreSQL in the database ``balsam_bench_dashboard``,
recreated) a real uvicorn server is started, two users are registered, and the database is filled
directly with SQL (the API would only slow the setup down): user A gets ``--jobs`` jobs (default
10^6) over two sites, in realistic states (60% JOB_FINISHED, 20% STAGED_IN, 10% RUNNING, 5%
PREPROCESSED, 4% RESTART_READY, 1% FAILED) with ten ``campaign`` tags; user B gets 10% as many.
Then user A logs in through the login form and each page below is fetched ``--repeat`` times
(after one warm-up); the median and the 95th percentile are printed beside the limit. The REST
API's own listing with a deep offset is measured in the same run as the peer (what a page would cost
with offset paging).

    python benchmarks/dashboard_jobs_page.py [--jobs 1000000] [--backends sqlite,postgresql] [--repeat 15]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import sqlalchemy as sa

from bench_server import prepare_pg, start_server

LIMIT_MS = 200.0
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/balsam_bench_dashboard"
STATES_SQL = (
    "CASE WHEN i % 100 < 60 THEN 'JOB_FINISHED' WHEN i % 100 < 80 THEN 'STAGED_IN' WHEN i % 100 < 90 THEN 'RUNNING' "
    "WHEN i % 100 < 95 THEN 'PREPROCESSED' WHEN i % 100 < 99 THEN 'RESTART_READY' ELSE 'FAILED' END"
)


def fill(engine: sa.Engine, app_id: int, site_id: int, start: int, count: int, states_sql: str = STATES_SQL) -> None:
    """``count`` jobs of one app in one statement (the database generates the rows); ``states_sql``
    gives the state of row ``i``."""
    pg = engine.dialect.name == "postgresql"
    series = (f"generate_series({start}, {start + count - 1}) AS i" if pg else
              f"(WITH RECURSIVE n(i) AS (SELECT {start} UNION ALL SELECT i + 1 FROM n WHERE i < {start + count - 1}) "
              f"SELECT i FROM n)")
    tags = "jsonb_build_object('campaign', 'c' || (i % 10))" if pg else "json_object('campaign', 'c' || (i % 10))"
    empty_obj, empty_list = ("'{}'::jsonb", "'[]'::jsonb") if pg else ("'{}'", "'[]'")
    now = "now()" if pg else "strftime('%Y-%m-%d %H:%M:%f', 'now')"
    sql = (
        "INSERT INTO jobs (site_id, app_id, workdir, tags, serialized_parameters, data, num_nodes, ranks_per_node, "
        "threads_per_rank, threads_per_core, launch_params, gpus_per_rank, node_packing_count, wall_time_min, "
        "parent_ids, state, pending_file_cleanup, serialized_return_value, serialized_exception, last_update) "
        f"SELECT {site_id}, {app_id}, 'runs/' || i, {tags}, '', {empty_obj}, 1, 1, 1, 1, {empty_obj}, 0.0, 1, 0, "
        f"{empty_list}, {states_sql}, {'false' if pg else '0'}, '', '', {now} FROM {series}"
    )
    if pg:
        sql = sql.replace("%", "%%")  # psycopg2 reads % as a parameter marker
    with engine.begin() as conn:
        conn.exec_driver_sql(sql)


def login(url: str, username: str, password: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=120)
    page = client.get("/dashboard/login")
    nonce = re.search(r'name="login_token" value="([^"]+)"', page.text).group(1)
    answer = client.post("/dashboard/login", data={"username": username, "password": password, "login_token": nonce})
    assert answer.status_code == 303, answer.text
    return client


def measure(client: httpx.Client, path: str, repeat: int) -> tuple[float, float]:
    answer = client.get(path)  # warm-up (and a check)
    assert answer.status_code == 200, f"{path}: {answer.status_code} {answer.text[:300]}"
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        answer = client.get(path)
        times.append((time.perf_counter() - start) * 1000)
        assert answer.status_code == 200
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]


def run_backend(name: str, database_url: str, n_jobs: int, repeat: int, workdir: Path) -> None:
    from balsam.server.db import create_db_engine
    from balsam.server.migrate import upgrade_engine

    engine = create_db_engine(database_url)
    upgrade_engine(engine)
    proc, url = start_server(workdir, database_url, home=workdir / "home", create_tables=False)
    try:
        users = {}
        for who in ("a", "b"):
            username, password = f"bench-{who}-{os.getpid()}", "bench-password"
            httpx.post(f"{url}/auth/password/register", json={"username": username, "password": password}).raise_for_status()
            token = httpx.post(f"{url}/auth/password/login", data={"username": username, "password": password}).json()["access_token"]
            api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120)
            sites = []
            for k in range(2):
                site = api.post("/sites/", json={"name": f"site-{who}{k}", "path": f"/sites/{who}{k}"}).json()
                app = api.post("/apps/", json={"site_id": site["id"], "name": "Sim", "serialized_class": "", "source_code": "",
                                               "parameters": {}, "transfers": {}, "description": ""}).json()
                sites.append((site["id"], app["id"]))
            users[who] = {"username": username, "password": password, "api": api, "sites": sites}
        started = time.perf_counter()
        mine = n_jobs
        theirs = n_jobs // 10
        for who, total, offset in (("a", mine, 0), ("b", theirs, mine)):
            half = total // 2
            for k, (site_id, app_id) in enumerate(users[who]["sites"]):
                fill(engine, app_id, site_id, offset + k * half, half if k == 0 else total - half)
        if engine.dialect.name == "postgresql":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM ANALYZE jobs")
        else:
            with engine.begin() as conn:
                conn.exec_driver_sql("ANALYZE")
        print(f"\n[{name}] {mine:,} jobs of the user (+{theirs:,} of another user) inserted in "
              f"{time.perf_counter() - started:.1f} s")

        client = login(url, users["a"]["username"], users["a"]["password"])
        site_id = users["a"]["sites"][0][0]
        with engine.connect() as conn:
            middle = conn.exec_driver_sql(f"SELECT max(id) FROM jobs WHERE site_id = {site_id}").scalar() - mine // 4
            one_job = conn.exec_driver_sql(f"SELECT max(id) FROM jobs WHERE site_id = {site_id}").scalar()
        pages = [
            ("jobs page, first page (all states, counts)", "/dashboard/jobs"),
            ("jobs page, deep in the list (keyset)", f"/dashboard/jobs?before={middle}"),
            ("jobs page, state=RUNNING", "/dashboard/jobs?state=RUNNING"),
            ("jobs page, state=FAILED (1%)", "/dashboard/jobs?state=FAILED"),
            ("jobs page, one site", f"/dashboard/jobs?site_id={site_id}"),
            ("jobs page, tag campaign:c3 (10%)", "/dashboard/jobs?tags=campaign:c3"),
            ("jobs page, 200 per page", "/dashboard/jobs?limit=200"),
            ("one job", f"/dashboard/jobs/{one_job}"),
            ("sites page (counts per site and state)", "/dashboard/"),
        ]
        print(f"{'page':<48} {'median':>9} {'p95':>9}   limit")
        for label, path in pages:
            median, p95 = measure(client, path, repeat)
            flag = "ok" if p95 < LIMIT_MS else "OVER"
            print(f"{label:<48} {median:7.1f}ms {p95:7.1f}ms   {LIMIT_MS:.0f} ms {flag}")
        api = users["a"]["api"]
        median, p95 = measure(api, f"/jobs/?limit=50&offset={mine // 2}", repeat)
        print(f"{'peer: REST GET /jobs/?limit=50&offset=N/2':<48} {median:7.1f}ms {p95:7.1f}ms   (offset paging + count)")
        median, p95 = measure(api, "/jobs/?limit=50", repeat)
        print(f"{'peer: REST GET /jobs/?limit=50':<48} {median:7.1f}ms {p95:7.1f}ms   (first page + count)")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--pg-url", default=os.environ.get("BALSAM_BENCH_DATABASE_URL", PG_DEFAULT))
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})")
    with tempfile.TemporaryDirectory(prefix="balsam-bench-dashboard-") as tmp:
        for backend in args.backends.split(","):
            workdir = Path(tmp) / backend
            workdir.mkdir()
            if backend == "sqlite":
                url = f"sqlite:///{workdir / 'balsam.db'}"
            else:
                url = args.pg_url
                prepare_pg(url)
            run_backend(backend, url, args.jobs, args.repeat, workdir)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
