"""What one elastic-queue cycle costs the server: ``GET /sites/{id}/backlog`` against the peers.

The elastic queue needs the runnable and running node footprint of a site's jobs (with the site's
filter_tags) every cycle. Balsam 0.7 listed every runnable job to add them up; this benchmark
times, on the same database with N runnable jobs (half of them tagged for the site, packed 4 to a
node) and N/10 running ones:

1. ``GET /sites/{id}/backlog?tags=...`` (one aggregate query; what the module sends);
2. listing the same jobs, paged (``GET /jobs/?state=PREPROCESSED&state=RESTART_READY&tags=...``),
   which is what 0.7 did;
3. the count only (``GET /jobs/?...&limit=0``), which lacks the footprint but is the floor of any filtered query.

Each is the median of 5 calls, in milliseconds. Usage::

    python benchmarks/elastic_backlog.py [--jobs 50000] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import orjson

from bench_server import prepare_pg, start_server

CHUNK = 5000
PAGE = 5000
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/balsam_bench_elastic"


def check(resp: httpx.Response) -> httpx.Response:
    if resp.status_code >= 400:
        raise RuntimeError(f"{resp.request.method} {resp.request.url} -> {resp.status_code}: {resp.text[:500]}")
    return resp


def median_ms(call, repeat: int = 5) -> tuple[float, object]:
    times, value = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = call()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), value


def run_backend(name: str, database_url: str, n_jobs: int) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix=f"balsam-bench-elastic-{name}-"))
    proc, url = start_server(workdir, database_url, home=workdir, create_tables=database_url.startswith("sqlite"))
    try:
        anon = httpx.Client(base_url=url, timeout=600)
        check(anon.post("/auth/password/register", json={"username": "bench", "password": "bench password"}))
        token = check(anon.post("/auth/password/login", data={"username": "bench", "password": "bench password"})).json()["access_token"]
        http = httpx.Client(base_url=url, timeout=600, headers={"Authorization": f"Bearer {token}"})
        site = check(http.post("/sites/", json={"name": "bench", "path": "/bench"})).json()
        app = check(http.post("/apps/", json={"site_id": site["id"], "name": "Bench", "serialized_class": "x",
                                              "source_code": "y"})).json()
        total = n_jobs + n_jobs // 10
        specs = [{"workdir": f"b/{i}", "app_id": app["id"], "num_nodes": 1 + (i % 3 == 0), "node_packing_count": 4,
                  "tags": {"campaign": "xpcs" if i % 2 == 0 else "other"}} for i in range(total)]
        ids: list[int] = []
        for start in range(0, total, CHUNK):
            ids.extend(j["id"] for j in orjson.loads(check(http.post("/jobs/", content=orjson.dumps(specs[start:start + CHUNK]),
                                                                      headers={"content-type": "application/json"})).content))
        for start in range(0, total, CHUNK):
            check(http.put("/jobs/", params={"id": ids[start:start + CHUNK]}, json={"state": "PREPROCESSED"}))
        # a tenth more runs (acquired by a session, then RUNNING)
        running = ids[n_jobs:]
        session = check(http.post("/sessions/", json={"site_id": site["id"]})).json()["id"]
        acquired = 0
        while acquired < len(running):
            want = min(2048, len(running) - acquired)  # the API's most per acquire
            got = check(http.post(f"/sessions/{session}", json={"max_num_jobs": want, "filter_tags": {}})).json()
            if not got:
                break
            acquired += len(got)
            for start in range(0, len(got), CHUNK):
                check(http.patch("/jobs/", json=[{"id": j["id"], "state": "RUNNING"} for j in got[start:start + CHUNK]]))
            if acquired >= len(running):
                break

        tags = {"tags": "campaign:xpcs"}
        runnable = {"state": ["PREPROCESSED", "RESTART_READY"], **tags}
        figures: dict[str, float] = {}
        ms, backlog = median_ms(lambda: check(http.get(f"/sites/{site['id']}/backlog", params=tags)).json())
        figures["GET /sites/{id}/backlog (one aggregate query)"] = ms

        def list_all() -> float:
            footprint, offset = 0.0, 0
            while True:
                page = check(http.get("/jobs/", params={**runnable, "limit": PAGE, "offset": offset})).json()
                footprint += sum(j["num_nodes"] / j["node_packing_count"] for j in page["results"])
                offset += len(page["results"])
                if not page["results"] or offset >= page["count"]:
                    return footprint

        ms, listed = median_ms(list_all, repeat=3)
        figures["list runnable jobs and add up (Balsam 0.7)"] = ms
        ms, _ = median_ms(lambda: check(http.get("/jobs/", params={**runnable, "limit": 0})).json())
        figures["count only (GET /jobs/?limit=0)"] = ms
        states = backlog["states"]
        agg = states["PREPROCESSED"]["footprint"] + states.get("RESTART_READY", {}).get("footprint", 0.0)
        assert abs(agg - listed) < 1e-6, (agg, listed)
        print(f"{name}: {states['PREPROCESSED']['count']} runnable jobs of the site's tags (footprint {agg:.1f} nodes), "
              f"{states.get('RUNNING', {}).get('count', 0)} running, {total} jobs in all")
        return figures
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--pg-url", default=PG_DEFAULT)
    args = parser.parse_args()
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory(prefix="balsam-bench-elastic-db-") as db_dir:
            if backend == "sqlite":
                url = f"sqlite:///{db_dir}/bench.db"
            else:
                url = args.pg_url
                prepare_pg(url)
            figures = run_backend(backend, url, args.jobs)
        for what, ms in figures.items():
            print(f"  {what:<50} {ms:>9.1f} ms")


if __name__ == "__main__":
    main()
