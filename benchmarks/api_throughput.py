"""REST API throughput through HTTP: bulk create, filtered list, session acquire, bulk state update.

Starts a real uvicorn server per backend (SQLite in a temp dir; PostgreSQL in the database
``balsam_bench``, recreated), then for N jobs (default 10,000):

1. bulk-create them (POST /jobs/, 5,000 per call)
2. list them with a tag filter (GET /jobs/?tags=..., one page)
3. make them runnable (PUT /jobs/?tags=... state=PREPROCESSED, 5,000 per call)
4. acquire them in sessions of 256 (POST /sessions/{id})
5. bulk-update their state (PATCH /jobs/ RUNNING, then RUN_DONE, 5,000 per call)
6. steps 1 and 4 again on N more jobs with an ``Idempotency-Key`` on every POST (as balsam's client
   sends), so the cost of exactly-once creates is read beside the plain figures of the same run

and prints jobs/s for each step. Usage::

    python benchmarks/api_throughput.py [--jobs 10000] [--backends sqlite,postgresql] [--workers 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import orjson

from bench_server import prepare_pg, start_server

CHUNK = 5000
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/balsam_bench"


def prepare_pg(url: str) -> None:
    import sqlalchemy as sa

    from balsam.server.db import normalize_database_url
    from balsam.server.migrate import upgrade

    parsed = sa.engine.make_url(normalize_database_url(url))
    admin = sa.create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)')
        conn.exec_driver_sql(f'CREATE DATABASE "{parsed.database}"')
    admin.dispose()
    upgrade(url)


def post_json(http: httpx.Client, method: str, path: str, body, key: "str | None" = None, **kwargs) -> httpx.Response:
    """Send JSON encoded with orjson (what a fast client does; stdlib json would dominate the client side);
    ``key``: an Idempotency-Key, as balsam's own client sends on every POST (and PUT, PATCH, DELETE)."""
    headers = {"content-type": "application/json", **({"Idempotency-Key": key} if key else {})}
    return http.request(method, path, content=orjson.dumps(body), headers=headers, **kwargs)


def check(resp: httpx.Response) -> httpx.Response:
    if resp.status_code >= 400:
        raise RuntimeError(f"{resp.request.method} {resp.request.url} -> {resp.status_code}: {resp.text[:500]}")
    return resp


def run_backend(name: str, database_url: str, n_jobs: int, workers: int) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix=f"balsam-bench-{name}-"))
    proc, url = start_server(workdir, database_url, home=workdir, workers=workers,
                             create_tables=database_url.startswith("sqlite"))
    try:
        anon = httpx.Client(base_url=url, timeout=300)
        check(anon.post("/auth/password/register", json={"username": "bench", "password": "bench password"}))
        token = check(anon.post("/auth/password/login", data={"username": "bench", "password": "bench password"})).json()["access_token"]
        http = httpx.Client(base_url=url, timeout=300, headers={"Authorization": f"Bearer {token}"})
        site = check(http.post("/sites/", json={"name": "bench", "path": "/bench"})).json()
        app = check(http.post("/apps/", json={"site_id": site["id"], "name": "Bench", "serialized_class": "x",
                                              "source_code": "y"})).json()
        rates: dict[str, float] = {}

        specs = [{"workdir": f"bench/{i}", "app_id": app["id"], "tags": {"bench": "1", "group": str(i % 10)},
                  "data": {"i": i}, "num_nodes": 1, "node_packing_count": 4, "wall_time_min": i % 30}
                 for i in range(n_jobs)]
        t0 = time.perf_counter()
        ids: list[int] = []
        for start in range(0, n_jobs, CHUNK):
            ids.extend(j["id"] for j in orjson.loads(check(post_json(http, "POST", "/jobs/", specs[start:start + CHUNK])).content))
        rates["bulk create"] = n_jobs / (time.perf_counter() - t0)

        t0 = time.perf_counter()
        listing = orjson.loads(check(http.get("/jobs/", params={"tags": "bench:1", "limit": 100_000})).content)
        rates["list (tag filter)"] = len(listing["results"]) / (time.perf_counter() - t0)
        assert listing["count"] == n_jobs == len(listing["results"])

        t0 = time.perf_counter()
        for start in range(0, n_jobs, CHUNK):
            check(http.put("/jobs/", params={"id": ids[start:start + CHUNK]}, json={"state": "PREPROCESSED"}))
        rates["update by filter"] = n_jobs / (time.perf_counter() - t0)

        t0 = time.perf_counter()
        acquired = 0
        while True:
            session = check(http.post("/sessions/", json={"site_id": site["id"]})).json()["id"]
            jobs = orjson.loads(check(post_json(http, "POST", f"/sessions/{session}", {"max_num_jobs": 256, "filter_tags": {}})).content)
            acquired += len(jobs)
            if not jobs:
                break
        rates["acquire (sessions of 256)"] = acquired / (time.perf_counter() - t0)
        assert acquired == n_jobs

        for state in ("RUNNING", "RUN_DONE"):
            t0 = time.perf_counter()
            for start in range(0, n_jobs, CHUNK):
                check(post_json(http, "PATCH", "/jobs/", [{"id": i, "state": state, "state_data": {"bench": True}}
                                                          for i in ids[start:start + CHUNK]]))
            rates[f"bulk PATCH -> {state}"] = n_jobs / (time.perf_counter() - t0)

        # The same create and acquire with an Idempotency-Key on every POST (exactly-once across
        # retries; what balsam's client does), beside the figures above measured without it.
        keyed = [dict(spec, workdir=f"keyed/{i}", tags={"bench": "2"}) for i, spec in enumerate(specs)]
        t0 = time.perf_counter()
        keyed_ids: list[int] = []
        for start in range(0, n_jobs, CHUNK):
            answer = check(post_json(http, "POST", "/jobs/", keyed[start:start + CHUNK], key=uuid.uuid4().hex))
            keyed_ids.extend(j["id"] for j in orjson.loads(answer.content))
        rates["bulk create, Idempotency-Key"] = n_jobs / (time.perf_counter() - t0)
        for start in range(0, n_jobs, CHUNK):
            check(http.put("/jobs/", params={"id": keyed_ids[start:start + CHUNK]}, json={"state": "PREPROCESSED"}))
        t0 = time.perf_counter()
        acquired = 0
        while True:
            session = check(post_json(http, "POST", "/sessions/", {"site_id": site["id"]}, key=uuid.uuid4().hex)).json()["id"]
            jobs = orjson.loads(check(post_json(http, "POST", f"/sessions/{session}", {"max_num_jobs": 256, "filter_tags": {}},
                                                key=uuid.uuid4().hex)).content)
            acquired += len(jobs)
            if not jobs:
                break
        rates["acquire, Idempotency-Key"] = acquired / (time.perf_counter() - t0)
        assert acquired == n_jobs
        return rates
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers (PostgreSQL only)")
    parser.add_argument("--pg-url", default=os.environ.get("BALSAM_BENCH_DATABASE_URL", PG_DEFAULT))
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    for backend in args.backends.split(","):
        if backend == "sqlite":
            with tempfile.TemporaryDirectory(prefix="balsam-bench-db-") as db_dir:
                results["SQLite"] = run_backend("sqlite", f"sqlite:///{db_dir}/balsam.db", args.jobs, 1)
        elif backend == "postgresql":
            prepare_pg(args.pg_url)
            results["PostgreSQL"] = run_backend("postgresql", args.pg_url, args.jobs, args.workers)
        else:
            raise SystemExit(f"unknown backend {backend!r} (sqlite, postgresql)")
    steps = list(next(iter(results.values())))
    print(f"\nBalsam REST API throughput, {args.jobs} jobs, through HTTP (jobs/s)")
    header = f"{'step':<28}" + "".join(f"{name:>14}" for name in results)
    print(header)
    print("-" * len(header))
    for step in steps:
        print(f"{step:<28}" + "".join(f"{results[name][step]:>14,.0f}" for name in results))


if __name__ == "__main__":
    main()
